"""Frame readers: real LiCSBAS/MintPy products, synthetic layouts, and every kind of bad frame folder."""

from __future__ import annotations

import math
import warnings

import h5py
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from gpu_insar_adjust.errors import FrameError, GeometryError, GiaError
from gpu_insar_adjust.io.frames import DEFAULT_INCIDENCE_DEG, list_frames, open_frame

NAF = {"014A_04939_131313": "ascending", "087A_04904_121313": "ascending",
       "094D_04913_101213": "descending", "167D_04884_131212": "descending"}


def _assert_names(exc: GiaError, *needles: str):
    """The message names the file, the field and the fix."""
    assert exc.file and exc.field and exc.fix
    text = str(exc)
    for n in needles:
        assert n in text, f"{n!r} not in {text!r}"


# ---------------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.real_data
def test_list_frames_skips_gnss_folder(real_data):
    frames = list_frames(real_data / "naf_licsbas_4frames")
    assert [f.name for f in frames] == sorted(NAF)


@pytest.mark.real_data
@pytest.mark.parametrize("frame_id", sorted(NAF))
def test_naf_licsbas_frames(real_data, frame_id):
    folder = real_data / "naf_licsbas_4frames" / frame_id
    ds = open_frame(folder)
    with rasterio.open(folder / "vel.geo.tif") as src:
        vel, bounds, crs = src.read(1), src.bounds, src.crs
    assert ds.attrs["frame_id"] == frame_id and ds.attrs["source"] == "licsbas"
    assert ds.attrs["orbit"] == NAF[frame_id]
    assert ds.rio.crs.to_epsg() == 4326 == crs.to_epsg()
    assert np.allclose(ds.rio.bounds(), tuple(bounds), atol=1e-9)
    # 0.01° pixels, y decreasing, coordinates are pixel centres.
    dx, dy = ds.rio.resolution()
    assert abs(dx - 0.01) < 1e-6 and abs(dy + 0.01) < 1e-6
    assert abs(float(ds.x[0]) - (bounds.left + dx / 2)) < 1e-9
    assert abs(float(ds.y[0]) - (bounds.top + dy / 2)) < 1e-9
    # Values and sign untouched (LiCSBAS is already mm/yr toward the satellite), NaN kept as no data.
    np.testing.assert_array_equal(ds["los_velocity"].values, vel)
    assert ds["los_velocity"].dtype == np.float32 and ds["mask"].dtype == bool
    e, n, u = (float(ds[v].mean()) for v in ("los_e", "los_n", "los_u"))
    assert abs(abs(e) - 0.62) < 0.02 and (e < 0) == (NAF[frame_id] == "ascending")
    assert abs(u - 0.78) < 0.01 and abs(n + 0.11) < 0.02
    assert set(ds.data_vars) == {"los_velocity", "los_std", "los_e", "los_n", "los_u", "mask"}
    # masked pixels: never usable where the velocity is NaN
    assert not np.any(ds["mask"].values & np.isnan(vel))


@pytest.mark.real_data
def test_naf_open_by_velocity_file(real_data):
    f = real_data / "naf_licsbas_4frames" / "094D_04913_101213" / "vel.geo.tif"
    ds = open_frame(f)
    assert ds.attrs["frame_id"] == "094D_04913_101213" and ds.attrs["orbit"] == "descending"


@pytest.mark.real_data
def test_kirishima_mintpy(real_data):
    folder = real_data / "kirishima_mintpy"
    with pytest.warns(UserWarning, match="HEADING"):
        ds = open_frame(folder / "velocity.h5")
    with h5py.File(folder / "velocity.h5", "r") as h:
        v = h["velocity"][()]
        s = h["velocityStd"][()]
        a = {k: (x.decode() if isinstance(x, bytes) else str(x)) for k, x in h.attrs.items()}
    x0, y0 = float(a["X_FIRST"]), float(a["Y_FIRST"])
    dx, dy = float(a["X_STEP"]), float(a["Y_STEP"])
    assert ds.sizes == {"y": 541, "x": 541}
    assert ds.attrs["source"] == "mintpy" and ds.attrs["frame_id"] == "kirishima_mintpy"
    # X_FIRST/Y_FIRST are the outer corner of the first pixel: centres are half a step inside.
    assert abs(float(ds.x[0]) - (x0 + 0.5 * dx)) < 1e-12 and abs(float(ds.y[0]) - (y0 + 0.5 * dy)) < 1e-12
    assert abs(float(ds.x[-1]) - (x0 + 540.5 * dx)) < 1e-9
    assert np.allclose(ds.rio.bounds(), (x0, y0 + 541 * dy, x0 + 541 * dx, y0), atol=1e-9)
    # m/yr → mm/yr, exactly ×1000 in float32.
    assert float(ds["los_velocity"][300, 200]) == float(np.float32(v[300, 200]) * np.float32(1000))
    np.testing.assert_array_equal(ds["los_velocity"].values, v.astype(np.float32) * np.float32(1000))
    np.testing.assert_array_equal(ds["los_std"].values, s.astype(np.float32) * np.float32(1000))
    assert 1.0 < float(np.nanmax(np.abs(ds["los_velocity"]))) < 500.0
    # No geometry file: HEADING -169.6° (descending, right-looking) with the slant-range centre incidence.
    hd = math.radians(float(a["HEADING"]))
    inc = math.degrees(math.acos(float(ds["los_u"][0, 0])))
    assert 30.0 < inc < 40.0
    assert float(ds["los_e"][0, 0]) == pytest.approx(-math.sin(math.radians(inc)) * math.cos(hd), abs=1e-6)
    assert float(ds["los_e"][0, 0]) > 0.5 and ds.attrs["orbit"] == "descending"
    # height.tif next to velocity.h5 serves as the DEM.
    with rasterio.open(folder / "height.tif") as src:
        np.testing.assert_array_equal(ds["dem"].values, src.read(1).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic layouts
# ---------------------------------------------------------------------------------------------------------------
SHAPE = (20, 30)
TRANSFORM = from_origin(100.0, 40.0, 0.01, 0.01)


def _tif(path, data, *, transform=TRANSFORM, crs="EPSG:4326", nodata=np.nan):
    data = np.asarray(data, dtype=np.float32)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype="float32", transform=transform, crs=crs, nodata=nodata) as dst:
        dst.write(data, 1)


def _licsbas(folder, *, skip=(), e=-0.6, n=-0.1):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vel = rng.normal(0, 5, SHAPE).astype(np.float32)
    vel[0, 0] = np.nan
    u = math.sqrt(1 - e * e - n * n)
    files = {"vel.geo.tif": vel, "vstd.geo.tif": np.full(SHAPE, 1.5), "E.geo.tif": np.full(SHAPE, e),
             "N.geo.tif": np.full(SHAPE, n), "U.geo.tif": np.full(SHAPE, u), "mask.geo.tif": np.ones(SHAPE),
             f"{folder.name}.geo.hgt.tif": np.full(SHAPE, 123.0)}
    for name, data in files.items():
        if name not in skip:
            _tif(folder / name, data)
    return vel


def test_synthetic_licsbas_frame(tmp_path):
    vel = _licsbas(tmp_path / "142A_05060_131313")
    ds = open_frame(tmp_path / "142A_05060_131313")
    np.testing.assert_array_equal(ds["los_velocity"].values, vel)
    assert float(ds["dem"][3, 4]) == 123.0 and ds.attrs["orbit"] == "ascending"
    assert float(ds.x[0]) == pytest.approx(100.005) and float(ds.y[0]) == pytest.approx(39.995)
    assert list_frames(tmp_path) == [tmp_path / "142A_05060_131313"]


def test_open_frame_holds_each_raster_once(tmp_path, monkeypatch):
    """Opening a frame costs its rasters plus one band in flight: georeferencing is written in place, not on two
    deep copies of the whole frame (rioxarray's default), which tripled the peak of reading a plain at 100 m."""
    import gc
    import tracemalloc

    monkeypatch.setitem(globals(), "SHAPE", (400, 500))
    _licsbas(tmp_path / "142A_05060_131313")
    open_frame(tmp_path / "142A_05060_131313")  # imports and caches outside the measurement
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        ds = open_frame(tmp_path / "142A_05060_131313")
        gc.collect()
        held, peak = (m - start for m in tracemalloc.get_traced_memory())
    finally:
        tracemalloc.stop()
    data = sum(v.nbytes for v in ds.data_vars.values())  # 5 MB: six float32 rasters and the mask
    assert data <= held <= 1.02 * data + 100_000
    assert peak <= 1.6 * data  # was 3.4 × with the deep copies


def test_u_derived_from_e_and_n(tmp_path):
    _licsbas(tmp_path / "f", skip=("U.geo.tif",), e=0.6, n=-0.1)
    ds = open_frame(tmp_path / "f")
    assert float(ds["los_u"][5, 5]) == pytest.approx(math.sqrt(1 - 0.36 - 0.01), abs=1e-6)
    assert ds.attrs["orbit"] == "descending"


def test_missing_velocity(tmp_path):
    _licsbas(tmp_path / "f", skip=("vel.geo.tif",))
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "f")
    _assert_names(ei.value, "vel.geo.tif", "velocity.h5")


def test_missing_geometry(tmp_path):
    _licsbas(tmp_path / "f", skip=("E.geo.tif",))
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "f")
    _assert_names(ei.value, "E.geo.tif", str(tmp_path / "f"))


def test_geotiff_without_crs(tmp_path):
    _licsbas(tmp_path / "f", skip=("N.geo.tif",))
    _tif(tmp_path / "f" / "N.geo.tif", np.full(SHAPE, -0.1), crs=None)
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "f")
    _assert_names(ei.value, "N.geo.tif", "CRS", "gdal_edit.py")


def test_mismatched_grids(tmp_path):
    _licsbas(tmp_path / "f", skip=("U.geo.tif",))
    _tif(tmp_path / "f" / "U.geo.tif", np.full(SHAPE, 0.78), transform=from_origin(100.5, 40.0, 0.01, 0.01))
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "f")
    _assert_names(ei.value, "U.geo.tif", "grid")
    _licsbas(tmp_path / "g", skip=("vstd.geo.tif",))
    _tif(tmp_path / "g" / "vstd.geo.tif", np.ones((SHAPE[0], SHAPE[1] + 1)))
    with pytest.raises(FrameError, match="shape"):
        open_frame(tmp_path / "g")


def test_bad_unit_vector_norm(tmp_path):
    _licsbas(tmp_path / "f", skip=("U.geo.tif",))
    _tif(tmp_path / "f" / "U.geo.tif", np.full(SHAPE, 780.0))  # stored ×1000
    with pytest.raises(GeometryError):
        open_frame(tmp_path / "f")


def test_list_frames_empty(tmp_path):
    (tmp_path / "GNSS").mkdir()
    with pytest.raises(FrameError, match="No frame folder"):
        list_frames(tmp_path)


def _mintpy(folder, *, geometry=True, geom_shape=SHAPE, attrs_extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    v = rng.normal(0, 0.005, SHAPE).astype(np.float32)
    attrs = {"X_FIRST": "120.0", "Y_FIRST": "35.0", "X_STEP": "0.001", "Y_STEP": "-0.001", "X_UNIT": "degrees",
             "LENGTH": str(SHAPE[0]), "WIDTH": str(SHAPE[1]), "UNIT": "m/year", "FILE_TYPE": "velocity"}
    attrs.update(attrs_extra or {})
    with h5py.File(folder / "velocity.h5", "w") as h:
        h["velocity"] = v
        for k, x in attrs.items():
            h.attrs[k] = x
    inc = np.linspace(32, 44, SHAPE[1])[None, :].repeat(SHAPE[0], 0).astype(np.float32)
    az = np.full(SHAPE, 102.0, np.float32)  # ascending: ground→satellite points west-ish (az from north, ccw)
    if geometry:
        with h5py.File(folder / "geometryGeo.h5", "w") as h:
            h["incidenceAngle"] = inc[: geom_shape[0], : geom_shape[1]] if geom_shape == SHAPE else \
                np.full(geom_shape, 35.0, np.float32)
            h["azimuthAngle"] = az if geom_shape == SHAPE else np.full(geom_shape, 102.0, np.float32)
            h["height"] = np.full(geom_shape, 50.0, np.float32)
    return v, inc, az


def test_mintpy_with_geometry(tmp_path):
    v, inc, az = _mintpy(tmp_path / "mp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # per-pixel geometry: no fallback warning
        ds = open_frame(tmp_path / "mp")
    np.testing.assert_array_equal(ds["los_velocity"].values, v * np.float32(1000))
    i, a = np.radians(inc.astype(np.float64)), np.radians(az.astype(np.float64))
    np.testing.assert_allclose(ds["los_e"].values, -np.sin(i) * np.sin(a), atol=1e-6)
    np.testing.assert_allclose(ds["los_n"].values, np.sin(i) * np.cos(a), atol=1e-6)
    np.testing.assert_allclose(ds["los_u"].values, np.cos(i), atol=1e-6)
    assert ds.attrs["orbit"] == "ascending" and float(ds["dem"][0, 0]) == 50.0
    assert float(ds.x[0]) == pytest.approx(120.0005, abs=1e-12) and float(ds.y[0]) == pytest.approx(34.9995)


def test_mintpy_geometry_grid_mismatch(tmp_path):
    _mintpy(tmp_path / "mp", geom_shape=(SHAPE[0] + 2, SHAPE[1]))
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "mp")
    _assert_names(ei.value, "geometryGeo.h5", "incidenceAngle")


def test_mintpy_no_geometry_no_heading(tmp_path):
    _mintpy(tmp_path / "mp", geometry=False)
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "mp")
    _assert_names(ei.value, "geometryGeo.h5", "HEADING")


def test_mintpy_default_incidence(tmp_path):
    _mintpy(tmp_path / "mp", geometry=False, attrs_extra={"HEADING": "-12.0"})
    with pytest.warns(UserWarning, match="default"):
        ds = open_frame(tmp_path / "mp")
    assert math.degrees(math.acos(float(ds["los_u"][0, 0]))) == pytest.approx(DEFAULT_INCIDENCE_DEG, abs=1e-4)
    assert ds.attrs["orbit"] == "ascending"


def test_mintpy_not_geocoded(tmp_path):
    (tmp_path / "mp").mkdir()
    with h5py.File(tmp_path / "mp" / "velocity.h5", "w") as h:
        h["velocity"] = np.zeros(SHAPE, np.float32)
        h.attrs["HEADING"] = "-12"
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "mp")
    _assert_names(ei.value, "X_FIRST", "geocode")


# ---------------------------------------------------------------------------------------------------------------
# Size guard: a raster larger than the memory available is refused before it is read
# ---------------------------------------------------------------------------------------------------------------
def test_size_guard_uses_available_memory(tmp_path, monkeypatch):
    from gpu_insar_adjust.io import frames as frames_mod

    _licsbas(tmp_path / "f")
    # 20 x 30 float32 read + a float32 copy = 4800 bytes: 4799 available is refused, 4800 accepted
    monkeypatch.setattr(frames_mod, "_available_memory", lambda: 4799)
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "f")
    err = ei.value
    assert err.field == "width/height" and err.file.endswith("vel.geo.tif") and "20 x 30" in err.message
    assert "crop or multilook" in err.fix
    monkeypatch.setattr(frames_mod, "_available_memory", lambda: 4800)
    assert open_frame(tmp_path / "f")["los_velocity"].shape == SHAPE
    # unknown available memory: no guard (nothing to compare with), the frame opens
    monkeypatch.setattr(frames_mod, "_available_memory", lambda: None)
    assert open_frame(tmp_path / "f")["los_velocity"].shape == SHAPE


def test_size_guard_on_mintpy_datasets(tmp_path, monkeypatch):
    from gpu_insar_adjust.io import frames as frames_mod

    _mintpy(tmp_path / "mp")
    monkeypatch.setattr(frames_mod, "_available_memory", lambda: 20 * 30 * 8 - 1)
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "mp")
    assert ei.value.field == "LENGTH/WIDTH" and ei.value.file.endswith("velocity.h5")
    assert "'velocity'" in ei.value.message


def test_available_memory_falls_back_to_sysconf(monkeypatch):
    import os
    import sys

    from gpu_insar_adjust.io import frames as frames_mod

    psutil = pytest.importorskip("psutil")
    with_psutil = frames_mod._available_memory()
    assert abs(with_psutil - psutil.virtual_memory().available) < 2**30
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    try:
        expected = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        expected = None
    got = frames_mod._available_memory()
    if expected is None:
        assert got is None
    else:
        assert got is not None and abs(got - expected) < 2**30 and got > 0


# ---------------------------------------------------------------------------------------------------------------
# Values no frame can hold
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raster,value,field", [
    ("vel.geo.tif", -9999.0, "los_velocity"),     # an undeclared fill value in the velocity
    ("vstd.geo.tif", -32768.0, "los_std"),
    ("hgt", -32768.0, "dem"),                      # SRTM's void, undeclared
])
def test_undeclared_no_data_values_are_refused(tmp_path, raster, value, field):
    folder = tmp_path / "142A_05060_131313"
    _licsbas(folder)
    name = f"{folder.name}.geo.hgt.tif" if raster == "hgt" else raster
    with rasterio.open(folder / name) as src:
        data = src.read(1)
    data[:8] = value  # 40 % of the rows
    _tif(folder / name, data, nodata=None)
    with pytest.raises(FrameError) as ei:
        open_frame(folder)
    assert ei.value.field == field and f"{value:g}" in ei.value.message
    assert "gdal_edit.py -a_nodata" in ei.value.fix
    _tif(folder / name, data, nodata=value)  # declared: the pixels are no data, and the frame opens
    ds = open_frame(folder)
    assert np.isnan(ds[field].values[:8]).all()


def test_look_vector_outside_a_sars_range_is_refused(tmp_path):
    """E and N given as angles-like values with no U (U derived as 0 by the unit norm), and MintPy incidence
    angles in radians (a vertical look): both refused, naming los_u."""
    from gpu_insar_adjust.errors import GeometryError

    folder = tmp_path / "142A_05060_131313"
    _licsbas(folder, skip=("U.geo.tif",), e=-0.99, n=-0.14)  # E² + N² = 0.9997: U ≈ 0.017
    with pytest.raises(GeometryError) as ei:
        open_frame(folder)
    assert ei.value.field == "los_u" and "below" in ei.value.message
    _, inc, _ = _mintpy(tmp_path / "mp")
    with h5py.File(tmp_path / "mp" / "geometryGeo.h5", "r+") as h:
        h["incidenceAngle"][...] = np.radians(inc)
    with pytest.raises(GeometryError) as ei:
        open_frame(tmp_path / "mp")
    assert ei.value.field == "los_u" and "radians" in ei.value.fix


def test_heights_off_the_earth_are_refused(tmp_path):
    folder = tmp_path / "142A_05060_131313"
    _licsbas(folder)
    _tif(folder / f"{folder.name}.geo.hgt.tif", np.full(SHAPE, 29_000.0))  # Everest in feet
    with pytest.raises(FrameError) as ei:
        open_frame(folder)
    assert ei.value.field == "dem" and "metres" in ei.value.fix


def test_damaged_or_odd_mintpy_files_are_frame_errors(tmp_path):
    """A truncated geometry file, a geometry dataset stored as a group, and a damaged compressed velocity chunk:
    FrameErrors naming the file and the dataset, not OSError or AttributeError."""
    _mintpy(tmp_path / "mp")
    geom = tmp_path / "mp" / "geometryGeo.h5"
    geom.write_bytes(geom.read_bytes()[:300])
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "mp")
    assert ei.value.field == "geometryGeo.h5" and ei.value.file == str(geom)
    _mintpy(tmp_path / "mp2")
    with h5py.File(tmp_path / "mp2" / "geometryGeo.h5", "r+") as h:
        del h["incidenceAngle"]
        h.create_group("incidenceAngle")
    with pytest.raises(FrameError) as ei:
        open_frame(tmp_path / "mp2")
    assert ei.value.field == "incidenceAngle" and "group" in ei.value.message
    folder = tmp_path / "mp3"
    _mintpy(folder)
    v = np.random.default_rng(2).normal(0, 0.005, (400, 400)).astype(np.float32)
    with h5py.File(folder / "velocity.h5", "r+") as h:
        attrs = dict(h.attrs)
        del h["velocity"]
        h.create_dataset("velocity", data=v, chunks=(100, 100), compression="gzip")
        h.attrs.update({**attrs, "LENGTH": "400", "WIDTH": "400"})
    (folder / "geometryGeo.h5").unlink()
    raw = bytearray((folder / "velocity.h5").read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 2000] = bytes(2000)
    (folder / "velocity.h5").write_bytes(bytes(raw))
    with pytest.raises(FrameError) as ei:
        open_frame(folder)
    assert ei.value.field == "velocity" and "damaged" in ei.value.fix
