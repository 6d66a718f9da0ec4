"""``gia run``: the whole adjustment from frame folders and GNSS to a GNSS-consistent vertical velocity map.

Stages (each also a plain function of the package):

1. **inputs** — open every frame (``io.frames``), the GNSS table (``io.gnss``), the optional held-out GNSS; convert
   GNSS to ITRF (Sentinel-1 orbits are ITRF, so observed LOS contains the plate motion).
2. **horizontal field** — GNSS east/north interpolated to every pixel (``geodesy.horizontal``), or given grids.
3. **per-frame adjustment** — candidate long-wavelength models of InSAR − GNSS, cross-validated, one chosen per
   frame and removed (``adjust.frame``).
4. **network** — per-frame polynomial corrections (``network.order``: offset, ramp or, by default,
   quadratic) from all overlaps and GNSS ties at once (``network``), on vertical-equivalent velocities so that
   different look geometries compare like with like.
5. **mosaic** — frames resampled to the target grid and merged per look direction (``mosaic``); LOS decomposed
   to up (+ east where ascending and descending overlap), elsewhere to vertical with the GNSS horizontal field.
6. **analysis** — subsidence area/rates/hotspots, validation against held-out GNSS.
7. **products** — COG GeoTIFFs, per-frame corrections, ``summary.json`` (written last, atomically).

A baseline (a weighted plane per frame, then a plain average of overlapping frames) is computed in the same run,
so the benefit of the method is measured, not assumed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import backend
from ._version import __version__
from .config import GiaConfig, load_config
from .errors import AdjustmentError, GnssError, InputError, OutputError
from .logs import STAGE_TIMES, get_logger, progress, stage

log = get_logger("pipeline")

__all__ = ["run", "RunResult", "frame_vertical_equivalent", "plane_average_baseline"]

# pixels per block of the up/east decomposition (its float64 working set is ~40 arrays of this size) and of the
# per-frame row blocks that apply the network corrections
_DECOMPOSE_BLOCK_PIXELS = 1 << 18
_ROW_BLOCK_PIXELS = 1 << 20


def _row_blocks(height: int, width: int, block_pixels: int):
    """Slices of consecutive rows of a (height, width) raster, about ``block_pixels`` pixels each (one row at
    least): per-pixel float64 work by such blocks stays in cache and holds a block's worth of temporaries."""
    step = max(1, block_pixels // max(width, 1))
    for r0 in range(0, height, step):
        yield slice(r0, min(r0 + step, height))

MANIFEST = "manifest.json"


@dataclass
class RunResult:
    """What :func:`run` produced: the summary dict and the main grids (host xarray objects)."""

    summary: dict
    out_dir: Path
    vertical_velocity: Any = None
    vertical_velocity_std: Any = None
    east_velocity: Any = None
    cumulative: Any = None
    frames: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Inputs and provenance
# --------------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def input_checksums(paths: list[Path]) -> dict[str, str]:
    """SHA-256 of every input file (folders: every file inside, recursively), keyed by path.

    Files are hashed on the host's threads (hashlib releases the GIL while it hashes): the inputs of a plain
    run to gigabytes, and hashing them was one core's work before anything else could start."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    from .kernels.cpu import _pool_map

    return dict(zip(map(str, files), _pool_map(_sha256, files)))


def _prepare_out_dir(out: Path, fingerprint: str, overwrite: bool) -> None:
    """Refuse an output folder holding another run's products unless ``overwrite``; clear stale temporaries.

    Products are written under hidden temporary names and renamed into place, so an interrupted run can
    leave only such temporaries behind (never a product that looks whole); they are removed here.
    """
    out.mkdir(parents=True, exist_ok=True)
    # temporaries, and a product moved aside while its replacement was renamed into place (atomic_output)
    for stale in list(out.rglob(".*.tmp")) + list(out.rglob(".*.old")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") != fingerprint and not overwrite:
            raise OutputError("The output folder holds the products of another run (different inputs or "
                              "configuration).", file=out, field="--out",
                              fix="choose an empty folder, or pass --overwrite to replace those products")
        replaced = old.get("fingerprint") != fingerprint
    elif any(out.iterdir()) and not overwrite:
        raise OutputError("The output folder is not empty and holds no gia run.", file=out, field="--out",
                          fix="choose an empty or new folder, or pass --overwrite")
    else:
        replaced = True
    stale = out / "validation.json"  # `gia validate` of the products being replaced
    if replaced and stale.exists():
        log.info("removing %s: it validated the products this run replaces", stale)
        stale.unlink()


def _slow_ground(mask, a, b, max_rate: float, min_pixels: int):
    """The overlap pixels two frames are compared on, and whether that is all of them for lack of slow ground.

    Fast-deforming ground moves horizontally too (inward at a subsidence bowl), which the GNSS field misses and
    two look directions see differently: frames are compared where the mean of their two vertical-equivalent
    rates ``a``, ``b`` (mm/yr) is at most ``max_rate`` (0: everywhere). The mean, not each frame's own rate: a
    test on either would drop exactly the pixels where that frame's error pushes it past the threshold, hiding
    the error from the network. An overlap with fewer than ``min_pixels`` such pixels (one inside a bowl) is
    compared on all its pixels rather than left out: ``(mask, True)``."""
    if max_rate <= 0:
        return mask, False
    with np.errstate(invalid="ignore"):
        slow = mask & (np.abs(a + b) <= 2 * max_rate)
    if np.count_nonzero(slow) >= min_pixels:
        return slow, False
    return mask, True


def _stations_itrf(stations, cfg: GiaConfig):
    from .geodesy import plates

    return plates.to_itrf(stations, cfg.gnss.plate, cfg.gnss.plate_model)


# --------------------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------------------
def _noise_sigma(los_std, correction_std, shape) -> np.ndarray:
    """A frame's noise sigma for the network (float64, mm/yr): its product sigma ``los_std`` (2 mm/yr where
    missing or not finite; a sigma of 0 is not credible, so floored at 0.1 mm/yr) with the correction's formal
    sigma (NaN taken as 0) in quadrature. One numba pass for float32 rasters with the numba engine, the same
    bits as the array expression."""
    from .kernels import cpu as _kcpu

    cs = np.asarray(correction_std)
    if (los_std is not None and _kcpu.cpu_engine() == "numba" and np.asarray(los_std).dtype == np.float32
            and cs.dtype == np.float32 and np.shape(los_std) == cs.shape == tuple(shape)):
        return _kcpu.noise_sigma(los_std, cs)
    ls = np.asarray(los_std, np.float64) if los_std is not None else np.full(shape, 2.0)
    noise = np.square(np.where(np.isfinite(ls) & (ls > 0.1), ls, np.where(np.isfinite(ls), 0.1, 2.0)))
    return np.sqrt(noise + np.square(np.nan_to_num(cs), dtype=np.float64))


def frame_vertical_equivalent(frame, los, los_std, hfield):
    """Vertical-equivalent velocity of a frame: (LOS − e·ve − n·vn)/u with its 1-sigma (mm/yr, float32 host
    arrays: computed in float64, stored as the frames are).

    ``hfield`` holds ``ve, vn`` (and optionally ``se, sn``) on the frame grid in the frame's reference (ITRF).
    Computed by blocks of rows: the float64 temporaries (a dozen per pixel) stay in cache, and the result is
    the whole-frame computation's, element for element; with the numba engine in one pass per pixel
    (``kernels.cpu.vertical_equivalent``), the same bit for bit. A unit vector with ``u <= 0.05`` at a usable
    pixel (:class:`GeometryError`) is reported before a sigma that is not positive (:class:`InputError`),
    wherever in the frame each lies.
    """
    from .errors import ArrayArgumentError
    from .kernels.cpu import fused_for
    from .mosaic import decompose_vertical

    def host(a):
        return np.asarray(backend.to_numpy(a.data if hasattr(a, "dims") else a))  # DataArray or array

    e_all, n_all, u_all = (host(frame[v]) for v in ("los_e", "los_n", "los_u"))
    ve_all, vn_all = host(hfield["ve"]), host(hfield["vn"])
    se_all = host(hfield["se"]) if "se" in hfield else None
    sn_all = host(hfield["sn"]) if "sn" in hfield else None
    los_all, std_all = host(los), host(los_std)
    arrays = {"los": los_all, "los_std": std_all, "los_e": e_all, "los_n": n_all, "los_u": u_all, "ve": ve_all,
              "vn": vn_all, "se": se_all, "sn": sn_all}
    for name, a in arrays.items():
        if a is not None and a.shape != los_all.shape:
            raise ArrayArgumentError(f"{name} has shape {a.shape}; the frame {frame.attrs.get('frame_id', '')} "
                                     f"is {los_all.shape}.", field=name,
                                     fix="give the horizontal field and the sigmas on the frame's own grid")
    native = all(a is None or (a.dtype in (np.float32, np.float64) and a.dtype.isnative) for a in arrays.values())
    if native and fused_for(np):  # numba: one pass, the block-wise result below bit for bit
        from .kernels.cpu import vertical_equivalent
        from .mosaic import _vertical_errors

        vu_out, std_out, bad_up, bad_std = vertical_equivalent(los_all, std_all, e_all, n_all, u_all, ve_all,
                                                               vn_all, se_all, sn_all)
        _vertical_errors(bad_up, bad_std)
        return vu_out, std_out
    ny, nx = los_all.shape
    vu_out, std_out = np.empty((ny, nx), np.float32), np.empty((ny, nx), np.float32)
    bad_sigma = None  # the first block's; raised after every block's geometry was checked
    for rs in _row_blocks(ny, nx, _DECOMPOSE_BLOCK_PIXELS):
        e, n, u = (np.asarray(a[rs], np.float64) for a in (e_all, n_all, u_all))
        ve, vn = np.asarray(ve_all[rs], np.float64), np.asarray(vn_all[rs], np.float64)
        L = np.asarray(los_all[rs], np.float64)
        ok = np.isfinite(L) & np.isfinite(ve) & np.isfinite(vn) & np.isfinite(u)
        L = np.where(ok, L, np.nan)
        S = np.where(ok, np.asarray(std_all[rs], np.float64), np.nan)
        args = (L, S, e, n, u, np.where(ok, ve, 0.0), np.where(ok, vn, 0.0),
                *(None if a is None else np.where(ok, np.asarray(a[rs], np.float64), 0.0)
                  for a in (se_all, sn_all)))
        try:
            res = decompose_vertical(*args)
        except InputError as exc:  # a bad sigma; a bad geometry further down is reported first
            bad_sigma = bad_sigma or exc
            decompose_vertical(args[0], None, *args[2:])  # the block's geometry check only
            continue
        vu_out[rs] = backend.to_numpy(res.vu)
        std_out[rs] = backend.to_numpy(res.vu_std)
    if bad_sigma is not None:
        raise bad_sigma
    return vu_out, std_out


def _apply_network_block(vert, los, c_vert, u, ml, noise, cv: float, m2, fc, vs) -> None:
    """A block of rows of one frame's network correction ``c_vert`` (vertical, mm/yr, float64), in place: the
    vertical-equivalent ``vert`` and the adjusted LOS ``los`` corrected, the frame's final LOS correction ``fc``
    (its model's ``ml``, if any, plus ``u·c``) and its merge sigma ``vs`` (the noise sigma and the model's CV
    RMSE ``cv`` over ``u``, floored at the overlap misfit ``sqrt(m2)`` when given); float32 rasters. With the
    numba engine one pass (``kernels.cpu.apply_network_correction``), bit for bit these expressions."""
    from .kernels.cpu import apply_network_correction, fused_for

    if fused_for(np) and all(a.dtype == np.float32 and a.flags.c_contiguous for a in
                             (vert, los, u, noise, fc, vs) + (() if ml is None else (ml,))):
        apply_network_correction(vert, los, np.ascontiguousarray(c_vert, np.float64), u, ml, noise, cv, m2, fc, vs)
        return
    uf = np.asarray(u, np.float64)
    vert[...] = vert - c_vert
    los[...] = los - uf * c_vert
    mlf = 0.0 if ml is None else np.asarray(ml, np.float64)
    fc[...] = mlf + uf * c_vert
    with np.errstate(divide="ignore"):  # u = 0 only outside the valid pixels: an infinite sigma there
        extra = np.square(cv / uf)
    if m2 is not None:
        extra = np.maximum(extra, m2)
    vs[...] = np.sqrt(np.square(noise, dtype=np.float64) + extra)


def _apply_mask(frame):
    """Blank pixels the processor flagged as unusable (``mask`` False): unwrapping errors and decorrelated pixels
    carry errors of tens of mm/yr and must enter neither the fits, the overlaps, the ties nor the mosaic."""
    if "mask" in frame:
        frame["los_velocity"] = frame["los_velocity"].where(frame["mask"].astype(bool))
    return frame


def _frame_da(frame, values, name, units="mm/yr"):
    import xarray as xr

    da = xr.DataArray(np.asarray(values, np.float32), dims=("y", "x"),
                      coords={"y": frame["y"], "x": frame["x"]}, name=name, attrs={"units": units})
    crs = frame.rio.crs
    return da.rio.write_crs(crs, inplace=True) if crs is not None else da  # no deep copy


def _frame_km(frame, lon, lat):
    from .adjust.residuals import frame_origin, local_xy_km

    x, y = local_xy_km(np.asarray(lon, np.float64), np.asarray(lat, np.float64), *frame_origin(frame))
    return np.asarray(x), np.asarray(y)


def _overlap_rms(pairs: list[dict]) -> dict:
    """Number of pairs and the RMS over pairs of their overlap RMS before/after (mm/yr), over the compared
    samples and, where computed, over all overlap pixels (``<key>_mm_yr``)."""
    sel = [p for p in pairs if p.get("n")]
    d = {"n_pairs": len(sel)}
    for key in ("rms_before", "rms_after", "rms_all_pixels_before", "rms_all_pixels_after"):
        v = [p[key] for p in sel if key in p]
        if v:
            d[key + "_mm_yr"] = float(np.sqrt(np.mean(np.square(v))))
    return d


def _overlap_rms_by_kind(pairs: list[dict]) -> dict:
    """:func:`_overlap_rms` per pair kind (along-track, across-track, asc-desc) that has pairs."""
    by_kind = {kind: _overlap_rms([p for p in pairs if p.get("kind") == kind])
               for kind in ("along-track", "across-track", "asc-desc")}
    return {kind: d for kind, d in by_kind.items() if d["n_pairs"]}


def _pair_kind(a, b) -> str:
    """'along-track' (same track), 'across-track' (same orbit direction) or 'asc-desc'."""
    from .mosaic import _track

    if a.attrs.get("orbit") != b.attrs.get("orbit"):
        return "asc-desc"
    ta = _track(a)
    return "along-track" if ta and ta == _track(b) else "across-track"


def _frame_km_rows(frame, r0: int, r1: int):
    """Frame-centred km ``(x, y)`` (2-D float64) of the pixel centres of rows ``r0:r1``.

    For a geographic frame the trigonometry goes per row (x = Δλ·N(φ)·cos φ, y a function of φ alone), one
    multiply per pixel and ``y`` a broadcast view, the same numbers as :func:`_frame_km` on the pixel grid."""
    from .adjust.residuals import frame_origin, local_xy_km

    crs = frame.rio.crs
    if crs is not None and not crs.is_geographic:
        lon, lat = _frame_lonlat_grid(frame, rows=np.arange(r0, r1))
        return _frame_km(frame, lon, lat)
    lon = np.asarray(frame["x"].values, np.float64)
    lat = np.asarray(frame["y"].values, np.float64)[r0:r1]
    x, y = local_xy_km(lon[None, :], lat[:, None], *frame_origin(frame))
    x = np.asarray(x)
    return x, np.broadcast_to(np.asarray(y), x.shape)


def _frame_km_valid(frame, values, stride: int = 4):
    """Frame-centred km of the frame's valid pixels (every ``stride``-th row and column, plus the last)."""
    ny, nx = values.shape
    rows = np.unique(np.r_[np.arange(0, ny, stride), ny - 1])
    cols = np.unique(np.r_[np.arange(0, nx, stride), nx - 1])
    lon, lat = _frame_lonlat_grid(frame, rows, cols)
    ok = np.isfinite(values[np.ix_(rows, cols)])
    if not ok.any():
        ok = np.ones_like(ok)
    return _frame_km(frame, lon[ok], lat[ok])


def _frame_lonlat_grid(frame, rows=None, cols=None):
    """Longitude and latitude (degrees) of the frame's pixel centres, or of the ``rows`` × ``cols`` subset."""
    x = np.asarray(frame["x"].values, np.float64)
    y = np.asarray(frame["y"].values, np.float64)
    x = x if cols is None else x[cols]
    y = y if rows is None else y[rows]
    crs = frame.rio.crs
    X, Y = np.meshgrid(x, y)
    if crs is not None and not crs.is_geographic:
        import pyproj

        tr = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        X, Y = tr.transform(X, Y)
    return X, Y


def _sample_at_stations(frame, values, stations, half: int = 1):
    """Median of ``values`` in a (2·half+1)² window at each station's pixel (NaN-aware); NaN if none valid."""
    x = np.asarray(frame["x"].values, np.float64)
    y = np.asarray(frame["y"].values, np.float64)
    col = np.abs(stations["lon"].to_numpy(float)[:, None] - x[None, :]).argmin(axis=1)
    row = np.abs(stations["lat"].to_numpy(float)[:, None] - y[None, :]).argmin(axis=1)
    dx = np.median(np.abs(np.diff(x))) if x.size > 1 else np.inf
    dy = np.median(np.abs(np.diff(y))) if y.size > 1 else np.inf
    inside = (np.abs(x[col] - stations["lon"].to_numpy(float)) <= dx) & \
             (np.abs(y[row] - stations["lat"].to_numpy(float)) <= dy)
    out = np.full(len(stations), np.nan)
    for k, (r, c) in enumerate(zip(row, col)):
        if not inside[k]:
            continue
        win = values[max(r - half, 0):r + half + 1, max(c - half, 0):c + half + 1]
        if np.isfinite(win).any():
            out[k] = np.nanmedian(win)
    return out


# --------------------------------------------------------------------------------------------------------------
# Baseline: plane per frame + plain averaging
# --------------------------------------------------------------------------------------------------------------
def plane_average_baseline(frames, residual_tables, verticals_fn, grid):
    """Weighted plane per frame fitted to its station residuals, then a plain average of overlapping frames.

    ``residual_tables[i]`` holds x_km, y_km, residual, sigma for frame i; ``verticals_fn(i, correction)`` turns
    the frame's LOS minus a correction into its vertical-equivalent (host array). Returns the averaged vertical
    on ``grid`` (host array). This is the simple practice the method is measured against.
    """
    from .linalg import lstsq_shared
    from .mosaic import resample_footprint

    acc = np.zeros(grid.shape)
    cnt = np.zeros(grid.shape, np.int16)
    for i, frame in enumerate(frames):
        tab = residual_tables[i]
        if tab is None or len(tab) < 3:
            continue
        A = np.stack([np.ones(len(tab)), tab["x_km"].to_numpy(float), tab["y_km"].to_numpy(float)], axis=1)
        w = 1.0 / np.square(tab["sigma"].to_numpy(float))
        sol = lstsq_shared(A, tab["residual"].to_numpy(float), w)
        if not bool(sol.determined):
            continue
        xk, yk = _frame_km_rows(frame, 0, frame.sizes["y"])
        corr = sol.x[0] + sol.x[1] * xk + sol.x[2] * yk
        vert = verticals_fn(i, corr)
        on = resample_footprint(_frame_da(frame, vert, "v"), grid, resampling="bilinear")
        r0, r1, c0, c1 = on.window
        ok = np.isfinite(on.values)
        acc[r0:r1, c0:c1][ok] += on.values[ok]
        cnt[r0:r1, c0:c1][ok] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
def run(frames_dir: str | os.PathLike, gnss: str | os.PathLike | None, out_dir: str | os.PathLike, *,
        holdout: str | os.PathLike | None = None, config: GiaConfig | str | os.PathLike | None = None,
        horizontal_grids: tuple[str, str] | None = None, horizontal_grids_frame: str = "EURA-fixed",
        overwrite: bool = False) -> RunResult:
    """Run the whole adjustment (see the module docstring) and write the products into ``out_dir``.

    Parameters
    ----------
    frames_dir
        Folder with one sub-folder per frame (LiCSAR/LiCSBAS or MintPy layout).
    gnss
        GNSS velocity file (CSV ``station,lon,lat,ve,vn,vu,se,sn,su`` mm/yr, or MIDAS). May be None only when
        ``horizontal_grids`` is given (horizontal-only referencing to the grids).
    out_dir
        Output folder (created). A folder holding another run's products is refused unless ``overwrite``.
    holdout
        Independent GNSS stations used only for validation.
    config
        A :class:`GiaConfig`, a TOML path, or None (defaults).
    horizontal_grids
        ``(east_grid, north_grid)`` horizontal velocity grids (mm/yr) used as the horizontal field instead of
        interpolating GNSS; their frame is ``horizontal_grids_frame``.
    """
    t_start = time.perf_counter()
    cfg = config if isinstance(config, GiaConfig) else load_config(config)
    frames_dir, out = Path(frames_dir), Path(out_dir)
    if gnss is None and horizontal_grids is None:
        raise GnssError("No GNSS input was given.", field="--gnss",
                        fix="give a GNSS velocity file with --gnss, or horizontal grids with --horizontal-grids")
    inputs = [frames_dir] + [Path(p) for p in (gnss, holdout) if p is not None] + \
        [Path(p) for p in (horizontal_grids or ())]
    STAGE_TIMES.clear()
    with backend.use_backend(cfg.backend) as backend_name:
        _check_cluster(cfg.parallel, backend_name)
        with stage("checksums", log):
            checksums = input_checksums(inputs)
        # execution settings (backend, workers, scheduler, log level) do not change the products: a run resumed
        # with more workers or on another backend is the same run
        run_config = cfg.model_dump(mode="json", exclude={"backend", "log_level", "parallel"})
        roles = _input_roles(gnss, holdout, horizontal_grids, horizontal_grids_frame)
        fingerprint = hashlib.sha256(json.dumps({"inputs": checksums, "roles": roles, "config": run_config,
                                                 "version": __version__}, sort_keys=True).encode()).hexdigest()
        _prepare_out_dir(out, fingerprint, overwrite)
        from .io.write import write_json

        write_json(out / MANIFEST, {"fingerprint": fingerprint, "version": __version__, "status": "running",
                                    "inputs": checksums, "config": cfg.model_dump(mode="json")})
        result = _run_stages(frames_dir, gnss, holdout, horizontal_grids, horizontal_grids_frame, out, cfg,
                             checksums, roles)
        summary = result.summary
        from .versions import code_fingerprint

        summary["provenance"] = {"version": __version__, "code_fingerprint": code_fingerprint(),
                                 "backend": backend_name, "config": cfg.model_dump(mode="json"),
                                 "inputs_sha256": checksums, "fingerprint": fingerprint,
                                 "stage_seconds": {k: round(v, 3) for k, v in STAGE_TIMES.items()},
                                 "wall_seconds": round(time.perf_counter() - t_start, 3)}
        write_json(out / "summary.json", summary)
        if not cfg.output.report:  # an earlier run's report would pass for this run's
            for stale in (out / "report.html", out / "figures"):
                if stale.exists():
                    log.info("removing %s: an earlier run's report (output.report is off)", stale)
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        if cfg.output.report:
            from .report import write_report

            with stage("report", log):
                write_report(out, summary, vertical_velocity=result.vertical_velocity, cumulative=result.cumulative,
                             east_velocity=result.east_velocity if result.east_velocity is not None and
                             bool(np.isfinite(result.east_velocity.values).any()) else None)
        write_json(out / MANIFEST, {"fingerprint": fingerprint, "version": __version__, "status": "complete",
                                    "inputs": checksums, "config": cfg.model_dump(mode="json")})
    return result


def _read_stations(path, cfg: GiaConfig, *, training: bool = True):
    """The GNSS table at ``path``. With ``gnss.horizontal_only`` the training stations' verticals are blanked, so
    that every stage references to the horizontal components alone, as for a table without them; held-out
    stations (``training=False``) keep theirs: they validate the vertical map."""
    from .io.gnss import read_gnss

    st = read_gnss(path, reference_frame=cfg.gnss.reference_frame)
    if training and cfg.gnss.horizontal_only:
        st = st.assign(vu=np.nan, **({"su": np.nan} if "su" in st.columns else {}))
    return st


def _require_stations_in_frames(stations, frames, gnss_path) -> None:
    """Refuse a GNSS file none of whose stations lies inside any frame's bounds (wrong file, region or lon/lat swap)."""
    lon = stations["lon"].to_numpy(float)
    lat = stations["lat"].to_numpy(float)
    inside = np.zeros(lon.shape, bool)
    for fr in frames:
        x = fr["x"].to_numpy()
        y = fr["y"].to_numpy()
        inside |= (lon >= x.min()) & (lon <= x.max()) & (lat >= y.min()) & (lat <= y.max())
    if not inside.any():
        x0 = min(float(f["x"].min()) for f in frames)
        x1 = max(float(f["x"].max()) for f in frames)
        y0 = min(float(f["y"].min()) for f in frames)
        y1 = max(float(f["y"].max()) for f in frames)
        raise GnssError(f"no usable GNSS station: none of the {len(lon)} stations lies inside any frame "
                         f"(frames span lon {x0:.3f}..{x1:.3f}, lat {y0:.3f}..{y1:.3f}; stations span lon "
                         f"{np.nanmin(lon):.3f}..{np.nanmax(lon):.3f}, lat {np.nanmin(lat):.3f}..{np.nanmax(lat):.3f}).",
                         file=gnss_path, field="lon/lat",
                         fix="give the GNSS table for this region, and check that lon and lat are not swapped")


def _pseudo_stations_from_grids(grids, frames, spacing_deg: float = 0.1):
    """Horizontal-only pseudo-stations sampled from horizontal velocity grids inside the frames' extent."""
    import pandas as pd

    lon_min = min(float(f["x"].min()) for f in frames)
    lon_max = max(float(f["x"].max()) for f in frames)
    lat_min = min(float(f["y"].min()) for f in frames)
    lat_max = max(float(f["y"].max()) for f in frames)
    lons = np.arange(lon_min + spacing_deg / 2, lon_max, spacing_deg)
    lats = np.arange(lat_min + spacing_deg / 2, lat_max, spacing_deg)
    LO, LA = np.meshgrid(lons, lats)
    import xarray as xr

    pts = {"x": xr.DataArray(LO.ravel(), dims="p"), "y": xr.DataArray(LA.ravel(), dims="p")}
    ve = grids["ve"].interp(pts).values
    vn = grids["vn"].interp(pts).values
    ok = np.isfinite(ve) & np.isfinite(vn)
    df = pd.DataFrame({"station": [f"G{k:05d}" for k in range(int(ok.sum()))], "lon": LO.ravel()[ok],
                       "lat": LA.ravel()[ok], "height": np.nan, "ve": ve[ok], "vn": vn[ok], "vu": np.nan,
                       "se": 1.0, "sn": 1.0, "su": np.nan})
    df.attrs["reference_frame"] = grids.attrs.get("reference_frame", "EURA-fixed")
    df.attrs["path"] = grids.attrs.get("path_e")
    return df


def _input_roles(gnss, holdout, horizontal_grids, horizontal_grids_frame) -> dict:
    """Which input file plays which part, and the grids' reference frame: the checksums are keyed by path only,
    so a run with the GNSS and held-out tables swapped, the east and north grids swapped, or the grids read in
    another frame would otherwise look like the same run."""
    return {"gnss": None if gnss is None else str(Path(gnss)),
            "holdout": None if holdout is None else str(Path(holdout)),
            "horizontal_grids": None if horizontal_grids is None else [str(Path(p)) for p in horizontal_grids],
            "horizontal_grids_frame": None if horizontal_grids is None else str(horizontal_grids_frame)}


def _frame_key(folder: Path, checksums: dict[str, str], cfg: GiaConfig, roles: dict | None = None) -> str:
    """Cache key of a frame's adjustment: its own files, every non-frame input (GNSS, holdout, grids) and the
    part each plays (:func:`_input_roles`), config and the code that computes it (``__version__`` and the
    sources' fingerprint)."""
    prefix = str(Path(folder))
    own = {k: v for k, v in checksums.items() if k.startswith(prefix + os.sep)}
    frames_root = str(Path(folder).parent) + os.sep
    others = {k: v for k, v in checksums.items() if not k.startswith(frames_root)}
    from .versions import code_fingerprint

    blob = json.dumps({"frame": own, "others": others, "roles": roles,
                       "gnss": cfg.gnss.model_dump(mode="json"), "adjust": cfg.adjust.model_dump(mode="json"),
                       "version": __version__,
                       "code": code_fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _CachedAdjustment:
    """A per-frame adjustment read back from the run's work folder (what the later stages use of it)."""

    def __init__(self, correction, correction_std, los_adjusted, report, residuals):
        self.correction, self.correction_std, self.los_adjusted = correction, correction_std, los_adjusted
        self.report, self.residuals, self.model = report, residuals, None


def _save_adjustment(work: Path, fid: str, key: str, adj) -> None:
    """Write one frame's adjustment atomically (NetCDF + JSON); the JSON, written last, marks it complete."""
    import xarray as xr

    from .io.write import write_json, write_netcdf

    ds = xr.Dataset({"correction": adj.correction.astype("float32"),
                     "correction_std": adj.correction_std.astype("float32"),
                     "los_adjusted": adj.los_adjusted.astype("float32")})
    for v in ds.data_vars:
        ds[v].data = backend.to_numpy(ds[v].data)
    write_netcdf(ds, work / f"{fid}.adjust.nc", compress=False)
    res = adj.residuals
    write_json(work / f"{fid}.adjust.json", {"key": key, "report": adj.report,
                                             "residuals": None if res is None else
                                             json.loads(res.to_json(orient="split"))})


def _load_adjustment(work: Path, fid: str, key: str):
    import pandas as pd
    import xarray as xr

    meta_path, nc_path = work / f"{fid}.adjust.json", work / f"{fid}.adjust.nc"
    if not (meta_path.is_file() and nc_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    with xr.open_dataset(nc_path) as ds:
        ds = ds.load()
    res = meta.get("residuals")
    residuals = None if res is None else pd.DataFrame(res["data"], index=res["index"], columns=res["columns"])
    return _CachedAdjustment(ds["correction"], ds["correction_std"], ds["los_adjusted"], meta["report"], residuals)


def _cv_rmse(adj) -> float:
    """The chosen model's cross-validated RMSE (LOS, mm/yr): how well the frame's correction predicts stations
    it was not fitted to. It is the frame's empirical error where a model cannot follow the error surface (an
    ionosphere finer than the station spacing), which the formal correction sigma does not see; 0 if unknown."""
    if adj is None:
        return 0.0
    cands = adj.report.get("candidates") or {}
    cv = (cands.get(adj.report.get("chosen")) or {}).get("rmse")
    return float(cv) if cv is not None and np.isfinite(cv) else 0.0


def _adjust_one(frame, *, stations, config, holdout, backend_name: str = "numpy"):
    """One frame's adjustment (runs in-process or as a Dask task); None when it has no station. ``frame`` is the
    masked frame as "read inputs" holds it (in-process: not read twice) or its folder (a Dask task reads it in
    its worker: a frame is not shipped to the cluster).

    On a GPU backend the frame's rasters go to the device for the adjustment (pixel features, the dense
    evaluation of the chosen surface and its σ: the per-pixel part); the station-level fits run on the host
    either way. The result's rasters come back as host float32, as the later stages keep every frame."""
    import xarray as xr

    from .adjust.frame import adjust_frame
    from .io.frames import open_frame

    frame = frame if isinstance(frame, xr.Dataset) else _apply_mask(open_frame(frame))
    xp = None if backend_name == "numpy" else backend._backend_namespace(backend_name)
    if xp is not None:
        frame = frame.copy(deep=False)  # the caller's frame keeps its host rasters
        for v in list(frame.data_vars):
            frame[v].data = backend.asarray(frame[v].data, xp=xp)
    try:
        adj = adjust_frame(frame, stations, config, holdout=holdout)
    except AdjustmentError as exc:
        log.warning("frame %s: %s — left to the network adjustment", frame.attrs["frame_id"], exc.message)
        return None
    if xp is not None:
        for da in (adj.correction, adj.correction_std, adj.los_adjusted):
            da.data = backend.to_numpy(da.data)
    return adj


#: Host memory one worker needs to adjust a frame, per frame pixel, plus its process (imports, numba, GDAL):
#: the frame's rasters, the pixel features and the candidate's float64 surface and σ in row chunks. Measured:
#: two workers on the 0.001° scenario (frames up to ~9.6 M pixels) peaked at 4.12 GiB together, ~190 B/pixel
#: above a 400 MiB base each (benchmarks/results/cpu-2026-11-25-b4-full-workers.json)
_WORKER_BYTES_PER_PIXEL = 200
_WORKER_BASE_BYTES = 400 * 2**20
#: GPU memory one worker holds on the device it shares with others, per frame pixel, plus its CUDA context and
#: CuPy's kernels. An estimate from the arrays an adjustment keeps there, not yet measured on a device: the
#: frame's float32 rasters (~20 B), the float64 surface and σ with their row parts before concatenation (32 B),
#: their float32 casts and the adjusted LOS (12 B), masks (~2 B), rounded up for CuPy's pool
_WORKER_DEVICE_BYTES_PER_PIXEL = 96
_WORKER_DEVICE_BASE_BYTES = 512 * 2**20


def _has_dask_cuda() -> bool:
    import importlib.util

    return importlib.util.find_spec("dask_cuda") is not None


def _check_cluster(pc, backend_name: str) -> None:
    """Refuse, before anything runs, a cluster setting that cannot be honoured (a ``GiaError`` naming the fix)."""
    from .errors import BackendUnavailableError, ConfigError

    if pc.cluster != "cuda" or pc.scheduler:
        return
    if backend_name == "numpy":
        raise ConfigError("parallel.cluster = 'cuda' puts one Dask worker on each GPU, but this run uses the "
                          "CPU (numpy) backend.", field="parallel.cluster",
                          fix="run with --backend cupy (or auto) on a machine with a GPU, or set parallel.cluster "
                              "to 'cpu' or 'auto' (--cluster)")
    if pc.workers == 0:
        raise ConfigError("parallel.cluster = 'cuda' asks for GPU workers, but parallel.workers = 0 keeps the "
                          "frames in this process.", field="parallel.workers",
                          fix="set workers to 'auto' (one per GPU) or to a number of GPUs, or set "
                              "parallel.cluster to 'auto'")
    n_gpus = backend.gpu_count()
    if isinstance(pc.workers, int) and pc.workers > n_gpus:
        raise ConfigError(f"parallel.workers = {pc.workers} GPU workers, but this machine shows {n_gpus} GPU(s) "
                          "and a CUDA cluster puts one worker on each.", field="parallel.workers",
                          fix=f"give at most {n_gpus} workers, or set parallel.cluster = 'cpu' for worker "
                              "processes that share the GPU")
    if not _has_dask_cuda():
        raise BackendUnavailableError("parallel.cluster = 'cuda' needs dask-cuda, which is not installed.",
                                      field="parallel.cluster",
                                      fix="pip install dask-cuda, or set parallel.cluster = 'cpu' (--cluster cpu)")


def _frame_cluster(pc, frames, backend_name: str) -> tuple[str, int]:
    """The local cluster for the per-frame stage: ``(kind, workers)``, kind ``"cpu"`` (worker processes; on the
    GPU backend they share the default GPU) or ``"cuda"`` (dask-cuda, one worker per GPU); 0 workers: this process.

    ``cluster = "auto"`` takes ``"cuda"`` on the GPU backend when several GPUs are visible and dask-cuda is
    installed (every GPU then adjusts frames), else ``"cpu"``. Settings are checked by :func:`_check_cluster`."""
    on_gpu = backend_name != "numpy"
    kind = pc.cluster if on_gpu else "cpu"  # _check_cluster refused "cuda" on the CPU backend
    if kind == "auto":
        n_gpus = backend.gpu_count()
        # a count of workers above the GPUs cannot be a CUDA cluster (one worker per GPU): processes then
        fits = pc.workers == "auto" or int(pc.workers) <= n_gpus
        kind = "cuda" if n_gpus > 1 and fits and _has_dask_cuda() else "cpu"
        if n_gpus > 1 and kind == "cpu":
            log.info("%d GPUs visible: install dask-cuda to adjust frames on every one of them; local workers "
                     "share the default GPU", n_gpus)
    if kind == "cuda":
        if pc.workers != "auto":
            return kind, int(pc.workers)
        n = min(backend.gpu_count(), len(frames))
        # one GPU, or one frame: not worth a cluster unless asked for by name
        return (kind, n) if n >= 2 or pc.cluster == "cuda" else ("cpu", 0)
    return "cpu", _frame_workers(pc.workers, frames, on_gpu=on_gpu, worker_memory=pc.worker_memory)


def _frame_workers(workers, frames, *, on_gpu: bool = False, worker_memory: str | int = "auto") -> int:
    """Local Dask workers for the per-frame stage: ``workers`` as configured, or for ``"auto"`` one per core
    (single-threaded, as the station-level fits that dominate a frame are) when the machine has at least 4 cores
    and at least 4 frames are to be adjusted, capped by the frames and by the memory available now (each worker
    counted at its ``worker_memory`` limit when that is larger than a frame needs; on the GPU backend the
    device's memory too: the workers share it); 0 (this process) otherwise, or when the distributed scheduler
    is not installed."""
    if workers != "auto":
        return int(workers)
    if len(frames) < 4:
        return 0
    from .kernels.cpu import _n_threads

    cores = _n_threads()  # the cores this process may run on
    if cores < 4:
        return 0
    try:
        import distributed  # noqa: F401
    except ImportError:
        log.info("per-frame stage in this process: install gpu_insar_adjust[dask] to adjust frames in parallel")
        return 0
    import psutil

    largest = max(fr.sizes["y"] * fr.sizes["x"] for fr in frames)
    per_worker = _WORKER_BASE_BYTES + _WORKER_BYTES_PER_PIXEL * largest
    if worker_memory not in (None, "auto"):
        from dask.utils import parse_bytes

        per_worker = max(per_worker, parse_bytes(worker_memory))
    n = min(len(frames), cores, int(psutil.virtual_memory().available // per_worker))
    if on_gpu:
        free = backend._device_free_bytes()
        if free is not None:
            n = min(n, int(free // (_WORKER_DEVICE_BASE_BYTES + _WORKER_DEVICE_BYTES_PER_PIXEL * largest)))
    return n if n >= 2 else 0


def _adjust_cost(frame, stations) -> float:
    """A frame's expected adjustment cost, for ordering the frame tasks: the cross-validation of the candidate
    surfaces dominates it and grows with the stations in the frame (every candidate on every fold), the dense
    evaluation with its pixels. Stations inside the frame's bounding box stand for the ones used."""
    lon = stations["lon"].to_numpy(float)
    lat = stations["lat"].to_numpy(float)
    crs = frame.rio.crs
    if crs is not None and not crs.is_geographic:  # a projected frame (e.g. UTM): stations into its CRS
        from pyproj import Transformer

        lon, lat = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    x, y = np.asarray(frame["x"].values, float), np.asarray(frame["y"].values, float)
    inside = ((lon >= x.min()) & (lon <= x.max()) & (lat >= y.min()) & (lat <= y.max()))
    n = int(np.count_nonzero(inside))
    return float(n * n) + frame.sizes["y"] * frame.sizes["x"] * 1e-4


def _run_stages(frames_dir, gnss_path, holdout_path, horizontal_grids, grids_frame, out: Path, cfg: GiaConfig,
                checksums: dict[str, str] | None = None, roles: dict | None = None):
    import xarray as xr

    from .analysis.subsidence import subsidence_summary
    from .analysis.validation import validate_against_gnss
    from .geodesy import horizontal as hz
    from .io.frames import list_frames, open_frame
    from .mosaic import decompose_up_east, merge_frames, overlap_pairs, resample_footprint, sample_overlap, target_grid
    from .network import GnssTies, NetworkSolution, OverlapSamples, SplineBasis, frame_misfit_sigmas, solve_network

    # 1. inputs ------------------------------------------------------------------------------------------------
    with stage("read inputs", log):
        folders = list_frames(frames_dir)
        if not folders:
            raise InputError("No frame folders found.", file=frames_dir, field="--frames",
                             fix="give a folder holding one sub-folder per frame (LiCSAR/LiCSBAS or MintPy)")
        # the DEM serves only the per-frame models: dropped after them
        frames = [_apply_mask(open_frame(f)) for f in progress(folders, "reading frames")]
        ids = [f.attrs["frame_id"] for f in frames]
        grids = None
        if horizontal_grids is not None:
            grids = hz.load_horizontal_grids(*horizontal_grids, reference_frame=grids_frame)
        if gnss_path is not None:
            stations = _read_stations(gnss_path, cfg)
        else:
            stations = _pseudo_stations_from_grids(grids, frames)
        if gnss_path is not None:
            _require_stations_in_frames(stations, frames, gnss_path)
        horizontal_only = bool(cfg.gnss.horizontal_only or not np.isfinite(stations["vu"].to_numpy(float)).any())
        stations_itrf = _stations_itrf(stations, cfg)
        holdout_itrf = (_stations_itrf(_read_stations(holdout_path, cfg, training=False), cfg)
                        if holdout_path else None)
    log.info("%d frames, %d GNSS stations%s", len(frames), len(stations),
             " (horizontal-only referencing)" if horizontal_only else "")

    # 2. horizontal field (ITRF) on every frame ---------------------------------------------------------------
    with stage("horizontal field", log):
        hfields = []
        field_info: dict[str, Any] = {}
        if grids is not None:
            for fr in frames:
                hf = hz.sample_horizontal_grids(grids, fr, to_itrf=True, model=cfg.gnss.plate_model)
                hf["se"] = xr.full_like(hf["ve"], 1.0)
                hf["sn"] = xr.full_like(hf["vn"], 1.0)
                hfields.append(hf)
            field_info = {"source": "grids", "reference_frame": grids.attrs.get("reference_frame")}
        else:
            fld = hz.HorizontalVelocityField(plate=cfg.gnss.plate_for(),
                                             model=cfg.gnss.plate_model).fit(stations_itrf)
            hfields = fld.predict_grids(frames)
            field_info = {"source": "gnss", "loo_rmse_mm_yr": getattr(fld, "loo_rmse_", None),
                          "loo_rmse_e_mm_yr": getattr(fld, "loo_rmse_e_", None)}

    # 3. per-frame adjustment ---------------------------------------------------------------------------------
    adj_cfg = cfg.adjust.model_copy(update={"use_horizontal_only": horizontal_only or cfg.adjust.use_horizontal_only})
    adjustments = []
    with stage("per-frame adjustment", log):
        work = out / "work"
        work.mkdir(exist_ok=True)
        keys = [_frame_key(folder, checksums or {}, cfg, roles) for folder in folders]
        adjustments = [_load_adjustment(work, fr.attrs["frame_id"], key) for fr, key in zip(frames, keys)]
        n_cached = sum(a is not None for a in adjustments)  # finished in an earlier, interrupted run
        todo = [k for k, a in enumerate(adjustments) if a is None]

        def finished(j: int, adj) -> None:  # persist each frame as soon as it is done (resume, Dask faults)
            k = todo[j]
            if adj is not None:
                _save_adjustment(work, frames[k].attrs["frame_id"], keys[k], adj)
            adjustments[k] = adj
            # the frame's working arrays, freed on a fragmented heap
            backend.trim_host_memory(full_collection=False)

        pc = cfg.parallel
        client = None
        kind, n_workers = (_frame_cluster(pc, [frames[k] for k in todo], backend.get_backend())
                           if not pc.scheduler else ("cpu", 0))
        on_cluster = bool(todo) and bool(pc.scheduler or n_workers > 0)
        # the DEM is kept only for the frames adjusted here (a cluster's workers read their frames themselves)
        adjusted_here = set() if on_cluster else set(todo)
        frames = [fr if k in adjusted_here else fr.drop_vars("dem", errors="ignore")
                  for k, fr in enumerate(frames)]
        if on_cluster:
            from .parallel import get_client

            client = get_client(pc.scheduler, n_workers=n_workers or None, memory_limit=pc.worker_memory,
                                gpu=kind == "cuda")
            from .parallel import log_like_this_process

            log_like_this_process(client)
        try:
            from .parallel import map_frames

            costs = [_adjust_cost(frames[k], stations_itrf) for k in todo] if client is not None else None
            # in this process the frames as read above; on a cluster their folders, each read by its worker
            # (a list held only during the call: the frames' DEMs are freed below). The backend by name: a Dask
            # worker is another process, with its own (default NumPy) selection
            map_frames(_adjust_one, [frames[k] if client is None else folders[k].resolve() for k in todo],
                       client=client,
                       on_result=finished, costs=costs, stations=stations_itrf, config=adj_cfg,
                       holdout=holdout_itrf, backend_name=backend.get_backend())
        finally:
            # an existing scheduler's cluster stays up, but this run's connection to it ends here: left open it
            # would stay the process's default Dask client, and later work (the time-series cubes, a caller's
            # own) would go to that cluster
            if client is not None:
                client.close()
                if not pc.scheduler:
                    client.cluster.close()
        # the DEM served only the per-frame models: 4 bytes a pixel that no later stage reads
        frames = [fr.drop_vars("dem", errors="ignore") for fr in frames]
        if n_cached:
            log.info("resumed: %d of %d frame adjustments reused from %s", n_cached, len(frames), work)

    # vertical-equivalent velocity of every adjusted frame. Per-frame rasters are kept in float32, as the frames
    # and the adjustments store them (sums and solves are float64): at 100 m the frames of a plain hold ~10^8
    # pixels, and every float64 copy of them costs a GB
    with stage("vertical equivalent", log):
        verts, vstds_noise, los_adj = [], [], []
        for fr, adj, hf in zip(frames, adjustments, hfields):
            # own copies: the network corrections are applied to them in place
            if adj is None:
                la = np.array(backend.to_numpy(fr["los_velocity"].data), np.float32)
                cs = np.zeros_like(la)
            else:
                la = np.array(backend.to_numpy(adj.los_adjusted.data), np.float32)
                cs = np.asarray(backend.to_numpy(adj.correction_std.data), np.float32)
            # overlaps see pixel noise and the correction's formal sigma; the long-wavelength error the chosen
            # model left (its CV RMSE) is what the network estimates, so it weighs only the merge of the frames
            sigma = _noise_sigma(backend.to_numpy(fr["los_std"].data) if "los_std" in fr else None, cs, la.shape)
            v, s_noise = frame_vertical_equivalent(fr, la, sigma, hf)
            verts.append(v), vstds_noise.append(s_noise), los_adj.append(la)
        # the product sigma is in the noise sigmas now and the mask in the NaNs of los_velocity: 5 bytes a pixel
        # (0.6 GB for a plain at 100 m) that no later stage reads
        frames = [fr.drop_vars(["los_std", "mask"], errors="ignore") for fr in frames]

    # 4. network adjustment over overlaps + GNSS ties ---------------------------------------------------------
    with stage("network adjustment", log):
        grid = target_grid(frames, resolution=cfg.mosaic.resolution, crs=cfg.mosaic.crs, bounds=cfg.mosaic.bounds)
        # each frame on the part of the grid it covers (frames × whole grid does not fit in memory at 100 m)
        on_grid = [resample_footprint(_frame_da(fr, v, "vertical"), grid, resampling="bilinear")
                   for fr, v in zip(frames, verts)]
        std_on_grid = [resample_footprint(_frame_da(fr, s, "vertical_std"), grid, resampling="bilinear",
                                          kind="std", window=o.window)
                       for fr, s, o in zip(frames, vstds_noise, on_grid)]
        pairs = overlap_pairs(on_grid, grid, min_pixels=cfg.network.min_overlap_pixels)
        overlaps = []
        rng = np.random.default_rng(0)
        max_rate = cfg.network.max_rate_mm_yr
        tied = []  # every tied pair (its whole overlap), for the all-pixel figures after the solve
        fast_ground = []  # pairs whose overlap is too fast everywhere: compared on all their pixels
        for p in pairs:
            kind = _pair_kind(frames[p.i], frames[p.j])
            if kind == "asc-desc" and cfg.network.pairs == "same-orbit":
                continue
            a, b = on_grid[p.i].crop(p.window), on_grid[p.j].crop(p.window)
            use, on_fast_ground = _slow_ground(p.mask, a, b, max_rate, cfg.network.min_overlap_pixels)
            smp = sample_overlap(a, b, use, grid=grid, window=p.window, rng=rng,
                                 a_std=std_on_grid[p.i].crop(p.window), b_std=std_on_grid[p.j].crop(p.window),
                                 max_samples=cfg.network.max_samples_per_overlap)
            if smp.diff.size == 0:
                continue
            xi, yi = _frame_km(frames[p.i], smp.lon, smp.lat)
            xj, yj = _frame_km(frames[p.j], smp.lon, smp.lat)
            sig = smp.diff_std if smp.diff_std is not None else np.full(smp.diff.size, 2.0)
            overlaps.append(OverlapSamples(p.i, p.j, xi, yi, xj, yj, smp.diff, np.nan_to_num(sig, nan=2.0),
                                           area_km2=p.area_km2, kind=kind))
            tied.append(p)
            if on_fast_ground:
                fast_ground.append(f"{ids[p.i]}/{ids[p.j]}")
        if fast_ground:
            log.info("%d overlap(s) have fewer than %d pixels below %g mm/yr and are compared on all their "
                     "pixels: %s", len(fast_ground), cfg.network.min_overlap_pixels, max_rate,
                     ", ".join(fast_ground))
        ties = []
        vert_ok = np.isfinite(stations_itrf["vu"].to_numpy(float))
        for k, fr in enumerate(frames):
            st = stations_itrf[vert_ok] if not horizontal_only else stations_itrf
            if len(st) == 0:
                continue
            val = _sample_at_stations(fr, verts[k], st)
            vu = st["vu"].to_numpy(float) if not horizontal_only else np.zeros(len(st))
            # horizontal-only: the ties only state "no long-wavelength vertical motion"; dense pseudo-stations
            # sampled from a field are not independent observations, so they tie loosely and let the overlaps
            # decide the relative corrections
            su = st["su"].to_numpy(float) if not horizontal_only else np.full(len(st), 10.0)
            flagged = set()
            if adjustments[k] is not None:
                flagged = {f["station"] for f in adjustments[k].report.get("flagged", []) or []}
            ok = np.isfinite(val) & ~st["station"].isin(flagged).to_numpy()
            if not ok.any():
                continue
            xs, ys = _frame_km(fr, st["lon"].to_numpy(float)[ok], st["lat"].to_numpy(float)[ok])
            ties.append(GnssTies(k, xs, ys, val[ok] - vu[ok], np.nan_to_num(su[ok], nan=3.0) + 0.5,
                                 st["station"].to_numpy()[ok].tolist()))
        nc = cfg.network
        prior = np.full(len(frames), nc.prior_sigma_mm_yr)
        if nc.prior_from_cv:
            for k, adj in enumerate(adjustments):
                cv = _cv_rmse(adj)
                if cv > 0:
                    # the frame's correction is uncertain to about its CV RMSE, in vertical (÷ u ≈ 0.78)
                    prior[k] = max(cv / 0.78, 0.5)
        misfit = np.full(len(frames), np.nan)
        net_poly = None
        if not nc.enabled:
            net = NetworkSolution.zeros(len(frames), nc.order)
        else:
            solve = functools.partial(solve_network, len(frames), overlaps, ties, order=nc.order,
                                      correlation_km=nc.correlation_km, sigma_floor_mm_yr=nc.sigma_floor_mm_yr,
                                      prior_sigma_mm_yr=prior, huber_k=nc.huber_k)
            net = solve()
            # each frame's misfit beyond the polynomial, from the overlap residuals of that solution
            misfit = frame_misfit_sigmas(len(frames), net.pairs)
            if nc.spline_spacing_km > 0 and np.isfinite(misfit).any():
                net_poly = net
                splines = [None if not np.isfinite(misfit[k]) else
                           SplineBasis.covering(*_frame_km_valid(fr, verts[k]), nc.spline_spacing_km)
                           for k, fr in enumerate(frames)]
                net = solve(splines=splines, spline_sigma_mm_yr=np.where(np.isfinite(misfit),
                                                                         np.maximum(misfit, 0.5), 1.0),
                            robust_weights=net_poly.robust_weights)

    with stage("network corrections", log):
        # a frame with no usable GNSS station and no overlap with a GNSS-tied frame cannot be referenced at all
        lost = [ids[k] for k in range(len(frames))
                if adjustments[k] is None and net.held_by[k] in ("prior", "disabled")]
        if lost:
            raise AdjustmentError(f"{len(lost)} frame(s) have no usable GNSS station and no overlap with a frame "
                                  f"that has: {', '.join(lost)}.", file=frames_dir, field="frames",
                                  fix="add GNSS stations inside these frames or frames that connect them to GNSS, "
                                      "or remove them from --frames")

        # apply the network corrections: vertical-equivalent and LOS (LOS correction = u × vertical
        # correction). Merge sigma: the noise plus the error the formal sigma does not see — the chosen model's CV
        # RMSE (LOS, so its variance divides by u²) and, with misfit weights, the frame's misfit with its
        # neighbours (before the spline bent it toward them), the larger of the two
        use_misfit = nc.enabled and nc.misfit_weights
        final_corr, vstds = [], []
        for k, fr in enumerate(frames):
            # by blocks of rows: the float64 work (coordinates, correction surface) stays a block's worth
            ny, nx = verts[k].shape
            u_all = np.asarray(backend.to_numpy(fr["los_u"].data))
            ml_all = (None if adjustments[k] is None
                      else np.asarray(backend.to_numpy(adjustments[k].correction.data)))
            fc, vs = np.empty((ny, nx), np.float32), np.empty((ny, nx), np.float32)
            cv = _cv_rmse(adjustments[k])
            for rs in _row_blocks(ny, nx, _ROW_BLOCK_PIXELS):
                xk, yk = _frame_km_rows(fr, rs.start, rs.stop)
                if yk.ndim == 2 and yk.strides[1] == 0:  # geographic rows: one y per row (a broadcast view)
                    c_vert = net.correction_rows(k, xk, yk[:, 0])
                else:
                    c_vert = net.correction(k, xk.ravel(), yk.ravel()).reshape(xk.shape)
                _apply_network_block(verts[k][rs], los_adj[k][rs], c_vert, u_all[rs],
                                     None if ml_all is None else ml_all[rs], vstds_noise[k][rs], cv,
                                     misfit[k] ** 2 if use_misfit and np.isfinite(misfit[k]) else None,
                                     fc[rs], vs[rs])
            final_corr.append(fc)
            vstds.append(vs)
        for k, (p_stat, p) in enumerate(zip(net.pairs, overlaps)):
            p_stat["frames"] = [ids[p.i], ids[p.j]]
            if net_poly is not None:
                p_stat["rms_after_polynomial"] = net_poly.pairs[k]["rms_after"]
            if nc.enabled:
                # the network's figures are over the samples it used (slow ground only with max_rate_mm_yr);
                # these are over the whole overlap, fast ground included
                w = tied[k].window
                smp = sample_overlap(on_grid[p.i].crop(w), on_grid[p.j].crop(w), tied[k].mask, grid=grid,
                                     window=w, rng=0, max_samples=100_000)
                if smp.diff.size:
                    ci = net.correction(p.i, *_frame_km(frames[p.i], smp.lon, smp.lat))
                    cj = net.correction(p.j, *_frame_km(frames[p.j], smp.lon, smp.lat))
                    p_stat["rms_all_pixels_before"] = float(np.sqrt(np.mean(smp.diff ** 2)))
                    p_stat["rms_all_pixels_after"] = float(np.sqrt(np.mean((smp.diff - ci + cj) ** 2)))
    # free what only the network needed before the mosaic (at 100 m each of these is a GB or more): the
    # footprints, the noise sigmas, the per-frame models' rasters (their corrections are in final_corr now) and
    # the horizontal field's sigmas (later stages use its mean only)
    del on_grid, std_on_grid, pairs, tied, vstds_noise
    adjustments = [None if a is None else _CachedAdjustment(None, None, None, a.report, a.residuals)
                   for a in adjustments]
    hfields = [hf.drop_vars(["se", "sn"], errors="ignore") for hf in hfields]

    # 5. mosaic and decomposition -----------------------------------------------------------------------------
    with stage("mosaic", log):
        groups: dict[str, list[int]] = {}
        for k, fr in enumerate(frames):
            groups.setdefault(fr.attrs.get("orbit", "unknown"), []).append(k)
        vert_das = [_frame_da(fr, v, "vertical") for fr, v in zip(frames, verts)]
        vstd_das = [_frame_da(fr, s, "vertical_std") for fr, s in zip(frames, vstds)]
        # the frames' edge ramps (distance transforms of their valid-data masks), computed for the vertical
        # mosaic and taken again by the per-orbit LOS merges where the masks are the same
        decompose = len(groups) >= 2 and cfg.mosaic.decompose_up_east
        ramps: dict = {}
        vert_merge = merge_frames(vert_das, vstd_das, grid, feather_km=cfg.mosaic.feather_km,
                                  tile_size=cfg.mosaic.tile_size, ramp_cache=ramps if decompose else None)
        # grid products in float32 (as written); the merge and the decomposition compute in float64
        vertical = np.asarray(backend.to_numpy(vert_merge.value), np.float32)
        vertical_std = np.asarray(backend.to_numpy(vert_merge.std), np.float32)
        del vert_merge, vert_das, vstd_das
        east = np.full(grid.shape, np.nan, np.float32)
        east_std = np.full(grid.shape, np.nan, np.float32)
        decomposition = {"mode": "vertical-equivalent"}
        if decompose:
            stacks: dict[str, list] = {"los": [], "std": [], "e": [], "n": [], "u": []}
            for orbit, members in sorted(groups.items()):
                los_das = [_frame_da(frames[k], los_adj[k], "los") for k in members]
                # float32 product: exactly the float64 one rounded (a product of two float32 fits in a float64)
                lstd = [_frame_da(frames[k], vstds[k] * np.asarray(frames[k]["los_u"].values, np.float32),
                                  "los_std") for k in members]
                # unit vectors merged with the LOS weights (merge_frames masks them with the LOS's valid pixels),
                # so that the merged LOS is exactly the merged unit vector times the motion
                comps = [[frames[k][var].values for var in ("los_e", "los_n", "los_u")] for k in members]
                m = merge_frames(los_das, lstd, grid, feather_km=cfg.mosaic.feather_km, tile_size=cfg.mosaic.tile_size,
                                 extra=comps, ramp_cache=ramps)
                # float32 as merged; the decomposition computes in float64 block by block
                stacks["los"].append(np.asarray(backend.to_numpy(m.value), np.float32))
                stacks["std"].append(np.asarray(backend.to_numpy(m.std), np.float32))
                for comp, merged in zip(("e", "n", "u"), m.extra):
                    stacks[comp].append(np.asarray(backend.to_numpy(merged), np.float32))
                del m, los_das, lstd, comps
            ramps.clear()  # the ramps of masks that differ between the vertical and the LOS (none usually)
            # north from the GNSS horizontal field, on the grid
            # (evaluated on the grid itself, as for the frames: cheaper and more exact than warping every
            # frame's field onto it)
            # (float32 as evaluated; the decomposition takes them to float64 block by block)
            if grids is not None:
                hg = hz.sample_horizontal_grids(grids, grid.to_dataset(), to_itrf=True, model=cfg.gnss.plate_model)
                hgrid = {c: np.asarray(hg[c].values, np.float32) for c in ("ve", "vn")}
                hgrid["se"] = hgrid["sn"] = np.ones(grid.shape, np.float32)
            else:
                hg = fld.predict_grid(grid.to_dataset())
                hgrid = {c: np.asarray(hg[c].values, np.float32) for c in ("ve", "vn", "se", "sn")}
            del hg
            # the field's sigma is its formal GP sigma; where it is smooth between stations it misses local
            # motion (inward motion at bowls) that its leave-one-out RMSE does see
            loo_e = float(field_info.get("loo_rmse_e_mm_yr") or field_info.get("loo_rmse_mm_yr") or 1.0)
            # per pixel, so by blocks of rows: the decomposition's float64 temporaries (some 40 per pixel) stay a
            # block's worth instead of the whole grid's
            n_ill, n_use = 0, 0
            for rs in _row_blocks(grid.height, grid.width, _DECOMPOSE_BLOCK_PIXELS):
                ue = decompose_up_east(*(np.stack([a[rs] for a in stacks[c]]) for c in ("los", "std", "e", "n", "u")),
                                       np.nan_to_num(hgrid["vn"][rs]), np.nan_to_num(hgrid["sn"][rs]),
                                       ve=np.nan_to_num(hgrid["ve"][rs]),
                                       se=np.sqrt(np.square(np.nan_to_num(hgrid["se"][rs], nan=1.0),
                                                            dtype=np.float64) + loo_e ** 2),
                                       east_prior=cfg.mosaic.east_prior, warn=False)
                use = np.asarray(backend.to_numpy(ue.method)) == 2  # two or more geometries solved (not the fall-back)
                vertical[rs] = np.where(use, np.asarray(backend.to_numpy(ue.up), np.float32), vertical[rs])
                vertical_std[rs] = np.where(use, np.asarray(backend.to_numpy(ue.up_std), np.float32), vertical_std[rs])
                east[rs] = np.where(use, np.asarray(backend.to_numpy(ue.east), np.float32), np.float32(np.nan))
                east_std[rs] = np.where(use, np.asarray(backend.to_numpy(ue.east_std), np.float32),
                                        np.float32(np.nan))
                n_ill += int(ue.n_ill_conditioned)
                n_use += int(use.sum())
                del ue
            if n_ill:
                log.warning("up/east: %d pixel(s) with two or more geometries are ill-conditioned; east left "
                            "undetermined there (vertical-equivalent kept)", n_ill)
            decomposition = {"mode": "up+east where ascending and descending overlap, vertical-equivalent elsewhere",
                             "up_east_pixels": n_use, "n_ill_conditioned": n_ill}
            del stacks, hgrid

    # baseline in the same run
    with stage("baseline", log):
        tables = [None if a is None else _residual_xy_table(a) for a in adjustments]

        def vert_of(i, corr):
            raw = np.asarray(backend.to_numpy(frames[i]["los_velocity"].data), np.float64) - corr
            return frame_vertical_equivalent(frames[i], raw, np.full(raw.shape, 2.0), hfields[i])[0]

        baseline = plane_average_baseline(frames, tables, vert_of, grid)

    # 6. analysis and validation ------------------------------------------------------------------------------
    ys, xs = grid.coords()

    def grid_da(values, name, units="mm/yr"):
        da = xr.DataArray(np.asarray(values, np.float32), dims=("y", "x"), coords={"y": ys, "x": xs}, name=name,
                          attrs={"units": units})
        return da.rio.write_crs(grid.crs, inplace=True).rio.write_transform(grid.transform, inplace=True)

    v_da = grid_da(vertical, "vertical_velocity")
    ts = None
    cube_paths = [_find_cube(f) for f in folders]
    if cfg.timeseries.enabled and any(p is not None for p in cube_paths):
        with stage("time series", log):
            ts = timeseries_stage(frames, cube_paths, final_corr, hfields, verts, grid, cfg, vertical=vertical,
                                  work_dir=out / "work")
    with stage("analysis", log):
        summary: dict[str, Any] = subsidence_summary(v_da, threshold_mm_yr=cfg.analysis.subsidence_threshold_mm_yr,
                                                     stations=stations)
        summary["mode"] = "horizontal_only" if horizontal_only else "3d_gnss"
        summary["horizontal_field"] = field_info
        summary["decomposition"] = decomposition
        summary["frames"] = {}
        for k, fr in enumerate(frames):
            rep = _frame_summary(adjustments[k].report) if adjustments[k] is not None else {
                "selected_model": None, "note": "no usable GNSS station: held by the network adjustment only"}
            rep["network_held_by"] = net.held_by[k]
            rep["network_params"] = net.params[k].tolist()
            if np.isfinite(misfit[k]):
                rep["overlap_misfit_mm_yr"] = float(misfit[k])
            if net.splines is not None and net.splines[k] is not None:
                rep["network_spline_rms_mm_yr"] = net.spline_rms(k)
            rep["orbit"] = fr.attrs.get("orbit")
            summary["frames"][ids[k]] = rep
        summary["network"] = net.summary()
        overall = _overlap_rms(net.pairs)
        for when in ("before", "after"):
            if f"rms_all_pixels_{when}_mm_yr" in overall:
                summary["network"][f"overlap_rms_all_pixels_{when}_mm_yr"] = overall[f"rms_all_pixels_{when}_mm_yr"]
        summary["network"]["overlap_rms_by_kind"] = _overlap_rms_by_kind(net.pairs)
        summary["network"]["pairs_compared_on_fast_ground"] = fast_ground
        if net_poly is not None:
            summary["network"]["overlap_rms_after_polynomial_mm_yr"] = \
                net_poly.summary()["overlap_rms_after_mm_yr"]
        if ts is not None:
            summary.update(ts["summary"])
        if holdout_itrf is not None:
            vu_ok = np.isfinite(holdout_itrf["vu"].to_numpy(float))
            summary["validation"] = validate_against_gnss(v_da, holdout_itrf[vu_ok])
            summary["baseline"] = {"method": "weighted plane per frame + plain average",
                                   "validation": validate_against_gnss(grid_da(baseline, "baseline"),
                                                                       holdout_itrf[vu_ok])}

    # 7. products ---------------------------------------------------------------------------------------------
    with stage("write products", log):
        velocity = {"vertical_velocity": v_da,
                    "vertical_velocity_std": grid_da(vertical_std, "vertical_velocity_std")}
        if np.isfinite(east).any():
            velocity.update(east_velocity=grid_da(east, "east_velocity"),
                            east_velocity_std=grid_da(east_std, "east_velocity_std"))
        per_frame = {ids[k]: {"correction": _frame_da(fr, final_corr[k], "correction"),
                              "los_adjusted": _frame_da(fr, los_adj[k], "los_adjusted")}
                     for k, fr in enumerate(frames)}
        write_products(out, cfg.output, velocity, per_frame, ts)
    return RunResult(summary=summary, out_dir=out, vertical_velocity=v_da, cumulative=None if ts is None else
                     ts["cumulative"],
                     vertical_velocity_std=grid_da(vertical_std, "vertical_velocity_std"),
                     east_velocity=grid_da(east, "east_velocity"), frames=ids)


#: products a run may or may not write, by name in the output folder (besides frames/*.tif)
_OPTIONAL_PRODUCTS = ("east_velocity.tif", "east_velocity_std.tif", "velocity.nc", "vertical_displacement.nc",
                      "vertical_displacement.zarr", "annual_vertical_velocity.nc",
                      "cumulative_vertical_displacement.tif")


def write_products(out: Path, output, velocity: dict, per_frame: dict, ts: dict | None = None) -> list[Path]:
    """Write a run's products into ``out`` as ``output`` (:class:`config.OutputConfig`) asks; returns the paths.

    ``velocity``: grid DataArrays by product name (``vertical_velocity``, ``vertical_velocity_std`` and, where
    look directions cross, ``east_velocity``/``east_velocity_std``), each written as ``<name>.tif`` and, with
    ``output.netcdf``, together as ``velocity.nc``. ``per_frame``: ``{frame_id: {"correction": da,
    "los_adjusted": da}}``, written as ``frames/<id>.<kind>.tif``. ``ts`` (a time-series run): its cube as
    ``vertical_displacement.nc`` (and ``vertical_displacement.zarr`` with ``output.zarr``), its annual rates as
    ``annual_vertical_velocity.nc`` and the cumulative displacement as ``cumulative_vertical_displacement.tif``.
    GeoTIFFs are COGs unless ``output.cog`` is false; ``output.compress_level`` sets the DEFLATE/zlib level.
    Products of an earlier run in ``out`` that this run does not write (the optional ones above, per-frame
    rasters of other frames) are removed first.
    """
    from .io.write import write_cog, write_netcdf, write_zarr

    tif = functools.partial(write_cog, cog=output.cog, level=output.compress_level)
    nc = functools.partial(write_netcdf, complevel=output.compress_level)
    plan = {f"{name}.tif": (tif, da) for name, da in velocity.items()}  # path in out: (writer, what)
    if output.netcdf:
        import xarray as xr

        plan["velocity.nc"] = (nc, xr.Dataset(velocity))
    plan.update({f"frames/{fid}.{kind}.tif": (tif, da) for fid, rasters in per_frame.items()
                 for kind, da in rasters.items()})
    if ts is not None:
        cube = ts["cube"].to_dataset(name="vertical_displacement")
        plan["vertical_displacement.nc"] = (nc, cube)
        if output.zarr:
            plan["vertical_displacement.zarr"] = (write_zarr, cube)
        plan["annual_vertical_velocity.nc"] = (nc, ts["annual"])
        plan["cumulative_vertical_displacement.tif"] = (tif, ts["cumulative"])
    # products of an earlier run in this folder that this run does not write would pass for its own (other
    # settings, no east component, no time series, other frames): removed first
    for path in [out / n for n in _OPTIONAL_PRODUCTS] + sorted((out / "frames").glob("*.tif")):
        if path.exists() and path.relative_to(out).as_posix() not in plan:
            log.info("removing %s: a product of an earlier run that this run does not write", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / "frames").mkdir(exist_ok=True)
    return [write(what, out / name) for name, (write, what) in plan.items()]


def _frame_summary(report: dict) -> dict:
    """A frame's adjustment report with the summary.json keys in front (the full report is kept under them)."""
    cands = report.get("candidates") or {}
    chosen = report.get("chosen")
    cv = cands.get(chosen, {}) if isinstance(cands, dict) else {}
    training = report.get("training") or {}
    holdout = report.get("holdout") or {}
    out = {"selected_model": chosen, "selection_reason": report.get("reason"),
           "cv_rmse_mm_yr": cv.get("rmse") if isinstance(cv, dict) else None,
           "n_gnss": report.get("n_stations_used"),
           "rmse_before_mm_yr": training.get("rmse_before"), "rmse_after_mm_yr": training.get("rmse_after"),
           "holdout_rmse_before_mm_yr": holdout.get("rmse_before"),
           "holdout_rmse_after_mm_yr": holdout.get("rmse_after"),
           "flagged_stations": [f.get("station") for f in report.get("flagged") or []]}
    out.update(report)
    return out


def _find_cube(folder: Path) -> Path | None:
    """The displacement cube of a frame folder (LiCSBAS cum.h5 or MintPy timeseries.h5), if any."""
    for name in ("cum.h5", "cum_filt.h5", "timeseries.h5", "geo_timeseries.h5"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


#: Bytes of float32 displacement in one block of the stored vertical cube (all epochs of a tile of pixels). The
#: per-pixel temporal fits hold a few float64 copies of one block per thread, so this bounds their memory, and
#: the tile shrinks as the epochs grow: the time-series stage's peak memory does not depend on the epoch count.
_TS_BLOCK_BYTES = 8 * 2**20
#: Bytes of one frame's cube read per call while streaming its epochs (a few epochs at a time).
_READ_AHEAD_BYTES = 8 * 2**20
#: Bytes of merged epochs held before they are written to the store together (at most ``_TS_MAX_EPOCHS_PER_CHUNK``
#: epochs, at least one): each stored chunk then holds several epochs of a tile, so the blocks of all epochs are
#: read in a few pieces, not one per epoch. Independent of the number of epochs, like the rest of the stage.
_TS_BUFFER_BYTES = 256 * 2**20
_TS_MAX_EPOCHS_PER_CHUNK = 8
#: At most this many chunks per shard file of the store (Zarr 3): a shard's index (16 bytes a chunk) is read with
#: every chunk taken from it, so it stays small; a shard is written whole, once, from the buffered epochs.
_TS_CHUNKS_PER_SHARD = 1024


def timeseries_stage(frames, cube_paths, final_corr, hfields, verts, grid, cfg: GiaConfig, *,
                     vertical=None, work_dir) -> dict:
    """Adjust every frame's displacement cube, mosaic it per epoch in vertical, and derive the time-series figures.

    Per frame: pixels the velocity masks (processor mask, unwrapping errors) are blanked in the cube too; the LOS
    velocity correction (per-frame model + network, mm/yr) is applied as a term linear in time referenced to the
    first epoch; optionally a per-epoch plane is removed, fitted on far-field pixels (|vertical rate| below
    ``far_field_max_rate_mm_yr``) to the departure of the cube from the adjusted linear LOS model, so that the
    planes take out per-epoch atmosphere/orbit ramps but never the GNSS-tied trend nor the horizontal (plate)
    motion that the far field shows in LOS; the horizontal motion (GNSS field, linear in time) is removed and the
    result divided by the up component. Epochs of all frames are brought to one time axis (the first frame's
    dates within the common span, linear interpolation in time), resampled to the target grid and merged with
    equal weights. With ``vertical`` (the run's vertical velocity on ``grid``, mm/yr), the per-pixel linear trend
    of the merged cube is replaced by it, so that the cube, its annual rates and cumulative displacement agree
    with the vertical velocity map (up+east decomposed where look directions cross, where the vertical-equivalent
    cube still holds the east motion); only the departure from linear motion comes from the cube itself.

    The work streams: frames' cubes are read one epoch at a time, the merged epochs are written to the Zarr store
    ``work_dir/vertical_displacement.zarr`` a few at a time (``_TS_BUFFER_BYTES``; in Zarr 3 shards, so
    that its files grow with the epochs, not with their square) while the sums of the per-pixel trend are
    accumulated, and the returned ``cube`` is that store opened lazily (Dask; blocks of all epochs × a tile of
    pixels of about ``_TS_BLOCK_BYTES``) with the trend correction added lazily: ``work_dir`` must outlive the
    returned cube, so the caller owns it. Host memory is a few (y, x) maps per frame and per grid, whatever the
    number of epochs.
    """
    from .analysis.groundwater import groundwater_loss
    from .analysis.subsidence import annual_subsidence
    from .errors import TimeSeriesError
    from .io.timeseries import open_cube
    from .mosaic import MergePlan
    from .timeseries import cumulative_displacement, fit_annual_velocities

    readers = []
    cubes = {}
    for k, p in enumerate(cube_paths):
        if p is None:
            continue
        # one epoch per Dask chunk: the epoch loop below reads exactly one slab of the file at a time
        cube = open_cube(p, chunks={"time": 1, "y": -1, "x": -1})
        fr = frames[k]
        if cube.sizes["y"] != fr.sizes["y"] or cube.sizes["x"] != fr.sizes["x"] or not (
                np.allclose(cube["x"].values, fr["x"].values, atol=1e-6) and
                np.allclose(cube["y"].values, fr["y"].values, atol=1e-6)):
            raise TimeSeriesError("The displacement cube is not on the grid of its frame's velocity.", file=p,
                                  field="grid", fix="resample the cube (or the velocity) so both share one grid")
        cubes[k] = cube
    starts = max(c["time"].values[0] for c in cubes.values())
    ends = min(c["time"].values[-1] for c in cubes.values())
    if starts >= ends:
        raise TimeSeriesError("The frames' time series do not overlap in time.", field="time",
                              fix="give cubes covering a common period")
    first = cubes[min(cubes)]
    times = first["time"].values[(first["time"].values >= starts) & (first["time"].values <= ends)]
    for k, cube in cubes.items():
        fr = frames[k]
        # adjusted LOS velocity; NaN where the frame's mask blanked it (unwrapping errors, decorrelation): the
        # cube carries the same errors there (tens of mm/yr), so those pixels are blanked in the cube as well
        los_adj = np.asarray(backend.to_numpy(fr["los_velocity"].data), np.float64) - np.asarray(final_corr[k])
        usable = np.isfinite(los_adj)
        far = None
        if cfg.timeseries.epoch_ramps:
            far = usable & np.isfinite(verts[k]) & (np.abs(verts[k]) < cfg.timeseries.far_field_max_rate_mm_yr)
            far = far if far.sum() >= 50 else None
        readers.append(_FrameEpochs(k, fr, cube, final_corr[k], los_adj, hfields[k], far, times))

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "vertical_displacement.zarr"
    ys, xs = grid.coords()
    tile = _ts_tile(times.size, grid.shape, cfg.timeseries.chunk_pixels)
    n_buf = _ts_epochs_per_chunk(times.size, grid.shape)
    epochs_out = _create_epoch_store(store, times, ys, xs, tile, n_buf)
    buffer = np.empty((n_buf, *grid.shape), np.float32)
    t_yr = (times - times[0]) / np.timedelta64(1, "D") / 365.25
    sums = _TrendSums(grid.shape)
    # mosaic epoch by epoch (host memory: one epoch of every frame at a time), equal weights. The frames'
    # footprints, edge ramps and warped weights are derived once (from the first epoch) and reused: the same as
    # merge_frames on every epoch, bitwise, for a third of the warping and no distance transform per epoch
    plan = None
    for i in range(times.size):
        epoch_frames = [r.vertical(i) for r in readers]
        if plan is None:
            plan = MergePlan([r.da(v, "d") for r, v in zip(readers, epoch_frames)],
                             [r.da(np.ones(v.shape, np.float32), "d_std") for r, v in zip(readers, epoch_frames)],
                             grid, feather_km=cfg.mosaic.feather_km, tile_size=cfg.mosaic.tile_size)
        m = plan.merge(epoch_frames)
        epoch = buffer[i % n_buf]
        epoch[...] = backend.to_numpy(m.value)
        if vertical is not None:
            sums.add(t_yr[i], epoch)
        if i % n_buf == n_buf - 1 or i == times.size - 1:  # whole chunks (and shards), each written once
            first = i - i % n_buf
            epochs_out[first:i + 1] = buffer[:i + 1 - first]
    log.info("time series: %d epochs of %d frame(s) merged into %s (chunks of %d epochs x %d x %d pixels)",
             times.size, len(readers), store, n_buf, *tile)
    fix = sums.correction(np.asarray(vertical, np.float64)) if vertical is not None else None
    # the frames' epoch caches, the merge plan and the epoch buffer: not needed by the fits below
    del readers, plan, sums, buffer
    # the same cube twice, lazily: all epochs per block for the per-pixel fits and the products, one epoch per
    # block for the figures that need only a few epochs (cumulative displacement, groundwater periods): each
    # such epoch decodes its stored chunks of several epochs, but only one epoch of the grid is held per block
    cube_v = _open_epoch_store(store, times, ys, xs, {"time": -1, "y": tile[0], "x": tile[1]}, fix, t_yr, grid)
    cube_t = _open_epoch_store(store, times, ys, xs, {"time": 1, "y": -1, "x": -1}, fix, t_yr, grid)
    annual = fit_annual_velocities(cube_v, chunk_pixels=cfg.timeseries.chunk_pixels).compute()
    annual_da = annual["annual_velocity"].rio.write_crs(grid.crs, inplace=True)
    # partial first/last years (under half a year of data) are too noisy for the annual statistics
    ann = annual_subsidence(annual_da, threshold_mm_yr=cfg.analysis.subsidence_threshold_mm_yr,
                            min_year_fraction=0.5)
    cum = cumulative_displacement(cube_t, times[0], times[-1]).compute()
    cum = cum.rio.write_crs(grid.crs, inplace=True) if hasattr(cum, "rio") else cum
    gw = groundwater_loss(cube_t, split_dates=(str(cfg.analysis.groundwater_split_date),),
                          inelastic_fraction=cfg.analysis.inelastic_fraction, fit=annual)
    summary = {"annual_mean_subsidence_rate_mm_yr": ann.get("annual_mean_subsidence_rate_mm_yr"),
               "peak_year": ann.get("peak_year"), "annual": ann,
               "max_cumulative_subsidence_mm": float(-np.nanmin(np.asarray(cum.values, np.float64))),
               "timeseries_period": [str(np.datetime_as_string(times[0], "D")),
                                     str(np.datetime_as_string(times[-1], "D"))],
               "groundwater": gw}
    return {"summary": summary, "cube": cube_v, "annual": annual, "cumulative": cum.rename("cumulative")}


class _FrameEpochs:
    """One frame's adjusted displacement cube, read one epoch at a time and brought to the common time axis.

    ``vertical(i)`` is the vertical-equivalent displacement (mm, float64 (y, x)) at common epoch ``i``,
    referenced to the first common epoch. Host memory: a few (y, x) maps of the frame (the epochs bracketing the
    current one are cached, so interpolation reads each frame epoch once).
    """

    def __init__(self, k, frame, cube, correction, los_adj, hfield, far, times):
        self.k = k
        self.data = cube.data  # Dask, one epoch per chunk
        self.t_frame = cube["time"].values
        days = (self.t_frame - self.t_frame[0]) / np.timedelta64(1, "D")
        # the velocity correction in time, as apply_velocity_correction measures it (years from the first epoch)
        self.dt_corr = (self.t_frame - self.t_frame[0]).astype("timedelta64[ns]").astype(np.float64) / (
            86_400e9 * 365.25)
        self.t_c = days / 365.25
        self.corr = np.asarray(np.asarray(correction, np.float32), np.float64)
        self.los_adj = np.asarray(los_adj, np.float64)
        self.usable = np.isfinite(self.los_adj)
        self.far = far
        self.x, self.y = np.asarray(cube["x"].values, float), np.asarray(cube["y"].values, float)
        e, n, u = (np.asarray(frame[v].values, np.float64) for v in ("los_e", "los_n", "los_u"))
        self.h_rate = e * hfield["ve"].values + n * hfield["vn"].values  # mm/yr, LOS of horizontal motion
        self.u = u
        self.t_yr = (times - self.t_frame[0]) / np.timedelta64(1, "D") / 365.25
        self.same = np.array_equal(self.t_frame, times)
        # linear interpolation in time (as xarray's interp: float nanoseconds from the frame's first epoch);
        # a common epoch on a frame epoch takes that epoch as it is
        xf = (self.t_frame - self.t_frame.min()).astype("timedelta64[ns]").astype(np.float64)
        xn = (times - self.t_frame.min()).astype("timedelta64[ns]").astype(np.float64)
        hi = np.clip(np.searchsorted(xf, xn), 1, xf.size - 1)
        self.lo, self.hi = hi - 1, hi
        self.x_lo, self.dx, self.xn = xf[hi - 1], xf[hi] - xf[hi - 1], xn
        self.exact = {i: int(j) for i, j in enumerate(np.searchsorted(xf, xn)) if j < xf.size and xf[j] == xn[i]}
        self.cache: dict[int, np.ndarray] = {}
        self.raw: dict[int, np.ndarray] = {}
        self.ref = None
        self.template = _frame_da(frame, np.zeros(self.usable.shape, np.float32), "d")

    def _adjusted(self, j: int) -> np.ndarray:
        """Frame epoch ``j`` (float32 (y, x), mm LOS): corrected, masked, optionally deramped."""
        if j in self.cache:
            return self.cache[j]
        from .timeseries import _ramps_block

        raw = self._raw(j)
        c = raw - (self.corr * self.dt_corr[j]).astype(np.float32)
        c = np.where(self.usable, c, np.float32(np.nan)).astype(np.float32)
        if self.far is not None:
            # the plane is fitted to the departure from the adjusted linear model (see timeseries_stage)
            lin = (self.los_adj * self.t_c[j]).astype(np.float32)
            dep, _ = _ramps_block((c - lin)[None], self.far, None, x=self.x, y=self.y, order=1,
                                  epochs=self.t_frame[j:j + 1])
            c = (dep[0] + lin).astype(np.float32)
        for old in [key for key in self.cache if key < j - 1]:
            del self.cache[old]
        self.cache[j] = c
        return c

    def _raw(self, j: int) -> np.ndarray:
        """Frame epoch ``j`` as stored (float32); epochs are read a few at a time (one Dask call per
        ``_READ_AHEAD_BYTES``), and only epochs at or after ``j`` are kept."""
        if j not in self.raw:
            n_ahead = max(1, min(16, _READ_AHEAD_BYTES // max(4 * self.usable.size, 1)))
            stop = min(j + n_ahead, self.t_frame.size)
            block = np.asarray(self.data[j:stop].compute(scheduler="synchronous"), np.float32)
            self.raw = {j + m: block[m] for m in range(stop - j)}
        return self.raw[j]

    def da(self, values, name: str):
        """``values`` (y, x) as a float32 DataArray on the frame grid (as ``_frame_da``, without re-deriving
        the CRS coordinate every epoch)."""
        return self.template.copy(data=np.asarray(values, np.float32)).rename(name)

    def _at(self, i: int) -> np.ndarray:
        """Adjusted LOS displacement at common epoch ``i`` (float64 (y, x))."""
        if self.same:
            return np.asarray(self._adjusted(i), np.float64)
        if i in self.exact:
            return np.asarray(self._adjusted(self.exact[i]), np.float64)
        y_lo, y_hi = self._adjusted(int(self.lo[i])), self._adjusted(int(self.hi[i]))
        slope = (y_hi - y_lo) / self.dx[i]
        return slope * (self.xn[i] - self.x_lo[i]) + y_lo

    def _vertical_raw(self, i: int) -> np.ndarray:
        return (self._at(i) - self.h_rate * self.t_yr[i]) / self.u

    def vertical(self, i: int) -> np.ndarray:
        if self.ref is None:
            self.ref = self._vertical_raw(0)
        return self._vertical_raw(i) - self.ref  # referenced to the first common epoch


def _ts_tile(n_epochs: int, shape: tuple[int, int], chunk_pixels: int) -> tuple[int, int]:
    """(rows, cols) of the pixel tiles of the stored vertical cube: all epochs of a tile hold about
    ``_TS_BLOCK_BYTES`` of float32 (at most ``chunk_pixels`` pixels, at least 32 × 32)."""
    import math

    pixels = max(min(int(chunk_pixels), _TS_BLOCK_BYTES // (4 * max(int(n_epochs), 1))), 32 * 32)
    rows = min(int(shape[0]), max(int(math.sqrt(pixels)), 1))
    cols = min(int(shape[1]), max(pixels // rows, 1))
    return rows, cols


def _ts_epochs_per_chunk(n_epochs: int, shape: tuple[int, int]) -> int:
    """Epochs per stored chunk of the vertical cube: as many as ``_TS_BUFFER_BYTES`` of merged float32 epochs hold
    (1 to ``_TS_MAX_EPOCHS_PER_CHUNK``, at most the epochs there are)."""
    per_epoch = 4 * max(int(shape[0]) * int(shape[1]), 1)
    return int(max(1, min(_TS_MAX_EPOCHS_PER_CHUNK, int(n_epochs), _TS_BUFFER_BYTES // per_epoch)))


def _create_epoch_store(path: Path, times, ys, xs, tile, n_epochs_chunk: int = 1):
    """An empty (NaN) Zarr store (time, y, x) float32, chunks of ``n_epochs_chunk`` epochs × ``tile`` pixels;
    returns the Zarr array, to be written ``n_epochs_chunk`` whole epochs at a time.

    The store is Zarr format 3 with the chunks in shards of ``n_epochs_chunk`` epochs × whole rows of tiles (at
    most ``_TS_CHUNKS_PER_SHARD`` chunks): a file per shard, so that a plain at 100 m with hundreds of epochs
    makes tens of thousands of files, not the millions of one file per chunk (the tiles shrink as the epochs
    grow, so that count grows as the square of the epochs)."""
    import dask.array as da
    import xarray as xr
    import zarr

    shutil.rmtree(path, ignore_errors=True)
    shape = (times.size, ys.size, xs.size)
    chunks = (int(n_epochs_chunk), *tile)
    tiles_y, tiles_x = -(-shape[1] // tile[0]), -(-shape[2] // tile[1])
    rows = max(1, min(tiles_y, _TS_CHUNKS_PER_SHARD // tiles_x))  # rows of tiles per shard
    cols = tiles_x if rows > 1 or tiles_x <= _TS_CHUNKS_PER_SHARD else _TS_CHUNKS_PER_SHARD
    encoding = {"chunks": chunks, "_FillValue": np.float32(np.nan),
                "shards": (chunks[0], rows * tile[0], cols * tile[1])}
    # one Dask chunk: nothing is computed (compute=False), and the graph stays one task whatever the epochs
    template = xr.Dataset(
        {"vertical_displacement": (("time", "y", "x"), da.full(shape, np.nan, dtype=np.float32, chunks=shape),
                                   {"units": "mm", "positive": "up"})},
        coords={"time": times, "y": ys, "x": xs})
    # metadata and coordinates only: chunks never written read as the NaN fill value. The store lives only
    # within the run, so Zarr 3's (not yet standard) consolidated metadata is not needed
    template.to_zarr(path, mode="w", compute=False, consolidated=False,
                     encoding={"vertical_displacement": encoding}, zarr_format=3)
    return zarr.open_group(str(path), mode="r+", zarr_format=3)["vertical_displacement"]


def _open_epoch_store(path: Path, times, ys, xs, chunks, fix, t_yr, grid):
    """The stored vertical cube, lazily (Dask ``chunks``), plus the lazy trend correction ``fix × t`` (mm)."""
    import warnings

    import xarray as xr

    with warnings.catch_warnings():
        # blocks of one epoch over chunks of several are meant (see timeseries_stage): not a user's concern
        warnings.filterwarnings("ignore", "The specified chunks separate the stored chunks", UserWarning)
        ds = xr.open_zarr(path, chunks=chunks, consolidated=False)
    cube = ds["vertical_displacement"].assign_coords(time=times, y=ys, x=xs)
    if fix is not None:
        import dask.array as da

        # Dask on both sides, so that fix × t is formed block by block too, never as a whole (time, y, x) array
        lazy_fix = xr.DataArray(da.from_array(fix, chunks=cube.data.chunks[1:]), dims=("y", "x"),
                                coords={"y": ys, "x": xs})
        lazy_t = xr.DataArray(da.from_array(np.asarray(t_yr, np.float64), chunks=cube.data.chunks[:1]),
                              dims="time", coords={"time": times})
        cube = (cube + lazy_fix * lazy_t).astype(np.float32)
        cube = cube.transpose("time", "y", "x")
    cube.name = "vertical_displacement"
    cube.attrs = {"units": "mm", "positive": "up"}
    return cube.rio.write_crs(grid.crs)


class _TrendSums:
    """Per-pixel sums (n, Σt, Σt², Σd, Σt·d; float64 (y, x)) of a displacement cube fed one epoch at a time, for
    its least-squares linear trend."""

    def __init__(self, shape):
        self.n, self.st, self.stt, self.sd, self.std_ = (np.zeros(shape) for _ in range(5))

    def add(self, tk: float, epoch) -> None:
        d = np.asarray(epoch, np.float64)
        ok = np.isfinite(d)
        self.n += ok
        self.st += np.where(ok, tk, 0.0)
        self.stt += np.where(ok, tk * tk, 0.0)
        self.sd += np.where(ok, d, 0.0)
        self.std_ += np.where(ok, tk * d, 0.0)

    def correction(self, velocity: np.ndarray) -> np.ndarray:
        """``velocity − trend`` (mm/yr) where both are defined (3+ epochs), else 0."""
        n, st = self.n, self.st
        with np.errstate(invalid="ignore", divide="ignore"):
            sxx = self.stt - st * st / n
            slope = (self.std_ - st * self.sd / n) / sxx
        return np.where((n >= 3) & (sxx > 0) & np.isfinite(slope) & np.isfinite(velocity), velocity - slope, 0.0)


def _anchor_trend(merged: np.ndarray, times: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Replace the per-pixel least-squares linear trend of a (time, y, x) displacement cube (mm) by ``velocity``
    (mm/yr, (y, x)) where both are defined (3+ epochs); the first epoch stays the reference. In place, epoch by
    epoch (host memory: a few (y, x) float64 sums)."""
    t = (times - times[0]) / np.timedelta64(1, "D") / 365.25
    sums = _TrendSums(merged.shape[1:])
    for k, tk in enumerate(t):
        sums.add(tk, merged[k])
    fix = sums.correction(velocity)
    for k, tk in enumerate(t):
        merged[k] = (merged[k] + fix * tk).astype(merged.dtype)
    return merged


def _residual_xy_table(adj):
    """Station residual table of a frame adjustment with columns x_km, y_km, residual, sigma (used stations)."""
    tab = adj.residuals
    if tab is None or len(tab) == 0:
        return None
    t = tab
    if "used" in t.columns:
        t = t[t["used"].astype(bool)]
    cols = {c: c for c in ("x_km", "y_km", "residual", "sigma")}
    missing = [c for c in cols if c not in t.columns]
    if missing:
        return None
    return t[list(cols)]
