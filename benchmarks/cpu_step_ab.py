"""CPU: a sparse (STR, 3 %) fine-tuning step, this working tree against another commit,
side by side: each round starts one process per tree (the base checked out in a
temporary git worktree), alternately, each timing ``--steps`` steps after two warm-ups;
the best step of each tree over all rounds is kept, so load from elsewhere hits both
alike, and the median of all its steps beside it (the VM's memory reclaim can move a
tree's best between runs); each round's ratio of the two medians shows the spread. A
step as the demo's trainer takes it: SevenNet-0 (or ``--model mace``, an
MP-0-medium-shaped MACE) on four 63-atom silicon frames of si_mlearn (the demo's data),
the torch back end, forces with their graph, a force and energy loss, the backward into
the trained tensors, an Adam step. ``--task energy_forces`` times an MD call instead: a
float32 energy+forces of the MACE shape on 64 atoms (``cpu_page_faults.py``'s), freed
memory kept in the process.

    .venv-sevenn/bin/python benchmarks/cpu_step_ab.py --base HEAD [--rounds 3] [--steps 6]
    .venv-mace/bin/python benchmarks/cpu_step_ab.py --base HEAD --model mace [--task energy_forces]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]


def _train_file() -> Path:
    from sparsekern.locations import data_dir

    path = data_dir() / "si_mlearn" / "Si_train.xyz"
    if not path.exists():
        raise SystemExit(f"cpu_step_ab: {path} missing; set SPARSEKERN_DATA to the data folder")
    return path


def _frames():
    from ase.io import read

    return read(_train_file(), index="::8")[:4]


def _step_fn(model_name: str, as_trainer: bool = True):
    """A sparse training step of the tree on sys.path, as a function, in a process set up
    as the trainer sets up its own (the allocator, in trees that have the setting) unless
    ``as_trainer`` is False."""
    import torch

    import sparsekern

    if as_trainer and hasattr(sparsekern, "keep_freed_memory"):
        sparsekern.keep_freed_memory()
    from sparsekern.finetune.backward import backward

    frames = _frames()
    if model_name == "mace":
        from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped

        model = mace_mp0_shaped("medium", dtype=torch.float32)
        batch = mace_batch(model, frames)

        def predict():
            out = model(dict(batch), compute_force=True, training=True)
            return out["energy"], out["forces"]
    else:
        from sparsekern.integrations.sevennet.family import SevenNetFamily

        family = SevenNetFamily()
        model = family.load("7net-0", "cpu")
        graphs = [family.graph(model, atoms) for atoms in frames]

        def predict():
            return family.predict(model, family.collate(graphs, "cpu"), True)
    model.train()
    sparsekern.patch(model, backend="torch")
    sparsekern.prepare(model, sparsekern.SparseConfig(density=0.03), backend="torch")
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trained, lr=1e-3)

    def step():
        energy, forces = predict()
        for p in trained:
            p.grad = None
        backward(energy.square().mean() + forces.square().mean(), trained)
        opt.step()

    return step


def _child(task: str, model_name: str, steps: int) -> None:
    if task == "step":
        step = _step_fn(model_name)
    else:
        import sparsekern  # noqa: F401  the tree under test's, before cpu_page_faults puts this one on sys.path
        from cpu_page_faults import _task

        step = _task(task, model_name, keep=True)  # as the README has MD scripts do
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    import sparsekern

    print(f"TIMES {','.join(f'{t:.6f}' for t in times)} {Path(sparsekern.__file__).resolve().parents[1]}")


def _run(tree: Path, args) -> List[float]:
    from sparsekern.locations import data_dir

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
           "SPARSEKERN_DATA": str(data_dir())}  # where this tree finds it, not relative to the base's
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--task", args.task, "--model", args.model,
           "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    lines = [line for line in out.stdout.splitlines() if line.startswith("TIMES ")]
    if out.returncode or not lines:
        raise SystemExit(f"cpu_step_ab: the step failed in {tree}:\n{out.stderr[-2000:]}")
    _, times, imported = lines[-1].split(maxsplit=2)
    if Path(imported) != tree.resolve():  # both sides must not time the same code
        raise SystemExit(f"cpu_step_ab: the step for {tree} imported sparsekern from {imported}")
    return [float(t) for t in times.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="the commit to compare with (default: HEAD)")
    ap.add_argument("--model", choices=("7net-0", "mace"), default="7net-0")
    ap.add_argument("--task", choices=("step", "energy_forces"), default="step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # sparsekern from PYTHONPATH: the tree under test
        return _child(args.task, args.model, args.steps)
    if args.task == "energy_forces" and args.model != "mace":
        raise SystemExit("cpu_step_ab: --task energy_forces runs the MACE shape (--model mace)")
    sys.path.insert(0, str(ROOT))  # here only: a child must not import this tree's
    _train_file()  # before any worktree or model
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True)
    if base.returncode:
        raise SystemExit(f"cpu_step_ab: {args.base!r} is not a commit here")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), base.stdout.strip()],
                       cwd=ROOT, check=True)
        try:
            times, ratios = {"base": [], "this tree": []}, []
            for r in range(args.rounds):
                medians = {}
                for name, where in (("base", tree), ("this tree", ROOT)):
                    steps = _run(where, args)
                    times[name] += steps
                    medians[name] = statistics.median(steps)
                ratios.append(medians["base"] / medians["this tree"])
                print(f"round {r + 1}: medians base {medians['base']:.3f} s, this tree {medians['this tree']:.3f} s "
                      f"({ratios[-1]:.2f}x)", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    cpu = platform.processor() or platform.machine()
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    what = "sparse step, 4 x 63-atom silicon" if args.task == "step" else "float32 energy+forces, 64 atoms"
    print(f"\n{what}, {args.model}, torch back end, CPU ({cpu}, "
          f"{os.cpu_count()} CPUs), {args.rounds} x {args.steps} steps: base {base.stdout.strip()} "
          f"best {best['base']:.3f} s, median {median['base']:.3f} s; this tree best {best['this tree']:.3f} s, "
          f"median {median['this tree']:.3f} s ({best['base'] / best['this tree']:.2f}x best, "
          f"{median['base'] / median['this tree']:.2f}x median; rounds {min(ratios):.2f}x to {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
