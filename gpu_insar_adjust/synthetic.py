"""The embedded North China Plain scenario: Sentinel-1-like frames, GNSS and a known truth.

:func:`make_scenario` writes, for a seed and a pixel size, what an InSAR user of the North China Plain (NCP)
actually has — LiCSAR/LiCSBAS frame folders (velocity, its sigma, the ground→satellite unit vector, heights, a
mask, optionally a LiCSBAS ``cum.h5`` time series) and GNSS velocity tables in ITRF2014 — together with the truth
they were made from (3-D velocity maps, annual rates, cumulative displacement, the planted error of every frame).
docs/scenario.md describes the scenario and every file.

Geography and truth are fixed (they describe the NCP): the DEM with the Taihang, Yan and Shandong hills, the
Bohai coast, thirteen subsidence funnels at their real places, a slow regional background, ITRF2014 Eurasia plate
motion plus smooth internal strain and inward motion around the funnels. The seed draws everything an observer
would not control: GNSS station positions, noise and unstable monuments, which stations are held out, the error
kind and parameters of every frame, decorrelation, noise and atmosphere.

Units: velocities mm/yr, displacements mm, heights m, distances km where a name says so. LOS is positive
toward the satellite: ``v_los = E*ve + N*vn + U*vu`` with (E, N, U) the ground→satellite unit vector.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError, OutputError

__all__ = [
    "AREA",
    "BOWLS",
    "CITIES",
    "ScenarioPaths",
    "make_scenario",
    "truth_velocity",
    "truth_height",
    "planted_error",
    "is_sea",
    "before_adjustment_rmse",
    "ERROR_KINDS",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Fixed geography
# --------------------------------------------------------------------------------------------------------------
#: White pixel noise of a 100 m (0.001°) velocity pixel, mm/yr, and that reference pixel size in degrees.
PIXEL_SIGMA_100M = 1.5
REFERENCE_PIXEL_DEG = 0.001

AREA = (113.5, 35.0, 119.5, 40.5)
"""(west, south, east, north) of the scenario, degrees (EPSG:4326)."""

_LON0, _LAT0 = 116.5, 37.75  # centre of the local azimuthal-equidistant plane used for distances (km)

CITIES: dict[str, tuple[float, float]] = {
    "Beijing": (116.40, 39.90), "Tianjin": (117.20, 39.13), "Shijiazhuang": (114.51, 38.04),
    "Baoding": (115.46, 38.87), "Cangzhou": (116.84, 38.30), "Hengshui": (115.67, 37.74),
    "Jinan": (117.00, 36.65), "Tangshan": (118.18, 39.63), "Dezhou": (116.36, 37.43),
    "Xingtai": (114.50, 37.07), "Handan": (114.49, 36.61), "Langfang": (116.70, 39.52),
    "Liaocheng": (115.98, 36.45), "Binzhou": (117.97, 37.38),
}
"""City centres (lon, lat) around which GNSS stations cluster."""

# Number of GNSS stations per city cluster out of the default 150 (the rest: 45 on the plain, 20 in the hills).
_CITY_WEIGHTS = {"Beijing": 14, "Tianjin": 10, "Shijiazhuang": 7, "Baoding": 5, "Cangzhou": 5, "Hengshui": 4,
                 "Jinan": 7, "Tangshan": 5, "Dezhou": 4, "Xingtai": 3, "Handan": 4, "Langfang": 4,
                 "Liaocheng": 3, "Binzhou": 3}
_N_PLAIN, _N_HILLS = 45, 20
_MIN_STATIONS_PER_FRAME = 14

BOWLS: tuple[dict, ...] = tuple(
    dict(name=n, lon=lo, lat=la, rate=r, sigma_major_km=a, sigma_minor_km=b, azimuth_deg=az, inward_fraction=f)
    for n, lo, la, r, a, b, az, f in (
        # name, lon, lat, peak vertical rate of the funnel (mm/yr, long-term), Gaussian sigmas along the major and
        # minor axes (km), azimuth of the major axis (deg clockwise from north), inward horizontal fraction
        ("Beijing-Chaoyang", 116.62, 39.95, -120.0, 14.0, 8.0, 40.0, 0.15),
        ("Tianjin-Wuqing", 117.05, 39.38, -75.0, 14.0, 9.0, 20.0, 0.12),
        ("Tianjin-Jinghai", 117.00, 38.95, -55.0, 18.0, 10.0, 60.0, 0.12),
        ("Langfang", 116.70, 39.56, -50.0, 12.0, 8.0, 110.0, 0.15),
        ("Cangzhou", 116.85, 38.28, -80.0, 22.0, 13.0, 30.0, 0.18),
        ("Hengshui", 115.70, 37.72, -65.0, 25.0, 14.0, 45.0, 0.15),
        ("Dezhou", 116.35, 37.45, -55.0, 18.0, 11.0, 120.0, 0.12),
        ("Baoding-Gaoyang", 115.60, 38.80, -45.0, 20.0, 12.0, 70.0, 0.10),
        ("Xingtai-Julu", 115.05, 37.25, -55.0, 24.0, 13.0, 20.0, 0.12),
        ("Liaocheng-Guanxian", 115.85, 36.50, -50.0, 18.0, 10.0, 150.0, 0.10),
        ("Binzhou", 117.95, 37.40, -40.0, 15.0, 10.0, 80.0, 0.10),
        ("Handan-Feixiang", 114.85, 36.55, -45.0, 14.0, 9.0, 30.0, 0.10),
        ("Tangshan", 118.15, 39.65, -35.0, 10.0, 7.0, 90.0, 0.20),
    )
)
_FLANK_POWER = 2.0
"""Subsidence funnels: real places, long-term (whole-period linear trend) peak rates in mm/yr."""

# Bohai sea inside (and just beyond) the area, lon/lat vertices of the coast, anticlockwise.
_SEA_POLYGON = np.array([
    (119.55, 39.78), (119.30, 39.55), (119.00, 39.20), (118.60, 39.02), (118.30, 39.08), (118.05, 39.18),
    (117.75, 39.05), (117.62, 38.75), (117.56, 38.45), (117.85, 38.27), (118.25, 38.12), (118.70, 37.95),
    (119.10, 37.85), (119.22, 37.62), (118.95, 37.30), (119.05, 37.14), (119.35, 37.10), (120.5, 37.10),
    (120.5, 40.2), (119.55, 40.2),
])

# Error kinds planted in frames (what the best correction model should be).
ERROR_KINDS = ("ramp", "quadratic", "cubic", "dem", "iono")

# Before-adjustment RMSE against GNSS reported for real NCP frames is 3.8-17.5 mm/yr; each frame's long-wavelength
# error is scaled (by a factor within _SCALE_RANGE) to a target drawn inside that range with margin.
_TARGET_RMSE = {"ramp": (4.8, 7.0), "quadratic": (5.5, 10.0), "cubic": (5.5, 10.0), "dem": (5.0, 8.0),
                "iono": (6.0, 11.0)}
_SCALE_RANGE = {"ramp": (0.5, 2.0), "quadratic": (0.5, 2.5), "cubic": (0.5, 2.5), "dem": (0.5, 1.6),
                "iono": (0.5, 2.0)}

# Sentinel-1 IW over the NCP.
_HEADING = {"A": -12.5, "D": -167.5}
_SWATH_KM, _TRACK_SPACING_KM = 250.0, 185.0  # adjacent tracks overlap 65 km
_FRAME_KM, _FRAME_SPACING_KM = 250.0, 230.0  # frames along a track overlap 20 km
_INCIDENCE_NEAR, _INCIDENCE_FAR = 30.5, 46.0
_TRACKS = {"A": (("040", 10.0), ("142", 10.0 + _TRACK_SPACING_KM), ("069", 10.0 - _TRACK_SPACING_KM)),
           "D": (("047", -20.0), ("149", -20.0 + _TRACK_SPACING_KM), ("076", -20.0 - _TRACK_SPACING_KM))}
_ALONG_OFFSET_KM = {"A": 15.0, "D": -10.0}

# Time series: per-calendar-year multipliers of the funnels' rate (peak 2018, easing after 2021 with the
# South-to-North Water Diversion and pumping limits), normalised so that the whole-period linear trend of the
# funnels equals their long-term rate.
_YEAR_MULTIPLIER = {2014: 0.85, 2015: 0.90, 2016: 0.97, 2017: 1.05, 2018: 1.12, 2019: 1.06, 2020: 0.98,
                    2021: 0.78, 2022: 0.62}
_TS_START, _TS_END = _dt.date(2014, 10, 11), _dt.date(2022, 12, 31)
_CUBE_CACHE_BYTES = 512 * 2**20  # per-epoch noise of one frame held in memory below this size
_SUBSIDENCE_THRESHOLD = -20.0  # mm/yr: "sinking faster than 20 mm/yr"

# Random-stream identifiers (independent of generation order).
_S_STATIONS, _S_FRAME, _S_EPOCH, _S_GEO = 1, 2, 3, 4
_GEOGRAPHY_SEED = 20260115  # the DEM roughness and background pattern are part of the fixed geography


# --------------------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScenarioPaths:
    """Everything :func:`make_scenario` wrote (all paths absolute)."""

    out_dir: Path
    frames_dir: Path
    frame_dirs: tuple[Path, ...]
    gnss_csv: Path
    holdout_csv: Path
    truth_dir: Path
    truth_vertical: Path
    truth_east: Path
    truth_north: Path
    truth_height: Path
    truth_gnss_csv: Path
    scenario_json: Path
    cubes: tuple[Path, ...] = ()
    truth_timeseries: Path | None = None
    truth_holdout_displacement: Path | None = None

    @property
    def frame_ids(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.frame_dirs)


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------
def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softplus(z):
    return np.logaddexp(0.0, z)


@dataclasses.dataclass(frozen=True)
class _Modes:
    """A sum of plane waves: a smooth random field that can be evaluated anywhere (x, y in km)."""

    kx: np.ndarray
    ky: np.ndarray
    phase: np.ndarray
    amp: np.ndarray

    @classmethod
    def draw(cls, rng, n, wavelength_km, sigma, slope=1.0):
        lam = np.exp(rng.uniform(np.log(wavelength_km[0]), np.log(wavelength_km[1]), n))
        theta = rng.uniform(0.0, np.pi, n)
        w = lam ** slope
        amp = sigma * np.sqrt(2.0) * w / np.sqrt(np.sum(w ** 2))  # std of the sum = sigma
        return cls(2 * np.pi * np.sin(theta) / lam, 2 * np.pi * np.cos(theta) / lam, rng.uniform(0, 2 * np.pi, n),
                   amp)

    def __call__(self, x, y):
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)))
        for kx, ky, ph, a in zip(self.kx, self.ky, self.phase, self.amp):
            out += a * np.cos(kx * x + ky * y + ph)
        return out

    def to_json(self):
        """Plane waves a·cos(k·(x, y) + phase), k = 2π/wavelength·(sin azimuth, cos azimuth), x/y in km."""
        return {"wavelength_km": (2 * np.pi / np.hypot(self.kx, self.ky)).tolist(),
                "azimuth_deg": np.degrees(np.arctan2(self.kx, self.ky)).tolist(),
                "phase_rad": self.phase.tolist(), "amplitude": self.amp.tolist()}

    @classmethod
    def from_json(cls, d):
        lam, az = np.asarray(d["wavelength_km"], float), np.radians(np.asarray(d["azimuth_deg"], float))
        return cls(2 * np.pi * np.sin(az) / lam, 2 * np.pi * np.cos(az) / lam, np.asarray(d["phase_rad"], float),
                   np.asarray(d["amplitude"], float))


_TRANSFORMER = None


def _to_km(lon, lat):
    """lon/lat (deg) → x, y (km) on a local azimuthal-equidistant plane centred on the NCP."""
    global _TRANSFORMER
    if _TRANSFORMER is None:
        import pyproj

        _TRANSFORMER = pyproj.Transformer.from_crs(
            "EPSG:4326", f"+proj=aeqd +lat_0={_LAT0} +lon_0={_LON0} +datum=WGS84 +units=km", always_xy=True)
    x, y = _TRANSFORMER.transform(np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64))
    return np.asarray(x), np.asarray(y)


def _to_lonlat(x, y):
    _to_km(0.0, 0.0)  # build the transformer
    lon, lat = _TRANSFORMER.transform(np.asarray(x, float), np.asarray(y, float), direction="INVERSE")
    return np.asarray(lon), np.asarray(lat)


# --------------------------------------------------------------------------------------------------------------
# Fixed geography and truth, analytic: evaluable at any lon/lat (frames, the truth grid and stations agree)
# --------------------------------------------------------------------------------------------------------------
_geo_rng = np.random.default_rng([_GEOGRAPHY_SEED, _S_GEO])
_ROUGHNESS = _Modes.draw(_geo_rng, 48, (6.0, 90.0), 1.0, slope=1.0)
_BACKGROUND = _Modes.draw(_geo_rng, 4, (220.0, 450.0), 1.0, slope=0.0)
_STRAIN = _Modes.draw(_geo_rng, 3, (300.0, 600.0), 1.0, slope=0.0), _Modes.draw(_geo_rng, 3, (300.0, 600.0), 1.0,
                                                                                    slope=0.0)


def is_sea(lon, lat) -> np.ndarray:
    """True over the Bohai sea (no data in any product)."""
    from matplotlib.path import Path as _MplPath

    lon, lat = np.broadcast_arrays(np.asarray(lon, float), np.asarray(lat, float))
    pts = np.column_stack([lon.ravel(), lat.ravel()])
    return _MplPath(_SEA_POLYGON).contains_points(pts).reshape(lon.shape)


def _mountain_parts(lon, lat, x=None, y=None):
    if x is None:
        x, y = _to_km(lon, lat)
    km_per_deg = 111.32
    front_lon = np.interp(lat, [35.0, 36.0, 37.0, 38.0, 39.0, 39.7, 40.5],
                          [113.9, 114.1, 114.3, 114.35, 115.0, 115.7, 116.0])
    d_taihang = (front_lon - lon) * km_per_deg * np.cos(np.radians(lat))  # km inside the Taihang front
    front_lat = np.interp(lon, [113.5, 115.5, 116.4, 117.5, 118.5, 119.5], [40.0, 39.9, 40.25, 40.1, 39.95, 40.05])
    d_yan = (lat - front_lat) * km_per_deg  # km inside the Yan front
    # Shandong (Taishan) hills south-east of Jinan: an elliptical massif.
    cx, cy = _to_km(117.45, 36.05)
    az = np.radians(70.0)
    u = ((x - cx) * np.sin(az) + (y - cy) * np.cos(az)) / 95.0
    v = ((x - cx) * np.cos(az) - (y - cy) * np.sin(az)) / 42.0
    q = np.hypot(u, v)
    rough = _ROUGHNESS(x, y)
    h_t = 1700.0 * _sigmoid(d_taihang / 4.0) * (0.35 + 0.65 * (1.0 - np.exp(-_softplus(d_taihang) / 25.0)))
    h_y = 1400.0 * _sigmoid(d_yan / 4.0) * (0.35 + 0.65 * (1.0 - np.exp(-_softplus(d_yan) / 20.0)))
    h_s = 850.0 * _sigmoid((1.0 - q) / 0.12) * np.clip(1.1 - 0.7 * q, 0.3, 1.0)
    weight = np.maximum.reduce([_sigmoid(d_taihang / 4.0), _sigmoid(d_yan / 4.0), _sigmoid((1.0 - q) / 0.12)])
    h_mtn = (h_t + h_y + h_s) * (1.0 + 0.25 * rough)
    return h_mtn, weight, rough


def _land_height(lon, lat, h_mtn, rough):
    d_coast = np.hypot(lon - 118.3, lat - 38.7)  # degrees from the Bohai Bay shore
    h_plain = np.clip(2.0 + 20.0 * d_coast + 1.5 * rough, 0.5, 100.0)
    return h_plain + h_mtn


def truth_height(lon, lat) -> np.ndarray:
    """Terrain height (m) of the scenario: 0-100 m plain sloping to the Bohai, Taihang/Yan/Shandong hills.

    0 over the sea (as in LiCSAR ``hgt`` files).
    """
    lon, lat = np.broadcast_arrays(np.asarray(lon, float), np.asarray(lat, float))
    h_mtn, _, rough = _mountain_parts(lon, lat)
    return np.where(is_sea(lon, lat), 0.0, _land_height(lon, lat, h_mtn, rough))


def _bowl_fields(x, y):
    """Long-term funnel velocity (up) and inward horizontal velocity (east, north), mm/yr."""
    up = np.zeros(np.shape(x))
    east = np.zeros(np.shape(x))
    north = np.zeros(np.shape(x))
    for b in BOWLS:
        cx, cy = _to_km(b["lon"], b["lat"])
        dx, dy = x - cx, y - cy
        az = np.radians(b["azimuth_deg"])
        u = (dx * np.sin(az) + dy * np.cos(az)) / b["sigma_major_km"]
        v = (dx * np.cos(az) - dy * np.sin(az)) / b["sigma_minor_km"]
        q2 = u * u + v * v
        # Gaussian near the centre with heavier (Student-t like) flanks: real funnels have small cores and wide,
        # moderately sinking margins
        g = (1.0 + q2 / (2.0 * _FLANK_POWER)) ** (-_FLANK_POWER)
        up += b["rate"] * g
        r = np.hypot(dx, dy)
        # inward horizontal motion (toward the centre), a fraction of the local sinking rate, 0 at the centre
        taper = 1.0 - np.exp(-(r / (0.5 * b["sigma_minor_km"])) ** 2)
        mag = b["inward_fraction"] * abs(b["rate"]) * g * taper
        with np.errstate(invalid="ignore", divide="ignore"):
            east += np.where(r > 0, -mag * dx / np.where(r > 0, r, 1.0), 0.0)
            north += np.where(r > 0, -mag * dy / np.where(r > 0, r, 1.0), 0.0)
    return up, east, north


_PLATE = None


def _plate_interpolator():
    """ITRF2014 Eurasia plate motion (PROJ model) on a coarse grid, interpolated: it is smooth to <0.001 mm/yr."""
    global _PLATE
    if _PLATE is None:
        from scipy.interpolate import RegularGridInterpolator

        from .geodesy.plates import plate_velocity_enu

        glon = np.arange(AREA[0] - 1.0, AREA[2] + 1.0001, 0.25)
        glat = np.arange(AREA[1] - 1.0, AREA[3] + 1.0001, 0.25)
        LON, LAT = np.meshgrid(glon, glat)
        ve, vn, vu = plate_velocity_enu(LON, LAT, 0.0, plate="EURA", model="ITRF2014")
        _PLATE = tuple(RegularGridInterpolator((glat, glon), np.asarray(c, float), method="linear")
                       for c in (ve, vn, vu))
    return _PLATE


def _truth_parts(lon, lat):
    """Static (linear in time) and funnel (time-varying) parts of the 3-D velocity, each (e, n, u) mm/yr."""
    lon, lat = np.broadcast_arrays(np.asarray(lon, float), np.asarray(lat, float))
    x, y = _to_km(lon, lat)
    _, mweight, _ = _mountain_parts(lon, lat, x, y)
    pts = np.stack([lat.ravel(), lon.ravel()], axis=-1)
    pe, pn, pu = (f(pts).reshape(lon.shape) for f in _plate_interpolator())
    # smooth internal strain of a few mm/yr (ITRF minus rigid plate)
    se = 0.9 * _STRAIN[0](x, y) + 0.004 * x - 0.002 * y
    sn = 0.9 * _STRAIN[1](x, y) - 0.003 * x + 0.002 * y
    # slow regional sinking over the plain (-2 to -8 mm/yr), none in the hills
    background = -(5.0 + 3.0 * np.clip(_BACKGROUND(x, y) / 1.2, -1.0, 1.0)) * (1.0 - mweight)
    bu, be, bn = _bowl_fields(x, y)
    return (pe + se, pn + sn, pu + background), (be, bn, bu)


def truth_velocity(lon, lat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True long-term 3-D velocity (ve, vn, vu) in ITRF2014, mm/yr, at any lon/lat (NaN over the sea)."""
    (se, sn, su), (be, bn, bu) = _truth_parts(lon, lat)
    sea = is_sea(*np.broadcast_arrays(np.asarray(lon, float), np.asarray(lat, float)))
    return tuple(np.where(sea, np.nan, s + b) for s, b in ((se, be), (sn, bn), (su, bu)))


# Analytic fields are evaluated directly down to this pixel size; finer grids interpolate them bilinearly from a
# grid of this spacing (errors < 0.1 mm/yr in the sharpest funnel core, < 1 m in height), which keeps the 100 m
# case to a couple of minutes.
_ANALYTIC_STEP = 0.005


def _bilinear(field, ny_c, nx_c, y, x):
    """Bilinear interpolation of ``field`` given on ascending 1-D node axes (ny_c, nx_c) at the grid (y, x)."""
    iy = np.clip(np.searchsorted(ny_c, y, side="right") - 1, 0, ny_c.size - 2)
    ix = np.clip(np.searchsorted(nx_c, x, side="right") - 1, 0, nx_c.size - 2)
    wy = ((y - ny_c[iy]) / (ny_c[iy + 1] - ny_c[iy]))[:, None]
    wx = ((x - nx_c[ix]) / (nx_c[ix + 1] - nx_c[ix]))[None, :]
    top = field[np.ix_(iy, ix)] * (1 - wx) + field[np.ix_(iy, ix + 1)] * wx
    bottom = field[np.ix_(iy + 1, ix)] * (1 - wx) + field[np.ix_(iy + 1, ix + 1)] * wx
    return top * (1 - wy) + bottom * wy


def _smooth_fields(func, lon1d, lat1d, resolution, out_dtype=np.float64):
    """Evaluate ``func(LON, LAT) -> tuple of 2-D arrays`` on the pixel-centre grid (lat1d descending).

    Exact (direct evaluation) when ``resolution >= _ANALYTIC_STEP``; else from a node grid of that spacing,
    interpolated bilinearly in row blocks (memory stays a few arrays of the output size).
    """
    if resolution >= _ANALYTIC_STEP - 1e-12:
        LON, LAT = np.meshgrid(lon1d, lat1d)
        return tuple(np.asarray(f, out_dtype) for f in func(LON, LAT))
    step = _ANALYTIC_STEP
    clon = np.arange(lon1d.min() - step, lon1d.max() + 2 * step, step)
    clat = np.arange(lat1d.min() - step, lat1d.max() + 2 * step, step)
    coarse = func(*np.meshgrid(clon, clat))
    out = tuple(np.empty((lat1d.size, lon1d.size), out_dtype) for _ in coarse)
    block = max(1, 2_000_000 // lon1d.size)
    for r0 in range(0, lat1d.size, block):
        r1 = min(lat1d.size, r0 + block)
        for o, c in zip(out, coarse):
            o[r0:r1] = _bilinear(c, clat, clon, lat1d[r0:r1], lon1d)
    return out


def _sea_grid(lon1d, lat1d, resolution):
    """Sea mask of a regular lon/lat pixel grid (pixel centre inside the coast polygon, as :func:`is_sea`)."""
    from affine import Affine
    from rasterio.features import rasterize

    transform = Affine(resolution, 0.0, lon1d[0] - resolution / 2, 0.0, -resolution, lat1d[0] + resolution / 2)
    poly = {"type": "Polygon", "coordinates": [[*map(list, _SEA_POLYGON), list(_SEA_POLYGON[0])]]}
    return rasterize([(poly, 1)], out_shape=(lat1d.size, lon1d.size), transform=transform, fill=0,
                     all_touched=False, dtype="uint8").astype(bool)


def _truth_grid(glon, glat, resolution, *, parts=False):
    """Truth on the scenario grid, float32: ve, vn, vu (NaN over sea), height (0 over sea); with ``parts`` also
    the static (se, sn, su) and funnel (be, bn, bu) components the time model needs."""
    def func(LON, LAT):
        (se, sn, su), (be, bn, bu) = _truth_parts(LON, LAT)
        h_mtn, _, rough = _mountain_parts(LON, LAT)
        return se, sn, su, be, bn, bu, _land_height(LON, LAT, h_mtn, rough)

    names = ("se", "sn", "su", "be", "bn", "bu", "height")
    fields = dict(zip(names, _smooth_fields(func, glon, glat, resolution, np.float32)))
    sea = _sea_grid(glon, glat, resolution)
    out = {"ve": fields["se"] + fields["be"], "vn": fields["sn"] + fields["bn"],
           "vu": fields["su"] + fields["bu"], "height": np.where(sea, np.float32(0.0), fields["height"])}
    for k in ("ve", "vn", "vu"):
        out[k][sea] = np.nan
    if parts:
        for k in names[:6]:
            out[k] = np.where(sea, np.float32(np.nan), fields[k])
    return out


# --------------------------------------------------------------------------------------------------------------
# Time model
# --------------------------------------------------------------------------------------------------------------
def _epoch_dates(epoch_days: int) -> list[_dt.date]:
    out, d = [], _TS_START
    while d <= _TS_END:
        out.append(d)
        d += _dt.timedelta(days=epoch_days)
    return out


def _years_since_start(d: _dt.date) -> float:
    return (d - _TS_START).days / 365.25


def _raw_funnel_history(t_years: np.ndarray) -> np.ndarray:
    """∫ multiplier dt from the first epoch (years × multiplier), piecewise linear with calendar-year rates."""
    t_years = np.asarray(t_years, float)
    out = np.zeros_like(t_years)
    for year, m in _YEAR_MULTIPLIER.items():
        a = max(_years_since_start(_dt.date(year, 1, 1)), 0.0)
        b = _years_since_start(_dt.date(year + 1, 1, 1))
        out += m * np.clip(t_years - a, 0.0, b - a)
    return out


@dataclasses.dataclass(frozen=True)
class _TimeModel:
    dates: list
    t: np.ndarray          # years since the first epoch
    scale: float           # funnel displacement(t) = funnel_rate * history(t) / scale

    @classmethod
    def build(cls, epoch_days):
        dates = _epoch_dates(epoch_days)
        t = np.array([_years_since_start(d) for d in dates])
        h = _raw_funnel_history(t)
        tc = t - t.mean()
        # LS slope of the history: dividing by it makes the funnels' linear trend their long-term rate
        scale = float(np.sum(tc * h) / np.sum(tc * tc))
        return cls(dates, t, scale)

    def history(self, t_years):
        return _raw_funnel_history(t_years) / self.scale

    def annual_factor(self, year):
        return _YEAR_MULTIPLIER[year] / self.scale


# --------------------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _FrameGeometry:
    frame_id: str
    orbit: str            # "A" or "D"
    heading: float
    range_centre_km: float
    along_centre_km: float
    row0: int
    col0: int
    nrows: int
    ncols: int


def _rotated(x, y, heading):
    h = np.radians(heading)
    along = x * np.sin(h) + y * np.cos(h)
    rng_ = x * np.cos(h) - y * np.sin(h)  # increases in the look direction (right of the flight direction)
    return along, rng_


def _unrotated(along, rng_, heading):
    h = np.radians(heading)
    return along * np.sin(h) + rng_ * np.cos(h), along * np.cos(h) - rng_ * np.sin(h)


def _grid_shape(resolution):
    nx = int(math.ceil((AREA[2] - AREA[0]) / resolution - 1e-6))
    ny = int(math.ceil((AREA[3] - AREA[1]) / resolution - 1e-6))
    return ny, nx


def _frame_layout(resolution) -> list[_FrameGeometry]:
    ny, nx = _grid_shape(resolution)
    frames = []
    for orbit in ("A", "D"):
        heading = _HEADING[orbit]
        for track, rc in sorted(_TRACKS[orbit], key=lambda t: t[1]):
            for j, ac in enumerate((-_FRAME_SPACING_KM, 0.0, _FRAME_SPACING_KM)):
                ac = ac + _ALONG_OFFSET_KM[orbit]
                # densified footprint outline → lon/lat → bounding box (clipped to the area)
                s = np.linspace(-0.5, 0.5, 101)
                one = np.ones_like(s)
                a = np.concatenate([s, one * 0.5, -s, -one * 0.5]) * _FRAME_KM + ac
                r = np.concatenate([-one * 0.5, s, one * 0.5, -s]) * _SWATH_KM + rc
                lon, lat = _to_lonlat(*_unrotated(a, r, heading))
                w, e = max(lon.min(), AREA[0]), min(lon.max(), AREA[2])
                so, no = max(lat.min(), AREA[1]), min(lat.max(), AREA[3])
                if e - w < 0.5 or no - so < 0.5:
                    continue
                col0 = max(int(math.floor((w - AREA[0]) / resolution)), 0)
                col1 = min(int(math.ceil((e - AREA[0]) / resolution)), nx)
                row0 = max(int(math.floor((AREA[3] - no) / resolution)), 0)
                row1 = min(int(math.ceil((AREA[3] - so) / resolution)), ny)
                # burst id grows along the flight direction, as LiCSAR's do
                burst = (4820 if orbit == "A" else 4890) + 180 * j
                frames.append(_FrameGeometry(f"{track}{orbit}_{burst:05d}_131313", orbit, heading, rc, ac,
                                             row0, col0, row1 - row0, col1 - col0))
    return frames


def _in_footprint(g: _FrameGeometry, lon, lat):
    """True where lon/lat lies inside the frame's swath (whether or not inside the scenario area)."""
    if np.size(lon) == 0:
        return np.zeros(np.shape(lon), bool)
    along, rng_km = _rotated(*_to_km(lon, lat), g.heading)
    return ((np.abs(rng_km - g.range_centre_km) <= 0.5 * _SWATH_KM)
            & (np.abs(along - g.along_centre_km) <= 0.5 * _FRAME_KM))


def _frame_coords(g: _FrameGeometry, resolution):
    lon = AREA[0] + (g.col0 + 0.5 + np.arange(g.ncols)) * resolution
    lat = AREA[3] - (g.row0 + 0.5 + np.arange(g.nrows)) * resolution
    return lon, lat


def _gaussian_noise_field(rng, shape, corr_km, resolution, lat_mid):
    """Unit-variance spatially correlated noise with a Gaussian kernel of ``corr_km`` (km).

    Long kernels are filtered on a grid decimated by up to sigma/2 pixels and interpolated back (bilinear), which
    leaves the field's spectrum unchanged where it has power and keeps per-epoch fields cheap.
    """
    from scipy.ndimage import gaussian_filter, zoom

    sy = corr_km / (resolution * 111.32)
    sx = corr_km / (resolution * 111.32 * math.cos(math.radians(lat_mid)))
    f = max(1, int(min(sy, sx) // 2))
    if f > 1:
        coarse = (-(-shape[0] // f) + 1, -(-shape[1] // f) + 1)
        field = gaussian_filter(rng.standard_normal(coarse), (sy / f, sx / f), mode="reflect", truncate=3.0)
        field = zoom(field, f, order=1, grid_mode=False)[:shape[0], :shape[1]]
    else:
        field = gaussian_filter(rng.standard_normal(shape), (sy, sx), mode="reflect", truncate=3.0)
    sd = field.std()
    return field / sd if sd > 0 else field


def _draw_frame_errors(rng, kind):
    """Nominal parameters of the planted long-wavelength error, before scaling to the frame's target RMSE."""
    p = {"offset": float(rng.choice([-1, 1]) * rng.uniform(10.0, 40.0))}
    if kind != "iono":
        amp, th = rng.uniform(*((6.0, 10.0) if kind == "ramp" else (3.0, 8.0))), rng.uniform(0, 2 * np.pi)
        p["plane"] = [float(amp * np.cos(th)), float(amp * np.sin(th))]  # mm/yr at the frame edge along (ξ, η)
    if kind in ("quadratic", "cubic"):
        c = rng.standard_normal(3)
        p["quadratic"] = (rng.uniform(6.0, 12.0) * c / np.abs(c).sum()).tolist()  # ξ², ξη, η²
    if kind == "cubic":
        c = rng.standard_normal(4)
        p["cubic"] = (rng.uniform(6.0, 12.0) * c / np.abs(c).sum()).tolist()  # ξ³, ξ²η, ξη², η³
    if kind == "dem":
        p["dem_mm_per_yr_per_km"] = float(rng.choice([-1, 1]) * rng.uniform(3.0, 6.0))
    if kind == "iono":
        p["iono"] = _Modes.draw(rng, 10, (50.0, 150.0), 6.0, slope=0.0)
    return p


def _long_wavelength_error(p, xi, eta, height, x, y, h_ref):
    """The scalable part of the planted error (everything except the offset), mm/yr."""
    e = np.zeros(np.shape(xi))
    if "plane" in p:
        e += p["plane"][0] * xi + p["plane"][1] * eta
    if "quadratic" in p:
        q = p["quadratic"]
        e += q[0] * xi * xi + q[1] * xi * eta + q[2] * eta * eta
    if "cubic" in p:
        c = p["cubic"]
        e += c[0] * xi ** 3 + c[1] * xi * xi * eta + c[2] * xi * eta * eta + c[3] * eta ** 3
    if "dem_mm_per_yr_per_km" in p:
        e += p["dem_mm_per_yr_per_km"] * (height - h_ref) / 1000.0
    if "iono" in p:
        e += p["iono"](x, y)
    return e


def _scaled_params(p, s):
    out = {"offset": p["offset"], "scale": s}
    if "plane" in p:
        out["plane"] = [v * s for v in p["plane"]]
    if "quadratic" in p:
        out["quadratic"] = [v * s for v in p["quadratic"]]
    if "cubic" in p:
        out["cubic"] = [v * s for v in p["cubic"]]
    if "dem_mm_per_yr_per_km" in p:
        out["dem_mm_per_yr_per_km"] = p["dem_mm_per_yr_per_km"] * s
    if "iono" in p:
        m = p["iono"]
        out["iono"] = _Modes(m.kx, m.ky, m.phase, m.amp * s)
    return out


def _params_to_json(p):
    out = {}
    for k, v in p.items():
        out[k] = v.to_json() if isinstance(v, _Modes) else v
    return out


def planted_error(frame_record: dict, lon, lat, height) -> np.ndarray:
    """The long-wavelength error planted in a frame (mm/yr, LOS), rebuilt from its ``scenario.json`` record.

    ``frame_record`` is ``json.load(...)["frames"][frame_id]``; ``lon``, ``lat`` in degrees, ``height`` in m (the
    frame's ``hgt.geo.tif``). ``vel.geo.tif - planted_error - LOS(truth 3-D velocity)`` leaves only the pixel
    noise, the residual troposphere and the masked unreliable pixels: what a perfect correction would leave.
    """
    lon, lat, height = np.broadcast_arrays(np.asarray(lon, float), np.asarray(lat, float),
                                           np.asarray(height, float))
    x, y = _to_km(lon, lat)
    along, rng_km = _rotated(x, y, float(frame_record["heading_deg"]))
    xi = (rng_km - frame_record["range_centre_km"]) / (0.5 * _SWATH_KM)
    eta = (along - frame_record["along_centre_km"]) / (0.5 * _FRAME_KM)
    p = dict(frame_record["error_parameters"])
    if "iono" in p:
        p["iono"] = _Modes.from_json(p["iono"])
    return p["offset"] + _long_wavelength_error(p, xi, eta, height, x, y, frame_record["dem_reference_height_m"])


def before_adjustment_rmse(vel, mask, e, n, u, rows, cols, ve, vn, vu):
    """RMS of InSAR LOS at station pixels minus GNSS LOS after removing the frame's median difference (mm/yr).

    ``rows``/``cols`` are the stations' pixel indices in the frame; ``ve, vn, vu`` their GNSS velocities in the
    frame's reference (ITRF). Pixels that are NaN or masked (``mask != 1``) are skipped. Returns (rmse, n_used);
    rmse is NaN with fewer than 5 usable stations.
    """
    rows, cols = np.asarray(rows, int), np.asarray(cols, int)
    v = np.asarray(vel, float)[rows, cols]
    ok = np.isfinite(v) & (np.asarray(mask)[rows, cols] == 1)
    gl = (np.asarray(e, float)[rows, cols] * ve + np.asarray(n, float)[rows, cols] * vn
          + np.asarray(u, float)[rows, cols] * vu)
    d = (v - gl)[ok]
    if d.size < 5:
        return float("nan"), int(d.size)
    d = d - np.median(d)
    return float(np.sqrt(np.mean(d * d))), int(d.size)


# --------------------------------------------------------------------------------------------------------------
# GNSS
# --------------------------------------------------------------------------------------------------------------
def _station_name(rng, lon, lat, taken):
    if math.hypot(lon - 116.40, lat - 39.90) < 0.7:
        prefix = "BJ"
    elif math.hypot(lon - 117.30, lat - 39.10) < 0.5:
        prefix = "TJ"
    elif lat < 36.3 and lon < 115.5:
        prefix = "HA"
    elif lon < 114.0 and lat > 36.0:
        prefix = "SX"
    elif lat < 38.0 and (lon > 115.9 or lat < 36.8):
        prefix = "SD"
    else:
        prefix = "HB"
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    while True:
        name = prefix + "".join(rng.choice(list(letters), 2))
        if name not in taken:
            taken.add(name)
            return name


def _draw_stations(seed, n_stations, holdout_fraction, layout):
    import pandas as pd

    rng = np.random.default_rng([seed, _S_STATIONS])
    factor = n_stations / (sum(_CITY_WEIGHTS.values()) + _N_PLAIN + _N_HILLS)
    counts = {c: int(round(w * factor)) for c, w in _CITY_WEIGHTS.items()}
    n_hills = int(round(_N_HILLS * factor))
    n_plain = max(n_stations - sum(counts.values()) - n_hills, 0)
    lon_l, lat_l = [], []

    def accept(lo, la, want):
        if not (AREA[0] + 0.03 < lo < AREA[2] - 0.03 and AREA[1] + 0.03 < la < AREA[3] - 0.03):
            return False
        if is_sea(lo, la):
            return False
        h = float(truth_height(lo, la))
        return want == "any" or (want == "plain" and h < 110) or (want == "hills" and h > 300)

    for city, k in counts.items():
        clon, clat = CITIES[city]
        got = 0
        while got < k:
            lo, la = clon + 0.14 * rng.standard_normal(), clat + 0.11 * rng.standard_normal()
            if accept(lo, la, "any"):
                lon_l.append(lo), lat_l.append(la)
                got += 1
    # every frame sees at least `k_min` stations (frames at the corners of the area would otherwise see a handful)
    k_min = max(6, int(round(_MIN_STATIONS_PER_FRAME * factor)))
    budget = n_plain + n_hills
    def cells_of(lo, la):
        return set(zip(np.floor(np.asarray(lo) / 0.5).astype(int).tolist(),
                       np.floor(np.asarray(la) / 0.5).astype(int).tolist()))

    for g in layout:
        # at least k_min stations, spread over at least k_min/2 cells of 0.5° (not one city cluster)
        inside = _in_footprint(g, np.array(lon_l), np.array(lat_l))
        count = int(np.sum(inside))
        cells = cells_of(np.array(lon_l)[inside], np.array(lat_l)[inside]) if count else set()
        tries = 0
        while (count < k_min or len(cells) < k_min // 2) and budget > 0 and tries < 20000:
            tries += 1
            a = g.along_centre_km + _FRAME_KM * rng.uniform(-0.5, 0.5)
            r = g.range_centre_km + _SWATH_KM * rng.uniform(-0.5, 0.5)
            lo, la = (float(c) for c in _to_lonlat(*_unrotated(a, r, g.heading)))
            new_cell = cells_of([lo], [la]) - cells
            if (new_cell or len(cells) >= k_min // 2) and accept(lo, la, "any"):
                lon_l.append(lo), lat_l.append(la)
                count += 1
                cells |= new_cell
                budget -= 1
                if float(truth_height(lo, la)) > 300 and n_hills > 0:
                    n_hills -= 1
                elif n_plain > 0:
                    n_plain -= 1
                else:
                    n_hills -= 1
    # scattered stations: one per 0.75° cell of land first (so that every frame sees GNSS), then at random
    cells = [(w, s_) for w in np.arange(AREA[0], AREA[2], 0.75) for s_ in np.arange(AREA[1], AREA[3], 0.75)]
    want_list = ["plain"] * n_plain + ["hills"] * n_hills
    want_list = [want_list[i] for i in rng.permutation(len(want_list))]
    cell_order = rng.permutation(len(cells)).tolist()
    for want in want_list:
        placed = False
        while cell_order and not placed:
            w, s_ = cells[cell_order.pop()]
            for _ in range(30):
                lo, la = rng.uniform(w, w + 0.75), rng.uniform(s_, s_ + 0.75)
                if accept(lo, la, "any"):
                    lon_l.append(lo), lat_l.append(la)
                    placed = True
                    break
        while not placed:
            lo, la = rng.uniform(AREA[0], AREA[2]), rng.uniform(AREA[1], AREA[3])
            if accept(lo, la, want):
                lon_l.append(lo), lat_l.append(la)
                placed = True
    lon = np.round(np.array(lon_l), 5)
    lat = np.round(np.array(lat_l), 5)
    taken: set[str] = set()
    names = [_station_name(rng, lo, la, taken) for lo, la in zip(lon, lat)]
    ve, vn, vu = truth_velocity(lon, lat)
    se = np.round(0.4 * rng.uniform(0.7, 1.5, lon.size), 2)
    sn = np.round(0.4 * rng.uniform(0.7, 1.5, lon.size), 2)
    su = np.round(1.2 * rng.uniform(0.7, 1.5, lon.size), 2)
    obs_e = ve + se * rng.standard_normal(lon.size)
    obs_n = vn + sn * rng.standard_normal(lon.size)
    obs_u = vu + su * rng.standard_normal(lon.size)
    n_hold = int(round(holdout_fraction * lon.size))
    holdout = np.zeros(lon.size, bool)
    holdout[rng.choice(lon.size, n_hold, replace=False)] = True
    # unstable monuments (local settlement of the pillar/building): only among training stations
    n_unstable = int(rng.integers(3, 6))
    train_idx = np.flatnonzero(~holdout)
    unstable_idx = rng.choice(train_idx, min(n_unstable, train_idx.size), replace=False)
    bias = np.zeros(lon.size)
    bias[unstable_idx] = rng.uniform(8.0, 15.0, unstable_idx.size) * np.where(
        rng.uniform(size=unstable_idx.size) < 0.7, -1.0, 1.0)
    obs_u = obs_u + bias
    df = pd.DataFrame({"station": names, "lon": lon, "lat": lat,
                       "height": np.round(truth_height(lon, lat), 1),
                       "ve_true": ve, "vn_true": vn, "vu_true": vu,
                       "ve": np.round(obs_e, 2), "vn": np.round(obs_n, 2), "vu": np.round(obs_u, 2),
                       "se": se, "sn": sn, "su": su, "holdout": holdout, "unstable_bias_vu": np.round(bias, 2)})
    return df


# --------------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------------
def _replace_atomic(tmp: Path, final: Path):
    os.replace(tmp, final)


def _write_tif(path: Path, array, west, north, resolution):
    import rasterio
    from affine import Affine

    a = np.asarray(array, dtype=np.float32)
    tmp = path.with_name(path.name + ".part")
    profile = dict(driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype="float32",
                   crs="EPSG:4326", transform=Affine(resolution, 0.0, west, 0.0, -resolution, north),
                   nodata=np.nan,
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate", zlevel=1)
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(a, 1)
    _replace_atomic(tmp, path)


def _write_csv(path: Path, df):
    tmp = path.with_name(path.name + ".part")
    df.to_csv(tmp, index=False)
    _replace_atomic(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Main entry
# --------------------------------------------------------------------------------------------------------------
def _check_args(seed, resolution, n_stations, holdout_fraction, epoch_days):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.", field="seed",
                          fix="pass an integer such as --seed 0")
    if not (isinstance(resolution, (int, float)) and 0.0005 <= float(resolution) <= 0.1):
        raise ConfigError(f"resolution must be between 0.0005 and 0.1 degrees, got {resolution!r}.",
                          field="resolution", fix="use e.g. 0.02 (about 2 km, the default) or 0.001 (about 100 m)")
    if not (isinstance(n_stations, (int, np.integer)) and 40 <= n_stations <= 5000):
        raise ConfigError(f"n_stations must be an integer between 40 and 5000, got {n_stations!r}.",
                          field="n_stations", fix="use e.g. 150 (the default)")
    if not (0.0 <= float(holdout_fraction) <= 0.8):
        raise ConfigError(f"holdout_fraction must be within [0, 0.8], got {holdout_fraction!r}.",
                          field="holdout_fraction", fix="use e.g. 0.3 (the default)")
    if not (isinstance(epoch_days, (int, np.integer)) and 1 <= epoch_days <= 366):
        raise ConfigError(f"epoch_days must be an integer between 1 and 366, got {epoch_days!r}.",
                          field="epoch_days", fix="use 12 (the Sentinel-1 revisit, the default) or a multiple")


def _assign_kinds(rng, layout, frame_relief):
    """A deterministic mix of error kinds; "dem" goes to frames with hills (where it is identifiable)."""
    n = len(layout)
    order = np.argsort(-np.asarray(frame_relief), kind="stable")
    n_dem = max(1, min(n // len(ERROR_KINDS), int(np.sum(np.asarray(frame_relief) > 600.0))))
    dem_frames = set(order[:n_dem].tolist()) if n_dem else set()
    others = [k for k in ERROR_KINDS if k != "dem"]
    pool = [others[i % len(others)] for i in range(n - len(dem_frames))]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    kinds, it = [], iter(pool)
    for i in range(n):
        kinds.append("dem" if i in dem_frames else next(it))
    return kinds


def make_scenario(out_dir: str | os.PathLike, *, seed: int = 0, resolution: float = 0.02,
                  timeseries: bool = False, n_stations: int = 150, holdout_fraction: float = 0.3,
                  epoch_days: int = 12) -> ScenarioPaths:
    """Write the North China Plain scenario into ``out_dir`` and return the paths written.

    Parameters
    ----------
    out_dir
        Output folder (created). Files of an earlier scenario in it are overwritten.
    seed
        Draws stations, noise, unstable monuments, held-out stations and the planted frame errors; the geography
        and the true velocity field are the same for every seed. Same seed and arguments → identical files.
    resolution
        Pixel size in degrees of every frame and of the truth grid (0.02 ≈ 2 km: seconds; 0.001 ≈ 100 m: the
        full-size case, frames generated one at a time in float32). The stations are the same at every
        resolution, but a frame's planted error is drawn after its pixel noise from the same stream, so the same
        seed at two resolutions gives two different realisations of the frame errors: compare resolutions over
        several seeds, not one. White pixel noise is 1.5 mm/yr at 0.001° and averaged down on coarser grids, so
        a comparison with GNSS at a single 100 m pixel carries that noise too.
    timeseries
        Also write a LiCSBAS ``cum.h5`` per frame and the time-dependent truth. The cube holds
        ``n_epochs × frame pixels`` float32 values, so keep ``resolution`` ≥ ~0.005 or raise ``epoch_days``.
    n_stations, holdout_fraction
        Number of GNSS stations and the fraction written to ``gnss_holdout.csv`` instead of ``gnss.csv``.
    epoch_days
        Spacing of time-series epochs (Sentinel-1 revisit: 12 days).

    Returns
    -------
    ScenarioPaths
    """
    _check_args(seed, resolution, n_stations, holdout_fraction, epoch_days)
    t_start = time.perf_counter()
    seed, resolution = int(seed), float(resolution)
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise OutputError("The scenario output path exists and is not a folder.", file=out, field="out_dir",
                          fix="choose a new folder name")
    frames_dir, truth_dir = out / "frames", out / "truth"
    try:
        frames_dir.mkdir(parents=True, exist_ok=True)
        truth_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the scenario folders ({exc.strerror}).", file=out, field="out_dir",
                          fix="choose a writable location") from exc

    tm = _TimeModel.build(epoch_days) if timeseries else None

    # ---- truth grid (kept in memory: frames are cut from it, so frames and truth agree pixel for pixel)
    ny, nx = _grid_shape(resolution)
    glon = AREA[0] + (np.arange(nx) + 0.5) * resolution
    glat = AREA[3] - (np.arange(ny) + 0.5) * resolution
    from .geodesy.grids import cell_area_m2

    row_area = cell_area_m2(glat, glon[:2])[:, 0]
    truth = _truth_grid(glon, glat, resolution, parts=timeseries)
    paths_truth = {"vu": truth_dir / "vertical_velocity.tif", "ve": truth_dir / "east_velocity.tif",
                   "vn": truth_dir / "north_velocity.tif", "height": truth_dir / "height.tif"}
    for k, p in paths_truth.items():
        _write_tif(p, truth[k], AREA[0], AREA[3], resolution)
    area_grid = np.broadcast_to(row_area[:, None], (ny, nx))
    sinking = truth["vu"] < _SUBSIDENCE_THRESHOLD
    summary = {
        "subsidence_area_km2": float(np.sum(area_grid[sinking]) / 1e6),
        "subsidence_mean_rate_mm_per_yr": float(np.mean(truth["vu"][sinking].astype(np.float64))),
        "max_subsidence_rate_mm_per_yr": float(np.nanmin(truth["vu"])),
        "land_area_km2": float(np.sum(area_grid[np.isfinite(truth["vu"])]) / 1e6),
    }

    # ---- frames
    layout = _frame_layout(resolution)
    stations = _draw_stations(seed, n_stations, holdout_fraction, layout)
    stable = stations["unstable_bias_vu"] == 0
    frame_rngs = [np.random.default_rng([seed, _S_FRAME, i]) for i in range(len(layout))]
    relief = []
    for g in layout:
        sub = truth["height"][g.row0:g.row0 + g.nrows, g.col0:g.col0 + g.ncols]
        relief.append(float(np.nanpercentile(sub, 90)) if np.isfinite(sub).any() else 0.0)
    kinds = _assign_kinds(np.random.default_rng([seed, _S_FRAME, 10_000]), layout, relief)
    st_lon, st_lat = stations["lon"].to_numpy(), stations["lat"].to_numpy()
    frame_records, frame_dirs, cubes = {}, [], []
    for i, g in enumerate(layout):
        t0 = time.perf_counter()
        rec, fdir, cube = _make_frame(g, i, kinds[i], frame_rngs[i], resolution, stations, stable, frames_dir,
                                      truth, tm, seed)
        frame_records[g.frame_id] = rec
        frame_dirs.append(fdir)
        if cube is not None:
            cubes.append(cube)
        log.info("frame %s (%s, %d×%d px): RMSE vs GNSS %.1f mm/yr, %.2f s", g.frame_id, kinds[i], g.nrows,
                 g.ncols, rec["rmse_before_mm_per_yr"], time.perf_counter() - t0)

    # ---- GNSS tables
    cols = ["station", "lon", "lat", "ve", "vn", "vu", "se", "sn", "su"]
    gnss_csv, holdout_csv = out / "gnss.csv", out / "gnss_holdout.csv"
    _write_csv(gnss_csv, stations.loc[~stations["holdout"], cols])
    _write_csv(holdout_csv, stations.loc[stations["holdout"], cols])
    truth_gnss = stations[["station", "lon", "lat", "height", "ve_true", "vn_true", "vu_true", "holdout",
                           "unstable_bias_vu"]].rename(columns={"ve_true": "ve", "vn_true": "vn", "vu_true": "vu"})
    truth_gnss = truth_gnss.round({"ve": 4, "vn": 4, "vu": 4})
    truth_gnss_csv = truth_dir / "gnss_truth.csv"
    _write_csv(truth_gnss_csv, truth_gnss)

    # ---- time-dependent truth
    ts_info, truth_ts_path, holdout_disp_path = None, None, None
    if timeseries:
        ts_info, truth_ts_path, holdout_disp_path = _write_timeseries_truth(
            tm, truth, glon, glat, area_grid, truth_dir, stations)

    record = {
        "scenario": "North China Plain (synthetic)",
        "seed": seed, "resolution_deg": resolution, "area_wlsn_deg": list(AREA), "grid_shape": [ny, nx],
        "reference_frame": "ITRF2014", "plate": "EURA", "los_convention": "positive toward the satellite",
        "rmse_definition": ("RMS over stations of (InSAR LOS at the station's pixel - GNSS LOS) after removing "
                            "the frame's median difference; all stable stations of both GNSS files, unmasked "
                            "pixels"),
        "frames": frame_records,
        "bowls": [dict(b) for b in BOWLS],
        "stations": {"n_total": int(len(stations)), "n_training": int((~stations["holdout"]).sum()),
                     "holdout": stations.loc[stations["holdout"], "station"].tolist(),
                     "unstable": {s: float(b) for s, b in zip(stations["station"], stations["unstable_bias_vu"])
                                  if b != 0},
                     "noise_sigma_enu_mm_per_yr": [0.4, 0.4, 1.2]},
        "truth": {**summary, "subsidence_threshold_mm_per_yr": _SUBSIDENCE_THRESHOLD},
        "timeseries": ts_info,
        "elapsed_s": None,
    }
    record["elapsed_s"] = round(time.perf_counter() - t_start, 3)
    scenario_json = truth_dir / "scenario.json"
    tmp = scenario_json.with_name(scenario_json.name + ".part")
    tmp.write_text(json.dumps(record, indent=1, default=_json_default))
    _replace_atomic(tmp, scenario_json)
    log.info("scenario written to %s in %.1f s", out, record["elapsed_s"])
    return ScenarioPaths(out, frames_dir, tuple(frame_dirs), gnss_csv, holdout_csv, truth_dir, paths_truth["vu"],
                         paths_truth["ve"], paths_truth["vn"], paths_truth["height"], truth_gnss_csv,
                         scenario_json,
                         tuple(cubes), truth_ts_path, holdout_disp_path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _make_frame(g, index, kind, rng, resolution, stations, stable, frames_dir, truth, tm, seed):
    from .geodesy.los import unit_vector_from_incidence_heading

    lon1, lat1 = _frame_coords(g, resolution)
    shape = (g.nrows, g.ncols)
    sl = (slice(g.row0, g.row0 + g.nrows), slice(g.col0, g.col0 + g.ncols))
    x, y = _smooth_fields(lambda LON, LAT: _to_km(LON, LAT), lon1, lat1, resolution)
    along, rng_km = _rotated(x, y, g.heading)
    xi = (rng_km - g.range_centre_km) / (0.5 * _SWATH_KM)   # -1 near range … +1 far range
    eta = (along - g.along_centre_km) / (0.5 * _FRAME_KM)   # -1 … +1 along the flight direction
    del along, rng_km
    inside = (np.abs(xi) <= 1.0) & (np.abs(eta) <= 1.0)
    sea = np.isnan(truth["vu"][sl])
    height = truth["height"][sl].astype(np.float64)

    incidence = _INCIDENCE_NEAR + (_INCIDENCE_FAR - _INCIDENCE_NEAR) * 0.5 * (xi + 1.0)
    e, n, u = (np.asarray(c, np.float64) for c in unit_vector_from_incidence_heading(
        np.clip(incidence, _INCIDENCE_NEAR, _INCIDENCE_FAR), g.heading))
    del incidence

    if tm is not None:
        los_static = e * truth["se"][sl] + n * truth["sn"][sl] + u * truth["su"][sl]
        los_bowl = e * truth["be"][sl] + n * truth["bn"][sl] + u * truth["bu"][sl]
        los_truth = los_static + los_bowl
    else:
        los_truth = e * truth["ve"][sl] + n * truth["vn"][sl] + u * truth["vu"][sl]

    # decorrelation: correlated blobs, far more frequent in the hills; LiCSBAS leaves them NaN (mask NaN too)
    mweight = np.clip((height - 150.0) / 500.0, 0.0, 1.0)
    blob = _gaussian_noise_field(rng, shape, 6.0, resolution, float(lat1.mean()))
    decorrelated = blob > (1.9 - 1.3 * mweight)
    valid = inside & ~sea & ~decorrelated
    # unreliable but kept pixels (unwrapping-error-like): finite velocity, mask 0
    unreliable = valid & (rng.uniform(size=shape) < 0.015)

    # White pixel noise is 1.5 mm/yr for a 100 m (0.001°) pixel; a coarser grid is a multilooked version of that
    # product, so its white noise is averaged over (resolution / 0.001)² pixels (the troposphere below is not).
    looks = max(resolution / REFERENCE_PIXEL_DEG, 1.0)
    vstd = (PIXEL_SIGMA_100M / looks) * (0.8 + 0.4 * rng.uniform(size=shape)) * (1.0 + 0.5 * mweight)
    pixel_noise = vstd * rng.standard_normal(shape)
    tropo = 1.0 * _gaussian_noise_field(rng, shape, 12.0, resolution, float(lat1.mean()))
    spikes = np.where(unreliable, rng.choice([-1.0, 1.0], shape) * rng.uniform(12.0, 40.0, shape), 0.0)
    noise = pixel_noise + tropo + spikes

    nominal = _draw_frame_errors(rng, kind)
    h_ref = float(np.median(height[valid])) if valid.any() else 0.0
    lw = _long_wavelength_error(nominal, xi, eta, height, x, y, h_ref)
    mask = np.where(valid, np.where(unreliable, 0.0, 1.0), np.nan)

    # stations in this frame → tune the error amplitude to a target RMSE drawn within the NCP's reported range
    sl, sa = stations["lon"].to_numpy(), stations["lat"].to_numpy()
    west, north = AREA[0] + g.col0 * resolution, AREA[3] - g.row0 * resolution
    rows = np.floor((north - sa) / resolution).astype(int)
    cols = np.floor((sl - west) / resolution).astype(int)
    inframe = (rows >= 0) & (rows < g.nrows) & (cols >= 0) & (cols < g.ncols) & stable.to_numpy()
    rows, cols = rows[inframe], cols[inframe]
    gv = [stations[c].to_numpy()[inframe] for c in ("ve", "vn", "vu")]
    base = np.where(valid, los_truth + nominal["offset"] + noise, np.nan)
    target = float(rng.uniform(*_TARGET_RMSE[kind]))

    plane = (nominal["plane"][0] * xi + nominal["plane"][1] * eta) if "plane" in nominal else np.zeros_like(xi)
    rest = lw - plane

    # the tuning only needs the station pixels
    at = (rows, cols)
    b_s, p_s, r_s = base[at], plane[at], rest[at]
    sm = lambda a: np.asarray(a)[at]  # noqa: E731

    def rmse_for(s, boost=1.0):
        v = b_s + s * (boost * p_s + r_s)
        return before_adjustment_rmse(v[None], sm(mask)[None], sm(e)[None], sm(n)[None], sm(u)[None],
                                      np.zeros(v.size, int), np.arange(v.size), *gv)[0]

    def solve(f, lo, hi):
        """Argument in [lo, hi] where f reaches the target (bisection on the bracket), else the nearer end."""
        if f(lo) > target:
            return lo
        if f(hi) < target:
            return hi
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return hi  # the side where f >= target

    s, boost = 1.0, 1.0
    if np.isfinite(rmse_for(1.0)):
        s_max = _SCALE_RANGE[kind][1]
        s = solve(rmse_for, *_SCALE_RANGE[kind])
        if "plane" in nominal and s >= s_max and rmse_for(s) < target:
            # the stations sample the curved terms poorly (they cluster in cities): a steeper plane instead
            boost = solve(lambda b: rmse_for(s, b), 1.0, 3.0)
            if rmse_for(s, boost) < rmse_for(s):
                boost = 1.0
    params = _scaled_params(nominal, s)
    if "plane" in params:
        params["plane"] = [v * boost for v in params["plane"]]
        params["plane_boost"] = boost
    error = nominal["offset"] + s * (boost * plane + rest)
    vel = np.where(valid, los_truth + error + noise, np.nan)
    rmse, n_used = before_adjustment_rmse(vel.astype(np.float32), mask, e.astype(np.float32),
                                          n.astype(np.float32), u.astype(np.float32), rows, cols, *gv)

    fdir = frames_dir / g.frame_id
    fdir.mkdir(parents=True, exist_ok=True)
    geo = np.where(inside, 1.0, np.nan)
    w = (west, north, resolution)
    _write_tif(fdir / f"{g.frame_id}.vel.geo.tif", vel, *w)
    _write_tif(fdir / "vstd.geo.tif", np.where(valid, vstd, np.nan), *w)
    _write_tif(fdir / "E.geo.tif", e * geo, *w)
    _write_tif(fdir / "N.geo.tif", n * geo, *w)
    _write_tif(fdir / "U.geo.tif", u * geo, *w)
    _write_tif(fdir / "hgt.geo.tif", height * geo, *w)
    _write_tif(fdir / "mask.geo.tif", mask, *w)

    cube_path = None
    if tm is not None:
        cube_path = fdir / "cum.h5"
        _write_cube(cube_path, g, index, seed, tm, valid, los_static, los_bowl, vel - los_truth, xi, eta,
                    resolution, float(lat1.mean()), west, north, vel)

    mid = inside & (np.abs(xi) < 0.1)
    rec = {
        "orbit": "ascending" if g.orbit == "A" else "descending",
        "track": g.frame_id[:4], "heading_deg": g.heading,
        "range_centre_km": g.range_centre_km, "along_centre_km": g.along_centre_km,
        "bounds_wsen_deg": [west, north - g.nrows * resolution, west + g.ncols * resolution, north],
        "shape": [g.nrows, g.ncols],
        "incidence_near_far_deg": [_INCIDENCE_NEAR, _INCIDENCE_FAR],
        "mean_unit_vector_mid_range": [float(np.mean(c[mid])) for c in (e, n, u)] if mid.any() else None,
        "valid_fraction_of_footprint": float(valid.sum() / max(inside.sum(), 1)),
        "error_kind": kind,
        "error_parameters": _params_to_json(params),
        "error_normalised_coordinates": ("xi = (range - range_centre_km)/125 (-1 near, +1 far range), eta = "
                                         "(along - along_centre_km)/125 (+1 toward the flight direction), both "
                                         "in the local azimuthal-equidistant plane centred at 116.5E 37.75N"),
        "dem_reference_height_m": h_ref,
        "noise": {"pixel_sigma_mm_per_yr_at_100m": PIXEL_SIGMA_100M,
                  "pixel_sigma_mm_per_yr": PIXEL_SIGMA_100M / max(resolution / REFERENCE_PIXEL_DEG, 1.0),
                  "troposphere_sigma_mm_per_yr": 1.0,
                  "unreliable_pixel_fraction": 0.015},
        "target_rmse_mm_per_yr": target,
        "rmse_before_mm_per_yr": rmse,
        "n_stations_rmse": n_used,
    }
    return rec, fdir, cube_path


def _write_cube(path, g, index, seed, tm, valid, los_static, los_bowl, error_rate, xi, eta, resolution, lat_mid,
                west, north, vel):
    """LiCSBAS cum.h5 whose per-pixel linear trend is exactly the frame's velocity.

    cum(t) = LOS truth displacement(t) + error_rate·t + A(t) - A(0) - b·t, with A the per-epoch atmosphere and
    ramp and b its per-pixel trend (so the epoch noise adds no trend). Two passes over epochs (A is regenerated
    from per-epoch seeds) keep memory at one frame, whatever the number of epochs.
    """
    import h5py

    t = tm.t
    tc = t - t.mean()
    hist = tm.history(t)

    def epoch_noise(k):
        r = np.random.default_rng([seed, _S_EPOCH, index, k])
        atmo = r.uniform(2.0, 6.0) * _gaussian_noise_field(r, xi.shape, 15.0, resolution, lat_mid)
        ramp = r.normal(0.0, 3.0) * xi + r.normal(0.0, 3.0) * eta
        return atmo + ramp

    # keep the epoch fields when they fit in memory (one pass), else regenerate them (two passes)
    keep = t.size * xi.size * 4 <= _CUBE_CACHE_BYTES
    cache = []
    trend = np.zeros(xi.shape)
    for k in range(t.size):
        ak = epoch_noise(k)
        trend += tc[k] * ak
        if keep:
            cache.append(ak.astype(np.float32))
    trend /= np.sum(tc * tc)
    a0 = cache[0] if keep else epoch_noise(0)
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as f:
        cum = f.create_dataset("cum", (t.size, g.nrows, g.ncols), dtype="float32")
        for k in range(t.size):
            ak = cache[k] if keep else epoch_noise(k)
            d = los_static * t[k] + los_bowl * hist[k] + error_rate * t[k] + (ak - a0) - trend * t[k]
            cum[k] = np.where(valid, d, np.nan).astype(np.float32)
        f.create_dataset("imdates", data=np.array([int(d.strftime("%Y%m%d")) for d in tm.dates], np.int32))
        # LiCSBAS (GAMMA) grid registration: corner_lat/lon is the CENTRE of the upper-left pixel, post_lat < 0
        f.create_dataset("corner_lat", data=np.float64(north - 0.5 * resolution))
        f.create_dataset("corner_lon", data=np.float64(west + 0.5 * resolution))
        f.create_dataset("post_lat", data=np.float64(-resolution))
        f.create_dataset("post_lon", data=np.float64(resolution))
        f.create_dataset("vel", data=np.asarray(vel, np.float32))
        f.create_dataset("bperp", data=np.random.default_rng([seed, _S_EPOCH, index, 999_999]).uniform(
            -120, 120, t.size).astype(np.float32))
    _replace_atomic(tmp, path)
    return path


def _write_timeseries_truth(tm, parts, glon, glat, area_grid, truth_dir, stations):
    import pandas as pd
    import xarray as xr

    years = np.array(sorted(_YEAR_MULTIPLIER), int)
    su, bu = parts["su"].astype(np.float64), parts["bu"].astype(np.float64)  # static and funnel vertical
    annual = np.stack([su + bu * tm.annual_factor(int(yr)) for yr in years]).astype(np.float32)
    # the data end at the last epoch (before _TS_END unless the epochs fall on it): nothing after it is observed
    t_last = float(tm.t[-1])
    ends = np.array([_years_since_start(_dt.date(int(yr) + 1, 1, 1)) for yr in years])
    ends = np.minimum(ends, t_last)
    cumulative = np.stack([su * te + bu * tm.history(te) for te in ends]).astype(np.float32)
    ds = xr.Dataset(
        {"annual_vertical_velocity": (("year", "y", "x"), annual,
                                      {"units": "mm/yr", "long_name": "true mean vertical velocity in the year"}),
         "cumulative_vertical_displacement": (("year", "y", "x"), cumulative,
                                              {"units": "mm", "long_name": "true vertical displacement at the end "
                                               "of the year (the last epoch for the last year) since the first "
                                               "epoch, positive up"})},
        coords={"year": years, "y": ("y", glat, {"units": "degrees_north"}),
                "x": ("x", glon, {"units": "degrees_east"})},
        attrs={"first_epoch": _TS_START.isoformat(), "crs": "EPSG:4326"})
    nc = truth_dir / "vertical_timeseries.nc"
    tmp = nc.with_name(nc.name + ".part")
    enc = {v: {"zlib": True, "complevel": 1, "_FillValue": np.float32(np.nan)} for v in ds.data_vars}
    ds.to_netcdf(tmp, encoding=enc, engine="netcdf4")
    _replace_atomic(tmp, nc)

    info = {"first_epoch": tm.dates[0].isoformat(), "last_epoch": tm.dates[-1].isoformat(),
            "n_epochs": len(tm.dates), "epoch_days": (tm.dates[1] - tm.dates[0]).days,
            "year_multiplier_normalised": {int(y): _YEAR_MULTIPLIER[int(y)] / tm.scale for y in years}}
    rates, areas = {}, {}
    for yr, a in zip(years, annual):
        m = a < _SUBSIDENCE_THRESHOLD
        rates[int(yr)] = float(np.mean(a[m].astype(np.float64))) if m.any() else float("nan")
        areas[int(yr)] = float(np.sum(area_grid[m]) / 1e6)
    info["annual_mean_subsidence_rate_mm_per_yr"] = rates
    info["annual_subsidence_area_km2"] = areas
    info["peak_year"] = int(min(rates, key=lambda y: rates[y]))
    info["max_cumulative_subsidence_mm"] = float(np.nanmin(cumulative[-1]))
    # vertical displacement integrated over area (m³): whole land and the long-term subsidence area
    t2021 = _years_since_start(_dt.date(2021, 1, 1))
    tend = t_last
    d_before = su * t2021 + bu * tm.history(t2021)
    d_after = su * (tend - t2021) + bu * (tm.history(tend) - tm.history(t2021))
    sinking = (su + bu) < _SUBSIDENCE_THRESHOLD
    vol = {}
    for label, d in (("before_2021", d_before), ("2021_2022", d_after)):
        ok = np.isfinite(d)
        vol[label] = {"period": [tm.dates[0].isoformat(), "2021-01-01"] if label == "before_2021"
                      else ["2021-01-01", tm.dates[-1].isoformat()],
                      "land_m3": float(np.sum(d[ok] * 1e-3 * area_grid[ok])),
                      "subsidence_area_m3": float(np.sum(d[ok & sinking] * 1e-3 * area_grid[ok & sinking]))}
    info["vertical_displacement_volume"] = vol
    info["volume_note"] = ("signed integral of vertical displacement over area (negative = loss of volume); the "
                           "compaction volume is its negative")

    # truth displacement at held-out stations, per epoch (mm since the first epoch)
    hold = stations[stations["holdout"]]
    (se, sn, su_s), (be, bn, bu_s) = _truth_parts(hold["lon"].to_numpy(), hold["lat"].to_numpy())
    rows = []
    for d, tk, hk in zip(tm.dates, tm.t, tm.history(tm.t)):
        rows.append(pd.DataFrame({"station": hold["station"].to_numpy(), "date": d.isoformat(),
                                  "de": np.round(se * tk + be * hk, 3) + 0.0,
                                  "dn": np.round(sn * tk + bn * hk, 3) + 0.0,
                                  "du": np.round(su_s * tk + bu_s * hk, 3) + 0.0}))
    disp = pd.concat(rows, ignore_index=True).sort_values(["station", "date"], kind="stable")
    csv = truth_dir / "holdout_displacement.csv"
    _write_csv(csv, disp)
    return info, nc, csv
