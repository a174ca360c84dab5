"""The plan of a ``qk_norm_rope`` call signature and the request a backend runs.

:func:`qknorm.rope.checks.plan` turns a call's signature into a :class:`RopePlan` (every scalar
decision, the aliasing check, what the entry allocates); :meth:`RopePlan.bind` makes the
:class:`RopeRequest` of one call's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.aliasing import AliasCheck
from ..quant import FP8_DTYPES

__all__ = ["RopePlan", "RopeRequest"]


@dataclass(frozen=True)
class RopePlan:
    """Everything a call's signature decides: sizes, which optional parts are present, what to allocate.

    ``rot`` is R (0: no rotation); ``dv`` is v's head size (0: no cache write); ``k_scale_heads``
    / ``v_scale_heads`` are 1 (per tensor) or Hk (per head), 0 without an FP8 cache;
    ``q_out_dtype`` is q's output dtype (FP8 with ``q_scale``). ``alloc_q_out`` / ``alloc_k_out``
    say which outputs the entry allocates; ``write_k_out``: k_out is written at all.
    """

    dtype: torch.dtype
    device: torch.device
    t: int
    hq: int
    hk: int
    d: int
    rot: int
    max_pos: int
    cos_dtype: torch.dtype | None
    index_dtypes: tuple[torch.dtype | None, torch.dtype | None]  # of positions and slot_mapping (None: absent)
    dv: int
    block_size: int
    num_slots: int
    cache_dtype: torch.dtype | None
    k_scale_heads: int
    v_scale_heads: int
    q_out_dtype: torch.dtype
    alloc_q_out: bool
    alloc_k_out: bool
    write_k_out: bool
    has_q_weight: bool
    has_k_weight: bool
    is_neox: bool
    gemma: bool
    q_eps: float
    k_eps: float
    check_indices: bool
    # Layout facts a backend may depend on (aiter does): the caches' strides ("contiguous", "block":
    # contiguous within a block, "strided", "" without a cache) and the table's row contiguity.
    cache_layout: str
    table_rows_contiguous: bool
    aliasing: AliasCheck = field(repr=False, compare=False)
    slot: dict[str, int] = field(repr=False, compare=False)  # field name -> index in the call's argument list

    def bind(self, args: Sequence[Any]) -> RopeRequest:
        """The request for one call's arguments (the op's order; outputs already allocated)."""
        s = self.slot
        return RopeRequest(
            self, args[s["q"]], args[s["k"]], args[s["q_weight"]], args[s["k_weight"]], args[s["cos_sin_cache"]],
            args[s["positions"]], args[s["q_out"]], args[s["k_out"]], args[s["v"]], args[s["k_cache"]],
            args[s["v_cache"]], args[s["slot_mapping"]], args[s["k_scale"]], args[s["v_scale"]], args[s["q_scale"]],
        )  # fmt: skip

    @property
    def has_cache(self) -> bool:
        return self.cache_dtype is not None

    @property
    def cache_fp8(self) -> bool:
        return self.cache_dtype in FP8_DTYPES

    @property
    def q_fp8(self) -> bool:
        return self.q_out_dtype in FP8_DTYPES

    def key(self) -> tuple[object, ...]:
        """What backend selection and compiled kernels depend on: all but T and the table/cache sizes."""
        return (
            "qk_norm_rope", self.device.type, self.device.index, self.dtype, self.hq, self.hk, self.d, self.rot,
            self.cos_dtype, self.index_dtypes, self.dv, self.block_size, self.cache_dtype, self.k_scale_heads, self.v_scale_heads,
            self.q_out_dtype, self.write_k_out, self.has_q_weight, self.has_k_weight, self.is_neox, self.gemma,
            self.q_eps == self.k_eps, self.cache_layout, self.table_rows_contiguous,
        )  # fmt: skip


@dataclass(frozen=True, eq=False, slots=True)
class RopeRequest:
    """A validated call with its outputs resolved: what every backend consumes.

    ``q [T, Hq, D]``, ``k [T, Hk, D]``, ``q_out [T, Hq, D]`` (q's dtype or FP8), ``k_out
    [T, Hk, D]`` or None (not written), the rest as the entry's arguments. Supported aliasing:
    ``q_out`` the same view as ``q``, ``k_out`` the same view as ``k``.
    """

    plan: RopePlan
    q: torch.Tensor
    k: torch.Tensor
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    cos_sin_cache: torch.Tensor | None
    positions: torch.Tensor | None
    q_out: torch.Tensor
    k_out: torch.Tensor | None
    v: torch.Tensor | None = None
    k_cache: torch.Tensor | None = None
    v_cache: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    q_scale: torch.Tensor | None = None

    op = "qk_norm_rope"  # the operator (the registry selects among its backends)

    @property
    def m(self) -> int:
        """Tokens T (the registry skips T = 0)."""
        return self.q.shape[0]

    @property
    def device(self) -> torch.device:
        return self.q.device

    def key(self) -> tuple[object, ...]:
        """What backend selection depends on (the operator first)."""
        return self.plan.key()

    def describe(self) -> str:
        """The request's kind in words (for selection logs and errors)."""
        p = self.plan
        rope = f"rotary {p.rot} {'neox' if p.is_neox else 'gptj'}" if p.rot else "no rotary"
        cache = f", {p.cache_dtype} cache" if p.has_cache else ""
        fp8q = f", q as {p.q_out_dtype}" if p.q_fp8 else ""
        return f"qk_norm_rope q [*, {p.hq}, {p.d}] k [*, {p.hk}, {p.d}] {p.dtype} on {p.device}, {rope}{cache}{fp8q}"

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this request writes."""
        return tuple(t for t in (self.q_out, self.k_out, self.k_cache, self.v_cache) if t is not None)
