"""aiter generations as their source has them: what each fake enforces, and what qknorm sends each one.

Each test names the aiter behaviour it pins (commit, file) and checks both sides: the fake does
what that aiter does (so the routing tests in ``test_aiter.py`` mean something), and qknorm's
adapters never ask it for what it refuses or computes differently.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _cases import split_latent

import qknorm
from qknorm.backends import registry
from qknorm.backends.aiter_adapters import group_dispatch_unsupported
from qknorm.reference import mxfp4_quantize, rms_norm_fp32
from qknorm.testing import assert_mxfp4_close, assert_norm_close, backend_override, fake_aiter

FN = torch.float8_e4m3fn
BF16 = torch.bfloat16


latent = split_latent


def refusals() -> list[str]:
    return [k for k in registry.get_backend("aiter").describe() if k.startswith("refused")]  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- 1. q-only plain requests


@pytest.mark.parametrize(("kind", "error"), [("unified_v14", TypeError), ("unified_v15", AttributeError),
                                             ("unified", AttributeError)])  # fmt: skip
def test_the_no_mode_needs_k_in_every_generation_and_qknorm_never_sends_it_none(kind: str, error: type):
    """#2958: No calls _fused_qk_rmsnorm(k=None): pybind TypeError; #3159 on: k.dtype AttributeError."""
    inp = latent()
    with fake_aiter.install(kind) as fake:
        import aiter.ops.fused_qk_rmsnorm_group_quant as gq

        with pytest.raises(error):
            gq.fused_qk_rmsnorm(torch.empty(4, 256, dtype=BF16), None, inp["q"], inp["q_weight"], 1e-6)
        fake_calls_before = len(fake.calls)
        with backend_override("aiter,torch"):
            out = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"])
            q_out = torch.empty(4, 256, dtype=BF16)
            qknorm.fused_qk_rmsnorm(q_out, None, inp["q"], inp["q_weight"])
            assert refusals() == []
        assert set(fake.calls[fake_calls_before:]) == {"group_quant_v14"}  # the no-quant mode (#3010)
    with backend_override("torch"):
        expected = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"]).q
    assert_norm_close(out.q, expected, "q")
    assert_norm_close(q_out, expected, "q_out of the unified entry's No mode, served by the no-quant mode")


# ----------------------------------------------------------------------------- 2. contiguity at #2527


def test_v0_1_12_requires_contiguous_tensors_and_qknorm_sends_copies():
    """#2527-#2637: TORCH_CHECK(x.is_contiguous()) for q, k, outputs and the scale."""
    inp = latent()
    with fake_aiter.install("group_quant_v12") as fake:
        import aiter.ops.fused_qk_rmsnorm_group_quant as gq

        with pytest.raises(RuntimeError, match="q must be contiguous"):
            gq.fused_qk_rmsnorm_group_quant(torch.empty(4, 256, dtype=FN), torch.empty(4, 2), inp["q"],
                                            inp["q_weight"], 1e-6)  # fmt: skip
        with backend_override("aiter,torch"):
            out = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"], quant="fp8_group",
                                    transpose_scale=True, return_unquantized=True)  # fmt: skip
            assert refusals() == []
        assert fake.calls[-1] == "group_quant_v12"
    with backend_override("torch"):
        ref = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"], quant="fp8_group",
                                transpose_scale=True, return_unquantized=True)  # fmt: skip
    assert torch.equal(out.q_scale, ref.q_scale) and torch.equal(out.q.float(), ref.q.float())  # type: ignore[arg-type]
    assert_norm_close(out.k, ref.k, "k")  # type: ignore[arg-type]


def test_from_2637_on_row_strides_are_accepted_and_scales_written_at_their_strides():
    inp = latent()
    with fake_aiter.install("group_quant"):
        import aiter.ops.fused_qk_rmsnorm_group_quant as gq

        storage = torch.full((4, 5), float("nan"))
        scale = storage[:, :2]  # padded rows: stride (5, 1)
        q8 = torch.empty(4, 256, dtype=FN)
        gq.fused_qk_rmsnorm_group_quant(q8, scale, inp["q"], inp["q_weight"], 1e-6)
    with backend_override("torch"):
        ref = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], quant="fp8_group")
    assert torch.equal(scale, ref.q_scale)  # type: ignore[arg-type]
    assert torch.isnan(storage[:, 2:]).all()  # padding untouched


# ----------------------------------------------------------------------------- 3. MXFP4 ties


def tie_row(n1: int = 256, gs: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x = +-1 (r = 1 exactly) and weights whose group amaxes are 1.5 * 2^k: y = +-w exactly."""
    x = torch.where(torch.arange(n1) % 2 == 0, 1.0, -1.0)[None].to(BF16)
    w = torch.tensor([1.5 * 2.0 ** (j // gs % 4 - 1) * (1.0 if j % gs == 0 else 0.5) for j in range(n1)]).to(BF16)
    return x, w


@pytest.mark.parametrize(("kind", "higher"), [("unified_v14", True), ("unified_v15", True), ("unified", False)])
def test_e8m0_scale_rule_before_and_after_3212(kind: str, higher: bool):
    """Before #3212 round_pow2(amax) * 0.25: one exponent higher than ceil_pow2(amax/6) at amax = 1.5*2^k."""
    x, w = tie_row()
    with fake_aiter.install(kind):
        import aiter.ops.fused_qk_rmsnorm_group_quant as gq
        from aiter.ops.enum import QuantType

        q4 = torch.empty(1, 128, dtype=torch.uint8).view(getattr(torch, "float4_e2m1fn_x2", torch.uint8))
        scale = torch.empty(1, 8, dtype=torch.uint8)
        gq.fused_qk_rmsnorm(q4, scale, x, w, 2.0**-30, quant_type=QuantType.per_1x32)
    y = rms_norm_fp32(x.float(), w, 2.0**-30, False)
    assert torch.equal(y.abs().reshape(8, 32).amax(-1), torch.tensor([0.75, 1.5, 3.0, 6.0] * 2))
    _, expected = mxfp4_quantize(y, 32)
    assert torch.equal(scale.int() - expected.int(), torch.full((1, 8), int(higher), dtype=torch.int32))


@pytest.mark.parametrize("kind", ["group_quant", "no_quant", "unified_v14", "unified_v15"])
def test_mxfp4_is_refused_before_3212_with_the_reason(kind: str):
    x, w = tie_row()
    with fake_aiter.install(kind) as fake, backend_override("aiter,torch"):
        out = qknorm.qk_rmsnorm(x, w, quant="mxfp4", q_epsilon=2.0**-30)
        assert fake.calls == []
        decision = registry.explain(_mxfp4_request(x, w))
    assert decision.backend == "torch" and "round_pow2(amax)/4" in decision.skipped[0][1]
    with backend_override("torch"):
        ref = qknorm.qk_rmsnorm(x, w, quant="mxfp4", q_epsilon=2.0**-30)
    assert_mxfp4_close(out.q, out.q_scale, ref.q, ref.q_scale)  # type: ignore[arg-type]
    assert torch.equal(out.q_scale, ref.q_scale)  # type: ignore[arg-type]


def _mxfp4_request(x: torch.Tensor, w: torch.Tensor) -> Any:
    from qknorm.checks import build_request
    from qknorm.quant import QuantMode

    return build_request(q=x, q_weight=w, q_epsilon=2.0**-30, mode=QuantMode.MXFP4, group_size=32,
                         q_out_quantized=torch.empty(1, 128, dtype=torch.uint8),
                         q_out_scale=torch.empty(1, 8, dtype=torch.uint8))  # fmt: skip


# ----------------------------------------------------------------------------- 4. the no-quant mode (#3010)


@pytest.mark.parametrize("kind", ["no_quant", "unified_v14", "unified"])
def test_no_quant_mode_applies_residual_and_gemma_and_qknorm_uses_it(kind: str):
    inp = latent()
    res = torch.randn(4, 256).to(BF16)
    with fake_aiter.install(kind) as fake, backend_override("aiter,torch"):
        out = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"], q_residual=res,
                                gemma_norm=True)  # fmt: skip
        assert set(fake.calls) == {"group_quant_v14"} and refusals() == []
    with backend_override("torch"):
        ref = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"], q_residual=res, gemma_norm=True)
    assert_norm_close(out.q, ref.q, "q")
    assert_norm_close(out.k, ref.k, "k")  # type: ignore[arg-type]
    assert torch.equal(out.q_residual_out, ref.q_residual_out)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- C++ checks mirrored


@pytest.mark.parametrize(("group_size", "max_n", "fp4", "ok"), [
    (32, 128, False, True), (128, 128, False, True), (64, 8192, False, True), (32, 2048, True, True),
    (16, 4096, False, False),  # thread_data_size 16: reduce-thread size 1 hits the switch's default
    (256, 4096, False, False), (48, 1024, False, False), (8, 64, False, False),
])  # fmt: skip
def test_group_dispatch_mirrors_the_host_checks(group_size: int, max_n: int, fp4: bool, ok: bool):
    assert (group_dispatch_unsupported(group_size, max_n, fp4) is None) is ok


@pytest.mark.parametrize(("group_size", "n1"), [(16, 2048), (256, 2048)])
def test_fake_refuses_what_the_dispatch_switch_refuses(group_size: int, n1: int):
    inp = latent(n1=n1)
    with fake_aiter.install("group_quant"):
        import aiter.ops.fused_qk_rmsnorm_group_quant as gq

        with pytest.raises(RuntimeError, match="reduce_thread_size"):
            gq.fused_qk_rmsnorm_group_quant(torch.empty(4, n1, dtype=FN), torch.empty(4, n1 // group_size),
                                            inp["q"], inp["q_weight"], 1e-6, group_size=group_size)  # fmt: skip


def test_fake_aborts_from_3137_on_where_earlier_ones_raised():
    inp = latent(n1=9216)
    for kind, outcome in (("unified_v14", RuntimeError), ("unified", fake_aiter.AiterAbort)):
        with fake_aiter.install(kind):
            import aiter.ops.fused_qk_rmsnorm_group_quant as gq

            with pytest.raises(outcome, match="n1/n2 <= 8192"):
                gq.fused_qk_rmsnorm_group_quant(torch.empty(4, 9216, dtype=FN), torch.empty(4, 72), inp["q"],
                                                inp["q_weight"], 1e-6)  # fmt: skip


# ----------------------------------------------------------------------------- bf16 stores on gfx942


def test_gfx942_truncates_bf16_stores_and_the_tolerance_table_absorbs_it_for_normalized_outputs():
    """opus ``fp32_to_bf16`` truncates on gfx94x (OPUS_FP32_to_BF16_DEFAULT 2, csrc/include/opus/opus.hpp).

    The normalized q and k then differ from round-to-nearest-even by at most one bf16 ulp, which
    the tolerance table's one-ulp entry for normalized outputs absorbs: qknorm serves bf16 norms
    through aiter on MI300. The residual sum, which qknorm promises bit for bit, does not survive
    truncation: the behavioural probe refuses that kind and the next backend serves it exactly.
    """
    inp = latent(m=64, n1=512, n2=256, seed=3)
    x = inp["q"].float()
    y = rms_norm_fp32(x, inp["q_weight"], 1e-6, False)
    with fake_aiter.install("unified", arch="gfx942") as fake, backend_override("aiter,torch"):
        q_out, k_out = torch.empty(64, 512, dtype=BF16), torch.empty(64, 256, dtype=BF16)
        qknorm.fused_qk_rmsnorm(q_out, None, inp["q"], inp["q_weight"], 1e-6, k_out=k_out, k=inp["k"],
                                k_weight=inp["k_weight"])  # fmt: skip
        assert fake.calls, "aiter served the plain norm"
        rne = y.to(BF16)
        assert not torch.equal(q_out, rne), "the fake truncates: some elements must differ from RNE"
        truncated = (y.view(torch.int32) & -65536).view(torch.float32).to(BF16)
        assert torch.equal(q_out, truncated)
        assert_norm_close(q_out, rne, "q_out (truncated on gfx942)")
        assert_norm_close(k_out, rms_norm_fp32(inp["k"].float(), inp["k_weight"], 1e-6, False).to(BF16), "k_out")

        res = torch.randn(64, 512, generator=torch.Generator().manual_seed(4)).to(BF16)
        res_out, q_unq = torch.empty(64, 512, dtype=BF16), torch.empty(64, 512, dtype=BF16)
        qknorm.fused_qk_rmsnorm_group_quant(None, None, inp["q"], inp["q_weight"], 1e-6, q_out_unquantized=q_unq,
                                            q_res_out=res_out, q_residual=res)  # fmt: skip
        assert torch.equal(res_out, (x + res.float()).to(BF16)), "q + residual stays bit exact (served elsewhere)"
        verdicts = [v for k, v in registry.get_backend("aiter").describe().items() if k.startswith("probe")]  # type: ignore[attr-defined]
        # The plain norm's probe passed despite truncation; the residual kind's did not.
        assert verdicts == ["matches the reference", "q_res_out differs from the exact residual sum (SPEC rule 1)"]
