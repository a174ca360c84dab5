"""The public entry ``qknorm.qk_norm_rope`` (SPEC_ROPE_CACHE §1) and its result type."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..quant import native_fp8_dtype
from .ops import PIPELINE, call_args, call_op, execute, traced
from .request import RopePlan

__all__ = ["QKNormRopeOutput", "qk_norm_rope"]


class QKNormRopeOutput(NamedTuple):
    """What :func:`qk_norm_rope` returns.

    q : ``[T, Hq, D]`` normalized and rotated q (q's dtype, or FP8 with ``q_scale``).
    k : ``[T, Hk, D]`` normalized and rotated k; None when k went only to the cache.
    """

    q: torch.Tensor
    k: torch.Tensor | None


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos_sin_cache: torch.Tensor | None,
    positions: torch.Tensor | None,
    *,
    q_epsilon: float = 1e-6,
    k_epsilon: float | None = None,
    is_neox: bool = True,
    gemma_norm: bool = False,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    check_indices: bool = False,
) -> QKNormRopeOutput:
    """Per-head RMSNorm of q and k, rotary embedding, and optionally the paged KV-cache write.

    Per token and head: ``u = rnd((x * rsqrt(mean(x^2) + eps)) * w)`` (rounded to the input
    dtype once, as an unfused norm hands it to RoPE), then RoPE on the first R channels in
    fp32, rounded again. k (and v, copied) then go to the cache at ``slot_mapping``; an FP8
    cache stores ``fp8(clamp(x / scale))`` with the scale read on the device.

    Parameters
    ----------
    q, k : Tensor
        ``[T, Hq, D]`` and ``[T, Hk, D]``, fp16 or bf16 (one dtype), last dimension
        contiguous, any token and head strides (views of a packed qkv buffer work without a
        copy). D even, at most 1024; Hq and Hk independent.
    q_weight, k_weight : Tensor or None
        ``[D]`` norm weights in q's dtype; None for a weightless norm.
    cos_sin_cache : Tensor or None
        ``[max_pos, R]`` fp32 or q's dtype, rows contiguous: row p is ``cos`` of the R/2
        frequencies then their ``sin``; R even, ``2 <= R <= D`` (R < D: partial rotary).
        None (with ``positions`` None): norm only.
    positions : Tensor or None
        ``[T]`` int32/int64 rows of ``cos_sin_cache``.
    q_epsilon, k_epsilon : float
        Norm epsilons (k's defaults to q's).
    is_neox : bool
        Rotate pairs ``(i, i + R/2)`` (neox) or ``(2i, 2i + 1)`` (GPT-J).
    gemma_norm : bool
        Multiply by ``1 + weight`` (the +1 in fp32).
    q_out, k_out : Tensor, optional
        Outputs ``[T, Hq, D]`` / ``[T, Hk, D]``; ``q_out=q`` / ``k_out=k`` work in place.
        None allocates q_out; k_out is allocated only without a cache write.
    v, k_cache, v_cache, slot_mapping : Tensor, optional
        All four or none: ``v [T, Hk, Dv]`` in q's dtype; caches ``[num_blocks, block_size,
        Hk, D]`` and ``[num_blocks, block_size, Hk, Dv]`` in q's dtype or
        ``float8_e4m3fn``/``float8_e4m3fnuz``, any strides with a contiguous last dimension
        (HND and ``[num_blocks, 2, ...]`` layouts as views); ``slot_mapping [T]`` int32/int64,
        ``slot = block * block_size + offset``, negative (padding) and out-of-range slots skipped.
    k_scale, v_scale : Tensor, optional
        float32 ``[1]`` or ``[Hk]`` device tensors, exactly when the cache is FP8.
    q_scale : Tensor, optional
        float32 ``[1]``: write q as FP8 (q_out's flavour, or the device's native one).
    check_indices : bool
        Raise ``ValueError`` naming the first position outside the table or slot outside the
        cache (one device synchronization). Without it such a position leaves that token's q
        and k unspecified (but finite for finite inputs) and such a slot is skipped; nothing
        outside the outputs is ever read or written.

    Returns
    -------
    QKNormRopeOutput
        ``(q, k)``; ``k`` is None when the call writes the cache and no ``k_out`` was given.

    Raises
    ------
    TypeError, ValueError
        For a bad argument, before anything is written (SPEC_ROPE_CACHE §4).
    """
    if traced(q):  # the op's fake kernel validates; here only what the allocations need
        if q_out is None:
            q_out = torch.empty(q.shape, dtype=native_fp8_dtype(q.device) if q_scale is not None else q.dtype, device=q.device)
        if k_out is None and k_cache is None:
            k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        call_op(call_args(q, k, q_weight, k_weight, cos_sin_cache, positions, q_epsilon, k_epsilon, is_neox,
                          gemma_norm, q_out, k_out, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q_scale,
                          check_indices))  # fmt: skip
        return QKNormRopeOutput(q_out, k_out)
    args = call_args(q, k, q_weight, k_weight, cos_sin_cache, positions, q_epsilon, k_epsilon, is_neox, gemma_norm,
                     q_out, k_out, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q_scale, check_indices)  # fmt: skip
    plan: RopePlan = PIPELINE.plan(args)  # type: ignore[assignment]
    if plan.alloc_q_out:
        q_out = torch.empty((plan.t, plan.hq, plan.d), dtype=plan.q_out_dtype, device=plan.device)
    if plan.alloc_k_out:
        k_out = torch.empty((plan.t, plan.hk, plan.d), dtype=plan.dtype, device=plan.device)
    if plan.alloc_q_out or plan.alloc_k_out:
        args = (*args[:10], q_out, k_out, *args[12:])
    execute(plan, args)
    return QKNormRopeOutput(q_out, k_out)  # type: ignore[arg-type]
