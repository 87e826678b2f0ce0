// A cache of large, already-touched blocks for the arrays the kernels return.
//
// Why: every op returns fresh arrays, and a fresh multi-megabyte array costs page faults, the
// kernel zeroing each page, on first touch: measured on the 2-core development VM, allocating
// and filling a new 32 MiB array ran at ~5 GB/s, against ~14 GB/s for writing one already
// mapped, so a (8192, 1024) softmax spent more time faulting than computing. glibc keeps freed
// blocks under 32 MiB on its heap, but blocks of 32 MiB and more go back to the kernel on every
// free. The pool keeps freed blocks of at least kMinBytes (rounded up to 2 MiB, transparent huge
// pages requested) and hands them out again, the way PyTorch's CUDA caching allocator does for
// device memory. A training step allocates the same sizes every step, so after the first step
// its activations and gradients reuse the previous step's memory.
//
// Cached (free) bytes never exceed the limit (default 2 GiB; llmcore.set_memory_limit and
// LLMCORE_POOL_LIMIT_MB set it); beyond it a freed block is returned to the kernel.
// llmcore.empty_cache() releases every cached block.
#pragma once

#include <cstddef>
#include <cstdint>

namespace llmcore::pool {

// Blocks smaller than this come from the ordinary allocator (glibc reuses them without faults).
constexpr size_t kMinBytes = size_t(1) << 20;

// At least `bytes` of 64-byte aligned memory; `*capacity` receives the block's real size, which
// release() needs back. Throws std::bad_alloc.
void* acquire(size_t bytes, size_t* capacity);
// Returns a block from acquire(); it is cached for reuse or unmapped if the cache is full.
void release(void* block, size_t capacity);
// Unmaps every cached block.
void empty_cache();

struct Stats {
    size_t cached_bytes;    // free blocks held for reuse
    size_t in_use_bytes;    // blocks handed out and not yet released
    size_t limit_bytes;     // the cap on cached_bytes
    uint64_t hits, misses;  // acquire() calls served from the cache / by a new mapping
};
Stats stats();
void set_limit(size_t bytes);

}  // namespace llmcore::pool
