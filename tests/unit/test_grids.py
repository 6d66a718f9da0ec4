"""True cell areas on the ellipsoid, ground spacing and transforms of pixel-centre grids."""

from __future__ import annotations

import numpy as np
import pyproj
import pytest

from gpu_insar_adjust.errors import GeometryError
from gpu_insar_adjust.geodesy.grids import cell_area_m2, grid_spacing_m, transform_from_coords

GEOD = pyproj.Geod(ellps="WGS84")


def _parallel_bounded_area(lon0, lon1, lat0, lat1, n=1000):
    """Geodesic polygon area with the parallels densified (a geodesic edge bulges off the parallel)."""
    t = np.linspace(0.0, 1.0, n + 1)
    lon = np.concatenate([lon0 + (lon1 - lon0) * t, np.full(n, lon1), lon1 + (lon0 - lon1) * t, np.full(n, lon0)])
    lat = np.concatenate([np.full(n + 1, lat0), lat0 + (lat1 - lat0) * t[1:], np.full(n + 1, lat1),
                          lat1 + (lat0 - lat1) * t[1:]])
    return abs(GEOD.polygon_area_perimeter(lon, lat)[0])


def test_one_degree_cell_at_equator_matches_geod():
    area = cell_area_m2(np.array([0.5, -0.5]), np.array([0.5, 1.5]))
    assert area.shape == (2, 2)
    assert abs(area[0, 0] / 1e6 - 12308.46) < 0.01  # km²
    ref = _parallel_bounded_area(0.0, 1.0, 0.0, 1.0)
    assert abs(area[0, 0] - ref) / ref < 1e-6


def test_cells_at_38N_match_geod_and_rows_decrease_poleward():
    y = 38.0 - 0.01 * np.arange(5)
    area = cell_area_m2(y, 115.0 + 0.01 * np.arange(3))
    ref = _parallel_bounded_area(115.0, 115.01, 37.995, 38.005, n=50)
    assert abs(area[0, 0] - ref) / ref < 1e-6
    assert np.all(np.diff(area[:, 0]) > 0)  # y decreasing → cells grow toward the equator
    assert abs(area[0, 0] / 1e6 - 0.9749) < 1e-4  # a 0.01° pixel at 38°N is 0.975 km², not 1.23


def test_whole_globe_sums_to_wgs84_surface():
    area = cell_area_m2(np.arange(89.5, -90.0, -1.0), np.arange(-179.5, 180.0, 1.0))
    assert abs(area.sum() / 1e6 - 510_065_621.724) < 0.01


def test_projected_grid_uses_scale_factor():
    y = np.arange(4_400_000.0, 4_390_000.0, -1000.0) - 500.0
    x = np.arange(400_000.0, 410_000.0, 1000.0) + 500.0
    area = cell_area_m2(y, x, "EPSG:32650")
    # UTM scale factor ≈ 0.99962 at 100 km from the central meridian: true area > nominal 1 km²
    assert area[0, 0] > 1.0e6
    tr = pyproj.Transformer.from_crs(32650, 4326, always_xy=True)
    cx, cy = x[0], y[0]
    px = np.concatenate([np.linspace(cx - 500, cx + 500, 50), np.full(50, cx + 500),
                         np.linspace(cx + 500, cx - 500, 50), np.full(50, cx - 500)])
    py = np.concatenate([np.full(50, cy - 500), np.linspace(cy - 500, cy + 500, 50), np.full(50, cy + 500),
                         np.linspace(cy + 500, cy - 500, 50)])
    lon, lat = tr.transform(px, py)
    ref = abs(GEOD.polygon_area_perimeter(lon, lat)[0])
    assert abs(area[0, 0] - ref) / ref < 1e-6


def test_grid_spacing_and_transform():
    y = 38.0 - 0.01 * np.arange(4)
    x = 115.0 + 0.01 * np.arange(6)
    dy, dx = grid_spacing_m(y, x)
    g = GEOD.inv(115.0, 38.0, 115.0, 38.01)[2]
    assert abs(dy[0] - g) / g < 1e-4
    assert abs(dx[0] - GEOD.inv(115.0, 38.0, 115.01, 38.0)[2]) < 1e-3
    tr = transform_from_coords(y, x)
    assert tr.a == pytest.approx(0.01) and tr.e == pytest.approx(-0.01)
    assert tr.c == pytest.approx(114.995) and tr.f == pytest.approx(38.005)
    assert (tr @ (0.5, 0.5)) == pytest.approx((115.0, 38.0))


def test_irregular_grid_is_rejected():
    with pytest.raises(GeometryError, match="not regularly spaced") as exc:
        cell_area_m2(np.array([0.0, 1.0, 3.0]), np.array([0.0, 1.0]))
    assert "resample" in exc.value.fix
