"""Subsidence statistics on the ellipsoid: area beyond a threshold, rates, volume rate, hotspots, annual trend.

Sign convention: the input is the **vertical velocity**, mm/yr, positive up. The subsidence rate is its negative
(``subsidence = −vu``), and thresholds are positive subsidence rates (``threshold_mm_yr=20`` means "sinking
faster than 20 mm/yr"). Areas are true cell areas on the ellipsoid (:func:`geodesy.grids.cell_area_m2`), so a
0.01° pixel at 38°N counts its ≈ 0.97 km², not a flat-Earth square.

Volume rates (m³/yr) are ``Σ subsidence_rate × cell_area``:

* ``subsidence_volume_rate_m3_yr`` over the pixels **beyond the threshold** (the figure the area refers to);
* ``subsidence_volume_rate_all_m3_yr`` over **all subsiding pixels** (subsidence rate > 0), which includes the
  slow fringe and some noise, so it is an upper figure.

Hotspots are the connected regions beyond the threshold (8-connectivity, ``scipy.ndimage.label``). This is
host-side summary work (NumPy), done once on the final grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import to_numpy
from ..errors import InputError
from ..geodesy.grids import cell_area_m2

__all__ = ["subsidence_rate", "subsidence_summary", "annual_subsidence", "find_hotspots", "grid_crs",
           "check_threshold"]

_EIGHT = np.ones((3, 3), dtype=bool)


def check_threshold(threshold_mm_yr: float, field: str = "threshold_mm_yr") -> float:
    """Validate a subsidence threshold: a finite, non-negative subsidence rate in mm/yr."""
    try:
        thr = float(threshold_mm_yr)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{field} = {threshold_mm_yr!r} is not a number.", field=field,
                         fix="give the threshold as a positive subsidence rate in mm/yr, e.g. 20") from exc
    if not np.isfinite(thr) or thr < 0:
        raise InputError(f"{field} = {threshold_mm_yr!r}: the threshold must be a positive subsidence rate.",
                         field=field,
                         fix=f"give it as a positive number of mm/yr of downward motion, e.g. {abs(thr):g} "
                             "(the vertical velocity is positive up; subsidence = −vertical velocity)")
    return thr


def grid_crs(da) -> Any:
    """CRS of a gridded DataArray (rioxarray), EPSG:4326 when none is written."""
    try:
        crs = da.rio.crs
    except Exception:  # rioxarray absent
        crs = None
    return crs if crs is not None else "EPSG:4326"


def _check_grid(da, name: str, dims: tuple[str, ...]) -> None:
    import xarray as xr

    if not isinstance(da, xr.DataArray):
        raise InputError(f"{name} must be an xarray.DataArray with dims {dims}, got {type(da).__name__}.",
                         field=name,
                         fix="wrap the array with its coordinates: xr.DataArray(a, dims=..., coords=...)")
    if set(da.dims) != set(dims):
        raise InputError(f"{name} has dims {da.dims}; expected {dims}.", field=name,
                         fix="rename the spatial dims to 'y' and 'x' (e.g. da.rename(lat='y', lon='x'))")


def subsidence_rate(vertical_velocity) -> Any:
    """Subsidence rate (mm/yr, positive down) = −vertical velocity."""
    out = -vertical_velocity
    try:
        out.name = "subsidence_rate"
        out.attrs = {"units": "mm/yr", "long_name": "subsidence rate (positive down)"}
    except AttributeError:
        pass
    return out


def _lonlat(x: np.ndarray, y: np.ndarray, crs) -> tuple[np.ndarray, np.ndarray]:
    import pyproj

    c = pyproj.CRS.from_user_input(crs)
    if c.is_geographic:
        return np.asarray(x, float), np.asarray(y, float)
    tr = pyproj.Transformer.from_crs(c, c.geodetic_crs, always_xy=True)
    lon, lat = tr.transform(np.asarray(x, float), np.asarray(y, float))
    return np.asarray(lon), np.asarray(lat)


def _nearest_station(lon: float, lat: float, stations) -> tuple[str | None, float]:
    import pyproj

    if stations is None or len(stations) == 0:
        return None, float("nan")
    for col in ("station", "lon", "lat"):
        if col not in stations.columns:
            raise InputError(f"The stations table lacks column {col!r}.", field=col,
                             fix="pass the table from io.gnss.read_gnss (columns station, lon, lat, ...)")
    geod = pyproj.Geod(ellps="WGS84")
    slon = stations["lon"].to_numpy(float)
    slat = stations["lat"].to_numpy(float)
    _, _, dist = geod.inv(np.full(slon.shape, lon), np.full(slat.shape, lat), slon, slat)
    i = int(np.nanargmin(dist))
    return str(stations["station"].iloc[i]), float(dist[i] / 1e3)


def _split_funnels(labels: np.ndarray, n: int, rate: np.ndarray, core_mm_yr: float, min_pixels: int
                   ) -> tuple[np.ndarray, int]:
    """Split connected regions that hold several funnels: cores are connected areas sinking faster than
    ``core_mm_yr`` (at least ``min_pixels``); each pixel of a region with two or more cores goes to its nearest
    core (Euclidean in pixels). Regions with one core or none stay whole."""
    from scipy import ndimage

    cores, n_cores = ndimage.label(np.isfinite(rate) & (rate >= core_mm_yr), structure=_EIGHT)
    if n_cores < 2:
        return labels, n
    sizes = np.bincount(cores.ravel(), minlength=n_cores + 1)[1:]
    small = np.flatnonzero(sizes < max(1, min_pixels)) + 1
    cores[np.isin(cores, small)] = 0
    # nearest core of every pixel, then keep it only inside the region that holds that core
    # (the feature transform only: scipy's distances would cost more than the transform, and are not used)
    iy, ix = ndimage.distance_transform_edt(cores == 0, return_distances=False, return_indices=True)
    nearest = cores[iy, ix]
    region_of_core = np.zeros(n_cores + 1, np.int64)
    region_of_core[cores[cores > 0]] = labels[cores > 0]
    per_region = np.bincount(region_of_core[1:][region_of_core[1:] > 0], minlength=n + 1)
    out = labels.copy()
    split = (labels > 0) & (per_region[labels] >= 2) & (region_of_core[nearest] == labels)
    out[split] = n + nearest[split]  # new ids above the region ids
    # relabel 1..m in order of appearance
    ids = np.unique(out[out > 0])
    lut = np.zeros(int(out.max()) + 1, np.int64)
    lut[ids] = np.arange(1, ids.size + 1)
    return lut[out], int(ids.size)


def find_hotspots(rate: np.ndarray, area: np.ndarray, x: np.ndarray, y: np.ndarray, threshold_mm_yr: float, *,
                  crs="EPSG:4326", stations=None, min_area_km2: float = 0.0, min_pixels: int = 3,
                  split_funnels: bool = True, core_factor: float = 2.0, max_hotspots: int | None = 20
                  ) -> list[dict]:
    """Subsidence hotspots: connected regions with subsidence rate ≥ threshold, largest first.

    Around a plain's funnels the area beyond a 20 mm/yr threshold often joins several funnels into one region
    of tens of thousands of km²; with ``split_funnels`` a region holding two or more cores (connected areas
    sinking faster than ``core_factor`` × threshold) is split between them, each pixel going to its nearest
    core, so that each funnel is one hotspot. Regions smaller than ``min_pixels`` pixels or ``min_area_km2``
    (isolated noisy pixels) are left out.

    Each hotspot: ``area_km2``, ``peak_subsidence_rate_mm_yr``, ``mean_subsidence_rate_mm_yr`` (area-weighted),
    ``volume_rate_m3_yr``, ``centroid_lon``/``centroid_lat`` (area-weighted centroid), ``peak_lon``/``peak_lat``
    (the region's first pixel in raster order at its peak rate),
    ``nearest_station`` and ``nearest_station_distance_km`` (geodesic from the peak, WGS84) when ``stations``
    is given.
    """
    from scipy import ndimage

    beyond = np.isfinite(rate) & (rate >= threshold_mm_yr)
    labels, n = ndimage.label(beyond, structure=_EIGHT)
    if n == 0:
        return []
    if split_funnels:
        labels, n = _split_funnels(labels, n, rate, core_factor * threshold_mm_yr, min_pixels)
    idx = np.arange(1, n + 1)
    # per-region sums over the labelled pixels only, in raster order (the sums scipy.ndimage.sum forms over the
    # whole raster, bit for bit), and the peak by one scatter-max instead of ndimage's sort of every pixel
    sel = np.flatnonzero(labels.ravel())
    lab = labels.ravel()[sel]
    rows, cols = np.divmod(sel, labels.shape[1])
    r = np.asarray(rate, np.float64).ravel()[sel]
    a = np.broadcast_to(np.asarray(area, np.float64), labels.shape).ravel()[sel]

    def per_region(weights):
        return np.bincount(lab, weights=weights, minlength=n + 1)[1:]

    areas = per_region(a)
    vol = per_region(r * a / 1e3)
    cx = per_region(a * np.asarray(x, float)[cols]) / areas
    cy = per_region(a * np.asarray(y, float)[rows]) / areas
    n_pix = np.bincount(lab, minlength=n + 1)[1:]
    peak_all = np.full(n + 1, -np.inf)
    np.maximum.at(peak_all, lab, r)
    peak = peak_all[1:]
    at_peak = np.flatnonzero(r == peak_all[lab])
    _, first = np.unique(lab[at_peak], return_index=True)  # the first peak pixel of each region, raster order
    peak_pix = at_peak[first]
    clon, clat = _lonlat(cx, cy, crs)
    plon, plat = _lonlat(np.asarray(x, float)[cols[peak_pix]], np.asarray(y, float)[rows[peak_pix]], crs)
    order = np.argsort(-areas, kind="stable")
    out = []
    for k in order:
        if areas[k] / 1e6 < min_area_km2 or n_pix[k] < min_pixels:
            continue
        name, dist = _nearest_station(float(plon[k]), float(plat[k]), stations)
        out.append({
            "id": int(idx[k]),
            "area_km2": float(areas[k] / 1e6),
            "peak_subsidence_rate_mm_yr": float(peak[k]),
            "mean_subsidence_rate_mm_yr": float(vol[k] * 1e3 / areas[k]),
            "volume_rate_m3_yr": float(vol[k]),
            "centroid_lon": float(clon[k]), "centroid_lat": float(clat[k]),
            "peak_lon": float(plon[k]), "peak_lat": float(plat[k]),
            "n_pixels": int(n_pix[k]),
            "nearest_station": name,
            "nearest_station_distance_km": dist,
        })
        if max_hotspots is not None and len(out) >= max_hotspots:
            break
    return out


def _stats(rate: np.ndarray, area: np.ndarray, thr: float) -> dict:
    finite = np.isfinite(rate)
    beyond = finite & (rate >= thr)
    sinking = finite & (rate > 0)
    a_beyond = float(np.sum(area[beyond]))
    return {
        "subsidence_area_km2": a_beyond / 1e6,
        "max_subsidence_rate_mm_yr": float(np.max(rate[beyond])) if beyond.any() else float("nan"),
        "mean_subsidence_rate_mm_yr": (float(np.sum(rate[beyond] * area[beyond]) / a_beyond) if a_beyond > 0
                                       else float("nan")),
        "subsidence_volume_rate_m3_yr": float(np.sum(rate[beyond] / 1e3 * area[beyond])),
        "subsidence_volume_rate_all_m3_yr": float(np.sum(rate[sinking] / 1e3 * area[sinking])),
        "valid_area_km2": float(np.sum(area[finite])) / 1e6,
    }


def subsidence_summary(vertical_velocity, *, threshold_mm_yr: float = 20.0, stations=None, crs=None,
                       min_hotspot_area_km2: float = 0.0, min_hotspot_pixels: int = 3, split_funnels: bool = True,
                       max_hotspots: int | None = 20) -> dict:
    """Area, rates, volume rate and hotspots of subsidence beyond ``threshold_mm_yr``.

    Parameters
    ----------
    vertical_velocity
        DataArray (y, x), mm/yr, positive up (any backend; summarised on the host).
    threshold_mm_yr
        Subsidence rate (positive, mm/yr downward) beyond which a pixel counts as subsiding.
    stations
        Optional GNSS table (``station``, ``lon``, ``lat``) to name the station nearest each hotspot.
    crs
        CRS of the grid; default the DataArray's rioxarray CRS, else EPSG:4326.
    min_hotspot_area_km2, min_hotspot_pixels, split_funnels, max_hotspots
        Hotspot options, see :func:`find_hotspots`.

    Returns
    -------
    dict (JSON-ready): ``subsidence_threshold_mm_yr``, ``subsidence_area_km2``, ``max_subsidence_rate_mm_yr``,
    ``mean_subsidence_rate_mm_yr`` (area-weighted over the area beyond the threshold),
    ``subsidence_volume_rate_m3_yr`` (pixels beyond the threshold), ``subsidence_volume_rate_all_m3_yr`` (all
    pixels with subsidence rate > 0), ``valid_area_km2``, ``hotspots`` (see :func:`find_hotspots`).
    """
    thr = check_threshold(threshold_mm_yr)
    _check_grid(vertical_velocity, "vertical_velocity", ("y", "x"))
    vv = vertical_velocity.transpose("y", "x")
    crs = grid_crs(vv) if crs is None else crs
    y, x = np.asarray(vv["y"].values, float), np.asarray(vv["x"].values, float)
    rate = -np.asarray(to_numpy(vv.data), dtype=np.float64)
    area = cell_area_m2(y, x, crs)
    out = {"subsidence_threshold_mm_yr": thr}
    out.update(_stats(rate, area, thr))
    out["hotspots"] = find_hotspots(rate, area, x, y, thr, crs=crs, stations=stations,
                                    min_area_km2=min_hotspot_area_km2, min_pixels=min_hotspot_pixels,
                                    split_funnels=split_funnels, max_hotspots=max_hotspots)
    return out


def annual_subsidence(annual_velocity, *, threshold_mm_yr: float = 20.0, crs=None, easing_years: int = 3,
                      easing_min_slope_mm_yr2: float = 0.5, min_year_fraction: float = 0.5,
                      region: str = "per_year") -> dict:
    """Year-by-year subsidence statistics from annual vertical velocity grids, the peak year and the trend.

    Parameters
    ----------
    annual_velocity
        DataArray (year, y, x) of vertical velocity, mm/yr, positive up (e.g. ``annual_velocity`` from
        :func:`gpu_insar_adjust.timeseries.fit_annual_velocities`).
    threshold_mm_yr
        Positive subsidence rate defining the subsiding region.
    easing_years
        Number of most recent years over which the trend is fitted.
    easing_min_slope_mm_yr2
        Subsidence is "easing" when the least-squares slope of the annual mean subsidence rate over the last
        ``easing_years`` years is below −this value (mm/yr per year) **and** the peak year is not the last year.
    min_year_fraction
        Years whose ``year_start``/``year_end`` coordinates cover less than this fraction of the calendar year
        are left out (default half a year: a first or last year of a few epochs has a rate from days of data,
        noisy enough to become the "peak year"; 0 keeps every year).

    region
        ``"per_year"`` (default): the annual mean subsidence rate of a year is area-weighted over the pixels
        beyond the threshold *in that year* — the statistic published for the North China Plain (mean rate of
        the area sinking faster than 20 mm/yr, per year). ``"fixed"``: over one region for all years, the pixels
        beyond the threshold in at least one year, so that years compare like with like (but noisy pixels that
        cross the threshold once pull every year's mean toward zero). Per-year area, maximum and volume rate
        beyond the threshold are reported either way.

    Returns
    -------
    dict: ``years``, ``annual_mean_subsidence_rate_mm_yr`` {year: value}, ``annual_subsidence_area_km2``,
    ``annual_max_subsidence_rate_mm_yr``, ``annual_volume_rate_m3_yr`` (beyond the threshold, per year),
    ``region_area_km2``, ``peak_year``, ``peak_mean_subsidence_rate_mm_yr``, ``trend_years``,
    ``trend_slope_mm_yr2`` (negative = slowing), ``trend_slope_std_mm_yr2``, ``easing`` (bool), ``easing_rule``.
    """
    thr = check_threshold(threshold_mm_yr)
    _check_grid(annual_velocity, "annual_velocity", ("year", "y", "x"))
    av = annual_velocity.transpose("year", "y", "x")
    if min_year_fraction > 0 and "year_start" in av.coords and "year_end" in av.coords:
        frac = (av["year_end"] - av["year_start"]).values.astype("timedelta64[s]").astype(float) / (365.25 * 86400)
        av = av.isel(year=np.nonzero(frac >= min_year_fraction)[0])
    years = [int(v) for v in av["year"].values]
    if not years:
        raise InputError("No year left to summarise.", field="annual_velocity",
                         fix="give at least one year of annual velocities (or lower min_year_fraction)")
    crs = grid_crs(av) if crs is None else crs
    y, x = np.asarray(av["y"].values, float), np.asarray(av["x"].values, float)
    rate = -np.asarray(to_numpy(av.data), dtype=np.float64)
    area = cell_area_m2(y, x, crs)
    if region not in ("per_year", "fixed"):
        raise InputError(f"Unknown region {region!r}.", field="region", fix="use 'per_year' or 'fixed'")
    fixed_region = np.any(np.isfinite(rate) & (rate >= thr), axis=0)
    means, areas, maxima, vols = {}, {}, {}, {}
    for k, year in enumerate(years):
        r = rate[k]
        ok = (fixed_region if region == "fixed" else (r >= thr)) & np.isfinite(r)
        a = float(np.sum(area[ok]))
        means[year] = float(np.sum(r[ok] * area[ok]) / a) if a > 0 else float("nan")
        s = _stats(r, area, thr)
        areas[year] = s["subsidence_area_km2"]
        maxima[year] = s["max_subsidence_rate_mm_yr"]
        vols[year] = s["subsidence_volume_rate_m3_yr"]
    vals = np.array([means[yr] for yr in years])
    finite = np.isfinite(vals)
    peak_year = int(np.array(years)[finite][np.argmax(vals[finite])]) if finite.any() else None
    trend_years = [yr for yr, ok in zip(years, finite) if ok][-max(int(easing_years), 2):]
    slope = slope_std = float("nan")
    if len(trend_years) >= 2:
        ty = np.array(trend_years, float)
        tv = np.array([means[yr] for yr in trend_years])
        A = np.stack([np.ones_like(ty), ty - ty.mean()], axis=1)
        coef, *_ = np.linalg.lstsq(A, tv, rcond=None)
        slope = float(coef[1])
        dof = len(ty) - 2
        if dof > 0:
            s2 = float(np.sum((tv - A @ coef) ** 2) / dof)
            slope_std = float(np.sqrt(s2 / np.sum((ty - ty.mean()) ** 2)))
    easing = bool(np.isfinite(slope) and slope < -abs(easing_min_slope_mm_yr2) and peak_year is not None
                  and peak_year != trend_years[-1])
    return {
        "subsidence_threshold_mm_yr": thr,
        "years": years,
        "annual_mean_subsidence_rate_mm_yr": means,
        "annual_subsidence_area_km2": areas,
        "annual_max_subsidence_rate_mm_yr": maxima,
        "annual_volume_rate_m3_yr": vols,
        "region": region,
        "region_area_km2": float(np.sum(area[fixed_region])) / 1e6,
        "peak_year": peak_year,
        "peak_mean_subsidence_rate_mm_yr": means.get(peak_year, float("nan")) if peak_year else float("nan"),
        "trend_years": trend_years,
        "trend_slope_mm_yr2": slope,
        "trend_slope_std_mm_yr2": slope_std,
        "easing": easing,
        "easing_rule": (f"easing = least-squares slope of the annual mean subsidence rate over the last "
                        f"{len(trend_years)} years < -{abs(easing_min_slope_mm_yr2):g} mm/yr per year and the "
                        f"peak year is not the last year"),
    }
