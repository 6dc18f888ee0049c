"""What every sparsekern layer shares: a descriptor built once from the module it
replaces, the back end its op runs on (chosen by the op registry), input checks, and the
way back to the module it replaced."""

from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence

import torch
from torch.autograd import forward_ad

from .. import delta_slot
from ..ops import registry
from ..ops.grads import needed, track
from ..ops.tensor_cache import cached, derived
from ..paths import WeightGroup


class SparsekernLayer(torch.nn.Module):
    """Base class. Subclasses keep the parameter names and shapes of the module they
    replace, so optimizers, ``named_parameters`` and checkpoints see no change. Each
    computes one op (``op``, a name in ``registry.OPS``) on its descriptor ``desc``."""

    op: str = ""
    sized: Optional[registry.Sized] = None  # auto's back end by the call's atoms (see use_backend)
    requested_backend = "torch"  # what use_backend was asked for ("auto" or a name)
    resolved_on: Optional[str] = None  # the device type it resolved that for

    def __prepare_scriptable__(self):
        """``torch.jit.script`` asks this first: say why, rather than fail deep in its parser."""
        raise TypeError(f"{type(self).__name__}: sparsekern layers are not TorchScript; script the model "
                        "unpatched (sparsekern.unpatch(model), after merging any delta)")

    def __init__(self) -> None:
        super().__init__()
        self.backend = "torch"
        self.desc = None
        # The module this layer replaced, kept unregistered (its parameters are ours).
        self._replaced = None

    def __setattr__(self, name: str, value) -> None:
        if name == "_replaced":  # not a submodule: no second copy in state dicts, module walks
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        # the replaced module follows the layer's moves and casts (``.to``, ``.double()``):
        # its constants are what unpatch gives back and its ``output_mask`` what models read
        super()._apply(fn, recurse)
        if self._replaced is not None:
            self._replaced._apply(fn)  # (our shared parameters are converted already: a no-op for them)
        return self

    @property
    def output_mask(self) -> torch.Tensor:
        """The replaced e3nn module's ``output_mask`` (the output components a path
        reaches), which models read (e3nn's ``gate_points`` networks)."""
        return self._replaced.output_mask

    def _state_of_replaced(self, prefix: str) -> dict:
        """The replaced module's state entries this layer (and its submodules) does not
        hold: e3nn's ``output_mask``, an empty ``bias``, constants of the architecture."""
        if self._replaced is None:
            return {}
        ours = {name for name, _ in [*self.named_parameters(), *self.named_buffers()]}
        return {prefix + k: v for k, v in self._replaced.state_dict(keep_vars=True).items() if k not in ours}

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # with the replaced module's keys too, a state dict is the unpatched model's:
        # MACE and patched models load each other's strictly
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self._state_of_replaced(prefix).items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # (state_dict is load_state_dict's copy) the replaced module's constants are
        # loaded into it; checkpoints from before it was unregistered hold all of it
        # under "_replaced.", the same tensors again: dropped
        error_msgs = args[-1]
        for key, value in self._state_of_replaced(prefix).items():
            new = state_dict.pop(key, state_dict.get(prefix + "_replaced." + key[len(prefix):]))
            if new is not None and new.shape != value.shape:
                error_msgs.append(f"size mismatch for {key}: copying a tensor of shape {tuple(new.shape)}, "
                                  f"the model's is {tuple(value.shape)}")
            elif new is not None:
                with torch.no_grad():
                    value.copy_(new)
        for key in [k for k in state_dict if k.startswith(prefix + "_replaced.")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args)

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module) -> Optional[str]:
        """Why ``module`` cannot be replaced by this layer, or None."""
        return None

    @classmethod
    def from_e3nn(cls, module: torch.nn.Module):
        """The layer that replaces ``module`` (an e3nn or MACE module), sharing its parameters."""
        reason = cls.unsupported_reason(module)
        if reason:
            raise ValueError(f"cannot replace {module}: {reason}")
        self = cls.__new__(cls)
        SparsekernLayer.__init__(self)
        self._init_from(module)
        return self

    def _init_from(self, module: torch.nn.Module) -> None:
        raise NotImplementedError

    def weight_groups(self) -> List[WeightGroup]:
        """The path weights of this layer that a sparse delta may change."""
        return self.desc.weight_groups()

    def set_backend(self, backend: str) -> "SparsekernLayer":
        if backend not in registry.BACKENDS or self.op not in registry.BACKENDS[backend].ops:
            implemented = tuple(name for name, b in registry.BACKENDS.items() if self.op in b.ops)
            raise ValueError(f"{type(self).__name__} has no {backend!r} back end; it implements {implemented}")
        registry.implementation(self.op, backend)  # imported now, not in a forward torch.compile traces
        self.backend, self.requested_backend, self.sized = backend, backend, None
        return self

    def use_backend(self, backend: str, device: torch.device) -> "SparsekernLayer":
        """Run on what the registry resolves ``backend`` ("auto" or a name) to on ``device``:
        where auto's table has an order per number of atoms, the choice for each call's;
        "auto" is resolved again for a call on another device type (a model patched on the
        CPU, then moved to a GPU)."""
        sized = registry.by_atoms(backend, self.op, device)
        for name in () if sized is None else sized.names:
            self.set_backend(name)  # checked, and imported now
        self.set_backend(registry.resolve(backend, self.op, device)).sized = sized
        # (an op beside this layer's, an element-resolved delta's, resolves it too)
        self.requested_backend, self.resolved_on = backend, torch.device(device).type
        return self

    def _run(self, *args):
        if registry.per_device(self.requested_backend) and args[0].device.type != self.resolved_on:
            self.use_backend(self.requested_backend, args[0].device)
        backend = self.backend if self.sized is None else self.sized(args[0].shape[0])  # a host-side shape
        with on_its_device(args[0]):
            return registry.implementation(self.op, backend)(self.desc, *args)

    def _weight(self, name: str) -> torch.Tensor:
        """Parameter ``name`` (dotted), also where ``torch.func.functional_call`` swapped in
        a plain tensor (which ``get_parameter`` refuses)."""
        module = self
        for part in name.split("."):
            module = getattr(module, part)
        return module

    def _delta(self, param: str) -> Optional[torch.Tensor]:
        """The flat delta of ``param`` (or None); computed once while the delta is frozen
        and unchanged (an adapter loaded for inference), not at every call."""
        delta = delta_slot.active(self, param)
        return None if delta is None else derived([*delta.parameters(), *delta.buffers()], "value", delta)

    def _check_features(self, x: torch.Tensor, dim: int, what: str, irreps) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"{type(self).__name__}: {what} must be a tensor, got {type(x).__name__}")
        if x.shape[-1] != dim:
            raise ValueError(
                f"{type(self).__name__}: {what} has last dimension {x.shape[-1]}, "
                f"but its irreps {irreps} have dimension {dim}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: {what} must be floating point, got {x.dtype}")

    def _check_same(self, ref: torch.Tensor, other: torch.Tensor, what: str) -> None:
        if other.dtype != ref.dtype:
            raise TypeError(f"{type(self).__name__}: {what} has dtype {other.dtype}, expected {ref.dtype}")
        if other.device != ref.device:
            raise ValueError(f"{type(self).__name__}: {what} is on {other.device}, expected {ref.device}")

    def _by_element(self, run, x: torch.Tensor, node_attrs: torch.Tensor, num_elements: int,
                    params: Sequence[torch.Tensor]) -> torch.Tensor:
        """``run(x, species)``: the op of each node's element (one-hot attributes), reading
        the tensors ``params`` (its weights, as this call has them). The per-element ops
        hold the attributes constant; where they need a gradient (eager), a zero is added
        whose gradient is e3nn's, computed only by a pass that asks for it (MACE marks them
        in its compile route and dipole models, and never asks)."""
        y = run(x, self._species(node_attrs, num_elements))
        if torch.compiler.is_compiling():
            return y
        if node_attrs.requires_grad and torch.is_grad_enabled():
            y = y + _AttributesGradient.apply(node_attrs, y, run, x, *params)
        primal, tangent = forward_ad.unpack_dual(node_attrs)
        if tangent is not None:  # forward mode (torch.func.jvp, jacfwd): a zero whose tangent is e3nn's
            every = _every_output(run, x, num_elements)
            y = y + torch.einsum("nz,nzk->nk", node_attrs - primal, every).reshape(y.shape)
        return y

    def _check_attrs(self, node_attrs: torch.Tensor, num_elements: int) -> None:
        if node_attrs.dim() != 2 or node_attrs.shape[1] != num_elements:
            raise ValueError(f"{type(self).__name__}: node_attrs must have shape (num_nodes, {num_elements}), "
                             f"got {tuple(node_attrs.shape)}")

    def _species(self, node_attrs: torch.Tensor, num_elements: int) -> torch.Tensor:
        """Element index per node; refuses attributes that are not one-hot, since the
        per-element ops would silently differ from e3nn's product with them."""
        name = type(self).__name__
        self._check_attrs(node_attrs, num_elements)

        def checked():
            if not torch.compiler.is_compiling() and node_attrs.shape[0]:
                ones = node_attrs.sum(-1) == 1
                binary = ((node_attrs == 0) | (node_attrs == 1)).all(-1)
                refuse_unless((ones & binary).all(), f"{name}: node_attrs must be one-hot (one 1 per row, zeros "
                                                     f"elsewhere)")
            return node_attrs.argmax(-1)

        # once per graph: every layer (and the per-element ops' plans, kept with the
        # species tensor) shares it
        return cached(node_attrs, ("species", num_elements), checked)

    def extra_repr(self) -> str:
        return f"backend={self.backend_name}"

    @property
    def backend_name(self) -> str:
        """The back end it runs on, as said to people (by the atoms where auto's table says so)."""
        return self.backend if self.sized is None else str(self.sized)

    def to_replaced(self) -> torch.nn.Module:
        """The original module, holding this layer's current parameters."""
        if self._replaced is None:
            raise RuntimeError(f"{type(self).__name__} was not built from an existing module")
        orig = self._replaced
        for name, param in self.named_parameters():
            if not delta_slot.is_delta_parameter(name):
                set_parameter(orig, name, param)
        ref = next(self.parameters(), None)
        if ref is not None:
            orig.to(device=ref.device)
            match_float_dtype(orig, ref.dtype)
        return orig


class _AttributesGradient(torch.autograd.Function):
    """Zero, shaped as ``like``, whose gradient with respect to the one-hot node
    attributes is e3nn's (its products are linear in them): d y[n] / d attrs[n, z] =
    run(x[n], z), the node's output had it been element z, every element computed by one
    ``run`` on x repeated. Computed only where the running pass uses it; with
    ``create_graph`` it is differentiable in x and the weights, and the gradients of x and
    of the tensors ``run`` reads get zeros of their own whose gradients with respect to the
    attributes are e3nn's (:class:`_AttributesGradientOf`: d(forces)/d(attrs) among them)."""

    @staticmethod
    def forward(attrs, like, run, x, *params):
        return torch.zeros_like(like)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # (apart from forward: torch.func's transforms need it)
        attrs, _, run, *tensors = inputs
        track(ctx, *inputs)
        ctx.run = run
        ctx.save_for_backward(attrs, *tensors)

    @staticmethod
    def backward(ctx, grad):
        attrs, x, *params = ctx.saved_tensors
        create = torch.is_grad_enabled()  # create_graph: the inputs' gradients may be differentiated
        inputs = [_AttributesGradientOf.apply(attrs, grad, ctx.run, i, x, *params) if create and needed(ctx, 3 + i)
                  else None for i in range(1 + len(params))]
        if not needed(ctx, 0):
            return None, None, None, *inputs
        y = _every_output(ctx.run, x, attrs.shape[1])
        return torch.einsum("nzk,nk->nz", y, grad.reshape(y.shape[0], y.shape[2])).to(attrs.dtype), None, None, *inputs


class _AttributesGradientOf(torch.autograd.Function):
    """Zero, shaped as input ``i`` of the op (x, then the tensors ``run`` reads), added to
    that input's gradient (``grad`` the output's) by :class:`_AttributesGradient`: its
    gradient with respect to the attributes is e3nn's, d(the input's gradient)/d attrs[n, z]
    = node n's part of the gradient had it been element z. Computed only where the running
    pass uses it, every element by one ``run``: for x, its gradient row by row; for a weight
    (summed over the rows), the product of each row's derivative with the incoming gradient,
    by differentiating the rows' vector-Jacobian product once more."""

    @staticmethod
    def forward(attrs, grad, run, i, x, *params):
        return torch.zeros_like((x, *params)[i])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        attrs, grad, run, i, *tensors = inputs
        track(ctx, *inputs)
        ctx.run, ctx.i = run, i
        ctx.save_for_backward(attrs, grad, *tensors)

    @staticmethod
    def backward(ctx, w):
        attrs, grad, x, *params = ctx.saved_tensors
        none = (None,) * (5 + len(params))
        if not needed(ctx, 0):
            return none
        target = (x, *params)[ctx.i]
        if not target.requires_grad:  # (its gradient was asked for: a torch.func transform's tensor)
            raise NotImplementedError("a gradient differentiated by the node attributes under torch.func: not "
                                      "supported (torch.autograd.grad computes it)")
        (n, elements), create = attrs.shape, torch.is_grad_enabled()
        with torch.enable_grad():
            xs, every = _every_element(x, elements)
            y = ctx.run(xs, every)
            g = grad.repeat_interleave(elements, 0).reshape(y.shape)
            if ctx.i == 0:  # x's rows are the nodes': their gradients apart
                rows, = torch.autograd.grad(y, xs, g, create_graph=create)
                part = rows.reshape(n, elements, -1) * w.reshape(n, 1, -1)
            else:  # d/du <J^T u, w> = J w, row by row, then against g
                u = torch.zeros_like(y, requires_grad=True)
                vjp, = torch.autograd.grad(y, target, u, create_graph=True)
                jvp, = torch.autograd.grad((vjp * w).sum(), u, create_graph=create)
                part = (jvp * g).reshape(n, elements, -1)
        return (part.sum(-1).to(attrs.dtype),) + none[1:]


def _every_element(x: torch.Tensor, elements: int):
    """x's rows repeated for every element, and the elements: a run gives each node's
    output had it been each element."""
    return x.repeat_interleave(elements, 0), torch.arange(elements, device=x.device).repeat(x.shape[0])


def _every_output(run, x: torch.Tensor, elements: int) -> torch.Tensor:
    """(nodes, elements, outputs): each node's output had it been each element, one ``run``."""
    out = run(*_every_element(x, elements))
    return out.reshape(x.shape[0], elements, math.prod(out.shape[1:]))  # (also without nodes)


def on_its_device(t: torch.Tensor):
    """``t``'s CUDA device made the current one for a call where another is: Triton launches
    on the current device (its ``runtime/jit.py`` reads ``get_current_device()``), not on
    the tensors' (torch's own ops guard their device), so a model on ``cuda:1`` with device
    0 current would launch there. Backward passes run on autograd's thread of the device."""
    if t.device.type == "cuda" and not torch.compiler.is_compiling() and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def refuse_unless(ok: torch.Tensor, message: str) -> None:
    """A ValueError of ``message`` unless ``ok`` (a 0-d bool tensor) holds; on a device,
    checked there (a device-side assert: no host sync per layer)."""
    if ok.device.type != "cpu":
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def set_parameter(module: torch.nn.Module, path: str, param: torch.nn.Parameter) -> None:
    """Register ``param`` under the dotted ``path`` inside ``module``."""
    *parents, leaf = path.split(".")
    for p in parents:
        module = getattr(module, p)
    module.register_parameter(leaf, param)  # also for ParameterList ("0", "1", ...)


def match_float_dtype(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Bring floating buffers (e.g. Clebsch-Gordan constants) and parameters to ``dtype``."""
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                sub._buffers[name] = buf.to(dtype)
        for p in sub._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
