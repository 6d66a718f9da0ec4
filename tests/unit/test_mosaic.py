"""Target grid, resampling, feathered inverse-variance merge, overlaps (gpu_insar_adjust.mosaic)."""

from __future__ import annotations

import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr
from pyproj import Geod, Transformer
from scipy import ndimage

from conftest import assert_matches_reference, to_numpy
from gpu_insar_adjust import mosaic as M
from gpu_insar_adjust.errors import ArrayArgumentError, GiaError, InputError


def make_frame(x0, y0, nx, ny, res, value=None, *, std=1.0, frame_id="014A_00001_000000", crs="EPSG:4326",
               e=-0.6, n=-0.1, u=0.78):
    """A small frame per docs/data-model.md; (x0, y0) is the upper-left pixel *edge*."""
    x = x0 + res * (np.arange(nx) + 0.5)
    y = y0 - res * (np.arange(ny) + 0.5)
    X, Y = np.meshgrid(x, y)
    v = (value(X, Y) if callable(value) else np.full((ny, nx), 0.0 if value is None else value)).astype(np.float32)
    s = np.where(np.isfinite(v), std, np.nan).astype(np.float32)
    ds = xr.Dataset(
        {"los_velocity": (("y", "x"), v), "los_std": (("y", "x"), s),
         "los_e": (("y", "x"), np.full_like(v, e)), "los_n": (("y", "x"), np.full_like(v, n)),
         "los_u": (("y", "x"), np.full_like(v, u)), "mask": (("y", "x"), np.isfinite(v))},
        coords={"y": y, "x": x},
        attrs={"frame_id": frame_id, "source": "synthetic", "orbit": "ascending" if e < 0 else "descending"})
    return ds.rio.write_crs(crs)


def plane(X, Y):
    return 3.0 + 20.0 * (X - 114.0) - 15.0 * (Y - 38.0)


# ----------------------------------------------------------------------------------------------------------
# target grid
# ----------------------------------------------------------------------------------------------------------
def test_target_grid_union_finest_spacing_and_alignment():
    a = make_frame(114.0, 38.0, 40, 30, 0.01, 1.0)
    b = make_frame(114.3, 37.9, 30, 20, 0.02, 2.0)          # coarser, overlapping, further south-east
    a["los_velocity"][:2, :] = np.nan                         # invalid top rows do not count in the footprint
    g = M.target_grid([a, b])
    assert g.crs.to_epsg() == 4326
    assert g.resolution == pytest.approx((0.01, 0.01), rel=1e-9)
    assert g.bounds == pytest.approx((114.0, 37.5, 114.9, 37.98), abs=1e-9)
    assert g.shape == (48, 90)
    y, x = g.coords()
    # pixel centres fall on frame a's lattice: resampling a is an exact copy
    assert x[0] == pytest.approx(114.005) and y[0] == pytest.approx(37.975)
    ra = M.resample_to_grid(a, g)
    np.testing.assert_array_equal(ra.los_velocity.values[:28, :40], a.los_velocity.values[2:, :])
    assert ra.rio.crs.to_epsg() == 4326 and ra.attrs["frame_id"] == a.attrs["frame_id"]


def test_target_grid_overrides_and_to_dataset():
    a = make_frame(114.0, 38.0, 40, 30, 0.01, 1.0)
    g = M.target_grid([a], resolution=0.025, bounds=(114.0, 37.7, 114.5, 38.0))
    assert g.shape == (12, 20)
    ds = g.to_dataset()
    assert ds.rio.crs.to_epsg() == 4326
    assert ds.sizes == {"y": 12, "x": 20}
    assert ds.rio.transform().almost_equals(g.transform)
    with pytest.raises(InputError) as ei:
        M.target_grid([a], resolution=-1.0)
    assert ei.value.field == "resolution"


def test_target_grid_mixed_crs_records_note_and_resamples_plane():
    """A UTM frame is reprojected into the EPSG:4326 grid: a field linear in lon/lat survives to float32."""
    utm = "EPSG:32650"
    to_utm = Transformer.from_crs("EPSG:4326", utm, always_xy=True)
    x0, y0 = to_utm.transform(114.2, 38.0)
    x0, y0 = round(x0, -3), round(y0, -3)
    to_ll = Transformer.from_crs(utm, "EPSG:4326", always_xy=True)

    def field_utm(X, Y):
        lon, lat = to_ll.transform(X, Y)
        return plane(lon, lat)

    fu = make_frame(x0, y0, 40, 40, 1000.0, field_utm, crs=utm, frame_id="021D_00002_000000", e=0.6)
    fg = make_frame(114.0, 38.0, 30, 30, 0.01, plane)
    g = M.target_grid([fg, fu])
    assert len(g.notes) == 1 and "EPSG:32650" in g.notes[0]
    lon_b = to_ll.transform(np.array([x0, x0 + 40e3]), np.array([y0, y0 - 40e3]))[0]
    assert g.bounds[2] >= lon_b.max() - 1e-9              # the union reaches the reprojected footprint
    r = M.resample_to_grid(fu, g)
    y, x = g.coords()
    X, Y = np.meshgrid(x, y)
    v = r.los_velocity.values
    inner = ndimage.binary_erosion(np.isfinite(v), iterations=2)
    assert inner.sum() > 500
    err = np.abs(v - plane(X, Y))[inner]
    # GDAL's approximate transformer places pixels within 1/8 source pixel; the field changes ~0.36 mm/yr per
    # 1-km source pixel, so 0.015 mm/yr (1/24 px) bounds the error with margin (measured 0.0075)
    assert err.max() < 0.015
    norm = np.sqrt(r.los_e ** 2 + r.los_n ** 2 + r.los_u ** 2).values[np.isfinite(v)]
    np.testing.assert_allclose(norm, 1.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------------------
def test_resample_nan_stays_nodata_and_values_exact_inside():
    def holed(X, Y):
        v = plane(X, Y)
        v[(X > 114.1) & (X < 114.2) & (Y > 37.8) & (Y < 37.9)] = np.nan   # a hole of no data
        return v

    f = make_frame(114.0, 38.0, 40, 40, 0.01, holed)
    # half-pixel shifted, finer grid: every target pixel is interpolated
    g = M.TargetGrid("EPSG:4326", (0.005, 0, 114.0025, 0, -0.005, 37.9975), 78, 78)
    r = M.resample_to_grid(f.los_velocity, g)
    near = M.resample_to_grid(f.los_velocity, g, resampling="nearest").values
    v = r.values
    src_valid = np.isfinite(near)
    assert not np.any(v == 0.0)                          # nodata never becomes 0
    differ = np.isfinite(v) != src_valid
    # NaN and valid disagree only on the edge ring, at most one pixel wide
    edge = ndimage.binary_dilation(src_valid, iterations=2) & ~ndimage.binary_erosion(src_valid, iterations=2)
    assert not np.any(differ & ~edge)
    y, x = g.coords()
    X, Y = np.meshgrid(x, y)
    inner = ndimage.binary_erosion(src_valid, iterations=3)
    np.testing.assert_allclose(v[inner], plane(X, Y)[inner], atol=1e-4)   # bilinear is exact on a plane
    ok = np.isfinite(v)
    assert np.abs(v[ok] - plane(X, Y)[ok]).max() < 20 * 0.01 + 1e-3       # edges: within one pixel's gradient


@pytest.mark.parametrize("resampling", ["bilinear", "nearest", "average"])
def test_a_frame_on_the_grid_lattice_is_copied_bitwise_as_gdal_warps_it(monkeypatch, resampling):
    """A frame whose pixels are grid pixels (same CRS and spacing, origin whole pixels away: LiCSAR frames on a
    common lattice, frames cut from one grid) is copied instead of warped, and the copy is GDAL's result bit for
    bit, NaN holes, edges and windows that run past the frame included. A frame off the lattice is warped."""
    rng = np.random.default_rng(3)
    src = rng.normal(0.0, 10.0, (37, 53)).astype(np.float32)
    src[5:9, 10:30] = np.nan
    src[:, :3] = np.nan
    res = 0.01
    g = M.TargetGrid("EPSG:4326", (res, 0, 113.9, 0, -res, 38.2), 90, 80)
    # 0.1 - 3e-17 style origins: what float32 GeoTIFF headers and sums of pixel sizes produce
    t_on = (res, 0, 113.9 + 12 * res + 1e-12, 0, -res, 38.2 - 7 * res - 1e-12)
    assert M._lattice_offset("EPSG:4326", t_on, src.shape, g) == (7, 12)
    t_off = (res, 0, 113.9 + 12.5 * res, 0, -res, 38.2 - 7 * res)
    assert M._lattice_offset("EPSG:4326", t_off, src.shape, g) is None
    assert M._lattice_offset("EPSG:32650", t_on, src.shape, g) is None  # another CRS
    assert M._lattice_offset("EPSG:4326", (res * (1 + 1e-5), 0, *t_on[2:]), src.shape, g) is None  # spacing
    t_exact = (res, 0, 113.9 + 12 * res, 0, -res, 38.2 - 7 * res)
    windows = [None, (0, 20, 0, 30), (10, 60, 40, 80), (44, 90, 0, 80), (0, 5, 0, 5)]
    fast = {t: [M._warp(src, "EPSG:4326", t, g, resampling, w) for w in windows] for t in (t_exact, t_on)}
    monkeypatch.setattr(M, "_lattice_offset", lambda *a: None)  # GDAL for everything
    for w, got_exact, got_on in zip(windows, fast[t_exact], fast[t_on]):
        gdal = M._warp(src, "EPSG:4326", t_exact, g, resampling, w)
        if resampling == "average":
            # GDAL's average repeats a frame's first row and column one pixel outward on an aligned grid; the
            # copy keeps the frame's footprint. Where both have data they agree bit for bit
            both = np.isfinite(gdal) & np.isfinite(got_exact)
            np.testing.assert_array_equal(got_exact[both], gdal[both])
            assert not (np.isfinite(got_exact) & ~np.isfinite(gdal)).any()
        else:
            np.testing.assert_array_equal(got_exact, gdal)
        if resampling != "average":
            # 1e-10 pixel off the lattice GDAL mixes in its neighbours at weight ~1e-10 (float32 rounding)
            np.testing.assert_allclose(got_on, M._warp(src, "EPSG:4326", t_on, g, resampling, w), rtol=1e-6,
                                       atol=1e-6)
        np.testing.assert_array_equal(got_on, got_exact)
    assert np.isfinite(fast[t_exact][0]).sum() == np.isfinite(src).sum()
    with pytest.raises(InputError, match="resampling"):
        M._warp(src, "EPSG:4326", t_exact, g, "cubic")


def test_resample_std_as_variance_mask_nearest():
    f = make_frame(114.0, 38.0, 20, 10, 0.01, 1.0)
    s = np.where(np.arange(20) < 10, 2.0, 4.0).astype(np.float32)
    f["los_std"][:] = s[None, :]
    # target pixel centred on the boundary between std 2 and std 4, 1 px wide
    g = M.TargetGrid("EPSG:4326", (0.01, 0, 114.005, 0, -0.01, 38.0), 19, 10)
    r = M.resample_to_grid(f, g)
    assert r.los_std.values[5, 9] == pytest.approx(np.sqrt((4 + 16) / 2), rel=1e-6)   # not (2+4)/2
    assert r.mask.dtype == bool
    assert r.mask.values[:, :19].all()
    # average resampling of variances when coarsening
    g2 = M.TargetGrid("EPSG:4326", (0.02, 0, 114.0, 0, -0.02, 38.0), 10, 5)
    std2 = M.resample_to_grid(f.los_std, g2, resampling="average").values
    np.testing.assert_allclose(std2[:, :5], 2.0, rtol=1e-6)
    np.testing.assert_allclose(std2[:, 5:], 4.0, rtol=1e-6)
    with pytest.raises(InputError) as ei:
        M.resample_to_grid(f.los_std, g2, resampling="cubic")
    assert ei.value.field == "resampling"


# ----------------------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------------------
def _two_on_grid(xp, value_b=12.0, std_b=2.0):
    g = M.TargetGrid("EPSG:4326", (0.01, 0, 114.0, 0, -0.01, 38.0), 50, 20)
    a = np.full(g.shape, np.nan)
    b = np.full(g.shape, np.nan)
    a[:, :30] = 10.0
    b[:, 20:] = value_b
    sa = np.where(np.isfinite(a), 1.0, np.nan)
    sb = np.where(np.isfinite(b), std_b, np.nan)
    return g, [xp.asarray(a), xp.asarray(b)], [xp.asarray(sa), xp.asarray(sb)]


def test_merge_inverse_variance_no_feather(xp):
    g, los, std = _two_on_grid(xp)
    r = M.merge_frames(los, std, g, feather_km=0.0)
    v, s, c = to_numpy(r.value), to_numpy(r.std), to_numpy(r.count)
    ref_v = np.full(g.shape, 10.0)
    ref_v[:, 20:30] = (10.0 / 1.0 + 12.0 / 4.0) / (1.0 + 0.25)        # 10.4
    ref_v[:, 30:] = 12.0
    ref_s = np.full(g.shape, 1.0)
    ref_s[:, 20:30] = 1.0 / np.sqrt(1.25)
    ref_s[:, 30:] = 2.0
    assert_matches_reference(r.value, ref_v, dtype="float32")
    assert_matches_reference(r.std, ref_s, dtype="float32")
    np.testing.assert_array_equal(c[0], [1] * 20 + [2] * 10 + [1] * 20)
    assert v.dtype == np.float32 and s.dtype == np.float32


def test_merge_feather_blends_seam(xp):
    g, los, std = _two_on_grid(xp, std_b=1.0)
    hard = to_numpy(M.merge_frames(los, std, g, feather_km=0.0).value)
    pix_km = M._pixel_size_km(g.crs, g.transform, g.height)[1]
    soft_r = M.merge_frames(los, std, g, feather_km=5 * pix_km)
    soft = to_numpy(soft_r.value)
    assert np.abs(np.diff(hard[10])).max() == pytest.approx(1.0, abs=1e-5)   # 10 -> 11 step at each seam
    assert np.abs(np.diff(soft[10])).max() < 0.35                              # spread over the feather
    # inside the overlap, near a's right edge b dominates and vice versa
    # a's last column: a's ramp is 1 px / 5 px = 0.2, b is 10 px inside (ramp 1): (0.2*10 + 12) / 1.2
    assert soft[10, 29] == pytest.approx((0.2 * 10 + 12) / 1.2, abs=1e-5)
    assert soft[10, 20] == pytest.approx((10 + 0.2 * 12) / 1.2, abs=1e-5)
    np.testing.assert_allclose(soft[10, :20], 10.0, atol=1e-6)
    np.testing.assert_allclose(soft[10, 30:], 12.0, atol=1e-6)
    # std: weighted-mean propagation with feather weights, never below the inverse-variance bound
    s = to_numpy(soft_r.std)[10, 20:30]
    assert np.all(s >= 1 / np.sqrt(2) - 1e-6) and np.all(s <= 1.0 + 1e-6)


def test_merge_native_frames_tiled_equals_untiled_and_budget():
    a = make_frame(114.0, 38.0, 40, 30, 0.01, plane, std=1.5)
    b = make_frame(114.25, 37.88, 40, 30, 0.01, lambda X, Y: plane(X, Y) + 2.0, std=3.0,
                   frame_id="014A_00002_000000")
    c = make_frame(114.5, 37.95, 25, 25, 0.01, lambda X, Y: plane(X, Y) - 1.0, frame_id="014A_00003_000000")
    g = M.target_grid([a, b, c], resolution=0.007)          # not on the frames' lattice: real warping
    frames = [a, b, c]
    los = [f.los_velocity for f in frames]
    std = [f.los_std for f in frames]
    whole = M.merge_frames(los, std, g, feather_km=3.0)
    tiled = M.merge_frames(los, std, g, feather_km=3.0, tile_size=13)
    assert whole.n_tiles == 1 and tiled.n_tiles == int(np.ceil(g.height / 13) * np.ceil(g.width / 13))
    np.testing.assert_array_equal(tiled.count, whole.count)
    for f in ("value", "std"):   # same values up to float32 rounding of GDAL's per-window pixel positions
        np.testing.assert_allclose(getattr(tiled, f), getattr(whole, f), rtol=5e-7, atol=0)
    # a memory budget far below the whole grid's needs: tiles shrink, results unchanged
    budget = M._tile_bytes(3, 32)
    small = M.merge_frames(los, std, g, feather_km=3.0, tile_size=4096, memory_budget_bytes=budget)
    assert small.tile_size <= 32 and small.n_tiles > 1 and small.notes
    np.testing.assert_allclose(small.value, whole.value, rtol=5e-7, atol=0)
    assert int(whole.count.max()) == 2
    assert np.isfinite(whole.value).sum() == (whole.count > 0).sum()
    ds = whole.to_dataset()
    assert set(ds.data_vars) == {"los_velocity", "los_std", "count"} and ds.rio.crs.to_epsg() == 4326


def test_merge_native_matches_on_grid_without_feather():
    a = make_frame(114.0, 38.0, 40, 30, 0.01, plane, std=1.5)
    b = make_frame(114.2, 37.9, 40, 30, 0.01, lambda X, Y: plane(X, Y) + 2.0, std=3.0)
    g = M.target_grid([a, b])
    nat = M.merge_frames([a.los_velocity, b.los_velocity], [a.los_std, b.los_std], g, feather_km=0)
    ra, rb = M.resample_to_grid(a, g), M.resample_to_grid(b, g)
    on = M.merge_frames([ra.los_velocity, rb.los_velocity], [ra.los_std, rb.los_std], g, feather_km=0)
    np.testing.assert_allclose(nat.value, on.value, rtol=0, atol=1e-5)
    w_a, w_b = 1 / 1.5 ** 2, 1 / 3.0 ** 2
    both = on.count == 2
    y, x = g.coords()
    X, Y = np.meshgrid(x, y)
    np.testing.assert_allclose(on.value[both], (plane(X, Y) + 2.0 * w_b / (w_a + w_b))[both], atol=1e-4)


def test_merge_on_grid_tiles_bitwise_equal(xp):
    g, los, std = _two_on_grid(xp)
    whole = M.merge_frames(los, std, g, feather_km=3.0)
    tiled = M.merge_frames(los, std, g, feather_km=3.0, tile_size=7)
    assert tiled.n_tiles == 3 * 8
    for f in ("value", "std", "count"):
        np.testing.assert_array_equal(to_numpy(getattr(tiled, f)), to_numpy(getattr(whole, f)))


def test_merge_bad_inputs(xp):
    g, los, std = _two_on_grid(xp)
    with pytest.raises(ArrayArgumentError) as ei:
        M.merge_frames([los[0], los[1][:, :10]], [std[0], std[1][:, :10]], g)
    assert ei.value.field == "los_list[1]"
    with pytest.raises(InputError) as ei:
        M.merge_frames([xp.full(g.shape, xp.nan, dtype=xp.float64), los[1]], std, g)
    assert ei.value.field == "los_list[0]"
    bad = xp.where(std[1] > 0, xp.zeros_like(std[1]), std[1])
    with pytest.raises(InputError) as ei:
        M.merge_frames(los, [std[0], bad], g)
    assert ei.value.field == "std_list[1]" and "fix:" in str(ei.value)
    with pytest.raises(InputError) as ei:
        M.merge_frames(los, [xp.full(g.shape, xp.nan, dtype=xp.float64), std[1]], g)
    assert ei.value.field == "std_list[0]"
    with pytest.raises(ArrayArgumentError):
        M.merge_frames(los, std[:1], g)


def test_merge_mismatched_xarray_grids():
    a = make_frame(114.0, 38.0, 40, 30, 0.01, 1.0)
    b = make_frame(114.1, 38.0, 40, 30, 0.01, 1.0)
    g = M.target_grid([a, b])
    with pytest.raises(GiaError) as ei:
        M.merge_frames([a.los_velocity], [b.los_std], g)
    assert ei.value.field == "std_list[0]"


def test_feather_ramp_distance_in_km():
    valid = np.zeros((30, 30), bool)
    valid[5:25, 5:25] = True
    ramp = to_numpy(M.feather_ramp(valid, (2.0, 2.0), 10.0))
    assert ramp[0, 0] == 0.0
    assert ramp[15, 5] == pytest.approx(0.2)      # edge pixel: 1 px = 2 km from the no-data centre
    assert ramp[15, 9] == pytest.approx(1.0)      # 5 px = 10 km inside
    full = to_numpy(M.feather_ramp(np.ones((10, 10), bool), (1.0, 1.0), 3.0))
    assert full[0, 5] == pytest.approx(1 / 3)     # the array border is a data edge


# ----------------------------------------------------------------------------------------------------------
# overlaps
# ----------------------------------------------------------------------------------------------------------
def test_overlap_pairs_counts_area_kind_and_sampling():
    a = make_frame(114.0, 38.0, 40, 30, 0.01, 1.0, frame_id="014A_00001_000000")
    b = make_frame(114.3, 38.0, 40, 30, 0.01, 3.0, frame_id="014A_00002_000000")     # along track of a
    c = make_frame(114.0, 37.8, 20, 20, 0.01, 5.0, frame_id="119D_00001_000000", e=0.6)
    d = make_frame(114.9, 37.5, 5, 5, 0.01, 0.0, frame_id="119D_00002_000000", e=0.6)  # touches nobody
    frames = [a, b, c, d]
    g = M.target_grid(frames)
    on = [M.resample_to_grid(f, g) for f in frames]
    pairs = {(p.i, p.j): p for p in M.overlap_pairs(on)}
    assert set(pairs) == {(0, 1), (0, 2)}
    p01, p02 = pairs[(0, 1)], pairs[(0, 2)]
    assert p01.n_pixels == 30 * 10 and p01.kind == "along_track"
    assert p02.n_pixels == 10 * 20 and p02.kind == "across_track"
    # independent check: PROJ's geodesic polygon, densified along the parallels that bound the overlap
    lons = np.r_[np.linspace(114.3, 114.4, 200), np.linspace(114.4, 114.3, 200)]
    lats = np.r_[np.full(200, 37.7), np.full(200, 38.0)]
    ref, _ = Geod(ellps="WGS84").polygon_area_perimeter(lons, lats)
    assert p01.area_km2 == pytest.approx(abs(ref) / 1e6, rel=1e-6)

    s = M.sample_overlap(on[0], on[1], p01.mask, max_samples=40, rng=1, a_std=on[0].los_std,
                         b_std=on[1].los_std)
    assert 0 < s.rows.size <= 40 and s.stride == 3
    np.testing.assert_array_equal(s.diff, -2.0)
    np.testing.assert_allclose(s.diff_std, np.sqrt(2.0))
    assert p01.mask[s.rows, s.cols].all()
    assert len(np.unique(np.diff(np.unique(s.rows)))) == 1           # a regular stride in rows
    y, x = g.coords()
    np.testing.assert_allclose(s.lon, x[s.cols], rtol=1e-13)
    np.testing.assert_allclose(s.lat, y[s.rows], rtol=1e-13)
    allp = M.sample_overlap(on[0], on[1], p01.mask, max_samples=10_000)
    assert allp.rows.size == 300 and allp.stride == 1


def test_footprint_rasters_give_the_whole_grid_pairs_and_samples():
    """Frames kept on their own footprint of the grid (what the pipeline does: frames × grid does not fit at
    100 m) give the same pairs, areas and overlap samples as frames warped onto the whole grid, in a fraction of
    the memory; the values equal the whole-grid warp (one CRS: exactly)."""
    rng = np.random.default_rng(3)

    def noisy(X, Y):
        return plane(X, Y) + rng.normal(0, 1, X.shape)

    a = make_frame(114.0, 38.0, 40, 30, 0.01, noisy, frame_id="014A_00001_000000")
    b = make_frame(114.305, 37.95, 40, 30, 0.01, noisy, frame_id="014A_00002_000000")  # half-pixel offset
    c = make_frame(113.95, 37.8, 25, 20, 0.01, noisy, frame_id="119D_00001_000000", e=0.6)
    d = make_frame(114.9, 37.5, 5, 5, 0.01, 0.0, frame_id="119D_00002_000000", e=0.6)  # touches nobody
    a["los_velocity"][:, :3] = np.nan                       # the footprint is the valid data, not the array
    frames = [a, b, c, d]
    g = M.target_grid(frames)
    whole = [M.resample_to_grid(f["los_velocity"], g) for f in frames]
    feet = [M.resample_footprint(f["los_velocity"], g) for f in frames]
    for w, f in zip(whole, feet):
        np.testing.assert_array_equal(f.full(g), w.values)  # nothing outside the footprint is lost
    gx = g.coords()[1]
    first = int(np.argmin(np.abs(gx - float(a.x[3]))))     # a's first valid column on the grid
    assert feet[0].window[2] == first - 1                   # the window starts 1 px before the data
    assert sum(f.values.size for f in feet) < 0.6 * len(frames) * g.height * g.width
    stds = [M.resample_footprint(f["los_std"], g, window=ft.window) for f, ft in zip(frames, feet)]
    np.testing.assert_allclose(stds[1].full(g), M.resample_to_grid(frames[1]["los_std"], g).values, rtol=1e-6)

    pw = {(p.i, p.j): p for p in M.overlap_pairs(whole, g)}
    pf = {(p.i, p.j): p for p in M.overlap_pairs(feet, g)}
    assert set(pw) == set(pf) == {(0, 1), (0, 2)}
    for key in pw:
        w, f = pw[key], pf[key]
        r0, r1, c0, c1 = f.window
        assert f.window is not None and w.window is None and f.mask.size < w.mask.size
        assert (f.n_pixels, f.area_km2) == (w.n_pixels, w.area_km2)
        np.testing.assert_array_equal(w.mask[r0:r1, c0:c1], f.mask)
        assert w.mask.sum() == f.mask.sum()
        for seed in range(4):                               # the stride lattice stays on the grid's
            sw = M.sample_overlap(whole[key[0]], whole[key[1]], w.mask, max_samples=30, rng=seed, grid=g)
            sf = M.sample_overlap(feet[key[0]].crop(f.window), feet[key[1]].crop(f.window), f.mask,
                                  max_samples=30, rng=seed, grid=g, window=f.window,
                                  a_std=stds[key[0]].crop(f.window), b_std=stds[key[1]].crop(f.window))
            assert sw.stride == sf.stride > 1
            np.testing.assert_array_equal(sf.rows, sw.rows)
            np.testing.assert_array_equal(sf.cols, sw.cols)
            np.testing.assert_array_equal(sf.diff, sw.diff)
            np.testing.assert_array_equal(sf.lon, sw.lon)
            np.testing.assert_allclose(sf.diff_std, np.sqrt(2.0), rtol=1e-6)
    # a crop reaching outside the footprint is NaN there; an empty footprint has an empty window
    f = feet[3]
    out = f.crop((f.window[0] - 2, f.window[1], f.window[2], f.window[3]))
    assert np.isnan(out[:2]).all() and np.array_equal(out[2:], f.values, equal_nan=True)
    blank = a["los_velocity"] * np.nan
    assert M.resample_footprint(blank, g).window == (0, 0, 0, 0)
    with pytest.raises(ArrayArgumentError, match="needs the grid"):
        M.overlap_pairs(feet)
    with pytest.raises(ArrayArgumentError, match="window"):
        M.sample_overlap(whole[0].values, whole[1].values, pw[(0, 1)].mask, grid=g, window=pf[(0, 1)].window)
    with pytest.raises(ArrayArgumentError, match="not inside the grid"):
        M.resample_footprint(a["los_velocity"], g, window=(0, g.height + 5, 0, 3))


def test_merge_plan_equals_merge_frames_bitwise_epoch_by_epoch():
    """A plan (frames' footprints, edge ramps and warped weights derived once, as the time series uses it) gives
    exactly merge_frames' mosaic for every epoch: epochs valid where the template is, an epoch that lost pixels
    (its ramp is derived again), frames on other grids and CRSs and one already on the grid, several tiles."""
    rng = np.random.default_rng(11)
    a = make_frame(114.0, 38.0, 40, 30, 0.01, plane)
    b = make_frame(114.255, 37.93, 36, 28, 0.01, plane, frame_id="014A_00002_000000")  # offset lattice
    utm = "EPSG:32650"
    to_utm = Transformer.from_crs("EPSG:4326", utm, always_xy=True)
    x0, y0 = to_utm.transform(114.15, 37.85)
    c = make_frame(x0, y0, 25, 20, 900.0, 1.0, crs=utm, frame_id="119D_00001_000000", e=0.6)
    g = M.target_grid([a, b])
    d = M.resample_to_grid(make_frame(114.0, 38.0, 60, 40, 0.01, plane), g)   # exactly on the grid
    d["los_velocity"] = d["los_velocity"].where(np.arange(g.width)[None, :] > 30)
    frames = [a, b, c, d]
    tpl = [f["los_velocity"] for f in frames]
    sig = [f["los_velocity"].copy(data=np.where(np.isfinite(f["los_velocity"].values), 0.5 + k,
                                                np.nan).astype(np.float32)) for k, f in enumerate(frames)]
    plan = M.MergePlan(tpl, sig, g, feather_km=3.0, tile_size=16)
    assert plan.tile == 16 and len(plan.tiles) > 4
    for epoch in range(4):
        vals = [t.copy(data=(t.values * (1 + 0.1 * epoch) + rng.normal(0, 1, t.shape)).astype(np.float32))
                for t in tpl]
        if epoch == 2:  # one frame loses a block of pixels in this epoch only
            vals[0] = vals[0].where((np.arange(30)[:, None] < 8) | (np.arange(40)[None, :] < 20))
        if epoch == 3:  # the frame on the grid too
            vals[3] = vals[3].where(np.arange(g.height)[:, None] > 5)
        stds = [s.where(np.isfinite(v.values)) for s, v in zip(sig, vals)]
        ref = M.merge_frames(vals, stds, g, feather_km=3.0, tile_size=16)
        got = plan.merge(vals)
        np.testing.assert_array_equal(got.value, ref.value)
        np.testing.assert_array_equal(got.std, ref.std)
        np.testing.assert_array_equal(got.count, ref.count)
        assert (got.n_tiles, got.tile_size) == (ref.n_tiles, ref.tile_size)
        assert np.isfinite(got.value).sum() > 0.5 * g.height * g.width
    # plain arrays on the frames' grids do as well as DataArrays
    np.testing.assert_array_equal(plan.merge([v.values for v in vals]).value, got.value)
    with pytest.raises(ArrayArgumentError, match="3 rasters for a plan of 4 frames"):
        plan.merge(vals[:3])
    with pytest.raises(ArrayArgumentError, match="shape"):
        plan.merge([vals[0].values[:-1]] + vals[1:])
    bad = [v.copy(data=np.full(v.shape, 1.0, np.float32)) for v in vals]   # valid where the sigma is not
    with pytest.raises(InputError, match="values\\[3\\] is valid at 1155 pixels where the plan's std_list\\[3\\]"):
        plan.merge(bad)
    with pytest.raises(ArrayArgumentError, match="georeferenced"):
        M.MergePlan([v.values for v in vals], sig, g)


def test_merge_sums_of_the_numba_kernel_equal_the_array_api_path_bitwise(monkeypatch):
    """merge_frames' one-pass numba accumulation (NumPy inputs) gives the array-API path's mosaic bit for bit:
    values, sigmas, counts and the extra rasters, native frames warped tile by tile and frames on the grid."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(5)

    def noisy(X, Y):
        v = plane(X, Y) + rng.normal(0, 1, X.shape)
        v[rng.random(X.shape) < 0.05] = np.nan
        return v

    a = make_frame(114.0, 38.0, 40, 30, 0.01, noisy, std=1.5)
    b = make_frame(114.255, 37.93, 36, 28, 0.01, noisy, std=0.7, frame_id="014A_00002_000000")
    g = M.target_grid([a, b])
    c = M.resample_to_grid(make_frame(114.0, 38.0, 60, 40, 0.01, noisy, std=2.0), g)   # on the grid
    frames = [a, b, c]
    los = [f["los_velocity"] for f in frames]
    std = [f["los_std"] for f in frames]
    extra = [[f["los_e"].values, np.where(rng.random(f["los_u"].shape) < 0.1, np.nan, f["los_u"].values)]
             for f in frames]
    out = {}
    for engine in ("numpy", "numba"):
        monkeypatch.setenv("GIA_CPU_KERNELS", engine)
        assert M._fused_accumulate(np) is (engine == "numba")
        out[engine] = M.merge_frames(los, std, g, feather_km=2.0, tile_size=13, extra=extra)
    ref, got = out["numpy"], out["numba"]
    assert got.n_tiles > 4
    bits = lambda a: np.asarray(a).view(np.uint32 if np.asarray(a).dtype == np.float32 else np.int16)  # noqa: E731
    for name in ("value", "std", "count"):  # the sums and the finished tiles, NaN payloads and signs included
        np.testing.assert_array_equal(bits(getattr(got, name)), bits(getattr(ref, name)))
    for x, y in zip(got.extra, ref.extra):
        np.testing.assert_array_equal(bits(x), bits(y))
    assert np.isfinite(got.value).sum() > 0.8 * g.height * g.width and np.isfinite(got.extra[1]).any()


def test_a_one_pixel_overlap_is_not_a_tie_and_is_reported(caplog):
    a = make_frame(114.0, 38.0, 10, 10, 0.01, 1.0, frame_id="014A_00001_000000")
    b = make_frame(114.09, 37.91, 10, 10, 0.01, 3.0, frame_id="014A_00002_000000")  # shares one corner pixel
    g = M.target_grid([a, b])
    on = [M.resample_to_grid(f, g) for f in (a, b)]
    assert [p.n_pixels for p in M.overlap_pairs(on, g, min_pixels=1)] == [1]
    with caplog.at_level("INFO", logger="gpu_insar_adjust.mosaic"):
        assert M.overlap_pairs(on, g, min_pixels=10) == []
    assert "share only 1 valid pixel" in caplog.text


def test_merge_extra_rasters_equal_separate_merges_with_the_same_weights():
    """Extra rasters (e.g. unit-vector components) merged in the same call equal one merge each, native frames
    warped tile by tile and frames already on the grid alike."""
    a = make_frame(114.0, 38.0, 40, 30, 0.01, plane, std=1.5)
    b = make_frame(114.25, 37.88, 40, 30, 0.01, lambda X, Y: plane(X, Y) + 2.0, std=3.0,
                   frame_id="014A_00002_000000")
    b["los_velocity"][:5, :7] = np.nan  # a gap: the extras follow the values' validity
    b["los_std"][:5, :7] = np.nan
    g = M.target_grid([a, b], resolution=0.007)
    rng = np.random.default_rng(3)
    comps = [[xr.DataArray(rng.uniform(-0.7, 0.8, f.los_velocity.shape).astype(np.float32), dims=("y", "x"),
                           coords=f.los_velocity.coords).rio.write_crs(4326) for _ in range(3)] for f in (a, b)]
    los, std = [a.los_velocity, b.los_velocity], [a.los_std, b.los_std]
    one = M.merge_frames(los, std, g, feather_km=3.0, tile_size=17, extra=comps)
    for k in range(3):
        masked = [c[k].where(np.isfinite(f.los_velocity)) for c, f in zip(comps, (a, b))]
        sep = M.merge_frames(masked, std, g, feather_km=3.0, tile_size=17)
        np.testing.assert_allclose(one.extra[k], sep.value, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.isfinite(one.extra[0]), np.isfinite(one.value))
    # on the grid: a constant extra comes back exactly
    ra, rb = M.resample_to_grid(a, g), M.resample_to_grid(b, g)
    ones = [[np.full(g.shape, 0.25, np.float32)], [np.full(g.shape, 0.25, np.float32)]]
    on = M.merge_frames([ra.los_velocity.values, rb.los_velocity.values], [ra.los_std.values, rb.los_std.values],
                        g, feather_km=3.0, extra=ones)
    ok = np.isfinite(on.value)
    np.testing.assert_allclose(on.extra[0][ok], 0.25, rtol=1e-6)
    with pytest.raises(ArrayArgumentError):
        M.merge_frames(los, std, g, extra=[comps[0]])
    with pytest.raises(ArrayArgumentError):
        M.merge_frames(los, std, g, extra=[comps[0], comps[1][:2]])


def test_edge_ramps_shared_between_merges_of_the_same_frames(monkeypatch):
    """A ramp cache: the second merge of the same frames (other values, same valid-data masks) takes their edge
    ramps instead of computing them again, with the same products bit for bit; a frame whose mask changed gets
    its own ramp; taken entries leave the cache."""
    hole = lambda X, Y: np.where((X > 114.1) & (X < 114.15) & (Y < 37.9), np.nan, plane(X, Y))  # noqa: E731
    a = make_frame(114.0, 38.0, 40, 30, 0.01, hole, std=1.5)
    b = make_frame(114.25, 37.88, 40, 30, 0.01, lambda X, Y: plane(X, Y) + 2.0, std=3.0,
                   frame_id="014A_00002_000000")
    g = M.target_grid([a, b], resolution=0.007)
    calls = []
    original = M._host_feather_ramp
    monkeypatch.setattr(M, "_host_feather_ramp", lambda *a, **k: calls.append(1) or original(*a, **k))
    los, std = [f.los_velocity for f in (a, b)], [f.los_std for f in (a, b)]
    los2 = [x * 0.5 + 1.0 for x in los]  # other values on the same pixels (the LOS after the vertical)
    cache: dict = {}
    first = M.merge_frames(los, std, g, feather_km=3.0, ramp_cache=cache)
    assert len(calls) == 2 and len(cache) == 2
    second = M.merge_frames(los2, std, g, feather_km=3.0, ramp_cache=cache)
    assert len(calls) == 2 and not cache  # both taken, none computed
    fresh = M.merge_frames(los2, std, g, feather_km=3.0)
    for f in ("value", "std", "count"):
        np.testing.assert_array_equal(getattr(second, f), getattr(fresh, f))
        np.testing.assert_array_equal(getattr(M.merge_frames(los, std, g, feather_km=3.0), f),
                                      getattr(first, f))
    calls.clear()
    M.merge_frames(los, std, g, feather_km=3.0, ramp_cache=cache)
    shrunk = los[1].copy()
    shrunk[:3, :] = np.nan  # b's mask changed: its ramp is computed again; a's is taken
    std_b = std[1].where(np.isfinite(shrunk))
    calls.clear()
    M.merge_frames([los[0], shrunk], [std[0], std_b], g, feather_km=3.0, ramp_cache=cache)
    assert len(calls) == 1 and len(cache) == 2  # b's old ramp is still there, b's new one added
    M.merge_frames(los, std, g, feather_km=2.0, ramp_cache=cache)  # another feather width: not the same ramps
    assert len(calls) == 3


def test_edge_ramp_from_the_feature_transform_is_bit_for_bit_scipys_distance(monkeypatch):
    """numba's one pass from scipy's feature transform gives the ramp of scipy's own distance transform, bit
    for bit: anisotropic pixels, holes, data touching the border, and NaN outside the data for native frames."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(8)
    valid = rng.random((157, 203)) > 0.0005  # scattered lost pixels
    valid[:, :9] = False
    valid[40:70, 100:140] = False
    valid[-1, :] = True
    out = {}
    for engine in ("numpy", "numba"):
        monkeypatch.setenv("GIA_CPU_KERNELS", engine)
        out[engine] = (M.feather_ramp(valid, (0.111, 0.0893), 2.5),
                       M._host_feather_ramp(valid, (0.111, 0.0893), 2.5, nan_outside=True),
                       M.feather_ramp(valid, (0.5, 0.5), 0.7))
    for got, want in zip(out["numba"], out["numpy"]):
        assert got.dtype == want.dtype == np.float32 and got.shape == valid.shape
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    ramp, native, coarse = out["numba"]
    assert np.isnan(native[~valid]).all() and np.array_equal(native[valid], ramp[valid])
    assert 0 < ramp[valid].min() < 0.1 and ramp.max() == 1.0 and (coarse[valid] == 1.0).mean() > 0.2


def test_overlap_area_by_rows_is_the_per_cell_sum_exactly():
    """The overlap area of a mask on a geographic grid (each row's cell area once, repeated for its cells) is
    the per-cell sum of cell_area_km2, bit for bit; a projected grid keeps the per-cell sum."""
    from affine import Affine
    from pyproj import CRS

    rng = np.random.default_rng(0)
    geo = M.TargetGrid(CRS.from_epsg(4326), Affine(0.001, 0, 114.0, 0, -0.001, 40.0), 6000, 5500)
    utm = M.TargetGrid(CRS.from_epsg(32650), Affine(100.0, 0, 400000.0, 0, -100.0, 4400000.0), 3000, 3000)
    for grid in (geo, utm):
        for _ in range(12):
            h, w = rng.integers(1, 700, 2)
            r0, c0 = rng.integers(0, 2000, 2)
            m = rng.random((h, w)) < rng.uniform(0.05, 1.0)
            rows, cols = np.nonzero(m)
            assert M._mask_area_km2(grid, m, r0, c0) == float(M.cell_area_km2(grid, rows + r0, cols + c0).sum())
    # and the figure itself: a 0.1° x 0.1° box at 40° N is about 95 km²
    assert M._mask_area_km2(geo, np.ones((100, 100), bool), 0, 0) == pytest.approx(94.9, abs=0.2)
