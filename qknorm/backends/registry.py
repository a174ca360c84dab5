"""Backend registry and selection: one policy, in one place.

The priority list (default: ``aiter`` on ROCm devices, ``triton`` on GPUs, ``torch``
everywhere; or ``QKNORM_BACKEND=name[,name...]``) is walked once per request key
(:meth:`QKNormRequest.key`). A backend is skipped when the policy excludes it for the device
(default list only), when it is unavailable (``available()``, probed once per process and
cached) or when it does not support the request (``supports(req)``); each skip is logged at
DEBUG, the choice is cached and logged once at INFO.

Failure handling:

- A probe that raises (a broken install: import error, renamed symbol, changed signature)
  marks the backend unavailable with that reason. When selection then falls back past it,
  one :class:`BackendFallbackWarning` per backend names the cause. A probe that merely says
  "not installed" is skipped quietly.
- A backend raising from ``run`` propagates: numerics must not depend on history. Two
  exceptions: :class:`~qknorm.backends.base.BackendUnavailable` (a first-use build failure):
  the backend is marked unavailable and the request goes to the next backend, with the same
  single warning; :class:`~qknorm.backends.base.RequestRefused` (a library raised on a kind the
  backend said it supports): that kind goes to the next backend from then on, and so does the call.
- An explicit ``QKNORM_BACKEND`` list is the whole list: when none of its backends can serve
  a request, :class:`BackendError` says why for each of them (no silent fallback).

Nothing here runs at import: the environment is read and backends are probed on the first
call, under one lock, never during CUDA-graph capture or torch.compile tracing (selection
then raises :class:`BackendError`; run the call once eagerly first, or ``qknorm.warmup``).

Test hooks: :func:`reset` forgets probes, choices and the environment; :func:`set_policy`
replaces the default device policy; :func:`register_backend` swaps a backend's factory
(:mod:`qknorm.testing.fake_aiter` uses the last two to run aiter adapters on the CPU).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..quant import QuantMode
from ..request import QKNormRequest
from .base import Backend, BackendUnavailable, RequestRefused

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "BackendError",
    "BackendNameError",
    "BackendFallbackWarning",
    "BackendInfo",
    "Decision",
    "Policy",
    "register_backend",
    "get_backend",
    "backend_names",
    "priority",
    "probe",
    "select",
    "explain",
    "describe",
    "run_request",
    "reset",
    "mark_unavailable",
    "default_policy",
    "set_policy",
]

logger = logging.getLogger(__name__)

ENV_VAR = "QKNORM_BACKEND"
# The default priority, best first.
BACKEND_NAMES = ("aiter", "triton", "torch")

# Which backends the default priority considers on a device: None when eligible, else why not.
Policy = Callable[[str, torch.device], "str | None"]


class BackendError(RuntimeError):
    """No backend can serve a request (or an explicitly requested one cannot), with the reasons."""


class BackendNameError(BackendError, ValueError):
    """A backend name (``QKNORM_BACKEND`` or an argument) that is not registered."""


class BackendFallbackWarning(RuntimeWarning):
    """A backend that should have served a request is broken; the next one serves it instead."""


@dataclass(frozen=True)
class BackendInfo:
    """What :func:`describe` reports about one backend (for ``python -m qknorm backends``)."""

    name: str
    available: bool
    reason: str
    broken: bool  # the probe raised or the backend failed on first use
    details: dict[str, str] = field(default_factory=dict)  # what it bound to (module, symbol, ...)


@dataclass(frozen=True)
class Decision:
    """The outcome of walking the priority list for one request (:func:`explain`)."""

    backend: str | None
    skipped: tuple[tuple[str, str], ...]  # (name, why) for each backend passed over, in order
    names: tuple[str, ...]
    explicit: bool


def default_policy(name: str, device: torch.device) -> str | None:
    """The production policy: aiter on ROCm devices only, triton on GPUs only, torch everywhere."""
    if name == "aiter" and not (device.type == "cuda" and torch.version.hip is not None):
        return "the default priority uses aiter on ROCm devices only"
    if name == "triton" and device.type not in ("cuda", "xpu"):
        return f"the default priority uses triton on GPUs only, device is {device.type}"
    return None


def _torch_factory() -> Backend:
    from .torch_backend import TorchBackend

    return TorchBackend()


def _triton_factory() -> Backend:
    from .triton_backend import TritonBackend

    return TritonBackend()  # type: ignore[return-value]


def _aiter_factory() -> Backend:
    from .aiter_backend import AiterBackend

    return AiterBackend()


@dataclass
class _State:
    factories: dict[str, Callable[[], Backend]]
    policy: Policy
    instances: dict[str, Backend] = field(default_factory=dict)
    availability: dict[str, tuple[bool, str]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)  # probe raised / first-use failure: warn on fallback
    warned: set[str] = field(default_factory=set)
    choices: dict[tuple[object, ...], Backend] = field(default_factory=dict)
    env: tuple[tuple[str, ...], bool] | None = None  # (priority names, explicit?) once read


_lock = threading.RLock()
_state = _State(
    factories={"aiter": _aiter_factory, "triton": _triton_factory, "torch": _torch_factory},
    policy=default_policy,
)


def register_backend(name: str, factory: Callable[[], Backend] | None) -> Callable[[], Backend] | None:
    """Replace, add (or with ``None`` remove) the factory of backend ``name``; resets the caches.

    Returns the previous factory (None if there was none), so tests can restore it.
    """
    with _lock:
        previous = _state.factories.get(name)
        if factory is None:
            _state.factories.pop(name, None)
        else:
            _state.factories[name] = factory
        _reset_locked()
        return previous


def set_policy(policy: Policy | None) -> Policy:
    """Replace the default-priority device policy (``None`` restores :func:`default_policy`).

    A test hook: e.g. making ``aiter`` eligible on the CPU while a fake aiter is installed.
    Resets the caches and returns the previous policy.
    """
    with _lock:
        previous = _state.policy
        _state.policy = default_policy if policy is None else policy
        _reset_locked()
        return previous


def backend_names() -> tuple[str, ...]:
    """Every registered backend name."""
    return tuple(_state.factories)


def _valid_names() -> str:
    return ", ".join(_state.factories)


def _read_env() -> tuple[tuple[str, ...], bool]:
    if _state.env is None:
        raw = os.environ.get(ENV_VAR, "").strip()
        if not raw:
            _state.env = (tuple(n for n in BACKEND_NAMES if n in _state.factories), False)
        else:
            names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
            if not names:
                raise BackendNameError(f"{ENV_VAR}={raw!r} names no backend; valid names: {_valid_names()}")
            unknown = [n for n in names if n not in _state.factories]
            if unknown:
                raise BackendNameError(
                    f"{ENV_VAR}={raw!r} names unknown backend(s) {', '.join(unknown)}; valid names: {_valid_names()}"
                )
            _state.env = (names, True)
    return _state.env


def priority() -> tuple[tuple[str, ...], bool]:
    """The backend priority list and whether the user set it explicitly (``QKNORM_BACKEND``)."""
    with _lock:
        return _read_env()


def get_backend(name: str) -> Backend:
    """The (lazily constructed) backend instance called ``name``; raises if its module fails to load."""
    with _lock:
        if name not in _state.factories:
            raise BackendNameError(f"unknown backend {name!r}; valid names: {_valid_names()}")
        inst = _state.instances.get(name)
        if inst is None:
            inst = _state.factories[name]()
            _state.instances[name] = inst
        return inst


def _probe_locked(name: str) -> tuple[bool, str]:
    cached = _state.availability.get(name)
    if cached is not None:
        return cached
    if _is_compiling():
        raise BackendError(
            f"qknorm would probe backend {name} while torch.compile is tracing; run the call once "
            "eagerly before compiling (or call it through the torch.ops.qknorm custom ops)"
        )
    try:
        result = get_backend(name).available()
    except BackendUnavailable as exc:  # the backend's own word for "installed but broken"
        result = (False, str(exc))
        _state.broken.add(name)
    except Exception as exc:  # a probe must never escape: any failure means "unavailable"
        result = (False, f"probe raised {type(exc).__name__}: {exc}")
        _state.broken.add(name)
    _state.availability[name] = result
    if not result[0]:
        logger.debug("qknorm backend %s unavailable: %s", name, result[1])
    return result


def probe(name: str) -> tuple[bool, str]:
    """``available()`` of backend ``name``, cached; a probe that raises marks it unavailable."""
    with _lock:
        if name not in _state.factories:
            raise BackendNameError(f"unknown backend {name!r}; valid names: {_valid_names()}")
        return _probe_locked(name)


def mark_unavailable(name: str, reason: str) -> None:
    """Mark a backend broken for the rest of the process (first-use build failures)."""
    with _lock:
        _state.availability[name] = (False, reason)
        _state.broken.add(name)
        _state.choices = {k: b for k, b in _state.choices.items() if b.name != name}


def _is_compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def _guard_first_use(req: QKNormRequest) -> None:
    """Selection probes libraries and may import or build them: never inside capture or tracing."""
    if _is_compiling():
        raise BackendError(
            f"qknorm must choose a backend for a new request ({_describe(req)}) while torch.compile is "
            "tracing; call qknorm.warmup(...) or run the call once eagerly before compiling (or use the "
            "torch.ops.qknorm custom ops)"
        )
    if req.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise BackendError(
            f"qknorm must choose a backend for a new request ({_describe(req)}) during CUDA-graph capture; "
            "call qknorm.warmup(...) or run the call once eagerly with this shape and dtype before capturing"
        )


def _supports(name: str, backend: Backend, req: QKNormRequest) -> str | None:
    try:
        return backend.supports(req)
    except Exception as exc:  # a capability check that crashes is a broken backend, not a crash for the caller
        _state.broken.add(name)
        return f"supports() raised {type(exc).__name__}: {exc}"


def _walk(req: QKNormRequest) -> Decision:
    names, explicit = _read_env()
    skipped: list[tuple[str, str]] = []
    for name in names:
        why = None if explicit else _state.policy(name, req.device)
        if why is None:
            ok, reason = _probe_locked(name)
            why = None if ok else reason
        if why is None:
            why = _supports(name, get_backend(name), req)
        if why is None:
            return Decision(name, tuple(skipped), names, explicit)
        skipped.append((name, why))
    return Decision(None, tuple(skipped), names, explicit)


def _no_backend_message(req: QKNormRequest, decision: Decision) -> str:
    how = f"{ENV_VAR}={','.join(decision.names)}" if decision.explicit else "the default priority"
    reasons = "; ".join(f"{name}: {why}" for name, why in decision.skipped)
    return f"no qknorm backend in {how} can serve {_describe(req)}: {reasons}"


def select(req: QKNormRequest) -> Backend:
    """The backend serving ``req``: cached per request key, decided once under the lock.

    Raises :class:`BackendError` when no backend of the priority list can serve ``req`` (the
    message gives each backend's reason), for an unknown name in ``QKNORM_BACKEND``, and when a
    new decision would be needed during CUDA-graph capture or torch.compile tracing.
    """
    key = req.key()
    backend = _state.choices.get(key)
    if backend is not None:
        return backend
    with _lock:
        backend = _state.choices.get(key)
        if backend is not None:
            return backend
        _guard_first_use(req)
        decision = _walk(req)
        for name, why in decision.skipped:
            logger.debug("qknorm: skipping backend %s for %s: %s", name, _describe(req), why)
        if decision.backend is None:
            raise BackendError(_no_backend_message(req, decision))
        backend = get_backend(decision.backend)
        _state.choices[key] = backend
        logger.info("qknorm: using backend %s for %s", backend.name, _describe(req))
        for name, why in decision.skipped:
            if name in _state.broken and name not in _state.warned:
                _state.warned.add(name)
                warnings.warn(
                    f"qknorm backend {name} is unavailable ({why}); using {backend.name} instead",
                    BackendFallbackWarning,
                    stacklevel=3,
                )
        return backend


def explain(req: QKNormRequest) -> Decision:
    """Walk the priority list for ``req`` without caching or logging (probes on first use).

    For tools such as ``python -m qknorm backends``: which backend would serve ``req`` and why
    each earlier one would be passed over. Raises :class:`BackendNameError` for a bad
    ``QKNORM_BACKEND``.
    """
    with _lock:
        return _walk(req)


def describe() -> list[BackendInfo]:
    """Every registered backend: available or not and why, and what it bound to.

    Probes every backend (first use); a backend whose module fails to load is reported, never raised.
    """
    infos = []
    with _lock:
        for name in _state.factories:
            ok, reason = _probe_locked(name)
            details: dict[str, str] = {}
            inst = _state.instances.get(name)
            describe_fn = getattr(inst, "describe", None)
            if callable(describe_fn):
                try:
                    details = {str(k): str(v) for k, v in dict(describe_fn()).items()}
                except Exception as exc:
                    details = {"describe() raised": f"{type(exc).__name__}: {exc}"}
            infos.append(BackendInfo(name, ok, reason, name in _state.broken, details))
    return infos


def run_request(req: QKNormRequest) -> str:
    """Run a validated request on its backend; returns the backend name (``"none"`` for m = 0).

    A backend's exception propagates (numerics must not depend on history), except a
    :class:`BackendUnavailable` first-use failure: that backend is marked unavailable and the
    request is re-selected (one :class:`BackendFallbackWarning` names the cause); when nothing
    else can serve it, :class:`BackendError` is raised from the failure.
    """
    if req.m == 0:
        return "none"
    backend = select(req)
    while True:
        try:
            backend.run(req)
        except BackendUnavailable as exc:
            mark_unavailable(backend.name, f"failed on first use: {exc}")
            try:
                backend = select(req)
            except BackendError as err:
                raise BackendError(str(err)) from exc
            continue
        except RequestRefused as exc:
            backend = _reselect_refused(req, backend, exc)
            continue
        break
    if req.q_out_copy is not None:
        req.q_out_copy.copy_(req.q_out)  # type: ignore[arg-type]
    return backend.name


def _reselect_refused(req: QKNormRequest, refused_by: Backend, exc: RequestRefused) -> Backend:
    """The backend that serves ``req`` after ``refused_by`` refused its kind (it logged why, once)."""
    with _lock:
        if _state.choices.get(req.key()) is refused_by:
            del _state.choices[req.key()]
    if not exc.retry:  # an input may be overwritten already: serving the call elsewhere could be wrong
        raise exc
    try:
        backend = select(req)
    except BackendError as err:
        raise BackendError(str(err)) from exc
    if backend is refused_by:  # its supports() must refuse the kind now; never loop
        raise BackendError(f"backend {refused_by.name} refused {_describe(req)} but still claims it") from exc
    return backend


def _describe(req: QKNormRequest) -> str:
    k = f", k [*, {req.n2}]" if req.has_k else ""
    extras = [s for s, on in (("residual", req.q_residual is not None), ("gemma", req.gemma)) if on]
    quant = req.mode.value if req.quant_dtype is None else f"{req.mode.value} ({req.quant_dtype})"
    if req.mode in (QuantMode.FP8_GROUP, QuantMode.MXFP4):
        quant += f" group {req.group_size}" + (" transposed scales" if req.transpose_scale else "")
    more = f" with {' and '.join(extras)}" if extras else ""
    return f"q [*, {req.n1}]{k} {req.dtype} on {req.device}{more}, quant {quant}"


def _reset_locked() -> None:
    _state.instances.clear()
    _state.availability.clear()
    _state.broken.clear()
    _state.warned.clear()
    _state.choices.clear()
    _state.env = None


def reset() -> None:
    """Forget every probe, choice, warning and the environment (tests; after changing ``QKNORM_BACKEND``).

    Keeps registered factories and the policy (see :func:`register_backend`, :func:`set_policy`).
    """
    with _lock:
        _reset_locked()
