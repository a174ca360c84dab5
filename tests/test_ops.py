"""The custom op, compile routing and the eager fast path (CPU; GPU counterparts in test_cuda_graph.py).

Every result is compared with :mod:`qknorm.reference` run on the same validated request. On the
CPU the default policy selects the ``torch`` backend, which is the reference itself, so eager,
op and compiled results must agree bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import qknorm
import qknorm.ops
from qknorm import QuantType
from qknorm.backends import registry
from qknorm.checks import build_request
from qknorm.core.signature import TensorSpec
from qknorm.quant import QuantMode
from qknorm.reference import qk_rmsnorm_reference

BF16 = torch.bfloat16
N1, N2, M = 256, 64, 5
ARG_NAMES = (
    "q", "q_weight", "q_epsilon", "k", "k_weight", "k_epsilon", "k_out", "q_residual", "q_res_out", "gemma_norm",
    "quant_mode", "group_size", "q_out", "q_out_quantized", "q_out_scale", "transpose_scale",
)  # fmt: skip
OUT_NAMES = ("k_out", "q_res_out", "q_out", "q_out_quantized", "q_out_scale")
OP = torch.ops.qknorm.fused_qk_rmsnorm.default
PIPELINE = qknorm.ops.PIPELINE
AS_UNQUANTIZED = {"q_out": "q_out_unquantized"}  # what the aiter-style entries call q_out


@pytest.fixture(autouse=True)
def _fresh_compile_and_plans():
    torch._dynamo.reset()
    PIPELINE.clear()
    yield
    torch._dynamo.reset()
    PIPELINE.clear()


# ----------------------------------------------------------------------------- call builders


def make_args(variant: str, m: int = M, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Canonical op arguments for one named variant, on fresh random inputs and NaN-filled outputs.

    q and k are column slices of one ``[m, N1 + N2 + 16]`` latent (row-strided, as in MLA).
    """
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(m, N1 + N2 + 16, generator=gen).to(BF16).to(device)
    q, k = latent[:, :N1], latent[:, N1 : N1 + N2]
    qw = (torch.rand(N1, generator=gen) + 0.5).to(BF16).to(device)
    kw = (torch.rand(N2, generator=gen) + 0.5).to(BF16).to(device)

    def out(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
        return torch.full(shape, float("nan") if dtype.is_floating_point else 0).to(dtype).to(device)

    a: dict[str, Any] = dict.fromkeys(ARG_NAMES)
    a["latent"] = latent  # not an argument: the buffer q and k are slices of
    a.update(q=q, q_weight=qw, q_epsilon=1e-6, k=k, k_weight=kw, k_epsilon=1e-5, k_out=out(m, N2), gemma_norm=False,
             quant_mode="none", transpose_scale=False)  # fmt: skip
    if variant == "none":
        a.update(q_out=out(m, N1))
    elif variant == "none-q-only":
        a.update(q_out=out(m, N1), k=None, k_weight=None, k_out=None, k_epsilon=None)
    elif variant == "none-residual-gemma":
        res = torch.randn(m, N1, generator=gen).to(BF16).to(device)
        a.update(q_out=out(m, N1), q_residual=res, q_res_out=out(m, N1), gemma_norm=True)
    elif variant.startswith("fp8_group"):
        fp8 = torch.float8_e4m3fnuz if variant.endswith("fnuz") else torch.float8_e4m3fn
        a.update(quant_mode="fp8_group", group_size=128, q_out_quantized=torch.zeros(m, N1, dtype=fp8, device=device))
        if variant == "fp8_group-transposed":  # a contiguous [m, G] buffer read as [G, m]
            a.update(q_out_scale=out(m, N1 // 128, dtype=torch.float32), transpose_scale=True)
        elif variant == "fp8_group-transposed-view":
            a.update(q_out_scale=out(N1 // 128, m, dtype=torch.float32).t(), transpose_scale=True)
        else:
            a.update(q_out_scale=out(m, N1 // 128, dtype=torch.float32), q_out=out(m, N1))
    elif variant == "fp8_token":
        a.update(quant_mode="fp8_token", q_out_quantized=torch.zeros(m, N1, dtype=torch.float8_e4m3fn, device=device),
                 q_out_scale=out(m, 1, dtype=torch.float32))  # fmt: skip
    elif variant.startswith("fp8_tensor"):
        shape = (1, 1) if variant.endswith("2d") else (1,)
        a.update(quant_mode="fp8_tensor", q_out_quantized=torch.zeros(m, N1, dtype=torch.float8_e4m3fn, device=device),
                 q_out_scale=out(*shape, dtype=torch.float32))  # fmt: skip
    elif variant.startswith("mxfp4"):
        gs = 64 if variant.endswith("64") else 32
        quant = torch.zeros(m, N1 // 2, dtype=torch.uint8, device=device)
        scale = torch.zeros(m, N1 // gs, dtype=torch.uint8, device=device)
        if variant == "mxfp4-fp4-dtypes":
            quant, scale = quant.view(torch.float4_e2m1fn_x2), scale.view(torch.float8_e8m0fnu)
        a.update(quant_mode="mxfp4", group_size=gs, q_out_quantized=quant, q_out_scale=scale)
    else:
        raise AssertionError(variant)
    return a


VARIANTS = (
    "none", "none-q-only", "none-residual-gemma", "fp8_group", "fp8_group-fnuz",
    "fp8_group-transposed", "fp8_group-transposed-view", "fp8_token", "fp8_tensor", "fp8_tensor-2d", "mxfp4",
    "mxfp4-64", "mxfp4-fp4-dtypes",
)  # fmt: skip


def positional(a: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(a[n] for n in ARG_NAMES)


def expected_outputs(a: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The reference's values of every output of ``a`` (computed on clones; ``a`` is untouched)."""
    b = {n: (v.clone() if n in OUT_NAMES and v is not None else v) for n, v in a.items()}
    if b["q_out_scale"] is not None and a["q_out_scale"].stride() != b["q_out_scale"].stride():
        b["q_out_scale"] = torch.empty_strided(a["q_out_scale"].shape, a["q_out_scale"].stride(),
                                               dtype=a["q_out_scale"].dtype)  # fmt: skip
    req = build_request(**{n: b[n] for n in ARG_NAMES if n != "quant_mode"}, mode=QuantMode(b["quant_mode"]))
    qk_rmsnorm_reference(req)
    return {n: b[n] for n in OUT_NAMES if b[n] is not None}


def raw(t: torch.Tensor) -> torch.Tensor:
    """Elements as integers of their own width (bitwise comparison, NaN included)."""
    t = t.detach().cpu()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(ints) if t.dim() else t.reshape(1).view(ints)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(raw(actual), raw(expected)), f"{name}: values differ from the reference"


def assert_outputs(a: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    for name, value in want.items():
        assert_bitwise(a[name], value, name)


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_cpu(variant: str) -> None:
    a = make_args(variant)
    tests = ["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if a["q_out_quantized"] is None:
        # torch's schema check compares outputs with allclose, which has no CPU kernel for the
        # FP8/FP4/E8M0 dtypes; test_op_writes_exactly_its_declared_outputs covers them.
        tests.insert(0, "test_schema")
    torch.library.opcheck(OP, positional(a), test_utils=tests)


@pytest.mark.parametrize("variant", VARIANTS)
def test_op_writes_exactly_its_declared_outputs(variant: str) -> None:
    a = make_args(variant)
    want = expected_outputs(a)
    before = {n: raw(v).clone() for n, v in a.items() if isinstance(v, torch.Tensor)}
    OP(*positional(a))
    for name, snapshot in before.items():
        changed = not torch.equal(raw(a[name]), snapshot)
        if changed:
            assert name in qknorm.ops.MUTATED, f"{name} was written but the schema does not declare it mutated"
    assert set(want) <= set(qknorm.ops.MUTATED)
    assert_outputs(a, want)


def test_schema_declares_every_output_mutable_and_nothing_else() -> None:
    schema = OP._schema
    mutable = {arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}
    assert mutable == set(qknorm.ops.MUTATED) == set(OUT_NAMES)
    assert [arg.name for arg in schema.arguments] == list(ARG_NAMES)
    assert len(schema.returns) == 0


def test_fake_kernel_validates_without_selecting_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_selection(req: object) -> object:
        raise AssertionError("backend selection ran in the fake kernel")

    monkeypatch.setattr(registry, "select", no_selection)
    a = make_args("fp8_group")
    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for n, v in a.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # FakeTensor.data_ptr() warns: the overlap check must not call it
            OP(*positional(fake))
        bad = dict(fake, q_out=torch.empty(M, N1 + 1, dtype=BF16))
        with pytest.raises(ValueError, match=r"q_out must have shape \[5, 256\], got \[5, 257\]"):
            OP(*positional(bad))


def test_fake_tensors_pass_the_overlap_check() -> None:
    # Fake tensors have no memory; the overlap check must skip them rather than see every
    # tensor at address 0 (torch 2.13's FakeTensor.data_ptr() returns 0 with a warning).
    with FakeTensorMode():
        q, out = torch.empty(4, 64, dtype=BF16), torch.empty(4, 64, dtype=BF16)
        w = torch.empty(64, dtype=BF16)
        req = build_request(q=q, q_weight=w, q_epsilon=1e-6, q_out=out)
    assert req.q_out is out


def test_op_called_directly_matches_reference() -> None:
    a = make_args("none-residual-gemma")
    want = expected_outputs(a)
    torch.ops.qknorm.fused_qk_rmsnorm(*positional(a))
    assert_outputs(a, want)


def test_op_rejects_an_unknown_quant_mode() -> None:
    a = dict(make_args("none"), quant_mode="fp16")
    with pytest.raises(ValueError, match="quant_mode must be one of"):
        OP(*positional(a))


# ----------------------------------------------------------------------------- eager routing


def _public_calls(m: int = M) -> list[tuple[str, Callable[[], object]]]:
    a = make_args("none", m)
    q, qw, k, kw = a["q"], a["q_weight"], a["k"], a["k_weight"]
    fp8 = torch.empty(m, N1, dtype=torch.float8_e4m3fn)
    return [
        ("qk_rmsnorm", lambda: qknorm.qk_rmsnorm(q, qw, k, kw, quant="fp8_group")),
        ("fused_qk_rmsnorm", lambda: qknorm.fused_qk_rmsnorm(torch.empty(m, N1, dtype=BF16), None, q, qw, 1e-6,
                                                              None, torch.empty(m, N2, dtype=BF16), None, k, kw)),
        ("group_quant", lambda: qknorm.fused_qk_rmsnorm_group_quant(fp8, torch.empty(m, 2), q, qw)),
        ("per_token_quant", lambda: qknorm.fused_qk_rmsnorm_per_token_quant(fp8, torch.empty(m, 1), q, qw, 1e-6)),
        ("legacy", lambda: qknorm.fused_qk_rmsnorm_legacy(q, qw, 1e-6, k, kw, 1e-6)),
        ("module", lambda: qknorm.MLAQKNorm(N1, N2, 16, dtype=BF16)(a["latent"])),
    ]  # fmt: skip


@pytest.mark.parametrize("entry", [name for name, _ in _public_calls()])
def test_eager_calls_do_not_go_through_the_dispatcher(entry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def dispatched(*args: object) -> None:
        raise AssertionError("an eager call went through torch.ops.qknorm")

    monkeypatch.setattr(qknorm.ops, "_op", dispatched)
    dict(_public_calls())[entry]()


def test_fake_tensors_in_eager_mode_go_through_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    selected: list[object] = []
    original = registry.select
    monkeypatch.setattr(registry, "select", lambda req: selected.append(req) or original(req))
    with FakeTensorMode():
        q, w = torch.randn(3, N1, dtype=BF16), torch.ones(N1, dtype=BF16)
        out = qknorm.qk_rmsnorm(q, w, quant="fp8_token")
    assert out.q.shape == (3, N1) and out.q.dtype == torch.float8_e4m3fn and out.q_scale.shape == (3, 1)
    assert selected == [], "a fake call selected a backend"


def test_make_fx_records_one_opaque_op() -> None:
    a = make_args("none")

    def fn(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, kw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = qknorm.qk_rmsnorm(q, w, k, kw)
        return out.q, out.k  # type: ignore[return-value]

    gm = make_fx(fn)(a["q"], a["q_weight"], a["k"], a["k_weight"])
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1
    assert not any("rsqrt" in str(t) or "pow" in str(t) for t in targets), "the backend's ops leaked into the trace"


# ----------------------------------------------------------------------------- torch.compile


class _Recorder:
    """A Dynamo backend that keeps each graph it is given and runs it with aot_eager."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def op_counts(self) -> list[int]:
        """qknorm ops per graph, for graphs that call anything (Dynamo may also hand over empty ones)."""
        graphs = [g for g in self.graphs if any(n.op == "call_function" for n in g.graph.nodes)]
        return [sum(1 for n in g.graph.nodes if n.target is OP) for g in graphs]


def _latent(m: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, N1 + N2 + 16, generator=torch.Generator().manual_seed(seed)).to(BF16)


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return (torch.rand(N1, generator=gen) + 0.5).to(BF16), (torch.rand(N2, generator=gen) + 0.5).to(BF16)


def _split(lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lat[:, :N1], lat[:, N1 : N1 + N2]


def _qk(lat, qw, kw, **kw_args):  # type: ignore[no-untyped-def]
    q, k = _split(lat)
    out = qknorm.qk_rmsnorm(q, qw, k, kw, **kw_args)
    return tuple(t for t in out if t is not None)


def _fused(lat, qw, kw, quant_type, q_dtype, scale_cols, transpose=False, gs=None):  # type: ignore[no-untyped-def]
    q, k = _split(lat)
    m = q.shape[0]
    if quant_type == QuantType.No:
        qq, scale = torch.empty(m, N1, dtype=BF16), None
    else:
        qq = torch.empty(m, N1 // 2 if q_dtype == torch.uint8 else N1, dtype=q_dtype)
        scale_dtype = torch.uint8 if q_dtype == torch.uint8 else torch.float32
        scale = torch.empty(1 if quant_type == QuantType.per_Tensor else m, scale_cols, dtype=scale_dtype)
    k_out = torch.empty(m, N2, dtype=BF16)
    qknorm.fused_qk_rmsnorm(qq, scale, q, qw, 1e-6, None, k_out, None, k, kw, None, quant_type=quant_type,
                            group_size=gs, transpose_scale=transpose)  # fmt: skip
    return (qq, k_out) if scale is None else (qq, scale, k_out)


def _group_quant(lat, qw, kw):  # type: ignore[no-untyped-def]
    q, k = _split(lat)
    m = q.shape[0]
    qq, scale = torch.empty(m, N1, dtype=torch.float8_e4m3fn), torch.empty(m, N1 // 128)
    qu, k_out = torch.empty(m, N1, dtype=BF16), torch.empty(m, N2, dtype=BF16)
    qknorm.fused_qk_rmsnorm_group_quant(qq, scale, q, qw, 1e-6, qu, k_out, None, k, kw, 1e-5)
    return qq, scale, qu, k_out


def _group_quant_none(lat, qw, kw):  # type: ignore[no-untyped-def]
    q, k = _split(lat)
    m = q.shape[0]
    qu, k_out = torch.empty(m, N1, dtype=BF16), torch.empty(m, N2, dtype=BF16)
    qknorm.fused_qk_rmsnorm_group_quant(None, None, q, qw, 1e-6, qu, k_out, None, k, kw)
    return qu, k_out


def _per_token(lat, qw, kw):  # type: ignore[no-untyped-def]
    q, k = _split(lat)
    m = q.shape[0]
    qq, scale, k_out = torch.empty(m, N1, dtype=torch.float8_e4m3fn), torch.empty(m, 1), torch.empty(m, N2, dtype=BF16)
    res, res_out = torch.ones(m, N1, dtype=BF16), torch.empty(m, N1, dtype=BF16)
    qknorm.fused_qk_rmsnorm_per_token_quant(qq, scale, q, qw, 1e-6, None, k_out, res_out, k, kw, None, res, True)
    return qq, scale, k_out, res_out


def _legacy(lat, qw, kw):  # type: ignore[no-untyped-def]
    q, k = _split(lat)
    return qknorm.fused_qk_rmsnorm_legacy(q, qw, 1e-6, k, kw, 1e-6)


def _per_head(lat, qw, kw):  # type: ignore[no-untyped-def]
    # Per-head QK norm: [tokens, heads, head_dim] normalized over head_dim (q and k with as many heads).
    q = lat[:, :N1].reshape(lat.shape[0], 4, N1 // 4)
    k = lat[:, N1 : N1 + N2].reshape(lat.shape[0], 4, N2 // 4)
    out = qknorm.qk_rmsnorm(q, qw[: N1 // 4].contiguous(), k, kw[: N2 // 4].contiguous())
    return out.q, out.k


COMPILED: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "qk_rmsnorm-none": _qk,
    "qk_rmsnorm-fp8_group": lambda lat, qw, kw: _qk(lat, qw, kw, quant="fp8_group", return_unquantized=True),
    "qk_rmsnorm-fp8_group-transposed": lambda lat, qw, kw: _qk(lat, qw, kw, quant="fp8_group", transpose_scale=True),
    "qk_rmsnorm-fp8_token-residual-gemma": lambda lat, qw, kw: _qk(
        lat, qw, kw, quant="fp8_token", q_residual=lat[:, N2 : N2 + N1], gemma_norm=True
    ),
    "qk_rmsnorm-fp8_tensor": lambda lat, qw, kw: _qk(lat, qw, kw, quant="fp8_tensor"),
    "qk_rmsnorm-mxfp4": lambda lat, qw, kw: _qk(lat, qw, kw, quant="mxfp4"),
    "qk_rmsnorm-per-head": _per_head,
    "fused-No": lambda lat, qw, kw: _fused(lat, qw, kw, QuantType.No, BF16, 0),
    "fused-per_1x128": lambda lat, qw, kw: _fused(lat, qw, kw, QuantType.per_1x128, torch.float8_e4m3fn, N1 // 128),
    "fused-per_1x128-transposed": lambda lat, qw, kw: _fused(
        lat, qw, kw, QuantType.per_1x128, torch.float8_e4m3fn, N1 // 128, transpose=True
    ),
    "fused-per_Token": lambda lat, qw, kw: _fused(lat, qw, kw, QuantType.per_Token, torch.float8_e4m3fn, 1),
    "fused-per_Tensor": lambda lat, qw, kw: _fused(lat, qw, kw, QuantType.per_Tensor, torch.float8_e4m3fn, 1),
    "fused-per_1x32-mxfp4": lambda lat, qw, kw: _fused(lat, qw, kw, QuantType.per_1x32, torch.uint8, N1 // 32),
    "group_quant": _group_quant,
    "group_quant-none": _group_quant_none,
    "per_token_quant": _per_token,
    "legacy": _legacy,
}
# Static shapes recompile per row count: a few entries are enough to cover that path.
STATIC = ("qk_rmsnorm-fp8_group", "fused-No", "group_quant")


@pytest.mark.parametrize(
    ("entry", "dynamic"),
    [(e, True) for e in COMPILED] + [(e, False) for e in STATIC],
    ids=[f"{e}-dynamic" for e in COMPILED] + [f"{e}-static" for e in STATIC],
)
def test_compile_fullgraph_matches_eager(entry: str, dynamic: bool) -> None:
    fn = COMPILED[entry]
    qw, kw = _weights()
    rec = _Recorder()
    compiled = torch.compile(fn, backend=rec, fullgraph=True, dynamic=dynamic)
    for m in (5, 9, 2):
        lat = _latent(m, seed=m)
        want = fn(lat, qw, kw)
        got = compiled(lat, qw, kw)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_bitwise(g, w, f"{entry} output {i} at M={m}")
    counts = rec.op_counts()
    assert counts == [1] * len(counts), "each graph holds exactly one qknorm op"
    assert len(counts) == (1 if dynamic else 3), "dynamic M compiles once; static M once per row count"


def test_compile_with_inductor_dynamic_m() -> None:
    qw, kw = _weights()

    def fn(lat: torch.Tensor, qw: torch.Tensor, kw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = _qk(lat, qw, kw, quant="fp8_group")
        b = _fused(lat, qw, kw, QuantType.No, BF16, 0)
        return (*a, *b)

    compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=True)
    for m in (3, 6):
        lat = _latent(m, seed=m)
        for i, (g, w) in enumerate(zip(compiled(lat, qw, kw), fn(lat, qw, kw))):
            assert_bitwise(g, w, f"inductor output {i} at M={m}")


def test_compile_in_place_forms() -> None:
    qw, kw = _weights()

    def fn(q: torch.Tensor, k: torch.Tensor) -> None:
        # q_out is q and k_out is k: the supported in-place forms.
        qknorm.fused_qk_rmsnorm(q, None, q, qw, 1e-6, None, k, None, k, kw, 1e-6)

    q, k = torch.randn(4, N1).to(BF16), torch.randn(4, N2).to(BF16)
    q2, k2 = q.clone(), k.clone()
    fn(q, k)
    torch.compile(fn, backend="aot_eager", fullgraph=True)(q2, k2)
    assert_bitwise(q2, q, "q (in place)")
    assert_bitwise(k2, k, "k (in place)")


def test_backend_selection_never_runs_while_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._subclasses.fake_tensor import is_fake

    seen: list[tuple[bool, bool]] = []
    original = registry.select

    def spy(req):  # type: ignore[no-untyped-def]
        seen.append((torch.compiler.is_compiling(), is_fake(req.q)))
        return original(req)

    monkeypatch.setattr(registry, "select", spy)
    qw, kw = _weights()
    fn = COMPILED["qk_rmsnorm-fp8_group"]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(_latent(4), qw, kw)
    compiled(_latent(6), qw, kw)
    assert seen == [(False, False), (False, False)], "selection ran once per real execution, never on fake tensors"


def test_compile_reports_a_bad_call_with_qknorms_message() -> None:
    qw, _ = _weights()

    def fn(lat: torch.Tensor) -> torch.Tensor:
        q = lat[:, :N1]
        out = torch.empty(q.shape[0], N1 + 1, dtype=BF16)
        qknorm.fused_qk_rmsnorm(out, None, q, qw, 1e-6)
        return out

    # Traced calls are validated by the op's fake kernel, which names the op's own fields.
    with pytest.raises(Exception, match=r"q_out must have shape \[4, 256\], got \[4, 257\]"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(_latent(4))


# ----------------------------------------------------------------------------- eager pipeline


def run(a: dict[str, Any]) -> None:
    """One eager call of the op's argument list, as the aiter-style entries make it."""
    qknorm.ops.submit(positional(a), AS_UNQUANTIZED)


@pytest.fixture
def planner_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records every call of the planner (what validation sees of each call)."""
    calls: list[dict[str, Any]] = []
    original = PIPELINE.planner
    monkeypatch.setattr(PIPELINE, "planner", lambda fields, display: calls.append(fields) or original(fields, display))
    return calls


@pytest.mark.parametrize("variant", VARIANTS)
def test_second_call_reuses_the_plan_and_matches_reference(variant: str, planner_calls: list[Any]) -> None:
    first = make_args(variant, seed=1)
    want = expected_outputs(first)
    run(first)
    assert_outputs(first, want)
    assert len(PIPELINE) == 1 and len(planner_calls) == 1

    second = make_args(variant, seed=2)
    want = expected_outputs(second)
    run(second)
    assert len(planner_calls) == 1, "a call with a known signature was validated again"
    assert_outputs(second, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_planner_sees_only_the_signature(variant: str, planner_calls: list[dict[str, Any]]) -> None:
    """Validation reads tensors as TensorSpec (class, dtype, device, layout, shape, strides): no
    data and no address, so caching its verdict per signature cannot change a verdict."""
    run(make_args(variant))
    (fields,) = planner_calls
    assert not any(isinstance(v, torch.Tensor) for v in fields.values())
    assert any(isinstance(v, TensorSpec) for v in fields.values())


def test_overlap_is_checked_on_every_call_not_only_the_first() -> None:
    a = make_args("none")
    run(a)  # plan made with disjoint outputs
    overlapping = torch.empty(M, N1, dtype=BF16)  # a's q_out layout is contiguous: rebuild that
    b = dict(a, q_out=overlapping)
    run(b)  # still disjoint: fine
    shifted = a["latent"].reshape(-1)[N1 // 2 : N1 // 2 + M * N1].view(M, N1)  # contiguous, overlaps q
    assert shifted.stride() == overlapping.stride()
    b = dict(a, q_out=shifted)
    with pytest.raises(ValueError, match="q_out_unquantized must not overlap input q"):
        run(b)


def test_outputs_overlapping_each_other_are_rejected_after_a_plan() -> None:
    a = make_args("none")
    run(a)
    flat = torch.empty(M * N1 + M * N2, dtype=BF16)
    b = dict(a, q_out=flat[: M * N1].view(M, N1), k_out=flat[8 : 8 + M * N2].view(M, N2))  # planned layouts
    with pytest.raises(ValueError, match="must not overlap"):
        run(b)


def test_in_place_forms_need_no_new_plan_and_are_correct(planner_calls: list[Any]) -> None:
    def in_place(seed: int) -> dict[str, Any]:
        a = make_args("none", seed=seed)
        q, k = a["q"].clone(), a["k"].clone()
        return dict(a, q=q, k=k, q_out=q, k_out=k)

    run(in_place(1))
    second = in_place(2)
    want = expected_outputs(dict(second, q=second["q"].clone(), k=second["k"].clone()))
    run(second)
    assert len(planner_calls) == 1, "the supported same-view in-place forms need no new plan"
    assert_bitwise(second["q"], want["q_out"], "q (in place)")
    assert_bitwise(second["k"], want["k_out"], "k (in place)")


def test_interleaved_views_of_one_buffer_get_the_exact_overlap_answer(planner_calls: list[Any]) -> None:
    """k_out is k (in place in the latent, beside q) and q_out a column slice of one output buffer:
    byte spans intersect, so the exact row-by-row check decides, per relative offset."""

    def interleaved(seed: int) -> dict[str, Any]:
        a = make_args("none", seed=seed)
        out = torch.full((M, N1 + N2 + 16), float("nan"), dtype=BF16)
        return dict(a, k_out=a["k"], q_out=out[:, :N1])

    run(interleaved(1))
    second = interleaved(2)
    want = expected_outputs(dict(second, k=second["k"].clone()))
    run(second)
    assert_bitwise(second["k"], want["k_out"], "k (in place)")
    assert_bitwise(second["q_out"], want["q_out"], "q_out")
    # Same signature, but q_out now slides onto k's columns of the latent: the exact check rejects it.
    third = interleaved(3)
    shifted = third["latent"][:, 8 : 8 + N1]
    assert shifted.stride() == third["q_out"].stride()
    with pytest.raises(ValueError, match="k_out and q_out_unquantized must not overlap"):
        run(dict(third, q_out=shifted))
    assert len(planner_calls) == 1


@pytest.mark.parametrize(
    ("name", "valid", "invalid", "error"),
    [
        ("gemma_norm", True, 1, TypeError),
        ("q_epsilon", 1e-6, True, TypeError),
        ("transpose_scale", False, 0, TypeError),
    ],
)
def test_scalars_of_another_type_are_validated_even_when_equal(name: str, valid: object, invalid: object,
                                                               error: type[Exception]) -> None:  # fmt: skip
    a = dict(make_args("none"), **{name: valid})
    run(a)
    with pytest.raises(error, match=name):
        run(dict(a, **{name: invalid}))


def test_non_tensor_arguments_still_raise_type_error() -> None:
    a = make_args("none")
    run(a)
    with pytest.raises(TypeError, match=r"q_weight must be a torch\.Tensor, got list"):
        run(dict(a, q_weight=[1.0] * N1))


def test_plans_survive_a_registry_reset() -> None:
    a = make_args("fp8_token")
    run(a)
    registry.reset()  # plans hold no backend: selection happens again in run_request
    b = make_args("fp8_token", seed=3)
    want = expected_outputs(b)
    run(b)
    assert_outputs(b, want)


def test_m_zero_is_a_no_op_on_both_paths() -> None:
    for _ in range(2):
        a = make_args("fp8_group", m=0)
        run(a)
        assert a["q_out_quantized"].shape == (0, N1)


# ----------------------------------------------------------------------------- warmup


class _SizedBackend:
    """A backend with launch buckets: records the row count of every request it runs."""

    name = "sized"

    def __init__(self) -> None:
        self.rows: list[tuple[str, int]] = []

    def available(self) -> tuple[bool, str]:
        return True, "test backend"

    def supports(self, req: object) -> str | None:
        return None

    def warmup_sizes(self, max_m: int) -> list[int]:
        """Bucket upper bounds 1, 16, 256 up to the first one >= max_m, and one size past max_m."""
        bounds = [b for b in (1, 16, 256) if b < max_m]
        return [*bounds, min(b for b in (1, 16, 256, 4096) if b >= max_m), max_m * 2]

    def run(self, req) -> None:  # type: ignore[no-untyped-def]
        self.rows.append((req.mode.value, req.m))
        qk_rmsnorm_reference(req)


def test_warmup_runs_each_mode_once_per_bucket_of_the_selected_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _SizedBackend()
    previous = registry.register_backend("sized", lambda: backend)
    try:
        monkeypatch.setenv(registry.ENV_VAR, "sized")
        registry.reset()
        records = qknorm.warmup(N1, N2, device="cpu", modes=(None, "mxfp4"), max_tokens=100, row_stride=N1 + N2 + 8)
    finally:
        registry.register_backend("sized", previous)
    # Buckets 1, 16, 256 clipped to max_tokens=100 and 200 clipped to 100; one selecting call at m=1 first.
    assert records == [
        qknorm.WarmupRecord(None, "sized", (1, 16, 100)),
        qknorm.WarmupRecord("mxfp4", "sized", (1, 16, 100)),
    ]
    assert backend.rows == [("none", 1), ("none", 1), ("none", 16), ("none", 100),
                            ("mxfp4", 1), ("mxfp4", 1), ("mxfp4", 16), ("mxfp4", 100)]  # fmt: skip


def test_warmup_without_buckets_runs_one_and_max_tokens() -> None:
    records = qknorm.warmup(N1, None, device="cpu", modes=("fp8_group", "fp8_tensor"), max_tokens=33, residual=True)
    assert records == [
        qknorm.WarmupRecord("fp8_group", "torch", (1, 33)),
        qknorm.WarmupRecord("fp8_tensor", "torch", (1, 33)),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modes": ("fp8",)}, "modes must hold values of"),
        ({"max_tokens": 0}, "max_tokens must be a positive int"),
        ({"row_stride": N1}, f"row_stride must be >= q_width \\+ k_width = {N1 + N2}"),
    ],
)
def test_warmup_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        qknorm.warmup(N1, N2, device="cpu", **kwargs)
