"""Geodesy: line-of-sight geometry, plate motion from PROJ, GNSS in a frame's LOS, horizontal velocity fields.

Importing this package imports neither scikit-learn nor pyproj; they load when first used.
"""

from .los import (
    enu_std_to_los_std,
    enu_to_los,
    heading_from_unit_vector,
    incidence_azimuth_from_unit_vector,
    los_to_vertical,
    orbit_direction,
    unit_vector_from_enu,
    unit_vector_from_incidence_azimuth,
    unit_vector_from_incidence_heading,
)
from .plates import list_plates, plate_motion_los, plate_velocity_enu, to_itrf, to_plate_fixed
from .gnss_los import gnss_in_frame
from .horizontal import HorizontalVelocityField, load_horizontal_grids, sample_horizontal_grids

__all__ = [
    "unit_vector_from_enu",
    "unit_vector_from_incidence_azimuth",
    "unit_vector_from_incidence_heading",
    "incidence_azimuth_from_unit_vector",
    "heading_from_unit_vector",
    "enu_to_los",
    "los_to_vertical",
    "enu_std_to_los_std",
    "orbit_direction",
    "list_plates",
    "plate_velocity_enu",
    "to_plate_fixed",
    "to_itrf",
    "plate_motion_los",
    "gnss_in_frame",
    "HorizontalVelocityField",
    "load_horizontal_grids",
    "sample_horizontal_grids",
]
