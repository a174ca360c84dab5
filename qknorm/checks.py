"""Validation of the fused Q/K RMSNorm (SPEC §3, §5): a call's signature in, a plan or an error out.

:func:`plan` reads only what a call's signature holds (each tensor's :class:`TensorSpec`: class,
dtype, device, shape, strides; the scalars), so its verdict is cached per signature by
:mod:`qknorm.core.pipeline`; where the tensors are in memory is checked on every call by the
plan's :class:`~qknorm.core.aliasing.AliasCheck`. Nothing is written before both pass.

Wrong type or dtype -> ``TypeError``; wrong shape, stride, size, group size or combination ->
``ValueError``. Messages name the argument as the caller passed it (``display`` maps the op's
field names to the entry's, e.g. ``q_out`` to aiter's ``q_out_quantized`` in ``No`` mode), what
was expected and what was given.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .core.aliasing import AliasCheck
from .core.checks import check_bool, check_eps, check_tensor
from .core.signature import TensorSpec, tensor_key
from .quant import FP8_DTYPES, MXFP4_GROUP_SIZES, QuantMode, is_e8m0_dtype, is_fp4_dtype
from .request import QKNormPlan, QKNormRequest, ScaleView

__all__ = ["plan", "build_request", "check_eps", "MAX_WIDTH", "INPUT_DTYPES", "OUTPUTS", "IN_PLACE"]

INPUT_DTYPES = (torch.float16, torch.bfloat16)
# Widest row qknorm accepts (q or k). aiter stops at 8192; the reference has no limit, the
# Triton kernels loop over column chunks, and 65536 keeps a row's fp32 sum of squares exact enough.
MAX_WIDTH = 65536

# The fields the operator writes, and the in-place forms it supports (exactly the same view).
OUTPUTS = frozenset({"k_out", "q_res_out", "q_out", "q_out_quantized", "q_out_scale"})
IN_PLACE = frozenset({("k_out", "k"), ("q_out", "q"), ("q_res_out", "q"), ("q_res_out", "q_residual")})

Names = Mapping[str, str]


# ----------------------------------------------------------------------------- small checks


def _check_device(name: str, t: Any, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")


def _check_rows(name: str, t: Any, m: int, n: int, dtype: torch.dtype | tuple[torch.dtype, ...]) -> None:
    """``t`` is ``[m, n]`` of ``dtype`` with unit column stride and row stride >= n."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")
    if t.dim() != 2 or tuple(t.shape) != (m, n):
        raise ValueError(f"{name} must have shape [{m}, {n}], got {list(t.shape)}")
    if n > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")
    if m > 1 and t.stride(0) < n:
        raise ValueError(f"{name} must have row stride >= its width {n}, got strides {t.stride()}")


def _check_output(name: str, t: Any, m: int, n: int, dtype: Any, device: torch.device) -> Any:
    t = check_tensor(name, t)
    _check_rows(name, t, m, n, dtype)
    _check_device(name, t, device)
    return t


def _check_width(name: str, n: int) -> None:
    if n < 1 or n > MAX_WIDTH:
        raise ValueError(f"{name} width must be in [1, {MAX_WIDTH}], got {n}")


def _check_weight(name: str, w: Any, n: int, dtype: torch.dtype, device: torch.device) -> Any:
    w = check_tensor(name, w)
    if w.dtype != dtype:
        raise TypeError(f"{name} must have the input dtype {dtype}, got {w.dtype}")
    if w.dim() != 1 or w.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {list(w.shape)}")
    if n > 1 and w.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {w.stride()}")
    _check_device(name, w, device)
    return w


def _check_group_size(group_size: object, n1: int, allowed: tuple[int, ...] | None) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    gs = int(group_size)
    if allowed is not None and gs not in allowed:
        raise ValueError(f"group_size must be one of {list(allowed)}, got {gs}")
    if gs <= 0 or gs & (gs - 1):
        raise ValueError(f"group_size must be a positive power of two, got {gs}")
    if n1 % gs:
        raise ValueError(f"group_size must divide n1={n1}, got {gs}")
    return gs


def _pair(names: tuple[str, ...], given: tuple[bool, ...]) -> None:
    """Arguments that come together: all or none."""
    if any(given) and not all(given):
        present = [n for n, g in zip(names, given) if g]
        missing = [n for n, g in zip(names, given) if not g]
        raise ValueError(f"{' and '.join(names) if len(names) == 2 else ', '.join(names[:-1]) + ' and ' + names[-1]} "
                         f"come together: got {', '.join(present)} without {', '.join(missing)}")  # fmt: skip


# ----------------------------------------------------------------------------- q, k, residual


def _check_q(q: Any) -> Any:
    q = check_tensor("q", q)
    if q.dtype not in INPUT_DTYPES:
        raise TypeError(f"q must have dtype torch.float16 or torch.bfloat16, got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [m, n1], got shape {list(q.shape)}")
    if q.device.type == "meta":
        raise ValueError("q must be on a real device, got a meta tensor")
    m, n1 = q.shape
    _check_width("q", n1)
    _check_rows("q", q, m, n1, q.dtype)
    return q


def _check_k(call: Mapping[str, Any], m: int, dtype: torch.dtype, device: torch.device) -> None:
    k, k_weight, k_out = call["k"], call["k_weight"], call["k_out"]
    _pair(("k", "k_weight", "k_out"), (k is not None, k_weight is not None, k_out is not None))
    if k is None:
        return
    k = check_tensor("k", k)
    if k.dim() != 2:
        raise ValueError(f"k must be 2-D [m, n2], got shape {list(k.shape)}")
    if k.dtype != dtype:
        raise TypeError(f"k must have q's dtype {dtype}, got {k.dtype}")
    if k.shape[0] != m:
        raise ValueError(f"k must have q's row count m={m}, got shape {list(k.shape)}")
    n2 = k.shape[1]
    _check_width("k", n2)
    _check_rows("k", k, m, n2, dtype)
    _check_device("k", k, device)
    _check_weight("k_weight", k_weight, n2, dtype, device)
    _check_output("k_out", k_out, m, n2, dtype, device)


def _check_residual(call: Mapping[str, Any], m: int, n1: int, dtype: torch.dtype, device: torch.device) -> None:
    res, res_out = call["q_residual"], call["q_res_out"]
    _pair(("q_residual", "q_res_out"), (res is not None, res_out is not None))
    if res is not None:
        _check_output("q_residual", res, m, n1, dtype, device)
        _check_output("q_res_out", res_out, m, n1, dtype, device)


# ----------------------------------------------------------------------------- quantized outputs


@dataclass(frozen=True)
class _ModeRule:
    """What one quantization mode needs of ``q_out_quantized`` and ``q_out_scale`` (SPEC §4 rules 6-12)."""

    fp8: bool  # FP8 codes [m, n1] and float32 scales; else MXFP4 nibbles [m, n1/2] and E8M0 bytes
    scales: str  # "groups": [m, n1/gs]; "row": [m, 1]; "one": a single element
    default_group: int | None  # group size when none is given (None: the caller must give one)
    groups: tuple[int, ...] | None  # the group sizes allowed (None: any power of two dividing n1)


_MODE_RULES = {
    QuantMode.FP8_GROUP: _ModeRule(fp8=True, scales="groups", default_group=None, groups=None),
    QuantMode.FP8_TOKEN: _ModeRule(fp8=True, scales="row", default_group=None, groups=None),
    QuantMode.FP8_TENSOR: _ModeRule(fp8=True, scales="one", default_group=None, groups=None),
    QuantMode.MXFP4: _ModeRule(fp8=False, scales="groups", default_group=32, groups=MXFP4_GROUP_SIZES),
}


def _check_quant_dtypes(mode: QuantMode, rule: _ModeRule, quant: Any, scale: Any) -> None:
    if rule.fp8:
        if quant.dtype not in FP8_DTYPES:
            # Block quantization picks MXFP4 from a packed-nibble output, so name that choice too.
            fp4 = " (or torch.float4_e2m1fn_x2/torch.uint8 for MXFP4)" if mode is QuantMode.FP8_GROUP else ""
            raise TypeError(f"q_out_quantized must have dtype torch.float8_e4m3fn or torch.float8_e4m3fnuz{fp4} "
                            f"for {mode.value} quantization, got {quant.dtype}")  # fmt: skip
        if scale.dtype != torch.float32:
            raise TypeError(f"q_out_scale must have dtype torch.float32 for FP8, got {scale.dtype}")
        return
    if not is_fp4_dtype(quant.dtype):
        raise TypeError(f"q_out_quantized must have dtype torch.float4_e2m1fn_x2 or torch.uint8 for MXFP4, got {quant.dtype}")
    if not is_e8m0_dtype(scale.dtype):
        raise TypeError(f"q_out_scale must have dtype torch.uint8 or torch.float8_e8m0fnu for MXFP4, got {scale.dtype}")


def _transposed_scale_view(scale: Any, m: int, groups: int) -> ScaleView | None:
    """Both column-major forms of SPEC §4 rule 9, as an ``[m, G]`` view with strides (1, s)."""
    if scale.dim() != 2 or tuple(scale.shape) != (m, groups):
        raise ValueError(f"q_out_scale must have shape [{m}, {groups}] (transpose_scale=True), got {list(scale.shape)}")
    if scale.is_contiguous():  # a contiguous [m, G] tensor whose memory is read as [G, m]: (i, g) at g*m + i
        return ScaleView(shape=(m, groups), strides=(1, m))
    if (m <= 1 or scale.stride(0) == 1) and (groups <= 1 or scale.stride(1) >= m):
        return None
    raise ValueError(
        f"q_out_scale with transpose_scale=True must be a contiguous [{m}, {groups}] tensor or a column-major "
        f"view with strides (1, >= {m}) such as torch.empty({groups}, {m}).t(), got strides {scale.stride()}"
    )


def _check_scale_shape(rule: _ModeRule, scale: Any, m: int, cols: int, transpose: bool) -> ScaleView | None:
    """The scale tensor's shape for ``cols`` scales per row; returns the view backends need, if any."""
    if rule.scales == "one":
        if scale.numel() != 1 or scale.dim() > 2:
            raise ValueError(f"q_out_scale must have one element (shape [1] or [1, 1]) for per-tensor FP8, "
                             f"got shape {list(scale.shape)}")  # fmt: skip
        return ScaleView(shape=(1,), strides=(1,)) if tuple(scale.shape) != (1,) else None
    if transpose:
        return _transposed_scale_view(scale, m, cols)
    if rule.fp8:
        _check_rows("q_out_scale", scale, m, cols, torch.float32)
        return None
    _check_rows("q_out_scale", _as_bytes(scale), m, cols, torch.uint8)
    return None if scale.dtype == torch.uint8 else ScaleView(dtype=torch.uint8)


def _as_bytes(t: Any) -> TensorSpec:
    """A one-byte tensor's spec as uint8 (what ``t.view(torch.uint8)`` gives backends)."""
    return (t if isinstance(t, TensorSpec) else TensorSpec(*tensor_key(t)))._replace(dtype=torch.uint8)


def _check_quantized(call: Mapping[str, Any], mode: QuantMode, m: int, n1: int, device: torch.device,
                     transpose: bool) -> tuple[int, ScaleView | None]:  # fmt: skip
    """``q_out_quantized`` and ``q_out_scale`` for ``mode``; returns (group size, scale view)."""
    rule = _MODE_RULES[mode]
    quant, scale = call["q_out_quantized"], call["q_out_scale"]
    if quant is None or scale is None:
        absent = "q_out_quantized" if quant is None else "q_out_scale"
        raise ValueError(f"{absent} must be given for {mode.value} quantization")
    quant, scale = check_tensor("q_out_quantized", quant), check_tensor("q_out_scale", scale)
    _check_device("q_out_quantized", quant, device)
    _check_device("q_out_scale", scale, device)
    if transpose and mode is not QuantMode.FP8_GROUP:
        raise ValueError(f"transpose_scale=True is only supported with FP8 group quantization, got {mode.value}")
    _check_quant_dtypes(mode, rule, quant, scale)
    if rule.fp8:
        _check_rows("q_out_quantized", quant, m, n1, quant.dtype)
    elif n1 % 2:
        raise ValueError(f"MXFP4 needs an even n1 (two values per byte), got n1={n1}")
    gs = n1
    if rule.scales == "groups":
        given = call["group_size"]
        gs = _check_group_size(rule.default_group if given is None else given, n1, rule.groups)
    if not rule.fp8:
        _check_rows("q_out_quantized", _as_bytes(quant), m, n1 // 2, torch.uint8)
    return gs, _check_scale_shape(rule, scale, m, n1 // gs, transpose)


# ----------------------------------------------------------------------------- the plan


def plan(call: Mapping[str, Any], display: Names | None = None, *, aliasing: bool = True) -> QKNormPlan:
    """Validate one call given as the op's fields (tensors as :class:`TensorSpec` or tensors).

    ``display`` renames fields in messages (the entry's names for them); ``aliasing=False``
    skips building the aliasing check (fake tensors: there is no memory to compare).
    Raises ``TypeError``/``ValueError`` (SPEC §5); writes nothing.
    """
    q = _check_q(call["q"])
    m, n1 = q.shape
    dtype, device = q.dtype, q.device
    _check_weight("q_weight", call["q_weight"], n1, dtype, device)
    q_eps = check_eps("q_epsilon", call["q_epsilon"])
    k_eps = q_eps if call["k_epsilon"] is None else check_eps("k_epsilon", call["k_epsilon"])
    gemma = check_bool("gemma_norm", call["gemma_norm"])
    transpose = check_bool("transpose_scale", call["transpose_scale"])
    mode = _check_mode(call["quant_mode"])
    _check_k(call, m, dtype, device)
    _check_residual(call, m, n1, dtype, device)
    q_out_name = (display or {}).get("q_out", "q_out")
    if call["q_out"] is not None:
        _check_output(q_out_name, call["q_out"], m, n1, dtype, device)
    gs, scale_view = 0, None
    if mode is QuantMode.NONE:
        if call["q_out_quantized"] is not None or call["q_out_scale"] is not None:
            raise ValueError("q_out_quantized and q_out_scale must be None without quantization")
        if transpose:
            raise ValueError("transpose_scale=True needs FP8 group quantization, got no quantization")
        if call["q_out"] is None:
            raise ValueError(f"{q_out_name} must be given: without quantization it receives the normalized q")
    else:
        gs, scale_view = _check_quantized(call, mode, m, n1, device, transpose)
    quant = call["q_out_quantized"]
    quant_dtype = None if quant is None else (quant.dtype if mode.is_fp8 else torch.uint8)
    k = call["k"]
    names = tuple(call)
    specs = tuple(v if isinstance(v, TensorSpec) else None for v in call.values())
    return QKNormPlan(
        q_eps=q_eps, k_eps=k_eps, gemma=gemma, mode=mode, group_size=gs, transpose_scale=transpose,
        quant_as_bytes=quant is not None and not mode.is_fp8 and quant.dtype != torch.uint8,
        scale_view=scale_view,
        aliasing=AliasCheck(names, specs, OUTPUTS, IN_PLACE) if aliasing else AliasCheck(names, (), OUTPUTS, IN_PLACE),
        key=("fused_qk_rmsnorm", device.type, device.index, dtype, mode, quant_dtype, gs, n1,
             0 if k is None else k.shape[1], call["q_residual"] is not None, call["q_out"] is not None, gemma,
             transpose),
        slot={name: i for i, name in enumerate(names)},
    )  # fmt: skip


def _check_mode(value: object) -> QuantMode:
    try:
        return QuantMode(value)
    except ValueError:
        raise ValueError(f"quant_mode must be one of {[m.value for m in QuantMode]}, got {value!r}") from None


def build_request(**fields: Any) -> QKNormRequest:
    """Validate one call given by keyword (the op's fields; ``mode`` may stand for ``quant_mode``).

    A convenience for tests and tools: the same plan, aliasing check and binding as a call of the
    public entries, without running anything. Omitted fields are None (``q_epsilon`` 1e-6,
    ``gemma_norm``/``transpose_scale`` False, ``quant_mode`` "none").
    """
    from .ops import FIELDS  # the op's argument list; ops imports this module

    if "mode" in fields:
        mode = fields.pop("mode")
        fields["quant_mode"] = mode.value if isinstance(mode, QuantMode) else mode
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"build_request got unexpected fields {sorted(unknown)}")
    defaults = {"q_epsilon": 1e-6, "gemma_norm": False, "transpose_scale": False, "quant_mode": "none"}
    args = tuple(fields.get(name, defaults.get(name)) for name in FIELDS)
    from torch._subclasses.fake_tensor import is_fake

    from .core.pipeline import specs_or_values

    fake = any(is_fake(a) for a in args if isinstance(a, torch.Tensor))  # no memory to compare
    p = plan(dict(zip(FIELDS, specs_or_values(args))), aliasing=not fake)
    p.aliasing(args)
    return p.bind(args)
