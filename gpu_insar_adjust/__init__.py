"""gpu_insar_adjust — GNSS-consistent, wide-area InSAR velocity and time-series adjustment on CPU or GPU.

Importing the package is cheap: it never imports CuPy, cuML, Dask or matplotlib. Sub-modules are imported
on first attribute access (``gpu_insar_adjust.io``, ``gpu_insar_adjust.geodesy``, ...).
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import GiaError

__all__ = ["__version__", "GiaError", "backend", "errors", "config", "linalg", "io", "geodesy", "adjust",
           "analysis", "network", "mosaic", "timeseries", "synthetic", "pipeline", "parallel", "report"]

_LAZY = {"backend", "errors", "config", "linalg", "io", "geodesy", "adjust", "analysis", "network", "mosaic",
         "timeseries", "synthetic", "pipeline", "parallel", "report", "logs"}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
