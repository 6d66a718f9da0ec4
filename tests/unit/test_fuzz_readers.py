"""Property-based tests of the readers on hostile files: only GiaError may escape, nothing hangs or balloons.

Every reader is fed random bytes, truncated files, empty files, non-finite and huge values. The contract: a
reader returns, or raises a :class:`gpu_insar_adjust.errors.GiaError` (never a bare ValueError, OSError, ...);
it finishes within the hypothesis deadline; its traced Python/NumPy allocations stay far below
:data:`PEAK_LIMIT` for these tiny inputs. The smallest inputs that once broke that contract are kept as regular
cases at the end of the file.
"""

from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from gpu_insar_adjust.errors import GiaError
from gpu_insar_adjust.io.frames import open_frame
from gpu_insar_adjust.io.gnss import read_gnss, read_position_series

PEAK_LIMIT = 200 * 2**20  # bytes; a reader given a few kB must not allocate anywhere near this
FUZZ = settings(max_examples=50, deadline=5000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
_counter = itertools.count()
_WORK = Path(tempfile.mkdtemp(prefix="gia-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(_WORK, ignore_errors=True)


def _fresh_dir(name: str = "frame") -> Path:
    d = _WORK / f"{next(_counter):05d}" / name
    d.mkdir(parents=True)
    return d


def _only_gia_errors(fn, *args, **kwargs):
    """Call ``fn``; any exception must be a GiaError; traced peak memory must stay below PEAK_LIMIT."""
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                assert isinstance(exc, GiaError), f"{type(exc).__name__} escaped: {exc}"
                result = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"peak traced allocation {peak / 2**20:.0f} MiB for a tiny input"
    return result


# --------------------------------------------------------------------------------------------------------------
# A tiny valid LiCSBAS frame (8 x 10 pixels, EPSG:4326)
# --------------------------------------------------------------------------------------------------------------
SHAPE = (8, 10)
TRANSFORM = from_origin(116.0, 39.0, 0.01, 0.01)


def _write_tif(path: Path, data: np.ndarray, crs="EPSG:4326") -> None:
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[0], width=data.shape[1], count=1,
                       dtype="float32", crs=crs, transform=TRANSFORM) as dst:
        dst.write(data.astype(np.float32), 1)


def _licsbas_frame(vel: np.ndarray | None = None) -> Path:
    d = _fresh_dir("001A_00001_000000")
    rng = np.random.default_rng(0)
    _write_tif(d / "vel.geo.tif", rng.normal(0, 5, SHAPE) if vel is None else vel)
    e, n = np.full(SHAPE, -0.6), np.full(SHAPE, -0.1)
    for name, comp in (("E", e), ("N", n), ("U", np.sqrt(1 - e**2 - n**2))):
        _write_tif(d / f"{name}.geo.tif", comp)
    return d


_VALID = _licsbas_frame()
_VALID_VEL = (_VALID / "vel.geo.tif").read_bytes()


def _frame_with_velocity_bytes(data: bytes) -> Path:
    d = _fresh_dir("001A_00001_000000")
    for f in _VALID.iterdir():
        shutil.copy(f, d / f.name)
    (d / "vel.geo.tif").write_bytes(data)
    return d


def test_valid_tiny_frame_opens():
    ds = open_frame(_VALID)
    assert ds["los_velocity"].shape == SHAPE and ds.attrs["orbit"] == "ascending"


@FUZZ
@given(data=st.binary(max_size=4096))
def test_open_frame_random_bytes(data):
    result = _only_gia_errors(open_frame, _frame_with_velocity_bytes(data))
    assert isinstance(result, GiaError)  # random bytes are never a GeoTIFF
    assert result.file is not None and result.fix


def test_open_frame_empty_file():
    result = _only_gia_errors(open_frame, _frame_with_velocity_bytes(b""))
    assert isinstance(result, GiaError) and Path(result.file).name == "vel.geo.tif"


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(_VALID_VEL) - 1))
def test_open_frame_truncated_geotiff(cut):
    result = _only_gia_errors(open_frame, _frame_with_velocity_bytes(_VALID_VEL[:cut]))
    assert isinstance(result, GiaError), f"a GeoTIFF cut to {cut} of {len(_VALID_VEL)} bytes opened"


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(_VALID_VEL) - 1), st.integers(0, 255)), min_size=1,
                      max_size=8))
def test_open_frame_corrupted_bytes(flips):
    data = bytearray(_VALID_VEL)
    for pos, val in flips:
        data[pos] = val
    _only_gia_errors(open_frame, _frame_with_velocity_bytes(bytes(data)))


@FUZZ
@given(fill=st.sampled_from([math.nan, math.inf, -math.inf, 3.0e38, -3.0e38, 0.0]),
       fraction=st.sampled_from([1.0, 0.5]))
def test_open_frame_non_finite_or_extreme_velocity(fill, fraction):
    vel = np.random.default_rng(1).normal(0, 5, SHAPE)
    vel.ravel()[: int(fraction * vel.size)] = fill
    result = _only_gia_errors(open_frame, _licsbas_frame(vel))
    if not isinstance(result, GiaError):
        # Opened: the values must come through unchanged (never silently turned into NaN or zero).
        got = result["los_velocity"].values
        np.testing.assert_array_equal(got, vel.astype(np.float32))


def test_check_inputs_flags_all_nan_and_all_inf_frames():
    from gpu_insar_adjust.checks import check_inputs

    for fill in (math.nan, math.inf):
        frame = _licsbas_frame(np.full(SHAPE, fill))
        report = check_inputs(frame.parent)
        (err,) = report.errors
        assert err["field"] == "los_velocity" and Path(err["file"]).name == "vel.geo.tif"


# --------------------------------------------------------------------------------------------------------------
# MintPy HDF5
# --------------------------------------------------------------------------------------------------------------
_MINTPY_ATTRS = {"X_FIRST": "116.0", "Y_FIRST": "39.0", "X_STEP": "0.01", "Y_STEP": "-0.01", "WIDTH": "10",
                 "LENGTH": "8", "HEADING": "-168.0", "UNIT": "m/year", "CENTER_INCIDENCE_ANGLE": "37.0"}


def _mintpy_frame(attrs: dict | None = None, raw: bytes | None = None) -> Path:
    d = _fresh_dir("mintpy")
    path = d / "velocity.h5"
    if raw is not None:
        path.write_bytes(raw)
        return d
    with h5py.File(path, "w") as h5:
        h5["velocity"] = np.zeros(SHAPE, np.float32)
        h5.attrs.update({**_MINTPY_ATTRS, **(attrs or {})})
    return d


_VALID_H5 = (_mintpy_frame() / "velocity.h5").read_bytes()


def test_valid_tiny_mintpy_opens():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_frame(_mintpy_frame())
    assert ds["los_velocity"].shape == SHAPE and ds.attrs["source"] == "mintpy"


@FUZZ
@given(data=st.binary(max_size=4096))
def test_mintpy_random_bytes(data):
    result = _only_gia_errors(open_frame, _mintpy_frame(raw=data))
    assert isinstance(result, GiaError) and Path(result.file).name == "velocity.h5"


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(_VALID_H5) - 1))
def test_mintpy_truncated_hdf5(cut):
    result = _only_gia_errors(open_frame, _mintpy_frame(raw=_VALID_H5[:cut]))
    assert isinstance(result, GiaError)


@FUZZ
@given(key=st.sampled_from(["WIDTH", "LENGTH"]),
       value=st.one_of(st.integers(min_value=0, max_value=10**15), st.just(10**9)))
def test_mintpy_attributes_claiming_huge_dimensions(key, value):
    # The dataset is 8 x 10: an attribute claiming 10**9 columns must be refused, not allocated.
    result = _only_gia_errors(open_frame, _mintpy_frame({key: str(value)}))
    if value != dict(WIDTH=10, LENGTH=8)[key]:
        assert isinstance(result, GiaError) and result.field == key


@FUZZ
@given(key=st.sampled_from(["X_FIRST", "Y_FIRST", "X_STEP", "Y_STEP", "CENTER_INCIDENCE_ANGLE", "HEADING"]),
       value=st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_mintpy_numeric_attributes(key, value):
    _only_gia_errors(open_frame, _mintpy_frame({key: repr(value)}))


# --------------------------------------------------------------------------------------------------------------
# GNSS velocity tables and position series
# --------------------------------------------------------------------------------------------------------------
HEADER = "station,lon,lat,ve,vn,vu,se,sn,su\n"
GNSS_READERS = [read_gnss, read_position_series]


def _gnss_file(data: bytes, suffix: str = ".csv") -> Path:
    p = _fresh_dir("gnss") / f"stations{suffix}"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("reader", GNSS_READERS, ids=lambda f: f.__name__)
@FUZZ
@given(data=st.binary(max_size=2048))
def test_gnss_random_bytes(reader, data):
    _only_gia_errors(reader, _gnss_file(data))


@pytest.mark.parametrize("reader", GNSS_READERS, ids=lambda f: f.__name__)
@FUZZ
@given(text=st.text(max_size=1000))
def test_gnss_random_text(reader, text):
    _only_gia_errors(reader, _gnss_file(text.encode("utf-8", errors="surrogatepass")))


@pytest.mark.parametrize("reader", GNSS_READERS, ids=lambda f: f.__name__)
def test_gnss_empty_file(reader):
    result = _only_gia_errors(reader, _gnss_file(b""))
    assert isinstance(result, GiaError) and "empty" in result.message


@FUZZ
@given(junk=st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b)))
def test_gnss_csv_with_non_utf8_bytes(junk):
    body = HEADER.encode() + b"AB" + junk + b",116.1,39.2,1,2,3,0.5,0.5,1\n"
    result = _only_gia_errors(read_gnss, _gnss_file(body))
    if isinstance(result, GiaError):
        assert result.field is not None and result.fix


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "9" * 400, "1e-400", "", " ", "0x10",
                     "1,5", "١٢"]),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
)


@FUZZ
@given(rows=st.lists(st.tuples(st.sampled_from(["A", "B", "C", "a"]), *([_NUMBER_TEXT] * 8)), min_size=1,
                     max_size=6))
def test_gnss_csv_non_finite_and_huge_values(rows):
    body = HEADER + "".join(",".join(r).replace("\n", " ") + "\n" for r in rows)
    result = _only_gia_errors(read_gnss, _gnss_file(body.encode()))
    if not isinstance(result, GiaError):
        # Accepted: every required value finite, one row per station.
        for col in ("lon", "lat", "ve", "vn", "se", "sn"):
            assert np.all(np.isfinite(result[col].to_numpy(float)))
        assert result["station"].str.upper().is_unique


_FLOAT = st.one_of(st.floats(min_value=-1e12, max_value=1e12), st.just(math.nan), st.just(1e300))
_NEU_HEADER = "# 4-character ID: ABCD\n# NEU Reference position :    40.0  116.0  10.0\n"


@pytest.mark.parametrize("reader", GNSS_READERS, ids=lambda f: f.__name__)
@FUZZ
@given(rows=st.lists(st.tuples(_FLOAT, st.integers(1000, 9999), st.integers(-5, 400), *([_FLOAT] * 6)),
                    min_size=1, max_size=14))
def test_neu_random_numbers(reader, rows):
    # Years keep four digits here: five-digit years are tested on their own (test_neu_five_digit_year_is_a_gnss_error).
    body = _NEU_HEADER + "".join(" ".join(repr(v) for v in row) + "\n" for row in rows)
    _only_gia_errors(reader, _gnss_file(body.encode(), suffix=".neu"))


@pytest.mark.parametrize("reader", GNSS_READERS, ids=lambda f: f.__name__)
@FUZZ
@given(values=st.lists(st.lists(_FLOAT, min_size=21, max_size=21), min_size=1, max_size=12))
def test_tenv3_random_numbers(reader, values):
    lines = []
    for row in values:
        nums = [repr(v) for v in row]
        lines.append(" ".join(["ABCD", "10JAN01", *nums]))
    _only_gia_errors(reader, _gnss_file(("\n".join(lines) + "\n").encode(), suffix=".tenv3"))


# --------------------------------------------------------------------------------------------------------------
# Inputs that once let a non-GiaError escape (found by the property tests above); each is now a GiaError.
# --------------------------------------------------------------------------------------------------------------
def _raises_only_gia(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn(*args)
        except GiaError:
            pass


@pytest.mark.parametrize("attrs", [
    {"WIDTH": "abc"}, {"WIDTH": "nan"}, {"LENGTH": "inf"}, {"X_FIRST": "abc"}, {"HEADING": "abc"},
    {"EPSG": "999999"}, {"UTM_ZONE": "ZZ"}, {"CENTER_INCIDENCE_ANGLE": "abc"},
    {"CENTER_INCIDENCE_ANGLE": None, "STARTING_RANGE": "1e9", "RANGE_PIXEL_SIZE": "1", "EARTH_RADIUS": "6.4e6",
     "HEIGHT": "7e5"},
    pytest.param({"UNIT": "mm/yr"}, id="control-valid"),
])
def test_bad_mintpy_attributes_give_gia_errors(attrs):
    attrs = dict(attrs)
    d = _mintpy_frame({k: v for k, v in attrs.items() if v is not None})
    if attrs.get("CENTER_INCIDENCE_ANGLE", "") is None:
        with h5py.File(d / "velocity.h5", "a") as h5:
            del h5.attrs["CENTER_INCIDENCE_ANGLE"]
    _raises_only_gia(open_frame, d)


def _neu_series(last_year: float) -> bytes:
    """30 noisy daily-ish epochs in 2000-2005, a constant up component, and one epoch at ``last_year``."""
    rng = np.random.default_rng(0)
    years = list(2000 + np.sort(rng.uniform(0, 5, 30))) + [last_year]
    rows = [f"{y:.4f} {int(y)} {1 + i} {rng.normal(0, .003)} {rng.normal(0, .003)} 0.001 0.001 0.001 0.002"
            for i, y in enumerate(years)]
    return (_NEU_HEADER + "\n".join(rows) + "\n").encode()


def test_neu_with_a_constant_component_and_a_far_epoch():
    _raises_only_gia(read_gnss, _gnss_file(_neu_series(3000.0), suffix=".neu"))


def test_neu_five_digit_year_is_a_gnss_error():
    _raises_only_gia(read_position_series, _gnss_file(_neu_series(20000.0), suffix=".neu"))


# --------------------------------------------------------------------------------------------------------------
# Headers declaring huge dimensions: refused from the header, never allocated
# --------------------------------------------------------------------------------------------------------------
HUGE = 200_000  # 200000 x 200000 float32 = 149 GiB to read; kept tiny on disk as a sparse file


def _sparse_huge_tif(path: Path) -> None:
    """A valid, georeferenced GeoTIFF header declaring HUGE x HUGE float32 pixels, with no tile written."""
    with rasterio.open(path, "w", driver="GTiff", height=HUGE, width=HUGE, count=1, dtype="float32",
                       crs="EPSG:4326", transform=from_origin(116.0, 39.0, 1e-5, 1e-5), tiled=True,
                       blockxsize=4096, blockysize=4096, SPARSE_OK="TRUE"):
        pass


def test_geotiff_header_claiming_huge_dimensions_is_refused():
    from gpu_insar_adjust.io import frames as frames_mod

    d = _fresh_dir("001A_00001_000000")
    for f in _VALID.iterdir():
        shutil.copy(f, d / f.name)
    _sparse_huge_tif(d / "vel.geo.tif")
    assert (d / "vel.geo.tif").stat().st_size < 1_000_000  # the hostile file itself is tiny
    available = frames_mod._available_memory()
    if available is not None and available > 2 * 8 * HUGE**2:
        pytest.skip("this machine could actually hold the declared raster")
    result = _only_gia_errors(open_frame, d)
    assert isinstance(result, GiaError) and type(result).__name__ == "FrameError"
    assert Path(result.file).name == "vel.geo.tif" and result.field == "width/height"
    assert f"{HUGE} x {HUGE}" in result.message and "GiB" in result.message
    assert "crop or multilook" in result.fix and "header" in result.fix
    assert f"{HUGE * HUGE * 8 / 2**30:.1f} GiB" in result.message  # float32 read + float32 copy


def test_mintpy_dataset_declaring_huge_dimensions_is_refused():
    d = _fresh_dir("mintpy")
    with h5py.File(d / "velocity.h5", "w") as h5:
        # chunked and never written: HDF5 stores no data, so the file is a few kB
        h5.create_dataset("velocity", shape=(HUGE, HUGE), dtype="float32", chunks=(1024, 1024))
        h5.attrs.update({**_MINTPY_ATTRS, "WIDTH": str(HUGE), "LENGTH": str(HUGE)})
    assert (d / "velocity.h5").stat().st_size < 100_000
    result = _only_gia_errors(open_frame, d)
    assert isinstance(result, GiaError) and Path(result.file).name == "velocity.h5"
    assert result.field == "LENGTH/WIDTH" and "'velocity'" in result.message and "multilook" in result.fix


# --------------------------------------------------------------------------------------------------------------
# Time-series cubes (open_cube): random bytes, truncation, wrong dimensions
# --------------------------------------------------------------------------------------------------------------
NT = 4


def _cum_h5(path: Path, *, cum=None, imdates=None, **scalars) -> Path:
    with h5py.File(path, "w") as h5:
        h5["cum"] = np.random.default_rng(0).normal(0, 5, (NT, *SHAPE)).astype(np.float32) if cum is None else cum
        h5["imdates"] = np.array([20200101, 20200113, 20200125, 20200206], np.int32) if imdates is None \
            else imdates
        for name, value in {"corner_lat": 39.0, "corner_lon": 116.0, "post_lat": -0.01, "post_lon": 0.01,
                            **scalars}.items():
            if value is not None:
                h5[name] = value
    return path


_VALID_CUM = _cum_h5(_fresh_dir("cube") / "cum.h5").read_bytes()


def _open_and_read_cube(path: Path):
    from gpu_insar_adjust.io.timeseries import open_cube

    cube = open_cube(path)
    return cube.values  # reading every block must obey the same contract


def _cube_file(raw: bytes) -> Path:
    p = _fresh_dir("cube") / "cum.h5"
    p.write_bytes(raw)
    return p


def test_valid_tiny_cube_opens():
    values = _open_and_read_cube(_cube_file(_VALID_CUM))
    assert values.shape == (NT, *SHAPE) and values.dtype == np.float32 and np.isfinite(values).all()


@FUZZ
@given(data=st.binary(max_size=4096))
def test_open_cube_random_bytes(data):
    result = _only_gia_errors(_open_and_read_cube, _cube_file(data))
    assert isinstance(result, GiaError) and Path(result.file).name == "cum.h5" and result.fix


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(_VALID_CUM) - 1))
def test_open_cube_truncated_cum_h5(cut):
    result = _only_gia_errors(_open_and_read_cube, _cube_file(_VALID_CUM[:cut]))
    assert isinstance(result, GiaError), f"a cum.h5 cut to {cut} of {len(_VALID_CUM)} bytes opened"


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(_VALID_CUM) - 1), st.integers(0, 255)), min_size=1,
                      max_size=8))
def test_open_cube_corrupted_bytes(flips):
    data = bytearray(_VALID_CUM)
    for pos, val in flips:
        data[pos] = val
    _only_gia_errors(_open_and_read_cube, _cube_file(bytes(data)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(cum=np.zeros(SHAPE, np.float32)), "cum"),                              # 2-D, no time axis
    (dict(cum=np.zeros((NT, 2, *SHAPE), np.float32)), "cum"),                    # 4-D
    (dict(cum=np.zeros((NT + 1, *SHAPE), np.float32)), "imdates"),               # one layer more than dates
    (dict(imdates=np.array([[20200101, 20200113], [20200125, 20200206]])), "imdates"),  # 2-D dates
    (dict(cum=np.zeros((NT, 0, 10), np.float32)), "cum"),                        # no pixel
    (dict(post_lat=0.0), "post_lat"),                                            # degenerate grid
    (dict(corner_lon=np.array([], np.float64)), "corner_lon"),                   # empty scalar
    (dict(corner_lat=None), "corner_lat"),                                       # missing
    (dict(imdates=np.array([b"2020-01-01", b"x", b"y", b"z"])), "imdates"),     # not YYYYMMDD
])
def test_open_cube_wrong_dims(kwargs, field):
    path = _cum_h5(_fresh_dir("cube") / "cum.h5", **kwargs)
    result = _only_gia_errors(_open_and_read_cube, path)
    assert isinstance(result, GiaError) and type(result).__name__ == "TimeSeriesError"
    assert result.field == field and Path(result.file).name == "cum.h5" and result.fix
