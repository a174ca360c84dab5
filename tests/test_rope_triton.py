"""The Triton backend of qk_norm_rope against the reference (CPU: TRITON_INTERPRET=1, small shapes).

Each case is one public call with ``QKNORM_BACKEND=triton`` whose every written tensor is
compared with :mod:`qknorm.rope.reference` (``_rope_cases.run_case``): q and k within §3's
ulps, FP8 codes within one step, v in the cache and every untouched cache entry bit for bit.
The variants cover head counts (MHA, GQA, MQA), strides (packed qkv views, padded buffers),
caches (NHD, HND, unbind views; bf16, fp16, both FP8 flavours; per-tensor and per-head
scales), RoPE (full, partial, none; neox and GPT-J; fp32 and input-dtype tables), norms
(weighted, gemma, weightless), FP8 q, in-place calls and odd sizes.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
from _rope_cases import DEVICE, RopeCase, run_case, variants

from qknorm.backends import registry
from qknorm.rope import triton_launch
from qknorm.rope.checks import plan_call

pytest.importorskip("triton")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

BF16, F16 = torch.bfloat16, torch.float16
E4M3, E4M3UZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz

BASE = RopeCase(cache=BF16)
CASES = [
    BASE,
    *variants(BASE, hq=[1, 3, 8], hk=[1, 4], d=[2, 6, 64], rot=[0, 2, 6, 10], is_neox=[False], gemma=[True],
              weights=[False], table_dtype=[BF16], layout=["strided", "contiguous"],
              cache=[None, E4M3, E4M3UZ], cache_layout=["hnd", "unbind"], dv=[6, 32], block_size=[1, 16],
              q_fp8=[E4M3, E4M3UZ], in_place=[True], give_k_out=[True], index_dtype=[torch.int32], t=[1, 13]),
    RopeCase(cache=E4M3, scale_heads=True, cache_layout="hnd", is_neox=False, rot=8, q_fp8=E4M3),
    RopeCase(cache=E4M3UZ, scale_heads=True, cache_layout="unbind", gemma=True, in_place=True, dtype=F16, table_dtype=F16),
    RopeCase(cache=F16, dtype=F16, layout="strided", dv=10, rot=4, is_neox=False, weights=False, give_k_out=True),
    RopeCase(t=6, hq=5, hk=3, d=24, rot=12, layout="strided"),  # nothing a power of two
    RopeCase(dtype=F16, cache=F16),
]


def _id(c: RopeCase) -> str:
    diff = [f"{k}={v}" for k, v in vars(c).items() if v != getattr(RopeCase(), k)]
    return ",".join(diff).replace("torch.", "") or "default"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_triton_matches_reference(case: RopeCase) -> None:
    run_case(case, "triton")


@pytest.mark.parametrize("t", [1, 255, 257, 5000])
def test_launch_config_blocks_are_powers_of_two(t: int) -> None:
    for d, rot in ((128, 128), (128, 64), (256, 64), (96, 0), (6, 2)):
        q = torch.empty(t, 32, d, dtype=BF16)
        k = torch.empty(t, 8, d, dtype=BF16)
        table = torch.empty(8, rot) if rot else None
        pos = torch.empty(t, dtype=torch.int64) if rot else None
        cfg = triton_launch.launch_config(plan_call(q, k, None, None, table, pos), t)
        for n in (cfg.rows_q, cfg.rows_k, cfg.num_warps):
            assert n >= 1 and n & (n - 1) == 0, cfg


def _use_rule(monkeypatch: pytest.MonkeyPatch, tile: int, ept: int, flags: triton_launch._Flags) -> None:
    """Launch every call with one bucket; forget the launches the backends planned under the old rule."""
    monkeypatch.setattr(triton_launch, "_BUCKETS", (triton_launch._Bucket(None, tile, ept, flags, flags),))
    registry.reset()


def test_many_programs_per_token_and_many_tokens_per_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of one token split across programs and programs spanning tokens agree with the reference,
    with the loads issued before the norm's reduction and after it."""
    for tile in (16, 256):
        for early in (True, False):
            _use_rule(monkeypatch, tile, 8, triton_launch._Flags(early, early, not early))
            run_case(RopeCase(t=7, hq=6, hk=2, d=16, cache=E4M3), "triton")
            run_case(RopeCase(t=5, hq=3, hk=1, d=12, rot=8, is_neox=False, cache=BF16, gemma=True), "triton")


FLAGS = [triton_launch._Flags(e, m, v) for e in (True, False) for m in (True, False) for v in (True, False)]


@pytest.mark.parametrize("off32", [True, False], ids=["off32", "off64"])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: f"early={f.early_loads:d},masks={f.row_mask:d},vfirst={f.v_first:d}")
def test_every_kernel_flag_and_offset_width(monkeypatch: pytest.MonkeyPatch, flags: triton_launch._Flags,
                                            off32: bool) -> None:  # fmt: skip
    """Each combination of the launch rule's flags, with offsets in 32 and in 64 bits, agrees with
    the reference: on blocks of one token's heads (without row masks their loads and stores go
    unpredicated) and on blocks spanning tokens; a slot of -1 leaves the cache untouched."""
    monkeypatch.setattr(triton_launch, "_offsets_fit_int32", lambda req: off32)
    for tile in (32, 256):
        _use_rule(monkeypatch, tile, 4, flags)
        run_case(RopeCase(t=7, hq=4, hk=2, d=16, cache=E4M3), "triton")
        run_case(RopeCase(t=5, hq=4, hk=2, d=16, rot=8, is_neox=False, cache=BF16, give_k_out=True), "triton")


def _meta(shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    return torch.empty_strided(shape, stride, device="meta")


@pytest.mark.parametrize(("attr", "tensor", "fits"), [
    ("q", _meta((2**20, 32, 64), (2048, 64, 1)), True),  # (2^20 - 1) * 2048 + 2047 = 2^31 - 1
    ("q", _meta((2**20 + 1, 32, 64), (2048, 64, 1)), False),  # 2^31 + 2047
    ("k_out", _meta((2**21 + 1, 8, 128), (1024, 128, 1)), False),  # 2^31 + 1023
    ("v", _meta((0, 8, 128), (2**40, 128, 1)), True),  # empty: no offset at all
    ("k_cache", _meta((2**20, 16, 8, 128), (16384, 1024, 128, 1)), True),  # blocks: 64-bit offsets anyway
    ("v_cache", _meta((4, 16, 8, 128), (2**32, 2**28, 128, 1)), False),  # 15 * 2^28 + ... within a block
    ("cos_sin_cache", _meta((2**25, 128), (128, 1)), True),  # table rows: 64-bit offsets anyway
])  # fmt: skip
def test_offsets_fit_int32_checks_rows_and_cache_blocks(attr: str, tensor: torch.Tensor, fits: bool) -> None:
    """32-bit offsets are used only where every row offset (and every offset within a cache block)
    fits; the number of table rows and cache blocks does not matter (their offsets are 64-bit), so
    warm-up compiles the variant the engine's calls use."""
    req = types.SimpleNamespace(**{a: None for a in triton_launch._TENSORS.values()})
    setattr(req, attr, tensor)
    assert triton_launch._offsets_fit_int32(req) is fits  # type: ignore[arg-type]


@pytest.mark.parametrize("cache", [BF16, E4M3])
def test_qwen3_launch_flags_are_the_measured_ones(cache: torch.dtype) -> None:
    """The launch rule picks, per token count and cache dtype, the flags measured fastest on the
    H200 (qknorm/rope/triton_launch.py): row masks at decode sizes, v rows first from 65 tokens
    (with an FP8 cache only up to 1024), loads after the reduction from 257 tokens."""
    q, k, v = (torch.empty(2, n, 128, dtype=BF16) for n in (32, 8, 8))
    plan = plan_call(q, k, None, None, torch.empty(64, 128), torch.zeros(2, dtype=torch.int64), v=v,
                     k_cache=torch.empty(4, 16, 8, 128, dtype=cache), v_cache=torch.empty(4, 16, 8, 128, dtype=cache),
                     slot_mapping=torch.arange(2), **({"k_scale": torch.ones(1), "v_scale": torch.ones(1)} if cache == E4M3 else {}))  # fmt: skip
    got = {t: (c.early_loads, c.row_mask, c.v_first) for t in (1, 64, 65, 256, 257, 1024, 1025, 65536)
           for c in [triton_launch.launch_config(plan, t)]}  # fmt: skip
    fp8 = cache == E4M3
    assert got == {
        1: (True, True, False), 64: (True, True, False),
        65: (True, not fp8, True), 256: (True, not fp8, True),
        257: (False, False, True), 1024: (False, False, True),
        1025: (False, False, not fp8), 65536: (False, False, not fp8),
    }  # fmt: skip
