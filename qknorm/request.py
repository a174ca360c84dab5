"""The request every call of the fused Q/K RMSNorm funnels into, and the plan it is built from.

A call is the keyword argument list of :func:`qknorm.ops.fused_qk_rmsnorm_op` (also the custom
op's schema). Validation (:func:`qknorm.checks.plan`) turns a call's signature into a
:class:`QKNormPlan`: every scalar decision, the views taken of the quantization outputs and the
aliasing check. :meth:`QKNormPlan.bind` then makes the :class:`QKNormRequest` a backend runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .core.aliasing import AliasCheck
from .quant import QuantMode

__all__ = ["QKNormPlan", "QKNormRequest", "ScaleView"]


@dataclass(frozen=True)
class ScaleView:
    """How the scale tensor as given becomes the one backends see (same memory, same data pointer).

    ``dtype``: reinterpret (E8M0 bytes as uint8); ``shape``/``strides``: re-stride (one-element
    per-tensor scales as ``[1]``, a contiguous ``[m, G]`` transposed scale read as ``[G, m]``).
    """

    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None
    strides: tuple[int, ...] | None = None

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None:
            t = t.view(self.dtype)
        if self.shape is not None:
            t = t.as_strided(self.shape, self.strides, t.storage_offset())  # type: ignore[arg-type]
        return t


@dataclass(frozen=True, eq=False)
class QKNormPlan:
    """Everything one call signature decides: made once by validation, reused by every call.

    ``key`` is what backend selection depends on (everything but the data and the row count m).
    """

    q_eps: float
    k_eps: float
    gemma: bool
    mode: QuantMode
    group_size: int  # columns per scale: the group size, n1 for per-token/per-tensor, 0 without quantization
    transpose_scale: bool
    quant_as_bytes: bool  # MXFP4 given as float4_e2m1fn_x2: backends see uint8
    scale_view: ScaleView | None
    aliasing: AliasCheck
    key: tuple[object, ...]
    slot: dict[str, int] = field(repr=False)  # field name -> index in the call's argument list

    def bind(self, args: Sequence[Any]) -> QKNormRequest:
        """The request for one call's arguments (in the op's argument order)."""
        s = self.slot
        quant, scale = args[s["q_out_quantized"]], args[s["q_out_scale"]]
        if self.quant_as_bytes:
            quant = quant.view(torch.uint8)
        if self.scale_view is not None:
            scale = self.scale_view.apply(scale)
        return QKNormRequest(
            self, args[s["q"]], args[s["q_weight"]], args[s["k"]], args[s["k_weight"]], args[s["q_residual"]],
            args[s["q_out"]], quant, scale, args[s["k_out"]], args[s["q_res_out"]],
        )  # fmt: skip


class QKNormRequest:
    """A fully validated fused Q/K RMSNorm call: the plan's decisions plus this call's tensors.

    Every tensor is in the canonical form backends expect, so a backend never re-validates and
    never reshapes:

    - ``q [m, n1]``, ``k [m, n2]``, ``q_residual [m, n1]``: fp16/bf16, ``stride(1) == 1``
      (or width 1), any row stride >= the width; ``q_weight [n1]``, ``k_weight [n2]``
      contiguous, q's dtype.
    - ``q_out [m, n1]`` (q's dtype): the normalized q, or None. ``k_out [m, n2]``,
      ``q_res_out [m, n1]``. Outputs have their own row strides; bytes between rows are not theirs.
    - ``q_quant``: FP8 modes ``[m, n1]`` of an FP8 dtype (its dtype picks FMAX); MXFP4
      ``[m, n1 // 2]`` ``torch.uint8``.
    - ``q_scale``: FP8 group/token ``[m, n1 // group_size]`` float32 whose strides carry the
      layout (row-major ``(s, 1)``, or column-major ``(1, s)`` for ``transpose_scale``: element
      (i, g) at ``g * s + i``); FP8 tensor ``[1]`` float32; MXFP4 ``[m, n1 // group_size]`` uint8.
    - Supported aliasing (validated): ``k_out is k``, ``q_out is q``, ``q_res_out is q`` or
      ``q_res_out is q_residual`` (same pointer, shape and strides). A backend must therefore
      read every element of a row before its last pass writes any element of that row.
    """

    op = "fused_qk_rmsnorm"  # the operator (the registry selects among its backends)

    __slots__ = ("k", "k_out", "k_weight", "plan", "q", "q_out", "q_quant", "q_res_out", "q_residual", "q_scale",
                 "q_weight")  # fmt: skip

    def __init__(
        self,
        plan: QKNormPlan,
        q: torch.Tensor,
        q_weight: torch.Tensor,
        k: torch.Tensor | None,
        k_weight: torch.Tensor | None,
        q_residual: torch.Tensor | None,
        q_out: torch.Tensor | None,
        q_quant: torch.Tensor | None,
        q_scale: torch.Tensor | None,
        k_out: torch.Tensor | None,
        q_res_out: torch.Tensor | None,
    ) -> None:
        self.plan = plan
        self.q, self.q_weight, self.k, self.k_weight, self.q_residual = q, q_weight, k, k_weight, q_residual
        self.q_out, self.q_quant, self.q_scale, self.k_out, self.q_res_out = q_out, q_quant, q_scale, k_out, q_res_out

    # The plan's decisions, under the names backends use.
    @property
    def q_eps(self) -> float:
        return self.plan.q_eps

    @property
    def k_eps(self) -> float:
        return self.plan.k_eps

    @property
    def gemma(self) -> bool:
        return self.plan.gemma

    @property
    def mode(self) -> QuantMode:
        return self.plan.mode

    @property
    def group_size(self) -> int:
        return self.plan.group_size

    @property
    def transpose_scale(self) -> bool:
        return self.plan.transpose_scale

    def key(self) -> tuple[object, ...]:
        """What backend selection depends on: everything but m and the data (cache key)."""
        return self.plan.key

    @property
    def m(self) -> int:
        return self.q.shape[0]

    @property
    def n1(self) -> int:
        return self.q.shape[1]

    @property
    def n2(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def has_k(self) -> bool:
        return self.k is not None

    @property
    def quant_dtype(self) -> torch.dtype | None:
        """FP8 output dtype (decides FMAX), uint8 for MXFP4, None without quantization."""
        return None if self.q_quant is None else self.q_quant.dtype

    def describe(self) -> str:
        """The request's kind in words (for selection logs and errors)."""
        k = f", k [*, {self.n2}]" if self.has_k else ""
        extras = [s for s, on in (("residual", self.q_residual is not None), ("gemma", self.gemma)) if on]
        mode = self.mode
        quant = mode.value if self.quant_dtype is None else f"{mode.value} ({self.quant_dtype})"
        if mode in (QuantMode.FP8_GROUP, QuantMode.MXFP4):
            quant += f" group {self.group_size}" + (" transposed scales" if self.transpose_scale else "")
        more = f" with {' and '.join(extras)}" if extras else ""
        return f"q [*, {self.n1}]{k} {self.dtype} on {self.device}{more}, quant {quant}"

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this request writes."""
        outs = (self.q_out, self.q_quant, self.q_scale, self.k_out, self.q_res_out)
        return tuple(t for t in outs if t is not None)
