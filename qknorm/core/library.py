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

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LIBRARY", "NAMESPACE", "define_op"]

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
