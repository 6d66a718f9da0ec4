"""Wide-area adjustment on real data: four COMET LiCSAR/LiCSBAS Sentinel-1 frames across the North Anatolian Fault.

Data: ``naf_licsbas_4frames`` of the real-data folder (repository andwatson/decompose_insar_velocities,
``example/``, GPL-3.0): ascending 014A_04939_131313 and 087A_04904_121313 overlap, descending 094D_04913_101213
and 167D_04884_131212 overlap; ``GNSS/interp_E.grd``, ``interp_N.grd`` are a Eurasia-fixed horizontal GNSS
velocity field interpolated from England et al. (2016), JGR, doi:10.1002/2016JB013382. The run uses the grids as
the horizontal input and horizontal-only referencing (no GNSS file), as ``gia run --horizontal-grids``.

Acceptance target: the overlap RMS between the two ascending frames (raw 5.7 mm/yr) and between the two
descending frames (raw 4.7 mm/yr) ends below what a plane fitted directly to each overlap difference leaves
(4.1 and 3.0 mm/yr); the east velocity is compared with the GNSS east grid.

Overlap figures (definition that reproduces the target's raw and plane figures): frame B's ``vel.geo.tif`` taken at
the pixel that contains each pixel centre of frame A (the two grids are offset by a fraction of a pixel),
difference A − B in LOS over every pixel where both are finite (the processor's ``mask.geo.tif`` not applied),
RMS; the plane is a least-squares plane in lon/lat fitted to that difference, its residual RMS. Measured:

=========  =====  ===========  =====  ======  ========================================
pair       n      mean         RMS    plane   same, on the pixels the mask keeps (n)
=========  =====  ===========  =====  ======  ========================================
ascending  14236  +3.47        5.72   4.15    RMS 5.50, plane 3.78 (10816)
descending 15400  +3.38        4.70   3.05    RMS 4.57, plane 2.68 (13276)
=========  =====  ===========  =====  ======  ========================================

The adjusted products (``frames/<ID>.los_adjusted.tif``) are blanked where the mask flags a pixel, so they are
compared on the pixels both keep. Two tracks' adjusted LOS differ legitimately by the horizontal motion
projected onto their slightly different look vectors, (e_A − e_B)·ve + (n_A − n_B)·vn with the GNSS field in the
products' reference (ITRF2014: the grids plus the Eurasian rotation, ~25 mm/yr east here). That term is nearly
a plane (mean 2.1, RMS 2.3–2.4 mm/yr, 0.12–0.16 mm/yr about its own plane), so the plane fitted to the raw
difference absorbs it, while a plain difference of adjusted products keeps it. The target is therefore checked on
the adjusted difference minus that term. Measured (per-frame models gp on ~500 pseudo-stations each; network
with its spline pass over all six overlaps, the four ascending-descending ones included, whose misfit sigmas
single out 087A_04904 at 3.7 mm/yr against 2.3–2.5 for the others):

=========  =====================  ==================================  ==================================
pair       adjusted, plain LOS    adjusted minus horizontal term      network (summary.json, vertical-eq.)
=========  =====================  ==================================  ==================================
ascending  4.02                   3.23  < 4.15                        this pair 3.79 → 3.67
descending 3.60                   2.59  < 3.05                        this pair 2.66 → 2.52
=========  =====================  ==================================  ==================================

The plain-LOS figures are not below the plane figures for the descending pair (3.60 > 3.05); they are asserted only
to improve on the raw ones.

East: ``east_velocity.tif`` is in ITRF2014 (the frames' reference); converted to Eurasia-fixed (minus the ITRF2014
Eurasian rotation, 25.1–25.9 mm/yr east over the area) it differs from the bilinearly sampled GNSS east grid by
bias -0.01, RMS 0.24 mm/yr over 49922 pixels (without the conversion the bias would be +25.5 mm/yr). The
decomposition takes the GNSS east as a prior (sigma ≈ 1.4 mm/yr: the grids' 1 mm/yr and 1 mm/yr for the field's
own error), so this figure mostly checks that prior and the reference frames; an east solved from each
ascending/descending pair of adjusted frames without the prior differs from the grid by ~3.0 mm/yr RMS (bias 0.1).
The bounds (RMS 1.0, |bias| 0.5 mm/yr) sit between the two and far below a reference-frame mistake.

One module-scoped pipeline run; the other checks read its products and the raw frames.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import rasterio

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

NAF = "naf_licsbas_4frames"
ASC = ("014A_04939_131313", "087A_04904_121313")
DESC = ("094D_04913_101213", "167D_04884_131212")
PAIRS = {"ascending": ASC, "descending": DESC}
# the acceptance target's figures (mm/yr): raw overlap RMS, RMS left by a plane fitted to the overlap difference
TARGET = {"ascending": (5.7, 4.1), "descending": (4.7, 3.0)}
PLATE_MODEL = "ITRF2014"  # the run's default plate model: the reference of its products


@pytest.fixture(scope="module")
def naf(real_data):
    root = real_data / NAF
    if not root.is_dir():
        pytest.skip(f"North Anatolian Fault frames not found at {root}")
    return root


@pytest.fixture(scope="module")
def naf_run(naf, tmp_path_factory):
    """``gia run`` on the four frames with the GNSS grids as horizontal input (horizontal-only referencing)."""
    from gpu_insar_adjust.pipeline import run

    work = tmp_path_factory.mktemp("naf")
    frames = work / "frames"
    frames.mkdir()
    for fid in ASC + DESC:
        (frames / fid).symlink_to(naf / fid, target_is_directory=True)
    t0 = time.perf_counter()
    result = run(frames, None, work / "out",
                 horizontal_grids=(naf / "GNSS" / "interp_E.grd", naf / "GNSS" / "interp_N.grd"))
    print(f"NAF pipeline run: {time.perf_counter() - t0:.1f} s")
    return work / "out", result


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1).astype(np.float64), ds.transform


def _centres(transform, shape):
    ny, nx = shape
    lon = transform.c + transform.a * (np.arange(nx) + 0.5)
    lat = transform.f + transform.e * (np.arange(ny) + 0.5)
    return np.meshgrid(lon, lat)


def _on_grid_of(values, transform, ref_transform, ref_shape):
    """``values`` (on ``transform``) at the pixel holding each pixel centre of the reference grid; NaN off it."""
    lon, lat = _centres(ref_transform, ref_shape)
    col = np.floor((lon[0] - transform.c) / transform.a).astype(int)
    row = np.floor((lat[:, 0] - transform.f) / transform.e).astype(int)
    okc = (col >= 0) & (col < values.shape[1])
    okr = (row >= 0) & (row < values.shape[0])
    out = np.full(ref_shape, np.nan)
    out[np.ix_(okr, okc)] = values[np.ix_(row[okr], col[okc])]
    return out


def _rms_and_plane(diff, transform):
    """(n, mean, RMS, RMS about a least-squares plane in lon/lat) of the finite pixels of ``diff``."""
    lon, lat = _centres(transform, diff.shape)
    ok = np.isfinite(diff)
    d, x, y = diff[ok], lon[ok], lat[ok]
    A = np.stack([np.ones_like(x), x - x.mean(), y - y.mean()], axis=1)
    coef, *_ = np.linalg.lstsq(A, d, rcond=None)
    rms = float(np.sqrt(np.mean(d ** 2)))
    return int(ok.sum()), float(d.mean()), rms, float(np.sqrt(np.mean((d - A @ coef) ** 2)))


def _raw_difference(naf, a, b):
    va, ta = _read(naf / a / "vel.geo.tif")
    vb, tb = _read(naf / b / "vel.geo.tif")
    return va - _on_grid_of(vb, tb, ta, va.shape), ta


def _horizontal_los(naf, fid, grids):
    """LOS of the GNSS horizontal field (ITRF of the run: grid + Eurasian rotation) on a frame's grid (mm/yr)."""
    import xarray as xr

    from gpu_insar_adjust.geodesy.plates import plate_velocity_enu

    e, t = _read(naf / fid / "E.geo.tif")
    n, _ = _read(naf / fid / "N.geo.tif")
    lon, lat = _centres(t, e.shape)
    pts = {"x": xr.DataArray(lon, dims=("r", "c")), "y": xr.DataArray(lat, dims=("r", "c"))}
    pe, pn, _ = plate_velocity_enu(lon, lat, plate="EURA", model=PLATE_MODEL)
    ve = grids["ve"].interp(pts).values + pe
    vn = grids["vn"].interp(pts).values + pn
    return e * ve + n * vn, t


@pytest.fixture(scope="module")
def grids(naf):
    from gpu_insar_adjust.geodesy.horizontal import load_horizontal_grids

    return load_horizontal_grids(naf / "GNSS" / "interp_E.grd", naf / "GNSS" / "interp_N.grd",
                                 reference_frame="EURA-fixed")


# --------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orbit", PAIRS)
def test_raw_overlap_and_plane_figures(naf, orbit):
    """The target's raw and plane figures come out of the raw frames (the definition in the module docstring)."""
    diff, t = _raw_difference(naf, *PAIRS[orbit])
    n, mean, rms, plane = _rms_and_plane(diff, t)
    print(f"{orbit} raw: n={n} mean={mean:+.2f} RMS={rms:.2f} plane={plane:.2f} mm/yr")
    raw_target, plane_target = TARGET[orbit]
    assert n > 10_000
    assert rms == pytest.approx(raw_target, abs=0.3)  # measured 5.72 / 4.70
    assert plane == pytest.approx(plane_target, abs=0.3)  # measured 4.15 / 3.05


@pytest.mark.parametrize("orbit", PAIRS)
def test_adjusted_overlap_below_plane(naf, naf_run, grids, orbit):
    """Target: adjusted overlap RMS (minus the legitimate horizontal term) below the plane fitted to the raw
    overlap difference; the plain adjusted LOS difference improves on the raw one."""
    out, _ = naf_run
    a, b = PAIRS[orbit]
    raw, t_raw = _raw_difference(naf, a, b)
    _, _, raw_rms, plane = _rms_and_plane(raw, t_raw)

    la, ta = _read(out / "frames" / f"{a}.los_adjusted.tif")
    lb, tb = _read(out / "frames" / f"{b}.los_adjusted.tif")
    # the adjusted product stays on the frame's own grid
    assert la.shape == raw.shape and np.allclose(tuple(ta)[:6], tuple(t_raw)[:6], rtol=0, atol=1e-9)
    adj = la - _on_grid_of(lb, tb, ta, la.shape)
    ha, _ = _horizontal_los(naf, a, grids)
    hb, thb = _horizontal_los(naf, b, grids)
    horizontal = ha - _on_grid_of(hb, thb, ta, ha.shape)

    n, mean, adj_rms, _ = _rms_and_plane(adj, ta)
    n_h, mean_h, adj_rms_h, _ = _rms_and_plane(adj - horizontal, ta)
    print(f"{orbit} adjusted: n={n} plain LOS RMS={adj_rms:.2f} (mean {mean:+.2f}); minus the horizontal term "
          f"RMS={adj_rms_h:.2f} (mean {mean_h:+.2f}); raw {raw_rms:.2f}, plane {plane:.2f} mm/yr")
    assert n > 0.6 * np.isfinite(raw).sum()  # measured 10816/14236 and 13276/15400 (the mask's share)
    assert n_h == n
    assert adj_rms_h < plane  # measured 3.23 < 4.15 (ascending), 2.59 < 3.05 (descending)
    assert adj_rms < raw_rms  # measured 4.02 < 5.72, 3.60 < 4.70
    # the network saw this overlap
    s = json.loads((out / "summary.json").read_text())
    pair = [p for p in s["network"]["pairs"] if sorted(p.get("frames", [])) == sorted((a, b))]
    assert len(pair) == 1 and pair[0]["n"] > 100, s["network"]["pairs"]
    print(f"{orbit} network pair: rms_before={pair[0]['rms_before']:.2f} rms_after={pair[0]['rms_after']:.2f} "
          f"n={pair[0]['n']}")


def test_east_velocity_against_gnss_grid(naf_run, grids):
    """East velocity (ITRF2014) converted to Eurasia-fixed against the GNSS east grid, where both exist."""
    import xarray as xr

    from gpu_insar_adjust.geodesy.plates import plate_velocity_enu

    out, _ = naf_run
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "horizontal_only"
    east, t = _read(out / "east_velocity.tif")
    lon, lat = _centres(t, east.shape)
    pe, _, _ = plate_velocity_enu(lon, lat, plate="EURA", model=PLATE_MODEL)
    pts = {"x": xr.DataArray(lon, dims=("r", "c")), "y": xr.DataArray(lat, dims=("r", "c"))}
    d = (east - pe) - grids["ve"].interp(pts).values
    ok = np.isfinite(d)
    bias, rms = float(d[ok].mean()), float(np.sqrt(np.mean(d[ok] ** 2)))
    print(f"east vs GNSS grid (Eurasia-fixed): n={int(ok.sum())} bias={bias:+.2f} RMS={rms:.2f} mm/yr")
    assert ok.sum() > 20_000  # measured 49922 pixels where ascending and descending overlap
    assert abs(bias) < 0.5  # measured -0.01 (+25.5 without the ITRF -> Eurasia-fixed conversion)
    assert rms < 1.0  # measured 0.24 (the GNSS-east prior); ~3.0 for an east solved without it
