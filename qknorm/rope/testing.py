"""Comparisons of ``qk_norm_rope`` outputs with the reference, by SPEC_ROPE_CACHE §3's tolerances.

q, k and a q-dtype k cache: ``|out - ref| <= ulp(ref) + ulp(m)`` per element, ``m`` the larger
magnitude of the rotation pair the element comes from (``|u|`` for pass-through channels), with
at most 1% of elements differing at all. FP8 q and cache codes: within one step, at most 0.5%
differing, beyond the move §3 allows in the quantized value (:func:`fp8_slack`). v in the cache: bit-exact. The numbers live in :data:`qknorm.testing.TOLERANCES`.
Comparisons run on the actual tensor's device (GPU tests at T = 65536 stay fast).
"""

from __future__ import annotations

import torch

from ..testing import TOLERANCES
from .reference import norm_rope_values, rms_norm_heads
from .request import RopeRequest

__all__ = ["ulp", "pair_magnitude", "fp8_slack", "assert_rope_close", "assert_rope_fp8_close", "assert_bits_equal"]

# Significand bits after the point and smallest subnormal exponent of each output dtype.
_FORMAT = {torch.bfloat16: (7, -133), torch.float16: (10, -24)}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 spacing of ``dtype`` at each ``|x|`` (subnormal spacing near zero)."""
    bits, tiny = _FORMAT[dtype]
    _, exp = torch.frexp(x.double().abs())
    return torch.pow(2.0, torch.clamp(exp.double() - 1 - bits, min=tiny))


def pair_magnitude(req: RopeRequest, which: str) -> torch.Tensor:
    """``m`` of §3's tolerance for q or k: ``max(|a|, |b|)`` of each element's pair, ``|u|`` outside R."""
    plan = req.plan
    x, w, eps = (req.q, req.q_weight, plan.q_eps) if which == "q" else (req.k, req.k_weight, plan.k_eps)
    u = rms_norm_heads(x.float(), w, eps, plan.gemma).to(plan.dtype).float().abs()
    m = u.clone()
    half, rot = plan.rot // 2, plan.rot
    if rot:
        a, b = (u[..., :half], u[..., half:rot]) if plan.is_neox else (u[..., 0:rot:2], u[..., 1:rot:2])
        pair = torch.maximum(a, b)
        if plan.is_neox:
            m[..., :half], m[..., half:rot] = pair, pair
        else:
            m[..., 0:rot:2], m[..., 1:rot:2] = pair, pair
    return m


def fp8_slack(req: RopeRequest, which: str, scale: torch.Tensor) -> torch.Tensor:
    """How far §3 lets the value quantized for q or k move, in FP8 code units: ``(ulp(rnd(z)) + ulp(m)) / s``.

    FP8 codes are ``fp8(f(rnd(z)) / s)`` and ``rnd(z)`` itself may differ from the reference's by
    ``ulp(ref) + ulp(m)`` (fused multiply-adds, r within 2 ulp). Where RoPE cancels, ``ulp(m)``
    is far larger than the result, so the quantized value can move by many FP8 steps of itself.
    ``scale`` is ``[1]`` or ``[H]``; returns float64 ``[T, H, D]``.
    """
    dtype = req.plan.dtype
    z = norm_rope_values(req, which)
    bound = ulp(z, dtype) + ulp(pair_magnitude(req, which), dtype)
    return bound / scale.double().view(1, -1, 1)


def assert_rope_close(actual: torch.Tensor, expected: torch.Tensor, m: torch.Tensor, name: str) -> None:
    """q / k / q-dtype k-cache values within ``ulp(ref) + ulp(m)``, at most 1% differing; NaN where the reference has NaN."""
    tol = TOLERANCES["rope"]
    a, e = actual.detach().double(), expected.detach().to(actual.device).double()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {list(a.shape)}, expected {list(e.shape)}")
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{name}: NaN positions differ ({int((nan_a != nan_e).sum())} elements)")
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    diff = (a - e).abs()
    bound = tol.rtol * ulp(e, expected.dtype) + tol.atol * ulp(m.detach().to(a.device), expected.dtype)
    bad = diff > bound
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} elements beyond ulp(ref) + ulp(m); first at flat index {i}: "
            f"got {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r} ({tol.reason})"
        )
    frac = float((diff > 0).double().mean()) if diff.numel() else 0.0
    if frac > tol.mismatch:
        raise AssertionError(f"{name}: {frac:.2%} of elements differ, allowed {tol.mismatch:.0%} ({tol.reason})")


def assert_rope_fp8_close(actual: torch.Tensor, expected: torch.Tensor, name: str,
                          slack: torch.Tensor | None = None) -> None:  # fmt: skip
    """FP8 codes within one step of the reference beyond ``slack`` (:func:`fp8_slack`, code units; None: 0),
    at most 0.5% of codes differing at all; NaN where the reference has NaN."""
    tol = TOLERANCES["rope_fp8"]
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype}, expected {expected.dtype}")
    a, e = actual.detach().float(), expected.detach().to(actual.device).float()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{name}: NaN positions differ ({int((nan_a != nan_e).sum())} elements)")
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    if a.numel() == 0:
        return
    # One step near the codes: 2^-3 relative for normals, the subnormal step (2^-9 e4m3fn, 2^-10 e4m3fnuz) near zero.
    sub = 2.0**-10 if actual.dtype == torch.float8_e4m3fnuz else 2.0**-9
    step = torch.clamp(torch.maximum(a.abs(), e.abs()) * tol.rtol, min=sub).double()
    extra = (a.double() - e.double()).abs() - (0.0 if slack is None else slack.to(a.device).double())
    if bool((extra > step).any()):
        i = int((extra - step).flatten().argmax())
        raise AssertionError(f"{name}: code at flat index {i} is {a.flatten()[i]}, expected {e.flatten()[i]}"
                             f" (beyond one step and the allowed slack; {tol.reason})")  # fmt: skip
    frac = float((a != e).float().mean())
    if frac > tol.mismatch:
        raise AssertionError(f"{name}: {frac:.2%} of codes differ, allowed {tol.mismatch:.1%}")


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Bit-exact equality (v in the cache, memory that must stay untouched)."""
    a, e = actual.detach(), expected.detach().to(actual.device)
    if a.dtype != e.dtype or a.shape != e.shape:
        raise AssertionError(f"{name}: {a.dtype} {list(a.shape)}, expected {e.dtype} {list(e.shape)}")
    ab = a.contiguous().view(torch.uint8) if a.element_size() == 1 else a.contiguous().view(torch.int16 if a.element_size() == 2 else torch.int32)
    eb = e.contiguous().view(ab.dtype)
    if not torch.equal(ab, eb):
        n = int((ab != eb).sum())
        raise AssertionError(f"{name}: {n} elements differ bit for bit")
