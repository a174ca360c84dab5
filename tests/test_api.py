"""Every entry point and mode of SPEC §2, checked against the reference through the default
backend selection (the ``torch`` backend on a CPU-only machine).

Most checks are :class:`_cases.Case` runs: the public call writes into sentinel-padded outputs
(nothing may change outside each output's window, inputs stay untouched) and every output is
compared with :mod:`qknorm.reference` run on contiguous copies, per ``qknorm.testing``'s table.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _cases import DEVICE, E8M0FNU, FP4_X2, Case, bits_equal, buffer, make_inputs, run_case

import qknorm
from qknorm import QuantType
from qknorm.testing import assert_fp8_close, assert_mxfp4_close, assert_norm_close, assert_scales_close

_empty = functools.partial(torch.empty, device=DEVICE)
_ones = functools.partial(torch.ones, device=DEVICE)
G128 = (QuantType.per_1x128, QuantType.per_128x128, QuantType.per_256x128, QuantType.per_1024x128)


def _id(case: Case) -> str:
    default = Case()
    return ",".join(f"{k}={v}" for k, v in case.__dict__.items() if getattr(default, k) != v) or "default"


def _cases(*cases: Case) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", cases, ids=[_id(c) for c in cases])


# ----------------------------------------------------------------------------- QuantType


def test_quant_type_names_and_values_equal_aiters() -> None:
    assert {t.name: t.value for t in QuantType} == {
        "No": 0, "per_Tensor": 1, "per_Token": 2, "per_1x32": 3, "per_1x128": 4, "per_128x128": 5,
        "per_256x128": 6, "per_1024x128": 7,
    }  # fmt: skip
    assert issubclass(QuantType, int)
    assert QuantType(4) is QuantType.per_1x128 and QuantType.per_Token == 2


def test_unified_entry_accepts_plain_ints_for_quant_type() -> None:
    inp = make_inputs(Case(m=2, n1=64))
    a = _empty(2, 64, dtype=torch.float8_e4m3fn)
    b = _empty(2, 64, dtype=torch.float8_e4m3fn)
    sa, sb = _empty(2, 2), _empty(2, 2)
    qknorm.fused_qk_rmsnorm(a, sa, inp.q, inp.q_weight, quant_type=3)
    qknorm.fused_qk_rmsnorm(b, sb, inp.q, inp.q_weight, quant_type=QuantType.per_1x32)
    assert bits_equal(a, b) and bits_equal(sa, sb)


# ----------------------------------------------------------------------------- unified dispatch (SPEC §2)

_UNIFIED = dict(entry="unified", m=5, n1=256, n2=64, unquantized=True)


@_cases(
    Case(entry="unified", mode="none", m=5, n1=256, n2=64),
    Case(mode="fp8_token", **_UNIFIED),  # type: ignore[arg-type]
    Case(mode="fp8_tensor", **_UNIFIED),  # type: ignore[arg-type]
    *[Case(mode="fp8_group", quant_type=int(t), **_UNIFIED) for t in (QuantType.per_1x32, *G128)],  # type: ignore[arg-type]
    *[Case(mode="mxfp4", quant_type=int(t), **_UNIFIED) for t in (QuantType.per_1x32, *G128)],  # type: ignore[arg-type]
)
def test_unified_dispatch_against_reference(case: Case) -> None:
    run_case(case)


def _group_scales(qt: QuantType, group_size: int | None, mxfp4: bool = False) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Run the unified entry; return (number of scale columns it accepted, codes, scales)."""
    inp = make_inputs(Case(m=3, n1=256))
    for cols in (8, 4, 2):  # only the implied group size's scale shape validates
        codes = _empty(3, 128 if mxfp4 else 256, dtype=torch.uint8 if mxfp4 else torch.float8_e4m3fn)
        scales = _empty(3, cols, dtype=torch.uint8 if mxfp4 else torch.float32)
        try:
            qknorm.fused_qk_rmsnorm(codes, scales, inp.q, inp.q_weight, quant_type=qt, group_size=group_size)
        except ValueError:
            continue
        return cols, codes, scales
    raise AssertionError("no scale shape accepted")


@pytest.mark.parametrize("mxfp4", [False, True], ids=["fp8", "mxfp4"])
@pytest.mark.parametrize(("qt", "group_size", "columns"), [
    (QuantType.per_1x32, None, 8),  # 256 / 32
    *[(t, None, 2) for t in G128],  # 256 / 128
    (QuantType.per_1x128, 64, 4),  # an explicit group_size wins
    (QuantType.per_1x32, 64, 4),
])  # fmt: skip
def test_unified_quant_type_implies_group_size(qt: QuantType, group_size: int | None, columns: int, mxfp4: bool) -> None:
    cols, codes, scales = _group_scales(qt, group_size, mxfp4)
    assert cols == columns
    inp = make_inputs(Case(m=3, n1=256))
    gs = 256 // columns
    c2 = torch.empty_like(codes)
    s2 = torch.empty_like(scales)
    qknorm.fused_qk_rmsnorm_group_quant(c2, s2, inp.q, inp.q_weight, group_size=gs)
    assert bits_equal(codes, c2) and bits_equal(scales, s2)


def test_unified_per_token_equals_per_token_entry() -> None:
    inp = make_inputs(Case(m=4, n1=96, n2=32, residual=True))
    outs = []
    for use_unified in (True, False):
        codes = _empty(4, 96, dtype=torch.float8_e4m3fnuz)
        scale = _empty(4, 1)
        k_out, res_out, unq = _empty(4, 32, dtype=torch.float16), _empty(4, 96, dtype=torch.float16), _empty(4, 96, dtype=torch.float16)
        kw = dict(q=inp.q, q_weight=inp.q_weight, q_epsilon=1e-5, q_out_unquantized=unq, k_out=k_out, q_res_out=res_out,
                  k=inp.k, k_weight=inp.k_weight, q_residual=inp.q_residual, gemma_norm=True)  # fmt: skip
        if use_unified:
            qknorm.fused_qk_rmsnorm(codes, scale, quant_type=QuantType.per_Token, **kw)  # type: ignore[arg-type]
        else:
            qknorm.fused_qk_rmsnorm_per_token_quant(codes, scale, **kw)  # type: ignore[arg-type]
        outs.append((codes, scale, k_out, res_out, unq))
    for a, b in zip(*outs):
        assert bits_equal(a, b)


def test_unified_per_tensor_equals_functional_per_tensor() -> None:
    inp = make_inputs(Case(m=6, n1=48, dtype="bfloat16"))
    codes, scale = _empty(6, 48, dtype=torch.float8_e4m3fn), _empty(1, 1)
    qknorm.fused_qk_rmsnorm(codes, scale, inp.q, inp.q_weight, quant_type=QuantType.per_Tensor)
    out = qknorm.qk_rmsnorm(inp.q, inp.q_weight, quant="fp8_tensor")
    assert out.q_scale is not None and out.q_scale.shape == (1,)
    assert bits_equal(codes, out.q) and bits_equal(scale.reshape(1), out.q_scale)


def test_no_mode_writes_normalized_q_in_input_dtype_to_both_outputs() -> None:
    """aiter's No mode: q_out_quantized has q's dtype; a q_out_unquantized given too gets the same."""
    for dtype in ("float16", "bfloat16"):
        run_case(Case(entry="unified", mode="none", dtype=dtype, unquantized=True, residual=True, gemma=True, n2=16))


def test_no_mode_honours_residual_gemma_and_unquantized() -> None:
    """SPEC §6: unlike aiter's No mode, q_residual, gemma_norm and q_out_unquantized all take effect."""
    inp = make_inputs(Case(m=3, n1=32, residual=True))
    plain = _empty(3, 32, dtype=torch.float16)
    qknorm.fused_qk_rmsnorm(plain, None, inp.q, inp.q_weight)
    out, unq, res_out = (_empty(3, 32, dtype=torch.float16) for _ in range(3))
    qknorm.fused_qk_rmsnorm(out, None, inp.q, inp.q_weight, q_out_unquantized=unq, q_res_out=res_out,
                            q_residual=inp.q_residual, gemma_norm=True)  # fmt: skip
    assert not torch.equal(out, plain)
    assert bits_equal(out, unq)
    assert bits_equal(res_out, (inp.q.float() + inp.q_residual.float()).to(torch.float16))  # type: ignore[union-attr]


def test_unified_no_mode_q_out_unquantized_alone_is_the_output() -> None:
    run_case(Case(entry="group", mode="none", n2=8))
    inp = make_inputs(Case(m=2, n1=16))
    out = _empty(2, 16, dtype=torch.float16)
    qknorm.fused_qk_rmsnorm(q=inp.q, q_weight=inp.q_weight, q_out_unquantized=out)
    assert_norm_close(out, qknorm.qk_rmsnorm(inp.q, inp.q_weight).q)


# ----------------------------------------------------------------------------- modes and options


@_cases(
    *[Case(entry="group", mode="fp8_group", m=3, n1=512, group_size=g, seed=g) for g in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)],
    Case(entry="group", mode="fp8_group", m=3, n1=128),  # default group_size=128
    Case(entry="functional", mode="fp8_group", m=3, n1=384),  # default 128
    Case(entry="functional", mode="fp8_group", m=3, n1=96, group_size=32),
    *[Case(entry="group", mode="mxfp4", m=3, n1=384, group_size=g) for g in (32, 64, 128)],
    *[Case(entry="unified", mode="mxfp4", quant_type=int(QuantType.per_1x32), m=3, n1=256, group_size=g) for g in (32, 64, 128)],
    Case(entry="functional", mode="mxfp4", m=3, n1=96),  # default 32
    Case(entry="functional", mode="mxfp4", m=3, n1=128, group_size=128),
)
def test_group_sizes(case: Case) -> None:
    run_case(case)


@_cases(*[
    Case(entry=e, mode="fp8_group", quant_type=int(QuantType.per_1x32) if e == "unified" else None,
         group_size=None if e == "unified" else 32, m=m, n1=128, transpose=t, out_offset=off, seed=m)
    for e in ("unified", "group", "functional") for t in ("contiguous", "view") for m, off in ((1, 0), (5, 3), (8, 1))
])  # fmt: skip
def test_transposed_scales_both_forms(case: Case) -> None:
    run_case(case)


@pytest.mark.skipif(FP4_X2 is None or E8M0FNU is None, reason="this torch has no float4_e2m1fn_x2 / float8_e8m0fnu")
@_cases(
    Case(entry="unified", mode="mxfp4", quant_type=int(QuantType.per_1x32), fp4_dtypes=True, n2=32, residual=True),
    Case(entry="group", mode="mxfp4", group_size=64, n1=128, fp4_dtypes=True, unquantized=True, out_pad=3),
)
def test_mxfp4_torch_fp4_dtypes(case: Case) -> None:
    run_case(case)


@pytest.mark.skipif(FP4_X2 is None or E8M0FNU is None, reason="this torch has no float4_e2m1fn_x2 / float8_e8m0fnu")
def test_mxfp4_fp4_dtypes_write_the_same_bytes_as_uint8() -> None:
    inp = make_inputs(Case(m=3, n1=64))
    q8, s8 = _empty(3, 32, dtype=torch.uint8), _empty(3, 2, dtype=torch.uint8)
    q4, s4 = _empty(3, 32, dtype=FP4_X2), _empty(3, 2, dtype=E8M0FNU)
    qknorm.fused_qk_rmsnorm_group_quant(q8, s8, inp.q, inp.q_weight, group_size=32)
    qknorm.fused_qk_rmsnorm_group_quant(q4, s4, inp.q, inp.q_weight, group_size=32)
    assert q4.dtype == FP4_X2 and s4.dtype == E8M0FNU
    assert bits_equal(q8, q4.view(torch.uint8)) and bits_equal(s8, s4.view(torch.uint8))


_OPTIONS = [
    dict(residual=True),
    dict(gemma=True),
    dict(residual=True, gemma=True, unquantized=True),
    dict(n2=0),  # q only
    dict(n2=48, k_eps=None, q_eps=0.1),  # k_epsilon=None uses q_epsilon
    dict(n2=48, k_eps=1e-3, q_eps=0.1),
    dict(fp8="float8_e4m3fnuz"),
    dict(dtype="bfloat16", fp8="float8_e4m3fnuz", residual=True),
]
_ENTRY_MODES = [
    ("unified", "none", None), ("unified", "fp8_group", int(QuantType.per_1x128)), ("unified", "fp8_token", None),
    ("unified", "fp8_tensor", None), ("unified", "mxfp4", int(QuantType.per_1x32)), ("group", "fp8_group", None),
    ("group", "mxfp4", None), ("group", "none", None), ("token", "fp8_token", None), ("functional", "none", None),
    ("functional", "fp8_group", None), ("functional", "fp8_token", None), ("functional", "fp8_tensor", None),
    ("functional", "mxfp4", None),
]  # fmt: skip


@_cases(*[
    Case(**({"entry": e, "mode": mo, "quant_type": qt, "m": 4, "n1": 256, "n2": 32, "seed": i} | opt))  # type: ignore[arg-type,operator]
    for i, (e, mo, qt) in enumerate(_ENTRY_MODES) for opt in _OPTIONS
] + [Case(entry="legacy", m=4, n1=256, n2=n2, dtype=d, q_eps=0.1, k_eps=ke, seed=n2)  # type: ignore[arg-type]
     for n2 in (0, 32) for d in ("float16", "bfloat16") for ke in (None, 1e-4)])  # fmt: skip
def test_every_entry_mode_and_option(case: Case) -> None:
    run_case(case)


def test_k_epsilon_none_uses_q_epsilon_in_every_entry() -> None:
    """Same call with k_epsilon=None and with k_epsilon=q_epsilon: identical k_out; a different one differs."""
    inp = make_inputs(Case(m=3, n1=64, n2=32))
    k_outs = {}
    for k_eps in (None, 0.3, 1e-6):
        outs = []
        k_out = _empty(3, 32, dtype=torch.float16)
        qknorm.fused_qk_rmsnorm(_empty(3, 64, dtype=torch.float16), None, inp.q, inp.q_weight, 0.3, k_out=k_out,
                                k=inp.k, k_weight=inp.k_weight, k_epsilon=k_eps)  # fmt: skip
        outs.append(k_out)
        k2 = _empty(3, 32, dtype=torch.float16)
        qknorm.fused_qk_rmsnorm_group_quant(_empty(3, 64, dtype=torch.float8_e4m3fn), _empty(3, 2), inp.q,
                                            inp.q_weight, 0.3, k_out=k2, k=inp.k, k_weight=inp.k_weight,
                                            k_epsilon=k_eps, group_size=32)  # fmt: skip
        outs.append(k2)
        k3 = _empty(3, 32, dtype=torch.float16)
        qknorm.fused_qk_rmsnorm_per_token_quant(_empty(3, 64, dtype=torch.float8_e4m3fn), _empty(3, 1), inp.q,
                                                inp.q_weight, 0.3, k_out=k3, k=inp.k, k_weight=inp.k_weight,
                                                k_epsilon=k_eps)  # fmt: skip
        outs.append(k3)
        k4 = qknorm.qk_rmsnorm(inp.q, inp.q_weight, inp.k, inp.k_weight, q_epsilon=0.3, k_epsilon=k_eps).k
        assert k4 is not None
        outs.append(k4)
        for o in outs[1:]:
            assert bits_equal(o, outs[0])
        k_outs[k_eps] = outs[0]
    assert bits_equal(k_outs[None], k_outs[0.3])
    assert not torch.equal(k_outs[None], k_outs[1e-6])


# ----------------------------------------------------------------------------- strides (SPEC §1, §3)


def _gs32(entry: str, mode: str) -> int | None:
    """An explicit group size of 32 where the entry's default (128) would not divide n1 = 64."""
    return 32 if entry in ("group", "functional") and mode in ("fp8_group", "mxfp4") else None

_DEEPSEEK = dict(m=7, n1=1536, n2=512, latent=True)


@_cases(
    Case(entry="unified", mode="none", **_DEEPSEEK),  # type: ignore[arg-type]
    Case(entry="unified", mode="fp8_group", quant_type=int(QuantType.per_1x128), transpose="view", unquantized=True, **_DEEPSEEK),  # type: ignore[arg-type]
    Case(entry="group", mode="fp8_group", group_size=128, residual=True, dtype="bfloat16", **_DEEPSEEK),  # type: ignore[arg-type]
    Case(entry="group", mode="mxfp4", group_size=32, **_DEEPSEEK),  # type: ignore[arg-type]
    Case(entry="token", mode="fp8_token", **_DEEPSEEK),  # type: ignore[arg-type]
    Case(entry="legacy", **_DEEPSEEK),  # type: ignore[arg-type]
    Case(entry="functional", mode="fp8_group", **_DEEPSEEK),  # type: ignore[arg-type]
)
def test_deepseek_split_views_of_2112_wide_rows(case: Case) -> None:
    """q = latent[:, :1536], k = latent[:, 1536:2048] of one [T, 2112] buffer: row stride 2112."""
    inp = make_inputs(case)
    assert inp.q.stride() == (2112, 1) and inp.k is not None and inp.k.stride() == (2112, 1)
    run_case(case)


@_cases(*[
    Case(entry=e, mode=mo, quant_type=qt, group_size=_gs32(e, mo), m=5, n1=64, n2=24, in_pad=p, in_offset=o,
         out_pad=p + 2, out_offset=o + 1, residual=e != "legacy", unquantized=mo != "none", seed=p)
    for e, mo, qt in (("unified", "fp8_group", int(QuantType.per_1x32)), ("unified", "none", None),
                      ("unified", "fp8_tensor", None), ("group", "mxfp4", None), ("token", "fp8_token", None),
                      ("legacy", "none", None), ("functional", "fp8_token", None))
    for p, o in ((1, 0), (7, 3), (64, 1))
])  # fmt: skip
def test_strided_inputs_and_outputs_stay_in_their_windows(case: Case) -> None:
    run_case(case)


@pytest.mark.parametrize("entry", ["unified", "group", "token", "legacy", "functional"])
def test_single_row_outputs_with_any_row_stride(entry: str) -> None:
    """m = 1: the row stride of a one-row view is irrelevant (views of a column of a wide buffer)."""
    mode = {"unified": "fp8_group", "group": "mxfp4", "token": "fp8_token", "legacy": "none", "functional": "fp8_tensor"}[entry]
    qt = int(QuantType.per_1x32) if entry == "unified" else None
    run_case(Case(entry=entry, mode=mode, quant_type=qt, group_size=_gs32(entry, mode), m=1, n1=64, n2=16, in_pad=5, out_pad=11))


# ----------------------------------------------------------------------------- m = 0 and the legacy/functional entries


@_cases(*[
    Case(entry=e, mode=mo, quant_type=qt, group_size=_gs32(e, mo), m=0, n1=64, n2=16, residual=e != "legacy",
         unquantized=True, out_pad=2)
    for e, mo, qt in (("unified", "none", None), ("unified", "fp8_group", int(QuantType.per_1x32)),
                      ("unified", "fp8_token", None), ("unified", "fp8_tensor", None),
                      ("unified", "mxfp4", int(QuantType.per_1x32)), ("group", "fp8_group", None),
                      ("group", "mxfp4", None), ("group", "none", None), ("token", "fp8_token", None),
                      ("legacy", "none", None), ("functional", "fp8_group", None))
])  # fmt: skip
def test_m_zero_writes_nothing(case: Case) -> None:
    run_case(case)


def test_m_zero_per_tensor_scale_is_left_alone() -> None:
    q = _empty(0, 32, dtype=torch.float16)
    scale = buffer((1,), torch.float32, seed=3)
    before = scale.clone()
    qknorm.fused_qk_rmsnorm(_empty(0, 32, dtype=torch.float8_e4m3fn), scale, q, _ones(32, dtype=torch.float16),
                            quant_type=QuantType.per_Tensor)  # fmt: skip
    assert bits_equal(scale, before)


def test_m_zero_legacy_and_functional_return_empty_outputs() -> None:
    q, k = _empty(0, 64, dtype=torch.bfloat16), _empty(0, 16, dtype=torch.bfloat16)
    wq, wk = _ones(64, dtype=torch.bfloat16), _ones(16, dtype=torch.bfloat16)
    q_out, k_out = qknorm.fused_qk_rmsnorm_legacy(q, wq, 1e-6, k, wk, 1e-6)
    assert q_out.shape == (0, 64) and k_out is not None and k_out.shape == (0, 16)
    out = qknorm.qk_rmsnorm(_empty(0, 4, 64, dtype=torch.bfloat16), wq, quant="mxfp4")
    assert out.q.shape == (0, 4, 32) and out.q_scale is not None and out.q_scale.shape == (0, 4, 2)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()


@pytest.mark.parametrize("with_k", [True, False])
def test_legacy_returns_new_contiguous_tensors_aliasing_nothing(with_k: bool) -> None:
    case = Case(entry="legacy", m=6, n1=128, n2=64 if with_k else 0, latent=with_k, in_pad=3)
    inp = make_inputs(case)
    q_out, k_out = qknorm.fused_qk_rmsnorm_legacy(inp.q, inp.q_weight, 1e-6, inp.k, inp.k_weight, 1e-6)
    assert q_out.is_contiguous() and q_out.shape == (6, 128) and q_out.dtype == inp.q.dtype
    sources = [t for t in (inp.q, inp.k, inp.q_weight, inp.k_weight) if t is not None]
    assert not any(_overlaps(q_out, s) for s in sources)
    if with_k:
        assert k_out is not None and k_out.is_contiguous() and k_out.shape == (6, 64)
        assert not any(_overlaps(k_out, s) for s in [*sources, q_out])
    else:
        assert k_out is None
    run_case(case)


@pytest.mark.parametrize(("quant", "group_size"), [(None, None), ("fp8_group", 32), ("fp8_token", None), ("mxfp4", 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_functional_leading_dims_equal_row_by_row(quant: str | None, group_size: int | None, dtype: torch.dtype) -> None:
    """[tokens, heads, head_dim] (per-head QK norm) equals normalizing each [1, head_dim] row alone."""
    gen = torch.Generator().manual_seed(5)
    t, h, d, dk = 3, 4, 64, 32
    q = torch.randn(t, h, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(t, h, dk, generator=gen).to(dtype).to(DEVICE)
    res = torch.randn(t, h, d, generator=gen).to(dtype).to(DEVICE)
    wq, wk = torch.rand(d, generator=gen).to(dtype).to(DEVICE), torch.rand(dk, generator=gen).to(dtype).to(DEVICE)
    kw = dict(q_epsilon=1e-5, gemma_norm=True, quant=quant, group_size=group_size, return_unquantized=quant is not None)
    out = qknorm.qk_rmsnorm(q, wq, k, wk, q_residual=res, **kw)  # type: ignore[arg-type]
    assert out.k is not None and out.k.shape == (t, h, dk)
    assert out.q_residual_out is not None and out.q_residual_out.shape == (t, h, d)
    if quant is None:
        assert out.q.shape == (t, h, d) and out.q.dtype == dtype and out.q_scale is None and out.q_unquantized is None
    else:
        assert out.q_unquantized is not None and out.q_unquantized.shape == (t, h, d)
        assert out.q_scale is not None
        cols = {"fp8_group": d // 32, "fp8_token": 1, "mxfp4": d // 32}[quant]
        assert out.q_scale.shape == (t, h, cols)
        assert out.q.shape == (t, h, d // 2 if quant == "mxfp4" else d)
    for i in range(t):
        for j in range(h):
            row = qknorm.qk_rmsnorm(q[i, j : j + 1], wq, k[i, j : j + 1], wk, q_residual=res[i, j : j + 1], **kw)  # type: ignore[arg-type]
            assert row.k is not None
            assert_norm_close(out.k[i, j], row.k[0], "k")
            assert bits_equal(out.q_residual_out[i, j], row.q_residual_out[0])  # type: ignore[index]
            if quant is None:
                assert_norm_close(out.q[i, j], row.q[0], "q")
            elif quant == "mxfp4":
                assert_mxfp4_close(out.q[i, j : j + 1], out.q_scale[i, j : j + 1], row.q, row.q_scale)  # type: ignore[index,arg-type]
            else:
                assert_fp8_close(out.q[i, j], row.q[0])
                assert_scales_close(out.q_scale[i, j], row.q_scale[0])  # type: ignore[index]


def test_functional_transposed_scale_is_a_column_major_view() -> None:
    inp = make_inputs(Case(m=5, n1=128))
    out = qknorm.qk_rmsnorm(inp.q, inp.q_weight, quant="fp8_group", group_size=32, transpose_scale=True)
    ref = qknorm.qk_rmsnorm(inp.q, inp.q_weight, quant="fp8_group", group_size=32)
    assert out.q_scale is not None and ref.q_scale is not None
    assert out.q_scale.shape == (5, 4) and out.q_scale.stride() == (1, 5)
    assert bits_equal(out.q_scale.contiguous(), ref.q_scale)
