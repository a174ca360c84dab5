"""Launching the compiled Triton kernel: by parameter name, and directly once compiled.

The first call of a (configuration, strides) signature goes through Triton's own
``kernel[grid](**arguments)``, which compiles on first use and returns the compiled kernel.
Later calls with 16-byte aligned pointers launch that kernel directly through the C launch
entry of Triton's launcher with integer pointers (:func:`bind_direct`). Triton's own path
re-derives the specialization of every argument and asks the driver about every pointer on each
call: measured on an H100 host, ``TritonBackend.run`` at M = 1 went from 42 µs to 21 µs per call
with the direct launch, so a Triton version without it is logged once at WARNING.

The direct launch reads private fields of Triton's compiled-kernel launcher, which is why it is
enabled for the Triton versions it was written against only (:data:`DIRECT_VERSIONS`, CUDA).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DIRECT_VERSIONS", "PDL_OFF", "PDL_TRIGGER", "PDL_WAIT", "PlannedLaunches", "availability",
           "device_unsupported", "direct_launch_supported", "bind_direct", "is_build_failure", "launch_options",
           "pdl_enabled", "pdl_supported", "set_pdl"]

logger = logging.getLogger(__name__)

# Triton versions whose launcher layout ``bind_direct`` was written against (and tested on).
DIRECT_VERSIONS = ("3.6.",)

_warned: set[str] = set()

# Programmatic dependent launch (the kernels' PDL argument). A kernel launched with CUDA's
# programmatic stream serialization attribute may start while the kernel before it in the stream
# still runs; its programs wait for that kernel's completion (``griddepcontrol.wait``) before
# they read or write anything, so the launch and the programs' dispatch overlap the end of the
# previous kernel instead of following it.
PDL_OFF = 0  # a plain launch
PDL_TRIGGER = 1  # each program, once the previous kernel has completed, lets the next kernel launch too
PDL_WAIT = 2  # the next kernel may launch as this one's programs exit (they do not signal it earlier)

_pdl = False


def set_pdl(enabled: bool) -> None:
    """Launch qknorm's Triton kernels with programmatic dependent launch (NVIDIA sm_90+), or stop.

    Off by default. With it, a kernel is launched while the kernel before it in the stream may
    still be running and waits on the device for that kernel's completion before it reads or
    writes anything, so its launch latency overlaps the previous kernel's end. A kernel after a
    qknorm kernel starts early only if it was launched with the same attribute, whose contract
    is that it waits likewise before touching what qknorm wrote. CUDA-graph capture keeps the
    dependency. It pays where kernels are short (decode) and the kernels around qknorm's are
    launched the same way: on an H200 the plain norm of one DeepSeek row took 0.96-1.01 µs per
    call instead of 1.41-1.42 in a chain of qknorm calls (commit 6fb506b, docs/benchmarks.md).
    Elsewhere (ROCm, GPUs before sm_90, the interpreter) it changes nothing.

    Call it before :func:`qknorm.warmup` and CUDA-graph capture: each launch configuration
    compiles a variant of its own, and the backends are chosen again after the change.

    Raises
    ------
    TypeError
        When ``enabled`` is not a bool.
    RuntimeError
        When it would change the setting while the current CUDA stream is capturing a graph:
        the backends would be chosen and the kernels compiled again inside the capture.
    """
    global _pdl
    if not isinstance(enabled, bool):
        raise TypeError(f"set_pdl: enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    if enabled != _pdl:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"set_pdl({enabled}): the current CUDA stream is capturing a graph; switch programmatic "
                "dependent launch before qknorm.warmup and capture, not during it"
            )  # fmt: skip
        _pdl = enabled
        from ..warmup import warmed
        from . import registry

        registry.reset()
        if warmed():
            logger.warning(
                "qknorm: set_pdl(%s) after qknorm.warmup: backends are chosen and kernels compiled again on "
                "their next call; warm up again before CUDA-graph capture", enabled,
            )  # fmt: skip


def pdl_enabled() -> bool:
    """Whether :func:`set_pdl` turned programmatic dependent launch on."""
    return _pdl


def launch_options(num_warps: int, maxnreg: int | None = None, pdl: int = PDL_OFF) -> dict[str, Any]:
    """Triton's launch options for a configuration, naming only those that are set.

    ``maxnreg`` (a register cap) and ``launch_pdl`` are options of Triton's CUDA backend; its AMD
    backend rejects an option it does not know (``KeyError``), so neither is passed where unset.
    """
    options: dict[str, Any] = {"num_warps": num_warps}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    if pdl != PDL_OFF:
        options["launch_pdl"] = True
    return options


def pdl_supported(device: torch.device, interpret: bool) -> bool:
    """Whether launches for tensors on ``device`` use programmatic dependent launch (on, and sm_90+ CUDA)."""
    return (
        _pdl and not interpret and device.type == "cuda" and torch.version.hip is None
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )  # fmt: skip


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def availability(load: Callable[[], bool]) -> tuple[bool, str]:
    """A Triton backend's ``available()``: ``load()`` imports its kernels and says whether they interpret."""
    try:
        import triton

        interpret = load()
    except Exception as exc:  # any import failure means unavailable
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if interpret:
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1)"
    import torch

    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on a GPU"
    return False, "no GPU (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"


def device_unsupported(device_type: str, interpret: bool) -> str | None:
    """Why a Triton backend cannot serve tensors on ``device_type`` (None when it can)."""
    if device_type == "cuda" or (device_type == "cpu" and interpret):
        return None
    if device_type == "cpu":
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
    return f"device type {device_type} is not supported by the Triton backend"


def direct_launch_supported(triton_version: str, hip: bool) -> bool:
    """Whether launches may bypass Triton's Python launcher; logs once (WARNING) when they may not."""
    if hip:
        _warn_once(
            "hip", "qknorm's Triton backend launches through Triton's Python launcher on ROCm "
            "(the direct launch is written for CUDA): about 2x the per-call host cost",
        )  # fmt: skip
        return False
    if not triton_version.startswith(DIRECT_VERSIONS):
        _warn_once(
            "version", "qknorm's direct Triton launch is written for Triton %s and disabled on Triton %s: "
            "every call goes through Triton's Python launcher, about 2x the per-call host cost",
            "/".join(v + "x" for v in DIRECT_VERSIONS), triton_version,
        )  # fmt: skip
        return False
    return True


def bind_direct(compiled: Any, tail: list[Any]) -> Callable[[int, int, list[Any]], None] | None:
    """A direct launcher ``fast(grid, stream, args)`` for one compiled kernel, or None (logged once).

    ``args`` are the kernel's runtime parameters in order, pointers as integers and absent
    tensors as None; ``tail`` its constexpr parameters in order (the launcher takes every
    parameter and ignores the constexpr ones, as in Triton's own launch). The
    compiled kernel is only valid for the specialization it was built for, so the caller keys it
    by the exact strides and which tensors are absent (the row and program counts are never
    specialized: the kernel lists them in ``do_not_specialize``) and uses it only for 16-byte
    aligned pointers (what the first, regular launch was specialized on), 32-bit row counts and
    no registered launch hooks (profilers).
    """
    launcher = getattr(compiled, "run", None)
    function, meta = getattr(compiled, "function", None), getattr(compiled, "packed_metadata", None)
    c_launch = getattr(launcher, "launch", None)
    if launcher is None or function is None:
        _warn_once("layout", "Triton's compiled kernel has no launcher fields qknorm knows: direct launch disabled "
                   "(every call goes through Triton's Python launcher, about 2x the per-call host cost)")  # fmt: skip
        return None
    if (
        c_launch is not None
        and getattr(launcher, "global_scratch_size", 1) == 0
        and getattr(launcher, "profile_scratch_size", 1) == 0
    ):
        coop, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl

        def fast(grid: int, stream: int, args: list[Any]) -> None:
            c_launch(grid, 1, 1, stream, function, coop, pdl, None, None, meta, None, None, None, *args, *tail)

    else:

        def fast(grid: int, stream: int, args: list[Any]) -> None:
            launcher(grid, 1, 1, stream, function, meta, None, None, None, *args, *tail)

    return fast


def is_build_failure(exc: BaseException) -> bool:
    """Compilation / resource failures (not interpreter or runtime errors): the backend cannot serve."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError
    except ImportError:
        return False
    return isinstance(exc, (CompilationError, OutOfResources, PTXASError))


# Call plans whose direct launch is kept (one per call signature; a serving process sees a few
# per layer shape and batch size). Past this many the memo starts over.
MAX_PLANNED = 1024


@dataclass(frozen=True)
class _Planned:
    """A direct launch of one call plan: every argument but the pointers, and where those go."""

    plan: object  # held, so that its id is not reused while the entry lives
    fast: Callable[[int, int, list[Any]], None]  # bind_direct's launcher
    grid: int
    args: list[Any]  # the kernel's arguments in order (pointers of the first call, as integers)
    slots: tuple[tuple[int, str], ...]  # (position in args, request attribute) per present tensor
    device: int | None


class PlannedLaunches:
    """Direct launches kept per call plan: later calls of a plan read only their pointers.

    A call plan (made once per call signature by :class:`qknorm.core.pipeline.Pipeline`) fixes
    everything but where the tensors are: shapes, strides, which tensors are present, the
    scalars, hence the launch configuration, the grid and every non-pointer argument of the
    compiled kernel. Plans are keyed by identity (two plans of different strides may compare
    equal); each entry holds its plan, so its id cannot be reused meanwhile.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, _Planned] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def clear(self) -> None:
        self._by_id.clear()

    def remember(self, plan: object, fast: Callable[[int, int, list[Any]], None], grid: int, args: list[Any],
                 slots: tuple[tuple[int, str], ...], device: int | None) -> None:  # fmt: skip
        """Keep ``plan``'s direct launch (``args`` with the pointers of the call that made it)."""
        if len(self._by_id) >= MAX_PLANNED:
            self._by_id.clear()
        self._by_id[id(plan)] = _Planned(plan, fast, grid, args, slots, device)

    def launch(self, req: Any, stream: Callable[[int | None], int], hooks: Any) -> bool:
        """Launch ``req`` as its plan's first direct launch did, with this call's pointers.

        False when it cannot, and the caller's regular path decides: no entry for the plan, a
        pointer not 16-byte aligned (the kernel was compiled for aligned ones), a launch hook
        (a profiler), or another current device.
        """
        plan = getattr(req, "plan", None)
        entry = self._by_id.get(id(plan))
        if entry is None or entry.plan is not plan:
            return False
        args = entry.args.copy()
        bits = 0
        for i, attr in entry.slots:
            p = args[i] = getattr(req, attr).data_ptr()
            bits |= p
        dev = entry.device
        if (
            bits & 15
            or hooks.launch_enter_hook.calls
            or hooks.launch_exit_hook.calls
            or (dev is not None and dev != torch.cuda.current_device())
        ):
            return False
        entry.fast(entry.grid, stream(dev), args)
        return True
