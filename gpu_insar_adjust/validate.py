"""``gia validate`` and ``gia report``: judge a finished run against held-out GNSS and/or a truth grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["validate_run", "rewrite_report", "load_run_grid", "validate_displacement_at_stations"]


def load_run_grid(out: Path, name: str):
    """A product GeoTIFF of a run as a (y, x) DataArray with its CRS."""
    import rioxarray

    path = Path(out) / name
    if not path.is_file():
        raise InputError(f"The run folder has no {name}.", file=out, field=name,
                         fix="give the output folder of a finished `gia run`")
    return rioxarray.open_rasterio(path, masked=True).squeeze("band", drop=True)


def validate_run(out: str | os.PathLike, *, truth: str | os.PathLike | None = None,
                 holdout: str | os.PathLike | None = None, threshold_mm_yr: float | None = None,
                 holdout_series: str | os.PathLike | None = None) -> dict:
    """RMSE, bias, MAE and R² of a run's vertical velocity against held-out GNSS and/or a truth grid.

    ``truth`` is a folder holding ``vertical_velocity.tif`` (and, for the embedded scenario, ``scenario.json``
    with the true subsidence area), or that GeoTIFF itself. ``holdout_series`` is a folder of held-out daily
    GNSS position series (NGL ``.tenv3`` or SOPAC ``.neu``) compared epoch by epoch with the run's
    ``vertical_displacement.nc``. Writes ``validation.json`` into the run folder.
    """
    from .analysis.subsidence import subsidence_summary
    from .analysis.validation import validate_against_gnss, validate_against_truth
    from .io.write import write_json

    out = Path(out)
    if truth is None and holdout is None and holdout_series is None:
        raise InputError("Nothing to validate against.", field="--truth/--holdout/--holdout-series",
                         fix="give a truth folder (--truth), a held-out GNSS file (--holdout) or a folder of "
                             "held-out daily series (--holdout-series)")
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
        disp_truth = tpath / "holdout_displacement.csv" if tpath.is_dir() else None
        if disp_truth is not None and disp_truth.is_file() and (out / "vertical_displacement.nc").is_file():
            result["holdout_displacement"] = validate_displacement_at_stations(out / "vertical_displacement.nc",
                                                                               disp_truth)
    if holdout_series is not None:
        result["holdout_series"] = validate_series_folder(out, holdout_series)
    write_json(out / "validation.json", result)
    return result


def validate_displacement_at_stations(cube_path: str | os.PathLike, truth_csv: str | os.PathLike) -> dict:
    """Cumulative vertical displacement of a run's cube against a per-epoch truth at stations (mm).

    ``truth_csv`` has columns ``station, lon, lat`` (or a companion ``gnss_truth.csv`` next to it giving them),
    ``date`` and ``du`` (mm, positive up). The cube (``vertical_displacement.nc``, mm since its first epoch) is
    interpolated bilinearly at each station and in time at each truth date inside the cube's span; both series
    are referenced to the cube's first epoch, so a constant offset between them cannot count as an error.
    Returns the RMS over stations of the cumulative displacement at the last common epoch
    (``rmse_final_mm``), the RMS over all station-epochs (``rmse_all_epochs_mm``), the mean bias at the last
    epoch and a per-station table.
    """
    import pandas as pd
    import xarray as xr

    cube_path, truth_csv = Path(cube_path), Path(truth_csv)
    tab = pd.read_csv(truth_csv)
    if not {"lon", "lat"} <= set(tab.columns):
        pos_file = truth_csv.with_name("gnss_truth.csv")
        if not pos_file.is_file():
            raise InputError("The displacement truth has no station positions.", file=truth_csv, field="lon/lat",
                             fix="add lon and lat columns, or keep gnss_truth.csv next to it")
        pos = pd.read_csv(pos_file)[["station", "lon", "lat"]]
        tab = tab.merge(pos, on="station", how="left")
    missing = {"station", "date", "du"} - set(tab.columns)
    if missing:
        raise InputError(f"The displacement truth lacks column(s) {sorted(missing)}.", file=truth_csv,
                         field=",".join(sorted(missing)), fix="give columns station, date, du (mm, positive up)")
    with xr.open_dataset(cube_path) as ds:
        cube = ds["vertical_displacement"].load()
    t_cube = cube["time"].values
    tab["time"] = pd.to_datetime(tab["date"]).values.astype("datetime64[ns]")
    tab = tab[(tab["time"] >= t_cube[0]) & (tab["time"] <= t_cube[-1])]
    rows, resid_all = [], []
    for name, g in tab.groupby("station", sort=True):
        g = g.sort_values("time")
        lon, lat = float(g["lon"].iloc[0]), float(g["lat"].iloc[0])
        series = cube.interp(x=lon, y=lat, method="linear")
        if not np.isfinite(series.values).any():  # at a data edge bilinear sees a NaN neighbour: nearest pixel
            series = cube.sel(x=lon, y=lat, method="nearest")
        est = series.interp(time=g["time"].values).values.astype(float)
        # truth at the cube's first epoch, so both series start from zero there
        true0 = float(np.interp(t_cube[0].astype(np.int64), g["time"].values.astype(np.int64),
                                g["du"].to_numpy(float)))
        true = g["du"].to_numpy(float) - true0
        ok = np.isfinite(est)
        if not ok.any():
            continue
        r = est[ok] - true[ok]
        resid_all.append(r)
        rows.append({"station": name, "lon": lon, "lat": lat, "n_epochs": int(ok.sum()),
                     "true_final_mm": float(true[ok][-1]), "insar_final_mm": float(est[ok][-1]),
                     "residual_final_mm": float(r[-1]), "rms_mm": float(np.sqrt(np.mean(r**2)))})
    if not rows:
        return {"n_stations": 0, "rmse_final_mm": None, "rmse_all_epochs_mm": None, "stations": []}
    fin = np.array([r["residual_final_mm"] for r in rows])
    allr = np.concatenate(resid_all)
    return {"n_stations": len(rows), "rmse_final_mm": float(np.sqrt(np.mean(fin**2))),
            "bias_final_mm": float(np.mean(fin)), "rmse_all_epochs_mm": float(np.sqrt(np.mean(allr**2))),
            "period": [str(t_cube[0])[:10], str(t_cube[-1])[:10]], "stations": rows}


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


def validate_series_folder(out: str | os.PathLike, folder: str | os.PathLike) -> dict:
    """The run's vertical displacement cube against every held-out daily GNSS series in ``folder``.

    Each ``.tenv3``/``.neu`` file is read with :func:`gpu_insar_adjust.io.gnss.read_position_series`; its up
    component (mm) is compared with the cube sampled at the station, both referenced to their common mean over
    the epochs they share (see :func:`analysis.validation.validate_timeseries_against_gnss`).
    """
    import pandas as pd
    import xarray as xr

    from .analysis.validation import validate_timeseries_against_gnss
    from .io.gnss import read_position_series

    out, folder = Path(out), Path(folder)
    cube_path = out / "vertical_displacement.nc"
    if not cube_path.is_file():
        raise InputError("The run has no vertical displacement cube to compare with daily GNSS series.",
                         file=cube_path, field="vertical_displacement.nc",
                         fix="run `gia run` on frames that carry time series (cum.h5 or timeseries.h5)")
    if not folder.is_dir():
        raise InputError("Held-out series folder not found.", file=folder, field="--holdout-series",
                         fix="give a folder of .tenv3 or .neu files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".tenv3", ".neu"))
    if not files:
        raise InputError("No .tenv3 or .neu file in the held-out series folder.", file=folder,
                         field="--holdout-series", fix="put one NGL .tenv3 or SOPAC .neu file per station there")
    series, rows = {}, []
    for f in files:
        ps = read_position_series(f)
        name = str(ps.attrs.get("station") or f.stem)
        series[name] = pd.Series(ps["u"].to_numpy(float), index=pd.DatetimeIndex(ps["time"]))
        rows.append({"station": name, "lon": float(ps.attrs["lon"]), "lat": float(ps.attrs["lat"])})
    with xr.open_dataset(cube_path) as ds:
        cube = ds["vertical_displacement"].load()
    res = validate_timeseries_against_gnss(cube, series, pd.DataFrame(rows))
    res["n_stations"] = len(files)
    return res
