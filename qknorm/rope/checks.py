"""Validation of a ``qk_norm_rope`` call (SPEC_ROPE_CACHE §2, §4), in three separate parts.

- :func:`plan` is the operator's planner for :class:`qknorm.core.pipeline.Pipeline`: it sees
  the tensors as :class:`~qknorm.core.signature.TensorSpec` (class, dtype, device, shape,
  strides) and the scalars, and returns an immutable :class:`RopePlan`, cached per signature.
- The plan's :class:`~qknorm.core.aliasing.AliasCheck` looks at where the tensors are in
  memory: it runs at every call.
- :func:`check_indices` reads the index tensors (one device synchronization); only with
  ``check_indices=True`` and in the reference.

Wrong type or dtype -> ``TypeError``; wrong shape, stride, size or combination -> ``ValueError``;
every message names the argument, the expectation and the value. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core.aliasing import AliasCheck
from ..core.checks import check_bool, check_eps, check_tensor
from ..core.pipeline import specs_or_values
from ..core.signature import TensorSpec
from ..quant import FP8_DTYPES, native_fp8_dtype
from .request import RopePlan, RopeRequest

__all__ = [
    "INPUT_DTYPES",
    "INDEX_DTYPES",
    "MAX_HEAD_DIM",
    "OUTPUTS",
    "IN_PLACE",
    "plan",
    "plan_call",
    "check_indices",
]

INPUT_DTYPES = (torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
# Largest head size (§2); the Triton kernel keeps a head's row in registers.
MAX_HEAD_DIM = 1024
# The kernel numbers (token, head) rows in int32; addresses themselves are 64-bit.
_MAX_ROWS = 2**31 - 1
# The fields the operator writes, and its in-place forms (exactly the same view).
OUTPUTS = frozenset({"q_out", "k_out", "k_cache", "v_cache"})
IN_PLACE = frozenset({("q_out", "q"), ("k_out", "k")})


# ----------------------------------------------------------------------------- small checks


def _dtype(name: str, t: Any, dtypes: tuple[torch.dtype, ...], what: str = "") -> None:
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}{what}, got {t.dtype}")


def _device(name: str, t: Any, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")


def _shape(name: str, t: Any, shape: tuple[int, ...], dims: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {dims} = {list(shape)}, got {list(t.shape)}")


def _last_contiguous(name: str, t: Any) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def _no_self_overlap(name: str, t: Any) -> None:
    """A written tensor's elements must be distinct memory (no zero or interleaving strides)."""
    extent = 1  # elements spanned by the dimensions of smaller stride
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < extent:
            raise ValueError(f"{name} is written, so its elements must not overlap in memory, got shape "
                             f"{list(t.shape)} with strides {t.stride()}")  # fmt: skip
        extent += stride * (size - 1)


def _heads(name: str, t: Any, device: torch.device, dtypes: tuple[torch.dtype, ...],
           shape: tuple[int, ...], dims: str, written: bool = False) -> None:  # fmt: skip
    """``t`` is ``shape`` of one of ``dtypes`` on ``device``, last dimension contiguous."""
    _dtype(name, t, dtypes)
    _shape(name, t, shape, dims)
    _last_contiguous(name, t)
    _device(name, t, device)
    if written:
        _no_self_overlap(name, t)


def _weight(name: str, w: Any, d: int, dtype: torch.dtype, device: torch.device) -> bool:
    if w is None:
        return False
    w = check_tensor(name, w)
    _dtype(name, w, (dtype,), " (q's dtype)")
    _shape(name, w, (d,), "[D]")
    _last_contiguous(name, w)
    _device(name, w, device)
    return True


def _index(name: str, t: Any, n: int, device: torch.device) -> Any:
    t = check_tensor(name, t)
    _dtype(name, t, INDEX_DTYPES)
    _shape(name, t, (n,), "[T]")
    _device(name, t, device)
    return t


def _scale(name: str, s: Any, heads: tuple[int, ...], device: torch.device) -> int:
    """A float32 ``[1]`` (or ``[Hk]``) device tensor; returns its element count."""
    s = check_tensor(name, s)
    _dtype(name, s, (torch.float32,))
    if s.dim() != 1 or s.shape[0] not in heads:
        want = " or ".join(f"[{h}]" for h in dict.fromkeys(heads))
        raise ValueError(f"{name} must have shape {want}, got {list(s.shape)}")
    _device(name, s, device)
    return s.shape[0]


# ----------------------------------------------------------------------------- the plan


def _check_qk(q: Any, k: Any) -> tuple[Any, Any]:
    q, k = check_tensor("q", q), check_tensor("k", k)
    _dtype("q", q, INPUT_DTYPES)
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [T, Hq, D], got shape {list(q.shape)}")
    if q.device.type == "meta":
        raise ValueError("q must be on a real device, got a meta tensor")
    t, hq, d = q.shape
    if d % 2 or not 2 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q's head size D must be even and in [2, {MAX_HEAD_DIM}], got {d}")
    if hq < 1:
        raise ValueError(f"q must have at least one head, got shape {list(q.shape)}")
    _last_contiguous("q", q)
    _dtype("k", k, (q.dtype,), " (q's dtype)")
    if k.dim() != 3 or k.shape[0] != t or k.shape[2] != d or k.shape[1] < 1:
        raise ValueError(f"k must have shape [T, Hk, D] = [{t}, Hk >= 1, {d}] (T and D of q), got {list(k.shape)}")
    _last_contiguous("k", k)
    _device("k", k, q.device)
    if t * max(hq, k.shape[1]) > _MAX_ROWS:
        raise ValueError(f"T * heads must be below 2^31, got T={t} with {max(hq, k.shape[1])} heads")
    return q, k


def _check_rope(cos_sin_cache: Any, positions: Any, t: int, d: int, q: Any) -> tuple[int, int, torch.dtype | None]:
    """Returns (R, max_pos, table dtype); (0, 0, None) without rotation."""
    if (cos_sin_cache is None) != (positions is None):
        given = "cos_sin_cache" if positions is None else "positions"
        raise ValueError(f"cos_sin_cache and positions come together: got {given} without the other")
    if cos_sin_cache is None:
        return 0, 0, None
    table = check_tensor("cos_sin_cache", cos_sin_cache)
    _dtype("cos_sin_cache", table, tuple(dict.fromkeys((torch.float32, q.dtype))))
    if table.dim() != 2:
        raise ValueError(f"cos_sin_cache must be 2-D [max_pos, R], got shape {list(table.shape)}")
    max_pos, rot = table.shape
    if rot % 2 or not 2 <= rot <= d:
        raise ValueError(f"cos_sin_cache's width R (the rotary dim) must be even and in [2, D={d}], got {rot}")
    if max_pos < 1:
        raise ValueError(f"cos_sin_cache must have at least one row, got shape {list(table.shape)}")
    _last_contiguous("cos_sin_cache", table)
    _device("cos_sin_cache", table, q.device)
    _index("positions", positions, t, q.device)
    return rot, max_pos, table.dtype


def _check_cache(v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any,
                 t: int, hk: int, d: int, q: Any) -> tuple[int, int, int, torch.dtype | None]:  # fmt: skip
    """Returns (Dv, block_size, num_slots, cache dtype); (0, 0, 0, None) without a cache write."""
    given = {"v": v is not None, "k_cache": k_cache is not None, "v_cache": v_cache is not None,
             "slot_mapping": slot_mapping is not None}  # fmt: skip
    if not any(given.values()):
        return 0, 0, 0, None
    if not all(given.values()):
        have = ", ".join(n for n, g in given.items() if g)
        missing = ", ".join(n for n, g in given.items() if not g)
        raise ValueError(f"v, k_cache, v_cache and slot_mapping come together: got {have} without {missing}")
    v, kc, vc = check_tensor("v", v), check_tensor("k_cache", k_cache), check_tensor("v_cache", v_cache)
    if v.dim() != 3:
        raise ValueError(f"v must be 3-D [T, Hk, Dv], got shape {list(v.shape)}")
    dv = v.shape[2]
    if not 1 <= dv <= MAX_HEAD_DIM:
        raise ValueError(f"v's head size Dv must be in [1, {MAX_HEAD_DIM}], got {dv}")
    _heads("v", v, q.device, (q.dtype,), (t, hk, dv), "[T, Hk, Dv]")
    cache_dtypes = (q.dtype, *FP8_DTYPES)
    _dtype("k_cache", kc, cache_dtypes)
    if kc.dim() != 4:
        raise ValueError(f"k_cache must be 4-D [num_blocks, block_size, Hk, D], got shape {list(kc.shape)}")
    nb, bs = kc.shape[0], kc.shape[1]
    if bs < 1:
        raise ValueError(f"k_cache's block_size must be at least 1, got shape {list(kc.shape)}")
    _heads("k_cache", kc, q.device, cache_dtypes, (nb, bs, hk, d), "[num_blocks, block_size, Hk, D]", written=True)
    _dtype("v_cache", vc, (kc.dtype,), " (k_cache's dtype)")
    _heads("v_cache", vc, q.device, (kc.dtype,), (nb, bs, hk, dv), "[num_blocks, block_size, Hk, Dv]", written=True)
    _index("slot_mapping", slot_mapping, t, q.device)
    return dv, bs, nb * bs, kc.dtype


def _check_scales(k_scale: Any, v_scale: Any, cache_dtype: torch.dtype | None, hk: int,
                  device: torch.device) -> tuple[int, int]:  # fmt: skip
    if cache_dtype not in FP8_DTYPES:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                what = "without a cache write" if cache_dtype is None else f"with a {cache_dtype} cache"
                raise ValueError(f"{name} must be None {what} (scales are for an FP8 cache)")
        return 0, 0
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"{name} must be given for an FP8 cache ({cache_dtype}): a float32 [1] or [{hk}] tensor")
    return _scale("k_scale", k_scale, (1, hk), device), _scale("v_scale", v_scale, (1, hk), device)


def _check_outputs(q_out: Any, k_out: Any, q_scale: Any, q: Any, hk: int) -> torch.dtype:
    """Checks the given outputs and q_scale; returns q's output dtype."""
    t, hq, d = q.shape
    out_dtype = q.dtype
    if q_scale is not None:
        _scale("q_scale", q_scale, (1,), q.device)
        if q_out is None:
            out_dtype = native_fp8_dtype(q.device)  # what an allocated FP8 q_out gets
    if q_out is not None:
        q_out = check_tensor("q_out", q_out)
        if q_scale is not None:
            _dtype("q_out", q_out, FP8_DTYPES, " (q_scale quantizes q)")
            out_dtype = q_out.dtype
        else:
            _dtype("q_out", q_out, (q.dtype,), " (q's dtype; FP8 needs q_scale)")
        _heads("q_out", q_out, q.device, (out_dtype,), (t, hq, d), "[T, Hq, D]", written=True)
    if k_out is not None:
        k_out = check_tensor("k_out", k_out)
        _heads("k_out", k_out, q.device, (q.dtype,), (t, hk, d), "[T, Hk, D]", written=True)
    return out_dtype


def _contiguous(t: Any, skip: int) -> bool:
    """Whether the dimensions of ``t`` from ``skip`` on are laid out contiguously (sizes of 1 aside)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[skip:]), reversed(t.stride()[skip:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _layout(k_cache: Any, v_cache: Any) -> str:
    """The most specific layout both caches have: "contiguous", "block" (within a block), "strided"."""
    if _contiguous(k_cache, 0) and _contiguous(v_cache, 0):
        return "contiguous"
    return "block" if _contiguous(k_cache, 1) and _contiguous(v_cache, 1) else "strided"


def _dtype_of(t: Any) -> torch.dtype | None:
    return None if t is None else t.dtype  # type: ignore[no-any-return]


def plan(call: Mapping[str, Any], display: Mapping[str, str] | None = None, *, aliasing: bool = True) -> RopePlan:
    """Validate one call given as the op's fields (tensors as :class:`TensorSpec` or tensors).

    Reads only what a signature holds (no data, no addresses), so the verdict is cached per
    signature by :class:`qknorm.core.pipeline.Pipeline`. ``aliasing=False`` skips building the
    aliasing check (fake tensors: no memory to compare). ``display`` is accepted for the
    pipeline's protocol: this operator's field names are its public names. Raises
    ``TypeError`` / ``ValueError``; writes nothing.
    """
    q, k = _check_qk(call["q"], call["k"])
    t, hq, d = q.shape
    hk = k.shape[1]
    has_qw = _weight("q_weight", call["q_weight"], d, q.dtype, q.device)
    has_kw = _weight("k_weight", call["k_weight"], d, q.dtype, q.device)
    q_eps = check_eps("q_epsilon", call["q_epsilon"])
    k_eps = q_eps if call["k_epsilon"] is None else check_eps("k_epsilon", call["k_epsilon"])
    rot, max_pos, cos_dtype = _check_rope(call["cos_sin_cache"], call["positions"], t, d, q)
    dv, bs, slots, cache_dtype = _check_cache(call["v"], call["k_cache"], call["v_cache"], call["slot_mapping"],
                                              t, hk, d, q)  # fmt: skip
    ks, vs = _check_scales(call["k_scale"], call["v_scale"], cache_dtype, hk, q.device)
    q_out, k_out = call["q_out"], call["k_out"]
    out_dtype = _check_outputs(q_out, k_out, call["q_scale"], q, hk)
    names = tuple(call)
    specs = tuple(v if isinstance(v, TensorSpec) else None for v in call.values()) if aliasing else ()
    return RopePlan(
        dtype=q.dtype, device=q.device, t=t, hq=hq, hk=hk, d=d, rot=rot, max_pos=max_pos, cos_dtype=cos_dtype,
        index_dtypes=(_dtype_of(call["positions"]), _dtype_of(call["slot_mapping"])),
        dv=dv, block_size=bs, num_slots=slots, cache_dtype=cache_dtype, k_scale_heads=ks, v_scale_heads=vs,
        q_out_dtype=out_dtype, alloc_q_out=q_out is None, alloc_k_out=k_out is None and cache_dtype is None,
        write_k_out=k_out is not None or cache_dtype is None, has_q_weight=has_qw, has_k_weight=has_kw,
        is_neox=check_bool("is_neox", call["is_neox"]), gemma=check_bool("gemma_norm", call["gemma_norm"]), q_eps=q_eps,
        k_eps=k_eps, check_indices=check_bool("check_indices", call["check_indices"]),
        cache_layout=_layout(call["k_cache"], call["v_cache"]) if cache_dtype is not None else "",
        table_rows_contiguous=call["cos_sin_cache"] is None or _contiguous(call["cos_sin_cache"], 0),
        aliasing=AliasCheck(names, specs, OUTPUTS, IN_PLACE), slot={n: i for i, n in enumerate(names)},
    )  # fmt: skip


def plan_call(q: Any, k: Any, q_weight: Any, k_weight: Any, cos_sin_cache: Any, positions: Any,
              **fields: Any) -> RopePlan:  # fmt: skip
    """:func:`plan` for a call given as :func:`qknorm.qk_norm_rope`'s arguments (tests and tools)."""
    from .ops import call_args  # the op's argument list; ops imports this module

    args = call_args(q, k, q_weight, k_weight, cos_sin_cache, positions, **fields)
    from .ops import FIELDS

    return plan(dict(zip(FIELDS, specs_or_values(args))))


# ----------------------------------------------------------------------------- per call


def check_indices(req: RopeRequest) -> None:
    """Raise ``ValueError`` naming the first position outside ``[0, max_pos)`` or slot at or past
    ``num_blocks * block_size`` (negative slots are padding). One device synchronization."""
    plan = req.plan
    if plan.t == 0 or (req.positions is None and req.slot_mapping is None):
        return
    device = req.q.device
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("check_indices=True reads the indices on the host and cannot run during CUDA-graph capture")
    parts: list[torch.Tensor] = []
    for t, lo, hi in ((req.positions, 0, plan.max_pos), (req.slot_mapping, None, plan.num_slots)):
        if t is None:
            parts += [torch.zeros((), dtype=torch.int64, device=device)] * 3
            continue
        x = t.to(torch.int64)
        bad = x >= hi if lo is None else (x < lo) | (x >= hi)
        first = torch.argmax(bad.to(torch.int8))  # the first True (argmax returns the first maximum)
        parts += [bad.any().to(torch.int64), first, x[first]]
    pos_bad, pos_i, pos_v, slot_bad, slot_i, slot_v = torch.stack(parts).tolist()
    if pos_bad:
        raise ValueError(f"positions[{pos_i}] = {pos_v} is outside the cos_sin_cache rows [0, {plan.max_pos})")
    if slot_bad:
        raise ValueError(
            f"slot_mapping[{slot_i}] = {slot_v} is past the cache's {plan.num_slots} slots "
            f"(num_blocks * block_size; negative slots mark padding)"
        )
