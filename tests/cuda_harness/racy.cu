// A tiny kernel for the harness's own test: each thread writes its slot of a shared array
// and reads its neighbour's. With Sync the __syncthreads orders them; without it ThreadSanitizer
// must report the race (and the result may be stale).
template <bool Sync>
__global__ void neighbour_sum(const float* in, float* out)
{
    __shared__ float s[64];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = in[blockIdx.x * n + t];
    if (Sync) __syncthreads();
    out[blockIdx.x * n + t] = s[t] + s[(t + 1) % n];
    __syncthreads();  // the block's readers are done before the next block writes s
}
