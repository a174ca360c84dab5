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
from typing import Any

import pytest
import torch
from _rope_cases import DEVICE, RopeCase, run_case, variants

import qknorm
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
    ("k_cache", _meta((2, 16, 8, 128), (2**30, 1024, 128, 1)), True),  # largest offset 2^30 + 16383
    ("k_cache", _meta((3, 16, 8, 128), (2**30, 1024, 128, 1)), False),  # 2^31 + 16383
    ("q", _meta((2**20, 32, 64), (2048, 64, 1)), True),  # (2^20 - 1) * 2048 + 2047 = 2^31 - 1
    ("q", _meta((2**20 + 1, 32, 64), (2048, 64, 1)), False),  # 2^31 + 2047
    ("cos_sin_cache", _meta((2**24, 128), (128, 1)), True),  # 2^31 - 1
    ("cos_sin_cache", _meta((2**24 + 1, 128), (128, 1)), False),
    ("v_cache", _meta((0, 16, 8, 128), (2**40, 1024, 128, 1)), True),  # empty: no offset at all
])  # fmt: skip
def test_offsets_fit_int32_checks_every_tensor(attr: str, tensor: torch.Tensor, fits: bool) -> None:
    """32-bit offsets are used only where the largest element offset of every tensor of the call fits."""
    req = types.SimpleNamespace(**{a: None for a in triton_launch._TENSORS.values()}, plan=types.SimpleNamespace(num_slots=64))
    setattr(req, attr, tensor)
    assert triton_launch._offsets_fit_int32(req) is fits  # type: ignore[arg-type]
    req.plan.num_slots = 2**31  # a slot is split in 32 bits only below 2^31
    assert triton_launch._offsets_fit_int32(req) is False  # type: ignore[arg-type]


@pytest.mark.parametrize("max_t", [0, 1, 40, 64, 65, 256, 300, 70000])
def test_warmup_sizes_cover_every_bucket(max_t: int) -> None:
    """Every bucket that a call of at most max_t tokens falls in has a warmup size (CUDA-graph capture needs it)."""
    sizes = triton_launch.RopeTritonBackend().warmup_sizes(max_t)
    assert all(1 <= t <= max_t for t in sizes)
    warmed = {triton_launch._bucket(t) for t in sizes}
    for t in (1, 2, 63, 64, 65, 255, 256, 257, 1000, 70000):
        if t <= max_t:
            assert triton_launch._bucket(t) in warmed, (t, sizes)


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


def test_warmup_compiles_the_64_bit_offset_variants_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-up's tensors are small, so its calls take 32-bit offsets; a call whose table or cache
    holds 2^31 elements or more takes the 64-bit variant, which warm-up must compile as well
    (it cannot know the engine's sizes): it launches every warmed size both ways."""
    seen: list[tuple[int, bool]] = []
    launch_args = triton_launch.RopeTritonBackend.launch_args

    def spy(self: triton_launch.RopeTritonBackend, req: Any) -> Any:
        grid, cfg, args, constexprs = launch_args(self, req)
        seen.append((req.plan.t, constexprs["OFF32"]))
        return grid, cfg, args, constexprs

    monkeypatch.setattr(triton_launch.RopeTritonBackend, "launch_args", spy)
    monkeypatch.setenv("QKNORM_BACKEND", "triton")
    registry.reset()
    record = qknorm.warmup_qk_norm_rope(4, 2, 16, max_tokens=5, device=DEVICE, cache_dtype=BF16)
    assert record.backend == "triton"
    assert set(seen) == {(t, off32) for t in record.sizes for off32 in (True, False)}
