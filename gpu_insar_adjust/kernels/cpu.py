"""Fast CPU paths of the performance kernels: numba when importable, blocked NumPy otherwise.

Inputs arrive validated and flattened from :mod:`gpu_insar_adjust.kernels` (cube ``(T, N)``, coordinates
``(N,)``). Both engines stream the float32 cube once in cache-sized pixel blocks and accumulate in float64;
neither builds a per-pixel design matrix.

Ramps on a grid (pixels flattened row-major from a ``meshgrid``: x constant down a column, y along a row; found
by one look at the coordinates) take the numba engine's per-row path: ``Σ_cols d u^a`` (a ≤ 2) per row, then
times ``v^b`` per row, i.e. three multiply-adds per pixel; the normal-matrix moments of a row are precomputed
and only rows with gaps subtract the moments of their missing pixels. Every sum is reduced in a fixed order, so
:func:`remove_epoch_ramps` (fit and subtract a group of epochs while it is in cache) is bit for bit
:func:`fit_epoch_ramps` followed by :func:`subtract_epoch_ramps`.

Shared-design fits read the cube once per pixel block, four epochs at a time, each float64 slab row feeding the
multiply-adds of three unknowns (register reuse instead of a BLAS call per block); float32 in, float64 sums
and solves: results equal a float64 ``lstsq`` per pixel to ~1e-13 relative.

numba is optional (extra ``fast``). :func:`cpu_engine` says which engine runs; the environment variable
``GIA_CPU_KERNELS=numpy`` forces the NumPy engine (``numba`` forces numba and fails without it).

The numba kernels use ``fastmath={"reassoc", "contract"}``: re-association lets LLVM vectorise the float64
sums, while NaN/inf semantics are kept (no ``nnan``/``ninf``: ``fastmath=True`` would fold the ``y == y``
gap test to True).
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import reference as ref

log = logging.getLogger(__name__)

CHUNK = 512  # pixels per chunk in the ramp fit: a chunk with no gap adds its precomputed moments at once
FASTMATH = frozenset({"reassoc", "contract"})


# --------------------------------------------------------------------------------------------------------------
# engine selection
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


def cpu_engine(engine: str | None = None) -> str:
    """The CPU engine that runs: ``"numba"`` or ``"numpy"`` (``engine`` or ``GIA_CPU_KERNELS`` override)."""
    choice = (engine or os.environ.get("GIA_CPU_KERNELS", "auto")).lower()
    if choice == "numpy":
        return "numpy"
    if choice == "numba":
        if not numba_available():
            from ..errors import BackendUnavailableError

            raise BackendUnavailableError(
                "The numba CPU kernels were requested but numba is not importable.", field="GIA_CPU_KERNELS",
                fix="install the fast extra (`pip install 'gpu_insar_adjust[fast]'`) or unset GIA_CPU_KERNELS")
        return "numba"
    return "numba" if numba_available() else "numpy"


def fused_for(xp) -> bool:
    """Whether arrays of namespace ``xp`` take the fused numba kernels: NumPy arrays with the numba engine (other
    backends, and NumPy without numba, keep their array-API form)."""
    from .. import backend

    return backend.backend_name(xp) == "numpy" and cpu_engine() == "numba"


def _n_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _block_pixels(T: int, itemsize: int = 4, budget: int = 1 << 20, most: int = 8192) -> int:
    """Pixels per block so that a (T, block) slab of the cube stays in a ~1 MiB share of L2."""
    b = budget // max(1, T * itemsize)
    return int(min(most, max(64, (b // 64) * 64)))


# the 21 entries (j <= k) of f fᵀ, f = [1, u, v, u², uv, v²], as indices into the 15 moments u^a v^b ordered
# (0,0) (1,0) (0,1) (2,0) (1,1) (0,2) (3,0) (2,1) (1,2) (0,3) (4,0) (3,1) (2,2) (1,3) (0,4)
_F_EXP = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2))
_MOMENTS = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3), (4, 0), (3, 1), (2, 2),
            (1, 3), (0, 4))
_PAIR_TO_MOMENT = np.array([_MOMENTS.index((_F_EXP[j][0] + _F_EXP[k][0], _F_EXP[j][1] + _F_EXP[k][1]))
                            for j in range(6) for k in range(j, 6)])


# --------------------------------------------------------------------------------------------------------------
# numba kernels (compiled on first use, cached on disk)
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _nb():
    # The inlined helpers are bound as module globals, not locals: a kernel that refers to a local njit function
    # is a closure, and numba's disk cache keys a closure by its pickled cells, whose dispatchers carry a uuid
    # new in every process, so each run (and each Dask worker) would compile those kernels again (~1 s each).
    global chunk_rhs, chunk_moments15, slab4, accumulate4, cholesky_solve
    import numba as nb
    from numba import prange

    fm = set(FASTMATH)
    jit = functools.partial(nb.njit, fastmath=fm, cache=True)

    @jit(inline="always")
    def chunk_rhs(row, mrow, w, u, v):
        """Usable count and the 6 weighted sums y·[1, u, v, u², uv, v²] over one chunk (vectorised)."""
        n = 0.0
        r0 = r1 = r2 = r3 = r4 = r5 = 0.0
        for i in range(row.size):
            y = row[i]
            wi = w[i]
            ok = (y == y) & (wi > 0.0) & (mrow[i] != 0)
            yw = np.float64(y) * wi if ok else 0.0
            n += 1.0 if ok else 0.0
            uu = u[i]
            vv = v[i]
            yu = yw * uu
            yv = yw * vv
            r0 += yw
            r1 += yu
            r2 += yv
            r3 += yu * uu
            r4 += yu * vv
            r5 += yv * vv
        return n, r0, r1, r2, r3, r4, r5

    @jit(inline="always")
    def chunk_moments15(row, mrow, w, u, v, out):
        """Add the 15 weighted moments sum w u^a v^b (a + b <= 4) of the usable pixels of a chunk to out."""
        s00 = s10 = s01 = s20 = s11 = s02 = s30 = s21 = s12 = s03 = s40 = s31 = s22 = s13 = s04 = 0.0
        for i in range(row.size):
            y = row[i]
            wi = w[i]
            ok = (y == y) & (wi > 0.0) & (mrow[i] != 0)
            a = wi if ok else 0.0
            uu = u[i]
            vv = v[i]
            au = a * uu
            av = a * vv
            auu = au * uu
            auv = au * vv
            avv = av * vv
            s00 += a
            s10 += au
            s01 += av
            s20 += auu
            s11 += auv
            s02 += avv
            s30 += auu * uu
            s21 += auu * vv
            s12 += auv * vv
            s03 += avv * vv
            s40 += auu * uu * uu
            s31 += auu * uu * vv
            s22 += auu * vv * vv
            s13 += auv * vv * vv
            s04 += avv * vv * vv
        out[0] += s00
        out[1] += s10
        out[2] += s01
        out[3] += s20
        out[4] += s11
        out[5] += s02
        out[6] += s30
        out[7] += s21
        out[8] += s12
        out[9] += s03
        out[10] += s40
        out[11] += s31
        out[12] += s22
        out[13] += s13
        out[14] += s04

    @jit(parallel=True)
    def chunk_moments(u, v, w):
        """The 15 moments of every chunk of CHUNK pixels (all pixels with w > 0)."""
        N = u.size
        nch = (N + CHUNK - 1) // CHUNK
        out = np.zeros((nch, 15))
        ones_f = np.ones(CHUNK, np.float32)
        ones_m = np.ones(CHUNK, np.uint8)
        for c in prange(nch):
            i0 = c * CHUNK
            i1 = min(N, i0 + CHUNK)
            chunk_moments15(ones_f[: i1 - i0], ones_m[: i1 - i0], w[i0:i1], u[i0:i1], v[i0:i1], out[c])
        return out

    @jit(parallel=True)
    def ramp_normals(cube, u, v, w, mask, wt, psi, n_super, sub):
        """Per-epoch moments (n_super, T, 15), right-hand sides (n_super, T, 6) and usable counts (n_super, T).

        mask (T, N) uint8 or (0, N); wt (T, N) per-observation weights or (0, N). A chunk without a gap adds its
        precomputed moments psi; a chunk with gaps sums the moments of its usable pixels (vectorised).
        """
        T, N = cube.shape
        has_mask = mask.shape[0] > 0
        has_wt = wt.shape[0] > 0
        nch = (N + CHUNK - 1) // CHUNK
        per = (nch + n_super - 1) // n_super
        mom = np.zeros((n_super, T, 15))
        rhs = np.zeros((n_super, T, 6))
        cnt = np.zeros((n_super, T))
        ones_m = np.ones(CHUNK, np.uint8)
        for s in prange(n_super):
            c_lo = s * per
            c_hi = min(nch, c_lo + per)
            for sb in range(c_lo, c_hi, sub):
                sb_hi = min(c_hi, sb + sub)
                for t in range(T):
                    row = cube[t]
                    a0 = a1 = a2 = a3 = a4 = a5 = 0.0
                    ntot = 0.0
                    for c in range(sb, sb_hi):
                        i0 = c * CHUNK
                        i1 = min(N, i0 + CHUNK)
                        # slices (not index ranges) let LLVM prove the indices in bounds and vectorise
                        mrow = mask[t, i0:i1] if has_mask else ones_m[: i1 - i0]
                        wrow = wt[t, i0:i1] if has_wt else w[i0:i1]
                        nv, r0, r1, r2, r3, r4, r5 = chunk_rhs(row[i0:i1], mrow, wrow, u[i0:i1], v[i0:i1])
                        a0 += r0
                        a1 += r1
                        a2 += r2
                        a3 += r3
                        a4 += r4
                        a5 += r5
                        ntot += nv
                        if nv == 0.0:
                            continue
                        if nv == i1 - i0 and not has_wt:
                            for q in range(15):
                                mom[s, t, q] += psi[c, q]
                        else:
                            chunk_moments15(row[i0:i1], mrow, wrow, u[i0:i1], v[i0:i1], mom[s, t])
                    rhs[s, t, 0] += a0
                    rhs[s, t, 1] += a1
                    rhs[s, t, 2] += a2
                    rhs[s, t, 3] += a3
                    rhs[s, t, 4] += a4
                    rhs[s, t, 5] += a5
                    cnt[s, t] += ntot
        return mom, rhs, cnt

    @jit(parallel=True)
    def ramp_subtract(cube, coef, u, v, out, block, in_place):
        """out[t, i] = cube[t, i] - ramp_t(u_i, v_i); coef (T, 6) in centred coordinates (zero padded)."""
        T, N = cube.shape
        nblk = (N + block - 1) // block
        for b in prange(nblk):
            i0 = b * block
            i1 = min(N, i0 + block)
            for t in range(T):
                c0 = coef[t, 0]
                c1 = coef[t, 1]
                c2 = coef[t, 2]
                c3 = coef[t, 3]
                c4 = coef[t, 4]
                c5 = coef[t, 5]
                ri = cube[t, i0:i1]
                ub = u[i0:i1]
                vb = v[i0:i1]
                if in_place:  # one array: LLVM's runtime overlap check would fall back to scalar code
                    for i in range(ri.size):
                        uu = ub[i]
                        vv = vb[i]
                        ri[i] = ri[i] - (c0 + uu * (c1 + c3 * uu + c4 * vv) + vv * (c2 + c5 * vv))
                else:
                    ro = out[t, i0:i1]
                    for i in range(ri.size):
                        uu = ub[i]
                        vv = vb[i]
                        ro[i] = ri[i] - (c0 + uu * (c1 + c3 * uu + c4 * vv) + vv * (c2 + c5 * vv))

    @jit(parallel=True)
    def poly_eval(coef, u, v, out):
        N = u.size
        c0, c1, c2, c3, c4, c5 = coef[0], coef[1], coef[2], coef[3], coef[4], coef[5]
        for i in prange(N):
            uu = u[i]
            vv = v[i]
            out[i] = c0 + uu * (c1 + c3 * uu + c4 * vv) + vv * (c2 + c5 * vv)

    @jit(inline="always")
    def slab4(Y, wt, has_wt, epoch_ok, t0, i0, yb, cnt, values):
        """Rows t0..t0+3 of a pixel block as float64: the (weighted) values with gaps as 0 when ``values``,
        else the weights of the usable observations (1 without weights); counts usable observations."""
        T = Y.shape[0]
        nb_ = yb.shape[1]
        for j in range(4):
            t = t0 + j
            yj = yb[j]
            if t >= T or not epoch_ok[t]:
                for i in range(nb_):
                    yj[i] = 0.0
                continue
            row = Y[t, i0:i0 + nb_]
            if has_wt:
                wrow = wt[t, i0:i0 + nb_]
                for i in range(nb_):
                    y = row[i]
                    wi = wrow[i]
                    ok = (y == y) & (wi > 0.0)
                    if values:
                        yj[i] = np.float64(y) * wi if ok else 0.0
                        cnt[i] += 1.0 if ok else 0.0
                    else:
                        yj[i] = wi if ok else 0.0
            else:
                for i in range(nb_):
                    y = row[i]
                    ok = y == y
                    if values:
                        yj[i] = np.float64(y) if ok else 0.0
                        cnt[i] += 1.0 if ok else 0.0
                    else:
                        yj[i] = 1.0 if ok else 0.0

    @jit(inline="always")
    def accumulate4(C, t0, yb, out):
        """out[k] += sum_j C[t0 + j, k] yb[j] for the four slab rows: three output rows at a time, so that
        each slab load feeds three multiply-adds and each output load/store four (C zero padded)."""
        y0 = yb[0]
        y1 = yb[1]
        y2 = yb[2]
        y3 = yb[3]
        for k in range(0, out.shape[0], 3):
            a0, a1, a2, a3 = C[t0, k], C[t0 + 1, k], C[t0 + 2, k], C[t0 + 3, k]
            b0, b1, b2, b3 = C[t0, k + 1], C[t0 + 1, k + 1], C[t0 + 2, k + 1], C[t0 + 3, k + 1]
            c0, c1, c2, c3 = C[t0, k + 2], C[t0 + 1, k + 2], C[t0 + 2, k + 2], C[t0 + 3, k + 2]
            ra = out[k]  # 1-D views keep the inner loop vectorisable
            rb = out[k + 1]
            rc = out[k + 2]
            for i in range(ra.size):
                v0 = y0[i]
                v1 = y1[i]
                v2 = y2[i]
                v3 = y3[i]
                ra[i] += (a0 * v0 + a1 * v1) + (a2 * v2 + a3 * v3)
                rb[i] += (b0 * v0 + b1 * v1) + (b2 * v2 + b3 * v3)
                rc[i] += (c0 * v0 + c1 * v1) + (c2 * v2 + c3 * v3)

    @jit(inline="always")
    def cholesky_solve(L, n, b, z, x):
        """Solve N x = b in place for a small SPD N held in the lower triangle of ``L`` (first n rows/columns);
        ``z`` is scratch. Returns False, leaving ``x`` untouched, when N is not numerically positive definite."""
        for j in range(n):
            njj = L[j, j]
            d = njj
            for k in range(j):
                d -= L[j, k] * L[j, k]
            if not (d > 1e-13 * njj) or not (d > 0.0):
                return False
            d = np.sqrt(d)
            L[j, j] = d
            for r in range(j + 1, n):
                acc = L[r, j]
                for k in range(j):
                    acc -= L[r, k] * L[j, k]
                L[r, j] = acc / d
        for j in range(n):
            acc = b[j]
            for k in range(j):
                acc -= L[j, k] * z[k]
            z[j] = acc / L[j, j]
        for j in range(n - 1, -1, -1):
            acc = z[j]
            for k in range(j + 1, n):
                acc -= L[k, j] * x[k]
            x[j] = acc / L[j, j]
        return True

    @jit(parallel=True)
    def shared_fit(A, Awp, Gp, Ninv, epoch_ok, n_epochs, Y, wt, colscale, want_rms, block, out_x, out_n, out_rms):
        """Per-pixel least squares with one design A (T, n) (columns scaled); see cpu.shared_design_fit.

        Awp, Gp: A W and the packed per-epoch products, zero padded to (T + 4, multiple of 3) columns.
        """
        T, N = Y.shape
        n = A.shape[1]
        has_wt = wt.shape[0] > 0
        nblk = (N + block - 1) // block
        for b in prange(nblk):
            i0 = b * block
            nb_ = min(N, i0 + block) - i0
            rhs = np.zeros((Awp.shape[1], nb_))
            cnt = np.zeros(nb_)
            yb = np.empty((4, nb_))
            # pass 1 (streams the cube from memory): right-hand sides and usable counts, four epochs at a time
            for t0 in range(0, T, 4):
                slab4(Y, wt, has_wt, epoch_ok, t0, i0, yb, cnt, True)
                accumulate4(Awp, t0, yb, rhs)
            gaps = has_wt
            for i in range(nb_):
                if cnt[i] != n_epochs:
                    gaps = True
            nrm = np.zeros((Gp.shape[1], nb_ if gaps else 1))
            if gaps:
                # pass 2 (block still in cache): per-pixel normal matrices of the pixels' own usable epochs
                for t0 in range(0, T, 4):
                    slab4(Y, wt, has_wt, epoch_ok, t0, i0, yb, cnt, False)
                    accumulate4(Gp, t0, yb, nrm)
            # solve pixel by pixel: precomputed inverse for complete pixels, in-register Cholesky otherwise
            L = np.empty((n, n))
            z = np.empty(n)
            xs = np.empty((n, nb_))
            for i in range(nb_):
                out_n[i0 + i] = np.int64(cnt[i])
                if cnt[i] < n:
                    for k in range(n):
                        xs[k, i] = np.nan
                    continue
                if cnt[i] == n_epochs and not has_wt:
                    for k in range(n):
                        acc = 0.0
                        for j in range(n):
                            acc += Ninv[k, j] * rhs[j, i]
                        xs[k, i] = acc
                    continue
                q = 0
                for j in range(n):
                    for k in range(j, n):
                        L[k, j] = nrm[q, i]  # lower triangle holds N
                        q += 1
                if not cholesky_solve(L, n, rhs[:, i], z, xs[:, i]):
                    for k in range(n):
                        xs[k, i] = np.nan
            for k in range(n):
                for i in range(nb_):
                    out_x[k, i0 + i] = xs[k, i] / colscale[k]
            if want_rms:
                # pass 3 (block still in cache): unweighted residual rms over the valid observations
                ss = np.zeros(nb_)
                pred = np.empty(nb_)
                for t in range(T):
                    if not epoch_ok[t]:
                        continue
                    for i in range(nb_):
                        pred[i] = 0.0
                    for k in range(n):
                        a = A[t, k]
                        xk = xs[k]
                        for i in range(xk.size):
                            pred[i] += a * xk[i]
                    row = Y[t, i0:i0 + nb_]
                    for i in range(nb_):
                        y = row[i]
                        ok = y == y
                        if has_wt:
                            ok = ok & (wt[t, i0 + i] > 0.0)
                        r = np.float64(y) - pred[i] if ok else 0.0
                        ss[i] += r * r
                for i in range(nb_):
                    out_rms[i0 + i] = np.sqrt(ss[i] / cnt[i]) if cnt[i] >= n and xs[0, i] == xs[0, i] else np.nan

    # ---- grids: u depends on the column only, v on the row only ------------------------------------------
    @jit(parallel=True)
    def grid_partials(cube, t0, t1, cols, upow, wgrid, mrow, npos, part):
        """Row partial sums of epochs t0..t1-1 into part[t - t0, r] = [s0, s1, s2, n, m0..m4].

        s_a = sum over the row's usable pixels of w d u^a (a <= 2), n their count, m_a = sum w u^a (a <= 4);
        upow (5, cols) holds u^0..u^4. Since v is constant along a row, every moment and right-hand side of the
        quadratic surface is a sum over rows of v^b times these: three multiply-adds per pixel. The moments
        of a row with gaps are its precomputed full-row moments minus those of its few unusable pixels.
        """
        rows = part.shape[1]
        has_w = wgrid.shape[0] > 0
        u1 = upow[1]
        u2 = upow[2]
        u3 = upow[3]
        u4 = upow[4]
        nk = (t1 - t0) * rows
        for k in prange(nk):
            t = t0 + k // rows
            r = k % rows
            row = cube[t, r * cols:(r + 1) * cols]
            n = 0.0
            s0 = s1 = s2 = 0.0
            if has_w:
                wr = wgrid[r]
                for i in range(row.size):
                    d = row[i]
                    wi = wr[i]
                    ok = (d == d) & (wi > 0.0)
                    dd = np.float64(d) * wi if ok else 0.0
                    n += 1.0 if ok else 0.0
                    s0 += dd
                    s1 += dd * u1[i]
                    s2 += dd * u2[i]
            else:
                for i in range(row.size):
                    d = row[i]
                    ok = d == d
                    dd = np.float64(d) if ok else 0.0
                    n += 1.0 if ok else 0.0
                    s0 += dd
                    s1 += dd * u1[i]
                    s2 += dd * u2[i]
            p = part[t - t0, r]
            p[0] = s0
            p[1] = s1
            p[2] = s2
            p[3] = n
            if n == npos[r]:
                for a in range(5):
                    p[4 + a] = mrow[r, a]
                continue
            # moments of the pixels with a weight but no value (branch-free: vectorised)
            g0 = g1 = g2 = g3 = g4 = 0.0
            if has_w:
                wr = wgrid[r]
                for i in range(row.size):
                    d = row[i]
                    wi = wr[i]
                    b = wi if (d != d) & (wi > 0.0) else 0.0
                    g0 += b
                    g1 += b * u1[i]
                    g2 += b * u2[i]
                    g3 += b * u3[i]
                    g4 += b * u4[i]
            else:
                for i in range(row.size):
                    d = row[i]
                    bad = d != d
                    g0 += 1.0 if bad else 0.0
                    g1 += u1[i] if bad else 0.0
                    g2 += u2[i] if bad else 0.0
                    g3 += u3[i] if bad else 0.0
                    g4 += u4[i] if bad else 0.0
            p[4] = mrow[r, 0] - g0
            p[5] = mrow[r, 1] - g1
            p[6] = mrow[r, 2] - g2
            p[7] = mrow[r, 3] - g3
            p[8] = mrow[r, 4] - g4

    @jit
    def grid_reduce(part, vr, t0, t1, nrm, rhs, cnt, pair_to_moment):
        """Sum the row partials of epochs t0..t1-1 in row order (deterministic): packed normals, rhs, counts

        (rows t - t0 of nrm, rhs, cnt)."""
        rows = part.shape[1]
        mom = np.empty(15)
        for t in range(t0, t1):
            for q in range(15):
                mom[q] = 0.0
            r0 = r1 = r2 = r3 = r4 = r5 = 0.0
            c = 0.0
            for r in range(rows):
                p = part[t - t0, r]
                v1 = vr[r]
                v2 = v1 * v1
                v3 = v2 * v1
                s0, s1, s2 = p[0], p[1], p[2]
                m0, m1, m2, m3, m4 = p[4], p[5], p[6], p[7], p[8]
                r0 += s0
                r1 += s1
                r2 += v1 * s0
                r3 += s2
                r4 += v1 * s1
                r5 += v2 * s0
                c += p[3]
                mom[0] += m0
                mom[1] += m1
                mom[2] += v1 * m0
                mom[3] += m2
                mom[4] += v1 * m1
                mom[5] += v2 * m0
                mom[6] += m3
                mom[7] += v1 * m2
                mom[8] += v2 * m1
                mom[9] += v3 * m0
                mom[10] += m4
                mom[11] += v1 * m3
                mom[12] += v2 * m2
                mom[13] += v3 * m1
                mom[14] += v2 * v2 * m0
            rhs[t - t0, 0] = r0
            rhs[t - t0, 1] = r1
            rhs[t - t0, 2] = r2
            rhs[t - t0, 3] = r3
            rhs[t - t0, 4] = r4
            rhs[t - t0, 5] = r5
            cnt[t - t0] = c
            for q in range(21):
                nrm[t - t0, q] = mom[pair_to_moment[q]]

    @jit(parallel=True)
    def grid_subtract(cube, out, t0, t1, cols, coef, uc, vr, in_place):
        """out[t] = cube[t] - ramp(coef[t - t0]) for epochs t0..t1-1; per row the ramp is a + u (b + c3 u)."""
        rows = vr.size
        nk = (t1 - t0) * rows
        for k in prange(nk):
            t = t0 + k // rows
            r = k % rows
            vv = vr[r]
            c = coef[t - t0]
            a = c[0] + vv * (c[2] + c[5] * vv)
            b = c[1] + c[4] * vv
            c3 = c[3]
            ri = cube[t, r * cols:(r + 1) * cols]
            if in_place:  # one array: LLVM's runtime overlap check would fall back to scalar code
                for i in range(ri.size):
                    uu = uc[i]
                    ri[i] = ri[i] - (a + uu * (b + c3 * uu))
            else:
                ro = out[t, r * cols:(r + 1) * cols]
                for i in range(ri.size):
                    uu = uc[i]
                    ro[i] = ri[i] - (a + uu * (b + c3 * uu))

    @nb.njit(cache=True)
    def solve_spd(nrm, rhs, cnt, n_terms, t0, t1, out):
        """Per-epoch Cholesky solves of the packed 6×6 normals truncated to n_terms; NaN where undetermined."""
        L = np.empty((6, 6))
        z = np.empty(6)
        for t in range(t0, t1):
            for j in range(6):
                out[t, j] = np.nan if j < n_terms else 0.0
            if cnt[t] < n_terms:
                continue
            q = 0
            for j in range(6):
                for k in range(j, 6):
                    L[k, j] = nrm[t, q]
                    q += 1
            cholesky_solve(L, n_terms, rhs[t], z, out[t])  # out[t] stays NaN where undetermined

    return {"chunk_moments": chunk_moments, "ramp_normals": ramp_normals, "ramp_subtract": ramp_subtract,
            "poly_eval": poly_eval, "shared_fit": shared_fit, "grid_partials": grid_partials,
            "grid_reduce": grid_reduce, "grid_subtract": grid_subtract, "solve_spd": solve_spd}


# --------------------------------------------------------------------------------------------------------------
# Gaussian kernel-weighted average (adjust.models.LowPassSurface)
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _nb_lowpass():
    import numba as nb
    from numba import prange

    @nb.njit(parallel=True, cache=True)
    def lowpass(x, y, px, py, w, r, sigma, prior, out):
        n, m = x.size, px.size
        for i in prange(n):
            num = 0.0
            den = 0.0
            for s in range(m):
                dx = (x[i] - px[s]) / sigma
                dy = (y[i] - py[s]) / sigma
                k = np.exp(-0.5 * (dx * dx + dy * dy)) * w[s]
                num += k * r[s]
                den += k
            out[i] = num / (den + prior)

    return lowpass


def gaussian_weighted_average(x, y, px, py, w, r, sigma: float, prior: float) -> np.ndarray:
    """``Σ_s k_s r_s / (Σ_s k_s + prior)`` with ``k_s = w_s exp(-|p - p_s|² / 2σ²)`` at every point ``(x, y)``.

    One fused pass (numba, all cores) per point over the stations instead of the (points × stations) float64
    temporaries of the array-API form; the same formula, summed over the stations in order (within ~1e-15
    relative of NumPy's pairwise sums). Points and stations in the same unit (km); returns float64 of x's shape.
    """
    xf = np.ascontiguousarray(x, np.float64).ravel()
    yf = np.ascontiguousarray(y, np.float64).ravel()
    out = np.empty(xf.size)
    _nb_lowpass()(xf, yf, np.ascontiguousarray(px, np.float64), np.ascontiguousarray(py, np.float64),
                  np.ascontiguousarray(w, np.float64), np.ascontiguousarray(r, np.float64), float(sigma),
                  float(prior), out)
    return out.reshape(np.shape(x))


# --------------------------------------------------------------------------------------------------------------
# Matérn Gaussian-process surface (adjust.models.GaussianProcessSurface)
# --------------------------------------------------------------------------------------------------------------
_MATERN_CODES = {0.5: 0, 1.5: 1, 2.5: 2}  # any other ν: the squared exponential (ν = ∞), as models._matern


@functools.lru_cache(maxsize=1)
def _nb_matern():
    import numba as nb
    from numba import prange

    @nb.njit(parallel=True, cache=True)
    def matern_surface(x, y, px, py, alpha, amp2, length, code, kinv, want_var, mean, var, block):
        n, m = x.size, px.size
        n_blocks = (n + block - 1) // block
        for b in prange(n_blocks):
            ks = np.empty(m)  # one scratch row per block of points, not per point
            for i in range(b * block, min(n, (b + 1) * block)):
                acc = 0.0
                for s in range(m):
                    dx = x[i] - px[s]
                    dy = y[i] - py[s]
                    # the correlation written out here, not called: a kernel that refers to another
                    # njit function of this factory is a closure, and numba's disk cache misses closures
                    # in every new process (a ~1 s recompile per run and per worker)
                    d = np.sqrt(dx * dx + dy * dy) / length
                    if code == 0:
                        c = np.exp(-d)
                    elif code == 1:
                        r = np.sqrt(3.0) * d
                        c = (1.0 + r) * np.exp(-r)
                    elif code == 2:
                        r = np.sqrt(5.0) * d
                        c = (1.0 + r + r * r / 3.0) * np.exp(-r)
                    else:
                        c = np.exp(-0.5 * d * d)
                    k = amp2 * c
                    ks[s] = k
                    acc += k * alpha[s]
                mean[i] = acc
                if want_var:
                    q = 0.0
                    for j in range(m):
                        t = 0.0
                        for s in range(m):
                            t += ks[s] * kinv[s, j]
                        q += t * ks[j]
                    var[i] = amp2 - q
    return matern_surface


def matern_gp_surface(x, y, px, py, alpha, amplitude: float, length_scale: float, nu: float, k_inv=None):
    """A Matérn GP's posterior mean ``Σ_s α_s a² ρ(|p − p_s|/ℓ)`` at every point and, with ``k_inv`` (the
    training covariance's inverse), its signal variance ``a² − k_*ᵀ K⁻¹ k_*``; ``(mean, var or None)`` float64.

    One fused pass per point (numba, all cores) instead of the (points × stations) cross-covariance arrays of
    the array-API form, evaluated twice there (mean, then σ); the same formulas summed over the stations in
    order (within ~1e-14 relative of NumPy's sums and matrix products).
    """
    xf = np.ascontiguousarray(x, np.float64).ravel()
    yf = np.ascontiguousarray(y, np.float64).ravel()
    mean = np.empty(xf.size)
    want_var = k_inv is not None
    var = np.empty(xf.size if want_var else 1)
    kinv = np.ascontiguousarray(k_inv if want_var else np.zeros((1, 1)), np.float64)
    _nb_matern()(xf, yf, np.ascontiguousarray(px, np.float64), np.ascontiguousarray(py, np.float64),
                 np.ascontiguousarray(alpha, np.float64), float(amplitude) ** 2, float(length_scale),
                 _MATERN_CODES.get(float(nu), 3), kinv, want_var, mean, var, 1024)
    shape = np.shape(x)
    return mean.reshape(shape), (var.reshape(shape) if want_var else None)


# --------------------------------------------------------------------------------------------------------------
# thin-plate spline kernel sums (adjust.models.ThinPlateSplineSurface)
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _nb_tps():
    import numba as nb
    from numba import prange

    @nb.njit(parallel=True, cache=True)
    def tps_sum(u, v, nu_, nv_, coef, eps, out):
        n, m = u.size, nu_.size
        for i in prange(n):
            ue, ve = u[i] * eps, v[i] * eps
            acc = 0.0
            for s in range(m):
                du = ue - nu_[s]
                dv = ve - nv_[s]
                r = np.sqrt(du * du + dv * dv)
                if r > 0.0:
                    acc += r * r * np.log(r) * coef[s]
            out[i] = acc
    return tps_sum


def thin_plate_kernel_sum(u, v, nodes, coef, eps: float) -> np.ndarray:
    """``Σ_s c_s φ(|ε(u, v) − ε n_s|)``, ``φ(r) = r² log r`` (0 at r = 0), at every point: the kernel part of
    scipy's ``RBFInterpolator(kernel="thin_plate_spline")`` in one fused pass per point (numba, all cores)
    instead of (points × nodes) arrays; within ~1e-13 relative of the array form. Returns float64."""
    uf = np.ascontiguousarray(u, np.float64).ravel()
    vf = np.ascontiguousarray(v, np.float64).ravel()
    n = np.asarray(nodes, np.float64) * float(eps)
    out = np.empty(uf.size)
    _nb_tps()(uf, vf, np.ascontiguousarray(n[:, 0]), np.ascontiguousarray(n[:, 1]),
              np.ascontiguousarray(coef, np.float64), float(eps), out)
    return out.reshape(np.shape(u))


# --------------------------------------------------------------------------------------------------------------
# merge accumulation (mosaic.merge_frames, mosaic.MergePlan)
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _nb_merge():
    import numba as nb
    from numba import prange

    # no fastmath: the sums must equal those of the array-API path bit for bit
    @nb.njit(parallel=True, cache=True)
    def merge_accumulate(v, var, ramp, extra, sw, swv, sw2v, cnt, esw, eswv):
        ny, nx = v.shape
        ne = extra.shape[0]
        for r in prange(ny):
            for c in range(nx):
                x = np.float64(v[r, c])
                s2 = np.float64(var[r, c])
                rp = np.float64(ramp[r, c])
                if not (np.isfinite(x) and np.isfinite(s2) and s2 > 0.0 and np.isfinite(rp) and rp > 0.0):
                    continue
                w = rp / s2
                sw[r, c] += w
                swv[r, c] += w * x
                sw2v[r, c] += w * w * s2
                cnt[r, c] += 1
                for k in range(ne):
                    e = np.float64(extra[k, r, c])
                    if np.isfinite(e):
                        esw[k, r, c] += w
                        eswv[k, r, c] += w * e

    return merge_accumulate


@functools.lru_cache(maxsize=1)
def _nb_merge_finish():
    import numba as nb
    from numba import prange

    # no fastmath: each quotient and root rounded once, then to float32, as the array-API path does
    @nb.njit(parallel=True, cache=True)
    def merge_finish(sw, swv, sw2v, value, std):
        ny, nx = sw.shape
        for r in prange(ny):
            for c in range(nx):
                w = sw[r, c]
                if w > 0.0:
                    value[r, c] = np.float32(swv[r, c] / w)
                    if std.shape[0] > 0:
                        std[r, c] = np.float32(np.sqrt(sw2v[r, c]) / w)
                else:
                    value[r, c] = np.nan
                    if std.shape[0] > 0:
                        std[r, c] = np.nan

    return merge_finish


def merge_finish(sw, swv, sw2v, value, std=None) -> None:
    """The merged tile from its sums, in place, in one pass (numba, all cores): ``value = swv / sw`` and
    ``std = sqrt(sw2v) / sw`` rounded to float32 where ``sw > 0``, NaN elsewhere (``sw``, ``swv``, ``sw2v``
    float64 (ny, nx); ``value``/``std`` float32 views of the output; ``std`` None: value only, ``sw2v`` unused
    and may be None). Bit for bit ``mosaic.merge_frames``' array-API expressions, without their float64
    temporaries."""
    if std is None:
        std, sw2v = np.empty((0, 0), np.float32), sw
    _nb_merge_finish()(sw, swv, sw2v, value, std)


@functools.lru_cache(maxsize=1)
def _nb_edge_ramp():
    import numba as nb

    # no fastmath: scipy's distance from the feature transform (difference, × sampling, squared, summed, root)
    # and the ramp's division, each rounded as NumPy rounds it. Serial and without the GIL: the frames' ramps
    # run on the host's threads, one frame each
    @nb.njit(nogil=True, cache=True)
    def edge_ramp(ft, s0, s1, feather_km, nan_outside, valid, out):
        ny, nx = out.shape
        for r in range(ny):
            for c in range(nx):
                if nan_outside and not valid[r, c]:
                    out[r, c] = np.nan
                    continue
                dy = np.float64(ft[0, r + 1, c + 1] - (r + 1)) * s0
                dx = np.float64(ft[1, r + 1, c + 1] - (c + 1)) * s1
                q = np.sqrt(dy * dy + dx * dx) / feather_km
                out[r, c] = np.float32(min(max(q, 0.0), 1.0))

    return edge_ramp


def edge_ramp(ft, pixel_km, feather_km: float, valid=None):
    """The feathered edge ramp from the feature transform ``ft`` (int32 (2, ny + 2, nx + 2), scipy's
    ``distance_transform_edt(..., return_indices=True)`` of the valid mask padded by one invalid pixel):
    ``clip(distance_km / feather_km, 0, 1)`` as float32 (ny, nx), NaN outside ``valid`` when it is given. One
    pass instead of scipy's float64 distance arrays, bit for bit ``mosaic.feather_ramp``'s NumPy result."""
    ny, nx = ft.shape[1] - 2, ft.shape[2] - 2
    out = np.empty((ny, nx), np.float32)
    mask = np.ones((1, 1), np.bool_) if valid is None else np.ascontiguousarray(valid, dtype=np.bool_)
    _nb_edge_ramp()(ft, float(pixel_km[0]), float(pixel_km[1]), float(feather_km), valid is not None, mask, out)
    return out


@functools.lru_cache(maxsize=1)
def _nb_interp():
    import numba as nb
    from numba import prange

    # no fastmath: a0·(1 − t) + a1·t rounded in this order, as the array-API expression
    @nb.njit(parallel=True, cache=True)
    def interp(a, k, t, out, along_rows):
        n_out, m = out.shape if along_rows else (out.shape[1], out.shape[0])
        if along_rows:  # out[i, j] from rows k[i], k[i] + 1 of a
            for i in prange(n_out):
                omt, ti, k0 = 1.0 - t[i], t[i], k[i]
                for j in range(m):
                    out[i, j] = a[k0, j] * omt + a[k0 + 1, j] * ti
        else:  # out[j, i] from columns k[i], k[i] + 1 of a
            for j in prange(m):
                for i in range(n_out):
                    out[j, i] = a[j, k[i]] * (1.0 - t[i]) + a[j, k[i] + 1] * t[i]

    return interp


def interp_lines(a, k, t, n: int, axis: int):
    """Linear interpolation of the float64 2-D ``a`` along ``axis`` onto ``n`` lines: line ``i`` is
    ``a[k[i]]·(1 − t[i]) + a[k[i] + 1]·t[i]`` (``k`` int64, ``t`` float64, both of length ``n``). One pass
    (numba, all cores), bit for bit ``adjust.frame._interp_axis``' array-API expression."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    k = np.ascontiguousarray(k, dtype=np.int64)
    t = np.ascontiguousarray(t, dtype=np.float64)
    out = np.empty((n, a.shape[1]) if axis == 0 else (a.shape[0], n), np.float64)
    _nb_interp()(a, k, t, out, axis == 0)
    return out


def merge_accumulate(v, var, ramp, extra, sw, swv, sw2v, cnt, esw, eswv) -> None:
    """Add one frame's tile to the weighted-merge sums, in place, in one pass (numba, both cores).

    ``v``, ``var``, ``ramp`` (float32, (ny, nx)): the frame's values, variances and edge ramp on the tile;
    ``extra`` (float32, (k, ny, nx)) further rasters merged with the same weight. Where value, variance and ramp
    are usable (finite, variance and ramp > 0), ``w = ramp / var`` is added to ``sw``, ``w·v`` to ``swv``,
    ``w²·var`` to ``sw2v``, 1 to ``cnt`` (int16), and for each finite extra ``w`` to ``esw[k]`` and ``w·x`` to
    ``eswv[k]`` (float64). The same sums as ``mosaic.merge_frames``' array-API path, bit for bit, without its
    ten float64 temporaries per tile.
    """
    _nb_merge()(v, var, ramp, extra, sw, swv, sw2v, cnt, esw, eswv)


# --------------------------------------------------------------------------------------------------------------
# vertical equivalent of a frame (pipeline.frame_vertical_equivalent)
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _nb_vertical():
    import numba as nb
    from numba import prange

    # no fastmath: rounded as the array-API path rounds, in its order
    @nb.njit(parallel=True, cache=True)
    def vertical(los, std, e, n, u, ve, vn, se, sn, has_se, has_sn, vu_o, std_o, flags):
        ny, nx = los.shape
        for r in prange(ny):
            for c in range(nx):
                lv = np.float64(los[r, c])
                uv = np.float64(u[r, c])
                vev = np.float64(ve[r, c])
                vnv = np.float64(vn[r, c])
                if not (np.isfinite(lv) and np.isfinite(vev) and np.isfinite(vnv) and np.isfinite(uv)):
                    vu_o[r, c] = np.nan
                    std_o[r, c] = np.nan
                    continue
                if not uv > 0.05:
                    flags[0] = 1
                ev = np.float64(e[r, c])
                nv = np.float64(n[r, c])
                vu_o[r, c] = np.float32((lv - ev * vev - nv * vnv) / uv)
                sv = np.float64(std[r, c])
                if not (np.isfinite(sv) and sv > 0.0):
                    flags[1] = 1
                var = sv * sv
                if has_se:
                    sev = np.float64(se[r, c])
                    var = var + ev * ev * sev * sev
                if has_sn:
                    snv = np.float64(sn[r, c])
                    var = var + nv * nv * snv * snv
                std_o[r, c] = np.float32(np.sqrt(var) / uv)

    return vertical


@functools.lru_cache(maxsize=1)
def _nb_noise_sigma():
    import numba as nb
    from numba import prange

    f32_max = float(np.finfo(np.float32).max)

    # no fastmath: each square, sum and root rounded as NumPy rounds them
    @nb.njit(parallel=True, cache=True)
    def noise_sigma(ls, cs, out):
        ny, nx = out.shape
        for r in prange(ny):
            for c in range(nx):
                s = np.float64(ls[r, c])
                if np.isfinite(s):
                    base = s if s > 0.1 else 0.1
                else:
                    base = 2.0
                k = cs[r, c]  # float32, as nan_to_num sees it: NaN -> 0, ±inf -> ± the largest float32
                if np.isnan(k):
                    kd = 0.0
                elif np.isinf(k):
                    kd = f32_max if k > 0 else -f32_max
                else:
                    kd = np.float64(k)
                out[r, c] = np.sqrt(base * base + kd * kd)

    return noise_sigma


def noise_sigma(los_std, correction_std) -> np.ndarray:
    """A frame's per-pixel noise sigma for the network (mm/yr, float64): the product sigma ``los_std`` floored
    at 0.1 mm/yr (2 where it is not finite), combined with the correction's formal sigma (0 where NaN):
    ``sqrt(max(los_std, 0.1)² + correction_std²)``. One pass (numba, all cores) over two float32 rasters, bit
    for bit the pipeline's float64 array expression."""
    ls = np.ascontiguousarray(los_std, np.float32)
    cs = np.ascontiguousarray(correction_std, np.float32)
    out = np.empty(ls.shape, np.float64)
    _nb_noise_sigma()(ls, cs, out)
    return out


def vertical_equivalent(los, std, e, n, u, ve, vn, se=None, sn=None) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """``(los − e·ve − n·vn)/u`` and ``sqrt(std² + e²se² + n²sn²)/u`` (float32 (y, x); NaN where los, ve, vn or
    u is not finite) in one pass over a frame (numba, all cores), as ``pipeline.frame_vertical_equivalent``'s
    array path computes them block by block in float64, bit for bit. Also returns whether a usable pixel has
    ``u <= 0.05`` and whether one has a sigma that is not positive; the caller raises."""
    shape = np.shape(los)
    vu, sd = np.empty(shape, np.float32), np.empty(shape, np.float32)
    flags = np.zeros(2, np.int64)
    dummy = np.zeros((1, 1), np.float32)
    _nb_vertical()(los, std, e, n, u, ve, vn, dummy if se is None else se, dummy if sn is None else sn,
                   se is not None, sn is not None, vu, sd, flags)
    return vu, sd, bool(flags[0]), bool(flags[1])


# --------------------------------------------------------------------------------------------------------------
# network corrections of a frame (pipeline, "network corrections" stage)
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _nb_network():
    import numba as nb
    from numba import prange

    # no fastmath: rounded as the array path rounds, in its order
    @nb.njit(parallel=True, cache=True)
    def apply(vert, los, c_vert, u, ml, has_ml, noise, cv, has_m2, m2, fc, vs):
        ny, nx = vert.shape
        for r in prange(ny):
            for c in range(nx):
                cc = c_vert[r, c]
                uu = np.float64(u[r, c])
                uc = uu * cc
                vert[r, c] = np.float32(np.float64(vert[r, c]) - cc)
                los[r, c] = np.float32(np.float64(los[r, c]) - uc)
                mlv = np.float64(ml[r, c]) if has_ml else 0.0
                fc[r, c] = np.float32(mlv + uc)
                q = cv / uu
                extra = q * q
                if has_m2 and not (extra >= m2 or np.isnan(extra)):
                    extra = m2
                s = np.float64(noise[r, c])
                vs[r, c] = np.float32(np.sqrt(s * s + extra))

    return apply


def apply_network_correction(vert, los, c_vert, u, ml, noise, cv: float, m2: float | None, fc, vs) -> None:
    """One block of a frame's network correction, in place, in one pass (numba, all cores): ``vert −= c``,
    ``los −= u·c``, ``fc = ml + u·c`` (``ml`` the frame model's correction, or 0), ``vs = sqrt(noise² +
    max((cv/u)², m2))`` (``m2`` None: no floor); float32 rasters (rows, cols) and the float64 vertical
    correction ``c_vert``, as the pipeline's array expressions compute them, bit for bit."""
    dummy = np.zeros((1, 1), np.float32)
    _nb_network()(vert, los, c_vert, u, dummy if ml is None else ml, ml is not None, noise, float(cv),
                  m2 is not None, 0.0 if m2 is None else float(m2), fc, vs)


# --------------------------------------------------------------------------------------------------------------
# up/east decomposition (mosaic.decompose_up_east)
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _nb_up_east():
    import numba as nb
    from numba import prange

    # no fastmath (no contraction to FMA either): every product and sum is rounded as the array-API path rounds
    # it, in the same order, so the results are that path's bit for bit
    @nb.njit(parallel=True, cache=True)
    def up_east(L, S, E, Nn, U, vn, ve, se, sn, has_ve, has_se, has_sn, east_prior, max_condition,
                up_o, east_o, up_var_o, east_var_o, cov_o, k_o, method_o, cond_o, flags):
        kg, npx = L.shape
        for p in prange(npx):
            a11 = 0.0
            a12 = 0.0
            a22 = 0.0
            b1 = 0.0
            b2 = 0.0
            g11 = 0.0
            g12 = 0.0
            g22 = 0.0
            h1 = 0.0
            h2 = 0.0
            q = 0.0  # Σ W·U·E, as the vertical-only fall-back forms it
            k = 0
            vnp = vn[p]
            for g in range(kg):
                lv = np.float64(L[g, p])
                ev = np.float64(E[g, p])
                nv = np.float64(Nn[g, p])
                uv = np.float64(U[g, p])
                sv = np.float64(S[g, p])
                if not (np.isfinite(lv) and np.isfinite(ev) and np.isfinite(nv) and np.isfinite(uv)):
                    continue
                if not (np.isfinite(sv) and sv > 0.0):
                    flags[0] = 1
                if not uv > 0.05:
                    flags[1] = 1
                w = 1.0 / (sv * sv)
                y = lv - nv * vnp
                k += 1
                a11 += w * ev * ev
                a12 += w * ev * uv
                a22 += w * uv * uv
                b1 += w * ev * y
                b2 += w * uv * y
                g11 += 1.0 * ev * ev
                g12 += 1.0 * ev * uv
                g22 += 1.0 * uv * uv
                h1 += w * ev * nv
                h2 += w * uv * nv
                q += w * uv * ev
            if east_prior:
                vep = ve[p]
                sep = se[p]
                if np.isfinite(vep) and np.isfinite(sep) and sep > 0.0:
                    wp = 1.0 / (sep * sep)
                    a11 = a11 + wp
                    b1 = b1 + wp * vep
                else:  # the array path adds a zero weight here: the same additions (-0.0 becomes 0.0)
                    a11 = a11 + 0.0
                    b1 = b1 + 0.0 * 0.0
            det = a11 * a22 - a12 * a12
            tr = g11 + g22
            dd = (g11 - g22) * (g11 - g22) + 4.0 * g12 * g12
            disc = np.sqrt(dd if dd > 0.0 else 0.0)
            lmax = (tr + disc) / 2.0
            lmin = (tr - disc) / 2.0
            two = k >= 2
            if two:
                if lmin > 1e-12 * lmax:
                    cond = lmax / (lmin if lmin > 0.0 else 1.0)
                else:
                    cond = np.inf
            else:
                cond = np.nan
            solve = two and (cond <= max_condition or east_prior) and det > 0.0
            up = np.nan
            east = np.nan
            up_var = np.nan
            east_var = np.nan
            cov_eu = np.nan
            method = 0
            if solve:
                i11 = a22 / det
                i12 = -a12 / det
                i22 = a11 / det
                east = i11 * b1 + i12 * b2
                up = i12 * b1 + i22 * b2
                c11, c12, c22 = i11, i12, i22
                if has_sn:
                    g_e = i11 * h1 + i12 * h2
                    g_u = i12 * h1 + i22 * h2
                    s2 = sn[p] * sn[p]
                    c11 = c11 + s2 * g_e * g_e
                    c12 = c12 + s2 * g_e * g_u
                    c22 = c22 + s2 * g_u * g_u
                east_var, up_var, cov_eu = c11, c22, c12
                method = 2
            elif has_ve and k >= 1 and a22 > 0.0:
                # vertical only, all valid geometries: y_i - e_i ve = u_i vu
                up = (b2 - q * ve[p]) / a22
                var1 = 1.0 / a22
                if has_se:
                    t = se[p] * q / a22
                    var1 = var1 + t * t
                if has_sn:
                    t = sn[p] * h2 / a22
                    var1 = var1 + t * t
                up_var = var1
                method = 1
            up_o[p] = np.float32(up)
            east_o[p] = np.float32(east)
            up_var_o[p] = up_var
            east_var_o[p] = east_var
            cov_o[p, 0, 0] = east_var
            cov_o[p, 0, 1] = cov_eu
            cov_o[p, 1, 0] = cov_eu
            cov_o[p, 1, 1] = up_var
            k_o[p] = k
            method_o[p] = method
            cond_o[p] = cond

    return up_east


def up_east(L, S, E, Nn, U, vn, ve, se, sn, *, east_prior: bool, max_condition: float) -> dict:
    """Per-pixel up/east least squares of :func:`gpu_insar_adjust.mosaic.decompose_up_east` in one pass
    (numba, all cores): stacks ``(k, npx)`` (any float dtype, read as float64), per-pixel ``vn``, ``ve``, ``se``,
    ``sn`` float64 ``(npx,)`` or None. The same sums and closed-form solves as the array-API path, bit for bit,
    without its ~40 float64 temporaries per pixel. ``flags``: [a valid geometry with a sigma that is not
    positive, a valid geometry with an up component <= 0.05]; the caller raises on either."""
    k, npx = L.shape
    f64 = np.float64
    zero = np.zeros(1, f64)

    def vec(a):
        return zero if a is None else np.ascontiguousarray(a, f64).reshape(-1)

    out = {"up": np.empty(npx, np.float32), "east": np.empty(npx, np.float32), "up_var": np.empty(npx, f64),
           "east_var": np.empty(npx, f64), "cov": np.empty((npx, 2, 2), f64), "k": np.empty(npx, np.int16),
           "method": np.empty(npx, np.int8), "condition": np.empty(npx, f64), "flags": np.zeros(2, np.int64)}
    _nb_up_east()(L, S, E, Nn, U, vec(vn), vec(ve), vec(se), vec(sn), ve is not None, se is not None,
                  sn is not None, bool(east_prior), float(max_condition), out["up"], out["east"], out["up_var"],
                  out["east_var"], out["cov"], out["k"], out["method"], out["condition"], out["flags"])
    return out


# --------------------------------------------------------------------------------------------------------------
# small helpers shared by both engines
# --------------------------------------------------------------------------------------------------------------
def _solve_small_spd(nrm_packed: np.ndarray, rhs: np.ndarray, cnt: np.ndarray, n_terms: int) -> np.ndarray:
    """Solve per-row packed (21 = 6×6 upper) normal equations truncated to ``n_terms``; NaN where undetermined."""
    T = rhs.shape[0]
    full = np.zeros((T, 6, 6))
    iu = np.triu_indices(6)
    full[:, iu[0], iu[1]] = nrm_packed
    full[:, iu[1], iu[0]] = nrm_packed
    out = np.full((T, 6), np.nan)
    rows = np.flatnonzero(cnt >= n_terms)
    if rows.size == 0:
        return out
    Ns = full[rows, :n_terms, :n_terms]
    try:  # all epochs at once (one LAPACK call each, in one loop inside NumPy)
        Lc = np.linalg.cholesky(Ns)
    except np.linalg.LinAlgError:  # some epoch is not positive definite: epoch by epoch, skipping those
        for t in rows:
            Nt = full[t, :n_terms, :n_terms]
            try:
                Lt = np.linalg.cholesky(Nt)
            except np.linalg.LinAlgError:
                continue
            if np.all(np.diag(Lt) ** 2 > 1e-13 * np.diag(Nt)):
                out[t, :n_terms] = np.linalg.solve(Nt, rhs[t, :n_terms])
        return out
    diag_l = np.diagonal(Lc, axis1=1, axis2=2)
    good = np.all(diag_l ** 2 > 1e-13 * np.diagonal(Ns, axis1=1, axis2=2), axis=1)
    if good.any():
        out[rows[good], :n_terms] = np.linalg.solve(Ns[good], rhs[rows[good], :n_terms, None])[..., 0]
    return out


def _centred(x, y):
    x0, y0, s = ref.centre_scale(x, y)
    u = (np.asarray(x, np.float64) - x0) / s
    v = (np.asarray(y, np.float64) - y0) / s
    return u, v, (x0, y0, s)


def _to_centred_coeffs(coeffs: np.ndarray, x0: float, y0: float, s: float, order: int) -> np.ndarray:
    """Caller coefficients → coefficients in (u, v) = ((x - x0)/s, (y - y0)/s), zero padded to 6 terms."""
    c6 = np.zeros(coeffs.shape[:-1] + (6,))
    c6[..., : coeffs.shape[-1]] = coeffs
    return ref.poly_change_of_variables(c6, x0, y0, s, 2)


def _from_centred_coeffs(c6: np.ndarray, x0: float, y0: float, s: float, order: int) -> np.ndarray:
    n = ref.n_poly_terms(order)
    padded = np.zeros_like(c6)
    padded[..., :n] = c6[..., :n]
    return ref.poly_change_of_variables(padded, -x0 / s, -y0 / s, 1.0 / s, 2)[..., :n]


def _pad3(C: np.ndarray) -> np.ndarray:
    """(T, m) → (T + 4, m rounded up to a multiple of 3), zero padded: the shapes the unrolled kernel reads."""
    T, m = C.shape
    out = np.zeros((T + 4, -(-m // 3) * 3))
    out[:T, :m] = C
    return out


def _pool_map(func, items):
    nt = _n_threads()
    if nt == 1 or len(items) < 2:
        return [func(it) for it in items]
    with ThreadPoolExecutor(max_workers=nt) as ex:
        return list(ex.map(func, items))


# --------------------------------------------------------------------------------------------------------------
# 1. per-epoch ramps
# --------------------------------------------------------------------------------------------------------------
class _RampSetup:
    """Everything about the pixels a ramp fit needs once per cube: centred coordinates, weights, grid layout.

    On a grid only the axes are centred (the full-size ``u``, ``v`` are made on demand): the same numbers, since
    the centring is element-wise and the extremes of a grid are those of its axes.
    """

    def __init__(self, cube, x, y, weights, mask, engine):
        T, N = cube.shape
        self.engine = cpu_engine(engine)
        self._x, self._y = x, y
        axes = _grid_axes(x, y) if self.engine == "numba" else None
        if axes is None:
            self._uv = _centred(x, y)
            _, _, (self.x0, self.y0, self.s) = self._uv
        else:
            xc, yr = axes
            self.x0, self.y0, self.s = ref.centre_scale(xc, yr)
            self._uv = None
        has_pixel_w = (weights is not None and weights.ndim == 1) or (mask is not None and mask.ndim == 1)
        self.wt = np.asarray(weights, np.float64) if weights is not None and weights.ndim == 2 else None
        self.m2 = None
        w = None
        if has_pixel_w or self.wt is not None or mask is not None:
            w = np.ones(N) if weights is None or weights.ndim == 2 else np.asarray(weights, np.float64)
            if mask is not None:
                if mask.ndim == 1:
                    w = np.where(mask, w, 0.0)
                else:
                    self.m2 = np.ascontiguousarray(mask).view(np.uint8)
        self._w = w
        self._psi = None
        # the subtraction runs on the grid whenever the pixels form one; the fit when no per-observation
        # weight or mask breaks the per-row sums
        self.layout = None
        if axes is not None:
            uc = (np.asarray(xc, np.float64) - self.x0) / self.s
            vr = (np.asarray(yr, np.float64) - self.y0) / self.s
            self.layout = _GridPlan(yr.size, xc.size, uc, vr, w.reshape(yr.size, xc.size) if has_pixel_w else None)
        self.grid = self.layout if self.wt is None and self.m2 is None else None

    @property
    def u(self):
        if self._uv is None:
            self._uv = _centred(self._x, self._y)
        return self._uv[0]

    @property
    def v(self):
        if self._uv is None:
            self._uv = _centred(self._x, self._y)
        return self._uv[1]

    @property
    def w(self):
        if self._w is None:
            self._w = np.ones(self.u.size)
        return self._w

    @property
    def psi(self):
        if self._psi is None:
            self._psi = _nb()["chunk_moments"](self.u, self.v, self.w)
        return self._psi

    def to_caller(self, c6, order):
        return _from_centred_coeffs(c6, self.x0, self.y0, self.s, order)

    def to_centred(self, coeffs, order):
        return _to_centred_coeffs(np.asarray(coeffs, np.float64), self.x0, self.y0, self.s, order)


class _GridPlan:
    """A regular grid: u depends on the column only and v on the row only (row-major, as from meshgrid)."""

    def __init__(self, rows, cols, uc, vr, wgrid):
        self.rows, self.cols, self.uc, self.vr = rows, cols, uc, vr
        self.upow = np.stack([np.ones_like(uc), uc, uc * uc, uc * uc * uc, (uc * uc) * (uc * uc)])
        if wgrid is None:
            self.wgrid = np.zeros((0, 0))
            m = np.sum(self.upow, axis=1)
            self.mrow = np.ascontiguousarray(np.broadcast_to(m, (rows, 5)))
            self.npos = np.full(rows, float(cols))
        else:
            self.wgrid = np.ascontiguousarray(wgrid)
            self.mrow = np.stack([self.wgrid @ self.upow[a] for a in range(5)], axis=1)
            self.npos = np.sum(self.wgrid > 0, axis=1).astype(np.float64)


def _grid_axes(x, y):
    """``(x axis (cols,), y axis (rows,))`` when the flattened pixels form a row-major grid (x constant down a
    column, y along a row, as from ``numpy.meshgrid``), else None. One look at the coordinates."""
    x = np.asarray(x)
    y = np.asarray(y)
    N = x.size
    if N == 0 or y.size != N:
        return None
    cols = int(np.argmax(y != y[0])) or N  # the first change of y starts the second row
    if N % cols:
        return None
    rows = N // cols
    X, Y = x.reshape(rows, cols), y.reshape(rows, cols)
    if not (np.array_equal(X, np.broadcast_to(X[:1], X.shape)) and np.array_equal(Y, np.broadcast_to(Y[:, :1],
                                                                                                     Y.shape))):
        return None
    return X[0].copy(), Y[:, 0].copy()


def _fit_centred(cube, st: _RampSetup, n_terms: int, t0: int = 0, t1: int | None = None, part=None):
    """Centred coefficients (t1 - t0, 6) of epochs t0..t1-1 (zero padded; NaN rows where undetermined)."""
    t1 = cube.shape[0] if t1 is None else t1
    nt = t1 - t0
    g = st.grid
    if g is not None:
        k = _nb()
        part = np.empty((nt, g.rows, 9)) if part is None else part
        nrm, rhs, cnt, c6 = np.empty((nt, 21)), np.empty((nt, 6)), np.empty(nt), np.empty((nt, 6))
        k["grid_partials"](cube, t0, t1, g.cols, g.upow, g.wgrid, g.mrow, g.npos, part)
        k["grid_reduce"](part, g.vr, t0, t1, nrm, rhs, cnt, _PAIR_TO_MOMENT)
        k["solve_spd"](nrm, rhs, cnt, n_terms, 0, nt, c6)
        return c6
    sub_cube = cube[t0:t1]
    wt = None if st.wt is None else st.wt[t0:t1]
    m2 = None if st.m2 is None else st.m2[t0:t1]
    if st.engine == "numba":
        k = _nb()
        N = cube.shape[1]
        n_super = int(min(64, max(1, -(-N // 65536))))
        sub = max(1, 4096 // CHUNK)
        mom, rhs, cnt = k["ramp_normals"](sub_cube, st.u, st.v, st.w,
                                          m2 if m2 is not None else np.zeros((0, N), np.uint8),
                                          wt if wt is not None else np.zeros((0, N)), st.psi, n_super, sub)
        nrm, rhs, cnt = mom.sum(0)[:, _PAIR_TO_MOMENT], rhs.sum(0), cnt.sum(0)
        c6 = np.empty((nt, 6))
        k["solve_spd"](np.ascontiguousarray(nrm), np.ascontiguousarray(rhs), cnt, n_terms, 0, nt, c6)
        return c6
    nrm, rhs, cnt = _ramp_normals_numpy(sub_cube, st.u, st.v, st.w, m2, wt)
    return _solve_small_spd(nrm, rhs, cnt, n_terms)


def fit_epoch_ramps(cube, x, y, *, order=1, weights=None, mask=None, engine=None) -> np.ndarray:
    """Per-epoch polynomial ramps of a ``(T, N)`` cube; see :func:`gpu_insar_adjust.kernels.fit_epoch_ramps`.

    On a row-major grid (``x`` constant down a column, ``y`` along a row, as from ``numpy.meshgrid``) the numba
    engine sums per row (``Σ d u^a`` then times ``v^b``): three multiply-adds per pixel, both cores busy.
    """
    st = _RampSetup(cube, x, y, weights, mask, engine)
    log.debug("fit_epoch_ramps: %s engine%s, cube %s", st.engine, " (grid)" if st.grid else "", cube.shape)
    return st.to_caller(_fit_centred(cube, st, ref.n_poly_terms(order)), order)


def _ramp_normals_numpy(cube, u, v, w, m2, wt):
    T, N = cube.shape
    B = 2048
    iu = np.triu_indices(6)

    def work(b0):
        b1 = min(N, b0 + B)
        c = cube[:, b0:b1]
        ok = ~np.isnan(c)
        if m2 is not None:
            ok &= m2[:, b0:b1].astype(bool)
        wv = np.where(ok, w[b0:b1] if wt is None else wt[:, b0:b1], 0.0)
        ok &= wv > 0
        F = ref.polynomial_terms(u[b0:b1], v[b0:b1], 2)  # (B, 6)
        P = F[:, iu[0]] * F[:, iu[1]]  # (B, 21)
        yw = np.where(ok, c, 0.0).astype(np.float64) * wv
        return wv @ P, yw @ F, ok.sum(axis=1)

    parts = _pool_map(work, list(range(0, N, B)))
    return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts).astype(np.float64))


def _subtract_centred(cube, c6, st: _RampSetup, out, t0: int = 0, t1: int | None = None):
    """out[t0:t1] = cube[t0:t1] - ramps with centred coefficients c6 (t1 - t0, 6)."""
    t1 = cube.shape[0] if t1 is None else t1
    g = st.layout
    in_place = out is cube or (out.__array_interface__["data"][0] == cube.__array_interface__["data"][0]
                               and out.strides == cube.strides)
    if g is not None:
        _nb()["grid_subtract"](cube, out, t0, t1, g.cols, c6, g.uc, g.vr, in_place)
        return
    if st.engine == "numba":
        _nb()["ramp_subtract"](cube[t0:t1], c6, st.u, st.v, out[t0:t1], 4096, in_place)
        return
    N = cube.shape[1]
    B = 4096

    def work(b0):
        b1 = min(N, b0 + B)
        F = ref.polynomial_terms(st.u[b0:b1], st.v[b0:b1], 2)
        out[t0:t1, b0:b1] = cube[t0:t1, b0:b1] - c6 @ F.T

    _pool_map(work, list(range(0, N, B)))


def subtract_epoch_ramps(cube, coeffs, x, y, order, *, out=None, engine=None):
    """``cube - ramp`` per epoch into ``out`` (may be ``cube`` itself); returns ``out``."""
    st = _RampSetup(cube, x, y, None, None, engine)
    if out is None:
        out = np.empty_like(cube)
    _subtract_centred(cube, st.to_centred(coeffs, order), st, out)
    return out


def remove_epoch_ramps(cube, x, y, *, order=1, weights=None, mask=None, out=None, group_bytes=64 << 20,
                       engine=None):
    """Fit and subtract per-epoch ramps a group of epochs at a time; returns ``(out, coeffs (T, n_terms))``.

    Bit for bit :func:`fit_epoch_ramps` then :func:`subtract_epoch_ramps` (same kernels, same summation
    order), except that undetermined epochs (NaN coefficient rows) are left unchanged. Each group (about
    ``group_bytes`` of cube) is subtracted right after it is fitted, while it is still in cache, so the cube is
    read from memory once instead of twice. ``out`` may be ``cube`` (in place) or None (a new array).
    """
    T, N = cube.shape
    n_terms = ref.n_poly_terms(order)
    st = _RampSetup(cube, x, y, weights, mask, engine)
    out = np.empty_like(cube) if out is None else out
    step = int(max(1, min(T, group_bytes // max(1, N * cube.itemsize))))
    if st.engine == "numpy":
        step = T  # BLAS products of other shapes may round differently: one group keeps the identity
    coeffs = np.empty((T, n_terms))
    part = None if st.grid is None else np.empty((step, st.grid.rows, 9))
    log.debug("remove_epoch_ramps: %s engine%s, cube %s, %d epochs a group", st.engine,
              " (grid)" if st.grid else "", cube.shape, step)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        c = st.to_caller(_fit_centred(cube, st, n_terms, t0, t1, part), order)
        coeffs[t0:t1] = c
        # the round trip through the caller's coefficients keeps the result identical to fit + subtract;
        # undetermined epochs subtract a zero ramp (unchanged), their NaN row says so
        c = np.where(np.all(np.isfinite(c), axis=1, keepdims=True), c, 0.0)
        _subtract_centred(cube, st.to_centred(c, order), st, out, t0, t1)
    return out, coeffs


def eval_polynomial_surface(coeffs, x, y, order, *, dtype=np.float32, engine=None):
    """Polynomial surface at every point (``x``, ``y`` any equal shape) in ``dtype``."""
    shape = np.shape(x)
    u, v, (x0, y0, s) = _centred(np.ravel(x), np.ravel(y))
    c6 = _to_centred_coeffs(np.asarray(coeffs, np.float64)[None, :], x0, y0, s, order)[0]
    out = np.empty(u.size, dtype=dtype)
    if cpu_engine(engine) == "numba":
        _nb()["poly_eval"](c6, u, v, out)
    else:
        out[:] = c6[0] + u * (c6[1] + c6[3] * u + c6[4] * v) + v * (c6[2] + c6[5] * v)
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------------------------
# 2. shared-design per-pixel fits
# --------------------------------------------------------------------------------------------------------------
def _design_parts(A, weights):
    """Column-scaled design and the per-epoch products both engines need."""
    A = np.asarray(A, np.float64)
    T, n = A.shape
    ew = np.ones(T) if weights is None or weights.ndim == 2 else np.asarray(weights, np.float64)
    epoch_ok = ew > 0
    colscale = np.sqrt(np.sum(ew[:, None] * A * A, axis=0))
    colscale[colscale == 0] = 1.0
    As = A / colscale
    Aw = As * ew[:, None]
    iu = np.triu_indices(n)
    G = (As[:, iu[0]] * As[:, iu[1]]) * ew[:, None]  # (T, npair) packed upper triangle of w a a^T
    Nfull = As.T @ Aw
    try:
        Ninv = np.linalg.inv(Nfull) if np.linalg.matrix_rank(Nfull) == n else np.full((n, n), np.nan)
    except np.linalg.LinAlgError:
        Ninv = np.full((n, n), np.nan)
    return As, Aw, G, Ninv, epoch_ok, colscale


def shared_design_fit(A, Y, weights=None, *, residual_rms=False, engine=None):
    """Per-pixel fits ``Y[:, p] ≈ A x_p``; returns ``(x (n, N) float64, n_valid (N,), rms (N,) | None)``."""
    T, N = Y.shape
    n = A.shape[1]
    As, Aw, G, Ninv, epoch_ok, colscale = _design_parts(A, weights)
    wt = np.asarray(weights, np.float64) if weights is not None and weights.ndim == 2 else None
    n_epochs = float(epoch_ok.sum())
    x = np.empty((n, N))
    n_valid = np.empty(N, np.int64)
    rms = np.empty(N) if residual_rms else np.empty(0)
    eng = cpu_engine(engine)
    log.debug("shared_design_fit: %s engine, design %s, cube %s", eng, A.shape, Y.shape)
    if eng == "numba":
        _nb()["shared_fit"](As, _pad3(Aw), _pad3(G), Ninv, epoch_ok, n_epochs, Y,
                            wt if wt is not None else np.zeros((0, N)), colscale, bool(residual_rms),
                            _block_pixels(T, Y.itemsize, most=512), x, n_valid, rms)
    else:
        _shared_fit_numpy(As, Aw, G, Ninv, epoch_ok, n_epochs, Y, wt, colscale, residual_rms, x, n_valid, rms)
    return x, n_valid, (rms if residual_rms else None)


def _shared_fit_numpy(As, Aw, G, Ninv, epoch_ok, n_epochs, Y, wt, colscale, want_rms, x, n_valid, rms):
    T, N = Y.shape
    n = As.shape[1]
    B = _block_pixels(T, Y.itemsize)
    iu = np.triu_indices(n)

    def work(b0):
        b1 = min(N, b0 + B)
        Yb = Y[:, b0:b1]
        ok = ~np.isnan(Yb) & epoch_ok[:, None]
        wv = ok.astype(np.float64) if wt is None else np.where(ok, wt[:, b0:b1], 0.0)
        ok &= wv > 0
        y0 = np.where(ok, Yb, 0.0).astype(np.float64)
        rhs = Aw.T @ (y0 if wt is None else y0 * wv)  # (n, B)
        cnt = ok.sum(axis=0)
        xs = Ninv @ rhs
        gaps = (cnt != n_epochs) if wt is None else np.ones(b1 - b0, bool)
        if gaps.any():
            g = np.flatnonzero(gaps)
            packed = G.T @ (wv[:, g] if wt is not None else ok[:, g].astype(np.float64))  # (npair, g)
            Ng = np.zeros((g.size, n, n))
            Ng[:, iu[0], iu[1]] = packed.T
            Ng[:, iu[1], iu[0]] = packed.T
            xs[:, g] = _batched_cholesky_solve(Ng, rhs[:, g].T).T
        xs[:, cnt < n] = np.nan
        x[:, b0:b1] = xs / colscale[:, None]
        n_valid[b0:b1] = cnt
        if want_rms:
            r = np.where(ok, Yb - As @ xs, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                rr = np.sqrt(np.sum(r * r, axis=0) / cnt)
            rms[b0:b1] = np.where(np.isnan(xs[0]), np.nan, rr)

    _pool_map(work, list(range(0, N, B)))


def _batched_cholesky_solve(Nm: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve many small SPD systems (P, n, n) x = (P, n), vectorised over P; NaN where not positive definite."""
    P, n, _ = Nm.shape
    L = np.zeros_like(Nm)
    good = np.ones(P, bool)
    for j in range(n):
        d = Nm[:, j, j] - np.sum(L[:, j, :j] ** 2, axis=1)
        good &= d > 1e-13 * Nm[:, j, j]
        d = np.sqrt(np.where(d > 0, d, 1.0))
        L[:, j, j] = d
        for r in range(j + 1, n):
            L[:, r, j] = (Nm[:, r, j] - np.sum(L[:, r, :j] * L[:, j, :j], axis=1)) / d
    z = np.zeros((P, n))
    for j in range(n):
        z[:, j] = (b[:, j] - np.sum(L[:, j, :j] * z[:, :j], axis=1)) / L[:, j, j]
    xo = np.zeros((P, n))
    for j in range(n - 1, -1, -1):
        xo[:, j] = (z[:, j] - np.sum(L[:, j + 1:, j] * xo[:, j + 1:], axis=1)) / L[:, j, j]
    xo[~good] = np.nan
    return xo


# --------------------------------------------------------------------------------------------------------------
# 3. kernel (GP posterior mean / RBF) surfaces
# --------------------------------------------------------------------------------------------------------------
def eval_kernel_surface(centres, weights, x, y, *, kernel="gaussian", length_scale=1.0, mean_coeffs=None,
                        grid=False, dtype=np.float32):
    """``sum_s w_s k(|p - c_s|)`` (+ polynomial mean); ``grid=True`` takes axes ``x (W,)``, ``y (H,)`` → (H, W).

    A Gaussian kernel on a grid is separable, ``exp(-(dx²+dy²)/2ℓ²) = exp(-dx²/2ℓ²) exp(-dy²/2ℓ²)``, so the
    whole frame is one matrix product ``(Gy·diag(w)) @ Gx`` — no per-pixel-per-station exponential.
    """
    centres = np.asarray(centres, np.float64)
    wts = np.asarray(weights, np.float64)
    ls = float(length_scale)
    if grid:
        xa = np.asarray(x, np.float64)
        ya = np.asarray(y, np.float64)
        H, W = ya.size, xa.size
        out = np.empty((H, W), dtype=dtype)
        if kernel == "gaussian":
            gx = np.exp(-0.5 * ((centres[:, 0][:, None] - xa[None, :]) / ls) ** 2)  # (S, W)
            rows = max(1, (1 << 22) // max(W, 1))

            def work(r0):
                r1 = min(H, r0 + rows)
                gy = np.exp(-0.5 * ((ya[r0:r1, None] - centres[None, :, 1]) / ls) ** 2) * wts  # (rows, S)
                out[r0:r1] = gy @ gx

            # BLAS threads itself; one Python thread keeps it from oversubscribing the cores
            for r0 in range(0, H, rows):
                work(r0)
        else:
            rows = max(1, 4096 // max(W, 1))

            def work(r0):
                r1 = min(H, r0 + rows)
                yy, xx = np.meshgrid(ya[r0:r1], xa, indexing="ij")
                out[r0:r1] = _kernel_tile(centres, wts, xx.ravel(), yy.ravel(), kernel, ls).reshape(r1 - r0, W)

            _pool_map(work, list(range(0, H, rows)))
        if mean_coeffs is not None:
            yy, xx = np.meshgrid(ya, xa, indexing="ij")
            order = ref._order_of(np.size(mean_coeffs))
            out += eval_polynomial_surface(mean_coeffs, xx, yy, order, dtype=np.float64).astype(dtype)
        return out
    shape = np.shape(x)
    px = np.ravel(np.asarray(x, np.float64))
    py = np.ravel(np.asarray(y, np.float64))
    out = np.empty(px.size, dtype=dtype)
    B = 4096

    def work(b0):
        b1 = min(px.size, b0 + B)
        out[b0:b1] = _kernel_tile(centres, wts, px[b0:b1], py[b0:b1], kernel, ls)

    _pool_map(work, list(range(0, px.size, B)))
    if mean_coeffs is not None:
        order = ref._order_of(np.size(mean_coeffs))
        out += eval_polynomial_surface(mean_coeffs, px, py, order, dtype=np.float64).astype(dtype)
    return out.reshape(shape)


def _kernel_tile(centres, wts, px, py, kernel, ls):
    dx = (px[:, None] - centres[None, :, 0]) / ls
    dy = (py[:, None] - centres[None, :, 1]) / ls
    r2 = dx * dx + dy * dy
    if kernel == "gaussian":
        k = np.exp(-0.5 * r2)
    elif kernel == "matern32":
        s = np.sqrt(3.0 * r2)
        k = (1.0 + s) * np.exp(-s)
    else:  # tps: r² log r = 0.5 r² log r²
        k = 0.5 * r2 * np.log(np.where(r2 > 0, r2, 1.0))
    return k @ wts
