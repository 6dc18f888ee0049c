"""MACE's fine-tuning harness (:class:`~sparsekern.integrations.base.Family`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...files import atomic_write
from ..base import Family


class MaceFamily(Family):
    name = "mace"
    package = "mace"
    merged_filename = "merged.model"

    spec_help = "a MACE .model file"

    def claims(self, spec):
        """``.model`` files, MACE foundation names, and other existing files but SevenNet's."""
        return (spec.endswith(".model") or spec in ("small", "medium", "large") or spec.startswith("mace")
                or (Path(spec).is_file() and not spec.endswith(".pth")) or spec in _foundation_names())

    def fidelities(self, source):
        """A multi-head model's heads (its per-head readouts, scales, shifts and E0s)."""
        heads = list(getattr(self.load(source, "cpu") if isinstance(source, str) else source, "heads", None) or [])
        return sorted(heads) if len(heads) > 1 else []

    def recognises(self, names):
        """A pickled MACE model names MACE's classes."""
        return any(n.startswith("mace.") for n in names)

    def load(self, spec, device):
        from .models import load_mace

        return load_mace(spec, device).eval()

    def owns(self, model):
        return type(model).__module__.startswith("mace.")

    def numbers(self, model):
        return [int(z) for z in model.atomic_numbers]

    def element_index(self, model):
        return {z: i for i, z in enumerate(self.numbers(model))}

    def species(self, model, inputs):
        return inputs["node_attrs"].argmax(-1)  # one-hot over the model's atomic numbers

    def graph(self, model, atoms):
        """With a head, the graph names it (its index in the model's heads)."""
        from mace import data as mace_data
        from mace.tools import utils

        from .models import default_dtype

        z_table = utils.AtomicNumberTable(self.numbers(model))
        config = mace_data.config_from_atoms(atoms, key_specification=mace_data.KeySpecification())
        heads = None
        if self.modal is not None:
            config.head, heads = self.modal, list(model.heads)
        with default_dtype(next(model.parameters()).dtype):  # (else positions rounded to the default's)
            return mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=float(model.r_max), heads=heads)

    def collate(self, graphs, device):
        from mace.tools import torch_geometric

        return torch_geometric.Batch.from_data_list(list(graphs)).to(device)

    def predict(self, model, batch, training):
        out = self.outputs(model, batch, training)
        return out["energy"], out["forces"]

    def outputs(self, model, batch, training, stress=False):
        return self.run(model, _inputs(next(model.parameters()).dtype, batch), training, stress)

    def padder(self, model):
        from .graphed import pad

        # read once (r_max: a sync on a GPU); the function holds no reference to the model
        r_max, dtype = float(model.r_max), next(model.parameters()).dtype

        def padding(batch):
            inputs = _inputs(dtype, batch)
            sizes = inputs["positions"].shape[0], inputs["ptr"].shape[0] - 1, inputs["edge_index"].shape[1]
            return sizes, lambda atoms, edges: pad(inputs, edges, r_max, atoms)

        return padding

    def run(self, model, inputs, training, stress=False):
        out = model(inputs, training=training, compute_force=True, compute_stress=stress)
        return {"energy": out["energy"], "forces": out["forces"], **({"stress": out["stress"]} if stress else {})}

    def own_e0s(self, model, zs):
        e0, index = self.e0_table(model)
        e0 = e0 if e0.dim() == 1 else e0[0]  # (a model of one head may keep them as (1, n))
        return {int(z): float(e0[index[int(z)]]) for z in zs}

    def e0_table(self, model):
        e0 = model.atomic_energies_fn.atomic_energies
        heads = self.fidelities(model)
        if not heads:
            return e0, self.element_index(model)
        if self.modal is None:
            raise ValueError(f"MACE: the model's per-element energies are per head ({', '.join(heads)}); name one")
        return e0[list(model.heads).index(self.modal)], self.element_index(model)

    def export(self, merged, shift, path, spec):
        self.fold_shift(merged, shift)
        return atomic_write(path, lambda tmp: torch.save(merged, tmp))

    def calculator(self, path, device):
        return self.model_calculator(self.load(str(path), device), device)

    def model_calculator(self, model, device):
        from mace.calculators import MACECalculator

        # the model's own dtype named: MACECalculator warns when it has to pick it
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        head = {"head": self.modal} if self.modal is not None else {}
        return MACECalculator(models=model, device=device, default_dtype=dtype, **head)


def _inputs(dtype: torch.dtype, batch) -> dict:
    """The model's inputs from a collated batch, floats in the model's ``dtype``."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.to_dict().items()}


def _foundation_names():
    """The names ``mace_mp`` downloads (none where mace-torch is not installed)."""
    try:
        from mace.calculators.foundations_models import mace_mp_urls
    except ImportError:
        return ()
    return mace_mp_urls
