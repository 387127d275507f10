"""The named experiments: Table 2's single models and Table 3's architectural changes, each a
:class:`~convlens.models.ZFNetConfig` / :class:`~convlens.models.AlexNetConfig` change.

    convlens recipe zeiler-fergus --data /data/imagenet --experiment zfnet-wide
    convlens recipe zeiler-fergus --experiment alexnet-no-fc67          # the miniature version

Every variant of Table 3 is expressible with the model configs of ``convlens.models``: removed
layers 3,4 (``conv34=False``: conv5 then reads conv2's maps), removed fc7 or fc6,7 (``fc_sizes``),
fc widths and the 512/1024/512 middle layers. Ensembles (Table 2's "5 convnets", "(a) & (b)
combined") are not experiments but softmax averages of trained ones (``evaluate.ensemble``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convlens._registry import close_matches
from convlens.models import AlexNet, AlexNetConfig, ZFNet, ZFNetConfig
from convlens_zeiler_fergus.config import ConfigError, TrainConfig

__all__ = [
    "Experiment",
    "EXPERIMENTS",
    "get_experiment",
    "build_model",
    "model_config",
    "fan_in_stds",
]

WIDE = (96, 256, 512, 1024, 512)


@dataclass(frozen=True)
class Experiment:
    """A named architecture: ``arch`` (``zfnet``/``alexnet``) and its config ``changes``."""

    name: str
    arch: str
    description: str
    changes: dict[str, Any] = field(default_factory=dict)


_ALL = (
    Experiment("alexnet", "alexnet", "Krizhevsky et al. (2012), dense connections (Table 2/3)"),
    Experiment("alexnet-no-conv34", "alexnet", "Table 3: removed layers 3,4", {"conv34": False}),
    Experiment("alexnet-no-fc7", "alexnet", "Table 3: removed layer 7", {"fc_sizes": (4096,)}),
    Experiment("alexnet-no-fc67", "alexnet", "Table 3: removed layers 6,7", {"fc_sizes": ()}),
    Experiment(
        "alexnet-no-conv34-fc67",
        "alexnet",
        "Table 3: removed layers 3,4,6,7",
        {"conv34": False, "fc_sizes": ()},
    ),
    Experiment(
        "alexnet-fc2048", "alexnet", "Table 3: layers 6,7 of 2048 units", {"fc_sizes": (2048, 2048)}
    ),
    Experiment(
        "alexnet-fc8192", "alexnet", "Table 3: layers 6,7 of 8192 units", {"fc_sizes": (8192, 8192)}
    ),
    Experiment("zfnet", "zfnet", "Fig. 3 (Table 2 '1 convnet as per Fig. 3')"),
    Experiment(
        "zfnet-fc2048",
        "zfnet",
        "Table 3: Fig. 3 with layers 6,7 of 2048 units",
        {"fc_sizes": (2048, 2048)},
    ),
    Experiment(
        "zfnet-fc8192",
        "zfnet",
        "Table 3: Fig. 3 with layers 6,7 of 8192 units",
        {"fc_sizes": (8192, 8192)},
    ),
    Experiment(
        "zfnet-wide",
        "zfnet",
        "Table 2 (b) / Table 3: layers 3,4,5 of 512,1024,512 maps",
        {"conv_channels": WIDE},
    ),
    Experiment(
        "zfnet-wide-fc8192",
        "zfnet",
        "Table 3: 512,1024,512 maps and fc 8192 units",
        {"conv_channels": WIDE, "fc_sizes": (8192, 8192)},
    ),
)

#: name → :class:`Experiment`, in Table 2/3 order.
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in _ALL}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(
            f"experiment {name!r} is unknown{close_matches(name, list(EXPERIMENTS))} "
            f"(known: {', '.join(EXPERIMENTS)})"
        )
    return EXPERIMENTS[name]


def model_config(cfg: TrainConfig, num_classes: int) -> ZFNetConfig:
    """The model config of ``cfg.experiment`` at ``cfg``'s input size, width and init."""
    exp = get_experiment(cfg.experiment)
    base = AlexNetConfig() if exp.arch == "alexnet" else ZFNetConfig()
    return base.replace(
        num_classes=num_classes,
        input_size=cfg.input_size,
        width_mult=cfg.width_mult,
        dropout=cfg.dropout,
        init=cfg.init,
        init_std=cfg.init_std,
        **exp.changes,
    )


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """A freshly initialised model of ``cfg.experiment`` in train mode (weights redrawn per
    :func:`fan_in_stds` under ``init_rule="fan-in"``). Seed first for reproducible weights."""
    mcfg = model_config(cfg, num_classes)
    cls = AlexNet if isinstance(mcfg, AlexNetConfig) else ZFNet
    model = cls(mcfg).train()
    if cfg.init_rule == "fan-in" and cfg.init == "paper":
        stds = fan_in_stds(cfg, num_classes)
        with torch.no_grad():
            for name, m in model.named_modules():
                if name in stds:
                    nn.init.normal_(m.weight, 0.0, stds[name])
    return model


def fan_in_stds(cfg: TrainConfig, num_classes: int) -> dict[str, float]:
    """``init_rule="fan-in"``: per layer, ``init_std · sqrt(full fan-in / fan-in)`` where "full"
    is the same experiment at width 1 and input 224 (built on the meta device: no memory)."""
    full_cfg = model_config(
        cfg.replace(width_mult=1.0, input_size=224, resize=256, init="torch"), num_classes
    )
    here_cfg = model_config(cfg.replace(init="torch"), num_classes)
    cls = AlexNet if isinstance(full_cfg, AlexNetConfig) else ZFNet
    with torch.device("meta"):
        full, here = cls(full_cfg), cls(here_cfg)
    ref = {
        n: m.weight[0].numel()
        for n, m in full.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    return {
        n: cfg.init_std * math.sqrt(ref[n] / m.weight[0].numel())
        for n, m in here.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def model_from_dict(arch_config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from the ``model_config`` dict stored in a checkpoint."""
    values = dict(arch_config)
    arch = values.pop("arch")
    if arch == "alexnet":
        return AlexNet(AlexNetConfig.from_dict(values))
    return ZFNet(ZFNetConfig.from_dict(values))
