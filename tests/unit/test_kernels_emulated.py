"""The CUDA paths (kernels/*.cu and their host code in kernels/cuda.py) run on the CPU, against the references.

Every thread of every block runs (tests/cuda_emulator), so indexing, unrolled loops and their tails, warp
shuffles, block reductions and the kernels' argument types are checked on every machine with g++, not only
where a GPU is. Speed is not measured here; the GPU tests in test_kernels.py run the same code on a device.
"""

from __future__ import annotations

import importlib
import sys

import cuda_emulator
import numpy as np
import pytest
from conftest import assert_matches_reference

import gpu_insar_adjust.kernels as kernels_pkg
from gpu_insar_adjust.kernels import reference as ref

_SWAPPED = ("cupy", "gpu_insar_adjust.kernels.cuda")


@pytest.fixture(scope="module")
def emu():
    """``(kernels.cuda imported over the NumPy-backed cupy, that cupy)``; the real modules come back after."""
    reason = cuda_emulator.available()
    if reason:
        pytest.skip(f"CUDA kernels cannot be emulated here: {reason}")
    saved = {k: sys.modules.get(k) for k in _SWAPPED}
    saved_attr = kernels_pkg.__dict__.get("cuda")
    fake = cuda_emulator.fake_cupy(n_multiprocessors=2)
    sys.modules["cupy"] = fake
    sys.modules.pop("gpu_insar_adjust.kernels.cuda", None)
    try:
        yield importlib.import_module("gpu_insar_adjust.kernels.cuda"), fake
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        if saved_attr is None:
            kernels_pkg.__dict__.pop("cuda", None)
        else:
            kernels_pkg.cuda = saved_attr


def _grid_cube(T=6, rows=21, cols=131, seed=3):
    """(T, rows * cols) float32 on a UTM meshgrid: quadratic ramps, noise, per-epoch NaN blocks, scattered NaN,
    one epoch entirely missing (undetermined), one row missing in every epoch. 131 columns: four unrolled
    trips of a warp (128) and a tail of 3; 21 rows: three blocks of 8 warps, the last one partly idle."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(4.3e5 + 90.0 * np.arange(cols), 4.1e6 - 90.0 * np.arange(rows))
    truth = rng.normal(0, 1, (T, 6)) * np.array([5, 1e-3, 1e-3, 1e-7, 1e-7, 1e-7])
    cube = np.stack([ref.eval_polynomial_surface(c, x, y, 2) for c in truth]).astype(np.float32)
    cube += rng.normal(0, 0.5, cube.shape).astype(np.float32)
    bw = min(20, cols // 2)
    for t in range(T):
        r0, c0 = rng.integers(0, rows - 6), rng.integers(0, cols - bw)
        cube[t, r0:r0 + 6, c0:c0 + bw] = np.nan
    cube[rng.random(cube.shape) < 0.03] = np.nan
    cube[:, 5] = np.nan
    if T > 3:
        cube[3] = np.nan
    return rng, cube.reshape(T, -1), x.ravel(), y.ravel()


def _surfaces_match(got, want, x, y, order):
    # float64 sums in another order than lstsq: the fitted surfaces agree to 1e-9 of their size
    assert_matches_reference(ref.eval_polynomial_surface(np.asarray(got), x, y, order),
                             ref.eval_polynomial_surface(want, x, y, order), rtol=1e-9)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_grid_ramps_take_the_row_kernels_and_match_the_reference(emu, order):
    cuda, cp = emu
    _, cube, x, y = _grid_cube()
    cp.launches.clear()
    got = cuda.fit_epoch_ramps(cp.asarray(cube), cp.asarray(x), cp.asarray(y), order=order)
    assert cp.launches == ["ramp_row_partials", "ramp_row_reduce"]
    want = ref.fit_epoch_ramps(cube, x, y, order=order)
    assert np.all(np.isnan(got[3])) and np.all(np.isfinite(np.delete(got, 3, axis=0)))
    _surfaces_match(np.delete(got, 3, 0), np.delete(want, 3, 0), x, y, order)
    again = cuda.fit_epoch_ramps(cp.asarray(cube), cp.asarray(x), cp.asarray(y), order=order)
    assert np.array_equal(got, again, equal_nan=True)  # fixed summation order: bit for bit

    coeffs = np.nan_to_num(want)
    cp.launches.clear()
    sub = cuda.subtract_epoch_ramps(cp.asarray(cube), cp.asarray(coeffs), cp.asarray(x), cp.asarray(y), order)
    assert cp.launches == ["ramp_grid_subtract"]
    assert_matches_reference(sub, ref.subtract_epoch_ramps(cube, coeffs, x, y, order), dtype="float32", atol=2e-6)
    inplace = cp.asarray(cube)
    res = cuda.subtract_epoch_ramps(inplace, cp.asarray(coeffs), cp.asarray(x), cp.asarray(y), order, out=inplace)
    assert res is inplace and np.array_equal(inplace, sub, equal_nan=True)


def test_grid_and_pixel_kernels_agree(emu):
    """The same pixels as a grid (row kernels) and shuffled (pixel kernels): the same ramps and residuals."""
    cuda, cp = emu
    rng, cube, x, y = _grid_cube(T=4, rows=11, cols=67)
    cube[3] = cube[2]
    perm = rng.permutation(x.size)
    cp.launches.clear()
    on_grid = cuda.fit_epoch_ramps(cp.asarray(cube), cp.asarray(x), cp.asarray(y), order=2)
    shuffled = cuda.fit_epoch_ramps(cp.asarray(cube[:, perm]), cp.asarray(x[perm]), cp.asarray(y[perm]), order=2)
    assert cp.launches == ["ramp_row_partials", "ramp_row_reduce", "ramp_moments"]
    _surfaces_match(on_grid, np.asarray(shuffled), x, y, 2)
    a = cuda.subtract_epoch_ramps(cp.asarray(cube), on_grid, cp.asarray(x), cp.asarray(y), 2)
    b = cuda.subtract_epoch_ramps(cp.asarray(cube[:, perm]), on_grid, cp.asarray(x[perm]), cp.asarray(y[perm]), 2)
    assert cp.launches[-2:] == ["ramp_grid_subtract", "ramp_subtract"]
    assert_matches_reference(b, np.asarray(a)[:, perm], dtype="float32", atol=2e-6)


@pytest.mark.parametrize("grid", [True, False])
def test_subtraction_of_non_contiguous_cubes_and_outputs(emu, grid):
    """A Fortran-ordered cube (a transposed array) and a strided ``out``: the kernels write C-ordered rows, so
    the result must come through a contiguous buffer, not be written into the caller's layout."""
    cuda, cp = emu
    rng, cube, x, y = _grid_cube(T=4, rows=9, cols=40)
    if not grid:
        perm = rng.permutation(x.size)
        cube, x, y = cube[:, perm], x[perm], y[perm]
    coeffs = rng.normal(0, 1, (4, 6)) * np.array([5, 1e-3, 1e-3, 1e-7, 1e-7, 1e-7])
    want = ref.subtract_epoch_ramps(cube, coeffs, x, y, 2)
    fortran = cp.asarray(np.asfortranarray(cube))
    assert not fortran.flags.c_contiguous
    got = cuda.subtract_epoch_ramps(fortran, cp.asarray(coeffs), cp.asarray(x), cp.asarray(y), 2)
    assert_matches_reference(got, want, dtype="float32", atol=2e-6)
    in_place = cuda.subtract_epoch_ramps(fortran, cp.asarray(coeffs), cp.asarray(x), cp.asarray(y), 2, out=fortran)
    assert in_place is fortran
    assert_matches_reference(fortran, want, dtype="float32", atol=2e-6)
    wide = cp.zeros((4, 2 * x.size), cp.float32)
    strided = wide[:, ::2]
    cuda.subtract_epoch_ramps(cp.asarray(cube), cp.asarray(coeffs), cp.asarray(x), cp.asarray(y), 2, out=strided)
    assert_matches_reference(strided, want, dtype="float32", atol=2e-6)
    assert np.all(wide[:, 1::2] == 0)


def test_narrow_grids_and_weights_take_the_pixel_kernels(emu):
    cuda, cp = emu
    rng, cube, x, y = _grid_cube(T=3, rows=40, cols=20)  # narrower than a warp
    cp.launches.clear()
    got = cuda.fit_epoch_ramps(cp.asarray(cube), cp.asarray(x), cp.asarray(y), order=2)
    assert cp.launches == ["ramp_moments"]
    _surfaces_match(got, ref.fit_epoch_ramps(cube, x, y, order=2), x, y, 2)

    _, cube, x, y = _grid_cube(T=5, rows=9, cols=45)
    w_pix = np.where(rng.random(x.size) < 0.1, 0.0, rng.uniform(0.2, 3.0, x.size))
    w_obs = rng.uniform(0.0, 2.0, cube.shape)
    m_pix = rng.random(x.size) > 0.2
    m_obs = rng.random(cube.shape) > 0.1
    for kw in ({"weights": w_pix}, {"weights": w_obs}, {"mask": m_pix}, {"mask": m_obs},
               {"weights": w_obs, "mask": m_obs}):
        cp.launches.clear()
        got = cuda.fit_epoch_ramps(cp.asarray(cube), cp.asarray(x), cp.asarray(y), order=2,
                                   **{k: cp.asarray(v) for k, v in kw.items()})
        assert cp.launches == ["ramp_moments"]
        want = ref.fit_epoch_ramps(cube, x, y, order=2, **kw)
        _surfaces_match(np.delete(got, 3, 0), np.delete(want, 3, 0), x, y, 2)


def test_pixel_ramps_with_tails_and_large_gaps(emu):
    cuda, cp = emu
    rng = np.random.default_rng(0)
    N = 4099  # four unrolled trips of the block's threads and a tail
    x, y = rng.uniform(4.0e5, 6.0e5, N), rng.uniform(4.0e6, 4.2e6, N)
    cube = rng.standard_normal((3, N)).astype(np.float32)
    cube[rng.random(cube.shape) < 0.1] = np.nan
    cube[1, 500:2500] = np.nan
    got = cuda.fit_epoch_ramps(cp.asarray(cube), cp.asarray(x), cp.asarray(y), order=2)
    want = ref.fit_epoch_ramps(cube, x, y, order=2)
    _surfaces_match(got, want, x, y, 2)
    sub = cuda.subtract_epoch_ramps(cp.asarray(cube), cp.asarray(want), cp.asarray(x), cp.asarray(y), 2)
    assert_matches_reference(sub, ref.subtract_epoch_ramps(cube, want, x, y, 2), dtype="float32", atol=2e-6)
    surf = cuda.eval_polynomial_surface(cp.asarray(want[0]), cp.asarray(x), cp.asarray(y), 2)
    assert_matches_reference(surf, ref.eval_polynomial_surface(want[0], x, y, 2), dtype="float32")
    surf64 = cuda.eval_polynomial_surface(cp.asarray(want[0]), cp.asarray(x), cp.asarray(y), 2, dtype="float64")
    assert surf64.dtype == np.float64
    assert_matches_reference(surf64, ref.eval_polynomial_surface(want[0], x, y, 2), rtol=1e-12)


def _annual_design(T=41):
    t = np.linspace(0.0, 4.0, T)
    return np.stack([np.ones(T), t, np.sin(2 * np.pi * t), np.cos(2 * np.pi * t)], axis=1)


def test_shared_design_fit_with_epoch_tails_and_weights(emu):
    """41 epochs: five unrolled trips of 8 and a tail of 1; zero-weight epochs; per-observation weights."""
    cuda, cp = emu
    rng = np.random.default_rng(5)
    A = _annual_design()
    T, n = A.shape
    N = 300  # two blocks, the second partly past the end
    Y = (A @ rng.normal(0, 10, (n, N)) + rng.normal(0, 1, (T, N))).astype(np.float32)
    Y[rng.random((T, N)) < 0.1] = np.nan
    Y[:, 7] = np.nan  # a pixel with no data: NaN parameters, count 0
    Y[:, 200:240][rng.random((T, 40)) < 0.7] = np.nan  # missing more than half: usable epochs summed directly
    ew = rng.uniform(0.5, 2.0, T)
    ew[[0, 17, 40]] = 0.0
    wo = np.where(rng.random((T, N)) < 0.05, 0.0, rng.uniform(0.5, 2.0, (T, N)))
    for W in (None, ew, wo):
        x, n_valid, rms = cuda.shared_design_fit(cp.asarray(A), cp.asarray(Y),
                                                 None if W is None else cp.asarray(W), residual_rms=True)
        xr, nr, rr = ref.shared_design_fit(A, Y, W)
        assert_matches_reference(x, xr, rtol=1e-9)
        assert_matches_reference(rms, rr, rtol=1e-8)
        assert np.array_equal(n_valid, nr) and n_valid[7] == 0 and np.all(np.isnan(np.asarray(x)[:, 7]))


@pytest.mark.parametrize("kernel", ["gaussian", "matern32", "tps"])
def test_kernel_surfaces_over_several_station_tiles(emu, kernel):
    cuda, cp = emu
    rng = np.random.default_rng(2)
    centres = rng.uniform(0, 5e4, (300, 2))  # two tiles of 256 stations
    w = rng.normal(0, 1, 300)
    xs, ys = np.linspace(0, 5e4, 37), np.linspace(0, 5e4, 19)
    X, Y = np.meshgrid(xs, ys)
    want = ref.eval_kernel_surface(centres, w, X, Y, kernel=kernel, length_scale=1e4)
    got = cuda.eval_kernel_surface(cp.asarray(centres), cp.asarray(w), cp.asarray(xs), cp.asarray(ys),
                                   kernel=kernel, length_scale=1e4, grid=True)
    assert got.shape == (19, 37)
    assert_matches_reference(got, want, dtype="float32")
    mean = np.array([1.0, 2e-5, -3e-5])
    pts = cuda.eval_kernel_surface(cp.asarray(centres), cp.asarray(w), cp.asarray(X), cp.asarray(Y),
                                   kernel=kernel, length_scale=1e4, mean_coeffs=cp.asarray(mean))
    assert_matches_reference(pts, want + ref.eval_polynomial_surface(mean, X, Y, 1), dtype="float32")


def test_the_emulator_refuses_arguments_the_device_would_misread(emu):
    """A Python int for ``long long``, a float64 array for ``float*`` or a strided array would be read as
    other bytes on the device; the emulated launch refuses them, so such host-code bugs fail here."""
    _, cp = emu
    fn = cp.RawModule(code=(cuda_emulator.HERE.parent.parent / "gpu_insar_adjust" / "kernels" / "ramps.cu")
                      .read_text()).get_function("ramp_grid_subtract")
    cube = np.zeros((2, 64), np.float32)
    good = (cube, np.zeros(12), np.zeros(32), np.zeros(2), np.int64(2), np.int64(32), np.int64(0), cube)
    fn((1, 2), (64,), good)
    for i, bad in ((4, 2), (0, cube.astype(np.float64)), (2, np.zeros(64)[::2]), (6, np.int32(0))):
        args = list(good)
        args[i] = bad
        with pytest.raises(TypeError):
            fn((1, 2), (64,), tuple(args))


@pytest.mark.parametrize("grid", [True, False])
def test_epoch_batches_beyond_the_grid_limit(emu, monkeypatch, grid):
    """CUDA grids hold at most 65 535 blocks in y: the epoch kernels run in batches from epoch t0. With the
    batch cut to 3 epochs, 8 epochs take three launches per kernel (t0 = 0, 3, 6) and give the one-batch result."""
    cuda, cp = emu
    rng, cube, x, y = _grid_cube(T=8, rows=7, cols=40)
    if not grid:
        perm = rng.permutation(x.size)
        cube, x, y = cube[:, perm], x[perm], y[perm]
    args = (cp.asarray(cube), cp.asarray(x), cp.asarray(y))
    whole = cuda.fit_epoch_ramps(*args, order=2)
    sub_whole = cuda.subtract_epoch_ramps(args[0], np.nan_to_num(whole), args[1], args[2], 2)
    monkeypatch.setattr(cuda, "_MAX_GRID_Y", 3)
    cp.launches.clear()
    batched = cuda.fit_epoch_ramps(*args, order=2)
    sub_batched = cuda.subtract_epoch_ramps(args[0], np.nan_to_num(batched), args[1], args[2], 2)
    kinds = ["ramp_row_partials", "ramp_row_reduce"] if grid else ["ramp_moments"]
    sub = "ramp_grid_subtract" if grid else "ramp_subtract"
    assert cp.launches == kinds * 3 + [sub] * 3
    assert np.array_equal(batched, whole, equal_nan=True)
    assert np.array_equal(sub_batched, sub_whole, equal_nan=True)
