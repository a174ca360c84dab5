"""Backend ``aiter``: AMD's aiter kernels, bound by feature detection on first use.

aiter's fused Q/K RMSNorm has had four shapes. qknorm binds to every one the installed aiter
has, checking module, symbol and signature shape (``inspect.signature``): in v0.1.14 aiter
moved its public 6-argument ``fused_qk_rmsnorm`` to a private name and reused the public name
for a new in-place entry, so a name alone proves nothing.

===========  ====================================================================  ========
generation   entry                                                                 since
===========  ====================================================================  ========
unified      ``aiter.ops.fused_qk_rmsnorm_group_quant.fused_qk_rmsnorm(q_out_       v0.1.14
             quantized, q_out_scale, q, ..., gemma_norm, quant_type, group_size,
             transpose_scale)`` with ``aiter.ops.enum.QuantType``
group_quant  ``aiter.ops.fused_qk_rmsnorm_group_quant.fused_qk_rmsnorm_group_quant``   v0.1.12
             (``gemma_norm`` since v0.1.13; ``fused_qk_rmsnorm_per_token_quant`` and
             ``q_out_scale=None`` no-quant mode since v0.1.14)
private      ``aiter.ops.fused_qk_norm_rope_cache_quant._fused_qk_rmsnorm(q_out, q,    v0.1.14
             q_weight, q_eps, k_out, k, k_weight, k_eps)``
legacy       ``aiter.ops.fused_qk_norm_rope_cache_quant.fused_qk_rmsnorm(q,           < v0.1.14
             q_weight, q_eps, k, k_weight, k_eps) -> (q_out, k_out)``
===========  ====================================================================  ========

A request goes to the newest bound generation that computes it as SPEC §4 says; anything
else is declared unsupported and goes to the next backend, never to aiter:

- per-tensor FP8 (aiter raises ``NotImplementedError``); FP8 of the other flavour than the
  one aiter writes on this GPU (``aiter.dtypes.fp8``: e4m3fnuz on MI300/gfx942, e4m3fn on
  MI350/gfx950); MXFP4 without a real ``float4_e2m1fn_x2`` dtype;
- a plain (no-quant) request with ``q_residual`` or ``gemma_norm``: aiter's no-quant path
  ignores both (SPEC §6);
- widths over 8192 (aiter's C++ check, which aborts the process) or not a multiple of 8 (its
  vector stores round the row's bound up to 4 bytes, so an odd width would write past the row);
  group sizes other than 32/64/128.

aiter writes scales by raw offset (``i * G + g``, or ``g * m + i`` transposed) and reads with
16-byte vectors, so scales in another layout, and tensors whose base or row stride is not
16-byte aligned, go through a temporary and a copy. On gfx942 aiter truncates bf16 outputs
where qknorm rounds to nearest-even: at most one bf16 ulp, inside the tolerance table.

Nothing here imports aiter until :meth:`AiterBackend.available` is called (first use).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import threading
from typing import Any

import torch

from ..quant import FP8_DTYPES
from ..request import QKNormRequest
from .aiter_adapters import BINDERS, GQ_MODULE, ROPE_MODULE, Adapter, AiterCaps, try_import
from .base import BackendUnavailable

__all__ = ["AiterBackend", "GENERATIONS"]

GENERATIONS = ("unified", "group_quant", "private", "legacy")  # newest first

# aiter's fused kernels: TORCH_CHECK(n1 <= 8192 && n2 <= 8192), which aborts the process when it fails.
_MAX_WIDTH = 8192
# Their vector stores bound each row at its width rounded up to 4 bytes: an odd fp16/bf16 width
# (or an FP8 width off a multiple of 4) would write past the row; 8 keeps MXFP4 bytes whole too.
_WIDTH_MULTIPLE = 8


def _caps(aiter: Any) -> AiterCaps:
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
    arch = str(getattr(torch.cuda.get_device_properties(device), "gcnArchName", ""))
    if arch.startswith("gfx94"):
        return torch.float8_e4m3fnuz
    if arch.startswith(("gfx95", "gfx12")):
        return torch.float8_e4m3fn
    return None


def _is_build_failure(exc: BaseException) -> bool:
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
        self._probed = False
        self._absent: str | None = None  # not installed: quietly unavailable
        self._broken: str | None = None  # installed but unusable: BackendUnavailable
        self._caps: AiterCaps | None = None
        self._adapters: list[Adapter] = []
        self._notes: list[str] = []  # why each unbound generation did not bind
        self._routes: dict[tuple[object, ...], Adapter] = {}

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
                self._caps = _caps(aiter)
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
                    f"aiter {self._caps.version} has no usable fused Q/K RMSNorm entry ({'; '.join(self._notes)})"
                )

    def available(self) -> tuple[bool, str]:
        """Import aiter and bind every generation found (once); raises BackendUnavailable when it is broken."""
        self._probe()
        if self._absent is not None:
            return False, self._absent
        if self._broken is not None:
            raise BackendUnavailable(self._broken)
        version = self._caps.version if self._caps is not None else "unknown version"
        return True, f"aiter {version}: bound {', '.join(a.generation for a in self._adapters)}"

    def _fp8(self, device: torch.device) -> torch.dtype | None:
        reported = self._caps.fp8 if self._caps is not None else None
        return reported if reported is not None else _arch_fp8(device)

    def supports(self, req: QKNormRequest) -> str | None:
        self._probe()
        if not self._adapters:
            return self._absent or self._broken or "aiter is not bound"
        dev = req.device
        if dev.type not in self.device_types:
            return f"aiter runs on {'/'.join(self.device_types)} devices, the request is on {dev.type}"
        if dev.type == "cuda" and torch.version.hip is None:
            return "aiter needs a ROCm build of PyTorch"
        for name, width in (("n1", req.n1), ("n2", req.n2)):
            if width > _MAX_WIDTH:
                return f"aiter's fused kernels take widths up to {_MAX_WIDTH}, {name}={width}"
            if width % _WIDTH_MULTIPLE:
                return f"aiter needs widths that are multiples of {_WIDTH_MULTIPLE}, {name}={width}"
        fp8 = self._fp8(dev) if req.mode.is_fp8 else None
        fp4x2 = self._caps.fp4x2 if self._caps is not None else None
        reasons: dict[str, list[str]] = {}  # reason -> generations giving it
        for adapter in self._adapters:
            why = adapter.supports(req, fp8, fp4x2)
            if why is None:
                self._routes[req.key()] = adapter
                return None
            reasons.setdefault(why, []).append(adapter.generation)
        return "; ".join(f"{', '.join(gens)}: {why}" for why, gens in reasons.items())

    def run(self, req: QKNormRequest) -> None:
        """Call the bound generation serving ``req``; a first-use build failure raises BackendUnavailable."""
        adapter = self._routes.get(req.key())
        if adapter is None:
            why = self.supports(req)
            if why is not None:
                raise RuntimeError(f"aiter cannot serve this request: {why}")
            adapter = self._routes[req.key()]
        try:
            adapter.run(req, self._caps)  # type: ignore[arg-type]
        except Exception as exc:
            if not adapter.proven and _is_build_failure(exc):
                raise BackendUnavailable(
                    f"{adapter.entry} failed to build or load on first use: {type(exc).__name__}: {exc}"
                ) from exc
            raise
        adapter.proven = True

    def describe(self) -> dict[str, str]:
        """What the probe found: aiter's version and location, each bound generation, what did not bind."""
        self._probe()
        info: dict[str, str] = {}
        if self._absent is not None:
            return info
        if self._caps is not None:
            info["aiter"] = f"{self._caps.version} at {self._caps.location}"
            info["fp8 dtype"] = str(self._caps.fp8) if self._caps.fp8 is not None else "not reported"
            info["fp4x2 dtype"] = str(self._caps.fp4x2) if self._caps.fp4x2 is not None else "none"
        for i, a in enumerate(self._adapters):
            label = "bound (preferred)" if i == 0 else "bound"
            info[f"{label}: {a.generation}"] = f"{a.entry} (aiter {a.since}): {a.features()}"
        for note in self._notes:
            generation, _, why = note.partition(": ")
            info[f"not bound: {generation}"] = why
        info["devices"] = "/".join(self.device_types)
        return info
