"""Performance kernels: fast CPU engines (numba, blocked NumPy) and CUDA against the float64 NumPy references."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_matches_reference

from gpu_insar_adjust import kernels
from gpu_insar_adjust.errors import ArrayArgumentError, UnsupportedBackendError
from gpu_insar_adjust.kernels import cpu
from gpu_insar_adjust.kernels import reference as ref

ENGINES = ["numpy"] + (["numba"] if cpu.numba_available() else [])
KERNEL_DIR = Path(kernels.__file__).resolve().parent


def _ramp_data(T=6, N=4000, seed=0, utm=True):
    rng = np.random.default_rng(seed)
    if utm:  # projected metres far from the origin: the kernels must centre internally
        x = rng.uniform(4.0e5, 6.0e5, N)
        y = rng.uniform(4.0e6, 4.2e6, N)
    else:
        x = rng.uniform(-1, 1, N)
        y = rng.uniform(-1, 1, N)
    cube = rng.standard_normal((T, N)).astype(np.float32)
    cube[rng.random((T, N)) < 0.1] = np.nan
    cube[1, 500:2500] = np.nan  # a large per-epoch gap (whole chunks)
    return rng, cube, x, y


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("variant", ["plain", "pixel_weights", "obs_weights", "pixel_mask", "obs_mask"])
def test_fit_epoch_ramps_matches_reference(engine, order, variant):
    rng, cube, x, y = _ramp_data()
    T, N = cube.shape
    kw = {"plain": {}, "pixel_weights": {"weights": rng.uniform(0.2, 3.0, N)},
          "obs_weights": {"weights": np.where(rng.random((T, N)) < 0.1, 0.0, rng.uniform(0.2, 3.0, (T, N)))},
          "pixel_mask": {"mask": rng.random(N) > 0.2},
          "obs_mask": {"mask": rng.random((T, N)) > 0.1}}[variant]
    got = cpu.fit_epoch_ramps(cube, x, y, order=order, engine=engine, **kw)
    want = ref.fit_epoch_ramps(cube, x, y, order=order, **kw)
    # coefficients of very different magnitudes (1, 1/m, 1/m²): compare the surfaces they describe
    assert_matches_reference(ref.eval_polynomial_surface(got, x, y, order),
                             ref.eval_polynomial_surface(want, x, y, order), rtol=1e-9)


def test_fit_epoch_ramps_recovers_quadratic_truth():
    rng = np.random.default_rng(5)
    rows, cols = 120, 150
    xs, ys = np.meshgrid(np.arange(cols) * 100.0 + 3.0e5, np.arange(rows) * 100.0 + 4.1e6)
    truth = np.array([[2.0, 1e-4, -2e-4, 3e-8, -1e-8, 2e-8], [-1.0, -5e-5, 1e-4, -2e-8, 4e-8, 1e-8]])
    cube = np.stack([ref.eval_polynomial_surface(c, xs, ys, 2) for c in truth]).astype(np.float32)
    cube += rng.normal(0, 0.5, cube.shape).astype(np.float32)
    cube[0, :40, :60] = np.nan
    coeffs = kernels.fit_epoch_ramps(cube, xs, ys, order=2)
    err = ref.eval_polynomial_surface(coeffs, xs, ys, 2) - ref.eval_polynomial_surface(truth, xs, ys, 2)
    # 0.5 mm noise over ~1.8e4 pixels: the fitted surface is within 0.1 mm of the truth everywhere
    assert np.max(np.abs(err)) < 0.1
    corrected = kernels.subtract_epoch_ramps(cube, coeffs, xs, ys, 2)
    assert corrected.shape == cube.shape and corrected.dtype == np.float32
    assert np.array_equal(np.isnan(corrected), np.isnan(cube))
    assert abs(float(np.nanstd(corrected)) - 0.5) < 0.02


@pytest.mark.parametrize("engine", ENGINES)
def test_subtract_epoch_ramps_matches_reference_and_in_place(engine):
    rng, cube, x, y = _ramp_data()
    coeffs = ref.fit_epoch_ramps(cube, x, y, order=2)
    want = ref.subtract_epoch_ramps(cube, coeffs, x, y, 2)
    got = cpu.subtract_epoch_ramps(cube, coeffs, x, y, 2, engine=engine)
    assert_matches_reference(got, want, dtype="float32", atol=1e-6)
    inplace = cube.copy()
    res = kernels.subtract_epoch_ramps(inplace, coeffs, x, y, 2, in_place=True)
    assert res is inplace
    assert_matches_reference(inplace, want, dtype="float32", atol=1e-6)


def test_subtract_refuses_undetermined_epochs():
    _, cube, x, y = _ramp_data()
    cube[2] = np.nan
    coeffs = kernels.fit_epoch_ramps(cube, x, y, order=1)
    assert np.all(np.isnan(coeffs[2])) and np.all(np.isfinite(coeffs[[0, 1, 3]]))
    with pytest.raises(ArrayArgumentError) as exc:
        kernels.subtract_epoch_ramps(cube, coeffs, x, y, 1)
    assert exc.value.field == "coeffs"


def _annual_design(T=40):
    t = np.linspace(0.0, 3.0, T)
    return np.column_stack([np.ones(T), t, np.sin(2 * np.pi * t), np.cos(2 * np.pi * t),
                            np.clip(t - 1.5, 0, None)])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("wkind", [None, "epoch", "obs"])
def test_shared_design_fit_equals_lstsq_per_pixel(engine, wkind):
    rng = np.random.default_rng(11)
    A = _annual_design()
    T, n = A.shape
    N = 700
    Y = (A @ rng.normal(0, 10, (n, N)) + rng.normal(0, 1, (T, N))).astype(np.float32)
    Y[rng.random((T, N)) < 0.15] = np.nan
    Y[:, :200] = (A @ rng.normal(0, 10, (n, 200))).astype(np.float32)  # gap-free pixels: the GEMM path
    Y[: T - 3, 300] = np.nan  # 3 observations < 5 unknowns: undetermined
    W = {None: None, "epoch": rng.uniform(0.5, 2, T),
         "obs": np.where(rng.random((T, N)) < 0.05, 0.0, rng.uniform(0.5, 2, (T, N)))}[wkind]
    x, n_valid, rms = cpu.shared_design_fit(A, Y, W, residual_rms=True, engine=engine)
    Wf = np.ones((T, N)) if W is None else np.broadcast_to(W.reshape(T, -1), (T, N))
    for p in range(N):
        ok = np.isfinite(Y[:, p]) & (Wf[:, p] > 0)
        assert n_valid[p] == ok.sum()
        if ok.sum() < n:
            assert np.all(np.isnan(x[:, p])) and np.isnan(rms[p])
            continue
        sw = np.sqrt(Wf[ok, p])
        xr = np.linalg.lstsq(A[ok] * sw[:, None], Y[ok, p].astype(np.float64) * sw, rcond=None)[0]
        assert np.max(np.abs(x[:, p] - xr)) <= 1e-8 * np.max(np.abs(xr))
        rr = np.sqrt(np.mean((Y[ok, p] - A[ok] @ xr) ** 2))
        assert abs(rms[p] - rr) <= 1e-8 * max(rr, 1e-3)


def test_shared_design_fit_public_api_and_linalg_contract():
    rng = np.random.default_rng(2)
    A = _annual_design(30)
    Y = (A @ rng.normal(0, 5, (A.shape[1], 12 * 15))).reshape(30, 12, 15).astype(np.float32)
    Y[rng.random(Y.shape) < 0.1] = np.nan
    fit = kernels.shared_design_fit(A, Y, residual_rms=True)
    assert fit.x.shape == (A.shape[1], 12, 15) and fit.n_valid.shape == (12, 15)
    xr, nr, rr = ref.shared_design_fit(A, Y.reshape(30, -1))
    assert_matches_reference(fit.x.reshape(A.shape[1], -1), xr, rtol=1e-9)
    assert np.array_equal(fit.n_valid.ravel(), nr)
    try:
        from gpu_insar_adjust import linalg
    except ImportError:
        pytest.skip("gpu_insar_adjust.linalg not available")
    res = linalg.lstsq_shared(A, Y.reshape(30, -1).astype(np.float64))
    assert_matches_reference(fit.x.reshape(A.shape[1], -1), np.asarray(res.x), rtol=1e-8)


@pytest.mark.parametrize("engine", ENGINES)
def test_eval_polynomial_surface(engine):
    rng = np.random.default_rng(4)
    x = rng.uniform(3e5, 4e5, (30, 40))
    y = rng.uniform(4e6, 4.1e6, (30, 40))
    c = np.array([1.0, 2e-4, -1e-4, 1e-9, 3e-9, -2e-9])
    got = cpu.eval_polynomial_surface(c, x, y, 2, dtype=np.float64, engine=engine)
    assert_matches_reference(got, ref.eval_polynomial_surface(c, x, y, 2), rtol=1e-10)
    assert kernels.eval_polynomial_surface(c[:3], x, y, 1).dtype == np.float32


@pytest.mark.parametrize("kernel", ["gaussian", "matern32", "tps"])
@pytest.mark.parametrize("grid", [True, False])
def test_eval_kernel_surface_matches_reference(kernel, grid):
    rng = np.random.default_rng(8)
    centres = np.column_stack([rng.uniform(0, 5e4, 25), rng.uniform(0, 4e4, 25)])
    w = rng.normal(0, 1, 25)
    mean = np.array([0.5, 1e-5, -2e-5])
    xs = np.linspace(0, 5e4, 37)
    ys = np.linspace(0, 4e4, 23)
    if grid:
        got = kernels.eval_kernel_surface(centres, w, xs, ys, kernel=kernel, length_scale=1.5e4, mean_coeffs=mean,
                                          grid=True, dtype="float64")
        X, Yg = np.meshgrid(xs, ys)
    else:
        X, Yg = rng.uniform(0, 5e4, (9, 11)), rng.uniform(0, 4e4, (9, 11))
        got = kernels.eval_kernel_surface(centres, w, X, Yg, kernel=kernel, length_scale=1.5e4, mean_coeffs=mean,
                                          dtype="float64")
    want = ref.eval_kernel_surface(centres, w, X, Yg, kernel=kernel, length_scale=1.5e4, mean_coeffs=mean)
    assert_matches_reference(got, want, rtol=1e-10)


def test_gaussian_surface_equals_sklearn_gp_posterior_mean():
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    rng = np.random.default_rng(9)
    st = rng.uniform(0, 1e5, (60, 2))
    vals = np.sin(st[:, 0] / 3e4) + 0.1 * rng.standard_normal(60)
    gpr = GaussianProcessRegressor(ConstantKernel(2.0, "fixed") * RBF(2e4, "fixed") + WhiteKernel(0.01, "fixed"),
                                   optimizer=None).fit(st, vals)
    xs, ys = np.linspace(0, 1e5, 50), np.linspace(0, 1e5, 40)
    surf = kernels.eval_kernel_surface(st, gpr.alpha_ * 2.0, xs, ys, length_scale=2e4, grid=True)
    X, Yg = np.meshgrid(xs, ys)
    want = gpr.predict(np.column_stack([X.ravel(), Yg.ravel()])).reshape(X.shape)
    assert_matches_reference(surf, want, dtype="float32")


def test_bad_inputs_raise_gia_errors():
    _, cube, x, y = _ramp_data(N=500)
    with pytest.raises(ArrayArgumentError) as e1:
        kernels.fit_epoch_ramps(cube, x, y, order=3)
    assert e1.value.field == "order"
    with pytest.raises(ArrayArgumentError) as e2:
        kernels.fit_epoch_ramps(cube, x[:-1], y, order=1)
    assert e2.value.field == "x"
    with pytest.raises(ArrayArgumentError) as e3:
        kernels.fit_epoch_ramps(cube, x, y, weights=-np.ones(500))
    assert e3.value.field == "weights" and "fix:" in str(e3.value)
    with pytest.raises(ArrayArgumentError):
        kernels.shared_design_fit(np.ones((3, 2)), cube)
    with pytest.raises(ArrayArgumentError):
        kernels.eval_kernel_surface(np.zeros((3, 2)), np.ones(3), x, y, kernel="cubic")


def test_array_api_strict_is_refused_with_a_fix():
    xp = pytest.importorskip("array_api_strict")
    cube = xp.asarray(np.zeros((3, 10), np.float32))
    x = xp.asarray(np.arange(10.0))
    with pytest.raises(UnsupportedBackendError) as exc:
        kernels.fit_epoch_ramps(cube, x, x, order=1)
    assert "numpy" in str(exc.value)


def test_import_does_not_load_cupy_or_numba():
    code = ("import sys, gpu_insar_adjust, gpu_insar_adjust.kernels, gpu_insar_adjust.bench; "
            "print('cupy' in sys.modules, 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _numba_factories():
    from gpu_insar_adjust.geodesy import horizontal, los

    names = sorted(n for n in dir(cpu) if n.startswith("_nb") and callable(getattr(cpu, n)))
    return [getattr(cpu, n) for n in names] + [horizontal._matern_numba, los._unit_kernel]


def _dispatchers(obj):
    from numba.core.dispatcher import Dispatcher

    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _dispatchers(o)
    elif isinstance(obj, Dispatcher):
        yield obj


def test_cached_numba_kernels_are_no_closures_over_other_kernels():
    """numba's disk cache keys a closure by its pickled cells, and a dispatcher pickles with a uuid new in every
    process: a cached kernel that calls a helper kept in its factory's locals is compiled again by every run and
    every Dask worker. No kernel of the package may hold a dispatcher in its closure."""
    pytest.importorskip("numba")
    from numba.core.dispatcher import Dispatcher

    seen = 0
    for factory in _numba_factories():
        for d in _dispatchers(factory()):
            seen += 1
            cells = [c.cell_contents for c in (d.py_func.__closure__ or ())]
            held = [c.py_func.__name__ for c in cells if isinstance(c, Dispatcher)]
            assert not held, f"{d.py_func.__qualname__} closes over the kernels {held}: bind them as globals"
    assert seen >= 20


_CACHE_PROBE = """
import numpy as np
from gpu_insar_adjust.kernels import cpu
rng = np.random.default_rng(0)
x, y = rng.uniform(0, 50, 64), rng.uniform(0, 50, 64)
p = rng.uniform(0, 50, (2, 5))
cpu.matern_gp_surface(x, y, p[0], p[1], rng.normal(size=5), 2.0, 9.0, 1.5, k_inv=np.eye(5))
cube = rng.normal(size=(3, 8, 9)).astype(np.float32)
yy, xx = np.mgrid[0:8, 0:9].astype(float)
cpu.fit_epoch_ramps(cube.reshape(3, -1), xx.ravel() + rng.normal(size=72), yy.ravel(), order=1)
k = cpu._nb()
print(sum(d.stats.cache_misses.get(s, 0) for d in (cpu._nb_matern(), k["chunk_moments"], k["ramp_normals"],
                                                    k["solve_spd"]) for s in d.signatures))
"""


def test_numba_kernels_load_from_the_disk_cache_in_a_new_process(tmp_path):
    """The second process loads the kernels the first compiled (among them those that inline helpers)."""
    pytest.importorskip("numba")
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True, env=env,
                           check=True).stdout.split()[-1] for _ in range(2)]
    assert int(runs[0]) >= 4  # compiled in the first process
    assert int(runs[1]) == 0  # every one loaded from the cache in the second


def test_numpy_engine_can_be_forced(monkeypatch):
    monkeypatch.setenv("GIA_CPU_KERNELS", "numpy")
    assert kernels.cpu_engine() == "numpy"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source,defines", [("ramps.cu", ()), ("surfaces.cu", ()),
                                            ("shared_fit.cu", ("-DN_TERMS=1",)),
                                            ("shared_fit.cu", ("-DN_TERMS=6",)),
                                            ("shared_fit.cu", ("-DN_TERMS=12",))])
def test_cuda_sources_compile(tmp_path, source, defines):
    out = tmp_path / "k.ptx"
    proc = subprocess.run(["nvcc", "--ptx", "-arch=sm_80", "--std=c++14", *defines, str(KERNEL_DIR / source),
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ptx = out.read_text()
    names = {"ramps.cu": ["ramp_moments", "ramp_subtract", "poly_eval_f32", "ramp_row_partials", "ramp_row_reduce",
                          "ramp_grid_subtract"], "surfaces.cu": ["kernel_surface"],
             "shared_fit.cu": ["shared_fit"]}[source]
    for name in names:
        assert f".entry {name}(" in ptx


# ---------------------------------------------------------------- GPU (skipped without one) -------------------
def test_cuda_ramps_match_reference(gpu_xp):
    import cupy as cp

    rng, cube, x, y = _ramp_data()
    mask = rng.random(cube.shape) > 0.1
    got = kernels.fit_epoch_ramps(cp.asarray(cube), cp.asarray(x), cp.asarray(y), order=2, mask=cp.asarray(mask))
    want = ref.fit_epoch_ramps(cube, x, y, order=2, mask=mask)
    assert_matches_reference(ref.eval_polynomial_surface(cp.asnumpy(got), x, y, 2),
                             ref.eval_polynomial_surface(want, x, y, 2), rtol=1e-9)
    sub = kernels.subtract_epoch_ramps(cp.asarray(cube), cp.asarray(want), cp.asarray(x), cp.asarray(y), 2)
    assert_matches_reference(sub, ref.subtract_epoch_ramps(cube, want, x, y, 2), dtype="float32", atol=1e-6)


def test_cuda_shared_fit_and_surfaces_match_reference(gpu_xp):
    import cupy as cp

    rng = np.random.default_rng(1)
    A = _annual_design()
    Y = (A @ rng.normal(0, 10, (A.shape[1], 500)) + rng.normal(0, 1, (A.shape[0], 500))).astype(np.float32)
    Y[rng.random(Y.shape) < 0.15] = np.nan
    fit = kernels.shared_design_fit(cp.asarray(A), cp.asarray(Y), residual_rms=True)
    xr, nr, rr = ref.shared_design_fit(A, Y)
    assert_matches_reference(fit.x, xr, rtol=1e-9)
    assert_matches_reference(fit.residual_rms, rr, rtol=1e-8)
    assert np.array_equal(cp.asnumpy(fit.n_valid), nr)
    centres = rng.uniform(0, 5e4, (40, 2))
    w = rng.normal(0, 1, 40)
    xs, ys = np.linspace(0, 5e4, 64), np.linspace(0, 5e4, 48)
    for kernel in ("gaussian", "matern32", "tps"):
        got = kernels.eval_kernel_surface(cp.asarray(centres), cp.asarray(w), cp.asarray(xs), cp.asarray(ys),
                                          kernel=kernel, length_scale=1e4, grid=True)
        X, Yg = np.meshgrid(xs, ys)
        want = ref.eval_kernel_surface(centres, w, X, Yg, kernel=kernel, length_scale=1e4)
        assert_matches_reference(got, want, dtype="float32")


def test_cuda_unrolled_loops_tails_weights_and_reproducibility(gpu_xp):
    """The CUDA loops take 8 epochs (shared_fit) and 4 pixels per thread (ramps) at a time: epoch counts and
    pixel counts that leave tails, zero-weight epochs and per-observation weights all match the references, and
    the ramps are summed without atomics, so a second fit of the same cube is bit for bit the first."""
    import cupy as cp

    rng = np.random.default_rng(5)
    A = _annual_design(41)  # 5 unrolled trips of 8 epochs + a tail of 1
    T, n = A.shape
    N = 1031
    Y = (A @ rng.normal(0, 10, (n, N)) + rng.normal(0, 1, (T, N))).astype(np.float32)
    Y[rng.random((T, N)) < 0.1] = np.nan
    ew = rng.uniform(0.5, 2.0, T)
    ew[[0, 17, 40]] = 0.0
    wo = np.where(rng.random((T, N)) < 0.05, 0.0, rng.uniform(0.5, 2.0, (T, N)))
    for W in (ew, wo):
        fit = kernels.shared_design_fit(cp.asarray(A), cp.asarray(Y), cp.asarray(W), residual_rms=True)
        xr, nr, rr = ref.shared_design_fit(A, Y, W)
        assert_matches_reference(fit.x, xr, rtol=1e-9)
        assert_matches_reference(fit.residual_rms, rr, rtol=1e-8)
        assert np.array_equal(cp.asnumpy(fit.n_valid), nr)

    rng, cube, x, y = _ramp_data(T=3, N=4099)
    w = rng.uniform(0.0, 2.0, cube.shape)
    cd, xd, yd = cp.asarray(cube), cp.asarray(x), cp.asarray(y)
    first = kernels.fit_epoch_ramps(cd, xd, yd, order=2, weights=cp.asarray(w))
    want = ref.fit_epoch_ramps(cube, x, y, order=2, weights=w)
    assert_matches_reference(ref.eval_polynomial_surface(cp.asnumpy(first), x, y, 2),
                             ref.eval_polynomial_surface(want, x, y, 2), rtol=1e-9)
    again = kernels.fit_epoch_ramps(cd, xd, yd, order=2, weights=cp.asarray(w))
    assert np.array_equal(cp.asnumpy(first), cp.asnumpy(again))
    fused, c_fused = kernels.remove_epoch_ramps(cd, xd, yd, order=2)
    c_two = kernels.fit_epoch_ramps(cd, xd, yd, order=2)
    two = kernels.subtract_epoch_ramps(cd, c_two, xd, yd, 2)
    assert np.array_equal(cp.asnumpy(c_fused), cp.asnumpy(c_two))
    assert np.array_equal(cp.asnumpy(fused), cp.asnumpy(two), equal_nan=True)


def test_cuda_grid_ramps_match_reference(gpu_xp):
    """Pixels on a meshgrid take the row kernels (ramp_row_partials/reduce, ramp_grid_subtract) on the device."""
    import cupy as cp

    _, cube, x, y = _grid_ramp_data(T=9, rows=37, cols=203)
    cd, xd, yd = cp.asarray(cube), cp.asarray(x), cp.asarray(y)
    from gpu_insar_adjust.kernels import cuda

    assert cuda._grid_axes(xd.ravel(), yd.ravel()) is not None
    got = cp.asnumpy(kernels.fit_epoch_ramps(cd, xd, yd, order=2))
    want = ref.fit_epoch_ramps(cube, x, y, order=2)
    assert np.all(np.isnan(got[3]))
    ok = [0, 1, 2, 4, 5, 6, 7, 8]
    assert_matches_reference(ref.eval_polynomial_surface(got[ok], x, y, 2),
                             ref.eval_polynomial_surface(want[ok], x, y, 2), rtol=1e-9)
    again = cp.asnumpy(kernels.fit_epoch_ramps(cd, xd, yd, order=2))
    assert np.array_equal(got, again, equal_nan=True)
    sub = kernels.subtract_epoch_ramps(cd[ok], cp.asarray(want[ok]), xd, yd, 2)
    assert_matches_reference(sub, ref.subtract_epoch_ramps(cube[ok], want[ok], x, y, 2), dtype="float32",
                             atol=2e-6)


# ---------------------------------------------------------------- grid fast paths -----------------------------
def _grid_ramp_data(T=7, rows=37, cols=53, seed=3):
    """A (T, rows, cols) float32 cube on a UTM meshgrid: quadratic ramps, noise, per-epoch NaN blobs, and
    scattered NaN; one epoch entirely missing (undetermined) and one row missing in every epoch."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(4.3e5 + 90.0 * np.arange(cols), 4.1e6 - 90.0 * np.arange(rows))
    truth = rng.normal(0, 1, (T, 6)) * np.array([5, 1e-3, 1e-3, 1e-7, 1e-7, 1e-7])
    cube = np.stack([ref.eval_polynomial_surface(c, x, y, 2) for c in truth]).astype(np.float32)
    cube += rng.normal(0, 0.5, cube.shape).astype(np.float32)
    for t in range(T):
        r0, c0 = rng.integers(0, rows - 8), rng.integers(0, cols - 10)
        cube[t, r0:r0 + 8, c0:c0 + 10] = np.nan
    cube[rng.random(cube.shape) < 0.03] = np.nan
    cube[:, 5] = np.nan
    cube[3] = np.nan
    return rng, cube, x, y


@pytest.mark.skipif(not cpu.numba_available(), reason="the grid path is part of the numba engine")
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("variant", ["plain", "pixel_weights", "pixel_mask", "obs_mask"])
def test_grid_fit_matches_reference(order, variant):
    rng, cube, x, y = _grid_ramp_data()
    T, rows, cols = cube.shape
    assert cpu._grid_axes(x.ravel(), y.ravel()) is not None  # the grid path runs
    kw = {"plain": {}, "pixel_weights": {"weights": np.where(rng.random((rows, cols)) < 0.1, 0.0,
                                                                 rng.uniform(0.2, 3.0, (rows, cols)))},
          "pixel_mask": {"mask": rng.random((rows, cols)) > 0.2},
          "obs_mask": {"mask": rng.random(cube.shape) > 0.1}}[variant]
    got = kernels.fit_epoch_ramps(cube, x, y, order=order, **kw)
    want = ref.fit_epoch_ramps(cube, x, y, order=order, **{k: v.reshape(-1) if v.ndim == 2 else v.reshape(T, -1)
                                                           for k, v in kw.items()})
    assert np.all(np.isnan(got[3])) and np.all(np.isfinite(np.delete(got, 3, axis=0)))
    # float64 sums in a different order than lstsq: the fitted surfaces agree to 1e-9 of their size
    assert_matches_reference(ref.eval_polynomial_surface(got, x, y, order),
                             ref.eval_polynomial_surface(want, x, y, order), rtol=1e-9)


def test_grid_subtract_and_remove_are_identical_to_fit_then_subtract():
    _, cube, x, y = _grid_ramp_data(T=9)
    cube[3] = cube[2]  # every epoch determined: fit + subtract is defined for the whole cube
    coeffs = kernels.fit_epoch_ramps(cube, x, y, order=2)
    two_pass = kernels.subtract_epoch_ramps(cube, coeffs, x, y, 2)
    # the float32 result equals the float64 reference to float32 rounding
    assert_matches_reference(two_pass, ref.subtract_epoch_ramps(cube, coeffs, x, y, 2), dtype="float32",
                             atol=2e-6)
    for group_bytes in (1, 3 * cube[0].nbytes, 1 << 30):  # one epoch, three epochs, all at once
        fused, c2 = kernels.remove_epoch_ramps(cube, x, y, order=2, group_bytes=group_bytes)
        assert np.array_equal(c2, coeffs)
        assert np.array_equal(fused, two_pass, equal_nan=True)  # bit for bit
    inplace = cube.copy()
    res, _ = kernels.remove_epoch_ramps(inplace, x, y, order=2, in_place=True, group_bytes=1)
    assert res is inplace and np.array_equal(inplace, two_pass, equal_nan=True)


@pytest.mark.parametrize("grid", [True, False])
def test_remove_epoch_ramps_leaves_undetermined_epochs_unchanged(grid):
    _, cube, x, y = _grid_ramp_data(T=5)
    if not grid:  # the same pixels shuffled: no grid, the chunked kernels
        perm = np.random.default_rng(0).permutation(x.size)
        cube, x, y = cube.reshape(5, -1)[:, perm], x.ravel()[perm], y.ravel()[perm]
    assert (cpu._grid_axes(x.ravel(), y.ravel()) is not None) == grid
    mask = np.ones(cube.shape[1:], bool)
    out, coeffs = kernels.remove_epoch_ramps(cube, x, y, order=1, mask=mask, group_bytes=2 * cube[0].nbytes)
    assert np.all(np.isnan(coeffs[3])) and np.all(np.isnan(out[3]))
    want = ref.fit_epoch_ramps(cube, x, y, order=1)
    assert_matches_reference(ref.eval_polynomial_surface(coeffs, x, y, 1),
                             ref.eval_polynomial_surface(want, x, y, 1), rtol=1e-9)
    ok = [0, 1, 2, 4]
    assert_matches_reference(out[ok], ref.subtract_epoch_ramps(cube[ok], want[ok], x, y, 1), dtype="float32",
                             atol=2e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_design_fit_blocks_and_epoch_tails(engine):
    # T not a multiple of the 4-epoch unrolling, N over several 512-pixel blocks with a tail, zero-weight epochs
    rng = np.random.default_rng(21)
    A = _annual_design(41)
    T, n = A.shape
    N = 1300
    Y = (A @ rng.normal(0, 10, (n, N)) + rng.normal(0, 1, (T, N))).astype(np.float32)
    Y[:, 600:][rng.random((T, N - 600)) < 0.05] = np.nan  # first block gap-free: the shared inverse
    w = rng.uniform(0.5, 2.0, T)
    w[[0, 17, 40]] = 0.0
    for W in (None, w):
        fit = kernels.shared_design_fit(A, Y, W, residual_rms=True) if engine == cpu.cpu_engine() else None
        x, n_valid, rms = cpu.shared_design_fit(A, Y, W, residual_rms=True, engine=engine)
        xr, nr, rr = ref.shared_design_fit(A, Y, W)
        # float32 data, float64 sums and solves: 1e-9 of the largest parameter
        assert_matches_reference(x, xr, rtol=1e-9)
        assert_matches_reference(rms, rr, rtol=1e-8)
        assert np.array_equal(n_valid, nr)
        if fit is not None:
            assert np.array_equal(np.asarray(fit.x), x, equal_nan=True)


def test_b4_stage_names_parsed_from_the_run_log():
    """B4 attributes peak memory to the stage named in the log line that starts it."""
    from gpu_insar_adjust.bench import _STAGE_START

    lines = ["04:51:00 INFO gpu_insar_adjust.pipeline: per-frame adjustment ...",
             "04:51:24 INFO gpu_insar_adjust.pipeline: per-frame adjustment done in 18.68 s",
             "network adjustment ..."]
    found = [m.group(1) for m in map(_STAGE_START.search, lines) if m]
    assert found == ["per-frame adjustment", "network adjustment"]


def test_gpu_runs_time_the_cpu_path_in_the_same_run():
    """B1/B2 on a GPU also time the CPU path (on host copies: the inputs stay as they were) and judge the GPU
    targets — ≤ 1.5× the device copy floor, ≥ 20× the CPU path — from those same-run times."""
    from gpu_insar_adjust import bench

    cube, x, y, _ = bench.make_b1_cube(6, 64, 48)
    before = cube.copy()
    assert bench.cpu_path_b1(cube, x, y, repeats=1) > 0
    np.testing.assert_array_equal(cube, before)  # timed on a copy
    A, Y = bench.make_b2_cube(40, 16, 16)
    assert bench.cpu_path_b2(A, Y, repeats=1) > 0
    res = {"times_s": {}, "ratios": {}, "targets": {}}
    bench._gpu_targets(res, t_cpu=2.0, t_ours=0.05, t_floor=0.04)
    assert res["ratios"]["cpu_path_over_ours"] == pytest.approx(40.0)
    assert res["targets"] == {"gpu_ours_over_device_floor<=1.5": True, "gpu_cpu_path_over_ours>=20": True}
    bench._gpu_targets(res, t_cpu=0.5, t_ours=0.05, t_floor=0.02)
    assert res["targets"] == {"gpu_ours_over_device_floor<=1.5": False, "gpu_cpu_path_over_ours>=20": False}
