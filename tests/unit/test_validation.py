"""Validation against held-out GNSS and truth grids: exact sampling and statistics on planted fields."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from gpu_insar_adjust.analysis import (error_statistics, sample_grid, validate_against_gnss,
                                       validate_against_truth, validate_timeseries_against_gnss)
from gpu_insar_adjust.errors import InputError

Y = np.round(39.5 - 0.01 * np.arange(100), 10)
X = np.round(116.0 + 0.01 * np.arange(150), 10)


def _field(lon, lat):
    """A smooth planted vertical velocity (mm/yr): linear in lon/lat, so bilinear sampling is exact."""
    return -10.0 + 20.0 * (lon - 116.0) - 15.0 * (lat - 39.0)


def _grid(values=None):
    xx, yy = np.meshgrid(X, Y)
    v = _field(xx, yy) if values is None else values
    return xr.DataArray(v, dims=("y", "x"), coords={"y": Y, "x": X}, name="vertical_velocity")


def _stations(n=30, seed=0):
    rng = np.random.default_rng(seed)
    lon = rng.uniform(X[2], X[-3], n)
    lat = rng.uniform(Y[-3], Y[2], n)
    return pd.DataFrame({"station": [f"S{i:03d}" for i in range(n)], "lon": lon, "lat": lat,
                         "vu": _field(lon, lat), "su": np.full(n, 1.0)})


def test_bilinear_sampling_is_exact_for_a_linear_field_and_nearest_within_half_a_pixel():
    st = _stations()
    g = _grid()
    bil = sample_grid(g, st.lon, st.lat, method="bilinear")
    np.testing.assert_allclose(bil, st.vu, atol=1e-9)
    near = sample_grid(g, st.lon, st.lat, method="nearest")
    # at most half a pixel in each direction: (|∂v/∂lon| + |∂v/∂lat|) × 0.005° = 0.175 mm/yr
    assert np.max(np.abs(near - st.vu)) <= 0.175 + 1e-9
    assert np.max(np.abs(near - st.vu)) > 0.05  # and it is not secretly interpolating


def test_bilinear_is_nan_aware_and_outside_points_are_nan():
    v = _field(*np.meshgrid(X, Y))
    v[10, 20] = np.nan
    g = _grid(v)
    lon, lat = X[20] + 0.003, Y[10] - 0.004  # between pixels (10, 20) … (11, 21), one neighbour missing
    val = sample_grid(g, [lon], [lat])[0]
    neighbours = [v[11, 20], v[10, 21], v[11, 21]]
    assert np.isfinite(val) and min(neighbours) <= val <= max(neighbours)
    # bilinear weights 0.42 (missing), 0.18, 0.28, 0.12: the valid ones renormalised by their sum 0.58
    expect = (0.18 * v[10, 21] + 0.28 * v[11, 20] + 0.12 * v[11, 21]) / 0.58
    assert val == pytest.approx(expect, rel=1e-9)
    v2 = v.copy()
    v2[10:12, 20:22] = np.nan
    assert np.isnan(sample_grid(_grid(v2), [lon], [lat])[0])
    assert np.isnan(sample_grid(g, [100.0], [39.0])[0])


def test_gnss_statistics_for_a_planted_bias_and_per_frame_split():
    st = _stations(40)
    st.loc[len(st)] = {"station": "OUTS", "lon": 110.0, "lat": 30.0, "vu": -5.0, "su": 1.0}
    st.loc[len(st)] = {"station": "HORI", "lon": 116.5, "lat": 39.0, "vu": np.nan, "su": np.nan}
    xx, yy = np.meshgrid(X, Y)
    est = _field(xx, yy) + 2.0
    out = validate_against_gnss(_grid(est), st)
    o = out["overall"]
    assert o["n"] == 40 and o["n_stations"] == 41 and o["n_unsampled"] == 1
    assert o["bias"] == pytest.approx(2.0, abs=1e-9) and o["rmse"] == pytest.approx(2.0, abs=1e-9)
    assert o["mae"] == pytest.approx(2.0, abs=1e-9)
    ref = st.vu.to_numpy()[:40]
    assert o["r2"] == pytest.approx(1 - 40 * 4.0 / np.sum((ref - ref.mean()) ** 2), rel=1e-9)
    assert len(out["scatter"]) == 40 and out["scatter"][0]["residual"] == pytest.approx(2.0, abs=1e-9)
    west = np.where(xx < 116.75, est, np.nan)
    east = np.where(xx >= 116.75, _field(xx, yy) - 1.0, np.nan)
    split = validate_against_gnss({"F1": _grid(west), "F2": _grid(east)}, st, method="nearest")
    n1, n2 = split["per_frame"]["F1"]["n"], split["per_frame"]["F2"]["n"]
    assert n1 + n2 == split["overall"]["n"] >= 38  # stations on the seam may fall in neither
    assert split["per_frame"]["F1"]["bias"] == pytest.approx(2.0, abs=0.13)
    assert split["per_frame"]["F2"]["bias"] == pytest.approx(-1.0, abs=0.13)


def test_truth_validation_and_alignment():
    rng = np.random.default_rng(1)
    truth = _grid()
    est = truth + rng.normal(0.0, 1.0, truth.shape)
    est[:10] = np.nan
    out = validate_against_truth(est, truth, max_scatter_points=500)
    assert out["overall"]["n"] == 90 * 150 and out["coverage"] == pytest.approx(0.9)
    assert out["overall"]["rmse"] == pytest.approx(1.0, rel=0.02)
    assert abs(out["overall"]["bias"]) < 0.03
    assert len(out["scatter"]["truth"]) == 500
    with pytest.raises(InputError, match="not aligned") as exc:
        validate_against_truth(est, truth.assign_coords(x=truth.x + 0.003))
    assert "reproject_match" in exc.value.fix


def test_error_statistics_and_timeseries_validation():
    s = error_statistics([1.0, 2.0, np.nan, 4.0], [1.0, 1.0, 5.0, 3.0])
    assert s["n"] == 3 and s["bias"] == pytest.approx(2 / 3) and s["rmse"] == pytest.approx(np.sqrt(2 / 3))
    times = pd.date_range("2019-01-01", periods=30, freq="12D")
    ty = (times - times[0]).days.to_numpy() / 365.25
    xx, yy = np.meshgrid(X, Y)
    cube = xr.DataArray(_field(xx, yy)[None] * ty[:, None, None], dims=("time", "y", "x"),
                        coords={"time": times, "y": Y, "x": X})
    st = _stations(3)
    series = {r.station: pd.Series(r.vu * ty + 7.0, index=times) for r in st.itertuples()}  # arbitrary datum
    out = validate_timeseries_against_gnss(cube, series, st)
    assert out["overall"]["n"] == 90 and out["overall"]["rmse"] < 1e-9
