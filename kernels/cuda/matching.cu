// Bottom-up: fused template matching + bias + switch + max-over-translation pooling.
// z never reaches global memory: a block stages an input tile and its templates in shared
// memory, accumulates the matches of its pooled tile in shared memory, and writes h and idx.
#include "common.cuh"

// One block: sample n, FD_KB templates from k0, a tile of tph x tpw pooled outputs.
// Phase 1, per chunk of cchunk channels: stage the input patch (zero padded) and the
// templates, then each thread adds the chunk's matches to the z entries it owns (fixed
// owner, so the running sums in zs need no synchronisation). Phase 2: bias and switch by the
// same owners. Phase 3: one thread per (template, pooled output) scans its window in
// row-major order. The host (launch.py) picks tph, tpw and cchunk to fit the shared caps.
template <typename T>
__global__ void match_pool_tiled(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    T* __restrict__ h, int* __restrict__ idx,
    int N, int C, int H, int W, int K, int kh, int kw, int padh, int padw,
    int poolh, int poolw, int sh, int sw, int Ho, int Wo, int Hp, int Wp, T leak,
    int tph, int tpw, int cchunk)
{
    __shared__ T xs[FD_XS_CAP];
    __shared__ T ws[FD_WS_CAP];
    __shared__ T zs[FD_ZS_CAP];
    const int tid = threadIdx.x;
    const int tiles_w = (Wp + tpw - 1) / tpw, tiles_h = (Hp + tph - 1) / tph;
    const int kblocks = (K + FD_KB - 1) / FD_KB;
    long long b = blockIdx.x;
    const int tw = (int)(b % tiles_w); b /= tiles_w;
    const int th = (int)(b % tiles_h); b /= tiles_h;
    const int kb = (int)(b % kblocks); b /= kblocks;
    const int n = (int)b;
    const int k0 = kb * FD_KB, p0 = th * tph, q0 = tw * tpw;
    const int np = fd_min(tph, Hp - p0), nq = fd_min(tpw, Wp - q0);
    const int ZH = (np - 1) * sh + poolh, ZW = (nq - 1) * sw + poolw, nz = ZH * ZW;
    const int XH = ZH + kh - 1, XW = ZW + kw - 1, nx = XH * XW, ntap = kh * kw;
    const int zi0 = p0 * sh, zj0 = q0 * sw;
    const int xi0 = zi0 - padh, xj0 = zj0 - padw;

    for (int e = tid; e < FD_KB * nz; e += FD_THREADS) zs[e] = T(0);

    for (int c0 = 0; c0 < C; c0 += cchunk) {
        const int cn = fd_min(cchunk, C - c0);
        __syncthreads();  // the previous chunk's readers are done with xs and ws
        for (int e = tid; e < cn * nx; e += FD_THREADS) {
            const int cc = e / nx, r = e % nx;
            const int gi = xi0 + r / XW, gj = xj0 + r % XW;
            T v = T(0);
            if (gi >= 0 && gi < H && gj >= 0 && gj < W)
                v = x[(((long long)n * C + c0 + cc) * H + gi) * W + gj];
            xs[e] = v;
        }
        for (int e = tid; e < FD_KB * cn * ntap; e += FD_THREADS) {
            const int kk = e / (cn * ntap), r = e % (cn * ntap), k = k0 + kk;
            ws[e] = k < K ? w[((long long)k * C + c0) * ntap + r] : T(0);
        }
        __syncthreads();
        for (int e = tid; e < FD_KB * nz; e += FD_THREADS) {
            const int kk = e / nz, t = e % nz, zi = t / ZW, zj = t % ZW;
            if (zi % sh >= poolh || zj % sw >= poolw) continue;  // in no window (gaps)
            T acc = zs[e];
            for (int cc = 0; cc < cn; ++cc) {
                const T* wp = ws + (kk * cn + cc) * ntap;
                const T* xp = xs + (cc * XH + zi) * XW + zj;
                for (int u = 0; u < kh; ++u)
                    for (int v = 0; v < kw; ++v)
                        acc += wp[u * kw + v] * xp[u * XW + v];
            }
            zs[e] = acc;
        }
    }
    for (int e = tid; e < FD_KB * nz; e += FD_THREADS) {
        const int k = k0 + e / nz;
        zs[e] = k < K ? fd_switch(zs[e] + bias[k], leak) : T(0);
    }
    __syncthreads();
    for (int e = tid; e < FD_KB * np * nq; e += FD_THREADS) {
        const int kk = e / (np * nq), r = e % (np * nq), pp = r / nq, qq = r % nq;
        const int k = k0 + kk;
        if (k >= K) continue;
        T best = T(0);
        int where = 0;
        for (int a = 0; a < poolh; ++a)
            for (int c = 0; c < poolw; ++c) {
                const int zi = pp * sh + a, zj = qq * sw + c;
                const T v = zs[kk * nz + zi * ZW + zj];
                if ((a == 0 && c == 0) || fd_takes(best, v)) {
                    best = v;
                    where = (zi0 + zi) * Wo + zj0 + zj;
                }
            }
        const long long o = (((long long)n * K + k) * Hp + p0 + pp) * Wp + q0 + qq;
        h[o] = best;
        idx[o] = where;
    }
}

// Fallback for geometries whose smallest tile does not fit the shared caps (huge templates
// or windows): one thread per pooled output computes its window's matches from global
// memory with a running max. Still one pass, z in registers only.
template <typename T>
__global__ void match_pool_direct(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    T* __restrict__ h, int* __restrict__ idx,
    int N, int C, int H, int W, int K, int kh, int kw, int padh, int padw,
    int poolh, int poolw, int sh, int sw, int Ho, int Wo, int Hp, int Wp, T leak)
{
    const long long o = (long long)blockIdx.x * FD_THREADS + threadIdx.x;
    if (o >= (long long)N * K * Hp * Wp) return;
    const int q = (int)(o % Wp), p = (int)(o / Wp % Hp), k = (int)(o / ((long long)Wp * Hp) % K);
    const long long n = o / ((long long)Wp * Hp * K);
    T best = T(0);
    int where = 0;
    for (int a = 0; a < poolh; ++a)
        for (int c = 0; c < poolw; ++c) {
            const int i = p * sh + a, j = q * sw + c;
            T z = T(0);
            for (int ch = 0; ch < C; ++ch)
                for (int u = 0; u < kh; ++u)
                    for (int v = 0; v < kw; ++v) {
                        const int gi = i + u - padh, gj = j + v - padw;
                        T xv = T(0);
                        if (gi >= 0 && gi < H && gj >= 0 && gj < W)
                            xv = x[((n * C + ch) * H + gi) * W + gj];
                        z += w[(((long long)k * C + ch) * kh + u) * kw + v] * xv;
                    }
            const T y = fd_switch(z + bias[k], leak);
            if ((a == 0 && c == 0) || fd_takes(best, y)) {
                best = y;
                where = i * Wo + j;
            }
        }
    h[o] = best;
    idx[o] = where;
}

// The matching read at given positions, times the switches (fastdrmm.ops.match_at): one
// thread per output unit o = ((n * K + k) * Hp + p) * Wp + q, flat position idx[o] = i*Wo + j.
// One thread per unit rather than tiles or a warp per unit: every unit has its own position,
// so units share no patch to stage in shared memory, and there are many of them (N*K*Hp*Wp)
// so a unit's C*kh*kw taps need not be split over lanes (no shuffle reduction to pay).
// Consecutive threads take consecutive units of one (n, k) plane: a warp loads one template
// tap at a time (a broadcast) and nearby patches (neighbouring windows), served by L1.
// A switched-off unit writes 0 without reading x, so a NaN or inf there cannot leak. Taps in
// the padding multiply a zero, as in the reference. sw is not read when has_sw is 0.
template <typename T>
__global__ void match_at(
    const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ idx,
    const T* __restrict__ sw, T* __restrict__ out,
    int N, int C, int H, int W, int K, int kh, int kw, int padh, int padw, int Wo,
    int units_per_plane, int has_sw)
{
    const long long o = (long long)blockIdx.x * FD_THREADS + threadIdx.x;
    if (o >= (long long)N * K * units_per_plane) return;
    const T s = has_sw ? sw[o] : T(1);
    if (s == T(0)) {
        out[o] = T(0);
        return;
    }
    const long long nk = o / units_per_plane;
    const int k = (int)(nk % K);
    const long long n = nk / K;
    const int i = idx[o] / Wo, j = idx[o] % Wo;
    const int ntap = kh * kw;
    T acc = T(0);
    for (int c = 0; c < C; ++c) {
        const T* wc = w + ((long long)k * C + c) * ntap;
        const T* xc = x + (n * C + c) * H * W;
        for (int u = 0; u < kh; ++u) {
            const int gi = i + u - padh;
            const bool row_inside = gi >= 0 && gi < H;
            for (int v = 0; v < kw; ++v) {
                const int gj = j + v - padw;
                const T xv = row_inside && gj >= 0 && gj < W ? xc[(long long)gi * W + gj] : T(0);
                acc += wc[u * kw + v] * xv;
            }
        }
    }
    out[o] = acc * s;
}
