"""The paper's ImageNet 2012 numbers, typed from the text of Zeiler & Fergus (ECCV 2014),
Section 5.1, so that the report can set ours beside them.

Error rates in percent; ``None`` where the table has "-" or "---". Each row says which of our
experiments (``experiments.py``) reproduces it, if any.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PaperRow", "TABLE2", "TABLE3", "TABLE2_CAPTION", "TABLE3_CAPTION"]


@dataclass(frozen=True)
class PaperRow:
    """One row of Table 2 or 3. ``ours``: the experiment that reproduces it (``"ens:NAME"`` for an
    ensemble of that experiment's members, ``"ens:a+b"`` for an ensemble across experiments)."""

    label: str
    val_top1: float | None = None
    val_top5: float | None = None
    test_top5: float | None = None
    train_top1: float | None = None
    ours: str | None = None


TABLE2_CAPTION = (
    "Table 2. ImageNet 2012 classification error rates. The * indicates models that were trained "
    "on both ImageNet 2011 and 2012 training sets."
)

#: Table 2 (Section 5.1): Val Top-1, Val Top-5, Test Top-5.
TABLE2: tuple[PaperRow, ...] = (
    PaperRow("(Gunji et al., 2012)", None, None, 26.2),
    PaperRow("(Krizhevsky et al., 2012), 1 convnet", 40.7, 18.2, None),
    PaperRow("(Krizhevsky et al., 2012), 5 convnets", 38.1, 16.4, 16.4),
    PaperRow("(Krizhevsky et al., 2012)*, 1 convnets", 39.0, 16.6, None),
    PaperRow("(Krizhevsky et al., 2012)*, 7 convnets", 36.7, 15.4, 15.3),
    PaperRow(
        "Our replication of (Krizhevsky et al., 2012), 1 convnet", 40.5, 18.1, None, ours="alexnet"
    ),
    PaperRow("1 convnet as per Fig. 3", 38.4, 16.5, None, ours="zfnet"),
    PaperRow("5 convnets as per Fig. 3 – (a)", 36.7, 15.3, 15.3, ours="ens:zfnet"),
    PaperRow(
        "1 convnet as per Fig. 3 but with layers 3,4,5: 512,1024,512 maps – (b)",
        37.5,
        16.0,
        16.1,
        ours="zfnet-wide",
    ),
    PaperRow("6 convnets, (a) & (b) combined", 36.0, 14.7, 14.8, ours="ens:zfnet+zfnet-wide"),
)

TABLE3_CAPTION = (
    "Table 3. ImageNet 2012 classification error rates with various architectural changes to the "
    "model of (Krizhevsky et al., 2012) and our model (see Fig. 3)."
)

#: Table 3 (Section 5.1): Train Top-1, Val Top-1, Val Top-5.
TABLE3: tuple[PaperRow, ...] = (
    PaperRow(
        "Our replication of (Krizhevsky et al., 2012), 1 convnet",
        40.5,
        18.1,
        train_top1=35.1,
        ours="alexnet",
    ),
    PaperRow("Removed layers 3,4", 45.4, 22.1, train_top1=41.8, ours="alexnet-no-conv34"),
    PaperRow("Removed layer 7", 40.0, 18.4, train_top1=27.4, ours="alexnet-no-fc7"),
    PaperRow("Removed layers 6,7", 44.8, 22.4, train_top1=27.4, ours="alexnet-no-fc67"),
    PaperRow("Removed layer 3,4,6,7", 71.3, 50.1, train_top1=71.1, ours="alexnet-no-conv34-fc67"),
    PaperRow("Adjust layers 6,7: 2048 units", 41.7, 18.8, train_top1=40.3, ours="alexnet-fc2048"),
    PaperRow("Adjust layers 6,7: 8192 units", 40.0, 18.1, train_top1=26.8, ours="alexnet-fc8192"),
    PaperRow("Our Model (as per Fig. 3)", 38.4, 16.5, train_top1=33.1, ours="zfnet"),
    PaperRow("Adjust layers 6,7: 2048 units", 40.2, 17.6, train_top1=38.2, ours="zfnet-fc2048"),
    PaperRow("Adjust layers 6,7: 8192 units", 38.8, 17.0, train_top1=22.0, ours="zfnet-fc8192"),
    PaperRow(
        "Adjust layers 3,4,5: 512,1024,512 maps", 37.5, 16.0, train_top1=18.8, ours="zfnet-wide"
    ),
    PaperRow(
        "Adjust layers 6,7: 8192 units and Layers 3,4,5: 512,1024,512 maps",
        38.3,
        16.9,
        train_top1=10.0,
        ours="zfnet-wide-fc8192",
    ),
)
