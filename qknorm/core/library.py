"""Registering an operator as a torch custom op, from its one Python argument list.

The schema is inferred from the function's signature (``torch.library.infer_schema``), so the
argument list exists once. Registered with ``torch.library`` define/impl rather than
``torch.library.custom_op``: custom_op wraps a mutating op in Python autograd and
ADInplaceOrView kernels whose argument handling is quadratic in the schema's length (torch
2.13: about 180 us per call for an 18-argument op on a 2-core CPU machine, against about 9 us
for the plain dispatcher), paid on every call of the op in a compiled graph. The ops are
inference-only: no autograd formula; inputs requiring grad get torch's autograd fallback.
``needs_fixed_stride_order`` makes Inductor pass tensors with the strides eager mode would
(the kernels read row strides).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from .pipeline import Pipeline

__all__ = ["LIBRARY", "NAMESPACE", "Operator", "define_op", "define_operator", "traced"]

NAMESPACE = "qknorm"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def define_op(
    name: str, signature: Callable[..., None], mutates: frozenset[str], impl: Callable[..., None],
    fake: Callable[..., None],
) -> Any:  # fmt: skip
    """Define ``qknorm::name`` with ``signature``'s schema; return its default overload.

    ``impl`` runs on every device (``CompositeExplicitAutograd``); ``fake`` runs on fake tensors
    (torch.compile tracing, export) and validates without writing. Both take the schema's
    arguments positionally.
    """
    schema = torch.library.infer_schema(signature, mutates_args=mutates)
    LIBRARY.define(name + schema, tags=(torch.Tag.needs_fixed_stride_order,))
    LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
    return getattr(torch.ops.qknorm, name).default


class Operator(NamedTuple):
    """An operator's call machinery, made from its argument list by :func:`define_operator`."""

    fields: tuple[str, ...]  # the argument names, in order
    mutated: tuple[str, ...]  # the arguments it writes
    pipeline: Pipeline  # eager calls: plans per signature, aliasing, binding
    op: Any  # torch.ops.qknorm.<name>.default


def _returning_nothing(fn: Callable[..., object]) -> Callable[..., None]:
    """A stand-in with ``fn``'s parameters and no result: the op's schema (ops return nothing)."""

    def op(*args: Any) -> None: ...

    op.__signature__ = inspect.signature(fn).replace(return_annotation=None)  # type: ignore[attr-defined]
    return op


def define_operator(
    name: str, call_args: Callable[..., tuple[Any, ...]], outputs: frozenset[str],
    planner: Callable[..., Any], run: Callable[[tuple[Any, ...]], object],
) -> Operator:  # fmt: skip
    """Everything an operator needs from its one argument list, ``call_args``'s signature.

    Tensor arguments are those annotated ``Tensor``; ``outputs`` names the ones written.
    ``planner(fields, display, aliasing=...)`` validates (see :class:`Pipeline`); ``run(args)``
    runs one complete argument tuple (the op's real kernel). The fake kernel plans only.
    """
    params = inspect.signature(call_args).parameters
    fields = tuple(params)
    defaults = tuple(p.default for p in params.values())
    pipeline = Pipeline(fields, frozenset(n for n, p in params.items() if "Tensor" in str(p.annotation)), planner)

    def complete(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        """The full argument tuple of a dispatched call (the dispatcher may drop trailing defaults)."""
        full = args + defaults[len(args) :]
        return tuple(kwargs.get(n, v) for n, v in zip(fields, full)) if kwargs else full

    def impl(*args: Any, **kwargs: Any) -> None:
        run(complete(args, kwargs))

    def fake(*args: Any, **kwargs: Any) -> None:
        planner(dict(zip(fields, complete(args, kwargs))), None, aliasing=False)

    mutated = tuple(n for n in fields if n in outputs)
    op = define_op(name, _returning_nothing(call_args), frozenset(mutated), impl, fake)
    return Operator(fields, mutated, pipeline, op)


_dispatch_depth = torch._C._len_torch_dispatch_stack


def traced(first: object) -> bool:
    """Whether a call must go through the dispatcher: torch.compile tracing, fake or functional
    tensors (``first`` is the call's first tensor), or an active ``TorchDispatchMode``."""
    return bool(
        torch.compiler.is_compiling()
        or _dispatch_depth()
        or (first.__class__ is not torch.Tensor and isinstance(first, torch.Tensor))
    )
