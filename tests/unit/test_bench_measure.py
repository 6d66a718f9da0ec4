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
    same = _same_products(a, b)
    assert same == {"vertical_velocity.tif": True, "east_velocity.tif": False, "only_here.tif": False}


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
