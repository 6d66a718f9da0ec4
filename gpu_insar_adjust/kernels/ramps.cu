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

// Sums each of a block's per-thread accumulators over the block (warp shuffles, then the warps' partials in
// a fixed order) and stores them in out[0:N_ACC]. Every thread of the block must call it.
__device__ __forceinline__ void store_block_sums(const double (&acc)[N_ACC], double* __restrict__ out) {
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
            if (lane == 0) out[k] = s;
        }
    }
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
    store_block_sums(acc, out + (t * gridDim.x + blockIdx.x) * N_ACC);
}

// ---- pixels on a row-major grid: u depends on the column only, v on the row only -------------------------
// Every moment and right-hand side of the quadratic surface is a sum over rows of v^b times per-row sums in u
// alone, so a pixel costs a few additions instead of the 22 products of add_moments, and reads its u^1, u^2
// from two small per-column tables (cached) instead of u, v, w from three cube-sized arrays.

// grid: (blocks over rows, epochs); each warp takes rows r = warp, warp + n_warps, ... of epoch
// t = t0 + blockIdx.y and writes part[t, r, 0:9] = [sum d, sum d u, sum d u^2, n, sum u^0..u^4] over the
// row's usable (non-NaN) pixels d. u12 (2, cols) holds u and u^2 per column.
extern "C" __global__ void __launch_bounds__(256)
ramp_row_partials(const float* __restrict__ cube, const double* __restrict__ u12, const long long rows,
                  const long long cols, const long long t0, double* __restrict__ part) {
    const long long t = t0 + blockIdx.y;
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)(blockDim.x >> 5);
    const double* __restrict__ u1 = u12;
    const double* __restrict__ u2 = u12 + cols;
    for (long long r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += (long long)gridDim.x * warps) {
        const float* row = cube + (t * rows + r) * cols;
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, n = 0.0, m1 = 0.0, m2 = 0.0, m3 = 0.0, m4 = 0.0;
        long long i = lane;
        for (; i + 32 * (UNROLL - 1) < cols; i += 32 * UNROLL) {
            float d[UNROLL];
            double a[UNROLL], b[UNROLL];
#pragma unroll
            for (int s = 0; s < UNROLL; ++s) {
                d[s] = row[i + 32 * s];
                a[s] = u1[i + 32 * s];
                b[s] = u2[i + 32 * s];
            }
#pragma unroll
            for (int s = 0; s < UNROLL; ++s) {
                const bool ok = d[s] == d[s];
                const double dd = ok ? (double)d[s] : 0.0, a1 = ok ? a[s] : 0.0, a2 = ok ? b[s] : 0.0;
                s0 += dd; s1 += dd * a[s]; s2 += dd * b[s];
                n += ok ? 1.0 : 0.0; m1 += a1; m2 += a2; m3 += a1 * b[s]; m4 += a2 * b[s];
            }
        }
        for (; i < cols; i += 32) {
            const float d = row[i];
            const bool ok = d == d;
            const double a = u1[i], b = u2[i];
            const double dd = ok ? (double)d : 0.0, a1 = ok ? a : 0.0, a2 = ok ? b : 0.0;
            s0 += dd; s1 += dd * a; s2 += dd * b;
            n += ok ? 1.0 : 0.0; m1 += a1; m2 += a2; m3 += a1 * b; m4 += a2 * b;
        }
        s0 = warp_sum(s0); s1 = warp_sum(s1); s2 = warp_sum(s2); n = warp_sum(n);
        m1 = warp_sum(m1); m2 = warp_sum(m2); m3 = warp_sum(m3); m4 = warp_sum(m4);
        if (lane == 0) {
            double* p = part + (t * rows + r) * 9;
            p[0] = s0; p[1] = s1; p[2] = s2; p[3] = n; p[4] = n; p[5] = m1; p[6] = m2; p[7] = m3; p[8] = m4;
        }
    }
}

// grid: (epochs); block t - t0 sums the row partials of epoch t times the powers of v (vr: v per row) in a
// fixed order into out[t, 0:22], laid out as ramp_moments' sums: 15 moments, 6 right-hand sides, count.
extern "C" __global__ void __launch_bounds__(256)
ramp_row_reduce(const double* __restrict__ part, const double* __restrict__ vr, const long long rows,
                const long long t0, double* __restrict__ out) {
    const long long t = t0 + blockIdx.x;
    double acc[N_ACC];
#pragma unroll
    for (int k = 0; k < N_ACC; ++k) acc[k] = 0.0;
    for (long long r = threadIdx.x; r < rows; r += blockDim.x) {
        const double* p = part + (t * rows + r) * 9;
        const double v1 = vr[r], v2 = v1 * v1, v3 = v2 * v1;
        const double s0 = p[0], s1 = p[1], s2 = p[2], m0 = p[4], m1 = p[5], m2 = p[6], m3 = p[7], m4 = p[8];
        acc[0] += m0; acc[1] += m1; acc[2] += v1 * m0; acc[3] += m2; acc[4] += v1 * m1; acc[5] += v2 * m0;
        acc[6] += m3; acc[7] += v1 * m2; acc[8] += v2 * m1; acc[9] += v3 * m0;
        acc[10] += m4; acc[11] += v1 * m3; acc[12] += v2 * m2; acc[13] += v3 * m1; acc[14] += v2 * v2 * m0;
        acc[15] += s0; acc[16] += s1; acc[17] += v1 * s0; acc[18] += s2; acc[19] += v1 * s1; acc[20] += v2 * s0;
        acc[21] += p[3];
    }
    store_block_sums(acc, out + t * N_ACC);
}

// grid: (blocks over rows, epochs); out[t, r, c] = cube[t, r, c] - ramp_t(uc[c], vr[r]) for t = t0 + blockIdx.y,
// one warp per row: per row the ramp is a + u (b + c3 u). out may be cube itself (in place).
extern "C" __global__ void __launch_bounds__(256)
ramp_grid_subtract(const float* cube, const double* __restrict__ coef, const double* __restrict__ uc,
                   const double* __restrict__ vr, const long long rows, const long long cols, const long long t0,
                   float* out) {
    const long long t = t0 + blockIdx.y;
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)(blockDim.x >> 5);
    const double* c = coef + 6 * t;
    for (long long r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += (long long)gridDim.x * warps) {
        const double vv = vr[r];
        const double a = c[0] + vv * (c[2] + c[5] * vv), b = c[1] + c[4] * vv, c3 = c[3];
        const float* row = cube + (t * rows + r) * cols;
        float* orow = out + (t * rows + r) * cols;
        long long i = lane;
        for (; i + 32 * (UNROLL - 1) < cols; i += 32 * UNROLL) {
            float d[UNROLL];
            double uu[UNROLL];
#pragma unroll
            for (int s = 0; s < UNROLL; ++s) {
                d[s] = row[i + 32 * s];
                uu[s] = uc[i + 32 * s];
            }
#pragma unroll
            for (int s = 0; s < UNROLL; ++s)
                orow[i + 32 * s] = (float)((double)d[s] - (a + uu[s] * (b + c3 * uu[s])));
        }
        for (; i < cols; i += 32) {
            const double uu = uc[i];
            orow[i] = (float)((double)row[i] - (a + uu * (b + c3 * uu)));
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
