"""`gia demo` end to end on the embedded scenario: products, summary contract, and measured accuracy.

Figures measured when this test was written (seed 0, 0.02° — `gia demo`'s default —, 18 frames, 105 training /
45 held-out stations): held-out GNSS RMSE of the vertical velocity 1.94 mm/yr against 2.94 for the
plane-per-frame-plus-averaging baseline computed in the same run (0.66 x); RMSE against the truth grid 2.07 mm/yr;
subsidence area +2.1 % of truth; east velocity 1.07 mm/yr RMS against the true east where ascending and
descending overlap; overlap RMS 7.76 -> 2.46 mm/yr over the samples the network compares (slow ground; along-track
2.98, across-track 1.89, ascending-descending 2.64), 8.20 -> 3.33 over every overlap pixel. Target not reached:
overlap <= 1.5 mm/yr (with the planted frame errors removed exactly the same run leaves 1.24 sampled / 1.62 all
pixels: the scenario's 1 mm/yr troposphere per frame, ÷ u, in both frames of a pair).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from gpu_insar_adjust.cli import main
from gpu_insar_adjust.config import GiaConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--resolution", "0.02", "--keep", str(root)]) == 0
    return root


def test_products_and_summary_contract(demo):
    out = demo / "out"
    for name in ("vertical_velocity.tif", "vertical_velocity_std.tif", "east_velocity.tif", "summary.json",
                 "report.html", "validation.json", "manifest.json"):
        assert (out / name).is_file(), name
    with rasterio.open(out / "vertical_velocity.tif") as ds:
        assert ds.dtypes[0] == "float32" and np.isnan(ds.nodata) and ds.crs.to_epsg() == 4326
        assert ds.profile.get("tiled")
        if max(ds.width, ds.height) > 512:  # GDAL's COG driver adds overviews only above one block
            assert ds.overviews(1)
        v = ds.read(1)
    assert np.isfinite(v).mean() > 0.5
    frames = sorted(p.name.split(".")[0] for p in (out / "frames").glob("*.correction.tif"))
    assert len(frames) == 18 and len(list((out / "frames").glob("*.los_adjusted.tif"))) == 18
    s = json.loads((out / "summary.json").read_text())
    for key in ("subsidence_threshold_mm_yr", "subsidence_area_km2", "max_subsidence_rate_mm_yr",
                "mean_subsidence_rate_mm_yr", "subsidence_volume_rate_m3_yr", "frames", "network", "validation",
                "provenance"):
        assert key in s, key
    assert s["subsidence_threshold_mm_yr"] == 20.0
    # overlaps too fast everywhere to be compared on slow ground are named (frame ids of the run)
    assert all(set(pair.split("/")) <= set(s["frames"]) for pair in s["network"]["pairs_compared_on_fast_ground"])
    for fid in frames:
        f = s["frames"][fid]
        for key in ("selected_model", "cv_rmse_mm_yr", "candidates", "n_gnss", "rmse_before_mm_yr",
                    "rmse_after_mm_yr", "flagged_stations"):
            assert key in f, (fid, key)
        assert f["rmse_after_mm_yr"] < f["rmse_before_mm_yr"]
    assert s["provenance"]["inputs_sha256"] and s["provenance"]["version"]
    assert len(s["provenance"]["code_fingerprint"]) == 16
    assert manifest_complete(out)


def manifest_complete(out) -> bool:
    return json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_method_beats_baseline_and_recovers_truth(demo):
    s = json.loads((demo / "out" / "summary.json").read_text())
    val = json.loads((demo / "out" / "validation.json").read_text())
    ours = s["validation"]["overall"]["rmse"]
    base = s["baseline"]["validation"]["overall"]["rmse"]
    assert s["validation"]["overall"]["n"] >= 40
    assert ours <= 0.7 * base  # measured 1.94 vs 2.94 (0.66; target 0.7)
    assert ours <= 2.0  # measured 1.94 (target 2.0)
    assert val["truth"]["rmse"] <= 2.5  # measured 2.07 (target 2.5)
    assert abs(val["truth"]["area_error_percent"]) < 5.0  # measured +2.1 %
    net = s["network"]
    assert net["overlap_rms_after_mm_yr"] < 0.4 * net["overlap_rms_before_mm_yr"]  # measured 7.76 -> 2.46
    assert net["overlap_rms_all_pixels_after_mm_yr"] < 0.5 * net["overlap_rms_all_pixels_before_mm_yr"]  # 8.20->3.33
    kinds = {p["kind"] for p in net["pairs"]}
    assert kinds == {"along-track", "across-track", "asc-desc"}  # every overlap tied, labelled
    by_kind = net["overlap_rms_by_kind"]
    assert sum(d["n_pairs"] for d in by_kind.values()) == len(net["pairs"])
    for kind, d in by_kind.items():  # every kind of pair ends closer: measured 9.6->3.0, 6.6->1.9, 7.9->2.6
        assert d["rms_after_mm_yr"] < 0.4 * d["rms_before_mm_yr"], kind
    # the frames its neighbours disagree with carry the largest misfits: the three planted ionosphere frames
    scen = json.loads((demo / "scenario" / "truth" / "scenario.json").read_text())
    iono = {k for k, f in scen["frames"].items() if f["error_kind"] == "iono"}
    misfit = {k: f["overlap_misfit_mm_yr"] for k, f in s["frames"].items()}
    assert set(sorted(misfit, key=misfit.get)[-len(iono):]) == iono
    # east where ascending and descending overlap, against the true east (ITRF, mm/yr)
    with rasterio.open(demo / "out" / "east_velocity.tif") as a, \
            rasterio.open(demo / "scenario" / "truth" / "east_velocity.tif") as b:
        d = a.read(1).astype(float) - b.read(1).astype(float)
    assert np.isfinite(d).sum() > 5000
    assert np.sqrt(np.nanmean(d ** 2)) < 1.4  # measured 1.07


def test_check_reports_broken_input(demo, tmp_path, capsys):
    import shutil

    frames = tmp_path / "frames"
    shutil.copytree(demo / "scenario" / "frames", frames)
    victim = sorted(frames.iterdir())[0]
    vel = next(victim.glob("*vel.geo.tif"))
    vel.write_bytes(vel.read_bytes()[: vel.stat().st_size // 2])  # truncated
    rc = main(["check", "--frames", str(frames), "--gnss", str(demo / "scenario" / "gnss.csv"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 2
    assert any(p["severity"] == "error" and vel.name in (p["file"] or "") for p in report["problems"])


def test_gnss_outside_all_frames_is_a_clear_error(demo, tmp_path, capsys):
    gnss = tmp_path / "far.csv"
    gnss.write_text("station,lon,lat,ve,vn,vu,se,sn,su\n"
                    "FAR1,10.0,60.0,20.0,14.0,1.0,0.3,0.3,1.0\n"
                    "FAR2,11.0,60.5,20.5,14.2,0.5,0.3,0.3,1.0\n"
                    "FAR3,12.0,61.0,21.0,14.1,0.0,0.3,0.3,1.0\n")
    rc = main(["run", "--frames", str(demo / "scenario" / "frames"), "--gnss", str(gnss), "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable GNSS station" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "vertical_velocity.tif").exists()


def test_frames_on_a_dask_cluster_give_identical_products(demo, tmp_path):
    pytest.importorskip("distributed")
    scen = demo / "scenario"
    out = tmp_path / "dask"
    assert main(["run", "--frames", str(scen / "frames"), "--gnss", str(scen / "gnss.csv"), "--holdout",
                 str(scen / "gnss_holdout.csv"), "--out", str(out), "--workers", "2"]) == 0
    for name in ("vertical_velocity.tif", "frames/040A_05000_131313.correction.tif"):
        with rasterio.open(demo / "out" / name) as a, rasterio.open(out / name) as b:
            np.testing.assert_array_equal(a.read(1), b.read(1), err_msg=name)


def test_gpu_code_paths_on_a_cuda_cluster_give_the_cpu_products(demo, tmp_path, monkeypatch):
    """The GPU backend's code, end to end, with the strict array-API namespace standing in for CuPy (every array
    operation the device would run, on the host) and a 2-GPU machine whose dask-cuda cluster is stood in by an
    in-process one: ``cluster = "auto"`` picks one worker per GPU, and every product is the CPU run's, bit for bit
    (the strict namespace computes with NumPy: any difference is a path that treats device arrays differently)."""
    pytest.importorskip("distributed")
    array_api_strict = pytest.importorskip("array_api_strict")
    import sys
    import types

    from distributed import LocalCluster

    from gpu_insar_adjust import backend, pipeline

    lookup = backend._backend_namespace
    monkeypatch.setattr(backend, "_backend_namespace",
                        lambda name: array_api_strict if name == "cupy" else lookup(name))
    monkeypatch.setattr(backend, "gpu_status", lambda: (True, "2 CUDA device(s) (stand-in)"))
    monkeypatch.setattr(backend, "gpu_count", lambda: 2)
    monkeypatch.setattr(pipeline, "_has_dask_cuda", lambda: True)
    started = {}

    def local_cuda_cluster(**kw):  # threads of this process, so that the stand-in namespace reaches the workers
        started.update(kw)
        return LocalCluster(n_workers=kw["n_workers"], threads_per_worker=1, processes=False,
                            dashboard_address=None)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=local_cuda_cluster))
    scen = demo / "scenario"
    res = pipeline.run(scen / "frames", scen / "gnss.csv", tmp_path / "gpu", holdout=scen / "gnss_holdout.csv",
                       config=GiaConfig.model_validate({"backend": "cupy"}))
    assert started["n_workers"] == 2 and res.summary["provenance"]["backend"] == "cupy"
    names = sorted(p.relative_to(demo / "out") for p in (demo / "out").rglob("*.tif") if "work" not in p.parts)
    assert len(names) == 40
    for name in names:
        with rasterio.open(demo / "out" / name) as a, rasterio.open(tmp_path / "gpu" / name) as b:
            np.testing.assert_array_equal(a.read(1), b.read(1), err_msg=str(name))
    ref = json.loads((demo / "out" / "summary.json").read_text())
    for key in ("subsidence_area_km2", "mean_subsidence_rate_mm_yr", "max_subsidence_rate_mm_yr"):
        assert res.summary[key] == ref[key], key
    assert res.summary["validation"]["overall"] == ref["validation"]["overall"]


@pytest.mark.gpu
def test_gpu_run_matches_the_cpu_run_and_its_workers_share_the_device(demo, tmp_path, gpu_xp):
    """On CuPy: the run's products agree with the CPU run's to float32 rounding of the device's dense surfaces
    (the station-level fits and the model choices are the host's), and two local worker processes sharing the GPU
    give the in-process GPU run's products bit for bit."""
    pytest.importorskip("distributed")
    from gpu_insar_adjust import pipeline

    scen = demo / "scenario"
    runs = {}
    for label, parallel in (("here", {"workers": 0}), ("workers", {"workers": 2, "cluster": "cpu"})):
        runs[label] = pipeline.run(scen / "frames", scen / "gnss.csv", tmp_path / label,
                                   holdout=scen / "gnss_holdout.csv",
                                   config=GiaConfig.model_validate({"backend": "cupy", "parallel": parallel}))
    ref = json.loads((demo / "out" / "summary.json").read_text())
    for fid, f in ref["frames"].items():
        assert runs["here"].summary["frames"][fid]["selected_model"] == f["selected_model"], fid
    names = sorted(p.relative_to(demo / "out") for p in (demo / "out").rglob("*.tif") if "work" not in p.parts)
    for name in names:
        with rasterio.open(demo / "out" / name) as a, rasterio.open(tmp_path / "here" / name) as b, \
                rasterio.open(tmp_path / "workers" / name) as c:
            cpu, gpu, workers = a.read(1), b.read(1), c.read(1)
        np.testing.assert_array_equal(np.isnan(gpu), np.isnan(cpu), err_msg=str(name))
        np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-3, equal_nan=True, err_msg=str(name))
        np.testing.assert_array_equal(workers, gpu, err_msg=str(name))
    area, area_cpu = runs["here"].summary["subsidence_area_km2"], ref["subsidence_area_km2"]
    assert abs(area - area_cpu) <= 1e-3 * area_cpu


def test_frames_on_an_existing_scheduler_give_identical_products_and_leave_it_running(demo, tmp_path):
    """``--scheduler ADDRESS``: the frames are adjusted by that cluster's workers (the demo's products, bit for
    bit); the run disconnects when done, leaving the cluster up and no default client behind."""
    distributed = pytest.importorskip("distributed")
    from distributed.client import _get_global_client

    scen = demo / "scenario"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        assert main(["run", "--frames", str(scen / "frames"), "--gnss", str(scen / "gnss.csv"), "--holdout",
                     str(scen / "gnss_holdout.csv"), "--out", str(tmp_path / "remote"), "--scheduler",
                     cluster.scheduler_address]) == 0
        assert _get_global_client() is None
        with distributed.Client(cluster) as c:
            assert len(c.scheduler_info()["workers"]) == 2
            # the frames' tasks ran there: seconds of compute under their key prefix ("_adjust_one-<k>-<run>")
            computed = c.run_on_scheduler(lambda dask_scheduler: {
                name: prefix.all_durations.get("compute", 0.0)
                for name, prefix in dask_scheduler.task_prefixes.items()})
            assert computed.get("adjust_one", 0.0) > 0.0, computed
    for name in ("vertical_velocity.tif", "frames/040A_05000_131313.correction.tif"):
        with rasterio.open(demo / "out" / name) as a, rasterio.open(tmp_path / "remote" / name) as b:
            np.testing.assert_array_equal(a.read(1), b.read(1), err_msg=name)


def test_frames_are_read_once_in_one_process(demo, tmp_path, monkeypatch):
    """In one process the per-frame stage adjusts the frames as "read inputs" holds them (DEM included, dropped
    after it): every frame folder is opened once, and the products are those of the demo's own run."""
    from gpu_insar_adjust import pipeline
    from gpu_insar_adjust.io import frames as frames_io

    opened = []
    original = frames_io.open_frame

    def counting(path):
        opened.append(str(path))
        return original(path)

    monkeypatch.setattr(frames_io, "open_frame", counting)
    scen = demo / "scenario"
    res = pipeline.run(scen / "frames", scen / "gnss.csv", tmp_path / "once", holdout=scen / "gnss_holdout.csv",
                       config=GiaConfig.model_validate({"parallel": {"workers": 0}}))
    assert len(opened) == len(set(opened)) == len(res.frames) == 18
    for name in ("vertical_velocity.tif", "frames/040A_05000_131313.correction.tif",
                 "frames/142A_05000_131313.los_adjusted.tif"):
        with rasterio.open(demo / "out" / name) as a, rasterio.open(tmp_path / "once" / name) as b:
            np.testing.assert_array_equal(a.read(1), b.read(1), err_msg=name)


def _shifted_copy(src, dst, dlon_deg: float):
    """A copy of the frame folder ``src`` with every raster moved ``dlon_deg`` east (same pixels)."""
    from affine import Affine

    dst.mkdir()
    for tif in sorted(src.glob("*.tif")):
        with rasterio.open(tif) as ds:
            profile, data = ds.profile, ds.read()
        profile["transform"] = Affine.translation(dlon_deg, 0.0) * profile["transform"]
        with rasterio.open(dst / tif.name, "w", **profile) as out:
            out.write(data)


def test_frame_overlapping_nothing_is_adjusted_by_gnss_or_refused(demo, tmp_path, capsys):
    import pandas as pd

    scen = demo / "scenario"
    keep, iso = "040A_05000_131313", "142A_05000_131313"
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / keep).symlink_to(scen / "frames" / keep, target_is_directory=True)
    _shifted_copy(scen / "frames" / iso, frames / iso, 12.0)  # far from every other frame and station

    # no GNSS station inside it and no overlap: a clear error naming the frame, no products
    rc = main(["run", "--frames", str(frames), "--gnss", str(scen / "gnss.csv"), "--out", str(tmp_path / "o1")])
    err = capsys.readouterr().err
    assert rc == 2 and iso in err and "no overlap" in err and "Traceback" not in err
    assert not (tmp_path / "o1" / "vertical_velocity.tif").exists()

    # its stations moved with it: adjusted by GNSS alone, in no network pair
    gnss = pd.read_csv(scen / "gnss.csv")
    with rasterio.open(scen / "frames" / iso / f"{iso}.vel.geo.tif") as ds:
        b = ds.bounds
    inside = gnss[(gnss.lon > b.left) & (gnss.lon < b.right) & (gnss.lat > b.bottom) & (gnss.lat < b.top)]
    moved = inside.assign(station=[f"M{i:03d}" for i in range(len(inside))], lon=inside.lon + 12.0)
    both = tmp_path / "gnss_moved.csv"
    pd.concat([gnss, moved]).to_csv(both, index=False)
    assert main(["run", "--frames", str(frames), "--gnss", str(both), "--out", str(tmp_path / "o2")]) == 0
    s = json.loads((tmp_path / "o2" / "summary.json").read_text())
    f = s["frames"][iso]
    assert f["network_held_by"] == "gnss"
    assert not any(iso in p["frames"] for p in s["network"]["pairs"])
    print(f"isolated frame: {f['n_gnss']} stations, {f['selected_model']}, RMSE {f['rmse_before_mm_yr']:.2f} -> "
          f"{f['rmse_after_mm_yr']:.2f} mm/yr")
    assert f["n_gnss"] >= 10 and f["rmse_after_mm_yr"] < 0.5 * f["rmse_before_mm_yr"]  # measured 15, 39.86 -> 0.41
