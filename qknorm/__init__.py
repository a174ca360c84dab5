"""qknorm: pre-attention operators for LLM inference (fused Q/K RMSNorm; QK norm + RoPE + KV-cache write).

Public entry points (SPEC §2):

- :func:`fused_qk_rmsnorm` - aiter's unified in-place entry.
- :func:`fused_qk_rmsnorm_group_quant`, :func:`fused_qk_rmsnorm_per_token_quant` - aiter's
  quantizing entries.
- :func:`fused_qk_rmsnorm_legacy` - the pre-v0.1.14 aiter signature returning new tensors.
- :func:`qk_rmsnorm` - the Pythonic functional entry (allocates, any leading dimensions).
- :class:`QuantType` - aiter's enum, same names and values.
- :class:`MLAQKNorm` (:mod:`qknorm.nn`) - DeepSeek/Kimi's ``q_a_layernorm`` and
  ``kv_a_layernorm`` as one module, optionally quantizing q.
- :func:`qk_norm_rope` - per-head QK RMSNorm + RoPE + paged KV-cache write (SPEC_ROPE_CACHE),
  with :class:`QKNormRoPE` (:mod:`qknorm.nn`) for one attention layer.
- :func:`warmup` - probe, select and compile ahead of CUDA-graph capture, for either operator
  (``warmup(...)`` or ``warmup("qk_norm_rope", ...)``); :func:`warmup_qk_rmsnorm` and
  :func:`warmup_qk_norm_rope` are its two operators' typed forms.
- :func:`set_pdl` / :func:`pdl_enabled` - launch the Triton kernels with programmatic dependent
  launch (NVIDIA sm_90+; off by default).
- ``torch.ops.qknorm.fused_qk_rmsnorm`` (:mod:`qknorm.ops`) and ``torch.ops.qknorm.qk_norm_rope``
  (:mod:`qknorm.rope.ops`) - the custom ops torch.compile sees; the entries route through them
  while compiling.

Importing qknorm does no work beyond registering those ops with torch.library: no device
queries, no environment reads, no optional imports. Backends are probed and chosen on first
use (see :mod:`qknorm.backends.registry`).
"""

from .api import (
    QKNormOutput,
    fused_qk_rmsnorm,
    fused_qk_rmsnorm_group_quant,
    fused_qk_rmsnorm_legacy,
    fused_qk_rmsnorm_per_token_quant,
    qk_rmsnorm,
)
from .backends.triton_launch import pdl_enabled, set_pdl
from .nn import MLAQKNorm, MLAQKNormOutput, QKNormRoPE
from .quant import QuantMode, QuantType
from .rope import QKNormRopeOutput, qk_norm_rope
from .rope.warmup import warmup_qk_norm_rope
from .warmup import WarmupRecord, warmup, warmup_qk_rmsnorm

__version__ = "0.1.0"

__all__ = [
    "MLAQKNorm",
    "MLAQKNormOutput",
    "QKNormOutput",
    "QKNormRopeOutput",
    "QKNormRoPE",
    "QuantMode",
    "QuantType",
    "fused_qk_rmsnorm",
    "fused_qk_rmsnorm_group_quant",
    "fused_qk_rmsnorm_legacy",
    "fused_qk_rmsnorm_per_token_quant",
    "qk_rmsnorm",
    "qk_norm_rope",
    "pdl_enabled",
    "set_pdl",
    "warmup",
    "warmup_qk_norm_rope",
    "warmup_qk_rmsnorm",
    "WarmupRecord",
    "__version__",
]
