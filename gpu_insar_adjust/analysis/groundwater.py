"""Groundwater storage loss from aquifer-system compaction, by period.

Assumptions (all are parameters of :func:`groundwater_loss` and are echoed in its result):

* **Compaction = subsidence.** The vertical displacement measured by InSAR (mm, positive up) is taken as the
  compaction of the aquifer system; deep-seated tectonic or loading motion is assumed removed (or negligible).
  Compaction over a period is ``−(d(end) − d(start))``, the cube interpolated linearly in time at the bounds.
  Uplifting pixels count negatively (elastic rebound), so noise does not bias the total upward.
* **Water released = compaction volume.** Draining a confined aquifer system by a head decline Δh releases
  ``S_k·Δh`` of water per unit area from skeletal (matrix) storage, and the matrix compacts by the same
  ``S_k·Δh``; the water-compressibility term is neglected. So the water released equals the compaction
  volume ``Σ compaction × cell area`` (true ellipsoidal areas), whatever ``S_k`` is.
* **Storage loss = inelastic part.** Elastic compaction (coarse aquifers, heads above preconsolidation) is
  recovered when heads rise; inelastic compaction (fine-grained interbeds, heads below preconsolidation) is a
  permanent loss of storage capacity. The loss is ``inelastic_fraction × compaction volume``; the default
  fraction 1 equates loss and compaction volume, as in the North China Plain and San Joaquin Valley studies
  where heads have been below preconsolidation for decades.
* **Skeletal storage coefficients** (optional, dimensionless), e.g. North China Plain S_ke = 0.9–12.4 × 10⁻³
  (elastic), S_kv = 6.2–88 × 10⁻³ (inelastic, virgin): with elastic aquifers and inelastic interbeds acting in
  parallel over the same head decline, compaction b = (S_ke + S_kv)·Δh, so the implied head decline is
  Δh = b / (S_ke + S_kv), the elastic (recoverable) release S_ke·Δh·area, the inelastic (lost) release
  S_kv·Δh·area. The coefficients partition the volume (inelastic fraction S_kv / (S_ke + S_kv)) and give the
  head decline; they do not change the total released volume.
* **Uncertainty.** Each epoch's displacement has a 1-sigma error σ (mm; given, or estimated per pixel as the
  residual RMS of the piecewise annual-rate fit); a period's compaction has σ·√2 (independent errors at the two
  bounds). Spatially, errors are taken as **fully correlated within tiles of ``correlation_length_m``** (the
  scale of atmospheric and orbital residuals, ~10 km) and independent between tiles, so the volume variance is
  Σ_tiles (Σ_pixels σ·area)². ``correlation_length_m=None`` makes them fully correlated over the whole area
  (the conservative bound).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..errors import InputError, TimeSeriesError
from ..geodesy.grids import cell_area_m2, grid_spacing_m
from .subsidence import grid_crs

__all__ = ["groundwater_loss", "DEFAULT_SPLIT_DATES"]

DEFAULT_SPLIT_DATES: tuple[str, ...] = ("2021-01-01",)


def _day(t) -> str:
    return str(np.datetime64(t, "D"))


def _periods(times: np.ndarray, periods, split_dates) -> list[tuple[np.datetime64, np.datetime64]]:
    from ..timeseries import _date

    t0, t1 = times[0], times[-1]
    if periods is None:
        bounds = [t0]
        for s in split_dates or ():
            d = _date(s, "split_dates")
            if t0 < d < t1:
                bounds.append(d)
        bounds.append(t1)
        return list(zip(bounds[:-1], bounds[1:]))
    out = []
    for k, p in enumerate(periods):
        if not isinstance(p, Sequence) or isinstance(p, str) or len(p) != 2:
            raise InputError(f"periods[{k}] = {p!r} is not a (start, end) pair.", field="periods",
                             fix="give periods as [(start, end), ...], e.g. [('2018-01-01', '2021-01-01')]")
        a, b = _date(p[0], f"periods[{k}].start"), _date(p[1], f"periods[{k}].end")
        for d in (a, b):
            if d < t0 or d > t1:
                raise TimeSeriesError(f"Period {_day(a)} to {_day(b)} reaches outside the data "
                                      f"({_day(t0)} to {_day(t1)}).", field="periods",
                                      fix=f"keep every period within {_day(t0)} and {_day(t1)}")
        if b <= a:
            raise InputError(f"periods[{k}] ends ({_day(b)}) before it starts ({_day(a)}).", field="periods",
                             fix="give (start, end) with start before end")
        out.append((a, b))
    out.sort()
    for (a0, b0), (a1, b1) in zip(out[:-1], out[1:]):
        if a1 < b0:  # the overlap would be counted twice in the total
            raise InputError(f"Periods {_day(a0)} to {_day(b0)} and {_day(a1)} to {_day(b1)} overlap.",
                             field="periods", fix="give periods that do not overlap (they may touch)")
    return out


def _storage(skeletal_storage, inelastic_fraction: float) -> tuple[float, float | None, float | None]:
    """(inelastic fraction, S_ke, S_kv)."""
    if skeletal_storage is None:
        f = float(inelastic_fraction)
        if not 0.0 <= f <= 1.0:
            raise InputError(f"inelastic_fraction = {inelastic_fraction!r} is outside [0, 1].",
                             field="inelastic_fraction",
                             fix="give the fraction of compaction that is permanent, between 0 and 1 (default 1)")
        return f, None, None
    if isinstance(skeletal_storage, Mapping):
        try:
            ske, skv = skeletal_storage["elastic"], skeletal_storage["inelastic"]
        except KeyError as exc:
            raise InputError("skeletal_storage needs keys 'elastic' and 'inelastic'.", field="skeletal_storage",
                             fix="e.g. {'elastic': 5e-3, 'inelastic': 30e-3}") from exc
    else:
        ske, skv = skeletal_storage
    ske, skv = float(ske), float(skv)
    if not (ske >= 0 and skv >= 0 and ske + skv > 0 and ske < 1 and skv < 1):
        raise InputError(f"Skeletal storage coefficients S_ke={ske:g}, S_kv={skv:g} are not plausible.",
                         field="skeletal_storage",
                         fix="give dimensionless coefficients in [0, 1), e.g. S_ke 0.9-12.4e-3 and S_kv 6.2-88e-3 "
                             "for the North China Plain")
    return skv / (ske + skv), ske, skv


def _epoch_sigma(cumulative, displacement_std_mm, t: np.ndarray, when: np.datetime64, shape) -> np.ndarray:
    import xarray as xr

    s = displacement_std_mm
    if isinstance(s, xr.DataArray):
        if "time" in s.dims:
            i = int(np.argmin(np.abs((t - when).astype(np.int64))))
            s = s.isel(time=i)
        s = np.asarray(to_numpy(s.transpose("y", "x").data), float)
    else:
        s = np.asarray(to_numpy(s), float)
    s = np.broadcast_to(s, shape)
    if np.any(s[np.isfinite(s)] < 0):
        raise InputError("displacement_std_mm has negative values.", field="displacement_std_mm",
                         fix="give 1-sigma uncertainties (mm, >= 0)")
    return s


def _fit_sigma(fit) -> np.ndarray:
    """One epoch's 1-sigma (mm, (y, x)) from an annual-rate fit: the residual standard deviation, its RMS
    corrected for the fitted parameters (``√(n / (n − p))``, NaN where the fit has no redundancy)."""
    rms = np.asarray(to_numpy(fit["residual_rms"].transpose("y", "x").values), float)
    n = np.asarray(to_numpy(fit["n_valid"].transpose("y", "x").values), float)
    p = 1 + int(fit.sizes.get("year", 0)) + (4 if "+seasonal" in str(fit.attrs.get("model", "")) else 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > p, rms * np.sqrt(n / np.where(n > p, n - p, 1.0)), np.nan)


def _volume_std(sigma_m: np.ndarray, area: np.ndarray, ok: np.ndarray, y, x, crs,
                correlation_length_m: float | None) -> float:
    """Volume 1-sigma (m³): fully correlated within tiles of the correlation length, independent between. NaN
    when a counted pixel's sigma is unknown (an error that cannot be bounded is not zero)."""
    if not np.all(np.isfinite(sigma_m[ok])):
        return float("nan")
    sa = np.where(ok, sigma_m * area, 0.0)
    if correlation_length_m is None or not np.isfinite(correlation_length_m):
        return float(np.sum(sa))
    dy_m, dx_m = grid_spacing_m(y, x, crs)
    ty = max(int(round(correlation_length_m / float(np.mean(dy_m)))), 1)
    tx = max(int(round(correlation_length_m / float(np.mean(dx_m)))), 1)
    ny, nx = sa.shape
    rows = np.arange(ny) // ty
    cols = np.arange(nx) // tx
    tiles = np.zeros((rows[-1] + 1, cols[-1] + 1))
    np.add.at(tiles, (rows[:, None], cols[None, :]), sa)
    return float(np.sqrt(np.sum(tiles**2)))


def groundwater_loss(cumulative, *, periods: Sequence[tuple[Any, Any]] | None = None,
                     split_dates: Sequence[Any] | None = DEFAULT_SPLIT_DATES, inelastic_fraction: float = 1.0,
                     skeletal_storage=None, aquifer_mask=None, displacement_std_mm=None,
                     correlation_length_m: float | None = 10_000.0, crs=None, fit=None) -> dict:
    """Groundwater storage loss (m³) from compaction, per period and in total.

    Parameters
    ----------
    cumulative
        DataArray (time, y, x): vertical displacement, mm, positive up (a cube, or just the displacement at the
        period bounds).
    periods
        [(start, end), ...]; default: the data span split at ``split_dates`` (default 2021-01-01, giving
        [first epoch, 2021-01-01) and [2021-01-01, last epoch]; a split date outside the data is ignored).
        A period reaching outside the data raises :class:`TimeSeriesError`.
    inelastic_fraction
        Fraction of compaction that is permanent (default 1). Ignored when ``skeletal_storage`` is given.
    skeletal_storage
        Optional ``{"elastic": S_ke, "inelastic": S_kv}`` (dimensionless); see the module docstring.
    aquifer_mask
        Optional boolean DataArray (y, x) on the cube's grid: True inside the aquifer.
    displacement_std_mm
        1-sigma of one epoch's displacement (mm): scalar, (y, x) or (time, y, x); default: per-pixel residual
        RMS of the piecewise annual-rate fit.
    correlation_length_m
        Spatial correlation length of the displacement errors (None = fully correlated everywhere).
    crs
        Grid CRS; default the cube's rioxarray CRS, else EPSG:4326.
    fit
        The result of :func:`~gpu_insar_adjust.timeseries.fit_annual_velocities` on this cube, when already
        computed: its ``residual_rms`` serves as the default uncertainty instead of fitting the cube again.

    Returns
    -------
    dict: ``total_loss_m3``, ``total_loss_std_m3``, ``total_released_m3``, ``periods`` (list of dicts with
    ``start``, ``end``, ``loss_m3``, ``loss_std_m3``, ``released_m3``, ``elastic_m3``, ``compaction_volume_m3``,
    ``mean_compaction_mm``, ``mean_head_decline_m`` (with coefficients), ``coverage``), ``aquifer_area_km2`` and
    ``assumptions``. Every period sums the same pixels: those with the displacement over every period (so that
    the periods add up to the total); ``coverage`` is their share of the aquifer area (the mask's, or without
    one the mapped area: pixels with a displacement over at least one period). Periods are taken in date order
    and may not overlap. A 1-sigma that cannot be known (an epoch sigma missing at a counted pixel) is NaN,
    not 0.
    """
    import xarray as xr

    from ..timeseries import _check_same_grid, _check_times, cumulative_displacement, fit_annual_velocities

    if not isinstance(cumulative, xr.DataArray) or set(cumulative.dims) != {"time", "y", "x"}:
        raise InputError("cumulative must be a DataArray with dims (time, y, x).", field="cumulative",
                         fix="pass the displacement cube (mm, positive up) with its time, y and x coordinates")
    cube = cumulative.transpose("time", "y", "x")
    t = _check_times(cube["time"].values, "time")
    frac, ske, skv = _storage(skeletal_storage, inelastic_fraction)
    crs = grid_crs(cube) if crs is None else crs
    y, x = np.asarray(cube["y"].values, float), np.asarray(cube["x"].values, float)
    area = cell_area_m2(y, x, crs)
    if aquifer_mask is not None:
        if not isinstance(aquifer_mask, xr.DataArray):
            raise InputError("aquifer_mask must be a DataArray (y, x) on the cube's grid.", field="aquifer_mask",
                             fix="wrap the mask with the cube's y/x coordinates")
        try:
            _check_same_grid(cube, aquifer_mask, "aquifer_mask")
        except TimeSeriesError as exc:
            raise InputError(exc.message, field="aquifer_mask", fix=exc.fix) from None
        mask = np.asarray(to_numpy(aquifer_mask.transpose("y", "x").data)).astype(bool)
    else:
        mask = np.ones(area.shape, dtype=bool)
    if displacement_std_mm is None:
        if fit is None:
            fit = fit_annual_velocities(cube) if t.size >= 3 else None
        sigma_source = ("residual standard deviation of the piecewise annual-rate fit (per pixel, "
                        "residual RMS × √(n / (n − parameters)))")
        sig_epoch = np.full(area.shape, np.nan) if fit is None else _fit_sigma(fit)
    else:
        sigma_source = "given (displacement_std_mm)"
        sig_epoch = None

    def bound_sigma(a, b):  # 1-sigma (mm) of the displacement between epochs a and b
        if sig_epoch is not None:
            return np.sqrt(2.0) * sig_epoch
        return np.sqrt(_epoch_sigma(cube, displacement_std_mm, t, a, area.shape) ** 2
                       + _epoch_sigma(cube, displacement_std_mm, t, b, area.shape) ** 2)

    bounds = _periods(t, periods, split_dates)
    comps = []
    for start, end in bounds:
        disp = cumulative_displacement(cube, start, end)
        comps.append(-np.asarray(to_numpy(disp.transpose("y", "x").data), float))
    # one set of pixels for every period, so that the periods add up to the total: those with the displacement
    # at every bound (a pixel missing one epoch near a bound is left out of all periods, not of one)
    finite = [np.isfinite(c) for c in comps]
    ok = mask & np.logical_and.reduce(finite)
    # without an aquifer mask the area is the mapped one (a displacement over at least one period), not the
    # grid's rectangle
    region = mask if aquifer_mask is not None else np.logical_or.reduce(finite)
    region_area = float(np.sum(area[region]))
    a_ok = float(np.sum(area[ok]))
    rows = []
    for (start, end), comp_mm in zip(bounds, comps):
        released = float(np.sum(comp_mm[ok] / 1e3 * area[ok]))
        std = _volume_std(bound_sigma(start, end) / 1e3, area, ok, y, x, crs, correlation_length_m)
        row = {
            "start": _day(start), "end": _day(end),
            "loss_m3": frac * released, "loss_std_m3": frac * std,
            "released_m3": released, "released_std_m3": std,
            "elastic_m3": (1.0 - frac) * released,
            "compaction_volume_m3": released,
            "mean_compaction_mm": released * 1e3 / a_ok if a_ok > 0 else float("nan"),
            "coverage": a_ok / region_area if region_area > 0 else float("nan"),
        }
        if ske is not None:
            row["mean_head_decline_m"] = (released / a_ok) / (ske + skv) if a_ok > 0 else float("nan")
        rows.append(row)

    total_released = float(np.sum([r["released_m3"] for r in rows]))
    if all(b0 == a1 for (_, b0), (a1, _) in zip(bounds[:-1], bounds[1:])):
        # periods that tile one span: the inner bounds cancel, the error is that of the span's two ends
        total_std = _volume_std(bound_sigma(bounds[0][0], bounds[-1][1]) / 1e3, area, ok, y, x, crs,
                                correlation_length_m)
    else:  # separate periods share no bound: independent errors
        total_std = float(np.sqrt(np.sum([r["released_std_m3"] ** 2 for r in rows])))
    return {
        "total_loss_m3": frac * total_released,
        "total_loss_std_m3": frac * total_std,
        "total_released_m3": total_released,
        "periods": rows,
        "aquifer_area_km2": region_area / 1e6,
        "assumptions": {
            "compaction": "compaction = -(vertical displacement change); uplift counts negative",
            "released_volume": "water released = compaction volume (skeletal storage; water compressibility "
                               "neglected)",
            "inelastic_fraction": frac,
            "skeletal_storage": None if ske is None else {"elastic": ske, "inelastic": skv},
            "loss": "storage loss = inelastic part of the released volume; elastic part recoverable",
            "areas": "true cell areas on the ellipsoid",
            "aquifer": ("the aquifer mask given" if aquifer_mask is not None else
                        "no aquifer mask given: the mapped area (pixels with a displacement over at least "
                        "one period)"),
            "displacement_std": sigma_source,
            "correlation_length_m": correlation_length_m,
            "spatial_error_model": ("fully correlated within tiles of the correlation length, independent "
                                    "between tiles" if correlation_length_m else "fully correlated everywhere"),
            "periods": "linear interpolation of the cube at the period bounds",
        },
    }
