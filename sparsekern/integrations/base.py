"""What differs between model families during fine-tuning, behind one small interface:
recognising its models, loading, graphs and batches, energies and forces, the model's
own isolated-atom energies, and writing a merged model that the family's own ASE
calculator loads. Each family imports its package only when used (MACE and SevenNet
live in different environments)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch


class Family:
    """One model family. ``graph`` turns an ase.Atoms into the model's input once (graphs
    are built before training); ``predict`` gives (energy per frame, forces)."""

    name: str
    package: str  # the Python package its models need
    merged_filename: str
    spec_help: str  # what --model takes for this family
    dtypes: Tuple[str, ...] = ("float32", "float64")  # what its models train in (--default_dtype)
    modal: Optional[str] = None  # the fidelity its multi-fidelity models compute at (``at_fidelity``)

    def claims(self, spec: str) -> bool:
        """Whether ``spec`` (a name or file given as --model) is a model of this family."""
        raise NotImplementedError

    def spec_identity(self, spec: str) -> str:
        """``spec`` as a checkpoint records it: a file by its absolute path."""
        return str(Path(spec).resolve()) if Path(spec).exists() else spec

    def fidelities(self, source) -> List[str]:
        """The fidelities of a model of several (a multi-fidelity SevenNet's modalities, a
        multi-head MACE's heads), ``source`` a spec (as --model takes it) or a loaded
        model, sorted; [] for a model of one."""
        return []

    def at_fidelity(self, modal: Optional[str]) -> "Family":
        """A copy of this family computing its models at fidelity ``modal`` (None: this
        family, for models of one): its graphs name it, its calculators compute at it and
        ``e0_table`` is its row. Checked against the model by ``computing_at``."""
        if modal is None:
            return self
        family = copy.copy(self)
        family.modal = modal
        return family

    def recognises(self, names: Set[str]) -> bool:
        """Whether a model file whose pickle holds ``names`` (``pickled_names``) is one of
        this family's, whatever its suffix."""
        raise NotImplementedError

    def load(self, spec: str, device: str) -> torch.nn.Module:
        raise NotImplementedError

    def owns(self, model) -> bool:
        """Whether ``model`` (a loaded model object) is one of this family's."""
        raise NotImplementedError

    def numbers(self, model) -> List[int]:
        """Atomic numbers the model knows."""
        raise NotImplementedError

    def element_index(self, model) -> Dict[int, int]:
        """Each atomic number's index on the model's element axis (its one-hot, its
        per-element weights and energies)."""
        raise NotImplementedError

    def species(self, model, inputs) -> torch.Tensor:
        """Each node's element index (``element_index``) in ``inputs``, the first argument
        of the model's forward."""
        raise NotImplementedError

    def graph(self, model, atoms):
        raise NotImplementedError

    def collate(self, graphs: Sequence, device: str):
        raise NotImplementedError

    def predict(self, model, batch, training: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def padder(self, model) -> Optional[Callable[[object], Tuple[Tuple[int, ...], Callable[..., Dict]]]]:
        """For training steps and evaluation batches replayed from CUDA graphs (one shape
        each, ``finetune/graphed_step.py``): a function of a collated batch that gives its
        sizes (atoms, graphs, then the edges of each edge list the model reads) and a
        function of capacities (atoms, then one per edge list) that gives the model's
        inputs for the batch padded to them (padding atoms in a graph of their own after
        the batch's, padding edges that reach nothing real), which ``run`` computes on;
        holding no reference to the model (kept beside it, not by it). None: the family
        has none (its steps run eagerly)."""
        return None

    def pads(self) -> bool:
        """Whether ``padder`` gives one (asked before a model is loaded)."""
        return type(self).padder is not Family.padder

    def run(self, model, inputs: Dict[str, torch.Tensor], training: bool, stress: bool = False
            ) -> Dict[str, torch.Tensor]:
        """``outputs`` on the inputs ``padder`` gives (per graph, then per atom, padding included)."""
        raise NotImplementedError

    def outputs(self, model, batch, training: bool, stress: bool = False) -> Dict[str, torch.Tensor]:
        """``predict``'s energy and forces by name; with ``stress``, each frame's stress
        (frames, 3, 3; eV/Å^3, ASE's sign); a family that predicts more (magnetism: magnetic
        forces, moments) adds them."""
        if stress:
            raise ValueError(f"{self.name} models: stresses are not computed for fine-tuning")
        energy, forces = self.predict(model, batch, training)
        return {"energy": energy, "forces": forces}

    def own_e0s(self, model, zs: Sequence[int]) -> Dict[int, float]:
        """The model's isolated-atom energy per element (what ``--E0s`` replaces)."""
        raise NotImplementedError

    def e0_table(self, model) -> Tuple[torch.Tensor, Dict[int, int]]:
        """The tensor holding the model's per-element energies (elements on its last
        axis) and each atomic number's index there."""
        raise NotImplementedError

    def fold_shift(self, model, shift: Dict[int, float]) -> None:
        """Add ``shift`` (eV per atomic number) to the model's per-element energies in
        place: what the merged file holds, and what a loaded adapter's E0 shift does."""
        table, index = self.e0_table(model)
        with torch.no_grad():
            for z, s in shift.items():
                table[..., index[int(z)]] += s

    def export(self, merged, shift: Dict[int, float], path: Path, spec: str) -> Path:
        """Write ``merged`` (a plain, unpatched model holding the fine-tuned weights) with
        the per-element energy shift folded in, in the family's own format."""
        raise NotImplementedError

    def exported_files(self, path: Path) -> List[Path]:
        """The files ``export`` wrote for the model at ``path`` (it and any beside it)."""
        return [Path(path)]

    def save_beside_adapter(self, model, path: Path) -> List[Path]:
        """Write what an adapter saved at ``path`` from ``model`` needs beside it (a
        wrapper's own trained modules); the files written (none for a plain family)."""
        return []

    def calculator(self, path: Path, device: str):
        raise NotImplementedError

    def model_calculator(self, model, device: str):
        """The family's ASE calculator on ``model`` itself (patched, with adapters), not
        on a file: it computes with whatever adapter is active."""
        raise NotImplementedError


def computing_at(family: Family, source, modal: Optional[str], flag: str) -> Family:
    """``family`` computing ``source`` (``Family.fidelities``) at fidelity ``modal``, which
    ``flag`` gave: refused in one line unless ``source`` has that fidelity, or has one and
    ``modal`` is None."""
    known = family.fidelities(source)
    if modal is None and known:
        raise ValueError(f"{flag}: the model has several fidelities ({', '.join(known)}); name one")
    if modal is not None and modal not in known:
        raise ValueError(f"{flag} {modal}: " + (f"the model's fidelities are {', '.join(known)}" if known else
                                                "the model has one fidelity; leave it out"))
    return family.at_fidelity(modal)


_FAMILIES: List[Family] = []
_WRAPPERS: List[Family] = []  # of models that wrap another family's: found by model, never by --model


def register_family(family: Family, wrapper: bool = False) -> None:
    """Register ``family``; a ``wrapper`` (its models hold another family's model) is
    found only by ``family_of``."""
    registry = _WRAPPERS if wrapper else _FAMILIES
    registry[:] = [f for f in registry if f.name != family.name] + [family]


def family_of(model) -> Optional[Family]:
    """The registered family whose model ``model`` is (None: none)."""
    return next((f for f in _FAMILIES + _WRAPPERS if f.owns(model)), None)


def computing_model(model) -> Tuple[Optional[torch.nn.Module], Optional[Family]]:
    """The module inside ``model`` that a (not wrapper) family's forward runs on:
    ``model`` itself, or the model a wrapper holds; and its family (None, None: none)."""
    for module in model.modules():
        family = next((f for f in _FAMILIES if f.owns(module)), None)
        if family is not None:
            return module, family
    return None, None


def pickled_names(path: Path, flag: str = "--model") -> Optional[Set[str]]:
    """The class paths and strings in the pickle of a ``torch.save`` file, read without
    running it (None: the pre-zip format, which only torch.load reads); a one-line error
    for a file that is not one (text, truncated), naming the option ``flag`` that gave it."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):  # a truncated archive has lost its directory at the end
        try:
            with zipfile.ZipFile(path) as archive:
                pickle = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
            return {part for _, arg, _ in pickletools.genops(pickle) if isinstance(arg, str) for part in arg.split()}
        except (StopIteration, zipfile.BadZipFile, ValueError):
            pass
    else:
        with open(path, "rb") as f:
            if f.read(1) == b"\x80":  # a pickle: torch's format before 1.6
                return None
    raise ValueError(f"{flag} {path} is not a model file (not a torch.save archive, or truncated)")


def family_for(spec: str, flag: str = "--model") -> Family:
    """The registered family of ``spec``: for a model file, the one that recognises its
    content (whatever its suffix), else the one that claims its name (errors name the
    option ``flag`` that gave it)."""
    names = pickled_names(Path(spec), flag) if Path(spec).is_file() else None
    if names is not None:
        found = next((f for f in _FAMILIES if f.recognises(names)), None)
        if found is None:
            raise ValueError(f"{flag} {spec} holds no model of a known family; give "
                             + " or ".join(f.spec_help for f in _FAMILIES))
        return found
    for family in _FAMILIES:
        if family.claims(spec):
            return family
    raise ValueError(f"{flag}: cannot tell the model family of {spec!r}; give "
                     + " or ".join(f.spec_help for f in _FAMILIES))
