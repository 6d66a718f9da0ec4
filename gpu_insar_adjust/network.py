"""Network adjustment: one sparse, weighted, robust least-squares solve over all frames at once.

After each frame has been adjusted to GNSS on its own (:mod:`gpu_insar_adjust.adjust`), neighbouring frames still
disagree where they overlap: frames with few stations are poorly constrained, and a surface fitted to a handful of
stations leaves a tilt. Here every frame ``f`` gets a small correction surface

    c_f(x, y) = a_f + b_f·x + c_f·y  (+ quadratic terms with ``order=2``),

in kilometres from the frame's centre (scaled by 100 km for conditioning), and all parameters are estimated
together from

* **overlap differences** ``v_f(p) − v_g(p)`` sampled on the common grid, where ``v`` is each frame's
  *vertical-equivalent* velocity: LOS with the geometry-dependent horizontal part (GNSS horizontal field, which
  contains the plate motion) removed and divided by the up component of the unit vector, so that near-range and
  far-range pixels of different tracks compare like with like;
* **GNSS ties**: at each station in frame ``f``, ``v_f(station) − v_up,GNSS(station) = c_f(station)``;
* a weak **prior** pulling every parameter toward zero (σ = ``prior_sigma_mm_yr``), which only matters for a
  group of frames with no GNSS at all — their correction then stays at zero and they are reported as held by
  the prior.

Overlap samples are spatially correlated, so their weights are scaled by (effective independent samples /
samples used): a pair contributes as many "independent" observations as its area holds correlation cells, not as
many as pixels were drawn. Robustness: iteratively reweighted least squares with Huber weights on residuals
standardised by a MAD scale, so unmodelled local differences (e.g. horizontal motion around a subsidence bowl
that the GNSS field misses) do not drag a whole frame.

**Beyond a polynomial** (``spline_spacing_km``): an ionosphere or a troposphere finer than a frame's GNSS
stations can resolve survives the per-frame adjustment as a non-polynomial surface that no low-order correction
removes, yet the overlaps see it. Each frame can then also get a tensor-product cubic B-spline surface
(knots every ``spline_spacing_km`` over the frame's extent) whose coefficients have a prior sigma of their own,
one per frame — typically the frame's *misfit sigma* estimated from the polynomial solution's overlap residuals
(:func:`frame_misfit_sigmas`, a variance-component estimate over the pairs). A frame that agrees with its
neighbours keeps its spline near zero; a frame that disagrees with all of them bends toward them where they
overlap, and its correction fades back to the per-frame adjustment within about one knot spacing of the overlaps
(no data, no correction).

The assembled system has only ``n_frames × n_terms`` (+ spline coefficients) unknowns (a few thousand at most),
so it is formed with ``scipy.sparse`` on the host and solved as a dense Cholesky of the small normal matrix; its
conditioning is computed and an ill-conditioned network raises :class:`~gpu_insar_adjust.errors.NumericalError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.linalg import cho_factor, cho_solve

from .errors import AdjustmentError, ArrayArgumentError, NumericalError
from .logs import get_logger

__all__ = ["OverlapSamples", "GnssTies", "NetworkSolution", "SplineBasis", "poly_terms", "n_terms", "solve_network",
           "frame_misfit_sigmas"]

log = get_logger("network")

COORD_SCALE_KM = 100.0


def n_terms(order: int) -> int:
    """Number of polynomial terms of a correction surface of ``order`` (0 offset, 1 ramp, 2 quadratic)."""
    if order not in (0, 1, 2):
        raise ArrayArgumentError(f"Network correction order must be 0, 1 or 2, got {order}.", field="order",
                                 fix="use 0 (offset), 1 (offset + ramp) or 2 (quadratic)")
    return (1, 3, 6)[order]


def poly_terms(x_km, y_km, order: int) -> np.ndarray:
    """Design terms (n, n_terms) of the correction surface at frame-centred coordinates in km."""
    x = np.asarray(x_km, dtype=np.float64) / COORD_SCALE_KM
    y = np.asarray(y_km, dtype=np.float64) / COORD_SCALE_KM
    cols = [np.ones_like(x)]
    if order >= 1:
        cols += [x, y]
    if order >= 2:
        cols += [x * x, x * y, y * y]
    return np.stack(cols, axis=-1)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Uniform cubic B-spline weights (n, 4) at local parameter ``t`` in [0, 1]."""
    return np.stack(_cubic_weight_columns(t), axis=-1)


def _cubic_weight_columns(t: np.ndarray) -> tuple[np.ndarray, ...]:
    """The four columns of :func:`_cubic_weights`, each contiguous (no interleaving copy)."""
    t2, t3 = t * t, t * t * t
    return tuple(w / 6.0 for w in ((1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3))


@dataclass(frozen=True)
class SplineBasis:
    """Tensor-product uniform cubic B-splines over a rectangle of frame-centred km (knots every ``spacing_km``).

    Coefficient ``(j, i)`` (row-major, ``ny × nx``) is the control value of the basis function whose support
    starts at ``(x0 + (i − 3)·h, y0 + (j − 3)·h)``. Points outside the rectangle take the value at its edge.
    """

    x0_km: float
    y0_km: float
    spacing_km: float
    n_cells_x: int
    n_cells_y: int

    @classmethod
    def covering(cls, x_km, y_km, spacing_km: float) -> "SplineBasis":
        """The basis whose rectangle covers the given points (e.g. a frame's valid pixels)."""
        if not spacing_km > 0:
            raise ArrayArgumentError(f"spline spacing must be positive, got {spacing_km}.", field="spline_spacing_km",
                                     fix="give the knot spacing in km (e.g. 50), or 0 to switch splines off")
        x = np.asarray(x_km, np.float64)
        y = np.asarray(y_km, np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            raise ArrayArgumentError("a spline basis needs at least one finite point.", field="x_km/y_km",
                                     fix="give the frame's valid pixel coordinates")
        x0, x1, y0, y1 = x[ok].min(), x[ok].max(), y[ok].min(), y[ok].max()
        return cls(float(x0), float(y0), float(spacing_km), max(int(np.ceil((x1 - x0) / spacing_km)), 1),
                   max(int(np.ceil((y1 - y0) / spacing_km)), 1))

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_cells_y + 3, self.n_cells_x + 3

    @property
    def size(self) -> int:
        return (self.n_cells_y + 3) * (self.n_cells_x + 3)

    def _axis(self, v, v0, n_cells):
        cell, t = self._axis_cells(v, v0, n_cells)
        return cell, _cubic_weights(t)

    def _axis_cells(self, v, v0, n_cells):
        """Cell index and local parameter in [0, 1] of each coordinate along one axis."""
        u = (np.asarray(v, np.float64) - v0) / self.spacing_km
        u = np.clip(np.nan_to_num(u, nan=0.0), 0.0, float(n_cells))
        cell = np.minimum(np.floor(u).astype(np.int64), n_cells - 1)
        return cell, u - cell

    def design(self, x_km, y_km) -> tuple[np.ndarray, np.ndarray]:
        """Column indices (n, 16) and values (n, 16) of the basis at the points."""
        cx, wx = self._axis(x_km, self.x0_km, self.n_cells_x)
        cy, wy = self._axis(y_km, self.y0_km, self.n_cells_y)
        nxc = self.n_cells_x + 3
        k = np.arange(4)
        cols = (cy[:, None, None] + k[None, :, None]) * nxc + (cx[:, None, None] + k[None, None, :])
        vals = wy[:, :, None] * wx[:, None, :]
        return cols.reshape(-1, 16), vals.reshape(-1, 16)

    def evaluate(self, coef, x_km, y_km, *, chunk: int = 262_144) -> np.ndarray:
        """The surface with coefficients ``coef`` (``size``) at the points (any shape), in chunks."""
        x = np.asarray(x_km, np.float64)
        y = np.asarray(y_km, np.float64)
        c = np.asarray(coef, np.float64).ravel()
        xf, yf = x.ravel(), y.ravel()
        out = np.empty(xf.size)
        nxc = self.n_cells_x + 3
        for a in range(0, xf.size, chunk):
            cx, wx = self._axis(xf[a:a + chunk], self.x0_km, self.n_cells_x)
            cy, wy = self._axis(yf[a:a + chunk], self.y0_km, self.n_cells_y)
            base = cy * nxc + cx
            # 16 gathers of one vector each, summed row by row: no (n, 16) design in memory
            acc = np.zeros(base.size)
            for i in range(4):
                row = np.zeros(base.size)
                for j in range(4):
                    row += c[base + (i * nxc + j)] * wx[:, j]
                acc += row * wy[:, i]
            out[a:a + chunk] = acc
        return out.reshape(x.shape)

    def evaluate_rows(self, coef, x_km, y_km_rows) -> np.ndarray:
        """:meth:`evaluate` on raster rows whose points share their ``y``: ``x_km`` ``(R, C)``, ``y_km_rows``
        ``(R,)``. The four B-spline rows of each raster row are combined once per row, then every point gathers
        four values instead of sixteen (the same surface; sums in another order, within 1e-15 relative)."""
        x = np.asarray(x_km, np.float64)
        yr = np.asarray(y_km_rows, np.float64).ravel()
        if x.ndim != 2 or yr.size != x.shape[0]:
            raise ArrayArgumentError(f"evaluate_rows needs x (rows, cols) and one y per row; got x {x.shape}, "
                                     f"y {yr.shape}.", field="y_km_rows", fix="use evaluate() for scattered points")
        c = np.asarray(coef, np.float64).reshape(self.shape)
        cy, wy = self._axis(yr, self.y0_km, self.n_cells_y)
        row_ctrl = c[cy] * wy[:, :1]  # (R, nxc): the control values of each raster row
        for i in range(1, 4):
            row_ctrl += c[cy + i] * wy[:, i:i + 1]
        cx, tx = self._axis_cells(x.ravel(), self.x0_km, self.n_cells_x)
        wx = _cubic_weight_columns(tx)
        base = (np.arange(x.shape[0], dtype=np.int64)[:, None] * row_ctrl.shape[1] + cx.reshape(x.shape)).ravel()
        flat = row_ctrl.ravel()
        acc = flat[base] * wx[0]
        for j in range(1, 4):
            acc += flat[base + j] * wx[j]
        return acc.reshape(x.shape)


@dataclass
class OverlapSamples:
    """Samples of one overlap: ``diff = v_i − v_j`` (mm/yr) at points given in each frame's centred km."""

    i: int
    j: int
    xi_km: np.ndarray
    yi_km: np.ndarray
    xj_km: np.ndarray
    yj_km: np.ndarray
    diff: np.ndarray
    sigma: np.ndarray
    area_km2: float
    kind: str = "overlap"  # "along-track" | "across-track" | "asc-desc"

    def __post_init__(self):
        n = len(self.diff)
        for name in ("xi_km", "yi_km", "xj_km", "yj_km", "sigma"):
            if len(getattr(self, name)) != n:
                raise ArrayArgumentError(f"OverlapSamples.{name} has {len(getattr(self, name))} values for {n} "
                                         f"differences (pair {self.i}-{self.j}).", field=name,
                                         fix="give one coordinate and sigma per sampled difference")


@dataclass
class GnssTies:
    """GNSS ties of one frame: ``residual = v_frame − v_up,GNSS`` (mm/yr) at stations, in frame-centred km."""

    frame: int
    x_km: np.ndarray
    y_km: np.ndarray
    residual: np.ndarray
    sigma: np.ndarray
    stations: list[str] = field(default_factory=list)


@dataclass
class NetworkSolution:
    """Result of :func:`solve_network`."""

    order: int
    params: np.ndarray            # (n_frames, n_terms), mm/yr per scaled coordinate unit
    param_std: np.ndarray         # (n_frames, n_terms)
    held_by: list[str]            # per frame: "gnss", "neighbours", "gnss+neighbours" or "prior"
    pairs: list[dict]             # per overlap: i, j, kind, n, rms_before, rms_after, area_km2
    ties: list[dict]              # per frame: n, rms_before, rms_after
    rcond: float                  # of the prior-regularised normal matrix solved (1-norm estimate)
    rcond_data: float             # of the data-only normal matrix: ~0 where data leave a direction undetermined
    iterations: int
    splines: list | None = None   # per frame: SplineBasis or None
    spline_coef: list | None = None  # per frame: (basis.size,) mm/yr or None
    spline_sigma: np.ndarray | None = None  # per frame: prior sigma of its spline coefficients (mm/yr)
    robust_weights: np.ndarray | None = None  # final IRLS weight of every observation (overlaps, then ties)

    @classmethod
    def zeros(cls, n_frames: int, order: int = 1, reason: str = "disabled") -> "NetworkSolution":
        """A solution that changes nothing (network adjustment switched off or impossible)."""
        nt = n_terms(order)
        return cls(order=order, params=np.zeros((n_frames, nt)), param_std=np.full((n_frames, nt), np.nan),
                   held_by=[reason] * n_frames, pairs=[], ties=[], rcond=float("nan"), rcond_data=float("nan"),
                   iterations=0)

    def correction(self, frame: int, x_km, y_km) -> np.ndarray:
        """The network correction (mm/yr) of ``frame`` at frame-centred coordinates (to subtract)."""
        c = poly_terms(x_km, y_km, self.order) @ self.params[frame]
        if self.splines is not None and self.splines[frame] is not None:
            c = c + self.splines[frame].evaluate(self.spline_coef[frame], x_km, y_km)
        return c

    def correction_rows(self, frame: int, x_km, y_km_rows) -> np.ndarray:
        """:meth:`correction` on raster rows whose points share their ``y`` (a geographic frame's rows):
        ``x_km`` ``(R, C)``, ``y_km_rows`` ``(R,)``. The polynomial goes by Horner in x with per-row
        coefficients and the spline through :meth:`SplineBasis.evaluate_rows`: a few operations per point
        instead of a design row and sixteen gathers (the same surface within 1e-15 relative)."""
        x = np.asarray(x_km, np.float64) / COORD_SCALE_KM
        y = (np.asarray(y_km_rows, np.float64) / COORD_SCALE_KM).reshape(-1, 1)
        p = np.asarray(self.params[frame], np.float64)
        if self.order == 0:
            c = np.full(x.shape, p[0])
        elif self.order == 1:
            c = (p[0] + p[2] * y) + p[1] * x
        else:  # terms [1, x, y, x², xy, y²]
            c = (p[0] + y * (p[2] + p[5] * y)) + x * ((p[1] + p[4] * y) + p[3] * x)
        if self.splines is not None and self.splines[frame] is not None:
            c += self.splines[frame].evaluate_rows(self.spline_coef[frame], x_km, y_km_rows)
        return c

    def spline_rms(self, frame: int) -> float:
        """RMS of the spline coefficients of ``frame`` (mm/yr; 0 without a spline)."""
        if self.splines is None or self.splines[frame] is None:
            return 0.0
        return float(np.sqrt(np.mean(np.square(self.spline_coef[frame]))))

    def summary(self) -> dict:
        rb = [p["rms_before"] for p in self.pairs if p["n"]]
        ra = [p["rms_after"] for p in self.pairs if p["n"]]
        # condition estimates to 4 digits: LAPACK's estimate moves in its last digits with the BLAS threads,
        # and a summary should not differ between two runs of the same inputs
        out = {"order": self.order, "iterations": self.iterations, "rcond": _digits4(self.rcond),
               "rcond_data": _digits4(self.rcond_data),
               "overlap_rms_before_mm_yr": float(np.sqrt(np.mean(np.square(rb)))) if rb else None,
               "overlap_rms_after_mm_yr": float(np.sqrt(np.mean(np.square(ra)))) if ra else None,
               "pairs": self.pairs, "ties": self.ties, "held_by": self.held_by}
        if self.splines is not None:
            out["spline"] = {"spacing_km": next((b.spacing_km for b in self.splines if b is not None), None),
                             "prior_sigma_mm_yr": [float(v) for v in self.spline_sigma],
                             "coefficient_rms_mm_yr": [self.spline_rms(f) for f in range(len(self.splines))]}
        return out


def _digits4(v) -> float:
    return float(f"{float(v):.4g}")


def _rcond(Ns: np.ndarray, chol) -> float:
    """Reciprocal condition number (1-norm) of a symmetric positive definite matrix from its Cholesky factor:
    LAPACK's ``?pocon`` estimate, O(n²) against O(n³) for the eigenvalues of a matrix of thousands of
    parameters (splines)."""
    from scipy.linalg.lapack import dpocon

    rc, info = dpocon(chol[0], float(np.abs(Ns).sum(axis=0).max()), uplo="L" if chol[1] else "U")
    return float(rc) if info == 0 else 0.0


def _huber(u: np.ndarray, k: float) -> np.ndarray:
    a = np.abs(u)
    return np.where(a <= k, 1.0, k / np.maximum(a, 1e-300))


def _robust_scale(r: np.ndarray, w: np.ndarray) -> float:
    z = r * np.sqrt(w)
    mad = 1.4826 * np.median(np.abs(z - np.median(z))) if z.size else 1.0
    return float(mad) if mad > 1e-12 else 1.0


def solve_network(n_frames: int, overlaps: list[OverlapSamples], ties: list[GnssTies], *, order: int = 1,
                  correlation_km: float = 10.0, sigma_floor_mm_yr: float = 1.0,
                  prior_sigma_mm_yr: float | np.ndarray = 20.0,
                  huber_k: float = 1.5, max_iter: int = 15, tol: float = 0.05,
                  max_condition: float = 1e10, splines=None,
                  spline_sigma_mm_yr: float | np.ndarray = 2.0, robust_weights=None) -> NetworkSolution:
    """Estimate per-frame correction surfaces from overlap differences and GNSS ties (see module doc).

    Parameters
    ----------
    n_frames
        Number of frames (indices used in ``overlaps`` and ``ties``).
    overlaps, ties
        Observations; either may be empty but not both.
    order
        0 offset, 1 offset + ramp (default), 2 quadratic.
    correlation_km
        Correlation length of overlap differences, fixing the effective number of independent samples per pair.
    sigma_floor_mm_yr
        Added in quadrature to every observation sigma (unmodelled differences).
    prior_sigma_mm_yr
        Prior sigma of every parameter (mm/yr per scaled coordinate unit): one number, or one per frame — e.g.
        each frame's cross-validated RMSE, so that a frame the GNSS fit well stays put while a poorly fitted
        one is corrected by its overlaps.
    huber_k, max_iter, tol
        IRLS settings; the iterations stop when no modelled observation (overlap difference or tie) moves by
        more than ``tol`` mm/yr.
    max_condition
        Largest acceptable condition number of the (prior-regularised) normal matrix.
    splines
        Optional per-frame :class:`SplineBasis` (or None for a frame without one) added to the polynomial.
    spline_sigma_mm_yr
        Prior sigma of every spline coefficient (mm/yr): one number or one per frame, e.g. the frames' misfit
        sigmas from :func:`frame_misfit_sigmas`.
    robust_weights
        Starting IRLS weights (one per observation, e.g. ``robust_weights`` of an earlier solution of the same
        observations): a warm start.
    """
    if n_frames < 1:
        raise AdjustmentError("The network has no frames.", field="frames", fix="give at least one frame")
    nt = n_terms(order)
    npoly = n_frames * nt
    if splines is not None and len(splines) != n_frames:
        raise ArrayArgumentError(f"{len(splines)} spline bases for {n_frames} frames.", field="splines",
                                 fix="give one SplineBasis (or None) per frame")
    sp_off = np.full(n_frames, -1, np.int64)
    npar = npoly
    if splines is not None:
        for f, b in enumerate(splines):
            if b is not None:
                sp_off[f] = npar
                npar += b.size

    def spline_entries(f, x_km, y_km, row0, sign):
        b = splines[f] if splines is not None else None
        if b is None:
            return None
        c, v = b.design(x_km, y_km)
        r = np.repeat(np.arange(row0, row0 + len(c)), 16)
        return r, (c + sp_off[f]).ravel(), sign * v.ravel()

    rows_i, cols_i, vals_i, obs, sig, eff, group = [], [], [], [], [], [], []
    row = 0
    for g, ov in enumerate(overlaps):
        if not (0 <= ov.i < n_frames and 0 <= ov.j < n_frames) or ov.i == ov.j:
            raise ArrayArgumentError(f"Overlap pair ({ov.i}, {ov.j}) is not a pair of distinct frames "
                                     f"0..{n_frames - 1}.", field="overlaps", fix="check the frame indices")
        n = len(ov.diff)
        if n == 0:
            continue
        ti = poly_terms(ov.xi_km, ov.yi_km, order)
        tj = poly_terms(ov.xj_km, ov.yj_km, order)
        r = np.repeat(np.arange(row, row + n), nt)
        rows_i += [r, r]
        cols_i += [np.tile(np.arange(ov.i * nt, ov.i * nt + nt), n), np.tile(np.arange(ov.j * nt, ov.j * nt + nt), n)]
        vals_i += [ti.ravel(), -tj.ravel()]
        for e in (spline_entries(ov.i, ov.xi_km, ov.yi_km, row, 1.0),
                  spline_entries(ov.j, ov.xj_km, ov.yj_km, row, -1.0)):
            if e is not None:
                rows_i.append(e[0]), cols_i.append(e[1]), vals_i.append(e[2])
        obs.append(np.asarray(ov.diff, np.float64))
        sig.append(np.hypot(np.asarray(ov.sigma, np.float64), sigma_floor_mm_yr))
        n_eff = max(1.0, min(float(n), ov.area_km2 / correlation_km**2))
        eff.append(np.full(n, n_eff / n))
        group.append(np.full(n, g))
        row += n
    n_overlap_rows = row
    tie_group_offset = len(overlaps)
    for t in ties:
        n = len(t.residual)
        if n == 0:
            continue
        if not 0 <= t.frame < n_frames:
            raise ArrayArgumentError(f"GNSS ties refer to frame {t.frame}, outside 0..{n_frames - 1}.",
                                     field="ties", fix="check the frame indices")
        tt = poly_terms(t.x_km, t.y_km, order)
        r = np.repeat(np.arange(row, row + n), nt)
        rows_i.append(r)
        cols_i.append(np.tile(np.arange(t.frame * nt, t.frame * nt + nt), n))
        vals_i.append(tt.ravel())
        e = spline_entries(t.frame, t.x_km, t.y_km, row, 1.0)
        if e is not None:
            rows_i.append(e[0]), cols_i.append(e[1]), vals_i.append(e[2])
        obs.append(np.asarray(t.residual, np.float64))
        sig.append(np.hypot(np.asarray(t.sigma, np.float64), sigma_floor_mm_yr))
        eff.append(np.ones(n))
        group.append(np.full(n, tie_group_offset + t.frame))
        row += n
    if row == 0:
        raise AdjustmentError("The network has neither overlaps nor GNSS ties: nothing constrains it.",
                              field="frames", fix="give frames that overlap, or GNSS stations inside the frames")
    A = sp.csr_matrix((np.concatenate(vals_i), (np.concatenate(rows_i), np.concatenate(cols_i))),
                      shape=(row, npar))
    y = np.concatenate(obs)
    base_w = np.concatenate(eff) / np.concatenate(sig) ** 2
    ps = np.broadcast_to(np.asarray(prior_sigma_mm_yr, np.float64), (n_frames,))
    if not np.all(np.isfinite(ps) & (ps > 0)):
        raise ArrayArgumentError("prior_sigma_mm_yr must be positive and finite.", field="prior_sigma_mm_yr",
                                 fix="give one positive sigma (mm/yr) or one per frame")
    prior = np.repeat(1.0 / ps**2, nt)
    ss = np.broadcast_to(np.asarray(spline_sigma_mm_yr, np.float64), (n_frames,)).copy()
    if splines is not None:
        if not np.all(np.isfinite(ss) & (ss > 0)):
            raise ArrayArgumentError("spline_sigma_mm_yr must be positive and finite.", field="spline_sigma_mm_yr",
                                     fix="give one positive sigma (mm/yr) or one per frame")
        prior = np.concatenate([prior] + [np.full(b.size, 1.0 / ss[f] ** 2)
                                          for f, b in enumerate(splines) if b is not None])
    if not np.all(np.isfinite(y)) or not np.all(np.isfinite(base_w)):
        raise ArrayArgumentError("Network observations contain NaN or inf.", field="overlaps/ties",
                                 fix="drop invalid samples before calling solve_network")

    robust_w = np.ones(row)
    if robust_weights is not None:
        rw = np.asarray(robust_weights, np.float64)
        if rw.shape != (row,) or not np.all(np.isfinite(rw) & (rw > 0)):
            raise ArrayArgumentError(f"robust_weights must be {row} positive finite weights, one per observation.",
                                     field="robust_weights", fix="pass the robust_weights of a solution of the "
                                                                 "same overlaps and ties, or None")
        robust_w = rw.copy()
    AT = A.T.tocsr()
    # Huber weights fall below 1 on a few rows only: the normal matrix is formed once with the base weights and
    # each iteration subtracts the down-weighted rows' share (exact, and far cheaper than a full product)
    N_base = (AT @ sp.diags(base_w) @ A).toarray()
    diag = np.diag_indices(npar)
    fix = ("lower the correction order (network.order = 0 in the configuration), add GNSS stations, or drop "
           "frames whose overlap is only a few pixels")
    x = np.zeros(npar)
    it = 0
    rcond = float("nan")
    for it in range(1, max_iter + 1):
        w = base_w * robust_w
        down = np.flatnonzero(robust_w != 1.0)
        if down.size:
            Ad = A[down]
            N = N_base - (Ad.T @ sp.diags(base_w[down] * (1.0 - robust_w[down])) @ Ad).toarray()
        else:
            N = N_base.copy()
        N[diag] += prior
        b = AT @ (w * y)
        d = np.sqrt(np.diag(N))
        Ns = N / d[:, None] / d[None, :]
        try:
            chol = cho_factor(Ns, lower=True, check_finite=False)
        except np.linalg.LinAlgError as exc:
            raise NumericalError("The network normal matrix is ill-conditioned (not positive definite in floating "
                                 "point).", field="network", fix=fix) from exc
        if it == 1:  # the robust weights only rescale rows: checked once, on the first system
            rcond = _rcond(Ns, chol)
            if rcond < 1.0 / max_condition:
                raise NumericalError(f"The network normal matrix is ill-conditioned (condition "
                                     f"{1 / max(rcond, 1e-300):.2e} > {max_condition:.0e}).", field="network",
                                     fix=fix)
        x_new = cho_solve(chol, b / d, check_finite=False) / d
        r = y - A @ x_new
        if it <= 3:  # the robust scale from the first fits, then held: IRLS with a fixed scale converges steadily
            scale = _robust_scale(r, base_w)
        robust_w = _huber(r * np.sqrt(base_w) / scale, huber_k)
        # converged when the modelled observations stop moving: parameters along directions the data barely
        # see (polynomial vs spline trade-offs) drift slowly without changing any fitted value
        step = np.max(np.abs(A @ (x_new - x))) if it > 1 else np.inf
        x = x_new
        if step < tol:
            break
    rcond = _rcond(Ns, chol)
    # the polynomial parameters' variances only: their columns of the inverse, not the whole inverse of a matrix
    # of thousands of spline coefficients
    dp = d[:npoly]
    cov_poly = cho_solve(chol, np.eye(npar)[:, :npoly], check_finite=False)[:npoly] / dp[:, None] / dp[None, :]
    # data-only conditioning of the polynomial part: the spline part is redundant with it by design (its prior
    # resolves that), and spline coefficients away from every overlap are unobserved on purpose
    Nd = N[:npoly, :npoly] - np.diag(prior[:npoly])
    dd = np.sqrt(np.clip(np.diag(Nd), 1e-300, None))
    ev_d = np.linalg.eigvalsh(Nd / dd[:, None] / dd[None, :])
    rcond_data = float(max(ev_d[0], 0.0) / ev_d[-1]) if ev_d[-1] > 0 else 0.0
    if rcond_data < 1e-10:
        log.warning("network: the data leave some correction parameters undetermined (rcond %.1e); those are "
                    "held at zero by the prior", rcond_data)
    params = x[:npoly].reshape(n_frames, nt)
    param_std = np.sqrt(np.clip(np.diag(cov_poly), 0, None)).reshape(n_frames, nt)
    spline_coef = None
    if splines is not None:
        spline_coef = [None if b is None else x[sp_off[f]:sp_off[f] + b.size].copy() for f, b in enumerate(splines)]

    # Diagnostics per overlap pair and per frame's ties, before (observations) and after (residuals).
    r = y - A @ x
    grp = np.concatenate(group)
    pairs = []
    for g, ov in enumerate(overlaps):
        sel = grp[:n_overlap_rows] == g
        before, after = y[:n_overlap_rows][sel], r[:n_overlap_rows][sel]
        pairs.append({"i": ov.i, "j": ov.j, "kind": ov.kind, "n": int(sel.sum()), "area_km2": float(ov.area_km2),
                      "rms_before": float(np.sqrt(np.mean(before**2))) if sel.any() else None,
                      "rms_after": float(np.sqrt(np.mean(after**2))) if sel.any() else None})
    tie_stats = []
    has_tie = np.zeros(n_frames, bool)
    for t in ties:
        sel = grp == tie_group_offset + t.frame
        sel[:n_overlap_rows] = False
        has_tie[t.frame] |= bool(sel.any())
        tie_stats.append({"frame": t.frame, "n": int(sel.sum()),
                          "rms_before": float(np.sqrt(np.mean(y[sel] ** 2))) if sel.any() else None,
                          "rms_after": float(np.sqrt(np.mean(r[sel] ** 2))) if sel.any() else None})
    held_by = _held_by(n_frames, overlaps, has_tie)
    sol = NetworkSolution(order=order, params=params, param_std=param_std, held_by=held_by, pairs=pairs,
                          ties=tie_stats, rcond=rcond, rcond_data=rcond_data,
                          iterations=it, splines=list(splines) if splines is not None else None,
                          spline_coef=spline_coef, spline_sigma=ss if splines is not None else None,
                          robust_weights=robust_w)
    log.info("network: %d frames, %d overlap samples, %d GNSS ties, %d IRLS iterations, rcond %.1e",
             n_frames, n_overlap_rows, row - n_overlap_rows, it, rcond)
    return sol


def frame_misfit_sigmas(n_frames: int, pairs: list[dict], *, damping: float = 0.1) -> np.ndarray:
    """Per-frame misfit sigma (mm/yr) from the residual RMS of every overlap pair (a variance-component estimate).

    With independent frame errors, a pair's residual mean square is the sum of its two frames' variances,
    ``rms_ij² = σ_i² + σ_j²``; the variances are the non-negative least-squares solution over all pairs, lightly
    damped (``damping``) toward an equal split of each frame's pairs so that a frame seen by a single pair (both
    frames then share its misfit) is still determined. A frame that disagrees with every neighbour gets a large
    sigma, its neighbours small ones. Frames in no pair get NaN. ``pairs`` are :class:`NetworkSolution` pair
    dicts (``i``, ``j``, ``n``, ``rms_after``).
    """
    from scipy.optimize import nnls

    use = [p for p in pairs if p.get("n") and p.get("rms_after") is not None and np.isfinite(p["rms_after"])]
    out = np.full(n_frames, np.nan)
    if not use:
        return out
    A = np.zeros((len(use), n_frames))
    b = np.empty(len(use))
    share = [[] for _ in range(n_frames)]
    for r, p in enumerate(use):
        A[r, p["i"]] = A[r, p["j"]] = 1.0
        b[r] = p["rms_after"] ** 2
        share[p["i"]].append(0.5 * b[r])
        share[p["j"]].append(0.5 * b[r])
    seen = np.array([bool(s) for s in share])
    target = np.array([np.mean(s) if s else 0.0 for s in share])
    D = damping * np.eye(n_frames)[seen]
    var, _ = nnls(np.vstack([A[:, seen], D[:, seen]]), np.concatenate([b, damping * target[seen]]))
    out[seen] = np.sqrt(var)
    return out


def _held_by(n_frames: int, overlaps: list[OverlapSamples], has_tie: np.ndarray) -> list[str]:
    """How each frame is constrained: by its own GNSS, by GNSS-tied neighbours, both, or only by the prior."""
    adj: dict[int, set[int]] = {f: set() for f in range(n_frames)}
    for ov in overlaps:
        if len(ov.diff):
            adj[ov.i].add(ov.j)
            adj[ov.j].add(ov.i)
    # connected components: a component with at least one tied frame is held by GNSS through neighbours
    comp = [-1] * n_frames
    c = 0
    for f in range(n_frames):
        if comp[f] >= 0:
            continue
        stack = [f]
        comp[f] = c
        while stack:
            u = stack.pop()
            for v in adj[u]:
                if comp[v] < 0:
                    comp[v] = c
                    stack.append(v)
        c += 1
    tied_comp = {comp[f] for f in range(n_frames) if has_tie[f]}
    out = []
    for f in range(n_frames):
        if has_tie[f] and adj[f]:
            out.append("gnss+neighbours")
        elif has_tie[f]:
            out.append("gnss")
        elif comp[f] in tied_comp:
            out.append("neighbours")
        else:
            out.append("prior")
    return out
