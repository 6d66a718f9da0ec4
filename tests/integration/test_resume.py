"""An interrupted run (a real SIGKILL) resumes, reuses finished frames, and ends identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

pytestmark = pytest.mark.slow


def _gia(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "gpu_insar_adjust.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _products(out: Path) -> dict:
    arrays = {}
    for p in sorted(out.rglob("*.tif")):
        with rasterio.open(p) as ds:
            arrays[str(p.relative_to(out))] = ds.read(1)
    return arrays


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    from gpu_insar_adjust.synthetic import make_scenario

    return make_scenario(tmp_path_factory.mktemp("scen"), seed=3, resolution=0.06)


def test_sigkill_then_resume_gives_identical_products(scenario, tmp_path):
    args = ["run", "--frames", scenario.frames_dir, "--gnss", scenario.gnss_csv, "--holdout",
            scenario.holdout_csv]
    ref_out, out = tmp_path / "reference", tmp_path / "interrupted"
    ref = _gia(*args, "--out", ref_out)
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    proc = _gia(*args, "--out", out)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "work").glob("*.adjust.json"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way through the per-frame adjustments
    proc.wait(timeout=30)
    done_before = {p.name for p in (out / "work").glob("*.adjust.json")}
    assert 3 <= len(done_before) < len(scenario.frame_dirs), "the kill did not land mid-way"
    assert not (out / "summary.json").exists() and not (out / "vertical_velocity.tif").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"

    rerun = _gia(*args, "--out", out)
    log = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, log
    assert f"resumed: {len(done_before)} of {len(scenario.frame_dirs)} frame adjustments reused" in log
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    # no temporary or half-written file is left anywhere
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    a, b = _products(ref_out), _products(out)
    assert a.keys() == b.keys() and len(a) > 3
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref_out, out))
    for key in ("subsidence_area_km2", "max_subsidence_rate_mm_yr", "mean_subsidence_rate_mm_yr"):
        assert sa[key] == sb[key]
    assert sa["validation"]["overall"]["rmse"] == sb["validation"]["overall"]["rmse"]


def test_output_folder_of_another_run_is_refused(scenario, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"fingerprint": "another run", "status": "complete"}))
    proc = _gia("run", "--frames", scenario.frames_dir, "--gnss", scenario.gnss_csv, "--out", out)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2 and "another run" in log and "--overwrite" in log and "Traceback" not in log


def test_changed_frame_is_the_only_one_redone(scenario, tmp_path):
    """After a complete run, one frame's velocity changes: a rerun with --overwrite recomputes that frame alone,
    and a rerun that only adds Dask workers is accepted as the same run (execution settings are not inputs)."""
    import shutil

    frames = tmp_path / "frames"
    shutil.copytree(scenario.frames_dir, frames)
    args = ["run", "--frames", frames, "--gnss", scenario.gnss_csv, "--out", tmp_path / "out"]
    first = _gia(*args)
    assert first.wait(timeout=600) == 0, first.stdout.read()
    work = tmp_path / "out" / "work"
    before = {p.name: p.stat().st_mtime_ns for p in work.glob("*.adjust.json")}
    n_frames = len(before)
    assert n_frames == len(scenario.frame_dirs)

    # same inputs, only the execution settings differ: the completed run is recognised, nothing is refused
    same = _gia(*args, "--workers", "0", "--backend", "numpy")
    log = same.communicate(timeout=600)[0]
    assert same.returncode == 0, log
    assert f"resumed: {n_frames} of {n_frames} frame adjustments reused" in log

    changed = sorted(p for p in frames.iterdir() if p.is_dir())[1]
    vel = next(changed.glob("*vel*.tif"))
    with rasterio.open(vel, "r+") as ds:  # a 2 mm/yr offset on the whole frame: a real change of input
        ds.write(ds.read(1) + np.float32(2.0), 1)
    refused = _gia(*args)
    log = refused.communicate(timeout=300)[0]
    assert refused.returncode == 2 and "--overwrite" in log, log
    rerun = _gia(*args, "--overwrite")
    log = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, log
    assert f"resumed: {n_frames - 1} of {n_frames} frame adjustments reused" in log
    after = {p.name: p.stat().st_mtime_ns for p in work.glob("*.adjust.json")}
    redone = sorted(name for name in after if after[name] != before.get(name))
    assert redone == [f"{changed.name}.adjust.json"], redone


def test_overwriting_run_leaves_no_report_or_validation_of_the_run_it_replaced(scenario, tmp_path):
    """A run that replaces another's products (``--overwrite``) removes what described those: the report and its
    figures when it writes none itself (``output.report = false``), and ``gia validate``'s validation.json."""
    out = tmp_path / "out"
    first = _gia("run", "--frames", scenario.frames_dir, "--gnss", scenario.gnss_csv, "--out", out)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert (out / "report.html").is_file() and any((out / "figures").glob("*.png"))
    (out / "validation.json").write_text(json.dumps({"validated": "the first run"}))
    cfg = tmp_path / "gia.toml"
    cfg.write_text("[output]\nreport = false\n")
    second = _gia("run", "--frames", scenario.frames_dir, "--gnss", scenario.gnss_csv, "--out", out,
                  "--config", cfg, "--overwrite")
    assert second.wait(timeout=300) == 0, second.stdout.read()
    assert not (out / "report.html").exists() and not (out / "figures").exists()
    assert not (out / "validation.json").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
