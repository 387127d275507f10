"""Linear classifiers on frozen features, in torch (CPU or GPU): the softmax and linear SVM of
Zeiler & Fergus 2014, Sec. 5.2-5.3 (Table 7: "We train either a linear SVM or softmax on features
from different layers").

Both minimise, over weights ``W [D, K]`` and biases ``b [K]`` (the bias is not penalised)::

    (1/n) sum_i loss(x_i W + b, y_i)  +  ||W||^2 / (2 C n)

i.e. scikit-learn's ``C * sum_i loss + ||W||^2 / 2`` divided by ``C n``, so ``C`` means what it
means there. ``softmax``: multinomial cross-entropy (``LogisticRegression``); ``svm``: one-vs-rest
squared hinge ``sum_k max(0, 1 - s_ik (x_i w_k + b_k))^2`` with ``s_ik = +1`` for the true class
and ``-1`` otherwise (``LinearSVC``'s default loss). Features are standardised with the training
rows' mean and standard deviation first (``StandardScaler``: zero-variance features keep scale 1).

Solving: when there are fewer training rows ``n`` than features ``D`` (the usual case with 15-60
images per class and 9216-d features), the optimum lies in the span of the training rows, so with
``X^T = Q R`` the problem is solved exactly in ``n`` coordinates (``X W = R^T A`` with ``W = Q A``,
``||W|| = ||A||``) and mapped back. Many problems (regularisation values, folds, layers) are
solved at once by L-BFGS on the sum of their objectives, which are independent.

The regularisation strength is chosen by cross-validation on the training rows only
(:func:`select_c`): balanced accuracy averaged over the folds, ties resolved to the smallest ``C``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from convlens.errors import ConvlensError

__all__ = [
    "CLASSIFIERS",
    "DEFAULT_C_GRID",
    "LinearClassifier",
    "fit_classifier",
    "fit_many",
    "select_c",
    "balanced_accuracy",
    "per_class_accuracy",
]

CLASSIFIERS = ("softmax", "svm")
#: The regularisation values tried by cross-validation (scikit-learn's ``C``).
DEFAULT_C_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

# Problems up to this many design-matrix values are solved in float64 (exact enough to match
# scikit-learn's solvers); bigger ones in float32.
_F64_LIMIT = 8_000_000
# Rotate to the singular basis of the training rows (and so reduce to their span when n < D)
# when the SVD costs at most this many multiply-adds (n * D * min(n, D)).
_ROTATE_MAX_WORK = 30_000_000_000
# Below this many multiply-adds per objective evaluation, solve on one CPU thread: tiny
# matrix products gain nothing from threads and lose much when the cores are busy.
_ONE_THREAD_WORK = 50_000_000
# Curvature of each loss with respect to the scores, for the diagonal preconditioner.
_CURVATURE = {"softmax": 0.25, "svm": 2.0}
# Padded values per batched solve (problems are grouped up to this size).
_CHUNK = 20_000_000


def _check_kind(kind: str) -> None:
    if kind not in CLASSIFIERS:
        raise ConvlensError(f"classifier {kind!r}: expected one of {', '.join(CLASSIFIERS)}")


@dataclass
class LinearClassifier:
    """A fitted classifier: ``scores = ((X - mean) / scale) @ weight + bias``."""

    kind: str
    C: float
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    n_iter: int = 0
    converged: bool = True

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[1])

    def decision_function(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class scores ``[N, K]`` (logits for softmax, margins for the SVM)."""
        x = torch.as_tensor(x, device=self.weight.device).to(self.weight.dtype)
        return ((x - self.mean) / self.scale) @ self.weight + self.bias

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.decision_function(x).argmax(1)


def _standardizer(x: torch.Tensor, standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, scale)`` of the rows of ``x``; as scikit-learn's ``StandardScaler``
    (population std; (near-)constant features are centred, not scaled)."""
    d = x.shape[1]
    if not standardize:
        return x.new_zeros(d), x.new_ones(d)
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std < 10 * torch.finfo(x.dtype).eps, torch.ones_like(std), std)


def _work_dtype(n: int, d: int) -> torch.dtype:
    return torch.float64 if n * d <= _F64_LIMIT else torch.float32


def _reduce_rows(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Standardised rows ``xs [n, D]`` -> ``(z [n, r], basis [D, r] or None)`` with
    ``xs W = z A`` for ``W = basis A`` and ``||W|| = ||A||``: the singular basis ``xs = U S V^T``
    (``z = U S``, ``basis = V``), which also reduces to ``r <= n`` coordinates when ``n < D``; the
    columns of ``z`` are orthogonal, so the diagonal preconditioner of :func:`_solve` is nearly
    exact. Too large an SVD: ``xs`` itself."""
    n, d = xs.shape
    if n * d * min(n, d) > _ROTATE_MAX_WORK:
        return xs, None
    small = xs.device.type == "cpu" and n * d * min(n, d) <= 20 * _ONE_THREAD_WORK
    with _threads(1 if small else 0):
        u, sv, vh = torch.linalg.svd(xs, full_matrices=False)
    keep = sv > sv.max() * 1e-10 if sv.numel() else sv > 0
    return (u[:, keep] * sv[keep]).contiguous(), vh[keep].T.contiguous()


def _reduce_gram(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from the Gram matrix ``g = xs xs^T [n, n]``: ``(z [n, r], proj [n, r])`` with
    ``z = U S`` from ``g = U S^2 U^T``; a new row's coordinates are ``(x xs^T) @ proj``."""
    evals, evecs = torch.linalg.eigh(g)
    keep = evals > evals.max().clamp_min(0) * 1e-12
    s = evals[keep].sqrt()
    u = evecs[:, keep]
    return (u * s).contiguous(), (u / s).contiguous()


def _solve(
    z: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    kind: str,
    n_classes: int,
    max_iter: int,
    tol: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Minimise ``P x m`` independent problems: data ``z [P, n, r]``, labels ``y [P, n]``, row
    weights ``w [P, n]`` (0 for padding), regularisation ``c [P, m]``, starting from ``init``
    (``A [P, m, r, K]``, ``b [P, m, K]``) or zero. Returns ``A``, ``b``, the iterations and
    whether every problem met the gradient tolerance."""
    p, n, r = z.shape
    m = c.shape[1]
    k = n_classes
    dtype, dev = z.dtype, z.device
    if z.is_inference():
        z = z.clone()
    onehot = F.one_hot(y, k).to(dtype)[:, None]  # [P, 1, n, K]
    nb = w.sum(1).clamp_min(1.0)  # [P]
    inv_cn = (1.0 / (c * nb[:, None]))[..., None, None]  # [P, m, 1, 1]
    wn = (w / nb[:, None])[:, None, :, None]  # [P, 1, n, 1]
    sign = 2.0 * onehot - 1.0
    zt = z.transpose(1, 2)  # [P, r, n]
    # Jacobi preconditioner A = pre * A~, pre = (curvature bound of each coordinate)^(-1/2):
    # with z = U S the bound is diagonal, so the problems in A~ are well conditioned.
    colsq = (z * z * w[..., None]).sum(1) / nb[:, None]  # [P, r]
    pre = (_CURVATURE[kind] * colsq[:, None, :, None] + inv_cn).rsqrt()  # [P, m, r, 1]
    rk = r * k

    def fun(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = pre * x[:, :rk].reshape(p, m, r, k)
        b = x[:, rk:].reshape(p, m, 1, k)
        # [P, n, r] @ [P, r, m K]: one product for all m regularisation values
        s = (z @ a.permute(0, 2, 1, 3).reshape(p, r, m * k)).reshape(p, n, m, k)
        s = s.transpose(1, 2) + b  # [P, m, n, K]
        if kind == "softmax":
            lse = torch.logsumexp(s, -1, keepdim=True)
            loss = lse - (s * onehot).sum(-1, keepdim=True)
            ds = (torch.exp(s - lse) - onehot) * wn
        else:
            margin = F.relu(1.0 - sign * s)
            loss = (margin * margin).sum(-1, keepdim=True)
            ds = -2.0 * sign * margin * wn
        f = (loss * wn).sum((-1, -2)) + 0.5 * (a * a).sum((-1, -2)) * inv_cn[..., 0, 0]
        za = (zt @ ds.transpose(1, 2).reshape(p, n, m * k)).reshape(p, r, m, k)
        ga = pre * (za.transpose(1, 2) + a * inv_cn)
        gb = ds.sum(-2)
        return f.reshape(-1), torch.cat([ga.reshape(p * m, rk), gb.reshape(p * m, k)], 1)

    if init is None:
        x0 = torch.zeros(p * m, rk + k, dtype=dtype, device=dev)
    else:
        x0 = torch.cat(
            [(init[0].to(dtype) / pre).reshape(p * m, rk), init[1].to(dtype).reshape(p * m, k)], 1
        )
    work = p * m * n * r * k
    with _threads(1 if dev.type == "cpu" and work <= _ONE_THREAD_WORK else 0):
        x, it, done = _batched_lbfgs(
            fun, x0, max_iter, tol if dtype == torch.float64 else max(tol, 1e-5)
        )
    a = (pre * x[:, :rk].reshape(p, m, r, k)).contiguous()
    return a, x[:, rk:].reshape(p, m, k), it, bool(done.all())


def _batched_lbfgs(
    fun, x: torch.Tensor, max_iter: int, tol: float, history: int = 8
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """L-BFGS run separately on each row of ``x [B, D]`` (each problem keeps its own memory,
    step and stopping test) but vectorised over the rows. ``fun(x) -> (f [B], g [B, D])``.

    The direction uses the compact form of the L-BFGS inverse Hessian (Byrd, Nocedal & Schnabel
    1994; Nocedal & Wright eq. 7.24): a handful of batched products instead of the two-loop
    recursion's many small ones. Backtracking (Armijo) line search; a problem stops when
    ``max |g| <= tol`` or its objective stops decreasing. Returns ``x``, the iterations run and
    which problems met ``tol``."""
    bsz, dim = x.shape
    f, g = fun(x)
    s_mem = x.new_zeros(bsz, history, dim)  # ring buffer of pairs, slot order
    y_mem = x.new_zeros(bsz, history, dim)
    filled = x.new_zeros(bsz, history, dtype=torch.bool)
    gamma = x.new_ones(bsz)
    active = g.abs().amax(1) > tol
    stalled = torch.zeros_like(active)
    it = 0
    newest, count = -1, 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        if not bool(active.any()):
            it -= 1
            break
        if count:
            d = -_lbfgs_direction(s_mem, y_mem, filled, gamma, g, newest, min(count, history))
        else:
            d = -g
        gd = torch.linalg.vecdot(g, d)
        bad = ~(gd < 0)  # not a descent direction (or not finite): restart from the gradient
        if bool(bad.any()):
            d[bad] = -g[bad]
            gd = torch.where(bad, -(g * g).sum(1), gd)
        d[~active] = 0.0
        gd = torch.where(active, gd, torch.zeros_like(gd))
        t = torch.ones_like(f)
        if it == 1:  # first step: unit length in the scaled gradient direction
            t = torch.clamp(1.0 / g.abs().sum(1).clamp_min(1e-30), max=1.0)
        for _ in range(40):
            xn = x + t[:, None] * d
            fn, gn = fun(xn)
            ok = (fn <= f + 1e-4 * t * gd) | ~active
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
        else:  # no decrease found: keep the old point for those problems
            xn = torch.where(ok[:, None], xn, x)
            fn, gn = fun(xn)
        sv = xn - x
        yv = gn - g
        sy = torch.linalg.vecdot(sv, yv)
        yy = torch.linalg.vecdot(yv, yv)
        good = active & (sy > 1e-12 * torch.linalg.vector_norm(sv, dim=1) * yy.sqrt())
        newest = (newest + 1) % history
        count += 1
        s_mem[:, newest] = torch.where(good[:, None], sv, 0.0)
        y_mem[:, newest] = torch.where(good[:, None], yv, 0.0)
        filled[:, newest] = good
        gamma = torch.where(good, sy / yy.clamp_min(1e-300), gamma)
        stalled |= active & (f - fn <= 1e-15 * f.abs().clamp_min(1.0))
        x, f, g = xn, fn, gn
        active = active & (g.abs().amax(1) > tol) & ~stalled
    converged = g.abs().amax(1) <= tol * 10
    return x, it, converged


def _lbfgs_direction(
    s_mem: torch.Tensor,
    y_mem: torch.Tensor,
    filled: torch.Tensor,
    gamma: torch.Tensor,
    g: torch.Tensor,
    newest: int,
    count: int,
) -> torch.Tensor:
    """``H g`` for the L-BFGS inverse Hessian ``H`` of the stored pairs (compact form):
    ``H g = gamma g + S u + gamma Y v`` with ``v = -R^-1 S^T g`` and
    ``u = R^-T ((D + gamma Y^T Y) R^-1 S^T g - gamma Y^T g)``, where ``R`` is the upper
    triangle of ``S^T Y`` in chronological order and ``D`` its diagonal. Empty pairs (zero
    ``s``, ``y``) get a unit diagonal in ``R`` and so contribute nothing."""
    h = s_mem.shape[1]
    # products in slot order over the whole buffer (empty slots are zero), then the small
    # matrices permuted to chronological order
    order = torch.tensor(
        [(newest - count + 1 + j) % h for j in range(count)], device=g.device
    )  # oldest first
    sy = (s_mem @ y_mem.transpose(1, 2))[:, order][:, :, order]  # [B, c, c]
    yy = (y_mem @ y_mem.transpose(1, 2))[:, order][:, :, order]
    a = (s_mem @ g[..., None])[:, order]  # [B, c, 1]
    b = (y_mem @ g[..., None])[:, order]
    empty = (~filled[:, order]).to(g.dtype)
    r = torch.triu(sy) + torch.diag_embed(empty)
    q = torch.linalg.solve_triangular(r, a, upper=True)
    gm = gamma[:, None, None]
    t = torch.diagonal(sy, dim1=1, dim2=2)[..., None] * q + gm * (yy @ q) - gm * b
    u = torch.linalg.solve_triangular(r.transpose(1, 2), t, upper=False)
    coef_s = g.new_zeros(g.shape[0], h, 1)
    coef_y = g.new_zeros(g.shape[0], h, 1)
    coef_s[:, order] = u
    coef_y[:, order] = q
    return (
        gamma[:, None] * g
        + (coef_s.transpose(1, 2) @ s_mem)[:, 0]
        - gamma[:, None] * (coef_y.transpose(1, 2) @ y_mem)[:, 0]
    )


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (0: leave as is), restored afterwards."""
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _solve_many(
    items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    kind: str,
    n_classes: int,
    max_iter: int,
    tol: float,
    inits: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, int, bool]]:
    """Solve items ``(z [n, r], y [n], C values [m])``, batched (zero-padded) in chunks of
    similar size, starting from ``inits`` (per item ``A [m, r, K]``, ``b [m, K]``) or zero.
    Returns per item ``A [m, r, K]``, ``b [m, K]``, iterations, converged."""
    out: list = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: tuple(items[i][0].shape))
    chunk: list[int] = []

    def flush() -> None:
        if not chunk:
            return
        zs = [items[i][0] for i in chunk]
        n = max(z.shape[0] for z in zs)
        r = max(z.shape[1] for z in zs)
        m = max(len(items[i][2]) for i in chunk)
        dtype = torch.float64 if all(z.dtype == torch.float64 for z in zs) else torch.float32
        dev = zs[0].device
        if len(zs) == 1:
            zb = zs[0].to(dtype)[None]
        else:
            zb = torch.zeros(len(zs), n, r, dtype=dtype, device=dev)
            for k, z in enumerate(zs):
                zb[k, : z.shape[0], : z.shape[1]] = z
        y = torch.zeros(len(zs), n, dtype=torch.long, device=dev)
        w = torch.zeros(len(zs), n, dtype=dtype, device=dev)
        c = torch.ones(len(zs), m, dtype=dtype, device=dev)
        for k, i in enumerate(chunk):
            rows = items[i][0].shape[0]
            y[k, :rows] = items[i][1]
            w[k, :rows] = 1.0
            cs = items[i][2].to(dtype)
            c[k, : len(cs)] = cs
            c[k, len(cs) :] = cs[-1]
        init = None
        if inits is not None:
            a0 = torch.zeros(len(zs), m, r, n_classes, dtype=dtype, device=dev)
            b0 = torch.zeros(len(zs), m, n_classes, dtype=dtype, device=dev)
            for k, i in enumerate(chunk):
                ia, ib = inits[i]
                a0[k, : ia.shape[0], : ia.shape[1]] = ia
                b0[k, : ib.shape[0]] = ib
            init = (a0, b0)
        a, b, it, ok = _solve(zb, y, w, c, kind, n_classes, max_iter, tol, init)
        for k, i in enumerate(chunk):
            z, mm = items[i][0], len(items[i][2])
            out[i] = (a[k, :mm, : z.shape[1]].to(z.dtype), b[k, :mm].to(z.dtype), it, ok)
        chunk.clear()

    size = 0
    for i in order:
        z = items[i][0]
        this = z.shape[0] * max(z.shape[1], n_classes) * max(1, len(items[i][2]))
        if chunk and size + this > _CHUNK:
            flush()
            size = 0
        chunk.append(i)
        size += this
    flush()
    return out


@dataclass
class CVFold:
    """One cross-validation fold of one training set, in reduced coordinates: fit on
    ``(z_fit, y_fit)``, score on ``(z_val, y_val)``."""

    z_fit: torch.Tensor
    y_fit: torch.Tensor
    z_val: torch.Tensor
    y_val: torch.Tensor


def _cv_select(
    sets: Sequence[Sequence[CVFold]],
    kind: str,
    n_classes: int,
    grid: Sequence[float],
    max_iter: int,
    tol: float,
) -> list[tuple[float, list[float]]]:
    """For each training set (its CV folds), the ``C`` of ``grid`` (ascending) with the best
    mean balanced accuracy over its folds (ties: the smallest ``C``) and the mean scores."""
    owner = [(s, f) for s, folds in enumerate(sets) for f in folds]
    scores = [np.zeros(len(grid)) for _ in sets]
    counts = [0] * len(sets)
    for s, _ in owner:
        counts[s] += 1
    # continuation: C ascending, each solve starting from the previous C's solution
    inits = None
    for ci, cval in enumerate(grid):
        items = [
            (f.z_fit, f.y_fit, torch.tensor([cval], dtype=f.z_fit.dtype, device=f.z_fit.device))
            for _, f in owner
        ]
        solved = _solve_many(items, kind, n_classes, max_iter, tol, inits)
        inits = [(a, b) for a, b, _, _ in solved]
        for (s, f), (a, b, _, _) in zip(owner, solved, strict=True):
            pred = (f.z_val.to(a.dtype) @ a[0] + b[0]).argmax(-1)
            scores[s][ci] += balanced_accuracy(pred, f.y_val, n_classes)
    out = []
    for s in range(len(sets)):
        mean = scores[s] / max(1, counts[s])
        out.append((float(grid[int(np.argmax(mean))]), [float(v) for v in mean]))
    return out


def per_class_accuracy(
    pred: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, n_classes: int
) -> np.ndarray:
    """Accuracy of each class (NaN for a class without rows)."""
    pred = np.asarray(torch.as_tensor(pred).cpu())
    y = np.asarray(torch.as_tensor(y).cpu())
    hits = np.bincount(y[pred == y], minlength=n_classes).astype(float)
    total = np.bincount(y, minlength=n_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / np.maximum(total, 1), np.nan)


def balanced_accuracy(
    pred: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, n_classes: int
) -> float:
    """The mean of the per-class accuracies over the classes present (the paper's measure)."""
    return float(np.nanmean(per_class_accuracy(pred, y, n_classes)))


def _as_tensor(x: torch.Tensor | np.ndarray, device: torch.device | str | None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.to(device) if device is not None else t


def fit_many(
    train: Sequence[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]],
    c_values: Sequence[float],
    kind: str,
    n_classes: int,
    *,
    device: torch.device | str | None = None,
    standardize: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-7,
) -> list[LinearClassifier]:
    """Fit one classifier per ``(x, y)`` training set, with ``c_values[i]`` for set ``i``,
    solving them together. Labels are ``0..n_classes-1``."""
    _check_kind(kind)
    if len(c_values) != len(train):
        raise ConvlensError("fit_many: one C per training set")
    prepared, items = [], []
    for (x, y), cv in zip(train, c_values, strict=True):
        xt = _as_tensor(x, device)
        xt = xt.to(_work_dtype(*xt.shape))
        yt = _as_tensor(y, xt.device).long()
        mean, scale = _standardizer(xt, standardize)
        z, basis = _reduce_rows((xt - mean) / scale)
        prepared.append((mean, scale, basis))
        items.append((z, yt, torch.tensor([float(cv)], dtype=z.dtype, device=z.device)))
    solved = _solve_many(items, kind, n_classes, max_iter, tol)
    out = []
    for (mean, scale, basis), (a, b, it, ok), cv in zip(prepared, solved, c_values, strict=True):
        weight = a[0] if basis is None else basis @ a[0]
        out.append(LinearClassifier(kind, float(cv), mean, scale, weight, b[0], it, ok))
    return out


def fit_classifier(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    kind: str = "softmax",
    C: float = 1.0,
    n_classes: int | None = None,
    *,
    device: torch.device | str | None = None,
    standardize: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-7,
) -> LinearClassifier:
    """Fit a ``softmax`` or ``svm`` classifier with regularisation ``C`` (scikit-learn's
    meaning) on features ``x [N, D]`` and labels ``y`` in ``0..K-1``."""
    yt = np.asarray(torch.as_tensor(y).cpu())
    k = int(n_classes if n_classes is not None else yt.max() + 1)
    return fit_many(
        [(x, y)], [C], kind, k, device=device, standardize=standardize, max_iter=max_iter, tol=tol
    )[0]


def select_c(
    sets: Sequence[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray, np.ndarray]],
    kind: str,
    n_classes: int,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    *,
    device: torch.device | str | None = None,
    standardize: bool = True,
    max_iter: int = 150,
    tol: float = 1e-5,
) -> list[tuple[float, list[float]]]:
    """Cross-validated ``C`` for each training set ``(x, y, cv_fold)``.

    The rows are standardised with the statistics of the whole training set; then, for every
    fold ``j`` of ``cv_fold`` (one fold id per row), a classifier is fitted on the rows not in
    ``j`` for every ``C`` of ``c_grid`` and scored (balanced accuracy) on the rows in ``j``. The
    ``C`` with the best mean score wins, ties going to the smallest ``C`` (the strongest
    regularisation). Returns ``(best C, mean score per C)`` per set; all fits of all sets are
    solved together (``max_iter``/``tol``: a selection needs less precision than a final fit).
    """
    _check_kind(kind)
    grid = sorted(float(c) for c in c_grid)
    if not grid:
        raise ConvlensError("select_c: empty C grid")
    all_folds = []
    for x, y, folds in sets:
        xt = _as_tensor(x, device)
        xt = xt.to(_work_dtype(*xt.shape))
        yt = _as_tensor(y, xt.device).long()
        mean, scale = _standardizer(xt, standardize)
        xs = (xt - mean) / scale
        folds = np.asarray(folds)
        cv = []
        for j in np.unique(folds):
            fit = torch.as_tensor(np.flatnonzero(folds != j), device=xt.device)
            val = torch.as_tensor(np.flatnonzero(folds == j), device=xt.device)
            z, basis = _reduce_rows(xs[fit])
            zv = xs[val] if basis is None else xs[val] @ basis
            cv.append(CVFold(z, yt[fit], zv, yt[val]))
        all_folds.append(cv)
    return _cv_select(all_folds, kind, n_classes, grid, max_iter, tol)
