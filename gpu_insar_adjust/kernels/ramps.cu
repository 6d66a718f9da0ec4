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

// grid: (blocks over pixels, T). Accumulates, for epoch t = blockIdx.y, the 15 moments sum w u^a v^b
// (a + b <= 4), the 6 sums w y [1, u, v, u^2, uv, v^2] and the usable count into out[t, 22] (atomicAdd).
extern "C" __global__ void ramp_moments(const float* __restrict__ cube, const double* __restrict__ u,
                                        const double* __restrict__ v, const double* __restrict__ w,
                                        const unsigned char* __restrict__ mask, const double* __restrict__ wt,
                                        const int has_mask, const int has_wt, const long long n_pix,
                                        double* __restrict__ out) {
    const long long t = blockIdx.y;
    double acc[N_ACC];
#pragma unroll
    for (int k = 0; k < N_ACC; ++k) acc[k] = 0.0;
    const float* row = cube + t * n_pix;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_pix;
         i += (long long)gridDim.x * blockDim.x) {
        const float y = row[i];
        const double wi = has_wt ? wt[t * n_pix + i] : w[i];
        bool ok = (y == y) && (wi > 0.0);
        if (has_mask) ok = ok && (mask[t * n_pix + i] != 0);
        if (!ok) continue;
        const double uu = u[i], vv = v[i];
        const double a = wi, au = a * uu, av = a * vv, auu = au * uu, auv = au * vv, avv = av * vv;
        acc[0] += a;  acc[1] += au;  acc[2] += av;  acc[3] += auu; acc[4] += auv; acc[5] += avv;
        acc[6] += auu * uu; acc[7] += auu * vv; acc[8] += auv * vv; acc[9] += avv * vv;
        acc[10] += auu * uu * uu; acc[11] += auu * uu * vv; acc[12] += auu * vv * vv; acc[13] += auv * vv * vv;
        acc[14] += avv * vv * vv;
        const double yw = (double)y * wi, yu = yw * uu, yv = yw * vv;
        acc[15] += yw; acc[16] += yu; acc[17] += yv; acc[18] += yu * uu; acc[19] += yu * vv; acc[20] += yv * vv;
        acc[21] += 1.0;
    }
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
            if (lane == 0) atomicAdd(&out[t * (N_ACC) + k], s);
        }
    }
}

// out[t, i] = cube[t, i] - ramp_t(u_i, v_i) with coef (T, 6) in centred coordinates (zero padded).
// out may be cube itself (in place).
extern "C" __global__ void ramp_subtract(const float* cube, const double* __restrict__ coef,
                                         const double* __restrict__ u, const double* __restrict__ v,
                                         const long long n_pix, const long long n_tot, float* out) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n_tot;
         k += (long long)gridDim.x * blockDim.x) {
        const long long t = k / n_pix, i = k - t * n_pix;
        const double* c = coef + 6 * t;
        const double uu = u[i], vv = v[i];
        out[k] = (float)((double)cube[k] - (c[0] + uu * (c[1] + c[3] * uu + c[4] * vv) + vv * (c[2] + c[5] * vv)));
    }
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
