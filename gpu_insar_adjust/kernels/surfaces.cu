// Dense radial-kernel surfaces (GP posterior mean): out(p) = sum_s w_s k(|p - c_s| / l) + mean(p).
// One thread per output pixel; stations staged through shared memory in tiles. kernel: 0 gaussian,
// 1 matern32, 2 thin-plate spline. grid != 0: pixel (r, c) of an (H, W) grid with axes x (W,), y (H,);
// otherwise points x[i], y[i]. The polynomial mean is evaluated in centred coordinates (u, v) =
// ((x - x0)/s, (y - y0)/s) with coefficients mc (6, zero padded).
#define TILE 256

extern "C" __global__ void kernel_surface(const double* __restrict__ cx, const double* __restrict__ cy,
                                          const double* __restrict__ wts, const int n_st,
                                          const double* __restrict__ x, const double* __restrict__ y,
                                          const long long n_out, const long long width, const int grid,
                                          const int kernel, const double inv_ls,
                                          const int has_mean, const double* __restrict__ mc,
                                          const double x0, const double y0, const double inv_s,
                                          float* __restrict__ out) {
    __shared__ double sx[TILE], sy[TILE], sw[TILE];
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    double px = 0.0, py = 0.0;
    if (i < n_out) {
        if (grid) { px = x[i % width]; py = y[i / width]; }
        else { px = x[i]; py = y[i]; }
    }
    double acc = 0.0;
    for (int s0 = 0; s0 < n_st; s0 += TILE) {
        __syncthreads();
        for (int k = threadIdx.x; k < TILE && s0 + k < n_st; k += blockDim.x) {
            sx[k] = cx[s0 + k]; sy[k] = cy[s0 + k]; sw[k] = wts[s0 + k];
        }
        __syncthreads();
        const int n_tile = min(TILE, n_st - s0);
        for (int k = 0; k < n_tile; ++k) {
            const double dx = (px - sx[k]) * inv_ls, dy = (py - sy[k]) * inv_ls;
            const double r2 = dx * dx + dy * dy;
            double kv;
            if (kernel == 0) kv = exp(-0.5 * r2);
            else if (kernel == 1) { const double s = sqrt(3.0 * r2); kv = (1.0 + s) * exp(-s); }
            else kv = r2 > 0.0 ? 0.5 * r2 * log(r2) : 0.0;
            acc += sw[k] * kv;
        }
    }
    if (i >= n_out) return;
    if (has_mean) {
        const double uu = (px - x0) * inv_s, vv = (py - y0) * inv_s;
        acc += mc[0] + uu * (mc[1] + mc[3] * uu + mc[4] * vv) + vv * (mc[2] + mc[5] * vv);
    }
    out[i] = (float)acc;
}
