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

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ..backends.registry import lazy, register_operator, run_request
from ..core.library import define_op
from ..core.pipeline import Pipeline
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


_PARAMS = inspect.signature(call_args).parameters
FIELDS = tuple(_PARAMS)
MUTATED = tuple(n for n in FIELDS if n in OUTPUTS)
PIPELINE = Pipeline(FIELDS, frozenset(n for n, p in _PARAMS.items() if "Tensor" in str(p.annotation)), plan)
_DEFAULTS = tuple(p.default for p in _PARAMS.values())

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


def _complete(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The full argument tuple of a dispatched call (the dispatcher may drop trailing defaults)."""
    full = args + _DEFAULTS[len(args) :]
    if kwargs:
        full = tuple(kwargs.get(name, value) for name, value in zip(FIELDS, full))
    return full


def _impl(*args: Any, **kwargs: Any) -> None:
    full = _complete(args, kwargs)
    execute(PIPELINE.plan(full), full)  # type: ignore[arg-type]


def _fake(*args: Any, **kwargs: Any) -> None:
    plan(dict(zip(FIELDS, _complete(args, kwargs))), aliasing=False)


def _schema_of(fn: Any) -> Any:
    """A stand-in with ``fn``'s parameters and no result: the op's schema (the op returns nothing)."""

    def op(*args: Any) -> None: ...

    op.__signature__ = inspect.signature(fn).replace(return_annotation=None)  # type: ignore[attr-defined]
    return op


_op = define_op(OP, _schema_of(call_args), frozenset(MUTATED), _impl, _fake)
_dispatch_depth = torch._C._len_torch_dispatch_stack


def traced(q: object) -> bool:
    """Whether a call must go through the dispatcher: torch.compile tracing, fake or functional
    tensors, or an active ``TorchDispatchMode``; plain eager calls skip it."""
    return bool(
        torch.compiler.is_compiling()
        or _dispatch_depth()
        or (q.__class__ is not torch.Tensor and isinstance(q, torch.Tensor))
    )


def call_op(args: tuple[Any, ...]) -> None:
    """``torch.ops.qknorm.qk_norm_rope`` on the canonical argument list."""
    _op(*args)
