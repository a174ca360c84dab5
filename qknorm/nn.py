"""Modules: the MLA pre-attention norms of DeepSeek-V2/V3/R1 and Kimi-K2 in one fused call.

In those models ``latent = fused_qkv_a_proj(hidden)`` is ``[T, q_lora_rank + kv_lora_rank +
qk_rope_head_dim]`` (``[T, 2112]`` for DeepSeek-V3); its q part is normalized by
``q_a_layernorm`` and feeds ``q_b_proj``, its k part by ``kv_a_layernorm`` and feeds
``kv_b_proj``, and the rope part goes on untouched. :class:`MLAQKNorm` holds both norm
weights under those names, so checkpoints load unchanged, and runs both norms (and
optionally the quantization of q for an FP8 or MXFP4 ``q_b_proj``) in one launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .api import qk_rmsnorm
from .rope.nn import QKNormRoPE

__all__ = ["RMSNorm", "MLAQKNorm", "MLAQKNormOutput", "QKNormRoPE"]

_Q_QUANTS = (None, "fp8_group", "fp8_token", "fp8_tensor", "mxfp4")


class RMSNorm(nn.Module):
    """An RMSNorm over the last dimension with a ``weight`` parameter (as DeepSeek's ``*_layernorm``).

    Parameters
    ----------
    hidden_size : int
        Width n of the normalized dimension.
    eps : float
        Added to the mean square (``variance_epsilon`` in DeepSeek's modules).
    gemma_norm : bool
        Multiply by ``1 + weight`` (then ``weight`` starts at zeros, else at ones).
    dtype, device : optional
        Of ``weight``; it must match the input's dtype when called.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        *,
        gemma_norm: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        init = torch.zeros if gemma_norm else torch.ones
        self.weight = nn.Parameter(init(hidden_size, dtype=dtype, device=device))
        self.eps = eps
        self.gemma_norm = gemma_norm

    @property
    def variance_epsilon(self) -> float:
        """DeepSeek's name for :attr:`eps`."""
        return self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., n]`` fp16/bf16 (weight's dtype) -> normalized ``[..., n]``, same dtype."""
        return qk_rmsnorm(x, self.weight, q_epsilon=self.eps, gemma_norm=self.gemma_norm).q

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", gemma_norm=True" if self.gemma_norm else "")


class MLAQKNormOutput(NamedTuple):
    """What :class:`MLAQKNorm` returns: exactly the inputs of the next projections.

    q : ``[..., q_lora_rank]`` normalized q in the input dtype (no quantization); FP8 codes
        ``[..., q_lora_rank]``; or MXFP4 packed nibbles ``[..., q_lora_rank // 2]`` uint8.
    q_scale : None without quantization; float32 ``[..., q_lora_rank // group_size]`` (FP8
        group), ``[..., 1]`` (FP8 per token), ``[1]`` (FP8 per tensor); E8M0 bytes
        ``[..., q_lora_rank // group_size]`` uint8 (MXFP4).
    k_nope : ``[..., kv_lora_rank]`` normalized, input dtype (the input of ``kv_b_proj``).
    k_rope : ``[..., qk_rope_head_dim]`` the untouched rope columns, a view of the input
        (None when the k input held only the ``kv_lora_rank`` columns).
    """

    q: torch.Tensor
    q_scale: torch.Tensor | None
    k_nope: torch.Tensor
    k_rope: torch.Tensor | None


class MLAQKNorm(nn.Module):
    """Both MLA pre-attention RMSNorms (``q_a_layernorm``, ``kv_a_layernorm``) in one fused call.

    Parameters
    ----------
    q_lora_rank, kv_lora_rank, qk_rope_head_dim : int
        Widths of the latent's q, k and rope parts (DeepSeek-V3: 1536, 512, 64).
    q_eps, kv_eps : float
        Epsilons of the two norms (``rms_norm_eps`` of the model config).
    gemma_norm : bool
        Multiply by ``1 + weight``.
    quant : {None, "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"}
        Quantize the normalized q for the next GEMM: ``"fp8_group"`` is DeepSeek-V3's FP8
        1 x 128 activation format; ``"mxfp4"`` is E2M1 with E8M0 scales per 32 columns.
    group_size : int, optional
        Columns per scale (default 128 for ``fp8_group``, 32 for ``mxfp4``).
    fp8_dtype : torch.dtype
        ``torch.float8_e4m3fn`` (FMAX 448) or ``torch.float8_e4m3fnuz`` (FMAX 240).
    dtype, device : optional
        Of the weights; they must match the input's dtype (bf16 or fp16) when called.

    Notes
    -----
    Parameters are ``q_a_layernorm.weight [q_lora_rank]`` and ``kv_a_layernorm.weight
    [kv_lora_rank]``: a DeepSeek/Kimi attention layer's state dict (with its prefix stripped)
    loads with ``load_state_dict(..., strict=False)``, or use :meth:`from_norms` to share the
    norm modules of an existing model.

    Examples
    --------
    >>> norm = MLAQKNorm(quant="fp8_group", dtype=torch.bfloat16)
    >>> latent = torch.randn(4, 2112, dtype=torch.bfloat16)
    >>> q, q_scale, k_nope, k_rope = norm(latent)
    >>> q.dtype, tuple(q_scale.shape), tuple(k_nope.shape), k_rope.data_ptr() == latent[:, 2048:].data_ptr()
    (torch.float8_e4m3fn, (4, 12), (4, 512), True)
    """

    def __init__(
        self,
        q_lora_rank: int = 1536,
        kv_lora_rank: int = 512,
        qk_rope_head_dim: int = 64,
        *,
        q_eps: float = 1e-6,
        kv_eps: float = 1e-6,
        gemma_norm: bool = False,
        quant: str | None = None,
        group_size: int | None = None,
        fp8_dtype: torch.dtype = torch.float8_e4m3fn,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if quant not in _Q_QUANTS:
            raise ValueError(f"quant must be one of {list(_Q_QUANTS)}, got {quant!r}")
        for name, value in (("q_lora_rank", q_lora_rank), ("kv_lora_rank", kv_lora_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(qk_rope_head_dim, bool) or not isinstance(qk_rope_head_dim, int) or qk_rope_head_dim < 0:
            raise ValueError(f"qk_rope_head_dim must be a non-negative int, got {qk_rope_head_dim!r}")
        self.q_a_layernorm = RMSNorm(q_lora_rank, q_eps, gemma_norm=gemma_norm, dtype=dtype, device=device)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, kv_eps, gemma_norm=gemma_norm, dtype=dtype, device=device)
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.gemma_norm = gemma_norm
        self.quant = quant
        self.group_size = group_size
        self.fp8_dtype = fp8_dtype

    @classmethod
    def from_norms(
        cls,
        q_a_layernorm: nn.Module,
        kv_a_layernorm: nn.Module,
        qk_rope_head_dim: int = 64,
        **kwargs: object,
    ) -> MLAQKNorm:
        """Build one that shares the weights of a model's existing norm modules.

        Parameters
        ----------
        q_a_layernorm, kv_a_layernorm : nn.Module
            Modules with a 1-D ``weight`` and an epsilon as ``variance_epsilon`` (DeepSeek,
            Kimi), ``eps`` or ``epsilon``.
        qk_rope_head_dim : int
            Width of the rope part of the latent.
        **kwargs
            Other arguments of :class:`MLAQKNorm` (``quant``, ``group_size``, ...).
        """
        q_w, kv_w = q_a_layernorm.weight, kv_a_layernorm.weight
        if not isinstance(q_w, torch.Tensor) or not isinstance(kv_w, torch.Tensor):
            raise TypeError("q_a_layernorm and kv_a_layernorm must each have a tensor weight")
        new = cls(
            q_w.shape[0], kv_w.shape[0], qk_rope_head_dim,
            q_eps=_eps_of("q_a_layernorm", q_a_layernorm), kv_eps=_eps_of("kv_a_layernorm", kv_a_layernorm),
            dtype=q_w.dtype, device=q_w.device, **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
        new.q_a_layernorm.weight = q_w  # type: ignore[assignment]
        new.kv_a_layernorm.weight = kv_w  # type: ignore[assignment]
        return new

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> MLAQKNormOutput:
        """Normalize q and k of one MLA layer (and quantize q when configured).

        Parameters
        ----------
        x : Tensor
            Either the latent ``[..., q_lora_rank + kv_lora_rank + qk_rope_head_dim]`` (when
            ``kv`` is None) or q ``[..., q_lora_rank]``; fp16/bf16 in the weights' dtype, unit
            stride in the last dimension (column slices of a wider buffer are fine).
        kv : Tensor, optional
            ``[..., kv_lora_rank + qk_rope_head_dim]`` (the ``kv_a_proj_with_mqa`` output)
            or ``[..., kv_lora_rank]``, with x's leading dimensions.

        Returns
        -------
        MLAQKNormOutput
            ``(q, q_scale, k_nope, k_rope)``; ``k_rope`` is a view of the input.
        """
        ql, kl, rope = self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim
        if kv is None:
            if x.shape[-1] != ql + kl + rope:
                raise ValueError(
                    f"x must be the latent [..., {ql + kl + rope}] (q_lora_rank {ql} + kv_lora_rank {kl} + "
                    f"qk_rope_head_dim {rope}) when kv is None, got shape {list(x.shape)}"
                )
            q, k, k_rope = x.split_with_sizes((ql, kl, rope), dim=-1)
        else:
            if x.shape[-1] != ql:
                raise ValueError(f"x must be q [..., {ql}] when kv is given, got shape {list(x.shape)}")
            q = x
            if kv.shape[-1] == kl + rope:
                k, k_rope = kv.split_with_sizes((kl, rope), dim=-1)
            elif kv.shape[-1] == kl:
                k, k_rope = kv, None
            else:
                raise ValueError(f"kv must be [..., {kl + rope}] or [..., {kl}], got shape {list(kv.shape)}")
        q_norm, kv_norm = self.q_a_layernorm, self.kv_a_layernorm
        out = qk_rmsnorm(
            q, q_norm.weight, k, kv_norm.weight, q_epsilon=q_norm.eps, k_epsilon=kv_norm.eps,
            gemma_norm=self.gemma_norm, quant=self.quant, group_size=self.group_size, fp8_dtype=self.fp8_dtype,
        )  # fmt: skip
        return MLAQKNormOutput(q=out.q, q_scale=out.q_scale, k_nope=out.k, k_rope=k_rope)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        ranks = f"q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
        ranks += f"qk_rope_head_dim={self.qk_rope_head_dim}"
        return ranks + (f", quant={self.quant!r}" if self.quant else "")


def _eps_of(name: str, module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    raise TypeError(f"{name} must have a float variance_epsilon, eps or epsilon, got {type(module).__name__}")
