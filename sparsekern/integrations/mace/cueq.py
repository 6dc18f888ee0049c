"""MACE models converted to cuequivariance (``mace.cli.convert_e3nn_cueq``, or
``MACECalculator(enable_cueq=True)``) hold cuequivariance_torch modules (cuet.Linear,
cuet.ChannelWiseTensorProduct or a conv-fused cuet.SegmentedPolynomial,
cuet.FullyConnectedTensorProduct, cuet.SymmetricContraction, cuet.TransposeIrrepsLayout),
in the 'mul_ir' or 'ir_mul' layout. sparsekern replaces e3nn layers, so such a model is
first turned back into the equivalent e3nn-layer MACE model, in place, with MACE's own
converter (``mace.cli.convert_cueq_e3nn``): the weights are moved, not refitted, and
the reduced-CG symmetric-contraction weights are mapped back with MACE's projection.
``patch`` records the model's cuequivariance config, and ``unpatch`` builds the
cuequivariance model again with it (``mace.cli.convert_e3nn_cueq``'s weight transfer)."""

from __future__ import annotations

from typing import Dict

import torch

from ...layers.base import SparsekernLayer, match_float_dtype, set_parameter
from .models import default_dtype

_CUEQ_PACKAGE = "cuequivariance_torch"
# Attributes that describe the cuequivariance set-up; dropped if only the old object has them.
_CUEQ_ONLY_ATTRIBUTES = ("cueq_config", "conv_fusion")
_CUEQ_SOURCE = "_sparsekern_cueq_config"  # on a model patch turned into e3nn layers: its config


def _is_cueq_module(module: torch.nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == _CUEQ_PACKAGE


def is_cueq_model(model: torch.nn.Module) -> bool:
    """True when any module inside ``model`` (or ``model`` itself) comes from
    cuequivariance_torch. Needs neither cuequivariance nor MACE to be importable."""
    if not isinstance(model, torch.nn.Module):
        return False
    return any(_is_cueq_module(m) for m in model.modules())


def to_e3nn_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """Turn a MACE model that holds cuequivariance modules back into the equivalent
    e3nn-layer MACE model, in place, and return the same object.

    The e3nn model is built by MACE's ``convert_cueq_e3nn`` and its submodules,
    parameters, buffers and attributes are moved into ``model``, so a calculator or
    optimizer that holds ``model`` keeps working. Parameters that exist under the same
    name and shape on both sides (radial MLPs, embeddings, ...) stay the same Parameter
    objects; the others (cuet.Linear weights reshaped, symmetric-contraction weights
    split per degree) are new Parameters that take ``requires_grad`` from the ones they
    come from. Hooks registered on ``model`` itself are kept, hooks on replaced
    submodules are not. A model without cuequivariance modules is returned unchanged.
    Raises TypeError if ``model`` is not a MACE model MACE's converter handles, and
    RuntimeError if the conversion would lose or invent weights."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_e3nn_in_place takes a torch.nn.Module, got {type(model).__name__}")
    if not is_cueq_model(model):
        return model
    _check_convertible(model)

    import mace.cli.convert_cueq_e3nn as convert_cueq_e3nn

    ref = next(iter(model.parameters()), None)
    if ref is None:
        raise TypeError(f"{type(model).__name__} has no parameters; not a MACE model")
    device, dtype = ref.device, ref.dtype
    try:
        with default_dtype():  # MACE's converter sets it globally
            new = convert_cueq_e3nn.run(model, device=str(device), return_model=True)
    except Exception as exc:
        raise RuntimeError(
            f"sparsekern.cueq: MACE's convert_cueq_e3nn failed on this {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}") from exc

    leftovers = sorted({type(m).__name__ for m in new.modules() if _is_cueq_module(m)})
    if leftovers:
        raise RuntimeError(f"sparsekern.cueq: MACE's converter left cuequivariance modules {leftovers}")
    _check_transfer(model, new)
    new = new.to(device=device)
    match_float_dtype(new, dtype)
    _keep_parameter_objects(model, new)
    _move_into(model, new)
    return model


def patch_in_e3nn(model: torch.nn.Module) -> None:
    """``to_e3nn_in_place``, for ``patch``: the model's cuequivariance config kept for
    ``back_to_cueq``."""
    if is_cueq_model(model):
        config = next((m.cueq_config for m in model.modules() if getattr(m, "cueq_config", None) is not None), None)
        to_e3nn_in_place(model)
        model.__dict__[_CUEQ_SOURCE] = config


def back_to_cueq(model: torch.nn.Module) -> None:
    """After ``unpatch``: a model ``patch_in_e3nn`` turned into e3nn layers built again
    with its cuequivariance config, in place (the e3nn model's weights, its parameters'
    requires_grad, and the Parameter objects where name and shape agree)."""
    if _CUEQ_SOURCE not in model.__dict__:
        return
    import mace.cli.convert_e3nn_cueq as convert_e3nn_cueq
    from mace.tools.scripts_utils import extract_config_mace_model

    cueq_config = model.__dict__.pop(_CUEQ_SOURCE)
    ref = next(iter(model.parameters()))
    with default_dtype(ref.dtype):  # MACE builds in the default dtype
        config = {**extract_config_mace_model(model), "cueq_config": cueq_config}
        new = type(model)(**config).to(ref.device)
        convert_e3nn_cueq.transfer_weights(model, new, len(config["hidden_irreps"].slices()) - 1,
                                           config["correlation"], config["num_interactions"],
                                           config.get("use_reduced_cg", True),
                                           config.get("keep_last_layer_irreps", False))
    _check_transfer(new, model)  # (symmetric: the cuequivariance side first)
    _keep_parameter_objects(model, new)
    _move_into(model, new)


def _check_convertible(model: torch.nn.Module) -> None:
    cls = type(model)
    if not cls.__module__.startswith("mace."):
        raise TypeError(
            f"sparsekern.cueq.to_e3nn_in_place: {cls.__module__}.{cls.__name__} holds "
            "cuequivariance modules but is not a MACE model; only MACE models converted to "
            "cuequivariance can be turned back into e3nn layers")
    if any(isinstance(m, SparsekernLayer) for m in model.modules()):
        raise TypeError("sparsekern.cueq.to_e3nn_in_place: the model already holds sparsekern "
                        "layers beside cuequivariance ones; call sparsekern.unpatch(model) first")
    try:
        from mace.tools.scripts_utils import extract_config_mace_model
    except ImportError as exc:
        raise ImportError(f"sparsekern.cueq needs mace-torch to convert {cls.__name__}: {exc}") from exc
    try:
        config = extract_config_mace_model(model)
    except Exception as exc:
        raise TypeError(
            f"sparsekern.cueq.to_e3nn_in_place: MACE cannot read the configuration of this "
            f"{cls.__name__} ({type(exc).__name__}: {exc}), so it cannot be converted back "
            "to e3nn layers") from exc
    if "error" in config:
        raise TypeError(
            f"sparsekern.cueq.to_e3nn_in_place: {cls.__name__} cannot be converted back to e3nn "
            f"layers by MACE's convert_cueq_e3nn: {config['error']}")
    try:
        import cuequivariance  # noqa: F401  (MACE's converter needs it for the CG projection)
    except ImportError as exc:
        raise ImportError("sparsekern.cueq: converting a cuequivariance MACE model back to e3nn "
                          f"needs the cuequivariance package: {exc}") from exc


def _is_symmetric_contraction_key(key: str) -> bool:
    return ".symmetric_contractions." in key


def _check_transfer(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """MACE's converter only logs a warning when a weight does not fit and leaves the
    new model's random initial value: refuse that, and refuse dropping weights."""
    src = old.state_dict()
    dst = new.state_dict()
    old_params = {n for n, _ in old.named_parameters()}
    new_params = {n for n, _ in new.named_parameters()}
    problems = []
    for key in sorted(set(src) & set(dst)):
        if _is_symmetric_contraction_key(key):
            continue
        a, b = src[key], dst[key]
        if a.numel() != b.numel() or not torch.equal(a.detach().reshape(-1).to(b.device, b.dtype),
                                                     b.detach().reshape(-1)):
            problems.append(f"{key} not transferred (shape {tuple(a.shape)} -> {tuple(b.shape)})")
    for key in sorted(new_params - set(src)):
        if not _is_symmetric_contraction_key(key) and dst[key].numel() > 0:
            problems.append(f"new parameter {key} has no source in the cuequivariance model")
    for key in sorted(old_params - set(dst)):
        if _is_symmetric_contraction_key(key):
            if not key.endswith(".symmetric_contractions.weight"):
                problems.append(f"symmetric-contraction parameter {key} is not one MACE's converter maps")
        elif src[key].numel() > 0:
            problems.append(f"parameter {key} of the cuequivariance model would be dropped")
    if problems:
        raise RuntimeError("sparsekern.cueq: MACE's convert_cueq_e3nn did not give an equivalent "
                           "model:\n  " + "\n  ".join(problems))


def _requires_grad_for(name: str, old_params: Dict[str, torch.nn.Parameter]) -> bool:
    """requires_grad of the old parameter(s) a new parameter comes from: the same name,
    else those of the nearest enclosing module (e.g. the cueq symmetric contraction's
    single ``weight`` for the e3nn per-degree weights)."""
    if name in old_params:
        return old_params[name].requires_grad
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i]) + "."
        flags = [p.requires_grad for n, p in old_params.items() if n.startswith(prefix)]
        if flags:
            return any(flags)
    return any(p.requires_grad for p in old_params.values())


def _keep_parameter_objects(old: torch.nn.Module, new: torch.nn.Module) -> None:
    old_params = dict(old.named_parameters())
    for name, p in list(new.named_parameters()):
        o = old_params.get(name)
        if o is not None and o.shape == p.shape and o.dtype == p.dtype and o.device == p.device:
            with torch.no_grad():
                o.copy_(p)  # equal already (checked); keeps the object optimizers hold
            set_parameter(new, name, o)
        else:
            p.requires_grad_(_requires_grad_for(name, old_params))


def _move_into(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Make ``old`` the e3nn model: its state becomes ``new``'s (submodules, parameters,
    buffers, attributes), keeping its own hooks, training mode and extra attributes."""
    if type(old) is not type(new):
        raise RuntimeError(f"sparsekern.cueq: converter returned {type(new).__name__} "
                           f"for {type(old).__name__}")
    training = old.training
    kept = {k: v for k, v in old.__dict__.items()
            if "hook" in k or (k not in new.__dict__ and k not in _CUEQ_ONLY_ATTRIBUTES)}
    state = dict(new.__dict__)
    state.update(kept)
    old.__dict__.clear()
    old.__dict__.update(state)
    new.__dict__.clear()  # the submodules now belong to ``old`` alone
    old.train(training)
