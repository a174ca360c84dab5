"""``qknorm.warmup``: do every first-use step before CUDA-graph capture, for either operator.

The first call of a request shape probes backends (importing Triton or aiter), selects one
and caches the choice; the first call of each launch configuration compiles a kernel. None
of that may happen while a CUDA graph is being captured: selection then raises
:class:`~qknorm.backends.registry.BackendError` rather than corrupt the capture. Engines call
:func:`warmup` once per layer shape after loading weights, then capture.

``warmup(...)`` and ``warmup("fused_qk_rmsnorm", ...)`` warm the fused Q/K RMSNorm
(:func:`warmup_qk_rmsnorm`); ``warmup("qk_norm_rope", ...)`` warms QK norm + RoPE + cache
write (:func:`qknorm.warmup_qk_norm_rope`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .api import qk_rmsnorm, qk_rmsnorm_call, quant_mode
from .backends.registry import run_request, select
from .ops import PIPELINE
from .quant import QuantMode

__all__ = ["warmup", "warmup_qk_rmsnorm", "WarmupRecord"]

logger = logging.getLogger(__name__)


class WarmupRecord(NamedTuple):
    """One warmed mode: the backend that serves it and the row counts it ran."""

    quant: str | None
    backend: str
    sizes: tuple[int, ...]


_warmed = False  # a warmup has run in this process (qknorm.set_pdl warns when it undoes one)


def mark_warmed() -> None:
    """Note that a warmup ran: launch settings changed later discard what it prepared."""
    global _warmed
    _warmed = True


def warmed() -> bool:
    """Whether a warmup of either operator has run in this process."""
    return _warmed


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def warmup(operator: str | int = "fused_qk_rmsnorm", *args: Any, **kwargs: Any) -> list[WarmupRecord]:
    """Probe, select and compile ahead of CUDA-graph capture, for the operator named first.

    Parameters
    ----------
    operator : {"fused_qk_rmsnorm", "qk_norm_rope"} or int
        The operator whose calls will be captured; the remaining arguments are that operator's
        warmup arguments: :func:`warmup_qk_rmsnorm` (``q_width``, ``k_width``, ``modes``, ...)
        or :func:`qknorm.warmup_qk_norm_rope` (``num_heads``, ``num_kv_heads``, ``head_dim``,
        ``cache_dtype``, ...). An int is the fused Q/K RMSNorm's ``q_width``, so
        ``warmup(1536, 512, modes=...)`` reads as it always has.
    *args, **kwargs
        Passed to the operator's warmup.

    Returns
    -------
    list of WarmupRecord
        One per warmed mode (``qk_norm_rope``: one record).

    Raises
    ------
    ValueError
        For an unknown operator name, and as the operator's warmup raises.

    Notes
    -----
    Call :func:`qknorm.set_pdl` first if the kernels are to be launched with programmatic
    dependent launch: those launches are other compiled variants, and switching it starts the
    backend selection over.

    Examples
    --------
    >>> qknorm.warmup(1536, 512, modes=(None, "fp8_group"), row_stride=2112)  # doctest: +SKIP
    >>> qknorm.warmup("qk_norm_rope", 32, 8, 128, cache_dtype=torch.bfloat16)  # doctest: +SKIP
    """
    if isinstance(operator, str):
        if operator == "fused_qk_rmsnorm":
            return warmup_qk_rmsnorm(*args, **kwargs)
        if operator == "qk_norm_rope":
            from .rope.warmup import warmup_qk_norm_rope  # qknorm.rope imports this module's WarmupRecord

            return [warmup_qk_norm_rope(*args, **kwargs)]
        raise ValueError(f"operator must be 'fused_qk_rmsnorm' or 'qk_norm_rope', got {operator!r}")
    return warmup_qk_rmsnorm(operator, *args, **kwargs)


def warmup_qk_rmsnorm(
    q_width: int = 1536,
    k_width: int | None = 512,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    modes: Sequence[str | None] = (None,),
    max_tokens: int = 8192,
    row_stride: int | None = None,
    q_epsilon: float = 1e-6,
    k_epsilon: float | None = None,
    residual: bool = False,
    gemma_norm: bool = False,
    group_size: int | None = None,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    transpose_scale: bool = False,
    return_unquantized: bool = False,
) -> list[WarmupRecord]:
    """Probe, select and compile every fused Q/K RMSNorm call shape given, so that they can be captured.

    Runs :func:`qknorm.qk_rmsnorm` for each mode in ``modes`` once per launch-configuration
    bucket of the selected backend (``backend.warmup_sizes(max_tokens)`` when the backend has
    it; else at 1 and ``max_tokens`` rows), on random data, then synchronizes. A warmed mode
    serves every entry point (the aiter-style entries included) with the same widths, dtype,
    device and options; calls that differ in any of those need their own warmup.

    Parameters
    ----------
    q_width, k_width : int
        n1 and n2 (defaults: DeepSeek-V3's q_lora_rank 1536 and kv_lora_rank 512); ``k_width``
        None warms q-only calls.
    dtype : torch.dtype
        ``torch.bfloat16`` or ``torch.float16``.
    device : torch.device or str, optional
        Default: the current CUDA device, or the CPU without one.
    modes : sequence of {None, "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"}
        The ``quant`` values to warm.
    max_tokens : int
        The largest row count that will be captured or run.
    row_stride : int, optional
        Warm q and k as column slices of one ``[rows, row_stride]`` buffer (the MLA latent:
        2112 for DeepSeek-V3), as the model passes them; None uses contiguous tensors.
    q_epsilon, k_epsilon, residual, gemma_norm, group_size, fp8_dtype, transpose_scale, return_unquantized
        As in :func:`qknorm.qk_rmsnorm` (``residual=True`` warms calls with a ``q_residual``).

    Returns
    -------
    list of WarmupRecord
        ``(quant, backend name, row counts run)`` per mode.

    Raises
    ------
    TypeError, ValueError
        For arguments :func:`qknorm.qk_rmsnorm` would reject.
    qknorm.backends.registry.BackendError
        When no backend can serve a mode.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    for quant in modes:
        try:
            quant_mode(quant)
        except ValueError:
            raise ValueError(f"modes must hold values of {[None, *(m.value for m in QuantMode)]}, got {quant!r}") from None
    dev = _default_device() if device is None else torch.device(device)
    n2 = 0 if k_width is None else k_width
    width = q_width + n2 if row_stride is None else row_stride
    if width < q_width + n2:
        raise ValueError(f"row_stride must be >= q_width + k_width = {q_width + n2}, got {row_stride}")

    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randn((max_tokens, width), generator=gen, dtype=torch.float32).to(dtype=dtype, device=dev)
    res_rows = torch.randn((max_tokens, q_width), generator=gen).to(dtype=dtype, device=dev) if residual else None
    q_weight = torch.rand(q_width, generator=gen).to(dtype=dtype, device=dev)
    k_weight = None if k_width is None else torch.rand(k_width, generator=gen).to(dtype=dtype, device=dev)

    def views(m: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if row_stride is None:  # contiguous q and k of their own
            q = rows[:m, :q_width].contiguous()
            k = None if k_width is None else rows[:m, q_width : q_width + n2].contiguous()
        else:
            q = rows[:m, :q_width]
            k = None if k_width is None else rows[:m, q_width : q_width + n2]
        return q, k, None if res_rows is None else res_rows[:m]

    options = dict(
        q_epsilon=q_epsilon, k_epsilon=k_epsilon, gemma_norm=gemma_norm, group_size=group_size,
        fp8_dtype=fp8_dtype, transpose_scale=transpose_scale, return_unquantized=return_unquantized,
    )  # fmt: skip
    records = []
    for quant in modes:
        # One call at one row selects the backend (probing on first use); ask it for its buckets.
        q, k, res = views(1)
        args = qk_rmsnorm_call(
            q, q_weight, k, k_weight, res, q_epsilon, k_epsilon, gemma_norm, quant_mode(quant), group_size,
            fp8_dtype, transpose_scale, return_unquantized,
        )  # fmt: skip
        req = PIPELINE.request(args)
        run_request(req)
        backend = select(req)
        sizes_fn = getattr(backend, "warmup_sizes", None)
        wanted = sizes_fn(max_tokens) if callable(sizes_fn) else (1, max_tokens)
        sizes = sorted({min(max(int(s), 1), max_tokens) for s in wanted})
        for m in sizes:
            q, k, res = views(m)
            qk_rmsnorm(q, q_weight, k, k_weight, q_residual=res, quant=quant, **options)  # type: ignore[arg-type]
        records.append(WarmupRecord(quant, backend.name, tuple(sizes)))
        logger.info("qknorm: warmed quant=%s on backend %s for rows %s", quant, backend.name, sizes)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    mark_warmed()
    return records
