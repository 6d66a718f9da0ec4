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


def test_netcdf_chunks_tile_the_dask_chunks(tmp_path):
    """A Dask-backed cube is written in file chunks that tile its Dask chunks (at most 16 epochs deep): each
    Dask chunk then writes whole compressed chunks; the values come back exactly."""
    cube = _cube(nt=40, ny=30, nx=40).chunk({"time": -1, "y": 15, "x": 20})
    write_netcdf(cube, tmp_path / "a.nc")
    with xr.open_dataset(tmp_path / "a.nc") as back:
        assert back["displacement"].encoding["chunksizes"] == (16, 15, 20)
        np.testing.assert_array_equal(back["displacement"].values, cube.values)
    write_netcdf(cube.chunk({"time": 5, "y": 30, "x": 8}), tmp_path / "b.nc")
    with xr.open_dataset(tmp_path / "b.nc") as back:
        assert back["displacement"].encoding["chunksizes"] == (5, 30, 8)
        np.testing.assert_array_equal(back["displacement"].values, cube.values)


def test_zarr_round_trip_and_replace(tmp_path):
    cube = _cube()
    write_zarr(cube, tmp_path / "cube.zarr")
    doubled = (cube * 2).assign_attrs(cube.attrs)  # arithmetic keeps no attributes before xarray 2025.11
    write_zarr(doubled, tmp_path / "cube.zarr")  # replacing an existing store
    with xr.open_zarr(tmp_path / "cube.zarr") as back:
        _check_cube(back, doubled)
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


# ----------------------------------------------------------------------------------------------------------------
# Finite-or-NaN guard: +/-inf never reaches a file
# ----------------------------------------------------------------------------------------------------------------
def _with_value(obj: xr.DataArray, index, value, *, dask: bool):
    arr = obj.load().copy(deep=True)
    arr[index] = value
    return arr.chunk(obj.chunksizes or {d: 25 for d in obj.dims}) if dask else arr


_WRITERS = {
    "cog": (write_cog, "vel.tif", lambda: _frame_like(60, 70), (45, 66)),
    "netcdf": (write_netcdf, "cube.nc", _cube, (3, 29, 39)),  # in the last Dask block
    "zarr": (write_zarr, "cube.zarr", _cube, (3, 29, 39)),
}


@pytest.mark.parametrize("dask", [False, True], ids=["numpy", "dask"])
@pytest.mark.parametrize("kind", list(_WRITERS))
@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_inf_rejected_and_previous_output_kept(tmp_path, kind, dask, bad):
    writer, name, make, index = _WRITERS[kind]
    target = tmp_path / name
    good = make()
    writer(good, target)  # a previous, valid product
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError) as exc:
        writer(_with_value(good, index, bad, dask=dask), target)
    err = exc.value
    assert err.file == str(target) and err.field == good.name
    assert "inf" in err.message and "upstream numerical failure" in err.fix
    assert str(target) in str(err) and good.name in str(err)
    assert _leftovers(tmp_path) == []  # no temporary file or store
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # ...and the previous product is intact, value for value
    if kind == "cog":
        with rasterio.open(target) as src:
            np.testing.assert_array_equal(src.read(1), good.values)
    else:
        opener = xr.open_zarr if kind == "zarr" else xr.open_dataset
        with opener(target) as back:
            np.testing.assert_array_equal(back[good.name].values, good.values)


@pytest.mark.parametrize("kind", list(_WRITERS))
def test_inf_rejected_leaves_nothing_when_no_previous_output(tmp_path, kind):
    writer, name, make, index = _WRITERS[kind]
    with pytest.raises(OutputError, match="inf"):
        writer(_with_value(make(), index, np.inf, dask=True), tmp_path / name)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", list(_WRITERS))
def test_nan_accepted_exactly(tmp_path, kind):
    writer, name, make, _ = _WRITERS[kind]
    good = make().load()
    good[..., :5, :] = np.nan  # whole blocks of no data, NaN everywhere in a row band
    good = good.chunk(good.chunksizes) if kind != "cog" else good
    writer(good, tmp_path / name)
    if kind == "cog":
        with rasterio.open(tmp_path / name) as src:
            got = src.read(1)
    else:
        opener = xr.open_zarr if kind == "zarr" else xr.open_dataset
        with opener(tmp_path / name) as back:
            got = back[good.name].values
    np.testing.assert_array_equal(got, good.values)  # NaN pattern and values exact
    assert np.isnan(got).sum() == np.isnan(good.values).sum() > 0


def test_dask_guard_computes_each_block_once(tmp_path):
    """The inf check is fused into the write: every source block is computed exactly once."""
    import dask.array as dsa

    calls = []

    def source(block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return np.full(block_info[None]["chunk-shape"], 1.5, np.float32)

    data = dsa.map_blocks(source, chunks=((2, 2), (15, 15), (20, 20)), dtype=np.float32,
                          meta=np.empty((0, 0, 0), np.float32))
    cube = _cube().copy(data=data)
    write_netcdf(cube, tmp_path / "c.nc", compress=False)
    assert sorted(calls) == sorted({(t, y, x) for t in range(2) for y in range(2) for x in range(2)})
    with xr.open_dataset(tmp_path / "c.nc") as back:
        assert float(back["displacement"].sum()) == 1.5 * cube.size


def test_cog_float32_overflow_and_dtype_surprises(tmp_path):
    wide = _frame_like(40, 40).astype(np.float64)
    wide[5, 5] = 1e39  # finite in float64, inf once stored as float32
    with pytest.raises(OutputError, match="after conversion from float64 to float32"):
        write_cog(wide, tmp_path / "v.tif")
    cplx = _frame_like(40, 40).astype(np.complex64)
    with pytest.raises(OutputError, match="complex") as exc:
        write_cog(cplx, tmp_path / "v.tif")
    assert exc.value.field == "los_velocity"
    with pytest.raises(OutputError, match="complex"):
        write_netcdf(_cube().astype(np.complex64), tmp_path / "c.nc")
    obj = _cube().load().astype(object)
    with pytest.raises(OutputError, match="object dtype"):
        write_zarr(obj, tmp_path / "c.zarr")
    assert os.listdir(tmp_path) == []
    # integer and boolean products are fine (no inf possible) and round-trip exactly
    counts = (_frame_like(40, 40).fillna(0) > 0).astype(np.int16).rename("n_frames")
    write_netcdf(counts, tmp_path / "n.nc")
    with xr.open_dataset(tmp_path / "n.nc") as back:
        np.testing.assert_array_equal(back["n_frames"].values, counts.values)


@pytest.mark.parametrize("kind", ["netcdf", "zarr"])
def test_inf_block_leaves_no_straggler_writes(tmp_path, kind):
    """Blocks still being computed when an inf block fails must not write into (re-create) the temporary
    output after the error: the writer joins its threads before cleaning up."""
    import time

    import dask.array as dsa

    writer, name, _, _ = _WRITERS[kind]

    def source(block_info=None):
        loc = block_info[None]["chunk-location"]
        block = np.full(block_info[None]["chunk-shape"], 1.5, np.float32)
        if loc == (0, 0, 0):
            block[0, 0, 0] = np.inf  # fails at once...
        else:
            time.sleep(0.15)  # ...while the other blocks are still running and about to write
        return block

    data = dsa.map_blocks(source, chunks=((2, 2), (15, 15), (20, 20)), dtype=np.float32,
                          meta=np.empty((0, 0, 0), np.float32))
    with pytest.raises(OutputError, match="1 of 600 value"):
        writer(_cube().copy(data=data), tmp_path / name)
    time.sleep(0.6)  # any straggler would have written its chunk by now
    assert os.listdir(tmp_path) == []


def test_cog_keeps_the_carried_transform_exactly(tmp_path):
    """The transform an array carries (from the file it was read from) is written bit for bit, not one
    re-derived from its rounded pixel-centre coordinates; a stale carried transform (array sliced after
    reading) is not used."""
    from affine import Affine

    exact = Affine(0.05, 0.0, 113.5, 0.0, -0.05, 39.0)
    x = exact.c + (np.arange(70) + 0.5) * exact.a
    y = exact.f + (np.arange(60) + 0.5) * exact.e
    da = _frame_like(60, 70).assign_coords(x=x, y=y).rio.write_transform(exact)
    assert da.rio.transform(recalc=True).a != exact.a  # re-deriving the pixel size rounds in the last bit
    write_cog(da, tmp_path / "a.tif")
    with rasterio.open(tmp_path / "a.tif") as a:
        assert a.transform == exact  # every coefficient exact
        np.testing.assert_array_equal(a.read(1), da.values)
    sub = da.isel(x=slice(10, 30), y=slice(5, 25))  # the carried GeoTransform is now stale
    write_cog(sub, tmp_path / "c.tif")
    with rasterio.open(tmp_path / "c.tif") as c:
        assert c.transform.c == pytest.approx(113.5 + 10 * 0.05, abs=1e-12)
        assert c.transform.f == pytest.approx(39.0 - 5 * 0.05, abs=1e-12)
        assert c.transform.a == pytest.approx(0.05, rel=1e-12)
        np.testing.assert_array_equal(c.read(1), sub.values)


def test_cog_leaves_the_callers_array_untouched(tmp_path):
    """write_cog writes georeferencing and nodata into its own copy (in place, to spare a deep copy of the raster
    per call): the caller's DataArray keeps its values, attributes and coordinates."""
    da = _frame_like()
    before = da.copy(deep=True)
    write_cog(da, tmp_path / "vel.tif")
    xr.testing.assert_identical(da, before)
    assert "_FillValue" not in da.attrs and "_FillValue" not in da.encoding
