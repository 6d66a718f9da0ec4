"""Per-pixel temporal fits and cube adjustment: planted truth recovered on every backend."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import assert_matches_reference

from gpu_insar_adjust import timeseries as ts
from gpu_insar_adjust.backend import to_numpy
from gpu_insar_adjust.errors import GiaError, TimeSeriesError

TIMES = pd.date_range("2018-01-05", "2023-06-28", freq="12D").values  # Sentinel-1 repeat, 5.5 years
YEARS = [2018, 2019, 2020, 2021, 2022, 2023]
NOISE_MM = 2.0


def _t_years(times=TIMES):
    return ts._years(np.asarray(times), np.asarray(times)[0])


def _with_gaps(cube, rng, frac=0.1):
    cube = cube.copy()
    cube[rng.random(cube.shape) < frac] = np.nan
    return cube


def _planted(npix=2000, seed=1):
    rng = np.random.default_rng(seed)
    ty = _t_years()
    v = rng.uniform(-80.0, 10.0, npix)
    acc = rng.uniform(-4.0, 4.0, npix)
    amp = rng.uniform(2.0, 10.0, npix)
    peak = rng.uniform(0.0, 365.0, npix)
    phase = 2 * math.pi * ts._decimal_year(TIMES)
    seasonal = amp[None, :] * np.cos(phase[:, None] - 2 * math.pi * peak[None, :] / 365.25)
    cube = (3.0 + v[None, :] * ty[:, None] + 0.5 * acc[None, :] * ty[:, None] ** 2 + seasonal
            + rng.normal(0.0, NOISE_MM, (ty.size, npix)))
    return _with_gaps(cube, rng), dict(v=v, acc=acc, amp=amp, peak=peak)


def test_design_matrix_names_and_columns():
    A, names = ts.design_matrix(TIMES, "quadratic+seasonal")
    assert names == ["intercept", "velocity", "acceleration", "annual_sin", "annual_cos", "semiannual_sin",
                     "semiannual_cos"]
    ty = _t_years()
    np.testing.assert_allclose(A[:, 1], ty, rtol=0, atol=0)
    np.testing.assert_allclose(A[:, 2], 0.5 * ty**2, rtol=1e-15)
    assert A[0, 1] == 0.0 and abs(A[-1, 1] - 1992 / 365.25) < 1e-12  # 2018-01-05 → 2023-06-20: 166 × 12 days


def test_piecewise_annual_model_is_continuous_with_rate_change_on_1_january():
    dense = pd.date_range("2018-01-05", "2023-06-28", freq="D").values
    A, names = ts.design_matrix(dense, "annual_rates")
    assert names[1:] == [f"velocity_{y}" for y in YEARS]
    rates = np.array([-10.0, -25.0, -40.0, -30.0, -15.0, -5.0])
    d = A @ np.concatenate([[7.0], rates])
    step = np.diff(d)  # mm per day
    # continuity: no jump anywhere larger than one day of the fastest rate
    assert np.max(np.abs(step)) <= 40.0 / 365.25 + 1e-12
    # the slope inside each year equals that year's rate, and changes exactly at 1 January
    day_years = pd.DatetimeIndex(dense[:-1]).year.values
    for year, rate in zip(YEARS, rates):
        sel = day_years == year
        np.testing.assert_allclose(step[sel] * 365.25, rate, rtol=1e-9)
    assert d[0] == 7.0


def test_fit_velocity_recovers_planted_rates_acceleration_seasonal(xp):
    cube, truth = _planted()
    Y = xp.asarray(cube)
    out = ts.fit_velocity(Y, TIMES, acceleration=True, seasonal=True, chunk_pixels=700)
    v, acc = to_numpy(out["velocity"]), to_numpy(out["acceleration"])
    amp, peak = to_numpy(out["annual_amplitude"]), to_numpy(out["annual_peak_doy"])
    vstd = to_numpy(out["velocity_std"])
    # 167 epochs, 2 mm noise, 10 % gaps, 7 parameters: formal sigmas ≈ 0.42 mm/yr (velocity), 0.15 mm/yr²
    # (acceleration), 0.23 mm (annual amplitude). Errors must stay within 1.2 × sigma RMS and 5 × sigma at worst.
    for est, key, sig in ((v, "v", 0.42), (acc, "acc", 0.15), (amp, "amp", 0.23)):
        err = est - truth[key]
        assert np.sqrt(np.mean(err**2)) < 1.2 * sig, key
        assert np.max(np.abs(err)) < 5.0 * sig, key
    dpeak = (peak - (1.0 + truth["peak"]) + 182.625) % 365.25 - 182.625  # planted days after 1 Jan 00:00
    assert np.sqrt(np.mean(dpeak[truth["amp"] > 4] ** 2)) < 4.0  # days
    # the formal uncertainties are calibrated for white noise: normalised errors have unit scatter (±10 %)
    z = (v - truth["v"]) / vstd
    assert 0.9 < np.std(z) < 1.1
    assert abs(np.median(vstd) - 0.42) < 0.04
    n_valid = to_numpy(out["n_valid"])
    np.testing.assert_array_equal(n_valid, np.sum(np.isfinite(cube), axis=0))
    rms = to_numpy(out["residual_rms"])
    assert abs(np.median(rms) - NOISE_MM) < 0.15


def test_fit_velocity_matches_float64_numpy_reference(xp):
    cube, _ = _planted(npix=300, seed=5)
    A, _ = ts.design_matrix(TIMES, "linear")
    ref = np.empty((2, cube.shape[1]))
    for j in range(cube.shape[1]):
        ok = np.isfinite(cube[:, j])
        ref[:, j] = np.linalg.lstsq(A[ok], cube[ok, j], rcond=None)[0]
    out = ts.fit_velocity(xp.asarray(cube), TIMES)
    assert_matches_reference(out["velocity"], ref[1], rtol=1e-10)
    assert_matches_reference(out["intercept"], ref[0], rtol=1e-10)


def test_fit_annual_velocities_recovers_planted_annual_rates(xp):
    rng = np.random.default_rng(3)
    npix = 1500
    A, names = ts.design_matrix(TIMES, "annual_rates")
    rates = rng.uniform(-60.0, 0.0, (len(YEARS), npix))
    cube = A @ np.vstack([np.zeros(npix), rates]) + rng.normal(0.0, NOISE_MM, (TIMES.size, npix))
    cube = _with_gaps(cube, rng)
    out = ts.fit_annual_velocities(xp.asarray(cube), TIMES)
    assert out["years"] == YEARS
    est, std = to_numpy(out["annual_velocity"]), to_numpy(out["annual_velocity_std"])
    err = est - rates
    # formal sigmas: ≈0.8 mm/yr for full years (~30 epochs), ≈2.7 mm/yr for the 5.7-month 2023 segment
    sig = np.median(std, axis=1)
    assert np.all(sig[1:5] < 1.0) and 2.0 < sig[5] < 3.5
    assert np.all(np.sqrt(np.mean(err**2, axis=1)) < 1.15 * sig)
    z = err / std
    assert np.all((0.9 < np.std(z, axis=1)) & (np.std(z, axis=1) < 1.1))


@pytest.mark.parametrize("weights", ["none", "per_epoch", "per_epoch_with_a_dropped_epoch", "per_pixel"])
def test_gap_free_pixels_by_shared_pseudo_inverse_equal_the_per_pixel_solver(xp, weights):
    """Pixels observed at every epoch are fitted with one shared (n, T) pseudo-inverse times the cube; pixels
    with gaps, pixels never observed and per-observation weights keep the per-pixel normal equations. Every
    output (rates, sigmas, seasonal amplitudes and their sigmas, residual RMS, counts) equals
    ``lstsq_shared``'s, column by column."""
    rng = np.random.default_rng(21)
    cube, _ = _planted(npix=600, seed=13)
    full = np.where(np.isfinite(cube), cube, 0.0) + rng.normal(0.0, NOISE_MM, cube.shape) * np.isnan(cube)
    cube = np.where(rng.random(cube.shape[1]) < 0.6, full, cube)  # 60 % of the pixels gap-free
    cube[:, 7] = np.nan  # never observed
    cube[:-5, 11] = np.nan  # fewer epochs than unknowns
    assert 300 < np.isfinite(cube).all(axis=0).sum() < 420
    w = {"none": None, "per_epoch": rng.uniform(0.5, 2.0, TIMES.size),
         "per_epoch_with_a_dropped_epoch": np.r_[0.0, rng.uniform(0.5, 2.0, TIMES.size - 1)],
         "per_pixel": rng.uniform(0.5, 2.0, cube.shape)}[weights]
    A, names = ts.design_matrix(TIMES, "annual_rates+seasonal")
    got = ts._fit_columns(xp.asarray(cube), A, names, None if w is None else xp.asarray(w))
    # the reference: the per-pixel solver on every column, outputs formed as in _fit_columns
    from gpu_insar_adjust.linalg import lstsq_shared

    ref = lstsq_shared(A, cube, w)
    n = len(names)
    rows = [ref.x[i] for i in range(n)] + [np.sqrt(ref.cov[:, i, i] * ref.sigma0_sq) for i in range(n)]
    rows += [ref.residual_rms, ref.n_valid.astype(float)]
    for key in ("annual", "semiannual"):
        i_s, i_c = names.index(f"{key}_sin"), names.index(f"{key}_cos")
        rows += list(ts._amplitude(np, ref.x, ref.cov[:, i_s, i_s], ref.cov[:, i_c, i_c], ref.cov[:, i_s, i_c],
                                   ref.sigma0_sq, i_s, i_c, 365.25 if key == "annual" else 365.25 / 2))
    expected = np.stack(rows)
    got = to_numpy(got)
    assert got.shape == expected.shape == (len(ts._output_names(names)), cube.shape[1])
    out_names = ts._output_names(names)
    for r, name in enumerate(out_names):
        tol = 1e-6 if name.endswith("peak_doy") else 1e-10  # peak day: atan2 of small amplitudes, in days
        assert_matches_reference(got[r], expected[r], rtol=tol), name
    assert np.isnan(got[:n, 7]).all() and got[out_names.index("n_valid"), 7] == 0
    assert np.isnan(got[:n, 11]).all() and got[out_names.index("n_valid"), 11] == 5


def test_gap_free_and_never_observed_pixels_only(xp):
    """A merged cube is mostly gap-free land and never-observed sea: no per-pixel solve at all, same results."""
    from gpu_insar_adjust.linalg import lstsq_shared

    rng = np.random.default_rng(4)
    A, names = ts.design_matrix(TIMES, "annual_rates")
    cube = A @ rng.uniform(-50.0, 5.0, (A.shape[1], 200)) + rng.normal(0.0, NOISE_MM, (TIMES.size, 200))
    cube[:, 150:] = np.nan
    got = to_numpy(ts._fit_columns(xp.asarray(cube), A, names))
    ref = lstsq_shared(A, cube)
    n = len(names)
    assert_matches_reference(got[:n], ref.x, rtol=1e-10)
    assert_matches_reference(got[n:2 * n], np.sqrt(np.diagonal(ref.cov, axis1=1, axis2=2).T * ref.sigma0_sq),
                             rtol=1e-10)
    np.testing.assert_array_equal(got[-1], np.r_[np.full(150, TIMES.size), np.zeros(50)])
    assert np.isnan(got[:-1, 150:]).all()


def test_chunked_equals_unchunked_exactly():
    cube, _ = _planted(npix=1000, seed=7)
    whole = ts.fit_velocity(cube, TIMES, seasonal=True, chunk_pixels=10**9)
    parts = ts.fit_velocity(cube, TIMES, seasonal=True, chunk_pixels=97)
    for key in ("velocity", "velocity_std", "annual_amplitude", "residual_rms"):
        np.testing.assert_array_equal(parts[key], whole[key])


def _dataarray(cube_2d, ny, nx, times=TIMES):
    return xr.DataArray(cube_2d.reshape(len(times), ny, nx).astype("float32"), dims=("time", "y", "x"),
                        coords={"time": times, "y": 38.0 - 0.01 * np.arange(ny),
                                "x": 115.0 + 0.01 * np.arange(nx)},
                        name="displacement")


def test_dask_cube_is_fitted_lazily_and_equals_in_memory_fit():
    cube, truth = _planted(npix=24 * 30, seed=11)
    da_mem = _dataarray(cube, 24, 30)
    da_lazy = da_mem.chunk({"time": 40, "y": 7, "x": 16})
    lazy = ts.fit_annual_velocities(da_lazy, chunk_pixels=50)
    assert lazy["annual_velocity"].chunks is not None  # still lazy
    mem = ts.fit_annual_velocities(da_mem)
    np.testing.assert_array_equal(lazy["annual_velocity"].values, mem["annual_velocity"].values)
    vel = ts.fit_velocity(da_lazy, acceleration=True, seasonal=True).compute()
    assert np.sqrt(np.mean((vel["velocity"].values.ravel() - truth["v"]) ** 2)) < 1.2 * 0.42
    assert list(mem["year"].values) == YEARS and mem["annual_velocity"].dims == ("year", "y", "x")


def test_cumulative_displacement_interpolates_and_matches_model():
    rng = np.random.default_rng(2)
    A, _ = ts.design_matrix(TIMES, "annual_rates")
    rates = rng.uniform(-50.0, 0.0, (len(YEARS), 12))
    cube = _dataarray(A @ np.vstack([np.zeros(12), rates]), 3, 4)
    start, end = "2019-03-01", "2021-01-01"
    # exact answer from the planted piecewise model: 306 days of 2019, all of 2020
    d19 = (np.datetime64("2020-01-01") - np.datetime64("2019-03-01")).astype(float) / 365.25
    d20 = 366 / 365.25
    expect = (rates[1] * d19 + rates[2] * d20).reshape(3, 4)
    interp = ts.cumulative_displacement(cube, start, end)
    model = ts.cumulative_displacement(cube, start, end, method="model")
    # piecewise-linear truth: interpolation between 12-day epochs is exact up to float32 storage
    np.testing.assert_allclose(interp.values, expect, atol=2e-4 * 60)
    np.testing.assert_allclose(model.values, expect, atol=1e-3)
    with pytest.raises(TimeSeriesError, match="outside the data"):
        ts.cumulative_displacement(cube, "2017-06-01", end)
    with pytest.raises(TimeSeriesError, match="before start"):
        ts.cumulative_displacement(cube, end, start)


def test_apply_velocity_correction_shifts_fitted_velocity_by_the_correction(xp):
    cube, _ = _planted(npix=600, seed=4)
    corr = np.linspace(-6.0, 6.0, 600)  # a 12 mm/yr ramp, the size of a plate-motion LOS ramp
    Y = xp.asarray(cube.astype(np.float32))
    out = ts.apply_velocity_correction(Y, xp.asarray(corr.astype(np.float32)), times=TIMES)
    assert out.dtype == Y.dtype
    assert_matches_reference(out[0, :], cube[0, :].astype(np.float32), dtype="float32")  # first epoch untouched
    before = ts.fit_velocity(xp.astype(Y, xp.float64), TIMES)["velocity"]
    after = ts.fit_velocity(xp.astype(out, xp.float64), TIMES)["velocity"]
    # float32 storage of ~300 mm displacements: ~3e-5 mm rounding → 1e-4 mm/yr on the velocity
    assert_matches_reference(after, to_numpy(before) - corr, atol=2e-3, rtol=0)


def test_apply_velocity_correction_rejects_a_different_grid():
    cube = _dataarray(np.nan_to_num(_planted(npix=12)[0]), 3, 4)
    corr = xr.DataArray(np.ones((3, 4)), dims=("y", "x"), coords={"y": cube.y.values + 0.5, "x": cube.x.values})
    with pytest.raises(TimeSeriesError, match="different grid") as exc:
        ts.apply_velocity_correction(cube, corr)
    assert "reproject_match" in str(exc.value)
    fixed = ts.apply_velocity_correction(cube, corr.assign_coords(y=cube.y))
    ty = _t_years()
    np.testing.assert_allclose((cube - fixed).values[:, 0, 0], ty, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["unsorted", "duplicated"])
def test_bad_epochs_raise_with_fix(bad):
    t = TIMES.copy()
    if bad == "unsorted":
        t[[3, 4]] = t[[4, 3]]
    else:
        t[4] = t[3]
    with pytest.raises(TimeSeriesError) as exc:
        ts.fit_velocity(np.zeros((t.size, 3)), t)
    assert isinstance(exc.value, GiaError) and exc.value.fix
    assert ("sortby" in exc.value.fix) if bad == "unsorted" else ("drop_duplicates" in exc.value.fix)


def _ramp_cube(nt=8, ny=40, nx=50, seed=0):
    rng = np.random.default_rng(seed)
    y = 38.0 - 0.01 * np.arange(ny)
    x = 115.0 + 0.01 * np.arange(nx)
    xx, yy = np.meshgrid(x, y)
    bowl = -80.0 * np.exp(-(((xx - x.mean()) / 0.08) ** 2 + ((yy - y.mean()) / 0.08) ** 2))
    k = np.arange(nt)[:, None, None]
    signal = bowl[None] * k / (nt - 1)
    coef = rng.normal(0.0, 10.0, (nt, 3))
    c0, c1, c2 = (coef[:, k, None, None] for k in range(3))
    ramps = c0 + c1 * (xx - 115.2) * 50 + c2 * (yy - 37.8) * 50
    far = np.hypot(xx - x.mean(), yy - y.mean()) > 0.2
    masks = np.broadcast_to(far, (nt, ny, nx)) & (rng.random((nt, ny, nx)) > 0.3)  # varies by epoch
    cube = signal + ramps
    cube[rng.random(cube.shape) < 0.05] = np.nan
    return cube, signal, masks, x, y


def test_remove_epoch_ramps_recovers_signal_with_epoch_varying_masks(xp):
    cube, signal, masks, x, y = _ramp_cube()
    out = ts.remove_epoch_ramps(xp.asarray(cube), xp.asarray(masks), order=1, x=x, y=y)
    res = to_numpy(out)
    ok = np.isfinite(cube)
    # the bowl's tail in the far field is < 0.2 mm: planes removed to that level
    assert np.max(np.abs(res[ok] - signal[ok])) < 0.3
    assert np.array_equal(np.isnan(res), np.isnan(cube))


def test_remove_epoch_ramps_dask_equals_in_memory_and_weights_apply():
    cube, signal, masks, x, y = _ramp_cube(nt=6)
    times = TIMES[:6]
    da_ = xr.DataArray(cube, dims=("time", "y", "x"), coords={"time": times, "y": y, "x": x})
    m = xr.DataArray(masks, dims=da_.dims, coords=da_.coords)
    mem = ts.remove_epoch_ramps(da_, m)
    lazy = ts.remove_epoch_ramps(da_.chunk({"time": 2, "y": 20, "x": 25}), m.chunk({"time": 3}))
    np.testing.assert_allclose(lazy.values, mem.values, rtol=0, atol=1e-9)
    w = xr.DataArray(np.full(cube.shape[1:], 4.0), dims=("y", "x"), coords={"y": y, "x": x})
    np.testing.assert_allclose(ts.remove_epoch_ramps(da_, m, weights=w).values, mem.values, atol=1e-9)
    with pytest.raises(TimeSeriesError, match="undetermined"):
        ts.remove_epoch_ramps(da_, m & False)


def test_ramp_kernel_path_equals_array_api_path():
    import array_api_compat.numpy as xnp

    if ts._ramp_kernels(xnp) is None:
        pytest.skip("gpu_insar_adjust.kernels does not provide fit_epoch_ramps/subtract_epoch_ramps yet")
    cube, _, masks, x, y = _ramp_cube(nt=5)
    w = np.random.default_rng(3).uniform(0.5, 2.0, cube.shape[1:])
    for order in (1, 2):
        fast, cf = ts._ramps_block(cube, masks, w, x=x, y=y, order=order, epochs=TIMES[:5], use_kernels=True)
        slow, cs = ts._ramps_block(cube, masks, w, x=x, y=y, order=order, epochs=TIMES[:5], use_kernels=False)
        np.testing.assert_allclose(cf, to_numpy(cs), rtol=0, atol=1e-9)
        np.testing.assert_allclose(fast, to_numpy(slow), rtol=0, atol=1e-9, equal_nan=True)


def test_seasonal_peak_day_counts_1_january_as_day_1():
    """A cosine peaking at noon on 11 April 2018 (day of year 101, 100.5 days after 1 January 00:00) is reported
    at day 101.5: 1 January 00:00 is day 1.0, as in the day-of-year convention."""
    t = pd.date_range("2016-01-01", "2020-12-31", freq="6D").values
    frac = ts._decimal_year(t) % 1.0
    peak_frac = 100.5 / 365.25
    d = 7.0 * np.cos(2 * math.pi * (frac - peak_frac))
    out = ts.fit_velocity(d[:, None], t, seasonal=True)
    assert float(np.asarray(out["annual_amplitude"])[0]) == pytest.approx(7.0, rel=1e-3)
    assert float(np.asarray(out["annual_peak_doy"])[0]) == pytest.approx(101.5, abs=0.3)
