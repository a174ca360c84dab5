"""qk_norm_rope's aiter backend against fake aiter packages of every generation of the pts entry.

Routing per generation, every refusal with its reason (eps, table and cache layouts included:
they are in the request kind), outputs against the rope reference, the CLI. The fakes themselves, the probe,
synchronous exceptions and fakes that really abort: ``test_aiter_rope_defence.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _aiter_rope_cases import BF16, GENERATIONS, REFUSALS, assert_matches, call, expected, route

import qknorm
from qknorm.__main__ import main
from qknorm.backends import registry
from qknorm.rope import aiter_adapter
from qknorm.rope.ops import OP
from qknorm.rope.testing import assert_bits_equal, assert_rope_close, pair_magnitude
from qknorm.testing import fake_aiter_rope


@pytest.fixture(autouse=True)
def _aiter_then_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.ENV_VAR, "aiter,torch")


# ----------------------------------------------------------------------------- routing and refusals


@pytest.mark.parametrize("kind", GENERATIONS)
def test_every_generation_serves_full_rotary_with_a_contiguous_q_dtype_cache(kind: str):
    c = call()
    with fake_aiter_rope.install(kind) as fake:
        out = qknorm.qk_norm_rope(**c)
        assert fake.calls[-1] == "pts"
        assert_matches(c, out.q)
        assert out.k is None


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


REFUSED_LAYOUTS = [
    ("pts_v3159", dict(layout="unbind"), "writes k_cache and v_cache as if contiguous"),
    ("pts_v3492", dict(layout="unbind"), "as if contiguous"),  # accepted by its host code, written wrong
    ("pts_v3640", dict(layout="hnd"), "contiguous within a block"),
    ("pts_no_csrc", dict(layout="unbind"), "as if contiguous"),
    ("pts_v4531", dict(k_epsilon=1e-5), "one eps for q and k"),
]


@pytest.mark.parametrize(("kind", "change", "why"), REFUSED_LAYOUTS)
def test_layouts_aiter_cannot_address_are_refused_per_kind_and_served_by_the_next_backend(
    kind: str, change: dict[str, Any], why: str
):
    """Eps, table and cache layout are in the request kind: the registry sends what the installed
    generation cannot address to the next backend, decided (and cached) at selection, never per call."""
    c = call(**change)
    with fake_aiter_rope.install(kind) as fake:
        backend, reason = route(c)
        assert backend == "torch" and why in reason
        calls = len(fake.calls)
        out = qknorm.qk_norm_rope(**c)
        assert len(fake.calls) == calls  # aiter never sees it (the probe, if any, ran at selection)
        assert_matches(c, out.q)


def test_a_table_without_contiguous_rows_is_refused_per_kind():
    c = call(rot=64)
    wide = torch.zeros(64, 128, dtype=BF16)
    wide[:, :64] = c["cos_sin_cache"]
    c["cos_sin_cache"] = wide[:, :64]
    with fake_aiter_rope.install("pts_v4531") as fake:
        backend, reason = route(c)
        assert backend == "torch" and "cos_sin_cache rows must be contiguous" in reason
        calls = len(fake.calls)
        out = qknorm.qk_norm_rope(**c)
        assert len(fake.calls) == calls
    assert_matches(c, out.q)


def test_a_refused_layout_with_nothing_after_aiter_is_an_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(registry.ENV_VAR, "aiter")
    with fake_aiter_rope.install("pts_v3159"), pytest.raises(registry.BackendError, match="as if contiguous"):
        qknorm.qk_norm_rope(**call(layout="unbind"))


def test_more_rows_than_aiter_numbers_in_int_are_launched_in_parts(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(aiter_adapter, "_MAX_WARPS", 2 * (4 + 2 + 2))  # two tokens per launch
    c = call(t=5)
    with fake_aiter_rope.install("pts_v4531") as fake:
        out = qknorm.qk_norm_rope(**c)
        assert fake.calls.count("pts") == 3 * 3 + 3  # 3 probe layouts of 6 tokens in 3 parts, 5 tokens in 3 parts
    assert_matches(c, out.q)


def test_the_cli_shows_the_binding_and_the_probes(capsys):
    with fake_aiter_rope.install("pts_v4531"):
        assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "aiter bound: fused_qk_norm_rope_cache_pts_quant_shuffle" in out and "#4531" in out
    assert "aiter not bound: fused_qk_norm_rope_cache_quant_shuffle" in out
