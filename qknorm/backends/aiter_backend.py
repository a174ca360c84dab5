"""Backend ``aiter``: AMD's aiter kernels, bound by feature detection on first use.

aiter's fused Q/K RMSNorm has had four shapes. qknorm binds to every one the installed aiter
has, checking module, symbol and signature shape (``inspect.signature``): in v0.1.14 aiter
moved its public 6-argument ``fused_qk_rmsnorm`` to a private name and reused the public name
for a new in-place entry, so a name alone proves nothing.

===========  ====================================================================  ========
generation   entry                                                                 since
===========  ====================================================================  ========
unified      ``aiter.ops.fused_qk_rmsnorm_group_quant.fused_qk_rmsnorm(q_out_       v0.1.14
             quantized, q_out_scale, q, ..., gemma_norm, quant_type, group_size,
             transpose_scale)`` with ``aiter.ops.enum.QuantType``
group_quant  ``aiter.ops.fused_qk_rmsnorm_group_quant.fused_qk_rmsnorm_group_quant``   v0.1.12
             (``gemma_norm`` since v0.1.13; ``fused_qk_rmsnorm_per_token_quant`` and
             ``q_out_scale=None`` no-quant mode since v0.1.14)
private      ``aiter.ops.fused_qk_norm_rope_cache_quant._fused_qk_rmsnorm(q_out, q,    v0.1.14
             q_weight, q_eps, k_out, k, k_weight, k_eps)``
legacy       ``aiter.ops.fused_qk_norm_rope_cache_quant.fused_qk_rmsnorm(q,           < v0.1.14
             q_weight, q_eps, k, k_weight, k_eps) -> (q_out, k_out)``
===========  ====================================================================  ========

A request goes to the newest bound generation that computes it as SPEC §4 says; anything
else is declared unsupported and goes to the next backend, never to aiter:

- per-tensor FP8 (aiter raises ``NotImplementedError``); FP8 of the other flavour than the
  one aiter writes on this GPU (``aiter.dtypes.fp8``: e4m3fnuz on MI300/gfx942, e4m3fn on
  MI350/gfx950); MXFP4 without a real ``float4_e2m1fn_x2`` dtype;
- a plain (no-quant) request with ``q_residual`` or ``gemma_norm``: aiter's no-quant path
  ignores both (SPEC §6);
- widths over 8192 (aiter's C++ check, which aborts the process) or not a multiple of 8 (its
  vector stores round the row's bound up to 4 bytes, so an odd width would write past the row);
  group sizes other than 32/64/128.

aiter writes scales by raw offset (``i * G + g``, or ``g * m + i`` transposed) and reads with
16-byte vectors, so scales in another layout, and tensors whose base or row stride is not
16-byte aligned, go through a temporary and a copy. On gfx942 aiter truncates bf16 outputs
where qknorm rounds to nearest-even: at most one bf16 ulp, inside the tolerance table.

Nothing here imports aiter until :meth:`AiterBackend.available` is called (first use).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..quant import FP8_DTYPES, QuantMode
from ..request import QKNormRequest
from .base import BackendUnavailable

__all__ = ["AiterBackend", "GENERATIONS"]

GENERATIONS = ("unified", "group_quant", "private", "legacy")  # newest first

_GQ = "aiter.ops.fused_qk_rmsnorm_group_quant"
_ROPE = "aiter.ops.fused_qk_norm_rope_cache_quant"
_MAX_WIDTH = 8192
_WIDTH_MULTIPLE = 8
_GROUP_SIZES = (32, 64, 128)

_GROUP_PREFIX = ("q_out_quantized", "q_out_scale", "q", "q_weight", "q_epsilon", "q_out_unquantized", "k_out",
                 "q_res_out", "k", "k_weight", "k_epsilon", "q_residual")  # fmt: skip
_UNIFIED_PARAMS = (*_GROUP_PREFIX, "gemma_norm", "quant_type", "group_size", "transpose_scale")
_PRIVATE_PARAMS = ("q_out", "q", "q_weight", "q_eps", "k_out", "k", "k_weight", "k_eps")
_LEGACY_PARAMS = ("q", "q_weight", "q_eps", "k", "k_weight", "k_eps")
# aiter.ops.enum.QuantType members the unified adapter passes, with the values qknorm relies on.
_QUANT_TYPE_VALUES = {"No": 0, "per_Tensor": 1, "per_Token": 2, "per_1x32": 3, "per_1x128": 4}


@dataclass(frozen=True)
class _Caps:
    """What the installed aiter reports about itself."""

    version: str
    location: str
    fp8: torch.dtype | None  # aiter.dtypes.fp8: the FP8 flavour its kernels write on this GPU
    fp4x2: torch.dtype | None  # aiter.dtypes.fp4x2 when it is torch's real float4_e2m1fn_x2


def _shape_mismatch(fn: object, prefix: tuple[str, ...], keywords: tuple[str, ...] = ()) -> str | None:
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


class _Adapter:
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

    def run(self, req: QKNormRequest, caps: _Caps) -> None:
        raise NotImplementedError


def _quant_args(req: QKNormRequest, b: _Buffers, caps: _Caps) -> dict[str, Any]:
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


class _Unified(_Adapter):
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

    def run(self, req: QKNormRequest, caps: _Caps) -> None:
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


class _GroupQuant(_Adapter):
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

    def run(self, req: QKNormRequest, caps: _Caps) -> None:
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


class _Private(_Adapter):
    generation, since = "private", "v0.1.14"

    def __init__(self, module: str, fn: Callable[..., Any]) -> None:
        super().__init__(module, "_fused_qk_rmsnorm")
        self.fn = fn

    def features(self) -> str:
        return "plain q and k"

    def supports(self, req: QKNormRequest, fp8: torch.dtype | None, fp4x2: torch.dtype | None) -> str | None:
        return _plain_with_k_unsupported(req)

    def run(self, req: QKNormRequest, caps: _Caps) -> None:
        b = _Buffers()
        q_out, k_out = b.output(req.q_out, contiguous=True), b.output(req.k_out, contiguous=True)
        self.fn(q_out, b.input(req.q), b.input(req.q_weight), req.q_eps,
                k_out, b.input(req.k), b.input(req.k_weight), req.k_eps)  # fmt: skip
        b.finish()


class _Legacy(_Adapter):
    generation, since = "legacy", "before v0.1.14"

    def __init__(self, module: str, fn: Callable[..., Any]) -> None:
        super().__init__(module, "fused_qk_rmsnorm")
        self.fn = fn

    def features(self) -> str:
        return "plain q and k (returns new tensors)"

    def supports(self, req: QKNormRequest, fp8: torch.dtype | None, fp4x2: torch.dtype | None) -> str | None:
        return _plain_with_k_unsupported(req)

    def run(self, req: QKNormRequest, caps: _Caps) -> None:
        b = _Buffers()
        result = self.fn(b.input(req.q), b.input(req.q_weight), req.q_eps,
                         b.input(req.k), b.input(req.k_weight), req.k_eps)  # fmt: skip
        if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result)):
            raise RuntimeError(f"{self.entry} returned {type(result).__name__}, expected (q_out, k_out)")
        req.q_out.copy_(result[0])  # type: ignore[union-attr]
        req.k_out.copy_(result[1])  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- binding


def _import(name: str) -> tuple[Any, str]:
    try:
        return importlib.import_module(name), ""
    except (Exception, SystemExit) as exc:
        return None, f"import {name} raised {type(exc).__name__}: {exc}"


def _bind_unified(gq: Any, gq_why: str, rope: Any, rope_why: str) -> _Adapter | str:
    if gq is None:
        return gq_why
    fn = getattr(gq, "fused_qk_rmsnorm", None)
    if fn is None:
        return f"{_GQ} has no fused_qk_rmsnorm"
    why = _shape_mismatch(fn, _UNIFIED_PARAMS)
    if why is not None:
        return f"{_GQ}.fused_qk_rmsnorm {why}"
    enum_mod, enum_why = _import("aiter.ops.enum")
    qt = getattr(enum_mod, "QuantType", None)
    if qt is None:
        return enum_why or "aiter.ops.enum has no QuantType"
    for name, value in _QUANT_TYPE_VALUES.items():
        member = getattr(qt, name, None)
        if member is None or int(member) != value:
            return f"aiter.ops.enum.QuantType.{name} is {member!r}, expected {value}"
    return _Unified(_GQ, fn, qt)


def _bind_group_quant(gq: Any, gq_why: str, rope: Any, rope_why: str) -> _Adapter | str:
    if gq is None:
        return gq_why
    fn = getattr(gq, "fused_qk_rmsnorm_group_quant", None)
    if fn is None:
        return f"{_GQ} has no fused_qk_rmsnorm_group_quant"
    why = _shape_mismatch(fn, _GROUP_PREFIX, ("group_size", "transpose_scale"))
    if why is not None:
        return f"{_GQ}.fused_qk_rmsnorm_group_quant {why}"
    per_token = getattr(gq, "fused_qk_rmsnorm_per_token_quant", None)
    if per_token is not None and _shape_mismatch(per_token, _GROUP_PREFIX) is not None:
        per_token = None  # an unrecognized per-token entry is left alone; group quantization still binds
    return _GroupQuant(_GQ, fn, per_token, "gemma_norm" in inspect.signature(fn).parameters)


def _bind_rope(symbol: str, params: tuple[str, ...], cls: type[_Private] | type[_Legacy]) -> Callable[..., Any]:
    def bind(gq: Any, gq_why: str, rope: Any, rope_why: str) -> _Adapter | str:
        if rope is None:
            return rope_why
        fn = getattr(rope, symbol, None)
        if fn is None:
            return f"{_ROPE} has no {symbol}"
        why = _shape_mismatch(fn, params)
        return f"{_ROPE}.{symbol} {why}" if why is not None else cls(_ROPE, fn)

    return bind


_BINDERS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("unified", _bind_unified),
    ("group_quant", _bind_group_quant),
    ("private", _bind_rope("_fused_qk_rmsnorm", _PRIVATE_PARAMS, _Private)),
    ("legacy", _bind_rope("fused_qk_rmsnorm", _LEGACY_PARAMS, _Legacy)),
)


def _caps(aiter: Any) -> _Caps:
    version = getattr(aiter, "__version__", None)
    for dist in ("amd-aiter", "aiter"):
        if version is None:
            try:
                version = importlib.metadata.version(dist)
            except Exception:
                pass
    dtypes = getattr(aiter, "dtypes", None)
    if dtypes is None:
        dtypes, _ = _import("aiter.utility.dtypes")
    fp8 = getattr(dtypes, "fp8", None)
    fp4x2 = getattr(dtypes, "fp4x2", None)
    real_fp4 = getattr(torch, "float4_e2m1fn_x2", None)
    return _Caps(
        version=str(version or "unknown version"),
        location=str(getattr(aiter, "__file__", None) or "unknown location"),
        fp8=fp8 if fp8 in FP8_DTYPES else None,
        fp4x2=fp4x2 if real_fp4 is not None and fp4x2 == real_fp4 else None,
    )


def _arch_fp8(device: torch.device) -> torch.dtype | None:
    """The FP8 flavour of a ROCm GPU from its architecture, for an aiter that does not say."""
    if device.type != "cuda" or torch.version.hip is None:
        return None
    arch = str(getattr(torch.cuda.get_device_properties(device), "gcnArchName", ""))
    if arch.startswith("gfx94"):
        return torch.float8_e4m3fnuz
    if arch.startswith(("gfx95", "gfx12")):
        return torch.float8_e4m3fn
    return None


def _is_build_failure(exc: BaseException) -> bool:
    """aiter's JIT build failure (``RuntimeError("[aiter] build [module] ... failed")``) or a .so that won't load."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (subprocess.CalledProcessError, ImportError, OSError)):
            return True
        if isinstance(e, RuntimeError) and re.search(r"\bbuild\b.*\bfail", str(e), re.IGNORECASE):
            return True
        e = e.__cause__ or e.__context__
    return False


class AiterBackend:
    """aiter's fused Q/K RMSNorm kernels behind the :class:`~qknorm.backends.base.Backend` protocol.

    Parameters
    ----------
    device_types : tuple of str
        Device types whose tensors may be handed to aiter: ``("cuda",)`` (ROCm builds of
        PyTorch call their GPUs ``cuda``). :mod:`qknorm.testing.fake_aiter` adds ``"cpu"`` to
        run the adapters against a fake aiter package.
    """

    name = "aiter"

    def __init__(self, device_types: tuple[str, ...] = ("cuda",)) -> None:
        self.device_types = tuple(device_types)
        self._lock = threading.Lock()
        self._probed = False
        self._absent: str | None = None  # not installed: quietly unavailable
        self._broken: str | None = None  # installed but unusable: BackendUnavailable
        self._caps: _Caps | None = None
        self._adapters: list[_Adapter] = []
        self._notes: list[str] = []  # why each unbound generation did not bind
        self._routes: dict[tuple[object, ...], _Adapter] = {}

    def _probe(self) -> None:
        with self._lock:
            if self._probed:
                return
            self._probed = True
            try:
                if importlib.util.find_spec("aiter") is None:
                    self._absent = "aiter is not installed"
                    return
                aiter = importlib.import_module("aiter")
                self._caps = _caps(aiter)
                gq, gq_why = _import(_GQ)
                rope, rope_why = _import(_ROPE)
            except (Exception, SystemExit) as exc:
                self._broken = f"import aiter raised {type(exc).__name__}: {exc}"
                return
            for generation, binder in _BINDERS:
                try:
                    result = binder(gq, gq_why, rope, rope_why)
                except Exception as exc:
                    result = f"binding raised {type(exc).__name__}: {exc}"
                if isinstance(result, str):
                    self._notes.append(f"{generation}: {result}")
                else:
                    self._adapters.append(result)
            if not self._adapters:
                self._broken = (
                    f"aiter {self._caps.version} has no usable fused Q/K RMSNorm entry ({'; '.join(self._notes)})"
                )

    def available(self) -> tuple[bool, str]:
        """Import aiter and bind every generation found (once); raises BackendUnavailable when it is broken."""
        self._probe()
        if self._absent is not None:
            return False, self._absent
        if self._broken is not None:
            raise BackendUnavailable(self._broken)
        version = self._caps.version if self._caps is not None else "unknown version"
        return True, f"aiter {version}: bound {', '.join(a.generation for a in self._adapters)}"

    def _fp8(self, device: torch.device) -> torch.dtype | None:
        reported = self._caps.fp8 if self._caps is not None else None
        return reported if reported is not None else _arch_fp8(device)

    def supports(self, req: QKNormRequest) -> str | None:
        self._probe()
        if not self._adapters:
            return self._absent or self._broken or "aiter is not bound"
        dev = req.device
        if dev.type not in self.device_types:
            return f"aiter runs on {'/'.join(self.device_types)} devices, the request is on {dev.type}"
        if dev.type == "cuda" and torch.version.hip is None:
            return "aiter needs a ROCm build of PyTorch"
        for name, width in (("n1", req.n1), ("n2", req.n2)):
            if width > _MAX_WIDTH:
                return f"aiter's fused kernels take widths up to {_MAX_WIDTH}, {name}={width}"
            if width % _WIDTH_MULTIPLE:
                return f"aiter needs widths that are multiples of {_WIDTH_MULTIPLE}, {name}={width}"
        fp8 = self._fp8(dev) if req.mode.is_fp8 else None
        fp4x2 = self._caps.fp4x2 if self._caps is not None else None
        reasons: dict[str, list[str]] = {}  # reason -> generations giving it
        for adapter in self._adapters:
            why = adapter.supports(req, fp8, fp4x2)
            if why is None:
                self._routes[req.key()] = adapter
                return None
            reasons.setdefault(why, []).append(adapter.generation)
        return "; ".join(f"{', '.join(gens)}: {why}" for why, gens in reasons.items())

    def run(self, req: QKNormRequest) -> None:
        """Call the bound generation serving ``req``; a first-use build failure raises BackendUnavailable."""
        adapter = self._routes.get(req.key())
        if adapter is None:
            why = self.supports(req)
            if why is not None:
                raise RuntimeError(f"aiter cannot serve this request: {why}")
            adapter = self._routes[req.key()]
        try:
            adapter.run(req, self._caps)  # type: ignore[arg-type]
        except Exception as exc:
            if not adapter.proven and _is_build_failure(exc):
                raise BackendUnavailable(
                    f"{adapter.entry} failed to build or load on first use: {type(exc).__name__}: {exc}"
                ) from exc
            raise
        adapter.proven = True

    def describe(self) -> dict[str, str]:
        """What the probe found: aiter's version and location, each bound generation, what did not bind."""
        self._probe()
        info: dict[str, str] = {}
        if self._absent is not None:
            return info
        if self._caps is not None:
            info["aiter"] = f"{self._caps.version} at {self._caps.location}"
            info["fp8 dtype"] = str(self._caps.fp8) if self._caps.fp8 is not None else "not reported"
            info["fp4x2 dtype"] = str(self._caps.fp4x2) if self._caps.fp4x2 is not None else "none"
        for i, a in enumerate(self._adapters):
            label = "bound (preferred)" if i == 0 else "bound"
            info[f"{label}: {a.generation}"] = f"{a.entry} (aiter {a.since}): {a.features()}"
        for note in self._notes:
            generation, _, why = note.partition(": ")
            info[f"not bound: {generation}"] = why
        info["devices"] = "/".join(self.device_types)
        return info
