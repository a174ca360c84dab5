"""Hostile input to qk_norm_rope: out-of-range indices, NaN/inf, saturating FP8 scales.

The caches and the cos/sin table are views into larger buffers whose guard regions hold
sentinels (random bytes around the caches, NaN rows around the table), so a read or write
outside them shows up: a changed guard byte, or a NaN in an output. Indices are the most
hostile values each index dtype holds. Runs on the default backend of the device and on Triton.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from _rope_cases import DEVICE, RopeCase, make_call, reference_request, written_slots

import qknorm
from qknorm.rope.reference import qk_norm_rope_reference
from qknorm.rope.testing import assert_bits_equal, assert_rope_close, assert_rope_fp8_close, fp8_slack, pair_magnitude
from qknorm.testing import backend_override

BF16 = torch.bfloat16
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["torch", "triton"] if DEVICE.type == "cuda" or INTERPRET else ["torch"]


def _fill(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype.itemsize == 1:
        return torch.randint(0, 120, shape, dtype=torch.uint8, device=DEVICE).view(dtype)
    return torch.randn(shape, device=DEVICE).to(dtype)


def _guarded(call: dict[str, Any], case: RopeCase) -> dict[str, torch.Tensor]:
    """Move the caches and table into buffers with a guard block (row) on each side, keeping the
    caches' layouts (NHD, HND, unbind views); returns the buffers, block dimension first."""
    kc, vc = call["k_cache"], call["v_cache"]
    nb = kc.shape[0]
    if case.cache_layout == "unbind":
        both = _fill((nb + 2, 2, *kc.shape[1:]), kc.dtype)
        both[1:-1, 0], both[1:-1, 1] = kc, vc
        bufs = {"k_cache": both[:, 0], "v_cache": both[:, 1]}
    else:
        bufs = {}
        for name, c in (("k_cache", kc), ("v_cache", vc)):
            perm = sorted(range(4), key=lambda i: -c.stride(i))  # memory order, blocks first
            base = _fill((nb + 2, *(c.shape[i] for i in perm[1:])), c.dtype)
            bufs[name] = base.permute(*(perm.index(i) for i in range(4)))
            bufs[name][1:-1] = c
    call["k_cache"], call["v_cache"] = bufs["k_cache"][1:-1], bufs["v_cache"][1:-1]
    assert call["k_cache"].stride() == kc.stride()
    table = call["cos_sin_cache"]
    tbuf = torch.full((table.shape[0] + 2, table.shape[1]), float("nan"), dtype=table.dtype, device=DEVICE)
    tbuf[1:-1] = table
    call["cos_sin_cache"] = tbuf[1:-1]
    return bufs


def _hostile_indices(call: dict[str, Any], case: RopeCase) -> tuple[list[int], list[int]]:
    """Bad positions and slots at fixed tokens; returns (tokens with bad positions, tokens with bad slots)."""
    big = 2**31 - 1 if case.index_dtype == torch.int32 else 2**62
    small = -(2**31) if case.index_dtype == torch.int32 else -(2**62)
    n_slots = case.num_blocks * case.block_size
    pos = call["positions"]
    bad_pos = {0: -1, 2: case.max_pos, 4: big, 6: small}
    for t, p in bad_pos.items():
        pos[t] = p
    slots = call["slot_mapping"]
    bad_slots = {1: n_slots, 3: big, 5: n_slots + case.block_size, 7: small}
    for t, s in bad_slots.items():
        slots[t] = s
    return list(bad_pos), list(bad_slots)


CASES = [
    RopeCase(t=9, cache=BF16, num_blocks=3),
    RopeCase(t=9, cache=torch.float8_e4m3fn, num_blocks=3, cache_layout="hnd", index_dtype=torch.int32, q_fp8=torch.float8_e4m3fn),
    RopeCase(t=9, cache=BF16, num_blocks=3, cache_layout="unbind", is_neox=False, rot=8, give_k_out=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=["nhd", "fp8-hnd-int32", "unbind-gptj"])
def test_bad_indices_touch_nothing_outside(case: RopeCase, backend: str) -> None:
    call = make_call(case)
    bufs = _guarded(call, case)
    bad_pos, bad_slots = _hostile_indices(call, case)
    before = {n: b.clone() for n, b in bufs.items()}
    exp = reference_request(call)
    qk_norm_rope_reference(exp, check=False)
    with backend_override(backend):
        if backend == "torch":  # the reference checks indices always (§3 rule 6)
            with pytest.raises(ValueError, match=r"positions\[0\] = -1"):
                qknorm.qk_norm_rope(**call)
            return
        out = qknorm.qk_norm_rope(**call)
    good = [t for t in range(case.t) if t not in bad_pos]
    assert torch.isfinite(out.q.float()).all(), "a bad position must give finite values for finite inputs"
    m_q = pair_magnitude(exp, "q")
    if exp.plan.q_fp8:
        assert_rope_fp8_close(out.q[good], exp.q_out[good], "q_out (good positions)",
                              fp8_slack(exp, "q", exp.q_scale)[good])  # type: ignore[arg-type]  # fmt: skip
    else:
        assert_rope_close(out.q[good], exp.q_out[good], m_q[good], "q_out (good positions)")
    if out.k is not None:
        assert_rope_close(out.k[good], exp.k_out[good], pair_magnitude(exp, "k")[good], "k_out (good positions)")  # type: ignore[index]
    tok, blk, off = written_slots(exp)
    assert not set(tok.tolist()) & set(bad_slots)
    for name, buf in bufs.items():
        assert_bits_equal(buf[0], before[name][0], f"{name}: guard block before the cache")
        assert_bits_equal(buf[-1], before[name][-1], f"{name}: guard block after the cache")
        got = buf[1:-1]
        masked = got.clone()
        masked[blk, off] = before[name][1:-1][blk, off]
        assert_bits_equal(masked, before[name][1:-1], f"{name}: entries of skipped or unused slots")
        keep = [i for i, t in enumerate(tok.tolist()) if t not in bad_pos]
        if name == "v_cache":
            assert_bits_equal(got[blk, off], getattr(exp, name)[blk, off], name)
        elif exp.plan.cache_fp8:
            assert_rope_fp8_close(got[blk[keep], off[keep]], exp.k_cache[blk[keep], off[keep]], name,  # type: ignore[index]
                                  fp8_slack(exp, "k", exp.k_scale)[tok[keep]])  # type: ignore[arg-type]  # fmt: skip
        else:
            assert_rope_close(got[blk[keep], off[keep]], exp.k_cache[blk[keep], off[keep]],  # type: ignore[index]
                              pair_magnitude(exp, "k")[tok[keep]], name)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["position", "slot"])
def test_check_indices_raises_before_writing(which: str, backend: str) -> None:
    case = RopeCase(t=6, cache=torch.float8_e4m3fn)
    call = make_call(case)
    call["q_out"] = torch.full_like(call["q"], 5.0)
    if which == "position":
        call["positions"][3] = 2**40
        match = r"positions\[3\] = 1099511627776 is outside the cos_sin_cache rows \[0, 40\)"
    else:
        call["slot_mapping"][4] = 20
        match = r"slot_mapping\[4\] = 20 is past the cache's 20 slots"
    written = {n: call[n].clone() for n in ("q_out", "k_cache", "v_cache")}
    with backend_override(backend), pytest.raises(ValueError, match=match):
        qknorm.qk_norm_rope(**call, check_indices=True)
    for n, b in written.items():
        assert_bits_equal(call[n], b, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_stay_in_their_head(backend: str) -> None:
    """A NaN or inf in one head makes that head NaN (as the reference), never a neighbour."""
    case = RopeCase(t=4, cache=BF16, pad_slots=0)
    call = make_call(case)
    call["q"][1, 2, 3] = float("nan")
    call["k"][2, 1, 0] = float("inf")
    exp = reference_request(call)
    qk_norm_rope_reference(exp)
    with backend_override(backend):
        out = qknorm.qk_norm_rope(**call)
    assert torch.isnan(out.q[1, 2]).all() and torch.isfinite(out.q[0]).all() and torch.isfinite(out.q[1, :2]).all()
    assert_rope_close(out.q, exp.q_out, pair_magnitude(exp, "q"), "q_out")
    tok, blk, off = written_slots(exp)
    assert_rope_close(call["k_cache"][blk, off], exp.k_cache[blk, off], pair_magnitude(exp, "k")[tok], "k_cache")  # type: ignore[index]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_fp8_saturates_at_fmax(backend: str, fp8: torch.dtype) -> None:
    """A scale far too small clamps codes at +-FMAX (no NaN, no wrap-around), as the reference."""
    call = make_call(RopeCase(t=4, cache=fp8, q_fp8=fp8, pad_slots=0))
    call["k_scale"].fill_(1e-6)
    call["q_scale"].fill_(1e-6)
    exp = reference_request(call)
    qk_norm_rope_reference(exp)
    with backend_override(backend):
        out = qknorm.qk_norm_rope(**call)
    fmax = 448.0 if fp8 == torch.float8_e4m3fn else 240.0
    assert out.q.float().abs().max() == fmax
    assert_bits_equal(out.q, exp.q_out, "q_out (saturated codes are exact)")
    _, blk, off = written_slots(exp)
    assert call["k_cache"][blk, off].float().abs().max() == fmax
