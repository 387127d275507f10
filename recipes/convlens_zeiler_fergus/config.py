"""Every default of the recipe in one typed config, :class:`TrainConfig`.

    from convlens_zeiler_fergus.config import TrainConfig
    cfg = TrainConfig().replace(experiment="zfnet-wide", epochs=70)   # ImageNet, Section 3
    cfg = TrainConfig.miniature()                                     # the embedded default

The defaults are Section 3 of Zeiler & Fergus (2014) ("Training Details"): SGD with mini-batches
of 128, learning rate 10⁻², momentum 0.9, weights drawn at 10⁻² scale and biases 0, dropout 0.5 on
fc6/fc7, the learning rate divided by 10 when the validation error plateaus, 70 epochs, every conv
filter whose RMS exceeds 10⁻¹ renormalised to 10⁻¹, inputs: smallest side 256, centre 256×256
crop, per-pixel mean subtracted, random 224×224 crops with horizontal flips, ten-crop evaluation.
Where the paper is silent the choice is ours and says so in its comment.

An unknown key is an error, never ignored (:meth:`TrainConfig.from_dict`); the resolved config is
written next to every run (``config.json``) and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from convlens._registry import close_matches
from convlens.errors import ConvlensError

__all__ = ["TrainConfig", "ConfigError", "scaled_snapshot_epochs", "PAPER_EPOCHS"]

#: The paper's schedule length (Section 3: "stopped training after 70 epochs"; Fig. 4 shows
#: epochs up to 64 of it).
PAPER_EPOCHS = 70

_CHOICES = {
    "precision": ("auto", "bf16", "fp32"),
    "channels_last": ("auto", "on", "off"),
    "fused_optimizer": ("auto", "on", "off"),
    "decode": ("auto", "cpu", "device"),
    "init": ("paper", "kaiming", "torch"),
    "init_rule": ("fixed", "fan-in"),
}


class ConfigError(ConvlensError):
    """A config key that does not exist, or a value it cannot take."""


@dataclass(frozen=True)
class TrainConfig:
    """The recipe's whole configuration (see the module docstring for the paper's defaults)."""

    # -- what to train ------------------------------------------------------------------------
    experiment: str = "zfnet"  # a name of experiments.EXPERIMENTS (Tables 2 and 3)
    data: str | None = None  # ImageFolder root with train/ and val/; None: the miniature
    seed: int = 0

    # -- model (Fig. 3; input geometry of Section 3) -----------------------------------------
    input_size: int = 224  # the random crop the network sees
    resize: int = 256  # smallest side resized to this, then the centre resize×resize crop
    width_mult: float = 1.0  # scales every conv/fc width (miniatures only)
    init: str = "paper"  # "paper": N(0, init_std²) weights, zero biases (Section 3)
    init_std: float = 1e-2
    # "fixed": every layer N(0, init_std²) (Section 3). "fan-in": each layer's σ scaled by
    # sqrt(fan-in in the full-size model at 224 / its fan-in), so that every layer keeps the
    # paper's forward gain σ·sqrt(fan-in) at any width or input size (the miniature).
    init_rule: str = "fixed"
    dropout: float = 0.5

    # -- optimisation (Section 3) ------------------------------------------------------------
    epochs: int = PAPER_EPOCHS
    batch_size: int = 128  # global: split evenly over DDP ranks
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0  # the paper states none (Krizhevsky et al. used 5e-4)
    filter_rms_radius: float = 0.1  # 0 disables the renormalisation
    lr_factor: float = 0.1  # "anneal ... when the validation error plateaus"
    # The paper annealed by hand; our rule: no gain of plateau_threshold (absolute, in val
    # top-1 error) for plateau_patience epochs → lr × lr_factor, never below min_lr.
    plateau_patience: int = 3
    plateau_threshold: float = 0.002
    min_lr: float = 1e-5
    # lr × lr_factor once more for the last N epochs, plateau or not (0: off). Short runs
    # never plateau; the paper's hand annealing ran to convergence.
    final_anneal_epochs: int = 0
    flip: bool = True

    # -- evaluation --------------------------------------------------------------------------
    eval_crops: int = 10  # final evaluation: 4 corners + centre, each with its flip (Section 3)
    epoch_eval_crops: int = 1  # per-epoch validation (drives the plateau rule): centre crop
    train_eval_images: int = 10_000  # Table 3's "Train Top-1" on this many training images

    # -- speed -------------------------------------------------------------------------------
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: str = "auto"  # auto: on for CUDA
    compile: bool = False  # torch.compile the model
    fused_optimizer: str = "auto"  # fused SGD where the build supports it, else foreach
    workers: int = -1  # DataLoader workers per rank; -1: min(8, CPUs per rank)
    # torch intra-op threads when training on the CPU (0: torch's default). The miniature uses
    # 1: its tensors are small, and on a shared machine one thread is 2-5x faster than two
    # threads that wait on each other.
    cpu_threads: int = 0
    pin_memory: bool = True  # (CUDA only)
    decode: str = "auto"  # JPEG decode: "device" (torchvision.io.decode_jpeg on the GPU) or cpu
    pack: bool = False  # read sharded uint8 memmaps of the 256×256 crops (see data.pack)
    pack_dir: str | None = None  # default: <cache_dir>/packed-<key>
    cache_dir: str | None = None  # mean image, packs; default ~/.cache/convlens/zeiler-fergus

    # -- never lose progress -----------------------------------------------------------------
    ckpt_minutes: float = 30.0  # a checkpoint every N minutes (and at every epoch end)
    ckpt_every_steps: int = 0  # and/or every N steps (0: off)
    log_every: int = 50  # steps per metrics.jsonl record (the loss is averaged over them)

    # -- analysis (Figs. 2, 4-7; Tables 1, 4-7 through the probes) ----------------------------
    snapshot_epochs: tuple[int, ...] = (1, 2, 5, 10, 20, 30, 40, 64)  # Fig. 4, of 70 epochs
    evolution_images: int = 512  # images searched for each feature's strongest activation
    evolution_channels: int = 6  # features shown per layer in the Fig. 4 panel
    probes: tuple[str, ...] = ("deconv", "occlusion", "correspondence", "invariance", "linear")
    probe_images: int = 6  # validation images given to the probes
    # per-probe options, e.g. {"linear": {"data": "/data/caltech101"}}; the strings "{val}" and
    # "{train}" stand for this run's split folders. correspondence gets no images (it masks the
    # parts of its own embedded faces) unless given "parts".
    probe_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    members: int = 1  # models trained per experiment (seeds seed, seed+1, ...) for an ensemble

    # -- the miniature (used only when data is None) ---------------------------------------
    mini_train_per_class: int = 400
    mini_val_per_class: int = 100
    mini_image_size: int = 80
    mini_data_seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("snapshot_epochs", "probes"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    # -- construction --------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (``config.json``, a checkpoint); unknown keys are an error."""
        return cls().replace(**values)

    @classmethod
    def miniature(cls, **changes: Any) -> TrainConfig:
        """The embedded default: a quarter-width ZFNet at 64×64 on the generated 12-class set
        (``synthetic.py``), small enough to train on two CPU cores in a few minutes.

        What differs from Section 3, and why: 72×72 centre crops and 64×64 random crops instead
        of 256 and 224 (the same share of context), quarter widths, batches of 64 (more updates
        in few epochs), ten epochs, no dropout (a regulariser for 70 epochs; in ten it only
        slows learning), and ``init_rule="fan-in"``: the paper's σ = 10⁻² is kept where a
        layer's fan-in is the full model's (conv1) and scaled by sqrt(full fan-in / fan-in)
        elsewhere (0.02 for conv2-5, fc7, fc8; 0.12 for fc6, whose fan-in falls from 9,216 to
        64), so that every layer has the full-size model's gain. With 10⁻² everywhere the
        quarter-width logits start ~10⁻⁴ and nothing is learnt within ten epochs; with a
        uniform 0.04 conv1's filters stay visibly noisy; σ ≥ 0.05 everywhere, He init, or
        lr ≥ 0.03 kill the ReLUs. The plateau rule waits one epoch, and the last two epochs
        run at a tenth of the rate whatever the plateaus (ten epochs never converge). The rest
        is the paper's:
        lr 10⁻², momentum 0.9, the filter RMS clipping at 0.1 on 0-255 inputs minus the mean
        image, flips, ten-crop evaluation. The crops come from a pack (``data.pack``), as they
        would for a fast ImageNet run.
        """
        base = cls(
            input_size=64,
            resize=72,
            width_mult=0.25,
            init_rule="fan-in",
            dropout=0.0,
            epochs=10,
            batch_size=64,
            pack=True,
            plateau_patience=1,
            final_anneal_epochs=2,
            train_eval_images=600,
            ckpt_minutes=5.0,
            log_every=10,
            evolution_images=600,
            probe_images=6,
            workers=0,
            cpu_threads=1,
            # Table 7 on the miniature's own held-out pictures, sized for minutes
            probe_options={
                "linear": {
                    "data": "{val}",
                    "train_per_class": "10,30",
                    "test_per_class": 20,
                    "folds": 1,
                    "classifier": "softmax",
                    "c_grid": "0.1,1,10",
                    "cv_folds": 2,
                }
            },
        )
        return base.replace(**changes)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; an unknown key raises :class:`ConfigError` naming it."""
        names = self.field_names()
        for key in changes:
            if key not in names:
                raise ConfigError(f"config has no key {key!r}{close_matches(key, names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples → lists); :meth:`from_dict` reads it back."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def __hash__(self) -> int:  # a dict field: hash what is hashable
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    # -- derived ---------------------------------------------------------------------------

    @property
    def is_miniature(self) -> bool:
        return self.data is None

    def scaled_snapshot_epochs(self) -> list[int]:
        return scaled_snapshot_epochs(self.snapshot_epochs, self.epochs)

    # -- validation ------------------------------------------------------------------------

    def _validate(self) -> None:
        def check(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"config {key}={getattr(self, key)!r}: {what}")

        for key in (
            "epochs",
            "batch_size",
            "input_size",
            "resize",
            "eval_crops",
            "epoch_eval_crops",
            "log_every",
            "members",
            "mini_train_per_class",
            "mini_val_per_class",
            "mini_image_size",
        ):
            v = getattr(self, key)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, "must be >= 1")
        for key in (
            "plateau_patience",
            "final_anneal_epochs",
            "ckpt_every_steps",
            "train_eval_images",
            "cpu_threads",
            "evolution_images",
            "evolution_channels",
            "probe_images",
        ):
            v = getattr(self, key)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, key, "must be >= 0")
        check(self.resize >= self.input_size, "resize", f"must be >= input_size={self.input_size}")
        check(self.eval_crops in (1, 10), "eval_crops", "must be 1 (centre) or 10")
        check(self.epoch_eval_crops in (1, 10), "epoch_eval_crops", "must be 1 or 10")
        for key in ("lr", "init_std", "width_mult"):
            check(math.isfinite(getattr(self, key)) and getattr(self, key) > 0, key, "must be > 0")
        for key in (
            "momentum",
            "weight_decay",
            "filter_rms_radius",
            "min_lr",
            "ckpt_minutes",
            "plateau_threshold",
        ):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(0.0 < self.lr_factor <= 1.0, "lr_factor", "must be in (0, 1]")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(isinstance(self.workers, int) and self.workers >= -1, "workers", "must be >= -1")
        for key, allowed in _CHOICES.items():
            check(getattr(self, key) in allowed, key, f"must be one of {', '.join(allowed)}")
        check(all(int(e) >= 1 for e in self.snapshot_epochs), "snapshot_epochs", "epochs >= 1")
        check(
            isinstance(self.probe_options, dict)
            and all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.probe_options.items()
            ),
            "probe_options",
            "must map probe names to dicts of options",
        )


def scaled_snapshot_epochs(epochs_of_70: tuple[int, ...] | list[int], epochs: int) -> list[int]:
    """Fig. 4's snapshot epochs (given for a 70-epoch run) scaled to a run of ``epochs``:
    ``round(e · epochs / 70)``, at least 1, duplicates merged. A 70-epoch run keeps them as they
    are; a 6-epoch run snapshots epochs 1, 2, 3, 5."""
    if epochs == PAPER_EPOCHS:
        return sorted({int(e) for e in epochs_of_70 if e <= epochs})
    out = {max(1, min(epochs, math.floor(e * epochs / PAPER_EPOCHS + 0.5))) for e in epochs_of_70}
    return sorted(out)
