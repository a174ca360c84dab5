"""Benchmark of ``qk_norm_rope`` against its peers, in one process on one GPU.

``python -m qknorm bench rope`` and ``benchmarks/bench_rope.py`` call :func:`main`.

Shapes are Qwen3-8B's: q, k and v are views of the packed qkv projection ``[T, (32 + 2 * 8) *
128]`` bf16, positions int64, a float32 rotary table, a paged NHD cache ``[blocks, 16, 8, 128]``
with ``slot_mapping`` placing each token in a shuffled block. Implementations (same outputs):

- ``qknorm``: the public ``qk_norm_rope``, q in place, k and v into a bf16 cache;
  ``qknorm fp8``: the same into an FP8 e4m3fn cache (per-tensor scales); ``qknorm no-cache``:
  norm + RoPE of q and k in place, no cache write (vLLM's CUDA op computes this);
- ``eager``: the unfused chain as HF and vLLM write it: two per-head ``F.rms_norm``, RoPE with
  ``rotate_half`` on a bf16 copy of the table (vLLM's native path), two ``index_copy_`` into
  the cache; ``compile``: ``torch.compile`` of that chain (``dynamic=True``, compiled once);
  ``liger``: Liger-Kernel's RMSNorm and RoPE (when ``liger_kernel`` is importable) plus the
  same cache write;
- ``copy``: a device copy of as many bytes as qknorm reads and writes (the faster of
  ``Tensor.copy_`` and an elementwise copy kernel): the bandwidth ceiling.

Bytes of a call (``gb_s``, and the copy's size) are what it reads and writes: q, k, v and the
table rows at its positions read, positions and slots read, q, k and v written.

Times (µs per call) as the first operator's benchmark (:mod:`qknorm.bench`): ``graph_us`` from
CUDA-graph replay, calls rotating over independent buffer sets sized by those bytes,
``eager_us`` the wall time of back-to-back calls. Each set has its own qkv, positions, slots
and caches of exactly T slots (the rows a call writes); one rotary table and the weights are
shared by all sets, as every layer of an engine shares them. Decode-sized calls (bytes <= 1/8
of the L2) rotate over sets that together fit in half the L2: in decoding qkv was just written
by the QKV projection and is still in L2. Larger calls rotate over sets holding >= 3x the L2
(at most 16; cold L2, as :func:`qknorm.bench_report.buffer_sets`). A launch-configuration sweep
of qknorm's kernel follows.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..backends import registry
from ..backends.triton_launch import set_pdl
from ..bench import eager_time_us, graph_time_us
from ..bench_report import buffer_sets
from . import triton_launch
from .api import qk_norm_rope

__all__ = ["main"]

HQ, HK, D, BS = 32, 8, 128, 16  # Qwen3-8B, vLLM's default block size
EPS = 1e-6
DEFAULT_T = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
TABLE_ROWS = 65536  # positions drawn from the whole table
Fn = Callable[[], object]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """vLLM's ``forward_native`` neox rotation: ``x1 * cos - x2 * sin``, ``x2 * cos + x1 * sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def unfused_chain(qkv: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  table: torch.Tensor, qw: torch.Tensor, kw: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Norm, RoPE and cache write as an unfused engine runs them (bf16 table as vLLM converts it)."""
    t = qkv.shape[0]
    q, k, v = qkv.split((HQ * D, HK * D, HK * D), dim=-1)
    q = F.rms_norm(q.view(t, HQ, D), (D,), qw, EPS)
    k = F.rms_norm(k.view(t, HK, D), (D,), kw, EPS)
    cos, sin = table.index_select(0, pos).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    kc.view(-1, HK, D).index_copy_(0, slots, k)
    vc.view(-1, HK, D).index_copy_(0, slots, v.view(t, HK, D))
    return q


def _liger() -> Callable[..., torch.Tensor] | None:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception:
        return None

    def chain(qkv: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
              table: torch.Tensor, qw: torch.Tensor, kw: torch.Tensor) -> torch.Tensor:  # fmt: skip
        t = qkv.shape[0]
        q, k, v = qkv.split((HQ * D, HK * D, HK * D), dim=-1)
        q = LigerRMSNormFunction.apply(q.reshape(t * HQ, D), qw, EPS).view(1, t, HQ, D).transpose(1, 2)
        k = LigerRMSNormFunction.apply(k.reshape(t * HK, D), kw, EPS).view(1, t, HK, D).transpose(1, 2)
        cos, sin = table.index_select(0, pos).chunk(2, dim=-1)
        cos, sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]
        q, k = LigerRopeFunction.apply(q, k, cos, sin)
        kc.view(-1, HK, D).index_copy_(0, slots, k[0].transpose(0, 1))
        vc.view(-1, HK, D).index_copy_(0, slots, v.view(t, HK, D))
        return q

    return chain


class _Set:
    """One independent buffer set of a call at ``t`` tokens."""

    def __init__(self, t: int, dev: torch.device, gen: torch.Generator) -> None:
        blocks = -(-t // BS)
        self.qkv = torch.randn((t, (HQ + 2 * HK) * D), device=dev, generator=gen).to(torch.bfloat16)
        self.pos = torch.randint(0, TABLE_ROWS, (t,), device=dev, generator=gen)
        order = torch.randperm(blocks, device=dev, generator=gen)
        tok = torch.arange(t, device=dev)
        self.slots = order[tok // BS] * BS + tok % BS
        self.kc, self.vc = (torch.zeros((blocks, BS, HK, D), dtype=torch.bfloat16, device=dev) for _ in range(2))
        self.kc8, self.vc8 = (torch.zeros((blocks, BS, HK, D), dtype=torch.float8_e4m3fn, device=dev) for _ in range(2))
        self.q, self.k, self.v = (x.view(t, -1, D) for x in self.qkv.split((HQ * D, HK * D, HK * D), dim=-1))
        self.table_rows = int(self.pos.unique().numel())
        self.copy_src = torch.empty(-(-self.nbytes() // 8), dtype=torch.int32, device=dev).random_(generator=gen)
        self.copy_dst = torch.empty_like(self.copy_src)

    def nbytes(self) -> int:
        """What qknorm reads and writes: q, k, v, the fp32 table rows at the positions, positions and
        slots read; q, k and v written (q in place, k and v to the cache)."""
        t = self.qkv.shape[0]
        return 2 * self.qkv.numel() * 2 + self.table_rows * D * 4 + t * (8 + 8)


def rotation_sets(nbytes: int, l2: int) -> int:
    """Buffer sets to rotate over for a call of ``nbytes``: together within half the L2 for
    decode-sized calls (<= 1/8 of the L2), else >= 3x the L2 (see the module docstring)."""
    if nbytes <= l2 // 8:
        return max(1, min(16, l2 // (2 * nbytes)))
    return buffer_sets(nbytes, l2)


class _Ctx:
    def __init__(self, dev: torch.device, gen: torch.Generator) -> None:
        self.table = torch.rand((TABLE_ROWS, D), device=dev, generator=gen)
        self.table16 = self.table.to(torch.bfloat16)
        self.qw = (1 + 0.1 * torch.randn(D, device=dev, generator=gen)).to(torch.bfloat16)
        self.kw = (1 + 0.1 * torch.randn(D, device=dev, generator=gen)).to(torch.bfloat16)
        self.scale = torch.full((1,), 0.05, device=dev)
        self.compiled = torch.compile(unfused_chain, dynamic=True)
        self.liger = _liger()


def _impls(c: _Ctx, s: _Set) -> dict[str, Fn]:
    q, k, v = s.q, s.k, s.v
    impls: dict[str, Fn] = {
        "qknorm": lambda: qk_norm_rope(q, k, c.qw, c.kw, c.table, s.pos, q_out=q, v=v, k_cache=s.kc, v_cache=s.vc,
                                       slot_mapping=s.slots),
        "qknorm fp8": lambda: qk_norm_rope(q, k, c.qw, c.kw, c.table, s.pos, q_out=q, v=v, k_cache=s.kc8, v_cache=s.vc8,
                                           slot_mapping=s.slots, k_scale=c.scale, v_scale=c.scale),
        "qknorm no-cache": lambda: qk_norm_rope(q, k, c.qw, c.kw, c.table, s.pos, q_out=q, k_out=k),
        "eager": lambda: unfused_chain(s.qkv, s.pos, s.slots, s.kc, s.vc, c.table16, c.qw, c.kw),
        "compile": lambda: c.compiled(s.qkv, s.pos, s.slots, s.kc, s.vc, c.table16, c.qw, c.kw),
        "copy_": lambda: s.copy_dst.copy_(s.copy_src),
        "copy kernel": lambda: torch.bitwise_or(s.copy_src, 0, out=s.copy_dst),
    }  # fmt: skip
    if c.liger is not None:
        liger = c.liger
        impls["liger"] = lambda: liger(s.qkv, s.pos, s.slots, s.kc, s.vc, c.table, c.qw, c.kw)
    return impls


def _calls(t: int, sets: int) -> int:
    est_us = 2.0 + 0.007 * t  # rough device time, for ~20 ms of work per replay
    n = max(1, min(200, round(20000 / est_us)))
    return max(sets, n - n % sets)


def _time(fns: Sequence[Fn], t: int, sets: int, eager: bool) -> tuple[float | None, float | None, str]:
    calls = _calls(t, sets)
    try:
        g = graph_time_us(fns, calls, 10)
    except Exception as exc:
        return None, None, f"graph failed: {type(exc).__name__}: {str(exc)[:120]}"
    e = eager_time_us(fns, max(calls, 20), 5) if eager else None
    return g, e, ""


def bench_t(c: _Ctx, t: int, dev: torch.device, gen: torch.Generator, l2: int) -> list[dict[str, Any]]:
    """Every implementation at ``t`` tokens: one row each."""
    probe = _Set(t, dev, gen)
    sets = rotation_sets(probe.nbytes(), l2)
    bufs = [probe] + [_Set(t, dev, gen) for _ in range(sets - 1)]
    per = [_impls(c, s) for s in bufs]
    rows = []
    for name in per[0]:
        g, e, note = _time([p[name] for p in per], t, sets, eager=True)
        rows.append(dict(section="peers", t=t, impl=name, graph_us=g, eager_us=e, sets=sets, note=note,
                         gb_s=None if g is None else probe.nbytes() / g / 1e3))  # fmt: skip
        print(f"T={t:>6} {name:>16}: graph {g if g is None else round(g, 2)} µs, eager {e if e is None else round(e, 1)} µs {note}",
              flush=True)  # fmt: skip
    del bufs, per
    torch.cuda.empty_cache()
    return rows


def sweep_t(c: _Ctx, t: int, dev: torch.device, gen: torch.Generator, l2: int) -> list[dict[str, Any]]:
    """qknorm's kernel at other tiles, elements per thread and kernel flags (same T): does the
    heuristic pick well? Per tile and elements per thread: the rule's flags, and each flipped."""
    probe = _Set(t, dev, gen)
    sets = rotation_sets(probe.nbytes(), l2)
    bufs = [probe] + [_Set(t, dev, gen) for _ in range(sets - 1)]
    per = [_impls(c, s) for s in bufs]
    tl_ = triton_launch
    saved = tl_._BUCKETS
    rows = []
    bucket = tl_._bucket(t)
    tiles, epts = ((512, 1024), (4, 8)) if bucket.ept < 32 else ((2048, 4096), (32,))
    try:
        for tile in tiles:
            for ept in epts:
                for name, rule in (("qknorm", bucket.flags), ("qknorm fp8", bucket.flags_fp8)):
                    e, m, v = rule.early_loads, rule.row_mask, rule.v_first
                    for flags in (rule, tl_._Flags(not e, m, v), tl_._Flags(e, not m, v), tl_._Flags(e, m, not v)):
                        tl_._BUCKETS = (tl_._Bucket(None, tile, ept, flags, flags),)
                        registry.reset()  # the backends' remembered launches were planned under the old rule
                        g, _, note = _time([p[name] for p in per], t, sets, eager=False)
                        impl = (f"{name} tile {tile} ept {ept} {'early' if flags.early_loads else 'late'}"
                                f"{' masks' if flags.row_mask else ''}{' v-first' if flags.v_first else ''}")  # fmt: skip
                        rows.append(dict(section="sweep", t=t, impl=impl, graph_us=g, eager_us=None, sets=sets,
                                         note=note, gb_s=None))  # fmt: skip
                        print(f"sweep T={t} {impl}: {g} {note}", flush=True)
    finally:
        tl_._BUCKETS = saved
        registry.reset()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qknorm bench rope", description="qk_norm_rope against its peers (GPU)")
    p.add_argument("--t", default=",".join(map(str, DEFAULT_T)), help="token counts, comma-separated")
    p.add_argument("--sweep", default="1,64,256,16384", help="token counts of the launch sweep ('' for none)")
    p.add_argument("--out", default="bench-out", help="folder for bench_rope.csv")
    p.add_argument("--commit", default=os.environ.get("QKNORM_COMMIT", "unknown"), help="commit recorded in the CSV")
    p.add_argument("--pdl", action="store_true",
                   help="launch qknorm's Triton kernels with programmatic dependent launch (qknorm.set_pdl)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("qknorm bench rope: needs a CUDA GPU")
        return 2
    os.environ.setdefault("QKNORM_BACKEND", "triton")
    set_pdl(args.pdl)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
    c = _Ctx(dev, gen)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import triton

    pdl = ", programmatic dependent launch" if args.pdl else ""
    meta = f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}, commit {args.commit}{pdl}, {stamp}"
    print(meta, f"; liger {'importable' if c.liger else 'not importable'}", flush=True)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    for t in (int(x) for x in args.t.split(",") if x):
        rows += bench_t(c, t, dev, gen, l2)
    for t in (int(x) for x in args.sweep.split(",") if x):
        rows += sweep_t(c, t, dev, gen, l2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_rope.csv", "w", newline="") as f:
        f.write(meta + f", liger {'importable' if c.liger else 'not importable'}\n")
        w = csv.DictWriter(f, fieldnames=["section", "t", "impl", "graph_us", "eager_us", "gb_s", "sets", "note"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'bench_rope.csv'} in {time.time() - t0:.0f} s")
    return 0
