"""The settings of a fine-tuning run (``Settings``): every option that decides its result,
checked where they are given, and the identity a checkpoint records, which decides
whether a rerun resumes it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..integrations import cuda_graphs, family_for
from ..magnetism.energy import DM_FORMS
from .config import SEEDS
from .data import check_e0s, data_sha256_16, type_weights
from .methods import METHODS, MODES, SPARSE_LR_AT, SPARSE_MODES, default_lr
from .penalty import HUBER_DELTA, PENALTIES

LR_SCHEDULES = ("constant", "cosine")

# Left out of a checkpoint's identity: where the run goes, how it shows and what it is tested
# on, not what it trains (the stop is decided from the checkpoint's history: more --patience
# continues a stopped run).
_NOT_IDENTITY = ("out", "device", "progress", "cuda_graphs", "patience", "last_epoch", "test", "max_test",
                 "valid_batch_size")


CONTENT = "_sha256_16"  # an identity's key of a data file's content hash: the file's (train, valid) + CONTENT

_VIRIAL_FLAGS = {"stress_weight": "--virials_weight", "stage_two_stress_weight": "--stage_two_virials_weight"}


def usable_device(spec: str) -> torch.device:
    """``--device``'s torch device, or a one-line error where torch cannot use it here."""
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"--device {spec!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: this torch ({torch.__version__}) sees no CUDA device")
    return device


@dataclass
class Settings:
    """Everything that decides the result. ``epochs`` (under a constant lr), the test set
    and ``_NOT_IDENTITY``'s are left out of a checkpoint's identity: a rerun with more
    epochs or another test set resumes."""

    model: str
    train: str
    test: Optional[str]  # None: the final errors are the validation frames' (else the training frames')
    method: str
    out: str
    valid: Optional[str] = None
    valid_fraction: Optional[float] = None  # without --valid: this fraction of train held out (MACE's split)
    epochs: int = 10
    density: float = 0.03
    mode: str = "str"
    tile: int = 8
    lora_rank: int = 4
    fast_after: Optional[int] = None
    density_warmup: float = 0.0  # epochs; 0: one step
    density_peak: Optional[float] = None
    density_anneal: float = 0.0  # epochs
    element_resolved: bool = False  # shared weights: one delta per element (SparseConfig.element_resolved)
    lr: Optional[float] = None  # None: methods.default_lr(method, density), by ema
    lr_schedule: str = "constant"  # or "cosine": every group's lr decays to 0 over the run's steps
    ema: bool = True  # evaluate and save a moving average of the trained parameters (averaging.py)
    ema_decay: float = 0.99
    amsgrad: bool = True  # Adam's AMSGrad variant (MACE's default); False: plain Adam
    batch_size: int = 4
    valid_batch_size: Optional[int] = None  # frames per evaluation batch (None: batch_size); memory only
    seed: int = 0
    loss: str = "weighted"  # each residual's penalty (penalty.PENALTIES): its square, or MACE's Huber's
    huber_delta: Optional[float] = None  # with a Huber loss (default MACE's 0.01)
    energy_weight: float = 1.0
    forces_weight: float = 100.0
    stress_weight: float = 0.0  # > 0: stresses (eV/Å^3) of the frames labelled under stress_key in the loss
    virials: bool = False  # MACE's --loss virials: the stress term as virials per atom (stress residuals x V/N)
    config_type_weights: Optional[str] = None  # MACE's '{config_type: weight}', times each frame's config_weight
    e0s: str = "estimated"
    energy_key: str = "REF_energy"
    forces_key: str = "REF_forces"
    stress_key: Optional[str] = None  # with stress_weight: MACE's REF_stress unless named
    virials_key: Optional[str] = None  # with stress_weight: MACE's REF_virials unless named (stress -W/V)
    max_train: Optional[int] = None
    max_valid: Optional[int] = None
    max_test: Optional[int] = None
    device: str = "cpu"
    progress: bool = True
    magmom_key: Optional[str] = None  # magnetism (sparsekern.magnetism): moments in, E_mag beside the base
    magforces_key: Optional[str] = None
    predict_magmom: bool = False
    spin_orbit: bool = False  # E_mag's anisotropic pair terms (MagneticEnergy's spin_orbit)
    magforces_weight: float = 100.0
    magmom_weight: float = 1.0
    magnetic_lr: float = 1e-2  # Adam's learning rate of the moment head (whatever the method's)
    cuda_graphs: bool = False  # training steps replayed from CUDA graphs (graphed_step.py)
    keep_isolated_atoms: bool = False  # MACE's: train on its IsolatedAtom frames too (else set aside)
    default_dtype: Optional[str] = None  # MACE's: train (and save) the model in this dtype; None: its own
    modal: Optional[str] = None  # the fidelity trained and predicted: a SevenNet's modality, a MACE's head
    patience: Optional[int] = None  # epochs without a lower validation loss that stop the run
    last_epoch: bool = False  # the last epoch is the result, not the lowest validation loss's
    # MACE's Stage Two (its --swa): from epoch start_stage_two on, other loss weights and lr
    stage_two: bool = False
    start_stage_two: Optional[int] = None  # epochs before it; default MACE's, 3/4 of --epochs
    stage_two_energy_weight: Optional[float] = None  # defaults MACE's: 1000, 100, 10 (with stresses)
    stage_two_forces_weight: Optional[float] = None
    stage_two_stress_weight: Optional[float] = None
    stage_two_lr: Optional[float] = None  # default lr / 10 (MACE's 1e-3 after 1e-2)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {tuple(METHODS)}")
        nan = [f"--{k} {v}" for k, v in asdict(self).items() if isinstance(v, float) and not math.isfinite(v)]
        if nan:  # NaN passes every comparison's negation
            raise ValueError(f"numbers must be finite, got {', '.join(nan)}")
        self._check_scoped()
        if not 0.0 < self.density <= 1.0:  # (before the default lr, which takes its log)
            raise ValueError(f"--density must be in (0, 1], got {self.density}")
        if self.lr is None:
            self.lr = default_lr(self.method, self.density, SPARSE_LR_AT[self.ema])
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0 "
                             f"(got {self.epochs}, {self.batch_size}, {self.lr})")
        if self.valid_batch_size is not None and self.valid_batch_size < 1:
            raise ValueError(f"--valid_batch_size must be >= 1, got {self.valid_batch_size}")
        if not 0 <= self.seed < SEEDS:
            raise ValueError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.magnetic_lr <= 0:  # (a negative rate ascends: torch's Adam checks no group's)
            raise ValueError(f"--magnetic_lr must be > 0, got {self.magnetic_lr:g}")
        weights = {"--energy_weight": self.energy_weight, "--forces_weight": self.forces_weight,
                   self.flag("stress_weight"): self.stress_weight,
                   "--magforces_weight": self.magforces_weight, "--magmom_weight": self.magmom_weight}
        bad = [f"{k} {v:g}" for k, v in weights.items() if not (math.isfinite(v) and v >= 0)]
        if bad:  # a negative weight would maximise that error, silently
            raise ValueError(f"loss weights must be finite and >= 0, got {', '.join(bad)}")
        self._check_some_weight()
        self._check_stress()
        self._check_loss()
        by_type = {t: w for t, w in sorted(type_weights(self.config_type_weights).items()) if w != 1.0}
        self.config_type_weights = repr(by_type) if by_type else None  # (MACE's default '{"Default": 1.0}': None)
        self.e0s = check_e0s(self.e0s)
        if self.default_dtype not in (None, "float32", "float64"):
            raise ValueError(f"--default_dtype must be float32 or float64, got {self.default_dtype!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.element_resolved and (self.method == "full" or self.mode == "saliency"):
            raise ValueError("--element_resolved applies to deltas: --method sparse (--mode str or block) or lora")
        if self.mode not in SPARSE_MODES:
            raise ValueError(f"--mode must be {' or '.join(SPARSE_MODES)}, got {self.mode!r}")
        if self.tile < 1 or self.lora_rank < 1:
            raise ValueError(f"--tile and --lora_rank must be >= 1, got {self.tile} and {self.lora_rank}")
        if self.density_peak is not None and not self.density <= self.density_peak <= 1.0:
            raise ValueError(f"--density_peak must be in [--density, 1], got {self.density_peak}")
        if self.density_warmup < 0 or self.density_anneal < 0:
            raise ValueError("--density_warmup and --density_anneal must be >= 0 epochs")
        if self.density_warmup + self.density_anneal > max(self.epochs, 1):
            raise ValueError(f"the density schedule (--density_warmup {self.density_warmup:g} + --density_anneal "
                             f"{self.density_anneal:g} epochs) must end within --epochs {self.epochs}")
        self._check_splits()
        self._check_stage_two()
        device = usable_device(self.device)
        if self.cuda_graphs and not cuda_graphs.replayable(device):
            raise ValueError(f"--cuda_graphs replays CUDA graphs: it needs --device cuda, got {self.device}")

    def _check_scoped(self) -> None:
        """Options that this run's method, mode or magnetism does not read must keep their
        defaults: another value would change nothing, silently."""
        sparse = self.method == "sparse"
        steered = sparse and self.mode in SPARSE_MODES and MODES[self.mode].steered
        read_by = {"density": (sparse, "--method sparse"), "mode": (sparse, "--method sparse"),
                   "tile": (sparse and self.mode == "block", "--method sparse --mode block"),
                   "fast_after": (steered, "--method sparse --mode str or block"),  # (saliency's mask is fixed)
                   "density_warmup": (steered, "--method sparse --mode str or block"),
                   "density_peak": (steered, "--method sparse --mode str or block"),
                   "density_anneal": (steered, "--method sparse --mode str or block"),
                   "lora_rank": (self.method == "lora", "--method lora"),
                   "ema_decay": (self.ema, "--ema"),
                   "magforces_weight": (self.magforces_key is not None, "--magforces_key"),
                   "magmom_weight": (self.predict_magmom, "--predict_magmom"),
                   "magnetic_lr": (self.predict_magmom, "--predict_magmom")}
        default = {f.name: f.default for f in fields(self)}
        unread = [f"--{k} applies to {what} only" for k, (read, what) in read_by.items()
                  if not read and getattr(self, k) != default[k]]
        if unread:
            raise ValueError(f"{'; '.join(unread)}: leave {'it' if len(unread) == 1 else 'them'} out")

    def _check_stress(self) -> None:
        """The stress labels' keys need --stress_weight; MACE's keys by default."""
        keys = (("--stress_key", self.stress_key), ("--virials_key", self.virials_key))
        named = [flag for flag, key in keys if key is not None]
        if self.virials and not self.stress_weight:
            raise ValueError("--loss virials needs --virials_weight > 0 (it reads the stress and virials labels; "
                             "Stage Two's weight applies after it), got 0")
        if named and not self.stress_weight:  # they would read nothing, silently
            raise ValueError(f"{' and '.join(named)} {'name' if len(named) > 1 else 'names'} the stress labels "
                             f"--stress_weight trains: give --stress_weight > 0")
        if self.stress_weight:
            self.stress_key = self.stress_key or "REF_stress"
            self.virials_key = self.virials_key or "REF_virials"

    def _check_loss(self) -> None:
        if self.loss not in PENALTIES:
            raise ValueError(f"--loss must be one of {PENALTIES} (or MACE's ef, stress, forces_only on the "
                             f"command line), got {self.loss!r}")
        if self.loss == "weighted":
            if self.huber_delta is not None:  # it would change nothing, silently
                raise ValueError("--huber_delta is the delta of --loss huber or universal")
        elif self.huber_delta is None:
            self.huber_delta = HUBER_DELTA
        elif not self.huber_delta > 0:
            raise ValueError(f"--huber_delta must be > 0, got {self.huber_delta:g}")

    def _check_splits(self) -> None:
        """The data's splits, and what the validation loss decides."""
        if self.valid_fraction is not None and not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"--valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if self.valid_fraction is not None and (self.valid or self.max_valid):
            raise ValueError("--valid_fraction holds out training frames: leave out --valid and --max_valid")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"--patience must be >= 1 epochs, got {self.patience}")
        for flag, given in (("--patience", self.patience is not None), ("--last_epoch", self.last_epoch)):
            if given and not (self.valid or self.valid_fraction):  # it would do nothing, silently
                raise ValueError(f"{flag} acts on the validation loss: give --valid or --valid_fraction")
        if any(n is not None and n < 1 for n in (self.max_train, self.max_valid, self.max_test)):
            raise ValueError("--max_train, --max_valid and --max_test must be >= 1")
        for flag, given, needs in (("--max_valid", self.max_valid, self.valid),
                                   ("--max_test", self.max_test, self.test)):
            if given is not None and not needs:  # it would limit nothing, silently
                name = flag.removeprefix("--max_")
                raise ValueError(f"{flag} limits --{name}'s frames: give --{name}")

    def _check_stage_two(self) -> None:
        """Stage Two's flags need --stage_two; its defaults (MACE's) filled in."""
        flags = {"--start_stage_two": self.start_stage_two, "--stage_two_energy_weight": self.stage_two_energy_weight,
                 "--stage_two_forces_weight": self.stage_two_forces_weight,
                 "--stage_two_stress_weight": self.stage_two_stress_weight, "--stage_two_lr": self.stage_two_lr}
        given = [flag for flag, value in flags.items() if value is not None]
        if given and not self.stage_two:  # they would change nothing, silently
            raise ValueError(f"{', '.join(given)} set Stage Two: give --stage_two")
        if not self.stage_two:
            return
        if self.stage_two_stress_weight and not self.stress_weight:  # (0: the filled-in default)
            raise ValueError(f"{self.flag('stage_two_stress_weight')} weighs the stresses {self.flag('stress_weight')} "
                             f"reads: give {self.flag('stress_weight')}")
        if self.start_stage_two is None:
            self.start_stage_two = max(1, self.epochs // 4 * 3)
            if self.start_stage_two >= self.epochs:  # (the user gave no start: say what the default did)
                other = " (or --start_stage_two 0)" if self.epochs else ""
                raise ValueError(f"--stage_two starts after 3/4 of --epochs (at least 1 epoch), and --epochs "
                                 f"{self.epochs} leaves no epoch for it: give --epochs 2 or more{other}")
        if not 0 <= self.start_stage_two < self.epochs:
            raise ValueError(f"--start_stage_two must be in [0, --epochs {self.epochs}), got {self.start_stage_two}")
        defaults = {"stage_two_energy_weight": 1000.0, "stage_two_forces_weight": 100.0,
                    "stage_two_stress_weight": 10.0 if self.stress_weight else 0.0, "stage_two_lr": self.lr / 10}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        bad = [f"{self.flag(name)} {getattr(self, name):g}" for name in defaults
               if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0)]
        if bad or not self.stage_two_lr > 0:
            raise ValueError(f"Stage Two's weights must be finite and >= 0 and its lr > 0, got "
                             f"{', '.join(bad) or f'--stage_two_lr {self.stage_two_lr:g}'}")
        self._check_some_weight(stage_two=True)

    def loss_weights(self, stage_two: bool = False) -> Dict[str, Tuple[str, float]]:
        """label -> (its weight's option, the weight) of each label the loss reads
        (``stage_two``: under Stage Two's weights)."""
        names = {"energy": "energy_weight", "forces": "forces_weight", "stress": "stress_weight"}
        if stage_two:
            names = {label: f"stage_two_{name}" for label, name in names.items()}
        names.update({"magforces": "magforces_weight"} if self.magforces_key else {})
        names.update({"magmom": "magmom_weight"} if self.predict_magmom else {})
        return {label: (self.flag(name), getattr(self, name)) for label, name in names.items()}

    def _check_some_weight(self, stage_two: bool = False) -> None:
        """A loss whose every weight is 0 trains nothing: the base would be saved as the
        fine-tuned model."""
        weights = self.loss_weights(stage_two).values()
        if not any(w for _, w in weights):
            raise ValueError(f"every loss weight is 0 ({', '.join(f'{flag} {w:g}' for flag, w in weights)}): the run "
                             f"would train nothing")

    def flag(self, name: str) -> str:
        """The command-line option of setting ``name`` (under --loss virials the stress
        weights are the virials')."""
        return _VIRIAL_FLAGS[name] if self.virials and name in _VIRIAL_FLAGS else f"--{name}"

    def identity(self) -> Dict[str, object]:
        d = asdict(self)
        for k in _NOT_IDENTITY:
            d.pop(k)
        if self.lr_schedule == "constant":  # more epochs continue a finished run; a cosine's curve depends on them
            d.pop("epochs")
            d.pop("lr_schedule")  # (checkpoints from before it stay resumable, as below)
        if not self.stress_weight:  # checkpoints from before it stay resumable
            d.pop("stress_weight")
            d.pop("stress_key")
        if d["virials_key"] in (None, "REF_virials"):  # checkpoints from before it stay resumable
            d.pop("virials_key")
        if not self.stage_two:  # checkpoints from before it stay resumable
            for k in [k for k in d if "stage_two" in k]:
                d.pop(k)
        for k in ("element_resolved", "spin_orbit", "ema", "valid_fraction", "default_dtype", "keep_isolated_atoms",
                  "modal", "config_type_weights", "virials"):
            if not d[k]:  # checkpoints from before it stay resumable (ema's: with --no_ema)
                d.pop(k)
        if not self.ema:
            d.pop("ema_decay")
        if self.amsgrad:  # checkpoints from before it stay resumable
            d.pop("amsgrad")
        if self.loss == "weighted":  # checkpoints from before it stay resumable
            d.pop("loss")
            d.pop("huber_delta")
        for k in ("train", "valid"):  # the same file wherever the command runs from, and what it holds
            d[k] = str(Path(d[k]).resolve()) if d[k] else None
            if d[k] and Path(d[k]).is_file():  # (an edited file is other data: a rerun must not resume on it)
                d[k + CONTENT] = self._content(k)
        d["model"] = family_for(self.model).spec_identity(self.model)
        if self.spin_orbit:  # its Dzyaloshinskii-Moriya form (a run of an older version had the polar one)
            d["spin_orbit_dm"] = DM_FORMS[0]
        return d

    def _content(self, split: str) -> str:
        """The content hash of a split's file, read once (as the run reads it, not as it is
        by the last checkpoint's write)."""
        key = f"_{split}{CONTENT}"
        if key not in self.__dict__:
            self.__dict__[key] = data_sha256_16(getattr(self, split))
        return self.__dict__[key]

    def differences(self, theirs: dict) -> Dict[str, tuple]:
        """Where a checkpoint's identity ``theirs`` differs from this run's: name ->
        (the checkpoint's value, now). Both ways: an option the identity leaves out where it
        is off (Stage Two, --valid_fraction, ...) differs where the checkpoint has it on."""
        mine = self.identity()
        differ = {k: (theirs.get(k), v) for k, v in mine.items()
                  if theirs.get(k) != v and (k in theirs or not k.endswith(CONTENT))}  # (older: no content hash)
        differ.update({k: (v, getattr(self, k, None)) for k, v in theirs.items()
                       if k not in mine and k not in _NOT_IDENTITY and v != getattr(self, k, None)})
        return differ
