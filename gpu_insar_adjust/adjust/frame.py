"""Per-frame adjustment driver: residuals → outlier screening → spatial CV → one model → dense correction.

:func:`adjust_frame` is the stage function; :class:`AdjustConfig` holds its parameters (mounted in the global
configuration as ``adjust``). The correction is evaluated exactly at every pixel on the frame's own array
backend (NumPy or CuPy); its 1-σ is the model's closed form where one exists (polynomial parameter covariance,
Gaussian-process posterior), otherwise the delete-group jackknife spread of the surfaces refitted on the CV
training folds, computed on a coarse grid (≤ ``std_grid`` nodes a side) and bilinearly interpolated.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, field_validator
from threadpoolctl import threadpool_limits

from .. import backend
from ..errors import AdjustmentError
from . import models as _models
from .residuals import frame_origin, local_xy_km, merge_colocated, station_residuals
from .selection import cross_validate_candidates, flag_outliers, make_splitter, select_model, weighted_rmse

__all__ = ["AdjustConfig", "FrameAdjustment", "adjust_frame", "pixel_features", "evaluate_on_frame"]

log = logging.getLogger(__name__)


class AdjustConfig(BaseModel):
    """Parameters of the per-frame adjustment (the ``adjust`` section of the configuration)."""

    model_config = ConfigDict(extra="forbid")

    candidates: list[str] = Field(default_factory=lambda: list(_models.DEFAULT_CANDIDATES),
                                  description="candidate surfaces to cross-validate (registry names: poly0..poly3, "
                                              "polyK+dem, polyK+inc, polyK+dem+inc, lowpass, tps, gp, gbr, rf)")
    window_m: float = Field(500.0, gt=0, description="width of the InSAR window around each station, m")
    min_valid_fraction: float = Field(0.5, ge=0, le=1, description="drop stations whose window has fewer valid "
                                                                   "pixels than this fraction")
    use_horizontal_only: bool = Field(False, description="use stations whose GNSS LOS lacks the vertical")
    cv: Literal["auto", "loo", "block"] = Field("auto", description="cross-validation: leave-one-station-out, "
                                                                    "spatial block K-fold, or auto by station count")
    loo_below: int = Field(30, ge=2, description="auto: leave-one-station-out below this many stations")
    block_size_km: float | None = Field(None, gt=0, description="block size of the spatial K-fold, km (None: 1.5 × "
                                                                "median station spacing)")
    n_splits: int = Field(5, ge=2, description="folds of the spatial block K-fold")
    min_stations: dict[str, int] = Field(default_factory=dict, description="override the minimum number of "
                                                                           "stations per candidate")
    outlier_threshold: float = Field(3.5, gt=0, description="flag stations beyond this many robust (MAD) sigmas of "
                                                            "their leave-one-out residual")
    outlier_max_fraction: float = Field(0.2, ge=0, le=0.5, description="flag at most this fraction of stations")
    one_se_rule: bool = Field(False, description="choose the simplest candidate within one standard error of the "
                                                 "best CV score (False: the lowest CV score)")
    paired_se: bool = Field(True, description="one-SE rule on the paired per-station differences of the CV errors "
                                              "(False: the unpaired SE of the best score)")
    max_overshoot: float = Field(1.0, gt=0, description="reject a candidate whose surface (its x/y part for models "
                                                        "with DEM/incidence terms) leaves the range of the station "
                                                        "differences by more than this × that range")
    max_feature_extrapolation: float = Field(2.0, gt=0, description="reject a DEM/incidence term extrapolated "
                                                                    "beyond the stations' range of that feature by "
                                                                    "more than this × the stations' span of it")
    std_grid: int = Field(64, ge=4, description="coarse grid nodes per side for the jackknife σ of the correction "
                                                "and for the check that the chosen surface stays in range")
    chunk_pixels: int = Field(1 << 16, ge=1024, description="pixels evaluated per block (bounds memory)")

    @field_validator("candidates")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one candidate is needed (e.g. ['poly0', 'poly1'])")
        known = set(_models.candidate_names())
        bad = [c for c in v if c not in known]
        if bad:
            raise ValueError(f"unknown candidate(s) {bad}; choose from {sorted(known)}")
        return v

    @field_validator("min_stations")
    @classmethod
    def _known_minimum(cls, v: dict[str, int]) -> dict[str, int]:
        # a misspelt name would leave its candidate at the default minimum without a word
        known = set(_models.candidate_names())
        bad = sorted(c for c in v if c not in known)
        if bad:
            raise ValueError(f"min_stations names unknown candidate(s) {bad}; choose from {sorted(known)}")
        low = sorted(c for c, n in v.items() if n < 1)
        if low:
            raise ValueError(f"min_stations of {low} must be at least 1 station")
        return v


@dataclass
class FrameAdjustment:
    """Result of :func:`adjust_frame`.

    ``correction``, ``correction_std`` and ``los_adjusted = los_velocity − correction`` are (y, x) float32
    DataArrays in mm/yr on the frame's grid and array backend. ``report`` is JSON-serialisable. ``residuals``
    is the station table with ``used``, ``flagged`` and ``fitted`` (model value, mm/yr) columns; ``model`` the
    fitted estimator.
    """

    correction: xr.DataArray
    correction_std: xr.DataArray
    los_adjusted: xr.DataArray
    report: dict
    model: Any = None
    residuals: pd.DataFrame = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------------------------
# Dense evaluation
# --------------------------------------------------------------------------------------------------------------
def _frame_xp(frame):
    return backend.namespace(frame["los_velocity"].data)


def pixel_features(frame, names, origin, xp, rows=None, cols=None) -> dict:
    """1-D feature arrays (namespace ``xp``) of the pixels in ``rows`` × ``cols`` (index arrays; all if None)."""
    lon = np.asarray(frame["x"], dtype=np.float64)
    lat = np.asarray(frame["y"], dtype=np.float64)
    rows = np.arange(lat.size) if rows is None else np.asarray(rows)
    cols = np.arange(lon.size) if cols is None else np.asarray(cols)
    LAT = backend.asarray(lat[rows], xp=xp, dtype=xp.float64)[:, None]
    LON = backend.asarray(lon[cols], xp=xp, dtype=xp.float64)[None, :]
    shape = (rows.size, cols.size)
    # on the axes, broadcast by the arithmetic: the radii and cos φ once per row instead of once per pixel
    # (the same operations on the same numbers: bit for bit the per-pixel evaluation)
    x, y = local_xy_km(LON, LAT, origin[0], origin[1], xp=xp)
    out = {"x_km": xp.reshape(xp.broadcast_to(x, shape), (-1,)),
           "y_km": xp.reshape(xp.broadcast_to(y, shape), (-1,))}

    def _sub(var):
        a = backend.asarray(frame[var].data, xp=xp)
        a = xp.take(a, backend.asarray(rows, xp=xp, dtype=xp.int64), axis=0)
        a = xp.take(a, backend.asarray(cols, xp=xp, dtype=xp.int64), axis=1)
        return xp.reshape(xp.astype(a, xp.float64), (-1,))

    if "height_m" in names:
        out["height_m"] = _sub("dem")
    if "incidence_deg" in names:
        u = xp.clip(_sub("los_u"), -1.0, 1.0)
        out["incidence_deg"] = xp.acos(u) * (180.0 / math.pi)
    return out


def evaluate_on_frame(model, frame, origin, *, std: bool = False, chunk_pixels: int = 1 << 16):
    """The fitted surface (or its closed-form σ) at every pixel: (y, x) float64 array of the frame's backend."""
    xp = _frame_xp(frame)
    ny, nx = frame.sizes["y"], frame.sizes["x"]
    step = max(1, int(chunk_pixels) // nx)
    names = model.required_features
    parts = []
    for r0 in range(0, ny, step):
        feats = pixel_features(frame, names, origin, xp, rows=np.arange(r0, min(r0 + step, ny)))
        v = model.evaluate_std(feats) if std else model.evaluate(feats)
        if v is None:
            return None
        parts.append(xp.reshape(v, (-1, nx)))
    return xp.concat(parts, axis=0)


def _interp_axis(xp, a, coarse_idx: np.ndarray, n: int, axis: int):
    """Linear interpolation along ``axis`` from nodes at integer positions ``coarse_idx`` to 0..n-1."""
    fine = np.arange(n, dtype=np.float64)
    k = np.clip(np.searchsorted(coarse_idx, fine, side="right") - 1, 0, max(coarse_idx.size - 2, 0))
    if coarse_idx.size == 1:
        return xp.take(a, backend.asarray(np.zeros(n, dtype=np.int64), xp=xp), axis=axis)
    i0, i1 = coarse_idx[k], coarse_idx[k + 1]
    t = (fine - i0) / (i1 - i0)
    from ..kernels import cpu as _kcpu

    if _kcpu.fused_for(xp) and a.ndim == 2:  # one pass instead of two gathered copies and three temporaries
        return _kcpu.interp_lines(a, k, t, n, axis)
    a0 = xp.take(a, backend.asarray(k, xp=xp, dtype=xp.int64), axis=axis)
    a1 = xp.take(a, backend.asarray(k + 1, xp=xp, dtype=xp.int64), axis=axis)
    tt = backend.asarray(t, xp=xp, dtype=xp.float64)
    tt = tt[:, None] if axis == 0 else tt[None, :]
    return a0 * (1.0 - tt) + a1 * tt


def _jackknife_std(name, X, y, w, splits, frame, origin, n_grid: int):
    """Delete-group jackknife σ of the surface over the CV training folds, coarse grid → bilinear."""
    xp = _frame_xp(frame)
    ny, nx = frame.sizes["y"], frame.sizes["x"]
    rows = np.unique(np.linspace(0, ny - 1, min(ny, n_grid)).round().astype(np.int64))
    cols = np.unique(np.linspace(0, nx - 1, min(nx, n_grid)).round().astype(np.int64))
    names = _models.candidate_features(name)
    feats = pixel_features(frame, names, origin, xp, rows=rows, cols=cols)
    surfaces = []
    for train, _ in splits:
        m = _models.make_candidate(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.fit(X.iloc[train], y[train], w[train])
        surfaces.append(xp.reshape(m.evaluate(feats), (rows.size, cols.size)))
    S = xp.stack(surfaces, axis=0)
    k = len(surfaces)
    mean = xp.mean(S, axis=0)
    var = (k - 1) / k * xp.sum((S - mean) ** 2, axis=0)
    sd = xp.sqrt(var)
    sd = _interp_axis(xp, sd, rows, ny, axis=0)
    return _interp_axis(xp, sd, cols, nx, axis=1)


def _select_plausible(scores, X, y, w, frame, origin, cfg) -> tuple[str | None, str | None]:
    """Select by CV, rejecting candidates whose surface runs away between or beyond the stations.

    Cross-validation only tests a surface where stations are. Two checks on the frame's valid pixels (coarse
    grid) guard what it cannot see; a failing candidate is marked skipped ("extrapolates") and the choice is
    made again:

    * the coordinate part of the surface (for polynomial + DEM/incidence models: with those features held at
      the stations' mean, so only the x/y polynomial varies) may leave the range of the station differences by
      at most ``max_overshoot`` × that range — a cubic swinging up at an unconstrained corner fails;
    * a linear DEM/incidence term may be extrapolated beyond the span of that feature at the stations by at
      most ``max_feature_extrapolation`` × that span. Within it the term's full size counts: height-correlated
      delay over mountains legitimately exceeds what plain stations show, so the surface range is not a test
      of it; a height coefficient fitted on stations spanning 50 m and applied to 1200 m peaks is.
    """
    xp = _frame_xp(frame)
    ny, nx = frame.sizes["y"], frame.sizes["x"]
    rows = np.unique(np.linspace(0, ny - 1, min(ny, cfg.std_grid)).round().astype(np.int64))
    cols = np.unique(np.linspace(0, nx - 1, min(nx, cfg.std_grid)).round().astype(np.int64))
    los = backend.to_numpy(frame["los_velocity"].data)
    valid = np.isfinite(los[np.ix_(rows, cols)]).reshape(-1)
    lo, hi = float(np.min(y)), float(np.max(y))
    allow = cfg.max_overshoot * max(hi - lo, 1.0)
    while True:
        try:
            chosen, reason = select_model(scores, one_se_rule=cfg.one_se_rule, sample_weight=w,
                                          paired=cfg.paired_se)
        except AdjustmentError:
            return None, None
        if not valid.any() or len(y) < 2:
            return chosen, reason
        m = _models.make_candidate(chosen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.fit(X, y, w)
        feats = pixel_features(frame, m.required_features, origin, xp, rows=rows, cols=cols)
        extra = [f for f in m.required_features if f not in ("x_km", "y_km")]
        why = None
        for f in extra:
            fp = np.asarray(backend.to_numpy(feats[f]), dtype=np.float64)[valid]
            fp = fp[np.isfinite(fp)]
            fs = np.asarray(X[f], dtype=np.float64)
            span = max(float(np.ptp(fs)), 1e-9)
            beyond = max(float(fp.max()) - float(fs.max()), float(fs.min()) - float(fp.min()), 0.0) if fp.size else 0.0
            if beyond > cfg.max_feature_extrapolation * span:
                why = (f"extrapolates: {f} at the pixels reaches {beyond:.0f} beyond the stations' range "
                       f"[{fs.min():.0f}, {fs.max():.0f}] (> {cfg.max_feature_extrapolation:g} × its span)")
                break
        if why is None:
            if extra and isinstance(m, _models.PolynomialSurface):
                feats = dict(feats)
                for f in extra:
                    feats[f] = xp.full_like(feats["x_km"], float(m.centre_[f]))
            surf = np.asarray(backend.to_numpy(m.evaluate(feats)), dtype=np.float64)[valid]
            surf = surf[np.isfinite(surf)]
            over = max(float(surf.max()) - hi, lo - float(surf.min()), 0.0) if surf.size else 0.0
            if over > allow:
                why = (f"extrapolates: surface{' (coordinate part)' if extra else ''} leaves the station range "
                       f"[{lo:.1f}, {hi:.1f}] mm/yr by {over:.1f} mm/yr inside the frame")
        if why is None:
            return chosen, reason
        scores[chosen].skipped = why


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------
def _stations_in_frame(stations: pd.DataFrame, frame, horizontal_only: bool = False) -> pd.DataFrame:
    if "gnss_los" in stations.columns:
        return stations
    from ..geodesy.gnss_los import gnss_in_frame

    # a table already in an ITRF realisation (the pipeline's, by the run's plate model) stays in it: the
    # frames are referenced in the realisation the network and the horizontal field use
    model = stations.attrs.get("plate_model") or "ITRF2014"
    return gnss_in_frame(stations, frame, vertical="horizontal_only" if horizontal_only else "require",
                         model=model)


def _rms(a) -> float | None:
    a = np.asarray(a, dtype=np.float64)
    return None if a.size == 0 else round(float(np.sqrt(np.mean(a * a))), 4)


def _model_parameters(model) -> dict:
    p: dict[str, Any] = {}
    if isinstance(model, _models.PolynomialSurface):
        p["coefficients"] = [round(float(c), 6) for c in model.coef_]
        p["sigma0"] = round(float(model.sigma0_), 4)
    if isinstance(model, _models.GaussianProcessSurface):
        p.update(length_scale_km=round(model.length_scale_km_, 3), amplitude=round(model.amplitude_, 4),
                 nugget=round(model.nugget_, 4))
    if isinstance(model, _models.ThinPlateSplineSurface):
        p.update(smoothing=float(model.smoothing_), effective_dof=round(model.effective_dof_, 3))
    if isinstance(model, _models.LowPassSurface):
        p["wavelength_km"] = round(model.wavelength_km_, 3)
    return p


def adjust_frame(frame: xr.Dataset, stations: pd.DataFrame, config: AdjustConfig | dict | None = None, *,
                 holdout: pd.DataFrame | None = None) -> FrameAdjustment:
    """Fit the best long-wavelength model of InSAR − GNSS in ``frame`` and remove it from every pixel.

    Parameters
    ----------
    frame
        Frame Dataset (docs/data-model.md), ``los_velocity`` mm/yr positive toward the satellite.
    stations
        GNSS stations: either already projected (``gnss_in_frame`` output with ``gnss_los``/``gnss_los_std``) or
        a Stations table, which is projected with :func:`gpu_insar_adjust.geodesy.gnss_los.gnss_in_frame`.
    config
        :class:`AdjustConfig` (or a dict of its fields); defaults when None.
    holdout
        Independent stations (same forms as ``stations``) never used in the fit; their RMSE before/after goes
        into the report.

    Returns
    -------
    FrameAdjustment

    Raises
    ------
    AdjustmentError
        No usable station in the frame (none inside, all windows invalid, all differences NaN).

    Fallbacks (documented, reported): with too few stations for every candidate, or stations that determine
    no plane (collinear), the simplest determinable model (poly1, else the offset poly0) is used and
    ``report["fallback"]`` says why; co-located stations are merged (``report["merged"]``).
    """
    t0 = time.perf_counter()
    cfg = AdjustConfig() if config is None else (AdjustConfig(**config) if isinstance(config, dict) else config)
    fid = str(frame.attrs.get("frame_id", "frame"))
    origin = frame_origin(frame)
    table_in = _stations_in_frame(stations, frame, cfg.use_horizontal_only)
    res, dropped = station_residuals(frame, table_in, window_m=cfg.window_m,
                                     min_valid_fraction=cfg.min_valid_fraction,
                                     use_horizontal_only=cfg.use_horizontal_only, origin=origin)
    if len(res) == 0:
        why = "; ".join(f"{d['station']}: {d['reason']}" for d in dropped[:8]) or "no station inside the frame"
        raise AdjustmentError(f"Frame {fid} has no usable GNSS station ({why}).",
                              file=frame.attrs.get("path"), field="stations",
                              fix="give GNSS stations inside the frame on valid pixels, or leave this frame to the "
                                  "network adjustment (its overlaps with adjusted frames)")
    res, merged = merge_colocated(res)

    available = ["x_km", "y_km"]
    if "dem" in frame.data_vars and np.all(np.isfinite(res["height_m"])):
        available.append("height_m")
    if "los_u" in frame.data_vars and np.all(np.isfinite(res["incidence_deg"])):
        available.append("incidence_deg")
    X = res[available].reset_index(drop=True)
    y = res["residual"].to_numpy(dtype=np.float64)
    w = res["weight"].to_numpy(dtype=np.float64)

    # The station-level fits (outlier screening, every candidate on every fold, the final fit) are small
    # (tens to hundreds of stations): BLAS threads only add hand-offs to them (8-11 % of the per-frame time on
    # two cores), and they would compete with frames adjusted in parallel processes
    with threadpool_limits(limits=1, user_api="blas"):
        keep, flagged = flag_outliers(X, y, w, threshold=cfg.outlier_threshold,
                                      max_fraction=cfg.outlier_max_fraction)
        for f in flagged:
            f["station"] = str(res["station"].iloc[f.pop("index")])
        Xk, yk, wk = X[keep].reset_index(drop=True), y[keep], w[keep]

        splitter, cv_info = make_splitter(Xk, cv=cfg.cv, loo_below=cfg.loo_below,
                                          block_size_km=cfg.block_size_km, n_splits=cfg.n_splits) \
            if len(yk) >= 2 else (None, {"scheme": "none"})
        scores = {}
        fallback = None
        if splitter is not None:
            scores = cross_validate_candidates(Xk, yk, wk, candidates=cfg.candidates, splitter=splitter,
                                               min_stations=cfg.min_stations, available_features=available)
        chosen, reason = _select_plausible(scores, Xk, yk, wk, frame, origin, cfg)
        if chosen is None:
            for name in ("poly1", "poly0"):
                try:
                    _models.make_candidate(name).fit(Xk, yk, wk)
                except AdjustmentError as exc:
                    fallback = str(exc).splitlines()[0]
                    continue
                chosen = name
                break
            fallback = (f"no candidate could be cross-validated with {len(yk)} station(s); fell back to {chosen}"
                        + (f" ({fallback})" if fallback else ""))
            reason = fallback
        model = _models.make_candidate(chosen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(Xk, yk, wk)

    corr = evaluate_on_frame(model, frame, origin, chunk_pixels=cfg.chunk_pixels)
    xp = _frame_xp(frame)
    std = evaluate_on_frame(model, frame, origin, std=True, chunk_pixels=cfg.chunk_pixels)
    std_method = "closed form (parameter covariance / GP posterior)"
    if std is None:
        splits = list(splitter.split(Xk, yk)) if splitter is not None else []
        if len(splits) >= 2:
            with threadpool_limits(limits=1, user_api="blas"):
                std = _jackknife_std(chosen, Xk, yk, wk, splits, frame, origin, cfg.std_grid)
            std_method = f"jackknife over {len(splits)} CV folds (coarse grid, bilinear)"
        else:
            std = xp.full(corr.shape, xp.nan, dtype=xp.float64)
            std_method = "unavailable (fewer than 2 CV folds)"

    los = frame["los_velocity"].data
    valid = xp.isfinite(los)
    n_valid = int(xp.count_nonzero(valid))
    n_bad = int(xp.count_nonzero(valid & ~xp.isfinite(corr)))
    if n_valid > 0 and n_bad == n_valid:
        raise AdjustmentError(f"The {chosen} correction of frame {fid} is not finite on any valid pixel.",
                              file=frame.attrs.get("path"), field=", ".join(model.required_features),
                              fix="check the DEM/geometry layers of the frame or drop the +dem/+inc candidates")
    corr32 = xp.astype(corr, xp.float32)
    coords = {"y": frame["y"], "x": frame["x"]}
    correction = xr.DataArray(corr32, dims=("y", "x"), coords=coords, name="correction",
                              attrs={"units": "mm/yr", "model": chosen, "frame_id": fid})
    correction_std = xr.DataArray(xp.astype(std, xp.float32), dims=("y", "x"), coords=coords,
                                  name="correction_std", attrs={"units": "mm/yr", "method": std_method})
    adjusted = xr.DataArray(xp.astype(los, xp.float32, copy=False) - corr32, dims=("y", "x"), coords=coords,
                            name="los_velocity", attrs={"units": "mm/yr", "adjusted_with": chosen})
    try:
        crs = frame.rio.crs
    except Exception:  # rioxarray accessor unavailable: the coordinates still carry the grid
        crs = None
    if crs is not None:
        for da in (correction, correction_std, adjusted):
            da.rio.write_crs(crs, inplace=True)

    fitted = model.predict(X)
    res = res.assign(used=keep, flagged=~keep, fitted=fitted)
    training = {"n": int(keep.sum()), "rmse_before": _rms(yk), "rmse_after": _rms(yk - fitted[keep]),
                "weighted_rmse_after": round(weighted_rmse(yk - fitted[keep], wk), 4)}
    hold = None
    if holdout is not None:
        hres, hdrop = station_residuals(frame, _stations_in_frame(holdout, frame, cfg.use_horizontal_only),
                                        window_m=cfg.window_m,
                                        min_valid_fraction=cfg.min_valid_fraction,
                                        use_horizontal_only=cfg.use_horizontal_only, origin=origin)
        hres = hres[np.all(np.isfinite(hres[list(model.required_features)].to_numpy(dtype=float)), axis=1)]
        hy = hres["residual"].to_numpy(dtype=np.float64)
        hpred = model.predict(hres[available]) if len(hres) else np.zeros(0)
        hold = {"n": int(len(hres)), "rmse_before": _rms(hy), "rmse_after": _rms(hy - hpred), "dropped": hdrop}

    cv_report = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in cv_info.items()}
    cv_report["mean_station_spacing_km"] = None
    if len(yk) >= 2:
        from scipy.spatial import cKDTree

        P = Xk[["x_km", "y_km"]].to_numpy()
        d, _ = cKDTree(P).query(P, k=2)
        cv_report["mean_station_spacing_km"] = round(float(np.mean(d[:, 1])), 3)
    finite_corr = backend.to_numpy(corr)[backend.to_numpy(valid) & np.isfinite(backend.to_numpy(corr))] \
        if n_valid else np.zeros(0)
    report = {
        "frame_id": fid,
        "n_stations_input": int(len(table_in)),
        "n_stations_used": int(keep.sum()),
        "features": available,
        "dropped": dropped,
        "merged": merged,
        "flagged": flagged,
        "cv": cv_report,
        "candidates": {k: v.to_dict() for k, v in scores.items()},
        "chosen": chosen,
        "reason": reason,
        "fallback": fallback,
        "one_se_rule": cfg.one_se_rule,
        "model_parameters": _model_parameters(model),
        "training": training,
        "holdout": hold,
        "correction": {
            "std_method": std_method,
            "min": round(float(finite_corr.min()), 4) if finite_corr.size else None,
            "max": round(float(finite_corr.max()), 4) if finite_corr.size else None,
            "pixels_without_correction": n_bad,
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("frame %s: %s chosen (%s); %d stations, %d flagged, %d dropped; RMS %.2f → %.2f mm/yr in %.1f s",
             fid, chosen, reason, training["n"], len(flagged), len(dropped), training["rmse_before"] or float("nan"),
             training["rmse_after"] or float("nan"), report["seconds"])
    return FrameAdjustment(correction=correction, correction_std=correction_std, los_adjusted=adjusted,
                           report=report, model=model, residuals=res)
