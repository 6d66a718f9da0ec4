"""``gia bench``'s process measurement: the memory of worker processes a run starts is counted."""

from __future__ import annotations

import sys

from gpu_insar_adjust.bench import measure_process

_PARENT = r"""
import subprocess, sys, time
print("worker stage ...", flush=True)
child = subprocess.Popen([sys.executable, "-c",
                          "import time, numpy as np; a = np.ones(300 * 2**20 // 8); time.sleep(1.5)"])
child.wait()
"""


def test_peak_memory_counts_the_workers_of_a_run(tmp_path):
    """A run whose own process stays small but whose worker holds 300 MiB reports that memory: as the workers'
    peak, in the run's peak, and under the stage that was running."""
    res = measure_process([sys.executable, "-c", _PARENT], tmp_path / "log.txt", poll_s=0.05)
    assert res["returncode"] == 0
    assert 280 <= res["peak_rss_workers_mib"] <= 600
    assert res["peak_rss_mib"] >= res["peak_rss_workers_mib"] + 5  # plus the parent itself
    assert res["peak_rss_mib_by_stage"]["worker stage"] >= 280


def _tif(path, data):
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    data = np.asarray(data, dtype=np.float32)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype="float32", transform=from_origin(115.0, 39.0, 0.01, 0.01), crs="EPSG:4326") as dst:
        dst.write(data, 1)


def test_same_products_compares_bits(tmp_path):
    """Products are the same only when every GeoTIFF holds the same bits: NaN equals NaN, -0.0 differs from 0.0,
    a product missing from one run differs."""
    import numpy as np

    from gpu_insar_adjust.bench import _same_products

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    v = np.array([[1.0, np.nan], [0.0, -2.5]])
    _tif(a / "vertical_velocity.tif", v)
    _tif(b / "vertical_velocity.tif", v.copy())
    _tif(a / "east_velocity.tif", v)
    _tif(b / "east_velocity.tif", np.where(v == 0.0, -0.0, v))
    _tif(a / "only_here.tif", v)
    for root, value in ((a, v), (b, np.where(np.isnan(v), 9.0, v))):  # per-frame rasters below frames/
        (root / "frames").mkdir()
        _tif(root / "frames" / "f1.correction.tif", value)
        (root / "work").mkdir()  # the resume cache is not a product
        _tif(root / "work" / "cache.tif", value)
    same = _same_products(a, b)
    assert same == {"vertical_velocity.tif": True, "east_velocity.tif": False, "only_here.tif": False,
                    "frames/f1.correction.tif": False}


def test_b4_workers_comparison_rejects_no_workers(tmp_path):
    import pytest

    from gpu_insar_adjust.bench import bench_b4
    from gpu_insar_adjust.errors import GiaError

    with pytest.raises(GiaError, match="workers"):
        bench_b4(resolutions=(0.05,), timeseries_resolution=None, workdir=tmp_path, workers=0)
    assert not any(tmp_path.iterdir())  # nothing generated


def test_product_differences_between_backends(tmp_path):
    """The backends' products are compared by their largest difference where both hold a value, and by the
    pixels that hold a value in one run only."""
    import numpy as np

    from gpu_insar_adjust.bench import _product_differences

    a, b = tmp_path / "gpu", tmp_path / "cpu"
    a.mkdir(), b.mkdir()
    v = np.array([[1.0, np.nan, 3.0], [0.0, -2.5, 7.0]])
    w = v.copy()
    w[0, 0] += 0.25  # the largest difference
    w[1, 2] -= 0.125
    w[1, 0] = np.nan  # a value in one run only
    _tif(a / "vertical_velocity.tif", v)
    _tif(b / "vertical_velocity.tif", w)
    _tif(a / "east_velocity.tif", v)
    d = _product_differences(a, b)
    assert d["vertical_velocity.tif"] == {"max_abs_diff": 0.25, "valid_mismatch_pixels": 1.0}
    assert d["east_velocity.tif"] == {"missing": 1.0}


def test_bench_workers_option_is_checked_before_anything_runs(monkeypatch):
    import pytest

    from gpu_insar_adjust import bench
    from gpu_insar_adjust.errors import GiaError

    monkeypatch.setattr(bench, "bench_b1", lambda **kw: pytest.fail("B1 ran before the option was checked"))
    with pytest.raises(GiaError, match="B4 only"):
        bench.run_bench(cases=("B1",), workers=2)
    with pytest.raises(GiaError, match="at least one worker"):
        bench.run_bench(cases=("B1", "B4"), workers=0)


def _fake_case(walls):
    """A stand-in for one ``gia run`` per call: wall times by (variant, workers, backend), or a failure."""
    calls = []

    def run(workdir, resolution, timeseries, epoch_days, timeout_s, backend="auto", workers=None, variant=""):
        calls.append((resolution, timeseries, backend, workers, variant))
        key = (variant, workers, backend)
        base = {"resolution_deg": resolution, "timeseries": timeseries, "out": f"{resolution}{variant}{workers}"}
        if walls.get(key) is None:
            return {**base, "failed": "gia run (last stage started: mosaic)"}
        return {**base, "run": {"wall_s": walls[key], "peak_rss_mib": 1024.0}, "stage_seconds": {"x": 1.0},
                "stage_share": {"x": 1.0}}
    return run, calls


def test_b4_comparisons_report_ratios_and_missed_targets(tmp_path, monkeypatch):
    """The workers' and the CPU baseline's runs give their ratios; a comparison run that fails is a missed
    target, not a missing one; products that differ miss the workers' target."""
    from gpu_insar_adjust import bench

    run, calls = _fake_case({("", 0, "cupy"): 20.0, ("", 2, "cupy"): 10.0, ("_numpy", 0, "numpy"): 300.0})
    monkeypatch.setattr(bench, "_run_scenario_case", run)
    monkeypatch.setattr(bench, "_same_products", lambda a, b: {"vertical_velocity.tif": True,
                                                                "frames/f.correction.tif": False})
    monkeypatch.setattr(bench, "_product_differences",
                        lambda a, b: {"vertical_velocity.tif": {"max_abs_diff": 0.1}})
    res = bench.bench_b4(resolutions=(0.001,), timeseries_resolution=None, backend="cupy", workdir=tmp_path,
                         workers=2, cpu_baseline=True)
    assert res["ratios"] == {"workers2_speedup_0.001deg": 2.0, "gpu_speedup_0.001deg": 15.0}
    assert res["targets"] == {"workers2_same_products_0.001deg": False, "gpu_speedup_0.001deg>=10": True}
    assert calls == [(0.001, False, "cupy", 0, ""), (0.001, False, "cupy", 2, ""),
                     (0.001, False, "numpy", 0, "_numpy")]

    run, _ = _fake_case({("", None, "cupy"): 20.0, ("_numpy", None, "numpy"): None})
    monkeypatch.setattr(bench, "_run_scenario_case", run)
    res = bench.bench_b4(resolutions=(0.001,), timeseries_resolution=None, backend="cupy", workdir=tmp_path,
                         cpu_baseline=True)
    assert res["targets"] == {"gpu_speedup_0.001deg>=10": False} and "gpu_speedup_0.001deg" not in res["ratios"]


def test_b4_cpu_baseline_only_for_runs_on_a_gpu(tmp_path, monkeypatch):
    from gpu_insar_adjust import backend, bench

    run, calls = _fake_case({("", None, "auto"): 5.0, ("_numpy", None, "numpy"): 6.0})
    monkeypatch.setattr(bench, "_run_scenario_case", run)
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    bench.bench_b4(resolutions=(0.05,), timeseries_resolution=None, backend="auto", workdir=tmp_path)
    assert [c[2] for c in calls] == ["auto"]  # no GPU: no baseline run
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    res = bench.bench_b4(resolutions=(0.05,), timeseries_resolution=None, backend="auto", workdir=tmp_path)
    assert [c[2] for c in calls] == ["auto", "auto", "numpy"]
    assert abs(res["ratios"]["gpu_speedup_0.05deg"] - 1.2) < 1e-12
