"""Exceptions raised for problems a user can fix.

Every error a user can cause is a :class:`GiaError`. Its message names *what* is wrong, *where* (the file and
the field or argument) and *how to fix it*, so that a command-line user never needs a traceback::

    FrameError: LOS velocity raster not found.
      file:  /data/frames/142A_05060_131313
      field: vel.geo.tif
      fix:   put <ID>.vel.geo.tif or vel.geo.tif (LiCSBAS) or velocity.h5 (MintPy) in the frame folder

The subclasses also derive from the closest built-in exception (``ValueError``, ``RuntimeError``, ...) so
that code written against the standard library keeps working.
"""

from __future__ import annotations

import os

__all__ = [
    "GiaError",
    "InputError",
    "ArrayArgumentError",
    "BackendUnavailableError",
    "UnsupportedBackendError",
    "ConfigError",
    "FrameError",
    "GnssError",
    "GeometryError",
    "TimeSeriesError",
    "PlateModelError",
    "AdjustmentError",
    "NumericalError",
    "OutputError",
    "NotBuiltError",
]


class GiaError(Exception):
    """Base class of every error a user of ``gpu_insar_adjust`` can cause and fix.

    Parameters
    ----------
    message
        What is wrong, in one sentence.
    file
        The file (or folder) concerned, if any.
    field
        The field, dataset, column, argument or option concerned, if any.
    fix
        What the user should do about it.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, field: str | None = None,
                 fix: str | None = None):
        self.message = message
        self.file = None if file is None else os.fspath(file)
        self.field = field
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [self.message]
        if self.file is not None:
            lines.append(f"  file:  {self.file}")
        if self.field is not None:
            lines.append(f"  field: {self.field}")
        if self.fix is not None:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)

    def __reduce__(self):  # picklable across Dask workers despite keyword-only arguments
        return (_rebuild, (type(self), self.message, self.file, self.field, self.fix))


def _rebuild(cls, message, file, field, fix):
    return cls(message, file=file, field=field, fix=fix)


class InputError(GiaError, ValueError):
    """Input data (a file, a table, an array) is unusable as given."""


class ArrayArgumentError(GiaError, ValueError):
    """An array argument has the wrong shape, dtype, or lives on a different backend than the others."""


class BackendUnavailableError(GiaError, RuntimeError):
    """The requested array backend (e.g. the GPU) is not available on this machine."""


class DeviceMemoryError(GiaError, MemoryError):
    """A block of work does not fit in the GPU's free memory (lower the chunk or tile size)."""


class UnsupportedBackendError(GiaError, TypeError):
    """An operation has no implementation for the array backend it was given."""


class ConfigError(GiaError, ValueError):
    """A configuration file or option is invalid."""


class FrameError(InputError):
    """An InSAR frame (folder, raster, HDF5 file) is missing, malformed or inconsistent."""


class GnssError(InputError):
    """A GNSS velocity table or position time series is missing, malformed or inconsistent."""


class GeometryError(InputError):
    """Line-of-sight geometry (unit vectors, incidence, heading, coordinates) is out of range."""


class TimeSeriesError(InputError):
    """A displacement cube or its dates are malformed or inconsistent."""


class PlateModelError(InputError):
    """A plate, reference frame or plate motion model is unknown."""


class AdjustmentError(GiaError, RuntimeError):
    """The adjustment cannot be determined from the data given (too few stations, no overlaps, ...)."""


class NumericalError(GiaError, ArithmeticError):
    """A system is too ill-conditioned to solve reliably."""


class OutputError(GiaError, OSError):
    """An output cannot be written where asked (exists, outside the output folder, not writable)."""


class NotBuiltError(GiaError, NotImplementedError):
    """A command or feature exists in the interface but is not implemented yet."""
