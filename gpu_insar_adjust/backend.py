"""Array backends: one numerical code path for NumPy (CPU) and CuPy (CUDA GPU).

Numerical code in this package is written once against the Python array API standard::

    xp = backend.namespace(velocity, weights)   # the namespace the arrays live in
    x = xp.linalg.solve(normal, rhs)

* :func:`namespace` returns the array-API namespace of its arguments (via ``array_api_compat``) and raises
  :class:`~gpu_insar_adjust.errors.ArrayArgumentError` when arrays from different backends are mixed. With no
  arguments it returns the namespace of the *selected* backend (see :func:`use_backend`).
* :func:`use_backend` selects ``"auto"`` (GPU when one is present, else NumPy), ``"numpy"`` or ``"cupy"``; as a
  context manager or a plain call. Asking for ``"cupy"`` on a machine without a usable GPU raises
  :class:`~gpu_insar_adjust.errors.BackendUnavailableError`; there is never a silent CPU fall-back.
* GPU detection runs once per process (CuPy importable *and* at least one CUDA device answering).
* Data stays where it arrived: :func:`asarray` moves data onto the selected backend, :func:`to_numpy` is the one
  place where device data is copied to the host.
* :func:`dispatch` is the small table for the few operations that need more than the standard (CUDA kernels,
  tree models, sparse solvers): implementations are registered per backend name.

Importing this module imports neither CuPy nor Dask.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np

from .errors import ArrayArgumentError, BackendUnavailableError, UnsupportedBackendError

BackendName = Literal["auto", "numpy", "cupy"]
BACKENDS: tuple[str, ...] = ("auto", "numpy", "cupy")

_GPU_EXTRA_HINT = (
    "install the GPU extra with `pip install 'gpu_insar_adjust[gpu]'` on a machine with an NVIDIA GPU and "
    "CUDA 12 driver, or choose the CPU backend with `--backend numpy` (config: backend = \"numpy\")"
)

_state = threading.local()


# --------------------------------------------------------------------------------------------------------------
# GPU detection (once)
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def gpu_status() -> tuple[bool, str]:
    """Return ``(available, reason)``; detection runs once per process.

    Available means CuPy imports *and* the CUDA runtime reports at least one device. ``reason`` says why not.
    """
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cudaErrorNoDevice, driver too old, ...
        return False, f"CuPy found no usable CUDA device ({type(exc).__name__}: {exc})"
    if n < 1:
        return False, "CuPy reports zero CUDA devices"
    return True, f"{n} CUDA device(s)"


def gpu_available() -> bool:
    """True when CuPy is importable and a CUDA device is present (cached)."""
    return gpu_status()[0]


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """CUDA devices this process sees (those ``CUDA_VISIBLE_DEVICES`` leaves it); 0 without a usable GPU."""
    if not gpu_status()[0]:
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


# --------------------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------------------
def _validate_name(name: str) -> str:
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"Unknown array backend {name!r}.", field="backend",
            fix=f"choose one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str = "auto") -> str:
    """Turn a user choice into a concrete backend name (``"numpy"`` or ``"cupy"``).

    ``"auto"`` gives ``"cupy"`` when a GPU is present, else ``"numpy"``. ``"cupy"`` without a GPU raises
    :class:`BackendUnavailableError`.
    """
    name = _validate_name(name)
    if name == "auto":
        return "cupy" if gpu_available() else "numpy"
    if name == "cupy":
        ok, reason = gpu_status()
        if not ok:
            raise BackendUnavailableError(
                f"The cupy (GPU) backend was requested but is not available: {reason}.",
                field="backend", fix=_GPU_EXTRA_HINT)
    return name


def set_backend(name: BackendName = "auto") -> str:
    """Select the backend for this thread; returns the concrete backend now in force."""
    concrete = resolve_backend(name)
    _state.name = concrete
    return concrete


def get_backend() -> str:
    """The concrete backend in force for this thread (``"numpy"`` unless chosen otherwise)."""
    name = getattr(_state, "name", None)
    if name is None:
        name = "numpy"
    return name


@contextlib.contextmanager
def use_backend(name: BackendName = "auto") -> Iterator[str]:
    """Context manager selecting an array backend; yields the concrete name.

    >>> with use_backend("numpy"):
    ...     xp = namespace()
    """
    previous = getattr(_state, "name", None)
    concrete = set_backend(name)
    try:
        yield concrete
    finally:
        _state.name = previous


# --------------------------------------------------------------------------------------------------------------
# Namespaces and data movement
# --------------------------------------------------------------------------------------------------------------
def _backend_namespace(name: str):
    if name == "numpy":
        import array_api_compat.numpy as xp_np

        return xp_np
    if name == "cupy":
        resolve_backend("cupy")
        import array_api_compat.cupy as xp_cp

        return xp_cp
    raise UnsupportedBackendError(f"No namespace for backend {name!r}.", field="backend",
                                  fix="use 'numpy' or 'cupy'")


def namespace(*arrays: Any):
    """Array-API namespace of ``arrays`` (or of the selected backend when none are given).

    Python scalars and ``None`` are ignored. Mixing arrays from different libraries (e.g. NumPy and CuPy) raises
    :class:`ArrayArgumentError` naming the offending types.
    """
    import array_api_compat

    arrs = [a for a in arrays if a is not None and not isinstance(a, (int, float, complex, bool))]
    if not arrs:
        return _backend_namespace(get_backend())
    try:
        return array_api_compat.array_namespace(*arrs)
    except TypeError as exc:
        kinds = sorted({f"{type(a).__module__}.{type(a).__name__}" for a in arrs})
        raise ArrayArgumentError(
            f"Arrays from different backends were mixed: {', '.join(kinds)}.", field="arrays",
            fix="move all inputs to one backend first, e.g. with gpu_insar_adjust.backend.asarray(x, xp=...) "
                "or backend.to_numpy(x)") from exc


def backend_name(xp) -> str:
    """Short name of an array-API namespace: ``"numpy"``, ``"cupy"``, ``"array_api_strict"``, ..."""
    name = getattr(xp, "__name__", str(xp))
    for known in ("cupy", "array_api_strict", "numpy", "dask", "torch", "jax"):
        if known in name:
            return known
    return name


def is_gpu_namespace(xp) -> bool:
    return backend_name(xp) == "cupy"


def asarray(x: Any, xp=None, dtype=None):
    """Put ``x`` onto namespace ``xp`` (default: the selected backend) without needless copies."""
    if xp is None:
        xp = _backend_namespace(get_backend())
    name = backend_name(xp)
    src = backend_name(namespace(x)) if _is_array(x) else None
    if src is not None and src != name:
        x = to_numpy(x)  # explicit host hop between two libraries
    if name == "cupy":
        import cupy

        if not isinstance(x, cupy.ndarray):  # a host → device copy: refuse one that cannot fit
            host = np.asarray(x)
            check_device_memory(host.size * (np.dtype(dtype).itemsize if dtype is not None else host.itemsize))
        try:
            return cupy.asarray(x, dtype=dtype)
        except cupy.cuda.memory.OutOfMemoryError as exc:
            raise _device_memory_error(int(getattr(x, "nbytes", 0)), None) from exc
    return xp.asarray(x, dtype=dtype)


def _device_free_bytes() -> int | None:
    """Free memory of the current GPU (bytes), counting what CuPy's pool holds but does not use; None if unknown."""
    try:
        import cupy

        free, _total = cupy.cuda.runtime.memGetInfo()
        pool = cupy.get_default_memory_pool()
        return int(free + pool.free_bytes())
    except Exception:
        return None


def _device_memory_error(nbytes: int, free: int | None, *, field: str = "chunk size"):
    from .errors import DeviceMemoryError

    have = "unknown" if free is None else f"{free / 2**30:.2f} GiB"
    return DeviceMemoryError(
        f"A block of {nbytes / 2**30:.2f} GiB does not fit in the GPU's free memory ({have}).", field=field,
        fix="lower the block sizes (timeseries.chunk_pixels, mosaic.tile_size) in the configuration, free the "
            "GPU of other work, or run on the CPU with --backend numpy")


def check_device_memory(nbytes: int, *, field: str = "chunk size", headroom: float = 0.9) -> None:
    """Raise :class:`~gpu_insar_adjust.errors.DeviceMemoryError` when ``nbytes`` exceed ``headroom`` × the GPU's
    free memory (no-op when that cannot be measured, e.g. without a GPU)."""
    free = _device_free_bytes()
    if free is not None and nbytes > headroom * free:
        raise _device_memory_error(nbytes, free, field=field)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


def trim_host_memory(full_collection: bool = True) -> None:
    """Give the host memory the process has freed back to the system (glibc ``malloc_trim``; no-op elsewhere).

    Rasters of a few tens of MB (a float32 frame at 100 m) are below glibc's largest mmap threshold, so they
    live on the heap, and a fragmented heap keeps its freed pages. Called between stages and after each frame;
    in the 0.001° benchmark the stages after the mosaic ran 1.3–2.4 GiB lower with it (the peak, inside the
    mosaic, did not change).

    A garbage collection comes first: xarray and rioxarray objects are often held in reference cycles, and the
    rasters they own with them, until the collector's next full pass. A full collection walks every object of
    the process (~0.1 s in a run); ``full_collection=False`` collects the young generations only (what one
    frame's work left behind), for calls between frames.
    """
    import gc

    gc.collect() if full_collection else gc.collect(1)
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _is_array(x: Any) -> bool:
    import array_api_compat

    return array_api_compat.is_array_api_obj(x) and not isinstance(x, (int, float, complex, bool))


def to_numpy(x: Any) -> np.ndarray:
    """Copy any backend's array to a host NumPy array (the only device→host path in the package)."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("cupy"):
        return x.get()
    if mod.startswith("array_api_strict"):
        return np.from_dlpack(x)
    if hasattr(x, "compute") and mod.startswith("dask"):
        return np.asarray(x.compute())
    return np.asarray(x)


def synchronize(xp=None) -> None:
    """Wait for queued device work (no-op on CPU); use before timing GPU code."""
    if xp is None or backend_name(xp) == "cupy":
        if xp is None and get_backend() != "cupy":
            return
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def float_dtypes(xp) -> tuple[Any, Any]:
    """(float32, float64) of a namespace."""
    return xp.float32, xp.float64


# --------------------------------------------------------------------------------------------------------------
# Dispatch table for non-standard operations
# --------------------------------------------------------------------------------------------------------------
_DISPATCH: dict[tuple[str, str], Callable[..., Any]] = {}


def register(op: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``func`` as the implementation of ``op`` on ``backend``.

    ``backend`` is a namespace short name (``"numpy"``, ``"cupy"``, ``"array_api_strict"``) or ``"*"`` for a
    portable array-API implementation used when no specific one is registered.
    """

    def deco(func: Callable[..., Any]) -> Callable[..., Any]:
        _DISPATCH[(op, backend)] = func
        return func

    return deco


def dispatch(op: str, xp) -> Callable[..., Any]:
    """Implementation of ``op`` for namespace ``xp``; raises :class:`UnsupportedBackendError` when none exists."""
    name = backend_name(xp)
    for key in ((op, name), (op, "*")):
        if key in _DISPATCH:
            return _DISPATCH[key]
    known = sorted(b for (o, b) in _DISPATCH if o == op)
    raise UnsupportedBackendError(
        f"Operation {op!r} has no implementation for the {name!r} backend.", field="backend",
        fix=(f"use one of the backends it supports ({', '.join(known)})" if known
             else "this operation is not registered on any backend; please report it"))
