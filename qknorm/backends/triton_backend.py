"""Backend ``triton``: plans and launch heuristics for :mod:`qknorm.backends.triton_kernels`.

One launch normalizes q rows and k rows together (per-tensor FP8 takes two: a first launch
reduces the amax of y over all of q, the second quantizes with it). Everything that does not
depend on the row count is worked out once per request key (:class:`_Plan`); the launch
configuration is chosen per (key, M bucket) from the shape alone, never by autotuning.
Triton is imported on first use only; :mod:`.triton_launch` launches by parameter name.

Heuristics (measured numbers in the notes block below)
------------------------------------------------------
- Tiles: a row is held as one or three power-of-two tiles ``[rows, groups, group]`` side by
  side (DeepSeek's q: 3 x 512 columns), the quantization group as the last axis so that group
  maxima are reductions within a thread and a few lanes. Rows whose padded width exceeds
  ``_MAX_SINGLE`` columns are processed one per program in ``_CHUNK``-column passes (sum of
  squares, [span amax], write), re-reading the row from L2.
- Decode (M <= 256; quantizing calls up to 2048 rows): one q row per program, k rows in
  programs of their own; the q row keeps the tiles of every other bucket (batch invariance, see
  :func:`_config`). The plain norm: about ``_EPT_DECODE`` elements per thread, one k row per
  program; MXFP4 likewise with k rows in blocks of ``_TILE_NORM`` elements; FP8 as at prefill
  (one warp per DeepSeek q row, k rows a q row's worth per program). Up to ``_SPLIT_MAX_M``
  rows (256 for e4m3fnuz groups) a quantized q row of several tiles is written by one program per
  tile, each reducing the whole row (:meth:`TritonBackend._split_max_m`).
- Prefill: the plain norm in programs of ``_TILE_NORM`` elements (2 DeepSeek q rows or 8 k
  rows); quantizing calls with one warp per q row and k rows in programs of their own up to
  8192 rows; above that, FP8 groups through the hardware e4m3fn conversion keep that layout,
  and the issue-bound encoders (MXFP4, e4m3fnuz, per-token and per-tensor FP8) put each q row's
  k row in its program (no cross-warp reduction, and each program mixes quantizing arithmetic
  with plain-norm memory traffic); DeepSeek's MXFP4 programs with k rows apart capped at 88
  registers (:meth:`TritonBackend._register_cap`); above 8192 rows e4m3fnuz groups and MXFP4 hold
  x as loaded across the reduction, uncapped (``_Config.reload``), and their one-row tiles go
  without masks, MXFP4's from 2049 rows (``_Config.unmasked``; :func:`_held_rows`), where bf16
  MXFP4 rows are read as 32-bit words (``_Config.words``); per-token FP8 requests its k row's loads before the
  q row's work (``_Config.k_early``); MXFP4 and e4m3fnuz groups leave the k rows of their last
  row blocks (a tenth, at most ``_K_TAIL_BLOCKS``) to programs launched after the q programs
  (``_Config.k_tail``), and request their weights first up to 32768 rows. FP8 q rows
  are spread over the same warps in every bucket (batch invariance of the fp32 scales).
- Load order: where measured faster, a program requests its weights before x, behind a
  barrier (:func:`_weights_first`; ptxas otherwise issues them after the sum of squares).
- Programmatic dependent launch, where :func:`~.triton_launch.set_pdl` turns it on (NVIDIA
  sm_90+): every bucket, each program letting the next kernel launch once it may start (two
  exceptions where that measured slower: :func:`_pdl`).
- Per-tensor FP8: a single row is one per-token launch; up to ``_TENSOR_ONE_MAX_M`` rows
  (e4m3fn) one launch whose one q program holds every row; otherwise an amax launch of at most
  ``_AMAX_PROGRAMS`` programs (:func:`_amax_launch`), then the quantizing launch, which walks
  q's rows from the last.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any

import torch

from ..quant import QuantMode, fp8_inv_max
from .base import BackendUnavailable
from .triton_launch import (
    PDL_OFF,
    PDL_TRIGGER,
    PDL_WAIT,
    PlannedLaunches,
    availability,
    bind_direct,
    device_unsupported,
    direct_launch_supported,
    is_build_failure,
    launch_options,
    pdl_supported,
)

__all__ = ["TritonBackend"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- heuristics
# Notes: NVIDIA H200, 2026-11-30, triton 3.6.0, torch 2.11.0+cu130, benchmarks/gpu_check_triton.py,
# DeepSeek q [M,1536] + k [M,512] bf16 split from [M,2112], CUDA-graph replay, µs per call
# (tables in docs/benchmarks.md). Configurations as (q rows, k rows, warps[, k with q]):
#   M=1      norm 1/1/4 1.37, 1/1/8 1.37, 1/1/2 1.41, 1/1/4 k-with-q 1.81;
#            FP8 1x128 three tiles 1.76-1.78, one tile 1.64; MXFP4 three tiles 1.77, one tile 1.71
#   M=4096   FP8 1x128 1/4/2 10.44 (82% of the copy), 1/1/1 k-with-q 10.96 (77%)
#   M=65536  FP8 1x128 1/4/2 115.7, 1/2/1 108.0, 1/1/1 k-with-q 109.3 (96%);
#            MXFP4 1/4/2 148.8, 1/4/1 140.9, 1/1/1 k-with-q 123.1 (115.2 with the fused E2M1
#            encoder, 81%); norm: the best four of nine within 1% (129.5-130.7)
# Quantizing modes, M = 4096 / 8192 / 16384 / 65536, strided (later run, same script's sweep):
#   1/4/1 against 1/4/2: FP8 1x128 10.17 / 16.55 against 10.38 / 17.32; 1x32 8.89 / 15.51 against
#   10.46 / 17.19; MXFP4 11.30 / 19.59 against 11.98 / 20.34; e4m3fnuz 1x128 11.57 / 19.95 against
#   12.34 / 21.23; per-tensor 16.01 / 25.76 against 16.06 / 26.38; per-token 10.47 / 16.83
#   against 10.03 / 16.61 (two warps were faster, but one warp in every bucket keeps its scales
#   batch invariant: see _bucket_config).
#   1/4/1 against 1/1/1 k-with-q at 16384 / 65536: FP8 1x128 29.72 / 107.50 against 30.88 /
#   109.25, 1x64 29.68 / 107.82 against 30.79 / 109.38, 1x32 28.81 / 107.75 against 31.04 /
#   110.21; but e4m3fnuz 1x128 35.86 / 135.71 against 34.38 / 122.36, MXFP4 35.21 / 132.45
#   against 32.37 / 112.45 (capped), per-token 30.03 / 107.34 against 30.40 / 105.75,
#   per-tensor 48.79 / 177.63 against 48.80 / 170.84: k rows apart at prefill for hardware-encoded
#   FP8 groups only.
_DECODE_MAX_M = 256
_QUANT_DECODE_MAX_M = 2048  # quantizing calls keep the decode configuration up to this many rows
_QUANT_MID_MAX_M = 8192  # ... and k rows apart (one warp per q row, two per token) up to this many
_W_FIRST_MAX_M = 16384  # quantizing programs request their weights first up to this many rows (_weights_first)
_SPLIT_MAX_M = 16  # quantizing calls split each q row over one program per tile up to this many rows (_split_max_m)
_RELOAD_W_FIRST_MAX_M = 32768  # ... and programs holding x as loaded (_Config.reload) up to this many
_K_TAIL_SHARE = 10  # with a k tail (_config), one k row block in this many goes to programs launched last
_K_TAIL_BLOCKS = 1600  # ... and at most this many (the tail covers a launch's last few µs, whatever M)
# Row-count buckets: each gets its own launch configuration (and compiled variant).
_BUCKETS = (1, 16, 256, 2048, 8192, 16384, 32768)
_MAX_SINGLE = 8192  # widest padded row kept whole in registers
_MIN_SPLIT_TILE = 256  # narrowest tile of a row held as three (narrower rows: one padded tile)
_CHUNK = 4096  # columns per pass for wider rows
_EPT_DECODE = 16  # elements per thread at decode sizes
_EPT_PREFILL = 32  # elements per thread at prefill sizes (plain norm)
_EPT_QUANT = 64  # ... quantizing (one warp per DeepSeek q row)
_TILE_NORM = 4096  # elements per program of the plain norm at prefill sizes (2 DeepSeek q rows, 8 k rows)
# Per-tensor amax launch: at most _AMAX_PROGRAMS programs, each folding one or more blocks of rows
# into one partial; every program of the main launch re-reads the partials. A program waits for
# one block's loads before it asks for the next, so when the programs loop the bytes in flight
# per SM are about two programs' blocks: with 8 warps over 8192 elements (4 DeepSeek q rows) the
# launch read q at 46% of DRAM bandwidth at M = 65536 on the H200 (91.7 of 196 µs for both
# launches, Nsight Compute); 16 warps over 16384 elements (8 rows) hold twice as many bytes at the
# same 62 registers per thread, and per-tensor FP8 went from 198 to 171 µs with this and the
# reversed main launch. Without a loop (q in at most _AMAX_PROGRAMS blocks of 8192 elements) the
# smaller blocks spread over more programs: 4.17 against 4.50 µs at M = 256.
_AMAX_PROGRAMS = 256
_TENSOR_ONE_MAX_M = 16  # per-tensor FP8 up to this many rows: one launch, one q program (_config)
_AMAX_ONE_BLOCK = (8192, 8)  # (elements per block, warps) when each program takes one block
_AMAX_LOOPING = (16384, 16)  # ... when the programs loop over blocks

# Kernel parameters holding tensors -> the request attribute that supplies them.
_TENSORS = {
    "Q_PTR": "q", "Q_RES_PTR": "q_residual", "Q_W_PTR": "q_weight", "Q_OUT_PTR": "q_out",
    "Q_RES_OUT_PTR": "q_res_out", "Q_QUANT_PTR": "q_quant", "Q_SCALE_PTR": "q_scale",
    "K_PTR": "k", "K_W_PTR": "k_weight", "K_OUT_PTR": "k_out",
}  # fmt: skip
# Row-stride parameters -> the tensor parameter whose stride(0) they are.
_ROW_STRIDES = {
    "q_stride": "Q_PTR", "q_res_stride": "Q_RES_PTR", "q_out_stride": "Q_OUT_PTR",
    "q_res_out_stride": "Q_RES_OUT_PTR", "q_quant_stride": "Q_QUANT_PTR", "q_scale_stride_m": "Q_SCALE_PTR",
    "k_stride": "K_PTR", "k_out_stride": "K_OUT_PTR",
}  # fmt: skip
# (tensor parameter, request attribute, its row-stride parameter or ""), for the per-call loop.
_SLOTS = tuple((n, a, next((s for s, t in _ROW_STRIDES.items() if t == n), "")) for n, a in _TENSORS.items())
_STRIDES = (*_ROW_STRIDES, "q_scale_stride_g")  # every stride parameter (what compiled kernels are keyed by)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _prev_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _bucket_hi(bucket: int) -> int:
    """The most rows of bucket ``bucket`` (the last one's is a stand-in for unbounded)."""
    return _BUCKETS[bucket] if bucket < len(_BUCKETS) else 1 << 20


def _bucket(m: int) -> int:
    """Index of the row-count bucket of ``m`` (the upper bounds are ``_BUCKETS``)."""
    for i, hi in enumerate(_BUCKETS):
        if m <= hi:
            return i
    return len(_BUCKETS)


def _tiles(n: int, gs: int | None) -> tuple[int, int, int]:
    """``(NG, NT, GS)``: a row of ``n`` columns as NT tiles of NG groups of GS columns.

    ``gs`` is the quantization group (None: no groups, a tile is NG = 1 group of GS columns).
    Three tiles where they pad less than one power-of-two tile and are at least
    ``_MIN_SPLIT_TILE`` columns wide: 1536 = 3 x 512 (or 3 x 4 groups of 128) instead of 2048 with
    a quarter of the lanes masked.
    """
    unit = gs or 1
    groups = -(-n // unit)
    one, three = _next_pow2(groups), _next_pow2(-(-groups // 3))
    per_tile, nt = (three, 3) if 3 * three < one and three * unit >= _MIN_SPLIT_TILE else (one, 1)
    return (per_tile, nt, gs) if gs else (1, nt, per_tile)


def _one_tile(n: int, gs: int | None) -> tuple[int, int, int]:
    """``(NG, 1, GS)``: a row of ``n`` columns as one padded power-of-two tile."""
    return (_next_pow2(-(-n // gs)), 1, gs) if gs else (1, 1, _next_pow2(n))


@dataclass(frozen=True)
class _Config:
    """Launch configuration of one (key, M bucket)."""

    q_rows: int
    k_rows: int
    num_warps: int
    k_with_q: bool = False  # q program p also normalizes k row block p (k_rows is then q_rows)
    one_tile: bool = False  # q rows in one padded power-of-two tile (the plain norm; see _config)
    one_pass: bool = False  # per-tensor FP8 of a single row: one launch, quantized as per-token
    one_program: bool = False  # per-tensor FP8 of a few rows: one launch, every q row in one program
    maxnreg: int | None = None  # register cap per thread (NVIDIA's .maxnreg; other targets ignore it)
    w_first: bool = False  # weights requested before x, behind a barrier (see _weights_first)
    reload: bool = False  # x and w held across the reduction as loaded, widened again after it (see _config)
    unmasked: bool = False  # blocks of one row covered exactly by their tiles loaded and stored without masks (_config)
    k_early: bool = False  # k_with_q: the k row's loads requested before the q row's work (see _config)
    q_split: bool = False  # each q row block written by one program per tile, all reducing whole rows (see _config)
    one_row: bool = False  # M = 1: the kernel's ONE_ROW (see _config)
    words: bool = False  # bf16 MXFP4 rows read as 32-bit words (the kernel's WORDS; see _config)
    k_tail: bool = False  # k_with_q: the k rows of the last row blocks in programs of their own, launched last (_config)
    pdl: int = PDL_OFF  # programmatic dependent launch (triton_launch.PDL_*; see _pdl)


@dataclass
class _Plan:
    """Everything about a request key that does not depend on M."""

    q_chunked: bool
    q_tile: int  # q columns held per row: the padded power-of-two width, or the chunk when chunked
    k_chunked: bool
    k_tile: int
    quantizes: bool
    grouped: bool  # FP8 groups or MXFP4 (group maxima within the tile)
    tiles: dict[bool, tuple[int, int, int]]  # (Q_NG, Q_NT, Q_GS) without padding (False) and as one tile (True)
    constexprs: dict[str, Any]  # kernel compile-time arguments except the per-bucket ones
    two_pass: bool  # per-tensor FP8: an amax launch first
    fnuz_view: bool  # pass the FP8 output as uint8 (Triton has no e4m3fnuz pointer type off ROCm)
    device_index: int | None  # CUDA device of the tensors (Triton launches on the current device)
    register_cap: int | None = None  # maxnreg of one-warp programs with k rows apart, weights first (_register_cap)
    fp8: bool = False  # FP8 quantization: q rows over the same warps in every bucket (see _bucket_config)
    hw_groups: bool = False  # FP8 groups through the hardware e4m3fn conversion: k rows apart at prefill
    mid_w_first: bool = False  # a quantizing mode that requests the weights first from 257 to 16384 rows (_weights_first)
    caps: bool = False  # register caps apply (compiled code on NVIDIA; see _config)
    unmasked_above: int = 0  # one-row tiles without masks above this many rows (0: never; _config, _held_rows)
    reload_above: int = 0  # x and w held as loaded across the reduction above this many rows (0: never; likewise)
    k_early: bool = False  # per-token FP8 in compiled NVIDIA code, k of one tile: k's loads first with k rows in the q programs
    split_max_m: int = 0  # q rows split over one program per tile up to this many rows (_config; 0: never)
    k_tail: bool = False  # MXFP4 or e4m3fnuz groups in compiled NVIDIA code: k rows of the last blocks apart (_config)
    pdl: bool = False  # programmatic dependent launch on (triton_launch.set_pdl) and supported by the device
    one_row: bool = False  # M = 1 with the counts at compile time (ONE_ROW): the plain norm and MXFP4 in compiled NVIDIA code (_config)
    words: bool = False  # bf16 MXFP4 (groups of 32) without a residual, tiles covering the row: unmasked rows read as words (_config)
    configs: dict[int, _Config] = field(default_factory=dict)  # by M bucket
    launches: dict[_Config, _Launch] = field(default_factory=dict)


@dataclass
class _Launch:
    """What launching one plan with one configuration needs besides the tensors (built once)."""

    consts: dict[str, Any]  # every constexpr parameter of the kernel, by name
    tail: list[Any]  # the same values in the kernel's parameter order (they come last)
    k_with_q: bool
    fast: dict[tuple[object, ...], Any] = field(default_factory=dict)  # direct launchers by row strides


def _config(plan: _Plan, bucket: int) -> _Config:
    """The launch configuration of ``plan`` for row-count bucket ``bucket`` (shape-only rule).

    Measured on the H200 (see the notes at the top of this module and docs/benchmarks.md). Every
    bucket of a plan lays a q row out the same way, so that a row's sum of squares is reduced in
    the same order whatever the row count (batch invariance, tests/test_determinism.py): the
    plain norm in one padded tile over the same warps, FP8 in tiles without padding over the same
    warps. MXFP4 rows are the same tiles over four warps at decode and one above: r can differ
    by an ulp between the two (one warp at decode cost 0.3-0.6 µs); the E8M0 scales, E2M1 codes
    and bf16 outputs of tests/test_determinism.py's rows came out identical all the same.
    """
    m_hi = _bucket_hi(bucket)
    cfg = _bucket_config(plan, bucket)
    if _weights_first(plan, m_hi):
        cfg = replace(cfg, w_first=True)
        if plan.caps and plan.quantizes and not plan.hw_groups and cfg.num_warps == 1:
            # The weights live across the reduction: ptxas then takes more registers than the
            # one-warp programs of the software encoders and per-token FP8 can afford (H200,
            # strided, µs): capped at 96 with k rows apart, e4m3fnuz 1x128 10.26 -> 9.61 at
            # M = 4096 and 17.77 -> 16.97 at 8192, e4m3fnuz per token 10.21 -> 9.39 and
            # 17.62 -> 16.59, per-token FP8 8.68 -> 8.60 and 15.40 -> 15.03, MXFP4 10.21 ->
            # 10.07 and 18.06 -> 17.70; at 80 with their k row (8192 < M <= 16384), per-token
            # FP8 29.95 -> 28.81 (uncapped and without the weights first before), e4m3fnuz per
            # token 31.58 -> 30.65, e4m3fnuz 1x128 32.17 -> 31.84, MXFP4 31.53 -> 31.20.
            # DeepSeek's MXFP4 programs take their own cap (_register_cap).
            cfg = replace(cfg, maxnreg=80 if cfg.k_with_q else plan.register_cap or 96)
    if plan.unmasked_above and m_hi > plan.unmasked_above:  # see _held_rows
        cfg = replace(cfg, unmasked=True)
    if plan.reload_above and m_hi > plan.reload_above:
        # Uncapped (64 registers for DeepSeek's rows), with the weights first up to 32768 rows
        # (with the k tail below; H200, DeepSeek, strided / contiguous, µs at M = 32768, k tail ->
        # k tail and weights first: MXFP4 53.74 / 53.67 -> 53.33 / 53.10, e4m3fnuz 1x128 56.23 /
        # 56.22 -> 55.63 / 55.17, 1x32 56.61 / 56.06 -> 55.94 / 55.53; at 65536 MXFP4 102.05 /
        # 102.64 -> 103.30 / 102.69).
        cfg = replace(cfg, reload=True, maxnreg=None, w_first=m_hi <= _RELOAD_W_FIRST_MAX_M)
    if plan.words and cfg.unmasked:
        # bf16 MXFP4 rows read as 32-bit words (the kernel's _rows_words): 1232 sm_90 instructions
        # per DeepSeek program against 1392, 72 registers (64 capped, 1256 instructions, no
        # spills). H200, DeepSeek, µs, strided / contiguous, bf16 tiles -> words: 9.32 / 9.28 ->
        # 9.11 / 9.07 at M = 4096 and 16.74 / 16.67 -> 15.95 / 15.88 at 8192 (the cap of 88: at 64
        # or 72, 9.52-9.71 against 8.95-9.10); capped at 64, 27.81 / 27.98 -> 26.99 / 26.85 at
        # 16384, 53.02 / 53.25 -> 50.29 / 50.36 at 32768 and 102.1 / 102.0 -> 94.6 / 94.1 at 65536
        # (uncapped, 26.51 against 26.06 at 16384 in another run; at 56, 27.11).
        cfg = replace(cfg, words=True, maxnreg=64 if cfg.reload else cfg.maxnreg)
    if plan.k_early and cfg.k_with_q:
        # Per-token FP8 with k rows in the q programs (above 8192 rows): the k row's loads go out
        # before the q row's work, so a program waits for memory once. The k tile then lives
        # across the q row's work: uncapped, and 96 for the e4m3fnuz encoder with the weights
        # first (at 80 it spilled). H200, DeepSeek, strided / contiguous, µs, k after q -> k
        # first: per token 28.86 / 28.60 -> 27.88 / 27.85 at M = 16384 and 105.58 / 105.06 ->
        # 105.25 / 104.34 at 65536; e4m3fnuz per token 30.80 / 30.61 -> 30.27 / 29.90 and 107.37 /
        # 106.19 -> 107.24 / 106.22. MXFP4 got slower at every cap (strided, 28.77 -> 29.72 at
        # 16384, 103.62 -> 111.21 at 65536: its programs need the registers); e4m3fnuz groups
        # gained under 1%.
        cfg = replace(cfg, k_early=True, maxnreg=96 if plan.fnuz_view and cfg.w_first else None)
    if plan.k_tail and cfg.k_with_q:
        # A launch ends with its last q programs encoding while memory idles. Moving the k rows
        # of the last row blocks into programs of their own, launched after every q program,
        # fills that end with the k rows' traffic. H200, DeepSeek, strided / contiguous, µs at
        # M = 16384: MXFP4 29.06 / 28.68 -> 28.47 / 28.10, e4m3fnuz 1x128 30.67 / 30.21 -> 29.88 /
        # 29.52, 1x32 30.82 / 30.28 -> 30.11 / 29.60. The share, swept on MXFP4 (29.23 / 28.82
        # without): 1/31 28.75 / 28.35, 1/10 28.64 / 28.29, 1/5 28.85 / 28.53, 2/5 29.93 / 29.74.
        # The end to fill lasts the same few µs at any M, and so does the best tail: about 1600
        # blocks (_K_TAIL_BLOCKS), a tenth at 16384 rows. MXFP4 without a tail -> a tail of 1638
        # / 3277 / 5461 blocks at 32768 rows: 54.16 / 54.24 -> 53.55 / 53.48, 53.74 / 53.67, 54.70
        # / 54.60; at 65536, without -> 1092 / 1638 / 2185 blocks: 103.10 / 103.23 -> 102.65 /
        # 102.41, 102.05 / 102.64, 102.50 / 102.51 (with a tenth, 6554 blocks, it got slower:
        # 103.47 -> 103.72). e4m3fnuz 1x128 at 32768: 57.09 / 56.99 -> 56.23 / 56.22 (1638
        # blocks); 1x64 at 65536 108.36 -> 107.62. Outputs are bit for bit the same
        # (tests/test_triton.py).
        cfg = replace(cfg, k_tail=True)
    if m_hi <= plan.split_max_m:  # decode: a program per q tile (TritonBackend._split_max_m)
        cfg = replace(cfg, q_split=True)
    if plan.pdl:
        cfg = replace(cfg, pdl=_pdl(plan, m_hi))
    if m_hi == 1 and plan.one_row:
        # One row: M and q_programs as compile-time values (the kernel's ONE_ROW), so no program
        # waits on a parameter read before it knows its role and requests its first bytes. H200,
        # DeepSeek, same process, strided / contiguous, µs: plain norm 1.42-1.43 -> 1.35-1.37,
        # MXFP4 1.52-1.54 -> 1.47-1.48 (copy 1.06-1.08). FP8 got slower with it (1x128 1.49 ->
        # 1.50, per token 1.61 -> 1.66, e4m3fnuz per token 1.81 -> 1.86, per tensor 1.63 -> 1.66):
        # ptxas schedules their programs otherwise. Outputs are bit for bit the same.
        cfg = replace(cfg, one_row=True)
    if plan.two_pass and m_hi == 1:
        # One row: the tensor's amax is the row's, so the per-token launch computes the same scale
        # and bytes in one launch instead of two (the amax launch cost 1.7-1.8 µs at M = 1).
        return replace(cfg, one_pass=True)
    if plan.two_pass and not plan.q_chunked and not plan.fnuz_view and m_hi <= _TENSOR_ONE_MAX_M:
        # A few rows: one q program holds them all and reduces their amax itself, one launch
        # instead of the amax launch and the quantizing one. H200, DeepSeek shapes, strided:
        # 3.49-3.54 -> 2.55-2.57 µs at M = 2, 3.70-3.71 -> 2.97 at 16. e4m3fnuz, whose integer
        # encoder then runs in 16 warps of one program, got slower (3.89-3.91 -> 4.02-4.03 at
        # M = 2, 4.10-4.13 -> 4.39-4.43 at 16) and keeps the two launches.
        return replace(cfg, q_rows=m_hi, num_warps=_warps(m_hi * plan.q_tile, _EPT_QUANT), one_program=True)
    return cfg if plan.quantizes else replace(cfg, one_tile=True)


def _pdl(plan: _Plan, m_hi: int) -> int:
    """How the programs of a bucket up to ``m_hi`` rows take part in programmatic dependent launch.

    Each program waits for the previous kernel, then lets the next one launch (PDL_TRIGGER),
    except where that measured slower than a plain launch; there the programs only wait
    (PDL_WAIT), and the next kernel launches as they exit. H200, DeepSeek strided, a chain of
    calls in one CUDA graph, µs (best of three), plain -> PDL_TRIGGER / PDL_WAIT:

    - decode: plain norm 1.46 -> 1.05 / 1.22 at M = 1, 1.66 -> 1.23 / 1.40 at 64, 1.96 -> 1.54 /
      1.72 at 256; FP8 1x128 1.52 -> 1.07 / 1.29 at M = 1; MXFP4 1.56 -> 1.11 / 1.32; per-token
      FP8 1.65 -> 1.18 / 1.41; e4m3fnuz 1x128 1.63 -> 1.19 / 1.41; per-tensor FP8 3.78 -> 2.82 /
      3.29 at 64.
    - prefill: plain norm 18.32 -> 17.74 / 17.99 at 8192, 129.91 -> 129.25 / 129.59 at 65536;
      MXFP4 28.56 -> 28.12 / 28.38 at 16384, 104.30 -> 103.18 / 104.05 at 65536.
    - slower with PDL_TRIGGER: FP8 groups through the hardware conversion above 16384 rows
      (54.87 -> 55.60 / 54.63 at 32768, 106.21 -> 110.40 / 105.61 at 65536), where the next
      kernel's programs, launched while the last ones run, take their places on the SMs;
      per-tensor FP8 from 2049 to 8192 rows (25.02 -> 25.57 / 24.46 at 8192).
    """
    if plan.hw_groups and m_hi > _W_FIRST_MAX_M:
        return PDL_WAIT
    if plan.two_pass and _QUANT_DECODE_MAX_M < m_hi <= _QUANT_MID_MAX_M:
        return PDL_WAIT
    return PDL_TRIGGER


def _without_words(cfg: _Config) -> _Config:
    """``cfg`` for a call whose q rows or weights cannot be read as 32-bit words (not 4-byte aligned,
    or 2^31 rows and more: the kernel makes a zero of ``M >> 31``)."""
    return replace(cfg, words=False, maxnreg=None if cfg.reload else cfg.maxnreg)


def _held_rows(mode: QuantMode, fp8_enc: int, q_chunked: bool, caps: bool) -> tuple[int, int]:
    """``(unmasked_above, reload_above)``: above how many rows the one-warp programs of the
    issue-bound encoders go without masks, and hold x and the weights as loaded across the
    reduction (0: never). Compiled NVIDIA code only (``caps``).

    Held as fp32, a DeepSeek q row and its weights take those programs to 89-96 registers (21
    programs per SM; capped at 80 they spilled). Held as loaded (bf16 pairs) and widened again
    after the reduction (the kernel's RELOAD) they take 64, for 6% more instructions. Tiles that
    cover a row exactly, in blocks of one row below M, need no masks (UNMASKED): ptxas drops the
    predicates and zero fills. H200, DeepSeek, strided / contiguous, µs, the previous rule (x read
    again from L1 for e4m3fnuz groups; MXFP4 held as fp32, capped at 80) -> this one:

    - e4m3fnuz 1x128: 29.49 / 29.55 -> 29.25 / 29.15 at M = 16384, 110.06 / 109.20 -> 107.99 /
      107.43 at 65536; 1x64 29.80 / 29.47 -> 29.48 / 29.25 and 109.56 / 108.39 -> 107.51 /
      106.71; 1x32 30.08 / 29.74 -> 29.64 / 29.34 and 110.63 / 109.37 -> 108.82 / 107.91.
    - MXFP4: 28.37 / 28.07 -> 28.27 / 28.02 at 16384, 55.08 / 54.74 -> 54.38 / 54.27 at 32768,
      105.45 / 104.49 -> 103.19 / 102.95 at 65536 (91.3 / 91.5% of a copy). From 2049 to 8192
      rows, where its programs keep their k rows apart, without masks only: 9.57 / 9.55 -> 9.42
      / 9.42 at 4096 (held as loaded: 9.98 / 9.94), 16.91 / 16.77 -> 16.78 / 16.77 at 8192.
    - Not taken: e4m3fnuz per token without masks (16384 rows: 30.00 -> 29.98; 65536: 107.36 ->
      105.67), per-token e4m3fn (27.95 -> 27.93, 105.00 -> 105.04), and 64-register caps (1x128
      at 16384: 28.98 against 29.25, but 1x32 at 65536: 109.67 against 108.82).
    """
    from . import triton_quant_kernels as te

    if not caps or q_chunked:
        return 0, 0
    if mode is QuantMode.FP8_GROUP and fp8_enc == te.FP8_SOFT_FNUZ.value:
        return _QUANT_MID_MAX_M, _QUANT_MID_MAX_M
    if mode is QuantMode.MXFP4:
        return _QUANT_DECODE_MAX_M, _QUANT_MID_MAX_M
    return 0, 0


def _weights_first(plan: _Plan, m_hi: int) -> bool:
    """Whether the programs of a bucket up to ``m_hi`` rows request the weights before x.

    ptxas issues the weight loads after the sum of squares has waited for x, so a program waits
    for two memory round trips before its first store; with the weights requested first and a
    barrier between (the kernel's W_FIRST), both are in flight together. Measured on the H200
    (same process, the same configuration with and without, strided DeepSeek inputs, µs):

    - FP8 groups through the hardware conversion, every bucket to 16384 rows: 1x128 1.66 -> 1.64
      at M = 1, 2.01 -> 1.98 at 256, 5.98 -> 5.45 at 2048, 10.07 -> 8.65 at 4096, 16.58 -> 15.40
      at 8192, 29.49 -> 28.21 at 16384; 1x32 and 1x64 likewise. Above 16384 rows 1x64 got
      slower (107.1 -> 111.0 at 65536).
    - the other quantizing modes, from 257 to 16384 rows (with the register caps of _config):
      per token 10.08 -> 8.71 at 4096, MXFP4 11.04 -> 10.38, e4m3fnuz 1x128 11.29 -> 10.38,
      e4m3fnuz per token 11.10 -> 10.30 (uncapped). At decode sizes they got 0.02-0.07 µs
      slower, and above 16384 rows slower too (e4m3fnuz 1x128 112.1 -> 115.6 at 65536, capped);
      e4m3fnuz groups of 32 and 64 (10.07 -> 10.38 and 9.94 -> 10.46 at 4096) and per-tensor
      FP8 (9.52 -> 9.91 at 2048) got slower.
    - the plain norm, up to 16 rows: 1.47 -> 1.43 at M = 1, 1.54 -> 1.49 at 16 (1.89 -> 1.94 at
      256, 10.07 -> 10.30 at 4096).

    Not on ROCm, where it was not measured.
    """
    if torch.version.hip is not None:
        return False
    if plan.hw_groups:
        return m_hi <= _W_FIRST_MAX_M
    if not plan.quantizes:
        return m_hi <= 16
    return plan.mid_w_first and _DECODE_MAX_M < m_hi <= _W_FIRST_MAX_M


def _bucket_config(plan: _Plan, bucket: int) -> _Config:
    """Rows, warps and k placement per bucket (the q row layout is _config's)."""
    m_hi = _bucket_hi(bucket)
    q_tile, k_tile = plan.q_tile, plan.k_tile
    k_apart = 1 if plan.k_chunked else max(1, q_tile // k_tile)  # k rows per program of their own: a q row's worth
    # FP8 q rows are spread over the same warps in every bucket, so that a row's sum of squares is
    # reduced in the same order whatever the row count: with four warps at decode and one above,
    # the fp32 scales of 3 to 4 of 16 DeepSeek rows decoded alone differed in their last bit from
    # the same rows in a batch of 3000 or 20000 (H200). One warp costs nothing at decode for FP8
    # groups (1x128: 1.75 / 1.82 / 2.01 µs at M = 1 / 16 / 256 against 1.75 / 1.82 / 2.11 with four)
    # and 0.1 µs at M <= 16 for per-token FP8 (1.68 against 1.55 at M = 1). H200, 2026-11-30.
    fp8_warps = _warps(q_tile, _EPT_PREFILL if plan.q_chunked else _EPT_QUANT)
    if m_hi <= _DECODE_MAX_M or (plan.quantizes and m_hi <= _QUANT_DECODE_MAX_M):
        # Latency: k rows in programs of their own (with its q row, a program's two chains ran
        # one after the other: 1.81 against 1.37 µs at M = 1). The q row keeps the tiles of every
        # other bucket, so its sum of squares is reduced in the same order whatever the row count
        # (batch invariance): one padded tile here was faster for the group modes (FP8 1x128 at
        # M = 1: 1.60 against 1.74 µs on the H200) but changed the last bits of r, and so of the
        # outputs, between a row decoded alone and the same row in a batch of 3000 or 20000.
        if plan.fp8:
            return _Config(1, k_apart, fp8_warps)
        if plan.quantizes:
            # MXFP4 keeps four warps per q row (one took 2.19 against 1.61 µs at M = 1) and puts
            # k rows in blocks of the plain norm's prefill size (8 DeepSeek k rows): 1.61 / 1.68 /
            # 2.13 against 1.75 / 1.85 / 2.29 µs with one k row per program at M = 1 / 16 / 256.
            # Up to 2048 rows: one warp per q row (the next bucket's layout) was faster only near
            # the top of that bucket (weights first: 6.62 against 7.23 µs at M = 2048, 5.24
            # against 4.78 at 1024, 2.52 against 2.28 at 257).
            return _Config(1, max(1, _TILE_NORM // k_tile), _warps(q_tile, _EPT_DECODE))
        return _Config(1, 1, _warps(q_tile, _EPT_DECODE))
    if plan.q_chunked or plan.k_chunked:
        return _Config(1, k_apart, fp8_warps if plan.fp8 else _warps(q_tile, _EPT_PREFILL))
    # The plain norm keeps one padded tile per row in every bucket: three tiles took 10.3-10.5
    # against 9.8-9.9 µs at M = 4096 (the 1.34 against 1.45 µs they took at M = 1 would break
    # batch invariance if taken there alone). H200, 2026-11-30.
    if plan.quantizes and m_hi <= _QUANT_MID_MAX_M:
        # A few waves of programs, k rows in programs of their own, one warp per q row (no
        # cross-warp reduction; see the notes at the top of this module).
        return _Config(1, k_apart, _warps(q_tile, _EPT_QUANT))
    if plan.quantizes and plan.hw_groups:
        # FP8 groups through the hardware conversion issue the fewest instructions per element:
        # k rows apart, as in the mid bucket (M = 16384 / 65536, 1x128: 29.7 / 107.5 against
        # 30.9 / 109.3 µs with k rows in the q programs).
        return _Config(1, k_apart, _warps(q_tile, _EPT_QUANT))
    if plan.quantizes:
        # Issue-bound encoders (MXFP4, e4m3fnuz; per-token and per-tensor FP8): the fewest warps
        # per row, each q row with its k row so that every program mixes the quantizing
        # arithmetic with plain-norm traffic (M = 65536: FP8 1x128 109 against 115 µs, MXFP4 123
        # against 148 µs).
        return _Config(1, 1, _warps(q_tile, _EPT_QUANT), k_with_q=True)
    rows = max(1, min(_TILE_NORM // q_tile, m_hi))
    return _Config(rows, max(1, _TILE_NORM // k_tile), _warps(rows * q_tile, _EPT_PREFILL))


def _amax_launch(m: int, row_elements: int, chunked: bool) -> tuple[int, int, int]:
    """(rows per block, warps, programs) of the per-tensor amax launch over ``m`` q rows.

    ``row_elements`` is the q row as held in registers (tiles included); chunked rows are one
    row per block.
    """
    def rows_blocks(elements: int) -> tuple[int, int]:
        rows = 1 if chunked else _prev_pow2(min(elements // row_elements, m))
        return rows, m if chunked else -(-m // rows)

    rows, blocks = rows_blocks(_AMAX_ONE_BLOCK[0])
    if blocks <= _AMAX_PROGRAMS:
        return rows, _AMAX_ONE_BLOCK[1], blocks
    rows, blocks = rows_blocks(_AMAX_LOOPING[0])
    return rows, _AMAX_LOOPING[1], min(blocks, _AMAX_PROGRAMS)


def _warps(elements: int, per_thread: int) -> int:
    return max(1, min(16, elements // (32 * per_thread)))


# ---------------------------------------------------------------------------- the backend


class TritonBackend:
    """SPEC §4 in Triton kernels: every mode, one launch for q and k (two for per-tensor FP8)."""

    name = "triton"

    def __init__(self) -> None:
        self._plans: dict[tuple[object, ...], _Plan] = {}
        self._interpret = False
        self._kernels: Any = None
        self._runtime_names: list[str] = []  # the kernel's non-constexpr parameters, in order
        self._blank: dict[str, Any] = {}
        self._pick: Any = None
        self._constexpr_names: list[str] = []  # its constexpr parameters, in order (they come last)
        self._direct = False  # direct launches (see triton_launch.bind_direct)
        self._stream: Any = None
        self._hooks: Any = None
        self._planned = PlannedLaunches()  # direct launches per call plan (qknorm.request.QKNormPlan)

    # -- capability

    def available(self) -> tuple[bool, str]:
        return availability(self._loaded)

    def _loaded(self) -> bool:
        if self._kernels is None:
            self._load_kernels()
        return self._interpret

    def supports(self, req: Any) -> str | None:
        return device_unsupported(req.device.type, self._interpret)

    def warmup_sizes(self, max_m: int) -> list[int]:
        """One row count per launch-configuration bucket up to ``max_m`` (compile each before capture)."""
        sizes: list[int] = []
        lo = 1
        for hi in (*_BUCKETS, None):
            if lo > max_m:
                break
            sizes.append(max_m if hi is None else min(hi, max_m))
            if hi is not None:
                lo = hi + 1
        return sizes

    # -- planning

    def _load_kernels(self) -> None:
        import triton

        from . import triton_kernels

        kernel = triton_kernels._qk_rmsnorm_kernel
        # TRITON_INTERPRET is read by Triton when the kernels are decorated: the kernel's type says.
        self._interpret = not isinstance(kernel, triton.runtime.JITFunction)
        params = list(inspect.signature(kernel.fn).parameters.values())
        self._constexpr_names = [p.name for p in params if "constexpr" in str(p.annotation)]
        self._runtime_names = [p.name for p in params if "constexpr" not in str(p.annotation)]
        self._blank = dict.fromkeys(self._runtime_names)  # every runtime parameter, None until given
        self._pick = itemgetter(*self._runtime_names)  # a dict of them -> their values in kernel order
        self._strides = itemgetter(*_STRIDES)
        if not self._interpret and torch.cuda.is_available():
            self._stream = triton.runtime.driver.active.get_current_stream
            self._hooks = triton.knobs.runtime
            self._direct = direct_launch_supported(triton.__version__, torch.version.hip is not None)
        self._kernels = triton_kernels

    def _q_layout(self, req: Any) -> tuple[int, dict[bool, tuple[int, int, int]], int, bool]:
        """(Q_MODE, tiles, SPAN, chunked) of q for the request's mode and width (tiles as in _Plan)."""
        kn, mode, n1, gs = self._kernels, req.mode, req.n1, req.group_size
        if _next_pow2(n1) > _MAX_SINGLE:  # chunked: one row per program in chunks of NG * GS columns
            if mode is QuantMode.MXFP4 or (mode is QuantMode.FP8_GROUP and gs <= _CHUNK):
                chunk = max(_CHUNK, gs)
                q_mode = kn.Q_MXFP4 if mode is QuantMode.MXFP4 else kn.Q_GROUP
                return q_mode.value, dict.fromkeys((False, True), (chunk // gs, 1, gs)), n1, True
            span = gs if mode is QuantMode.FP8_GROUP else n1  # groups wider than a chunk: one scale per span
            q_mode = {QuantMode.NONE: kn.Q_NONE, QuantMode.FP8_TENSOR: kn.Q_TENSOR}.get(mode, kn.Q_ROW)
            return q_mode.value, dict.fromkeys((False, True), (1, 1, _CHUNK)), span, True
        q_mode = {
            QuantMode.NONE: kn.Q_NONE, QuantMode.FP8_GROUP: kn.Q_GROUP, QuantMode.FP8_TOKEN: kn.Q_ROW,
            QuantMode.FP8_TENSOR: kn.Q_TENSOR, QuantMode.MXFP4: kn.Q_MXFP4,
        }[mode]  # fmt: skip
        group = gs if mode in (QuantMode.FP8_GROUP, QuantMode.MXFP4) else None
        return q_mode.value, {False: _tiles(n1, group), True: _one_tile(n1, group)}, n1, False

    def _fp8_encoding(self, req: Any) -> int:
        """How the kernel makes FP8 bytes (``triton_quant_kernels.FP8_*``) for the request's output dtype."""
        from . import triton_quant_kernels as te

        if req.quant_dtype == torch.float8_e4m3fnuz:
            # The integer encoder. fnuz bytes are the hardware e4m3fn bytes of 2v (fnuz is fn with
            # the exponent bias one higher) except at fnuz's 0x7F / 0xFF (fn's NaN; fn saturates
            # to 0x7E), 0x80 (its NaN) and negative zero. Fixing those after the conversion
            # unpacks every byte (sm_90, DeepSeek FP8 1x128: 1552 against 1592 instructions per
            # program, where e4m3fn takes 1048); before it, the conversion cannot make 0xFF: it
            # turns every NaN into 0x7F whatever its sign (H200, Triton 3.6). Not used.
            return te.FP8_SOFT_FNUZ.value
        hw = False  # the hardware's e4m3fn conversion (NVIDIA sm_89+); ROCm and the interpreter use software
        if req.device.type == "cuda" and torch.version.hip is None and not self._interpret:
            hw = torch.cuda.get_device_capability(req.device) >= (8, 9)
        return (te.FP8_HW_FN if hw else te.FP8_SOFT_FN).value

    def _plan(self, req: Any, key: tuple[object, ...]) -> _Plan:
        if self._kernels is None:
            self._load_kernels()
        from . import triton_quant_kernels as te

        n1, n2, mode = req.n1, req.n2, req.mode
        q_mode, tiles, span, q_chunked = self._q_layout(req)
        k_chunked = n2 > 0 and _next_pow2(n2) > _MAX_SINGLE
        k_ng, k_nt, k_gs = (1, 1, _CHUNK) if k_chunked else _tiles(max(n2, 1), None)
        is_fp8 = mode.is_fp8
        caps = not self._interpret and torch.version.hip is None  # register caps: compiled code on NVIDIA
        constexprs: dict[str, Any] = dict(
            N1=n1, N2=max(n2, 1), Q_CHUNKED=q_chunked, Q_SPAN=span,
            K_NG=k_ng, K_NT=k_nt, K_GS=k_gs, K_CHUNKED=k_chunked, GEMMA=req.gemma, Q_MODE=q_mode,
            INV_FMAX=fp8_inv_max(req.quant_dtype) if is_fp8 else 1.0,
            FP8_ENC=self._fp8_encoding(req) if is_fp8 else 0, AMAX_BLOCK=_AMAX_PROGRAMS,
            NATIVE_CAST=req.device.type == "cuda" and torch.version.hip is None and not self._interpret,
            FMA=not self._interpret,
        )  # fmt: skip
        held = _held_rows(mode, constexprs["FP8_ENC"], q_chunked, caps)
        plan = _Plan(
            q_chunked=q_chunked, q_tile=_next_pow2(tiles[True][0] * tiles[True][2]), k_chunked=k_chunked,
            k_tile=_next_pow2(k_nt * k_ng * k_gs), quantizes=mode is not QuantMode.NONE,
            grouped=q_mode in (self._kernels.Q_GROUP.value, self._kernels.Q_MXFP4.value), tiles=tiles,
            constexprs=constexprs, two_pass=mode is QuantMode.FP8_TENSOR,
            fnuz_view=is_fp8 and req.quant_dtype == torch.float8_e4m3fnuz,
            device_index=req.device.index if req.device.type == "cuda" else None,
            register_cap=self._register_cap(q_mode, tiles[False]) if caps else None, fp8=is_fp8,
            hw_groups=mode is QuantMode.FP8_GROUP and constexprs["FP8_ENC"] == te.FP8_HW_FN.value,
            mid_w_first=mode not in (QuantMode.NONE, QuantMode.FP8_TENSOR) and not (
                mode is QuantMode.FP8_GROUP and constexprs["FP8_ENC"] == te.FP8_SOFT_FNUZ.value and req.group_size < 128),
            caps=caps,
            unmasked_above=held[0], reload_above=held[1],
            k_early=caps and mode is QuantMode.FP8_TOKEN and not q_chunked and not k_chunked and k_nt == 1,
            split_max_m=self._split_max_m(req, tiles[False][1], q_chunked, constexprs["FP8_ENC"]),
            k_tail=caps and (mode is QuantMode.MXFP4 or (
                mode is QuantMode.FP8_GROUP and constexprs["FP8_ENC"] == te.FP8_SOFT_FNUZ.value)),
            pdl=pdl_supported(req.device, self._interpret),
            one_row=caps and mode in (QuantMode.NONE, QuantMode.MXFP4),
            words=bool(held[0]) and mode is QuantMode.MXFP4 and req.group_size == 32 and req.q_residual is None
            and req.dtype == req.q_weight.dtype == torch.bfloat16 and math.prod(tiles[False]) == n1,
        )  # fmt: skip
        self._plans[key] = plan
        return plan

    def _split_max_m(self, req: Any, q_nt: int, q_chunked: bool, fp8_enc: int) -> int:
        """Up to how many rows each of a quantized q row's tiles is written by a program of its own (0: never).

        All the programs of a row read and reduce the whole row, as the unsplit program does (the
        same warps and order: the same bits), and each quantizes its tile: the dependent work
        before the last store holds a third of the encoding. Not where a q output may be written
        in place (q_out, q_res_out: the programs of a row read all of it while each writes its
        tile), nor for per-tensor FP8. H200, DeepSeek strided, graph-replay µs against the plain
        norm's (1.41-1.44 at M = 1, 1.49-1.52 at 16, 1.55 at 17, 1.65 at 64, 1.87-1.89 at 256):

        - up to 16 rows: FP8 1x128 1.62 -> 1.49 at M = 1 and 1.71 -> 1.60 at 16, 1x32 1.61 ->
          1.52, MXFP4 1.65 -> 1.54 and 1.72 -> 1.71, e4m3fnuz per token 2.02 -> 1.82 and 2.08 ->
          1.90. Per-token e4m3fn (the hardware encoder: little to split, and every program still
          reduces the row's amax) 1.63 -> 1.64: not split.
        - above, up to 256 rows, only the e4m3fnuz groups (the integer encoder) gain: 1x128 2.08
          -> 1.68 at 17, 2.13 -> 1.81 at 64, 2.28 -> 2.16 at 256 (three times the programs);
          FP8 1x128 went 1.83 -> 1.86 at 128 and 1.94 -> 2.14 at 256, MXFP4 1.73 -> 1.79 at 64,
          and e4m3fnuz per token 2.29 -> 2.39 at 256.

        Not on ROCm, where it was not measured.
        """
        from . import triton_quant_kernels as te

        mode = req.mode
        if (
            torch.version.hip is not None or q_nt == 1 or q_chunked or req.q_out is not None
            or req.q_residual is not None or mode in (QuantMode.NONE, QuantMode.FP8_TENSOR)
        ):  # fmt: skip
            return 0
        if mode is QuantMode.FP8_GROUP and fp8_enc == te.FP8_SOFT_FNUZ.value:
            return _DECODE_MAX_M
        if mode is QuantMode.FP8_TOKEN and fp8_enc == te.FP8_HW_FN.value:
            return 0
        return _SPLIT_MAX_M

    def _register_cap(self, q_mode: int, tiles: tuple[int, int, int]) -> int | None:
        """Registers per thread of the one-warp programs with k rows apart and the weights first,
        where a cap lets more of them share an SM (asked only where caps apply: compiled code on
        NVIDIA, the plan's ``caps``); None: the other modes' 96 (:func:`_config`).

        Only for DeepSeek's MXFP4 q rows (1536 columns as three tiles: 48 elements per thread),
        the layout measured: 88 (the programs take 94 uncapped; H200, strided / contiguous µs,
        M = 4096: 9.82 / 9.83 -> 9.65 / 9.58, 8192: 17.49 / 17.38 -> 17.07 / 17.00; 80 was
        slower). With their k rows (above 8192 rows) these programs were capped at 80 (89
        registers uncapped: 21 programs per SM; at 80, 25; M = 65536 / 16384: 112.9-113.4 /
        32.3 µs against 114.6-115.4 / 32.6-32.8 with the encoder before 3b5dece) until holding x
        as loaded (:func:`_held_rows`) took them to 64 uncapped, as it did e4m3fnuz groups.

        Other caps gained nothing or lost for the other FP8 modes (per-token e4m3fnuz needs 66:
        110.5 against 107.1 µs at a cap of 80, where ptxas then takes registers it does not need;
        at 4096 rows, 88 instead of 96: per-token FP8 8.65 -> 8.68 µs, e4m3fnuz per token 9.42 ->
        9.61, e4m3fnuz 1x128 9.63 -> 9.69).
        """
        kn = self._kernels
        if q_mode == kn.Q_MXFP4.value and tiles == (16, 3, 32):
            return 88
        return None

    # -- launching

    def run(self, req: Any) -> None:
        if self._planned.launch(req, self._stream, self._hooks):
            return
        m = req.m
        if m == 0:
            return
        key = req.key()
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(req, key)
        bucket = _bucket(m)
        cfg = plan.configs.get(bucket)
        if cfg is None:
            cfg = plan.configs[bucket] = _config(plan, bucket)
        dev = plan.device_index
        if dev is not None and dev != torch.cuda.current_device():
            with torch.cuda.device(dev):
                self._launch(req, plan, cfg)
        else:
            self._launch(req, plan, cfg)

    def _prepare(self, plan: _Plan, cfg: _Config, has_k: bool) -> _Launch:
        k_with_q = cfg.k_with_q and has_k
        q_ng, q_nt, q_gs = plan.tiles[cfg.one_tile]
        consts = {**plan.constexprs, "Q_ROWS": cfg.q_rows, "Q_NG": q_ng, "Q_NT": q_nt, "Q_GS": q_gs,
                  "K_ROWS": cfg.q_rows if k_with_q else cfg.k_rows, "K_WITH_Q": k_with_q, "W_FIRST": cfg.w_first,
                  "RELOAD": cfg.reload, "K_EARLY": cfg.k_early, "Q_SPLIT": cfg.q_split, "PDL": cfg.pdl,
                  "ONE_ROW": cfg.one_row, "UNMASKED": cfg.unmasked, "WORDS": cfg.words}  # fmt: skip
        if cfg.one_pass:
            consts["Q_MODE"] = self._kernels.Q_ROW.value
        elif cfg.one_program:
            consts["Q_MODE"] = self._kernels.Q_TENSOR_ONE.value
        launch = _Launch(consts, [consts[n] for n in self._constexpr_names], k_with_q)
        plan.launches[cfg] = launch
        return launch

    def _launch(self, req: Any, plan: _Plan, cfg: _Config) -> None:
        """Launch the kernel(s) for ``req`` with configuration ``cfg``, arguments by parameter name.

        ``args`` maps every runtime parameter to its value: pointers as integers (what a direct
        launch passes), None for absent tensors and their strides. About as much Python per call
        as a positional list (M = 1 is host-bound): the parameter order is read from the kernel.
        """
        m = req.m
        args = self._blank.copy()
        bits = 0  # OR of the pointers: their common alignment
        for name, attr, stride in _SLOTS:
            t = getattr(req, attr)
            if t is not None:
                p = args[name] = t.data_ptr()
                bits |= p
                if stride:
                    args[stride] = t.stride(0)
        if cfg.words and ((args["Q_PTR"] | args["Q_W_PTR"]) & 3 or args["q_stride"] & 1 or m >= 1 << 31):
            cfg = _without_words(cfg)  # rows read as 32-bit words must start 4-byte aligned (M: _rows_words' zero)
        scale = req.q_scale
        if scale is not None and scale.dim() > 1:
            args["q_scale_stride_g"] = scale.stride(1)
        elif cfg.one_pass:
            args["q_scale_stride_g"] = 0  # the one scale of a per-token launch over one row (chunked rows index it)
        launch = plan.launches.get(cfg) or self._prepare(plan, cfg, args["K_PTR"] is not None)
        q_programs = m if plan.q_chunked else -(-m // cfg.q_rows) * (launch.consts["Q_NT"] if cfg.q_split else 1)
        k_programs = 0
        if args["K_PTR"] is not None and not launch.k_with_q:
            k_programs = m if plan.k_chunked else -(-m // cfg.k_rows)
        elif launch.k_with_q and cfg.k_tail:
            k_programs = min(-(-m // cfg.q_rows) // _K_TAIL_SHARE, _K_TAIL_BLOCKS)  # the kernel reads the tail off the grid
        grid = q_programs + k_programs
        args.update(M=m, q_eps=req.q_eps, k_eps=req.k_eps, q_programs=q_programs)
        key = self._strides(args)  # the compiled kernel is specialized on these (None: absent)
        fast = launch.fast.get(key)
        if fast and not bits & 15 and m < 1 << 31 and not self._hooks.launch_enter_hook.calls:
            picked = list(self._pick(args))
            fast(grid, self._stream(plan.device_index), picked)
            self._remember(req, fast, grid, picked, plan.device_index)
            return
        tensors = {n: t for n, a in _TENSORS.items() if (t := getattr(req, a)) is not None}
        if plan.fnuz_view and "Q_QUANT_PTR" in tensors:
            tensors["Q_QUANT_PTR"] = tensors["Q_QUANT_PTR"].view(torch.uint8)
        args.update(tensors)
        if plan.two_pass and not (cfg.one_pass or cfg.one_program):
            self._launch_two_pass(grid, cfg, args, launch.consts)
            return
        compiled = self._compile_launch(grid, cfg, {**args, **launch.consts})
        if self._direct and fast is None and not bits & 15:
            launch.fast[key] = bind_direct(compiled, launch.tail) or False

    def _remember(self, req: Any, fast: Any, grid: int, picked: list[Any], device: int | None) -> None:
        """Keep a direct launch for ``req``'s call plan (:class:`~.triton_launch.PlannedLaunches`)."""
        plan = getattr(req, "plan", None)
        if plan is not None:
            slots = tuple((self._runtime_names.index(n), a) for n, a in _TENSORS.items() if getattr(req, a) is not None)
            self._planned.remember(plan, fast, grid, picked, slots, device)

    def _launch_two_pass(self, grid: int, cfg: _Config, args: dict[str, Any], consts: dict[str, Any]) -> None:
        """Per-tensor FP8: the amax launch (capped grid, one partial per program), then the main one.

        The amax launch reads all of q before anything can be quantized, so it must run at the
        memory's speed on its own: at most a few hundred programs, each over one or more blocks of
        several rows (one row per program would leave as many partials for the main launch).
        """
        rows, warps, amax_programs = _amax_launch(args["M"], consts["Q_NG"] * consts["Q_GS"] * consts["Q_NT"],
                                                  consts["Q_CHUNKED"])  # fmt: skip
        partials = torch.empty(amax_programs, dtype=torch.float32, device=args["Q_PTR"].device)
        inputs = ("Q_PTR", "q_stride", "Q_RES_PTR", "q_res_stride", "Q_W_PTR", "M", "q_eps", "k_eps")
        self._compile_launch(
            amax_programs, _Config(rows, 1, warps, pdl=cfg.pdl),
            {**{n: args[n] for n in inputs}, "q_programs": amax_programs, "AMAX_PTR": partials,
             **consts, "Q_ROWS": rows, "Q_MODE": self._kernels.Q_AMAX.value, "K_WITH_Q": False},
        )  # fmt: skip
        self._compile_launch(grid, cfg, {**args, "AMAX_PTR": partials, "amax_count": amax_programs, **consts})

    def _compile_launch(self, grid: int, cfg: _Config, args: dict[str, Any]) -> Any:
        """Launch through Triton's own path (compiling on first use); returns the compiled kernel."""
        try:
            return self._kernels._qk_rmsnorm_kernel[(grid,)](
                **{**self._blank, **args}, **launch_options(cfg.num_warps, cfg.maxnreg, cfg.pdl)
            )
        except Exception as exc:
            if is_build_failure(exc):
                raise BackendUnavailable(f"Triton kernel build failed: {type(exc).__name__}: {exc}") from exc
            raise
