// Picks the kernel table for this CPU at import time (the best instruction set it supports),
// unless LLMCORE_SIMD names a lower one. Kept out of kernel files: this code runs everywhere.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace llmcore {

// Instruction sets compiled into this build that this CPU can run, best last.
std::vector<std::string> supported_isas();
// The table in use.
const KernelTable& kernels();
// Switches to the named instruction set; throws std::invalid_argument if it was not compiled or
// the CPU cannot run it.
void set_isa(const std::string& name);

}  // namespace llmcore
