"""Report figures, drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global state).

Each ``*_figure`` function draws one PNG at ``path`` and returns the path, or ``None`` when it has nothing to
draw (the report then says "not available"). Figures are closed as soon as they are saved: the canvas and the
figure go out of scope together, so drawing many reports does not grow memory.

The helpers ``frame_candidates``, ``selected_model``, ``frame_rmse``, ``pair_label`` read the per-frame and
network entries of ``summary.json`` robustly: they accept the keys written by :mod:`gpu_insar_adjust.adjust.frame`
and :mod:`gpu_insar_adjust.network` (``chosen``, ``rmse``, ``se``, ``training``, ``i``/``j``) as well as the
descriptive aliases (``selected_model``, ``cv_rmse``, ``cv_se``, ``rmse_before_mm_yr``, ``frames``).

Units: velocities mm/yr (positive up), displacements mm; map axes are longitude/latitude degrees drawn with an
aspect of 1/cos(latitude) so that a kilometre east and a kilometre north have the same length on the page.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..errors import InputError

__all__ = ["DPI", "annual_rate_figure", "as_float", "candidate_scores_figure", "frame_candidates", "frame_rmse",
           "groundwater_figure", "map_figure", "overlap_misfit_figure", "pair_label", "rmse", "scatter_figure",
           "selected_model"]

#: Resolution of every PNG (dots per inch).
DPI = 110
#: Largest map side drawn, in pixels; bigger grids are decimated for the picture only (products are untouched).
MAX_MAP_PIXELS = 1600

_CHOSEN = "#d95f02"
_OTHER = "#7570b3"
_BEFORE = "#9e9e9e"
_AFTER = "#1b9e77"


# ---------------------------------------------------------------------------------------------------------------
# robust readers of summary entries


def as_float(v: Any) -> float:
    """``v`` as a float; NaN for None, strings that are not numbers, or anything else unreadable."""
    if v is None or isinstance(v, bool):
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def rmse(a: Any, b: Any) -> float:
    """Root-mean-square of ``a − b`` over pairs where both are finite (NaN when none)."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.sqrt(np.mean((a[ok] - b[ok]) ** 2))) if ok.any() else float("nan")


def frame_candidates(frame_report: Mapping) -> list[dict]:
    """Candidates of one frame as ``[{name, cv_rmse, cv_se, skipped}]`` (mm/yr; ``skipped`` a reason or None).

    Accepts a dict ``{name: {...}}`` or a list of dicts, with ``rmse``/``cv_rmse``/``cv_rmse_mm_yr`` and
    ``se``/``cv_se``/``cv_se_mm_yr``; ``skipped`` may be a reason string, ``True`` (reason in ``reason``) or
    absent.
    """
    raw = frame_report.get("candidates") if isinstance(frame_report, Mapping) else None
    if isinstance(raw, Mapping):
        items = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        items = [(str(v.get("name", f"candidate {k}")) if isinstance(v, Mapping) else str(v), v)
                 for k, v in enumerate(raw)]
    else:
        return []
    out = []
    for name, v in items:
        v = v if isinstance(v, Mapping) else {}
        name = str(v.get("name", name))
        r = _first(v, ("cv_rmse", "cv_rmse_mm_yr", "rmse", "rmse_mm_yr"))
        se = _first(v, ("cv_se", "cv_se_mm_yr", "se", "se_mm_yr"))
        skipped = v.get("skipped")
        if skipped is True or (skipped and not isinstance(skipped, str)):
            skipped = str(v.get("reason") or "skipped")
        elif not skipped:
            skipped = None
        out.append({"name": name, "cv_rmse": as_float(r), "cv_se": as_float(se), "skipped": skipped})
    return out


def selected_model(frame_report: Mapping) -> str | None:
    """The model chosen for a frame (``selected_model``, ``chosen`` or ``model``), or None."""
    if not isinstance(frame_report, Mapping):
        return None
    v = _first(frame_report, ("selected_model", "chosen", "model"))
    return None if v is None else str(v)


def frame_rmse(frame_report: Mapping) -> tuple[float, float]:
    """Station RMS misfit of a frame before and after its correction (mm/yr), NaN when absent."""
    if not isinstance(frame_report, Mapping):
        return float("nan"), float("nan")
    b = _first(frame_report, ("rmse_before_mm_yr", "rmse_before"))
    a = _first(frame_report, ("rmse_after_mm_yr", "rmse_after"))
    tr = frame_report.get("training")
    if isinstance(tr, Mapping):
        b = tr.get("rmse_before") if b is None else b
        a = tr.get("rmse_after") if a is None else a
    return as_float(b), as_float(a)


def pair_label(pair: Mapping, frame_ids: Sequence[str] = ()) -> str:
    """``"A – B (kind)"`` for an overlap pair given as ``frames=[A, B]`` or indices ``i``/``j``."""
    fr = pair.get("frames")
    if isinstance(fr, Sequence) and not isinstance(fr, str) and len(fr) == 2:
        a, b = fr
    else:
        a, b = pair.get("i", "?"), pair.get("j", "?")
    names = []
    for v in (a, b):
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) < len(frame_ids):
            names.append(str(frame_ids[int(v)]))
        else:
            names.append(str(v))
    kind = pair.get("kind")
    return f"{names[0]} – {names[1]}" + (f" ({kind})" if kind else "")


def _first(d: Mapping, keys: Sequence[str]) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


# ---------------------------------------------------------------------------------------------------------------
# figure plumbing


def _new_figure(width_in: float, height_in: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    """Write the figure atomically (temporary name, then rename) and release it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    finally:
        fig.clear()
        if tmp.exists():
            tmp.unlink()
    return path


# ---------------------------------------------------------------------------------------------------------------
# maps


def _grid_arrays(da, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(x, y, values) of a (y, x) DataArray sorted ascending, and whether x/y are lon/lat degrees."""
    dims = getattr(da, "dims", None)
    if dims is None or set(dims) != {"y", "x"}:
        raise InputError(f"The {name} map needs a DataArray with dims (y, x); got dims {dims!r}.", field=name,
                         fix="pass the (y, x) grid from the pipeline (e.g. RunResult.vertical_velocity)")
    g = da.transpose("y", "x")
    x = np.asarray(g["x"].values, float) if "x" in g.coords else np.arange(g.sizes["x"], dtype=float)
    y = np.asarray(g["y"].values, float) if "y" in g.coords else np.arange(g.sizes["y"], dtype=float)
    z = np.asarray(to_numpy(g.data), dtype=np.float64)
    if x.size > 1 and x[0] > x[-1]:
        x, z = x[::-1], z[:, ::-1]
    if y.size > 1 and y[0] > y[-1]:
        y, z = y[::-1], z[::-1, :]
    geographic = None
    try:
        import rioxarray  # noqa: F401  (registers the .rio accessor)

        crs = g.rio.crs
        if crs is not None:
            geographic = bool(crs.is_geographic)
    except (ImportError, AttributeError):  # no accessor: decide from the coordinate ranges below
        geographic = None
    if geographic is None:
        geographic = bool(np.all(np.abs(x) <= 360.0) and np.all(np.abs(y) <= 90.0))
    return x, y, z, geographic


def _decimate(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    step = max(1, math.ceil(max(z.shape) / MAX_MAP_PIXELS))
    return (x[::step], y[::step], z[::step, ::step]) if step > 1 else (x, y, z)


def _edges(c: np.ndarray) -> tuple[float, float]:
    d = abs(c[1] - c[0]) if c.size > 1 else 1e-3
    return float(c[0] - d / 2), float(c[-1] + d / 2)


def _is_regular(c: np.ndarray) -> bool:
    if c.size < 3:
        return True
    d = np.diff(c)
    return bool(np.allclose(d, d[0], rtol=1e-3, atol=0))


def _deg_formatter(axis: str):
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _pos):
        if axis == "x":
            v = (v + 180.0) % 360.0 - 180.0
            hemi = "E" if v > 0 else ("W" if v < 0 else "")
        else:
            hemi = "N" if v > 0 else ("S" if v < 0 else "")
        s = f"{abs(v):.4f}".rstrip("0").rstrip(".")
        return f"{s}°{hemi}"

    return FuncFormatter(fmt)


def map_figure(da, path: str | os.PathLike, *, title: str, units: str, diverging: bool = True,
               cmap: str | None = None, points: Sequence[Mapping] | None = None,
               robust_percentile: float = 1.0) -> Path | None:
    """Map of a (y, x) grid with a colour bar in ``units`` and a labelled lon/lat graticule.

    ``diverging`` centres a red–blue colour map on 0 (red = negative = down) with limits at the
    ``robust_percentile`` / 100 − ``robust_percentile`` percentiles of |value|, so one outlier pixel does not wash
    out the map. ``points`` are labelled markers (``lon``, ``lat``, ``label``), e.g. hotspot centroids. Returns
    None when the grid has no finite value.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    x, y, z, geographic = _grid_arrays(da, title)
    finite = np.isfinite(z)
    if not finite.any():
        return None
    x, y, z = _decimate(x, y, z)
    vals = z[np.isfinite(z)]
    if diverging:
        lim = float(np.percentile(np.abs(vals), 100.0 - robust_percentile))
        lim = lim if lim > 0 else max(float(np.max(np.abs(vals))), 1.0)
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
        cm = colormaps[cmap or "RdBu"]
        extend = {(True, True): "both", (True, False): "min", (False, True): "max", (False, False): "neither"}[
            (bool(vals.min() < -lim), bool(vals.max() > lim))]
    else:
        lo, hi = np.percentile(vals, [robust_percentile, 100.0 - robust_percentile])
        hi = hi if hi > lo else lo + 1.0
        norm = Normalize(vmin=float(lo), vmax=float(hi))
        cm = colormaps[cmap or "viridis"]
        extend = {(True, True): "both", (True, False): "min", (False, True): "max", (False, False): "neither"}[
            (bool(vals.min() < lo), bool(vals.max() > hi))]
    cm = cm.with_extremes(bad="#e8e8e8")  # no data in light grey, never confused with 0 (white)

    if geographic:
        lat0 = float(np.clip(np.mean(y), -89.0, 89.0))
        aspect = 1.0 / math.cos(math.radians(lat0))  # 1 km east == 1 km north on the page
        xs, ys = x, y
        width_km = (x[-1] - x[0]) * 111.32 * math.cos(math.radians(lat0)) if x.size > 1 else 1.0
        height_km = (y[-1] - y[0]) * 110.57 if y.size > 1 else 1.0
    else:  # projected metres: draw in km
        aspect = 1.0
        xs, ys = x / 1e3, y / 1e3
        width_km = xs[-1] - xs[0] if xs.size > 1 else 1.0
        height_km = ys[-1] - ys[0] if ys.size > 1 else 1.0
    ratio = float(np.clip(height_km / width_km if width_km > 0 else 1.0, 0.3, 3.0))
    w = 7.0
    fig = _new_figure(w, float(np.clip(w * ratio * 0.85 + 0.8, 3.0, 10.0)))
    ax = fig.add_subplot()
    zm = np.ma.masked_invalid(z)
    if _is_regular(xs) and _is_regular(ys):
        x0, x1 = _edges(xs)
        y0, y1 = _edges(ys)
        im = ax.imshow(zm, origin="lower", extent=(x0, x1, y0, y1), cmap=cm, norm=norm, interpolation="nearest",
                       aspect=aspect)
    else:
        im = ax.pcolormesh(xs, ys, zm, cmap=cm, norm=norm, shading="nearest")
        ax.set_aspect(aspect)
    cb = fig.colorbar(im, ax=ax, shrink=0.85, extend=extend)
    cb.set_label(units)
    if points:
        for p in points:
            px, py = as_float(p.get("lon")), as_float(p.get("lat"))
            if not geographic:
                continue  # hotspot centroids are lon/lat; skip them on projected maps rather than misplace them
            if np.isfinite(px) and np.isfinite(py):
                ax.plot(px, py, marker="o", ms=7, mfc="none", mec="black", mew=1.2)
                ax.annotate(str(p.get("label", "")), (px, py), xytext=(5, 5), textcoords="offset points",
                            fontsize=8, fontweight="bold")
    if geographic:
        ax.xaxis.set_major_formatter(_deg_formatter("x"))
        ax.yaxis.set_major_formatter(_deg_formatter("y"))
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
    else:
        ax.set_xlabel("easting (km)")
        ax.set_ylabel("northing (km)")
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.grid(True, color="#444444", lw=0.4, alpha=0.5, ls="--")
    ax.set_title(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# charts


def _panel_grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    ncols = min(max_cols, max(1, n))
    return math.ceil(n / ncols), ncols


def candidate_scores_figure(frames: Mapping[str, Mapping], path: str | os.PathLike) -> Path | None:
    """Small multiples, one panel per frame: each candidate's CV RMSE ± SE (mm/yr), the chosen one highlighted.

    Skipped candidates are listed at the bottom of the panel with their bar left empty. Handles 1 to ~40 frames
    (four panels per row; the figure grows with the number of rows). Returns None without any candidate.
    """
    rows = [(str(fid), frame_candidates(rep), selected_model(rep)) for fid, rep in frames.items()
            if isinstance(rep, Mapping)]
    rows = [r for r in rows if r[1]]
    if not rows:
        return None
    nrows, ncols = _panel_grid(len(rows))
    n_cand = max(len(c) for _, c, _ in rows)
    # fixed margins sized from the longest label: constrained layout costs seconds with ~40 panels
    label_in = 0.075 * max(len(c["name"]) + 2 for _, cands, _ in rows for c in cands) + 0.15
    plot_w, plot_h = 2.4, float(np.clip(0.22 * n_cand + 0.3, 0.9, 3.2))
    gap_h = 0.75  # two-line title above, tick labels below
    width = ncols * (label_in + plot_w) + 0.3
    height = nrows * (plot_h + gap_h) + 0.3
    fig = _new_figure(width, height, layout=None)
    fig.subplots_adjust(left=label_in / width, right=1.0 - 0.3 / width, top=1.0 - 0.5 / height,
                        bottom=0.55 / height, wspace=label_in / plot_w, hspace=gap_h / plot_h)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        if k >= len(rows):
            ax.set_axis_off()
            continue
        fid, cands, chosen = rows[k]
        names = [c["name"] for c in cands]
        r = np.array([c["cv_rmse"] if c["skipped"] is None else np.nan for c in cands])
        se = np.array([c["cv_se"] for c in cands])
        pos = np.arange(len(cands))[::-1]
        colours = [_CHOSEN if n == chosen else _OTHER for n in names]
        ax.barh(pos, np.nan_to_num(r, nan=0.0), xerr=np.where(np.isfinite(se) & np.isfinite(r), se, 0.0),
                color=colours, height=0.7, error_kw={"elinewidth": 0.8, "capsize": 2})
        xmax = np.nanmax(r + np.nan_to_num(se)) if np.isfinite(r).any() else 1.0
        if np.isfinite(r).any() and 0 < np.nanmin(r) and xmax > 4.0 * np.nanmin(r):
            xmax = 4.0 * float(np.nanmin(r))  # one wild candidate must not flatten the ones worth comparing
        for p, c, rv in zip(pos, cands, r):
            if c["skipped"] is not None:
                ax.text(0.02 * xmax, p, "skipped", va="center", fontsize=7, color="#555555", style="italic")
            elif rv > xmax:
                ax.text(xmax * 1.1, p, f"{rv:.1f} →", va="center", ha="right", fontsize=7, color="white",
                        fontweight="bold")
        ax.set_yticks(pos, [n + (" ✓" if n == chosen else "") for n in names], fontsize=7)
        ax.set_xlim(0, xmax * 1.12 if xmax > 0 else 1.0)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{fid}\nchosen: {chosen or 'none'}", fontsize=8)
        if k // ncols == nrows - 1 or k + ncols >= len(rows):
            ax.set_xlabel("CV RMSE (mm/yr)", fontsize=8)
    return _save(fig, path)


def scatter_figure(panels: Sequence[Mapping], path: str | os.PathLike, *, units: str = "mm/yr") -> Path | None:
    """InSAR against GNSS scatter panels with a 1:1 line and the RMSE of each series in the legend.

    ``panels``: ``[{"title": str, "reference": array (GNSS), "series": [{"label", "values", "colour"?}, ...]}]``;
    each series is drawn against ``reference``. Panels without a finite pair are dropped; returns None when
    nothing is left.
    """
    good = []
    for p in panels:
        ref = np.asarray(p.get("reference", []), float).ravel()
        series = []
        for s in p.get("series", []):
            v = np.asarray(s.get("values", []), float).ravel()
            if v.shape == ref.shape and (np.isfinite(v) & np.isfinite(ref)).any():
                series.append((str(s.get("label", "")), v, s.get("colour")))
        if series:
            good.append((str(p.get("title", "")), ref, series))
    if not good:
        return None
    nrows, ncols = _panel_grid(len(good), max_cols=3 if len(good) > 4 else 2 if len(good) > 1 else 1)
    fig = _new_figure(3.6 * ncols + 0.4, 3.4 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    default = [_BEFORE, _AFTER, _OTHER, _CHOSEN]
    for k, ax in enumerate(axes.ravel()):
        if k >= len(good):
            ax.set_axis_off()
            continue
        title, ref, series = good[k]
        allv = [ref[np.isfinite(ref)]] + [v[np.isfinite(v)] for _, v, _ in series]
        lo = float(min(a.min() for a in allv if a.size))
        hi = float(max(a.max() for a in allv if a.size))
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="1:1")
        for m, (label, v, colour) in enumerate(series):
            ok = np.isfinite(v) & np.isfinite(ref)
            ax.scatter(ref[ok], v[ok], s=18, alpha=0.8, color=colour or default[m % len(default)],
                       edgecolors="none", label=f"{label}: RMSE {rmse(v, ref):.2f} {units} (n={int(ok.sum())})")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"GNSS ({units})", fontsize=8)
        ax.set_ylabel(f"InSAR ({units})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(title, fontsize=9)
        ax.grid(True, lw=0.3, alpha=0.5)
    return _save(fig, path)


def overlap_misfit_figure(pairs: Sequence[Mapping], path: str | os.PathLike, *,
                          frame_ids: Sequence[str] = ()) -> Path | None:
    """Horizontal grouped bars: RMS LOS misfit in each frame overlap before and after the network (mm/yr)."""
    rows = []
    for p in pairs:
        if not isinstance(p, Mapping):
            continue
        b, a = as_float(_first(p, ("rms_before", "rms_before_mm_yr"))), \
            as_float(_first(p, ("rms_after", "rms_after_mm_yr")))
        if np.isfinite(b) or np.isfinite(a):
            n = p.get("n")
            label = pair_label(p, frame_ids).replace(" (", "\n(", 1)
            rows.append((label + (f"\nn={n}" if n is not None else ""), b, a))
    if not rows:
        return None
    pos = np.arange(len(rows))[::-1].astype(float)
    fig = _new_figure(8.0, float(np.clip(0.45 * len(rows) + 1.3, 2.4, 24.0)))
    ax = fig.add_subplot()
    h = 0.38
    b = np.array([r[1] for r in rows])
    a = np.array([r[2] for r in rows])
    ax.barh(pos + h / 2, np.nan_to_num(b), height=h, color=_BEFORE,
            label=f"before (RMS {np.sqrt(np.nanmean(b ** 2)):.2f} mm/yr)")
    ax.barh(pos - h / 2, np.nan_to_num(a), height=h, color=_AFTER,
            label=f"after (RMS {np.sqrt(np.nanmean(a ** 2)):.2f} mm/yr)")
    ax.set_yticks(pos, [r[0] for r in rows], fontsize=7 if len(rows) > 20 else 8)
    top = float(np.nanmax(np.concatenate([b, a])))
    ax.set_xlim(0.0, top * 1.35 if top > 0 else 1.0)  # room for the legend beside the bars
    ax.set_xlabel("RMS LOS difference in the overlap (mm/yr)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, axis="x", lw=0.3, alpha=0.5)
    fig.suptitle("Frame overlap misfits, before and after the network adjustment", fontsize=11)
    return _save(fig, path)


def annual_rate_figure(rates: Mapping, path: str | os.PathLike, *, peak_year: Any = None,
                       ylabel: str = "mean subsidence rate (mm/yr, positive down)") -> Path | None:
    """Bars of the annual mean subsidence rate, the peak year (largest rate unless given) highlighted."""
    items = sorted(((str(k), as_float(v)) for k, v in rates.items()), key=lambda kv: kv[0])
    items = [(k, v) for k, v in items if np.isfinite(v)]
    if not items:
        return None
    years = [k for k, _ in items]
    vals = np.array([v for _, v in items])
    peak = str(peak_year) if peak_year is not None and str(peak_year) in years else years[int(np.argmax(vals))]
    fig = _new_figure(float(np.clip(0.55 * len(items) + 2.5, 4.5, 11.0)), 3.6)
    ax = fig.add_subplot()
    colours = [_CHOSEN if y == peak else _OTHER for y in years]
    bars = ax.bar(years, vals, color=colours)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=7, padding=2)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_xlabel("year")
    ax.tick_params(axis="x", labelrotation=45 if len(items) > 8 else 0, labelsize=8)
    ax.set_title(f"Annual mean subsidence rate (peak {peak}: {vals[years.index(peak)]:.1f} mm/yr)")
    ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    return _save(fig, path)


def groundwater_figure(periods: Sequence[Mapping], path: str | os.PathLike) -> Path | None:
    """Bars of groundwater storage loss per period in km³ (10⁹ m³) with ±1σ error bars."""
    rows = []
    for p in periods:
        if not isinstance(p, Mapping):
            continue
        loss = as_float(p.get("loss_m3"))
        if np.isfinite(loss):
            label = f"{p.get('start', '?')}\n{p.get('end', '?')}"
            rows.append((label, loss / 1e9, as_float(p.get("loss_std_m3")) / 1e9))
    if not rows:
        return None
    fig = _new_figure(float(np.clip(1.0 * len(rows) + 2.5, 4.5, 11.0)), 3.6)
    ax = fig.add_subplot()
    err = np.array([r[2] for r in rows])
    ax.bar(range(len(rows)), [r[1] for r in rows], yerr=np.where(np.isfinite(err), err, 0.0), color=_OTHER,
           capsize=3)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_ylabel("storage loss (km³ = 10⁹ m³)")
    ax.set_title("Groundwater storage loss per period (±1σ)")
    ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    return _save(fig, path)
