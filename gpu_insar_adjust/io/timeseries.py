"""Open displacement time series (LiCSBAS ``cum.h5``, MintPy ``timeseries.h5``) as lazy, chunked cubes.

Both are HDF5 files holding a (time, y, x) cube:

* LiCSBAS ``cum.h5`` / ``cum_filt.h5``: dataset ``cum`` in **mm**, ``imdates`` (int YYYYMMDD), and the scalars
  ``corner_lat``, ``corner_lon`` (centre of the first pixel: LiCSBAS grids are grid-registered) and
  ``post_lat``, ``post_lon`` (pixel spacing, degrees), on EPSG:4326;
* MintPy ``timeseries*.h5``: dataset ``timeseries`` in **m** (converted to mm), ``date`` (bytes YYYYMMDD),
  georeferenced by the ``X_FIRST``/``Y_FIRST`` (outer corner of the first pixel), ``X_STEP``/``Y_STEP`` and
  ``EPSG``/``UTM_ZONE`` attributes.

The cube is never read whole: it is wrapped in a Dask array whose every chunk opens the HDF5 file, reads its
hyperslab and closes the file again. That keeps reads safe from several threads or worker processes (no shared
h5py handle) and lets a 20 GB cube be processed chunk by chunk. The default chunks keep all epochs of a
spatial block together (what per-pixel fitting needs), sized to about :data:`DEFAULT_CHUNK_BYTES`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, FrameError, GiaError, TimeSeriesError

__all__ = ["open_cube", "DEFAULT_CHUNK_BYTES", "auto_chunks", "parse_dates"]

log = logging.getLogger(__name__)

#: Target size of one chunk of the lazy cube (bytes of float32).
DEFAULT_CHUNK_BYTES = 64 * 2**20


class _H5Slab:
    """Array-like view of one HDF5 dataset for :func:`dask.array.from_array`.

    Each ``__getitem__`` opens the file, reads the requested hyperslab, scales it to mm and closes the file, so
    no h5py handle is shared between threads or pickled to Dask workers.
    """

    def __init__(self, path: Path, dataset: str, shape: tuple[int, ...], scale: float):
        self.path = str(path)
        self.dataset = dataset
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)
        self.scale = np.float32(scale)

    def __getitem__(self, key):
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                block = f[self.dataset][key]
        except (OSError, KeyError, RuntimeError) as exc:
            # The file changed, was truncated after opening, or a chunk is damaged: say which and where.
            raise TimeSeriesError(f"Cannot read a block of the cube: {exc}", file=self.path, field=self.dataset,
                                  fix="check that the file is complete and was not modified while in use "
                                      "(re-export or re-download it)") from exc
        block = np.asarray(block, dtype=np.float32)
        if self.scale != 1:
            block = block * self.scale
        return block


def auto_chunks(shape: tuple[int, int, int], *, target_bytes: int = DEFAULT_CHUNK_BYTES,
                h5_chunks: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    """Chunk shape (time, y, x) keeping all epochs together with about ``target_bytes`` of float32 per chunk.

    Spatial chunk sides are rounded to multiples of the HDF5 storage chunks when the file is chunked, so a Dask
    chunk never reads a storage chunk twice.
    """
    nt, ny, nx = shape
    pixels = max(1, target_bytes // (4 * max(nt, 1)))
    side = max(1, int(math.isqrt(pixels)))
    cy, cx = min(ny, side), min(nx, side)
    if h5_chunks is not None and len(h5_chunks) == 3:
        hy, hx = h5_chunks[1], h5_chunks[2]
        cy = min(ny, max(hy, (cy // hy) * hy))
        cx = min(nx, max(hx, (cx // hx) * hx))
    return (nt, cy, cx)


def parse_dates(values, *, file=None, field: str = "date") -> np.ndarray:
    """YYYYMMDD values (int, str or bytes) → datetime64[ns]; raises :class:`TimeSeriesError` if unparseable,
    duplicated or not strictly increasing."""
    import pandas as pd

    strings = [v.decode() if isinstance(v, bytes) else str(int(v)) if isinstance(v, (int, np.integer)) else str(v)
               for v in np.asarray(values).ravel()]
    strings = [s.strip()[:8] for s in strings]
    try:
        times = pd.to_datetime(strings, format="%Y%m%d").values.astype("datetime64[ns]")
    except (ValueError, TypeError) as exc:
        raise TimeSeriesError(f"Epoch dates are not YYYYMMDD: {exc}", file=file, field=field,
                              fix="store acquisition dates as YYYYMMDD (e.g. 20170104)") from exc
    if times.size == 0:
        raise TimeSeriesError("The time series has no epoch.", file=file, field=field,
                              fix="give a cube with at least one acquisition date")
    steps = np.diff(times)
    bad = np.nonzero(steps <= np.timedelta64(0, "ns"))[0]
    if bad.size:
        pairs = ", ".join(f"{strings[i]} → {strings[i + 1]}" for i in bad[:5])
        kind = "duplicated" if np.any(steps[bad] == np.timedelta64(0, "ns")) else "out of order"
        raise TimeSeriesError(f"Epochs are {kind} ({bad.size} place(s): {pairs}).", file=file, field=field,
                              fix="sort the epochs in time and remove duplicate acquisitions before exporting "
                                  "the cube")
    return times


def _scalar(h5, name: str, file) -> float:
    if name not in h5:
        raise TimeSeriesError(f"Dataset {name!r} not found: the LiCSBAS cube is not georeferenced.", file=file,
                              field=name, fix="give a geocoded LiCSBAS cum.h5 (with corner_lat/lon, post_lat/lon)")
    values = np.asarray(h5[name][()]).ravel()
    value = float(values[0]) if values.size else math.nan
    if not math.isfinite(value):
        raise TimeSeriesError(f"Dataset {name!r} holds no finite number.", file=file, field=name,
                              fix="give a geocoded LiCSBAS cum.h5 with valid corner_lat/lon and post_lat/lon")
    return value


def _read_dates(h5, name: str, n_epochs: int, file) -> np.ndarray:
    """Dates of the cube, after checking their count against the cube's first axis (before reading them, so a
    header declaring billions of dates is never read)."""
    from .frames import check_fits_in_memory

    ds = h5[name]
    if ds.ndim != 1 or ds.shape[0] != n_epochs:
        raise TimeSeriesError(f"Dataset {name!r} has shape {ds.shape}: it does not match the {n_epochs} epochs "
                              f"(layers) of the cube.",
                              file=file, field=name,
                              fix="re-export the time series; there must be one date per layer of the cube")
    try:
        # ~200 bytes a date once parsed (Python strings and timestamps), not the few bytes stored.
        check_fits_in_memory(ds.shape, 200, file=file, field=name, what=f"date list {name!r}", copies_float32=0)
    except FrameError as exc:
        raise TimeSeriesError(exc.message, file=file, field=name, fix=exc.fix) from exc
    return parse_dates(ds[()], file=file, field=name)


def _normalise_chunks(chunks, shape, h5_chunks):
    if chunks is None or chunks == "auto":
        return auto_chunks(shape, h5_chunks=h5_chunks)
    if isinstance(chunks, dict):
        auto = auto_chunks(shape, h5_chunks=h5_chunks)
        out = []
        for i, dim in enumerate(("time", "y", "x")):
            c = chunks.get(dim, auto[i])
            out.append(shape[i] if c in (-1, None) else int(c))
        return tuple(out)
    return chunks


def _read_layout(h5, p: Path, attrs_out: dict[str, Any]):
    """(source, dataset, scale to mm, dates, shape, HDF5 chunks, transform, CRS) of an open cube file."""
    import pyproj
    from affine import Affine

    from .frames import mintpy_attrs, mintpy_grid

    if "cum" in h5 and "imdates" in h5:
        source, dataset, scale = "licsbas", "cum", 1.0
        shape = h5["cum"].shape
        h5_chunks = h5["cum"].chunks
        if len(shape) != 3:
            raise TimeSeriesError(f"Dataset 'cum' must be 3-D (time, y, x), has shape {shape}.", file=p,
                                  field="cum", fix="give a LiCSBAS cum.h5 or cum_filt.h5")
        dates = _read_dates(h5, "imdates", shape[0], p)
        lat0, lon0 = _scalar(h5, "corner_lat", p), _scalar(h5, "corner_lon", p)
        dlat, dlon = _scalar(h5, "post_lat", p), _scalar(h5, "post_lon", p)
        if dlat == 0.0 or dlon == 0.0:
            raise TimeSeriesError(f"Pixel spacing post_lat={dlat}, post_lon={dlon} is zero.", file=p,
                                  field="post_lat" if dlat == 0.0 else "post_lon",
                                  fix="give a geocoded LiCSBAS cum.h5 with its pixel spacing in degrees")
        # corner_lat/lon are the centre of the first pixel (grid registration): shift by half a pixel.
        transform = Affine(dlon, 0.0, lon0 - dlon / 2.0, 0.0, dlat, lat0 - dlat / 2.0)
        crs = pyproj.CRS.from_epsg(4326)
        attrs_out["reference_date"] = str(np.datetime_as_string(dates[0], unit="D"))
    elif "timeseries" in h5 and "date" in h5:
        source, dataset = "mintpy", "timeseries"
        attrs = mintpy_attrs(h5)
        unit = attrs.get("UNIT", "m").strip().lower()
        scales = {"m": 1000.0, "cm": 10.0, "mm": 1.0}
        if unit not in scales:
            raise TimeSeriesError(f"Unknown displacement unit {attrs.get('UNIT')!r}.", file=p, field="UNIT",
                                  fix="set the UNIT attribute to m (MintPy's default)")
        scale = scales[unit]
        shape = h5["timeseries"].shape
        h5_chunks = h5["timeseries"].chunks
        if len(shape) != 3:
            raise TimeSeriesError(f"Dataset 'timeseries' must be 3-D, has shape {shape}.", file=p,
                                  field="timeseries", fix="give a MintPy timeseries.h5")
        dates = _read_dates(h5, "date", shape[0], p)
        try:
            transform, crs = mintpy_grid(attrs, shape, file=p)
        except FrameError as exc:
            raise TimeSeriesError(exc.message, file=p, field=exc.field, fix=exc.fix) from exc
        if "REF_DATE" in attrs:
            ref = parse_dates([attrs["REF_DATE"]], file=p, field="REF_DATE")[0]
            if not np.any(dates.astype("datetime64[D]") == ref.astype("datetime64[D]")):
                raise TimeSeriesError(f"REF_DATE {attrs['REF_DATE']!r} is not one of the cube's dates.", file=p,
                                      field="REF_DATE",
                                      fix="set REF_DATE to the epoch the time series is referenced to (MintPy's "
                                          "reference_date.py), or remove it")
            attrs_out["reference_date"] = str(np.datetime_as_string(ref, unit="D"))
    else:
        raise TimeSeriesError(
            f"Unrecognised time-series layout (datasets: {', '.join(sorted(h5.keys()))}).", file=p,
            field="cum/timeseries",
            fix="give a LiCSBAS cum.h5 (cum, imdates) or a MintPy timeseries.h5 (timeseries, date)")
    kind = h5[dataset].dtype.kind
    if kind not in "iuf":  # strings, records or complex values are no displacement in mm
        raise TimeSeriesError(f"Dataset {dataset!r} holds {h5[dataset].dtype} values, not real numbers.", file=p,
                              field=dataset, fix="give the displacement cube as written by LiCSBAS or MintPy "
                                                 "(float32 mm or m)")
    return source, dataset, scale, dates, tuple(int(s) for s in shape), h5_chunks, transform, crs


def open_cube(path: str | os.PathLike, *, chunks: Any = None) -> "xarray.DataArray":  # noqa: F821
    """Open a LiCSBAS ``cum.h5`` or MintPy ``timeseries.h5`` as a lazy displacement cube.

    Parameters
    ----------
    path
        The HDF5 file (format recognised from its datasets: ``cum`` + ``imdates`` or ``timeseries`` + ``date``).
    chunks
        Dask chunks: ``None``/``"auto"`` (all epochs, ~64 MiB spatial blocks), a dict by dimension name
        (``{"time": 1}``; ``-1`` = whole axis) or anything :func:`dask.array.from_array` accepts.

    Returns
    -------
    xarray.DataArray
        Name ``displacement``, dims (time, y, x), mm, float32, Dask-backed; ``time`` datetime64[ns] strictly
        increasing; ``y``/``x`` pixel centres; CRS written with rioxarray; attributes ``units``, ``source``
        (``licsbas`` | ``mintpy``), ``path``, ``reference_date`` where known.

    Raises
    ------
    TimeSeriesError
        Unknown layout, inconsistent shapes, unparseable, duplicated or out-of-order dates, no georeferencing,
        a damaged or truncated file.
    BackendUnavailableError
        Dask cannot be imported.
    """
    p = Path(path)
    try:
        import dask.array as da
        from dask.base import tokenize
    except ImportError as exc:
        raise BackendUnavailableError(f"Dask is needed to open a time-series cube lazily but cannot be imported "
                                      f"({exc}).", file=p, field="dask",
                                      fix="pip install 'gpu_insar_adjust[dask]'") from exc
    import h5py
    import rioxarray  # noqa: F401
    import xarray as xr

    from .frames import coord_attrs, pixel_centres

    if not p.is_file():
        raise TimeSeriesError("Time-series file not found.", file=p, field="path",
                              fix="give the path of a LiCSBAS cum.h5 or MintPy timeseries.h5")
    try:
        h5 = h5py.File(p, "r")
    except (OSError, ValueError) as exc:
        raise TimeSeriesError(f"Cannot open the HDF5 file: {exc}", file=p, field="path",
                              fix="check that the file is a complete HDF5 cube") from exc
    attrs_out: dict[str, Any] = {"units": "mm", "long_name": "LOS displacement, positive toward the satellite",
                                 "path": str(p)}
    with h5:
        try:
            source, dataset, scale, dates, shape, h5_chunks, transform, crs = _read_layout(h5, p, attrs_out)
        except GiaError:
            raise
        except (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as exc:
            # h5py reports a damaged or truncated file (and odd dtypes) with a variety of built-in errors.
            raise TimeSeriesError(f"Cannot read the cube's metadata ({type(exc).__name__}: {exc}).", file=p,
                                  field="path",
                                  fix="check that the file is a complete, undamaged cum.h5 / timeseries.h5 "
                                      "(re-export or re-download it)") from exc
    if any(int(s) == 0 for s in shape):
        raise TimeSeriesError(f"The cube {dataset!r} is empty (shape {shape}).", file=p, field=dataset,
                              fix="give a time series with at least one epoch and one pixel")

    chunk_shape = _normalise_chunks(chunks, shape, h5_chunks)
    source_array = _H5Slab(p, dataset, shape, scale)
    stamp = p.stat().st_mtime_ns
    data = da.from_array(source_array, chunks=chunk_shape, asarray=False, fancy=False, lock=False,
                         meta=np.empty((0, 0, 0), dtype=np.float32),
                         name=f"open_cube-{tokenize(str(p.resolve()), stamp, dataset, scale)}")
    y, x = pixel_centres(transform, shape)
    yattrs, xattrs = coord_attrs(crs)
    attrs_out["source"] = source
    cube = xr.DataArray(data, dims=("time", "y", "x"), name="displacement",
                        coords={"time": ("time", dates, {"long_name": "acquisition time"}),
                                "y": ("y", y, yattrs), "x": ("x", x, xattrs)},
                        attrs=attrs_out)
    cube = cube.rio.write_crs(crs).rio.write_transform(transform)
    log.info("opened %s cube %s: %d epochs of %d x %d pixels, chunks %s", source, p.name, shape[0], shape[1],
             shape[2], chunk_shape)
    return cube
