"""The public operations: inputs checked here, then run by the compiled core.

NumPy arrays run on llmcore._cpu, CuPy arrays on llmcore._cuda (results live where the inputs do;
set_matmul_precision chooses fp32, TF32 or bf16 tensor-core math for GPU matmuls). Arguments and results follow DESIGN.md's contract and match
llmcore.reference name for name. Non-contiguous inputs are copied; arrays updated in place
(adamw_step, adamw_step_multi) must be C-contiguous.
"""
from .adamw import adamw_step, adamw_step_multi, global_norm
from .attention import attention, attention_backward
from .cross_entropy import cross_entropy, cross_entropy_backward
from .embedding import embedding, embedding_backward
from .gelu import gelu, gelu_backward
from .layernorm import layernorm, layernorm_backward
from .matmul import get_matmul_precision, linear, linear_backward, matmul, set_matmul_precision
from .rmsnorm import rmsnorm, rmsnorm_backward
from .softmax import softmax, softmax_backward
