"""GPU reliability: 64-bit offsets, several GPUs, streams. Skipped without a GPU.

Each test runs the operator through the public API with the default backend choice (the Triton
backend on a GPU) and compares with the reference computed on the same rows.
"""

from __future__ import annotations

import pytest
import torch

import qknorm
from qknorm.reference import fp8_quantize, rms_norm_fp32
from qknorm.testing import assert_fp8_close, assert_norm_close, assert_scales_close

pytestmark = pytest.mark.gpu

EPS = 1e-6


def _expected_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return rms_norm_fp32(x.float(), w, EPS, False)


@pytest.mark.parametrize("quant", [None, "fp8_group"])
def test_offsets_beyond_2_pow_31_elements(quant: str | None) -> None:
    """Large M with a large row stride: the last rows sit past element 2^31 of both input and output."""
    dev = torch.device("cuda")
    stride, m = 16384, (2**31) // 16384 + 257  # last row starts at element ~2^31 + 4.2M
    if torch.cuda.get_device_properties(dev).total_memory < 3 * m * stride * 2:
        pytest.skip("needs ~13 GB of GPU memory")
    buf = torch.empty(m, stride, dtype=torch.bfloat16, device=dev)
    buf[:, :2048].normal_()
    q, k = buf[:, :1536], buf[:, 1536:2048]
    qw = torch.randn(1536, dtype=torch.bfloat16, device=dev)
    kw = torch.randn(512, dtype=torch.bfloat16, device=dev)
    out_buf = torch.full((m, stride), -7.0, dtype=torch.bfloat16, device=dev)
    k_out = out_buf[:, 4096 : 4096 + 512]
    if quant is None:
        q_out = out_buf[:, :1536]
        qknorm.fused_qk_rmsnorm(q_out, None, q, qw, EPS, k_out=k_out, k=k, k_weight=kw)
    else:
        q_out = torch.empty(m, 1536, dtype=torch.float8_e4m3fn, device=dev)
        scale = torch.empty(m, 12, dtype=torch.float32, device=dev)
        qknorm.fused_qk_rmsnorm(
            q_out, scale, q, qw, EPS, k_out=k_out, k=k, k_weight=kw, quant_type=qknorm.QuantType.per_1x128
        )
    assert (m - 1) * stride > 2**31
    for rows in (slice(0, 64), slice(m - 64, m)):
        yk = _expected_norm(k[rows], kw)
        assert_norm_close(k_out[rows], yk.to(torch.bfloat16), "k_out")
        yq = _expected_norm(q[rows], qw)
        if quant is None:
            assert_norm_close(q_out[rows], yq.to(torch.bfloat16), "q_out")
        else:
            codes, scales = fp8_quantize(yq, 128, torch.float8_e4m3fn)
            assert_fp8_close(q_out[rows], codes)
            assert_scales_close(scale[rows], scales)
    # Bytes between the output windows stay untouched.
    assert bool((out_buf[-64:, 2048:4096] == -7.0).all())
    assert bool((out_buf[-64:, 4096 + 512 :] == -7.0).all())


def test_tensors_on_second_gpu_run_there() -> None:
    """Tensors on cuda:1 while cuda:0 is current run on cuda:1 and give the reference result."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    latent = torch.randn(300, 2112, dtype=torch.bfloat16, device=dev)
    q, k = latent[:, :1536], latent[:, 1536:2048]
    qw = torch.randn(1536, dtype=torch.bfloat16, device=dev)
    kw = torch.randn(512, dtype=torch.bfloat16, device=dev)
    out = qknorm.qk_rmsnorm(q, qw, k, kw, quant="fp8_group")
    torch.cuda.synchronize(dev)
    assert out.q.device == dev and out.k.device == dev  # type: ignore[union-attr]
    assert torch.cuda.current_device() == 0
    yq = _expected_norm(q, qw)
    codes, scales = fp8_quantize(yq, 128, torch.float8_e4m3fn)
    assert_fp8_close(out.q, codes)
    assert_scales_close(out.q_scale, scales)  # type: ignore[arg-type]
    assert_norm_close(out.k, _expected_norm(k, kw).to(torch.bfloat16), "k")  # type: ignore[arg-type]


def test_tensors_split_across_gpus_are_rejected() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q = torch.randn(4, 256, dtype=torch.bfloat16, device="cuda:0")
    k = torch.randn(4, 128, dtype=torch.bfloat16, device="cuda:1")
    qw = torch.ones(256, dtype=torch.bfloat16, device="cuda:0")
    kw = torch.ones(128, dtype=torch.bfloat16, device="cuda:1")
    q_out = torch.full_like(q, 3.0)
    k_out = torch.full_like(k, 3.0)
    with pytest.raises(ValueError, match="k must be on cuda:0"):
        qknorm.fused_qk_rmsnorm(q_out, None, q, qw, EPS, k_out=k_out, k=k, k_weight=kw)
    assert bool((q_out == 3.0).all()) and bool((k_out == 3.0).all())


def test_runs_on_the_current_stream_in_order() -> None:
    """On a side stream, the op sees the producer's writes and the consumer sees the op's, with no sync."""
    dev = torch.device("cuda")
    side = torch.cuda.Stream()
    m = 8192
    src = torch.randn(m, 2112, dtype=torch.bfloat16, device=dev)
    qw = torch.randn(1536, dtype=torch.bfloat16, device=dev)
    kw = torch.randn(512, dtype=torch.bfloat16, device=dev)
    qknorm.qk_rmsnorm(src[:, :1536], qw, src[:, 1536:2048], kw)  # select and compile outside the timing
    torch.cuda.synchronize()
    latent = torch.zeros(m, 2112, dtype=torch.bfloat16, device=dev)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # A slow producer on the side stream: if the op ran on another stream it would read zeros.
        a = torch.randn(4096, 4096, device=dev)
        for _ in range(20):
            a = a @ a
            a = a / a.norm()
        latent.copy_(src + 0 * a[0, 0].to(torch.bfloat16))
        out = qknorm.qk_rmsnorm(latent[:, :1536], qw, latent[:, 1536:2048], kw)
        result_q = out.q.clone()
    torch.cuda.synchronize()
    assert_norm_close(result_q, _expected_norm(src[:, :1536], qw).to(torch.bfloat16), "q")
