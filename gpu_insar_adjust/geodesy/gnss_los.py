"""GNSS velocities in a frame's line of sight.

For every station inside a frame's valid footprint, its 3-D velocity, expressed in the frame's reference (ITRF by
default, since Sentinel-1 orbits and hence InSAR LOS velocities are ITRF), is projected with the ground→satellite
unit vector of the nearest valid pixel:

    gnss_los = e*ve + n*vn + u*vu        (mm/yr, positive toward the satellite)

Stations without a vertical velocity are never treated as having zero vertical motion silently: by default
(``vertical="require"``) they are left out and named in the log and in ``attrs["no_vertical"]``; with
``vertical="horizontal_only"`` they are kept, flagged ``horizontal_only=True``, and their ``gnss_los`` is the LOS
of the horizontal motion alone (``e*ve + n*vn``), for callers that add the vertical from elsewhere.
"""

from __future__ import annotations

import logging

import numpy as np

from .. import backend
from ..errors import GeometryError, GnssError
from . import los as _los
from . import plates

__all__ = ["gnss_in_frame", "stations_to_reference"]

log = logging.getLogger(__name__)

VERTICAL_MODES = ("require", "horizontal_only")


def stations_to_reference(stations, frame_reference: str = "ITRF", *, plate: str | None = None,
                          model: str = "ITRF2014"):
    """Convert a Stations table to the reference of a frame's LOS velocities.

    ``frame_reference``: ``"ITRF"`` (the ITRF of ``model``; Sentinel-1 products as processed), an ITRF/IGS name
    (``"ITRF2014"``, ``"IGS20"``; its model is then used), ``"<PLATE>-fixed"``, or ``"plate-fixed"`` (with
    ``plate``), for frames whose plate motion was already removed.
    """
    ref = str(frame_reference).strip()
    if ref.upper() == "ITRF":
        return plates.to_itrf(stations, plate, model)
    if ref.lower() == "plate-fixed":
        if plate is None:
            raise GnssError("frame_reference='plate-fixed' needs the plate.", field="plate",
                            fix=f"pass plate= one of {', '.join(plates.list_plates(model))}")
        return plates.to_plate_fixed(stations, plate, model)
    kind, fixed = plates.normalise_frame(ref)
    if kind == "fixed":
        if plate is not None and str(plate).upper() != fixed:
            raise GnssError(f"frame_reference {ref!r} and plate={plate!r} disagree.", field="plate",
                            fix=f"pass plate={fixed!r} or leave it out")
        return plates.to_plate_fixed(stations, fixed, model)
    return plates.to_itrf(stations, plate, kind)


def _nearest_index(coords: np.ndarray, values: np.ndarray):
    """Nearest index of each value in a 1-D coordinate vector, and whether it lies within half a pixel of it."""
    step = float(np.median(np.abs(np.diff(coords)))) if coords.size > 1 else np.inf
    idx = np.abs(values[:, None] - coords[None, :]).argmin(axis=1)
    inside = np.abs(coords[idx] - values) <= 0.5 * step * (1 + 1e-9)
    return idx, inside


def gnss_in_frame(stations, frame, *, plate: str | None = None, model: str = "ITRF2014",
                  frame_reference: str = "ITRF", vertical: str = "require", search_radius: int = 2):
    """GNSS velocities projected into a frame's LOS, for the stations inside its valid footprint.

    Parameters
    ----------
    stations
        Stations table (docs/data-model.md) with ``attrs["reference_frame"]``.
    frame
        Frame Dataset with ``los_e/los_n/los_u`` (any array backend); ``los_velocity`` and ``mask``, when
        present, also restrict the valid pixels.
    plate, model, frame_reference
        See :func:`stations_to_reference`; by default the frame is taken as ITRF (Sentinel-1 orbits) and
        plate-fixed stations are converted to the ITRF of ``model``.
    vertical
        ``"require"`` (stations without ``vu`` are left out, and listed in ``attrs["no_vertical"]``) or
        ``"horizontal_only"`` (kept, flagged, LOS of the horizontal motion only).
    search_radius
        Pixels searched around a station for the nearest valid pixel when its own pixel has no data.

    Returns
    -------
    pandas.DataFrame
        ``station, lon, lat, row, col, los_e, los_n, los_u, ve, vn, vu, gnss_los, gnss_los_std,
        horizontal_only`` (mm/yr); ``attrs``: ``reference_frame``, ``frame_id``, ``outside`` (stations outside
        the valid footprint), ``no_vertical``.
    """
    import pandas as pd

    if vertical not in VERTICAL_MODES:
        raise GnssError(f"Unknown vertical mode {vertical!r}.", field="vertical",
                        fix=f"use one of {', '.join(VERTICAL_MODES)}")
    for var in ("los_e", "los_n", "los_u"):
        if var not in frame:
            raise GeometryError(f"The frame has no {var!r} variable.", file=frame.attrs.get("path"), field=var,
                                fix="open the frame with io.frames.open_frame, which adds the LOS unit vector")
    for col in ("station", "lon", "lat", "ve", "vn"):
        if col not in stations.columns:
            raise GnssError(f"The stations table has no {col!r} column.", file=stations.attrs.get("path"),
                            field=col, fix="read GNSS velocities with io.gnss.read_gnss")
    if "vu" not in stations.columns:
        stations = stations.assign(vu=np.nan)  # a table without verticals: every station is horizontal-only
    ref = stations_to_reference(stations, frame_reference, plate=plate, model=model)

    lon = ref["lon"].to_numpy(float)
    lat = ref["lat"].to_numpy(float)
    plates._validate_lonlat(lon, lat, 0.0)
    # Station positions in the frame's CRS.
    xs, ys = lon, lat
    crs = plates.frame_crs(frame)  # None: the data model's default, geographic degrees
    if crs is not None and not crs.is_geographic:
        import pyproj

        xs, ys = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
        xs, ys = np.asarray(xs), np.asarray(ys)
    xc = np.asarray(frame["x"].values, float)
    yc = np.asarray(frame["y"].values, float)
    col, in_x = _nearest_index(xc, xs)
    row, in_y = _nearest_index(yc, ys)
    ny, nx = yc.size, xc.size

    arrays = [frame[v].data for v in ("los_e", "los_n", "los_u")]
    vel = frame["los_velocity"].data if "los_velocity" in frame else None
    mask = frame["mask"].data if "mask" in frame else None

    rec = []
    outside = []
    for i in range(len(ref)):
        name = ref["station"].iloc[i]
        if not (in_x[i] and in_y[i]):
            outside.append(name)
            continue
        r0, r1 = max(row[i] - search_radius, 0), min(row[i] + search_radius + 1, ny)
        c0, c1 = max(col[i] - search_radius, 0), min(col[i] + search_radius + 1, nx)
        # Small windows only: the one device→host copy per station is a few pixels.
        e, n, u = (backend.to_numpy(a[r0:r1, c0:c1]).astype(float) for a in arrays)
        ok = np.isfinite(e) & np.isfinite(n) & np.isfinite(u)
        if vel is not None:
            ok &= np.isfinite(backend.to_numpy(vel[r0:r1, c0:c1]))
        if mask is not None:
            ok &= backend.to_numpy(mask[r0:r1, c0:c1]).astype(bool)
        if not ok.any():
            outside.append(name)
            continue
        rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        d2 = np.where(ok, (rr - row[i]) ** 2 + (cc - col[i]) ** 2, np.inf)
        k = np.unravel_index(np.argmin(d2), d2.shape)
        rec.append((i, int(rr[k]), int(cc[k]), e[k], n[k], u[k]))

    idx = np.array([r[0] for r in rec], dtype=int)
    sub = ref.iloc[idx]
    vu = sub["vu"].to_numpy(float)
    horizontal_only = ~np.isfinite(vu)
    no_vertical = list(sub["station"].to_numpy()[horizontal_only])
    if vertical == "require" and no_vertical:
        log.warning("%d stations inside %s have no vertical velocity and are left out (vertical='require'): %s",
                    len(no_vertical), frame.attrs.get("frame_id", "the frame"),
                    ", ".join(map(str, no_vertical[:10])) + (", ..." if len(no_vertical) > 10 else ""))
        keep = ~horizontal_only
        rec = [r for r, k in zip(rec, keep) if k]
        sub, vu, horizontal_only = sub[keep], vu[keep], horizontal_only[keep]

    e = np.array([r[3] for r in rec], float)
    n = np.array([r[4] for r in rec], float)
    u = np.array([r[5] for r in rec], float)
    ve, vn = sub["ve"].to_numpy(float), sub["vn"].to_numpy(float)

    def sig(c):
        return sub[c].to_numpy(float) if c in sub.columns else np.full(len(sub), np.nan)

    se, sn, su = sig("se"), sig("sn"), sig("su")
    # Horizontal-only stations: the vertical term is dropped explicitly (flagged), not set to a zero velocity.
    vu_used = np.where(horizontal_only, 0.0, vu)
    su_used = np.where(horizontal_only, 0.0, su)
    gnss_los = _los.enu_to_los(ve, vn, vu_used, e, n, u)
    gnss_std = _los.enu_std_to_los_std(se, sn, su_used, e, n, u)

    out = pd.DataFrame({
        "station": sub["station"].to_numpy(), "lon": sub["lon"].to_numpy(float), "lat": sub["lat"].to_numpy(float),
        "row": np.array([r[1] for r in rec], dtype=np.int64), "col": np.array([r[2] for r in rec], dtype=np.int64),
        "los_e": e, "los_n": n, "los_u": u, "ve": ve, "vn": vn, "vu": vu,
        "gnss_los": np.asarray(gnss_los, float), "gnss_los_std": np.asarray(gnss_std, float),
        "horizontal_only": horizontal_only,
    })
    out.attrs = {"reference_frame": ref.attrs.get("reference_frame"), "frame_id": frame.attrs.get("frame_id"),
                 "outside": outside, "no_vertical": no_vertical, "vertical": vertical}
    log.info("%d GNSS stations in %s (%d outside its valid footprint, %d horizontal-only)", len(out),
             frame.attrs.get("frame_id", "the frame"), len(outside), int(horizontal_only.sum()))
    return out
