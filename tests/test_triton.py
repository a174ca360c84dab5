"""The Triton backend against the reference, every mode; CPU under TRITON_INTERPRET=1, GPU marked.

Three layers:

- The number encoders of ``triton_quant_kernels`` (FP8 e4m3fn / e4m3fnuz, bf16, E2M1, the
  correctly rounded quotient, E2M1 of scaled groups) through tiny test kernels, bit for bit
  against torch's casts, the reference and the format tables of ``tests/_cases.py`` (on a GPU
  also the hardware conversions the kernels use there).
- Whole calls through the public API with ``QKNORM_BACKEND=triton`` (``_cases.run_case``:
  sentinel-padded outputs, strided and offset inputs, every entry and mode), once with the
  shipped tile limits and once with tiny ones that force the multi-pass (chunked) row path.
- The backend directly: every kind of launch configuration the heuristics choose, in-place
  forms, M = 0, warm-up buckets, capability answers, launch arguments by name, the logged
  fallback when the direct launch is disabled.

The GPU suite (``@pytest.mark.gpu``) repeats this at real sizes: DeepSeek's ``[T, 2112]``
split views up to T = 65536 and widths up to 16384.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from _cases import DEVICE, FP8_FORMATS, Case, e2m1_encode, run_case

import qknorm
from qknorm.backends import registry
from qknorm.backends import triton_backend as tb
from qknorm.backends.triton_backend import TritonBackend
from qknorm.checks import build_request
from qknorm.quant import QuantMode, QuantType
from qknorm.reference import qk_rmsnorm_reference
from qknorm.testing import (
    assert_fp8_close,
    assert_mxfp4_close,
    assert_norm_close,
    assert_scales_close,
    backend_override,
)

triton = pytest.importorskip("triton")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from qknorm.backends import triton_quant_kernels as tq  # noqa: E402  (after the interpreter choice)

tl = triton.language
ON_GPU = DEVICE.type == "cuda"
NATIVE = ON_GPU and torch.version.hip is None


@pytest.fixture
def chunked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """``True``: tiny tile limits, so every row wider than 16 columns takes the multi-pass path."""
    if request.param:
        monkeypatch.setattr(tb, "_MAX_SINGLE", 16)
        monkeypatch.setattr(tb, "_CHUNK", 16)
    registry.reset()
    yield request.param
    registry.reset()


# ----------------------------------------------------------------------------- encoders


@triton.jit
def _encode_kernel(X_PTR, FP8_PTR, BF16_PTR, E2M1_PTR, n, FNUZ: tl.constexpr, NATIVE: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X_PTR + offs, mask=mask, other=0.0)
    tl.store(FP8_PTR + offs, tq.fp8_code(x, FNUZ, NATIVE and not FNUZ), mask=mask)
    tl.store(BF16_PTR + offs, tq.to_out(x, BF16_PTR, NATIVE), mask=mask)
    tl.store(E2M1_PTR + offs, tq._e2m1_code(x).to(tl.uint8), mask=mask)


def _probe_values(fmax: float) -> torch.Tensor:
    """Every FP8 grid value, every midpoint between neighbours (ties), their fp32 neighbours,
    subnormals, signs, zeros, NaN, and random fp32 values across the range."""
    grid = torch.tensor(sorted({abs(v) for v in FP8_FORMATS[torch.float8_e4m3fn].values}
                               | {abs(v) for v in FP8_FORMATS[torch.float8_e4m3fnuz].values}),
                        dtype=torch.float64)  # fmt: skip
    mids = (grid[1:] + grid[:-1]) / 2
    base = torch.cat((grid, mids, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e-30, 3e-3])))
    b32 = base.float()
    up = torch.nextafter(b32, torch.full_like(b32, math.inf))
    down = torch.nextafter(b32, torch.zeros_like(b32))
    gen = torch.Generator().manual_seed(1)
    rand = torch.exp(torch.empty(4000).uniform_(-14, 6, generator=gen)).float()
    rand = rand * torch.where(torch.rand(4000, generator=gen) < 0.5, -1.0, 1.0)
    vals = torch.cat((b32, up, down, -b32, -up, -down, rand, torch.tensor([0.0, -0.0, math.nan])))
    return vals.clamp(-fmax, fmax)  # clamp keeps NaN; the kernels clamp before encoding


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("native", [False, True] if NATIVE else [False], ids=lambda n: "hw" if n else "sw")
def test_encoders_match_torch_casts_bit_for_bit(fp8: torch.dtype, native: bool) -> None:
    fmax = FP8_FORMATS[fp8].fmax
    x = _probe_values(fmax).to(DEVICE)
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    bf16 = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    e2m1 = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    _encode_kernel[(triton.cdiv(n, 1024),)](x, codes, bf16, e2m1, n, FNUZ=fp8 == torch.float8_e4m3fnuz,
                                            NATIVE=native, BLOCK=1024)  # fmt: skip
    x, codes, bf16, e2m1 = x.cpu(), codes.cpu(), bf16.cpu(), e2m1.cpu()
    expected = x.to(fp8).view(torch.uint8)
    nan = torch.isnan(x)
    # torch's e4m3fn NaN keeps the input's sign bit; any NaN code is a NaN.
    assert bool(torch.isnan(codes[nan].view(fp8).float()).all())
    bad = (codes != expected) & ~nan
    assert not bad.any(), (
        f"fp8 codes differ for {x[bad][:8].tolist()}: {codes[bad][:8].tolist()} vs {expected[bad][:8].tolist()}"
    )
    table = torch.tensor([FP8_FORMATS[fp8].encode(v) for v in x.tolist()], dtype=torch.uint8)
    assert torch.equal(codes[~nan], table[~nan])
    exp_bf16 = x.to(torch.bfloat16)
    assert torch.equal(bf16[~nan].view(torch.int16), exp_bf16[~nan].view(torch.int16))
    assert bool(torch.isnan(bf16[nan].float()).all())
    exp_e2m1 = torch.tensor([0 if math.isnan(v) else e2m1_encode(v) for v in x.tolist()], dtype=torch.uint8)
    assert torch.equal(e2m1, exp_e2m1)


@triton.jit
def _e2m1_scaled_kernel(Y_PTR, A_PTR, OUT_PTR, SCALE_PTR, n, FMA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e, inv = tq.e8m0(tl.load(A_PTR + offs, mask=mask, other=1.0))
    tl.store(OUT_PTR + offs, tq.e2m1_codes(tl.load(Y_PTR + offs, mask=mask, other=0.0), e, inv, FMA).to(tl.uint8),
             mask=mask)  # fmt: skip
    tl.store(SCALE_PTR + offs, e.to(tl.uint8), mask=mask)


@pytest.mark.parametrize("fma", [False, True], ids=["plain", "fused"])
def test_e2m1_codes_of_scaled_values_match_the_reference(fma: bool) -> None:
    """Rules 11-12 for y in a group of amax a: the fused encoder (compiled kernels) and the plain one.

    y spans every E2M1 midpoint of every scale, their fp32 neighbours, signed zeros, subnormals,
    NaN and infinity; amax spans normal, subnormal, huge (FLT_MAX), infinite and NaN groups (|y| <= amax as
    in the kernels; the inf / NaN groups, whose codes are all 0, hold finite values of both signs too).
    """
    from qknorm.reference import e2m1_codes, e8m0_from_amax, e8m0_to_float

    gen = torch.Generator().manual_seed(11)
    amax = torch.cat((torch.exp(torch.empty(300).uniform_(-80, 80, generator=gen)),
                      torch.tensor([1e-10, 2.0**-126, 6.0 * 2.0**-127, 6.0, 3e38, math.inf, math.nan]),
                      # FLT_MAX, the GPU's canonical NaN and a NaN with its sign bit set
                      torch.tensor([0x7F7FFFFF, 0x7FFFFFFF, -0x400000], dtype=torch.int32).view(torch.float32)))  # fmt: skip
    unit = e8m0_to_float(e8m0_from_amax(amax))  # 2^(e-127) of each group (NaN where e = 255: use 1 there)
    unit = torch.where(torch.isnan(unit), 1.0, unit)
    mids = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    v = torch.cat(
        (mids, torch.nextafter(mids, torch.full_like(mids, 7.0)), torch.nextafter(mids, torch.zeros_like(mids)))
    )
    y = (v[None, :] * unit[:, None]).float()
    y = torch.cat((y, -y, torch.rand(len(amax), 40, generator=gen) * amax[:, None] * 2 - amax[:, None]), dim=1)
    y = torch.where(torch.isfinite(amax)[:, None], torch.minimum(y, amax[:, None]).maximum(-amax[:, None]), y)
    y[-2:, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    a = amax[:, None].expand_as(y).contiguous()
    y, a = y.reshape(-1).contiguous(), a.reshape(-1)
    codes = torch.empty(y.numel(), dtype=torch.uint8, device=DEVICE)
    scales = torch.empty_like(codes)
    _e2m1_scaled_kernel[(triton.cdiv(y.numel(), 1024),)](y.to(DEVICE), a.to(DEVICE), codes, scales, y.numel(), FMA=fma,
                                                          BLOCK=1024)  # fmt: skip
    e = e8m0_from_amax(a)
    assert torch.equal(scales.cpu().to(torch.int32), e)
    expected = e2m1_codes(y / e8m0_to_float(e)).to(torch.uint8)
    bad = codes.cpu() != expected
    assert not bad.any(), f"{int(bad.sum())} codes differ, e.g. y={y[bad][:6].tolist()} amax={a[bad][:6].tolist()}"


@triton.jit
def _fp8_codes_kernel(Y_PTR, S_PTR, OUT_PTR, n, FP8_ENC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(Y_PTR + offs, mask=mask, other=0.0)
    s = tl.load(S_PTR + offs, mask=mask, other=1.0)
    tl.store(OUT_PTR + offs, tq.fp8_codes(y, s, FP8_ENC), mask=mask)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("native", [False, True] if NATIVE else [False], ids=lambda n: "hw" if n else "sw")
def test_fp8_codes_are_the_cast_of_y_times_the_rounded_reciprocal(fp8: torch.dtype, native: bool) -> None:
    """Rule 7 as the kernels compute it: torch's cast of ``y * (1 / scale)`` (fp32 reciprocal and
    product, each correctly rounded), for y within a group's ``+-amax`` and scale ``amax / FMAX``;
    an infinite scale gives zeros of y's sign."""
    fmax = FP8_FORMATS[fp8].fmax
    gen = torch.Generator().manual_seed(3)
    amax = torch.exp(torch.empty(20_000).uniform_(-20, 12, generator=gen)).float()
    scale = amax * torch.tensor(1.0 / fmax, dtype=torch.float32)
    y = ((torch.rand(20_000, generator=gen) * 2 - 1) * amax).float()
    y[:50] = amax[:50] * torch.where(torch.arange(50) % 2 == 0, 1.0, -1.0)  # the group maxima: +-FMAX
    y[50:60], scale[50:60] = torch.tensor([0.0, -0.0, 1.0, -1.0, 3e30, -3e30, 0.0, -0.0, 2.0, -2.0]), math.inf
    if native and fp8 == torch.float8_e4m3fnuz:
        pytest.skip("e4m3fnuz has no hardware encoder here")
    enc = tq.FP8_HW_FN if native else tq.FP8_SOFT_FNUZ if fp8 == torch.float8_e4m3fnuz else tq.FP8_SOFT_FN
    codes = torch.empty(y.numel(), dtype=torch.uint8, device=DEVICE)
    _fp8_codes_kernel[(triton.cdiv(y.numel(), 1024),)](y.to(DEVICE), scale.to(DEVICE), codes, y.numel(),
                                                       FP8_ENC=enc.value, BLOCK=1024)  # fmt: skip
    v = y * (1.0 / scale)
    expected = v.clamp(-fmax, fmax).to(fp8).view(torch.uint8)
    if fp8 == torch.float8_e4m3fnuz:  # torch keeps the sign of a zero; e4m3fnuz has no negative zero
        expected = torch.where(expected == 0x80, 0, expected)
    bad = codes.cpu() != expected
    assert not bad.any(), f"{int(bad.sum())} codes differ, e.g. y={y[bad][:4].tolist()} scale={scale[bad][:4].tolist()}"


@triton.jit
def _reciprocal_kernel(D_PTR, OUT_PTR, n, NEWTON: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(OUT_PTR + offs, tq.reciprocal(tl.load(D_PTR + offs, mask=mask, other=1.0), NEWTON), mask=mask)


@pytest.mark.parametrize("newton", [False, True], ids=["div_rn", "newton"])
def test_reciprocal_is_ieee_division_for_every_significand(newton: bool) -> None:
    """reciprocal() against IEEE 1 / d: on the GPU every significand in eight binades spanning the
    scales' range (2^-43 .. 2^125), which is every significand the approximate reciprocal and the
    iteration see (exponents only scale them); under the interpreter every 64th; and inf, NaN."""
    if newton and not NATIVE:
        pytest.skip("the iteration is NVIDIA's compiled path (the interpreter rounds fma's product)")
    step = 1 if DEVICE.type == "cuda" else 64
    mant = torch.arange(0, 1 << 23, step, dtype=torch.int64)
    mant = torch.cat((mant, torch.tensor([(1 << 23) - 1, (1 << 23) - 2, 1])))  # all ones (Markstein's exception)
    exps = torch.tensor([127 - 43, 127 - 20, 126, 127, 128, 127 + 30, 127 + 100, 127 + 125], dtype=torch.int64)
    bits = ((exps[:, None] << 23) | mant[None, :]).flatten().to(torch.int32)
    # specials: inf, torch's NaN and the NVIDIA arithmetic's canonical NaN (all-ones significand)
    nans = torch.tensor([0x7FC00000, 0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)
    d = torch.cat((bits.view(torch.float32), torch.tensor([math.inf]), nans)).to(DEVICE)
    out = torch.empty_like(d)
    _reciprocal_kernel[(triton.cdiv(d.numel(), 4096),)](d, out, d.numel(), NEWTON=newton, BLOCK=4096)
    expected = (1.0 / d.double()).float()  # exact quotient, one rounding
    assert out[-4].item() == 0.0 and bool(torch.isnan(out[-3:]).all())
    bad = out[:-4] != expected[:-4]
    assert not bool(bad.any()), f"{int(bad.sum())} reciprocals differ, e.g. d={d[:-4][bad][:4].tolist()}"


@triton.jit
def _quotient_kernel(Y_PTR, D_PTR, OUT_PTR, n, FMA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(Y_PTR + offs, mask=mask, other=1.0)
    d = tl.load(D_PTR + offs, mask=mask, other=1.0)
    tl.store(OUT_PTR + offs, tq.quotient(y, d, FMA), mask=mask)


def _quotients(y: torch.Tensor, d: torch.Tensor, fma: bool) -> torch.Tensor:
    y, d = y.to(DEVICE), d.to(DEVICE)
    out = torch.empty_like(y)
    _quotient_kernel[(triton.cdiv(y.numel(), 1024),)](y, d, out, y.numel(), FMA=fma, BLOCK=1024)
    return out.cpu()


def _assert_ieee_quotients(actual: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> None:
    expected = y / d  # torch's fp32 division is IEEE on the CPU
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    bad = actual[~nan].view(torch.int32) != expected[~nan].view(torch.int32)
    assert not bad.any(), (
        f"{int(bad.sum())} quotients differ, e.g. {y[~nan][bad][:4].tolist()} / {d[~nan][bad][:4].tolist()}"
    )


@pytest.mark.parametrize("fma", [False, True], ids=["div_rn", "fma"])
def test_quotient_of_exact_and_special_values_keeps_signs(fma: bool) -> None:
    """Exact quotients (signed zeros included), infinite and NaN divisors: the bits of y / d.

    The kernels divide y by the scale of a group that y belongs to, so |y / d| <= FMAX (1 + 2^-22)
    or d is infinite or NaN (amax = inf or NaN): pairs outside that domain (inf / 1) are not asked.
    """
    ys = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 448.0, -448.0, 2.0**-120, -(2.0**-120), math.inf, math.nan])
    ds = torch.tensor([1.0, 2.0, 0.5, 0.25, 2.0**-40, math.inf, math.nan])
    y, d = ys.repeat_interleave(len(ds)), ds.repeat(len(ys))
    domain = ~torch.isfinite(d) | torch.isnan(y) | (y.abs() <= 464 * d)
    y, d = y[domain], d[domain]
    assert len(y) > 40
    _assert_ieee_quotients(_quotients(y, d, fma), y, d)


@pytest.mark.gpu
def test_gpu_quotient_is_correctly_rounded() -> None:
    """The fused-correction quotient equals IEEE division bit for bit on random FP8-scale operands."""
    gen = torch.Generator().manual_seed(7)
    d = torch.exp(torch.empty(200_000).uniform_(-25, 5, generator=gen)).float()
    y = (torch.rand(200_000, generator=gen) * 2 - 1) * d * 448.0
    _assert_ieee_quotients(_quotients(y, d, True), y, d)


# ----------------------------------------------------------------------------- whole calls

_G = QuantType.per_1x128.value
_CPU_CASES = [
    Case(m=3, n1=64, n2=32),
    Case(dtype="bfloat16", m=5, n1=97, n2=33, latent=True, in_pad=5, out_pad=3, out_offset=1),
    Case(m=4, n1=1, n2=1),
    Case(m=2, n1=3, residual=True, gemma=True),
    Case(dtype="bfloat16", m=3, n1=130, n2=7, residual=True, q_eps=1e-3, k_eps=0.5),
    Case(entry="legacy", m=3, n1=40, n2=24, in_pad=2),
    Case(entry="functional", m=4, n1=48, n2=16, residual=True, gemma=True),
    Case(entry="group", mode="none", m=2, n1=64, n2=64, out_pad=5),
    Case(entry="unified", mode="none", m=2, n1=64, unquantized=True),
    *[Case(entry="group", mode="fp8_group", group_size=g, m=2, n1=64, n2=16, seed=g) for g in (1, 2, 4, 8, 16, 32, 64)],
    Case(
        entry="unified",
        mode="fp8_group",
        quant_type=_G,
        dtype="bfloat16",
        m=3,
        n1=256,
        n2=64,
        latent=True,
        transpose="contiguous",
        out_pad=2,
    ),
    Case(
        entry="unified",
        mode="fp8_group",
        quant_type=QuantType.per_1x32.value,
        m=5,
        n1=96,
        transpose="view",
        fp8="float8_e4m3fnuz",
        residual=True,
        unquantized=True,
        out_offset=3,
    ),
    Case(entry="group", mode="fp8_group", group_size=32, m=3, n1=64, fp8="float8_e4m3fnuz", gemma=True, in_pad=1),
    Case(entry="token", mode="fp8_token", m=3, n1=100, n2=20, out_pad=4),
    Case(entry="token", mode="fp8_token", m=2, n1=7, fp8="float8_e4m3fnuz", residual=True),
    Case(entry="unified", mode="fp8_tensor", m=5, n1=64, n2=8, scale_2d=True, unquantized=True),
    Case(entry="functional", mode="fp8_tensor", dtype="bfloat16", m=3, n1=33, fp8="float8_e4m3fnuz"),
    Case(entry="group", mode="mxfp4", group_size=32, m=3, n1=128, n2=16, out_pad=1),
    Case(entry="unified", mode="mxfp4", quant_type=_G, group_size=64, dtype="bfloat16", m=2, n1=128, fp4_dtypes=True),
    Case(entry="functional", mode="mxfp4", group_size=128, m=2, n1=256, residual=True, gemma=True),
    Case(entry="functional", mode="fp8_group", group_size=16, m=1, n1=32, n2=32, latent=True),
    *[
        Case(entry="group", mode="fp8_group", group_size=32, m=4, n1=64, n2=16, data=d, seed=3)
        for d in ("zeros", "huge", "near_overflow", "tiny", "inf", "nan")
    ],
    *[
        Case(entry="group", mode="mxfp4", group_size=32, dtype="bfloat16", m=4, n1=64, data=d, seed=5)
        for d in ("zeros", "huge", "nan")
    ],
    Case(entry="token", mode="fp8_token", m=3, n1=48, data="inf", seed=2),
    Case(entry="unified", mode="fp8_tensor", m=3, n1=48, data="nan", seed=2),
    # One row: per-tensor FP8 in one launch (the per-token one), 1-D and 2-D scales, NaN rows.
    Case(entry="unified", mode="fp8_tensor", m=1, n1=64, n2=8, scale_2d=True, unquantized=True),
    Case(entry="functional", mode="fp8_tensor", dtype="bfloat16", m=1, n1=33, n2=5, fp8="float8_e4m3fnuz"),
    Case(entry="unified", mode="fp8_tensor", m=1, n1=48, data="nan", seed=3),
    # Up to 16 rows: per-tensor FP8 in one launch, every q row in one program; 17: two launches.
    Case(entry="unified", mode="fp8_tensor", m=16, n1=64, n2=8, out_pad=2),
    Case(entry="unified", mode="fp8_tensor", m=9, n1=48, n2=8, data="inf", seed=4),
    Case(entry="functional", mode="fp8_tensor", dtype="bfloat16", m=17, n1=48, n2=8, fp8="float8_e4m3fnuz"),
]
# The chunked path with 16-column chunks: spans wider than a chunk (group 32/64, per token,
# per tensor), groups narrower than a chunk, MXFP4, k chunked too, widths not a chunk multiple.
_CHUNKED_CASES = [
    Case(m=3, n1=100, n2=40, latent=True, out_pad=3),
    Case(dtype="bfloat16", m=2, n1=37, n2=5, residual=True, gemma=True),
    *[Case(entry="group", mode="fp8_group", group_size=g, m=2, n1=64, n2=24, seed=g) for g in (4, 16, 32, 64)],
    Case(
        entry="group",
        mode="fp8_group",
        group_size=32,
        m=3,
        n1=96,
        transpose="view",
        fp8="float8_e4m3fnuz",
        residual=True,
        unquantized=True,
    ),
    Case(entry="token", mode="fp8_token", m=3, n1=50, n2=20, out_pad=2),
    Case(entry="unified", mode="fp8_tensor", m=4, n1=40, residual=True),
    Case(entry="unified", mode="fp8_tensor", m=1, n1=40, n2=20, residual=True),
    Case(entry="group", mode="mxfp4", group_size=32, m=2, n1=96, n2=18),
    Case(entry="group", mode="fp8_group", group_size=32, m=3, n1=64, data="nan", seed=4),
]


@pytest.mark.parametrize("chunked", [False], indirect=True)
@pytest.mark.parametrize("case", _CPU_CASES, ids=repr)
def test_matches_reference(case: Case, chunked: bool) -> None:
    run_case(case, backend="triton")


@pytest.mark.parametrize("chunked", [True], indirect=True)
@pytest.mark.parametrize("case", _CHUNKED_CASES, ids=repr)
def test_chunked_rows_match_reference(case: Case, chunked: bool) -> None:
    run_case(case, backend="triton")


# ----------------------------------------------------------------------------- the backend directly


def _aliased_request(form: str, m: int, n1: int, n2: int, mode: QuantMode, seed: int = 0):
    """A request in one supported in-place form, plus an identical request on fresh tensors."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dt).to(DEVICE)

    q, res, k = rnd(m, n1), rnd(m, n1), rnd(m, n2)
    qw, kw = rnd(n1), rnd(n2)
    with_res = form in ("res_out=q", "res_out=res")
    quant = scale = None
    if mode is QuantMode.FP8_GROUP:
        quant = torch.empty(m, n1, dtype=torch.float8_e4m3fn, device=DEVICE)
        scale = torch.empty(m, n1 // 16, dtype=torch.float32, device=DEVICE)

    def build(q: torch.Tensor, res: torch.Tensor, k: torch.Tensor, inplace: bool):
        k_out = k if inplace and form == "k_out=k" else torch.empty_like(k)
        q_out = q if inplace and form == "q_out=q" else torch.empty_like(q)
        res_out = None
        if with_res:
            res_out = (q if form == "res_out=q" else res) if inplace else torch.empty_like(q)
        return build_request(
            q=q, q_weight=qw, q_epsilon=1e-6, k=k, k_weight=kw, k_out=k_out,
            q_residual=res if with_res else None, q_res_out=res_out, mode=mode,
            group_size=16 if quant is not None else None, q_out=q_out,
            q_out_quantized=None if quant is None else torch.empty_like(quant),
            q_out_scale=None if scale is None else torch.empty_like(scale),
        )  # fmt: skip

    expected = build(q.clone(), res.clone(), k.clone(), inplace=False)
    actual = build(q, res, k, inplace=True)
    return actual, expected


@pytest.mark.parametrize("cfg", [tb._Config(1, 1, 1, k_with_q=True, reload=True, unmasked=True),
                                 tb._Config(2, 8, 4, reload=True)], ids=repr)  # fmt: skip
@pytest.mark.parametrize("form", ["k_out=k", "q_out=q", "res_out=q", "res_out=res"])
def test_in_place_forms_with_x_held_as_loaded(form: str, cfg: tb._Config) -> None:
    """RELOAD widens each held q tile (and residual tile) again after earlier tiles of its row were
    written: in every in-place form the outputs are bit for bit those of the same configuration
    on fresh tensors."""
    mode = QuantMode.FP8_GROUP if form.startswith("res_out") else QuantMode.NONE
    actual, expected = _aliased_request(form, 5, 768, 700, mode, seed=3)
    be = TritonBackend()
    plan = be._plan(expected, expected.key())
    be._launch(expected, plan, cfg)
    be._launch(actual, be._plan(actual, actual.key()), cfg)
    compared = 0
    for name in ("q_out", "k_out", "q_res_out", "q_quant", "q_scale"):
        a, e = getattr(actual, name), getattr(expected, name)
        if e is not None:
            assert torch.equal(a.view(torch.uint8), e.view(torch.uint8)), name
            compared += 1
    assert compared >= 2


@pytest.mark.parametrize("chunked", [False, True], indirect=True, ids=["single", "chunked"])
@pytest.mark.parametrize("form", ["k_out=k", "q_out=q", "res_out=q", "res_out=res"])
def test_in_place_forms(form: str, chunked: bool) -> None:
    """Every supported alias: each row is read completely before its last pass writes it."""
    mode = QuantMode.FP8_GROUP if form.startswith("res_out") else QuantMode.NONE
    actual, expected = _aliased_request(form, 5, 96, 48, mode)
    qk_rmsnorm_reference(expected)
    TritonBackend().run(actual)
    assert_norm_close(actual.k_out, expected.k_out, "k_out")
    assert_norm_close(actual.q_out, expected.q_out, "q_out")
    if actual.q_res_out is not None:
        assert torch.equal(actual.q_res_out.view(torch.int16), expected.q_res_out.view(torch.int16))  # type: ignore[union-attr]
    if actual.q_quant is not None:
        assert_fp8_close(actual.q_quant, expected.q_quant)  # type: ignore[arg-type]
        assert_scales_close(actual.q_scale, expected.q_scale)  # type: ignore[arg-type]


# Every kind of launch configuration the heuristics choose (decode, prefill quantizing with k in
# the q program, prefill norm with several rows per program, one padded tile) on small shapes:
# n1 = 768 is three tiles (3 x 256 columns, 3 x 16 groups of 16, 3 x 8 MXFP4 groups of 32),
# n2 = 700 three masked tiles of 256, and m = 5 leaves row blocks partly past M.
_CONFIGS = [
    tb._Config(1, 1, 4),
    tb._Config(1, 1, 4, one_tile=True),
    tb._Config(1, 1, 1, k_with_q=True),
    tb._Config(2, 2, 2, k_with_q=True),
    tb._Config(2, 8, 4),
    tb._Config(1, 4, 1, w_first=True),
    tb._Config(1, 1, 1, k_with_q=True, w_first=True),
    tb._Config(1, 1, 1, k_with_q=True, w_first=True, reload=True),
    tb._Config(2, 8, 4, reload=True),
]


def _mode_request(mode: QuantMode, m: int, n1: int, n2: int):
    gen = torch.Generator().manual_seed(m + n1)
    dt = torch.bfloat16
    q, k = torch.randn(m, n1, generator=gen).to(DEVICE, dt), torch.randn(m, n2, generator=gen).to(DEVICE, dt)
    qw = (1 + 0.1 * torch.randn(n1, generator=gen)).to(DEVICE, dt)
    kw = (1 + 0.1 * torch.randn(n2, generator=gen)).to(DEVICE, dt)
    quant = scale = q_out = None
    gs = {QuantMode.FP8_GROUP: 16, QuantMode.MXFP4: 32}.get(mode)
    if mode is QuantMode.NONE:
        q_out = torch.empty_like(q)
    elif mode is QuantMode.MXFP4:
        quant = torch.empty(m, n1 // 2, dtype=torch.uint8, device=DEVICE)
        scale = torch.empty(m, n1 // 32, dtype=torch.uint8, device=DEVICE)
    else:
        quant = torch.empty(m, n1, dtype=torch.float8_e4m3fn, device=DEVICE)
        cols = n1 // 16 if mode is QuantMode.FP8_GROUP else 1
        scale = torch.empty(1 if mode is QuantMode.FP8_TENSOR else m, cols, dtype=torch.float32, device=DEVICE)

    def build(q: torch.Tensor, k: torch.Tensor):
        return build_request(
            q=q, q_weight=qw, q_epsilon=1e-6, k=k, k_weight=kw, k_out=torch.empty_like(k), mode=mode, group_size=gs,
            q_out=None if q_out is None else torch.empty_like(q_out),
            q_out_quantized=None if quant is None else torch.empty_like(quant),
            q_out_scale=None if scale is None else torch.empty_like(scale),
        )  # fmt: skip

    return build(q, k), build(q.clone(), k.clone())


@pytest.mark.parametrize("cfg", _CONFIGS, ids=repr)
@pytest.mark.parametrize("mode", [QuantMode.NONE, QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.FP8_TENSOR,
                                  QuantMode.MXFP4], ids=lambda m: m.value)  # fmt: skip
def test_every_launch_configuration_matches_reference(mode: QuantMode, cfg: tb._Config) -> None:
    actual, expected = _mode_request(mode, 5, 768, 700)
    be = TritonBackend()
    be._launch(actual, be._plan(actual, actual.key()), cfg)
    qk_rmsnorm_reference(expected)
    assert_norm_close(actual.k_out, expected.k_out, "k_out")  # type: ignore[arg-type]
    if mode is QuantMode.NONE:
        assert_norm_close(actual.q_out, expected.q_out, "q_out")  # type: ignore[arg-type]
    elif mode is QuantMode.MXFP4:
        assert_mxfp4_close(actual.q_quant, actual.q_scale, expected.q_quant, expected.q_scale)  # type: ignore[arg-type]
    else:
        assert_fp8_close(actual.q_quant, expected.q_quant)  # type: ignore[arg-type]
        assert_scales_close(actual.q_scale, expected.q_scale)  # type: ignore[arg-type]


def _same_bits_with(mode: QuantMode, m: int, n2: int, cfg: tb._Config, **knob: bool):
    """Launch ``cfg`` and ``cfg`` with ``knob`` on two copies of one request (q 768 wide) and assert
    that every output is bit for bit the same; returns the knob's request, the plan and how many
    outputs were compared."""
    plain, other = _mode_request(mode, m, 768, n2)
    be = TritonBackend()
    plan = be._plan(plain, plain.key())
    be._launch(plain, plan, cfg)
    be._launch(other, plan, replace(cfg, **knob))
    compared = 0
    for name in ("q_out", "k_out", "q_quant", "q_scale"):
        a, b = getattr(plain, name), getattr(other, name)
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
            compared += 1
    return other, plan, compared


def _k_out_is_the_reference(actual, mode: QuantMode, m: int, n2: int) -> None:
    expected = _mode_request(mode, m, 768, n2)[1]
    qk_rmsnorm_reference(expected)
    assert_norm_close(actual.k_out, expected.k_out, "k_out")


@pytest.mark.parametrize("knob", ["w_first", "reload"])
@pytest.mark.parametrize("cfg", [tb._Config(1, 4, 1), tb._Config(1, 1, 4, one_tile=True), tb._Config(2, 2, 2, k_with_q=True)],
                         ids=repr)  # fmt: skip
@pytest.mark.parametrize("mode", [QuantMode.NONE, QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.FP8_TENSOR,
                                  QuantMode.MXFP4], ids=lambda m: m.value)  # fmt: skip
def test_load_order_knobs_change_no_output_bit(mode: QuantMode, cfg: tb._Config, knob: str) -> None:
    """W_FIRST only moves the weight loads ahead of x's, behind a barrier; RELOAD holds x and the
    weights as loaded and widens them again after the reduction: every output is bit for bit what the same
    configuration gives without them (on a GPU: two compiled programs)."""
    _, _, compared = _same_bits_with(mode, 5, 700, cfg, **{knob: True})
    assert compared == 2 if mode is QuantMode.NONE else 3


@pytest.mark.parametrize("cfg", [tb._Config(1, 4, 1), tb._Config(1, 1, 1, k_with_q=True),
                                 tb._Config(1, 1, 1, k_with_q=True, w_first=True, reload=True), tb._Config(2, 2, 2)],
                         ids=repr)  # fmt: skip
@pytest.mark.parametrize("mode", [QuantMode.NONE, QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.FP8_TENSOR,
                                  QuantMode.MXFP4], ids=lambda m: m.value)  # fmt: skip
def test_unmasked_tiles_change_no_output_bit(mode: QuantMode, cfg: tb._Config) -> None:
    """UNMASKED loads and stores the blocks of one row whose tiles cover it exactly (q 768 = 3 x
    256 columns, k 512) without masks, and leaves the others masked (two rows per block): every
    output is bit for bit the masked program's, and k_out is the reference's."""
    unmasked, plan, compared = _same_bits_with(mode, 5, 512, cfg, unmasked=True)
    ng, nt, gs = plan.tiles[False]
    assert ng * nt * gs == 768 and plan.constexprs["K_NG"] * plan.constexprs["K_NT"] * plan.constexprs["K_GS"] == 512
    assert compared == (2 if mode is QuantMode.NONE else 3)
    _k_out_is_the_reference(unmasked, mode, 5, 512)


def _mxfp4_words_request(m: int, q: torch.Tensor, with_y: bool, gemma: bool, in_place: bool = False, gs: int = 32):
    """An MXFP4 request on ``q`` (k 512 wide), with the unquantized y too when ``with_y`` (into q
    itself when ``in_place``)."""
    gen = torch.Generator().manual_seed(m)
    k = torch.randn(m, 512, generator=gen).to(DEVICE, torch.bfloat16)
    n1 = q.shape[1]
    return build_request(
        q=q, q_weight=(1 + 0.1 * torch.randn(n1, generator=gen)).to(DEVICE, torch.bfloat16), q_epsilon=1e-6,
        k=k, k_weight=torch.ones(512, dtype=torch.bfloat16, device=DEVICE), k_out=torch.empty_like(k),
        mode=QuantMode.MXFP4, group_size=gs, gemma_norm=gemma,
        q_out=(q if in_place else torch.empty_like(q)) if with_y else None,
        q_out_quantized=torch.empty(m, n1 // 2, dtype=torch.uint8, device=DEVICE),
        q_out_scale=torch.empty(m, n1 // gs, dtype=torch.uint8, device=DEVICE),
    )  # fmt: skip


_WORDS_CONFIGS = [tb._Config(1, 1, 1, k_with_q=True, unmasked=True), tb._Config(1, 4, 1, w_first=True, unmasked=True)]


@pytest.mark.parametrize("gs", [32, 64, 128], ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("gemma", [False, True], ids=["w", "gemma"])
@pytest.mark.parametrize("with_y", [False, True], ids=["codes", "codes+y"])
@pytest.mark.parametrize("cfg", _WORDS_CONFIGS, ids=repr)
def test_words_change_no_output_bit(cfg: tb._Config, with_y: bool, gemma: bool, gs: int) -> None:
    """WORDS reads bf16 MXFP4 rows (q 768 = 3 x 256 columns) as 32-bit words and reduces their
    sum of squares over the same tiles: every output of these rows is bit for bit the same
    configuration's without it (compiled, the reduction order may differ in the last bit of r
    for a few rows in thousands; not these), and the codes and scales are the reference's."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(5, 768, generator=gen).to(DEVICE, torch.bfloat16)
    plain, words, expected = (_mxfp4_words_request(5, q, with_y, gemma, gs=gs) for _ in range(3))
    be = TritonBackend()
    plan = be._plan(plain, plain.key())
    be._launch(plain, plan, cfg)
    be._launch(words, plan, replace(cfg, words=True))
    assert replace(cfg, words=True) in plan.launches  # the words program ran
    for name in ("q_out", "q_quant", "q_scale", "k_out"):
        a, b = getattr(plain, name), getattr(words, name)
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    qk_rmsnorm_reference(expected)
    assert_mxfp4_close(words.q_quant, words.q_scale, expected.q_quant, expected.q_scale)  # type: ignore[arg-type]


def test_words_only_where_measured() -> None:
    """The launcher reads rows as words for bf16 MXFP4 in groups of 32 without a residual, with
    tiles covering the row, in compiled NVIDIA code (where rows go without masks); not for other
    group sizes, fp16, a residual or padded tiles."""
    be = TritonBackend()
    be.available()
    compiled = not be._interpret and torch.version.hip is None
    gen = torch.Generator().manual_seed(14)

    def words(n1: int = 1536, gs: int = 32, dt: torch.dtype = torch.bfloat16, residual: bool = False) -> bool:
        q = torch.randn(2, n1, generator=gen).to(DEVICE, dt)
        req = build_request(
            q=q, q_weight=torch.ones(n1, dtype=dt, device=DEVICE), q_epsilon=1e-6, mode=QuantMode.MXFP4,
            group_size=gs, q_residual=torch.zeros_like(q) if residual else None,
            q_res_out=torch.empty_like(q) if residual else None,
            q_out_quantized=torch.empty(2, n1 // 2, dtype=torch.uint8, device=DEVICE),
            q_out_scale=torch.empty(2, n1 // gs, dtype=torch.uint8, device=DEVICE),
        )  # fmt: skip
        plan = be._plan(req, req.key())
        return plan.words and tb._config(plan, tb._bucket(16384)).words

    assert words() == compiled
    assert not words(gs=64) and not words(dt=torch.float16) and not words(residual=True)
    assert not words(n1=1472)  # 46 groups of 32: tiles padded past the row


@pytest.mark.parametrize("cfg", _WORDS_CONFIGS, ids=repr)
def test_words_in_place(cfg: tb._Config) -> None:
    """q_out=q with WORDS: a row's words are all loaded before any of its tiles is written, so
    the outputs are bit for bit those on fresh tensors."""
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(5, 768, generator=gen).to(DEVICE, torch.bfloat16)
    actual = _mxfp4_words_request(5, q, True, False, in_place=True)
    expected = _mxfp4_words_request(5, q.clone(), True, False)
    cfg = replace(cfg, words=True)
    be = TritonBackend()
    be._launch(expected, be._plan(expected, expected.key()), cfg)
    plan = be._plan(actual, actual.key())
    be._launch(actual, plan, cfg)
    assert cfg in plan.launches and actual.q_out is actual.q
    for name in ("q_out", "q_quant", "q_scale", "k_out"):
        assert torch.equal(getattr(actual, name).view(torch.uint8), getattr(expected, name).view(torch.uint8)), name


@pytest.mark.parametrize("view", ["offset", "odd_stride"])
def test_words_need_aligned_rows(view: str) -> None:
    """Rows read as 32-bit words must start 4-byte aligned: a q view one element in (an odd
    address) or with an odd row stride is launched without WORDS, and gives the same bits."""
    gen = torch.Generator().manual_seed(12)
    if view == "offset":
        q = torch.randn(5, 770, generator=gen).to(DEVICE, torch.bfloat16)[:, 1:769]
        assert q.data_ptr() % 4 == 2
    else:
        q = torch.randn(5, 769, generator=gen).to(DEVICE, torch.bfloat16)[:, :768]
        assert q.stride(0) % 2 == 1
    cfg = replace(_WORDS_CONFIGS[0], words=True)
    plain, words = _mxfp4_words_request(5, q, False, False), _mxfp4_words_request(5, q, False, False)
    be = TritonBackend()
    plan = be._plan(words, words.key())
    be._launch(words, plan, cfg)
    assert cfg not in plan.launches and tb._without_words(cfg) in plan.launches
    be._launch(plain, plan, tb._without_words(cfg))
    for name in ("q_quant", "q_scale", "k_out"):
        assert torch.equal(getattr(plain, name), getattr(words, name)), name


@pytest.mark.parametrize("cfg", [tb._Config(1, 1, 1, k_with_q=True), tb._Config(2, 2, 2, k_with_q=True, w_first=True)],
                         ids=repr)  # fmt: skip
@pytest.mark.parametrize("mode", [QuantMode.NONE, QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.FP8_TENSOR,
                                  QuantMode.MXFP4], ids=lambda m: m.value)  # fmt: skip
def test_k_loads_first_change_no_output_bit(mode: QuantMode, cfg: tb._Config) -> None:
    """K_EARLY requests the k row's loads before the q row's work and normalizes it after, for a k
    row of one tile: every output is bit for bit the same configuration's without it, and k_out
    is the reference's."""
    early, plan, _ = _same_bits_with(mode, 5, 500, cfg, k_early=True)
    assert plan.constexprs["K_NT"] == 1 and not plan.k_chunked  # the layout K_EARLY serves
    _k_out_is_the_reference(early, mode, 5, 500)


def test_k_loads_first_in_place() -> None:
    """k_out=k with K_EARLY: the k row is read whole before the program writes anything of it."""
    actual, expected = _aliased_request("k_out=k", 5, 768, 512, QuantMode.NONE, seed=4)
    cfg = tb._Config(1, 1, 1, k_with_q=True, k_early=True)
    be = TritonBackend()
    be._launch(expected, be._plan(expected, expected.key()), cfg)
    be._launch(actual, be._plan(actual, actual.key()), cfg)
    for name in ("k_out", "q_out"):
        assert torch.equal(getattr(actual, name).view(torch.uint8), getattr(expected, name).view(torch.uint8)), name


@pytest.mark.parametrize("cfg", [tb._Config(1, 4, 1), tb._Config(1, 4, 1, w_first=True), tb._Config(2, 2, 2)],
                         ids=repr)  # fmt: skip
@pytest.mark.parametrize("mode", [QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.MXFP4], ids=lambda m: m.value)
def test_q_rows_split_over_programs_change_no_output_bit(mode: QuantMode, cfg: tb._Config) -> None:
    """Q_SPLIT: each of a q row block's three tiles is written by a program of its own, every one of
    them reducing the whole rows: every output is bit for bit the unsplit launch's (one row, M = 5,
    is three programs; the last block of two rows is half past M), and q's the reference's."""
    split, plan, compared = _same_bits_with(mode, 5, 500, cfg, q_split=True)
    assert compared == 3 and plan.tiles[False][1] == 3 and not plan.q_chunked  # the layout Q_SPLIT serves
    expected = _mode_request(mode, 5, 768, 500)[1]
    qk_rmsnorm_reference(expected)
    if mode is QuantMode.MXFP4:
        assert_mxfp4_close(split.q_quant, split.q_scale, expected.q_quant, expected.q_scale)  # type: ignore[arg-type]
    else:
        assert_fp8_close(split.q_quant, expected.q_quant)  # type: ignore[arg-type]
        assert_scales_close(split.q_scale, expected.q_scale)  # type: ignore[arg-type]


@pytest.mark.parametrize(("mode", "cfg"), [
    (mode, cfg) for mode in QuantMode
    for cfg in (tb._Config(1, 1, 4, one_tile=True), tb._Config(1, 4, 1, q_split=True),
                tb._Config(1, 1, 1, k_with_q=True, k_early=True))
    if not (cfg.q_split and mode is QuantMode.FP8_TENSOR)  # per-tensor FP8 is never split
], ids=lambda v: v.value if isinstance(v, QuantMode) else repr(v))  # fmt: skip
def test_one_row_counts_at_compile_time_change_no_output_bit(mode: QuantMode, cfg: tb._Config) -> None:
    """ONE_ROW (M = 1) makes the row and q program counts compile-time values instead of
    parameters: every output is bit for bit the same launch's without it, and k_out is the
    reference's (per-tensor FP8 here as its two launches; three programs with Q_SPLIT)."""
    one, _, compared = _same_bits_with(mode, 1, 500, cfg, one_row=True)
    assert compared == (2 if mode is QuantMode.NONE else 3)
    _k_out_is_the_reference(one, mode, 1, 500)


def test_one_row_only_in_the_bucket_of_one_row() -> None:
    """ONE_ROW launches process row 0 alone, so only the bucket of M = 1 may set it: for the plain
    norm and MXFP4 in compiled NVIDIA code, where it measured faster."""
    be = TritonBackend()
    be.available()
    compiled = not be._interpret and torch.version.hip is None
    for mode in QuantMode:
        req, _ = _mode_request(mode, 2, 1536, 512)
        plan = be._plan(req, req.key())
        first = compiled and mode in (QuantMode.NONE, QuantMode.MXFP4)
        assert [tb._config(plan, tb._bucket(m)).one_row for m in (1, 2, 16, 17, 65536)] == [first] + [False] * 4, mode


@pytest.mark.parametrize("most", [None, 1], ids=lambda b: f"most{b}")
@pytest.mark.parametrize("cfg", [tb._Config(1, 1, 1, k_with_q=True), tb._Config(2, 2, 2, k_with_q=True, w_first=True)],
                         ids=repr)  # fmt: skip
@pytest.mark.parametrize("mode", [QuantMode.NONE, QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.FP8_TENSOR,
                                  QuantMode.MXFP4], ids=lambda m: m.value)  # fmt: skip
def test_k_tail_changes_no_output_bit(mode: QuantMode, cfg: tb._Config, most: int | None,
                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """k_tail: the k rows of the last row blocks, a tenth (M = 23: two of 23 one-row blocks, or one
    of 12 two-row blocks, half past M) or at most ``_K_TAIL_BLOCKS`` (here one), go to programs
    launched after the q programs, which leave them: every output is bit for bit the
    configuration's without it, and k_out is the reference's."""
    if most is not None:
        monkeypatch.setattr(tb, "_K_TAIL_BLOCKS", most)
    tail, _, _ = _same_bits_with(mode, 23, 500, cfg, k_tail=True)
    _k_out_is_the_reference(tail, mode, 23, 500)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("mode", [QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN], ids=lambda m: m.value)
@pytest.mark.parametrize("m", [2, 20000] if ON_GPU else [2], ids=lambda m: f"m{m}")
def test_a_nan_amax_beside_finite_values_gives_nan_codes(mode: QuantMode, fp8: torch.dtype, m: int) -> None:
    """A scale that is NaN while most of its group is finite: y / NaN is NaN for every element.

    Row 0 has an infinite q element (r = 0: y is 0 except NaN there); the weight has a NaN column
    (one NaN y per row). The scale is then a NaN made by the device's arithmetic, with its payload
    (PTX documents 0x7FFFFFFF, an all-ones significand), not torch's; the codes of its group (row,
    per token) must all be NaN, as the reference's, and every other group match it."""
    gen = torch.Generator().manual_seed(11)
    n1 = 64
    q = torch.randn(m, n1, generator=gen)
    q[0, 3] = math.inf
    qw = 1 + 0.1 * torch.randn(n1, generator=gen)
    qw[40] = math.nan
    q, qw = q.to(torch.bfloat16).to(DEVICE), qw.to(torch.bfloat16).to(DEVICE)
    gs = 16 if mode is QuantMode.FP8_GROUP else None
    cols = n1 // 16 if mode is QuantMode.FP8_GROUP else 1

    def build():
        return build_request(
            q=q, q_weight=qw, q_epsilon=1e-6, mode=mode, group_size=gs,
            q_out_quantized=torch.empty(m, n1, dtype=fp8, device=DEVICE),
            q_out_scale=torch.empty(m, cols, dtype=torch.float32, device=DEVICE),
        )  # fmt: skip

    actual, expected = build(), build()
    TritonBackend().run(actual)
    qk_rmsnorm_reference(expected)
    assert bool(torch.isnan(expected.q_scale[0, 0]))  # the case is what it says
    assert_fp8_close(actual.q_quant, expected.q_quant)  # type: ignore[arg-type]
    assert_scales_close(actual.q_scale, expected.q_scale)  # type: ignore[arg-type]


def test_deepseek_launch_configurations_are_the_measured_ones() -> None:
    """The shape-only rule gives DeepSeek's shapes the configurations timed fastest on the H200
    (docs/benchmarks.md): decode with k in programs of its own and the tiles of every bucket; one
    warp per quantizing q row with k apart up to 8192 rows (FP8: from one row up); then one warp
    per q row, with its k row except for hardware-encoded FP8 groups; the weights requested
    before x where that was faster."""
    be = TritonBackend()
    be.available()

    def config(mode: QuantMode, m: int) -> tb._Config:
        req, _ = _mode_request(mode, 2, 1536, 512)
        return tb._config(be._plan(req, req.key()), tb._bucket(m))

    # w_first (weights requested before x): FP8 groups through the hardware conversion up to
    # 16384 rows, the plain norm up to 16, the other quantizing modes from 257 to 16384 rows except
    # per-tensor FP8 (never on ROCm); in compiled NVIDIA code those one-warp programs are then
    # capped at 96 registers (80 with their k row)
    hw_fp8 = not be._interpret and not torch.version.hip and torch.cuda.get_device_capability() >= (8, 9)
    rocm = torch.version.hip is not None
    compiled = not be._interpret and not rocm
    for m in (1, 256):
        norm_first = m <= 16 and not rocm
        # one tile in every bucket; one row in compiled NVIDIA code: the counts at compile time (ONE_ROW)
        one_row = m == 1 and compiled
        assert config(QuantMode.NONE, m) == tb._Config(1, 1, 4, one_tile=True, w_first=norm_first, one_row=one_row)
        # four warps; k rows in blocks of 8; up to 16 rows a program per q tile (not on ROCm)
        assert config(QuantMode.MXFP4, m) == tb._Config(1, 8, 4, q_split=m <= 16 and not rocm, one_row=one_row)
    assert config(QuantMode.MXFP4, 2048) == tb._Config(1, 8, 4, w_first=not rocm)  # four warps: no cap
    # FP8: one warp per q row in every bucket (batch invariance of the fp32 scales), k rows apart
    # below 16384 rows, a q row's worth per program
    for mode in (QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.FP8_TENSOR):
        for m in (2, 256, 2048, 8192):
            if mode is QuantMode.FP8_TENSOR and m <= 16:
                continue
            hw = mode is QuantMode.FP8_GROUP and hw_fp8
            first = not rocm and (hw or (m > 256 and mode is not QuantMode.FP8_TENSOR))
            cap = 96 if first and compiled and not hw else None
            # up to 16 rows a program per q tile, but for per-token FP8 through the hardware conversion
            split = m <= 16 and not rocm and not (mode is QuantMode.FP8_TOKEN and hw_fp8)
            assert config(mode, m) == tb._Config(1, 4, 1, w_first=first, maxnreg=cap, q_split=split), (mode, m)
    assert config(QuantMode.FP8_TENSOR, 1) == tb._Config(1, 4, 1, one_pass=True)  # one row: one launch
    # up to 16 rows: one launch, all of q in one program (16 warps, one per row)
    assert config(QuantMode.FP8_TENSOR, 2) == config(QuantMode.FP8_TENSOR, 16) == tb._Config(16, 4, 16, one_program=True)
    # DeepSeek MXFP4: 88 registers, and in compiled NVIDIA code one-row tiles without masks, read
    # as 32-bit words (bf16 rows)
    mid_mxfp4 = tb._Config(1, 4, 1, w_first=not rocm, maxnreg=88 if compiled else None, unmasked=compiled,
                           words=compiled)  # fmt: skip
    assert config(QuantMode.MXFP4, 4096) == config(QuantMode.MXFP4, 8192) == mid_mxfp4
    # FP8 groups go through the hardware e4m3fn conversion in compiled code on NVIDIA sm_89+ (the
    # interpreter and ROCm use the integer encoder, as e4m3fnuz does everywhere); per-token FP8
    # requests its k row's loads first there, uncapped; above 8192 rows compiled NVIDIA code holds
    # MXFP4's x as loaded, uncapped and unmasked
    for mode in (QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.MXFP4, QuantMode.FP8_TENSOR):
        apart = mode is QuantMode.FP8_GROUP and hw_fp8
        big = tb._Config(1, 4, 1) if apart else tb._Config(1, 1, 1, k_with_q=True)
        if mode is QuantMode.FP8_TOKEN:
            big = replace(big, k_early=compiled)
        elif mode is QuantMode.MXFP4:
            # the k rows of the last row blocks in programs launched last, rows read as words
            # capped at 64 registers (compiled NVIDIA code)
            big = replace(big, reload=compiled, unmasked=compiled, k_tail=compiled, words=compiled,
                          maxnreg=64 if compiled else None)  # fmt: skip
        assert config(mode, 65536) == big
        if apart:
            assert config(mode, 16384) == replace(big, w_first=True)
        elif mode is QuantMode.FP8_TENSOR:
            assert config(mode, 16384) == big
        elif mode is QuantMode.FP8_TOKEN:
            assert config(mode, 16384) == replace(big, w_first=not rocm)
        else:
            # in the interpreter and on ROCm MXFP4's one-warp programs are not capped either
            assert config(mode, 16384) == replace(big, w_first=not rocm), mode
        # MXFP4's x held as loaded: the weights first up to 32768 rows
        assert config(mode, 32768) == replace(big, w_first=compiled and mode is QuantMode.MXFP4), mode
    assert config(QuantMode.NONE, 4096) == config(QuantMode.NONE, 65536) == tb._Config(2, 8, 4, one_tile=True)
    # e4m3fnuz groups (the integer encoder everywhere): compiled NVIDIA code holds x as loaded
    # across the reduction above 8192 rows, uncapped and unmasked, with the weights first up to 16384
    for gs in (128, 64, 32):
        req, _ = _mode_request(QuantMode.FP8_GROUP, 2, 1536, 512)
        fnuz = build_request(
            q=req.q, q_weight=req.q_weight, q_epsilon=1e-6, k=req.k, k_weight=req.k_weight, k_out=req.k_out,
            mode=QuantMode.FP8_GROUP, group_size=gs, q_out_quantized=torch.empty(2, 1536, dtype=torch.float8_e4m3fnuz,
            device=DEVICE), q_out_scale=torch.empty(2, 1536 // gs, dtype=torch.float32, device=DEVICE),
        )  # fmt: skip
        plan = be._plan(fnuz, fnuz.key())
        # their integer encoder splits q rows over a program per tile up to 256 rows (not on ROCm)
        assert [tb._config(plan, tb._bucket(m)).q_split for m in (1, 256, 257)] == [not rocm, not rocm, False]
        big = tb._Config(1, 1, 1, k_with_q=True, reload=compiled, unmasked=compiled, k_tail=compiled)
        assert tb._config(plan, tb._bucket(65536)) == big
        assert tb._config(plan, tb._bucket(32768)) == replace(big, w_first=compiled)
        assert tb._config(plan, tb._bucket(16384)) == replace(big, w_first=not rocm and (gs == 128 or compiled))
        # weights first at 257-8192 rows for groups of 128 only, then capped at 96 registers
        mid = tb._config(plan, tb._bucket(4096))
        assert mid == (tb._Config(1, 4, 1, w_first=not rocm, maxnreg=96 if compiled else None) if gs == 128
                       else tb._Config(1, 4, 1)), gs  # fmt: skip


def test_per_tensor_amax_launch_loops_with_larger_blocks_only_past_its_program_cap() -> None:
    """(rows per block, warps, programs): one block of 8192 elements per program while q fits in
    256 of them (DeepSeek q up to M = 1024), then 256 programs over blocks of 16384 elements."""
    assert tb._amax_launch(1, 1536, False) == (1, 8, 1)
    assert tb._amax_launch(256, 1536, False) == (4, 8, 64)
    assert tb._amax_launch(1024, 1536, False) == (4, 8, 256)
    assert tb._amax_launch(65536, 1536, False) == (8, 16, 256)
    assert tb._amax_launch(300, 16384, True) == (1, 16, 256)  # chunked rows: one per block
    assert tb._amax_launch(200, 16384, True) == (1, 8, 200)


def test_tiles_cover_rows_with_the_least_padding() -> None:
    assert tb._tiles(1536, None) == (1, 3, 512)  # DeepSeek q: three tiles of 512
    assert tb._tiles(1536, 128) == (4, 3, 128)
    assert tb._tiles(1536, 32) == (16, 3, 32)
    assert tb._tiles(512, None) == (1, 1, 512)
    assert tb._tiles(1000, None) == (1, 1, 1024)  # three tiles of 512 would pad more
    assert tb._tiles(700, None) == (1, 3, 256)
    assert tb._tiles(96, None) == (1, 1, 128)  # three tiles of 32 would be narrower than _MIN_SPLIT_TILE
    assert tb._tiles(7, None) == (1, 1, 8)
    assert tb._one_tile(1536, 128) == (16, 1, 128)


class _NoLaunch:
    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"M = 0 touched the kernels ({name})")


def test_m_zero_launches_nothing() -> None:
    q = torch.empty(0, 64, dtype=torch.float16, device=DEVICE)
    out = torch.empty(0, 64, dtype=torch.float16, device=DEVICE)
    req = build_request(q=q, q_weight=torch.ones(64, dtype=torch.float16, device=DEVICE), q_epsilon=1e-6, q_out=out)
    be = TritonBackend()
    be._kernels = _NoLaunch()
    be.run(req)
    assert not be._plans


def test_warmup_sizes_cover_every_bucket_once() -> None:
    be = TritonBackend()
    for max_m in (1, 2, 16, 17, 300, 5000, 70000):
        sizes = be.warmup_sizes(max_m)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] <= max_m
        buckets = [tb._bucket(s) for s in sizes]
        assert len(set(buckets)) == len(buckets)
        assert set(buckets) == {tb._bucket(1), tb._bucket(max_m)} | {
            tb._bucket(hi) for hi in tb._BUCKETS if hi <= max_m
        }
    assert be.warmup_sizes(0) == []


def test_capability_answers() -> None:
    be = TritonBackend()
    ok, why = be.available()
    assert ok, why
    req = build_request(q=torch.ones(2, 8, dtype=torch.float16, device=DEVICE),
                        q_weight=torch.ones(8, dtype=torch.float16, device=DEVICE), q_epsilon=1e-6,
                        q_out=torch.empty(2, 8, dtype=torch.float16, device=DEVICE))  # fmt: skip
    assert be.supports(req) is None
    be._interpret = False
    cpu_req = build_request(q=torch.ones(2, 8, dtype=torch.float16), q_weight=torch.ones(8, dtype=torch.float16),
                            q_epsilon=1e-6, q_out=torch.empty(2, 8, dtype=torch.float16))  # fmt: skip
    assert "TRITON_INTERPRET" in str(be.supports(cpu_req))


# ----------------------------------------------------------------------------- GPU suite

_DS: dict[str, object] = dict(n1=1536, n2=512, latent=True, dtype="bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        *[Case(m=t, **_DS, seed=t) for t in (1, 7, 256, 4096, 65536)],
        *[Case(entry="unified", mode="fp8_group", quant_type=_G, m=t, **_DS, seed=t) for t in (1, 33, 4096, 65536)],
        Case(entry="unified", mode="fp8_group", quant_type=_G, m=300, transpose="contiguous", **_DS),
        Case(
            entry="group",
            mode="fp8_group",
            group_size=128,
            m=1000,
            transpose="view",
            unquantized=True,
            residual=True,
            **_DS,
        ),
        Case(entry="token", mode="fp8_token", m=513, **_DS),
        Case(entry="unified", mode="fp8_tensor", m=5000, **_DS),
        Case(entry="group", mode="mxfp4", group_size=32, m=2049, **_DS),
        Case(entry="group", mode="fp8_group", group_size=128, m=64, fp8="float8_e4m3fnuz", gemma=True, **_DS),
        Case(m=17, n1=1536, n2=512, dtype="float16", out_pad=8, in_pad=3, residual=True),
    ],
    ids=repr,
)
def test_gpu_deepseek_shapes(case: Case) -> None:
    run_case(case, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        Case(m=64, n1=128, n2=64, dtype="bfloat16"),
        Case(m=33, n1=1000, n2=999, dtype="float16", in_pad=1, out_pad=1),
        Case(m=300, n1=4096, n2=8192, dtype="bfloat16", residual=True),
        Case(m=9, n1=12288, n2=16383, dtype="bfloat16", gemma=True),
        Case(m=40, n1=16384, n2=16384, dtype="bfloat16", latent=True),
        Case(entry="group", mode="fp8_group", group_size=128, m=100, n1=16384, n2=4096, dtype="bfloat16"),
        Case(entry="group", mode="fp8_group", group_size=8192, m=20, n1=16384, dtype="bfloat16", residual=True),
        Case(entry="group", mode="fp8_group", group_size=16384, m=20, n1=16384, dtype="float16", transpose="view"),
        Case(entry="token", mode="fp8_token", m=50, n1=16382, dtype="bfloat16"),
        Case(entry="token", mode="fp8_token", m=50, n1=7168, fp8="float8_e4m3fnuz", dtype="bfloat16"),
        Case(entry="unified", mode="fp8_tensor", m=70, n1=16384, dtype="bfloat16", unquantized=True),
        Case(entry="group", mode="mxfp4", group_size=32, m=30, n1=16384, dtype="bfloat16"),
        Case(entry="group", mode="mxfp4", group_size=128, m=30, n1=7168, dtype="float16", residual=True),
        Case(m=3, n1=65536, n2=65536, dtype="bfloat16"),
        Case(entry="group", mode="fp8_group", group_size=128, m=3, n1=65536, dtype="bfloat16", data="huge"),
        Case(entry="group", mode="fp8_group", group_size=64, m=300, n1=2048, dtype="bfloat16", data="nan"),
    ],
    ids=repr,
)
def test_gpu_widths_and_modes(case: Case) -> None:
    run_case(case, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["k_out=k", "q_out=q", "res_out=q", "res_out=res"])
@pytest.mark.parametrize(("m", "n1", "n2"), [(4096, 1536, 512), (64, 16384, 12288)])
def test_gpu_in_place_forms(form: str, m: int, n1: int, n2: int) -> None:
    mode = QuantMode.FP8_GROUP if form.startswith("res_out") else QuantMode.NONE
    actual, expected = _aliased_request(form, m, n1, n2, mode)
    qk_rmsnorm_reference(expected)
    TritonBackend().run(actual)
    assert_norm_close(actual.k_out, expected.k_out, "k_out")
    assert_norm_close(actual.q_out, expected.q_out, "q_out")
    if actual.q_res_out is not None:
        assert torch.equal(actual.q_res_out.view(torch.int16), expected.q_res_out.view(torch.int16))  # type: ignore[union-attr]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [QuantMode.NONE, QuantMode.FP8_GROUP])
def test_gpu_repeated_calls_reuse_the_bound_launch(mode: QuantMode) -> None:
    """Later calls of one signature take the direct launch; a misaligned view falls back, and is right too."""
    be = TritonBackend()
    dev = torch.device("cuda")
    latent = torch.empty(64, 2112 + 8, dtype=torch.bfloat16, device=dev)
    for offset in (0, 0, 0, 1, 1, 0):  # offset 1: q and k start 2 bytes off a 16-byte boundary
        latent.normal_()
        q, k = latent[:, offset : offset + 1536], latent[:, offset + 1536 : offset + 2048]
        qw = torch.randn(1536, dtype=torch.bfloat16, device=dev)
        kw = torch.randn(512, dtype=torch.bfloat16, device=dev)
        reqs = []
        for _ in range(2):
            quant = torch.empty(64, 1536, dtype=torch.float8_e4m3fn, device=dev) if mode.is_fp8 else None
            scale = torch.empty(64, 12, dtype=torch.float32, device=dev) if mode.is_fp8 else None
            reqs.append(
                build_request(
                    q=q,
                    q_weight=qw,
                    q_epsilon=1e-6,
                    k=k,
                    k_weight=kw,
                    k_out=torch.empty(64, 512, dtype=q.dtype, device=dev),
                    mode=mode,
                    group_size=128 if mode.is_fp8 else None,
                    q_out=None if mode.is_fp8 else torch.empty(64, 1536, dtype=q.dtype, device=dev),
                    q_out_quantized=quant,
                    q_out_scale=scale,
                )
            )
        actual, expected = reqs
        be.run(actual)
        qk_rmsnorm_reference(expected)
        assert_norm_close(actual.k_out, expected.k_out, "k_out")  # type: ignore[arg-type]
        if mode.is_fp8:
            assert_fp8_close(actual.q_quant, expected.q_quant)  # type: ignore[arg-type]
            assert_scales_close(actual.q_scale, expected.q_scale)  # type: ignore[arg-type]
        else:
            assert_norm_close(actual.q_out, expected.q_out, "q_out")  # type: ignore[arg-type]
    (plan,) = be._plans.values()
    bound = [f for launch in plan.launches.values() for f in launch.fast.values() if f]
    assert len(bound) == 1  # the aligned signature was bound once; the misaligned one never


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_reads_new_data() -> None:
    """Captured after a warm-up call, replays compute from whatever the input buffers hold then."""
    be = TritonBackend()
    dev = torch.device("cuda")
    latent = torch.randn(16, 2112, dtype=torch.bfloat16, device=dev)
    q, k = latent[:, :1536], latent[:, 1536:2048]
    qw = torch.randn(1536, dtype=torch.bfloat16, device=dev)
    kw = torch.randn(512, dtype=torch.bfloat16, device=dev)
    q_out, k_out = torch.empty(16, 1536, dtype=q.dtype, device=dev), torch.empty(16, 512, dtype=q.dtype, device=dev)
    req = build_request(q=q, q_weight=qw, q_epsilon=1e-6, k=k, k_weight=kw, k_out=k_out, q_out=q_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        be.run(req)
        be.run(req)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        be.run(req)
    latent.normal_()
    graph.replay()
    torch.cuda.synchronize()
    expected = build_request(q=q.clone(), q_weight=qw, q_epsilon=1e-6, k=k.clone(), k_weight=kw,
                             k_out=torch.empty_like(k_out), q_out=torch.empty_like(q_out))  # fmt: skip
    qk_rmsnorm_reference(expected)
    assert_norm_close(q_out, expected.q_out, "q_out")  # type: ignore[arg-type]
    assert_norm_close(k_out, expected.k_out, "k_out")  # type: ignore[arg-type]


def test_a_disabled_direct_launch_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Triton version the direct launch was not written for falls back to Triton's launcher, with one WARNING."""
    from qknorm.backends import triton_launch

    monkeypatch.setattr(triton_launch, "_warned", set())
    with caplog.at_level("WARNING", logger=triton_launch.__name__):
        assert triton_launch.direct_launch_supported("3.6.0", hip=False)
        assert not caplog.records
        assert not triton_launch.direct_launch_supported("3.7.1", hip=False)
        assert not triton_launch.direct_launch_supported("3.7.1", hip=False)
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "3.7.1" in record.getMessage() and "2x" in record.getMessage()


def test_launch_arguments_are_the_kernel_parameters() -> None:
    """The launcher names every runtime parameter of the kernel, and absent tensors go in as None."""
    import types

    be = TritonBackend()
    be.available()
    assert set(tb._TENSORS) | set(tb._ROW_STRIDES) | {"q_scale_stride_g", "AMAX_PTR", "amax_count", "M", "q_eps",
                                                     "k_eps", "q_programs"} == set(be._runtime_names)  # fmt: skip
    q = torch.randn(2, 8, dtype=torch.float16, device=DEVICE)
    req = build_request(q=q, q_weight=torch.ones(8, dtype=torch.float16, device=DEVICE), q_epsilon=1e-6,
                        q_out=torch.empty_like(q))  # fmt: skip
    seen: dict[str, object] = {}

    class _Recorder:
        def __getitem__(self, grid: tuple[int]) -> object:
            return lambda **kwargs: seen.update(kwargs, grid=grid)

    be._kernels = types.SimpleNamespace(**{**vars(be._kernels), "_qk_rmsnorm_kernel": _Recorder()})
    be.run(req)
    assert seen["grid"] == (2,) and seen["Q_PTR"] is q and seen["M"] == 2 and seen["q_stride"] == 8
    for absent in ("K_PTR", "K_W_PTR", "K_OUT_PTR", "Q_RES_PTR", "Q_QUANT_PTR", "k_stride", "AMAX_PTR"):
        assert absent in seen and seen[absent] is None, absent
    assert set(be._constexpr_names) <= set(seen)


def test_row_and_program_counts_are_never_specialized() -> None:
    """The direct launch path reuses a compiled kernel for every row count of a bucket: that is only
    valid while Triton compiles none of the per-call integers in (it would make a count of 1 a constant).
    Checked on the compiled (non-interpreted) kernel object, in a subprocess without TRITON_INTERPRET."""
    pytest.importorskip("triton")
    import ast
    import os
    import subprocess
    import sys

    code = (
        "from qknorm.backends import triton_kernels as tk; "
        "print(sorted(p.name for p in tk._qk_rmsnorm_kernel.params if p.do_not_specialize))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert {"M", "q_programs", "amax_count"} <= set(ast.literal_eval(out.stdout))


@pytest.mark.gpu
def test_gpu_calls_of_one_signature_launch_from_their_plan_with_their_own_pointers() -> None:
    """The public call's plan keeps its direct launch: later calls read only their pointers, so new
    outputs, new inputs and a misaligned view (which falls back to the regular path) are all right."""
    dev = torch.device("cuda")
    latent = torch.empty(8, 2112 + 8, dtype=torch.bfloat16, device=dev)
    qw = torch.randn(1536, dtype=torch.bfloat16, device=dev)
    kw = torch.randn(512, dtype=torch.bfloat16, device=dev)
    with backend_override("triton"):
        for offset in (0, 0, 0, 8, 1, 0):  # offset 1: 2 bytes off a 16-byte boundary
            latent.normal_()
            q, k = latent[:, offset : offset + 1536], latent[:, offset + 1536 : offset + 2048]
            q_out, k_out = torch.empty(8, 1536, dtype=q.dtype, device=dev), torch.empty(8, 512, dtype=q.dtype, device=dev)
            qknorm.fused_qk_rmsnorm(q_out, None, q, qw, 1e-6, k_out=k_out, k=k, k_weight=kw)
            expected = build_request(q=q, q_weight=qw, k=k, k_weight=kw, k_out=torch.empty_like(k_out),
                                     q_out=torch.empty_like(q_out))  # fmt: skip
            qk_rmsnorm_reference(expected)
            assert_norm_close(q_out, expected.q_out, f"q_out (offset {offset})")  # type: ignore[arg-type]
            assert_norm_close(k_out, expected.k_out, f"k_out (offset {offset})")  # type: ignore[arg-type]
        backend = registry.get_backend("triton")
        assert len(backend._planned) == 1  # type: ignore[attr-defined]  # one signature, one kept launch
