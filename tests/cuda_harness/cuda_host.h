// Host-side CUDA harness: runs fastdrmm's .cu kernels unmodified on the CPU.
//
// Included before the sources (g++ -include cuda_host.h). Maps the CUDA C features the
// kernels use onto C++20: one std::thread per CUDA thread of a block, blocks one after
// another (the same threads loop over the blocks), __syncthreads as a std::barrier,
// __shared__ as function-static storage (one block at a time uses it), atomicAdd through
// std::atomic_ref. Anything else is deliberately missing, so a kernel that uses it fails
// to compile here.
#pragma once
#include <atomic>
#include <barrier>
#include <cstddef>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
inline std::barrier<>* cuda_host_barrier = nullptr;

inline void __syncthreads() { cuda_host_barrier->arrive_and_wait(); }

template <typename T>
inline T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}

namespace cuda_host {

inline std::mutex launch_mutex;  // one launch at a time: __shared__ storage is static

// Call kernel(args...) the way cuLaunchKernel does: args[i] points at the i-th argument.
template <typename... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A>
void launch(void (*kernel)(A...), dim3 grid, dim3 block, void** args) {
    std::lock_guard<std::mutex> guard(launch_mutex);
    const unsigned nthreads = block.x * block.y * block.z;
    std::barrier<> barrier(nthreads);
    cuda_host_barrier = &barrier;
    blockDim = block;
    gridDim = grid;
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) {
        threads.emplace_back([&, t] {
            threadIdx = dim3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
            for (unsigned bz = 0; bz < grid.z; ++bz)
                for (unsigned by = 0; by < grid.y; ++by)
                    for (unsigned bx = 0; bx < grid.x; ++bx) {
                        blockIdx = dim3{bx, by, bz};
                        call(kernel, args, std::index_sequence_for<A...>{});
                        // the block ends when all its threads have returned; the next one
                        // reuses the static __shared__ storage
                        barrier.arrive_and_wait();
                    }
        });
    }
    for (auto& th : threads) th.join();
    cuda_host_barrier = nullptr;
}

}  // namespace cuda_host

// Libraries are built with -fvisibility=hidden -fno-gnu-unique: two harness builds (other
// tile constants) loaded into one process must not share their __shared__ statics.
#define CUDA_HOST_EXPORT(symbol, kernel)                                                  \
    extern "C" __attribute__((visibility("default"))) void symbol(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, \
                           unsigned bz, void** args) {                                     \
        cuda_host::launch(&kernel, dim3{gx, gy, gz}, dim3{bx, by, bz}, args);              \
    }
