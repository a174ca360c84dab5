"""The second and third lines of defence of qk_norm_rope's aiter backend, and the fakes' own faithfulness.

The fakes compute what aiter computes with what qknorm refuses to send (so the refusals are
about something real); the probe catches a build that drifts behind its names; a synchronous
exception refuses its kind from then on (an in-place call raises); and in a subprocess whose
fakes call ``os.abort()`` no request of any kind reaches a failing check.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from _aiter_rope_cases import BF16, REFUSALS, REPO, assert_matches, call, expected, pts_call, route
from _cases import run_python

import qknorm
from qknorm.backends import registry
from qknorm.backends.base import RequestRefused
from qknorm.rope.ops import OP
from qknorm.rope.testing import assert_bits_equal, assert_rope_close, pair_magnitude
from qknorm.testing import fake_aiter_rope, fake_aiter_rope_kernel
from qknorm.testing.fake_aiter import AiterAbort


@pytest.fixture(autouse=True)
def _aiter_then_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.ENV_VAR, "aiter,torch")


# ----------------------------------------------------------------------------- the fakes do what aiter does


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

    monkeypatch.setattr(aiter_backend, "capturing", lambda device: True)
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


def test_an_aborting_fake_really_kills_the_process(tmp_path: Path):
    proc = run_python(
        """
        import os, sys
        sys.path.insert(0, "tests")
        os.environ["QKNORM_BACKEND"] = "aiter,torch"
        from _aiter_rope_cases import call, pts_call
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
        from _aiter_rope_cases import call
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
