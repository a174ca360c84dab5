"""The torch custom op ``torch.ops.qknorm.fused_qk_rmsnorm``: what torch.compile and export see.

Schema
------
One in-place op whose arguments are :func:`qknorm.checks.build_request`'s, in order::

    qknorm::fused_qk_rmsnorm(Tensor q, Tensor q_weight, float q_epsilon, Tensor? k,
        Tensor? k_weight, float? k_epsilon, Tensor(a!)? k_out, Tensor? q_residual,
        Tensor(b!)? q_res_out, bool gemma_norm, str quant_mode, int? group_size, Tensor(c!)? q_out,
        str q_out_name, Tensor(d!)? q_out_copy, Tensor(e!)? q_out_quantized,
        Tensor(f!)? q_out_scale, bool transpose_scale) -> ()

Why one in-place op rather than a functional op plus an in-place one:

- Every public entry already ends in this argument list, so every mode, every optional output
  and both scale layouts are reachable through one schema, and the op validates exactly as the
  eager path does (``quant_mode`` is a :class:`~qknorm.quant.QuantMode` value; ``q_out_name`` is the
  caller's name for ``q_out``, used in error messages).
- A functional op would have to re-create in its fake kernel every output layout the entries
  allocate (column-major scales, packed FP4, ``[1]`` per-tensor scales) and keep the two in
  step. Instead the functional entry :func:`qknorm.qk_rmsnorm` allocates in Python, which
  Dynamo traces as ``empty``/``empty_strided``, and calls this op: AOTAutograd wraps the
  mutation in ``auto_functionalized`` and Inductor writes into the allocated buffers in place,
  so the compiled graph holds the allocations and one opaque op, with no copies.
- Every written tensor is declared mutated; nothing is returned, so no output aliases an input.

The in-place forms qknorm supports (``k_out`` is ``k``, ``q_out`` is ``q``, ...) work in
eager mode. Under torch.compile, functionalization hands the op a fresh buffer for a
mutated argument that is also read, and copies it back: same values, one copy more.

Registration uses ``torch.library`` define/impl (see the note at ``_lib`` for why not
``custom_op``); the real kernel is registered for ``CompositeExplicitAutograd`` (every device).

Kernels: the real kernel validates (through :mod:`qknorm.fastpath`) and selects a backend
(:func:`qknorm.backends.registry.run_request`); the fake kernel only validates, on fake
tensors (the overlap check needs real memory and is skipped there), so a bad call fails at
trace time with the same message. Backend selection therefore never happens while Dynamo
traces or in a fake kernel.

Eager calls of the public API do not come here: :func:`submit` calls the Python
implementation directly unless torch.compile is tracing or the tensors need the dispatcher
(fake or functional tensors, an active ``TorchDispatchMode``).
"""

from __future__ import annotations

from typing import Any

import torch

from .backends.registry import run_request
from .checks import build_request
from .fastpath import build, execute
from .quant import QuantMode

__all__ = ["OP_NAME", "SCHEMA", "MUTATED", "fused_qk_rmsnorm_impl", "submit"]

OP_NAME = "qknorm::fused_qk_rmsnorm"
MUTATED = ("k_out", "q_res_out", "q_out", "q_out_copy", "q_out_quantized", "q_out_scale")
SCHEMA = (
    "(Tensor q, Tensor q_weight, float q_epsilon, Tensor? k, Tensor? k_weight, float? k_epsilon, "
    "Tensor(a!)? k_out, Tensor? q_residual, Tensor(b!)? q_res_out, bool gemma_norm, str quant_mode, "
    "int? group_size, Tensor(c!)? q_out, str q_out_name, Tensor(d!)? q_out_copy, "
    "Tensor(e!)? q_out_quantized, Tensor(f!)? q_out_scale, bool transpose_scale) -> ()"
)
_MODES = {m.value: m for m in QuantMode}


def fused_qk_rmsnorm_impl(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    q_epsilon: float,
    k: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_epsilon: float | None,
    k_out: torch.Tensor | None,
    q_residual: torch.Tensor | None,
    q_res_out: torch.Tensor | None,
    gemma_norm: bool,
    quant_mode: str,
    group_size: int | None,
    q_out: torch.Tensor | None,
    q_out_name: str,
    q_out_copy: torch.Tensor | None,
    q_out_quantized: torch.Tensor | None,
    q_out_scale: torch.Tensor | None,
    transpose_scale: bool,
) -> None:
    """Fused Q/K RMSNorm writing into the given outputs (arguments as in :func:`qknorm.checks.build_request`).

    Parameters
    ----------
    q : Tensor
        ``[m, n1]`` fp16/bf16, unit column stride, any row stride >= n1.
    q_weight : Tensor
        ``[n1]``, q's dtype.
    q_epsilon : float
        Epsilon of q's norm.
    k, k_weight, k_out : Tensor, optional
        ``[m, n2]``, ``[n2]``, ``[m, n2]`` in q's dtype; all three or none.
    k_epsilon : float, optional
        Epsilon of k's norm (None: ``q_epsilon``).
    q_residual, q_res_out : Tensor, optional
        ``[m, n1]``: normalize ``q + q_residual`` and write the rounded sum to ``q_res_out``.
    gemma_norm : bool
        Multiply by ``1 + weight``.
    quant_mode : str
        ``"none"``, ``"fp8_group"``, ``"fp8_token"``, ``"fp8_tensor"`` or ``"mxfp4"``.
    group_size : int, optional
        Columns per scale (FP8 group, MXFP4).
    q_out : Tensor, optional
        ``[m, n1]`` q's dtype: the normalized q (required without quantization).
    q_out_name : str
        The caller's name for ``q_out`` in error messages.
    q_out_copy : Tensor, optional
        ``[m, n1]``: a second copy of ``q_out`` (aiter's ``No`` mode with both outputs).
    q_out_quantized, q_out_scale : Tensor, optional
        Quantized q and its scales (layouts as in :func:`qknorm.fused_qk_rmsnorm`).
    transpose_scale : bool
        Column-major FP8 group scales.
    """
    execute(
        q, q_weight, q_epsilon, k, k_weight, k_epsilon, k_out, q_residual, q_res_out, gemma_norm, quant_mode,
        group_size, q_out, q_out_name, q_out_copy, q_out_quantized, q_out_scale, transpose_scale,
    )  # fmt: skip


def _fused_qk_rmsnorm_fake(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    q_epsilon: float,
    k: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_epsilon: float | None,
    k_out: torch.Tensor | None,
    q_residual: torch.Tensor | None,
    q_res_out: torch.Tensor | None,
    gemma_norm: bool,
    quant_mode: str,
    group_size: int | None,
    q_out: torch.Tensor | None,
    q_out_name: str,
    q_out_copy: torch.Tensor | None,
    q_out_quantized: torch.Tensor | None,
    q_out_scale: torch.Tensor | None,
    transpose_scale: bool,
) -> None:
    """Validation only: outputs already exist, so there is nothing to allocate."""
    if quant_mode not in _MODES:
        raise ValueError(f"quant_mode must be one of {list(_MODES)}, got {quant_mode!r}")
    build_request(
        q=q, q_weight=q_weight, q_epsilon=q_epsilon, k=k, k_weight=k_weight, k_epsilon=k_epsilon, k_out=k_out,
        q_residual=q_residual, q_res_out=q_res_out, gemma_norm=gemma_norm, mode=_MODES[quant_mode],
        group_size=group_size, q_out=q_out, q_out_name=q_out_name, q_out_copy=q_out_copy,
        q_out_quantized=q_out_quantized, q_out_scale=q_out_scale, transpose_scale=transpose_scale,
    )  # fmt: skip


# Registered with define/impl rather than torch.library.custom_op: custom_op wraps a mutating
# op in Python autograd and ADInplaceOrView kernels whose argument handling is quadratic in the
# schema's length (torch 2.13: about 180 us per call for these 18 arguments on a 2-core CPU
# machine, against about 9 us for the plain dispatcher), paid on every call of the op in a
# compiled graph. The op is inference-only: no autograd formula, and inputs requiring grad get
# torch's autograd fallback. needs_fixed_stride_order makes Inductor pass tensors with the
# strides eager mode would (the op reads row strides).
_lib = torch.library.Library("qknorm", "DEF")
_lib.define(OP_NAME.split("::")[1] + SCHEMA, tags=(torch.Tag.needs_fixed_stride_order,))
_lib.impl(OP_NAME.split("::")[1], fused_qk_rmsnorm_impl, "CompositeExplicitAutograd")
torch.library.register_fake(OP_NAME, _fused_qk_rmsnorm_fake, lib=_lib)

_op = torch.ops.qknorm.fused_qk_rmsnorm.default
_dispatch_depth = torch._C._len_torch_dispatch_stack


def submit(
    q: Any, q_weight: Any, q_epsilon: Any, k: Any, k_weight: Any, k_epsilon: Any, k_out: Any, q_residual: Any,
    q_res_out: Any, gemma_norm: Any, quant_mode: str, group_size: Any, q_out: Any, q_out_name: str, q_out_copy: Any,
    q_out_quantized: Any, q_out_scale: Any, transpose_scale: Any,
) -> None:  # fmt: skip
    """Run one call given as the op's argument list: the custom op when tracing, else directly.

    Under torch.compile (or with fake/functional tensors, or a ``TorchDispatchMode`` active)
    the call goes through ``torch.ops.qknorm.fused_qk_rmsnorm`` so the graph holds one opaque
    op; in plain eager mode :func:`qknorm.fastpath.execute` runs it without the dispatcher.
    """
    if (
        torch.compiler.is_compiling()
        or _dispatch_depth()
        or (q.__class__ is not torch.Tensor and isinstance(q, torch.Tensor))
    ):
        _op(
            q, q_weight, q_epsilon, k, k_weight, k_epsilon, k_out, q_residual, q_res_out, gemma_norm, quant_mode,
            group_size, q_out, q_out_name, q_out_copy, q_out_quantized, q_out_scale, transpose_scale,
        )  # fmt: skip
        return
    run_request(
        build(
            q, q_weight, q_epsilon, k, k_weight, k_epsilon, k_out, q_residual, q_res_out, gemma_norm, quant_mode,
            group_size, q_out, q_out_name, q_out_copy, q_out_quantized, q_out_scale, transpose_scale,
        )
    )  # fmt: skip
