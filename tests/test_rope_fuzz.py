"""Differential fuzzing of qk_norm_rope: random calls, Triton against the reference.

Hypothesis draws the shapes, variants, layouts, cache dtypes and index dtypes of one call
(``_rope_cases.RopeCase``) and its data seed; every written tensor is compared as in the
variant tests. ``QKNORM_FUZZ_EXAMPLES`` sets the example count (longer runs on a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch
from _cases import fuzz_settings
from _rope_cases import DEVICE, RopeCase, run_case
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

BF16, F16 = torch.bfloat16, torch.float16
FP8 = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]


@st.composite
def rope_cases(draw: st.DrawFn) -> RopeCase:
    d = 2 * draw(st.integers(1, 40))
    rot = draw(st.one_of(st.just(None), st.just(0), st.integers(1, d // 2).map(lambda r: 2 * r)))
    dtype = draw(st.sampled_from([BF16, F16]))
    cache = draw(st.sampled_from([None, dtype, *FP8]))
    layout = draw(st.sampled_from(["packed", "strided", "contiguous"]))
    cache_layout = draw(st.sampled_from(["nhd", "hnd", "unbind"]))
    dv = None if cache_layout == "unbind" else draw(st.one_of(st.just(None), st.integers(1, 48)))
    t = draw(st.integers(1, 12))
    bs = draw(st.sampled_from([1, 2, 3, 16]))
    return RopeCase(
        t=t, hq=draw(st.integers(1, 6)), hk=draw(st.integers(1, 3)), d=d, rot=rot, dtype=dtype,
        table_dtype=draw(st.sampled_from([torch.float32, dtype])), is_neox=draw(st.booleans()),
        gemma=draw(st.booleans()), weights=draw(st.booleans()), layout=layout, cache=cache,
        cache_layout=cache_layout, dv=dv, block_size=bs, num_blocks=-(-t // bs) + draw(st.integers(0, 2)),
        scale_heads=draw(st.booleans()), q_fp8=draw(st.sampled_from([None, *FP8])),
        in_place=draw(st.booleans()), give_k_out=draw(st.booleans()),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])), pad_slots=draw(st.integers(0, 3)),
        max_pos=draw(st.integers(1, 64)), seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


@fuzz_settings(40)
@given(case=rope_cases())
def test_fuzz_triton_against_reference(case: RopeCase) -> None:
    if case.in_place and case.q_fp8 is not None:
        case = RopeCase(**{**vars(case), "q_fp8": None})
    run_case(case, "triton")
