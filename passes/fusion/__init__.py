"""Fusions: each module rewrites one kind of block into the form the target's TensorRT fuses.

rmsnorm, mlp (SiLU-gated), rotary, mla (DeepSeek MLA incl. weight absorption), attention
(MHA/GQA), moe (routed experts). Importing this package registers their passes.
"""

from dsc.passes.fusion import (
    attention,  # noqa: F401
    mla,  # noqa: F401
    mlp,  # noqa: F401
    moe,  # noqa: F401
    rmsnorm,  # noqa: F401  (rmsnorm first: the registration order)
    rotary,  # noqa: F401
)
from dsc.passes.fusion._common import block_of, explain, form_of

__all__ = ["block_of", "explain", "form_of"]
