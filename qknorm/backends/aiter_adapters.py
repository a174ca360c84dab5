"""Adapters from :class:`~qknorm.request.QKNormRequest` to each aiter API generation, and how to recognize them.

One :class:`Adapter` subclass per generation (see :mod:`qknorm.backends.aiter_backend` for the
table): ``supports`` says what that generation cannot compute as SPEC §4 says, ``run`` maps the
request onto its signature. :data:`BINDERS` find each generation in the installed aiter by
module, symbol and signature shape; nothing here imports aiter until a binder runs.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..quant import QuantMode
from ..request import QKNormRequest

__all__ = ["GQ_MODULE", "ROPE_MODULE", "AiterCaps", "Adapter", "BINDERS", "shape_mismatch", "try_import"]

GQ_MODULE = "aiter.ops.fused_qk_rmsnorm_group_quant"
ROPE_MODULE = "aiter.ops.fused_qk_norm_rope_cache_quant"
_GROUP_SIZES = (32, 64, 128)  # aiter checks group_size against its values per thread; these pass at every width

_GROUP_PREFIX = ("q_out_quantized", "q_out_scale", "q", "q_weight", "q_epsilon", "q_out_unquantized", "k_out",
                 "q_res_out", "k", "k_weight", "k_epsilon", "q_residual")  # fmt: skip
_UNIFIED_PARAMS = (*_GROUP_PREFIX, "gemma_norm", "quant_type", "group_size", "transpose_scale")
_PRIVATE_PARAMS = ("q_out", "q", "q_weight", "q_eps", "k_out", "k", "k_weight", "k_eps")
_LEGACY_PARAMS = ("q", "q_weight", "q_eps", "k", "k_weight", "k_eps")
# aiter.ops.enum.QuantType members the unified adapter passes, with the values qknorm relies on.
_QUANT_TYPE_VALUES = {"No": 0, "per_Tensor": 1, "per_Token": 2, "per_1x32": 3, "per_1x128": 4}


@dataclass(frozen=True)
class AiterCaps:
    """What the installed aiter reports about itself."""

    version: str
    location: str
    fp8: torch.dtype | None  # aiter.dtypes.fp8: the FP8 flavour its kernels write on this GPU
    fp4x2: torch.dtype | None  # aiter.dtypes.fp4x2 when it is torch's real float4_e2m1fn_x2


def shape_mismatch(fn: object, prefix: tuple[str, ...], keywords: tuple[str, ...] = ()) -> str | None:
    """None when ``fn``'s positional parameters start with ``prefix`` and nothing else is required."""
    try:
        sig = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        return f"has no readable signature ({exc})"
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if tuple(positional[: len(prefix)]) != prefix:
        return f"has an unexpected signature {sig}, expected ({', '.join(prefix)}, ...)"
    for p in params[len(prefix) :]:
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return f"has an unexpected required parameter {p.name!r} in {sig}"
    missing = [k for k in keywords if k not in sig.parameters]
    if missing:
        return f"lacks parameter(s) {', '.join(missing)} in {sig}"
    return None


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned base and row stride: what aiter's vector loads and stores assume."""
    rows_ok = t.dim() < 2 or t.shape[0] <= 1 or (t.stride(0) * t.element_size()) % 16 == 0
    return t.data_ptr() % 16 == 0 and rows_ok


class _Buffers:
    """The tensors handed to aiter for one call, and the copies that bring outputs home."""

    def __init__(self) -> None:
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (request's output, what aiter wrote)

    def input(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or _aligned(t):
            return t
        return t.clone(memory_format=torch.contiguous_format)

    def output(self, t: torch.Tensor | None, contiguous: bool = False) -> torch.Tensor | None:
        if t is None or (_aligned(t) and (t.is_contiguous() or not contiguous)):
            return t
        tmp = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        self._copies.append((t, tmp))
        return tmp

    def scale(self, req: QKNormRequest) -> torch.Tensor | None:
        """``q_scale`` as aiter writes it: an ``[m, G]`` tensor filled at ``i*G + g`` (``g*m + i`` transposed)."""
        s = req.q_scale
        if s is None:
            return None
        m, groups = s.shape
        if req.transpose_scale:
            if groups == 1 or s.stride(1) == m:  # column-major with no padding: aiter's layout already
                return torch.as_strided(s, (m, groups), (groups, 1))
            tmp = torch.empty((m, groups), dtype=s.dtype, device=s.device)
            self._copies.append((s, tmp.view(groups, m).t()))
            return tmp
        if m == 1 or s.stride(0) == groups:
            return torch.as_strided(s, (m, groups), (groups, 1))
        tmp = torch.empty((m, groups), dtype=s.dtype, device=s.device)
        self._copies.append((s, tmp))
        return tmp

    def finish(self) -> None:
        for dst, src in self._copies:
            dst.copy_(src)


def _quant_unsupported(req: QKNormRequest, fp8: torch.dtype | None, fp4x2: torch.dtype | None) -> str | None:
    """Why aiter's quantizing kernels cannot compute ``req`` as SPEC §4 says (None if they can)."""
    mode = req.mode
    if mode is QuantMode.FP8_TENSOR:
        return "aiter does not implement per-tensor FP8 (per_Tensor)"
    if mode.is_fp8:
        if fp8 is None:
            return "cannot tell which FP8 flavour aiter writes on this device"
        if req.quant_dtype != fp8:
            return f"aiter writes {fp8} on this device, the request wants {req.quant_dtype}"
    if mode is QuantMode.MXFP4 and fp4x2 is None:
        return "MXFP4 needs aiter's fp4x2 dtype to be torch.float4_e2m1fn_x2"
    if mode in (QuantMode.FP8_GROUP, QuantMode.MXFP4) and req.group_size not in _GROUP_SIZES:
        return f"aiter takes group sizes {list(_GROUP_SIZES)}, the request has {req.group_size}"
    return None


def _no_quant_unsupported(req: QKNormRequest) -> str | None:
    if req.q_residual is not None:
        return "aiter's no-quant path ignores q_residual (SPEC §6)"
    if req.gemma:
        return "aiter's no-quant path ignores gemma_norm (SPEC §6)"
    return None


class Adapter:
    """One aiter generation adapted to :class:`QKNormRequest` (subclasses: one per generation)."""

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

    def supports(self, req: QKNormRequest, fp8: torch.dtype | None, fp4x2: torch.dtype | None) -> str | None:
        raise NotImplementedError

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        raise NotImplementedError


def _quant_args(req: QKNormRequest, b: _Buffers, caps: AiterCaps) -> dict[str, Any]:
    """The keyword arguments shared by aiter's unified and group-quant entries."""
    if req.mode is QuantMode.NONE:
        q_quant, q_unquant = None, b.output(req.q_out)
    else:
        q_quant, q_unquant = b.output(req.q_quant), b.output(req.q_out)
        if req.mode is QuantMode.MXFP4:
            q_quant = q_quant.view(caps.fp4x2)  # type: ignore[union-attr, arg-type]
    return dict(
        q_out_quantized=q_quant, q_out_scale=b.scale(req), q=b.input(req.q), q_weight=b.input(req.q_weight),
        q_epsilon=req.q_eps, q_out_unquantized=q_unquant, k_out=b.output(req.k_out),
        q_res_out=b.output(req.q_res_out), k=b.input(req.k), k_weight=b.input(req.k_weight),
        k_epsilon=req.k_eps, q_residual=b.input(req.q_residual),
    )  # fmt: skip


class _Unified(Adapter):
    generation, since = "unified", "v0.1.14"

    def __init__(self, module: str, fn: Callable[..., Any], quant_type: Any) -> None:
        super().__init__(module, "fused_qk_rmsnorm")
        self.fn = fn
        self.qt = quant_type

    def features(self) -> str:
        return "plain, fp8 group/token, mxfp4, residual, gemma"

    def supports(self, req: QKNormRequest, fp8: torch.dtype | None, fp4x2: torch.dtype | None) -> str | None:
        if req.mode is QuantMode.NONE:
            return _no_quant_unsupported(req)
        return _quant_unsupported(req, fp8, fp4x2)

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        b = _Buffers()
        args = _quant_args(req, b, caps)
        mode = req.mode
        if mode is QuantMode.NONE:
            # The unified No mode writes the normalized q to q_out_quantized (in q's dtype).
            args.update(q_out_quantized=args["q_out_unquantized"], q_out_unquantized=None)
            quant_type, group_size = self.qt.No, None
        elif mode is QuantMode.FP8_TOKEN:
            quant_type, group_size = self.qt.per_Token, None
        else:  # FP8 group or MXFP4: an explicit group_size wins over the type's own
            quant_type = self.qt.per_1x32 if req.group_size == 32 else self.qt.per_1x128
            group_size = req.group_size
        self.fn(*(args[n] for n in _GROUP_PREFIX), req.gemma, quant_type, group_size, req.transpose_scale)
        b.finish()


class _GroupQuant(Adapter):
    generation, since = "group_quant", "v0.1.12"

    def __init__(self, module: str, fn: Callable[..., Any], per_token: Callable[..., Any] | None, gemma: bool) -> None:
        super().__init__(module, "fused_qk_rmsnorm_group_quant")
        self.fn = fn
        self.per_token = per_token
        self.gemma = gemma
        # q_out_scale=None (no quantization) arrived in v0.1.14 with the per-token entry.
        self.no_quant = per_token is not None

    def features(self) -> str:
        have = ["fp8 group", "mxfp4", "residual"]
        if self.per_token is not None:
            have += ["fp8 token (fused_qk_rmsnorm_per_token_quant)", "plain"]
        if self.gemma:
            have.append("gemma")
        return ", ".join(have)

    def supports(self, req: QKNormRequest, fp8: torch.dtype | None, fp4x2: torch.dtype | None) -> str | None:
        if req.gemma and not self.gemma:
            return "has no gemma_norm (aiter v0.1.13+)"
        if req.mode is QuantMode.NONE:
            return "has no no-quant mode (aiter v0.1.14+)" if not self.no_quant else _no_quant_unsupported(req)
        if req.mode is QuantMode.FP8_TOKEN and self.per_token is None:
            return "has no per-token entry (aiter v0.1.14+)"
        return _quant_unsupported(req, fp8, fp4x2)

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        b = _Buffers()
        args = _quant_args(req, b, caps)
        extra: dict[str, Any] = {"gemma_norm": req.gemma} if self.gemma else {}
        positional = [args[n] for n in _GROUP_PREFIX]
        if req.mode is QuantMode.FP8_TOKEN:
            self.per_token(*positional, **extra)  # type: ignore[misc]
        else:
            group = {} if req.mode is QuantMode.NONE else {"group_size": req.group_size}
            self.fn(*positional, transpose_scale=req.transpose_scale, **group, **extra)
        b.finish()


def _plain_with_k_unsupported(req: QKNormRequest) -> str | None:
    if req.mode is not QuantMode.NONE:
        return f"normalizes only, cannot quantize ({req.mode.value})"
    if not req.has_k:
        return "needs k (no q-only call)"
    return _no_quant_unsupported(req)


class _Private(Adapter):
    generation, since = "private", "v0.1.14"

    def __init__(self, module: str, fn: Callable[..., Any]) -> None:
        super().__init__(module, "_fused_qk_rmsnorm")
        self.fn = fn

    def features(self) -> str:
        return "plain q and k"

    def supports(self, req: QKNormRequest, fp8: torch.dtype | None, fp4x2: torch.dtype | None) -> str | None:
        return _plain_with_k_unsupported(req)

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        b = _Buffers()
        q_out, k_out = b.output(req.q_out, contiguous=True), b.output(req.k_out, contiguous=True)
        self.fn(q_out, b.input(req.q), b.input(req.q_weight), req.q_eps,
                k_out, b.input(req.k), b.input(req.k_weight), req.k_eps)  # fmt: skip
        b.finish()


class _Legacy(Adapter):
    generation, since = "legacy", "before v0.1.14"

    def __init__(self, module: str, fn: Callable[..., Any]) -> None:
        super().__init__(module, "fused_qk_rmsnorm")
        self.fn = fn

    def features(self) -> str:
        return "plain q and k (returns new tensors)"

    def supports(self, req: QKNormRequest, fp8: torch.dtype | None, fp4x2: torch.dtype | None) -> str | None:
        return _plain_with_k_unsupported(req)

    def run(self, req: QKNormRequest, caps: AiterCaps) -> None:
        b = _Buffers()
        result = self.fn(b.input(req.q), b.input(req.q_weight), req.q_eps,
                         b.input(req.k), b.input(req.k_weight), req.k_eps)  # fmt: skip
        if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result)):
            raise RuntimeError(f"{self.entry} returned {type(result).__name__}, expected (q_out, k_out)")
        req.q_out.copy_(result[0])  # type: ignore[union-attr]
        req.k_out.copy_(result[1])  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- binding


def try_import(name: str) -> tuple[Any, str]:
    try:
        return importlib.import_module(name), ""
    except (Exception, SystemExit) as exc:
        return None, f"import {name} raised {type(exc).__name__}: {exc}"


def _bind_unified(gq: Any, gq_why: str, rope: Any, rope_why: str) -> Adapter | str:
    if gq is None:
        return gq_why
    fn = getattr(gq, "fused_qk_rmsnorm", None)
    if fn is None:
        return f"{GQ_MODULE} has no fused_qk_rmsnorm"
    why = shape_mismatch(fn, _UNIFIED_PARAMS)
    if why is not None:
        return f"{GQ_MODULE}.fused_qk_rmsnorm {why}"
    enum_mod, enum_why = try_import("aiter.ops.enum")
    qt = getattr(enum_mod, "QuantType", None)
    if qt is None:
        return enum_why or "aiter.ops.enum has no QuantType"
    for name, value in _QUANT_TYPE_VALUES.items():
        member = getattr(qt, name, None)
        if member is None or int(member) != value:
            return f"aiter.ops.enum.QuantType.{name} is {member!r}, expected {value}"
    return _Unified(GQ_MODULE, fn, qt)


def _bind_group_quant(gq: Any, gq_why: str, rope: Any, rope_why: str) -> Adapter | str:
    if gq is None:
        return gq_why
    fn = getattr(gq, "fused_qk_rmsnorm_group_quant", None)
    if fn is None:
        return f"{GQ_MODULE} has no fused_qk_rmsnorm_group_quant"
    why = shape_mismatch(fn, _GROUP_PREFIX, ("group_size", "transpose_scale"))
    if why is not None:
        return f"{GQ_MODULE}.fused_qk_rmsnorm_group_quant {why}"
    per_token = getattr(gq, "fused_qk_rmsnorm_per_token_quant", None)
    if per_token is not None and shape_mismatch(per_token, _GROUP_PREFIX) is not None:
        per_token = None  # an unrecognized per-token entry is left alone; group quantization still binds
    return _GroupQuant(GQ_MODULE, fn, per_token, "gemma_norm" in inspect.signature(fn).parameters)


def _bind_rope(symbol: str, params: tuple[str, ...], cls: type[_Private] | type[_Legacy]) -> Callable[..., Any]:
    def bind(gq: Any, gq_why: str, rope: Any, rope_why: str) -> Adapter | str:
        if rope is None:
            return rope_why
        fn = getattr(rope, symbol, None)
        if fn is None:
            return f"{ROPE_MODULE} has no {symbol}"
        why = shape_mismatch(fn, params)
        return f"{ROPE_MODULE}.{symbol} {why}" if why is not None else cls(ROPE_MODULE, fn)

    return bind


BINDERS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("unified", _bind_unified),
    ("group_quant", _bind_group_quant),
    ("private", _bind_rope("_fused_qk_rmsnorm", _PRIVATE_PARAMS, _Private)),
    ("legacy", _bind_rope("fused_qk_rmsnorm", _LEGACY_PARAMS, _Legacy)),
)
