"""Split B1 and B2 on a GPU into kernel and host parts: ``python benchmarks/gpu_profile_b1_b2.py`` (needs CuPy).

Prints milliseconds, each the best of five synchronised calls, at the full B1/B2 sizes.
"""
import time

import cupy as cp
import numpy as np

from gpu_insar_adjust import kernels
from gpu_insar_adjust.bench import make_b1_cube, make_b2_cube
from gpu_insar_adjust.kernels import cuda as kc


def best_ms(f, n=5):
    f()
    cp.cuda.get_current_stream().synchronize()
    best = 1e9
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        cp.cuda.get_current_stream().synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


T = 200
cube_h, x_h, y_h, _ = make_b1_cube(T, 1000, 1000)
flat = cp.asarray(cube_h).reshape(T, -1)
x, y = cp.asarray(x_h).ravel(), cp.asarray(y_h).ravel()
N = flat.shape[1]
out = cp.empty_like(flat)
print("B1 copy floor ms", best_ms(lambda: cp.copyto(out, flat)))
print("B1 read-only (sum) ms", best_ms(lambda: flat.sum(dtype=cp.float32)))
print("B1 fit ms", best_ms(lambda: kernels.fit_epoch_ramps(flat, x, y, order=2)))
c = kernels.fit_epoch_ramps(flat, x, y, order=2)
print("B1 subtract (out) ms", best_ms(lambda: kernels.subtract_epoch_ramps(flat, c, x, y, 2, out=out)))
print("B1 centred coordinates ms", best_ms(lambda: kc._centred(x, y)))
# the pixel kernel (scattered pixels, weights, masks), timed on the same cube
u, v, _ = kc._centred(x, y)
w = cp.ones(N, cp.float64)
m8 = cp.zeros(1, cp.uint8)
wt = cp.zeros(1, cp.float64)
fn = kc._module("ramps").get_function("ramp_moments")
bx = kc._epoch_grid(T, N)
print("blocks per epoch", bx)
for b in (bx, 2 * bx, 4 * bx):
    part = cp.empty((T, b, 22), cp.float64)
    print(" moment kernel ms, blocks per epoch", b,
          best_ms(lambda: fn((b, T), (256,), (flat, u, v, w, m8, wt, np.int32(0), np.int32(0), np.int64(N),
                                              np.int64(0), part))))
# the row kernels (pixels on a grid, as here), each part on its own
print("B1 grid detection ms", best_ms(lambda: kc._grid_axes(x, y)))
xc, yr = kc._grid_axes(x, y)
rows, cols = yr.size, xc.size
u12 = cp.asarray(np.stack([xc, xc * xc]) / max(np.ptp(xc), 1.0))
vr = cp.asarray(yr / max(np.ptp(yr), 1.0))
part = cp.empty((T, rows, 9), cp.float64)
sums = cp.empty((T, 22), cp.float64)
mod = kc._module("ramps")
fp, fr, fs = (mod.get_function(k) for k in ("ramp_row_partials", "ramp_row_reduce", "ramp_grid_subtract"))
print(" row partials kernel ms", best_ms(lambda: fp((kc._grid_blocks(rows), T), (256,),
                                                    (flat, u12, np.int64(rows), np.int64(cols), np.int64(0), part))))
print(" row reduce kernel ms", best_ms(lambda: fr((T,), (256,), (part, vr, np.int64(rows), np.int64(0), sums))))
c6 = cp.zeros((T, 6), cp.float64)
print(" grid subtract kernel ms", best_ms(lambda: fs((kc._grid_blocks(rows), T), (256,),
                                                     (flat, c6, u12[0].copy(), vr, np.int64(rows), np.int64(cols),
                                                      np.int64(0), out))))
nrm = np.tile(np.eye(6)[np.triu_indices(6)], (T, 1))  # packed upper triangles of T identity systems
print("host solves ms", best_ms(lambda: kc.cpu._solve_small_spd(nrm, np.ones((T, 6)), np.full(T, 1e6), 6)))
flat = out = None  # free the B1 cube before B2 (the lambdas above have run)
A, Y_h = make_b2_cube(250, 2000, 2000)
Y, Ad = cp.asarray(Y_h), cp.asarray(A)
o2 = cp.empty_like(Y)
print("B2 copy floor ms", best_ms(lambda: cp.copyto(o2, Y)))
print("B2 fit ms", best_ms(lambda: kernels.shared_design_fit(Ad, Y)))
print("B2 fit + residual rms ms", best_ms(lambda: kernels.shared_design_fit(Ad, Y, residual_rms=True)))
