// Tasks [0, n) of a parallel region dealt out as one contiguous range per thread, each walked
// from its front by its owner; a thread whose range is done takes tasks from the back of the
// others' ranges (work stealing), so a thread the machine slows down is still covered.
//
// Why not schedule(dynamic, 1): consecutive tasks then run at the same time on different cores.
// When neighbouring tasks touch neighbouring memory (attention's tasks are heads in (batch, head)
// order, and one head's rows sit next to the next head's) that costs twice over, measured on the
// 2-core AVX-512 VM at B16 H4 T128 D64:
//   - a task no longer finds in L2 the lines that the hardware prefetcher brought in while its
//     predecessor ran, because the predecessor ran on the other core;
//   - the two cores write interleaved lines (dq/dk/dv or out rows of adjacent heads).
// The attention backward ran at 1.6-1.7x its one-thread speed on two threads with dynamic
// scheduling, 1.9-2.0x with contiguous ranges (146 -> 116 us per batch element, rope on); the
// forward at 1.75-1.8x and 1.95-2.0x (70.8 -> 63.3 us). In the cpu-small training step the four
// backward calls went from 11.6 to 10.1 ms, the forward ones from 5.4 to 4.8 ms.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "common.h"

namespace llmcore {
namespace LLMCORE_ISA {

class TaskRanges {
  public:
    // n tasks over `threads` ranges of near-equal length. n must be below 2^32.
    TaskRanges(int64_t n, int threads) : ranges_(std::max(threads, 1)) {
        const int64_t k = (int64_t)ranges_.size();
        for (int64_t r = 0; r < k; ++r) ranges_[r].bounds.store(pack(n * r / k, n * (r + 1) / k));
    }

    // The next task for thread `me` (its own range first, then stolen), or -1 when none is left.
    int64_t next(int me) {
        const int k = (int)ranges_.size();
        if (me < k) {
            std::atomic<uint64_t>& own = ranges_[me].bounds;
            uint64_t b = own.load(std::memory_order_relaxed);
            while (lo(b) < hi(b))
                if (own.compare_exchange_weak(b, pack(lo(b) + 1, hi(b)))) return lo(b);
        }
        for (int i = 1; i <= k; ++i) {  // the others' ranges, from the back
            std::atomic<uint64_t>& other = ranges_[(me + i) % k].bounds;
            uint64_t b = other.load(std::memory_order_relaxed);
            while (lo(b) < hi(b))
                if (other.compare_exchange_weak(b, pack(lo(b), hi(b) - 1))) return hi(b) - 1;
        }
        return -1;
    }

  private:
    // [lo, hi) in one word, so that the owner and a thief never both take the last task.
    static uint64_t pack(int64_t lo, int64_t hi) { return (uint64_t)lo << 32 | (uint64_t)hi; }
    static int64_t lo(uint64_t b) { return (int64_t)(b >> 32); }
    static int64_t hi(uint64_t b) { return (int64_t)(b & 0xffffffffu); }

    struct alignas(64) Range {  // one cache line each: owners do not contend
        std::atomic<uint64_t> bounds{0};
    };
    std::vector<Range> ranges_;
};

}  // namespace LLMCORE_ISA
}  // namespace llmcore
