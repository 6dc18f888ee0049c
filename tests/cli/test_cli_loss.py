"""MACE's Huber losses in ``sparsekern finetune`` (``--loss huber`` and ``universal``,
``--huber_delta``): each residual's penalty is torch's Huber, the conditional deltas are
MACE's, the whole loss is MACE's own loss module's on MACE's own predictions, the
validation loss is the training loss of the whole set, and the command runs, resumes only
under the same loss and refuses what would change nothing in one line."""

import json
from types import SimpleNamespace

import pytest
import torch
from ase.stress import voigt_6_to_full_3x3_stress

import sparsekern
from sparsekern.cli import main
from sparsekern.finetune.penalty import force_delta, penalty


def _settings(loss, huber_delta=None, **weights):
    return SimpleNamespace(device="cpu", loss=loss, huber_delta=huber_delta, batch_size=2, valid_batch_size=None,
                           magforces_weight=0.0, magmom_weight=0.0,
                           **{"energy_weight": 1.0, "forces_weight": 100.0, "stress_weight": 10.0, **weights})


def test_the_penalty_is_torchs_huber_and_its_derivatives():
    r = torch.linspace(-0.3, 0.3, 61, dtype=torch.float64).requires_grad_()
    for delta in (0.01, 0.1, 1.0):
        want = torch.nn.functional.huber_loss(r, torch.zeros_like(r), reduction="none", delta=delta)
        got = penalty(r, delta)
        assert torch.equal(got, want) and (got < 0.5 * r.square() - 1e-12).any() == (delta < 0.3)
        (g_want,) = torch.autograd.grad(want.sum(), r, create_graph=True)
        (g_got,) = torch.autograd.grad(got.sum(), r, create_graph=True)
        assert torch.equal(g_got, g_want)
        assert torch.equal(torch.autograd.grad(g_got.sum(), r)[0], torch.autograd.grad(g_want.sum(), r)[0])
    assert torch.equal(penalty(r), r.square())


def test_the_universal_deltas_are_maces_conditional_huber():
    """Reference forces of norms in each of MACE's four intervals, the bounds included."""
    pytest.importorskip("mace")
    from mace.modules.loss import conditional_huber_forces

    g = torch.Generator().manual_seed(0)
    norms = torch.tensor([0.5, 99.9, 100.0, 150.0, 200.0, 250.0, 300.0, 450.0], dtype=torch.float64)
    direction = torch.nn.functional.normalize(torch.randn(8, 3, generator=g, dtype=torch.float64), dim=1)
    ref = norms[:, None] * direction
    pred = ref + 0.05 * torch.randn(8, 3, generator=g, dtype=torch.float64)
    settings = _settings("universal", 0.02)
    got = penalty(pred - ref, force_delta(settings, ref)).mean()
    assert float(got) == pytest.approx(float(conditional_huber_forces(ref, pred, 0.02)), rel=1e-14)
    assert force_delta(settings, ref)[:, 0].tolist() == pytest.approx([0.02, 0.02, 0.014, 0.014, 0.008, 0.008,
                                                                       0.002, 0.002], rel=1e-15)
    assert force_delta(_settings("huber", 0.02), ref) == 0.02 and force_delta(_settings("weighted"), ref) is None


class _MaceBatch(dict):
    """What MACE's loss modules read of a batch: labels by key, ptr, per-frame weights."""

    def __getattr__(self, name):
        return self[name]


def _samples(files, tmp_path, unlabelled=(), shift=None):
    """The tiny MACE model (float64, unpatched) and its training frames with EMT stresses
    (but on the frames ``unlabelled``), one atom each force past 100, 200 and 300 eV/Å
    (universal's intervals); the model's family."""
    from helpers import with_stresses
    from sparsekern.finetune import evaluation
    from sparsekern.finetune.data import read_frames
    from sparsekern.integrations.base import family_for

    train, _ = with_stresses(files, tmp_path, unlabelled)
    family = family_for(str(files / "tiny.model"))
    model = family.load(str(files / "tiny.model"), "cpu")
    samples = evaluation.make_samples(family, model, read_frames(train, stress_key="REF_stress"), shift or {})
    for i, s in enumerate(samples):
        s.forces[i] += torch.tensor([150.0, 100.0 * i, 0.0], dtype=s.forces.dtype)
    return family, model, samples


@pytest.fixture(scope="module")
def labelled(files, tmp_path_factory):
    """``_samples``, every frame with a stress label, the model patched; MACE's own
    predictions of them (before the patch)."""
    family, model, samples = _samples(files, tmp_path_factory.mktemp("labelled"))
    batch = family.collate([s.graph for s in samples], "cpu")
    pred = {k: v.detach() for k, v in family.outputs(model, batch, False, stress=True).items()}
    return family, sparsekern.patch(model), samples, pred


@pytest.mark.parametrize("loss", ["huber", "universal"])
def test_the_huber_losses_are_maces(labelled, loss):
    """evaluation.loss under --loss huber / universal is MACE's WeightedHuberEnergyForcesStressLoss
    / UniversalLoss of MACE's own predictions (every frame with a stress label: MACE's mean
    over frames is the labelled frames' mean), at a delta that both Huber branches meet."""
    pytest.importorskip("mace")
    from mace.modules.loss import UniversalLoss, WeightedHuberEnergyForcesStressLoss

    from sparsekern.finetune import evaluation

    family, model, samples, pred = labelled
    ref = _MaceBatch(energy=torch.tensor([s.energy for s in samples], dtype=torch.float64),
                     forces=torch.cat([s.forces for s in samples]), stress=torch.stack([s.stress for s in samples]),
                     ptr=torch.tensor([0, *torch.tensor([s.natoms for s in samples]).cumsum(0).tolist()]))
    ones = torch.ones(len(samples), dtype=torch.float64)
    ref.update(weight=ones, energy_weight=ones, forces_weight=ones, stress_weight=ones)
    delta = float((pred["forces"] - ref["forces"]).abs().median())
    assert (pred["forces"] - ref["forces"]).abs().max() > 2 * delta  # both branches
    kind = {"huber": WeightedHuberEnergyForcesStressLoss, "universal": UniversalLoss}[loss]
    want = kind(energy_weight=2.0, forces_weight=100.0, stress_weight=10.0, huber_delta=delta)(ref, pred)
    got = float(evaluation.loss(family, model, samples, _settings(loss, delta, energy_weight=2.0)).detach())
    assert got == pytest.approx(float(want), rel=1e-10)
    assert float(evaluation.loss(family, model, samples, _settings("weighted", energy_weight=2.0)).detach()) > 2 * got


FRAME_WEIGHTS = {"config_weight": [2.0, 1.0, 0.7], "config_type": ["surface", "Default", "bulk"],
                 "config_energy_weight": [1.0, 0.0, 1.0], "config_forces_weight": [1.0, 3.0, 1.0],
                 "config_stress_weight": [1.0, 1.0, 0.5]}  # by training frame; --config_type_weights below
TYPE_WEIGHTS = {"surface": 1.5, "Default": 1.0}


def _weigh(path):
    """The frames of ``path`` rewritten with FRAME_WEIGHTS."""
    from ase.io import read, write

    frames = read(path, ":")
    for i, atoms in enumerate(frames):
        atoms.info.update({k: v[i] for k, v in FRAME_WEIGHTS.items()})
    write(path, frames)
    return path


def _weighted_batch(samples, third: str, label: torch.Tensor) -> "_MaceBatch":
    """What MACE's loss modules read of ``samples`` read with FRAME_WEIGHTS and TYPE_WEIGHTS:
    energies, forces, ``third`` (stress or virials) ``label``, and MACE's weights."""
    ref = _MaceBatch(energy=torch.tensor([s.energy for s in samples], dtype=torch.float64),
                     forces=torch.cat([s.forces for s in samples]), **{third: label},
                     ptr=torch.tensor([0, *torch.tensor([s.natoms for s in samples]).cumsum(0).tolist()]))
    ref.update({k: torch.tensor(v, dtype=torch.float64) for k, v in (
        ("weight", [3.0, 1.0, 0.7]), ("energy_weight", [1.0, 0.0, 1.0]), ("forces_weight", [1.0, 3.0, 1.0]),
        (f"{third}_weight", [1.0, 1.0, 0.5]))})
    return ref


def _patched_loss(family, model, samples) -> torch.Tensor:
    from sparsekern.finetune import evaluation

    sparsekern.patch(model)
    return evaluation.loss(family, model, samples, _settings("weighted", energy_weight=2.0)).detach()


def test_the_weighted_loss_is_maces_with_its_per_frame_weights(files, tmp_path):
    """MACE's config_weight, config_type weights and per-label weights read from the file:
    evaluation.loss is MACE's WeightedEnergyForcesStressLoss of MACE's own predictions
    with MACE's weights (every frame with a stress label)."""
    pytest.importorskip("mace")
    from mace.modules.loss import WeightedEnergyForcesStressLoss

    from helpers import with_stresses
    from sparsekern.finetune import evaluation
    from sparsekern.finetune.data import read_frames
    from sparsekern.integrations.base import family_for

    train = _weigh(with_stresses(files, tmp_path)[0])
    family = family_for(str(files / "tiny.model"))
    model = family.load(str(files / "tiny.model"), "cpu")
    frames = read_frames(train, stress_key="REF_stress", by_type=TYPE_WEIGHTS)
    assert [f.weights for f in frames] == [{"energy": 3.0, "forces": 3.0, "stress": 3.0, "magforces": 3.0,
                                            "magmom": 3.0}, {"energy": 0.0, "forces": 3.0},
                                           {"energy": 0.7, "forces": 0.7, "stress": 0.35, "magforces": 0.7,
                                            "magmom": 0.7}]
    samples = evaluation.make_samples(family, model, frames, {})
    pred = {k: v.detach() for k, v in family.outputs(model, family.collate([s.graph for s in samples], "cpu"), False,
                                                     stress=True).items()}
    ref = _weighted_batch(samples, "stress", torch.stack([s.stress for s in samples]))
    want = WeightedEnergyForcesStressLoss(energy_weight=2.0, forces_weight=100.0, stress_weight=10.0)(ref, pred)
    got = _patched_loss(family, model, samples)
    assert float(got) == pytest.approx(float(want), rel=1e-10)
    for s in samples:
        s.weights = {}
    unweighted = evaluation.loss(family, model, samples, _settings("weighted", energy_weight=2.0)).detach()
    assert abs(float(unweighted) / float(got) - 1) > 0.05


def test_the_virials_loss_is_maces(files, tmp_path):
    """--loss virials: evaluation.loss is MACE's WeightedEnergyForcesVirialsLoss of MACE's
    own predictions (its virials -S V), per-frame weights included, every frame labelled
    (half as stresses, half as virials)."""
    pytest.importorskip("mace")
    from ase.io import read, write
    from mace.modules.loss import WeightedEnergyForcesVirialsLoss

    from helpers import with_stresses
    from sparsekern.finetune import evaluation
    from sparsekern.finetune.data import read_frames
    from sparsekern.integrations.base import family_for

    train = _weigh(with_stresses(files, tmp_path)[0])
    frames = read(train, ":")
    stress = frames[1].info.pop("REF_stress")  # frame 1's label as MACE's virials W = -S V
    frames[1].info["REF_virials"] = -voigt_6_to_full_3x3_stress(stress).reshape(-1) * frames[1].get_volume()
    frames[1].info["config_virials_weight"] = frames[1].info.pop("config_stress_weight")
    write(train, frames)
    family = family_for(str(files / "tiny.model"))
    model = family.load(str(files / "tiny.model"), "cpu")
    samples = evaluation.make_samples(family, model, read_frames(train, stress_key="REF_stress", virials_key=
                                                                 "REF_virials", by_type=TYPE_WEIGHTS, virials=True), {})
    pred = {k: v.detach() for k, v in family.outputs(model, family.collate([s.graph for s in samples], "cpu"), False,
                                                     stress=True).items()}
    volume = torch.tensor([a.get_volume() for a in frames], dtype=torch.float64).view(-1, 1, 1)
    pred["virials"] = -pred["stress"] * volume
    ref = _weighted_batch(samples, "virials", -torch.stack([s.stress for s in samples]) * volume)
    want = WeightedEnergyForcesVirialsLoss(energy_weight=2.0, forces_weight=100.0, virials_weight=10.0)(ref, pred)
    assert float(_patched_loss(family, model, samples)) == pytest.approx(float(want), rel=1e-10)


@pytest.mark.parametrize("loss", ["weighted", "huber", "universal"])
@pytest.mark.parametrize("weights", [False, True], ids=["unweighted", "weighted"])
def test_validation_loss_is_the_training_loss_of_the_whole_set(files, tmp_path, loss, weights):
    """residual_loss of the residuals is ``loss`` over the same frames as one batch, stress
    term included (an unlabelled frame adds nothing to either), under each penalty
    (universal's deltas travel with the residuals), per-frame weights too (travelling
    with the residuals as well)."""
    from sparsekern.finetune import evaluation

    family, model, samples = _samples(files, tmp_path, unlabelled=(1,), shift={13: 0.5, 29: -0.25})
    if weights:
        samples[0].weights, samples[2].weights = {"energy": 2.0, "forces": 0.5, "stress": 3.0}, {"stress": 0.0}
    sparsekern.patch(model)
    settings = _settings(loss, None if loss == "weighted" else 0.05, energy_weight=2.0, stress_weight=1e3)
    res = evaluation.residuals(family, model, samples, settings)
    weighted = ["energy_weights", "forces_weights", "stress_weights"] if weights else []
    assert set(res) == {"energy", "shift", "forces", "stress", *(["forces_delta"] if loss == "universal" else []),
                        *weighted}
    assert res["stress"].numel() == 2 * 9
    whole = float(evaluation.loss(family, model, samples, settings).detach())
    assert evaluation.residual_loss(res, settings) == pytest.approx(whole, rel=1e-12)
    settings.stress_weight = 0.0
    assert evaluation.residual_loss(res, settings) < whole
    errors = evaluation.errors(res)
    scored = res["stress"][:9] if weights else res["stress"]  # (weight 0: left out)
    assert errors.stress_mae_mev_per_A3 == pytest.approx(1e3 * float(scored.abs().mean()), rel=1e-14)
    assert errors.energy_mae_mev_per_atom == pytest.approx(1e3 * float(res["energy"].abs().mean()), rel=1e-14)


def _run(files, out, *extra):
    return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"),
                 "--method", "sparse", "--epochs", "1", "--out", str(out), "--no_progress", *extra])


def test_a_virials_run_trains_and_records_it(files, tmp_path):
    from helpers import with_stresses

    train, test = with_stresses(files, tmp_path, virials=True)
    out = tmp_path / "virials"
    assert _run(files, out, "--train", str(train), "--test", str(test), "--loss", "virials") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["settings"]["virials"], m["settings"]["stress_weight"], m["settings"]["loss"]) == (True, 1.0, "weighted")
    assert m["test_stress_mae_mev_per_A3"] > 0


def test_a_huber_run_resumes_only_under_its_loss(files, capsys):
    out = files / "huber"
    assert _run(files, out, "--loss", "huber", "--huber_delta", "0.05") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["settings"]["loss"], m["settings"]["huber_delta"], m["settings"]["stress_weight"]) == ("huber", 0.05, 0.0)
    capsys.readouterr()
    assert _run(files, out, "--loss", "huber", "--huber_delta", "0.1") == 2
    assert "huber_delta" in capsys.readouterr().err
    assert _run(files, out, "--loss", "universal", "--huber_delta", "0.05") == 2
    assert _run(files, out, "--loss", "huber", "--huber_delta", "0.05", "--epochs", "2") == 0  # resumed


@pytest.mark.parametrize("flags, said", [
    (["--huber_delta", "0.1"], "--huber_delta is the delta of --loss huber or universal"),
    (["--loss", "stress", "--huber_delta", "0.1"], "--huber_delta is the delta of --loss huber or universal"),
    (["--loss", "huber", "--huber_delta", "0"], "--huber_delta must be > 0, got 0"),
    (["--loss", "universal", "--huber_delta", "-1"], "--huber_delta must be > 0, got -1"),
    (["--loss", "dipole"], "--loss dipole is not offered"),
    (["--loss", "virials", "--virials_weight", "0"], "--loss virials needs --virials_weight > 0"),
])
def test_a_delta_that_changes_nothing_is_refused_in_one_line(files, capsys, flags, said):
    try:
        code = _run(files, files / "refused", *flags)
    except SystemExit as stop:  # (the parser's refusals)
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (files / "refused").exists()
