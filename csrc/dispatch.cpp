#include "dispatch.h"

#include <cstdlib>
#include <stdexcept>

namespace llmcore {
namespace {

struct Candidate {
    const char* name;
    const KernelTable* table;
    bool (*cpu_has)();
};

bool always() { return true; }

#if defined(LLMCORE_HAVE_AVX2)
// __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif
#if defined(LLMCORE_HAVE_AVX512)
bool cpu_has_avx512() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
}
#endif

const std::vector<Candidate>& candidates() {
    static const std::vector<Candidate> all = {
        {"generic", &generic::kernels, always},
#if defined(LLMCORE_HAVE_AVX2)
        {"avx2", &avx2::kernels, cpu_has_avx2},
#endif
#if defined(LLMCORE_HAVE_AVX512)
        {"avx512", &avx512::kernels, cpu_has_avx512},
#endif
    };
    return all;
}

const KernelTable* best_table() {
    const KernelTable* best = &generic::kernels;
    for (const Candidate& c : candidates())
        if (c.cpu_has()) best = c.table;
    return best;
}

const KernelTable*& active() {
    static const KernelTable* table = best_table();
    return table;
}

}  // namespace

std::vector<std::string> supported_isas() {
    std::vector<std::string> names;
    for (const Candidate& c : candidates())
        if (c.cpu_has()) names.push_back(c.name);
    return names;
}

const KernelTable& kernels() { return *active(); }

void set_isa(const std::string& name) {
    for (const Candidate& c : candidates()) {
        if (name != c.name) continue;
        if (!c.cpu_has()) throw std::invalid_argument("this CPU cannot run the " + name + " kernels");
        active() = c.table;
        return;
    }
    std::string known;
    for (const Candidate& c : candidates()) known += std::string(known.empty() ? "" : ", ") + c.name;
    throw std::invalid_argument("unknown SIMD level '" + name + "' (this build has: " + known + ")");
}

}  // namespace llmcore
