"""qk_norm_rope's aiter backend against fake aiter packages of every generation of the pts entry.

Routing per generation, every refusal with its reason, per-call hand-over of what the request
kind cannot show, outputs against the rope reference, the fakes' own faithfulness (what aiter
does with what qknorm refuses to send), the probe, synchronous exceptions, and a subprocess
whose fakes really abort.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import qknorm
from qknorm.backends import registry
from qknorm.rope import aiter_adapter
from qknorm.rope.checks import plan_call
from qknorm.rope.ops import OP
from qknorm.rope.reference import qk_norm_rope_reference
from qknorm.rope.request import RopeRequest
from qknorm.rope.testing import assert_bits_equal, assert_rope_close, pair_magnitude
from qknorm.testing import fake_aiter_rope, fake_aiter_rope_kernel
from qknorm.testing.fake_aiter import AiterAbort

REPO = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
GENERATIONS = ("pts_v1551", "pts_v2199", "pts_v3159", "pts_v3492", "pts_v3640", "pts_v4312", "pts_v4531")


@pytest.fixture(autouse=True)
def _aiter_then_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.ENV_VAR, "aiter,torch")


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
    c: dict[str, Any] = dict(q=q, k=k, q_weight=w if weights else None, k_weight=w.flip(0) if weights else None)
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


# ----------------------------------------------------------------------------- routing and refusals


@pytest.mark.parametrize("kind", GENERATIONS)
def test_every_generation_serves_full_rotary_with_a_contiguous_q_dtype_cache(kind: str):
    c = call()
    with fake_aiter_rope.install(kind) as fake:
        out = qknorm.qk_norm_rope(**c)
        assert fake.calls[-1] == "pts"
        assert_matches(c, out.q)
        assert out.k is None


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


@pytest.mark.parametrize(("kind", "change", "why"), REFUSALS)
def test_each_refusal_names_its_reason(kind: str, change: dict[str, Any], why: str):
    with fake_aiter_rope.install(kind) as fake:
        backend, reason = route(call(**change))
        assert backend == "torch" and why in reason
        assert fake.calls == []  # refused by rule: not even a probe ran


def test_v_with_another_head_size_is_refused():
    c = call()
    c["v"] = torch.zeros(5, 2, 64, dtype=BF16)
    c["v_cache"] = torch.zeros(4, 16, 2, 64, dtype=BF16)
    with fake_aiter_rope.install("pts_v4531"):
        assert "one head size for q, k and v" in route(c)[1]


@pytest.mark.parametrize("kind", ["pts_v3159", "pts_v4312"])
def test_a_block_size_off_powers_of_two_goes_to_aiter_before_4531(kind: str):
    c = call(block=24)
    with fake_aiter_rope.install(kind) as fake:
        assert route(c)[0] == "aiter"
        assert_matches(c, qknorm.qk_norm_rope(**c).q)
        assert "pts" in fake.calls


def test_no_aiter_installed_means_quietly_unavailable():
    registry.reset()
    ok, why = registry.probe("aiter", OP)
    assert not ok and why == "aiter is not installed"


def test_a_drifted_signature_is_not_bound():
    with fake_aiter_rope.install("pts_drifted") as fake:
        ok, why = registry.probe("aiter", OP)
        assert not ok and "cu_q_len" in why
        c = call()
        with pytest.warns(registry.BackendFallbackWarning):
            qknorm.qk_norm_rope(**c)
        assert fake.calls == []


# ----------------------------------------------------------------------------- outputs of served kinds

SERVED = [
    ("partial neox", dict(rot=64)),
    ("partial gptj", dict(rot=64, is_neox=False)),
    ("gptj d256", dict(d=256, is_neox=False)),
    ("mqa gqa", dict(hq=6, hk=1)),
    ("weightless", dict(weights=False)),
    ("fp16 int32 indices", dict(dtype=torch.float16, index=torch.int32)),
    ("block 1", dict(block=1)),
]


@pytest.mark.parametrize(("label", "change"), SERVED, ids=[s[0] for s in SERVED])
@pytest.mark.parametrize("kind", ["pts_v2199", "pts_v4531"])
def test_served_kinds_match_the_reference(kind: str, label: str, change: dict[str, Any]):
    c = call(**change)
    with fake_aiter_rope.install(kind) as fake:
        assert route(c) == ("aiter", "")  # selection runs the probe
        probes = len(fake.calls)
        assert_matches(c, qknorm.qk_norm_rope(**c).q)
        assert len(fake.calls) == probes + 1


@pytest.mark.parametrize("kind", GENERATIONS)
def test_without_a_cache_k_is_written_through_the_cache_path(kind: str):
    c = call(cache=None)
    with fake_aiter_rope.install(kind) as fake:
        out = qknorm.qk_norm_rope(**c)
        assert fake.calls[-1] == "pts"
        assert_matches(c, out.q, out.k)


def test_in_place_q_and_k_on_a_packed_buffer():
    c = call(cache=None)
    src = {n: x.clone() if isinstance(x, torch.Tensor) else x for n, x in c.items()}
    with fake_aiter_rope.install("pts_v4531"):
        qknorm.qk_norm_rope(**c, q_out=c["q"], k_out=c["k"])
    assert_matches(src, c["q"], c["k"])


def test_slots_past_the_cache_and_positions_outside_the_table_stay_inside_memory(monkeypatch: pytest.MonkeyPatch):
    """aiter checks neither: qknorm marks such slots as padding and clamps positions (SPEC_ROPE_CACHE §3.6)."""
    monkeypatch.setenv(registry.ENV_VAR, "aiter")
    c = call(past=True)
    c["positions"][2] = 1000
    with fake_aiter_rope.install("pts_v4531") as fake:
        out = qknorm.qk_norm_rope(**c)
        assert fake.calls[-1] == "pts"
    exp = expected(c)
    ok = torch.tensor([0, 1, 3, 4])  # token 2's position is outside the table: its values are unspecified
    assert_rope_close(out.q[ok], exp.q_out[ok], pair_magnitude(exp, "q")[ok], "q_out")
    assert_bits_equal(c["v_cache"], exp.v_cache, "v_cache")  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "layout"), [("pts_v3640", "unbind"), ("pts_v4312", "unbind"), ("pts_v4312", "hnd"),
                                              ("pts_v4531", "hnd")])  # fmt: skip
def test_cache_views_go_to_aiter_where_it_addresses_them(kind: str, layout: str):
    c = call(layout=layout)
    with fake_aiter_rope.install(kind) as fake:
        out = qknorm.qk_norm_rope(**c)
        assert fake.calls[-1] == "pts"
        assert_matches(c, out.q)


HANDED_OVER = [
    ("pts_v3159", dict(layout="unbind"), "writes k_cache as if contiguous"),
    ("pts_v3492", dict(layout="unbind"), "writes k_cache as if contiguous"),  # accepted by its host code, written wrong
    ("pts_v3640", dict(layout="hnd"), "contiguous within a block"),
    ("pts_no_csrc", dict(layout="unbind"), "as if contiguous"),
    ("pts_v4531", dict(k_epsilon=1e-5), "one eps for q and k"),
]


@pytest.mark.parametrize(("kind", "change", "why"), HANDED_OVER)
def test_calls_aiter_cannot_address_go_to_the_next_backend(kind: str, change: dict[str, Any], why: str, caplog):
    c = call(**change)
    with fake_aiter_rope.install(kind) as fake:
        assert route(c)[0] == "aiter"  # the kind is aiter's; this call is not
        calls = len(fake.calls)
        with caplog.at_level("INFO", logger="qknorm.rope.aiter_backend"):
            out = qknorm.qk_norm_rope(**c)
        assert len(fake.calls) == calls
        assert_matches(c, out.q)
        assert any("backend torch serves such calls" in r.message for r in caplog.records)
        info = registry.get_backend("aiter", OP).describe()  # type: ignore[attr-defined]
        assert why in info["calls served by torch"] or why in " ".join(info.values())


def test_a_non_contiguous_table_is_handed_over():
    c = call(rot=64)
    wide = torch.zeros(64, 128, dtype=BF16)
    wide[:, :64] = c["cos_sin_cache"]
    c["cos_sin_cache"] = wide[:, :64]
    with fake_aiter_rope.install("pts_v4531") as fake:
        assert route(c)[0] == "aiter"
        probes = len(fake.calls)
        out = qknorm.qk_norm_rope(**c)
        assert len(fake.calls) == probes
    assert_matches(c, out.q)


def test_handing_over_with_nothing_after_aiter_is_an_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(registry.ENV_VAR, "aiter")
    with fake_aiter_rope.install("pts_v3159"), pytest.raises(registry.BackendError, match="writes k_cache as if contiguous"):
        qknorm.qk_norm_rope(**call(layout="unbind"))


def test_more_rows_than_aiter_numbers_in_int_are_launched_in_parts(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(aiter_adapter, "_MAX_WARPS", 2 * (4 + 2 + 2))  # two tokens per launch
    c = call(t=5)
    with fake_aiter_rope.install("pts_v4531") as fake:
        out = qknorm.qk_norm_rope(**c)
        assert fake.calls.count("pts") == 3 * 3 + 3  # 3 probe layouts of 6 tokens in 3 parts, 5 tokens in 3 parts
    assert_matches(c, out.q)
