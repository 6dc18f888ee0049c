"""MACE's own fine-tuning methods beside sparsekern's, all through MACE's training script.

No MACE foundation model with aspirin's elements is available offline, so one is made:
a small MACE pretrained (``mace_run_train``) on the train splits of six rMD17 molecules
of H, C, O other than aspirin. It is then tuned on 50 aspirin frames, each method one
``mace_run_train`` process with the same flags and epochs:

- full: every weight trains (``--foundation_model``, ``--multiheads_finetuning False``);
- lora: MACE's ``--lora True --lora_rank 4``;
- multihead: MACE's replay fine-tuning (``--multiheads_finetuning True --pt_train_file``),
  replaying 10 pretraining frames per molecule;
- sparse 3 % / 0.5 %: ``python -m sparsekern mace-train ... --sparse_density``;
- sparse 3 % + replay: the sparse delta under MACE's replay fine-tuning (the same flags as
  multihead's).

Every model (and the zero-shot foundation) is scored on aspirin test frames and, for
forgetting, on test frames of two pretraining molecules.

    .venv-mace/bin/python benchmarks/mace_finetune.py [--workdir /tmp/mace_finetune] [--jobs 2] [--finetune_dtype float64]

Finished runs (a ``run.json`` beside the model) are read back, not rerun. Writes
benchmarks/results/mace_finetune_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ase.io
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsekern.files import atomic_write  # noqa: E402
from sparsekern.locations import data_dir  # noqa: E402


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


PRETRAIN = ("ethanol", "malonaldehyde", "benzene", "toluene", "naphthalene", "salicylic")  # H, C, O only, as aspirin
FORGET = ("ethanol", "toluene")
KEYS = ["--energy_key", "REF_energy", "--forces_key", "REF_forces"]
METHODS = {  # method -> (module run, its own flags)
    "full": ("mace.cli.run_train", ["--multiheads_finetuning", "False"]),
    "lora r4": ("mace.cli.run_train", ["--multiheads_finetuning", "False", "--lora", "True", "--lora_rank", "4"]),
    # 0.3.16 sets lr 1e-4 and EMA for multihead unless --force_mh_ft_lr: same lr as the others here
    "multihead replay": ("mace.cli.run_train", ["--multiheads_finetuning", "True", "--force_mh_ft_lr", "True"]),
    "sparse 3 %": ("sparsekern", ["mace-train", "--sparse_density", "0.03"]),
    "sparse 0.5 %": ("sparsekern", ["mace-train", "--sparse_density", "0.005"]),
    "sparse 3 % + replay": ("sparsekern", ["mace-train", "--sparse_density", "0.03", "--multiheads_finetuning",
                                           "True", "--force_mh_ft_lr", "True"]),
}


def replays(method: str) -> bool:
    """Whether ``method`` is MACE's replay fine-tuning (a pt_head beside the tuned one)."""
    own = METHODS[method][1]
    return "--multiheads_finetuning" in own and own[own.index("--multiheads_finetuning") + 1] == "True"


def write_frames(path: Path, sources) -> Path:
    """Concatenates (file, ase index) slices into one extxyz (in the work directory, not the repo)."""
    if not path.exists():
        frames = [a for f, index in sources for a in ase.io.read(f, index=index)]
        ase.io.write(path.with_suffix(".tmp.xyz"), frames, format="extxyz")
        path.with_suffix(".tmp.xyz").rename(path)
    return path


def run_once(name: str, cmd: list, out: Path, threads: int) -> dict:
    """Runs ``cmd`` in ``out`` unless a finished run.json is there; returns that record."""
    record = out / "run.json"
    if record.exists():
        return json.loads(record.read_text())
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    model = out / "checkpoints_dir" / f"{name}.model"
    if rc != 0 or not model.exists():
        tail = (out / "log.txt").read_text().splitlines()[-25:]
        return {"name": name, "error": f"exit {rc}", "log_tail": tail, "cmd": shlex.join(cmd)}
    rec = {"name": name, "model": str(model), "wall_s": round(wall, 1), "cmd": shlex.join(cmd)}
    write_text(record, json.dumps(rec, indent=1))
    return rec


def train_cmd(module: str, extra: list, name: str, train: Path, valid: Path, args, batch: int, dtype: str) -> list:
    return [sys.executable, "-m", module, *extra, "--name", name, "--train_file", str(train),
            "--valid_file", str(valid), *KEYS, "--batch_size", str(batch), "--valid_batch_size", "20",
            "--device", "cpu", "--default_dtype", dtype, "--seed", str(args.seed),
            "--model_dir", "checkpoints_dir", "--checkpoints_dir", "checkpoints_dir", "--log_dir", "logs",
            "--results_dir", "results", "--work_dir", "."]


def score(model_file: str, frames: list, head: str, dtype: str, train_frames: list) -> dict:
    """Energy MAE (meV/atom; raw, and after removing the model's mean per-atom error on the
    training frames) and force MAE (meV/Å) of one model, batched."""
    import torch
    from mace import data
    from mace.tools import AtomicNumberTable, torch_geometric, torch_tools

    torch_tools.set_default_dtype(dtype)
    model = torch.load(model_file, map_location="cpu", weights_only=False).to(getattr(torch, dtype))
    heads = list(getattr(model, "heads", ["Default"]))
    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])

    def predict(atoms_list):
        loader = torch_geometric.dataloader.DataLoader(
            [data.AtomicData.from_config(data.config_from_atoms(a, head_name=head), z_table=z_table,
                                         cutoff=float(model.r_max), heads=heads) for a in atoms_list],
            batch_size=50, shuffle=False)
        e, f = [], []
        for batch in loader:
            out = model(batch.to_dict(), training=False, compute_force=True)
            e.append(out["energy"].detach().numpy())
            f.append(out["forces"].detach().numpy())
        return np.concatenate(e), np.concatenate(f)

    def per_atom_errors(atoms_list):
        e, f = predict(atoms_list)
        n = np.array([len(a) for a in atoms_list])
        ref_e = np.array([a.info["REF_energy"] for a in atoms_list])
        ref_f = np.concatenate([a.arrays["REF_forces"] for a in atoms_list])
        return (e - ref_e) / n, f - ref_f

    result = {}
    offset = float(per_atom_errors(train_frames)[0].mean()) if train_frames else 0.0
    for name, atoms_list in frames.items():
        de, df = per_atom_errors(atoms_list)
        result[name] = {"energy_mae": 1000 * float(np.abs(de).mean()),
                        "energy_mae_offset": 1000 * float(np.abs(de - offset).mean()),
                        "force_mae": 1000 * float(np.abs(df).mean()), "frames": len(atoms_list)}
    result["train_offset_mev_per_atom"] = 1000 * offset
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mace_finetune"))
    p.add_argument("--pretrain_epochs", type=int, default=50)
    p.add_argument("--pretrain_batch_size", type=int, default=10)
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs, every method")
    p.add_argument("--n_train", type=int, default=50)
    p.add_argument("--n_test", type=int, default=1000, help="aspirin test frames")
    p.add_argument("--n_forget", type=int, default=100, help="test frames per pretraining molecule scored")
    p.add_argument("--replay_per_molecule", type=int, default=10)
    p.add_argument("--sparse_lr_factor", type=float, help="default: mace-train's (the lr by density)")
    p.add_argument("--batch_size", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="the pretraining's")
    p.add_argument("--finetune_dtype", choices=("float32", "float64"), help="the fine-tuning runs' (default: --dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="fine-tuning processes at once (one thread each)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--results_tag", default="", help="appended to the results files' name (e.g. _lrx30)")
    args = p.parse_args()
    command = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                          else sys.executable, "benchmarks/mace_finetune.py", *sys.argv[1:]])
    rmd = data_dir() / "rmd17"
    w = args.workdir
    (w / "data").mkdir(parents=True, exist_ok=True)

    # Data: everything under the work directory, the shared data only read.
    pt_train = write_frames(w / "data/pretrain_train.xyz", [(rmd / f"revised_{m}/train.xyz", ":") for m in PRETRAIN])
    pt_valid = write_frames(w / "data/pretrain_valid.xyz", [(rmd / f"revised_{m}/valid.xyz", ":5") for m in PRETRAIN])
    replay = write_frames(w / f"data/replay_{args.replay_per_molecule}.xyz",
                          [(rmd / f"revised_{m}/train.xyz", f":{args.replay_per_molecule}") for m in PRETRAIN])
    ft_train = write_frames(w / f"data/aspirin_train_{args.n_train}.xyz",
                            [(rmd / "revised_aspirin/train.xyz", f":{args.n_train}")])
    ft_valid = write_frames(w / "data/aspirin_valid_10.xyz", [(rmd / "revised_aspirin/valid.xyz", ":10")])

    # Pretraining: no isolated atoms in rMD17, so E0s by least squares over the compositions.
    arch = ["--model", "MACE", "--hidden_irreps", "32x0e+32x1o", "--max_L", "1", "--correlation", "2",
            "--r_max", "5.0", "--num_interactions", "2", "--E0s", "average", "--lr", "0.01",
            "--max_num_epochs", str(args.pretrain_epochs)]
    pt_name = f"foundation_e{args.pretrain_epochs}" + ("" if args.dtype == "float32" else f"_{args.dtype}")
    # One thread: two OpenMP threads on the 2 shared cores ran an epoch ~10x slower (spinning).
    pt_cmd = train_cmd("mace.cli.run_train", arch, pt_name, pt_train, pt_valid, args, args.pretrain_batch_size,
                       args.dtype)
    pre = run_once(pt_name, pt_cmd, w / pt_name, threads=1)
    if "error" in pre:
        sys.exit("pretraining failed:\n" + "\n".join(pre["log_tail"]))
    foundation = pre["model"]

    # Fine-tuning: the foundation's E0s kept (--E0s foundation; 'average' is refused for
    # multihead), architecture and r_max read from the foundation by MACE itself.
    common = ["--foundation_model", foundation, "--E0s", "foundation", "--lr", "0.01",
              "--max_num_epochs", str(args.epochs)]
    ft_dtype = args.finetune_dtype or args.dtype
    tag = (f"{pt_name}_n{args.n_train}_e{args.epochs}" + (f"_seed{args.seed}" if args.seed else "")  # one foundation
           + ("" if ft_dtype == args.dtype else f"_{ft_dtype}"))
    jobs = {}
    for method in args.methods:
        module, own = METHODS[method]
        extra = list(own)
        if replays(method):
            extra += ["--pt_train_file", str(replay), "--pt_valid_file", str(pt_valid)]
        name = "ft_" + method.replace(" %", "pct").replace(" + ", "_").replace(" ", "_").replace(".", "p")
        if module == "sparsekern" and args.sparse_lr_factor is not None:
            extra += ["--sparse_lr_factor", str(args.sparse_lr_factor)]
            name += f"_lrx{args.sparse_lr_factor:g}"  # a sweep of the factor keeps each run
        cmd = train_cmd(module, extra + common, name, ft_train, ft_valid, args, args.batch_size, ft_dtype)
        jobs[method] = (name, cmd, w / tag / name)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = dict(zip(jobs, pool.map(lambda j: run_once(*j, threads=1), jobs.values())))

    # Scores, each model once (cached beside its run).
    test = {"aspirin": ase.io.read(rmd / "revised_aspirin/test.xyz", index=f":{args.n_test}")}
    test.update({m: ase.io.read(rmd / f"revised_{m}/test.xyz", index=f":{args.n_forget}") for m in FORGET})
    train_frames = ase.io.read(ft_train, index=":")
    rows = []
    for method, rec in [("zero-shot", pre)] + list(runs.items()):
        if "error" in rec:
            rows.append({"method": method, **rec})
            continue
        cache = Path(rec["model"]).parent.parent / f"scores_t{args.n_test}_f{args.n_forget}.json"
        if not cache.exists():
            heads = ["Default", "pt_head"] if method != "zero-shot" and replays(method) else ["Default"]
            dtype = args.dtype if method == "zero-shot" else ft_dtype
            write_text(cache, json.dumps({h: score(rec["model"], test, h, dtype, train_frames) for h in heads}))
        for head, s in json.loads(cache.read_text()).items():
            label = method if head == "Default" else f"{method} (pt_head)"
            rows.append({"method": label, "wall_s": None if method == "zero-shot" else rec["wall_s"], **s})

    report = {"date": datetime.date.today().isoformat(), "command": command,
              "machine": "2-core CPU VM shared with other experiments (wall times indicative only), "
                         f"{args.jobs} fine-tuning processes at once, 1 thread each",
              "settings": {k: str(v) for k, v in vars(args).items()}, "pretraining": pre, "rows": rows}
    stem = ROOT / "benchmarks/results" / f"mace_finetune_{report['date']}{args.results_tag}"
    write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))
    write_text(stem.with_suffix(".md"), markdown(report, args))
    print(stem.with_suffix(".md").read_text())


def markdown(report: dict, args) -> str:
    sparse_lr = (f"lr x {args.sparse_lr_factor:g}" if args.sparse_lr_factor is not None
                 else "mace-train's default lr for their density")
    lines = [f"# MACE fine-tuning methods on a small pretrained MACE ({report['date']})", "",
             f"`{report['command']}`", "", f"Machine: {report['machine']}.", "",
             f"Foundation: MACE 32x0e+32x1o, max_L 1, correlation 2, 2 layers, r_max 5, {args.dtype}, "
             f"E0s average, {args.pretrain_epochs} epochs on the 100 train frames of each of "
             f"{', '.join(PRETRAIN)} (wall {report['pretraining'].get('wall_s')} s, 1 thread). "
             f"Fine-tuning ({args.finetune_dtype or args.dtype}): first {args.n_train} frames of rMD17 aspirin train, "
             f"{args.epochs} epochs, lr 0.01, "
             f"batch {args.batch_size}, E0s of the foundation; sparse deltas at {sparse_lr}; "
             f"the replay methods replay {args.replay_per_molecule} pretraining frames per molecule each epoch "
             "(so more steps per epoch) and MACE switches them to its universal (Huber) loss; their Default head is "
             "the tuned model, the pt_head row the replay head. "
             f"Test: {args.n_test} aspirin test frames; forgetting: {args.n_forget} test frames each of "
             f"{', '.join(FORGET)}. E (offset): energy MAE after removing the model's mean per-atom energy "
             f"error on the {args.n_train} training frames (the E0s, fitted on other molecules, leave an offset).",
             "",
             "| method | aspirin E meV/atom | E (offset) | aspirin F meV/Å | "
             + " | ".join(f"{m} F meV/Å" for m in FORGET) + " | wall s |",
             "|---|---|---|---|" + "---|" * len(FORGET) + "---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * (4 + len(FORGET)))
            continue
        a = r["aspirin"]
        lines.append(f"| {r['method']} | {a['energy_mae']:.2f} | {a['energy_mae_offset']:.2f} | {a['force_mae']:.1f} | "
                     + " | ".join(f"{r[m]['force_mae']:.1f}" for m in FORGET) + f" | {r['wall_s'] or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
