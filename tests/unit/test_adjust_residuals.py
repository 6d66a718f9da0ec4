"""InSAR − GNSS residuals at stations, frame coordinates, and the bad-input behaviour of adjust_frame."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from gpu_insar_adjust.adjust import adjust_frame, local_xy_km, merge_colocated, station_residuals
from gpu_insar_adjust.adjust.frame import AdjustConfig
from gpu_insar_adjust.errors import AdjustmentError, GiaError, GnssError


def make_frame(ny=60, nx=80, step=0.02, lon0=115.0, lat_top=39.0, surface=None, noise=0.0, seed=0, dem=True):
    """Small EPSG:4326 frame: los_velocity = surface(x_km, y_km, dem) (+ noise), mm/yr."""
    rng = np.random.default_rng(seed)
    lat = lat_top - step * (np.arange(ny) + 0.5)
    lon = lon0 + step * (np.arange(nx) + 0.5)
    LON, LAT = np.meshgrid(lon, lat)
    x, y = local_xy_km(LON, LAT, float(lon.mean()), float(lat.mean()))
    h = 500.0 + 8.0 * (x - x.min()) + 300.0 * np.sin(y / 20.0)
    v = np.zeros_like(x) if surface is None else surface(x, y, h)
    v = v + rng.normal(0.0, noise, v.shape) if noise else v
    ds = xr.Dataset(
        {"los_velocity": (("y", "x"), v.astype(np.float32)),
         "los_std": (("y", "x"), np.full(v.shape, 0.5, np.float32)),
         "los_u": (("y", "x"), np.full(v.shape, 0.78, np.float32))},
        coords={"y": lat, "x": lon}, attrs={"frame_id": "000A_00000_000000", "source": "synthetic"})
    if dem:
        ds["dem"] = (("y", "x"), h.astype(np.float32))
    return ds


def stations_at(frame, lonlat, gnss_los=0.0, std=0.5, names=None):
    lonlat = np.asarray(lonlat, dtype=float).reshape(-1, 2)
    n = len(lonlat)
    return pd.DataFrame({"station": names or [f"S{i:03d}" for i in range(n)], "lon": lonlat[:, 0],
                         "lat": lonlat[:, 1], "gnss_los": np.broadcast_to(gnss_los, (n,)).astype(float),
                         "gnss_los_std": np.full(n, std)})


def random_lonlat(frame, n, seed=0, margin=0.05):
    rng = np.random.default_rng(seed)
    x, y = frame["x"].values, frame["y"].values
    return np.column_stack([rng.uniform(x.min() + margin, x.max() - margin, n),
                            rng.uniform(y.min() + margin, y.max() - margin, n)])


# --------------------------------------------------------------------------------------------------------------
def test_local_xy_km_matches_geodesic_distances():
    from pyproj import Geod

    g = Geod(ellps="WGS84")
    lon0, lat0 = 115.0, 38.0
    lon = np.array([115.0, 116.2, 113.9, 115.8, 114.1])
    lat = np.array([39.0, 38.0, 37.1, 38.9, 37.2])
    x, y = local_xy_km(lon, lat, lon0, lat0)
    _, _, d = g.inv(np.full(5, lon0), np.full(5, lat0), lon, lat)
    # equirectangular on the ellipsoid: within 0.3 % of the geodesic over ~130 km
    np.testing.assert_allclose(np.hypot(x, y), d / 1000.0, rtol=3e-3)
    assert abs(x[0]) < 1e-9 and y[1] == pytest.approx(0.0, abs=0.2)


def test_local_xy_km_any_namespace(cpu_xp):
    from conftest import assert_matches_reference

    lon = np.linspace(114, 116, 7)
    lat = np.linspace(37, 39, 7)
    ref = local_xy_km(lon, lat, 115.0, 38.0)
    got = local_xy_km(cpu_xp.asarray(lon), cpu_xp.asarray(lat), 115.0, 38.0, xp=cpu_xp)
    assert_matches_reference(got[0], ref[0])
    assert_matches_reference(got[1], ref[1])


def test_window_median_is_robust_and_sized_in_metres():
    frame = make_frame(ny=200, nx=200, step=0.001, surface=lambda x, y, h: 3.0 + 0 * x)
    r, c = 100, 120
    v = frame["los_velocity"].values
    v[r, c] = 500.0  # a spike at the station pixel: the median ignores it
    v[r - 1, c - 2] = np.nan
    st = stations_at(frame, [frame["x"].values[c], frame["y"].values[r]], gnss_los=1.0, std=0.8)
    table, dropped = station_residuals(frame, st, window_m=500.0)
    assert dropped == []
    row = table.iloc[0]
    # 0.001° = 111 m north-south, 87.6 m east-west at 38.9°N → half-widths floor(250/111)=2, floor(250/87.6)=2
    assert row["n_pixels"] == 25 - 1
    assert row["insar_los"] == pytest.approx(3.0, abs=1e-6)
    assert row["residual"] == pytest.approx(2.0, abs=1e-6)
    # σ² = spread²/n + los_std² + gnss² = 0 + 0.25 + 0.64 (MAD of a constant window is 0)
    assert row["sigma"] == pytest.approx(math.sqrt(0.25 + 0.64), rel=1e-6)
    assert row["incidence_deg"] == pytest.approx(math.degrees(math.acos(0.78)), abs=1e-3)


def test_window_sigma_uses_mad_over_valid_pixels():
    rng = np.random.default_rng(3)
    frame = make_frame(ny=200, nx=200, step=0.001)
    v = rng.normal(0.0, 2.0, (200, 200)).astype(np.float32)
    frame["los_velocity"].values[:] = v
    frame = frame.drop_vars("los_std")
    st = stations_at(frame, [frame["x"].values[50], frame["y"].values[60]], std=0.0)
    table, _ = station_residuals(frame, st, window_m=2000.0)
    win = v[60 - 9:60 + 10, 50 - 11:50 + 12].astype(float)
    med = np.median(win)
    mad = 1.4826 * np.median(np.abs(win - med))
    assert table["n_pixels"].iloc[0] == win.size
    assert table["insar_los"].iloc[0] == pytest.approx(med, abs=1e-6)
    assert table["insar_los_sigma"].iloc[0] == pytest.approx(mad / math.sqrt(win.size), rel=1e-6)


def test_stations_dropped_with_reasons():
    frame = make_frame(ny=100, nx=100, step=0.001)
    v = frame["los_velocity"].values
    v[10:30, 10:30] = np.nan
    x, y = frame["x"].values, frame["y"].values
    st = stations_at(frame, [[x[20], y[20]], [x[80], y[80]], [x[50], y[50]], [x[60], y[40]], [x[0] - 1, y[0]]],
                     names=["HOLE", "GOOD", "NOLOS", "HORZ", "AWAY"])
    st.loc[2, "gnss_los"] = np.nan
    st["horizontal_only"] = [False, False, False, True, False]
    table, dropped = station_residuals(frame, st)
    assert table["station"].tolist() == ["GOOD"]
    reasons = {d["station"]: d["reason"] for d in dropped}
    assert reasons["HOLE"].startswith("window mostly invalid (0/25")
    assert reasons["NOLOS"] == "no GNSS LOS velocity"
    assert reasons["HORZ"].startswith("horizontal-only")
    assert reasons["AWAY"] == "outside the frame"


def test_bad_station_tables_raise():
    frame = make_frame()
    st = stations_at(frame, random_lonlat(frame, 3), names=["A", "A", "B"])
    with pytest.raises(GnssError, match="more than once"):
        station_residuals(frame, st)
    with pytest.raises(GnssError, match="gnss_los_std"):
        station_residuals(frame, st.drop(columns="gnss_los_std").drop_duplicates("station"))


def test_merge_colocated_weighted_mean():
    t = pd.DataFrame({"station": ["A", "B", "C"], "lon": [1.0, 1.0, 2.0], "lat": [1.0, 1.0, 2.0],
                      "x_km": [0.0, 0.0, 10.0], "y_km": [0.0, 0.0, 0.0], "height_m": [1.0, 1.0, 1.0],
                      "incidence_deg": [39.0] * 3, "insar_los": [0.0] * 3, "gnss_los": [0.0] * 3,
                      "residual": [1.0, 4.0, 7.0], "sigma": [1.0, 2.0, 1.0], "weight": [1.0, 0.25, 1.0]})
    m, merged = merge_colocated(t)
    assert len(m) == 2 and merged == [{"stations": ["A", "B"], "merged_into": "A+B"}]
    row = m[m["station"] == "A+B"].iloc[0]
    assert row["residual"] == pytest.approx((1.0 + 0.25 * 4.0) / 1.25)
    assert row["sigma"] == pytest.approx(1.0 / math.sqrt(1.25))


# ---- bad input to adjust_frame ------------------------------------------------------------------------------
def test_frame_without_stations_raises():
    frame = make_frame()
    empty = stations_at(frame, np.zeros((0, 2)))
    with pytest.raises(AdjustmentError, match="no usable GNSS station") as e:
        adjust_frame(frame, empty)
    assert e.value.fix and e.value.field == "stations"


def test_all_nan_residuals_raise():
    frame = make_frame()
    frame["los_velocity"].values[:] = np.nan
    st = stations_at(frame, random_lonlat(frame, 12))
    with pytest.raises(GiaError, match="window mostly invalid"):
        adjust_frame(frame, st)


def test_duplicate_coordinates_are_merged_not_nan():
    frame = make_frame(surface=lambda x, y, h: 2.0 + 0.05 * x)
    ll = random_lonlat(frame, 12, seed=1)
    ll = np.vstack([ll, ll[:2]])  # two co-located second monuments
    st = stations_at(frame, ll)
    out = adjust_frame(frame, st, AdjustConfig(candidates=["poly0", "poly1", "tps", "gp"]))
    assert len(out.report["merged"]) == 2 and out.report["n_stations_used"] == 12
    c = out.correction.values
    assert np.all(np.isfinite(c))
    # the planted ramp is recovered to 0.05 mm/yr (noise-free residuals)
    np.testing.assert_allclose(c, frame["los_velocity"].values, atol=0.05)


def test_collinear_stations_fall_back_to_offset():
    frame = make_frame(surface=lambda x, y, h: 2.0 + 0.05 * x + 0.02 * y)
    x, y = frame["x"].values, frame["y"].values
    ll = np.column_stack([np.linspace(x[5], x[70], 9), np.full(9, y[30])])  # one east-west line
    out = adjust_frame(frame, stations_at(frame, ll), AdjustConfig(candidates=["poly0", "poly1", "poly2"]))
    rep = out.report
    assert rep["candidates"]["poly1"]["skipped"].startswith("not determined")
    assert "collinear" in rep["candidates"]["poly1"]["skipped"]
    assert rep["chosen"] == "poly0"
    c = out.correction.values
    assert np.all(np.isfinite(c)) and float(np.ptp(c)) == 0.0
    # the offset is the mean residual along the line
    assert c[0, 0] == pytest.approx(float(np.mean(out.residuals["residual"])), abs=1e-4)


def test_single_station_uses_documented_fallback():
    frame = make_frame(surface=lambda x, y, h: 4.0 + 0 * x)
    out = adjust_frame(frame, stations_at(frame, random_lonlat(frame, 1), gnss_los=1.0))
    assert out.report["chosen"] == "poly0" and "fell back" in out.report["fallback"]
    np.testing.assert_allclose(out.correction.values, 3.0, atol=1e-5)
