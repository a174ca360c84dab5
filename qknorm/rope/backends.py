"""Backends of ``qk_norm_rope`` and the choice between them.

The priority list is the first operator's (``QKNORM_BACKEND``, or ``aiter``, ``triton``,
``torch`` by default; :func:`qknorm.backends.registry.priority`). ``triton`` serves GPUs (and
the CPU under ``TRITON_INTERPRET=1`` when named explicitly), ``torch`` (the reference) serves
every device; no aiter entry point is bound for this operator yet, so ``aiter`` never serves
it. The choice is cached per plan key and priority list, and is never made for the first time
during CUDA-graph capture or torch.compile tracing (run the call once eagerly, or warm up).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import torch

from ..backends.base import BackendUnavailable
from ..backends.registry import BackendError, priority
from .checks import RopePlan, RopeRequest
from .reference import qk_norm_rope_reference

__all__ = ["RopeBackend", "RopeTorchBackend", "backend_names", "get_backend", "select", "explain", "run_request", "reset", "describe"]

logger = logging.getLogger(__name__)


class RopeBackend(Protocol):
    """One implementation of §3: ``available()`` (static), ``supports(plan)``, ``run(req)``."""

    name: str

    def available(self) -> tuple[bool, str]: ...

    def supports(self, plan: RopePlan) -> str | None: ...

    def run(self, req: RopeRequest) -> None: ...


class RopeTorchBackend:
    """The reference (:mod:`qknorm.rope.reference`): every device; checks the indices on every call."""

    name = "torch"

    def available(self) -> tuple[bool, str]:
        return True, f"torch {torch.__version__} (reference implementation)"

    def supports(self, plan: RopePlan) -> str | None:
        return None

    def run(self, req: RopeRequest) -> None:
        qk_norm_rope_reference(req)


def _triton() -> RopeBackend:
    from .triton_launch import RopeTritonBackend

    return RopeTritonBackend()


_FACTORIES: dict[str, Callable[[], RopeBackend]] = {"triton": _triton, "torch": RopeTorchBackend}
_NOT_BOUND = "no aiter entry point serves qk_norm_rope yet"
_lock = threading.RLock()
_instances: dict[str, RopeBackend] = {}
_availability: dict[str, tuple[bool, str]] = {}
_choices: dict[tuple[object, ...], RopeBackend] = {}


def _backend(name: str) -> RopeBackend:
    inst = _instances.get(name)
    if inst is None:
        inst = _instances[name] = _FACTORIES[name]()
    return inst


def backend_names() -> tuple[str, ...]:
    """The backends that can serve this operator."""
    return tuple(_FACTORIES)


def get_backend(name: str) -> RopeBackend:
    """The (lazily constructed) backend ``name`` of :func:`backend_names`."""
    with _lock:
        return _backend(name)


def _why_not(name: str, plan: RopePlan, explicit: bool) -> str | None:
    if name not in _FACTORIES:
        return _NOT_BOUND
    if not explicit and name == "triton" and plan.device.type != "cuda":
        return f"the default priority uses triton on GPUs only, device is {plan.device.type}"
    ok, reason = _availability.get(name) or (None, "")
    if ok is None:
        try:
            ok, reason = _backend(name).available()
        except Exception as exc:  # a probe must never escape: any failure means unavailable
            ok, reason = False, f"probe raised {type(exc).__name__}: {exc}"
        _availability[name] = (ok, reason)
    return _backend(name).supports(plan) if ok else reason


def explain(plan: RopePlan) -> tuple[str | None, list[tuple[str, str]]]:
    """``(backend name or None, [(skipped name, why), ...])`` for ``plan``, without caching the choice."""
    names, explicit = priority()
    skipped: list[tuple[str, str]] = []
    with _lock:
        for name in names:
            why = _why_not(name, plan, explicit)
            if why is None:
                return name, skipped
            skipped.append((name, why))
    return None, skipped


def select(plan: RopePlan) -> RopeBackend:
    """The backend serving ``plan`` (cached); raises :class:`~qknorm.backends.registry.BackendError`."""
    names, explicit = priority()
    key = (names, explicit, plan.key())
    backend = _choices.get(key)
    if backend is not None:
        return backend
    compiling = torch.compiler.is_compiling()
    if compiling or (plan.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        where = "torch.compile is tracing" if compiling else "CUDA-graph capture"
        raise BackendError(
            f"qknorm must choose a qk_norm_rope backend for a new shape during {where}; call "
            "qknorm.warmup_qk_norm_rope(...) or run the call once eagerly with this shape first"
        )
    name, skipped = explain(plan)
    if name is None:
        reasons = "; ".join(f"{n}: {why}" for n, why in skipped)
        raise BackendError(f"no qknorm backend can serve qk_norm_rope {_describe(plan)}: {reasons}")
    with _lock:
        backend = _choices[key] = _backend(name)
    logger.info("qknorm: using backend %s for qk_norm_rope %s", name, _describe(plan))
    return backend


def run_request(req: RopeRequest) -> str:
    """Run ``req`` on its backend; a first-use build failure moves it to the next backend."""
    if req.plan.t == 0:
        return "none"
    backend = select(req.plan)
    try:
        backend.run(req)
    except BackendUnavailable as exc:
        with _lock:
            _availability[backend.name] = (False, f"failed on first use: {exc}")
            _choices.clear()
        logger.warning("qknorm: backend %s failed on first use (%s); choosing again", backend.name, exc)
        backend = select(req.plan)
        backend.run(req)
    return backend.name


def describe() -> list[tuple[str, bool, str]]:
    """``(name, available, reason)`` of every backend this operator knows."""
    with _lock:
        out = []
        for name in _FACTORIES:
            try:
                ok, reason = _backend(name).available()
            except Exception as exc:
                ok, reason = False, f"probe raised {type(exc).__name__}: {exc}"
            out.append((name, ok, reason))
        return [*out, ("aiter", False, _NOT_BOUND)]


def reset() -> None:
    """Forget probes and choices (tests)."""
    with _lock:
        _instances.clear()
        _availability.clear()
        _choices.clear()


def _describe(plan: RopePlan) -> str:
    rope = f"rotary {plan.rot}{' neox' if plan.is_neox else ' gptj'}" if plan.rot else "no rotary"
    cache = f", cache {plan.cache_dtype}" if plan.has_cache else ""
    return f"q [*, {plan.hq}, {plan.d}] k [*, {plan.hk}, {plan.d}] {plan.dtype} on {plan.device}, {rope}{cache}"
