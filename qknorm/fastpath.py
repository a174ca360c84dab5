"""The eager call path: validate once per argument signature, then run.

:func:`qknorm.checks.build_request` is the one definition of a valid call, but it costs tens
of microseconds of Python, several times a GPU kernel at decode sizes. Nearly all of its
verdict depends only on the *signature* of a call: each tensor's type, dtype, device, shape
and strides, and the scalar arguments with their exact types. The one part that does not is
aliasing, which depends on where the tensors are in memory.

So the first call with a new signature runs ``build_request`` (the slow path) and, when the
call was valid, records a :class:`_Plan` for the signature. Later calls with the same
signature rebuild the request from the plan and re-check aliasing from the tensors' byte
spans (each output against every other tensor); a span intersection that is neither one of the
supported same-view in-place forms nor the relative offset the plan was validated with sends
the call to ``build_request`` again, which gives the exact verdict. A plan is only recorded after checking that rebuilding the request from the
call's own arguments reproduces ``build_request``'s request field for field, so the two paths
cannot drift apart.

Per-call wall time of ``qknorm.fused_qk_rmsnorm`` with preallocated outputs, DeepSeek shapes
at M=1 (q ``[1, 1536]`` and k ``[1, 512]`` slices of a ``[1, 2112]`` latent, bf16), with a
backend whose ``run`` does nothing, so only qknorm's Python is timed (best of 7 x 2000 calls):

- host of the NVIDIA H100 80GB HBM3 machine (Python 3.12, torch 2.11): 13.5 us; on the same
  host two eager ``F.rms_norm`` calls take 31.3 us and the Triton backend's ``run`` alone 16.0 us
  (public call with the Triton backend: 29.5 us).
- a 2-core CPU container (Python 3.11, torch 2.13): 8.3 us (timeit), against 87 us when every
  call ran ``build_request``. Of the 8.3 us, reading the six tensors' metadata for the signature
  is about 2.9 (each of ``dtype``, ``device``, ``shape``, ``stride()`` costs 70-130 ns), the
  lookup 0.6, the aliasing re-check 1.0, assembling the request 1.0, ``run_request`` 0.9.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from .backends.registry import run_request
from .checks import _ALLOWED_ALIASES, build_request
from .quant import QuantMode
from .request import QKNormRequest

__all__ = ["execute", "build", "clear_plans", "plan_count"]

# Plans are small (no tensors); a serving process sees a few per layer shape and row count.
# Past this many (e.g. prefill with ever-new row counts) the cache starts over.
_MAX_PLANS = 4096

_MODES = {m.value: m for m in QuantMode}

# Tensor argument slots, in the order of the canonical argument list (see :func:`execute`).
_SLOTS = (
    "q",
    "q_weight",
    "k",
    "k_weight",
    "k_out",
    "q_residual",
    "q_res_out",
    "q_out",
    "q_out_copy",
    "q_out_quantized",
    "q_out_scale",
)
_OUTPUT_SLOTS = frozenset({"k_out", "q_res_out", "q_out", "q_out_copy", "q_out_quantized", "q_out_scale"})


class _PlannedRequest(QKNormRequest):
    """A :class:`QKNormRequest` assembled from a plan, with its selection key computed once.

    A frozen dataclass's ``__init__`` sets each of its 17 fields through ``object.__setattr__``
    and ``key()`` reads a dozen tensor properties: about 5 and 3 microseconds per call. A
    planned request fills its ``__dict__`` in one step and returns the plan's key. Anything
    that builds a new request from it (``dataclasses.replace``) gets a plain key computation.
    """

    def key(self) -> tuple[object, ...]:
        key = self.__dict__.get("_key")
        return key if key is not None else QKNormRequest.key(self)


def _meta(t: Any) -> tuple[object, ...]:
    """Everything validation reads from a tensor, except where it is in memory."""
    return (t.__class__, t.dtype, t.device, t.shape, t.stride())


def _extent(t: torch.Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to one past the last byte ``t`` can touch (0 when empty)."""
    if t.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _view_facts(t: torch.Tensor | None) -> tuple[object, ...] | None:
    if t is None:
        return None
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.__class__)


class _Plan:
    """What one valid signature needs to rebuild its request: scalars, views, byte spans."""

    __slots__ = ("disjoint", "fields", "quant_u8", "scale_view")

    def __init__(self, req: QKNormRequest, tensors: tuple[torch.Tensor | None, ...], q_out_name: str) -> None:
        self.fields = {
            "q_eps": req.q_eps,
            "k_eps": req.k_eps,
            "gemma": req.gemma,
            "mode": req.mode,
            "group_size": req.group_size,
            "transpose_scale": req.transpose_scale,
            "_key": req.key(),
        }
        quant, scale = tensors[9], tensors[10]
        # The views build_request takes of the quantization outputs (same data pointer).
        self.quant_u8 = req.mode is QuantMode.MXFP4 and quant is not None and quant.dtype != torch.uint8
        self.scale_view: tuple[str, object] | None = None
        if scale is not None and req.q_scale is not scale:
            qs = req.q_scale
            if req.mode is QuantMode.MXFP4:
                self.scale_view = ("view", torch.uint8)
            elif req.mode is QuantMode.FP8_TENSOR and qs is not None:
                self.scale_view = ("view", tuple(qs.shape))
            elif qs is not None:
                self.scale_view = ("strided", (tuple(qs.shape), qs.stride()))

        # Byte spans for the aliasing re-check: each output against each other tensor.
        names = {"q_out": q_out_name, "q_out_copy": "q_out_unquantized"}
        present = [i for i, t in enumerate(tensors) if t is not None and t.numel() > 0]
        pairs = []
        for ia in present:
            if _SLOTS[ia] not in _OUTPUT_SLOTS:
                continue
            for ib in present:
                if ib == ia or (_SLOTS[ib] in _OUTPUT_SLOTS and ib < ia):
                    continue  # each output pair once
                na, nb = names.get(_SLOTS[ia], _SLOTS[ia]), names.get(_SLOTS[ib], _SLOTS[ib])
                ta, tb = tensors[ia], tensors[ib]
                same_view_ok = (
                    (na, nb) in _ALLOWED_ALIASES
                    and ta.shape == tb.shape  # type: ignore[union-attr]
                    and ta.stride() == tb.stride()  # type: ignore[union-attr]
                    and ta.dtype == tb.dtype  # type: ignore[union-attr]
                )
                ext_a, ext_b = _extent(ta), _extent(tb)  # type: ignore[arg-type]
                # build_request just accepted these tensors, and for fixed shapes and strides its
                # exact verdict depends only on their relative offset: interleaved views of one
                # buffer (q_out and k_out as column slices, or k_out is k beside q in the latent)
                # stay on the fast path as long as that offset is the same.
                pa, pb = ta.data_ptr(), tb.data_ptr()  # type: ignore[union-attr]
                offset = None if (pa + ext_a <= pb or pb + ext_b <= pa) else pb - pa
                pairs.append((ia, ib, ext_a, ext_b, same_view_ok, offset))
        self.disjoint = _disjointness_check(pairs)

    def request(self, tensors: tuple[Any, ...]) -> QKNormRequest | None:
        """The request for these tensors, or None when their memory needs the exact aliasing check."""
        if not self.disjoint(tensors):
            return None
        quant, scale = tensors[9], tensors[10]
        if self.quant_u8:
            quant = quant.view(torch.uint8)
        view = self.scale_view
        if view is not None:
            kind, arg = view
            if kind == "view":
                scale = scale.view(arg)
            else:
                scale = scale.as_strided(arg[0], arg[1], scale.storage_offset())  # type: ignore[index]
        req = object.__new__(_PlannedRequest)
        fields = self.fields.copy()
        fields["q"] = tensors[0]
        fields["q_weight"] = tensors[1]
        fields["k"] = tensors[2]
        fields["k_weight"] = tensors[3]
        fields["k_out"] = tensors[4]
        fields["q_residual"] = tensors[5]
        fields["q_res_out"] = tensors[6]
        fields["q_out"] = tensors[7]
        fields["q_out_copy"] = tensors[8]
        fields["q_quant"] = quant
        fields["q_scale"] = scale
        object.__setattr__(req, "__dict__", fields)
        return req

    def reproduces(self, req: QKNormRequest, tensors: tuple[Any, ...]) -> bool:
        """Whether rebuilding from the plan gives ``req`` exactly (checked once, when the plan is made)."""
        rebuilt = self.request(tensors)
        if rebuilt is None:
            return False
        for name in req.__dataclass_fields__:
            a, b = getattr(req, name), getattr(rebuilt, name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if _view_facts(a) != _view_facts(b):
                    return False
            elif a != b or type(a) is not type(b):
                return False
        return rebuilt.key() == req.key()


def _disjointness_check(
    pairs: list[tuple[int, int, int, int, bool, int | None]],
) -> Callable[[tuple[Any, ...]], bool]:
    """A function of the tensor tuple: True when no listed pair shares a byte (or is an allowed same view).

    ``pairs`` holds (slot a, slot b, extent a, extent b, same view allowed, accepted relative
    offset of b from a or None). The check is
    generated as straight-line code, like a dataclass's ``__init__``: a loop over the pairs
    costs about 0.15 us per pair in CPython, the unrolled comparisons about 0.04 us.
    """
    slots = sorted({i for a, b, *_ in pairs for i in (a, b)})
    lines = ["def disjoint(t):"]
    lines += [f"    p{i} = t[{i}].data_ptr()" for i in slots]
    terms = []
    for a, b, ext_a, ext_b, same_view_ok, offset in pairs:
        term = f"p{a} + {int(ext_a)} <= p{b} or p{b} + {int(ext_b)} <= p{a}"
        if same_view_ok:
            term += f" or p{a} == p{b}"
        if offset is not None:
            term += f" or p{b} - p{a} == {int(offset)}"
        terms.append(f"({term})")
    lines.append("    return " + (" and ".join(terms) if terms else "True"))
    namespace: dict[str, Any] = {}
    exec("\n".join(lines), namespace)  # the source above holds only integers and local names
    return namespace["disjoint"]  # type: ignore[no-any-return]


_plans: dict[tuple[object, ...], _Plan | None] = {}
_plans_lock = threading.Lock()


def clear_plans() -> None:
    """Forget every plan (tests; nothing else needs it: plans hold no tensors and no backend)."""
    with _plans_lock:
        _plans.clear()


def plan_count() -> int:
    """How many signatures have a plan (tests and diagnostics)."""
    return sum(plan is not None for plan in list(_plans.values()))


def build(
    q: Any, q_weight: Any, q_epsilon: Any, k: Any, k_weight: Any, k_epsilon: Any, k_out: Any, q_residual: Any,
    q_res_out: Any, gemma_norm: Any, quant_mode: str, group_size: Any, q_out: Any, q_out_name: str, q_out_copy: Any,
    q_out_quantized: Any, q_out_scale: Any, transpose_scale: Any,
) -> QKNormRequest:  # fmt: skip
    """Validate one call given as the canonical argument list and return its request.

    The arguments are :func:`qknorm.checks.build_request`'s, positionally, with ``mode`` as a
    :class:`~qknorm.quant.QuantMode` value string. Raises what ``build_request`` raises.
    """
    tensors = (q, q_weight, k, k_weight, k_out, q_residual, q_res_out, q_out, q_out_copy, q_out_quantized, q_out_scale)
    try:
        # Scalars go in with their exact types: True == 1 and 1 == 1.0 must not share a verdict.
        sig: tuple[object, ...] | None = (
            quant_mode, q_out_name,
            q_epsilon.__class__, q_epsilon, k_epsilon.__class__, k_epsilon, group_size.__class__, group_size,
            gemma_norm.__class__, gemma_norm, transpose_scale.__class__, transpose_scale,
            (q.__class__, q.dtype, q.device, q.shape, q.stride()),
            (q_weight.__class__, q_weight.dtype, q_weight.device, q_weight.shape, q_weight.stride()),
            None if k is None else (k.__class__, k.dtype, k.device, k.shape, k.stride()),
            None if k_weight is None else _meta(k_weight),
            None if k_out is None else _meta(k_out),
            None if q_residual is None else _meta(q_residual),
            None if q_res_out is None else _meta(q_res_out),
            None if q_out is None else _meta(q_out),
            None if q_out_copy is None else _meta(q_out_copy),
            None if q_out_quantized is None else _meta(q_out_quantized),
            None if q_out_scale is None else _meta(q_out_scale),
        )  # fmt: skip
        plan = _plans.get(sig)  # type: ignore[arg-type]
    except (AttributeError, TypeError, RuntimeError):
        sig = plan = None  # not tensors, unhashable scalars, storage-less tensors: validation says what
    if plan is not None:
        req = plan.request(tensors)
        if req is not None:
            return req
    if quant_mode not in _MODES:
        raise ValueError(f"quant_mode must be one of {list(_MODES)}, got {quant_mode!r}")
    req = build_request(
        q=q, q_weight=q_weight, q_epsilon=q_epsilon, k=k, k_weight=k_weight, k_epsilon=k_epsilon, k_out=k_out,
        q_residual=q_residual, q_res_out=q_res_out, gemma_norm=gemma_norm, mode=_MODES[quant_mode],
        group_size=group_size, q_out=q_out, q_out_name=q_out_name, q_out_copy=q_out_copy,
        q_out_quantized=q_out_quantized, q_out_scale=q_out_scale, transpose_scale=transpose_scale,
    )  # fmt: skip
    if sig is not None and sig not in _plans:
        new: _Plan | None = _Plan(req, tensors, q_out_name)
        if not new.reproduces(req, tensors):  # type: ignore[union-attr]
            new = None  # remembered as None: this signature always takes the slow path
        with _plans_lock:
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
            _plans[sig] = new
    return req


def execute(
    q: Any, q_weight: Any, q_epsilon: Any, k: Any, k_weight: Any, k_epsilon: Any, k_out: Any, q_residual: Any,
    q_res_out: Any, gemma_norm: Any, quant_mode: str, group_size: Any, q_out: Any, q_out_name: str, q_out_copy: Any,
    q_out_quantized: Any, q_out_scale: Any, transpose_scale: Any,
) -> None:  # fmt: skip
    """Validate (see :func:`build`) and run one call on the selected backend."""
    run_request(
        build(
            q, q_weight, q_epsilon, k, k_weight, k_epsilon, k_out, q_residual, q_res_out, gemma_norm, quant_mode,
            group_size, q_out, q_out_name, q_out_copy, q_out_quantized, q_out_scale, transpose_scale,
        )
    )  # fmt: skip
