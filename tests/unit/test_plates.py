"""Plate motion from PROJ's ITRF2014/ITRF2020 plate motion models (geodesy.plates)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import rioxarray  # noqa: F401  (.rio accessor)
import xarray as xr

from gpu_insar_adjust.backend import to_numpy
from gpu_insar_adjust.errors import GeometryError, PlateModelError
from gpu_insar_adjust.geodesy import los, plates


def _stations(lon, lat, ve, vn, vu, frame, **extra):
    n = len(lon)
    df = pd.DataFrame({"station": [f"S{i:03d}" for i in range(n)], "lon": lon, "lat": lat,
                       "height": np.zeros(n), "ve": ve, "vn": vn, "vu": vu,
                       "se": np.full(n, 0.5), "sn": np.full(n, 0.5), "su": np.full(n, 1.5), **extra})
    df.attrs["reference_frame"] = frame
    return df


# ------------------------------------------------------------------------------------------------------------------
# The models as PROJ ships them
# ------------------------------------------------------------------------------------------------------------------
def test_list_plates():
    assert {"EURA", "NOAM", "PCFC", "AUST"} <= set(plates.list_plates("ITRF2014"))
    assert len(plates.list_plates("ITRF2014")) == 11
    assert {"AMUR", "CARB", "EURA"} <= set(plates.list_plates("ITRF2020"))
    assert plates.list_plates("IGS20") == plates.list_plates("ITRF2020")
    assert not any(p.endswith("_T") or p.startswith("ITRF") for p in plates.list_plates("ITRF2020"))


def test_unknown_plate_lists_known_ones():
    with pytest.raises(PlateModelError) as err:
        plates.plate_velocity_enu(116.0, 38.0, plate="EURO")
    assert "EURO" in str(err.value) and "EURA" in err.value.fix and "PCFC" in err.value.fix
    with pytest.raises(PlateModelError) as err:
        plates.list_plates("NUVEL1A")
    assert "ITRF2014" in err.value.fix
    with pytest.raises(PlateModelError):  # AMUR exists in ITRF2020-PMM only
        plates.plate_velocity_enu(130.0, 45.0, plate="AMUR", model="ITRF2014")


def test_latitude_out_of_range():
    with pytest.raises(GeometryError) as err:
        plates.plate_velocity_enu([116.0, 38.0], [38.0, 116.0])
    assert "swapped" in err.value.fix


def test_unavco_checkpoints(real_data):
    """UNAVCO plate motion calculator (ITRF2014 PMM, height 0): agreement to 0.05 mm/yr."""
    ref = pd.read_csv(real_data / "gnss" / "unavco_pmm_checkpoints_itrf2014.csv", comment="#")
    abbrev = {"Australia": "AUST", "Eurasia": "EURA", "Arabia": "ARAB"}
    worst = 0.0
    for row in ref.itertuples():
        ve, vn, _ = plates.plate_velocity_enu(row.lon_deg, row.lat_deg, plate=abbrev[row.plate], model="ITRF2014")
        worst = max(worst, abs(float(ve) - row.vel_e_mm_yr), abs(float(vn) - row.vel_n_mm_yr))
        assert math.hypot(ve, vn) == pytest.approx(row.speed_mm_yr, abs=0.05)
        assert math.degrees(math.atan2(ve, vn)) == pytest.approx(row.azimuth_deg, abs=0.1)
    print(f"UNAVCO checkpoints: worst east/north difference {worst:.3f} mm/yr")
    assert worst <= 0.05


def test_itrf2014_poles_match_altamimi_2017_table1(real_data):
    """PROJ's ITRF2014 poles (recovered through PROJ's transformation) equal Altamimi et al. (2017) Table 1."""
    table = pd.read_csv(real_data / "gnss" / "itrf2014_pmm_altamimi2017_table1.csv", comment="#")
    assert sorted(table["abbrev"]) == plates.list_plates("ITRF2014")
    for row in table.itertuples():
        omega, orb = plates.euler_vector(row.abbrev, "ITRF2014")
        np.testing.assert_allclose(omega, [row.omega_x_mas_yr, row.omega_y_mas_yr, row.omega_z_mas_yr], atol=5e-4)
        np.testing.assert_allclose(orb, 0.0, atol=1e-6)  # ITRF2014-PMM: pure rotation, no origin rate bias
        # and the pole's rate in deg/Myr (1 mas/yr = 1/3.6 deg/Myr)
        assert np.linalg.norm(omega) / 3.6 == pytest.approx(row.omega_deg_Myr, abs=0.0015)


def test_itrf2020_origin_rate_bias_added_horizontally_only():
    omega, orb = plates.euler_vector("EURA", "ITRF2020")
    np.testing.assert_allclose(orb, [0.37, 0.35, 0.74], atol=1e-6)  # ORB of Altamimi et al. (2023) Table 2
    np.testing.assert_allclose(omega, [-0.085, -0.519, 0.753], atol=5e-4)
    lon, lat = np.array([116.0, -70.0]), np.array([38.0, -45.0])
    ve, vn, vu = plates.plate_velocity_enu(lon, lat, plate="EURA", model="ITRF2020")
    # rotation alone, then the ORB's horizontal projection by hand
    x, y, z = plates._geodetic_to_cartesian(lon, lat, np.zeros(2))
    re, rn, ru = plates._cartesian_to_enu(*plates.plate_velocity_cartesian(x, y, z, plate="EURA", model="ITRF2020",
                                                                            origin_rate_bias=False), lon, lat)
    lam, phi = np.radians(lon), np.radians(lat)
    oe = -np.sin(lam) * 0.37 + np.cos(lam) * 0.35
    on = -np.sin(phi) * np.cos(lam) * 0.37 - np.sin(phi) * np.sin(lam) * 0.35 + np.cos(phi) * 0.74
    np.testing.assert_allclose(ve, re + oe, atol=1e-6)
    np.testing.assert_allclose(vn, rn + on, atol=1e-6)
    np.testing.assert_allclose(vu, ru, atol=1e-9)  # the ORB's vertical is discarded, as the model prescribes
    with pytest.raises(PlateModelError):
        plates.plate_velocity_cartesian(x, y, z, plate="EURA", model="ITRF2014", origin_rate_bias=True)


# ------------------------------------------------------------------------------------------------------------------
# Stations tables
# ------------------------------------------------------------------------------------------------------------------
def test_ncp_igs20_to_eurasia_fixed_matches_wang_shen_2020(real_data):
    df = pd.read_csv(real_data / "gnss" / "ncp_gnss_igs20.csv", comment="#")
    df.attrs["reference_frame"] = "IGS20"
    fixed = plates.to_plate_fixed(df, "EURA", "ITRF2020")
    assert fixed.attrs["reference_frame"] == "EURA-fixed"
    has = df["ve_eura_ws"].notna().to_numpy()
    assert has.sum() == 6
    de = fixed["ve"].to_numpy()[has] - df["ve_eura_ws"].to_numpy()[has]
    dn = fixed["vn"].to_numpy()[has] - df["vn_eura_ws"].to_numpy()[has]
    rms = float(np.sqrt(np.mean(np.r_[de, dn] ** 2)))
    print(f"NCP IGS20 -> EURA-fixed (ITRF2020-PMM) vs Wang & Shen (2020), 6 stations: RMS {rms:.2f} mm/yr "
          f"(east {np.sqrt(np.mean(de ** 2)):.2f}, north {np.sqrt(np.mean(dn ** 2)):.2f})")
    assert rms <= 1.5
    # the vertical is a rigid-rotation effect of < 0.2 mm/yr, so subsidence rates are unchanged
    assert np.max(np.abs(fixed["vu"] - df["vu"])) < 0.2


def test_round_trip_and_aliases():
    rng = np.random.default_rng(0)
    lon, lat = rng.uniform(100, 130, 20), rng.uniform(20, 50, 20)
    itrf = _stations(lon, lat, rng.normal(30, 3, 20), rng.normal(-10, 3, 20), rng.normal(0, 5, 20), "IGS14")
    itrf.loc[3, "vu"] = np.nan  # a horizontal-only station stays horizontal-only
    fixed = plates.to_plate_fixed(itrf, "EURA", "ITRF2014")
    assert fixed.attrs["reference_frame"] == "EURA-fixed" and itrf.attrs["reference_frame"] == "IGS14"
    back = plates.to_itrf(fixed, "EURA", "ITRF2014")
    assert back.attrs["reference_frame"] == "ITRF2014"
    for c in ("ve", "vn", "vu", "se"):
        np.testing.assert_allclose(back[c], itrf[c], atol=1e-9)
    assert np.isnan(fixed.loc[3, "vu"])
    pe, pn, _ = plates.plate_velocity_enu(lon, lat, plate="EURA")
    np.testing.assert_allclose(fixed["ve"], itrf["ve"] - pe, atol=1e-9)
    # fixed to another plate goes through the ITRF
    noam = plates.to_plate_fixed(fixed, "NOAM", "ITRF2014")
    qe, _, _ = plates.plate_velocity_enu(lon, lat, plate="NOAM")
    np.testing.assert_allclose(noam["ve"], itrf["ve"] - qe, atol=1e-9)
    with pytest.raises(PlateModelError) as err:
        plates.to_itrf(fixed, "NOAM", "ITRF2014")
    assert "EURA" in err.value.fix


def test_itrf2020_to_itrf2014_rates_from_proj():
    # PROJ's ITRF2020 -> ITRF2014 Helmert has rates dy = -0.1, dz = +0.2 mm/yr (no scale or rotation rates).
    # By hand at 116E 38N: de = cos(116)*(-0.1) = 0.0438; dn = -sin38 sin116 (-0.1) + cos38 * 0.2 = 0.2129
    st = _stations([116.0], [38.0], [30.0], [-10.0], [-20.0], "IGS20")
    out = plates.to_itrf(st, model="ITRF2014")
    assert out.attrs["reference_frame"] == "ITRF2014"
    assert out["ve"].iloc[0] - 30.0 == pytest.approx(0.0438, abs=1e-4)
    assert out["vn"].iloc[0] + 10.0 == pytest.approx(0.2129, abs=1e-4)
    again = plates.to_itrf(out.assign(), model="ITRF2020")
    np.testing.assert_allclose(again[["ve", "vn", "vu"]], st[["ve", "vn", "vu"]], atol=1e-9)


@pytest.mark.parametrize("frame", ["WGS84", "NAD83", "", None])
def test_unknown_gnss_frame(frame):
    st = _stations([116.0], [38.0], [30.0], [-10.0], [0.0], frame)
    with pytest.raises(PlateModelError) as err:
        plates.to_plate_fixed(st, "EURA", "ITRF2014")
    assert 'reference_frame' in str(err.value) and err.value.fix


def test_station_latitude_out_of_range():
    st = _stations([116.0], [98.0], [30.0], [-10.0], [0.0], "ITRF2014")
    with pytest.raises(GeometryError):
        plates.to_plate_fixed(st, "EURA")


# ------------------------------------------------------------------------------------------------------------------
# Plate motion in a frame's line of sight
# ------------------------------------------------------------------------------------------------------------------
def _swath(xp, incidence_near=30.0, incidence_far=46.0, heading=-12.5, dtype=None):
    """A synthetic Sentinel-1 ascending swath, 37-39N, 114.6-117.4E, 0.01 deg pixels; incidence grows eastward."""
    y = np.round(np.arange(39.0, 36.995, -0.01), 6)
    x = np.round(np.arange(114.6, 117.4001, 0.01), 6)
    inc = np.broadcast_to(np.linspace(incidence_near, incidence_far, x.size), (y.size, x.size))
    e, n, u = los.unit_vector_from_incidence_heading(inc, heading)
    dtype = xp.float32 if dtype is None else dtype
    data = {k: (("y", "x"), xp.asarray(np.asarray(v), dtype=dtype)) for k, v in (("los_e", e), ("los_n", n),
                                                                                 ("los_u", u))}
    ds = xr.Dataset(data, coords={"y": y, "x": x}, attrs={"frame_id": "synthetic_asc"})
    return ds.rio.write_crs("EPSG:4326")


def test_plate_motion_los_ramp_matches_hand_calculation(xp):
    frame = _swath(xp)
    plate_los = plates.plate_motion_los(frame, "EURA", "ITRF2014")
    assert plate_los.data.dtype == xp.float32 and plate_los.dims == ("y", "x")
    assert type(plate_los.data) is type(frame["los_e"].data)  # stays on the frame's backend
    got = to_numpy(plate_los.data)
    mid = frame.sizes["y"] // 2  # 38.0N
    hand = {}
    for col, inc in ((0, 30.0), (-1, 46.0)):
        lon = float(frame.x[col])
        ve, vn, vu = (round(float(v), 1) for v in plates.plate_velocity_enu(lon, 38.0, plate="EURA"))
        i, h = math.radians(inc), math.radians(-12.5)
        hand[inc] = -math.sin(i) * math.cos(h) * ve + math.sin(i) * math.sin(h) * vn + math.cos(i) * vu
        print(f"EURA ITRF2014 at {lon:.1f}E 38N: ve {ve} vn {vn} vu {vu} mm/yr; incidence {inc}: hand LOS "
              f"{hand[inc]:.2f}, computed {got[mid, col]:.2f} mm/yr")
        assert got[mid, col] == pytest.approx(hand[inc], abs=0.2)
    assert -13.0 < hand[30.0] < -11.0 and -19.0 < hand[46.0] < -17.0
    ramp = got[mid, -1] - got[mid, 0]
    assert ramp == pytest.approx(hand[46.0] - hand[30.0], abs=0.2)
    assert -6.5 < ramp < -4.5  # the 5-6 mm/yr range ramp per swath in the NCP


def test_plate_velocity_near_altamimi_pole_by_hand(real_data):
    """Independent of PROJ: v = omega x r on a sphere from the published EURA pole, at 38N 116E (~0.1 mm/yr
    sphere-vs-ellipsoid difference allowed)."""
    table = pd.read_csv(real_data / "gnss" / "itrf2014_pmm_altamimi2017_table1.csv", comment="#")
    w = table.set_index("abbrev").loc["EURA", ["omega_x_mas_yr", "omega_y_mas_yr", "omega_z_mas_yr"]].to_numpy(float)
    w = np.radians(w / 3.6e6)
    lam, phi, r = math.radians(116.0), math.radians(38.0), 6371.0e6  # mm
    pos = r * np.array([math.cos(phi) * math.cos(lam), math.cos(phi) * math.sin(lam), math.sin(phi)])
    v = np.cross(w, pos)
    ve = -math.sin(lam) * v[0] + math.cos(lam) * v[1]
    vn = -math.sin(phi) * math.cos(lam) * v[0] - math.sin(phi) * math.sin(lam) * v[1] + math.cos(phi) * v[2]
    pe, pn, _ = plates.plate_velocity_enu(116.0, 38.0, plate="EURA")
    assert float(pe) == pytest.approx(ve, abs=0.15) and float(pn) == pytest.approx(vn, abs=0.15)


def test_plate_motion_los_coarse_grid_matches_dense(cpu_xp):
    frame = _swath(cpu_xp, dtype=cpu_xp.float64)
    coarse, *_ = plates.plate_velocity_grid(frame, "EURA", "ITRF2014", coarse_step=0.5)
    ny, nx = frame.sizes["y"], frame.sizes["x"]
    lon, lat = np.meshgrid(frame.x.values, frame.y.values)
    dense = plates.plate_velocity_enu(lon, lat, plate="EURA")
    for c, d in zip(plates.plate_velocity_grid(frame, "EURA", "ITRF2014", coarse_step=0.5)[:3], dense):
        assert np.max(np.abs(c - d)) <= 0.01
    got = to_numpy(plates.plate_motion_los(frame, "EURA", "ITRF2014").data)
    e, n, u = (to_numpy(frame[v].data) for v in ("los_e", "los_n", "los_u"))
    ref = e * dense[0] + n * dense[1] + u * dense[2]
    assert np.max(np.abs(got - ref)) <= 0.01
    assert coarse.shape == (ny, nx)
    # A step too coarse for the tolerance is refined automatically.
    c2 = plates.plate_velocity_grid(frame, "EURA", "ITRF2014", coarse_step=5.0, tolerance=1e-4)
    assert c2[3] < 280 and np.max(np.abs(c2[0] - dense[0])) <= 1e-4


def test_plate_motion_los_nan_and_missing_vector():
    frame = _swath(np)
    e = frame["los_e"].values.copy()
    e[5, 7] = np.nan
    frame["los_e"] = (("y", "x"), e)
    out = plates.plate_motion_los(frame, "EURA").values
    assert np.isnan(out[5, 7]) and np.isfinite(out).sum() == out.size - 1
    with pytest.raises(GeometryError):
        plates.plate_motion_los(frame.drop_vars("los_u"), "EURA")
