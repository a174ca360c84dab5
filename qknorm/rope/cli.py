"""The ``qk_norm_rope`` parts of ``python -m qknorm backends | demo | check`` (rows; the CLI prints them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..backends import registry
from ..backends.base import Backend
from ..backends.registry import BackendError
from ..quant import native_fp8_dtype as native_fp8
from .api import qk_norm_rope
from .checks import plan_call
from .ops import OP
from .reference import qk_norm_rope_reference
from .request import RopePlan, RopeRequest
from .testing import assert_bits_equal, assert_rope_close, assert_rope_fp8_close, fp8_slack, pair_magnitude

__all__ = ["BACKEND_HEADER", "backend_rows", "choice_rows", "demo_rows", "check_rows"]

BACKEND_HEADER = ("backend", "available", "why")
Row = tuple[object, ...]


def backend_rows() -> list[Row]:
    """Each backend of ``qk_norm_rope`` and, indented below it, what it bound (aiter: entry, generation, probes)."""
    rows: list[Row] = []
    for i in registry.describe(OP):
        rows.append((i.name, "yes" if i.available else "no", i.reason))
        rows += [(f"  {i.name} {key}", "", value) for key, value in i.details.items()]
    return rows


def _call(t: int, hq: int, hk: int, d: int, rot: int, dev: torch.device, cache: torch.dtype | None, seed: int,
          q_fp8: bool = False, is_neox: bool = True, gemma: bool = False) -> dict[str, Any]:  # fmt: skip
    """One call's arguments: q, k, v views of a packed qkv, a shuffled paged cache (block size 16)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(torch.bfloat16).to(dev)
    q, k, v = (x.view(t, -1, d) for x in qkv.split((hq * d, hk * d, hk * d), dim=-1))
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16).to(dev)
    call: dict[str, Any] = dict(q=q, k=k, q_weight=w, k_weight=w, cos_sin_cache=None, positions=None,
                                is_neox=is_neox, gemma_norm=gemma)  # fmt: skip
    if rot:
        call["cos_sin_cache"] = torch.rand(4096, rot, generator=g).to(dev)
        call["positions"] = torch.randint(0, 4096, (t,), generator=g).to(dev)
    if cache is not None:
        blocks = -(-t // 16) + 1
        slots = torch.randperm(blocks * 16, generator=g)[:t].to(dev)
        kc, vc = (torch.zeros(blocks, 16, hk, d, device=dev).to(cache) for _ in range(2))
        call.update(v=v, k_cache=kc, v_cache=vc, slot_mapping=slots)
        if cache.itemsize == 1:
            call.update(k_scale=torch.full((1,), 0.02, device=dev), v_scale=torch.full((hk,), 0.03, device=dev))
    if q_fp8:
        call["q_scale"] = torch.full((1,), 0.01, device=dev)
    return call


def _plan(call: dict[str, Any]) -> RopePlan:
    c = dict(call)
    return plan_call(c.pop("q"), c.pop("k"), c.pop("q_weight"), c.pop("k_weight"), c.pop("cos_sin_cache"),
                     c.pop("positions"), **c)  # fmt: skip


def choice_rows(devices: list[torch.device]) -> list[Row]:
    """Which backend serves Qwen3-8B-shaped calls (bf16 and FP8 caches) on each device."""
    rows: list[Row] = []
    for dev in devices:
        for label, cache in (("bf16 cache", torch.bfloat16), ("fp8 cache", native_fp8(dev))):
            d = registry.explain(_request(_call(1, 32, 8, 128, 128, dev, cache, 0)))
            rows.append((str(dev), f"qk_norm_rope 32/8/128 {label}", d.backend or "NONE",
                         "; ".join(f"{n}: {w}" for n, w in d.skipped)))  # fmt: skip
    return rows


def _compare(q: torch.Tensor, call: dict[str, Any], exp: RopeRequest) -> tuple[bool, float, str]:
    """q and the cache against the reference's; (ok, max abs error of q, why not)."""
    try:
        if exp.plan.q_fp8:
            assert_rope_fp8_close(q, exp.q_out, "q_out", fp8_slack(exp, "q", exp.q_scale))  # type: ignore[arg-type]
        else:
            assert_rope_close(q, exp.q_out, pair_magnitude(exp, "q"), "q_out")
        if exp.plan.has_cache:
            s = exp.slot_mapping.long()  # type: ignore[union-attr]
            blk, off = s // exp.plan.block_size, s % exp.plan.block_size
            got, want = call["k_cache"][blk, off], exp.k_cache[blk, off]  # type: ignore[index]
            if exp.plan.cache_fp8:
                assert_rope_fp8_close(got, want, "k_cache", fp8_slack(exp, "k", exp.k_scale))  # type: ignore[arg-type]
            else:
                assert_rope_close(got, want, pair_magnitude(exp, "k"), "k_cache")
            assert_bits_equal(call["v_cache"][blk, off], exp.v_cache[blk, off], "v_cache")  # type: ignore[index]
    except AssertionError as exc:
        return False, -1.0, str(exc)[:200]
    return True, float((q.float() - exp.q_out.float()).abs().max()), ""


_INPUTS = ("q", "k", "q_weight", "k_weight", "cos_sin_cache", "positions", "v", "k_cache", "v_cache", "slot_mapping",
           "k_scale", "v_scale", "q_scale")  # fmt: skip


def _request(call: dict[str, Any]) -> RopeRequest:
    """``call`` as a request with fresh outputs (what the entry would allocate)."""
    plan = _plan(call)
    q_out = torch.empty((plan.t, plan.hq, plan.d), dtype=plan.q_out_dtype, device=plan.device)
    k_out = torch.empty_like(call["k"]) if plan.write_k_out else None
    a: dict[str, Any] = {n: call.get(n) for n in _INPUTS}
    return RopeRequest(plan, a["q"], a["k"], a["q_weight"], a["k_weight"], a["cos_sin_cache"], a["positions"], q_out,
                       k_out, a["v"], a["k_cache"], a["v_cache"], a["slot_mapping"], a["k_scale"], a["v_scale"],
                       a["q_scale"])  # fmt: skip


def _reference(call: dict[str, Any]) -> RopeRequest:
    req = _request({n: (x.clone() if isinstance(x, torch.Tensor) else x) for n, x in call.items()})
    qk_norm_rope_reference(req)
    return req


def _time(fn: Callable[[], object], dev: torch.device, iters: int) -> float:
    for _ in range(3):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - start) / iters * 1e6


def demo_rows(dev: torch.device, tokens: list[int], iters: int) -> tuple[list[Row], bool]:
    """Qwen3-8B shapes with a bf16 and an FP8 cache on the default backend, checked against the reference."""
    rows: list[Row] = []
    failed = False
    for t in tokens:
        for label, cache in (("bf16 cache", torch.bfloat16), ("fp8 cache", native_fp8(dev))):
            call = _call(t, 32, 8, 128, 128, dev, cache, seed=t)
            exp = _reference(call)
            name = registry.explain(exp).backend
            try:
                out = qk_norm_rope(**call)
            except BackendError as exc:
                rows.append((t, f"qk_norm_rope {label}", "NONE", "-", "-", f"FAIL: {exc}"))
                failed = True
                continue
            ok, err, why = _compare(out.q, call, exp)
            failed |= not ok
            us = _time(lambda call=call: qk_norm_rope(**call), dev, iters)  # type: ignore[misc]
            verdict = ("reference" if name == "torch" else "ok") if ok else f"FAIL: {why}"
            rows.append((t, f"qk_norm_rope {label}", name, f"{err:.3g}" if ok else "-", f"{us:.1f}", verdict))
    return rows, failed


def _check_calls(dev: torch.device, quick: bool) -> list[tuple[str, dict[str, Any]]]:
    fp8 = native_fp8(dev)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("32/8/128 bf16 cache", dict(hq=32, hk=8, d=128, rot=128, cache=torch.bfloat16)),
        ("32/8/128 fp8 cache + fp8 q", dict(hq=32, hk=8, d=128, rot=128, cache=fp8, q_fp8=True)),
        ("16/8/256 gemma, no cache", dict(hq=16, hk=8, d=256, rot=256, cache=None, gemma=True)),
        ("12/2/128 partial 64 gptj", dict(hq=12, hk=2, d=128, rot=64, cache=torch.bfloat16, is_neox=False)),
        ("4/1/64 no rope", dict(hq=4, hk=1, d=64, rot=0, cache=fp8)),
    ]
    return cases[:2] if quick else cases


def _check_one(backend: Backend, kw: dict[str, Any], dev: torch.device, ts: tuple[int, ...]) -> tuple[bool, float, str]:
    good, worst, notes = True, 0.0, []
    for t in ts:
        call = _call(t, dev=dev, seed=t, **kw)
        exp = _reference(call)
        req = _request(call)
        backend.run(req)
        ok, err, why = _compare(req.q_out, call, exp)
        good &= ok
        worst = max(worst, err)
        if not ok:
            notes.append(f"T={t}: {why}")
    return good, worst, "; ".join(notes)


def check_rows(names: list[str], devices: list[torch.device], quick: bool) -> tuple[list[Row], int, int]:
    """Each requested backend of this operator on each device against the reference: (rows, passes, failures).

    The ``torch`` backend is the reference: its rows say ``reference`` (nothing independent was compared).
    """
    rows: list[Row] = []
    passes = failures = 0
    ts = (1, 67) if quick else (1, 67, 300)
    for name in names:
        if name not in registry.backend_names(OP):
            rows.append((name, "-", "qk_norm_rope", "skip", "-", f"no {name} backend is registered for qk_norm_rope"))
            continue
        backend = registry.get_backend(name, OP)
        ok, why = registry.probe(name, OP)
        for dev in devices:
            for label, kw in _check_calls(dev, quick):
                reason = why if not ok else backend.supports(_request(_call(1, dev=dev, seed=0, **kw)))
                if reason is not None:
                    rows.append((name, dev, f"qk_norm_rope {label}", "skip", "-", reason))
                    continue
                good, worst, notes = _check_one(backend, kw, dev, ts)
                passes += good
                failures += not good
                result = ("reference" if name == "torch" else "pass") if good else "FAIL"
                rows.append((name, dev, f"qk_norm_rope {label}", result, f"{worst:.3g}", notes))
    return rows, passes, failures
