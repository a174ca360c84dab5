"""The fused Q/K RMSNorm as one call: its argument list, its custom op, and how a call is run.

The argument list is the signature of :func:`call_args` and nothing else: the custom op's
schema ``torch.ops.qknorm.fused_qk_rmsnorm`` is inferred from it, and every public entry
(:mod:`qknorm.api`) calls it by keyword::

    qknorm::fused_qk_rmsnorm(Tensor q, Tensor q_weight, float q_epsilon=1e-06, Tensor? k=None,
        Tensor? k_weight=None, float? k_epsilon=None, Tensor(a6!)? k_out=None,
        Tensor? q_residual=None, Tensor(a8!)? q_res_out=None, bool gemma_norm=False,
        str quant_mode="none", SymInt? group_size=None, Tensor(a12!)? q_out=None,
        Tensor(a13!)? q_out_quantized=None, Tensor(a14!)? q_out_scale=None,
        bool transpose_scale=False) -> ()

The schema holds what the kernels need, in qknorm's own terms: ``q_out`` is the normalized q in
q's dtype, ``q_out_quantized``/``q_out_scale`` the quantized q. Which of aiter's arguments
lands where (aiter's ``No`` mode writes the normalized q to ``q_out_quantized``) is resolved by
the entries.

Why one in-place op rather than a functional op plus an in-place one: every mode, optional
output and scale layout is reachable through one schema, and the functional entry
:func:`qknorm.qk_rmsnorm` allocates in Python, which Dynamo traces as ``empty``/
``empty_strided``; AOTAutograd wraps the mutation in ``auto_functionalized`` and Inductor writes
into the allocated buffers in place, so the compiled graph holds the allocations and one opaque
op, with no copies. Every written tensor is declared mutated and nothing is returned.

:func:`submit` runs a call: in eager mode straight through the pipeline (plan cached per
signature, aliasing check, backend), without the dispatcher; under torch.compile, with fake or
functional tensors, or a ``TorchDispatchMode`` active, through the custom op so a graph holds
one opaque node. The op's real kernel runs the same pipeline; its fake kernel plans only (no
memory to compare), so a bad call fails at trace time with the same message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .backends.registry import run_request
from .checks import OUTPUTS, plan
from .core.library import define_operator, traced

__all__ = ["OP_NAME", "FIELDS", "SLOT", "MUTATED", "call_args", "submit", "PIPELINE"]

OP_NAME = "qknorm::fused_qk_rmsnorm"


def call_args(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    q_epsilon: float = 1e-6,
    k: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_epsilon: float | None = None,
    k_out: torch.Tensor | None = None,
    q_residual: torch.Tensor | None = None,
    q_res_out: torch.Tensor | None = None,
    gemma_norm: bool = False,
    quant_mode: str = "none",
    group_size: int | None = None,
    q_out: torch.Tensor | None = None,
    q_out_quantized: torch.Tensor | None = None,
    q_out_scale: torch.Tensor | None = None,
    transpose_scale: bool = False,
) -> tuple[Any, ...]:
    """One call of the operator, given by keyword, as its argument tuple (the op's order).

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
        A :class:`~qknorm.quant.QuantMode` value: ``"none"``, ``"fp8_group"``, ``"fp8_token"``,
        ``"fp8_tensor"`` or ``"mxfp4"``.
    group_size : int, optional
        Columns per scale (FP8 group, MXFP4).
    q_out : Tensor, optional
        ``[m, n1]`` q's dtype: the normalized q (required without quantization).
    q_out_quantized, q_out_scale : Tensor, optional
        Quantized q and its scales (layouts as in :func:`qknorm.fused_qk_rmsnorm`).
    transpose_scale : bool
        Column-major FP8 group scales.
    """
    return (q, q_weight, q_epsilon, k, k_weight, k_epsilon, k_out, q_residual, q_res_out, gemma_norm, quant_mode,
            group_size, q_out, q_out_quantized, q_out_scale, transpose_scale)  # fmt: skip


def _run(args: tuple[Any, ...]) -> None:
    run_request(PIPELINE.request(args))


FIELDS, MUTATED, PIPELINE, _op = define_operator(OP_NAME.split("::")[1], call_args, OUTPUTS, plan, _run)
SLOT = {name: i for i, name in enumerate(FIELDS)}  # field name -> position in a call's tuple


def submit(args: tuple[Any, ...], display: Mapping[str, str] | None = None) -> None:
    """Run one call given as :func:`call_args`'s tuple: the custom op when tracing, else directly.

    ``display`` names fields as the caller knows them in error messages (eager validation; the
    fake kernel that validates while tracing speaks of the op's own fields).
    """
    if traced(args[0]):
        _op(*args)
        return
    run_request(PIPELINE.request(args, display))
