"""Finding each aiter generation in the installed aiter: module, symbol, signature shape, marker files.

A name alone proves nothing: #2958 moved the public 6-argument ``fused_qk_rmsnorm`` to the
private ``_fused_qk_rmsnorm`` and reused the public name for the unified in-place entry. So
every binder checks the parameter names (``inspect.signature``); what a signature cannot show
is read from what else the same commit added (``aiter.utility.mx_types`` came with #3212's E8M0
rule). Nothing here imports aiter until a binder runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

from .aiter_adapters import GROUP_PREFIX, Adapter, GroupQuant, GroupQuantCaps, Legacy, Private, Unified

__all__ = ["GQ_MODULE", "ROPE_MODULE", "BINDERS", "shape_mismatch", "try_import"]

GQ_MODULE = "aiter.ops.fused_qk_rmsnorm_group_quant"
ROPE_MODULE = "aiter.ops.fused_qk_norm_rope_cache_quant"
_MX_MARKER = "aiter.utility.mx_types"  # added by #3212 with the ceil_pow2(amax/6) E8M0 rule

_UNIFIED_PARAMS = (*GROUP_PREFIX, "gemma_norm", "quant_type", "group_size", "transpose_scale")
_PRIVATE_PARAMS = ("q_out", "q", "q_weight", "q_eps", "k_out", "k", "k_weight", "k_eps")
_LEGACY_PARAMS = ("q", "q_weight", "q_eps", "k", "k_weight", "k_eps")
# aiter.ops.enum.QuantType members the unified adapter passes, with the values qknorm relies on.
# A pybind11 enum: int() gives the value, but == 0 is False, so members are compared by int().
_QUANT_TYPE_VALUES = {"No": 0, "per_Tensor": 1, "per_Token": 2, "per_1x32": 3, "per_1x128": 4}


def try_import(name: str) -> tuple[Any, str]:
    try:
        return importlib.import_module(name), ""
    except (Exception, SystemExit) as exc:
        return None, f"import {name} raised {type(exc).__name__}: {exc}"


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


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _group_quant_caps(gq: Any) -> GroupQuantCaps | str:
    """Read the group-quant module's generation from its entry's signature and the files beside it."""
    fn = getattr(gq, "fused_qk_rmsnorm_group_quant", None)
    if fn is None:
        return f"{GQ_MODULE} has no fused_qk_rmsnorm_group_quant"
    why = shape_mismatch(fn, GROUP_PREFIX, ("group_size", "transpose_scale"))
    if why is not None:
        return f"{GQ_MODULE}.fused_qk_rmsnorm_group_quant {why}"
    params = inspect.signature(fn).parameters
    per_token = getattr(gq, "fused_qk_rmsnorm_per_token_quant", None)
    if per_token is not None and shape_mismatch(per_token, GROUP_PREFIX) is not None:
        per_token = None  # an unrecognized per-token entry is left alone; group quantization still binds
    gemma = "gemma_norm" in params
    return GroupQuantCaps(
        gemma=gemma,
        no_quant=params["q_out_scale"].default is None and params["q_out_quantized"].default is None,
        per_token=per_token,
        contiguous=not gemma,
        mx_round_up=_has_module(_MX_MARKER),
    )


def _bind_unified(gq: Any, gq_why: str, rope: Any, rope_why: str) -> Adapter | str:
    if gq is None:
        return gq_why
    fn = getattr(gq, "fused_qk_rmsnorm", None)
    if fn is None:
        return f"{GQ_MODULE} has no fused_qk_rmsnorm"
    why = shape_mismatch(fn, _UNIFIED_PARAMS)
    if why is not None:
        return f"{GQ_MODULE}.fused_qk_rmsnorm {why}"
    caps = _group_quant_caps(gq)
    if isinstance(caps, str):
        return caps
    enum_mod, enum_why = try_import("aiter.ops.enum")
    qt = getattr(enum_mod, "QuantType", None)
    if qt is None:
        return enum_why or "aiter.ops.enum has no QuantType"
    for name, value in _QUANT_TYPE_VALUES.items():
        member = getattr(qt, name, None)
        try:
            ok = member is not None and int(member) == value
        except (TypeError, ValueError):
            ok = False
        if not ok:
            return f"aiter.ops.enum.QuantType.{name} is {member!r}, expected {value}"
    return Unified(GQ_MODULE, fn, qt, caps)


def _bind_group_quant(gq: Any, gq_why: str, rope: Any, rope_why: str) -> Adapter | str:
    if gq is None:
        return gq_why
    caps = _group_quant_caps(gq)
    return caps if isinstance(caps, str) else GroupQuant(GQ_MODULE, gq.fused_qk_rmsnorm_group_quant, caps)


def _bind_rope(symbol: str, params: tuple[str, ...], cls: type[Private] | type[Legacy]) -> Callable[..., Any]:
    def bind(gq: Any, gq_why: str, rope: Any, rope_why: str) -> Adapter | str:
        if rope is None:
            return rope_why
        fn = getattr(rope, symbol, None)
        if fn is None:
            return f"{ROPE_MODULE} has no {symbol}"
        why = shape_mismatch(fn, params)
        return f"{ROPE_MODULE}.{symbol} {why}" if why is not None else cls(ROPE_MODULE, fn)

    return bind


# Newest first: a request goes to the first generation that supports it.
BINDERS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("unified", _bind_unified),
    ("group_quant", _bind_group_quant),
    ("private", _bind_rope("_fused_qk_rmsnorm", _PRIVATE_PARAMS, Private)),
    ("legacy", _bind_rope("fused_qk_rmsnorm", _LEGACY_PARAMS, Legacy)),
)
