"""The signature of a call: what validation may read from a tensor, as a hashable value.

Validation is a function of each tensor's class, dtype, device, layout, shape and strides and of the
scalar arguments with their exact types, never of the data or of where the tensor is in memory
(that part, aliasing, is checked on every call by :mod:`qknorm.core.aliasing`). Planners are
handed :class:`TensorSpec` objects, which answer the tensor questions validation asks and no
others, so a plan cannot depend on anything outside the signature.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

__all__ = ["TensorSpec", "tensor_key", "spec_of"]


class TensorSpec(NamedTuple):
    """One tensor as validation sees it: ``(class, dtype, device, layout, shape, strides)``."""

    cls: type
    dtype: torch.dtype
    device: torch.device
    layout: torch.layout
    shape: torch.Size
    strides: tuple[int, ...]

    def dim(self) -> int:
        return len(self.shape)

    def stride(self, dim: int | None = None) -> Any:
        return self.strides if dim is None else self.strides[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def extent(self) -> int:
        """Bytes from the first element to one past the last one the tensor can touch (0 if empty)."""
        if self.numel() == 0:
            return 0
        last = sum((size - 1) * stride for size, stride in zip(self.shape, self.strides))
        return (last + 1) * self.dtype.itemsize


def tensor_key(t: Any) -> tuple[Any, ...]:
    """The signature entry of a tensor (raises for objects without dense strides: sparse, nested, non-tensors)."""
    return (t.__class__, t.dtype, t.device, t.layout, t.shape, t.stride())


def spec_of(key: tuple[Any, ...] | None) -> TensorSpec | None:
    return None if key is None else TensorSpec._make(key)
