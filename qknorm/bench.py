"""Benchmark of the fused Q/K RMSNorm against its peers, in one process on one GPU.

``python -m qknorm bench`` and ``benchmarks/bench_qknorm.py`` call :func:`main`.

Shapes are DeepSeek MLA's: q ``[M, 1536]`` and k ``[M, 512]`` bf16, eps 1e-6, either contiguous
or split views of one ``[M, 2112]`` buffer (``strided``, as in the model). Each mode is timed for
qknorm (through the public ``fused_qk_rmsnorm``) and for the peers that compute the same outputs:

- ``norm``: two eager ``F.rms_norm`` calls, ``torch.compile`` of that pair, Liger-Kernel's
  RMSNorm twice (when ``liger_kernel`` is importable);
- ``fp8_group`` / ``fp8_token`` / ``mxfp4``: ``torch.compile`` of the norm plus the same
  quantization written in plain torch ops (SPEC §4 math), FP8 1x128 groups, one FP8 scale per
  row, MXFP4 with 32-column groups;
- every mode: ``copy``, a device copy of a buffer of half the op's bytes, so that it reads and
  writes exactly as many bytes as the op: the practical bandwidth ceiling. Both
  ``Tensor.copy_`` (``cudaMemcpyAsync``) and an elementwise copy kernel are timed, and the
  faster of the two is the ceiling (in a CUDA graph the memcpy can be the slower one).

``torch.compile`` peers are compiled for each shape (``dynamic=False``, the compiler's best case;
its caches are reset between shapes), default mode, and captured in the same CUDA graphs.

Two times per case, in microseconds:

- ``graph_us``: N calls captured in one CUDA graph, replayed; CUDA events around each replay,
  divided by N, median of the replays. The calls rotate over enough independent buffer sets that
  the sets together hold at least 3x the L2 cache (at most 16 sets), so large M runs from cold
  L2; at small M all sets fit in L2, as in decoding, where q and k were just written by the
  projection GEMM.
- ``eager_us``: wall clock of back-to-back calls through the public API with one synchronize per
  batch, divided by the calls in the batch, median of the batches: the host cost per call while
  the GPU keeps up (small M) and the device time once it does not (large M).

``gb_s`` is the op's bytes (inputs read + outputs written, each counted once, weights included)
over ``graph_us``; ``pct_of_copy`` is the copy's ``graph_us`` over the impl's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__, reference
from .backends.triton_launch import set_pdl
from .bench_report import (
    COPY,
    DEFAULT_M,
    FP8_GROUP,
    LAYOUTS,
    MODES,
    MXFP4_GROUP,
    N1,
    N2,
    QKNORM,
    QUICK_M,
    TORCH_EAGER,
    WIDTH,
    Row,
    buffer_sets,
    fmt,
    gb_per_s,
    markdown_tables,
    op_bytes,
    pct_of_copy,
    plot,
    targets_markdown,
    write_csv,
)
from .quant import AMAX_FLOOR, MXFP4_INV_MAX, QuantType, fp8_inv_max, fp8_max

__all__ = [
    "Effort",
    "FULL",
    "QUICK",
    "parse_args",
    "graph_time_us",
    "eager_time_us",
    "run_benchmark",
    "main",
]

logger = logging.getLogger(__name__)

EPS = 1e-6
_FP8_MAX = fp8_max(torch.float8_e4m3fn)
_FP8_INV_MAX = fp8_inv_max(torch.float8_e4m3fn)  # fl32(1/448), a Python float: torch.compile folds it
_QUANT_TYPE = {
    "norm": QuantType.No,
    "fp8_group": QuantType.per_1x128,
    "fp8_token": QuantType.per_Token,
    "mxfp4": QuantType.per_1x32,
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choice_list(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options of ``python -m qknorm bench`` (``--m``, ``--modes``, ``--layouts``, ``--out``, ``--quick``, ``--backend``,
    ``--pdl``)."""
    p = argparse.ArgumentParser(
        prog="qknorm bench",
        description="Time qknorm against its peers (CUDA-graph replay and eager per-call latency); "
        "write a CSV, a PNG plot and markdown tables.",
    )
    p.add_argument("--m", type=_int_list, default=None,
                   help=f"rows, comma-separated (default {','.join(map(str, DEFAULT_M))}; "
                   f"with --quick {','.join(map(str, QUICK_M))})")  # fmt: skip
    p.add_argument("--modes", type=_choice_list(MODES), default=MODES, help=f"subset of {','.join(MODES)}")
    p.add_argument("--layouts", type=_choice_list(LAYOUTS), default=LAYOUTS, help=f"subset of {','.join(LAYOUTS)}")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default ./bench-out)")
    p.add_argument("--quick", action="store_true", help="fewer M and repetitions (a smoke run, ~1 minute)")
    p.add_argument("--backend", default="triton",
                   help="qknorm backend to time (sets QKNORM_BACKEND for this process), or 'auto' for the "
                   "default priority (default triton)")  # fmt: skip
    p.add_argument("--pdl", action="store_true",
                   help="launch qknorm's Triton kernels with programmatic dependent launch (qknorm.set_pdl)")
    ns = p.parse_args(argv)
    if ns.m is None:
        ns.m = QUICK_M if ns.quick else DEFAULT_M
    return ns


# ---------------------------------------------------------------------------------------------
# Timing helpers (CUDA)
# ---------------------------------------------------------------------------------------------


def _calls(est_us: float, budget_us: float, sets: int, cap: int) -> int:
    """Calls that fill ``budget_us`` at ``est_us`` each, a multiple of ``sets``, at most ``cap``."""
    n = max(1, min(cap, round(budget_us / max(est_us, 0.5))))
    return max(sets, n - n % sets)


def graph_time_us(fns: Sequence[Callable[[], object]], calls: int, reps: int) -> float:
    """Median µs per call of ``calls`` calls (cycling over ``fns``) captured in one CUDA graph.

    ``fns`` run once on a side stream first (lazy initialization must not happen in capture).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(samples)


def eager_time_us(fns: Sequence[Callable[[], object]], calls: int, batches: int) -> float:
    """Median over ``batches`` of the wall µs per call of ``calls`` back-to-back calls and one sync."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(samples)


# ---------------------------------------------------------------------------------------------
# Cases and implementations
# ---------------------------------------------------------------------------------------------


@dataclass
class _Case:
    """One buffer set: inputs, and the outputs qknorm writes in place."""

    q: torch.Tensor
    k: torch.Tensor
    q_out: torch.Tensor  # normalized bf16, FP8 codes or packed E2M1 bytes
    q_scale: torch.Tensor | None
    k_out: torch.Tensor


def _make_case(m: int, layout: str, mode: str, device: torch.device, gen: torch.Generator) -> _Case:
    bf16 = torch.bfloat16
    if layout == "strided":
        latent = torch.randn(m, WIDTH, device=device, dtype=bf16, generator=gen)
        q, k = latent[:, :N1], latent[:, N1 : N1 + N2]
    else:
        q = torch.randn(m, N1, device=device, dtype=bf16, generator=gen)
        k = torch.randn(m, N2, device=device, dtype=bf16, generator=gen)
    k_out = torch.empty(m, N2, device=device, dtype=bf16)
    scale: torch.Tensor | None = None
    if mode == "norm":
        q_out = torch.empty(m, N1, device=device, dtype=bf16)
    elif mode == "mxfp4":
        q_out = torch.empty(m, N1 // 2, device=device, dtype=torch.uint8)
        scale = torch.empty(m, N1 // MXFP4_GROUP, device=device, dtype=torch.uint8)
    else:
        q_out = torch.empty(m, N1, device=device, dtype=torch.float8_e4m3fn)
        cols = N1 // FP8_GROUP if mode == "fp8_group" else 1
        scale = torch.empty(m, cols, device=device, dtype=torch.float32)
    return _Case(q, k, q_out, scale, k_out)


def _qknorm_call(c: _Case, wq: torch.Tensor, wk: torch.Tensor, mode: str) -> Callable[[], object]:
    from . import api

    qt = _QUANT_TYPE[mode]
    return lambda: api.fused_qk_rmsnorm(c.q_out, c.q_scale, c.q, wq, EPS, k_out=c.k_out, k=c.k, k_weight=wk,
                                        quant_type=qt)  # fmt: skip


# The peers in plain torch ops (SPEC §4 math), each its own function so torch.compile keeps a cache per peer.
def _peer_norm_pair(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return F.rms_norm(q, (q.shape[-1],), wq, EPS), F.rms_norm(k, (k.shape[-1],), wk, EPS)


def _peer_k(k: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    return _rms_fp32(k, wk).to(k.dtype)


def _rms_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()


def _fp8_quant(y: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = y.shape
    g = y.reshape(m, n // gs, gs)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) * _FP8_INV_MAX
    codes = (g / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return codes.reshape(m, n), scale.reshape(m, n // gs)


def _mxfp4_quant(y: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = y.shape
    g = y.reshape(m, n // gs, gs)
    bits = (g.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) * MXFP4_INV_MAX).view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    e = exponent + ((bits & 0x7FFFFF) != 0).logical_and(exponent != 255).to(torch.int32)  # ceil to a power of 2
    a = (g / (e << 23).view(torch.float32)).abs()
    # E2M1 round-to-nearest-even: ties go to the even code (0, 1, 2, 4, 6 -> codes 0, 2, 4, 6).
    code = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int() + (a > 2.5).int()
            + (a >= 3.5).int() + (a > 5.0).int()) | ((g < 0).int() << 3)  # fmt: skip
    pairs = code.reshape(m, n // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8), e.reshape(m, n // gs).to(torch.uint8)


def _peer_fp8_group(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (*_fp8_quant(_rms_fp32(q, wq), FP8_GROUP), _peer_k(k, wk))


def _peer_fp8_token(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (*_fp8_quant(_rms_fp32(q, wq), q.shape[-1]), _peer_k(k, wk))


def _peer_mxfp4(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (*_mxfp4_quant(_rms_fp32(q, wq), MXFP4_GROUP), _peer_k(k, wk))


_PEER_FN = {"norm": _peer_norm_pair, "fp8_group": _peer_fp8_group, "fp8_token": _peer_fp8_token, "mxfp4": _peer_mxfp4}
_PeerFactory = Callable[[_Case, torch.Tensor, torch.Tensor], Callable[[], object]]


def _liger_rms_norm() -> Callable[..., torch.Tensor] | None:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception as exc:  # any import failure means "not available", reported once
        logger.warning("Liger-Kernel is not importable (%s: %s): its RMSNorm is skipped", type(exc).__name__, exc)
        return None
    return LigerRMSNormFunction.apply  # type: ignore[no-any-return]


def _peers(mode: str, compiled: dict[str, Callable[..., object]], liger: Callable[..., torch.Tensor] | None
           ) -> dict[str, _PeerFactory]:  # fmt: skip
    """Peer name -> factory(case, wq, wk) -> zero-argument call, for one mode."""
    if mode not in compiled:
        compiled[mode] = torch.compile(_PEER_FN[mode], dynamic=False)
    fn_c = compiled[mode]
    peers: dict[str, _PeerFactory] = {}
    if mode == "norm":
        peers[TORCH_EAGER] = lambda c, wq, wk: lambda: _peer_norm_pair(c.q, c.k, wq, wk)
    peers["torch-compile"] = lambda c, wq, wk: lambda: fn_c(c.q, c.k, wq, wk)
    if mode == "norm" and liger is not None:
        lg = liger
        peers["liger"] = lambda c, wq, wk: lambda: (lg(c.q, wq, EPS, 0.0, "llama", False),
                                                     lg(c.k, wk, EPS, 0.0, "llama", False))  # fmt: skip
    return peers


def _check_qknorm(c: _Case, wq: torch.Tensor, wk: torch.Tensor, mode: str) -> str:
    """Compare qknorm's outputs (first 256 rows) with :mod:`qknorm.reference`; '' when they agree."""
    from . import testing

    rows = min(c.q.shape[0], 256)
    y = reference.rms_norm_fp32(c.q[:rows].float(), wq, EPS, False)
    try:
        yk = reference.rms_norm_fp32(c.k[:rows].float(), wk, EPS, False)
        testing.assert_norm_close(c.k_out[:rows], yk.to(c.k.dtype), "k_out")
        if mode == "norm":
            testing.assert_norm_close(c.q_out[:rows], y.to(c.q.dtype), "q_out")
        elif mode == "mxfp4":
            codes, scales = reference.mxfp4_quantize(y, MXFP4_GROUP)
            testing.assert_mxfp4_close(c.q_out[:rows], c.q_scale[:rows], codes, scales)  # type: ignore[index]
        else:
            gs = FP8_GROUP if mode == "fp8_group" else N1
            codes, scales = reference.fp8_quantize(y, gs, c.q_out.dtype)
            testing.assert_fp8_close(c.q_out[:rows], codes)
            testing.assert_scales_close(c.q_scale[:rows], scales)  # type: ignore[index]
    except AssertionError as exc:
        return f"CHECK FAILED vs reference: {str(exc).splitlines()[0]}"
    return ""


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Effort:
    """How long each measurement runs (device time per graph replay / eager batch, and counts)."""

    graph_budget_us: float  # device time one graph replay should take
    reps: int  # graph replays timed (median taken)
    eager_budget_us: float  # device time one eager batch should take
    batches: int  # eager batches timed (median taken)
    max_calls: int  # most calls in one graph


FULL = Effort(graph_budget_us=4000, reps=10, eager_budget_us=2000, batches=15, max_calls=1000)
QUICK = Effort(graph_budget_us=1000, reps=3, eager_budget_us=500, batches=5, max_calls=300)


@dataclass
class _Run:
    """What every case of one run shares."""

    device: torch.device
    gpu: str
    l2_bytes: int
    versions: tuple[str, str]  # torch, triton
    stamp: str
    effort: Effort
    wq: torch.Tensor
    wk: torch.Tensor
    gen: torch.Generator
    progress: Callable[[str], None]
    started: float
    compiled: dict[str, Callable[..., object]]
    liger: Callable[..., torch.Tensor] | None
    copies: dict[int, tuple[float | None, float | None, str]]  # op bytes -> copy ceiling


def _versions() -> tuple[str, str]:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    return torch.__version__, triton


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


def _measure(
    fns: Sequence[Callable[[], object]], graph_calls: int, eager_calls: int, effort: Effort
) -> tuple[float | None, float | None, str]:
    """(graph µs, eager µs, note): eager first (it also warms up and compiles), then the graph."""
    graph = eager = None
    note = ""
    try:
        eager = eager_time_us(fns, eager_calls, effort.batches)
        graph = graph_time_us(fns, graph_calls, effort.reps)
    except Exception as exc:  # a failing impl is a finding to report, not the end of the run
        note = f"{'graph' if eager is not None else 'eager'} failed: {_short(exc)}"
        logger.debug("measurement failed", exc_info=True)
    torch.cuda.synchronize()
    return graph, eager, note


def _served_by(c: _Case, wq: torch.Tensor, wk: torch.Tensor, mode: str) -> str:
    """The backend the registry selects for this case's request (raises when none can serve it)."""
    from .backends import registry
    from .checks import build_request
    from .quant import QuantMode

    if mode == "norm":
        req = build_request(q=c.q, q_weight=wq, q_epsilon=EPS, k=c.k, k_weight=wk, k_out=c.k_out,
                            q_out=c.q_out)  # fmt: skip
    else:
        qmode = {"fp8_group": QuantMode.FP8_GROUP, "fp8_token": QuantMode.FP8_TOKEN, "mxfp4": QuantMode.MXFP4}[mode]
        gs = {"fp8_group": FP8_GROUP, "mxfp4": MXFP4_GROUP}.get(mode)
        req = build_request(q=c.q, q_weight=wq, q_epsilon=EPS, k=c.k, k_weight=wk, k_out=c.k_out, mode=qmode,
                            group_size=gs, q_out_quantized=c.q_out, q_out_scale=c.q_scale)  # fmt: skip
    return registry.select(req).name


def _copy_ceiling(
    run: _Run, nbytes: int, sets: int, graph_calls: int, eager_calls: int
) -> tuple[float | None, float | None, str]:
    """The faster of ``Tensor.copy_`` and an elementwise copy kernel over ``nbytes / 2`` bytes."""
    words = -(-nbytes // 8)  # int32 words in half the bytes, rounded up
    bufs = [(torch.empty(words, dtype=torch.int32, device=run.device),
             torch.randint(-(2**31), 2**31 - 1, (words,), dtype=torch.int32, device=run.device, generator=run.gen))
            for _ in range(sets)]  # fmt: skip
    memcpy = _measure([_memcpy(d, s) for d, s in bufs], graph_calls, eager_calls, run.effort)
    kernel = _measure([_kernel_copy(d, s) for d, s in bufs], graph_calls, eager_calls, run.effort)
    graphs = [t for t in (memcpy[0], kernel[0]) if t is not None]
    eagers = [t for t in (memcpy[1], kernel[1]) if t is not None]
    note = f"graph/eager µs: copy_ {fmt(memcpy[0])}/{fmt(memcpy[1])}, elementwise {fmt(kernel[0])}/{fmt(kernel[1])}"
    failed = "; ".join(n for n in (memcpy[2], kernel[2]) if n)
    return min(graphs, default=None), min(eagers, default=None), f"{note}; {failed}" if failed else note


def _memcpy(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], object]:
    return lambda: dst.copy_(src)


def _kernel_copy(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], object]:
    # x | 0 == x: an elementwise kernel on the SMs that reads and writes every byte once.
    return lambda: torch.bitwise_or(src, 0, out=dst)


def _spin_up(device: torch.device, seconds: float = 0.5) -> None:
    """Keep the GPU busy for a moment so that clocks have left their idle state before timing."""
    a = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            b.copy_(a)
        torch.cuda.synchronize(device)


def _bench_case(run: _Run, m: int, layout: str, mode: str, tag: str) -> list[Row]:
    """Rows of the copy ceiling, qknorm and every peer for one (M, layout, mode)."""
    nbytes = op_bytes(m, mode)
    sets = buffer_sets(nbytes, run.l2_bytes)
    est_us = 1.5 + nbytes / 2.8e6  # at ~2.8 TB/s: only sizes the loops, never reported
    graph_calls = _calls(est_us, run.effort.graph_budget_us, sets, run.effort.max_calls)
    eager_calls = _calls(est_us, run.effort.eager_budget_us, sets, 100)
    rows: list[Row] = []

    def record(impl: str, graph: float | None, eager: float | None, note: str) -> None:
        copy_us = run.copies[nbytes][0]
        rows.append(Row(gpu=run.gpu, torch=run.versions[0], triton=run.versions[1], qknorm=__version__,
                        date=run.stamp, m=m, layout=layout, mode=mode, impl=impl, graph_us=graph, eager_us=eager,
                        bytes=nbytes, gb_s=gb_per_s(nbytes, graph), pct_of_copy=pct_of_copy(copy_us, graph),
                        buffer_sets=sets, note=note))  # fmt: skip
        run.progress(f"{tag} {time.perf_counter() - run.started:6.1f}s  M={m} {layout} {mode} {impl}: "
                     f"graph {fmt(graph)} µs, eager {fmt(eager)} µs  {note}".rstrip())  # fmt: skip

    if nbytes not in run.copies:
        run.copies[nbytes] = _copy_ceiling(run, nbytes, sets, graph_calls, eager_calls)
    record(COPY, *run.copies[nbytes])

    cases = [_make_case(m, layout, mode, run.device, run.gen) for _ in range(sets)]
    try:
        ours = f"{QKNORM}-{_served_by(cases[0], run.wq, run.wk, mode)}"
    except Exception as exc:  # e.g. the forced backend cannot serve this mode
        record(QKNORM, None, None, f"no backend: {_short(exc)}")
    else:
        graph, eager, note = _measure([_qknorm_call(c, run.wq, run.wk, mode) for c in cases], graph_calls,
                                      eager_calls, run.effort)  # fmt: skip
        if eager is not None:
            note = "; ".join(n for n in (note, _check_qknorm(cases[0], run.wq, run.wk, mode)) if n)
        record(ours, graph, eager, note)

    for name, factory in _peers(mode, run.compiled, run.liger).items():
        record(name, *_measure([factory(c, run.wq, run.wk) for c in cases], graph_calls, eager_calls, run.effort))
    return rows


def run_benchmark(
    ms: Sequence[int],
    modes: Sequence[str] = MODES,
    layouts: Sequence[str] = LAYOUTS,
    effort: Effort = FULL,
    progress: Callable[[str], None] = logger.info,
    device: torch.device | None = None,
    checkpoint: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Measure every (M, layout, mode) for the copy ceiling, qknorm and its peers; one row each.

    qknorm runs on the backend the registry selects (set ``QKNORM_BACKEND`` and call
    ``registry.reset()`` first to force one), named in the ``impl`` column (``qknorm-triton``).
    An impl that fails (no backend, compile or capture error) gives a row with empty times and
    the error in ``note``; a qknorm output that disagrees with the reference is noted too.
    ``checkpoint(rows_so_far)`` is called after each M (to save partial results).
    """
    dev = device or torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    run = _Run(
        device=dev, gpu=props.name, l2_bytes=int(getattr(props, "L2_cache_size", 50 * 2**20)),
        versions=_versions(), stamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), effort=effort,
        wq=(1.0 + 0.1 * torch.randn(N1, device=dev, generator=gen)).to(torch.bfloat16),
        wk=(1.0 + 0.1 * torch.randn(N2, device=dev, generator=gen)).to(torch.bfloat16),
        gen=gen, progress=progress, started=time.perf_counter(), compiled={},
        liger=_liger_rms_norm() if "norm" in modes else None, copies={},
    )  # fmt: skip
    progress(f"{run.gpu}, L2 {run.l2_bytes >> 20} MiB, torch {run.versions[0]}, triton {run.versions[1]}")
    _spin_up(dev)
    rows: list[Row] = []
    total = len(ms) * len(layouts) * len(modes)
    i = 0
    with torch.no_grad():
        for m in ms:
            for layout in layouts:
                torch.compiler.reset()  # one static compile per shape; keeps dynamo under its recompile limit
                run.compiled.clear()
                for mode in modes:
                    i += 1
                    rows += _bench_case(run, m, layout, mode, f"[{i}/{total}]")
            torch.cuda.empty_cache()
            if checkpoint is not None:
                checkpoint(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qknorm bench``: measure, write CSV + PNG under ``--out``, print markdown; exit status."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("qknorm bench needs a CUDA or ROCm GPU; torch sees none", file=sys.stderr)
        return 2
    from .backends import registry

    if args.backend != "auto":
        if args.backend not in registry.backend_names():
            print(f"--backend must be one of {', '.join(registry.backend_names())} or auto, got {args.backend!r}",
                  file=sys.stderr)  # fmt: skip
            return 2
        os.environ[registry.ENV_VAR] = args.backend
        registry.reset()
        ok, why = registry.probe(args.backend)
        if not ok:
            print(f"qknorm backend {args.backend} is unavailable: {why}", file=sys.stderr)
            return 2
    set_pdl(args.pdl)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out / "bench_qknorm.csv", args.out / "bench_qknorm.png"
    rows = run_benchmark(args.m, args.modes, args.layouts, QUICK if args.quick else FULL, progress,
                         checkpoint=lambda so_far: write_csv(so_far, csv_path))  # fmt: skip
    write_csv(rows, csv_path)
    plotted = plot(rows, png_path)
    r0 = rows[0]
    pdl = ", programmatic dependent launch" if args.pdl else ""
    print(f"\n{r0.gpu}, torch {r0.torch}, triton {r0.triton}, qknorm {r0.qknorm}{pdl}, {r0.date}\n")
    print(markdown_tables(rows))
    print(targets_markdown(rows))
    print(f"\nwrote {csv_path}" + (f" and {png_path}" if plotted else " (no plot: matplotlib is not importable)"))
    return 0
