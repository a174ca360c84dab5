"""Calls, requests and comparisons shared by the tests of qk_norm_rope's aiter backend (fake aiter packages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qknorm.backends import registry
from qknorm.rope.checks import plan_call
from qknorm.rope.reference import qk_norm_rope_reference
from qknorm.rope.request import RopeRequest
from qknorm.rope.testing import assert_bits_equal, assert_rope_close, pair_magnitude

REPO = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
GENERATIONS = ("pts_v1551", "pts_v2199", "pts_v3159", "pts_v3492", "pts_v3640", "pts_v4312", "pts_v4531")


def call(t: int = 5, hq: int = 4, hk: int = 2, d: int = 128, rot: int | None = None, *, dtype: torch.dtype = BF16,
         cache: Any = "q", layout: str = "contiguous", block: int = 16, table: torch.dtype | None = None,
         index: torch.dtype = torch.int64,
         weights: bool = True, past: bool = False, seed: int = 0, **extra: Any) -> dict[str, Any]:  # fmt: skip
    """A call on views of a packed qkv; slot 1 is padding (and with ``past`` the last one is past the cache)."""
    g = torch.Generator().manual_seed(seed)
    rot = d if rot is None else rot
    cache = dtype if cache == "q" else cache
    table = dtype if table is None else table
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, v = (x.view(t, -1, d) for x in qkv.split((hq * d, hk * d, hk * d), dim=1))
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    c: dict[str, Any] = dict(q=q, k=k, q_weight=w if weights else None, k_weight=w.flip(0) if weights else None,
                             cos_sin_cache=None, positions=None)  # fmt: skip
    if rot:
        c["cos_sin_cache"] = (torch.rand(64, rot, generator=g) * 2 - 1).to(table)
        c["positions"] = torch.randint(0, 64, (t,), generator=g).to(index)
    if cache is not None:
        nb = max(4, -(-2 * t // block))
        if layout == "unbind":
            both = torch.zeros(nb, 2, block, hk, d, dtype=cache)
            kc, vc = both[:, 0], both[:, 1]
        elif layout == "hnd":
            kc, vc = (torch.zeros(nb, hk, block, d, dtype=cache).transpose(1, 2) for _ in range(2))
        else:
            kc, vc = (torch.zeros(nb, block, hk, d, dtype=cache) for _ in range(2))
        slots = torch.randperm(nb * block, generator=g)[:t]
        slots[1] = -1
        if past:
            slots[-1] = nb * block + 3
        c.update(v=v, k_cache=kc, v_cache=vc, slot_mapping=slots.to(index))
    c.update(extra)
    return c


_POSITIONAL = ("q", "k", "q_weight", "k_weight", "cos_sin_cache", "positions")


def request(c: dict[str, Any]) -> RopeRequest:
    """``c`` as a request with fresh outputs (what the entry allocates)."""
    rest = {n: x for n, x in c.items() if n not in _POSITIONAL}
    plan = plan_call(*(c.get(n) for n in _POSITIONAL), **rest)
    q_out = c.get("q_out")
    if q_out is None:
        q_out = torch.empty((plan.t, plan.hq, plan.d), dtype=plan.q_out_dtype)
    k_out = c.get("k_out")
    if k_out is None and plan.write_k_out:
        k_out = torch.empty((plan.t, plan.hk, plan.d), dtype=plan.dtype)
    g = c.get
    return RopeRequest(plan, c["q"], c["k"], g("q_weight"), g("k_weight"), g("cos_sin_cache"), g("positions"), q_out,
                       k_out, g("v"), g("k_cache"), g("v_cache"), g("slot_mapping"), g("k_scale"), g("v_scale"),
                       g("q_scale"))  # fmt: skip


def route(c: dict[str, Any]) -> tuple[str | None, str]:
    """(backend chosen, aiter's reason when passed over) for call ``c``."""
    d = registry.explain(request(c))
    return d.backend, dict(d.skipped).get("aiter", "")


def expected(c: dict[str, Any]) -> RopeRequest:
    """The reference's outputs for ``c`` (on clones)."""
    req = request({n: x.clone() if isinstance(x, torch.Tensor) else x for n, x in c.items()})
    qk_norm_rope_reference(req, check=False)
    return req


def assert_matches(c: dict[str, Any], q_out: torch.Tensor, k_out: torch.Tensor | None = None) -> None:
    """q (and k) within SPEC_ROPE_CACHE §3, the caches: written k within it, the rest and v bit for bit."""
    exp = expected(c)
    assert_rope_close(q_out, exp.q_out, pair_magnitude(exp, "q"), "q_out")
    if k_out is not None:
        assert_rope_close(k_out, exp.k_out, pair_magnitude(exp, "k"), "k_out")  # type: ignore[arg-type]
    if "k_cache" in c:
        s = exp.slot_mapping.long()  # type: ignore[union-attr]
        live = ((s >= 0) & (s < exp.plan.num_slots)).nonzero().flatten()
        blk, off = s[live] // exp.plan.block_size, s[live] % exp.plan.block_size
        assert_rope_close(c["k_cache"][blk, off], exp.k_cache[blk, off], pair_magnitude(exp, "k")[live], "k_cache")  # type: ignore[index]
        rest = c["k_cache"].clone()
        rest[blk, off] = exp.k_cache[blk, off]  # type: ignore[index]
        assert_bits_equal(rest, exp.k_cache, "k_cache elsewhere")  # type: ignore[arg-type]
        assert_bits_equal(c["v_cache"], exp.v_cache, "v_cache")  # type: ignore[arg-type]


def pts_call(kind: str, c: dict[str, Any], *, arch: str = "gfx950", **override: Any) -> RopeRequest:
    """Call the fake pts entry of ``kind`` directly on ``c`` (contiguous caches as given); returns the outputs."""
    req = request(c)
    p = req.plan
    import aiter.ops.fused_qk_norm_rope_cache_quant as rope_ops

    qkv = torch.cat([req.q, req.k, req.v], dim=1).view(p.t, -1)  # type: ignore[list-item]
    one = torch.ones(1)
    args = dict(qkv=qkv, qw=req.q_weight, kw=req.k_weight, cos_sin=req.cos_sin_cache, positions=req.positions,
                num_tokens=p.t, num_heads_q=p.hq, num_heads_k=p.hk, num_heads_v=p.hk, head_size=p.d,
                is_neox_style=p.is_neox, eps=p.q_eps, q_out=req.q_out, k_cache=req.k_cache, v_cache=req.v_cache,
                slot_mapping=req.slot_mapping, per_tensor_k_scale=one, per_tensor_v_scale=one, k_out=req.k_out,
                v_out=None, return_kv=req.k_out is not None, use_shuffle_layout=False, block_size=p.block_size, x=0)  # fmt: skip
    if kind != "pts_v1551":
        args["rotary_dim"] = p.rot
    args.update(override)
    rope_ops.fused_qk_norm_rope_cache_pts_quant_shuffle(**args)
    return req


# (kind, change to call(), the reason aiter is passed over)
REFUSALS = [
    ("pts_v4531", dict(rot=0), "aiter always rotates"),
    ("pts_v4531", dict(d=64), "head size 64"),
    ("pts_v4531", dict(d=96, rot=96), "head sizes 128 and 256 only"),
    ("pts_v4531", dict(gemma_norm=True), "gemma_norm=false"),
    ("pts_v4531", dict(q_scale=torch.ones(1)), "no FP8 q"),
    ("pts_v4531", dict(table=torch.float32), "reads cos/sin in the activation dtype"),
    ("pts_v1551", dict(rot=64), "needs the rotary_dim parameter"),
    ("pts_v4531", dict(d=256, rot=100), "puts R/2 inside a lane"),  # R/2 = 50, 8 elements per lane on gfx12
    ("pts_v4531", dict(rot=66, is_neox=False), "puts R inside a lane"),
    ("pts_v4531", dict(cache=torch.float8_e4m3fn, k_scale=torch.ones(1), v_scale=torch.ones(1)), "CUDA-graph replay"),
    ("pts_v4531", dict(k_out=torch.empty(5, 2, 128, dtype=BF16)), "skips padded tokens"),
    ("pts_v4531", dict(block=24), "block_size must be a power of two"),
    ("pts_no_csrc", dict(block=24), "block_size must be a power of two"),
]
