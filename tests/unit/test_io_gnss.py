"""GNSS readers: CSV, MIDAS, tenv3, .neu; the robust velocity fit with white + flicker noise; bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from gpu_insar_adjust.errors import GnssError
from gpu_insar_adjust.io.gnss import (STATION_COLUMNS, _flicker_filter, detect_format, fit_station_velocity,
                                      read_gnss, read_position_series)


# ---------------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.real_data
def test_bjfs_neu_velocity_matches_header(real_data):
    series = read_position_series(real_data / "gnss" / "bjfsCleanUnf.neu")
    assert series.attrs["station"] == "BJFS" and len(series) > 3000
    assert series["time"].is_monotonic_increasing
    fit = fit_station_velocity(series)
    header = {"n": (-10.5, 0.2), "e": (30.4, 0.3), "u": (2.4, 0.6)}  # SOPAC model slopes ± sigma, mm/yr
    for c, (rate, sigma) in header.items():
        assert abs(fit[f"v{c}"] - rate) < 0.5, (c, fit[f"v{c}"])
        # Flicker noise makes the realistic sigma several times the white-noise-only one ...
        assert fit[f"s{c}"] > 3.0 * fit[f"s{c}_white"]
        # ... and of the size SOPAC's own noise analysis gives (within a factor of 2).
        assert 0.5 * sigma < fit[f"s{c}"] < 2.0 * sigma, (c, fit[f"s{c}"])
        assert fit[f"flicker_{c}"] > 1.0  # mm/yr^0.25, typical 2-15
    assert fit["annual_u"] == pytest.approx(9.2, abs=2.0)  # header: 9.2 ± 1.1 mm


@pytest.mark.real_data
def test_mexico_city_tenv3(real_data):
    path = real_data / "gnss" / "MXTM.NA.tenv3"
    assert detect_format(path) == "tenv3"
    series = read_position_series(path)
    a = series.attrs
    assert a["station"] == "MXTM" and abs(a["lon"] + 99.0) < 0.15 and abs(a["lat"] - 19.45) < 0.1
    assert 2200 < a["height"] < 2250
    fall = series["u"].iloc[-1] - series["u"].iloc[0]
    assert -560 < fall < -500  # the up component falls ~0.53 m
    df = read_gnss(path, "NOAM-fixed")
    assert list(df.columns) == STATION_COLUMNS and df.attrs["reference_frame"] == "NOAM-fixed"
    row = df.iloc[0]
    assert -300 < row.vu < -260 and 0 < row.su < 10  # ~-280 mm/yr of subsidence
    assert df.attrs["fits"]["MXTM"]["n_obs"] == len(series)


@pytest.mark.real_data
def test_tenv3_frame_name_hint_warns(real_data):
    with pytest.warns(UserWarning, match="NA"):
        read_gnss(real_data / "gnss" / "MXTM.NA.tenv3", "ITRF2014")


@pytest.mark.real_data
def test_ncp_csv_with_default_sigma(real_data):
    path = real_data / "gnss" / "ncp_gnss_igs20.csv"
    with pytest.raises(GnssError) as ei:
        read_gnss(path, "IGS20")  # the table publishes no sigmas
    assert ei.value.field == "se" and "se, sn, su" in str(ei.value)
    df = read_gnss(path, "IGS20", default_sigma=1.0)
    assert len(df) == 36 and df["station"].is_unique
    st = df.set_index("station")
    assert st.loc["TJWQ", "vu"] == pytest.approx(-47.2) and st.loc["BJFS", "ve"] == pytest.approx(31.0)
    assert (df["se"] == 1.0).all() and np.isnan(df["height"]).all()


# ---------------------------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------------------------
GOOD_CSV = """# comment line
station,lon,lat,ve,vn,vu,se,sn,su,height,extra
AAAA,116.0,39.0,30.1,-10.2,-20.5,0.3,0.3,0.8,50.0,x
BBBB,200.5,38.5,29.0,-9.0,,0.4,0.4,,,y
"""


def test_csv_reader(tmp_path):
    p = tmp_path / "v.csv"
    p.write_text(GOOD_CSV)
    df = read_gnss(p, "ITRF2014")
    assert list(df.columns) == STATION_COLUMNS and len(df) == 2
    assert df.attrs == {"reference_frame": "ITRF2014", "path": str(p), "format": "csv"}
    b = df.set_index("station").loc["BBBB"]
    assert b.lon == pytest.approx(-159.5) and np.isnan(b.vu) and np.isnan(b.su) and np.isnan(b.height)
    assert df.set_index("station").loc["AAAA", "vu"] == -20.5


@pytest.mark.parametrize("text, field, needle", [
    ("station,lon,lat,ve,vn,vu,se,sn\nA,1,2,3,4,5,1,1\n", "su", "su"),                         # missing column
    ("station,lon,lat,ve,vn,vu,se,sn,su\nA,1,2,3.1.2,4,5,1,1,1\n", "ve", "'3.1.2'"),          # non-numeric
    ("station,lon,lat,ve,vn,vu,se,sn,su\nA,1,2,3,4,5,1,1,1\na,1,2,3,4,5,1,1,1\n", "station", "A, a"),  # dup
    ("station,lon,lat,ve,vn,vu,se,sn,su\nA,1,2,,4,5,1,1,1\n", "ve", "Empty"),                   # empty ve
    ("station,lon,lat,ve,vn,vu,se,sn,su\nA,1,2,3,4,5,0,1,1\n", "se", "sigma"),                  # zero sigma
    ("station,lon,lat,ve,vn,vu,se,sn,su\nA,1,2,3,4,5,1,1,\n", "su", "su"),                      # vu without su
    ("station,lon,lat,ve,vn,vu,se,sn,su\nA,1,95,3,4,5,1,1,1\n", "lat", "swapped"),              # bad latitude
])
def test_csv_bad_input(tmp_path, text, field, needle):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(GnssError) as ei:
        read_gnss(p)
    e = ei.value
    assert e.field == field and e.fix and e.file == str(p)
    assert needle in str(e) and "bad.csv" in str(e)


HEADER = "station,lon,lat,ve,vn,vu,se,sn,su\n"


def test_csv_row_with_one_field_too_many_is_refused(tmp_path):
    # pandas took the first column as the index: station '10.1', lon 45.9, ... were accepted
    p = tmp_path / "v.csv"
    p.write_text("# comment\n" + HEADER + "B,11,46,2,15,1,0.3,0.3,0.8\nA,10.1,45.9,2,15,1,0.3,0.3,0.8,7\n"
                 "C,1,2,3,4,5,1,1\n")
    with pytest.raises(GnssError) as ei:
        read_gnss(p)
    assert ei.value.field == "line 4" and "line 4 (10), line 5 (8)" in str(ei.value)
    p.write_text(HEADER + "A,10.1,45.9,2,15,1,0.3,0.3,0.8,7\n")  # also as the only data row
    with pytest.raises(GnssError, match="header's 9 fields: line 2 \\(10\\)"):
        read_gnss(p)


def test_csv_trailing_comma_on_every_row_is_tolerated(tmp_path):
    p = tmp_path / "v.csv"
    p.write_text(HEADER + "A,10.1,45.9,2,15,1,0.3,0.3,0.8,\nB,11,46,2,15,,0.3,0.3,,\n")
    df = read_gnss(p).set_index("station")
    assert list(df.index) == ["A", "B"] and df.loc["A", "ve"] == 2.0 and df.loc["A", "su"] == 0.8
    assert np.isnan(df.loc["B", "vu"])
    p.write_text(HEADER + "A,10.1,45.9,2,15,1,0.3,0.3,0.8,\nB,11,46,2,15,,0.3,0.3,\n")  # only on some rows
    with pytest.raises(GnssError) as ei:
        read_gnss(p)
    assert ei.value.field == "line 2" and "line 2 (10)" in str(ei.value)


@pytest.mark.parametrize("row, field, needle", [
    ("A,-9999,45.9,2,15,1,0.3,0.3,0.8", "lon", "Longitudes outside"),
    ("A,10,-9999,2,15,1,0.3,0.3,0.8", "lat", "Latitudes outside"),
    ("A,10,45,2,15,inf,0.3,0.3,", "vu", "infinite"),
    ("A,10,45,2,15,1,0.3,0.3,-inf", "su", "infinite"),
    ("A,10,45,2,15,1,0.3,0.3,1e400", "su", "infinite"),
])
def test_csv_impossible_values_name_the_station(tmp_path, row, field, needle):
    p = tmp_path / "v.csv"
    p.write_text(HEADER + "OKAY,-229.156,45,2,15,1,0.3,0.3,0.8\n" + row + "\n")
    with pytest.raises(GnssError) as ei:
        read_gnss(p)
    assert ei.value.field == field and needle in ei.value.message and ei.value.message.endswith(" A.")


def test_csv_velocities_in_metres_warn(tmp_path):
    p = tmp_path / "v.csv"
    p.write_text(HEADER + "A,10,45,0.021,0.015,-0.001,0.0003,0.0003,0.0008\nB,11,46,0.020,0.014,,0.0004,0.0004,\n")
    with pytest.warns(UserWarning, match="m/yr"):
        df = read_gnss(p)
    assert df.loc[0, "ve"] == 0.021  # warned, not refused or rescaled
    p.write_text(HEADER + "A,10,45,0.05,0.03,0.1,0.1,0.1,0.3\n")  # a slow station in mm/yr: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_gnss(p)


def test_unknown_reference_frame_and_format(tmp_path):
    p = tmp_path / "v.csv"
    p.write_text(GOOD_CSV)
    with pytest.raises(GnssError, match="reference frame"):
        read_gnss(p, "WGS84-ish")
    # names the plate-motion conversions would refuse later are refused at reading (a 2-letter plate code, an
    # ITRF realisation without PROJ transformations here); the ones they take are read
    for name in ("NA-fixed", "ITRF1997"):
        with pytest.raises(GnssError, match="4-letter plate code") as ei:
            read_gnss(p, name)
        assert ei.value.field == "reference_frame"
    for name in ("NOAM-fixed", "eura-fixed", "IGS20", "ITRF2008"):
        assert read_gnss(p, name).attrs["reference_frame"] == name
    q = tmp_path / "junk.txt"
    q.write_text("hello world\n")
    with pytest.raises(GnssError, match="Unrecognised"):
        read_gnss(q)


# ---------------------------------------------------------------------------------------------------------------
# MIDAS
# ---------------------------------------------------------------------------------------------------------------
# Two lines in NGL's 27-field layout (values modelled on CLV1 and on a station whose longitude NGL writes as
# -229.156, i.e. 130.844°E).
MIDAS = (
    "CLV1 MIDAS5 2006.9123 2024.3450  17.4327  5854  5800  4976 -0.015169 -0.008432 -0.001612 "
    "0.000197 0.000188 0.000514 -0.002 0.001 0.003 0.021 0.018 0.030 0.0011 0.0010 0.0031 4 "
    "36.12345 -115.25820 703.25\n"
    "00NA MIDAS5 2010.0000 2020.0000  10.0000  3600  3500  3000  0.030000  0.060000 -0.000500 "
    "0.000300 0.000310 0.000900  0.000 0.000 0.000 0.010 0.010 0.020 0.0010 0.0010 0.0030 0 "
    "-12.40000 -229.15600 120.00\n")


def test_midas_reader(tmp_path):
    p = tmp_path / "midas.IGS14.txt"
    p.write_text(MIDAS)
    assert detect_format(p) == "midas"
    df = read_gnss(p, "IGS14").set_index("station")
    assert df.loc["CLV1", "ve"] == pytest.approx(-15.169) and df.loc["CLV1", "su"] == pytest.approx(0.514)
    assert df.loc["CLV1", "height"] == pytest.approx(703.25) and df.loc["CLV1", "lat"] == pytest.approx(36.12345)
    assert df.loc["00NA", "lon"] == pytest.approx(130.844, abs=1e-9)


def test_midas_bad_lines(tmp_path):
    p = tmp_path / "midas.IGS14.txt"
    p.write_text(MIDAS + "ZZZZ MIDAS5 2008.0 2018.0 10.0 1 2 3\n")
    with pytest.raises(GnssError) as ei:
        read_gnss(p, "IGS14")
    assert ei.value.field == "line 3" and "27" in str(ei.value)
    p.write_text(MIDAS.replace("-0.015169", "-0.0x5169"))
    with pytest.raises(GnssError, match="Non-numeric"):
        read_gnss(p, "IGS14")
    p.write_text(MIDAS + MIDAS.splitlines()[0] + "\n")
    with pytest.raises(GnssError, match="Duplicate stations: CLV1"):
        read_gnss(p, "IGS14")



def test_midas_unterminated_last_line_warns(tmp_path):
    p = tmp_path / "midas.IGS14.txt"
    p.write_text(MIDAS.rstrip("\n")[:-4])  # height 120.00 cut to 12: still 27 fields
    with pytest.warns(UserWarning, match="00NA.*truncated"):
        df = read_gnss(p, "IGS14")
    assert df.loc[1, "height"] == 12.0
    p.write_text(MIDAS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_gnss(p, "IGS14")


# ---------------------------------------------------------------------------------------------------------------
# Position series and the velocity fit
# ---------------------------------------------------------------------------------------------------------------
def _flicker(n, amplitude, rng):
    """Daily flicker noise (mm) with Williams amplitude b (mm/yr^0.25): b * dt^(1/4) * T w."""
    h = _flicker_filter(n)
    w = rng.standard_normal(n)
    return amplitude * (1 / 365.25) ** 0.25 * np.convolve(w, h)[:n]


def _series(rate, *, days=1500, white=2.0, flicker=0.0, outliers=0.0, seed=0, gap=True):
    rng = np.random.default_rng(seed)
    day = np.arange(days)
    t = 2010.0 + day / 365.25
    y = rate * (t - t.mean()) + 3.0 * np.sin(2 * np.pi * t) + white * rng.standard_normal(days)
    if flicker:
        y += _flicker(days, flicker, rng)
    if outliers:
        k = rng.choice(days, int(outliers * days), replace=False)
        y[k] += rng.choice([-1, 1], k.size) * 60.0  # one-sided-ish gross errors
    keep = np.ones(days, bool)
    if gap:
        keep[300:420] = False  # a four-month gap
    df = pd.DataFrame({"time": pd.Timestamp("2010-01-01") + pd.to_timedelta(day, "D"), "decimal_year": t,
                       "n": y, "e": y, "u": y, "sn": 1.0, "se": 1.0, "su": 1.0})[keep].reset_index(drop=True)
    df.attrs.update(station="SYNT", lon=0.0, lat=0.0, height=0.0)
    return df


def test_fit_recovers_rate_despite_outliers():
    df = _series(-12.0, outliers=0.05, seed=3)
    fit = fit_station_velocity(df, noise="white")
    assert fit["vu"] == pytest.approx(-12.0, abs=0.05)
    assert 0.03 < fit["outliers_u"] < 0.08
    # ordinary least squares is pulled by the same outliers much more
    A = np.column_stack([np.ones(len(df)), df.decimal_year - df.decimal_year.mean(),
                         np.sin(2 * np.pi * df.decimal_year), np.cos(2 * np.pi * df.decimal_year)])
    ols = np.linalg.lstsq(A, df.u.to_numpy(), rcond=None)[0][1]
    assert abs(fit["vu"] + 12.0) < abs(ols + 12.0) or abs(ols + 12.0) < 0.05


def test_white_only_series_keeps_white_sigma():
    fit = fit_station_velocity(_series(5.0, white=2.0, seed=1))
    # no flicker in the data: the likelihood chooses (almost) pure white noise, sigma stays near the white one
    assert fit["flicker_e"] < 2.0
    assert fit["se"] < 2.0 * fit["se_white"]
    assert fit["white_e"] == pytest.approx(2.0, rel=0.15)


def test_flicker_noise_is_detected_and_inflates_sigma():
    rates = []
    for seed in range(4):
        fit = fit_station_velocity(_series(5.0, white=1.0, flicker=8.0, seed=10 + seed))
        assert fit["flicker_n"] == pytest.approx(8.0, rel=0.5)
        assert fit["sn"] > 3 * fit["sn_white"]
        rates.append((fit["vn"] - 5.0) / fit["sn"])
    # normalised rate errors are of order one (a white-noise sigma would give errors of many sigmas)
    assert np.max(np.abs(rates)) < 3.5


def test_series_too_short():
    df = _series(1.0, days=40, gap=False)
    with pytest.raises(GnssError, match="too short"):
        fit_station_velocity(df)


TENV3_HEADER = ("site YYMMMDD yyyy.yyyy __MJD week d reflon _e0(m) __east(m) ____n0(m) _north(m) u0(m) ____up(m) "
                "_ant(m) sig_e(m) sig_n(m) sig_u(m) __corr_en __corr_eu __corr_nu _latitude(deg) _longitude(deg) "
                "__height(m)\n")


def _tenv3_lines(n=400, lon=240.5, site="TEST"):
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 0.002, (n, 3))
    out = []
    dates = pd.date_range("2015-01-01", periods=n, freq="D")
    for i, d in enumerate(dates):
        mjd = int((d - pd.Timestamp("1858-11-17")).days)
        t = d.year + (d.day_of_year - 0.5) / 365.25
        up = 0.1 - 0.01 * i / 365.25 + noise[i, 2]
        out.append(f"{site} {d.strftime('%y%b%d').upper()} {t:.4f} {mjd} 1800 1 {lon - 0.05:.1f} 100 "
                   f"{0.3 + noise[i, 0]:.6f} 4000000 {0.5 + noise[i, 1]:.6f} 50 {up:.6f} 0.0000 0.001 0.001 0.003 "
                   f"0.0 0.0 0.0 36.5 {lon:.6f} 50.1")
    return out


def test_tenv3_longitude_quirk_and_velocity(tmp_path):
    p = tmp_path / "TEST.IGS14.tenv3"
    p.write_text(TENV3_HEADER + "\n".join(_tenv3_lines()) + "\n")
    s = read_position_series(p)
    assert s.attrs["lon"] == pytest.approx(-119.5) and s.attrs["lat"] == 36.5
    df = read_gnss(p, "IGS14")
    assert df.loc[0, "vu"] == pytest.approx(-10.0, abs=3 * df.loc[0, "su"]) and df.loc[0, "su"] < 1.0
    assert df.loc[0, "lon"] == pytest.approx(-119.5)
    lines = _tenv3_lines()
    lines[5] = lines[5].replace(" 4000000 ", " 4O00000 ")
    p.write_text(TENV3_HEADER + "\n".join(lines) + "\n")
    with pytest.raises(GnssError) as ei:
        read_position_series(p)
    assert ei.value.field == "line 7" and "Non-numeric" in str(ei.value)



def test_tenv3_nan_first_epoch_and_empty_component(tmp_path):
    p = tmp_path / "TEST.IGS14.tenv3"
    lines = _tenv3_lines()
    f = lines[0].split()
    f[12] = "nan"  # up of the first epoch
    lines[0] = " ".join(f)
    p.write_text(TENV3_HEADER + "\n".join(lines) + "\n")
    s = read_position_series(p)
    assert np.isnan(s["u"].iloc[0]) and s["u"].iloc[1:].notna().all() and s["u"].iloc[1] == 0.0
    df = read_gnss(p, "IGS14")
    assert df.loc[0, "vu"] == pytest.approx(-10.0, abs=3 * df.loc[0, "su"])
    for i in range(len(lines)):
        f = lines[i].split()
        f[12] = "nan"
        lines[i] = " ".join(f)
    p.write_text(TENV3_HEADER + "\n".join(lines) + "\n")
    with pytest.raises(GnssError) as ei:
        read_position_series(p)
    assert ei.value.field == "u" and "empty" in str(ei.value)


def test_tenv3_impossible_longitude(tmp_path):
    p = tmp_path / "TEST.IGS14.tenv3"
    p.write_text(TENV3_HEADER + "\n".join(_tenv3_lines(lon=-9999.0)) + "\n")
    with pytest.raises(GnssError) as ei:
        read_position_series(p)
    assert ei.value.field == "lon" and "TEST" in ei.value.message


def test_neu_with_reference_position_and_folder(tmp_path):
    z = np.random.default_rng(0).normal(0, 0.002, (3, 500))
    rows = [f"{2010 + (d - 0.5) / 365.25:.4f} {2010 + (d - 1) // 365} {(d - 1) % 365 + 1} "
            f"{0.001 * d / 365.25 + z[0, d - 1]:.5f} {0.01 + z[1, d - 1]:.5f} {z[2, d - 1]:.5f} 0.002 0.002 0.005"
            for d in range(1, 501)]
    head = ("# 4-character ID: ABCD\n# NEU Reference position :   39.6086010  115.8924910  87.4562 (IGS08)\n")
    (tmp_path / "abcdCleanUnf.neu").write_text(head + "\n".join(rows) + "\n")
    (tmp_path / "TEST.tenv3").write_text(TENV3_HEADER + "\n".join(_tenv3_lines(site="TEST")) + "\n")
    df = read_gnss(tmp_path, "IGS14")  # a folder of series → one row per station
    assert list(df["station"]) == ["TEST", "ABCD"] or list(df["station"]) == ["ABCD", "TEST"]
    abcd = df.set_index("station").loc["ABCD"]
    assert abcd.lat == pytest.approx(39.608601) and abcd.vn == pytest.approx(1.0, abs=3 * abcd.sn)
    assert 0 < abcd.sn < 2
    (tmp_path / "x.neu").write_text("\n".join(rows) + "\n")  # no position in the header
    with pytest.raises(GnssError) as ei:
        read_gnss(tmp_path / "x.neu")
    assert ei.value.field == "reference position"


def test_neu_placeholder_reference_position_is_a_gnss_error(tmp_path):
    """A header "NEU Reference position : - - -" matches the header pattern but holds no numbers: a GnssError
    naming the line, not a ValueError."""
    rows = [f"{2010 + (d - 0.5) / 365.25:.4f} 2010 {d} 0.001 0.002 0.003 0.002 0.002 0.005" for d in range(1, 40)]
    (tmp_path / "abcd.neu").write_text("# 4-character ID: ABCD\n# NEU Reference position : - - -\n"
                                       + "\n".join(rows) + "\n")
    with pytest.raises(GnssError) as ei:
        read_gnss(tmp_path / "abcd.neu")
    assert ei.value.field == "NEU Reference position" and "- - -" in ei.value.message
