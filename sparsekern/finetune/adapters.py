"""Adapters: what fine-tuning changed, with a fingerprint of the base model, in one
safetensors file, in the format of the deltas' mode (``methods.MODES``):

- ``sparsekern-adapter`` (str, block): the active delta entries (index, values) of each
  parameter: kilobytes for a few % of changed weights;
- ``sparsekern-lora-adapter``: the factors A_g, B_g of every path block, not their
  dense product (whose nonzeros are all of the path weights); loading rebuilds the
  LoRA deltas on the base and copies the factors in.

Both describe their weight groups, so ``sparsekern report`` needs no base model, and
carry the base's fingerprint; loading them (named, several on one base) is
``adapter_set``'s."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import __version__, delta_slot
from ..files import MODEL_SUFFIXES, atomic_write
from ..integrations import computing_model, family_of
from ..integrations.cuda_graphs import Replays
from ..paths import WeightGroup
from ..patching import check_module, patch, patched_layers
from .config import SparseConfig
from .delta import FixedDelta
from .density import settle
from .lifecycle import attach_targets, delta_targets, prepare, target_groups
from .methods import LORA_ADAPTER, SPARSE_ADAPTER, adapter_format
from .statistics import element_labels

Tensors = Dict[str, torch.Tensor]


def group_to_dict(g: WeightGroup) -> dict:
    return {"param": g.param, "offset": g.offset, "shape": list(g.shape), "layout": g.layout,
            "label": g.label, "l": g.l, "per_element": g.per_element}


def group_from_dict(d: dict) -> WeightGroup:
    if len(d["shape"]) != 3:
        raise ValueError(f"a weight group's shape has 3 entries (paths, rows, columns), got {d['shape']}")
    return WeightGroup(str(d["param"]), int(d["offset"]), tuple(int(n) for n in d["shape"]), str(d["layout"]),
                       str(d["label"]), None if d["l"] is None else int(d["l"]), bool(d["per_element"]))


FINGERPRINT_DTYPE = "float32"  # the base values are hashed at this precision
FINGERPRINT_SCOPE = "model"  # what new adapters' fingerprints cover (``fingerprint``)
# Weights a cuEquivariance round trip moves by round-off (MACE's symmetric contraction,
# through its reduced-CG projection and back: a float32 value in ~1e4 flips when rounded):
# new adapters hash their names and sizes, and hold a sketch of their values (``sketch``)
SKETCHED = ".symmetric_contractions."
SKETCH_PROJECTIONS, SKETCH_RTOL = 3, 1e-5


def fingerprint(model: torch.nn.Module, precision: str = FINGERPRINT_DTYPE, scope: str = FINGERPRINT_SCOPE,
                sketched: bool = True) -> str:
    """SHA-256 over names, sizes and values (floating point rounded to ``precision``)
    of the base model. ``scope`` "model": every parameter of the family's model (a
    wrapper's modules and the deltas left out) and every buffer outside sparsekern's
    layers (whose constants follow from the weights' shapes), the per-element energies
    as the base holds them (an active adapter's E0 shift taken out): cutoffs, scale and
    shift, E0s. "paths" (adapters before ``fingerprint_scope`` was recorded): the path
    weights alone, named as in ``model``, with their shapes. The same for a model
    patched or not, and for a float64 model cast to float32 or back. ``sketched``: the
    values of the ``SKETCHED`` weights left to ``sketch`` (adapters that hold one). (Adapters
    written before ``fingerprint_dtype`` was recorded hashed the float64 values:
    ``check_base`` recomputes that for them.)"""
    dtype = getattr(torch, precision)
    h = hashlib.sha256()
    for name, t in _fingerprinted(model, scope):
        h.update(name.encode())
        # "model": the size, not the shape (MACE keeps E0s as (heads, n) where older models hold (n,))
        h.update(str(tuple(t.shape) if scope == "paths" else t.numel()).encode())
        if sketched and SKETCHED in name:
            continue
        t = t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def sketch(model: torch.nn.Module) -> Dict[str, List[float]]:
    """Of each ``SKETCHED`` weight of the base: its norm and its projections on
    ``SKETCH_PROJECTIONS`` random unit vectors (seeded), in float64."""
    out = {}
    for name, t in _fingerprinted(model, FINGERPRINT_SCOPE):
        if SKETCHED in name:
            v = t.detach().to("cpu", torch.float64).reshape(-1)
            r = torch.randn(SKETCH_PROJECTIONS, v.numel(), generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
            out[name] = [float(v.norm()), *(r / r.norm(dim=1, keepdim=True) @ v).tolist()]
    return out


def _sketches_agree(theirs: Dict[str, List[float]], mine: Dict[str, List[float]]) -> bool:
    return theirs.keys() == mine.keys() and all(
        abs(a - b) <= SKETCH_RTOL * theirs[k][0] for k in theirs for a, b in zip(theirs[k], mine[k]))


def _fingerprinted(model: torch.nn.Module, scope: str) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) of what a fingerprint of ``scope`` covers, by name."""
    if any(d.merged for *_, d in delta_slot.iter_deltas(model)):
        raise ValueError("fingerprint: the model has merged deltas; unmerge it first")
    if not patched_layers(model):
        model = patch(copy.deepcopy(model))
    if scope == "paths":
        entries = [(f"{name}.{param}", layer.get_parameter(param))
                   for name, layer in patched_layers(model) for param in target_groups(layer)]
    else:
        entries = _base_entries(model)
    return sorted(entries, key=lambda entry: entry[0])


def _base_entries(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) of what a "model" fingerprint covers, named within the family's
    model (so a wrapper around it, CUDA graphs' or magnetism's, changes no name)."""
    from .adapter_set import base_e0s  # (adapter_set builds on this module)

    core = computing_model(model)[0] or model
    deltas = {id(p) for *_, d in delta_slot.iter_deltas(core) for p in d.parameters()}
    inside = tuple(f"{name}." for name, _ in patched_layers(core))
    e0 = base_e0s(model)  # (table, the base's values) or None
    entries = [(n, p) for n, p in core.named_parameters() if id(p) not in deltas]
    entries += [(n, b) for n, b in core.named_buffers() if not n.startswith(inside)]
    return [(n, e0[1] if e0 is not None and t is e0[0] else t) for n, t in entries]


def check_adaptable(model, what: str) -> None:
    """One line where ``model`` is not a module, or is a CUDA-graph wrapper (whose
    model's layers, named within it, are what adapters name)."""
    check_module(model, what)
    if isinstance(model.__dict__.get("replays"), Replays):
        if isinstance(getattr(model, "model", None), torch.nn.Module):
            raise ValueError(f"{what}: {type(model).__name__} wraps the model: give its .model (the replays follow "
                             f"the adapter)")
        raise ValueError(f"{what}: {type(model).__name__} replays the model's CUDA graphs: load and save adapters "
                         f"before it captures them")


def wrapper_name(model: torch.nn.Module) -> str:
    """The wrapper family ``model`` is (``magnetic``: the base with magnetic modules beside
    it), "" for a family's plain model (or a model of no family)."""
    inner, family = computing_model(model)[0], family_of(model)
    return family.name if inner is not None and inner is not model and family is not None else ""


def wrapper_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the names and float64 values of a wrapper's own modules (magnetism's:
    those an adapter of it is loaded beside), the family's model and the deltas left out."""
    core = computing_model(model)[0]
    inside = {id(t) for t in (*core.parameters(), *core.buffers())} | {
        id(p) for *_, d in delta_slot.iter_deltas(model) for p in d.parameters()}
    h = hashlib.sha256()
    for name, t in sorted((*model.named_parameters(), *model.named_buffers()), key=lambda entry: entry[0]):
        if id(t) not in inside:
            h.update(name.encode())
            t = t.detach().to("cpu", torch.float64) if t.is_floating_point() else t.detach().cpu()
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _kind(wrapper: str) -> str:
    return f"the base model with its {wrapper} modules" if wrapper else "a plain base model"


def check_base(model: torch.nn.Module, path, metadata: dict, what: str = "this model") -> None:
    """Refuse (one line) an adapter made for another kind of model (the base with a
    wrapper's modules, or without) or whose recorded base fingerprint is not ``model``'s
    (patched here if needed: the fingerprint covers sparsekern's layers)."""
    made_for, found_kind = metadata.get("wrapper", ""), wrapper_name(model)
    if made_for != found_kind:
        raise ValueError(f"adapter {path} was made for {_kind(made_for)}, but {what} is {_kind(found_kind)}"
                         + (f" (load it with the {made_for} modules the run wrote beside it)" if made_for else ""))
    if made_for and metadata.get("wrapper_fingerprint") not in (None, wrapper_fingerprint(model)):
        raise ValueError(f"adapter {path} was made with other {made_for} modules than {what}'s (load it with those "
                         f"the run wrote beside it)")
    if not patched_layers(model):
        patch(model)
    expected, sketched = metadata.get("fingerprint"), "fingerprint_sketch" in metadata
    found = fingerprint(model, metadata.get("fingerprint_dtype", "float64"), metadata.get("fingerprint_scope", "paths"),
                        sketched)
    if expected != found or (sketched and not _sketches_agree(json.loads(metadata["fingerprint_sketch"]),
                                                              sketch(model))):
        raise ValueError(f"adapter {path} was made for a different base model than {what} "
                         f"(its base fingerprint {expected[:12] if expected else None}..., {what}'s {found[:12]}...)")


def _describe(model: torch.nn.Module, deltas: Sequence) -> Dict[str, str]:
    """Each parameter's weight groups and the names of the elements of per-element
    groups, so ``sparsekern report`` needs no base model."""
    groups: Dict[str, List[dict]] = {}
    elements: Dict[str, List[str]] = {}
    for layer_name, _, param, delta in deltas:
        groups[f"{layer_name}.{param}"] = [group_to_dict(g) for g in delta.groups]
        for g in delta.groups:
            if g.per_element:
                elements[str(g.shape[0])] = element_labels(model, g.shape[0])
    return {"groups": json.dumps(groups), "element_labels": json.dumps(elements)}


def _sparse_entries(model: torch.nn.Module, deltas: Sequence) -> Tuple[Tensors, Dict[str, str]]:
    """The nonzero entries of each delta (version 1 files lack the description and
    still load)."""
    tensors: Tensors = {}
    for layer_name, _, param, delta in deltas:
        d = delta().view(-1)
        index = torch.nonzero(d, as_tuple=True)[0]
        tensors[f"{layer_name}.{param}.index"] = index.to(torch.int32).cpu().contiguous()
        tensors[f"{layer_name}.{param}.values"] = d[index].detach().cpu().contiguous()
    return tensors, _describe(model, deltas)


def _lora_entries(model: torch.nn.Module, deltas: Sequence) -> Tuple[Tensors, Dict[str, str]]:
    """The factors of each path block, in the order of the delta's groups (version 1
    files lack the description and still load)."""
    tensors: Tensors = {}
    for layer_name, _, param, delta in deltas:
        for i, (a, b) in enumerate(zip(delta.a, delta.b)):
            tensors[f"{layer_name}.{param}.{i}.a"] = a.detach().cpu().contiguous()
            tensors[f"{layer_name}.{param}.{i}.b"] = b.detach().cpu().contiguous()
    return tensors, _describe(model, deltas)


def _not_finite(tensors: Tensors) -> List[str]:
    """The names of ``tensors`` holding NaN or infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_entries(path, tensors: Tensors, stem: str = "", index: Optional[torch.Tensor] = None) -> None:
    """Stored entries as sparsekern writes them, or a one-line error naming the tensor:
    finite values, and ``stem``'s ``index`` strictly increasing (each weight once; a
    repeat would be counted twice or overwritten, silently)."""
    if index is not None and index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError(f"adapter {path}: the indices of {stem!r} are not strictly increasing (damaged file)")
    bad = _not_finite(tensors)
    if bad:
        raise ValueError(f"adapter {path}: {bad[0]!r} holds NaN or infinity (damaged file)")


def _attach_sparse(model: torch.nn.Module, path, tensors: Tensors, metadata: dict, trainable: bool) -> None:
    """A FixedDelta per stored parameter (one copy per element where the adapter's
    config says element_resolved)."""
    resolved = bool(getattr(stored_config(metadata), "element_resolved", False))
    targets = {f"{t.name}.{t.param}": t for t in delta_targets(model, SparseConfig(element_resolved=resolved))}
    layers = dict(patched_layers(model))
    pairs = []
    for stem in sorted({key.rsplit(".", 1)[0] for key in tensors}):
        _split(stem, layers)  # (a clear error for an entry naming no layer)
        t, index, values = targets.get(stem), tensors.get(f"{stem}.index"), tensors.get(f"{stem}.values")
        if t is None or index is None or values is None or index.shape != values.shape \
                or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < t.numel):
            raise ValueError(f"adapter {path}: entry {stem!r} does not fit this model")
        check_entries(path, {f"{stem}.values": values}, stem, index)
        base = t.layer.get_parameter(t.param)
        pairs.append((t, FixedDelta(t.groups, t.numel, index.to(base.device),
                                    values.to(device=base.device, dtype=base.dtype), trainable, t.elements)))
    attach_targets(model, pairs)


def _attach_lora(model: torch.nn.Module, path, tensors: Tensors, metadata: dict, trainable: bool) -> None:
    """``prepare`` with the adapter's config, then the stored factors copied in."""
    prepare(model, stored_config(metadata))
    expected = set(tensors)
    with torch.no_grad():
        for layer_name, _, param, delta in delta_slot.iter_deltas(model):
            for i, (a, b) in enumerate(zip(delta.a, delta.b)):
                for name, p in (("a", a), ("b", b)):
                    key = f"{layer_name}.{param}.{i}.{name}"
                    if key not in tensors or tensors[key].shape != p.shape:
                        raise ValueError(f"LoRA adapter {path}: entry {key!r} missing or does not fit this model")
                    check_entries(path, {key: tensors[key]})
                    p.copy_(tensors[key])
                    p.requires_grad_(trainable)
                    expected.discard(key)
    if expected:
        raise ValueError(f"LoRA adapter {path}: entries for layers this model lacks: {sorted(expected)[:3]}")


@dataclass(frozen=True)
class _Format:
    version: str
    entries: Callable[[torch.nn.Module, Sequence], Tuple[Tensors, Dict[str, str]]]
    attach: Callable[[torch.nn.Module, object, Tensors, dict, bool], None]


FORMATS = {SPARSE_ADAPTER: _Format("2", _sparse_entries, _attach_sparse),
           LORA_ADAPTER: _Format("2", _lora_entries, _attach_lora)}
# Adapters with element-resolved deltas are version 3: an older sparsekern would put their
# per-element entries into the shared weight. The others stay version 2, which it reads.
ELEMENT_RESOLVED_VERSION = "3"


def save_adapter(model: torch.nn.Module, path, extra_metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the deltas (in their mode's format) and the base's fingerprint, atomically;
    ``extra_metadata`` joins the file's metadata."""
    from safetensors.torch import save_file

    from .adapter_set import active_metadata, no_deltas  # (adapter_set builds on this module)

    check_adaptable(model, "save_adapter")
    bad = {k: type(v).__name__ for k, v in (extra_metadata or {}).items()
           if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise TypeError(f"save_adapter: extra_metadata maps strings to strings (safetensors' metadata), got {bad}")
    settle(model)  # (after a user's optimizer step the thresholds are off the density's target)
    deltas = list(delta_slot.iter_deltas(model))
    if not deltas:
        raise ValueError(no_deltas(model, "save_adapter"))
    if any(d.merged for *_, d in deltas):
        raise ValueError("save_adapter: unmerge the model first (merged deltas are folded into W0)")
    formats = {adapter_format(d) for *_, d in deltas}
    if len(formats) > 1:
        raise ValueError(f"save_adapter: the model's deltas belong to different adapter formats {sorted(formats)}")
    fmt = formats.pop()
    with torch.no_grad():
        tensors, own = FORMATS[fmt].entries(model, deltas)
    bad = _not_finite(tensors)
    if bad:  # (a diverged run's): an adapter of NaN would load and compute NaN
        raise ValueError(f"save_adapter: the deltas hold NaN or infinity ({', '.join(bad[:3])}); no adapter written")
    config = delta_slot.config_of(model)
    version = ELEMENT_RESOLVED_VERSION if any(d.elements for *_, d in deltas) else FORMATS[fmt].version
    metadata = {"format": fmt, "version": version, "sparsekern": __version__,
                "fingerprint": fingerprint(model), "fingerprint_dtype": FINGERPRINT_DTYPE,
                "fingerprint_scope": FINGERPRINT_SCOPE, "fingerprint_sketch": json.dumps(sketch(model)),
                "config": json.dumps(config.to_dict() if config is not None else None), **own}
    if wrapper_name(model):
        metadata.update(wrapper=wrapper_name(model), wrapper_fingerprint=wrapper_fingerprint(model))
    clash = set(metadata) & set(extra_metadata or {})
    if clash:
        raise ValueError(f"save_adapter: extra_metadata may not set the adapter's own keys {sorted(clash)}")
    metadata.update({**active_metadata(model), **(extra_metadata or {})})
    return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_adapter(path, formats: Sequence[str] = tuple(FORMATS)):
    """(tensors, metadata) of an adapter file in one of ``formats`` that this sparsekern
    reads; a one-line error for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"adapter {path} is a folder, not an adapter file")
    if not path.is_file():
        raise FileNotFoundError(f"adapter not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        if path.suffix in MODEL_SUFFIXES:  # (a merged model: its adapter lies beside it)
            raise ValueError(f"{path} is a model, not a sparsekern adapter: give the adapter file "
                             "(adapter.safetensors) instead") from None
        raise ValueError(f"{path} is not a readable sparsekern adapter (corrupt, truncated or another format): "
                         f"{exc}") from None
    fmt = metadata.get("format")
    if fmt not in formats:
        raise ValueError(f"{path} is not a sparsekern adapter of format {' or '.join(formats)} "
                         f"(its format: {fmt!r})")
    version, known = metadata.get("version", ""), int(ELEMENT_RESOLVED_VERSION)
    if not version.isdigit():
        raise ValueError(f"adapter {path}: its format version {version!r} is not a number (damaged file)")
    if int(version) > known:
        raise ValueError(f"adapter {path} was written by a newer sparsekern ({metadata.get('sparsekern', '?')}): "
                         f"{fmt} format {version} > {known}, the newest this one reads; upgrade sparsekern")
    _check_metadata(path, fmt, metadata)
    return tensors, metadata


def stored_config(metadata: dict) -> Optional[SparseConfig]:
    """The SparseConfig an adapter's metadata hold (None: none), or ValueError/TypeError."""
    config = json.loads(metadata.get("config") or "null")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"config {config!r} is not a mapping")
    return SparseConfig(**{k: tuple(v) if k == "tile" and isinstance(v, list) else v for k, v in config.items()})


def _check_metadata(path, fmt: str, metadata: dict) -> None:
    """What loading and reporting read from the metadata, or a one-line error: a config
    SparseConfig takes (LoRA's needs one), a fingerprint dtype torch has and a scope."""
    try:
        if stored_config(metadata) is None and fmt == LORA_ADAPTER:
            raise ValueError("a LoRA adapter without its config")
        dtype = metadata.get("fingerprint_dtype", "float64")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"fingerprint_dtype {dtype!r}")
        if metadata.get("fingerprint_scope", "paths") not in ("paths", "model"):
            raise ValueError(f"fingerprint_scope {metadata['fingerprint_scope']!r}")
        if "fingerprint_sketch" in metadata:
            drawn = json.loads(metadata["fingerprint_sketch"])
            if not (isinstance(drawn, dict) and all(
                    isinstance(v, list) and len(v) == 1 + SKETCH_PROJECTIONS
                    and all(isinstance(x, (int, float)) for x in v) for v in drawn.values())):
                raise ValueError("fingerprint_sketch is not a sketch of the base's weights")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"adapter {path}: its metadata are damaged ({exc})") from None


def attach_adapter(model: torch.nn.Module, path, tensors: Tensors, metadata: dict, trainable: bool) -> None:
    """Attach a read adapter's deltas to ``model``'s delta slots (already patched and
    free of deltas; its base checked)."""
    FORMATS[metadata["format"]].attach(model, path, tensors, metadata, trainable)


def _split(stem: str, layers) -> tuple:
    """'interactions.0.skip_tp.weight' -> ('interactions.0.skip_tp', 'weight'), the
    longest layer name that prefixes it."""
    for name in sorted(layers, key=len, reverse=True):
        if stem.startswith(name + "."):
            return name, stem[len(name) + 1:]
    raise ValueError(f"adapter entry {stem!r} names no sparsekern layer of this model")


def __getattr__(name: str):
    """``load_adapter`` lives with the named adapters now; its old import path stays valid."""
    if name == "load_adapter":
        from .adapter_set import load_adapter

        return load_adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
