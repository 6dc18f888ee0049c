"""The d-shell analysis (issue 11 item 3; not CI): does the update of a transition metal
go to l = 2 paths more than the update of other elements, or more than its own l = 0, 1
paths? SevenNet-0 fine-tuned with element-resolved deltas (``--element_resolved``: its
irrep linears, shared by all elements, get one delta per element), then ``sparsekern
report`` on the adapter: per element the density of the update at each l.

Splits and frames: benchmarks/magnetism.py's (nio: NiO_data_0 + _1 / NiO_data_2; fe:
FCC Fe iter-1..3 / iter-7), spin-blind (energies and forces only).
The mask is chosen by the training signal, not by the random start (benchmarks/NOTES.md,
"the active set barely moves"): every delta entry of the training data's elements trains
at the first step (--density_peak 1), and the density controller anneals to the target
over the first epoch, keeping the entries that grew most. The target is about 3 % of the
present elements' entries (--density counts all 89 elements' entries).

Resumable: a case with a metrics.json is not retrained (an interrupted one resumes from
its checkpoint); the reports are rebuilt from the adapters.

    .venv-sevenn/bin/python benchmarks/dshell.py [--data nio fe] [--model 7net-0] [--n_train 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from magnetism import split  # noqa: E402  (the same frames as the magnetism benchmark)

ELEMENTS = {"nio": 2, "fe": 1}  # elements in the training data


def run_case(args, data: str, work: Path) -> Path:
    """Fine-tune (unless done) and report; returns the report JSON."""
    from ase.io import write

    out = work / f"{data}_{args.model}"
    if not (out / "metrics.json").exists():
        train, test = split(data, args.n_train, args.n_test)
        write(work / f"{data}_train.xyz", train)
        write(work / f"{data}_test.xyz", test)
        density = args.per_element_density * ELEMENTS[data] / 89  # SevenNet-0's 89 elements
        subprocess.run([sys.executable, "-m", "sparsekern", "finetune", "--model", args.model,
                        "--train", str(work / f"{data}_train.xyz"), "--test", str(work / f"{data}_test.xyz"),
                        "--method", "sparse", "--element_resolved", "--density", f"{density:.3g}",
                        "--density_peak", "1", "--density_anneal", "1", "--epochs", str(args.epochs),
                        "--lr", str(args.lr),
                        "--batch_size", str(args.batch_size), "--out", str(out), "--no_progress"],
                       check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "sparsekern", "report", str(out / "adapter.safetensors")],
                   check=True, cwd=ROOT)
    if not (out / "gradient_by_l.json").exists():
        from ase.io import read

        grads = gradient_by_l(args.model, read(work / f"{data}_train.xyz", f":{args.n_grad}"))
        (out / "gradient_by_l.json").write_text(json.dumps(grads, indent=1))
    return out / "adapter.report.json"


def gradient_by_l(model_name: str, frames) -> dict:
    """Why an l gets little of the update: per element and l, the RMS gradient of the
    force loss (mean squared force error; energies need the E0 fit) with respect to the
    element-resolved delta entries at the base model, over ``frames`` (one batch)."""
    import torch
    from ase.data import chemical_symbols

    import sparsekern
    from sparsekern.finetune import SparseConfig, iter_deltas
    from sparsekern.integrations import family_for

    family = family_for(model_name)
    model = family.load(model_name, "cpu")
    zs = sorted({int(z) for a in frames for z in a.numbers})
    sparsekern.prepare(model, SparseConfig(element_resolved=True, elements=zs, density=1.0))
    for *_, d in iter_deltas(model):
        d.steps = 1  # past the warmup: every nonzero entry active, so every one gets its gradient
    model.train()
    _, forces = family.predict(model, family.collate([family.graph(model, a) for a in frames], "cpu"), True)
    ref = torch.cat([torch.as_tensor(a.arrays["REF_forces"]) for a in frames]).to(forces)
    (forces - ref).square().mean().backward()
    sums = {}
    index = family.element_index(model)
    for *_, d in iter_deltas(model):
        for g in d.groups if d.elements else ():
            grad = g.view(d.v.grad)
            for z in zs:
                acc = sums.setdefault(chemical_symbols[z], {}).setdefault(str(g.l), [0.0, 0])
                acc[0] += float(grad[index[z]].double().square().sum())
                acc[1] += grad[index[z]].numel()
    return {e: {l: (sq / n) ** 0.5 for l, (sq, n) in sorted(by_l.items())} for e, by_l in sums.items()}


def markdown(results: dict) -> str:
    """The result file: machine, date, command, and per case the update by element and l."""
    lines = [f"# d-shell analysis, {results['date']}", "",
             f"Machine: {results['machine']} ({results['processor']}), CPU, shared with other jobs. "
             f"Command: `{results['command']}` (SevenNet's venv, SPARSEKERN_DATA set; model {results['model']}, "
             "`--element_resolved`).", ""]
    for data, case in results["cases"].items():
        lines += [f"## {data}: {case['n_train']} training / {case['n_test']} test frames, {case['wall_s']:.0f} s "
                  f"training, {100 * case['density']:.4f} % of all {case['total_params']:,} delta entries changed",
                  "", f"Adam lr {case['lr']:g}; training loss per epoch "
                  + ", ".join(f"{x:.4g}" for x in case["train_loss"]) + f". Test force MAE "
                  f"{case['test_force_mae_mev_per_A']:.2f} meV/Å (zero-shot "
                  f"{case['zero_shot_test_force_mae_mev_per_A']:.2f}).",
                  "",
                  "| element | l | changed / entries | density | share of the element's update |",
                  "|---|---|---|---|---|"]
        for element, by_l in case["l_profile"].items():
            lines += [f"| {element} | {l} | {v['changed']:,} / {v['total']:,} | {100 * v['density']:.2f} % | "
                      f"{100 * v['share']:.1f} % |" for l, v in by_l.items()]
        ls = list(next(iter(case["rms_gradient_by_l"].values())))
        lines += ["", "RMS gradient of the force loss at the base, per delta entry (why an l gets little):", "",
                  "| element | " + " | ".join(f"l = {l}" for l in ls) + " |", "|---|" + "---|" * len(ls)]
        lines += [f"| {e} | " + " | ".join(f"{g:.2e}" for g in by_l.values()) + " |"
                  for e, by_l in case["rms_gradient_by_l"].items()]
        lines += ["", f"- {case['verdict_line']}"]
        tm = case["transition_metals_l2_vs_l01"]
        if tm:
            lines.append(f"- transition metals, l = 2 against l = 0, 1: {100 * tm['l2_density']:.2f} % vs "
                         f"{100 * tm['l01_density']:.2f} % of their entries changed")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=["nio", "fe"], choices=tuple(ELEMENTS))
    p.add_argument("--model", default="7net-0")
    p.add_argument("--n_train", type=int, default=4, help="frames per training file (nio) / iteration (fe)")
    p.add_argument("--n_test", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--per_element_density", type=float, default=0.03)
    p.add_argument("--lr", type=float, default=0.01, help="Adam's (the sparse default 0.1 moves every entry of the "
                   "dense first epoch by 0.1 per step: the training loss jumped 4e2-1e4 x in the second epoch)")
    p.add_argument("--n_grad", type=int, default=2, help="training frames of the gradient diagnostic")
    p.add_argument("--work", default="/tmp/sparsekern-dshell", help="(a folder per learning rate inside)")
    args = p.parse_args()
    from sparsekern.finetune.report import verdict_line

    work = Path(args.work) / f"lr{args.lr:g}"
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
               "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
               "model": args.model, "cases": {}}
    for data in args.data:
        report_path = run_case(args, data, work)
        report = json.loads(report_path.read_text())
        metrics = json.loads((report_path.parent / "metrics.json").read_text())
        results["cases"][data] = {"l_profile": report["l_profile"], "d_shell": report["d_shell"],
                                  "verdict_line": verdict_line(report),
                                  "transition_metals_l2_vs_l01": report["transition_metals_l2_vs_l01"],
                                  "density": report["density"], "total_params": report["total_params"],
                                  "wall_s": metrics["wall_s"], "lr": metrics["settings"]["lr"],
                                  "train_loss": [h["train_loss"] for h in metrics["history"]],
                                  "test_force_mae_mev_per_A": metrics["test_force_mae_mev_per_A"],
                                  "zero_shot_test_force_mae_mev_per_A": metrics["zero_shot_test_force_mae_mev_per_A"],
                                  "n_train": metrics["n_train"], "n_test": metrics["n_test"],
                                  "rms_gradient_by_l": json.loads((report_path.parent / "gradient_by_l.json")
                                                                  .read_text())}
        print(json.dumps(results["cases"][data]["l_profile"], indent=1))
    model = "" if args.model == "7net-0" else f"{args.model}_"
    stem = ROOT / "benchmarks" / "results" / f"dshell_{model}lr{args.lr:g}_{results['date']}"
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")  # (not with_suffix: "lr0.01")
    Path(f"{stem}.md").write_text(markdown(results))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
