"""B1: per-epoch quadratic ramp removal vs MintPy(-style) per-epoch least squares and the memory floor."""

from conftest import report

from gpu_insar_adjust import bench


def test_b1_epoch_ramps(bench_size, bench_backend, bench_results, ours_timer):
    params = bench.SIZES[bench_size]["B1"]
    res = bench.bench_b1(**params, backend=bench_backend, ours_timer=ours_timer)
    res["params"] = params
    report(bench_results, "B1", res)
    # the fitted ramps are right (1 mm noise, ~1e5-1e6 pixels per epoch), whatever the timings
    assert res["max_ramp_error_mm"] < 0.2
    assert res["ratios"]["naive_mintpy_style_over_ours"] > 1.0
