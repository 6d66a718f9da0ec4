"""LOS → vertical (one geometry) and asc+desc → up + east (gpu_insar_adjust.mosaic)."""

from __future__ import annotations

import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr

from conftest import assert_matches_reference, to_numpy
from gpu_insar_adjust import mosaic as M
from gpu_insar_adjust.errors import GeometryError, InputError

# Sentinel-1 at ~38°N (ground→satellite): ascending looks east-up from the west, descending from the east
ASC = (-0.62, -0.11, 0.78)
DSC = (0.60, -0.12, 0.79)


def _unit(e, n, u):
    v = np.array([e, n, u])
    return v / np.linalg.norm(v)


def _scene(shape=(30, 40), seed=0):
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    vu = -40.0 * np.exp(-((xx - 20) ** 2 + (yy - 15) ** 2) / 60.0) + rng.normal(0, 1, shape)
    ve = 3.0 + 0.05 * xx
    vn = -2.0 + 0.03 * yy
    geoms = []
    for base in (ASC, DSC):
        e0, n0, u0 = _unit(*base)
        # incidence varies across the swath: unit vectors change slowly with x
        de = 0.002 * (xx - nx / 2)
        e = e0 + de
        u = np.sqrt(1 - e ** 2 - n0 ** 2)
        geoms.append((e, np.full(shape, n0), u))
    return vu, ve, vn, geoms


def test_up_east_recovered_exactly_from_noise_free_asc_desc(xp):
    vu, ve, vn, geoms = _scene()
    los = [e * ve + n * vn + u * vu for e, n, u in geoms]
    los[0][0, :5] = np.nan                             # a few pixels with one geometry only
    stack = lambda a: xp.asarray(np.stack(a))          # noqa: E731
    r = M.decompose_up_east(stack(los), stack([np.full(vu.shape, 2.0)] * 2), stack([g[0] for g in geoms]),
                            stack([g[1] for g in geoms]), stack([g[2] for g in geoms]), xp.asarray(vn))
    ref_up, ref_e = vu.copy(), ve.copy()
    ref_up[0, :5] = np.nan
    ref_e[0, :5] = np.nan
    assert_matches_reference(r.up, ref_up, dtype="float32", rtol=0, atol=1e-6 * 40 + 5e-6)
    assert_matches_reference(r.east, ref_e, dtype="float32", rtol=0, atol=1e-5)
    np.testing.assert_array_equal(to_numpy(r.n_geometries)[0, :6], [1, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(to_numpy(r.method)[0, :6], [0, 0, 0, 0, 0, 2])
    assert r.n_ill_conditioned == 0 and r.n_vertical_only == 0
    cond = to_numpy(r.condition)
    assert 1.0 < np.nanmax(cond) < 3.0                 # asc + desc is a well-posed pair


def test_up_east_float64_solution_is_exact():
    vu, ve, vn, geoms = _scene()
    los = np.stack([e * ve + n * vn + u * vu for e, n, u in geoms])
    S = np.full(los.shape, 1.5)
    E, N, U = (np.stack([g[k] for g in geoms]) for k in range(3))
    r = M.decompose_up_east(los, S, E, N, U, vn)
    np.testing.assert_allclose(r.up, vu, atol=1e-6 * np.abs(vu).max())
    np.testing.assert_allclose(r.east, ve, atol=1e-6 * np.abs(ve).max())


def test_up_east_covariance_matches_monte_carlo():
    rng = np.random.default_rng(42)
    m = 40_000                                           # samples of one pixel
    (e1, n1, u1), (e2, n2, u2) = _unit(*ASC), _unit(*DSC)
    s1, s2, sn = 2.0, 3.0, 1.5
    vu, ve, vn = -30.0, 4.0, -2.0
    vn_obs = vn + rng.normal(0, sn, m)                    # GNSS north field error, common to both geometries
    l1 = e1 * ve + n1 * vn + u1 * vu + rng.normal(0, s1, m)
    l2 = e2 * ve + n2 * vn + u2 * vu + rng.normal(0, s2, m)
    ones = np.ones(m)
    r = M.decompose_up_east(np.stack([l1, l2]), np.stack([s1 * ones, s2 * ones]), np.stack([e1 * ones, e2 * ones]),
                            np.stack([n1 * ones, n2 * ones]), np.stack([u1 * ones, u2 * ones]), vn_obs, sn * ones)
    sample = np.cov(np.stack([r.east.astype(np.float64), r.up.astype(np.float64)]))
    pred = r.up_east_cov[0]
    np.testing.assert_allclose(r.up_east_cov, np.broadcast_to(pred, (m, 2, 2)), rtol=1e-12)
    assert np.diag(sample) == pytest.approx(np.diag(pred), rel=0.05)
    corr_s = sample[0, 1] / np.sqrt(sample[0, 0] * sample[1, 1])
    corr_p = pred[0, 1] / np.sqrt(pred[0, 0] * pred[1, 1])
    assert corr_s == pytest.approx(corr_p, abs=0.02)
    assert r.up_std[0] ** 2 == pytest.approx(pred[1, 1], rel=1e-6)
    assert np.mean(r.up) == pytest.approx(vu, abs=4 * np.sqrt(pred[1, 1] / m))
    assert np.mean(r.east) == pytest.approx(ve, abs=4 * np.sqrt(pred[0, 0] / m))


def test_single_geometry_vertical_recovers_truth(xp):
    vu, ve, vn, geoms = _scene()
    e, n, u = geoms[1]
    los = e * ve + n * vn + u * vu
    r = M.decompose_vertical(xp.asarray(los), xp.asarray(np.full(vu.shape, 2.0)), xp.asarray(e), xp.asarray(n),
                             xp.asarray(u), xp.asarray(ve), xp.asarray(vn), se=0.5, sn=0.4)
    assert_matches_reference(r.vu, vu, dtype="float32")
    ref_std = np.sqrt(4.0 + e ** 2 * 0.25 + n ** 2 * 0.16) / u
    assert_matches_reference(r.vu_std, ref_std, dtype="float32")
    # a wrong horizontal field biases the vertical by exactly -e*dve/u: the removal really uses ve
    r2 = M.decompose_vertical(xp.asarray(los), None, xp.asarray(e), xp.asarray(n), xp.asarray(u),
                              xp.asarray(ve + 1.0), xp.asarray(vn))
    assert r2.vu_std is None
    assert_matches_reference(r2.vu, vu - e / u, dtype="float32")


def test_single_geometry_std_matches_monte_carlo():
    rng = np.random.default_rng(7)
    m = 40_000
    e, n, u = _unit(*ASC)
    sl, se, sn = 2.0, 1.0, 0.8
    los = e * 3 + n * -1 + u * -20 + rng.normal(0, sl, m)
    r = M.decompose_vertical(los, np.full(m, sl), e, n, u, 3 + rng.normal(0, se, m), -1 + rng.normal(0, sn, m),
                             se=se, sn=sn)
    assert np.std(r.vu) == pytest.approx(float(r.vu_std[0]), rel=0.05)
    assert np.mean(r.vu) == pytest.approx(-20, abs=0.1)


def test_decompose_vertical_dataarray_in_out():
    y, x = np.linspace(38, 37.9, 4), np.linspace(114, 114.1, 5)
    da = xr.DataArray(np.full((4, 5), 7.8, np.float32), dims=("y", "x"), coords={"y": y, "x": x}).rio.write_crs(4326)
    r = M.decompose_vertical(da, 1.0, 0.0, 0.0, 0.78, 0.0, 0.0)
    assert isinstance(r.vu, xr.DataArray) and r.vu.rio.crs.to_epsg() == 4326
    np.testing.assert_allclose(r.vu.values, 10.0, rtol=1e-6)
    np.testing.assert_allclose(r.vu_std.values, 1 / 0.78, rtol=1e-6)


def test_ill_conditioned_pair_is_rejected_not_wild(xp):
    """Two ascending tracks with nearly equal east components: east-up is nearly singular."""
    shape = (10, 12)
    e1, n1, u1 = _unit(-0.62, -0.11, 0.78)
    e2, n2, u2 = _unit(-0.60, -0.11, 0.79)
    vu, ve, vn = -25.0, 3.0, -1.0
    rng = np.random.default_rng(3)
    l1 = e1 * ve + n1 * vn + u1 * vu + rng.normal(0, 1, shape)
    l2 = e2 * ve + n2 * vn + u2 * vu + rng.normal(0, 1, shape)
    full = lambda v: np.full(shape, v)                   # noqa: E731
    stack = lambda a, b: xp.asarray(np.stack([a, b]))    # noqa: E731
    args = (stack(l1, l2), stack(full(1.0), full(1.0)), stack(full(e1), full(e2)), stack(full(n1), full(n2)),
            stack(full(u1), full(u2)), xp.asarray(full(vn)))
    r = M.decompose_up_east(*args)
    assert r.n_ill_conditioned == shape[0] * shape[1]
    assert np.all(np.isnan(to_numpy(r.up))) and np.all(np.isnan(to_numpy(r.east)))
    assert np.all(to_numpy(r.condition) > 100)
    # with the GNSS east velocity the vertical is still determined, from both tracks
    r2 = M.decompose_up_east(*args, ve=xp.asarray(full(ve)), se=0.5)
    up = to_numpy(r2.up)
    assert np.all(to_numpy(r2.method) == 1) and np.all(np.isnan(to_numpy(r2.east)))
    assert np.abs(up - vu).max() < 5 * float(to_numpy(r2.up_std).max())
    ref_std = np.sqrt(1 / (u1 ** 2 + u2 ** 2) + (0.5 * (u1 * e1 + u2 * e2) / (u1 ** 2 + u2 ** 2)) ** 2)
    assert_matches_reference(r2.up_std, full(ref_std), dtype="float32")
    # the same pair solved anyway would amplify 1 mm/yr noise into > 10 mm/yr east errors
    A = np.array([[e1, u1], [e2, u2]])
    assert np.sqrt(np.linalg.inv(A.T @ A)[0, 0]) > 10


def test_one_geometry_falls_back_only_with_ve(xp):
    vu, ve, vn, geoms = _scene((6, 8))
    los = np.stack([e * ve + n * vn + u * vu for e, n, u in geoms])
    los[1, :, :4] = np.nan                                # left half seen by ascending only
    E, N, U = (xp.asarray(np.stack([g[k] for g in geoms])) for k in range(3))
    S = xp.asarray(np.full(los.shape, 1.0))
    r = M.decompose_up_east(xp.asarray(los), S, E, N, U, xp.asarray(vn))
    up = to_numpy(r.up)
    assert np.all(np.isnan(up[:, :4])) and np.all(to_numpy(r.n_geometries)[:, :4] == 1)
    r2 = M.decompose_up_east(xp.asarray(los), S, E, N, U, xp.asarray(vn), ve=xp.asarray(ve))
    ref = vu.copy()
    assert_matches_reference(r2.up, ref, dtype="float32")
    np.testing.assert_array_equal(to_numpy(r2.method)[0], [1, 1, 1, 1, 2, 2, 2, 2])
    assert r2.n_vertical_only == 6 * 4
    single = M.decompose_vertical(xp.asarray(los[0]), xp.asarray(np.ones(vu.shape)), E[0, ...], N[0, ...],
                                  U[0, ...], xp.asarray(ve), xp.asarray(vn))
    np.testing.assert_allclose(to_numpy(r2.up_std)[:, :4], to_numpy(single.vu_std)[:, :4], rtol=1e-6)


def test_decompose_bad_inputs(xp):
    shape = (3, 4)
    ones = np.ones((2,) + shape)
    E = np.stack([np.full(shape, ASC[0]), np.full(shape, DSC[0])])
    N = np.stack([np.full(shape, ASC[1]), np.full(shape, DSC[1])])
    U = np.stack([np.full(shape, ASC[2]), np.full(shape, DSC[2])])
    bad_std = ones.copy()
    bad_std[1, 0, 0] = 0.0
    with pytest.raises(InputError) as ei:
        M.decompose_up_east(xp.asarray(ones), xp.asarray(bad_std), xp.asarray(E), xp.asarray(N), xp.asarray(U),
                            xp.asarray(np.zeros(shape)))
    assert ei.value.field == "std_stack"
    with pytest.raises(GeometryError) as ei:
        M.decompose_up_east(xp.asarray(ones), xp.asarray(ones), xp.asarray(E), xp.asarray(N), xp.asarray(-U),
                            xp.asarray(np.zeros(shape)))
    assert ei.value.field == "u_stack"
    with pytest.raises(InputError) as ei:
        M.decompose_vertical(xp.asarray(ones[0]), xp.asarray(np.full(shape, np.nan)), xp.asarray(E[0]),
                             xp.asarray(N[0]), xp.asarray(U[0]), xp.asarray(np.zeros(shape)),
                             xp.asarray(np.zeros(shape)))
    assert ei.value.field == "los_std"
    with pytest.raises(GeometryError) as ei:
        M.decompose_vertical(xp.asarray(ones[0]), None, xp.asarray(E[0]), xp.asarray(N[0]), xp.asarray(U[0] * 0),
                             xp.asarray(np.zeros(shape)), xp.asarray(np.zeros(shape)))
    assert ei.value.field == "u"


def test_east_prior_outweighs_a_poorly_corrected_geometry(cpu_xp):
    """The descending LOS carries a 10 mm/yr error that its sigma (8 mm/yr, its frame's CV RMSE) admits; the
    ascending LOS is good (1 mm/yr) and the GNSS east is known to 1.5 mm/yr. Without the prior the error goes
    straight into up and east (two equations, two unknowns); with it, up stays near the truth."""
    vu, ve, vn, geoms = _scene()
    (ea, na, ua), (ed, nd, ud) = geoms
    los_a = ea * ve + na * vn + ua * vu
    los_d = ed * ve + nd * vn + ud * vu + 10.0
    std = np.stack([np.full(vu.shape, 1.0), np.full(vu.shape, 8.0)])
    args = [cpu_xp.asarray(a) for a in (np.stack([los_a, los_d]), std, np.stack([ea, ed]), np.stack([na, nd]),
                                        np.stack([ua, ud]), vn)]
    plain = M.decompose_up_east(*args)
    prior = M.decompose_up_east(*args, ve=cpu_xp.asarray(ve), se=cpu_xp.asarray(np.full(vu.shape, 1.5)),
                                east_prior=True)
    err_plain = np.abs(to_numpy(plain.up) - vu)
    err_prior = np.abs(to_numpy(prior.up) - vu)
    # exact two-geometry solution: the 10 mm/yr LOS error becomes ~5 mm/yr of up error
    assert np.median(err_plain) > 4.0
    # with the prior: the bad geometry is outweighed (weight 1/64 against 1 and 1/2.25)
    assert np.median(err_prior) < 1.0
    assert np.all(to_numpy(prior.method) == 2)
    east_err = np.abs(to_numpy(prior.east) - ve)
    assert np.median(east_err) < 1.0
    # the posterior sigma of up is below that of the plain solution (the prior adds information)
    assert np.all(to_numpy(prior.up_std) < to_numpy(plain.up_std))
    with pytest.raises(Exception) as exc:
        M.decompose_up_east(*args, east_prior=True)
    assert "ve" in str(exc.value)


@pytest.mark.parametrize("east_prior,with_ve,with_se,with_sn", [
    (False, True, True, True), (False, True, False, False), (False, False, False, True),
    (False, False, False, False), (True, True, True, True), (True, True, True, False)])
def test_fused_cpu_kernel_equals_the_array_path_bit_for_bit(monkeypatch, east_prior, with_ve, with_se, with_sn):
    """With numba the decomposition of NumPy stacks runs as one per-pixel pass (kernels.cpu.up_east); it must
    give the array-API path's every output bit for bit. Three geometries (two ascending tracks, nearly
    parallel, and a descending one), float32 stacks with NaN holes, a pixel where only the two ascending ones
    remain (ill-conditioned), pixels with one or no geometry, NaN in the GNSS field."""
    pytest.importorskip("numba")
    from gpu_insar_adjust.kernels import cpu

    monkeypatch.setenv("GIA_CPU_KERNELS", "numba")
    assert cpu.fused_for(np)
    rng = np.random.default_rng(7)
    shape = (3, 37, 41)
    vu, ve, vn, geoms = _scene(shape[1:])
    asc2 = tuple(g + 0.01 for g in geoms[0])
    trip = [geoms[0], asc2, geoms[1]]
    E, N, U = (np.stack([g[c] for g in trip]).astype(np.float32) for c in range(3))
    los = (E * ve + N * vn + U * vu + rng.normal(0, 2, shape)).astype(np.float32)
    std = rng.uniform(0.5, 5.0, shape).astype(np.float32)
    los[rng.random(shape) < 0.25] = np.nan
    los[2, 5, 5] = np.nan  # two nearly parallel ascending geometries only: ill-conditioned
    los[:, 6, 6] = np.nan  # none
    los[1:, 7, 7] = np.nan  # one
    ve_ = np.where(rng.random(shape[1:]) < 0.05, np.nan, ve)
    kw = dict(ve=ve_ if with_ve else None, se=rng.uniform(0.5, 2, shape[1:]) if with_se else None,
              east_prior=east_prior, warn=False)
    sn = rng.uniform(0.2, 1.0, shape[1:]) if with_sn else None
    fused = M.decompose_up_east(los, std, E, N, U, vn, sn, **kw)
    monkeypatch.setenv("GIA_CPU_KERNELS", "numpy")  # the array-API path on the same NumPy arrays
    ref = M.decompose_up_east(los, std, E, N, U, vn, sn, **kw)
    assert ref.n_ill_conditioned == fused.n_ill_conditioned and (ref.n_ill_conditioned > 0) != east_prior
    assert ref.n_vertical_only == fused.n_vertical_only
    assert {int(m) for m in np.unique(ref.method)} >= {0, 2}
    for name in ("up", "east", "up_std", "east_std", "up_east_cov", "n_geometries", "method", "condition"):
        a, b = np.asarray(getattr(ref, name)), np.asarray(getattr(fused, name))
        assert a.dtype == b.dtype and a.shape == b.shape, name
        _assert_same_bits(b, a, name)


def _assert_same_bits(got, want, name=""):
    """Equal bit for bit (so -0.0 differs from 0.0), apart from the payload of NaNs, which NumPy's arithmetic
    and a kernel's NaN constant set differently without meaning."""
    got, want = np.asarray(got), np.asarray(want)
    if not np.issubdtype(want.dtype, np.floating):
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=name)
    bits = np.dtype(f"u{want.dtype.itemsize}")
    np.testing.assert_array_equal(got[~nan].view(bits), want[~nan].view(bits), err_msg=name)


def test_fused_cpu_kernel_raises_the_same_errors(monkeypatch):
    pytest.importorskip("numba")
    shape = (2, 4, 5)
    ones = np.ones(shape, np.float32)
    E, N, U = ones * 0.6, ones * -0.1, ones * 0.79
    bad_std = ones.copy()
    bad_std[1, 2, 3] = 0.0
    for engine in ("numba", "numpy"):
        monkeypatch.setenv("GIA_CPU_KERNELS", engine)
        with pytest.raises(InputError) as ei:
            M.decompose_up_east(ones, bad_std, E, N, U, 0.0)
        assert ei.value.field == "std_stack"
        with pytest.raises(GeometryError) as ei:
            M.decompose_up_east(ones, ones, E, N, -U, 0.0)
        assert ei.value.field == "u_stack"


def test_vertical_is_nan_where_the_up_component_is_missing():
    """A finite LOS with no up component has no vertical: NaN with a NaN sigma, not the LOS less the horizontal
    motion (3.9 mm/yr here) with the LOS sigma."""
    los, e, n, u = (np.array([5.0, 5.0]), np.array([0.6, 0.6]), np.array([-0.1, -0.1]), np.array([np.nan, 0.79]))
    r = M.decompose_vertical(los, np.array([1.0, 1.0]), e, n, u, np.array([2.0, 2.0]), np.array([1.0, 1.0]))
    vu, sd = np.asarray(r.vu), np.asarray(r.vu_std)
    assert np.isnan(vu[0]) and np.isnan(sd[0])
    assert vu[1] == pytest.approx((5.0 - 0.6 * 2.0 + 0.1 * 1.0) / 0.79, rel=1e-6)
