"""Run configuration: pydantic models with every field described; TOML files in, commented TOML out.

``gia config --default`` prints :func:`default_config_toml`, a complete configuration with each field's
description as a comment, which users copy and edit. Unknown keys are errors (``extra="forbid"``), so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .adjust.frame import AdjustConfig
from .errors import ConfigError

__all__ = ["GiaConfig", "load_config", "default_config_toml", "config_to_toml"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GnssConfig(_Section):
    reference_frame: str = Field(
        "ITRF2014", description="Reference frame of the GNSS velocities: ITRF2014, ITRF2020, IGS14, IGS20, or "
                                "'<PLATE>-fixed' such as 'EURA-fixed'.")
    plate: str | None = Field(None, description="Plate (PROJ plate motion model abbreviation) used to convert "
                                                "between ITRF and plate-fixed velocities, e.g. EURA, NOAM, PCFC. "
                                                "Not set: the plate of a '<PLATE>-fixed' reference_frame (or of "
                                                "plate-fixed horizontal grids), else EURA.")
    plate_model: Literal["ITRF2014", "ITRF2020"] = Field(
        "ITRF2014", description="Plate motion model of PROJ used for the plate rotation.")
    horizontal_only: bool = Field(
        False, description="Treat the GNSS as horizontal-only (no vertical component): referencing then assumes "
                           "no long-wavelength vertical motion. Held-out stations keep their verticals (they "
                           "validate the map). Set automatically when no station of the file has a vu value.")

    @model_validator(mode="after")
    def _plate_of_a_fixed_frame(self):
        # velocities fixed to one plate converted with another's rotation would be refused stages later
        fixed = _fixed_plate(self.reference_frame)
        if self.plate is not None and fixed is not None and self.plate.strip().upper() != fixed:
            raise ValueError(f"plate {self.plate!r} disagrees with reference_frame {self.reference_frame!r}: set "
                             f"plate = {fixed!r}, or leave it unset to follow the frame")
        return self

    def plate_for(self, *frames: str | None) -> str:
        """The plate of the plate-fixed conversions: ``plate`` when set, else the plate of the first
        ``'<PLATE>-fixed'`` among the GNSS reference frame and ``frames`` (e.g. the horizontal grids'), else
        EURA."""
        if self.plate is not None:
            return self.plate.strip().upper()
        for name in (self.reference_frame, *frames):
            fixed = _fixed_plate(name)
            if fixed is not None:
                return fixed
        return "EURA"


def _fixed_plate(frame: str | None) -> str | None:
    """The plate code of a ``'<PLATE>-fixed'`` frame name (upper case), else None."""
    m = re.fullmatch(r"\s*([A-Za-z]{4})[-_ ]?fixed\s*", str(frame or ""), re.I)
    return m.group(1).upper() if m else None


class NetworkConfig(_Section):
    enabled: bool = Field(True, description="Run the network adjustment over overlaps and GNSS ties after the "
                                            "per-frame adjustment.")
    order: Literal[0, 1, 2] = Field(2, description="Per-frame network correction: 0 offset, 1 offset + ramp, 2 "
                                                   "quadratic.")
    pairs: Literal["same-orbit", "all"] = Field(
        "all", description="Overlaps tied in the network: 'all' (same orbit direction, and ascending with "
                           "descending: after the GNSS horizontal field is removed both see the same vertical "
                           "motion, and on slow ground (max_rate_mm_yr) the horizontal motion the field misses is "
                           "small) or 'same-orbit' (ascending with ascending, descending with descending only).")
    correlation_km: float = Field(10.0, gt=0, description="Correlation length of overlap differences (km): sets how "
                                                          "many independent observations an overlap is worth.")
    sigma_floor_mm_yr: float = Field(1.0, ge=0, description="Added in quadrature to every observation sigma "
                                                            "(mm/yr).")
    prior_sigma_mm_yr: float = Field(20.0, gt=0, description="Prior sigma of the correction parameters (mm/yr) of "
                                                             "frames without a cross-validated per-frame GNSS "
                                                             "fit (no station, or a fit with no CV RMSE), and of "
                                                             "every frame with prior_from_cv = false.")
    prior_from_cv: bool = Field(True, description="Use each frame's cross-validated RMSE of its GNSS fit as the prior "
                                                  "sigma of its correction: well-fitted frames stay put, poorly "
                                                  "fitted ones are corrected by their overlaps.")
    spline_spacing_km: float = Field(30.0, ge=0, description="Knot spacing (km) of a cubic B-spline surface added "
                                                             "to each frame's polynomial correction, with the frame's "
                                                             "overlap misfit sigma as its prior: removes what the "
                                                             "overlaps see beyond a polynomial (ionosphere). 0 = off.")
    misfit_weights: bool = Field(True, description="Weight each frame in the merge by its misfit sigma estimated from "
                                                   "the overlap residuals (and its CV RMSE, the larger), so that a "
                                                   "frame its neighbours disagree with is outweighed by them.")
    max_rate_mm_yr: float = Field(20.0, ge=0, description="Overlap pixels where the two frames' mean vertical-"
                                                         "equivalent rate exceeds this (mm/yr) are not compared: "
                                                         "fast-deforming ground also moves horizontally, which the "
                                                         "GNSS field misses. 0 = compare everywhere. A pair "
                                                         "with fewer than min_overlap_pixels such slower pixels "
                                                         "is compared on all of them (listed in the summary's "
                                                         "network.pairs_compared_on_fast_ground).")
    huber_k: float = Field(3.0, gt=0, description="Huber threshold of the robust reweighting, in robust sigmas.")
    max_samples_per_overlap: int = Field(1500, ge=10, description="Overlap pixels sampled per frame pair.")
    min_overlap_pixels: int = Field(10, ge=1, description="Pairs sharing fewer valid pixels are not tied.")


class MosaicConfig(_Section):
    decompose_up_east: bool = Field(True, description="Where ascending and descending overlap, solve up and east "
                                                      "per pixel (north from GNSS) instead of removing the GNSS "
                                                      "horizontal field from each look direction.")
    east_prior: bool = Field(True, description="In the up/east decomposition, use the GNSS east velocity as one "
                                               "more observation (sigma: the field's own sigma and its leave-one-"
                                               "out RMSE in quadrature), so that one poorly corrected look "
                                               "direction cannot put its error into up and east unchecked.")
    resolution: float | None = Field(None, gt=0, description="Target pixel spacing in target-CRS units (default: "
                                                             "the finest input spacing).")
    crs: str = Field("EPSG:4326", description="Target CRS of the mosaic.")
    bounds: tuple[float, float, float, float] | None = Field(
        None, description="Target bounds (left, bottom, right, top) in target-CRS units (default: union of frames).")
    feather_km: float = Field(10.0, ge=0, description="Width of the feathered frame edges in the merge (km).")
    tile_size: int = Field(2048, ge=64, description="Mosaic tile size in pixels (bounds memory on large grids).")


class TimeSeriesConfig(_Section):
    enabled: bool = Field(True, description="Process displacement time series (cum.h5 / timeseries.h5) when frames "
                                            "carry them.")
    epoch_ramps: bool = Field(False, description="Remove a per-epoch plane fitted on far-field pixels to the "
                                                 "departure from the adjusted linear motion (off by default: where "
                                                 "slow regional subsidence shares the aquifer's non-linear history, "
                                                 "the planes take part of it out).")
    far_field_max_rate_mm_yr: float = Field(5.0, gt=0, description="Pixels whose adjusted vertical-equivalent rate is "
                                                                   "within ± this value are far field (ramp fit).")
    chunk_pixels: int = Field(262144, ge=1024, description="Pixels per block of the per-pixel temporal fits, at "
                                                           "most: a block holds all epochs of its pixels in at "
                                                           "most 8 MiB of float32, so above 8 epochs the epochs "
                                                           "set the block (250 epochs: 8388 pixels).")


class ParallelConfig(_Section):
    workers: int | Literal["auto"] = Field(
        "auto", description="Dask workers for the per-frame stage on a local cluster (0: run in this process; "
                            "'auto': one per core, as many as the free memory holds, on machines with at least "
                            "4 cores when at least 4 frames are to be adjusted, else in this process).")
    scheduler: str | None = Field(None, description="Address of an existing Dask scheduler (tcp://HOST:PORT); "
                                                    "overrides workers.")
    cluster: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Kind of local cluster: 'cpu' (worker processes; on the GPU backend they share the "
                            "default GPU), 'cuda' (dask-cuda's LocalCUDACluster: one worker per GPU; workers "
                            "'auto' uses every visible GPU, a count the first ones), or 'auto' ('cuda' on the GPU "
                            "backend when several GPUs are visible, dask-cuda is installed and the workers fit "
                            "one per GPU, else 'cpu').")
    worker_memory: str = Field("auto", description="Memory limit per local worker (e.g. '4GiB'); 'auto' shares "
                                                   "the machine's memory between the workers. A limit also caps "
                                                   "the 'auto' worker count to the workers the free memory holds.")

    @field_validator("worker_memory")
    @classmethod
    def _memory_size(cls, v: str) -> str:
        if v != "auto":
            from dask.utils import parse_bytes

            try:
                if parse_bytes(v) <= 0:
                    raise ValueError
            except (ValueError, TypeError):
                raise ValueError(f"worker_memory must be 'auto' or a size such as '4GiB' or '3.5GB', not {v!r}") \
                    from None
        return v

    @field_validator("workers")
    @classmethod
    def _non_negative(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("workers must be 0 (this process), a positive count or 'auto'")
        return v


class AnalysisConfig(_Section):
    subsidence_threshold_mm_yr: float = Field(
        20.0, gt=0, description="Subsidence rate (positive, mm/yr) above which a pixel counts as subsiding.")
    groundwater_split_date: _dt.date = Field(
        _dt.date(2021, 1, 1), description="Date splitting the groundwater-loss periods (before / from this date).")
    inelastic_fraction: float = Field(
        1.0, ge=0, le=1, description="Fraction of compaction that is inelastic (permanent); groundwater storage "
                                     "loss = inelastic_fraction × compaction volume.")


class OutputConfig(_Section):
    cog: bool = Field(True, description="Write rasters as Cloud-Optimized GeoTIFF (tiled, with overviews); false: "
                                        "plain tiled GeoTIFF, no overviews.")
    netcdf: bool = Field(False, description="Also write the gridded velocity products (vertical, east and their "
                                            "sigmas, mm/yr) as one NetCDF file, velocity.nc.")
    zarr: bool = Field(False, description="Also write the vertical displacement cube of a time-series run as "
                                          "Zarr, vertical_displacement.zarr (beside the NetCDF cube).")
    compress_level: int = Field(1, ge=1, le=9, description="DEFLATE/zlib level of the GeoTIFF and NetCDF "
                                                           "products: 1 writes fastest, 9 smallest (GDAL's "
                                                           "default is 6; the values are the same).")
    report: bool = Field(True, description="Write report.html and PNG figures.")


class GiaConfig(_Section):
    """Complete configuration of a ``gia run``."""

    backend: Literal["auto", "numpy", "cupy"] = Field(
        "auto", description="Array backend: 'auto' (GPU when present), 'numpy' (CPU) or 'cupy' (GPU; an error "
                            "when no GPU is usable — never a silent CPU fall-back).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging verbosity.")
    gnss: GnssConfig = Field(default_factory=GnssConfig, description="GNSS input and reference frames.")
    adjust: AdjustConfig = Field(default_factory=AdjustConfig, description="Per-frame adjustment to GNSS: candidate "
                                                                         "models, cross-validation, selection.")
    network: NetworkConfig = Field(default_factory=NetworkConfig, description="Network adjustment over overlaps and "
                                                                              "GNSS ties.")
    mosaic: MosaicConfig = Field(default_factory=MosaicConfig, description="Target grid and merge.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Dask scale-out.")
    timeseries: TimeSeriesConfig = Field(default_factory=TimeSeriesConfig, description="Displacement time series.")
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig, description="Subsidence and groundwater "
                                                                                 "analysis.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Products written.")

    @field_validator("backend", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


def _toml_loads(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> GiaConfig:
    """Read a TOML configuration (all fields optional) and apply ``overrides`` (dotted keys allowed)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("Configuration file not found.", file=p, fix="give an existing TOML file, or create "
                              "one with `gia config --default > gia.toml`")
        try:
            data = _toml_loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError("Configuration file is not UTF-8 text.", file=p, fix="save it as UTF-8 TOML") from exc
        except Exception as exc:  # tomllib.TOMLDecodeError
            raise ConfigError(f"Configuration file is not valid TOML: {exc}.", file=p,
                              fix="check the syntax near the reported line") from exc
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return GiaConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        fix = ("remove or correct this key (see `gia config --default` for the valid keys)"
               if first["type"] == "extra_forbidden" else f"give a valid value: {first['msg']}")
        raise ConfigError(f"Invalid configuration value ({len(exc.errors())} problem(s)); first: {first['msg']}.",
                          file=path, field=field, fix=fix) from exc


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, _dt.date):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # inline table
        return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"
    if v is None:
        return '""'
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_to_toml(cfg: BaseModel, *, comments: bool = True) -> str:
    """Serialise a configuration as TOML, with each field's description as a comment."""
    lines: list[str] = []

    def emit(model: BaseModel, prefix: str) -> None:
        sections = []
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                sections.append((name, info, value))
                continue
            if value is None:
                if comments and info.description:
                    lines.append(f"# {info.description}")
                lines.append(f"# {name} =   (not set)")
                continue
            if comments and info.description:
                lines.append(f"# {info.description}")
            lines.append(f"{name} = {_toml_value(value)}")
        for name, info, value in sections:
            lines.append("")
            if comments and info.description:
                lines.append(f"# {info.description}")
            lines.append(f"[{prefix}{name}]")
            emit(value, f"{prefix}{name}.")

    emit(cfg, "")
    return "\n".join(lines) + "\n"


def default_config_toml() -> str:
    """The default configuration as commented TOML (what ``gia config --default`` prints)."""
    header = "# gpu_insar_adjust configuration (TOML). Every key is optional; these are the defaults.\n"
    return header + config_to_toml(GiaConfig())
