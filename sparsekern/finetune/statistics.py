"""How many path weights the deltas change: ``stats`` of a model, and the counting it
shares with ``report`` (which reads the weight groups from an adapter instead)."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Collection, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import delta_slot
from ..delta_slot import Delta
from ..integrations import computing_model
from ..paths import WeightGroup
from ..patching import patched_layers
from .density import settle
from .lifecycle import target_groups


def element_labels(model: torch.nn.Module, count: int) -> List[str]:
    """Chemical symbols of the element axis of per-element weights, where known (the
    model's family maps atomic numbers to that axis)."""
    from ase.data import chemical_symbols

    core, family = computing_model(model)
    index = family.element_index(core) if family is not None else {}
    if len(index) == count:
        return [chemical_symbols[z] for z, _ in sorted(index.items(), key=lambda zi: zi[1])]
    if count == len(chemical_symbols) - 1:  # one-hot over atomic numbers 1..
        return chemical_symbols[1:]
    return [f"element {i}" for i in range(count)]


def _changed_mask(delta: Optional[Delta]) -> Optional[torch.Tensor]:
    """Flat boolean mask of the entries a delta changes (also once merged)."""
    if delta is None:
        return None
    if delta.merged:
        mask = torch.zeros(delta.numel, dtype=torch.bool, device=delta._unmerge_index.device)
        mask[delta._unmerge_index] = True
        return mask
    return delta().view(-1) != 0


def absent_labels(elements: Optional[Iterable[int]]) -> FrozenSet[str]:
    """The chemical symbols of the elements outside ``elements`` (a config's: the training
    data's atomic numbers), whose per-element entries are pinned at zero; none for None."""
    from ase.data import chemical_symbols

    if elements is None:
        return frozenset()
    if not all(isinstance(z, int) and 0 < z < len(chemical_symbols) for z in elements):
        raise ValueError(f"elements must be atomic numbers, got {elements!r:.60}")
    return frozenset(chemical_symbols[1:]) - {chemical_symbols[z] for z in elements}


def count_changes(entries: Iterable[Tuple[str, Sequence[WeightGroup], Optional[torch.Tensor]]],
                  labels_for: Callable[[int], List[str]], absent: Collection[str] = ()) -> dict:
    """The counting behind ``stats`` (and ``report``, which reads the groups from an
    adapter): ``entries`` holds (layer name, the weight groups of one parameter, flat
    changed mask or None); ``labels_for(G)`` names the G elements of per-element groups,
    whose rows of the ``absent`` elements (``absent_labels``) are pinned and not counted."""
    layers: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    by_path: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    by_l: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    by_element: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    by_element_l: Dict[str, Dict[str, List[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for name, groups, flat in entries:
        seen: Dict[str, int] = defaultdict(int)
        for g in groups:
            nz = g.view(flat) if flat is not None else None
            per = nz.sum((1, 2)).tolist() if nz is not None else [0] * g.shape[0]
            labels = labels_for(g.shape[0]) if g.per_element else [""]
            rows = [(label, int(c)) for label, c in zip(labels, per) if label not in absent]
            key = "radial" if g.l is None else str(g.l)
            seen[g.label] += 1  # e.g. several 0e inputs of one linear: number the repeats
            path = f"{name}.{g.param} {g.label}" + (f" ({seen[g.label]})" if seen[g.label] > 1 else "")
            for counter in (layers[name], by_path[path], by_l[key]):
                counter[0] += len(rows) * g.shape[1] * g.shape[2]
                counter[1] += sum(c for _, c in rows)
            if g.per_element:
                for label, c in rows:
                    for counter in (by_element[label], by_element_l[label][key]):
                        counter[0] += g.shape[1] * g.shape[2]
                        counter[1] += c
    by_layer = {k: v for k, v in layers.items() if v[0]}
    total = sum(t for t, _ in by_layer.values())
    changed = sum(c for _, c in by_layer.values())

    def table(d):
        return {k: {"total": t, "changed": c, "density": c / t if t else 0.0} for k, (t, c) in d.items()}

    def by_order(d):  # l = 0, 1, 2, ... then the radial weights
        return table(dict(sorted(d.items(), key=lambda kv: (kv[0] == "radial", int(kv[0]) if kv[0].isdigit() else 0))))

    return {
        "total_params": total,
        "changed_params": changed,
        "density": changed / total if total else 0.0,
        "by_layer": table(by_layer),
        "by_path": table(by_path),
        "by_l": by_order(by_l),
        "by_element": table(by_element),
        "by_element_l": {e: by_order(d) for e, d in by_element_l.items()},
    }


@torch.no_grad()
def stats(model: torch.nn.Module) -> dict:
    """How many path weights the deltas change: totals and breakdowns by layer, by
    path, by irrep order l of the path, by element, and by element and l. Out of the
    weights the deltas' config lets them change (not the radial MLPs' where it leaves
    them out, nor the per-element ones of elements outside its ``elements``), as an
    adapter counts them."""
    settle(model)  # (after a user's optimizer step the thresholds are off the density's target)
    entries = []
    config = delta_slot.config_of(model)
    absent = absent_labels(config.elements if config is not None else None)
    for name, layer in patched_layers(model):
        for param, groups in target_groups(layer, config).items():
            delta = delta_slot.get(layer, param)  # its groups: element-resolved ones have every element's
            entries.append((name, delta.groups if delta is not None else groups, _changed_mask(delta)))
    counts = count_changes(entries, lambda count: element_labels(model, count), absent)
    return {
        **counts,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_params": sum(p.numel() for n, p in model.named_parameters() if not delta_slot.is_delta_parameter(n)),
    }
