// Helpers shared by the CUDA kernel files: error checks, launch sizes, warp and block reductions,
// 16-byte vector access. Device code only needs this header and kernels.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace llmcore::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file,
                                          int line) {
    throw std::runtime_error(std::string("CUDA error in ") + what + " (" + file + ":" +
                             std::to_string(line) + "): " + cudaGetErrorString(err));
}

// Checks a runtime call: LLMCORE_CUDA_CHECK(cudaMemsetAsync(...)).
#define LLMCORE_CUDA_CHECK(call)                                                          \
    do {                                                                                  \
        cudaError_t llmcore_err_ = (call);                                                \
        if (llmcore_err_ != cudaSuccess)                                                  \
            ::llmcore::cuda::throw_cuda_error(llmcore_err_, #call, __FILE__, __LINE__);   \
    } while (0)

// Checks the launch just made (bad configuration, missing kernel image); asynchronous faults
// surface at the next synchronising call.
#define LLMCORE_CUDA_CHECK_LAUNCH() LLMCORE_CUDA_CHECK(cudaGetLastError())

constexpr int kWarpSize = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over n items: enough blocks to fill the GPU a few times
// over, never more than the items need.
inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 65535LL * 8) {
    int64_t blocks = ceil_div(n, threads);
    if (blocks < 1) blocks = 1;
    return (unsigned)(blocks < max_blocks ? blocks : max_blocks);
}

#if defined(__CUDACC__)  // device helpers: nvcc only (bindings.cpp includes this for the checks)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads (blockDim.x a multiple of 32); every thread gets the
// result. `shared` holds 32 floats; the call ends with a barrier so `shared` can be reused.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    v = warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

__device__ __forceinline__ float block_max(float v, float* shared) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    v = warp_max(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : -INFINITY;
    v = warp_max(v);
    __syncthreads();
    return v;
}

#endif  // __CUDACC__

// True when p is 16-byte aligned, so float4 access is legal.
__host__ __device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace llmcore::cuda
