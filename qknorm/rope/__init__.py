"""The second operator: per-head QK RMSNorm + RoPE + paged KV-cache write (SPEC_ROPE_CACHE).

:func:`qk_norm_rope` is the public entry (also ``qknorm.qk_norm_rope``). It runs on the shared
call pipeline (:mod:`qknorm.core`); its own pieces are :mod:`.ops` (the argument list, the
custom op ``torch.ops.qknorm.qk_norm_rope``, the registration of its backends), :mod:`.checks`
(the planner over tensor specs, the index check), :mod:`.request` (plan and request types),
:mod:`.reference` (the oracle and the ``torch`` backend, :mod:`.torch_backend`),
:mod:`.triton_kernels` / :mod:`.triton_launch` (the ``triton`` backend), :mod:`.nn` (a module
for one attention layer), :mod:`.warmup`, :mod:`.testing` (comparisons by §3's tolerances),
:mod:`.cli` and :mod:`.bench`.
"""

from .api import QKNormRopeOutput, qk_norm_rope

__all__ = ["QKNormRopeOutput", "qk_norm_rope"]
