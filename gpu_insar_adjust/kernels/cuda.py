"""CUDA paths of the performance kernels: CuPy ``RawModule`` kernels compiled from the ``*.cu`` files here.

Imported only when a kernel is called with CuPy arrays (never by ``import gpu_insar_adjust``). The small
per-epoch systems (T × 6) and the coefficient changes of variables are solved on the host; everything that
touches the cube stays on the device.

Ramps of pixels on a row-major grid (as from ``meshgrid``, the layout of every raster) take row kernels: per row
the moments need sums in u alone, and v is one number, so a pixel costs a few additions and reads no
cube-sized coordinate array. Scattered pixels, per-pixel weights and masks take the pixel kernels.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cupy as cp
import numpy as np

from . import cpu
from . import reference as ref

_HERE = Path(__file__).resolve().parent
_THREADS = 256
_KERNEL_IDS = {"gaussian": 0, "matern32": 1, "tps": 2}


@functools.lru_cache(maxsize=None)
def _module(name: str, defines: tuple[str, ...] = ()) -> cp.RawModule:
    code = (_HERE / f"{name}.cu").read_text()
    return cp.RawModule(code=code, options=("--std=c++14",) + tuple(f"-D{d}" for d in defines))


def _grid(n: int) -> int:
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    return int(max(1, min((n + _THREADS - 1) // _THREADS, sms * 32)))


_UNROLL = 4  # pixels per thread and loop trip in ramps.cu (UNROLL there)
_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: the epoch kernels take the epochs in batches of this many


def _epoch_grid(T: int, N: int) -> int:
    """Blocks per epoch for the (pixels, epochs) grids of ramps.cu: about 8 blocks per multiprocessor in all."""
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    per_thread = _THREADS * _UNROLL
    return int(max(1, min((N + per_thread - 1) // per_thread, (8 * sms + T - 1) // max(1, T))))


def _centred(x, y):
    # one transfer for the four extremes (each float() of a device scalar is a synchronisation)
    xmin, xmax, ymin, ymax = (float(e) for e in cp.stack([x.min(), x.max(), y.min(), y.max()]).get())
    x0 = 0.5 * (xmin + xmax)
    y0 = 0.5 * (ymin + ymax)
    s = max(xmax - x0, ymax - y0)
    s = s if s > 0 else 1.0
    u = (x.astype(cp.float64) - x0) / s
    v = (y.astype(cp.float64) - y0) / s
    return cp.ascontiguousarray(u), cp.ascontiguousarray(v), (x0, y0, s)


_MIN_GRID_COLS = 32  # one warp per row: narrower rows would leave lanes idle; they take the pixel kernels


def _grid_axes(x, y):
    """``(x axis (cols,), y axis (rows,))`` on the host when the flattened pixels form a row-major grid (x
    constant down a column, y along a row, as from ``meshgrid``) at least ``_MIN_GRID_COLS`` wide, else None.
    Two synchronisations: where y first changes, then one transfer of the verdict and the axes."""
    N = int(x.size)
    if N == 0 or int(y.size) != N:
        return None
    cols = int(cp.argmax(y != y[0])) or N  # the first change of y starts the second row
    if cols < _MIN_GRID_COLS or N % cols:
        return None
    rows = N // cols
    X, Y = x.reshape(rows, cols), y.reshape(rows, cols)
    is_grid = cp.all(X == X[:1]) & cp.all(Y == Y[:, :1])
    h = cp.concatenate([is_grid.astype(cp.float64).reshape(1), X[0].astype(cp.float64),
                        Y[:, 0].astype(cp.float64)]).get()
    if h[0] != 1.0:
        return None
    return h[1:1 + cols], h[1 + cols:]


def _grid_blocks(rows: int) -> int:
    return max(1, -(-rows // (_THREADS // 32)))  # one warp per row


def _grid_centring(axes):
    """``(x0, y0, s, u per column, v per row)`` (host float64) of a grid: the extremes of a grid are those of
    its axes, so the centring is the pixel kernels' own."""
    xc, yr = axes
    x0, y0, s = ref.centre_scale(xc, yr)
    return x0, y0, s, (xc - x0) / s, (yr - y0) / s


def _fit_grid(cube, axes, order):
    """Moments and right-hand sides per row (ramp_row_partials), summed per epoch on the device in a fixed
    order (ramp_row_reduce): one read of the cube, a few additions per pixel, no cube-sized coordinate reads."""
    T, N = cube.shape
    x0, y0, s, uc, vr_h = _grid_centring(axes)
    rows, cols = vr_h.size, uc.size
    u12 = cp.asarray(np.stack([uc, uc * uc]))
    vr = cp.asarray(vr_h)
    part = cp.empty((T, rows, 9), cp.float64)
    sums = cp.empty((T, 22), cp.float64)
    mod = _module("ramps")
    partials, reduce = mod.get_function("ramp_row_partials"), mod.get_function("ramp_row_reduce")
    for t0 in range(0, T, _MAX_GRID_Y):
        nt = min(T - t0, _MAX_GRID_Y)
        partials((_grid_blocks(rows), nt), (_THREADS,), (cube, u12, np.int64(rows), np.int64(cols), np.int64(t0),
                                                         part))
        reduce((nt,), (_THREADS,), (part, vr, np.int64(rows), np.int64(t0), sums))
    h = cp.asnumpy(sums)
    nrm = h[:, :15][:, cpu._PAIR_TO_MOMENT]
    c6 = cpu._solve_small_spd(nrm, h[:, 15:21], h[:, 21], ref.n_poly_terms(order))
    return cp.asarray(cpu._from_centred_coeffs(c6, x0, y0, s, order))


def fit_epoch_ramps(cube, x, y, *, order=1, weights=None, mask=None):
    T, N = cube.shape
    cube = cp.ascontiguousarray(cube, dtype=cp.float32)
    if weights is None and mask is None:
        axes = _grid_axes(x, y)
        if axes is not None:
            return _fit_grid(cube, axes, order)
    u, v, (x0, y0, s) = _centred(x, y)
    w = cp.ones(N, cp.float64)
    wt = cp.zeros(1, cp.float64)
    m8 = cp.zeros(1, cp.uint8)
    if weights is not None:
        if weights.ndim == 1:
            w = cp.ascontiguousarray(weights, dtype=cp.float64)
        else:
            wt = cp.ascontiguousarray(weights, dtype=cp.float64)
    if mask is not None:
        if mask.ndim == 1:
            w = cp.where(mask, w, 0.0)
        else:
            m8 = cp.ascontiguousarray(mask).view(cp.uint8)
    fn = _module("ramps").get_function("ramp_moments")
    blocks_x = _epoch_grid(T, N)
    part = cp.empty((T, blocks_x, 22), cp.float64)  # every block writes its own partial sums (no atomics)
    for t0 in range(0, T, _MAX_GRID_Y):
        fn((blocks_x, min(T - t0, _MAX_GRID_Y)), (_THREADS,),
           (cube, u, v, w, m8, wt, np.int32(mask is not None and mask.ndim == 2),
            np.int32(weights is not None and weights.ndim == 2), np.int64(N), np.int64(t0), part))
    h = cp.asnumpy(part).sum(axis=1)  # a fixed order on the host: reproducible ramps
    nrm = h[:, :15][:, cpu._PAIR_TO_MOMENT]
    c6 = cpu._solve_small_spd(nrm, h[:, 15:21], h[:, 21], ref.n_poly_terms(order))
    return cp.asarray(cpu._from_centred_coeffs(c6, x0, y0, s, order))


def subtract_epoch_ramps(cube, coeffs, x, y, order, *, out=None):
    T, N = cube.shape
    axes = _grid_axes(x, y) if cube.dtype == cp.float32 else None
    if axes is not None:  # per row the ramp is a + u (b + c3 u): one cached column table, no u, v arrays
        x0, y0, s, uc_h, vr_h = _grid_centring(axes)
        c6 = cp.asarray(cpu._to_centred_coeffs(cp.asnumpy(coeffs).astype(np.float64), x0, y0, s, order))
        cube = cp.ascontiguousarray(cube)
        fn = _module("ramps").get_function("ramp_grid_subtract")
        uc, vr = cp.asarray(uc_h), cp.asarray(vr_h)

        def run(dst):
            for t0 in range(0, T, _MAX_GRID_Y):
                fn((_grid_blocks(vr_h.size), min(T - t0, _MAX_GRID_Y)), (_THREADS,),
                   (cube, c6, uc, vr, np.int64(vr_h.size), np.int64(uc_h.size), np.int64(t0), dst))

        return _into(out, cube.shape, run)
    u, v, (x0, y0, s) = _centred(x, y)
    c6 = cp.asarray(cpu._to_centred_coeffs(cp.asnumpy(coeffs).astype(np.float64), x0, y0, s, order))
    if cube.dtype != cp.float32:
        res = cube - ref_eval_cupy(c6, u, v)
        if out is not None:
            out[...] = res
            return out
        return res
    cube = cp.ascontiguousarray(cube)
    fn = _module("ramps").get_function("ramp_subtract")
    blocks_x = _epoch_grid(T, N)

    def run(dst):
        for t0 in range(0, T, _MAX_GRID_Y):
            fn((blocks_x, min(T - t0, _MAX_GRID_Y)), (_THREADS,), (cube, c6, u, v, np.int64(N), np.int64(t0), dst))

    return _into(out, cube.shape, run)


def _into(out, shape, run):
    """``run(dst)`` with a C-contiguous float32 ``dst`` (the kernels write rows of one), which is ``out`` when
    ``out`` is one; otherwise the result is copied into ``out`` (or returned when ``out`` is None). The copy
    also covers an ``out`` that is the caller's non-contiguous cube: the kernel read a contiguous copy of it."""
    direct = out is not None and out.dtype == cp.float32 and out.flags.c_contiguous and tuple(out.shape) == shape
    dst = out if direct else cp.empty(shape, cp.float32)
    run(dst)
    if out is None or direct:
        return dst
    out[...] = dst
    return out


def ref_eval_cupy(c6, u, v):
    """(T, N) float64 ramps from centred coefficients (T, 6) with plain CuPy (float64 cubes)."""
    c = c6[:, :, None]
    return c[:, 0] + u * (c[:, 1] + c[:, 3] * u + c[:, 4] * v) + v * (c[:, 2] + c[:, 5] * v)


def eval_polynomial_surface(coeffs, x, y, order, *, dtype="float32"):
    shape = x.shape
    u, v, (x0, y0, s) = _centred(x.ravel(), y.ravel())
    c6 = cp.asarray(cpu._to_centred_coeffs(cp.asnumpy(coeffs).astype(np.float64)[None, :], x0, y0, s, order)[0])
    out = cp.empty(u.size, dtype=dtype)
    name = "poly_eval_f32" if out.dtype == cp.float32 else "poly_eval_f64"
    _module("ramps").get_function(name)((_grid(u.size),), (_THREADS,), (c6, u, v, np.int64(u.size), out))
    return out.reshape(shape)


def _epoch_chunks(As, ew):
    """Per 32 epochs: the packed upper triangle of sum w a a^T over the epochs with w > 0, and those epochs as
    bits (shared_fit.cu subtracts the missing epochs' outer products from the first)."""
    T, n = As.shape
    n_chunks = -(-T // 32)
    iu = np.triu_indices(n)
    keep = ew > 0
    per_epoch = np.where(keep[:, None], ew[:, None] * As[:, iu[0]] * As[:, iu[1]], 0.0)
    padded = np.zeros((n_chunks * 32, per_epoch.shape[1]))
    padded[:T] = per_epoch
    bits = np.zeros(n_chunks * 32, bool)
    bits[:T] = keep
    # bit s of chunk c is epoch 32 c + s: little-endian bytes of little-endian bits
    chunk_epochs = np.packbits(bits.reshape(n_chunks, 32), axis=1, bitorder="little").view("<u4").ravel()
    return padded.reshape(n_chunks, 32, -1).sum(axis=1), np.ascontiguousarray(chunk_epochs, np.uint32)


def shared_design_fit(A, Y, weights=None, *, residual_rms=False):
    T, N = Y.shape
    A_h = cp.asnumpy(A).astype(np.float64)
    n = A_h.shape[1]
    ew = np.ones(T) if weights is None or weights.ndim == 2 else cp.asnumpy(weights).astype(np.float64)
    colscale = np.sqrt(np.sum(ew[:, None] * A_h * A_h, axis=0))
    colscale[colscale == 0] = 1.0
    As = cp.asarray(np.ascontiguousarray(A_h / colscale))
    wt = cp.ascontiguousarray(weights, dtype=cp.float64) if weights is not None and weights.ndim == 2 \
        else cp.zeros(1, cp.float64)
    Yc = cp.ascontiguousarray(Y, dtype=cp.float32)
    x = cp.empty((n, N), cp.float64)
    n_valid = cp.empty(N, cp.int64)
    rms = cp.empty(N if residual_rms else 1, cp.float64)
    chunk_nrm, chunk_epochs = _epoch_chunks(A_h / colscale, ew)
    fn = _module("shared_fit", (f"N_TERMS={n}",)).get_function("shared_fit")
    fn(((N + _THREADS - 1) // _THREADS,), (_THREADS,),
       (As, cp.asarray(ew), Yc, wt, np.int32(weights is not None and weights.ndim == 2), np.int32(residual_rms),
        np.int32(T), np.int64(N), cp.asarray(colscale), cp.asarray(chunk_nrm), cp.asarray(chunk_epochs), x,
        n_valid, rms))
    return x, n_valid, (rms if residual_rms else None)


def eval_kernel_surface(centres, weights, x, y, *, kernel="gaussian", length_scale=1.0, mean_coeffs=None,
                        grid=False, dtype="float32"):
    c = cp.asarray(centres, dtype=cp.float64)
    cx = cp.ascontiguousarray(c[:, 0])
    cy = cp.ascontiguousarray(c[:, 1])
    wts = cp.ascontiguousarray(weights, dtype=cp.float64)
    xa = cp.ascontiguousarray(x, dtype=cp.float64).ravel()
    ya = cp.ascontiguousarray(y, dtype=cp.float64).ravel()
    if grid:
        shape = (ya.size, xa.size)
        n_out, width = ya.size * xa.size, xa.size
    else:
        shape = tuple(x.shape)
        n_out, width = xa.size, 1
    mc = cp.zeros(6, cp.float64)
    x0 = y0 = 0.0
    s = 1.0
    if mean_coeffs is not None:
        x0, y0, s = ref.centre_scale(cp.asnumpy(xa), cp.asnumpy(ya))
        order = ref._order_of(int(mean_coeffs.size))
        mc = cp.asarray(cpu._to_centred_coeffs(cp.asnumpy(mean_coeffs).astype(np.float64)[None, :],
                                               x0, y0, s, order)[0])
    out = cp.empty(n_out, cp.float32)
    _module("surfaces").get_function("kernel_surface")(
        ((n_out + _THREADS - 1) // _THREADS,), (_THREADS,),
        (cx, cy, wts, np.int32(cx.size), xa, ya, np.int64(n_out), np.int64(width), np.int32(grid),
         np.int32(_KERNEL_IDS[kernel]), np.float64(1.0 / length_scale), np.int32(mean_coeffs is not None), mc,
         np.float64(x0), np.float64(y0), np.float64(1.0 / s), out))
    out = out.reshape(shape)
    return out if np.dtype(dtype) == np.float32 else out.astype(dtype)
