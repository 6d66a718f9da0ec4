"""Fast CPU paths of the performance kernels: numba when importable, blocked NumPy otherwise.

Inputs arrive validated and flattened from :mod:`gpu_insar_adjust.kernels` (cube ``(T, N)``, coordinates
``(N,)``). Both engines stream the float32 cube once in cache-sized pixel blocks and accumulate in float64;
neither builds a per-pixel design matrix.

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


def _n_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _block_pixels(T: int, itemsize: int = 4, budget: int = 1 << 20) -> int:
    """Pixels per block so that a (T, block) slab of the cube stays in a ~1 MiB share of L2."""
    b = budget // max(1, T * itemsize)
    return int(min(8192, max(64, (b // 64) * 64)))


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
    def ramp_subtract(cube, coef, u, v, out, block):
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
                ro = out[t, i0:i1]
                ub = u[i0:i1]
                vb = v[i0:i1]
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

    @jit(parallel=True)
    def shared_fit(A, Aw, G, Ninv, epoch_ok, n_epochs, Y, wt, colscale, want_rms, block, out_x, out_n, out_rms):
        """Per-pixel least squares with one design A (T, n) (columns scaled); see cpu.shared_design_fit."""
        T, N = Y.shape
        n = A.shape[1]
        npair = G.shape[1]
        has_wt = wt.shape[0] > 0
        nblk = (N + block - 1) // block
        for b in prange(nblk):
            i0 = b * block
            nb_ = min(N, i0 + block) - i0
            rhs = np.zeros((n, nb_))
            cnt = np.zeros(nb_)
            y0 = np.empty(nb_)
            # pass 1 (streams the cube from memory): right-hand sides and valid counts
            for t in range(T):
                if not epoch_ok[t]:
                    continue
                row = Y[t, i0:i0 + nb_]
                if has_wt:
                    wrow = wt[t, i0:i0 + nb_]
                    for i in range(nb_):
                        y = row[i]
                        wi = wrow[i]
                        ok = (y == y) & (wi > 0.0)
                        y0[i] = np.float64(y) * wi if ok else 0.0
                        cnt[i] += 1.0 if ok else 0.0
                else:
                    for i in range(nb_):
                        y = row[i]
                        ok = y == y
                        y0[i] = np.float64(y) if ok else 0.0
                        cnt[i] += 1.0 if ok else 0.0
                for k in range(n):
                    a = Aw[t, k]
                    rk = rhs[k]  # 1-D views keep the inner loops vectorisable
                    for i in range(rk.size):
                        rk[i] += a * y0[i]
            gaps = has_wt
            for i in range(nb_):
                if cnt[i] != n_epochs:
                    gaps = True
            nrm = np.zeros((npair, nb_ if gaps else 1))
            if gaps:
                # pass 2 (block still in cache): per-pixel normal matrices of the pixels' own valid epochs
                for t in range(T):
                    if not epoch_ok[t]:
                        continue
                    row = Y[t, i0:i0 + nb_]
                    if has_wt:
                        wrow = wt[t, i0:i0 + nb_]
                        for i in range(row.size):
                            y = row[i]
                            wi = wrow[i]
                            y0[i] = wi if (y == y) & (wi > 0.0) else 0.0
                    else:
                        for i in range(row.size):
                            y = row[i]
                            y0[i] = 1.0 if y == y else 0.0
                    for q in range(npair):
                        g = G[t, q]
                        nq = nrm[q]
                        for i in range(nq.size):
                            nq[i] += g * y0[i]
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
                good = True
                for j in range(n):
                    d = L[j, j]
                    for k in range(j):
                        d -= L[j, k] * L[j, k]
                    if not d > 1e-13 * L[j, j] or not d > 0.0:
                        good = False
                        break
                    d = np.sqrt(d)
                    L[j, j] = d
                    for r in range(j + 1, n):
                        acc = L[r, j]
                        for k in range(j):
                            acc -= L[r, k] * L[j, k]
                        L[r, j] = acc / d
                if not good:
                    for k in range(n):
                        xs[k, i] = np.nan
                    continue
                for j in range(n):
                    acc = rhs[j, i]
                    for k in range(j):
                        acc -= L[j, k] * z[k]
                    z[j] = acc / L[j, j]
                for j in range(n - 1, -1, -1):
                    acc = z[j]
                    for k in range(j + 1, n):
                        acc -= L[k, j] * xs[k, i]
                    xs[j, i] = acc / L[j, j]
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

    return {"chunk_moments": chunk_moments, "ramp_normals": ramp_normals, "ramp_subtract": ramp_subtract,
            "poly_eval": poly_eval, "shared_fit": shared_fit}


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
    for t in range(T):
        if cnt[t] < n_terms:
            continue
        Nt = full[t, :n_terms, :n_terms]
        try:
            Lc = np.linalg.cholesky(Nt)
        except np.linalg.LinAlgError:
            continue
        d = np.diag(Lc) ** 2
        if not np.all(d > 1e-13 * np.diag(Nt)):
            continue
        out[t, :n_terms] = np.linalg.solve(Nt, rhs[t, :n_terms])
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


def _pool_map(func, items):
    nt = _n_threads()
    if nt == 1 or len(items) < 2:
        return [func(it) for it in items]
    with ThreadPoolExecutor(max_workers=nt) as ex:
        return list(ex.map(func, items))


# --------------------------------------------------------------------------------------------------------------
# 1. per-epoch ramps
# --------------------------------------------------------------------------------------------------------------
def fit_epoch_ramps(cube, x, y, *, order=1, weights=None, mask=None, engine=None) -> np.ndarray:
    """Per-epoch polynomial ramps of a ``(T, N)`` cube; see :func:`gpu_insar_adjust.kernels.fit_epoch_ramps`."""
    T, N = cube.shape
    u, v, (x0, y0, s) = _centred(x, y)
    w = np.ones(N) if weights is None or weights.ndim == 2 else np.asarray(weights, np.float64)
    wt = np.asarray(weights, np.float64) if weights is not None and weights.ndim == 2 else None
    m2 = None
    if mask is not None:
        if mask.ndim == 1:
            w = np.where(mask, w, 0.0)
        else:
            m2 = np.ascontiguousarray(mask).view(np.uint8)
    eng = cpu_engine(engine)
    log.debug("fit_epoch_ramps: %s engine, cube %s", eng, cube.shape)
    if eng == "numba":
        k = _nb()
        psi = k["chunk_moments"](u, v, w)
        n_super = int(min(64, max(1, -(-N // 65536))))
        sub = max(1, 4096 // CHUNK)
        mask_arg = m2 if m2 is not None else np.zeros((0, N), np.uint8)
        wt_arg = wt if wt is not None else np.zeros((0, N))
        mom, rhs, cnt = k["ramp_normals"](cube, u, v, w, mask_arg, wt_arg, psi, n_super, sub)
        nrm, rhs, cnt = mom.sum(0)[:, _PAIR_TO_MOMENT], rhs.sum(0), cnt.sum(0)
    else:
        nrm, rhs, cnt = _ramp_normals_numpy(cube, u, v, w, m2, wt)
    c6 = _solve_small_spd(nrm, rhs, cnt, ref.n_poly_terms(order))
    return _from_centred_coeffs(c6, x0, y0, s, order)


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


def subtract_epoch_ramps(cube, coeffs, x, y, order, *, out=None, engine=None):
    """``cube - ramp`` per epoch into ``out`` (may be ``cube`` itself); returns ``out``."""
    T, N = cube.shape
    u, v, (x0, y0, s) = _centred(x, y)
    c6 = _to_centred_coeffs(np.asarray(coeffs, np.float64), x0, y0, s, order)
    if out is None:
        out = np.empty_like(cube)
    if cpu_engine(engine) == "numba":
        _nb()["ramp_subtract"](cube, c6, u, v, out, 4096)
        return out
    B = 4096

    def work(b0):
        b1 = min(N, b0 + B)
        F = ref.polynomial_terms(u[b0:b1], v[b0:b1], 2)
        out[:, b0:b1] = cube[:, b0:b1] - c6 @ F.T

    _pool_map(work, list(range(0, N, B)))
    return out


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
        _nb()["shared_fit"](As, Aw, G, Ninv, epoch_ok, n_epochs, Y,
                            wt if wt is not None else np.zeros((0, N)), colscale, bool(residual_rms),
                            _block_pixels(T, Y.itemsize), x, n_valid, rms)
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
