"""Network least squares over overlaps and GNSS ties: recover planted per-frame offsets and ramps."""

import numpy as np
import pytest

from gpu_insar_adjust import errors
from gpu_insar_adjust.network import GnssTies, OverlapSamples, poly_terms, solve_network


def _chain(n_frames=5, order=1, tied=(0, 4), outlier_frac=0.0, seed=0, noise=0.5):
    """Frames along a line, 150 km apart, 200 km wide: neighbours overlap by 50 km."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(0, 3.0, size=(n_frames, (1, 3, 6)[order]))
    centres = np.arange(n_frames) * 150.0
    overlaps = []
    for i in range(n_frames - 1):
        x = rng.uniform(centres[i] + 50, centres[i] + 100, 400)  # global km
        y = rng.uniform(-100, 100, 400)
        xi, xj = x - centres[i], x - centres[i + 1]
        d = poly_terms(xi, y, order) @ truth[i] - poly_terms(xj, y, order) @ truth[i + 1]
        d = d + rng.normal(0, noise, d.size)
        bad = rng.random(d.size) < outlier_frac
        d[bad] += rng.normal(0, 40, bad.sum())
        overlaps.append(OverlapSamples(i, i + 1, xi, y, xj, y, d, np.full(d.size, 1.0), area_km2=50 * 200,
                                       kind="along-track"))
    ties = []
    for f in tied:
        xs, ys = rng.uniform(-90, 90, 12), rng.uniform(-90, 90, 12)
        res = poly_terms(xs, ys, order) @ truth[f] + rng.normal(0, 0.5, 12)
        ties.append(GnssTies(f, xs, ys, res, np.full(12, 0.5)))
    return truth, overlaps, ties


@pytest.mark.parametrize("order", [0, 1])
def test_recovers_planted_offsets_and_ramps(order):
    truth, overlaps, ties = _chain(order=order)
    sol = solve_network(len(truth), overlaps, ties, order=order)
    # evaluate surfaces over each frame: the correction must match the truth within 0.5 mm/yr everywhere
    gx, gy = np.meshgrid(np.linspace(-100, 100, 21), np.linspace(-100, 100, 21))
    for f in range(len(truth)):
        est = sol.correction(f, gx.ravel(), gy.ravel())
        tru = poly_terms(gx.ravel(), gy.ravel(), order) @ truth[f]
        assert np.max(np.abs(est - tru)) < 1.0, f"frame {f}"
    s = sol.summary()
    assert s["overlap_rms_after_mm_yr"] < 0.7 < s["overlap_rms_before_mm_yr"]
    assert sol.held_by == ["gnss+neighbours", "neighbours", "neighbours", "neighbours", "gnss+neighbours"]


def test_robust_to_outliers():
    truth, overlaps, ties = _chain(outlier_frac=0.1, seed=3)
    sol = solve_network(len(truth), overlaps, ties, order=1)
    gx, gy = np.meshgrid(np.linspace(-100, 100, 11), np.linspace(-100, 100, 11))
    for f in range(len(truth)):
        err = sol.correction(f, gx.ravel(), gy.ravel()) - poly_terms(gx.ravel(), gy.ravel(), 1) @ truth[f]
        assert np.max(np.abs(err)) < 1.0
    # without robust weights the 10 % of 40 mm/yr outliers would bias the frames by several mm/yr
    plain = solve_network(len(truth), overlaps, ties, order=1, huber_k=1e9)
    err_plain = max(np.max(np.abs(plain.correction(f, gx.ravel(), gy.ravel())
                                  - poly_terms(gx.ravel(), gy.ravel(), 1) @ truth[f])) for f in range(5))
    assert err_plain > 1.0


def test_untied_component_is_held_by_prior_and_reported():
    truth, overlaps, ties = _chain(n_frames=4, tied=(0,))
    overlaps = [ov for ov in overlaps if (ov.i, ov.j) != (1, 2)]  # split the chain: frames 2-3 have no GNSS
    sol = solve_network(4, overlaps, ties, order=1)
    assert sol.held_by == ["gnss+neighbours", "neighbours", "prior", "prior"]
    assert np.all(np.abs(sol.params[2:]) < 5.0)  # stays near zero, never wild values


def test_bad_inputs():
    with pytest.raises(errors.AdjustmentError, match="neither overlaps nor GNSS"):
        solve_network(3, [], [])
    with pytest.raises(errors.ArrayArgumentError, match="distinct frames"):
        solve_network(2, [OverlapSamples(0, 0, *[np.zeros(1)] * 6, area_km2=1.0)], [])
    with pytest.raises(errors.ArrayArgumentError, match="order"):
        solve_network(2, [], [GnssTies(0, np.zeros(3), np.zeros(3), np.zeros(3), np.ones(3))], order=3)
    with pytest.raises(errors.ArrayArgumentError, match="NaN"):
        solve_network(1, [], [GnssTies(0, np.zeros(3), np.zeros(3), np.array([0, np.nan, 1.0]), np.ones(3))])


def test_ill_conditioned_network_is_detected():
    # collinear stations (on the line y = x) cannot separate the x and y ramps
    s = np.array([-50.0, 0.0, 50.0])
    ties = [GnssTies(0, s, s, np.array([1.0, 1.2, 0.9]), np.ones(3))]
    with pytest.raises(errors.NumericalError, match="ill-conditioned"):
        solve_network(1, [], ties, order=1, prior_sigma_mm_yr=1e9)  # Cholesky fails in floating point
    with pytest.raises(errors.NumericalError, match=r"condition \d\.\d+e\+1\d > 1e\+10"):
        solve_network(1, [], ties, order=1, prior_sigma_mm_yr=1e6)  # factorable, condition ~4e11 (LAPACK estimate)
    # with the default weak prior the undetermined direction is held at zero and reported, not solved wildly
    sol = solve_network(1, [], ties, order=1)
    assert sol.rcond_data < 1e-12 and np.all(np.abs(sol.params) < 2.0)
    # the summary reports the estimates to 4 digits (their last digits move with the BLAS threads)
    summ = sol.summary()
    for key, full in (("rcond", sol.rcond), ("rcond_data", sol.rcond_data)):
        assert summ[key] == float(f"{full:.4g}") and summ[key] == pytest.approx(full, rel=1e-3)
    assert 0 < summ["rcond"] < 1 and len(f"{summ['rcond']:e}".split("e")[0].rstrip("0")) <= 5


def test_per_frame_prior_keeps_well_fitted_frames_and_corrects_poor_ones():
    truth, overlaps, ties = _chain(n_frames=3, tied=(0, 1, 2))
    ties = [t for t in ties if t.frame != 2]  # frame 2 has no GNSS of its own
    tight = solve_network(3, overlaps, ties, order=1, prior_sigma_mm_yr=np.array([0.01, 20.0, 20.0]))
    assert np.all(np.abs(tight.params[0]) < 0.05)  # a tight prior pins frame 0 at zero correction
    loose = solve_network(3, overlaps, ties, order=1, prior_sigma_mm_yr=20.0)
    gx, gy = np.meshgrid(np.linspace(-100, 100, 11), np.linspace(-100, 100, 11))
    err = loose.correction(2, gx.ravel(), gy.ravel()) - poly_terms(gx.ravel(), gy.ravel(), 1) @ truth[2]
    assert np.max(np.abs(err)) < 1.5  # frame 2 is recovered through its overlap alone
    with pytest.raises(errors.ArrayArgumentError, match="prior_sigma"):
        solve_network(3, overlaps, ties, prior_sigma_mm_yr=np.array([1.0, 0.0, 1.0]))


# --- beyond a polynomial: spline surfaces and per-frame misfit sigmas ------------------------------------------

def test_spline_basis_is_a_partition_of_unity_and_reproduces_a_plane():
    from gpu_insar_adjust.network import SplineBasis

    rng = np.random.default_rng(1)
    x, y = rng.uniform(-120, 130, 500), rng.uniform(-90, 95, 500)
    b = SplineBasis.covering(x, y, 40.0)
    assert b.shape == (int(np.ceil(185 / 40)) + 3, int(np.ceil(250 / 40)) + 3) or b.size > 0
    ones = np.ones(b.size)
    assert np.allclose(b.evaluate(ones, x, y), 1.0, atol=1e-12)
    # control values on the Greville abscissae (x0 + (i − 1)·h) reproduce a linear function exactly
    ny, nx = b.shape
    gx = b.x0_km + (np.arange(nx) - 1) * b.spacing_km
    gy = b.y0_km + (np.arange(ny) - 1) * b.spacing_km
    coef = (2.0 + 0.05 * gx[None, :] - 0.03 * gy[:, None]).ravel()
    assert np.allclose(b.evaluate(coef, x, y), 2.0 + 0.05 * x - 0.03 * y, atol=1e-9)
    # evaluation (16 gathers, chunked) is the design matrix the solve uses, times the coefficients
    c = rng.standard_normal(b.size)
    cols, vals = b.design(x, y)
    assert np.allclose(b.evaluate(c, x, y, chunk=97), np.sum(c[cols] * vals, axis=1), rtol=0, atol=1e-12)


def test_frame_misfit_sigmas_find_the_frame_its_neighbours_disagree_with():
    from gpu_insar_adjust.network import frame_misfit_sigmas

    sigma = np.array([1.0, 1.2, 8.0, 0.9, 1.1])
    pairs = [{"i": i, "j": j, "n": 500, "rms_after": float(np.hypot(sigma[i], sigma[j]))}
             for i, j in [(0, 1), (1, 2), (2, 3), (3, 4), (0, 2), (2, 4), (1, 3)]]
    est = frame_misfit_sigmas(6, pairs)
    assert np.isnan(est[5])  # in no pair
    assert abs(est[2] - 8.0) < 0.3
    assert np.all(np.abs(est[[0, 1, 3, 4]] - sigma[[0, 1, 3, 4]]) < 0.8)
    # one pair alone: its misfit is shared equally
    one = frame_misfit_sigmas(2, [{"i": 0, "j": 1, "n": 10, "rms_after": 5.0}])
    assert np.allclose(one, 5.0 / np.sqrt(2.0), rtol=0.02)


def _iono_row(seed=0):
    """Three frames in a row, 250 km wide, overlapping by 80 km; the middle one carries a 120-km-wavelength
    ionosphere-like error (8 mm/yr) on top of a ramp, the outer two only ramps; a few GNSS ties each."""
    from gpu_insar_adjust.network import OverlapSamples

    rng = np.random.default_rng(seed)
    centres = np.array([0.0, 170.0, 340.0])
    ramps = rng.normal(0, 3.0, size=(3, 3))

    def error(f, xg, y):
        e = poly_terms(xg - centres[f], y, 1) @ ramps[f]
        if f == 1:
            e = e + 8.0 * np.sin(2 * np.pi * xg / 120.0 + 0.7) * np.cos(2 * np.pi * y / 140.0)
        return e

    overlaps = []
    for i in range(2):
        xg = rng.uniform(centres[i + 1] - 125, centres[i] + 125, 1500)
        y = rng.uniform(-125, 125, 1500)
        d = error(i, xg, y) - error(i + 1, xg, y) + rng.normal(0, 0.5, xg.size)
        overlaps.append(OverlapSamples(i, i + 1, xg - centres[i], y, xg - centres[i + 1], y, d,
                                       np.full(d.size, 0.5), area_km2=80 * 250, kind="across-track"))
    ties = []
    for f in range(3):
        xs, ys = rng.uniform(-110, 110, 12), rng.uniform(-110, 110, 12)
        ties.append(GnssTies(f, xs, ys, error(f, xs + centres[f], ys) + rng.normal(0, 0.5, 12), np.full(12, 0.5)))
    return centres, error, overlaps, ties


def test_spline_network_removes_what_the_overlaps_see_beyond_a_polynomial():
    from gpu_insar_adjust.network import SplineBasis

    centres, error, overlaps, ties = _iono_row()
    poly = solve_network(3, overlaps, ties, order=1, correlation_km=10.0)
    # a chain of two pairs cannot say which frame is the bad one (frame_misfit_sigmas needs a richer graph, see
    # the test above): the prior states it here
    misfit = np.array([0.5, 8.0, 0.5])
    box = np.linspace(-125, 125, 26)
    gx, gy = (a.ravel() for a in np.meshgrid(box, box))
    splines = [SplineBasis.covering(gx, gy, 40.0) for _ in range(3)]
    sol = solve_network(3, overlaps, ties, order=1, correlation_km=10.0, splines=splines,
                        spline_sigma_mm_yr=np.maximum(misfit, 0.5))
    before = poly.summary()["overlap_rms_after_mm_yr"]
    after = sol.summary()["overlap_rms_after_mm_yr"]
    assert after < 0.35 * before, (before, after)
    # inside the overlaps the middle frame's correction now follows its planted error
    for ov in overlaps:
        xg = ov.xj_km + centres[1] if ov.j == 1 else ov.xi_km + centres[1]
        xm = ov.xj_km if ov.j == 1 else ov.xi_km
        y = ov.yj_km if ov.j == 1 else ov.yi_km
        err_poly = poly.correction(1, xm, y) - error(1, xg, y)
        err_spl = sol.correction(1, xm, y) - error(1, xg, y)
        assert np.sqrt(np.mean(err_spl**2)) < 0.4 * np.sqrt(np.mean(err_poly**2))
    # the well-behaved outer frames are left (nearly) alone by their splines
    assert sol.spline_rms(0) < 0.3 * sol.spline_rms(1) and sol.spline_rms(2) < 0.3 * sol.spline_rms(1)
    assert "spline" in sol.summary()


def test_spline_arguments_are_checked():
    from gpu_insar_adjust.network import SplineBasis

    _, _, overlaps, ties = _iono_row()
    with pytest.raises(errors.ArrayArgumentError):
        solve_network(3, overlaps, ties, splines=[None, None])
    b = SplineBasis.covering([0, 100], [0, 100], 50.0)
    with pytest.raises(errors.ArrayArgumentError):
        solve_network(3, overlaps, ties, splines=[b, b, b], spline_sigma_mm_yr=np.array([1.0, np.nan, 1.0]))
    with pytest.raises(errors.ArrayArgumentError):
        SplineBasis.covering([0, 1], [0, 1], 0.0)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_row_evaluation_equals_the_scattered_points(order):
    """A geographic frame's raster rows share their y: the corrections evaluated row by row (per-row polynomial
    coefficients, four B-spline rows combined once per row) equal the point-by-point evaluation, points outside
    the spline's rectangle (clamped to its edge) included."""
    from gpu_insar_adjust.network import NetworkSolution, SplineBasis

    rng = np.random.default_rng(order)
    basis = SplineBasis(x0_km=-50.0, y0_km=-40.0, spacing_km=20.0, n_cells_x=5, n_cells_y=4)
    nt = (1, 3, 6)[order]
    sol = NetworkSolution.zeros(2, order=order)
    sol.params[:] = rng.normal(0, 5, (2, nt))
    sol.splines = [basis, None]
    sol.spline_coef = [rng.normal(0, 2, basis.size), None]
    y_rows = np.linspace(-60.0, 60.0, 37)  # beyond the rectangle at both ends
    x = np.linspace(-70.0, 70.0, 53)[None, :] * np.cos(np.radians(35.0 + y_rows / 111.0))[:, None]
    y = np.broadcast_to(y_rows[:, None], x.shape)
    for frame in (0, 1):
        want = sol.correction(frame, x.ravel(), y.ravel()).reshape(x.shape)
        got = sol.correction_rows(frame, x, y_rows)
        assert got.shape == x.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.max(np.abs(want)))
    spline_only = basis.evaluate_rows(sol.spline_coef[0], x, y_rows)
    np.testing.assert_allclose(spline_only, basis.evaluate(sol.spline_coef[0], x, y), rtol=0, atol=1e-13)
    assert np.ptp(spline_only) > 1.0  # a surface, not a constant
    with pytest.raises(errors.GiaError):
        basis.evaluate_rows(sol.spline_coef[0], x, y_rows[:-1])
