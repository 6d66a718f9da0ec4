"""Line-of-sight geometry: ground→satellite unit vectors, their conventions, and projections.

Convention of the whole package: the LOS velocity is positive **toward the satellite** (LiCSBAS/MintPy sign),

    v_los = e * ve + n * vn + u * vu      (mm/yr)

with ``(e, n, u)`` the east, north and up components of the unit vector pointing from the ground pixel to the
satellite. The products describe that vector in three ways, all converted here:

* LiCSAR/LiCSBAS ``E/N/U.geo.tif`` rasters hold it directly (:func:`unit_vector_from_enu`, which checks the norm);
* MintPy ``incidenceAngle`` and ``azimuthAngle`` (degrees; the azimuth of the ground→satellite vector measured
  from north, **anticlockwise** positive)::

      e = -sin(inc) sin(az),   n = sin(inc) cos(az),   u = cos(inc)

* incidence and **heading** (flight direction, degrees clockwise from north), for a right-looking SAR::

      e = -sin(inc) cos(hd),   n = sin(inc) sin(hd),   u = cos(inc)      (so az = 90° - hd)

Sentinel-1 at mid latitudes: ascending (heading ≈ -12°) gives e ≈ -0.6, n ≈ -0.13, u ≈ 0.78; descending
(heading ≈ -168°) gives e ≈ +0.6.

All functions are backend-aware (written against the array API): they accept NumPy, CuPy or any array-API
arrays (or Python scalars) and return arrays of the same namespace. Angles are degrees. Integer inputs are
converted to float64; strings, ``None``, booleans, complex values and array arguments whose shapes do not
broadcast together raise :class:`~gpu_insar_adjust.errors.ArrayArgumentError` naming the argument.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from .. import backend
from ..errors import ArrayArgumentError, GeometryError

__all__ = [
    "unit_vector_from_enu",
    "unit_vector_from_incidence_azimuth",
    "unit_vector_from_incidence_heading",
    "incidence_azimuth_from_unit_vector",
    "heading_from_unit_vector",
    "azimuth_from_heading",
    "heading_from_azimuth",
    "enu_to_los",
    "los_to_vertical",
    "enu_std_to_los_std",
    "orbit_direction",
    "check_unit_vector",
]

_DEG = math.pi / 180.0

# |norm - 1| allowed for a stored unit vector: float32 rasters and resampling by the processor keep it well under
# 1e-3; anything beyond a few per cent is a wrong band, wrong scaling (e.g. stored ×1000) or a mixed-up file.
NORM_TOLERANCE = 0.02


def _broadcast_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """Common broadcast shape of ``shapes`` (NumPy/array-API rules), or None when they do not broadcast."""
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _floats(**named: Any):
    """(xp, arrays...) for the named arguments, every one an array of one namespace with a real floating dtype.

    Validation is metadata-only (types, dtypes, shapes; no pass over the data). Accepted: real floating arrays
    (kept as they are, so float32 rasters stay float32), integer arrays and Python ints/floats (converted to
    float — an angle of ``39`` degrees is a valid input), and lists/tuples of numbers. Anything else — strings,
    ``None``, booleans, complex values, object arrays — and shapes that do not broadcast together raise
    :class:`ArrayArgumentError` naming the argument.
    """
    arrays = {}
    for name, v in named.items():
        if isinstance(v, bool) or (backend._is_array(v) and _dtype_kind(v) == "bool"):
            raise ArrayArgumentError(f"Argument {name!r} is boolean, not a number.", field=name,
                                     fix=f"pass {name} as a float array or number (a mask is not a value)")
        if isinstance(v, complex) or (backend._is_array(v) and _dtype_kind(v) == "complex"):
            raise ArrayArgumentError(f"Argument {name!r} is complex; LOS geometry is real-valued.", field=name,
                                     fix=f"pass the real {name} as a float array or number")
        if backend._is_array(v):
            if _dtype_kind(v) not in ("real floating", "integral"):
                raise ArrayArgumentError(f"Argument {name!r} has dtype {v.dtype}, not a numeric dtype.",
                                         field=name, fix=f"pass {name} as a float array or number")
            arrays[name] = v
        elif not isinstance(v, (int, float, list, tuple)):
            raise ArrayArgumentError(f"Argument {name!r} is a {type(v).__name__}, not a number or an array.",
                                     field=name, fix=f"pass {name} as a float array (NumPy, CuPy, ...) or number")
    xp = backend.namespace(*arrays.values())
    # Python scalars take the dtype of the first floating array, so float32 rasters stay float32.
    scalar_dtype = next((a.dtype for a in arrays.values() if xp.isdtype(a.dtype, "real floating")), xp.float64)
    out = []
    for name, v in named.items():
        if name in arrays:
            a = v if xp.isdtype(v.dtype, "real floating") else xp.astype(v, xp.float64)
        elif isinstance(v, (list, tuple)):
            try:
                a = xp.asarray(v, dtype=xp.float64)
            except (TypeError, ValueError) as exc:
                raise ArrayArgumentError(f"Argument {name!r} is a {type(v).__name__} that is not a regular "
                                         f"array of numbers ({exc}).", field=name,
                                         fix=f"pass {name} as a float array or a list of numbers") from exc
        else:
            a = xp.asarray(v, dtype=scalar_dtype)
        out.append(a)
    shape: tuple[int, ...] = ()
    for name, a in zip(named, out):
        common = _broadcast_shape([shape, tuple(a.shape)])
        if common is None:
            listed = ", ".join(f"{k} {tuple(b.shape)}" for k, b in zip(named, out) if b.ndim)
            raise ArrayArgumentError(
                f"Argument {name!r} of shape {tuple(a.shape)} does not broadcast against the arguments before it "
                f"(shape {shape}); shapes given: {listed}.", field=name,
                fix=f"pass {name} with the same shape as the other arrays (e.g. all (rows, cols) rasters of one "
                    f"frame), or as a scalar / an array that broadcasts against them")
        shape = common
    return (xp, *out)


def _dtype_kind(a) -> str:
    """'bool', 'integral', 'real floating', 'complex' or 'other' for an array's dtype (any namespace)."""
    xp = backend.namespace(a)
    for kind in ("bool", "integral", "real floating", "complex floating"):
        try:
            if xp.isdtype(a.dtype, kind):
                return "complex" if kind == "complex floating" else kind
        except (TypeError, ValueError):  # e.g. a NumPy string dtype, which isdtype does not know
            break
    return "other"


def _finite_any(xp, condition) -> bool:
    """True where ``condition`` holds at any element (NaN elements compare False, so no-data is never flagged)."""
    return bool(xp.any(condition))


def _check_incidence(xp, inc, *, field: str, file=None) -> None:
    if _finite_any(xp, (inc < 0.0) | (inc > 90.0)):
        lo, hi = float(xp.min(xp.where(xp.isnan(inc), xp.inf, inc))), float(
            xp.max(xp.where(xp.isnan(inc), -xp.inf, inc)))
        raise GeometryError(
            f"Incidence angles must lie within 0-90 degrees; found values from {lo:.4g} to {hi:.4g}.",
            file=file, field=field,
            fix="give the incidence angle from the vertical in degrees (Sentinel-1: about 29-46°); convert "
                "radians with numpy.degrees, and use 90 - elevation if the file stores the elevation angle")


def _unit_vectors_pass(e, n, u, tolerance: float) -> bool:
    """True when every (e, n, u) passes :func:`check_unit_vector`'s tests, decided in one fused pass (numba, NumPy
    arrays of one dtype and shape, the same arithmetic in that dtype as the array form); False when a test fails
    or the fused pass does not apply, and the array form then decides and reports."""
    if not all(isinstance(a, np.ndarray) for a in (e, n, u)) or not (e.dtype == n.dtype == u.dtype) \
            or not (e.shape == n.shape == u.shape) or e.dtype not in (np.float32, np.float64):
        return False
    from ..kernels import cpu

    if cpu.cpu_engine() != "numba":
        return False
    one, tol = e.dtype.type(1.0), e.dtype.type(tolerance)
    return bool(_unit_kernel()(np.ravel(e), np.ravel(n), np.ravel(u), one, tol))


@functools.lru_cache(maxsize=1)
def _unit_kernel():
    import numba as nb

    @nb.njit(cache=True, nogil=True)
    def all_unit(e, n, u, one, tol):
        # as the array form: the norm in the arrays' dtype; NaN fails no comparison (no data is never flagged)
        for i in range(e.size):
            a, b, c = e[i], n[i], u[i]
            norm = np.sqrt(a * a + b * b + c * c)
            if abs(norm - one) > tol or c < 0:
                return False
        return True

    return all_unit


def check_unit_vector(e, n, u, *, tolerance: float = NORM_TOLERANCE, file=None, field: str = "los_e/los_n/los_u"):
    """Raise :class:`GeometryError` where the norm of (e, n, u) differs from 1 by more than ``tolerance``.

    NaN pixels (no data) are ignored; an up component below zero (vector pointing into the ground) is also an
    error, since the LOS convention needs the ground→satellite direction.
    """
    xp, e, n, u = _floats(e=e, n=n, u=u)
    if _unit_vectors_pass(e, n, u, tolerance):
        return
    norm = xp.sqrt(e * e + n * n + u * u)
    bad = xp.abs(norm - 1.0) > tolerance
    if _finite_any(xp, bad):
        worst = float(xp.max(xp.where(xp.isnan(norm), 0.0, xp.abs(norm - 1.0))))
        count = int(xp.sum(xp.astype(bad, xp.int64)))
        raise GeometryError(
            f"{count} LOS unit vectors have a norm far from 1 (largest |norm - 1| = {worst:.3g}, "
            f"tolerance {tolerance:g}).", file=file, field=field,
            fix="give the east, north and up components of the ground→satellite unit vector (LiCSAR E/N/U.geo.tif "
                "as stored, not scaled); check that the three rasters are the E, N and U files of the same frame")
    if _finite_any(xp, u < 0.0):
        raise GeometryError(
            "Some LOS unit vectors point into the ground (up component < 0).", file=file, field=field,
            fix="give the ground→satellite vector (up component = cos(incidence) > 0); if the file stores the "
                "satellite→ground direction, negate all three components")


def unit_vector_from_enu(e, n, u, *, tolerance: float = NORM_TOLERANCE, file=None):
    """Validated ground→satellite unit vector from stored east/north/up rasters (LiCSAR ``E/N/U.geo.tif``).

    Returns ``(e, n, u)`` unchanged (same arrays) after checking that norms are within ``tolerance`` of 1.
    """
    check_unit_vector(e, n, u, tolerance=tolerance, file=file)
    return e, n, u


def unit_vector_from_incidence_azimuth(incidence_deg, azimuth_deg, *, file=None):
    """Ground→satellite unit vector (e, n, u) from MintPy ``incidenceAngle`` and ``azimuthAngle`` (degrees).

    ``azimuth_deg`` is the azimuth of the ground→satellite vector from north, anticlockwise positive (MintPy):
    ``e = -sin(inc) sin(az)``, ``n = sin(inc) cos(az)``, ``u = cos(inc)``.
    """
    xp, inc, az = _floats(incidence_deg=incidence_deg, azimuth_deg=azimuth_deg)
    _check_incidence(xp, inc, field="incidenceAngle", file=file)
    si = xp.sin(inc * _DEG)
    return -si * xp.sin(az * _DEG), si * xp.cos(az * _DEG), xp.cos(inc * _DEG)


def unit_vector_from_incidence_heading(incidence_deg, heading_deg, *, file=None):
    """Ground→satellite unit vector (e, n, u) from incidence and heading (degrees) of a right-looking SAR.

    ``heading_deg`` is the flight direction, clockwise from north (Sentinel-1 ascending ≈ -12° or 348°,
    descending ≈ -168° or 192°): ``e = -sin(inc) cos(hd)``, ``n = sin(inc) sin(hd)``, ``u = cos(inc)``.
    """
    xp, inc, hd = _floats(incidence_deg=incidence_deg, heading_deg=heading_deg)
    _check_incidence(xp, inc, field="incidence/heading", file=file)
    si = xp.sin(inc * _DEG)
    return -si * xp.cos(hd * _DEG), si * xp.sin(hd * _DEG), xp.cos(inc * _DEG)


def incidence_azimuth_from_unit_vector(e, n, u):
    """(incidence, azimuth) in degrees from a ground→satellite unit vector, MintPy convention.

    Incidence = arccos(u) in [0, 90]; azimuth anticlockwise from north in (-180, 180]. The vector is normalised
    first, so float32 rounding in the stored components does not bias the angles.
    """
    xp, e, n, u = _floats(e=e, n=n, u=u)
    norm = xp.sqrt(e * e + n * n + u * u)
    cos_inc = xp.clip(u / norm, -1.0, 1.0)
    return xp.acos(cos_inc) / _DEG, xp.atan2(-e, n) / _DEG


def heading_from_unit_vector(e, n, u=None):
    """Heading (flight direction, degrees clockwise from north, in (-180, 180]) of a right-looking SAR.

    Only the horizontal components are needed: ``heading = atan2(n, -e)``. ``u`` is accepted for symmetry.
    """
    xp, e, n = _floats(e=e, n=n)
    return xp.atan2(n, -e) / _DEG


def azimuth_from_heading(heading_deg):
    """MintPy LOS azimuth (anticlockwise from north, ground→satellite) from a right-looking heading: 90° - hd,
    wrapped to (-180, 180]."""
    xp, hd = _floats(heading_deg=heading_deg)
    return _wrap180(xp, 90.0 - hd)


def heading_from_azimuth(azimuth_deg):
    """Right-looking heading (clockwise from north) from a MintPy LOS azimuth: 90° - az, wrapped to (-180, 180]."""
    xp, az = _floats(azimuth_deg=azimuth_deg)
    return _wrap180(xp, 90.0 - az)


def _wrap180(xp, a):
    w = a - 360.0 * xp.floor((a + 180.0) / 360.0)
    return xp.where(w == -180.0, 180.0, w)


def enu_to_los(ve, vn, vu, e, n, u):
    """LOS velocity (positive toward the satellite) of an east/north/up velocity: ``e*ve + n*vn + u*vu``.

    Any of ``ve``, ``vn``, ``vu`` may be arrays or scalars; they broadcast against the unit vector.
    Units follow the input (mm/yr in, mm/yr out).
    """
    xp, ve, vn, vu, e, n, u = _floats(ve=ve, vn=vn, vu=vu, e=e, n=n, u=u)
    return e * ve + n * vn + u * vu


def los_to_vertical(v_los, e, n, u, ve=0.0, vn=0.0):
    """Vertical velocity from a LOS velocity with the horizontal motion known (or assumed zero):
    ``vu = (v_los - e*ve - n*vn) / u``. Units follow the input."""
    xp, v_los, e, n, u, ve, vn = _floats(v_los=v_los, e=e, n=n, u=u, ve=ve, vn=vn)
    return (v_los - e * ve - n * vn) / u


def enu_std_to_los_std(se, sn, su, e, n, u, *, cov_en=0.0, cov_eu=0.0, cov_nu=0.0):
    """1-sigma of the LOS velocity from the 1-sigmas (and optional covariances) of east, north, up.

    ``var_los = e²se² + n²sn² + u²su² + 2 e n cov_en + 2 e u cov_eu + 2 n u cov_nu``; sigmas in mm/yr,
    covariances in (mm/yr)². A NaN sigma gives NaN (an unknown component is never treated as exact).
    """
    xp, se, sn, su, e, n, u, cen, ceu, cnu = _floats(se=se, sn=sn, su=su, e=e, n=n, u=u, cov_en=cov_en,
                                                     cov_eu=cov_eu, cov_nu=cov_nu)
    var = (e * e * se * se + n * n * sn * sn + u * u * su * su
           + 2.0 * (e * n * cen + e * u * ceu + n * u * cnu))
    return xp.sqrt(xp.clip(var, 0.0, None))


def orbit_direction(e, n=None, u=None) -> str:
    """``"ascending"`` when the mean east component (NaN ignored) is negative (a right-looking SAR flying north
    looks east, so the ground→satellite vector points west), else ``"descending"``."""
    xp, e = _floats(e=e)
    valid = ~xp.isnan(e)
    count = int(xp.count_nonzero(valid))
    if count == 0:
        raise GeometryError("The LOS east component has no valid value.", field="los_e",
                            fix="check that the E.geo.tif / geometry file of the frame holds data")
    mean_e = float(xp.sum(xp.where(valid, e, 0.0))) / count
    return "ascending" if mean_e < 0.0 else "descending"
