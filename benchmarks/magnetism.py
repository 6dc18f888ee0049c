"""Magnetism benchmark (not CI): SevenNet-0 fine-tuned spin-blind (sparse 3 %, and full
with --full) vs magnetism-aware sparse (3 % delta on the base + the magnetic energy
module trained fully), through the trainer ``sparsekern finetune`` runs, on the same
frames, epochs, batches, learning rate and loss weights.

Splits (never at random):
- nio: train on NiO_data_0 + NiO_data_1, test on NiO_data_2 (every k-th frame of each
  so that the subsets span the files).
- fe: FCC Fe (DeepSPIN), split by config_type: train iter-1..3, test iter-7 (iter 4-6
  hold the strongly distorted frames).
Scores on the test frames: energy MAE (meV/atom), force MAE (meV/Å), magnetic-force
MAE (meV/μB), moment-magnitude MAE (μB, --predict_magmom), and the Spearman rank
correlation of predicted vs reference energies (the ordering of spin configurations);
and the energy MAE on the training frames (what the model cannot fit vs what does not
carry over to the test frames).

    .venv-sevenn/bin/python benchmarks/magnetism.py --data nio --n_train 6 --n_test 10 --epochs 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsekern.files import atomic_write  # noqa: E402
from sparsekern.locations import data_dir  # noqa: E402

MAGNETIC = ["--magmom_key", "REF_magmom", "--magforces_key", "REF_magforces", "--predict_magmom"]


def spread(frames, n):
    """``n`` frames spread evenly over ``frames``."""
    return [frames[i] for i in np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int)]


def split(name: str, n_train: int, n_test: int):
    """(train frames, test frames) of data set ``name``."""
    from ase.io import read

    if name == "nio":
        d = data_dir() / "nio_spin"
        train = sum((spread(read(d / f"NiO_data_{k}.xyz", ":"), n_train) for k in (0, 1)), [])
        return train, spread(read(d / "NiO_data_2.xyz", ":"), n_test)
    frames = read(data_dir() / "magnetic/fcc_fe_deepspin/fcc_fe.xyz", ":")
    by = {}
    for a in frames:
        by.setdefault(a.info["config_type"].rsplit("-", 1)[1], []).append(a)
    train = sum((spread(by[k], n_train) for k in ("1", "2", "3")), [])
    return train, spread(by["7"], n_test)


def predicted_energies(metrics: dict, frames, magnetic: bool):
    """Per-frame energies of the merged model in its calculator."""
    from sparsekern.integrations import family_for
    from sparsekern.magnetism.calculator import load_calculator

    path = metrics["merged_model"]
    calc = load_calculator(path) if magnetic else family_for(path).calculator(path, "cpu")
    energies = []
    for a in frames:
        a = a.copy()
        if magnetic:
            a.set_initial_magnetic_moments(a.arrays["REF_magmom"])
        a.calc = calc
        energies.append(a.get_potential_energy())
    return np.array(energies)


def run_one(label, method, extra, files, out, args, train, test):
    from scipy.stats import spearmanr

    from sparsekern.cli.finetune import training_settings
    from sparsekern.finetune.settings import Settings
    from sparsekern.finetune.trainer import run

    argv = ["--model", "7net-0", "--train", str(files / "train.xyz"), "--test", str(files / "test.xyz"),
            "--method", method, "--out", str(out / label.replace(" ", "_")), "--epochs", str(args.epochs),
            "--lr", str(args.lr), "--batch_size", str(args.batch_size), "--energy_weight", str(args.energy_weight),
            "--no_progress", *extra, *(["--magnetic_lr", str(args.magnetic_lr)] if "--predict_magmom" in extra else [])]
    t0 = time.perf_counter()
    m = run(Settings(**training_settings(argv)))
    predicted = predicted_energies(m, test, "--magmom_key" in extra)
    reference = np.array([a.info["REF_energy"] for a in test])
    on_train = np.abs(predicted_energies(m, train, "--magmom_key" in extra) - [a.info["REF_energy"] for a in train])
    row = {k: m.get(f"test_{k}") for k in ("energy_mae_mev_per_atom", "force_mae_mev_per_A",
                                              "magforce_mae_mev_per_muB", "magmom_mae_muB")}
    row.update(label=label, train_energy_mae_mev_per_atom=1e3 * float(np.mean(on_train / [len(a) for a in train])),
               zero_shot_energy_mae_mev_per_atom=m["zero_shot_test_energy_mae_mev_per_atom"],
               spearman=float(spearmanr(predicted, reference).statistic), trainable_params=m["trainable_params"],
               magnetic_params=m.get("magnetic_params", 0), magnetic_fit=m.get("magnetic_fit"),
               changed_fraction=m["changed_fraction"],
               wall_s=time.perf_counter() - t0, argv=argv, predicted_ev=predicted.tolist(),
               reference_ev=reference.tolist())
    print(json.dumps({k: v for k, v in row.items() if k not in ("argv", "predicted_ev", "reference_ev")}), flush=True)
    return row


def zero_magforce_mae(test) -> float:
    """A spin-blind model's magnetic-force error: it predicts dE/dm = 0."""
    return 1e3 * float(np.mean(np.concatenate([np.abs(a.arrays["REF_magforces"]).ravel() for a in test])))


def module_only(train, test, steps: int, lr: float, energy_weight: float, magforces_weight: float,
                lstsq: bool) -> dict:
    """The magnetic energy module alone (no base model: positions barely move in NiO, so
    a spin-blind model is a constant per cell) fitted to E - mean(E_train) and the
    magnetic forces with the trainer's loss, Adam (amsgrad), one frame per step; test
    energy MAE after refitting the constant on the training frames, against the constant
    alone (what a spin-blind model can do) and a least-squares Heisenberg fit
    (first + second neighbour m_i.m_j sums: what the data support). With ``lstsq`` the
    output layers start from the trainer's closed-form first step (magnetism/fit.py)."""
    import torch

    from sparsekern.magnetism.energy import MagneticEnergy
    from sparsekern.magnetism.fit import normal_equations, solve
    from sparsekern.magnetism.graph import collate, magnetic_graph

    torch.manual_seed(0)
    module = MagneticEnergy().double()
    graphs = [[collate([magnetic_graph(a, module.cutoff, a.arrays["REF_magmom"])], "cpu") for a in f]
              for f in (train, test)]
    e_train, e_test = (np.array([a.info["REF_energy"] for a in f]) for f in (train, test))
    n = len(train[0])
    if lstsq:  # (no base model here, so no force rows)
        parts = [(g, {"energy": torch.tensor([e - e_train.mean()]),
                      "magforces": torch.as_tensor(a.arrays["REF_magforces"])}, k, {})
                 for k, (g, e, a) in enumerate(zip(graphs[0], e_train, train))]
        solve(module, normal_equations(module, parts, {"energy": len(train), "magforces": 3 * n * len(train)}),
              {"energy": energy_weight, "magforces": magforces_weight})
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, amsgrad=True)
    for step in range(steps):
        k = step % len(train)
        e, _, h = module.energy_and_forces(graphs[0][k], create_graph=True)
        loss = (energy_weight * ((e[0] + e_train.mean() - e_train[k]) / n) ** 2
                + magforces_weight * (h - torch.as_tensor(train[k].arrays["REF_magforces"])).square().mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pred = [np.array([float(module.energy_and_forces(g)[0].detach()[0]) for g in gs]) for gs in graphs]
    shift = np.mean(e_train - pred[0])
    mae = 1e3 * np.abs(pred[1] + shift - e_test).mean() / n
    return {"steps": steps, "lr": lr, "lstsq_start": lstsq, "module_test_energy_mae_mev_per_atom": mae,
            "constant_test_energy_mae_mev_per_atom": 1e3 * np.abs(e_train.mean() - e_test).mean() / n,
            "heisenberg_lstsq_test_energy_mae_mev_per_atom": heisenberg_fit(train, test)}


def heisenberg_fit(train, test, shells=((2.5, 3.3), (3.9, 4.4))) -> float:
    """Test energy MAE (meV/atom) of E = c + sum_shell J_shell sum_(pairs in shell) m_i.m_j
    fitted by least squares on the training frames (NiO's Ni-Ni shells)."""
    from ase.neighborlist import neighbor_list

    def features(a):
        i, j, d = neighbor_list("ijd", a, shells[-1][1])
        m = a.arrays["REF_magmom"]
        return [0.5 * np.sum(m[i[s]] * m[j[s]]) for s in ((d > lo) & (d < hi) for lo, hi in shells)] + [1.0]

    x, y = (np.array([features(a) for a in f]) for f in (train, test))
    coef = np.linalg.lstsq(x, [a.info["REF_energy"] for a in train], rcond=None)[0]
    return float(1e3 * np.abs(y @ coef - [a.info["REF_energy"] for a in test]).mean() / len(test[0]))


def sign_check(frames, max_dr: float, nearest=(10, 30, 100)) -> dict:
    """Which sign the magnetic-force labels H have: between two frames with nearly the
    same positions, E_j - E_i + <F>.dR = -<H>.dm (trapezoid averages, exact to second
    order) if H = -dE/dm. Over the pairs with the smallest |dm|: the correlation, the
    fitted slope (+1: H = -dE/dm, -1: H = +dE/dm) and how often the signs agree."""
    E = np.array([a.info["REF_energy"] for a in frames])
    R, F = np.stack([a.positions for a in frames]), np.stack([a.arrays["REF_forces"] for a in frames])
    M, H = np.stack([a.arrays["REF_magmom"] for a in frames]), np.stack([a.arrays["REF_magforces"] for a in frames])
    i, j = np.triu_indices(len(frames), 1)
    keep = np.abs(R[j] - R[i]).max(axis=(1, 2)) < max_dr
    i, j = i[keep], j[keep]
    de = E[j] - E[i] + 0.5 * np.einsum("pax,pax->p", F[i] + F[j], R[j] - R[i])
    predicted = -0.5 * np.einsum("pax,pax->p", H[i] + H[j], M[j] - M[i])
    order = np.argsort(np.linalg.norm((M[j] - M[i]).reshape(len(i), -1), axis=1))
    out = {"max_dr_A": max_dr, "pairs": int(len(i))}
    for k in nearest:
        o = order[:k]
        out[f"nearest_{k}"] = {"corr": float(np.corrcoef(de[o], predicted[o])[0, 1]),
                               "slope": float(de[o] @ predicted[o] / (predicted[o] @ predicted[o])),
                               "sign_agreement": float(np.mean(np.sign(de[o]) == np.sign(predicted[o])))}
    return out


def self_consistency(work: Path, label: str = "magnetic sparse") -> dict:
    """Self-consistent moments (LBFGS on the learned E(R, m) from the DFT moments) on the
    test frames, split at the median of their largest |magnetic force| label: where the
    DFT moments are near equilibrium the minimum should stay close to them."""
    from ase.io import read

    from sparsekern.magnetism.graph import collate, magnetic_graph
    from sparsekern.magnetism.moments import equilibrium_moments
    from sparsekern.magnetism.storage import load_magnetic

    path = next((work / "out" / label.replace(" ", "_")).glob("*.magnetic.safetensors"))
    energy, _ = load_magnetic(path, "cpu")
    energy.double()
    test = read(work / "test.xyz", ":")
    worst = np.array([np.abs(a.arrays["REF_magforces"]).max() for a in test])
    rows = []
    for a, w in zip(test, worst):
        m_ref = a.arrays["REF_magmom"]
        m_eq = equilibrium_moments(energy, collate([magnetic_graph(a, energy.cutoff, m_ref)], "cpu")).numpy()
        magnetic = np.linalg.norm(m_ref, axis=1) > 0
        rows.append({"max_ref_magforce_ev_per_muB": float(w),
                     "mean_abs_dm_muB": float(np.linalg.norm(m_eq - m_ref, axis=1)[magnetic].mean()),
                     "mean_abs_dsize_muB": float(np.abs(np.linalg.norm(m_eq, axis=1)
                                                        - np.linalg.norm(m_ref, axis=1))[magnetic].mean())})
    cut = float(np.median(worst))
    summary = {}
    for name, pick in (("near_equilibrium", worst <= cut), ("far_from_equilibrium", worst > cut)):
        chosen = [r for r, k in zip(rows, pick) if k]
        summary[name] = {k: float(np.mean([r[k] for r in chosen])) for k in chosen[0]} | {"frames": len(chosen)}
    return {"median_split_ev_per_muB": cut, **summary, "frames": rows}


def provenance(command: str) -> dict:
    return {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU, 2 cores shared, "
                       "not a timing run",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command}


def write_results(info: dict, test, stem: Path):
    """JSON, markdown and plot of a run's ``info`` (its provenance and rows) on the
    ``test`` frames; each row gains the mean signed test energy error (per atom: a
    common offset, e.g. of the energy reference between DFT iterations, vs scatter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, natoms = info["rows"], np.array([len(a) for a in test])
    for r in rows:
        error = (np.array(r["predicted_ev"]) - r["reference_ev"]) / natoms
        r["energy_bias_mev_per_atom"] = 1e3 * float(np.mean(error))
    atomic_write(stem.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
    cols = ("energy_mae_mev_per_atom", "energy_bias_mev_per_atom", "train_energy_mae_mev_per_atom",
            "force_mae_mev_per_A", "magforce_mae_mev_per_muB", "magmom_mae_muB", "spearman")
    lines = [f"# Magnetism benchmark: {info['data']}", "", f"{info['date']}, {info['machine']}", "",
             f"    {info['command']}", "",
             "| method | " + " | ".join(cols) + " | trainable | magnetic params | wall s |",
             "|---" * (len(cols) + 4) + "|"]
    for r in rows:
        cells = ["-" if r.get(c) is None else f"{r[c]:.4g}" for c in cols]
        lines.append(f"| {r['label']} | " + " | ".join(cells)
                     + f" | {r['trainable_params']} | {r['magnetic_params']} | {r['wall_s']:.0f} |")
    lines += ["", "Spin-blind magnetic-force MAE: the error of predicting dE/dm = 0 (a spin-blind model has no "
              "moment input). Zero-shot energy MAE (SevenNet-0 + fitted E0s): "
              + ", ".join(f"{r['label']} {r['zero_shot_energy_mae_mev_per_atom']:.4g}" for r in rows) + " meV/atom."]
    lines += [f"{r['label']}: the magnetic fit chose {r['magnetic_fit']} (metrics.json's magnetic_fit)"
              for r in rows if r.get("magnetic_fit")]
    atomic_write(stem.with_suffix(".md"), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ref = np.array(rows[0]["reference_ev"])
    for r in rows:
        ax.scatter(1e3 * (ref - ref.mean()), 1e3 * (np.array(r["predicted_ev"]) - ref.mean()), label=r["label"], s=14)
    ax.plot(*[[1e3 * (ref.min() - ref.mean()), 1e3 * (ref.max() - ref.mean())]] * 2, "k--", lw=0.8)
    ax.set(xlabel="reference E - mean (meV/cell)", ylabel="predicted E - mean (meV/cell)",
           title=f"{info['data']}: test energies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)


def main() -> None:
    from ase.io import write

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("nio", "fe"), default="nio")
    p.add_argument("--n_train", type=int, default=6, help="frames per training file (nio) / iteration (fe)")
    p.add_argument("--n_test", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01, help="the base's (deltas' or weights') learning rate")
    p.add_argument("--magnetic_lr", type=float, default=0.05)
    p.add_argument("--energy_weight", type=float, default=1e4,
                   help="spin energies are ~1 meV/atom: without weight the force terms drown them")
    p.add_argument("--full", action="store_true", help="also spin-blind full fine-tuning")
    p.add_argument("--tag", default="", help="inserted in the results' file names (runs of other splits)")
    p.add_argument("--work", help="folder for the frames and the runs' outputs (default: a new temporary one)")
    p.add_argument("--module_only", type=int, metavar="STEPS",
                   help="only the magnetic module on its own (no base model), this many steps")
    p.add_argument("--lstsq_start", action="store_true",
                   help="with --module_only: start from the closed-form fit of the output layers")
    p.add_argument("--sign_check", action="store_true", help="only the sign check of the magnetic-force labels")
    p.add_argument("--render", action="store_true",
                   help="only rewrite the markdown and plot of the results JSON of these --data, --n_train, "
                        "--n_test and --tag (a run's provenance kept)")
    p.add_argument("--scf_from", help="only the self-consistent-moment check of a finished run's --work folder")
    args = p.parse_args()
    if args.module_only is not None:
        train, test = split(args.data, args.n_train, args.n_test)
        result = {**provenance("python benchmarks/magnetism.py " + " ".join(sys.argv[1:])), "n_train": len(train),
                  "n_test": len(test), **module_only(train, test, args.module_only, args.magnetic_lr,
                                                      args.energy_weight, 100.0, args.lstsq_start)}
        start = "_lstsq" if args.lstsq_start else ""
        stem = ROOT / "benchmarks/results" / f"magnetism_{args.data}_module_only{start}_{datetime.date.today().isoformat()}"
        atomic_write(stem.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        print(json.dumps(result, indent=1))
        return
    if args.sign_check:
        from ase.io import read

        d = data_dir()
        result = {**provenance("python benchmarks/magnetism.py --sign_check"),
                  **{f"nio_{k}": sign_check(read(d / f"nio_spin/NiO_data_{k}.xyz", ":"), 0.02) for k in (0, 1, 2)},
                  "fcc_fe": sign_check(read(d / "magnetic/fcc_fe_deepspin/fcc_fe.xyz", ":"), 0.15)}
        stem = ROOT / "benchmarks/results" / f"magnetism_sign_{datetime.date.today().isoformat()}"
        atomic_write(stem.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        print(json.dumps(result, indent=1))
        return
    if args.scf_from:
        stem = ROOT / "benchmarks/results" / f"magnetism_{args.data}_scf_{datetime.date.today().isoformat()}"
        result = {**provenance("python benchmarks/magnetism.py " + " ".join(sys.argv[1:])),
                  **self_consistency(Path(args.scf_from))}
        atomic_write(stem.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        print(json.dumps({k: v for k, v in result.items() if k != "frames"}, indent=1))
        return
    train, test = split(args.data, args.n_train, args.n_test)
    tag = f"_{args.tag}" if args.tag else ""
    stem = ROOT / "benchmarks/results" / f"magnetism_{args.data}{tag}_{datetime.date.today().isoformat()}"
    if args.render:
        write_results(json.loads(stem.with_suffix(".json").read_text()), test, stem)
        return
    runs = [("spin-blind sparse", "sparse", []), ("magnetic sparse", "sparse", MAGNETIC)]
    runs += [("spin-blind full", "full", [])] if args.full else []
    files = Path(args.work or tempfile.mkdtemp(prefix=f"magnetism_{args.data}_"))
    files.mkdir(parents=True, exist_ok=True)
    write(files / "train.xyz", train)
    write(files / "test.xyz", test)
    rows = [run_one(label, method, extra, files, files / "out", args, train, test) for label, method, extra in runs]
    for r in rows:
        if r["magforce_mae_mev_per_muB"] is None:
            r["magforce_mae_mev_per_muB"] = zero_magforce_mae(test)
    command = "python benchmarks/magnetism.py " + " ".join(sys.argv[1:])
    write_results({"data": args.data, **provenance(command), "n_test": len(test), "rows": rows}, test, stem)


if __name__ == "__main__":
    main()
