"""``gia bench``: benchmarks B1-B3 of the performance kernels, reported as ratios measured in the same run.

* **B1** per-epoch quadratic ramp removal (fit + subtract) on a ``(T, rows, cols)`` float32 cube with per-epoch
  NaN masks, against MintPy's ``mintpy.objects.ramp.deramp`` epoch by epoch (when MintPy is installed), a
  re-implementation of MintPy's approach (per-epoch design matrix of all valid pixels + ``numpy.linalg.lstsq``)
  and the memory floor (one read + one write of the cube: a NumPy copy into a preallocated array).
* **B2** per-pixel annual velocities (offset + one velocity per calendar year, continuous) on a ``(T, rows,
  cols)`` cube, against ``numpy.linalg.lstsq`` on the cube (what MintPy's ``timeseries2velocity`` does; gap-free
  cube for that column, processed in pixel blocks as MintPy does) and the memory floor (a copy of the cube).
* **B3** dense evaluation of a Gaussian-process correction surface (200 stations) on a ``rows × cols`` frame,
  against scikit-learn's ``GaussianProcessRegressor.predict`` on the same points (timed on a subset and scaled
  linearly when the frame is large) and the memory floor (a copy of the output frame).
* **B4** ``gia run`` end to end on the embedded North China Plain scenario (:func:`synthetic.make_scenario`):
  wall time, peak resident memory (RSS) of the run's process, the share of each pipeline stage (from
  ``summary.json``'s ``provenance.stage_seconds``) and the peak RSS seen during each stage. The scenario is
  generated in its own process first (timed and measured too). The time-series variant runs at two epoch
  spacings; its peak RSS should not grow with the number of epochs.

Absolute times drift on shared machines; the ratios are what the benchmarks report. Every figure, the machine
and the versions go into the JSON written by :func:`run_bench`.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SIZES: dict[str, dict[str, dict[str, int]]] = {
    "small": {"B1": {"T": 20, "rows": 300, "cols": 300, "naive_epochs": 20},
              "B2": {"T": 60, "rows": 300, "cols": 300},
              "B3": {"rows": 1000, "cols": 1000, "stations": 200, "sklearn_points": 20_000},
              "B4": {"resolutions": [0.005], "timeseries_resolution": 0.005, "epoch_days": [72, 24]}},
    "full": {"B1": {"T": 200, "rows": 1000, "cols": 1000, "naive_epochs": 10},
             "B2": {"T": 250, "rows": 2000, "cols": 2000},
             "B3": {"rows": 10_000, "cols": 10_000, "stations": 200, "sklearn_points": 1_000_000},
             "B4": {"resolutions": [0.005, 0.001], "timeseries_resolution": 0.005, "epoch_days": [72, 24]}},
}
CASES = ("B1", "B2", "B3", "B4")
B4_TARGET_S = 60.0  # `gia run` at 0.005° on a CPU


# --------------------------------------------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, RAM, GPU (if any), library versions and the date."""
    info: dict[str, Any] = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                            "python": platform.python_version(), "platform": platform.platform()}
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["cpu_model"] = model
    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        info["ram_gib"] = None
    versions = {}
    for mod in ("numpy", "scipy", "numba", "sklearn", "cupy", "mintpy", "gpu_insar_adjust"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    info["versions"] = versions
    from . import backend
    from .kernels import cpu

    ok, reason = backend.gpu_status()
    info["gpu"] = reason
    if ok:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["gpu_name"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info["cpu_engine"] = cpu.cpu_engine()
    try:
        import numpy as _np

        cfg = _np.show_config(mode="dicts")
        info["blas"] = cfg.get("Build Dependencies", {}).get("blas", {}).get("name")
    except Exception:
        info["blas"] = None
    return info


# --------------------------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------------------------
def time_best(func: Callable[[], Any], repeats: int = 3, setup: Callable[[], Any] | None = None,
              sync: Callable[[], Any] | None = None) -> float:
    """Best wall time (s) of ``repeats`` calls; ``setup`` runs untimed before each call."""
    best = float("inf")
    for _ in range(repeats):
        if setup is not None:
            setup()
        gc.collect()
        t0 = time.perf_counter()
        func()
        if sync is not None:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _xp_for(backend_name: str):
    from . import backend

    concrete = backend.resolve_backend(backend_name)
    if concrete == "cupy":
        import cupy

        return concrete, cupy.asarray, cupy.cuda.get_current_stream().synchronize
    return concrete, np.asarray, None


# --------------------------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------------------------
def make_b1_cube(T: int, rows: int, cols: int, seed: int = 0, posting_m: float = 100.0):
    """Cube (T, rows, cols) float32 mm with a quadratic ramp per epoch, noise and per-epoch NaN blobs.

    ~8 % of pixels are NaN in every epoch (a decorrelated area) and each epoch adds its own blobs (~5 %).
    Returns ``cube, x, y, truth_coeffs`` with x, y (rows, cols) in metres.
    """
    rng = np.random.default_rng(seed)
    xs = (np.arange(cols) - cols / 2) * posting_m
    ys = (rows / 2 - np.arange(rows)) * posting_m
    x, y = np.meshgrid(xs, ys)
    L = max(rows, cols) * posting_m / 2
    truth = np.zeros((T, 6))
    truth[:, 0] = rng.normal(0, 5, T)
    truth[:, 1:3] = rng.normal(0, 10 / L, (T, 2))
    truth[:, 3:6] = rng.normal(0, 5 / L**2, (T, 3))
    cube = np.empty((T, rows, cols), np.float32)
    static = _blobs(rng, rows, cols, 0.08, 6)
    for t in range(T):
        c = truth[t]
        cube[t] = c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * x * y + c[5] * y * y
        cube[t] += rng.standard_normal((rows, cols), dtype=np.float32)
        cube[t][static | _blobs(rng, rows, cols, 0.05, 8)] = np.nan
    return cube, x, y, truth


def _blobs(rng, rows, cols, frac, n):
    """Boolean mask covering about ``frac`` of the frame with ``n`` rectangles (decorrelated patches)."""
    m = np.zeros((rows, cols), bool)
    side = np.sqrt(frac * rows * cols / n)
    for _ in range(n):
        h = max(1, int(side * rng.uniform(0.5, 1.5)))
        w = max(1, int(side * side / h))
        r0 = rng.integers(0, max(1, rows - h))
        c0 = rng.integers(0, max(1, cols - w))
        m[r0:r0 + h, c0:c0 + w] = True
    return m


def annual_velocity_design(t_years: np.ndarray) -> np.ndarray:
    """Design (T, 1 + n_years): offset + continuous piecewise-linear displacement, one velocity per calendar year.

    Column k+1 is the time (yr) spent in calendar year k up to each epoch, so its coefficient is that year's
    velocity (mm/yr) and the columns sum to the elapsed time.
    """
    t = np.asarray(t_years, np.float64)
    y0 = np.floor(t.min())
    years = np.arange(y0, np.floor(t.max()) + 1)
    cols = [np.ones_like(t)] + [np.clip(t - yr, 0.0, 1.0) - np.clip(t.min() - yr, 0.0, 1.0) for yr in years]
    return np.column_stack(cols)


def make_b2_cube(T: int, rows: int, cols: int, seed: int = 0):
    """Cube (T, rows*cols) float32 mm of annual velocities + noise, and the design; gap-free."""
    rng = np.random.default_rng(seed)
    t = 2019.0 + np.arange(T) * 6.0 / 365.25  # Sentinel-1 6-day repeat
    A = annual_velocity_design(t)
    n = A.shape[1]
    N = rows * cols
    Y = np.empty((T, N), np.float32)
    B = 1 << 18
    for b0 in range(0, N, B):
        b1 = min(N, b0 + B)
        xtrue = rng.normal(0, 20, (n, b1 - b0))
        Y[:, b0:b1] = A @ xtrue + rng.standard_normal((T, b1 - b0))
    return A, Y


def add_gaps(Y: np.ndarray, frac: float = 0.05, seed: int = 1) -> None:
    """Put NaN into ~``frac`` of the observations in place (row by row, to stay within memory)."""
    rng = np.random.default_rng(seed)
    for t in range(Y.shape[0]):
        Y[t][rng.random(Y.shape[1]) < frac] = np.nan


# --------------------------------------------------------------------------------------------------------------
# the naive baselines
# --------------------------------------------------------------------------------------------------------------
def mintpy_style_deramp(data2d: np.ndarray) -> np.ndarray:
    """One epoch the way MintPy's ``deramp`` does it: a design matrix over all valid pixels, least squares.

    Pixel-index coordinates in float32 and the terms ``[y², x², yx, y, x, 1]`` as in MintPy; solved with
    ``numpy.linalg.lstsq`` (MintPy uses ``pinv(G[mask]) @ data``, the same SVD-based solve).
    """
    rows, cols = data2d.shape
    xx, yy = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    xx = xx.reshape(-1, 1)
    yy = yy.reshape(-1, 1)
    G = np.hstack((yy**2, xx**2, yy * xx, yy, xx, np.ones_like(xx)))
    d = data2d.reshape(-1)
    ok = ~np.isnan(d)
    X = np.linalg.lstsq(G[ok], d[ok], rcond=1e-15)[0]
    return (d - G @ X).reshape(rows, cols)


def _mintpy_deramp():
    try:
        from mintpy.objects.ramp import deramp
    except Exception:
        return None
    return deramp


# --------------------------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------------------------
def cpu_path_b1(cube_h: np.ndarray, x_h: np.ndarray, y_h: np.ndarray, repeats: int = 3) -> float:
    """Best time (s) of B1's fit + in-place subtraction on the CPU path (NumPy arrays), on a copy of ``cube_h``:
    the baseline a GPU run is compared with in the same run."""
    from . import kernels

    cube = np.array(cube_h, np.float32, copy=True)

    def cpu():
        c = kernels.fit_epoch_ramps(cube, x_h, y_h, order=2)
        kernels.subtract_epoch_ramps(cube, c, x_h, y_h, 2, in_place=True)

    cpu()  # compile
    return time_best(cpu, repeats)


def cpu_path_b2(A: np.ndarray, Y_h: np.ndarray, repeats: int = 3) -> float:
    """Best time (s) of B2's per-pixel fit on the CPU path (NumPy arrays): the GPU run's same-run baseline."""
    from . import kernels

    kernels.shared_design_fit(A, Y_h[:, :4096])  # compile
    return time_best(lambda: kernels.shared_design_fit(A, Y_h), repeats)


def _gpu_targets(res: dict, t_cpu: float, t_ours: float, t_floor: float) -> None:
    """The GPU targets of B1/B2: within 1.5x of the device's copy floor, >= 20x the CPU path (same run)."""
    res["times_s"]["cpu_path"] = t_cpu
    res["ratios"]["cpu_path_over_ours"] = t_cpu / t_ours
    res["targets"]["gpu_ours_over_device_floor<=1.5"] = t_ours / t_floor <= 1.5
    res["targets"]["gpu_cpu_path_over_ours>=20"] = t_cpu / t_ours >= 20


def bench_b1(T: int, rows: int, cols: int, naive_epochs: int, backend: str = "auto",
             repeats: int = 3, ours_timer: Callable | None = None) -> dict[str, Any]:
    """B1: fit + subtract per-epoch quadratic ramps; returns times (s), ratios and a correctness check."""
    from . import kernels

    concrete, put, sync = _xp_for(backend)
    cube_h, x_h, y_h, truth = make_b1_cube(T, rows, cols)
    res: dict[str, Any] = {"case": "B1", "shape": [T, rows, cols], "backend": concrete,
                           "nan_fraction": float(np.isnan(cube_h).mean())}
    k = max(1, min(T, naive_epochs))

    def naive():
        for t in range(k):
            mintpy_style_deramp(cube_h[t])

    t_naive = time_best(naive, 1) * T / k
    res["times_s"] = {"naive_mintpy_style": t_naive}
    res["naive_epochs_timed"] = k
    deramp = _mintpy_deramp()
    if deramp is not None:
        def mintpy():
            for t in range(k):
                deramp(cube_h[t], ramp_type="quadratic")

        res["times_s"]["mintpy"] = time_best(mintpy, 1) * T / k
    cube, x, y = put(cube_h), put(x_h), put(y_h)
    out = cube.copy()  # preallocated and touched: the memory floor pays no page faults either
    from .backend import to_numpy

    # the first fit sees the original cube: keep it for the accuracy check
    coeffs = to_numpy(kernels.fit_epoch_ramps(cube, x, y, order=2))

    # the fused call (remove_epoch_ramps) gives bit for bit the result of fit + subtract: checked on a few epochs
    k4 = min(T, 4)
    head = cube[:k4].copy()
    fused, c_fused = kernels.remove_epoch_ramps(head, x, y, order=2)
    c_two = kernels.fit_epoch_ramps(head, x, y, order=2)
    two = kernels.subtract_epoch_ramps(head, c_two, x, y, 2)
    res["remove_equals_fit_subtract"] = bool(np.array_equal(to_numpy(fused), to_numpy(two), equal_nan=True)
                                             and np.array_equal(to_numpy(c_fused), to_numpy(c_two)))
    del head, fused, two

    def ours():
        # fit + subtract in place: one read, then one read + one write of the cube, in two parallel passes.
        # (remove_epoch_ramps fuses them group by group with the same result; it is no faster here, where the
        # fit is compute bound, and its many short parallel passes suffer more when other processes share the
        # cores.) Repeats re-fit the already corrected cube, the same work on the same gaps.
        c = kernels.fit_epoch_ramps(cube, x, y, order=2)
        kernels.subtract_epoch_ramps(cube, c, x, y, 2, in_place=True)

    ours()  # compile / load kernels
    t_ours = (ours_timer or time_best)(ours, repeats, sync=sync)
    if concrete == "cupy":
        import cupy

        t_floor = time_best(lambda: cupy.copyto(out, cube), repeats, sync=sync)
    else:
        t_floor = time_best(lambda: np.copyto(out, cube), repeats)
    res["times_s"].update({"ours": t_ours, "memory_floor": t_floor})
    res["ratios"] = {"naive_mintpy_style_over_ours": t_naive / t_ours, "ours_over_memory_floor": t_ours / t_floor}
    if "mintpy" in res["times_s"]:
        res["ratios"]["mintpy_over_ours"] = res["times_s"]["mintpy"] / t_ours
    # correctness: the recovered ramps against the truth (noise 1 mm over ~1e6 pixels)
    xx, yy = x_h.ravel(), y_h.ravel()
    worst = 0.0
    for t in range(0, T, max(1, T // 10)):
        d = (coeffs[t, 0] - truth[t, 0]) + (coeffs[t, 1] - truth[t, 1]) * xx + (coeffs[t, 2] - truth[t, 2]) * yy \
            + (coeffs[t, 3] - truth[t, 3]) * xx * xx + (coeffs[t, 4] - truth[t, 4]) * xx * yy \
            + (coeffs[t, 5] - truth[t, 5]) * yy * yy
        worst = max(worst, float(np.max(np.abs(d))))
    res["max_ramp_error_mm"] = worst
    res["targets"] = {"naive_over_ours>=5": res["ratios"]["naive_mintpy_style_over_ours"] >= 5,
                      "ours_over_floor<=2.5": res["ratios"]["ours_over_memory_floor"] <= 2.5}
    if concrete == "cupy":
        _gpu_targets(res, cpu_path_b1(cube_h, x_h, y_h, repeats), t_ours, t_floor)
    return res


def bench_b2(T: int, rows: int, cols: int, backend: str = "auto", repeats: int = 3,
             ours_timer: Callable | None = None) -> dict[str, Any]:
    """B2: per-pixel annual velocities; gap-free cube vs lstsq, then the same cube with 5 % gaps."""
    from . import kernels
    from .backend import to_numpy

    concrete, put, sync = _xp_for(backend)
    A, Y_h = make_b2_cube(T, rows, cols)
    N = Y_h.shape[1]
    res: dict[str, Any] = {"case": "B2", "shape": [T, rows, cols], "n_unknowns": int(A.shape[1]),
                           "backend": concrete}
    Y = put(Y_h)
    Ad = put(A)
    kernels.shared_design_fit(Ad, Y[:, :4096])  # compile / load kernels
    state = {}
    t_ours = (ours_timer or time_best)(lambda: state.__setitem__("fit", kernels.shared_design_fit(Ad, Y)), repeats,
                                       sync=sync)
    x_ours = to_numpy(state.pop("fit").x)
    out = Y.copy()
    if concrete == "cupy":
        import cupy

        t_floor = time_best(lambda: cupy.copyto(out, Y), repeats, sync=sync)
    else:
        t_floor = time_best(lambda: np.copyto(out, Y), repeats)
    del out
    gc.collect()
    t_cpu = cpu_path_b2(A, Y_h, repeats) if concrete == "cupy" else None  # before the gaps go into the cube
    block = 1 << 17  # MintPy also splits the cube into memory-sized boxes
    x_ref = np.empty((A.shape[1], N))

    def lstsq():
        for b0 in range(0, N, block):
            b1 = min(N, b0 + block)
            x_ref[:, b0:b1] = np.linalg.lstsq(A, Y_h[:, b0:b1].astype(np.float64), rcond=1e-15)[0]

    t_lstsq = time_best(lstsq, 1)
    scale = np.max(np.abs(x_ref))
    res["max_rel_diff_vs_lstsq"] = float(np.max(np.abs(x_ours - x_ref)) / scale)
    del x_ref, x_ours
    gc.collect()
    # the same cube with 5 % random gaps: per-pixel normal equations for every pixel
    if concrete == "cupy":
        Y_h = None
        import cupy

        mask = cupy.random.random(Y.shape, dtype=cupy.float32) < 0.05
        Y[mask] = cupy.nan
        del mask
    else:
        add_gaps(Y_h)
    t_gaps = time_best(lambda: kernels.shared_design_fit(Ad, Y), repeats, sync=sync)
    res["times_s"] = {"ours_gap_free": t_ours, "ours_5pct_gaps": t_gaps, "memory_floor": t_floor,
                      "numpy_lstsq_gap_free": t_lstsq}
    res["ratios"] = {"lstsq_over_ours": t_lstsq / t_ours, "ours_over_memory_floor": t_ours / t_floor,
                     "ours_gaps_over_memory_floor": t_gaps / t_floor}
    res["targets"] = {"lstsq_over_ours>=2": res["ratios"]["lstsq_over_ours"] >= 2,
                      "ours_over_floor<=2": res["ratios"]["ours_over_memory_floor"] <= 2}
    if t_cpu is not None:
        _gpu_targets(res, t_cpu, t_ours, t_floor)
    return res


def bench_b3(rows: int, cols: int, stations: int, sklearn_points: int, backend: str = "auto",
             repeats: int = 3, ours_timer: Callable | None = None) -> dict[str, Any]:
    """B3: GP posterior mean on a rows × cols grid from ``stations`` stations vs scikit-learn's predict."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    from . import kernels
    from .backend import to_numpy

    concrete, put, sync = _xp_for(backend)
    rng = np.random.default_rng(3)
    posting = 25.0  # m: a 10k × 10k frame is 250 km × 250 km
    xs = np.arange(cols) * posting
    ys = np.arange(rows) * posting
    cx = rng.uniform(0, xs[-1], stations)
    cy = rng.uniform(0, ys[-1], stations)
    ell = 0.2 * max(xs[-1], ys[-1])
    vals = 3.0 * np.sin(cx / ell) + 2.0 * np.cos(cy / ell) + rng.normal(0, 0.5, stations)
    gpr = GaussianProcessRegressor(ConstantKernel(4.0, "fixed") * RBF(ell, "fixed") + WhiteKernel(0.25, "fixed"),
                                   optimizer=None).fit(np.column_stack([cx, cy]), vals)
    amp = gpr.kernel_.k1.k1.constant_value
    weights = gpr.alpha_ * amp
    centres = np.column_stack([cx, cy])
    res: dict[str, Any] = {"case": "B3", "shape": [rows, cols], "stations": stations, "backend": concrete}
    c_d, w_d, x_d, y_d = put(centres), put(weights), put(xs), put(ys)
    state = {}

    def ours():
        state["s"] = kernels.eval_kernel_surface(c_d, w_d, x_d, y_d, kernel="gaussian", length_scale=ell,
                                                 grid=True)

    ours()
    t_ours = (ours_timer or time_best)(ours, repeats, sync=sync)
    if concrete == "cupy":  # the floor on the device the surface was computed on
        import cupy

        surf_d = state.pop("s")
        out_d = cupy.empty_like(surf_d)
        t_floor = time_best(lambda: cupy.copyto(out_d, surf_d), repeats, sync=sync)
        surf = to_numpy(surf_d)
        del out_d, surf_d
    else:
        surf = to_numpy(state.pop("s"))
        out = np.empty_like(surf)
        t_floor = time_best(lambda: np.copyto(out, surf), repeats)
        del out
    n_pts = min(sklearn_points, rows * cols)
    idx = rng.choice(rows * cols, n_pts, replace=False)
    pts = np.column_stack([xs[idx % cols], ys[idx // cols]])
    pred = {}
    t_sk = time_best(lambda: pred.__setitem__("p", gpr.predict(pts)), 1) * (rows * cols) / n_pts
    res["max_abs_diff_vs_sklearn"] = float(np.max(np.abs(surf.ravel()[idx] - pred["p"])))
    res["sklearn_points_timed"] = int(n_pts)
    res["times_s"] = {"ours": t_ours, "memory_floor_output_copy": t_floor, "sklearn_gpr_predict": t_sk}
    res["ratios"] = {"sklearn_over_ours": t_sk / t_ours, "ours_over_memory_floor": t_ours / t_floor}
    return res


# --------------------------------------------------------------------------------------------------------------
# B4: the whole pipeline, each step in its own process
# --------------------------------------------------------------------------------------------------------------
# a stage's start in the run's log: "HH:MM:SS LEVEL logger: <stage> ..." (the stage is what follows the last ": ")
_STAGE_START = re.compile(r"(?:^|:\s)([^:]+?) \.\.\.\s*$")


def measure_process(cmd: Sequence[str], log_path: str | os.PathLike, poll_s: float = 0.2,
                    timeout_s: float | None = None, env: dict | None = None) -> dict[str, Any]:
    """Run ``cmd`` in a child process; return wall time (s), exit code, peak RSS (MiB) and peak RSS per stage.

    The peak RSS of the child comes from the kernel (``os.wait4`` rusage of that one child: ``ru_maxrss``). The
    per-stage peaks come from sampling every ``poll_s`` seconds (psutil) the RSS of the child plus all its
    descendants (local Dask workers adjusting frames) and attributing each sample to the last stage the log
    announced (``logs.stage`` writes ``"<stage> ..."`` when one starts), so a stage shorter than ``poll_s`` may be
    missed. ``peak_rss_mib`` is the larger of the kernel's peak of the child and the largest sampled sum over
    the process tree (an upper bound when processes share pages); ``peak_rss_workers_mib`` is the largest
    sampled sum over the descendants alone (0 when the run started none). stdout and stderr go to ``log_path``.
    """
    import threading

    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with the dev environment
        psutil = None
    log_path = Path(log_path)
    per_stage: dict[str, float] = {}
    state = {"stage": "start-up", "done": False, "timed_out": False}
    t0 = time.perf_counter()
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env)

        def sampler():
            ps = psutil.Process(proc.pid) if psutil is not None else None
            pos = 0
            while not state["done"]:
                try:
                    with open(log_path, "rb") as lf:
                        lf.seek(pos)
                        chunk = lf.read()
                    pos += len(chunk)
                    for line in chunk.decode(errors="replace").splitlines():
                        m = _STAGE_START.search(line)
                        if m:
                            state["stage"] = m.group(1).strip()
                    if ps is not None:
                        workers = 0.0
                        for child in ps.children(recursive=True):
                            try:
                                workers += child.memory_info().rss / 2**20
                            except psutil.Error:  # exited between the listing and the reading
                                pass
                        rss = ps.memory_info().rss / 2**20 + workers
                        per_stage[state["stage"]] = max(per_stage.get(state["stage"], 0.0), rss)
                        state["tree"] = max(state.get("tree", 0.0), rss)
                        state["workers"] = max(state.get("workers", 0.0), workers)
                except Exception:
                    pass
                if timeout_s is not None and time.perf_counter() - t0 > timeout_s and not state["timed_out"]:
                    state["timed_out"] = True
                    proc.kill()
                time.sleep(poll_s)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        state["done"] = True
        th.join()
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    # ru_maxrss is in KiB on Linux
    return {"wall_s": wall, "returncode": proc.returncode, "timed_out": state["timed_out"],
            "peak_rss_mib": max(ru.ru_maxrss / 1024, state.get("tree", 0.0)), "peak_rss_mib_by_stage": per_stage,
            "peak_rss_workers_mib": state.get("workers", 0.0),
            "last_stage_started": state["stage"], "log_tail": tail if proc.returncode else []}


def _run_scenario_case(workdir: Path, resolution: float, timeseries: bool, epoch_days: int,
                       timeout_s: float | None, backend: str = "auto",
                       workers: int | None = None, variant: str = "") -> dict[str, Any]:
    """Generate one scenario (own process), then ``gia run`` it (own process); every figure of both.

    ``workers`` is passed to ``gia run --workers`` (0: frames adjusted in the run's own process; None: the
    configuration's default, ``auto``); a run with workers, or with a ``variant`` name, writes to its own output
    folder and log.
    """
    import sys

    tag = f"r{resolution:g}".replace(".", "p") + (f"_ts{epoch_days}d" if timeseries else "")
    scen = workdir / tag
    run_tag = tag + variant + (f"_w{int(workers)}" if workers else "")  # a variant keeps its own output and log
    out = workdir / (run_tag + "_out")
    res: dict[str, Any] = {"resolution_deg": resolution, "timeseries": timeseries,
                           "epoch_days": epoch_days if timeseries else None, "workers": workers,
                           "out": out.name}
    if not (scen / "truth" / "scenario.json").exists():
        gen = measure_process([sys.executable, "-c",
                               "import sys; from gpu_insar_adjust.synthetic import make_scenario; "
                               f"make_scenario(sys.argv[1], resolution={resolution!r}, timeseries={timeseries!r}, "
                               f"epoch_days={int(epoch_days)})", str(scen)],
                              workdir / (tag + "_synth.log"), timeout_s=timeout_s)
        res["generation"] = gen
        if gen["returncode"] != 0:
            res["failed"] = "generation"
            return res
    else:
        res["generation"] = "reused an existing scenario folder"
    meta = json.loads((scen / "truth" / "scenario.json").read_text())
    res["grid_shape"] = meta.get("grid_shape")
    res["scenario_bytes"] = int(sum(p.stat().st_size for p in scen.rglob("*") if p.is_file()))
    frames = sorted(p for p in (scen / "frames").iterdir() if p.is_dir())
    res["n_frames"] = len(frames)
    cubes = sorted((scen / "frames").rglob("cum.h5"))
    if cubes:
        import h5py

        with h5py.File(cubes[0], "r") as h:
            res["cube_shape_first_frame"] = list(h["cum"].shape) if "cum" in h else None
        res["cube_bytes_total"] = int(sum(c.stat().st_size for c in cubes))
    cmd = [sys.executable, "-m", "gpu_insar_adjust.cli", "run", "--frames", str(scen / "frames"),
           "--gnss", str(scen / "gnss.csv"), "--holdout", str(scen / "gnss_holdout.csv"), "--out", str(out),
           "--overwrite"] + (["--backend", backend] if backend != "auto" else []) \
        + (["--workers", str(int(workers))] if workers is not None else [])
    run = measure_process(cmd, workdir / (run_tag + "_run.log"), timeout_s=timeout_s)
    res["run"] = run
    summary = out / "summary.json"
    if run["returncode"] != 0 or not summary.exists():
        res["failed"] = f"gia run (last stage started: {run['last_stage_started']})"
        return res
    # the products' size on disk (the resume cache under work/ is not a product)
    res["product_bytes"] = int(sum((out / r).stat().st_size for r in _products_below(out)))
    prov = json.loads(summary.read_text()).get("provenance", {})
    stages = prov.get("stage_seconds", {})
    res["stage_seconds"] = stages
    res["pipeline_wall_s"] = prov.get("wall_seconds")
    total = sum(stages.values()) or 1.0
    res["stage_share"] = {k: v / total for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
    return res


def _check_workers(workers: int | None) -> None:
    if workers is not None and int(workers) < 1:
        from .errors import ConfigError

        raise ConfigError(f"B4 workers={workers!r}: the comparison needs at least one worker.", field="workers",
                          fix="pass N >= 1 (the in-process run is always part of the comparison), or leave it out")


def _products_below(out: Path, pattern: str = "*"):
    """The files below a ``gia run`` output folder matching ``pattern``, as paths relative to it, without the
    run's resume cache (``work/``), which is not a product."""
    rel = (p.relative_to(out) for p in out.rglob(pattern) if p.is_file())
    return [r for r in rel if r.parts[0] != "work"]


def _product_pairs(out_a: str | os.PathLike, out_b: str | os.PathLike):
    """``(name, a, b)`` for every GeoTIFF below either of two ``gia run`` output folders (the mosaics and the
    per-frame rasters under ``frames/``), by path relative to the folder, with the two runs' rasters; ``a`` and
    ``b`` are None when the product is missing from either folder."""
    import rasterio

    a, b = Path(out_a), Path(out_b)
    for name in sorted({r.as_posix() for root in (a, b) for r in _products_below(root, "*.tif")}):
        if not ((a / name).exists() and (b / name).exists()):
            yield name, None, None
            continue
        with rasterio.open(a / name) as fa, rasterio.open(b / name) as fb:
            yield name, fa.read(), fb.read()


def _same_products(out_a: str | os.PathLike, out_b: str | os.PathLike) -> dict[str, bool]:
    """Whether every GeoTIFF product of two ``gia run`` output folders holds the same values bit for bit (NaN
    equal to NaN), by path relative to the folder; a file missing from one folder counts as different."""
    return {name: x is not None and x.shape == y.shape and x.dtype == y.dtype
            and np.array_equal(x.view(np.uint8), y.view(np.uint8)) for name, x, y in _product_pairs(out_a, out_b)}


def _product_differences(out_a: str | os.PathLike, out_b: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Per GeoTIFF product of two ``gia run`` output folders: the largest absolute difference where both hold a
    value (the product's units, mm/yr for velocities) and the number of pixels that hold a value in one run and
    not in the other; a product missing from one folder gets ``{"missing": 1.0}``."""
    diff: dict[str, dict[str, float]] = {}
    for name, x, y in _product_pairs(out_a, out_b):
        if x is None or x.shape != y.shape:
            diff[name] = {"missing": 1.0}
            continue
        x, y = x.astype(np.float64), y.astype(np.float64)
        fx, fy = np.isfinite(x), np.isfinite(y)
        both = fx & fy
        diff[name] = {"max_abs_diff": float(np.max(np.abs(x[both] - y[both]))) if both.any() else 0.0,
                      "valid_mismatch_pixels": float(np.count_nonzero(fx != fy))}
    return diff


def bench_b4(resolutions: Sequence[float] = (0.005,), timeseries_resolution: float | None = 0.005,
             epoch_days: Sequence[int] = (72, 24), backend: str = "auto", workdir: str | os.PathLike | None = None,
             timeout_s: float | None = 1800.0, workers: int | None = None,
             cpu_baseline: bool | None = None) -> dict[str, Any]:
    """B4: ``gia run`` end to end on the embedded scenario at each resolution (degrees), plus the time-series
    variant at ``timeseries_resolution`` for each of ``epoch_days`` (peak RSS should not depend on the epochs).

    Scenarios and outputs go under ``workdir`` (a temporary folder, removed, when None; an existing scenario
    folder there is reused; the environment variable ``GIA_BENCH_WORKDIR`` names a kept folder when
    ``workdir`` is None). ``backend`` is passed to ``gia run --backend``; everything else is the default
    configuration.

    ``workers`` (N ≥ 1) adds a comparison at each resolution of the velocity case: the run there adjusts its
    frames in its own process (``--workers 0`` instead of the default ``auto``, which starts local workers on
    machines with 4 cores or more), then once more on a local Dask cluster of N workers (``--workers N``); the
    result gives both wall times, their ratio (``workers{N}_speedup_…``), the workers' memory and whether every
    GeoTIFF product (mosaics and per-frame rasters) is the same bit for bit.

    ``cpu_baseline`` (default: on when the runs are on a GPU, ``backend`` "cupy" or "auto" with one) runs each
    velocity case once more with ``--backend numpy`` on the same machine, right after the run under test: the
    ratio of the two wall times (``gpu_speedup_…``; the GPU target at 0.001° is ≥ 10) and the largest
    difference of every product between the two backends. A comparison whose second run fails reports its
    target as missed.
    """
    _check_workers(workers)
    import shutil
    import tempfile

    tmp = None
    workdir = workdir or os.environ.get("GIA_BENCH_WORKDIR") or None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="gia-b4-")
        workdir = tmp
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if cpu_baseline is None:
        from .backend import gpu_available

        cpu_baseline = backend != "numpy" and gpu_available()  # the run under test is on the GPU
    res: dict[str, Any] = {"case": "B4", "backend": backend, "velocity": {}, "timeseries": {}}
    if workers:
        res["velocity_workers"] = {}
    if cpu_baseline:
        res["velocity_cpu"] = {}
    try:
        for r in resolutions:
            key = f"{r:g}"
            res["velocity"][key] = _run_scenario_case(workdir, float(r), False, 12, timeout_s, backend,
                                                      workers=0 if workers else None)
            gc.collect()
            if workers and "failed" not in res["velocity"][key]:
                w = _run_scenario_case(workdir, float(r), False, 12, timeout_s, backend, workers=int(workers))
                if "failed" not in w:
                    w["same_products"] = _same_products(workdir / res["velocity"][key]["out"],
                                                        workdir / w["out"])
                res["velocity_workers"][key] = w
                gc.collect()
            if cpu_baseline and "failed" not in res["velocity"][key]:
                c = _run_scenario_case(workdir, float(r), False, 12, timeout_s, "numpy",
                                       workers=0 if workers else None, variant="_numpy")
                if "failed" not in c:
                    c["product_differences"] = _product_differences(workdir / res["velocity"][key]["out"],
                                                                    workdir / c["out"])
                res["velocity_cpu"][key] = c
                gc.collect()
        if timeseries_resolution is not None:
            for d in epoch_days:
                res["timeseries"][f"{int(d)}d"] = _run_scenario_case(workdir, float(timeseries_resolution), True,
                                                                     int(d), timeout_s, backend)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    times, ratios, targets, memory = {}, {}, {}, {}
    for key, r in res["velocity"].items():
        if "failed" not in r:
            times[f"gia_run_{key}deg"] = r["run"]["wall_s"]
            memory[f"gia_run_{key}deg"] = r["run"]["peak_rss_mib"] / 1024
        if isinstance(r.get("generation"), dict):
            times[f"synth_{key}deg"] = r["generation"]["wall_s"]
    for key, w in res.get("velocity_workers", {}).items():
        one = res["velocity"][key]
        if "failed" in w:
            targets[f"workers{workers}_same_products_{key}deg"] = False  # the comparison run did not finish
            continue
        times[f"gia_run_{key}deg_workers{workers}"] = w["run"]["wall_s"]
        memory[f"gia_run_{key}deg_workers{workers}"] = w["run"]["peak_rss_mib"] / 1024
        ratios[f"workers{workers}_speedup_{key}deg"] = one["run"]["wall_s"] / w["run"]["wall_s"]
        targets[f"workers{workers}_same_products_{key}deg"] = bool(w["same_products"]) and all(
            w["same_products"].values())
    for key, c in res.get("velocity_cpu", {}).items():
        if "failed" in c:
            if key == "0.001":
                targets["gpu_speedup_0.001deg>=10"] = False  # no ratio without the CPU run
            continue
        times[f"gia_run_{key}deg_numpy"] = c["run"]["wall_s"]
        memory[f"gia_run_{key}deg_numpy"] = c["run"]["peak_rss_mib"] / 1024
        ratios[f"gpu_speedup_{key}deg"] = c["run"]["wall_s"] / res["velocity"][key]["run"]["wall_s"]
        if key == "0.001":
            targets["gpu_speedup_0.001deg>=10"] = ratios["gpu_speedup_0.001deg"] >= 10.0
    if "0.005" in res["velocity"] and "failed" not in res["velocity"]["0.005"]:
        targets[f"gia_run_0.005deg<{B4_TARGET_S:g}s"] = res["velocity"]["0.005"]["run"]["wall_s"] < B4_TARGET_S
    ts = [r for r in res["timeseries"].values() if "failed" not in r]
    for key, r in res["timeseries"].items():
        if "failed" not in r:
            times[f"gia_run_timeseries_{key}"] = r["run"]["wall_s"]
            memory[f"gia_run_timeseries_{key}"] = r["run"]["peak_rss_mib"] / 1024
    if len(ts) >= 2:
        lo, hi = ts[0], ts[-1]
        ratios["timeseries_peak_rss_ratio"] = hi["run"]["peak_rss_mib"] / lo["run"]["peak_rss_mib"]
        ratios["timeseries_cube_bytes_ratio"] = hi.get("cube_bytes_total", 0) / max(1, lo.get("cube_bytes_total", 1))
        # "independent of the number of epochs": the peak grows by < 25 % while the cubes grow ~3×
        targets["timeseries_peak_rss_ratio<=1.25"] = ratios["timeseries_peak_rss_ratio"] <= 1.25
    res["times_s"], res["ratios"], res["targets"], res["peak_rss_gib"] = times, ratios, targets, memory
    res["shape"] = [f"{r:g}°" for r in resolutions]
    return res


def run_bench(size: str = "small", cases: Sequence[str] = CASES, backend: str = "auto",
              out_json: str | os.PathLike | None = None, workers: int | None = None) -> dict[str, Any]:
    """Run the benchmark cases at ``size`` (``"small"`` runs in seconds, ``"full"`` is the issue's sizes).

    ``workers`` (B4 only) adds the comparison of each velocity run in one process with a run on N local Dask
    workers (:func:`bench_b4`).

    Returns ``{"machine": ..., "size": ..., "results": {case: {...}}}`` and writes it to ``out_json`` (atomic).
    """
    from .errors import ConfigError

    if size not in SIZES:
        raise ConfigError(f"Unknown benchmark size {size!r}.", field="size", fix=f"use one of {sorted(SIZES)}")
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise ConfigError(f"Unknown benchmark case(s) {bad}.", field="cases", fix=f"choose from {CASES}")
    if workers is not None:
        if "B4" not in cases:
            raise ConfigError(f"workers={workers!r} applies to case B4 only, which is not among {list(cases)}.",
                              field="workers", fix="add --case B4, or leave --workers out")
        _check_workers(workers)
    runners = {"B1": bench_b1, "B2": bench_b2, "B3": bench_b3, "B4": bench_b4}
    report: dict[str, Any] = {"machine": machine_info(), "size": size, "results": {}}
    for case in cases:
        params = dict(SIZES[size][case])
        t0 = time.perf_counter()
        extra = {"workers": workers} if case == "B4" and workers is not None else {}
        report["results"][case] = runners[case](**params, backend=backend, **extra)
        report["results"][case]["params"] = {**params, **extra}
        report["results"][case]["wall_s"] = time.perf_counter() - t0
        gc.collect()
    if out_json is not None:
        path = Path(out_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=_json_default))
        os.replace(tmp, path)
    return report


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o).__name__)


def print_table(results: dict[str, Any], console=None) -> None:
    """Print a rich table of the times (s) and ratios of :func:`run_bench`'s output."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = results.get("machine", {})
    table = Table(title=f"gia bench ({results.get('size')}) — {m.get('cpu_model')}, {m.get('cores')} cores, "
                        f"{m.get('ram_gib')} GiB; GPU: {m.get('gpu_name', 'none')}; "
                        f"CPU engine {m.get('cpu_engine')}")
    table.add_column("case")
    table.add_column("shape")
    table.add_column("what")
    table.add_column("time (s)", justify="right")
    table.add_column("ratio", justify="right")
    for case, r in results.get("results", {}).items():
        shape = "×".join(str(s) for s in r.get("shape", []))
        first = True
        for name, t in r.get("times_s", {}).items():
            table.add_row(case if first else "", shape if first else "", name, f"{t:.3f}", "")
            first = False
        for name, v in r.get("ratios", {}).items():
            table.add_row("", "", name, "", f"{v:.2f}×")
        for name, v in r.get("peak_rss_gib", {}).items():
            table.add_row("", "", f"peak RSS {name}", "", f"{v:.2f} GiB")
        workers = {f"{k} workers": v for k, v in r.get("velocity_workers", {}).items()}
        cpu = {f"{k} numpy": v for k, v in r.get("velocity_cpu", {}).items()}
        for key, sub in {**r.get("velocity", {}), **workers, **cpu, **r.get("timeseries", {})}.items():
            if "failed" in sub:
                table.add_row("", "", f"{key}: FAILED in {sub['failed']}", "", "")
            elif sub.get("stage_share"):
                top = ", ".join(f"{k} {v:.0%}" for k, v in list(sub["stage_share"].items())[:3])
                table.add_row("", "", f"{key} stages: {top}", "", "")
        for name, ok in r.get("targets", {}).items():
            table.add_row("", "", f"target {name}", "", "[green]met[/]" if ok else "[red]missed[/]")
    console.print(table)
