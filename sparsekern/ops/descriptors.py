"""Descriptors: what an op needs to know about a layer, built once by the layer (irreps,
the path list with its Clebsch-Gordan or U tables, the weight layout, and the integers
of the irreps that forwards read, ``Blocks``). Ops are functions of a descriptor and
tensors and never see the layer. Each descriptor caches the constants its back ends
derive from it, per device and dtype, outside any state dict."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from e3nn import o3

from ..paths import Blocks, OutputSlots, Path, WeightGroup, split_segments


_LIVE: "weakref.WeakValueDictionary[int, Descriptor]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


class Descriptor:
    """Base: a cache of derived constants (rebuilt after unpickling or copying), and a
    key unique in the process (a copy gets its own), by which an op opaque to
    torch.compile, whose schema holds no Python objects, finds its descriptor
    (``ops/torch/opaque.py``)."""

    _cache: Dict[tuple, object]
    key: int

    def __new__(cls, *args, **kwargs):  # also where unpickling and copying start
        self = super().__new__(cls)
        self.key = next(_KEYS)
        _LIVE[self.key] = self
        return self

    @staticmethod
    def by_key(key: int) -> "Descriptor":
        return _LIVE[key]

    def const(self, name: str, like: torch.Tensor, build: Callable[[], object]):
        """``build()`` moved to ``like``'s device (floating tensors to its dtype), once per
        (name, device, dtype)."""
        key = (name, like.device, like.dtype)
        value = self._cache.get(key)
        if value is None:
            with torch.inference_mode(False):  # (kept for calls that may record autograd)
                value = self._cache[key] = _to(build(), like)
        return value

    def weight_groups(self) -> List[WeightGroup]:
        """The internal weights a delta may change (none: weights come per edge)."""
        return []

    def __getstate__(self):
        state = {**self.__dict__, "_cache": {}}
        del state["key"]  # the copy keeps the key its __new__ gave it
        return state


def _to(value, like: torch.Tensor):
    if torch.is_tensor(value):
        return value.to(device=like.device, dtype=like.dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(_to(v, like) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, like) for v in value)
    return value


@dataclass(eq=False)
class LinearDesc(Descriptor):
    """A linear map block-diagonal over irreps (``o3.Linear``, ``num_elements`` = 1, weight
    layout "grc"), or one per element of a one-hot attribute (e3nn's
    ``FullyConnectedTensorProduct(x, one_hot)``, layout "rgc": each path's flat block is
    (mul_in, n_el, mul_out)). Biases: (output block, offset in the bias) pairs."""

    irreps_in: o3.Irreps
    irreps_out: o3.Irreps
    paths: Tuple[Path, ...]
    num_elements: int
    layout: str
    weight_numel: int
    bias_paths: Tuple[Tuple[int, int], ...] = ()
    _cache: Dict[tuple, object] = field(default_factory=dict, repr=False)
    blocks_in: Blocks = field(init=False, repr=False)
    blocks_out: Blocks = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.blocks_in, self.blocks_out = Blocks.of(self.irreps_in), Blocks.of(self.irreps_out)

    def path_weights(self, weight: torch.Tensor) -> List[torch.Tensor]:
        """The (n_el, mul_in, mul_out) block of each path."""
        n_el = self.num_elements
        pieces = split_segments(weight, [(p.weight_offset, p.mul_in * n_el * p.mul_out) for p in self.paths])
        if self.layout == "grc":
            return [w.view(n_el, p.mul_in, p.mul_out) for w, p in zip(pieces, self.paths)]
        return [w.view(p.mul_in, n_el, p.mul_out).transpose(0, 1) for w, p in zip(pieces, self.paths)]

    def add_biases(self, bias: Optional[torch.Tensor], out: OutputSlots, n: int) -> None:
        """Add each bias block to its output irrep (broadcast over the n rows)."""
        if self.bias_paths:
            segments = [(offset, self.blocks_out.sizes[i_out]) for i_out, offset in self.bias_paths]
            for (i_out, _), b in zip(self.bias_paths, split_segments(bias, segments)):
                out.add(i_out, b.expand(n, b.shape[0]))

    def per_element(self, num_elements: int) -> "LinearDesc":
        """The element-indexed linear with this one's paths, one matrix per element for
        each (layout "rgc", no biases): what an element-resolved delta of this shared
        linear's weight is, so the element linear's op applies it."""
        if self.num_elements != 1:
            raise ValueError("LinearDesc.per_element: the linear is element-indexed already")
        return self.const(("per_element", num_elements), torch.empty(0), lambda: LinearDesc(
            self.irreps_in, self.irreps_out,
            tuple(p._replace(weight_offset=p.weight_offset * num_elements) for p in self.paths),
            num_elements, "rgc", self.weight_numel * num_elements))

    def weight_groups(self) -> List[WeightGroup]:
        per_element = self.layout == "rgc"
        return [WeightGroup("weight", p.weight_offset, (self.num_elements, p.mul_in, p.mul_out), self.layout,
                            f"{self.irreps_in[p.i_in]}->{self.irreps_out[p.i_out]}",
                            self.irreps_in[p.i_in].ir.l, per_element) for p in self.paths]


@dataclass(eq=False)
class TPDesc(Descriptor):
    """A channelwise ('uvu') tensor product with per-edge weights: per path, out[u, k] =
    scale * w[u] sum_ij C[i, j, k] x1[u, i] x2[j] (``mul_in`` = ``mul_out`` = channels).
    ``w3j``: the Wigner 3j blocks of the module it replaces, by (l1, l2, l_out)."""

    irreps_in1: o3.Irreps
    irreps_in2: o3.Irreps
    irreps_out: o3.Irreps
    paths: Tuple[Path, ...]
    weight_numel: int
    w3j: Dict[Tuple[int, int, int], torch.Tensor]
    _cache: Dict[tuple, object] = field(default_factory=dict, repr=False)
    blocks_in1: Blocks = field(init=False, repr=False)
    blocks_in2: Blocks = field(init=False, repr=False)
    blocks_out: Blocks = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.blocks_in1, self.blocks_in2, self.blocks_out = (
            Blocks.of(self.irreps_in1), Blocks.of(self.irreps_in2), Blocks.of(self.irreps_out))

    def cg(self, l1: int, l2: int, lo: int) -> torch.Tensor:
        """The coefficients e3nn itself uses: exact identities where its specialised code
        skips wigner_3j (an l = 0 operand), otherwise the module's own w3j buffer (a
        float32-built model moved to float64 keeps float32-rounded values)."""
        if 0 in (l1, l2, lo):
            d = 2 * max(l1, l2, lo) + 1
            eye = torch.eye(d, dtype=torch.float64) / d ** 0.5  # two of the three dims are d
            return eye.reshape(2 * l1 + 1, 2 * l2 + 1, 2 * lo + 1)
        w3j = self.w3j.get((l1, l2, lo))
        return w3j if w3j is not None else o3.wigner_3j(l1, l2, lo, dtype=torch.float64)

    def coefficients(self, p: Path) -> torch.Tensor:
        """The path's (d1, d2, d_out) table, scale * Clebsch-Gordan, in float64 on the CPU:
        what every back end multiplies by (each rounds it to its dtype once)."""
        return (p.scale * self.cg(*self.ls(p)).to(torch.float64)).cpu()

    def ls(self, p: Path) -> Tuple[int, int, int]:
        """The path's (l1, l2, l_out), from the blocks' dimensions 2l + 1."""
        return self.blocks_in1.dims[p.i_in] // 2, self.blocks_in2.dims[p.i_in2] // 2, self.blocks_out.dims[p.i_out] // 2


def is_silu(act) -> bool:
    """Whether ``act`` is e3nn's normalized SiLU (``normalize2mom`` wrapping it)."""
    f = getattr(act, "f", None)
    return f is torch.nn.functional.silu or isinstance(f, torch.nn.SiLU)


@dataclass(eq=False)
class RadialDesc(Descriptor):
    """e3nn's ``FullyConnectedNet``: per layer (activation or None, var_in, var_out)."""

    hs: Tuple[int, ...]
    layers: Tuple[Tuple[object, float, float], ...]
    _cache: Dict[tuple, object] = field(default_factory=dict, repr=False)

    def weight_groups(self) -> List[WeightGroup]:
        return [WeightGroup(f"layer{i}.weight", 0, (1, h_in, h_out), "grc", f"radial layer {i}", None, False)
                for i, (h_in, h_out) in enumerate(zip(self.hs, self.hs[1:]))]

    @property
    def silu_scales(self) -> Optional[Tuple[float, ...]]:
        """Where every hidden activation is e3nn's normalized SiLU, the one scale per layer
        that makes the network silu(...silu(x (s_0 W_0))...) (s_{L-1} W_{L-1}): e3nn's
        1 / sqrt(h_in var_in) times the previous layer's output factor cst sqrt(var_out)
        (and the last layer's var_out); None otherwise."""
        *hidden, (last_act, var_in, var_out) = self.layers
        if last_act is not None or not all(is_silu(act) for act, _, _ in hidden):
            return None  # (a hidden layer without an activation is linear: not silu's network)
        scales, k = [], 1.0
        for h_in, (act, h_var_in, h_var_out) in zip(self.hs, hidden):
            scales.append(k / (h_in * h_var_in) ** 0.5)
            k = (1.0 if act._is_id else act.cst) * h_var_out ** 0.5
        return (*scales, k / (self.hs[-2] * var_in / var_out) ** 0.5)


@dataclass(eq=False)
class CutoffDesc(Descriptor):
    """MACE's polynomial cutoff envelope of degree p in u = x / r_max,
    1 - (p+1)(p+2)/2 u^p + p(p+2) u^(p+1) - p(p+1)/2 u^(p+2), written
    1 + u^p (a + u (b + c u)): one power and a Horner polynomial, about half the ops of
    three powers with a tensor exponent (with their derivatives)."""

    p: int
    _cache: Dict[tuple, object] = field(default_factory=dict, repr=False)

    @property
    def horner(self) -> Tuple[float, float, float]:
        """(a, b, c)."""
        p = self.p
        return -(p + 1.0) * (p + 2.0) / 2.0, p * (p + 2.0), -p * (p + 1.0) / 2.0


@dataclass(eq=False)
class ReshapeDesc(Descriptor):
    """MACE's ``reshape_irreps``: flat features (N, sum of mul d) to (N, mul, sum of d)
    ('mul_ir', each block's (mul, d) side by side) or (N, sum of d, mul) ('ir_mul', the
    blocks stacked), every block of the same multiplicity ``mul``: one permutation of
    the columns, ``perm`` (None: the identity), then a view."""

    mul: int
    dims: Tuple[int, ...]
    ir_mul: bool
    _cache: Dict[tuple, object] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> Tuple[int, int]:
        return (sum(self.dims), self.mul) if self.ir_mul else (self.mul, sum(self.dims))

    @property
    def perm(self) -> Optional[torch.Tensor]:
        """Column u * sum(d) + (d's offset + m) of the output reads block l's column u d_l + m."""
        if self.ir_mul:  # each block (d, mul) as it is, stacked: the input's own order
            return None
        starts = list(itertools.accumulate((self.mul * d for d in self.dims), initial=0))
        return torch.tensor([start + u * d + m for u in range(self.mul)
                             for start, d in zip(starts, self.dims) for m in range(d)])


@dataclass(eq=False)
class GateDesc(Descriptor):
    """e3nn's ``Gate`` as column indices of its input: the scalars' and the gates' columns
    (``activated``, scalars first), activated in ``runs`` (start, length, activation or
    None: consecutive columns of one activation function and constant), and the gated
    components' columns (``gated``), each multiplied by the activated gate ``expand``
    names (an index into the activated columns). Output: the activated scalars, then
    the gated products, as e3nn's. ``spans``: per column selection, (first, count) where
    its columns are consecutive (read as a view), else None."""

    dim_in: int
    activated: Tuple[int, ...]
    runs: Tuple[Tuple[int, int, object], ...]
    num_scalars: int
    gated: Tuple[int, ...]
    expand: Tuple[int, ...]
    spans: Dict[str, Optional[Tuple[int, int]]] = field(default_factory=dict)
    _cache: Dict[tuple, object] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("activated", "gated"):
            cols = getattr(self, name)
            start = cols[0] if cols else 0
            self.spans[name] = (start, len(cols)) if cols == tuple(range(start, start + len(cols))) else None

    @classmethod
    def from_e3nn(cls, gate: torch.nn.Module) -> "GateDesc":
        cut = gate.sc.cut  # e3nn's Extract: the input's (sorted) irreps, three column selections
        starts = list(itertools.accumulate((ir.dim for ir in cut.irreps_in), initial=0))
        scalars, gates, gated = ([c for i in ins for c in range(starts[i], starts[i + 1])] for ins in cut.instructions)
        acts = [act for activation in (gate.act_scalars, gate.act_gates)
                for (mul, ir), act in zip(activation.irreps_in, activation.acts) for _ in range(mul * ir.dim)]
        runs: List[list] = []
        for col, act in enumerate(acts):
            if runs and _same_activation(runs[-1][2], act):
                runs[-1][1] += 1
            else:
                runs.append([col, 1, act])
        dims = [ir.dim for mul, ir in gate.sc.irreps_outs[2] for _ in range(mul)]  # gate k scales copy k
        expand = [len(scalars) + k for k, dim in enumerate(dims) for _ in range(dim)]
        return cls(cut.irreps_in.dim, tuple(scalars + gates), tuple(tuple(r) for r in runs), len(scalars),
                   tuple(gated), tuple(expand))


def _same_activation(a, b) -> bool:
    """e3nn wraps each irrep's activation in its own ``normalize2mom``: the same function
    and constant compute the same values."""
    if a is None or b is None:
        return a is b
    return a is b or (getattr(a, "f", None) is getattr(b, "f", 0) and a.cst == b.cst and a._is_id == b._is_id)


@dataclass(eq=False)
class SHDesc(Descriptor):
    """e3nn's ``SphericalHarmonics`` up to l = 3 as one product: the monomials of the
    (normalized) vector of degree 0..lmax (1, u_a, u_a u_b, u_a u_b u_c: 1 + 3 + 9 + 27
    columns up to degree 3) times ``coefficients`` ((monomials, output dim), float64,
    nonzero only where a column's degree is its l: fitted to e3nn's own polynomials)."""

    lmax: int
    normalize: bool
    coefficients: torch.Tensor
    _cache: Dict[tuple, object] = field(default_factory=dict, repr=False)

    MAX_L = 3

    @staticmethod
    def monomials(u: torch.Tensor, lmax: int) -> List[torch.Tensor]:
        """Per degree 0..lmax, the (n, 3**d) products of d components of the (n, 3) u."""
        out = [u.new_ones(u.shape[0], 1)]
        for _ in range(lmax):
            out.append((out[-1][:, :, None] * u[:, None, :]).reshape(u.shape[0], 3 * out[-1].shape[1]))  # 0 rows too
        return out

    @classmethod
    def from_e3nn(cls, sh: torch.nn.Module) -> "SHDesc":
        """Fitted in float64 to the same module without normalization (homogeneous
        polynomials: each l block from the degree-l monomials alone); refuses a fit that
        is not exact."""
        ls, lmax = list(sh._ls_list), max(sh._ls_list)
        plain = o3.SphericalHarmonics(ls, normalize=False, normalization=sh.normalization, irreps_in=sh.irreps_in)
        x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        values, mono = plain.to(torch.float64)(x), cls.monomials(x, lmax)
        starts = [sum(3 ** d for d in range(l)) for l in range(lmax + 2)]
        coefficients = torch.zeros(starts[-1], values.shape[1], dtype=torch.float64)
        col = 0
        for l in ls:
            block = values[:, col:col + 2 * l + 1]
            fit = torch.linalg.pinv(mono[l]) @ block
            if (mono[l] @ fit - block).abs().max() > 1e-12 * block.abs().max():
                raise ValueError(f"spherical harmonics of l = {l} are not degree-{l} polynomials here")
            coefficients[starts[l]:starts[l + 1], col:col + 2 * l + 1] = fit
            col += 2 * l + 1
        return cls(lmax, bool(sh.normalize), coefficients)


class MonomialTables(NamedTuple):
    """Kept monomials of each degree and U summed over index orderings.

    Degree nu >= 2 keeps the sorted tuples q where some output's U' is nonzero, closed
    under dropping the last index; monomial q is monomial q[:-1] (row ``parent`` of the
    previous degree) times x[q[-1]] (``last``). Degree 1 keeps every index."""

    parent: List[torch.Tensor]  # per degree 2.., (Q_nu,) rows in the previous degree
    last: List[torch.Tensor]  # per degree 2.., (Q_nu,) coupling index of the new factor
    tuples: List[torch.Tensor]  # per degree, (Q_nu, nu) the kept sorted index tuples
    u: List[List[torch.Tensor]]  # per output, per degree: U' (m, Q_nu, k)
    m: List[int]  # per output, its irrep dimension
    num_monomials: int


@dataclass(eq=False)
class ContractionDesc(Descriptor):
    """MACE's symmetric contraction: per output irrep j and degree nu = 1..correlation_j,
    out[c, m] += sum_k W_nu[z, k, c] U_nu[m, i_1..i_nu, k] x[c, i_1]..x[c, i_nu].
    ``u``: per output, per degree, U_nu in float64 (MACE's ``U_tensors(nu)``)."""

    irreps_in: o3.Irreps
    irreps_out: o3.Irreps
    num_features: int
    coupling_dim: int
    num_elements: int
    u: Tuple[Tuple[torch.Tensor, ...], ...]
    _cache: Dict[tuple, object] = field(default_factory=dict, repr=False)
    blocks_out: Blocks = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.blocks_out = Blocks.of(self.irreps_out)

    @property
    def correlations(self) -> List[int]:
        return [len(us) for us in self.u]

    def tables(self) -> MonomialTables:
        """U summed over the orderings of each index tuple, on kept monomials (CPU, float64)."""
        tables = self._cache.get(("monomials",))
        if tables is None:
            tables = self._cache[("monomials",)] = _monomial_tables(self.u, self.coupling_dim)
        return tables


def _monomial_tables(us_per_output, d: int) -> MonomialTables:
    correlation = max(len(us) for us in us_per_output)
    summed = []  # per output, per degree: (m, d^nu, k), indexed by the sorted tuple's key
    for us in us_per_output:
        per_degree = []
        for nu, u in enumerate(us, start=1):
            m = u.shape[0] if u.dim() == nu + 2 else 1  # U_nu is (m, i.., k), or (i.., k) for l = 0
            u = u.reshape(m, d ** nu, u.shape[-1])
            per_degree.append(torch.zeros_like(u).index_add_(1, _sorted_key(nu, d), u))
        summed.append(per_degree)
    # keys of the kept tuples, from the highest degree down (closure under prefixes)
    keys: List[torch.Tensor] = [torch.arange(d)]
    needed = None
    for nu in range(correlation, 1, -1):
        nonzero = torch.zeros(d ** nu, dtype=torch.bool)
        for per_degree in summed:
            if len(per_degree) >= nu:
                nonzero |= per_degree[nu - 1].ne(0).any(2).any(0)
        here = torch.nonzero(nonzero).flatten()
        if needed is not None:
            here = torch.unique(torch.cat([here, needed]))
        keys.insert(1, here)
        needed = here // d
    parent = [torch.searchsorted(keys[nu - 1], keys[nu] // d) for nu in range(1, correlation)]
    last = [keys[nu] % d for nu in range(1, correlation)]
    u = [[per_degree[nu - 1][:, keys[nu - 1], :] if nu <= len(per_degree)
          else per_degree[0].new_zeros(per_degree[0].shape[0], len(keys[nu - 1]), 0)
          for nu in range(1, correlation + 1)] for per_degree in summed]
    tuples = [torch.stack([key // d ** (nu - 1 - j) % d for j in range(nu)], 1)
              for nu, key in enumerate(keys, start=1)]
    return MonomialTables(parent, last, tuples, u, [per_degree[0].shape[0] for per_degree in summed],
                          sum(len(k) for k in keys))


def _sorted_key(nu: int, d: int) -> torch.Tensor:
    """For each ordered tuple (i_1..i_nu) in row-major order, the base-d number of its
    sorted digits (i_1 <= .. <= i_nu, i_1 most significant)."""
    digits = torch.stack(torch.meshgrid(*[torch.arange(d)] * nu, indexing="ij"), -1).reshape(-1, nu)
    weights = d ** torch.arange(nu - 1, -1, -1)
    return (digits.sort(1).values * weights).sum(1)
