"""Backend ``triton`` of ``qk_norm_rope``: launch heuristics and the launcher of
:mod:`qknorm.rope.triton_kernels` (one launch per call). Triton is imported on first use.

Heuristics
----------
A program owns a block of (token, head) rows of q, or of k (with their v rows and cache
writes). Four token-count buckets (``_BUCKETS``) fix the elements a block holds, the elements
each thread holds (which gives the warps), the load order, and, per cache dtype, whether
one-token blocks compute their row masks and whether v rows go to the cache first. Decode
sizes are latency bound: small blocks (more programs, each a short chain) with every load
before the norm's reduction in program order (measured faster there; ptxas still chooses the
issue order, see ``_norm_rope_rows``). Prefill sizes are bandwidth bound: fuller blocks with
many elements per thread, and the weights and cos/sin loaded after the reduction, which keeps
fewer registers live across it and more programs resident per SM. Offsets are computed in 32
bits wherever every offset of the call fits (``_offsets_fit_int32``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..backends.base import BackendUnavailable
from ..backends.triton_launch import (
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
from ..quant import fp8_max
from .checks import RopePlan, RopeRequest

__all__ = ["RopeTritonBackend", "launch_config"]

# Measured on an NVIDIA H200 (docs/benchmarks.md, qk_norm_rope section: the sweep at commit
# 1f402e1; T=65536 from the A/B run there), Qwen3-8B shapes, CUDA-graph replay, µs per call, bf16 /
# FP8 cache (tile = elements per program, ept = elements per thread; early / late = loads before /
# after the norm's reduction; decode-sized inputs in L2):
#   T=1     tile 512 ept 4: early 1.43 / 1.53, late 1.59 / 1.65;  tile 1024 ept 8: early 1.90 / 1.62, late 1.87 / 2.12
#   T=64    tile 512 ept 4: early 1.82 / 1.90, late 1.94 / 2.03;  tile 1024 ept 8: early 2.17 / 1.94, late 2.19 / 2.40
#   T=256   tile 1024 ept 8: early 2.94 / 2.88, late 2.94 / 3.18;  tile 512 ept 4: early 3.39 / 3.63
#   T=16384 tile 2048 ept 32: late 106.8 / 104.3, early 109.6 / 115.4;  tile 4096 ept 32: late 107.9 / 105.1
#   T=65536 tile 2048 ept 32: late 414.5, early 424.4;  tile 4096 ept 32: late 417.3 / 402.5, early 426.4 / 456.7
# k programs (norm, RoPE, v rows, two cache writes) take the lowest program ids, so they start in
# the first wave; q programs (the same chain without v and one store) fill in after them. Against q
# programs first, same run (commit 5f061fe, bf16 / FP8 cache): T=1 1.50 / 1.54 against 1.42-1.44 /
# 1.52; T=256 2.90-2.92 / 2.93-2.96 against 2.94-2.97 / 2.89-2.93; T=1024 9.57 / 9.50-9.53 against
# 10.18-10.20 / 10.96-10.97; T=16384 105.9 / 102.0 against 106.9 / 103.5; T=65536 412.9 / 396.6
# against 413.2 / 396.8.
# Early loads cost registers (72 against 62-64 per thread at T=16384: 7 programs per SM instead of
# 8, 3.64 against 3.72-3.77 TB/s in Nsight Compute), so prefill loads late. At T=256 the order
# does not move bf16 and early loads save FP8 0.3 µs.
# Per bucket and cache dtype, three flags of the kernel (_Flags). Measured on the H200, Qwen3-8B,
# CUDA-graph replay, µs, bf16 / FP8 cache, with 32-bit offsets (docs/benchmarks.md, section "qk_norm_rope:
# shorter programs, v rows first"; flags (early loads, row masks, v first)):
#   T=1    (T,T,F) 1.34-1.36 / 1.43-1.45  (T,F,F) 1.45-1.48 / 1.42-1.44  (T,T,T) 1.44-1.47 / 1.52-1.54
#   T=64   (T,T,F) 1.70-1.71 / 1.72-1.74  (T,F,F) 1.77 / 1.77             (T,T,T) 1.73-1.75 / 1.82-1.83
#   T=128  (T,T,F) 2.09-2.11 / 2.08-2.09  (T,T,T) 1.91-1.92 / 2.12        (T,F,T) 2.01-2.05 / 2.05
#   T=256  (T,T,F) 2.69 / 2.44-2.45      (T,T,T) 2.35-2.36 / 2.43        (T,F,T) 2.54-2.58 / 2.40-2.41
#   T=512   (F,F,F) 6.17-6.26 / 6.38-6.49 (F,F,T) 5.86-5.94 / 6.15-6.21  (F,T,T) 5.86-5.92 / 6.19-6.28
#   T=1024  (F,T,F) 8.85-8.87 / 9.83-9.87 (F,F,F) 8.88-8.93 / 9.27-9.30  (F,F,T) 8.32-8.39 / 9.10-9.13
#   T=2048  (F,F,F) 15.11-15.18 / 15.04-15.06  (F,F,T) 14.61 / 15.22-15.24  (T,F,T) 14.61-14.62 / 15.18-15.20
#   T=4096  (F,F,F) 28.17-28.18 / 27.03  (F,F,T) 27.52 / 28.94-28.96
#   T=8192  (F,F,F) 54.24-54.35 / 52.08-52.09  (F,F,T) 53.47-53.49 / 59.33-59.34
#   T=16384 (F,T,F) 105.5 / 104.2         (F,F,F) 105.5 / 101.0          (F,F,T) 104.4 / 118.2
# Row masks of one-token blocks are always true: computing them anyway changes only ptxas's
# schedule, and measured faster at decode sizes. v rows first send their cache stores out while
# the k rows are still loading (-0.33 µs at T=256 with a bf16 cache); with an FP8 cache they
# measured slower from T=2048 on, where a warp also converts its v rows before its k rows are read.
@dataclass(frozen=True)
class _Flags:
    early_loads: bool  # every load before the norm's reduction in program order
    row_mask: bool  # one-token blocks compute their row masks
    v_first: bool  # v rows loaded and written to the cache before the norm of k


@dataclass(frozen=True)
class _Bucket:
    max_t: int | None  # largest T of the bucket (None: no limit)
    tile: int  # elements per program
    ept: int  # elements per thread
    flags: _Flags  # without an FP8 cache
    flags_fp8: _Flags  # with one


_BUCKETS: tuple[_Bucket, ...] = (
    _Bucket(64, 512, 4, _Flags(True, True, False), _Flags(True, True, False)),
    _Bucket(256, 1024, 8, _Flags(True, True, True), _Flags(True, False, True)),
    _Bucket(1024, 2048, 32, _Flags(False, False, True), _Flags(False, False, True)),
    _Bucket(None, 2048, 32, _Flags(False, False, True), _Flags(False, False, False)),
)
_MAX_WARPS = 16
# Programmatic dependent launch (where qknorm.set_pdl turns it on): between these token counts the
# programs only wait for the previous kernel (PDL_WAIT); elsewhere each also lets the next kernel
# launch once it may start (PDL_TRIGGER). H200, Qwen3-8B, a chain of calls in one CUDA graph, µs
# (best of two), bf16 / FP8 cache, plain -> PDL_TRIGGER / PDL_WAIT: T=1 1.42/1.54 -> 1.04/1.16 /
# 1.19/1.30; T=16 1.58/1.71 -> 1.28/1.32 / 1.35/1.47; T=64 1.82/1.88 -> 1.36/1.81 / 1.65/1.65;
# T=128 2.19/2.28 -> 2.12/2.08 / 1.91/2.12; T=256 2.78/2.73 -> 2.92/3.18 / 2.54/2.49; T=512
# 6.22/6.52 -> 6.31/7.16 / 6.04/6.33; T=1024 9.30/9.60 -> 8.63/9.11 / 9.05/9.45; T=4096
# 28.48/27.32 -> 27.86/26.65 / 28.01/27.20; T=65536 412.1/394.7 -> 411.1/393.5 / 411.7/394.0.
# Between 128 and 512 tokens a launch is one to two waves of programs: the next kernel's programs,
# launched early, take the places of this one's. With an FP8 cache the waiting starts above 16 tokens (T=64).
_PDL_WAIT_T = (64, 512)  # PDL_WAIT for lo < T <= hi
_PDL_WAIT_T_FP8 = (16, 512)  # ... with an FP8 cache


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class LaunchConfig:
    rows_q: int
    rows_k: int
    num_warps: int
    early_loads: bool
    pdl: int = PDL_OFF  # programmatic dependent launch (triton_launch.PDL_*)
    row_mask: bool = True  # one-token blocks compute their (always true) row mask (the kernel's ROW_MASK)
    v_first: bool = False  # v rows written to the cache before the norm of k (V_FIRST)
    off32: bool = False  # every element offset of the call fits in int32 (OFF32; set per call, launch_args)


def _bucket(t: int) -> _Bucket:
    return next(b for b in _BUCKETS if b.max_t is None or t <= b.max_t)


def launch_config(plan: RopePlan, t: int, pdl: bool = False) -> LaunchConfig:
    """Rows per program, warps, load order and the kernel's flags for ``t`` tokens (a shape-only
    rule, no autotuning); with ``pdl``, how the programs take part in programmatic dependent launch."""
    width = _padded_width(plan)
    bucket = _bucket(t)
    tile, ept = bucket.tile, bucket.ept
    flags = bucket.flags_fp8 if plan.cache_fp8 else bucket.flags
    rows = 1 << (max(1, tile // width).bit_length() - 1)  # a power of two (tl.arange)
    rows_q = min(rows, _next_pow2(t * plan.hq))
    rows_k = min(rows, _next_pow2(t * plan.hk))
    warps = max(1, min(_MAX_WARPS, rows_q * width // (32 * ept)))
    mode = PDL_OFF
    if pdl:
        lo, hi = _PDL_WAIT_T_FP8 if plan.cache_fp8 else _PDL_WAIT_T
        mode = PDL_WAIT if lo < t <= hi else PDL_TRIGGER
    return LaunchConfig(rows_q, rows_k, _next_pow2(warps), flags.early_loads, mode, flags.row_mask, flags.v_first)


def _padded_width(plan: RopePlan) -> int:
    half, rest = _half_pass(plan)
    return (2 * half if plan.rot else 0) + (rest if plan.d > plan.rot else 0)


def _half_pass(plan: RopePlan) -> tuple[int, int]:
    """(HALF_P, PASS_P): padded widths of the pair tiles and of the pass-through tile (each >= 1)."""
    return _next_pow2(max(1, plan.rot // 2)), _next_pow2(max(1, plan.d - plan.rot))


def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset of ``t`` from its first element (0 when empty)."""
    return sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0


def _offsets_fit_int32(req: RopeRequest) -> bool:
    """Whether every element offset the kernel computes for ``req`` fits in int32: each is at most
    its tensor's largest offset (a position or slot outside its range is replaced by 0), and a
    valid slot, split in 32 bits, is below ``num_slots``."""
    if req.plan.num_slots >= 2**31:
        return False
    return all(_max_offset(t) < 2**31 for t in (getattr(req, a) for a in _TENSORS.values()) if t is not None)


def _stride(t: torch.Tensor | None, dim: int) -> int:
    return 0 if t is None else t.stride(dim)


def _bytes(t: torch.Tensor | None, fp8: bool) -> torch.Tensor | None:
    """FP8 tensors are written as their bytes (Triton has no e4m3fnuz pointer type off ROCm)."""
    return t.view(torch.uint8) if t is not None and fp8 else t


class RopeTritonBackend:
    """§3 in one Triton launch: q, k, FP8 q, the cache write of k and v."""

    name = "triton"

    def __init__(self) -> None:
        self._kernel: Any = None
        self._interpret = False
        # per plan key: the compile-time arguments of _compile_args, and whether launches use PDL
        self._constexprs: dict[tuple[object, ...], tuple[dict[str, Any], bool]] = {}
        self._direct: dict[tuple[object, ...], Callable[[int, int, list[Any]], None]] = {}
        self._planned = PlannedLaunches()  # direct launches per call plan (qknorm.rope.request.RopePlan)
        self._fast_ok = False  # direct launches (triton_launch.bind_direct): compiled Triton 3.6 on CUDA
        self._params: list[str] = []
        self._stream: Any = None
        self._hooks: Any = None
        self._off64 = False  # inside offsets_64_bit()

    def available(self) -> tuple[bool, str]:
        return availability(self._loaded)

    def _loaded(self) -> bool:
        if self._kernel is None:
            self._load()
        return self._interpret

    def supports(self, req: RopeRequest) -> str | None:
        return device_unsupported(req.plan.device.type, self._interpret)

    def warmup_sizes(self, max_t: int) -> list[int]:
        """Token counts up to ``max_t`` that reach every compiled variant: the powers of two and ``max_t``.

        Rows per program are ``min(block, next_pow2(t * heads))`` (:func:`launch_config`), so within
        a bucket each power of two can compile its own variant; the bucket bounds are powers of two.
        """
        sizes = {max_t} if max_t >= 1 else set()
        t = 1
        while t <= max_t:
            sizes.add(t)
            t *= 2
        return sorted(sizes)

    def _load(self) -> None:
        import triton

        from . import triton_kernels

        self._kernel = triton_kernels._qk_norm_rope_kernel
        # TRITON_INTERPRET is read by Triton when the kernels are decorated: the kernel's type says.
        self._interpret = not isinstance(self._kernel, triton.runtime.JITFunction)
        if not self._interpret and torch.cuda.is_available():
            self._params = list(self._kernel.arg_names)
            self._stream = triton.runtime.driver.active.get_current_stream
            self._hooks = triton.knobs.runtime
            self._fast_ok = direct_launch_supported(triton.__version__, torch.version.hip is not None)

    def _compile_args(self, plan: RopePlan) -> dict[str, Any]:
        """The compile-time arguments that depend on the plan's key alone."""
        half, rest = _half_pass(plan)
        native = plan.device.type == "cuda" and torch.version.hip is None and not self._interpret
        native_fp8 = native and torch.cuda.get_device_capability(plan.device) >= (8, 9)
        c_fp8, q_fp8 = plan.cache_fp8, plan.q_fp8
        return dict(
            HQ=plan.hq, HK=plan.hk, D=plan.d, ROT=plan.rot, HALF_P=half, PASS_P=rest,
            DV=max(plan.dv, 1), DV_P=_next_pow2(max(plan.dv, 1)), BLOCK_SIZE=max(plan.block_size, 1),
            K_SCALE_HEADS=max(plan.k_scale_heads, 1), V_SCALE_HEADS=max(plan.v_scale_heads, 1),
            IS_NEOX=plan.is_neox, GEMMA=plan.gemma,
            Q_FP8=q_fp8, Q_FMAX=fp8_max(plan.q_out_dtype) if q_fp8 else 448.0,
            Q_FNUZ=plan.q_out_dtype == torch.float8_e4m3fnuz,
            C_FP8=c_fp8, C_FMAX=fp8_max(plan.cache_dtype) if c_fp8 else 448.0,  # type: ignore[arg-type]
            C_FNUZ=plan.cache_dtype == torch.float8_e4m3fnuz,
            NATIVE=native, NATIVE_FP8=native_fp8, FMA=not self._interpret,
        )  # fmt: skip

    @contextmanager
    def offsets_64_bit(self) -> Iterator[None]:
        """Calls made inside launch the kernel with 64-bit offsets whatever their tensors' sizes,
        and leave no launch behind for later calls to repeat. Warm-up compiles that variant this
        way: it is what a call takes whose table or cache holds 2^31 elements or more (warm-up's
        own are small)."""
        self._off64 = True
        try:
            yield
        finally:
            self._off64 = False

    def run(self, req: RopeRequest) -> None:
        if not self._off64 and self._planned.launch(req, self._stream, self._hooks):
            return
        plan = req.plan
        if plan.t == 0:
            return
        if self._kernel is None:
            self._load()
        dev = plan.device.index if plan.device.type == "cuda" else None
        if dev is not None and dev != torch.cuda.current_device():
            with torch.cuda.device(dev):
                self._launch(req)
        else:
            self._launch(req)

    def launch_args(self, req: RopeRequest) -> tuple[int, LaunchConfig, dict[str, Any], dict[str, Any]]:
        """``(programs, config, runtime arguments, compile-time arguments)`` of ``req``'s launch, by name."""
        if self._kernel is None:
            self._load()
        plan = req.plan
        key = plan.key()
        known = self._constexprs.get(key)
        if known is None:
            known = self._constexprs[key] = (self._compile_args(plan), pdl_supported(plan.device, self._interpret))
        constexprs, pdl = known
        cfg = launch_config(plan, plan.t, pdl)
        if not self._off64 and _offsets_fit_int32(req):
            cfg = replace(cfg, off32=True)
        q_programs = -(-plan.t * plan.hq // cfg.rows_q)
        k_programs = -(-plan.t * plan.hk // cfg.rows_k)
        q, k, v, kc, vc, ko, table = req.q, req.k, req.v, req.k_cache, req.v_cache, req.k_out, req.cos_sin_cache
        qo = req.q_out.view(torch.uint8) if plan.q_fp8 else req.q_out
        kc, vc = _bytes(kc, plan.cache_fp8), _bytes(vc, plan.cache_fp8)
        args = dict(
            Q_PTR=q, q_stride_t=q.stride(0), q_stride_h=q.stride(1),
            K_PTR=k, k_stride_t=k.stride(0), k_stride_h=k.stride(1),
            Q_W_PTR=req.q_weight, K_W_PTR=req.k_weight,
            COS_SIN_PTR=table, cos_sin_stride=_stride(table, 0), POS_PTR=req.positions, max_pos=plan.max_pos,
            Q_OUT_PTR=qo, q_out_stride_t=qo.stride(0), q_out_stride_h=qo.stride(1),
            K_OUT_PTR=ko, k_out_stride_t=_stride(ko, 0), k_out_stride_h=_stride(ko, 1),
            V_PTR=v, v_stride_t=_stride(v, 0), v_stride_h=_stride(v, 1),
            K_CACHE_PTR=kc, kc_stride_b=_stride(kc, 0), kc_stride_s=_stride(kc, 1), kc_stride_h=_stride(kc, 2),
            V_CACHE_PTR=vc, vc_stride_b=_stride(vc, 0), vc_stride_s=_stride(vc, 1), vc_stride_h=_stride(vc, 2),
            SLOT_PTR=req.slot_mapping, num_slots=plan.num_slots,
            K_SCALE_PTR=req.k_scale, V_SCALE_PTR=req.v_scale, Q_SCALE_PTR=req.q_scale,
            T=plan.t, q_eps=plan.q_eps, k_eps=plan.k_eps, k_programs=k_programs,
        )  # fmt: skip
        meta = {"ROWS_Q": cfg.rows_q, "ROWS_K": cfg.rows_k, "EARLY_LOADS": cfg.early_loads,
                "ONE_Q": plan.hq % cfg.rows_q == 0, "ONE_K": plan.hk % cfg.rows_k == 0, "PDL": cfg.pdl,
                "ROW_MASK": cfg.row_mask, "OFF32": cfg.off32, "V_FIRST": cfg.v_first and plan.has_cache}  # fmt: skip
        return q_programs + k_programs, cfg, args, {**constexprs, **meta}

    def _launch(self, req: RopeRequest) -> None:
        grid, cfg, args, constexprs = self.launch_args(req)
        tensors = [a for a in args.values() if isinstance(a, torch.Tensor)]
        aligned = self._fast_ok and not self._off64 and not any(t.data_ptr() & 15 for t in tensors)
        fast_key = (req.plan.key(), cfg, *(v for n, v in args.items() if n not in _UNSPECIALIZED and type(v) is int))
        if aligned and not (self._hooks.launch_enter_hook.calls or self._hooks.launch_exit_hook.calls):
            direct = self._direct.get(fast_key)
            if direct is not None:
                values = self._values(args, constexprs)
                direct(grid, self._stream(req.plan.device.index), values)
                self._remember(req, direct, grid, values)
                return
        try:
            ck = self._kernel[(grid,)](**args, **constexprs, **launch_options(cfg.num_warps, pdl=cfg.pdl))
        except Exception as exc:
            if is_build_failure(exc):
                raise BackendUnavailable(f"Triton kernel build failed: {type(exc).__name__}: {exc}") from exc
            raise
        if aligned and ck is not None:
            # Every parameter goes in ``values`` (the constexprs last, as the kernel lists them).
            direct = bind_direct(ck, [])
            if direct is not None:
                self._direct[fast_key] = direct
                self._remember(req, direct, grid, self._values(args, constexprs))

    def _values(self, args: dict[str, Any], constexprs: dict[str, Any]) -> list[Any]:
        """Every kernel parameter in order, tensors as their pointers (what a direct launch passes)."""
        merged = {**args, **constexprs}
        return [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in map(merged.__getitem__, self._params)]

    def _remember(self, req: RopeRequest, direct: Callable[[int, int, list[Any]], None], grid: int,
                  values: list[Any]) -> None:  # fmt: skip
        """Keep ``req``'s direct launch for later calls of its plan (:class:`PlannedLaunches`)."""
        slots = tuple((self._params.index(n), a) for n, a in _TENSORS.items() if getattr(req, a) is not None)
        self._planned.remember(req.plan, direct, grid, values, slots, req.plan.device.index)


# Kernel parameters holding tensors -> the request attribute that supplies them.
_TENSORS = {
    "Q_PTR": "q", "K_PTR": "k", "Q_W_PTR": "q_weight", "K_W_PTR": "k_weight", "COS_SIN_PTR": "cos_sin_cache",
    "POS_PTR": "positions", "Q_OUT_PTR": "q_out", "K_OUT_PTR": "k_out", "V_PTR": "v", "K_CACHE_PTR": "k_cache",
    "V_CACHE_PTR": "v_cache", "SLOT_PTR": "slot_mapping", "K_SCALE_PTR": "k_scale", "V_SCALE_PTR": "v_scale",
    "Q_SCALE_PTR": "q_scale",
}  # fmt: skip


# Integer arguments Triton does not specialize on (the kernel's do_not_specialize list): a
# compiled kernel serves every value of these, and only these.
_UNSPECIALIZED = frozenset({"T", "k_programs", "max_pos", "num_slots"})
