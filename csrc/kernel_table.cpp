// Collects this instruction set's kernels into its table (compiled once per ISA, like them).
#include "common.h"
#include "kernels.h"

namespace llmcore {
namespace LLMCORE_ISA {

GemmFn gemm;
BiasBackwardFn bias_backward;
SoftmaxForwardFn softmax_forward;
SoftmaxBackwardFn softmax_backward;
RmsnormForwardFn rmsnorm_forward;
RmsnormBackwardFn rmsnorm_backward;
LayernormForwardFn layernorm_forward;
LayernormBackwardFn layernorm_backward;
GeluForwardFn gelu_forward;
GeluBackwardFn gelu_backward;
CrossEntropyForwardFn cross_entropy_forward;
CrossEntropyBackwardFn cross_entropy_backward;
EmbeddingForwardFn embedding_forward;
EmbeddingBackwardFn embedding_backward;
AdamwStepFn adamw_step;
SumOfSquaresFn sum_of_squares;
AttentionForwardFn attention_forward;
AttentionBackwardFn attention_backward;
RopeFn rope;

#define LLMCORE_STR2(x) #x
#define LLMCORE_STR(x) LLMCORE_STR2(x)

extern const KernelTable kernels = {
    .isa = LLMCORE_STR(LLMCORE_ISA),
    .gemm = gemm,
    .bias_backward = bias_backward,
    .softmax_forward = softmax_forward,
    .softmax_backward = softmax_backward,
    .rmsnorm_forward = rmsnorm_forward,
    .rmsnorm_backward = rmsnorm_backward,
    .layernorm_forward = layernorm_forward,
    .layernorm_backward = layernorm_backward,
    .gelu_forward = gelu_forward,
    .gelu_backward = gelu_backward,
    .cross_entropy_forward = cross_entropy_forward,
    .cross_entropy_backward = cross_entropy_backward,
    .embedding_forward = embedding_forward,
    .embedding_backward = embedding_backward,
    .adamw_step = adamw_step,
    .sum_of_squares = sum_of_squares,
    .attention_forward = attention_forward,
    .attention_backward = attention_backward,
    .rope = rope,
};

}  // namespace LLMCORE_ISA
}  // namespace llmcore
