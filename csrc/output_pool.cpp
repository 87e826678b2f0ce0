// The output block cache (output_pool.h). Not a kernel file: compiled once, into llmcore._cpu.
#include "output_pool.h"

#include <sys/mman.h>

#include <iterator>
#include <map>
#include <mutex>
#include <new>

namespace llmcore::pool {
namespace {

// Blocks are whole huge pages, so a block of one size class always fits the next request of it.
constexpr size_t kGranule = size_t(2) << 20;

size_t round_up(size_t bytes) { return (bytes + kGranule - 1) / kGranule * kGranule; }

struct Pool {
    std::mutex mutex;
    std::multimap<size_t, void*> free_blocks;  // by capacity
    size_t cached = 0, in_use = 0, limit = size_t(2048) << 20;  // llmcore.set_memory_limit
    uint64_t hits = 0, misses = 0;
};

Pool& the_pool() {
    // Leaked on purpose: arrays still alive at interpreter exit release into it after static
    // destructors would have run.
    static Pool* pool = new Pool;
    return *pool;
}

void* map_block(size_t capacity) {
    void* p = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    // 2 MiB pages: 512x fewer faults and TLB entries for the kernels that stream these arrays.
    madvise(p, capacity, MADV_HUGEPAGE);
#endif
    return p;
}

}  // namespace

void* acquire(size_t bytes, size_t* capacity) {
    const size_t want = round_up(bytes);
    Pool& pool = the_pool();
    {
        std::lock_guard<std::mutex> lock(pool.mutex);
        // Only an exact size class: handing out a much larger block would strand memory. Of
        // those, the most recently freed, whose lines are likeliest still in cache (the oldest,
        // multimap's find(), cost ~2% of a cpu-small training step in cache misses).
        auto [first, last] = pool.free_blocks.equal_range(want);
        if (first != last) {
            auto it = std::prev(last);
            void* block = it->second;
            pool.free_blocks.erase(it);
            pool.cached -= want;
            pool.in_use += want;
            ++pool.hits;
            *capacity = want;
            return block;
        }
        ++pool.misses;
        pool.in_use += want;
    }
    try {
        void* block = map_block(want);
        *capacity = want;
        return block;
    } catch (...) {
        std::lock_guard<std::mutex> lock(pool.mutex);
        pool.in_use -= want;
        throw;
    }
}

void release(void* block, size_t capacity) {
    Pool& pool = the_pool();
    {
        std::lock_guard<std::mutex> lock(pool.mutex);
        pool.in_use -= capacity;
        if (pool.cached + capacity <= pool.limit) {
            pool.free_blocks.emplace(capacity, block);
            pool.cached += capacity;
            return;
        }
    }
    munmap(block, capacity);
}

void empty_cache() {
    std::multimap<size_t, void*> blocks;
    {
        Pool& pool = the_pool();
        std::lock_guard<std::mutex> lock(pool.mutex);
        blocks.swap(pool.free_blocks);
        pool.cached = 0;
    }
    for (auto& [capacity, block] : blocks) munmap(block, capacity);
}

Stats stats() {
    Pool& pool = the_pool();
    std::lock_guard<std::mutex> lock(pool.mutex);
    return {pool.cached, pool.in_use, pool.limit, pool.hits, pool.misses};
}

void set_limit(size_t bytes) {
    {
        Pool& pool = the_pool();
        std::lock_guard<std::mutex> lock(pool.mutex);
        pool.limit = bytes;
        if (pool.cached <= bytes) return;
    }
    empty_cache();
}

}  // namespace llmcore::pool
