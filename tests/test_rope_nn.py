"""qknorm.nn.QKNormRoPE: HF Qwen3 parameter names, the rotary table, and calls equal to the functional entry."""

from __future__ import annotations

import pytest
import torch
from _rope_cases import DEVICE

import qknorm
from qknorm.nn import QKNormRoPE
from qknorm.rope.nn import rope_cos_sin_cache

BF16 = torch.bfloat16


def test_state_dict_uses_hf_qwen3_names_and_loads() -> None:
    layer = QKNormRoPE(4, 2, 16, dtype=BF16)
    assert list(layer.state_dict()) == ["q_norm.weight", "k_norm.weight"]
    hf = {"q_norm.weight": torch.full((16,), 0.5, dtype=BF16), "k_norm.weight": torch.full((16,), 2.0, dtype=BF16)}
    layer.load_state_dict(hf)
    assert torch.equal(layer.q_norm.weight, hf["q_norm.weight"])  # type: ignore[union-attr]
    assert layer.q_norm.variance_epsilon == 1e-6  # type: ignore[union-attr]


def test_weightless_and_gemma_variants() -> None:
    assert list(QKNormRoPE(2, 1, 8, weightless=True).state_dict()) == []
    gemma = QKNormRoPE(2, 1, 8, gemma_norm=True)
    assert torch.equal(gemma.q_norm.weight, torch.zeros(8))  # type: ignore[union-attr]


def test_rotary_table_is_vllms() -> None:
    table = rope_cos_sin_cache(8, 100, 1e6)
    inv = 1e6 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = torch.arange(100, dtype=torch.float64)[:, None] * inv
    torch.testing.assert_close(table.double(), torch.cat((ang.cos(), ang.sin()), 1), rtol=0, atol=1e-4)
    assert QKNormRoPE(2, 1, 16, rotary_dim=8, max_position=100).cos_sin_cache.shape == (100, 8)


@pytest.mark.parametrize("rotary_dim", [None, 8, 0])
def test_forward_equals_the_functional_entry(rotary_dim: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    layer = QKNormRoPE(4, 2, 16, rotary_dim=rotary_dim, max_position=32, is_neox=rotary_dim != 8, dtype=BF16, device=DEVICE)
    with torch.no_grad():
        layer.q_norm.weight.copy_(torch.randn(16, generator=g))  # type: ignore[union-attr]
    qkv = torch.randn(3, 8 * 16, generator=g).to(BF16).to(DEVICE)
    q, k, v = qkv.split((64, 32, 32), dim=-1)
    pos = torch.tensor([0, 5, 31], device=DEVICE)
    kc = torch.zeros(2, 4, 2, 16, dtype=BF16, device=DEVICE)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([1, -1, 6], device=DEVICE)
    got = layer(q, k, pos, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots)
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    table = layer.cos_sin_cache
    want = qknorm.qk_norm_rope(
        q.unflatten(-1, (4, 16)), k.unflatten(-1, (2, 16)), layer.q_norm.weight, layer.k_norm.weight,  # type: ignore[union-attr]
        table, None if table is None else pos, is_neox=layer.is_neox, v=v.unflatten(-1, (2, 16)), k_cache=kc2,
        v_cache=vc2, slot_mapping=slots,
    )  # fmt: skip
    assert got.k is None and torch.equal(got.q, want.q)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and kc.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=0, num_kv_heads=1, head_dim=8), "num_heads must be a positive int"),
    (dict(num_heads=2, num_kv_heads=1, head_dim=8, rotary_dim=3), "rotary_dim must be an even int in \\[0, head_dim=8\\]"),
    (dict(num_heads=2, num_kv_heads=1, head_dim=8, rotary_dim=16), "got 16"),
])  # fmt: skip
def test_bad_configuration_is_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QKNormRoPE(**kwargs)
