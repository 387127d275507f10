"""First-layer filters as numbers: what Section 4.1 reads off Fig. 6 by eye.

Fig. 6 shows (a) first-layer filters where "one feature dominates" (before feature scale
clipping), (b)/(c) Krizhevsky et al.'s 11×11/4 filters — "a mix of extremely high and low
frequency information, with little coverage of the mid frequencies" and "dead" features — against
ZFNet's 7×7/2 ones. :func:`filter_diagnostics` turns those readings into numbers:

* **RMS** of each filter (over its input channels and taps);
* **dead filters**: RMS below ``DEAD_FRACTION`` (10 %) of the layer's median filter RMS, and —
  when activations are given — channels whose mean absolute activation over the images is below
  ``DEAD_FRACTION`` of the median channel's;
* **dominating filter**: the filter of largest RMS, flagged as dominating when its RMS is at
  least ``DOMINANCE_RATIO`` (3×) the median — Fig. 6(a)'s "one feature dominates";
* **spatial-frequency bands**: each filter's power spectrum (2-D DFT, zero-padded to
  ``FFT_SIZE``², summed over input channels) split by radial frequency ``ρ`` (in units of the
  Nyquist frequency, 0.5 cycles/pixel) into *low* ``ρ < 1/3``, *mid* ``1/3 ≤ ρ < 2/3`` and
  *high* ``ρ ≥ 2/3`` (the corners up to ``ρ = √2`` count as high); the DC term is low. Reported as
  fractions of each filter's energy, and their layer means.

:func:`band_energies` applies the same banding to any images (the layer-2 projections of a model
comparison, where stride-4 aliasing shows as high-frequency energy).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "filter_diagnostics",
    "band_energies",
    "DEAD_FRACTION",
    "DOMINANCE_RATIO",
    "FFT_SIZE",
    "BANDS",
]

DEAD_FRACTION = 0.1
DOMINANCE_RATIO = 3.0
FFT_SIZE = 32
#: Radial band edges in units of the Nyquist frequency.
BANDS = (("low", 0.0, 1.0 / 3.0), ("mid", 1.0 / 3.0, 2.0 / 3.0), ("high", 2.0 / 3.0, np.inf))


def _radial(n_y: int, n_x: int) -> np.ndarray:
    fy = np.fft.fftfreq(n_y)[:, None]
    fx = np.fft.fftfreq(n_x)[None, :]
    return np.sqrt(fy**2 + fx**2) / 0.5


def band_energies(arrays: np.ndarray | torch.Tensor, fft_size: int | None = FFT_SIZE) -> np.ndarray:
    """Fractions of spectral energy in the low/mid/high bands, ``[N, 3]``, for ``arrays``
    ``[N, C, h, w]`` (power summed over C). ``fft_size``: zero-pad to at least this size (None:
    the arrays' own size). An all-zero array gives zeros."""
    a = (
        arrays.detach().cpu().double().numpy()
        if isinstance(arrays, torch.Tensor)
        else np.asarray(arrays, dtype=np.float64)
    )
    if a.ndim == 3:
        a = a[:, None]
    h, w = a.shape[-2:]
    ny, nx = (max(h, fft_size), max(w, fft_size)) if fft_size else (h, w)
    power = (np.abs(np.fft.fft2(a, s=(ny, nx))) ** 2).sum(axis=1)  # [N, ny, nx]
    rho = _radial(ny, nx)
    total = power.sum(axis=(1, 2))
    out = np.zeros((a.shape[0], len(BANDS)))
    for j, (_, lo, hi) in enumerate(BANDS):
        mask = (rho >= lo) & (rho < hi)
        out[:, j] = power[:, mask].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total[:, None] > 0, out / total[:, None], 0.0)
    return frac


def filter_diagnostics(
    weight: torch.Tensor, activations: torch.Tensor | None = None
) -> dict[str, Any]:
    """Diagnostics of a conv layer's filters ``weight`` ``[C_out, C_in, kh, kw]`` (see the module
    docstring); ``activations`` ``[N, C_out, H, W]`` (optional) adds the activation-based dead
    count. Returns a JSON-able dict."""
    w = weight.detach().float().cpu()
    rms = w.pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
    med = float(np.median(rms))
    dead_rms = [int(i) for i in np.nonzero(rms < DEAD_FRACTION * med)[0]]
    top = int(rms.argmax())
    ratio = float(rms[top] / med) if med > 0 else float("inf")
    bands = band_energies(w)
    out: dict[str, Any] = {
        "shape": list(w.shape),
        "rms": [float(v) for v in rms],
        "median_rms": med,
        "dead_threshold": f"RMS < {DEAD_FRACTION} x median RMS",
        "dead_by_rms": dead_rms,
        "dominating": {
            "filter": top,
            "rms": float(rms[top]),
            "ratio_to_median": ratio,
            "dominates": bool(ratio >= DOMINANCE_RATIO),
            "threshold": f"RMS >= {DOMINANCE_RATIO} x median RMS",
        },
        "bands": {
            "edges_nyquist": [[lo, None if np.isinf(hi) else hi] for _, lo, hi in BANDS],
            "names": [b[0] for b in BANDS],
            "per_filter": [[float(v) for v in row] for row in bands],
            "mean": {b[0]: float(bands[:, j].mean()) for j, b in enumerate(BANDS)},
        },
    }
    if activations is not None:
        a = (
            activations.detach()
            .float()
            .abs()
            .mean(dim=tuple(i for i in range(activations.dim()) if i != 1))
            .cpu()
            .numpy()
        )
        amed = float(np.median(a))
        out["mean_abs_activation"] = [float(v) for v in a]
        out["dead_by_activation"] = [int(i) for i in np.nonzero(a < DEAD_FRACTION * amed)[0]]
        out["dead_activation_threshold"] = f"mean |activation| < {DEAD_FRACTION} x median"
    out["dead"] = sorted(set(dead_rms) | set(out.get("dead_by_activation", [])))
    return out
