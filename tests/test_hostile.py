"""Hostile input: every bad call raises TypeError/ValueError before anything is written.

Outputs are views into buffers of pseudo-random sentinel bytes compared bit for bit after each
rejected call. The supported in-place forms (``k_out is k``, ``q_out_unquantized is q``,
``No``-mode ``q_out_quantized is q``, ``q_res_out is q`` or ``q_residual``) must give the
results of an out-of-place call, on every available backend.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from _cases import DEVICE, Snapshot, all_backends, bits_equal, buffer, require_backend, skip_unsupported, using_backend

import qknorm
from qknorm import QuantType
from qknorm.reference import fp8_quantize, rms_norm_fp32
from qknorm.testing import assert_fp8_close, assert_mxfp4_close, assert_norm_close, assert_scales_close

M, N1, N2 = 4, 64, 32
F16 = torch.float16


def _out(shape: tuple[int, ...], dtype: torch.dtype, salt: int, device: torch.device = DEVICE) -> torch.Tensor:
    return buffer(shape, dtype, pad=2, offset=1, seed=200 + salt, device=device)


def _call(device: torch.device = DEVICE, **changes: Any) -> dict[str, Any]:
    """A valid FP8 per-1x32 unified call with k, residual and q_out_unquantized, then ``changes``."""
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen).to(F16).to(device)
    kw: dict[str, Any] = {
        "q_out_quantized": _out((M, N1), torch.float8_e4m3fn, 0, device),
        "q_out_scale": _out((M, N1 // 32), torch.float32, 1, device),
        "q": r(M, N1), "q_weight": r(N1), "q_epsilon": 1e-6,
        "q_out_unquantized": _out((M, N1), F16, 2, device), "k_out": _out((M, N2), F16, 3, device),
        "q_res_out": _out((M, N1), F16, 4, device), "k": r(M, N2), "k_weight": r(N2), "k_epsilon": 1e-6,
        "q_residual": r(M, N1), "quant_type": QuantType.per_1x32,
    }  # fmt: skip
    return kw | changes


def rejected(kw: dict[str, Any], exc: type[Exception], *fragments: str, entry: Callable[..., object] = qknorm.fused_qk_rmsnorm) -> None:
    snap = Snapshot(*kw.values())
    with pytest.raises(exc) as info:
        entry(**kw)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    for frag in fragments:
        assert frag in str(info.value), f"{info.value} lacks {frag!r}"
    snap.assert_unchanged()


def accepted(kw: dict[str, Any]) -> None:
    """The call runs, and every output of the base call holds what the spec's math gives for its inputs."""
    qknorm.fused_qk_rmsnorm(**kw)
    q_eps, k_eps = float(kw["q_epsilon"]), float(kw["k_epsilon"])
    x = kw["q"].float() + kw["q_residual"].float()
    y = rms_norm_fp32(x, kw["q_weight"].detach(), q_eps, False)
    assert bits_equal(kw["q_res_out"], x.to(F16))
    assert_norm_close(kw["q_out_unquantized"], y.to(F16), "q_out_unquantized")
    assert_norm_close(kw["k_out"], rms_norm_fp32(kw["k"].float(), kw["k_weight"].detach(), k_eps, False).to(F16), "k_out")
    codes, scales = fp8_quantize(y, 32, torch.float8_e4m3fn)
    assert_fp8_close(kw["q_out_quantized"], codes)
    assert_scales_close(kw["q_out_scale"], scales)


def test_base_call_is_valid() -> None:
    accepted(_call())


# ----------------------------------------------------------------------------- devices

TENSOR_ARGS = ("q_weight", "k", "k_weight", "k_out", "q_residual", "q_res_out", "q_out_unquantized",
               "q_out_quantized", "q_out_scale")  # fmt: skip


def _on(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    return torch.zeros(t.shape, dtype=t.dtype, device=device)


@pytest.mark.parametrize("name", TENSOR_ARGS)
def test_meta_tensor_among_real_ones(name: str) -> None:
    kw = _call()
    rejected(kw | {name: _on(kw[name], "meta")}, ValueError, name, "meta")


def test_all_meta_tensors() -> None:
    kw = _call()
    meta = {k: _on(v, "meta") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    rejected(meta, ValueError, "q", "meta")


@pytest.mark.gpu
@pytest.mark.parametrize("name", TENSOR_ARGS)
def test_cpu_tensor_among_cuda_ones(name: str) -> None:
    kw = _call(torch.device("cuda"))
    rejected(kw | {name: _on(kw[name], "cpu")}, ValueError, name, "cuda", "cpu")


@pytest.mark.gpu
def test_cuda_tensor_among_cpu_ones() -> None:
    kw = _call(torch.device("cpu"))
    rejected(kw | {"k": kw["k"].cuda()}, ValueError, "k", "cpu", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_on_another_gpu() -> None:
    kw = _call(torch.device("cuda:0"))
    rejected(kw | {"k_out": _on(kw["k_out"], "cuda:1")}, ValueError, "k_out", "cuda:0", "cuda:1")


# ----------------------------------------------------------------------------- types and dtypes


@pytest.mark.parametrize("name", ["q", *TENSOR_ARGS])
@pytest.mark.parametrize("bad", ["numpy", "list", "int", "str"])
def test_non_tensors(name: str, bad: str) -> None:
    kw = _call()
    t = kw[name]
    value = {"numpy": np.zeros(tuple(t.shape), dtype=np.float32), "list": t.float().cpu().tolist(), "int": 3, "str": "q"}[bad]
    rejected(kw | {name: value}, TypeError, name, "torch.Tensor")


@pytest.mark.parametrize("name", ["q", "q_weight", "k", "k_weight", "q_residual", "k_out", "q_res_out", "q_out_unquantized"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.bool, torch.float32, torch.float64,
                                   torch.complex64, torch.uint8])  # fmt: skip
def test_integer_bool_and_wide_float_tensors(name: str, dtype: torch.dtype) -> None:
    kw = _call()
    rejected(kw | {name: _on(kw[name], DEVICE).to(dtype)}, TypeError, name, str(dtype))


@pytest.mark.parametrize("name", ["q", "q_weight", "k", "k_out", "q_out_quantized"])
@pytest.mark.parametrize("layout", ["sparse", "nested"])
def test_sparse_and_nested_tensors_are_type_errors_not_crashes(name: str, layout: str) -> None:
    """Regression: a nested q crashed with a RuntimeError from torch and a sparse one was blamed on
    its strides; both are now TypeErrors naming the argument."""
    kw = _call()
    t = kw[name].to(F16) if kw[name].dtype == torch.float8_e4m3fn else kw[name]  # no sparse/nested FP8
    if layout == "sparse":
        bad = _on(t, DEVICE).to_sparse()
    else:
        if t.dim() < 2:
            pytest.skip("a nested tensor needs rows")
        bad = torch.nested.nested_tensor([_on(t[0], DEVICE), _on(t[1], DEVICE)])
    rejected(kw | {name: bad}, TypeError, name, "dense")


def test_parameter_weights_are_accepted() -> None:
    """Weights held by an nn.Module (Parameters requiring grad) are ordinary inputs."""
    kw = _call()
    kw["q_weight"] = torch.nn.Parameter(kw["q_weight"].clone())
    kw["k_weight"] = torch.nn.Parameter(kw["k_weight"].clone())
    accepted(kw)


def test_output_requiring_grad_is_written_whole_not_partially() -> None:
    """Regression: the reference wrote q_res_out, then autograd refused the in-place write into a
    q_out_unquantized leaf that requires grad: a RuntimeError after a partial write. The operator
    is not differentiable and, like the kernel backends, now writes every output."""
    kw = _call()
    leaf = torch.empty(M, N1, dtype=F16, device=DEVICE).requires_grad_()
    kw["q_out_unquantized"] = leaf
    with using_backend("torch"):
        qknorm.fused_qk_rmsnorm(**kw)
    ref = _call()
    qknorm.fused_qk_rmsnorm(**ref)
    assert bits_equal(leaf.detach(), ref["q_out_unquantized"])
    assert bits_equal(kw["q_res_out"], ref["q_res_out"])


# ----------------------------------------------------------------------------- weights, epsilons, group sizes


@pytest.mark.parametrize(("name", "length"), [("q_weight", N1 - 1), ("q_weight", N1 + 1), ("q_weight", 0),
                                              ("k_weight", N2 - 1), ("k_weight", N2 + 1), ("k_weight", 1)])  # fmt: skip
def test_wrong_weight_lengths(name: str, length: int) -> None:
    kw = _call()
    rejected(kw | {name: torch.ones(length, dtype=F16, device=DEVICE)}, ValueError, name, f"[{length}]")


def test_weights_swapped() -> None:
    kw = _call()
    rejected(kw | {"q_weight": kw["k_weight"], "k_weight": kw["q_weight"]}, ValueError, "q_weight", f"[{N1}]", f"[{N2}]")


@pytest.mark.parametrize("name", ["q_epsilon", "k_epsilon"])
@pytest.mark.parametrize(("value", "exc"), [
    (0.0, ValueError), (-1e-6, ValueError), (math.nan, ValueError), (math.inf, ValueError), (-math.inf, ValueError),
    (1e-300, ValueError), (True, TypeError), (False, TypeError), ("1e-6", TypeError), (None, TypeError),
    (torch.tensor(1e-6), TypeError), (1j, TypeError),
])  # fmt: skip
def test_bad_epsilons(name: str, value: object, exc: type[Exception]) -> None:
    if name == "k_epsilon" and value is None:
        pytest.skip("k_epsilon=None means q_epsilon")
    rejected(_call() | {name: value}, exc, name)


def test_numpy_scalar_epsilon_is_accepted() -> None:
    accepted(_call(q_epsilon=np.float32(1e-6), k_epsilon=np.float64(1e-5)))


@pytest.mark.parametrize(("group_size", "exc"), [
    (0, ValueError), (-32, ValueError), (-1, ValueError), (48, ValueError), (3, ValueError), (128, ValueError),
    (96, ValueError), (True, TypeError), (32.0, TypeError), ("32", TypeError),
])  # fmt: skip
@pytest.mark.parametrize("mxfp4", [False, True], ids=["fp8", "mxfp4"])
def test_bad_group_sizes(group_size: object, exc: type[Exception], mxfp4: bool) -> None:
    kw = _call(group_size=group_size)
    if mxfp4:
        kw |= {"q_out_quantized": _out((M, N1 // 2), torch.uint8, 5), "q_out_scale": _out((M, N1 // 32), torch.uint8, 6)}
    rejected(kw, exc, "group_size")


def _z(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, device=DEVICE)


@pytest.mark.parametrize(("scale", "exc", "fragment"), [
    (lambda: _out((M, 2), torch.float16, 7), TypeError, "torch.float32"),
    (lambda: _out((M, 2), torch.bfloat16, 7), TypeError, "torch.float32"),
    (lambda: _out((M, 2), torch.float64, 7), TypeError, "torch.float32"),
    (lambda: _out((M, 2), torch.uint8, 7), TypeError, "torch.float32"),
    (lambda: _out((M, 3), torch.float32, 7), ValueError, f"[{M}, 2]"),
    (lambda: _out((M * 2,), torch.float32, 7), ValueError, f"[{M}, 2]"),
    (lambda: _z(M, 2, 1), ValueError, f"[{M}, 2]"),
    (lambda: _z(M, 4)[:, ::2], ValueError, "stride"),
    (lambda: _z(M * 2).as_strided((M, 2), (1, 1)), ValueError, "row stride"),
    (lambda: _z(2).expand(M, 2), ValueError, "row stride"),
])  # fmt: skip
def test_bad_scale_tensors(scale: Callable[[], torch.Tensor], exc: type[Exception], fragment: str) -> None:
    rejected(_call(q_out_scale=scale()), exc, "q_out_scale", fragment)


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda: buffer((M, 2), torch.float32, pad=3), "strides (5, 1)"),  # padded row-major
    (lambda: _z(2 * M).as_strided((M, 2), (1, M - 1)), "strides (1, 3)"),  # column stride < m
    (lambda: _z(M, 2, 2)[:, :, 0], "strides (4, 2)"),  # neither layout
    (lambda: _z(2, M), f"got [2, {M}]"),  # the [G, m] buffer itself instead of its transpose
    (lambda: _z(M, 3), f"got [{M}, 3]"),
])  # fmt: skip
def test_transposed_scales_with_bad_strides(make: Callable[[], torch.Tensor], fragment: str) -> None:
    rejected(_call(q_out_scale=make(), transpose_scale=True), ValueError, "q_out_scale", fragment)


def test_transposed_scale_accepts_wider_column_stride() -> None:
    """Strides (1, s) with s > m (a view into a wider [G, s] buffer) are a valid column-major layout."""
    storage = torch.full((2, M + 3), -7.0, device=DEVICE)
    scale = storage[:, :M].t()
    kw = _call(q_out_scale=scale, transpose_scale=True)
    qknorm.fused_qk_rmsnorm(**kw)
    ref = _call()
    qknorm.fused_qk_rmsnorm(**ref)
    assert bits_equal(scale, ref["q_out_scale"])
    assert storage[:, M:].eq(-7.0).all()


# ----------------------------------------------------------------------------- overlaps


def _shared(rows: int, cols: int, dtype: torch.dtype = F16) -> torch.Tensor:
    return buffer((rows, cols), dtype, seed=300)


OVERLAPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    # outputs overlapping each other
    "k_out-inside-q_out_unquantized": lambda kw: kw | {"k_out": kw["q_out_unquantized"][:, :N2]},
    "q_res_out-is-q_out_unquantized": lambda kw: kw | {"q_res_out": kw["q_out_unquantized"]},
    "scale-inside-quant": lambda kw: kw | _scale_inside_quant(),
    "quant-is-q_out_unquantized-bytes": lambda kw: kw | {"q_out_quantized": kw["q_out_unquantized"].view(torch.uint8)[:, :N1].view(torch.float8_e4m3fn)},
    "k_out-rows-interleaved-with-q_res_out": lambda kw: kw | _interleaved_outputs(),
    # outputs overlapping inputs in unsupported ways
    "q_out-shifted-one-column-from-q": lambda kw: kw | _shifted("q", "q_out_unquantized", cols=1),
    "q_out-shifted-one-row-from-q": lambda kw: kw | _shifted("q", "q_out_unquantized", rows=1),
    "k_out-shifted-from-k": lambda kw: kw | _shifted("k", "k_out", cols=2, width=N2),
    "q_res_out-shifted-from-q_residual": lambda kw: kw | _shifted("q_residual", "q_res_out", rows=1),
    "k_out-is-q": lambda kw: kw | {"k_out": kw["q"][:, :N2]},
    "q_out_unquantized-is-q_residual": lambda kw: kw | {"q_out_unquantized": kw["q_residual"]},
    "q_res_out-is-k-rows": lambda kw: kw | {"q_res_out": kw["q"], "k_out": kw["q"][:, N1 - N2 :]},
    "quant-views-q-bytes": lambda kw: kw | {"q_out_quantized": kw["q"].view(torch.uint8)[:, :N1].view(torch.float8_e4m3fn)},
    "scale-inside-q_weight": lambda kw: kw | {"q_out_scale": kw["q_weight"].view(torch.float32)[: M * 2].view(M, 2)},
    "k_out-is-k_weight-storage": lambda kw: kw | _weight_as_output(kw),
    "q_out-same-start-other-stride": lambda kw: kw | _same_start_other_stride(kw),
}


def _shifted(inp: str, out: str, *, rows: int = 0, cols: int = 0, width: int = N1) -> dict[str, torch.Tensor]:
    base = _shared(M + 2, width + 4)
    return {inp: base[:M, :width], out: base[rows : rows + M, cols : cols + width]}


def _scale_inside_quant() -> dict[str, torch.Tensor]:
    quant = buffer((M, N1), torch.float8_e4m3fn, seed=301)
    return {"q_out_quantized": quant, "q_out_scale": quant.view(torch.uint8).view(torch.float32)[:, :2]}


def _interleaved_outputs() -> dict[str, torch.Tensor]:
    base = _shared(M, 2 * N1)
    return {"q_res_out": base[:, :N1], "k_out": base[:, N1 - 1 : N1 - 1 + N2]}  # one column shared per row


def _weight_as_output(kw: dict[str, Any]) -> dict[str, torch.Tensor]:
    storage = torch.zeros(M * N2, dtype=F16, device=DEVICE)
    return {"k_out": storage.view(M, N2), "k_weight": storage[:N2]}


def _same_start_other_stride(kw: dict[str, Any]) -> dict[str, torch.Tensor]:
    base = _shared(M, 2 * N1)
    return {"q": base.as_strided((M, N1), (2 * N1, 1)), "q_out_unquantized": base.as_strided((M, N1), (N1, 1))}


@pytest.mark.parametrize("name", list(OVERLAPS))
def test_overlapping_outputs_and_inputs_rejected(name: str) -> None:
    kw = OVERLAPS[name](_call())
    rejected(kw, ValueError, "overlap")


def test_outputs_in_the_gaps_between_input_rows_are_fine() -> None:
    """q = buf[:, :n1] and q_out = buf[:, n1:] interleave rows without sharing a byte."""
    base = _shared(M, 2 * N1)
    gen = torch.Generator().manual_seed(4)
    base.copy_(torch.randn(M, 2 * N1, generator=gen).to(F16))
    q, q_out = base[:, :N1], base[:, N1:]
    q_copy = q.clone()
    out = torch.empty(M, N1, dtype=F16, device=DEVICE)
    w = torch.ones(N1, dtype=F16, device=DEVICE)
    qknorm.fused_qk_rmsnorm(q_out, None, q, w)
    qknorm.fused_qk_rmsnorm(out, None, q_copy, w)
    assert bits_equal(q, q_copy) and bits_equal(q_out, out)


def test_q_and_k_may_be_the_same_tensor() -> None:
    """Inputs may overlap each other (they are only read)."""
    kw = _call()
    x = kw["q"][:, :N2]
    k_out = torch.empty(M, N2, dtype=F16, device=DEVICE)
    q_out = torch.empty(M, N2, dtype=F16, device=DEVICE)
    qknorm.fused_qk_rmsnorm(q_out, None, x, kw["k_weight"], 1e-6, k_out=k_out, k=x, k_weight=kw["k_weight"])
    solo = torch.empty(M, N2, dtype=F16, device=DEVICE)
    qknorm.fused_qk_rmsnorm(solo, None, x.clone(), kw["k_weight"], 1e-6)
    assert bits_equal(k_out, solo)


# ----------------------------------------------------------------------------- supported in-place forms


@pytest.fixture(params=all_backends())
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    require_backend(request.param)
    with using_backend(request.param):
        yield request.param


INPLACE_FORMS = ("k_out=k", "q_out_unquantized=q", "No:q_out_quantized=q", "q_res_out=q", "q_res_out=q_residual",
                 "k_out=k,q_res_out=q_residual", "No:q_out_quantized=q,k_out=k")  # fmt: skip
MODES = ("none", "fp8_group", "fp8_token", "fp8_tensor", "mxfp4")


def _fresh_inputs(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """q and k as split views of one latent buffer (row stride 2112-like), and a strided residual."""
    gen = torch.Generator().manual_seed(seed)
    latent = (torch.randn(M, N1 + N2 + 16, generator=gen) * 2).to(dtype).to(DEVICE)
    res = (torch.randn(M, N1 + 8, generator=gen)).to(dtype).to(DEVICE)[:, :N1]
    return {"q": latent[:, :N1], "k": latent[:, N1 : N1 + N2], "q_residual": res,
            "q_weight": torch.rand(N1, generator=gen).to(dtype).to(DEVICE),
            "k_weight": torch.rand(N2, generator=gen).to(dtype).to(DEVICE)}  # fmt: skip


def _run(form: str, mode: str, dtype: torch.dtype, inplace: bool) -> dict[str, torch.Tensor]:
    t = _fresh_inputs(dtype, seed=zlib.crc32(f"{form}/{mode}".encode()))
    aliases = set(form.split(":")[-1].split(",")) if inplace else set()
    new = lambda like: torch.empty(like.shape, dtype=like.dtype, device=DEVICE)
    k_out = t["k"] if "k_out=k" in aliases else new(t["k"])
    res_out = t["q"] if "q_res_out=q" in aliases else t["q_residual"] if "q_res_out=q_residual" in aliases else new(t["q"])
    unq: torch.Tensor | None = t["q"] if "q_out_unquantized=q" in aliases else new(t["q"])
    if mode == "none":
        quant, scale, qt = (t["q"] if "q_out_quantized=q" in aliases else new(t["q"])), None, QuantType.No
        if "q_out_quantized=q" in aliases:
            unq = None  # q_out_quantized is q; a second normalized copy would overlap it
    elif mode == "mxfp4":
        quant = torch.empty(M, N1 // 2, dtype=torch.uint8, device=DEVICE)
        scale, qt = torch.empty(M, 2, dtype=torch.uint8, device=DEVICE), QuantType.per_1x32
    else:
        quant = torch.empty(M, N1, dtype=torch.float8_e4m3fnuz, device=DEVICE)
        cols = {"fp8_group": (M, 2), "fp8_token": (M, 1), "fp8_tensor": (1,)}[mode]
        scale = torch.empty(cols, dtype=torch.float32, device=DEVICE)
        qt = {"fp8_group": QuantType.per_1x32, "fp8_token": QuantType.per_Token, "fp8_tensor": QuantType.per_Tensor}[mode]
    qknorm.fused_qk_rmsnorm(
        q_out_quantized=quant, q_out_scale=scale, q=t["q"], q_weight=t["q_weight"], q_epsilon=1e-5,
        q_out_unquantized=unq, k_out=k_out, q_res_out=res_out, k=t["k"], k_weight=t["k_weight"],
        q_residual=t["q_residual"], gemma_norm=True, quant_type=qt,
    )  # fmt: skip
    out = {"k_out": k_out.clone(), "q_res_out": res_out.clone(), "q_quant": quant.clone()}
    if unq is not None:
        out["q_out_unquantized"] = unq.clone()
    if scale is not None:
        out["q_scale"] = scale.clone()
    return out


@skip_unsupported
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", INPLACE_FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_supported_inplace_forms_match_out_of_place(backend: str, form: str, mode: str, dtype: torch.dtype) -> None:
    if form.startswith("No:") and mode != "none":
        pytest.skip("q_out_quantized is q only in No mode")
    got = _run(form, mode, dtype, inplace=True)
    want = _run(form, mode, dtype, inplace=False)
    for name in ("k_out", "q_out_unquantized"):
        if name in got:
            assert_norm_close(got[name], want[name], name)
    assert bits_equal(got["q_res_out"], want["q_res_out"])
    if mode == "none":
        assert_norm_close(got["q_quant"], want["q_quant"], "q_out_quantized")
    elif mode == "mxfp4":
        assert_mxfp4_close(got["q_quant"], got["q_scale"], want["q_quant"], want["q_scale"])
    else:
        assert_fp8_close(got["q_quant"], want["q_quant"])
        assert_scales_close(got["q_scale"], want["q_scale"])


# ----------------------------------------------------------------------------- validation on repeated calls

OUTPUT_ARGS = ("q_out_quantized", "q_out_scale", "q_out_unquantized", "k_out", "q_res_out")


def _fresh_twin(kw: dict[str, Any]) -> dict[str, Any]:
    """The same call with every output in fresh memory: same types, dtypes, shapes and strides."""
    twin = dict(kw)
    for name in OUTPUT_ARGS:
        t = kw.get(name)
        if isinstance(t, torch.Tensor):
            twin[name] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return twin


@pytest.mark.parametrize("name", list(OVERLAPS))
def test_overlaps_rejected_after_a_valid_call_with_the_same_signature(name: str) -> None:
    """Validation may be cached per argument signature (types, dtypes, shapes, strides, scalars);
    where the tensors sit in memory is not part of it, so an overlapping call that looks exactly
    like an earlier valid one must still be rejected, with nothing written."""
    kw = OVERLAPS[name](_call())
    twin = _fresh_twin(kw)
    for _ in range(2):  # the second valid call finds whatever the first one cached
        qknorm.fused_qk_rmsnorm(**twin)
    rejected(kw, ValueError, "overlap")


def test_partial_overlap_rejected_after_the_same_signature_ran_in_place() -> None:
    """q_out_unquantized is q (supported) first; then a view shifted by one element, same shape and strides."""
    base = _shared(M, 2 * N1 + 1)
    base.copy_(torch.randn(M, 2 * N1 + 1, generator=torch.Generator().manual_seed(8)).to(F16))
    q = base[:, :N1]
    w = torch.ones(N1, dtype=F16, device=DEVICE)
    quant = torch.empty(M, N1, dtype=torch.float8_e4m3fn, device=DEVICE)
    scale = torch.empty(M, 1, device=DEVICE)
    for _ in range(2):
        qknorm.fused_qk_rmsnorm(quant, scale, q, w, q_out_unquantized=q, quant_type=QuantType.per_Token)
    shifted = base[:, 1 : N1 + 1]
    assert shifted.shape == q.shape and shifted.stride() == q.stride()
    rejected({"q_out_quantized": quant, "q_out_scale": scale, "q": q, "q_weight": w, "q_out_unquantized": shifted,
              "quant_type": QuantType.per_Token}, ValueError, "q_out_unquantized", "overlap")  # fmt: skip


@pytest.mark.parametrize("kind", ["meta", "sparse", "eps", "gemma"])
def test_bad_arguments_rejected_after_valid_calls(kind: str) -> None:
    """A valid call, repeated, then the same call with one bad argument: still rejected."""
    kw = _call()
    for _ in range(2):
        qknorm.fused_qk_rmsnorm(**_fresh_twin(kw))
    bad = {
        "meta": {"k_out": _on(kw["k_out"], "meta")},
        "sparse": {"k": kw["k"].to_sparse()},
        "eps": {"q_epsilon": 1e-50},
        "gemma": {"gemma_norm": 1},
    }[kind]
    rejected(kw | bad, TypeError if kind in ("sparse", "gemma") else ValueError)
