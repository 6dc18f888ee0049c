"""SevenNet's fine-tuning harness (:class:`~sparsekern.integrations.base.Family`)."""

from __future__ import annotations

import torch

from ...files import atomic_write
from ..base import Family
from .models import calculator, modalities


def _named(spec: str) -> bool:
    return spec.lower().startswith(("7net", "sevennet"))


class SevenNetFamily(Family):
    name = "sevennet"
    package = "sevenn"
    merged_filename = "merged_sevennet.pth"

    def claims(self, spec):
        """``7net-*`` names (``SevenNet-*``, any case, as sevenn takes them) and SevenNet
        checkpoints (``.pth``)."""
        return _named(spec) or spec.endswith(".pth")

    spec_help = "7net-0 (or another SevenNet name / .pth checkpoint)"
    dtypes = ("float32",)  # its graphs are float32

    def spec_identity(self, spec):
        return spec if _named(spec) else super().spec_identity(spec)

    def fidelities(self, source):
        """A multi-fidelity model's modalities (``7net-mf-0``: PBE, R2SCAN)."""
        return modalities(source) if isinstance(source, str) else sorted(source.modal_map or {})

    def recognises(self, names):
        """A SevenNet checkpoint is a dict of its config and the model's state."""
        return {"config", "model_state_dict"} <= names or any(n.startswith("sevenn.") for n in names)

    def load(self, spec, device):
        from .models import load_sevennet

        model = load_sevennet(spec, device)
        model.set_is_batch_data(True)
        return model.eval()

    def owns(self, model):
        return type(model).__module__.startswith("sevenn.")

    def numbers(self, model):
        return sorted(int(z) for z in model.type_map)

    def element_index(self, model):
        return {int(z): int(i) for z, i in model.type_map.items()}  # alphabetical by symbol, not by Z

    def species(self, model, inputs):
        if not model.eval_type_map:  # deployed models take type indices already
            return inputs[model.key_node_feature]
        table = model.z_to_onehot_tensor.to(inputs[model.key_atomic_numbers].device)  # what its forward maps with
        return table[inputs[model.key_atomic_numbers]]

    def graph(self, model, atoms):
        """With a modality, the graph names it (``KEY.DATA_MODALITY``: the model maps it, one
        per graph in a batch)."""
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        graph = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, float(model.cutoff)))
        if self.modal is not None:
            import sevenn._keys as KEY

            graph[KEY.DATA_MODALITY] = self.modal
        return graph

    def collate(self, graphs, device):
        from torch_geometric.data import Batch

        # a new Batch per step: SevenNet's forward writes into its input
        return Batch.from_data_list(list(graphs)).to(device)

    def predict(self, model, batch, training):
        out = self.outputs(model, batch, training)
        return out["energy"], out["forces"]

    def outputs(self, model, batch, training, stress=False):
        return self.run(model, batch, training, stress)

    def padder(self, model):
        from .graphed import padder

        return padder(model)

    def run(self, model, inputs, training, stress=False):
        import sevenn._keys as KEY

        from .graphed import modality_given

        with modality_given(model, inputs):  # (padded inputs carry each graph's modality index)
            out = model(inputs)
        res = {"energy": out[KEY.PRED_TOTAL_ENERGY], "forces": out[KEY.PRED_FORCE]}
        if stress:  # SevenNet's: xx yy zz xy yz zx, the opposite sign of ASE's (its calculator negates it)
            s = -out[KEY.PRED_STRESS]
            res["stress"] = torch.stack([s[:, [0, 3, 5]], s[:, [3, 1, 4]], s[:, [5, 4, 2]]], dim=1)
        return res

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

    def e0_table(self, model):
        rescale = model._modules.get("rescale_atomic_energy")
        if rescale is None or not hasattr(rescale, "shift") or rescale.shift.dim() not in (1, 2):
            raise ValueError("SevenNet: the model has no species-wise energy shift to fold the E0s into")
        if rescale.shift.dim() == 1:
            return rescale.shift, self.element_index(model)
        if self.modal is None:  # (a multi-fidelity model's E0s are per modality)
            raise ValueError(f"SevenNet: the model's per-element energies are per modality "
                             f"({', '.join(self.fidelities(model))}); name one")
        return rescale.shift[model.modal_map[self.modal]], self.element_index(model)

    def export(self, merged, shift, path, spec):
        import sevenn
        from sevenn import util

        self.fold_shift(merged, shift)
        stored = util.load_checkpoint(spec)
        checkpoint, state = stored.get_checkpoint_dict(), merged.state_dict()
        # (against the model sevenn builds from it: an older checkpoint's names, such as
        # 7net-0_22May2024's, are renamed as it loads)
        if set(state) != set(stored.build_model().state_dict()):
            raise ValueError("SevenNet export: the fine-tuned model's parameters do not match the base checkpoint's")
        checkpoint.update(model_state_dict=state, optimizer_state_dict={}, scheduler_state_dict={})
        # the state is in this sevenn's layout: an older version tag would make the loader
        # convert it once more (SevenNet-0's checkpoint predates the current layout)
        checkpoint["config"]["version"] = sevenn.__version__
        return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def calculator(self, path, device):
        return calculator(str(path), device=device, modal=self.modal)

    def model_calculator(self, model, device):
        return calculator(model, file_type="model_instance", device=device, modal=self.modal)
