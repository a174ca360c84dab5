"""``qknorm.warmup`` for both operators: dispatch by operator name, the sizes each warms, capture after it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import qknorm
from qknorm.backends import registry
from qknorm.rope.ops import OP
from qknorm.rope.reference import qk_norm_rope_reference
from qknorm.testing import backend_override


class _RecordingRope:
    """A qk_norm_rope backend that records each request's token count and runs the reference."""

    name = "recording"

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def available(self) -> tuple[bool, str]:
        return True, "test backend"

    def supports(self, req: Any) -> str | None:
        return None

    def warmup_sizes(self, max_t: int) -> list[int]:
        """Its buckets: 1-3, 4-15, 16 up (a size past max_t is clipped to it)."""
        return [3, 15, max_t + 5]

    def run(self, req: Any) -> None:
        self.tokens.append(req.plan.t)
        qk_norm_rope_reference(req)


def test_warmup_by_operator_name_warms_qk_norm_rope() -> None:
    backend = _RecordingRope()
    previous = registry.register_backend("recording", lambda: backend, op=OP)  # type: ignore[arg-type,return-value]
    try:
        with backend_override("recording"):
            records = qknorm.warmup("qk_norm_rope", 4, 2, 16, device="cpu", max_tokens=20,
                                    cache_dtype=torch.bfloat16, block_size=4)  # fmt: skip
    finally:
        registry.register_backend("recording", previous, op=OP)
    # The selecting call at T = 1, then the sizes the selected backend asks for, clipped to max_tokens.
    assert records == [qknorm.WarmupRecord(None, "recording", (1, 3, 15, 20))]
    assert backend.tokens == [1, 3, 15, 20]


def test_triton_warmup_sizes_reach_every_rows_per_program() -> None:
    """Rows per program are min(block, next_pow2(T * heads)): every power of two up to max_tokens, and max_tokens."""
    from qknorm.rope.triton_launch import RopeTritonBackend

    sizes = RopeTritonBackend().warmup_sizes(300)
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert RopeTritonBackend().warmup_sizes(0) == []


def test_warmup_by_operator_name_warms_fused_qk_rmsnorm_as_before() -> None:
    named = qknorm.warmup("fused_qk_rmsnorm", 256, 64, device="cpu", modes=("fp8_group",), max_tokens=5)
    positional = qknorm.warmup(256, 64, device="cpu", modes=("fp8_group",), max_tokens=5)
    keywords = qknorm.warmup(q_width=256, k_width=64, device="cpu", modes=("fp8_group",), max_tokens=5)
    assert named == positional == keywords == [qknorm.WarmupRecord("fp8_group", "torch", (1, 5))]


def test_warmup_rejects_an_unknown_operator() -> None:
    with pytest.raises(ValueError, match=r"operator must be 'fused_qk_rmsnorm' or 'qk_norm_rope', got 'rope'"):
        qknorm.warmup("rope", 32, 8, 128)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_capture_after_warmup_qk_norm_rope_matches_eager(pdl: bool) -> None:
    """Qwen3-8B shapes: qknorm.warmup("qk_norm_rope", ...), then capture, replay and compare with eager."""
    hq, hk, d, t, bs = 32, 8, 128, 48, 16
    dev = torch.device("cuda")
    qknorm.warmup("qk_norm_rope", hq, hk, d, max_tokens=64, cache_dtype=torch.bfloat16, block_size=bs, max_position=256)
    gen = torch.Generator(device="cpu").manual_seed(3)
    qkv = torch.randn((t, (hq + 2 * hk) * d), generator=gen).to(torch.bfloat16).to(dev)
    w = torch.rand(d, generator=gen).to(torch.bfloat16).to(dev)
    table = torch.rand((256, d), generator=gen).to(dev)
    pos = torch.randint(0, 256, (t,), generator=gen).to(dev)
    slots = torch.randperm(8 * bs, generator=gen)[:t].to(dev)

    def call(cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = (x.view(t, -1, d) for x in qkv.split((hq * d, hk * d, hk * d), dim=-1))
        out = qknorm.qk_norm_rope(q, k, w, w, table, pos, v=v, k_cache=cache[0], v_cache=cache[1], slot_mapping=slots)
        return out.q

    eager_cache = (torch.zeros((8, bs, hk, d), dtype=torch.bfloat16, device=dev), torch.zeros((8, bs, hk, d), dtype=torch.bfloat16, device=dev))
    eager_q = call(eager_cache)
    graph_cache = (torch.zeros_like(eager_cache[0]), torch.zeros_like(eager_cache[1]))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_q = call(graph_cache)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_q, eager_q)
    assert torch.equal(graph_cache[0], eager_cache[0]) and torch.equal(graph_cache[1], eager_cache[1])
    assert graph_cache[0].abs().sum() > 0  # the replay wrote the cache
