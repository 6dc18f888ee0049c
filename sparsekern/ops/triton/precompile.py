"""Compile the Triton kernels a model launches all at once, in parallel processes.

A kernel compiles on its first launch, one after another: for MACE-MP-0 medium's set
(energy+forces and a training step, about 50 specialisations, many generated per layer)
that was about 70 s of the first step on the H200 machine under Triton 3.6.0.
:func:`precompile` runs the model's host path once with every launch recorded instead
of run, binds each launch as Triton's own launcher does (dtypes, 16-byte divisibility,
constexprs: the same cache key), and compiles the distinct specialisations in a pool of
processes into Triton's disk cache, where the real launches then find them.

Uses Triton internals (the launcher's argument binder and ``_pack_args``) that 3.6.0 and
3.7.1 share; ``tests/ops/test_gpu_proxy_aot.py`` compiles through the same functions.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

from . import generated


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Inside, every Triton launch is appended to the list as (kernel, args, kwargs)
    and not run (outputs stay as allocated)."""
    from triton.runtime.jit import JITFunction

    launches: list = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


@dataclass
class Spec:
    """One specialisation of a kernel, as a launch binds it."""
    kernel: object  # the JITFunction
    name: str
    constexprs: dict  # by parameter name, for reports
    signature: dict
    bound_constexprs: dict
    attrs: dict
    options: dict

    def source(self):
        from triton.compiler import ASTSource

        return ASTSource(self.kernel, self.signature, self.bound_constexprs, self.attrs)


def specialisations(launches: list, target) -> List[Spec]:
    """One :class:`Spec` per distinct specialisation among ``launches`` on ``target``."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binders, seen = {}, {}
    for jitfn, args, kwargs in launches:
        if jitfn not in binders:
            binders[jitfn] = create_function_from_signature(jitfn.signature, jitfn.params, backend)
        bound, spec, opts = binders[jitfn](*args, **kwargs)
        options, signature, constexprs, attrs = jitfn._pack_args(backend, kwargs, bound, spec, opts)
        key = (jitfn, repr(signature), repr(sorted(constexprs.items())), repr(attrs))
        if key not in seen:
            named = {jitfn.arg_names[k[0]]: v for k, v in constexprs.items() if jitfn.params[k[0]].is_constexpr}
            seen[key] = Spec(jitfn, jitfn.fn.__name__, named, signature, constexprs, attrs, options.__dict__)
    return list(seen.values())


def _recipe(kernel) -> Tuple:
    """How a fresh process rebuilds ``kernel``: its module and name, or its generated text."""
    made = generated.recipe(kernel)
    return ("generated", *made) if made else ("module", kernel.fn.__module__, kernel.fn.__qualname__)


def _rebuild(recipe: Tuple):
    if recipe[0] == "generated":
        _, source, name, helpers = recipe
        return generated.jit(source, name, **{k: _rebuild(("module", *v)) for k, v in helpers.items()})
    return getattr(importlib.import_module(recipe[1]), recipe[2])


def _compile(recipe: Tuple, signature, constexprs, attrs, target, options) -> None:
    """A worker's job: one specialisation into Triton's cache."""
    import triton
    from triton.compiler import ASTSource

    triton.compile(ASTSource(_rebuild(recipe), signature, constexprs, attrs), target=target, options=options)


def compile_all(specs: List[Spec], target, workers: Optional[int] = None) -> None:
    """Compile ``specs`` for ``target`` in ``workers`` processes (default: one per CPU,
    at most one per spec). Each is a fresh interpreter running this module (not a
    multiprocessing child, which would re-import the caller's script)."""
    jobs = [(_recipe(s.kernel), s.signature, s.bound_constexprs, s.attrs, target, s.options) for s in specs]
    if not jobs:
        return
    # a generated kernel's compile time grows with its text: the longest first, dealt in turn
    jobs.sort(key=lambda job: -len(job[0][1]) if job[0][0] == "generated" else 0)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(workers):
            path = os.path.join(tmp, f"{i}.pkl")
            with open(path, "wb") as f:
                pickle.dump(jobs[i::workers], f)
            procs.append(subprocess.Popen([sys.executable, "-m", __name__, path], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errors = [err for proc in procs for err in [proc.communicate()[1]] if proc.returncode]
    if errors:
        raise RuntimeError(f"precompile: {len(errors)} of {workers} workers failed; the first said:\n{errors[0][-3000:]}")


def precompile(run: Callable[[], object], workers: Optional[int] = None, target=None) -> int:
    """Compile every Triton kernel specialisation that ``run()`` launches (say, a
    patched model's energy and forces, or a training step, on one batch: the kernels take
    node and edge counts unspecialised, so batches of other sizes launch the same
    specialisations), in parallel, into Triton's disk cache; returns how many. ``run`` is
    executed with the launches recorded instead of run, so every value it computes is
    garbage: give it a copy of anything it changes (no optimizer step). ``target``: the
    current device's (default) or a ``triton.backends.compiler.GPUTarget``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("precompile: TRITON_INTERPRET is set, so kernels run in Triton's interpreter "
                           "and nothing compiles; unset it")
    if target is None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("precompile: no CUDA device here; pass target=GPUTarget('cuda', 90, 32) "
                               "(triton.backends.compiler) to compile for one")
        from triton.runtime import driver

        target = driver.active.get_current_target()
    with recording() as launches:
        run()
    specs = specialisations(launches, target)
    compile_all(specs, target, workers)
    return len(specs)


if __name__ == "__main__":  # a worker of compile_all: its share of the jobs, one by one
    with open(sys.argv[1], "rb") as f:
        for job in pickle.load(f):
            _compile(*job)
