"""The ``zeiler-fergus`` recipe: train ZFNet / AlexNet exactly as Section 3 of Zeiler & Fergus,
"Visualizing and Understanding Convolutional Networks" (ECCV 2014), reproduce Tables 2 and 3
(Section 5.1), and run the convlens probes on the trained model (Figs. 2, 4-7, Tables 1, 4-7).

    convlens recipe zeiler-fergus                                    # miniature, CPU, < 10 min
    convlens recipe zeiler-fergus --data /data/imagenet --experiment zfnet
    convlens recipe zeiler-fergus --data /data/imagenet --experiment table3 --pack
    torchrun --standalone --nproc_per_node=8 -m convlens_zeiler_fergus --data /data/imagenet
    python -m convlens_zeiler_fergus.data pack /data/imagenet --out /fast/packs

Modules (each with the commands that run it at the top):

* ``config``      :class:`TrainConfig`, every default in one typed dataclass (Section 3)
* ``experiments`` the named architectures of Tables 2 and 3
* ``synthetic``   the miniature's generated 12-class ImageFolder
* ``data``        folders, packs, the per-pixel mean, sampling, crops on the device
* ``train``       the step (bf16, channels_last, fused SGD, filter renormalisation) and the loop
* ``checkpoint``  atomic, ``weights_only``-loadable checkpoints
* ``distributed`` torchrun + DDP
* ``evaluate``    ten-crop top-1/top-5, ensembles
* ``analysis``    the trained model under the probes, Fig. 4, Fig. 6-style filters
* ``report``      ``report/index.html`` beside the paper's Tables 2 and 3
* ``pipeline``    the steps in order; ``recipe`` the command and its options
* ``paper``       the paper's numbers
"""

from __future__ import annotations

import convlens
from convlens_zeiler_fergus.config import ConfigError, TrainConfig
from convlens_zeiler_fergus.experiments import EXPERIMENTS, Experiment, build_model
from convlens_zeiler_fergus.recipe import ZeilerFergusRecipe, resolve_config, run_recipe

__all__ = [
    "ZeilerFergusRecipe",
    "TrainConfig",
    "ConfigError",
    "EXPERIMENTS",
    "Experiment",
    "build_model",
    "resolve_config",
    "run_recipe",
    "convlens_register_recipes",
]


@convlens.hookimpl
def convlens_register_recipes(registry) -> None:  # noqa: ANN001 - the hookspec types it
    registry.register(ZeilerFergusRecipe.name, ZeilerFergusRecipe)
