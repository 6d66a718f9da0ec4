"""Validation of vertical velocities (and time series) against held-out GNSS stations and truth grids.

Statistics use the difference ``InSAR − reference``: ``bias`` (mean), ``rmse``, ``mae``, ``std`` (of the
differences), ``r2`` (coefficient of determination of the reference by InSAR, 1 − SS_res/SS_tot, so a
perfect map scores 1 and a biased one less), ``pearson_r`` and ``n``. Sampling the grid at stations is
``nearest`` or ``bilinear``; bilinear interpolation is NaN-aware (the weights of missing neighbours are dropped
and the rest renormalised); stations outside the grid or on no data are counted in ``n_unsampled``.
Host-side (NumPy) work on the final products.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..errors import InputError
from .subsidence import grid_crs

__all__ = ["sample_grid", "error_statistics", "validate_against_gnss", "validate_against_truth",
           "validate_timeseries_against_gnss"]


def error_statistics(estimate: Any, reference: Any) -> dict:
    """Statistics of ``estimate − reference`` over the pairs where both are finite."""
    e = np.asarray(estimate, float).ravel()
    r = np.asarray(reference, float).ravel()
    ok = np.isfinite(e) & np.isfinite(r)
    e, r = e[ok], r[ok]
    n = int(e.size)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "bias": nan, "rmse": nan, "mae": nan, "std": nan, "r2": nan, "pearson_r": nan}
    d = e - r
    ss_tot = float(np.sum((r - r.mean()) ** 2))
    return {
        "n": n,
        "bias": float(np.mean(d)),
        "rmse": float(np.sqrt(np.mean(d**2))),
        "mae": float(np.mean(np.abs(d))),
        "std": float(np.std(d, ddof=1)) if n > 1 else float("nan"),
        "r2": float(1.0 - np.sum(d**2) / ss_tot) if ss_tot > 0 else float("nan"),
        "pearson_r": float(np.corrcoef(e, r)[0, 1]) if n > 1 and np.std(e) > 0 and np.std(r) > 0 else float("nan"),
    }


def _grid_xy(lon, lat, crs) -> tuple[np.ndarray, np.ndarray]:
    import pyproj

    c = pyproj.CRS.from_user_input(crs)
    lon, lat = np.asarray(lon, float), np.asarray(lat, float)
    if c.is_geographic:
        return lon, lat
    tr = pyproj.Transformer.from_crs(c.geodetic_crs, c, always_xy=True)
    gx, gy = tr.transform(lon, lat)
    return np.asarray(gx), np.asarray(gy)


def _frac_index(coord: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fractional pixel index of values ``v`` along a regular coordinate (increasing or decreasing)."""
    step = (coord[-1] - coord[0]) / (coord.size - 1) if coord.size > 1 else 1.0
    return (v - coord[0]) / step


def sample_grid(grid, lon, lat, *, method: str = "bilinear", crs=None) -> np.ndarray:
    """Values of a DataArray (y, x) at points (lon/lat degrees), NaN outside the grid or on no data."""
    if method not in ("nearest", "bilinear"):
        raise InputError(f"Unknown sampling method {method!r}.", field="method", fix="use 'nearest' or 'bilinear'")
    g = grid.transpose("y", "x")
    crs = grid_crs(g) if crs is None else crs
    xs, ys = _grid_xy(lon, lat, crs)
    xc, yc = np.asarray(g["x"].values, float), np.asarray(g["y"].values, float)
    data = np.asarray(to_numpy(g.data), float)
    ny, nx = data.shape
    fi, fj = _frac_index(yc, ys), _frac_index(xc, xs)
    out = np.full(fi.shape, np.nan)
    inside = (fi >= -0.5) & (fi <= ny - 0.5) & (fj >= -0.5) & (fj <= nx - 0.5)
    if method == "nearest":
        i = np.clip(np.rint(fi), 0, ny - 1).astype(int)
        j = np.clip(np.rint(fj), 0, nx - 1).astype(int)
        out[inside] = data[i[inside], j[inside]]
        return out
    i0 = np.clip(np.floor(fi), 0, max(ny - 2, 0)).astype(int)
    j0 = np.clip(np.floor(fj), 0, max(nx - 2, 0)).astype(int)
    wi = np.clip(fi - i0, 0.0, 1.0)
    wj = np.clip(fj - j0, 0.0, 1.0)
    num = np.zeros(fi.shape)
    den = np.zeros(fi.shape)
    for di, dj, w in ((0, 0, (1 - wi) * (1 - wj)), (0, 1, (1 - wi) * wj), (1, 0, wi * (1 - wj)), (1, 1, wi * wj)):
        ii, jj = np.minimum(i0 + di, ny - 1), np.minimum(j0 + dj, nx - 1)
        v = data[ii, jj]
        ok = np.isfinite(v) & (w > 0)
        num += np.where(ok, w * np.where(ok, v, 0.0), 0.0)
        den += np.where(ok, w, 0.0)
    good = inside & (den > 1e-12)
    out[good] = num[good] / den[good]
    return out


def _stations_check(stations, value_col: str) -> None:
    for col in ("station", "lon", "lat", value_col):
        if col not in stations.columns:
            raise InputError(f"The stations table lacks column {col!r}.", field=col,
                             fix="pass the table from io.gnss.read_gnss (station, lon, lat, vu, su, ...)")


def validate_against_gnss(vertical_velocity, stations, *, method: str = "bilinear", component: str = "vu",
                          crs=None) -> dict:
    """Compare vertical velocities (mm/yr, positive up) with GNSS at held-out stations.

    Parameters
    ----------
    vertical_velocity
        DataArray (y, x), or a mapping ``{frame_id: DataArray}`` for per-frame validation (the overall figures
        then pool every frame's samples).
    stations
        GNSS table with ``station``, ``lon``, ``lat`` and ``component`` (default ``vu``); stations with NaN
        there (horizontal-only) are skipped.

    Returns
    -------
    dict: ``overall`` statistics (see :func:`error_statistics`) plus ``n_stations``/``n_unsampled``,
    ``per_frame`` {frame_id: statistics} (for a mapping), and ``scatter``: a list of {``frame``, ``station``,
    ``lon``, ``lat``, ``gnss``, ``gnss_std``, ``insar``, ``residual``} for plots.
    """
    _stations_check(stations, component)
    st = stations[np.isfinite(stations[component].to_numpy(float))]
    grids = dict(vertical_velocity) if isinstance(vertical_velocity, Mapping) else {None: vertical_velocity}
    std_col = "s" + component[1:] if component.startswith("v") else None
    scatter, per_frame = [], {}
    all_e, all_r = [], []
    n_unsampled = 0
    for frame, grid in grids.items():
        ins = sample_grid(grid, st["lon"].to_numpy(float), st["lat"].to_numpy(float), method=method, crs=crs)
        ref = st[component].to_numpy(float)
        ok = np.isfinite(ins)
        if frame is None:
            n_unsampled = int(np.sum(~ok))
        stats = error_statistics(ins, ref)
        if frame is not None:
            per_frame[frame] = stats
        all_e.append(ins[ok])
        all_r.append(ref[ok])
        sstd = st[std_col].to_numpy(float) if std_col in st.columns else np.full(len(st), np.nan)
        for k in np.nonzero(ok)[0]:
            scatter.append({"frame": frame, "station": str(st["station"].iloc[k]),
                            "lon": float(st["lon"].iloc[k]), "lat": float(st["lat"].iloc[k]),
                            "gnss": float(ref[k]), "gnss_std": float(sstd[k]), "insar": float(ins[k]),
                            "residual": float(ins[k] - ref[k])})
    overall = error_statistics(np.concatenate(all_e), np.concatenate(all_r))
    if len(grids) > 1:
        sampled = {s["station"] for s in scatter}
        n_unsampled = int(len(st) - len(sampled))
    overall.update({"n_stations": int(len(st)), "n_unsampled": n_unsampled})
    out = {"component": component, "method": method, "overall": overall, "scatter": scatter}
    if per_frame:
        out["per_frame"] = per_frame
    return out


def _check_aligned(a, b) -> None:
    for dim in ("y", "x"):
        if dim not in a.dims or dim not in b.dims:
            raise InputError(f"Both grids need a {dim!r} dimension.", field="truth",
                             fix="give DataArrays with dims (y, x)")
        ca, cb = np.asarray(a[dim].values, float), np.asarray(b[dim].values, float)
        step = abs(ca[1] - ca[0]) if ca.size > 1 else 1.0
        if ca.shape != cb.shape or np.max(np.abs(ca - cb)) > 1e-6 * step:
            raise InputError(f"The truth grid is not aligned with the velocity grid along {dim!r} "
                             f"({cb.size} vs {ca.size} pixels).", field="truth",
                             fix="resample one onto the other first (truth.rio.reproject_match(velocity) or "
                                 "truth.interp_like(velocity))")


def validate_against_truth(vertical_velocity, truth, *, max_scatter_points: int = 5000, seed: int = 0) -> dict:
    """Compare a velocity grid with a truth grid on the same (y, x) grid; statistics over pixels with both.

    Returns ``overall`` statistics, ``coverage`` (fraction of truth pixels with an estimate) and ``scatter``
    (``truth``, ``estimate`` arrays as lists, a reproducible random subsample of at most
    ``max_scatter_points``).
    """
    _check_aligned(vertical_velocity, truth)
    e = np.asarray(to_numpy(vertical_velocity.transpose("y", "x").data), float)
    r = np.asarray(to_numpy(truth.transpose("y", "x").data), float)
    stats = error_statistics(e, r)
    ok = np.isfinite(e) & np.isfinite(r)
    idx = np.flatnonzero(ok)
    if idx.size > max_scatter_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_scatter_points, replace=False))
    n_truth = int(np.sum(np.isfinite(r)))
    return {"overall": stats, "coverage": float(ok.sum() / n_truth) if n_truth else float("nan"),
            "scatter": {"truth": r.ravel()[idx].tolist(), "estimate": e.ravel()[idx].tolist()}}


def validate_timeseries_against_gnss(cube, gnss_series: Mapping[str, Any], stations, *, method: str = "bilinear",
                                     crs=None) -> dict:
    """Compare a displacement cube (time, y, x; mm, positive up) with GNSS up time series at stations.

    ``gnss_series`` maps station name → ``pandas.Series`` of up displacement (mm) indexed by date. The cube is
    sampled at the station and the GNSS series is interpolated linearly to the cube's epochs inside its span;
    both are referenced to their common mean (the datum of each is arbitrary). Returns per-station statistics
    and pooled ``overall`` statistics of the epoch differences.
    """
    import pandas as pd

    _stations_check(stations, "lon")
    c = cube.transpose("time", "y", "x")
    t = pd.DatetimeIndex(c["time"].values)
    per, all_e, all_r = {}, [], []
    for name, series in gnss_series.items():
        row = stations[stations["station"] == name]
        if row.empty:
            raise InputError(f"GNSS series {name!r} has no station in the stations table.", field="gnss_series",
                             fix="add the station (with lon/lat) to the table or drop its series")
        lon, lat = float(row["lon"].iloc[0]), float(row["lat"].iloc[0])
        ins = np.array([sample_grid(c.isel(time=k), [lon], [lat], method=method, crs=crs)[0]
                        for k in range(t.size)])
        s = series.dropna().sort_index()
        sx = pd.DatetimeIndex(s.index).asi8.astype(float)
        inside = (t.asi8 >= sx.min()) & (t.asi8 <= sx.max()) if len(s) else np.zeros(t.size, bool)
        g = np.where(inside, np.interp(t.asi8.astype(float), sx, s.to_numpy(float)) if len(s) else np.nan, np.nan)
        ok = np.isfinite(ins) & np.isfinite(g)
        if ok.sum() == 0:
            per[name] = error_statistics([], [])
            continue
        e = ins[ok] - ins[ok].mean()
        r = g[ok] - g[ok].mean()
        per[name] = error_statistics(e, r)
        all_e.append(e)
        all_r.append(r)
    overall = error_statistics(np.concatenate(all_e) if all_e else [], np.concatenate(all_r) if all_r else [])
    return {"overall": overall, "per_station": per}
