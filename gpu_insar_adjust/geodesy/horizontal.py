"""A horizontal GNSS velocity field: interpolated from stations, or loaded from given grids.

LOS decomposition to vertical needs the horizontal motion at every pixel. :class:`HorizontalVelocityField`
estimates it from a Stations table the way geodesists usually do: remove the rigid rotation of the plate (from
PROJ's plate motion model, :mod:`.plates`), interpolate the small, smooth east/north residuals with a Gaussian
process (scikit-learn ``GaussianProcessRegressor``, Matérn kernel on azimuthal-equidistant km coordinates, the
stations' own sigmas as heteroscedastic noise plus a fitted white-noise term), and add the rotation back.
:func:`load_horizontal_grids` reads a field that someone already made (e.g. GMT ``greenspline`` grids) and
:func:`sample_horizontal_grids` puts it on a frame's pixels.

Velocities and sigmas are mm/yr; coordinates degrees. Host-only (scikit-learn, pandas): NumPy arrays in and out.
"""

from __future__ import annotations

import functools

import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import GnssError, InputError, PlateModelError
from . import plates

__all__ = ["HorizontalVelocityField", "load_horizontal_grids", "sample_horizontal_grids"]

log = logging.getLogger(__name__)


class HorizontalVelocityField:
    """Horizontal (east, north) velocity field interpolated from GNSS stations, with 1-sigma.

    Parameters
    ----------
    plate, model
        Plate whose rigid rotation is removed before interpolation and added back after (``None``: interpolate
        the velocities as given), and the PROJ plate motion model (``"ITRF2014"`` or ``"ITRF2020"``).
    length_scale_km
        Starting correlation length of the Matérn kernel (km); optimised within ``length_scale_bounds_km``.
    nu
        Matérn smoothness (1.5: once-differentiable fields, the usual choice for interseismic velocities).
    min_sigma
        Floor (mm/yr) on station sigmas; published sigmas of 0.1 mm/yr would otherwise force the field through
        every station. Missing sigmas take the median of the others.
    n_restarts_optimizer
        Extra random restarts of the kernel hyper-parameter optimisation (scikit-learn).

    Fitted attributes: ``reference_frame_`` (frame of :meth:`predict` output), ``gp_e_``, ``gp_n_`` (fitted
    regressors), ``length_scale_km_`` (e, n), ``loo_residuals_`` (DataFrame: station, de, dn = observed minus
    leave-one-out prediction, mm/yr), ``loo_rmse_e_``, ``loo_rmse_n_`` and ``loo_rmse_`` (RMS over both
    components), ``n_stations_``.
    """

    def __init__(self, plate: str | None = "EURA", model: str = "ITRF2014", *, length_scale_km: float = 150.0,
                 length_scale_bounds_km: tuple[float, float] = (10.0, 5000.0), nu: float = 1.5,
                 min_sigma: float = 0.3, n_restarts_optimizer: int = 2, random_state: int | None = 0):
        self.plate = plate
        self.model = model
        self.length_scale_km = length_scale_km
        self.length_scale_bounds_km = length_scale_bounds_km
        self.nu = nu
        self.min_sigma = min_sigma
        self.n_restarts_optimizer = n_restarts_optimizer
        self.random_state = random_state

    _PARAMS = ("plate", "model", "length_scale_km", "length_scale_bounds_km", "nu", "min_sigma",
               "n_restarts_optimizer", "random_state")

    def get_params(self, deep: bool = True) -> dict:
        """Constructor parameters (scikit-learn protocol, so ``sklearn.base.clone`` works)."""
        return {k: getattr(self, k) for k in self._PARAMS}

    def set_params(self, **params):
        for k, v in params.items():
            if k not in self._PARAMS:
                raise ValueError(f"Invalid parameter {k!r} for HorizontalVelocityField; valid: {self._PARAMS}")
            setattr(self, k, v)
        return self

    # ----------------------------------------------------------------------------------------------------------
    def _project(self, lon, lat):
        """Azimuthal equidistant km coordinates about the stations' centre (distances true from the centre)."""
        x, y = self._proj.transform(np.asarray(lon, float), np.asarray(lat, float))
        return np.column_stack([np.ravel(x), np.ravel(y)])

    def _kernel(self):
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        return (ConstantKernel(1.0, (1e-3, 1e3))
                * Matern(length_scale=self.length_scale_km, length_scale_bounds=self.length_scale_bounds_km,
                         nu=self.nu)
                + WhiteKernel(0.05, (1e-6, 10.0)))

    def fit(self, stations, y=None):
        """Fit on a Stations table (docs/data-model.md); ``y`` is ignored (scikit-learn signature)."""
        import pyproj
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor

        t0 = time.perf_counter()
        path = stations.attrs.get("path")
        for col in ("station", "lon", "lat", "ve", "vn"):
            if col not in stations.columns:
                raise GnssError(f"The stations table has no {col!r} column.", file=path, field=col,
                                fix="read GNSS velocities with io.gnss.read_gnss (columns of docs/data-model.md)")
        frame_kind, fixed_plate = plates.normalise_frame(stations.attrs.get("reference_frame"), file=path)
        if self.plate is None:
            resid = stations
            self.reference_frame_ = stations.attrs["reference_frame"]
            self._add_rotation = False
        elif frame_kind == "fixed" and fixed_plate == str(self.plate).upper():
            resid = stations
            self.reference_frame_ = f"{fixed_plate}-fixed"
            self._add_rotation = False
        else:
            resid = plates.to_plate_fixed(stations, self.plate, self.model)
            # Rotation added back in the model's ITRF, so predictions are in that frame.
            self.reference_frame_ = plates._normalise_model(self.model)
            self._add_rotation = True
        lon = resid["lon"].to_numpy(float)
        lat = resid["lat"].to_numpy(float)
        ve = resid["ve"].to_numpy(float)
        vn = resid["vn"].to_numpy(float)
        good = np.isfinite(lon) & np.isfinite(lat) & np.isfinite(ve) & np.isfinite(vn)
        if good.sum() < 5:
            raise GnssError(
                f"Only {int(good.sum())} stations have finite horizontal velocities; at least 5 are needed to "
                "interpolate a field.", file=path, field="ve/vn",
                fix="give more stations, or load a ready-made field with load_horizontal_grids")
        if np.any(np.abs(lat[good]) > 90):
            plates._validate_lonlat(lon, lat, 0.0)
        lon, lat, ve, vn = lon[good], lat[good], ve[good], vn[good]
        se = self._sigmas(resid, "se", good)
        sn = self._sigmas(resid, "sn", good)

        lon0, lat0 = float(np.mean(lon)), float(np.mean(lat))
        self.centre_ = (lon0, lat0)
        self._proj = pyproj.Transformer.from_crs(
            "EPSG:4326", pyproj.CRS.from_proj4(f"+proj=aeqd +lat_0={lat0} +lon_0={lon0} +ellps=WGS84 +units=km"),
            always_xy=True)
        X = self._project(lon, lat)

        self._fits = {}
        for comp, v, s in (("e", ve, se), ("n", vn, sn)):
            # Normalise by hand so the station variances (alpha) stay in the same units as the targets.
            mean, scale = float(np.mean(v)), float(np.std(v)) or 1.0
            gp = GaussianProcessRegressor(self._kernel(), alpha=(s / scale) ** 2, normalize_y=False,
                                          n_restarts_optimizer=self.n_restarts_optimizer,
                                          random_state=self.random_state)
            with warnings.catch_warnings():
                # A white-noise level at its lower bound only means the station sigmas explain the scatter.
                warnings.simplefilter("ignore", ConvergenceWarning)
                gp.fit(X, (v - mean) / scale)
            self._fits[comp] = (gp, mean, scale)
        self.gp_e_, self.gp_n_ = self._fits["e"][0], self._fits["n"][0]
        self.length_scale_km_ = tuple(float(self._fits[c][0].kernel_.k1.k2.length_scale) for c in ("e", "n"))
        self.n_stations_ = int(good.sum())

        import pandas as pd

        de = self._loo("e", (ve - self._fits["e"][1]) / self._fits["e"][2])
        dn = self._loo("n", (vn - self._fits["n"][1]) / self._fits["n"][2])
        self.loo_residuals_ = pd.DataFrame({"station": resid["station"].to_numpy()[good], "de": de, "dn": dn})
        self.loo_rmse_e_ = float(np.sqrt(np.mean(de ** 2)))
        self.loo_rmse_n_ = float(np.sqrt(np.mean(dn ** 2)))
        self.loo_rmse_ = float(np.sqrt(np.mean(np.r_[de, dn] ** 2)))
        log.info("horizontal field from %d stations (%s): length scales %.0f/%.0f km, LOO RMS e %.2f n %.2f "
                 "mm/yr, %.2f s", self.n_stations_, self.reference_frame_, *self.length_scale_km_,
                 self.loo_rmse_e_, self.loo_rmse_n_, time.perf_counter() - t0)
        return self

    def _sigmas(self, table, col, good):
        if col not in table.columns:
            s = np.full(int(good.sum()), np.nan)
        else:
            s = table[col].to_numpy(float)[good]
        if np.all(~np.isfinite(s)):
            s = np.full_like(s, 1.0)  # no sigmas at all: 1 mm/yr, the white-noise term absorbs the rest
        s = np.where(np.isfinite(s), s, np.nanmedian(s))
        return np.maximum(s, self.min_sigma)

    def _loo(self, comp, y_norm):
        """Observed minus leave-one-out prediction (mm/yr), closed form for fixed hyper-parameters
        (Rasmussen & Williams 2006, eq. 5.12): r_i = [K⁻¹y]_i / [K⁻¹]_ii."""
        from scipy.linalg import cho_solve

        gp, _, scale = self._fits[comp]
        L = gp.L_
        kinv = cho_solve((L, True), np.eye(L.shape[0]))
        return (kinv @ y_norm) / np.diag(kinv) * scale

    def _check_fitted(self):
        if not hasattr(self, "gp_e_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("HorizontalVelocityField is not fitted yet; call fit(stations) first.")

    def _predict_comp(self, comp, X, return_std: bool = True):
        from scipy.linalg import solve_triangular

        gp, mean, scale = self._fits[comp]
        signal = gp.kernel_.k1  # ConstantKernel * Matern: the field itself, without the white noise
        ks = _signal_cross_kernel(signal, X, gp.X_train_)
        mu = ks @ gp.alpha_
        if not return_std:
            return mu * scale + mean, None
        v = solve_triangular(gp.L_, ks.T, lower=True)
        var = np.clip(signal.diag(X) - np.sum(v * v, axis=0), 0.0, None)
        return mu * scale + mean, np.sqrt(var) * scale

    def predict(self, lon, lat, *, plate_fixed: bool = False, chunk: int = 100_000, return_std: bool = True):
        """(ve, vn, se, sn) mm/yr at points (degrees), in ``reference_frame_`` (or plate-fixed when
        ``plate_fixed``). ``se``/``sn`` are the 1-sigma of the interpolated field (the rotation is taken exact)."""
        self._check_fitted()
        lon = np.asarray(backend.to_numpy(lon), dtype=float)
        lat = np.asarray(backend.to_numpy(lat), dtype=float)
        lon, lat = np.broadcast_arrays(lon, lat)
        shape = lon.shape
        lon_f, lat_f = lon.ravel(), lat.ravel()
        plates._validate_lonlat(lon_f, lat_f, 0.0)
        out = [np.empty(lon_f.size) for _ in range(4)]
        for i in range(0, lon_f.size, chunk):
            X = self._project(lon_f[i:i + chunk], lat_f[i:i + chunk])
            for k, comp in enumerate(("e", "n")):
                mu, sd = self._predict_comp(comp, X, return_std)
                out[k][i:i + chunk] = mu
                out[k + 2][i:i + chunk] = sd if sd is not None else np.nan
        if self._add_rotation and not plate_fixed:
            pe, pn, _ = plates.plate_velocity_enu(lon_f, lat_f, plate=self.plate, model=self.model)
            out[0] += pe
            out[1] += pn
        return tuple(o.reshape(shape) for o in out)

    def predict_grid(self, frame, *, plate_fixed: bool = False, tolerance: float = 0.05):
        """The field on every pixel of a Frame Dataset: Dataset ``ve, vn, se, sn`` (y, x) float32, mm/yr.

        The GP part (means and sigmas) is evaluated on a coarse lattice and interpolated with cubic splines,
        checked to stay within ``tolerance`` mm/yr of the GP at every pixel (:meth:`_gp_frame`); the rotation
        is added through the checked grid of :func:`.plates.plate_velocity_grid` (within 0.01 mm/yr).
        """
        return self.predict_grids([frame], plate_fixed=plate_fixed, tolerance=tolerance)[0]

    def predict_grids(self, frames, *, plate_fixed: bool = False, tolerance: float = 0.05) -> list:
        """:meth:`predict_grid` for several frames (a list of Datasets, one per frame), evaluating the GP only
        once where frames overlap: frames in one CRS share the lattices of :meth:`_gp_frame`."""
        import xarray as xr

        self._check_fitted()
        frames = list(frames)
        t0 = time.perf_counter()
        lattices: dict = {}
        out = []
        for frame in frames:
            crs = plates.frame_crs(frame)
            key = None if crs is None else crs.to_wkt()
            if key not in lattices:
                lattices[key] = _SharedLattice(self, crs)
            rotation = None
            if self._add_rotation and not plate_fixed:
                pe, pn, _, _ = plates.plate_velocity_grid(frame, self.plate, self.model, up=False)
                rotation = (pe, pn)
            ve, vn, se, sn = self._gp_frame(frame, lattices[key], tolerance, rotation=rotation)
            frame_name = (f"{str(self.plate).upper()}-fixed" if (plate_fixed and self.plate)
                          else self.reference_frame_)
            out.append(xr.Dataset({k: (("y", "x"), v, {"units": "mm/yr"})
                                   for k, v in (("ve", ve), ("vn", vn), ("se", se), ("sn", sn))},
                                  coords={"y": frame["y"], "x": frame["x"]}, attrs={"reference_frame": frame_name}))
        n_pixels = sum(f.sizes["y"] * f.sizes["x"] for f in frames)
        log.info("horizontal field on %d frames (%d pixels): GP evaluated at %d points, %.2f s", len(frames),
                 n_pixels, sum(lat.n_evaluated for lat in lattices.values()), time.perf_counter() - t0)
        return out

    def _gp_frame(self, frame, lattice: "_SharedLattice", tolerance: float, rotation=None):
        """(ve, vn, se, sn), float32, of the GP part (plate-fixed) at every pixel of a frame, through a checked
        lattice, plus ``rotation`` (pe, pn: float64 (y, x), mm/yr) in ve, vn when given (added in float64).

        Means and variances (stations and stations² per point) are evaluated at the nodes of a square lattice
        anchored at the CRS origin (spacing ``h``, starting at half the shortest fitted correlation length) and
        interpolated to the pixels by tensor-product cubic splines, the sigmas as the square root of the
        interpolated variance (smoother than the sigma itself where it dips at a station). The interpolation is
        checked against the GP at the lattice cells' centres, where it errs most, to half of ``tolerance``: the
        factor 2 covers a cell whose largest error lies off its centre (a station near its edge). A Matérn-ν
        mean is C^(2ν) at the stations, so the spline error falls as h^p, p = min(2ν, 4); a failed check moves
        to the first lattice on the ladder h0·2^(-k/2) that p predicts will pass (at least one rung; the same
        rungs for every frame, so lattice points are shared with the other frames of ``lattice``: overlapping
        frames evaluate the GP once). A lattice finer than two pixels gives way to the GP at every pixel.
        """
        xs = np.asarray(frame["x"].values, dtype=np.float64)
        ys = np.asarray(frame["y"].values, dtype=np.float64)
        target = 0.5 * tolerance
        order = float(np.clip(2.0 * self.nu, 1.0, 4.0))
        px, py = _pixel_size(xs), _pixel_size(ys)
        pixel = np.nanmax([px, py, 0.0])
        fid = frame.attrs.get("frame_id", "frame")
        level = 0
        while pixel > 0:  # (a single pixel has no spacing: evaluated directly)
            h = lattice.h0 * 2.0 ** (-0.5 * level)
            if not h >= 2.0 * pixel:
                break
            jx = np.arange(np.floor(xs.min() / h), max(np.ceil(xs.max() / h), np.floor(xs.min() / h) + 1) + 1)
            jy = np.arange(np.floor(ys.min() / h), max(np.ceil(ys.max() / h), np.floor(ys.min() / h) + 1) + 1)
            if lattice.geographic and np.max(np.abs(jy)) * h > 90.0:
                break  # a node beyond the pole: no lattice here
            jx, jy = jx.astype(np.int64), jy.astype(np.int64)
            coarse = lattice.moments(h, h, 2 * jy, 2 * jx)
            exact = _finish(lattice.moments(h, h, 2 * jy[:-1] + 1, 2 * jx[:-1] + 1))
            splines = _lattice_splines(jy * h, jx * h, coarse)
            at_centres = _finish([s((jy[:-1] + 0.5) * h, (jx[:-1] + 0.5) * h) for s in splines])
            err = max(float(np.max(np.abs(a - e))) for a, e in zip(at_centres, exact))
            log.debug("GP field of %s: lattice %.4g (%.1f px), error at the cells' centres %.3g mm/yr", fid, h,
                      h / pixel if pixel > 0 else np.inf, err)
            if err <= target:
                return _finish_on_grid(splines, ys, xs, rotation)
            level += max(1, int(np.ceil(-2.0 / order * np.log2(target / err))))
        log.debug("GP field of %s: evaluated at every pixel", fid)
        return _rotated_f32(_finish(lattice.pixel_moments(xs, ys, px, py)), rotation)

    def score(self, stations, y=None) -> float:
        """Coefficient of determination (R²) of the east and north velocities of ``stations`` together (given in
        ``reference_frame_``)."""
        self._check_fitted()
        ve, vn, _, _ = self.predict(stations["lon"].to_numpy(float), stations["lat"].to_numpy(float))
        obs = np.r_[stations["ve"].to_numpy(float), stations["vn"].to_numpy(float)]
        pred = np.r_[ve, vn]
        ok = np.isfinite(obs)
        return float(1.0 - np.sum((obs[ok] - pred[ok]) ** 2) / np.sum((obs[ok] - np.mean(obs[ok])) ** 2))


@functools.lru_cache(maxsize=1)
def _matern_numba():
    """A two-core numba kernel for ConstantKernel × Matern cross covariances, or None without numba."""
    try:
        import numba as nb
    except Exception:
        return None

    @nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def kernel(X, Xs, ls, amp, nu2):  # nu2 = 2ν: 1, 3 or 5
        m, n = X.shape[0], Xs.shape[0]
        out = np.empty((m, n))
        for i in nb.prange(m):
            for j in range(n):
                d = np.sqrt((X[i, 0] - Xs[j, 0]) ** 2 + (X[i, 1] - Xs[j, 1]) ** 2) / ls
                if nu2 == 1:
                    out[i, j] = amp * np.exp(-d)
                elif nu2 == 3:
                    d *= 1.7320508075688772
                    out[i, j] = amp * (1.0 + d) * np.exp(-d)
                else:
                    d *= 2.23606797749979
                    out[i, j] = amp * (1.0 + d + d * d / 3.0) * np.exp(-d)
        return out

    return kernel


def _signal_cross_kernel(signal, X, Xs):
    """``signal(X, Xs)`` for the fitted ConstantKernel × Matern (ν = 0.5, 1.5, 2.5) in closed form, on both
    cores with numba where installed (scikit-learn's path makes several full-size temporaries); any other kernel
    goes through scikit-learn."""
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern

    c, m = getattr(signal, "k1", None), getattr(signal, "k2", None)
    fast = _matern_numba()
    if fast is None or not (isinstance(c, ConstantKernel) and isinstance(m, Matern) and m.nu in (0.5, 1.5, 2.5)
                            and np.ndim(m.length_scale) == 0):
        return signal(X, Xs)
    return fast(np.ascontiguousarray(X, np.float64), np.ascontiguousarray(Xs, np.float64),
                float(m.length_scale), float(c.constant_value), int(round(2 * m.nu)))


def _finish(m):
    """(ve, vn, se, sn) from moments (ve, vn, var_e, var_n): a sequence of arrays or an array (..., 4)."""
    ve, vn, var_e, var_n = (m[..., k] for k in range(4)) if isinstance(m, np.ndarray) else m
    return ve, vn, _sqrt_nonnegative(var_e), _sqrt_nonnegative(var_n)


def _sqrt_nonnegative(var) -> np.ndarray:
    """sqrt(max(var, 0)) with one temporary (the variances may be shared: never written)."""
    out = np.maximum(var, 0.0)
    return np.sqrt(out, out=out)


def _pixel_size(c: np.ndarray) -> float:
    """Pixel spacing (absolute, CRS units) along a coordinate vector, NaN for a single pixel."""
    return float(np.median(np.abs(np.diff(c)))) if c.size > 1 else np.nan


def _lattice_splines(yn: np.ndarray, xn: np.ndarray, values: np.ndarray) -> list:
    """Tensor-product cubic splines (not-a-knot; lower degree below four nodes) through each component of
    ``values`` (len(yn), len(xn), k) on the lattice ``yn`` × ``xn`` (increasing coordinates)."""
    from scipy.interpolate import RectBivariateSpline

    ky, kx = min(3, yn.size - 1), min(3, xn.size - 1)
    return [RectBivariateSpline(yn, xn, values[..., k], kx=ky, ky=kx, s=0) for k in range(values.shape[-1])]


def _on_grid(spline, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A lattice spline at the grid ``ys`` × ``xs`` (pixel coordinates in any order, e.g. y decreasing)."""
    sy, sx = _monotonic(ys), _monotonic(xs)
    if sy is not None and sx is not None:  # raster axes: reverse by views, no scatter of every pixel
        return spline(ys[sy], xs[sx])[sy, sx]
    oy, ox = np.argsort(ys, kind="stable"), np.argsort(xs, kind="stable")
    out = np.empty((ys.size, xs.size))
    out[np.ix_(oy, ox)] = spline(ys[oy], xs[ox])
    return out


#: Pixels per piece of a spline's evaluation on a grid: FITPACK evaluates a piece of rows on one thread with the
#: GIL released, and the piece's float64 values are finished (rotation added, variance to sigma) and stored as
#: float32 while in cache, so no frame-sized float64 array is made. A pixel's value does not depend on the rows
#: evaluated with it: the same bits as whole frames
_GRID_PIECE_PIXELS = 1 << 18


def _finish_on_grid(splines, ys: np.ndarray, xs: np.ndarray, rotation=None) -> tuple:
    """(ve, vn, se, sn) float32 at the grid ``ys`` × ``xs`` from the lattice splines of (ve, vn, var_e, var_n):
    ``_finish([_on_grid(s, ys, xs) for s in splines])`` with ``rotation`` (pe, pn) added to the means, cast to
    float32, bit for bit; in pieces of rows on the host's cores."""
    sy, sx = _monotonic(ys), _monotonic(xs)
    if sy is None or sx is None:  # scattered coordinates: whole frames
        return _rotated_f32(_finish([_on_grid(s, ys, xs) for s in splines]), rotation)
    from ..kernels.cpu import _pool_map

    yi, xi = ys[sy], xs[sx]  # increasing
    outs = tuple(np.empty((ys.size, xs.size), np.float32) for _ in splines)
    views = [o[sy, sx] for o in outs]  # the outputs seen in increasing order
    added = None if rotation is None else [np.asarray(a)[sy, sx] for a in rotation]
    step = max(1, _GRID_PIECE_PIXELS // xs.size)
    jobs = [(k, r0, min(r0 + step, ys.size)) for k in range(len(splines)) for r0 in range(0, ys.size, step)]

    def piece(job):
        k, r0, r1 = job
        v = splines[k](yi[r0:r1], xi)
        if k >= 2:
            v = _sqrt_nonnegative(v)
        elif added is not None:
            v = v + added[k][r0:r1]
        views[k][r0:r1] = v  # float64 → float32, rounded as astype rounds

    _pool_map(piece, jobs)
    return outs


def _rotated_f32(field, rotation) -> tuple:
    """(ve, vn, se, sn) float64 → float32, with ``rotation`` (pe, pn) added to the means first (in float64)."""
    ve, vn, se, sn = field
    if rotation is not None:
        ve, vn = ve + rotation[0], vn + rotation[1]
    return tuple(np.asarray(a, np.float32) for a in (ve, vn, se, sn))


def _monotonic(c: np.ndarray):
    """The slice that makes ``c`` increasing when it is strictly monotonic (itself or reversed), else None."""
    d = np.diff(c)
    if np.all(d > 0):
        return slice(None)
    if np.all(d < 0):
        return slice(None, None, -1)
    return None


_KEY_OFFSET = 1 << 30  # lattice indices within ±2^30 pack into one int64 key


class _SharedLattice:
    """The GP's plate-fixed moments (ve, vn, var_e, var_n) at points of rectangular lattices in one CRS, each
    point evaluated once however many frames need it.

    A lattice of spacing (hy, hx) CRS units is anchored at the CRS origin; its points are keyed by their indices
    on the half-spacing lattice (nodes at even indices, cell centres at odd ones). ``h0`` is the starting
    spacing of :meth:`HorizontalVelocityField._gp_frame`: half the shortest fitted correlation length.
    """

    def __init__(self, field: HorizontalVelocityField, crs):
        import pyproj

        self.field = field
        crs = None if crs is None else pyproj.CRS.from_user_input(crs.to_wkt())
        self.geographic = crs is None or crs.is_geographic
        self._to_lonlat = None
        if self.geographic:
            km_per_unit = 111.2  # per degree of latitude (a degree of longitude is shorter: finer, never coarser)
        else:
            self._to_lonlat = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
            km_per_unit = crs.axis_info[0].unit_conversion_factor / 1000.0
        self.h0 = min(field.length_scale_km_) / 2.0 / km_per_unit
        self._store: dict = {}
        self.n_evaluated = 0

    def _evaluate(self, x, y):
        lon, lat = (x, y) if self._to_lonlat is None else self._to_lonlat.transform(x, y)
        ve, vn, se, sn = self.field.predict(lon, lat, plate_fixed=True)
        self.n_evaluated += int(np.size(ve))
        return np.stack([ve, vn, se * se, sn * sn], axis=-1)

    def moments(self, hy: float, hx: float, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """(len(iy), len(ix), 4) moments at the points (iy × ix) of the half-spacing lattice of (hy, hx),
        evaluating those not known yet."""
        if max(np.max(np.abs(iy)), np.max(np.abs(ix))) >= _KEY_OFFSET:  # beyond the keys' range: no sharing
            yy, xx = np.meshgrid(iy * (0.5 * hy), ix * (0.5 * hx), indexing="ij")
            return self._evaluate(xx, yy)
        key = ((iy[:, None] + _KEY_OFFSET) << 32 | (ix[None, :] + _KEY_OFFSET)).ravel()
        keys, vals = self._store.get((hy, hx), (np.empty(0, np.int64), np.empty((0, 4))))
        pos = np.searchsorted(keys, key)
        known = np.zeros(key.size, bool) if keys.size == 0 else keys[np.minimum(pos, keys.size - 1)] == key
        if not known.all():
            new = np.unique(key[~known])
            new_y, new_x = (new >> 32) - _KEY_OFFSET, (new & 0xFFFFFFFF) - _KEY_OFFSET
            keys = np.concatenate([keys, new])
            vals = np.concatenate([vals, self._evaluate(new_x * (0.5 * hx), new_y * (0.5 * hy))])
            order = np.argsort(keys, kind="stable")
            keys, vals = keys[order], vals[order]
            self._store[(hy, hx)] = (keys, vals)
            pos = np.searchsorted(keys, key)
        return vals[pos].reshape(iy.size, ix.size, 4)

    def pixel_moments(self, xs: np.ndarray, ys: np.ndarray, px: float, py: float) -> np.ndarray:
        """(len(ys), len(xs), 4) moments at every pixel; pixels on a lattice of their own spacing (frames cut
        from one processing grid) are shared with the other frames on it."""
        hx, hy = (float(f"{p:.10g}") if np.isfinite(p) and p > 0 else np.nan for p in (px, py))
        if np.isfinite(hx) and np.isfinite(hy):
            ix, iy = xs / (0.5 * hx), ys / (0.5 * hy)
            rx, ry = np.round(ix), np.round(iy)
            if np.all(np.abs(ix - rx) < 1e-6) and np.all(np.abs(iy - ry) < 1e-6):
                return self.moments(hy, hx, ry.astype(np.int64), rx.astype(np.int64))
        xx, yy = np.meshgrid(xs, ys)
        return self._evaluate(xx, yy)


# --------------------------------------------------------------------------------------------------------------
# Given grids
# --------------------------------------------------------------------------------------------------------------
def _open_grid(path):
    import xarray as xr

    path = Path(path)
    if not path.is_file():
        raise InputError("Horizontal velocity grid not found.", file=path, field="path",
                         fix="give the path of a netCDF (GMT .grd) or GeoTIFF grid of velocities in mm/yr")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import rioxarray

            da = rioxarray.open_rasterio(path, masked=True).squeeze("band", drop=True)
        else:
            ds = xr.open_dataset(path)
            names = [v for v in ds.data_vars if ds[v].ndim == 2]
            if len(names) != 1:
                raise InputError(f"Expected one 2-D variable in the grid, found {names}.", file=path,
                                 field="variables", fix="give a grid file holding a single velocity component")
            da = ds[names[0]]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"Cannot read the horizontal velocity grid: {exc}", file=path, field="format",
                         fix="give a netCDF (GMT .grd) or GeoTIFF grid") from exc
    rename = {}
    for dim in da.dims:
        low = str(dim).lower()
        if low in ("lon", "longitude", "x"):
            rename[dim] = "x"
        elif low in ("lat", "latitude", "y"):
            rename[dim] = "y"
    da = da.rename(rename)
    if set(da.dims) != {"y", "x"}:
        raise InputError(f"The grid's dimensions {da.dims} are not longitude/latitude.", file=path, field="dims",
                         fix="give a geographic grid with lon/lat (or x/y in degrees) dimensions")
    units = str(da.attrs.get("units", "")).strip().lower().replace(" ", "")
    scale = _GRID_UNITS.get(units)
    if units and scale is None:
        raise InputError(f"The grid's units {da.attrs.get('units')!r} are not a velocity the package knows.",
                         file=path, field="units", fix="give the grid in mm/yr (or m/yr, cm/yr with units set)")
    da = da.transpose("y", "x").astype(np.float64).load()
    if scale not in (None, 1.0):  # a grid that says it is in m/yr or cm/yr
        da = da * scale
    if float(np.nanmax(np.abs(da["y"].values))) > 90.0:
        raise InputError("The grid's latitudes exceed ±90 degrees.", file=path, field="lat",
                         fix="give a grid in geographic coordinates (EPSG:4326)")
    x = da["x"].values
    if float(np.nanmax(x)) > 180.0:  # a 0-360° grid (GMT's global grids): the frames' longitudes are ±180°
        wrapped = ((x + 180.0) % 360.0) - 180.0
        order = np.argsort(wrapped, kind="stable")
        da = da.isel(x=order).assign_coords(x=wrapped[order])
    return da


#: Velocity units a grid may declare (its ``units`` attribute), as factors to mm/yr; no attribute means mm/yr
_GRID_UNITS = {"mm/yr": 1.0, "mm/year": 1.0, "mm/a": 1.0, "mmyr-1": 1.0, "mmyr^-1": 1.0,
               "cm/yr": 10.0, "cm/year": 10.0, "m/yr": 1000.0, "m/year": 1000.0, "m/a": 1000.0}


def load_horizontal_grids(e_path, n_path, *, reference_frame: str = "EURA-fixed"):
    """Read east and north velocity grids (mm/yr; GMT netCDF ``.grd`` or GeoTIFF, geographic) into a Dataset
    ``ve, vn`` (y, x) with ``attrs["reference_frame"]`` (the grids' frame, default Eurasia-fixed)."""
    import xarray as xr

    try:  # unknown frame names fail here, not later
        plates.normalise_frame(reference_frame, file=e_path)
    except PlateModelError:
        raise InputError(f"Unknown reference frame {reference_frame!r} of the horizontal grids.", file=e_path,
                         field="--grids-frame",
                         fix="use ITRF2014, ITRF2020, IGS14, IGS20 or '<PLATE>-fixed' with the 4-letter plate "
                             "code such as 'EURA-fixed' ('NOAM-fixed' for NGL's NA)") from None
    e, n = _open_grid(e_path), _open_grid(n_path)
    if e.shape != n.shape or not (np.allclose(e["x"], n["x"]) and np.allclose(e["y"], n["y"])):
        raise InputError("The east and north grids are not on the same grid.", file=n_path, field="lon/lat",
                         fix="resample both components to one grid (e.g. gmt grdsample) before loading")
    # one set of coordinates (the east grid's): float32 and float64 copies of the same axes differ by rounding
    coords = {"y": e["y"].values, "x": e["x"].values}
    ds = xr.Dataset({"ve": (("y", "x"), e.values), "vn": (("y", "x"), n.values)}, coords=coords)
    for v in ("ve", "vn"):
        ds[v].attrs = {"units": "mm/yr"}
    ds.attrs = {"reference_frame": reference_frame, "path_e": os.fspath(e_path), "path_n": os.fspath(n_path)}
    return ds


def sample_horizontal_grids(grids, frame, *, to_itrf: bool = False, model: str = "ITRF2014"):
    """The grids' ``ve, vn`` bilinearly interpolated at every pixel of a Frame Dataset (float32, mm/yr).

    Pixels outside the grids' extent get NaN (no field there) and are counted in the log. With ``to_itrf`` a
    ``"<PLATE>-fixed"`` field is converted to the ITRF of ``model`` by adding the plate's rotation, and a field in
    another ITRF realisation by PROJ's Helmert rates (at the grids' nodes: the change is smooth).
    """
    import xarray as xr

    ny, nx = frame.sizes["y"], frame.sizes["x"]
    lon, lat = plates._frame_lonlat(frame, np.arange(ny), np.arange(nx))
    pts = {"x": xr.DataArray(lon, dims=("y_", "x_")), "y": xr.DataArray(lat, dims=("y_", "x_"))}
    frame_name = grids.attrs.get("reference_frame", "")
    kind = plate = None
    if to_itrf:
        kind, plate = plates.normalise_frame(frame_name, file=grids.attrs.get("path_e"))
        target = plates._normalise_model(model)
        if kind != "fixed" and kind != target:  # the same frame as the stations, whose to_itrf does this too
            node_lon, node_lat = np.meshgrid(grids["x"].values, grids["y"].values)
            de, dn, _ = plates._itrf_to_itrf_rate(kind, target, node_lon, node_lat, np.zeros(node_lon.shape))
            grids = grids.assign(ve=grids["ve"] + xr.DataArray(de, dims=("y", "x")),
                                 vn=grids["vn"] + xr.DataArray(dn, dims=("y", "x")))
            frame_name = target
    ve = grids["ve"].interp(pts, method="linear").values
    vn = grids["vn"].interp(pts, method="linear").values
    if to_itrf:
        if kind == "fixed":
            pe, pn, _, _ = plates.plate_velocity_grid(frame, plate, model, up=False)
            ve, vn = ve + pe, vn + pn
            frame_name = plates._normalise_model(model)
    outside = int(np.sum(~np.isfinite(ve)))
    if outside:
        log.info("horizontal grids cover %d of %d pixels of %s", ve.size - outside, ve.size,
                 frame.attrs.get("frame_id", "the frame"))
    return xr.Dataset({"ve": (("y", "x"), ve.astype(np.float32), {"units": "mm/yr"}),
                       "vn": (("y", "x"), vn.astype(np.float32), {"units": "mm/yr"})},
                      coords={"y": frame["y"], "x": frame["x"]}, attrs={"reference_frame": frame_name})
