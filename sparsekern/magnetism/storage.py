"""The magnetic modules in their own safetensors file, beside a merged model or an
adapter (which hold the base's weights or deltas in their own formats)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

from ..files import atomic_write
from .energy import MAGNETIC_DTYPE, MagneticEnergy
from .moments import MomentHead

FORMAT = "sparsekern-magnetic"


def sidecar(path: Path) -> Path:
    """Where the magnetic modules of the model or adapter at ``path`` live."""
    return path.with_name(path.stem + ".magnetic.safetensors")


def save_magnetic(model, path: Path) -> Path:
    from safetensors.torch import save_file

    tensors = {f"energy.{k}": v.detach().cpu().contiguous() for k, v in model.energy.state_dict().items()}
    if model.head is not None:
        tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()})
    metadata = {"format": FORMAT, "config": json.dumps(model.energy.config()), "head": str(model.head is not None)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_magnetic(path: Path, device: str) -> Tuple[MagneticEnergy, Optional[MomentHead]]:
    """The magnetic energy module and moment head (or None) stored at ``path``."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no magnetic modules at {path} (a model fine-tuned with --magmom_key writes them)")
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sparsekern magnetic-module file")
    energy = MagneticEnergy(**{"dm": "polar", **json.loads(metadata["config"])})  # (files before "dm": polar)
    head = MomentHead(energy.width) if metadata["head"] == "True" else None
    for prefix, module in (("energy.", energy), ("head.", head)):
        if module is not None:  # (a file of float32 weights, from before, is raised exactly)
            module.to(device=device, dtype=MAGNETIC_DTYPE)
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return energy, head
