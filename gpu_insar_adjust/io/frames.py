"""Read one Sentinel-1 frame (a folder) into a Frame ``xarray.Dataset``.

Two on-disk layouts are recognised, by the files present:

LiCSAR / LiCSBAS (GeoTIFF), ``<ID>`` being the frame id (folder name)::

    <ID>.vel.geo.tif | vel.geo.tif      LOS velocity, mm/yr, positive toward the satellite     (required)
    <ID>.vstd.geo.tif | vstd.geo.tif    its 1-sigma, mm/yr                                      (optional)
    <ID>.geo.E.tif | E.geo.tif          ground→satellite unit vector, east                      (required)
    <ID>.geo.N.tif | N.geo.tif          ... north                                               (required)
    <ID>.geo.U.tif | U.geo.tif          ... up; derived as sqrt(1 - E² - N²) when absent         (optional)
    <ID>.geo.hgt.tif | hgt.geo.tif      DEM height, m                                           (optional)
    mask.geo.tif                        1 = usable pixel, 0 / NaN = masked                      (optional)

MintPy (HDF5)::

    velocity.h5 | geo_velocity.h5       datasets ``velocity`` (+ ``velocityStd``), m/yr → converted to mm/yr
    geometryGeo.h5 (also inputs/, geo/geo_geometryRadar.h5, ...)
                                        ``incidenceAngle``, ``azimuthAngle`` (MintPy convention: azimuth of the
                                        ground→satellite vector from north, anticlockwise), ``height``
    height.tif                          DEM on the same grid, used when the geometry file has no height

Without a geometry file the unit vector is computed from the ``HEADING`` attribute (flight direction, clockwise
from north; ``ANTENNA_SIDE`` -1 = right-looking, 1 = left-looking) and one incidence angle for the whole frame,
taken, in this order, from the attributes ``CENTER_INCIDENCE_ANGLE`` / ``INCIDENCE_ANGLE``, from the slant-range
geometry (``STARTING_RANGE``, ``RANGE_PIXEL_SIZE``, ``WIDTH``, ``EARTH_RADIUS``, ``HEIGHT``: the centre incidence
MintPy's ``utils.incidence_angle`` computes for geocoded files), or else :data:`DEFAULT_INCIDENCE_DEG`; a
warning says which. Georeferencing comes from ``X_FIRST``/``Y_FIRST`` (the *outer corner* of the first pixel, so
pixel centres are ``X_FIRST + (i + 0.5) * X_STEP``), ``X_STEP``/``Y_STEP`` and ``EPSG``/``UTM_ZONE``/``X_UNIT``.

Every raster of one frame must share one grid (shape and transform); a mismatch is an error, never resampled
silently. Files are read whole (frames are 2-D and small) and the Dataset is only built once every file has
been read and checked, so a failure never leaves a half-read frame in use. Before a raster or dataset is read,
its declared size is compared with the memory available (:func:`check_fits_in_memory`), so a damaged or hostile
header claiming huge dimensions (a sparse file can be tiny on disk) gives a :class:`FrameError`, not an
exhausted machine.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FrameError, GeometryError

__all__ = ["open_frame", "list_frames", "is_frame_dir", "DEFAULT_INCIDENCE_DEG", "mintpy_grid",
           "mintpy_crs", "check_fits_in_memory"]

log = logging.getLogger(__name__)

#: Incidence angle (degrees) assumed for a MintPy velocity that has neither a geometry file nor any incidence
#: information in its attributes: the middle of the Sentinel-1 IW swath (about 30-45°). An error of ±8° here
#: changes the east/up unit-vector components by up to about 0.1.
DEFAULT_INCIDENCE_DEG = 37.0

# Grids of one frame must agree to this fraction of a pixel (float32 GeoTIFF headers round the origin).
_GRID_TOLERANCE_PIXELS = 1e-3

_MINTPY_VELOCITY_NAMES = ("velocity.h5", "geo_velocity.h5")
_MINTPY_GEOMETRY_NAMES = ("geometryGeo.h5", "inputs/geometryGeo.h5", "geo_geometryRadar.h5",
                          "geo/geo_geometryRadar.h5", "../inputs/geometryGeo.h5", "../geo/geo_geometryRadar.h5")
_VELOCITY_UNIT_TO_MM = {"m/year": 1000.0, "m/yr": 1000.0, "m/a": 1000.0, "cm/year": 10.0, "cm/yr": 10.0,
                        "mm/year": 1.0, "mm/yr": 1.0, "mm/a": 1.0}


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
def open_frame(path: str | os.PathLike) -> "xarray.Dataset":  # noqa: F821
    """Open one frame folder (or its velocity file) as a Frame Dataset.

    Parameters
    ----------
    path
        The frame folder (LiCSBAS GeoTIFFs or a MintPy ``velocity.h5``), or the velocity file itself
        (``vel.geo.tif``, ``<ID>.vel.geo.tif``, ``velocity.h5``).

    Returns
    -------
    xarray.Dataset
        Variables ``los_velocity`` (mm/yr, positive toward the satellite), ``los_std`` (mm/yr, if present),
        ``los_e``, ``los_n``, ``los_u`` (ground→satellite unit vector), ``dem`` (m, if present), ``mask`` (bool,
        True = usable, if present); float32 on dims (y, x) of pixel-centre coordinates, CRS written with
        rioxarray; attributes ``frame_id`` (folder name), ``source`` (``licsbas`` | ``mintpy``), ``path``,
        ``orbit`` (``ascending`` when mean ``los_e`` < 0, else ``descending``).

    Raises
    ------
    FrameError
        Missing velocity or geometry, a raster without CRS, rasters on different grids, unknown units.
    GeometryError
        Unit vectors whose norm is far from 1, or incidence angles out of range.
    """
    t0 = time.perf_counter()
    folder, vel_file = _resolve(path)
    layout = _layout(folder, vel_file)
    reader = _read_licsbas if layout == "licsbas" else _read_mintpy
    variables, grid = reader(folder, vel_file)
    _check_plausible(variables, folder)
    source = layout
    ds = _build_dataset(variables, grid, frame_id=folder.name, source=source, folder=folder)
    log.info("opened frame %s (%s, %d x %d pixels, %s) in %.2f s", ds.attrs["frame_id"], source,
             ds.sizes["y"], ds.sizes["x"], ds.attrs["orbit"], time.perf_counter() - t0)
    return ds


def is_frame_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a LiCSBAS or MintPy LOS velocity file."""
    p = Path(path)
    if not p.is_dir():
        return False
    return _find_licsbas_velocity(p) is not None or _find_mintpy_velocity(p) is not None


def list_frames(directory: str | os.PathLike) -> list[Path]:
    """Frame folders directly inside ``directory``, sorted by name.

    A folder counts as a frame when it holds a LOS velocity file (LiCSBAS ``*vel.geo.tif`` or MintPy
    ``velocity.h5``); other folders (``GNSS/``, ``figures/``, hidden ones) are skipped.

    Raises :class:`FrameError` when ``directory`` does not exist or holds no frame.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FrameError("Frames folder not found.", file=d, field="frames directory",
                         fix="give the folder that holds one sub-folder per frame")
    frames = sorted((p for p in d.iterdir() if not p.name.startswith(".") and is_frame_dir(p)),
                    key=lambda p: p.name)
    if not frames:
        raise FrameError("No frame folder found (no sub-folder holds vel.geo.tif, <ID>.vel.geo.tif or "
                         "velocity.h5).", file=d, field="frames directory",
                         fix="put each frame in its own sub-folder named by its frame id, with its LOS velocity "
                             "file inside")
    return frames


# --------------------------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------------------------
def _resolve(path) -> tuple[Path, Path | None]:
    p = Path(path)
    if p.is_dir():
        return p, None
    if p.is_file():
        return p.parent, p
    raise FrameError("Frame folder or velocity file not found.", file=p, field="path",
                     fix="give an existing frame folder, or the path of its vel.geo.tif / velocity.h5")


def _layout(folder: Path, vel_file: Path | None) -> str:
    if vel_file is not None:
        name = vel_file.name.lower()
        if name.endswith((".tif", ".tiff")):
            return "licsbas"
        if name.endswith((".h5", ".he5", ".hdf5")):
            return "mintpy"
        raise FrameError("Unrecognised velocity file type.", file=vel_file, field="path",
                         fix="give a LiCSBAS vel.geo.tif (GeoTIFF) or a MintPy velocity.h5 (HDF5)")
    if _find_licsbas_velocity(folder) is not None:
        return "licsbas"
    if _find_mintpy_velocity(folder) is not None:
        return "mintpy"
    raise FrameError("LOS velocity file not found in the frame folder.", file=folder, field="vel.geo.tif",
                     fix=f"put {folder.name}.vel.geo.tif or vel.geo.tif (LiCSBAS) or velocity.h5 (MintPy) "
                         "in the frame folder")


def _find_one(folder: Path, names: list[str], pattern: str | None = None) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    if pattern is not None:
        hits = sorted(folder.glob(pattern))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise FrameError(f"Several files match {pattern!r}: {', '.join(h.name for h in hits)}.", file=folder,
                             field=pattern, fix="keep one frame per folder (one file of each kind)")
    return None


def _find_licsbas_velocity(folder: Path) -> Path | None:
    return _find_one(folder, [f"{folder.name}.vel.geo.tif", "vel.geo.tif"], "*.vel.geo.tif")


def _find_mintpy_velocity(folder: Path) -> Path | None:
    return _find_one(folder, list(_MINTPY_VELOCITY_NAMES))


# --------------------------------------------------------------------------------------------------------------
# GeoTIFF reading
# --------------------------------------------------------------------------------------------------------------
class _Grid:
    """Shape, affine transform and CRS of a raster, with the file it came from (for error messages)."""

    def __init__(self, shape, transform, crs, file):
        self.shape = tuple(int(s) for s in shape)
        self.transform = transform
        self.crs = crs
        self.file = Path(file)

    def check_same(self, other: "_Grid", what: str) -> None:
        t, o = self.transform, other.transform
        px = max(abs(t.a), abs(t.e))
        same_shape = self.shape == other.shape
        same_transform = all(abs(a - b) <= _GRID_TOLERANCE_PIXELS * px
                             for a, b in zip((t.a, t.b, t.c, t.d, t.e, t.f), (o.a, o.b, o.c, o.d, o.e, o.f)))
        same_crs = self.crs is None or other.crs is None or self.crs == other.crs
        if not (same_shape and same_transform and same_crs):
            raise FrameError(
                f"{what} is not on the grid of the velocity: shape {other.shape} vs {self.shape}, origin "
                f"({o.c:.8f}, {o.f:.8f}) vs ({t.c:.8f}, {t.f:.8f}), pixel ({o.a:.8g}, {o.e:.8g}) vs "
                f"({t.a:.8g}, {t.e:.8g}), CRS {other.crs} vs {self.crs}.",
                file=other.file, field=what,
                fix=f"resample {other.file.name} onto the grid of {self.file.name} (e.g. gdalwarp -te ... "
                    "-tr ...) "
                    "or remove it; all rasters of one frame must share one grid")


def _available_memory() -> int | None:
    """Bytes of memory available to this process now (psutil, else sysconf), or None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform: fall back to sysconf
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(shape: tuple[int, ...], itemsize: int, *, file, field: str = "width/height",
                         what: str = "raster", copies_float32: int = 1) -> None:
    """Raise :class:`FrameError` if reading an array of ``shape`` (``itemsize`` bytes per value, plus
    ``copies_float32`` float32 working copies) would not fit in the memory available now.

    Cheap (header values only); called before every whole-array read so that a header declaring huge
    dimensions — damaged, hostile, or a sparse file that is tiny on disk — is refused instead of allocated.
    """
    values = math.prod(int(s) for s in shape)
    need = values * (int(itemsize) + 4 * int(copies_float32))
    available = _available_memory()
    if available is None or need <= available:
        return
    dims = " x ".join(str(int(s)) for s in shape)
    raise FrameError(
        f"The {what} declares {dims} pixels ({need / 2**30:.1f} GiB to read), more than the "
        f"{available / 2**30:.1f} GiB of memory available.", file=file, field=field,
        fix="crop or multilook the product to a smaller grid (e.g. gdal_translate -srcwin / -outsize, or MintPy "
            "subset.py / multilook.py), or check the header: a damaged file can declare impossible dimensions")


def read_geotiff(path: Path, *, field: str) -> tuple[np.ndarray, _Grid]:
    """Band 1 of a GeoTIFF as float32 (declared nodata → NaN) and its grid; requires a CRS and a transform."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            # NUM_THREADS: GDAL decodes a compressed raster's blocks on all cores (the same values; a 2210 x 3289
            # DEFLATE frame 0.068 -> 0.033 s on two cores)
            with rasterio.open(path, NUM_THREADS="ALL_CPUS") as src:
                if src.crs is None:
                    raise FrameError("GeoTIFF has no coordinate reference system (CRS).", file=path, field=field,
                                     fix=f"set it, e.g. gdal_edit.py -a_srs EPSG:4326 {path.name}")
                if src.transform.is_identity or src.transform.b != 0 or src.transform.d != 0:
                    raise FrameError("GeoTIFF has no (or a rotated) geotransform.", file=path, field=field,
                                     fix=f"georeference it on a north-up grid, e.g. gdal_edit.py -a_ullr ... "
                                         f"{path.name}")
                check_fits_in_memory((src.height, src.width), np.dtype(src.dtypes[0]).itemsize, file=path,
                                     what=f"GeoTIFF ({field})")
                data = src.read(1)
                nodata = src.nodata
                grid = _Grid(data.shape, src.transform, src.crs, path)
    except rasterio.errors.RasterioIOError as exc:
        raise FrameError(f"Cannot read the GeoTIFF: {exc}", file=path, field=field,
                         fix="check that the file is a complete, readable GeoTIFF") from exc
    out = data.astype(np.float32, copy=False)  # a float32 band is already the caller's own array: no copy
    if nodata is not None and not math.isnan(nodata):
        # The file declares this value as "no data": honour it (it is not a measured zero).
        out[data == nodata] = np.nan
    return out, grid


#: Fill values that tools write for "no data" without always declaring them: never a velocity (mm/yr), a sigma,
#: a unit-vector component or a height (m) on Earth
_SENTINELS = np.array([-9999.0, -32768.0, -32767.0, np.finfo(np.float32).min, np.finfo(np.float32).max],
                      np.float32)
#: Up component of a ground→satellite unit vector of a SAR (incidence 6°-78°, ALOS-2's steepest modes
#: included): a smaller one is not a look vector (E/N as angles, U left 0), a larger one a vertical look
#: (angles in radians read as degrees: u > 0.9999)
_LOS_U_RANGE = (0.2, 0.995)
_HEIGHT_RANGE_M = (-500.0, 9000.0)


def _check_plausible(variables: dict, folder: Path) -> None:
    """Refuse a frame whose rasters hold values no frame can hold: undeclared no-data fill values, an up
    component of the look vector outside a SAR's range at more than 1 % of the valid pixels, heights off the
    Earth. A FrameError or GeometryError naming the raster and the fix, instead of numbers that are silently
    wrong. (Whole-raster extremes first: a few milliseconds a raster, the exact tests only when they fail.)"""
    names = {"los_velocity": "the velocity", "los_std": "the velocity sigma", "los_e": "E", "los_n": "N",
             "los_u": "U", "dem": "the height"}
    extremes = {}
    for var, what in names.items():
        a = variables.get(var)
        if a is None or a.dtype == bool:
            continue
        lo, hi = float(np.fmin.reduce(a, axis=None)), float(np.fmax.reduce(a, axis=None))
        extremes[var] = (lo, hi)
        if lo <= -9999.0 or hi >= float(np.finfo(np.float32).max):
            fill = np.isin(a, _SENTINELS)
            if fill.any():
                value = float(a[fill][0])
                raise FrameError(f"{what[0].upper() + what[1:]} holds {int(fill.sum())} pixel(s) of {value:g}, "
                                 "an undeclared no-data value.", file=folder, field=var,
                                 fix=f"declare it as no data (e.g. gdal_edit.py -a_nodata {value:g} <file>) or "
                                     "set those pixels to NaN")
    valid = np.isfinite(variables["los_velocity"])
    n_valid = int(np.count_nonzero(valid))
    u = variables.get("los_u")
    lo, hi = extremes.get("los_u", (np.nan, np.nan))
    if u is not None and n_valid and (lo < _LOS_U_RANGE[0] or hi > _LOS_U_RANGE[1]):
        low = int(np.count_nonzero((u < _LOS_U_RANGE[0]) & valid))
        high = int(np.count_nonzero((u > _LOS_U_RANGE[1]) & valid))
        if max(low, high) > 0.01 * n_valid:
            from ..errors import GeometryError

            side = "below" if low >= high else "above"
            raise GeometryError(
                f"The up component of the look vector is {side} a SAR's {_LOS_U_RANGE[0]}..{_LOS_U_RANGE[1]} "
                f"(incidence 6°-78°) at {max(low, high)} of {n_valid} valid pixels.",
                file=folder, field="los_u",
                fix="give E/N/U as the ground→satellite unit vector (LiCSAR's E/N/U.geo.tif), or MintPy incidence "
                    "and azimuth angles in degrees (not radians), with no-data as NaN, not 0")
    dem = variables.get("dem")
    lo, hi = extremes.get("dem", (np.nan, np.nan))
    if dem is not None and n_valid and (lo < _HEIGHT_RANGE_M[0] or hi > _HEIGHT_RANGE_M[1]):
        dv = dem[valid & np.isfinite(dem)]
        if dv.size and (float(dv.min()) < _HEIGHT_RANGE_M[0] or float(dv.max()) > _HEIGHT_RANGE_M[1]):
            raise FrameError(f"Heights span {float(dv.min()):g}..{float(dv.max()):g} m at the valid pixels, off "
                             f"the Earth's {_HEIGHT_RANGE_M[0]:g}..{_HEIGHT_RANGE_M[1]:g} m.", file=folder,
                             field="dem", fix="give the height in metres, with no-data declared or as NaN")


def _read_licsbas(folder: Path, vel_file: Path | None):
    fid = folder.name
    vel_path = vel_file if vel_file is not None else _find_licsbas_velocity(folder)
    if vel_path is None:
        raise FrameError("LOS velocity raster not found.", file=folder, field="vel.geo.tif",
                         fix=f"put {fid}.vel.geo.tif or vel.geo.tif in the frame folder")
    vel, grid = read_geotiff(vel_path, field="los_velocity")
    out: dict[str, Any] = {"los_velocity": vel}
    files = {"los_velocity": vel_path}

    def optional(var: str, names: list[str], pattern: str | None):
        p = _find_one(folder, names, pattern)
        if p is None:
            return None
        a, g = read_geotiff(p, field=var)
        grid.check_same(g, var)
        files[var] = p
        return a

    std = optional("los_std", [f"{fid}.vstd.geo.tif", "vstd.geo.tif"], "*.vstd.geo.tif")
    if std is not None:
        out["los_std"] = std
    comps = {}
    for c in ("E", "N", "U"):
        comps[c] = optional(f"los_{c.lower()}", [f"{fid}.geo.{c}.tif", f"{c}.geo.tif"], f"*.geo.{c}.tif")
    for c in ("E", "N"):
        if comps[c] is None:
            raise FrameError(f"LOS unit-vector raster {c} not found.", file=folder, field=f"{c}.geo.tif",
                             fix=f"put {fid}.geo.{c}.tif or {c}.geo.tif (the LiCSAR ground→satellite unit vector "
                                 "components E, N and U) in the frame folder")
    e, n, u = comps["E"], comps["N"], comps["U"]
    if u is None:
        # Only E and N shipped: the up component follows from the unit norm (always positive: ground→satellite).
        s = 1.0 - e.astype(np.float64) ** 2 - n.astype(np.float64) ** 2
        if np.any(s < -0.05):
            raise GeometryError("E² + N² exceeds 1, so U = sqrt(1 - E² - N²) cannot be derived.",
                                file=files["los_e"], field="E.geo.tif/N.geo.tif",
                                fix="check that E and N are unit-vector components (not angles or scaled values), "
                                    "or supply U.geo.tif")
        u = np.sqrt(np.clip(s, 0.0, None)).astype(np.float32)
        log.info("frame %s: U derived as sqrt(1 - E² - N²) (no U.geo.tif)", fid)
    from ..geodesy.los import check_unit_vector

    check_unit_vector(e, n, u, file=files["los_e"].parent, field="E/N/U.geo.tif")
    out.update(los_e=e, los_n=n, los_u=u)
    dem = optional("dem", [f"{fid}.geo.hgt.tif", "hgt.geo.tif"], "*.geo.hgt.tif")
    if dem is not None:
        out["dem"] = dem
    mask = optional("mask", [f"{fid}.mask.geo.tif", "mask.geo.tif"], None)
    if mask is not None:
        out["mask"] = np.isfinite(mask) & (mask > 0.5)  # NaN = outside the frame = not usable
    return out, grid


# --------------------------------------------------------------------------------------------------------------
# MintPy
# --------------------------------------------------------------------------------------------------------------
def _attr_str(v) -> str:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.size == 1:
        return _attr_str(v.item())
    return str(v)


def mintpy_attrs(h5) -> dict[str, str]:
    """Root attributes of an open MintPy HDF5 file as a str → str dict."""
    return {k: _attr_str(v) for k, v in h5.attrs.items()}


def _attr_float(attrs: dict[str, str], key: str, *, file=None, positive: bool = False) -> float:
    """A numeric MintPy attribute, or a FrameError naming it (never a bare ValueError)."""
    try:
        value = float(attrs[key])
    except (TypeError, ValueError) as exc:
        raise FrameError(f"MintPy attribute {key}={attrs[key]!r} is not a number.", file=file, field=key,
                         fix="repair the attribute (MintPy's info.py shows them) or re-export the file") from exc
    if not math.isfinite(value) or (positive and value <= 0):
        raise FrameError(f"MintPy attribute {key}={attrs[key]!r} is not a {'positive ' if positive else ''}finite "
                         "number.", file=file, field=key, fix="repair the attribute or re-export the file")
    return value


def mintpy_crs(attrs: dict[str, str], *, file=None):
    """pyproj CRS of a geocoded MintPy file (``EPSG``, ``UTM_ZONE`` or ``X_UNIT`` = degrees)."""
    import pyproj

    try:
        if attrs.get("EPSG"):
            return pyproj.CRS.from_epsg(int(_attr_float(attrs, "EPSG", file=file)))
        zone = attrs.get("UTM_ZONE", "").strip()
        if zone:
            num, hemi = int(zone[:-1]), zone[-1].upper()
            if not 1 <= num <= 60 or hemi not in "NS":
                raise ValueError(zone)
            return pyproj.CRS.from_epsg((32600 if hemi == "N" else 32700) + num)
    except (ValueError, pyproj.exceptions.CRSError) as exc:
        key = "EPSG" if attrs.get("EPSG") else "UTM_ZONE"
        raise FrameError(f"MintPy attribute {key}={attrs.get(key)!r} is not a CRS PROJ knows.", file=file, field=key,
                         fix="give a valid EPSG code (e.g. 4326) or UTM zone (e.g. 50N)") from exc
    if attrs.get("X_UNIT", "degrees").lower().startswith("deg"):
        return pyproj.CRS.from_epsg(4326)
    raise FrameError("Cannot tell the CRS of the MintPy file (no EPSG, UTM_ZONE, or X_UNIT=degrees attribute).",
                     file=file, field="EPSG", fix="add the EPSG attribute (e.g. with MintPy's info/save tools) "
                                                  "or geocode to lat/lon")


def mintpy_grid(attrs: dict[str, str], shape: tuple[int, int], *, file=None):
    """(transform, crs) of a geocoded MintPy file; ``X_FIRST``/``Y_FIRST`` are the outer corner of pixel (0, 0)."""
    from affine import Affine

    missing = [k for k in ("X_FIRST", "Y_FIRST", "X_STEP", "Y_STEP") if k not in attrs]
    if missing:
        raise FrameError(f"MintPy file is not geocoded (attributes {', '.join(missing)} missing).", file=file,
                         field=missing[0], fix="geocode it first, e.g. geocode.py velocity.h5 -l geometryRadar.h5")
    for key, size in (("LENGTH", shape[-2]), ("WIDTH", shape[-1])):
        if key in attrs and _attr_float(attrs, key, file=file) != size:
            raise FrameError(f"Attribute {key}={attrs[key]} does not match the data shape {shape}.", file=file,
                             field=key, fix="the file is inconsistent; re-export it with MintPy")
    x_step, y_step = _attr_float(attrs, "X_STEP", file=file), _attr_float(attrs, "Y_STEP", file=file)
    if x_step == 0 or y_step == 0:
        raise FrameError("MintPy pixel spacing X_STEP/Y_STEP is zero.", file=file, field="X_STEP" if x_step == 0
                         else "Y_STEP", fix="repair the attribute or re-export the file")
    transform = Affine(x_step, 0.0, _attr_float(attrs, "X_FIRST", file=file),
                       0.0, y_step, _attr_float(attrs, "Y_FIRST", file=file))
    return transform, mintpy_crs(attrs, file=file)


def _find_mintpy_geometry(folder: Path) -> Path | None:
    for n in _MINTPY_GEOMETRY_NAMES:
        p = (folder / n)
        if p.is_file():
            return p
    return None


def _mintpy_incidence(attrs: dict[str, str], file=None) -> tuple[float, str]:
    for key in ("CENTER_INCIDENCE_ANGLE", "INCIDENCE_ANGLE", "incidenceAngle"):
        if key in attrs:
            return _attr_float(attrs, key, file=file), f"attribute {key}"
    need = ("STARTING_RANGE", "RANGE_PIXEL_SIZE", "WIDTH", "EARTH_RADIUS", "HEIGHT")
    if all(k in attrs for k in need):
        # Spherical-earth law of cosines at near and far range, averaged (MintPy utils.incidence_angle).
        r = _attr_float(attrs, "EARTH_RADIUS", file=file, positive=True)
        h = _attr_float(attrs, "HEIGHT", file=file, positive=True)
        near = _attr_float(attrs, "STARTING_RANGE", file=file, positive=True)
        far = near + _attr_float(attrs, "RANGE_PIXEL_SIZE", file=file) * _attr_float(attrs, "WIDTH", file=file)

        def inc(rng):
            c = (r * r + rng * rng - (r + h) ** 2) / (2.0 * r * rng)
            if not -1.0 <= c <= 1.0:
                raise FrameError("The slant-range attributes describe an impossible geometry (no incidence angle "
                                 "fits them).", file=file, field="STARTING_RANGE",
                                 fix="check STARTING_RANGE, RANGE_PIXEL_SIZE, EARTH_RADIUS and HEIGHT, or add "
                                     "CENTER_INCIDENCE_ANGLE")
            return 180.0 - math.degrees(math.acos(c))

        return 0.5 * (inc(near) + inc(far)), "slant-range geometry attributes (MintPy's centre incidence)"
    return DEFAULT_INCIDENCE_DEG, f"the default {DEFAULT_INCIDENCE_DEG:g}° (no incidence information)"


def _h5_dataset(h5, name: str, file):
    """``h5[name]`` when it is a numeric dataset, else a FrameError (a group, strings, compound records)."""
    import h5py

    ds = h5[name]
    if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "biuf":
        kind = "a group" if not isinstance(ds, h5py.Dataset) else f"a dataset of {ds.dtype}"
        raise FrameError(f"{name!r} is {kind}, not a numeric raster.", file=file, field=name,
                         fix="give the MintPy file as written by MintPy (numeric datasets)")
    return ds


def _h5_values(ds, name: str, file) -> np.ndarray:
    """A whole HDF5 dataset as float32; a damaged one (a corrupt compressed chunk) is a FrameError."""
    try:
        return np.asarray(ds[()], dtype=np.float32)
    except (OSError, ValueError, TypeError) as exc:
        raise FrameError(f"Cannot read dataset {name!r}: {exc}", file=file, field=name,
                         fix="the file is damaged: copy or regenerate it with MintPy") from exc


def _read_h5_2d(h5, name: str, shape, file) -> np.ndarray:
    ds = _h5_dataset(h5, name, file)
    if ds.shape != tuple(shape):
        raise FrameError(f"Dataset {name!r} has shape {ds.shape}, the velocity grid is {tuple(shape)}.", file=file,
                         field=name, fix="use the geometry file of the same (geocoded) grid as the velocity")
    _check_h5_fits(ds, name, file)
    return _h5_values(ds, name, file)


def _check_h5_fits(ds, name: str, file) -> None:
    """Size guard for an HDF5 dataset about to be read whole (chunked datasets can be declared huge yet hold
    no data on disk)."""
    itemsize = ds.dtype.itemsize if ds.dtype.kind in "biuf" else 8
    check_fits_in_memory(ds.shape, itemsize, file=file, field="LENGTH/WIDTH", what=f"HDF5 dataset {name!r}")


def _read_mintpy(folder: Path, vel_file: Path | None):
    import h5py

    vel_path = vel_file if vel_file is not None else _find_mintpy_velocity(folder)
    try:
        h5 = h5py.File(vel_path, "r")
    except OSError as exc:
        raise FrameError(f"Cannot open the HDF5 file: {exc}", file=vel_path, field="velocity",
                         fix="check that the file is a complete MintPy velocity.h5") from exc
    with h5:
        attrs = mintpy_attrs(h5)
        if "velocity" not in h5:
            raise FrameError("Dataset 'velocity' not found in the HDF5 file.", file=vel_path, field="velocity",
                             fix="give a MintPy velocity file (timeseries2velocity.py output)")
        shape = _h5_dataset(h5, "velocity", vel_path).shape
        if len(shape) != 2:
            raise FrameError(f"Dataset 'velocity' must be 2-D, has shape {shape}.", file=vel_path,
                             field="velocity", fix="give the velocity file, not a time series")
        unit = attrs.get("UNIT", "m/year").strip().lower()
        if unit not in _VELOCITY_UNIT_TO_MM:
            raise FrameError(f"Unknown velocity unit {attrs.get('UNIT')!r}.", file=vel_path, field="UNIT",
                             fix="set the UNIT attribute to m/year (MintPy's default)")
        scale = np.float32(_VELOCITY_UNIT_TO_MM[unit])
        _check_h5_fits(h5["velocity"], "velocity", vel_path)
        if "velocityStd" in h5:
            _check_h5_fits(_h5_dataset(h5, "velocityStd", vel_path), "velocityStd", vel_path)
        vel = _h5_values(h5["velocity"], "velocity", vel_path) * scale
        std = (_h5_values(h5["velocityStd"], "velocityStd", vel_path) * scale if "velocityStd" in h5 else None)
        if std is not None and std.shape != shape:
            raise FrameError("velocityStd has a different shape from velocity.", file=vel_path,
                             field="velocityStd", fix="re-export the velocity file with MintPy")
    transform, crs = mintpy_grid(attrs, shape, file=vel_path)
    grid = _Grid(shape, transform, crs, vel_path)
    out: dict[str, Any] = {"los_velocity": vel}
    if std is not None:
        out["los_std"] = std

    from ..geodesy import los

    geom_path = _find_mintpy_geometry(vel_path.parent)
    dem = None
    if geom_path is not None:
        try:
            g = h5py.File(geom_path, "r")
        except OSError as exc:
            raise FrameError(f"Cannot open the HDF5 file: {exc}", file=geom_path, field="geometryGeo.h5",
                             fix="check that the file is a complete MintPy geometryGeo.h5") from exc
        with g:
            gattrs = mintpy_attrs(g)
            missing = [k for k in ("incidenceAngle", "azimuthAngle") if k not in g]
            if missing:
                raise FrameError(f"Geometry file lacks {', '.join(missing)}.", file=geom_path, field=missing[0],
                                 fix="regenerate geometryGeo.h5 with MintPy load_data.py including the LOS files")
            inc = _read_h5_2d(g, "incidenceAngle", shape, geom_path)
            az = _read_h5_2d(g, "azimuthAngle", shape, geom_path)
            if "height" in g:
                dem = _read_h5_2d(g, "height", shape, geom_path)
        if "X_FIRST" in gattrs:
            gt, gcrs = mintpy_grid(gattrs, shape, file=geom_path)
            grid.check_same(_Grid(shape, gt, gcrs, geom_path), "geometry")
        e, n, u = los.unit_vector_from_incidence_azimuth(inc, az, file=geom_path)
        geometry_note = f"incidenceAngle/azimuthAngle from {geom_path.name}"
    else:
        if "HEADING" not in attrs:
            raise FrameError("No LOS geometry: no geometryGeo.h5 next to the velocity and no HEADING attribute.",
                             file=vel_path, field="geometryGeo.h5",
                             fix="put MintPy's geometryGeo.h5 (incidenceAngle, azimuthAngle) next to velocity.h5")
        heading = _attr_float(attrs, "HEADING", file=vel_path)
        if attrs.get("ANTENNA_SIDE", "-1").strip() == "1":
            # Left-looking: the look direction is heading - 90° = (heading + 180°) + 90°.
            heading += 180.0
        incidence, how = _mintpy_incidence(attrs, file=vel_path)
        msg = (f"{vel_path}: no geometry file, so one LOS unit vector is used for the whole frame, from "
               f"HEADING={heading:.3f}° and incidence {incidence:.2f}° ({how}); put geometryGeo.h5 next to "
               f"the velocity for per-pixel geometry.")
        warnings.warn(msg, UserWarning, stacklevel=3)
        e0, n0, u0 = (float(c) for c in los.unit_vector_from_incidence_heading(incidence, heading, file=vel_path))
        e, n, u = (np.full(shape, c, dtype=np.float32) for c in (e0, n0, u0))
        geometry_note = f"HEADING {heading:.3f}°, incidence {incidence:.2f}° ({how})"
    out.update(los_e=np.asarray(e, dtype=np.float32), los_n=np.asarray(n, dtype=np.float32),
               los_u=np.asarray(u, dtype=np.float32))

    if dem is None:
        hgt = vel_path.parent / "height.tif"
        if hgt.is_file():
            dem, dgrid = read_geotiff(hgt, field="dem")
            grid.check_same(dgrid, "dem")
    if dem is not None:
        out["dem"] = dem
    out["_geometry"] = geometry_note
    return out, grid


# --------------------------------------------------------------------------------------------------------------
# Dataset assembly
# --------------------------------------------------------------------------------------------------------------
_VAR_ATTRS = {
    "los_velocity": {"units": "mm/yr", "long_name": "LOS velocity, positive toward the satellite"},
    "los_std": {"units": "mm/yr", "long_name": "1-sigma of the LOS velocity"},
    "los_e": {"units": "1", "long_name": "east component of the ground-to-satellite unit vector"},
    "los_n": {"units": "1", "long_name": "north component of the ground-to-satellite unit vector"},
    "los_u": {"units": "1", "long_name": "up component of the ground-to-satellite unit vector"},
    "dem": {"units": "m", "long_name": "terrain height"},
    "mask": {"long_name": "usable pixel (True) or masked (False)"},
}


def pixel_centres(transform, shape) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel-centre coordinates of a north-up grid of ``shape`` (rows, cols) with affine ``transform``."""
    rows, cols = shape[-2], shape[-1]
    x = transform.c + (np.arange(cols, dtype=np.float64) + 0.5) * transform.a
    y = transform.f + (np.arange(rows, dtype=np.float64) + 0.5) * transform.e
    return y, x


def coord_attrs(crs) -> tuple[dict, dict]:
    """CF attributes of the (y, x) coordinates for ``crs``."""
    if crs is not None and getattr(crs, "is_geographic", False):
        return ({"standard_name": "latitude", "long_name": "latitude of pixel centre", "units": "degrees_north",
                 "axis": "Y"},
                {"standard_name": "longitude", "long_name": "longitude of pixel centre", "units": "degrees_east",
                 "axis": "X"})
    return ({"standard_name": "projection_y_coordinate", "long_name": "y of pixel centre", "units": "m",
             "axis": "Y"},
            {"standard_name": "projection_x_coordinate", "long_name": "x of pixel centre", "units": "m",
             "axis": "X"})


def _build_dataset(variables: dict, grid: _Grid, *, frame_id: str, source: str, folder: Path):
    import pyproj
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    from ..geodesy.los import orbit_direction

    geometry_note = variables.pop("_geometry", None)
    y, x = pixel_centres(grid.transform, grid.shape)
    crs = pyproj.CRS.from_user_input(grid.crs.to_wkt() if hasattr(grid.crs, "to_wkt") else grid.crs)
    yattrs, xattrs = coord_attrs(crs)
    data_vars = {}
    for name in ("los_velocity", "los_std", "los_e", "los_n", "los_u", "dem", "mask"):
        if name in variables:
            a = variables[name]
            a = a.astype(bool) if name == "mask" else a.astype(np.float32, copy=False)
            data_vars[name] = xr.DataArray(a, dims=("y", "x"), attrs=dict(_VAR_ATTRS[name]))
    ds = xr.Dataset(data_vars, coords={"y": ("y", y, yattrs), "x": ("x", x, xattrs)})
    # in place: rioxarray's default deep-copies every raster of the frame, twice
    ds = ds.rio.write_crs(crs, inplace=True).rio.write_transform(grid.transform, inplace=True)
    ds.attrs.update(frame_id=frame_id, source=source, path=str(folder),
                    orbit=orbit_direction(ds["los_e"].values))
    if geometry_note:
        ds.attrs["geometry"] = geometry_note
    return ds
