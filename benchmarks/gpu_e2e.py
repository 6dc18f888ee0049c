"""End to end on ``model``, in the suite a MACE-MP-0-medium-shaped model (89 elements, 128x0e+128x1o, l <= 3,
correlation 3, random weights, float32): energy + forces, and one fine-tuning step
(energy and force loss, backward through the forces, Adam step), for

- ``e3nn``: the model as MACE builds it, every parameter trained;
- ``sparsekern_full``: the same model patched (fastest back end per layer), every
  parameter trained;
- ``sparsekern_sparse``: ``sparsekern.prepare(model, SparseConfig(density=0.03))``: base
  frozen, only the deltas trained (the density controller runs in each step, as in
  real training);
- ``mace_cueq``: MACE's own cuEquivariance model (``mace.cli.convert_e3nn_cueq``, fused
  conv on CUDA), every parameter trained, where cuequivariance and its ops import.

The sparsekern variants' fine-tuning step is also timed as the trainer runs it under
``--cuda_graphs`` (collation, padding and copies included; on the CPU padded, eager).
On CUDA, energy + forces is also timed replayed from a CUDA graph (issue 10: a patched
model's host path has no sync, so it should capture; a failed capture is recorded, and
the replayed forces are checked against the eager ones), and through
``sparsekern.GraphedMACE`` (padding and copies included: an MD step's cost).

Timed by ``timer`` (gpu_suite's CUDA-event median); the system is a rattled rocksalt
crystal whose lattice constant gives about 30 neighbours within r_max = 6 A (150,000
edges for 5,000 atoms; the row says the exact counts).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Dict

import torch
from ase.build import bulk

import sparsekern
from sparsekern.finetune.backward import backward
from sparsekern.integrations.mace.models import mace_batch

NEIGHBOURS = 30


def crystal(n_atoms: int, elements):
    """About ``n_atoms`` atoms of up to 10 of ``elements``, rattled; number density set so
    that a 6 A sphere holds NEIGHBOURS atoms."""
    density = (NEIGHBOURS + 1) / (4 / 3 * math.pi * 6.0 ** 3)
    a = (8 / density) ** (1 / 3)
    cells = n_atoms / 8
    r = max(1, int(cells ** (1 / 3)))
    atoms = bulk("NaCl", "rocksalt", a=a, cubic=True) * (r, r, max(1, round(cells / r ** 2)))
    pick = list(elements)[::max(1, len(elements) // 10)][:10]
    atoms.numbers = [pick[i % len(pick)] for i in range(len(atoms))]
    atoms.rattle(0.05, seed=1)
    return atoms


def mace_cueq(model, dev: str):
    """MACE's cuEquivariance conversion of ``model``, or why there is none."""
    try:
        import cuequivariance_torch  # noqa: F401
        from mace.cli.convert_e3nn_cueq import run as to_cueq

        return to_cueq(copy.deepcopy(model), device=dev)
    except Exception as exc:  # not installed, no ops package, conversion failed
        return f"n/a ({type(exc).__name__}: {exc})"[:300]


def variants(model, dev: str) -> Dict[str, object]:
    """Most telling first (a run cut short keeps them): sparsekern on ``auto`` (the
    measured fastest back end per op), e3nn, sparsekern on Triton alone, MACE's
    cuEquivariance (or why it cannot run)."""
    full, sparse = {}, {}
    for backend in ("auto", "triton"):
        full[backend] = sparsekern.patch(copy.deepcopy(model), backend=backend)
        sparse[backend] = sparsekern.prepare(copy.deepcopy(full[backend]), sparsekern.SparseConfig(density=0.03),
                                             backend=backend)
    cueq = mace_cueq(model, dev)
    for m in [model, *full.values()] + ([] if isinstance(cueq, str) else [cueq]):
        for p in m.parameters():
            p.requires_grad_(True)
    return {"sparsekern_full": full["auto"], "sparsekern_sparse": sparse["auto"], "e3nn": model,
            "sparsekern_sparse_triton": sparse["triton"], "sparsekern_full_triton": full["triton"], "mace_cueq": cueq}


def _step_fn(model, batch) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-6)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        out = model(batch, training=True, compute_force=True)
        loss = out["energy"].square().mean() + out["forces"].square().mean()
        backward(loss, params)  # into the trained tensors, as sparsekern's trainer (every model alike)
        opt.step()
    return step


def _graphed_step_fn(model, atoms, dev: str) -> Callable[[], None]:
    """The trainer's step under ``--cuda_graphs`` (``GraphedSteps``: the batch collated,
    padded and copied into the capture, the forward and backward replayed, Adam eager),
    its loss the trainer's on zero labels; raises where the step was not captured."""
    from types import SimpleNamespace

    from sparsekern.finetune.evaluation import Sample
    from sparsekern.finetune.graphed_step import GraphedSteps
    from sparsekern.integrations.mace.family import MaceFamily

    family = MaceFamily()
    sample = Sample(family.graph(model, atoms), 0.0, torch.zeros(len(atoms), 3), len(atoms))
    steps = GraphedSteps(family, model, SimpleNamespace(energy_weight=1.0, forces_weight=100.0, loss="weighted"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-6)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        if steps.loss([sample], [sample], 1.0, params) is None:
            raise RuntimeError("the density schedule still moves: the step runs eagerly")
        opt.step()
    step()
    if dev.startswith("cuda") and not any(hasattr(c, "graph") for c in steps.replays.graphs.values()):
        raise RuntimeError("GraphedSteps did not capture the step (its warning says why)")
    return step


def graphed(fn: Callable[[], dict]) -> Callable[[], dict]:
    """``fn`` replayed from a CUDA graph (``sparsekern.integrations.cuda_graphs.capture``: warmed up
    on a side stream, captured once, the graph's orderings built inside it); each replay
    rewrites the same output tensors."""
    from sparsekern.integrations.cuda_graphs import capture

    graph, out = capture(fn, warmups=3)

    def replay():
        graph.replay()
        return out
    return replay


def _timed_against_eager(name: str, how: str, make, forces, row: dict, checks: list, timer) -> None:
    """``make()``'s call timed in ``row`` as "energy+forces (how)", its forces checked
    against the eager ``forces``; a failure (say a capture) is a check with its error."""
    try:
        call = make()
        got = call()["forces"]
        if forces is not None:
            checks.append({"case": row["case"], "check": f"forces {name}, {how} vs eager, float32",
                           "rel_err": ((got - forces).abs().max() / forces.abs().max()).item()})
        row["ms"][f"energy+forces ({how})"] = timer(call)
    except Exception as exc:
        checks.append({"case": row["case"], "variant": name, "check": how,
                       "error": f"{type(exc).__name__}: {exc}"[:300]})


def _graph_row(name: str, energy_forces, forces, row: dict, checks: list, timer) -> None:
    """``energy_forces`` replayed from a CUDA graph (:func:`graphed`)."""
    _timed_against_eager(name, "CUDA graph", lambda: graphed(energy_forces), forces, row, checks, timer)


def _graphed_mace_row(name: str, model, batch: dict, forces, row: dict, checks: list, timer) -> None:
    """``sparsekern.GraphedMACE``'s call (padding, input copies, replay, output copies:
    what an MD driver's step costs); the weights frozen meanwhile, as MACE's calculator
    leaves them."""
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    graphed_model = sparsekern.GraphedMACE(model)

    def call():
        return graphed_model(batch, training=False, compute_force=True)
    try:
        _timed_against_eager(name, "GraphedMACE", lambda: call, forces, row, checks, timer)
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)


def _precompile(models: list, batch: dict) -> None:
    """Every Triton kernel that energy+forces and a training step of ``models`` launch,
    compiled at once in parallel processes (first use otherwise compiles them one by one:
    about 70 s of the second GPU run's time). Recorded on copies: the launches do not run,
    so what the passes leave behind is garbage."""
    t0 = time.time()
    copies = [copy.deepcopy(m) for m in models]

    def passes():
        for m in copies:
            m(batch, training=False, compute_force=True)
            out = m(batch, training=True, compute_force=True)
            backward(out["energy"].square().mean() + out["forces"].square().mean(),
                     [p for p in m.parameters() if p.requires_grad])

    n = sparsekern.precompile(passes)
    print(f"[e2e] {n} Triton kernel specialisations compiled in {time.time() - t0:.0f} s", flush=True)


def run(model, n_atoms: int, dev: str, timer, results: list, checks: list, profile=None, on_row=None) -> None:
    """Rows of ``results`` per variant (``on_row()`` after each); ``profile(name, fn,
    host=False)``, where given, profiles one sparse fine-tuning step (device time) and the
    full variants' energy+forces (host time, auto and Triton alone)."""
    atoms = crystal(n_atoms, [int(z) for z in model.atomic_numbers])
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in mace_batch(model, [atoms]).items()}
    n_edges = int(batch["edge_index"].shape[1])
    t0 = time.time()
    models = variants(model, dev)
    if dev.startswith("cuda"):
        try:
            _precompile([m for name, m in models.items() if name.startswith("sparsekern")], batch)
        except Exception as exc:  # recorded; the first calls compile them instead
            checks.append({"case": f"e2e_{len(atoms)}at", "check": "precompile", "error": repr(exc)[:1000]})
    forces = {}
    for name, m in models.items():
        if isinstance(m, str):
            checks.append({"case": f"e2e_{len(atoms)}at", "variant": name, "error": m})
            continue
        def energy_forces(m=m):
            m.eval()
            return m(batch, training=False, compute_force=True)
        row = {"case": f"e2e_{len(atoms)}at", "op": "energy+forces", "mode": name, "nodes": len(atoms),
               "edges": n_edges, "ms": {}}
        try:
            forces[name] = energy_forces()["forces"].detach()
        except Exception as exc:  # OOM and the like: recorded, the suite goes on
            forces[name] = None
            checks.append({"case": row["case"], "variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        row["ms"]["energy+forces"] = timer(energy_forces)
        if name.startswith("sparsekern"):
            if dev.startswith("cuda"):  # the claim: a patched model captures
                _graph_row(name, energy_forces, forces[name], row, checks, timer)
            _graphed_mace_row(name, m, batch, forces[name], row, checks, timer)  # on the CPU: padded, eager
        step = _step_fn(m, batch)
        row["ms"]["finetune_step"] = timer(step)
        if name.startswith("sparsekern"):
            try:
                row["ms"]["finetune_step (CUDA graph)"] = timer(_graphed_step_fn(m, atoms, dev))
            except Exception as exc:  # recorded, the suite goes on
                checks.append({"case": row["case"], "variant": name, "check": "finetune_step (CUDA graph)",
                               "error": f"{type(exc).__name__}: {exc}"[:300]})
        if profile is not None and name == "sparsekern_sparse":
            profile(f"fine-tuning step, {name}, {row['case']}", step)
        if profile is not None and name in ("sparsekern_full", "sparsekern_full_triton"):  # eager: host-bound
            profile(f"energy+forces, {name}, {row['case']}", energy_forces, True)
        results.append(row)
        print(f"[e2e {time.time() - t0:.0f} s]", row, flush=True)
        if on_row is not None:
            on_row()
    f0 = forces.get("e3nn")
    for name in ("sparsekern_full", "mace_cueq"):
        f1 = forces.get(name)
        if f0 is not None and f1 is not None:
            checks.append({"case": f"e2e_{len(atoms)}at", "check": f"forces {name} vs e3nn, float32",
                           "rel_err": ((f1 - f0).abs().max() / f0.abs().max()).item()})
