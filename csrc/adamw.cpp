// AdamW, one fused pass over param, grad, m and v (torch.optim.AdamW semantics):
//   param *= 1 - lr * weight_decay                      (decoupled weight decay)
//   m = beta1 m + (1 - beta1) grad;  v = beta2 v + (1 - beta2) grad^2
//   param -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
#include "common.h"
#include "kernels.h"

namespace llmcore {
namespace LLMCORE_ISA {

void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, int64_t step) {
    // Bias corrections in double: 1 - beta2^t for small t loses digits in float.
    const float step_size = (float)(lr / (1.0 - std::pow((double)beta1, (double)step)));
    const float inv_bc2_sqrt = (float)(1.0 / std::sqrt(1.0 - std::pow((double)beta2, (double)step)));
    const float decay = 1.0f - lr * weight_decay;
#pragma omp parallel for simd schedule(static, 4096)
    for (int64_t i = 0; i < n; ++i) {
        const float g = grad[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = param[i] * decay - step_size * mi / (std::sqrt(vi) * inv_bc2_sqrt + eps);
    }
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
