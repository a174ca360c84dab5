"""The custom op ``torch.ops.qknorm.qk_norm_rope``: schema, opcheck, fake kernel, torch.compile.

On the CPU the default policy selects the reference (``torch``) backend, so eager, op and
compiled results must agree bit for bit; the GPU counterparts (Triton) are in
``test_rope_gpu.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _rope_cases import DEVICE, RopeCase, cos_sin_table, make_call

import qknorm
from qknorm.backends import registry
from qknorm.rope.ops import FIELDS, MUTATED, PIPELINE, call_args

OP = torch.ops.qknorm.qk_norm_rope.default
BF16 = torch.bfloat16
HQ, HK, D, BS, NB = 4, 2, 16, 4, 8


@pytest.fixture(autouse=True)
def _fresh() -> Any:
    torch._dynamo.reset()
    PIPELINE.clear()
    yield
    torch._dynamo.reset()


def op_args(call: dict[str, Any]) -> tuple[Any, ...]:
    """``call`` as the op's argument list, outputs allocated as the entry does."""
    args = call_args(**call)
    plan = PIPELINE.plan(args)
    c = dict(call)
    if plan.alloc_q_out:  # type: ignore[attr-defined]
        c["q_out"] = torch.empty((plan.t, plan.hq, plan.d), dtype=plan.q_out_dtype, device=plan.device)  # type: ignore[attr-defined]
    if plan.alloc_k_out:  # type: ignore[attr-defined]
        c["k_out"] = torch.empty((plan.t, plan.hk, plan.d), dtype=plan.dtype, device=plan.device)  # type: ignore[attr-defined]
    return call_args(**c)


VARIANTS = {
    "norm-rope": RopeCase(),
    "bf16-cache": RopeCase(cache=BF16),
    "fp8-cache-fp8-q": RopeCase(cache=torch.float8_e4m3fn, q_fp8=torch.float8_e4m3fn, scale_heads=True),
    "in-place-unbind": RopeCase(cache=BF16, cache_layout="unbind", in_place=True),
    "no-rope-gptj-partial": RopeCase(rot=8, is_neox=False, weights=False, give_k_out=True, cache=BF16),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_opcheck(variant: str) -> None:
    args = op_args(make_call(VARIANTS[variant]))
    tests = ["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if "fp8" not in variant:  # test_schema multiplies every tensor argument, which FP8 tensors do not support on the CPU
        tests.append("test_schema")
    torch.library.opcheck(OP, args, test_utils=tests)


def test_schema_declares_every_written_tensor_mutable_and_nothing_else() -> None:
    schema = OP._schema
    mutable = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutable == set(MUTATED) == {"q_out", "k_out", "k_cache", "v_cache"}
    assert len(schema.returns) == 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_op_writes_exactly_its_declared_outputs(variant: str) -> None:
    args = op_args(make_call(VARIANTS[variant]))
    names = FIELDS
    for name in ("q_out", "k_out"):  # NaN bytes: memory reused from an earlier call may already hold the result
        out = args[names.index(name)]
        if out is not None and not VARIANTS[variant].in_place:
            out.view(torch.uint8).fill_(255)
    before = {n: a.clone() for n, a in zip(names, args) if isinstance(a, torch.Tensor)}
    OP(*args)
    changed = {n for n, a in zip(names, args)  # bit for bit (NaN sentinels compare unequal as floats)
               if isinstance(a, torch.Tensor) and not torch.equal(a.view(torch.uint8), before[n].view(torch.uint8))}
    in_place = {"q", "k"} if VARIANTS[variant].in_place else set()
    assert changed <= set(MUTATED) | in_place
    assert "q_out" in changed


def test_fake_kernel_validates_with_the_same_message() -> None:
    call = make_call(RopeCase(cache=BF16))
    call["slot_mapping"] = call["slot_mapping"].float()

    def fn(**kw: Any) -> Any:
        return qknorm.qk_norm_rope(**kw)

    with pytest.raises(Exception, match=r"slot_mapping must have dtype torch.int32 or torch.int64"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(**call)


def _layer(qkv: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
           table: torch.Tensor, qw: torch.Tensor, kw: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One Qwen3-style step on a packed qkv: q out (times 2: an op after ours), k and v into the cache."""
    t = qkv.shape[0]
    q, k, v = qkv.split((HQ * D, HK * D, HK * D), dim=-1)
    out = qknorm.qk_norm_rope(q.view(t, HQ, D), k.view(t, HK, D), qw, kw, table, pos, v=v.view(t, HK, D),
                              k_cache=kc, v_cache=vc, slot_mapping=slots)  # fmt: skip
    return out.q * 2


def _inputs(t: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (HQ + 2 * HK) * D, generator=g).to(BF16)
    pos = torch.randint(0, 64, (t,), generator=g)
    slots = torch.randperm(NB * BS, generator=g)[:t]
    kc, vc = torch.zeros(NB, BS, HK, D, dtype=BF16), torch.zeros(NB, BS, HK, D, dtype=BF16)
    return tuple(x.to(DEVICE) for x in (qkv, pos, slots, kc, vc))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(dynamic: bool, compiler: str) -> None:
    table = cos_sin_table(64, D, torch.float32, DEVICE)
    g = torch.Generator().manual_seed(1)
    qw = (1 + 0.1 * torch.randn(D, generator=g)).to(BF16).to(DEVICE)
    kw = (1 + 0.1 * torch.randn(D, generator=g)).to(BF16).to(DEVICE)
    compiled = torch.compile(_layer, backend=compiler, fullgraph=True, dynamic=dynamic)
    for t in (5, 9, 3):
        eager_in, comp_in = _inputs(t, t), _inputs(t, t)
        want = _layer(*eager_in, table, qw, kw)
        got = compiled(*comp_in, table, qw, kw)
        assert torch.equal(got, want), f"q at T={t}"
        assert torch.equal(comp_in[3], eager_in[3]) and torch.equal(comp_in[4], eager_in[4]), f"caches at T={t}"


def test_backend_selection_never_runs_while_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op is opaque to Dynamo: selection happens when the compiled graph runs, not while tracing."""
    calls: list[bool] = []
    real = registry.select

    def spy(req: Any) -> Any:
        calls.append(torch.compiler.is_compiling())
        return real(req)

    monkeypatch.setattr(registry, "select", spy)
    table = cos_sin_table(64, D, torch.float32, DEVICE)
    qw = kw = torch.ones(D, dtype=BF16, device=DEVICE)
    torch.compile(_layer, backend="aot_eager", fullgraph=True)(*_inputs(4, 0), table, qw, kw)
    assert calls and not any(calls)
