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
from ..errors import GnssError, InputError
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

        The means are evaluated at every pixel (stations × pixels). The sigmas, which cost stations² per point,
        are evaluated on a coarse pixel grid (a quarter of the shortest fitted correlation length) and
        interpolated bilinearly; the interpolation error is checked at the coarse cells' centres and the step
        halved until it is within ``tolerance`` mm/yr.
        """
        import xarray as xr

        self._check_fitted()
        ny, nx = frame.sizes["y"], frame.sizes["x"]
        ve, vn, se, sn = self._predict_coarse(frame, ny, nx, tolerance)
        if self._add_rotation and not plate_fixed:
            pe, pn, _, _ = plates.plate_velocity_grid(frame, self.plate, self.model)
            ve, vn = ve + pe, vn + pn
        frame_name = f"{str(self.plate).upper()}-fixed" if (plate_fixed and self.plate) else self.reference_frame_
        coords = {"y": frame["y"], "x": frame["x"]}
        ds = xr.Dataset({k: (("y", "x"), v.astype(np.float32), {"units": "mm/yr"})
                         for k, v in (("ve", ve), ("vn", vn), ("se", se), ("sn", sn))}, coords=coords,
                        attrs={"reference_frame": frame_name})
        return ds

    def _predict_coarse(self, frame, ny: int, nx: int, tolerance: float):
        """(ve, vn, se, sn) of the GP part (plate-fixed) at every pixel: the means (stations × pixels) at every
        pixel, the sigmas (stations² × pixels) through a checked coarse grid."""
        rows, cols = np.arange(ny), np.arange(nx)
        ve, vn, _, _ = self.predict(*plates._frame_lonlat(frame, rows, cols), plate_fixed=True, return_std=False)
        se, sn = self._sigma_coarse(frame, ny, nx, tolerance)
        return ve, vn, se, sn

    def _sigma_coarse(self, frame, ny: int, nx: int, tolerance: float):
        """(se, sn) at every pixel through a coarse grid checked at its cells' centres (``tolerance`` mm/yr)."""
        lon_s, lat_s = plates._frame_lonlat(frame, np.array([0, ny // 2, ny - 1]), np.array([0, nx // 2, nx - 1]))
        mid_lat = float(np.nanmean(lat_s))
        dlon = np.max(np.abs(np.diff(lon_s, axis=1))) / max((nx - 1) / 2, 1)
        dlat = np.max(np.abs(np.diff(lat_s, axis=0))) / max((ny - 1) / 2, 1)
        pixel_km = 111.2 * max(dlat, dlon * np.cos(np.radians(mid_lat)), 1e-9)
        step = max(int(min(self.length_scale_km_) / 4.0 / pixel_km), 1)

        def sigmas(lon, lat):
            return self.predict(lon, lat, plate_fixed=True)[2:]

        found = plates.checked_coarse_grid(frame, sigmas, step, tolerance)
        if found is None:
            return sigmas(*plates._frame_lonlat(frame, np.arange(ny), np.arange(nx)))
        coarse, wy, wx, _ = found
        return tuple(wy @ c @ wx.T for c in coarse)

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
    da = da.transpose("y", "x").astype(np.float64).load()
    if float(np.nanmax(np.abs(da["y"].values))) > 90.0:
        raise InputError("The grid's latitudes exceed ±90 degrees.", file=path, field="lat",
                         fix="give a grid in geographic coordinates (EPSG:4326)")
    return da


def load_horizontal_grids(e_path, n_path, *, reference_frame: str = "EURA-fixed"):
    """Read east and north velocity grids (mm/yr; GMT netCDF ``.grd`` or GeoTIFF, geographic) into a Dataset
    ``ve, vn`` (y, x) with ``attrs["reference_frame"]`` (the grids' frame, default Eurasia-fixed)."""
    import xarray as xr

    plates.normalise_frame(reference_frame, file=e_path)  # unknown frame names fail here, not later
    e, n = _open_grid(e_path), _open_grid(n_path)
    if e.shape != n.shape or not (np.allclose(e["x"], n["x"]) and np.allclose(e["y"], n["y"])):
        raise InputError("The east and north grids are not on the same grid.", file=n_path, field="lon/lat",
                         fix="resample both components to one grid (e.g. gmt grdsample) before loading")
    ds = xr.Dataset({"ve": e.drop_vars([c for c in e.coords if c not in ("x", "y")]),
                     "vn": n.drop_vars([c for c in n.coords if c not in ("x", "y")])})
    ds = ds.assign_coords(x=e["x"].values, y=e["y"].values)
    for v in ("ve", "vn"):
        ds[v].attrs = {"units": "mm/yr"}
    ds.attrs = {"reference_frame": reference_frame, "path_e": os.fspath(e_path), "path_n": os.fspath(n_path)}
    return ds


def sample_horizontal_grids(grids, frame, *, to_itrf: bool = False, model: str = "ITRF2014"):
    """The grids' ``ve, vn`` bilinearly interpolated at every pixel of a Frame Dataset (float32, mm/yr).

    Pixels outside the grids' extent get NaN (no field there) and are counted in the log. With ``to_itrf`` a
    ``"<PLATE>-fixed"`` field is converted to the ITRF of ``model`` by adding the plate's rotation.
    """
    import xarray as xr

    ny, nx = frame.sizes["y"], frame.sizes["x"]
    lon, lat = plates._frame_lonlat(frame, np.arange(ny), np.arange(nx))
    pts = {"x": xr.DataArray(lon, dims=("y_", "x_")), "y": xr.DataArray(lat, dims=("y_", "x_"))}
    ve = grids["ve"].interp(pts, method="linear").values
    vn = grids["vn"].interp(pts, method="linear").values
    frame_name = grids.attrs.get("reference_frame", "")
    if to_itrf:
        kind, plate = plates.normalise_frame(frame_name, file=grids.attrs.get("path_e"))
        if kind == "fixed":
            pe, pn, _, _ = plates.plate_velocity_grid(frame, plate, model)
            ve, vn = ve + pe, vn + pn
            frame_name = plates._normalise_model(model)
    outside = int(np.sum(~np.isfinite(ve)))
    if outside:
        log.info("horizontal grids cover %d of %d pixels of %s", ve.size - outside, ve.size,
                 frame.attrs.get("frame_id", "the frame"))
    return xr.Dataset({"ve": (("y", "x"), ve.astype(np.float32), {"units": "mm/yr"}),
                       "vn": (("y", "x"), vn.astype(np.float32), {"units": "mm/yr"})},
                      coords={"y": frame["y"], "x": frame["x"]}, attrs={"reference_frame": frame_name})
