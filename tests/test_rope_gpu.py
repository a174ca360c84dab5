"""GPU: qk_norm_rope at real model shapes against the reference, CUDA graphs, compile, opcheck.

Shapes: Qwen3-8B (Hq 32, Hk 8, D 128) up to T = 65536, Qwen3-235B (64/4/128), Gemma 3 (D 256,
gemma norm), GLM-4.5 partial rotary (64 of 128, Hq 96, Hk 8), with bf16 and FP8 caches; q, k
and v are views of the packed qkv projection as the models pass them. The reference runs on
the same GPU; comparisons use SPEC_ROPE_CACHE §3's tolerances (:mod:`qknorm.rope.testing`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from _rope_cases import RopeCase, make_call, reference_request, run_case, written_slots

import qknorm
from qknorm.backends import registry
from qknorm.backends.registry import BackendError
from qknorm.rope.ops import PIPELINE
from qknorm.rope.reference import qk_norm_rope_reference
from qknorm.rope.testing import assert_bits_equal, assert_rope_close, assert_rope_fp8_close, fp8_slack, pair_magnitude
from qknorm.testing import backend_override

pytestmark = pytest.mark.gpu

BF16, E4M3 = torch.bfloat16, torch.float8_e4m3fn


def _model(name: str, t: int, **kw: Any) -> RopeCase:
    shapes = {
        "qwen3-8b": dict(hq=32, hk=8, d=128),
        "qwen3-235b": dict(hq=64, hk=4, d=128),
        "gemma3": dict(hq=16, hk=8, d=256, gemma=True),
        "glm-partial": dict(hq=96, hk=8, d=128, rot=64),
    }
    base = dict(t=t, block_size=16, num_blocks=-(-t // 16) + 3, max_pos=max(t, 64), pad_slots=3)
    return RopeCase(**{**base, **shapes[name], **kw})


REAL = [
    _model("qwen3-8b", 1, cache=BF16), _model("qwen3-8b", 7, cache=E4M3), _model("qwen3-8b", 256, cache=BF16),
    _model("qwen3-8b", 4096, cache=E4M3, q_fp8=E4M3), _model("qwen3-8b", 65536, cache=BF16),
    _model("qwen3-8b", 65536, cache=E4M3, cache_layout="unbind"),
    _model("qwen3-235b", 1, cache=E4M3, scale_heads=True), _model("qwen3-235b", 2048, cache=BF16, cache_layout="hnd"),
    _model("qwen3-235b", 16384, cache=E4M3, in_place=True),
    _model("gemma3", 3, cache=BF16), _model("gemma3", 8192, cache=E4M3, cache_layout="hnd"),
    _model("glm-partial", 1, cache=BF16), _model("glm-partial", 4096, cache=E4M3, give_k_out=True),
    _model("glm-partial", 300, is_neox=False), _model("qwen3-8b", 1000, dtype=torch.float16, cache=torch.float16),
]  # fmt: skip


@pytest.mark.parametrize("case", REAL, ids=lambda c: f"{c.hq}/{c.hk}/{c.d}-r{c.r}-T{c.t}-{c.cache}-{c.cache_layout}")
def test_real_shapes_match_reference(case: RopeCase) -> None:
    run_case(case, "triton")
    torch.cuda.empty_cache()


def test_default_backend_on_cuda_is_triton() -> None:
    call = make_call(RopeCase(cache=BF16))
    assert registry.select(reference_request(call)).name == "triton"


def test_deterministic_across_calls() -> None:
    case = _model("qwen3-8b", 3000, cache=E4M3)
    outs = []
    for _ in range(2):
        call = make_call(case)
        out = qknorm.qk_norm_rope(**call)
        outs.append((out.q.clone(), call["k_cache"].clone(), call["v_cache"].clone()))
    for a, b in zip(*outs):
        assert_bits_equal(a, b, "repeat")


def test_repeated_calls_take_the_direct_launch_and_stay_right(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first call compiles, later calls of its plan launch the compiled kernel directly:
    new data in the same buffers and new buffers must be right; an unaligned view (Triton's own
    path) and new strides (a plan of their own, equal in every other field) must not take it."""
    case = _model("qwen3-8b", 37, cache=E4M3, q_fp8=E4M3)
    call = make_call(case)
    backend = registry.select(reference_request(call))
    backend._planned.clear()
    regular: list[int] = []
    launch = backend._launch
    monkeypatch.setattr(backend, "_launch", lambda req: (regular.append(1), launch(req))[1])
    for i in range(5):
        if i == 1:
            call["q"].copy_(torch.randn_like(call["q"], dtype=torch.float32))
        elif i == 2:
            call = make_call(replace(case, seed=5))
        elif i == 3:  # q starting 2 bytes into its buffer: not 16-byte aligned
            buf = torch.empty(case.t * case.hq * case.d + 1, dtype=BF16, device="cuda")
            call["q"] = buf[1:].view(case.t, case.hq, case.d).copy_(call["q"])
        elif i == 4:  # q contiguous instead of a view of the packed qkv: other strides
            call = make_call(replace(case, seed=6))
            call["q"] = call["q"].contiguous()
        exp = reference_request(call)
        qk_norm_rope_reference(exp)
        out = qknorm.qk_norm_rope(**call)
        assert_rope_fp8_close(out.q, exp.q_out, f"q_out (call {i})", fp8_slack(exp, "q", exp.q_scale))  # type: ignore[arg-type]
        tok, blk, off = written_slots(exp)
        assert_rope_fp8_close(call["k_cache"][blk, off], exp.k_cache[blk, off], f"k_cache (call {i})",  # type: ignore[index]
                              fp8_slack(exp, "k", exp.k_scale)[tok])  # type: ignore[arg-type]  # fmt: skip
        assert_bits_equal(call["v_cache"][blk, off], exp.v_cache[blk, off], f"v_cache (call {i})")  # type: ignore[index]
    assert len(regular) == 3, f"calls through the regular launch path: {len(regular)} (expected calls 0, 3 and 4)"


def _graph_call(t: int) -> tuple[dict[str, Any], RopeCase]:
    case = _model("qwen3-8b", t, cache=E4M3, q_fp8=E4M3, pad_slots=0)
    return make_call(case), case


def test_cuda_graph_after_warmup_and_new_scales_on_replay() -> None:
    """Capture after warmup; a new value written into the same scale tensors takes effect on replay."""
    t = 16
    qknorm.warmup_qk_norm_rope(32, 8, 128, max_tokens=64, cache_dtype=E4M3, q_fp8=E4M3)
    call, _ = _graph_call(t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qknorm.qk_norm_rope(**call)
    for scale in (None, 0.5):
        if scale is not None:
            call["k_scale"].fill_(scale * 0.1)
            call["v_scale"].fill_(scale * 0.2)
            call["q_scale"].fill_(scale * 0.03)
        graph.replay()
        torch.cuda.synchronize()
        exp = reference_request(call)
        qk_norm_rope_reference(exp)
        assert_rope_fp8_close(out.q, exp.q_out, f"q_out (scale {scale})", fp8_slack(exp, "q", exp.q_scale))  # type: ignore[arg-type]
        tok, blk, off = written_slots(exp)
        assert_rope_fp8_close(call["k_cache"][blk, off], exp.k_cache[blk, off], f"k_cache (scale {scale})",  # type: ignore[index]
                              fp8_slack(exp, "k", exp.k_scale)[tok])  # type: ignore[arg-type]  # fmt: skip
        assert_bits_equal(call["v_cache"][blk, off], exp.v_cache[blk, off], f"v_cache (scale {scale})")  # type: ignore[index]


def test_capture_of_an_unwarmed_shape_raises_instead_of_corrupting() -> None:
    registry.reset()
    PIPELINE.clear()
    call, _ = _graph_call(5)
    call["q"] = call["q"][:, :31]  # a head count never seen before
    call["q_out"] = call["q_out"][:, :31]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(BackendError, match="during CUDA-graph capture"), torch.cuda.graph(graph):
        qknorm.qk_norm_rope(**call)


def test_check_indices_refuses_capture() -> None:
    call, _ = _graph_call(4)
    qknorm.qk_norm_rope(**call)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="cannot run during CUDA-graph capture"), torch.cuda.graph(graph):
        qknorm.qk_norm_rope(**call, check_indices=True)


def _layer(qkv: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
           table: torch.Tensor, w: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:  # fmt: skip
    t = qkv.shape[0]
    q, k, v = qkv.split((32 * 128, 8 * 128, 8 * 128), dim=-1)
    out = qknorm.qk_norm_rope(q.view(t, 32, 128), k.view(t, 8, 128), w, w, table, pos, v=v.view(t, 8, 128),
                              k_cache=kc, v_cache=vc, slot_mapping=slots, k_scale=ks, v_scale=ks)  # fmt: skip
    return out.q  # the op's own output: a reduction here would be Inductor's, summed in another order than eager's


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_on_cuda_matches_eager(dynamic: bool) -> None:
    torch._dynamo.reset()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    table = torch.rand(4096, 128, device=dev, generator=g)
    w = torch.rand(128, device=dev, generator=g).to(BF16)
    ks = torch.full((1,), 0.02, device=dev)
    compiled = torch.compile(_layer, backend="inductor", fullgraph=True, dynamic=dynamic)
    for t in (5, 300, 17):
        qkv = torch.randn(t, 48 * 128, device=dev, generator=g).to(BF16)
        pos = torch.randint(0, 4096, (t,), device=dev, generator=g)
        slots = torch.randperm(1024, device=dev, generator=g)[:t]
        caches = [[torch.zeros(64, 16, 8, 128, device=dev).to(E4M3) for _ in range(2)] for _ in range(2)]
        want = _layer(qkv, pos, slots, *caches[0], table, w, ks)
        got = compiled(qkv, pos, slots, *caches[1], table, w, ks)
        assert_bits_equal(got, want, f"q_out at T={t}")
        for a, b in zip(*caches):
            assert_bits_equal(a, b, f"cache at T={t}")


def test_opcheck_cuda() -> None:
    from test_rope_ops import OP, op_args

    for case in (RopeCase(cache=E4M3, q_fp8=E4M3), RopeCase(cache=BF16, cache_layout="unbind", in_place=True)):
        torch.library.opcheck(OP, op_args(make_call(case)),
                              test_utils=["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"])  # fmt: skip


def test_multi_device_index_is_respected() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(1):
        pass
    call = {n: (x.to("cuda:1") if isinstance(x, torch.Tensor) else x) for n, x in make_call(RopeCase(cache=BF16)).items()}
    exp = reference_request(call)
    qk_norm_rope_reference(exp)
    with backend_override("triton"):
        out = qknorm.qk_norm_rope(**call)
    assert_rope_close(out.q, exp.q_out, pair_magnitude(exp, "q"), "q_out on cuda:1")
