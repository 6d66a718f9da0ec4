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

from ..errors import FrameError, TimeSeriesError

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

        with h5py.File(self.path, "r") as f:
            block = f[self.dataset][key]
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
    return float(np.asarray(h5[name][()]).ravel()[0])


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
        Unknown layout, inconsistent shapes, unparseable, duplicated or out-of-order dates, no georeferencing.
    """
    import dask.array as da
    import h5py
    import pyproj
    import rioxarray  # noqa: F401
    import xarray as xr
    from affine import Affine
    from dask.base import tokenize

    from .frames import coord_attrs, mintpy_attrs, mintpy_grid, pixel_centres

    p = Path(path)
    if not p.is_file():
        raise TimeSeriesError("Time-series file not found.", file=p, field="path",
                              fix="give the path of a LiCSBAS cum.h5 or MintPy timeseries.h5")
    try:
        h5 = h5py.File(p, "r")
    except OSError as exc:
        raise TimeSeriesError(f"Cannot open the HDF5 file: {exc}", file=p, field="path",
                              fix="check that the file is a complete HDF5 cube") from exc
    attrs_out: dict[str, Any] = {"units": "mm", "long_name": "LOS displacement, positive toward the satellite",
                                 "path": str(p)}
    with h5:
        if "cum" in h5 and "imdates" in h5:
            source, dataset, scale = "licsbas", "cum", 1.0
            dates = parse_dates(h5["imdates"][()], file=p, field="imdates")
            shape = h5["cum"].shape
            h5_chunks = h5["cum"].chunks
            lat0, lon0 = _scalar(h5, "corner_lat", p), _scalar(h5, "corner_lon", p)
            dlat, dlon = _scalar(h5, "post_lat", p), _scalar(h5, "post_lon", p)
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
            dates = parse_dates(h5["date"][()], file=p, field="date")
            shape = h5["timeseries"].shape
            h5_chunks = h5["timeseries"].chunks
            if len(shape) != 3:
                raise TimeSeriesError(f"Dataset 'timeseries' must be 3-D, has shape {shape}.", file=p,
                                      field="timeseries", fix="give a MintPy timeseries.h5")
            try:
                transform, crs = mintpy_grid(attrs, shape, file=p)
            except FrameError as exc:
                raise TimeSeriesError(exc.message, file=p, field=exc.field, fix=exc.fix) from exc
            if "REF_DATE" in attrs:
                attrs_out["reference_date"] = attrs["REF_DATE"]
        else:
            raise TimeSeriesError(
                f"Unrecognised time-series layout (datasets: {', '.join(sorted(h5.keys()))}).", file=p,
                field="cum/timeseries",
                fix="give a LiCSBAS cum.h5 (cum, imdates) or a MintPy timeseries.h5 (timeseries, date)")
    if len(shape) != 3 or shape[0] != dates.size:
        raise TimeSeriesError(f"Cube shape {shape} does not match the {dates.size} epochs.", file=p, field=dataset,
                              fix="re-export the time series; the first axis must have one layer per date")

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
