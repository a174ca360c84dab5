"""Triton kernel of ``qk_norm_rope`` (SPEC_ROPE_CACHE §3): ``@triton.jit`` code only.

One launch does everything: programs ``[0, k_programs)`` own blocks of ``ROWS_K`` k rows, the
rest own blocks of ``ROWS_Q`` q rows, where a row is one (token, head) pair (row ``r`` is token
``r // H``, head ``r % H``), so any head count and any token and head strides are served by the
same code. A k program also copies (or quantizes) the matching v rows and writes k and v into
the paged cache: it has the longest chain of work, so k programs take the lowest program ids
and are scheduled first. Where the rows per program divide the head count (``ONE_Q`` / ``ONE_K``,
the usual case) a block is heads of one token, so its position, table row and slot are scalars
loaded once per thread. The launcher (``triton_launch.py``) chooses every compile-time knob.

A head's D channels are held as three tiles of register columns: the first element of each
rotation pair (``[HALF_P]``, channel ``i`` for neox, ``2i`` for GPT-J), the second one
(``i + R/2`` or ``2i + 1``), and the pass-through channels ``[R, D)`` (``[PASS_P]``; all of
them without a rotation). RoPE then is elementwise between the first two tiles.

Numerics as :mod:`qknorm.rope.reference`: fp32 throughout; ``r = rsqrt(sum(x^2) * fl32(1/D) +
eps)`` (within ~2 ulp of r, as §3 allows); ``u = f(rnd((x * r) * w))``; ``z = (a*c - b*s,
b*c + a*s)``, compiled as ``fma(a, c, -(b*s))`` and ``fma(b, c, a*s)`` (§3 allows fused
multiply-adds; the interpreter rounds both products); outputs ``rnd(z)``. FP8
values ``fp8_rne(clamp(f(rnd(z)) / scale, +-FMAX))`` with a correctly rounded division; scales
are loaded from device memory by every program (CUDA-graph safe). The fp32 -> bf16 / FP8
encoders are the first operator's (exact software paths where the target has no native RNE).

Index safety (§3 rule 6): a position outside ``[0, max_pos)`` loads no table row and rotates
by zero (cos 1, sin 0); a slot outside ``[0, num_slots)`` writes no cache entry. Every
address is a 64-bit pointer; element offsets are int64, or int32 (``OFF32``) where the launcher
has checked that the largest offset of every tensor of the call fits (fewer instructions: 32-bit
multiplies and adds, a sign-extending add to the pointer).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..backends.triton_kernels import pdl_prologue
from ..backends.triton_quant_kernels import fp8_code, quotient, to_f32, to_out


@triton.jit
def _rnd(x, PTR, NATIVE: tl.constexpr):
    """``f(rnd(x))``: round fp32 to PTR's element type (fp16/bf16) with RNE and back to fp32."""
    return to_out(x, PTR, NATIVE).to(tl.float32)


@triton.jit
def _fp8(x, scale, FMAX: tl.constexpr, FNUZ: tl.constexpr, NATIVE: tl.constexpr, FMA: tl.constexpr):
    """FP8 byte of ``clamp(x / scale, -FMAX, FMAX)``, RNE; ``scale`` broadcasts against ``x``."""
    v = quotient(x, scale, FMA)
    v = tl.where(v > FMAX, FMAX, tl.where(v < -FMAX, -FMAX, v))
    return fp8_code(v, FNUZ, NATIVE and not FNUZ)


@triton.jit
def _load_w(W_PTR, idx, mask, GEMMA: tl.constexpr):
    """``w = f(weight)``, ``+ 1.0`` in fp32 for gemma; 1 without a weight (``W_PTR`` None)."""
    if W_PTR is None:
        return 1.0
    else:
        w = to_f32(tl.load(W_PTR + idx, mask=mask, other=0.0))
        if GEMMA:
            w = w + 1.0
        return w


@triton.jit
def _table_rows(POS_PTR, t, rmask, max_pos, cos_sin_stride, ROT: tl.constexpr, ONE: tl.constexpr,
                OFF32: tl.constexpr):  # fmt: skip
    """Offsets ``[R, 1]`` of each row's table row and whether its position is valid (scalars
    when the block is one token's, ``ONE``); int32 with ``OFF32``, else int64.

    Issued first in every program: the cos/sin loads wait for it (two dependent round trips).
    """
    ity: tl.constexpr = tl.int32 if OFF32 else tl.int64
    if ROT > 0:
        if ONE:
            p = tl.load(POS_PTR + t).to(tl.int64)
            p_ok = (p >= 0) & (p < max_pos)
            return tl.where(p_ok, p, 0).to(ity) * cos_sin_stride, p_ok
        else:
            p = tl.load(POS_PTR + t, mask=rmask, other=0).to(tl.int64)
            p_ok = (p >= 0) & (p < max_pos)
            return tl.where(p_ok, p, 0).to(ity)[:, None] * cos_sin_stride, p_ok[:, None]
    else:
        return (rmask * 0).to(ity)[:, None], rmask[:, None] & False


@triton.jit
def _weights_and_table(W_PTR, COS_SIN_PTR, row, p_ok, half, i1, i2, j, m1, mp, zero,
                       ROT: tl.constexpr, GEMMA: tl.constexpr):  # fmt: skip
    """``(wp, w1, w2, c, s)``: the weights at the three channel tiles and each row's cos/sin.

    ``row`` / ``p_ok`` are ``[R, 1]``, or scalars when the block is one token's.
    """
    # Loaded at the tile's full shape (``+ zero``; repeats hit L1): a [1, N] load would get a
    # layout of its own, and where a thread holds several rows of the tile the broadcast then
    # costs a shared-memory layout conversion (sm_90 SASS of 16 rows over 2 warps: 22 barriers).
    wp = _load_w(W_PTR, j + zero, mp, GEMMA)
    if ROT > 0:
        w1 = _load_w(W_PTR, i1 + zero, m1, GEMMA)
        w2 = _load_w(W_PTR, i2 + zero, m1, GEMMA)
        cmask = m1 & p_ok
        c = to_f32(tl.load(COS_SIN_PTR + row + half + zero, mask=cmask, other=1.0))
        s = to_f32(tl.load(COS_SIN_PTR + row + ROT // 2 + half + zero, mask=cmask, other=0.0))
        return wp, w1, w2, c, s
    else:
        return wp, 1.0, 1.0, 1.0, 0.0


@triton.jit
def _block_rows(pid, T, H: tl.constexpr, ROWS: tl.constexpr, ONE: tl.constexpr, ROW_MASK: tl.constexpr):
    """``(t, h, rmask)`` of block ``pid``'s rows (row ``r`` is token ``r // H``, head ``r % H``).

    ``ONE`` (ROWS divides H): the block is ROWS heads of one token, and ``t`` a scalar, so that
    what depends on the token alone (position, table row, slot) is loaded once per thread. Such
    a block never reaches past the last token (the launch has ``T * H / ROWS`` of them): without
    ``ROW_MASK`` its mask is a constant and its loads and stores go unpredicated; with it the mask
    is computed anyway, which measured faster at decode sizes (``triton_launch``). ``pid`` is
    split unsigned (it is never negative): a shift and a mask where a signed split needs sign fixes.
    """
    if ONE:
        first = pid.to(tl.uint32) * ROWS
        t = (first // H).to(tl.int32)
        h = (first % H).to(tl.int32) + tl.arange(0, ROWS)
        if ROW_MASK:
            return t, h, (h * 0 + t) < T
        else:
            return t, h, tl.full([ROWS], 1, tl.int1)
    else:
        rows = pid * ROWS + tl.arange(0, ROWS)
        return rows // H, rows % H, rows < T * H


@triton.jit
def _row_offsets(t, h, stride_t, stride_h, ONE: tl.constexpr, OFF32: tl.constexpr):
    """``[R, 1]`` offsets ``t * stride_t + h * stride_h`` (``t`` a scalar with ``ONE``), int64, or
    int32 with ``OFF32`` (the launcher's promise that every offset of the call fits)."""
    ity: tl.constexpr = tl.int32 if OFF32 else tl.int64
    if ONE:
        return t.to(ity) * stride_t + h.to(ity)[:, None] * stride_h
    else:
        return (t.to(ity) * stride_t)[:, None] + h.to(ity)[:, None] * stride_h


@triton.jit
def _norm_rope_rows(
    X_PTR, W_PTR, t, h, rmask, stride_t, stride_h, eps, COS_SIN_PTR, row, p_ok,
    D: tl.constexpr, ROT: tl.constexpr, HALF_P: tl.constexpr, PASS_P: tl.constexpr,
    IS_NEOX: tl.constexpr, GEMMA: tl.constexpr, NATIVE: tl.constexpr, EARLY_LOADS: tl.constexpr,
    FMA: tl.constexpr, ONE: tl.constexpr, OFF32: tl.constexpr,
):  # fmt: skip
    """Rules 1-3 for a block of rows: returns fp32 ``(z1, z2, zp, i1, i2, j, m1, mp)``.

    ``z1``/``z2`` ``[R, HALF_P]`` are the rotated pair elements at channels ``i1``/``i2``, ``zp``
    ``[R, PASS_P]`` the pass-through channels ``j``; ``m1``/``mp`` their masks. Values are
    already representable in the input dtype (``f(rnd(z))``). ``row``/``p_ok`` come from
    :func:`_table_rows`; with ``ONE`` ``t`` is the block's one token (a scalar). With EARLY_LOADS
    the weights and cos/sin come before the norm's reduction in program order, else after it
    (fewer registers live across it: more programs per SM). Program order is not issue order:
    in the sm_90 SASS of the decode configuration (8 rows, 4 warps, each row's reduction within
    a warp) ptxas issues the weight and table loads after the reduction either way, but the two
    schedules differ and EARLY_LOADS measured faster at decode sizes. Requesting the weights
    (and a k program's v rows) first behind a barrier, as the first operator's kernel does,
    made them slower (H200: T = 1 1.42 -> 1.50 µs, T = 256 with an FP8 cache 2.63 -> 2.93).
    """
    base = _row_offsets(t, h, stride_t, stride_h, ONE, OFF32)
    half = tl.arange(0, HALF_P)[None, :]
    if IS_NEOX:
        i1, i2 = half, half + ROT // 2
    else:
        i1, i2 = 2 * half, 2 * half + 1
    m1 = rmask[:, None] & (half < ROT // 2)
    j = ROT + tl.arange(0, PASS_P)[None, :]
    mp = rmask[:, None] & (j < D)
    zero = (h * 0)[:, None]
    # Widened by their bits (to_f32): one integer instruction per bf16 element.
    xp = to_f32(tl.load(X_PTR + base + j, mask=mp, other=0.0))
    if ROT > 0:
        x1 = to_f32(tl.load(X_PTR + base + i1, mask=m1, other=0.0))
        x2 = to_f32(tl.load(X_PTR + base + i2, mask=m1, other=0.0))
    if EARLY_LOADS:
        wp, w1, w2, c, s = _weights_and_table(W_PTR, COS_SIN_PTR, row, p_ok, half, i1, i2, j, m1, mp, zero, ROT, GEMMA)
    # Without pass-through channels (R = D) the pass tile is all masked: left out of the sum, which
    # would otherwise start from a 0 + the compiler may not fold (-0.0 + 0 is +0).
    if ROT == 0:
        sumsq = tl.sum(xp * xp, axis=1)
    elif ROT == D:
        sumsq = tl.sum(x1 * x1 + x2 * x2, axis=1)
    else:
        sumsq = tl.sum(xp * xp, axis=1) + tl.sum(x1 * x1 + x2 * x2, axis=1)
    r = tl.rsqrt(sumsq * (1.0 / D) + eps)[:, None]
    if not EARLY_LOADS:
        wp, w1, w2, c, s = _weights_and_table(W_PTR, COS_SIN_PTR, row, p_ok, half, i1, i2, j, m1, mp, zero, ROT, GEMMA)
    zp = _rnd((xp * r) * wp, X_PTR, NATIVE)
    if ROT > 0:
        u1 = _rnd((x1 * r) * w1, X_PTR, NATIVE)
        u2 = _rnd((x2 * r) * w2, X_PTR, NATIVE)
        if FMA:
            # The first product fused, written out: left to the compiler, which of the two it
            # fused changed with the order of unrelated loads and with the launch configuration
            # (1-ulp changes in a few elements).
            z1 = _rnd(tl.fma(u1, c, (u2 * s) * -1.0), X_PTR, NATIVE)
            z2 = _rnd(tl.fma(u2, c, u1 * s), X_PTR, NATIVE)
        else:
            z1 = _rnd(u1 * c - u2 * s, X_PTR, NATIVE)
            z2 = _rnd(u2 * c + u1 * s, X_PTR, NATIVE)
    else:
        z1 = tl.zeros((h.shape[0], HALF_P), tl.float32)
        z2 = z1
    return z1, z2, zp, i1, i2, j, m1, mp


@triton.jit
def _store_rows(
    OUT_PTR, base, z1, z2, zp, i1, i2, j, m1, mp, scale,
    ROT: tl.constexpr, FP8: tl.constexpr, FMAX: tl.constexpr, FNUZ: tl.constexpr,
    NATIVE: tl.constexpr, NATIVE_FP8: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """Store one block's rows at ``OUT_PTR + base + channel``: in the input dtype, or as FP8
    bytes (``OUT_PTR`` a uint8 view) of ``value / scale``."""
    if FP8:
        tl.store(OUT_PTR + base + j, _fp8(zp, scale, FMAX, FNUZ, NATIVE_FP8, FMA), mask=mp)
        if ROT > 0:
            tl.store(OUT_PTR + base + i1, _fp8(z1, scale, FMAX, FNUZ, NATIVE_FP8, FMA), mask=m1)
            tl.store(OUT_PTR + base + i2, _fp8(z2, scale, FMAX, FNUZ, NATIVE_FP8, FMA), mask=m1)
    else:
        tl.store(OUT_PTR + base + j, to_out(zp, OUT_PTR, NATIVE), mask=mp)
        if ROT > 0:
            tl.store(OUT_PTR + base + i1, to_out(z1, OUT_PTR, NATIVE), mask=m1)
            tl.store(OUT_PTR + base + i2, to_out(z2, OUT_PTR, NATIVE), mask=m1)


@triton.jit
def _scale_rows(SCALE_PTR, h, HEADS: tl.constexpr):
    """fp32 ``[R, 1]`` scale of each row's head: ``scale[0]`` (per tensor) or ``scale[h]``."""
    if HEADS == 1:
        return tl.load(SCALE_PTR + h[:, None] * 0)
    else:
        return tl.load(SCALE_PTR + h[:, None])


@triton.jit
def _q_program(
    pid, T, eps, X_PTR, stride_t, stride_h, W_PTR, COS_SIN_PTR, cos_sin_stride, POS_PTR, max_pos,
    OUT_PTR, out_stride_t, out_stride_h, SCALE_PTR,
    H: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, HALF_P: tl.constexpr, PASS_P: tl.constexpr,
    ROWS: tl.constexpr, IS_NEOX: tl.constexpr, GEMMA: tl.constexpr, FP8: tl.constexpr, FMAX: tl.constexpr,
    FNUZ: tl.constexpr, NATIVE: tl.constexpr, NATIVE_FP8: tl.constexpr, FMA: tl.constexpr, EARLY_LOADS: tl.constexpr,
    ONE: tl.constexpr, ROW_MASK: tl.constexpr, OFF32: tl.constexpr,
):  # fmt: skip
    """One block of ROWS q rows: norm, RoPE, store (FP8 with the scale read from SCALE_PTR)."""
    t, h, rmask = _block_rows(pid, T, H, ROWS, ONE, ROW_MASK)
    row, p_ok = _table_rows(POS_PTR, t, rmask, max_pos, cos_sin_stride, ROT, ONE, OFF32)
    scale = 1.0
    if FP8:
        scale = tl.load(SCALE_PTR + tl.zeros((1, 1), tl.int32))
    z1, z2, zp, i1, i2, j, m1, mp = _norm_rope_rows(
        X_PTR, W_PTR, t, h, rmask, stride_t, stride_h, eps, COS_SIN_PTR, row, p_ok,
        D, ROT, HALF_P, PASS_P, IS_NEOX, GEMMA, NATIVE, EARLY_LOADS, FMA, ONE, OFF32,
    )  # fmt: skip
    base = _row_offsets(t, h, out_stride_t, out_stride_h, ONE, OFF32)
    _store_rows(OUT_PTR, base, z1, z2, zp, i1, i2, j, m1, mp, scale, ROT, FP8, FMAX, FNUZ, NATIVE, NATIVE_FP8, FMA)


@triton.jit
def _cache_rows(slot, rmask, num_slots, BLOCK_SIZE: tl.constexpr, ONE: tl.constexpr, OFF32: tl.constexpr):
    """``(blk, off, ok)``: each row's cache block and offset in it, and whether its slot is in
    ``[0, num_slots)`` (``[R, 1]``). A slot outside it is replaced by 0 (an in-bounds address;
    the stores are masked off by ``ok``)."""
    ok = rmask & (slot >= 0) & (slot < num_slots)  # [R] (with ONE: the scalar broadcast)
    su = tl.where((slot >= 0) & (slot < num_slots), slot, 0).to(tl.uint32 if OFF32 else tl.uint64)
    ity: tl.constexpr = tl.int32 if OFF32 else tl.int64
    return (su // BLOCK_SIZE).to(ity), (su % BLOCK_SIZE).to(ity), ok[:, None]


@triton.jit
def _k_program(
    kp, T, eps, K_PTR, stride_t, stride_h, W_PTR, COS_SIN_PTR, cos_sin_stride, POS_PTR, max_pos,
    K_OUT_PTR, k_out_stride_t, k_out_stride_h, V_PTR, v_stride_t, v_stride_h,
    K_CACHE_PTR, kc_stride_b, kc_stride_s, kc_stride_h, V_CACHE_PTR, vc_stride_b, vc_stride_s, vc_stride_h,
    SLOT_PTR, num_slots, K_SCALE_PTR, V_SCALE_PTR,
    H: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, HALF_P: tl.constexpr, PASS_P: tl.constexpr,
    DV: tl.constexpr, DV_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, K_SCALE_HEADS: tl.constexpr,
    V_SCALE_HEADS: tl.constexpr, ROWS: tl.constexpr, IS_NEOX: tl.constexpr, GEMMA: tl.constexpr,
    C_FP8: tl.constexpr, C_FMAX: tl.constexpr, C_FNUZ: tl.constexpr,
    NATIVE: tl.constexpr, NATIVE_FP8: tl.constexpr, FMA: tl.constexpr, EARLY_LOADS: tl.constexpr,
    ONE: tl.constexpr, ROW_MASK: tl.constexpr, OFF32: tl.constexpr, V_FIRST: tl.constexpr,
):  # fmt: skip
    """One block of ROWS k rows: norm, RoPE, k_out, and the cache write of k and the matching v rows.

    Loads that need no earlier result (position, slot, FP8 scales; with EARLY_LOADS or V_FIRST
    the v rows too) are issued before the norm's: each one left behind the reduction would be a
    dependent round trip of its own. With V_FIRST the v rows are also written to the cache
    before the norm, so that their stores leave while the k rows are still on their way.
    """
    t, h, rmask = _block_rows(kp, T, H, ROWS, ONE, ROW_MASK)
    row, p_ok = _table_rows(POS_PTR, t, rmask, max_pos, cos_sin_stride, ROT, ONE, OFF32)
    if K_CACHE_PTR is not None:
        if ONE:
            slot = tl.load(SLOT_PTR + t).to(tl.int64)
        else:
            slot = tl.load(SLOT_PTR + t, mask=rmask, other=-1).to(tl.int64)
        ks, vs = 1.0, 1.0
        if C_FP8:
            ks = _scale_rows(K_SCALE_PTR, h, K_SCALE_HEADS)
            vs = _scale_rows(V_SCALE_PTR, h, V_SCALE_HEADS)
        dv = tl.arange(0, DV_P)[None, :]
        if EARLY_LOADS or V_FIRST:  # every row in range is read (in bounds whatever the slot)
            x = tl.load(V_PTR + _row_offsets(t, h, v_stride_t, v_stride_h, ONE, OFF32) + dv,
                        mask=rmask[:, None] & (dv < DV))  # fmt: skip
        if V_FIRST:
            blk, off, ok2 = _cache_rows(slot, rmask, num_slots, BLOCK_SIZE, ONE, OFF32)
            _store_v(V_CACHE_PTR, blk, off, h, vc_stride_b, vc_stride_s, vc_stride_h, x, vs, ok2 & (dv < DV), dv,
                     ONE, OFF32, C_FP8, C_FMAX, C_FNUZ, NATIVE_FP8, FMA)  # fmt: skip
    z1, z2, zp, i1, i2, j, m1, mp = _norm_rope_rows(
        K_PTR, W_PTR, t, h, rmask, stride_t, stride_h, eps, COS_SIN_PTR, row, p_ok,
        D, ROT, HALF_P, PASS_P, IS_NEOX, GEMMA, NATIVE, EARLY_LOADS, FMA, ONE, OFF32,
    )  # fmt: skip
    if K_OUT_PTR is not None:
        base = _row_offsets(t, h, k_out_stride_t, k_out_stride_h, ONE, OFF32)
        _store_rows(K_OUT_PTR, base, z1, z2, zp, i1, i2, j, m1, mp, 1.0,
                    ROT, False, C_FMAX, C_FNUZ, NATIVE, NATIVE_FP8, FMA)  # fmt: skip
    if K_CACHE_PTR is not None:
        if not V_FIRST:
            blk, off, ok2 = _cache_rows(slot, rmask, num_slots, BLOCK_SIZE, ONE, OFF32)
        cbase = _row_offsets(blk * kc_stride_b + off * kc_stride_s, h, 1, kc_stride_h, ONE, OFF32)
        _store_rows(K_CACHE_PTR, cbase, z1, z2, zp, i1, i2, j, m1 & ok2, mp & ok2, ks,
                    ROT, C_FP8, C_FMAX, C_FNUZ, NATIVE, NATIVE_FP8, FMA)  # fmt: skip
        if not V_FIRST:
            vmask = ok2 & (dv < DV)
            if not EARLY_LOADS:
                x = tl.load(V_PTR + _row_offsets(t, h, v_stride_t, v_stride_h, ONE, OFF32) + dv, mask=vmask)
            _store_v(V_CACHE_PTR, blk, off, h, vc_stride_b, vc_stride_s, vc_stride_h, x, vs, vmask, dv,
                     ONE, OFF32, C_FP8, C_FMAX, C_FNUZ, NATIVE_FP8, FMA)  # fmt: skip


@triton.jit
def _store_v(V_CACHE_PTR, blk, off, h, vc_stride_b, vc_stride_s, vc_stride_h, x, vs, vmask, dv,
             ONE: tl.constexpr, OFF32: tl.constexpr, C_FP8: tl.constexpr, C_FMAX: tl.constexpr,
             C_FNUZ: tl.constexpr, NATIVE_FP8: tl.constexpr, FMA: tl.constexpr):  # fmt: skip
    """v's rows into the cache: a copy, or FP8 of ``f(x) / scale``."""
    vbase = _row_offsets(blk * vc_stride_b + off * vc_stride_s, h, 1, vc_stride_h, ONE, OFF32)
    if C_FP8:
        tl.store(V_CACHE_PTR + vbase + dv, _fp8(to_f32(x), vs, C_FMAX, C_FNUZ, NATIVE_FP8, FMA), mask=vmask)
    else:
        tl.store(V_CACHE_PTR + vbase + dv, x, mask=vmask)


@triton.jit(do_not_specialize=["T", "k_programs", "max_pos", "num_slots"])
def _qk_norm_rope_kernel(
    # Runtime parameters in the order the programs first read them: a launch's parameters reach
    # each SM's constant cache line by line, and a q program's all lie in the first lines.
    k_programs, T,  # programs owning k row blocks (the rest own q row blocks); tokens
    POS_PTR, COS_SIN_PTR, max_pos, cos_sin_stride,  # positions [T]; table [max_pos, ROT] fp32/input dtype
    Q_PTR, Q_W_PTR, Q_OUT_PTR,  # q [T, HQ, D] fp16/bf16 (unit channel stride); [D] weight or None; out
    q_stride_t, q_stride_h, q_out_stride_t, q_out_stride_h,  # q_out: [T, HQ, D] input dtype, or FP8 bytes (Q_FP8)
    q_eps, Q_SCALE_PTR,  # fp32 epsilon; fp32 FP8 scale [1] or None
    K_PTR, K_W_PTR, SLOT_PTR, V_PTR,  # k [T, HK, D]; [D] weight or None; slot_mapping [T]; v [T, HK, DV] or None
    k_stride_t, k_stride_h, k_eps, num_slots,  # num_slots: blocks * BLOCK_SIZE
    v_stride_t, v_stride_h,
    K_CACHE_PTR, V_CACHE_PTR,  # [blocks, BLOCK_SIZE, HK, D] / [..., DV] or FP8 bytes
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
    K_SCALE_PTR, V_SCALE_PTR,  # fp32 FP8 scales [1] or [HK], or None
    K_OUT_PTR, k_out_stride_t, k_out_stride_h,  # [T, HK, D] or None
    HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,  # heads, head size, rotary dim (0: none)
    HALF_P: tl.constexpr, PASS_P: tl.constexpr,  # next_pow2(ROT / 2) (>= 1), next_pow2(D - ROT) (>= 1)
    DV: tl.constexpr, DV_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,  # v head size, padded; cache block size
    K_SCALE_HEADS: tl.constexpr, V_SCALE_HEADS: tl.constexpr,  # 1 (per tensor) or HK (per head)
    ROWS_Q: tl.constexpr, ROWS_K: tl.constexpr,  # rows per program
    ONE_Q: tl.constexpr, ONE_K: tl.constexpr,  # ROWS_Q divides HQ (ROWS_K divides HK): a block is one token's
    EARLY_LOADS: tl.constexpr,  # every load before the norm's reduction (decode) or after it where it can wait
    ROW_MASK: tl.constexpr,  # one-token blocks compute their (always true) row mask anyway
    OFF32: tl.constexpr,  # every element offset of the call fits in int32: offsets computed in 32 bits
    V_FIRST: tl.constexpr,  # v rows loaded and written to the cache before the norm of k
    IS_NEOX: tl.constexpr, GEMMA: tl.constexpr,
    Q_FP8: tl.constexpr, Q_FMAX: tl.constexpr, Q_FNUZ: tl.constexpr,  # FP8 q
    C_FP8: tl.constexpr, C_FMAX: tl.constexpr, C_FNUZ: tl.constexpr,  # FP8 cache
    NATIVE: tl.constexpr, NATIVE_FP8: tl.constexpr,  # hardware RNE conversions usable
    FMA: tl.constexpr,  # fused multiply-add (compiled code; the interpreter rounds the product)
    PDL: tl.constexpr,  # programmatic dependent launch (NVIDIA sm_90+): triton_launch.PDL_OFF, _TRIGGER or _WAIT
):  # fmt: skip
    """Per-head RMSNorm of q and k, RoPE, optional FP8 q, and the paged cache write of k and v.

    Per row (token t, head h): ``u = f(rnd(x * rsqrt(sum(x^2)/D + eps) * w))``; pairs ``(a, b)``
    of ``u``'s first ROT channels become ``(a*c - b*s, b*c + a*s)`` with ``c, s`` from row
    ``positions[t]`` of the table; ``out = rnd(z)``. k rows go to ``k_out`` and, for a slot in
    ``[0, num_slots)``, to ``k_cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE, h]`` together with
    v's row (a copy, or FP8 of ``f(x) / scale``).
    """
    pdl_prologue(PDL)
    pid = tl.program_id(0)
    # The two roles live in helpers of their own: a runtime branch may not bind the same
    # name to tiles of different shapes (ROWS_Q and ROWS_K rows) in its two arms.
    if pid < k_programs:
        _k_program(
            pid, T, k_eps, K_PTR, k_stride_t, k_stride_h, K_W_PTR, COS_SIN_PTR, cos_sin_stride,
            POS_PTR, max_pos, K_OUT_PTR, k_out_stride_t, k_out_stride_h, V_PTR, v_stride_t, v_stride_h,
            K_CACHE_PTR, kc_stride_b, kc_stride_s, kc_stride_h, V_CACHE_PTR, vc_stride_b, vc_stride_s, vc_stride_h,
            SLOT_PTR, num_slots, K_SCALE_PTR, V_SCALE_PTR,
            HK, D, ROT, HALF_P, PASS_P, DV, DV_P, BLOCK_SIZE, K_SCALE_HEADS, V_SCALE_HEADS, ROWS_K, IS_NEOX, GEMMA,
            C_FP8, C_FMAX, C_FNUZ, NATIVE, NATIVE_FP8, FMA, EARLY_LOADS, ONE_K, ROW_MASK, OFF32, V_FIRST,
        )  # fmt: skip
    else:
        _q_program(
            pid - k_programs, T, q_eps, Q_PTR, q_stride_t, q_stride_h, Q_W_PTR, COS_SIN_PTR, cos_sin_stride, POS_PTR, max_pos,
            Q_OUT_PTR, q_out_stride_t, q_out_stride_h, Q_SCALE_PTR,
            HQ, D, ROT, HALF_P, PASS_P, ROWS_Q, IS_NEOX, GEMMA, Q_FP8, Q_FMAX, Q_FNUZ, NATIVE, NATIVE_FP8, FMA,
            EARLY_LOADS, ONE_Q, ROW_MASK, OFF32,
        )  # fmt: skip
