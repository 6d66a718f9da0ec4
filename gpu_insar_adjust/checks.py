"""Check every input before any compute: ``gia check``.

:func:`check_inputs` opens every frame, cube and GNSS file with the package's own readers and collects *all*
problems it finds into one :class:`CheckReport`, instead of stopping at the first, so a user fixes a data set in
one round rather than one error per run. Each problem names the file, the field, what is wrong and the fix.

What is checked
---------------
* every raster of each frame can be opened and has a known coordinate reference system (CRS);
* each frame opens (:func:`gpu_insar_adjust.io.frames.open_frame`): shared grid, unit vectors, geometry, units;
  a :class:`~gpu_insar_adjust.errors.GiaError` from the reader becomes a problem with its file/field/fix;
* plausible units: the median \\|LOS velocity\\| of ground deformation is of order 1-100 mm/yr; above
  :data:`MAX_MEDIAN_ABS_VELOCITY` the values are not mm/yr (m/yr scaled twice, µm/yr, phase in radians, a
  wrong scale factor); below :data:`MIN_MEDIAN_ABS_VELOCITY` they look like m/yr where mm/yr is expected;
* unit-vector norms (largest \\|norm - 1\\| is reported; the reader rejects norms off by more than its tolerance);
* the fraction of pixels without data (warning above :data:`MAX_NAN_FRACTION`, error when nothing is valid);
* frames whose valid-data footprint overlaps no other frame (cannot be tied by the overlap network);
* displacement cubes (``cum*.h5``, ``timeseries*.h5``) in a frame folder open, with strictly increasing dates;
* GNSS files: the reader's validation, duplicate stations, stations outside every frame (with a hint when the
  longitude and latitude look swapped), held-out stations that also appear in the training file.

Frames are read with the readers (velocity, its sigma and the unit vectors are read whole; frames are 2-D), cubes
only for their metadata and dates (they stay lazy).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GiaError, InputError

__all__ = ["check_inputs", "CheckReport", "MAX_MEDIAN_ABS_VELOCITY", "MIN_MEDIAN_ABS_VELOCITY",
           "MAX_NAN_FRACTION", "NORM_WARNING"]

log = logging.getLogger(__name__)

#: Median |LOS velocity| (mm/yr) above which the values cannot be mm/yr of ground deformation (1 m/yr).
MAX_MEDIAN_ABS_VELOCITY = 1000.0
#: Median |LOS velocity| (mm/yr) below which the values look like m/yr stored where mm/yr is expected: a frame's
#: noise alone gives about 1 mm/yr, while a deforming frame in m/yr has a median of a few hundredths
MIN_MEDIAN_ABS_VELOCITY = 0.2
#: Fraction of the valid velocity pixels above which exact zeros (or sigmas <= 0) are worth a warning.
MAX_ZERO_FRACTION = 0.01
#: Fraction of no-data pixels in a frame above which a warning is given.
MAX_NAN_FRACTION = 0.9
#: Largest |norm - 1| of the LOS unit vectors accepted without a warning (the reader's hard limit is larger).
NORM_WARNING = 0.01

# Rasters a frame reader uses (LiCSAR/LiCSBAS names, with or without the frame-id prefix; MintPy's height.tif).
_FRAME_RASTER = re.compile(r"(^|\.)(vel\.geo|vstd\.geo|geo\.[ENU]|[ENU]\.geo|geo\.hgt|hgt\.geo|mask\.geo)\.tif$"
                           r"|^height\.tif$")
_CUBE_NAMES = ("cum.h5", "cum_filt.h5")
_CUBE_PATTERN = "timeseries*.h5"


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------
@dataclass
class CheckReport:
    """Every problem found by :func:`check_inputs`, and what was inspected.

    Attributes
    ----------
    problems
        One dict per problem: ``severity`` (``"error"`` | ``"warning"``), ``file``, ``field``, ``message``,
        ``fix``. Errors stop a run; warnings deserve a look.
    frames
        One dict per frame that opened: ``frame_id``, ``path``, ``shape``, ``crs``, ``orbit``, ``nan_fraction``,
        ``median_abs_velocity`` (mm/yr), ``max_norm_deviation`` (largest \\|norm - 1\\| of the unit vectors),
        ``footprint`` (lon_min, lat_min, lon_max, lat_max of the valid pixels, degrees).
    gnss
        Per GNSS file read: ``path``, ``role`` (``training`` | ``holdout``), ``n_stations``, ``n_inside``
        (stations inside at least one frame footprint).
    seconds
        Time the checks took.
    """

    problems: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    gnss: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    # -- building
    def add(self, severity: str, message: str, *, file=None, field: str | None = None,
            fix: str | None = None) -> None:
        """Record one problem (``severity`` is ``"error"`` or ``"warning"``)."""
        if severity not in ("error", "warning"):
            raise ValueError(f"severity must be 'error' or 'warning', got {severity!r}")
        self.problems.append({"severity": severity, "file": None if file is None else os.fspath(file),
                              "field": field, "message": message, "fix": fix})

    def add_exception(self, exc: BaseException, *, file=None, field: str | None = None,
                      severity: str = "error") -> None:
        """Record an exception raised by a reader; a :class:`GiaError` keeps its own file, field and fix."""
        if isinstance(exc, GiaError):
            self.add(severity, exc.message, file=exc.file if exc.file is not None else file,
                     field=exc.field if exc.field is not None else field, fix=exc.fix)
        else:
            # Not a GiaError: a reader failed in a way it does not explain; report it rather than crash.
            self.add(severity, f"Unexpected {type(exc).__name__} while reading: {exc}", file=file, field=field,
                     fix="check that the file is complete and of the expected format; if it is, report this as a "
                         "bug in gpu_insar_adjust")

    # -- reading
    @property
    def errors(self) -> list[dict[str, Any]]:
        return [p for p in self.problems if p["severity"] == "error"]

    @property
    def warnings(self) -> list[dict[str, Any]]:
        return [p for p in self.problems if p["severity"] == "warning"]

    @property
    def ok(self) -> bool:
        """True when no problem is an error (warnings allowed)."""
        return not self.errors

    def problems_for(self, file) -> list[dict[str, Any]]:
        """Problems whose file is ``file`` (or lies inside the folder ``file``)."""
        target = Path(file).resolve()
        out = []
        for p in self.problems:
            if p["file"] is None:
                continue
            f = Path(p["file"]).resolve()
            if f == target or target in f.parents:
                out.append(p)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: ``ok``, counts, ``problems``, ``frames``, ``gnss``, ``seconds``."""
        return {"ok": self.ok, "n_errors": len(self.errors), "n_warnings": len(self.warnings),
                "problems": [dict(p) for p in self.problems], "frames": [dict(f) for f in self.frames],
                "gnss": [dict(g) for g in self.gnss], "seconds": round(self.seconds, 3)}

    def format_text(self) -> str:
        """Plain-text report: one block per problem (severity, message, file, field, fix), then a summary line."""
        lines = []
        for p in self.problems:
            lines.append(f"{p['severity'].upper()}: {p['message']}")
            for key in ("file", "field", "fix"):
                if p[key] is not None:
                    lines.append(f"  {key + ':':6} {p[key]}")
        lines.append(self._summary())
        return "\n".join(lines)

    def to_table(self):
        """A :class:`rich.table.Table` of the problems (print it with a rich Console)."""
        from rich.table import Table

        table = Table(title="Input check", caption=self._summary(), show_lines=True)
        for col in ("severity", "file", "field", "message", "fix"):
            table.add_column(col, overflow="fold")
        for p in self.problems:
            style = "red" if p["severity"] == "error" else "yellow"
            table.add_row(f"[{style}]{p['severity']}[/{style}]", _short(p["file"]), p["field"] or "",
                          p["message"], p["fix"] or "")
        return table

    def raise_if_errors(self) -> None:
        """Raise :class:`InputError` summarising every error (for pipelines that check before computing)."""
        errs = self.errors
        if errs:
            first = errs[0]
            more = f" (and {len(errs) - 1} more; run `gia check` to list them)" if len(errs) > 1 else ""
            raise InputError(first["message"] + more, file=first["file"], field=first["field"], fix=first["fix"])

    def _summary(self) -> str:
        return (f"{len(self.frames)} frame(s) opened, {sum(g['n_stations'] for g in self.gnss)} GNSS station(s) "
                f"read; {len(self.errors)} error(s), {len(self.warnings)} warning(s) in {self.seconds:.1f} s")

    def __str__(self) -> str:
        return self.format_text()


def _short(path: str | None) -> str:
    if path is None:
        return ""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------
def check_inputs(frames_dir: str | os.PathLike, gnss: str | os.PathLike | None = None,
                 holdout: str | os.PathLike | None = None, *,
                 reference_frame: str = "ITRF2014", horizontal_grids: tuple | None = None,
                 horizontal_grids_frame: str = "EURA-fixed", require_reference: bool = False) -> CheckReport:
    """Open every input and collect all problems before any compute.

    Parameters
    ----------
    frames_dir
        Folder holding one sub-folder per frame (LiCSBAS GeoTIFFs or MintPy HDF5); other sub-folders are skipped.
    gnss
        GNSS velocity file (or folder of position series) used for the adjustment, optional.
    holdout
        GNSS file of held-out (validation) stations, optional; none of them may also be in ``gnss``.
    reference_frame
        Frame of the GNSS velocities, passed to :func:`gpu_insar_adjust.io.gnss.read_gnss`.
    horizontal_grids, horizontal_grids_frame
        East and north horizontal velocity grids (as ``gia run --horizontal-grids``) and their frame: read as the
        run reads them, optional.
    require_reference
        What ``gia run`` needs: GNSS velocities or horizontal grids to reference the frames to (an error when
        neither is given).

    Returns
    -------
    CheckReport
        ``ok`` is False when any error was found; ``problems`` lists all of them with file, field and fix.
    """
    from .io.frames import list_frames

    t0 = time.perf_counter()
    report = CheckReport()
    footprints: dict[str, tuple[float, float, float, float]] = {}
    try:
        frame_dirs = list_frames(frames_dir)
    except GiaError as exc:
        report.add_exception(exc, file=frames_dir)
        frame_dirs = []
    for folder in frame_dirs:
        grids: dict = {}
        fp = _check_frame(folder, report, grids)
        if fp is not None:
            footprints[folder.name] = fp
        _check_cubes(folder, report, grids.get("grid"))
    _check_overlaps(footprints, report, frame_dirs)

    names: dict[str, set[str]] = {}
    for role, path in (("training", gnss), ("holdout", holdout)):
        if path is None:
            continue
        names[role] = _check_gnss(Path(path), role, footprints, report, reference_frame)
    if "training" in names and "holdout" in names:
        both = sorted(names["training"] & names["holdout"])
        if both:
            report.add("error", f"{len(both)} held-out station(s) also in the training GNSS file: "
                                f"{_list(both)}; the validation would not be independent.",
                       file=holdout, field="station",
                       fix=f"remove them from {Path(gnss).name} or from {Path(holdout).name}")
    if horizontal_grids is not None:
        from .geodesy.horizontal import load_horizontal_grids

        try:
            load_horizontal_grids(*horizontal_grids, reference_frame=horizontal_grids_frame)
        except Exception as exc:  # a GiaError keeps its own file, field and fix; anything else is named here
            report.add_exception(exc, file=horizontal_grids[0], field="--horizontal-grids")
    if require_reference and gnss is None and horizontal_grids is None:
        report.add("error", "No GNSS input was given: the frames cannot be referenced.", field="--gnss",
                   fix="give a GNSS velocity file with --gnss, or horizontal grids with --horizontal-grids")
    report.seconds = time.perf_counter() - t0
    log.info("checked %d frame(s) and %d GNSS file(s): %d error(s), %d warning(s) in %.2f s", len(frame_dirs),
             len(names), len(report.errors), len(report.warnings), report.seconds)
    return report


def _list(names, n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# --------------------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------------------
def _scan_rasters(folder: Path, report: CheckReport) -> bool:
    """Open the header of every frame raster (cheap): readable, with a known CRS. True when all are fine."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    clean = True
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and _FRAME_RASTER.search(path.name)):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    crs = src.crs
        except RasterioIOError as exc:
            report.add("error", f"Cannot open the GeoTIFF (truncated or not a GeoTIFF): {exc}", file=path,
                       field=path.name, fix="copy or download the file again; check that it is a complete GeoTIFF")
            clean = False
            continue
        if crs is None:
            report.add("error", "GeoTIFF has no coordinate reference system (CRS).", file=path, field="crs",
                       fix=f"set it, e.g. gdal_edit.py -a_srs EPSG:4326 {path.name}")
            clean = False
            continue
        problem = _crs_problem(crs)
        if problem:
            report.add("error", problem, file=path, field="crs",
                       fix=f"set a known CRS, e.g. gdal_edit.py -a_srs EPSG:4326 {path.name}")
            clean = False
    return clean


def _crs_problem(crs) -> str | None:
    """None when ``crs`` is a known geographic or projected CRS, else what is wrong with it."""
    import pyproj

    try:
        c = pyproj.CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except pyproj.exceptions.CRSError as exc:
        return f"CRS not understood by PROJ: {exc}"
    if not (c.is_geographic or c.is_projected):
        return f"CRS {c.name!r} is neither geographic nor projected (a local or engineering CRS)."
    return None


def _check_frame(folder: Path, report: CheckReport, grids: dict | None = None):
    """Open one frame and check it; returns its valid-data footprint (lon/lat box) or None. The frame's pixel
    centres go to ``grids["grid"]`` as ``(y, x)`` (its cubes must be on them)."""
    from .io.frames import open_frame

    if not _scan_rasters(folder, report):
        return None  # the reader would stop at the first of the problems just reported
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = open_frame(folder)
    except Exception as exc:  # noqa: BLE001  (every failure becomes a problem; nothing stops the check)
        report.add_exception(exc, file=folder)
        return None
    for w in caught:
        if issubclass(w.category, UserWarning):
            report.add("warning", str(w.message).split(": ", 1)[-1], file=folder, field="geometry",
                       fix="put the geometry file next to the velocity for per-pixel LOS vectors")

    if grids is not None:
        grids["grid"] = (ds["y"].values, ds["x"].values)
    fid = ds.attrs["frame_id"]
    vel_file = _velocity_file(folder)
    crs = ds.rio.crs
    problem = None if crs is not None else "Frame has no CRS."
    if problem is None:
        problem = _crs_problem(crs)
    if problem:
        report.add("error", problem, file=vel_file, field="crs", fix="georeference the frame with a known CRS")
        return None

    vel = ds["los_velocity"].values
    finite = np.isfinite(vel)
    n_valid = int(finite.sum())
    nan_fraction = 1.0 - n_valid / vel.size if vel.size else 1.0
    info: dict[str, Any] = {"frame_id": fid, "path": str(folder), "shape": list(vel.shape), "crs": str(crs),
                            "orbit": ds.attrs.get("orbit"), "nan_fraction": round(nan_fraction, 4)}
    report.frames.append(info)
    if n_valid == 0:
        report.add("error", "The LOS velocity has no valid pixel (all NaN or no-data).", file=vel_file,
                   field="los_velocity", fix="give a velocity map with data; check the no-data value of the file")
        return None
    if nan_fraction > MAX_NAN_FRACTION:
        report.add("warning", f"{100 * nan_fraction:.1f} % of the frame's pixels have no velocity.",
                   file=vel_file, field="los_velocity",
                   fix="check the mask and the no-data value; a nearly empty frame constrains little")

    # Units: float64 median of the valid pixels (float32 sums lose precision on big frames).
    median_abs = float(np.median(np.abs(vel[finite].astype(np.float64))))
    info["median_abs_velocity"] = round(median_abs, 6)
    if median_abs > MAX_MEDIAN_ABS_VELOCITY:
        report.add("error", f"Median |LOS velocity| is {median_abs:.4g} mm/yr, implausible for ground motion "
                            f"(> {MAX_MEDIAN_ABS_VELOCITY:g} mm/yr): the values are not mm/yr (scaled twice from "
                            "m/yr, µm/yr, or phase in radians rather than velocity).", file=vel_file,
                   field="los_velocity",
                   fix="convert the velocity to mm/yr (LiCSBAS vel.geo.tif is mm/yr; MintPy velocity.h5 is m/yr "
                       "with UNIT=m/year) and rewrite the file")
    elif median_abs < MIN_MEDIAN_ABS_VELOCITY:
        report.add("warning", f"Median |LOS velocity| is {median_abs:.3g} mm/yr, implausibly small: the values "
                              "look like m/yr where mm/yr is expected (or the map is all zeros).", file=vel_file,
                   field="los_velocity", fix="multiply by 1000 if the file is in m/yr, and rewrite it in mm/yr")
    # exact zeros are what a tool writes for "no data" when it declares none (a measured velocity is almost
    # never exactly 0 beyond the reference pixels)
    zero_fraction = float(np.count_nonzero(vel[finite] == 0.0)) / n_valid
    if zero_fraction > MAX_ZERO_FRACTION:
        report.add("warning", f"{100 * zero_fraction:.1f} % of the valid velocity pixels are exactly 0: an "
                              "undeclared no-data value?", file=vel_file, field="los_velocity",
                   fix="declare the no-data value of the file (e.g. gdal_edit.py -a_nodata 0 <file>) or set those "
                       "pixels to NaN, unless the zeros are measured")
    if "los_std" in ds:
        std_all = ds["los_std"].values
        std = std_all[np.isfinite(std_all)]
        if std.size and float(np.median(std.astype(np.float64))) > MAX_MEDIAN_ABS_VELOCITY:
            report.add("error", f"Median LOS velocity sigma is {float(np.median(std)):.4g} mm/yr, not mm/yr.",
                       file=_raster(folder, "vstd") or vel_file, field="los_std",
                       fix="give the 1-sigma of the velocity in mm/yr")
        # the run floors such sigmas: fine at a reference pixel, not over much of the frame
        bad_std = int(np.count_nonzero(finite & ~(std_all > 0)))
        if bad_std > MAX_ZERO_FRACTION * n_valid:
            report.add("warning", f"{bad_std} valid velocity pixels have a sigma that is 0, negative or missing; "
                                  "the run floors one <= 0 at 0.1 mm/yr (a near-exact weight) and takes a missing "
                                  "one as 2 mm/yr.",
                       file=_raster(folder, "vstd") or vel_file, field="los_std",
                       fix="give a positive 1-sigma (mm/yr) wherever the velocity is valid")

    # Unit vectors: the reader already rejects gross errors; report the largest deviation it let through.
    e, n, u = (ds[c].values.astype(np.float64) for c in ("los_e", "los_n", "los_u"))
    norm = np.sqrt(e * e + n * n + u * u)
    dev = np.abs(norm - 1.0)
    dev = dev[np.isfinite(dev) & finite]
    max_dev = float(dev.max()) if dev.size else float("nan")
    info["max_norm_deviation"] = None if math.isnan(max_dev) else round(max_dev, 6)
    if dev.size == 0:
        report.add("error", "No pixel has both a velocity and a LOS unit vector.", file=folder, field="los_e/n/u",
                   fix="check that E/N/U.geo.tif cover the velocity map (no-data values, grid)")
    elif max_dev > NORM_WARNING:
        report.add("warning", f"LOS unit-vector norms deviate from 1 by up to {max_dev:.3g}.", file=folder,
                   field="los_e/n/u", fix="check that E, N and U are unit-vector components stored unscaled")

    footprint = _footprint(ds, finite)
    info["footprint"] = [round(v, 6) for v in footprint]
    return footprint


def _velocity_file(folder: Path) -> Path:
    for pattern in ("*vel.geo.tif", "velocity.h5", "geo_velocity.h5"):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return folder


def _raster(folder: Path, key: str) -> Path | None:
    hits = sorted(folder.glob(f"*{key}.geo.tif"))
    return hits[0] if hits else None


def _footprint(ds, finite: np.ndarray) -> tuple[float, float, float, float]:
    """(lon_min, lat_min, lon_max, lat_max) in degrees of the box around the valid pixels (cell edges)."""
    import pyproj

    rows = np.nonzero(finite.any(axis=1))[0]
    cols = np.nonzero(finite.any(axis=0))[0]
    t = ds.rio.transform()
    x0, x1 = t.c + cols[0] * t.a, t.c + (cols[-1] + 1) * t.a
    y0, y1 = t.f + rows[0] * t.e, t.f + (rows[-1] + 1) * t.e
    left, right, bottom, top = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    crs = pyproj.CRS.from_user_input(ds.rio.crs.to_wkt())
    if crs.is_geographic and crs.equals(pyproj.CRS.from_epsg(4326), ignore_axis_order=True):
        return float(left), float(bottom), float(right), float(top)
    tr = pyproj.Transformer.from_crs(crs, 4326, always_xy=True)
    return tuple(float(v) for v in tr.transform_bounds(left, bottom, right, top, densify_pts=21))


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _check_overlaps(footprints: dict, report: CheckReport, frame_dirs: list[Path]) -> None:
    if len(footprints) < 2:
        return  # one frame alone needs no overlap (it is tied by GNSS only)
    folders = {p.name: p for p in frame_dirs}
    for fid, box in footprints.items():
        if not any(_boxes_overlap(box, other) for oid, other in footprints.items() if oid != fid):
            report.add("warning", f"Frame {fid} overlaps no other frame (valid data lon {box[0]:.3f}..{box[2]:.3f}, "
                                  f"lat {box[1]:.3f}..{box[3]:.3f}); it can only be tied to the others through GNSS.",
                       file=folders.get(fid), field="footprint",
                       fix="check that it belongs to this area (its CRS and georeferencing), or add a frame that "
                           "bridges the gap")


def _check_cubes(folder: Path, report: CheckReport, grid: tuple | None = None) -> None:
    """Open every displacement cube of the frame folder lazily: layout, georeferencing and date order, and that
    it lies on the frame's grid ``(y, x)`` when known (the time-series stage refuses it otherwise)."""
    from .io.timeseries import open_cube

    cubes = [folder / n for n in _CUBE_NAMES if (folder / n).is_file()] + sorted(folder.glob(_CUBE_PATTERN))
    for cube in cubes:
        try:
            da = open_cube(cube)  # lazy: reads the dates and attributes only
        except Exception as exc:  # noqa: BLE001
            report.add_exception(exc, file=cube)
            continue
        if grid is None:
            continue
        y, x = grid
        same = (da.sizes["y"] == y.size and da.sizes["x"] == x.size
                and np.allclose(da["y"].values, y, atol=1e-6) and np.allclose(da["x"].values, x, atol=1e-6))
        if not same:
            report.add("error", f"The displacement cube ({da.sizes['y']} x {da.sizes['x']} pixels from "
                                f"{float(da['x'][0]):.5f}, {float(da['y'][0]):.5f}) is not on the grid of the "
                                f"frame's velocity ({y.size} x {x.size} from {float(x[0]):.5f}, "
                                f"{float(y[0]):.5f}).",
                       file=cube, field="grid",
                       fix="resample the cube (or the velocity) so both share one grid, or remove the cube")


# --------------------------------------------------------------------------------------------------------------
# GNSS
# --------------------------------------------------------------------------------------------------------------
def _lenient_csv(path: Path):
    """Station, lon, lat of a CSV read without validation (for the checks the strict reader stops before)."""
    import pandas as pd

    from .io import gnss as gnss_io

    try:
        # index_col=False: a row with one field too many must not turn the first column into the index
        raw = pd.read_csv(path, comment="#", dtype=str, skipinitialspace=True, keep_default_na=False,
                          encoding_errors="replace", index_col=False)
    except Exception:  # noqa: BLE001  (the strict reader reports why)
        return None
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    aliases = getattr(gnss_io, "_CSV_ALIASES", {})
    raw = raw.rename(columns={c: aliases[c] for c in raw.columns if c in aliases and aliases[c] not in raw.columns})
    if not {"station", "lon", "lat"} <= set(raw.columns):
        return None
    out = pd.DataFrame({"station": raw["station"].astype(str).str.strip()})
    for col in ("lon", "lat"):
        out[col] = pd.to_numeric(raw[col].astype(str).str.strip(), errors="coerce")
    return out


def _check_gnss(path: Path, role: str, footprints: dict, report: CheckReport, reference_frame: str) -> set[str]:
    """Read one GNSS file; report its problems; return its station names (upper case)."""
    from .io.gnss import read_gnss

    table = None
    duplicates_reported = False
    lenient = None
    if path.is_file():
        try:
            from .io.gnss import detect_format

            is_csv = detect_format(path) == "csv"
        except Exception:  # noqa: BLE001  (read_gnss below reports it)
            is_csv = False
        if is_csv:
            lenient = _lenient_csv(path)
    if lenient is not None:
        upper = lenient["station"].str.upper()
        dup = sorted(set(lenient["station"][upper.duplicated(keep=False)]))
        if dup:
            report.add("error", f"Duplicate stations: {_list(dup)}.", file=path, field="station",
                       fix="keep one row per station (merge or rename the duplicates)")
            duplicates_reported = True
    try:
        table = read_gnss(path, reference_frame=reference_frame)
    except Exception as exc:  # noqa: BLE001
        if not (duplicates_reported and isinstance(exc, GiaError) and exc.field == "station"
                and exc.message.startswith("Duplicate")):
            report.add_exception(exc, file=path)
    if table is not None:
        stations = table[["station", "lon", "lat"]]
    elif lenient is not None:
        stations = lenient[np.isfinite(lenient["lon"]) & np.isfinite(lenient["lat"])]
    else:
        report.gnss.append({"path": str(path), "role": role, "n_stations": 0, "n_inside": 0})
        return set()
    names = set(stations["station"].astype(str).str.upper())
    lon = ((stations["lon"].to_numpy(np.float64) + 180.0) % 360.0) - 180.0
    lat = stations["lat"].to_numpy(np.float64)
    n_inside = len(stations)
    if footprints:
        inside = _inside_any(lon, lat, footprints)
        n_inside = int(inside.sum())
        outside = ~inside
        if outside.any():
            st = list(stations["station"].astype(str)[outside])
            swapped = _inside_any(lat[outside], lon[outside], footprints)
            hint = ""
            if swapped.any():
                hint = (f"; {_list([s for s, w in zip(st, swapped) if w])} would fall inside a frame with lon and "
                        "lat swapped")
            if role == "training" and n_inside == 0:
                severity = "error"
                msg = f"No GNSS station lies inside any frame ({len(st)} outside{hint})."
            else:
                severity = "warning"
                msg = f"{len(st)} GNSS station(s) lie outside every frame and are not used: {_list(st)}{hint}."
            report.add(severity, msg, file=path, field="lon/lat",
                       fix="check the lon and lat columns (degrees, not swapped) and that the stations belong to "
                           "this area; stations outside the frames can be removed")
    report.gnss.append({"path": str(path), "role": role, "n_stations": int(len(stations)), "n_inside": n_inside})
    return names


def _inside_any(lon: np.ndarray, lat: np.ndarray, footprints: dict) -> np.ndarray:
    inside = np.zeros(lon.shape, dtype=bool)
    for x0, y0, x1, y1 in footprints.values():
        inside |= (lon >= x0) & (lon <= x1) & (lat >= y0) & (lat <= y1)
    return inside
