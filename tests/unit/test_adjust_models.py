"""Candidate surfaces: recovered truth, the scikit-learn contract, and dense evaluation on every backend."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import assert_matches_reference
from sklearn.base import clone
from sklearn.model_selection import KFold, cross_val_score

from gpu_insar_adjust.adjust import models
from gpu_insar_adjust.errors import AdjustmentError


def station_set(n=60, seed=0, span=120.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-span, span, n)
    y = rng.uniform(-span, span, n)
    h = np.abs(rng.normal(800.0, 500.0, n))
    inc = 33.0 + 10.0 * (x + span) / (2 * span) + rng.normal(0, 0.1, n)
    return pd.DataFrame({"x_km": x, "y_km": y, "height_m": h, "incidence_deg": inc}), rng


def grid_features(xp, n=9, span=130.0):
    g = np.linspace(-span, span, n)
    X, Y = np.meshgrid(g, g)
    f = {"x_km": X.ravel(), "y_km": Y.ravel(), "height_m": 600.0 + 2.0 * X.ravel(),
         "incidence_deg": 38.0 + 0.03 * X.ravel()}
    return f, {k: xp.asarray(v) for k, v in f.items()}


def test_polynomial_recovers_planted_surface_with_dem_and_incidence():
    X, rng = station_set()
    truth = (1.5 + 0.02 * X.x_km - 0.01 * X.y_km + 3e-5 * X.x_km * X.y_km + 0.004 * (X.height_m - 800)
             - 0.3 * (X.incidence_deg - 38))
    m = models.make_candidate("poly2+dem+inc").fit(X, truth)
    np.testing.assert_allclose(m.predict(X), truth, atol=1e-4)  # ridge 1e-6 on a near-collinear x/incidence pair
    # a DEM-height coefficient of 0.004 mm/yr per m comes back through the scaling
    assert m.coef_[6] / m.scale_["height_m"] == pytest.approx(0.004, rel=1e-4)
    assert m.n_params_ == 8


def test_polynomial_weights_and_std():
    X, rng = station_set(n=40)
    y = 2.0 + rng.normal(0, 0.5, 40)
    y[0] += 50.0  # a station with huge σ barely moves the weighted fit
    w = np.full(40, 1 / 2.0 ** 2)
    w[0] = 1e-8
    m = models.PolynomialSurface(order=0).fit(X, y, w)
    assert m.coef_[0] == pytest.approx(np.mean(y[1:]), abs=1e-4)
    # scatter (0.5) below the stated σ (2): unit-weight variance floored at 1 → σ_mean = 2/sqrt(Σ w / w0)
    s = m.evaluate_std({"x_km": np.zeros(1), "y_km": np.zeros(1)})[0]
    assert s == pytest.approx(1.0 / math.sqrt(np.sum(w)), rel=1e-6)


def test_collinear_and_underdetermined_raise():
    x = np.linspace(-50, 50, 8)
    X = pd.DataFrame({"x_km": x, "y_km": 0.5 * x})
    with pytest.raises(AdjustmentError, match="collinear"):
        models.PolynomialSurface(order=1).fit(X, np.ones(8))
    with pytest.raises(AdjustmentError, match="only 8 stations"):
        grid = pd.DataFrame({"x_km": [0, 1, 2, 0, 1, 2, 0, 1.0], "y_km": [0, 0, 0, 1, 1, 1, 2, 2.0],
                             "height_m": np.arange(8.0)})
        models.PolynomialSurface(order=3, height=True).fit(grid, np.ones(8))
    assert models.PolynomialSurface(order=0).fit(X, np.ones(8)).coef_[0] == pytest.approx(1.0)
    with pytest.raises(AdjustmentError, match="collinear"):
        models.ThinPlateSplineSurface().fit(X, np.ones(8))
    with pytest.raises(AdjustmentError, match="non-finite"):
        models.PolynomialSurface(order=0).fit(X, np.full(8, np.nan))


def test_registry_and_complexity_order():
    names = models.candidate_names()
    for n in ("poly0", "poly3", "poly1+dem", "poly2+dem+inc", "gp", "tps", "lowpass", "rf", "gbr"):
        assert n in names
        assert isinstance(models.make_candidate(n), models.SurfaceModel)
    order = sorted(["gp", "poly2", "poly1+dem", "poly0", "rf", "tps", "poly1", "lowpass", "poly3", "gbr"],
                   key=models.candidate_complexity)
    assert order == ["poly0", "poly1", "poly1+dem", "poly2", "poly3", "lowpass", "tps", "gp", "gbr", "rf"]
    assert models.candidate_features("poly2+dem+inc") == ("x_km", "y_km", "height_m", "incidence_deg")
    with pytest.raises(AdjustmentError, match="Unknown adjustment candidate"):
        models.make_candidate("poly4")


def test_sklearn_contract_clone_and_cross_val():
    X, rng = station_set(n=50)
    y = 1.0 + 0.03 * X.x_km + rng.normal(0, 0.3, 50)
    for name in ("poly1", "tps", "lowpass", "gbr"):
        est = models.make_candidate(name)
        assert clone(est).get_params() == est.get_params()
        assert not hasattr(est, "n_features_in_")
        s = cross_val_score(est, X[["x_km", "y_km"]], y, cv=KFold(5, shuffle=True, random_state=0),
                            scoring="neg_root_mean_squared_error")
        assert -s.mean() < 0.6, name  # noise is 0.3 mm/yr
    # plain arrays follow FEATURES order
    m = models.make_candidate("poly1").fit(X[["x_km", "y_km"]].to_numpy(), y)
    assert m.predict(X[["x_km", "y_km"]].to_numpy()) == pytest.approx(
        models.make_candidate("poly1").fit(X, y).predict(X))


def _smooth_field(X):
    return 4.0 * np.sin(X.x_km / 40.0) * np.cos(X.y_km / 55.0) + 0.02 * X.x_km


@pytest.mark.parametrize("name", ["poly2+dem+inc", "gp", "tps", "lowpass"])
def test_dense_evaluation_matches_numpy_reference(cpu_xp, name):
    X, rng = station_set(n=45, seed=2)
    y = _smooth_field(X) + rng.normal(0, 0.3, len(X))
    m = models.make_candidate(name).fit(X, y, np.full(len(X), 1 / 0.3 ** 2))
    f_np, f_xp = grid_features(cpu_xp)
    ref = m.evaluate(f_np)
    assert_matches_reference(m.evaluate(f_xp), ref, rtol=1e-9)
    ref_std = m.evaluate_std(f_np)
    if ref_std is not None:
        assert_matches_reference(m.evaluate_std(f_xp), ref_std, rtol=1e-7)


def test_gp_evaluation_equals_sklearn_and_posterior_std_behaves():
    X, rng = station_set(n=40, seed=4)
    y = _smooth_field(X) + rng.normal(0, 0.3, len(X))
    m = models.GaussianProcessSurface().fit(X, y, np.full(len(X), 1 / 0.3 ** 2))
    f, _ = grid_features(np, n=7)
    P = np.column_stack([f["x_km"], f["y_km"]])
    ref = m.trend_.evaluate(f) + m.gp_.predict(P)
    np.testing.assert_allclose(m.evaluate(f), ref, atol=1e-9)
    sd = m.evaluate_std({"x_km": np.array([X.x_km[0], 1000.0]), "y_km": np.array([X.y_km[0], 1000.0])})
    # at a station the surface is known to about the station σ; far away it reverts to the prior amplitude
    assert sd[0] < 0.5 < m.amplitude_ * 0.9 < sd[1]
    assert 20.0 < m.length_scale_km_ < 200.0


def test_tps_dense_evaluation_equals_scipy():
    X, rng = station_set(n=30, seed=5)
    y = _smooth_field(X) + rng.normal(0, 0.3, len(X))
    m = models.ThinPlateSplineSurface().fit(X, y)
    f, _ = grid_features(np, n=11)
    u = (np.column_stack([f["x_km"], f["y_km"]]) - m.centre_) / m.scale_
    np.testing.assert_allclose(m.evaluate(f), m.interpolator_(u), atol=1e-9)
    assert 3.0 < m.effective_dof_ < 30.0


def test_tps_large_smoothing_tends_to_plane():
    X, rng = station_set(n=30, seed=6)
    y = 1.0 + 0.05 * X.x_km - 0.02 * X.y_km + rng.normal(0, 1.0, 30)
    tps = models.ThinPlateSplineSurface(smoothing=1e8).fit(X, y)
    plane = models.PolynomialSurface(order=1).fit(X, y)
    np.testing.assert_allclose(tps.predict(X), plane.predict(X), atol=1e-3)


def test_lowpass_wavelength_is_mean_station_spacing():
    from scipy.spatial import cKDTree

    X, rng = station_set(n=50, seed=7)
    m = models.LowPassSurface().fit(X, rng.normal(size=50))
    P = X[["x_km", "y_km"]].to_numpy()
    assert m.wavelength_km_ == pytest.approx(cKDTree(P).query(P, k=2)[0][:, 1].mean())
    # far from every station the filtered field returns to the trend
    far = {"x_km": np.array([5000.0]), "y_km": np.array([0.0])}
    assert m.evaluate(far)[0] == pytest.approx(m.trend_.evaluate(far)[0], abs=1e-9)


def test_lowpass_fused_kernel_equals_the_array_form(monkeypatch):
    """On NumPy with numba the low-pass surface is one fused pass per pixel; it equals the array-API form
    (pixels × stations temporaries) near stations, between them and far from all of them."""
    pytest.importorskip("numba")
    X, rng = station_set(n=45, seed=8)
    y = _smooth_field(X) + rng.normal(0, 0.3, len(X))
    m = models.LowPassSurface().fit(X, y, rng.uniform(0.5, 2.0, len(X)))
    pts = {"x_km": np.r_[X.x_km.to_numpy(), rng.uniform(-150, 150, 3000), 4000.0],
           "y_km": np.r_[X.y_km.to_numpy(), rng.uniform(-150, 150, 3000), -4000.0]}
    monkeypatch.setenv("GIA_CPU_KERNELS", "numba")
    fused = m.evaluate(pts)
    monkeypatch.setenv("GIA_CPU_KERNELS", "numpy")
    arrays = m.evaluate(pts)
    np.testing.assert_allclose(fused, arrays, rtol=1e-12, atol=1e-12)
    assert np.ptp(fused) > 1.0
    assert fused[-1] == pytest.approx(m.trend_.evaluate({"x_km": np.array([4000.0]),
                                                         "y_km": np.array([-4000.0])})[0], abs=1e-9)


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5, np.inf])
def test_gp_fused_kernel_equals_the_array_form(monkeypatch, nu):
    """On NumPy with numba the GP mean and σ come from one fused pass per pixel; they equal the array-API form
    (the cross-covariance matrix, its product with K⁻¹) for every Matérn ν, at stations and far from them."""
    pytest.importorskip("numba")
    X, rng = station_set(n=40, seed=9)
    y = _smooth_field(X) + rng.normal(0, 0.3, len(X))
    m = models.GaussianProcessSurface(nu=nu).fit(X, y, np.full(len(X), 1 / 0.3 ** 2))
    pts = {"x_km": np.r_[X.x_km.to_numpy(), rng.uniform(-150, 150, 2500), 3000.0],
           "y_km": np.r_[X.y_km.to_numpy(), rng.uniform(-150, 150, 2500), 0.0]}
    monkeypatch.setenv("GIA_CPU_KERNELS", "numba")
    mean, sd = m.evaluate(pts), m.evaluate_std(pts)
    monkeypatch.setenv("GIA_CPU_KERNELS", "numpy")
    np.testing.assert_allclose(mean, m.evaluate(pts), rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(sd, m.evaluate_std(pts), rtol=1e-9, atol=1e-9)
    assert np.ptp(mean) > 1.0
    assert sd[0] < 0.5 < m.amplitude_ * 0.9 < sd[-1]  # known at a station, the prior far away


def test_tps_fused_kernel_equals_the_array_form_and_scipy(monkeypatch):
    """On NumPy with numba the thin-plate spline's kernel part is one fused pass per pixel: equal to the
    array-API form and to scipy's interpolator, at the nodes (r = 0) and between them."""
    pytest.importorskip("numba")
    X, rng = station_set(n=30, seed=10)
    y = _smooth_field(X) + rng.normal(0, 0.3, len(X))
    m = models.ThinPlateSplineSurface().fit(X, y)
    pts = {"x_km": np.r_[X.x_km.to_numpy(), rng.uniform(-150, 150, 2000)],
           "y_km": np.r_[X.y_km.to_numpy(), rng.uniform(-150, 150, 2000)]}
    monkeypatch.setenv("GIA_CPU_KERNELS", "numba")
    fused = m.evaluate(pts)
    monkeypatch.setenv("GIA_CPU_KERNELS", "numpy")
    np.testing.assert_allclose(fused, m.evaluate(pts), rtol=1e-11, atol=1e-10)
    u = (np.column_stack([pts["x_km"], pts["y_km"]]) - m.centre_) / m.scale_
    np.testing.assert_allclose(fused, m.interpolator_(u), atol=1e-9)


@pytest.mark.parametrize("method", ["rf", "gbr"])
def test_tree_ensembles_fit_residual_field_on_trend(method):
    X, rng = station_set(n=120, seed=8)
    y = 5.0 + 0.05 * X.x_km + _smooth_field(X) + rng.normal(0, 0.3, 120)
    m = models.TreeEnsembleSurface(method=method).fit(X, y)
    in_rmse = float(np.sqrt(np.mean((m.predict(X) - y) ** 2)))
    assert in_rmse < 1.8  # the field has std ≈ 2.6 mm/yr around the trend
    assert m.dense_array_api is False
