"""``gia validate`` and ``gia report``: judge a finished run against held-out GNSS and/or a truth grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["validate_run", "rewrite_report", "load_run_grid"]


def load_run_grid(out: Path, name: str):
    """A product GeoTIFF of a run as a (y, x) DataArray with its CRS."""
    import rioxarray

    path = Path(out) / name
    if not path.is_file():
        raise InputError(f"The run folder has no {name}.", file=out, field=name,
                         fix="give the output folder of a finished `gia run`")
    return rioxarray.open_rasterio(path, masked=True).squeeze("band", drop=True)


def validate_run(out: str | os.PathLike, *, truth: str | os.PathLike | None = None,
                 holdout: str | os.PathLike | None = None, threshold_mm_yr: float | None = None) -> dict:
    """RMSE, bias, MAE and R² of a run's vertical velocity against held-out GNSS and/or a truth grid.

    ``truth`` is a folder holding ``vertical_velocity.tif`` (and, for the embedded scenario, ``scenario.json``
    with the true subsidence area), or that GeoTIFF itself. Writes ``validation.json`` into the run folder.
    """
    from .analysis.subsidence import subsidence_summary
    from .analysis.validation import validate_against_gnss, validate_against_truth
    from .io.write import write_json

    out = Path(out)
    if truth is None and holdout is None:
        raise InputError("Nothing to validate against.", field="--truth/--holdout",
                         fix="give a truth folder (--truth) or a held-out GNSS file (--holdout)")
    vertical = load_run_grid(out, "vertical_velocity.tif")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    thr = threshold_mm_yr or summary.get("subsidence_threshold_mm_yr", 20.0)
    result: dict = {"run": str(out)}
    if holdout is not None:
        from .geodesy import plates
        from .io.gnss import read_gnss

        cfg = (summary.get("provenance") or {}).get("config", {}).get("gnss", {})
        st = read_gnss(holdout, reference_frame=cfg.get("reference_frame", "ITRF2014"))
        st = plates.to_itrf(st, cfg.get("plate", "EURA"), cfg.get("plate_model", "ITRF2014"))
        st = st[np.isfinite(st["vu"].to_numpy(float))]
        v = validate_against_gnss(vertical, st)
        result["holdout"] = v.get("overall", v)
        result["holdout_scatter"] = v.get("scatter")
    if truth is not None:
        import rioxarray

        tpath = Path(truth)
        tfile = tpath / "vertical_velocity.tif" if tpath.is_dir() else tpath
        if not tfile.is_file():
            raise InputError("No truth vertical velocity found.", file=tpath, field="vertical_velocity.tif",
                             fix="give the truth/ folder of a `gia synth` scenario or a vertical velocity GeoTIFF")
        t = rioxarray.open_rasterio(tfile, masked=True).squeeze("band", drop=True)
        t_on = t.rio.reproject_match(vertical)
        tv = validate_against_truth(vertical, t_on)
        result["truth"] = {k: v for k, v in tv.items() if k != "scatter"}
        true_area = subsidence_summary(t_on, threshold_mm_yr=thr)["subsidence_area_km2"]
        est_area = subsidence_summary(vertical, threshold_mm_yr=thr)["subsidence_area_km2"]
        result["truth"]["subsidence_area_km2"] = est_area
        result["truth"]["true_subsidence_area_km2"] = true_area
        result["truth"]["area_error_percent"] = (100.0 * (est_area - true_area) / true_area) if true_area else None
        result["truth"]["rmse"] = result["truth"].get("rmse", (tv.get("overall") or {}).get("rmse"))
    write_json(out / "validation.json", result)
    return result


def rewrite_report(out: str | os.PathLike) -> Path:
    """Write report.html again from a run folder's summary.json and product rasters."""
    from .report import write_report

    out = Path(out)
    sp = out / "summary.json"
    if not sp.is_file():
        raise InputError("The run folder has no summary.json.", file=out, field="summary.json",
                         fix="give the output folder of a finished `gia run`")
    summary = json.loads(sp.read_text())
    east = load_run_grid(out, "east_velocity.tif") if (out / "east_velocity.tif").is_file() else None
    return write_report(out, summary, vertical_velocity=load_run_grid(out, "vertical_velocity.tif"),
                        east_velocity=east)
