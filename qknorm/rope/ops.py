"""``qk_norm_rope`` as one call: its argument list, its custom op, its backends, how a call runs.

The argument list is the signature of :func:`call_args` and nothing else: the custom op
``torch.ops.qknorm.qk_norm_rope`` takes its schema from it (every written tensor declared
mutated: ``q_out``, ``k_out``, ``k_cache``, ``v_cache``; nothing returned), and
:data:`PIPELINE` (:class:`qknorm.core.pipeline.Pipeline`) plans calls given in it. The public
entry (:mod:`qknorm.rope.api`) allocates missing outputs in Python, so the op never allocates.

Eager calls run straight through the pipeline (plan cached per signature, aliasing check on
every call, the index check when asked, the backend the registry selects for
``("qk_norm_rope", plan key)``), without the dispatcher. Under torch.compile, with fake or
functional tensors or a ``TorchDispatchMode`` active, calls go through the custom op: its real
kernel runs the same pipeline; its fake kernel plans only (no memory to compare), so a bad call
fails at trace time with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..backends.registry import lazy, register_operator, run_request
from ..core.library import define_operator, traced
from .checks import OUTPUTS, check_indices, plan
from .request import RopePlan

__all__ = ["OP", "OP_NAME", "FIELDS", "MUTATED", "PIPELINE", "call_args", "execute", "traced", "call_op"]

OP = "qk_norm_rope"
OP_NAME = f"qknorm::{OP}"


def call_args(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    cos_sin_cache: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    q_epsilon: float = 1e-6,
    k_epsilon: float | None = None,
    is_neox: bool = True,
    gemma_norm: bool = False,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    check_indices: bool = False,
) -> tuple[Any, ...]:
    """One call of the operator, given by keyword, as its argument tuple (the op's order).

    Arguments as :func:`qknorm.qk_norm_rope`, except that the op itself never allocates: its
    ``q_out`` is always given (the entry allocates it), and so is ``k_out`` without a cache write.
    """
    return (q, k, q_weight, k_weight, cos_sin_cache, positions, q_epsilon, k_epsilon, is_neox, gemma_norm, q_out,
            k_out, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q_scale, check_indices)  # fmt: skip


register_operator(OP, {
    "aiter": lazy(".rope.aiter_backend", "RopeAiterBackend"),
    "triton": lazy(".rope.triton_launch", "RopeTritonBackend"),
    "torch": lazy(".rope.torch_backend", "RopeTorchBackend"),
})  # fmt: skip


def execute(p: RopePlan, args: Sequence[Any]) -> str:
    """Run one planned call whose outputs exist: aliasing, the index check when asked, the backend.

    ``p`` may be the plan of the call as the entry received it (outputs it allocated were absent
    then, so the aliasing check skips them: fresh memory overlaps nothing). Returns the backend name.
    """
    p.aliasing(args)
    req = p.bind(args)
    if p.check_indices:
        check_indices(req)
    return run_request(req)


def _run(args: tuple[Any, ...]) -> None:
    execute(PIPELINE.plan(args), args)  # type: ignore[arg-type]


FIELDS, MUTATED, PIPELINE, _op = define_operator(OP, call_args, OUTPUTS, plan, _run)


def call_op(args: tuple[Any, ...]) -> None:
    """``torch.ops.qknorm.qk_norm_rope`` on the canonical argument list."""
    _op(*args)
