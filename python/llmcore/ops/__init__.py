"""The public operations: inputs checked here, then run by the compiled core.

NumPy arrays run on llmcore._cpu. Arguments and results follow DESIGN.md's contract and match
llmcore.reference name for name. Non-contiguous inputs are copied; arrays updated in place
(adamw_step) must be C-contiguous.
"""
from .adamw import adamw_step
from .attention import attention, attention_backward
from .cross_entropy import cross_entropy, cross_entropy_backward
from .embedding import embedding, embedding_backward
from .gelu import gelu, gelu_backward
from .layernorm import layernorm, layernorm_backward
from .matmul import linear, linear_backward, matmul
from .rmsnorm import rmsnorm, rmsnorm_backward
from .softmax import softmax, softmax_backward
