"""Bad input to qk_norm_rope: TypeError / ValueError naming the argument, before anything is written.

Each case breaks one argument of a valid call that writes q_out, k_out and an FP8 or bf16
cache; the test checks the exception type and message and that every written tensor still
holds its sentinel bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _rope_cases import DEVICE, RopeCase, make_call

import qknorm

BF16 = torch.bfloat16
Call = dict[str, Any]


def _base(fp8: bool = False) -> Call:
    case = RopeCase(cache=torch.float8_e4m3fn if fp8 else BF16, layout="contiguous", give_k_out=True)
    call = make_call(case)
    call["q_out"] = torch.full_like(call["q"], 3.0)
    return call


def _set(**kw: Any) -> Callable[[Call], None]:
    return lambda c: c.update(kw)


def _with(name: str, fn: Callable[[torch.Tensor], Any]) -> Callable[[Call], None]:
    return lambda c: c.update({name: fn(c[name])})


# (id, fp8 cache, mutation, exception, message pattern)
BAD: list[tuple[str, bool, Callable[[Call], None], type[Exception], str]] = [
    ("q_not_tensor", False, _with("q", lambda t: t.tolist()), TypeError, "q must be a torch.Tensor, got list"),
    ("q_float32", False, _with("q", lambda t: t.float()), TypeError, "q must have dtype torch.float16 or torch.bfloat16, got torch.float32"),
    ("q_2d", False, _with("q", lambda t: t.flatten(1)), ValueError, r"q must be 3-D \[T, Hq, D\], got shape \[5, 64\]"),
    ("q_odd_d", False, _with("q", lambda t: t[..., :15]), ValueError, "q's head size D must be even and in \\[2, 1024\\], got 15"),
    ("q_d_too_big", False, _set(q=torch.zeros(5, 1, 1026, dtype=BF16, device=DEVICE)), ValueError, "got 1026"),
    ("q_last_stride", False, _with("q", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     "q must have a contiguous last dimension"),
    ("k_dtype", False, _with("k", lambda t: t.half()), TypeError, r"k must have dtype torch.bfloat16 \(q's dtype\), got torch.float16"),
    ("k_head_dim", False, _with("k", lambda t: t[..., :8]), ValueError, r"k must have shape \[T, Hk, D\] = \[5, Hk >= 1, 16\]"),
    ("k_tokens", False, _with("k", lambda t: t[:4]), ValueError, r"k must have shape \[T, Hk, D\]"),
    ("q_weight_dtype", False, _with("q_weight", lambda t: t.float()), TypeError, "q_weight must have dtype torch.bfloat16"),
    ("k_weight_shape", False, _with("k_weight", lambda t: t[:8]), ValueError, r"k_weight must have shape \[D\] = \[16\], got \[8\]"),
    ("table_without_positions", False, _set(positions=None), ValueError, "cos_sin_cache and positions come together"),
    ("table_odd_r", False, _with("cos_sin_cache", lambda t: t[:, :7]), ValueError, "rotary dim\\) must be even and in \\[2, D=16\\], got 7"),
    ("table_r_over_d", False, _with("cos_sin_cache", lambda t: torch.cat((t, t), 1)), ValueError, "got 32"),
    ("table_int", False, _with("cos_sin_cache", lambda t: t.int()), TypeError, "cos_sin_cache must have dtype torch.float32 or torch.bfloat16"),
    ("positions_float", False, _with("positions", lambda t: t.float()), TypeError,
     "positions must have dtype torch.int32 or torch.int64, got torch.float32"),
    ("positions_tokens", False, _with("positions", lambda t: t[:3]), ValueError, r"positions must have shape \[T\] = \[5\], got \[3\]"),
    ("v_alone", False, _set(k_cache=None, v_cache=None, slot_mapping=None), ValueError,
     "v, k_cache, v_cache and slot_mapping come together: got v without k_cache, v_cache, slot_mapping"),
    ("v_tokens", False, _with("v", lambda t: t[:4]), ValueError, r"v must have shape \[T, Hk, Dv\] = \[5, 2, 16\]"),
    ("k_cache_heads", False, _with("k_cache", lambda t: t[:, :, :1]), ValueError,
     r"k_cache must have shape \[num_blocks, block_size, Hk, D\] = \[5, 4, 2, 16\], got \[5, 4, 1, 16\]"),
    ("v_cache_head_size", False, _with("v_cache", lambda t: t[..., :8]), ValueError, r"v_cache must have shape .* = \[5, 4, 2, 16\]"),
    ("k_cache_float32", False, _with("k_cache", lambda t: t.float()), TypeError, "k_cache must have dtype torch.bfloat16 or torch.float8_e4m3fn"),
    ("v_cache_dtype", True, _with("v_cache", lambda t: t.view(torch.uint8)), TypeError, r"v_cache must have dtype torch.float8_e4m3fn \(k_cache's dtype\)"),
    ("fp8_without_scale", True, _set(k_scale=None), ValueError, "k_scale must be given for an FP8 cache"),
    ("scale_on_bf16_cache", False, _set(v_scale=torch.ones(1, device=DEVICE)), ValueError,
     "v_scale must be None with a torch.bfloat16 cache"),
    ("scale_shape", True, _set(k_scale=torch.ones(3, device=DEVICE)), ValueError, r"k_scale must have shape \[1\] or \[2\], got \[3\]"),
    ("scale_dtype", True, _with("v_scale", lambda t: t.double()), TypeError, "v_scale must have dtype torch.float32"),
    ("slots_float", False, _with("slot_mapping", lambda t: t.float()), TypeError, "slot_mapping must have dtype torch.int32 or torch.int64"),
    ("slots_tokens", False, _with("slot_mapping", lambda t: t[:2]), ValueError, r"slot_mapping must have shape \[T\]"),
    ("caches_alias", False, lambda c: c.update(v_cache=c["k_cache"]), ValueError, "k_cache and v_cache must not overlap"),
    ("k_out_is_q", False, lambda c: c.update(k_out=c["q"][:, :2]), ValueError, "k_out must not overlap input q"),
    ("q_out_bf16_with_q_scale", False, _set(q_scale=torch.ones(1, device=DEVICE)), TypeError,
     r"q_out must have dtype torch.float8_e4m3fn or torch.float8_e4m3fnuz \(q_scale quantizes q\)"),
    ("q_out_fp8_without_q_scale", False, _with("q_out", lambda t: t.to(torch.float8_e4m3fn)), TypeError,
     r"q_out must have dtype torch.bfloat16 \(q's dtype; FP8 needs q_scale\)"),
    ("q_scale_per_head", False, lambda c: c.update(q_scale=torch.ones(4, device=DEVICE), q_out=None), ValueError,
     r"q_scale must have shape \[1\], got \[4\]"),
    ("k_out_self_overlap", False, _with("k_out", lambda t: t[:1].expand(5, 2, 16)), ValueError, "k_out is written, so its elements must not overlap"),
    ("eps_negative", False, _set(q_epsilon=-1.0), ValueError, "q_epsilon must be a positive finite float"),
    ("eps_string", False, _set(k_epsilon="1e-6"), TypeError, "k_epsilon must be a positive finite float, got str"),
    ("is_neox_int", False, _set(is_neox=1), TypeError, "is_neox must be a bool, got int"),
    ("check_indices_none", False, _set(check_indices=None), TypeError, "check_indices must be a bool, got NoneType"),
    ("gemma_str", False, _set(gemma_norm="yes"), TypeError, "gemma_norm must be a bool"),
]


@pytest.mark.parametrize("name, fp8, mutate, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_writing(name: str, fp8: bool, mutate: Callable[[Call], None], exc: type[Exception], match: str) -> None:
    call = _base(fp8)
    written = {n: call[n] for n in ("q_out", "k_out", "k_cache", "v_cache")}
    before = {n: t.clone() for n, t in written.items()}
    mutate(call)
    with pytest.raises(exc, match=match):
        qknorm.qk_norm_rope(**call)
    for n, t in written.items():
        assert torch.equal(t.view(torch.uint8), before[n].view(torch.uint8)), f"{n} was written"


def test_q_out_overlapping_packed_k_is_refused() -> None:
    """q_out over k's columns of a packed qkv buffer: an overlap, not the in-place form."""
    call = make_call(RopeCase(layout="packed"))
    q, k = call["q"], call["k"]
    call["q_out"] = torch.as_strided(k, q.shape, q.stride(), k.storage_offset())
    with pytest.raises(ValueError, match="q_out must not overlap input k"):
        qknorm.qk_norm_rope(**call)


def test_in_place_on_packed_qkv_is_allowed() -> None:
    """q_out=q and k_out=k on views of one packed buffer: q's and k's columns interleave, no overlap."""
    call = make_call(RopeCase(layout="packed", cache=BF16, in_place=True))
    out = qknorm.qk_norm_rope(**call)
    assert out.q is call["q"] and out.k is call["k"]


def test_unbind_cache_views_are_not_an_overlap() -> None:
    call = make_call(RopeCase(cache=BF16, cache_layout="unbind"))
    qknorm.qk_norm_rope(**call)


def test_meta_tensors_are_refused() -> None:
    q = torch.empty(2, 2, 8, dtype=BF16, device="meta")
    with pytest.raises(ValueError, match="q must be on a real device"):
        qknorm.qk_norm_rope(q, q, None, None, None, None)


def test_zero_tokens_is_a_no_op() -> None:
    call = make_call(RopeCase(t=0, cache=BF16))
    before = call["k_cache"].clone()
    out = qknorm.qk_norm_rope(**call)
    assert out.q.shape == (0, 4, 16) and out.k is None
    assert torch.equal(before, call["k_cache"])
