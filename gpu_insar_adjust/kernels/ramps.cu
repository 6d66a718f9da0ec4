// Per-epoch polynomial ramps on a (T, N) float32 cube: moments/right-hand sides in one pass, then subtraction.
// Loaded with cupy.RawModule (NVRTC); see gpu_insar_adjust/kernels/cuda.py. Coordinates u, v are centred and
// scaled to [-1, 1] by the caller; all sums are float64.

#define N_MOM 15
#define N_RHS 6
#define N_ACC (N_MOM + N_RHS + 1)

__device__ __forceinline__ double warp_sum(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

// Adds one pixel's contribution; a pixel that is not usable adds zeros (no divergent branch in the warp).
__device__ __forceinline__ void add_moments(double (&acc)[N_ACC], const float y, const double wi, const double uu,
                                            const double vv, const bool usable) {
    const bool ok = usable && (y == y) && (wi > 0.0);
    const double a = ok ? wi : 0.0;
    const double yw = ok ? (double)y * wi : 0.0;
    const double au = a * uu, av = a * vv, auu = au * uu, auv = au * vv, avv = av * vv;
    acc[0] += a;  acc[1] += au;  acc[2] += av;  acc[3] += auu; acc[4] += auv; acc[5] += avv;
    acc[6] += auu * uu; acc[7] += auu * vv; acc[8] += auv * vv; acc[9] += avv * vv;
    acc[10] += auu * uu * uu; acc[11] += auu * uu * vv; acc[12] += auu * vv * vv; acc[13] += auv * vv * vv;
    acc[14] += avv * vv * vv;
    const double yu = yw * uu, yv = yw * vv;
    acc[15] += yw; acc[16] += yu; acc[17] += yv; acc[18] += yu * uu; acc[19] += yu * vv; acc[20] += yv * vv;
    acc[21] += ok ? 1.0 : 0.0;
}

// Pixels per thread and loop trip whose loads are issued before any of them is used: one 4-byte load in flight
// per thread cannot cover the device memory's latency, UNROLL of them can.
#define UNROLL 4

// grid: (blocks over pixels, epochs). Accumulates, for epoch t = t0 + blockIdx.y, the 15 moments sum w u^a v^b
// (a + b <= 4), the 6 sums w y [1, u, v, u^2, uv, v^2] and the usable count of the block's pixels into
// out[t, blockIdx.x, 22]. The caller adds the blocks' partial sums in a fixed order: no atomics, so the same
// cube and launch give the same ramps bit for bit.
extern "C" __global__ void __launch_bounds__(256)
ramp_moments(const float* __restrict__ cube, const double* __restrict__ u, const double* __restrict__ v,
             const double* __restrict__ w, const unsigned char* __restrict__ mask, const double* __restrict__ wt,
             const int has_mask, const int has_wt, const long long n_pix, const long long t0,
             double* __restrict__ out) {
    const long long t = t0 + blockIdx.y;
    double acc[N_ACC];
#pragma unroll
    for (int k = 0; k < N_ACC; ++k) acc[k] = 0.0;
    const float* row = cube + t * n_pix;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    for (; i + (UNROLL - 1) * stride < n_pix; i += UNROLL * stride) {
        float y[UNROLL];
        double wi[UNROLL], uu[UNROLL], vv[UNROLL];
        bool use[UNROLL];
#pragma unroll
        for (int s = 0; s < UNROLL; ++s) {
            const long long j = i + s * stride;
            y[s] = row[j];
            wi[s] = has_wt ? wt[t * n_pix + j] : w[j];
            uu[s] = u[j];
            vv[s] = v[j];
            use[s] = has_mask ? (mask[t * n_pix + j] != 0) : true;
        }
#pragma unroll
        for (int s = 0; s < UNROLL; ++s) add_moments(acc, y[s], wi[s], uu[s], vv[s], use[s]);
    }
    for (; i < n_pix; i += stride)
        add_moments(acc, row[i], has_wt ? wt[t * n_pix + i] : w[i], u[i], v[i],
                    has_mask ? (mask[t * n_pix + i] != 0) : true);
    __shared__ double part[32][N_ACC];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int k = 0; k < N_ACC; ++k) {
        const double s = warp_sum(acc[k]);
        if (lane == 0) part[warp][k] = s;
    }
    __syncthreads();
    if (warp == 0) {
        for (int k = 0; k < N_ACC; ++k) {
            double s = (lane < n_warps) ? part[lane][k] : 0.0;
            s = warp_sum(s);
            if (lane == 0) out[(t * gridDim.x + blockIdx.x) * N_ACC + k] = s;
        }
    }
}

__device__ __forceinline__ float minus_ramp(const float y, const double* c, const double uu, const double vv) {
    return (float)((double)y - (c[0] + uu * (c[1] + c[3] * uu + c[4] * vv) + vv * (c[2] + c[5] * vv)));
}

// grid: (blocks over pixels, epochs). out[t, i] = cube[t, i] - ramp_t(u_i, v_i) for t = t0 + blockIdx.y, with
// coef (T, 6) in centred coordinates (zero padded). out may be cube itself (in place).
extern "C" __global__ void __launch_bounds__(256)
ramp_subtract(const float* cube, const double* __restrict__ coef, const double* __restrict__ u,
              const double* __restrict__ v, const long long n_pix, const long long t0, float* out) {
    const long long t = t0 + blockIdx.y;
    double c[6];
#pragma unroll
    for (int k = 0; k < 6; ++k) c[k] = coef[6 * t + k];
    const float* row = cube + t * n_pix;
    float* orow = out + t * n_pix;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    for (; i + (UNROLL - 1) * stride < n_pix; i += UNROLL * stride) {
        float y[UNROLL];
        double uu[UNROLL], vv[UNROLL];
#pragma unroll
        for (int s = 0; s < UNROLL; ++s) {
            y[s] = row[i + s * stride];
            uu[s] = u[i + s * stride];
            vv[s] = v[i + s * stride];
        }
#pragma unroll
        for (int s = 0; s < UNROLL; ++s) orow[i + s * stride] = minus_ramp(y[s], c, uu[s], vv[s]);
    }
    for (; i < n_pix; i += stride) orow[i] = minus_ramp(row[i], c, u[i], v[i]);
}

// Polynomial surface at every point (centred coordinates), float32 or float64 output.
extern "C" __global__ void poly_eval_f32(const double* __restrict__ c, const double* __restrict__ u,
                                         const double* __restrict__ v, const long long n, float* __restrict__ out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const double uu = u[i], vv = v[i];
        out[i] = (float)(c[0] + uu * (c[1] + c[3] * uu + c[4] * vv) + vv * (c[2] + c[5] * vv));
    }
}

extern "C" __global__ void poly_eval_f64(const double* __restrict__ c, const double* __restrict__ u,
                                         const double* __restrict__ v, const long long n, double* __restrict__ out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const double uu = u[i], vv = v[i];
        out[i] = c[0] + uu * (c[1] + c[3] * uu + c[4] * vv) + vv * (c[2] + c[5] * vv);
    }
}
