"""Backend ``aiter`` of ``qk_norm_rope``: aiter's ``fused_qk_norm_rope_cache_pts_quant_shuffle``, bound on first use.

The same three lines of defence as the fused Q/K RMSNorm's aiter backend
(:mod:`qknorm.backends.aiter_backend`; ``docs/aiter.md``):

1. :meth:`RopeAiterBackend.supports` refuses every kind the bound generation does not compute
   as SPEC_ROPE_CACHE §3 says or whose arguments would fail one of its checks (from #3159 on
   ``AITER_CHECK`` aborts the process) (:class:`~qknorm.rope.aiter_adapter.PtsAdapter`).
2. A behavioural probe per kind and device (:mod:`qknorm.rope.aiter_probe`), at selection.
3. An exception aiter raises synchronously on a kind it was believed to serve: logged once
   with aiter's version and the kind, the kind goes to the next backend from then on, the call
   is served there (:class:`~qknorm.backends.base.RequestRefused`), unless it was in place.

The request kind includes the layout facts aiter depends on (one eps for q and k, a table with
contiguous rows, the caches' layout), so what aiter cannot address is refused per kind like the
rest, and the registry serves it with the next backend (never chosen during capture). The main ``fused_qk_norm_rope_cache_quant_shuffle``
is never bound: it writes only aiter's 5-D shuffle cache with dynamic per-token scales.

Nothing here imports aiter until :meth:`RopeAiterBackend.available` runs (first use).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from typing import Any

import torch

from ..backends.aiter_backend import aiter_caps, capturing, is_build_failure
from ..backends.aiter_binding import ROPE_MODULE, shape_mismatch, try_import
from ..backends.base import BackendUnavailable, RequestRefused
from .aiter_adapter import PTS, PTS_PARAMS, PtsAdapter, read_caps
from .aiter_probe import LAYOUTS, compare, probe_requests
from .request import RopeRequest

__all__ = ["RopeAiterBackend"]

logger = logging.getLogger(__name__)


def _csrc_dir() -> str | None:
    core, _ = try_import("aiter.jit.core")
    return getattr(core, "AITER_CSRC_DIR", None)


class RopeAiterBackend:
    """aiter's pts entry behind the :class:`~qknorm.backends.base.Backend` protocol for ``qk_norm_rope``.

    Parameters
    ----------
    device_types : tuple of str
        Device types whose tensors may be handed to aiter: ``("cuda",)`` (ROCm builds of PyTorch
        call their GPUs ``cuda``). :mod:`qknorm.testing.fake_aiter_rope` adds ``"cpu"``.
    """

    name = "aiter"

    def __init__(self, device_types: tuple[str, ...] = ("cuda",)) -> None:
        self.device_types = tuple(device_types)
        self._lock = threading.RLock()
        self._bound = False
        self._absent: str | None = None
        self._broken: str | None = None
        self._version = "unknown version"
        self._location = ""
        self._adapter: PtsAdapter | None = None
        self._probes: dict[tuple[object, ...], tuple[str, str | None]] = {}  # key -> (kind, mismatch)
        self._refused: dict[tuple[object, ...], tuple[str, str]] = {}  # key -> (kind, why)

    def _bind(self) -> None:
        with self._lock:
            if self._bound:
                return
            self._bound = True
            try:
                if importlib.util.find_spec("aiter") is None:
                    self._absent = "aiter is not installed"
                    return
                caps = aiter_caps(importlib.import_module("aiter"))
                self._version, self._location = caps.version, caps.location
                module, why = try_import(ROPE_MODULE)
            except (Exception, SystemExit) as exc:
                self._broken = f"import aiter raised {type(exc).__name__}: {exc}"
                return
            fn = getattr(module, PTS, None) if module is not None else None
            if fn is None:
                self._broken = f"aiter {self._version}: " + (why or f"{ROPE_MODULE} has no {PTS}")
                return
            mismatch = shape_mismatch(fn, PTS_PARAMS)
            if mismatch is not None:
                self._broken = f"aiter {self._version}: {ROPE_MODULE}.{PTS} {mismatch}"
                return
            self._adapter = PtsAdapter(ROPE_MODULE, fn, read_caps(fn, _csrc_dir()))

    def available(self) -> tuple[bool, str]:
        """Import aiter and bind the pts entry (once); raises BackendUnavailable when it is broken."""
        self._bind()
        if self._absent is not None:
            return False, self._absent
        if self._broken is not None or self._adapter is None:
            raise BackendUnavailable(self._broken or "aiter's pts entry is not bound")
        return True, f"aiter {self._version}: {PTS} ({self._adapter.caps.generation()})"

    def supports(self, req: RopeRequest) -> str | None:
        self._bind()
        adapter = self._adapter
        if adapter is None:
            return self._absent or self._broken or "aiter is not bound"
        dev = req.device
        if dev.type not in self.device_types:
            return f"aiter runs on {'/'.join(self.device_types)} devices, the request is on {dev.type}"
        if dev.type == "cuda" and torch.version.hip is None:
            return "aiter needs a ROCm build of PyTorch"
        refused = self._refused.get(req.key())
        if refused is not None:
            return refused[1]
        plan = req.plan
        return (
            adapter.kind_unsupported(plan) or adapter.inputs_unsupported(plan) or self._behaviour(adapter, req)
            or adapter.layout_unsupported(plan)
        )  # fmt: skip

    def _behaviour(self, adapter: PtsAdapter, req: RopeRequest) -> str | None:
        """The probe's verdict on ``req``'s kind (run once per kind and device; never during capture or tracing)."""
        key = req.key()
        with self._lock:
            done = self._probes.get(key)
            if done is None:
                if capturing(req.device):
                    return "aiter's behavioural probe for this kind has not run; call qknorm.warmup_qk_norm_rope first"
                try:
                    done = (req.describe(), self._run_probe(adapter, req))
                except BackendUnavailable:
                    return None  # not a verdict: run() meets the build failure and reports it
                self._probes[key] = done
        return None if done[1] is None else f"behavioural probe: {done[1]}"

    def _probe_layout(self, adapter: PtsAdapter, req: RopeRequest, layout: str) -> str | None:
        actual, expected = probe_requests(req.plan, layout)
        try:
            adapter.run(actual)
        except Exception as exc:
            if not adapter.proven and is_build_failure(exc):
                raise BackendUnavailable(f"{adapter.entry} failed to build or load on first use: {exc}") from exc
            logger.error("aiter %s raised %s: %s in the behavioural probe of %s (%s cache)", self._version,
                         type(exc).__name__, exc, req.describe(), layout)  # fmt: skip
            return f"{adapter.entry} raised {type(exc).__name__}: {exc}"
        adapter.proven = True
        return compare(actual, expected)

    def _run_probe(self, adapter: PtsAdapter, req: RopeRequest) -> str | None:
        layouts = LAYOUTS[adapter.layout] if req.plan.has_cache else ("contiguous",)
        for layout in layouts:
            why = self._probe_layout(adapter, req, layout)
            if why is None:
                continue
            if layout == "contiguous":
                logger.warning("aiter %s differs from the reference on %s: %s; qknorm serves this kind with the "
                               "next backend", self._version, req.describe(), why)  # fmt: skip
                return why
            logger.warning("aiter %s writes a %s cache wrong (%s) although its sources say it addresses %s caches; "
                           "qknorm sends it contiguous caches only", self._version, layout, why, adapter.layout)  # fmt: skip
            adapter.layout = "contiguous"
            break
        return None

    def run(self, req: RopeRequest) -> None:
        """Serve ``req`` through aiter.

        Raises BackendUnavailable for a first-use build failure and RequestRefused when aiter
        raised synchronously (``retry`` False on an in-place request).
        """
        adapter = self._adapter
        if adapter is None:
            raise RuntimeError(f"aiter cannot serve this request: {self.supports(req)}")
        device = req.device
        try:
            if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    adapter.run(req)
            else:
                adapter.run(req)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if not adapter.proven and is_build_failure(exc):
                raise BackendUnavailable(f"{adapter.entry} failed to build or load on first use: {exc}") from exc
            raise self._refuse(adapter, req, exc) from exc
        adapter.proven = True

    def _refuse(self, adapter: PtsAdapter, req: RopeRequest, exc: Exception) -> RequestRefused:
        what = req.describe()
        why = f"aiter {self._version} raised {type(exc).__name__} for this kind ({adapter.entry}): {exc}"
        with self._lock:
            first = req.key() not in self._refused
            self._refused[req.key()] = (what, why)
        if first:
            logger.error("aiter %s raised %s: %s for %s (%s), a kind qknorm believed it supports; qknorm serves this "
                         "kind with the next backend from now on", self._version, type(exc).__name__, exc, what,
                         adapter.entry)  # fmt: skip
        for out, inp, label in ((req.q_out, req.q, "q_out is q"), (req.k_out, req.k, "k_out is k")):
            if out is not None and out.data_ptr() == inp.data_ptr():
                return RequestRefused(
                    f"aiter {self._version} raised {type(exc).__name__}: {exc} on an in-place request ({label}): the "
                    f"input may already be overwritten, so qknorm cannot serve this call elsewhere; later calls of this "
                    f"kind ({what}) go to the next backend",
                    retry=False,
                )
        return RequestRefused(why)

    def describe(self) -> dict[str, Any]:
        """What was bound, the probe verdicts and refused kinds (``python -m qknorm backends``)."""
        self._bind()
        if self._absent is not None:
            return {}
        info: dict[str, Any] = {"aiter": f"{self._version} at {self._location}"}
        if self._adapter is not None:
            info[f"bound: {PTS}"] = f"{self._adapter.entry}: {self._adapter.features()}"
        else:
            info["not bound"] = self._broken or "aiter is not bound"
        info["not bound: fused_qk_norm_rope_cache_quant_shuffle"] = (
            "writes only aiter's 5-D shuffle cache with dynamic per-token scales (no NHD request)")  # fmt: skip
        with self._lock:
            for _, (what, mismatch) in self._probes.items():
                info[f"probe: {what}"] = "matches the reference" if mismatch is None else mismatch
            for what, why in self._refused.values():
                info[f"refused: {what}"] = why
        info["devices"] = "/".join(self.device_types)
        return info
