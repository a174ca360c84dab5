"""Backend registry and selection: one policy, in one place, for every operator.

Each operator (``fused_qk_rmsnorm``, ...) has its own backends, registered by name (``aiter``,
``triton``, ``torch``) as factories; a request names its operator (``req.op``) and selection
walks that operator's backends. The priority list (default: ``aiter`` on ROCm devices, ``triton`` on GPUs, ``torch``
everywhere; or ``QKNORM_BACKEND=name[,name...]``) is walked once per request key
(``req.key()``). A backend is skipped when the policy excludes it for the device
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
from typing import Any

import torch

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
    "DEFAULT_OP",
    "REFERENCE_BACKEND",
    "register_operator",
    "operators",
]

logger = logging.getLogger(__name__)

ENV_VAR = "QKNORM_BACKEND"
# The default priority, best first.
BACKEND_NAMES = ("aiter", "triton", "torch")
# The backend that is qknorm.reference itself: its numbers are the oracle's, so comparing them
# with the reference checks nothing (tests, `python -m qknorm check` and `demo` say so).
REFERENCE_BACKEND = "torch"
# The operator the name-based functions (register_backend, get_backend, probe, ...) speak of by default.
DEFAULT_OP = "fused_qk_rmsnorm"

# A request as selection sees it: ``op``, ``key()`` (everything selection depends on, the
# operator first), ``device`` and ``describe()`` (for messages).
Request = Any

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


def lazy(module: str, cls: str) -> Callable[[], Backend]:
    """A factory importing ``module`` (relative to :mod:`qknorm`) and instantiating ``cls`` on first use."""

    def factory() -> Backend:
        import importlib

        return getattr(importlib.import_module(module, "qknorm"), cls)()  # type: ignore[no-any-return]

    return factory


# Operator -> backend name -> factory. Nothing is imported until a backend is first asked for.
_FACTORIES: dict[str, dict[str, Callable[[], Backend]]] = {
    DEFAULT_OP: {
        "aiter": lazy(".backends.aiter_backend", "AiterBackend"),
        "triton": lazy(".backends.triton_backend", "TritonBackend"),
        "torch": lazy(".backends.torch_backend", "TorchBackend"),
    },
}

_Name = tuple[str, str]  # (operator, backend name)


@dataclass
class _State:
    factories: dict[str, dict[str, Callable[[], Backend]]]
    policy: Policy
    instances: dict[_Name, Backend] = field(default_factory=dict)
    availability: dict[_Name, tuple[bool, str]] = field(default_factory=dict)
    broken: set[_Name] = field(default_factory=set)  # probe raised / first-use failure: warn on fallback
    warned: set[_Name] = field(default_factory=set)
    choices: dict[tuple[object, ...], Backend] = field(default_factory=dict)
    env: tuple[tuple[str, ...], bool] | None = None  # (priority names, explicit?) once read


_lock = threading.RLock()
_state = _State(factories={op: dict(f) for op, f in _FACTORIES.items()}, policy=default_policy)


def register_operator(op: str, factories: dict[str, Callable[[], Backend]]) -> None:
    """Declare operator ``op`` and its backends (name -> factory); resets the caches."""
    with _lock:
        _state.factories[op] = dict(factories)
        _reset_locked()


def operators() -> tuple[str, ...]:
    """Every registered operator."""
    return tuple(_state.factories)


def _factories(op: str) -> dict[str, Callable[[], Backend]]:
    try:
        return _state.factories[op]
    except KeyError:
        raise BackendNameError(f"unknown operator {op!r}; registered: {', '.join(_state.factories)}") from None


def register_backend(
    name: str, factory: Callable[[], Backend] | None, op: str = DEFAULT_OP
) -> Callable[[], Backend] | None:
    """Replace, add (or with ``None`` remove) the factory of backend ``name`` of ``op``; resets the caches.

    Returns the previous factory (None if there was none), so tests can restore it.
    """
    with _lock:
        factories = _factories(op)
        previous = factories.get(name)
        if factory is None:
            factories.pop(name, None)
        else:
            factories[name] = factory
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


def backend_names(op: str = DEFAULT_OP) -> tuple[str, ...]:
    """Every registered backend name of ``op``."""
    return tuple(_factories(op))


def _all_names() -> list[str]:
    return list(dict.fromkeys(n for f in _state.factories.values() for n in f))


def _valid_names() -> str:
    return ", ".join(_all_names())


def _read_env() -> tuple[tuple[str, ...], bool]:
    if _state.env is None:
        raw = os.environ.get(ENV_VAR, "").strip()
        if not raw:
            _state.env = (tuple(n for n in BACKEND_NAMES if n in _all_names()), False)
        else:
            names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
            if not names:
                raise BackendNameError(f"{ENV_VAR}={raw!r} names no backend; valid names: {_valid_names()}")
            unknown = [n for n in names if n not in _all_names()]
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


def get_backend(name: str, op: str = DEFAULT_OP) -> Backend:
    """The (lazily constructed) backend ``name`` of ``op``; raises if its module fails to load."""
    with _lock:
        factories = _factories(op)
        if name not in factories:
            raise BackendNameError(f"unknown backend {name!r} for {op}; valid names: {', '.join(factories)}")
        inst = _state.instances.get((op, name))
        if inst is None:
            inst = factories[name]()
            _state.instances[(op, name)] = inst
        return inst


def _probe_locked(op: str, name: str) -> tuple[bool, str]:
    if name not in _factories(op):
        return False, f"no {name} backend is registered for {op}"
    cached = _state.availability.get((op, name))
    if cached is not None:
        return cached
    if _is_compiling():
        raise BackendError(
            f"qknorm would probe backend {name} while torch.compile is tracing; run the call once "
            "eagerly before compiling (or call it through the torch.ops.qknorm custom ops)"
        )
    try:
        result = get_backend(name, op).available()
    except BackendUnavailable as exc:  # the backend's own word for "installed but broken"
        result = (False, str(exc))
        _state.broken.add((op, name))
    except Exception as exc:  # a probe must never escape: any failure means "unavailable"
        result = (False, f"probe raised {type(exc).__name__}: {exc}")
        _state.broken.add((op, name))
    _state.availability[(op, name)] = result
    if not result[0]:
        logger.debug("qknorm backend %s of %s unavailable: %s", name, op, result[1])
    return result


def probe(name: str, op: str = DEFAULT_OP) -> tuple[bool, str]:
    """``available()`` of backend ``name`` of ``op``, cached; a probe that raises marks it unavailable."""
    with _lock:
        if name not in _factories(op):
            raise BackendNameError(f"unknown backend {name!r} for {op}; valid names: {', '.join(_factories(op))}")
        return _probe_locked(op, name)


def mark_unavailable(name: str, reason: str, op: str = DEFAULT_OP) -> None:
    """Mark a backend of ``op`` broken for the rest of the process (first-use build failures)."""
    with _lock:
        _state.availability[(op, name)] = (False, reason)
        _state.broken.add((op, name))
        _state.choices = {k: b for k, b in _state.choices.items() if not (k[0] == op and b.name == name)}


def _is_compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def _guard_first_use(req: Request) -> None:
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


def _supports(op: str, name: str, backend: Backend, req: Request) -> str | None:
    try:
        return backend.supports(req)
    except Exception as exc:  # a capability check that crashes is a broken backend, not a crash for the caller
        _state.broken.add((op, name))
        return f"supports() raised {type(exc).__name__}: {exc}"


def _walk(req: Request) -> Decision:
    names, explicit = _read_env()
    op = req.op
    skipped: list[tuple[str, str]] = []
    for name in names:
        why = None if explicit else _state.policy(name, req.device)
        if why is None:
            ok, reason = _probe_locked(op, name)
            why = None if ok else reason
        if why is None:
            why = _supports(op, name, get_backend(name, op), req)
        if why is None:
            return Decision(name, tuple(skipped), names, explicit)
        skipped.append((name, why))
    return Decision(None, tuple(skipped), names, explicit)


def _no_backend_message(req: Request, decision: Decision) -> str:
    how = f"{ENV_VAR}={','.join(decision.names)}" if decision.explicit else "the default priority"
    reasons = "; ".join(f"{name}: {why}" for name, why in decision.skipped)
    return f"no qknorm backend in {how} can serve {_describe(req)}: {reasons}"


def select(req: Request) -> Backend:
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
        backend = get_backend(decision.backend, req.op)
        _state.choices[key] = backend
        logger.info("qknorm: using backend %s for %s", backend.name, _describe(req))
        for name, why in decision.skipped:
            if (req.op, name) in _state.broken and (req.op, name) not in _state.warned:
                _state.warned.add((req.op, name))
                warnings.warn(
                    f"qknorm backend {name} is unavailable ({why}); using {backend.name} instead",
                    BackendFallbackWarning,
                    stacklevel=3,
                )
        return backend


def explain(req: Request) -> Decision:
    """Walk the priority list for ``req`` without caching or logging (probes on first use).

    For tools such as ``python -m qknorm backends``: which backend would serve ``req`` and why
    each earlier one would be passed over. Raises :class:`BackendNameError` for a bad
    ``QKNORM_BACKEND``.
    """
    with _lock:
        return _walk(req)


def describe(op: str = DEFAULT_OP) -> list[BackendInfo]:
    """Every registered backend of ``op``: available or not and why, and what it bound to.

    Probes every backend (first use); a backend whose module fails to load is reported, never raised.
    """
    infos = []
    with _lock:
        for name in _factories(op):
            ok, reason = _probe_locked(op, name)
            details: dict[str, str] = {}
            inst = _state.instances.get((op, name))
            describe_fn = getattr(inst, "describe", None)
            if callable(describe_fn):
                try:
                    details = {str(k): str(v) for k, v in dict(describe_fn()).items()}
                except Exception as exc:
                    details = {"describe() raised": f"{type(exc).__name__}: {exc}"}
            infos.append(BackendInfo(name, ok, reason, (op, name) in _state.broken, details))
    return infos


def run_request(req: Request) -> str:
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
            mark_unavailable(backend.name, f"failed on first use: {exc}", req.op)
            try:
                backend = select(req)
            except BackendError as err:
                raise BackendError(str(err)) from exc
            continue
        except RequestRefused as exc:
            backend = _reselect_refused(req, backend, exc)
            continue
        break
    return backend.name


def _reselect_refused(req: Request, refused_by: Backend, exc: RequestRefused) -> Backend:
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


def _describe(req: Request) -> str:
    return str(req.describe())


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
