"""Backend ``triton``: launcher and launch heuristics for :mod:`qknorm.backends.triton_kernels`.

One launch normalizes q rows and k rows together (per-tensor FP8 takes two: a first launch
reduces the amax of y over all of q, the second quantizes with it). Everything that does not
depend on the row count is worked out once per request key (:class:`_Plan`); the launch
configuration is chosen per (key, M bucket) from the shape alone, never by autotuning.
Triton is imported on first use only.

Heuristics (measured numbers in the notes block below)
------------------------------------------------------
- Tile: ``[rows, groups, group]`` with the quantization group as the last axis (group maxima
  are reductions within a thread and a few lanes), or ``[rows, 1, next_pow2(n)]``. Rows whose
  padded width exceeds ``_MAX_SINGLE`` columns are processed one per program in
  ``_CHUNK``-column passes (sum of squares, [span amax], write), re-reading the row from L2.
- Decode (M <= 256): one q row and one k row per program, warps so that each thread holds
  ``_EPT_DECODE`` elements: all loads are in flight before the first reduction, and a row
  costs one memory round trip.
- Prefill: ``_TILE_PREFILL`` elements per program (2 DeepSeek q rows, 8 k rows), 16-byte
  vectors (Triton specializes strides divisible by 16), ``_EPT_PREFILL`` elements per thread.

Per-call cost
-------------
The first call of a (configuration, integer arguments) signature goes through Triton's
``kernel[grid](...)``, which compiles on first use and returns the compiled kernel; later
calls with 16-byte aligned pointers launch that kernel directly through Triton's C launch
entry with integer pointers (:func:`_bind_fast`, enabled for Triton 3.6 on CUDA only).
Triton's own path re-derives the specialization of ~50 arguments and asks the driver about
every pointer on each call. On the H100 host below (a slow CPU: an empty Triton kernel costs
11-20 µs to launch from Python there, 3.5 µs on the machine of the peers' table),
``TritonBackend.run`` on a built request went from 42 µs to 21 µs per call at M = 1.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from operator import or_
from typing import Any

import torch

from ..quant import QuantMode, fp8_inv_max, fp8_max
from ..request import QKNormRequest
from .base import BackendUnavailable

__all__ = ["TritonBackend"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- heuristics
# Notes: NVIDIA H100 80GB HBM3, 2026-11-27, triton 3.6.0, torch 2.11.0+cu130, measured with
# benchmarks/gpu_check_triton.py. DeepSeek q [M,1536] + k [M,512] bf16 split from [M,2112],
# FP8 = norm + 1x128 group quantization of q (codes, scales, k). CUDA-graph replay, µs per
# call; "cold": inputs rotate over ~200 MB of buffers, "hot": one buffer set (stays in L2).
#
#   M       device copy       norm strided      norm contig   FP8 strided      FP8 contig
#   1       1.03              1.54              1.53          1.72             1.73
#   16      1.31              1.60              1.63          1.81             1.82
#   256     1.55              2.28 (hot 2.03)   2.24          2.35 (hot 2.25)  2.25
#   4096    13.53 (hot 8.02)  13.48 (hot 8.11)  13.34         14.91 (hot 11.46) 14.65
#   16384   47.47             48.01             47.17         46.55            45.50
#   65536   179.63            183.05            180.01        161.20           158.42
#
# Configurations (q rows / k rows / warps) from the sweep of the same script:
#   M=1     norm 1/1/4 1.49, 1/1/8 1.46, 1/1/2 1.51;  FP8 1/1/4 1.70, 1/1/8 1.69, 1/1/2 2.00
#   M=256   norm 1/1/4 2.06, 2/2/4 2.13, 1/1/2 2.14;  FP8 1/1/4 2.22, 1/4/4 2.14, 1/1/8 2.37
#   M=4096  norm 2/8/4 13.35, 2/8/8 13.59, 1/4/4 14.16;  FP8 1/4/4 13.68, 2/8/2 13.83, 2/8/4 14.48
#   M=65536 norm 2/8/4 182.4, 4/16/4 182.3, 1/4/4 182.6;  FP8 2/8/2 161.1, 4/16/2 162.6, 1/4/4 169.3
# More warps only pay for latency at decode sizes; at prefill a thread should own 32 elements
# (64 when quantizing at large M: the extra arithmetic then hides more memory latency).
# Earlier versions, same machine: FP8 with one IEEE division per element 3.94 µs at M=1 and
# 285 µs at M=65536 (each division branches to a slow path); the correctly rounded r
# (1/sqrt_rn) instead of rsqrt cost 8% at M=65536 with FP8.
_DECODE_MAX_M = 256
# Row-count buckets: each gets its own launch configuration (and compiled variant).
_BUCKETS = (1, 16, 256, 2048, 16384)
_MAX_SINGLE = 8192  # widest padded row kept whole in registers
_CHUNK = 4096  # columns per pass for wider rows
_EPT_DECODE = 16  # elements per thread at decode sizes
_EPT_PREFILL = 32  # elements per thread at prefill sizes
_EPT_PREFILL_QUANT = 64  # ... when quantizing, above the last bucket
_TILE_PREFILL = 4096  # elements per program at prefill sizes
_AMAX_PROGRAMS = 512  # programs of the per-tensor amax launch (the partials every program re-reads)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _bucket(m: int) -> int:
    """Index of the row-count bucket of ``m`` (the upper bounds are ``_BUCKETS``)."""
    for i, hi in enumerate(_BUCKETS):
        if m <= hi:
            return i
    return len(_BUCKETS)


@dataclass(frozen=True)
class _Config:
    """Launch configuration of one (key, M bucket)."""

    q_rows: int
    k_rows: int
    num_warps: int


@dataclass
class _Plan:
    """Everything about a request key that does not depend on M."""

    n1: int
    n2: int
    q_block: int  # padded q width (single) or chunk width (chunked)
    q_chunked: bool
    k_block: int
    k_chunked: bool
    constexprs: dict[str, Any]  # kernel compile-time arguments except the per-bucket ones
    two_pass: bool  # per-tensor FP8: an amax launch first
    quantizes: bool  # q is quantized (more arithmetic per element: fewer warps pay at prefill)
    fnuz_view: bool  # pass the FP8 output as uint8 (Triton has no e4m3fnuz pointer type off ROCm)
    device_index: int | None  # CUDA device of the tensors (Triton launches on the current device)
    configs: dict[int, _Config] = field(default_factory=dict)
    fast: dict[tuple[object, ...], Callable[[int, int, list[Any]], None]] = field(default_factory=dict)


def _config(plan: _Plan, bucket: int) -> _Config:
    """The launch configuration of ``plan`` for row-count bucket ``bucket`` (shape-only rule)."""
    m_hi = _BUCKETS[bucket] if bucket < len(_BUCKETS) else 1 << 20
    if plan.q_chunked:
        q_rows, q_tile, ept = 1, plan.q_block, _EPT_DECODE
    elif m_hi <= _DECODE_MAX_M:
        q_rows, q_tile, ept = 1, plan.q_block, _EPT_DECODE
    else:
        q_rows = max(1, min(_TILE_PREFILL // plan.q_block, m_hi))
        q_tile = q_rows * plan.q_block
        ept = _EPT_PREFILL_QUANT if plan.quantizes and m_hi > _BUCKETS[-1] else _EPT_PREFILL
    num_warps = max(1, min(16, q_tile // (32 * ept)))
    k_rows = 1 if plan.k_chunked or m_hi <= _DECODE_MAX_M else max(1, min(q_tile // plan.k_block, m_hi))
    return _Config(q_rows=q_rows, k_rows=k_rows, num_warps=num_warps)


# ---------------------------------------------------------------------------- the backend


class TritonBackend:
    """SPEC §4 in Triton kernels: every mode, one launch for q and k (two for per-tensor FP8)."""

    name = "triton"

    def __init__(self) -> None:
        self._plans: dict[tuple[object, ...], _Plan] = {}
        self._interpret = False
        self._kernels: Any = None
        self._constexpr_names: list[str] = []
        self._fast_ok = False  # direct launches (see _bind_fast): Triton 3.6 on CUDA
        self._stream: Any = None
        self._hooks: Any = None

    # -- capability

    def available(self) -> tuple[bool, str]:
        try:
            import triton

            if self._kernels is None:
                self._load_kernels()
        except Exception as exc:  # any import failure means unavailable
            return False, f"triton is not importable ({type(exc).__name__}: {exc})"
        if self._interpret:
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1)"
        if torch.cuda.is_available():
            return True, f"triton {triton.__version__} on a GPU"
        return False, "no GPU (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"

    def supports(self, req: QKNormRequest) -> str | None:
        dev = req.device.type
        if dev == "cuda" or (dev == "cpu" and self._interpret):
            return None
        if dev == "cpu":
            return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
        return f"device type {dev} is not supported by the Triton backend"

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
        params = inspect.signature(kernel.fn).parameters.values()
        self._constexpr_names = [p.name for p in params if "constexpr" in str(p.annotation)]
        if not self._interpret and torch.cuda.is_available():
            self._stream = triton.runtime.driver.active.get_current_stream
            self._hooks = triton.knobs.runtime
            self._fast_ok = triton.__version__.startswith("3.6.") and torch.version.hip is None
        self._kernels = triton_kernels

    def _plan(self, req: QKNormRequest, key: tuple[object, ...]) -> _Plan:
        if self._kernels is None:
            self._load_kernels()
        kn = self._kernels
        n1, n2, mode, gs = req.n1, req.n2, req.mode, req.group_size
        q_chunked = _next_pow2(n1) > _MAX_SINGLE
        q_block = _CHUNK if q_chunked else _next_pow2(n1)
        k_chunked = n2 > 0 and _next_pow2(n2) > _MAX_SINGLE
        k_block = _CHUNK if k_chunked else max(1, _next_pow2(n2))

        span = n1
        if mode is QuantMode.FP8_GROUP and gs <= q_block:
            q_mode, q_gs = kn.Q_GROUP.value, gs
        elif mode is QuantMode.FP8_GROUP:  # groups wider than a chunk: one scale per span
            q_mode, q_gs, span = kn.Q_ROW.value, q_block, gs
        elif mode is QuantMode.FP8_TOKEN:
            q_mode, q_gs = kn.Q_ROW.value, q_block
        elif mode is QuantMode.FP8_TENSOR:
            q_mode, q_gs = kn.Q_TENSOR.value, q_block
        elif mode is QuantMode.MXFP4:  # groups of 32..128 always fit a chunk (shipped chunk: 4096)
            q_mode, q_gs, q_block = kn.Q_MXFP4.value, gs, max(q_block, gs)
        else:
            q_mode, q_gs = kn.Q_NONE.value, q_block

        native_cast = req.device.type == "cuda" and torch.version.hip is None and not self._interpret
        quant_dtype = req.quant_dtype
        fnuz = quant_dtype == torch.float8_e4m3fnuz
        native_fp8 = False
        if native_cast and quant_dtype == torch.float8_e4m3fn:
            native_fp8 = torch.cuda.get_device_capability(req.device) >= (8, 9)
        is_fp8 = mode.is_fp8
        constexprs: dict[str, Any] = dict(
            N1=n1, N2=max(n2, 1), Q_SPAN=span,
            Q_NG=q_block // q_gs, Q_GS=q_gs, Q_CHUNKED=q_chunked,
            K_BLOCK=k_block, K_CHUNKED=k_chunked,
            HAS_K=req.has_k, HAS_RES=req.q_residual is not None, HAS_Q_OUT=req.q_out is not None,
            GEMMA=req.gemma, Q_MODE=q_mode,
            FMAX=fp8_max(quant_dtype) if is_fp8 else 448.0,  # type: ignore[arg-type]
            INV_FMAX=fp8_inv_max(quant_dtype) if is_fp8 else 1.0 / 448.0,  # type: ignore[arg-type]
            FNUZ=fnuz, AMAX_BLOCK=_AMAX_PROGRAMS,
            NATIVE_FP8=native_fp8, NATIVE_CAST=native_cast, FMA=not self._interpret,
        )  # fmt: skip
        plan = _Plan(
            n1=n1, n2=n2, q_block=q_block, q_chunked=q_chunked, k_block=k_block, k_chunked=k_chunked,
            constexprs=constexprs, two_pass=mode is QuantMode.FP8_TENSOR, quantizes=mode is not QuantMode.NONE,
            fnuz_view=fnuz, device_index=req.device.index if req.device.type == "cuda" else None,
        )  # fmt: skip
        self._plans[key] = plan
        return plan

    # -- launching

    def run(self, req: QKNormRequest) -> None:
        m = req.q.shape[0]
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

    def _launch(self, req: QKNormRequest, plan: _Plan, cfg: _Config) -> None:
        """Launch the kernel(s) for ``req`` with configuration ``cfg``."""
        m = req.q.shape[0]
        q, w = req.q, req.q_weight
        kw = w if req.k_weight is None else req.k_weight
        res, q_out, res_out, k, k_out = req.q_residual, req.q_out, req.q_res_out, req.k, req.k_out
        quant, scale = req.q_quant, req.q_scale
        if quant is not None and plan.fnuz_view:
            quant = quant.view(torch.uint8)
        tensors = (
            q, q if res is None else res, w, q if q_out is None else q_out, q if res_out is None else res_out,
            q if quant is None else quant, q if scale is None else scale, q if k is None else k,
            kw, q if k_out is None else k_out,
        )  # fmt: skip
        strides = (
            q.stride(0), 0 if res is None else res.stride(0), 0 if q_out is None else q_out.stride(0),
            0 if res_out is None else res_out.stride(0), 0 if quant is None else quant.stride(0),
            0 if scale is None else scale.stride(0), 0 if scale is None or scale.dim() < 2 else scale.stride(1),
            0 if k is None else k.stride(0), 0 if k_out is None else k_out.stride(0),
        )  # fmt: skip
        q_programs = m if plan.q_chunked else -(-m // cfg.q_rows)
        k_programs = 0 if k is None else (m if plan.k_chunked else -(-m // cfg.k_rows))
        grid = q_programs + k_programs
        scalars = (m, req.q_eps, req.k_eps, q_programs, k_programs)
        if plan.two_pass:
            self._launch_two_pass(plan, cfg, tensors, strides, scalars)
            return
        fast_key = (cfg, strides)
        fast = plan.fast.get(fast_key)
        if fast is not None:
            ptrs = [t.data_ptr() for t in tensors]
            if not reduce(or_, ptrs) & 15 and m < 1 << 31 and not self._hooks.launch_enter_hook.calls:
                fast(grid, self._stream(plan.device_index), _args(ptrs, strides, ptrs[0], 0, scalars))
                return
        tail = self._tail(plan, cfg, plan.constexprs)
        ck = self._compile_launch(grid, cfg, _args(tensors, strides, q, 0, scalars) + tail)
        if self._fast_ok and fast is None and not reduce(or_, [t.data_ptr() for t in tensors]) & 15:
            plan.fast[fast_key] = _bind_fast(ck, tail)

    def _launch_two_pass(
        self, plan: _Plan, cfg: _Config, tensors: tuple[torch.Tensor, ...], strides: tuple[int, ...],
        scalars: tuple[Any, ...],
    ) -> None:  # fmt: skip
        """Per-tensor FP8: the amax launch (capped grid, one partial per program), then the main one."""
        m, q_eps, k_eps, q_programs, k_programs = scalars
        amax_programs = min(q_programs, _AMAX_PROGRAMS)
        partials = torch.empty(amax_programs, dtype=torch.int32, device=tensors[0].device)
        first = {**plan.constexprs, "Q_MODE": self._kernels.Q_AMAX.value, "HAS_K": False}
        self._compile_launch(
            amax_programs, cfg,
            _args(tensors, strides, partials, amax_programs, (m, q_eps, k_eps, amax_programs, 0))
            + self._tail(plan, cfg, first),
        )  # fmt: skip
        self._compile_launch(
            q_programs + k_programs, cfg,
            _args(tensors, strides, partials, amax_programs, scalars) + self._tail(plan, cfg, plan.constexprs),
        )  # fmt: skip

    def _tail(self, plan: _Plan, cfg: _Config, constexprs: dict[str, Any]) -> list[Any]:
        """The compile-time arguments in the kernel's parameter order."""
        values = {**constexprs, "Q_ROWS": cfg.q_rows, "K_ROWS": cfg.k_rows}
        return [values[name] for name in self._constexpr_names]

    def _compile_launch(self, grid: int, cfg: _Config, args: list[Any]) -> Any:
        """Launch through Triton's own path (compiling on first use); returns the compiled kernel."""
        try:
            return self._kernels._qk_rmsnorm_kernel[(grid,)](*args, num_warps=cfg.num_warps)
        except Exception as exc:
            if _is_build_failure(exc):
                raise BackendUnavailable(f"Triton kernel build failed: {type(exc).__name__}: {exc}") from exc
            raise


def _args(
    ptrs: Sequence[Any], strides: tuple[int, ...], amax: Any, amax_count: int, scalars: tuple[Any, ...]
) -> list[Any]:
    """The kernel's runtime arguments in parameter order (pointers as tensors or as ints)."""
    t, s = ptrs, strides
    return [
        t[0], s[0], t[1], s[1], t[2], t[3], s[2], t[4], s[3], t[5], s[4], t[6], s[5], s[6],
        t[7], s[7], t[8], t[9], s[8], amax, amax_count, *scalars,
    ]  # fmt: skip


def _bind_fast(ck: Any, tail: list[Any]) -> Callable[[int, int, list[Any]], None]:
    """A direct launcher for one compiled kernel: Triton's C launch entry with integer pointers.

    The compiled kernel is only valid for the specialization it was built for, so the caller
    keys it by the exact strides (the row and program counts are never specialized: the kernel
    lists them in ``do_not_specialize``) and uses it only for 16-byte aligned pointers (what
    the first, regular launch was specialized on), 32-bit row counts and no registered launch
    hooks (profilers). Per-tensor FP8 (two launches) always takes Triton's own path.
    """
    launcher = ck.run
    function, meta = ck.function, ck.packed_metadata
    c_launch = getattr(launcher, "launch", None)
    if (
        c_launch is not None
        and getattr(launcher, "global_scratch_size", 1) == 0
        and getattr(launcher, "profile_scratch_size", 1) == 0
    ):
        coop, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl

        def fast(grid: int, stream: int, args: list[Any]) -> None:
            c_launch(grid, 1, 1, stream, function, coop, pdl, None, None, meta, None, None, None, *args, *tail)

    else:

        def fast(grid: int, stream: int, args: list[Any]) -> None:
            launcher(grid, 1, 1, stream, function, meta, None, None, None, *args, *tail)

    return fast


def _is_build_failure(exc: BaseException) -> bool:
    """Compilation / resource failures (not interpreter or runtime errors): the backend cannot serve."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError
    except ImportError:
        return False
    return isinstance(exc, (CompilationError, OutOfResources, PTXASError))
