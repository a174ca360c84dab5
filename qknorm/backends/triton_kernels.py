"""Triton kernels of the fused Q/K RMSNorm (SPEC §4): ``@triton.jit`` code only.

One launch covers q rows and k rows: programs ``[0, q_programs)`` own q row blocks (and, with
``K_WITH_Q``, the k rows of the same indices, but for the last ones when the grid holds
programs past the q programs), the rest own k row blocks. A row block is held
in registers as one to three ``[ROWS, NG, GS]`` tiles side by side: ``GS`` is the quantization
group (or the whole tile without groups), and three tiles cover rows of 3 * 2^k columns without
padding (DeepSeek's q rows of 1536 are 3 x 512, not a 2048-wide tile of which a quarter would
be masked lanes doing every instruction for nothing). Group maxima are
reductions over the last axis. Rows wider than a tile are processed by :func:`_row_chunked` in
passes over column chunks. The launcher (``triton_backend.py``) chooses every compile-time knob.

Absent tensors are passed as ``None`` (Triton compiles the code that would use them away).

Numerics as :mod:`qknorm.reference`: fp32 throughout, ``x = q (+ residual)``,
``r = rsqrt(sum(x^2) * fl32(1/n) + eps)`` (within ~2 ulp of r, as SPEC §4.2 allows),
``y = (x * r) * w``; quantization reads the fp32 ``y``; FP8 values are ``y * RN(1 / scale)``
(:func:`~.triton_quant_kernels.fp8_codes`, as SPEC §4 rule 7 allows); amax is a NaN-propagating
max of ``|y|`` as in torch.amax.
Per-tensor FP8 is two launches, or one for a few rows (see the kernel's docstring).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # programmatic dependent launch (NVIDIA sm_90+); compiled only where the launcher asks for it
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - a Triton without CUDA's extras: PDL is never requested
    gdc_launch_dependents = gdc_wait = None

from .triton_quant_kernels import e2m1_codes, e8m0, fp8_codes, max_nan, nan_amax, to_f32, to_out

__all__ = ["_qk_rmsnorm_kernel", "pdl_prologue"]

# What the q rows of one launch do (compile-time Q_MODE).
Q_NONE = tl.constexpr(0)  # norm only
Q_GROUP = tl.constexpr(1)  # FP8, one scale per [row, GS group] of the tile
Q_ROW = tl.constexpr(2)  # FP8, one scale per row span (per-token, or groups wider than a chunk)
Q_TENSOR = tl.constexpr(3)  # FP8 with a scale from the per-program amax partials of a first launch
Q_MXFP4 = tl.constexpr(4)  # E2M1 nibbles + E8M0 scale byte per [row, GS group]
Q_AMAX = tl.constexpr(5)  # first launch of per-tensor FP8: per-program amax of y, no other write
Q_TENSOR_ONE = tl.constexpr(6)  # FP8 per tensor with every q row in one program (one launch)


# ----------------------------------------------------------------------------- tiles


@triton.jit
def _load_x(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, mask):
    """x = f(X) (+ f(RES)) in fp32 over a tile (rows int64)."""
    q, res = _load_tile(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, mask)
    return _widen_x(q, res, RES_PTR, False)


@triton.jit
def _load_tile(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, mask):
    """The tile of X and of RES as loaded (X's again without a residual)."""
    q = tl.load(X_PTR + rows * x_stride + cols, mask=mask, other=0.0)
    if RES_PTR is not None:
        return q, tl.load(RES_PTR + rows * res_stride + cols, mask=mask, other=0.0)
    else:
        return q, q


@triton.jit
def _widen_x(q, res, RES_PTR, AGAIN: tl.constexpr):
    """x = f(q) (+ f(res)) in fp32 from tiles as loaded.

    AGAIN: a second widening of tiles held across the reduction, by the compiler's conversion. The
    compiler does not merge it with the first (by the bits, :func:`to_f32`), so what lives across
    the reduction is the tile as loaded (bf16 pairs: half the registers of its fp32 widening).
    """
    if AGAIN:
        x = q.to(tl.float32)
        if RES_PTR is not None:
            x += res.to(tl.float32)
    else:
        x = to_f32(q)
        if RES_PTR is not None:
            x += to_f32(res)
    return x


@triton.jit
def _load_w(W_PTR, cols, mask, GEMMA: tl.constexpr, RAW: tl.constexpr = False):
    """w = f(weight) (+ 1.0 in fp32 for gemma) over the tile's columns; RAW: as loaded (see :func:`_widen_w`)."""
    w = tl.load(W_PTR + cols, mask=mask, other=0.0)
    if RAW:
        return w
    else:
        return _widen_w(w, GEMMA)


@triton.jit
def _widen_w(w, GEMMA: tl.constexpr):
    """f(weight) (+ 1.0 in fp32 for gemma) of loaded weights."""
    w = to_f32(w)
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
def _row_sum(t, ROWS: tl.constexpr):
    """Sum over a tile's row: a scalar for one row (no layout to convert), else [ROWS, 1, 1]."""
    if ROWS == 1:
        return tl.sum(t)
    else:
        return tl.sum(tl.sum(t, axis=2, keep_dims=True), axis=1, keep_dims=True)


@triton.jit
def _row_amax(y, ROWS: tl.constexpr):
    """``max(1e-10, max |y|)`` over a tile's row (NaN-propagating), shaped as :func:`_row_sum`."""
    if ROWS == 1:
        return nan_amax(y, None, False)
    else:
        return tl.reduce(nan_amax(y, 2, True), 1, max_nan, keep_dims=True)


@triton.jit
def _tile(row0, M, N: tl.constexpr, ROWS: tl.constexpr, G0: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
          FULL: tl.constexpr = False):  # fmt: skip
    """Indices of the [ROWS, NG, GS] tile of groups [G0, G0 + NG): rows (int64), groups, columns, masks.

    FULL: the caller knows every row and column of the tile in bounds; the masks are then
    constants, which Triton drops (no predicates, no zero fills).
    """
    r = row0 + tl.arange(0, ROWS)[:, None, None]
    g = G0 + tl.arange(0, NG)[None, :, None]
    cols = g * GS + tl.arange(0, GS)[None, None, :]
    if FULL:
        return (r.to(tl.int64), g, cols, tl.full((ROWS, NG, GS), True, tl.int1),
                tl.full((ROWS, NG, 1), True, tl.int1), tl.full((ROWS, 1, 1), True, tl.int1))  # fmt: skip
    rmask = r < M
    return r.to(tl.int64), g, cols, rmask & (cols < N), rmask & (g * GS < N), rmask


@triton.jit
def _write_tile(
    x, y, rows, g, cols, mask, gmask, scale,
    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
    GS: tl.constexpr, Q_MODE: tl.constexpr, INV_FMAX: tl.constexpr, FP8_ENC: tl.constexpr,
    NATIVE_CAST: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """Store every output of one [R, NG, GS] tile: rows int64 [R,1,1], g [1,NG,1] group index,
    cols [1,NG,GS], gmask [R,NG,1] (whole groups in bounds); ``scale`` is the FP8 scale of
    Q_ROW / Q_TENSOR (computed by the caller); Q_GROUP and Q_MXFP4 take one per group here.

    Group maxima need no mask: masked lanes hold y = 0 (x and w load as 0) unless r is inf or
    NaN, and then every lane of the row is NaN too.
    """
    if RES_OUT_PTR is not None:
        tl.store(RES_OUT_PTR + rows * res_out_stride + cols, to_out(x, RES_OUT_PTR, NATIVE_CAST), mask=mask)
    if OUT_PTR is not None:
        tl.store(OUT_PTR + rows * out_stride + cols, to_out(y, OUT_PTR, NATIVE_CAST), mask=mask)
    if Q_MODE == Q_GROUP:
        gscale = nan_amax(y, 2, True) * INV_FMAX
        codes = fp8_codes(y, gscale, FP8_ENC)
        tl.store(QUANT_PTR + rows * quant_stride + cols, codes.to(QUANT_PTR.dtype.element_ty, bitcast=True), mask=mask)
        tl.store(SCALE_PTR + rows * scale_stride_m + g.to(tl.int64) * scale_stride_g, gscale, mask=gmask)
    elif Q_MODE == Q_ROW or Q_MODE == Q_TENSOR or Q_MODE == Q_TENSOR_ONE:
        codes = fp8_codes(y, scale, FP8_ENC)
        tl.store(QUANT_PTR + rows * quant_stride + cols, codes.to(QUANT_PTR.dtype.element_ty, bitcast=True), mask=mask)
    elif Q_MODE == Q_MXFP4:
        e, inv = e8m0(nan_amax(y, 2, True))
        c = e2m1_codes(y, e, inv, FMA)
        lo, hi = tl.split(tl.reshape(c, (c.shape[0], c.shape[1], GS // 2, 2)))
        # Stores of 4 bytes per thread: the layout the byte pairs come out of the split in (8
        # codes per thread). With the full contiguity Triton stored 8 and first moved every
        # byte through shared memory (MXFP4 at M = 65536 on the H200: 220 µs before this and
        # the other encoder changes, 115 µs after).
        half = g * (GS // 2) + tl.max_contiguous(tl.arange(0, GS // 2), 4)[None, None, :]
        tl.store(QUANT_PTR + rows * quant_stride + half, (lo | (hi << 4)).to(tl.uint8), mask=gmask)
        tl.store(SCALE_PTR + rows * scale_stride_m + g.to(tl.int64) * scale_stride_g, e.to(tl.uint8), mask=gmask)


@triton.jit
def _rows(
    row0, part, M, eps, scale,
    X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
    N: tl.constexpr, ROWS: tl.constexpr, NG: tl.constexpr, NT: tl.constexpr, GS: tl.constexpr,
    GEMMA: tl.constexpr, Q_MODE: tl.constexpr, INV_FMAX: tl.constexpr, FP8_ENC: tl.constexpr,
    NATIVE_CAST: tl.constexpr, FMA: tl.constexpr, W_FIRST: tl.constexpr, RELOAD: tl.constexpr,
    SPLIT: tl.constexpr, UNMASKED: tl.constexpr,
):  # fmt: skip
    """ROWS whole rows in registers as NT (1 to 3) tiles a, b, c of the same shape [ROWS, NG, GS].

    Tiles of one shape combine element by element, so the row's sum of squares (and amax) is a
    single reduction after every load is issued: one memory round trip per row.
    SPLIT: the program reads and reduces whole rows as above but writes tile ``part`` only (NT
    programs share a row, each quantizing a third of it: see the kernel's Q_SPLIT).
    UNMASKED: a block of one row whose tiles cover it exactly is loaded and stored without masks
    (the launcher gives every such block a row below M).
    Returns the rows' amax (a scalar, rows past M excluded) in Q_AMAX and Q_TENSOR_ONE modes, else 0.
    """
    FULL: tl.constexpr = UNMASKED and ROWS == 1 and NT * NG * GS == N
    rows, ga, cola, maska, gmaska, rmask = _tile(row0, M, N, ROWS, 0, NG, GS, FULL)
    if NT > 1:
        _, gb, colb, maskb, gmaskb, _ = _tile(row0, M, N, ROWS, NG, NG, GS, FULL)
    if NT > 2:
        _, gc, colc, maskc, gmaskc, _ = _tile(row0, M, N, ROWS, 2 * NG, NG, GS, FULL)
    # RELOAD, in the modes without a row-wide amax: x and the weights live across the reduction as
    # loaded (bf16 pairs, half the registers of their fp32 widening: more programs per SM) and are
    # widened again right before each tile's outputs are written.
    AGAIN: tl.constexpr = RELOAD and (Q_MODE == Q_NONE or Q_MODE == Q_GROUP or Q_MODE == Q_MXFP4)
    # The weights are loaded at the tile's full shape (repeats hit L1): a [1, NG, GS] load would
    # get a layout of its own and cost a shared-memory layout conversion of the whole tile.
    zero = (rows * 0).to(tl.int32)
    if W_FIRST:
        # ptxas issues the weight loads after the sum of squares has waited for x (two memory
        # round trips before the first store); loads are not moved across a barrier, so with
        # the weights requested first and a barrier between, both are in flight together.
        wa = _load_w(W_PTR, cola + zero, cola < N, GEMMA, AGAIN)
        if NT > 1:
            wb = _load_w(W_PTR, colb + zero, colb < N, GEMMA, AGAIN)
        if NT > 2:
            wc = _load_w(W_PTR, colc + zero, colc < N, GEMMA, AGAIN)
        tl.debug_barrier()
    qa, sa = _load_tile(X_PTR, x_stride, RES_PTR, res_stride, rows, cola, maska)
    xa = _widen_x(qa, sa, RES_PTR, False)
    if not W_FIRST:
        wa = _load_w(W_PTR, cola + zero, cola < N, GEMMA, AGAIN)
    ss = xa * xa
    if NT > 1:
        qb, sb = _load_tile(X_PTR, x_stride, RES_PTR, res_stride, rows, colb, maskb)
        xb = _widen_x(qb, sb, RES_PTR, False)
        if not W_FIRST:
            wb = _load_w(W_PTR, colb + zero, colb < N, GEMMA, AGAIN)
        ss += xb * xb
    if NT > 2:
        qc, sc = _load_tile(X_PTR, x_stride, RES_PTR, res_stride, rows, colc, maskc)
        xc = _widen_x(qc, sc, RES_PTR, False)
        if not W_FIRST:
            wc = _load_w(W_PTR, colc + zero, colc < N, GEMMA, AGAIN)
        ss += xc * xc
    rstd = _rstd(_row_sum(ss, ROWS), N, eps)
    amax = 0.0
    if not AGAIN:
        ya = (xa * rstd) * wa
        a = tl.abs(ya)
        if NT > 1:
            yb = (xb * rstd) * wb
            a = max_nan(a, tl.abs(yb))
        if NT > 2:
            yc = (xc * rstd) * wc
            a = max_nan(a, tl.abs(yc))
        if Q_MODE == Q_ROW or Q_MODE == Q_AMAX or Q_MODE == Q_TENSOR_ONE:
            amax = _row_amax(a, ROWS)
            if Q_MODE == Q_ROW:
                scale = amax * INV_FMAX
                tl.store(SCALE_PTR + rows * scale_stride_m, scale, mask=rmask & (part == 0))
            elif ROWS > 1:  # rows past M would add rsqrt(eps)-scaled zeros (NaN for eps = 0)
                amax = tl.reduce(tl.where(rmask, amax, 0.0), None, max_nan)
            if Q_MODE == Q_TENSOR_ONE:
                scale = amax * INV_FMAX
                tl.store(SCALE_PTR, scale)
    if Q_MODE != Q_AMAX:
        if not SPLIT or part == 0:
            if AGAIN:
                xa = _widen_x(qa, sa, RES_PTR, True)
                ya = (xa * rstd) * _widen_w(wa, GEMMA)
            _write_tile(
                xa, ya, rows, ga, cola, maska, gmaska, scale, OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
                QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
                GS, Q_MODE, INV_FMAX, FP8_ENC, NATIVE_CAST, FMA,
            )  # fmt: skip
        if NT > 1:
            if not SPLIT or part == 1:
                if AGAIN:
                    xb = _widen_x(qb, sb, RES_PTR, True)
                    yb = (xb * rstd) * _widen_w(wb, GEMMA)
                _write_tile(
                    xb, yb, rows, gb, colb, maskb, gmaskb, scale, OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
                    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
                    GS, Q_MODE, INV_FMAX, FP8_ENC, NATIVE_CAST, FMA,
                )  # fmt: skip
        if NT > 2:
            if not SPLIT or part == 2:
                if AGAIN:
                    xc = _widen_x(qc, sc, RES_PTR, True)
                    yc = (xc * rstd) * _widen_w(wc, GEMMA)
                _write_tile(
                    xc, yc, rows, gc, colc, maskc, gmaskc, scale, OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
                    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
                    GS, Q_MODE, INV_FMAX, FP8_ENC, NATIVE_CAST, FMA,
                )  # fmt: skip
    return amax


@triton.jit
def _row_chunked(
    row, eps, scale,
    X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
    N: tl.constexpr, SPAN: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
    GEMMA: tl.constexpr, Q_MODE: tl.constexpr, INV_FMAX: tl.constexpr, FP8_ENC: tl.constexpr,
    NATIVE_CAST: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """One row wider than a tile, in chunks of NG*GS columns.

    A sum-of-squares pass, then for each span of SPAN columns (Q_ROW: first a pass for the
    span's amax) a pass that writes each chunk right after reading it: every element is read
    before anything of its own columns is written, so the in-place forms stay correct.
    Returns the row's amax (Q_AMAX), else 0.
    """
    CH: tl.constexpr = NG * GS
    g = tl.arange(0, NG)[None, :, None]
    cols0 = g * GS + tl.arange(0, GS)[None, None, :]
    rows = row.to(tl.int64) + tl.zeros((1, 1, 1), tl.int64)
    acc = tl.zeros((1, NG, GS), tl.float32)
    for c in range(0, N, CH):
        cols = c + cols0
        x = _load_x(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, cols < N)
        acc += x * x
    rstd = _rstd(tl.sum(acc), N, eps)
    amax = 0.0
    for s in range(0, N, SPAN):
        end = tl.minimum(s + SPAN, N)  # masks only: loop bounds stay Python ints under the interpreter
        span_scale = scale
        if Q_MODE == Q_ROW or Q_MODE == Q_AMAX:
            m = tl.zeros((1, NG, GS), tl.float32)
            for c in range(s, s + SPAN, CH):
                cols = c + cols0
                mask = cols < end
                x = _load_x(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, mask)
                m = max_nan(m, tl.abs((x * rstd) * _load_w(W_PTR, cols, mask, GEMMA)))
            span_amax = nan_amax(m, None, False)
            amax = max_nan(amax, span_amax)
            if Q_MODE == Q_ROW:
                span_scale = span_amax * INV_FMAX
                tl.store(SCALE_PTR + row.to(tl.int64) * scale_stride_m + tl.cast(s // SPAN, tl.int64) * scale_stride_g,
                         span_scale)  # fmt: skip
        if Q_MODE != Q_AMAX:
            for c in range(s, s + SPAN, CH):
                cols = c + cols0
                mask = cols < end
                x = _load_x(X_PTR, x_stride, RES_PTR, res_stride, rows, cols, mask)
                y = (x * rstd) * _load_w(W_PTR, cols, mask, GEMMA)
                _write_tile(
                    x, y, rows, (c // GS) + g, cols, mask, (c + g * GS) < end, span_scale,
                    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
                    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
                    GS, Q_MODE, INV_FMAX, FP8_ENC, NATIVE_CAST, FMA,
                )  # fmt: skip
    return amax


@triton.jit
def _rows_words(
    row, M, eps, X_PTR, x_stride, W_PTR, OUT_PTR, out_stride,
    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
    N: tl.constexpr, NG: tl.constexpr, NT: tl.constexpr, GS: tl.constexpr,
    GEMMA: tl.constexpr, NATIVE_CAST: tl.constexpr, FMA: tl.constexpr, W_FIRST: tl.constexpr,
):  # fmt: skip
    """One bf16 MXFP4 row read as 32-bit words: NT tiles of [1, NG, GS / 2] words, each word the
    bf16 pair (2i, 2i + 1) of a group; the launcher passes 4-byte aligned rows and weights, and
    tiles that cover the row exactly (the kernel's WORDS).

    A word is widened by one integer instruction per half: ``w << 16`` (element 2i) and ``w &
    0xFFFF0000`` (2i + 1), where the compiler's conversion of a bf16 pair takes a byte permute
    and a shift for the high half; and the two codes of a byte come out of the same word. The
    words live across the reduction as loaded and are widened again after it through forms the
    compiler cannot merge with the first (see :func:`_words_out`). The sum of squares is reduced
    over the halves joined back into [1, NG, GS] tiles, as :func:`_rows` reduces its tiles: the
    same bits in the interpreter; compiled, the reduction's order may differ, and r with it by an
    ulp in a few rows of thousands (H200: a handful of code bytes in 16384 rows), as between the
    decode and prefill layouts of MXFP4 rows. DeepSeek's MXFP4 program (sm_90): 1232
    instructions against 1392 held as bf16 tiles (1256 capped at 64 registers).
    """
    HW: tl.constexpr = GS // 2
    TW: tl.constexpr = NG * HW  # words per tile
    XW = X_PTR.to(tl.pointer_type(tl.uint32), bitcast=True) + row.to(tl.int64) * (x_stride // 2)
    WW = W_PTR.to(tl.pointer_type(tl.uint32), bitcast=True)
    g = tl.arange(0, NG)[None, :, None]
    h = g * HW + tl.arange(0, HW)[None, None, :]
    if W_FIRST:  # see _rows
        wa = tl.load(WW + h)
        if NT > 1:
            wb = tl.load(WW + TW + h)
        if NT > 2:
            wc = tl.load(WW + 2 * TW + h)
        tl.debug_barrier()
    qa = tl.load(XW + h)
    lo, hi = _halves(qa)
    sl, sh = lo * lo, hi * hi
    if NT > 1:
        qb = tl.load(XW + TW + h)
        lo, hi = _halves(qb)
        sl += lo * lo
        sh += hi * hi
    if NT > 2:
        qc = tl.load(XW + 2 * TW + h)
        lo, hi = _halves(qc)
        sl += lo * lo
        sh += hi * hi
    if not W_FIRST:
        wa = tl.load(WW + h)
        if NT > 1:
            wb = tl.load(WW + TW + h)
        if NT > 2:
            wc = tl.load(WW + 2 * TW + h)
    rstd = _rstd(_row_sum(tl.reshape(tl.join(sl, sh), (1, NG, GS)), 1), N, eps)
    z = (M >> 31).to(tl.uint32)  # 0 (the launcher passes M < 2^31), a value the compiler cannot see through
    row64 = row.to(tl.int64)
    _words_out(qa, wa, rstd, z, row64, g, h, 0, OUT_PTR, out_stride, QUANT_PTR, quant_stride, SCALE_PTR,
               scale_stride_m, scale_stride_g, NG, GS, GEMMA, NATIVE_CAST, FMA)  # fmt: skip
    if NT > 1:
        _words_out(qb, wb, rstd, z, row64, g, h, 1, OUT_PTR, out_stride, QUANT_PTR, quant_stride, SCALE_PTR,
                   scale_stride_m, scale_stride_g, NG, GS, GEMMA, NATIVE_CAST, FMA)  # fmt: skip
    if NT > 2:
        _words_out(qc, wc, rstd, z, row64, g, h, 2, OUT_PTR, out_stride, QUANT_PTR, quant_stride, SCALE_PTR,
                   scale_stride_m, scale_stride_g, NG, GS, GEMMA, NATIVE_CAST, FMA)  # fmt: skip


@triton.jit
def _halves(w):
    """fp32 of the bf16 pair in 32-bit words ``w``: (element 2i, element 2i + 1)."""
    return (w << 16).to(tl.float32, bitcast=True), (w & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _words_out(
    q, w, rstd, z, row, g, h, T: tl.constexpr, OUT_PTR, out_stride, QUANT_PTR, quant_stride, SCALE_PTR,
    scale_stride_m, scale_stride_g, NG: tl.constexpr, GS: tl.constexpr, GEMMA: tl.constexpr,
    NATIVE_CAST: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """Outputs of tile ``T`` of :func:`_rows_words`: E2M1 bytes and E8M0 scales (and rnd(y)).

    x is widened again as ``q * (65536 + z)`` and ``(q | z) & 0xFFFF0000``, with ``z`` a zero
    the compiler cannot see through: one instruction per half, and no expression it would share
    with the first widening (which would keep that fp32 tile live across the reduction).
    """
    HW: tl.constexpr = GS // 2
    lo = (q * (z + 65536)).to(tl.float32, bitcast=True)
    hi = ((q | z) & 0xFFFF0000).to(tl.float32, bitcast=True)
    wl, wh = _halves(w)
    if GEMMA:
        wl, wh = wl + 1.0, wh + 1.0
    yl = (lo * rstd) * wl
    yh = (hi * rstd) * wh
    if OUT_PTR is not None:
        cols = T * NG * GS + g * GS + tl.arange(0, GS)[None, None, :]
        y = tl.reshape(tl.join(yl, yh), (1, NG, GS))
        tl.store(OUT_PTR + row * out_stride + cols, to_out(y, OUT_PTR, NATIVE_CAST))
    e, inv = e8m0(max_nan(nan_amax(yl, 2, True), nan_amax(yh, 2, True)))
    codes = e2m1_codes(yl, e, inv, FMA) | (e2m1_codes(yh, e, inv, FMA) << 4)
    tl.store(QUANT_PTR + row * quant_stride + T * NG * HW + h, codes.to(tl.uint8))
    tl.store(SCALE_PTR + row * scale_stride_m + (T * NG + g).to(tl.int64) * scale_stride_g, e.to(tl.uint8))


@triton.jit
def _q_block(
    blk, part, M, eps, scale,
    X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
    OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
    QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
    N: tl.constexpr, ROWS: tl.constexpr, NG: tl.constexpr, NT: tl.constexpr, GS: tl.constexpr,
    CHUNKED: tl.constexpr, SPAN: tl.constexpr, GEMMA: tl.constexpr, Q_MODE: tl.constexpr,
    INV_FMAX: tl.constexpr, FP8_ENC: tl.constexpr, NATIVE_CAST: tl.constexpr, FMA: tl.constexpr,
    W_FIRST: tl.constexpr, RELOAD: tl.constexpr, SPLIT: tl.constexpr, UNMASKED: tl.constexpr,
):  # fmt: skip
    """q row block ``blk``: ROWS whole rows, or (CHUNKED) row ``blk`` in chunks of NG groups;
    with SPLIT, tile ``part`` of them only (:func:`_rows`).

    Returns the block's amax in Q_AMAX mode, else 0.
    """
    if CHUNKED:
        return _row_chunked(
            blk, eps, scale, X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
            OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
            QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
            N, SPAN, NG, GS, GEMMA, Q_MODE, INV_FMAX, FP8_ENC, NATIVE_CAST, FMA,
        )  # fmt: skip
    else:
        return _rows(
            blk * ROWS, part, M, eps, scale, X_PTR, x_stride, RES_PTR, res_stride, W_PTR,
            OUT_PTR, out_stride, RES_OUT_PTR, res_out_stride,
            QUANT_PTR, quant_stride, SCALE_PTR, scale_stride_m, scale_stride_g,
            N, ROWS, NG, NT, GS, GEMMA, Q_MODE, INV_FMAX, FP8_ENC, NATIVE_CAST, FMA, W_FIRST, RELOAD, SPLIT,
            UNMASKED,
        )  # fmt: skip


@triton.jit
def _k_block(
    blk, M, eps, K_PTR, k_stride, K_W_PTR, K_OUT_PTR, k_out_stride,
    N: tl.constexpr, ROWS: tl.constexpr, NG: tl.constexpr, NT: tl.constexpr, GS: tl.constexpr,
    CHUNKED: tl.constexpr, GEMMA: tl.constexpr, NATIVE_CAST: tl.constexpr, FMA: tl.constexpr,
    W_FIRST: tl.constexpr, UNMASKED: tl.constexpr,
):  # fmt: skip
    """k row block ``blk``: the plain norm into k_out (no residual, never quantized)."""
    if CHUNKED:
        _row_chunked(
            blk, eps, 0.0, K_PTR, k_stride, None, None, K_W_PTR, K_OUT_PTR, k_out_stride, None, None,
            None, None, None, None, None, N, N, NG, GS, GEMMA, Q_NONE, 1.0, 0, NATIVE_CAST, FMA,
        )  # fmt: skip
    else:
        _rows(
            blk * ROWS, 0, M, eps, 0.0, K_PTR, k_stride, None, None, K_W_PTR, K_OUT_PTR, k_out_stride, None, None,
            None, None, None, None, None, N, ROWS, NG, NT, GS, GEMMA, Q_NONE, 1.0, 0, NATIVE_CAST, FMA, W_FIRST, False,
            False, UNMASKED,
        )  # fmt: skip


@triton.jit
def _k_early_loads(blk, M, K_PTR, k_stride, K_W_PTR, N: tl.constexpr, ROWS: tl.constexpr, NG: tl.constexpr,
                   GS: tl.constexpr):  # fmt: skip
    """K_EARLY: k row block ``blk`` (one tile) and its weights as loaded, requested before the q
    rows' work; :func:`_k_early_finish` normalizes them after it."""
    rows, _, cols, mask, _, _ = _tile(blk * ROWS, M, N, ROWS, 0, NG, GS)
    w = tl.load(K_W_PTR + cols + (rows * 0).to(tl.int32), mask=cols < N, other=0.0)
    x = tl.load(K_PTR + rows * k_stride + cols, mask=mask, other=0.0)
    return x, w, rows, cols, mask


@triton.jit
def _k_early_finish(x, w, rows, cols, mask, eps, K_OUT_PTR, k_out_stride, N: tl.constexpr, ROWS: tl.constexpr,
                    GEMMA: tl.constexpr, NATIVE_CAST: tl.constexpr):  # fmt: skip
    """The plain norm of :func:`_k_early_loads`'s tile into k_out: the arithmetic of :func:`_rows`
    on one tile, in the same order (the same bits)."""
    x = to_f32(x)
    rstd = _rstd(_row_sum(x * x, ROWS), N, eps)
    tl.store(K_OUT_PTR + rows * k_out_stride + cols, to_out((x * rstd) * _widen_w(w, GEMMA), K_OUT_PTR, NATIVE_CAST),
             mask=mask)  # fmt: skip


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """First statement of a kernel that may be launched with programmatic dependent launch
    (``PDL``: triton_launch.PDL_OFF, PDL_TRIGGER or PDL_WAIT).

    Launched so, a kernel may run while the previous kernel in the stream still does: nothing is
    read or written before that kernel has completed (``griddepcontrol.wait``). With PDL_TRIGGER
    the next kernel may then be launched too, to wait in its turn. Off, nothing is compiled.
    """
    if PDL:
        gdc_wait()
        if PDL == 1:  # PDL_TRIGGER
            gdc_launch_dependents()


# ----------------------------------------------------------------------------- the kernel


@triton.jit(do_not_specialize=["M", "q_programs", "amax_count"])
def _qk_rmsnorm_kernel(
    Q_PTR, q_stride,  # q [M, N1], fp16/bf16, unit column stride
    Q_RES_PTR, q_res_stride,  # q_residual [M, N1], or None
    Q_W_PTR,  # q_weight [N1]
    Q_OUT_PTR, q_out_stride,  # normalized q [M, N1], or None
    Q_RES_OUT_PTR, q_res_out_stride,  # rnd(q + q_residual) [M, N1] (with Q_RES_PTR), or None
    Q_QUANT_PTR, q_quant_stride,  # FP8 codes [M, N1] (uint8 for e4m3fnuz) or MXFP4 bytes [M, N1/2], or None
    Q_SCALE_PTR, q_scale_stride_m, q_scale_stride_g,  # scales: fp32 (FP8) or uint8 (E8M0), or None
    K_PTR, k_stride,  # k [M, N2], or None
    K_W_PTR,  # k_weight [N2], or None
    K_OUT_PTR, k_out_stride,  # normalized k [M, N2], or None
    AMAX_PTR, amax_count,  # per-tensor: fp32 amax partials, one per program of the Q_AMAX launch; or None
    M,  # rows
    q_eps, k_eps,  # fp32 epsilons
    q_programs,  # programs owning q row blocks (the rest of the grid owns k row blocks)
    N1: tl.constexpr, N2: tl.constexpr,  # q width, k width
    Q_ROWS: tl.constexpr, Q_NG: tl.constexpr, Q_NT: tl.constexpr, Q_GS: tl.constexpr,  # Q_NT tiles [Q_ROWS, Q_NG, Q_GS]
    Q_CHUNKED: tl.constexpr,  # q rows wider than a tile: one row per program, in chunks of Q_NG groups
    Q_SPAN: tl.constexpr,  # chunked q rows: columns sharing one scale (Q_ROW), else N1
    K_ROWS: tl.constexpr, K_NG: tl.constexpr, K_NT: tl.constexpr, K_GS: tl.constexpr,  # k tiles, likewise
    K_CHUNKED: tl.constexpr,
    K_WITH_Q: tl.constexpr,  # q program p also normalizes k row block p (K_ROWS == Q_ROWS), but for a tail past them
    GEMMA: tl.constexpr,
    Q_MODE: tl.constexpr,  # one of Q_NONE .. Q_TENSOR_ONE
    INV_FMAX: tl.constexpr,  # fl32(1/FMAX) of the FP8 flavour
    FP8_ENC: tl.constexpr,  # how FP8 bytes are made (triton_quant_kernels.FP8_*)
    AMAX_BLOCK: tl.constexpr,  # Q_TENSOR: power of two >= amax_count
    NATIVE_CAST: tl.constexpr,  # hardware RNE fp32 -> bf16 usable
    FMA: tl.constexpr,  # fused multiply-add (compiled code; the interpreter rounds the product)
    W_FIRST: tl.constexpr,  # weights requested before x, behind a barrier (see _rows)
    RELOAD: tl.constexpr,  # q rows (groups or no quantization): x and w held as loaded, widened again after the reduction (see _rows)
    K_EARLY: tl.constexpr,  # K_WITH_Q, k rows of one tile: k's loads requested before the q rows' work
    Q_SPLIT: tl.constexpr,  # Q_NT programs per q row block, each writing one tile (q_programs counts them all)
    PDL: tl.constexpr,  # programmatic dependent launch (NVIDIA sm_90+): triton_launch.PDL_OFF, _TRIGGER or _WAIT
    ONE_ROW: tl.constexpr,  # M is 1: the row and program counts are compile-time values (the M and q_programs passed agree)
    UNMASKED: tl.constexpr,  # blocks of one row covered exactly by their tiles: no masks (every such block's row is below M)
    WORDS: tl.constexpr,  # UNMASKED bf16 MXFP4 q rows, 4-byte aligned, no residual: read as 32-bit words (_rows_words)
):  # fmt: skip
    """Fused RMSNorm of q and k rows, optionally quantizing q (SPEC §4).

    Per row: ``x = q (+ res)``, ``r = rsqrt(sum(x^2)/n + eps)``, ``y = (x*r)*w``; outputs
    ``rnd(x)`` (residual), ``rnd(y)`` (q_out / k_out), and q's FP8 codes with
    ``scale = max(1e-10, amax) * fl32(1/FMAX)`` or MXFP4 nibbles with an E8M0 exponent.
    Per-tensor FP8 is two launches: Q_AMAX writes each program's amax to AMAX_PTR, then
    Q_TENSOR reduces those partials in every program (program 0 stores the scale) and walks
    q's row blocks from the last to the first; or, for a few rows, one launch whose one q
    program holds them all (Q_TENSOR_ONE).
    """
    pdl_prologue(PDL)
    if ONE_ROW:
        # Known at compile time, the counts need no read of the parameter bank before
        # a program can tell whether it owns q or k and request its first bytes.
        M = 1
        if Q_SPLIT:
            q_programs = Q_NT
        else:
            q_programs = 1
    pid = tl.program_id(0)
    if pid < q_programs:
        if Q_MODE == Q_AMAX:  # a capped grid: each program folds several row blocks into one partial
            amax = 0.0
            blk = pid
            while blk < (M if Q_CHUNKED else tl.cdiv(M, Q_ROWS)):
                amax = max_nan(amax, _q_block(
                    blk, 0, M, q_eps, 0.0, Q_PTR, q_stride, Q_RES_PTR, q_res_stride, Q_W_PTR,
                    None, None, None, None, None, None, None, None, None,
                    N1, Q_ROWS, Q_NG, Q_NT, Q_GS, Q_CHUNKED, Q_SPAN, GEMMA, Q_MODE,
                    INV_FMAX, FP8_ENC, NATIVE_CAST, FMA, W_FIRST, False, False, UNMASKED,
                ))  # fmt: skip
                blk += q_programs
            tl.store(AMAX_PTR + pid, amax)
        else:
            scale = 0.0
            blk, part = pid, 0
            if Q_SPLIT:
                # The Q_NT programs of a row block reduce the whole rows in the same order as one
                # program does (the same bits), and each writes its own tile: a third of the
                # encoding work per program.
                blk, part = pid // Q_NT, pid % Q_NT
            if Q_MODE == Q_TENSOR:
                p = tl.arange(0, AMAX_BLOCK)
                amax = tl.reduce(tl.load(AMAX_PTR + p, mask=p < amax_count, other=0.0), None, max_nan)
                scale = amax * INV_FMAX
                if pid == 0:
                    tl.store(Q_SCALE_PTR, scale)
                # The amax launch reads q's row blocks in rising order, so its last reads (up to
                # the L2's 60 MiB on the H200) are the highest blocks: the first programs here
                # take those and find them in L2.
                blk = q_programs - 1 - pid
            # K_EARLY: the k row's loads go out first, so that the program waits for memory once
            # and not again between its q row's work and its k row's.
            EARLY: tl.constexpr = K_EARLY and K_WITH_Q and not K_CHUNKED and K_NT == 1
            if EARLY:
                kx, kw, krows, kcols, kmask = _k_early_loads(blk, M, K_PTR, k_stride, K_W_PTR, N2, K_ROWS, K_NG, K_GS)
            if WORDS:
                _rows_words(
                    blk, M, q_eps, Q_PTR, q_stride, Q_W_PTR, Q_OUT_PTR, q_out_stride,
                    Q_QUANT_PTR, q_quant_stride, Q_SCALE_PTR, q_scale_stride_m, q_scale_stride_g,
                    N1, Q_NG, Q_NT, Q_GS, GEMMA, NATIVE_CAST, FMA, W_FIRST,
                )  # fmt: skip
            else:
                _q_block(
                    blk, part, M, q_eps, scale, Q_PTR, q_stride, Q_RES_PTR, q_res_stride, Q_W_PTR,
                    Q_OUT_PTR, q_out_stride, Q_RES_OUT_PTR, q_res_out_stride,
                    Q_QUANT_PTR, q_quant_stride, Q_SCALE_PTR, q_scale_stride_m, q_scale_stride_g,
                    N1, Q_ROWS, Q_NG, Q_NT, Q_GS, Q_CHUNKED, Q_SPAN, GEMMA, Q_MODE,
                    INV_FMAX, FP8_ENC, NATIVE_CAST, FMA, W_FIRST, RELOAD, Q_SPLIT, UNMASKED,
                )  # fmt: skip
            if EARLY:
                _k_early_finish(kx, kw, krows, kcols, kmask, k_eps, K_OUT_PTR, k_out_stride, N2, K_ROWS, GEMMA, NATIVE_CAST)
            elif K_WITH_Q:
                # The last k row blocks may have programs of their own past the q programs (the
                # grid says how many: see the backend's k tail); the q programs keep the others
                # (with Q_SPLIT, the first program of each row block).
                if blk < tl.cdiv(M, K_ROWS) - (tl.num_programs(0) - q_programs) and (not Q_SPLIT or part == 0):
                    _k_block(
                        blk, M, k_eps, K_PTR, k_stride, K_W_PTR, K_OUT_PTR, k_out_stride,
                        N2, K_ROWS, K_NG, K_NT, K_GS, K_CHUNKED, GEMMA, NATIVE_CAST, FMA, W_FIRST, UNMASKED,
                    )  # fmt: skip
    elif K_PTR is not None:
        # k row blocks in programs of their own: all of them, or with K_WITH_Q the last ones
        _k_block(
            pid - (tl.num_programs(0) - tl.cdiv(M, K_ROWS) if K_WITH_Q else q_programs), M, k_eps, K_PTR, k_stride,
            K_W_PTR, K_OUT_PTR, k_out_stride, N2, K_ROWS, K_NG, K_NT, K_GS, K_CHUNKED, GEMMA, NATIVE_CAST, FMA, W_FIRST,
            UNMASKED,
        )  # fmt: skip
