"""``qknorm.warmup_qk_norm_rope``: every first-use step of ``qk_norm_rope`` before CUDA-graph capture.

The first call of a shape validates it (a plan), selects a backend and compiles the Triton
kernel for each launch configuration; none of that may happen during capture (selection then
raises :class:`~qknorm.backends.registry.BackendError`). Engines call this once per layer shape
after loading weights, then capture.
"""

from __future__ import annotations

import logging

import torch

from ..backends.base import Backend
from ..backends.registry import select
from ..warmup import WarmupRecord, mark_warmed
from .api import qk_norm_rope
from .ops import PIPELINE, call_args
from .request import RopePlan

__all__ = ["warmup_qk_norm_rope"]

logger = logging.getLogger(__name__)


def warmup_qk_norm_rope(
    num_heads: int, num_kv_heads: int, head_dim: int, *, rotary_dim: int | None = None,
    dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None, max_tokens: int = 8192,
    max_position: int = 4096, table_dtype: torch.dtype = torch.float32, index_dtype: torch.dtype = torch.int64,
    is_neox: bool = True, gemma_norm: bool = False, weightless: bool = False, packed: bool = True,
    cache_dtype: torch.dtype | None = None, block_size: int = 16, scale_per_head: bool = False,
    q_fp8: torch.dtype | None = None, in_place: bool = False,
) -> WarmupRecord:  # fmt: skip
    """Validate, select and compile every launch configuration the given calls need up to ``max_tokens``.

    Parameters
    ----------
    num_heads, num_kv_heads, head_dim, rotary_dim : int
        Hq, Hk, D and R (default D; 0: no rotation).
    dtype, table_dtype, index_dtype : torch.dtype
        Of q/k/v, of the rotary table, of positions and slot_mapping.
    device : optional
        Default: the current CUDA device, else the CPU.
    max_tokens : int
        The largest T that will be captured or run.
    max_position : int
        Rows of the table used for warming. The Triton kernel computes offsets in 32 bits where
        every offset of a call fits; warm-up also compiles the 64-bit variants, which calls with a
        table or cache of 2^31 elements or more take, so the sizes of the engine's table and cache
        need not be known here.
    is_neox, gemma_norm, weightless
        As the calls will pass them (``weightless``: weights None).
    packed : bool
        q, k, v as views of one packed ``[T, (Hq + 2 Hk) D]`` buffer, as the model passes them
        (their strides are part of what is compiled); False: contiguous tensors of their own.
    cache_dtype : torch.dtype, optional
        Warm calls that write a cache of this dtype (NHD, ``block_size``); None: no cache write.
    scale_per_head : bool
        FP8 cache scales ``[Hk]`` instead of ``[1]``.
    q_fp8 : torch.dtype, optional
        Warm FP8 q output of this flavour.
    in_place : bool
        ``q_out=q`` (and ``k_out=k`` without a cache).

    Returns
    -------
    WarmupRecord
        ``(None, backend name, token counts run)``.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))  # fmt: skip
    rot = head_dim if rotary_dim is None else rotary_dim
    hq, hk, d = num_heads, num_kv_heads, head_dim
    width = (hq + 2 * hk) * d
    qkv = torch.randn((max_tokens, width), device=dev).to(dtype)
    w = None if weightless else torch.ones(d, dtype=dtype, device=dev)
    table = torch.rand((max_position, rot), device=dev).to(table_dtype) if rot else None
    nb = -(-max_tokens // block_size)
    cache = None
    if cache_dtype is not None:
        cache = [torch.zeros((nb, block_size, hk, d), device=dev).to(cache_dtype) for _ in range(2)]
    scales = torch.ones(hk if scale_per_head else 1, device=dev)

    def warm(t: int) -> Backend:
        q, k, v = (x.view(t, -1, d) for x in qkv[:t].split((hq * d, hk * d, hk * d), dim=-1))
        if not packed:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        kwargs: dict[str, object] = dict(is_neox=is_neox, gemma_norm=gemma_norm)
        if cache is not None:
            fp8 = cache_dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
            kwargs.update(v=v, k_cache=cache[0], v_cache=cache[1], slot_mapping=torch.arange(t, device=dev, dtype=index_dtype),
                          k_scale=scales if fp8 else None, v_scale=scales if fp8 else None)  # fmt: skip
        if q_fp8 is not None:
            kwargs.update(q_scale=torch.ones(1, device=dev), q_out=torch.empty((t, hq, d), dtype=q_fp8, device=dev))
        elif in_place:
            kwargs.update(q_out=q, k_out=None if cache is not None else k)
        pos = torch.zeros(t, dtype=index_dtype, device=dev) if rot else None
        out = qk_norm_rope(q, k, w, w, table, pos, **kwargs)  # type: ignore[arg-type]
        args = call_args(q, k, w, w, table, pos, **{**kwargs, "q_out": out.q, "k_out": out.k})  # type: ignore[arg-type]
        plan: RopePlan = PIPELINE.plan(args)  # type: ignore[assignment]
        logger.debug("qknorm: warmed qk_norm_rope T=%d", t)
        return select(plan.bind(args))

    # The first call selects the backend; it knows which token counts reach each compiled variant.
    backend = warm(1)
    sizes_fn = getattr(backend, "warmup_sizes", None)
    wanted = sizes_fn(max_tokens) if callable(sizes_fn) else (max_tokens,)
    sizes = sorted({1, *(min(max(int(t), 1), max_tokens) for t in wanted)})
    for t in sizes[1:]:
        warm(t)
    # The Triton backend's 64-bit-offset variants: a table or cache of 2^31 elements or more takes them.
    off64 = getattr(backend, "offsets_64_bit", None)
    if callable(off64):
        with off64():
            for t in sizes:
                warm(t)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    logger.info("qknorm: warmed qk_norm_rope on backend %s for T in %s", backend.name, sizes)
    mark_warmed()
    return WarmupRecord(None, backend.name, tuple(sizes))
