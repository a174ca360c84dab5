"""The qk_norm_rope reference against an independent float64 chain, and its index checks.

The independent chain is written the way HF and vLLM write the unfused model code (RMSNorm,
then ``x * cos + rotate_half(x) * sin`` with the cos/sin halves repeated, or the interleaved
GPT-J form), in float64, with the one rounding SPEC_ROPE_CACHE §3 puts between the steps.
"""

from __future__ import annotations

import pytest
import torch
from _rope_cases import RopeCase, make_call, reference_request

from qknorm.rope.checks import check_indices
from qknorm.rope.reference import qk_norm_rope_reference
from qknorm.rope.testing import assert_rope_close, pair_magnitude


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def chain64(x: torch.Tensor, w: torch.Tensor | None, eps: float, gemma: bool, table: torch.Tensor | None,
            pos: torch.Tensor | None, neox: bool) -> torch.Tensor:  # fmt: skip
    """Norm (float64), round to x's dtype, RoPE (float64) on the first R channels, round."""
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * (w.double() + (1.0 if gemma else 0.0))
    u = y.to(x.dtype).double()
    if table is None:
        return u.to(x.dtype)
    rot = table.shape[1]
    cos, sin = table[pos.long()].double()[:, None, :].chunk(2, dim=-1)  # type: ignore[union-attr]
    r, rest = u[..., :rot], u[..., rot:]
    if neox:
        z = r * torch.cat((cos, cos), -1) + _rotate_half(r) * torch.cat((sin, sin), -1)
    else:
        z = r * cos.repeat_interleave(2, -1) + _rotate_every_two(r) * sin.repeat_interleave(2, -1)
    return torch.cat((z, rest), dim=-1).to(x.dtype)


CASES = [
    RopeCase(),
    RopeCase(is_neox=False),
    RopeCase(rot=8, dtype=torch.float16, table_dtype=torch.float16),
    RopeCase(rot=4, is_neox=False, gemma=True),
    RopeCase(rot=0, weights=False),
    RopeCase(d=64, hq=3, hk=1, t=9, table_dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"rot{c.r}-{'neox' if c.is_neox else 'gptj'}-{c.dtype}")
def test_reference_matches_float64_chain(case: RopeCase) -> None:
    call = make_call(case)
    req = reference_request(call)
    qk_norm_rope_reference(req)
    p = req.plan
    for which, x, w, eps, out in (("q", req.q, req.q_weight, p.q_eps, req.q_out), ("k", req.k, req.k_weight, p.k_eps, req.k_out)):
        want = chain64(x, w, eps, p.gemma, req.cos_sin_cache, req.positions, p.is_neox)
        assert_rope_close(out, want, pair_magnitude(req, which), which)  # type: ignore[arg-type]


def test_rounding_between_norm_and_rope_is_the_unfused_one() -> None:
    """Keeping fp32 between the steps (vLLM's CUDA op) is detectably different from §3."""
    req = reference_request(make_call(RopeCase(t=16, hq=8, d=64)))
    qk_norm_rope_reference(req)
    x = req.q.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + req.plan.q_eps) * req.q_weight.double()  # type: ignore[union-attr]
    cos, sin = req.cos_sin_cache[req.positions.long()].double()[:, None, :].chunk(2, -1)  # type: ignore[index, union-attr]
    fused = (y * torch.cat((cos, cos), -1) + _rotate_half(y) * torch.cat((sin, sin), -1)).to(req.q.dtype)
    assert (fused != req.q_out).float().mean() > 0.05


def test_reference_cache_write_and_padding() -> None:
    case = RopeCase(cache=torch.bfloat16, pad_slots=2)
    call = make_call(case)
    before = call["k_cache"].clone()
    req = reference_request(call)
    qk_norm_rope_reference(req)
    slots = req.slot_mapping.long()  # type: ignore[union-attr]
    bs = case.block_size
    k_val = chain64(req.k, req.k_weight, req.plan.k_eps, False, req.cos_sin_cache, req.positions, True)
    for t in range(case.t):
        s = int(slots[t])
        if s < 0:
            continue
        assert_rope_close(req.k_cache[s // bs, s % bs], k_val[t], pair_magnitude(req, "k")[t], f"k_cache token {t}")  # type: ignore[index]
        assert torch.equal(req.v_cache[s // bs, s % bs], req.v[t])  # type: ignore[index]
    written = {int(s) for s in slots if s >= 0}
    untouched = [s for s in range(case.num_blocks * bs) if s not in written]
    for s in untouched:
        assert torch.equal(req.k_cache[s // bs, s % bs], before[s // bs, s % bs])  # type: ignore[index]


@pytest.mark.parametrize("bad", ["position_high", "position_negative", "slot_high"])
def test_check_indices_names_first_bad_index(bad: str) -> None:
    call = make_call(RopeCase(cache=torch.bfloat16, t=6))
    if bad == "position_high":
        call["positions"][2] = 40
        call["positions"][4] = 99
        match = r"positions\[2\] = 40 is outside the cos_sin_cache rows \[0, 40\)"
    elif bad == "position_negative":
        call["positions"][3] = -1
        match = r"positions\[3\] = -1"
    else:
        call["slot_mapping"][5] = 20
        match = r"slot_mapping\[5\] = 20 is past the cache's 20 slots"
    req = reference_request(call)
    with pytest.raises(ValueError, match=match):
        check_indices(req)
    with pytest.raises(ValueError, match=match):
        qk_norm_rope_reference(req)


def test_negative_slots_are_padding_not_errors() -> None:
    call = make_call(RopeCase(cache=torch.bfloat16, pad_slots=6, t=6))
    check_indices(reference_request(call))


def test_fp8_tolerance_follows_the_quantized_value() -> None:
    """r may differ by ~2 fp32 ulp between backends (§3), which flips the rounding of u by one ulp;
    where RoPE cancels (here: 45 degrees and pairs a ~ b) the rotated value is about that ulp, so its
    FP8 code moves by many steps. The FP8 comparison must accept exactly that (a plain one-step
    rule does not), because it follows the deviation §3 allows in the value being quantized."""
    from qknorm.rope.reference import fp8_codes, rope_fp32
    from qknorm.rope.testing import assert_rope_fp8_close, fp8_slack

    case = RopeCase(t=64, hq=8, hk=1, d=128, rot=128, weights=False, q_fp8=torch.float8_e4m3fn, max_pos=4, seed=3)
    call = make_call(case)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, 64, generator=g)
    wobble = 1 + 2.0**-9 * torch.randint(-2, 3, (64, 8, 64), generator=g)
    call["q"].copy_(torch.cat((x, x * wobble), -1))  # pairs (a, b) within a few bf16 ulp of each other
    call["cos_sin_cache"][:] = 0.5**0.5  # every rotation by 45 degrees: z = (a - b) / sqrt(2) cancels
    call["q_scale"].fill_(2.0**-12)
    req = reference_request(call)
    qk_norm_rope_reference(req)
    xf = req.q.float()
    r = torch.rsqrt(torch.sum(xf * xf, -1, keepdim=True) / 128 + req.plan.q_eps) * (1 + 2.0**-22)  # 2 ulp off
    u = (xf * r).to(torch.bfloat16).float()
    cos = torch.full((64, 1, 64), 0.5**0.5, device=u.device)
    moved = fp8_codes(rope_fp32(u, cos, cos, True).to(torch.bfloat16).float(), req.q_scale, torch.float8_e4m3fn)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="beyond one step"):
        assert_rope_fp8_close(moved, req.q_out, "q_out, one-step rule")
    assert_rope_fp8_close(moved, req.q_out, "q_out", fp8_slack(req, "q", req.q_scale))  # type: ignore[arg-type]
