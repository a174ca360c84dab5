#!/usr/bin/env python3
"""Correctness and timing check of the Triton backend on one GPU, DeepSeek MLA shapes, in one process.

``python benchmarks/gpu_check_triton.py [--out DIR] [--ms 1,256,4096,16384,65536] [--sweep] [--baseline MODULE]``

1. **Correctness**: every mode (norm; FP8 e4m3fn / e4m3fnuz groups of 32, 64, 128, per token,
   per tensor; MXFP4 32) on q ``[M, 1536]`` and k ``[M, 512]``, contiguous and as split views of
   ``[M, 2112]``, bf16 and fp16, against :mod:`qknorm.reference` with the tolerances of
   :mod:`qknorm.testing`; outputs are poisoned first. Also the share of FP8 / E2M1 bytes and
   scales equal to the reference's bit for bit (they differ only through r's last ulps).
2. **Graph replay**: µs per call for every mode, M and layout, next to a device copy of the
   same bytes timed in the same run (the faster of ``Tensor.copy_`` and an elementwise copy
   kernel); inputs rotate over buffer sets of >= 200 MB so that large M reads from HBM.
   ``--baseline qknorm.backends._old_triton_backend`` times another backend module beside it
   (e.g. an earlier version copied there), ``--sweep`` a grid of launch configurations.
3. **Eager**: wall µs per ``TritonBackend.run`` call at M = 1 (the launch path).

The request is built here from the backend contract's attributes alone, so the check does not
depend on how qknorm's entries validate. Writes ``triton_check.json`` under ``--out`` and prints
short tables last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qknorm import reference, testing
from qknorm.backends import triton_backend as tb
from qknorm.bench import graph_time_us
from qknorm.quant import QuantMode

N1, N2, WIDTH, EPS = 1536, 512, 2112, 1e-6
L2_COLD_BYTES = 200 << 20  # rotate buffer sets until this many bytes are touched per cycle
FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
# The correctness part also runs on the CPU under TRITON_INTERPRET=1 (a dry run of this script).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# name -> (mode, group size, FP8 dtype)
MODES: dict[str, tuple[QuantMode, int, torch.dtype | None]] = {
    "norm": (QuantMode.NONE, 0, None),
    "fp8_g128": (QuantMode.FP8_GROUP, 128, FN),
    "fp8_g64": (QuantMode.FP8_GROUP, 64, FN),
    "fp8_g32": (QuantMode.FP8_GROUP, 32, FN),
    "fp8_g128_fnuz": (QuantMode.FP8_GROUP, 128, FNUZ),
    "fp8_token": (QuantMode.FP8_TOKEN, N1, FN),
    "fp8_tensor": (QuantMode.FP8_TENSOR, N1, FN),
    "mxfp4": (QuantMode.MXFP4, 32, None),
}
TIMED = tuple(MODES)  # the e4m3fnuz variants below are checked, and timed only on request
MODES.update({
    "fp8_g64_fnuz": (QuantMode.FP8_GROUP, 64, FNUZ),
    "fp8_g32_fnuz": (QuantMode.FP8_GROUP, 32, FNUZ),
    "fp8_token_fnuz": (QuantMode.FP8_TOKEN, N1, FNUZ),
    "fp8_tensor_fnuz": (QuantMode.FP8_TENSOR, N1, FNUZ),
})  # fmt: skip


@dataclass(frozen=True, eq=False)
class Req:
    """The attributes of the backend contract (what ``TritonBackend.run`` may read)."""

    q: torch.Tensor
    q_weight: torch.Tensor
    q_eps: float
    k: torch.Tensor | None
    k_weight: torch.Tensor | None
    k_eps: float
    q_residual: torch.Tensor | None
    gemma: bool
    mode: QuantMode
    group_size: int
    q_out: torch.Tensor | None
    q_quant: torch.Tensor | None
    q_scale: torch.Tensor | None
    k_out: torch.Tensor | None
    q_res_out: torch.Tensor | None
    transpose_scale: bool = False

    m = property(lambda self: self.q.shape[0])
    n1 = property(lambda self: self.q.shape[1])
    n2 = property(lambda self: 0 if self.k is None else self.k.shape[1])
    dtype = property(lambda self: self.q.dtype)
    device = property(lambda self: self.q.device)
    has_k = property(lambda self: self.k is not None)
    quant_dtype = property(lambda self: None if self.q_quant is None else self.q_quant.dtype)

    def key(self) -> tuple[object, ...]:
        return (self.device.type, self.device.index, self.dtype, self.mode, self.quant_dtype, self.group_size,
                self.n1, self.n2, self.q_residual is not None, self.q_out is not None, self.gemma,
                self.transpose_scale)  # fmt: skip

    def outputs(self) -> list[torch.Tensor]:
        return [t for t in (self.q_out, self.q_quant, self.q_scale, self.k_out, self.q_res_out) if t is not None]


def make_req(mode_name: str, m: int, strided: bool, dtype: torch.dtype = torch.bfloat16, gen: Any = None) -> Req:
    """A DeepSeek request with fresh random inputs and poisoned outputs."""
    mode, gs, fp8 = MODES[mode_name]
    dev = DEVICE
    if strided:
        latent = torch.randn(m, WIDTH, device=dev, dtype=dtype, generator=gen)
        q, k = latent[:, :N1], latent[:, N1 : N1 + N2]
    else:
        q = torch.randn(m, N1, device=dev, dtype=dtype, generator=gen)
        k = torch.randn(m, N2, device=dev, dtype=dtype, generator=gen)
    qw = (1 + 0.1 * torch.randn(N1, device=dev, generator=gen)).to(dtype)
    kw = (1 + 0.1 * torch.randn(N2, device=dev, generator=gen)).to(dtype)
    k_out = torch.full((m, N2), float("nan"), device=dev, dtype=dtype)
    q_out = quant = scale = None
    if mode is QuantMode.NONE:
        q_out = torch.full((m, N1), float("nan"), device=dev, dtype=dtype)
    elif mode is QuantMode.MXFP4:
        quant = torch.full((m, N1 // 2), 0xA5, device=dev, dtype=torch.uint8)
        scale = torch.full((m, N1 // gs), 0xA5, device=dev, dtype=torch.uint8)
    else:
        assert fp8 is not None
        quant = torch.full((m, N1), 0x7F, device=dev, dtype=torch.uint8).view(fp8)
        shape = (1,) if mode is QuantMode.FP8_TENSOR else (m, N1 // gs)
        scale = torch.full(shape, float("nan"), device=dev, dtype=torch.float32)
    return Req(q=q, q_weight=qw, q_eps=EPS, k=k, k_weight=kw, k_eps=EPS, q_residual=None, gemma=False, mode=mode,
               group_size=gs, q_out=q_out, q_quant=quant, q_scale=scale, k_out=k_out, q_res_out=None)  # fmt: skip


def op_bytes(req: Req) -> int:
    """Bytes the op must move: inputs read once (weights included), outputs written once."""
    size = lambda t: 0 if t is None else t.numel() * t.element_size()
    inputs = req.m * (N1 + N2) * req.q.element_size() + size(req.q_weight) + size(req.k_weight)
    return inputs + sum(size(t) for t in req.outputs())


# ---------------------------------------------------------------------------- correctness


def _twin(req: Req) -> Req:
    """The same inputs with fresh outputs (for the reference)."""
    fresh = {n: None if t is None else torch.empty_like(t) for n, t in
             (("q_out", req.q_out), ("q_quant", req.q_quant), ("q_scale", req.q_scale), ("k_out", req.k_out))}  # fmt: skip
    return Req(**{**req.__dict__, **fresh})


def check(req: Req, run: Callable[[Req], None]) -> dict[str, Any]:
    """Run ``req`` and compare every output with the reference; returns pass/fail and exact-match shares."""
    exp = _twin(req)
    run(req)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    reference.qk_rmsnorm_reference(exp)  # type: ignore[arg-type]
    res: dict[str, Any] = {"ok": True}
    try:
        testing.assert_norm_close(req.k_out, exp.k_out, "k_out")  # type: ignore[arg-type]
        if req.mode is QuantMode.NONE:
            testing.assert_norm_close(req.q_out, exp.q_out, "q_out")  # type: ignore[arg-type]
        elif req.mode is QuantMode.MXFP4:
            testing.assert_mxfp4_close(req.q_quant, req.q_scale, exp.q_quant, exp.q_scale)  # type: ignore[arg-type]
        else:
            testing.assert_fp8_close(req.q_quant, exp.q_quant)  # type: ignore[arg-type]
            testing.assert_scales_close(req.q_scale, exp.q_scale)  # type: ignore[arg-type]
    except AssertionError as exc:
        res.update(ok=False, error=str(exc).splitlines()[0][:300])
    if req.q_quant is not None:
        a, e = req.q_quant.view(torch.uint8), exp.q_quant.view(torch.uint8)  # type: ignore[union-attr]
        res["codes_equal"] = float((a == e).float().mean())
        sa, se = req.q_scale, exp.q_scale
        res["scales_equal"] = float((sa.view(torch.int32 if sa.dtype == torch.float32 else torch.uint8)  # type: ignore[union-attr]
                                     == se.view(torch.int32 if se.dtype == torch.float32 else torch.uint8)).float().mean())  # type: ignore[union-attr]  # fmt: skip
    return res


def correctness(backends: dict[str, Any], ms: Sequence[int], big: int) -> list[dict[str, Any]]:
    """Every mode, dtype and layout at each M of ``ms`` (and bf16 strided at ``big``), each backend."""
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    cases = [(d, s, m) for d in (torch.bfloat16, torch.float16) for s in (True, False) for m in ms]
    cases += [(torch.bfloat16, True, big)] if big else []
    for name in MODES:
        for dtype, strided, m in cases:
            req = make_req(name, m, strided, dtype, gen)
            for label, be in backends.items():
                if label != "new" and dtype != torch.bfloat16:
                    continue  # a baseline is checked on bf16 only
                r = check(req if label == "new" else _twin(req), be.run)
                rows.append({"backend": label, "mode": name, "dtype": str(dtype)[6:],
                             "layout": "strided" if strided else "contiguous", "M": m, **r})  # fmt: skip
                if not r["ok"]:
                    print(f"  FAIL {label} {name} {dtype} strided={strided} M={m}: {r.get('error')}", flush=True)
    return rows


# ---------------------------------------------------------------------------- timing


def buffer_sets(name: str, m: int, strided: bool) -> list[Req]:
    first = make_req(name, m, strided)
    per_set = op_bytes(first)
    n = max(1, min(16, -(-L2_COLD_BYTES // per_set)))
    return [first] + [make_req(name, m, strided) for _ in range(n - 1)]


def calls_for(m: int) -> int:
    return 200 if m <= 256 else (50 if m <= 4096 else 20)


def copy_us(nbytes: int, m: int) -> float:
    """A device copy moving ``nbytes`` (half read, half written): the faster of copy_ and an elementwise kernel."""
    words = max(1, nbytes // 8)
    src0 = torch.randint(0, 1 << 30, (words,), device="cuda", dtype=torch.int32)
    n = max(1, min(16, -(-L2_COLD_BYTES // (8 * words))))
    srcs = [src0] + [torch.randint(0, 1 << 30, (words,), device="cuda", dtype=torch.int32) for _ in range(n - 1)]
    dsts = [torch.empty_like(s) for s in srcs]
    a = graph_time_us([lambda d=d, s=s: d.copy_(s) for d, s in zip(dsts, srcs)], calls_for(m), 7)
    b = graph_time_us([lambda d=d, s=s: torch.bitwise_or(s, 0, out=d) for d, s in zip(dsts, srcs)], calls_for(m), 7)
    return min(a, b)


def timings(backends: dict[str, Any], ms: Sequence[int], modes: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for m in ms:
        copies: dict[int, float] = {}
        for name in modes:
            for strided in (True, False):
                sets = buffer_sets(name, m, strided)
                nbytes = op_bytes(sets[0])
                if nbytes not in copies:
                    copies[nbytes] = copy_us(nbytes, m)
                row = {"M": m, "mode": name, "layout": "strided" if strided else "contiguous", "bytes": nbytes,
                       "copy_us": copies[nbytes]}  # fmt: skip
                for label, be in backends.items():
                    row[label] = graph_time_us([lambda r=r, b=be: b.run(r) for r in sets], calls_for(m), 7)
                rows.append(row)
                del sets
                torch.cuda.empty_cache()
            for x in rows[-2:]:
                print(f"M={m:6d} {name:14s} {x['layout']:10s} copy {x['copy_us']:8.2f} " + " ".join(
                    f"{lab} {x[lab]:8.2f} ({100 * x['copy_us'] / x[lab]:5.1f}%)" for lab in backends), flush=True)  # fmt: skip
    return rows


SWEEP = {
    "decode": [tb._Config(1, 1, w, kq) for w in (2, 4, 8) for kq in (False, True)],
    "prefill": [tb._Config(1, kr, w, False) for w, kr in ((1, 2), (1, 4), (2, 4), (2, 8), (4, 8))]
    + [tb._Config(1, 1, w, True) for w in (1, 2)]
    + [tb._Config(2, 8, w, False) for w in (2, 4)]
    # register caps: one-warp programs of 80-120 registers fit 16-21 warps per SM, at most 32
    + [tb._Config(1, 1, 1, True, maxnreg=r) for r in (64, 72, 80, 96)]
    + [tb._Config(1, 4, 2, maxnreg=r) for r in (48, 64)],
}


def _cfg_name(c: Any) -> str:
    return f"w{c.num_warps}/k{c.k_rows}{'/kq' if c.k_with_q else ''}{f'/r{c.maxnreg}' if c.maxnreg else ''}"


def sweep(ms: Sequence[int], modes: Sequence[str]) -> list[dict[str, Any]]:
    """Graph µs of a grid of launch configurations (strided inputs), each next to the default."""
    out = []
    for m in ms:
        cands = SWEEP["decode" if m <= tb._DECODE_MAX_M else "prefill"]
        for name in modes:
            be = tb.TritonBackend()
            be.available()
            sets = buffer_sets(name, m, True)
            plan = be._plan(sets[0], sets[0].key())
            default = tb._config(plan, tb._bucket(m))
            res = []
            for cfg in cands:
                try:
                    fns = [lambda r=r, c=cfg, b=be, p=plan: b._launch(r, p, c) for r in sets]
                    t = graph_time_us(fns, calls_for(m), 5)
                except Exception as exc:  # a configuration that does not compile is a finding, not a stop
                    print(f"  {cfg}: {type(exc).__name__}: {exc}"[:200], flush=True)
                    continue
                res.append((t, cfg))
                out.append({"M": m, "mode": name, "warps": cfg.num_warps, "k_rows": cfg.k_rows, "k_with_q": cfg.k_with_q,
                            "maxnreg": cfg.maxnreg, "us": t, "default": cfg == default})  # fmt: skip
            res.sort(key=lambda r: r[0])
            print(f"sweep M={m:6d} {name:10s} " + ", ".join(f"{t:.2f} {_cfg_name(c)}" for t, c in res[:5])
                  + f"  default {_cfg_name(default)}", flush=True)  # fmt: skip
            del sets
            torch.cuda.empty_cache()
    return out


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


def eager(backends: dict[str, Any]) -> dict[str, float]:
    res = {}
    for mode in ("norm", "fp8_g128"):
        for strided in (True, False):
            req = make_req(mode, 1, strided)
            for label, be in backends.items():
                res[f"{label} {mode} {'strided' if strided else 'contiguous'}"] = wall_us(lambda b=be, r=req: b.run(r))
    return res


def profile(backends: dict[str, Any], m: int, modes: Sequence[str]) -> None:
    """One call per (backend, mode) between cudaProfilerStart/Stop, for ``ncu --profile-from-start off``."""
    reqs = [(label, name, be, make_req(name, m, True)) for label, be in backends.items() for name in modes]
    for _, _, be, r in reqs:  # compile outside the profiled range
        be.run(r)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for label, name, be, r in reqs:
        print(f"profiled: {label} {name} M={m}", flush=True)
        be.run(r)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for triton_check.json")
    ap.add_argument("--ms", default="1,256,4096,16384,65536", help="row counts timed, comma separated")
    ap.add_argument("--check-ms", default="1,37,4096", help="row counts checked (every dtype and layout)")
    ap.add_argument("--check-big", type=int, default=65536, help="a row count checked for bf16 split views only")
    ap.add_argument("--modes", default=",".join(TIMED), help="modes timed")
    ap.add_argument("--baseline", default="", help="module of a second backend to time beside the current one")
    ap.add_argument("--sweep", default="", help="row counts for the configuration sweep (e.g. 1,256,65536)")
    ap.add_argument("--sweep-modes", default="norm,fp8_g128,mxfp4")
    ap.add_argument(
        "--phase",
        choices=("all", "correctness", "timings"),
        default="all",
        help="run only the correctness checks or only the timings (e.g. to overlap checks with tests)",
    )
    ap.add_argument("--profile", default="", help="only run each of these modes once at --profile-m (under ncu)")
    ap.add_argument("--profile-m", type=int, default=65536)
    args = ap.parse_args(argv)
    import triton

    info = {"gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (interpreter)", "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    print(info, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"info": info}
    backends: dict[str, Any] = {"new": tb.TritonBackend()}
    if args.baseline:
        backends["old"] = importlib.import_module(args.baseline).TritonBackend()
    for be in backends.values():
        be.available()
    if args.profile:
        profile(backends, args.profile_m, args.profile.split(","))
        return 0
    name = "triton_check.json" if args.phase == "all" else f"triton_{args.phase}.json"
    bad: list[dict[str, Any]] = []
    if args.phase != "timings":
        bad = run_checks(backends, args, result)
        (out / name).write_text(json.dumps(result, indent=1))
    if args.phase == "correctness" or DEVICE.type != "cuda":
        return 1 if bad else 0
    result["eager_us"] = eager(backends)
    for k, v in result["eager_us"].items():
        print(f"  eager {k:34s} {v:6.2f} us", flush=True)
    t0 = time.time()
    result["timings"] = timings(backends, [int(x) for x in args.ms.split(",")], args.modes.split(","))
    print(f"timings: {time.time() - t0:.0f} s", flush=True)
    (out / name).write_text(json.dumps(result, indent=1))
    if args.sweep:
        result["sweep"] = sweep([int(x) for x in args.sweep.split(",")], args.sweep_modes.split(","))
        (out / name).write_text(json.dumps(result, indent=1))
    return 1 if bad else 0


def run_checks(backends: dict[str, Any], args: argparse.Namespace, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The correctness part: every mode against the reference; returns the current backend's failures."""
    t0 = time.time()
    rows = correctness(backends, [int(x) for x in args.check_ms.split(",")], args.check_big)
    result["correctness"] = rows
    bad = [r for r in rows if not r["ok"] and r["backend"] == "new"]
    for label in backends:
        mine = [r for r in rows if r["backend"] == label]
        codes = [r["codes_equal"] for r in mine if "codes_equal" in r]
        print(f"correctness {label}: {sum(r['ok'] for r in mine)}/{len(mine)} pass; FP8/E2M1 bytes equal to the "
              f"reference's: min {min(codes, default=1):.5f}, mean {statistics.mean(codes or [1]):.5f}", flush=True)  # fmt: skip
    print(f"correctness: {time.time() - t0:.0f} s", flush=True)
    return bad


if __name__ == "__main__":
    sys.exit(main())
