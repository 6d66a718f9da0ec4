"""B2: per-pixel annual velocities vs numpy.linalg.lstsq on the cube (MintPy's approach) and the memory floor."""

from conftest import report

from gpu_insar_adjust import bench


def test_b2_annual_velocities(bench_size, bench_backend, bench_results, ours_timer):
    params = bench.SIZES[bench_size]["B2"]
    res = bench.bench_b2(**params, backend=bench_backend, ours_timer=ours_timer)
    res["params"] = params
    report(bench_results, "B2", res)
    assert res["max_rel_diff_vs_lstsq"] < 1e-8
    assert res["ratios"]["lstsq_over_ours"] > 1.0
