"""Per-call wall time of qknorm's eager entries, split into qknorm's Python, the launch and the GPU.

Per entry, DeepSeek shapes at M = 1 (q ``[1, 1536]`` and k ``[1, 512]``, bf16):

- ``python``: the public call with a backend whose ``run`` does nothing, so only qknorm's own
  Python (entry, plan lookup, aliasing check, backend selection) is timed. Runs on any device.
- ``call``: the public call with the backend qknorm selects (on a GPU: the Triton kernel),
  back-to-back calls, one synchronize per batch: the wall time an eager caller pays.
- ``launch``: ``call - python``, the backend's own host work and the kernel launch (at M = 1 the
  GPU finishes each kernel before the host has launched the next, so it adds nothing here).
- ``gpu``: the same call captured in a CUDA graph and replayed: the device time alone.
- ``rms_norm x2``: two eager ``F.rms_norm`` calls on the same tensors, the simplest peer (on
  contiguous tensors and on the split views); and
  ``empty triton``: a Triton kernel that does nothing, launched from Python.

Run::

    python benchmarks/eager_overhead.py            # CUDA if available, else CPU (python only)
    python benchmarks/eager_overhead.py --device cpu

Layouts: ``contiguous`` (q and k separate tensors) and ``split`` (views of one ``[1, 2112]``
latent, as the model passes them). Best of ``--repeats`` batches of ``--calls``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import qknorm
from qknorm.backends import registry
from qknorm.testing import backend_override

EPS = 1e-6


class _NullBackend:
    """Serves every request and does nothing: what is left of a call is qknorm's Python."""

    name = "null"

    def available(self) -> tuple[bool, str]:
        return True, "does nothing (overhead measurement)"

    def supports(self, req: object) -> str | None:
        return None

    def run(self, req: object) -> None:
        return None


def _best_us(fn: Callable[[], object], calls: int, repeats: int, sync: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def _graph_us(fn: Callable[[], object], calls: int = 200, reps: int = 20) -> float:
    """Device time per call: ``calls`` calls in one CUDA graph, median replay (after a warm call)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def _empty(x_ptr):  # type: ignore[no-untyped-def]
    """A Triton kernel body that does nothing (jitted on first use, on a GPU only)."""


def _empty_triton(device: torch.device) -> Callable[[], object]:
    import triton

    kernel = triton.jit(_empty)
    x = torch.empty(1, device=device)
    return lambda: kernel[(1,)](x)


def _calls(device: torch.device) -> dict[str, Callable[[], object]]:
    dt = torch.bfloat16
    latent = torch.randn(1, 2112, dtype=dt, device=device)
    q_c, k_c = latent[:, :1536].clone(), latent[:, 1536:2048].clone()
    wq, wk = torch.randn(1536, dtype=dt, device=device), torch.randn(512, dtype=dt, device=device)
    q_out, k_out = torch.empty_like(q_c), torch.empty_like(k_c)
    q_s, k_s = latent[:, :1536], latent[:, 1536:2048]  # split views of the latent, as a model passes them

    return {
        "fused_qk_rmsnorm contiguous": lambda: qknorm.fused_qk_rmsnorm(
            q_out, None, q_c, wq, EPS, k_out=k_out, k=k_c, k_weight=wk, k_epsilon=EPS
        ),
        "fused_qk_rmsnorm split": lambda: qknorm.fused_qk_rmsnorm(
            q_out, None, q_s, wq, EPS, k_out=k_out, k=k_s, k_weight=wk, k_epsilon=EPS
        ),
        "qk_rmsnorm contiguous": lambda: qknorm.qk_rmsnorm(q_c, wq, k_c, wk, q_epsilon=EPS),
        "qk_rmsnorm fp8_group contiguous": lambda: qknorm.qk_rmsnorm(q_c, wq, k_c, wk, quant="fp8_group"),
        "rms_norm x2": lambda: (F.rms_norm(q_c, (1536,), wq, EPS), F.rms_norm(k_c, (512,), wk, EPS)),
        "rms_norm x2 split": lambda: (F.rms_norm(q_s, (1536,), wq, EPS), F.rms_norm(k_s, (512,), wk, EPS)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    calls = _calls(device)

    previous = registry.register_backend("null", _NullBackend)
    try:
        with backend_override("null"):
            python = {name: _best_us(fn, args.calls, args.repeats, sync) for name, fn in calls.items() if "rms_norm" not in name}
    finally:
        registry.register_backend("null", previous)
    full: dict[str, float] = {}
    gpu: dict[str, float] = {}
    if device.type == "cuda":
        calls["empty triton"] = _empty_triton(device)
        full = {name: _best_us(fn, args.calls, args.repeats, sync) for name, fn in calls.items()}
        gpu = {name: _graph_us(fn) for name, fn in calls.items() if name != "empty triton"}

    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name_of}), torch {torch.__version__}, µs per call, best of {args.repeats} x {args.calls}")
    print(f"{'entry':36s} {'python':>8s} {'call':>8s} {'launch':>8s} {'gpu':>8s}")
    for name in calls:
        py, tot = python.get(name), full.get(name)
        launch = None if py is None or tot is None else tot - py
        cells = [f"{v:8.2f}" if v is not None else f"{'-':>8s}" for v in (py, tot, launch, gpu.get(name))]
        print(f"{name:36s} {' '.join(cells)}")
    if device.type == "cpu":
        print("(CPU: only qknorm's Python is timed; the other columns need a GPU)")


if __name__ == "__main__":
    main()
