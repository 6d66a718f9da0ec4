"""B3: dense GP correction surface (200 stations) vs scikit-learn GaussianProcessRegressor.predict."""

from conftest import report

from gpu_insar_adjust import bench


def test_b3_gp_surface(bench_size, bench_backend, bench_results, ours_timer):
    params = bench.SIZES[bench_size]["B3"]
    res = bench.bench_b3(**params, backend=bench_backend, ours_timer=ours_timer)
    res["params"] = params
    report(bench_results, "B3", res)
    assert res["max_abs_diff_vs_sklearn"] < 1e-4 * 10  # float32 output of a surface of a few mm
    assert res["ratios"]["sklearn_over_ours"] > 1.0
