"""Shared test utilities: random irreps, relative errors, random O(3) elements."""

import collections
import os
import random
from pathlib import Path

import pytest
import torch
from e3nn import o3
from torch.utils._python_dispatch import TorchDispatchMode


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def random_irreps(rng: random.Random, lmax: int = 3, max_mul: int = 5, max_blocks: int = 4) -> o3.Irreps:
    blocks = []
    for _ in range(rng.randint(1, max_blocks)):
        l = rng.randint(0, lmax)
        blocks.append((rng.randint(1, max_mul), (l, rng.choice([-1, 1]))))
    return o3.Irreps(blocks)


def random_o3(dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """A random rotation composed with inversion (det = -1)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.det(q))  # a proper rotation
    return (-q).to(dtype)


def uvu_tp(irreps1, irreps2, target, dtype=torch.float64, built_in=torch.float32) -> o3.TensorProduct:
    """A MACE/SevenNet-style conv TP: every allowed path, 'uvu', per-edge weights, onto the
    irreps in ``target`` (or every l <= ``target`` where it is an int). Built in
    ``built_in`` and moved to ``dtype``, as mace_mp does with float64: e3nn keeps
    float32-rounded Clebsch-Gordan buffers then, and the layer must reproduce them."""
    keep = (lambda ir: ir.l <= target) if isinstance(target, int) else (lambda ir: ir in o3.Irreps(target))
    mid, ins = [], []
    for i1, (mul, ir1) in enumerate(o3.Irreps(irreps1)):
        for i2, (_, ir2) in enumerate(o3.Irreps(irreps2)):
            for ir in ir1 * ir2:
                if keep(ir):
                    ins.append((i1, i2, len(mid), "uvu", True))
                    mid.append((mul, ir))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(built_in)
    try:
        tp = o3.TensorProduct(irreps1, irreps2, o3.Irreps(mid), ins, shared_weights=False, internal_weights=False)
    finally:
        torch.set_default_dtype(previous)
    return tp.to(dtype)


def patch_failing_at(monkeypatch, model: torch.nn.Module, layer_cls: type) -> list:
    """``sparsekern.patch(model)`` with every ``layer_cls`` failing to build (a
    RuntimeError, which patch passes on); returns the model's module types from before."""
    import sparsekern

    types = [type(m) for m in model.modules()]

    def broken(cls, module):
        raise RuntimeError("cannot build")
    monkeypatch.setattr(layer_cls, "from_e3nn", classmethod(broken))
    with pytest.raises(RuntimeError, match="cannot build"):
        sparsekern.patch(model, backend="torch")
    return types


def one_hot(n: int, num_elements: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, num_elements, (n,), generator=g)
    return torch.nn.functional.one_hot(z, num_elements).to(dtype)


def sevennet_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A SevenNet ``model`` in float64, in place (sevenn's one-hot embedding casts to
    float32: its outputs cast back). Not for a deep copy of a float32 model: e3nn's
    TensorProducts copied so keep float32 constants through ``.double()`` (relative
    5e-8 in SevenNet-0's blocks 1-4, unpatched)."""
    def to_float64(module, args, out):
        return {k: v.double() if torch.is_tensor(v) and v.dtype == torch.float32 else v for k, v in out.items()}

    model.onehot_idx_to_onehot.register_forward_hook(to_float64)
    return model.double()


class _Rerun:
    """A fake CUDA graph: a replay runs the captured call again, into its first outputs.
    Both run as under a capture (``tensor_cache.capturing()``), and a replay must read
    the cached values its capture read (a real one reads their memory, stale once the
    weights they derive from change); ``strict``, it must also issue the ops the capture
    did, with the same shapes and non-tensor arguments: a real replay runs no Python, so
    a call whose ops depend on host state that changed since the capture (a counter, a
    schedule, a cache) would silently replay the old ones."""

    def __init__(self, fn, warmups: int, strict: bool):
        from sparsekern.ops import tensor_cache

        self.fn, self.strict = fn, strict
        for _ in range(warmups):  # as the real capture's (TorchScript settles its graphs in them)
            fn()
        with _OpTrace() as trace, tensor_cache.held() as held:
            self.out = fn()
        self.trace, self.held = trace.ops, held

    def replay(self):  # called under no_grad; a real replay runs no Python
        from sparsekern.ops import tensor_cache

        with torch.enable_grad(), _OpTrace() as trace, tensor_cache.held() as held:
            new = self.fn()
        assert not self.strict or trace.ops == self.trace, _first_difference(self.trace, trace.ops)
        # a real replay reads the cached values its capture read, whatever the cache holds now
        assert [id(v) for v in held] == [id(v) for v in self.held], \
            "a replay would read cached values its capture held, since rebuilt (the weights changed): recapture"
        for key, value in new.items():
            if torch.is_tensor(value) and torch.is_tensor(self.out.get(key)):
                self.out[key].detach().copy_(value.detach())


class _OpTrace(TorchDispatchMode):
    """The aten ops run inside it (``ops``: each one's name, its tensors' shapes and
    dtypes, its other arguments), as if a CUDA graph were being captured."""

    def __enter__(self):
        from sparsekern.ops import tensor_cache

        self.ops, self._was = [], tensor_cache.capturing
        tensor_cache.capturing = lambda: True
        return super().__enter__()

    def __exit__(self, *exc):
        from sparsekern.ops import tensor_cache

        tensor_cache.capturing = self._was
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), _described(args), _described(kwargs or {})))
        return func(*args, **(kwargs or {}))


def _described(value):
    if torch.is_tensor(value):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_described(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _described(v)) for k, v in value.items())
    return value


def _first_difference(captured, replayed) -> str:
    i = next((i for i, (a, b) in enumerate(zip(captured, replayed)) if a != b), min(len(captured), len(replayed)))
    return (f"the replay's ops differ from the capture's at op {i} of {len(captured)} (replayed {len(replayed)}): "
            f"captured {captured[i] if i < len(captured) else None}, replayed {replayed[i] if i < len(replayed) else None}")


def fake_cuda_graphs(monkeypatch, strict: bool = False) -> None:
    """``sparsekern.integrations.cuda_graphs`` replaying on the CPU: each capture a :class:`_Rerun`, so
    that the graphed models' copies into and out of their captures are checked here. ``strict``: a
    replay must issue the capture's ops (where the model's CPU path plans alike for every input: the
    torch back end's conv groups nodes by in-degree on the host, which a GPU's never does)."""
    from sparsekern.integrations import cuda_graphs

    def capture(fn, pool=None, warmups=2):
        graph = _Rerun(fn, warmups, strict)
        return graph, graph.out

    monkeypatch.setattr(cuda_graphs, "replayable", lambda device: True)
    monkeypatch.setattr(cuda_graphs, "capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


def triton_device() -> str:
    """Where Triton tests run: the GPU, or CPU tensors under the interpreter (conftest.py
    sets TRITON_INTERPRET=1 without a GPU, before anything imports triton). Called at
    module level, before the kernels are imported: skips the module elsewhere."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
    return "cpu"


def write_tiny_mace_case(root, n_train: int, n_test: int = 1, heads=None):
    """A tiny MACE model (Al, Cu; float64; with ``heads``, one readout, scale, shift and
    E0s per head) saved as ``root/tiny.model``, and EMT-labelled, rattled Cu2Al2 cells in
    ``root/train.xyz`` and ``root/test.xyz``: a fine-tuning run of a few seconds. Returns
    ``root``."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.io import write

    from sparsekern.integrations.mace.models import mace_mp0_shaped

    per_head = {} if heads is None else dict(
        heads=list(heads), atomic_energies=[[-3.0 + 0.5 * h, -4.0 + 0.25 * h] for h in range(len(heads))],
        atomic_inter_scale=[0.8 + 0.1 * h for h in range(len(heads))],
        atomic_inter_shift=[0.1 * h for h in range(len(heads))])
    model = mace_mp0_shaped("small", seed=1, num_elements=2, atomic_numbers=[13, 29], max_ell=2, correlation=2,
                            hidden_irreps=o3.Irreps("8x0e+8x1o"), r_max=3.5, radial_MLP=[8, 8], num_bessel=4,
                            **{"atomic_energies": [-3.0, -4.0], **per_head})
    torch.save(model, root / "tiny.model")
    frames = []
    for i in range(n_train + n_test):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.numbers[[0, 2]] = 13
        atoms.rattle(0.08, seed=i)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    write(root / "train.xyz", frames[:n_train])
    write(root / "test.xyz", frames[n_train:])
    return root


def files_written(err: str, out) -> list:
    """The files ``sparsekern finetune`` says it wrote (its stderr ``err``), checked: each
    exists, and every file in ``out`` but the lock and temporary files is among them."""
    from pathlib import Path

    listed = [line.removeprefix("wrote: ") for line in err.splitlines() if line.startswith("wrote: ")]
    assert len(set(listed)) == len(listed) and all(Path(p).is_file() for p in listed), listed
    present = {str(p) for p in Path(out).iterdir() if p.name != ".lock" and not p.name.endswith(".tmp")}
    assert present == set(listed), (sorted(present), listed)
    return listed


class AtenOps(TorchDispatchMode):
    """Counts the aten ops run inside it (``n``, and by name in ``names``): a CPU measure
    of host dispatch."""

    def __init__(self):
        super().__init__()
        self.n = 0
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        self.names[str(func)] += 1
        return func(*args, **(kwargs or {}))


def with_stresses(files, tmp_path, unlabelled=(), virials: bool = False):
    """``files``' train.xyz and test.xyz (``write_tiny_mace_case``) written to ``tmp_path``
    with EMT's stresses (ASE's sign, Voigt 6) under REF_stress, or with ``virials`` as
    MACE's virials -S V (9 values) under REF_virials, but for the training frames
    ``unlabelled``; their paths."""
    from ase.calculators.emt import EMT
    from ase.io import read, write

    paths = []
    for name in ("train.xyz", "test.xyz"):
        frames = read(files / name, ":")
        for i, atoms in enumerate(frames):
            if not (name == "train.xyz" and i in unlabelled):
                atoms.calc = EMT()
                if virials:
                    atoms.info["REF_virials"] = -atoms.get_stress(voigt=False).reshape(-1) * atoms.get_volume()
                else:
                    atoms.info["REF_stress"] = atoms.get_stress()
                atoms.calc = None
        write(tmp_path / name, frames)
        paths.append(tmp_path / name)
    return paths


def labelled_by_the_model(model, frames, out):
    """``frames`` (an extended XYZ file) written to ``out`` with the MACE ``model`` file's
    own energies and forces as their labels (float64): frames a fine-tuning run moves the
    model away from, each epoch further (--E0s foundation: no shift)."""
    from ase.io import read, write
    from mace.calculators import MACECalculator

    atoms_list = read(frames, ":")
    calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")
    for atoms in atoms_list:
        atoms.calc = calc
        atoms.info["REF_energy"], atoms.arrays["REF_forces"] = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = None
    write(out, atoms_list)
    return out


def run_python(*command):
    """``command`` in a fresh Python importing this sparsekern, 1 thread per process."""
    import subprocess
    import sys

    import sparsekern

    root = str(Path(sparsekern.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600)
