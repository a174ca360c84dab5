"""SPEC §4 against expectations derived by hand, not from the implementation.

Hand-computed cases use one trick: with q = +-1 (or rows like [2, 0, 0, 0] whose mean square
is exactly 1) and epsilon 1e-10 (1 + 1e-10 == 1 in fp32), r = rsqrt(1) = 1 exactly, so the
fp32 normalized value is y = q * w exactly and any fp16/bf16 weight puts a chosen value into
the quantizer. Expected bytes then follow from the format definitions (written out here, and
re-derived by the independent encoders of ``tests/_cases.py``). Every case runs on every
backend available on this machine (the reference ``torch`` backend everywhere).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from _cases import (
    DEVICE,
    E2M1_GRID,
    FLOAT_DTYPES,
    FP8_DTYPES,
    FP8_FORMATS,
    Case,
    all_backends,
    assert_same_nan_or_bits,
    bits_equal,
    e2m1_decode,
    e2m1_encode,
    e8m0_byte,
    fl32,
    fp8_scale,
    fuzz_settings,
    require_backend,
    rmsnorm64,
    run_case,
    skip_unsupported,
    unpack_nibbles,
    using_backend,
)
from hypothesis import given, note
from hypothesis import strategies as st

import qknorm
from qknorm import QuantType
from qknorm.reference import e8m0_from_amax
from qknorm.testing import assert_fp8_close, assert_mxfp4_close, assert_norm_close, assert_scales_close

EPS = 1e-10  # 1 + EPS == 1 in fp32: r = rsqrt(1) = 1 exactly


@pytest.fixture(params=all_backends())
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each available backend in turn; a request it does not support skips the test."""
    require_backend(request.param)
    with using_backend(request.param):
        yield request.param


def _t(values: list[float] | list[list[float]], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(dtype).to(DEVICE)


def _exact(values: list[float], dtype: torch.dtype) -> list[float]:
    """The values, checked to be representable in ``dtype`` (so y is exactly what the test says)."""
    back = torch.tensor(values, dtype=torch.float64).to(dtype).double().tolist()
    assert back == [float(v) for v in values], f"not representable in {dtype}: {values}"
    return values


def _quantize(
    q: torch.Tensor, w: torch.Tensor, quant_type: QuantType, *, fp8: torch.dtype | None = None,
    group_size: int | None = None, eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Unified entry with fresh outputs: (codes, scales, normalized q in q's dtype)."""
    m, n = q.shape
    unq = torch.empty_like(q)
    if fp8 is None:  # MXFP4
        gs = group_size or (32 if quant_type == QuantType.per_1x32 else 128)
        codes = torch.empty(m, n // 2, dtype=torch.uint8, device=DEVICE)
        scales = torch.empty(m, n // gs, dtype=torch.uint8, device=DEVICE)
    else:
        codes = torch.empty(m, n, dtype=fp8, device=DEVICE)
        if quant_type == QuantType.per_Token:
            scales = torch.empty(m, 1, dtype=torch.float32, device=DEVICE)
        elif quant_type == QuantType.per_Tensor:
            scales = torch.empty(1, dtype=torch.float32, device=DEVICE)
        else:
            gs = group_size or (32 if quant_type == QuantType.per_1x32 else 128)
            scales = torch.empty(m, n // gs, dtype=torch.float32, device=DEVICE)
    qknorm.fused_qk_rmsnorm(
        q_out_quantized=codes, q_out_scale=scales, q=q, q_weight=w, q_epsilon=eps, q_out_unquantized=unq,
        quant_type=quant_type, group_size=group_size,
    )  # fmt: skip
    return codes.cpu(), scales.cpu(), unq.cpu()


def _bytes(t: torch.Tensor) -> list[int]:
    return t.cpu().contiguous().view(torch.uint8).reshape(-1).tolist()


# ----------------------------------------------------------------------------- E8M0 (rule 11)

# amax -> t = fl32(amax * fl32(1/6)) -> E8M0 byte, worked by hand:
#   6.0:      t = fl32(6 * 0.16666667163) = fl32(1.00000003) = 1.0 -> exponent 127, mantissa 0 -> 127
#   6.000001: t = 1.0000002 (mantissa != 0)                         -> 127 + 1 = 128
#   0.0:      floor 1e-10: t = 1.6667e-11 in [2^-36, 2^-35)          -> 91 + 1 = 92
#   3.0:      t = 0.5                                                -> 126
#   7.0:      t = 1.1666667                                          -> 128
#   1.5:      t = 0.25                                               -> 125
#   12.0:     t = 2.0                                                -> 128;  12.01 -> 129
E8M0_CASES = [(6.0, 127), (6.000001, 128), (0.0, 92), (3.0, 126), (7.0, 128), (1.5, 125), (12.0, 128), (12.01, 129)]


@pytest.mark.parametrize(("amax", "byte"), E8M0_CASES)
def test_e8m0_byte_of_known_amax(amax: float, byte: int) -> None:
    assert e8m0_byte(amax) == byte  # the independent encoder used by the property tests
    got = e8m0_from_amax(torch.tensor([max(amax, 1e-10)], dtype=torch.float32))
    assert got.tolist() == [byte]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("which", ["6", "6+ulp", "3", "7", "0"])
@skip_unsupported
def test_mxfp4_scale_byte_end_to_end(backend: str, dtype: torch.dtype, which: str) -> None:
    ulp6 = 4.0 * 2.0 ** (-10 if dtype == torch.float16 else -7)  # one ulp at 6 in fp16 / bf16
    amax, byte = {"6": (6.0, 127), "6+ulp": (6.0 + ulp6, 128), "3": (3.0, 126), "7": (7.0, 128), "0": (0.0, 92)}[which]
    w = _t(_exact([amax] + [amax / 4] * 31, dtype), dtype)
    q = _t([[1.0] * 32, [-1.0] * 32], dtype)
    _, scales, _ = _quantize(q, w, QuantType.per_1x32)
    assert scales.tolist() == [[byte], [byte]]


# ----------------------------------------------------------------------------- FP8 codes (rules 6-7)

# With amax = FMAX the scale is fl32(FMAX * fl32(1/FMAX)) = 1.0 exactly, so each code is the FP8
# encoding of the weight itself. e4m3fn: bias 7, 0x7E = 1.75 * 2^8 = 448, subnormal step 2^-9.
E4M3FN_CODES = [
    (448.0, 0x7E),  # FMAX
    (-448.0, 0xFE),
    (1.0, 0x38),  # exponent field 7
    (1.0625, 0x38),  # tie between 1.0 (0x38) and 1.125 (0x39): even code
    (1.1875, 0x3A),  # tie between 1.125 (0x39) and 1.25 (0x3A): even code
    (-1.0625, 0xB8),
    (-1.1875, 0xBA),
    (400.0, 0x7C),  # tie between 384 (0x7C) and 416 (0x7D)
    (432.0, 0x7E),  # tie between 416 (0x7D) and 448 (0x7E)
    (416.0, 0x7D),
    (240.0, 0x77),  # 1.875 * 2^7
    (2.0**-9, 0x01),  # smallest subnormal
    (2.0**-10, 0x00),  # half the smallest subnormal: tie to 0
    (3 * 2.0**-10, 0x02),  # 1.5 subnormal steps: tie between codes 1 and 2
    (-(2.0**-12), 0x80),  # rounds to -0, which e4m3fn has
    (0.0, 0x00),
]
# e4m3fnuz: bias 8, 0x7F = 1.875 * 2^7 = 240, subnormal step 2^-10, 0x80 is NaN (no -0).
E4M3FNUZ_CODES = [
    (240.0, 0x7F),
    (-240.0, 0xFF),
    (1.0, 0x40),
    (1.0625, 0x40),
    (1.1875, 0x42),
    (-1.0625, 0xC0),
    (-1.1875, 0xC2),
    (232.0, 0x7E),  # tie between 224 (0x7E) and 240 (0x7F)
    (200.0, 0x7C),  # tie between 192 (0x7C) and 208 (0x7D)
    (120.0, 0x77),
    (2.0**-10, 0x01),
    (2.0**-11, 0x00),  # tie to 0
    (3 * 2.0**-11, 0x02),
    (-(2.0**-12), 0x00),  # rounds to zero: +0, never the NaN code 0x80
    (-0.0, 0x00),
    (0.0, 0x00),
]
FP8_TABLES = {torch.float8_e4m3fn: E4M3FN_CODES, torch.float8_e4m3fnuz: E4M3FNUZ_CODES}


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
def test_largest_element_lands_on_fmax_for_every_fp16_and_bf16_amax(fp8: torch.dtype) -> None:
    """Rule 7's clamp: v = amax / fl32(amax * fl32(1/FMAX)) for every positive finite fp16 and
    normal bf16 amax above the floor stays within half a step of FMAX, so the clamp (and RNE)
    give exactly +-FMAX; the clamp keeps the rare v > FMAX from rounding past it (NaN in e4m3fnuz
    beyond 248)."""
    fmax = FP8_FORMATS[fp8].fmax
    bits = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16)
    fp16 = bits.view(torch.float16).float()
    bf16 = torch.arange(0x0080, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    amax = torch.cat((fp16, bf16))
    amax = amax[amax > 1e-10]
    scale = amax * torch.tensor(fl32(1.0 / fmax))
    v = amax / scale
    assert float((v - fmax).abs().max()) <= fmax * 2.0**-22
    codes = torch.clamp(v, -fmax, fmax).to(fp8).view(torch.uint8)
    assert set(codes.tolist()) == {FP8_FORMATS[fp8].encode(fmax)}


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
def test_fp8_table_matches_format_definition(fp8: torch.dtype) -> None:
    fmt = FP8_FORMATS[fp8]
    for value, code in FP8_TABLES[fp8]:
        assert fmt.encode(value) == code, (value, hex(code))
        if abs(value) in fmt.values:  # exactly representable: the code decodes back to it
            assert fmt.decode(code) == value


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("quant_type", [QuantType.per_Token, QuantType.per_1x32, QuantType.per_Tensor])
@skip_unsupported
def test_fp8_codes_at_ties_and_saturation(backend: str, dtype: torch.dtype, fp8: torch.dtype, quant_type: QuantType) -> None:
    table = FP8_TABLES[fp8]
    values = _exact([v for v, _ in table] * 2, dtype)  # 32 columns: one group of 32
    w = _t(values, dtype)
    q = torch.ones(2, 32, dtype=dtype, device=DEVICE)
    codes, scales, _ = _quantize(q, w, quant_type, fp8=fp8)
    assert scales.reshape(-1).tolist() == [1.0] * scales.numel()
    expected = [c for _, c in table] * 2
    assert _bytes(codes[0]) == expected
    assert _bytes(codes[1]) == expected


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
@skip_unsupported
def test_fp8_negative_rows_mirror_codes(backend: str, fp8: torch.dtype) -> None:
    """q = -1 flips y's sign: e4m3fn sets bit 7 on every code; e4m3fnuz on every nonzero code."""
    table = FP8_TABLES[fp8]
    w = _t(_exact([v for v, _ in table], torch.float16), torch.float16)
    q = -torch.ones(1, len(table), dtype=torch.float16, device=DEVICE)
    codes, _, _ = _quantize(q, w, QuantType.per_Token, fp8=fp8)
    fmt = FP8_FORMATS[fp8]
    assert _bytes(codes) == [fmt.encode(-v) for v, _ in table]


# ----------------------------------------------------------------------------- E2M1 (rule 12)

# amax 6 -> scale byte 127 -> scale 1: each nibble encodes the weight itself. Grid codes 0..7 =
# 0, 0.5, 1, 1.5, 2, 3, 4, 6; every midpoint goes to the even code; bit 3 is the sign.
E2M1_CASES = [
    (6.0, 0x7), (0.25, 0x0), (0.75, 0x2), (1.25, 0x2), (1.75, 0x4), (2.5, 0x4), (3.5, 0x6), (5.0, 0x6),
    (-0.25, 0x8), (-0.75, 0xA), (-1.25, 0xA), (-1.75, 0xC), (-2.5, 0xC), (-3.5, 0xE), (-5.0, 0xE), (0.0, 0x0),
    (0.5, 0x1), (1.0, 0x2), (1.5, 0x3), (2.0, 0x4), (3.0, 0x5), (4.0, 0x6), (-0.5, 0x9), (-1.0, 0xA),
    (-1.5, 0xB), (-2.0, 0xC), (-3.0, 0xD), (-4.0, 0xE), (-6.0, 0xF), (0.125, 0x0), (5.5, 0x7), (4.5, 0x6),
]  # fmt: skip


def test_e2m1_table_matches_format_definition() -> None:
    for value, nibble in E2M1_CASES:
        assert e2m1_encode(value) == nibble, value
    assert [e2m1_decode(c) for c in range(8)] == list(E2M1_GRID)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@skip_unsupported
def test_e2m1_every_tie_grid_value_and_sign(backend: str, dtype: torch.dtype) -> None:
    w = _t(_exact([v for v, _ in E2M1_CASES], dtype), dtype)
    q = torch.ones(1, 32, dtype=dtype, device=DEVICE)
    codes, scales, _ = _quantize(q, w, QuantType.per_1x32)
    assert scales.tolist() == [[127]]
    nibbles = [n for _, n in E2M1_CASES]
    assert _bytes(codes) == [nibbles[2 * b] | (nibbles[2 * b + 1] << 4) for b in range(16)]


@skip_unsupported
def test_e2m1_nibble_order_low_nibble_first(backend: str) -> None:
    """Byte b holds element 2b in its low nibble: [6, 1, 0, 3, ...] packs to 0x27, 0x50, ..."""
    w = _t([6.0, 1.0, 0.0, 3.0] + [0.0] * 28, torch.float16)
    codes, _, _ = _quantize(torch.ones(1, 32, dtype=torch.float16, device=DEVICE), w, QuantType.per_1x32)
    assert _bytes(codes)[:2] == [0x27, 0x50]
    assert unpack_nibbles(codes)[0, :4].tolist() == [0x7, 0x2, 0x0, 0x5]


# ----------------------------------------------------------------------------- scale layouts (rules 8-10)

# Rows with mean square exactly 1 (r = 1): y = x * w, so each row can pick its own amax.
SPIKY_ROWS = [[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [1.0, -1.0, 1.0, -1.0]]
SPIKY_W = [3.0, 5.0, 0.5, 7.0]  # y rows: [3,5,.5,7], [6,0,0,0], [0,10,0,0], [0,0,0,14], [3,-5,.5,-7]
SPIKY_AMAX = [7.0, 6.0, 10.0, 14.0, 7.0]


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
@skip_unsupported
def test_per_token_scale_is_one_per_row(backend: str, fp8: torch.dtype) -> None:
    q = _t(SPIKY_ROWS, torch.bfloat16)
    codes, scales, _ = _quantize(q, _t(SPIKY_W, torch.bfloat16), QuantType.per_Token, fp8=fp8)
    assert scales.shape == (5, 1)
    assert scales.reshape(-1).tolist() == [fp8_scale(a, fp8) for a in SPIKY_AMAX]
    fmt = FP8_FORMATS[fp8]
    for i, row in enumerate(SPIKY_ROWS):
        s = fp8_scale(SPIKY_AMAX[i], fp8)
        assert _bytes(codes[i]) == [fmt.encode(fl32(x * w / s)) for x, w in zip(row, SPIKY_W)]


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("shape", [(1,), (1, 1)])
@skip_unsupported
def test_per_tensor_scale_spans_all_rows(backend: str, fp8: torch.dtype, shape: tuple[int, ...]) -> None:
    q = _t(SPIKY_ROWS, torch.float16)
    w = _t(SPIKY_W, torch.float16)
    codes = torch.empty(5, 4, dtype=fp8, device=DEVICE)
    scale = torch.empty(shape, dtype=torch.float32, device=DEVICE)
    qknorm.fused_qk_rmsnorm(codes, scale, q, w, EPS, quant_type=QuantType.per_Tensor)
    s = fp8_scale(max(SPIKY_AMAX), fp8)  # amax over every row: 14
    assert scale.reshape(-1).tolist() == [s]
    fmt = FP8_FORMATS[fp8]
    expected = [[fmt.encode(fl32(x * w / s)) for x, w in zip(row, SPIKY_W)] for row in SPIKY_ROWS]
    assert codes.cpu().view(torch.uint8).tolist() == expected


def _layout_case(m: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """q [m, 32*groups] and w whose group (i, g) has amax A_g (x = 1) or 2*A_g (x = [2,0,0,0] spike)."""
    gs = 32
    amax_g = [1.5 * (g + 1) for g in range(groups)]
    w = torch.full((groups * gs,), 0.25, dtype=torch.float64)
    q = torch.ones(m, groups * gs, dtype=torch.float64)
    expected: list[list[float]] = []
    for g in range(groups):
        w[g * gs] = amax_g[g]
    for i in range(m):
        row = []
        for g in range(groups):
            spike = (i + g) % 2 == 1
            if spike:
                q[i, g * gs : g * gs + 4] = torch.tensor([2.0, 0.0, 0.0, 0.0])
            row.append(fp8_scale(amax_g[g] * (2.0 if spike else 1.0), torch.float8_e4m3fn))
        expected.append(row)
    return q.to(torch.float16).to(DEVICE), w.to(torch.float16).to(DEVICE), expected


@pytest.mark.parametrize("form", ["row-major", "contiguous", "view"])
@skip_unsupported
def test_transposed_scale_byte_offsets(backend: str, form: str) -> None:
    """Element (i, g) of the scales lies at g*m + i with transpose_scale, at i*G + g without."""
    m, groups = 3, 4
    q, w, expected = _layout_case(m, groups)
    codes = torch.empty(m, groups * 32, dtype=torch.float8_e4m3fn, device=DEVICE)
    if form == "view":
        storage = torch.full((groups, m), -1.0, device=DEVICE)
        scale = storage.t()  # [m, G] view with strides (1, m)
    else:
        storage = torch.full((m, groups), -1.0, device=DEVICE)
        scale = storage
    qknorm.fused_qk_rmsnorm(
        codes, scale, q, w, EPS, quant_type=QuantType.per_1x32, transpose_scale=form != "row-major"
    )
    flat = storage.cpu().reshape(-1).tolist()
    for i in range(m):
        for g in range(groups):
            offset = i * groups + g if form == "row-major" else g * m + i
            assert flat[offset] == expected[i][g], (form, i, g)


# ----------------------------------------------------------------------------- floor (rule 6, 11)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
@skip_unsupported
def test_all_zero_rows_give_floor_scale_and_zero_codes(backend: str, dtype: torch.dtype, fp8: torch.dtype) -> None:
    q = torch.zeros(3, 64, dtype=dtype, device=DEVICE)
    q[1] = 1.0  # a non-zero row between zero rows changes nothing for them
    w = _t([0.5] * 64, dtype)
    codes, scales, unq = _quantize(q, w, QuantType.per_1x32, fp8=fp8, eps=1e-6)
    floor = fl32(fl32(1e-10) * fl32(1.0 / FP8_FORMATS[fp8].fmax))
    assert floor == fp8_scale(0.0, fp8)
    assert scales[0].tolist() == [floor, floor] and scales[2].tolist() == [floor, floor]
    assert scales[1].tolist() != [floor, floor]
    assert _bytes(codes[0]) == [0] * 64 and _bytes(codes[2]) == [0] * 64
    assert unq[0].tolist() == [0.0] * 64


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@skip_unsupported
def test_all_zero_rows_mxfp4_floor_byte(backend: str, dtype: torch.dtype) -> None:
    q = torch.zeros(2, 64, dtype=dtype, device=DEVICE)
    codes, scales, _ = _quantize(q, _t([1.0] * 64, dtype), QuantType.per_1x32, eps=1e-6)
    assert scales.tolist() == [[92, 92], [92, 92]]  # ceil_pow2(1e-10 / 6) = 2^-35
    assert _bytes(codes) == [0] * 64


# ----------------------------------------------------------------------------- gemma, residual, eps (rules 1-4)

# Rows with mean square 1: three 1.5s and five 0.5s (3 * 2.25 + 5 * 0.25 = 8).
GEMMA_ROW = [1.5, 1.5, 1.5, 0.5, 0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@skip_unsupported
def test_gemma_adds_one_in_fp32(backend: str, dtype: torch.dtype) -> None:
    """w = 2^-11 (fp16) / 2^-8 (bf16): 1 + w rounds to 1 in the input dtype but not in fp32, so
    y_0 = 1.5 * (1 + w) lands 0.75 ulp above 1.5 and rounds up; adding a rounded 1 would give 1.5."""
    tiny = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    q = _t([GEMMA_ROW], dtype)
    w = _t([tiny] * 8, dtype)
    out = torch.empty_like(q)
    qknorm.fused_qk_rmsnorm(out, None, q, w, EPS, gemma_norm=True)
    expected = (torch.tensor([GEMMA_ROW], dtype=torch.float64) * (1.0 + tiny)).to(dtype)
    assert bits_equal(out.cpu(), expected)
    assert out[0, 0].item() > 1.5  # 1.5009765625 (fp16) / 1.5078125 (bf16)
    plain = torch.empty_like(q)
    qknorm.fused_qk_rmsnorm(plain, None, q, w, EPS, gemma_norm=False)
    assert bits_equal(plain.cpu(), (torch.tensor([GEMMA_ROW], dtype=torch.float64) * tiny).to(dtype))


# q, q_residual found so that normalizing the rounded sum rnd(q + r) gives a different output
# than normalizing the fp32 sum, with every expected value >= 0.23 ulp from a rounding midpoint.
RESIDUAL_CASES = {
    torch.float16: (
        [-0.2362060546875, -0.341796875, 0.56787109375, -0.771484375],
        [0.00518035888671875, -0.0016841888427734375, 0.0015363693237304688, -0.00856781005859375],
    ),
    torch.bfloat16: (
        [-0.466796875, 0.59375, 0.310546875, -0.400390625],
        [0.005950927734375, 0.003387451171875, -0.0167236328125, 0.00897216796875],
    ),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@skip_unsupported
def test_residual_norm_uses_unrounded_sum(backend: str, dtype: torch.dtype) -> None:
    qv, rv = RESIDUAL_CASES[dtype]
    q, res = _t([qv], dtype), _t([rv], dtype)
    w = torch.ones(4, dtype=dtype, device=DEVICE)
    out, res_out = torch.empty_like(q), torch.empty_like(q)
    qknorm.fused_qk_rmsnorm(out, None, q, w, 1e-6, q_res_out=res_out, q_residual=res)
    x = q.double().cpu() + res.double().cpu()  # exact: two fp16/bf16 values of similar scale
    assert bits_equal(res_out.cpu(), x.to(dtype))
    from_sum = rmsnorm64(x, w, 1e-6).to(dtype)
    from_rounded = rmsnorm64(x.to(dtype), w, 1e-6).to(dtype)
    assert not bits_equal(from_sum, from_rounded)  # the case really tells the two apart
    assert bits_equal(out.cpu(), from_sum)


@skip_unsupported
def test_residual_sum_overflowing_fp16_is_inf_but_norm_is_finite(backend: str) -> None:
    """65504 + 65504 = 131008 is an fp32 value: q_res_out rounds it to inf, the norm uses it as is."""
    q = _t([[65504.0, 65504.0, 1.0, -1.0]], torch.float16)
    res = _t([[65504.0, 0.0, 0.0, 0.0]], torch.float16)
    w = torch.ones(4, dtype=torch.float16, device=DEVICE)
    out, res_out = torch.empty_like(q), torch.empty_like(q)
    qknorm.fused_qk_rmsnorm(out, None, q, w, 1e-6, q_res_out=res_out, q_residual=res)
    assert res_out.cpu().tolist() == [[math.inf, 65504.0, 1.0, -1.0]]
    x = torch.tensor([[131008.0, 65504.0, 1.0, -1.0]], dtype=torch.float64)
    assert bool(torch.isfinite(out).all())
    assert_norm_close(out, rmsnorm64(x, w, 1e-6).to(torch.float16), "q_out")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@skip_unsupported
def test_residual_out_is_the_rounded_fp32_sum_bit_for_bit(backend: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    q = (torch.randn(6, 200, generator=gen) * torch.logspace(-3, 3, 200)).to(dtype).to(DEVICE)
    res = (torch.randn(6, 200, generator=gen) * torch.logspace(3, -3, 200)).to(dtype).to(DEVICE)
    w = torch.ones(200, dtype=dtype, device=DEVICE)
    out, res_out = torch.empty_like(q), torch.empty_like(q)
    qknorm.fused_qk_rmsnorm(out, None, q, w, 1e-6, q_res_out=res_out, q_residual=res)
    assert_same_nan_or_bits(res_out, (q.float() + res.float()).to(dtype), "q_res_out")


@skip_unsupported
def test_k_has_no_residual_and_k_epsilon_none_uses_q_epsilon(backend: str) -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 16, generator=gen).to(torch.bfloat16).to(DEVICE) * 0.1
    k = torch.randn(4, 8, generator=gen).to(torch.bfloat16).to(DEVICE) * 0.1
    res = torch.randn(4, 16, generator=gen).to(torch.bfloat16).to(DEVICE)
    wq, wk = torch.ones(16, dtype=torch.bfloat16, device=DEVICE), torch.ones(8, dtype=torch.bfloat16, device=DEVICE)
    q_eps = 0.25  # large enough to change every output visibly
    k_out, q_out, res_out = torch.empty_like(k), torch.empty_like(q), torch.empty_like(q)
    qknorm.fused_qk_rmsnorm(
        q_out, None, q, wq, q_eps, k_out=k_out, q_res_out=res_out, k=k, k_weight=wk, k_epsilon=None, q_residual=res
    )
    assert_norm_close(k_out, rmsnorm64(k, wk, q_eps).to(torch.bfloat16), "k_out")
    assert not torch.equal(k_out.cpu(), rmsnorm64(k, wk, 1e-6).to(torch.bfloat16))
    k_out2 = torch.empty_like(k)
    qknorm.fused_qk_rmsnorm(q_out, None, q, wq, q_eps, k_out=k_out2, k=k, k_weight=wk, k_epsilon=1e-6)
    assert_norm_close(k_out2, rmsnorm64(k, wk, 1e-6).to(torch.bfloat16), "k_out with k_epsilon")


# ----------------------------------------------------------------------------- full RMSNorm in float64


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 64, 1536])
@pytest.mark.parametrize("gemma", [False, True])
@skip_unsupported
def test_rmsnorm_matches_float64_formula(backend: str, dtype: torch.dtype, n: int, gemma: bool) -> None:
    gen = torch.Generator().manual_seed(n)
    q = (torch.randn(5, n, generator=gen) * 3).to(dtype).to(DEVICE)
    res = torch.randn(5, n, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(5, 33, generator=gen).to(dtype).to(DEVICE)
    wq = (torch.rand(n, generator=gen) * 2 - 0.5).to(dtype).to(DEVICE)
    wk = (torch.rand(33, generator=gen) * 2).to(dtype).to(DEVICE)
    q_out, k_out, res_out = torch.empty_like(q), torch.empty_like(k), torch.empty_like(q)
    qknorm.fused_qk_rmsnorm(
        q_out, None, q, wq, 1e-5, k_out=k_out, q_res_out=res_out, k=k, k_weight=wk, k_epsilon=1e-3,
        q_residual=res, gemma_norm=gemma,
    )  # fmt: skip
    x = q.double().cpu() + res.double().cpu()
    assert_norm_close(q_out, rmsnorm64(x, wq, 1e-5, gemma).to(dtype), "q_out")
    assert_norm_close(k_out, rmsnorm64(k, wk, 1e-3, gemma).to(dtype), "k_out")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
@skip_unsupported
def test_fp8_group_quant_matches_float64_formula(backend: str, dtype: torch.dtype, fp8: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(8, 512, generator=gen).to(dtype).to(DEVICE)
    w = (torch.rand(512, generator=gen) * 2).to(dtype).to(DEVICE)
    codes, scales, _ = _quantize(q, w, QuantType.per_1x128, fp8=fp8, eps=1e-6)
    y = rmsnorm64(q, w, 1e-6).reshape(8, 4, 128)
    s = torch.tensor([[fp8_scale(float(a), fp8) for a in row] for row in y.abs().amax(-1)])
    fmt = FP8_FORMATS[fp8]
    exp_codes = torch.tensor([fmt.encode(float(v)) for v in (y / s.double().unsqueeze(-1)).reshape(-1)], dtype=torch.uint8)
    assert_scales_close(scales, s)
    assert_fp8_close(codes, exp_codes.reshape(8, 512).view(fp8))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@skip_unsupported
def test_mxfp4_matches_float64_formula(backend: str, dtype: torch.dtype, group_size: int) -> None:
    gen = torch.Generator().manual_seed(group_size)
    q = torch.randn(4, 256, generator=gen).to(dtype).to(DEVICE)
    w = (torch.rand(256, generator=gen) * 2).to(dtype).to(DEVICE)
    codes, scales, _ = _quantize(q, w, QuantType.per_1x32, group_size=group_size, eps=1e-6)
    y = rmsnorm64(q, w, 1e-6).reshape(4, -1, group_size)
    e = torch.tensor([[e8m0_byte(float(a)) for a in row] for row in y.abs().amax(-1)])
    v = y / torch.pow(2.0, e.double() - 127).unsqueeze(-1)
    nib = torch.tensor([e2m1_encode(float(t)) for t in v.reshape(-1)]).reshape(4, 256)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    assert_mxfp4_close(codes, scales, packed, e.to(torch.uint8))


# ----------------------------------------------------------------------------- non-finite input (reference)


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
def test_reference_nan_row_poisons_only_its_row(fp8: torch.dtype) -> None:
    """The definition in tests/test_fuzz.py, as the reference implements it (NaN codes too)."""
    q = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    q[1, 5] = math.nan
    w = torch.ones(64, dtype=torch.float16)
    with using_backend("torch"):
        codes, scales, unq = _quantize(q.to(DEVICE), w.to(DEVICE), QuantType.per_1x32, fp8=fp8, eps=1e-6)
        clean_codes, clean_scales, clean_unq = _quantize(q[[0, 2]].to(DEVICE), w.to(DEVICE), QuantType.per_1x32, fp8=fp8, eps=1e-6)
    assert bool(torch.isnan(unq[1]).all())
    assert bool(torch.isnan(scales[1]).all())
    assert bool(torch.isnan(codes[1].float()).all())
    nan_code = FP8_FORMATS[fp8].nan_code
    assert set(_bytes(codes[1])) <= {nan_code, nan_code | 0x80}
    assert bits_equal(codes[[0, 2]], clean_codes) and bits_equal(scales[[0, 2]], clean_scales)
    assert bits_equal(unq[[0, 2]], clean_unq)


def test_reference_inf_gives_nan_at_inf_and_zero_elsewhere() -> None:
    q = torch.ones(2, 64, dtype=torch.bfloat16)
    q[0, 40] = -math.inf
    w = torch.ones(64, dtype=torch.bfloat16)
    with using_backend("torch"):
        codes, scales, unq = _quantize(q.to(DEVICE), w.to(DEVICE), QuantType.per_1x32, eps=1e-6)
        f8, s8, _ = _quantize(q.to(DEVICE), w.to(DEVICE), QuantType.per_1x32, fp8=torch.float8_e4m3fn, eps=1e-6)
    row = unq[0].float()
    assert bool(torch.isnan(row[40])) and bool((row[torch.arange(64) != 40] == 0).all())
    assert scales[0].tolist() == [92, 255]  # group 0 all zero (floor); group 1 has the NaN: E8M0 NaN
    assert _bytes(codes[0]) == [0] * 32  # the reference writes zero nibbles under a NaN scale
    assert s8[0, 0].item() == fp8_scale(0.0, torch.float8_e4m3fn) and math.isnan(s8[0, 1].item())
    assert _bytes(f8[0, :32]) == [0] * 32 and bool(torch.isnan(f8[0, 32:].float()).all())
    assert scales[1].tolist() == [125, 125] and bool(torch.isfinite(unq[1].float()).all())


def test_reference_bf16_rows_beyond_fp32_sum_normalize_to_zero() -> None:
    """|x| >= 2^64 overflows the fp32 sum of squares (SPEC §4.2 is fp32): r = 0, y = 0, never NaN."""
    q = torch.full((1, 8), 1e30, dtype=torch.bfloat16)
    w = torch.ones(8, dtype=torch.bfloat16)
    with using_backend("torch"):
        codes, scales, unq = _quantize(q.to(DEVICE), w.to(DEVICE), QuantType.per_Token, fp8=torch.float8_e4m3fn, eps=1e-6)
    assert unq.float().tolist() == [[0.0] * 8]
    assert scales.tolist() == [[fp8_scale(0.0, torch.float8_e4m3fn)]] and _bytes(codes) == [0] * 8


# ----------------------------------------------------------------------------- properties


def _finite_values(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """Every finite fp16 value, or every bf16 value with a normal (or zero) fp32 magnitude."""
    if dtype == torch.float16:
        return st.floats(width=16, allow_nan=False, allow_infinity=False)
    bits = st.integers(-(2**15), 2**15 - 1).map(lambda b: torch.tensor([b], dtype=torch.int16).view(torch.bfloat16).item())
    return bits.filter(lambda v: math.isfinite(v) and (v == 0 or abs(v) >= 2.0**-126))


def _f32_step(v: float, toward: float) -> float:
    """The float32 next to ``v`` toward ``toward``."""
    return torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(toward, dtype=torch.float32)).item()


@st.composite
def exact_rows(draw: st.DrawFn) -> tuple[torch.dtype, list[float], list[float]]:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    n = draw(st.integers(1, 48))
    w = draw(st.lists(_finite_values(dtype), min_size=n, max_size=n))
    signs = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=n, max_size=n))
    return dtype, w, signs


@fuzz_settings(150)
@given(case=exact_rows(), fp8=st.sampled_from(FP8_DTYPES))
def test_property_fp8_codes_exact_and_error_within_half_step(case: tuple[torch.dtype, list[float], list[float]], fp8: torch.dtype) -> None:
    dtype, w, signs = case
    n = len(w)
    y = [s * v for s, v in zip(signs, w)]  # exact fp32 values of the normalized q
    note(f"dtype={dtype} fp8={fp8} y={y}")
    q = _t([signs], dtype)
    codes, scales, _ = _quantize(q, _t(w, dtype), QuantType.per_Token, fp8=fp8)
    fmt = FP8_FORMATS[fp8]
    amax = max(abs(v) for v in y)
    s = fp8_scale(amax, fp8)
    assert scales.tolist() == [[s]]
    assert s >= fp8_scale(0.0, fp8)  # the floor
    got = _bytes(codes)
    for j in range(n):
        v = fl32(y[j] / s)
        # Rule 7 allows y / scale 1 ulp off (aiter and the Triton kernels multiply by a reciprocal):
        # the byte of v or of a neighbour; which one, where y / scale lies near a rounding midpoint.
        near = [_f32_step(v, -math.inf), v, _f32_step(v, math.inf)]
        assert got[j] in {fmt.encode(x) for x in near}, (j, y[j], v, got[j], fmt.encode(v))
        deq = fmt.decode(got[j]) * s
        clamp = max(0.0, abs(v) - fmt.fmax) * s
        division = max(abs(x - y[j] / s) for x in near) * s  # fp32 rounding (or underflow) of y / scale, and rule 7's ulp
        slack = 4 * 2.0**-52 * abs(y[j])  # the float64 arithmetic of this check
        step = max(fmt.half_step(min(abs(x), fmt.fmax)) for x in near)
        assert abs(deq - y[j]) <= step * s + clamp + division + slack
        assert not math.isnan(deq)
    if amax > 1e-10:  # the largest magnitude saturates to exactly +-FMAX
        assert max(abs(fmt.decode(c)) for c in got) == fmt.fmax


@st.composite
def exact_groups(draw: st.DrawFn) -> tuple[torch.dtype, int, list[float], list[float]]:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    group_size = draw(st.sampled_from([32, 64, 128]))
    n = group_size * draw(st.integers(1, 3))
    w = draw(st.lists(_finite_values(dtype), min_size=n, max_size=n))
    signs = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=n, max_size=n))
    return dtype, group_size, w, signs


@fuzz_settings(100)
@given(case=exact_groups())
def test_property_mxfp4_bytes_exact_and_error_within_half_step(case: tuple[torch.dtype, int, list[float], list[float]]) -> None:
    dtype, group_size, w, signs = case
    n = len(w)
    y = [s * v for s, v in zip(signs, w)]
    note(f"dtype={dtype} group_size={group_size} y={y}")
    codes, scales, _ = _quantize(_t([signs], dtype), _t(w, dtype), QuantType.per_1x32, group_size=group_size)
    nib = unpack_nibbles(codes)[0].tolist()
    for g in range(n // group_size):
        ys = y[g * group_size : (g + 1) * group_size]
        e = e8m0_byte(max(abs(v) for v in ys))
        assert scales[0, g].item() == e
        assert e >= 92
        unit = 2.0 ** (e - 127)
        for j, v in enumerate(ys):
            c = nib[g * group_size + j]
            want = e2m1_encode(v / unit)
            if fl32(v / unit) == 0:
                assert c & 7 == 0  # the sign of a zero quotient (0 or underflow) is not specified
            else:
                assert c == want, (g, j, v, unit)
            grid = sorted(set(E2M1_GRID))
            a = min(abs(v) / unit, 6.0)
            half = 0.0 if a in grid else min(hi - lo for lo, hi in itertools.pairwise(grid) if lo <= a <= hi) / 2
            assert abs(e2m1_decode(c) * unit - v) <= half * unit + max(0.0, abs(v) - 6 * unit)


@fuzz_settings(60)
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    m=st.integers(1, 4),
    groups=st.integers(1, 4),
    mode=st.sampled_from(["fp8_group", "mxfp4"]),
    scale_pow=st.integers(-6, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_dequantized_random_rows_within_half_step(
    dtype: torch.dtype, m: int, groups: int, mode: str, scale_pow: int, seed: int
) -> None:
    gs = 32
    n = groups * gs
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(m, n, generator=gen) * 10.0**scale_pow).to(dtype).to(DEVICE)
    w = (torch.rand(n, generator=gen) * 3 - 1).to(dtype).to(DEVICE)
    y = rmsnorm64(q, w, 1e-6).reshape(m, groups, gs)
    if mode == "fp8_group":
        codes, scales, _ = _quantize(q, w, QuantType.per_1x32, fp8=torch.float8_e4m3fn, eps=1e-6)
        fmt = FP8_FORMATS[torch.float8_e4m3fn]
        s = scales.double().unsqueeze(-1)
        deq = codes.float().double().reshape(m, groups, gs) * s
        assert bool((scales >= fp8_scale(0.0, torch.float8_e4m3fn)).all())
        assert not bool(torch.isnan(codes.float()).any())
        v = (y / s).abs().clamp(max=fmt.fmax)
        half = torch.tensor([max(fmt.half_step(float(t) * (1 - 1e-6)), fmt.half_step(min(float(t) * (1 + 1e-6), fmt.fmax))) for t in v.reshape(-1)])
        bound = half.reshape(v.shape) * s + 1e-6 * y.abs() + (y.abs() / s - fmt.fmax).clamp(min=0) * s
    else:
        codes, scales, _ = _quantize(q, w, QuantType.per_1x32, eps=1e-6)
        unit = torch.pow(2.0, scales.double() - 127).unsqueeze(-1)
        nib = unpack_nibbles(codes).reshape(m, groups, gs)
        deq = torch.tensor([e2m1_decode(int(c)) for c in nib.reshape(-1)], dtype=torch.float64).reshape(nib.shape) * unit
        assert bool((scales >= 92).all())
        a = (y / unit).abs()
        half = torch.where(a >= 4, 1.0, torch.where(a >= 2, 0.5, 0.25))
        bound = half * unit + 1e-6 * y.abs() + (a - 6).clamp(min=0) * unit
    assert bool(((deq - y).abs() <= bound).all()), float(((deq - y).abs() - bound).max())


@fuzz_settings(40)
@given(
    mode=st.sampled_from(["none", "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"]),
    dtype=st.sampled_from(["float16", "bfloat16"]),
    m=st.integers(1, 5),
    groups=st.integers(1, 3),
    out_pad=st.integers(1, 9),
    out_offset=st.integers(0, 7),
    transpose=st.sampled_from(["", "contiguous", "view"]),
    residual=st.booleans(),
    with_k=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_property_outputs_stay_inside_their_windows(
    mode: str, dtype: str, m: int, groups: int, out_pad: int, out_offset: int, transpose: str,
    residual: bool, with_k: bool, seed: int,
) -> None:  # fmt: skip
    """Sentinel bytes around every padded output survive (checked inside ``run_case``)."""
    qt = None if mode not in ("fp8_group", "mxfp4") else int(QuantType.per_1x32)
    case = Case(
        entry="unified", mode=mode, quant_type=qt, dtype=dtype, m=m, n1=32 * groups, n2=24 if with_k else 0,
        transpose=transpose if mode == "fp8_group" else "", residual=residual, unquantized=mode != "none",
        out_pad=out_pad, out_offset=out_offset, seed=seed,
    )  # fmt: skip
    note(repr(case))
    run_case(case)
