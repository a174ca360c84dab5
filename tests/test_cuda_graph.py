"""GPU: CUDA-graph capture and replay after qknorm.warmup, the capture-time error, opcheck and compile on CUDA.

Results are compared with :mod:`qknorm.reference` within the tolerance table
(:mod:`qknorm.testing`): the GPU backend and the reference may differ by SPEC §4's ulps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_ops import VARIANTS, expected_outputs, make_args, positional

import qknorm
from qknorm.backends import registry
from qknorm.checks import build_request
from qknorm.ops import PIPELINE
from qknorm.quant import QuantMode
from qknorm.reference import qk_rmsnorm_reference
from qknorm.testing import assert_fp8_close, assert_mxfp4_close, assert_norm_close, assert_scales_close

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16
Q_LORA, KV_LORA, LATENT = 1536, 512, 2112  # DeepSeek-V3
OP = torch.ops.qknorm.fused_qk_rmsnorm.default


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    PIPELINE.clear()
    yield
    torch.cuda.synchronize()
    torch._dynamo.reset()


def assert_outputs_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], mode: str | None) -> None:
    """Compare named outputs with the reference's, by kind (norm values, FP8 codes and scales, MXFP4)."""
    if mode == "mxfp4":
        assert_mxfp4_close(got["q_out_quantized"], got["q_out_scale"], want["q_out_quantized"], want["q_out_scale"])
    for name, value in want.items():
        if mode == "mxfp4" and name in ("q_out_quantized", "q_out_scale"):
            continue
        if name == "q_out_quantized":
            assert_fp8_close(got[name], value, name)
        elif name == "q_out_scale":
            assert_scales_close(got[name], value, name)
        else:
            assert_norm_close(got[name], value, name)


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_cuda(variant: str) -> None:
    a = make_args(variant, device="cuda")
    tests = ["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if a["q_out_quantized"] is None:
        tests.insert(0, "test_schema")  # allclose has no FP8/FP4/E8M0 kernels, as on the CPU
    torch.library.opcheck(OP, positional(a), test_utils=tests)
    a = make_args(variant, device="cuda", seed=5)
    want = expected_outputs(a)
    OP(*positional(a))
    mode = {"mxfp4": "mxfp4"}.get(a["quant_mode"])
    assert_outputs_close({n: a[n] for n in want}, want, mode)


# ----------------------------------------------------------------------------- CUDA graphs


def _inputs(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(m, LATENT, generator=gen).to(BF16).cuda()
    qw = (torch.rand(Q_LORA, generator=gen) + 0.5).to(BF16).cuda()
    kw = (torch.rand(KV_LORA, generator=gen) + 0.5).to(BF16).cuda()
    return latent, qw, kw


def _reference(latent: torch.Tensor, qw: torch.Tensor, kw: torch.Tensor, quant: str | None) -> dict[str, Any]:
    """The reference's outputs for qk_rmsnorm(q, qw, k, kw, quant=quant) on the latent's slices."""
    q, k = latent[:, :Q_LORA], latent[:, Q_LORA : Q_LORA + KV_LORA]
    m = q.shape[0]
    out: dict[str, Any] = {"k_out": torch.empty(m, KV_LORA, dtype=BF16, device="cuda")}
    fp8 = torch.empty(m, Q_LORA, dtype=torch.float8_e4m3fn, device="cuda")
    if quant is None:
        out["q_out"] = torch.empty(m, Q_LORA, dtype=BF16, device="cuda")
    elif quant == "mxfp4":
        out["q_out_quantized"] = torch.empty(m, Q_LORA // 2, dtype=torch.uint8, device="cuda")
        out["q_out_scale"] = torch.empty(m, Q_LORA // 32, dtype=torch.uint8, device="cuda")
    else:
        cols = {"fp8_group": Q_LORA // 128, "fp8_token": 1}.get(quant)
        out["q_out_quantized"] = fp8
        out["q_out_scale"] = torch.empty(1 if cols is None else m, 1 if cols is None else cols, device="cuda")
    group = {"fp8_group": 128, "mxfp4": 32}.get(quant or "")
    req = build_request(
        q=q, q_weight=qw, q_epsilon=1e-6, k=k, k_weight=kw, k_out=out["k_out"], q_out=out.get("q_out"),
        mode=QuantMode(quant or "none"), group_size=group, q_out_quantized=out.get("q_out_quantized"),
        q_out_scale=out.get("q_out_scale"),
    )  # fmt: skip
    qk_rmsnorm_reference(req)
    if quant == "fp8_tensor":
        out["q_out_scale"] = out["q_out_scale"].reshape(1)
    return out


def _named(out: qknorm.QKNormOutput, quant: str | None) -> dict[str, Any]:
    named = {"k_out": out.k}
    if quant is None:
        named["q_out"] = out.q
    else:
        named.update(q_out_quantized=out.q, q_out_scale=out.q_scale)
    return named


MODES = (None, "fp8_group", "fp8_token", "fp8_tensor", "mxfp4")


@pytest.mark.parametrize("quant", MODES)
def test_warmup_then_capture_and_replay(quant: str | None, pdl: bool) -> None:
    records = qknorm.warmup(Q_LORA, KV_LORA, modes=(quant,), max_tokens=256, row_stride=LATENT)
    assert [r.quant for r in records] == [quant]
    for m in (1, 5, 64):  # 5 and 64 sit inside buckets, not on their edges
        latent, qw, kw = _inputs(m, seed=m)
        q, k = latent[:, :Q_LORA], latent[:, Q_LORA : Q_LORA + KV_LORA]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = qknorm.qk_rmsnorm(q, qw, k, kw, quant=quant)
        for seed in (100 + m, 200 + m):  # replay twice on new data in the same buffers
            fresh, _, _ = _inputs(m, seed=seed)
            latent.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            assert_outputs_close(_named(out, quant), _reference(latent, qw, kw, quant), {"mxfp4": "mxfp4"}.get(quant))


def test_capture_of_the_in_place_aiter_entry() -> None:
    qknorm.warmup(Q_LORA, KV_LORA, modes=("fp8_group",), max_tokens=16, row_stride=LATENT)
    latent, qw, kw = _inputs(8, seed=1)
    q, k = latent[:, :Q_LORA], latent[:, Q_LORA : Q_LORA + KV_LORA]
    q8 = torch.empty(8, Q_LORA, dtype=torch.float8_e4m3fn, device="cuda")
    scale = torch.empty(8, Q_LORA // 128, device="cuda")
    k_out = torch.empty(8, KV_LORA, dtype=BF16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qknorm.fused_qk_rmsnorm_group_quant(q8, scale, q, qw, 1e-6, None, k_out, None, k, kw, 1e-6)
    latent.copy_(_inputs(8, seed=2)[0])
    graph.replay()
    torch.cuda.synchronize()
    got = {"q_out_quantized": q8, "q_out_scale": scale, "k_out": k_out}
    assert_outputs_close(got, _reference(latent, qw, kw, "fp8_group"), "fp8_group")


def test_capture_without_warmup_raises_a_clear_error() -> None:
    registry.reset()  # nothing selected yet: the first call would have to probe
    latent, qw, kw = _inputs(4, seed=3)
    q, k = latent[:, :Q_LORA], latent[:, Q_LORA : Q_LORA + KV_LORA]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(registry.BackendError, match=r"during CUDA-graph capture; call qknorm\.warmup"):
        with torch.cuda.graph(graph):
            qknorm.qk_rmsnorm(q, qw, k, kw, quant="fp8_group")
    # The failed capture left the stream usable: an eager call works and is right.
    out = qknorm.qk_rmsnorm(q, qw, k, kw, quant="fp8_group")
    torch.cuda.synchronize()
    assert_outputs_close(_named(out, "fp8_group"), _reference(latent, qw, kw, "fp8_group"), "fp8_group")


# ----------------------------------------------------------------------------- torch.compile on CUDA


def _block(latent: torch.Tensor, qw: torch.Tensor, kw: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, k = latent[:, :Q_LORA], latent[:, Q_LORA : Q_LORA + KV_LORA]
    a = qknorm.qk_rmsnorm(q, qw, k, kw, quant="fp8_group")
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    qknorm.fused_qk_rmsnorm(qo, None, q, qw, 1e-6, None, ko, None, k, kw, 1e-6)
    return a.q, a.q_scale, a.k, qo, ko  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_on_cuda_matches_eager(mode: str) -> None:
    qknorm.warmup(Q_LORA, KV_LORA, modes=(None, "fp8_group"), max_tokens=64, row_stride=LATENT)
    compiled = torch.compile(_block, fullgraph=True, dynamic=mode == "default", mode=mode)
    for m in (3, 7, 3):
        latent, qw, kw = _inputs(m, seed=m)
        want = _block(latent, qw, kw)
        got = compiled(latent, qw, kw)
        torch.cuda.synchronize()
        for i, (g, w) in enumerate(zip(got, want)):
            # Same backend, same kernels: the compiled graph must reproduce eager bit for bit.
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), f"output {i} at M={m}"
