"""The one validated request every call convention funnels into and every backend consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import QuantMode

__all__ = ["QKNormRequest"]


@dataclass(frozen=True, eq=False)
class QKNormRequest:
    """A fully validated fused Q/K RMSNorm call (built by :func:`qknorm.checks.build_request`).

    Every tensor is already in the canonical form backends expect, so a backend never
    re-validates and never reshapes:

    - ``q [m, n1]``, ``k [m, n2]``, ``q_residual [m, n1]``: fp16/bf16, ``stride(1) == 1``
      (or width 1), any row stride >= the width; ``q_weight [n1]``, ``k_weight [n2]``
      contiguous, q's dtype.
    - ``q_out [m, n1]`` (q's dtype): the normalized q (``q_out_unquantized``, or
      ``q_out_quantized`` in ``No`` mode). ``k_out [m, n2]``, ``q_res_out [m, n1]``.
      Outputs have their own row strides; bytes between rows are not theirs.
    - ``q_quant``: FP8 modes ``[m, n1]`` of an FP8 dtype (its dtype picks FMAX); MXFP4
      ``[m, n1 // 2]`` ``torch.uint8`` (a view of a ``float4_e2m1fn_x2`` tensor if that was given).
    - ``q_scale``: FP8 group/token ``[m, n1 // group_size]`` float32 whose strides carry the
      layout (row-major ``(s, 1)``, or column-major ``(1, s)`` for ``transpose_scale``: element
      (i, g) at ``g * s + i``); FP8 tensor ``[1]`` float32; MXFP4 ``[m, n1 // group_size]`` uint8.
    - ``group_size``: the columns sharing one scale: the group size, n1 for per-token and
      per-tensor, 0 in ``NONE`` mode.
    - ``q_out_copy``: a second ``[m, n1]`` tensor to receive ``q_out``'s values (aiter's ``No``
      mode given both ``q_out_quantized`` and ``q_out_unquantized``); the dispatcher copies it
      after the backend ran, so backends ignore it.
    - Supported aliasing (validated): ``k_out is k``, ``q_out is q``, ``q_res_out is q`` or
      ``q_res_out is q_residual`` (same pointer, shape and strides). A backend must therefore
      read every element of a row before its last pass writes any element of that row.
    """

    q: torch.Tensor
    q_weight: torch.Tensor
    q_eps: float
    k: torch.Tensor | None
    k_weight: torch.Tensor | None
    k_eps: float
    q_residual: torch.Tensor | None
    gemma: bool
    mode: QuantMode
    group_size: int
    q_out: torch.Tensor | None
    q_quant: torch.Tensor | None
    q_scale: torch.Tensor | None
    k_out: torch.Tensor | None
    q_res_out: torch.Tensor | None
    transpose_scale: bool = False
    q_out_copy: torch.Tensor | None = None

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

    def key(self) -> tuple[object, ...]:
        """What backend selection depends on: everything but m and the data (cache key)."""
        return (
            self.device.type,
            self.device.index,
            self.dtype,
            self.mode,
            self.quant_dtype,
            self.group_size,
            self.n1,
            self.n2,
            self.q_residual is not None,
            self.q_out is not None,
            self.gemma,
            self.transpose_scale,
        )

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this request writes."""
        outs = (self.q_out, self.q_quant, self.q_scale, self.k_out, self.q_res_out, self.q_out_copy)
        return tuple(t for t in outs if t is not None)
