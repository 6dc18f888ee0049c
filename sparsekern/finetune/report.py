"""Where an adapter's update went: density by layer, path, irrep order l and element,
and whether l = 2 (d-like) paths take a larger share of the update for transition
metals than for the other elements (the paper's signature)."""

from __future__ import annotations

import hashlib
import json
import textwrap
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..files import atomic_write, names_a_file
from .adapter_set import load_adapter
from .adapters import check_base, check_entries, group_from_dict, read_adapter, stored_config
from .config import SparseConfig
from .methods import LORA_ADAPTER
from .statistics import absent_labels, count_changes, stats

# d-block, groups 3-12: Sc-Zn, Y-Cd, La, Hf-Hg, Ac, Rf-Cn.
TRANSITION_METALS = frozenset(
    list(range(21, 31)) + list(range(39, 49)) + [57] + list(range(72, 81)) + [89] + list(range(104, 113)))


def is_transition_metal(label: str) -> Optional[bool]:
    """True / False for a chemical symbol, None for a label that is not one."""
    from ase.data import atomic_numbers

    z = atomic_numbers.get(label)
    return None if z is None else z in TRANSITION_METALS


def adapter_stats(path, base: Optional[torch.nn.Module] = None) -> dict:
    """``stats`` of the model the adapter makes (sparse: its stored entries; LoRA: the
    nonzeros of each block's B A update), from the adapter alone where it describes its
    weight groups, else by loading it into ``base``. A ``base`` given is checked: the
    adapter must have been made for it (it is patched, and modified for old files)."""
    tensors, metadata = read_adapter(path)
    if base is not None:
        check_base(base, path, metadata, "the given base model")
    if "groups" in metadata:
        try:
            groups, labels = (json.loads(metadata.get(key, "{}")) for key in ("groups", "element_labels"))
            if not (isinstance(groups, dict) and isinstance(labels, dict)):
                raise TypeError("its groups and element labels must be JSON objects")
            groups = {stem: [group_from_dict(g) for g in gs] for stem, gs in groups.items()}
            absent = absent_labels((json.loads(metadata.get("config") or "null") or {}).get("elements"))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"adapter {path}: its weight-group metadata is damaged ({exc})") from None
        changed = partial(_lora_changed if metadata["format"] == LORA_ADAPTER else _sparse_changed,
                          path, tensors, metadata)
        return count_changes(_entries(path, groups, changed), _labeller(labels), absent)
    if base is None:
        raise ValueError(f"adapter {path} does not describe its weight groups (written by an older sparsekern): "
                         "give its base model (--model BASE) to report on it")
    load_adapter(base, path)
    return stats(base)


def _entries(path, groups, changed):
    """(layer name, groups, changed mask) per parameter; ``changed(stem, groups, numel)``
    gives the flat mask."""
    for stem, gs in groups.items():
        if not gs:
            raise ValueError(f"adapter {path}: no weight groups for {stem!r} (damaged file)")
        param = gs[0].param
        if not stem.endswith("." + param):
            raise ValueError(f"adapter {path}: entry {stem!r} does not end in its parameter name {param!r}")
        yield stem[: -len(param) - 1], gs, changed(stem, gs, max(g.offset + g.numel for g in gs))


def _sparse_changed(path, tensors, metadata, stem, gs, numel) -> torch.Tensor:
    index = tensors.get(f"{stem}.index")
    if index is None:
        raise ValueError(f"adapter {path}: weight groups of {stem!r} but no stored entries (damaged file)")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise ValueError(f"adapter {path}: indices of {stem!r} fall outside its weight groups (damaged file)")
    values = tensors.get(f"{stem}.values")
    check_entries(path, {} if values is None else {f"{stem}.values": values}, stem, index)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[index.long()] = True
    return mask


def _lora_changed(path, tensors, metadata, stem, gs, numel) -> torch.Tensor:
    """The nonzeros of each group's update B A * alpha / rank, as ``LoRADelta`` makes it."""
    config = json.loads(metadata.get("config") or "null") or {}
    scale = config.get("lora_alpha", SparseConfig.lora_alpha) / config.get("lora_rank", SparseConfig.lora_rank)
    mask = torch.zeros(numel, dtype=torch.bool)
    for i, g in enumerate(gs):
        a, b = tensors.get(f"{stem}.{i}.a"), tensors.get(f"{stem}.{i}.b")
        if a is None or b is None or a.dim() != 3 or b.dim() != 3 or a.shape[2] != b.shape[1] \
                or (a.shape[0], a.shape[1], b.shape[2]) != g.shape:
            raise ValueError(f"adapter {path}: the factors of {stem!r} block {i} are missing or do not fit "
                             "(damaged file)")
        check_entries(path, {f"{stem}.{i}.a": a, f"{stem}.{i}.b": b})
        g.view(mask).copy_(torch.bmm(a, b) * scale != 0)
    return mask


def _labeller(labels: Dict[str, List[str]]) -> Callable[[int], List[str]]:
    def labels_for(count: int) -> List[str]:
        names = labels.get(str(count))
        return names if names is not None and len(names) == count else [f"element {i}" for i in range(count)]
    return labels_for


def _compare(a: float, b: float) -> tuple:
    """Is ``a`` larger than ``b``: (True, "yes"), (False, "no"), or (None, "equal") for a
    tie (neither is larger; "no" would say the other one is)."""
    return (None, "equal") if a == b else (a > b, "yes" if a > b else "no")


def d_shell_verdict(s: dict, model: Optional[str] = None) -> dict:
    """Do l = 2 paths take a larger share of the update for transition metals (TM)?
    Pooled over the per-element weights of each set of elements: ``l2_density`` =
    changed / total l = 2 weights decides (it compares like with like: every element
    has the same per-element paths); ``l2_share`` = changed l = 2 weights / all changed
    weights is reported too, but a set with few changes makes it noisy. Only elements
    the update touched (any of their per-element weights changed) are pooled: a
    foundation model knows ~90 elements, a fine-tuning set holds a few, and the weights
    of absent elements get no gradient. ``model``: the base model's name, for the reason."""
    pooled = {True: {"l2_changed": 0, "l2_total": 0, "changed": 0, "total": 0, "elements": []},
              False: {"l2_changed": 0, "l2_total": 0, "changed": 0, "total": 0, "elements": []}}
    for element, by_l in s["by_element_l"].items():
        tm = is_transition_metal(element)
        if tm is None or not any(v["changed"] for v in by_l.values()):
            continue
        p = pooled[tm]
        p["elements"].append(element)
        p["changed"] += sum(v["changed"] for v in by_l.values())
        p["total"] += sum(v["total"] for v in by_l.values())
        if "2" in by_l:
            p["l2_changed"] += by_l["2"]["changed"]
            p["l2_total"] += by_l["2"]["total"]
    sets = {}
    for name, p in (("transition_metals", pooled[True]), ("other_elements", pooled[False])):
        sets[name] = {**p, "l2_share": p["l2_changed"] / p["changed"] if p["changed"] else None,
                      "l2_density": p["l2_changed"] / p["l2_total"] if p["l2_total"] else None}
    tm, other = sets["transition_metals"], sets["other_elements"]
    answer, word = None, "undetermined"
    if not s["by_element_l"]:  # (a SevenNet: every MACE has per-element symmetric-contraction weights)
        why = (f"the model{f' ({model})' if model else ''} has no element-indexed path weights (a SevenNet's only "
               "per-element weights are its l = 0 embedding): the per-element question cannot be asked of it")
    elif not tm["elements"] and not other["elements"]:
        why = "the update changed no per-element weights"
    elif not tm["elements"] or not other["elements"]:
        why = "the update changed no per-element weights of " + (
            "transition metals" if not tm["elements"] else "non-transition-metal elements")
    elif not tm["l2_total"] or not other["l2_total"]:
        why = "the model has no per-element l = 2 paths"
    else:
        answer, word = _compare(tm["l2_density"], other["l2_density"])
        why = (f"{100 * tm['l2_density']:.2f} % of the transition metals' per-element l = 2 weights changed, "
               f"{100 * other['l2_density']:.2f} % of the other elements'")
    return {"l2_larger_share_for_transition_metals": answer, "answer": word, "reason": why, **sets}


def l_profile(s: dict) -> Dict[str, Dict[str, dict]]:
    """Per element the update touched (its per-element weights: element-indexed layers
    and element-resolved deltas), per irrep order l: ``density`` = changed / all of its
    weights at that l, ``share`` = changed at that l / all its changed weights."""
    profile = {}
    for element, by_l in s["by_element_l"].items():
        changed = sum(v["changed"] for v in by_l.values())
        if changed:
            profile[element] = {l: {**v, "share": v["changed"] / changed} for l, v in sorted(by_l.items())}
    return profile


def l2_against_l01(s: dict) -> Optional[dict]:
    """Within the transition metals the update touched, pooled: the density of the update
    at l = 2 against at l = 0 and 1 (the question for data with no other element)."""
    tm = [by_l for e, by_l in l_profile(s).items() if is_transition_metal(e)]
    l2 = [sum(by_l["2"][k] for by_l in tm if "2" in by_l) for k in ("changed", "total")]
    l01 = [sum(by_l[l][k] for by_l in tm for l in ("0", "1") if l in by_l) for k in ("changed", "total")]
    if not l2[1] or not l01[1]:
        return None
    larger, word = _compare(l2[0] / l2[1], l01[0] / l01[1])
    return {"l2_density": l2[0] / l2[1], "l01_density": l01[0] / l01[1], "l2_larger": larger, "answer": word}


# (a LoRA report's densities are 100 % wherever it reaches: this says why)
LORA_NOTE = ("a LoRA update B A is dense by construction: it changes every weight of each block it reaches, so "
             "its densities say which blocks those are, not where the update is large")


def build_report(path, base: Optional[torch.nn.Module] = None) -> dict:
    _, metadata = read_adapter(path)
    s = adapter_stats(path, base)
    verdict = d_shell_verdict(s, model_name(metadata.get("base_model")))
    l2_vs_l01 = l2_against_l01(s)
    if metadata["format"] == LORA_ADAPTER:  # neither question can be asked of it
        l2_vs_l01 = None
        if verdict["answer"] != "undetermined":  # (its densities compared: 100 % against 100 %, "equal")
            verdict.update(l2_larger_share_for_transition_metals=None, answer="undetermined", reason=(
                "a LoRA update B A changes every weight of each block it touches, so the share of changed weights "
                "cannot tell (a sparse adapter can)"))
    return {**adapter_identity(path), "format": metadata.get("format"), "method": method_of(metadata),
            "fingerprint": metadata.get("fingerprint"), "base_model": metadata.get("base_model"),
            "modal": metadata.get("modal"), "note": LORA_NOTE if metadata["format"] == LORA_ADAPTER else None,
            "config": json.loads(metadata.get("config", "null")), **s, "d_shell": verdict,
            "l_profile": l_profile(s), "transition_metals_l2_vs_l01": l2_vs_l01}


def method_of(metadata: dict) -> str:
    """The method the adapter holds: sparse (its mode) or LoRA (its rank), and whether its
    deltas are element-resolved."""
    config = stored_config(metadata)  # (None: a sparse adapter of an old sparsekern)
    lora = metadata["format"] == LORA_ADAPTER
    details = [] if config is None else [f"rank {config.lora_rank}" if lora else config.mode] + (
        ["element-resolved"] if config.element_resolved else [])
    return ("LoRA" if lora else "sparse") + (f" ({', '.join(details)})" if details else "")


def model_name(base: Optional[str]) -> Optional[str]:
    """The base model as the titles name it: a file by its name, a package's model as named."""
    return Path(base).name if base and names_a_file(base) else base


def title(report: dict) -> str:
    """Which adapter the report describes: its method, file, base model and fidelity."""
    base, adapter = model_name(report["base_model"]), Path(report["adapter"])
    return (f"{report['method']} adapter {adapter.parent.name}/{adapter.name}" + (f" of {base}" if base else "")
            + (f", modal {report['modal']}" if report["modal"] else ""))


def summary_line(report: dict) -> str:
    return (f"{title(report)}: {report['changed_params']} of {report['total_params']} path weights changed "
            f"({100 * report['density']:.2f} %)")


def verdict_line(report: dict) -> str:
    v = report["d_shell"]
    return f"l = 2 paths take a larger share of the update for transition metals: {v['answer']} ({v['reason']})"


def profile_lines(report: dict) -> List[str]:
    """Per element the update touched: its density at each l (and share of its update),
    then the transition metals' l = 2 against their l = 0, 1."""
    lines = [f"{element}: " + ", ".join(f"l = {l} {100 * v['density']:.2f} % ({100 * v['share']:.0f} % of its update)"
                                        for l, v in by_l.items())
             for element, by_l in report["l_profile"].items()]
    tm = report["transition_metals_l2_vs_l01"]
    if tm is not None:
        lines.append(f"transition metals: l = 2 {100 * tm['l2_density']:.2f} % changed, l = 0, 1 "
                     f"{100 * tm['l01_density']:.2f} %: l = 2 larger: {tm['answer']}")
    return lines


def adapter_identity(path) -> dict:
    """What a report records of the adapter it describes (every run names its adapter
    adapter.safetensors): its resolved path and its content's SHA-256."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"adapter": str(Path(path).resolve()), "adapter_sha256": digest}


def check_replaceable(out_dir, stem: str, identity: dict) -> None:
    """Refuse (one line) to replace another adapter's report: an existing ``stem``.json in
    ``out_dir`` is rewritten only for the adapter it describes (``adapter_identity``: the
    same file, or its content moved) or, from before reports recorded that, beside it."""
    existing = Path(out_dir) / f"{stem}.json"
    if not existing.exists():
        return
    try:
        old = json.loads(existing.read_text())
        described = old["adapter"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{existing} exists and is not a sparsekern report: choose another --out") from None
    same = described == identity["adapter"] or old.get("adapter_sha256") == identity["adapter_sha256"]
    if not same and ("adapter_sha256" in old or existing.parent.resolve() != Path(identity["adapter"]).parent):
        raise ValueError(f"{existing} is the report of another adapter ({described}): choose another --out")


def write_report(report: dict, out_dir, stem: str) -> tuple:
    """``stem``.json and ``stem``.png in ``out_dir``, each written atomically; another
    adapter's report there is refused (``check_replaceable``)."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, stem, report)
    text = json.dumps(report, indent=1) + "\n"
    json_path = atomic_write(out_dir / f"{stem}.json", lambda tmp: Path(tmp).write_text(text))
    png_path = atomic_write(out_dir / f"{stem}.png", lambda tmp: _plot(report, tmp))
    return png_path, json_path


def _plot(report: dict, filename: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(20, 13))
    grid = fig.add_gridspec(2, 3)
    _bars(fig.add_subplot(grid[0, 0]), report["by_layer"], "by layer")
    paths = report["by_path"]
    _bars(fig.add_subplot(grid[0, 1:]), paths, f"by path ({len(paths)} paths)", label_every=max(1, len(paths) // 60))
    _bars(fig.add_subplot(grid[1, 0]), report["by_l"], "by irrep order l of the path")
    _element_bars(fig.add_subplot(grid[1, 1]), report["by_element"])
    _element_l_map(fig.add_subplot(grid[1, 2]), report)
    lines = [summary_line(report), report["note"], verdict_line(report)]
    fig.suptitle("\n".join(textwrap.fill(line, 200) for line in lines if line), fontsize=10)
    fig.tight_layout()
    fig.savefig(filename, format="png", dpi=110)
    plt.close(fig)


def _count(n: int) -> str:
    """512, 40.9k, 52.3M: how many weights a bar counts, in its label."""
    for size, unit in ((1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _bars(ax, table: dict, title: str, colors=None, label_every: int = 1,
          empty: str = "no such weights in this model") -> None:
    """The density of each entry of ``table``, labelled with how many weights it counts
    (an 18 % bar may be a layer of 512 weights)."""
    ax.set_title(title, fontsize=10)
    names = list(table)
    if not names:
        ax.set_axis_off()
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        return
    values = [100 * table[n]["density"] for n in names]
    ax.bar(range(len(names)), values, color=colors or "tab:blue")
    ticks = list(range(0, len(names), label_every))
    labels = [f"{names[i]} ({_count(table[names[i]]['total'])})" for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90 if sum(map(len, labels)) > 60 else 0, fontsize=7)
    # from 0 (an update of nothing: not -0.04 %), with room above the tallest bar
    ax.set(ylabel="changed weights (%)", ylim=(0, 1.05 * max(values) or 1))
    ax.set_xlabel("(in brackets: how many weights)", fontsize=8)


def _element_bars(ax, elements: dict) -> None:
    """The elements whose per-element weights the update changed (a foundation model
    knows ~90, a fine-tuning set holds a few): how many others there are, in the title."""
    touched = {e: v for e, v in elements.items() if v["changed"]}
    hidden = len(elements) - len(touched)
    title = "by element (per-element weights; red: transition metals)" + (
        f"\n{hidden} unchanged element{'s' if hidden > 1 else ''} not shown" if hidden and touched else "")
    _bars(ax, touched, title, ["tab:red" if is_transition_metal(e) else "tab:blue" for e in touched],
          empty=f"no per-element weight changed ({len(elements)} elements)" if elements else
          "no per-element weights in this model")


def _element_l_map(ax, report: dict) -> None:
    """Density by element the update touched (rows) and irrep order l (columns), written in
    each cell: where the update went within each element (transition metals: l = 2?)."""
    import numpy as np

    profile = report["l_profile"]
    ax.set_title("by element and l (per-element weights the update touched)", fontsize=10)
    if not profile:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no per-element weight changed" if report["by_element_l"] else
                "no element-indexed path weights in this model", ha="center", va="center", transform=ax.transAxes)
        return
    orders = [l for l in report["by_l"] if any(l in by_l for by_l in profile.values())]
    cells = np.array([[100 * by_l[l]["density"] if l in by_l else np.nan for l in orders] for by_l in profile.values()])
    image = ax.imshow(cells, cmap="viridis", vmin=0, aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="changed weights (%)")
    ax.set_xticks(range(len(orders)), [l if l == "radial" else f"l = {l}" for l in orders])
    ax.set_yticks(range(len(profile)), list(profile), fontsize=8 if len(profile) <= 30 else 5)
    for label, element in zip(ax.get_yticklabels(), profile):
        label.set_color("tab:red" if is_transition_metal(element) else "black")
    if cells.size <= 300:  # (more cells than that: too small to write in)
        for (i, j), v in np.ndenumerate(cells):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f} %", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 * np.nanmax(cells) else "black")
    ax.set(xlabel="irrep order l of the path", ylabel="element (red: transition metals)")
