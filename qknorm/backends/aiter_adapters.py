"""Adapters from :class:`~qknorm.request.QKNormRequest` to each aiter generation of the fused Q/K RMSNorm.

One :class:`Adapter` subclass per entry point (the table is in ``docs/aiter.md``):
``supports`` decides from the request kind alone (:meth:`QKNormRequest.key`) whether that
generation computes it as SPEC §4 says *and* passes every argument check of its C++ host code;
``run`` maps the request onto the signature and hands aiter tensors in the layout it checks for.

Why ``supports`` must be complete: from aiter #3137 (2026-05-13) on the group-quant host code,
and from #3159 (2026-05-29) on the plain ``_fused_qk_rmsnorm``, a failed ``AITER_CHECK`` calls
``std::abort()`` (``csrc/include/aiter_hip_common.h``: it throws only under aiter's ctypes
wrapper, which sets ``g_aiter_can_throw``). A request that fails one kills the process; no
``except`` can catch it. What depends on strides or row counts (not in the key) is handled in
``run`` by copies, never by asking aiter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..quant import QuantMode
from ..request import QKNormRequest

__all__ = [
    "AiterCaps",
    "GroupQuantCaps",
    "Adapter",
    "Unified",
    "GroupQuant",
    "Private",
    "Legacy",
    "MAX_WIDTH",
    "widths_unsupported",
    "group_dispatch_unsupported",
]

# Every fused entry: AITER_CHECK(n1 <= 8192 && n2 <= 8192) in fused_qk_rmsnorm_group_quant.cu,
# "not support n" past 8192 in fused_qk_norm.cu.
MAX_WIDTH = 8192
# WARP_SIZE is 64 on gfx9 and 32 on gfx12 (#3330); the group check uses WARP_SIZE * thread_data_size.
_MIN_WARP = 32


@dataclass(frozen=True)
class AiterCaps:
    """What the installed aiter reports about itself."""

    version: str
    location: str
    fp8: torch.dtype | None  # aiter.dtypes.fp8: the FP8 flavour its kernels write on this GPU
    fp4x2: torch.dtype | None  # aiter.dtypes.fp4x2 when it is torch's real float4_e2m1fn_x2


@dataclass(frozen=True)
class GroupQuantCaps:
    """What ``aiter.ops.fused_qk_rmsnorm_group_quant`` offers, read from its signatures and files."""

    gemma: bool  # gemma_norm parameter: #2853 (2026-04-23)
    no_quant: bool  # q_out_scale=None plain mode (every parameter optional): #3010 (2026-05-04)
    per_token: Callable[..., Any] | None  # fused_qk_rmsnorm_per_token_quant: #2958 (2026-05-09)
    # Before #2637 (2026-04-08) the host code required is_contiguous() of every tensor. #2637
    # and #2853 share a signature, so without gemma_norm qknorm assumes the older rule.
    contiguous: bool
    # E8M0 scale ceil_pow2(amax/6) (SPEC rule 11) from #3212 (2026-06-02, aiter.utility.mx_types);
    # before it round_pow2(amax)/4, one exponent higher where amax = 1.5 * 2^k.
    mx_round_up: bool


# ----------------------------------------------------------------------------- layouts


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned base and row stride (qknorm's own rule, see ``docs/aiter.md``)."""
    rows_ok = t.dim() < 2 or t.shape[0] <= 1 or (t.stride(0) * t.element_size()) % 16 == 0
    return t.data_ptr() % 16 == 0 and rows_ok


def _rows_ok(t: torch.Tensor) -> bool:
    """aiter's ``check_2d_last_dim_contiguous`` (#2637+): ``stride(1) == 1`` and ``stride(0) >= size(1)``."""
    return t.dim() != 2 or (t.stride(1) == 1 and t.stride(0) >= t.size(1))


class _Buffers:
    """The tensors handed to aiter for one call, and the copies that bring outputs home.

    ``contiguous``: the generation checks ``is_contiguous()`` (group quant before #2637);
    otherwise rows must pass ``check_2d_last_dim_contiguous``. Either way qknorm also hands
    aiter 16-byte aligned tensors (its own rule).
    """

    def __init__(self, contiguous: bool = False) -> None:
        self.contiguous = contiguous
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (request's output, what aiter wrote)

    def _fits(self, t: torch.Tensor) -> bool:
        return _aligned(t) and (t.is_contiguous() if self.contiguous else _rows_ok(t))

    def input(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or self._fits(t):
            return t
        return t.clone(memory_format=torch.contiguous_format)

    def output(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or self._fits(t):
            return t
        tmp = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        self._copies.append((t, tmp))
        return tmp

    def scale(self, req: QKNormRequest) -> torch.Tensor | None:
        """``q_scale`` as every generation accepts it.

        A contiguous ``[m, G]`` tensor is written at ``i*G + g``, or at ``g*m + i`` with
        ``transpose_scale`` (SPEC rule 9): before #2637 aiter wrote raw offsets whatever the
        strides; from #2637 on it reads strides but still takes a contiguous tensor that way.
        A row-major scale with padded rows is passed as it is from #2637 on.
        """
        s = req.q_scale
        if s is None:
            return None
        if req.mode is QuantMode.MXFP4:
            s = s.view(torch.uint8)  # AITER_CHECK(q_out_scale dtype == u8): not float8_e8m0fnu
        m, groups = s.shape
        if req.transpose_scale:
            if (m == 1 or s.stride(0) == 1) and (groups == 1 or s.stride(1) == m):  # column-major, unpadded
                return torch.as_strided(s, (m, groups), (groups, 1))
            tmp = torch.empty((m, groups), dtype=s.dtype, device=s.device)
            self._copies.append((s, tmp.view(groups, m).t()))
            return tmp
        if (m == 1 or s.stride(0) == groups) and (groups == 1 or s.stride(1) == 1):  # row-major, unpadded
            return torch.as_strided(s, (m, groups), (groups, 1))
        if not self.contiguous and s.stride(1) == 1 and s.stride(0) >= groups:
            return s
        tmp = torch.empty((m, groups), dtype=s.dtype, device=s.device)
        self._copies.append((s, tmp))
        return tmp

    def finish(self) -> None:
        for dst, src in self._copies:
            dst.copy_(src)


# ----------------------------------------------------------------------------- what each generation computes


def _thread_data_size(max_n: int, fp4: bool) -> int:
    """fused_qk_rmsnorm_group_quant.cu's elements per thread for the group-quant kernels."""
    if fp4:
        return 8 if max_n <= 1024 else 16
    return 4 if max_n <= 128 else 8 if max_n <= 1024 else 16


def group_dispatch_unsupported(group_size: int, max_n: int, fp4: bool) -> str | None:
    """The host code's group checks and its ``DISPATCH_REDUCE_THREAD_SIZE_`` switch, mirrored."""
    tds = _thread_data_size(max_n, fp4)
    rts = group_size // tds
    ok = (
        group_size > 0
        and group_size % tds == 0
        and group_size <= _MIN_WARP * tds
        and rts & (rts - 1) == 0
        and rts in (128 // tds, 64 // tds, 32 // tds)
    )
    if ok:
        return None
    return f"aiter's group-quant kernel dispatches group sizes 32, 64 and 128 only, the request has {group_size}"


def widths_unsupported(req: QKNormRequest) -> str | None:
    """Every entry of every generation stops at 8192 columns (checked once, by the backend)."""
    for name, width in (("n1", req.n1), ("n2", req.n2)):
        if width > MAX_WIDTH:
            return (
                f"aiter's fused kernels take widths up to {MAX_WIDTH}, {name}={width} (past it an AITER_CHECK aborts)"
            )
    return None


def _quant_unsupported(req: QKNormRequest, caps: AiterCaps, fp8: torch.dtype | None, gq: GroupQuantCaps) -> str | None:
    """Why aiter's quantizing kernels cannot compute ``req`` as SPEC §4 says (None if they can)."""
    mode = req.mode
    if mode is QuantMode.FP8_TENSOR:
        return "aiter does not implement per-tensor FP8 (per_Tensor raises NotImplementedError)"
    if mode is QuantMode.FP8_TOKEN and gq.per_token is None:
        return "has no per-token entry (aiter #2958, v0.1.14)"
    if mode.is_fp8:
        if fp8 is None:
            return "cannot tell which FP8 flavour aiter writes on this device"
        if req.quant_dtype != fp8:
            return f"aiter writes {fp8} on this device, the request wants {req.quant_dtype}"
    if mode is QuantMode.MXFP4:
        if caps.fp4x2 is None:
            return "MXFP4 needs aiter's fp4x2 dtype to be torch.float4_e2m1fn_x2"
        if req.transpose_scale:
            return "aiter's fp4x2 path does not take transpose_scale"
        if not gq.mx_round_up:
            return (
                "aiter before #3212 (2026-06-02) computes E8M0 scales as round_pow2(amax)/4: one exponent "
                "higher than SPEC rule 11 where a group's amax is 1.5*2^k"
            )
    if mode in (QuantMode.FP8_GROUP, QuantMode.MXFP4):
        return group_dispatch_unsupported(req.group_size, max(req.n1, req.n2), mode is QuantMode.MXFP4)
    return None


class Adapter:
    """One aiter entry point adapted to :class:`QKNormRequest` (subclasses: one per generation)."""

    generation = ""
    since = ""

    def __init__(self, module: str, symbol: str) -> None:
        self.module = module
        self.symbol = symbol
        self.proven = False  # a call has succeeded: no first-use build failure can follow

    @property
    def entry(self) -> str:
        return f"{self.module}.{self.symbol}"

    def features(self) -> str:
        return ""

    def supports(self, req: QKNormRequest, caps: AiterCaps, fp8: torch.dtype | None) -> str | None:
        raise NotImplementedError

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        raise NotImplementedError


def _quant_args(req: QKNormRequest, b: _Buffers, caps: AiterCaps) -> dict[str, Any]:
    """The keyword arguments shared by aiter's unified and group-quant entries."""
    q_quant = b.output(req.q_quant)
    if req.mode is QuantMode.MXFP4:
        q_quant = q_quant.view(caps.fp4x2)  # type: ignore[union-attr, arg-type]
    return dict(
        q_out_quantized=q_quant, q_out_scale=b.scale(req), q=b.input(req.q), q_weight=b.input(req.q_weight),
        q_epsilon=req.q_eps, q_out_unquantized=b.output(req.q_out), k_out=b.output(req.k_out),
        q_res_out=b.output(req.q_res_out), k=b.input(req.k), k_weight=b.input(req.k_weight),
        k_epsilon=req.k_eps, q_residual=b.input(req.q_residual),
    )  # fmt: skip


GROUP_PREFIX = ("q_out_quantized", "q_out_scale", "q", "q_weight", "q_epsilon", "q_out_unquantized", "k_out",
                "q_res_out", "k", "k_weight", "k_epsilon", "q_residual")  # fmt: skip


def _plain_unsupported(req: QKNormRequest, what: str) -> str | None:
    """The plain kernel (fused_qk_norm.cu, #2442): q and k normalized, nothing else."""
    if req.mode is not QuantMode.NONE:
        return f"normalizes only, cannot quantize ({req.mode.value})"
    if not req.has_k:
        return f"{what} needs k (#2958: pybind TypeError; #3159 on: AttributeError)"
    if req.q_residual is not None:
        return f"{what} ignores q_residual (SPEC §6)"
    if req.gemma:
        return f"{what} ignores gemma_norm (SPEC §6)"
    return None


class GroupQuant(Adapter):
    """``fused_qk_rmsnorm_group_quant`` (#2527) with the per-token entry where present (#2958)."""

    generation, since = "group_quant", "v0.1.12"

    def __init__(self, module: str, fn: Callable[..., Any], gq: GroupQuantCaps) -> None:
        super().__init__(module, "fused_qk_rmsnorm_group_quant")
        self.fn = fn
        self.gq = gq

    def features(self) -> str:
        g = self.gq
        have = ["fp8 group", "residual"]
        have += ["mxfp4"] if g.mx_round_up else ["mxfp4 refused (pre-#3212 E8M0 rule)"]
        have += ["fp8 token (fused_qk_rmsnorm_per_token_quant)"] if g.per_token is not None else []
        have += ["plain incl. q-only, residual, gemma (q_out_scale=None)"] if g.no_quant else []
        have += ["gemma"] if g.gemma else []
        have += ["contiguous copies of strided tensors (pre-#2637 checks)"] if g.contiguous else []
        return "#2527: " + ", ".join(have)

    def supports(self, req: QKNormRequest, caps: AiterCaps, fp8: torch.dtype | None) -> str | None:
        if req.gemma and not self.gq.gemma:
            return "has no gemma_norm (aiter #2853, v0.1.13)"
        if req.mode is QuantMode.NONE:
            return None if self.gq.no_quant else "has no no-quant mode (aiter #3010, v0.1.14)"
        return _quant_unsupported(req, caps, fp8, self.gq)

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        b = _Buffers(self.gq.contiguous)
        args = _quant_args(req, b, caps)
        extra: dict[str, Any] = {"gemma_norm": req.gemma} if self.gq.gemma else {}
        positional = [args[n] for n in GROUP_PREFIX]
        if req.mode is QuantMode.FP8_TOKEN:
            self.gq.per_token(*positional, **extra)  # type: ignore[misc]
        elif req.mode is QuantMode.NONE:  # q_out_quantized and q_out_scale None: plain, into q_out_unquantized
            self.fn(*positional, **extra)
        else:
            self.fn(*positional, group_size=req.group_size, transpose_scale=req.transpose_scale, **extra)
        b.finish()


class Unified(Adapter):
    """The unified ``fused_qk_rmsnorm(..., quant_type, group_size, transpose_scale)`` (#2958, v0.1.14)."""

    generation, since = "unified", "v0.1.14"

    def __init__(self, module: str, fn: Callable[..., Any], quant_type: Any, gq: GroupQuantCaps) -> None:
        super().__init__(module, "fused_qk_rmsnorm")
        self.fn = fn
        self.qt = quant_type
        self.gq = gq

    def features(self) -> str:
        mx = "mxfp4" if self.gq.mx_round_up else "mxfp4 refused (pre-#3212 E8M0 rule)"
        return f"#2958: plain q and k (No), fp8 group/token, {mx}, residual, gemma"

    def supports(self, req: QKNormRequest, caps: AiterCaps, fp8: torch.dtype | None) -> str | None:
        if req.mode is QuantMode.NONE:
            return _plain_unsupported(req, "the No mode (_fused_qk_rmsnorm)")
        return _quant_unsupported(req, caps, fp8, self.gq)

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        b = _Buffers()
        args = _quant_args(req, b, caps)
        mode = req.mode
        if mode is QuantMode.NONE:
            # No calls _fused_qk_rmsnorm(q_out_quantized, q, ...): the normalized q goes there.
            args.update(q_out_quantized=args["q_out_unquantized"], q_out_unquantized=None)
            quant_type, group_size = self.qt.No, None
        elif mode is QuantMode.FP8_TOKEN:
            quant_type, group_size = self.qt.per_Token, None
        else:  # FP8 group or MXFP4: an explicit group_size wins over the type's own
            quant_type = self.qt.per_1x32 if req.group_size == 32 else self.qt.per_1x128
            group_size = req.group_size
        self.fn(*(args[n] for n in GROUP_PREFIX), req.gemma, quant_type, group_size, req.transpose_scale)
        b.finish()


class Private(Adapter):
    """``_fused_qk_rmsnorm(q_out, q, q_weight, q_eps, k_out, k, k_weight, k_eps)`` (#2958, v0.1.14)."""

    generation, since = "private", "v0.1.14"

    def __init__(self, module: str, fn: Callable[..., Any]) -> None:
        super().__init__(module, "_fused_qk_rmsnorm")
        self.fn = fn

    def features(self) -> str:
        return "#2958: plain q and k"

    def supports(self, req: QKNormRequest, caps: AiterCaps, fp8: torch.dtype | None) -> str | None:
        return _plain_unsupported(req, "_fused_qk_rmsnorm")

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        b = _Buffers()
        q_out, k_out = b.output(req.q_out), b.output(req.k_out)
        self.fn(q_out, b.input(req.q), b.input(req.q_weight), req.q_eps,
                k_out, b.input(req.k), b.input(req.k_weight), req.k_eps)  # fmt: skip
        b.finish()


class Legacy(Adapter):
    """The public ``fused_qk_rmsnorm(q, q_weight, q_eps, k, k_weight, k_eps)`` of #2442 to #2958."""

    generation, since = "legacy", "v0.1.12"

    def __init__(self, module: str, fn: Callable[..., Any]) -> None:
        super().__init__(module, "fused_qk_rmsnorm")
        self.fn = fn

    def features(self) -> str:
        return "#2442: plain q and k (returns new tensors)"

    def supports(self, req: QKNormRequest, caps: AiterCaps, fp8: torch.dtype | None) -> str | None:
        return _plain_unsupported(req, "the legacy fused_qk_rmsnorm")

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        b = _Buffers()
        result = self.fn(b.input(req.q), b.input(req.q_weight), req.q_eps,
                         b.input(req.k), b.input(req.k_weight), req.k_eps)  # fmt: skip
        if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result)):
            raise RuntimeError(f"{self.entry} returned {type(result).__name__}, expected (q_out, k_out)")
        req.q_out.copy_(result[0])  # type: ignore[union-attr]
        req.k_out.copy_(result[1])  # type: ignore[union-attr]
