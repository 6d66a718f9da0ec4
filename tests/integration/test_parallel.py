"""Dask scale-out: identical results on a 2-worker LocalCluster; memory bounded by chunks, not data."""

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from gpu_insar_adjust import errors, linalg  # noqa: E402
from gpu_insar_adjust.parallel import SchedulerError, get_client, map_blocks_pixels, map_frames  # noqa: E402

pytestmark = pytest.mark.slow  # a 1 GB cube through 400 MiB workers takes about a minute on 2 cores


def _frame_job(seed: int) -> dict:
    """A stand-in per-frame task: fit a plane to noisy data with the package solver."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(-1, 1, (2, 500))
    A = np.stack([np.ones_like(x), x, y], axis=1)
    obs = A @ np.array([seed, 2.0, -1.0]) + rng.normal(0, 0.1, 500)
    return {"seed": seed, "params": linalg.lstsq_shared(A, obs).x.tolist()}


def _velocity_block(block: np.ndarray, t_yr: np.ndarray) -> np.ndarray:
    T, ny, nx = block.shape
    A = np.stack([np.ones_like(t_yr), t_yr], axis=1)
    res = linalg.lstsq_shared(A, block.reshape(T, ny * nx))
    return res.x.reshape(2, ny, nx)


@pytest.fixture(scope="module")
def client():
    c = get_client(n_workers=2, memory_limit="400MiB")
    yield c
    c.close()
    c.cluster.close()


def test_frames_on_cluster_identical_to_single_process(client):
    seeds = list(range(6))
    local = map_frames(_frame_job, seeds)
    seen = []
    remote = map_frames(_frame_job, seeds, client=client, on_result=lambda k, r: seen.append(k))
    assert remote == local  # bit-identical
    assert sorted(seen) == seeds


def test_cube_larger_than_worker_memory(client):
    import xarray as xr

    T, ny, nx = 100, 1600, 1600  # 1.0 GB float32, each worker limited to 400 MiB
    t_yr = np.arange(T) * 12 / 365.25
    rate = da.from_array(np.linspace(-50, 10, nx, dtype=np.float32)[None, None, :], chunks=(1, 1, nx))
    cube = (da.ones((T, ny, nx), chunks=(T, 200, 200), dtype=np.float32) * rate
            * da.from_array(t_yr.astype(np.float32)[:, None, None], chunks=(T, 1, 1)))
    cube = xr.DataArray(cube, dims=("time", "y", "x"))
    assert cube.nbytes > 2 * 400 * 2**20
    out = map_blocks_pixels(_velocity_block, cube, chunk_pixels=(200, 200), n_out=2, t_yr=t_yr,
                            out_dim="param", out_coords=["intercept", "velocity"])
    vel = client.compute(out.sel(param="velocity").data).result()
    np.testing.assert_allclose(vel[0], np.linspace(-50, 10, nx), atol=1e-3)
    # every worker stayed within its limit (the nanny would have restarted a worker that exceeded it)
    info = client.run(lambda dask_worker: dask_worker.monitor.get_process_memory())
    assert all(m < 400 * 2**20 * 1.2 for m in info.values())


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(SchedulerError, match="did not answer") as exc:
        get_client("tcp://127.0.0.1:9", timeout_s=1.0)
    assert isinstance(exc.value, errors.GiaError)


def _timed_job(item: int) -> dict:
    import time

    start = time.monotonic()
    time.sleep(0.05)
    return {"item": item, "start": start}


def test_costly_frames_start_first_and_results_keep_their_order():
    """With one worker the frames run one at a time: in descending cost, and the results come back in input
    order."""
    costs = [1.0, 5.0, 3.0, 6.0, 2.0, 4.0]
    c = get_client(n_workers=1, memory_limit="400MiB")
    try:
        res = map_frames(_timed_job, list(range(6)), client=c, costs=costs)
    finally:
        c.close()
        c.cluster.close()
    assert [r["item"] for r in res] == list(range(6))
    started = [r["item"] for r in sorted(res, key=lambda r: r["start"])]
    assert started == [3, 1, 5, 2, 4, 0]
    with pytest.raises(ValueError, match="costs has 2 entries for 6 items"):
        map_frames(_timed_job, list(range(6)), client=object(), costs=[1.0, 2.0])


def _thread_counts(_) -> dict:
    import numba
    from threadpoolctl import threadpool_info

    return {"numba": numba.get_num_threads(),
            "blas": sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})}


def test_local_workers_are_single_threaded(client):
    """A local worker runs one task at a time on one core: numba, BLAS and OpenMP each with one thread (many
    threads per worker process would spin against each other's cores)."""
    pytest.importorskip("numba")
    counts = client.gather(client.map(_thread_counts, [0, 1], pure=False))
    for c in counts:
        assert c["numba"] == 1
        assert c["blas"] in ([], [1])


def test_cuda_cluster_is_dask_cuda_one_worker_per_gpu(monkeypatch):
    """``gpu=True`` starts dask-cuda's LocalCUDACluster (one single-threaded worker per GPU, the memory limit and
    no dashboard passed on); dask-cuda missing, or failing to start, is a GiaError naming the setting and the
    fix."""
    import sys
    import types

    from distributed import LocalCluster

    seen = {}

    def local_cuda_cluster(**kw):  # stands in for dask_cuda.LocalCUDACluster on a machine without GPUs
        seen.update(kw)
        return LocalCluster(n_workers=kw["n_workers"], threads_per_worker=1, processes=False,
                            dashboard_address=None)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=local_cuda_cluster))
    c = get_client(n_workers=2, memory_limit="1GiB", gpu=True)
    try:
        assert len(c.scheduler_info()["workers"]) == 2
        assert map_frames(_frame_job, [0, 1, 2], client=c) == map_frames(_frame_job, [0, 1, 2])
    finally:
        c.close()
        c.cluster.close()
    assert seen == {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "1GiB", "dashboard_address": None}

    def no_nvml(**kw):
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=no_nvml))
    with pytest.raises(SchedulerError, match="NVML") as ei:
        get_client(n_workers=2, gpu=True)
    assert ei.value.field == "parallel.cluster" and "--cluster cpu" in ei.value.fix
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails
    with pytest.raises(errors.BackendUnavailableError, match="dask-cuda") as ei:
        get_client(n_workers=2, gpu=True)
    assert "pip install dask-cuda" in ei.value.fix


def _gia_log_state(dask_worker=None) -> tuple:
    import logging

    logger = logging.getLogger("gpu_insar_adjust")
    return logger.level, [type(h).__name__ for h in logger.handlers]


def test_workers_log_like_this_process(client):
    """After log_like_this_process the workers' package logger has this process's level and one plain
    handler, so a frame's warnings on a worker are formatted as in one process."""
    import logging

    from gpu_insar_adjust.logs import get_logger
    from gpu_insar_adjust.parallel import log_like_this_process

    logger = get_logger()
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        log_like_this_process(client)
        states = client.run(_gia_log_state)
    finally:
        logger.setLevel(old)
    assert len(states) == 2
    assert all(level == logging.WARNING and handlers == ["StreamHandler"] for level, handlers in states.values())
