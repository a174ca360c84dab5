"""The custom op ``torch.ops.qknorm.qk_norm_rope``: what torch.compile and export see.

One in-place op over the canonical argument list (:data:`qknorm.rope.pipeline.ARG_NAMES`)
with every written tensor declared mutated (``q_out``, ``k_out``, ``k_cache``, ``v_cache``)
and nothing returned. The public entry allocates missing outputs in Python (traced as
``empty``), so the op never allocates. The real kernel plans, checks aliasing (and indices
when asked) and runs the selected backend; the fake kernel validates from metadata alone
(:func:`qknorm.rope.checks.plan_call`), so a bad call fails at trace time with the same
message. Registered with ``torch.library`` define/impl as the first operator's op (the
``custom_op`` wrapper costs far more per call for a schema this long).
"""

from __future__ import annotations

from typing import Any

import torch

from .checks import plan_call
from .pipeline import ARG_NAMES, execute, native_fp8, plan_for

__all__ = ["OP_NAME", "SCHEMA", "MUTATED", "traced", "call_op"]

OP_NAME = "qknorm::qk_norm_rope"
MUTATED = ("q_out", "k_out", "k_cache", "v_cache")
SCHEMA = (
    "(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor? cos_sin_cache, Tensor? positions, "
    "float q_epsilon, float? k_epsilon, bool is_neox, bool gemma_norm, Tensor(a!) q_out, Tensor(b!)? k_out, "
    "Tensor? v, Tensor(c!)? k_cache, Tensor(d!)? v_cache, Tensor? slot_mapping, Tensor? k_scale, "
    "Tensor? v_scale, Tensor? q_scale, bool check_indices) -> ()"
)


def _impl(*args: Any) -> None:
    """The real kernel: plan (cached per signature), aliasing, indices, backend."""
    execute(plan_for(args), args)


def _fake(*args: Any) -> None:
    """Validation only, from metadata: outputs already exist, so there is nothing to allocate."""
    a = dict(zip(ARG_NAMES, args))
    q, k, qw, kw, table, pos = (a.pop(n) for n in ARG_NAMES[:6])
    plan_call(q, k, qw, kw, table, pos, fp8_native=native_fp8, **a)


def _positional(fn: Any) -> Any:
    """torch.library passes the schema's arguments by name or position; accept both."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        if kwargs:
            args = (*args, *(kwargs[n] for n in ARG_NAMES[len(args) :]))
        return fn(*args)

    wrapper.__name__ = fn.__name__
    return wrapper


_lib = torch.library.Library("qknorm", "FRAGMENT")
_lib.define(OP_NAME.split("::")[1] + SCHEMA, tags=(torch.Tag.needs_fixed_stride_order,))
_lib.impl(OP_NAME.split("::")[1], _positional(_impl), "CompositeExplicitAutograd")
torch.library.register_fake(OP_NAME, _positional(_fake), lib=_lib)

_op = torch.ops.qknorm.qk_norm_rope.default
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
