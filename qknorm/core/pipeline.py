"""One call pipeline for every operator: signature -> plan (cached) -> aliasing -> request.

An operator's argument list is one Python function's signature (its custom op's schema is
inferred from it). :class:`Pipeline` serves calls given as that list:

1. the call's signature: each tensor's :func:`~qknorm.core.signature.tensor_key` and each
   scalar with its exact type (``True == 1`` and ``1 == 1.0`` must not share a verdict);
2. the plan for that signature: cached, or made by the operator's planner, which sees the
   tensors as :class:`~qknorm.core.signature.TensorSpec` only, and raises for a bad call;
3. the plan's aliasing check on the tensors' memory;
4. the plan binds the call's tensors into the request a backend runs.

The first call of a signature and every later call take these same steps; a miss only adds
the planner's run. Calls whose signature cannot be formed (an argument that is not a tensor
where one belongs, unhashable scalars) are planned without caching, so the planner reports
what is wrong.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from .signature import TensorSpec, tensor_key

__all__ = ["Pipeline", "Plan", "specs_or_values"]

# Plans are small (no tensors); a serving process sees a few per layer shape and row count.
# Past this many (prefill with ever-new row counts) the cache starts over.
_MAX_PLANS = 4096


class Plan(Protocol):
    """What a planner returns: an aliasing check and a binder, both reused by every call."""

    def aliasing(self, args: Sequence[Any], display: Mapping[str, str] | None = None) -> None: ...

    def bind(self, args: Sequence[Any]) -> Any: ...


Planner = Callable[[Mapping[str, Any], "Mapping[str, str] | None"], Plan]


def specs_or_values(args: Sequence[Any]) -> tuple[Any, ...]:
    """Each tensor argument as its :class:`TensorSpec`, everything else as given."""
    return tuple(TensorSpec._make(tensor_key(a)) if isinstance(a, torch.Tensor) else a for a in args)


class Pipeline:
    """Plans per call signature for one operator.

    Parameters
    ----------
    names : the operator's argument names, in order.
    tensor_names : which of them hold tensors (or None).
    planner : ``planner(fields, display)``: validates a call given as ``{name: TensorSpec or
        scalar}`` and returns its plan; ``display`` renames fields in error messages.
    """

    def __init__(self, names: Sequence[str], tensor_names: frozenset[str], planner: Planner) -> None:
        self.names = tuple(names)
        self._tensors = tuple(i for i, n in enumerate(self.names) if n in tensor_names)
        scalars = tuple(i for i, n in enumerate(self.names) if n not in tensor_names)
        self._tensor_args = operator.itemgetter(*self._tensors)
        self._scalar_args = operator.itemgetter(*scalars)
        self.planner = planner
        self._plans: dict[tuple[object, ...], Plan] = {}
        self._lock = threading.Lock()

    def signature(self, args: Sequence[Any]) -> tuple[object, ...] | None:
        """The call's signature, or None when it cannot be formed (the planner then says why)."""
        try:
            # tensor_key(t), inlined: this line is most of an eager call's validation cost.
            sig = [None if t is None else (t.__class__, t.dtype, t.device, t.layout, t.shape, t.stride())
                   for t in self._tensor_args(args)]  # fmt: skip
        except (AttributeError, TypeError, RuntimeError):  # not a tensor, storage-less
            return None
        scalars = self._scalar_args(args)
        sig.append(scalars)
        sig.append(tuple([v.__class__ for v in scalars]))
        return tuple(sig)

    def plan(self, args: Sequence[Any], display: Mapping[str, str] | None = None) -> Plan:
        """The plan of one call: cached per signature; raises what the planner raises."""
        sig = self.signature(args)
        try:
            plan = None if sig is None else self._plans.get(sig)
        except TypeError:  # an unhashable scalar
            sig = plan = None
        if plan is None:
            plan = self.planner(dict(zip(self.names, self._specs(sig, args))), display)
            if sig is not None:
                with self._lock:
                    if len(self._plans) >= _MAX_PLANS:
                        self._plans.clear()
                    self._plans[sig] = plan
        return plan

    def request(self, args: Sequence[Any], display: Mapping[str, str] | None = None) -> Any:
        """Validate one call (plan, then aliasing) and return its request."""
        plan = self.plan(args, display)
        plan.aliasing(args, display)
        return plan.bind(args)

    def _specs(self, sig: tuple[object, ...] | None, args: Sequence[Any]) -> list[Any]:
        """The planner's view of a call: tensors as specs (from the signature when there is one)."""
        if sig is None:
            return list(args)
        values = list(args)
        for i, key in zip(self._tensors, sig):
            values[i] = None if key is None else TensorSpec._make(key)  # type: ignore[arg-type]
        return values

    def clear(self) -> None:
        """Forget every plan (tests; plans hold no tensors and no backend)."""
        with self._lock:
            self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
