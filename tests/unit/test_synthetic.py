"""The embedded North China Plain scenario: geometry, planted errors, GNSS, truth and the LiCSBAS layout."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pandas as pd
import pytest
import rasterio

from gpu_insar_adjust import synthetic
from gpu_insar_adjust.errors import ConfigError
from gpu_insar_adjust.synthetic import make_scenario

RES = 0.05


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    return make_scenario(tmp_path_factory.mktemp("ncp") / "out", seed=0, resolution=RES)


@pytest.fixture(scope="module")
def record(scen):
    return json.loads(scen.scenario_json.read_text())


@pytest.fixture(scope="module")
def scen_fine(tmp_path_factory):
    """0.02° (about 2 km) for the geometric measurements that need finer pixels."""
    return make_scenario(tmp_path_factory.mktemp("ncp_fine") / "out", seed=3, resolution=0.02)


@pytest.fixture(scope="module")
def scen_ts(tmp_path_factory):
    return make_scenario(tmp_path_factory.mktemp("ncp_ts") / "out", seed=1, resolution=0.1, timeseries=True,
                         epoch_days=24)


def _read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.transform, src.crs


def _frame_files(fdir):
    fid = fdir.name
    return {"vel": fdir / f"{fid}.vel.geo.tif", "vstd": fdir / "vstd.geo.tif", "E": fdir / "E.geo.tif",
            "N": fdir / "N.geo.tif", "U": fdir / "U.geo.tif", "hgt": fdir / "hgt.geo.tif",
            "mask": fdir / "mask.geo.tif"}


def _pixel_centres(transform, shape):
    lon = transform.c + (np.arange(shape[1]) + 0.5) * transform.a
    lat = transform.f + (np.arange(shape[0]) + 0.5) * transform.e
    return np.meshgrid(lon, lat)


def _load_frame(fdir):
    return {k: _read(p) for k, p in _frame_files(fdir).items()}


def _all_stations(scen):
    return pd.concat([pd.read_csv(scen.gnss_csv), pd.read_csv(scen.holdout_csv)], ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
def test_layout_files_and_frame_ids(scen, record):
    ids = scen.frame_ids
    assert len(ids) == 18
    assert sum(i[3] == "A" for i in ids) == 9 and sum(i[3] == "D" for i in ids) == 9
    for fdir in scen.frame_dirs:
        assert fdir.parent == scen.frames_dir
        parts = fdir.name.split("_")
        assert len(parts) == 3 and len(parts[0]) == 4 and parts[0][3] in "AD" and len(parts[1]) == 5
        files = _frame_files(fdir)
        shapes = set()
        for name, p in files.items():
            with rasterio.open(p) as src:
                assert src.crs.to_epsg() == 4326 and src.dtypes[0] == "float32" and math.isnan(src.nodata)
                assert src.profile["tiled"]
                assert src.res == pytest.approx((RES, RES))
                shapes.add(src.shape)
        assert len(shapes) == 1
        assert list(shapes.pop()) == record["frames"][fdir.name]["shape"]
    kinds = [f["error_kind"] for f in record["frames"].values()]
    assert set(kinds) == set(synthetic.ERROR_KINDS)  # every kind planted, several frames each
    assert min(kinds.count(k) for k in synthetic.ERROR_KINDS) >= 3


def test_deterministic_for_a_seed(scen, tmp_path):
    again = make_scenario(tmp_path / "again", seed=0, resolution=RES)
    other = make_scenario(tmp_path / "other", seed=1, resolution=RES)
    for fdir, fdir2, fdir3 in zip(scen.frame_dirs, again.frame_dirs, other.frame_dirs):
        a, b, c = (_read(_frame_files(d)["vel"])[0] for d in (fdir, fdir2, fdir3))
        np.testing.assert_array_equal(a, b)
        assert np.nanmax(np.abs(a - c)) > 1.0
    assert scen.gnss_csv.read_text() == again.gnss_csv.read_text()
    assert scen.holdout_csv.read_text() == again.holdout_csv.read_text()
    assert scen.gnss_csv.read_text() != other.gnss_csv.read_text()
    np.testing.assert_array_equal(_read(scen.truth_vertical)[0], _read(again.truth_vertical)[0])
    # geography and truth do not depend on the seed
    np.testing.assert_array_equal(_read(scen.truth_vertical)[0], _read(other.truth_vertical)[0])


def _track_masks(scen, orbit):
    """Union footprint (finite unit vector) of every track on the common 0.02° grid."""
    ny, nx = synthetic._grid_shape(0.02)
    tracks = {}
    for fdir in scen.frame_dirs:
        if fdir.name[3] != orbit:
            continue
        e, tr, _ = _read(fdir / "E.geo.tif")
        r0 = int(round((synthetic.AREA[3] - tr.f) / 0.02))
        c0 = int(round((tr.c - synthetic.AREA[0]) / 0.02))
        m = tracks.setdefault(fdir.name[:4], np.zeros((ny, nx), bool))
        m[r0:r0 + e.shape[0], c0:c0 + e.shape[1]] |= np.isfinite(e)
    return tracks


def test_adjacent_tracks_overlap_60_to_70_km(scen_fine, record):
    lat = synthetic.AREA[3] - (np.arange(synthetic._grid_shape(0.02)[0]) + 0.5) * 0.02
    for orbit, heading in (("A", -12.5), ("D", -167.5)):
        tracks = _track_masks(scen_fine, orbit)
        # order the tracks west → east by the mean column of their footprint
        names = sorted(tracks, key=lambda k: np.nonzero(tracks[k])[1].mean())
        assert len(names) == 3
        for a, b in zip(names[:-1], names[1:]):
            both = tracks[a] & tracks[b]
            widths = []
            for r in np.flatnonzero(both.any(axis=1)):
                cols = np.flatnonzero(both[r])
                if cols[0] == 0 or cols[-1] == both.shape[1] - 1:
                    continue  # clipped by the area's edge
                km_per_px = 0.02 * 111.32 * math.cos(math.radians(lat[r]))
                widths.append(cols.size * km_per_px * math.cos(math.radians(abs(heading) % 180 if orbit == "A"
                                                                             else 180 - abs(heading))))
            assert len(widths) > 50
            assert 60.0 <= np.median(widths) <= 70.0, (orbit, a, b, np.median(widths))


def test_frames_along_track_overlap_about_20_km(scen_fine):
    ny, nx = synthetic._grid_shape(0.02)
    frames = {}
    for fdir in scen_fine.frame_dirs:
        e, tr, _ = _read(fdir / "E.geo.tif")
        m = np.zeros((ny, nx), bool)
        r0 = int(round((synthetic.AREA[3] - tr.f) / 0.02))
        c0 = int(round((tr.c - synthetic.AREA[0]) / 0.02))
        m[r0:r0 + e.shape[0], c0:c0 + e.shape[1]] = np.isfinite(e)
        frames[fdir.name] = m
    measured = []
    for name, m in frames.items():
        track, burst = name[:4], int(name[5:10])
        nxt = f"{track}_{burst + 180:05d}_131313"
        if nxt not in frames:
            continue
        both = m & frames[nxt]
        lengths = []
        for c in np.flatnonzero(both.any(axis=0)):
            rows = np.flatnonzero(both[:, c])
            if rows[0] == 0 or rows[-1] == ny - 1:
                continue
            lengths.append(rows.size * 0.02 * 111.0 * math.cos(math.radians(12.5)))
        if len(lengths) > 20:
            measured.append(np.median(lengths))
    assert len(measured) >= 6
    assert 17.0 <= np.median(measured) <= 23.0, measured


def test_unit_vectors_mid_range(scen):
    for fdir in scen.frame_dirs:
        e, n, u = (_read(fdir / f"{c}.geo.tif")[0] for c in "ENU")
        norm = np.sqrt(e ** 2 + n ** 2 + u ** 2)
        np.testing.assert_allclose(norm[np.isfinite(norm)], 1.0, atol=1e-6)
        # mid-range: incidence within 1° of the swath centre (about 38.25°)
        inc = np.degrees(np.arccos(u))
        mid = np.abs(inc - 38.25) < 1.0
        assert mid.sum() > 20
        if fdir.name[3] == "A":
            assert np.mean(e[mid]) == pytest.approx(-0.6, abs=0.03)
        else:
            assert np.mean(e[mid]) == pytest.approx(0.6, abs=0.03)
        assert np.mean(n[mid]) == pytest.approx(-0.13, abs=0.02)
        assert np.mean(u[mid]) == pytest.approx(0.78, abs=0.02)
        # incidence spans the IW swath; near range on the west for ascending (looks east), east for descending
        assert np.nanmin(inc) == pytest.approx(30.5, abs=1.0) or np.nanmax(inc) == pytest.approx(46.0, abs=1.0)
        lon, _ = _pixel_centres(_read(fdir / "U.geo.tif")[1], u.shape)
        r = np.corrcoef(lon[np.isfinite(inc)], inc[np.isfinite(inc)])[0, 1]
        assert (r > 0.9) if fdir.name[3] == "A" else (r < -0.9)


def test_before_adjustment_rmse_in_reported_range(scen, record):
    """Recompute each frame's RMSE from the files alone: inside 3.8-17.5 mm/yr, the NCP's reported range."""
    st = _all_stations(scen)
    st = st[~st["station"].isin(record["stations"]["unstable"])]
    for fdir in scen.frame_dirs:
        f = _load_frame(fdir)
        vel, tr, _ = f["vel"]
        rows = np.floor((tr.f - st["lat"].to_numpy()) / RES).astype(int)
        cols = np.floor((st["lon"].to_numpy() - tr.c) / RES).astype(int)
        inside = (rows >= 0) & (rows < vel.shape[0]) & (cols >= 0) & (cols < vel.shape[1])
        rows, cols, s = rows[inside], cols[inside], st[inside]
        v = vel[rows, cols]
        ok = np.isfinite(v) & (f["mask"][0][rows, cols] == 1)
        gl = (f["E"][0][rows, cols] * s["ve"] + f["N"][0][rows, cols] * s["vn"] + f["U"][0][rows, cols] * s["vu"])
        d = (v - gl.to_numpy())[ok]
        rmse = float(np.sqrt(np.mean((d - np.median(d)) ** 2)))
        rec = record["frames"][fdir.name]
        assert d.size == rec["n_stations_rmse"] >= 8
        assert rmse == pytest.approx(rec["rmse_before_mm_per_yr"], abs=1e-3)
        assert 3.8 + 0.5 <= rmse <= 17.5 - 2.0, (fdir.name, rmse)


def test_los_is_truth_plus_planted_error_plus_noise(scen, record):
    """vel - LOS(truth, ITRF) - planted error = pixel noise + troposphere (≈1.9 mm/yr) on usable pixels."""
    ve, tr_t, _ = _read(scen.truth_east)
    vn = _read(scen.truth_north)[0]
    vu = _read(scen.truth_vertical)[0]
    for fdir in scen.frame_dirs:
        f = _load_frame(fdir)
        vel, tr, _ = f["vel"]
        r0 = int(round((tr_t.f - tr.f) / RES))
        c0 = int(round((tr.c - tr_t.c) / RES))
        sl = (slice(r0, r0 + vel.shape[0]), slice(c0, c0 + vel.shape[1]))
        los = f["E"][0] * ve[sl] + f["N"][0] * vn[sl] + f["U"][0] * vu[sl]
        lon, lat = _pixel_centres(tr, vel.shape)
        planted = synthetic.planted_error(record["frames"][fdir.name], lon, lat, f["hgt"][0])
        res = (vel - los - planted)[f["mask"][0] == 1]
        assert res.size > 200
        assert abs(np.median(res)) < 0.8, fdir.name  # the residual troposphere is correlated over 10s of km
        robust_sd = 1.4826 * np.median(np.abs(res - np.median(res)))
        # white noise 1.5 mm/yr at 100 m, multilooked to RES (÷ RES/0.001), plus ~1 mm/yr of troposphere
        white = synthetic.PIXEL_SIGMA_100M / max(RES / synthetic.REFERENCE_PIXEL_DEG, 1.0)
        expect = np.hypot(white, 1.0)
        assert 0.6 * expect < robust_sd < 1.6 * expect, (fdir.name, robust_sd, expect)
        # the planted error is real: without it the residual is far larger
        assert np.std((vel - los)[f["mask"][0] == 1]) > 1.5 * robust_sd
        # vstd describes the pixel noise only (like LiCSBAS's), never the long-wavelength error
        assert 0.8 * white < np.nanmedian(f["vstd"][0]) < 1.8 * white
        # NaN (no data) exactly where the mask is NaN; mask 0 pixels keep a (corrupted) velocity
        np.testing.assert_array_equal(np.isnan(vel), np.isnan(f["mask"][0]))
        assert np.isin(f["mask"][0][np.isfinite(f["mask"][0])], (0.0, 1.0)).all()


def test_errors_differ_between_frames_and_offsets_are_large(record):
    offs = [abs(f["error_parameters"]["offset"]) for f in record["frames"].values()]
    assert min(offs) >= 10.0 and max(offs) <= 40.0
    for f in record["frames"].values():
        p = f["error_parameters"]
        if f["error_kind"] == "dem":
            assert 1.5 <= abs(p["dem_mm_per_yr_per_km"]) <= 9.6
        if f["error_kind"] == "iono":
            assert "plane" not in p and 50 <= min(p["iono"]["wavelength_km"])
            assert max(p["iono"]["wavelength_km"]) <= 150
        if f["error_kind"] == "ramp":
            assert set(p) == {"offset", "scale", "plane", "plane_boost"}


def test_gnss_files(scen, record):
    train, hold = pd.read_csv(scen.gnss_csv), pd.read_csv(scen.holdout_csv)
    assert list(train.columns) == ["station", "lon", "lat", "ve", "vn", "vu", "se", "sn", "su"]
    assert list(hold.columns) == list(train.columns)
    assert len(train) + len(hold) == 150
    assert len(hold) == 45
    assert not set(train["station"]) & set(hold["station"])
    assert sorted(hold["station"]) == sorted(record["stations"]["holdout"])
    unstable = record["stations"]["unstable"]
    assert 3 <= len(unstable) <= 5 and set(unstable) <= set(train["station"])
    truth = pd.read_csv(scen.truth_gnss_csv).set_index("station")
    all_st = pd.concat([train, hold]).set_index("station")
    err = all_st[["ve", "vn", "vu"]] - truth.loc[all_st.index, ["ve", "vn", "vu"]]
    stable = ~all_st.index.isin(list(unstable))
    # noise at the stated sigmas (≈0.4/0.4/1.2 mm/yr)
    z = err[stable] / all_st.loc[stable, ["se", "sn", "su"]].to_numpy()
    assert np.all(np.abs(z.std() - 1.0) < 0.2)
    assert all_st.loc[stable, "se"].median() == pytest.approx(0.4, rel=0.25)
    assert all_st.loc[stable, "su"].median() == pytest.approx(1.2, rel=0.25)
    for name, bias in unstable.items():
        assert 8.0 <= abs(bias) <= 15.0
        assert err.loc[name, "vu"] == pytest.approx(bias, abs=5 * all_st.loc[name, "su"])
    # ITRF2014: Eurasia plate motion dominates the horizontal
    assert all_st["ve"].median() == pytest.approx(27.0, abs=3.0)
    assert all_st["vn"].median() == pytest.approx(-9.5, abs=3.0)
    # clustered at cities: Beijing has many stations within 40 km
    d = np.hypot((all_st["lon"] - 116.40) * math.cos(math.radians(39.9)), all_st["lat"] - 39.90) * 111
    assert (d < 40).sum() >= 10
    assert not synthetic.is_sea(all_st["lon"], all_st["lat"]).any()


def test_truth_grid(scen, record):
    vu, tr, crs = _read(scen.truth_vertical)
    ny, nx = synthetic._grid_shape(RES)
    assert vu.shape == (ny, nx) == (110, 120) and crs.to_epsg() == 4326
    assert (tr.c, tr.f, tr.a) == pytest.approx((113.5, 40.5, RES))
    for p in (scen.truth_east, scen.truth_north, scen.truth_height):
        a = _read(p)[0]
        assert a.shape == vu.shape
    lon, lat = _pixel_centres(tr, vu.shape)
    sea = synthetic.is_sea(lon, lat)
    assert 0.03 < sea.mean() < 0.15
    assert np.isnan(vu[sea]).all() and np.isfinite(vu[~sea]).all()
    h = _read(scen.truth_height)[0]
    # Taihang (west), Yan (north) hills, low plain
    assert np.nanmax(h[:, lon[0] < 114.0]) > 1500
    assert np.nanmax(h[lat[:, 0] > 40.3]) > 1000
    plain = (lon > 115.5) & (lon < 117.5) & (lat > 37.0) & (lat < 39.2) & ~sea
    assert np.nanmax(h[plain]) <= 100.5 and np.nanmin(h[plain]) >= 0
    # hills: no regional sinking
    hills = (h > 800) & ~sea
    assert abs(np.nanmedian(vu[hills])) < 1.0
    t = record["truth"]
    assert t["subsidence_area_km2"] > 20_000
    # the reported area is the true ellipsoidal area of the pixels sinking faster than 20 mm/yr
    from pyproj import Geod

    g = Geod(ellps="WGS84")
    rows = np.flatnonzero((vu < -20).any(axis=1))
    area = 0.0
    for r in rows:
        la = lat[r, 0]
        cell = abs(g.polygon_area_perimeter([113.5, 113.5 + RES, 113.5 + RES, 113.5],
                                            [la - RES / 2, la - RES / 2, la + RES / 2, la + RES / 2])[0])
        area += cell * np.sum(vu[r] < -20)
    assert t["subsidence_area_km2"] == pytest.approx(area / 1e6, rel=1e-6)


@pytest.mark.parametrize("bowl", synthetic.BOWLS, ids=lambda b: b["name"])
def test_bowls_at_named_places(bowl):
    """Each funnel has its planted rate at its centre (plus the slow background and neighbours' flanks)."""
    ve, vn, vu = synthetic.truth_velocity(bowl["lon"], bowl["lat"])
    (_, _, background), (_, _, funnels) = synthetic._truth_parts(bowl["lon"], bowl["lat"])
    assert -8.5 <= float(background) <= -1.5
    assert bowl["rate"] - 10.0 <= float(funnels) <= bowl["rate"]  # its own peak + neighbours' flanks
    assert float(vu) == pytest.approx(float(background + funnels))
    # 30 km away along the minor axis the funnel has largely faded
    az = math.radians(bowl["azimuth_deg"] + 90.0)
    dlon = 30.0 * math.sin(az) / (111.32 * math.cos(math.radians(bowl["lat"])))
    dlat = 30.0 * math.cos(az) / 111.32
    far = float(synthetic.truth_velocity(bowl["lon"] + dlon, bowl["lat"] + dlat)[2])
    assert far > 0.5 * float(vu)


def test_inward_horizontal_motion_and_plate():
    b = synthetic.BOWLS[4]  # Cangzhou, -80 mm/yr
    assert b["name"] == "Cangzhou"
    plate = synthetic._plate_interpolator()
    pts = np.array([[b["lat"], b["lon"] + 0.25]])  # ~22 km east of the centre
    ve, vn, vu = synthetic.truth_velocity(b["lon"] + 0.25, b["lat"])
    ve_plate = float(plate[0](pts)[0])
    # east of the funnel: moves west (toward the centre) relative to the plate + strain field
    (se, sn, su), (be, bn, bu) = synthetic._truth_parts(b["lon"] + 0.25, b["lat"])
    assert float(be) < -1.0 and float(be) > -0.25 * abs(b["rate"])
    assert float(ve) == pytest.approx(ve_plate + float(se - ve_plate) + float(be))
    assert 25.0 < ve_plate < 29.0


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ConfigError) as err:
        make_scenario(tmp_path / "x", resolution=1.0)
    assert err.value.field == "resolution" and err.value.fix
    with pytest.raises(ConfigError) as err:
        make_scenario(tmp_path / "x", seed=-1)
    assert err.value.field == "seed"
    with pytest.raises(ConfigError) as err:
        make_scenario(tmp_path / "x", holdout_fraction=0.95)
    assert err.value.field == "holdout_fraction"


# ----------------------------------------------------------------------------------------------------------------
# time series
# ----------------------------------------------------------------------------------------------------------------
def test_cube_trend_matches_velocity_and_licsbas_layout(scen_ts):
    import h5py

    assert len(scen_ts.cubes) == len(scen_ts.frame_dirs) == 18
    for cube in scen_ts.cubes[:6]:
        fdir = cube.parent
        vel, tr, _ = _read(_frame_files(fdir)["vel"])
        with h5py.File(cube) as f:
            cum = f["cum"][()]
            imdates = f["imdates"][()]
            corner_lat, corner_lon = float(f["corner_lat"][()]), float(f["corner_lon"][()])
            post_lat, post_lon = float(f["post_lat"][()]), float(f["post_lon"][()])
            np.testing.assert_array_equal(f["vel"][()], vel)
        assert cum.dtype == np.float32 and cum.shape[1:] == vel.shape
        # LiCSBAS grid registration: corner = centre of the upper-left pixel, post_lat negative
        assert corner_lat == pytest.approx(tr.f + tr.e / 2) and corner_lon == pytest.approx(tr.c + tr.a / 2)
        assert post_lat == pytest.approx(-0.1) and post_lon == pytest.approx(0.1)
        dates = [dt.datetime.strptime(str(d), "%Y%m%d") for d in imdates]
        assert dates[0] == dt.datetime(2014, 10, 11) and dates[-1] <= dt.datetime(2022, 12, 31)
        assert {(b - a).days for a, b in zip(dates[:-1], dates[1:])} == {24}
        assert np.nanmax(np.abs(cum[0])) == 0.0  # referenced to the first epoch
        np.testing.assert_array_equal(np.isnan(cum[-1]), np.isnan(vel))
        t = np.array([(d - dates[0]).days / 365.25 for d in dates])
        tc = t - t.mean()
        slope = np.tensordot(tc, cum.astype(np.float64), 1) / np.sum(tc * tc)
        ok = np.isfinite(vel)
        np.testing.assert_allclose(slope[ok], vel[ok], atol=2e-3)
        # per-epoch noise is present (few mm, correlated), not just a trend
        resid = cum - slope[None] * t[:, None, None]
        assert 1.0 < np.nanstd(np.diff(resid, axis=0)) < 15.0


def test_time_truth(scen_ts):
    import xarray as xr

    rec = json.loads(scen_ts.scenario_json.read_text())["timeseries"]
    assert rec["peak_year"] == 2018
    rates = {int(k): v for k, v in rec["annual_mean_subsidence_rate_mm_per_yr"].items()}
    assert rates[2018] == pytest.approx(-38.0, abs=4.0)
    assert rates[2022] > rates[2020] > rates[2018]  # easing after the peak (less negative)
    ds = xr.open_dataset(scen_ts.truth_timeseries)
    vu = _read(scen_ts.truth_vertical)[0]
    assert ds["annual_vertical_velocity"].shape == (9, *vu.shape)
    annual = ds["annual_vertical_velocity"].values
    means = [np.mean(a[a < -20]) for a in annual]
    assert int(ds["year"].values[np.argmin(means)]) == 2018
    assert means[list(ds["year"].values).index(2018)] == pytest.approx(rates[2018], abs=1e-3)
    cum = ds["cumulative_vertical_displacement"].values
    assert np.nanmin(cum[-1]) == pytest.approx(rec["max_cumulative_subsidence_mm"])
    assert -1100 < rec["max_cumulative_subsidence_mm"] < -700
    # year-end displacement increments are the annual rates (× year length) of full years
    inc = cum[list(ds["year"].values).index(2019)] - cum[list(ds["year"].values).index(2018)]
    np.testing.assert_allclose(inc, annual[list(ds["year"].values).index(2019)] * 365 / 365.25, atol=0.02,
                               equal_nan=True)
    v = rec["vertical_displacement_volume"]
    assert v["before_2021"]["subsidence_area_m3"] < v["2021_2022"]["subsidence_area_m3"] < 0
    assert v["before_2021"]["land_m3"] < v["before_2021"]["subsidence_area_m3"]
    # held-out stations: truth displacement series whose linear trend is the long-term truth velocity
    disp = pd.read_csv(scen_ts.truth_holdout_displacement)
    truth = pd.read_csv(scen_ts.truth_gnss_csv).set_index("station")
    hold = pd.read_csv(scen_ts.holdout_csv)
    assert set(disp["station"]) == set(hold["station"])
    for name, s in list(disp.groupby("station"))[:10]:
        t = (pd.to_datetime(s["date"]) - pd.Timestamp("2014-10-11")).dt.days.to_numpy() / 365.25
        assert s["du"].iloc[0] == 0.0
        slope = np.polyfit(t, s["du"].to_numpy(), 1)[0]
        assert slope == pytest.approx(truth.loc[name, "vu"], abs=0.01)


# ----------------------------------------------------------------------------------------------------------------
# the package's readers read the scenario back exactly
# ----------------------------------------------------------------------------------------------------------------
def test_round_trip_through_readers(scen, scen_ts):
    from gpu_insar_adjust.io.frames import open_frame
    from gpu_insar_adjust.io.gnss import read_gnss
    from gpu_insar_adjust.io.timeseries import open_cube

    for fdir in scen.frame_dirs[:4] + scen.frame_dirs[-2:]:
        ds = open_frame(fdir)
        f = _load_frame(fdir)
        assert ds.attrs["frame_id"] == fdir.name
        assert ds.attrs["orbit"] == ("ascending" if fdir.name[3] == "A" else "descending")
        for var, key in (("los_velocity", "vel"), ("los_std", "vstd"), ("los_e", "E"), ("los_n", "N"),
                         ("los_u", "U"), ("dem", "hgt")):
            np.testing.assert_array_equal(ds[var].values, f[key][0])
        np.testing.assert_array_equal(ds["mask"].values, f["mask"][0] == 1)
        lon, lat = _pixel_centres(f["vel"][1], f["vel"][0].shape)
        np.testing.assert_allclose(ds["x"].values, lon[0], atol=1e-9)
        np.testing.assert_allclose(ds["y"].values, lat[:, 0], atol=1e-9)
        assert ds.rio.crs.to_epsg() == 4326
    for path in (scen.gnss_csv, scen.holdout_csv):
        st = read_gnss(path)
        raw = pd.read_csv(path)
        assert st.attrs["reference_frame"] == "ITRF2014"
        assert list(st["station"]) == list(raw["station"])
        for c in ("lon", "lat", "ve", "vn", "vu", "se", "sn", "su"):
            np.testing.assert_allclose(st[c].to_numpy(), raw[c].to_numpy(), rtol=0, atol=1e-9)
    import h5py

    cube_path = scen_ts.cubes[0]
    cube = open_cube(cube_path)
    with h5py.File(cube_path) as f:
        np.testing.assert_array_equal(cube.values, f["cum"][()])
        dates = pd.to_datetime([str(d) for d in f["imdates"][()]], format="%Y%m%d")
    np.testing.assert_array_equal(cube["time"].values, dates.values)
    vel_ds = open_frame(cube_path.parent)
    np.testing.assert_allclose(cube["x"].values, vel_ds["x"].values, atol=1e-9)
    np.testing.assert_allclose(cube["y"].values, vel_ds["y"].values, atol=1e-9)


def test_round_trip_synth_read_write_read(scen, scen_ts, tmp_path):
    """synthetic → open_frame → write_cog (LiCSAR layout) → open_frame is exact; so is a cube through NetCDF
    and Zarr."""
    import xarray as xr

    from gpu_insar_adjust.io.frames import open_frame
    from gpu_insar_adjust.io.timeseries import open_cube
    from gpu_insar_adjust.io.write import write_cog, write_netcdf, write_zarr

    src_dir = scen.frame_dirs[-1]  # a descending frame (the first ones are ascending)
    fid = src_dir.name
    first = open_frame(src_dir)
    out_dir = tmp_path / fid
    out_dir.mkdir()
    names = {"los_velocity": f"{fid}.vel.geo.tif", "los_e": f"{fid}.geo.E.tif", "los_n": f"{fid}.geo.N.tif",
             "los_u": f"{fid}.geo.U.tif", "dem": f"{fid}.geo.hgt.tif"}
    for var, name in names.items():
        write_cog(first[var], out_dir / name)
    second = open_frame(out_dir)
    assert second.attrs["frame_id"] == fid and second.attrs["orbit"] == first.attrs["orbit"] == "descending"
    for var in names:
        assert second[var].dtype == np.float32
        np.testing.assert_array_equal(second[var].values, first[var].values)  # exact, NaN pattern included
    assert np.isnan(second["los_velocity"].values).sum() == np.isnan(first["los_velocity"].values).sum()
    np.testing.assert_array_equal(second["x"].values, first["x"].values)
    np.testing.assert_array_equal(second["y"].values, first["y"].values)
    assert second.rio.crs == first.rio.crs and second.rio.transform() == first.rio.transform()
    assert "los_std" not in second and "mask" not in second  # only what was written comes back

    cube = open_cube(scen_ts.cubes[0])
    expected = cube.values
    assert expected.dtype == np.float32 and np.isnan(expected).any() and np.isfinite(expected).any()
    write_netcdf(cube, tmp_path / "cube.nc")
    write_zarr(cube, tmp_path / "cube.zarr")
    with xr.open_dataset(tmp_path / "cube.nc") as nc, xr.open_zarr(tmp_path / "cube.zarr") as zr:
        for back in (nc, zr):
            got = back["displacement"]
            assert got.dims == ("time", "y", "x") and got.dtype == np.float32
            np.testing.assert_array_equal(got.values, expected)
            for coord in ("time", "y", "x"):
                np.testing.assert_array_equal(back[coord].values, cube[coord].values)
            assert back.rio.crs.to_epsg() == 4326 and got.attrs["units"] == "mm"
