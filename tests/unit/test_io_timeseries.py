"""Time-series cubes: LiCSBAS cum.h5 and MintPy timeseries.h5 opened lazily, exact values, bad dates."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from gpu_insar_adjust.errors import TimeSeriesError
from gpu_insar_adjust.io import timeseries as ts_mod
from gpu_insar_adjust.io.timeseries import DEFAULT_CHUNK_BYTES, auto_chunks, open_cube

DATES = [20170101, 20170113, 20170125, 20170206, 20170218, 20170302]
NT, NY, NX = len(DATES), 24, 36


def _cube(seed=0):
    c = np.random.default_rng(seed).normal(0, 10, (NT, NY, NX)).astype(np.float32)
    c[2, 3, 4] = np.nan
    return c


def _licsbas(path, dates=DATES, cube=None):
    cube = _cube() if cube is None else cube
    with h5py.File(path, "w") as h:
        h.create_dataset("cum", data=cube, chunks=(NT, 8, 12))
        h["imdates"] = np.array(dates, dtype=np.int32)
        h["corner_lat"], h["corner_lon"] = 40.0, 30.0
        h["post_lat"], h["post_lon"] = -0.001, 0.001
        h["vel"] = np.zeros((NY, NX), np.float32)
    return cube


def _mintpy(path, dates=DATES, cube=None):
    cube = _cube(1) / 1000 if cube is None else cube
    with h5py.File(path, "w") as h:
        h["timeseries"] = cube.astype(np.float32)
        h["date"] = np.array([str(d).encode() for d in dates])
        h["bperp"] = np.zeros(len(dates), np.float32)
        for k, v in {"X_FIRST": "130.0", "Y_FIRST": "32.0", "X_STEP": "0.0002", "Y_STEP": "-0.0002",
                     "UNIT": "m", "REF_DATE": "20170101", "LENGTH": str(NY), "WIDTH": str(NX)}.items():
            h.attrs[k] = v
    return cube.astype(np.float32)


def test_licsbas_cube(tmp_path):
    cube = _licsbas(tmp_path / "cum.h5")
    da = open_cube(tmp_path / "cum.h5", chunks={"y": 8, "x": 12})
    assert da.name == "displacement" and da.dims == ("time", "y", "x") and da.dtype == np.float32
    assert da.attrs["units"] == "mm" and da.attrs["source"] == "licsbas"
    assert hasattr(da.data, "dask") and da.data.chunks == ((NT,), (8, 8, 8), (12, 12, 12))
    assert da.time.dtype == np.dtype("datetime64[ns]")
    assert str(da.time.values[1])[:10] == "2017-01-13"
    # corner_lat/lon are pixel centres (grid registration).
    assert float(da.x[0]) == 30.0 and float(da.y[0]) == 40.0 and float(da.x[5]) == pytest.approx(30.005)
    assert da.rio.crs.to_epsg() == 4326
    assert da.rio.transform().c == pytest.approx(29.9995) and da.rio.transform().f == pytest.approx(40.0005)
    np.testing.assert_array_equal(da.values, cube)


def test_mintpy_cube_m_to_mm(tmp_path):
    cube_m = _mintpy(tmp_path / "timeseries.h5")
    da = open_cube(tmp_path / "timeseries.h5")
    np.testing.assert_array_equal(da.values, cube_m * np.float32(1000))
    assert da.attrs["source"] == "mintpy" and da.attrs["reference_date"] == "2017-01-01"  # ISO, as for LiCSBAS
    assert float(da.x[0]) == pytest.approx(130.0001, abs=1e-12) and float(da.y[0]) == pytest.approx(31.9999)


def test_cube_is_read_chunk_by_chunk(tmp_path, monkeypatch):
    _licsbas(tmp_path / "cum.h5")
    reads = []
    original = ts_mod._H5Slab.__getitem__

    def counting(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(ts_mod._H5Slab, "__getitem__", counting)
    da = open_cube(tmp_path / "cum.h5", chunks={"y": 8, "x": 12})
    assert not reads  # opening reads no data
    pixel = da.isel(y=10, x=20).values
    assert len(reads) == 1 and pixel.shape == (NT,)
    t0 = da.isel(time=0).sum().compute()
    assert len(reads) == 1 + 9 and np.isfinite(float(t0))


def test_auto_chunks_bound_memory():
    # A 300-epoch, 4000 x 4000 cube is 19 GB of float32: chunks keep all epochs and stay near the target size.
    chunk = auto_chunks((300, 4000, 4000))
    assert chunk[0] == 300
    assert 0.5 * DEFAULT_CHUNK_BYTES <= 4 * np.prod(chunk) <= DEFAULT_CHUNK_BYTES
    assert auto_chunks((10, 50, 60)) == (10, 50, 60)
    chunk = auto_chunks((300, 4000, 4000), h5_chunks=(300, 100, 100))
    assert chunk[1] % 100 == 0 and chunk[2] % 100 == 0


@pytest.mark.parametrize("writer", [_licsbas, _mintpy])
def test_out_of_order_epochs(tmp_path, writer):
    dates = DATES.copy()
    dates[2], dates[3] = dates[3], dates[2]
    writer(tmp_path / "c.h5", dates=dates)
    with pytest.raises(TimeSeriesError) as ei:
        open_cube(tmp_path / "c.h5")
    e = ei.value
    assert "out of order" in str(e) and e.field in ("imdates", "date") and "sort" in e.fix
    assert "20170206 → 20170125" in str(e) and str(tmp_path / "c.h5") in str(e)


@pytest.mark.parametrize("writer", [_licsbas, _mintpy])
def test_duplicate_epochs(tmp_path, writer):
    dates = DATES.copy()
    dates[4] = dates[3]
    writer(tmp_path / "c.h5", dates=dates)
    with pytest.raises(TimeSeriesError, match="duplicated"):
        open_cube(tmp_path / "c.h5")


def test_bad_dates_and_layouts(tmp_path):
    _licsbas(tmp_path / "a.h5", dates=[20170101, 20170113, 20171345, 20170206, 20170218, 20170302])
    with pytest.raises(TimeSeriesError, match="YYYYMMDD"):
        open_cube(tmp_path / "a.h5")
    with h5py.File(tmp_path / "b.h5", "w") as h:
        h["velocity"] = np.zeros((3, 3), np.float32)
    with pytest.raises(TimeSeriesError) as ei:
        open_cube(tmp_path / "b.h5")
    assert ei.value.field == "cum/timeseries" and "velocity" in str(ei.value)
    _licsbas(tmp_path / "c.h5", dates=DATES[:-1])  # one date fewer than layers
    with pytest.raises(TimeSeriesError, match="epochs"):
        open_cube(tmp_path / "c.h5")
    with h5py.File(tmp_path / "d.h5", "w") as h:
        h["timeseries"] = np.zeros((NT, 3, 3), np.float32)
        h["date"] = np.array([str(d).encode() for d in DATES])
    with pytest.raises(TimeSeriesError, match="not geocoded"):
        open_cube(tmp_path / "d.h5")


def test_missing_dask_is_a_gia_error_with_the_install_fix(tmp_path, monkeypatch):
    import sys

    from gpu_insar_adjust.errors import BackendUnavailableError, GiaError

    _licsbas(tmp_path / "cum.h5")
    monkeypatch.setitem(sys.modules, "dask.array", None)  # import dask.array now raises ImportError
    with pytest.raises(BackendUnavailableError) as ei:
        open_cube(tmp_path / "cum.h5")
    assert isinstance(ei.value, GiaError) and ei.value.field == "dask"
    assert ei.value.fix == "pip install 'gpu_insar_adjust[dask]'" and ei.value.file.endswith("cum.h5")


def test_damaged_block_read_is_a_time_series_error(tmp_path):
    cube = _licsbas(tmp_path / "cum.h5")
    da = open_cube(tmp_path / "cum.h5", chunks={"y": 8, "x": 12})
    np.testing.assert_array_equal(da[:, :8, :12].values, cube[:, :8, :12])
    # the file loses its cube after opening (replaced, truncated, deleted by another process)
    with h5py.File(tmp_path / "cum.h5", "a") as h:
        del h["cum"]
    with pytest.raises(TimeSeriesError) as ei:
        da.values  # noqa: B018 - reading is the point
    assert ei.value.field == "cum" and ei.value.file.endswith("cum.h5") and "re-export" in ei.value.fix


def test_reference_date_outside_the_cube_and_non_numeric_cubes_are_refused(tmp_path):
    """MintPy's REF_DATE must be one of the epochs (a cube referenced elsewhere would be labelled wrongly);
    a cube of strings or complex numbers is no displacement."""
    _mintpy(tmp_path / "timeseries.h5")
    with h5py.File(tmp_path / "timeseries.h5", "r+") as h:
        h.attrs["REF_DATE"] = "20170105"
    with pytest.raises(TimeSeriesError) as ei:
        open_cube(tmp_path / "timeseries.h5")
    assert ei.value.field == "REF_DATE" and "20170105" in ei.value.message
    with h5py.File(tmp_path / "timeseries.h5", "r+") as h:
        h.attrs["REF_DATE"] = "garbage"
    with pytest.raises(TimeSeriesError) as ei:
        open_cube(tmp_path / "timeseries.h5")
    assert ei.value.field == "REF_DATE"
    cube = _cube().astype(np.complex64)
    _licsbas(tmp_path / "cum.h5")
    with h5py.File(tmp_path / "cum.h5", "r+") as h:
        del h["cum"]
        h["cum"] = cube
    with pytest.raises(TimeSeriesError) as ei:
        open_cube(tmp_path / "cum.h5")
    assert ei.value.field == "cum" and "complex" in ei.value.message
