"""Horizontal GNSS velocity field: Gaussian-process interpolation and given grids (geodesy.horizontal)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import rioxarray  # noqa: F401  (.rio accessor)
import xarray as xr

from gpu_insar_adjust.errors import GeometryError, GnssError, InputError, PlateModelError
from gpu_insar_adjust.geodesy import plates
from gpu_insar_adjust.geodesy.horizontal import (
    HorizontalVelocityField,
    load_horizontal_grids,
    sample_horizontal_grids,
)

NOISE = 0.5  # mm/yr, station noise of the synthetic field


def _truth_residual(lon, lat):
    """A smooth intraplate field (mm/yr) over the North China Plain, ~300-700 km wavelengths."""
    a, b = (lon - 116.5) / 3.5, (lat - 37.5) / 3.5
    return 3.0 * np.sin(1.2 * a + 0.3) + 1.5 * b, -2.0 * np.cos(b) + a * b


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(42)
    n = 60
    lon, lat = rng.uniform(113, 120, n), rng.uniform(34, 41, n)
    re, rn = _truth_residual(lon, lat)
    pe, pn, _ = plates.plate_velocity_enu(lon, lat, plate="EURA", model="ITRF2014")
    df = pd.DataFrame({"station": [f"S{i:02d}" for i in range(n)], "lon": lon, "lat": lat, "height": 0.0,
                       "ve": pe + re + rng.normal(0, NOISE, n), "vn": pn + rn + rng.normal(0, NOISE, n),
                       "vu": rng.normal(0, 2, n), "se": NOISE, "sn": NOISE, "su": 2.0})
    df.attrs["reference_frame"] = "ITRF2014"
    return df, HorizontalVelocityField("EURA", "ITRF2014").fit(df)


def test_recovers_known_field(synthetic):
    df, field = synthetic
    assert field.reference_frame_ == "ITRF2014" and field.n_stations_ == 60
    glon, glat = np.meshgrid(np.linspace(114, 119, 25), np.linspace(35, 40, 25))  # inside the network
    ve, vn, se, sn = field.predict(glon, glat)
    te, tn = _truth_residual(glon, glat)
    pe, pn, _ = plates.plate_velocity_enu(glon, glat, plate="EURA")
    err_e, err_n = ve - (pe + te), vn - (pn + tn)
    rms_e, rms_n = np.sqrt(np.mean(err_e ** 2)), np.sqrt(np.mean(err_n ** 2))
    print(f"synthetic field from 60 stations (noise {NOISE} mm/yr): RMS error e {rms_e:.2f} n {rms_n:.2f}, "
          f"max {np.abs(err_e).max():.2f}/{np.abs(err_n).max():.2f} mm/yr; LOO RMS e {field.loo_rmse_e_:.2f} "
          f"n {field.loo_rmse_n_:.2f} mm/yr; length scales {field.length_scale_km_[0]:.0f}/"
          f"{field.length_scale_km_[1]:.0f} km")
    # Tolerance: RMS within 0.3 mm/yr (60 % of the station noise), no point off by more than 1 mm/yr.
    assert rms_e < 0.3 and rms_n < 0.3
    assert np.abs(err_e).max() < 1.0 and np.abs(err_n).max() < 1.0
    # the stated sigmas are honest: errors mostly within 2 sigma
    assert np.mean(np.abs(err_e) < 2 * se) > 0.85 and np.mean(np.abs(err_n) < 2 * sn) > 0.85
    # leave-one-out error is close to the station noise (the field itself is smooth)
    assert 0.3 < field.loo_rmse_e_ < 0.9 and 0.3 < field.loo_rmse_n_ < 0.9
    assert len(field.loo_residuals_) == 60
    assert field.score(df) > 0.99


def test_loo_closed_form_matches_refit(synthetic):
    """The closed-form LOO residual equals refitting without the station (same hyper-parameters)."""
    from sklearn.gaussian_process import GaussianProcessRegressor

    df, field = synthetic
    gp, mean, scale = field._fits["e"]
    X, y = gp.X_train_, gp.y_train_
    alpha = np.asarray(gp.alpha)
    i = 7
    keep = np.arange(len(y)) != i
    refit = GaussianProcessRegressor(gp.kernel_, alpha=alpha[keep], optimizer=None).fit(X[keep], y[keep])
    loo = (y[i] - refit.predict(X[i:i + 1])[0]) * scale
    assert field.loo_residuals_["de"].iloc[i] == pytest.approx(loo, abs=1e-6)


def test_plate_fixed_and_grid_prediction(synthetic):
    df, field = synthetic
    ve_f, vn_f, _, _ = field.predict(116.0, 38.0, plate_fixed=True)
    ve, vn, _, _ = field.predict(116.0, 38.0)
    pe, pn, _ = plates.plate_velocity_enu(116.0, 38.0, plate="EURA")
    assert ve - ve_f == pytest.approx(float(pe), abs=1e-9) and vn - vn_f == pytest.approx(float(pn), abs=1e-9)
    y = np.round(np.arange(38.5, 37.495, -0.05), 6)
    x = np.round(np.arange(115.5, 116.501, 0.05), 6)
    frame = xr.Dataset({"los_e": (("y", "x"), np.full((y.size, x.size), -0.6, np.float32))},
                       coords={"y": y, "x": x}).rio.write_crs("EPSG:4326")
    grid = field.predict_grid(frame)
    assert grid["ve"].dtype == np.float32 and grid.attrs["reference_frame"] == "ITRF2014"
    lon, lat = np.meshgrid(x, y)
    ref = field.predict(lon, lat)
    for k, r in zip(("ve", "vn", "se", "sn"), ref):
        # the GP through its checked coarse grid (0.05) plus the rotation through its own (0.01)
        np.testing.assert_allclose(grid[k].values, r, atol=0.061)
    fixed = field.predict_grid(frame, plate_fixed=True)
    assert fixed.attrs["reference_frame"] == "EURA-fixed"


def test_grid_prediction_on_a_fine_frame_goes_through_a_checked_coarse_grid(synthetic):
    """A 0.005° frame (~500 m pixels, 60 000 pixels): means and sigmas through the checked lattice, within the
    0.05 mm/yr tolerance of the GP evaluated at every pixel, the GP evaluated at far fewer points."""
    df, field = synthetic
    y = np.round(np.arange(38.6, 37.4, -0.005), 6)
    x = np.round(np.arange(115.4, 116.6, 0.005), 6)
    frame = xr.Dataset({"los_e": (("y", "x"), np.full((y.size, x.size), -0.6, np.float32))},
                       coords={"y": y, "x": x}).rio.write_crs("EPSG:4326")
    calls = []
    original = field.predict

    def counting(lon, lat, **kw):
        if kw.get("return_std", True):
            calls.append(np.size(lon))
        return original(lon, lat, **kw)

    field.predict = counting
    try:
        grid = field.predict_grid(frame, plate_fixed=True)
    finally:
        del field.predict
    lon, lat = np.meshgrid(x, y)
    ref = field.predict(lon, lat, plate_fixed=True)
    for k, r in zip(("ve", "vn", "se", "sn"), ref):
        np.testing.assert_allclose(grid[k].values, r, atol=0.05 + 1e-5)
    assert sum(calls) < lon.size / 10


def _bumps(lon, lat):
    """A residual field (mm/yr) of twelve 6 km wide bumps of ~3 mm/yr: GNSS resolving it fits a correlation length
    near the 10 km lower bound, the roughest field (for interpolation) the default kernel allows."""
    rng = np.random.default_rng(7)
    cx, cy = rng.uniform(115.7, 116.5, 12), rng.uniform(37.7, 38.3, 12)
    ae, an = rng.normal(0, 3, 12), rng.normal(0, 3, 12)
    ve, vn = np.zeros(np.shape(lon)), np.zeros(np.shape(lon))
    for x, y, a, b in zip(cx, cy, ae, an):
        g = np.exp(-(((lon - x) * 88.0) ** 2 + ((lat - y) * 111.2) ** 2) / (2 * 6.0 ** 2))
        ve, vn = ve + a * g, vn + b * g
    return ve, vn


@pytest.fixture(scope="module")
def short_scale():
    rng = np.random.default_rng(3)
    n = 120
    lon, lat = rng.uniform(115.6, 116.6, n), rng.uniform(37.6, 38.4, n)
    re, rn = _bumps(lon, lat)
    pe, pn, _ = plates.plate_velocity_enu(lon, lat, plate="EURA", model="ITRF2014")
    df = pd.DataFrame({"station": [f"T{i:03d}" for i in range(n)], "lon": lon, "lat": lat,
                       "ve": pe + re + rng.normal(0, 0.3, n), "vn": pn + rn + rng.normal(0, 0.3, n),
                       "se": 0.3, "sn": 0.3})
    df.attrs["reference_frame"] = "ITRF2014"
    return HorizontalVelocityField("EURA", "ITRF2014").fit(df)


def _frame(y, x, crs="EPSG:4326"):
    return xr.Dataset({"los_e": (("y", "x"), np.full((y.size, x.size), -0.6, np.float32))},
                      coords={"y": y, "x": x}).rio.write_crs(crs)


def _counting(field):
    """Replace ``field.predict`` by a wrapper recording the number of points of each call."""
    calls = []
    original = field.predict

    def counting(lon, lat, **kw):
        calls.append(np.size(lon))
        return original(lon, lat, **kw)

    field.predict = counting
    return calls


def test_lattice_stays_within_tolerance_of_dense_evaluation_for_a_short_length_scale(short_scale):
    """Worst case for the coarse lattice: a ~11 km fitted correlation length on 500 m pixels. Means and sigmas,
    with and without the rotation, stay within 0.05 mm/yr of the GP (and PROJ rotation) at every pixel."""
    field = short_scale
    assert max(field.length_scale_km_) < 15.0  # the short-scale case this test is about
    y, x = np.round(np.arange(38.3, 37.7, -0.005), 6), np.round(np.arange(115.7, 116.5, 0.005), 6)
    frame = _frame(y, x)
    calls = _counting(field)
    try:
        grid = field.predict_grid(frame)
        fixed = field.predict_grid(frame, plate_fixed=True)
    finally:
        del field.predict
    lon, lat = np.meshgrid(x, y)
    for out, ref in ((grid, field.predict(lon, lat)), (fixed, field.predict(lon, lat, plate_fixed=True))):
        for k, r in zip(("ve", "vn", "se", "sn"), ref):
            err = float(np.max(np.abs(out[k].values - r)))
            assert err < 0.05, (k, err)
    # ...through a lattice, not by evaluating the GP at every pixel
    assert sum(calls) < 2 * lon.size / 3


def test_grids_of_overlapping_frames_share_the_lattice(short_scale):
    """predict_grids gives each frame what predict_grid gives it, evaluating the overlap once."""
    field = short_scale
    x = np.round(np.arange(115.7, 116.5, 0.005), 6)
    a = _frame(np.round(np.arange(38.3, 37.9, -0.005), 6), x)
    b = _frame(np.round(np.arange(38.1, 37.7, -0.005), 6), x)  # half of each frame overlaps the other
    counts = {}
    for name, frames in (("a", [a]), ("b", [b]), ("ab", [a, b])):
        calls = _counting(field)
        try:
            counts[name] = (field.predict_grids(frames), sum(calls))
        finally:
            del field.predict
    for single, shared in ((counts["a"][0][0], counts["ab"][0][0]), (counts["b"][0][0], counts["ab"][0][1])):
        for k in ("ve", "vn", "se", "sn"):
            np.testing.assert_allclose(shared[k].values, single[k].values, atol=1e-5)
    assert counts["ab"][1] < 0.85 * (counts["a"][1] + counts["b"][1])


def test_grid_prediction_in_a_projected_crs(short_scale):
    """A frame in UTM metres (lattice in the frame's CRS, lon/lat through PROJ) matches the dense GP too."""
    field = short_scale
    y = np.arange(4_235_250.0, 4_185_000.0, -500.0)
    x = np.arange(400_250.0, 450_000.0, 500.0)
    frame = _frame(y, x, "EPSG:32650")
    grid = field.predict_grid(frame)
    lon, lat = plates._frame_lonlat(frame, np.arange(y.size), np.arange(x.size))
    assert 115.8 < lon.min() < lon.max() < 116.5 and 37.8 < lat.min() < lat.max() < 38.3  # in the network
    for k, r in zip(("ve", "vn", "se", "sn"), field.predict(lon, lat)):
        assert float(np.max(np.abs(grid[k].values - r))) < 0.05, k


def test_bad_input(synthetic):
    df, _ = synthetic
    with pytest.raises(GnssError):
        HorizontalVelocityField().fit(df.head(4))
    with pytest.raises(GnssError) as err:
        HorizontalVelocityField().fit(df.drop(columns="vn"))
    assert err.value.field == "vn"
    bad = df.copy()
    bad.attrs["reference_frame"] = "WGS84"
    with pytest.raises(PlateModelError):
        HorizontalVelocityField().fit(bad)
    with pytest.raises(PlateModelError):
        HorizontalVelocityField(plate="EURO").fit(df)
    _, field = synthetic
    with pytest.raises(GeometryError):
        field.predict(116.0, 91.0)


def test_naf_grids_load_and_sample(real_data):
    root = real_data / "naf_licsbas_4frames"
    grids = load_horizontal_grids(root / "GNSS" / "interp_E.grd", root / "GNSS" / "interp_N.grd")
    assert grids.attrs["reference_frame"] == "EURA-fixed"
    ve, vn = grids["ve"].values, grids["vn"].values
    print(f"NAF grids (Eurasia-fixed): ve {ve.min():.1f}..{ve.max():.1f}, vn {vn.min():.1f}..{vn.max():.1f} mm/yr")
    assert ve.min() == pytest.approx(-27.08, abs=0.01) and ve.max() == pytest.approx(11.88, abs=0.01)
    assert vn.min() == pytest.approx(-10.06, abs=0.01) and vn.max() == pytest.approx(10.41, abs=0.01)

    fid = "014A_04939_131313"
    comps = {k: rioxarray.open_rasterio(root / fid / f"{c}.geo.tif", masked=True).squeeze("band", drop=True)
             for k, c in (("los_e", "E"), ("los_n", "N"), ("los_u", "U"))}
    frame = xr.Dataset(comps, attrs={"frame_id": fid})
    s = sample_horizontal_grids(grids, frame)
    assert s["ve"].shape == frame["los_e"].shape and not s["ve"].isnull().any()
    print(f"sampled onto {fid}: ve {float(s.ve.min()):.1f}..{float(s.ve.max()):.1f}, "
          f"vn {float(s.vn.min()):.1f}..{float(s.vn.max()):.1f} mm/yr")
    # Anatolia moves west relative to Eurasia south of the fault: the north-south contrast of ve across the
    # frame is the North Anatolian Fault's ~20 mm/yr right-lateral slip rate.
    contrast = float(s.ve.isel(y=0).mean() - s.ve.isel(y=-1).mean())
    assert 15.0 < contrast < 35.0
    # bilinear interpolation, checked against scipy at a few pixels
    from scipy.interpolate import RegularGridInterpolator

    f = RegularGridInterpolator((grids.y.values, grids.x.values), ve)
    for r, c in ((0, 0), (100, 200), (267, 353)):
        pt = [float(frame.y[r]), float(frame.x[c])]
        assert float(s.ve[r, c]) == pytest.approx(float(f(pt)[0]), abs=1e-4)
    # to ITRF: the Eurasian rotation is added back
    s_itrf = sample_horizontal_grids(grids, frame, to_itrf=True, model="ITRF2014")
    pe, _, _ = plates.plate_velocity_enu(float(frame.x[100]), float(frame.y[100]), plate="EURA")
    assert float(s_itrf.ve[100, 100] - s.ve[100, 100]) == pytest.approx(float(pe), abs=0.02)
    assert s_itrf.attrs["reference_frame"] == "ITRF2014"


def test_grid_errors(tmp_path, real_data):
    root = real_data / "naf_licsbas_4frames" / "GNSS"
    with pytest.raises(InputError) as err:
        load_horizontal_grids(tmp_path / "nope.grd", root / "interp_N.grd")
    assert "nope.grd" in str(err.value)
    cut = xr.open_dataset(root / "interp_N.grd").isel(lon=slice(0, 100))
    cut.to_netcdf(tmp_path / "cut.grd")
    with pytest.raises(InputError):
        load_horizontal_grids(root / "interp_E.grd", tmp_path / "cut.grd")


def test_lattice_spline_on_raster_axes_equals_the_sorted_scatter():
    """Raster axes (y decreasing, x increasing, or either reversed) are evaluated through reversed views instead
    of a scatter of every pixel: the same numbers bit for bit; unordered axes keep the scatter."""
    from scipy.interpolate import RectBivariateSpline

    from gpu_insar_adjust.geodesy.horizontal import _on_grid, _sqrt_nonnegative

    rng = np.random.default_rng(4)
    yn, xn = np.linspace(0.0, 10.0, 9), np.linspace(0.0, 12.0, 11)
    spline = RectBivariateSpline(yn, xn, rng.normal(size=(9, 11)), s=0)

    def scatter(ys, xs):
        oy, ox = np.argsort(ys, kind="stable"), np.argsort(xs, kind="stable")
        out = np.empty((ys.size, xs.size))
        out[np.ix_(oy, ox)] = spline(ys[oy], xs[ox])
        return out

    up, right = np.linspace(0.3, 9.7, 37), np.linspace(0.2, 11.9, 53)
    shuffled = rng.permutation(right)
    for ys, xs in ((up[::-1], right), (up, right), (up, right[::-1]), (up[::-1], right[::-1]), (up, shuffled)):
        got = _on_grid(spline, ys, xs)
        assert got.shape == (ys.size, xs.size)
        np.testing.assert_array_equal(got, scatter(ys, xs))
        # spot check against the spline itself at single points
        assert got[5, 7] == spline(ys[5], xs[7])[0, 0]
    var = np.array([-1e-12, 0.0, 4.0, np.nan])
    np.testing.assert_array_equal(_sqrt_nonnegative(var), [0.0, 0.0, 2.0, np.nan])
    assert var[0] == -1e-12  # the variances are not written


@pytest.mark.parametrize("with_rotation", [True, False])
def test_finishing_in_pieces_of_rows_equals_whole_frames(monkeypatch, with_rotation):
    """The frame's field is evaluated and finished (rotation added to the means, variances to sigmas, float32)
    in pieces of rows on the host's threads: the same bits as whole-frame float64 arrays cast at the end, for
    every axis order, a last piece that is short, and scattered axes."""
    from scipy.interpolate import RectBivariateSpline

    from gpu_insar_adjust.geodesy import horizontal as H

    rng = np.random.default_rng(5)
    yn, xn = np.linspace(0.0, 10.0, 9), np.linspace(0.0, 12.0, 11)
    # means, then variances that dip below zero between nodes (the spline overshoots): clipped to 0
    splines = [RectBivariateSpline(yn, xn, rng.normal(size=(9, 11)) * (3.0 if k < 2 else 1.0) +
                                   (0.0 if k < 2 else 0.5), s=0) for k in range(4)]
    monkeypatch.setattr(H, "_GRID_PIECE_PIXELS", 7 * 53)  # 7 rows a piece: 6 pieces of 37 rows, the last short
    up, right = np.linspace(0.3, 9.7, 37), np.linspace(0.2, 11.9, 53)
    shuffled = rng.permutation(right)
    for ys, xs in ((up[::-1], right), (up, right), (up, right[::-1]), (up[::-1], right[::-1]), (up, shuffled)):
        rotation = (rng.normal(20, 3, (ys.size, xs.size)), rng.normal(-8, 2, (ys.size, xs.size))) \
            if with_rotation else None
        got = H._finish_on_grid(splines, ys, xs, rotation)
        ve, vn, se, sn = H._finish([H._on_grid(s, ys, xs) for s in splines])
        if with_rotation:
            ve, vn = ve + rotation[0], vn + rotation[1]
        for g, w in zip(got, (ve, vn, se, sn)):
            assert g.dtype == np.float32 and g.shape == (ys.size, xs.size)
            np.testing.assert_array_equal(g.view(np.uint32), w.astype(np.float32).view(np.uint32))
        assert (got[2] == 0).any() and (got[3] >= 0).all()  # some variances were negative: clipped


def test_grids_in_another_itrf_realisation_reach_the_models_itrf():
    """Grids given in ITRF2020 for a run on the ITRF2014 plate model are moved by PROJ's Helmert rates, as the
    stations' table is: a pixel's field equals the grid value there converted like a station (within 0.001 mm/yr,
    the rates being smooth); in the model's own realisation nothing changes."""
    from gpu_insar_adjust.geodesy.horizontal import sample_horizontal_grids

    gx, gy = np.arange(114.0, 118.01, 0.5), np.arange(40.0, 35.99, -0.5)
    ve = np.add.outer(0.3 * (gy - 38.0), 0.2 * (gx - 116.0)) + 25.0
    vn = np.add.outer(-0.1 * (gy - 38.0), 0.4 * (gx - 116.0)) - 8.0
    grids = xr.Dataset({"ve": (("y", "x"), ve), "vn": (("y", "x"), vn)}, coords={"y": gy, "x": gx},
                       attrs={"reference_frame": "ITRF2020"})
    fy, fx = np.linspace(39.5, 36.5, 31), np.linspace(114.5, 117.5, 41)
    frame = xr.Dataset({"los_velocity": (("y", "x"), np.zeros((fy.size, fx.size), np.float32))},
                       coords={"y": fy, "x": fx}).rio.write_crs("EPSG:4326")
    as_is = sample_horizontal_grids(grids, frame)
    moved = sample_horizontal_grids(grids, frame, to_itrf=True, model="ITRF2014")
    assert moved.attrs["reference_frame"] == "ITRF2014"
    same = sample_horizontal_grids(grids, frame, to_itrf=True, model="ITRF2020")
    np.testing.assert_array_equal(same["ve"], as_is["ve"])
    r, c = 12, 27
    st = pd.DataFrame({"station": ["PIX1"], "lon": [fx[c]], "lat": [fy[r]], "height": [0.0],
                       "ve": [float(as_is.ve[r, c])], "vn": [float(as_is.vn[r, c])], "vu": [0.0]})
    st.attrs["reference_frame"] = "ITRF2020"
    want = plates.to_itrf(st, None, "ITRF2014")
    assert abs(float(want["ve"].iloc[0]) - float(as_is.ve[r, c])) > 0.005  # the realisations do differ here
    assert float(moved.ve[r, c]) == pytest.approx(float(want["ve"].iloc[0]), abs=1e-3)
    assert float(moved.vn[r, c]) == pytest.approx(float(want["vn"].iloc[0]), abs=1e-3)


def test_grid_units_are_read_and_axes_of_another_precision_are_one_grid(tmp_path):
    """A grid declaring m/yr is converted to mm/yr (not relabelled), an unknown unit is refused, and east/north
    grids whose axes are float32 and float64 copies of the same values load as one grid."""
    from gpu_insar_adjust.geodesy.horizontal import load_horizontal_grids

    lon, lat = np.arange(114.0, 116.01, 0.1), np.arange(37.0, 39.01, 0.1)
    ve = np.add.outer(0.5 * (lat - 38.0), 0.3 * (lon - 115.0)) + 25.0

    def grd(path, values, units, dtype=np.float64):
        da = xr.DataArray(values, dims=("lat", "lon"), coords={"lat": lat.astype(dtype), "lon": lon.astype(dtype)},
                          name="z", attrs={"units": units} if units else {})
        da.to_dataset().to_netcdf(path)

    grd(tmp_path / "e.grd", ve / 1000.0, "m/yr")
    grd(tmp_path / "n.grd", -ve, None, np.float32)
    g = load_horizontal_grids(tmp_path / "e.grd", tmp_path / "n.grd")
    np.testing.assert_allclose(g["ve"].values, ve, rtol=1e-12)
    np.testing.assert_allclose(g["vn"].values, -ve, rtol=1e-6)
    assert g.sizes == {"y": lat.size, "x": lon.size}
    grd(tmp_path / "e.grd", ve, "furlongs/fortnight")
    with pytest.raises(InputError) as ei:
        load_horizontal_grids(tmp_path / "e.grd", tmp_path / "n.grd")
    assert ei.value.field == "units"


def test_a_0_to_360_grid_is_sampled_on_a_western_frame(tmp_path):
    """GMT's global grids run 0-360°: a frame at 120°W (240°E) samples them, not NaN everywhere."""
    from gpu_insar_adjust.geodesy.horizontal import load_horizontal_grids, sample_horizontal_grids

    lon, lat = np.arange(0.0, 360.0, 1.0), np.arange(30.0, 41.0, 1.0)
    ve = np.broadcast_to(np.where(lon > 180.0, lon - 360.0, lon), (lat.size, lon.size)) / 10.0
    for name, values in (("e.grd", ve), ("n.grd", np.zeros_like(ve))):
        xr.DataArray(values, dims=("lat", "lon"), coords={"lat": lat, "lon": lon}, name="z").to_dataset() \
            .to_netcdf(tmp_path / name)
    g = load_horizontal_grids(tmp_path / "e.grd", tmp_path / "n.grd")
    fy, fx = np.linspace(36.5, 35.5, 5), np.linspace(-120.5, -119.5, 6)
    frame = xr.Dataset({"los_velocity": (("y", "x"), np.zeros((5, 6), np.float32))},
                       coords={"y": fy, "x": fx}).rio.write_crs("EPSG:4326")
    s = sample_horizontal_grids(g, frame)
    np.testing.assert_allclose(s["ve"].values, np.broadcast_to(fx / 10.0, (5, 6)), rtol=1e-5)
