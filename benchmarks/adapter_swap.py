"""Swapping named adapters in a running ASE calculator (SevenNet-0, CPU).

Makes two 3 % sparse adapters of SevenNet-0 (prepare, then a random perturbation of the
delta: trained-looking, seconds instead of a training run), each with a per-element E0
shift as ``sparsekern finetune`` writes one, and each one's merged model as the trainer
exports it (``merged_sevennet.pth``). Then loads both adapters by name on one base, runs
SevenNet's own calculator on that model, and
- times ``set_adapter`` over many swaps (and, for scale, one energy + forces call and
  one ``load_adapter`` from the file);
- after each swap, compares the energy and forces with (1) a fresh base holding only
  that adapter (should be bit for bit) and (2) the merged model in its own
  SevenNetCalculator (float32 round-off: patched layers vs e3nn's).

    PYTHONPATH=. .venv-sevenn/bin/python benchmarks/adapter_swap.py [--swaps 2000] [--threads 1] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk

import sparsekern
from sparsekern.finetune import adapter_calculator, calibrate_density, iter_deltas, load_adapter, set_adapter
from sparsekern.finetune.trainer import export_merged
from sparsekern.integrations import family_for

SPEC = "7net-0"
SHIFTS = {"a": {14: 0.02, 8: -0.01}, "b": {14: -0.03, 8: 0.015}}  # eV per atom, as finetune fits them


def structure():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))  # 16 atoms
    atoms.numbers[::5] = 8
    atoms.rattle(0.05, seed=3)
    return atoms


def make_adapter(family, name: str, folder: Path):
    """A 3 % STR adapter with a random delta and its E0 shift, and its merged model."""
    model = sparsekern.prepare(family.load(SPEC, "cpu"), sparsekern.SparseConfig(density=0.03, seed=len(name)))
    gen = torch.Generator().manual_seed(ord(name))
    with torch.no_grad():
        for _, layer, param, d in iter_deltas(model):
            scale = 0.1 * float(layer.get_parameter(param).std())
            d.v.copy_(torch.randn(d.v.shape, generator=gen, dtype=torch.float64).to(d.v) * scale)
    calibrate_density(model)
    shift = SHIFTS[name]
    adapter = sparsekern.save_adapter(model, folder / f"{name}.safetensors",
                                      extra_metadata={"e0_shift_ev": json.dumps({str(z): v for z, v in shift.items()})})
    merged = export_merged(family, model.eval(), shift, folder / f"{name}_merged_sevennet.pth", SPEC)
    return adapter, merged


def energy_forces(calc, atoms):
    a = atoms.copy()
    a.calc = calc
    return a.get_potential_energy(), a.get_forces()


def time_swaps(model, n: int):
    times = []
    for i in range(n):
        name = "ab"[i % 2]
        t0 = time.perf_counter()
        set_adapter(model, name)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the result as Markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    family, atoms = family_for(SPEC), structure()
    from sevenn.calculator import SevenNetCalculator

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        made = {n: make_adapter(family, n, folder) for n in "ab"}
        merged = {n: energy_forces(SevenNetCalculator(str(made[n][1]), device="cpu"), atoms) for n in "ab"}
        alone = {n: energy_forces(adapter_calculator(load_adapter(family.load(SPEC, "cpu"), made[n][0])), atoms)
                 for n in "ab"}
        model = family.load(SPEC, "cpu")
        t0 = time.perf_counter()
        for n in "ab":
            load_adapter(model, made[n][0], name=n)
        load_s = (time.perf_counter() - t0) / 2
        calc = adapter_calculator(model)
        rows = compare(model, calc, atoms, merged, alone)
        calc.reset()  # timed uncached
        t0 = time.perf_counter()
        energy_forces(calc, atoms)
        eval_s = time.perf_counter() - t0
        swaps = time_swaps(model, args.swaps)
        density = sparsekern.stats(model)["density"]
    write(args, rows, swaps, load_s, eval_s, density, len(atoms))


def compare(model, calc, atoms, merged, alone):
    """After each of a few swaps: differences to the adapter alone and to its merged model."""
    rows = []
    for name in "abba":
        set_adapter(model, name)
        e, f = energy_forces(calc, atoms)
        rows.append({"adapter": name, "energy_ev": e,
                     "vs_alone_de": abs(e - alone[name][0]), "vs_alone_df": float(np.abs(f - alone[name][1]).max()),
                     "vs_merged_de": abs(e - merged[name][0]),
                     "vs_merged_df": float(np.abs(f - merged[name][1]).max())})
    return rows


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def write(args, rows, swaps, load_s, eval_s, density, natoms) -> None:
    ms = [1e3 * t for t in swaps]
    lines = [
        f"# Adapter swap, SevenNet-0, {datetime.date.today().isoformat()}",
        "",
        f"Machine: {platform.node()}, {cpu_model()}, {torch.get_num_threads()} "
        f"torch thread(s), torch {torch.__version__}, Python {platform.python_version()}.",
        f"Command: `PYTHONPATH=. {' '.join([Path(sys.executable).parent.parent.name + '/bin/python'] + sys.argv)}`",
        f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} cores, shared).",
        "",
        f"Two STR adapters at {100 * density:.2f} % of SevenNet-0's path weights, each with an E0 shift; "
        f"a {natoms}-atom Si/O cell.",
        "",
        f"- `set_adapter` over {len(ms)} swaps: median {statistics.median(ms):.3f} ms, "
        f"mean {statistics.fmean(ms):.3f} ms, max {max(ms):.3f} ms",
        f"- for scale: one energy + forces call {1e3 * eval_s:.1f} ms; `load_adapter` from the file "
        f"(read, fingerprint check, attach) {1e3 * load_s:.1f} ms per adapter",
        "",
        "| swap to | energy (eV) | vs adapter alone: dE (eV) | max dF (eV/Å) "
        "| vs merged model: dE (eV) | max dF (eV/Å) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['adapter']} | {r['energy_ev']:.6f} | {r['vs_alone_de']:.1e} | {r['vs_alone_df']:.1e} | "
              f"{r['vs_merged_de']:.1e} | {r['vs_merged_df']:.1e} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
