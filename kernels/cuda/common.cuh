// Shared definitions of the fastdrmm CUDA C kernels.
//
// Compile-time tile constants come from the loader's options (-DFD_THREADS=... etc., see
// launch.py: Config.defines); the defaults below are the GPU configuration. Every kernel uses
// static shared memory and __syncthreads only, so the host harness under tests/cuda_harness/
// runs these sources unmodified. A kernel that synchronises never returns before its last
// __syncthreads in a block-divergent way.
#pragma once

#ifndef FD_THREADS
#define FD_THREADS 256   // threads per block (1-D blocks), a power of two
#endif
#ifndef FD_KB
#define FD_KB 4          // templates (matching) / channels (rendering) per block
#endif
#ifndef FD_XS_CAP
#define FD_XS_CAP 2048   // shared elements for the staged input / code patch
#endif
#ifndef FD_WS_CAP
#define FD_WS_CAP 1024   // shared elements for the staged templates
#endif
#ifndef FD_ZS_CAP
#define FD_ZS_CAP 1024   // shared elements for the switched matches of one tile
#endif

template <typename T>
__device__ __forceinline__ bool fd_isnan(T v) { return v != v; }

// y = z for z > 0 or NaN; else 0 (plain ReLU, -inf -> 0) or leak * z.
template <typename T>
__device__ __forceinline__ T fd_switch(T z, T leak) {
    if (z > T(0) || fd_isnan(z)) return z;
    return leak == T(0) ? T(0) : leak * z;
}

// Does candidate v replace the running best? Only while best is not NaN, and when v is
// larger or NaN: the first maximum and the first NaN win.
template <typename T>
__device__ __forceinline__ bool fd_takes(T best, T v) {
    return !fd_isnan(best) && (v > best || fd_isnan(v));
}

__device__ __forceinline__ int fd_min(int a, int b) { return a < b ? a : b; }

// Sum of one value per thread over the block; every thread must call it. red: FD_THREADS
// shared elements. The result is valid in every thread.
template <typename T>
__device__ __forceinline__ T fd_block_sum(T v, T* red) {
    const int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int s = FD_THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    return red[0];
}
