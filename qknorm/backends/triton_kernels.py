"""Triton kernels of the fused Q/K RMSNorm (SPEC §4): ``@triton.jit`` code only.

One launch covers q rows and k rows: programs ``[0, q_programs)`` own q row blocks, the rest own
k row blocks. A row block is a ``[ROWS, NG, GS]`` register tile (``GS`` = the quantization group,
or the whole padded row without group quantization), so group maxima are plain reductions over
the last axis. Rows wider than one tile are processed by :func:`_row_chunked` in passes over
column chunks. The launcher (``triton_backend.py``) chooses every compile-time knob.

Numerics as :mod:`qknorm.reference`: fp32 throughout, ``x = q (+ residual)``,
``r = rsqrt(sum(x^2) * fl32(1/n) + eps)`` (within ~2 ulp of r, as SPEC §4.2 allows),
``y = (x * r) * w``; quantization reads the fp32 ``y``; ``y / scale`` is correctly rounded
(:func:`_quotient`; Triton's ``/`` is approximate on NVIDIA). Amax is an integer max over the
bits of ``|y|``: for non-negative floats integer order is float order and NaN sorts above inf,
so NaN propagates as in torch.amax. Float conversions that the target cannot do natively with
round-to-nearest-even (bf16 and FP8 under the interpreter or on ROCm, e4m3fnuz everywhere) use
the exact software encoders below. Per-tensor FP8 is two launches (see the kernel's docstring).
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

# What the q rows of one launch do (compile-time Q_MODE).
Q_NONE = tl.constexpr(0)  # norm only
Q_GROUP = tl.constexpr(1)  # FP8, one scale per [row, GS group] of the tile
Q_ROW = tl.constexpr(2)  # FP8, one scale per row span (per-token, or groups wider than a chunk)
Q_TENSOR = tl.constexpr(3)  # FP8 with a scale from the per-program amax partials of a first launch
Q_MXFP4 = tl.constexpr(4)  # E2M1 nibbles + E8M0 scale byte per [row, GS group]
Q_AMAX = tl.constexpr(5)  # first launch of per-tensor FP8: per-program amax of y, no other write

# Bits of fl32(1e-10), the amax floor (SPEC §4 rule 6), and of fl32(1/6) (rule 11).
AMAX_FLOOR_BITS = tl.constexpr(struct.unpack("<i", struct.pack("<f", 1e-10))[0])
MXFP4_INV_MAX = tl.constexpr(struct.unpack("<f", struct.pack("<f", 1.0 / 6.0))[0])


# ----------------------------------------------------------------------------- conversions


@triton.jit
def _abs_bits(y, mask):
    """|y| as int32 bits (0 outside mask): max over these is a NaN-propagating amax."""
    return tl.where(mask, y.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16 with round-to-nearest-even in integer arithmetic (NaN stays NaN)."""
    b = x.to(tl.int32, bitcast=True)
    r = b + 0x7FFF + ((b >> 16) & 1)
    r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, b | 0x400000, r)
    return (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_out(x, OUT_PTR, NATIVE: tl.constexpr):
    """fp32 -> the output's element type (fp16 or bf16) with round-to-nearest-even."""
    if OUT_PTR.dtype.element_ty == tl.bfloat16:
        if NATIVE:
            return x.to(tl.bfloat16)
        else:
            return _bf16_rne(x)
    else:
        return x.to(OUT_PTR.dtype.element_ty)


@triton.jit
def _fp8_code(v, FNUZ: tl.constexpr, NATIVE: tl.constexpr):
    """Clamped fp32 ``v`` (|v| <= FMAX, or NaN) -> e4m3fn / e4m3fnuz byte, RNE, as torch's casts.

    Software path: normals round the fp32 significand to 3 bits in integer arithmetic;
    subnormals are rounded by the FPU itself by adding a power of two whose ulp is the FP8
    subnormal step (2^-9 for e4m3fn: 2^14; 2^-10 for e4m3fnuz: 2^13), the integer difference of
    the bits then being the code (code 8 is the smallest normal, as it should be). e4m3fn keeps
    the sign of zero and encodes NaN as 0x7F|sign; e4m3fnuz has no negative zero and 0x80 is NaN.
    """
    if NATIVE:
        return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        b = v.to(tl.int32, bitcast=True)
        a = b & 0x7FFFFFFF
        sign = (b >> 24) & 0x80
        mag = a.to(tl.float32, bitcast=True)
        if FNUZ:
            normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - ((127 - 8) << 3)
            sub = (mag + 8192.0).to(tl.int32, bitcast=True) - 0x46000000
            code = tl.where(a < 0x3C000000, sub, normal)  # 2^-7: smallest e4m3fnuz normal
            code = tl.where(code == 0, 0, code | sign)
            code = tl.where(a > 0x7F800000, 0x80, code)
        else:
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
def _quotient(y, d, FMA: tl.constexpr):
    """y / d correctly rounded, for a divisor d shared by many y (broadcast from a smaller shape).

    With a fused multiply-add: Markstein's correction of q0 = y * RN(1/d): r = y - q0*d is exact
    and RN(q0 + r * RN(1/d)) = RN(y/d) (q0 is within 1 ulp; no over/underflow here: d >= 2^-43,
    |y/d| <= FMAX). One IEEE division per group instead of one per element: ``div_rn`` per
    element branches to a slow path and serializes the row. Where r = 0, q0 is already exact and
    is kept (q0 + 0 would turn -0 into +0); where r is NaN (an infinite, zero or NaN operand),
    q0 is IEEE's answer too. Without FMA (the interpreter rounds the product): ``div_rn``.
    """
    if FMA:
        rcp = _div(tl.full(d.shape, 1.0, tl.float32), d)
        y, rcp = tl.broadcast(y, rcp)
        y, d = tl.broadcast(y, d)
        q0 = y * rcp
        r = tl.fma(-q0, d, y)
        return tl.where((r == 0.0) | (r != r), q0, tl.fma(r, rcp, q0))
    else:
        return _div(y, d)


@triton.jit
def _fp8_values(y, scale, FMAX: tl.constexpr, FNUZ: tl.constexpr, NATIVE: tl.constexpr, FMA: tl.constexpr):
    """Rule 7: fp8_rne(clamp(y / scale, -FMAX, FMAX)), NaN kept (comparisons with NaN are false)."""
    v = _quotient(y, scale, FMA)
    v = tl.where(v > FMAX, FMAX, tl.where(v < -FMAX, -FMAX, v))
    return _fp8_code(v, FNUZ, NATIVE)


@triton.jit
def _store_codes(PTR, codes, mask):
    """Store uint8 codes into an FP8 (or uint8) output, reinterpreting the bits."""
    tl.store(PTR, codes.to(PTR.dtype.element_ty, bitcast=True), mask=mask)


@triton.jit
def _e2m1_code(v):
    """Rule 12: E2M1 code (sign in bit 3) of fp32 v, RNE on {0,.5,1,1.5,2,3,4,6}, saturating; NaN -> 0.

    The code is the number of midpoints passed; a tie goes to the even code, so the comparison
    is strict where the lower neighbour is even and inclusive where the upper one is.
    """
    a = (v.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    c = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    c += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    return c | ((v < 0).to(tl.int32) << 3)


# ----------------------------------------------------------------------------- tiles


@triton.jit
def _load_x(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, mask, HAS_RES: tl.constexpr):
    """x = f(X) (+ f(RES)) in fp32 over a [ROWS, NG, GS] tile (rows int64)."""
    x = tl.load(X_PTR + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(RES_PTR + rows * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _load_w(W_PTR, cols, mask, GEMMA: tl.constexpr):
    """w = f(weight) (+ 1.0 in fp32 for gemma) over the tile's columns."""
    w = tl.load(W_PTR + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    return w


@triton.jit
def _rstd(sumsq, N: tl.constexpr, eps):
    """r = rsqrt(sumsq * fl32(1/N) + eps): within ~2 ulp of the exact r (SPEC §4.2 allows it).

    The correctly rounded form (``1 / sqrt_rn(sumsq / N + eps)``) branches to IEEE slow paths
    three times per row; measured on the H100 it cost 8% at M = 65536 with FP8 quantization.
    """
    return tl.rsqrt(sumsq * (1.0 / N) + eps)


@triton.jit
def _group_amax(y, mask):
    """max(1e-10, max |y|) over the tile's last axis (one quantization group): [R, NG, 1] fp32."""
    bits = tl.max(_abs_bits(y, mask), axis=2, keep_dims=True)
    return tl.maximum(bits, AMAX_FLOOR_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _write_tile(
    x, y, rows, g, cols, mask, gmask, scale,
    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
    GS: tl.constexpr, HAS_RES: tl.constexpr, HAS_OUT: tl.constexpr, Q_MODE: tl.constexpr,
    FMAX: tl.constexpr, INV_FMAX: tl.constexpr, FNUZ: tl.constexpr,
    NATIVE_FP8: tl.constexpr, NATIVE_CAST: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """Store every output of one [R, NG, GS] tile: rows int64 [R,1,1], g [1,NG,1] group index,
    cols [1,NG,GS], gmask [R,NG,1] (whole groups in bounds); ``scale`` is the FP8 scale of
    Q_ROW / Q_TENSOR (computed by the caller); Q_GROUP and Q_MXFP4 take one per group here.
    """
    if HAS_RES:
        tl.store(RES_OUT_PTR + rows * res_out_stride + cols, _to_out(x, RES_OUT_PTR, NATIVE_CAST), mask=mask)
    if HAS_OUT:
        tl.store(OUT_PTR + rows * out_stride + cols, _to_out(y, OUT_PTR, NATIVE_CAST), mask=mask)
    if Q_MODE == Q_GROUP:
        gscale = _group_amax(y, mask) * INV_FMAX
        codes = _fp8_values(y, gscale, FMAX, FNUZ, NATIVE_FP8, FMA)
        _store_codes(QUANT_PTR + rows * quant_stride + cols, codes, mask)
        tl.store(SCALE_PTR + rows * scale_stride_m + g.to(tl.int64) * scale_stride_g, gscale, mask=gmask)
    elif Q_MODE == Q_ROW or Q_MODE == Q_TENSOR:
        codes = _fp8_values(y, scale, FMAX, FNUZ, NATIVE_FP8, FMA)
        _store_codes(QUANT_PTR + rows * quant_stride + cols, codes, mask)
    elif Q_MODE == Q_MXFP4:
        t = (_group_amax(y, mask) * MXFP4_INV_MAX).to(tl.int32, bitcast=True)
        e = (t >> 23) & 0xFF
        e += ((t & 0x7FFFFF) != 0).to(tl.int32) & (e != 255).to(tl.int32)  # ceil to a power of two
        # 1 / 2^(e-127) exactly: exponent field 254 - e; 2^-127 is subnormal; 1/inf = 0.
        inv_bits = tl.where(e == 254, 0x400000, tl.where(e == 255, 0, (254 - e) << 23))
        c = _e2m1_code(y * inv_bits.to(tl.float32, bitcast=True))
        lo, hi = tl.split(tl.reshape(c, (c.shape[0], c.shape[1], GS // 2, 2)))
        half = g * (GS // 2) + tl.arange(0, GS // 2)[None, None, :]
        tl.store(QUANT_PTR + rows * quant_stride + half, (lo | (hi << 4)).to(tl.uint8), mask=gmask)
        tl.store(SCALE_PTR + rows * scale_stride_m + g.to(tl.int64) * scale_stride_g, e.to(tl.uint8), mask=gmask)


@triton.jit
def _rows_single(
    row0, M, eps, scale,
    X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
    N: tl.constexpr, ROWS: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_OUT: tl.constexpr, GEMMA: tl.constexpr, Q_MODE: tl.constexpr,
    FMAX: tl.constexpr, INV_FMAX: tl.constexpr, FNUZ: tl.constexpr,
    NATIVE_FP8: tl.constexpr, NATIVE_CAST: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """ROWS whole rows in registers: load, reduce, normalize, store.

    Returns the rows' amax bits ([ROWS, 1, 1] int32) in Q_AMAX mode, else 0.
    """
    r = row0 + tl.arange(0, ROWS)[:, None, None]
    g = tl.arange(0, NG)[None, :, None]
    cols = g * GS + tl.arange(0, GS)[None, None, :]
    rmask = r < M
    mask = rmask & (cols < N)
    gmask = rmask & (g * GS < N)
    rows = r.to(tl.int64)
    x = _load_x(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, mask, HAS_RES)
    # The weights are loaded at the tile's full shape (repeats hit L1): a [1, NG, GS] load would
    # get a layout of its own and cost a shared-memory layout conversion of the whole tile.
    wcols = cols + r * 0
    w = _load_w(W_PTR, wcols, wcols < N, GEMMA)
    sumsq = tl.sum(tl.sum(x * x, axis=2, keep_dims=True), axis=1, keep_dims=True)
    y = (x * _rstd(sumsq, N, eps)) * w
    amax_bits = 0
    if Q_MODE == Q_ROW or Q_MODE == Q_AMAX:
        amax_bits = tl.max(tl.max(_abs_bits(y, mask), axis=2, keep_dims=True), axis=1, keep_dims=True)
        if Q_MODE == Q_ROW:
            scale = tl.maximum(amax_bits, AMAX_FLOOR_BITS).to(tl.float32, bitcast=True) * INV_FMAX
            tl.store(SCALE_PTR + rows * scale_stride_m, scale, mask=rmask)
    if Q_MODE != Q_AMAX:
        _write_tile(
            x, y, rows, g, cols, mask, gmask, scale, OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
            QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
            GS, HAS_RES, HAS_OUT, Q_MODE, FMAX, INV_FMAX, FNUZ, NATIVE_FP8, NATIVE_CAST, FMA,
        )  # fmt: skip
    return amax_bits


@triton.jit
def _row_chunked(
    row, eps, scale,
    X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
    N: tl.constexpr, SPAN: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_OUT: tl.constexpr, GEMMA: tl.constexpr, Q_MODE: tl.constexpr,
    FMAX: tl.constexpr, INV_FMAX: tl.constexpr, FNUZ: tl.constexpr,
    NATIVE_FP8: tl.constexpr, NATIVE_CAST: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """One row wider than a tile, in chunks of NG*GS columns.

    A sum-of-squares pass, then for each span of SPAN columns (Q_ROW: first a pass for the
    span's amax) a pass that writes each chunk right after reading it: every element is read
    before anything of its own columns is written, so the in-place forms stay correct.
    Returns the row's amax bits (Q_AMAX), else 0.
    """
    CH: tl.constexpr = NG * GS
    g = tl.arange(0, NG)[None, :, None]
    cols0 = g * GS + tl.arange(0, GS)[None, None, :]
    rows = row.to(tl.int64) + tl.zeros((1, 1, 1), tl.int64)
    acc = tl.zeros((1, NG, GS), tl.float32)
    for c in range(0, N, CH):
        cols = c + cols0
        x = _load_x(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, cols < N, HAS_RES)
        acc += x * x
    rstd = _rstd(tl.sum(tl.sum(tl.sum(acc, axis=2), axis=1), axis=0), N, eps)
    amax_bits = row * 0
    for s in range(0, N, SPAN):
        end = tl.minimum(s + SPAN, N)  # masks only: loop bounds stay Python ints under the interpreter
        span_scale = scale
        if Q_MODE == Q_ROW or Q_MODE == Q_AMAX:
            bits = tl.zeros((1, NG, GS), tl.int32)
            for c in range(s, s + SPAN, CH):
                cols = c + cols0
                mask = cols < end
                x = _load_x(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, mask, HAS_RES)
                bits = tl.maximum(bits, _abs_bits((x * rstd) * _load_w(W_PTR, cols, mask, GEMMA), mask))
            span_bits = tl.max(tl.max(tl.max(bits, axis=2), axis=1), axis=0)
            amax_bits = tl.maximum(amax_bits, span_bits)
            if Q_MODE == Q_ROW:
                span_scale = tl.maximum(span_bits, AMAX_FLOOR_BITS).to(tl.float32, bitcast=True) * INV_FMAX
                tl.store(SCALE_PTR + row.to(tl.int64) * scale_stride_m + tl.cast(s // SPAN, tl.int64) * scale_stride_g,
                         span_scale)  # fmt: skip
        if Q_MODE != Q_AMAX:
            for c in range(s, s + SPAN, CH):
                cols = c + cols0
                mask = cols < end
                x = _load_x(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, mask, HAS_RES)
                y = (x * rstd) * _load_w(W_PTR, cols, mask, GEMMA)
                _write_tile(
                    x, y, rows, (c // GS) + g, cols, mask, (c + g * GS) < end, span_scale,
                    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
                    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
                    GS, HAS_RES, HAS_OUT, Q_MODE, FMAX, INV_FMAX, FNUZ, NATIVE_FP8, NATIVE_CAST, FMA,
                )  # fmt: skip
    return amax_bits


@triton.jit
def _q_block(
    blk, M, eps, scale,
    X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
    N: tl.constexpr, SPAN: tl.constexpr, ROWS: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
    CHUNKED: tl.constexpr, HAS_RES: tl.constexpr, HAS_OUT: tl.constexpr, GEMMA: tl.constexpr,
    Q_MODE: tl.constexpr, FMAX: tl.constexpr, INV_FMAX: tl.constexpr, FNUZ: tl.constexpr,
    NATIVE_FP8: tl.constexpr, NATIVE_CAST: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """Row block ``blk``: ROWS whole rows in registers, or (CHUNKED) row ``blk`` in chunks.

    Returns the block's amax bits (int32 scalar) in Q_AMAX mode, else 0.
    """
    if CHUNKED:
        return _row_chunked(
            blk, eps, scale, X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
            OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
            QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
            N, SPAN, NG, GS, HAS_RES, HAS_OUT, GEMMA, Q_MODE, FMAX, INV_FMAX, FNUZ, NATIVE_FP8, NATIVE_CAST, FMA,
        )  # fmt: skip
    else:
        bits = _rows_single(
            blk * ROWS, M, eps, scale, X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
            OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
            QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
            N, ROWS, NG, GS, HAS_RES, HAS_OUT, GEMMA, Q_MODE, FMAX, INV_FMAX, FNUZ, NATIVE_FP8, NATIVE_CAST, FMA,
        )  # fmt: skip
        if Q_MODE == Q_AMAX:
            return tl.max(tl.max(tl.max(bits, axis=2), axis=1), axis=0)
        else:
            return 0


# ----------------------------------------------------------------------------- the kernel


@triton.jit(do_not_specialize=["M", "q_programs", "k_programs", "amax_count"])
def _qk_rmsnorm_kernel(
    Q_PTR, q_stride,  # q [M, N1], fp16/bf16, unit column stride
    Q_RES_PTR, q_res_stride,  # q_residual [M, N1] (HAS_RES)
    Q_W_PTR,  # q_weight [N1]
    Q_OUT_PTR, q_out_stride,  # normalized q [M, N1] (HAS_Q_OUT)
    Q_RES_OUT_PTR, q_res_out_stride,  # rnd(q + q_residual) [M, N1] (HAS_RES)
    Q_QUANT_PTR, q_quant_stride,  # FP8 codes [M, N1] or MXFP4 bytes [M, N1/2], as uint8
    Q_SCALE_PTR, q_scale_stride_m, q_scale_stride_g,  # scales: fp32 (FP8) or uint8 (E8M0)
    K_PTR, k_stride,  # k [M, N2] (HAS_K)
    K_W_PTR,  # k_weight [N2]
    K_OUT_PTR, k_out_stride,  # normalized k [M, N2]
    AMAX_PTR, amax_count,  # per-tensor: int32 amax bits, one per program of the Q_AMAX launch
    M,  # rows
    q_eps, k_eps,  # fp32 epsilons
    q_programs, k_programs,  # programs owning q row blocks, then k row blocks
    N1: tl.constexpr, N2: tl.constexpr,  # q width, k width
    Q_SPAN: tl.constexpr,  # chunked q rows: columns sharing one scale (Q_ROW), else N1
    Q_ROWS: tl.constexpr, Q_NG: tl.constexpr, Q_GS: tl.constexpr,  # q tile [Q_ROWS, Q_NG, Q_GS]
    Q_CHUNKED: tl.constexpr,  # q rows wider than the tile: one row per step, in chunks
    K_ROWS: tl.constexpr, K_BLOCK: tl.constexpr, K_CHUNKED: tl.constexpr,  # k tile [K_ROWS, 1, K_BLOCK]
    HAS_K: tl.constexpr, HAS_RES: tl.constexpr, HAS_Q_OUT: tl.constexpr, GEMMA: tl.constexpr,
    Q_MODE: tl.constexpr,  # one of Q_NONE .. Q_AMAX
    FMAX: tl.constexpr, INV_FMAX: tl.constexpr, FNUZ: tl.constexpr,  # FP8 flavour
    AMAX_BLOCK: tl.constexpr,  # Q_TENSOR: power of two >= amax_count
    NATIVE_FP8: tl.constexpr, NATIVE_CAST: tl.constexpr,  # hardware RNE conversions usable
    FMA: tl.constexpr,  # fused multiply-add (compiled code; the interpreter rounds the product)
):  # fmt: skip
    """Fused RMSNorm of q and k rows, optionally quantizing q (SPEC §4).

    Per row: ``x = q (+ res)``, ``r = rsqrt(sum(x^2)/n + eps)``, ``y = (x*r)*w``; outputs
    ``rnd(x)`` (residual), ``rnd(y)`` (q_out / k_out), and q's FP8 codes with
    ``scale = max(1e-10, amax) * fl32(1/FMAX)`` or MXFP4 nibbles with an E8M0 exponent.
    Per-tensor FP8 is two launches: Q_AMAX writes each program's amax to AMAX_PTR, then
    Q_TENSOR reduces those partials in every program (program 0 stores the scale).
    """
    pid = tl.program_id(0)
    if pid < q_programs:
        if Q_MODE == Q_AMAX:  # a capped grid: each program folds several row blocks into one partial
            amax_bits = pid * 0
            blk = pid
            while blk < (M if Q_CHUNKED else tl.cdiv(M, Q_ROWS)):
                amax_bits = tl.maximum(amax_bits, _q_block(
                    blk, M, q_eps, 0.0, Q_PTR, q_stride, Q_RES_PTR, q_res_stride, Q_W_PTR,
                    Q_OUT_PTR, q_out_stride, Q_RES_OUT_PTR, q_res_out_stride,
                    Q_QUANT_PTR, q_quant_stride, Q_SCALE_PTR, q_scale_stride_m, q_scale_stride_g,
                    N1, Q_SPAN, Q_ROWS, Q_NG, Q_GS, Q_CHUNKED, HAS_RES, HAS_Q_OUT, GEMMA, Q_MODE,
                    FMAX, INV_FMAX, FNUZ, NATIVE_FP8, NATIVE_CAST, FMA,
                ))  # fmt: skip
                blk += q_programs
            tl.store(AMAX_PTR + pid, amax_bits)
        else:
            scale = 0.0
            if Q_MODE == Q_TENSOR:
                p = tl.arange(0, AMAX_BLOCK)
                bits = tl.max(tl.load(AMAX_PTR + p, mask=p < amax_count, other=0), axis=0)
                scale = tl.maximum(bits, AMAX_FLOOR_BITS).to(tl.float32, bitcast=True) * INV_FMAX
                if pid == 0:
                    tl.store(Q_SCALE_PTR, scale)
            _q_block(
                pid, M, q_eps, scale, Q_PTR, q_stride, Q_RES_PTR, q_res_stride, Q_W_PTR,
                Q_OUT_PTR, q_out_stride, Q_RES_OUT_PTR, q_res_out_stride,
                Q_QUANT_PTR, q_quant_stride, Q_SCALE_PTR, q_scale_stride_m, q_scale_stride_g,
                N1, Q_SPAN, Q_ROWS, Q_NG, Q_GS, Q_CHUNKED, HAS_RES, HAS_Q_OUT, GEMMA, Q_MODE,
                FMAX, INV_FMAX, FNUZ, NATIVE_FP8, NATIVE_CAST, FMA,
            )  # fmt: skip
    elif HAS_K:
        kp = pid - q_programs
        _q_block(
            kp, M, k_eps, 0.0, K_PTR, k_stride, K_PTR, k_stride, K_W_PTR,
            K_OUT_PTR, k_out_stride, K_OUT_PTR, k_out_stride,
            K_OUT_PTR, k_out_stride, K_OUT_PTR, k_out_stride, k_out_stride,
            N2, N2, K_ROWS, 1, K_BLOCK, K_CHUNKED, False, True, GEMMA, Q_NONE,
            FMAX, INV_FMAX, FNUZ, NATIVE_FP8, NATIVE_CAST, FMA,
        )  # fmt: skip
