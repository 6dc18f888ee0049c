"""``patch(model)`` swaps the e3nn / MACE layers of a model for sparsekern layers in
place; ``unpatch(model)`` puts plain modules back. The new layers share the old
ones' Parameter objects, so parameter names, shapes, values and ``requires_grad``
are unchanged and an optimizer built before patching keeps working."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from . import backends
from .layers import (ChannelwiseConv, ChannelwiseTP, ElementLinear, IrrepsLinear, RadialMLP,
                     SparsekernLayer, SymmetricContraction)


@dataclass
class PatchReport:
    replaced: List[Tuple[str, str, str, str]] = field(default_factory=list)  # name, old, new, backend
    left: List[Tuple[str, str, str]] = field(default_factory=list)  # name, class, reason

    def __str__(self) -> str:
        lines = [f"sparsekern: replaced {len(self.replaced)} layers, left {len(self.left)}"]
        lines += [f"  replaced {n}: {o} -> {c} [{b}]" for n, o, c, b in self.replaced]
        lines += [f"  left     {n}: {c} ({r})" for n, c, r in self.left]
        return "\n".join(lines)


def _converters() -> List[Tuple[type, type]]:
    """(exact class replaced, the sparsekern class that replaces it)."""
    from e3nn import nn as e3nn_nn
    from e3nn import o3

    table = [
        (o3.Linear, IrrepsLinear),
        (o3.FullyConnectedTensorProduct, ElementLinear),
        (o3.TensorProduct, ChannelwiseTP),
        (e3nn_nn.FullyConnectedNet, RadialMLP),
    ]
    try:
        from mace.modules.symmetric_contraction import SymmetricContraction as MaceSC
    except ImportError:
        pass
    else:
        table.append((MaceSC, SymmetricContraction))
    return table


def _uses_conv_fusion(parent: torch.nn.Module, name: str) -> bool:
    """MACE interaction blocks call ``conv_tp(node_feats, edge_attrs, tp_weights,
    edge_index)`` when they have a ``conv_fusion`` attribute: give them the fused conv."""
    return (name == "conv_tp" and type(parent).__module__.startswith("mace.")
            and hasattr(parent, "conv_tp_weights") and not hasattr(parent, "conv_fusion"))


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def patch(model: torch.nn.Module, backend: str = "auto", verbose: bool = False) -> torch.nn.Module:
    """Replace known layers in place and return the same model object. A MACE model
    converted to cuequivariance is first turned back into e3nn layers (in place)."""
    from . import cueq

    if cueq.is_cueq_model(model):
        cueq.to_e3nn_in_place(model)
    device = _model_device(model)
    if backend != "auto" and not backends.available(backend, device):
        backends.resolve(backend, ChannelwiseTP, device)  # raises the clear error
    table = _converters()
    report = PatchReport()

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            if isinstance(child, SparsekernLayer):
                child.set_backend(backends.resolve(backend, child, device))
                continue
            entry = next((e for e in table if type(child) is e[0]), None)
            if entry is not None:
                old_cls, new_cls = entry
                reason = new_cls.unsupported_reason(child)
                if reason is None:
                    fused = new_cls is ChannelwiseTP and _uses_conv_fusion(parent, name)
                    new = ChannelwiseConv.from_e3nn(child) if fused else new_cls.from_e3nn(child)
                    new.set_backend(backends.resolve(backend, new, device))
                    if fused:
                        new.added_conv_fusion = True
                        parent.conv_fusion = "sparsekern"
                    setattr(parent, name, new)
                    report.replaced.append((full, old_cls.__name__, type(new).__name__, new.backend))
                    continue
                report.left.append((full, type(child).__name__, reason))
            elif any(True for _ in child.parameters(recurse=False)):
                report.left.append((full, type(child).__name__, "no sparsekern equivalent"))
            visit(child, full + ".")

    visit(model, "")
    global last_report
    last_report = report
    if verbose:
        print(report)
    return model


last_report: Optional[PatchReport] = None


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Turn sparsekern layers back into the plain modules they replaced (carrying the
    current parameters) and return the same model object."""
    if isinstance(model, SparsekernLayer):
        raise ValueError("unpatch takes the model that contains sparsekern layers, not a layer")
    for name, layer in patched_layers(model):
        deltas = layer._modules.get("deltas")
        if deltas is not None and not all(d.merged for d in deltas.values()):
            raise ValueError(f"unpatch: {name} holds sparse deltas that are not merged; call "
                             "sparsekern.merge(model) first (or save_adapter), or they would be lost")

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, SparsekernLayer):
                setattr(parent, name, child.to_replaced())
                if getattr(child, "added_conv_fusion", False) and hasattr(parent, "conv_fusion"):
                    del parent.conv_fusion
            else:
                visit(child)

    visit(model)
    return model


def patched_layers(model: torch.nn.Module) -> List[Tuple[str, SparsekernLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparsekernLayer)]
