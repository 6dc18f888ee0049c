"""GPU proxy (b), the host path: each patched layer of a MACE-MP-0-medium model (Triton
back end; the radial MLP runs on torch), with and without a sparse 3 % delta, in forward,
forward+backward and forward+backward+double backward, with every Triton launch
stubbed. On ``meta`` tensors any host-device sync (``.item()``, ``.tolist()``,
``bool()``, ``nonzero``, ``bincount``, ``unique``, boolean masks, ``.cpu()``) raises:
a pass that completes there has none. On CPU tensors the same passes count aten ops
(a TorchDispatchMode) and launches (the stubs) against a budget."""

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import triton_device

triton_device()  # before the kernels are imported

import sparsekern  # noqa: E402
from sparsekern.finetune.backward import backward  # noqa: E402
from sparsekern.layers import Gate  # noqa: E402
from sparsekern.magnetism.family import train_magnetic  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

pytestmark = pytest.mark.gpu_proxy
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "bincount", "_unique2", "unique_dim", "unique_consecutive",
             "masked_select", "repeat_interleave"}
PASSES = ("fwd", "fwd+bwd", "fwd+bwd+dbl")

# (layer, delta) -> the first syncing aten op of a layer known to sync (none left: the
# linears' bincount and the delta's nonzero per path went on 2026-12-03)
KNOWN_SYNCS = {}
# (layer, delta, pass) -> (most aten ops, most Triton launches) on CPU, after a first
# call built the cached constants: today's counts, aten ops rounded up by ~10 %. Each pass
# is on a new graph: the conv's counts include its edge orderings (6 ops each, built once
# per graph, tests/ops/test_triton_conv.py) and its check of their node indices (5 ops,
# once per graph)
BUDGET = {(kind, delta, upto): cost for (kind, delta), costs in {
    ("IrrepsLinear", False): {"fwd": (4, 1), "fwd+bwd": (20, 3), "fwd+bwd+dbl": (67, 9)},
    ("ChannelwiseConv", False): {"fwd": (19, 1), "fwd+bwd": (44, 2), "fwd+bwd+dbl": (102, 5)},
    ("RadialMLP", False): {"fwd": (9, 0), "fwd+bwd": (42, 0), "fwd+bwd+dbl": (211, 0)},
    ("SphericalHarmonics", False): {"fwd": (24, 0), "fwd+bwd": (80, 0), "fwd+bwd+dbl": (230, 0)},
    ("PolynomialCutoff", False): {"fwd": (11, 0), "fwd+bwd": (32, 0), "fwd+bwd+dbl": (87, 0)},
    ("Gate", False): {"fwd": (9, 0), "fwd+bwd": (31, 0), "fwd+bwd+dbl": (88, 0)},
    ("ReshapeIrreps", False): {"fwd": (3, 0), "fwd+bwd": (13, 0), "fwd+bwd+dbl": (32, 0)},
    ("ReshapeIrreps", True): {"fwd": (3, 0), "fwd+bwd": (13, 0), "fwd+bwd+dbl": (32, 0)},
    ("ElementLinear", False): {"fwd": (39, 1), "fwd+bwd": (49, 3), "fwd+bwd+dbl": (83, 9)},
    ("SymmetricContraction", False): {"fwd": (31, 1), "fwd+bwd": (63, 3), "fwd+bwd+dbl": (192, 10)},
    ("IrrepsLinear", True): {"fwd": (19, 1), "fwd+bwd": (51, 3), "fwd+bwd+dbl": (151, 9)},
    ("ChannelwiseConv", True): {"fwd": (19, 1), "fwd+bwd": (44, 2), "fwd+bwd+dbl": (102, 5)},
    ("RadialMLP", True): {"fwd": (58, 0), "fwd+bwd": (148, 0), "fwd+bwd+dbl": (511, 0)},
    ("SphericalHarmonics", True): {"fwd": (24, 0), "fwd+bwd": (80, 0), "fwd+bwd+dbl": (230, 0)},
    ("PolynomialCutoff", True): {"fwd": (11, 0), "fwd+bwd": (32, 0), "fwd+bwd+dbl": (87, 0)},
    ("ElementLinear", True): {"fwd": (53, 1), "fwd+bwd": (82, 3), "fwd+bwd+dbl": (173, 9)},
    ("SymmetricContraction", True): {"fwd": (104, 1), "fwd+bwd": (228, 3), "fwd+bwd+dbl": (654, 10)},
}.items() for upto, cost in costs.items()}


# a whole model, second call on meta: (most aten ops, most launches) for energy+forces,
# the same with a sparse (3 %) delta and everything frozen (an adapter in a calculator:
# the deltas' values, blocks and folded weights are reused), and a sparse training step
# with forces in the loss (density calibration included; its backward into the trained
# tensors, as the trainer's); today's counts, aten ops rounded up by ~10 %. MACE-MP-0
# medium on 27 atoms of three elements; SevenNet-0 on 16 silicon atoms (its host reads
# patched away: tests/integrations/test_sevenn_sync_free.py); "+ magnetism": the magnetic
# energy and a moment head beside the model, moments on the atoms (the head trains in
# the step, as the trainer's)
WHOLE_BUDGET = {
    ("mace-mp0-medium", "energy+forces"): (464, 29), ("mace-mp0-medium", "frozen sparse energy+forces"): (444, 29),
    ("mace-mp0-medium", "sparse step"): (1246, 84),
    ("7net-0", "energy+forces"): (615, 43), ("7net-0", "frozen sparse energy+forces"): (610, 43),
    ("7net-0", "sparse step"): (1793, 122),
    ("mace-mp0-medium + magnetism", "energy+forces"): (691, 29),
    ("mace-mp0-medium + magnetism", "sparse step"): (2143, 84),
    ("7net-0 + magnetism", "energy+forces"): (843, 43),
}


class _Count(TorchDispatchMode):
    """Counts aten ops; on ``meta`` (``strict``) a sync op raises, naming itself."""

    def __init__(self, strict: bool, copies: bool = False):
        super().__init__()
        self.strict, self.copies, self.ops, self.syncs = strict, copies, 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops += 1
        devices = {t.device.type for t in _tensors(args, kwargs)}
        if (kwargs or {}).get("device") is not None:
            devices.add(torch.device(kwargs["device"]).type)
        on_device = devices != {"cpu"}  # host-side tables built on CPU tensors sync nothing
        moves = name in ("_to_copy", "copy_") and len(devices) > 1
        if on_device and (name in _SYNC_OPS or (moves and not self.copies)):
            self.syncs[name] += 1
            if self.strict:
                raise _Sync(name)
        return func(*args, **(kwargs or {}))


def _tensors(args, kwargs):
    flat = list(args) + list((kwargs or {}).values())
    return [t for a in flat for t in (a if isinstance(a, (list, tuple)) else [a]) if torch.is_tensor(t)]


class _Sync(Exception):
    pass


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch recorded by kernel name, none run (the conv's kernels are
    generated per form, so the stub sits on the launch itself, not on module names)."""
    seen = []

    def record(self, *args, grid, warmup, **kwargs):
        seen.append(self.fn.__name__)

    monkeypatch.setattr(JITFunction, "run", record)
    monkeypatch.setattr(InterpretedFunction, "run", record)
    return seen


@pytest.fixture(scope="module")
def layers():
    """(class name, delta attached) -> a patched layer of MACE-MP-0 medium (float32)."""
    pytest.importorskip("mace")
    from sparsekern.integrations.mace.models import mace_mp0_shaped

    base = sparsekern.patch(mace_mp0_shaped("medium", dtype=torch.float32), backend="triton")
    sparse = sparsekern.prepare(copy.deepcopy(base), sparsekern.SparseConfig(density=0.03), backend="triton")
    found = {}
    for delta, model in ((False, base), (True, sparse)):
        for _, layer in sparsekern.patched_layers(model):  # of each kind, the one with most paths
            key = (type(layer).__name__, delta)
            if key not in found or len(getattr(layer.desc, "paths", ())) > len(getattr(found[key].desc, "paths", ())):
                found[key] = layer
    silu = torch.nn.functional.silu  # SevenNet-0's first gate
    found["Gate", False] = Gate("128x0e", [silu], "64x0e+32x0e", [silu, silu], "64x1e+32x2e")
    return found


def _inputs(layer, n: int, e: int, device):
    """Random inputs of the layer's forward: n nodes, e edges, on ``device``."""
    kind = type(layer).__name__
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device).requires_grad_()  # noqa: E731
    if kind in ("IrrepsLinear", "Gate"):
        return (rand(n, layer.irreps_in.dim),)
    if kind == "ReshapeIrreps":
        return (rand(n, layer.irreps.dim),)
    if kind == "RadialMLP":
        return (rand(e, layer.hs[0]),)
    if kind == "SphericalHarmonics":
        return (rand(e, 3),)
    if kind == "PolynomialCutoff":
        return (rand(e, 1),)
    if kind == "ChannelwiseConv":
        edges = torch.randint(0, n, (2, e), generator=g).to(device)
        return rand(n, layer.irreps_in1.dim), rand(e, layer.irreps_in2.dim), rand(e, layer.weight_numel), edges
    attrs = torch.nn.functional.one_hot(torch.randint(0, layer.num_elements, (n,), generator=g),
                                        layer.num_elements).float().to(device)
    if kind == "ElementLinear":
        return rand(n, layer.irreps_in.dim), attrs
    return rand(n, layer.num_features, layer.desc.coupling_dim), attrs


def _run(layer, inputs, upto: str) -> None:
    """One pass: the forward, its gradients wrt the inputs and the trainable weights, and
    the gradients of a loss of those (force training)."""
    out = layer(*inputs)
    if upto == "fwd":
        return
    wrt = [t for t in inputs if t.requires_grad] + [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), wrt, create_graph=upto == "fwd+bwd+dbl", allow_unused=True)
    if upto == "fwd+bwd+dbl":
        sum(gr.square().sum() for gr in grads if gr is not None and gr.requires_grad).backward()


def _first_sync(layer, upto: str):
    """The first syncing op of a pass on meta tensors, or None. The first call may copy
    the descriptor's constants to the device (once: they are cached); the second may not."""
    meta = copy.deepcopy(layer).to("meta")
    for first in (True, False):
        inputs = _inputs(meta, 37, 301, "meta")
        try:
            with _Count(strict=True, copies=first):
                _run(meta, inputs, upto)
        except _Sync as sync:
            return str(sync)
        except (RuntimeError, NotImplementedError) as err:  # .tolist() / .cpu() / .item() refused by meta
            return f"refused on meta: {str(err).splitlines()[0]}"
    return None


@pytest.mark.parametrize("upto", PASSES)
def test_no_host_sync_on_meta(layers, launches, upto):
    found = {key: _first_sync(layer, upto) for key, layer in layers.items()}
    assert {key: sync for key, sync in found.items() if sync} == KNOWN_SYNCS
    assert launches, "the stubs saw no launch: the Triton kernels were not reached"


@pytest.mark.parametrize("upto", PASSES)
def test_cuda_element_linear_without_host_sync(layers, launches, monkeypatch, upto):
    """The CUDA extension's element linear (its launch stubbed: no GPU here), with and
    without a delta: no pass syncs (its weight gradient read the elements' counts back)."""
    from sparsekern.ops.cuda import element_linear as cuda

    monkeypatch.setattr(cuda, "_C", object())
    monkeypatch.setattr(cuda, "_check", lambda *args: None)
    monkeypatch.setattr(cuda, "_launch", lambda x, w, s, a: x.new_empty(x.shape[0], w.shape[2], x.shape[2]))
    for delta in (False, True):
        layer = copy.deepcopy(layers["ElementLinear", delta]).set_backend("cuda")
        assert _first_sync(layer, upto) is None
    assert upto == "fwd" or "_wgrad_kernel" in launches


@pytest.mark.parametrize("upto", PASSES)
def test_launch_and_op_budget(layers, launches, upto):
    """Launches: one per forward for the linears (grouped over paths), conv and contraction."""
    for (kind, delta), layer in layers.items():
        _run(layer, _inputs(layer, 37, 301, "cpu"), upto)  # builds the cached constants
        inputs = _inputs(layer, 37, 301, "cpu")
        del launches[:]
        with _Count(strict=False) as count:
            _run(layer, inputs, upto)
        if upto == "fwd":
            torch_only = ("RadialMLP", "SphericalHarmonics", "PolynomialCutoff", "Gate", "ReshapeIrreps")
            assert len(launches) == (0 if kind in torch_only else 1), (kind, delta, launches)
        print(f"{kind} delta={delta} {upto}: {count.ops} aten ops, {len(launches)} launches")  # shown with -s
        budget = BUDGET[kind, delta, upto]
        assert count.ops <= budget[0] and len(launches) <= budget[1], (kind, delta, upto, count.ops, len(launches))


def _whole_model(name: str):
    """(its family, the model patched on the Triton back end, a structure); ``<model> +
    magnetism``: with the magnetic energy and a moment head beside it, and moments (the
    whole patched, as the trainer patches it)."""
    family, model, atoms = _unpatched(name)
    return family, sparsekern.patch(model, backend="triton"), atoms


def _unpatched(name: str):
    from ase.build import bulk

    if name.endswith(" + magnetism"):
        from sparsekern.magnetism.family import MagneticFamily

        base_family, base, atoms = _unpatched(name[:-len(" + magnetism")])
        family = MagneticFamily(base_family, predict_magmom=True)
        atoms.set_initial_magnetic_moments(torch.randn(len(atoms), generator=torch.Generator().manual_seed(0)).numpy())
        return family, family.wrap(base), atoms
    if name == "7net-0":
        pytest.importorskip("sevenn")
        from sparsekern.integrations.sevennet.family import SevenNetFamily

        family = SevenNetFamily()
        model, atoms = family.load("7net-0", "cpu"), bulk("Si", "diamond", a=5.43) * (2, 2, 2)
    else:
        pytest.importorskip("mace")
        from sparsekern.integrations.mace.family import MaceFamily
        from sparsekern.integrations.mace.models import mace_mp0_shaped

        family, model = MaceFamily(), mace_mp0_shaped("medium", dtype=torch.float32)
        atoms = bulk("Cu", "fcc", a=3.6) * (3, 3, 3)
        atoms.numbers = [29, 8, 1] * 9
    atoms.rattle(0.05, seed=0)
    return family, model, atoms


def _whole_pass(family, model, batch, step: bool) -> None:
    energy, forces = family.predict(model, batch, step)
    if step:  # as the trainer steps: into the trained tensors, their gradients unset before
        trained = [p for p in model.parameters() if p.requires_grad]
        for p in trained:
            p.grad = None
        backward(energy.sum() + (forces ** 2).sum(), trained)


@pytest.mark.parametrize("name,what", list(WHOLE_BUDGET))
def test_whole_model_no_host_sync(launches, name, what):
    """A whole patched model's energy+forces, and a sparse training step, on meta: no
    host sync anywhere (also not in the density controller), within a budget."""
    family, model, atoms = _whole_model(name)
    step = what == "sparse step"
    if "sparse" in what:
        sparsekern.prepare(model, sparsekern.SparseConfig(density=0.03), backend="triton")
        train_magnetic(model)  # as the trainer: a moment head trains (a model without one: unchanged)
    model.train(step)
    if "frozen" in what:
        model.requires_grad_(False)
    graph = family.graph(model, atoms)
    _whole_pass(family, model, family.collate([graph], "cpu"), step)  # builds the descriptors' constants (CPU)
    model = copy.deepcopy(model).to("meta")
    for first in (True, False):  # the first call may copy constants to the device
        batch = family.collate([graph], "meta")  # a new graph: planned anew
        del launches[:]
        with _Count(strict=True, copies=first) as count:
            _whole_pass(family, model, batch, step)
    print(f"{name}, {what}: {count.ops} aten ops, {len(launches)} launches")  # shown with -s
    budget = WHOLE_BUDGET[name, what]
    assert count.ops <= budget[0] and len(launches) <= budget[1], (count.ops, len(launches))


# what a graphed training step captures (``GraphedSteps._compute``: the step on padded
# inputs, its loss and the trained tensors' gradients), second call on meta, as above
GRAPHED_BUDGET = {"mace-mp0-medium": (1208, 84), "7net-0": (1746, 122),  # 1,100, 1,587 and 1,374 aten ops
                  "mace-mp0-medium + magnetism": (1510, 92)}


@pytest.mark.parametrize("name", list(GRAPHED_BUDGET))
def test_graphed_step_captures_without_host_sync(launches, name):
    """A sparse training step as ``--cuda_graphs`` captures it, padded (padding atoms and
    edges beyond the structure's): no sync and no copy between host and device (either
    would fail the capture), within a budget."""
    from types import SimpleNamespace

    import numpy as np

    from sparsekern.finetune.data import Frame
    from sparsekern.finetune.evaluation import make_samples
    from sparsekern.finetune.graphed_step import GraphedSteps, _labels, _padded_labels

    family, model, atoms = _whole_model(name)
    train_magnetic(sparsekern.prepare(model, sparsekern.SparseConfig(density=0.03), backend="triton"))
    model.train()
    zeros = np.zeros((len(atoms), 3))  # (labels: with magnetism, of moments and magnetic forces too)
    magnetic = {"magmom": zeros, "magforces": zeros} if name.endswith("magnetism") else {}
    sample = make_samples(family, model, [Frame(atoms, 0.0, zeros, **magnetic)], {})
    settings = SimpleNamespace(energy_weight=1.0, forces_weight=100.0, magforces_weight=1.0, magmom_weight=1.0,
                               loss="weighted")
    (n, g, *edges), pad = family.padder(model)(family.collate([sample[0].graph], "cpu"))  # (reads the cutoff: CPU)
    labels = _labels(sample, sample, 1.0, settings, next(model.parameters()).dtype)
    inputs = {**pad(n + 10, *(e + 50 for e in edges)), **_padded_labels(labels, n + 10)}
    assert len(labels) == 2 + len(magnetic)

    def compute(m, inputs):  # what the capture runs (GraphedSteps._compute reads these four)
        steps = SimpleNamespace(family=family, model=m, settings=settings,
                                wanted=tuple(p for p in m.parameters() if p.requires_grad))
        return GraphedSteps._compute(steps, inputs)

    compute(model, inputs)  # builds the descriptors' constants (CPU)
    model = copy.deepcopy(model).to("meta")
    for first in (True, False):  # the first call may copy constants to the device
        on_meta = {k: v.to("meta") for k, v in inputs.items()}  # new inputs: planned anew
        del launches[:]
        with _Count(strict=True, copies=first) as count:
            compute(model, on_meta)
    print(f"{name}, graphed sparse step: {count.ops} aten ops, {len(launches)} launches")  # shown with -s
    budget = GRAPHED_BUDGET[name]
    assert count.ops <= budget[0] and len(launches) <= budget[1], (count.ops, len(launches))


def test_input_gradients_alone_skip_the_weight_kernels(layers, launches):
    """Energy+forces asks autograd for input gradients only: the weights are Parameters
    (marked at forward time), yet no weight-gradient kernel runs (sparsekern.ops.grads)."""
    weight_kernels = {"IrrepsLinear": "_wgrad_kernel", "ElementLinear": "_wgrad_kernel",
                      "ChannelwiseConv": "_grads_kernel", "SymmetricContraction": None}  # conv: fused with a's
    for (kind, delta), layer in layers.items():
        if kind not in weight_kernels:
            continue
        inputs = _inputs(layer, 37, 301, "cpu")
        out = layer(*inputs)
        del launches[:]
        torch.autograd.grad(out.square().sum(), inputs[0])
        alone = list(launches)
        weights = [p for p in layer.parameters() if p.requires_grad] or [inputs[2]]  # the conv's: per edge
        torch.autograd.grad(layer(*inputs).square().sum(), [inputs[0]] + weights)
        both = launches[len(alone) + 1:]  # after the second forward
        if weight_kernels[kind] is None:  # one kernel for every derivative: count them
            assert 0 < len(alone) < len(both), (kind, delta, alone, both)
        else:  # and they run when asked for
            assert weight_kernels[kind] not in alone and weight_kernels[kind] in both, (kind, delta, alone, both)
