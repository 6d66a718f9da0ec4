"""Readers and writers for what InSAR users have: LiCSAR/LiCSBAS GeoTIFF frames, MintPy HDF5, LiCSBAS/MintPy
time-series cubes, GNSS velocity tables and position series; atomic COG / NetCDF / Zarr / JSON writers.

Sub-modules are imported on first use, so ``import gpu_insar_adjust.io`` stays cheap::

    from gpu_insar_adjust.io import open_frame, open_cube, read_gnss, write_cog
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "open_frame": "frames", "list_frames": "frames", "is_frame_dir": "frames",
    "open_cube": "timeseries",
    "read_gnss": "gnss", "read_position_series": "gnss", "fit_station_velocity": "gnss",
    "STATION_COLUMNS": "gnss",
    "write_cog": "write", "write_netcdf": "write", "write_zarr": "write", "atomic_write_text": "write",
    "write_json": "write", "atomic_output": "write",
}

__all__ = sorted(_EXPORTS) + ["frames", "gnss", "timeseries", "write"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in ("frames", "gnss", "timeseries", "write"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
