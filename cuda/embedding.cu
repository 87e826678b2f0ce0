// Embedding lookup and its gradient.
//   forward   out[i] = weight[ids[i]]                    out (n, C), weight (V, C), ids (n,)
//   backward  dweight (V, C) = 0, then dweight[ids[i]] += dout[i] for i = 0..n-1
//
// Forward: a warp per id copies one row (float4 when C % 4 == 0 and both arrays are 16-byte
// aligned), so each warp-wide access is 512 contiguous bytes.
//
// Backward, deterministic without float atomics: the positions 0..n-1 are sorted by id with a
// stable radix sort (CUB), so each id's occurrences sit together in increasing position order.
// The sorted list is cut into chunks of 32 entries; a warp takes one chunk and one group of 128
// (float4) or 32 columns, and walks the chunk's entries in order, adding dout rows into a
// register sum that it writes out whenever the id changes:
//   - a run of an id that lies wholly inside the chunk goes straight to dweight[id];
//   - the chunk's first run, when the id continues from the previous chunk, goes to head[chunk];
//   - otherwise the chunk's last run, when the id continues into the next chunk, goes to
//     tail[chunk].
// A second kernel gives each id that spans chunks to the chunk where its run starts (the one
// that wrote a tail): it finds the chunk e where the run ends, and writes
// dweight[id] = tail[c] + head[c+1] + ... + head[e], in that order. Every dweight row with an
// occurrence is written exactly once, by one warp, as a sum in increasing position order with a
// fixed grouping; rows without one keep the zeros of a cudaMemsetAsync. A frequent id (even all
// n of them) costs at most 32 rows of work per warp plus a short sum of partials, not n.
//
// Workspace (each piece 256-byte aligned):
//   keys[2][n] uint32 (the ids, then sorted), pos[2][n] int32 (0..n-1, then sorted): CUB's
//     double buffers
//   head[nchunks][C], tail[nchunks][C] float32, nchunks = ceil(n / 32)
//   CUB's temporary storage
// Needs n < 2^31 and V < 2^31 (32-bit sort keys and positions).
#include <cub/device/device_radix_sort.cuh>

#include <stdexcept>
#include <string>

#include "common.cuh"
#include "kernels.cuh"
#include "rows.cuh"  // load_vec, store_vec, align256

namespace llmcore::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr int kChunk = kWarpSize;  // sorted entries per chunk: one per lane
constexpr int kBatch = 8;          // dout rows (or partials) loaded before they are added
constexpr unsigned kNoKey = 0xFFFFFFFFu;  // above every id (ids < 2^31)
constexpr int64_t kMaxBlocks = 1 << 20;   // grid cap; grid-stride loops beyond it

inline unsigned warp_grid(int64_t warps) {
    const int64_t blocks = ceil_div(warps < 1 ? 1 : warps, kWarpsPerBlock);
    return (unsigned)(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// ---- forward --------------------------------------------------------------------------------

// out (n, C) = weight[ids] (V, C). A warp per id, grid-stride over ids.
template <int VEC>
__global__ __launch_bounds__(kThreads) void embedding_forward_kernel(
    float* __restrict__ out, const float* __restrict__ weight, const int64_t* __restrict__ ids,
    int64_t n, int64_t C) {
    const int lane = threadIdx.x % kWarpSize;
    const int64_t warps = (int64_t)gridDim.x * kWarpsPerBlock;
    const int64_t vecs = C / VEC;  // per row
    for (int64_t i = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize; i < n;
         i += warps) {
        const float* src = weight + ids[i] * C;
        float* dst = out + i * C;
#pragma unroll 4
        for (int64_t j = lane; j < vecs; j += kWarpSize) {
            float v[VEC];
            load_vec<VEC>(v, src + j * VEC);
            store_vec<VEC>(dst + j * VEC, v);
        }
    }
}

// ---- backward -------------------------------------------------------------------------------

// keys[i] = ids[i] (as uint32), pos[i] = i: the pairs to sort.
__global__ __launch_bounds__(kThreads) void embedding_sort_input_kernel(
    unsigned* __restrict__ keys, int* __restrict__ pos, const int64_t* __restrict__ ids,
    int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        keys[i] = (unsigned)ids[i];
        pos[i] = (int)i;
    }
}

// Stage A. keys, pos (n,) sorted by key; dout (n, C); dweight (V, C); head, tail (nchunks, C).
// Warp w takes chunk w / groups and columns [(w % groups) * 32 * VEC, + 32 * VEC).
template <int VEC>
__global__ __launch_bounds__(kThreads) void embedding_chunk_sums_kernel(
    float* __restrict__ dweight, float* __restrict__ head, float* __restrict__ tail,
    const float* __restrict__ dout, const unsigned* __restrict__ keys,
    const int* __restrict__ pos, int64_t n, int64_t nchunks, int64_t C, int64_t groups) {
    const int lane = threadIdx.x % kWarpSize;
    const int64_t warps = (int64_t)gridDim.x * kWarpsPerBlock;
    for (int64_t w = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
         w < nchunks * groups; w += warps) {
        const int64_t c = w / groups;
        const int64_t base = c * kChunk;
        const int cnt = (int)(n - base < kChunk ? n - base : kChunk);
        const unsigned my_key = lane < cnt ? keys[base + lane] : kNoKey;
        const int my_pos = lane < cnt ? pos[base + lane] : 0;
        const unsigned prev = base > 0 ? keys[base - 1] : kNoKey;
        const unsigned next = base + kChunk < n ? keys[base + kChunk] : kNoKey;
        const int64_t col = ((w % groups) * kWarpSize + lane) * VEC;
        const bool active = col < C;

        float acc[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
        int start = 0;  // first entry of the current run
        for (int j0 = 0; j0 < cnt; j0 += kBatch) {
            float rows[kBatch][VEC];
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int j = j0 + u;  // j < 32 + kBatch: the lane index wraps, the row is unused
                const int p = __shfl_sync(0xffffffffu, my_pos, j & (kWarpSize - 1));
                if (j < cnt && active) {
                    load_vec<VEC>(rows[u], dout + (int64_t)p * C + col);
                } else {
#pragma unroll
                    for (int k = 0; k < VEC; ++k) rows[u][k] = 0.0f;
                }
            }
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int j = j0 + u;
                if (j >= cnt) break;  // uniform over the warp
                const unsigned key = __shfl_sync(0xffffffffu, my_key, j);
                const unsigned after = __shfl_sync(0xffffffffu, my_key, (j + 1) & (kWarpSize - 1));
                const unsigned next_key = j + 1 < cnt ? after : next;
#pragma unroll
                for (int k = 0; k < VEC; ++k) acc[k] += rows[u][k];
                // The run [start, j] ends here, or the chunk does (a run that fills the whole
                // chunk and continues on both sides still owes head[c]).
                if (next_key != key || j == cnt - 1) {
                    float* dst;
                    if (start == 0 && prev == key) dst = head + c * C;      // continues from before
                    else if (j == cnt - 1 && next == key) dst = tail + c * C;  // continues after
                    else dst = dweight + (int64_t)key * C;                   // complete
                    if (active) store_vec<VEC>(dst + col, acc);
#pragma unroll
                    for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
                    start = j + 1;
                }
            }
        }
    }
}

// Stage B: the runs that span chunks. Same warps as stage A; only a chunk whose last run starts
// in it and continues into the next chunk (it wrote tail[c]) does anything.
template <int VEC>
__global__ __launch_bounds__(kThreads) void embedding_span_sums_kernel(
    float* __restrict__ dweight, const float* __restrict__ head, const float* __restrict__ tail,
    const unsigned* __restrict__ keys, int64_t n, int64_t nchunks, int64_t C, int64_t groups) {
    const int lane = threadIdx.x % kWarpSize;
    const int64_t warps = (int64_t)gridDim.x * kWarpsPerBlock;
    for (int64_t w = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
         w < nchunks * groups; w += warps) {
        const int64_t c = w / groups;
        const int64_t base = c * kChunk;
        if (base + kChunk >= n) continue;  // the last chunk has nothing after it
        const unsigned key = keys[base + kChunk - 1];
        if (keys[base + kChunk] != key) continue;      // the run ends in this chunk
        if (base > 0 && keys[base - 1] == key) continue;  // ... or began before it
        // e: the first chunk after c that the run does not continue past (the last chunk at
        // the latest), found 32 chunks at a time.
        int64_t e = -1;
        for (int64_t k0 = c + 1; e < 0; k0 += kWarpSize) {
            const int64_t next_start = (k0 + lane + 1) * kChunk;
            const bool continues = next_start < n && keys[next_start] == key;
            const unsigned stops = __ballot_sync(0xffffffffu, !continues);
            if (stops) e = k0 + __ffs(stops) - 1;
        }
        const int64_t col = ((w % groups) * kWarpSize + lane) * VEC;
        if (col >= C) continue;  // no shuffles below
        float acc[VEC];
        load_vec<VEC>(acc, tail + c * C + col);
        for (int64_t k0 = c + 1; k0 <= e; k0 += kBatch) {
            float parts[kBatch][VEC];
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                if (k0 + u <= e) {
                    load_vec<VEC>(parts[u], head + (k0 + u) * C + col);
                } else {
#pragma unroll
                    for (int k = 0; k < VEC; ++k) parts[u][k] = 0.0f;
                }
            }
#pragma unroll
            for (int u = 0; u < kBatch; ++u)
                if (k0 + u <= e)
#pragma unroll
                    for (int k = 0; k < VEC; ++k) acc[k] += parts[u][k];
        }
        store_vec<VEC>(dweight + (int64_t)key * C + col, acc);
    }
}

// Bits of the sort keys: enough for V - 1 (at least one).
int key_bits(int64_t V) {
    int bits = 1;
    while (bits < 31 && (int64_t(1) << bits) < V) ++bits;
    return bits;
}

void check_sizes(int64_t n_ids, int64_t V) {
    if (n_ids >= (int64_t(1) << 31) || V >= (int64_t(1) << 31))
        throw std::runtime_error("embedding_backward: the CUDA core supports fewer than 2^31 ids "
                                 "and vocabulary rows, got " + std::to_string(n_ids) + " ids and " +
                                 std::to_string(V) + " rows");
}

size_t cub_sort_temp_bytes(int64_t n_ids, int64_t V) {
    size_t bytes = 0;
    cub::DoubleBuffer<unsigned> keys(nullptr, nullptr);
    cub::DoubleBuffer<int> pos(nullptr, nullptr);
    LLMCORE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, pos, (int)n_ids, 0,
                                                       key_bits(V)));
    return bytes;
}

// The workspace's pieces (see the top of the file); `base` null just measures.
struct Workspace {
    unsigned* keys[2];
    int* pos[2];
    float *head, *tail;
    void* sort_temp;
    size_t sort_temp_bytes, total;

    Workspace(void* base, int64_t n_ids, int64_t V, int64_t C) {
        char* p = static_cast<char*>(base);
        size_t off = 0;
        auto take = [&](size_t bytes) {
            char* at = p ? p + off : nullptr;
            off += align256(bytes);
            return at;
        };
        const int64_t nchunks = ceil_div(n_ids, kChunk);
        for (int i = 0; i < 2; ++i)
            keys[i] = reinterpret_cast<unsigned*>(take(n_ids * sizeof(unsigned)));
        for (int i = 0; i < 2; ++i) pos[i] = reinterpret_cast<int*>(take(n_ids * sizeof(int)));
        head = reinterpret_cast<float*>(take((size_t)nchunks * C * sizeof(float)));
        tail = reinterpret_cast<float*>(take((size_t)nchunks * C * sizeof(float)));
        sort_temp_bytes = cub_sort_temp_bytes(n_ids, V);
        sort_temp = take(sort_temp_bytes);
        total = off;
    }
};

template <int VEC>
void launch_backward_sums(float* dweight, const float* dout, const Workspace& ws,
                          const unsigned* keys, const int* pos, int64_t n_ids, int64_t C,
                          cudaStream_t stream) {
    const int64_t groups = ceil_div(C, (int64_t)kWarpSize * VEC);
    const int64_t nchunks = ceil_div(n_ids, kChunk);
    const unsigned grid = warp_grid(nchunks * groups);
    embedding_chunk_sums_kernel<VEC><<<grid, kThreads, 0, stream>>>(
        dweight, ws.head, ws.tail, dout, keys, pos, n_ids, nchunks, C, groups);
    LLMCORE_CUDA_CHECK_LAUNCH();
    embedding_span_sums_kernel<VEC><<<grid, kThreads, 0, stream>>>(dweight, ws.head, ws.tail, keys,
                                                                   n_ids, nchunks, C, groups);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace

void embedding_forward(float* out, const float* weight, const int64_t* ids, int64_t n_ids,
                       int64_t C, cudaStream_t stream) {
    if (n_ids <= 0 || C <= 0) return;
    const unsigned grid = warp_grid(n_ids);
    if (C % 4 == 0 && aligned16(out) && aligned16(weight))
        embedding_forward_kernel<4><<<grid, kThreads, 0, stream>>>(out, weight, ids, n_ids, C);
    else
        embedding_forward_kernel<1><<<grid, kThreads, 0, stream>>>(out, weight, ids, n_ids, C);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

size_t embedding_backward_workspace_bytes(int64_t n_ids, int64_t V, int64_t C) {
    if (n_ids <= 0 || V <= 0 || C <= 0) return 0;
    check_sizes(n_ids, V);
    return Workspace(nullptr, n_ids, V, C).total;
}

void embedding_backward(float* dweight, const float* dout, const int64_t* ids, int64_t n_ids,
                        int64_t V, int64_t C, void* workspace, cudaStream_t stream) {
    if (V <= 0 || C <= 0) return;
    LLMCORE_CUDA_CHECK(cudaMemsetAsync(dweight, 0, (size_t)V * (size_t)C * sizeof(float), stream));
    if (n_ids <= 0) return;
    check_sizes(n_ids, V);
    const Workspace ws(workspace, n_ids, V, C);

    embedding_sort_input_kernel<<<grid_for(n_ids, kThreads), kThreads, 0, stream>>>(
        ws.keys[0], ws.pos[0], ids, n_ids);
    LLMCORE_CUDA_CHECK_LAUNCH();
    // Stable: equal ids keep their positions in increasing order. The double buffers let CUB
    // sort in place of a copy; Current() says which half holds the result.
    cub::DoubleBuffer<unsigned> keys(ws.keys[0], ws.keys[1]);
    cub::DoubleBuffer<int> pos(ws.pos[0], ws.pos[1]);
    size_t temp_bytes = ws.sort_temp_bytes;
    LLMCORE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(ws.sort_temp, temp_bytes, keys, pos,
                                                       (int)n_ids, 0, key_bits(V), stream));

    if (C % 4 == 0 && aligned16(dweight) && aligned16(dout))
        launch_backward_sums<4>(dweight, dout, ws, keys.Current(), pos.Current(), n_ids, C, stream);
    else
        launch_backward_sums<1>(dweight, dout, ws, keys.Current(), pos.Current(), n_ids, C, stream);
}

}  // namespace llmcore::cuda
