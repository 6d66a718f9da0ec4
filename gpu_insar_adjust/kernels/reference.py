"""Plain NumPy float64 references of the performance kernels.

These are the specifications: short, obviously correct, and slow. The fast CPU paths (:mod:`.cpu`) and the CUDA
paths (:mod:`.cuda`) are tested against them. Conventions shared by all paths:

* A polynomial surface of ``order`` 0, 1 or 2 in map coordinates ``(x, y)`` has the terms
  ``[1, x, y, x**2, x*y, y**2]`` truncated to ``(order + 1) * (order + 2) // 2`` terms; coefficients are in the
  caller's coordinate units (e.g. mm per m for a velocity ramp in metres).
* A cube is ``(T, N)`` (epochs × pixels); NaN marks a missing observation.
* Radial kernels of distance ``r`` (same unit as ``length_scale``): ``gaussian`` ``exp(-r²/(2ℓ²))``
  (scikit-learn's RBF), ``matern32`` ``(1 + √3 r/ℓ) exp(-√3 r/ℓ)`` (scikit-learn's Matern, nu=1.5), ``tps``
  ``(r/ℓ)² log(r/ℓ)`` (thin-plate spline, 0 at r = 0).
"""

from __future__ import annotations

import numpy as np

KERNELS = ("gaussian", "matern32", "tps")


def n_poly_terms(order: int) -> int:
    """Number of terms of a 2-D polynomial surface of total degree ``order``."""
    return (order + 1) * (order + 2) // 2


def polynomial_terms(x, y, order: int) -> np.ndarray:
    """Design matrix ``(N, n_terms)`` of the surface terms ``[1, x, y, x², xy, y²]`` (truncated to ``order``)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    cols = [np.ones_like(x), x, y, x * x, x * y, y * y]
    return np.stack(cols[: n_poly_terms(order)], axis=1)


def fit_epoch_ramps(cube, x, y, *, order: int = 1, weights=None, mask=None) -> np.ndarray:
    """Per-epoch weighted least-squares polynomial ramps: coefficients ``(T, n_terms)``.

    An observation is used when it is finite, ``mask`` (``(N,)`` or ``(T, N)``) is True and its weight
    (``(N,)`` or ``(T, N)``) is positive. Epochs with fewer usable pixels than terms, or a singular system,
    get a row of NaN.
    """
    cube = np.asarray(cube, dtype=np.float64)
    T = cube.shape[0]
    cube = cube.reshape(T, -1)
    # solve in centred, scaled coordinates (same surface, well conditioned), report in the caller's
    x0, y0, s = centre_scale(x, y)
    G = polynomial_terms((np.ravel(x) - x0) / s, (np.ravel(y) - y0) / s, order)
    w = np.ones(cube.shape) if weights is None else np.broadcast_to(np.asarray(weights, np.float64).reshape(
        (-1, cube.shape[1])), cube.shape)
    m = np.ones(cube.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool).reshape(
        (-1, cube.shape[1])), cube.shape)
    out = np.full((T, G.shape[1]), np.nan)
    for t in range(T):
        ok = np.isfinite(cube[t]) & m[t] & (w[t] > 0)
        if ok.sum() < G.shape[1]:
            continue
        sw = np.sqrt(w[t, ok])
        coef, _, rank, _ = np.linalg.lstsq(G[ok] * sw[:, None], cube[t, ok] * sw, rcond=None)
        if rank == G.shape[1]:
            out[t] = coef
    n = G.shape[1]
    padded = np.zeros((T, 6))
    padded[:, :n] = out
    return poly_change_of_variables(padded, -x0 / s, -y0 / s, 1.0 / s, 2)[:, :n]


def eval_polynomial_surface(coeffs, x, y, order: int) -> np.ndarray:
    """Polynomial surface(s) at ``(x, y)``: ``coeffs`` ``(n_terms,)`` → shape of ``x``; ``(T, n_terms)`` → (T, N)."""
    coeffs = np.asarray(coeffs, dtype=np.float64)
    G = polynomial_terms(x, y, order)
    if coeffs.ndim == 1:
        return (G @ coeffs).reshape(np.shape(x))
    return coeffs @ G.T


def subtract_epoch_ramps(cube, coeffs, x, y, order: int) -> np.ndarray:
    """``cube - ramp`` per epoch (float64); NaN stays NaN."""
    cube = np.asarray(cube, dtype=np.float64)
    return cube - eval_polynomial_surface(coeffs, x, y, order).reshape(cube.shape)


def shared_design_fit(A, Y, weights=None):
    """Per-pixel weighted least squares with one shared design, pixel by pixel with ``numpy.linalg.lstsq``.

    ``A`` ``(T, n)``, ``Y`` ``(T, N)`` (NaN = missing), ``weights`` ``(T,)`` or ``(T, N)`` (0 drops the
    observation). Returns ``(x (n, N), n_valid (N,), residual_rms (N,))``; ``residual_rms`` is the unweighted
    root-mean-square residual over the valid observations. Pixels with fewer valid observations than unknowns
    or a rank-deficient design get NaN.
    """
    A = np.asarray(A, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    T, n = A.shape
    N = Y.shape[1]
    W = np.ones((T, N)) if weights is None else np.broadcast_to(
        np.asarray(weights, np.float64).reshape((T, -1)), (T, N))
    x = np.full((n, N), np.nan)
    rms = np.full(N, np.nan)
    n_valid = np.zeros(N, dtype=np.int64)
    for p in range(N):
        ok = np.isfinite(Y[:, p]) & (W[:, p] > 0)
        n_valid[p] = ok.sum()
        if n_valid[p] < n:
            continue
        sw = np.sqrt(W[ok, p])
        coef, _, rank, _ = np.linalg.lstsq(A[ok] * sw[:, None], Y[ok, p] * sw, rcond=None)
        if rank < n:
            continue
        x[:, p] = coef
        rms[p] = np.sqrt(np.mean((Y[ok, p] - A[ok] @ coef) ** 2))
    return x, n_valid, rms


def radial_kernel(r, kernel: str, length_scale: float) -> np.ndarray:
    """Kernel value at distance ``r`` (see the module docstring for the formulas)."""
    r = np.asarray(r, dtype=np.float64) / length_scale
    if kernel == "gaussian":
        return np.exp(-0.5 * r * r)
    if kernel == "matern32":
        s = np.sqrt(3.0) * r
        return (1.0 + s) * np.exp(-s)
    if kernel == "tps":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(r > 0, r * r * np.log(np.where(r > 0, r, 1.0)), 0.0)
    raise ValueError(f"unknown kernel {kernel!r}")


def eval_kernel_surface(centres, weights, x, y, *, kernel: str = "gaussian", length_scale: float = 1.0,
                        mean_coeffs=None) -> np.ndarray:
    """``sum_s weights[s] * k(|p - centres[s]|)`` (+ polynomial mean) at the points ``(x, y)`` (any shape)."""
    centres = np.asarray(centres, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    px = np.asarray(x, dtype=np.float64).ravel()
    py = np.asarray(y, dtype=np.float64).ravel()
    r = np.hypot(px[:, None] - centres[None, :, 0], py[:, None] - centres[None, :, 1])
    out = radial_kernel(r, kernel, length_scale) @ weights
    if mean_coeffs is not None:
        mean_coeffs = np.asarray(mean_coeffs, dtype=np.float64)
        out = out + polynomial_terms(px, py, _order_of(mean_coeffs.size)) @ mean_coeffs
    return out.reshape(np.shape(x))


def _order_of(n_terms: int) -> int:
    for order in (0, 1, 2):
        if n_poly_terms(order) == n_terms:
            return order
    raise ValueError(f"{n_terms} polynomial coefficients match no order 0-2 (1, 3 or 6 terms)")


def centre_scale(x, y) -> tuple[float, float, float]:
    """Centre ``(x0, y0)`` and half-width ``s`` mapping the coordinates into ``[-1, 1]`` (well-conditioned)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x0 = 0.5 * (float(x.min()) + float(x.max()))
    y0 = 0.5 * (float(y.min()) + float(y.max()))
    s = max(float(x.max()) - x0, float(y.max()) - y0)
    return x0, y0, (s if s > 0 else 1.0)


def poly_change_of_variables(coeffs, a: float, b: float, s: float, order: int) -> np.ndarray:
    """Coefficients of the same surface in new variables ``(X', Y')`` where ``X = a + s X'``, ``Y = b + s Y'``.

    ``coeffs`` ``(..., n_terms)`` are for the terms ``[1, X, Y, X², XY, Y²]``. Used to fit in centred, scaled
    coordinates (``a = -x0/s``, ``s = 1/scale``) and report in the caller's, and back.
    """
    c = np.asarray(coeffs, dtype=np.float64)
    out = np.zeros_like(c)
    out[..., 0] = c[..., 0]
    if order >= 1:
        out[..., 0] += c[..., 1] * a + c[..., 2] * b
        out[..., 1] = s * c[..., 1]
        out[..., 2] = s * c[..., 2]
    if order >= 2:
        out[..., 0] += c[..., 3] * a * a + c[..., 4] * a * b + c[..., 5] * b * b
        out[..., 1] += s * (2.0 * c[..., 3] * a + c[..., 4] * b)
        out[..., 2] += s * (c[..., 4] * a + 2.0 * c[..., 5] * b)
        out[..., 3] = s * s * c[..., 3]
        out[..., 4] = s * s * c[..., 4]
        out[..., 5] = s * s * c[..., 5]
    return out
