"""Shared test fixtures: the array backends, the real-data folder, reference comparisons.

Every numerical test that takes the ``xp`` fixture runs on

* ``numpy``            — array_api_compat's NumPy namespace (the CPU production path);
* ``array_api_strict`` — the strict reference namespace: proves the code uses only the array API standard, so
                         it will run on CuPy too, without needing a GPU;
* ``cupy``             — the GPU path; skipped without a GPU unless ``--require-gpu`` is given, in which case a
                         missing GPU is a *failure* (so GPU runs can never pass by skipping).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"

BACKENDS = ("numpy", "array_api_strict", "cupy")

# Tolerances of a backend's result against a float64 NumPy reference, by storage precision.
RTOL = {"float64": 1e-10, "float32": 1e-4}


def pytest_addoption(parser):
    parser.addoption("--require-gpu", action="store_true", default=False,
                     help="fail (instead of skip) every cupy-backend test when no GPU is usable")


def _share_cores_between_xdist_workers() -> None:
    """Under ``pytest -n N`` give each worker its own 1/N of the cores (CPU affinity, numba and BLAS threads).

    numba, OpenBLAS, GDAL and the package's thread pools each size themselves to every core of the process: N
    workers on N cores would run N² threads, and on a 16-core GPU host the suite then crawls past any timeout.
    """
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if n < 2 or not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // n)
    first = (int(worker[2:]) % n) * per % len(cores)  # a replaced worker (gw16, ...) takes its slot's cores
    os.sched_setaffinity(0, cores[first:first + per])
    os.environ.setdefault("NUMBA_NUM_THREADS", str(per))  # read when numba is first imported (not yet here)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=per)  # BLAS/OpenMP pools already loaded with NumPy


def pytest_configure(config):
    _share_cores_between_xdist_workers()
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (cupy backend)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "real_data: reads ../shared/data/real")


def _namespace(name: str, require_gpu: bool):
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
        return xp
    from gpu_insar_adjust import backend

    ok, reason = backend.gpu_status()
    if not ok:
        if require_gpu:
            pytest.fail(f"--require-gpu given but the cupy backend is unusable: {reason}")
        pytest.skip(f"no GPU: {reason}")
    import array_api_compat.cupy as xp

    return xp


@pytest.fixture(params=BACKENDS)
def xp(request):
    """Array-API namespace of each backend in turn."""
    return _namespace(request.param, request.config.getoption("--require-gpu"))


@pytest.fixture(params=("numpy", "array_api_strict"))
def cpu_xp(request):
    """Array-API namespace of each CPU backend (for code that has no GPU path yet)."""
    return _namespace(request.param, False)


@pytest.fixture
def gpu_xp(request):
    """The CuPy namespace; skipped (or failed with --require-gpu) without a GPU."""
    return _namespace("cupy", request.config.getoption("--require-gpu"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder of real InSAR/GNSS data (../shared/data/real); tests skip with the reason when it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder not found at {REAL_DATA} (clone the project beside shared/)")
    return REAL_DATA


def to_numpy(a):
    from gpu_insar_adjust.backend import to_numpy as _to_numpy

    return _to_numpy(a)


def assert_matches_reference(result, reference, *, dtype: str = "float64", rtol: float | None = None,
                             atol: float = 0.0, scale: float | None = None, equal_nan: bool = True):
    """Compare any backend's ``result`` with a float64 NumPy ``reference``.

    The tolerance is relative to ``scale`` (default: the max-abs of the reference), so near-zero entries of a
    well-scaled vector do not demand impossible relative precision. ``rtol`` defaults to 1e-10 for float64
    and 1e-4 for float32 results.
    """
    res = np.asarray(to_numpy(result), dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    assert res.shape == ref.shape, f"shape {res.shape} != reference {ref.shape}"
    if equal_nan:
        nan_res, nan_ref = np.isnan(res), np.isnan(ref)
        assert np.array_equal(nan_res, nan_ref), "NaN pattern differs from the reference"
        res, ref = res[~nan_ref], ref[~nan_ref]
    if ref.size == 0:
        return
    rtol = RTOL[dtype] if rtol is None else rtol
    scale = float(np.max(np.abs(ref))) if scale is None else scale
    err = float(np.max(np.abs(res - ref)))
    assert err <= rtol * scale + atol, f"max abs error {err:.3e} > rtol {rtol:g} × scale {scale:.3e} + atol {atol:g}"
