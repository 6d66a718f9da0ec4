// Per-pixel least squares with one shared design A (T, N_TERMS), one thread per pixel, float64 throughout.
// Compile with -DN_TERMS=n (cuda.py does, one module per n). Streams the (T, N) float32 cube once (coalesced:
// consecutive threads read consecutive pixels of an epoch), accumulates the packed upper triangle of A^T W A and
// A^T W y in registers, solves with an in-register Cholesky; a second pass gives the residual rms on request.
//
// Without per-observation weights the normal matrix of a pixel depends only on which epochs it misses. The
// epochs are taken 32 at a time: a pixel adds only A^T W y per observation, keeps a bit per usable epoch, and
// after the 32 adds the chunk's precomputed matrix minus the outer products of its missing epochs (or, when it
// misses more than half, the outer products of its usable ones, so nothing cancels badly). A gap-free pixel
// does N_TERMS multiply-adds per observation instead of N_TERMS + N_PAIR.
#ifndef N_TERMS
#define N_TERMS 4
#endif
#define N_PAIR (N_TERMS * (N_TERMS + 1) / 2)
// Epochs whose loads are issued before any of them is used: one 4-byte load in flight per thread cannot cover
// the device memory's latency, UNROLL of them can. The sums still run over t in order (results do not change).
#define UNROLL 8

// Weight of pixel p's observation at epoch t: the epoch's weight, times the observation's own when given.
__device__ __forceinline__ double obs_weight(const double* __restrict__ ew, const double* __restrict__ wt,
                                            const int has_wt, const int t, const long long N, const long long p) {
    return has_wt ? ew[t] * wt[(long long)t * N + p] : ew[t];
}

// Adds observation (y, w) at epoch t to the normal equations; an unusable one (NaN, zero weight) adds nothing.
__device__ __forceinline__ void add_obs(double (&nrm)[N_PAIR], double (&rhs)[N_TERMS], double& cnt,
                                        const double* __restrict__ a, const float y, const double w) {
    if (!(y == y) || !(w > 0.0)) return;
    cnt += 1.0;
    int q = 0;
#pragma unroll
    for (int j = 0; j < N_TERMS; ++j) {
        const double wa = w * a[j];
        rhs[j] += wa * (double)y;
#pragma unroll
        for (int k = j; k < N_TERMS; ++k) nrm[q++] += wa * a[k];
    }
}

// nrm += w a a^T (packed upper triangle); w < 0 takes an observation out.
__device__ __forceinline__ void add_outer(double (&nrm)[N_PAIR], const double* __restrict__ a, const double w) {
    int q = 0;
#pragma unroll
    for (int j = 0; j < N_TERMS; ++j) {
        const double wa = w * a[j];
#pragma unroll
        for (int k = j; k < N_TERMS; ++k) nrm[q++] += wa * a[k];
    }
}

__device__ __forceinline__ void add_residual(double& ss, const double* __restrict__ a, const double (&xs)[N_TERMS],
                                             const float y, const double w) {
    if (!(y == y) || !(w > 0.0)) return;
    double pred = 0.0;
#pragma unroll
    for (int k = 0; k < N_TERMS; ++k) pred += a[k] * xs[k];
    const double r = (double)y - pred;
    ss += r * r;
}

extern "C" __global__ void __launch_bounds__(256) shared_fit(const double* __restrict__ A,      // (T, n) column-scaled design
                                      const double* __restrict__ ew,     // (T,) epoch weights (0 drops)
                                      const float* __restrict__ Y,       // (T, N)
                                      const double* __restrict__ wt,     // (T, N) per-observation weights
                                      const int has_wt, const int want_rms, const int T, const long long N,
                                      const double* __restrict__ colscale,  // (n,) x = x_scaled / colscale
                                      const double* __restrict__ chunk_nrm,  // (ceil(T/32), N_PAIR) sum w a a^T
                                      const unsigned* __restrict__ chunk_epochs,  // (ceil(T/32),) bits: w > 0
                                      double* __restrict__ x_out,        // (n, N)
                                      long long* __restrict__ n_out,     // (N,)
                                      double* __restrict__ rms_out) {    // (N,)
    const long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (p >= N) return;
    double nrm[N_PAIR];
    double rhs[N_TERMS];
#pragma unroll
    for (int q = 0; q < N_PAIR; ++q) nrm[q] = 0.0;
#pragma unroll
    for (int k = 0; k < N_TERMS; ++k) rhs[k] = 0.0;
    double cnt = 0.0;
    if (has_wt) {
        int t = 0;
        for (; t + UNROLL <= T; t += UNROLL) {
            float y[UNROLL];
            double w[UNROLL];
#pragma unroll
            for (int s = 0; s < UNROLL; ++s) y[s] = Y[(long long)(t + s) * N + p];
#pragma unroll
            for (int s = 0; s < UNROLL; ++s) w[s] = obs_weight(ew, wt, 1, t + s, N, p);
#pragma unroll
            for (int s = 0; s < UNROLL; ++s) add_obs(nrm, rhs, cnt, A + (t + s) * N_TERMS, y[s], w[s]);
        }
        for (; t < T; ++t)
            add_obs(nrm, rhs, cnt, A + t * N_TERMS, Y[(long long)t * N + p], obs_weight(ew, wt, 1, t, N, p));
    } else {
        for (int c0 = 0; c0 < T; c0 += 32) {
            unsigned usable = 0;  // bit s: epoch c0 + s has a value and a positive weight
            for (int s0 = 0; s0 < 32; s0 += UNROLL) {
                float y[UNROLL];
#pragma unroll
                for (int s = 0; s < UNROLL; ++s) y[s] = Y[(long long)min(c0 + s0 + s, T - 1) * N + p];
#pragma unroll
                for (int s = 0; s < UNROLL; ++s) {
                    const int t = c0 + s0 + s;
                    if (t < T && y[s] == y[s] && ew[t] > 0.0) {
                        usable |= 1u << (s0 + s);
                        const double wy = ew[t] * (double)y[s];
                        const double* a = A + t * N_TERMS;
#pragma unroll
                        for (int k = 0; k < N_TERMS; ++k) rhs[k] += wy * a[k];
                    }
                }
            }
            const unsigned missing = chunk_epochs[c0 >> 5] & ~usable;
            const int n_use = __popc(usable), n_miss = __popc(missing);
            cnt += (double)n_use;
            if (n_miss <= n_use) {
                const double* g = chunk_nrm + (long long)(c0 >> 5) * N_PAIR;
#pragma unroll
                for (int q = 0; q < N_PAIR; ++q) nrm[q] += g[q];
                for (unsigned b = missing; b; b &= b - 1) {
                    const int t = c0 + __ffs(b) - 1;
                    add_outer(nrm, A + t * N_TERMS, -ew[t]);
                }
            } else {
                for (unsigned b = usable; b; b &= b - 1) {
                    const int t = c0 + __ffs(b) - 1;
                    add_outer(nrm, A + t * N_TERMS, ew[t]);
                }
            }
        }
    }
    n_out[p] = (long long)cnt;
    double L[N_TERMS][N_TERMS];
    bool good = cnt >= N_TERMS;
    {
        int q = 0;
#pragma unroll
        for (int j = 0; j < N_TERMS; ++j)
#pragma unroll
            for (int k = j; k < N_TERMS; ++k) L[k][j] = nrm[q++];
    }
#pragma unroll
    for (int j = 0; j < N_TERMS; ++j) {
        double d = L[j][j];
        for (int k = 0; k < j; ++k) d -= L[j][k] * L[j][k];
        good = good && (d > 1e-13 * L[j][j]) && (d > 0.0);
        d = sqrt(d > 0.0 ? d : 1.0);
        L[j][j] = d;
        for (int r = j + 1; r < N_TERMS; ++r) {
            double acc = L[r][j];
            for (int k = 0; k < j; ++k) acc -= L[r][k] * L[j][k];
            L[r][j] = acc / d;
        }
    }
    double z[N_TERMS], xs[N_TERMS];
#pragma unroll
    for (int j = 0; j < N_TERMS; ++j) {
        double acc = rhs[j];
        for (int k = 0; k < j; ++k) acc -= L[j][k] * z[k];
        z[j] = acc / L[j][j];
    }
#pragma unroll
    for (int j = N_TERMS - 1; j >= 0; --j) {
        double acc = z[j];
        for (int k = j + 1; k < N_TERMS; ++k) acc -= L[k][j] * xs[k];
        xs[j] = acc / L[j][j];
    }
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
#pragma unroll
    for (int k = 0; k < N_TERMS; ++k) x_out[(long long)k * N + p] = good ? xs[k] / colscale[k] : nan;
    if (want_rms) {
        double ss = 0.0;
        int t = 0;
        for (; t + UNROLL <= T; t += UNROLL) {
            float y[UNROLL];
            double w[UNROLL];
#pragma unroll
            for (int s = 0; s < UNROLL; ++s) y[s] = Y[(long long)(t + s) * N + p];
#pragma unroll
            for (int s = 0; s < UNROLL; ++s) w[s] = obs_weight(ew, wt, has_wt, t + s, N, p);
#pragma unroll
            for (int s = 0; s < UNROLL; ++s) add_residual(ss, A + (t + s) * N_TERMS, xs, y[s], w[s]);
        }
        for (; t < T; ++t)
            add_residual(ss, A + t * N_TERMS, xs, Y[(long long)t * N + p], obs_weight(ew, wt, has_wt, t, N, p));
        rms_out[p] = good ? sqrt(ss / cnt) : nan;
    }
}
