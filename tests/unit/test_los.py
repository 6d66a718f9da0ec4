"""LOS unit vectors, conventions and projections (geodesy.los), on every array backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_matches_reference

from gpu_insar_adjust.errors import ArrayArgumentError, GeometryError, GiaError
from gpu_insar_adjust.geodesy import los


def _ref_heading(inc, hd):
    i, h = np.radians(inc), np.radians(hd)
    return -np.sin(i) * np.cos(h), np.sin(i) * np.sin(h), np.cos(i)


def test_sentinel1_ascending_hand_values(xp):
    # Hand calculation: sin 39° = 0.6293, cos 39° = 0.7771, cos 12° = 0.9781, sin 12° = 0.2079
    # E = -0.6293*0.9781 = -0.6156, N = 0.6293*(-0.2079) = -0.1308, U = 0.7771
    e, n, u = los.unit_vector_from_incidence_heading(xp.asarray([39.0]), xp.asarray([-12.0]))
    assert_matches_reference(e, [-0.6156], atol=1e-4, rtol=0)
    assert_matches_reference(n, [-0.1308], atol=1e-4, rtol=0)
    assert_matches_reference(u, [0.7771], atol=1e-4, rtol=0)
    # descending (heading -168°) looks west: E flips sign, N keeps it
    e, n, u = los.unit_vector_from_incidence_heading(xp.asarray([39.0]), xp.asarray([-168.0]))
    assert_matches_reference(e, [0.6156], atol=1e-4, rtol=0)
    assert_matches_reference(n, [-0.1308], atol=1e-4, rtol=0)


def test_heading_and_azimuth_agree_with_formulas(xp):
    rng = np.random.default_rng(1)
    inc = rng.uniform(1, 89, 200)
    hd = rng.uniform(-180, 180, 200)
    e, n, u = los.unit_vector_from_incidence_heading(xp.asarray(inc), xp.asarray(hd))
    re, rn, ru = _ref_heading(inc, hd)
    for got, ref in ((e, re), (n, rn), (u, ru)):
        assert_matches_reference(got, ref)
    # MintPy azimuth = 90° - heading (right-looking) gives the same vector
    az = los.azimuth_from_heading(xp.asarray(hd))
    e2, n2, u2 = los.unit_vector_from_incidence_azimuth(xp.asarray(inc), az)
    for got, ref in ((e2, re), (n2, rn), (u2, ru)):
        assert_matches_reference(got, ref)
    assert_matches_reference(los.azimuth_from_heading(xp.asarray([-12.0])), [102.0])


def test_round_trips(xp):
    rng = np.random.default_rng(2)
    inc = rng.uniform(1, 89, 300)
    az = rng.uniform(-179, 179, 300)
    e, n, u = los.unit_vector_from_incidence_azimuth(xp.asarray(inc), xp.asarray(az))
    inc2, az2 = los.incidence_azimuth_from_unit_vector(e, n, u)
    assert_matches_reference(inc2, inc, rtol=1e-9)
    assert_matches_reference(az2, az, rtol=1e-9)
    hd = los.heading_from_unit_vector(e, n, u)
    assert_matches_reference(hd, np.degrees(np.arctan2(np.cos(np.radians(az)), np.sin(np.radians(az)))),
                             rtol=1e-9)
    assert_matches_reference(los.heading_from_azimuth(los.azimuth_from_heading(hd)), backend_np(hd), rtol=1e-9)
    # LOS <-> vertical with the horizontal known
    ve, vn, vu = 3.0, -2.0, xp.asarray(rng.normal(0, 10, 300))
    v = los.enu_to_los(ve, vn, vu, e, n, u)
    assert_matches_reference(los.los_to_vertical(v, e, n, u, ve, vn), backend_np(vu), rtol=1e-9)


def backend_np(a):
    from gpu_insar_adjust.backend import to_numpy

    return np.asarray(to_numpy(a), dtype=np.float64)


def test_float32_storage_preserved(xp):
    inc = xp.asarray([30.0, 40.0], dtype=xp.float32)
    e, n, u = los.unit_vector_from_incidence_heading(inc, -12.0)
    assert e.dtype == xp.float32 and u.dtype == xp.float32
    assert_matches_reference(u, np.cos(np.radians([30.0, 40.0])), dtype="float32")


def test_enu_to_los_and_uncertainty(xp):
    e, n, u = los.unit_vector_from_incidence_heading(xp.asarray([39.0]), xp.asarray([-12.0]))
    # 30 mm/yr east, -10 north, -20 up: -0.6156*30 + -0.1308*-10 + 0.7771*-20 = -18.468 + 1.308 - 15.542 = -32.70
    v = los.enu_to_los(30.0, -10.0, -20.0, e, n, u)
    assert_matches_reference(v, [-32.70], atol=0.005, rtol=0)
    # sigma with a full covariance equals sqrt(g^T C g)
    cov = np.array([[1.0, 0.3, 0.1], [0.3, 2.0, -0.2], [0.1, -0.2, 9.0]])
    g = np.array(_ref_heading(39.0, -12.0))
    expected = math.sqrt(g @ cov @ g)
    s = los.enu_std_to_los_std(1.0, math.sqrt(2.0), xp.asarray([3.0]), e, n, u,
                               cov_en=0.3, cov_eu=0.1, cov_nu=-0.2)
    assert_matches_reference(s, [expected], rtol=1e-12)
    # NaN sigma stays NaN (an unknown component is not exact)
    s_nan = los.enu_std_to_los_std(1.0, 1.0, xp.asarray([float("nan")]), e, n, u)
    assert np.isnan(backend_np(s_nan)).all()


def test_orbit_direction(xp):
    e, n, u = los.unit_vector_from_incidence_heading(xp.asarray([31.0, 40.0, float("nan")]), -12.0)
    assert los.orbit_direction(e) == "ascending"
    e, n, u = los.unit_vector_from_incidence_heading(xp.asarray([31.0, 40.0]), -168.0)
    assert los.orbit_direction(e) == "descending"


def test_unit_vector_validation(xp):
    e, n, u = los.unit_vector_from_incidence_heading(xp.asarray([35.0, float("nan")]), -12.0)
    los.unit_vector_from_enu(e, n, u)  # NaN (no data) is not an error
    with pytest.raises(GeometryError) as err:
        los.unit_vector_from_enu(e * 1000.0, n * 1000.0, u * 1000.0, file="E.geo.tif")
    assert "norm" in str(err.value) and "E.geo.tif" in str(err.value) and err.value.fix
    with pytest.raises(GeometryError) as err:
        los.check_unit_vector(-e, -n, -u)
    assert "negate" in err.value.fix


@pytest.mark.parametrize("bad", [95.0, -1.0])
def test_incidence_out_of_range(xp, bad):
    with pytest.raises(GeometryError) as err:
        los.unit_vector_from_incidence_heading(xp.asarray([30.0, bad]), xp.asarray([-12.0, -12.0]))
    assert isinstance(err.value, GiaError) and "0-90" in str(err.value) and "radians" in err.value.fix
    with pytest.raises(GeometryError):
        los.unit_vector_from_incidence_azimuth(xp.asarray([bad]), xp.asarray([102.0]))


def test_real_licsar_unit_vectors(real_data):
    """LiCSAR E/N/U rasters of the NAF frames: unit norm, right orbit direction, Sentinel-1 geometry."""
    rasterio = pytest.importorskip("rasterio")
    root = real_data / "naf_licsbas_4frames"
    found = {}
    for frame in ("014A_04939_131313", "094D_04913_101213"):
        comps = []
        for c in "ENU":
            with rasterio.open(root / frame / f"{c}.geo.tif") as src:
                comps.append(src.read(1, masked=True).filled(np.nan).astype(np.float64))
        e, n, u = los.unit_vector_from_enu(*comps)
        inc, az = los.incidence_azimuth_from_unit_vector(e, n, u)
        hd = los.heading_from_unit_vector(e, n, u)
        found[frame] = (los.orbit_direction(e), float(np.nanmin(inc)), float(np.nanmax(inc)), float(np.nanmedian(hd)))
    assert found["014A_04939_131313"][0] == "ascending"
    assert found["094D_04913_101213"][0] == "descending"
    for direction, lo, hi, hd in found.values():
        assert 28.0 < lo < hi < 47.0  # Sentinel-1 IW incidence range
    assert -16.0 < found["014A_04939_131313"][3] < -8.0
    assert -172.0 < found["094D_04913_101213"][3] < -164.0


def test_against_mintpy():
    utils0 = pytest.importorskip("mintpy.utils.utils0")
    rng = np.random.default_rng(3)
    inc, az = rng.uniform(20, 50, 50), rng.uniform(-180, 180, 50)
    ref = utils0.get_unit_vector4component_of_interest(inc, az, comp="enu2los")
    got = los.unit_vector_from_incidence_azimuth(inc, az)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# Argument validation: ArrayArgumentError naming the argument, never a bare NumPy error
# ----------------------------------------------------------------------------------------------------------------
def test_mismatched_shapes_name_the_argument(xp):
    e, n, u = los.unit_vector_from_incidence_heading(xp.asarray([39.0, 40.0, 41.0]), -12.0)
    with pytest.raises(ArrayArgumentError) as err:
        los.enu_to_los(xp.asarray([1.0, 2.0]), 0.0, 0.0, e, n, u)
    assert err.value.field == "e" and "(3,)" in str(err.value) and "(2,)" in str(err.value)
    assert "same shape" in err.value.fix and isinstance(err.value, GiaError)
    with pytest.raises(ArrayArgumentError) as err:
        los.enu_std_to_los_std(1.0, 1.0, 1.0, e, n, u, cov_en=xp.zeros((4,)))
    assert err.value.field == "cov_en"
    with pytest.raises(ArrayArgumentError) as err:
        los.unit_vector_from_incidence_heading(xp.zeros((2, 3)) + 30.0, xp.zeros((2, 2)))
    assert err.value.field == "heading_deg"
    with pytest.raises(ArrayArgumentError) as err:
        los.check_unit_vector(e, n, u[:2])
    assert err.value.field == "u"
    # shapes that broadcast are fine: a (rows, 1) column against a (1, cols) row gives (rows, cols)
    v = los.enu_to_los(xp.ones((2, 1)), 0.0, 0.0, xp.ones((1, 3)), 0.0, 0.0)
    assert tuple(v.shape) == (2, 3)
    assert_matches_reference(v, np.ones((2, 3)))


@pytest.mark.parametrize("bad, what", [("39.0", "str"), (None, "NoneType"), (b"x", "bytes"), ({}, "dict")])
def test_non_numeric_arguments_rejected(bad, what):
    with pytest.raises(ArrayArgumentError) as err:
        los.unit_vector_from_incidence_heading(bad, -12.0)
    assert err.value.field == "incidence_deg" and what in str(err.value) and "float array" in err.value.fix
    with pytest.raises(ArrayArgumentError) as err:
        los.enu_to_los(1.0, 2.0, 3.0, 0.6, 0.1, bad)
    assert err.value.field == "u"


def test_bool_complex_and_text_arrays_rejected(xp):
    with pytest.raises(ArrayArgumentError, match="boolean") as err:
        los.los_to_vertical(xp.asarray([True, False]), 0.0, 0.0, 0.78)
    assert err.value.field == "v_los"
    with pytest.raises(ArrayArgumentError, match="boolean"):
        los.azimuth_from_heading(True)
    with pytest.raises(ArrayArgumentError, match="complex") as err:
        los.enu_to_los(1.0, 1.0, 1j, 0.6, 0.1, 0.78)
    assert err.value.field == "vu"
    with pytest.raises(ArrayArgumentError, match="dtype") as err:
        los.heading_from_unit_vector(np.array(["0.6"]), np.array([0.1]))
    assert err.value.field == "e"
    with pytest.raises(ArrayArgumentError, match="not a regular array") as err:
        los.orbit_direction([[0.6, 0.5], [0.4]])
    assert err.value.field == "e"


def test_integers_are_converted_to_float(xp):
    # integer degrees are a valid input and give exactly the float result (not integer arithmetic)
    e, n, u = los.unit_vector_from_incidence_heading(xp.asarray([39, 40]), xp.asarray([-12, -12]))
    ref = _ref_heading(np.array([39.0, 40.0]), -12.0)
    assert e.dtype == xp.float64
    for got, r in zip((e, n, u), ref):
        assert_matches_reference(got, r, rtol=1e-15)
    assert_matches_reference(los.enu_to_los(30, -10, -20, e, n, u), 30 * ref[0] - 10 * ref[1] - 20 * ref[2],
                             rtol=1e-14)
    # a list of numbers works like the array
    assert_matches_reference(los.azimuth_from_heading([-12, 12.5]), [102.0, 77.5])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_unit_vector_check_decides_as_the_array_form(dtype, monkeypatch):
    """The one-pass check (numba) accepts exactly what the array form accepts, in the arrays' own dtype: norms
    on both sides of the tolerance, NaN (no data), an up component below zero."""
    from gpu_insar_adjust.kernels import cpu

    if cpu.cpu_engine() != "numba":
        pytest.skip("the fused check needs numba")
    rng = np.random.default_rng(3)
    d = np.concatenate([rng.uniform(-0.03, 0.03, 2000), [0.02, -0.02, 0.0199999, 0.0200001, np.nan]])
    u = (1.0 + d).astype(dtype)
    z = np.zeros_like(u)

    def array_form(e, n, u):
        norm = np.sqrt(e * e + n * n + u * u)
        return not (np.any(np.abs(norm - 1.0) > 0.02) or np.any(u < 0.0))

    for k in range(u.size):
        one = u[k:k + 1]
        assert los._unit_vectors_pass(z[:1], z[:1], one, 0.02) == array_form(z[:1], z[:1], one), (k, one)
    assert los._unit_vectors_pass(z[:1], z[:1], -np.ones(1, dtype), 0.02) is False
    assert los._unit_vectors_pass(z[:1], z[:1], np.full(1, np.nan, dtype), 0.02) is True
    # a failing pixel among valid ones: the array form reports it, with its count
    inc, az = rng.uniform(30, 45, 5000), rng.uniform(0, 360, 5000)
    e, n, u = (a.astype(dtype) for a in los.unit_vector_from_incidence_azimuth(inc, az))
    los.check_unit_vector(e, n, u)
    e[17] = 0.95
    with pytest.raises(GeometryError, match="1 LOS unit vectors"):
        los.check_unit_vector(e, n, u)
    # without numba the array form alone decides, the same way
    monkeypatch.setenv("GIA_CPU_KERNELS", "numpy")
    assert los._unit_vectors_pass(e, n, u, 0.02) is False
    with pytest.raises(GeometryError, match="1 LOS unit vectors"):
        los.check_unit_vector(e, n, u)
