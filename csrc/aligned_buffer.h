// A growable, 64-byte aligned float scratch buffer, one per thread where kernels need scratch
// (thread_local: reused across calls instead of paying for a fresh allocation and its page
// faults every call). Lives in the ISA namespace like all kernel-side helpers (common.h).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

#include "common.h"

namespace llmcore {
namespace LLMCORE_ISA {

class AlignedBuffer {
  public:
    AlignedBuffer() = default;
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    ~AlignedBuffer() { std::free(data_); }

    // At least n floats; contents are unspecified.
    float* get(int64_t n) {
        if (n > capacity_) {
            std::free(data_);
            size_t bytes = ((size_t)n * sizeof(float) + 63) / 64 * 64;
            data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
            if (!data_) throw std::bad_alloc();
            capacity_ = n;
        }
        return data_;
    }

  private:
    float* data_ = nullptr;
    int64_t capacity_ = 0;
};

}  // namespace LLMCORE_ISA
}  // namespace llmcore
