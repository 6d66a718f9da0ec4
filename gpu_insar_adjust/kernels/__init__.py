"""Performance kernels: per-epoch ramps, shared-design per-pixel fits, dense surface evaluation.

Each operation has three implementations chosen by the namespace of the input arrays
(:mod:`gpu_insar_adjust.backend`): a NumPy float64 reference (:mod:`.reference`, the specification), a fast CPU
path (:mod:`.cpu`: numba or blocked NumPy) for NumPy arrays, and a CUDA path (:mod:`.cuda`, CuPy ``RawModule``
kernels from the ``*.cu`` sources beside this file) for CuPy arrays. Importing this module imports neither CuPy
nor numba.

Conventions: a cube is ``(T, ...)`` (epochs first), float32 storage, NaN = missing; all sums and solves are
float64. Polynomial surfaces have the terms ``[1, x, y, x², xy, y²]`` truncated to ``order`` 0, 1 or 2, with
coefficients in the caller's coordinate units; the kernels centre and scale the coordinates internally so that
metre-scale projected coordinates stay well conditioned.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend
from ..errors import ArrayArgumentError
from .reference import KERNELS, n_poly_terms

__all__ = ["fit_epoch_ramps", "subtract_epoch_ramps", "remove_epoch_ramps", "shared_design_fit", "SharedFit",
           "eval_polynomial_surface", "eval_kernel_surface", "cpu_engine", "n_poly_terms", "KERNELS"]


class SharedFit(NamedTuple):
    """Result of :func:`shared_design_fit` (arrays on the input's backend)."""

    x: Any  # (n, *spatial) parameters, float64 (or float32 on request)
    n_valid: Any  # (*spatial,) observations used per pixel
    residual_rms: Any  # (*spatial,) unweighted rms of the residuals over valid observations, or None


def cpu_engine() -> str:
    """Which fast CPU engine runs on NumPy inputs: ``"numba"`` or ``"numpy"`` (blocked NumPy fall-back)."""
    from . import cpu

    return cpu.cpu_engine()


# --------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------
def _dtype_name(a) -> str:
    return str(a.dtype).rsplit(".", 1)[-1]  # "float32" for numpy, cupy and array_api_strict alike


def _is_float(a) -> bool:
    return _dtype_name(a) in ("float32", "float64")


def _check_cube(cube, name="cube"):
    if getattr(cube, "ndim", 0) < 2 or not _is_float(cube):
        raise ArrayArgumentError(
            f"`{name}` must be a float32/float64 array of shape (T, N) or (T, rows, cols); got "
            f"{getattr(cube, 'dtype', type(cube).__name__)} with shape {getattr(cube, 'shape', None)}.",
            field=name,
            fix="pass the displacement cube with epochs along the first axis, e.g. cube.astype('float32')")
    return cube.shape[0], int(np.prod(cube.shape[1:]))


def _check_order(order):
    if order not in (0, 1, 2):
        raise ArrayArgumentError(f"Polynomial order {order!r} is not supported.", field="order",
                                 fix="use order=0 (offset), 1 (linear ramp) or 2 (quadratic ramp)")
    return order


def _check_coords(x, y, n, spatial):
    for name, c in (("x", x), ("y", y)):
        if int(np.prod(c.shape)) != n or (c.shape != spatial and c.ndim != 1):
            raise ArrayArgumentError(
                f"Coordinate `{name}` has shape {c.shape}; the cube has {n} pixels of shape {spatial}.",
                field=name, fix=f"pass one {name} coordinate per pixel, shape {spatial} or ({n},)")


def _check_mask(xp, mask, T, n):
    if mask is None:
        return None
    if _dtype_name(mask) != "bool" or int(np.prod(mask.shape)) not in (n, T * n):
        raise ArrayArgumentError(f"`mask` must be boolean per pixel or per observation; got {mask.dtype} "
                                 f"{mask.shape}.", field="mask", fix="pass mask as a bool array, True = use")
    return xp.reshape(mask, (n,) if int(np.prod(mask.shape)) == n else (T, n))


def _check_weights(xp, weights, T, n, name="weights", epoch_only_ok=False):
    if weights is None:
        return None
    size = int(np.prod(weights.shape))
    if size not in (n, T * n) and not (epoch_only_ok and size == T):
        raise ArrayArgumentError(
            f"`{name}` has shape {weights.shape}, which matches neither the pixels ({n}) nor the cube ({T}×{n}).",
            field=name, fix=f"pass {name} per pixel, per observation (T, N)"
            + (" or per epoch (T,)" if epoch_only_ok else ""))
    bad = xp.any(~xp.isfinite(weights)) | xp.any(weights < 0)
    if bool(bad):
        raise ArrayArgumentError(f"`{name}` contains negative or non-finite values.", field=name,
                                 fix="use weights >= 0 (0 drops an observation), e.g. 1/sigma**2 with NaN sigma "
                                     "replaced by weight 0 explicitly")
    if size == T and epoch_only_ok:
        return xp.reshape(weights, (T,))
    return xp.reshape(weights, (n,) if size == n else (T, n))


# --------------------------------------------------------------------------------------------------------------
# 1. per-epoch ramps
# --------------------------------------------------------------------------------------------------------------
def fit_epoch_ramps(cube, x, y, *, order: int = 1, weights=None, mask=None):
    """Fit one polynomial ramp per epoch of a cube in one pass: coefficients ``(T, n_terms)`` float64.

    Parameters
    ----------
    cube
        ``(T, N)`` or ``(T, rows, cols)`` displacements (mm) or velocities; NaN = missing (masks differ by epoch).
    x, y
        Pixel coordinates, one per pixel (shape of ``cube.shape[1:]`` or ``(N,)``), in any unit (m, km, deg);
        the coefficients are in that unit.
    order
        0 offset, 1 linear ramp ``[1, x, y]``, 2 quadratic ramp ``[1, x, y, x², xy, y²]``.
    weights
        Optional non-negative weights per pixel ``(N,)`` or per observation ``(T, N)``; 0 drops.
    mask
        Optional boolean mask, True = use, per pixel ``(N,)`` or per observation ``(T, N)``.

    Epochs with fewer usable pixels than terms, or a singular system, get a row of NaN (documented, never a
    silent zero); :func:`subtract_epoch_ramps` refuses such rows.
    """
    xp = backend.namespace(cube, x, y, weights, mask)
    T, n = _check_cube(cube)
    _check_order(order)
    _check_coords(x, y, n, tuple(cube.shape[1:]))
    weights = _check_weights(xp, weights, T, n)
    mask = _check_mask(xp, mask, T, n)
    impl = backend.dispatch("kernels.fit_epoch_ramps", xp)
    return impl(xp.reshape(cube, (T, n)), xp.reshape(x, (n,)), xp.reshape(y, (n,)), order=order,
                weights=weights, mask=mask)


def subtract_epoch_ramps(cube, coeffs, x, y, order: int, *, in_place: bool = False, out=None):
    """Remove per-epoch ramps: ``cube[t] - ramp_t(x, y)``; NaN stays NaN. Returns the corrected cube.

    ``coeffs`` ``(T, n_terms)`` from :func:`fit_epoch_ramps`. ``in_place=True`` overwrites ``cube`` (no second
    cube in memory); ``out`` takes a preallocated array of the cube's shape and dtype.
    """
    xp = backend.namespace(cube, coeffs, x, y)
    T, n = _check_cube(cube)
    _check_order(order)
    _check_coords(x, y, n, tuple(cube.shape[1:]))
    nt = n_poly_terms(order)
    if tuple(coeffs.shape) != (T, nt):
        raise ArrayArgumentError(
            f"`coeffs` has shape {tuple(coeffs.shape)}, expected ({T}, {nt}) for order {order}.",
            field="coeffs", fix="pass the output of fit_epoch_ramps with the same order")
    if bool(xp.any(~xp.isfinite(coeffs))):
        raise ArrayArgumentError(
            "Some epochs have undetermined ramp coefficients (NaN rows: fewer usable pixels than terms).",
            field="coeffs", fix="drop those epochs from the cube, or set their coefficients to 0 to leave them "
                                "uncorrected on purpose")
    if in_place:
        if not (hasattr(cube, "flags") and cube.flags.c_contiguous):
            raise ArrayArgumentError("in_place=True needs a C-contiguous cube.", field="cube",
                                     fix="pass a contiguous array or use in_place=False")
        out = cube
    if out is not None and (tuple(out.shape) != tuple(cube.shape) or out.dtype != cube.dtype):
        raise ArrayArgumentError(f"`out` has shape {out.shape} and dtype {out.dtype}; the cube {cube.shape} "
                                 f"{cube.dtype}.", field="out", fix="allocate out like the cube")
    impl = backend.dispatch("kernels.subtract_epoch_ramps", xp)
    out2 = None if out is None else xp.reshape(out, (T, n))
    res = impl(xp.reshape(cube, (T, n)), coeffs, xp.reshape(x, (n,)), xp.reshape(y, (n,)), order, out=out2)
    return xp.reshape(res, tuple(cube.shape)) if out is None else out


def remove_epoch_ramps(cube, x, y, *, order: int = 1, weights=None, mask=None, in_place: bool = False,
                       group_bytes: int = 64 << 20):
    """Fit and remove one polynomial ramp per epoch; returns ``(corrected cube, coeffs (T, n_terms) float64)``.

    Bit for bit the result of :func:`fit_epoch_ramps` followed by :func:`subtract_epoch_ramps` (NumPy arrays;
    the kernels sum in a fixed order), but done a group of epochs at a time (about ``group_bytes`` of cube per
    group): the subtraction re-reads a group the fit has just read, while it is still in the CPU's cache, so
    the cube crosses the memory bus once for reading and once for writing instead of twice for reading. On
    CuPy arrays the whole cube is one group.

    Epochs whose ramp cannot be determined (fewer usable pixels than terms; a NaN row in ``coeffs``, as in
    :func:`fit_epoch_ramps`) are left unchanged; the NaN row says so. Other arguments as in
    :func:`fit_epoch_ramps`; ``in_place=True`` overwrites ``cube`` (C-contiguous) instead of copying it.
    """
    xp = backend.namespace(cube, x, y, weights, mask)
    T, n = _check_cube(cube)
    if in_place and not (hasattr(cube, "flags") and cube.flags.c_contiguous):
        raise ArrayArgumentError("in_place=True needs a C-contiguous cube.", field="cube",
                                 fix="pass a contiguous array or use in_place=False")
    name = backend.backend_name(xp)
    if name == "numpy":
        _check_order(order)
        spatial = tuple(cube.shape[1:])
        _check_coords(x, y, n, spatial)
        weights = _check_weights(xp, weights, T, n)
        mask = _check_mask(xp, mask, T, n)
        from . import cpu

        flat = np.reshape(cube, (T, n))
        out, coeffs = cpu.remove_epoch_ramps(flat, np.reshape(x, (n,)), np.reshape(y, (n,)), order=order,
                                             weights=weights, mask=mask, out=flat if in_place else None,
                                             group_bytes=group_bytes)
        return (cube if in_place else np.reshape(out, cube.shape)), coeffs
    if name != "cupy":
        # other array-API namespaces: the plain two-pass composition (no in-place writes through views)
        c = fit_epoch_ramps(cube, x, y, order=order, weights=weights, mask=mask)
        ok = xp.all(xp.isfinite(c), axis=1)
        return subtract_epoch_ramps(cube, xp.where(ok[:, None], c, xp.zeros_like(c)), x, y, order), c
    # CuPy: the device has no cache to keep a group in; one fit over the cube, then the subtraction
    out = cube if in_place else xp.asarray(cube, copy=True)
    c = fit_epoch_ramps(out, x, y, order=order, weights=weights, mask=mask)
    ok = xp.all(xp.isfinite(c), axis=1)
    # undetermined epochs: subtract a zero ramp (unchanged) and report NaN coefficients
    subtract_epoch_ramps(out, xp.where(ok[:, None], c, xp.zeros_like(c)), x, y, order, out=out)
    return out, c


def eval_polynomial_surface(coeffs, x, y, order: int, *, dtype: str = "float32"):
    """Evaluate a polynomial surface at every point ``(x, y)`` (equal shapes); float32 by default."""
    xp = backend.namespace(coeffs, x, y)
    _check_order(order)
    if tuple(coeffs.shape) != (n_poly_terms(order),):
        raise ArrayArgumentError(f"`coeffs` has shape {tuple(coeffs.shape)}, expected ({n_poly_terms(order)},).",
                                 field="coeffs", fix="pass one coefficient per term [1, x, y, x², xy, y²]")
    if tuple(x.shape) != tuple(y.shape):
        raise ArrayArgumentError(f"x {x.shape} and y {y.shape} differ in shape.", field="x",
                                 fix="pass one (x, y) pair per point, e.g. from numpy.meshgrid")
    return backend.dispatch("kernels.eval_polynomial_surface", xp)(coeffs, x, y, order, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# 2. shared-design per-pixel fits
# --------------------------------------------------------------------------------------------------------------
def shared_design_fit(A, Y, weights=None, *, residual_rms: bool = False, dtype: str = "float64") -> SharedFit:
    """Least squares ``Y[:, p] ≈ A @ x_p`` for every pixel with one shared design (e.g. annual velocities).

    ``A`` ``(T, n)`` float64 design (n ≤ ~12), ``Y`` ``(T, N)`` or ``(T, rows, cols)`` (NaN = missing for that
    pixel only), ``weights`` per epoch ``(T,)`` or per observation ``(T, N)`` (0 drops). One streaming pass: a
    gap-free block is a precomputed ``(AᵀWA)⁻¹Aᵀ W`` times the cube; blocks with gaps also accumulate per-pixel
    normal equations (packed upper triangle) while in cache and solve them with a small Cholesky.
    Pixels with fewer valid observations than unknowns, or singular, get NaN (``n_valid`` tells why).
    Equals :func:`gpu_insar_adjust.linalg.lstsq_shared` ``(A, Y).x``.
    """
    xp = backend.namespace(A, Y, weights)
    T, n_pix = _check_cube(Y, "Y")
    if getattr(A, "ndim", 0) != 2 or A.shape[0] != T or A.shape[1] < 1 or A.shape[1] > 32:
        raise ArrayArgumentError(f"Design `A` has shape {getattr(A, 'shape', None)}; Y has {T} epochs.",
                                 field="A", fix=f"pass a ({T}, n) design with 1 <= n <= 32 columns")
    if not bool(xp.all(xp.isfinite(A))):
        raise ArrayArgumentError("Design `A` contains NaN or inf.", field="A",
                                 fix="build the design from finite epoch times")
    weights = _check_weights(xp, weights, T, n_pix, epoch_only_ok=True)
    if dtype not in ("float32", "float64"):
        raise ArrayArgumentError(f"dtype {dtype!r} is not supported.", field="dtype", fix="use float32 or float64")
    impl = backend.dispatch("kernels.shared_design_fit", xp)
    x, n_valid, rms = impl(A, xp.reshape(Y, (T, n_pix)), weights, residual_rms=residual_rms)
    spatial = tuple(Y.shape[1:])
    x = xp.reshape(x, (A.shape[1],) + spatial)
    if dtype == "float32":
        x = xp.astype(x, xp.float32)
    return SharedFit(x, xp.reshape(n_valid, spatial), None if rms is None else xp.reshape(rms, spatial))


# --------------------------------------------------------------------------------------------------------------
# 3. kernel surfaces
# --------------------------------------------------------------------------------------------------------------
def eval_kernel_surface(centres, weights, x, y, *, kernel: str = "gaussian", length_scale: float = 1.0,
                        mean_coeffs=None, grid: bool = False, dtype: str = "float32"):
    """Dense ``sum_s weights[s] * k(|p - centres[s]|) + mean(p)`` at every pixel (a GP posterior mean).

    ``centres`` ``(S, 2)`` station (x, y), ``weights`` ``(S,)`` (e.g. scikit-learn's ``alpha_`` times the
    kernel amplitude), kernel ``gaussian`` | ``matern32`` | ``tps`` with ``length_scale`` in the coordinate unit,
    optional polynomial mean (1, 3 or 6 coefficients). ``grid=True``: ``x`` ``(W,)`` and ``y`` ``(H,)`` are the
    axes of a grid and the result is ``(H, W)``; otherwise ``x``, ``y`` are points of equal shape.
    """
    xp = backend.namespace(centres, weights, x, y, mean_coeffs)
    if kernel not in KERNELS:
        raise ArrayArgumentError(f"Unknown kernel {kernel!r}.", field="kernel", fix=f"use one of {KERNELS}")
    if not (float(length_scale) > 0):
        raise ArrayArgumentError(f"length_scale must be > 0; got {length_scale!r}.", field="length_scale",
                                 fix="give the correlation length in the coordinate unit (e.g. m)")
    if getattr(centres, "ndim", 0) != 2 or centres.shape[1] != 2 or tuple(weights.shape) != (centres.shape[0],):
        raise ArrayArgumentError(f"centres {getattr(centres, 'shape', None)} / weights "
                                 f"{getattr(weights, 'shape', None)} do not match.", field="centres",
                                 fix="pass centres (S, 2) as (x, y) and weights (S,)")
    if mean_coeffs is not None and int(np.prod(mean_coeffs.shape)) not in (1, 3, 6):
        raise ArrayArgumentError("mean_coeffs must have 1, 3 or 6 terms.", field="mean_coeffs",
                                 fix="pass polynomial coefficients [1, x, y, x², xy, y²] truncated to order 0-2")
    if grid and (x.ndim != 1 or y.ndim != 1):
        raise ArrayArgumentError("grid=True needs 1-D axes x (W,) and y (H,).", field="x",
                                 fix="pass the grid's x and y coordinate vectors, or grid=False with points")
    if not grid and tuple(x.shape) != tuple(y.shape):
        raise ArrayArgumentError(f"x {x.shape} and y {y.shape} differ in shape.", field="x",
                                 fix="pass one (x, y) pair per point, or grid=True with axes")
    return backend.dispatch("kernels.eval_kernel_surface", xp)(
        centres, weights, x, y, kernel=kernel, length_scale=float(length_scale), mean_coeffs=mean_coeffs,
        grid=grid, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# backend registrations (implementations imported on first call)
# --------------------------------------------------------------------------------------------------------------
def _np_fit(cube, x, y, *, order, weights, mask):
    from . import cpu

    return cpu.fit_epoch_ramps(cube, x, y, order=order, weights=weights, mask=mask)


def _np_subtract(cube, coeffs, x, y, order, *, out=None):
    from . import cpu

    return cpu.subtract_epoch_ramps(cube, coeffs, x, y, order, out=out)


def _np_poly(coeffs, x, y, order, *, dtype):
    from . import cpu

    return cpu.eval_polynomial_surface(coeffs, x, y, order, dtype=np.dtype(dtype))


def _np_shared(A, Y, weights, *, residual_rms):
    from . import cpu

    return cpu.shared_design_fit(A, Y, weights, residual_rms=residual_rms)


def _np_kernel(centres, weights, x, y, **kw):
    from . import cpu

    kw["dtype"] = np.dtype(kw["dtype"])
    return cpu.eval_kernel_surface(centres, weights, x, y, **kw)


def _cuda(name):
    def call(*args, **kw):
        from . import cuda

        return getattr(cuda, name)(*args, **kw)

    call.__name__ = name
    return call


for _op, _np_impl in (("fit_epoch_ramps", _np_fit), ("subtract_epoch_ramps", _np_subtract),
                      ("eval_polynomial_surface", _np_poly), ("shared_design_fit", _np_shared),
                      ("eval_kernel_surface", _np_kernel)):
    backend.register(f"kernels.{_op}", "numpy")(_np_impl)
    backend.register(f"kernels.{_op}", "cupy")(_cuda(_op))
del _op, _np_impl
