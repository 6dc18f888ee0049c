"""The kernel cases of the GPU suite, shared by ``gpu_suite.py`` (CUDA-event timing,
JSON and markdown) and ``test_kernels_bench.py`` (pytest-benchmark).

Layers of a MACE-MP-0-medium-shaped model (random weights; 128 channels, l <= 3): the
two interaction convs, the element-indexed linears (skip_tp), the irrep linears after
each conv, and the symmetric contractions, float32. Each case gives its back ends as
callables: e3nn (as MACE runs it), sparsekern's torch back end, the Triton kernels (also
with a block-sparse delta at 3 % density, W0 frozen, and, for the conv, half its paths
masked and its edges listed by receiver), sparsekern's cuEquivariance back end (ops/cueq;
conv and contraction), and cuEquivariance's and OpenEquivariance's fused convs as MACE
builds them, where they import. A back end that cannot run here is a string saying why.
``floor`` holds the forward pass's compulsory bytes and FLOPs (computed, see NOTES.md);
``parity`` names the back ends whose forward the suite checks against ``reference``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch

import sparsekern  # noqa: F401  (e3nn 0.4.4 under torch >= 2.6)
from sparsekern.layers import ChannelwiseConv, ElementLinear, IrrepsLinear, SymmetricContraction
from sparsekern.integrations.mace.models import mace_mp0_shaped
from sparsekern.ops import registry

SIZES = {"mp0_medium_5000at": (5000, 150000), "small_300at": (300, 9000)}
SMOKE_SIZES = {"smoke_20at": (20, 60)}  # CPU check of the scripts (TRITON_INTERPRET=1)
# the smoke check's model: MP-0's structure with tiny channels (the interpreter is slow)
SMOKE_MODEL = dict(num_elements=3, hidden_irreps="4x0e+4x1o", max_ell=2, correlation=2, radial_MLP=[8])
MODES = ("fwd", "fwd+bwd", "fwd+bwd+dbl")
OPS = ("conv0", "conv1", "skip_tp0", "skip_tp1", "linear0", "linear1", "products0", "products1")
# every back end a case may time (gpu_suite.py --backends picks some)
BACKENDS = ("e3nn", "torch", "triton", "triton_delta3pct", "triton_half_paths", "triton_by_receiver",
            "cueq", "cueq_fused", "oeq_fused")
DELTA_DENSITY, DELTA_TILE = 0.03, 16
N_PRESENT = 10  # elements in the benchmark system (of the model's 89)
OEQ_BUILD_WAIT_S = 120  # then its rows say n/a: the end-to-end part after them is not lost

Backend = Union[Tuple[Callable, tuple], str]


@dataclass
class OpCase:
    op: str
    backends: Dict[str, Backend]
    modes: Tuple[str, ...] = MODES[:2]
    floor: Dict[str, float] = field(default_factory=dict)  # fwd bytes and flops
    # back ends computing the reference's function (not the variants with a delta or
    # masked paths), their forwards checked against it in the same run
    parity: Tuple[str, ...] = ("e3nn", "triton")
    reference: str = "torch"
    reference_run: Optional[Backend] = None  # the reference's, kept where it is not timed


def model(smoke: bool, dtype=torch.float32) -> torch.nn.Module:
    """The MACE-MP-0-medium-shaped model of the benchmarks (the tiny one with ``smoke``)."""
    from e3nn import o3

    if not smoke:
        return mace_mp0_shaped("medium", dtype=dtype)
    kw = dict(SMOKE_MODEL, hidden_irreps=o3.Irreps(SMOKE_MODEL["hidden_irreps"]))
    return mace_mp0_shaped("small", dtype=dtype, **kw)


def run_mode(f, inputs, mode):
    """One step of ``mode`` for ``out = f(*inputs)``: fwd; fwd+bwd (gradients of all
    floating inputs); fwd+bwd+dbl (force training: grad with create_graph, then backward)."""
    if mode == "fwd":
        with torch.no_grad():
            return f(*inputs)
    # integer inputs (species, edge indices) passed as they are: a detached copy is a new
    # tensor, whose per-graph plan (tensor_cache) would be rebuilt on every call
    args = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    diff = [a for a in args if a.requires_grad]
    out = f(*args)
    if mode == "fwd+bwd":
        return torch.autograd.grad(out, diff, torch.ones_like(out))
    grads = torch.autograd.grad((out * out).sum(), diff, create_graph=True)
    loss = sum((g * g).sum() for g in grads)
    return torch.autograd.grad(loss, diff)


def _species(n_nodes: int, n_el: int, dev, g) -> torch.Tensor:
    present = torch.randperm(n_el, device=dev, generator=g)[:N_PRESENT]
    return present[torch.randint(0, len(present), (n_nodes,), device=dev, generator=g)]


def random_blocks(desc, dev, g):
    """(block_slot, block_values) of a delta on every path of a linear's descriptor, laid
    out as ``delta_slot.active_blocks`` gives them: DELTA_DENSITY of the DELTA_TILE^2
    blocks active (only those have a row of values)."""
    T = DELTA_TILE
    n = sum(desc.num_elements * math.ceil(p.mul_in / T) * math.ceil(p.mul_out / T) for p in desc.paths)
    on = torch.rand(n, device=dev, generator=g) < DELTA_DENSITY
    slot = torch.where(on, on.int().cumsum(0) - 1, -1).int()
    return slot, torch.randn(int(on.sum()), T, T, device=dev, generator=g) * 1e-2


def _frozen(weight: torch.Tensor, f):
    """``f`` run with ``weight`` frozen (sparse fine-tuning trains x and the blocks only)."""
    def run(*args):
        weight.requires_grad_(False)
        try:
            return f(*args)
        finally:
            weight.requires_grad_(True)
    return run


def cueq_fused_conv(tp, dev):
    """cuEquivariance's fused conv as MACE builds it (``conv_fusion``), or why not."""
    try:
        import cuequivariance_torch  # noqa: F401
        from mace.modules.wrapper_ops import CuEquivarianceConfig, TensorProduct
    except Exception as exc:  # not installed / no ops package
        return f"n/a ({type(exc).__name__}: {exc})"
    try:
        cfg = CuEquivarianceConfig(enabled=True, layout="mul_ir", group="O3_e3nn", optimize_all=True,
                                   conv_fusion=True)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            mod = TensorProduct(tp.irreps_in1, tp.irreps_in2, tp.irreps_out,
                                [tuple(i)[:5] for i in tp.instructions], shared_weights=False,
                                internal_weights=False, cueq_config=cfg)
        finally:
            torch.set_default_dtype(prev)
        if not hasattr(mod, "original_forward"):
            return "n/a (MACE did not build a fused cuEquivariance conv)"
        return mod.to(dev)
    except Exception as exc:
        return f"n/a ({type(exc).__name__}: {exc})"


def oeq_fused_conv(tp, dev):
    """OpenEquivariance's fused conv as MACE builds it (``OEQConfig(conv_fusion="atomic")``:
    a ``TensorProductConv`` of the e3nn product's problem, e3nn's weight layout), or why
    not. Imported from ``$SPARSEKERN_OEQ_SITE`` where set (``run_gpu.sh`` unpacks its
    sources there: no wheel exists, its extension compiles on first import)."""
    site = os.environ.get("SPARSEKERN_OEQ_SITE")
    if site and site not in sys.path:
        sys.path.append(site)
    if "openequivariance" not in sys.modules:  # its import waits for a build in progress (run_gpu.sh's)
        from torch.utils.cpp_extension import _get_build_directory

        lock, t0 = Path(_get_build_directory("libtorch_tp_jit", False)) / "lock", time.time()
        while lock.exists() and time.time() - t0 < OEQ_BUILD_WAIT_S:
            time.sleep(1)
        if lock.exists():
            return f"n/a (OpenEquivariance's extension still building after {OEQ_BUILD_WAIT_S} s)"
    try:
        import openequivariance as oeq
    except Exception as exc:  # not installed, or its extension failed to build
        return f"n/a ({type(exc).__name__}: {exc})"[:300]
    try:
        problem = oeq.TPProblem(tp.irreps_in1, tp.irreps_in2, tp.irreps_out,
                                [tuple(i)[:5] for i in tp.instructions], shared_weights=False,
                                internal_weights=False, irrep_dtype=oeq.torch_to_oeq_dtype(torch.float32),
                                weight_dtype=oeq.torch_to_oeq_dtype(torch.float32))
        return oeq.TensorProductConv(problem, deterministic=False).to(dev)
    except Exception as exc:
        return f"n/a ({type(exc).__name__}: {exc})"[:300]


def cueq_backend(dev, run: Callable, ins: tuple) -> Backend:
    """sparsekern's cuEquivariance back end (``run``), or why it cannot run here."""
    if not registry.BACKENDS["cueq"].available(torch.device(dev)):
        return "n/a (cuequivariance_torch is not installed)"
    return run, ins


def conv_case(model, li: int, n_nodes: int, n_edges: int, dev, keep=None) -> OpCase:
    """``keep``: the back ends wanted (None: all); other libraries' fused convs are built
    only when wanted (OpenEquivariance's compiles its extension on first build)."""
    from sparsekern.ops.triton.conv import conv as triton_conv

    g = torch.Generator(device=dev).manual_seed(li)
    # neighbour-list order: edges grouped by sender, receivers random
    sender = torch.arange(n_nodes, device=dev).repeat_interleave(max(1, n_edges // n_nodes))
    receiver = torch.randint(0, n_nodes, (sender.numel(),), device=dev, generator=g)
    edge_index = torch.stack([sender, receiver])
    # the same edges listed by receiver, the order the forward walks them: its w and b rows
    # read in sequence instead of scattered (and the backward's, by sender, scattered)
    perm = torch.argsort(receiver, stable=True)
    by_receiver = edge_index[:, perm]
    e = edge_index.shape[1]
    tp = model.interactions[li].conv_tp
    conv = ChannelwiseConv.from_e3nn(tp)
    x = torch.randn(n_nodes, conv.irreps_in1.dim, device=dev, generator=g)
    sh = torch.randn(e, conv.irreps_in2.dim, device=dev, generator=g)
    w = torch.randn(e, conv.weight_numel, device=dev, generator=g)
    half = [t % 2 == 0 for t in range(len(conv.desc.paths))]

    def e3nn_conv(a, b, c):
        return torch.zeros(a.shape[0], tp.irreps_out.dim, device=a.device, dtype=a.dtype).index_add(
            0, edge_index[1], tp(a[edge_index[0]], b, c))

    ins = (x, sh, w)
    backends: Dict[str, Backend] = {
        "e3nn": (e3nn_conv, ins),
        "torch": (lambda a, b, c: conv(a, b, c, edge_index), ins),
        "triton": (lambda a, b, c: triton_conv(conv.desc, a, b, c, edge_index), ins),
        "triton_half_paths": (lambda a, b, c: triton_conv(conv.desc, a, b, c, edge_index, path_mask=half), ins),
        "triton_by_receiver": (lambda a, b, c: triton_conv(conv.desc, a, b, c, by_receiver), (x, sh[perm], w[perm])),
    }
    backends["cueq"] = cueq_backend(dev, lambda a, b, c: registry.implementation("conv", "cueq")(
        conv.desc, a, b, c, edge_index), ins)
    if keep is None or "cueq_fused" in keep:
        cueq = cueq_fused_conv(tp, dev)
        backends["cueq_fused"] = cueq if isinstance(cueq, str) else (lambda a, b, c: cueq(a, b, c, edge_index), ins)
    if keep is None or "oeq_fused" in keep:
        oeq = oeq_fused_conv(tp, dev)  # rows = receivers, cols = senders
        backends["oeq_fused"] = oeq if isinstance(oeq, str) else (
            lambda a, b, c: oeq(a, b, c, edge_index[1], edge_index[0]), ins)
    return OpCase(f"conv{li}", backends, MODES, conv_floor(conv, n_nodes, e),
                  ("e3nn", "triton", "triton_by_receiver", "cueq", "cueq_fused", "oeq_fused"))


def conv_floor(conv, n_nodes: int, n_edges: int, itemsize: int = 4) -> Dict[str, float]:
    """Forward: per-edge weights, edge attributes and the edge index read once, node
    features read and output written once (gathers and scatters hit the cache); FLOPs: a
    multiply-add per nonzero Clebsch-Gordan entry, weight product and scatter-add, per
    edge, path and channel."""
    nbytes = (itemsize * (n_edges * (conv.weight_numel + conv.irreps_in2.dim)
                          + n_nodes * (conv.irreps_in1.dim + conv.irreps_out.dim)) + 8 * 2 * n_edges)
    flops = 0
    for p in conv.desc.paths:
        l1, l2, lo = conv.desc.ls(p)
        nnz = int(conv.desc.cg(l1, l2, lo).ne(0).sum())
        flops += n_edges * p.mul_in * (2 * nnz + 2 * (2 * lo + 1))
    return {"bytes": float(nbytes), "flops": float(flops)}


def linear_floor(layer, n_nodes: int, weight_sets: int, itemsize: int = 4) -> Dict[str, float]:
    """Irrep or element linear: x read and y written once, ``weight_sets`` copies of the
    path weights (the elements present) once; a multiply-add per weight, node and irrep
    component."""
    weights = sum(p.mul_in * p.mul_out for p in layer.desc.paths)
    flops = 2 * n_nodes * sum(p.mul_in * p.mul_out * layer.irreps_in[p.i_in].ir.dim for p in layer.desc.paths)
    return {"bytes": float(itemsize * (n_nodes * (layer.irreps_in.dim + layer.irreps_out.dim) + weight_sets * weights)),
            "flops": float(flops)}


def skip_tp_case(model, li: int, n_nodes: int, n_edges: int, dev) -> OpCase:
    from sparsekern.ops.triton.element_linear import ElementRows, grouped_linear

    g = torch.Generator(device=dev).manual_seed(10 + li)
    fctp = model.interactions[li].skip_tp
    layer = ElementLinear.from_e3nn(fctp)
    species = _species(n_nodes, layer.num_elements, dev, g)
    x = torch.randn(n_nodes, layer.irreps_in.dim, device=dev, generator=g)
    one_hot = torch.nn.functional.one_hot(species, layer.num_elements).float()
    slot, vals = random_blocks(layer.desc, dev, g)

    def with_delta(a, v):
        plan = ElementRows.build(species, layer.num_elements)
        return grouped_linear(a, plan, layer.desc, layer.weight, (slot, v))

    def plain(a):
        return grouped_linear(a, ElementRows.build(species, layer.num_elements), layer.desc, layer.weight)

    backends: Dict[str, Backend] = {
        "e3nn": (lambda a: fctp(a, one_hot), (x,)),
        "torch": (lambda a: layer(a, one_hot), (x,)),
        "triton": (plain, (x,)),
        "triton_delta3pct": (_frozen(layer.weight, with_delta), (x, vals)),
    }
    return OpCase(f"skip_tp{li}", backends, MODES[:2], linear_floor(layer, n_nodes, N_PRESENT))


def linear_case(model, li: int, n_nodes: int, n_edges: int, dev) -> OpCase:
    """The irrep linear after the conv (10 paths into 4 outputs in layer 1)."""
    from sparsekern.ops.triton.element_linear import ElementRows, grouped_linear

    g = torch.Generator(device=dev).manual_seed(20 + li)
    lin = model.interactions[li].linear
    layer = IrrepsLinear.from_e3nn(lin)
    x = torch.randn(n_nodes, layer.irreps_in.dim, device=dev, generator=g)
    slot, vals = random_blocks(layer.desc, dev, g)

    def with_delta(a, v):
        return grouped_linear(a, ElementRows.in_order(a.shape[0]), layer.desc, layer.weight, (slot, v))

    def backend(name):
        def run(a):
            layer.backend = name
            return layer(a)
        return run

    backends: Dict[str, Backend] = {
        "e3nn": (lin, (x,)),
        "torch": (backend("torch"), (x,)),
        "triton": (backend("triton"), (x,)),
        "triton_delta3pct": (_frozen(layer.weight, with_delta), (x, vals)),
    }
    return OpCase(f"linear{li}", backends, MODES[:2], linear_floor(layer, n_nodes, 1))


def products_case(model, li: int, n_nodes: int, n_edges: int, dev) -> OpCase:
    """The symmetric contraction on each back end."""
    g = torch.Generator(device=dev).manual_seed(30 + li)
    sc = model.products[li].symmetric_contractions
    layer = SymmetricContraction.from_e3nn(sc)
    species = _species(n_nodes, layer.num_elements, dev, g)
    one_hot = torch.nn.functional.one_hot(species, layer.num_elements).float()
    x = torch.randn(n_nodes, layer.num_features, layer.desc.coupling_dim, device=dev, generator=g)

    def backend(name):
        def run(a):
            layer.backend = name
            return layer(a, one_hot)
        return run

    backends: Dict[str, Backend] = {"e3nn": (lambda a: sc(a, one_hot), (x,)), "torch": (backend("torch"), (x,)),
                                    "triton": (backend("triton"), (x,)),
                                    "cueq": cueq_backend(dev, backend("cueq"), (x,))}
    return OpCase(f"products{li}", backends, MODES, products_floor(layer, n_nodes), ("e3nn", "triton", "cueq"))


def products_floor(layer, n_nodes: int, itemsize: int = 4) -> Dict[str, float]:
    """x read and y written once, the present elements' weights once; FLOPs: with the
    weights folded per element (sum over k), a multiply-add per nonzero of U_nu over
    (output component, sorted index tuple) per node and channel (the monomials' own
    products, fewer, are left out)."""
    d, terms = layer.desc.coupling_dim, 0
    for us in layer.desc.u:
        for nu, u in enumerate(us, start=1):
            m = u.shape[0] if u.dim() == nu + 2 else 1
            support = u.reshape(m, *([d] * nu), u.shape[-1]).ne(0).any(-1).nonzero()  # (m, i_1..i_nu)
            # one monomial per sorted tuple: permutations of the indices merge
            terms += len({(row[0], *sorted(row[1:])) for row in support.tolist()})
    n_weights = sum(w.numel() for name, w in layer.named_parameters()) // layer.num_elements * N_PRESENT
    return {"bytes": float(itemsize * (n_nodes * layer.num_features * d
                                       + n_nodes * layer.irreps_out.dim + n_weights)),
            "flops": float(2 * n_nodes * layer.num_features * terms)}


def op_floor(op: str, model, n_nodes: int, n_edges: int) -> Dict[str, float]:
    """The forward floor of ``op`` alone (no tensors built): for NOTES.md and --floors."""
    name, li = op[:-1], int(op[-1])
    if name == "conv":
        return conv_floor(ChannelwiseConv.from_e3nn(model.interactions[li].conv_tp), n_nodes, n_edges)
    if name == "skip_tp":
        return linear_floor(ElementLinear.from_e3nn(model.interactions[li].skip_tp), n_nodes, N_PRESENT)
    if name == "linear":
        return linear_floor(IrrepsLinear.from_e3nn(model.interactions[li].linear), n_nodes, 1)
    return products_floor(SymmetricContraction.from_e3nn(model.products[li].symmetric_contractions), n_nodes)


BUILDERS = {"conv": conv_case, "skip_tp": skip_tp_case, "linear": linear_case, "products": products_case}


def build_case(op: str, model, n_nodes: int, n_edges: int, dev, keep=None) -> OpCase:
    """``op`` is one of OPS (name + interaction index); ``keep``: the back ends to time
    (None: all)."""
    name, li = op[:-1], int(op[-1])
    case = BUILDERS[name](model, li, n_nodes, n_edges, dev, **({"keep": keep} if name == "conv" else {}))
    assert set(case.backends) <= set(BACKENDS), f"{op}: back ends missing from BACKENDS"
    case.reference_run = case.backends.get(case.reference)  # parity without timing it
    if keep is not None:
        case.backends = {k: v for k, v in case.backends.items() if k in keep}
    return case


def parity_errors(case: OpCase) -> Dict[str, Union[float, str]]:
    """max |a - b| / max |b| of each parity back end's forward output ``a`` against the
    reference's ``b`` (those that run here; an error, as its text, for one that fails)."""
    ref = case.reference_run
    if ref is None or isinstance(ref, str):
        return {}
    with torch.no_grad():
        b = ref[0](*ref[1])
        errors: Dict[str, Union[float, str]] = {}
        for name in case.parity:
            run = case.backends.get(name)
            if run is None or isinstance(run, str):
                continue
            try:
                errors[name] = ((run[0](*run[1]) - b).abs().max() / b.abs().max()).item()
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    return errors
