"""The behavioural probe of aiter's ``qk_norm_rope`` entry: a small fixed call through aiter and the reference.

Run once per request kind (``RopePlan.key()``) and device, at selection time (never during
CUDA-graph capture or tracing; ``qknorm.warmup_qk_norm_rope`` runs it). Six tokens, q, k and
v as views of one packed buffer, the kind's head counts, sizes, dtypes and rotation:

- token 0 is exact by construction: ``x = +-1`` and ``eps = 2^-30`` give ``r = 1`` and
  ``u = w``, weights in {0.5, 1, 1.5, 2}, cos 0.75 and sin 0.5: every product and sum is exact,
  so q and k must match the reference bit for bit (a swapped pair or a missed rotation shows);
- the other tokens are random, compared within the tolerance table (``TOLERANCES["rope"]``:
  at most 1% of elements off; keeping fp32 between norm and RoPE instead of rounding (rule 2)
  moves far more);
- with a cache, token 1 is padding (slot -1), slots are scattered over at least three blocks of a cache
  filled with random values: written entries within tolerance, every other byte unchanged, v
  bit for bit. The cache is given in each layout the generation claims to address
  (contiguous; a view of a ``[num_blocks, 2, ...]`` allocation from #3640; a permuted HND view
  from #4312).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .checks import plan_call
from .reference import qk_norm_rope_reference
from .request import RopePlan, RopeRequest
from .testing import assert_bits_equal, assert_rope_close, pair_magnitude

__all__ = ["PROBE_EPS", "LAYOUTS", "probe_requests", "compare"]

PROBE_EPS = 2.0**-30  # fl32(1 + 2^-30) == 1
_T, _POSITIONS, _BLOCKS = 6, 8, 3
# The cache layouts a generation must write right (its own, and every older one).
LAYOUTS = {"contiguous": ("contiguous",), "block": ("contiguous", "unbind"), "strided": ("contiguous", "unbind", "hnd")}


def _blocks(plan: RopePlan) -> int:
    return max(_BLOCKS, -(-2 * _T // plan.block_size))  # room for the tokens twice over


def _cache(plan: RopePlan, layout: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    nb, bs, hk, d = _blocks(plan), plan.block_size, plan.hk, plan.d
    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(plan.cache_dtype).to(plan.device)  # type: ignore[arg-type]

    if layout == "unbind":  # vLLM: [num_blocks, 2, block_size, H, D] split into K and V
        both = noise(nb, 2, bs, hk, d)
        return both[:, 0], both[:, 1]
    if layout == "hnd":  # [num_blocks, H, block_size, D] memory, passed in NHD order
        return noise(nb, hk, bs, d).transpose(1, 2), noise(nb, hk, bs, d).transpose(1, 2)
    return noise(nb, bs, hk, d), noise(nb, bs, hk, d)


def _inputs(plan: RopePlan, layout: str) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(20260821)
    t, hq, hk, d, dev, dtype = _T, plan.hq, plan.hk, plan.d, plan.device, plan.dtype
    hv = hk if plan.has_cache else 0
    x = torch.randn(t, hq + hk + hv, d, generator=gen)
    x[0] = torch.where(torch.arange(d) % 3 == 1, -1.0, 1.0)
    packed = x.to(dtype).to(dev).view(t, -1)
    q, k, v = (p.view(t, -1, d) for p in packed.split((hq * d, hk * d, hv * d), dim=1))
    exact = torch.tensor([0.5, 1.0, 1.5, 2.0])[torch.arange(d) % 4]
    call: dict[str, Any] = {
        "q": q, "k": k, "q_epsilon": PROBE_EPS, "k_epsilon": PROBE_EPS, "is_neox": plan.is_neox,
        "gemma_norm": plan.gemma,
        "q_weight": exact.to(dtype).to(dev) if plan.has_q_weight else None,
        "k_weight": exact.flip(0).to(dtype).to(dev) if plan.has_k_weight else None,
    }  # fmt: skip
    if plan.rot:
        angles = torch.rand(_POSITIONS, plan.rot // 2, generator=gen) * 6.3
        table = torch.cat([angles.cos(), angles.sin()], dim=1)
        table[0, : plan.rot // 2], table[0, plan.rot // 2 :] = 0.75, 0.5
        positions = torch.randint(1, _POSITIONS, (t,), generator=gen)
        positions[0] = 0
        call["cos_sin_cache"] = table.to(plan.cos_dtype).to(dev)  # type: ignore[arg-type]
        call["positions"] = positions.to(plan.index_dtypes[0]).to(dev)  # type: ignore[arg-type]
    if plan.has_cache:
        kc, vc = _cache(plan, layout, gen)
        slots = torch.randperm(_blocks(plan) * plan.block_size, generator=gen)[:t]
        slots[1] = -1
        call.update(v=v, k_cache=kc, v_cache=vc, slot_mapping=slots.to(plan.index_dtypes[1]).to(dev))  # type: ignore[arg-type]
    return call


def _request(call: dict[str, Any]) -> RopeRequest:
    c = dict(call)
    plan = plan_call(c.pop("q"), c.pop("k"), c.pop("q_weight"), c.pop("k_weight"), c.pop("cos_sin_cache", None),
                     c.pop("positions", None), **c)  # fmt: skip
    q_out = torch.full((plan.t, plan.hq, plan.d), float("nan"), dtype=plan.q_out_dtype, device=plan.device)
    k_out = torch.full_like(call["k"], float("nan")) if plan.write_k_out else None
    return RopeRequest(plan, call["q"], call["k"], call["q_weight"], call["k_weight"], call.get("cos_sin_cache"),
                       call.get("positions"), q_out, k_out, call.get("v"), call.get("k_cache"), call.get("v_cache"),
                       call.get("slot_mapping"))  # fmt: skip


def probe_requests(plan: RopePlan, layout: str = "contiguous") -> tuple[RopeRequest, RopeRequest]:
    """Two requests of ``plan``'s kind on the probe input (one for aiter, one for the reference)."""
    call = _inputs(plan, layout)
    actual = _request(call)
    # The probe's kind is the plan's, except the cache layout, which it chooses ({layout}).
    same = dataclasses.replace(actual.plan, cache_layout=plan.cache_layout).key() == plan.key()
    if not same:
        raise RuntimeError(f"the probe built a request of another kind: {actual.plan.key()} for {plan.key()}")
    cloned = {n: x.clone() if isinstance(x, torch.Tensor) else x for n, x in call.items()}
    return actual, _request(cloned)


def _cache_mismatch(actual: RopeRequest, expected: RopeRequest) -> str | None:
    """Written k entries within tolerance, everything else in both caches bit for bit."""
    slots = expected.slot_mapping.long().cpu()  # type: ignore[union-attr]
    live = (slots >= 0).nonzero().flatten()
    blk, off = slots[live] // expected.plan.block_size, slots[live] % expected.plan.block_size
    got, want = actual.k_cache[blk, off], expected.k_cache[blk, off]  # type: ignore[index]
    m = pair_magnitude(expected, "k")[live]
    assert_rope_close(got, want, m, "k_cache")
    rest = actual.k_cache.clone()  # type: ignore[union-attr]
    rest[blk, off] = want
    assert_bits_equal(rest, expected.k_cache, "k_cache outside the written slots")  # type: ignore[arg-type]
    assert_bits_equal(actual.v_cache, expected.v_cache, "v_cache")  # type: ignore[arg-type]
    return None


def compare(actual: RopeRequest, expected: RopeRequest) -> str | None:
    """Run the reference on ``expected``; None when ``actual`` (run by aiter) matches it, else what differed."""
    qk_norm_rope_reference(expected)
    try:
        assert_bits_equal(actual.q_out[0], expected.q_out[0], "q_out of the exact token")
        assert_rope_close(actual.q_out, expected.q_out, pair_magnitude(expected, "q"), "q_out")
        if actual.k_out is not None:
            assert_bits_equal(actual.k_out[0], expected.k_out[0], "k_out of the exact token")  # type: ignore[index]
            assert_rope_close(actual.k_out, expected.k_out, pair_magnitude(expected, "k"), "k_out")  # type: ignore[arg-type]
        if actual.k_cache is not None:
            return _cache_mismatch(actual, expected)
    except AssertionError as exc:
        text = str(exc).strip()
        return text.splitlines()[0] if text else "outputs differ from the reference"
    return None
