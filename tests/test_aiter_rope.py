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
from qknorm.__main__ import main
from qknorm.backends import registry
from qknorm.backends.base import RequestRefused
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


# ----------------------------------------------------------------------------- the fakes do what aiter does


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


def test_fake_3492_accepts_an_unbind_view_and_writes_it_as_if_contiguous():
    c = call(layout="unbind")
    with fake_aiter_rope.install("pts_v3492"):
        pts_call("pts_v3492", c)
    exp = expected(c)
    with pytest.raises(AssertionError):
        assert_bits_equal(c["v_cache"], exp.v_cache, "v_cache")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["pts_v1551", "pts_v2199", "pts_v3159", "pts_v3640"])
def test_fake_rejects_what_its_host_code_rejects(kind: str):
    c = call(layout="hnd")
    with fake_aiter_rope.install(kind):
        if kind in ("pts_v1551", "pts_v2199"):
            with pytest.raises(RuntimeError, match="contiguous"):  # TORCH_CHECK
                pts_call(kind, c)
        else:
            with pytest.raises(AiterAbort, match="contiguous"):  # AITER_CHECK
                pts_call(kind, c)


def test_fake_misaligned_partial_rotary_is_computed_wrong_not_refused():
    c = call(d=256, rot=100)  # R/2 = 50: four elements per lane on 64-lane GPUs
    with fake_aiter_rope.install("pts_v4531"):
        req = pts_call("pts_v4531", c)
    exp = expected(c)
    with pytest.raises(AssertionError):
        assert_rope_close(req.q_out, exp.q_out, pair_magnitude(exp, "q"), "q_out")


@pytest.mark.parametrize(("arch", "ok"), [("gfx950", False), ("gfx1201", True)])
def test_fake_head_size_64_is_garbage_on_64_lane_gpus(arch: str, ok: bool):
    c = call(d=64)
    with fake_aiter_rope.install("pts_v4531", arch=arch):
        req = pts_call("pts_v4531", c, arch=arch)
    assert bool(torch.isnan(req.q_out.float()).any()) != ok
    if ok:
        exp = expected(c)
        assert_rope_close(req.q_out, exp.q_out, pair_magnitude(exp, "q"), "q_out")


def test_fake_fp32_table_is_rejected_then_reinterpreted():
    c = call(table=torch.float32)
    with fake_aiter_rope.install("pts_v2199"), pytest.raises(RuntimeError, match="expected scalar type"):
        pts_call("pts_v2199", c)
    with fake_aiter_rope.install("pts_v3159"):
        req = pts_call("pts_v3159", c)
    exp = expected(c)
    with pytest.raises(AssertionError):
        assert_rope_close(req.q_out, exp.q_out, pair_magnitude(exp, "q"), "q_out")


def test_fake_int32_indices_raise_then_fault():
    c = call(index=torch.int32)
    with fake_aiter_rope.install("pts_v2199"), pytest.raises(RuntimeError, match="Long"):
        pts_call("pts_v2199", c)
    with fake_aiter_rope.install("pts_v3159"), pytest.raises(AiterAbort, match="Memory access fault"):
        pts_call("pts_v3159", c)


def test_fake_k_out_is_in_the_cache_dtype_and_skipped_for_padding():
    c = call(k_out=torch.full((5, 2, 128), 7.0, dtype=BF16))
    with fake_aiter_rope.install("pts_v4531"):
        req = pts_call("pts_v4531", c)
    assert bool((req.k_out[1] == 7.0).all())  # type: ignore[index]  # slot -1: never written
    exp = expected(c)
    live = torch.tensor([0, 2, 3, 4])
    assert_rope_close(req.k_out[live], exp.k_out[live], pair_magnitude(exp, "k")[live], "k_out")  # type: ignore[index]


def test_fake_4531_aborts_on_a_block_size_off_powers_of_two():
    c = call(block=24)
    with fake_aiter_rope.install("pts_v4531"), pytest.raises(AiterAbort, match="power of 2"):
        pts_call("pts_v4531", c)


def test_fake_fp8_cache_rounding_before_and_after_4531():
    """x / s (correctly rounded) before #4531, x * fl(1/s) from it: they differ where x / s is an e4m3 midpoint."""
    s = 7.0
    x = torch.tensor([1.5625, 1.8125])  # * 7 = 10.9375, 12.6875: x / s is an e4m3 midpoint (ties to even)
    x = x * s  # exact in fp32; x * fl(1/7) lands just past the midpoint
    div = (x / torch.tensor(s)).to(torch.float8_e4m3fn)
    rcp = (x * (1.0 / torch.tensor(s))).to(torch.float8_e4m3fn)
    assert not torch.equal(div.view(torch.uint8), rcp.view(torch.uint8))
    new = fake_aiter_rope_kernel._to_cache(x, torch.float8_e4m3fn, s, fake_aiter_rope_kernel.PtsRules())
    old = fake_aiter_rope_kernel._to_cache(x, torch.float8_e4m3fn, s, fake_aiter_rope_kernel.PtsRules(fp8_rcp=False))
    assert torch.equal(new.view(torch.uint8), rcp.view(torch.uint8))
    assert torch.equal(old.view(torch.uint8), div.view(torch.uint8))


# ----------------------------------------------------------------------------- probe and synchronous exceptions


def test_probe_catches_a_kernel_that_pairs_the_wrong_elements(monkeypatch: pytest.MonkeyPatch, caplog):
    rope = fake_aiter_rope_kernel._rope
    monkeypatch.setattr(fake_aiter_rope_kernel, "_rope", lambda u, f, b, rot, neox, r: rope(u, f, b, rot, not neox, r))
    with fake_aiter_rope.install("pts_v4531") as fake:
        backend, why = route(call())
        assert backend == "torch" and why.startswith("behavioural probe: q_out of the exact token")
        calls = len(fake.calls)
        route(call(seed=1))  # same kind: no second probe
        assert len(fake.calls) == calls
    assert any("differs from the reference" in r.message for r in caplog.records)


def test_probe_lowers_the_layout_when_the_build_writes_views_wrong(monkeypatch: pytest.MonkeyPatch, caplog):
    """Sources that say #4312 over a kernel that writes like #3492: contiguous caches only from then on."""
    with fake_aiter_rope.install("pts_v4312"):
        kinds = dict(fake_aiter_rope._KINDS)
        old = kinds["pts_v4312"]
        kinds["pts_v4312"] = fake_aiter_rope._Kind(old.base, fake_aiter_rope_kernel.PtsRules(layout="dim1"))
        monkeypatch.setattr(fake_aiter_rope, "_KINDS", kinds)
        assert route(call())[0] == "aiter"
        c = call(layout="unbind")
        out = qknorm.qk_norm_rope(**c)
        assert_matches(c, out.q)
        info = registry.get_backend("aiter", OP).describe()  # type: ignore[attr-defined]
        assert "contiguous caches" in info["bound: fused_qk_norm_rope_cache_pts_quant_shuffle"]
    assert any("writes a unbind cache wrong" in r.message for r in caplog.records)


def test_probe_never_runs_during_capture(monkeypatch: pytest.MonkeyPatch):
    from qknorm.rope import aiter_backend

    monkeypatch.setattr(aiter_backend, "_capturing", lambda device: True)
    with fake_aiter_rope.install("pts_v4531") as fake:
        backend, why = route(call())
        assert backend == "torch" and "qknorm.warmup_qk_norm_rope" in why and fake.calls == []


def raising(*args: Any, **kwargs: Any) -> None:
    fake_aiter_rope.CALLS.append("pts")
    raise RuntimeError("HIP error: invalid device function (fake)")


def test_a_kind_aiter_raises_on_goes_to_the_next_backend_from_then_on(monkeypatch: pytest.MonkeyPatch, caplog):
    c = call()
    with fake_aiter_rope.install("pts_v4531") as fake:
        assert route(c)[0] == "aiter"
        monkeypatch.setattr(fake_aiter_rope, "call", raising)
        out = qknorm.qk_norm_rope(**c)
        assert_matches(c, out.q)
        calls = len(fake.calls)
        qknorm.qk_norm_rope(**call(seed=2))
        assert len(fake.calls) == calls  # refused from then on
        assert "HIP error" in route(c)[1]
    assert sum("a kind qknorm believed it supports" in r.message for r in caplog.records) == 1


def test_an_in_place_request_aiter_raised_on_is_an_error(monkeypatch: pytest.MonkeyPatch):
    c = call(cache=None)
    c["q"] = c["q"].contiguous()
    with fake_aiter_rope.install("pts_v4531"):
        assert route(c)[0] == "aiter"
        monkeypatch.setattr(fake_aiter_rope, "call", raising)
        with pytest.raises(RequestRefused, match="q_out is q") as err:
            qknorm.qk_norm_rope(**c, q_out=c["q"])
        assert not err.value.retry


# ----------------------------------------------------------------------------- fakes that really abort


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(registry.ENV_VAR, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # fmt: skip


def test_an_aborting_fake_really_kills_the_process(tmp_path: Path):
    proc = run_python(
        """
        import os, sys
        sys.path.insert(0, "tests")
        os.environ["QKNORM_BACKEND"] = "aiter,torch"
        from test_aiter_rope import call, pts_call
        from qknorm.testing import fake_aiter_rope
        with fake_aiter_rope.install("pts_v4531", aborts=True):
            pts_call("pts_v4531", call(block=24))
        print("not reached")
        """.replace('"tests"', repr(str(REPO / "tests"))),
        tmp_path,
    )
    assert proc.returncode == -signal.SIGABRT and "not reached" not in proc.stdout
    assert "block_size must be a power of 2" in proc.stderr


@pytest.mark.parametrize("kind", ["pts_v3159", "pts_v3640", "pts_v4531", "pts_no_csrc"])
def test_no_request_reaches_an_aborting_check(kind: str, tmp_path: Path):
    changes = [dict(c) for _, c, _ in REFUSALS if not any(isinstance(v, torch.Tensor) for v in c.values())]
    changes += [dict(layout="unbind"), dict(layout="hnd"), dict(cache=None), dict(block=24), dict(index=torch.int32),
                dict(rot=64, is_neox=False), dict(d=256, rot=64), dict(past=True), dict()]  # fmt: skip
    proc = run_python(
        f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        os.environ["QKNORM_BACKEND"] = "aiter,torch"
        import qknorm
        from test_aiter_rope import call
        from qknorm.backends import registry
        from qknorm.testing import fake_aiter_rope
        with fake_aiter_rope.install({kind!r}, aborts=True) as fake:
            for change in {changes!r}:
                os.environ["QKNORM_BACKEND"] = "aiter" if change.get("past") else "aiter,torch"
                registry.reset()  # the torch backend checks indices: a slot past the cache goes to aiter alone
                qknorm.qk_norm_rope(**call(**change))
            print("served by aiter:", fake.calls.count("pts"))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("served by aiter:")[1]) > 0


def test_the_cli_shows_the_binding_and_the_probes(capsys):
    with fake_aiter_rope.install("pts_v4531"):
        assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "aiter bound: fused_qk_norm_rope_cache_pts_quant_shuffle" in out and "#4531" in out
    assert "aiter not bound: fused_qk_norm_rope_cache_quant_shuffle" in out
