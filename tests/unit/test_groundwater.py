"""Groundwater storage loss from a planted compaction bowl: analytic Gaussian volumes, periods, uncertainty."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyproj
import pytest
import xarray as xr

from gpu_insar_adjust.analysis import groundwater_loss
from gpu_insar_adjust.errors import GiaError, InputError, TimeSeriesError

GEOD = pyproj.Geod(ellps="WGS84")
LON0, LAT0, SIGMA_M = 116.3, 38.3, 8_000.0
TIMES = pd.date_range("2018-01-01", "2023-01-01", freq="12D").values
SPLIT = np.datetime64("2021-01-01", "ns")
RATE_BEFORE, RATE_AFTER = 80.0, 40.0  # mm/yr of compaction at the bowl centre


def _years(t):
    return (np.asarray(t, "datetime64[ns]") - TIMES[0]).astype(float) / (86400e9 * 365.25)


def _amplitude(t):
    """Compaction at the centre (mm) since the first epoch: 80 mm/yr until 2021, 40 mm/yr after."""
    ty, ts = _years(t), _years(SPLIT)
    return RATE_BEFORE * np.minimum(ty, ts) + RATE_AFTER * np.maximum(ty - ts, 0.0)


@pytest.fixture(scope="module")
def cube():
    y = np.arange(LAT0 + 0.5, LAT0 - 0.5 - 1e-9, -0.01)
    x = np.arange(LON0 - 0.6, LON0 + 0.6 + 1e-9, 0.01)
    xx, yy = np.meshgrid(x, y)
    r = GEOD.inv(np.full(xx.shape, LON0), np.full(xx.shape, LAT0), xx, yy)[2]
    g = np.exp(-(r**2) / (2 * SIGMA_M**2))
    data = -_amplitude(TIMES)[:, None, None] * g[None]  # vertical displacement, positive up
    noise = np.random.default_rng(0).normal(0.0, 1.0, data.shape)
    return xr.DataArray((data + noise).astype("float32"), dims=("time", "y", "x"),
                        coords={"time": TIMES, "y": y, "x": x}, name="displacement")


def _gauss_volume_m3(amplitude_mm):
    return 2 * math.pi * SIGMA_M**2 * amplitude_mm / 1e3


def test_default_periods_split_2021_and_match_gaussian_integral(cube):
    out = groundwater_loss(cube, displacement_std_mm=1.0)
    p = out["periods"]
    # the last 12-day epoch is 2022-12-30
    assert [(q["start"], q["end"]) for q in p] == [("2018-01-01", "2021-01-01"), ("2021-01-01", "2022-12-30")]
    before = _gauss_volume_m3(_amplitude([SPLIT])[0])  # 2π σ² × 80 mm/yr × 3.0 yr ≈ 96.5 million m³
    total = _gauss_volume_m3(_amplitude([TIMES[-1]])[0])
    # 1 mm white noise summed over 12,000 pixels of ~0.97 km² is ~0.1 % of the volume
    assert abs(p[0]["loss_m3"] - before) / before < 0.01
    assert abs(out["total_loss_m3"] - total) / total < 0.01
    assert out["total_loss_m3"] == pytest.approx(p[0]["loss_m3"] + p[1]["loss_m3"], rel=1e-12)
    assert out["total_released_m3"] == out["total_loss_m3"]  # default inelastic fraction 1
    assert p[0]["coverage"] == 1.0
    assert out["assumptions"]["inelastic_fraction"] == 1.0


def test_uncertainty_fully_correlated_and_by_correlation_length(cube):
    area_m2 = groundwater_loss(cube, displacement_std_mm=0.0)["aquifer_area_km2"] * 1e6
    full = groundwater_loss(cube, displacement_std_mm=3.0, correlation_length_m=None)
    # σ_period = √2 × 3 mm at every pixel, fully correlated: Σ σ·area
    assert full["periods"][0]["loss_std_m3"] == pytest.approx(math.sqrt(2) * 3e-3 * area_m2, rel=1e-9)
    tiled = groundwater_loss(cube, displacement_std_mm=3.0, correlation_length_m=10_000.0)
    # 101 × 121 pixels of ~1.11 × 0.87 km in tiles of 9 × 11 pixels: ≈ 12 × 11 tiles → std ≈ full / √132
    ratio = tiled["periods"][0]["loss_std_m3"] / full["periods"][0]["loss_std_m3"]
    assert 1 / math.sqrt(150) < ratio < 1 / math.sqrt(110)
    # default: per-pixel residual RMS of the annual-rate fit recovers the planted 1 mm epoch noise
    est = groundwater_loss(cube, correlation_length_m=None)
    assert est["periods"][0]["loss_std_m3"] == pytest.approx(math.sqrt(2) * 1e-3 * area_m2, rel=0.05)


def test_skeletal_storage_partitions_volume_and_gives_head_decline(cube):
    base = groundwater_loss(cube, displacement_std_mm=1.0)
    out = groundwater_loss(cube, displacement_std_mm=1.0, skeletal_storage={"elastic": 5e-3, "inelastic": 45e-3})
    for q, b in zip(out["periods"], base["periods"]):
        assert q["released_m3"] == pytest.approx(b["released_m3"], rel=1e-12)
        assert q["loss_m3"] == pytest.approx(0.9 * b["released_m3"], rel=1e-12)
        assert q["elastic_m3"] == pytest.approx(0.1 * b["released_m3"], rel=1e-12)
        # Δh = compaction / (S_ke + S_kv): mean compaction (m) / 0.05
        assert q["mean_head_decline_m"] == pytest.approx(q["mean_compaction_mm"] / 1e3 / 0.05, rel=1e-12)
    half = groundwater_loss(cube, displacement_std_mm=1.0, inelastic_fraction=0.5)
    assert half["total_loss_m3"] == pytest.approx(0.5 * base["total_loss_m3"], rel=1e-12)


def test_aquifer_mask_and_explicit_periods(cube):
    def side(sel):
        m = np.broadcast_to(sel[None, :], (cube.sizes["y"], cube.sizes["x"]))
        mask = xr.DataArray(m, dims=("y", "x"), coords={"y": cube.y.values, "x": cube.x.values})
        return groundwater_loss(cube, displacement_std_mm=1.0, aquifer_mask=mask)["total_loss_m3"]

    dx = cube.x.values - LON0
    east, west, centre = side(dx > 0.005), side(dx < -0.005), side(np.abs(dx) <= 0.005)
    full = groundwater_loss(cube, displacement_std_mm=1.0)
    assert east + west + centre == pytest.approx(full["total_loss_m3"], rel=1e-9)  # masks partition the volume
    assert east / west == pytest.approx(1.0, abs=0.005)  # symmetric bowl
    # one 0.01° column holds Δx / (√(2π) σ) of a Gaussian's volume, Δx ≈ 0.01° × 111.32 km × cos φ
    column_m = 0.01 * 111.32e3 * math.cos(math.radians(LAT0))
    assert centre / full["total_loss_m3"] == pytest.approx(column_m / (math.sqrt(2 * math.pi) * SIGMA_M), rel=0.02)
    per = groundwater_loss(cube, displacement_std_mm=1.0,
                           periods=[("2018-01-01", "2019-01-01"), ("2019-01-01", "2022-12-30")])
    one_year = _gauss_volume_m3(RATE_BEFORE * 365 / 365.25)
    assert abs(per["periods"][0]["loss_m3"] - one_year) / one_year < 0.01
    assert per["total_loss_m3"] == pytest.approx(full["total_loss_m3"], rel=1e-9)


def test_bad_periods_and_masks_raise(cube):
    with pytest.raises(TimeSeriesError, match="outside the data") as exc:
        groundwater_loss(cube, periods=[("2017-01-01", "2020-01-01")], displacement_std_mm=1.0)
    assert isinstance(exc.value, GiaError) and "2018-01-01" in exc.value.fix
    shifted = xr.DataArray(np.ones((cube.sizes["y"], cube.sizes["x"]), bool), dims=("y", "x"),
                           coords={"y": cube.y.values + 0.005, "x": cube.x.values})
    with pytest.raises(InputError, match="different grid"):
        groundwater_loss(cube, aquifer_mask=shifted, displacement_std_mm=1.0)
    with pytest.raises(InputError, match="inelastic_fraction"):
        groundwater_loss(cube, inelastic_fraction=1.5, displacement_std_mm=1.0)


def test_every_period_sums_the_same_pixels_so_that_they_add_up_to_the_total(cube):
    """A pixel missing the last epoch lacks the displacement of the second period only: it is left out of both
    periods and of the total alike (before, only the second period dropped it, so the periods' sum and the
    total's sigma were over different pixels), and the coverage says so."""
    gappy = cube.copy()
    gappy[-1, 50, 60] = np.nan  # the bowl's centre, at the last epoch
    out = groundwater_loss(gappy, displacement_std_mm=1.0, correlation_length_m=None)
    full = groundwater_loss(cube, displacement_std_mm=1.0, correlation_length_m=None)
    n = gappy.sizes["y"] * gappy.sizes["x"]
    assert out["total_released_m3"] == pytest.approx(sum(p["released_m3"] for p in out["periods"]), rel=1e-12)
    # the centre compacts most: without it the first period loses about its share of the volume too
    assert out["periods"][0]["released_m3"] < full["periods"][0]["released_m3"]
    for p in out["periods"]:
        assert p["coverage"] == pytest.approx(1 - 1 / n, rel=1e-6)
    # the total's sigma is over the same pixels as its volume: one pixel's share less than the full cube's
    share = full["total_loss_std_m3"] - out["total_loss_std_m3"]
    assert 0 < share < 2 * full["total_loss_std_m3"] / n
    assert out["aquifer_area_km2"] == full["aquifer_area_km2"]  # mapped: it has the first period


def test_periods_in_any_order_separate_or_touching_and_epochs_with_a_time_of_day(cube):
    """Periods given latest first are taken in date order; periods that overlap are refused; periods that do
    not touch add their errors in quadrature (they share no bound); epochs at 10:50 work as at midnight."""
    later, earlier = ("2021-01-01", "2022-01-01"), ("2018-06-01", "2019-06-01")
    out = groundwater_loss(cube, periods=[later, earlier], displacement_std_mm=1.0)
    assert [p["start"] for p in out["periods"]] == ["2018-06-01", "2021-01-01"]
    stds = [p["loss_std_m3"] for p in out["periods"]]
    assert out["total_loss_std_m3"] == pytest.approx(math.hypot(*stds), rel=1e-12)
    touching = groundwater_loss(cube, periods=[("2018-06-01", "2019-06-01"), ("2019-06-01", "2020-06-01")],
                                displacement_std_mm=1.0)
    span = groundwater_loss(cube, periods=[("2018-06-01", "2020-06-01")], displacement_std_mm=1.0)
    assert touching["total_loss_std_m3"] == pytest.approx(span["total_loss_std_m3"], rel=1e-12)
    with pytest.raises(InputError, match="overlap"):
        groundwater_loss(cube, periods=[("2018-06-01", "2019-06-01"), ("2019-01-01", "2020-01-01")])
    shifted = cube.assign_coords(time=cube["time"].values + np.timedelta64(39, "m") + np.timedelta64(10, "h"))
    assert groundwater_loss(shifted, displacement_std_mm=1.0)["total_loss_m3"] == pytest.approx(
        groundwater_loss(cube, displacement_std_mm=1.0)["total_loss_m3"], rel=0.01)


def test_an_uncertainty_that_cannot_be_known_is_nan_and_the_fit_sigma_counts_its_parameters(cube):
    """Two epochs leave the annual-rate fit without redundancy: its sigma is unknown, so is the loss's (NaN,
    not 0). The fit's sigma is its residual standard deviation: on the planted 1 mm noise with ~150 epochs and
    6 parameters, √(n/(n−p)) ≈ 1.02 above the plain residual RMS."""
    two = cube.isel(time=[0, -1])
    out = groundwater_loss(two)
    assert np.isnan(out["total_loss_std_m3"]) and np.isnan(out["periods"][0]["loss_std_m3"])
    assert np.isfinite(out["total_loss_m3"])
    from gpu_insar_adjust.analysis.groundwater import _fit_sigma
    from gpu_insar_adjust.timeseries import fit_annual_velocities

    fit = fit_annual_velocities(cube)
    n, p = cube.sizes["time"], 1 + fit.sizes["year"]
    sig = _fit_sigma(fit)
    np.testing.assert_allclose(sig, fit["residual_rms"].values * math.sqrt(n / (n - p)), rtol=1e-12)
    assert float(np.median(sig)) == pytest.approx(1.0, rel=0.03)


def test_without_an_aquifer_mask_the_area_is_the_mapped_one(cube):
    """No mask: the aquifer area is that of the pixels with data (the sea of a coastal grid is not aquifer), and
    the coverage is the share of it with the displacement at every bound."""
    sea = cube.copy()
    sea[:, :, :20] = np.nan  # a strip of sea: no data at any epoch
    out = groundwater_loss(sea, displacement_std_mm=1.0)
    full = groundwater_loss(cube, displacement_std_mm=1.0)
    assert out["aquifer_area_km2"] < 0.86 * full["aquifer_area_km2"]
    assert out["periods"][0]["coverage"] == 1.0
    assert "no aquifer mask" in out["assumptions"]["aquifer"]
