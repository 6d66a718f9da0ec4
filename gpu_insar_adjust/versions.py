"""Versions of the package, its dependencies, CUDA and the GPU (``gia show-versions``)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import platform
import sys
from pathlib import Path

_PACKAGES = ("numpy", "scipy", "pandas", "xarray", "rioxarray", "rasterio", "pyproj", "scikit-learn", "h5py",
             "netCDF4", "matplotlib", "pydantic", "typer", "rich", "array-api-compat", "array-api-strict", "dask",
             "distributed", "zarr", "numba", "cupy", "cupy-cuda12x", "cupy-cuda13x", "cuml")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the package's Python and CUDA sources.

    ``__version__`` changes only with releases; a source checkout edited between two runs keeps it. Caches that
    must not outlive the code that wrote them (the per-frame adjustments a resumed run reuses) key on this.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cu", ".cuh") and p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def versions() -> dict[str, str | None]:
    """Mapping of component -> version string (None when not installed)."""
    from ._version import __version__

    out: dict[str, str | None] = {"gpu_insar_adjust": __version__, "gpu_insar_adjust_code": code_fingerprint(),
                                  "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        import rasterio

        out["GDAL"] = rasterio.__gdal_version__
    except Exception:
        out["GDAL"] = None
    try:
        import pyproj

        out["PROJ"] = pyproj.proj_version_str
    except Exception:
        out["PROJ"] = None
    out.update(_gpu_versions())
    return out


def _gpu_versions() -> dict[str, str | None]:
    from .backend import gpu_status

    ok, reason = gpu_status()
    info: dict[str, str | None] = {"gpu": reason}
    if not ok:
        return info
    import cupy

    rt = cupy.cuda.runtime
    info["cuda_runtime"] = str(rt.runtimeGetVersion())
    info["cuda_driver"] = str(rt.driverGetVersion())
    props = rt.getDeviceProperties(0)
    name = props["name"]
    info["device"] = name.decode() if isinstance(name, bytes) else str(name)
    info["device_memory_gib"] = f"{props['totalGlobalMem'] / 2**30:.1f}"
    return info


def show_versions() -> str:
    """Human-readable version report."""
    v = versions()
    width = max(len(k) for k in v)
    return "\n".join(f"{k:<{width}} : {'-' if val is None else val}" for k, val in v.items())
