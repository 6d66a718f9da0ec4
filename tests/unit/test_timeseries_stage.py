"""The streamed time-series stage of ``gia run`` against an in-memory reference, and its memory bound.

Three overlapping frames of the embedded scenario (0.1°, 90-day epochs, 34 epochs; one frame's dates shifted by
5 days so that it is interpolated onto the common time axis) go through ``pipeline.timeseries_stage`` and
through the in-memory implementation it replaced (every frame's cube and the merged cube held in RAM). Measured
when written: merged cube within 8e-6 mm (a float32 rounding step), annual velocities within 7e-6 mm/yr,
cumulative displacement within 8e-6 mm, groundwater volume equal to 2e-12 relative; with epoch ramps alike, and
with the merged epochs stored 8, 5 or 1 to a chunk. Memory (0.025°, traced peak): doubling the epochs (33 → 66
common epochs) changes the streamed stage's peak by +1.1 MB (13.7 → 14.8 MB; one epoch per chunk: 12.9 → 14.1 MB)
while the merged float32 cube grows by 2.8 MB and the in-memory reference's peak by 49 MB (58 → 107 MB).
"""

from __future__ import annotations

import shutil
import tracemalloc

import h5py
import numpy as np
import pytest
import xarray as xr
import zarr

from gpu_insar_adjust import pipeline
from gpu_insar_adjust.config import GiaConfig
from gpu_insar_adjust.io.frames import open_frame
from gpu_insar_adjust.mosaic import target_grid
from gpu_insar_adjust.synthetic import make_scenario

FRAMES = ("047D_05070_131313", "040A_05000_131313", "142A_05000_131313")


def _reference_stage(frames, cube_paths, final_corr, hfields, verts, grid, cfg, *, vertical=None) -> dict:
    """The stage as it was before streaming: every cube and the merged cube in memory (the reference)."""
    from gpu_insar_adjust import backend
    from gpu_insar_adjust.analysis.groundwater import groundwater_loss
    from gpu_insar_adjust.io.timeseries import open_cube
    from gpu_insar_adjust.mosaic import merge_frames
    from gpu_insar_adjust.timeseries import (apply_velocity_correction, cumulative_displacement,
                                             fit_annual_velocities, remove_epoch_ramps)

    cubes = {k: open_cube(p) for k, p in enumerate(cube_paths)}
    starts = max(c["time"].values[0] for c in cubes.values())
    ends = min(c["time"].values[-1] for c in cubes.values())
    first = cubes[min(cubes)]
    times = first["time"].values[(first["time"].values >= starts) & (first["time"].values <= ends)]
    vert_cubes = []
    for k, cube in cubes.items():
        fr = frames[k]
        yx = {"y": cube["y"], "x": cube["x"]}
        corr = xr.DataArray(np.asarray(final_corr[k], np.float32), dims=("y", "x"), coords=yx)
        los_adj = np.asarray(backend.to_numpy(fr["los_velocity"].data), np.float64) - np.asarray(final_corr[k])
        usable = np.isfinite(los_adj)
        c = apply_velocity_correction(cube, corr).where(xr.DataArray(usable, dims=("y", "x"), coords=yx))
        if cfg.timeseries.epoch_ramps:
            far = usable & np.isfinite(verts[k]) & (np.abs(verts[k]) < cfg.timeseries.far_field_max_rate_mm_yr)
            if far.sum() >= 50:
                t_c = (c["time"].values - c["time"].values[0]) / np.timedelta64(1, "D") / 365.25
                lin = (xr.DataArray(los_adj, dims=("y", "x"), coords=yx) *
                       xr.DataArray(t_c, dims="time", coords={"time": c["time"]})).astype(c.dtype)
                c = remove_epoch_ramps(c - lin, far, order=1) + lin
        e, n, u = (np.asarray(fr[v].values, np.float64) for v in ("los_e", "los_n", "los_u"))
        h_rate = e * hfields[k]["ve"].values + n * hfields[k]["vn"].values
        c = c.interp(time=times) if not np.array_equal(c["time"].values, times) else c
        t_yr = (times - cube["time"].values[0]) / np.timedelta64(1, "D") / 365.25
        data = np.asarray(c.values, np.float64)
        vert = (data - h_rate[None] * t_yr[:, None, None]) / u[None]
        vert_cubes.append((k, vert - vert[:1]))
    merged = np.full((times.size, *grid.shape), np.nan, np.float32)
    for t in range(times.size):
        das = [pipeline._frame_da(frames[k], v[t], "d") for k, v in vert_cubes]
        stds = [pipeline._frame_da(frames[k], np.where(np.isfinite(v[t]), 1.0, np.nan), "d_std")
                for k, v in vert_cubes]
        m = merge_frames(das, stds, grid, feather_km=cfg.mosaic.feather_km, tile_size=cfg.mosaic.tile_size)
        merged[t] = np.asarray(m.value, np.float32)
    if vertical is not None:
        # the per-pixel least-squares trend replaced by the vertical velocity (as pipeline._anchor_trend did)
        tt = (times - times[0]) / np.timedelta64(1, "D") / 365.25
        d = merged.astype(np.float64)
        ok = np.isfinite(d)
        tk = np.broadcast_to(tt[:, None, None], d.shape)
        n = ok.sum(0).astype(float)
        st, stt = np.where(ok, tk, 0).sum(0), np.where(ok, tk * tk, 0).sum(0)
        sd, std_ = np.where(ok, d, 0).sum(0), np.where(ok, tk * d, 0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            sxx = stt - st * st / n
            slope = (std_ - st * sd / n) / sxx
        fix = np.where((n >= 3) & (sxx > 0) & np.isfinite(slope) & np.isfinite(vertical), vertical - slope, 0.0)
        merged = (merged + fix[None] * tt[:, None, None]).astype(np.float32)
    ys, xs = grid.coords()
    cube_v = xr.DataArray(merged, dims=("time", "y", "x"), coords={"time": times, "y": ys, "x": xs},
                          name="vertical_displacement").rio.write_crs(grid.crs)
    annual = fit_annual_velocities(cube_v, chunk_pixels=cfg.timeseries.chunk_pixels)
    cum = cumulative_displacement(cube_v, times[0], times[-1])
    gw = groundwater_loss(cube_v, split_dates=(str(cfg.analysis.groundwater_split_date),),
                          inelastic_fraction=cfg.analysis.inelastic_fraction)
    return {"cube": cube_v, "annual": annual, "cumulative": cum, "groundwater": gw}


def _dates(yyyymmdd) -> np.ndarray:
    return np.array([np.datetime64(f"{s // 10000:04d}-{s // 100 % 100:02d}-{s % 100:02d}") for s in yyyymmdd])


def _shift_dates(src, dst, days: int):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        d = _dates(f["imdates"][()]) + np.timedelta64(days, "D")
        f["imdates"][...] = np.array([int(str(x).replace("-", "")) for x in d], np.int32)
    return dst


def _densify(src, dst):
    """A copy of a cum.h5 with an extra epoch half-way between each pair (2T − 1 epochs)."""
    with h5py.File(src, "r") as f:
        cum = f["cum"][()]
        dates = f["imdates"][()]
        others = {k: f[k][()] for k in ("corner_lat", "corner_lon", "post_lat", "post_lon", "vel")}
    d = _dates(dates)
    mid = d[:-1] + (d[1:] - d[:-1]) // 2
    all_d = np.empty(2 * d.size - 1, d.dtype)
    all_d[0::2], all_d[1::2] = d, mid
    dense = np.empty((all_d.size, *cum.shape[1:]), np.float32)
    dense[0::2], dense[1::2] = cum, 0.5 * (cum[:-1] + cum[1:])
    with h5py.File(dst, "w") as f:
        f["cum"] = dense
        f["imdates"] = np.array([int(str(x).replace("-", "")) for x in all_d], np.int32)
        for k, v in others.items():
            f[k] = v
    return dst


def _build(root, resolution: float) -> dict:
    paths = make_scenario(root / "scen", resolution=resolution, timeseries=True, epoch_days=90, n_stations=60)
    frames, cube_paths, final_corr, hfields, verts = [], [], [], [], []
    for i, name in enumerate(FRAMES):
        folder = paths.frames_dir / name
        fr = open_frame(folder)
        frames.append(fr)
        cube = folder / "cum.h5"
        if i == 2:  # another acquisition day: interpolated onto the first frame's dates
            cube = _shift_dates(cube, root / f"{name}.cum.h5", 5)
        cube_paths.append(cube)
        ny, nx = fr.sizes["y"], fr.sizes["x"]
        rows, cols = np.mgrid[0:ny, 0:nx]
        final_corr.append(1.5 * (i - 1) + 0.05 * cols - 0.03 * rows)  # mm/yr, a plane per frame
        hfields.append({"ve": xr.full_like(fr["los_velocity"], 2.0 + i),
                        "vn": xr.full_like(fr["los_velocity"], -9.0)})
        # adjusted vertical-equivalent rates: only used to pick the far field of the epoch ramps (|rate| < 5)
        verts.append(np.where(cols < nx // 2, 1.0, -30.0))
    grid = target_grid(frames)
    gy, gx = np.mgrid[0:grid.shape[0], 0:grid.shape[1]]
    vertical = -15.0 + 0.2 * gx - 0.1 * gy  # mm/yr
    vertical[:3] = np.nan  # no velocity there: the trend of the cube is kept
    return dict(root=root, frames=frames, cube_paths=cube_paths, final_corr=final_corr, hfields=hfields,
                verts=verts, grid=grid, vertical=vertical)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("ts_stage"), 0.1)


@pytest.fixture(scope="module")
def setup_fine(tmp_path_factory):
    """The same at 0.025° (16 times the pixels), so that the data, not Python objects, make the peak."""
    return _build(tmp_path_factory.mktemp("ts_stage_fine"), 0.025)


def _run(setup, cfg, work, cube_paths=None, **kw):
    s = setup
    return pipeline.timeseries_stage(s["frames"], cube_paths or s["cube_paths"], s["final_corr"], s["hfields"],
                                     s["verts"], s["grid"], cfg, vertical=s["vertical"], work_dir=work, **kw)


@pytest.mark.parametrize("epoch_ramps,epochs_per_chunk", [(False, 8), (True, 8), (False, 5), (False, 1)])
def test_streamed_stage_equals_in_memory_reference(setup, tmp_path, monkeypatch, epoch_ramps, epochs_per_chunk):
    # the merged epochs are written to the store several at a time: 33 epochs make 4 chunks of 8 and a last of 1
    # (or 6 of 5 and a last of 3; or one epoch per chunk when a single epoch fills the buffer)
    epoch_bytes = 4 * setup["grid"].shape[0] * setup["grid"].shape[1]
    monkeypatch.setattr(pipeline, "_TS_BUFFER_BYTES", epochs_per_chunk * epoch_bytes + epoch_bytes // 2)
    cfg = GiaConfig()
    cfg.timeseries.epoch_ramps = epoch_ramps
    cfg.timeseries.chunk_pixels = 1024  # several pixel tiles: the blocked path is exercised
    s = setup
    out = _run(s, cfg, tmp_path / "work")
    ref = _reference_stage(s["frames"], s["cube_paths"], s["final_corr"], s["hfields"], s["verts"], s["grid"],
                           cfg, vertical=s["vertical"])
    # the cube stays lazy (Dask over the on-disk store), blocked over pixels with all epochs per block
    assert out["cube"].chunks is not None and len(out["cube"].chunks[1]) * len(out["cube"].chunks[2]) > 1
    assert len(out["cube"].chunks[0]) == 1
    store = tmp_path / "work" / "vertical_displacement.zarr"
    assert zarr.open_array(store, path="vertical_displacement", mode="r").chunks[0] == epochs_per_chunk
    got, want = out["cube"].values, ref["cube"].values
    assert got.shape == want.shape == (33, *s["grid"].shape)  # common span: 33 of the first frame's 34 epochs
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.isfinite(got).mean() > 0.3
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)  # mm; float32 rounding of values up to ~1 m
    np.testing.assert_allclose(out["annual"]["annual_velocity"].values, ref["annual"]["annual_velocity"].values,
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["annual"]["residual_rms"].values, ref["annual"]["residual_rms"].values,
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["cumulative"].values, ref["cumulative"].values, rtol=0, atol=2e-3)
    gw_got, gw_want = out["summary"]["groundwater"], ref["groundwater"]
    assert gw_want["total_loss_m3"] != 0
    assert gw_got["total_loss_m3"] == pytest.approx(gw_want["total_loss_m3"], rel=1e-6)
    assert gw_got["total_loss_std_m3"] == pytest.approx(gw_want["total_loss_std_m3"], rel=1e-6)
    for a, b in zip(gw_got["periods"], gw_want["periods"], strict=True):
        assert (a["start"], a["end"]) == (b["start"], b["end"])
        assert a["loss_m3"] == pytest.approx(b["loss_m3"], rel=1e-6)
    assert out["summary"]["max_cumulative_subsidence_mm"] == pytest.approx(-float(np.nanmin(want[-1] - want[0])),
                                                                          abs=2e-3)
    # the anchored trend is the vertical velocity where it is defined
    t = (out["cube"]["time"].values - out["cube"]["time"].values[0]) / np.timedelta64(1, "D") / 365.25
    d = got[:, 10, :]
    ok = np.all(np.isfinite(d), axis=0) & np.isfinite(s["vertical"][10])
    slope = np.polyfit(t, d[:, ok], 1)[0]
    np.testing.assert_allclose(slope, s["vertical"][10][ok], atol=1e-3)


@pytest.mark.parametrize("chunks_per_shard", [1024, 1])
def test_store_files_grow_with_epochs_not_with_their_square(setup, tmp_path, monkeypatch, chunks_per_shard):
    """Blocks of all epochs × a tile bound the fits' memory, so the tiles shrink as the epochs grow; a file per
    (epoch, tile) chunk would make T² × pixels files (millions for a plain at 100 m and 250 epochs). With Zarr 3
    the chunks of a few epochs go into shards of whole rows of tiles: files grow with the epochs only."""
    monkeypatch.setattr(pipeline, "_TS_CHUNKS_PER_SHARD", chunks_per_shard)
    s = setup
    cfg = GiaConfig()
    cfg.timeseries.chunk_pixels = 1024  # the smallest tiles (32 × 32): several chunks per epoch
    out = _run(s, cfg, tmp_path / "work")
    store = tmp_path / "work" / "vertical_displacement.zarr"
    arr = zarr.open_array(store, path="vertical_displacement", mode="r")
    n_t, ny, nx = arr.shape
    tiles = -(-ny // arr.chunks[1]) * -(-nx // arr.chunks[2])
    assert n_t == 33 and tiles >= 2
    chunk_files = [f for f in (store / "vertical_displacement").rglob("*") if f.is_file()
                   and f.name not in ("zarr.json", ".zarray", ".zattrs")]
    assert arr.chunks[0] == 8  # epochs per chunk: the whole 0.1° grid is far below the buffer
    assert arr.shards is not None and arr.shards[0] == 8
    # 33 epochs in 5 groups of (up to) 8, each group in one shard of whole rows of tiles, or in a shard per tile
    # when a shard may hold a single chunk (at most: Zarr does not write a shard whose chunks are all NaN)
    per_group = 1 if chunks_per_shard >= tiles else tiles
    assert 5 <= len(chunk_files) <= 5 * per_group
    # read back through the lazy cube as written
    np.testing.assert_array_equal(np.isfinite(out["cube"].values), np.isfinite(arr[...]))


def _traced_peak(fn) -> int:
    """Peak traced allocation of ``fn()`` beyond what was allocated before it, with Dask on one thread: with a
    thread pool the number of blocks in flight at once varies from run to run and so does the peak."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            fn()
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()


def test_peak_memory_does_not_grow_with_epochs(setup_fine, tmp_path, monkeypatch):
    s = setup_fine
    # small blocks (all epochs × 8192 pixels at 33 epochs, × 4096 pixels at 66: a few blocks per grid), so that
    # the blocks, not the whole grid, bound the temporal fits at these small sizes. Not smaller: the store holds
    # one chunk per group of epochs and block, so the chunks' bookkeeping (a few kB each) grows as the square of
    # the epochs when blocks shrink with them, and would be measured instead of the pixels.
    monkeypatch.setattr(pipeline, "_TS_BLOCK_BYTES", 4 * 66 * 4096)
    dense = [_densify(p, tmp_path / f"dense{k}.h5") for k, p in enumerate(s["cube_paths"])]
    cfg = GiaConfig()
    _run(s, cfg, tmp_path / "warm")  # warm-up: imports and caches are not part of the figure
    peaks = {}
    for label, paths in (("T", s["cube_paths"]), ("2T", dense)):
        peaks[label] = _traced_peak(lambda: _run(s, cfg, tmp_path / label, cube_paths=paths))
    n_t = {lab: xr.open_zarr(tmp_path / lab / "vertical_displacement.zarr",
                             consolidated=False)["time"].size for lab in ("T", "2T")}
    assert (n_t["T"], n_t["2T"]) == (33, 66)
    input_growth = sum(p.stat().st_size for p in dense) - sum(p.stat().st_size for p in s["cube_paths"])
    merged_growth = (n_t["2T"] - n_t["T"]) * s["grid"].shape[0] * s["grid"].shape[1] * 4
    growth = peaks["2T"] - peaks["T"]
    # the in-memory reference holds every epoch: its peak grows with the cubes
    ref_peaks = {lab: _traced_peak(lambda: _reference_stage(s["frames"], paths, s["final_corr"], s["hfields"],
                                                            s["verts"], s["grid"], cfg, vertical=s["vertical"]))
                 for lab, paths in (("T", s["cube_paths"]), ("2T", dense))}
    ref_growth = ref_peaks["2T"] - ref_peaks["T"]
    print(f"streamed peak {peaks['T'] / 1e6:.2f} -> {peaks['2T'] / 1e6:.2f} MB; reference "
          f"{ref_peaks['T'] / 1e6:.2f} -> {ref_peaks['2T'] / 1e6:.2f} MB; input cubes "
          f"+{input_growth / 1e6:.2f} MB, merged cube +{merged_growth / 1e6:.2f} MB")
    # the in-memory reference holds every epoch of every frame (float64) and of the merged cube: it grows by
    # ~25 times the merged cube's growth; the streamed stage by less than the merged cube's growth (what is left
    # is Python bookkeeping per epoch and per stored chunk, a few kB each, not pixels)
    assert ref_growth > 10 * merged_growth
    assert growth < merged_growth
    assert growth < 0.05 * ref_growth
