"""Pure-PyTorch implementation of SPEC_ROPE_CACHE §3: the test oracle and the ``torch`` backend.

Written for clarity, not speed: each step is the rule it implements, in fp32, and every value
is computed before the first output is written (so ``q_out is q`` and ``k_out is k`` work).
Runs on any device PyTorch runs on. Always checks the indices first (§3 rule 6): a bad
position or slot raises ``ValueError`` naming it, at the cost of one device synchronization.
"""

from __future__ import annotations

import torch

from ..quant import fp8_max
from .checks import check_indices
from .request import RopeRequest

__all__ = ["rope_fp32", "rms_norm_heads", "fp8_codes", "norm_rope_values", "qk_norm_rope_reference"]


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor | None, eps: float, gemma: bool) -> torch.Tensor:
    """Rule 1: ``(x * rsqrt(sum(x^2) / D + eps)) * w`` per head, fp32 ``[T, H, D]`` in and out.

    ``w`` is ``f(weight)``, ``f(weight) + 1`` (gemma, the +1 in fp32) or 1 (``weight`` None).
    """
    r = torch.rsqrt(torch.sum(x * x, dim=-1, keepdim=True) / x.shape[-1] + eps)
    y = x * r
    if weight is None:
        return y
    w = weight.float()
    if gemma:
        w = w + 1.0
    return y * w


def rope_fp32(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rule 3 on fp32 ``u [T, H, D]`` with ``cos, sin [T, 1, R/2]`` fp32; channels >= R pass through."""
    half = cos.shape[-1]
    rot = 2 * half
    if is_neox:
        a, b = u[..., :half], u[..., half:rot]
    else:
        a, b = u[..., 0:rot:2], u[..., 1:rot:2]
    za = a * cos - b * sin
    zb = b * cos + a * sin
    z = u.clone()
    if is_neox:
        z[..., :half], z[..., half:rot] = za, zb
    else:
        z[..., 0:rot:2], z[..., 1:rot:2] = za, zb
    return z


def fp8_codes(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rules 4-5: ``fp8_rne(clamp(x / scale, -FMAX, FMAX))``, ``x`` fp32, ``scale`` fp32 broadcastable.

    fp32 division in PyTorch is IEEE (correctly rounded); the cast rounds to nearest even.
    """
    fmax = fp8_max(dtype)
    return torch.clamp(x / scale, -fmax, fmax).to(dtype)


def _cos_sin(req: RopeRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(cache[p, :R/2])`` and ``f(cache[p, R/2:R])`` as ``[T, 1, R/2]``; a position outside the
    table (only reachable with ``check_indices=False``) rotates by zero (cos 1, sin 0)."""
    cache, pos = req.cos_sin_cache, req.positions
    assert cache is not None and pos is not None
    half = cache.shape[1] // 2
    p = pos.to(torch.int64)
    ok = (p >= 0) & (p < cache.shape[0])
    rows = cache[torch.where(ok, p, 0)].float()
    cos = torch.where(ok[:, None], rows[:, :half], 1.0)
    sin = torch.where(ok[:, None], rows[:, half : 2 * half], 0.0)
    return cos[:, None, :], sin[:, None, :]


def _norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, req: RopeRequest,
               cs: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:  # fmt: skip
    """Rules 1-3 for one of q, k: returns ``z`` rounded to the input dtype (``rnd(z)``)."""
    dtype = req.plan.dtype
    u = rms_norm_heads(x.float(), weight, eps, req.plan.gemma).to(dtype).float()  # rule 2
    z = u if cs is None else rope_fp32(u, cs[0], cs[1], req.plan.is_neox)
    return z.to(dtype)


def norm_rope_values(req: RopeRequest, which: str) -> torch.Tensor:
    """``rnd(z)`` of q or k (``which``) by rules 1-3, in the input dtype, ``[T, H, D]``: the value the
    outputs, the cache and the FP8 codes are made from."""
    plan = req.plan
    cs = None if req.cos_sin_cache is None else _cos_sin(req)
    if which == "q":
        return _norm_rope(req.q, req.q_weight, plan.q_eps, req, cs)
    return _norm_rope(req.k, req.k_weight, plan.k_eps, req, cs)


def _cache_writes(req: RopeRequest, k_val: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rule 4: the (destination view, value) pairs of the cache write, padding and bad slots skipped."""
    plan = req.plan
    k_cache, v_cache, v, slots = req.k_cache, req.v_cache, req.v, req.slot_mapping
    assert k_cache is not None and v_cache is not None and v is not None and slots is not None
    s = slots.to(torch.int64)
    keep = ((s >= 0) & (s < plan.num_slots)).nonzero().flatten()
    s = s[keep]
    block, off = s // plan.block_size, s % plan.block_size
    kv, vv = k_val[keep], v[keep]
    writes = []
    for cache, value, scale in ((k_cache, kv, req.k_scale), (v_cache, vv, req.v_scale)):
        if plan.cache_fp8:
            assert scale is not None
            value = fp8_codes(value.float(), scale.float().view(1, -1, 1), cache.dtype)
            writes.append((cache.view(torch.uint8), (block, off, value.view(torch.uint8))))
        else:
            writes.append((cache, (block, off, value)))
    return writes  # type: ignore[return-value]


@torch.no_grad()
def qk_norm_rope_reference(req: RopeRequest, *, check: bool = True) -> None:
    """Compute every output of ``req`` by §3 and write them (no-op for T = 0).

    ``check=False`` skips the index check (tests use it to compare skipped slots); a position
    outside the table then leaves that token unrotated.
    """
    plan = req.plan
    if plan.t == 0:
        return
    if check:
        check_indices(req)
    cs = None if req.cos_sin_cache is None else _cos_sin(req)
    q_val = _norm_rope(req.q, req.q_weight, plan.q_eps, req, cs)
    k_val = _norm_rope(req.k, req.k_weight, plan.k_eps, req, cs)
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []
    if req.q_scale is not None:
        q_val = fp8_codes(q_val.float(), req.q_scale.float(), req.q_out.dtype)
    cache_writes = _cache_writes(req, k_val) if plan.has_cache else []
    writes.append((req.q_out, q_val))
    if req.k_out is not None:
        writes.append((req.k_out, k_val))
    for out, value in writes:
        out.copy_(value)
    for cache, (block, off, value) in cache_writes:  # type: ignore[misc]
        cache[block, off] = value
