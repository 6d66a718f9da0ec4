"""Candidate long-wavelength models of the InSAR − GNSS LOS difference in one frame.

Each candidate is a scikit-learn regressor (``fit(X, y, sample_weight)``, ``predict(X)``, fitted attributes
ending in ``_``) whose features are named columns of ``X``:

``x_km``, ``y_km``
    Frame-centred local coordinates of the station, km (east, north); see
    :func:`gpu_insar_adjust.adjust.residuals.local_xy_km`.
``height_m``
    Terrain height from the frame's DEM at the station, m (optional).
``incidence_deg``
    Radar incidence angle at the station, degrees (optional).

``X`` is a :class:`pandas.DataFrame` with those column names, or a 2-D array whose columns follow the order of
:data:`FEATURES` (as many as given). ``y`` is InSAR − GNSS in mm/yr; ``sample_weight`` are inverse variances
1/σ² in (mm/yr)⁻².

Fitting uses the few stations of a frame and runs on the host. Evaluation of the fitted surface on every pixel
(:meth:`SurfaceModel.evaluate`, :meth:`SurfaceModel.evaluate_std`) takes 1-D feature arrays of any array-API
namespace (NumPy, CuPy, array_api_strict) and returns arrays of the same namespace; only the tree ensembles
evaluate on the host (their prediction is not dense arithmetic).

The candidate registry (:func:`make_candidate`) maps names to estimators::

    poly0 .. poly3                polynomial surface of that order in x_km, y_km
    polyK+dem, polyK+inc,         the same plus a linear DEM-height term and/or an incidence-angle term
    polyK+dem+inc
    gp                            Gaussian-process (kriging) surface on a plane trend, Matérn 3/2 covariance
    tps                           smoothing thin-plate spline, smoothing by generalised cross-validation
    lowpass                       plane + Gaussian low-pass of the residuals at the mean station spacing
    rf, gbr                       random forest / gradient boosting on a plane trend
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from .. import backend
from ..errors import AdjustmentError

__all__ = [
    "FEATURES", "SurfaceModel", "PolynomialSurface", "GaussianProcessSurface", "ThinPlateSplineSurface",
    "LowPassSurface", "TreeEnsembleSurface", "make_candidate", "candidate_names", "candidate_complexity",
    "candidate_min_stations", "candidate_features", "candidate_is_smooth", "feature_columns", "DEFAULT_CANDIDATES",
]

#: Canonical order of feature columns when ``X`` is a plain array.
FEATURES: tuple[str, ...] = ("x_km", "y_km", "height_m", "incidence_deg")

#: Candidates tried by default (the complexity order used by the one-standard-error rule is
#: :func:`candidate_complexity`).
DEFAULT_CANDIDATES: tuple[str, ...] = ("poly0", "poly1", "poly2", "poly3", "poly1+dem", "poly2+dem",
                                       "poly1+dem+inc", "lowpass", "tps", "gp", "gbr", "rf")


# --------------------------------------------------------------------------------------------------------------
# Feature handling
# --------------------------------------------------------------------------------------------------------------
def feature_columns(X, names) -> dict[str, np.ndarray]:
    """Float64 host columns ``names`` of ``X`` (DataFrame by name, array by the order of :data:`FEATURES`)."""
    out: dict[str, np.ndarray] = {}
    if hasattr(X, "columns"):
        for name in names:
            if name not in X.columns:
                raise AdjustmentError(f"Feature column {name!r} is missing from the model input.", field=name,
                                      fix=f"provide columns {', '.join(names)} (frame-centred km coordinates, "
                                          "DEM height in m, incidence in degrees) or drop that candidate")
            out[name] = np.asarray(X[name], dtype=np.float64)
        return out
    arr = np.asarray(backend.to_numpy(X), dtype=np.float64)
    if arr.ndim != 2:
        raise AdjustmentError(f"Model input X must be 2-D (stations, features), got shape {arr.shape}.",
                              field="X", fix="pass a DataFrame with columns x_km, y_km[, height_m, incidence_deg]")
    for name in names:
        j = FEATURES.index(name)
        if j >= arr.shape[1]:
            raise AdjustmentError(f"Feature {name!r} (column {j}) is missing: X has {arr.shape[1]} columns.",
                                  field=name, fix=f"pass columns in the order {', '.join(FEATURES)}")
        out[name] = arr[:, j]
    return out


def _check_target(y, sample_weight, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(backend.to_numpy(y), dtype=np.float64).reshape(-1)
    if y.shape[0] != n:
        raise AdjustmentError(f"Target has {y.shape[0]} values for {n} stations.", field="y",
                              fix="pass one InSAR − GNSS difference per station")
    if n == 0:
        raise AdjustmentError("No stations to fit a correction surface to.", field="stations",
                              fix="check that GNSS stations fall inside the frame and on valid pixels")
    if sample_weight is None:
        w = np.ones(n)
    else:
        w = np.asarray(backend.to_numpy(sample_weight), dtype=np.float64).reshape(-1)
        if w.shape[0] != n:
            raise AdjustmentError(f"sample_weight has {w.shape[0]} values for {n} stations.", field="sample_weight",
                                  fix="pass one inverse variance per station")
    bad = ~np.isfinite(y) | ~np.isfinite(w) | (w <= 0)
    if bad.any():
        raise AdjustmentError(f"{int(bad.sum())} of {n} stations have a non-finite difference or a non-positive "
                              "weight.", field="y", fix="drop those stations before fitting (residuals does this)")
    return y, w


def _check_features(cols: dict[str, np.ndarray]) -> None:
    for name, v in cols.items():
        if not np.all(np.isfinite(v)):
            raise AdjustmentError(f"Feature {name!r} is not finite at {int((~np.isfinite(v)).sum())} stations.",
                                  field=name, fix="drop those stations or use a candidate without that feature")


def _validated_fit():
    """scikit-learn's own checks switched off for a fit whose inputs were checked here (finite columns, target
    and weights; fixed, valid hyper-parameters): every boosting stage validates again, which is 30 % of a
    gradient-boosting fit on tens of stations (8 % of a frame's whole cross-validation). The same result."""
    import sklearn

    return sklearn.config_context(assume_finite=True, skip_parameter_validation=True)


def _namespace_of(features: Mapping[str, Any]):
    return backend.namespace(*[features[k] for k in features if features[k] is not None])


def _as_float64(xp, a):
    return xp.astype(a, xp.float64)


class SurfaceModel(RegressorMixin, BaseEstimator):
    """Base class: feature bookkeeping and the dense-evaluation interface."""

    #: True when :meth:`evaluate` runs on any array-API namespace (False: host evaluation, moved back).
    dense_array_api = True

    def _feature_names(self) -> tuple[str, ...]:
        names = ["x_km", "y_km"]
        if getattr(self, "height", False):
            names.append("height_m")
        if getattr(self, "incidence", False):
            names.append("incidence_deg")
        return tuple(names)

    @property
    def required_features(self) -> tuple[str, ...]:
        """Feature columns this model reads."""
        return self._feature_names()

    def _columns(self, X) -> dict[str, np.ndarray]:
        cols = feature_columns(X, self._feature_names())
        _check_features(cols)
        return cols

    def predict(self, X) -> np.ndarray:
        """Model value (mm/yr) at the stations of ``X`` (host, float64)."""
        cols = feature_columns(X, self._feature_names())
        return np.asarray(backend.to_numpy(self.evaluate(cols)), dtype=np.float64)

    def evaluate(self, features: Mapping[str, Any]):
        """Surface (mm/yr, float64) at points given as 1-D arrays of any array-API namespace."""
        raise NotImplementedError

    def evaluate_std(self, features: Mapping[str, Any]):
        """1-σ of the surface (mm/yr) at the points, or None when the model has no closed-form uncertainty."""
        return None


# --------------------------------------------------------------------------------------------------------------
# Polynomial surfaces (+ DEM / incidence terms)
# --------------------------------------------------------------------------------------------------------------
def _poly_powers(order: int) -> list[tuple[int, int]]:
    return [(d - i, i) for d in range(order + 1) for i in range(d + 1)]


def _weighted_lstsq(A: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float):
    """Weighted ridge least squares through :func:`gpu_insar_adjust.linalg.lstsq_shared` (host, float64)."""
    from ..linalg import lstsq_shared

    res = lstsq_shared(A, y, w, ridge=ridge)
    return (np.asarray(backend.to_numpy(res.x), dtype=np.float64),
            np.asarray(backend.to_numpy(res.cov), dtype=np.float64), bool(res.determined))


def _check_rank(A: np.ndarray, w: np.ndarray, what: str) -> None:
    """Raise when the weighted design does not determine its parameters (e.g. collinear stations)."""
    n, p = A.shape
    if n < p:
        raise AdjustmentError(f"{what} has {p} parameters but only {n} stations.", field="stations",
                              fix="use a lower-order candidate (poly0/poly1) or add GNSS stations")
    B = A * np.sqrt(w)[:, None]
    norms = np.linalg.norm(B, axis=0)
    B = B / np.where(norms > 0, norms, 1.0)
    s = np.linalg.svd(B, compute_uv=False)
    if s[-1] <= 1e-8 * s[0] or np.any(norms == 0):
        raise AdjustmentError(f"{what} is not determined by these stations (they are collinear or the feature "
                              "does not vary between them).", field="stations",
                              fix="use a lower-order candidate (poly0) or add stations off the line")


class PolynomialSurface(SurfaceModel):
    """Polynomial of order 0-3 in frame-centred, scaled coordinates, optionally with DEM and incidence terms.

    ``f = Σ c_ij u^i v^j (+ c_h (h − h0)/h_s) (+ c_θ (θ − θ0)/θ_s)`` with ``u = (x_km − x0)/s``,
    ``v = (y_km − y0)/s``, where centres and scales come from the training stations (so the coefficients are
    well conditioned). Weighted, ridge-regularised least squares (``ridge`` on the scaled normal matrix; it only
    tames near-degenerate station layouts). A design that the stations do not determine (collinear stations for
    a plane) raises :class:`AdjustmentError`.

    Fitted attributes: ``coef_`` (mm/yr per scaled term), ``coef_cov_`` (a-posteriori covariance), ``centre_``,
    ``scale_``, ``sigma0_`` (a-posteriori unit-weight σ), ``n_params_``.
    """

    def __init__(self, order: int = 1, height: bool = False, incidence: bool = False, ridge: float = 1e-6):
        self.order = order
        self.height = height
        self.incidence = incidence
        self.ridge = ridge

    def _design(self, xp, cols) -> list:
        u = (_as_float64(xp, cols["x_km"]) - self.centre_["x_km"]) / self.scale_["x_km"]
        v = (_as_float64(xp, cols["y_km"]) - self.centre_["y_km"]) / self.scale_["y_km"]
        terms = []
        for i, j in _poly_powers(int(self.order)):
            if i == 0 and j == 0:
                terms.append(xp.ones_like(u))
            else:
                terms.append(u ** i * v ** j)
        for name, flag in (("height_m", self.height), ("incidence_deg", self.incidence)):
            if flag:
                terms.append((_as_float64(xp, cols[name]) - self.centre_[name]) / self.scale_[name])
        return terms

    def fit(self, X, y, sample_weight=None):
        if int(self.order) not in (0, 1, 2, 3):
            raise AdjustmentError(f"Polynomial order must be 0-3, got {self.order}.", field="order",
                                  fix="choose poly0, poly1, poly2 or poly3")
        cols = self._columns(X)
        y, w = _check_target(y, sample_weight, len(cols["x_km"]))
        xy_span = max(float(np.ptp(cols["x_km"])), float(np.ptp(cols["y_km"])), 1.0) / 2.0
        self.centre_, self.scale_ = {}, {}
        for name, v in cols.items():
            self.centre_[name] = float(np.mean(v))
            self.scale_[name] = xy_span if name in ("x_km", "y_km") else max(float(np.std(v)), 1e-6)
        A = np.stack(self._design(np, cols), axis=1)
        self.n_params_ = A.shape[1]
        _check_rank(A, w, f"poly{self.order}" + ("+dem" if self.height else "") + ("+inc" if self.incidence else ""))
        # Relative weights keep the ridge meaningful whatever the absolute σ of the stations.
        wn = w / np.mean(w)
        coef, cov, ok = _weighted_lstsq(A, y, wn, float(self.ridge))
        if not ok or not np.all(np.isfinite(coef)):
            raise AdjustmentError("Polynomial surface could not be determined (singular normal matrix).",
                                  field="stations", fix="use a lower-order candidate or add stations")
        r = y - A @ coef
        dof = A.shape[0] - A.shape[1]
        # With inverse-variance weights the unit-weight variance is Σ w r²/dof (≥ 1 assumed: σ are never
        # shrunk below their stated values); the covariance is then scaled from the relative weights.
        s0sq = float(np.sum(w * r * r) / dof) if dof > 0 else 1.0
        s0sq = max(s0sq, 1.0) if sample_weight is not None else (s0sq if dof > 0 else float(np.var(y) + 1.0))
        self.coef_ = coef
        self.coef_cov_ = cov * s0sq / float(np.mean(w)) if sample_weight is not None else cov * s0sq
        self.sigma0_ = math.sqrt(s0sq)
        self.n_features_in_ = len(cols)
        return self

    def evaluate(self, features):
        xp = _namespace_of(features)
        terms = self._design(xp, features)
        out = xp.zeros_like(terms[0])
        for c, t in zip(self.coef_, terms):
            out = out + float(c) * t
        return out

    def evaluate_std(self, features):
        xp = _namespace_of(features)
        T = xp.stack(self._design(xp, features), axis=-1)  # (N, p)
        C = backend.asarray(self.coef_cov_, xp=xp, dtype=xp.float64)
        var = xp.sum(xp.matmul(T, C) * T, axis=-1)
        return xp.sqrt(xp.maximum(var, 0.0))


# --------------------------------------------------------------------------------------------------------------
# Gaussian process (kriging) with a polynomial trend
# --------------------------------------------------------------------------------------------------------------
def _matern(xp, d, nu: float):
    """Matérn correlation of the scaled distance ``d`` (distance / length scale)."""
    if nu == 0.5:
        return xp.exp(-d)
    if nu == 1.5:
        s = math.sqrt(3.0) * d
        return (1.0 + s) * xp.exp(-s)
    if nu == 2.5:
        s = math.sqrt(5.0) * d
        return (1.0 + s + s * s / 3.0) * xp.exp(-s)
    return xp.exp(-0.5 * d * d)  # nu = inf: squared exponential


class GaussianProcessSurface(SurfaceModel):
    """Gaussian-process (kriging) surface: polynomial trend + stationary Matérn field + white noise.

    The trend (order ``trend_order``, weighted least squares) is removed first; the residual field is fitted
    with :class:`sklearn.gaussian_process.GaussianProcessRegressor`, kernel ``C·Matern(ℓ, ν) + White`` whose
    amplitude, length scale ℓ (km) and nugget are chosen by maximising the marginal likelihood. Station
    variances 1/w enter as the per-sample ``alpha``. :meth:`evaluate_std` is the posterior 1-σ of the surface
    (signal only, the nugget is excluded) plus the trend's parameter uncertainty.

    Fitted attributes: ``trend_``, ``gp_``, ``length_scale_km_``, ``amplitude_`` (mm/yr), ``nugget_`` (mm/yr).
    """

    def __init__(self, trend_order: int = 1, nu: float = 1.5, n_restarts_optimizer: int = 0,
                 random_state: int | None = 0):
        self.trend_order = trend_order
        self.nu = nu
        self.n_restarts_optimizer = n_restarts_optimizer
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        cols = self._columns(X)
        y, w = _check_target(y, sample_weight, len(cols["x_km"]))
        self.trend_ = PolynomialSurface(order=self.trend_order).fit(X, y, sample_weight)
        r = y - self.trend_.predict(X)
        P = np.column_stack([cols["x_km"], cols["y_km"]])
        span = max(float(np.ptp(P[:, 0])), float(np.ptp(P[:, 1])), 1.0)
        var = max(float(np.var(r)), 1e-6)
        kernel = (ConstantKernel(var, (var * 1e-4, var * 1e2))
                  * Matern(length_scale=span / 5.0, length_scale_bounds=(span / 100.0, span * 10.0), nu=self.nu)
                  + WhiteKernel(var * 0.1, (var * 1e-6, var * 10.0)))
        alpha = 1.0 / w if sample_weight is not None else np.full(len(y), 1e-8)
        gp = GaussianProcessRegressor(kernel=kernel, alpha=alpha, normalize_y=False,
                                      n_restarts_optimizer=self.n_restarts_optimizer,
                                      random_state=self.random_state)
        with warnings.catch_warnings(), _validated_fit():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gp.fit(P, r)
        self.gp_ = gp
        k = gp.kernel_
        self.amplitude_ = math.sqrt(float(k.k1.k1.constant_value))
        self.length_scale_km_ = float(k.k1.k2.length_scale)
        self.nugget_ = math.sqrt(float(k.k2.noise_level))
        self.train_xy_ = P
        self.dual_coef_ = np.asarray(gp.alpha_, dtype=np.float64).reshape(-1)
        Linv = np.linalg.solve(gp.L_, np.eye(len(r)))
        self.K_inv_ = Linv.T @ Linv
        self.n_features_in_ = len(cols)
        return self

    def _cross_cov(self, xp, features):
        x = _as_float64(xp, features["x_km"])
        yy = _as_float64(xp, features["y_km"])
        P = backend.asarray(self.train_xy_, xp=xp, dtype=xp.float64)
        dx = x[:, None] - P[None, :, 0]
        dy = yy[:, None] - P[None, :, 1]
        d = xp.sqrt(dx * dx + dy * dy) / self.length_scale_km_
        return self.amplitude_ ** 2 * _matern(xp, d, float(self.nu))

    def _fused(self, xp, features, with_var: bool):
        """(mean, var) by the fused CPU kernel for NumPy inputs with numba, else None (array-API form)."""
        from ..kernels import cpu as _kcpu

        if not _kcpu.fused_for(xp):
            return None
        return _kcpu.matern_gp_surface(_as_float64(xp, features["x_km"]), _as_float64(xp, features["y_km"]),
                                       self.train_xy_[:, 0], self.train_xy_[:, 1], self.dual_coef_,
                                       self.amplitude_, self.length_scale_km_, float(self.nu),
                                       self.K_inv_ if with_var else None)

    def evaluate(self, features):
        xp = _namespace_of(features)
        fused = self._fused(xp, features, False)
        if fused is not None:  # one pass per pixel instead of a (pixels × stations) covariance array
            return self.trend_.evaluate(features) + fused[0]
        Ks = self._cross_cov(xp, features)
        a = backend.asarray(self.dual_coef_, xp=xp, dtype=xp.float64)
        return self.trend_.evaluate(features) + xp.sum(Ks * a, axis=-1)

    def evaluate_std(self, features):
        xp = _namespace_of(features)
        fused = self._fused(xp, features, True)
        if fused is not None:
            tstd = self.trend_.evaluate_std(features)
            return xp.sqrt(xp.maximum(fused[1], 0.0) + tstd * tstd)
        Ks = self._cross_cov(xp, features)
        Kinv = backend.asarray(self.K_inv_, xp=xp, dtype=xp.float64)
        var = self.amplitude_ ** 2 - xp.sum(xp.matmul(Ks, Kinv) * Ks, axis=-1)
        tstd = self.trend_.evaluate_std(features)
        return xp.sqrt(xp.maximum(var, 0.0) + tstd * tstd)


# --------------------------------------------------------------------------------------------------------------
# Smoothing thin-plate spline (scipy RBFInterpolator), smoothing by GCV
# --------------------------------------------------------------------------------------------------------------
class ThinPlateSplineSurface(SurfaceModel):
    """Smoothing thin-plate spline (:class:`scipy.interpolate.RBFInterpolator`, ``kernel="thin_plate_spline"``,
    plane as the polynomial part) in frame-centred coordinates scaled to about [-1, 1].

    ``smoothing=None`` chooses the smoothing λ on a log grid by weighted generalised cross-validation,
    GCV(λ) = n·Σw(y − ŷ)²/Σw / (n − tr H)², H the hat matrix (the spline is a linear smoother, so H comes from
    fitting the identity). Station weights enter as per-station smoothing λ·mean(w)/wᵢ. λ → ∞ tends to the
    weighted plane.

    Fitted attributes: ``interpolator_``, ``smoothing_``, ``effective_dof_`` (tr H), ``centre_``, ``scale_``.
    """

    def __init__(self, smoothing: float | None = None, n_grid: int = 17):
        self.smoothing = smoothing
        self.n_grid = n_grid

    def _scaled(self, xp, cols):
        u = (_as_float64(xp, cols["x_km"]) - float(self.centre_[0])) / float(self.scale_)
        v = (_as_float64(xp, cols["y_km"]) - float(self.centre_[1])) / float(self.scale_)
        return u, v

    def fit(self, X, y, sample_weight=None):
        from scipy.interpolate import RBFInterpolator

        cols = self._columns(X)
        y, w = _check_target(y, sample_weight, len(cols["x_km"]))
        n = len(y)
        P0 = np.column_stack([cols["x_km"], cols["y_km"]])
        self.centre_ = P0.mean(axis=0)
        self.scale_ = max(float(np.ptp(P0[:, 0])), float(np.ptp(P0[:, 1])), 1.0) / 2.0
        _check_rank(np.column_stack([np.ones(n), P0 - self.centre_]), w, "tps (its plane part)")
        if n < 4:
            raise AdjustmentError(f"A thin-plate spline needs at least 4 stations, got {n}.", field="stations",
                                  fix="use poly0/poly1 for this frame")
        u, v = self._scaled(np, cols)
        P = np.column_stack([u, v])
        rel = np.mean(w) / w

        def fit_with(lam, d):
            return RBFInterpolator(P, d, kernel="thin_plate_spline", smoothing=lam * rel, degree=1)

        if self.smoothing is None:
            best = (np.inf, None, None)
            eye = np.eye(n)
            for lam in np.logspace(-6, 2, int(self.n_grid)):
                try:
                    H = fit_with(lam, eye)(P)
                except np.linalg.LinAlgError:
                    continue
                tr = float(np.trace(H))
                if n - tr <= 1e-6 * n:
                    continue
                res = y - H @ y
                gcv = n * float(np.sum(w * res * res) / np.sum(w)) / (n - tr) ** 2 * n
                if gcv < best[0]:
                    best = (gcv, lam, tr)
            if best[1] is None:
                raise AdjustmentError("Thin-plate spline smoothing could not be chosen (all systems singular).",
                                      field="stations", fix="use a polynomial candidate for this frame")
            lam, tr = best[1], best[2]
        else:
            lam = float(self.smoothing)
            tr = float(np.trace(fit_with(lam, np.eye(n))(P)))
        self.smoothing_ = float(lam)
        self.effective_dof_ = tr
        self.interpolator_ = fit_with(lam, y)
        self.n_features_in_ = len(cols)
        return self

    def evaluate(self, features):
        xp = _namespace_of(features)
        it = self.interpolator_
        try:  # scipy's fitted coefficients: kernel part (n,) then polynomial part, monomials of shifted/scaled xy
            coeffs = np.asarray(it._coeffs, dtype=np.float64).reshape(-1)
            shift = np.asarray(it._shift, dtype=np.float64)
            pscale = np.asarray(it._scale, dtype=np.float64)
            powers = np.asarray(it.powers)
            nodes = np.asarray(it.y, dtype=np.float64)
            eps = float(it.epsilon)
        except AttributeError:  # a future scipy without these: evaluate on the host instead
            u, v = self._scaled(np, {k: backend.to_numpy(features[k]) for k in ("x_km", "y_km")})
            xp_out = backend.asarray(self.interpolator_(np.column_stack([u, v])), xp=xp, dtype=xp.float64)
            return xp_out
        u, v = self._scaled(xp, features)
        n = nodes.shape[0]
        from ..kernels import cpu as _kcpu

        if _kcpu.fused_for(xp):  # one fused pass per pixel instead of (pixels × nodes) arrays
            out = _kcpu.thin_plate_kernel_sum(u, v, nodes, coeffs[:n], eps)
        else:
            N = backend.asarray(nodes * eps, xp=xp, dtype=xp.float64)
            du = u[:, None] * eps - N[None, :, 0]
            dv = v[:, None] * eps - N[None, :, 1]
            r = xp.sqrt(du * du + dv * dv)
            phi = xp.where(r > 0, r * r * xp.log(xp.where(r > 0, r, 1.0)), 0.0)
            out = xp.sum(phi * backend.asarray(coeffs[:n], xp=xp, dtype=xp.float64), axis=-1)
        us = (u - float(shift[0])) / float(pscale[0])
        vs = (v - float(shift[1])) / float(pscale[1])
        for c, (pu, pv) in zip(coeffs[n:], powers):
            out = out + float(c) * (us ** int(pu)) * (vs ** int(pv))
        return out


# --------------------------------------------------------------------------------------------------------------
# EGMS/GMTSAR-style low-pass surface
# --------------------------------------------------------------------------------------------------------------
class LowPassSurface(SurfaceModel):
    """Plane + Gaussian low-pass of the station residuals (the EGMS/GMTSAR "surface and filter" idea).

    A weighted plane (``trend_order``) is removed; the residuals are then averaged with Gaussian weights
    exp(−d²/2σ²), σ = wavelength/2, where the wavelength defaults to ``spacing_factor`` × the mean
    nearest-neighbour station spacing. ``prior_weight`` (in units of one average station) pulls the filtered
    field back to the trend where no station is near, instead of extrapolating the nearest one.

    Fitted attributes: ``trend_``, ``wavelength_km_``, ``train_xy_``, ``train_resid_``, ``train_w_``.
    """

    def __init__(self, wavelength_km: float | None = None, spacing_factor: float = 1.0, trend_order: int = 1,
                 prior_weight: float = 0.1):
        self.wavelength_km = wavelength_km
        self.spacing_factor = spacing_factor
        self.trend_order = trend_order
        self.prior_weight = prior_weight

    def fit(self, X, y, sample_weight=None):
        from scipy.spatial import cKDTree

        cols = self._columns(X)
        y, w = _check_target(y, sample_weight, len(cols["x_km"]))
        self.trend_ = PolynomialSurface(order=self.trend_order).fit(X, y, sample_weight)
        P = np.column_stack([cols["x_km"], cols["y_km"]])
        if self.wavelength_km is None:
            if len(y) < 2:
                raise AdjustmentError("The low-pass surface needs at least 2 stations to set its wavelength.",
                                      field="stations", fix="give wavelength_km or use poly0")
            d, _ = cKDTree(P).query(P, k=2)
            self.wavelength_km_ = float(self.spacing_factor) * max(float(np.mean(d[:, 1])), 1e-3)
        else:
            self.wavelength_km_ = float(self.wavelength_km)
        self.train_xy_ = P
        self.train_resid_ = y - self.trend_.predict(X)
        self.train_w_ = w / np.mean(w)
        self.n_features_in_ = len(cols)
        return self

    def evaluate(self, features):
        xp = _namespace_of(features)
        x = _as_float64(xp, features["x_km"])
        yy = _as_float64(xp, features["y_km"])
        sigma = self.wavelength_km_ / 2.0
        from ..kernels import cpu as _kcpu

        if _kcpu.fused_for(xp):  # one fused pass per pixel instead of (pixels × stations) arrays
            return self.trend_.evaluate(features) + _kcpu.gaussian_weighted_average(
                x, yy, self.train_xy_[:, 0], self.train_xy_[:, 1], self.train_w_, self.train_resid_, sigma,
                float(self.prior_weight))
        P = backend.asarray(self.train_xy_, xp=xp, dtype=xp.float64)
        dx = (x[:, None] - P[None, :, 0]) / sigma
        dy = (yy[:, None] - P[None, :, 1]) / sigma
        K = xp.exp(-0.5 * (dx * dx + dy * dy)) * backend.asarray(self.train_w_, xp=xp, dtype=xp.float64)
        num = xp.sum(K * backend.asarray(self.train_resid_, xp=xp, dtype=xp.float64), axis=-1)
        den = xp.sum(K, axis=-1) + float(self.prior_weight)
        return self.trend_.evaluate(features) + num / den


# --------------------------------------------------------------------------------------------------------------
# Tree ensembles (host)
# --------------------------------------------------------------------------------------------------------------
class TreeEnsembleSurface(SurfaceModel):
    """Random forest (``method="rf"``) or gradient boosting (``"gbr"``) on the residuals of a plane trend.

    Trees cannot extrapolate a trend, hence the plane first. Fitting and prediction run on the host with
    scikit-learn (50-200 stations per frame make a GPU pointless for the fit); :meth:`evaluate` copies the
    pixel features to the host and the result back.

    Fitted attributes: ``trend_``, ``ensemble_``.
    """

    dense_array_api = False

    def __init__(self, method: str = "rf", height: bool = False, trend_order: int = 1, n_estimators: int = 100,
                 random_state: int | None = 0):
        self.method = method
        self.height = height
        self.trend_order = trend_order
        self.n_estimators = n_estimators
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor

        cols = self._columns(X)
        y, w = _check_target(y, sample_weight, len(cols["x_km"]))
        self.trend_ = PolynomialSurface(order=self.trend_order).fit(X, y, sample_weight)
        r = y - self.trend_.predict(X)
        F = np.column_stack([cols[k] for k in self._feature_names()])
        if self.method == "rf":
            est = RandomForestRegressor(n_estimators=self.n_estimators, min_samples_leaf=2,
                                        random_state=self.random_state, n_jobs=1)
        elif self.method == "gbr":
            est = GradientBoostingRegressor(n_estimators=self.n_estimators, max_depth=2, learning_rate=0.05,
                                            subsample=0.8, random_state=self.random_state)
        else:
            raise AdjustmentError(f"Unknown tree ensemble {self.method!r}.", field="method", fix="use 'rf' or 'gbr'")
        with _validated_fit():
            est.fit(F, r, sample_weight=w / np.mean(w))
        self.ensemble_ = est
        self.n_features_in_ = len(cols)
        return self

    def evaluate(self, features):
        xp = _namespace_of(features)
        F = np.column_stack([np.asarray(backend.to_numpy(features[k]), dtype=np.float64)
                             for k in self._feature_names()])
        tree = backend.asarray(self.ensemble_.predict(F), xp=xp, dtype=xp.float64)
        return self.trend_.evaluate(features) + tree


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------
_POLY = re.compile(r"^poly([0-3])((?:\+dem|\+inc)*)$")

_NONPARAMETRIC = {
    # name: (factory, complexity rank, minimum stations, features)
    "lowpass": (lambda: LowPassSurface(), 20.0, 6, ("x_km", "y_km")),
    "tps": (lambda: ThinPlateSplineSurface(), 21.0, 8, ("x_km", "y_km")),
    "gp": (lambda: GaussianProcessSurface(), 22.0, 10, ("x_km", "y_km")),
    "gbr": (lambda: TreeEnsembleSurface(method="gbr"), 30.0, 20, ("x_km", "y_km")),
    "rf": (lambda: TreeEnsembleSurface(method="rf"), 31.0, 20, ("x_km", "y_km")),
}


def _parse_poly(name: str):
    m = _POLY.match(name)
    if not m:
        return None
    extras = m.group(2)
    dem, inc = "+dem" in extras, "+inc" in extras
    if extras not in ("", "+dem", "+inc", "+dem+inc"):
        return None
    return int(m.group(1)), dem, inc


def candidate_names() -> list[str]:
    """All names the registry understands."""
    polys = [f"poly{k}{e}" for k in range(4) for e in ("", "+dem", "+inc", "+dem+inc")]
    return polys + list(_NONPARAMETRIC)


def _unknown(name: str) -> AdjustmentError:
    return AdjustmentError(f"Unknown adjustment candidate {name!r}.", field="adjust.candidates",
                           fix=f"choose from {', '.join(candidate_names())}")


def make_candidate(name: str) -> SurfaceModel:
    """A fresh, unfitted estimator for registry name ``name`` (e.g. ``"poly2+dem"``, ``"gp"``)."""
    p = _parse_poly(name)
    if p is not None:
        return PolynomialSurface(order=p[0], height=p[1], incidence=p[2])
    if name in _NONPARAMETRIC:
        return _NONPARAMETRIC[name][0]()
    raise _unknown(name)


def candidate_complexity(name: str) -> float:
    """Complexity rank used by the one-standard-error rule (lower = simpler).

    Polynomials rank by their number of parameters ((k+1)(k+2)/2 plus one per DEM/incidence term), so
    poly0 < poly1 < poly1+dem < poly1+dem+inc < poly2 < ... < poly3+dem+inc; the non-parametric surfaces come
    after every polynomial, in the order lowpass < tps < gp, then the tree ensembles gbr < rf.
    """
    p = _parse_poly(name)
    if p is not None:
        k, dem, inc = p
        return (k + 1) * (k + 2) / 2 + dem + inc + 0.1 * inc  # dem before inc at equal size
    if name in _NONPARAMETRIC:
        return _NONPARAMETRIC[name][1]
    raise _unknown(name)


def candidate_min_stations(name: str) -> int:
    """Fewest stations a frame needs for ``name`` to be cross-validated (parameters + 2 for polynomials)."""
    p = _parse_poly(name)
    if p is not None:
        k, dem, inc = p
        return max(2, (k + 1) * (k + 2) // 2 + dem + inc + 2)
    if name in _NONPARAMETRIC:
        return _NONPARAMETRIC[name][2]
    raise _unknown(name)


def candidate_features(name: str) -> tuple[str, ...]:
    """Feature columns ``name`` needs."""
    return make_candidate(name).required_features


def candidate_is_smooth(name: str) -> bool:
    """False for the tree ensembles (piecewise-constant surfaces), True for every other candidate."""
    if _parse_poly(name) is not None:
        return True
    if name in _NONPARAMETRIC:
        return name not in ("gbr", "rf")
    raise _unknown(name)
