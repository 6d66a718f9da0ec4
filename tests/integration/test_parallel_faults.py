"""Fault injection on the Dask path: a worker killed mid-run, and a task that fails for good.

Each test runs a fresh 2-worker LocalCluster (closed in the fixture's teardown, whatever happens). The per-frame
stand-in task sleeps briefly so that several frames are in flight when the fault happens; ``on_result`` persists
each finished frame atomically as ``<index>.json``, as the pipeline does with real products.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from gpu_insar_adjust import linalg  # noqa: E402
from gpu_insar_adjust.errors import FrameError  # noqa: E402
from gpu_insar_adjust.io.write import atomic_write_text  # noqa: E402
from gpu_insar_adjust.parallel import SchedulerError, get_client, map_frames  # noqa: E402

pytestmark = pytest.mark.slow

N_ITEMS = 8


def _frame_job(seed: int, *, state: str | None = None, victim: int = -1, wait_for: int = 0,
               fail_for_good: int = -1, bad_input: int = -1, kill_always: int = -1, delay_s: float = 0.2) -> dict:
    """Fit a plane to noisy data (the stand-in for one frame); inject a fault on item ``victim``/``fail_for_good``.

    ``victim``: on its first attempt the task waits until ``wait_for`` frames are persisted by ``on_result`` and
    then SIGKILLs its own worker process (as the kernel's OOM killer would); the retry runs normally.
    ``fail_for_good``: that item raises ValueError on every attempt (each attempt leaves an ``attempt-*`` file).
    ``bad_input``: that item raises a FrameError (a user-fixable GiaError), also leaving an ``attempt-*`` file.
    ``kill_always``: that item SIGKILLs its worker on every attempt, once ``wait_for`` frames are persisted.
    """
    if state is not None:
        st = Path(state)
        if seed in (fail_for_good, bad_input):
            (st / f"attempt-{uuid.uuid4().hex}").touch()
            if seed == bad_input:
                raise FrameError("LOS velocity raster not found.", file=f"frame_{seed}", field="vel.geo.tif",
                                 fix="put vel.geo.tif in the frame folder")
            raise ValueError(f"bad frame {seed}")
        if seed == kill_always:
            _wait_for_persisted(st, wait_for)
            os.kill(os.getpid(), signal.SIGKILL)
        marker = st / "killed"
        if seed == victim and not marker.exists():
            _wait_for_persisted(st, wait_for)
            marker.write_text(f"{time.time()!r} {os.getpid()}")  # when and where the kill is delivered
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(delay_s)
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(-1, 1, (2, 400))
    A = np.stack([np.ones_like(x), x, y], axis=1)
    obs = A @ np.array([seed, 2.0, -1.0]) + rng.normal(0, 0.1, 400)
    return {"seed": seed, "params": linalg.lstsq_shared(A, obs).x.tolist(), "pid": os.getpid()}


def _wait_for_persisted(state: Path, n: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list((state / "out").glob("*.json"))) < n and time.monotonic() < deadline:
        time.sleep(0.02)


class _Persist:
    """on_result: write ``<index>.json`` atomically and log each call with its time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.calls: list[tuple[int, float]] = []

    def __call__(self, k: int, res: dict) -> None:
        atomic_write_text(self.folder / f"{k}.json", json.dumps({k: v for k, v in res.items() if k != "pid"}),
                          overwrite=False)  # a second call for the same item would raise here
        self.calls.append((k, time.time()))


@pytest.fixture
def client():
    c = get_client(n_workers=2, memory_limit="500MiB", timeout_s=20)
    try:
        c.wait_for_workers(2, timeout=30)
        yield c
    finally:
        c.close()
        c.cluster.close()


@pytest.fixture
def state(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path


def _reference() -> list[dict]:
    return [{k: v for k, v in r.items() if k != "pid"} for r in map_frames(_frame_job, range(N_ITEMS))]


def _persisted(folder: Path) -> dict[int, dict]:
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no partial (temporary) files
    return {int(p.stem): json.loads(p.read_text()) for p in folder.glob("*.json")}


def test_worker_killed_mid_run_retried_and_nothing_lost(client, state):
    reference = _reference()
    pids_before = set(client.run(os.getpid).values())
    persist = _Persist(state / "out")
    t0 = time.time()
    results = map_frames(_frame_job, list(range(N_ITEMS)), client=client, on_result=persist, retries=2,
                         state=str(state), victim=5, wait_for=3)
    elapsed = time.time() - t0
    kill_time, killed_pid = (t(v) for t, v in zip((float, int), (state / "killed").read_text().split()))
    # the run finished, results bit-identical to the single-process run
    assert [{k: v for k, v in r.items() if k != "pid"} for r in results] == reference
    # a worker process really died, and the victim's retry ran in another (surviving or restarted) one
    assert killed_pid in pids_before and results[5]["pid"] != killed_pid
    client.wait_for_workers(2, timeout=30)  # the nanny restarted the killed worker
    assert killed_pid not in set(client.run(os.getpid).values())
    # on_result: exactly once per item, and every frame is persisted, complete, and equal to the reference
    assert sorted(k for k, _ in persist.calls) == list(range(N_ITEMS))
    assert _persisted(state / "out") == {k: reference[k] for k in range(N_ITEMS)}
    before_kill = [k for k, t in persist.calls if t <= kill_time]
    assert len(before_kill) >= 3 and 5 not in before_kill  # frames that finished before the kill were kept
    assert elapsed < 40, elapsed


def test_task_failing_for_good_names_item_and_keeps_finished(client, state):
    reference = _reference()
    persist = _Persist(state / "out")
    with pytest.raises(SchedulerError) as exc:
        map_frames(_frame_job, list(range(N_ITEMS)), client=client, on_result=persist, retries=2,
                   state=str(state), fail_for_good=3)
    msg = str(exc.value)
    assert "1 of 8 frame task(s) failed" in msg and "item 3" in msg and "ValueError: bad frame 3" in msg
    assert isinstance(exc.value.__cause__, ValueError)
    assert len(list(state.glob("attempt-*"))) == 3  # first try + retries=2
    # every other frame finished, was handed to on_result once and persisted whole
    others = [k for k in range(N_ITEMS) if k != 3]
    assert sorted(k for k, _ in persist.calls) == others
    assert _persisted(state / "out") == {k: reference[k] for k in others}
    # the cluster is left idle: nothing of this run still runs or is held
    deadline = time.monotonic() + 5
    while client.processing() and any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(client.processing().values())


def test_bad_input_is_not_retried_and_raised_as_is(client, state):
    persist = _Persist(state / "out")
    with pytest.raises(FrameError, match="LOS velocity raster not found") as exc:
        map_frames(_frame_job, list(range(N_ITEMS)), client=client, on_result=persist, retries=2,
                   state=str(state), bad_input=2)
    assert exc.value.file == "frame_2" and exc.value.field == "vel.geo.tif"
    assert len(list(state.glob("attempt-*"))) == 1  # bad input stays bad: no retries
    # raised only after every other frame finished and was persisted (item 2 fails at once, the rest take 0.2 s)
    others = [k for k in range(N_ITEMS) if k != 2]
    assert sorted(k for k, _ in persist.calls) == others
    assert sorted(_persisted(state / "out")) == others


@pytest.fixture
def strict_client():
    """A cluster whose scheduler gives up on a task after it took down one worker (default: three).

    (Tasks merely queued on a killed worker count as suspects too, so the test kills only once the other
    frames are done.)"""
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        c = get_client(n_workers=2, memory_limit="500MiB", timeout_s=20)
    try:
        c.wait_for_workers(2, timeout=30)
        yield c
    finally:
        c.close()
        c.cluster.close()


def test_task_killing_its_worker_every_time_is_a_scheduler_error(strict_client, state):
    reference = _reference()
    persist = _Persist(state / "out")
    with pytest.raises(SchedulerError) as exc:
        map_frames(_frame_job, list(range(N_ITEMS)), client=strict_client, on_result=persist,
                   state=str(state), kill_always=7, wait_for=7)
    assert "1 of 8 frame task(s) failed" in str(exc.value) and "item 7" in str(exc.value)
    assert type(exc.value.__cause__).__name__ == "KilledWorker"
    others = [k for k in range(N_ITEMS) if k != 7]
    assert sorted(k for k, _ in persist.calls) == others
    assert _persisted(state / "out") == {k: reference[k] for k in others}
