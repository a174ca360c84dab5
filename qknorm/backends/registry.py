"""Backend registry and selection: one policy, in one place.

The priority list (default: ``aiter`` on ROCm devices, ``triton`` on GPUs, ``torch``
everywhere; or ``QKNORM_BACKEND=name[,name...]``) is walked once per request key
(:meth:`QKNormRequest.key`): unavailable backends and backends that do not support the request
are skipped (DEBUG), the choice is cached and logged once (INFO). Nothing here runs at import:
the environment is read and backends are probed on the first call, under a lock.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..request import QKNormRequest
from .base import Backend, BackendUnavailable

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "BackendError",
    "register_backend",
    "get_backend",
    "backend_names",
    "priority",
    "probe",
    "select",
    "run_request",
    "reset",
    "mark_unavailable",
]

logger = logging.getLogger(__name__)

ENV_VAR = "QKNORM_BACKEND"
BACKEND_NAMES = ("aiter", "triton", "torch")


class BackendError(RuntimeError):
    """No backend can serve a request (or an explicitly requested one cannot), with the reasons."""


def _torch_factory() -> Backend:
    from .torch_backend import TorchBackend

    return TorchBackend()


def _triton_factory() -> Backend:
    from .triton_backend import TritonBackend

    return TritonBackend()


def _aiter_factory() -> Backend:
    from .aiter_backend import AiterBackend

    return AiterBackend()


@dataclass
class _State:
    factories: dict[str, Callable[[], Backend]]
    instances: dict[str, Backend]
    availability: dict[str, tuple[bool, str]]
    choices: dict[tuple[object, ...], Backend]
    env: tuple[tuple[str, ...], bool] | None  # (priority names, explicit?) once read


_lock = threading.RLock()
_state = _State(
    factories={"aiter": _aiter_factory, "triton": _triton_factory, "torch": _torch_factory},
    instances={},
    availability={},
    choices={},
    env=None,
)


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Replace or add the factory of backend ``name`` (tests and extensions); resets the caches."""
    with _lock:
        _state.factories[name] = factory
        _reset_locked()


def backend_names() -> tuple[str, ...]:
    """Every registered backend name."""
    return tuple(_state.factories)


def _read_env() -> tuple[tuple[str, ...], bool]:
    if _state.env is None:
        raw = os.environ.get(ENV_VAR, "").strip()
        if not raw:
            _state.env = (("aiter", "triton", "torch"), False)
        else:
            names = tuple(n.strip() for n in raw.split(",") if n.strip())
            unknown = [n for n in names if n not in _state.factories]
            if unknown or not names:
                raise BackendError(
                    f"{ENV_VAR}={raw!r} names unknown backend(s) {unknown}; valid names: {', '.join(_state.factories)}"
                )
            _state.env = (names, True)
    return _state.env


def priority() -> tuple[tuple[str, ...], bool]:
    """The backend priority list and whether the user set it explicitly (``QKNORM_BACKEND``)."""
    with _lock:
        return _read_env()


def get_backend(name: str) -> Backend:
    """The (lazily constructed) backend instance called ``name``."""
    with _lock:
        if name not in _state.factories:
            raise BackendError(f"unknown backend {name!r}; valid names: {', '.join(_state.factories)}")
        inst = _state.instances.get(name)
        if inst is None:
            inst = _state.factories[name]()
            _state.instances[name] = inst
        return inst


def probe(name: str) -> tuple[bool, str]:
    """``available()`` of backend ``name``, cached; a probe that raises marks it unavailable."""
    with _lock:
        cached = _state.availability.get(name)
        if cached is not None:
            return cached
        try:
            result = get_backend(name).available()
        except Exception as exc:  # a probe must never escape: any failure means "unavailable"
            result = (False, f"probe raised {type(exc).__name__}: {exc}")
        _state.availability[name] = result
        if not result[0]:
            logger.debug("qknorm backend %s unavailable: %s", name, result[1])
        return result


def mark_unavailable(name: str, reason: str) -> None:
    """Mark a backend unusable for the rest of the process (first-use build failures)."""
    with _lock:
        _state.availability[name] = (False, reason)
        _state.choices = {k: b for k, b in _state.choices.items() if b.name != name}


def _default_applies(name: str, req: QKNormRequest) -> str | None:
    """The default policy: aiter only on ROCm devices, triton only on GPUs."""
    dev = req.device
    if name == "aiter" and not (dev.type == "cuda" and torch.version.hip is not None):
        return "default policy uses aiter on ROCm devices only"
    if name == "triton" and dev.type not in ("cuda", "xpu"):
        return f"default policy uses triton on GPUs only, device is {dev.type}"
    return None


def select(req: QKNormRequest) -> Backend:
    """The backend serving ``req``: cached per request key, decided once under the lock."""
    key = req.key()
    backend = _state.choices.get(key)
    if backend is not None:
        return backend
    with _lock:
        backend = _state.choices.get(key)
        if backend is not None:
            return backend
        if req.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise BackendError(
                "qknorm must choose a backend for a new request shape during CUDA-graph capture; "
                "call qknorm.warmup(...) (or run the call once) before capturing"
            )
        names, explicit = _read_env()
        reasons: list[str] = []
        for name in names:
            ok, why = probe(name)
            if ok and not explicit:
                why_not = _default_applies(name, req)
                if why_not is not None:
                    ok, why = False, why_not
            if ok:
                why_not = get_backend(name).supports(req)
                if why_not is not None:
                    ok, why = False, why_not
            if ok:
                backend = get_backend(name)
                break
            logger.debug("qknorm: skipping backend %s for %s: %s", name, _describe(req), why)
            reasons.append(f"{name}: {why}")
        if backend is None:
            how = f"{ENV_VAR}={','.join(names)}" if explicit else "the default priority"
            raise BackendError(f"no qknorm backend in {how} can serve {_describe(req)}: " + "; ".join(reasons))
        logger.info("qknorm: using backend %s for %s", backend.name, _describe(req))
        _state.choices[key] = backend
        return backend


def run_request(req: QKNormRequest) -> str:
    """Run a validated request on its backend; returns the backend name.

    A backend's exception propagates (numerics must not depend on history), except a
    :class:`BackendUnavailable` first-use failure: that backend is marked unavailable with one
    warning naming the cause, and the request is re-selected.
    """
    if req.m == 0:
        return "none"
    while True:
        backend = select(req)
        try:
            backend.run(req)
        except BackendUnavailable as exc:
            reason = f"failed on first use: {exc}"
            mark_unavailable(backend.name, reason)
            warnings.warn(f"qknorm backend {backend.name} {reason}; falling back", RuntimeWarning, stacklevel=3)
            continue
        break
    if req.q_out_copy is not None:
        req.q_out_copy.copy_(req.q_out)  # type: ignore[arg-type]
    return backend.name


def _describe(req: QKNormRequest) -> str:
    k = f", k [*, {req.n2}]" if req.has_k else ""
    quant = req.mode.value if req.quant_dtype is None else f"{req.mode.value} ({req.quant_dtype})"
    return f"q [*, {req.n1}]{k} {req.dtype} on {req.device}, quant {quant}"


def _reset_locked() -> None:
    _state.instances.clear()
    _state.availability.clear()
    _state.choices.clear()
    _state.env = None


def reset() -> None:
    """Forget every probe, choice and the environment (tests; after changing ``QKNORM_BACKEND``)."""
    with _lock:
        _reset_locked()
