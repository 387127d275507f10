"""Built-in convlens probe ``linear``: layer-wise linear probes on frozen features (Zeiler &
Fergus 2014, Sec. 5.2-5.3, Tables 4, 5, 7, Fig. 9). See ``docs/probes/linear.md``.

    convlens probe linear                                   # embedded set, efficientnet_lite0
    convlens probe linear --model zfnet --weights zf.safetensors --data caltech101/ \\
        --train-per-class 15,30 --test-per-class 50 --folds 5

From Python, the pieces work on their own::

    from convlens_linear import scan_image_folder, extract_features, make_splits, evaluate
    ds = scan_image_folder("caltech101/")
    feats = extract_features(model, ds, ["conv5", "fc7"], cache_dir="cache/")
    splits = make_splits(ds.labels, [15, 30], 50, folds=5, seed=0, valid=feats.valid)
    results = evaluate({la: feats[la] for la in ["conv5", "fc7"]}, ds.labels, splits)
"""

import convlens
from convlens_linear._classifiers import (
    CLASSIFIERS,
    DEFAULT_C_GRID,
    LinearClassifier,
    balanced_accuracy,
    fit_classifier,
    fit_many,
    per_class_accuracy,
    select_c,
)
from convlens_linear._dataset import (
    EMBEDDED,
    IMAGE_EXTENSIONS,
    ImageFolder,
    embedded_dataset,
    scan_image_folder,
)
from convlens_linear._features import (
    CACHE_VERSION,
    DEFAULT_MAX_DIM,
    POOL_MODES,
    FeatureSet,
    LayerFeatures,
    ShardedFeatures,
    candidate_layers,
    default_layers,
    dist_info,
    extract_features,
    model_fingerprint,
    pool_features,
)
from convlens_linear._probe import EMBEDDED_PROTOCOL, PAPER_PROTOCOL, LinearProbe
from convlens_linear._protocol import (
    FoldResult,
    Result,
    Split,
    evaluate,
    make_splits,
    result_table,
)

__all__ = [
    # the probe
    "LinearProbe",
    "PAPER_PROTOCOL",
    "EMBEDDED_PROTOCOL",
    # data
    "ImageFolder",
    "scan_image_folder",
    "embedded_dataset",
    "EMBEDDED",
    "IMAGE_EXTENSIONS",
    # features
    "extract_features",
    "FeatureSet",
    "LayerFeatures",
    "ShardedFeatures",
    "candidate_layers",
    "default_layers",
    "pool_features",
    "model_fingerprint",
    "dist_info",
    "POOL_MODES",
    "DEFAULT_MAX_DIM",
    "CACHE_VERSION",
    # classifiers
    "LinearClassifier",
    "fit_classifier",
    "fit_many",
    "select_c",
    "balanced_accuracy",
    "per_class_accuracy",
    "CLASSIFIERS",
    "DEFAULT_C_GRID",
    # protocol
    "Split",
    "FoldResult",
    "Result",
    "make_splits",
    "evaluate",
    "result_table",
]


@convlens.hookimpl
def convlens_register_probes(registry):
    """Register the ``linear`` probe."""
    registry.register(LinearProbe.name, LinearProbe)
