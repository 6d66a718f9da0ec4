"""InSAR − GNSS LOS differences at the GNSS stations of one frame.

For each station inside the frame, the InSAR LOS velocity is a robust statistic of a small window around the
station pixel (median, with a 1.4826·MAD spread), so one bad pixel or a local deformation feature smaller than
the window does not bias the difference. The window is ``window_m`` metres wide, converted to pixels with the
frame's spacing at the station latitude (degrees → metres on the WGS84 ellipsoid for geographic frames).

The difference ``residual = insar_los − gnss_los`` (mm/yr) gets the 1-σ

    sigma² = (1.4826·MAD)² / n_eff + median(los_std)² + gnss_los_std²

where n_eff is the number of valid window pixels (the window spread averages down; the product's own
``los_std`` is spatially correlated over the window and does not). Stations whose window is mostly invalid,
that fall outside the frame, or whose GNSS LOS is unknown are dropped and reported with the reason.

Coordinates: :func:`local_xy_km` maps lon/lat to frame-centred east/north km (an equirectangular projection on
the ellipsoid, accurate to about 0.1 % over a 250 km frame; the same function serves stations and pixels, so
the surfaces are consistent whatever its small distortion).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import backend
from ..errors import AdjustmentError, FrameError, GnssError

__all__ = ["local_xy_km", "frame_origin", "pixel_spacing_m", "station_residuals", "merge_colocated",
           "RESIDUAL_COLUMNS"]

_A = 6378137.0
_E2 = 6.69437999014e-3

#: Columns of the table returned by :func:`station_residuals`.
RESIDUAL_COLUMNS = ("station", "lon", "lat", "row", "col", "x_km", "y_km", "height_m", "incidence_deg",
                    "insar_los", "insar_los_sigma", "n_pixels", "gnss_los", "gnss_los_std", "residual", "sigma",
                    "weight")


def _radii(lat_deg, xp):
    s = xp.sin(lat_deg * (math.pi / 180.0))
    den = 1.0 - _E2 * s * s
    n = _A / xp.sqrt(den)
    m = _A * (1.0 - _E2) / (den * xp.sqrt(den))
    return n, m


def local_xy_km(lon, lat, lon0: float, lat0: float, xp=None):
    """Frame-centred east/north coordinates (km) of lon/lat (degrees), any array-API namespace.

    x = Δλ·N(φ)·cos φ, y = Δφ·M((φ+φ0)/2) with N, M the WGS84 prime-vertical and meridian radii.
    """
    if xp is None:
        if isinstance(lon, (int, float)) or isinstance(lon, np.ndarray) or isinstance(lon, (list, tuple)):
            lon = np.asarray(lon, dtype=np.float64)
            lat = np.asarray(lat, dtype=np.float64)
        xp = backend.namespace(lon, lat)
    lon = xp.astype(lon, xp.float64) if hasattr(lon, "dtype") else xp.asarray(lon, dtype=xp.float64)
    lat = xp.astype(lat, xp.float64) if hasattr(lat, "dtype") else xp.asarray(lat, dtype=xp.float64)
    n, _ = _radii(lat, xp)
    _, m = _radii((lat + lat0) / 2.0, xp)
    rad = math.pi / 180.0
    x = (lon - lon0) * rad * n * xp.cos(lat * rad) / 1000.0
    y = (lat - lat0) * rad * m / 1000.0
    return x, y


def _is_geographic(frame) -> bool:
    crs = None
    try:
        crs = frame.rio.crs
    except Exception:  # rioxarray not attached or no CRS written
        crs = None
    if crs is not None:
        return bool(crs.is_geographic)
    x, y = np.asarray(frame["x"]), np.asarray(frame["y"])
    return bool(np.all(np.abs(x) <= 360.0) and np.all(np.abs(y) <= 90.0))


def _check_frame(frame) -> None:
    fid = frame.attrs.get("path", frame.attrs.get("frame_id"))
    if "los_velocity" not in frame.data_vars:
        raise FrameError("Frame has no 'los_velocity' variable.", file=fid, field="los_velocity",
                         fix="open the frame with gpu_insar_adjust.io.frames.open_frame")
    if frame["los_velocity"].dims != ("y", "x") or frame.sizes["x"] < 2 or frame.sizes["y"] < 2:
        raise FrameError(f"'los_velocity' must have dims (y, x) with at least 2×2 pixels, got "
                         f"{frame['los_velocity'].dims} {dict(frame.sizes)}.", file=fid, field="los_velocity",
                         fix="pass one frame as a (y, x) Dataset as documented in docs/data-model.md")
    if not _is_geographic(frame):
        raise FrameError("The adjustment expects a frame in geographic coordinates (EPSG:4326).", file=fid,
                         field="crs", fix="reproject the frame to EPSG:4326 (e.g. rioxarray .rio.reproject)")


def frame_origin(frame) -> tuple[float, float]:
    """(lon0, lat0), the centre of the frame's extent: the origin of its ``x_km``/``y_km``."""
    x, y = np.asarray(frame["x"], dtype=np.float64), np.asarray(frame["y"], dtype=np.float64)
    return float((x.min() + x.max()) / 2.0), float((y.min() + y.max()) / 2.0)


def pixel_spacing_m(frame, lat: float) -> tuple[float, float]:
    """(dy_m, dx_m): pixel height and width in metres at latitude ``lat`` (degrees)."""
    x, y = np.asarray(frame["x"], dtype=np.float64), np.asarray(frame["y"], dtype=np.float64)
    n, m = _radii(np.float64(lat), np)
    rad = math.pi / 180.0
    return (abs(float(y[1] - y[0])) * rad * float(m),
            abs(float(x[1] - x[0])) * rad * float(n) * math.cos(lat * rad))


def _stations_file(stations) -> str | None:
    return stations.attrs.get("path") if hasattr(stations, "attrs") else None


def station_residuals(frame, stations: pd.DataFrame, *, window_m: float = 500.0, min_valid_fraction: float = 0.5,
                      use_horizontal_only: bool = False, min_sigma: float = 0.3,
                      origin: tuple[float, float] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """InSAR − GNSS LOS difference (mm/yr) and its σ at every usable station of ``frame``.

    Parameters
    ----------
    frame
        Frame Dataset (docs/data-model.md): ``los_velocity`` (y, x) mm/yr; optional ``los_std``, ``mask``,
        ``dem``, ``los_u``.
    stations
        Output of :func:`gpu_insar_adjust.geodesy.gnss_los.gnss_in_frame`: ``station``, ``lon``, ``lat``,
        ``gnss_los``, ``gnss_los_std`` (mm/yr), optional ``row``/``col`` (pixel of the station; computed from
        lon/lat when absent) and ``horizontal_only``.
    window_m
        Full width of the square window (m); at least the station pixel is used.
    min_valid_fraction
        Stations with a smaller fraction of valid pixels in their window are dropped.
    use_horizontal_only
        Keep stations whose GNSS LOS lacks the vertical (dropped by default: the unknown vertical would enter
        the difference).
    min_sigma
        Floor on σ (mm/yr) so that no station dominates the weighted fits.
    origin
        (lon0, lat0) of ``x_km``/``y_km``; the frame centre by default.

    Returns
    -------
    table, dropped
        ``table`` has :data:`RESIDUAL_COLUMNS` (``weight`` = 1/σ²); ``dropped`` lists ``{"station", "reason"}``.
    """
    _check_frame(frame)
    need = ("station", "lon", "lat", "gnss_los", "gnss_los_std")
    missing = [c for c in need if c not in stations.columns]
    if missing:
        raise GnssError(f"Station table lacks column(s) {', '.join(missing)}.", file=_stations_file(stations),
                        field=", ".join(missing),
                        fix="project GNSS velocities into the frame with geodesy.gnss_los.gnss_in_frame first")
    dup = stations["station"][stations["station"].duplicated()].unique().tolist()
    if dup:
        raise GnssError(f"Station name(s) {', '.join(map(str, dup[:5]))} occur more than once.",
                        file=_stations_file(stations), field="station",
                        fix="keep one row per station (one velocity per station)")
    if window_m < 0 or not (0.0 <= min_valid_fraction <= 1.0):
        raise AdjustmentError("window_m must be ≥ 0 and min_valid_fraction within [0, 1].",
                              field="adjust.window_m", fix="e.g. window_m=500, min_valid_fraction=0.5")
    lon0, lat0 = frame_origin(frame) if origin is None else origin
    xc = np.asarray(frame["x"], dtype=np.float64)
    yc = np.asarray(frame["y"], dtype=np.float64)
    ny, nx = yc.size, xc.size
    dxd, dyd = float(xc[1] - xc[0]), float(yc[1] - yc[0])
    has = {v: v in frame.data_vars for v in ("los_std", "mask", "dem", "los_u")}

    rows, dropped = [], []
    for _, st in stations.iterrows():
        name = str(st["station"])
        lon, lat = float(st["lon"]), float(st["lat"])
        if "row" in stations.columns and "col" in stations.columns and np.isfinite(st["row"]) \
                and np.isfinite(st["col"]):
            r0, c0 = int(st["row"]), int(st["col"])
        else:
            r0, c0 = int(round((lat - yc[0]) / dyd)), int(round((lon - xc[0]) / dxd))
        if not (0 <= r0 < ny and 0 <= c0 < nx):
            dropped.append({"station": name, "reason": "outside the frame"})
            continue
        if not np.isfinite(st["gnss_los"]):
            dropped.append({"station": name, "reason": "no GNSS LOS velocity"})
            continue
        gstd = float(st["gnss_los_std"])
        if not np.isfinite(gstd) or gstd < 0:
            dropped.append({"station": name, "reason": "no GNSS LOS uncertainty"})
            continue
        if bool(st.get("horizontal_only", False)) and not use_horizontal_only:
            dropped.append({"station": name, "reason": "horizontal-only GNSS (vertical unknown)"})
            continue
        dy_m, dx_m = pixel_spacing_m(frame, lat)
        hr = int(math.floor(window_m / 2.0 / dy_m)) if dy_m > 0 else 0
        hc = int(math.floor(window_m / 2.0 / dx_m)) if dx_m > 0 else 0
        nominal = (2 * hr + 1) * (2 * hc + 1)
        sl = {"y": slice(max(r0 - hr, 0), r0 + hr + 1), "x": slice(max(c0 - hc, 0), c0 + hc + 1)}
        win = frame.isel(sl)
        v = np.asarray(backend.to_numpy(win["los_velocity"].data), dtype=np.float64)
        ok = np.isfinite(v)
        if has["mask"]:
            ok &= np.asarray(backend.to_numpy(win["mask"].data), dtype=bool)
        n_valid = int(ok.sum())
        if n_valid == 0 or n_valid < min_valid_fraction * nominal:
            dropped.append({"station": name,
                            "reason": f"window mostly invalid ({n_valid}/{nominal} valid pixels)"})
            continue
        vals = v[ok]
        med = float(np.median(vals))
        spread = 1.4826 * float(np.median(np.abs(vals - med))) if n_valid >= 3 else 0.0
        pix_std = 0.0
        if has["los_std"]:
            s = np.asarray(backend.to_numpy(win["los_std"].data), dtype=np.float64)[ok]
            s = s[np.isfinite(s)]
            pix_std = float(np.median(s)) if s.size else 0.0
        insar_sigma = math.sqrt(spread ** 2 / n_valid + pix_std ** 2)
        sigma = max(math.sqrt(insar_sigma ** 2 + gstd ** 2), min_sigma)

        def _wmedian(var, transform=None):
            if not has[var]:
                return float("nan")
            a = np.asarray(backend.to_numpy(win[var].data), dtype=np.float64)
            if transform is not None:
                a = transform(a)
            a = a[ok & np.isfinite(a)]
            return float(np.median(a)) if a.size else float("nan")

        height = _wmedian("dem")
        incidence = _wmedian("los_u", lambda u: np.degrees(np.arccos(np.clip(u, -1.0, 1.0))))
        x_km, y_km = local_xy_km(np.float64(lon), np.float64(lat), lon0, lat0, xp=np)
        rows.append({"station": name, "lon": lon, "lat": lat, "row": r0, "col": c0, "x_km": float(x_km),
                     "y_km": float(y_km), "height_m": height, "incidence_deg": incidence, "insar_los": med,
                     "insar_los_sigma": insar_sigma, "n_pixels": n_valid, "gnss_los": float(st["gnss_los"]),
                     "gnss_los_std": gstd, "residual": med - float(st["gnss_los"]), "sigma": sigma,
                     "weight": 1.0 / sigma ** 2})
    table = pd.DataFrame(rows, columns=list(RESIDUAL_COLUMNS))
    return table, dropped


def merge_colocated(table: pd.DataFrame, tolerance_m: float = 1.0) -> tuple[pd.DataFrame, list[dict]]:
    """Merge stations closer than ``tolerance_m`` (co-located monuments, duplicated coordinates).

    Identical coordinates would make the kernel surfaces singular and double-count one site in the CV. Each
    group becomes one row: inverse-variance weighted mean of the residual and features, σ = 1/sqrt(Σ 1/σ²),
    station names joined with ``+``. Returns the merged table and ``{"stations": [...], "merged_into": name}``
    per group (documented fallback; nothing is dropped silently).
    """
    if len(table) < 2:
        return table, []
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse import coo_matrix
    from scipy.spatial import cKDTree

    P = table[["x_km", "y_km"]].to_numpy(dtype=np.float64) * 1000.0
    pairs = np.array(sorted(cKDTree(P).query_pairs(tolerance_m)), dtype=np.int64).reshape(-1, 2)
    if pairs.size == 0:
        return table, []
    n = len(table)
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    out, merged = [], []
    for lab in np.unique(labels):
        grp = table.iloc[np.flatnonzero(labels == lab)]
        if len(grp) == 1:
            out.append(grp.iloc[0].to_dict())
            continue
        w = grp["weight"].to_numpy()
        row = grp.iloc[0].to_dict()
        for c in ("lon", "lat", "x_km", "y_km", "height_m", "incidence_deg", "insar_los", "gnss_los", "residual"):
            vals = grp[c].to_numpy(dtype=np.float64)
            row[c] = float(np.sum(w * vals) / np.sum(w)) if np.all(np.isfinite(vals)) else float(np.nanmean(vals))
        row["weight"] = float(np.sum(w))
        row["sigma"] = float(1.0 / math.sqrt(row["weight"]))
        row["station"] = "+".join(grp["station"].astype(str))
        merged.append({"stations": grp["station"].astype(str).tolist(), "merged_into": row["station"]})
        out.append(row)
    return pd.DataFrame(out, columns=list(table.columns)).reset_index(drop=True), merged
