"""Per-pixel fits over time on displacement cubes, and the per-epoch adjustment of a cube.

Inputs are either a displacement cube (``xarray.DataArray`` (time, y, x), mm, NumPy-, CuPy- or Dask-backed; see
the data model) or a plain array of any array-API backend with epochs along the first axis ((T, N) or
(T, ny, nx)) together with its ``times``. Every temporal fit uses one shared design matrix for all pixels and
:func:`gpu_insar_adjust.linalg.lstsq_shared` (NaN-aware per pixel, float64 normal equations), over chunks of
``chunk_pixels`` pixels so that memory stays bounded; a Dask cube is fitted block by block, lazily, so a cube
larger than memory works.

Time is measured in years of 365.25 days from the reference epoch ``t_ref`` (default: the first epoch), so
velocities are mm/yr and accelerations mm/yr². Models (``design_matrix``):

* ``"linear"``: intercept + velocity·t;
* ``"quadratic"``: + acceleration·t²/2 (the coefficient *is* the acceleration);
* ``"seasonal"`` (added with ``+``): annual and semi-annual sin/cos of the calendar phase (2π × decimal year),
  reported as amplitudes (mm) and the day of year of the maximum (1 January 00:00 = day 1.0);
* ``"annual_rates"``: piecewise-linear in time with one velocity per calendar year, continuous displacement and a
  rate change at each 1 January (column j is the time spent in year j up to t, so the coefficients are the
  annual velocities themselves).

Uncertainties are formal: the unscaled covariance (AᵀWA)⁻¹ times the a-posteriori variance factor of the residual
scatter. They assume independent epochs; real InSAR epochs share atmospheric and unwrapping errors (temporally
correlated noise), so the formal velocity sigmas are optimistic, typically by a factor of 2-5 for
velocities (Hooper/Agram studies of InSAR time-series noise). Treat them as relative quality measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import backend
from .errors import TimeSeriesError, UnsupportedBackendError

__all__ = [
    "DAYS_PER_YEAR",
    "DEFAULT_CHUNK_PIXELS",
    "design_matrix",
    "year_segments",
    "fit_velocity",
    "fit_annual_velocities",
    "cumulative_displacement",
    "apply_velocity_correction",
    "remove_epoch_ramps",
]

DAYS_PER_YEAR = 365.25
#: Pixels fitted at once; bounds temporary memory to roughly 8 bytes × epochs × chunk × a few.
DEFAULT_CHUNK_PIXELS = 262_144

_BASE_MODELS = ("linear", "quadratic", "annual_rates")
_NS_PER_DAY = 86_400e9


# --------------------------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------------------------
def _as_datetime64(times: Any, field: str = "time") -> np.ndarray:
    try:
        t = np.asarray(getattr(times, "values", times)).astype("datetime64[ns]")
    except (TypeError, ValueError) as exc:
        raise TimeSeriesError(f"Epochs in {field!r} are not dates.", field=field,
                              fix="give dates as numpy datetime64, pandas Timestamps or ISO strings "
                                  "('2020-01-31')") from exc
    return np.atleast_1d(t)


def _check_times(times: Any, field: str = "time") -> np.ndarray:
    t = _as_datetime64(times, field)
    if t.ndim != 1 or t.size < 2:
        raise TimeSeriesError(f"A time series needs at least two epochs; {field!r} has {t.size}.", field=field,
                              fix="give a cube with two or more epochs")
    if np.any(np.isnat(t)):
        raise TimeSeriesError(f"Epochs in {field!r} contain missing dates (NaT).", field=field,
                              fix="drop or fill the epochs without a date")
    d = np.diff(t.astype(np.int64))
    if np.any(d == 0):
        dup = sorted({str(t[i + 1])[:10] for i in np.nonzero(d == 0)[0]})
        raise TimeSeriesError(f"Duplicated epochs in {field!r}: {', '.join(dup)}.", field=field,
                              fix="merge or drop the duplicated acquisitions (e.g. cube.drop_duplicates('time'))")
    if np.any(d < 0):
        raise TimeSeriesError(f"Epochs in {field!r} are not in increasing order.", field=field,
                              fix="sort the cube by time first (cube.sortby('time'))")
    return t


def _date(value: Any, field: str) -> np.datetime64:
    try:
        t = np.datetime64(value, "ns") if not isinstance(value, np.datetime64) else value.astype("datetime64[ns]")
    except (TypeError, ValueError):
        try:
            import pandas as pd

            t = np.datetime64(pd.Timestamp(value).to_datetime64(), "ns")
        except Exception as exc:
            raise TimeSeriesError(f"{field!r} = {value!r} is not a date.", field=field,
                                  fix="give an ISO date such as '2021-01-01'") from exc
    if np.isnat(t):
        raise TimeSeriesError(f"{field!r} is not a valid date.", field=field, fix="give an ISO date")
    return t


def _years(t: np.ndarray, t_ref: np.datetime64) -> np.ndarray:
    """Years (of 365.25 days) from ``t_ref``; float64."""
    return (t.astype("datetime64[ns]") - t_ref).astype("timedelta64[ns]").astype(np.float64) / (
        _NS_PER_DAY * DAYS_PER_YEAR)


def _decimal_year(t: np.ndarray) -> np.ndarray:
    """Calendar decimal year (1 January 00:00 is an integer), used for the seasonal phase."""
    years = t.astype("datetime64[Y]")
    start = years.astype("datetime64[ns]")
    length = (years + 1).astype("datetime64[ns]") - start
    return years.astype(np.int64) + 1970 + (t - start).astype(np.float64) / length.astype(np.float64)


def year_segments(times: Any) -> list[tuple[int, np.datetime64, np.datetime64]]:
    """Calendar years covered by ``times``: ``[(year, segment_start, segment_end), ...]``.

    Segments are the calendar years clipped to [first epoch, last epoch]; years of zero length (data ending
    exactly on 1 January) are dropped.
    """
    t = _check_times(times)
    t0, t1 = t[0], t[-1]
    y0 = int(t0.astype("datetime64[Y]").astype(np.int64)) + 1970
    y1 = int(t1.astype("datetime64[Y]").astype(np.int64)) + 1970
    out = []
    for year in range(y0, y1 + 1):
        s = max(np.datetime64(f"{year:04d}-01-01", "ns"), t0)
        e = min(np.datetime64(f"{year + 1:04d}-01-01", "ns"), t1)
        if e > s:
            out.append((year, s, e))
    return out


# --------------------------------------------------------------------------------------------------------------
# Design
# --------------------------------------------------------------------------------------------------------------
def _parse_model(model: str) -> tuple[str, bool]:
    terms = [s.strip() for s in str(model).split("+") if s.strip()]
    seasonal = "seasonal" in terms
    base = [s for s in terms if s != "seasonal"]
    if len(base) != 1 or base[0] not in _BASE_MODELS or len(terms) != len(set(terms)):
        raise TimeSeriesError(f"Unknown time-series model {model!r}.", field="model",
                              fix="use one of 'linear', 'quadratic', 'annual_rates', optionally with "
                                  "'+seasonal' (e.g. 'linear+seasonal')")
    return base[0], seasonal


def design_matrix(times: Any, model: str = "linear", *, t_ref: Any = None) -> tuple[np.ndarray, list[str]]:
    """Design matrix (T, n) float64 and its parameter names for a temporal model (see the module docstring).

    Parameter names: ``intercept`` (mm at ``t_ref``), ``velocity`` (mm/yr), ``acceleration`` (mm/yr²),
    ``annual_sin``/``annual_cos``/``semiannual_sin``/``semiannual_cos`` (mm), ``velocity_<year>`` (mm/yr).
    """
    t = _check_times(times)
    base, seasonal = _parse_model(model)
    ref = t[0] if t_ref is None else _date(t_ref, "t_ref")
    ty = _years(t, ref)
    cols: list[np.ndarray] = [np.ones_like(ty)]
    names = ["intercept"]
    if base in ("linear", "quadratic"):
        cols.append(ty)
        names.append("velocity")
        if base == "quadratic":
            cols.append(0.5 * ty * ty)
            names.append("acceleration")
    else:
        for year, s, e in year_segments(t):
            ys, ye = _years(np.array([s]), ref)[0], _years(np.array([e]), ref)[0]
            cols.append(np.clip(ty - ys, 0.0, ye - ys))
            names.append(f"velocity_{year}")
    if seasonal:
        phase = 2.0 * math.pi * _decimal_year(t)
        cols += [np.sin(phase), np.cos(phase), np.sin(2 * phase), np.cos(2 * phase)]
        names += ["annual_sin", "annual_cos", "semiannual_sin", "semiannual_cos"]
    return np.stack(cols, axis=1), names


# --------------------------------------------------------------------------------------------------------------
# The per-chunk fit (array API)
# --------------------------------------------------------------------------------------------------------------
def _output_names(names: list[str]) -> list[str]:
    out = list(names) + [f"{p}_std" for p in names] + ["residual_rms", "n_valid"]
    if "annual_sin" in names:
        out += ["annual_amplitude", "annual_amplitude_std", "annual_peak_doy",
                "semiannual_amplitude", "semiannual_amplitude_std", "semiannual_peak_doy"]
    return out


def _amplitude(xp, x, c_ss, c_cc, c_sc, s0, i_s: int, i_c: int, period_days: float):
    """Amplitude, its sigma and peak day of ``s·sin + c·cos`` from the fit and the (sin, cos) cofactors."""
    s, c = x[i_s, :], x[i_c, :]
    amp = xp.sqrt(s * s + c * c)
    var = (s * s * c_ss + c * c * c_cc + 2.0 * s * c * c_sc)
    std = xp.sqrt(var * s0) / xp.where(amp > 0, amp, xp.nan)
    # s·sin(ωt) + c·cos(ωt) = amp·cos(ωt − φ), φ = atan2(s, c): maximum at ωt = φ (mod 2π)
    phi = xp.atan2(s, c)
    frac = phi / (2.0 * math.pi)
    frac = frac - xp.floor(frac)
    return amp, std, 1.0 + frac * period_days  # day of year counted from 1 January = 1


class _ColumnFit(NamedTuple):
    """Per-column least-squares results: ``x`` (n, k), ``sigma0_sq``, ``residual_rms``, ``n_valid`` (k,) and
    ``cof(i, j)``, the (i, j) cofactor ((AᵀWA)⁻¹, so that cov = cof × sigma0_sq) of every column (k,)."""

    x: Any
    sigma0_sq: Any
    residual_rms: Any
    n_valid: Any
    cof: Callable[[int, int], Any]


def _generic_fit(xp, A, Y, weights) -> _ColumnFit:
    from .linalg import lstsq_shared

    res = lstsq_shared(A, Y, weights)
    return _ColumnFit(res.x, res.sigma0_sq, xp.astype(res.residual_rms, xp.float64),
                      xp.astype(res.n_valid, xp.float64), lambda i, j: res.cov[:, i, j])


def _complete_fit(xp, A, Y, w):
    """Columns observed at every epoch share one normal matrix: its inverse times ``AᵀW`` is a small (n, T)
    pseudo-inverse, and the fit is one matrix product with the cube (no per-pixel solve). Returns None when that
    shared system is not determined (the per-pixel solver then marks the columns)."""
    from .linalg import DEFAULT_RCOND

    T, n = A.shape
    if T < n:
        return None
    colnorm = xp.sqrt(xp.sum(A * A, axis=0))
    scale = xp.where(colnorm > 0, 1.0 / xp.where(colnorm > 0, colnorm, 1.0), 1.0)
    As = A * scale  # equilibrated, as the per-pixel solver does
    wcol = xp.ones((T,), dtype=xp.float64) if w is None else w
    N = xp.matmul(xp.matrix_transpose(As) * wcol, As)
    eig = xp.linalg.eigvalsh(N)
    if not float(xp.min(eig)) > DEFAULT_RCOND * float(xp.max(eig)):
        return None
    inv = xp.linalg.inv(N)
    pinv = xp.matmul(inv, xp.matrix_transpose(As) * wcol) * scale[:, None]  # (n, T), original parameter units
    cof = inv * (scale[:, None] * scale[None, :])
    x = xp.matmul(pinv, Y)
    R = Y - xp.matmul(A, x)
    wrr = xp.sum(wcol[:, None] * R * R, axis=0)
    dof = T - n
    s0 = wrr / dof if dof > 0 else xp.full_like(wrr, xp.nan)
    rms = xp.sqrt(wrr / xp.sum(wcol))
    return _ColumnFit(x, s0, rms, xp.full_like(wrr, float(T)), lambda i, j: cof[i, j])


def _merge_fits(xp, complete, observed, fast: _ColumnFit, rest: _ColumnFit | None) -> _ColumnFit:
    """Columns where ``complete`` from ``fast`` (fitted on all columns), the other observed ones from ``rest``
    (fitted on those columns only, in order), never-observed ones NaN with ``n_valid`` 0 (as the per-pixel
    solver gives them)."""
    gappy = observed & ~complete
    nan = xp.asarray(xp.nan, dtype=xp.float64)
    if rest is not None:
        # position of each gappy column in ``rest`` (clipped: the other columns take ``fast`` or NaN anyway)
        pos = xp.clip(xp.cumulative_sum(xp.astype(gappy, xp.int64)) - 1, 0, int(rest.x.shape[1]) - 1)

    def pick(a_fast, a_rest, axis=0):
        out = xp.where(complete, a_fast, nan)
        return out if rest is None else xp.where(gappy, xp.take(a_rest(), pos, axis=axis), out)

    return _ColumnFit(pick(fast.x, lambda: rest.x, axis=1), pick(fast.sigma0_sq, lambda: rest.sigma0_sq),
                      pick(fast.residual_rms, lambda: rest.residual_rms),
                      xp.where(observed, pick(fast.n_valid, lambda: rest.n_valid), 0.0),
                      lambda i, j: pick(xp.broadcast_to(fast.cof(i, j), complete.shape), lambda: rest.cof(i, j)))


def _fit_columns(Y, A_np: np.ndarray, names: list[str], weights=None):
    """Fit the columns of ``Y`` (T, N) of any backend; returns (n_out, N) float64 on that backend.

    Columns without gaps (with no weights or per-epoch weights) are fitted with the shared pseudo-inverse
    (:func:`_complete_fit`); the rest, and per-observation weights, go through
    :func:`gpu_insar_adjust.linalg.lstsq_shared`, which solves every column's own normal equations. The two
    agree to rounding (about 1e-12 relative), and each column's result depends on that column only.
    """
    xp = backend.namespace(Y, weights)
    A = backend.asarray(A_np, xp=xp, dtype=xp.float64)
    Y = Y if xp.isdtype(Y.dtype, "real floating") else xp.astype(Y, xp.float64)
    w = None
    per_epoch = weights is None or (weights.ndim == 1 or (weights.ndim == 2 and weights.shape[1] == 1))
    if weights is not None and per_epoch:
        w = xp.reshape(xp.astype(weights, xp.float64), (-1,))
        per_epoch = bool(xp.all(xp.isfinite(w) & (w > 0)))  # a dropped epoch: per-pixel path
    fit = None
    if per_epoch:
        finite = xp.isfinite(Y)
        complete, observed = xp.all(finite, axis=0), xp.any(finite, axis=0)
        fast = _complete_fit(xp, A, xp.where(complete[None, :], xp.astype(Y, xp.float64), 0.0), w)
        if fast is not None:
            if bool(xp.all(complete)):
                fit = fast
            else:
                # sea and other never-observed pixels need no solve: NaN, as the per-pixel solver gives them
                idx = xp.nonzero(observed & ~complete)[0]
                rest = _generic_fit(xp, A, xp.take(Y, idx, axis=1), weights) if int(idx.shape[0]) else None
                fit = _merge_fits(xp, complete, observed, fast, rest)
    if fit is None:
        fit = _generic_fit(xp, A, Y, weights)
    n = len(names)
    x, s0 = fit.x, fit.sigma0_sq
    rows = [x[i, :] for i in range(n)]
    rows += [xp.sqrt(fit.cof(i, i) * s0) for i in range(n)]
    rows += [fit.residual_rms, fit.n_valid]
    if "annual_sin" in names:
        for key, period in (("annual", DAYS_PER_YEAR), ("semiannual", DAYS_PER_YEAR / 2.0)):
            i_s, i_c = names.index(f"{key}_sin"), names.index(f"{key}_cos")
            amp, std, peak = _amplitude(xp, x, fit.cof(i_s, i_s), fit.cof(i_c, i_c), fit.cof(i_s, i_c), s0,
                                        i_s, i_c, period)
            rows += [amp, std, peak]
    return xp.stack(rows, axis=0)


def _fit_2d(Y, A_np, names, weights, chunk_pixels: int):
    """Chunked fit of a (T, N) array; chunks are independent, so the result equals the unchunked fit."""
    xp = backend.namespace(Y, weights)
    npix = Y.shape[1]
    step = max(int(chunk_pixels), 1)
    if npix <= step:
        return _fit_columns(Y, A_np, names, weights)
    parts = []
    for start in range(0, npix, step):
        stop = min(start + step, npix)
        w = weights if (weights is None or weights.ndim == 1) else weights[:, start:stop]
        parts.append(_fit_columns(Y[:, start:stop], A_np, names, w))
    return xp.concat(parts, axis=1)


def _fit_block(block, wblock, *, A_np, names, chunk_pixels):
    """Dask block function: (T, by, bx) → (n_out, by, bx)."""
    xp = backend.namespace(block)
    T, by, bx = block.shape
    Y = xp.reshape(block, (T, by * bx))
    W = None if wblock is None else (wblock if wblock.ndim == 1 else xp.reshape(wblock, (T, by * bx)))
    out = _fit_2d(Y, A_np, names, W, chunk_pixels)
    return xp.reshape(out, (out.shape[0], by, bx))


def _is_dataarray(obj) -> bool:
    import xarray as xr

    return isinstance(obj, xr.DataArray)


def _is_dask(a) -> bool:
    return type(a).__module__.startswith("dask")


def _cube_times(cube, times):
    if _is_dataarray(cube):
        if "time" not in cube.dims:
            raise TimeSeriesError(f"The cube has no 'time' dimension (dims {cube.dims}).", field="time",
                                  fix="pass a DataArray with dims (time, y, x)")
        if times is not None:
            raise TimeSeriesError("'times' was given for a DataArray cube, whose dates are its 'time' coordinate.",
                                  field="times", fix="omit 'times' or pass a plain array")
        return _check_times(cube["time"].values, "time")
    if times is None:
        raise TimeSeriesError("A plain array cube needs its epochs.", field="times",
                              fix="pass times=[...] (one date per first-axis entry) or use a DataArray cube")
    t = _check_times(times, "times")
    if cube.shape[0] != t.size:
        raise TimeSeriesError(f"The cube has {cube.shape[0]} epochs along its first axis but {t.size} dates "
                              f"were given.", field="times", fix="give one date per epoch")
    return t


def _fit(cube, times, model, weights, chunk_pixels, t_ref):
    """Fit ``model``; returns (dict name → array (…spatial), names, times)."""
    t = _cube_times(cube, times)
    A_np, names = design_matrix(t, model, t_ref=t_ref)
    out_names = _output_names(names)
    if _is_dataarray(cube):
        cube = cube.transpose("time", ...)
        spatial = cube.dims[1:]
        wdata = None
        if weights is not None:
            if _is_dataarray(weights):
                weights = weights.transpose("time", *[d for d in spatial if d in weights.dims])
                if weights.shape != cube.shape and weights.dims != ("time",):
                    raise TimeSeriesError(f"weights dims {weights.dims} match neither (time,) nor the cube.",
                                          field="weights", fix="give weights with dims (time,) or (time, y, x)")
                wdata = weights.data
            else:
                wdata = weights
        data = cube.data
        if _is_dask(data):
            import dask.array as da
            from dask.array.utils import meta_from_array

            data = data.rechunk({0: -1})
            n_out = len(out_names)
            args = [data]
            if wdata is not None and getattr(wdata, "ndim", 1) > 1:
                wd = wdata if _is_dask(wdata) else da.from_array(wdata)
                args.append(wd.rechunk(data.chunks))
                fn = lambda b, w: _fit_block(b, w, A_np=A_np, names=names, chunk_pixels=chunk_pixels)  # noqa: E731
            else:
                w1 = None if wdata is None else backend.to_numpy(wdata).astype(np.float64)
                def fn(b):
                    w = None if w1 is None else backend.asarray(w1, xp=backend.namespace(b))
                    return _fit_block(b, w, A_np=A_np, names=names, chunk_pixels=chunk_pixels)
            res = da.map_blocks(fn, *args, dtype=np.float64, chunks=((n_out,),) + data.chunks[1:],
                                meta=meta_from_array(data, ndim=3, dtype=np.float64))
        else:
            xp = backend.namespace(data)
            shp = data.shape
            Y = xp.reshape(data, (shp[0], int(np.prod(shp[1:]))))
            W = None
            if wdata is not None:
                wdata = backend.asarray(wdata, xp=xp, dtype=xp.float64)
                W = wdata if wdata.ndim == 1 else xp.reshape(wdata, Y.shape)
            res = xp.reshape(_fit_2d(Y, A_np, names, W, chunk_pixels), (len(out_names), *shp[1:]))
        coords = {d: cube.coords[d] for d in spatial if d in cube.coords}
        result = {name: (spatial, res[i]) for i, name in enumerate(out_names)}
        return result, names, t, coords, cube
    xp = backend.namespace(cube, weights)
    shp = cube.shape
    Y = xp.reshape(cube, (shp[0], int(np.prod(shp[1:])) if len(shp) > 1 else 1))
    W = None
    if weights is not None:
        W = weights if weights.ndim == 1 else xp.reshape(weights, Y.shape)
    res = _fit_2d(Y, A_np, names, W, chunk_pixels)
    result = {name: xp.reshape(res[i, :], shp[1:]) for i, name in enumerate(out_names)}
    return result, names, t, None, None


_UNITS = {"intercept": "mm", "velocity": "mm/yr", "acceleration": "mm/yr2", "residual_rms": "mm", "n_valid": "1",
          "annual_amplitude": "mm", "semiannual_amplitude": "mm", "annual_peak_doy": "day of year",
          "semiannual_peak_doy": "day of half-year"}


def _to_dataset(result, coords, cube, attrs):
    import xarray as xr

    variables = {}
    for name, (dims, arr) in result.items():
        base = name[:-4] if name.endswith("_std") else name
        unit = _UNITS.get(base, "mm")
        variables[name] = xr.DataArray(arr, dims=dims, coords=coords, name=name, attrs={"units": unit})
    ds = xr.Dataset(variables, attrs=attrs)
    try:
        if cube.rio.crs is not None:
            ds = ds.rio.write_crs(cube.rio.crs, inplace=True)
    except Exception:  # rioxarray absent or no CRS: coordinates still describe the grid
        pass
    return ds


def fit_velocity(cube, times: Any = None, *, acceleration: bool = False, seasonal: bool = False, weights=None,
                 chunk_pixels: int = DEFAULT_CHUNK_PIXELS, t_ref: Any = None):
    """Per-pixel linear velocity (mm/yr) with intercept, optionally acceleration and seasonal terms.

    Parameters
    ----------
    cube
        DataArray (time, y, x) in mm (NumPy, CuPy or Dask backed), or an array (T, ...) with ``times``.
    times
        Dates of the epochs (only for plain arrays).
    acceleration
        Fit a quadratic: adds ``acceleration`` (mm/yr²).
    seasonal
        Fit annual + semi-annual sin/cos: adds amplitudes (mm) and peak day of year.
    weights
        Inverse variances (1/mm²): (time,) or shaped like the cube; zero/NaN drops an observation.
    chunk_pixels
        Pixels per solve (memory bound); the result does not depend on it.
    t_ref
        Reference date of the intercept (default: the first epoch).

    Returns
    -------
    xarray.Dataset (for a DataArray; lazy for a Dask cube) or dict of arrays shaped like ``cube.shape[1:]``:
    each parameter and ``<parameter>_std`` (formal 1-sigma, see the module docstring), ``residual_rms`` (mm),
    ``n_valid`` (epochs used). Pixels with too few valid epochs are NaN.
    """
    model = ("quadratic" if acceleration else "linear") + ("+seasonal" if seasonal else "")
    result, names, t, coords, da_cube = _fit(cube, times, model, weights, chunk_pixels, t_ref)
    if da_cube is None:
        return result
    attrs = {"model": model, "t_ref": str((t[0] if t_ref is None else _date(t_ref, "t_ref")))[:10],
             "first_epoch": str(t[0])[:10], "last_epoch": str(t[-1])[:10]}
    return _to_dataset(result, coords, da_cube, attrs)


def fit_annual_velocities(cube, times: Any = None, *, seasonal: bool = False, weights=None,
                          chunk_pixels: int = DEFAULT_CHUNK_PIXELS):
    """Per-pixel annual velocities (mm/yr): a continuous piecewise-linear model, one rate per calendar year.

    The displacement is continuous and the rate changes at each 1 January (see :func:`design_matrix`,
    model ``"annual_rates"``). The first and last years cover only the part inside the data.

    Returns
    -------
    For a DataArray: ``xarray.Dataset`` with ``annual_velocity`` and ``annual_velocity_std`` (year, y, x),
    ``intercept`` (mm at the first epoch), ``residual_rms``, ``n_valid`` (and seasonal terms), coordinates
    ``year`` (int), ``year_start``/``year_end`` (the covered part of each year).
    For a plain array: a dict with ``annual_velocity`` (n_years, ...), ``annual_velocity_std``, ``years`` and
    the other fields.
    """
    model = "annual_rates" + ("+seasonal" if seasonal else "")
    result, names, t, coords, da_cube = _fit(cube, times, model, weights, chunk_pixels, None)
    segs = year_segments(t)
    years = [s[0] for s in segs]
    rate_names = [f"velocity_{y}" for y in years]
    if da_cube is None:
        xp = backend.namespace(result["intercept"])
        out = {k: v for k, v in result.items() if not k.startswith("velocity_")}
        out["annual_velocity"] = xp.stack([result[n] for n in rate_names], axis=0)
        out["annual_velocity_std"] = xp.stack([result[f"{n}_std"] for n in rate_names], axis=0)
        out["years"] = years
        return out
    import xarray as xr

    ds = _to_dataset({k: v for k, v in result.items() if not k.startswith("velocity_")}, coords, da_cube,
                     {"model": model, "first_epoch": str(t[0])[:10], "last_epoch": str(t[-1])[:10]})
    yc = {"year": years, "year_start": ("year", np.array([s[1] for s in segs])),
          "year_end": ("year", np.array([s[2] for s in segs]))}
    for var, suffix in (("annual_velocity", ""), ("annual_velocity_std", "_std")):
        parts = [xr.DataArray(result[n + suffix][1], dims=result[n + suffix][0], coords=coords)
                 for n in rate_names]
        ds[var] = xr.concat(parts, dim="year").assign_coords(yc)
        ds[var].attrs["units"] = "mm/yr"
    return ds


# --------------------------------------------------------------------------------------------------------------
# Cumulative displacement
# --------------------------------------------------------------------------------------------------------------
def _check_in_span(t: np.ndarray, d: np.datetime64, field: str) -> None:
    if d < t[0] or d > t[-1]:
        raise TimeSeriesError(f"{field} {str(d)[:10]} is outside the data "
                              f"({str(t[0])[:10]} to {str(t[-1])[:10]}).",
                              field=field, fix=f"choose a date between {str(t[0])[:10]} and {str(t[-1])[:10]}")


def _interp_weights(t: np.ndarray, d: np.datetime64) -> tuple[int, int, float]:
    i = int(np.searchsorted(t, d, side="right")) - 1
    i = min(max(i, 0), t.size - 1)
    if t[i] == d or i == t.size - 1:
        return i, i, 0.0
    w = float((d - t[i]).astype(np.int64)) / float((t[i + 1] - t[i]).astype(np.int64))
    return i, i + 1, w


def cumulative_displacement(cube, start: Any, end: Any, *, times: Any = None, method: str = "interpolate",
                            fit=None):
    """Displacement (mm) accumulated between ``start`` and ``end`` at every pixel.

    ``method="interpolate"``: linear interpolation of the cube between the two epochs that bracket each date
    (NaN where a bracketing epoch is NaN). ``method="model"``: from the piecewise annual-rate model,
    Σ_years v_year × (time of [start, end] inside that year) — NaN-aware through the fit; pass ``fit`` (the
    result of :func:`fit_annual_velocities`) to reuse one.

    Dates outside the data raise :class:`TimeSeriesError`. Returns a DataArray (y, x) for a DataArray cube,
    else an array shaped like ``cube.shape[1:]``.
    """
    t = _cube_times(cube, times)
    d0, d1 = _date(start, "start"), _date(end, "end")
    _check_in_span(t, d0, "start")
    _check_in_span(t, d1, "end")
    if d1 < d0:
        raise TimeSeriesError(f"end {str(d1)[:10]} is before start {str(d0)[:10]}.", field="end",
                              fix="give start before end")
    attrs = {"units": "mm", "start": str(d0)[:10], "end": str(d1)[:10], "method": method}
    if method == "interpolate":
        i0, j0, w0 = _interp_weights(t, d0)
        i1, j1, w1 = _interp_weights(t, d1)
        if _is_dataarray(cube):
            c = cube.transpose("time", ...)

            def at(i, j, w):
                a = c.isel(time=i).drop_vars("time", errors="ignore")
                if w == 0.0:
                    return a
                b = c.isel(time=j).drop_vars("time", errors="ignore")
                return a * (1.0 - w) + b * w

            out = at(i1, j1, w1) - at(i0, j0, w0)
            out.name = "cumulative_displacement"
            out.attrs = attrs
            return out

        def at_arr(i, j, w):
            return cube[i, ...] if w == 0.0 else cube[i, ...] * (1.0 - w) + cube[j, ...] * w

        return at_arr(i1, j1, w1) - at_arr(i0, j0, w0)
    if method != "model":
        raise TimeSeriesError(f"Unknown method {method!r}.", field="method", fix="use 'interpolate' or 'model'")
    if fit is None:
        fit = fit_annual_velocities(cube, times=times)
    segs = year_segments(t)
    durations = []
    for _, s, e in segs:
        lo, hi = max(s, d0), min(e, d1)
        durations.append(max(_years(np.array([hi]), lo)[0], 0.0) if hi > lo else 0.0)
    if _is_dataarray(cube):
        import xarray as xr

        dur = xr.DataArray(np.asarray(durations), dims="year", coords={"year": fit["year"].values})
        out = (fit["annual_velocity"] * dur).sum("year", skipna=False)
        out.name = "cumulative_displacement"
        out.attrs = attrs
        return out
    v = fit["annual_velocity"]
    xp = backend.namespace(v)
    dur = backend.asarray(np.asarray(durations), xp=xp, dtype=v.dtype)
    return xp.sum(v * xp.reshape(dur, (len(durations),) + (1,) * (v.ndim - 1)), axis=0)


# --------------------------------------------------------------------------------------------------------------
# Adjustment of a cube
# --------------------------------------------------------------------------------------------------------------
def _check_same_grid(cube, other, field: str) -> None:
    for dim in ("y", "x"):
        if dim not in other.dims or dim not in cube.dims:
            raise TimeSeriesError(f"{field!r} lacks the {dim!r} dimension of the cube.", field=field,
                                  fix="give it on the cube's (y, x) grid")
        a, b = np.asarray(cube[dim].values, float), np.asarray(other[dim].values, float)
        step = abs(a[1] - a[0]) if a.size > 1 else 1.0
        if a.shape != b.shape or np.max(np.abs(a - b)) > 1e-6 * step:
            raise TimeSeriesError(f"{field!r} is on a different grid than the cube along {dim!r} "
                                  f"({b.size} vs {a.size} pixels).", field=field,
                                  fix="resample it onto the cube's grid first (e.g. "
                                      "other.rio.reproject_match(cube) or other.interp_like(cube))")


def apply_velocity_correction(cube, correction_mm_yr, *, times: Any = None):
    """Apply a velocity correction surface to every epoch: ``cube − correction × (t − t0)/365.25 days``.

    The correction (mm/yr, on the cube's grid) is the long-wavelength surface subtracted from the velocity;
    in the cube it is a term linear in time referenced to the first epoch, so the first epoch is unchanged.
    Keeps the cube's dtype and laziness.
    """
    t = _cube_times(cube, times)
    dt = _years(t, t[0])
    if _is_dataarray(cube):
        import xarray as xr

        if _is_dataarray(correction_mm_yr):
            _check_same_grid(cube, correction_mm_yr, "correction_mm_yr")
            corr = correction_mm_yr.assign_coords(y=cube["y"], x=cube["x"])
        else:
            corr = xr.DataArray(correction_mm_yr, dims=("y", "x"), coords={"y": cube["y"], "x": cube["x"]})
            if corr.shape != (cube.sizes["y"], cube.sizes["x"]):
                raise TimeSeriesError("correction_mm_yr does not match the cube grid.", field="correction_mm_yr",
                                      fix="give it on the cube's (y, x) grid")
        tt = xr.DataArray(dt, dims="time", coords={"time": cube["time"]})
        out = (cube - (corr * tt).astype(cube.dtype)).transpose(*cube.dims)
        out.name, out.attrs = cube.name, dict(cube.attrs)
        return out
    xp = backend.namespace(cube, correction_mm_yr)
    if tuple(correction_mm_yr.shape) != tuple(cube.shape[1:]):
        raise TimeSeriesError(f"correction_mm_yr shape {tuple(correction_mm_yr.shape)} does not match the cube's "
                              f"grid {tuple(cube.shape[1:])}.", field="correction_mm_yr",
                              fix="give one correction per pixel, on the cube's grid")
    dtx = backend.asarray(dt, xp=xp, dtype=cube.dtype)
    dtx = xp.reshape(dtx, (t.size,) + (1,) * (cube.ndim - 1))
    return cube - xp.astype(correction_mm_yr, cube.dtype)[None, ...] * dtx


def _normalised_xy(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel coordinates (ny·nx,) centred and scaled to −1..1 across the grid (for conditioning)."""
    xn = (x - (x[0] + x[-1]) / 2.0) / max(abs(x[-1] - x[0]) / 2.0, 1e-12)
    yn = (y - (y[0] + y[-1]) / 2.0) / max(abs(y[-1] - y[0]) / 2.0, 1e-12)
    xx, yy = np.meshgrid(xn, yn)
    return xx.ravel(), yy.ravel()


def _ramp_design(xp, x, y, order: int):
    """Polynomial design (ny·nx, n): terms [1, x, y, x², xy, y²] truncated to ``order``, normalised coords."""
    xx, yy = _normalised_xy(x, y)
    cols = [np.ones_like(xx)]
    for deg in range(1, order + 1):
        for k in range(deg + 1):
            cols.append(xx ** (deg - k) * yy**k)
    return backend.asarray(np.stack(cols, axis=1), xp=xp, dtype=xp.float64)


def _ramp_kernels(xp):
    """The ramp kernels (fit, subtract) when :mod:`.kernels` implements them for namespace ``xp``, else None."""
    try:
        from . import kernels
    except ImportError:
        return None
    fit, sub = getattr(kernels, "fit_epoch_ramps", None), getattr(kernels, "subtract_epoch_ramps", None)
    if fit is None or sub is None:
        return None
    try:
        backend.dispatch("kernels.fit_epoch_ramps", xp)
        backend.dispatch("kernels.subtract_epoch_ramps", xp)
    except UnsupportedBackendError:  # no fast path on this backend: the array-API path below serves it
        return None
    return fit, sub


def _undetermined(bad: np.ndarray, epochs, order: int) -> TimeSeriesError:
    names = ", ".join(str(epochs[i])[:10] for i in bad[:5])
    return TimeSeriesError(f"Per-epoch ramp of order {order} is undetermined at {bad.size} epoch(s) ({names}): "
                           f"too few usable far-field pixels.", field="far_field_mask",
                           fix="enlarge the far-field mask, lower the ramp order, or drop those epochs")


def _ramps_block(block, mask, weights, *, x, y, order, epochs, use_kernels: bool = True):
    """Fit and subtract per-epoch ramps of a (T, ny, nx) block; mask (ny, nx) or (T, ny, nx) bool.

    NumPy blocks go through ``kernels.fit_epoch_ramps``/``subtract_epoch_ramps`` when available (one streaming
    pass over the cube); every other backend through :func:`linalg.lstsq_shared` with the pixels as
    observations and the epochs as right-hand sides (masks varying by epoch become per-column NaN).
    Returns (corrected block, coefficients (n_terms, T) in normalised coordinates).
    """
    from .linalg import lstsq_shared

    xp = backend.namespace(block)
    T, ny, nx = block.shape
    if tuple(mask.shape) not in ((ny, nx), (T, ny, nx)):
        raise TimeSeriesError(f"far_field_mask shape {tuple(mask.shape)} matches neither the grid ({ny}, {nx}) "
                              f"nor the cube ({T}, {ny}, {nx}).", field="far_field_mask",
                              fix="give a boolean mask on the cube's grid, per epoch or for all epochs")
    if mask.dtype != xp.bool:
        mask = mask != 0
    kern = _ramp_kernels(xp) if use_kernels else None
    if kern is not None:
        fit, sub = kern
        xn, yn = (backend.asarray(c, xp=xp, dtype=xp.float64) for c in _normalised_xy(x, y))
        P = ny * nx
        cube2 = xp.reshape(block, (T, P))
        m2 = xp.reshape(mask, (P,) if mask.ndim == 2 else (T, P))
        w2 = None if weights is None else xp.reshape(xp.astype(weights, xp.float64),
                                                     (P,) if weights.ndim == 2 else (T, P))
        coef = fit(cube2, xn, yn, order=order, weights=w2, mask=m2)  # (T, n_terms)
        ok = backend.to_numpy(xp.all(xp.isfinite(coef), axis=1))
        if not ok.all():
            raise _undetermined(np.nonzero(~ok)[0], epochs, order)
        out = sub(cube2, coef, xn, yn, order)
        return xp.astype(xp.reshape(out, (T, ny, nx)), block.dtype), xp.matrix_transpose(coef)
    A = _ramp_design(xp, x, y, order)
    Y = xp.matrix_transpose(xp.reshape(xp.astype(block, xp.float64), (T, ny * nx)))  # (P, T)
    if mask.ndim == 2:
        M = xp.reshape(mask, (ny * nx, 1))
    else:
        M = xp.matrix_transpose(xp.reshape(mask, (T, ny * nx)))
    Yf = xp.where(M, Y, xp.nan)
    W = None
    if weights is not None:
        W = xp.reshape(weights, (ny * nx, 1)) if weights.ndim == 2 else xp.matrix_transpose(
            xp.reshape(weights, (T, ny * nx)))
        W = xp.astype(W, xp.float64)
        if W.shape[1] == 1:
            W = xp.broadcast_to(W, Yf.shape)
    res = lstsq_shared(A, Yf, W)
    if not bool(xp.all(res.determined)):
        raise _undetermined(np.nonzero(~backend.to_numpy(res.determined))[0], epochs, order)
    ramp = xp.matmul(A, res.x)  # (P, T)
    out = Y - ramp
    return xp.astype(xp.reshape(xp.matrix_transpose(out), (T, ny, nx)), block.dtype), res.x


def remove_epoch_ramps(cube, far_field_mask, order: int = 1, weights=None, *, times: Any = None, x=None, y=None,
                       return_coefficients: bool = False):
    """Fit a polynomial ramp to the far-field pixels of every epoch and subtract it everywhere.

    Parameters
    ----------
    cube
        DataArray (time, y, x) mm, or an array (T, ny, nx) with ``x``/``y`` pixel-centre coordinates.
    far_field_mask
        True where a pixel is far-field (assumed stable apart from the ramp): (y, x), or (time, y, x) when it
        varies by epoch. NaN pixels are never used.
    order
        Polynomial order: 0 offset, 1 plane (a + b·x + c·y), 2 quadratic surface.
    weights
        Inverse variances (1/mm²), (y, x) or (time, y, x); None = equal weights.
    return_coefficients
        Also return the coefficients (n_coef, T) in normalised coordinates (−1..1 across the grid).

    A Dask cube is processed lazily in blocks of epochs (each block holds whole epochs). An epoch whose ramp is
    undetermined raises :class:`TimeSeriesError`.
    """
    if order not in (0, 1, 2):
        raise TimeSeriesError(f"Ramp order {order} is not supported.", field="order", fix="use 0, 1 or 2")
    if _is_dataarray(cube):
        t = _cube_times(cube, None)
        cube = cube.transpose("time", "y", "x")
        xs, ys = np.asarray(cube["x"].values, float), np.asarray(cube["y"].values, float)
        masks = []
        for name, obj in (("far_field_mask", far_field_mask), ("weights", weights)):
            if obj is None:
                masks.append(None)
                continue
            if _is_dataarray(obj):
                _check_same_grid(cube, obj, name)
                obj = obj.transpose(*[d for d in ("time", "y", "x") if d in obj.dims]).data
            masks.append(obj)
        mask, w = masks
        data = cube.data
        if _is_dask(data):
            import dask.array as da
            from dask.array.utils import meta_from_array

            data = data.rechunk({1: -1, 2: -1})
            if return_coefficients:
                raise TimeSeriesError("return_coefficients is not available for a Dask cube.",
                                      field="return_coefficients", fix="compute the cube first or omit it")

            # whole epochs per block; 2-D mask/weights travel with the function, 3-D ones as aligned blocks
            extra, names3 = [], []
            fixed = {}
            for name, a in (("m", mask), ("ww", w)):
                if a is None:
                    fixed[name] = None
                elif a.ndim == 3:
                    a = a if _is_dask(a) else da.from_array(a)
                    extra.append(a.rechunk(data.chunks))
                    names3.append(name)
                else:
                    fixed[name] = backend.to_numpy(a)

            def fn(b, *blocks, block_info=None):
                xp_b = backend.namespace(b)
                kw = dict(zip(names3, blocks))
                for name, a in fixed.items():
                    kw[name] = None if a is None else backend.asarray(a, xp=xp_b)
                lo, hi = block_info[0]["array-location"][0]
                return _ramps_block(b, kw["m"], kw["ww"], x=xs, y=ys, order=order, epochs=t[lo:hi])[0]

            out = da.map_blocks(fn, data, *extra, dtype=data.dtype, meta=meta_from_array(data, ndim=3))
            result = cube.copy(data=out)
            return result
        xp = backend.namespace(data)
        mask = backend.asarray(mask, xp=xp)
        w = None if w is None else backend.asarray(w, xp=xp)
        corrected, coef = _ramps_block(data, mask, w, x=xs, y=ys, order=order, epochs=t)
        result = cube.copy(data=corrected)
        return (result, coef) if return_coefficients else result
    if x is None or y is None:
        raise TimeSeriesError("A plain array cube needs its pixel-centre coordinates.", field="x/y",
                              fix="pass x=... and y=... (1-D) or use a DataArray cube")
    t = _cube_times(cube, times) if times is not None else np.arange(cube.shape[0])
    corrected, coef = _ramps_block(cube, far_field_mask, weights, x=np.asarray(x, float), y=np.asarray(y, float),
                                   order=order, epochs=t)
    return (corrected, coef) if return_coefficients else corrected
