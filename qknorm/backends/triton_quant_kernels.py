"""Number encoders of the Triton kernels (SPEC §4 rules 4, 6, 7, 11, 12): ``@triton.jit`` code only.

Every encoder is exact: its outputs are the bits torch's casts and :mod:`qknorm.reference` give
for the value it is handed. The one licence taken is SPEC §4 rule 7's: FP8 values are y times the
correctly rounded reciprocal of the scale (:func:`fp8_codes`), as aiter's are, not the quotient.
Conversions that the target does natively with round-to-nearest-even (fp32 -> bf16 and
fp32 -> e4m3fn on NVIDIA sm_89+) use the hardware; everything else (the interpreter, ROCm,
e4m3fnuz) uses the integer encoders here, which are plain Triton and run on any target.

Instruction counts matter: at prefill sizes the quantizing kernels issue about as many
instructions as they move bytes (on the H200 at M = 65536, 20-25 instructions per q element
for MXFP4 left it issue-bound at 51% of DRAM bandwidth), so each encoder is written to its
shortest exact form; per-element counts quoted below are from the SASS of the sm_90 kernel.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

# Bits of fl32(1e-10), the amax floor (SPEC §4 rule 6), and fl32(1e-10), fl32(1/6) (rule 11).
AMAX_FLOOR = tl.constexpr(struct.unpack("<f", struct.pack("<f", 1e-10))[0])
MXFP4_INV_MAX = tl.constexpr(struct.unpack("<f", struct.pack("<f", 1.0 / 6.0))[0])
FLT_MAX = tl.constexpr(struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0])

# How FP8 codes are produced (compile-time FP8_ENC).
FP8_SOFT_FN = tl.constexpr(0)  # integer encoder, e4m3fn
FP8_SOFT_FNUZ = tl.constexpr(1)  # integer encoder, e4m3fnuz
FP8_HW_FN = tl.constexpr(2)  # the hardware's saturating e4m3fn conversion


@triton.jit
def max_nan(a, b):
    """max that propagates NaN (torch.amax does): ``max.NaN.f32`` on NVIDIA, one instruction."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_amax(y, axis: tl.constexpr, keep_dims: tl.constexpr):
    """``max(1e-10, max |y|)`` along ``axis`` (all axes if None), NaN-propagating (rule 6)."""
    if axis is None:
        a = tl.reduce(tl.abs(y), None, max_nan)
    else:
        a = tl.reduce(tl.abs(y), axis, max_nan, keep_dims=keep_dims)
    return max_nan(a, AMAX_FLOOR)


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16 with round-to-nearest-even in integer arithmetic (NaN stays NaN)."""
    b = x.to(tl.int32, bitcast=True)
    r = b + 0x7FFF + ((b >> 16) & 1)
    r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, b | 0x400000, r)
    return (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_f32(v):
    """fp16/bf16 -> fp32 (exact). bf16 is widened by its bits (``bits << 16``): one integer
    instruction per element on sm_90, where the compiler's conversion of a bf16 pair takes three
    (a byte permute and a shift for the high half); 5-7% fewer instructions in the quantizing
    kernels, whose programs are issue-bound at prefill sizes."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def to_out(x, OUT_PTR, NATIVE: tl.constexpr):
    """fp32 -> the output's element type (fp16 or bf16) with round-to-nearest-even."""
    if OUT_PTR.dtype.element_ty == tl.bfloat16:
        if NATIVE:
            return x.to(tl.bfloat16)
        else:
            return _bf16_rne(x)
    else:
        return x.to(OUT_PTR.dtype.element_ty)


@triton.jit
def _fnuz_code(v):
    """fp32 ``v`` (|v| < 248 or NaN) -> e4m3fnuz byte, RNE, as torch's cast: the FPU rounds.

    Adding M = 2^20 * 2^E to |v| in [2^E, 2^(E+1)) (E >= -7; M = 2^13 below 2^-7, where the
    subnormal step is 2^-10) rounds |v| to a multiple of its FP8 step 2^(E-3) with
    round-to-nearest-even, and the bits of the sum minus those of M count the steps k; the code
    is k plus 8 per binade above the subnormal one (k = 16 carries into the next binade's code).
    NaN (and inf) has its magnitude clamped to 256 (a compare and select the compiler makes one
    ``min`` with the absolute value folded in; NaN fails the compare), which counts 8 steps of 32
    into code 0x80, fnuz's NaN, and the comparison below adds the same bit. The sign goes on
    below -2^-11 only: values that round to zero give 0 (fnuz has no negative zero). About 10
    instructions per element against 17 for rounding the significand in integer arithmetic with
    separate subnormal, zero and NaN cases (sm_90 SASS; with the older encoder e4m3fnuz FP8 1x128
    ran at 80% of a copy at M = 65536 on the H200, against 96% for e4m3fn's hardware conversion;
    clamping the magnitude's bits in integer arithmetic took one instruction more per element,
    117.1 against 115.7 µs there).
    """
    a = tl.abs(v)
    a = tl.where(a < 256.0, a, 256.0)  # NaN and inf -> 256
    bits = a.to(tl.int32, bitcast=True)
    eb = tl.maximum(bits >> 23, 127 - 7)  # binade of |v|, at least 2^-7's
    big = (eb + 20) << 23  # the bits of M
    k = (a + big.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - big
    sign = tl.where(v >= -(2.0**-11), 0, 0x80)  # NaN compares false: 0x80
    return (k + 8 * (eb - (127 - 7))) | sign


@triton.jit
def fp8_code(v, FNUZ: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 ``v`` (|v| < 464 for e4m3fn, < 248 for e4m3fnuz, or NaN) -> FP8 byte, RNE, as torch's casts.

    Out of that range torch saturates; the kernels never get there (|y * RN(1/scale)| <= FMAX (1 + 2^-21),
    see :func:`fp8_codes`), so no clamp is spent. Software path, e4m3fn: normals round the fp32
    significand to 3 bits in integer arithmetic; subnormals are rounded by the FPU itself by
    adding a power of two whose ulp is the FP8 subnormal step (2^-9: 2^14), the integer
    difference of the bits then being the code (code 8 is the smallest normal, as it should be);
    the sign of zero is kept and NaN is 0x7F|sign. e4m3fnuz: :func:`_fnuz_code`.
    """
    if NATIVE:
        return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        if FNUZ:
            code = _fnuz_code(v)
        else:
            b = v.to(tl.int32, bitcast=True)
            a = b & 0x7FFFFFFF
            sign = (b >> 24) & 0x80
            mag = a.to(tl.float32, bitcast=True)
            normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - ((127 - 7) << 3)
            sub = (mag + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
            code = tl.where(a < 0x3C800000, sub, normal)  # 2^-6: smallest e4m3fn normal
            code = tl.where(a > 0x7F800000, 0x7F, code) | sign
        return code.to(tl.uint8)


@triton.jit
def _div(a, b):
    """IEEE a / b with broadcasting (``div_rn`` itself does not broadcast)."""
    a, b = tl.broadcast(a, b)
    return tl.div_rn(a, b)


@triton.jit
def quotient(y, d, FMA: tl.constexpr):
    """y / d correctly rounded for a divisor d >= 2^-43 shared by many y (broadcast from a smaller shape).

    With a fused multiply-add, Markstein's correction of q0 = y * RN(1/d): r' = q0*d - y is
    exact and RN(q0 - r' * RN(1/d)) = RN(y/d) (q0 is within 1 ulp; no over/underflow since
    |y/d| <= FMAX (1 + 2^-22) and the divisor is normal). Three instructions per element
    (FMUL, FFMA, FFMA) and one IEEE division per divisor: ``div_rn`` per element branches to a
    slow path and serializes the row. Signs and special values come out as IEEE's without a
    select: y = +-0 gives q0 = +-0, r' = +0 and q0 - (+0) * rcp = q0 with its sign; y NaN gives
    NaN; an infinite divisor (amax = inf) gives rcp = 0, and d is clamped to FLT_MAX in the
    residual so that r' = -y stays finite and y*0 + q0 = +-0 (NaN for y = +-inf), IEEE's y / inf.
    Without FMA (the interpreter rounds the product): ``div_rn``.
    """
    if FMA:
        rcp = _div(tl.full(d.shape, 1.0, tl.float32), d)
        dc = tl.minimum(d, FLT_MAX)  # NaN stays NaN: rcp is NaN then and so is every quotient
        q0 = y * rcp
        # x * -1.0 is IEEE negation (the compiler folds it into the FMA); Triton's unary minus is
        # 0 - x, which turns -0 into +0.
        r = tl.fma(q0, dc, y * -1.0)
        return tl.fma(r * -1.0, rcp, q0)
    else:
        return _div(y, d)


@triton.jit
def reciprocal(d, NEWTON: tl.constexpr):
    """RN(1 / d) for a scale d in [2^-126, 2^126], inf (0) or NaN (NaN), in d's shape.

    NEWTON (NVIDIA compiled code): the approximate reciprocal (``1.0 / d``, ``div.full.f32``,
    within 2 ulp) refined twice by r + r (1 - d r) in fused multiply-adds, the residual exact: the
    first step brings r within an ulp, the second rounds it correctly (Markstein's iteration),
    except for a significand of all ones, where the exact 1 / d lies 2^-48 above a midpoint the
    iteration lands on, and which is set directly (RN(1 / ((2 - 2^-23) 2^k)) = (1 + 2^-23) 2^-(k+1)).
    Every significand is checked against IEEE division on the GPU (tests/test_triton.py). About a
    dozen instructions per scale and no branch, where ``div_rn`` puts a branch region around its
    slow path, a barrier to the scheduler: an FP8 group program waited on one per tile, one after
    another. Otherwise (the interpreter, ROCm): ``div_rn``.
    """
    one = tl.full(d.shape, 1.0, tl.float32)
    if NEWTON:
        r = one / d
        r = tl.fma(r, tl.fma(d * -1.0, r, one), r)
        r = tl.fma(r, tl.fma(d * -1.0, r, one), r)
        bits = d.to(tl.int32, bitcast=True)
        # an all-ones significand: d = 2^(E+1) (1 - 2^-24) -> 2^-(E+1) (1 + 2^-23), whose exponent
        # field is 253 minus d's
        ones = ((253 - ((bits >> 23) & 0xFF)) << 23 | 1).to(tl.float32, bitcast=True)
        # (finite d only: the GPU's canonical NaN, 0x7FFFFFFF, has an all-ones significand too)
        r = tl.where(((bits & 0x7FFFFF) == 0x7FFFFF) & (d < float("inf")), ones, r)
        return tl.where(d == float("inf"), 0.0, r)
    else:
        return _div(one, d)


@triton.jit
def fp8_codes(y, scale, FP8_ENC: tl.constexpr):
    """Rule 7: FP8 bytes of fp8_rne(clamp(y * RN(1/scale), -FMAX, FMAX)) (NaN kept), ``scale`` broadcast.

    One multiply per element by the correctly rounded reciprocal of the scale (:func:`reciprocal`
    once per scale), as aiter multiplies by a reciprocal: the product is within
    an ulp or so of y / scale, which rule 7 allows; it moves a code by one step only where
    y / scale lies within that of a rounding midpoint (about one element in 2^20), and never
    where the scale is a power of two. The exact quotient (:func:`quotient`) took three
    instructions per element, of about twenty in the issue-bound programs (sm_90).
    |y| <= amax and scale = fl32(amax * fl32(1/FMAX)), so |y * RN(1/scale)| <= FMAX (1 + 2^-21),
    which every encoder here rounds to +-FMAX: the clamp is implied (and the hardware conversion
    saturates anyway). An infinite scale (amax inf) has reciprocal 0: finite y give +-0 and
    infinite y NaN, as y / inf; a NaN scale gives NaN codes.

    The reciprocal is iterated (:func:`reciprocal`'s NEWTON) where the bytes come from the
    hardware conversion (NVIDIA sm_89+ only). H200, DeepSeek FP8 1x128, strided, graph-replay µs,
    IEEE division -> the iteration: 1.72 -> 1.64 at M = 1, 1.77 -> 1.70 at 16, 10.15 -> 10.01 at
    4096, 106.7 -> 106.1 at 65536; per token and 1x32 within 0.04 µs either way at decode sizes. The e4m3fnuz
    programs got slower with it at decode sizes (1x128: 2.02 -> 2.14 µs at M = 1, 2.27 -> 2.43 at
    256) and keep the division.
    """
    rcp = reciprocal(scale, FP8_ENC == FP8_HW_FN)
    return fp8_code(y * rcp, FP8_ENC == FP8_SOFT_FNUZ, FP8_ENC == FP8_HW_FN)


@triton.jit
def e8m0(amax):
    """Rule 11: E8M0 exponent byte e of ceil_pow2(fl32(amax * fl32(1/6))) (int32) and the fp32 2^(127-e).

    ``amax`` is at least 1e-10, inf or NaN. The ceiling is an integer add: adding 2^23 - 1 to the
    bits of t = fl32(|amax| * fl32(1/6)) carries into the exponent field exactly when the
    significand is not zero. t < 2^126 for finite amax (FLT_MAX / 6 < 2^126), so e <= 253 then;
    inf gives 255 directly, and NaN (a positive NaN: the sign is cleared first) overflows the
    field, which the cap at 255 takes back. 1 / 2^(e-127) is exact: exponent field 254 - e for
    e <= 253, and 0 (1 / inf) for e = 255. Seven instructions per group against thirteen for
    testing the significand and the exponent's special values one by one (sm_90 SASS).
    """
    t = (tl.abs(amax) * MXFP4_INV_MAX).to(tl.uint32, bitcast=True)
    e = tl.minimum((t + 0x7FFFFF) >> 23, 255).to(tl.int32)
    inv_bits = (254 - tl.minimum(e, 254)) << 23
    return e, inv_bits.to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_code(v):
    """Rule 12: E2M1 code (sign in bit 3) of fp32 v, RNE on {0,.5,1,1.5,2,3,4,6}, saturating; NaN -> 0.

    The FPU rounds: the grid's step is 0.5 below 2, 1 in [2, 4) and 2 from 4, so adding
    M = 2^22 * step (2^22, 2^23, 2^24 by the binade of |v|, clamped) rounds |v| to a multiple of
    the step with round-to-nearest-even, and the bits of the sum minus those of M count the steps
    k. The code is k plus two per binade above the first (k in {2, 3, 4} there), capped at 7.
    The sign is v's sign bit (-0.0 gives 8, as in :func:`qknorm.reference.e2m1_codes`).
    About 12 instructions against 25 for counting the seven midpoints.
    """
    a = tl.where(v == v, tl.abs(v), 0.0)  # NaN -> 0
    e = tl.minimum(tl.maximum(a.to(tl.int32, bitcast=True) >> 23, 127), 129)
    big = (e + 22) << 23  # the bits of M
    k = (a + big.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - big
    code = tl.minimum(k + 2 * (e - 127), 7)
    return code | tl.where(v == v, (v.to(tl.int32, bitcast=True) >> 28) & 8, 0)


@triton.jit
def e2m1_codes(y, e, inv, FMA: tl.constexpr):
    """Rule 12 for a group: E2M1 codes of v = y / 2^(e-127) = y * inv (``e``, ``inv`` from :func:`e8m0`).

    A group with e = 255 (amax inf or NaN: E8M0's NaN) is all code 0, as the reference's v = NaN.
    With a fused multiply-add, :func:`_e2m1_code`'s rounding is fused with the scaling: the binade
    of |v| is that of max(|y|, 2^(e-127)) shifted by 127 - e (the max is |v| >= 1's binade,
    where the step of [1, 2) also serves [0, 1)), and fma(|y|, inv, M) = RN(|v| + M) exactly
    (|y| * inv is exact: a power-of-two scaling whose subnormal results round to code 0 either
    way). The sign is y's sign bit, shifted into place; an e = 255 group masks both parts (its
    sums are NaN where y is inf or NaN: the unsigned minimum with 0 takes any bits to 0). About
    8 instructions per element against 10 for clamping the binade, taking |y| apart and the
    sign by a comparison (sm_90 SASS: the DeepSeek MXFP4 program 1432 -> 1328 instructions).
    """
    if FMA:
        ay = tl.abs(y)
        thr = (e << 23).to(tl.float32, bitcast=True)  # 2^(e-127) (0 for e = 0, which serves as well); inf for e = 255
        eb = (tl.maximum(ay, thr).to(tl.int32, bitcast=True) >> 23) + (127 - e)  # binade of |v|, at least [1, 2)
        big = (eb + 22) << 23  # the bits of M = 2^22 * step
        k = tl.fma(ay, inv, big.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - big
        top = tl.where(e == 255, 0, 7).to(tl.uint32)
        sign = tl.where(e == 255, 0, 8)
        mag = tl.minimum((k + 2 * (eb - 127)).to(tl.uint32), top).to(tl.int32)
        return mag | ((y.to(tl.int32, bitcast=True) >> 28) & sign)
    else:
        return tl.where(e == 255, 0, _e2m1_code(y * inv))
