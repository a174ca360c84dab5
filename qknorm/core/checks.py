"""Checks every operator's validation shares: a tensor argument, a bool, an epsilon.

They accept a :class:`~qknorm.core.signature.TensorSpec` (what planners see) or a tensor (fake
tensors in a fake kernel), and raise ``TypeError``/``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .signature import TensorSpec

__all__ = ["check_tensor", "check_bool", "check_eps"]

_FP32_MIN_NORMAL = 2.0**-126
_FP32_MAX = (2.0 - 2.0**-23) * 2.0**127


def check_tensor(name: str, t: Any) -> Any:
    """``t`` is a dense strided ``torch.Tensor`` (or the spec of one); returns it."""
    cls = t.cls if isinstance(t, TensorSpec) else type(t)
    if not issubclass(cls, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {cls.__name__}")
    if isinstance(t, torch.Tensor) and t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) torch.Tensor, got a nested tensor")
    if t.layout != torch.strided:  # sparse and jagged tensors have no usable strides
        kind = "a nested tensor" if t.layout == torch.jagged else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) torch.Tensor, got {kind}")
    return t


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_eps(name: str, eps: object) -> float:
    """A positive epsilon that is a normal float32 (it is added in fp32); returns it as a float."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name} must be a positive finite float, got {type(eps).__name__}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    if not (_FP32_MIN_NORMAL <= value <= _FP32_MAX):
        # eps is added in fp32: below the smallest normal float32 it rounds (or, in FTZ kernels,
        # flushes) to 0, and an all-zero row then gives 0 * rsqrt(0) = NaN; above it, inf.
        raise ValueError(
            f"{name} must be a normal float32 in [{_FP32_MIN_NORMAL:.6g}, {_FP32_MAX:.6g}] (it is added in fp32), "
            f"got {value!r}"
        )
    return value
