"""The second operator: per-head QK RMSNorm + RoPE + paged KV-cache write (SPEC_ROPE_CACHE).

:func:`qk_norm_rope` is the public entry (also ``qknorm.qk_norm_rope``); its pieces:
:mod:`.checks` (validation: a plan from metadata, aliasing, indices), :mod:`.reference` (the
oracle and the ``torch`` backend), :mod:`.triton_kernels` / :mod:`.triton_launch` (the
``triton`` backend), :mod:`.backends` (the choice), :mod:`.pipeline` (plan cache and call
path), :mod:`.ops` (the custom op), :mod:`.nn` (a module for one attention layer).
"""

from .api import QKNormRopeOutput, qk_norm_rope

__all__ = ["QKNormRopeOutput", "qk_norm_rope"]
