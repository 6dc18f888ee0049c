"""MACE models: real files and foundation-model names, MACE batches, and models with the
MACE-MP-0 architecture (random weights) for tests and benchmarks, since MP-0's weights
cannot be downloaded everywhere."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch


@contextmanager
def default_dtype(dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` within (MACE builds models and graphs in
    it; None: left as it is) and put back after, whatever the body set."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype or previous)
        yield
    finally:
        torch.set_default_dtype(previous)


# MACE-MP-0 architectures (mace_mp's small / medium / large).
MP0_HIDDEN_IRREPS = {
    "small": "128x0e",
    "medium": "128x0e+128x1o",
    "large": "128x0e+128x1o+128x2e",
}


def mace_mp0_shaped(size: str = "medium", seed: int = 0, dtype: torch.dtype = torch.float64,
                    use_reduced_cg: bool = True, num_elements: int = 89, **overrides) -> torch.nn.Module:
    """A ScaleShiftMACE with MACE-MP-0's configuration and random weights.
    ``use_reduced_cg`` takes effect only where cuequivariance imports (as in MACE)."""
    from e3nn import o3
    from mace.modules import RealAgnosticResidualInteractionBlock, ScaleShiftMACE

    if size not in MP0_HIDDEN_IRREPS:
        raise ValueError(f"unknown MACE-MP-0 size {size!r}; expected one of {sorted(MP0_HIDDEN_IRREPS)}")
    with default_dtype(dtype):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        config = dict(
            r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3,
            interaction_cls=RealAgnosticResidualInteractionBlock,
            interaction_cls_first=RealAgnosticResidualInteractionBlock,
            num_interactions=2, num_elements=num_elements,
            hidden_irreps=o3.Irreps(MP0_HIDDEN_IRREPS[size]), MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=rng.normal(-3.0, 1.0, num_elements), avg_num_neighbors=61.96,
            atomic_numbers=list(range(1, num_elements + 1)), correlation=3,
            gate=torch.nn.functional.silu, radial_MLP=[64, 64, 64],
            atomic_inter_scale=0.8, atomic_inter_shift=0.1, use_reduced_cg=use_reduced_cg,
        )
        config.update(overrides)
        return ScaleShiftMACE(**config)


def load_mace(model: str, device: str = "cpu") -> torch.nn.Module:
    """A MACE model from a ``.model`` file, or a foundation-model name (``small``,
    ``medium``, ``large``, ... as mace_mp takes them; needs internet the first time)."""
    import mace  # noqa: F401  (registers MACE's classes for unpickling)

    path = Path(model)
    if path.suffix == ".model" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"MACE model file not found: {path}")
        try:
            return torch.load(path, map_location=device, weights_only=False)
        except Exception as exc:  # corrupt or not a pickled model
            raise ValueError(f"could not load a MACE model from {path}: {exc}") from exc
    from mace.calculators import mace_mp

    try:
        return mace_mp(model=model, device=device, return_raw_model=True)
    except Exception as exc:  # offline, or a name mace_mp does not know
        raise ValueError(f"MACE foundation model {model!r}: {' '.join(str(exc).split())} (mace_mp downloads it "
                         f"the first time: without internet, give a .model file)") from exc


def mace_batch(model: torch.nn.Module, atoms_list, energy_key: str = "REF_energy",
               forces_key: str = "REF_forces") -> dict:
    """A MACE input batch for ``atoms_list``, built the way MACE's own tools build it."""
    from mace import data as mace_data
    from mace.tools import torch_geometric, utils

    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    keys = mace_data.KeySpecification(info_keys={"energy": energy_key}, arrays_keys={"forces": forces_key})
    configs = [mace_data.config_from_atoms(a, key_specification=keys) for a in atoms_list]
    dtype = next(model.parameters()).dtype
    with default_dtype(dtype):  # (MACE's graphs are in the default dtype: positions rounded otherwise)
        data = [mace_data.AtomicData.from_config(c, z_table=z_table, cutoff=float(model.r_max), heads=None)
                for c in configs]
    loader = torch_geometric.dataloader.DataLoader(data, batch_size=len(data), shuffle=False)
    batch = next(iter(loader)).to_dict()
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
