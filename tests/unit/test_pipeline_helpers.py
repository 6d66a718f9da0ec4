"""Small pieces of the pipeline that the end-to-end tests do not pin down exactly."""

from __future__ import annotations

import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr

from gpu_insar_adjust import pipeline as P
from gpu_insar_adjust.errors import ArrayArgumentError, GeometryError, InputError


def _frame(crs: str, x0: float, y0: float, dx: float, nx: int = 37, ny: int = 23) -> xr.Dataset:
    x = x0 + dx * (np.arange(nx) + 0.5)
    y = y0 - dx * (np.arange(ny) + 0.5)
    v = np.zeros((ny, nx), np.float32)
    return xr.Dataset({"los_velocity": (("y", "x"), v)}, coords={"y": y, "x": x}).rio.write_crs(crs)


@pytest.mark.parametrize("crs,x0,y0,dx", [("EPSG:4326", 114.0, 39.0, 0.01),
                                          ("EPSG:32650", 400_000.0, 4_300_000.0, 500.0)])
def test_frame_km_by_rows_equals_the_per_pixel_coordinates(crs, x0, y0, dx):
    """The row-block coordinates that apply the network corrections are the per-pixel ones: bitwise for a
    geographic frame (trigonometry per row, the same operations per element), to the projection's precision for
    a projected one."""
    fr = _frame(crs, x0, y0, dx)
    lon, lat = P._frame_lonlat_grid(fr)
    xr_ref, yr_ref = P._frame_km(fr, lon, lat)
    xb, yb = P._frame_km_rows(fr, 5, 17)
    assert xb.shape == yb.shape == (12, fr.sizes["x"])
    if crs == "EPSG:4326":
        np.testing.assert_array_equal(xb, xr_ref[5:17])
        np.testing.assert_array_equal(yb, yr_ref[5:17])
    else:
        np.testing.assert_allclose(xb, xr_ref[5:17], rtol=0, atol=1e-9)
        np.testing.assert_allclose(yb, yr_ref[5:17], rtol=0, atol=1e-9)
    # a frame some 20 km across: x and y span it (not a degenerate grid)
    assert np.ptp(xb) > 10 and np.ptp(yr_ref) > 10


def test_frame_rasters_are_wrapped_without_a_copy():
    """A per-frame raster wrapped for the mosaic is the same memory (a plain's frames at 100 m hold ~10^8
    pixels: each copy would cost ~0.5 GB), with the frame's grid and CRS."""
    fr = _frame("EPSG:4326", 114.0, 39.0, 0.01)
    values = np.arange(fr["los_velocity"].size, dtype=np.float32).reshape(fr["los_velocity"].shape)
    da = P._frame_da(fr, values, "vertical")
    assert np.shares_memory(da.values, values)
    assert da.rio.crs.to_epsg() == 4326
    np.testing.assert_array_equal(da["x"].values, fr["x"].values)
    assert da.rio.transform() == fr.rio.transform()


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("sigmas", [True, False])
def test_frame_vertical_equivalent_by_row_blocks_equals_the_whole_frame_formula(monkeypatch, engine, sigmas):
    """Blocks of rows (for cache and memory), or with numba one pass per pixel, give the whole-frame result
    element for element, NaN pattern and the horizontal field's sigmas (or their absence) included; a float64
    sigma (as the pipeline passes) or float32 alike."""
    from gpu_insar_adjust.mosaic import decompose_vertical

    if engine == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("GIA_CPU_KERNELS", engine)

    rng = np.random.default_rng(8)
    fr = _frame("EPSG:4326", 114.0, 39.0, 0.01, nx=41, ny=29)
    shape = fr["los_velocity"].shape
    e, n = -0.62 + 0.01 * rng.random(shape), -0.11 + 0.01 * rng.random(shape)
    u = np.sqrt(1 - e**2 - n**2)
    for name, a in (("los_e", e), ("los_n", n), ("los_u", u)):
        fr[name] = (("y", "x"), a.astype(np.float32))
    hf = xr.Dataset({k: (("y", "x"), (rng.normal(0, 3, shape) + off).astype(np.float32))
                     for k, off in (("ve", 25.0), ("vn", -8.0), ("se", 5.0), ("sn", 5.0))})
    hf["ve"][3, 4] = np.nan
    hf["vn"][5, 6] = np.nan
    hf["se"][7, 8] = np.nan  # a usable pixel whose field sigma is unknown: its vertical sigma is NaN
    if not sigmas:
        hf = hf[["ve", "vn"]]
    los = rng.normal(-10, 20, shape).astype(np.float32)
    los[10:12, :] = np.nan
    std = rng.uniform(0.5, 3.0, shape).astype(np.float32 if sigmas else np.float64)
    monkeypatch.setattr(P, "_DECOMPOSE_BLOCK_PIXELS", 3 * 41 + 5)  # blocks of 3 rows, the last one short
    vu, vs = P.frame_vertical_equivalent(fr, los, std, hf)
    assert vu.dtype == vs.dtype == np.float32
    f64 = {k: hf[k].values.astype(np.float64) for k in hf}
    ok = np.isfinite(los) & np.isfinite(f64["ve"]) & np.isfinite(f64["vn"])
    ref = decompose_vertical(np.where(ok, los.astype(np.float64), np.nan),
                             np.where(ok, std.astype(np.float64), np.nan),
                             *(fr[c].values.astype(np.float64) for c in ("los_e", "los_n", "los_u")),
                             *(np.where(ok, f64[c], 0.0) for c in ("ve", "vn")),
                             *((np.where(ok, f64[c], 0.0) for c in ("se", "sn")) if sigmas else ()))
    for got, want in ((vu, ref.vu), (vs, ref.vu_std)):  # bit for bit (-0.0 too), NaN where NaN
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok_ = ~np.isnan(want)
        np.testing.assert_array_equal(got[ok_].view(np.uint32), np.asarray(want)[ok_].view(np.uint32))
    assert np.isnan(vu[3, 4]) and np.isnan(vu[5, 6]) and np.isnan(vu[10:12]).all()
    assert np.isfinite(vu).sum() == ok.sum()
    assert np.isfinite(vu[7, 8]) and np.isnan(vs[7, 8]) == sigmas
    # bad geometry or sigma at a usable pixel: the same errors from either engine
    bad = fr.copy(deep=True)
    bad["los_u"][2, 2] = 0.01
    with pytest.raises(GeometryError):
        P.frame_vertical_equivalent(bad, los, std, hf)
    std_bad = std.copy()
    std_bad[2, 2] = 0.0
    with pytest.raises(InputError):
        P.frame_vertical_equivalent(fr, los, std_bad, hf)
    # both: the geometry is reported first, wherever in the frame (a later row block here) it lies
    bad["los_u"][2, 2] = fr["los_u"][2, 2]
    bad["los_u"][25, 3] = 0.01
    with pytest.raises(GeometryError):
        P.frame_vertical_equivalent(bad, los, std_bad, hf)
    # a field on another grid is refused, not read out of bounds
    with pytest.raises(ArrayArgumentError) as ei:
        P.frame_vertical_equivalent(fr, los, std, hf.isel(y=slice(0, 20)))
    assert ei.value.field == "ve"
    # big-endian rasters (as some GeoTIFFs hold them) give the same result (the block path takes them)
    vu_be, vs_be = P.frame_vertical_equivalent(fr, los.astype(">f4"), std, hf)
    np.testing.assert_array_equal(vu_be, vu)
    np.testing.assert_array_equal(vs_be, vs)


class _Memory:
    def __init__(self, available: int):
        self.available = available


@pytest.mark.parametrize("cores,n_frames,available,expected", [
    (16, 18, 64 * 2**30, 16),   # one worker per core, fewer than the frames
    (16, 6, 64 * 2**30, 6),     # no more workers than frames
    (2, 18, 64 * 2**30, 0),     # a 2-core laptop: in this process
    (16, 3, 64 * 2**30, 0),     # too few frames to pay for starting workers
    (16, 18, 5 * 2**30, 3),     # the free memory (5 GiB) holds three 6000 x 1100 frames' workers
    (16, 18, 1 * 2**30, 0),     # not even two: in this process
])
def test_auto_frame_workers_follow_cores_frames_and_memory(monkeypatch, cores, n_frames, available, expected):
    pytest.importorskip("distributed")
    import psutil

    monkeypatch.setattr(P.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Memory(available))
    frames = [_frame("EPSG:4326", 114.0, 39.0, 0.001, nx=6000, ny=1100) for _ in range(n_frames)]
    # 6.6 M pixels: 400 MiB + 200 B/pixel = 1.62 GiB per worker
    assert P._frame_workers("auto", frames) == expected
    assert P._frame_workers(5, frames) == 5 and P._frame_workers(0, frames) == 0


def _cluster_machine(monkeypatch, *, gpus: int, dask_cuda: bool, cores: int = 16, host_gib: float = 64.0,
                     device_gib: float | None = 80.0):
    """A machine for the cluster choice: cores, free host and device memory, visible GPUs, dask-cuda or not."""
    pytest.importorskip("distributed")
    import psutil

    from gpu_insar_adjust import backend

    monkeypatch.setattr(P.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Memory(int(host_gib * 2**30)))
    monkeypatch.setattr(backend, "gpu_count", lambda: gpus)
    monkeypatch.setattr(backend, "_device_free_bytes",
                        lambda: None if device_gib is None else int(device_gib * 2**30))
    monkeypatch.setattr(P, "_has_dask_cuda", lambda: dask_cuda)


def _parallel(**kw):
    from gpu_insar_adjust.config import ParallelConfig

    return ParallelConfig(**kw)


@pytest.mark.parametrize("backend_name,cluster,workers,gpus,dask_cuda,n_frames,device_gib,expected", [
    ("numpy", "auto", "auto", 0, False, 18, None, ("cpu", 16)),     # the CPU: one worker per core
    ("numpy", "auto", "auto", 4, True, 18, 80.0, ("cpu", 16)),      # GPUs unused by the CPU backend
    ("cupy", "auto", "auto", 4, True, 18, 80.0, ("cuda", 4)),       # one worker per GPU
    ("cupy", "auto", "auto", 4, True, 3, 80.0, ("cuda", 3)),        # no more GPU workers than frames
    ("cupy", "auto", "auto", 4, True, 1, 80.0, ("cpu", 0)),         # one frame: in this process
    ("cupy", "auto", "auto", 4, False, 18, 80.0, ("cpu", 16)),      # no dask-cuda: processes share the GPU
    ("cupy", "auto", "auto", 1, True, 18, 80.0, ("cpu", 16)),       # one GPU: processes share it
    ("cupy", "cpu", "auto", 1, True, 18, 4.0, ("cpu", 3)),          # ... as many as its free 4 GiB hold
    ("cupy", "cpu", "auto", 1, True, 18, 1.0, ("cpu", 0)),          # not even two: in this process
    ("cupy", "cuda", "auto", 1, True, 18, 80.0, ("cuda", 1)),       # asked for by name: the one GPU
    ("cupy", "cuda", 2, 4, True, 18, 80.0, ("cuda", 2)),            # the first two GPUs
    ("cupy", "auto", 6, 1, True, 18, 1.0, ("cpu", 6)),              # a count is a count
    ("cupy", "auto", 8, 2, True, 18, 80.0, ("cpu", 8)),             # ... above the GPUs: processes, not cuda
    ("cupy", "auto", 2, 2, True, 18, 80.0, ("cuda", 2)),            # ... within them: one per GPU
])
def test_frame_cluster_follows_backend_gpus_and_memory(monkeypatch, backend_name, cluster, workers, gpus,
                                                       dask_cuda, n_frames, device_gib, expected):
    _cluster_machine(monkeypatch, gpus=gpus, dask_cuda=dask_cuda, device_gib=device_gib)
    # 6.6 M pixels: 512 MiB + 96 B/pixel = 1.09 GiB of a shared GPU per worker
    frames = [_frame("EPSG:4326", 114.0, 39.0, 0.001, nx=6000, ny=1100) for _ in range(n_frames)]
    pc = _parallel(cluster=cluster, workers=workers)
    P._check_cluster(pc, backend_name)
    assert P._frame_cluster(pc, frames, backend_name) == expected


def test_worker_memory_limit_caps_the_auto_worker_count(monkeypatch):
    """Workers given 8 GiB each: 64 GiB free holds 8 of them, not the 16 a 6.6 M-pixel frame alone would allow
    (1.62 GiB each); a limit below what a frame needs counts the frame's need."""
    _cluster_machine(monkeypatch, gpus=0, dask_cuda=False)
    frames = [_frame("EPSG:4326", 114.0, 39.0, 0.001, nx=6000, ny=1100) for _ in range(18)]
    assert P._frame_cluster(_parallel(worker_memory="8GiB"), frames, "numpy") == ("cpu", 8)
    assert P._frame_cluster(_parallel(worker_memory="1GiB"), frames, "numpy") == ("cpu", 16)
    from gpu_insar_adjust.config import load_config
    from gpu_insar_adjust.errors import ConfigError

    with pytest.raises(ConfigError, match="worker_memory"):
        load_config(None, {"parallel.worker_memory": "8 gigs"})


@pytest.mark.parametrize("backend_name,workers,gpus,dask_cuda,error,field", [
    ("numpy", "auto", 0, True, "ConfigError", "parallel.cluster"),        # GPU workers on the CPU backend
    ("cupy", 0, 2, True, "ConfigError", "parallel.workers"),              # GPU workers, and none
    ("cupy", 3, 2, True, "ConfigError", "parallel.workers"),              # more than one per GPU
    ("cupy", "auto", 2, False, "BackendUnavailableError", "parallel.cluster"),  # dask-cuda missing
])
def test_cuda_cluster_that_cannot_be_honoured_is_refused_first(monkeypatch, backend_name, workers, gpus, dask_cuda,
                                                               error, field):
    from gpu_insar_adjust import errors

    _cluster_machine(monkeypatch, gpus=gpus, dask_cuda=dask_cuda)
    with pytest.raises(getattr(errors, error)) as ei:
        P._check_cluster(_parallel(cluster="cuda", workers=workers), backend_name)
    assert ei.value.field == field and ei.value.fix
    # the same settings with an existing scheduler: the scheduler's workers are used, the cluster kind is moot
    P._check_cluster(_parallel(cluster="cuda", workers=workers, scheduler="tcp://127.0.0.1:8786"), backend_name)


def test_cuda_cluster_on_the_cpu_backend_stops_the_run_before_it_writes(tmp_path):
    from gpu_insar_adjust.config import GiaConfig
    from gpu_insar_adjust.errors import ConfigError

    cfg = GiaConfig.model_validate({"backend": "numpy", "parallel": {"cluster": "cuda"}})
    with pytest.raises(ConfigError, match="numpy"):
        P.run(tmp_path / "frames", tmp_path / "gnss.csv", tmp_path / "out", config=cfg)
    assert not (tmp_path / "out").exists()


def test_adjust_cost_counts_the_stations_inside_the_frame():
    import pandas as pd

    geo = _frame("EPSG:4326", 114.0, 39.0, 0.01)  # 114.0-114.37 E, 38.77-39.0 N
    utm = _frame("EPSG:32650", 400_000.0, 4_300_000.0, 500.0)  # about 115.85-116.06 E, 38.74-38.84 N
    stations = pd.DataFrame({"lon": [114.1, 114.2, 114.3, 115.0, 115.9, 116.0, 116.0],
                             "lat": [38.9, 38.8, 38.95, 38.9, 38.8, 38.78, 38.7]})
    assert P._adjust_cost(geo, stations) == pytest.approx(9 + 37 * 23 * 1e-4)
    assert P._adjust_cost(utm, stations) == pytest.approx(4 + 37 * 23 * 1e-4)


@pytest.mark.parametrize("with_model,m2", [(True, 4.0), (False, None), (True, None)])
def test_network_block_fused_equals_the_array_expressions(monkeypatch, with_model, m2):
    """The network correction of a block of rows (vertical, LOS, final correction, merge sigma) in one numba
    pass gives the array expressions' float32 results bit for bit: NaN in the unit vector, the correction
    and the noise; u = 0 (an infinite CV term); the misfit floor on and off; a frame with no model."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(11)
    shape = (23, 31)
    vert = rng.normal(-20, 15, shape).astype(np.float32)
    los = rng.normal(-15, 12, shape).astype(np.float32)
    c_vert = rng.normal(0, 3, shape)
    u = rng.uniform(0.7, 0.9, shape).astype(np.float32)
    ml = rng.normal(0, 2, shape).astype(np.float32) if with_model else None
    noise = rng.uniform(0.5, 4, shape).astype(np.float32)
    vert[0, :5] = np.nan
    c_vert[1, :3] = np.nan
    u[2, 0], u[2, 1] = np.nan, 0.0
    noise[3, 4] = np.nan
    outs = {}
    for engine in ("numpy", "numba"):
        monkeypatch.setenv("GIA_CPU_KERNELS", engine)
        v, lo = vert.copy(), los.copy()
        fc, vs = np.empty(shape, np.float32), np.empty(shape, np.float32)
        P._apply_network_block(v, lo, c_vert, u, ml, noise, 1.7, m2, fc, vs)
        outs[engine] = (v, lo, fc, vs)
    for name, a, b in zip(("vert", "los", "fc", "vs"), outs["numpy"], outs["numba"]):
        np.testing.assert_array_equal(np.isnan(b), np.isnan(a), err_msg=name)
        ok = ~np.isnan(a)
        np.testing.assert_array_equal(b[ok].view(np.uint32), a[ok].view(np.uint32), err_msg=name)
    v, lo, fc, vs = outs["numba"]
    np.testing.assert_allclose(v, vert - c_vert, rtol=1e-6)  # what the block means
    assert np.isinf(vs[2, 1]) and np.isnan(vs[2, 0]) and np.isnan(vs[3, 4])
    if m2 is not None:
        assert np.all(vs[np.isfinite(vs)] >= np.float32(2.0))


def test_noise_sigma_kernel_is_bit_for_bit_the_array_expression(monkeypatch):
    """The network's per-pixel noise sigma in one numba pass gives the array expression's float64 bits: product
    sigmas NaN, ±inf, 0, negative, below and above the 0.1 mm/yr floor; correction sigmas NaN and ±inf."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(2)
    ls = rng.gamma(2.0, 1.0, (173, 211)).astype(np.float32)
    cs = rng.gamma(1.0, 0.5, ls.shape).astype(np.float32)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -1.0, 0.05, 0.1, np.nextafter(0.1, 1), 1e-30, 3e38],
                       np.float32)
    ls.flat[:special.size] = special
    cs.flat[:special.size] = special[::-1]
    cs.flat[20:25] = [np.nan, np.inf, -np.inf, 0.0, 1e30]
    out = {}
    for engine in ("numpy", "numba"):
        monkeypatch.setenv("GIA_CPU_KERNELS", engine)
        out[engine] = P._noise_sigma(ls, cs, ls.shape)
    got, want = out["numba"], out["numpy"]
    assert got.dtype == want.dtype == np.float64
    np.testing.assert_array_equal(got.view(np.uint64), want.view(np.uint64))
    # NaN product sigma: 2 mm/yr; a product sigma of 0 or -1: 0.1 mm/yr; with the correction sigma in quadrature
    assert want.flat[0] == pytest.approx(np.hypot(2.0, float(cs.flat[0])), rel=1e-12)
    assert want.flat[3] == pytest.approx(np.hypot(0.1, float(cs.flat[3])), rel=1e-12)
    assert want.flat[4] == pytest.approx(np.hypot(0.1, float(cs.flat[4])), rel=1e-12)
    assert want.flat[21] == pytest.approx(np.hypot(float(ls.flat[21]), float(np.finfo(np.float32).max)))
    missing = P._noise_sigma(None, cs, ls.shape)  # no product sigma: 2 mm/yr
    assert missing.flat[30] == pytest.approx(np.hypot(2.0, cs.flat[30]))


def test_input_checksums_are_the_sha256_of_every_file_in_path_order(tmp_path):
    """Hashed on threads, the checksums are hashlib's of each file's bytes, keyed by path, folders walked in
    sorted order and recursively (a file bigger than one read, an empty one, a nested one)."""
    import hashlib

    rng = np.random.default_rng(3)
    frames = tmp_path / "frames"
    (frames / "T2" / "sub").mkdir(parents=True)
    (frames / "T1").mkdir()
    blobs = {frames / "T2" / "velocity.tif": rng.bytes(3 * 2**20 + 17), frames / "T1" / "a.tif": b"",
             frames / "T2" / "sub" / "x.h5": rng.bytes(1000), tmp_path / "gnss.csv": b"site,lon,lat\n"}
    for path, data in blobs.items():
        path.write_bytes(data)
    got = P.input_checksums([frames, tmp_path / "gnss.csv"])
    assert list(got) == [str(frames / "T1" / "a.tif"), str(frames / "T2" / "sub" / "x.h5"),
                         str(frames / "T2" / "velocity.tif"), str(tmp_path / "gnss.csv")]
    assert got == {str(p): hashlib.sha256(d).hexdigest() for p, d in blobs.items()}


def test_horizontal_only_blanks_the_training_verticals_not_the_held_out_ones(tmp_path):
    """``gnss.horizontal_only`` with a 3-D table: the training stations reach every stage without verticals (as
    a table without them would), the held-out ones keep theirs for the validation of the vertical map."""
    from gpu_insar_adjust.config import GiaConfig

    csv = tmp_path / "gnss.csv"
    csv.write_text("station,lon,lat,ve,vn,vu,se,sn,su\nAAAA,116.4,39.8,29.3,-6.2,-44.7,0.5,0.5,1.3\n"
                   "BBBB,116.3,39.7,27.5,-7.7,-20.9,0.5,0.5,1.3\n")
    cfg = GiaConfig.model_validate({"gnss": {"horizontal_only": True, "reference_frame": "EURA-fixed"}})
    st = P._read_stations(csv, cfg)
    assert np.isnan(st["vu"]).all() and np.isnan(st["su"]).all()
    np.testing.assert_array_equal(st["ve"], [29.3, 27.5])
    held = P._read_stations(csv, cfg, training=False)
    np.testing.assert_array_equal(held["vu"], [-44.7, -20.9])
    full = P._read_stations(csv, GiaConfig.model_validate({"gnss": {"reference_frame": "EURA-fixed"}}))
    np.testing.assert_array_equal(full["vu"], [-44.7, -20.9])


def test_overlaps_are_compared_on_slow_ground_unless_too_little_of_it():
    """Pixels where the two frames' mean rate exceeds the threshold are left out of the comparison; an overlap
    with too few slow pixels (inside a bowl) is compared on all its pixels, and says so."""
    mask = np.ones((4, 5), bool)
    mask[0, 0] = False
    a = np.full((4, 5), -10.0)
    b = np.full((4, 5), -12.0)
    a[:2] = -60.0  # two rows of fast ground: mean rate -36 and -37 mm/yr
    b[1, 4] = np.nan
    use, fell_back = P._slow_ground(mask, a, b, 20.0, 5)
    assert not fell_back
    np.testing.assert_array_equal(use, np.r_[[[False] * 5] * 2, [[True] * 5] * 2])
    use, fell_back = P._slow_ground(mask, a, b, 20.0, 11)  # 10 slow pixels < 11
    assert fell_back and use is mask
    use, fell_back = P._slow_ground(mask, a, b, 0.0, 11)   # 0: compare everywhere, no fallback to report
    assert not fell_back and use is mask
    # the mean decides, not either frame: -30 and -8 (mean -19) is slow ground
    use, _ = P._slow_ground(np.ones(1, bool), np.array([-30.0]), np.array([-8.0]), 20.0, 1)
    assert use.tolist() == [True]
