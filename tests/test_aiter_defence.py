"""The aiter backend's second and third lines of defence, and the first one under fakes that really abort.

1. ``supports()`` must keep every request away from a failing ``AITER_CHECK`` (which aborts the
   process): a subprocess with fakes that call ``os.abort()`` runs many request kinds and must
   exit cleanly.
2. The behavioural probe catches what signatures cannot (the pre-#3212 MXFP4 rule behind
   current names), once per kind, at selection, never during capture or tracing.
3. A synchronous exception from aiter refuses that kind from then on and the call is served by
   the next backend, except on in-place requests, which raise.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import pytest
import torch
from _cases import run_python, split_latent

import qknorm
from qknorm.__main__ import main
from qknorm.backends import aiter_backend, registry
from qknorm.backends.aiter_probe import PROBE_EPS, probe_requests
from qknorm.checks import build_request
from qknorm.quant import QuantMode
from qknorm.reference import rms_norm_fp32
from qknorm.testing import assert_mxfp4_close, assert_norm_close, backend_override, fake_aiter

BF16 = torch.bfloat16


latent = functools.partial(split_latent, n1=512)


def aiter_details() -> dict[str, str]:
    return registry.get_backend("aiter").describe()  # type: ignore[attr-defined, no-any-return]


# ----------------------------------------------------------------------------- fakes that abort


def test_an_aborting_fake_really_kills_the_process(tmp_path: Path):
    """The harness below can see an abort: a failed check in a fake written with aborts=True."""
    proc = run_python(
        """
        import torch
        from qknorm.testing import fake_aiter
        with fake_aiter.install("unified", aborts=True):
            import aiter.ops.fused_qk_rmsnorm_group_quant as gq
            q = torch.randn(2, 9216).bfloat16()
            gq.fused_qk_rmsnorm_group_quant(torch.empty(2, 9216, dtype=torch.float8_e4m3fn), torch.empty(2, 72),
                                            q, torch.ones(9216, dtype=torch.bfloat16), 1e-6)
        print("not reached")
        """,
        tmp_path,
    )
    assert proc.returncode == -signal.SIGABRT and "not reached" not in proc.stdout
    assert "[AITER] fused_qk_rmsnorm_group_quant fused kernel only supports n1/n2 <= 8192" in proc.stderr


@pytest.mark.parametrize("kind", ["unified", "unified_v15"])
def test_no_request_kind_reaches_an_aborting_check(kind: str, tmp_path: Path):
    """Requests near every check of the aborting generations: each is served (by aiter or torch), none aborts."""
    proc = run_python(
        f"""
        import torch, qknorm
        from qknorm.testing import fake_aiter, backend_override
        from qknorm.backends import registry
        FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz

        def call(**kw):
            try:
                request(**kw)
            except (TypeError, ValueError):  # qknorm's own validation: not a kind to serve
                pass

        def request(n1=1536, n2=512, m=3, k=True, residual=False, in_place=False, **kw):
            buf = torch.randn(m, n1 + n2 + 72).bfloat16()
            q, kk = buf[:, 8:8 + n1], (buf[:, 8 + n1:8 + n1 + n2] if k else None)
            w, kw_ = torch.rand(n1).bfloat16(), (torch.rand(n2).bfloat16() if k else None)
            res = torch.randn(m, n1).bfloat16() if residual else None
            if in_place:
                qknorm.fused_qk_rmsnorm(q, None, q, w, 1e-6, k_out=kk, k=kk, k_weight=kw_)
                return
            qknorm.qk_rmsnorm(q, w, kk, kw_, q_residual=res, **kw)

        with fake_aiter.install({kind!r}, aborts=True) as fake, backend_override("aiter,torch"):
            call(); call(k=False); call(residual=True); call(gemma_norm=True); call(k=False, residual=True)
            call(in_place=True); call(m=1); call(m=70)
            for n1, n2 in ((9216, 512), (1536, 9216), (1540, 512), (1536, 508), (8192, 8192), (64, 32), (128, 0)):
                call(n1=n1, n2=n2, k=n2 > 0)
                call(n1=n1, n2=n2, k=n2 > 0, quant="fp8_group")
                call(n1=n1, n2=n2, k=n2 > 0, quant="mxfp4")
            for gs in (32, 64, 128, 256, 512, 1536):
                call(quant="fp8_group", group_size=gs)
                call(quant="fp8_group", group_size=gs, transpose_scale=True, residual=True)
            for q in ("fp8_token", "fp8_tensor"):
                call(quant=q); call(quant=q, fp8_dtype=FNUZ); call(quant=q, residual=True, gemma_norm=True)
            call(quant="mxfp4", group_size=64, residual=True, return_unquantized=True)
            call(quant="fp8_group", fp8_dtype=FNUZ)
            refused = [k for k in registry.get_backend("aiter").describe() if k.startswith("refused")]
            print("served", len(fake.calls), refused)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = proc.stdout.strip().splitlines()[-1]
    assert served.startswith("served") and served.endswith("[]")  # no refusals either
    assert int(served.split()[1]) > 20  # aiter did serve most of them


# ----------------------------------------------------------------------------- the behavioural probe


def test_probe_input_puts_every_mxfp4_group_on_a_tie():
    req = build_request(q=torch.randn(2, 256).to(BF16), q_weight=torch.ones(256, dtype=BF16), q_epsilon=1e-6,
                        mode=QuantMode.MXFP4, group_size=32, q_out_quantized=torch.empty(2, 128, dtype=torch.uint8),
                        q_out_scale=torch.empty(2, 8, dtype=torch.uint8))  # fmt: skip
    x_req, _ = probe_requests(req)
    y = rms_norm_fp32(x_req.q[:1].float(), x_req.q_weight, PROBE_EPS, False)
    assert torch.equal(y.abs(), x_req.q_weight.float().abs()[None])  # exact: r = 1
    amax = y.abs().reshape(8, 32).amax(-1)
    mantissa, exponent = torch.frexp(amax)
    assert torch.equal(mantissa, torch.full_like(mantissa, 0.75))  # 1.5 * 2^k, k = -1..2
    assert sorted(set(exponent.tolist())) == [0, 1, 2, 3]


def test_probe_catches_the_old_mxfp4_rule_behind_current_names(caplog):
    """mxfp4_unmarked: v0.1.16's names, signatures and files, the pre-#3212 kernel."""
    inp = latent()
    with fake_aiter.install("mxfp4_unmarked") as fake, backend_override("aiter,torch"):
        out = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"], quant="mxfp4")
        fp8 = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], quant="fp8_group")
        assert fake.calls == ["unified", "group_quant_v14", "unified", "unified"]  # mxfp4 probes; fp8_group's
        details = aiter_details()
    verdicts = {k: v for k, v in details.items() if k.startswith("probe")}
    mx = [v for k, v in verdicts.items() if "mxfp4" in k]
    assert mx == ["E8M0 scales one exponent higher than the spec where amax = 1.5*2^k (the pre-#3212 rule)"] * 2
    assert [v for k, v in verdicts.items() if "fp8_group" in k] == ["matches the reference"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and all("aiter 0.1.16 differs from the reference on mxfp4" in w for w in warned)
    with backend_override("torch"):
        ref = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"], quant="mxfp4")
    assert torch.equal(out.q_scale, ref.q_scale)  # type: ignore[arg-type]
    assert_mxfp4_close(out.q, out.q_scale, ref.q, ref.q_scale)  # type: ignore[arg-type]
    del fp8


def test_probe_runs_once_per_kind_and_not_per_width():
    with fake_aiter.install("unified") as fake, backend_override("aiter,torch"):
        for n1 in (512, 1024, 512):
            inp = latent(n1=n1)
            qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"], quant="fp8_group")
        assert fake.calls == ["unified"] * 4  # one probe, three calls


def test_probe_never_runs_during_capture_or_tracing(monkeypatch):
    monkeypatch.setattr(aiter_backend, "capturing", lambda device: True)
    inp = latent()
    with fake_aiter.install("unified") as fake:
        backend = registry.get_backend("aiter")
        registry.probe("aiter")
        req = build_request(q=inp["q"], q_weight=inp["q_weight"], q_epsilon=1e-6, q_out=torch.empty(4, 512, dtype=BF16))
        assert "call qknorm.warmup before capture" in (backend.supports(req) or "")
        assert fake.calls == [] and not [k for k in aiter_details() if k.startswith("probe")]


def test_warmup_runs_the_probes_and_the_cli_shows_them(capsys, monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    with fake_aiter.install("mxfp4_unmarked") as fake:
        qknorm.warmup(256, 128, device="cpu", modes=(None, "mxfp4"), max_tokens=4)
        probes = [k for k in aiter_details() if k.startswith("probe")]
        assert len(probes) == 3  # plain on unified; mxfp4 on unified and group_quant
        calls = len(fake.calls)
        inp = latent(n1=256)
        qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"], quant="mxfp4")
        assert len(fake.calls) == calls  # decided at warmup: torch serves it, no new probe
        assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "aiter probe unified: none: q [*, 256], k [*, 128] torch.bfloat16 on cpu: matches the reference" in out
    assert "E8M0 scales one exponent higher than the spec" in out


# ----------------------------------------------------------------------------- synchronous exceptions


@pytest.fixture
def widths_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A qknorm bug on purpose: supports() forgets aiter's 8192-wide limit (the probe's 256 passes)."""
    monkeypatch.setattr(aiter_backend, "widths_unsupported", lambda req: None)


def test_a_kind_aiter_raises_on_goes_to_the_next_backend_from_then_on(widths_unchecked, caplog):
    inp = latent(n1=9216, n2=0)
    with fake_aiter.install("unified_v14") as fake, backend_override("aiter,torch"):
        first = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"])
        assert fake.calls == ["group_quant_v14", "group_quant_v14"]  # probe passed, the call raised
        second = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"])
        assert len(fake.calls) == 2  # not asked again
        refused = {k: v for k, v in aiter_details().items() if k.startswith("refused")}
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "aiter 0.1.14 raised RuntimeError" in errors[0] and "n1/n2 <= 8192" in errors[0]
    assert "none: q [*, 9216] torch.bfloat16 on cpu" in errors[0]
    assert list(refused) == ["refused: none: q [*, 9216] torch.bfloat16 on cpu"]
    with backend_override("torch"):
        ref = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"])
    assert_norm_close(first.q, ref.q, "q served by torch")
    assert_norm_close(second.q, ref.q, "q")


def test_an_in_place_request_aiter_raised_on_is_an_error_not_a_retry(widths_unchecked):
    inp = latent(n1=9216, n2=0)
    q = inp["q"].clone()
    with fake_aiter.install("unified_v14"), backend_override("aiter,torch"):
        with pytest.raises(
            RuntimeError, match=r"in-place request \(q_out is q\): the input may already be overwritten"
        ):
            qknorm.fused_qk_rmsnorm(q, None, q, inp["q_weight"], 1e-6)
        again = inp["q"].clone()
        qknorm.fused_qk_rmsnorm(again, None, again, inp["q_weight"], 1e-6)  # now torch's
    with backend_override("torch"):
        ref = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"]).q
    assert_norm_close(again, ref, "in place, served by torch")


def test_explicit_aiter_raises_when_it_refuses_a_kind(widths_unchecked):
    inp = latent(n1=9216, n2=0)
    with fake_aiter.install("unified_v14"), backend_override("aiter"):
        with pytest.raises(registry.BackendError, match="raised RuntimeError for this kind") as info:
            qknorm.qk_rmsnorm(inp["q"], inp["q_weight"])
    assert isinstance(info.value.__cause__, qknorm.backends.base.RequestRefused)
