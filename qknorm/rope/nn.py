"""A module for one attention layer of a per-head QK-norm model: norm + RoPE (+ cache write).

:class:`QKNormRoPE` holds ``q_norm.weight`` and ``k_norm.weight`` under Hugging Face Qwen3's
names (``model.layers.N.self_attn.q_norm.weight``, ``...k_norm.weight``), so an attention
layer's state dict loads into it with its prefix stripped, and the rotary table (vLLM's
``cos_sin_cache`` layout) as a non-persistent buffer. One call normalizes and rotates q and k
and optionally writes k and v into a paged cache.
"""

from __future__ import annotations

import torch
from torch import nn

from ..api import qk_rmsnorm
from .api import QKNormRopeOutput, qk_norm_rope

__all__ = ["HeadRMSNorm", "QKNormRoPE", "rope_cos_sin_cache"]


def rope_cos_sin_cache(rotary_dim: int, max_position: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``[max_position, rotary_dim]`` float32: row p = ``[cos(p f_i) | sin(p f_i)]``, ``f_i = base^(-2i/R)``.

    Computed as vLLM's ``RotaryEmbedding._compute_cos_sin_cache`` does (fp32 frequencies and angles).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float, device=device), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class HeadRMSNorm(nn.Module):
    """An RMSNorm over one head (``weight [head_dim]``, ``variance_epsilon``), as HF's ``Qwen3RMSNorm``."""

    def __init__(self, head_dim: int, eps: float = 1e-6, *, gemma_norm: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        init = torch.zeros if gemma_norm else torch.ones
        self.weight = nn.Parameter(init(head_dim, dtype=dtype, device=device))
        self.variance_epsilon = eps
        self.gemma_norm = gemma_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., head_dim]`` -> normalized, same shape and dtype (no rotation)."""
        return qk_rmsnorm(x, self.weight, q_epsilon=self.variance_epsilon, gemma_norm=self.gemma_norm).q


class QKNormRoPE(nn.Module):
    """Per-head q/k RMSNorm, RoPE and the optional paged KV-cache write of one attention layer.

    Parameters
    ----------
    num_heads, num_kv_heads, head_dim : int
        Hq, Hk and D (Qwen3-8B: 32, 8, 128).
    rotary_dim : int, optional
        R, the rotated channels (default D; GLM-4.5: D / 2).
    max_position : int
        Rows of the rotary table (``max_position_embeddings``).
    rope_theta : float
        RoPE base (Qwen3: 1e6).
    eps : float
        Norm epsilon (``rms_norm_eps``).
    is_neox : bool
        neox (rotate halves, Qwen3/Llama) or GPT-J (interleaved pairs) rotation.
    gemma_norm : bool
        Multiply by ``1 + weight`` (Gemma 3, Qwen3-Next).
    weightless : bool
        No norm weights (Llama 4's L2 norm): the module then has no parameters.
    dtype, device : optional
        Of the weights (the rotary table is float32 on ``device``).
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, *, rotary_dim: int | None = None,
        max_position: int = 40960, rope_theta: float = 1e6, eps: float = 1e-6, is_neox: bool = True,
        gemma_norm: bool = False, weightless: bool = False, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        rot = head_dim if rotary_dim is None else rotary_dim
        if isinstance(rot, bool) or not isinstance(rot, int) or rot % 2 or not 0 <= rot <= head_dim:
            raise ValueError(f"rotary_dim must be an even int in [0, head_dim={head_dim}], got {rotary_dim!r}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.rotary_dim = num_heads, num_kv_heads, head_dim, rot
        self.is_neox, self.gemma_norm, self.eps = is_neox, gemma_norm, eps
        self.q_norm: HeadRMSNorm | None = None
        self.k_norm: HeadRMSNorm | None = None
        if not weightless:
            self.q_norm = HeadRMSNorm(head_dim, eps, gemma_norm=gemma_norm, dtype=dtype, device=device)
            self.k_norm = HeadRMSNorm(head_dim, eps, gemma_norm=gemma_norm, dtype=dtype, device=device)
        table = rope_cos_sin_cache(rot, max_position, rope_theta, device) if rot else None
        self.register_buffer("cos_sin_cache", table, persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, v: torch.Tensor | None = None,
        k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
        slot_mapping: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
    ) -> QKNormRopeOutput:  # fmt: skip
        """Normalize and rotate q and k of T tokens, optionally writing k and v to the cache.

        Parameters
        ----------
        q, k : Tensor
            ``[T, Hq * D]`` / ``[T, Hk * D]`` (e.g. column slices of the packed qkv projection)
            or ``[T, Hq, D]`` / ``[T, Hk, D]``, fp16/bf16 in the weights' dtype.
        positions : Tensor
            ``[T]`` int32/int64 token positions.
        v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q_scale
            As in :func:`qknorm.qk_norm_rope` (v may also be ``[T, Hk * Dv]``).

        Returns
        -------
        QKNormRopeOutput
            ``(q [T, Hq, D], k [T, Hk, D] or None with a cache write)``.
        """
        q = q if q.dim() == 3 else q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k if k.dim() == 3 else k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if v is not None and v.dim() == 2:
            v = v.unflatten(-1, (self.num_kv_heads, -1))
        table: torch.Tensor | None = self.cos_sin_cache  # type: ignore[assignment]
        return qk_norm_rope(
            q, k, None if self.q_norm is None else self.q_norm.weight, None if self.k_norm is None else self.k_norm.weight,
            table, positions if table is not None else None, q_epsilon=self.eps, is_neox=self.is_neox,
            gemma_norm=self.gemma_norm, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
            k_scale=k_scale, v_scale=v_scale, q_scale=q_scale,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"rotary_dim={self.rotary_dim}, is_neox={self.is_neox}" + (", gemma_norm=True" if self.gemma_norm else ""))  # fmt: skip
