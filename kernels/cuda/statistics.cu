// M-step statistics from the unpooled code U: B, s and the Gram matrix G = D^T D.
// Each output entry is one block-wide deterministic reduction (no atomics); the shifted
// planes S of the reference (K*kh*kw images of N*H*W) are never formed: their entries are
// read from U on the fly.
#include "common.cuh"

// B[k,c,a,b] = sum_{n,i,j} U[n,k,i,j] xpad[n,c,i+a,j+b]; one block per (k, c, a, b).
template <typename T>
__global__ void stats_b(
    const T* __restrict__ u, const T* __restrict__ x, T* __restrict__ big_b,
    int N, int K, int C, int H, int W, int Ho, int Wo, int kh, int kw, int padh, int padw)
{
    __shared__ T red[FD_THREADS];
    long long blk = blockIdx.x;
    const int bb = (int)(blk % kw); blk /= kw;
    const int a = (int)(blk % kh); blk /= kh;
    const int c = (int)(blk % C); blk /= C;
    const int k = (int)blk;
    const int plane = Ho * Wo;
    T acc = T(0);
    for (long long e = threadIdx.x; e < (long long)N * plane; e += FD_THREADS) {
        const long long n = e / plane;
        const int q = (int)(e % plane), i = q / Wo, j = q % Wo;
        const int gi = i + a - padh, gj = j + bb - padw;
        T xv = T(0);
        if (gi >= 0 && gi < H && gj >= 0 && gj < W) xv = x[((n * C + c) * H + gi) * W + gj];
        acc += u[(n * K + k) * plane + q] * xv;
    }
    acc = fd_block_sum(acc, red);
    if (threadIdx.x == 0) big_b[blockIdx.x] = acc;
}

// s[k] = sum_{n,i,j} U[n,k,i,j]; one block per k.
template <typename T>
__global__ void stats_s(const T* __restrict__ u, T* __restrict__ s, int N, int K, int plane)
{
    __shared__ T red[FD_THREADS];
    const int k = blockIdx.x;
    T acc = T(0);
    for (long long e = threadIdx.x; e < (long long)N * plane; e += FD_THREADS)
        acc += u[(e / plane * K + k) * plane + e % plane];
    acc = fd_block_sum(acc, red);
    if (threadIdx.x == 0) s[k] = acc;
}

// G[r1,r2] = sum_{n,y,x} S_r1[n,y,x] S_r2[n,y,x] with S_(k,a,b)[n,y,x] = U[n,k,y+padh-a,
// x+padw-b] (zero off the plane), over the cropped H x W image; rows r = (k*kh + a)*kw + b.
// One block per (r1, r2) with r1 <= r2, written to both halves: G is exactly symmetric.
template <typename T>
__global__ void stats_g(
    const T* __restrict__ u, T* __restrict__ g,
    int N, int K, int H, int W, int Ho, int Wo, int kh, int kw, int padh, int padw)
{
    __shared__ T red[FD_THREADS];
    const int R = K * kh * kw;
    const int r1 = (int)(blockIdx.x / R), r2 = (int)(blockIdx.x % R);
    if (r1 > r2) return;  // uniform over the block
    const int k1 = r1 / (kh * kw), a1 = r1 / kw % kh, b1 = r1 % kw;
    const int k2 = r2 / (kh * kw), a2 = r2 / kw % kh, b2 = r2 % kw;
    const int plane = H * W;
    T acc = T(0);
    for (long long e = threadIdx.x; e < (long long)N * plane; e += FD_THREADS) {
        const long long n = e / plane;
        const int q = (int)(e % plane), y = q / W, xx = q % W;
        const int i1 = y + padh - a1, j1 = xx + padw - b1;
        const int i2 = y + padh - a2, j2 = xx + padw - b2;
        if (i1 < 0 || i1 >= Ho || j1 < 0 || j1 >= Wo) continue;
        if (i2 < 0 || i2 >= Ho || j2 < 0 || j2 >= Wo) continue;
        acc += u[((n * K + k1) * Ho + i1) * Wo + j1] * u[((n * K + k2) * Ho + i2) * Wo + j2];
    }
    acc = fd_block_sum(acc, red);
    if (threadIdx.x == 0) {
        g[(long long)r1 * R + r2] = acc;
        g[(long long)r2 * R + r1] = acc;
    }
}
