"""The backend protocol: capability as data (``available``, ``supports``), then ``run``."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Backend", "BackendUnavailable", "RequestRefused"]


class BackendUnavailable(RuntimeError):
    """A backend failed on first use in a way that makes it unusable (e.g. a JIT build failure).

    Raised from ``Backend.run`` only for such first-use failures: the selector then marks the
    backend unavailable with this reason, warns once and moves on. Any other exception raised
    by ``run`` propagates to the caller unchanged.
    """


class RequestRefused(RuntimeError):
    """A backend raised synchronously on a request kind its ``supports()`` accepted.

    Raised from ``Backend.run``; the backend's ``supports()`` refuses that kind from then on.
    The selector forgets its cached choice for the kind and serves the call with the next
    backend (:func:`qknorm.backends.registry.run_request`), unless ``retry`` is False: an
    input may already be overwritten (an in-place request), so the error reaches the caller.
    """

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


@runtime_checkable
class Backend(Protocol):
    """One implementation of one operator (registered for it in :mod:`qknorm.backends.registry`).

    ``available()`` is static for the process (library importable, platform, signature): it
    is probed on first use, cached, and returns ``(ok, reason)``. ``supports(req)`` returns
    ``None`` when this backend can serve the request, else a human-readable reason; it must
    depend only on what ``req.key()`` captures. ``run(req)`` writes the outputs. ``req`` is the
    operator's request type (:class:`qknorm.request.QKNormRequest` for the fused Q/K RMSNorm).
    """

    name: str

    def available(self) -> tuple[bool, str]: ...

    def supports(self, req: Any) -> str | None: ...

    def run(self, req: Any) -> None: ...
