"""Tectonic plate motion from PROJ's own ITRF plate motion models (PMMs), and reference-frame conversions.

The rotation poles are never typed in here: they are read by PROJ from the init files ``ITRF2014`` and
``ITRF2020`` of its data directory (entries such as ``<EURA> +proj=helmert +drx=... +convention=position_vector``),
and the velocity of a point carried by a plate is obtained by evaluating that Helmert transformation at two
coordinate epochs through pyproj.

Model definitions followed:

* **ITRF2014-PMM** (Altamimi et al., 2017, GJI 209:1906): pure rotation poles; its origin rate bias was found
  insignificant and is *not* part of the model (PROJ's file has none), so the plate velocity is ``ω × X``.
* **ITRF2020-PMM** (Altamimi et al., 2023, GRL doi:10.1029/2023GL106373): the model includes a significant
  origin rate bias (ORB). PROJ ships it as the ``<PLATE>_T`` entries (``+dx/+dy/+dz`` translation rates on top of
  the rotation). As the authors advise, the ORB is added to the **horizontal** velocities predicted by the pole,
  and the vertical velocity it would produce is discarded (the vertical is that of the rotation alone).

Velocities are mm/yr in the local east/north/up frame of the GRS80 ellipsoid (geodetic latitude); coordinates
are degrees, heights metres above the ellipsoid (0 when unknown: a 1 km height changes the velocity by < 0.01
mm/yr). Plate motion is smooth, so these functions run on the host (pyproj) and return NumPy arrays; callers
move the result to their array backend.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import GeometryError, PlateModelError

__all__ = [
    "PLATE_MODELS",
    "FRAME_ALIASES",
    "list_plates",
    "plate_model_file",
    "euler_vector",
    "plate_velocity_enu",
    "plate_velocity_cartesian",
    "normalise_frame",
    "to_plate_fixed",
    "to_itrf",
    "plate_motion_los",
]

log = logging.getLogger(__name__)

PLATE_MODELS: tuple[str, ...] = ("ITRF2014", "ITRF2020")

# Frames a GNSS velocity table may be expressed in, and the ITRF realisation each is equivalent to at the
# 0.1 mm/yr level (IGS realisations are aligned to their ITRF by construction).
FRAME_ALIASES: dict[str, str] = {
    "ITRF2014": "ITRF2014", "IGS14": "ITRF2014", "IGB14": "ITRF2014",
    "ITRF2020": "ITRF2020", "IGS20": "ITRF2020", "IGB20": "ITRF2020",
    "ITRF2008": "ITRF2008", "IGS08": "ITRF2008", "IGB08": "ITRF2008",
    "ITRF2005": "ITRF2005", "IGS05": "ITRF2005",
    "ITRF2000": "ITRF2000",
}

# Half-span (years) of the two coordinate epochs at which a rate-only Helmert transformation is evaluated.
# Symmetric differencing cancels the second-order rotation term; ±50 yr keeps the rotation angle ~1e-7 rad, so
# the linearisation error is < 1e-6 mm/yr while the differenced coordinates stay far above float64 round-off.
_HALF_SPAN_YR = 50.0

_ENTRY = re.compile(r"^<([^>]+)>\s*(.*)$")


# --------------------------------------------------------------------------------------------------------------
# The PROJ init files
# --------------------------------------------------------------------------------------------------------------
def _data_dirs() -> list[Path]:
    import pyproj.datadir

    dirs = [Path(p) for p in pyproj.datadir.get_data_dir().split(os.pathsep) if p]
    try:
        dirs.append(Path(pyproj.datadir.get_user_data_dir()))
    except Exception:  # no user data directory configured
        pass
    return dirs


def _normalise_model(model: str) -> str:
    key = str(model).strip().upper()
    name = FRAME_ALIASES.get(key, key)
    if name not in PLATE_MODELS:
        raise PlateModelError(
            f"Unknown plate motion model {model!r}.", field="model",
            fix=f"choose one of {', '.join(PLATE_MODELS)} (IGS14 and IGS20 are accepted as aliases)")
    return name


def plate_model_file(model: str = "ITRF2014") -> Path:
    """Path of PROJ's init file for ``model`` (``ITRF2014`` or ``ITRF2020``) in its data directory."""
    name = _normalise_model(model)
    for d in _data_dirs():
        p = d / name
        if p.is_file():
            return p
    raise PlateModelError(
        f"PROJ's plate motion file {name!r} was not found in its data directory.",
        file=os.pathsep.join(str(d) for d in _data_dirs()), field="model",
        fix="reinstall pyproj (its wheels ship PROJ's ITRF files) or set PROJ_DATA to a PROJ data directory "
            "that contains them")


@functools.lru_cache(maxsize=None)
def _init_entries(model: str) -> dict[str, dict[str, float]]:
    """{entry name: {parameter: value}} of an init file (parameters without a value map to NaN)."""
    entries: dict[str, dict[str, float]] = {}
    for line in plate_model_file(model).read_text().splitlines():
        m = _ENTRY.match(line.strip())
        if not m or m.group(1) == "metadata":
            continue
        params: dict[str, float] = {}
        for tok in m.group(2).split():
            if not tok.startswith("+"):
                continue
            key, _, val = tok[1:].partition("=")
            try:
                params[key] = float(val)
            except ValueError:
                params[key] = math.nan
        entries[m.group(1)] = params
    return entries


def _is_plate_entry(name: str, params: dict[str, float]) -> bool:
    # Plate entries are pure rate Helmerts (rotation rates, no reference epoch); frame-to-frame entries carry
    # a t_epoch and are named after a frame.
    return ("drx" in params or "dry" in params or "drz" in params) and "t_epoch" not in params \
        and not name.upper().startswith("ITRF") and not name.endswith("_T")


def list_plates(model: str = "ITRF2014") -> list[str]:
    """Plate abbreviations of a PROJ plate motion model, e.g. ``['ANTA', 'ARAB', ..., 'EURA', ...]``."""
    name = _normalise_model(model)
    return sorted(k for k, v in _init_entries(name).items() if _is_plate_entry(k, v))


def _check_plate(plate: str, model: str) -> str:
    name = _normalise_model(model)
    key = str(plate).strip().upper()
    known = list_plates(name)
    if key not in known:
        raise PlateModelError(
            f"Unknown plate {plate!r} in the {name} plate motion model.", field="plate",
            fix=f"use one of the {name} plate abbreviations: {', '.join(known)}")
    return key


# --------------------------------------------------------------------------------------------------------------
# Velocities through pyproj
# --------------------------------------------------------------------------------------------------------------
_local = threading.local()  # pyproj Transformers are not shared between threads


def _transformer(pipeline: str):
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    t = cache.get(pipeline)
    if t is None:
        import pyproj

        try:
            t = pyproj.Transformer.from_pipeline(pipeline)
        except pyproj.exceptions.ProjError as exc:
            raise PlateModelError(f"PROJ could not build the transformation {pipeline!r}: {exc}", field="model",
                                  fix="check that pyproj's PROJ data directory holds the ITRF files") from exc
        cache[pipeline] = t
    return t


def _rate_of(pipeline: str, x, y, z):
    """d/dt of a time-dependent transformation at cartesian (x, y, z) m, in m/yr (symmetric difference)."""
    t = _transformer(pipeline)
    n = x.size
    a = t.transform(x, y, z, np.full(n, -_HALF_SPAN_YR))
    b = t.transform(x, y, z, np.full(n, _HALF_SPAN_YR))
    return tuple((np.asarray(bb) - np.asarray(aa)) / (2.0 * _HALF_SPAN_YR) for aa, bb in zip(a[:3], b[:3]))


def _validate_lonlat(lon, lat, height, field: str = "lat"):
    lon = np.asarray(backend.to_numpy(lon), dtype=np.float64)
    lat = np.asarray(backend.to_numpy(lat), dtype=np.float64)
    height = np.asarray(backend.to_numpy(height), dtype=np.float64)
    lon, lat, height = np.broadcast_arrays(lon, lat, height)
    if np.any(np.abs(lat) > 90.0):
        bad = lat[np.abs(lat) > 90.0]
        raise GeometryError(
            f"{bad.size} latitudes lie outside ±90 degrees (e.g. {bad.flat[0]:.6g}).", field=field,
            fix="give latitude and longitude in degrees (EPSG:4326) and check that they are not swapped")
    return lon, lat, np.where(np.isnan(height), 0.0, height)


def _geodetic_to_cartesian(lon, lat, height):
    c = _transformer("+proj=cart +ellps=GRS80")
    x, y, z = c.transform(lon.ravel(), lat.ravel(), height.ravel())
    return np.asarray(x), np.asarray(y), np.asarray(z)


def _cartesian_to_enu(vx, vy, vz, lon, lat):
    lam, phi = np.radians(lon), np.radians(lat)
    sl, cl, sp, cp = np.sin(lam), np.cos(lam), np.sin(phi), np.cos(phi)
    ve = -sl * vx + cl * vy
    vn = -sp * cl * vx - sp * sl * vy + cp * vz
    vu = cp * cl * vx + cp * sl * vy + sp * vz
    return ve, vn, vu


def plate_velocity_cartesian(x, y, z, *, plate: str = "EURA", model: str = "ITRF2014",
                             origin_rate_bias: bool | None = None):
    """ITRF velocity (vx, vy, vz), mm/yr, of points at geocentric cartesian (x, y, z) m carried by ``plate``.

    ``origin_rate_bias`` adds the model's ORB translation rate (default: True for ITRF2020, whose model defines
    one; ITRF2014 has none, and asking for it raises).
    """
    name = _normalise_model(model)
    key = _check_plate(plate, name)
    entries = _init_entries(name)
    if origin_rate_bias is None:
        origin_rate_bias = f"{key}_T" in entries
    if origin_rate_bias and f"{key}_T" not in entries:
        raise PlateModelError(
            f"The {name} plate motion model has no origin rate bias.", field="origin_rate_bias",
            fix="leave origin_rate_bias unset (ITRF2014-PMM is defined as pure rotation poles)")
    entry = f"{key}_T" if origin_rate_bias else key
    x, y, z = (np.asarray(v, dtype=np.float64).ravel() for v in (x, y, z))
    vx, vy, vz = _rate_of(f"+init={name}:{entry}", x, y, z)
    return vx * 1000.0, vy * 1000.0, vz * 1000.0


def euler_vector(plate: str = "EURA", model: str = "ITRF2014"):
    """(ωx, ωy, ωz) in mas/yr and the origin rate bias (Tx, Ty, Tz) in mm/yr of ``plate``, as PROJ applies them.

    Recovered by evaluating PROJ's transformation at the geocentre and on the axes (not read from a table):
    v(0) = T, v(R ê_x) - T = ω × R ê_x, v(R ê_y) - T = ω × R ê_y.
    """
    r = 6.4e6
    pts = np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0], [0.0, r, 0.0]])
    vx, vy, vz = plate_velocity_cartesian(pts[:, 0], pts[:, 1], pts[:, 2], plate=plate, model=model)
    t = np.array([vx[0], vy[0], vz[0]])
    wx = (vz[2] - t[2]) / r  # (ω × R ê_y)_z = ωx R
    wy = -(vz[1] - t[2]) / r  # (ω × R ê_x)_z = -ωy R
    wz = (vy[1] - t[1]) / r  # (ω × R ê_x)_y = ωz R
    mas = math.radians(1.0 / 3.6e6) * 1000.0  # mm/yr per (mas/yr · m)
    return np.array([wx, wy, wz]) / mas, t


def plate_velocity_enu(lon, lat, height=0.0, *, plate: str = "EURA", model: str = "ITRF2014"):
    """East, north, up velocity (mm/yr, NumPy float64 arrays shaped like the broadcast inputs) of points carried
    by ``plate`` in the ITRF of ``model``.

    ``lon``/``lat`` degrees, ``height`` metres above the GRS80 ellipsoid (NaN counts as 0). For ITRF2020 the
    origin rate bias is added to the horizontal components only, as the model prescribes.
    """
    name = _normalise_model(model)
    key = _check_plate(plate, name)
    lon, lat, height = _validate_lonlat(lon, lat, height)
    shape = lon.shape
    x, y, z = _geodetic_to_cartesian(lon, lat, height)
    ve, vn, vu = _cartesian_to_enu(*plate_velocity_cartesian(x, y, z, plate=key, model=name,
                                                              origin_rate_bias=False),
                                   lon.ravel(), lat.ravel())
    if f"{key}_T" in _init_entries(name):
        ve, vn, _ = _cartesian_to_enu(*plate_velocity_cartesian(x, y, z, plate=key, model=name,
                                                                 origin_rate_bias=True),
                                      lon.ravel(), lat.ravel())
    return ve.reshape(shape), vn.reshape(shape), vu.reshape(shape)


# --------------------------------------------------------------------------------------------------------------
# Stations tables between frames
# --------------------------------------------------------------------------------------------------------------
def normalise_frame(name: str, *, file=None) -> tuple[str, str | None]:
    """Classify a reference-frame name: ``("ITRF2014", None)``, ``("ITRF2020", None)`` (from ``IGS20`` too) or
    ``("fixed", "EURA")`` for ``"EURA-fixed"``. Unknown names raise :class:`PlateModelError`."""
    if name is None or not str(name).strip():
        raise PlateModelError(
            "The GNSS velocities have no reference frame.", file=file, field='attrs["reference_frame"]',
            fix='set stations.attrs["reference_frame"] (e.g. "ITRF2014", "IGS20" or "EURA-fixed"), or pass '
                'reference_frame= to io.gnss.read_gnss')
    key = str(name).strip().upper().replace("_", "-")
    if key in FRAME_ALIASES:
        return FRAME_ALIASES[key], None
    m = re.fullmatch(r"([A-Z]{4})[- ]?FIXED", key)
    if m:
        return "fixed", m.group(1)
    raise PlateModelError(
        f"Unknown GNSS reference frame {name!r}.", file=file, field='attrs["reference_frame"]',
        fix=f"use one of {', '.join(sorted(FRAME_ALIASES))} or '<PLATE>-fixed' (e.g. 'EURA-fixed')")


def _itrf_to_itrf_rate(frame_from: str, frame_to: str, lon, lat, height):
    """ENU velocity change (mm/yr) going from one ITRF realisation to another, from PROJ's Helmert rates."""
    if frame_from == frame_to:
        z = np.zeros(np.shape(lon))
        return z, z, z
    # An init file holds the transformations *from* its frame to other realisations ("+init=ITRF2020:ITRF2014"
    # maps ITRF2020 coordinates to ITRF2014), so either direction is found there; the rate part of the Helmert
    # (about its reference epoch) is the velocity change.
    if frame_from in PLATE_MODELS and frame_to in _init_entries(frame_from):
        pipeline, sign = f"+init={frame_from}:{frame_to}", 1.0
    elif frame_to in PLATE_MODELS and frame_from in _init_entries(frame_to):
        pipeline, sign = f"+init={frame_to}:{frame_from}", -1.0
    else:
        pipeline = None
    if pipeline is not None:
        x, y, z = _geodetic_to_cartesian(lon, lat, height)
        dvx, dvy, dvz = _rate_of(pipeline, x, y, z)
        ve, vn, vu = _cartesian_to_enu(dvx * 1000.0, dvy * 1000.0, dvz * 1000.0, lon.ravel(), lat.ravel())
        shape = np.shape(lon)
        return (sign * ve).reshape(shape), (sign * vn).reshape(shape), (sign * vu).reshape(shape)
    raise PlateModelError(
        f"PROJ has no transformation between {frame_from} and {frame_to}.", field='attrs["reference_frame"]',
        fix=f"give the GNSS velocities in {frame_to} (or IGS equivalent), or use the plate motion model of "
            f"their frame")


def _station_arrays(stations):
    for col in ("lon", "lat", "ve", "vn"):
        if col not in stations.columns:
            raise PlateModelError(
                f"The stations table has no {col!r} column.", file=stations.attrs.get("path"), field=col,
                fix="read GNSS velocities with io.gnss.read_gnss, which gives the columns of docs/data-model.md")
    height = stations["height"].to_numpy(float) if "height" in stations.columns else np.zeros(len(stations))
    return _validate_lonlat(stations["lon"].to_numpy(float), stations["lat"].to_numpy(float), height)


def to_plate_fixed(stations, plate: str = "EURA", model: str = "ITRF2014"):
    """Copy of a Stations table with velocities relative to ``plate`` (``attrs["reference_frame"] =
    "<PLATE>-fixed"``).

    The input frame (``attrs["reference_frame"]``) may be an ITRF/IGS realisation (converted to the model's ITRF
    with PROJ's Helmert rates first, when it differs), or already ``"<PLATE>-fixed"`` (a different plate is
    converted through the ITRF of ``model``). Sigmas are left unchanged (the pole uncertainty is not propagated);
    a missing vertical stays missing.
    """
    name = _normalise_model(model)
    key = _check_plate(plate, name)
    kind, fixed_plate = normalise_frame(stations.attrs.get("reference_frame"), file=stations.attrs.get("path"))
    if kind == "fixed":
        if fixed_plate == key:
            return stations.copy()
        stations = to_itrf(stations, fixed_plate, name)
        kind = name
    lon, lat, h = _station_arrays(stations)
    out = stations.copy()
    de, dn, du = _itrf_to_itrf_rate(kind, name, lon, lat, h)
    pe, pn, pu = plate_velocity_enu(lon, lat, h, plate=key, model=name)
    out["ve"] = stations["ve"].to_numpy(float) + de - pe
    out["vn"] = stations["vn"].to_numpy(float) + dn - pn
    if "vu" in out.columns:
        out["vu"] = stations["vu"].to_numpy(float) + du - pu
    out.attrs = dict(stations.attrs)
    out.attrs.update(reference_frame=f"{key}-fixed", plate_model=name)
    log.info("GNSS velocities of %d stations: %s -> %s-fixed (%s PMM)", len(out), kind, key, name)
    return out


def to_itrf(stations, plate: str | None = None, model: str = "ITRF2014"):
    """Copy of a ``"<PLATE>-fixed"`` Stations table with velocities in the ITRF of ``model``
    (``attrs["reference_frame"] = model``); the inverse of :func:`to_plate_fixed`.

    A table already in an ITRF/IGS frame is converted to the model's ITRF realisation (PROJ Helmert rates).
    ``plate`` (default: the table's own fixed plate) must match the table's fixed plate.
    """
    name = _normalise_model(model)
    kind, fixed_plate = normalise_frame(stations.attrs.get("reference_frame"), file=stations.attrs.get("path"))
    key = _check_plate(plate, name) if plate is not None else None
    lon, lat, h = _station_arrays(stations)
    out = stations.copy()
    if kind == "fixed":
        key = key or _check_plate(fixed_plate, name)
        if fixed_plate != key:
            raise PlateModelError(
                f"The velocities are {fixed_plate}-fixed but plate={plate!r} was given.",
                file=stations.attrs.get("path"), field="plate",
                fix=f"pass plate={fixed_plate!r} (the plate the velocities are fixed to)")
        de, dn, du = plate_velocity_enu(lon, lat, h, plate=key, model=name)
    else:
        de, dn, du = _itrf_to_itrf_rate(kind, name, lon, lat, h)
    out["ve"] = stations["ve"].to_numpy(float) + de
    out["vn"] = stations["vn"].to_numpy(float) + dn
    if "vu" in out.columns:
        out["vu"] = stations["vu"].to_numpy(float) + du
    out.attrs = dict(stations.attrs)
    out.attrs.update(reference_frame=name, plate_model=name)
    return out


# --------------------------------------------------------------------------------------------------------------
# Plate motion in a frame's line of sight
# --------------------------------------------------------------------------------------------------------------
def frame_crs(frame):
    """The frame's CRS (rioxarray), or ``None`` when none is written (the data model's default: EPSG:4326)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    return frame.rio.crs


def _frame_lonlat(frame, rows, cols):
    """lon/lat (2-D, degrees) of pixel centres (rows × cols index vectors) of a frame."""
    xs = np.asarray(frame["x"].values, dtype=np.float64)[cols]
    ys = np.asarray(frame["y"].values, dtype=np.float64)[rows]
    xx, yy = np.meshgrid(xs, ys)
    crs = frame_crs(frame)
    if crs is not None and not crs.is_geographic:
        import pyproj

        t = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        xx, yy = t.transform(xx, yy)
    return np.asarray(xx), np.asarray(yy)


def _coarse_index(n: int, step: int) -> np.ndarray:
    idx = np.arange(0, n, step)
    return idx if idx[-1] == n - 1 else np.append(idx, n - 1)


def _linear_weights(n: int, nodes: np.ndarray) -> np.ndarray:
    """(n, len(nodes)) matrix of 1-D linear interpolation weights from ``nodes`` (indices) to 0..n-1."""
    eye = np.eye(nodes.size)
    return np.stack([np.interp(np.arange(n, dtype=float), nodes.astype(float), eye[j]) for j in range(nodes.size)],
                    axis=1)


def _coarse_plate_velocity(frame, plate, model, coarse_step, tolerance):
    """Plate velocity on a coarse pixel grid whose bilinear interpolation is within ``tolerance`` mm/yr.

    Returns ``(coarse, wy, wx, step)``: ``coarse`` the (ve, vn, vu) arrays on the coarse nodes, and the full
    field of each component is ``wy @ c @ wx.T`` (bilinear interpolation as two small matrix products, which
    runs on any array backend). With ``step == 1`` the "coarse" grid is every pixel and ``wy``/``wx`` are None.
    """
    ny, nx = frame.sizes["y"], frame.sizes["x"]
    lon_s, lat_s = _frame_lonlat(frame, np.array([0, ny // 2, ny - 1]), np.array([0, nx // 2, nx - 1]))
    # Pixel spacing in degrees (largest over the frame, so the step holds everywhere).
    dlon = np.max(np.abs(np.diff(lon_s, axis=1))) / max((nx - 1) / 2, 1)
    dlat = np.max(np.abs(np.diff(lat_s, axis=0))) / max((ny - 1) / 2, 1)
    step = max(int(coarse_step / max(dlon, dlat, 1e-12)), 1)

    def evaluate(lon, lat):
        return plate_velocity_enu(lon, lat, plate=plate, model=model)

    found = checked_coarse_grid(frame, evaluate, step, tolerance)
    if found is not None:
        return found
    return evaluate(*_frame_lonlat(frame, np.arange(ny), np.arange(nx))), None, None, 1


def checked_coarse_grid(frame, evaluate, step: int, tolerance: float):
    """A smooth field on a coarse pixel grid whose bilinear interpolation is within ``tolerance`` everywhere.

    ``evaluate(lon, lat)`` returns a tuple of 2-D arrays (one per component). Starting from ``step`` pixels, the
    interpolation is checked at the coarse cells' centres (where bilinear interpolation errs most) and the step
    halved until every component is within ``tolerance``. Returns ``(coarse, wy, wx, step)`` with the full
    field of each component ``wy @ c @ wx.T``, or None when no step of 2 pixels or more is accurate enough.
    """
    ny, nx = frame.sizes["y"], frame.sizes["x"]
    while step > 1:
        rows_c, cols_c = _coarse_index(ny, step), _coarse_index(nx, step)
        coarse = evaluate(*_frame_lonlat(frame, rows_c, cols_c))
        rm = (rows_c[:-1] + rows_c[1:]) // 2 if rows_c.size > 1 else rows_c
        cm = (cols_c[:-1] + cols_c[1:]) // 2 if cols_c.size > 1 else cols_c
        exact = evaluate(*_frame_lonlat(frame, rm, cm))
        wy, wx = _linear_weights(ny, rows_c), _linear_weights(nx, cols_c)
        err = max(float(np.max(np.abs(wy[rm] @ c @ wx[cm].T - m))) for c, m in zip(coarse, exact))
        if err <= tolerance:
            return coarse, wy, wx, step
        step //= 2
    return None


def plate_velocity_grid(frame, plate: str = "EURA", model: str = "ITRF2014", *, coarse_step: float = 0.5,
                        tolerance: float = 0.01, up: bool = True):
    """(ve, vn, vu, step): plate velocity (mm/yr, NumPy float64 (y, x)) at every pixel of ``frame``.

    Evaluated with PROJ on a grid of at most ``coarse_step`` degrees and interpolated bilinearly; the
    interpolation error is checked at the coarse cells' centres and the step halved until it is within
    ``tolerance`` mm/yr. ``step`` is the coarse grid's step in pixels (1: evaluated at every pixel).
    ``up=False`` leaves out the (near-zero) vertical rate: ``vu`` is None, a frame-sized array less.
    """
    coarse, wy, wx, step = _coarse_plate_velocity(frame, plate, model, coarse_step, tolerance)
    if step == 1:
        return (*coarse[:2], coarse[2] if up else None, step)
    return (*(wy @ c @ wx.T for c in coarse[:2]), wy @ coarse[2] @ wx.T if up else None, step)


def plate_motion_los(frame, plate: str = "EURA", model: str = "ITRF2014", *, coarse_step: float = 0.5,
                     tolerance: float = 0.01):
    """LOS velocity (mm/yr, positive toward the satellite) of the plate's rigid motion at every pixel of a frame.

    ``frame`` is a Frame Dataset (``los_e/los_n/los_u``). The plate velocity is evaluated with PROJ on a grid of
    at most ``coarse_step`` degrees and interpolated (checked to stay within ``tolerance`` mm/yr of the dense
    evaluation), then projected with the per-pixel unit vector on the unit vector's own array backend.
    Returns a float32 ``DataArray`` (y, x) named ``plate_motion_los``, NaN where the unit vector is NaN.
    """
    import xarray as xr

    for var in ("los_e", "los_n", "los_u"):
        if var not in frame:
            raise GeometryError(f"The frame has no {var!r} variable.", file=frame.attrs.get("path"), field=var,
                                fix="open the frame with io.frames.open_frame, which adds the LOS unit vector")
    t0 = time.perf_counter()
    coarse, wy, wx, step = _coarse_plate_velocity(frame, plate, model, coarse_step, tolerance)
    e, n, u = frame["los_e"].data, frame["los_n"].data, frame["los_u"].data
    xp = backend.namespace(e, n, u)
    f64 = xp.float64
    if step == 1:
        full = [backend.asarray(c, xp=xp, dtype=f64) for c in coarse]
    else:
        # Only the small coarse grid and weight matrices travel to the device; the interpolation runs there.
        wy_x, wx_t = backend.asarray(wy, xp=xp, dtype=f64), backend.asarray(wx.T, xp=xp, dtype=f64)
        full = [xp.matmul(xp.matmul(wy_x, backend.asarray(c, xp=xp, dtype=f64)), wx_t) for c in coarse]
    los = xp.astype(e, f64) * full[0] + xp.astype(n, f64) * full[1] + xp.astype(u, f64) * full[2]
    out = xr.DataArray(xp.astype(los, xp.float32), dims=("y", "x"), coords={"y": frame["y"], "x": frame["x"]},
                       name="plate_motion_los",
                       attrs={"units": "mm/yr", "plate": str(plate).upper(), "plate_model": _normalise_model(model),
                              "long_name": f"{str(plate).upper()} plate motion in the line of sight "
                                           f"({_normalise_model(model)}-PMM), positive toward the satellite"})
    if frame_crs(frame) is not None:
        out = out.rio.write_crs(frame_crs(frame), inplace=True)
    log.info("plate motion LOS for %s: %s %s, coarse step %d px, %.2f s", frame.attrs.get("frame_id", "frame"),
             plate, model, step, time.perf_counter() - t0)
    return out
