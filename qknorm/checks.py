"""Argument validation (SPEC §3, §5): every rule raises before any output is written.

Wrong type or dtype -> ``TypeError``; wrong shape, stride, size, group size or combination ->
``ValueError``. Messages name the argument, what was expected and what was given. Argument
names are aiter's (``q_out_scale``, ``q_epsilon``, ...) because those are what callers pass.
"""

from __future__ import annotations

import math
import numbers

import torch

try:  # private torch API (2.1+); if it moves, the data_ptr() probe in _check_aliasing still applies
    from torch._subclasses.fake_tensor import is_fake
except ImportError:  # pragma: no cover

    def is_fake(x: object) -> bool:  # type: ignore[misc]
        return False


from .quant import (
    FP8_DTYPES,
    MXFP4_GROUP_SIZES,
    QuantMode,
    is_e8m0_dtype,
    is_fp4_dtype,
)
from .request import QKNormRequest

__all__ = ["build_request", "check_eps", "MAX_WIDTH", "INPUT_DTYPES"]

INPUT_DTYPES = (torch.float16, torch.bfloat16)
# Widest row qknorm accepts (q or k). aiter stops at 8192; the reference has no limit, the
# Triton kernels loop over column chunks, and 65536 keeps a row's fp32 sum of squares exact enough.
MAX_WIDTH = 65536
_FP32_MIN_NORMAL = 2.0**-126
_FP32_MAX = (2.0 - 2.0**-23) * 2.0**127


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:  # sparse/nested tensors have no usable strides
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) torch.Tensor, got {kind}")
    return t


def check_eps(name: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name} must be a positive finite float, got {type(eps).__name__}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    if not (_FP32_MIN_NORMAL <= value <= _FP32_MAX):
        # eps is added in fp32: below the smallest normal float32 it rounds (or, in FTZ kernels,
        # flushes) to 0, and an all-zero row then gives 0 * rsqrt(0) = NaN; above it, inf.
        raise ValueError(
            f"{name} must be a normal float32 in [{_FP32_MIN_NORMAL:.6g}, {_FP32_MAX:.6g}] (it is added in fp32), "
            f"got {value!r}"
        )
    return value


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")


def _check_rows(name: str, t: torch.Tensor, m: int, n: int, dtype: torch.dtype | tuple[torch.dtype, ...]) -> None:
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


def _check_width(name: str, n: int) -> None:
    if n < 1 or n > MAX_WIDTH:
        raise ValueError(f"{name} width must be in [1, {MAX_WIDTH}], got {n}")


def _check_weight(name: str, w: object, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    w = _tensor(name, w)
    if w.dtype != dtype:
        raise TypeError(f"{name} must have the input dtype {dtype}, got {w.dtype}")
    if w.dim() != 1 or w.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {list(w.shape)}")
    if n > 1 and w.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {w.stride()}")
    _check_device(name, w, device)
    return w


def _check_group_size(name: str, group_size: object, n1: int, allowed: tuple[int, ...] | None) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(group_size).__name__}")
    gs = int(group_size)
    if allowed is not None and gs not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {gs}")
    if gs <= 0 or gs & (gs - 1):
        raise ValueError(f"{name} must be a positive power of two, got {gs}")
    if n1 % gs:
        raise ValueError(f"{name} must divide n1={n1}, got {gs}")
    return gs


def _scale_view_transposed(scale: torch.Tensor, m: int, groups: int) -> torch.Tensor:
    """Accept both column-major forms of SPEC §4 rule 9 and return an ``[m, G]`` view, strides (1, s)."""
    name = "q_out_scale"
    if scale.dim() != 2 or tuple(scale.shape) != (m, groups):
        raise ValueError(f"{name} must have shape [{m}, {groups}] (transpose_scale=True), got {list(scale.shape)}")
    if scale.is_contiguous():
        # A contiguous [m, G] tensor whose memory is read as [G, m]: element (i, g) at g*m + i.
        return scale.as_strided((m, groups), (1, m), scale.storage_offset())
    if (m <= 1 or scale.stride(0) == 1) and (groups <= 1 or scale.stride(1) >= m):
        return scale
    raise ValueError(
        f"{name} with transpose_scale=True must be a contiguous [{m}, {groups}] tensor or a column-major "
        f"view with strides (1, >= {m}) such as torch.empty({groups}, {m}).t(), got strides {scale.stride()}"
    )


# ----------------------------------------------------------------------------- aliasing


def _window(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Byte window of a 1-D/2-D tensor as (start, rows, row stride, row width), all in bytes."""
    es = t.element_size()
    start = t.data_ptr()
    if t.dim() == 1:
        return start, 1, 0, (t.shape[0] - 1) * t.stride(0) * es + es if t.shape[0] > 0 else 0
    (a, b), (sa, sb) = t.shape, t.stride()
    if b == 1 or sb == 1:
        return start, a, sa * es, ((b - 1) * sb + 1) * es
    if a == 1 or sa == 1:
        return start, b, sb * es, ((a - 1) * sa + 1) * es
    return start, 1, 0, ((a - 1) * sa + (b - 1) * sb + 1) * es  # general strides: whole span


def _overlaps(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two tensors share at least one byte (exact for equal row strides, else by span)."""
    if x.numel() == 0 or y.numel() == 0:
        return False
    a0, ra, sa, wa = _window(x)
    b0, rb, sb, wb = _window(y)
    if a0 + (ra - 1) * sa + wa <= b0 or b0 + (rb - 1) * sb + wb <= a0:
        return False
    if ra == 1 or rb == 1 or sa != sb or wa > sa or wb > sb:
        return True
    # Rows i of x and j of y collide iff some t = i - j in [-(rb-1), ra-1] puts the column
    # ranges on top of each other: -(wb-1) <= d - t*s <= wa-1 with d = b0 - a0.
    s, d = sa, b0 - a0
    t_lo = max(-(rb - 1), -((-(d - wa + 1)) // s))  # ceil((d - wa + 1) / s)
    t_hi = min(ra - 1, (d + wb - 1) // s)
    return t_lo <= t_hi


def _same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype


def _check_aliasing(
    outputs: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    allowed: set[tuple[str, str]],
) -> None:
    """Outputs may not overlap each other or any input, except the supported in-place forms."""
    tensors = (*outputs.values(), *inputs.values())
    if any(is_fake(t) for t in tensors):
        # Fake tensors (torch.compile tracing, fake kernels) have no storage to compare; torch
        # 2.13 returns 0 from their data_ptr() (with a warning) instead of raising, so ask first.
        return
    try:
        for t in tensors:
            t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return  # other storage-less tensors (functional wrappers) likewise
    names = list(outputs)
    for i, oname in enumerate(names):
        out = outputs[oname]
        for other in names[i + 1 :]:
            if _overlaps(out, outputs[other]):
                raise ValueError(f"{oname} and {other} must not overlap in memory")
        for iname, inp in inputs.items():
            if (oname, iname) in allowed and _same_view(out, inp):
                continue
            if _overlaps(out, inp):
                hint = ""
                forms = sorted(i for (o, i) in allowed if o == oname)
                if forms:
                    hint = f" (in place it may only be exactly the same view as {' or '.join(forms)})"
                raise ValueError(f"{oname} must not overlap input {iname}{hint}")


_ALLOWED_ALIASES = {
    ("k_out", "k"),
    ("q_out_unquantized", "q"),
    ("q_out_quantized", "q"),  # No mode only: q_out_quantized then holds the normalized q
    ("q_res_out", "q"),
    ("q_res_out", "q_residual"),
}


# ----------------------------------------------------------------------------- the request


def build_request(
    *,
    q: object,
    q_weight: object,
    q_epsilon: object,
    k: object | None = None,
    k_weight: object | None = None,
    k_epsilon: object | None = None,
    k_out: object | None = None,
    q_residual: object | None = None,
    q_res_out: object | None = None,
    gemma_norm: bool = False,
    mode: QuantMode = QuantMode.NONE,
    group_size: object | None = None,
    q_out: object | None = None,
    q_out_name: str = "q_out_unquantized",
    q_out_copy: object | None = None,
    q_out_quantized: object | None = None,
    q_out_scale: object | None = None,
    transpose_scale: bool = False,
) -> QKNormRequest:
    """Validate one call and return its canonical :class:`QKNormRequest`.

    ``q_out`` is the tensor receiving the normalized q in the input dtype; ``q_out_name`` is
    the name the caller knows it by (``q_out_quantized`` in aiter's ``No`` mode, where a
    ``q_out_unquantized`` given as well arrives as ``q_out_copy`` and receives the same values).
    Raises ``TypeError``/``ValueError`` (SPEC §5); writes nothing.
    """
    q = _tensor("q", q)
    if q.dtype not in INPUT_DTYPES:
        raise TypeError(f"q must have dtype torch.float16 or torch.bfloat16, got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [m, n1], got shape {list(q.shape)}")
    if q.device.type == "meta":
        raise ValueError("q must be on a real device, got a meta tensor")
    m, n1 = q.shape
    _check_width("q", n1)
    _check_rows("q", q, m, n1, q.dtype)
    dtype, device = q.dtype, q.device
    q_weight = _check_weight("q_weight", q_weight, n1, dtype, device)
    q_eps = check_eps("q_epsilon", q_epsilon)
    k_eps = q_eps if k_epsilon is None else check_eps("k_epsilon", k_epsilon)
    if not isinstance(gemma_norm, bool):
        raise TypeError(f"gemma_norm must be a bool, got {type(gemma_norm).__name__}")
    if not isinstance(transpose_scale, bool):
        raise TypeError(f"transpose_scale must be a bool, got {type(transpose_scale).__name__}")

    inputs: dict[str, torch.Tensor] = {"q": q, "q_weight": q_weight}
    outputs: dict[str, torch.Tensor] = {}

    # k, k_weight, k_out come together.
    k_given = {"k": k is not None, "k_weight": k_weight is not None, "k_out": k_out is not None}
    if any(k_given.values()) and not all(k_given.values()):
        missing = [n for n, g in k_given.items() if not g]
        present = [n for n, g in k_given.items() if g]
        raise ValueError(f"k, k_weight and k_out come together: got {', '.join(present)} without {', '.join(missing)}")
    if k is not None:
        k = _tensor("k", k)
        k_out = _tensor("k_out", k_out)
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
        k_weight = _check_weight("k_weight", k_weight, n2, dtype, device)
        _check_rows("k_out", k_out, m, n2, dtype)
        _check_device("k_out", k_out, device)
        inputs.update(k=k, k_weight=k_weight)
        outputs["k_out"] = k_out

    # q_residual needs q_res_out (and the other way round).
    if (q_residual is None) != (q_res_out is None):
        pair = ("q_residual", "q_res_out") if q_residual is not None else ("q_res_out", "q_residual")
        raise ValueError(f"q_residual and q_res_out come together: got {pair[0]} without {pair[1]}")
    if q_residual is not None:
        q_residual = _tensor("q_residual", q_residual)
        q_res_out = _tensor("q_res_out", q_res_out)
        _check_rows("q_residual", q_residual, m, n1, dtype)
        _check_device("q_residual", q_residual, device)
        _check_rows("q_res_out", q_res_out, m, n1, dtype)
        _check_device("q_res_out", q_res_out, device)
        inputs["q_residual"] = q_residual
        outputs["q_res_out"] = q_res_out

    if q_out is not None:
        q_out = _tensor(q_out_name, q_out)
        _check_rows(q_out_name, q_out, m, n1, dtype)
        _check_device(q_out_name, q_out, device)
        outputs[q_out_name] = q_out

    if q_out_copy is not None:
        if q_out is None:
            raise ValueError("q_out_copy needs q_out")
        q_out_copy = _tensor("q_out_unquantized", q_out_copy)
        _check_rows("q_out_unquantized", q_out_copy, m, n1, dtype)
        _check_device("q_out_unquantized", q_out_copy, device)
        outputs["q_out_unquantized"] = q_out_copy

    # Quantization outputs per mode.
    gs = 0
    quant: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    if mode is QuantMode.NONE:
        if q_out_quantized is not None or q_out_scale is not None:
            raise ValueError("q_out_quantized and q_out_scale must be None without quantization")
        if transpose_scale:
            raise ValueError("transpose_scale=True needs FP8 group quantization, got no quantization")
        if q_out is None:
            raise ValueError(f"{q_out_name} must be given: without quantization it receives the normalized q")
    else:
        if q_out_quantized is None or q_out_scale is None:
            absent = "q_out_quantized" if q_out_quantized is None else "q_out_scale"
            raise ValueError(f"{absent} must be given for {mode.value} quantization")
        quant = _tensor("q_out_quantized", q_out_quantized)
        scale = _tensor("q_out_scale", q_out_scale)
        _check_device("q_out_quantized", quant, device)
        _check_device("q_out_scale", scale, device)
        if transpose_scale and mode is not QuantMode.FP8_GROUP:
            raise ValueError(f"transpose_scale=True is only supported with FP8 group quantization, got {mode.value}")
        if mode.is_fp8:
            if quant.dtype not in FP8_DTYPES:
                # Block quantization picks MXFP4 from a packed-nibble output, so name that choice too.
                fp4 = " (or torch.float4_e2m1fn_x2/torch.uint8 for MXFP4)" if mode is QuantMode.FP8_GROUP else ""
                raise TypeError(
                    f"q_out_quantized must have dtype torch.float8_e4m3fn or torch.float8_e4m3fnuz{fp4} "
                    f"for {mode.value} quantization, got {quant.dtype}"
                )
            _check_rows("q_out_quantized", quant, m, n1, quant.dtype)
            if scale.dtype != torch.float32:
                raise TypeError(f"q_out_scale must have dtype torch.float32 for FP8, got {scale.dtype}")
        if mode is QuantMode.FP8_GROUP:
            gs = _check_group_size("group_size", group_size, n1, None)
            groups = n1 // gs
            if transpose_scale:
                scale = _scale_view_transposed(scale, m, groups)
            else:
                _check_rows("q_out_scale", scale, m, groups, torch.float32)
        elif mode is QuantMode.FP8_TOKEN:
            gs = n1
            _check_rows("q_out_scale", scale, m, 1, torch.float32)
        elif mode is QuantMode.FP8_TENSOR:
            gs = n1
            if scale.numel() != 1 or scale.dim() > 2:
                raise ValueError(
                    f"q_out_scale must have one element (shape [1] or [1, 1]) for per-tensor FP8, got shape {list(scale.shape)}"
                )
            scale = scale.view(1)
        elif mode is QuantMode.MXFP4:
            if not is_fp4_dtype(quant.dtype):
                raise TypeError(
                    f"q_out_quantized must have dtype torch.float4_e2m1fn_x2 or torch.uint8 for MXFP4, got {quant.dtype}"
                )
            if not is_e8m0_dtype(scale.dtype):
                raise TypeError(
                    f"q_out_scale must have dtype torch.uint8 or torch.float8_e8m0fnu for MXFP4, got {scale.dtype}"
                )
            if n1 % 2:
                raise ValueError(f"MXFP4 needs an even n1 (two values per byte), got n1={n1}")
            gs = _check_group_size("group_size", 32 if group_size is None else group_size, n1, MXFP4_GROUP_SIZES)
            quant = quant.view(torch.uint8)
            scale = scale.view(torch.uint8)
            _check_rows("q_out_quantized", quant, m, n1 // 2, torch.uint8)
            _check_rows("q_out_scale", scale, m, n1 // gs, torch.uint8)
        outputs["q_out_quantized"] = quant
        outputs["q_out_scale"] = scale

    _check_aliasing(outputs, inputs, _ALLOWED_ALIASES)

    return QKNormRequest(
        q=q,
        q_weight=q_weight,
        q_eps=q_eps,
        k=k,  # type: ignore[arg-type]
        k_weight=k_weight,  # type: ignore[arg-type]
        k_eps=k_eps,
        q_residual=q_residual,  # type: ignore[arg-type]
        gemma=gemma_norm,
        mode=mode,
        group_size=gs,
        q_out=q_out,  # type: ignore[arg-type]
        q_quant=quant,
        q_scale=scale,
        k_out=k_out,  # type: ignore[arg-type]
        q_res_out=q_res_out,  # type: ignore[arg-type]
        transpose_scale=transpose_scale,
        q_out_copy=q_out_copy,  # type: ignore[arg-type]
    )
