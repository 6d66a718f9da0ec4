"""GNSS velocities projected into a frame's line of sight (geodesy.gnss_los)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import rioxarray  # noqa: F401  (.rio accessor)
import xarray as xr

from gpu_insar_adjust.errors import GeometryError, GnssError, PlateModelError
from gpu_insar_adjust.geodesy import los, plates
from gpu_insar_adjust.geodesy.gnss_los import gnss_in_frame

Y = np.round(np.arange(39.0, 36.995, -0.01), 6)  # 37-39N
X = np.round(np.arange(114.6, 117.4001, 0.01), 6)  # 114.6-117.4E
INC = np.linspace(30.0, 46.0, X.size)  # incidence grows eastward (ascending, right-looking)
HEADING = -12.5


def _frame(xp, hole=None):
    inc = np.broadcast_to(INC, (Y.size, X.size))
    e, n, u = (np.array(c, dtype=np.float64) for c in los.unit_vector_from_incidence_heading(inc, HEADING))
    vel = np.zeros((Y.size, X.size))
    if hole is not None:
        for arr in (e, n, u):
            arr[hole] = np.nan
    vel[np.isnan(e)] = np.nan
    data = {k: (("y", "x"), xp.asarray(v, dtype=xp.float32))
            for k, v in (("los_e", e), ("los_n", n), ("los_u", u), ("los_velocity", vel))}
    return xr.Dataset(data, coords={"y": Y, "x": X}, attrs={"frame_id": "synthetic_asc"}).rio.write_crs("EPSG:4326")


def _stations(rows, frame="EURA-fixed"):
    df = pd.DataFrame(rows, columns=["station", "lon", "lat", "ve", "vn", "vu", "se", "sn", "su"])
    df["height"] = 0.0
    df.attrs["reference_frame"] = frame
    return df


def _hand_los(ve, vn, vu, inc):
    i, h = math.radians(inc), math.radians(HEADING)
    return -math.sin(i) * math.cos(h) * ve + math.sin(i) * math.sin(h) * vn + math.cos(i) * vu


def test_projection_in_itrf_with_hand_values(xp):
    # a 20x20-pixel no-data hole at rows 100-119, cols 50-69 (38.01-37.82N, 115.10-115.29E)
    frame = _frame(xp, hole=(slice(100, 120), slice(50, 70)))
    st = _stations([
        ("AAAA", 116.0, 38.0, 3.0, -2.0, -20.0, 0.5, 0.5, 1.0),     # pixel row 100, col 140
        ("BBBB", 115.09, 37.95, 3.0, -2.0, -5.0, 0.5, 0.5, 1.0),    # next to the hole: nearest valid pixel col 49
        ("CCCC", 115.20, 37.90, 3.0, -2.0, -5.0, 0.5, 0.5, 1.0),    # deep inside the hole: left out
        ("DDDD", 118.00, 38.00, 3.0, -2.0, -5.0, 0.5, 0.5, 1.0),    # east of the frame: left out
        ("EEEE", 116.50, 37.50, 3.0, -2.0, np.nan, 0.5, 0.5, np.nan),  # no vertical
    ])
    out = gnss_in_frame(st, frame, model="ITRF2014")
    assert list(out["station"]) == ["AAAA", "BBBB"]
    assert sorted(out.attrs["outside"]) == ["CCCC", "DDDD"] and out.attrs["no_vertical"] == ["EEEE"]
    assert out.attrs["reference_frame"] == "ITRF2014"
    a = out.iloc[0]
    assert (a["row"], a["col"]) == (100, 140)
    # EURA-fixed -> ITRF2014 adds the plate's velocity; projected by hand with the pixel's incidence
    pe, pn, pu = (float(v) for v in plates.plate_velocity_enu(116.0, 38.0, plate="EURA"))
    hand = _hand_los(3.0 + pe, -2.0 + pn, -20.0 + pu, INC[140])
    assert a["gnss_los"] == pytest.approx(hand, abs=1e-4)  # float32 unit vector
    e, n, u = los.unit_vector_from_incidence_heading(INC[140], HEADING)
    assert a["gnss_los_std"] == pytest.approx(math.sqrt((e * 0.5) ** 2 + (n * 0.5) ** 2 + (u * 1.0) ** 2), abs=1e-5)
    b = out.iloc[1]
    assert (b["row"], b["col"]) == (105, 49) and not b["horizontal_only"]


def test_horizontal_only_mode_is_explicit():
    frame = _frame(np)
    st = _stations([("EEEE", 116.50, 37.50, 3.0, -2.0, np.nan, 0.5, 0.5, np.nan),
                    ("FFFF", 116.00, 38.00, 3.0, -2.0, 1.0, 0.5, 0.5, 1.0)])
    req = gnss_in_frame(st, frame)
    assert list(req["station"]) == ["FFFF"]
    hz = gnss_in_frame(st, frame, vertical="horizontal_only")
    row = hz.set_index("station").loc["EEEE"]
    assert bool(row["horizontal_only"]) and np.isnan(row["vu"])
    pe, pn, _ = (float(v) for v in plates.plate_velocity_enu(116.5, 37.5, plate="EURA"))
    col = int(np.argmin(np.abs(X - 116.5)))
    assert row["gnss_los"] == pytest.approx(_hand_los(3.0 + pe, -2.0 + pn, 0.0, INC[col]), abs=1e-4)
    assert not bool(hz.set_index("station").loc["FFFF", "horizontal_only"])
    # a table with no vertical column at all: every station is horizontal-only
    only_h = gnss_in_frame(st.drop(columns=["vu", "su"]), frame, vertical="horizontal_only")
    assert only_h["horizontal_only"].all()
    assert len(gnss_in_frame(st.drop(columns=["vu", "su"]), frame)) == 0


def test_real_ncp_station_in_synthetic_swath(real_data):
    """HECX (Hejian, subsiding -22.2 mm/yr, IGS20) in the synthetic 38N ascending swath, frame in ITRF2020."""
    df = pd.read_csv(real_data / "gnss" / "ncp_gnss_igs20.csv", comment="#")
    df["se"], df["sn"], df["su"] = 0.3, 0.3, 1.0
    df.attrs["reference_frame"] = "IGS20"
    out = gnss_in_frame(df, _frame(np), model="ITRF2020").set_index("station")
    assert out.attrs["reference_frame"] == "ITRF2020"
    inside = set(out.index)
    assert inside == {"HECX", "HELY"}  # the only two of the 36 within 37-39N, 114.6-117.4E
    h = out.loc["HECX"]
    col = int(np.argmin(np.abs(X - 116.930907)))
    hand = _hand_los(30.3, -10.5, -22.2, INC[col])  # IGS20 = ITRF2020: no conversion
    print(f"HECX LOS in the synthetic ascending swath (incidence {INC[col]:.1f}): {h['gnss_los']:.2f} mm/yr "
          f"(hand {hand:.2f})")
    assert h["gnss_los"] == pytest.approx(hand, abs=1e-3)
    # frame already Eurasia-fixed: the station is converted instead
    fixed = gnss_in_frame(df, _frame(np), model="ITRF2020", frame_reference="EURA-fixed").set_index("station")
    pe, pn, pu = (float(v) for v in plates.plate_velocity_enu(116.930907, 38.464818, plate="EURA", model="ITRF2020"))
    assert fixed.loc["HECX", "gnss_los"] == pytest.approx(_hand_los(30.3 - pe, -10.5 - pn, -22.2 - pu, INC[col]),
                                                         abs=1e-3)


def test_bad_input():
    frame = _frame(np)
    st = _stations([("AAAA", 116.0, 38.0, 3.0, -2.0, 1.0, 0.5, 0.5, 1.0)])
    with pytest.raises(GnssError) as err:
        gnss_in_frame(st, frame, vertical="zero")
    assert "horizontal_only" in err.value.fix
    with pytest.raises(GeometryError):
        gnss_in_frame(st, frame.drop_vars("los_u"))
    with pytest.raises(GeometryError):
        gnss_in_frame(st.assign(lat=95.0), frame)
    bad = st.copy()
    bad.attrs["reference_frame"] = "PZ-90"
    with pytest.raises(PlateModelError) as err:
        gnss_in_frame(bad, frame)
    assert "IGS20" in err.value.fix
    with pytest.raises(GnssError):
        gnss_in_frame(st, frame, frame_reference="plate-fixed")


def test_per_frame_stations_stay_in_the_runs_itrf_realisation():
    """The pipeline hands the per-frame adjustment stations already converted to the ITRF of its plate model;
    the adjustment projects those velocities as they are (no second conversion back to ITRF2014)."""
    from gpu_insar_adjust.adjust.frame import _stations_in_frame

    model = "ITRF2020"  # not the conversion's default, ITRF2014
    frame = _frame(np)
    st = plates.to_itrf(_stations([("AAAA", 116.0, 38.0, 3.0, -2.0, -20.0, 0.5, 0.5, 1.0)]), "EURA", model)
    out = _stations_in_frame(st, frame)
    assert out.attrs["reference_frame"] == model
    a = out.iloc[0]
    hand = _hand_los(float(st["ve"].iloc[0]), float(st["vn"].iloc[0]), float(st["vu"].iloc[0]), INC[int(a["col"])])
    assert a["gnss_los"] == pytest.approx(hand, abs=1e-4)
