"""``sparsekern report``: the PNG and JSON of where an adapter's update went equal
``stats`` of the model, the transition-metal l = 2 verdict follows the data, and
old-format or corrupt adapters give clear errors."""

import copy
import json
import os

import pytest
import torch

pytest.importorskip("mace")
pytest.importorskip("matplotlib")
from ase.data import chemical_symbols  # noqa: E402
from e3nn import o3  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.cli import main as cli  # noqa: E402
from sparsekern.finetune import SparseConfig, calibrate_density, iter_deltas  # noqa: E402
from sparsekern.finetune.report import (build_report, d_shell_verdict, l2_against_l01, l_profile,  # noqa: E402
                                        _count, profile_lines, summary_line, verdict_line,
                                        write_report)
from sparsekern.integrations.mace.models import mace_mp0_shaped  # noqa: E402

TM = {"Fe", "Ni"}
BREAKDOWNS = ("total_params", "changed_params", "density", "by_layer", "by_path", "by_l", "by_element",
              "by_element_l")


@pytest.fixture(scope="module")
def base():
    # H, O and two transition metals; l = 2 per-element paths in the symmetric contraction
    return mace_mp0_shaped("small", seed=3, num_elements=4, atomic_numbers=[1, 8, 26, 28],
                           hidden_irreps=o3.Irreps("4x0e+4x2e"), max_ell=2, correlation=2, radial_MLP=[8])


def _adapted(base, boost_tm: bool):
    """A prepared copy whose per-element l = 2 weights of the transition metals (or of
    the other elements) are the largest, so the density controller activates them."""
    model = sparsekern.prepare(copy.deepcopy(base), SparseConfig(density=0.05))
    symbols = [chemical_symbols[int(z)] for z in model.atomic_numbers]
    rows = [i for i, s in enumerate(symbols) if (s in TM) == boost_tm]
    with torch.no_grad():
        for *_, delta in iter_deltas(model):
            for g in delta.groups:
                if g.per_element and g.l == 2:
                    g.view(delta.v.data)[rows] *= 1e3
    calibrate_density(model)
    return model


def _hand_l2_density(model):
    """Changed / all per-element l = 2 weights, for TM and other elements, pooled over
    the elements with any changed per-element weight."""
    symbols = [chemical_symbols[int(z)] for z in model.atomic_numbers]
    l2 = {s: [0, 0] for s in symbols}
    touched = set()
    with torch.no_grad():
        for *_, delta in iter_deltas(model):
            changed = delta().view(-1) != 0
            for g in delta.groups:
                for i, s in enumerate(symbols):
                    if not g.per_element:
                        continue
                    n = int(g.view(changed)[i].sum())
                    touched |= {s} if n else set()
                    if g.l == 2:
                        l2[s][0] += n
                        l2[s][1] += g.shape[1] * g.shape[2]
    return {tm: sum(l2[s][0] for s in touched if (s in TM) == tm) / sum(l2[s][1] for s in touched if (s in TM) == tm)
            for tm in (True, False)}


@pytest.mark.parametrize("boost_tm", [True, False])
def test_report_equals_stats_and_verdict_follows_data(base, tmp_path, capsys, boost_tm):
    model = _adapted(base, boost_tm)
    path = sparsekern.save_adapter(model, tmp_path / "a.safetensors")
    assert cli(["report", str(path), "--out", str(tmp_path / "out")]) == 0
    png, js = tmp_path / "out" / "a.report.png", tmp_path / "out" / "a.report.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in (path, png, js))  # as open() makes them
    report = json.loads(js.read_text())
    expected = sparsekern.stats(model)
    for key in BREAKDOWNS:
        assert report[key] == expected[key], key
    assert set(report["by_element"]) == {"H", "O", "Fe", "Ni"} and "2" in report["by_l"]
    orders = list(report["by_l"])  # l = 0, 1, 2, ... then the radial weights, in the JSON and the plot
    assert orders == [str(l) for l in range(len(orders) - 1)] + ["radial"], orders
    assert all(list(by_l) == sorted(by_l, key=int) for by_l in report["by_element_l"].values())
    verdict = report["d_shell"]
    density = _hand_l2_density(model)
    assert verdict["transition_metals"]["l2_density"] == pytest.approx(density[True], rel=1e-12)
    assert verdict["other_elements"]["l2_density"] == pytest.approx(density[False], rel=1e-12)
    assert verdict["l2_larger_share_for_transition_metals"] is boost_tm
    assert ("yes" if boost_tm else "no") in capsys.readouterr().out


def test_report_equals_stats_without_the_radial_weights(base, tmp_path):
    """Radial MLPs left out of the deltas (``include_radial=False``): ``stats`` counts out
    of the weights the deltas may change, as the adapter does (it counted the radial
    weights too: two densities for one adapter)."""
    model = sparsekern.prepare(copy.deepcopy(base), SparseConfig(density=0.05, include_radial=False))
    calibrate_density(model)
    report, expected = build_report(sparsekern.save_adapter(model, tmp_path / "a.safetensors")), sparsekern.stats(model)
    for key in BREAKDOWNS:
        assert report[key] == expected[key], key
    with_radial = sparsekern.stats(_adapted(base, True))
    assert "radial" not in expected["by_l"] and "radial" in with_radial["by_l"]
    assert expected["total_params"] == with_radial["total_params"] - with_radial["by_l"]["radial"]["total"]


def test_lora_gets_no_l_verdict(base, tmp_path):
    """A LoRA update changes every weight of a block it touches: neither the share
    question nor the transition metals' l = 2 against l = 0, 1 is answered."""
    model = sparsekern.prepare(copy.deepcopy(base), SparseConfig(mode="lora", lora_rank=2, seed=2))
    with torch.no_grad():
        for *_, delta in iter_deltas(model):
            for p in delta.parameters():
                p.copy_(torch.randn_like(p))
    report = build_report(sparsekern.save_adapter(model, tmp_path / "lora.safetensors"))
    assert report["changed_params"] > 0 and report["l_profile"]
    assert report["d_shell"]["l2_larger_share_for_transition_metals"] is None
    assert report["d_shell"]["answer"] == "undetermined" and "LoRA update" in report["d_shell"]["reason"]
    assert report["transition_metals_l2_vs_l01"] is None
    assert "dense by construction" in report["note"]  # (why its densities read 100 %)


def test_verdict_pools_only_elements_the_update_touched(base, tmp_path):
    model = _adapted(base, True)
    symbols = [chemical_symbols[int(z)] for z in model.atomic_numbers]
    fe = symbols.index("Fe")
    with torch.no_grad():
        for *_, delta in iter_deltas(model):
            for g in delta.groups:
                if g.per_element:
                    g.view(delta.v.data)[fe] = 0  # S(0, tau) = 0: Fe is left as it was
    calibrate_density(model)
    assert sparsekern.stats(model)["by_element"]["Fe"]["changed"] == 0
    path = sparsekern.save_adapter(model, tmp_path / "a.safetensors")
    verdict = build_report(path)["d_shell"]
    assert verdict["transition_metals"]["elements"] == ["Ni"]
    assert verdict["transition_metals"]["l2_density"] == pytest.approx(_hand_l2_density(model)[True], rel=1e-12)

    with torch.no_grad():  # no transition metal touched: no verdict
        ni = symbols.index("Ni")
        for *_, delta in iter_deltas(model):
            for g in delta.groups:
                if g.per_element:
                    g.view(delta.v.data)[ni] = 0
    calibrate_density(model)
    verdict = build_report(sparsekern.save_adapter(model, tmp_path / "b.safetensors"))["d_shell"]
    assert verdict["l2_larger_share_for_transition_metals"] is None
    assert "changed no per-element weights of transition metals" in verdict["reason"]

    with torch.no_grad():  # nothing touched at all: it says so, not that the transition metals were missed
        for *_, delta in iter_deltas(model):
            delta.v.zero_()
    calibrate_density(model)
    verdict = build_report(sparsekern.save_adapter(model, tmp_path / "c.safetensors"))["d_shell"]
    assert verdict["l2_larger_share_for_transition_metals"] is None
    assert verdict["reason"] == "the update changed no per-element weights"


def test_verdict_on_a_model_without_element_indexed_weights():
    """A SevenNet's only per-element weights are the l = 0 embedding: no verdict, and the
    reason says so (not that the update missed the transition metals), naming the model
    the adapter was made for (not always SevenNet-0)."""
    verdict = d_shell_verdict({"by_element_l": {}}, "7net-mf-0")
    assert verdict["l2_larger_share_for_transition_metals"] is None
    assert "the model (7net-mf-0) has no element-indexed path weights" in verdict["reason"]
    assert "SevenNet-0" not in verdict["reason"]


def test_a_tie_is_equal_not_no():
    """Every per-element weight changed (an element-resolved run at 100 %): neither the
    transition metals' l = 2 nor their l = 0, 1 is larger, and the report says "equal"."""
    full = {l: {"changed": n, "total": n, "density": 1.0} for l, n in (("0", 8), ("1", 4), ("2", 2))}
    s = {"by_element_l": {"Ni": full, "O": full}}
    verdict, tm = d_shell_verdict(s), l2_against_l01(s)
    assert verdict["l2_larger_share_for_transition_metals"] is None and verdict["answer"] == "equal"
    assert tm["l2_larger"] is None and tm["answer"] == "equal"
    report = {"d_shell": verdict, "l_profile": l_profile(s), "transition_metals_l2_vs_l01": tm}
    assert "transition metals: equal (100.00 %" in verdict_line(report)
    assert profile_lines(report)[-1].endswith("l = 2 larger: equal")


@pytest.fixture
def figures(monkeypatch):
    """The figures saved while the test runs (their titles and panels stay readable)."""
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k))[1])
    return saved


def test_report_names_method_base_model_and_modal(base, tmp_path, figures):
    """The text, the JSON and the PNG's title say sparse or LoRA, of which base model, at
    which fidelity (a multi-fidelity model's --modal, stored in the adapter)."""
    sparse = sparsekern.save_adapter(_adapted(base, True), tmp_path / "sparse" / "adapter.safetensors",
                                     extra_metadata={"base_model": "/runs/7net-mf-0.pth", "modal": "PBE"})
    lora = sparsekern.prepare(copy.deepcopy(base), SparseConfig(mode="lora", lora_rank=2))
    lora = sparsekern.save_adapter(lora, tmp_path / "lora" / "adapter.safetensors")
    for path, method, line in ((sparse, "sparse (str)", "sparse (str) adapter sparse/adapter.safetensors of "
                                                          "7net-mf-0.pth, modal PBE: "),
                               (lora, "LoRA (rank 2)", "LoRA (rank 2) adapter lora/adapter.safetensors: ")):
        report = build_report(path)
        assert report["method"] == method and summary_line(report).startswith(line)
        write_report(report, tmp_path / "out" / method[:4], "adapter.report")
        assert figures[-1].get_suptitle().startswith(line)
        assert ("dense by construction" in figures[-1].get_suptitle()) is (method[0] == "L")
    assert (report["modal"], report["base_model"]) == (None, None)  # (an adapter saved without them)
    assert json.loads((tmp_path / "out" / "spar" / "adapter.report.json").read_text())["modal"] == "PBE"


def test_another_adapters_report_is_not_replaced(base, tmp_path, capsys):
    """Every run names its adapter adapter.safetensors: a report in --out is rewritten for
    the adapter it describes (the same file, or the same content moved) and refused, in
    one line and before the base model loads, for another one."""
    sparse = sparsekern.save_adapter(_adapted(base, True), tmp_path / "sparse" / "adapter.safetensors")
    lora = sparsekern.prepare(copy.deepcopy(base), SparseConfig(mode="lora", lora_rank=2))
    lora = sparsekern.save_adapter(lora, tmp_path / "lora" / "adapter.safetensors")
    out = tmp_path / "R"
    js = out / "adapter.report.json"
    assert cli(["report", str(sparse), "--out", str(out)]) == 0
    kept = js.read_text()
    assert json.loads(kept)["adapter"] == str(sparse.resolve())
    capsys.readouterr()
    assert cli(["report", str(lora), "--out", str(out), "--model", str(tmp_path / "missing.model")]) == 2
    err = capsys.readouterr().err
    assert err == (f"sparsekern report: error: {js} is the report of another adapter ({sparse.resolve()}): "
                   "choose another --out\n")
    assert js.read_text() == kept
    moved = tmp_path / "moved" / "adapter.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(sparse.read_bytes())
    for same in (sparse, moved):  # its own report: rewritten
        assert cli(["report", str(same), "--out", str(out)]) == 0
    with pytest.raises(ValueError, match="report of another adapter"):  # the library call checks too
        write_report(build_report(lora), out, "adapter.report")

    old = {k: v for k, v in json.loads(kept).items() if k != "adapter_sha256"}  # a report of an older sparsekern
    for folder, code in ((sparse.parent, 0), (out, 2)):  # beside its adapter: its report; elsewhere: unknown
        (folder / "adapter.report.json").write_text(json.dumps({**old, "adapter": "sparse/adapter.safetensors"}))
        assert cli(["report", str(sparse), "--out", str(folder)]) == code
    js.write_text("[1, 2]")
    capsys.readouterr()
    assert cli(["report", str(sparse), "--out", str(out)]) == 2
    assert f"{js} exists and is not a sparsekern report: choose another --out" in capsys.readouterr().err


def _panels(fig) -> dict:
    return {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}


def test_report_png_panels(base, tmp_path, figures):
    """The PNG shows the density by element and l (what the transition-metal question
    reads), only the elements the update touched (a foundation model knows ~90), how many
    weights each bar counts, and densities from 0 (an all-zero update: not -0.04 %)."""
    model = _adapted(base, True)
    symbols = [chemical_symbols[int(z)] for z in model.atomic_numbers]
    with torch.no_grad():
        for *_, delta in iter_deltas(model):
            for g in delta.groups:
                if g.per_element:
                    g.view(delta.v.data)[symbols.index("H")] = 0  # H left as it was
    calibrate_density(model)
    report = build_report(sparsekern.save_adapter(model, tmp_path / "a.safetensors"))
    write_report(report, tmp_path, "a.report")
    panels = _panels(figures[-1])
    cells = panels["by element and l (per-element weights the update touched)"]
    assert [t.get_text() for t in cells.get_yticklabels()] == list(report["l_profile"]) == ["O", "Fe", "Ni"]
    orders = [t.get_text() for t in cells.get_xticklabels()]
    assert orders == ["l = 0", "l = 2"]  # (the orders of its per-element weights)
    expected = [[100 * by_l[l[4:]]["density"] for l in orders] for by_l in report["l_profile"].values()]
    assert cells.images[0].get_array().tolist() == expected
    elements = panels["by element (per-element weights; red: transition metals)"]
    assert "1 unchanged element not shown" in elements.get_title()
    total = report["by_element"]["O"]["total"]
    assert [t.get_text() for t in elements.get_xticklabels()] == [f"{e} ({total})" for e in ("O", "Fe", "Ni")]
    assert [t.get_text() for t in panels["by irrep order l of the path"].get_xticklabels()] == [
        f"{l} ({report['by_l'][l]['total']})" for l in report["by_l"]]
    assert [_count(n) for n in (512, 40_912, 52_302_016)] == ["512", "40.9k", "52.3M"]  # (larger layers' labels)

    with torch.no_grad():  # nothing changed (--epochs 0)
        for *_, delta in iter_deltas(model):
            delta.v.zero_()
    calibrate_density(model)
    write_report(build_report(sparsekern.save_adapter(model, tmp_path / "a.safetensors")), tmp_path, "a.report")
    bars = [ax for ax in figures[-1].axes if ax.patches]
    assert len(bars) == 3 and all(ax.get_ylim() == (0, 1) for ax in bars)


def test_old_format_adapter_needs_its_base_and_corrupt_files_fail(base, tmp_path, capsys):
    model = _adapted(base, True)
    path = sparsekern.save_adapter(model, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k not in ("groups", "element_labels")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata["version"] = "1"
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)

    assert cli(["report", str(old)]) == 2
    assert "--model BASE" in capsys.readouterr().err
    base_file = tmp_path / "base.model"
    torch.save(base, base_file)
    assert cli(["report", str(old), "--model", str(base_file)]) == 0
    assert cli(["report", str(path)]) == 0
    from_base = json.loads((tmp_path / "old.report.json").read_text())
    from_adapter = json.loads((tmp_path / "new.report.json").read_text())
    for key in BREAKDOWNS + ("d_shell",):
        assert from_base[key] == from_adapter[key], key

    merged = tmp_path / "merged.model"  # a model, not its adapter: say which file to give
    torch.save(base, merged)
    capsys.readouterr()
    assert cli(["report", str(merged)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is a model, not a sparsekern adapter: give the adapter file" in err

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    assert cli(["report", str(corrupt)]) == 2
    assert "not a readable sparsekern adapter" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "missing.safetensors")]) == 2  # bad input: exit 2, as finetune's
    assert capsys.readouterr().err.startswith("sparsekern report: error: adapter not found")
    assert cli(["report", str(path), "--out", str(corrupt)]) == 2  # a file, not a folder: before any work
    assert f"output folder {corrupt} is a file" in capsys.readouterr().err
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    groups = json.loads(metadata["groups"])
    stem = next(iter(groups))
    for key, value in (("groups", "[]"), ("element_labels", "[]"),
                       ("groups", json.dumps({stem: [{**groups[stem][0], "shape": [2, 3]}]}))):
        damaged = tmp_path / "damaged.safetensors"
        save_file(tensors, str(damaged), metadata={**metadata, key: value})
        assert cli(["report", str(damaged)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "weight-group metadata is damaged" in err, err
