"""Writers: COG / NetCDF / Zarr round trips are exact; every write is atomic."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray  # noqa: F401
import xarray as xr

from gpu_insar_adjust.errors import OutputError
from gpu_insar_adjust.io import write as write_mod
from gpu_insar_adjust.io.write import atomic_write_text, write_cog, write_json, write_netcdf, write_zarr


def _frame_like(ny=600, nx=700, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 20, (ny, nx)).astype(np.float32)
    v[:40, :55] = np.nan
    x = 110.0 + (np.arange(nx) + 0.5) * 0.01
    y = 40.0 - (np.arange(ny) + 0.5) * 0.01
    da = xr.DataArray(v, dims=("y", "x"), coords={"y": y, "x": x}, name="los_velocity",
                      attrs={"units": "mm/yr", "long_name": "LOS velocity"})
    return da.rio.write_crs("EPSG:4326")


def _cube(nt=4, ny=30, nx=40):
    rng = np.random.default_rng(2)
    c = rng.normal(0, 10, (nt, ny, nx)).astype(np.float32)
    c[1, 2, 3] = np.nan
    da = xr.DataArray(c, dims=("time", "y", "x"), name="displacement", attrs={"units": "mm"},
                      coords={"time": pd.date_range("2019-01-03", periods=nt, freq="12D").values,
                              "y": 35.0 - (np.arange(ny) + 0.5) * 0.001,
                              "x": 115.0 + (np.arange(nx) + 0.5) * 0.001})
    return da.rio.write_crs("EPSG:4326").chunk({"time": 2, "y": 15, "x": 20})


def _leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


def test_cog_round_trip(tmp_path):
    da = _frame_like()
    path = write_cog(da, tmp_path / "vel.tif", blocksize=256)
    with rasterio.open(path) as src:
        a = src.read(1)
        assert src.crs.to_epsg() == 4326 and src.dtypes[0] == "float32"
        assert np.isnan(src.nodata)
        assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
        assert src.overviews(1) == [2, 4]  # 700 x 600 with 256-pixel tiles: down to 175 x 150
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.transform.almost_equals(da.rio.transform(), precision=1e-12)
        assert src.tags()["units"] == "mm/yr"
        ov = src.read(1, out_shape=(300, 350))
    np.testing.assert_array_equal(a, da.values)  # exact, NaN pattern included
    assert np.isnan(ov[:20, :27]).all() and np.isfinite(ov[30:, 30:]).all()
    assert _leftovers(tmp_path) == []


def test_cog_bool_mask_and_errors(tmp_path):
    da = _frame_like(300, 300) > 0
    write_cog(da.rio.write_crs("EPSG:4326"), tmp_path / "mask.tif", blocksize=128)
    with rasterio.open(tmp_path / "mask.tif") as src:
        np.testing.assert_array_equal(src.read(1), da.values.astype(np.float32))
        assert src.overviews(1)
    no_crs = xr.DataArray(np.zeros((4, 4), np.float32), dims=("y", "x"),
                          coords={"y": [3.5, 2.5, 1.5, 0.5], "x": [0.5, 1.5, 2.5, 3.5]})
    with pytest.raises(OutputError, match="CRS"):
        write_cog(no_crs, tmp_path / "x.tif")
    with pytest.raises(OutputError, match="exists"):
        write_cog(_frame_like(10, 10), tmp_path / "mask.tif", overwrite=False)
    with pytest.raises(OutputError, match="folder does not exist"):
        write_cog(_frame_like(10, 10), tmp_path / "nope" / "x.tif")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "vel.tif"
    target.write_bytes(b"previous product")

    def crash(self, path, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a tiff")
        raise RuntimeError("disk full")

    monkeypatch.setattr(rioxarray.raster_array.RasterArray, "to_raster", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_cog(_frame_like(50, 50), target)
    assert target.read_bytes() == b"previous product"  # the old file is untouched
    assert _leftovers(tmp_path) == []  # and no temporary file is left behind

    monkeypatch.setattr(xr.Dataset, "to_netcdf", lambda self, path, **kw: (open(path, "wb").write(b"x"),
                                                                           1 / 0))
    with pytest.raises(ZeroDivisionError):
        write_netcdf(_cube(), tmp_path / "cube.nc")
    assert not (tmp_path / "cube.nc").exists() and _leftovers(tmp_path) == []


def _check_cube(back: xr.Dataset, ref: xr.DataArray):
    got = back["displacement"]
    np.testing.assert_array_equal(got.values, ref.values)
    np.testing.assert_array_equal(got["time"].values, ref["time"].values)
    np.testing.assert_array_equal(got["x"].values, ref["x"].values)
    np.testing.assert_array_equal(got["y"].values, ref["y"].values)
    assert got.dtype == np.float32 and got.attrs["units"] == "mm"
    assert got.attrs["grid_mapping"] == "spatial_ref" and back.rio.crs.to_epsg() == 4326


def test_netcdf_round_trip(tmp_path):
    cube = _cube()
    write_netcdf(cube, tmp_path / "cube.nc")
    with xr.open_dataset(tmp_path / "cube.nc") as back:
        _check_cube(back, cube)
        assert back.attrs["Conventions"].startswith("CF")
        assert "crs_wkt" in back["spatial_ref"].attrs
        assert back["x"].attrs["units"] == "degrees_east" and back["y"].attrs["standard_name"] == "latitude"
    assert _leftovers(tmp_path) == []


def test_zarr_round_trip_and_replace(tmp_path):
    cube = _cube()
    write_zarr(cube, tmp_path / "cube.zarr")
    write_zarr(cube * 2, tmp_path / "cube.zarr")  # replacing an existing store
    with xr.open_zarr(tmp_path / "cube.zarr") as back:
        _check_cube(back, (cube * 2).assign_attrs(units="mm"))
    assert _leftovers(tmp_path) == []


def test_text_and_json(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello\n")
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    write_json(tmp_path / "s.json", {"rate": np.float32(1.5), "n": np.int64(3), "bad": float("nan"),
                                     "arr": np.arange(3), "path": tmp_path, "when": pd.Timestamp("2020-01-02")})
    d = json.loads((tmp_path / "s.json").read_text())
    assert d == {"rate": 1.5, "n": 3, "bad": None, "arr": [0, 1, 2], "path": str(tmp_path),
                 "when": "2020-01-02T00:00:00"}
    with pytest.raises(OutputError):
        atomic_write_text(tmp_path / "a.txt", "again", overwrite=False)
    assert _leftovers(tmp_path) == [] and write_mod.atomic_output
