"""What differs between model families during fine-tuning, behind one small interface:
loading, graphs and batches, energies and forces, the model's own isolated-atom
energies, and writing a merged model that the family's own ASE calculator loads.
Each family imports its package only when used (MACE and SevenNet live in
different environments)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from ..files import atomic_write


class Family:
    """One model family. ``graph`` turns an ase.Atoms into the model's input once (graphs
    are built before training); ``predict`` gives (energy per frame, forces)."""

    name: str
    merged_filename: str

    def load(self, spec: str, device: str) -> torch.nn.Module:
        raise NotImplementedError

    def numbers(self, model) -> List[int]:
        """Atomic numbers the model knows."""
        raise NotImplementedError

    def graph(self, model, atoms):
        raise NotImplementedError

    def collate(self, graphs: Sequence, device: str):
        raise NotImplementedError

    def predict(self, model, batch, training: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def own_e0s(self, model, zs: Sequence[int]) -> Dict[int, float]:
        """The model's isolated-atom energy per element (what ``--E0s`` replaces)."""
        raise NotImplementedError

    def export(self, merged, shift: Dict[int, float], path: Path, spec: str) -> Path:
        """Write ``merged`` (a plain, unpatched model holding the fine-tuned weights) with
        the per-element energy shift folded in, in the family's own format."""
        raise NotImplementedError

    def calculator(self, path: Path, device: str):
        raise NotImplementedError


class MaceFamily(Family):
    name = "mace"
    merged_filename = "merged.model"

    def load(self, spec, device):
        from ..model_zoo import load_mace

        return load_mace(spec, device).eval()

    def numbers(self, model):
        return [int(z) for z in model.atomic_numbers]

    def graph(self, model, atoms):
        from mace import data as mace_data
        from mace.tools import utils

        z_table = utils.AtomicNumberTable(self.numbers(model))
        config = mace_data.config_from_atoms(atoms, key_specification=mace_data.KeySpecification())
        return mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=float(model.r_max), heads=None)

    def collate(self, graphs, device):
        from mace.tools import torch_geometric

        return torch_geometric.Batch.from_data_list(list(graphs)).to(device)

    def predict(self, model, batch, training):
        dtype = next(model.parameters()).dtype
        inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in batch.to_dict().items()}
        out = model(inputs, training=training, compute_force=True)
        return out["energy"], out["forces"]

    def own_e0s(self, model, zs):
        table = self.numbers(model)
        e0 = model.atomic_energies_fn.atomic_energies
        e0 = e0 if e0.dim() == 1 else e0[0]  # multi-head models: the first head
        return {int(z): float(e0[table.index(int(z))]) for z in zs}

    def export(self, merged, shift, path, spec):
        table = self.numbers(merged)
        with torch.no_grad():
            e0 = merged.atomic_energies_fn.atomic_energies
            for z, s in shift.items():
                e0[..., table.index(int(z))] += s
        return atomic_write(path, lambda tmp: torch.save(merged, tmp))

    def calculator(self, path, device):
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=str(path), device=device)


class SevenNetFamily(Family):
    name = "sevennet"
    merged_filename = "merged_sevennet.pth"

    def load(self, spec, device):
        from ..model_zoo import load_sevennet

        model = load_sevennet(spec, device)
        model.set_is_batch_data(True)
        return model.eval()

    def numbers(self, model):
        return sorted(int(z) for z in model.type_map)

    def graph(self, model, atoms):
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        return AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, float(model.cutoff)))

    def collate(self, graphs, device):
        from torch_geometric.data import Batch

        # a new Batch per step: SevenNet's forward writes into its input
        return Batch.from_data_list(list(graphs)).to(device)

    def predict(self, model, batch, training):
        import sevenn._keys as KEY

        out = model(batch)
        return out[KEY.PRED_TOTAL_ENERGY], out[KEY.PRED_FORCE]

    def own_e0s(self, model, zs):
        from ase import Atoms

        was_training = model.training
        model.eval()
        out = {}
        for z in zs:  # an isolated atom: no edges, only the per-species energy
            atom = Atoms(numbers=[int(z)], positions=[[0.0, 0.0, 0.0]], cell=[20.0] * 3, pbc=False)
            energy, _ = self.predict(model, self.collate([self.graph(model, atom)], "cpu"), False)
            out[int(z)] = float(energy.detach()[0])
        model.train(was_training)
        return out

    def export(self, merged, shift, path, spec):
        import sevenn
        from sevenn import util

        rescale = merged._modules.get("rescale_atomic_energy")
        if rescale is None or not hasattr(rescale, "shift") or rescale.shift.dim() != 1:
            raise ValueError("SevenNet export: the model has no species-wise energy shift to fold the E0s into")
        with torch.no_grad():
            for z, s in shift.items():
                rescale.shift[merged.type_map[int(z)]] += s
        checkpoint = util.load_checkpoint(spec).get_checkpoint_dict()
        state = merged.state_dict()
        if set(state) != set(checkpoint["model_state_dict"]):
            raise ValueError("SevenNet export: the fine-tuned model's parameters do not match the base checkpoint's")
        checkpoint.update(model_state_dict=state, optimizer_state_dict={}, scheduler_state_dict={})
        # the state is in this sevenn's layout: an older version tag would make the loader
        # convert it once more (SevenNet-0's checkpoint predates the current layout)
        checkpoint["config"]["version"] = sevenn.__version__
        return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def calculator(self, path, device):
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator(str(path), device=device)


def family_for(spec: str) -> Family:
    """``7net-*`` names and SevenNet checkpoints (``.pth``) are SevenNet; ``.model``
    files and MACE foundation names are MACE."""
    if spec.startswith("7net") or spec.endswith(".pth"):
        return SevenNetFamily()
    if spec.endswith(".model") or spec in ("small", "medium", "large") or spec.startswith("mace"):
        return MaceFamily()
    raise ValueError(f"--model: cannot tell the model family of {spec!r}; give 7net-0 (or another SevenNet "
                     f"name / .pth checkpoint) or a MACE .model file")
