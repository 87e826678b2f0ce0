// Range checks of integer inputs (token ids, targets) on the device, so that bindings.cpp can
// refuse bad input before a kernel indexes with it.
//
// first_id_out_of_range: a grid-stride pass over ids (n,) int64; each thread that finds an id
// outside [0, limit) (and not equal to `except`, when given) lowers an unsigned 64-bit minimum
// in the workspace with atomicMin (integers: the answer does not depend on the order). The
// minimum starts at all-ones ("none"), and is copied back after synchronising the stream.
#include "common.cuh"
#include "kernels.cuh"

namespace llmcore::cuda {
namespace {

constexpr int kThreads = 256;

__global__ __launch_bounds__(kThreads) void first_bad_id_kernel(
    unsigned long long* __restrict__ first, const int64_t* __restrict__ ids, int64_t n,
    int64_t limit, bool has_except, int64_t except) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int64_t id = ids[i];
        const bool bad = (id < 0 || id >= limit) && !(has_except && id == except);
        // Later indices of this thread cannot beat this one: stop at the first.
        if (bad) {
            atomicMin(first, (unsigned long long)i);
            return;
        }
    }
}

}  // namespace

int64_t first_id_out_of_range(const int64_t* ids, int64_t n, int64_t limit, bool has_except,
                              int64_t except, void* workspace, cudaStream_t stream) {
    if (n <= 0) return -1;
    auto* first = static_cast<unsigned long long*>(workspace);
    LLMCORE_CUDA_CHECK(cudaMemsetAsync(first, 0xFF, sizeof(unsigned long long), stream));
    first_bad_id_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(first, ids, n, limit,
                                                                        has_except, except);
    LLMCORE_CUDA_CHECK_LAUNCH();
    unsigned long long host = ~0ull;
    LLMCORE_CUDA_CHECK(
        cudaMemcpyAsync(&host, first, sizeof(host), cudaMemcpyDeviceToHost, stream));
    LLMCORE_CUDA_CHECK(cudaStreamSynchronize(stream));
    return host == ~0ull ? -1 : (int64_t)host;
}

}  // namespace llmcore::cuda
