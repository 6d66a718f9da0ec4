"""Subsidence statistics on the ellipsoid: planted Gaussian bowls with analytic areas, volumes and trends."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyproj
import pytest
import xarray as xr

from gpu_insar_adjust.analysis import annual_subsidence, subsidence_summary
from gpu_insar_adjust.errors import GiaError, InputError

GEOD = pyproj.Geod(ellps="WGS84")
LON0, LAT0 = 116.9, 38.9  # Tianjin-like
SIGMA_M = 8_000.0
STEP = 0.004  # degrees: ~350 m × 445 m pixels


def _grid(half=0.45):
    y = np.arange(LAT0 + half, LAT0 - half - 1e-9, -STEP)
    x = np.arange(LON0 - half, LON0 + half + 1e-9, STEP)
    return y, x


def _distance(y, x, lon0=LON0, lat0=LAT0):
    xx, yy = np.meshgrid(x, y)
    return GEOD.inv(np.full(xx.shape, lon0), np.full(xx.shape, lat0), xx, yy)[2]


def _bowl(peak_mm_yr, y=None, x=None, lon0=LON0, lat0=LAT0, sigma=SIGMA_M):
    if y is None:
        y, x = _grid()
    r = _distance(y, x, lon0, lat0)
    return -peak_mm_yr * np.exp(-(r**2) / (2 * sigma**2))  # vertical velocity, positive up


def _da(vu, y, x):
    return xr.DataArray(vu.astype("float32"), dims=("y", "x"), coords={"y": y, "x": x}, name="vertical_velocity")


def test_area_rates_and_volume_of_a_gaussian_bowl_match_the_analytic_values():
    y, x = _grid()
    v0, thr = 100.0, 20.0
    vu = _bowl(v0, y, x)
    vu[::7, ::5] = np.nan  # scattered no-data must not bias the area (it is simply not counted)
    vu_full = _bowl(v0, y, x)
    out = subsidence_summary(_da(vu_full, y, x), threshold_mm_yr=thr)
    r_thr2 = 2 * SIGMA_M**2 * math.log(v0 / thr)
    area = math.pi * r_thr2  # m²: disc where the rate exceeds the threshold
    volume = 2 * math.pi * SIGMA_M**2 * (v0 - thr) / 1e3  # m³/yr, ∫ rate dA over that disc
    volume_all = 2 * math.pi * SIGMA_M**2 * v0 / 1e3  # over all subsiding pixels (the grid spans ±5 σ)
    assert out["subsidence_threshold_mm_yr"] == 20.0
    assert abs(out["subsidence_area_km2"] - area / 1e6) / (area / 1e6) < 0.01
    assert abs(out["subsidence_volume_rate_m3_yr"] - volume) / volume < 0.01
    assert abs(out["subsidence_volume_rate_all_m3_yr"] - volume_all) / volume_all < 0.01
    assert abs(out["mean_subsidence_rate_mm_yr"] - volume * 1e3 / area) < 0.5
    assert abs(out["max_subsidence_rate_mm_yr"] - v0) < 0.1
    gappy = subsidence_summary(_da(vu, y, x), threshold_mm_yr=thr)
    frac_missing = np.isnan(vu).mean()
    assert abs(gappy["subsidence_area_km2"] / out["subsidence_area_km2"] - (1 - frac_missing)) < 0.01


def test_hotspots_are_ranked_located_and_named_by_nearest_station():
    y, x = _grid()
    lon2, lat2 = LON0 + 0.25, LAT0 - 0.25
    vu = _bowl(100.0, y, x) + _bowl(60.0, y, x, lon2, lat2, sigma=4_000.0)
    stations = pd.DataFrame({"station": ["TJWQ", "HECX", "FAR1"], "lon": [LON0 + 0.02, lon2 - 0.01, 120.0],
                             "lat": [LAT0, lat2, 40.0]})
    out = subsidence_summary(_da(vu, y, x), threshold_mm_yr=20.0, stations=stations)
    hs = out["hotspots"]
    assert len(hs) == 2
    big, small = hs
    assert big["area_km2"] > small["area_km2"]
    assert abs(big["centroid_lon"] - LON0) < 0.005 and abs(big["centroid_lat"] - LAT0) < 0.005
    assert abs(small["centroid_lon"] - lon2) < 0.005 and abs(small["centroid_lat"] - lat2) < 0.005
    assert big["nearest_station"] == "TJWQ" and small["nearest_station"] == "HECX"
    expect_km = GEOD.inv(big["peak_lon"], big["peak_lat"], LON0 + 0.02, LAT0)[2] / 1e3
    assert abs(big["nearest_station_distance_km"] - expect_km) < 1e-6
    assert abs(big["nearest_station_distance_km"] - 1.73) < 0.3  # 0.02° of longitude at 38.9°N
    assert abs(big["peak_subsidence_rate_mm_yr"] - 100.0) < 0.5
    area_small = math.pi * 2 * 4_000.0**2 * math.log(60.0 / 20.0) / 1e6
    assert abs(small["area_km2"] - area_small) / area_small < 0.02  # ~250 pixels: boundary discretisation
    assert sum(h["area_km2"] for h in hs) == pytest.approx(out["subsidence_area_km2"], rel=1e-12)


def test_joined_funnels_are_split_and_speckle_is_dropped():
    """Two 80 mm/yr funnels 0.17° (15 km) apart join above 20 mm/yr into one region (saddle ~30 mm/yr); each
    becomes its own hotspot, split at the saddle. A lone noisy pixel beyond the threshold is not a hotspot."""
    y, x = _grid()
    lon2 = LON0 + 0.17
    vu = _bowl(80.0, y, x, sigma=4_000.0) + _bowl(80.0, y, x, lon2, LAT0, sigma=4_000.0)
    vu[5, 5] = -30.0  # speckle far from both
    joined = subsidence_summary(_da(vu, y, x), threshold_mm_yr=20.0, split_funnels=False)["hotspots"]
    assert len(joined) == 1
    out = subsidence_summary(_da(vu, y, x), threshold_mm_yr=20.0)
    hs = out["hotspots"]
    assert len(hs) == 2
    a, b = sorted(hs, key=lambda h: h["peak_lon"])
    assert abs(a["peak_lon"] - LON0) < 0.01 and abs(b["peak_lon"] - lon2) < 0.01
    # symmetric funnels: equal halves, split at the midpoint, together the joined region
    assert a["area_km2"] == pytest.approx(b["area_km2"], rel=0.05)
    assert a["centroid_lon"] < LON0 + 0.085 < b["centroid_lon"]
    assert a["area_km2"] + b["area_km2"] == pytest.approx(joined[0]["area_km2"], rel=1e-12)
    assert out["subsidence_area_km2"] > joined[0]["area_km2"]  # the speckle counts in the area, not as a hotspot


def test_negative_threshold_is_rejected_with_the_expected_sign():
    y, x = _grid(0.05)
    with pytest.raises(InputError) as exc:
        subsidence_summary(_da(_bowl(50.0, y, x), y, x), threshold_mm_yr=-20)
    assert isinstance(exc.value, GiaError)
    assert "positive" in str(exc.value) and "20" in exc.value.fix


@pytest.mark.parametrize("peaks, peak_year, easing", [((60, 80, 100, 90, 70), 2020, True),
                                                      ((60, 70, 80, 90, 100), 2022, False)])
def test_annual_subsidence_peak_year_and_easing(peaks, peak_year, easing):
    y, x = _grid(0.3)
    years = list(range(2018, 2023))
    cube = np.stack([_bowl(p, y, x) for p in peaks])
    da = xr.DataArray(cube, dims=("year", "y", "x"), coords={"year": years, "y": y, "x": x})
    out = annual_subsidence(da, threshold_mm_yr=20.0, region="fixed")
    assert out["peak_year"] == peak_year and out["easing"] is easing
    # per-year region (the default): mean of a Gaussian bowl of peak p over the disc where it exceeds 20 mm/yr
    per_year = annual_subsidence(da, threshold_mm_yr=20.0)
    for yr, p in zip(years, peaks):
        expect = (p - 20) / math.log(p / 20)
        assert abs(per_year["annual_mean_subsidence_rate_mm_yr"][yr] - expect) / expect < 0.01
    assert per_year["peak_year"] == peak_year
    # fixed region = disc where the largest bowl (100 mm/yr) exceeds 20 mm/yr; mean of the Gaussian over it
    r2 = 2 * SIGMA_M**2 * math.log(100 / 20)
    g_mean = 2 * SIGMA_M**2 * (1 - 20 / 100) / r2
    for yr, p in zip(years, peaks):
        assert abs(out["annual_mean_subsidence_rate_mm_yr"][yr] - p * g_mean) / (p * g_mean) < 0.01
        area_y = math.pi * 2 * SIGMA_M**2 * math.log(p / 20) / 1e6
        assert abs(out["annual_subsidence_area_km2"][yr] - area_y) / area_y < 0.01
    expect_slope = np.polyfit(years[-3:], [p * g_mean for p in peaks[-3:]], 1)[0]
    assert abs(out["trend_slope_mm_yr2"] - expect_slope) < 0.01 * abs(expect_slope)
    assert out["trend_years"] == years[-3:]


def test_hotspot_sums_equal_scipy_ndimage_bit_for_bit_and_a_tied_peak_is_the_first_in_raster_order():
    """Per-hotspot sums (area, volume, centroid, pixel count) are formed over the labelled pixels only; they equal
    scipy.ndimage's sums over the whole raster bit for bit, and the peak its maximum. Of two pixels at the same
    peak rate the first in raster order locates the peak."""
    from scipy import ndimage

    from gpu_insar_adjust.analysis.subsidence import _EIGHT, find_hotspots
    from gpu_insar_adjust.geodesy.grids import cell_area_m2

    y, x = _grid()
    vu = _bowl(80.0, y, x, sigma=4_000.0) + _bowl(60.0, y, x, LON0 + 0.2, LAT0 - 0.1, sigma=5_000.0)
    vu = vu.astype(np.float32).astype(np.float64)
    rate = -vu
    i, j = np.unravel_index(np.argmax(rate), rate.shape)
    rate[i + 1, j + 2] = rate[i, j]  # a tie at the first funnel's peak, later in raster order
    rate[3:6, 3:6] = np.nan
    area = cell_area_m2(y, x, "EPSG:4326")
    hs = find_hotspots(rate, area, x, y, 20.0, split_funnels=False, max_hotspots=None)
    labels, n = ndimage.label(np.isfinite(rate) & (rate >= 20.0), structure=_EIGHT)
    assert len(hs) == n == 2
    idx = np.arange(1, n + 1)
    a = np.where(labels > 0, area, 0.0)
    r = np.where(labels > 0, rate, 0.0)
    xx = np.broadcast_to(x[None, :], rate.shape)
    ref = {"area_km2": ndimage.sum(a, labels, idx) / 1e6,
           "volume_rate_m3_yr": ndimage.sum(r * a / 1e3, labels, idx),
           "n_pixels": ndimage.sum(np.ones_like(r), labels, idx),
           "peak_subsidence_rate_mm_yr": ndimage.maximum(r, labels, idx)}
    cx = ndimage.sum(a * xx, labels, idx) / ndimage.sum(a, labels, idx)
    for h in hs:
        k = h["id"] - 1
        for key, want in ref.items():
            assert h[key] == want[k], key
        assert h["centroid_lon"] == pytest.approx(cx[k], abs=1e-12)  # (through the CRS transform)
    first = next(h for h in hs if h["peak_subsidence_rate_mm_yr"] == rate[i, j])
    assert first["peak_lon"] == pytest.approx(x[j], abs=1e-12)
    assert first["peak_lat"] == pytest.approx(y[i], abs=1e-12)


def test_partial_years_under_half_a_year_are_left_out_by_default():
    """A last year covered for three weeks (a rate from a few epochs) does not count, and so cannot become the
    peak year, unless asked for with min_year_fraction=0."""
    y, x = _grid(0.3)
    years = [2020, 2021, 2022]
    cube = np.stack([_bowl(p, y, x) for p in (60, 80, 300)])  # the 2022 "rate" from three weeks of data
    starts = np.array(["2020-01-01", "2021-01-01", "2022-01-01"], "datetime64[ns]")
    ends = np.array(["2021-01-01", "2022-01-01", "2022-01-22"], "datetime64[ns]")
    da = xr.DataArray(cube, dims=("year", "y", "x"), coords={"year": years, "y": y, "x": x,
                                                              "year_start": ("year", starts),
                                                              "year_end": ("year", ends)})
    out = annual_subsidence(da, threshold_mm_yr=20.0)
    assert out["years"] == [2020, 2021] and out["peak_year"] == 2021
    assert annual_subsidence(da, threshold_mm_yr=20.0, min_year_fraction=0.0)["peak_year"] == 2022
