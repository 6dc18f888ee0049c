"""Magnetism around any model family: ``MagneticModel`` holds the foundation model and
the magnetic modules beside it; ``MagneticFamily`` wraps the base model's ``Family``
so the fine-tuning harness trains it unchanged: graphs are (the family's graph, the
magnetic graph), energies and forces are the base's plus E_mag's, and ``outputs``
adds the magnetic forces -dE/dm and the predicted moments."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from torch import nn

from ..integrations import Family, family_of, register_family
from .energy import MAGNETIC_DTYPE, MagneticEnergy
from .graph import PADDED, collate, magnetic_graph, pad, unpad
from .moments import MomentHead
from .storage import load_magnetic, save_magnetic, sidecar


class MagneticModel(nn.Module):
    def __init__(self, base: nn.Module, energy: MagneticEnergy, head: Optional[MomentHead] = None):
        super().__init__()
        self.base, self.energy, self.head = base, energy, head

    def _apply(self, fn, recurse=True):
        """Moves and casts reach the base; the magnetic modules are moved only: they stay
        ``MAGNETIC_DTYPE`` (``--default_dtype float32`` cast them with the base)."""
        self.base._apply(fn, recurse)
        for module in (self.energy, self.head):
            if module is not None:
                module._apply(lambda t: t.to(fn(t.new_empty(0)).device), recurse)
        return self


def magnetic_parameters(model: nn.Module):
    """The magnetic modules' parameters (none for a model without them)."""
    if not isinstance(model, MagneticModel):
        return []
    return [p for m in (model.energy, model.head) if m is not None for p in m.parameters()]


def train_magnetic(model: nn.Module) -> nn.Module:
    """Make the moment head trainable (after a method froze the base); the magnetic
    energy stays frozen: the trainer fits it in closed form (``magnetism/fit.py``)."""
    if isinstance(model, MagneticModel):
        model.energy.requires_grad_(False)
        if model.head is not None:
            model.head.requires_grad_(True)
    return model


def parameter_groups(model: nn.Module, magnetic_lr: float) -> list:
    """The trainable parameters for the optimizer: the moment head's in their own group
    at ``magnetic_lr`` (the method's rate, up to 0.1 for sparse deltas, would throw its
    freshly initialised layers far off), the rest at the optimizer's rate."""
    magnetic = {id(p) for p in magnetic_parameters(model)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in magnetic]
    own = [p for p in magnetic_parameters(model) if p.requires_grad]
    return [{"params": rest}] + ([{"params": own, "lr": magnetic_lr}] if own else [])


def magnetic_counts(model: nn.Module) -> Dict[str, int]:
    """The magnetic modules' parameters, counted apart from the base's path weights."""
    params = magnetic_parameters(model)
    return {"magnetic_params": sum(p.numel() for p in params)} if params else {}


class MagneticFamily(Family):
    def __init__(self, base: Family, predict_magmom: bool = False, **energy_config):
        self.base, self.predict_magmom, self.energy_config = base, predict_magmom, energy_config
        self.name, self.package, self.merged_filename = base.name, base.package, base.merged_filename
        self.spec_help, self.dtypes = base.spec_help, base.dtypes

    def claims(self, spec):
        return self.base.claims(spec)

    def recognises(self, names):
        return self.base.recognises(names)

    def spec_identity(self, spec):
        return self.base.spec_identity(spec)

    def load(self, spec, device):
        return self.wrap(self.base.load(spec, device))

    def fidelities(self, source):
        return self.base.fidelities(source if isinstance(source, str) else source.base)

    def at_fidelity(self, modal):
        family = super().at_fidelity(modal)
        if family is not self:
            family.base = self.base.at_fidelity(modal)
        return family

    def wrap(self, base: nn.Module) -> MagneticModel:
        """The magnetic modules (new: zero energy) beside the family's model ``base``."""
        device = next(base.parameters()).device  # (MAGNETIC_DTYPE whatever the base's dtype)
        energy = MagneticEnergy(**self.energy_config).to(device=device, dtype=MAGNETIC_DTYPE)
        head = MomentHead(energy.width).to(device=device, dtype=MAGNETIC_DTYPE) if self.predict_magmom else None
        return MagneticModel(base, energy, head).eval()

    def numbers(self, model):
        return self.base.numbers(model.base)

    def graph(self, model, atoms):
        return self.base.graph(model.base, atoms), magnetic_graph(atoms, model.energy.cutoff)

    def collate(self, graphs, device):
        return self.base.collate([g[0] for g in graphs], device), self.magnetic_batch(graphs, device)

    def magnetic_batch(self, graphs, device):
        """The magnetic module's batch of this family's ``graphs``."""
        return collate([g[1] for g in graphs], device)

    def predict(self, model, batch, training):
        out = self.outputs(model, batch, training)
        return out["energy"], out["forces"]

    def outputs(self, model, batch, training, stress=False):
        base_batch, magnetic = batch
        return self._with_magnetism(model, self.base.outputs(model.base, base_batch, training, stress), magnetic,
                                    training, stress)

    def pads(self):
        return self.base.pads()

    def padder(self, model):
        base = self.base.padder(model.base)
        if base is None:
            return None
        cutoff = model.energy.cutoff

        def padding(batch):
            base_batch, magnetic = batch
            (n, g, *edges), base_pad = base(base_batch)
            return (n, g, *edges, magnetic.edges.shape[1]), lambda atoms, *caps: {
                **base_pad(atoms, *caps[:-1]), **pad(magnetic, atoms, caps[-1], cutoff)}

        return padding

    def run(self, model, inputs, training, stress=False):
        out = self.base.run(model.base, {k: v for k, v in inputs.items() if not k.startswith(PADDED)}, training, stress)
        return self._with_magnetism(model, out, unpad(inputs, out["energy"].shape[0]), training, stress)

    @staticmethod
    def _with_magnetism(model, out, magnetic, training, stress=False):
        """The base's outputs ``out`` plus E_mag's energy, forces and (``stress``)
        stresses, the magnetic forces and, with a moment head, the moments, on
        ``magnetic`` (the same atoms and frames)."""
        mag = model.energy.outputs(magnetic, create_graph=training, stress=stress)
        summed = {k: out[k] + mag[k].to(out[k]) for k in ("energy", "forces") + (("stress",) if stress else ())}
        out = {**summed, "magforces": mag["magforces"]}
        if model.head is not None:
            out["magmom"] = model.head(model.energy, magnetic, mag["node"])
        return out

    def own_e0s(self, model, zs):
        return self.base.own_e0s(model.base, zs)

    def export(self, merged, shift, path, spec):
        written = self.base.export(merged.base, shift, path, spec)
        save_magnetic(merged, sidecar(Path(written)))
        return written

    def exported_files(self, path):
        return [*self.base.exported_files(path), sidecar(Path(path))]

    def save_beside_adapter(self, model, path):
        return [save_magnetic(model, sidecar(Path(path)))]  # (load_adapter asks for them)

    def calculator(self, path, device):
        from .calculator import MagneticCalculator

        energy, head = load_magnetic(sidecar(Path(path)), device)
        return MagneticCalculator(self.base.calculator(path, device), energy, head)


class _Wrapped(Family):
    """What adapters ask of any MagneticModel (``family_of``): its base's per-element
    energies, where a loaded adapter's E0 shift goes."""

    name = "magnetic"

    def owns(self, model):
        return isinstance(model, MagneticModel) and family_of(model.base) is not None

    def fidelities(self, model):
        return family_of(model.base).fidelities(model.base)

    def e0_table(self, model):
        return self._base(model).e0_table(model.base)

    def model_calculator(self, model, device):
        """The base family's calculator on the base model, with the model's magnetic
        modules (``adapter_calculator`` on a model with them)."""
        from .calculator import MagneticCalculator

        return MagneticCalculator(self._base(model).model_calculator(model.base, device), model.energy, model.head)

    def _base(self, model) -> Family:
        """The family of ``model``'s base, at this one's fidelity."""
        return family_of(model.base).at_fidelity(self.modal)


register_family(_Wrapped(), wrapper=True)


def magnetic_family(base: Family, settings) -> Family:
    """``base`` wrapped for magnetism where the trainer's ``settings`` name moments."""
    if settings.magmom_key is None:
        if settings.magforces_key is not None or settings.predict_magmom or settings.spin_orbit:
            raise ValueError("--magforces_key, --predict_magmom and --spin_orbit need --magmom_key (the moments in)")
        return base
    return MagneticFamily(base, predict_magmom=settings.predict_magmom, spin_orbit=settings.spin_orbit)

