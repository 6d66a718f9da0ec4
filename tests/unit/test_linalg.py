"""The batched, weighted, NaN-aware least-squares solver against numpy.linalg.lstsq in float64."""

import numpy as np
import pytest

from conftest import assert_matches_reference, to_numpy
from gpu_insar_adjust import errors
from gpu_insar_adjust.linalg import lstsq_batched, lstsq_shared


def _problem(rng, m, n, k, cond=10.0, col_pow2=0, nan_frac=0.15):
    """Design with intrinsic condition ``cond`` and columns scaled by powers of two up to 2**±col_pow2."""
    U, _ = np.linalg.qr(rng.normal(size=(m, n)))
    V, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = U @ np.diag(np.logspace(0, -np.log10(cond), n)) @ V.T
    scale = 2.0 ** np.round(np.linspace(-col_pow2, col_pow2, n))  # exact in floating point
    A = A * scale
    Y = A @ (rng.normal(size=(n, k)) / scale[:, None])
    Y = Y + 0.05 * rng.normal(size=(m, k))
    Y[rng.random((m, k)) < nan_frac] = np.nan
    w = rng.uniform(0.3, 3.0, size=(m, k))
    return A, Y, w, scale


def _reference(A, Y, w, scale):
    """numpy.linalg.lstsq per column on the exactly equilibrated design, float64."""
    n, k = A.shape[1], Y.shape[1]
    X = np.full((n, k), np.nan)
    for j in range(k):
        v = np.isfinite(Y[:, j]) & (w[:, j] > 0)
        sw = np.sqrt(w[v, j])
        X[:, j] = np.linalg.lstsq((A[v] / scale) * sw[:, None], Y[v, j] * sw, rcond=None)[0] / scale
    return X


def _assert_columnwise(result_x, ref, scale, rtol):
    # compare in the equilibrated parameter space, where all parameters have comparable magnitude
    assert_matches_reference(to_numpy(result_x) * scale[:, None], ref * scale[:, None], rtol=rtol)


@pytest.mark.parametrize("cond,col_pow2", [(10.0, 0), (1e3, 10), (1e4, 12)], ids=["well", "ill-1e3", "ill-1e4"])
def test_shared_design_matches_numpy_float64(xp, cond, col_pow2):
    rng = np.random.default_rng(42)
    A, Y, w, scale = _problem(rng, 120, 6, 40, cond=cond, col_pow2=col_pow2)
    res = lstsq_shared(xp.asarray(A), xp.asarray(Y), xp.asarray(w))
    _assert_columnwise(res.x, _reference(A, Y, w, scale), scale, rtol=1e-10)
    nv = to_numpy(res.n_valid)
    assert np.array_equal(nv, np.isfinite(Y).sum(axis=0))
    assert bool(np.all(to_numpy(res.determined)))


@pytest.mark.parametrize("cond,col_pow2", [(10.0, 0), (1e3, 10)], ids=["well", "ill-1e3"])
def test_batched_systems_match_numpy_float64(xp, cond, col_pow2):
    rng = np.random.default_rng(7)
    # one different design per system: stack of 30 independent problems
    As, Ys, Ws, refs, scales = [], [], [], [], []
    for _ in range(30):
        A, Y, w, scale = _problem(rng, 25, 4, 1, cond=cond, col_pow2=col_pow2)
        As.append(A), Ys.append(Y[:, 0]), Ws.append(w[:, 0]), scales.append(scale)
        refs.append(_reference(A, Y, w, scale)[:, 0])
    A3, Y2, W2 = np.stack(As), np.stack(Ys), np.stack(Ws)
    res = lstsq_batched(xp.asarray(A3), xp.asarray(Y2), xp.asarray(W2))
    got = to_numpy(res.x) * np.stack(scales)
    assert_matches_reference(got, np.stack(refs) * np.stack(scales), rtol=1e-10)


def test_float32_inputs_match_to_1e4(xp):
    rng = np.random.default_rng(3)
    A, Y, w, scale = _problem(rng, 200, 5, 64, cond=100.0, col_pow2=4)
    A32, Y32, w32 = A.astype(np.float32), Y.astype(np.float32), w.astype(np.float32)
    ref = _reference(A32.astype(np.float64), Y32.astype(np.float64), w32.astype(np.float64), scale)
    res = lstsq_shared(xp.asarray(A32), xp.asarray(Y32), xp.asarray(w32))
    _assert_columnwise(res.x, ref, scale, rtol=1e-4)
    rb = lstsq_batched(xp.asarray(np.broadcast_to(A32, (64, 200, 5)).copy()), xp.asarray(Y32.T.copy()),
                       xp.asarray(w32.T.copy()))
    assert_matches_reference(to_numpy(rb.x).T * scale[:, None], ref * scale[:, None], rtol=1e-4)


def test_covariance_and_residuals_match_closed_form(xp):
    rng = np.random.default_rng(11)
    A, Y, w, scale = _problem(rng, 60, 3, 5, cond=5.0, nan_frac=0.0)
    res = lstsq_shared(xp.asarray(A), xp.asarray(Y), xp.asarray(w))
    for j in range(5):
        N = A.T @ (w[:, j, None] * A)
        assert_matches_reference(to_numpy(res.cov)[j], np.linalg.inv(N), rtol=1e-9)
        r = Y[:, j] - A @ to_numpy(res.x)[:, j]
        assert to_numpy(res.residual_rms)[j] == pytest.approx(np.sqrt(np.sum(w[:, j] * r**2) / w[:, j].sum()),
                                                              rel=1e-10)
        assert to_numpy(res.sigma0_sq)[j] == pytest.approx(np.sum(w[:, j] * r**2) / (60 - 3), rel=1e-10)


def test_ridge_matches_augmented_system(xp):
    rng = np.random.default_rng(5)
    A = rng.normal(size=(30, 4))
    y = A @ rng.normal(size=4) + 0.1 * rng.normal(size=30)
    lam = 2.5
    ref = np.linalg.solve(A.T @ A + lam * np.eye(4), A.T @ y)
    res = lstsq_shared(xp.asarray(A), xp.asarray(y), ridge=lam)
    assert_matches_reference(res.x, ref, rtol=1e-10)


def test_undetermined_systems_are_nan_and_reported(xp):
    rng = np.random.default_rng(9)
    A = rng.normal(size=(10, 3))
    Y = rng.normal(size=(10, 4))
    Y[:, 1] = np.nan              # no data at all
    Y[2:, 2] = np.nan             # 2 observations, 3 unknowns
    A_sing = A.copy()
    A_sing[:, 2] = 2.0 * A_sing[:, 0]  # exactly collinear columns
    res = lstsq_shared(xp.asarray(A), xp.asarray(Y))
    det = to_numpy(res.determined)
    assert det.tolist() == [True, False, False, True]
    x = to_numpy(res.x)
    assert np.all(np.isnan(x[:, 1])) and np.all(np.isnan(x[:, 2])) and np.all(np.isfinite(x[:, [0, 3]]))
    res_s = lstsq_shared(xp.asarray(A_sing), xp.asarray(np.nan_to_num(Y)))
    assert not bool(np.any(to_numpy(res_s.determined)))
    assert float(np.max(to_numpy(res_s.rcond))) < 1e-13


def test_chunked_columns_equal_unchunked(xp):
    rng = np.random.default_rng(2)
    A, Y, w, _ = _problem(rng, 40, 3, 37)
    a = lstsq_shared(xp.asarray(A), xp.asarray(Y), xp.asarray(w))
    b = lstsq_shared(xp.asarray(A), xp.asarray(Y), xp.asarray(w), chunk_columns=5)
    assert np.array_equal(to_numpy(a.x), to_numpy(b.x), equal_nan=True)


def test_bad_arguments_raise_gia_errors(cpu_xp):
    xp = cpu_xp
    A = xp.asarray(np.ones((5, 2)))
    with pytest.raises(errors.ArrayArgumentError, match="'Y'"):
        lstsq_shared(A, xp.asarray(np.ones(4)))
    with pytest.raises(errors.ArrayArgumentError, match="real floating"):
        lstsq_shared(xp.asarray(np.ones((5, 2), dtype=np.int64)), xp.asarray(np.ones(5)))
    with pytest.raises(errors.ArrayArgumentError, match="weights"):
        lstsq_shared(A, xp.asarray(np.ones((5, 3))), xp.asarray(np.ones((4,))))
    with pytest.raises(errors.ArrayArgumentError, match="NaN or inf"):
        lstsq_shared(xp.asarray(np.array([[1.0, np.nan]] * 5)), xp.asarray(np.ones(5)))
    with pytest.raises(errors.ArrayArgumentError, match="'y'"):
        lstsq_batched(xp.asarray(np.ones((3, 5, 2))), xp.asarray(np.ones((3, 4))))


def test_mixed_backends_raise():
    import array_api_strict as xs

    with pytest.raises(errors.ArrayArgumentError, match="different backends"):
        lstsq_shared(np.ones((5, 2)), xs.asarray(np.ones(5)))
