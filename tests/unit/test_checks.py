"""check_inputs: clean real and synthetic inputs pass; every planted fault is reported, all in one report."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio

from gpu_insar_adjust.checks import CheckReport, check_inputs
from gpu_insar_adjust.synthetic import make_scenario


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return make_scenario(tmp_path_factory.mktemp("scenario"), seed=0, resolution=0.05)


def _copy_scenario(scenario, dest: Path) -> Path:
    shutil.copytree(scenario.frames_dir, dest / "frames")
    for f in (scenario.gnss_csv, scenario.holdout_csv):
        shutil.copy(f, dest / f.name)
    return dest


def _vel(folder: Path) -> Path:
    return next(folder.glob("*vel.geo.tif"))


def _rewrite(path: Path, scale: float = 1.0, crs=True) -> None:
    """Rewrite a GeoTIFF with its own profile, the data scaled, with or without its CRS."""
    with rasterio.open(path) as src:
        profile, data = src.profile, src.read()
    if scale != 1.0:
        data = np.where(np.isfinite(data), data * scale, data).astype(data.dtype)
    if not crs:
        profile.pop("crs", None)
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


# --------------------------------------------------------------------------------------------------------------
# Clean inputs
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_naf_frames_have_no_error(real_data):
    report = check_inputs(real_data / "naf_licsbas_4frames")
    assert report.ok, report.format_text()
    assert report.errors == []
    assert sorted(f["frame_id"] for f in report.frames) == ["014A_04939_131313", "087A_04904_121313",
                                                             "094D_04913_101213", "167D_04884_131212"]
    for f in report.frames:
        # LiCSBAS NAF velocities: median |v| of a few mm/yr; unit vectors stored as unit vectors.
        assert 2.0 < f["median_abs_velocity"] < 20.0
        assert f["max_norm_deviation"] < 1e-3
        assert 0.3 < f["nan_fraction"] < 0.6
        lon0, lat0, lon1, lat1 = f["footprint"]
        assert 31.0 < lon0 < lon1 < 38.0 and 39.0 < lat0 < lat1 < 43.0


def test_scenario_has_no_error(scenario):
    report = check_inputs(scenario.frames_dir, scenario.gnss_csv, scenario.holdout_csv)
    assert report.ok, report.format_text()
    assert len(report.frames) == len(scenario.frame_dirs) == 18
    n_train = sum(1 for _ in open(scenario.gnss_csv)) - 1
    n_hold = sum(1 for _ in open(scenario.holdout_csv)) - 1
    assert [g["n_stations"] for g in report.gnss] == [n_train, n_hold]
    assert report.gnss[0]["n_inside"] == n_train
    d = report.to_dict()
    assert d["ok"] is True and d["n_errors"] == 0
    assert "0 error(s)" in report.format_text()


# --------------------------------------------------------------------------------------------------------------
# Broken inputs: every fault in one report, with the right file
# --------------------------------------------------------------------------------------------------------------
def test_every_planted_fault_is_reported_once(scenario, tmp_path):
    root = _copy_scenario(scenario, tmp_path)
    frames = sorted((root / "frames").iterdir())
    scaled, no_crs, truncated = frames[0], frames[1], frames[2]

    _rewrite(_vel(scaled), scale=1000.0)  # mm/yr × 1000: wrong units
    _rewrite(no_crs / "E.geo.tif", crs=False)  # a unit-vector raster without CRS
    cut = _vel(truncated)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    gnss = root / "gnss.csv"
    lines = gnss.read_text().splitlines()
    dup_station = lines[1].split(",")[0]
    lines.append(lines[1])  # the same station twice
    lines.append("FARX,10.0,60.0,1.0,1.0,0.0,0.5,0.5,1.0")  # in Scandinavia: far outside the NCP frames
    gnss.write_text("\n".join(lines) + "\n")

    report = check_inputs(root / "frames", gnss, root / "gnss_holdout.csv")
    text = report.format_text()
    assert not report.ok

    def one(file, predicate):
        hits = [p for p in report.problems_for(file) if predicate(p)]
        assert len(hits) == 1, f"expected one problem for {file}:\n{text}"
        return hits[0]

    p = one(_vel(scaled), lambda p: p["field"] == "los_velocity")
    assert p["severity"] == "error" and "implausible" in p["message"] and "mm/yr" in p["fix"]
    # The planted ×1000 shows in the figure reported (scenario medians are 5-60 mm/yr).
    median = next(f["median_abs_velocity"] for f in report.frames if f["frame_id"] == scaled.name)
    assert 5e3 < median < 6e4

    p = one(no_crs / "E.geo.tif", lambda p: True)
    assert p["severity"] == "error" and "CRS" in p["message"] and "EPSG" in p["fix"]

    p = one(cut, lambda p: True)
    assert p["severity"] == "error" and p["fix"]

    p = one(gnss, lambda p: p["field"] == "station")
    assert p["severity"] == "error" and dup_station in p["message"] and "Duplicate" in p["message"]
    p = one(gnss, lambda p: p["field"] == "lon/lat")
    assert "FARX" in p["message"] and dup_station not in p["message"]

    # Nothing else is wrong: the other 15 frames and the hold-out file are clean.
    flagged = {Path(p["file"]).resolve() for p in report.problems}
    assert flagged == {_vel(scaled).resolve(), (no_crs / "E.geo.tif").resolve(), cut.resolve(), gnss.resolve()}
    assert len(report.errors) == 4
    assert len(report.frames) == 16  # the CRS-less and truncated frames do not open; the scaled one does


def test_real_frames_broken_copies(real_data, tmp_path):
    for f in sorted((real_data / "naf_licsbas_4frames").iterdir()):
        if f.is_dir() and f.name != "GNSS":
            shutil.copytree(f, tmp_path / f.name)
    frames = sorted(p for p in tmp_path.iterdir())
    _rewrite(frames[0] / "vel.geo.tif", scale=1000.0)
    _rewrite(frames[1] / "vel.geo.tif", crs=False)
    report = check_inputs(tmp_path)
    assert len(report.errors) == 2, report.format_text()
    assert report.problems_for(frames[0] / "vel.geo.tif")[0]["field"] == "los_velocity"
    assert "CRS" in report.problems_for(frames[1] / "vel.geo.tif")[0]["message"]


def test_velocity_in_m_per_yr_is_a_warning(real_data, tmp_path):
    src = real_data / "naf_licsbas_4frames" / "014A_04939_131313"
    shutil.copytree(src, tmp_path / src.name)
    _rewrite(tmp_path / src.name / "vel.geo.tif", scale=1e-3)  # mm/yr → m/yr
    report = check_inputs(tmp_path)
    assert report.ok  # a single frame needs no overlap; small values are only suspicious
    (w,) = report.warnings
    assert w["field"] == "los_velocity" and "m/yr" in w["message"]


def test_holdout_station_in_training_file(scenario, tmp_path):
    root = _copy_scenario(scenario, tmp_path)
    hold = root / "gnss_holdout.csv"
    train_row = (root / "gnss.csv").read_text().splitlines()[1]
    hold.write_text(hold.read_text() + train_row + "\n")
    report = check_inputs(root / "frames", root / "gnss.csv", hold)
    (err,) = report.errors
    assert Path(err["file"]) == hold and train_row.split(",")[0] in err["message"]


def test_cube_dates_out_of_order_and_isolated_frame(real_data, tmp_path):
    naf = real_data / "naf_licsbas_4frames"
    for name in ("014A_04939_131313", "094D_04913_101213"):
        shutil.copytree(naf / name, tmp_path / name)
    # A third frame moved 20° east: it overlaps nothing.
    moved = tmp_path / "999A_00000_000000"
    shutil.copytree(naf / "087A_04904_121313", moved)
    for tif in moved.glob("*.tif"):
        with rasterio.open(tif, "r+") as dst:
            t = dst.transform
            dst.transform = rasterio.Affine(t.a, t.b, t.c + 20.0, t.d, t.e, t.f)
    cube = tmp_path / "014A_04939_131313" / "cum.h5"
    with h5py.File(cube, "w") as h5:
        h5["cum"] = np.zeros((3, 4, 5), np.float32)
        h5["imdates"] = np.array([20200101, 20200125, 20200113])
        for k, v in (("corner_lat", 41.0), ("corner_lon", 34.0), ("post_lat", -0.01), ("post_lon", 0.01)):
            h5[k] = v
    report = check_inputs(tmp_path)
    (err,) = report.errors
    assert Path(err["file"]) == cube and "out of order" in err["message"] and err["field"] == "imdates"
    (warn,) = report.warnings
    assert Path(warn["file"]).name == moved.name and warn["field"] == "footprint"


def test_station_with_swapped_lon_lat_and_no_station_inside(scenario, tmp_path):
    root = _copy_scenario(scenario, tmp_path)
    gnss = root / "gnss.csv"
    gnss.write_text("station,lon,lat,ve,vn,vu,se,sn,su\nSWAP,38.0,116.0,1,1,0,0.5,0.5,1\n")
    report = check_inputs(root / "frames", gnss)
    # The reader rejects the latitude; the lenient pass still places the station and spots the swap.
    lat_err, where = report.errors
    assert lat_err["field"] == "lat" and "swapped" in lat_err["fix"]
    assert where["field"] == "lon/lat" and "No GNSS station" in where["message"] and "SWAP" in where["message"]
    assert "swapped" in where["message"]


def test_missing_folder_and_report_rendering(tmp_path):
    report = check_inputs(tmp_path / "nope", tmp_path / "missing.csv")
    assert len(report.errors) == 2
    assert {Path(p["file"]).name for p in report.errors} == {"nope", "missing.csv"}
    table = report.to_table()
    assert table.row_count == 2
    with pytest.raises(Exception) as info:
        report.raise_if_errors()
    assert "and 1 more" in str(info.value)
    assert isinstance(report, CheckReport) and report.to_dict()["n_errors"] == 2


def test_gnss_row_with_one_field_too_many_is_reported_not_misread(tmp_path):
    """The checks read the GNSS table leniently too, never with its first column as the index: a row with one
    field too many is reported as the reader refuses it, with no station named after a longitude."""
    frames = tmp_path / "frames"
    frames.mkdir()
    gnss = tmp_path / "gnss.csv"
    gnss.write_text("station,lon,lat,ve,vn,vu,se,sn,su\nA001,116.0,38.0,30.0,-8.0,-5.0,0.4,0.4,1.2\n"
                    "A002,116.1,38.1,30.0,-8.0,-5.0,0.4,0.4,1.2,7\n")
    report = check_inputs(frames, gnss)
    text = " ".join(p["message"] for p in report.problems)
    assert not report.ok and "line 3" in text and "116.0" not in text


def test_every_deforming_frame_in_m_per_yr_is_flagged(scenario, tmp_path):
    """The scenario's frames have median |LOS velocity| of 5-60 mm/yr; stored in m/yr (0.005-0.06) every one of
    them is flagged, not only those below 0.01."""
    root = _copy_scenario(scenario, tmp_path)
    frames = sorted(p for p in (root / "frames").iterdir() if p.is_dir())
    for f in frames:
        _rewrite(f / f"{f.name}.vel.geo.tif", scale=1e-3)
    report = check_inputs(root / "frames")
    flagged = {Path(w["file"]).parent.name for w in report.warnings if "m/yr" in w["message"]}
    assert flagged == {f.name for f in frames}


def test_cube_off_the_frames_grid_is_reported(real_data, tmp_path):
    """A cum.h5 with its dates in order but 4 x 5 pixels next to a larger velocity: an error naming the cube's
    grid, found before the run's time-series stage would refuse it."""
    naf = real_data / "naf_licsbas_4frames"
    shutil.copytree(naf / "014A_04939_131313", tmp_path / "014A_04939_131313")
    cube = tmp_path / "014A_04939_131313" / "cum.h5"
    with h5py.File(cube, "w") as h5:
        h5["cum"] = np.zeros((3, 4, 5), np.float32)
        h5["imdates"] = np.array([20200101, 20200113, 20200125])
        for k, v in (("corner_lat", 41.0), ("corner_lon", 34.0), ("post_lat", -0.01), ("post_lon", 0.01)):
            h5[k] = v
    report = check_inputs(tmp_path)
    (err,) = report.errors
    assert Path(err["file"]) == cube and err["field"] == "grid" and "4 x 5 pixels" in err["message"]


def test_zeros_for_no_data_and_sigmas_of_zero_are_warned(real_data, tmp_path):
    """A velocity whose no-data is an undeclared 0 over a tenth of the frame, and a sigma raster of zeros there:
    two warnings (the reader cannot tell a 0 from a measurement; the run would weight those pixels as exact)."""
    src = real_data / "naf_licsbas_4frames" / "014A_04939_131313"
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for name in ("vel.geo.tif", "vstd.geo.tif"):
        path = next(dst.glob(f"*{name}"))
        with rasterio.open(path) as ds:
            profile, data = ds.profile, ds.read()
        rows = data.shape[1] // 10
        data[:, :rows] = 0.0
        with rasterio.open(path, "w", **profile) as out:
            out.write(data)
    report = check_inputs(tmp_path)
    fields = sorted(w["field"] for w in report.warnings)
    assert fields == ["los_std", "los_velocity"], report.format_text()
    zero = next(w for w in report.warnings if w["field"] == "los_velocity")
    assert "exactly 0" in zero["message"] and "-a_nodata 0" in zero["fix"]
    clean = check_inputs(real_data / "naf_licsbas_4frames")
    assert not [w for w in clean.warnings if w["field"] in ("los_std", "los_velocity")]
