"""Validation of a ``qk_norm_rope`` call (SPEC_ROPE_CACHE §2, §4), in three separate parts.

- :func:`plan_call` reads only metadata (type, ``dtype``, ``device``, ``shape``, ``stride()``,
  ``dim()``) and the scalar arguments, and returns an immutable :class:`RopePlan`: a pure
  function of the call's signature, so a caller may compute it once per signature and cache it.
- :func:`check_aliasing` looks at where the tensors are in memory: it runs at every call.
- :func:`check_indices` reads the index tensors (one device synchronization); only with
  ``check_indices=True`` and in the reference.

Wrong type or dtype -> ``TypeError``; wrong shape, stride, size or combination -> ``ValueError``;
every message names the argument, the expectation and the value. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checks import check_eps
from ..quant import FP8_DTYPES
from .aliasing import overlaps, same_view, storage_less

__all__ = [
    "INPUT_DTYPES",
    "INDEX_DTYPES",
    "MAX_HEAD_DIM",
    "RopePlan",
    "RopeRequest",
    "plan_call",
    "check_aliasing",
    "check_indices",
]

INPUT_DTYPES = (torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
# Largest head size (§2); the Triton kernel keeps a head's row in registers.
MAX_HEAD_DIM = 1024
# The kernel numbers (token, head) rows in int32; addresses themselves are 64-bit.
_MAX_ROWS = 2**31 - 1


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
            self.cos_dtype, self.dv, self.block_size, self.cache_dtype, self.k_scale_heads, self.v_scale_heads,
            self.q_out_dtype, self.write_k_out, self.has_q_weight, self.has_k_weight, self.is_neox, self.gemma,
        )  # fmt: skip


@dataclass(frozen=True, eq=False)
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

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this request writes."""
        return tuple(t for t in (self.q_out, self.k_out, self.k_cache, self.v_cache) if t is not None)


# ----------------------------------------------------------------------------- small checks


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:  # no usable strides
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) torch.Tensor, got {kind}")
    return t


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], what: str = "") -> None:
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}{what}, got {t.dtype}")


def _device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")


def _shape(name: str, t: torch.Tensor, shape: tuple[int, ...], dims: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {dims} = {list(shape)}, got {list(t.shape)}")


def _last_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def _no_self_overlap(name: str, t: torch.Tensor) -> None:
    """A written tensor's elements must be distinct memory (no zero or interleaving strides)."""
    extent = 1  # elements spanned by the dimensions of smaller stride
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < extent:
            raise ValueError(f"{name} is written, so its elements must not overlap in memory, got shape "
                             f"{list(t.shape)} with strides {t.stride()}")  # fmt: skip
        extent += stride * (size - 1)


def _heads(name: str, t: torch.Tensor, device: torch.device, dtypes: tuple[torch.dtype, ...],
           shape: tuple[int, ...], dims: str, written: bool = False) -> None:  # fmt: skip
    """``t`` is ``shape`` of one of ``dtypes`` on ``device``, last dimension contiguous."""
    _dtype(name, t, dtypes)
    _shape(name, t, shape, dims)
    _last_contiguous(name, t)
    _device(name, t, device)
    if written:
        _no_self_overlap(name, t)


def _weight(name: str, w: object, d: int, dtype: torch.dtype, device: torch.device) -> bool:
    if w is None:
        return False
    w = _tensor(name, w)
    _dtype(name, w, (dtype,), " (q's dtype)")
    _shape(name, w, (d,), "[D]")
    _last_contiguous(name, w)
    _device(name, w, device)
    return True


def _index(name: str, t: object, n: int, device: torch.device) -> torch.Tensor:
    t = _tensor(name, t)
    _dtype(name, t, INDEX_DTYPES)
    _shape(name, t, (n,), "[T]")
    _device(name, t, device)
    return t


def _scale(name: str, s: object, heads: tuple[int, ...], device: torch.device) -> int:
    """A float32 ``[1]`` (or ``[Hk]``) device tensor; returns its element count."""
    s = _tensor(name, s)
    _dtype(name, s, (torch.float32,))
    if s.dim() != 1 or s.shape[0] not in heads:
        want = " or ".join(f"[{h}]" for h in dict.fromkeys(heads))
        raise ValueError(f"{name} must have shape {want}, got {list(s.shape)}")
    _device(name, s, device)
    return s.shape[0]


# ----------------------------------------------------------------------------- the plan


def _check_qk(q: object, k: object) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _tensor("q", q), _tensor("k", k)
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


def _check_rope(cos_sin_cache: object, positions: object, t: int, d: int, q: torch.Tensor) -> tuple[int, int, torch.dtype | None]:
    """Returns (R, max_pos, table dtype); (0, 0, None) without rotation."""
    if (cos_sin_cache is None) != (positions is None):
        given = "cos_sin_cache" if positions is None else "positions"
        raise ValueError(f"cos_sin_cache and positions come together: got {given} without the other")
    if cos_sin_cache is None:
        return 0, 0, None
    table = _tensor("cos_sin_cache", cos_sin_cache)
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


def _check_cache(v: object, k_cache: object, v_cache: object, slot_mapping: object,
                 t: int, hk: int, d: int, q: torch.Tensor) -> tuple[int, int, int, torch.dtype | None]:  # fmt: skip
    """Returns (Dv, block_size, num_slots, cache dtype); (0, 0, 0, None) without a cache write."""
    given = {"v": v is not None, "k_cache": k_cache is not None, "v_cache": v_cache is not None,
             "slot_mapping": slot_mapping is not None}  # fmt: skip
    if not any(given.values()):
        return 0, 0, 0, None
    if not all(given.values()):
        have = ", ".join(n for n, g in given.items() if g)
        missing = ", ".join(n for n, g in given.items() if not g)
        raise ValueError(f"v, k_cache, v_cache and slot_mapping come together: got {have} without {missing}")
    v, kc, vc = _tensor("v", v), _tensor("k_cache", k_cache), _tensor("v_cache", v_cache)
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


def _check_scales(k_scale: object, v_scale: object, cache_dtype: torch.dtype | None, hk: int,
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


def _check_outputs(q_out: object, k_out: object, q_scale: object, q: torch.Tensor, hk: int,
                   fp8_native: Callable[[torch.device], torch.dtype]) -> torch.dtype:  # fmt: skip
    """Checks the given outputs and q_scale; returns q's output dtype."""
    t, hq, d = q.shape
    out_dtype = q.dtype
    if q_scale is not None:
        _scale("q_scale", q_scale, (1,), q.device)
        if q_out is None:
            out_dtype = fp8_native(q.device)
    if q_out is not None:
        q_out = _tensor("q_out", q_out)
        if q_scale is not None:
            _dtype("q_out", q_out, FP8_DTYPES, " (q_scale quantizes q)")
            out_dtype = q_out.dtype
        else:
            _dtype("q_out", q_out, (q.dtype,), " (q's dtype; FP8 needs q_scale)")
        _heads("q_out", q_out, q.device, (out_dtype,), (t, hq, d), "[T, Hq, D]", written=True)
    if k_out is not None:
        k_out = _tensor("k_out", k_out)
        _heads("k_out", k_out, q.device, (q.dtype,), (t, hk, d), "[T, Hk, D]", written=True)
    return out_dtype


def plan_call(
    q: object, k: object, q_weight: object, k_weight: object, cos_sin_cache: object, positions: object, *,
    q_epsilon: object = 1e-6, k_epsilon: object = None, is_neox: object = True, gemma_norm: object = False,
    q_out: object = None, k_out: object = None, v: object = None, k_cache: object = None, v_cache: object = None,
    slot_mapping: object = None, k_scale: object = None, v_scale: object = None, q_scale: object = None,
    check_indices: object = False, fp8_native: Callable[[torch.device], torch.dtype] = lambda d: torch.float8_e4m3fn,
) -> RopePlan:  # fmt: skip
    """Validate a call from its metadata alone (arguments as :func:`qknorm.qk_norm_rope`).

    ``fp8_native(device)`` is the FP8 flavour an allocated FP8 ``q_out`` gets (e4m3fnuz on gfx942).
    Raises ``TypeError`` / ``ValueError``; reads no tensor data and writes nothing.
    """
    q, k = _check_qk(q, k)
    t, hq, d = q.shape
    hk = k.shape[1]
    has_qw = _weight("q_weight", q_weight, d, q.dtype, q.device)
    has_kw = _weight("k_weight", k_weight, d, q.dtype, q.device)
    q_eps = check_eps("q_epsilon", q_epsilon)
    k_eps = q_eps if k_epsilon is None else check_eps("k_epsilon", k_epsilon)
    rot, max_pos, cos_dtype = _check_rope(cos_sin_cache, positions, t, d, q)
    dv, bs, slots, cache_dtype = _check_cache(v, k_cache, v_cache, slot_mapping, t, hk, d, q)
    ks, vs = _check_scales(k_scale, v_scale, cache_dtype, hk, q.device)
    out_dtype = _check_outputs(q_out, k_out, q_scale, q, hk, fp8_native)
    return RopePlan(
        dtype=q.dtype, device=q.device, t=t, hq=hq, hk=hk, d=d, rot=rot, max_pos=max_pos, cos_dtype=cos_dtype,
        dv=dv, block_size=bs, num_slots=slots, cache_dtype=cache_dtype, k_scale_heads=ks, v_scale_heads=vs,
        q_out_dtype=out_dtype, alloc_q_out=q_out is None, alloc_k_out=k_out is None and cache_dtype is None,
        write_k_out=k_out is not None or cache_dtype is None, has_q_weight=has_qw, has_k_weight=has_kw,
        is_neox=_bool("is_neox", is_neox), gemma=_bool("gemma_norm", gemma_norm), q_eps=q_eps, k_eps=k_eps,
        check_indices=_bool("check_indices", check_indices),
    )  # fmt: skip


# ----------------------------------------------------------------------------- per call


_IN_PLACE = {("q_out", "q"), ("k_out", "k")}


def check_aliasing(req: RopeRequest, allocated: tuple[str, ...] = ()) -> None:
    """Written tensors may not overlap each other or any input, except ``q_out``/``k_out`` being
    exactly the view ``q``/``k`` (in place). ``allocated`` names outputs that are fresh (skipped).

    k_cache and v_cache may interleave (views of one ``[num_blocks, 2, ...]`` allocation): the
    test is exact for tensors whose outermost dimension has equal strides (see :mod:`.aliasing`).
    """
    outputs = {n: getattr(req, n) for n in ("q_out", "k_out", "k_cache", "v_cache")}
    outputs = {n: o for n, o in outputs.items() if o is not None and n not in allocated}
    inputs = {n: getattr(req, n) for n in ("q", "k", "v", "q_weight", "k_weight", "cos_sin_cache", "positions",
                                            "slot_mapping", "k_scale", "v_scale", "q_scale")}  # fmt: skip
    inputs = {n: t for n, t in inputs.items() if t is not None}
    if not outputs or storage_less((*outputs.values(), *inputs.values())):
        return
    names = list(outputs)
    for i, oname in enumerate(names):
        out = outputs[oname]
        for other in names[i + 1 :]:
            if overlaps(out, outputs[other]):
                raise ValueError(f"{oname} and {other} must not overlap in memory")
        for iname, inp in inputs.items():
            if (oname, iname) in _IN_PLACE and same_view(out, inp):
                continue
            if overlaps(out, inp):
                hint = " (in place it must be exactly the same view)" if (oname, iname) in _IN_PLACE else ""
                raise ValueError(f"{oname} must not overlap input {iname}{hint}")


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
