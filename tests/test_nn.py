"""qknorm.nn: MLAQKNorm and RMSNorm against hand-written RMSNorm and quantization in fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qknorm
from qknorm.nn import MLAQKNorm, MLAQKNormOutput, RMSNorm
from qknorm.reference import mxfp4_quantize
from qknorm.testing import assert_fp8_close, assert_mxfp4_close, assert_norm_close, assert_scales_close

BF16 = torch.bfloat16
QL, KL, ROPE = 256, 128, 32  # small MLA ranks: tests stay fast; the module's defaults are DeepSeek-V3's


@pytest.fixture(autouse=True)
def _fresh_compile():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rms(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm in float64 (an independent oracle), rounded to x's dtype."""
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + (1.0 if gemma else 0.0))
    return y.to(x.dtype)


def rms32(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Unrounded fp32 RMSNorm, the input of quantization."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def fp8_groups(y: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x gs FP8 e4m3fn quantization written from its definition: scale = amax / 448."""
    g = y.reshape(*y.shape[:-1], -1, gs)
    scale = g.abs().amax(-1).clamp_min(1e-10) / 448.0
    codes = (g / scale.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes.reshape(y.shape), scale


def random_module(**kwargs: object) -> MLAQKNorm:
    gen = torch.Generator().manual_seed(3)
    mod = MLAQKNorm(QL, KL, ROPE, dtype=BF16, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        mod.q_a_layernorm.weight.copy_(1 + 0.1 * torch.randn(QL, generator=gen))
        mod.kv_a_layernorm.weight.copy_(1 + 0.1 * torch.randn(KL, generator=gen))
    return mod


def latent(*lead: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*lead, QL + KL + ROPE, generator=torch.Generator().manual_seed(seed)).to(BF16)


def test_state_dict_uses_deepseek_names_and_loads() -> None:
    mod = MLAQKNorm(dtype=BF16)
    assert list(mod.state_dict()) == ["q_a_layernorm.weight", "kv_a_layernorm.weight"]
    assert mod.q_a_layernorm.weight.shape == (1536,) and mod.kv_a_layernorm.weight.shape == (512,)
    # A DeepSeek-V3 attention layer's checkpoint entries, prefix stripped.
    layer = {
        "q_a_layernorm.weight": torch.full((1536,), 0.5, dtype=BF16),
        "kv_a_layernorm.weight": torch.full((512,), 2.0, dtype=BF16),
        "q_a_proj.weight": torch.zeros(1536, 8, dtype=BF16),
    }
    result = mod.load_state_dict(layer, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["q_a_proj.weight"]
    assert torch.all(mod.q_a_layernorm.weight == 0.5) and torch.all(mod.kv_a_layernorm.weight == 2.0)


def test_defaults_are_deepseek_v3() -> None:
    mod = MLAQKNorm(dtype=BF16)
    out = mod(torch.randn(3, 2112).to(BF16))
    assert out.q.shape == (3, 1536) and out.k_nope.shape == (3, 512) and out.k_rope.shape == (3, 64)
    assert mod.q_a_layernorm.eps == 1e-6 and mod.kv_a_layernorm.variance_epsilon == 1e-6


def test_latent_without_quantization() -> None:
    mod = random_module(q_eps=1e-6, kv_eps=1e-5)
    x = latent(7)
    out = mod(x)
    assert isinstance(out, MLAQKNormOutput) and out.q_scale is None
    assert_norm_close(out.q, rms(x[:, :QL], mod.q_a_layernorm.weight, 1e-6), "q")
    assert_norm_close(out.k_nope, rms(x[:, QL : QL + KL], mod.kv_a_layernorm.weight, 1e-5), "k_nope")
    assert out.k_rope.data_ptr() == x[:, QL + KL :].data_ptr(), "k_rope must be a view of the latent"
    assert out.k_rope.stride() == x.stride() and torch.equal(out.k_rope, x[:, QL + KL :])


def test_fp8_group_quantization_of_q() -> None:
    mod = random_module(quant="fp8_group")
    x = latent(9)
    out = mod(x)
    y = rms32(x[:, :QL], mod.q_a_layernorm.weight, 1e-6)
    codes, scale = fp8_groups(y, 128)
    assert out.q.dtype == torch.float8_e4m3fn and out.q_scale.shape == (9, QL // 128)
    assert_scales_close(out.q_scale, scale)
    assert_fp8_close(out.q, codes)
    assert_norm_close(out.k_nope, rms(x[:, QL : QL + KL], mod.kv_a_layernorm.weight, 1e-6), "k_nope")


def test_mxfp4_quantization_of_q() -> None:
    mod = random_module(quant="mxfp4")
    x = latent(4)
    out = mod(x)
    codes, scales = mxfp4_quantize(rms32(x[:, :QL], mod.q_a_layernorm.weight, 1e-6), 32)
    assert out.q.shape == (4, QL // 2) and out.q_scale.shape == (4, QL // 32)
    assert_mxfp4_close(out.q, out.q_scale, codes, scales)


def test_separate_q_and_kv_inputs() -> None:
    mod = random_module()
    x = latent(5)
    q, kv = x[:, :QL], x[:, QL:]
    with_rope = mod(q, kv)
    assert with_rope.k_rope.data_ptr() == kv[:, KL:].data_ptr()
    without_rope = mod(q, kv[:, :KL])
    assert without_rope.k_rope is None
    fused = mod(x)
    for out in (with_rope, without_rope):
        assert torch.equal(out.q, fused.q) and torch.equal(out.k_nope, fused.k_nope)


def test_leading_dimensions() -> None:
    mod = random_module(quant="fp8_group")
    x = latent(2, 3)
    out = mod(x)
    flat = mod(x.reshape(6, -1))
    assert out.q.shape == (2, 3, QL) and out.q_scale.shape == (2, 3, QL // 128)
    assert out.k_nope.shape == (2, 3, KL) and out.k_rope.shape == (2, 3, ROPE)
    assert torch.equal(out.q.reshape(6, -1).view(torch.uint8), flat.q.view(torch.uint8))
    assert torch.equal(out.k_nope.reshape(6, -1), flat.k_nope)


def test_gemma_norm_starts_at_identity_weights() -> None:
    mod = MLAQKNorm(QL, KL, ROPE, gemma_norm=True, dtype=BF16)
    assert torch.all(mod.q_a_layernorm.weight == 0)
    x = latent(3)
    out = mod(x)
    ones = torch.ones(QL, dtype=BF16)
    assert_norm_close(out.q, rms(x[:, :QL], ones, 1e-6), "q (1 + 0 weight)")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m(latent(2)[:, :-1]), r"x must be the latent \[\.\.\., 416\]"),
        (lambda m: m(latent(2)[:, :QL], latent(2)[:, :100]), r"kv must be \[\.\.\., 160\] or \[\.\.\., 128\]"),
        (lambda m: m(latent(2)[:, :100], latent(2)[:, :KL]), r"x must be q \[\.\.\., 256\]"),
        (lambda m: m(latent(2).float()), "q must have dtype"),
    ],
)
def test_bad_inputs_raise_before_writing(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((TypeError, ValueError), match=message):
        call(random_module())


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="quant must be one of"):
        MLAQKNorm(quant="int8")
    with pytest.raises(ValueError, match="q_lora_rank must be a positive int"):
        MLAQKNorm(0)


class DeepseekV3RMSNorm(nn.Module):
    """The norm module of DeepSeek's modeling code (weight + variance_epsilon)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=BF16))
        self.variance_epsilon = eps


def test_from_norms_shares_the_model_parameters() -> None:
    q_norm, kv_norm = DeepseekV3RMSNorm(QL, 1e-6), DeepseekV3RMSNorm(KL, 1e-5)
    mod = MLAQKNorm.from_norms(q_norm, kv_norm, ROPE, quant="fp8_group")
    assert mod.q_a_layernorm.weight is q_norm.weight and mod.kv_a_layernorm.weight is kv_norm.weight
    assert mod.kv_a_layernorm.eps == 1e-5 and mod.quant == "fp8_group"
    with torch.no_grad():
        kv_norm.weight.fill_(3.0)  # the model's update is the module's
    x = latent(2)
    assert_norm_close(mod(x).k_nope, rms(x[:, QL : QL + KL], kv_norm.weight, 1e-5), "k_nope")


def test_rmsnorm_module() -> None:
    norm = RMSNorm(KL, eps=1e-5, dtype=BF16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, KL).to(BF16)
    assert_norm_close(norm(x), rms(x, norm.weight, 1e-5), "RMSNorm")


@pytest.mark.parametrize("quant", [None, "fp8_group"])
def test_module_compiles_fullgraph_with_dynamic_tokens(quant: str | None) -> None:
    mod = random_module(quant=quant)
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True, dynamic=True)
    for t in (3, 8):
        x = latent(t, seed=t)
        want, got = mod(x), compiled(x)
        assert got.q.dtype == want.q.dtype
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
        assert torch.equal(got.k_nope, want.k_nope) and torch.equal(got.k_rope, want.k_rope)
        if quant is not None:
            assert torch.equal(got.q_scale, want.q_scale)


def test_module_is_exported_at_top_level() -> None:
    assert qknorm.MLAQKNorm is MLAQKNorm and qknorm.MLAQKNormOutput is MLAQKNormOutput
