"""`pipeline.write_products`: which files a run writes, as the output settings ask."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr

from gpu_insar_adjust import errors
from gpu_insar_adjust.config import OutputConfig, load_config
from gpu_insar_adjust.pipeline import write_products


def _grid(name, values, x0=115.0, y0=39.0, step=0.001):
    ny, nx = values.shape
    da = xr.DataArray(values.astype(np.float32), dims=("y", "x"), name=name, attrs={"units": "mm/yr"},
                      coords={"y": y0 - step * (np.arange(ny) + 0.5), "x": x0 + step * (np.arange(nx) + 0.5)})
    return da.rio.write_crs("EPSG:4326", inplace=True)


def _products(n=1100):
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:n, 0:n] / n
    v = -30 * np.exp(-((xx - 0.4) ** 2 + (yy - 0.6) ** 2) / 0.05) + rng.normal(0, 0.5, (n, n))
    v[:40, :] = np.nan  # no data along one edge
    velocity = {"vertical_velocity": _grid("vertical_velocity", v),
                "vertical_velocity_std": _grid("vertical_velocity_std", np.abs(v) * 0.05 + 1.0),
                "east_velocity": _grid("east_velocity", v * 0.1),
                "east_velocity_std": _grid("east_velocity_std", np.full((n, n), 2.0))}
    frame = {"F1": {"correction": _grid("correction", v[:300, :200] * 0.01),
                    "los_adjusted": _grid("los_adjusted", v[:300, :200])}}
    return velocity, frame


def _timeseries(velocity):
    v = velocity["vertical_velocity"][:60, :50]
    t = np.datetime64("2019-01-01", "ns") + np.arange(40) * np.timedelta64(12, "D")
    cube = xr.concat([v * k for k in range(40)], dim="time").assign_coords(time=t).rename("vertical_displacement")
    cube = cube.assign_attrs(units="mm").chunk({"time": -1})  # as the pipeline's cube: all epochs per block
    annual = xr.Dataset({"annual_velocity": (v * 1.0).expand_dims(year=[2020])})
    return {"cube": cube, "annual": annual, "cumulative": (v * 2).rename("cumulative").assign_attrs(units="mm")}


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.overviews(1), ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT")


def test_default_products_are_cogs_and_no_extras(tmp_path):
    velocity, frame = _products()
    written = write_products(tmp_path, OutputConfig(), velocity, frame)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in written)
    assert names == ["east_velocity.tif", "east_velocity_std.tif", "frames/F1.correction.tif",
                     "frames/F1.los_adjusted.tif", "vertical_velocity.tif", "vertical_velocity_std.tif"]
    data, overviews, layout = _read(tmp_path / "vertical_velocity.tif")
    assert layout == "COG" and overviews == [2, 4]  # down to one 512-pixel tile
    np.testing.assert_array_equal(data, velocity["vertical_velocity"].values)


def test_plain_geotiff_netcdf_and_zarr_when_asked(tmp_path):
    velocity, frame = _products()
    ts = _timeseries(velocity)
    out = OutputConfig(cog=False, netcdf=True, zarr=True)
    write_products(tmp_path, out, velocity, frame, ts)
    data, overviews, layout = _read(tmp_path / "vertical_velocity.tif")
    assert layout != "COG" and overviews == []
    np.testing.assert_array_equal(data, velocity["vertical_velocity"].values)
    with rasterio.open(tmp_path / "frames" / "F1.los_adjusted.tif") as ds:
        assert ds.profile["tiled"] and ds.profile["compress"] == "deflate" and ds.crs.to_epsg() == 4326
        assert ds.profile["blockxsize"] == ds.profile["blockysize"] == 512
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
    with xr.open_dataset(tmp_path / "velocity.nc", decode_coords="all") as nc:
        assert sorted(nc.data_vars) == sorted(velocity)
        for name, da in velocity.items():
            np.testing.assert_array_equal(nc[name].values, da.values)
        assert nc["vertical_velocity"].attrs["units"] == "mm/yr" and nc.rio.crs.to_epsg() == 4326
    with xr.open_zarr(tmp_path / "vertical_displacement.zarr") as z, \
            xr.open_dataset(tmp_path / "vertical_displacement.nc") as c:
        np.testing.assert_array_equal(z["vertical_displacement"].values, ts["cube"].values)
        np.testing.assert_array_equal(c["vertical_displacement"].values, ts["cube"].values)
        assert z["vertical_displacement"].encoding["chunks"][0] == 16  # one epoch never reads the whole series
    assert (tmp_path / "annual_vertical_velocity.nc").is_file()
    assert (tmp_path / "cumulative_vertical_displacement.tif").is_file()


def test_compression_level_changes_bytes_not_values(tmp_path):
    velocity, frame = _products()
    sizes = {}
    for cog in (True, False):  # the COG driver's LEVEL and the GeoTIFF driver's ZLEVEL
        for level in (1, 9):
            d = tmp_path / f"{cog}{level}"
            d.mkdir()
            write_products(d, OutputConfig(cog=cog, compress_level=level, netcdf=True), velocity, frame)
            np.testing.assert_array_equal(_read(d / "vertical_velocity.tif")[0],
                                          velocity["vertical_velocity"].values)
            sizes[cog, level] = {n: (d / n).stat().st_size for n in ("vertical_velocity.tif", "velocity.nc")}
        for name in sizes[cog, 1]:
            assert sizes[cog, 9][name] < sizes[cog, 1][name], (cog, name)  # level 9 compresses further than 1


def test_compression_level_out_of_range_is_a_config_error():
    with pytest.raises(errors.ConfigError, match="compress_level"):
        load_config(overrides={"output.compress_level": 0})


def test_products_of_an_earlier_run_that_this_run_does_not_write_are_removed(tmp_path):
    """A rerun into the same folder with other settings or inputs leaves no product of the earlier run that could
    pass for its own: no NetCDF or Zarr it was not asked for, no east component it did not find, no time-series
    products, no rasters of frames it did not adjust."""
    velocity, frame = _products()
    ts = _timeseries(velocity)
    write_products(tmp_path, OutputConfig(netcdf=True, zarr=True), velocity, {**frame, "F2": frame["F1"]}, ts)
    assert (tmp_path / "vertical_displacement.zarr").is_dir()
    assert (tmp_path / "frames" / "F2.correction.tif").exists()
    vertical_only = {k: v for k, v in velocity.items() if k.startswith("vertical")}
    write_products(tmp_path, OutputConfig(), vertical_only, frame)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["frames/F1.correction.tif", "frames/F1.los_adjusted.tif", "vertical_velocity.tif",
                    "vertical_velocity_std.tif"]


def test_time_series_run_writes_no_zarr_by_default(tmp_path):
    velocity, frame = _products()
    write_products(tmp_path, OutputConfig(), velocity, frame, _timeseries(velocity))
    assert (tmp_path / "vertical_displacement.nc").is_file()
    assert not (tmp_path / "vertical_displacement.zarr").exists()
    assert not (tmp_path / "velocity.nc").exists()


def test_output_folder_preparation_clears_temporaries_and_moved_aside_products(tmp_path):
    """An interrupted run may leave a product's temporary or the old product moved aside by the atomic rename
    (hidden ``.*.tmp`` / ``.*.old``, files or folders): cleared before the next run writes."""
    from gpu_insar_adjust.pipeline import _prepare_out_dir

    (tmp_path / ".vertical_velocity.tif.1a2b.tmp").write_bytes(b"partial")
    (tmp_path / ".vertical_displacement.zarr.3c4d.old").mkdir()
    (tmp_path / ".vertical_displacement.zarr.3c4d.old" / "zarr.json").write_text("{}")
    (tmp_path / "vertical_velocity.tif").write_bytes(b"product")
    _prepare_out_dir(tmp_path, "fingerprint", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vertical_velocity.tif"]


def test_validation_of_replaced_products_is_removed_and_of_a_resumed_run_kept(tmp_path):
    """``gia validate``'s validation.json describes the products in the folder: a run that replaces them
    (another fingerprint, ``--overwrite``) removes it; the same run resumed keeps it."""
    import json

    from gpu_insar_adjust.pipeline import MANIFEST, _prepare_out_dir

    (tmp_path / MANIFEST).write_text(json.dumps({"fingerprint": "run A", "status": "complete"}))
    (tmp_path / "validation.json").write_text("{}")
    _prepare_out_dir(tmp_path, "run A", overwrite=False)
    assert (tmp_path / "validation.json").is_file()
    _prepare_out_dir(tmp_path, "run B", overwrite=True)
    assert not (tmp_path / "validation.json").exists()
