#!/usr/bin/env python3
"""Timing and tuning check of the Triton backend on one GPU (DeepSeek MLA shapes).

``python benchmarks/gpu_check_triton.py [--sweep MS] [--variants MS] [--out DIR] [--ms 1,16,256,4096,16384,65536]``

- Per-call wall time in eager mode (the Triton launch, ``TritonBackend.run`` on a built request,
  the public entries, and the validation / selection steps alone) at M = 1.
- CUDA-graph replay time per call of: a device copy of the bytes the norm moves (the ceiling),
  the fused norm on contiguous and on strided (``[M, 2112]`` split) inputs, and norm + FP8 1x128
  group quantization of q (codes, scales, k). Inputs rotate over enough buffer sets to leave L2
  cold once a set outgrows it; small M stays in L2 as in the peers' numbers.
- ``--sweep``: the same graph timing for a grid of launch configurations per M (tuning input
  for ``triton_backend._config``).

Writes ``triton_check.json`` (and prints tables) under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qknorm
from qknorm.backends import registry
from qknorm.backends import triton_backend as tb
from qknorm.bench import graph_time_us
from qknorm.checks import build_request
from qknorm.quant import QuantMode

N1, N2, WIDTH, EPS = 1536, 512, 2112, 1e-6
L2_COLD_BYTES = 200 << 20  # rotate buffer sets until this many bytes are touched per cycle


def graph_us(fns: Sequence[Callable[[], object]], calls: int, reps: int = 7) -> float:
    """Median µs per call of ``calls`` calls (cycling over ``fns``) replayed from one CUDA graph."""
    return graph_time_us(fns, calls, reps)


def wall_us(fn: Callable[[], object], calls: int = 3000, batches: int = 5) -> float:
    """Median wall µs per call of back-to-back eager calls (CPU-bound at M = 1)."""
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(samples)


class Buffers:
    """One DeepSeek buffer set: inputs (strided or contiguous) and the outputs of a mode."""

    def __init__(self, m: int, strided: bool, mode: str) -> None:
        dev, bf16 = torch.device("cuda"), torch.bfloat16
        if strided:
            latent = torch.randn(m, WIDTH, device=dev, dtype=bf16)
            self.q, self.k = latent[:, :N1], latent[:, N1 : N1 + N2]
        else:
            self.q = torch.randn(m, N1, device=dev, dtype=bf16)
            self.k = torch.randn(m, N2, device=dev, dtype=bf16)
        self.qw = torch.randn(N1, device=dev, dtype=bf16)
        self.kw = torch.randn(N2, device=dev, dtype=bf16)
        self.k_out = torch.empty(m, N2, device=dev, dtype=bf16)
        self.mode = mode
        if mode == "norm":
            self.q_out, self.quant, self.scale = torch.empty(m, N1, device=dev, dtype=bf16), None, None
        else:
            self.q_out = None
            self.quant = torch.empty(m, N1, device=dev, dtype=torch.float8_e4m3fn)
            self.scale = torch.empty(m, N1 // 128, device=dev, dtype=torch.float32)
        self.req = build_request(
            q=self.q, q_weight=self.qw, q_epsilon=EPS, k=self.k, k_weight=self.kw, k_out=self.k_out,
            mode=QuantMode.NONE if mode == "norm" else QuantMode.FP8_GROUP, group_size=None if mode == "norm" else 128,
            q_out=self.q_out, q_out_quantized=self.quant, q_out_scale=self.scale,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        m = self.q.shape[0]
        return m * (N1 + N2) * 2 + sum(
            t.numel() * t.element_size() for t in (self.q_out, self.quant, self.scale, self.k_out) if t is not None
        )


def buffer_sets(m: int, strided: bool, mode: str) -> list[Buffers]:
    first = Buffers(m, strided, mode)
    n = max(1, min(16, -(-L2_COLD_BYTES // first.nbytes)))
    return [first] + [Buffers(m, strided, mode) for _ in range(n - 1)]


def calls_for(m: int) -> int:
    return 200 if m <= 256 else (50 if m <= 4096 else 20)


def run_with(be: tb.TritonBackend, sets: list[Buffers], cfg: tb._Config | None) -> list[Callable[[], object]]:
    if cfg is None:
        return [lambda b=b: be.run(b.req) for b in sets]
    plan = be._plan(sets[0].req, sets[0].req.key())
    return [lambda b=b: be._launch(b.req, plan, cfg) for b in sets]


def overhead() -> dict[str, float]:
    """Eager wall µs per call at M = 1 (DeepSeek strided, bf16)."""
    import triton

    @triton.jit
    def _empty(X):
        pass

    res: dict[str, float] = {}
    x = torch.empty(1, device="cuda")
    res["empty triton kernel launch"] = wall_us(lambda: _empty[(1,)](x))
    b = Buffers(1, True, "norm")
    f = Buffers(1, True, "fp8")
    be = tb.TritonBackend()
    be.available()
    res["TritonBackend.run (built request)"] = wall_us(lambda: be.run(b.req))
    res["TritonBackend.run fp8 (built request)"] = wall_us(lambda: be.run(f.req))
    res["QKNormRequest.key()"] = wall_us(lambda: b.req.key(), calls=20000)
    res["checks.build_request"] = wall_us(lambda: build_request(
        q=b.q, q_weight=b.qw, q_epsilon=EPS, k=b.k, k_weight=b.kw, k_out=b.k_out, q_out=b.q_out), calls=5000)  # fmt: skip
    registry.reset()
    res["registry.select"] = wall_us(lambda: registry.select(b.req), calls=20000)
    res["public fused_qk_rmsnorm (No)"] = wall_us(
        lambda: qknorm.fused_qk_rmsnorm(b.q_out, None, b.q, b.qw, EPS, k_out=b.k_out, k=b.k, k_weight=b.kw)
    )
    res["public fused_qk_rmsnorm_group_quant (fp8)"] = wall_us(
        lambda: qknorm.fused_qk_rmsnorm_group_quant(
            f.quant, f.scale, f.q, f.qw, EPS, k_out=f.k_out, k=f.k, k_weight=f.kw
        )
    )
    res["public qk_rmsnorm (allocating)"] = wall_us(lambda: qknorm.qk_rmsnorm(b.q, b.qw, b.k, b.kw))
    ts = [b.q, b.k, b.q_out, b.k_out, b.qw, b.kw, b.q, b.q, b.q, b.q]
    res["10 x data_ptr()"] = wall_us(lambda: [t.data_ptr() for t in ts], calls=20000)
    res["torch.cuda.current_device()"] = wall_us(torch.cuda.current_device, calls=20000)
    res["triton get_current_stream"] = wall_us(lambda: be._stream(0), calls=20000)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3000):
        be.run(b.req)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return res


def timings(ms: Sequence[int], be: tb.TritonBackend | None = None, quick: bool = False) -> list[dict[str, object]]:
    """Graph-replay µs per call; "cold": inputs rotate over sets (L2 cold once they outgrow it), "hot": one set."""
    if be is None:
        be = tb.TritonBackend()
        be.available()
    rows: list[dict[str, object]] = []
    for m in ms:
        calls = calls_for(m)
        row: dict[str, object] = {"M": m}
        n = m * (N1 + N2)
        src = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        dst = [torch.empty_like(t) for t in src]
        nsets = max(1, min(4, -(-L2_COLD_BYTES // (4 * n))))
        if not quick:
            row["copy cold"] = graph_us([lambda d=dst[i], s=src[i]: d.copy_(s) for i in range(nsets)], calls)
            row["copy hot"] = graph_us([lambda d=dst[0], s=src[0]: d.copy_(s)], calls)
        cases = [("norm strided", True, "norm"), ("fp8 strided", True, "fp8")]
        if not quick:
            cases += [("norm contig", False, "norm"), ("fp8 contig", False, "fp8")]
        for name, strided, mode in cases:
            sets = buffer_sets(m, strided, mode)
            row[f"{name} cold"] = graph_us(run_with(be, sets, None), calls)
            if strided:
                row[f"{name} hot"] = graph_us(run_with(be, sets[:1], None), calls)
            row[f"{name} cfg"] = str(be._plans[sets[0].req.key()].configs[tb._bucket(m)])
            del sets
        del src, dst
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"M={m:6d} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


VARIANTS = {
    # r from the hardware reciprocal square root (within ~2 ulp, SPEC §4.2) instead of IEEE steps.
    "approx_rstd": [
        (
            "    s = tl.sqrt_rn(_div(sumsq, tl.full(sumsq.shape, N, tl.float32)) + eps)\n"
            "    return _div(tl.full(s.shape, 1.0, tl.float32), s)",
            "    return tl.rsqrt(sumsq * (1.0 / N) + eps)",
        )
    ],
}


def variant_module(name: str) -> object:
    """The kernels module with one variant's source edits, imported from a temporary file."""
    import importlib.util
    import tempfile

    src = Path(tb.__file__).with_name("triton_kernels.py").read_text()
    for old, new in VARIANTS[name]:
        assert old in src, f"variant {name}: pattern not found"
        src = src.replace(old, new)
    path = Path(tempfile.mkdtemp()) / f"qk_variant_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def variants(ms: Sequence[int]) -> dict[str, list[dict[str, object]]]:
    out = {}
    for name in VARIANTS:
        be = tb.TritonBackend()
        be.available()
        be._kernels = variant_module(name)
        print(f"variant {name}:", flush=True)
        out[name] = timings(ms, be, quick=True)
    return out


def sweep(ms: Sequence[int]) -> list[dict[str, object]]:
    be = tb.TritonBackend()
    be.available()
    out: list[dict[str, object]] = []
    for m in ms:
        if m <= 256:
            cands = [tb._Config(1, 1, w) for w in (2, 4, 8)] + [tb._Config(2, 2, 4), tb._Config(1, 4, 4)]
        else:
            cands = [tb._Config(qr, qr * 4, w) for qr, w in ((2, 2), (2, 4), (1, 4), (4, 2), (4, 4), (2, 8))]
        for mode in ("norm", "fp8"):
            sets = buffer_sets(m, True, mode)
            res = []
            for cfg in cands:
                try:
                    t = graph_us(run_with(be, sets, cfg), calls_for(m), reps=5)
                except Exception as exc:  # a configuration that does not compile is a finding, not a stop
                    print(f"  {cfg}: {type(exc).__name__}: {exc}"[:200], flush=True)
                    continue
                res.append((t, cfg))
                out.append(
                    {"M": m, "mode": mode, "q_rows": cfg.q_rows, "k_rows": cfg.k_rows, "warps": cfg.num_warps, "us": t}
                )
            res.sort(key=lambda r: r[0])
            default = tb._config(be._plan(sets[0].req, sets[0].req.key()), tb._bucket(m))
            dflt = [t for t, c in res if c == default]
            print(f"sweep M={m:6d} {mode:5s} best " + ", ".join(f"{t:.2f} {c.q_rows}/{c.k_rows}/{c.num_warps}" for t, c in res[:4])
                  + f"   default {default.q_rows}/{default.k_rows}/{default.num_warps}: {dflt[0] if dflt else 'n/a'}",
                  flush=True)  # fmt: skip
            del sets
            torch.cuda.empty_cache()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for triton_check.json")
    ap.add_argument("--ms", default="1,16,256,4096,16384,65536", help="row counts, comma separated")
    ap.add_argument("--sweep", default="", help="row counts for a grid of launch configurations (e.g. 1,256,4096)")
    ap.add_argument("--no-overhead", action="store_true")
    ap.add_argument("--variants", default="", help="row counts for the kernel-variant comparison (e.g. 1,256,65536)")
    args = ap.parse_args(argv)
    ms = [int(x) for x in args.ms.split(",")]
    import triton

    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(info, flush=True)
    result: dict[str, object] = {"info": info}
    if not args.no_overhead:
        result["overhead_us"] = ov = overhead()
        for k, v in ov.items():
            print(f"  {k:45s} {v:7.2f} us", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["timings_us"] = timings(ms)
    (out / "triton_check.json").write_text(json.dumps(result, indent=1))
    if args.variants:
        result["variants"] = variants([int(x) for x in args.variants.split(",")])
        (out / "triton_check.json").write_text(json.dumps(result, indent=1))
    if args.sweep:
        result["sweep"] = sweep([int(x) for x in args.sweep.split(",")])
        (out / "triton_check.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
