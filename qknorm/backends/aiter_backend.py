"""Backend ``aiter``: AMD's aiter kernels, bound by feature detection on first use.

aiter's fused Q/K RMSNorm has had four entry points and, behind the same names, several sets
of argument checks and one changed rounding rule; ``docs/aiter.md`` has the table of
generations with commits and dates. qknorm binds every entry the installed aiter has
(:mod:`qknorm.backends.aiter_binding`) and sends a request to the newest one that computes it as
SPEC §4 says and whose checks it passes (:mod:`qknorm.backends.aiter_adapters`); anything else
is declared unsupported and goes to the next backend, never to aiter.

Three lines of defence, in order:

1. ``supports()`` encodes every C++ argument check of the bound generation. From aiter #3137
   on, a failed check calls ``std::abort()``: it must never be reached.
2. A behavioural probe (:mod:`qknorm.backends.aiter_probe`) runs a small fixed input through
   aiter once per entry and request kind on a device, at selection time (so ``qknorm.warmup``
   runs it, never CUDA-graph capture or tracing), and compares with the reference. A mismatch
   marks the kind unsupported with what differed.
3. An exception aiter raises synchronously for a kind ``supports()`` accepted is a qknorm bug:
   it is logged once with aiter's version and the kind, the kind goes to the next backend from
   then on (:class:`~qknorm.backends.base.RequestRefused`), and the call is served there; an
   in-place request, whose input aiter may already have overwritten, raises instead.

qknorm's own rules on top of aiter's checks: widths a multiple of 8 (aiter's vector stores
bound a row at its width rounded up to 4 bytes and never check it: an odd fp16/bf16 width, or
an FP8 width off a multiple of 4, would write past the row); 16-byte aligned tensors, which its
16-byte vector loads are written for but never check (misaligned ones go through a copy).

Nothing here imports aiter until :meth:`AiterBackend.available` is called (first use).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import subprocess
import threading
from typing import Any

import torch

from ..quant import FP8_DTYPES, fp8_dtype_for_arch
from ..request import QKNormRequest
from .aiter_adapters import Adapter, AiterCaps, widths_unsupported
from .aiter_binding import BINDERS, GQ_MODULE, ROPE_MODULE, try_import
from .aiter_probe import compare, probe_requests
from .base import BackendUnavailable, RequestRefused

__all__ = ["AiterBackend", "GENERATIONS"]

logger = logging.getLogger(__name__)

GENERATIONS = tuple(name for name, _ in BINDERS)  # newest first
# qknorm's own rule (see the module docstring): aiter rounds a row's store bound up to 4 bytes.
_WIDTH_MULTIPLE = 8


def aiter_caps(aiter: Any) -> AiterCaps:
    version = getattr(aiter, "__version__", None)
    for dist in ("amd-aiter", "aiter"):
        if version is None:
            try:
                version = importlib.metadata.version(dist)
            except Exception:
                pass
    dtypes = getattr(aiter, "dtypes", None)
    if dtypes is None:
        dtypes, _ = try_import("aiter.utility.dtypes")
    fp8 = getattr(dtypes, "fp8", None)
    fp4x2 = getattr(dtypes, "fp4x2", None)
    real_fp4 = getattr(torch, "float4_e2m1fn_x2", None)
    return AiterCaps(
        version=str(version or "unknown version"),
        location=str(getattr(aiter, "__file__", None) or "unknown location"),
        fp8=fp8 if fp8 in FP8_DTYPES else None,
        fp4x2=fp4x2 if real_fp4 is not None and fp4x2 == real_fp4 else None,
    )


def _arch_fp8(device: torch.device) -> torch.dtype | None:
    """The FP8 flavour of a ROCm GPU from its architecture, for an aiter that does not say."""
    if device.type != "cuda" or torch.version.hip is None:
        return None
    return fp8_dtype_for_arch(str(getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")))


def is_build_failure(exc: BaseException) -> bool:
    """aiter's JIT build failure (``RuntimeError("[aiter] build [module] ... failed")``) or a .so that won't load."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (subprocess.CalledProcessError, ImportError, OSError)):
            return True
        if isinstance(e, RuntimeError) and re.search(r"\bbuild\b.*\bfail", str(e), re.IGNORECASE):
            return True
        e = e.__cause__ or e.__context__
    return False


def _in_place(req: QKNormRequest) -> str | None:
    """The supported in-place forms (an output that is an input): aiter may have overwritten the input."""
    outputs = {"q_out": req.q_out, "k_out": req.k_out, "q_res_out": req.q_res_out}
    inputs = {"q": req.q, "k": req.k, "q_residual": req.q_residual}
    for oname, out in outputs.items():
        for iname, inp in inputs.items():
            if out is not None and inp is not None and out.data_ptr() == inp.data_ptr():
                return f"{oname} is {iname}"
    return None


def kind(req: QKNormRequest) -> str:
    """A request kind in words (what :meth:`QKNormRequest.key` captures)."""
    quant = req.mode.value if req.quant_dtype is None else f"{req.mode.value} ({req.quant_dtype})"
    if req.mode.value in ("fp8_group", "mxfp4"):
        quant += f" group {req.group_size}" + (" transposed scales" if req.transpose_scale else "")
    extras = [s for s, on in (("residual", req.q_residual is not None), ("gemma", req.gemma)) if on]
    k = f", k [*, {req.n2}]" if req.has_k else ""
    return f"{quant}: q [*, {req.n1}]{k} {req.dtype} on {req.device}" + (f" with {', '.join(extras)}" if extras else "")


def _probe_key(adapter: Adapter, req: QKNormRequest) -> tuple[object, ...]:
    """What a probe result depends on: the entry and the request kind without its widths."""
    return (adapter.generation, req.device.type, req.device.index, req.dtype, req.mode, req.quant_dtype,
            req.group_size, req.has_k, req.q_residual is not None, req.q_out is not None, req.gemma,
            req.transpose_scale)  # fmt: skip


def capturing(device: torch.device) -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class AiterBackend:
    """aiter's fused Q/K RMSNorm kernels behind the :class:`~qknorm.backends.base.Backend` protocol.

    Parameters
    ----------
    device_types : tuple of str
        Device types whose tensors may be handed to aiter: ``("cuda",)`` (ROCm builds of
        PyTorch call their GPUs ``cuda``). :mod:`qknorm.testing.fake_aiter` adds ``"cpu"`` to
        run the adapters against a fake aiter package.
    """

    name = "aiter"

    def __init__(self, device_types: tuple[str, ...] = ("cuda",)) -> None:
        self.device_types = tuple(device_types)
        self._lock = threading.Lock()
        self._probe_lock = threading.RLock()
        self._probed = False
        self._absent: str | None = None  # not installed: quietly unavailable
        self._broken: str | None = None  # installed but unusable: BackendUnavailable
        self.aiter_caps: AiterCaps | None = None
        self._adapters: list[Adapter] = []
        self._notes: list[str] = []  # why each unbound generation did not bind
        self._routes: dict[tuple[object, ...], Adapter] = {}
        self._probes: dict[tuple[object, ...], tuple[str, str | None]] = {}  # probe key -> (kind, mismatch)
        self._refused: dict[tuple[object, ...], tuple[str, str]] = {}  # request key -> (kind, why)

    def _probe(self) -> None:
        with self._lock:
            if self._probed:
                return
            self._probed = True
            try:
                if importlib.util.find_spec("aiter") is None:
                    self._absent = "aiter is not installed"
                    return
                aiter = importlib.import_module("aiter")
                self.aiter_caps = aiter_caps(aiter)
                gq, gq_why = try_import(GQ_MODULE)
                rope, rope_why = try_import(ROPE_MODULE)
            except (Exception, SystemExit) as exc:
                self._broken = f"import aiter raised {type(exc).__name__}: {exc}"
                return
            for generation, binder in BINDERS:
                try:
                    result = binder(gq, gq_why, rope, rope_why)
                except Exception as exc:
                    result = f"binding raised {type(exc).__name__}: {exc}"
                if isinstance(result, str):
                    self._notes.append(f"{generation}: {result}")
                else:
                    self._adapters.append(result)
            if not self._adapters:
                self._broken = (
                    f"aiter {self.aiter_caps.version} has no usable fused Q/K RMSNorm entry ({'; '.join(self._notes)})"
                )

    def available(self) -> tuple[bool, str]:
        """Import aiter and bind every generation found (once); raises BackendUnavailable when it is broken."""
        self._probe()
        if self._absent is not None:
            return False, self._absent
        if self._broken is not None:
            raise BackendUnavailable(self._broken)
        return True, f"aiter {self._version}: bound {', '.join(a.generation for a in self._adapters)}"

    @property
    def _version(self) -> str:
        return self.aiter_caps.version if self.aiter_caps is not None else "unknown version"

    def _fp8(self, device: torch.device) -> torch.dtype | None:
        reported = self.aiter_caps.fp8 if self.aiter_caps is not None else None
        return reported if reported is not None else _arch_fp8(device)

    def _common_unsupported(self, req: QKNormRequest) -> str | None:
        dev = req.device
        if dev.type not in self.device_types:
            return f"aiter runs on {'/'.join(self.device_types)} devices, the request is on {dev.type}"
        if dev.type == "cuda" and torch.version.hip is None:
            return "aiter needs a ROCm build of PyTorch"
        for name, width in (("n1", req.n1), ("n2", req.n2)):
            if width % _WIDTH_MULTIPLE:
                return f"qknorm sends aiter widths that are multiples of {_WIDTH_MULTIPLE}, {name}={width}"
        refused = self._refused.get(req.key())
        return refused[1] if refused is not None else widths_unsupported(req)

    def supports(self, req: QKNormRequest) -> str | None:
        self._probe()
        if not self._adapters or self.aiter_caps is None:
            return self._absent or self._broken or "aiter is not bound"
        why = self._common_unsupported(req)
        if why is not None:
            return why
        fp8 = self._fp8(req.device) if req.mode.is_fp8 else None
        reasons: dict[str, list[str]] = {}  # reason -> generations giving it
        for adapter in self._adapters:
            why = adapter.supports(req, self.aiter_caps, fp8) or self._behaviour(adapter, req)
            if why is None:
                self._routes[req.key()] = adapter
                return None
            reasons.setdefault(why, []).append(adapter.generation)
        return "; ".join(f"{', '.join(gens)}: {why}" for why, gens in reasons.items())

    def _behaviour(self, adapter: Adapter, req: QKNormRequest) -> str | None:
        """The probe's verdict for ``adapter`` on ``req``'s kind (run once; never during capture or tracing)."""
        key = _probe_key(adapter, req)
        with self._probe_lock:
            done = self._probes.get(key)
            if done is None:
                if capturing(req.device):
                    return "aiter's behavioural probe for this kind has not run; call qknorm.warmup before capture"
                try:
                    done = (kind(req), self._run_probe(adapter, req))
                except BackendUnavailable:
                    return None  # not a verdict: run() meets the build failure and reports it as such
                self._probes[key] = done
        return None if done[1] is None else f"behavioural probe: {done[1]}"

    def _run_probe(self, adapter: Adapter, req: QKNormRequest) -> str | None:
        actual, expected = probe_requests(req)
        try:
            adapter.run(actual, self.aiter_caps)  # type: ignore[arg-type]
        except Exception as exc:
            if not adapter.proven and is_build_failure(exc):
                raise BackendUnavailable(
                    f"{adapter.entry} failed to build or load on first use: {type(exc).__name__}: {exc}"
                ) from exc
            logger.error("aiter %s raised %s: %s in the behavioural probe of %s (%s); qknorm serves this kind "
                         "with the next backend", self._version, type(exc).__name__, exc, kind(req), adapter.entry)  # fmt: skip
            return f"{adapter.entry} raised {type(exc).__name__}: {exc}"
        adapter.proven = True
        why = compare(actual, expected)
        if why is not None:
            logger.warning("aiter %s differs from the reference on %s (%s): %s; qknorm serves this kind with the "
                           "next backend", self._version, kind(req), adapter.entry, why)  # fmt: skip
        return why

    def run(self, req: QKNormRequest) -> None:
        """Call the bound generation serving ``req``.

        Raises BackendUnavailable for a first-use build failure and RequestRefused when aiter
        raised synchronously (the kind is refused from then on; ``retry`` False on an in-place
        request, whose input aiter may already have overwritten).
        """
        adapter = self._routes.get(req.key())
        if adapter is None:
            why = self.supports(req)
            if why is not None:
                raise RuntimeError(f"aiter cannot serve this request: {why}")
            adapter = self._routes[req.key()]
        try:
            adapter.run(req, self.aiter_caps)  # type: ignore[arg-type]
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if not adapter.proven and is_build_failure(exc):
                raise BackendUnavailable(
                    f"{adapter.entry} failed to build or load on first use: {type(exc).__name__}: {exc}"
                ) from exc
            raise self._refuse(adapter, req, exc) from exc
        adapter.proven = True

    def _refuse(self, adapter: Adapter, req: QKNormRequest, exc: Exception) -> RequestRefused:
        """Record and log (once per kind) that aiter raised on a kind qknorm believed it supports."""
        what = kind(req)
        why = f"aiter {self._version} raised {type(exc).__name__} for this kind ({adapter.entry}): {exc}"
        with self._probe_lock:
            first = req.key() not in self._refused
            self._refused[req.key()] = (what, why)
            self._routes.pop(req.key(), None)
        if first:
            logger.error("aiter %s raised %s: %s for %s (%s), a request kind qknorm believed it supports; qknorm "
                         "serves this kind with the next backend from now on", self._version, type(exc).__name__,
                         exc, what, adapter.entry)  # fmt: skip
        aliased = _in_place(req)
        if aliased is not None:
            return RequestRefused(
                f"aiter {self._version} raised {type(exc).__name__}: {exc} on an in-place request ({aliased}): the "
                "input may already be overwritten, so qknorm cannot serve this call elsewhere; later calls of this "
                f"kind ({what}) go to the next backend",
                retry=False,
            )
        return RequestRefused(why)

    def describe(self) -> dict[str, str]:
        """What the probe found: aiter's version and location, each bound generation, probe verdicts, refusals."""
        self._probe()
        info: dict[str, str] = {}
        if self._absent is not None:
            return info
        if self.aiter_caps is not None:
            info["aiter"] = f"{self.aiter_caps.version} at {self.aiter_caps.location}"
            info["fp8 dtype"] = str(self.aiter_caps.fp8) if self.aiter_caps.fp8 is not None else "not reported"
            info["fp4x2 dtype"] = str(self.aiter_caps.fp4x2) if self.aiter_caps.fp4x2 is not None else "none"
        for i, a in enumerate(self._adapters):
            label = "bound (preferred)" if i == 0 else "bound"
            info[f"{label}: {a.generation}"] = f"{a.entry} (aiter {a.since}): {a.features()}"
        for note in self._notes:
            generation, _, why = note.partition(": ")
            info[f"not bound: {generation}"] = why
        with self._probe_lock:
            for key, (what, mismatch) in self._probes.items():
                info[f"probe {key[0]}: {what}"] = "matches the reference" if mismatch is None else mismatch
            for what, why in self._refused.values():
                info[f"refused: {what}"] = why
        info["devices"] = "/".join(self.device_types)
        return info
