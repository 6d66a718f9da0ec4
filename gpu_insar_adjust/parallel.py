"""Dask scale-out: frames as tasks on a ``distributed.Client``, cubes as chunked arrays.

* :func:`get_client` — a LocalCluster by default (one process per worker, one thread each, so NumPy/numba use
  their own threads), an existing scheduler with ``scheduler="tcp://host:8786"``, or dask-cuda's
  ``LocalCUDACluster`` (one worker per GPU) with ``gpu=True``. A scheduler that does not answer within
  ``timeout_s`` raises :class:`~gpu_insar_adjust.errors.SchedulerError`; it never hangs.
* :func:`map_frames` — run one function per frame as tasks, results in input order; a worker lost mid-run has
  its tasks retried on the remaining workers (``retries``); an ``on_result`` callback lets the caller persist
  each finished frame at once, so a later failure loses no finished frame.
* :func:`map_blocks_pixels` — apply a per-pixel-block function to a (time, y, x) cube chunked over space with a
  proper ``meta``, so peak memory is bounded by the chunk size, not the cube size.

This is the only module that imports Dask; it is imported lazily.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import BackendUnavailableError, GiaError
from .logs import get_logger

log = get_logger("parallel")

__all__ = ["SchedulerError", "get_client", "log_like_this_process", "map_frames", "map_blocks_pixels"]


class SchedulerError(GiaError, ConnectionError):
    """A Dask scheduler could not be reached or a cluster could not be started."""


def _require_distributed():
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError("Dask distributed is not installed.", field="dask",
                                      fix="pip install 'gpu_insar_adjust[dask]'") from exc


def get_client(scheduler: str | None = None, *, n_workers: int | None = None, threads_per_worker: int = 1,
               memory_limit: str | int | None = "auto", gpu: bool = False, timeout_s: float = 10.0):
    """A ``distributed.Client``: on ``scheduler`` if given, else on a new local (CUDA) cluster."""
    _require_distributed()
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{timeout_s}s")
        except (OSError, TimeoutError) as exc:
            raise SchedulerError(f"The Dask scheduler at {scheduler!r} did not answer within {timeout_s:g} s "
                                 f"({type(exc).__name__}).", field="--scheduler",
                                 fix="check the address (tcp://HOST:PORT) and that `dask scheduler` runs there, or "
                                     "omit --scheduler to use a local cluster") from exc
        log.info("connected to Dask scheduler %s (%d workers)", scheduler,
                 len(client.scheduler_info().get("workers", {})))
        return client
    if gpu:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise BackendUnavailableError("A CUDA cluster (one Dask worker per GPU) was requested but dask-cuda "
                                          "is not installed.", field="parallel.cluster",
                                          fix="pip install dask-cuda, or set parallel.cluster = 'cpu' (--cluster cpu)"
                                          ) from exc
        try:
            # one process per GPU, each seeing its own device first (dask-cuda sets CUDA_VISIBLE_DEVICES per
            # worker and pins it to the cores near its GPU)
            cluster = LocalCUDACluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                       memory_limit=memory_limit, dashboard_address=None)
        except Exception as exc:  # no NVML, fewer GPUs than workers, a device in exclusive mode...
            raise SchedulerError(f"dask-cuda could not start a CUDA cluster of {n_workers or 'all'} GPU worker(s) "
                                 f"({type(exc).__name__}: {exc}).", field="parallel.cluster",
                                 fix="check the GPUs with nvidia-smi and CUDA_VISIBLE_DEVICES, give at most one "
                                     "worker per visible GPU, or set parallel.cluster = 'cpu' (--cluster cpu)"
                                 ) from exc
    else:
        # Dask limits the BLAS/OpenMP threads of each worker process to one; numba's are limited here too, to the
        # worker's threads: otherwise every worker starts a numba thread per core, and their OpenMP threads spin
        # against each other (two workers on two cores were then barely faster than one process)
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               memory_limit=memory_limit, dashboard_address=None,
                               env={"NUMBA_NUM_THREADS": str(int(threads_per_worker))})
    client = Client(cluster)
    log.info("started local Dask cluster: %d workers", len(cluster.workers))
    return client


def _setup_worker_logging(level: int) -> None:
    from .logs import setup_logging

    setup_logging(level, rich=False)


def log_like_this_process(client) -> None:
    """Give the workers' package logger this process's level and a plain handler: a frame's warnings and
    progress then read as they do in one process (a worker process otherwise has no handler for them)."""
    from .logs import get_logger

    client.run(_setup_worker_logging, get_logger().getEffectiveLevel())


class _GiaFailure:
    """A task's GiaError, returned rather than raised so that Dask does not retry it (bad input stays bad)."""

    def __init__(self, error: GiaError):
        self.error = error


def _run_keeping_gia_errors(func: Callable[..., Any], item: Any, **kwargs) -> Any:
    try:
        return func(item, **kwargs)
    except GiaError as exc:
        return _GiaFailure(exc)


def map_frames(func: Callable[..., Any], items: Sequence[Any], *, client=None, retries: int = 2,
               on_result: Callable[[int, Any], None] | None = None, costs: Sequence[float] | None = None,
               **kwargs) -> list[Any]:
    """Run ``func(item, **kwargs)`` for every item; results in the order of ``items``.

    Without a client the items run in this process (the reference). With one, each item is a task; tasks lost
    with a worker are rescheduled on the others, and a task that raises is retried up to ``retries`` times —
    except for a :class:`~gpu_insar_adjust.errors.GiaError` (bad input is not retried). ``on_result(index,
    result)`` is called in this process as each task finishes (e.g. to write that frame's products atomically),
    exactly once per item.

    ``costs`` (one estimate per item, any unit) orders the tasks on a cluster, dearest first (Dask priority, and
    submitted in that order): the longest frames then start at once instead of last, which shortens the stage
    when a few frames cost far more than the rest (list scheduling). It changes no result.

    All tasks are drained before an error is raised, so every frame that finished has had its ``on_result``.
    Then a frame that raised a :class:`~gpu_insar_adjust.errors.GiaError` re-raises it (the lowest item index
    first); any other failure (an exception after ``retries`` retries, or a worker killed too often while running
    the task) raises :class:`SchedulerError` naming the failed items.
    """
    if client is None:
        out = []
        for k, item in enumerate(items):
            res = func(item, **kwargs)
            if on_result is not None:
                on_result(k, res)
            out.append(res)
        return out
    from distributed import as_completed

    name = getattr(func, "__name__", "frame")
    run_id = uuid.uuid4().hex[:12]
    # Unique, readable keys ("<func>-<index>-<run>"): a rerun never reuses a cached result of an earlier one.
    if costs is not None and len(costs) != len(items):
        raise ValueError(f"costs has {len(costs)} entries for {len(items)} items")
    priority = [0.0] * len(items) if costs is None else [float(c) for c in costs]
    order = sorted(range(len(items)), key=lambda k: -priority[k])  # stable: ties keep the input order
    futures = [None] * len(items)
    for k in order:
        futures[k] = client.submit(_run_keeping_gia_errors, func, items[k], key=f"{name}-{k}-{run_id}",
                                   retries=retries, priority=priority[k], **kwargs)
    index = {f.key: k for k, f in enumerate(futures)}
    results: list[Any] = [None] * len(items)
    errors: list[tuple[int, BaseException]] = []
    done: set[int] = set()
    try:
        # Drain every task before raising, so that one failed frame never costs the finished ones their
        # on_result (their products are persisted; a rerun redoes only what failed).
        for fut in as_completed(futures):
            k = index[fut.key]
            if k in done:  # defensive: a recomputed future is reported once only
                continue
            done.add(k)
            try:
                res = fut.result()
            except Exception as exc:  # failed for good (retries used up), or its worker died too often
                errors.append((k, exc))
                continue
            if isinstance(res, _GiaFailure):
                errors.append((k, res.error))
                continue
            results[k] = res
            if on_result is not None:
                on_result(k, res)
    finally:
        # On an interrupt or an on_result error, do not leave tasks running on the cluster.
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)
    if errors:
        errors.sort(key=lambda e: e[0])
        gia = [e for e in errors if isinstance(e[1], GiaError)]
        if gia:  # a user-fixable problem of one frame: show it as it is
            raise gia[0][1]
        k, exc = errors[0]
        failed = ", ".join(str(i) for i, _ in errors[:10]) + (", ..." if len(errors) > 10 else "")
        raise SchedulerError(f"{len(errors)} of {len(items)} frame task(s) failed on the Dask cluster (item(s) "
                             f"{failed}); first: item {k} ({_short(items[k])}): {type(exc).__name__}: {exc}.",
                             field="workers",
                             fix="finished frames were kept; rerun the same command to redo only the failed "
                                 "ones") from exc
    return results


def _short(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def map_blocks_pixels(func: Callable, cube, *, chunk_pixels: tuple[int, int] = (256, 256), n_out: int,
                      dtype="float32", out_name: str = "result", out_dim: str = "param", out_coords: Iterable | None
                      = None, **kwargs):
    """Apply ``func(block (T, ny, nx) ndarray, **kwargs) -> (n_out, ny, nx)`` over a (time, y, x) DataArray.

    The cube is chunked over space only (all epochs of a pixel in one chunk), each chunk is reduced
    independently, and the result is a lazy (``out_dim``, y, x) DataArray: compute it (or write it) to run.
    """
    import dask.array as da
    import numpy as np
    import xarray as xr

    cube = cube.chunk({cube.dims[0]: -1, cube.dims[1]: chunk_pixels[0], cube.dims[2]: chunk_pixels[1]})
    data = cube.data
    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks=(-1, *chunk_pixels))
    out = da.map_blocks(lambda b: func(b, **kwargs).astype(dtype, copy=False), data, dtype=dtype,
                        chunks=((n_out,), data.chunks[1], data.chunks[2]),
                        meta=np.empty((0, 0, 0), dtype=dtype))
    coords = {cube.dims[1]: cube[cube.dims[1]], cube.dims[2]: cube[cube.dims[2]]}
    if out_coords is not None:
        coords[out_dim] = list(out_coords)
    return xr.DataArray(out, dims=(out_dim, cube.dims[1], cube.dims[2]), coords=coords, name=out_name,
                        attrs=dict(cube.attrs))
