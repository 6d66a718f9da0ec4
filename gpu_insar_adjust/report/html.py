"""``report.html``: one self-contained page (inline CSS, PNG figures as base64 data URIs, no external requests).

:func:`write_report` draws the figures into ``OUT/figures/*.png`` and embeds the same bytes in the page. Every
section is optional: a section whose data are absent from the summary says "not available"; a summary entry
that cannot be read is reported in its section (and logged) instead of stopping the report. Arrays given as
arguments, in contrast, are checked and a malformed one raises :class:`~gpu_insar_adjust.errors.InputError`.
All text taken from the summary is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, OutputError
from ..logs import get_logger
from . import figures as _f

__all__ = ["FIGURE_NAMES", "figure_paths", "write_report"]

log = get_logger("report")

#: Every figure the report can draw, in page order (file stem under ``OUT/figures/``).
FIGURE_NAMES = ("vertical_velocity", "cumulative_displacement", "east_velocity", "validation_scatter",
                "frame_gnss_scatter", "candidate_scores", "overlap_misfits", "annual_subsidence_rate",
                "groundwater_loss")

_NA = "n/a"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#fafafa;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:1.2em 1.5em 3em}
h1{font-size:1.6em;margin:.2em 0 .1em}h2{font-size:1.25em;border-bottom:2px solid #ddd;padding-bottom:.2em;
margin-top:2em}h3{font-size:1.05em;margin:1.2em 0 .4em}
.sub{color:#666;margin-top:0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:.7em;margin:1em 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em .8em}
.card .v{font-size:1.35em;font-weight:600}.card .k{color:#555;font-size:.85em}
table{border-collapse:collapse;margin:.6em 0;background:#fff;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{background:#fde9d9;font-weight:600}tr.skipped td{color:#888;font-style:italic}
figure{margin:1em 0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5em}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#555;font-size:.85em;margin-top:.3em}
.na{color:#888;font-style:italic}.warn{color:#a33}
pre{background:#f4f4f4;padding:.6em;overflow-x:auto;font-size:.8em}
nav a{margin-right:.9em;font-size:.9em}
"""


# ---------------------------------------------------------------------------------------------------------------
# small HTML helpers


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any, nd: int = 2) -> str:
    """A number for a table cell: ``n/a`` for None/NaN, integers as integers, floats with ``nd`` decimals."""
    if v is None:
        return _NA
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    x = _f.as_float(v)
    if math.isnan(x):
        return _NA if not isinstance(v, str) else _e(v)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:,.{nd}f}"


def _fmt_pm(v: Any, s: Any, nd: int = 2) -> str:
    a, b = _fmt(v, nd), _fmt(s, nd)
    return a if b == _NA or a == _NA else f"{a} ± {b}"


def _na(what: str) -> str:
    return f'<p class="na">{_e(what)}: not available.</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, row_classes: Sequence[str] | None = None,
           numeric: Sequence[bool] | None = None, cls: str = "") -> str:
    """A table; ``header`` is escaped here, cells must already be escaped/formatted HTML."""
    numeric = numeric or [False] * len(header)
    out = [f'<table class="{_e(cls)}"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header)
           + "</tr></thead><tbody>"]
    for k, r in enumerate(rows):
        rc = row_classes[k] if row_classes else ""
        cells = "".join(f'<td class="num">{c}</td>' if (i < len(numeric) and numeric[i]) else f"<td>{c}</td>"
                        for i, c in enumerate(r))
        out.append(f'<tr class="{_e(rc)}">{cells}</tr>' if rc else f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _cards(items: Sequence[tuple[str, str]]) -> str:
    cards = "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{_e(k)}</div></div>'
                    for k, v in items)
    return f'<div class="cards">{cards}</div>'


def _get(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]...`` or None where any level is missing or not a mapping."""
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return None
        d = d[p]
    return d


def _first(d: Any, keys: Sequence[str]) -> Any:
    if not isinstance(d, Mapping):
        return None
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


class _Figures:
    """Figures drawn for this report: file stems, paths and captions, embedded as data URIs."""

    def __init__(self, fig_dir: Path):
        self.dir = fig_dir
        self.written: list[Path] = []

    def draw(self, name: str, fn: Callable[..., Path | None], *args, caption: str, **kw) -> str:
        """Draw figure ``name`` with ``fn(*args, path, **kw)``; return its <figure> HTML ('' if nothing drawn)."""
        path = self.dir / f"{name}.png"
        got = fn(*args, path, **kw)
        if got is None:
            return ""
        self.written.append(path)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        rel = f"figures/{path.name}"
        return (f'<figure data-file="{_e(rel)}"><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
                f"<figcaption>{_e(caption)} <span class=\"na\">({_e(rel)})</span></figcaption></figure>")


# ---------------------------------------------------------------------------------------------------------------
# argument checks (arrays given by the caller must be well formed; the summary is read leniently)


def _check_grid(da: Any, name: str) -> None:
    dims = getattr(da, "dims", None)
    if dims is None or set(dims) != {"y", "x"}:
        raise InputError(f"{name} must be an xarray DataArray with dims (y, x); got {type(da).__name__} "
                         f"with dims {dims!r}.", field=name,
                         fix="pass the (y, x) grid from the pipeline, e.g. RunResult.vertical_velocity")


def _check_points(vp: Any) -> dict[str, np.ndarray]:
    if not isinstance(vp, Mapping):
        raise InputError(f"validation_points must be a dict of arrays; got {type(vp).__name__}.",
                         field="validation_points", fix="pass {'station': [...], 'observed': [...], "
                                                        "'predicted': [...]} (mm/yr), optionally 'before'")
    for key in ("observed", "predicted"):
        if key not in vp:
            raise InputError(f"validation_points lacks {key!r}.", field=f"validation_points.{key}",
                             fix="give 'observed' (GNSS, mm/yr) and 'predicted' (InSAR, mm/yr) arrays")
    out = {k: np.asarray(vp[k], float).ravel() for k in ("observed", "predicted", "before")
           if vp.get(k) is not None}
    n = out["observed"].size
    out["station"] = np.asarray(vp.get("station", [f"#{k}" for k in range(n)]), dtype=object).ravel()
    for k, v in out.items():
        if v.size != n:
            raise InputError(f"validation_points[{k!r}] has {v.size} values but 'observed' has {n}.",
                             field=f"validation_points.{k}", fix="give one value per station in every array")
    return out


def _check_frame_scatter(fs: Any) -> dict[str, dict[str, np.ndarray]]:
    if not isinstance(fs, Mapping):
        raise InputError(f"frame_scatter must be a dict frame_id -> dict of arrays; got {type(fs).__name__}.",
                         field="frame_scatter", fix="pass {frame_id: {'gnss_los': [...], 'insar_before': [...], "
                                                    "'insar_after': [...]}} (mm/yr)")
    out = {}
    for fid, d in fs.items():
        if not isinstance(d, Mapping) or "gnss_los" not in d:
            raise InputError(f"frame_scatter[{fid!r}] lacks 'gnss_los'.", field=f"frame_scatter.{fid}",
                             fix="give 'gnss_los' and 'insar_before' and/or 'insar_after' arrays (mm/yr)")
        arrs = {k: np.asarray(d[k], float).ravel() for k in ("gnss_los", "insar_before", "insar_after")
                if d.get(k) is not None}
        n = arrs["gnss_los"].size
        for k, v in arrs.items():
            if v.size != n:
                raise InputError(f"frame_scatter[{fid!r}][{k!r}] has {v.size} values but 'gnss_los' has {n}.",
                                 field=f"frame_scatter.{fid}.{k}", fix="give one value per station in every array")
        out[str(fid)] = arrs
    return out


# ---------------------------------------------------------------------------------------------------------------
# sections


def _validation_stats(v: Any) -> dict | None:
    """Canonical {n, rmse, bias, mae, std, r2, pearson_r} from a validation entry (nested 'overall' or flat)."""
    if not isinstance(v, Mapping):
        return None
    src = v.get("overall") if isinstance(v.get("overall"), Mapping) else v
    out = {}
    for k in ("rmse", "bias", "mae", "std", "r2", "pearson_r"):
        out[k] = _first(src, (f"{k}_mm_yr", k))
    out["n"] = _first(src, ("n", "n_stations_used", "n_used"))
    out["n_stations"] = src.get("n_stations")
    out["n_unsampled"] = src.get("n_unsampled")
    return out if any(out[k] is not None for k in ("rmse", "bias", "mae", "n")) else None


def _headline(s: Mapping) -> str:
    thr = s.get("subsidence_threshold_mm_yr")
    cards = []
    area = s.get("subsidence_area_km2")
    cards.append((f"area subsiding faster than {_fmt(thr, 1)} mm/yr" if thr is not None
                  else "subsidence area above threshold", f"{_fmt(area, 1)} km²"))
    for key, label in (("max_subsidence_rate_mm_yr", "maximum subsidence rate"),
                       ("mean_subsidence_rate_mm_yr", "mean subsidence rate (area above threshold)")):
        if s.get(key) is not None:
            cards.append((label, f"{_fmt(s[key], 1)} mm/yr"))
    if s.get("subsidence_volume_rate_m3_yr") is not None:
        cards.append(("volume loss rate (area above threshold)",
                      f"{_fmt(_f.as_float(s['subsidence_volume_rate_m3_yr']) / 1e6, 1)} million m³/yr"))
    if s.get("valid_area_km2") is not None:
        cards.append(("area with data", f"{_fmt(s['valid_area_km2'], 0)} km²"))
    hs = s.get("hotspots")
    if isinstance(hs, Sequence) and not isinstance(hs, str):
        cards.append(("hotspots", _fmt(len(hs))))
    val = _validation_stats(s.get("validation"))
    if val:
        cards.append(("vertical RMSE vs held-out GNSS", f"{_fmt(val['rmse'])} mm/yr"))
        cards.append(("bias vs held-out GNSS (InSAR − GNSS)", f"{_fmt(val['bias'])} mm/yr"))
        cards.append(("held-out GNSS stations", _fmt(val["n"])))
    base = _validation_stats(_get(s, "baseline", "validation"))
    if base:
        cards.append(("baseline RMSE vs held-out GNSS", f"{_fmt(base['rmse'])} mm/yr"))
    net = s.get("network")
    if isinstance(net, Mapping) and (net.get("overlap_rms_before_mm_yr") is not None
                                     or net.get("overlap_rms_after_mm_yr") is not None):
        before, after = _fmt(net.get("overlap_rms_before_mm_yr")), _fmt(net.get("overlap_rms_after_mm_yr"))
        cards.append(("overlap RMS before → after network", f"{before} → {after} mm/yr"))
        if net.get("overlap_rms_all_pixels_after_mm_yr") is not None:
            cards.append(("overlap RMS, all overlap pixels", f"{_fmt(net.get('overlap_rms_all_pixels_before_mm_yr'))}"
                                                             f" → {_fmt(net['overlap_rms_all_pixels_after_mm_yr'])}"
                                                             " mm/yr"))
    gw = s.get("groundwater")
    if isinstance(gw, Mapping) and gw.get("total_loss_m3") is not None:
        km3 = _fmt_pm(_f.as_float(gw["total_loss_m3"]) / 1e9, _f.as_float(gw.get("total_loss_std_m3")) / 1e9, 3)
        cards.append(("groundwater storage loss", f"{km3} km³"))
    return _cards(cards)


def _maps(s: Mapping, figs: _Figures, vv, cum, ev) -> str:
    parts = []
    hs = s.get("hotspots")
    points = []
    if isinstance(hs, Sequence) and not isinstance(hs, str):
        for k, h in enumerate(hs):
            if isinstance(h, Mapping):
                points.append({"lon": _first(h, ("peak_lon", "lon", "centroid_lon")),
                               "lat": _first(h, ("peak_lat", "lat", "centroid_lat")),
                               "label": h.get("id", k + 1)})
    if vv is not None:
        fig = figs.draw("vertical_velocity", _f.map_figure, vv, title="Vertical velocity",
                        units="mm/yr (positive up; red = subsidence)", points=points or None,
                        caption="Vertical velocity (mm/yr, positive up), colour scale centred on 0; circles mark "
                                "hotspot peaks numbered as in the hotspot table.")
        parts.append(fig or _na("Vertical velocity map (no finite value)"))
    else:
        parts.append(_na("Vertical velocity map"))
    if cum is not None:
        fig = figs.draw("cumulative_displacement", _f.map_figure, cum, title="Cumulative vertical displacement",
                        units="mm (negative = subsidence)",
                        caption="Cumulative vertical displacement over the period (mm; negative = down).")
        parts.append(fig or _na("Cumulative displacement map (no finite value)"))
    else:
        parts.append(_na("Cumulative displacement map"))
    if ev is not None:
        fig = figs.draw("east_velocity", _f.map_figure, ev, title="East velocity", units="mm/yr (positive east)",
                        caption="East velocity from ascending + descending decomposition (mm/yr, positive east).")
        parts.append(fig or _na("East velocity map (no finite value)"))
    return "".join(parts)


def _validation(s: Mapping, figs: _Figures, vp: dict | None, fs: dict | None) -> str:
    parts = []
    rows, labels = [], []
    base_label = f"baseline: {_get(s, 'baseline', 'method') or 'baseline'}"
    for label, v in (("adjusted (this run)", s.get("validation")),
                     (base_label, _get(s, "baseline", "validation"))):
        st = _validation_stats(v)
        if st:
            labels.append(label)
            rows.append([_e(label), _fmt(st["n"]), _fmt(st["rmse"]), _fmt(st["bias"]), _fmt(st["mae"]),
                         _fmt(st["std"]), _fmt(st["r2"], 3), _fmt(st["pearson_r"], 3)])
    if rows:
        parts.append(_table(["map", "n", "RMSE (mm/yr)", "bias (mm/yr)", "MAE (mm/yr)", "std (mm/yr)", "R²", "r"],
                            rows, numeric=[False] + [True] * 7))
        parts.append('<p class="sub">Differences are InSAR − GNSS vertical velocity at held-out stations.</p>')
    else:
        parts.append(_na("Validation statistics against held-out GNSS"))

    panels = []
    if vp is not None:
        series = []
        if "before" in vp:
            series.append({"label": "before adjustment", "values": vp["before"], "colour": _f._BEFORE})
        series.append({"label": "after adjustment", "values": vp["predicted"], "colour": _f._AFTER})
        panels.append({"title": "Held-out GNSS, vertical", "reference": vp["observed"], "series": series})
    else:
        sc = _get(s, "validation", "scatter")
        if isinstance(sc, Sequence) and not isinstance(sc, str) and sc:
            pts = [p for p in sc if isinstance(p, Mapping)]
            ref = np.array([_f.as_float(p.get("gnss")) for p in pts])
            series = []
            base = _get(s, "baseline", "validation", "scatter")
            if isinstance(base, Sequence) and not isinstance(base, str):
                bmap = {str(p.get("station")): _f.as_float(p.get("insar")) for p in base if isinstance(p, Mapping)}
                series.append({"label": "baseline", "colour": _f._BEFORE,
                               "values": np.array([bmap.get(str(p.get("station")), np.nan) for p in pts])})
            series.append({"label": "adjusted", "colour": _f._AFTER,
                           "values": np.array([_f.as_float(p.get("insar")) for p in pts])})
            panels.append({"title": "Held-out GNSS, vertical", "reference": ref, "series": series})
    fig = ""
    if panels:
        fig = figs.draw("validation_scatter", _f.scatter_figure, panels,
                        caption="InSAR against held-out GNSS vertical velocity (mm/yr); dashed line 1:1.")
    parts.append(fig or _na("Held-out GNSS scatter plot"))
    if vp is not None:
        n = vp["observed"].size
        head = ["station", "GNSS (mm/yr)", "InSAR after (mm/yr)", "residual (mm/yr)"]
        if "before" in vp:
            head.insert(2, "InSAR before (mm/yr)")
        rows = []
        for k in range(min(n, 300)):
            r = [_e(vp["station"][k]), _fmt(vp["observed"][k])]
            if "before" in vp:
                r.append(_fmt(vp["before"][k]))
            r += [_fmt(vp["predicted"][k]), _fmt(vp["predicted"][k] - vp["observed"][k])]
            rows.append(r)
        parts.append(f"<details><summary>Per-station values ({n} stations"
                     + (", first 300 shown" if n > 300 else "") + ")</summary>"
                     + _table(head, rows, numeric=[False] + [True] * (len(head) - 1)) + "</details>")

    if fs:
        panels = []
        for fid, d in fs.items():
            series = []
            if "insar_before" in d:
                series.append({"label": "before", "values": d["insar_before"], "colour": _f._BEFORE})
            if "insar_after" in d:
                series.append({"label": "after", "values": d["insar_after"], "colour": _f._AFTER})
            panels.append({"title": f"frame {fid}", "reference": d["gnss_los"], "series": series})
        fig = figs.draw("frame_gnss_scatter", _f.scatter_figure, panels,
                        caption="Per frame: InSAR LOS velocity against GNSS projected on the LOS (mm/yr), before "
                                "and after the frame's correction.")
        parts.append("<h3>GNSS in each frame (LOS)</h3>" + (fig or _na("Per-frame GNSS scatter plots")))
    return "".join(parts)


def _flagged_names(rep: Mapping) -> list[str]:
    raw = _first(rep, ("flagged_stations", "flagged"))
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        return []
    out = []
    for f in raw:
        if isinstance(f, Mapping):
            name = str(f.get("station", f.get("index", "?")))
            z = f.get("robust_z")
            out.append(f"{name} (z={_fmt(z, 1)})" if z is not None else name)
        else:
            out.append(str(f))
    return out


def _frames(s: Mapping, figs: _Figures) -> str:
    frames = s.get("frames")
    if isinstance(frames, Sequence) and not isinstance(frames, str):  # a list of frame reports
        frames = {str(_first(r, ("frame_id", "id")) or k): r for k, r in enumerate(frames)}
    if not isinstance(frames, Mapping) or not frames:
        return _na("Per-frame model selection")
    parts = []
    fig = figs.draw("candidate_scores", _f.candidate_scores_figure, frames,
                    caption="Cross-validated RMSE ± standard error of every candidate correction model, per "
                            "frame; the chosen model in orange (✓).")
    parts.append(fig or _na("Candidate score chart (no candidate scores in the summary)"))

    rows = []
    for fid, rep in frames.items():
        if not isinstance(rep, Mapping):
            continue
        b, a = _f.frame_rmse(rep)
        hold = rep.get("holdout") if isinstance(rep.get("holdout"), Mapping) else {}
        n_gnss = _first(rep, ("n_gnss", "n_stations_used", "n_stations"))
        if n_gnss is None:
            n_gnss = _get(rep, "training", "n")
        flagged = _flagged_names(rep)
        rows.append([_e(fid), _e(rep.get("orbit") or ""), _e(_f.selected_model(rep) or "none"),
                     _e(rep.get("reason") or rep.get("fallback") or rep.get("note") or ""), _fmt(n_gnss), _fmt(b),
                     _fmt(a), _fmt(_f.as_float(hold.get("rmse_before")) if hold else None),
                     _fmt(_f.as_float(hold.get("rmse_after")) if hold else None),
                     _e(rep.get("network_held_by") or ""), _e(", ".join(flagged)) if flagged else "—"])
    parts.append("<h3>Frames</h3>" + _table(
        ["frame", "orbit", "chosen model", "why", "GNSS used", "RMSE before (mm/yr)", "RMSE after (mm/yr)",
         "held-out before", "held-out after", "network held by", "flagged stations"],
        rows, numeric=[False] * 4 + [True] * 5 + [False, False]))

    rows, classes = [], []
    for fid, rep in frames.items():
        if not isinstance(rep, Mapping):
            continue
        chosen = _f.selected_model(rep)
        cands = _f.frame_candidates(rep)
        if not cands:
            rows.append([_e(fid), '<span class="na">no candidates reported</span>', _NA, ""])
            classes.append("")
            continue
        for k, c in enumerate(cands):
            is_chosen = c["name"] == chosen
            if c["skipped"] is not None:
                status, cls = f"skipped: {_e(c['skipped'])}", "skipped"
            else:
                status, cls = ("✓ chosen" if is_chosen else ""), ("chosen" if is_chosen else "")
            if is_chosen and c["skipped"] is not None:
                status, cls = "✓ chosen (fallback) — " + status, "chosen"
            rows.append([_e(fid) if k == 0 else "", _e(c["name"]), _fmt_pm(c["cv_rmse"], c["cv_se"], 3), status])
            classes.append(cls)
    parts.append("<h3>Candidate models (spatial cross-validation)</h3>"
                 + _table(["frame", "candidate", "CV RMSE ± SE (mm/yr)", "status"], rows, row_classes=classes,
                          numeric=[False, False, True, False], cls="candidates"))
    return "".join(parts)


def _network(s: Mapping, figs: _Figures) -> str:
    net = s.get("network")
    if not isinstance(net, Mapping):
        return _na("Network adjustment")
    frames = s.get("frames")
    ids = list(frames.keys()) if isinstance(frames, Mapping) else []
    parts = []
    info = [(k, net.get(k)) for k in ("order", "iterations", "rcond", "rcond_data", "overlap_rms_before_mm_yr",
                                      "overlap_rms_after_mm_yr", "overlap_rms_after_polynomial_mm_yr",
                                      "overlap_rms_all_pixels_before_mm_yr", "overlap_rms_all_pixels_after_mm_yr")
            if net.get(k) is not None]
    if info:
        parts.append(_table(["quantity", "value"], [[_e(k), _fmt(v, 4 if "rcond" not in k else 6)
                                                     if not isinstance(v, (int, np.integer)) else _fmt(v)]
                                                    for k, v in info], numeric=[False, True]))
    by_kind = net.get("overlap_rms_by_kind")
    if isinstance(by_kind, Mapping) and by_kind:
        keys = ("rms_before_mm_yr", "rms_after_mm_yr", "rms_all_pixels_before_mm_yr", "rms_all_pixels_after_mm_yr")
        rows = [[_e(kind), _fmt(d.get("n_pairs"))] + [_fmt(d.get(k), 2) for k in keys]
                for kind, d in by_kind.items() if isinstance(d, Mapping)]
        parts.append(_table(["pair kind", "pairs", "compared before", "compared after", "all pixels before",
                             "all pixels after"], rows, numeric=[False] + [True] * 5))
    pairs = net.get("pairs")
    if isinstance(pairs, Sequence) and not isinstance(pairs, str) and pairs:
        fig = figs.draw("overlap_misfits", _f.overlap_misfit_figure, pairs, frame_ids=ids,
                        caption="RMS difference of the LOS (or vertical) velocities of two frames in their "
                                "overlap, before and after the network adjustment (mm/yr).")
        parts.append(fig or _na("Overlap misfit chart (no pair with a misfit)"))
    else:
        parts.append(_na("Frame overlap misfits"))
    return "".join(parts)


def _annual(s: Mapping, figs: _Figures) -> str:
    rates = s.get("annual_mean_subsidence_rate_mm_yr")
    peak = s.get("peak_year")
    if not isinstance(rates, Mapping):
        ann = s.get("annual") if isinstance(s.get("annual"), Mapping) else None
        rates = ann.get("annual_mean_subsidence_rate_mm_yr") if ann else None
        peak = ann.get("peak_year") if ann else peak
    if not isinstance(rates, Mapping) or not rates:
        return _na("Annual mean subsidence rates")
    fig = figs.draw("annual_subsidence_rate", _f.annual_rate_figure, rates, peak_year=peak,
                    caption="Area-weighted mean subsidence rate of each year (mm/yr, positive down); the peak "
                            "year highlighted.")
    src = s if "annual_mean_subsidence_rate_mm_yr" in s else (s.get("annual") or {})
    extra = [(k, src.get(k)) for k in ("trend_slope_mm_yr2", "trend_slope_std_mm_yr2", "easing", "easing_rule")
             if src.get(k) is not None]
    tbl = _table(["quantity", "value"], [[_e(k), _fmt(v, 3) if not isinstance(v, str) else _e(v)]
                                         for k, v in extra]) if extra else ""
    return (fig or _na("Annual rate chart (no finite rate)")) + tbl


_HOTSPOT_LABELS = {
    "id": ("#", 0), "area_km2": ("area (km²)", 2), "peak_subsidence_rate_mm_yr": ("peak rate (mm/yr)", 1),
    "max_subsidence_rate_mm_yr": ("max rate (mm/yr)", 1), "peak_rate_mm_yr": ("peak rate (mm/yr)", 1),
    "mean_subsidence_rate_mm_yr": ("mean rate (mm/yr)", 1), "mean_rate_mm_yr": ("mean rate (mm/yr)", 1),
    "volume_rate_m3_yr": ("volume rate (m³/yr)", 0), "centroid_lon": ("centroid lon (°)", 4),
    "centroid_lat": ("centroid lat (°)", 4), "peak_lon": ("peak lon (°)", 4), "peak_lat": ("peak lat (°)", 4),
    "n_pixels": ("pixels", 0), "nearest_station": ("nearest GNSS", 0),
    "nearest_station_distance_km": ("distance to it (km)", 1),
}


def _digits(key: str) -> int:
    """Decimals for a summary value from its key's unit suffix (volumes in m³ whole, degrees 4, fractions 3)."""
    k = key.lower()
    if k.endswith(("_m3", "_m3_yr")) or k.startswith("n_") or k == "n":
        return 0
    if "lon" in k or "lat" in k:
        return 4
    if k.endswith(("fraction", "coverage", "_r", "r2")):
        return 3
    if k.endswith(("_mm", "_km2", "_km")):
        return 1
    return 2


_UNIT_SUFFIXES = (("_m3_yr", " (m³/yr)"), ("_mm_yr2", " (mm/yr²)"), ("_mm_yr", " (mm/yr)"), ("_km2", " (km²)"),
                  ("_m3", " (m³)"), ("_km", " (km)"), ("_mm", " (mm)"), ("_m", " (m)"))


def _label(key: str) -> str:
    """A column heading from a summary key: ``released_std_m3`` → ``released std (m³)``."""
    for suf, unit in _UNIT_SUFFIXES:
        if key.endswith(suf) and len(key) > len(suf):
            return key[: -len(suf)].replace("_", " ") + unit
    return key.replace("_", " ")


def _generic_table(items: Sequence[Mapping], labels: Mapping[str, tuple[str, int]], limit: int = 200) -> str:
    """A table of dicts over the union of their scalar keys (known keys first, in ``labels`` order)."""
    keys: list[str] = [k for k in labels if any(k in it for it in items)]
    for it in items:
        for k, v in it.items():
            if k not in keys and (v is None or isinstance(v, (str, int, float, bool, np.number))):
                keys.append(k)
    rows = []
    for it in items[:limit]:
        row = []
        for k in keys:
            v = it.get(k)
            nd = labels.get(k, (k, _digits(k)))[1]
            row.append(_e(v) if isinstance(v, str) else _fmt(v, nd))
        rows.append(row)
    numeric = [any(isinstance(it.get(k), (int, float, np.number)) and not isinstance(it.get(k), bool)
                   for it in items) for k in keys]
    note = f'<p class="sub">First {limit} of {len(items)} shown.</p>' if len(items) > limit else ""
    return _table([labels.get(k, (_label(k), 2))[0] for k in keys], rows, numeric=numeric) + note


def _hotspots(s: Mapping) -> str:
    hs = s.get("hotspots")
    if not isinstance(hs, Sequence) or isinstance(hs, str) or not hs:
        return _na("Subsidence hotspots")
    items = [h for h in hs if isinstance(h, Mapping)]
    if not items:
        return _na("Subsidence hotspots")
    thr = s.get("subsidence_threshold_mm_yr")
    head = (f'<p class="sub">Connected areas subsiding faster than {_fmt(thr, 1)} mm/yr, largest first.</p>'
            if thr is not None else "")
    return head + _generic_table(items, _HOTSPOT_LABELS)


def _groundwater(s: Mapping, figs: _Figures) -> str:
    gw = s.get("groundwater")
    if not isinstance(gw, Mapping):
        return _na("Groundwater storage loss")
    parts = []
    tot, sd = _f.as_float(gw.get("total_loss_m3")), _f.as_float(gw.get("total_loss_std_m3"))
    rows = []
    if not math.isnan(tot):
        rows.append(["total storage loss", _fmt_pm(tot, sd, 0) + " m³", _fmt_pm(tot / 1e9, sd / 1e9, 4) + " km³"])
    for k, label in (("total_released_m3", "total water released"), ("aquifer_area_km2", "aquifer area")):
        if gw.get(k) is not None:
            v = _f.as_float(gw[k])
            rows.append([label, _fmt(v, 0 if k.endswith("m3") else 1) + (" m³" if k.endswith("m3") else " km²"),
                         (_fmt(v / 1e9, 4) + " km³") if k.endswith("m3") else ""])
    if rows:
        parts.append(_table(["quantity", "value", "billion m³"], rows, numeric=[False, True, True]))
    periods = gw.get("periods")
    if isinstance(periods, Sequence) and not isinstance(periods, str) and periods:
        items = [p for p in periods if isinstance(p, Mapping)]
        head = ["start", "end", "loss (m³)", "loss (km³)"]
        rows = []
        for p in items:
            loss, lsd = _f.as_float(p.get("loss_m3")), _f.as_float(p.get("loss_std_m3"))
            rows.append([_e(p.get("start", "")), _e(p.get("end", "")), _fmt_pm(loss, lsd, 0),
                         _fmt_pm(loss / 1e9, lsd / 1e9, 4)])
        extra = [k for k in dict.fromkeys(k for p in items for k in p)
                 if k not in ("start", "end", "loss_m3", "loss_std_m3")
                 and all(p.get(k) is None or isinstance(p.get(k), (str, int, float, np.number)) for p in items)]
        for p, r in zip(items, rows):
            r += [_e(p.get(k)) if isinstance(p.get(k), str) else _fmt(p.get(k), _digits(k)) for k in extra]
        numeric = [False, False] + [True] * (2 + len(extra))
        parts.append("<h3>Per period</h3>" + _table(head + [_label(k) for k in extra], rows, numeric=numeric))
        fig = figs.draw("groundwater_loss", _f.groundwater_figure, items,
                        caption="Groundwater storage loss per period (km³ = billion m³), ±1σ.")
        parts.append(fig)
    else:
        parts.append(_na("Per-period groundwater storage loss"))
    asm = gw.get("assumptions")
    if isinstance(asm, Mapping) and asm:
        parts.append("<h3>Assumptions</h3><dl>" + "".join(
            f"<dt><b>{_e(k)}</b></dt><dd>{_e(v if isinstance(v, str) else json.dumps(v, default=str))}</dd>"
            for k, v in asm.items()) + "</dl>")
    elif isinstance(asm, (str, Sequence)) and asm:
        items = [asm] if isinstance(asm, str) else list(asm)
        parts.append("<h3>Assumptions</h3><ul>" + "".join(f"<li>{_e(a)}</li>" for a in items) + "</ul>")
    return "".join(parts)


def _provenance(s: Mapping) -> str:
    p = s.get("provenance")
    if not isinstance(p, Mapping):
        return _na("Provenance")
    rows = [[_e(k), _e(p[k])] for k in ("version", "backend", "fingerprint", "wall_seconds")
            if p.get(k) is not None]
    for k in ("mode",):
        if s.get(k) is not None:
            rows.append([_e(k), _e(s[k])])
    parts = [_table(["item", "value"], rows)] if rows else []
    st = p.get("stage_seconds") or p.get("stage_times")
    if isinstance(st, Mapping) and st:
        parts.append("<h3>Stage times</h3>" + _table(["stage", "seconds"], [[_e(k), _fmt(v, 2)] for k, v in
                                                                           st.items()], numeric=[False, True]))
    for key, label in (("inputs_sha256", "Input checksums"), ("config", "Configuration")):
        if p.get(key) is not None:
            parts.append(f"<details><summary>{_e(label)}</summary><pre>"
                         f"{_e(json.dumps(p[key], indent=2, default=str, sort_keys=True))}</pre></details>")
    return "".join(parts) or _na("Provenance")


# ---------------------------------------------------------------------------------------------------------------
# entry points


def figure_paths(out_dir: str | os.PathLike) -> list[Path]:
    """The PNG figures of the report in ``out_dir/figures`` (those the last :func:`write_report` wrote)."""
    d = Path(out_dir) / "figures"
    return [d / f"{n}.png" for n in FIGURE_NAMES if (d / f"{n}.png").is_file()]


def write_report(out_dir: str | os.PathLike, summary: Mapping, *, vertical_velocity=None, cumulative=None,
                 east_velocity=None, validation_points: Mapping | None = None,
                 frame_scatter: Mapping | None = None, title: str = "InSAR subsidence report") -> Path:
    """Write ``out_dir/report.html`` (self-contained) and its figures as ``out_dir/figures/*.png``.

    Parameters
    ----------
    summary
        The run summary (``summary.json`` as a dict). Every entry is optional: subsidence statistics
        (``subsidence_area_km2``, ...), ``frames`` (per-frame reports with ``candidates``), ``network``
        (``pairs``), ``annual_mean_subsidence_rate_mm_yr``, ``hotspots``, ``groundwater``, ``validation``,
        ``baseline``, ``provenance``.
    vertical_velocity, cumulative, east_velocity
        DataArrays (y, x): vertical velocity (mm/yr, positive up), cumulative vertical displacement over the
        period (mm), east velocity (mm/yr); lon/lat coordinates (EPSG:4326) or a projected CRS in metres.
    validation_points
        ``{"station", "observed" (GNSS), "predicted" (InSAR after), "before" (optional)}`` arrays in mm/yr. Without
        it the scatter plot uses ``summary["validation"]["scatter"]`` when present.
    frame_scatter
        ``{frame_id: {"gnss_los", "insar_before", "insar_after"}}`` arrays in mm/yr.

    Returns the path of ``report.html``. Figures of a previous report that this one does not draw are removed,
    so :func:`figure_paths` lists exactly this report's figures.
    """
    if not isinstance(summary, Mapping):
        raise InputError(f"summary must be a dict (the contents of summary.json); got {type(summary).__name__}.",
                         field="summary", fix="pass the dict returned by the pipeline or json.load(summary.json)")
    for name, da in (("vertical_velocity", vertical_velocity), ("cumulative", cumulative),
                     ("east_velocity", east_velocity)):
        if da is not None:
            _check_grid(da, name)
    vp = _check_points(validation_points) if validation_points is not None else None
    fs = _check_frame_scatter(frame_scatter) if frame_scatter is not None else None

    out = Path(out_dir)
    fig_dir = out / "figures"
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the report folder: {exc.strerror or exc}.", file=fig_dir,
                          fix="choose an output folder you can write to") from exc
    figs = _Figures(fig_dir)

    def section(anchor: str, heading: str, build: Callable[[], str]) -> tuple[str, str, str]:
        try:
            body = build()
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as exc:
            if isinstance(exc, InputError):
                raise
            # a malformed summary entry must not cost the user the rest of the report; say so, visibly
            log.warning("report section %r could not be drawn: %s: %s", heading, type(exc).__name__, exc)
            body = (f'<p class="warn">This section could not be drawn from the summary '
                    f"({_e(type(exc).__name__)}: {_e(exc)}).</p>")
        return anchor, heading, body

    sections = [
        section("headline", "Headline figures", lambda: _headline(summary)),
        section("maps", "Maps", lambda: _maps(summary, figs, vertical_velocity, cumulative, east_velocity)),
        section("validation", "Validation against GNSS", lambda: _validation(summary, figs, vp, fs)),
        section("frames", "Per-frame correction models", lambda: _frames(summary, figs)),
        section("network", "Network adjustment of frame overlaps", lambda: _network(summary, figs)),
        section("annual", "Annual subsidence rates", lambda: _annual(summary, figs)),
        section("hotspots", "Subsidence hotspots", lambda: _hotspots(summary)),
        section("groundwater", "Groundwater storage loss", lambda: _groundwater(summary, figs)),
        section("provenance", "Provenance", lambda: _provenance(summary)),
    ]
    written = {p.name for p in figs.written}
    for n in FIGURE_NAMES:  # figures of an earlier report that this one did not draw
        p = fig_dir / f"{n}.png"
        if p.name not in written and p.exists():
            p.unlink()

    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    version = _get(summary, "provenance", "version")
    nav = "<nav>" + "".join(f'<a href="#{a}">{_e(h)}</a>' for a, h, _ in sections) + "</nav>"
    body = "".join(f'<section id="{a}"><h2>{_e(h)}</h2>{b}</section>' for a, h, b in sections)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
            f"<h1>{_e(title)}</h1><p class=\"sub\">Generated {_e(now)}"
            + (f" by gpu_insar_adjust {_e(version)}" if version else "")
            + ". Velocities in mm/yr (vertical positive up), displacements in mm, areas on the ellipsoid.</p>"
            + nav + body + "</main></body></html>\n")
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"Cannot write the report: {exc.strerror or exc}.", file=path,
                          fix="choose an output folder you can write to") from exc
    log.info("report: %s (%d figures, %.1f kB)", path, len(figs.written), path.stat().st_size / 1e3)
    return path
