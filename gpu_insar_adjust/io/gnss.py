"""GNSS velocities and position time series → the Stations table.

:func:`read_gnss` recognises the format from the file's content:

* **CSV** with a header ``station,lon,lat,ve,vn,vu,se,sn,su`` (mm/yr; ``height`` in m optional; ``vu``/``su`` may
  be empty for horizontal-only stations; other columns are ignored; ``#`` starts a comment line);
* **MIDAS** velocity files of the Nevada Geodetic Laboratory (``midas.<frame>.txt``; Blewitt et al. 2016, JGR
  121, doi:10.1002/2015JB012552): whitespace-separated, 27 fields a line, per NGL's ``midas.readme.txt``::

      1 station  2 MIDAS version  3 first epoch  4 last epoch (decimal years)  5 duration (yr)
      6 epochs  7 good epochs  8 velocity pairs  9-11 ve vn vu (m/yr)  12-14 their 1-sigma (m/yr)
      15-17 offsets at the first epoch (m)  18-20 outlier fractions  21-23 std of the pair velocities (m/yr)
      24 number of steps  25 latitude  26 longitude (deg; may lie outside ±180)  27 height (m)

* **NGL tenv3** daily positions (one station a file; see NGL's tenv3 documentation) and **SOPAC .neu** daily
  positions (``dec_yr yr doy n e u sig_n sig_e sig_u`` in m): these are read with
  :func:`read_position_series` and turned into one velocity per station by :func:`fit_station_velocity`.

A folder is also accepted: every ``*.tenv3`` and ``*.neu`` file in it becomes one row.

Longitudes are wrapped into [-180, 180): NGL writes continuous longitudes (e.g. -229.156 for 130.844°E) in both
MIDAS and tenv3 files. Longitudes outside [-360, 360] and latitudes outside [-90, 90] are refused.

Velocity fit (:func:`fit_station_velocity`)
-------------------------------------------
Each component is fitted with ``offset + trend + annual + semi-annual`` (seasonal terms only when the series
spans at least a year; optional Heaviside steps) by iteratively re-weighted least squares with Huber weights
(c = 1.345 robust standard deviations, scale from the MAD), so outliers are down-weighted rather than deleted.

Daily GNSS positions are not white: their noise is dominated by flicker (1/f) noise, and white-noise-only rate
uncertainties are too small by factors of 5-10 (Mao et al. 1999; Williams 2003, J. Geodesy 76:483). The rate
uncertainty is therefore computed from a **white + flicker noise** covariance ``C = σ_w² I + σ_f² T Tᵀ``, where
``T`` is the fractional-differencing (Hosking 1981) filter of flicker noise (``h_0 = 1``,
``h_k = h_{k-1} (k - 1/2) / k``) on the daily grid, so data gaps are handled exactly. The two amplitudes are
estimated by restricted maximum likelihood on the residuals (winsorised at 3 robust sigmas) averaged into bins
of a few days (at most :data:`MAX_NOISE_BINS` bins, keeping the likelihood to a few hundred unknowns; the bin averages'
covariance ``B C Bᵀ`` is propagated exactly), and the rate's 1-sigma is the generalised-least-squares one under
that covariance. The flicker amplitude is reported in Williams' units (mm/yr^¼).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import GnssError

__all__ = ["read_gnss", "read_position_series", "fit_station_velocity", "detect_format", "STATION_COLUMNS",
           "MAX_NOISE_BINS"]

log = logging.getLogger(__name__)

#: Columns of the Stations table, in order.
STATION_COLUMNS = ["station", "lon", "lat", "height", "ve", "vn", "vu", "se", "sn", "su"]

#: Largest number of time bins used for the white + flicker noise likelihood.
MAX_NOISE_BINS = 500

_CSV_REQUIRED = ["station", "lon", "lat", "ve", "vn", "vu", "se", "sn", "su"]
_CSV_ALIASES = {"site": "station", "name": "station", "sta": "station", "id": "station",
                "longitude": "lon", "long": "lon", "latitude": "lat", "hgt": "height", "h": "height",
                "sig_e": "se", "sig_n": "sn", "sig_u": "su", "sve": "se", "svn": "sn", "svu": "su"}
_MJD_EPOCH = np.datetime64("1858-11-17T00:00:00", "ns")
_DAY_NS = np.timedelta64(86_400_000_000_000, "ns")
_YEAR_DAYS = 365.25


# --------------------------------------------------------------------------------------------------------------
# Format detection and the public reader
# --------------------------------------------------------------------------------------------------------------
def _data_lines(path: Path, max_lines: int = 50) -> list[str]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            s = line.strip()
            if s and not s.startswith(("#", "%")):
                out.append(s)
                if len(out) >= max_lines:
                    break
    return out


def detect_format(path: str | os.PathLike) -> str:
    """``"csv"``, ``"midas"``, ``"tenv3"`` or ``"neu"``, from the content of ``path`` (not its name)."""
    p = Path(path)
    lines = _data_lines(p, 5)
    if not lines:
        raise GnssError("The GNSS file is empty (no data line).", file=p, field="content",
                        fix="give a CSV, MIDAS, tenv3 or .neu file with data")
    first = lines[0]
    if first.lower().startswith("site") and "yymmmdd" in first.lower():
        return "tenv3"
    fields = first.split()
    if "," in first:
        return "csv"
    if len(fields) >= 2 and fields[1].upper().startswith("MIDAS"):
        return "midas"
    if len(fields) >= 20 and re.fullmatch(r"\d{2}[A-Z]{3}\d{2}", fields[1]):
        return "tenv3"
    if len(fields) == 9 and all(_is_number(f) for f in fields):
        return "neu"
    raise GnssError("Unrecognised GNSS file format.", file=p, field="content",
                    fix="give a CSV with header station,lon,lat,ve,vn,vu,se,sn,su (mm/yr), an NGL MIDAS velocity "
                        "file, an NGL .tenv3 or a SOPAC .neu position series")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_gnss(path: str | os.PathLike, reference_frame: str = "ITRF2014", *,
              default_sigma: float | None = None) -> pd.DataFrame:
    """Read GNSS velocities into the Stations table.

    Parameters
    ----------
    path
        CSV / MIDAS velocity file, a tenv3 / .neu position series, or a folder of tenv3 / .neu files.
    reference_frame
        Frame of the velocities as given in the file: ``"ITRF2014"``, ``"ITRF2020"``, ``"IGS14"``, ``"IGS20"`` or
        ``"<PLATE>-fixed"`` with the 4-letter plate code (e.g. ``"EURA-fixed"``, ``"NOAM-fixed"``). Stored in
        ``df.attrs["reference_frame"]``.
    default_sigma
        Only for CSV files without sigma columns: the 1-sigma (mm/yr) to assign to every component. Without it,
        missing ``se``/``sn``/``su`` columns are an error.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`STATION_COLUMNS`: ``station`` (unique), ``lon``, ``lat`` (deg, lon in [-180, 180)),
        ``height`` (m, NaN if unknown), ``ve``, ``vn``, ``vu``, ``se``, ``sn``, ``su`` (mm/yr; ``vu``/``su`` NaN
        for horizontal-only stations). ``attrs``: ``reference_frame``, ``path``, ``format`` (and ``fits`` with the
        per-station fit diagnostics for position series).

    Raises
    ------
    GnssError
        Unknown format, missing column, CSV line with another number of fields than the header, non-numeric or
        infinite value, duplicate station, non-positive sigma, bad coordinates.
    """
    p = Path(path)
    # the names the plate-motion conversions understand, checked here so that a name read now is never refused
    # stages later (a 2-letter plate code, ITRF1997)
    from ..errors import PlateModelError
    from ..geodesy.plates import normalise_frame

    try:
        normalise_frame(str(reference_frame), file=p)
    except PlateModelError:
        raise GnssError(f"Unknown reference frame {reference_frame!r}.", file=p, field="reference_frame",
                        fix="use ITRF2014, ITRF2020, IGS14, IGS20 or '<PLATE>-fixed' with the 4-letter plate code "
                            "such as 'EURA-fixed' ('NOAM-fixed' for NGL's NA)") from None
    if p.is_dir():
        files = sorted([*p.glob("*.tenv3"), *p.glob("*.neu")])
        if not files:
            raise GnssError("No .tenv3 or .neu file in the GNSS folder.", file=p, field="path",
                            fix="give a GNSS velocity file, or a folder of tenv3/.neu position series")
        df, fits = _from_series(files)
        fmt = "series"
    elif p.is_file():
        fmt = detect_format(p)
        fits = None
        if fmt == "csv":
            df = _read_csv(p, default_sigma)
        elif fmt == "midas":
            df = _read_midas(p)
        else:
            df, fits = _from_series([p])
    else:
        raise GnssError("GNSS file not found.", file=p, field="path", fix="give the path of an existing file")
    _check_frame_hint(p, reference_frame)
    df = _validate_stations(df, p)
    if fmt == "csv":
        _warn_if_metres(df, p)
    df.attrs.update(reference_frame=str(reference_frame), path=str(p), format=fmt)
    if fits is not None:
        df.attrs["fits"] = fits
    log.info("read %d GNSS stations from %s (%s, %s)", len(df), p.name, fmt, reference_frame)
    return df


def _check_frame_hint(p: Path, reference_frame: str) -> None:
    """Warn when an NGL file name names a plate-fixed frame but ``reference_frame`` is global (or vice versa)."""
    m = re.search(r"\.([A-Za-z]{2,4}|IGS\d\d|IGb\d\d|ITRF\d{4})\.(txt|tenv3|vel)$", p.name)
    if not m:
        return
    hint = m.group(1)
    global_hint = hint.upper().startswith(("IGS", "IGB", "ITRF"))
    global_given = not str(reference_frame).endswith("-fixed")
    if global_hint != global_given:
        warnings.warn(f"{p.name}: the file name suggests velocities in {hint!r} but reference_frame="
                      f"{reference_frame!r} was given; pass the frame of the file (e.g. reference_frame="
                      f"{hint.upper()!r} or a '<PLATE>-fixed' name with the 4-letter plate code, such as "
                      f"'NOAM-fixed' for NGL's NA).", UserWarning,
                      stacklevel=3)


def _wrap_lon(lon):
    return ((np.asarray(lon, dtype=np.float64) + 180.0) % 360.0) - 180.0


def _few(names, n: int = 5) -> str:
    """The first ``n`` distinct names, comma-separated, with how many more there are."""
    names = list(dict.fromkeys(str(x) for x in names))
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _check_lon_lat(station, lon, lat, p: Path) -> None:
    """Refuse coordinates no file can mean (no-data values such as -9999) before the longitude is wrapped."""
    station, lon, lat = np.atleast_1d(station), np.atleast_1d(lon), np.atleast_1d(lat)
    # NGL writes continuous longitudes (e.g. -229.156), so anything within one turn either way is a longitude.
    bad = np.abs(lon) > 360.0
    if bad.any():
        raise GnssError(f"Longitudes outside -360..360 degrees for {_few(station[bad])}.", file=p, field="lon",
                        fix="give lon in degrees; remove no-data values such as -9999")
    bad = np.abs(lat) > 90.0
    if bad.any():
        raise GnssError(f"Latitudes outside -90..90 degrees for {_few(station[bad])}.", file=p, field="lat",
                        fix="check that the lon and lat columns are not swapped; remove no-data values such as "
                            "-9999")


def _warn_if_metres(df: pd.DataFrame, p: Path) -> None:
    """Warn when a velocity table looks like m/yr: even a stable area in mm/yr has sigmas far above 0.01 mm/yr."""
    if df.empty:
        return
    speed = np.median(np.hypot(df["ve"].to_numpy(np.float64), df["vn"].to_numpy(np.float64)))
    sigma = np.median(np.concatenate([df["se"].to_numpy(np.float64), df["sn"].to_numpy(np.float64)]))
    if speed < 0.1 and sigma < 0.01:
        warnings.warn(f"{p.name}: the velocities look like m/yr (median horizontal speed {speed:.3g}, median "
                      f"sigma {sigma:.3g}) but the reader expects mm/yr; multiply velocities and sigmas by 1000.",
                      UserWarning, stacklevel=3)


def _validate_stations(df: pd.DataFrame, p: Path) -> pd.DataFrame:
    df = df.copy()
    df["station"] = df["station"].astype(str).str.strip()
    if (df["station"] == "").any() or df["station"].isin(["nan", "None"]).any():
        raise GnssError("Some rows have no station name.", file=p, field="station",
                        fix="give every row a station code")
    dup = df["station"][df["station"].str.upper().duplicated(keep=False)]
    if len(dup):
        raise GnssError(f"Duplicate stations: {', '.join(sorted(set(dup)))}.", file=p, field="station",
                        fix="keep one row per station (merge or rename the duplicates)")
    for col in ("lon", "lat", "ve", "vn", "se", "sn"):
        bad = ~np.isfinite(df[col].to_numpy(dtype=np.float64))
        if bad.any():
            names = ", ".join(df["station"][bad].head(5))
            raise GnssError(f"Column {col!r} is missing or not finite for {int(bad.sum())} station(s): {names}.",
                            file=p, field=col, fix=f"give a number for {col} on every row")
    # NaN means "not given" in these columns; an infinity is a broken value, never that.
    for col in ("vu", "su", "height"):
        bad = np.isinf(df[col].to_numpy(dtype=np.float64)) if col in df else np.zeros(len(df), bool)
        if bad.any():
            raise GnssError(f"Column {col!r} is infinite for {int(bad.sum())} station(s): "
                            f"{_few(df['station'][bad])}.", file=p, field=col,
                            fix=f"give a finite number for {col}, or leave it empty where it is unknown")
    _check_lon_lat(df["station"].to_numpy(), df["lon"].to_numpy(np.float64), df["lat"].to_numpy(np.float64), p)
    df["lon"] = _wrap_lon(df["lon"])
    for col in ("se", "sn"):
        if (df[col] <= 0).any():
            names = ", ".join(df["station"][df[col] <= 0].head(5))
            raise GnssError(f"Non-positive sigma in {col!r} ({names}).", file=p, field=col,
                            fix="give 1-sigma uncertainties > 0 in mm/yr")
    vu, su = df["vu"].to_numpy(np.float64), df["su"].to_numpy(np.float64)
    bad = np.isfinite(vu) & ~(np.isfinite(su) & (su > 0))
    if bad.any():
        raise GnssError(f"Vertical velocity without a positive sigma for {', '.join(df['station'][bad].head(5))}.",
                        file=p, field="su", fix="give su (mm/yr, > 0) wherever vu is given, or leave both empty")
    bad = ~np.isfinite(vu) & np.isfinite(su)
    if bad.any():
        raise GnssError(f"Vertical sigma without a vertical velocity for {', '.join(df['station'][bad].head(5))}.",
                        file=p, field="vu", fix="leave su empty for horizontal-only stations, or give vu")
    if "height" not in df:
        df["height"] = np.nan
    out = df[STATION_COLUMNS].reset_index(drop=True)
    for col in STATION_COLUMNS[1:]:
        out[col] = out[col].astype(np.float64)
    out["station"] = out["station"].astype(object)
    return out


# --------------------------------------------------------------------------------------------------------------
# CSV and MIDAS velocity tables
# --------------------------------------------------------------------------------------------------------------
def _csv_lines(p: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the header and of every data line, split as ``pd.read_csv(comment="#")`` does."""
    out = []
    with open(p, encoding="utf-8-sig", errors="replace") as fh:  # undecodable bytes: pandas reports them
        for lineno, line in enumerate(fh, 1):
            text = line.rstrip("\r\n")
            if "#" in text:  # an unquoted '#' starts a comment
                quoted = False
                for i, ch in enumerate(text):
                    quoted ^= ch == '"'
                    if ch == "#" and not quoted:
                        text = text[:i]
                        break
            if text.strip():
                out.append((lineno, next(csv.reader([text], skipinitialspace=True))))
    return out


def _check_csv_field_counts(p: Path) -> bool:
    """Refuse data lines whose number of fields differs from the header's (a stray or missing comma shifts every
    later value into the wrong column). True when every data line ends with one extra empty field (a trailing
    comma on every row), which is tolerated and dropped."""
    lines = _csv_lines(p)
    if len(lines) < 2:
        return False
    (_, header), data = lines[0], lines[1:]
    n = len(header)
    if all(len(f) == n + 1 and not f[-1].strip() for _, f in data):
        return True
    # a trailing comma on the header alone names an empty, ignored column that short rows may leave out
    ok = {n, n - 1} if not header[-1].strip() else {n}
    odd = [(ln, len(f)) for ln, f in data if len(f) not in ok]
    if odd:
        where = _few([f"line {ln} ({k})" for ln, k in odd])
        raise GnssError(f"{len(odd)} line(s) do not have the header's {n} fields: {where}.", file=p,
                        field=f"line {odd[0][0]}",
                        fix=f"give every line the {n} comma-separated fields of the header, leaving a field empty "
                            "(not out) for a missing vu, su or height; a stray comma shifts the columns")
    return False


def _read_csv(p: Path, default_sigma: float | None) -> pd.DataFrame:
    trailing_comma = _check_csv_field_counts(p)
    try:
        with warnings.catch_warnings():
            if trailing_comma:  # pandas warns that it drops the empty last field, checked empty above
                warnings.simplefilter("ignore", pd.errors.ParserWarning)
            # index_col=False: never take the first column as the index when rows have one field too many
            raw = pd.read_csv(p, comment="#", dtype=str, skipinitialspace=True, keep_default_na=False,
                              index_col=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise GnssError(f"Cannot parse the CSV file: {exc}", file=p, field="content",
                        fix="give a comma-separated file with one header line and one row per station") from exc
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    raw = raw.rename(columns={c: _CSV_ALIASES[c] for c in raw.columns
                              if c in _CSV_ALIASES and _CSV_ALIASES[c] not in raw.columns})
    missing = [c for c in _CSV_REQUIRED if c not in raw.columns]
    if default_sigma is not None:
        if not (math.isfinite(default_sigma) and default_sigma > 0):
            raise GnssError(f"default_sigma must be a positive number of mm/yr, got {default_sigma!r}.", file=p,
                            field="default_sigma", fix="pass e.g. default_sigma=0.5")
        for c, v in (("se", "ve"), ("sn", "vn"), ("su", "vu")):
            if c in missing and v in raw.columns:
                raw[c] = [str(default_sigma) if s.strip() else "" for s in raw[v]]
                missing.remove(c)
    if missing:
        raise GnssError(f"Missing column(s) {', '.join(missing)} (found: {', '.join(raw.columns)}).", file=p,
                        field=missing[0],
                        fix="use the header station,lon,lat,ve,vn,vu,se,sn,su (velocities and 1-sigmas in mm/yr; "
                            "leave vu,su empty for horizontal-only stations)")
    out = pd.DataFrame({"station": raw["station"].str.strip()})
    numeric = [c for c in _CSV_REQUIRED if c != "station"] + (["height"] if "height" in raw else [])
    for col in numeric:
        text = raw[col].astype(str).str.strip()
        values = pd.to_numeric(text.where(text != "", None), errors="coerce")
        bad = values.isna() & (text != "") & ~text.str.lower().isin(["nan", "na"])
        if bad.any():
            i = int(np.nonzero(bad.to_numpy())[0][0])
            raise GnssError(f"Non-numeric value {text.iloc[i]!r} in column {col!r} (station "
                            f"{out['station'].iloc[i]!r}, data row {i + 1}).", file=p, field=col,
                            fix=f"write {col} as a plain number (mm/yr for velocities and sigmas, degrees for "
                                "lon/lat, m for height)")
        empty = values.isna()
        if col not in ("vu", "su", "height") and empty.any():
            i = int(np.nonzero(empty.to_numpy())[0][0])
            raise GnssError(f"Empty value in column {col!r} (station {out['station'].iloc[i]!r}, data row "
                            f"{i + 1}).", file=p, field=col,
                            fix=f"give {col} on every row (only vu, su and height may be empty)")
        out[col] = values.astype(np.float64)
    return out


_MIDAS_FIELDS = 27


def _read_midas(p: Path) -> pd.DataFrame:
    rows = []
    s, unterminated = "", False
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            s = line.strip()
            unterminated = not line.endswith("\n")
            if not s or s.startswith(("#", "%")):
                continue
            f = s.split()
            if len(f) != _MIDAS_FIELDS:
                raise GnssError(f"Line {lineno} has {len(f)} fields; a MIDAS velocity line has {_MIDAS_FIELDS}.",
                                file=p, field=f"line {lineno}",
                                fix="give an unmodified NGL midas.<frame>.txt file (one station per line)")
            try:
                vals = [float(x) for x in f[2:]]
            except ValueError as exc:
                raise GnssError(f"Non-numeric value on line {lineno}: {exc}.", file=p, field=f"line {lineno}",
                                fix="give an unmodified NGL midas.<frame>.txt file") from exc
            rows.append([f[0], *vals])
    if unterminated and s and not s.startswith(("#", "%")):
        # NGL's files end with a newline; without one the download may have stopped inside the last line, which
        # can still have 27 fields (e.g. the height 300.0 cut to 30).
        warnings.warn(f"{p.name}: the file does not end with a newline; its last line (station {rows[-1][0]}) may "
                      "be truncated. Download the file again if it is.", UserWarning, stacklevel=3)
    cols = ["station", "t0", "t1", "duration", "n_epochs", "n_good", "n_pairs", "ve", "vn", "vu", "se", "sn", "su",
            "off_e", "off_n", "off_u", "out_e", "out_n", "out_u", "sd_e", "sd_n", "sd_u", "n_steps", "lat", "lon",
            "height"]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("ve", "vn", "vu", "se", "sn", "su"):
        df[c] = df[c] * 1000.0  # m/yr → mm/yr
    return df


# --------------------------------------------------------------------------------------------------------------
# Position time series
# --------------------------------------------------------------------------------------------------------------
def read_position_series(path: str | os.PathLike) -> pd.DataFrame:
    """Read an NGL ``.tenv3`` or SOPAC ``.neu`` daily position series.

    Returns a DataFrame with columns ``time`` (datetime64[ns], middle of the daily solution), ``decimal_year``,
    ``n``, ``e``, ``u`` (mm, relative to the first epoch) and ``sn``, ``se``, ``su`` (formal 1-sigma, mm), sorted
    by time. ``attrs``: ``station``, ``lon``, ``lat`` (deg, lon wrapped to [-180, 180)), ``height`` (m; NaN where
    the file gives no position), ``path``, ``format``.
    """
    p = Path(path)
    if not p.is_file():
        raise GnssError("Position series file not found.", file=p, field="path",
                        fix="give the path of a .tenv3 or .neu file")
    fmt = detect_format(p)
    if fmt == "tenv3":
        df = _read_tenv3(p)
    elif fmt == "neu":
        df = _read_neu(p)
    else:
        raise GnssError(f"Not a position time series (detected {fmt}).", file=p, field="content",
                        fix="give an NGL .tenv3 or a SOPAC .neu daily position file")
    if len(df) < 2:
        raise GnssError("The position series has fewer than two epochs.", file=p, field="content",
                        fix="give a series with many daily positions")
    dup = df["time"].duplicated()
    if dup.any():
        raise GnssError(f"Duplicate epochs in the position series (first: {df['time'][dup].iloc[0]}).", file=p,
                        field="time", fix="remove repeated daily solutions")
    df = df.sort_values("time").reset_index(drop=True)
    for c in ("n", "e", "u"):
        # the first finite epoch, not the first epoch: a NaN there would make the whole component NaN
        finite = np.isfinite(df[c].to_numpy(np.float64))
        if not finite.any():
            raise GnssError(f"Component {c!r} of the position series is empty (no finite value).", file=p,
                            field=c, fix="give a series with positions in all three components (n, e, u)")
        df[c] = df[c] - df[c].to_numpy(np.float64)[finite][0]
    df.attrs["path"] = str(p)
    df.attrs["format"] = fmt
    return df


def _parse_table(p: Path, min_fields: int, n_fields: tuple[int, ...] | None, skip_header: str | None):
    rows, lines = [], []
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            s = line.strip()
            if not s or s.startswith(("#", "%")) or (skip_header and s.lower().startswith(skip_header)):
                continue
            f = s.split()
            if len(f) < min_fields or (n_fields is not None and len(f) not in n_fields):
                raise GnssError(f"Line {lineno} has {len(f)} fields, expected "
                                f"{n_fields if n_fields else f'at least {min_fields}'}.", file=p,
                                field=f"line {lineno}", fix="give an unmodified position file (one epoch a line)")
            rows.append(f)
            lines.append(lineno)
    return rows, lines


def _floats(rows, lines, cols, p: Path) -> np.ndarray:
    out = np.empty((len(rows), len(cols)), dtype=np.float64)
    for i, (r, ln) in enumerate(zip(rows, lines)):
        try:
            out[i] = [float(r[c]) for c in cols]
        except ValueError as exc:
            raise GnssError(f"Non-numeric value on line {ln}: {exc}.", file=p, field=f"line {ln}",
                            fix="give an unmodified position file") from exc
    return out


def _read_tenv3(p: Path) -> pd.DataFrame:
    rows, lines = _parse_table(p, 20, None, "site")
    if not rows:
        raise GnssError("No data line in the tenv3 file.", file=p, field="content", fix="give a non-empty file")
    sites = {r[0] for r in rows}
    if len(sites) != 1:
        raise GnssError(f"Several stations in one tenv3 file: {', '.join(sorted(sites))}.", file=p, field="site",
                        fix="give one station per tenv3 file")
    v = _floats(rows, lines, [2, 3, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16], p)
    decyr, mjd, reflon = v[:, 0], v[:, 1], v[:, 2]
    # Integer + fractional parts: their sum stays continuous even where NGL re-initialises the integer part.
    east, north, up = (v[:, 3] + v[:, 4]), (v[:, 5] + v[:, 6]), (v[:, 7] + v[:, 8])
    times = _MJD_EPOCH + (mjd * 86400.0 * 1e9).astype("int64").astype("timedelta64[ns]") + _DAY_NS // 2
    df = pd.DataFrame({"time": times, "decimal_year": decyr, "n": north * 1e3, "e": east * 1e3, "u": up * 1e3,
                       "sn": v[:, 10] * 1e3, "se": v[:, 9] * 1e3, "su": v[:, 11] * 1e3, "_mjd": mjd})
    full = [r for r in rows if len(r) >= 23]
    if len(full) == len(rows):
        llh = _floats(rows, lines, [20, 21, 22], p)
        _check_lon_lat(np.full(len(rows), rows[0][0]), llh[:, 1], llh[:, 0], p)
        lat, lon, hgt = float(np.median(llh[:, 0])), float(np.median(_wrap_lon(llh[:, 1]))), float(
            np.median(llh[:, 2]))
    else:
        # Older tenv3 without lat/lon/height columns: position from the reference meridian, northing (meridian
        # arc from the equator) and easting (along the parallel), accurate to metres, plenty for a station.
        import pyproj

        geod = pyproj.Geod(ellps="WGS84")
        i = 0
        _check_lon_lat(rows[0][0], reflon[i], 0.0, p)
        rl = float(_wrap_lon(reflon[i]))
        _, lat, _ = geod.fwd(rl, 0.0, 0.0 if north[i] >= 0 else 180.0, abs(north[i]))
        a, e2 = geod.a, geod.es
        nu = a / math.sqrt(1.0 - e2 * math.sin(math.radians(lat)) ** 2)
        lon = float(_wrap_lon(rl + math.degrees(east[i] / (nu * math.cos(math.radians(lat))))))
        hgt = float(up[i])
    df.attrs.update(station=rows[0][0], lon=lon, lat=lat, height=hgt)
    return df.drop(columns="_mjd")


_NEU_ID = re.compile(r"4-character ID\s*:\s*(\w{4})", re.I)
_NEU_LLH = re.compile(r"NEU Reference position\s*:\s*([-+\d.eE]+)\s+([-+\d.eE]+)\s+([-+\d.eE]+)", re.I)
_NEU_XYZ = re.compile(r"XYZ Reference position\s*:\s*([-+\d.eE]+)\s+([-+\d.eE]+)\s+([-+\d.eE]+)", re.I)


def _read_neu(p: Path) -> pd.DataFrame:
    header = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("#"):
                header.append(line)
            elif line.strip():
                break
    text = "".join(header)
    rows, lines = _parse_table(p, 9, (9,), None)
    v = _floats(rows, lines, list(range(9)), p)
    if np.any((v[:, 1] < 1900) | (v[:, 1] > 2200)):
        raise GnssError("Year outside 1900-2200.", file=p, field="yr",
                        fix="give an unmodified SOPAC .neu file (dec_yr yr doy n e u sig_n sig_e sig_u, in m)")
    year, doy = v[:, 1].astype(int), v[:, 2].astype(int)
    if np.any((doy < 1) | (doy > 366)):
        raise GnssError("Day-of-year outside 1..366.", file=p, field="doy",
                        fix="give an unmodified SOPAC .neu file (dec_yr yr doy n e u sig_n sig_e sig_u, in m)")
    times = (pd.to_datetime(year.astype(str), format="%Y").values.astype("datetime64[ns]")
             + (doy - 1).astype("timedelta64[D]").astype("timedelta64[ns]") + _DAY_NS // 2)
    df = pd.DataFrame({"time": times, "decimal_year": v[:, 0], "n": v[:, 3] * 1e3, "e": v[:, 4] * 1e3,
                       "u": v[:, 5] * 1e3, "sn": v[:, 6] * 1e3, "se": v[:, 7] * 1e3, "su": v[:, 8] * 1e3})
    m = _NEU_ID.search(text)
    station = m.group(1).upper() if m else p.name[:4].upper()
    lat = lon = hgt = float("nan")

    def position(match, what: str) -> tuple[float, float, float]:
        try:
            return float(match.group(1)), float(match.group(2)), float(match.group(3))
        except ValueError:  # the pattern also matches placeholders such as "- - -"
            raise GnssError(f"The {what} reference position is not three numbers: {match.group(0)!r}.", file=p,
                            field=f"{what} Reference position",
                            fix="give an unmodified SOPAC .neu file with the station's reference position") \
                from None

    m = _NEU_LLH.search(text)
    if m:
        lat, lon, hgt = position(m, "NEU")
        _check_lon_lat(station, lon, lat, p)
        lon = float(_wrap_lon(lon))
    else:
        m = _NEU_XYZ.search(text)
        if m:
            import pyproj

            tr = pyproj.Transformer.from_crs("EPSG:4978", "EPSG:4979", always_xy=True)
            lon, lat, hgt = tr.transform(*position(m, "XYZ"))
            lon = float(_wrap_lon(lon))
    df.attrs.update(station=station, lon=lon, lat=lat, height=hgt)
    return df


def _from_series(files: list[Path]) -> tuple[pd.DataFrame, dict]:
    rows, fits = [], {}
    for f in files:
        series = read_position_series(f)
        a = series.attrs
        if not (np.isfinite(a["lon"]) and np.isfinite(a["lat"])):
            raise GnssError("The position series gives no station position.", file=f, field="reference position",
                            fix="use a .neu file whose header has 'NEU Reference position' (or XYZ), a tenv3 "
                                "file, or give the velocity in a CSV with lon/lat")
        fit = fit_station_velocity(series)
        rows.append({"station": a["station"], "lon": a["lon"], "lat": a["lat"], "height": a["height"],
                     **{k: fit[k] for k in ("ve", "vn", "vu", "se", "sn", "su")}})
        fits[a["station"]] = fit
    return pd.DataFrame(rows), fits


# --------------------------------------------------------------------------------------------------------------
# Velocity fit
# --------------------------------------------------------------------------------------------------------------
def _design(t: np.ndarray, t_ref: float, seasonal: bool, steps) -> tuple[np.ndarray, list[str]]:
    cols, names = [np.ones_like(t), t - t_ref], ["offset", "rate"]
    if seasonal:
        w = 2.0 * np.pi * t
        cols += [np.sin(w), np.cos(w), np.sin(2 * w), np.cos(2 * w)]
        names += ["annual_sin", "annual_cos", "semiannual_sin", "semiannual_cos"]
    for s in steps:
        cols.append((t >= s).astype(np.float64))
        names.append(f"step_{s:.4f}")
    return np.column_stack(cols), names


def _wls(A, y, w):
    sw = np.sqrt(w)
    q, r = np.linalg.qr(A * sw[:, None])
    beta = np.linalg.solve(r, q.T @ (y * sw))
    return beta, r


def _huber_irls(A, y, w0, c, max_iter=50, tol=1e-8):
    """Huber M-estimate: returns beta, robust scale (of sqrt(w0)-standardised residuals), Huber weights."""
    beta, _ = _wls(A, y, w0)
    hub = np.ones_like(y)
    scale = 1.0
    for _ in range(max_iter):
        z = (y - A @ beta) * np.sqrt(w0)
        scale = 1.4826 * np.median(np.abs(z - np.median(z)))
        if not scale > 0:
            break
        hub = np.minimum(1.0, c * scale / np.maximum(np.abs(z), 1e-300))
        new, _ = _wls(A, y, w0 * hub)
        done = np.max(np.abs(new - beta)) <= tol * (1.0 + np.max(np.abs(beta)))
        beta = new
        if done:
            break
    return beta, scale, hub


def _flicker_filter(m: int) -> np.ndarray:
    """Hosking (1981) fractional-differencing coefficients of flicker noise (d = 1/2), length m."""
    k = np.arange(1, m, dtype=np.float64)
    h = np.empty(m)
    h[0] = 1.0
    h[1:] = np.cumprod((k - 0.5) / k)
    return h


def _binned_noise_model(day: np.ndarray, bin_days: int):
    """Bin index of each observation, counts per bin, and G = (B T)(B T)ᵀ, the flicker covariance of bin means."""
    m = int(day.max()) + 1
    h = _flicker_filter(m)
    bins = day // bin_days
    uniq, inv, counts = np.unique(bins, return_inverse=True, return_counts=True)
    bt = np.zeros((uniq.size, m))
    for i, d in enumerate(day):
        bt[inv[i], : d + 1] += h[d::-1]
    bt /= counts[:, None]
    return inv, counts, bt @ bt.T


def _reml_white_flicker(Ab, rb, counts, G):
    """REML fit of C = s²[(1-φ) diag(1/n) + φ G] to binned residuals; returns (s², φ, cov of β)."""
    from scipy.linalg import solve_triangular
    from scipy.optimize import minimize_scalar

    nb, npar = Ab.shape
    Wd = np.diag(1.0 / counts)
    jitter = 1e-10 * np.trace(G) / nb

    def parts(phi):
        C = (1.0 - phi) * Wd + phi * G + jitter * np.eye(nb)
        L = np.linalg.cholesky(C)
        At = solve_triangular(L, Ab, lower=True)
        rt = solve_triangular(L, rb, lower=True)
        q, r = np.linalg.qr(At)
        res = rt - q @ (q.T @ rt)
        s2 = float(res @ res) / (nb - npar)
        return L, r, s2

    def objective(phi):
        try:
            L, r, s2 = parts(phi)
        except np.linalg.LinAlgError:
            return np.inf
        if not s2 > 0:  # residuals vanish (e.g. a constant component): this noise mix is not identifiable
            return np.inf
        return ((nb - npar) * math.log(s2) + 2.0 * np.sum(np.log(np.diag(L)))
                + 2.0 * np.sum(np.log(np.abs(np.diag(r)))))

    opt = minimize_scalar(objective, bounds=(0.0, 1.0 - 1e-9), method="bounded", options={"xatol": 1e-4})
    phi = float(opt.x)
    # The optimum may sit on the white-only boundary; compare explicitly.
    if objective(0.0) <= opt.fun:
        phi = 0.0
    L, r, s2 = parts(phi)
    rinv = np.linalg.inv(r)
    return s2, phi, s2 * (rinv @ rinv.T)


def fit_station_velocity(series: pd.DataFrame, *, steps=(), seasonal: bool | None = None, huber_c: float = 1.345,
                         noise: str = "white+flicker") -> dict[str, Any]:
    """Robust velocity of a daily position series, with realistic (white + flicker noise) uncertainties.

    Parameters
    ----------
    series
        Output of :func:`read_position_series` (``decimal_year``, ``n``, ``e``, ``u`` in mm; ``sn``/``se``/``su``
        used as relative weights when present).
    steps
        Decimal years of known offsets (antenna changes, earthquakes), each fitted as a Heaviside step.
    seasonal
        Fit annual + semi-annual terms; default: when the series spans at least one year.
    huber_c
        Huber threshold in robust standard deviations.
    noise
        ``"white+flicker"`` (default, see the module notes) or ``"white"`` (formal white-noise sigmas only).

    Returns
    -------
    dict
        ``ve``, ``vn``, ``vu`` (mm/yr, Huber IRLS trend), ``se``, ``sn``, ``su`` (mm/yr, 1-sigma under the noise
        model), ``se_white``/``sn_white``/``su_white`` (white-noise-only sigmas), per component
        ``white_<c>`` (mm), ``flicker_<c>`` (mm/yr^¼), ``annual_<c>`` (amplitude, mm), ``outliers_<c>``
        (fraction down-weighted beyond 3 robust sigmas); ``n_obs``, ``t_start``, ``t_end``, ``t_ref``
        (decimal years), ``bin_days``, ``station``.
    """
    if noise not in ("white+flicker", "white"):
        raise GnssError(f"Unknown noise model {noise!r}.", field="noise", fix="use 'white+flicker' or 'white'")
    from threadpoolctl import threadpool_limits

    # Small dense problems (a few thousand rows, a few hundred unknowns): one BLAS thread is fastest, and
    # multi-threaded BLAS oversubscribes a busy machine badly (10-100x slower).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_station_velocity(series, steps=steps, seasonal=seasonal, huber_c=huber_c, noise=noise)


def _fit_station_velocity(series, *, steps, seasonal, huber_c, noise) -> dict[str, Any]:
    src = series.attrs.get("path")
    t_all = series["decimal_year"].to_numpy(np.float64)
    span = float(t_all.max() - t_all.min()) if t_all.size else 0.0
    if t_all.size < 10 or span < 0.25:
        raise GnssError(f"Position series too short for a velocity ({t_all.size} epochs over {span:.2f} yr).",
                        file=src, field="time", fix="give at least 10 epochs spanning at least 3 months "
                                                    "(2.5 years or more for reliable rates)")
    if seasonal is None:
        seasonal = span >= 1.0
        if not seasonal:
            warnings.warn(f"{series.attrs.get('station', 'station')}: series spans {span:.2f} yr (< 1 yr); "
                          "seasonal terms are not fitted and the rate may be biased by the annual cycle.",
                          UserWarning, stacklevel=2)
    t_ref = float(0.5 * (t_all.min() + t_all.max()))
    steps = [float(s) for s in steps if t_all.min() < float(s) <= t_all.max()]
    out: dict[str, Any] = {"station": series.attrs.get("station"), "t_start": float(t_all.min()),
                           "t_end": float(t_all.max()), "t_ref": t_ref}
    day_all = np.rint((t_all - t_all.min()) * _YEAR_DAYS).astype(np.int64)
    span_days = int(day_all.max()) + 1
    bin_days = max(1, math.ceil(span_days / MAX_NOISE_BINS))
    out["bin_days"] = bin_days
    noise_cache: dict[bytes, tuple] = {}
    n_obs = 0
    for comp in ("e", "n", "u"):
        y_all = series[comp].to_numpy(np.float64)
        sig_all = series["s" + comp].to_numpy(np.float64) if ("s" + comp) in series else np.ones_like(y_all)
        ok = np.isfinite(y_all) & np.isfinite(t_all)
        t, y, day = t_all[ok], y_all[ok], day_all[ok]
        sig = sig_all[ok]
        if not (np.all(np.isfinite(sig)) and np.all(sig > 0)):
            sig = np.ones_like(y)
        w0 = 1.0 / sig**2
        w0 = w0 / np.mean(w0)
        A, names = _design(t, t_ref, seasonal, steps)
        if t.size < 2 * A.shape[1]:
            raise GnssError(f"Too few valid epochs ({t.size}) in component {comp!r}.", file=src, field=comp,
                            fix="give a longer series")
        beta, scale, hub = _huber_irls(A, y, w0, huber_c)
        out[f"v{comp}"] = float(beta[1])
        _, r = _wls(A, y, w0)
        rinv = np.linalg.inv(r)
        out[f"s{comp}_white"] = float(scale * math.sqrt((rinv @ rinv.T)[1, 1]))
        if seasonal:
            out[f"annual_{comp}"] = float(math.hypot(beta[2], beta[3]))
        z = (y - A @ beta) * np.sqrt(w0)
        out[f"outliers_{comp}"] = float(np.mean(np.abs(z) > 3.0 * scale)) if scale > 0 else 0.0
        n_obs = max(n_obs, int(t.size))
        if noise == "white" or not scale > 0:
            out[f"s{comp}"] = out[f"s{comp}_white"]
            out[f"white_{comp}"] = float(scale)
            out[f"flicker_{comp}"] = 0.0
            continue
        # Residuals winsorised at 3 robust sigmas keep gross outliers from inflating the noise amplitudes while
        # leaving Gaussian scatter almost untouched (clipping at the Huber c = 1.345 would shrink it by ~16 %).
        lim = max(huber_c, 3.0) * scale / np.sqrt(w0)
        resid = np.clip(y - A @ beta, -lim, lim)
        key = day.tobytes()
        if key not in noise_cache:
            noise_cache[key] = _binned_noise_model(day, bin_days)
        inv, counts, G = noise_cache[key]
        nb = counts.size
        Ab = np.zeros((nb, A.shape[1]))
        rb = np.zeros(nb)
        np.add.at(Ab, inv, A)
        np.add.at(rb, inv, resid)
        Ab /= counts[:, None]
        rb /= counts
        s2, phi, cov = _reml_white_flicker(Ab, rb, counts, G)
        out[f"s{comp}"] = float(math.sqrt(cov[1, 1]))
        out[f"white_{comp}"] = float(math.sqrt(s2 * (1.0 - phi)))
        # Williams (2003): C_flicker = b² ΔT^(1/2) T Tᵀ with ΔT the sampling interval in years → b in mm/yr^¼.
        out[f"flicker_{comp}"] = float(math.sqrt(s2 * phi) / (1.0 / _YEAR_DAYS) ** 0.25)
    out["n_obs"] = n_obs
    return out
