"""NumPy reference of every llmcore operation: the specification, in float32 or float64.

Same names and arguments as llmcore.ops; when a kernel and the reference disagree, the reference
decides. Each reference backward is checked against central finite differences in the tests.
"""
from .adamw import adamw_step, adamw_step_multi, global_norm
from .attention import attention, attention_backward
from .cross_entropy import cross_entropy, cross_entropy_backward
from .embedding import embedding, embedding_backward
from .gelu import gelu, gelu_backward
from .layernorm import layernorm, layernorm_backward
from .matmul import linear, linear_backward, matmul
from .rmsnorm import rmsnorm, rmsnorm_backward
from .softmax import softmax, softmax_backward
