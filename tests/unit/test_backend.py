"""Backend selection, GPU detection, data movement and the dispatch table."""

import subprocess
import sys

import numpy as np
import pytest

from gpu_insar_adjust import backend, errors


def test_import_does_not_pull_heavy_modules():
    code = ("import sys, gpu_insar_adjust, gpu_insar_adjust.backend, gpu_insar_adjust.linalg, "
            "gpu_insar_adjust.config, gpu_insar_adjust.errors\n"
            "bad = [m for m in ('cupy', 'cuml', 'dask', 'distributed', 'matplotlib') if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the package imported: {out.stdout.strip()}"


def test_cupy_without_gpu_raises_with_fix(monkeypatch):
    monkeypatch.setattr(backend, "gpu_status", lambda: (False, "no device (test)"))
    with pytest.raises(errors.BackendUnavailableError) as info:
        with backend.use_backend("cupy"):
            pass
    msg = str(info.value)
    assert "gpu_insar_adjust[gpu]" in msg and "numpy" in msg and "no device (test)" in msg
    # auto never fails: it chooses the CPU
    with backend.use_backend("auto") as name:
        assert name == "numpy"


def test_auto_picks_gpu_when_present(monkeypatch):
    monkeypatch.setattr(backend, "gpu_status", lambda: (True, "1 CUDA device(s)"))
    assert backend.resolve_backend("auto") == "cupy"


def test_unknown_backend_name():
    with pytest.raises(errors.BackendUnavailableError, match="choose one of"):
        backend.resolve_backend("tpu")


def test_use_backend_is_restored():
    before = backend.get_backend()
    with backend.use_backend("numpy") as name:
        assert name == "numpy" and backend.get_backend() == "numpy"
    assert backend.get_backend() == before


def test_gpu_detection_runs_once():
    backend.gpu_status.cache_clear()
    backend.gpu_available()
    backend.gpu_available()
    assert backend.gpu_status.cache_info().misses == 1


def test_gpu_count_is_zero_without_a_gpu_and_the_device_count_with_one(monkeypatch, request):
    on_gpu = backend.gpu_status()[0]
    backend.gpu_count.cache_clear()
    request.addfinalizer(backend.gpu_count.cache_clear)
    monkeypatch.setattr(backend, "gpu_status", lambda: (False, "no device (test)"))
    assert backend.gpu_count() == 0
    if on_gpu:  # on a GPU machine: CuPy's device count
        import cupy

        backend.gpu_count.cache_clear()
        monkeypatch.setattr(backend, "gpu_status", lambda: (True, "test"))
        assert backend.gpu_count() == cupy.cuda.runtime.getDeviceCount() >= 1


def test_namespace_and_round_trip(xp):
    a = np.arange(6.0).reshape(2, 3)
    on = backend.asarray(a, xp=xp)
    assert backend.backend_name(backend.namespace(on)) in ("numpy", "array_api_strict", "cupy")
    assert np.array_equal(backend.to_numpy(on), a)
    backend.synchronize(xp)


def test_namespace_rejects_mixed_backends():
    import array_api_strict as xs

    with pytest.raises(errors.ArrayArgumentError, match="different backends"):
        backend.namespace(np.ones(2), xs.asarray([1.0, 2.0]))


def test_dispatch_table():
    backend.register("_test_op", "numpy")(lambda: "np")
    backend.register("_test_op", "*")(lambda: "portable")
    import array_api_compat.numpy as xnp
    import array_api_strict as xs

    assert backend.dispatch("_test_op", xnp)() == "np"
    assert backend.dispatch("_test_op", xs)() == "portable"
    with pytest.raises(errors.UnsupportedBackendError, match="_nothing"):
        backend.dispatch("_nothing", xnp)


def test_errors_are_picklable_and_formatted():
    import pickle

    e = errors.FrameError("LOS velocity raster not found.", file="/tmp/f", field="vel.geo.tif", fix="add it")
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is errors.FrameError and str(e2) == str(e)
    assert "file:  /tmp/f" in str(e) and "field: vel.geo.tif" in str(e) and "fix:   add it" in str(e)
    assert isinstance(e, ValueError) and isinstance(e, errors.GiaError)


def test_block_larger_than_free_gpu_memory_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_device_free_bytes", lambda: 1 << 30)  # a GPU with 1 GiB free
    backend.check_device_memory(512 << 20)  # half a GiB fits
    with pytest.raises(errors.DeviceMemoryError) as exc:
        backend.check_device_memory(2 << 30, field="timeseries.chunk_pixels")
    assert isinstance(exc.value, errors.GiaError) and isinstance(exc.value, MemoryError)
    assert exc.value.field == "timeseries.chunk_pixels"
    assert "2.00 GiB" in str(exc.value) and "1.00 GiB" in str(exc.value)
    assert "chunk_pixels" in exc.value.fix and "--backend numpy" in exc.value.fix
    monkeypatch.setattr(backend, "_device_free_bytes", lambda: None)  # unknown (no GPU): no check
    backend.check_device_memory(1 << 60)


def test_host_to_gpu_copy_checks_free_memory(gpu_xp, monkeypatch):
    monkeypatch.setattr(backend, "_device_free_bytes", lambda: 4096)
    with pytest.raises(errors.DeviceMemoryError):
        backend.asarray(np.zeros(100_000, np.float32), xp=backend._backend_namespace("cupy"))
    monkeypatch.setattr(backend, "_device_free_bytes", lambda: 1 << 30)
    assert backend.asarray(np.zeros(100_000, np.float32), xp=backend._backend_namespace("cupy")).shape == (100_000,)


@pytest.mark.parametrize("full_collection", [True, False])
def test_trim_host_memory_frees_rasters_held_in_reference_cycles(full_collection):
    """A raster owned by objects in a reference cycle (as xarray objects often are) is freed between stages,
    not whenever the collector's next full pass happens to run."""
    import gc
    import weakref

    class Holder:
        pass

    gc.disable()  # no automatic pass may free the cycle in between
    try:
        a, b = Holder(), Holder()
        a.other, b.other = b, a
        a.raster = np.ones((256, 256), np.float32)
        ref = weakref.ref(a)
        del a, b
        assert ref() is not None  # only the cycle keeps it alive now
        backend.trim_host_memory(full_collection)  # a young cycle: the quick collection between frames suffices
        assert ref() is None
    finally:
        gc.enable()
