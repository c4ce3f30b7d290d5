// Top-down: unpooling (collisions add) and the transposed correlation with the templates.
#include "common.cuh"

// u (zeroed by the caller) += code * switches at idx; one thread per code entry. Windows may
// overlap, so two entries can hit one position: atomicAdd (the only atomic of the package).
template <typename T>
__global__ void unpool_scatter(
    const T* __restrict__ code, const int* __restrict__ idx, const T* __restrict__ sw,
    T* __restrict__ u, int total, int plane_in, int plane_out, int has_sw)
{
    const long long e = (long long)blockIdx.x * FD_THREADS + threadIdx.x;
    if (e >= total) return;
    const T val = has_sw ? code[e] * sw[e] : code[e];
    atomicAdd(u + (e / plane_in) * plane_out + idx[e], val);
}

// r[n,c,y,x] = sum_{k,a,b} U[n,k,y+padh-a,x+padw-b] W[k,c,a,b], a gather (race free).
// One block: sample n, FD_KB channels from c0, a th x tw tile of r (th*tw <= FD_THREADS,
// one output position per thread, FD_KB accumulators in registers). Per chunk of kchunk
// templates the block stages the code patch and the templates in shared memory.
template <typename T>
__global__ void render_tiled(
    const T* __restrict__ u, const T* __restrict__ w, T* __restrict__ r,
    int N, int K, int C, int H, int W, int Ho, int Wo, int kh, int kw, int padh, int padw,
    int th, int tw, int kchunk)
{
    __shared__ T us[FD_XS_CAP];
    __shared__ T ws[FD_WS_CAP];
    const int tid = threadIdx.x;
    const int tiles_w = (W + tw - 1) / tw, tiles_h = (H + th - 1) / th;
    const int cblocks = (C + FD_KB - 1) / FD_KB;
    long long b = blockIdx.x;
    const int bw = (int)(b % tiles_w); b /= tiles_w;
    const int bh = (int)(b % tiles_h); b /= tiles_h;
    const int cb = (int)(b % cblocks); b /= cblocks;
    const int n = (int)b;
    const int c0 = cb * FD_KB, y0 = bh * th, x0 = bw * tw;
    const int UH = th + kh - 1, UW = tw + kw - 1, nu = UH * UW, ntap = kh * kw;
    const int ui0 = y0 + padh - (kh - 1), uj0 = x0 + padw - (kw - 1);
    const int ty = tid / tw, tx = tid % tw;
    T acc[FD_KB];
    for (int cc = 0; cc < FD_KB; ++cc) acc[cc] = T(0);

    for (int k0 = 0; k0 < K; k0 += kchunk) {
        const int kn = fd_min(kchunk, K - k0);
        __syncthreads();  // the previous chunk's readers are done
        for (int e = tid; e < kn * nu; e += FD_THREADS) {
            const int kk = e / nu, q = e % nu;
            const int gi = ui0 + q / UW, gj = uj0 + q % UW;
            T v = T(0);
            if (gi >= 0 && gi < Ho && gj >= 0 && gj < Wo)
                v = u[(((long long)n * K + k0 + kk) * Ho + gi) * Wo + gj];
            us[e] = v;
        }
        for (int e = tid; e < kn * FD_KB * ntap; e += FD_THREADS) {
            const int kk = e / (FD_KB * ntap), q = e % (FD_KB * ntap);
            const int c = c0 + q / ntap;
            ws[e] = c < C ? w[((long long)(k0 + kk) * C + c) * ntap + q % ntap] : T(0);
        }
        __syncthreads();
        if (ty < th) {
            for (int kk = 0; kk < kn; ++kk)
                for (int a = 0; a < kh; ++a)
                    for (int bb = 0; bb < kw; ++bb) {
                        const T uv = us[(kk * UH + ty + kh - 1 - a) * UW + tx + kw - 1 - bb];
                        for (int cc = 0; cc < FD_KB; ++cc)
                            acc[cc] += uv * ws[(kk * FD_KB + cc) * ntap + a * kw + bb];
                    }
        }
    }
    const int y = y0 + ty, xx = x0 + tx;
    if (ty < th && y < H && xx < W)
        for (int cc = 0; cc < FD_KB && c0 + cc < C; ++cc)
            r[(((long long)n * C + c0 + cc) * H + y) * W + xx] = acc[cc];
}

// Fallback when even a 1x1 tile's patch does not fit: one thread per output element.
template <typename T>
__global__ void render_direct(
    const T* __restrict__ u, const T* __restrict__ w, T* __restrict__ r,
    int N, int K, int C, int H, int W, int Ho, int Wo, int kh, int kw, int padh, int padw)
{
    const long long o = (long long)blockIdx.x * FD_THREADS + threadIdx.x;
    if (o >= (long long)N * C * H * W) return;
    const int xx = (int)(o % W), y = (int)(o / W % H), c = (int)(o / ((long long)W * H) % C);
    const long long n = o / ((long long)W * H * C);
    T acc = T(0);
    for (int k = 0; k < K; ++k)
        for (int a = 0; a < kh; ++a)
            for (int bb = 0; bb < kw; ++bb) {
                const int i = y + padh - a, j = xx + padw - bb;
                if (i >= 0 && i < Ho && j >= 0 && j < Wo)
                    acc += u[((n * K + k) * Ho + i) * Wo + j] *
                           w[(((long long)k * C + c) * kh + a) * kw + bb];
            }
    r[o] = acc;
}
