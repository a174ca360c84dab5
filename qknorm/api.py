"""The entry points of SPEC §2.

Each entry resolves its own conventions (aiter's argument names, which output holds what in
each mode, the Pythonic entry's allocation) into one keyword call of the operator,
:func:`qknorm.ops.call_args`, and hands it to :func:`qknorm.ops.submit`: in eager mode the
call pipeline (plan cached per signature, aliasing check, backend); under torch.compile the
custom op ``torch.ops.qknorm.fused_qk_rmsnorm``.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch

from .backends.registry import run_request
from .checks import check_eps
from .core.aliasing import overlaps
from .core.signature import TensorSpec, tensor_key
from .ops import PIPELINE, SLOT, call_args, submit
from .quant import FP8_DTYPES, QuantMode, QuantType, is_fp4_dtype

__all__ = [
    "fused_qk_rmsnorm",
    "fused_qk_rmsnorm_group_quant",
    "fused_qk_rmsnorm_per_token_quant",
    "fused_qk_rmsnorm_legacy",
    "qk_rmsnorm",
    "QKNormOutput",
    "qk_rmsnorm_call",
    "quant_mode",
]

# Group size of each block-scaled QuantType in aiter's unified entry (SPEC §2): the 2-D
# weight-block types quantize activations per 1 x 128.
_QUANT_TYPE_GROUP = {
    QuantType.per_1x32: 32,
    QuantType.per_1x128: 128,
    QuantType.per_128x128: 128,
    QuantType.per_256x128: 128,
    QuantType.per_1024x128: 128,
}


def _quant_type(value: object) -> QuantType:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"quant_type must be a QuantType, got {type(value).__name__}")
    try:
        return QuantType(int(value))
    except ValueError:
        raise ValueError(
            f"quant_type must be one of {[f'{t.name}={t.value}' for t in QuantType]}, got {value!r}"
        ) from None


def _block_mode(q_out_quantized: object) -> str:
    """Block quantization writes MXFP4 when the output is packed nibbles, FP8 otherwise."""
    if isinstance(q_out_quantized, torch.Tensor) and is_fp4_dtype(q_out_quantized.dtype):
        return "mxfp4"
    return "fp8_group"


def fused_qk_rmsnorm(
    q_out_quantized: torch.Tensor | None = None,
    q_out_scale: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    q_weight: torch.Tensor | None = None,
    q_epsilon: float = 1e-6,
    q_out_unquantized: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    q_res_out: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_epsilon: float | None = None,
    q_residual: torch.Tensor | None = None,
    gemma_norm: bool = False,
    quant_type: QuantType | int = QuantType.No,
    group_size: int | None = None,
    transpose_scale: bool = False,
) -> None:
    """aiter's unified in-place entry: RMSNorm of q (and k), optionally quantizing q.

    Parameters
    ----------
    q_out_quantized : Tensor, optional
        ``QuantType.No``: ``[m, n1]`` in q's dtype, receives the normalized q. FP8 modes:
        ``[m, n1]`` ``float8_e4m3fn`` (FMAX 448) or ``float8_e4m3fnuz`` (FMAX 240). MXFP4 (a
        block type with a ``float4_e2m1fn_x2``/``uint8`` output): ``[m, n1 // 2]`` packed nibbles.
    q_out_scale : Tensor, optional
        float32 ``[m, n1 // group_size]`` (FP8 block), ``[m, 1]`` (per token), one element
        (per tensor), or uint8/``float8_e8m0fnu`` ``[m, n1 // group_size]`` (MXFP4). With
        ``transpose_scale`` the FP8 block scales are stored column-major (SPEC §4 rule 9).
    q : Tensor
        ``[m, n1]`` fp16/bf16, unit column stride, any row stride >= n1 (split views work).
    q_weight : Tensor
        ``[n1]``, q's dtype.
    q_epsilon : float
        Epsilon of q's norm (and k's when ``k_epsilon`` is None).
    q_out_unquantized : Tensor, optional
        ``[m, n1]`` q's dtype: receives the normalized q in every mode.
    k_out, k, k_weight : Tensor, optional
        ``[m, n2]``, ``[m, n2]``, ``[n2]`` in q's dtype; all three or none (q-only call).
    k_epsilon : float, optional
        Epsilon of k's norm; None uses ``q_epsilon``.
    q_residual, q_res_out : Tensor, optional
        ``[m, n1]`` q's dtype: ``q + q_residual`` is normalized and written to ``q_res_out``.
    gemma_norm : bool
        Multiply by ``1 + weight`` (fp32) instead of ``weight``.
    quant_type : QuantType
        ``No``, ``per_Tensor``, ``per_Token``, ``per_1x32`` (group 32), ``per_1x128``,
        ``per_128x128``, ``per_256x128``, ``per_1024x128`` (group 128).
    group_size : int, optional
        Overrides the group size implied by ``quant_type`` (a power of two dividing n1;
        32/64/128 for MXFP4).
    transpose_scale : bool
        Column-major FP8 block scales.

    Raises
    ------
    TypeError, ValueError
        Before anything is written, for any argument outside SPEC §3 (message names it).
    """
    qt = quant_type if type(quant_type) is QuantType else _quant_type(quant_type)
    if qt is QuantType.No:  # aiter writes the normalized q to q_out_quantized, in q's dtype
        if q_out_scale is not None:
            raise ValueError("q_out_scale must be None with quant_type=QuantType.No, got a tensor")
        if q_out_quantized is None and q_out_unquantized is None:
            raise ValueError(
                "q_out_quantized must be given with quant_type=QuantType.No (it receives the normalized q)"
            )
        args = call_args(
            q=q, q_weight=q_weight,  # type: ignore[arg-type]  # None is rejected by validation (TypeError)
            q_epsilon=q_epsilon, k=k, k_weight=k_weight, k_epsilon=k_epsilon, k_out=k_out,
            q_residual=q_residual, q_res_out=q_res_out, gemma_norm=gemma_norm, transpose_scale=transpose_scale,
            q_out=q_out_unquantized if q_out_quantized is None else q_out_quantized,
        )  # fmt: skip
        if q_out_quantized is None:
            submit(args, _AS_UNQUANTIZED)
        elif q_out_unquantized is None:
            submit(args, _AS_QUANTIZED)
        else:
            _submit_with_copy(args, q_out_unquantized)
        return
    if qt is QuantType.per_Tensor:
        mode, gs = "fp8_tensor", None
    elif qt is QuantType.per_Token:
        mode, gs = "fp8_token", None
    else:
        mode = _block_mode(q_out_quantized)
        gs = _QUANT_TYPE_GROUP[qt] if group_size is None else group_size
    submit(
        call_args(
            q=q, q_weight=q_weight,  # type: ignore[arg-type]  # None is rejected by validation (TypeError)
            q_epsilon=q_epsilon, k=k, k_weight=k_weight, k_epsilon=k_epsilon, k_out=k_out,
            q_residual=q_residual, q_res_out=q_res_out, gemma_norm=gemma_norm, quant_mode=mode, group_size=gs,
            q_out=q_out_unquantized, q_out_quantized=q_out_quantized, q_out_scale=q_out_scale,
            transpose_scale=transpose_scale,
        ),
        _AS_UNQUANTIZED,
    )  # fmt: skip


# Error messages name the normalized-q output as the entry's caller passed it.
_AS_QUANTIZED = {"q_out": "q_out_quantized"}
_AS_UNQUANTIZED = {"q_out": "q_out_unquantized"}


def _submit_with_copy(args: tuple[Any, ...], second: torch.Tensor) -> None:
    """aiter's ``No`` mode given both q outputs: the kernel writes ``q_out_quantized``, then a copy.

    In eager mode the second output is validated as the call's ``q_out`` would be (shape, dtype,
    device, aliasing against every other tensor) before anything is written.
    """
    i = SLOT["q_out"]
    first = args[i]
    if not (torch.compiler.is_compiling() or isinstance(first, torch._subclasses.FakeTensor)):
        req = PIPELINE.request(args, _AS_QUANTIZED)
        PIPELINE.request((*args[:i], second, *args[i + 1 :]), _AS_UNQUANTIZED)
        a, b = TensorSpec._make(tensor_key(first)), TensorSpec._make(tensor_key(second))
        if overlaps(a, first.data_ptr(), b, second.data_ptr()):
            raise ValueError("q_out_quantized and q_out_unquantized must not overlap in memory")
        run_request(req)
    else:
        submit(args, _AS_QUANTIZED)
    second.copy_(first)


def fused_qk_rmsnorm_group_quant(
    q_out_quantized: torch.Tensor | None,
    q_out_scale: torch.Tensor | None,
    q: torch.Tensor,
    q_weight: torch.Tensor,
    q_epsilon: float = 1e-6,
    q_out_unquantized: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    q_res_out: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_epsilon: float | None = None,
    q_residual: torch.Tensor | None = None,
    group_size: int = 128,
    transpose_scale: bool = False,
    gemma_norm: bool = False,
) -> None:
    """aiter's ``fused_qk_rmsnorm_group_quant``: norm q (and k), quantize q per 1 x group_size.

    FP8 when ``q_out_quantized`` is ``float8_e4m3fn``/``float8_e4m3fnuz`` (scales float32
    ``[m, n1 // group_size]``, column-major with ``transpose_scale``); MXFP4 when it is
    ``float4_e2m1fn_x2``/``uint8`` ``[m, n1 // 2]`` (scales E8M0 bytes, group 32/64/128).
    ``q_out_scale=None`` means no quantization: the normalized q goes to ``q_out_unquantized``
    (and ``q_out_quantized`` must then be None). Other arguments as in :func:`fused_qk_rmsnorm`.
    """
    if q_out_scale is None:
        if q_out_quantized is not None:
            raise ValueError("q_out_quantized must be None when q_out_scale is None (no-quant mode)")
        if q_out_unquantized is None:
            raise ValueError("q_out_unquantized must be given when q_out_scale is None (no-quant mode)")
        if transpose_scale:
            raise ValueError("transpose_scale=True needs q_out_scale, got None (no-quant mode)")
        mode = "none"
    else:
        mode = _block_mode(q_out_quantized)
    submit(
        call_args(
            q=q, q_weight=q_weight, q_epsilon=q_epsilon, k=k, k_weight=k_weight, k_epsilon=k_epsilon, k_out=k_out,
            q_residual=q_residual, q_res_out=q_res_out, gemma_norm=gemma_norm, quant_mode=mode, group_size=group_size,
            q_out=q_out_unquantized, q_out_quantized=q_out_quantized, q_out_scale=q_out_scale,
            transpose_scale=transpose_scale,
        ),
        _AS_UNQUANTIZED,
    )  # fmt: skip


def fused_qk_rmsnorm_per_token_quant(
    q_out_quantized: torch.Tensor,
    q_out_scale: torch.Tensor,
    q: torch.Tensor,
    q_weight: torch.Tensor,
    q_epsilon: float,
    q_out_unquantized: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    q_res_out: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_epsilon: float | None = None,
    q_residual: torch.Tensor | None = None,
    gemma_norm: bool = False,
) -> None:
    """aiter's ``fused_qk_rmsnorm_per_token_quant``: FP8 q with one float32 scale per row.

    ``q_out_quantized [m, n1]`` FP8, ``q_out_scale [m, 1]`` float32; other arguments as in
    :func:`fused_qk_rmsnorm`.
    """
    submit(
        call_args(
            q=q, q_weight=q_weight, q_epsilon=q_epsilon, k=k, k_weight=k_weight, k_epsilon=k_epsilon, k_out=k_out,
            q_residual=q_residual, q_res_out=q_res_out, gemma_norm=gemma_norm, quant_mode="fp8_token",
            q_out=q_out_unquantized, q_out_quantized=q_out_quantized, q_out_scale=q_out_scale,
        ),
        _AS_UNQUANTIZED,
    )  # fmt: skip


def fused_qk_rmsnorm_legacy(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    q_eps: float,
    k: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pre-v0.1.14 public aiter signature: six positional arguments, fresh outputs.

    Returns ``(q_out [m, n1], k_out [m, n2])``, new contiguous tensors in q's dtype that
    alias nothing (``k_out`` is None when ``k`` is None).
    """
    for name, t in (("q", q), ("k", k)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q is None:
        raise TypeError("q must be a torch.Tensor, got NoneType")
    # Checked here under the legacy names (the shared validation would speak of k_out and q_epsilon).
    if (k is None) != (k_weight is None):
        given, absent = ("k", "k_weight") if k is not None else ("k_weight", "k")
        raise ValueError(f"k and k_weight come together: got {given} without {absent}")
    check_eps("q_eps", q_eps)
    if k is not None:
        check_eps("k_eps", k_eps)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    submit(
        call_args(q=q, q_weight=q_weight, q_epsilon=q_eps, k=k, k_weight=k_weight, k_epsilon=k_eps, k_out=k_out,
                  q_out=q_out),
        _AS_UNQUANTIZED,
    )  # fmt: skip
    return q_out, k_out


# Where qk_rmsnorm's outputs are in its call (plain indexing: Dynamo traces it).
_K_OUT, _RES_OUT, _Q_OUT, _QUANT, _SCALE = (SLOT[n] for n in ("k_out", "q_res_out", "q_out", "q_out_quantized", "q_out_scale"))


class QKNormOutput(NamedTuple):
    """Result of :func:`qk_rmsnorm` (fields not produced by the call are None).

    q : the normalized q (q's dtype) without quantization; else the quantized q: FP8 codes
        ``[..., n1]`` or MXFP4 packed nibbles ``[..., n1 // 2]`` uint8 (view as
        ``torch.float4_e2m1fn_x2`` for FP4 GEMMs).
    q_scale : float32 ``[..., n1 // group_size]`` (FP8 group; a column-major ``[m, G]`` view
        with ``transpose_scale``), ``[..., 1]`` (per token), ``[1]`` (per tensor), or E8M0
        bytes ``[..., n1 // group_size]`` uint8 (MXFP4).
    k : the normalized k (k's shape and dtype).
    q_unquantized : the normalized q in q's dtype, when asked for with quantization.
    q_residual_out : ``q + q_residual`` rounded to q's dtype, when a residual was given.
    """

    q: torch.Tensor
    q_scale: torch.Tensor | None
    k: torch.Tensor | None
    q_unquantized: torch.Tensor | None
    q_residual_out: torch.Tensor | None


def quant_mode(quant: object) -> QuantMode:
    """The :class:`QuantMode` named by :func:`qk_rmsnorm`'s ``quant`` (None: no quantization)."""
    try:
        return QuantMode.NONE if quant is None else QuantMode(quant)
    except ValueError:
        raise ValueError(f"quant must be one of {[None, *(m.value for m in QuantMode)]}, got {quant!r}") from None


def _rows(name: str, t: object, lead: tuple[int, ...] | None = None) -> torch.Tensor:
    """``t [..., n]`` as a 2-D ``[m, n]`` tensor (itself when 2-D, a view when strides allow, else a copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dim = t.dim()
    if dim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if lead is not None and tuple(t.shape[:-1]) != lead:
        raise ValueError(f"{name} must have q's leading dimensions {list(lead)}, got shape {list(t.shape)}")
    return t if dim == 2 else t.reshape(-1, t.shape[-1])


def _like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new ``[m, n]`` output for input ``t`` in ``dtype`` (a valid ``t`` gives a contiguous one)."""
    return torch.empty_like(t) if t.dtype == dtype else torch.empty(t.shape, dtype=dtype, device=t.device)


def qk_rmsnorm_call(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    k: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    q_residual: torch.Tensor | None,
    q_epsilon: float,
    k_epsilon: float | None,
    gemma_norm: bool,
    mode: QuantMode,
    group_size: int | None,
    fp8_dtype: torch.dtype,
    transpose_scale: bool,
    return_unquantized: bool,
) -> tuple[Any, ...]:
    """Allocate :func:`qk_rmsnorm`'s outputs for 2-D inputs; return the call (:func:`qknorm.ops.call_args`)."""
    m, n1 = q.shape
    dtype, dev = q.dtype, q.device
    q_out = torch.empty_like(q) if (mode is QuantMode.NONE or return_unquantized) else None
    # empty_like is about 2 us cheaper than empty(shape, dtype=, device=) per call (torch 2.13, CPU).
    k_out = None if k is None else _like(k, dtype)
    res_out = None if q_residual is None else _like(q_residual, dtype)
    quant_t = scale = None
    gs = group_size
    if mode is QuantMode.MXFP4:
        gs = 32 if group_size is None else group_size
        quant_t = torch.empty((m, n1 // 2), dtype=torch.uint8, device=dev)
        groups = n1 // gs if isinstance(gs, int) and gs > 0 else 1
        scale = torch.empty((m, groups), dtype=torch.uint8, device=dev)
    elif mode is not QuantMode.NONE:
        if not isinstance(fp8_dtype, torch.dtype):
            raise TypeError(f"fp8_dtype must be a torch.dtype, got {type(fp8_dtype).__name__}")
        if fp8_dtype not in FP8_DTYPES:
            raise TypeError(f"fp8_dtype must be torch.float8_e4m3fn or torch.float8_e4m3fnuz, got {fp8_dtype}")
        quant_t = torch.empty((m, n1), dtype=fp8_dtype, device=dev)
        if mode is QuantMode.FP8_GROUP:
            gs = 128 if group_size is None else group_size
            groups = n1 // gs if isinstance(gs, int) and gs > 0 else 1
            scale = (
                torch.empty((groups, m), dtype=torch.float32, device=dev).t()
                if transpose_scale
                else torch.empty((m, groups), dtype=torch.float32, device=dev)
            )
        elif mode is QuantMode.FP8_TOKEN:
            scale = torch.empty((m, 1), dtype=torch.float32, device=dev)
        else:
            scale = torch.empty((1,), dtype=torch.float32, device=dev)
    return call_args(
        q=q, q_weight=q_weight, q_epsilon=q_epsilon, k=k, k_weight=k_weight, k_epsilon=k_epsilon, k_out=k_out,
        q_residual=q_residual, q_res_out=res_out, gemma_norm=gemma_norm, quant_mode=mode.value, group_size=gs,
        q_out=q_out, q_out_quantized=quant_t, q_out_scale=scale, transpose_scale=transpose_scale,
    )  # fmt: skip


def qk_rmsnorm(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    k: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    *,
    q_epsilon: float = 1e-6,
    k_epsilon: float | None = None,
    q_residual: torch.Tensor | None = None,
    gemma_norm: bool = False,
    quant: str | None = None,
    group_size: int | None = None,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    transpose_scale: bool = False,
    return_unquantized: bool = False,
) -> QKNormOutput:
    """Fused RMSNorm of q (and k) over the last dimension, optionally quantizing q.

    Allocates and returns its outputs; accepts any leading dimensions (per-head QK norm:
    ``[tokens, heads, head_dim]`` is normalized over ``head_dim``).

    Parameters
    ----------
    q : Tensor
        ``[..., n1]`` fp16 or bf16.
    q_weight : Tensor
        ``[n1]``, q's dtype.
    k, k_weight : Tensor, optional
        ``[..., n2]`` with q's leading dimensions, and ``[n2]``.
    q_epsilon, k_epsilon : float
        Epsilons (``k_epsilon=None`` uses ``q_epsilon``).
    q_residual : Tensor, optional
        ``[..., n1]``: normalize ``q + q_residual`` and also return the rounded sum.
    gemma_norm : bool
        Multiply by ``1 + weight``.
    quant : {None, "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"}
        Quantization of the normalized q.
    group_size : int, optional
        Columns per scale: default 128 for ``fp8_group``, 32 for ``mxfp4``.
    fp8_dtype : torch.dtype
        ``torch.float8_e4m3fn`` (FMAX 448) or ``torch.float8_e4m3fnuz`` (FMAX 240).
    transpose_scale : bool
        Column-major FP8 group scales (``q_scale`` is then an ``[m, G]`` view of a ``[G, m]`` buffer).
    return_unquantized : bool
        Also return the normalized q in q's dtype when quantizing.

    Returns
    -------
    QKNormOutput
        ``(q, q_scale, k, q_unquantized, q_residual_out)``.
    """
    mode = quant_mode(quant)
    q2 = _rows("q", q)
    lead = tuple(q.shape[:-1])
    k2 = None if k is None else _rows("k", k, lead)
    res2 = None if q_residual is None else _rows("q_residual", q_residual, lead)
    args = qk_rmsnorm_call(
        q2, q_weight, k2, k_weight, res2, q_epsilon, k_epsilon, gemma_norm, mode, group_size, fp8_dtype,
        transpose_scale, return_unquantized,
    )  # fmt: skip
    submit(args, _AS_UNQUANTIZED)
    k_out, res_out, q_out, quant_t, scale = args[_K_OUT], args[_RES_OUT], args[_Q_OUT], args[_QUANT], args[_SCALE]

    none = mode is QuantMode.NONE
    q_main = q_out if none else quant_t
    q_unquantized = None if none else q_out
    if q2 is not q:  # leading dimensions other than one: give the outputs q's shape back

        def shaped(t: torch.Tensor | None, cols: int | None = None) -> torch.Tensor | None:
            return None if t is None else t.reshape(*lead, t.shape[-1] if cols is None else cols)

        q_main, q_unquantized, res_out = shaped(q_main), shaped(q_unquantized), shaped(res_out)
        if scale is not None and mode is not QuantMode.FP8_TENSOR and not transpose_scale:
            scale = shaped(scale)
        if k_out is not None and k is not None:
            k_out = k_out.reshape(k.shape)
    return QKNormOutput(q_main, scale, k_out, q_unquantized, res_out)
