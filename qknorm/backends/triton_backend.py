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
  maxima are reductions within a thread and a few lanes. Rows whose padded width exceeds ``_MAX_SINGLE``
  columns are processed one per program in ``_CHUNK``-column passes (sum of squares, [span
  amax], write), re-reading the row from L2.
- One q row per program at every M (a row's sums are then scalars: the two tiles combine with
  no layout conversion), warps so that each thread holds about ``_EPT_DECODE`` (M <= 256) or
  ``_EPT_PREFILL`` elements; k rows in programs of their own holding as many elements as a q
  program, or with their q row (``K_WITH_Q``) where that measured faster.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..quant import QuantMode, fp8_inv_max
from .base import BackendUnavailable
from .triton_launch import bind_direct, direct_launch_supported, is_build_failure, ordered

__all__ = ["TritonBackend"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- heuristics
# Notes: see docs/benchmarks.md for the measured tables behind these numbers.
_DECODE_MAX_M = 256
# Row-count buckets: each gets its own launch configuration (and compiled variant).
_BUCKETS = (1, 16, 256, 2048, 16384)
_MAX_SINGLE = 8192  # widest padded row kept whole in registers
_CHUNK = 4096  # columns per pass for wider rows
_EPT_DECODE = 16  # elements per thread at decode sizes
_EPT_PREFILL = 32  # elements per thread at prefill sizes
_AMAX_PROGRAMS = 512  # programs of the per-tensor amax launch (the partials every program re-reads)

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


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _prev_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _bucket(m: int) -> int:
    """Index of the row-count bucket of ``m`` (the upper bounds are ``_BUCKETS``)."""
    for i, hi in enumerate(_BUCKETS):
        if m <= hi:
            return i
    return len(_BUCKETS)


def _tiles(n: int, gs: int | None) -> tuple[int, int, int]:
    """``(NG, NT, GS)``: a row of ``n`` columns as NT tiles of NG groups of GS columns.

    ``gs`` is the quantization group (None: no groups, a tile is NG = 1 group of GS columns).
    Three tiles where they pad less than one power-of-two tile: 1536 = 3 x 512 (or 3 x 4 groups
    of 128) instead of 2048 with a quarter of the lanes masked.
    """
    unit = gs or 1
    groups = -(-n // unit)
    one, three = _next_pow2(groups), _next_pow2(-(-groups // 3))
    per_tile, nt = (three, 3) if 3 * three < one else (one, 1)
    return (per_tile, nt, gs) if gs else (1, nt, per_tile)


@dataclass(frozen=True)
class _Config:
    """Launch configuration of one (key, M bucket)."""

    q_rows: int
    k_rows: int
    num_warps: int
    k_with_q: bool = False


@dataclass
class _Plan:
    """Everything about a request key that does not depend on M."""

    q_chunked: bool
    q_width: int  # padded q width held in registers (chunk width when chunked)
    k_chunked: bool
    k_width: int
    constexprs: dict[str, Any]  # kernel compile-time arguments except the per-bucket ones
    two_pass: bool  # per-tensor FP8: an amax launch first
    fnuz_view: bool  # pass the FP8 output as uint8 (Triton has no e4m3fnuz pointer type off ROCm)
    device_index: int | None  # CUDA device of the tensors (Triton launches on the current device)
    configs: dict[int, _Config] = field(default_factory=dict)
    fast: dict[tuple[object, ...], Any] = field(default_factory=dict)


def _config(plan: _Plan, bucket: int) -> _Config:
    """The launch configuration of ``plan`` for row-count bucket ``bucket`` (shape-only rule)."""
    m_hi = _BUCKETS[bucket] if bucket < len(_BUCKETS) else 1 << 20
    ept = _EPT_DECODE if m_hi <= _DECODE_MAX_M else _EPT_PREFILL
    q_tile = _next_pow2(plan.q_width)
    num_warps = max(1, min(16, q_tile // (32 * ept)))
    if plan.k_chunked or m_hi <= _DECODE_MAX_M:
        k_rows = 1
    else:  # k programs hold as many elements as q programs
        k_rows = max(1, min(q_tile // plan.k_width, m_hi))
    return _Config(q_rows=1, k_rows=k_rows, num_warps=num_warps)


# ---------------------------------------------------------------------------- the backend


class TritonBackend:
    """SPEC §4 in Triton kernels: every mode, one launch for q and k (two for per-tensor FP8)."""

    name = "triton"

    def __init__(self) -> None:
        self._plans: dict[tuple[object, ...], _Plan] = {}
        self._interpret = False
        self._kernels: Any = None
        self._runtime_names: list[str] = []  # the kernel's non-constexpr parameters, in order
        self._constexpr_names: list[str] = []  # its constexpr parameters, in order (they come last)
        self._direct = False  # direct launches (see triton_launch.bind_direct)
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

    def supports(self, req: Any) -> str | None:
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
        params = list(inspect.signature(kernel.fn).parameters.values())
        self._constexpr_names = [p.name for p in params if "constexpr" in str(p.annotation)]
        self._runtime_names = [p.name for p in params if "constexpr" not in str(p.annotation)]
        if not self._interpret and torch.cuda.is_available():
            self._stream = triton.runtime.driver.active.get_current_stream
            self._hooks = triton.knobs.runtime
            self._direct = direct_launch_supported(triton.__version__, torch.version.hip is not None)
        self._kernels = triton_kernels

    def _q_layout(self, req: Any) -> tuple[int, int, int, int, int, bool]:
        """(Q_MODE, NG, NT, GS, SPAN, chunked) of q for the request's mode and width."""
        kn, mode, n1, gs = self._kernels, req.mode, req.n1, req.group_size
        if _next_pow2(n1) > _MAX_SINGLE:  # chunked: one row per program in chunks of NG * GS columns
            if mode is QuantMode.MXFP4 or (mode is QuantMode.FP8_GROUP and gs <= _CHUNK):
                chunk = max(_CHUNK, gs)
                return (kn.Q_MXFP4 if mode is QuantMode.MXFP4 else kn.Q_GROUP).value, chunk // gs, 1, gs, n1, True
            span = gs if mode is QuantMode.FP8_GROUP else n1  # groups wider than a chunk: one scale per span
            q_mode = {QuantMode.NONE: kn.Q_NONE, QuantMode.FP8_TENSOR: kn.Q_TENSOR}.get(mode, kn.Q_ROW)
            return q_mode.value, 1, 1, _CHUNK, span, True
        q_mode = {
            QuantMode.NONE: kn.Q_NONE, QuantMode.FP8_GROUP: kn.Q_GROUP, QuantMode.FP8_TOKEN: kn.Q_ROW,
            QuantMode.FP8_TENSOR: kn.Q_TENSOR, QuantMode.MXFP4: kn.Q_MXFP4,
        }[mode]  # fmt: skip
        grouped = mode in (QuantMode.FP8_GROUP, QuantMode.MXFP4)
        ng, nt, tile_gs = _tiles(n1, gs if grouped else None)
        return q_mode.value, ng, nt, tile_gs, n1, False

    def _fp8_encoding(self, req: Any) -> int:
        """How the kernel makes FP8 bytes (``triton_quant_kernels.FP8_*``) for the request's output dtype."""
        from . import triton_quant_kernels as te

        fnuz = req.quant_dtype == torch.float8_e4m3fnuz
        hw = False  # the hardware's e4m3fn conversion (NVIDIA sm_89+); ROCm and the interpreter use software
        if req.device.type == "cuda" and torch.version.hip is None and not self._interpret:
            hw = torch.cuda.get_device_capability(req.device) >= (8, 9)
        if fnuz:
            return (te.FP8_HW_FNUZ if hw else te.FP8_SOFT_FNUZ).value
        return (te.FP8_HW_FN if hw else te.FP8_SOFT_FN).value

    def _plan(self, req: Any, key: tuple[object, ...]) -> _Plan:
        if self._kernels is None:
            self._load_kernels()
        n1, n2, mode = req.n1, req.n2, req.mode
        q_mode, ng, nt, gs, span, q_chunked = self._q_layout(req)
        k_chunked = n2 > 0 and _next_pow2(n2) > _MAX_SINGLE
        k_ng, k_nt, k_gs = (1, 1, _CHUNK) if k_chunked else _tiles(max(n2, 1), None)
        is_fp8 = mode.is_fp8
        constexprs: dict[str, Any] = dict(
            N1=n1, N2=max(n2, 1), Q_NG=ng, Q_NT=nt, Q_GS=gs, Q_CHUNKED=q_chunked, Q_SPAN=span,
            K_NG=k_ng, K_NT=k_nt, K_GS=k_gs, K_CHUNKED=k_chunked, GEMMA=req.gemma, Q_MODE=q_mode,
            INV_FMAX=fp8_inv_max(req.quant_dtype) if is_fp8 else 1.0,
            FP8_ENC=self._fp8_encoding(req) if is_fp8 else 0, AMAX_BLOCK=_AMAX_PROGRAMS,
            NATIVE_CAST=req.device.type == "cuda" and torch.version.hip is None and not self._interpret,
            FMA=not self._interpret,
        )  # fmt: skip
        plan = _Plan(
            q_chunked=q_chunked, q_width=nt * ng * gs, k_chunked=k_chunked, k_width=k_nt * k_ng * k_gs,
            constexprs=constexprs, two_pass=mode is QuantMode.FP8_TENSOR,
            fnuz_view=is_fp8 and req.quant_dtype == torch.float8_e4m3fnuz,
            device_index=req.device.index if req.device.type == "cuda" else None,
        )  # fmt: skip
        self._plans[key] = plan
        return plan

    # -- launching

    def run(self, req: Any) -> None:
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

    def _launch(self, req: Any, plan: _Plan, cfg: _Config) -> None:
        """Launch the kernel(s) for ``req`` with configuration ``cfg``, arguments by parameter name."""
        m = req.m
        tensors: dict[str, Any] = {name: getattr(req, attr) for name, attr in _TENSORS.items()}
        quant = tensors["Q_QUANT_PTR"]
        if quant is not None and plan.fnuz_view:
            tensors["Q_QUANT_PTR"] = quant.view(torch.uint8)
        strides: dict[str, Any] = {s: None if tensors[t] is None else tensors[t].stride(0) for s, t in _ROW_STRIDES.items()}
        scale = tensors["Q_SCALE_PTR"]
        strides["q_scale_stride_g"] = scale.stride(1) if scale is not None and scale.dim() > 1 else None
        has_k = tensors["K_PTR"] is not None
        k_with_q = cfg.k_with_q and has_k
        q_programs = m if plan.q_chunked else -(-m // cfg.q_rows)
        k_programs = 0 if not has_k or k_with_q else (m if plan.k_chunked else -(-m // cfg.k_rows))
        grid = q_programs + k_programs
        scalars = dict(M=m, q_eps=req.q_eps, k_eps=req.k_eps, q_programs=q_programs)
        consts = {**plan.constexprs, "Q_ROWS": cfg.q_rows, "K_ROWS": cfg.q_rows if k_with_q else cfg.k_rows,
                  "K_WITH_Q": k_with_q}  # fmt: skip
        if plan.two_pass:
            self._launch_two_pass(grid, cfg, tensors, strides, scalars, consts)
            return
        fast_key = (cfg, tuple(strides.values()))
        fast = plan.fast.get(fast_key)
        if fast:
            ptrs = {n: None if t is None else t.data_ptr() for n, t in tensors.items()}
            if not any(p & 15 for p in ptrs.values() if p is not None) and m < 1 << 31 and not self._hooks.launch_enter_hook.calls:
                fast(grid, self._stream(plan.device_index), ordered(self._runtime_names, {**ptrs, **strides, **scalars}))
                return
        compiled = self._compile_launch(grid, cfg, {**tensors, **strides, **scalars, **consts})
        if self._direct and fast is None and not any(t.data_ptr() & 15 for t in tensors.values() if t is not None):
            bound = bind_direct(compiled)
            tail = [consts[n] for n in self._constexpr_names]
            plan.fast[fast_key] = False if bound is None else (lambda g, s, a, f=bound, t=tail: f(g, s, a + t))

    def _launch_two_pass(
        self, grid: int, cfg: _Config, tensors: dict[str, Any], strides: dict[str, Any], scalars: dict[str, Any],
        consts: dict[str, Any],
    ) -> None:  # fmt: skip
        """Per-tensor FP8: the amax launch (capped grid, one partial per program), then the main one."""
        amax_programs = min(scalars["q_programs"], _AMAX_PROGRAMS)
        partials = torch.empty(amax_programs, dtype=torch.float32, device=tensors["Q_PTR"].device)
        self._compile_launch(
            amax_programs, cfg,
            {"Q_PTR": tensors["Q_PTR"], "Q_RES_PTR": tensors["Q_RES_PTR"], "Q_W_PTR": tensors["Q_W_PTR"],
             "q_stride": strides["q_stride"], "q_res_stride": strides["q_res_stride"], **scalars,
             "q_programs": amax_programs, "AMAX_PTR": partials,
             **consts, "Q_MODE": self._kernels.Q_AMAX.value, "K_WITH_Q": False},
        )  # fmt: skip
        self._compile_launch(
            grid, cfg, {**tensors, **strides, **scalars, "AMAX_PTR": partials, "amax_count": amax_programs, **consts}
        )

    def _compile_launch(self, grid: int, cfg: _Config, args: dict[str, Any]) -> Any:
        """Launch through Triton's own path (compiling on first use); returns the compiled kernel."""
        full = dict.fromkeys(self._runtime_names)  # absent tensors (and their strides) are None
        full.update(args)
        try:
            return self._kernels._qk_rmsnorm_kernel[(grid,)](**full, num_warps=cfg.num_warps)
        except Exception as exc:
            if is_build_failure(exc):
                raise BackendUnavailable(f"Triton kernel build failed: {type(exc).__name__}: {exc}") from exc
            raise
