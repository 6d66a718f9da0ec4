"""Weighted, NaN-aware, batched linear least squares written once against the array API.

Two shapes of problem recur in every stage of the adjustment:

* **One design, many right-hand sides** (:func:`lstsq_shared`): a time-series design (epochs × parameters)
  shared by millions of pixels, or a polynomial surface shared by many epochs. Each column may miss different
  observations (NaN), so each column has its own normal matrix; they are formed for all columns at once with
  one matrix product over the pairwise column products of the design, never with a per-pixel design matrix.
* **Many small independent systems** (:func:`lstsq_batched`): one system per pixel or per station window.

Both solve the normal equations in float64 after Jacobi (column) equilibration, then apply one step of iterative
refinement against the original residuals, which brings the accuracy close to that of a QR solution for the
moderately ill-conditioned problems met here (polynomials in raw coordinates, collinear-ish station sets).
Systems that are not determined (fewer valid observations than unknowns, or a numerically singular normal
matrix) get NaN parameters and ``determined=False``: this is reported, never hidden.

Missing data: an observation is used when its value is finite, its weight finite and > 0, and (for the batched
solver) its design row finite. Weights are inverse variances (1/σ²).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import backend
from .errors import ArrayArgumentError

__all__ = ["LstsqResult", "lstsq_shared", "lstsq_batched", "DEFAULT_RCOND"]

#: Ratio of the smallest to the largest eigenvalue of the equilibrated normal matrix below which a system is
#: declared singular. The equilibrated matrix has unit diagonal, so this bounds cond(A)² at 1e13.
DEFAULT_RCOND = 1e-13


@dataclass
class LstsqResult:
    """Solution of a batch of weighted least-squares problems.

    Attributes
    ----------
    x
        Parameters: (n,) or (n, k) for :func:`lstsq_shared`; (..., n) for :func:`lstsq_batched`. float64.
    cov
        Unscaled parameter covariance (A^T W A)^-1: (n, n), (k, n, n) or (..., n, n). Multiply by
        :attr:`sigma0_sq` for the a-posteriori covariance when the weights are only relative.
    n_valid
        Number of observations used per system.
    determined
        False where the system had too few observations or a singular normal matrix (then ``x`` is NaN).
    residual_rms
        Weighted RMS of the residuals, sqrt(Σ w r² / Σ w), in the units of the observations.
    sigma0_sq
        A-posteriori variance factor Σ w r² / (n_valid - n) (NaN where there is no redundancy).
    rcond
        Reciprocal condition number (smallest/largest eigenvalue) of the equilibrated normal matrix.
    """

    x: Any
    cov: Any
    n_valid: Any
    determined: Any
    residual_rms: Any
    sigma0_sq: Any
    rcond: Any


def _check_float(name: str, a, xp) -> None:
    if not xp.isdtype(a.dtype, "real floating"):
        raise ArrayArgumentError(f"Argument {name!r} must be a real floating-point array, got dtype {a.dtype}.",
                                 field=name, fix=f"convert it first, e.g. {name}.astype('float64')")


def _device_kw(xp, a) -> dict:
    import array_api_compat

    return {"device": array_api_compat.device(a)}


def _solve_equilibrated(xp, N, b, n_valid, n_params: int, rcond: float, has_ridge: bool):
    """Solve a stack of equilibrated normal systems N z = b; mark and neutralise undetermined ones.

    Returns z (batch, n), inverse (batch, n, n), determined (batch,), reciprocal condition (batch,).
    """
    eye = xp.eye(n_params, dtype=xp.float64, **_device_kw(xp, N))
    eig = xp.linalg.eigvalsh(N)
    eig_max = xp.max(eig, axis=-1)
    eig_min = xp.min(eig, axis=-1)
    rc = xp.where(eig_max > 0, eig_min / xp.where(eig_max > 0, eig_max, 1.0), 0.0)
    determined = rc > rcond
    if not has_ridge:
        determined = determined & (n_valid >= n_params)
    # Undetermined systems are replaced by the identity so the batched solve never fails on them; their
    # solutions are set to NaN afterwards.
    Nsafe = xp.where(determined[:, None, None], N, eye)
    inv = xp.linalg.solve(Nsafe, xp.broadcast_to(eye, Nsafe.shape))
    z = xp.matmul(inv, b[..., None])[..., 0]
    return z, inv, determined, rc


# --------------------------------------------------------------------------------------------------------------
# One design, many right-hand sides
# --------------------------------------------------------------------------------------------------------------
def lstsq_shared(A, Y, weights=None, *, ridge: float = 0.0, rcond: float = DEFAULT_RCOND,
                 chunk_columns: int = 65536, refine: int = 1) -> LstsqResult:
    """Weighted least squares ``A x ≈ Y[:, j]`` for every column j, with per-column missing data.

    Parameters
    ----------
    A
        Design matrix (m, n), finite. Shared by all columns.
    Y
        Observations (m,) or (m, k). NaN/inf marks a missing observation for that column only.
    weights
        Inverse variances, broadcastable to Y: (m,), (m, k) or None (all ones). Zero or NaN weight drops the
        observation.
    ridge
        Tikhonov regularisation λ: minimises Σ w r² + λ |x|².
    rcond
        Systems whose equilibrated normal matrix has smallest/largest eigenvalue ≤ ``rcond`` are undetermined.
    chunk_columns
        Columns solved per block, bounding temporary memory to about 8·m·chunk_columns bytes (float64).
    refine
        Steps of iterative refinement.

    Returns
    -------
    LstsqResult
        ``x`` has shape (n,) for 1-D ``Y``, else (n, k). ``cov`` is (n, n) for 1-D ``Y``, else (k, n, n).
    """
    xp = backend.namespace(A, Y, weights)
    if A.ndim != 2:
        raise ArrayArgumentError(f"Design matrix 'A' must be 2-D (m observations, n parameters), got shape "
                                 f"{A.shape}.", field="A", fix="for one system per pixel use lstsq_batched")
    _check_float("A", A, xp)
    _check_float("Y", Y, xp)
    m, n = A.shape
    one_d = Y.ndim == 1
    if Y.ndim not in (1, 2) or Y.shape[0] != m:
        raise ArrayArgumentError(f"Observations 'Y' must have shape ({m},) or ({m}, k) to match A {A.shape}, "
                                 f"got {Y.shape}.", field="Y", fix="pass observations with one row per row of A")
    if not bool(xp.all(xp.isfinite(A))):
        raise ArrayArgumentError("Design matrix 'A' contains NaN or inf.", field="A",
                                 fix="drop those observations (rows) or mark them missing in Y instead")
    Y2 = Y[:, None] if one_d else Y
    k = Y2.shape[1]
    W2 = None
    if weights is not None:
        _check_float("weights", weights, xp)
        if weights.ndim == 1 and weights.shape[0] == m:
            W2 = weights[:, None]
        elif weights.ndim == 2 and weights.shape in ((m, k), (m, 1)):
            W2 = weights
        elif one_d and weights.shape == Y.shape:
            W2 = weights[:, None]
        else:
            raise ArrayArgumentError(f"'weights' shape {weights.shape} does not match Y {Y.shape}.",
                                     field="weights", fix=f"pass weights of shape ({m},) or {tuple(Y2.shape)}")
        W2 = xp.astype(W2, xp.float64)

    A64 = xp.astype(A, xp.float64)
    colnorm = xp.sqrt(xp.sum(A64 * A64, axis=0))
    scale = xp.where(colnorm > 0, 1.0 / xp.where(colnorm > 0, colnorm, 1.0), 1.0)
    As = A64 * scale
    # Pairwise column products: the normal matrices of all columns are then one GEMM, W^T @ P.
    iu = [(i, j) for i in range(n) for j in range(i, n)]
    P = xp.stack([As[:, i] * As[:, j] for (i, j) in iu], axis=1)  # (m, n(n+1)/2)
    pair_index = {p: q for q, p in enumerate(iu)}
    full_index = [pair_index[(min(i, j), max(i, j))] for i in range(n) for j in range(n)]
    full_index = xp.asarray(full_index, dtype=xp.int64, **_device_kw(xp, A))
    ridge_diag = ridge * scale * scale  # ridge in the original parameter space

    xs, covs, nvs, dets, rmss, s0s, rcs = [], [], [], [], [], [], []
    for start in range(0, k, max(int(chunk_columns), 1)):
        stop = min(start + int(chunk_columns), k)
        Yb = xp.astype(Y2[:, start:stop], xp.float64)
        valid = xp.isfinite(Yb)
        if W2 is None:
            Wb = xp.astype(valid, xp.float64)
        else:
            wcol = W2 if W2.shape[1] == 1 else W2[:, start:stop]
            ok = valid & xp.isfinite(wcol) & (wcol > 0)
            Wb = xp.where(ok, wcol, 0.0)
            valid = ok
        Y0 = xp.where(valid, Yb, 0.0)
        kb = stop - start
        Npk = xp.matmul(xp.matrix_transpose(Wb), P)  # (kb, npairs)
        N = xp.reshape(xp.take(Npk, full_index, axis=1), (kb, n, n))
        if ridge:
            N = N + xp.eye(n, dtype=xp.float64, **_device_kw(xp, A)) * ridge_diag
        b = xp.matmul(xp.matrix_transpose(Wb * Y0), As)  # (kb, n)
        n_valid = xp.sum(xp.astype(valid, xp.int64), axis=0)
        z, inv, det, rc = _solve_equilibrated(xp, N, b, n_valid, n, rcond, bool(ridge))
        for _ in range(refine):
            R = Y0 - xp.matmul(As, xp.matrix_transpose(z))  # (m, kb)
            r_b = xp.matmul(xp.matrix_transpose(Wb * R), As)
            if ridge:
                r_b = r_b - z * ridge_diag
            z = z + xp.matmul(inv, r_b[..., None])[..., 0]
        R = xp.where(valid, Y0 - xp.matmul(As, xp.matrix_transpose(z)), 0.0)
        wrr = xp.sum(Wb * R * R, axis=0)
        wsum = xp.sum(Wb, axis=0)
        rms = xp.sqrt(wrr / xp.where(wsum > 0, wsum, 1.0))
        dof = xp.astype(n_valid - n, xp.float64)
        s0 = xp.where(dof > 0, wrr / xp.where(dof > 0, dof, 1.0), xp.nan)
        nan = xp.asarray(xp.nan, dtype=xp.float64, **_device_kw(xp, A))
        x = xp.where(det[:, None], z * scale, nan)  # back to original parameter units
        cov = xp.where(det[:, None, None], inv * (scale[:, None] * scale[None, :]), nan)
        xs.append(x)
        covs.append(cov)
        nvs.append(n_valid)
        dets.append(det)
        rmss.append(xp.where(wsum > 0, rms, nan))
        s0s.append(xp.where(det, s0, nan))
        rcs.append(rc)

    x = xp.matrix_transpose(xp.concat(xs, axis=0))  # (n, k)
    cov = xp.concat(covs, axis=0)
    res = LstsqResult(x=x, cov=cov, n_valid=xp.concat(nvs), determined=xp.concat(dets),
                      residual_rms=xp.concat(rmss), sigma0_sq=xp.concat(s0s), rcond=xp.concat(rcs))
    if one_d:
        res = LstsqResult(x=res.x[:, 0], cov=res.cov[0, ...], n_valid=res.n_valid[0], determined=res.determined[0],
                          residual_rms=res.residual_rms[0], sigma0_sq=res.sigma0_sq[0], rcond=res.rcond[0])
    return res


# --------------------------------------------------------------------------------------------------------------
# Many small independent systems
# --------------------------------------------------------------------------------------------------------------
def lstsq_batched(A, y, weights=None, *, ridge: float = 0.0, rcond: float = DEFAULT_RCOND,
                  refine: int = 1) -> LstsqResult:
    """Weighted least squares for a stack of independent systems ``A[b] x[b] ≈ y[b]``.

    Parameters
    ----------
    A
        Designs (..., m, n). A row with any non-finite entry is dropped from its system.
    y
        Observations (..., m); NaN marks a missing observation.
    weights
        Inverse variances (..., m) or broadcastable; zero/NaN drops the observation.
    ridge, rcond, refine
        As for :func:`lstsq_shared`.

    Returns
    -------
    LstsqResult
        ``x`` (..., n), ``cov`` (..., n, n), other fields (...).
    """
    xp = backend.namespace(A, y, weights)
    _check_float("A", A, xp)
    _check_float("y", y, xp)
    if A.ndim < 2:
        raise ArrayArgumentError(f"'A' must be at least 2-D (..., m, n), got shape {A.shape}.", field="A",
                                 fix="for a single system pass A with shape (m, n) and y with shape (m,)")
    m, n = A.shape[-2], A.shape[-1]
    batch = A.shape[:-2]
    if tuple(y.shape) != (*batch, m):
        raise ArrayArgumentError(f"'y' must have shape {(*batch, m)} to match A {A.shape}, got {y.shape}.",
                                 field="y", fix="pass one observation per design row for every system")
    nb = 1
    for d in batch:
        nb *= int(d)
    A3 = xp.reshape(xp.astype(A, xp.float64), (nb, m, n))
    y2 = xp.reshape(xp.astype(y, xp.float64), (nb, m))
    valid = xp.isfinite(y2) & xp.all(xp.isfinite(A3), axis=-1)
    if weights is None:
        w2 = xp.astype(valid, xp.float64)
    else:
        _check_float("weights", weights, xp)
        try:
            wb = xp.broadcast_to(xp.astype(weights, xp.float64), (*batch, m))
        except ValueError as exc:
            raise ArrayArgumentError(f"'weights' shape {weights.shape} does not broadcast to {(*batch, m)}.",
                                     field="weights", fix="pass weights shaped like y") from exc
        w2 = xp.reshape(wb, (nb, m))
        valid = valid & xp.isfinite(w2) & (w2 > 0)
        w2 = xp.where(valid, w2, 0.0)
    A0 = xp.where(valid[..., None], A3, 0.0)
    y0 = xp.where(valid, y2, 0.0)
    colnorm = xp.sqrt(xp.sum(w2[..., None] * A0 * A0, axis=-2))  # (nb, n)
    scale = xp.where(colnorm > 0, 1.0 / xp.where(colnorm > 0, colnorm, 1.0), 1.0)
    As = A0 * scale[:, None, :]
    AtW = xp.matrix_transpose(As) * w2[:, None, :]
    N = xp.matmul(AtW, As)
    ridge_diag = ridge * scale * scale
    if ridge:
        N = N + xp.eye(n, dtype=xp.float64, **_device_kw(xp, A)) * ridge_diag[:, None, :]
    b = xp.matmul(AtW, y0[..., None])[..., 0]
    n_valid = xp.sum(xp.astype(valid, xp.int64), axis=-1)
    z, inv, det, rc = _solve_equilibrated(xp, N, b, n_valid, n, rcond, bool(ridge))
    for _ in range(refine):
        r = y0 - xp.matmul(As, z[..., None])[..., 0]
        r_b = xp.matmul(AtW, r[..., None])[..., 0]
        if ridge:
            r_b = r_b - z * ridge_diag
        z = z + xp.matmul(inv, r_b[..., None])[..., 0]
    r = xp.where(valid, y0 - xp.matmul(As, z[..., None])[..., 0], 0.0)
    wrr = xp.sum(w2 * r * r, axis=-1)
    wsum = xp.sum(w2, axis=-1)
    nan = xp.asarray(xp.nan, dtype=xp.float64, **_device_kw(xp, A))
    rms = xp.where(wsum > 0, xp.sqrt(wrr / xp.where(wsum > 0, wsum, 1.0)), nan)
    dof = xp.astype(n_valid - n, xp.float64)
    s0 = xp.where(det & (dof > 0), wrr / xp.where(dof > 0, dof, 1.0), nan)
    x = xp.where(det[:, None], z * scale, nan)
    cov = xp.where(det[:, None, None], inv * (scale[:, :, None] * scale[:, None, :]), nan)
    return LstsqResult(x=xp.reshape(x, (*batch, n)), cov=xp.reshape(cov, (*batch, n, n)),
                       n_valid=xp.reshape(n_valid, batch), determined=xp.reshape(det, batch),
                       residual_rms=xp.reshape(rms, batch), sigma0_sq=xp.reshape(s0, batch),
                       rcond=xp.reshape(rc, batch))
