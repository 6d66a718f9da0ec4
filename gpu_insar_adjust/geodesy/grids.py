"""Regular grids of pixel centres: true cell areas on the ellipsoid, ground spacing, affine transforms.

Coordinates are pixel **centres** (the convention of every Frame and cube in the package); ``y`` may increase
or decrease. Areas are true areas on the CRS's ellipsoid (WGS84 for EPSG:4326), never the "degrees × 111 km"
approximation:

* geographic grids: the exact area of an ellipsoidal zone between two parallels, per radian of longitude,

      S(φ) = b²/2 · [ sin φ / (1 − e² sin² φ) + artanh(e sin φ) / e ],

  so a cell between φ1 and φ2 spanning Δλ has area Δλ · (S(φ2) − S(φ1)); the whole WGS84 globe sums to
  510,065,621.7 km² (the same closed form PROJ/GeographicLib use for polygon areas);
* projected grids: nominal cell area divided by the projection's areal scale factor at the cell centre
  (``pyproj.Proj.get_factors``), exact to second order in the cell size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import GeometryError

__all__ = ["cell_area_m2", "cell_area", "grid_spacing_m", "transform_from_coords", "regular_step"]

_DEFAULT_CRS = "EPSG:4326"


def _coord(values: Any, name: str) -> np.ndarray:
    a = np.asarray(getattr(values, "values", values), dtype=np.float64)
    if a.ndim != 1 or a.size < 1:
        raise GeometryError(f"Coordinate {name!r} must be a 1-D array of pixel centres, got shape {a.shape}.",
                            field=name, fix=f"pass the 1-D {name} coordinate of the grid (e.g. da.{name})")
    if not np.all(np.isfinite(a)):
        raise GeometryError(f"Coordinate {name!r} contains NaN or inf.", field=name,
                            fix="pass finite pixel-centre coordinates")
    return a


def regular_step(values: Any, name: str, *, rtol: float = 1e-6) -> float:
    """Signed spacing of a regular 1-D coordinate of pixel centres; raises when it is irregular or constant."""
    a = _coord(values, name)
    if a.size < 2:
        raise GeometryError(f"Coordinate {name!r} has a single value; the pixel size cannot be inferred.",
                            field=name, fix="pass a grid with at least two pixels along each axis")
    d = np.diff(a)
    step = (a[-1] - a[0]) / (a.size - 1)
    if step == 0 or np.max(np.abs(d - step)) > rtol * abs(step):
        raise GeometryError(f"Coordinate {name!r} is not regularly spaced (steps {d.min():.9g} to {d.max():.9g}).",
                            field=name, fix="resample onto a regular grid first (e.g. with rioxarray "
                                            "reproject_match) before computing areas")
    return float(step)


def _crs(crs):
    import pyproj

    try:
        return pyproj.CRS.from_user_input(crs if crs is not None else _DEFAULT_CRS)
    except pyproj.exceptions.CRSError as exc:
        raise GeometryError(f"Unknown coordinate reference system {crs!r}.", field="crs",
                            fix="give an EPSG code such as 'EPSG:4326' or 'EPSG:32650', or a WKT/PROJ string"
                            ) from exc


def _ellipsoid(crs) -> tuple[float, float]:
    """(semi-major axis a in m, eccentricity squared) of the CRS's ellipsoid."""
    ell = crs.ellipsoid
    if ell is None:
        raise GeometryError(f"CRS {crs.name!r} has no ellipsoid.", field="crs",
                            fix="use a CRS with a geodetic datum, e.g. 'EPSG:4326'")
    a = ell.semi_major_metre
    inv_f = ell.inverse_flattening
    f = 0.0 if not inv_f else 1.0 / inv_f
    return float(a), float(f * (2.0 - f))


def _zone_area_per_radian(lat_deg: np.ndarray, a: float, e2: float) -> np.ndarray:
    """Area (m²) between the equator and latitude φ per radian of longitude, on the ellipsoid (a, e²)."""
    s = np.sin(np.radians(lat_deg))
    b2 = a * a * (1.0 - e2)
    if e2 == 0.0:
        return a * a * s
    e = np.sqrt(e2)
    return 0.5 * b2 * (s / (1.0 - e2 * s * s) + np.arctanh(e * s) / e)


def _linear_unit_m(crs) -> float:
    for axis in crs.axis_info:
        if axis.unit_conversion_factor:
            return float(axis.unit_conversion_factor)
    return 1.0


def cell_area_m2(y: Any, x: Any, crs: Any = _DEFAULT_CRS) -> np.ndarray:
    """True area (m², float64, shape (ny, nx)) of each cell of a regular grid of pixel centres.

    Parameters
    ----------
    y, x
        1-D pixel-centre coordinates (degrees latitude/longitude for a geographic CRS, CRS units otherwise).
    crs
        Anything ``pyproj.CRS.from_user_input`` accepts; default EPSG:4326 (WGS84).

    Geographic cells are clipped at the poles. Projected cells use the areal scale factor at the cell centre.
    """
    ya, xa = _coord(y, "y"), _coord(x, "x")
    crs = _crs(crs)
    if crs.is_geographic:
        a, e2 = _ellipsoid(crs)
        dy = abs(regular_step(ya, "y")) if ya.size > 1 else None
        dx = abs(regular_step(xa, "x")) if xa.size > 1 else None
        if dy is None or dx is None:
            raise GeometryError("Cannot infer the pixel size of a grid one pixel wide.", field="y/x",
                                fix="pass a grid with at least two pixels along each axis")
        if dx > 360.0 + 1e-9:
            raise GeometryError(f"Longitude spacing {dx}° exceeds 360°.", field="x", fix="check the x coordinate")
        lat_hi = np.clip(ya + dy / 2.0, -90.0, 90.0)
        lat_lo = np.clip(ya - dy / 2.0, -90.0, 90.0)
        row = np.radians(dx) * np.abs(_zone_area_per_radian(lat_hi, a, e2) - _zone_area_per_radian(lat_lo, a, e2))
        return np.broadcast_to(row[:, None], (ya.size, xa.size)).copy()
    if not crs.is_projected:
        raise GeometryError(f"CRS {crs.name!r} is neither geographic nor projected.", field="crs",
                            fix="use a geographic (EPSG:4326) or projected (e.g. UTM) CRS")
    import pyproj

    unit = _linear_unit_m(crs)
    dy = abs(regular_step(ya, "y")) * unit
    dx = abs(regular_step(xa, "x")) * unit
    xx, yy = np.meshgrid(xa, ya)
    to_geo = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
    lon, lat = to_geo.transform(xx, yy)
    factors = pyproj.Proj(crs).get_factors(lon, lat, errcheck=False)
    areal = np.asarray(factors.areal_scale, dtype=np.float64).reshape(xx.shape)
    return (dx * dy) / areal


def cell_area(obj: Any, crs: Any = None):
    """Cell areas (m²) of a gridded DataArray/Dataset as an ``xarray.DataArray`` (y, x) on its grid.

    The CRS is ``crs`` if given, else the object's rioxarray CRS, else EPSG:4326.
    """
    import xarray as xr

    if crs is None:
        try:
            crs = obj.rio.crs
        except Exception:  # rioxarray absent or no CRS written
            crs = None
    crs = crs if crs is not None else _DEFAULT_CRS
    area = cell_area_m2(obj["y"].values, obj["x"].values, crs)
    return xr.DataArray(area, dims=("y", "x"), coords={"y": obj["y"], "x": obj["x"]}, name="cell_area",
                        attrs={"units": "m2", "long_name": "true cell area on the ellipsoid"})


def grid_spacing_m(y: Any, x: Any, crs: Any = _DEFAULT_CRS) -> tuple[np.ndarray, np.ndarray]:
    """Ground size of the pixels per row: ``(dy_m, dx_m)``, each shape (ny,), metres, positive.

    Geographic grids: the meridian arc ρ·Δφ and the parallel arc N·cos φ·Δλ at each row centre on the ellipsoid.
    Projected grids: the nominal spacing in metres (CRS units converted; not corrected for scale factor).
    """
    ya, xa = _coord(y, "y"), _coord(x, "x")
    crs = _crs(crs)
    dy = abs(regular_step(ya, "y"))
    dx = abs(regular_step(xa, "x"))
    if crs.is_geographic:
        a, e2 = _ellipsoid(crs)
        phi = np.radians(ya)
        w = np.sqrt(1.0 - e2 * np.sin(phi) ** 2)
        rho = a * (1.0 - e2) / w**3  # meridian radius of curvature
        nu = a / w  # prime-vertical radius of curvature
        return rho * np.radians(dy), nu * np.cos(phi) * np.radians(dx)
    unit = _linear_unit_m(crs)
    return np.full(ya.size, dy * unit), np.full(ya.size, dx * unit)


def transform_from_coords(y: Any, x: Any):
    """``affine.Affine`` (GDAL/rasterio convention: outer corner of the first pixel) from pixel-centre coords."""
    from affine import Affine

    ya, xa = _coord(y, "y"), _coord(x, "x")
    dy = regular_step(ya, "y")
    dx = regular_step(xa, "x")
    return Affine(dx, 0.0, xa[0] - dx / 2.0, 0.0, dy, ya[0] - dy / 2.0)
