"""Mosaicking and line-of-sight decomposition.

The last geometric stage of the adjustment: corrected frames are put on one target grid, merged into seamless
mosaics, and LOS velocity is turned into vertical (and, where look directions cross, east) velocity.

Grid and resampling (host side, GDAL through rasterio)
    :func:`target_grid` builds a :class:`TargetGrid` (default: the union of the frames' valid footprints at the
    finest input spacing, in EPSG:4326). :func:`resample_to_grid` warps a frame or one raster onto it with
    ``rasterio.warp.reproject``, NaN as nodata on both sides, so no-data never becomes zero and never bleeds more
    than one pixel into valid data. Standard deviations are resampled as variances (then square-rooted), unit
    vectors are renormalised after interpolation, masks use nearest neighbour. :func:`resample_footprint` warps
    only the window of the grid a frame covers (a :class:`FootprintRaster`): a wide-area grid is many times one
    frame, and frames × grid does not fit in memory at 100 m.

Merge (array API, any backend)
    :func:`merge_frames` is an inverse-variance weighted mean with feathered frame edges, processed tile by tile
    so memory stays bounded however large the target grid. It is meant for frames that share one look geometry
    (one track direction) and for vertical-velocity estimates from several frames.

Decomposition (array API, any backend)
    :func:`decompose_vertical` (one geometry, GNSS horizontal field removed) and :func:`decompose_up_east`
    (two or more look directions, per-pixel weighted least squares in closed form, north from GNSS).

Overlaps for the network adjustment (host side)
    :func:`overlap_pairs` and :func:`sample_overlap`.

What the decomposition assumes: the LOS inputs are already adjusted (GNSS-consistent) and in the reference
frame of the GNSS horizontal field; the horizontal field (``ve``, ``vn`` and their 1-sigma, e.g. from
``geodesy``'s horizontal velocity field) is interpolated to the pixels by the caller; its errors are
independent of the InSAR errors. Whether the GNSS input is horizontal-only (so that the vertical must come from
InSAR) is decided upstream; these functions never read GNSS verticals.

Conventions: velocities and standard deviations in mm/yr, LOS positive toward the satellite,
``v_los = e*ve + n*vn + u*vu`` with (e, n, u) the ground-to-satellite unit vector; lengths in m unless a name
says km; float32 storage, float64 sums and solves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from . import backend
from .errors import ArrayArgumentError, FrameError, GeometryError, InputError

if TYPE_CHECKING:
    import xarray

__all__ = [
    "TargetGrid",
    "target_grid",
    "resample_to_grid",
    "FootprintRaster",
    "resample_footprint",
    "MergeResult",
    "merge_frames",
    "MergePlan",
    "feather_ramp",
    "VerticalResult",
    "decompose_vertical",
    "UpEastResult",
    "decompose_up_east",
    "OverlapPair",
    "overlap_pairs",
    "OverlapSample",
    "sample_overlap",
    "cell_area_km2",
]

log = logging.getLogger(__name__)

Resampling = Literal["bilinear", "nearest", "average"]
_RESAMPLINGS = ("bilinear", "nearest", "average")
_UNIT_VARS = ("los_e", "los_n", "los_u")


# ==============================================================================================================
# Target grid
# ==============================================================================================================
@dataclass(frozen=True)
class TargetGrid:
    """A north-up raster grid: CRS, affine transform (pixel *edges*), width and height in pixels.

    ``notes`` records decisions taken while building the grid (e.g. frames reprojected from another CRS).
    """

    crs: Any
    transform: Any
    width: int
    height: int
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        from affine import Affine
        from rasterio.crs import CRS

        object.__setattr__(self, "crs", CRS.from_user_input(self.crs))
        object.__setattr__(self, "transform", Affine(*tuple(self.transform)[:6]))
        if self.transform.b != 0 or self.transform.d != 0:
            raise InputError("Rotated target grids are not supported.", field="transform",
                             fix="use a north-up transform (no rotation terms)")
        if int(self.width) < 1 or int(self.height) < 1:
            raise InputError(f"Target grid of {self.width} x {self.height} pixels is empty.", field="bounds",
                             fix="give bounds that enclose at least one pixel, or a finer resolution")
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) — the (y, x) array shape."""
        return (self.height, self.width)

    @property
    def resolution(self) -> tuple[float, float]:
        """(x spacing, y spacing), positive, in CRS units."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units (pixel edges)."""
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return (west, south, east, north)

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates ``(y, x)`` (1-D float64, CRS units; ``y`` decreasing for north-up grids)."""
        t = self.transform
        x = t.c + t.a * (np.arange(self.width, dtype=np.float64) + 0.5)
        y = t.f + t.e * (np.arange(self.height, dtype=np.float64) + 0.5)
        return y, x

    def window_transform(self, row0: int, col0: int):
        """Affine transform of the sub-grid whose upper-left pixel is ``(row0, col0)``."""
        from affine import Affine

        return self.transform @ Affine.translation(col0, row0)

    def to_dataset(self) -> "xarray.Dataset":
        """An empty ``xarray.Dataset`` with the grid's ``y``/``x`` coordinates and CRS written (rioxarray)."""
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray as xr

        y, x = self.coords()
        ds = xr.Dataset(coords={"y": ("y", y), "x": ("x", x)})
        ds = ds.rio.write_crs(self.crs)
        ds = ds.rio.write_transform(self.transform)
        if self.notes:
            ds.attrs["grid_notes"] = "; ".join(self.notes)
        return ds

    def matches(self, other: "TargetGrid", *, rtol: float = 1e-9) -> bool:
        """True when ``other`` is the same grid (CRS, size, transform to ``rtol`` of a pixel)."""
        if self.shape != other.shape or self.crs != other.crs:
            return False
        tol = rtol * max(self.resolution)
        return all(abs(a - b) <= tol for a, b in zip(tuple(self.transform)[:6], tuple(other.transform)[:6]))


def _da_of(obj, name: str = "los_velocity"):
    """The DataArray of a frame (Dataset) or the DataArray itself."""
    import xarray as xr

    if isinstance(obj, xr.Dataset):
        if name not in obj:
            raise FrameError(f"Frame has no variable {name!r}.", file=obj.attrs.get("path"), field=name,
                             fix="pass a frame opened with io.frames.open_frame or add the variable")
        return obj[name]
    return obj


def _georef(obj, what: str):
    """(crs, transform, height, width) of a georeferenced xarray object; errors name ``what``."""
    import rioxarray  # noqa: F401
    import xarray as xr

    if not isinstance(obj, (xr.DataArray, xr.Dataset)):
        raise ArrayArgumentError(f"{what} is a plain array without coordinates; it cannot be georeferenced.",
                                 field=what, fix="pass an xarray DataArray/Dataset with y/x coordinates and a CRS "
                                                 "(written with rioxarray .rio.write_crs)")
    crs = obj.rio.crs
    if crs is None:
        raise FrameError(f"{what} has no coordinate reference system.", file=obj.attrs.get("path"), field="crs",
                         fix="write one with .rio.write_crs('EPSG:4326') (or the frame's CRS)")
    try:
        transform = obj.rio.transform(recalc=True)
    except Exception as exc:  # rioxarray raises several types for missing/irregular coordinates
        raise FrameError(f"{what} has no usable y/x coordinates ({exc}).", file=obj.attrs.get("path"),
                         field="y/x", fix="give regular 1-D pixel-centre coordinates named y and x") from exc
    return crs, transform, int(obj.rio.height), int(obj.rio.width)


def _valid_mask_np(obj) -> np.ndarray:
    """Host boolean mask of usable pixels: finite ``los_velocity`` (and ``mask`` where a frame has one)."""
    import xarray as xr

    da = _da_of(obj)
    valid = np.isfinite(np.asarray(backend.to_numpy(da.data if isinstance(da, xr.DataArray) else da)))
    if isinstance(obj, xr.Dataset) and "mask" in obj:
        valid &= np.asarray(obj["mask"].values, dtype=bool)
    return valid


def _valid_bounds(obj, what: str):
    """Bounds (left, bottom, right, top; pixel edges, frame CRS) of the valid pixels, or None if none are."""
    crs, t, h, w = _georef(obj, what)
    valid = _valid_mask_np(obj)
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    xs = [t.c + t.a * c0, t.c + t.a * c1]
    ys = [t.f + t.e * r0, t.f + t.e * r1]
    return (min(xs), min(ys), max(xs), max(ys))


def target_grid(frames: Sequence, *, resolution: float | tuple[float, float] | None = None,
                crs: Any = "EPSG:4326", bounds: tuple[float, float, float, float] | None = None) -> TargetGrid:
    """The common grid for a set of frames.

    Parameters
    ----------
    frames
        Frames (``xarray.Dataset``, see the data model) or georeferenced DataArrays.
    resolution
        Pixel spacing in target-CRS units (one number, or ``(x, y)``). Default: the finest spacing among the
        frames, converted to the target CRS where a frame is in another CRS.
    crs
        Target CRS (anything ``rasterio.crs.CRS.from_user_input`` reads). Default EPSG:4326.
    bounds
        ``(left, bottom, right, top)`` in target-CRS units. Default: the union of the frames' valid-data
        footprints, expanded outward to whole pixels aligned on the pixel edges of the finest frame (so a frame
        already on that lattice is resampled without interpolation).
    """
    from rasterio.crs import CRS
    from rasterio.warp import calculate_default_transform, transform_bounds

    try:
        dst_crs = CRS.from_user_input(crs)
    except Exception as exc:
        raise InputError(f"Unknown target CRS {crs!r}.", field="crs",
                         fix="give an EPSG code such as 'EPSG:4326' or a PROJ/WKT string") from exc
    frames = list(frames)
    if not frames and (resolution is None or bounds is None):
        raise InputError("No frames given to build a target grid from.", field="frames",
                         fix="pass at least one frame, or both resolution= and bounds=")

    notes: list[str] = []
    footprints, spacings, anchors = [], [], []
    for i, fr in enumerate(frames):
        what = f"frames[{i}]"
        src_crs, t, h, w = _georef(fr, what)
        fb = _valid_bounds(fr, what)
        if fb is None:
            raise InputError(f"{what} has no valid pixels (all NaN or masked).", file=fr.attrs.get("path"),
                             field="los_velocity", fix="drop this frame or check that it was read correctly")
        if src_crs != dst_crs:
            notes.append(f"{fr.attrs.get('frame_id', what)} reprojected from {src_crs.to_string()} to "
                         f"{dst_crs.to_string()}")
            footprints.append(transform_bounds(src_crs, dst_crs, *fb, densify_pts=21))
            dt, _, _ = calculate_default_transform(src_crs, dst_crs, w, h, *fr.rio.bounds())
            spacings.append((abs(dt.a), abs(dt.e)))
            anchors.append(None)
        else:
            footprints.append(fb)
            spacings.append((abs(t.a), abs(t.e)))
            anchors.append((t.c, t.f))

    if resolution is None:
        xres = min(s[0] for s in spacings)
        yres = min(s[1] for s in spacings)
        anchor = anchors[int(np.argmin([s[0] * s[1] for s in spacings]))]
    else:
        xres, yres = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
        xres, yres = float(xres), float(yres)
        if not (xres > 0 and yres > 0 and math.isfinite(xres) and math.isfinite(yres)):
            raise InputError(f"Resolution {resolution!r} is not a positive spacing.", field="resolution",
                             fix="give the pixel spacing in target-CRS units, e.g. 0.001 (degrees)")
        anchor = next((a for a, s in zip(anchors, spacings) if a is not None
                       and abs(s[0] - xres) < 1e-9 * xres and abs(s[1] - yres) < 1e-9 * yres), None)

    if bounds is None:
        left = min(b[0] for b in footprints)
        bottom = min(b[1] for b in footprints)
        right = max(b[2] for b in footprints)
        top = max(b[3] for b in footprints)
        ax, ay = anchor if anchor is not None else (0.0, 0.0)
        # snap outward onto the anchor lattice; the small slack absorbs float error in the bounds
        left = ax + math.floor((left - ax) / xres + 1e-6) * xres
        right = ax + math.ceil((right - ax) / xres - 1e-6) * xres
        top = ay + math.ceil((top - ay) / yres - 1e-6) * yres
        bottom = ay + math.floor((bottom - ay) / yres + 1e-6) * yres
    else:
        left, bottom, right, top = (float(v) for v in bounds)
        if not (right > left and top > bottom):
            raise InputError(f"Bounds {bounds!r} are not (left, bottom, right, top) with left<right, "
                             "bottom<top.", field="bounds", fix="give bounds as (left, bottom, right, top)")
    width = max(1, int(math.ceil((right - left) / xres - 1e-6)))
    height = max(1, int(math.ceil((top - bottom) / yres - 1e-6)))
    from affine import Affine

    grid = TargetGrid(dst_crs, Affine(xres, 0.0, left, 0.0, -yres, top), width, height, tuple(notes))
    for n in notes:
        log.info("target grid: %s", n)
    log.info("target grid %s: %d x %d px, spacing %g x %g", dst_crs.to_string(), width, height, xres, yres)
    return grid


# ==============================================================================================================
# Resampling
# ==============================================================================================================
def _resampling_enum(name: str):
    from rasterio.enums import Resampling as R

    if name not in _RESAMPLINGS:
        raise InputError(f"Unknown resampling {name!r}.", field="resampling",
                         fix=f"choose one of {', '.join(_RESAMPLINGS)}")
    return getattr(R, name)


def _warp(src: np.ndarray, src_crs, src_transform, grid: TargetGrid, resampling: str,
          window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Warp one float band onto ``grid`` (or the window ``(row0, row1, col0, col1)`` of it); NaN = nodata."""
    from rasterio.warp import reproject

    r0, r1, c0, c1 = window if window is not None else (0, grid.height, 0, grid.width)
    dst = np.full((r1 - r0, c1 - c0), np.nan, dtype=np.float32)
    method = _resampling_enum(resampling)
    offset = _lattice_offset(src_crs, src_transform, src.shape, grid)
    if offset is not None:
        # the frame's pixels are grid pixels: every resampling returns them as they are (GDAL's result too,
        # bit for bit), so the warp is a copy of the overlapping block
        dr, dc = offset
        a0, a1 = max(r0, dr), min(r1, dr + src.shape[0])
        b0, b1 = max(c0, dc), min(c1, dc + src.shape[1])
        if a0 < a1 and b0 < b1:
            dst[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = src[a0 - dr:a1 - dr, b0 - dc:b1 - dc]
        return dst
    # The destination starts as NaN and NaN is the nodata of both sides: uncovered pixels stay NaN (never 0)
    # and interpolation only uses valid source pixels. For bilinear, XSCALE=YSCALE=1 keeps GDAL from widening
    # the kernel when the target is coarser than the source (that low-pass is slightly asymmetric and biases a
    # smooth field by up to ~5 % of a pixel step); coarsening on purpose is what "average" is for.
    opts = {"XSCALE": 1, "YSCALE": 1} if resampling == "bilinear" else {}
    # num_threads: GDAL's warper splits the destination between threads (the same pixels; 1.7x on two cores)
    reproject(np.ascontiguousarray(src, dtype=np.float32), dst, src_transform=src_transform, src_crs=src_crs,
              src_nodata=np.nan, dst_transform=grid.window_transform(r0, c0), dst_crs=grid.crs,
              dst_nodata=np.nan, resampling=method, num_threads=_host_threads(), **opts)
    return dst


def _lattice_offset(src_crs, src_transform, src_shape, grid: TargetGrid) -> tuple[int, int] | None:
    """(row, col) of a raster's first pixel on ``grid`` when its pixels are grid pixels (same CRS, same pixel
    size, origin a whole number of pixels away, to 1e-6 pixel across the whole raster); else None."""
    from affine import Affine

    t, g = Affine(*tuple(src_transform)[:6]), grid.transform
    if t.b != 0 or t.d != 0:
        return None
    h, w = src_shape[-2:]
    tol = 1e-6
    if abs(t.a - g.a) * max(w, 1) > tol * abs(g.a) or abs(t.e - g.e) * max(h, 1) > tol * abs(g.e):
        return None
    col, row = (t.c - g.c) / g.a, (t.f - g.f) / g.e
    dc, dr = round(col), round(row)
    if abs(col - dc) > tol or abs(row - dr) > tol:
        return None
    # grid.crs is a rasterio CRS: its == reads the other side (a CRS, "EPSG:4326", WKT), False if unreadable
    if src_crs is None or not grid.crs == src_crs:
        return None
    return int(dr), int(dc)


def _host_threads() -> int:
    """Cores this process may use (its CPU affinity, as the CPU kernels count them), at most 8."""
    from .kernels.cpu import _n_threads

    return min(8, _n_threads())


def _host_map(fn, items) -> list:
    """``[fn(x) for x in items]`` on the host's cores: threads, for work that releases the GIL (SciPy's distance
    transforms); not for rasterio calls, whose warning handling is not thread-safe."""
    items = list(items)
    n = min(len(items), _host_threads())
    if n <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, items))


def _kind_of(name: str | None, dtype) -> str:
    if dtype == np.bool_ or name == "mask":
        return "mask"
    if name is not None and (name.endswith("_std") or name in ("std", "sigma")):
        return "std"
    return "value"


def resample_to_grid(obj, grid: TargetGrid, *, resampling: Resampling = "bilinear",
                     kind: Literal["value", "std", "mask"] | None = None):
    """Warp a frame (``Dataset``) or one raster (``DataArray``) onto ``grid``; host side, rasterio/GDAL.

    Each variable is resampled by its meaning:

    * values (``los_velocity``, ``dem``, ...) with ``resampling``; NaN is nodata on both sides, so uncovered
      pixels are NaN (never 0) and NaN reaches at most one pixel into valid data (GDAL renormalises the
      interpolation weights over valid neighbours);
    * standard deviations (``*_std``) as variances, then square-rooted — interpolating variances keeps them
      positive and, for ``average``, gives the mean variance (conservative for spatially correlated InSAR
      noise, which does not average down as 1/N);
    * unit vectors (``los_e/n/u``) with ``resampling``, then renormalised to length 1;
    * masks (bool) by nearest neighbour, pixels outside the source become False.

    ``kind`` overrides the meaning inferred from a DataArray's name/dtype. Attributes are kept; the result
    carries the grid's coordinates and CRS.

    Accuracy: within one CRS the pixel mapping is affine and exact; across CRSs GDAL's approximate transformer
    places pixels within 1/8 of a source pixel (a smooth field is then off by at most ~1/8 of its change per
    pixel). Warping a window of the grid gives the same values as warping the whole grid up to float32
    rounding.
    """
    import xarray as xr

    _resampling_enum(resampling)
    y, x = grid.coords()

    def wrap(arr, src_da):
        out = xr.DataArray(arr, dims=("y", "x"), coords={"y": y, "x": x}, name=src_da.name,
                           attrs=dict(src_da.attrs))
        return out.rio.write_crs(grid.crs, inplace=True).rio.write_transform(grid.transform, inplace=True)

    if isinstance(obj, xr.Dataset):
        crs, t, h, w = _georef(obj, "frame")
        out = grid.to_dataset()
        unit = [v for v in _UNIT_VARS if v in obj]
        for name, da in obj.data_vars.items():
            if set(da.dims) != {"y", "x"} or name in unit:
                continue
            out[name] = (("y", "x"), _resample_one(da, crs, t, grid, resampling, kind=_kind_of(name, da.dtype)),
                         dict(da.attrs))
        if unit:
            comps = {v: _warp(np.asarray(obj[v].values), crs, t, grid, resampling).astype(np.float64)
                     for v in unit}
            norm = np.sqrt(sum(c * c for c in comps.values()))
            for v in unit:
                out[v] = (("y", "x"), (comps[v] / norm).astype(np.float32), dict(obj[v].attrs))
        out.attrs.update(obj.attrs)
        if crs != grid.crs:
            out.attrs["grid_notes"] = f"reprojected from {crs.to_string()} to {grid.crs.to_string()}"
        return out.rio.write_crs(grid.crs, inplace=True).rio.write_transform(grid.transform, inplace=True)
    if isinstance(obj, xr.DataArray):
        crs, t, h, w = _georef(obj, obj.name or "array")
        return wrap(_resample_one(obj, crs, t, grid, resampling,
                                  kind=kind or _kind_of(obj.name, obj.dtype)), obj)
    raise ArrayArgumentError(f"Cannot resample an object of type {type(obj).__name__}.", field="obj",
                             fix="pass an xarray Dataset (frame) or DataArray with y/x coordinates and a CRS")


@dataclass
class FootprintRaster:
    """A raster on the window of a target grid that one frame covers (float32, NaN = no data).

    ``values`` holds grid rows ``window[0]:window[1]`` and columns ``window[2]:window[3]``; every grid pixel
    outside the window is no data. An empty footprint has an empty window ``(0, 0, 0, 0)``. A frame covers a
    few per cent of a wide-area grid, so per-frame rasters kept this way cost the frame's footprint in memory
    instead of the whole grid (18 frames at 0.001°: 1 GB instead of 4.8 GB per raster kind).
    """

    values: np.ndarray
    window: tuple[int, int, int, int]
    name: str | None = None

    def crop(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """The values on ``window`` (grid rows/cols ``(r0, r1, c0, c1)``), NaN where it leaves the footprint."""
        r0, r1, c0, c1 = (int(v) for v in window)
        w0, w1, v0, v1 = self.window
        if w0 <= r0 and r1 <= w1 and v0 <= c0 and c1 <= v1:  # inside: a view, no copy
            return self.values[r0 - w0:r1 - w0, c0 - v0:c1 - v0]
        out = np.full((max(r1 - r0, 0), max(c1 - c0, 0)), np.nan, dtype=self.values.dtype)
        a0, a1, b0, b1 = max(r0, w0), min(r1, w1), max(c0, v0), min(c1, v1)
        if a0 < a1 and b0 < b1:
            out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = self.values[a0 - w0:a1 - w0, b0 - v0:b1 - v0]
        return out

    def full(self, grid: TargetGrid) -> np.ndarray:
        """The raster on the whole grid (NaN outside the footprint)."""
        return self.crop((0, grid.height, 0, grid.width))


def resample_footprint(da, grid: TargetGrid, *, resampling: Resampling = "bilinear",
                       kind: Literal["value", "std", "mask"] | None = None,
                       window: tuple[int, int, int, int] | None = None) -> FootprintRaster:
    """Warp one georeferenced raster (``DataArray``) onto the part of ``grid`` its valid pixels cover.

    As :func:`resample_to_grid` for one raster (same resampling by meaning, ``kind`` inferred from the name),
    but only the grid window around the raster's finite pixels (plus one pixel, the reach of bilinear
    interpolation) is computed and kept; ``window`` imposes one instead (e.g. a value raster's window for its
    standard deviation). The values equal those of :func:`resample_to_grid` on that window up to float32
    rounding.
    """
    import xarray as xr

    if not isinstance(da, xr.DataArray):
        raise ArrayArgumentError(f"resample_footprint needs a georeferenced DataArray, not {type(da).__name__}.",
                                 field="da", fix="pass a DataArray with y/x coordinates and a CRS (one raster of "
                                                 "a frame, e.g. frame['los_velocity'])")
    _resampling_enum(resampling)
    crs, t, h, w = _georef(da, da.name or "array")
    if window is None:
        window = _footprint_window(da, grid)
    else:
        r0, r1, c0, c1 = (int(v) for v in window)
        if not (0 <= r0 <= r1 <= grid.height and 0 <= c0 <= c1 <= grid.width):
            raise ArrayArgumentError(f"window {tuple(window)} is not inside the grid {grid.shape}.",
                                     field="window", fix="give (row0, row1, col0, col1) within the target grid")
        window = (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None
    k = kind or _kind_of(da.name, da.dtype)
    if window is None:
        return FootprintRaster(np.empty((0, 0), np.bool_ if k == "mask" else np.float32), (0, 0, 0, 0), da.name)
    return FootprintRaster(_resample_one(da, crs, t, grid, resampling, kind=k, window=window), window, da.name)


def _resample_one(da, crs, t, grid, resampling, *, kind, window=None) -> np.ndarray:
    src = np.asarray(backend.to_numpy(da.data if hasattr(da, "data") else da))
    if kind == "mask":
        out = _warp(src.astype(np.float32), crs, t, grid, "nearest", window)
        return np.nan_to_num(out, nan=0.0) > 0.5
    if kind == "std":
        var = _warp(np.square(src.astype(np.float64)).astype(np.float32), crs, t, grid, resampling, window)
        return np.sqrt(var)
    if kind == "value":
        return _warp(src, crs, t, grid, resampling, window)
    raise InputError(f"Unknown raster kind {kind!r}.", field="kind", fix="use 'value', 'std' or 'mask'")


# ==============================================================================================================
# Weighted, feathered merge
# ==============================================================================================================
def _pixel_size_km(crs, transform, height: int) -> tuple[float, float]:
    """(dy_km, dx_km) of a pixel at the grid's middle row (ellipsoidal for geographic CRSs)."""
    if crs.is_geographic:
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
        lat = transform.f + transform.e * (height / 2.0)
        lon = transform.c
        _, _, dx = geod.inv(lon, lat, lon + abs(transform.a), lat)
        _, _, dy = geod.inv(lon, lat - abs(transform.e) / 2, lon, lat + abs(transform.e) / 2)
        return dy / 1e3, dx / 1e3
    unit = crs.linear_units_factor[1] if hasattr(crs, "linear_units_factor") else 1.0
    return abs(transform.e) * unit / 1e3, abs(transform.a) * unit / 1e3


def feather_ramp(valid, pixel_km: tuple[float, float], feather_km: float):
    """Edge ramp of a valid-data mask: 0 outside, rising linearly with distance from the data edge, 1 beyond
    ``feather_km`` inside.

    ``pixel_km`` is the (dy, dx) pixel size in km. The distance is the Euclidean distance (scipy's
    ``distance_transform_edt``; cupyx's on the GPU) from each valid pixel centre to the nearest invalid pixel
    centre, so an edge pixel gets one pixel's distance, never zero: a pixel seen by one frame only keeps its
    value. The array border counts as a data edge. Returns float32 in the namespace of ``valid``.
    """
    xp = backend.namespace(valid)
    if feather_km <= 0:
        return xp.astype(valid, xp.float32)
    if backend.is_gpu_namespace(xp):
        import cupy
        from cupyx.scipy.ndimage import distance_transform_edt

        padded = cupy.pad(valid, 1, constant_values=False)
        dist = distance_transform_edt(padded, sampling=pixel_km)[1:-1, 1:-1]
        ramp = cupy.clip(dist / feather_km, 0.0, 1.0).astype(cupy.float32)
        return ramp
    return backend.asarray(_host_feather_ramp(backend.to_numpy(valid), pixel_km, feather_km), xp=xp)


def _host_feather_ramp(valid, pixel_km, feather_km: float, nan_outside: bool = False) -> np.ndarray:
    """:func:`feather_ramp` of a host mask, NaN outside the mask with ``nan_outside``."""
    from scipy.ndimage import distance_transform_edt

    from .kernels import cpu as _kcpu

    valid = np.asarray(valid, dtype=bool)
    if feather_km <= 0:  # no feathering: full weight on the data
        ramp = valid.astype(np.float32)
        return np.where(valid, ramp, np.nan).astype(np.float32, copy=False) if nan_outside else ramp
    host = np.pad(valid, 1, constant_values=False)
    if _kcpu.cpu_engine() == "numba":
        # scipy's feature transform, then the distance and the ramp in one pass (scipy would form the distance
        # in four float64 arrays of the frame's size, more than half its time)
        ft = distance_transform_edt(host, sampling=pixel_km, return_distances=False, return_indices=True)
        return _kcpu.edge_ramp(ft, pixel_km, feather_km, valid if nan_outside else None)
    dist = distance_transform_edt(host, sampling=pixel_km)[1:-1, 1:-1]
    ramp = np.clip(dist / feather_km, 0.0, 1.0).astype(np.float32, copy=False)
    return np.where(valid, ramp, np.nan).astype(np.float32, copy=False) if nan_outside else ramp


@dataclass
class MergeResult:
    """Merged mosaic on ``grid``: ``value`` and ``std`` (float32, mm/yr, NaN where no frame), ``count``
    (int16, number of contributing frames), all in the inputs' array namespace (NumPy for xarray inputs)."""

    value: Any
    std: Any
    count: Any
    grid: TargetGrid
    tile_size: int
    n_tiles: int
    notes: list[str] = field(default_factory=list)
    extra: list = field(default_factory=list)  # merged ``extra`` rasters (float32), same weights as ``value``

    def to_dataset(self, name: str = "los_velocity") -> "xarray.Dataset":
        """Host ``xarray.Dataset`` with ``name``, ``name_std`` (or ``<name>_std``) and ``count`` on the grid."""
        ds = self.grid.to_dataset()
        ds[name] = (("y", "x"), backend.to_numpy(self.value))
        ds[f"{name.removesuffix('_velocity')}_std" if name.endswith("_velocity") else f"{name}_std"] = (
            ("y", "x"), backend.to_numpy(self.std))
        ds["count"] = (("y", "x"), backend.to_numpy(self.count))
        ds.attrs["merge_notes"] = "; ".join(self.notes)
        return ds


class _Source(NamedTuple):
    """One frame to merge: either on the grid (``los``/``std``/``ramp`` arrays) or native (warped per tile)."""

    on_grid: bool
    los: Any
    var: Any
    ramp: Any
    crs: Any = None
    transform: Any = None
    window: tuple[int, int, int, int] | None = None  # bounding window of the frame on the grid
    extra: tuple = ()  # further rasters merged with this frame's weights (on the grid or native, like ``los``)


def _is_xr(obj) -> bool:
    import xarray as xr

    return isinstance(obj, (xr.DataArray, xr.Dataset))


def _check_value_std(xp, los, std, i: int):
    """Valid-pixel mask of frame ``i``; raises when it is empty or its std is unusable where it is valid."""
    valid = xp.isfinite(los)
    if not bool(xp.any(valid)):
        raise InputError(f"los_list[{i}] has no valid pixels (all NaN).", field=f"los_list[{i}]",
                         fix="drop this frame from the merge or check that it was read correctly")
    bad = valid & ~(xp.isfinite(std) & (std > 0))
    if bool(xp.any(bad)):
        raise InputError(f"std_list[{i}] is NaN or <= 0 at {int(xp.sum(xp.astype(bad, xp.int64)))} pixels where los_list[{i}] is "
                         "valid.", field=f"std_list[{i}]",
                         fix="give a positive 1-sigma (mm/yr) wherever the value is valid, or mask those values")
    return valid


def _check_merge_args(values: list, stds: list, feather_km: float, tile_size: int, resampling: str,
                      what: str) -> None:
    """The arguments merge_frames and MergePlan share; ``what`` names the value rasters in the messages."""
    if len(values) != len(stds):
        raise ArrayArgumentError(f"{len(values)} value rasters but {len(stds)} std rasters.",
                                 field="std_list", fix="give one std raster per value raster, in the same order")
    if not values:
        raise InputError("No frames to merge.", field=what, fix="pass at least one frame")
    if feather_km < 0 or not math.isfinite(feather_km):
        raise InputError(f"feather_km={feather_km!r} must be >= 0.", field="feather_km",
                         fix="give the feathering width in km (0 turns it off)")
    if tile_size < 1:
        raise InputError(f"tile_size={tile_size!r} must be a positive number of pixels.", field="tile_size",
                         fix="use e.g. 2048")
    _resampling_enum(resampling)


def _native_frame(los_da, std_da, i: int, what: str):
    """``(crs, transform, height, width, values float32, std float64, valid)`` of frame ``i`` given as a value
    and a std DataArray, which must share one grid (``what`` names the value rasters in the messages)."""
    crs, t, h, w = _georef(los_da, f"{what}[{i}]")
    crs_s, t_s, h_s, w_s = _georef(std_da, f"std_list[{i}]")
    if (h, w) != (h_s, w_s) or crs != crs_s or not t.almost_equals(t_s):
        raise ArrayArgumentError(f"std_list[{i}] is not on the grid of {what}[{i}].", field=f"std_list[{i}]",
                                 fix="resample both to the same grid, or pass the frame's own los_std")
    los_np = np.asarray(backend.to_numpy(los_da.data), dtype=np.float32)
    std_np = np.asarray(backend.to_numpy(std_da.data), dtype=np.float64)
    return crs, t, h, w, los_np, std_np, _check_value_std(np, los_np, std_np, i)


def _tile_bytes(n_frames: int, tile: int) -> int:
    # per frame and tile: value, variance, ramp (float32) + warp scratch; accumulators: 3 float64 + count
    return tile * tile * (n_frames * 16 + 4 * 8 + 2 * 8)


def merge_frames(los_list: Sequence, std_list: Sequence, grid: TargetGrid, *, feather_km: float = 10.0,
                 resampling: Resampling = "bilinear", tile_size: int = 2048,
                 memory_budget_bytes: int | None = None, extra: Sequence | None = None,
                 ramp_cache: dict | None = None) -> MergeResult:
    """Inverse-variance weighted merge of frames with feathered edges, tile by tile.

    Parameters
    ----------
    los_list, std_list
        Values (mm/yr) and their 1-sigma (mm/yr), one pair per frame. Either georeferenced DataArrays (any
        grid and CRS: each tile is warped from the frame's native grid, so memory stays bounded by the tile,
        not by the mosaic) or arrays already on ``grid`` (shape ``grid.shape``, any array-API backend).
    extra
        Optional, one sequence per frame of further rasters on that frame's grid (e.g. the unit vector's
        components), each merged with the frame's weights: ``MergeResult.extra[k] = sum(w_i x_ik) / sum(w_i)``
        over the frames where ``x_ik`` is finite too. One call instead of one merge per raster: the edge
        ramps and the weights are computed and warped once.
    grid
        The target grid.
    feather_km
        Width of the edge ramp: a frame's weight rises from near 0 at its valid-data edge to full weight
        ``feather_km`` inside, so seams between frames blend instead of stepping. 0 disables feathering.
    tile_size, memory_budget_bytes
        Tiles of at most ``tile_size`` square pixels; with a budget, the tile shrinks until one tile's working
        set fits it (a large grid is tiled, never refused). Native frames stay in memory whole (value,
        variance and edge ramp: 12 bytes per native pixel) and the three outputs are allocated on the whole
        grid (10 bytes per pixel); everything else is per tile.
    ramp_cache
        Optional dict shared between calls that merge the same frames again (e.g. the vertical mosaic, then
        the LOS of each orbit): a frame's edge ramp (a distance transform) is computed once for its valid-data
        mask, kept here, and taken out (removed) by the next call with the same mask, pixel size and
        ``feather_km``. The same ramps bit for bit; an entry no later call takes costs 4 bytes per pixel until
        the dict is dropped.

    Weights and propagation
        ``w_i = ramp_i / std_i**2``; ``value = sum(w_i v_i) / sum(w_i)``;
        ``std = sqrt(sum(w_i**2 std_i**2)) / sum(w_i)`` — exact for the weighted mean when the frames' errors
        are independent (they are not perfectly: frames adjusted to the same GNSS share some error, so the
        merged std is a lower bound there). Where feathering is off it is ``1/sqrt(sum(1/std_i**2))``.
        The frames should share one look geometry (or be vertical estimates): merging LOS of different
        look directions mixes different projections of the motion.
    """
    los_list, std_list = list(los_list), list(std_list)
    _check_merge_args(los_list, std_list, feather_km, tile_size, resampling, "los_list")
    extra = [list(e) for e in extra] if extra is not None else [[] for _ in los_list]
    if len(extra) != len(los_list) or len({len(e) for e in extra}) > 1:
        raise ArrayArgumentError(f"extra must hold one sequence of rasters per frame, all of the same length "
                                 f"({len(los_list)} frames).", field="extra",
                                 fix="give, for every frame, the same number of extra rasters in the same order")
    n_extra = len(extra[0]) if extra else 0
    notes: list[str] = []
    pix_grid = _pixel_size_km(grid.crs, grid.transform, grid.height)

    sources: list[_Source] = []
    ramp_jobs: list[tuple] = []
    xp = None
    for i, (los, std) in enumerate(zip(los_list, std_list)):
        los_da, std_da = (_da_of(los), _da_of(std, "los_std")) if _is_xr(los) else (los, std)
        if _is_xr(los_da) != _is_xr(std_da):
            raise ArrayArgumentError(f"los_list[{i}] and std_list[{i}] are not the same kind of object.",
                                     field=f"std_list[{i}]", fix="give both as DataArrays or both as arrays")
        if _is_xr(los_da):
            crs, t, h, w, los_np, std_np, valid = _native_frame(los_da, std_da, i, "los_list")
            here = TargetGrid(crs, t, w, h)
            xp_i = backend.namespace(np.empty(0))
            ex = []
            for k, x in enumerate(extra[i]):
                x_np = np.asarray(backend.to_numpy(_da_of(x).data if _is_xr(x) else x), dtype=np.float32)
                if x_np.shape != (h, w):
                    raise ArrayArgumentError(f"extra[{i}][{k}] has shape {x_np.shape}; los_list[{i}] is {(h, w)}.",
                                             field=f"extra[{i}][{k}]", fix="give extra rasters on the frame's grid")
                ex.append(x_np)
            # edge ramps (a distance transform each) are computed below, all frames at once on the host's cores
            if here.matches(grid):
                ramp_jobs.append((len(sources), valid, pix_grid, False))
                sources.append(_Source(True, los_np, np.square(std_np).astype(np.float32, copy=False), None,
                                       extra=tuple(ex)))
            else:
                ramp_jobs.append((len(sources), valid, _pixel_size_km(crs, t, h), True))
                var = np.where(valid, np.square(std_np), np.nan).astype(np.float32, copy=False)
                sources.append(_Source(False, np.where(valid, los_np, np.nan), var, None, crs, t,
                                       _footprint_window(los_da, grid),
                                       tuple(np.where(valid, x, np.nan).astype(np.float32, copy=False)
                                             for x in ex)))
        else:
            xp_i = backend.namespace(los, std)
            if tuple(los.shape) != grid.shape or tuple(std.shape) != grid.shape:
                raise ArrayArgumentError(
                    f"los_list[{i}] has shape {tuple(los.shape)} and std_list[{i}] {tuple(std.shape)}; the "
                    f"target grid is {grid.shape}.", field=f"los_list[{i}]",
                    fix="resample each frame to the target grid with resample_to_grid first, or pass georeferenced "
                        "DataArrays so merge_frames warps them")
            valid = _check_value_std(xp_i, los, std, i)
            ramp = feather_ramp(valid, pix_grid, feather_km)
            for k, x in enumerate(extra[i]):
                if tuple(x.shape) != grid.shape:
                    raise ArrayArgumentError(f"extra[{i}][{k}] has shape {tuple(x.shape)}; the target grid is "
                                             f"{grid.shape}.", field=f"extra[{i}][{k}]",
                                             fix="give extra rasters on the same grid as the values")
            sources.append(_Source(True, los, std * std, ramp, extra=tuple(extra[i])))
        if xp is None:
            xp = xp_i
        elif backend.backend_name(xp) != backend.backend_name(xp_i):
            raise ArrayArgumentError("The frames to merge live on different array backends.",
                                     field=f"los_list[{i}]", fix="move all inputs to one backend first")

    def host_ramp(job):
        _, valid, pix, native = job
        return _host_feather_ramp(valid, pix, feather_km, nan_outside=native)

    keys = [_ramp_key(job, feather_km) if ramp_cache is not None else None for job in ramp_jobs]
    cached = [ramp_cache.pop(k, None) if k is not None else None for k in keys]
    todo = [job for job, c in zip(ramp_jobs, cached) if c is None]
    fresh = iter(_host_map(host_ramp, todo))
    for job, key, c in zip(ramp_jobs, keys, cached):
        ramp = c if c is not None else next(fresh)
        if key is not None and c is None:
            ramp_cache[key] = ramp
        sources[job[0]] = sources[job[0]]._replace(ramp=ramp)
    if ramp_cache is not None:
        log.debug("edge ramps: %d computed, %d reused", len(todo), len(ramp_jobs) - len(todo))

    # memory: shrink the tile until one tile's working set fits the budget
    tile = int(min(tile_size, max(grid.shape)))
    tile_asked = tile
    if memory_budget_bytes is not None:
        while tile > 16 and _tile_bytes(len(sources), tile) > memory_budget_bytes:
            tile = max(16, tile // 2)
        if _tile_bytes(len(sources), tile) > memory_budget_bytes:
            notes.append(f"memory budget {memory_budget_bytes} B is below one 16-px tile; using 16-px tiles")
        if tile < tile_asked:
            notes.append(f"tile size reduced to {tile} px to fit a memory budget of {memory_budget_bytes} B")

    f32, f64 = xp.float32, xp.float64
    fused = _fused_accumulate(xp)
    value = xp.full(grid.shape, xp.nan, dtype=f32)
    std_out = xp.full(grid.shape, xp.nan, dtype=f32)
    count = xp.zeros(grid.shape, dtype=xp.int16)
    extra_out = [xp.full(grid.shape, xp.nan, dtype=f32) for _ in range(n_extra)]
    n_tiles = 0
    for r0 in range(0, grid.height, tile):
        r1 = min(r0 + tile, grid.height)
        for c0 in range(0, grid.width, tile):
            c1 = min(c0 + tile, grid.width)
            n_tiles += 1
            sw = xp.zeros((r1 - r0, c1 - c0), dtype=f64)
            swv = xp.zeros_like(sw)
            sw2v = xp.zeros_like(sw)
            cnt = xp.zeros((r1 - r0, c1 - c0), dtype=xp.int16)
            esw = xp.zeros((n_extra, r1 - r0, c1 - c0), dtype=f64)
            eswv = xp.zeros_like(esw)
            for s in sources:
                # only the part of the tile the frame covers: a frame is a few per cent of a wide-area grid, and
                # warping and summing it over whole tiles cost frames × grid instead of the frames' footprints
                fw = s.window if not s.on_grid else (0, grid.height, 0, grid.width)
                if fw is None:
                    continue
                a0, a1, b0, b1 = max(r0, fw[0]), min(r1, fw[1]), max(c0, fw[2]), min(c1, fw[3])
                if a0 >= a1 or b0 >= b1:
                    continue  # frame does not reach this tile: no warping
                if s.on_grid:
                    v, var, rp = (s.los[a0:a1, b0:b1], s.var[a0:a1, b0:b1], s.ramp[a0:a1, b0:b1])
                    ex = [x[a0:a1, b0:b1] for x in s.extra]
                else:
                    win = (a0, a1, b0, b1)
                    v = xp.asarray(_warp(s.los, s.crs, s.transform, grid, resampling, win))
                    var = xp.asarray(_warp(s.var, s.crs, s.transform, grid, resampling, win))
                    rp = xp.asarray(_warp(s.ramp, s.crs, s.transform, grid, resampling, win))
                    ex = [xp.asarray(_warp(x, s.crs, s.transform, grid, resampling, win)) for x in s.extra]
                t = (slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
                _accumulate(xp, v, var, rp, ex, t, sw, swv, sw2v, cnt, esw, eswv, fused)
            tile_at = (slice(r0, r1), slice(c0, c1))
            _finish_tile(xp, sw, swv, sw2v, value, std_out, tile_at, fused)
            count[r0:r1, c0:c1] = cnt
            for k in range(n_extra):
                _finish_tile(xp, esw[k, ...], eswv[k, ...], None, extra_out[k], None, tile_at, fused)
    log.info("merged %d frames on a %d x %d grid in %d tile(s) of <= %d px", len(sources), grid.width,
             grid.height, n_tiles, tile)
    return MergeResult(value, std_out, count, grid, tile, n_tiles, notes, extra_out)


def _ramp_key(job, feather_km: float) -> tuple:
    """What a frame's edge ramp depends on: its valid-data mask (by a digest), pixel size, feather width and
    whether it stays on the frame's grid (NaN outside the data) or is on the target grid."""
    import hashlib

    _, valid, pix, native = job
    m = np.ascontiguousarray(valid, dtype=bool)
    digest = hashlib.blake2b(memoryview(m).cast("B"), digest_size=20).hexdigest()
    return digest, m.shape, tuple(float(p) for p in pix), float(feather_km), bool(native)


def _fused_accumulate(xp) -> bool:
    """Whether the merge sums go through the one-pass numba kernel (NumPy arrays, numba CPU engine)."""
    from .kernels.cpu import fused_for

    return fused_for(xp)


def _accumulate(xp, v, var, rp, ex, t, sw, swv, sw2v, cnt, esw, eswv, fused: bool) -> None:
    """Add one frame's part ``t`` (a pair of slices) of a tile to the tile's weighted sums (see merge_frames)."""
    if fused:
        from .kernels.cpu import merge_accumulate

        f32 = np.float32
        extra = (np.stack([np.asarray(x, f32) for x in ex]) if ex else
                 np.empty((0,) + tuple(v.shape), f32))
        merge_accumulate(np.asarray(v, f32), np.asarray(var, f32), np.asarray(rp, f32), extra, sw[t], swv[t],
                         sw2v[t], cnt[t], esw[:, t[0], t[1]], eswv[:, t[0], t[1]])
        return
    ok, w, v0, var0 = _weights(xp, v, var, rp)
    sw[t], swv[t] = sw[t] + w, swv[t] + w * v0
    sw2v[t], cnt[t] = sw2v[t] + w * w * var0, cnt[t] + xp.astype(ok, xp.int16)
    for k, x in enumerate(ex):
        # the frame's own weight, where this raster is finite as well
        fin = xp.isfinite(x)
        w_k = xp.where(fin, w, xp.zeros_like(w))
        x0 = xp.where(fin, xp.astype(x, xp.float64), xp.zeros_like(w))
        esw[k, t[0], t[1]], eswv[k, t[0], t[1]] = esw[k, t[0], t[1]] + w_k, eswv[k, t[0], t[1]] + w_k * x0


def _finish_tile(xp, sw, swv, sw2v, value, std_out, at, fused: bool) -> None:
    """Write a tile's weighted mean ``swv / sw`` into ``value[at]`` and, unless ``std_out`` is None, its sigma
    ``sqrt(sw2v) / sw`` into ``std_out[at]`` (float32; NaN where no weight): one numba pass when ``fused``,
    else array-API expressions (the same bits)."""
    if fused:
        from .kernels.cpu import merge_finish

        merge_finish(sw, swv, sw2v, value[at], None if std_out is None else std_out[at])
        return
    f32 = xp.float32
    has = sw > 0
    safe = xp.where(has, sw, xp.ones_like(sw))
    value[at] = xp.astype(xp.where(has, swv / safe, xp.nan), f32)
    if std_out is not None:
        std_out[at] = xp.astype(xp.where(has, xp.sqrt(sw2v) / safe, xp.nan), f32)


def _weights(xp, v, var, ramp):
    """(ok, w, v0, var0) of one frame's tile in float64: ``w = ramp / var`` where value, variance and ramp are all
    usable, 0 elsewhere; ``v0``/``var0`` the value and variance with 0 where not ``ok``."""
    f64 = xp.float64
    v, var, ramp = xp.astype(v, f64), xp.astype(var, f64), xp.astype(ramp, f64)
    ok = xp.isfinite(v) & xp.isfinite(var) & (var > 0) & xp.isfinite(ramp) & (ramp > 0)
    zero = xp.zeros_like(v)
    w = xp.where(ok, ramp / xp.where(ok, var, xp.ones_like(v)), zero)
    return ok, w, xp.where(ok, v, zero), xp.where(ok, var, zero)


class _PlanFrame(NamedTuple):
    crs: Any
    transform: Any
    shape: tuple[int, int]
    on_grid: bool
    valid: np.ndarray            # the template's valid pixels (finite values)
    var: np.ndarray              # std² (float32, native grid; NaN where the std is unusable)
    pix_km: tuple[float, float]  # pixel size for the edge ramp
    window: tuple[int, int, int, int] | None
    pieces: dict                 # tile index -> (grid window, warped ramp, warped variance) of the template


class MergePlan:
    """:func:`merge_frames` for many rasters on the same frames, e.g. every epoch of a time series.

    Each merge of the same frames onto the same grid derives the same things again: the frames' georeferencing
    and footprints on the grid, their feathered edge ramps (a distance transform per frame) and their warped
    ramps and variances. The plan derives them once, from templates (georeferenced DataArrays whose finite
    pixels are the frames' valid data) and the frames' 1-sigma; :meth:`merge` then warps only the values (one
    warp per frame and tile instead of three). Where the values of a merge are valid on other pixels than the
    template (a pixel lost in one epoch), that frame's ramp and variance are derived again for those pixels, so
    ``plan.merge(values)`` is exactly ``merge_frames(values, stds)`` with ``stds`` the plan's sigmas on the
    values' valid pixels — bitwise, tile by tile, whatever the epoch. Host side (NumPy), like the warping path
    of :func:`merge_frames`; no ``extra`` rasters.
    """

    def __init__(self, templates: Sequence, std_list: Sequence, grid: TargetGrid, *, feather_km: float = 10.0,
                 resampling: Resampling = "bilinear", tile_size: int = 2048):
        templates, std_list = list(templates), list(std_list)
        _check_merge_args(templates, std_list, feather_km, tile_size, resampling, "templates")
        self.grid, self.feather_km, self.resampling = grid, float(feather_km), resampling
        self.tile = int(min(tile_size, max(grid.shape)))
        self.tiles = [(r0, min(r0 + self.tile, grid.height), c0, min(c0 + self.tile, grid.width))
                      for r0 in range(0, grid.height, self.tile) for c0 in range(0, grid.width, self.tile)]
        pix_grid = _pixel_size_km(grid.crs, grid.transform, grid.height)
        self.frames: list[_PlanFrame] = []
        for i, (tpl, std) in enumerate(zip(templates, std_list)):
            if not (_is_xr(tpl) and _is_xr(std)):
                raise ArrayArgumentError(f"templates[{i}] and std_list[{i}] must be georeferenced DataArrays.",
                                         field=f"templates[{i}]",
                                         fix="pass xarray DataArrays with y/x coordinates and a CRS (the plan "
                                             "warps each frame from its own grid)")
            los_da = _da_of(tpl)
            crs, t, h, w, los_np, std_np, valid = _native_frame(los_da, _da_of(std, "los_std"), i, "templates")
            on_grid = TargetGrid(crs, t, w, h).matches(grid)
            var = np.square(std_np).astype(np.float32, copy=False)
            var = np.where(np.isfinite(std_np) & (std_np > 0), var, np.float32(np.nan))
            self.frames.append(_PlanFrame(crs, t, (h, w), on_grid, valid, var, pix_grid if on_grid else
                                          _pixel_size_km(crs, t, h), _footprint_window(los_da, grid), {}))
        # the edge ramps (distance transforms) on the host's cores; the warps one frame after the other (GDAL
        # threads each warp itself; rasterio's Python side is not for concurrent calls)
        ramps = _host_map(lambda pf: _host_feather_ramp(pf.valid, pf.pix_km, self.feather_km,
                                                        nan_outside=not pf.on_grid), self.frames)
        self.frames = [pf._replace(pieces=self._pieces(pf, pf.valid, r)) for pf, r in zip(self.frames, ramps)]

    def _pieces(self, pf: _PlanFrame, valid: np.ndarray, ramp: np.ndarray | None = None) -> dict:
        """Per tile the frame reaches: (grid window, ramp, variance) on that window, for the valid pixels
        (``ramp``: the frame's edge ramp for ``valid``, NaN outside it off the grid; computed here when None)."""
        if ramp is None:
            ramp = _host_feather_ramp(valid, pf.pix_km, self.feather_km, nan_outside=not pf.on_grid)
        # as merge_frames' frames already on the grid: no warping, the variance as given
        var = pf.var if pf.on_grid else np.where(valid, pf.var, np.float32(np.nan))
        out = {}
        fw = pf.window if not pf.on_grid else (0, self.grid.height, 0, self.grid.width)
        if fw is None:
            return out
        for k, (r0, r1, c0, c1) in enumerate(self.tiles):
            a0, a1, b0, b1 = max(r0, fw[0]), min(r1, fw[1]), max(c0, fw[2]), min(c1, fw[3])
            if a0 >= a1 or b0 >= b1:
                continue
            win = (a0, a1, b0, b1)
            out[k] = (win, self._on(pf, ramp, win), self._on(pf, var, win))
        return out

    def _on(self, pf: _PlanFrame, a: np.ndarray, win) -> np.ndarray:
        if pf.on_grid:
            return a[win[0]:win[1], win[2]:win[3]]
        return _warp(a, pf.crs, pf.transform, self.grid, self.resampling, win)

    def merge(self, values: Sequence) -> MergeResult:
        """Merge one raster per frame (arrays or DataArrays on the frames' own grids, in the plan's order)."""
        values = list(values)
        if len(values) != len(self.frames):
            raise ArrayArgumentError(f"{len(values)} rasters for a plan of {len(self.frames)} frames.",
                                     field="values", fix="give one raster per frame of the plan, in its order")
        grid = self.grid
        pieces, vals = [], []
        for i, (pf, v) in enumerate(zip(self.frames, values)):
            v = np.asarray(backend.to_numpy(_da_of(v).data if _is_xr(v) else v), dtype=np.float32)
            if v.shape != pf.shape:
                raise ArrayArgumentError(f"values[{i}] has shape {v.shape}; the plan's frame {i} is {pf.shape}.",
                                         field=f"values[{i}]", fix="give each frame's raster on its own grid")
            valid = np.isfinite(v)
            if np.array_equal(valid, pf.valid):
                pieces.append(pf.pieces)
            else:  # other pixels valid than in the template: this frame's ramp and variance for them
                if not valid.any():
                    raise InputError(f"values[{i}] has no valid pixels (all NaN).", field=f"values[{i}]",
                                     fix="drop this frame from the plan or check that it was read correctly")
                bad = int(np.sum(valid & ~np.isfinite(pf.var)))
                if bad:
                    raise InputError(f"values[{i}] is valid at {bad} pixels where the plan's std_list[{i}] is NaN or "
                                     "<= 0.", field=f"values[{i}]",
                                     fix="give the plan a positive sigma wherever the frame can be valid (e.g. "
                                         "ones for equal weights), or mask those values")
                pieces.append(self._pieces(pf, valid))
            vals.append(v)
        f32 = np.float32
        value = np.full(grid.shape, np.nan, dtype=f32)
        std_out = np.full(grid.shape, np.nan, dtype=f32)
        count = np.zeros(grid.shape, dtype=np.int16)
        fused = _fused_accumulate(np)
        for k, (r0, r1, c0, c1) in enumerate(self.tiles):
            sw = np.zeros((r1 - r0, c1 - c0))
            swv, sw2v = np.zeros_like(sw), np.zeros_like(sw)
            cnt = np.zeros((r1 - r0, c1 - c0), dtype=np.int16)
            esw = np.zeros((0, r1 - r0, c1 - c0))
            for pf, pc, v in zip(self.frames, pieces, vals):
                if k not in pc:
                    continue
                win, rp, var = pc[k]
                t = (slice(win[0] - r0, win[1] - r0), slice(win[2] - c0, win[3] - c0))
                _accumulate(np, self._on(pf, v, win), var, rp, [], t, sw, swv, sw2v, cnt, esw, esw, fused)
            _finish_tile(np, sw, swv, sw2v, value, std_out, (slice(r0, r1), slice(c0, c1)), fused)
            count[r0:r1, c0:c1] = cnt
        return MergeResult(value, std_out, count, grid, self.tile, len(self.tiles), [])


def _footprint_window(da, grid: TargetGrid):
    """(row0, row1, col0, col1) of the grid window covering a frame's valid data (+1 px margin), or None."""
    from rasterio.warp import transform_bounds

    b = _valid_bounds(da, "frame")
    if b is None:
        return None
    crs = da.rio.crs
    if crs != grid.crs:
        b = transform_bounds(crs, grid.crs, *b, densify_pts=21)
    inv = ~grid.transform
    cols, rows = zip(*(inv @ (x, y) for x in (b[0], b[2]) for y in (b[1], b[3])))
    r0 = max(0, int(math.floor(min(rows))) - 1)
    r1 = min(grid.height, int(math.ceil(max(rows))) + 1)
    c0 = max(0, int(math.floor(min(cols))) - 1)
    c1 = min(grid.width, int(math.ceil(max(cols))) + 1)
    if r0 >= r1 or c0 >= c1:
        return None
    return (r0, r1, c0, c1)


# ==============================================================================================================
# Decomposition
# ==============================================================================================================
def _unwrap(*objs):
    """Plain arrays of possibly-xarray arguments, and the first DataArray as a template for the outputs."""
    import xarray as xr

    template = next((o for o in objs if isinstance(o, xr.DataArray)), None)
    return [o.data if isinstance(o, xr.DataArray) else o for o in objs], template


def _rewrap(arr, template, name: str):
    if template is None:
        return arr
    import xarray as xr

    out = xr.DataArray(backend.to_numpy(arr), dims=template.dims, coords=template.coords, name=name)
    return out.rio.write_crs(template.rio.crs, inplace=True) if template.rio.crs is not None else out


class VerticalResult(NamedTuple):
    """Vertical velocity ``vu`` and its 1-sigma ``vu_std`` (mm/yr, float32, NaN where no data)."""

    vu: Any
    vu_std: Any


def _as_f64(xp, a, like):
    if a is None:
        return None
    if isinstance(a, (int, float)):
        return xp.full(like.shape, float(a), dtype=xp.float64)
    return xp.astype(xp.asarray(a), xp.float64)


def _vertical_errors(bad_up: bool, bad_std: bool) -> None:
    if bad_up:
        raise GeometryError("The up component of the LOS unit vector is <= 0.05 where the LOS velocity is valid.",
                            field="u", fix="pass the ground-to-satellite unit vector (u > 0 for Sentinel-1); "
                                           "check the sign convention of the geometry files")
    if bad_std:
        raise InputError("los_std is NaN or <= 0 where los is valid.", field="los_std",
                         fix="give a positive 1-sigma (mm/yr) wherever the LOS velocity is valid")


def decompose_vertical(los, los_std, e, n, u, ve, vn, se=None, sn=None) -> VerticalResult:
    """Vertical velocity from one look geometry with the GNSS horizontal field removed.

    ``vu = (los - e*ve - n*vn) / u`` and ``vu_std**2 = (los_std**2 + e**2 se**2 + n**2 sn**2) / u**2``.

    Assumes: ``los`` is in the same (GNSS) reference frame as ``ve``/``vn`` (plate motion handled upstream);
    the horizontal field (``ve``, ``vn`` from geodesy's HorizontalVelocityField, mm/yr) is accurate to
    ``se``/``sn`` and its errors are independent of the InSAR error; ``se``/``sn`` omitted means the field is
    taken as exact. ``los_std`` may be None (then ``vu_std`` is None). Arrays broadcast against each other;
    DataArrays are accepted and returned as DataArrays. All array arguments must share one backend.
    """
    (los, los_std, e, n, u, ve, vn, se, sn), template = _unwrap(los, los_std, e, n, u, ve, vn, se, sn)
    xp = backend.namespace(los, los_std, e, n, u, ve, vn, se, sn)
    f64 = xp.float64
    L = xp.astype(xp.asarray(los), f64)
    E, N, U = (_as_f64(xp, a, L) for a in (e, n, u))
    VE, VN = _as_f64(xp, ve, L), _as_f64(xp, vn, L)
    ok = xp.isfinite(L) & xp.isfinite(U)
    _vertical_errors(bool(xp.any(ok & ~(U > 0.05))), False)
    Us = xp.where(ok, U, xp.ones_like(U))
    nan = xp.asarray(xp.nan, dtype=f64)
    # a pixel without an up component has no vertical: NaN, not its LOS less the horizontal motion
    vu = xp.where(ok, (L - E * VE - N * VN) / Us, nan)
    vu_std = None
    if los_std is not None:
        S = _as_f64(xp, los_std, L)
        _vertical_errors(False, bool(xp.any(ok & ~(xp.isfinite(S) & (S > 0)))))
        var = S * S
        if se is not None:
            SE = _as_f64(xp, se, L)
            var = var + E * E * SE * SE
        if sn is not None:
            SN = _as_f64(xp, sn, L)
            var = var + N * N * SN * SN
        vu_std = xp.astype(xp.where(ok, xp.sqrt(var) / Us, nan), xp.float32)
        vu_std = _rewrap(vu_std, template, "vertical_std")
    return VerticalResult(_rewrap(xp.astype(vu, xp.float32), template, "vertical_velocity"), vu_std)


@dataclass
class UpEastResult:
    """Per-pixel up/east decomposition (mm/yr, float32, NaN where undetermined).

    ``method`` (int8): 0 = undetermined, 1 = vertical only (one usable geometry, or ill-conditioned, and the
    GNSS ``ve`` was given; ``east`` is NaN), 2 = up and east by least squares. ``n_geometries`` (int16) is the
    number of valid look directions per pixel; ``condition`` the 2-norm condition number of the unweighted
    east-up normal matrix (inf where singular, NaN with fewer than two geometries); ``n_ill_conditioned`` the
    number of pixels with two or more geometries rejected for ``condition > max_condition``.
    """

    up: Any
    east: Any
    up_std: Any
    east_std: Any
    up_east_cov: Any
    n_geometries: Any
    method: Any
    condition: Any
    n_ill_conditioned: int
    n_vertical_only: int


def _up_east_errors(bad_sigma: bool, bad_up: bool) -> None:
    if bad_sigma:
        raise InputError("std_stack is NaN or <= 0 where los_stack is valid.", field="std_stack",
                         fix="give a positive 1-sigma (mm/yr) wherever the LOS velocity is valid")
    if bad_up:
        raise GeometryError("The up component of a LOS unit vector is <= 0.05 where LOS is valid.",
                            field="u_stack", fix="pass ground-to-satellite unit vectors (u > 0 for Sentinel-1)")


def _up_east_fused(L, S, E, Nn, U, VN, VE, SE, SN, *, east_prior, max_condition, warn) -> "UpEastResult":
    """:func:`decompose_up_east` on NumPy with the numba engine: one pass per pixel (kernels.cpu.up_east), the
    array-API path's results bit for bit."""
    from .kernels import cpu

    k, pix = L.shape[0], L.shape[1:]
    flat = [np.ascontiguousarray(a).reshape(k, -1) for a in (L, S, E, Nn, U)]
    per = [None if a is None else np.reshape(a, -1) for a in (VN, VE, SE, SN)]
    r = cpu.up_east(*flat, *per, east_prior=east_prior, max_condition=max_condition)
    _up_east_errors(bool(r["flags"][0]), bool(r["flags"][1]))
    method = r["method"].reshape(pix)
    n_geo = r["k"].reshape(pix)
    n_ill = int(np.count_nonzero((n_geo >= 2) & (method != 2)))
    n_vo = int(np.count_nonzero(method == 1))
    if n_ill and warn:
        log.warning("up/east: %d pixel(s) with two or more geometries are ill-conditioned (condition > %g); "
                    "east left undetermined there", n_ill, max_condition)
    return UpEastResult(up=r["up"].reshape(pix), east=r["east"].reshape(pix),
                        up_std=np.sqrt(r["up_var"]).astype(np.float32).reshape(pix),
                        east_std=np.sqrt(r["east_var"]).astype(np.float32).reshape(pix),
                        up_east_cov=r["cov"].reshape(*pix, 2, 2), n_geometries=n_geo, method=method,
                        condition=r["condition"].reshape(pix), n_ill_conditioned=n_ill, n_vertical_only=n_vo)


def decompose_up_east(los_stack, std_stack, e_stack, n_stack, u_stack, vn, sn=None, *, ve=None, se=None,
                      max_condition: float = 100.0, east_prior: bool = False, warn: bool = True) -> UpEastResult:
    """Up and east velocity from two or more look directions; north from the GNSS field.

    Stacks are ``(k, ...)``: k look geometries (e.g. ascending and descending mosaics) over the same pixels;
    NaN in ``los_stack`` (or ``std_stack``) drops that geometry at that pixel. Per pixel, with
    ``y_i = los_i - n_i*vn`` and weights ``w_i = 1/std_i**2``, the weighted least squares for ``x = (ve, vu)``
    with design rows ``(e_i, u_i)`` is solved in closed form (2×2 normal matrix, vectorised, no Python loop).

    Covariance (``up_east_cov``, shape ``(..., 2, 2)``, order east, up): ``N^-1`` from the LOS noise plus
    ``sn**2 (N^-1 A^T W n)(...)^T`` from the GNSS north error, which enters every geometry together — exact
    linear propagation, treating geometries as independent.

    Conditioning: with asc/desc the system is well posed (``condition`` ≈ 2); two look directions with similar
    east components (e.g. two ascending tracks) make it nearly singular and east/up wild. Pixels whose
    condition exceeds ``max_condition`` (default 100, i.e. ~10× noise amplification) are not solved for east.

    Fall-back: pixels with one valid geometry, or ill-conditioned, get the vertical-only estimate (all valid
    geometries, ``ve`` and ``vn`` removed, ``se``/``sn`` propagated) *only if* ``ve`` is given; otherwise up and
    east are NaN there and ``n_geometries`` says why.

    East prior (``east_prior=True``, needs ``ve`` and ``se``): the GNSS east velocity enters as one more
    observation of east with sigma ``se``. Two geometries then no longer fit exactly: a frame whose LOS error is
    large (its ``std`` says so) is outweighed by the other geometry and the GNSS field instead of going straight
    into up and east, and east departs from the GNSS field only where both geometries agree that it does (e.g.
    inward motion around a subsidence bowl, when ``se`` allows it). Pixels with two or more geometries are then
    solved whatever their look-direction condition (method 2); one geometry keeps the vertical-only estimate.

    Assumes: all geometries are in the reference frame of the GNSS field, LOS errors independent between
    geometries; a horizontal-only GNSS input (no ``vu``) is what makes this possible — that choice is upstream.

    ``warn=False`` leaves the warning about ill-conditioned pixels to the caller (e.g. one that decomposes a
    grid block by block and reports the total).
    """
    xp = backend.namespace(los_stack, std_stack, e_stack, n_stack, u_stack, vn, sn, ve, se)
    f64 = xp.float64
    from .kernels.cpu import fused_for

    fused = fused_for(xp)  # NumPy with numba: one pass over the stacks as given (float32 read as float64)
    L, S, E, Nn, U = (a if fused and a.dtype in (np.float32, np.float64) else xp.astype(a, f64)
                      for a in map(xp.asarray, (los_stack, std_stack, e_stack, n_stack, u_stack)))
    if L.ndim < 1 or L.shape[0] < 1:
        raise ArrayArgumentError("los_stack must have the look geometries on its first axis.", field="los_stack",
                                 fix="stack the per-geometry rasters with xp.stack([...], axis=0)")
    shape = L.shape
    for name, a in (("std_stack", S), ("e_stack", E), ("n_stack", Nn), ("u_stack", U)):
        if a.shape != shape:
            raise ArrayArgumentError(f"{name} has shape {a.shape}; los_stack has {shape}.", field=name,
                                     fix="give every stack the same (geometry, ...) shape")
    pix = shape[1:]

    def per_pixel(a, name):
        a = _as_f64(xp, a, L[0, ...])
        try:
            return xp.broadcast_to(a, pix)
        except (ValueError, TypeError) as exc:
            raise ArrayArgumentError(f"{name} has shape {tuple(a.shape)}; the pixels are {pix}.", field=name,
                                     fix="give one value per pixel (or a scalar)") from exc

    VN = per_pixel(vn, "vn")
    if east_prior and (ve is None or se is None):
        raise ArrayArgumentError("east_prior=True needs the GNSS east velocity and its sigma.", field="ve/se",
                                 fix="pass ve= and se= (mm/yr) or east_prior=False")
    if fused:
        return _up_east_fused(L, S, E, Nn, U, VN, *(None if a is None else per_pixel(a, name)
                                                    for a, name in ((ve, "ve"), (se, "se"), (sn, "sn"))),
                              east_prior=east_prior, max_condition=max_condition, warn=warn)
    zero, one = xp.zeros(shape, dtype=f64), xp.ones(shape, dtype=f64)

    ok = xp.isfinite(L) & xp.isfinite(E) & xp.isfinite(Nn) & xp.isfinite(U)
    _up_east_errors(bool(xp.any(ok & ~(xp.isfinite(S) & (S > 0)))), bool(xp.any(ok & ~(U > 0.05))))
    W = xp.where(ok, 1.0 / xp.where(ok, S * S, one), zero)
    E0, N0, U0 = (xp.where(ok, a, zero) for a in (E, Nn, U))
    Y = xp.where(ok, L - Nn * VN, zero)
    k = xp.sum(xp.astype(ok, xp.int16), axis=0, dtype=xp.int16)

    # weighted normal matrix and right-hand side, order (east, up)
    a11, a12, a22 = xp.sum(W * E0 * E0, axis=0), xp.sum(W * E0 * U0, axis=0), xp.sum(W * U0 * U0, axis=0)
    b1, b2 = xp.sum(W * E0 * Y, axis=0), xp.sum(W * U0 * Y, axis=0)
    if east_prior:
        VEp, SEp = per_pixel(ve, "ve"), per_pixel(se, "se")
        okp = xp.isfinite(VEp) & xp.isfinite(SEp) & (SEp > 0)
        wp = xp.where(okp, 1.0 / xp.where(okp, SEp * SEp, xp.ones_like(SEp)), xp.zeros_like(SEp))
        a11 = a11 + wp
        b1 = b1 + wp * xp.where(okp, VEp, xp.zeros_like(VEp))
    det = a11 * a22 - a12 * a12
    # geometry-only (unweighted) conditioning: noise levels should not decide whether east is resolvable
    okf = xp.astype(ok, f64)
    g11, g12, g22 = xp.sum(okf * E0 * E0, axis=0), xp.sum(okf * E0 * U0, axis=0), xp.sum(okf * U0 * U0, axis=0)
    tr = g11 + g22
    disc = xp.sqrt(xp.clip((g11 - g22) ** 2 + 4 * g12 * g12, 0.0, None))
    lmax, lmin = (tr + disc) / 2, (tr - disc) / 2
    two = k >= 2
    cond = xp.where(two, xp.where(lmin > 1e-12 * lmax, lmax / xp.where(lmin > 0, lmin, xp.ones_like(lmin)),
                                  xp.full(pix, xp.inf, dtype=f64)), xp.full(pix, xp.nan, dtype=f64))
    solve = two & ((cond <= max_condition) | east_prior) & (det > 0)
    ill = two & ~solve
    dets = xp.where(solve, det, xp.ones_like(det))
    i11, i12, i22 = a22 / dets, -a12 / dets, a11 / dets
    east = i11 * b1 + i12 * b2
    up = i12 * b1 + i22 * b2
    c11, c12, c22 = i11, i12, i22
    if sn is not None:
        SN = per_pixel(sn, "sn")
        # sensitivity of (east, up) to vn: -(N^-1 A^T W n)
        h1, h2 = xp.sum(W * E0 * N0, axis=0), xp.sum(W * U0 * N0, axis=0)
        g_e, g_u = i11 * h1 + i12 * h2, i12 * h1 + i22 * h2
        s2 = SN * SN
        c11, c12, c22 = c11 + s2 * g_e * g_e, c12 + s2 * g_e * g_u, c22 + s2 * g_u * g_u

    nan = xp.full(pix, xp.nan, dtype=f64)
    east = xp.where(solve, east, nan)
    up = xp.where(solve, up, nan)
    east_var, up_var, cov_eu = xp.where(solve, c11, nan), xp.where(solve, c22, nan), xp.where(solve, c12, nan)
    method = xp.where(solve, xp.full(pix, 2, dtype=xp.int8), xp.zeros(pix, dtype=xp.int8))

    if ve is not None:
        # vertical only, all valid geometries: y_i - e_i ve = u_i vu
        VE = per_pixel(ve, "ve")
        s_uu = a22
        has = (k >= 1) & ~solve & (s_uu > 0)
        s_uus = xp.where(has, s_uu, xp.ones_like(s_uu))
        vu1 = (b2 - xp.sum(W * U0 * E0, axis=0) * VE) / s_uus
        var1 = 1.0 / s_uus
        if se is not None:
            SE = per_pixel(se, "se")
            var1 = var1 + (SE * xp.sum(W * U0 * E0, axis=0) / s_uus) ** 2
        if sn is not None:
            var1 = var1 + (SN * xp.sum(W * U0 * N0, axis=0) / s_uus) ** 2
        up = xp.where(has, vu1, up)
        up_var = xp.where(has, var1, up_var)
        method = xp.where(has, xp.full(pix, 1, dtype=xp.int8), method)

    f32 = xp.float32
    cov = xp.stack([xp.stack([east_var, cov_eu], axis=-1), xp.stack([cov_eu, up_var], axis=-1)], axis=-2)
    n_ill = int(xp.count_nonzero(ill))
    n_vo = int(xp.count_nonzero(method == 1))
    if n_ill and warn:
        log.warning("up/east: %d pixel(s) with two or more geometries are ill-conditioned (condition > %g); "
                    "east left undetermined there", n_ill, max_condition)
    return UpEastResult(up=xp.astype(up, f32), east=xp.astype(east, f32), up_std=xp.astype(xp.sqrt(up_var), f32),
                        east_std=xp.astype(xp.sqrt(east_var), f32), up_east_cov=cov, n_geometries=k,
                        method=method, condition=cond, n_ill_conditioned=n_ill, n_vertical_only=n_vo)


# ==============================================================================================================
# Overlaps for the network adjustment
# ==============================================================================================================
_WGS84_A = 6378137.0
_WGS84_F = 1 / 298.257223563
_WGS84_E = math.sqrt(_WGS84_F * (2 - _WGS84_F))
_WGS84_B2 = (_WGS84_A * (1 - _WGS84_F)) ** 2


def _q(phi):
    """Authalic function: the area between the equator and latitude ``phi`` (rad) per radian of longitude is
    ``b**2 / 2 * q(phi)``."""
    e, s = _WGS84_E, np.sin(phi)
    return s / (1 - e * e * s * s) + np.log((1 + e * s) / (1 - e * s)) / (2 * e)


def cell_area_km2(grid: TargetGrid, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> np.ndarray:
    """True (ellipsoidal, WGS84) area in km² of grid cells ``(rows, cols)`` (all cells when omitted).

    Geographic grids: the exact ellipsoidal area between the cell's parallels and meridians. Projected grids:
    the cell's map area divided by the projection's areal scale factor at the cell centre (pyproj).
    """
    if rows is None:
        rr, cc = np.meshgrid(np.arange(grid.height), np.arange(grid.width), indexing="ij")
        return cell_area_km2(grid, rr.ravel(), cc.ravel()).reshape(grid.shape)
    rows, cols = np.asarray(rows), np.asarray(cols)
    t = grid.transform
    if grid.crs.is_geographic:
        # exact area of a quadrangle bounded by two parallels and two meridians on the WGS84 ellipsoid
        lat_top = np.radians(t.f + t.e * rows)
        lat_bot = np.radians(t.f + t.e * (rows + 1))
        return np.abs(_WGS84_B2 / 2.0 * np.radians(abs(t.a)) * (_q(lat_top) - _q(lat_bot))) / 1e6
    from pyproj import Proj, Transformer

    y, x = grid.coords()
    tr = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
    lon, lat = tr.transform(x[cols], y[rows])
    scale = Proj(grid.crs).get_factors(lon, lat).areal_scale
    unit = grid.crs.linear_units_factor[1]
    return abs(t.a * t.e) * unit * unit / np.asarray(scale) / 1e6


def _mask_area_km2(grid: TargetGrid, mask: np.ndarray, row0: int, col0: int) -> float:
    """Area (km²) of the ``True`` cells of ``mask``, a window of ``grid`` starting at (``row0``, ``col0``): the
    sum of :func:`cell_area_km2` over those cells in row-major order. On a geographic grid a cell's area depends
    on its row only, so each row's area is computed once and repeated for the row's cells: the same numbers in
    the same order, hence the same sum, without two trigonometric series per cell."""
    if grid.crs.is_geographic:
        r = np.arange(row0, row0 + mask.shape[0])
        per_row = cell_area_km2(grid, r, np.zeros_like(r))
        return float(np.repeat(per_row, np.count_nonzero(mask, axis=1)).sum())
    rows, cols = np.nonzero(mask)
    return float(cell_area_km2(grid, rows + row0, cols + col0).sum())


@dataclass
class OverlapPair:
    """Frames ``i`` and ``j`` overlap on ``mask`` (bool): ``n_pixels`` pixels, ``area_km2`` km².

    ``mask`` covers the whole grid when ``window`` is None, else grid rows ``window[0]:window[1]`` and columns
    ``window[2]:window[3]`` (the intersection of the two frames' footprints; see :class:`FootprintRaster`).
    ``kind`` is ``"along_track"`` (same relative orbit, e.g. ``014A``), ``"across_track"``, or None when the
    frame ids are unknown.
    """

    i: int
    j: int
    mask: np.ndarray
    n_pixels: int
    area_km2: float
    kind: str | None
    window: tuple[int, int, int, int] | None = None


def _track(fr) -> str | None:
    fid = getattr(fr, "attrs", {}).get("frame_id")
    if not fid:
        return None
    return str(fid).split("_")[0]


def overlap_pairs(frames_on_grid: Sequence, grid: TargetGrid | None = None, *, min_pixels: int = 1) -> list[OverlapPair]:
    """All pairs of frames whose valid footprints on the common grid intersect.

    ``frames_on_grid`` are frames (Datasets, valid = finite ``los_velocity`` and ``mask``) or DataArrays or
    arrays already on one grid (NaN = no data), or :class:`FootprintRaster` (then each pair's ``mask`` covers
    only the intersection of the two footprints, ``OverlapPair.window``, and ``grid`` is required). ``grid``
    gives the cell areas; it is read from the first frame when omitted (then frames must be georeferenced).
    Pairs with fewer than ``min_pixels`` common pixels are left out.
    """
    frames = list(frames_on_grid)
    windowed = any(isinstance(fr, FootprintRaster) for fr in frames)
    if grid is None:
        if not frames:
            return []
        if windowed:
            raise ArrayArgumentError("overlap_pairs of FootprintRaster inputs needs the grid.", field="grid",
                                     fix="pass the TargetGrid the footprints were resampled to")
        crs, t, h, w = _georef(frames[0], "frames_on_grid[0]")
        grid = TargetGrid(crs, t, w, h)
    masks, wins = [], []
    for i, fr in enumerate(frames):
        if isinstance(fr, FootprintRaster):
            m, win = np.isfinite(fr.values), fr.window
            if m.shape != (win[1] - win[0], win[3] - win[2]):
                raise ArrayArgumentError(f"frames_on_grid[{i}] holds {m.shape} values for the window {win}.",
                                         field=f"frames_on_grid[{i}]", fix="build it with resample_footprint")
        else:
            m, win = _valid_mask_np(fr), (0, grid.height, 0, grid.width)
            if m.shape != grid.shape:
                raise ArrayArgumentError(f"frames_on_grid[{i}] has shape {m.shape}; the grid is {grid.shape}.",
                                         field=f"frames_on_grid[{i}]",
                                         fix="resample every frame with resample_to_grid")
        masks.append(m)
        wins.append(win)
    # bounding boxes (grid rows/cols) first: most pairs of a wide-area set do not touch
    boxes = []
    for m, win in zip(masks, wins):
        r = np.flatnonzero(m.any(axis=1)) if m.size else np.empty(0, int)
        c = np.flatnonzero(m.any(axis=0)) if m.size else np.empty(0, int)
        boxes.append(None if r.size == 0 else (win[0] + r[0], win[0] + r[-1] + 1, win[2] + c[0], win[2] + c[-1] + 1))

    def crop(k, box):
        (r0, r1, c0, c1), w = box, wins[k]
        return masks[k][r0 - w[0]:r1 - w[0], c0 - w[2]:c1 - w[2]]

    pairs = []
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            bi, bj = boxes[i], boxes[j]
            if bi is None or bj is None or bi[0] >= bj[1] or bj[0] >= bi[1] or bi[2] >= bj[3] or bj[2] >= bi[3]:
                continue
            box = (0, grid.height, 0, grid.width) if not windowed else \
                (max(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), min(bi[3], bj[3]))
            both = crop(i, box) & crop(j, box)
            npx = int(both.sum())
            if npx < max(1, min_pixels):
                if npx:  # a sliver (a pixel or two at a corner) would tie two frames by noise alone
                    log.info("frames %d and %d share only %d valid pixel(s) (< %d): not tied to each other",
                             i, j, npx, min_pixels)
                continue
            area = _mask_area_km2(grid, both, box[0], box[2])
            ti, tj = _track(frames[i]), _track(frames[j])
            kind = None if ti is None or tj is None else ("along_track" if ti == tj else "across_track")
            pairs.append(OverlapPair(i, j, both, npx, area, kind, box if windowed else None))
    return pairs


@dataclass
class OverlapSample:
    """Sampled overlap pixels: grid ``rows``/``cols``, grid-CRS ``x``/``y``, ``lon``/``lat`` (degrees), the
    difference ``diff = a - b`` (mm/yr) and, when stds were given, ``diff_std`` (mm/yr, independent errors);
    ``stride`` is the regular sampling step in pixels."""

    rows: np.ndarray
    cols: np.ndarray
    x: np.ndarray
    y: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    diff: np.ndarray
    diff_std: np.ndarray | None
    stride: int


def sample_overlap(a, b, mask, *, max_samples: int = 2000, rng: np.random.Generator | int | None = None,
                   grid: TargetGrid | None = None, a_std=None, b_std=None,
                   window: tuple[int, int, int, int] | None = None) -> OverlapSample:
    """Regularly strided samples of ``a - b`` over an overlap ``mask`` for the network least squares.

    The stride ``s = ceil(sqrt(n / max_samples))`` in rows and columns keeps the samples spread evenly over
    the overlap (so a ramp between frames is constrained everywhere); ``rng`` picks the stride's offset.
    If the strided set is still larger than ``max_samples`` (ragged overlaps), evenly spaced samples of it
    are kept. Host side (NumPy).

    ``window`` ``(r0, r1, c0, c1)``: ``a``, ``b``, ``mask`` (and the stds) cover only those grid rows/cols (e.g.
    ``OverlapPair.window``; ``grid`` is then required). The stride lattice stays anchored to the grid and
    ``rows``/``cols`` are grid indices, so the samples are the same as from whole-grid arrays.
    """
    if max_samples < 1:
        raise InputError(f"max_samples={max_samples!r} must be >= 1.", field="max_samples",
                         fix="give the largest number of samples per overlap, e.g. 2000")
    rng = np.random.default_rng(rng)
    if grid is None:
        crs, t, h, w = _georef(a if _is_xr(a) else b, "a")
        grid = TargetGrid(crs, t, w, h)
    av = np.asarray(backend.to_numpy(_da_of(a).data if _is_xr(a) else a))
    bv = np.asarray(backend.to_numpy(_da_of(b).data if _is_xr(b) else b))
    m = np.asarray(backend.to_numpy(mask), dtype=bool)
    r_off, c_off = 0, 0
    shape = grid.shape
    if window is not None:
        r0, r1, c0, c1 = (int(v) for v in window)
        if not (0 <= r0 <= r1 <= grid.height and 0 <= c0 <= c1 <= grid.width):
            raise ArrayArgumentError(f"window {tuple(window)} is not inside the grid {grid.shape}.",
                                     field="window", fix="give (row0, row1, col0, col1) within the grid")
        r_off, c_off, shape = r0, c0, (r1 - r0, c1 - c0)
    if av.shape != shape or bv.shape != shape or m.shape != shape:
        raise ArrayArgumentError(f"a {av.shape}, b {bv.shape} and mask {m.shape} must all be on the grid "
                                 f"{'window ' + str(tuple(window)) + ' ' if window is not None else ''}{shape}.",
                                 field="mask", fix="resample the frames to one grid first")
    m = m & np.isfinite(av) & np.isfinite(bv)
    n = int(m.sum())
    s = max(1, int(math.ceil(math.sqrt(n / max_samples)))) if n else 1
    ro, co = (int(rng.integers(s)), int(rng.integers(s))) if s > 1 else (0, 0)
    ro, co = (ro - r_off) % s, (co - c_off) % s  # the grid's lattice, in the window's indices
    sub = np.zeros_like(m)
    sub[ro::s, co::s] = m[ro::s, co::s]
    rows, cols = np.nonzero(sub)
    if rows.size == 0 and n:  # a thin overlap missed by the stride: fall back to all its pixels
        rows, cols = np.nonzero(m)
    if rows.size > max_samples:
        keep = np.unique(np.linspace(0, rows.size - 1, max_samples).round().astype(np.int64))
        rows, cols = rows[keep], cols[keep]
    diff = av[rows, cols].astype(np.float64) - bv[rows, cols].astype(np.float64)
    dstd = None
    if a_std is not None and b_std is not None:
        sa = np.asarray(backend.to_numpy(_da_of(a_std).data if _is_xr(a_std) else a_std))
        sb = np.asarray(backend.to_numpy(_da_of(b_std).data if _is_xr(b_std) else b_std))
        dstd = np.hypot(sa[rows, cols].astype(np.float64), sb[rows, cols].astype(np.float64))
    rows, cols = rows + r_off, cols + c_off
    y, x = grid.coords()
    xs, ys = x[cols], y[rows]
    if grid.crs.is_geographic:
        lon, lat = xs, ys
    else:
        from pyproj import Transformer

        lon, lat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    return OverlapSample(rows, cols, xs, ys, np.asarray(lon), np.asarray(lat), diff, dstd, s)
