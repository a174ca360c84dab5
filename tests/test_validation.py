"""One test per validation rule (SPEC §3, §5, the mode requirements of checks.py and api.py).

Each case starts from a valid call of one entry point, breaks exactly one thing, and checks
that the call raises the right exception (``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong shape, stride, size, group size or combination) with a message
naming the argument, what was expected and what was given, and that nothing was written:
every output is a view into a buffer of pseudo-random sentinel bytes compared bit for bit
after the failed call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _cases import DEVICE, Snapshot, buffer

import qknorm
from qknorm import QuantType

M, N1, N2 = 4, 64, 32
F16, BF16 = torch.float16, torch.bfloat16
FP8 = torch.float8_e4m3fn


def _out(shape: tuple[int, ...], dtype: torch.dtype, salt: int) -> torch.Tensor:
    return buffer(shape, dtype, pad=1, offset=1, seed=100 + salt)


def _inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen).to(F16).to(DEVICE)
    return {
        "q": r(M, N1),
        "q_weight": r(N1),
        "q_epsilon": 1e-6,
        "k": r(M, N2),
        "k_weight": r(N2),
        "k_epsilon": 1e-5,
        "q_residual": r(M, N1),
        "k_out": _out((M, N2), F16, 1),
        "q_res_out": _out((M, N1), F16, 2),
        "q_out_unquantized": _out((M, N1), F16, 3),
    }


ENTRY: dict[str, Callable[..., object]] = {
    "unified": qknorm.fused_qk_rmsnorm,
    "group": qknorm.fused_qk_rmsnorm_group_quant,
    "token": qknorm.fused_qk_rmsnorm_per_token_quant,
    "legacy": qknorm.fused_qk_rmsnorm_legacy,
    "functional": qknorm.qk_rmsnorm,
}

# kind -> (entry, extra keyword arguments on top of _inputs())
KINDS = (
    "unified_no",
    "unified_fp8_group",
    "unified_fp8_token",
    "unified_fp8_tensor",
    "unified_mxfp4",
    "group_fp8",
    "group_mxfp4",
    "group_none",
    "token",
    "legacy",
    "functional",
)
INPLACE_KINDS = KINDS[:9]


def base(kind: str) -> tuple[str, dict[str, Any]]:
    """A valid call of ``kind``: (entry name, keyword arguments)."""
    kw = _inputs()
    if kind == "legacy":
        return "legacy", {k: kw[k] for k in ("q", "q_weight", "k", "k_weight")} | {"q_eps": 1e-6, "k_eps": 1e-5}
    if kind == "functional":
        keep = ("q", "q_weight", "k", "k_weight", "q_epsilon", "k_epsilon", "q_residual")
        return "functional", {k: kw[k] for k in keep} | {"quant": "fp8_group", "group_size": 32}
    fp8 = lambda: (_out((M, N1), FP8, 4), _out((M, N1 // 32), torch.float32, 5))
    mx = lambda: (_out((M, N1 // 2), torch.uint8, 4), _out((M, N1 // 32), torch.uint8, 5))
    if kind == "unified_no":
        return "unified", kw | {"q_out_quantized": _out((M, N1), F16, 4), "quant_type": QuantType.No}
    if kind == "unified_fp8_group":
        qo, so = fp8()
        return "unified", kw | {"q_out_quantized": qo, "q_out_scale": so, "quant_type": QuantType.per_1x32}
    if kind == "unified_fp8_token":
        qo = _out((M, N1), FP8, 4)
        return "unified", kw | {
            "q_out_quantized": qo,
            "q_out_scale": _out((M, 1), torch.float32, 5),
            "quant_type": QuantType.per_Token,
        }
    if kind == "unified_fp8_tensor":
        qo = _out((M, N1), FP8, 4)
        return "unified", kw | {
            "q_out_quantized": qo,
            "q_out_scale": _out((1,), torch.float32, 5),
            "quant_type": QuantType.per_Tensor,
        }
    if kind == "unified_mxfp4":
        qo, so = mx()
        return "unified", kw | {"q_out_quantized": qo, "q_out_scale": so, "quant_type": QuantType.per_1x32}
    if kind == "group_fp8":
        qo, so = fp8()
        return "group", kw | {"q_out_quantized": qo, "q_out_scale": so, "group_size": 32}
    if kind == "group_mxfp4":
        qo, so = mx()
        return "group", kw | {"q_out_quantized": qo, "q_out_scale": so, "group_size": 32}
    if kind == "group_none":
        return "group", kw | {"q_out_quantized": None, "q_out_scale": None}
    if kind == "token":
        return "token", kw | {"q_out_quantized": _out((M, N1), FP8, 4), "q_out_scale": _out((M, 1), torch.float32, 5)}
    raise ValueError(kind)


def call(entry: str, kw: dict[str, Any]) -> object:
    return ENTRY[entry](**kw)


def assert_rejected(entry: str, kw: dict[str, Any], exc: type[Exception], *fragments: str) -> str:
    """The call raises ``exc`` whose message contains every fragment, and writes nothing."""
    snap = Snapshot(*kw.values())
    with pytest.raises(exc) as info:
        call(entry, kw)
    assert type(info.value) is exc, f"raised {type(info.value).__name__}, expected {exc.__name__}: {info.value}"
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"message {msg!r} lacks {frag!r}"
    snap.assert_unchanged()
    return msg


def test_every_base_call_is_valid() -> None:
    """The starting points really are valid, so each rejection below comes from the one change."""
    for kind in KINDS:
        entry, kw = base(kind)
        snap = Snapshot(*[v for k, v in kw.items() if k in ("q", "k", "q_residual")])
        call(entry, kw)
        snap.assert_unchanged()


# ----------------------------------------------------------------------------- one mutation, one rule


@dataclass(frozen=True)
class Rule:
    id: str
    change: Callable[[dict[str, Any]], dict[str, Any]]
    exc: type[Exception]
    fragments: tuple[str, ...]
    needs: tuple[str, ...] = ()  # keyword arguments the base call must have for the rule to apply
    known_bug: str | None = None  # strict xfail: the rule holds once this bug is fixed


def _set(**values: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda kw: kw | values


def _with(key: str, make: Callable[[torch.Tensor], object]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda kw: kw | {key: make(kw[key])}


def _drop(*keys: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda kw: {k: v for k, v in kw.items() if k not in keys}


def _strided_cols(t: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype, column stride 2."""
    wide = torch.zeros(t.shape[0], t.shape[1] * 2, dtype=t.dtype, device=t.device)
    return wide[:, ::2]


def _overlapping_rows(t: torch.Tensor) -> torch.Tensor:
    """Same shape, row stride smaller than the width (rows overlap)."""
    base_ = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    return base_.as_strided(t.shape, (max(t.shape[1] // 2, 1), 1))


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _as(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.zeros(t.shape, dtype=dtype, device=t.device)


def _shape(*shape: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.zeros(shape, dtype=t.dtype, device=t.device)


def _row_rules(name: str, rows: int, cols: int) -> list[Rule]:
    """Type, dtype, shape, strides and device of one ``[m, n]`` tensor argument (q: m and n are its own)."""
    is_q = name == "q"
    rules = [
        Rule(
            f"{name}-not-tensor",
            _set(**{name: [[0.0] * cols] * rows}),
            TypeError,
            (name, "torch.Tensor", "list"),
            (name,),
        ),
        Rule(
            f"{name}-float32",
            _with(name, _as(torch.float32)),
            TypeError,
            (name, "torch.float16", "torch.float32"),
            (name,),
        ),
        Rule(f"{name}-1d", _with(name, _shape(rows * cols)), ValueError, (name, f"[{rows * cols}]"), (name,)),
        Rule(f"{name}-col-stride", _with(name, _strided_cols), ValueError, (name, "stride", "2)"), (name,)),
        Rule(
            f"{name}-row-stride",
            _with(name, _overlapping_rows),
            ValueError,
            (name, "row stride", f"({cols // 2}, 1)"),
            (name,),
        ),
        Rule(
            f"{name}-meta",
            _with(name, _meta),
            ValueError,
            (name, "real device" if is_q else DEVICE.type, "meta"),
            (name,),
        ),
    ]
    if not is_q:
        rules += [
            Rule(
                f"{name}-shape",
                _with(name, _shape(rows, cols - 1)),
                ValueError,
                (name, f"[{rows}, {cols}]", f"[{rows}, {cols - 1}]"),
                (name,),
            ),
            Rule(
                f"{name}-rows",
                _with(name, _shape(rows + 1, cols)),
                ValueError,
                (name, f"[{rows}, {cols}]", f"[{rows + 1}, {cols}]"),
                (name,),
            ),
        ]
    return rules  # fmt: skip


def _weight_rules(name: str, n: int) -> list[Rule]:
    return [
        Rule(f"{name}-not-tensor", _set(**{name: [1.0] * n}), TypeError, (name, "torch.Tensor", "list"), (name,)),
        Rule(f"{name}-bf16", _with(name, _as(BF16)), TypeError, (name, "torch.float16", "torch.bfloat16"), (name,)),
        Rule(f"{name}-length", _with(name, _shape(n - 1)), ValueError, (name, f"[{n}]", f"[{n - 1}]"), (name,)),
        Rule(f"{name}-2d", _with(name, _shape(1, n)), ValueError, (name, f"[{n}]", f"[1, {n}]"), (name,)),
        Rule(f"{name}-strided", _with(name, lambda t: torch.zeros(2 * n, dtype=t.dtype, device=t.device)[::2]), ValueError, (name, "contiguous", "(2,)"), (name,)),
        Rule(f"{name}-meta", _with(name, _meta), ValueError, (name, "meta"), (name,)),
    ]  # fmt: skip


def _eps_rules(name: str) -> list[Rule]:
    return [
        Rule(f"{name}-str", _set(**{name: "1e-6"}), TypeError, (name, "float", "str"), (name,)),
        Rule(f"{name}-bool", _set(**{name: True}), TypeError, (name, "float", "bool"), (name,)),
        Rule(f"{name}-tensor", _set(**{name: torch.tensor(1e-6)}), TypeError, (name, "float", "Tensor"), (name,)),
        Rule(f"{name}-zero", _set(**{name: 0.0}), ValueError, (name, "positive", "0.0"), (name,)),
        Rule(f"{name}-negative", _set(**{name: -1e-6}), ValueError, (name, "positive", "-1e-06"), (name,)),
        Rule(f"{name}-nan", _set(**{name: math.nan}), ValueError, (name, "finite", "nan"), (name,)),
        Rule(f"{name}-inf", _set(**{name: math.inf}), ValueError, (name, "finite", "inf"), (name,)),
        # Regression: eps below the smallest normal float32 used to be accepted; added in fp32 it
        # became 0 and an all-zero row normalized to 0 * rsqrt(0) = NaN.
        Rule(f"{name}-underflows-fp32", _set(**{name: 1e-50}), ValueError, (name, "normal float32", "1e-50"), (name,)),
        Rule(f"{name}-subnormal-fp32", _set(**{name: 1e-40}), ValueError, (name, "normal float32", "1e-40"), (name,)),
        Rule(f"{name}-overflows-fp32", _set(**{name: 1e39}), ValueError, (name, "normal float32", "1e+39"), (name,)),
    ]


COMMON_RULES: list[Rule] = [
    # q (SPEC §3)
    *_row_rules("q", M, N1),
    Rule(
        "q-int32",
        _with("q", _as(torch.int32)),
        TypeError,
        ("q", "torch.float16 or torch.bfloat16", "torch.int32"),
        ("q",),
    ),
    Rule(
        "q-bool", _with("q", _as(torch.bool)), TypeError, ("q", "torch.float16 or torch.bfloat16", "torch.bool"), ("q",)
    ),
    Rule(
        "q-3d",
        _with("q", _shape(M, 2, N1 // 2)),
        ValueError,
        ("q", "2-D", f"[{M}, 2, {N1 // 2}]"),
        ("q", "q_out_unquantized"),
    ),
    Rule("q-width-0", _with("q", _shape(M, 0)), ValueError, ("q", "[1, 65536]", "got 0"), ("q", "q_out_unquantized")),
    Rule(
        "q-too-wide", _with("q", _shape(1, 65537)), ValueError, ("q", "[1, 65536]", "65537"), ("q", "q_out_unquantized")
    ),
    Rule("q-none", _set(q=None), TypeError, ("q", "torch.Tensor", "NoneType"), ("q",)),
    *_weight_rules("q_weight", N1),
    *_eps_rules("q_epsilon"),
    *_eps_rules("k_epsilon"),
    Rule("gemma-int", _set(gemma_norm=1), TypeError, ("gemma_norm", "bool", "int"), ("q_out_unquantized",)),
    # k, k_weight, k_out come together
    Rule("k-without-k_weight", _drop("k_weight"), ValueError, ("k_weight", "come together", "without"), ("k_out",)),
    Rule("k-without-k_out", _drop("k_out"), ValueError, ("k_out", "come together", "without"), ("k_out",)),
    Rule(
        "k_out-without-k",
        _drop("k", "k_weight"),
        ValueError,
        ("k, k_weight", "come together", "k_out without"),
        ("k_out",),
    ),
    Rule("k-dtype", _with("k", _as(BF16)), TypeError, ("k", "torch.float16", "torch.bfloat16"), ("k_out",)),
    Rule("k-rows", _with("k", _shape(M + 1, N2)), ValueError, ("k", f"m={M}", f"[{M + 1}, {N2}]"), ("k_out",)),
    Rule("k-1d", _with("k", _shape(N2)), ValueError, ("k", "2-D", f"[{N2}]"), ("k_out",)),
    Rule("k-width-0", _with("k", _shape(M, 0)), ValueError, ("k", "[1, 65536]", "got 0"), ("k_out",)),
    Rule("k-col-stride", _with("k", _strided_cols), ValueError, ("k", "stride", "2)"), ("k_out",)),
    Rule("k-row-stride", _with("k", _overlapping_rows), ValueError, ("k", "row stride"), ("k_out",)),
    Rule("k-meta", _with("k", _meta), ValueError, ("k", "meta"), ("k_out",)),
    Rule("k-not-tensor", _set(k=[[0.0] * N2] * M), TypeError, ("k", "torch.Tensor", "list"), ("k_out",)),
    *_weight_rules("k_weight", N2),
    *_row_rules("k_out", M, N2),
    # q_residual needs q_res_out
    Rule(
        "residual-without-out",
        _drop("q_res_out"),
        ValueError,
        ("q_res_out", "come together", "without"),
        ("q_res_out",),
    ),
    Rule(
        "res_out-without-residual",
        _drop("q_residual"),
        ValueError,
        ("q_residual", "come together", "without"),
        ("q_res_out",),
    ),
    *_row_rules("q_residual", M, N1),
    *_row_rules("q_res_out", M, N1),
    *_row_rules("q_out_unquantized", M, N1),
]

# The mode requirements, each on the kinds it concerns.
MODE_RULES: dict[str, list[Rule]] = {
    "unified_no": [
        Rule(
            "no-scale-given",
            _set(q_out_scale=torch.zeros(M, 2, device=DEVICE)),
            ValueError,
            ("q_out_scale", "None", "QuantType.No"),
        ),
        Rule(
            "no-output",
            _set(q_out_quantized=None, q_out_unquantized=None),
            ValueError,
            ("q_out_quantized", "must be given"),
        ),
        Rule(
            "no-transpose", _set(transpose_scale=True), ValueError, ("transpose_scale", "FP8 group", "no quantization")
        ),
        Rule(
            "no-fp8-output",
            _with("q_out_quantized", _as(FP8)),
            TypeError,
            ("q_out_quantized", "torch.float16", "float8_e4m3fn"),
        ),
        Rule(
            "no-output-shape",
            _with("q_out_quantized", _shape(M, N1 + 1)),
            ValueError,
            ("q_out_quantized", f"[{M}, {N1}]", f"[{M}, {N1 + 1}]"),
        ),
        Rule("no-output-meta", _with("q_out_quantized", _meta), ValueError, ("q_out_quantized", "meta")),
        Rule("quant_type-8", _set(quant_type=8), ValueError, ("quant_type", "per_1024x128=7", "8")),
        Rule("quant_type-negative", _set(quant_type=-1), ValueError, ("quant_type", "No=0", "-1")),
        Rule("quant_type-str", _set(quant_type="per_Token"), TypeError, ("quant_type", "QuantType", "str")),
        Rule("quant_type-bool", _set(quant_type=True), TypeError, ("quant_type", "QuantType", "bool")),
        Rule("quant_type-none", _set(quant_type=None), TypeError, ("quant_type", "QuantType", "NoneType")),
        Rule("transpose-str", _set(transpose_scale="yes"), TypeError, ("transpose_scale", "bool", "str")),
    ],
    "unified_fp8_group": [
        Rule(
            "fp8-missing-quant",
            _set(q_out_quantized=None),
            ValueError,
            ("q_out_quantized", "must be given", "fp8_group"),
        ),
        Rule("fp8-missing-scale", _set(q_out_scale=None), ValueError, ("q_out_scale", "must be given", "fp8_group")),
        Rule(
            "fp8-quant-not-tensor",
            _set(q_out_quantized=[0] * N1),
            TypeError,
            ("q_out_quantized", "torch.Tensor", "list"),
        ),
        Rule("fp8-scale-not-tensor", _set(q_out_scale=1.0), TypeError, ("q_out_scale", "torch.Tensor", "float")),
        Rule(
            "fp8-quant-int8",
            _with("q_out_quantized", _as(torch.int8)),
            TypeError,
            ("q_out_quantized", "float8_e4m3fn", "torch.int8"),
        ),
        Rule(
            "fp8-quant-fp16",
            _with("q_out_quantized", _as(F16)),
            TypeError,
            ("q_out_quantized", "float8_e4m3fn", "torch.float16"),
        ),
        Rule(
            "fp8-quant-e5m2",
            _with("q_out_quantized", _as(torch.float8_e5m2)),
            TypeError,
            ("q_out_quantized", "float8_e4m3fnuz", "float8_e5m2"),
        ),
        Rule(
            "fp8-quant-shape",
            _with("q_out_quantized", _shape(M, N1 - 1)),
            ValueError,
            ("q_out_quantized", f"[{M}, {N1}]", f"[{M}, {N1 - 1}]"),
        ),
        Rule(
            "fp8-quant-col-stride",
            _with("q_out_quantized", _strided_cols),
            ValueError,
            ("q_out_quantized", "stride", "2)"),
        ),
        Rule(
            "fp8-quant-row-stride",
            _with("q_out_quantized", _overlapping_rows),
            ValueError,
            ("q_out_quantized", "row stride"),
        ),
        Rule("fp8-quant-meta", _with("q_out_quantized", _meta), ValueError, ("q_out_quantized", "meta")),
        Rule(
            "fp8-scale-fp16",
            _with("q_out_scale", _as(F16)),
            TypeError,
            ("q_out_scale", "torch.float32", "torch.float16"),
        ),
        Rule(
            "fp8-scale-shape", _with("q_out_scale", _shape(M, 3)), ValueError, ("q_out_scale", f"[{M}, 2]", f"[{M}, 3]")
        ),
        Rule("fp8-scale-col-stride", _with("q_out_scale", _strided_cols), ValueError, ("q_out_scale", "stride", "2)")),
        Rule("fp8-scale-meta", _with("q_out_scale", _meta), ValueError, ("q_out_scale", "meta")),
        Rule("group-size-0", _set(group_size=0), ValueError, ("group_size", "positive power of two", "0")),
        Rule("group-size-negative", _set(group_size=-32), ValueError, ("group_size", "positive power of two", "-32")),
        Rule("group-size-48", _set(group_size=48), ValueError, ("group_size", "power of two", "48")),
        Rule("group-size-not-dividing", _set(group_size=128), ValueError, ("group_size", f"divide n1={N1}", "128")),
        Rule("group-size-bool", _set(group_size=True), TypeError, ("group_size", "int", "bool")),
        Rule("group-size-float", _set(group_size=32.0), TypeError, ("group_size", "int", "float")),
        Rule("group-size-str", _set(group_size="32"), TypeError, ("group_size", "int", "str")),
        Rule(
            "transposed-shape",
            _set(q_out_scale=torch.zeros(2, M, device=DEVICE), transpose_scale=True),
            ValueError,
            ("q_out_scale", f"[{M}, 2]", f"[2, {M}]"),
        ),
        Rule(
            "transposed-strides",
            _set(q_out_scale=buffer((M, 2), torch.float32, pad=1), transpose_scale=True),
            ValueError,
            ("q_out_scale", "transpose_scale=True", "(3, 1)"),
        ),
        Rule(
            "transposed-view-short-stride",
            _set(
                q_out_scale=torch.zeros(2 * M, device=DEVICE)[: 2 * M - 1].as_strided((M, 2), (1, M - 1)),
                transpose_scale=True,
            ),
            ValueError,
            ("q_out_scale", f">= {M}", f"(1, {M - 1})"),
        ),
        Rule(
            "overlap-quant-and-scale",
            lambda kw: kw | _quant_and_scale_sharing_bytes(),
            ValueError,
            ("q_out_quantized", "q_out_scale", "overlap"),
        ),
    ],
    "unified_fp8_token": [
        Rule("token-scale-1d", _with("q_out_scale", _shape(M)), ValueError, ("q_out_scale", f"[{M}, 1]", f"[{M}]")),
        Rule(
            "token-scale-2-cols",
            _with("q_out_scale", _shape(M, 2)),
            ValueError,
            ("q_out_scale", f"[{M}, 1]", f"[{M}, 2]"),
        ),
        Rule(
            "token-scale-rows",
            _with("q_out_scale", _shape(M + 1, 1)),
            ValueError,
            ("q_out_scale", f"[{M}, 1]", f"[{M + 1}, 1]"),
        ),
        Rule(
            "token-scale-fp64",
            _with("q_out_scale", _as(torch.float64)),
            TypeError,
            ("q_out_scale", "torch.float32", "torch.float64"),
        ),
        Rule("token-transpose", _set(transpose_scale=True), ValueError, ("transpose_scale", "FP8 group", "fp8_token")),
    ],
    "unified_fp8_tensor": [
        Rule("tensor-scale-2", _with("q_out_scale", _shape(2)), ValueError, ("q_out_scale", "one element", "[2]")),
        Rule(
            "tensor-scale-3d",
            _with("q_out_scale", _shape(1, 1, 1)),
            ValueError,
            ("q_out_scale", "one element", "[1, 1, 1]"),
        ),
        Rule(
            "tensor-scale-m",
            _with("q_out_scale", _shape(M, 1)),
            ValueError,
            ("q_out_scale", "one element", f"[{M}, 1]"),
        ),
        Rule(
            "tensor-scale-int",
            _with("q_out_scale", _as(torch.int32)),
            TypeError,
            ("q_out_scale", "torch.float32", "torch.int32"),
        ),
        Rule(
            "tensor-transpose", _set(transpose_scale=True), ValueError, ("transpose_scale", "FP8 group", "fp8_tensor")
        ),
        Rule(
            "tensor-quant-shape",
            _with("q_out_quantized", _shape(1, M * N1)),
            ValueError,
            ("q_out_quantized", f"[{M}, {N1}]"),
        ),
    ],
    "unified_mxfp4": [
        Rule(
            "mx-scale-float32",
            _with("q_out_scale", _as(torch.float32)),
            TypeError,
            ("q_out_scale", "torch.uint8", "torch.float32"),
        ),
        Rule(
            "mx-scale-int8",
            _with("q_out_scale", _as(torch.int8)),
            TypeError,
            ("q_out_scale", "float8_e8m0fnu", "torch.int8"),
        ),
        Rule(
            "mx-quant-unpacked",
            _with("q_out_quantized", _as(torch.int8)),
            TypeError,
            ("q_out_quantized", "float8_e4m3fn", "torch.int8"),
        ),
        Rule(
            "mx-quant-shape",
            _with("q_out_quantized", _shape(M, N1)),
            ValueError,
            ("q_out_quantized", f"[{M}, {N1 // 2}]", f"[{M}, {N1}]"),
        ),
        Rule("mx-quant-col-stride", _with("q_out_quantized", _strided_cols), ValueError, ("q_out_quantized", "stride")),
        Rule(
            "mx-scale-shape", _with("q_out_scale", _shape(M, 1)), ValueError, ("q_out_scale", f"[{M}, 2]", f"[{M}, 1]")
        ),
        Rule("mx-group-16", _set(group_size=16), ValueError, ("group_size", "[32, 64, 128]", "16")),
        Rule("mx-group-256", _set(group_size=256), ValueError, ("group_size", "[32, 64, 128]", "256")),
        Rule("mx-group-not-dividing", _set(group_size=128), ValueError, ("group_size", f"divide n1={N1}", "128")),
        Rule("mx-transpose", _set(transpose_scale=True), ValueError, ("transpose_scale", "FP8 group", "mxfp4")),
        Rule("mx-scale-meta", _with("q_out_scale", _meta), ValueError, ("q_out_scale", "meta")),
    ],
    "group_none": [
        Rule(
            "none-quant-without-scale",
            _set(q_out_quantized=_out((M, N1), FP8, 9)),
            ValueError,
            ("q_out_quantized", "None", "q_out_scale is None"),
        ),
        Rule(
            "none-without-unquantized",
            _set(q_out_unquantized=None),
            ValueError,
            ("q_out_unquantized", "must be given", "q_out_scale is None"),
        ),
        Rule("none-transpose", _set(transpose_scale=True), ValueError, ("transpose_scale", "q_out_scale", "None")),
    ],
    "group_fp8": [
        Rule("group-entry-missing-quant", _set(q_out_quantized=None), ValueError, ("q_out_quantized", "must be given")),
        Rule("group-entry-group-48", _set(group_size=48), ValueError, ("group_size", "power of two", "48")),
        Rule(
            "group-entry-default-128-does-not-divide",
            _drop("group_size"),
            ValueError,
            ("group_size", f"divide n1={N1}", "128"),
        ),
    ],
    "group_mxfp4": [
        Rule("group-entry-mx-group-8", _set(group_size=8), ValueError, ("group_size", "[32, 64, 128]", "8")),
        Rule(
            "group-entry-mx-scale-fp32",
            _with("q_out_scale", _as(torch.float32)),
            TypeError,
            ("q_out_scale", "torch.uint8", "torch.float32"),
        ),
    ],
    "token": [
        Rule(
            "token-entry-uint8",
            _with("q_out_quantized", _as(torch.uint8)),
            TypeError,
            ("q_out_quantized", "float8_e4m3fn", "torch.uint8"),
        ),
        Rule(
            "token-entry-scale-shape",
            _with("q_out_scale", _shape(M, 2)),
            ValueError,
            ("q_out_scale", f"[{M}, 1]", f"[{M}, 2]"),
        ),
        Rule("token-entry-missing-scale", _set(q_out_scale=None), ValueError, ("q_out_scale", "must be given")),
    ],
    "legacy": [
        Rule("legacy-q-list", _set(q=[[1.0] * N1] * M), TypeError, ("q", "torch.Tensor", "list")),
        Rule("legacy-q-none", _set(q=None), TypeError, ("q", "torch.Tensor", "NoneType")),
        Rule("legacy-k-list", _set(k=[[1.0] * N2] * M), TypeError, ("k", "torch.Tensor", "list")),
        Rule("legacy-q-float32", _with("q", _as(torch.float32)), TypeError, ("q", "torch.float16", "torch.float32")),
        Rule("legacy-q-1d", _with("q", _shape(N1)), ValueError, ("q", "2-D", f"[{N1}]")),
        Rule(
            "legacy-q_weight-length",
            _with("q_weight", _shape(N1 + 1)),
            ValueError,
            ("q_weight", f"[{N1}]", f"[{N1 + 1}]"),
        ),
        Rule("legacy-k_weight-none", _set(k_weight=None), ValueError, ("k_weight", "without")),
        Rule("legacy-k_weight-without-k", _set(k=None), ValueError, ("k", "without")),
        Rule("legacy-q_eps-zero", _set(q_eps=0.0), ValueError, ("q_eps", "positive", "0.0")),
        Rule("legacy-k_eps-str", _set(k_eps="x"), TypeError, ("k_eps", "float", "str")),
        Rule("legacy-k-dtype", _with("k", _as(BF16)), TypeError, ("k", "torch.float16", "torch.bfloat16")),
    ],
    "functional": [
        Rule("fn-quant-name", _set(quant="fp9"), ValueError, ("quant", "fp8_group", "'fp9'")),
        Rule("fn-q-list", _set(q=[[1.0] * N1]), TypeError, ("q", "torch.Tensor", "list")),
        Rule("fn-q-scalar", _set(q=torch.tensor(1.0, dtype=F16)), ValueError, ("q", "dimension", "scalar")),
        Rule("fn-q-float32", _with("q", _as(torch.float32)), TypeError, ("q", "torch.float16", "torch.float32")),
        Rule("fn-k-leading", _with("k", _shape(M + 1, N2)), ValueError, ("k", f"[{M}]", f"[{M + 1}, {N2}]")),
        Rule(
            "fn-residual-leading",
            _with("q_residual", _shape(2, M, N1)),
            ValueError,
            ("q_residual", f"[{M}]", f"[2, {M}, {N1}]"),
        ),
        Rule("fn-k_weight-none", _set(k_weight=None), ValueError, ("k_weight", "without")),
        Rule("fn-fp8-dtype-fp16", _set(fp8_dtype=F16), TypeError, ("fp8_dtype", "float8_e4m3fn", "torch.float16")),
        Rule("fn-fp8-dtype-str", _set(fp8_dtype="e4m3"), TypeError, ("fp8_dtype", "torch.dtype", "str")),
        Rule("fn-group-48", _set(group_size=48), ValueError, ("group_size", "power of two", "48")),
        Rule("fn-group-not-dividing", _set(group_size=128), ValueError, ("group_size", f"divide n1={N1}", "128")),
        Rule("fn-mx-group-16", _set(quant="mxfp4", group_size=16), ValueError, ("group_size", "[32, 64, 128]", "16")),
        Rule("fn-mx-transpose", _set(quant="mxfp4", transpose_scale=True), ValueError, ("transpose_scale", "mxfp4")),
        Rule(
            "fn-token-transpose",
            _set(quant="fp8_token", transpose_scale=True),
            ValueError,
            ("transpose_scale", "fp8_token"),
        ),
        Rule("fn-eps-nan", _set(q_epsilon=math.nan), ValueError, ("q_epsilon", "finite", "nan")),
        Rule("fn-eps-underflows-fp32", _set(k_epsilon=1e-45), ValueError, ("k_epsilon", "normal float32", "1e-45")),
        Rule("fn-gemma-str", _set(gemma_norm="yes"), TypeError, ("gemma_norm", "bool", "str")),
    ],
}
# The quantizing kinds share the FP8-group rules that do not depend on the scale form.
MODE_RULES["group_fp8"] += [
    r
    for r in MODE_RULES["unified_fp8_group"]
    if r.id.startswith(("fp8-", "group-size")) and r.id != "fp8-missing-scale"
]
MODE_RULES["group_mxfp4"] += [r for r in MODE_RULES["unified_mxfp4"] if r.id.startswith("mx-") and "group" not in r.id]
MODE_RULES["token"] += [r for r in MODE_RULES["unified_fp8_token"] if r.id.startswith("token-scale")]
MODE_RULES["unified_fp8_token"] += [r for r in MODE_RULES["unified_fp8_group"] if r.id.startswith("fp8-quant")]
MODE_RULES["unified_fp8_tensor"] += [r for r in MODE_RULES["unified_fp8_group"] if r.id.startswith("fp8-quant")]


def _quant_and_scale_sharing_bytes() -> dict[str, torch.Tensor]:
    quant = buffer((M, N1), FP8, seed=11)
    return {"q_out_quantized": quant, "q_out_scale": quant.view(torch.uint8).view(torch.float32)[:, :2]}


def _applicable() -> list[tuple[str, Rule]]:
    cases = []
    for kind in INPLACE_KINDS:
        keys = set(base(kind)[1])
        for rule in COMMON_RULES:
            if all(k in keys for k in rule.needs):
                cases.append((kind, rule))
    for kind, rules in MODE_RULES.items():
        cases += [(kind, rule) for rule in rules]
    return cases


CASES = _applicable()


@pytest.mark.parametrize(
    ("kind", "rule"),
    [
        pytest.param(
            k, r, id=f"{k}:{r.id}", marks=[pytest.mark.xfail(strict=True, reason=r.known_bug)] if r.known_bug else []
        )
        for k, r in CASES
    ],
)
def test_rule(kind: str, rule: Rule) -> None:
    entry, kw = base(kind)
    assert_rejected(entry, rule.change(kw), rule.exc, *rule.fragments)


def test_rules_cover_every_entry_and_mode() -> None:
    kinds = {k for k, _ in CASES}
    assert kinds == set(KINDS)
    for kind in KINDS:
        assert sum(1 for k, _ in CASES if k == kind) >= 3, kind


# ----------------------------------------------------------------------------- rules outside the table


def test_mxfp4_odd_width_rejected_before_group_size() -> None:
    """n1 = 33: two values per byte is impossible, whatever the group size says."""
    q = torch.randn(2, 33).to(F16).to(DEVICE)
    quant, scale = _out((2, 16), torch.uint8, 1), _out((2, 1), torch.uint8, 2)
    kw = {
        "q_out_quantized": quant,
        "q_out_scale": scale,
        "q": q,
        "q_weight": torch.ones(33, dtype=F16, device=DEVICE),
        "group_size": 32,
    }
    assert_rejected("group", kw, ValueError, "MXFP4", "even n1", "n1=33")


def test_k_width_above_limit_rejected() -> None:
    q = torch.randn(1, 8).to(F16).to(DEVICE)
    k = torch.zeros(1, 65537, dtype=F16, device=DEVICE)
    kw = {"q_out_quantized": _out((1, 8), F16, 1), "q": q, "q_weight": torch.ones(8, dtype=F16, device=DEVICE),
          "k": k, "k_weight": torch.ones(65537, dtype=F16, device=DEVICE), "k_out": _out((1, 65537), F16, 2)}  # fmt: skip
    assert_rejected("unified", kw, ValueError, "k", "[1, 65536]", "65537")


def test_bf16_q_with_fp16_everything_else_names_the_first_mismatch() -> None:
    entry, kw = base("unified_fp8_group")
    kw["q"] = kw["q"].to(BF16)
    assert_rejected(entry, kw, TypeError, "q_weight", "torch.bfloat16", "torch.float16")


def test_no_mode_both_outputs_validates_the_copy() -> None:
    """aiter's No mode with q_out_unquantized as well: the second output is validated too."""
    entry, kw = base("unified_no")
    kw["q_out_unquantized"] = _out((M, N1 - 2), F16, 7)
    assert_rejected(entry, kw, ValueError, "q_out_unquantized", f"[{M}, {N1}]", f"[{M}, {N1 - 2}]")


def test_functional_width_zero_is_a_value_error() -> None:
    """A zero-width q is a ValueError in every entry (reshaping it must not crash first)."""
    q = torch.zeros(M, 0, dtype=F16, device=DEVICE)
    with pytest.raises(ValueError, match="q"):
        qknorm.qk_rmsnorm(q, torch.zeros(0, dtype=F16, device=DEVICE))


@pytest.mark.parametrize("kind", INPLACE_KINDS)
def test_m_zero_is_a_valid_no_op(kind: str) -> None:
    """m = 0 passes validation (shapes [0, n]) and writes nothing."""
    entry, kw = base(kind)
    zero: dict[str, torch.Tensor] = {}
    for key, val in kw.items():
        if isinstance(val, torch.Tensor) and val.dim() == 2 and val.shape[0] == M:
            zero[key] = (
                buffer((0, val.shape[1]), val.dtype, seed=len(zero)) if key not in ("q", "k", "q_residual") else val[:0]
            )
    kw |= zero  # a per-tensor scale keeps its one element whatever m is
    snap = Snapshot(*[v for k, v in kw.items() if k not in ("q", "k", "q_residual")])
    call(entry, kw)
    snap.assert_unchanged()


def test_epsilon_underflowing_fp32_is_rejected_not_nan_rows() -> None:
    """Regression: q_epsilon=1e-50 used to pass validation, became 0 when added in fp32, and an
    all-zero row normalized to 0 * rsqrt(0) = NaN (FP8 scale NaN, MXFP4 scale byte 255). It is now
    a ValueError; the smallest accepted epsilon (the smallest normal float32) keeps zero rows zero."""
    q = torch.zeros(2, 32, dtype=F16, device=DEVICE)
    w = torch.ones(32, dtype=F16, device=DEVICE)
    with pytest.raises(ValueError, match="q_epsilon must be a normal float32"):
        qknorm.qk_rmsnorm(q, w, q_epsilon=1e-50, quant="fp8_token")
    out = qknorm.qk_rmsnorm(q, w, q_epsilon=2.0**-126, quant="fp8_token", return_unquantized=True)
    assert out.q_unquantized is not None and out.q_scale is not None
    assert out.q_unquantized.float().eq(0).all() and out.q_scale.isfinite().all()


def test_block_quant_dtype_error_names_the_mxfp4_choice() -> None:
    """Regression: a block QuantType with a wrong output dtype was told only of the FP8 dtypes,
    though a packed-nibble output selects MXFP4 there."""
    q = torch.randn(2, 128, dtype=F16, device=DEVICE)
    w = torch.ones(128, dtype=F16, device=DEVICE)
    bad = torch.full((2, 128), 7, dtype=torch.int8, device=DEVICE)
    scale = torch.full((2, 1), 5.0, device=DEVICE)
    snap = Snapshot(bad, scale)
    with pytest.raises(
        TypeError, match=r"q_out_quantized .*float8_e4m3fn.*float4_e2m1fn_x2/torch\.uint8 for MXFP4.*got torch\.int8"
    ):
        qknorm.fused_qk_rmsnorm(bad, scale, q, w, quant_type=QuantType.per_1x128)
    snap.assert_unchanged()
    with pytest.raises(TypeError, match=r"float8_e4m3fnuz for fp8_token quantization, got torch\.int8"):
        qknorm.fused_qk_rmsnorm_per_token_quant(bad, scale, q, w, 1e-6)
    snap.assert_unchanged()


@pytest.mark.parametrize(
    ("args", "error", "pattern"),
    [
        ((True, False, 1e-6, 1e-6), ValueError, "k and k_weight come together: got k without k_weight"),
        ((False, True, 1e-6, 1e-6), ValueError, "k and k_weight come together: got k_weight without k"),
        ((True, True, -1.0, 1e-6), ValueError, "q_eps must be a positive finite float, got -1.0"),
        ((True, True, 1e-6, "x"), TypeError, "k_eps must be a positive finite float, got str"),
    ],
)
def test_legacy_errors_speak_of_legacy_arguments(args: tuple[Any, ...], error: type, pattern: str) -> None:
    """Regression: the legacy entry's errors named k_out and q_epsilon, which its callers never pass."""
    with_k, with_kw, q_eps, k_eps = args
    q = torch.randn(2, 64, dtype=F16, device=DEVICE)
    k = torch.randn(2, 32, dtype=F16, device=DEVICE) if with_k else None
    kw = torch.ones(32, dtype=F16, device=DEVICE) if with_kw else None
    with pytest.raises(error, match=pattern):
        qknorm.fused_qk_rmsnorm_legacy(q, torch.ones(64, dtype=F16, device=DEVICE), q_eps, k, kw, k_eps)
