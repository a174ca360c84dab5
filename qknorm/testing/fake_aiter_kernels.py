"""What the fake aiter entries compute and check, per aiter generation (see :mod:`qknorm.testing.fake_aiter`).

Each entry reproduces its generation's Python wrapper (``ValueError``/``NotImplementedError``),
the pybind11 argument conversion (``TypeError``) and the C++ host checks, read from aiter's
source at the cited commits:

- ``csrc/kernels/fused_qk_rmsnorm_group_quant.cu``: ``TORCH_CHECK`` (raises ``RuntimeError``)
  from #2527 to #3137, ``AITER_CHECK`` (``std::abort()``) from #3137 on; ``is_contiguous()``
  of every tensor before #2637, ``check_2d_last_dim_contiguous`` (``stride(1) == 1``,
  ``stride(0) >= size(1)``) and scale strides from #2637 on; the thread-data-size and
  reduce-thread-size checks and dispatch switch; ``n1, n2 <= 8192``.
- ``csrc/kernels/fused_qk_norm.cu`` (the plain kernel behind ``_fused_qk_rmsnorm`` and the
  legacy ``fused_qk_rmsnorm``): ``TORCH_CHECK`` from #2442, ``AITER_CHECK`` from #3159 on.
- bf16 stores: ``store_vector`` converts with ``opus::cast`` (``csrc/include/aiter_opus_plus.h``),
  whose ``fp32_to_bf16`` truncates (``OPUS_FP32_to_BF16_DEFAULT 2``, ``csrc/include/opus/opus.hpp``,
  "valid on gfx94* and before") except on gfx950/gfx12, where the conversion instruction rounds
  to nearest even. Every bf16 output (normalized q and k, ``q_res_out``) is truncated on gfx942.
- The MXFP4 E8M0 scale: ``round_pow2(amax) * 0.25`` (``f32_to_e8m0_scale``,
  ``csrc/include/fp4_quant_utils.h``) before #3212, ``ceil_pow2(amax * fl32(1/6))``
  (``fp4_f32_to_e8m0_scale``, ``csrc/include/mx_quant_utils.h``) from #3212 on.

Outputs are written at their own strides; scales at the offsets aiter's kernel computes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..reference import e2m1_codes, e8m0_to_float, fp8_quantize, mxfp4_quantize, pack_nibbles, rms_norm_fp32

__all__ = ["AiterAbort", "Behaviour", "ENTRIES"]

_FP4 = getattr(torch, "float4_e2m1fn_x2", torch.uint8)
_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


class AiterAbort(BaseException):
    """A failed ``AITER_CHECK``: the real aiter calls ``std::abort()`` here and the process dies.

    A ``BaseException`` so that no ``except Exception`` (qknorm's included) can swallow it: a
    test that reaches it fails. Fakes written with ``aborts=True`` abort the process for real.
    """


@dataclass(frozen=True)
class Behaviour:
    """The rules of one aiter generation that the fake entries follow."""

    contiguous: bool = False  # group quant: is_contiguous() of every tensor (before #2637)
    gq_aborts: bool = True  # group quant: AITER_CHECK (#3137 on) instead of TORCH_CHECK
    plain_aborts: bool = True  # fused_qk_norm.cu: AITER_CHECK (#3159 on)
    mx_round_up: bool = True  # MXFP4 scale ceil_pow2(amax/6) (#3212 on)
    no_quant: bool = True  # q_out_scale=None plain mode (#3010 on)
    k_none_error: type[Exception] = AttributeError  # _fused_qk_rmsnorm(k=None): TypeError before #3159
    truncate_bf16: bool = False  # the architecture's fp32 -> bf16 store truncates (gfx94x: opus rm 2)


def _rnd(x: torch.Tensor, dtype: torch.dtype, b: Behaviour) -> torch.Tensor:
    """fp32 -> an output dtype as the kernel stores it: RNE, or bf16 truncation where ``b`` says so."""
    if b.truncate_bf16 and dtype == torch.bfloat16:  # opus fp32_to_bf16 rm 2: the upper 16 bits
        return (x.contiguous().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are 0
    return x.to(dtype)


class Check:
    """``TORCH_CHECK`` (RuntimeError) or ``AITER_CHECK`` (abort) of one entry."""

    def __init__(self, aborts: bool, abort_process: bool, func: str) -> None:
        self.aborts, self.abort_process, self.func = aborts, abort_process, func

    def __call__(self, ok: bool, msg: str) -> None:
        if ok:
            return
        text = f"[AITER] {self.func} {msg}" if self.aborts else f"{self.func} {msg}"
        if not self.aborts:
            raise RuntimeError(text)
        if self.abort_process:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            os.abort()
        raise AiterAbort(text)


def _layout(check: Check, t: torch.Tensor, name: str, contiguous: bool) -> None:
    if contiguous:
        check(t.is_contiguous(), f"{name} must be contiguous")
    else:
        check(t.stride(1) == 1, f"{name} must have stride(1)==1 (last dimension contiguous), got {t.stride(1)}")
        check(t.stride(0) >= t.size(1), f"{name} has invalid stride(0)={t.stride(0)}, expected >= {t.size(1)}")


def _vector(check: Check, w: torch.Tensor, name: str, n: int, dtype: torch.dtype, contiguous: bool) -> None:
    check(w.dim() == 1, f"{name} must be a 1D tensor")
    check(w.is_contiguous() if contiguous else w.stride(0) == 1, f"{name} must be contiguous")
    check(w.dtype == dtype, f"{name} dtype mismatch with q")
    check(w.numel() == n, f"{name} shape mismatch, expected {n}, got {w.numel()}")


def _same_as_q(check: Check, t: torch.Tensor, name: str, q: torch.Tensor, contiguous: bool) -> None:
    check(t.dim() == 2, f"{name} must be a 2D tensor")
    _layout(check, t, name, contiguous)
    check(t.dtype == q.dtype, f"{name} dtype mismatch with q")
    check(tuple(t.shape) == tuple(q.shape), f"{name} shape mismatch with q")


def _thread_data_size(max_n: int, fp4: bool, per_token: bool) -> int:
    if per_token:
        return 8 if max_n <= 2048 else 16 if max_n <= 4096 else 24 if max_n <= 6144 else 32
    if fp4:
        return 8 if max_n <= 1024 else 16
    return 4 if max_n <= 128 else 8 if max_n <= 1024 else 16


def _e8m0_round_nearest(amax: torch.Tensor) -> torch.Tensor:
    """Before #3212: the exponent of round_pow2(amax) * 0.25 (mantissa >= 0.5 rounds up)."""
    bits = amax.float().view(torch.int32)
    e = (bits >> 23) & 0xFF
    bump = ((bits & 0x400000) != 0) & (((bits & 0x200000) != 0) | ((bits & 0x1FFFFF) != 0) | (e != 0)) & (e != 255)
    return torch.clamp(e + bump.to(torch.int32) - 2, min=0)


def _mxfp4(y: torch.Tensor, gs: int, round_up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if round_up:
        return mxfp4_quantize(y, gs)
    m, n = y.shape
    groups = y.reshape(m, n // gs, gs)
    e = _e8m0_round_nearest(torch.clamp_min(groups.abs().amax(dim=-1), 1e-10))
    codes = e2m1_codes(groups / e8m0_to_float(e).unsqueeze(-1))
    return pack_nibbles(codes.reshape(m, n)), e.to(torch.uint8)


def _check_quant(a: dict[str, Any], c: Check, b: Behaviour, gs: int, fp8: torch.dtype) -> tuple[bool, int, int]:
    """The quantized-output checks; returns (fp4, scale row stride, scale column stride)."""
    q, qo, s, transpose = a["q"], a["q_out_quantized"], a["q_out_scale"], bool(a["transpose_scale"])
    m, n1 = q.shape
    per_token = gs == 0
    if not per_token:
        c(gs > 0, "group_size must be greater than 0")
        c(n1 % gs == 0, "q.size(1) must be divisible by group_size for group quant")
    c(qo.dim() == 2, "q_out_quantized must be a 2D tensor")
    _layout(c, qo, "q_out_quantized", b.contiguous)
    c(s.dim() == 2, "q_out_scale must be a 2D tensor")
    is_fp4 = qo.dtype == _FP4 and _FP4 != torch.uint8
    fp8_ok = qo.dtype == fp8 if b.gq_aborts else qo.dtype in _FP8  # #3137 on: AITER_DTYPE_fp8, this GPU's flavour
    c(fp8_ok or is_fp4, f"q_out_quantized dtype only supports fp8/fp4x2, got: {qo.dtype}")
    cols = n1 // 2 if is_fp4 else n1
    c(tuple(qo.shape) == (m, cols), f"q_out_quantized shape mismatch, expected [{m}, {cols}]")
    groups = 1 if per_token else n1 // gs
    c(tuple(s.shape) == (m, groups), f"q_out_scale shape mismatch, expected [{m}, {groups}]")
    if b.contiguous:  # #2527: written at raw offsets
        c(s.is_contiguous(), "out1_scale must be contiguous")
        rs, cs = (1, m) if transpose else (groups, 1)
    elif transpose and not per_token:
        c(s.is_contiguous() or (s.stride(0) == 1 and s.stride(1) == m),
          "q_out_scale must be contiguous or have transpose-compatible strides when transpose_scale=True")  # fmt: skip
        rs, cs = 1, m
    else:
        _layout(c, s, "q_out_scale", False)
        rs, cs = s.stride(0), s.stride(1)
    if is_fp4:
        c(s.dtype == torch.uint8, "q_out_scale dtype must be uint8 for fp4x2 path")
        c(not transpose, "fp4x2 path currently does not support transpose_scale=true")
    else:
        c(s.dtype == torch.float32, "q_out_scale dtype must be float32 for fp8 path")
    return is_fp4, rs, cs


def _check_rest(a: dict[str, Any], c: Check, b: Behaviour) -> None:
    """q, weights, optional outputs, residual and k: the checks every mode shares."""
    q = a["q"]
    c(q.dim() == 2, "q must be a 2D tensor")
    _layout(c, q, "q", b.contiguous)
    c(q.dtype in (torch.float16, torch.bfloat16), f"q only supports fp16/bf16, got: {q.dtype}")
    _vector(c, a["q_weight"], "q_weight", q.size(1), q.dtype, b.contiguous)
    if a["q_out_unquantized"] is not None:
        _same_as_q(c, a["q_out_unquantized"], "q_out_unquantized", q, b.contiguous)
    if a["q_residual"] is not None:
        c(a["q_res_out"] is not None, "q_res_out must be provided when q_residual is provided")
        _same_as_q(c, a["q_residual"], "q_residual", q, b.contiguous)
        _same_as_q(c, a["q_res_out"], "q_res_out", q, b.contiguous)
    k = a["k"]
    if k is not None:
        c(a["k_weight"] is not None, "k_weight must be provided when k is provided")
        c(a["k_out"] is not None, "k_out must be provided when k is provided")
        c(k.dim() == 2, "k must be a 2D tensor")
        _layout(c, k, "k", b.contiguous)
        c(k.dtype == q.dtype and k.size(0) == q.size(0), "k and q must have the same dtype and leading dim")
        _vector(c, a["k_weight"], "k_weight", k.size(1), q.dtype, b.contiguous)
        c(a["k_out"].dim() == 2, "k_out must be a 2D tensor")
        _layout(c, a["k_out"], "k_out", b.contiguous)
        c(a["k_out"].dtype == q.dtype and a["k_out"].shape == k.shape, "k_out dtype or shape mismatch with k")
    n2 = 0 if k is None else k.size(1)
    c(q.size(1) <= 8192 and n2 <= 8192, f"fused kernel only supports n1/n2 <= 8192, got n1={q.size(1)}, n2={n2}")


def _check_dispatch(c: Check, gs: int, max_n: int, fp4: bool) -> None:
    tds = _thread_data_size(max_n, fp4, per_token=False)
    c(gs % tds == 0, f"group_size must be divisible by thread_data_size={tds}")
    c(gs <= 64 * tds, f"group_size exceeds max supported for fused kernel, got {gs}")
    rts = gs // tds
    c(rts & (rts - 1) == 0, "reduce_thread_size is not power of 2")
    c(rts in (128 // tds, 64 // tds, 32 // tds), f"unsupported reduce_thread_size={rts}")


def group_quant(a: dict[str, Any], fp8: torch.dtype, b: Behaviour, abort_process: bool, gemma: bool) -> None:
    """``fused_qk_rmsnorm_group_quant`` host code; ``group_size == 0`` is the per-token entry (#2958)."""
    c = Check(b.gq_aborts, abort_process, "fused_qk_rmsnorm_group_quant")
    no_quant = b.no_quant and a["q_out_scale"] is None
    gs = int(a["group_size"])
    _check_rest(a, c, b)
    q = a["q"]
    n1 = q.size(1)
    n2 = 0 if a["k"] is None else a["k"].size(1)
    fp4, rs, cs = (False, 0, 0) if no_quant else _check_quant(a, c, b, gs, fp8)
    if gs != 0 or no_quant:
        _check_dispatch(c, 128 if no_quant else gs, max(n1, n2), fp4)
    x = q.float()
    if a["q_residual"] is not None:
        x = x + a["q_residual"].float()
        a["q_res_out"].copy_(_rnd(x, q.dtype, b))
    y = rms_norm_fp32(x, a["q_weight"], float(a["q_epsilon"]), gemma)
    if a["k"] is not None:
        k_eps = a["k_epsilon"] if a["k_epsilon"] is not None else a["q_epsilon"]
        a["k_out"].copy_(_rnd(rms_norm_fp32(a["k"].float(), a["k_weight"], float(k_eps), gemma), q.dtype, b))
    if a["q_out_unquantized"] is not None:
        a["q_out_unquantized"].copy_(_rnd(y, q.dtype, b))
    if no_quant:
        return
    if fp4:
        codes, scales = _mxfp4(y, gs, b.mx_round_up)
        a["q_out_quantized"].view(torch.uint8).copy_(codes)
    else:
        codes, scales = fp8_quantize(y, gs or n1, fp8)
        a["q_out_quantized"].copy_(codes)
    s = a["q_out_scale"]
    torch.as_strided(s, scales.shape, (rs, cs), s.storage_offset()).copy_(scales.to(s.dtype))


def plain(a: dict[str, Any], b: Behaviour, abort_process: bool, returns: bool) -> Any:
    """The plain kernel of fused_qk_norm.cu behind ``_fused_qk_rmsnorm`` (#2958) and the legacy entry (#2442)."""
    q, k, q_out, k_out = a["q"], a["k"], a.get("q_out"), a.get("k_out")
    if k is None:
        if b.k_none_error is AttributeError:
            raise AttributeError("'NoneType' object has no attribute 'dtype'")
        raise TypeError("fused_qk_rmsnorm(): incompatible function arguments; argument 'k' is not a Tensor")
    c = Check(b.plain_aborts, abort_process, "fused_qk_rmsnorm")
    c(q.dim() == 2 and k.dim() == 2, "q must be 2D: [M, N1]; k must be 2D: [M, N2]")
    c(a["q_weight"].dim() == 1 and a["k_weight"].dim() == 1, "q_weight and k_weight must be 1D")
    c(a["q_weight"].is_contiguous() and a["k_weight"].is_contiguous(), "q_weight and k_weight must be contiguous")
    c(q.dtype == k.dtype == a["q_weight"].dtype == a["k_weight"].dtype, "q, k, q_weight and k_weight must share dtype")
    c(q.dtype in (torch.float16, torch.bfloat16), "fused_qk_rmsnorm only supports float16 or bfloat16")
    c(max(q.size(1), k.size(1)) <= 8192, f"not support n: {max(q.size(1), k.size(1))}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    yq = rms_norm_fp32(q.float(), a["q_weight"], float(a["q_eps"]), False)
    yk = rms_norm_fp32(k[: q.size(0)].float(), a["k_weight"], float(a["k_eps"]), False)
    q_out.copy_(_rnd(yq, q.dtype, b))
    k_out.copy_(_rnd(yk, q.dtype, b))
    return (q_out, k_out) if returns else None


def unified(a: dict[str, Any], fp8: torch.dtype, b: Behaviour, abort_process: bool) -> None:
    """The unified ``fused_qk_rmsnorm`` (#2958): the same comparisons as aiter's, on a pybind11 enum."""
    qt = a["quant_type"]
    members = type(qt)
    if qt == members.No:  # an int never equals a member: No must be passed as QuantType.No
        plain({"q_out": a["q_out_quantized"], "q": a["q"], "q_weight": a["q_weight"], "q_eps": a["q_epsilon"],
               "k_out": a["k_out"], "k": a["k"], "k_weight": a["k_weight"], "k_eps": a["k_epsilon"]},
              b, abort_process, returns=True)  # fmt: skip
        return
    if qt == members.per_Tensor:
        raise NotImplementedError("fused_qk_rmsnorm + per_tensor quant not supported")
    if qt == members.per_Token:
        per_token(a, fp8, b, abort_process)
        return
    group_size = a["group_size"]
    if group_size is None:
        if qt in (members.per_1x128, members.per_128x128, members.per_256x128, members.per_1024x128):
            group_size = 128
        elif qt == members.per_1x32:
            group_size = 32
    group_quant_wrapper({**a, "group_size": group_size}, fp8, b, abort_process, gemma=bool(a["gemma_norm"]))


def group_quant_wrapper(a: dict[str, Any], fp8: torch.dtype, b: Behaviour, abort_process: bool, gemma: bool) -> None:
    """The Python ``fused_qk_rmsnorm_group_quant`` of each generation, then its host code."""
    qo, s = a["q_out_quantized"], a["q_out_scale"]
    if b.no_quant and s is None:
        if a["q_out_unquantized"] is None:
            raise ValueError("fused_qk_rmsnorm_group_quant: q_out_unquantized must be provided when q_out_scale "
                             "is None (no-quant mode)")  # fmt: skip
    else:
        if b.no_quant and a["group_size"] <= 0:
            raise ValueError("fused_qk_rmsnorm_group_quant requires group_size > 0")
        if b.no_quant and qo is None:
            raise ValueError("fused_qk_rmsnorm_group_quant: q_out_quantized must be provided")
        if qo.dtype not in (fp8, _FP4):
            raise ValueError(
                f"fused_qk_rmsnorm_group_quant currently supports fp8/fp4x2 output quant only; got {qo.dtype}"
            )
        if qo.dtype == _FP4 and a["transpose_scale"]:
            raise ValueError("fused_qk_rmsnorm_group_quant fp4x2 currently does not support transpose_scale=True")
        if s is None:  # before #3010 the binding takes a Tensor
            raise TypeError("fused_qk_rmsnorm_group_quant(): incompatible function arguments (q_out_scale: None)")
    group_quant(a, fp8, b, abort_process, gemma)


def per_token(a: dict[str, Any], fp8: torch.dtype, b: Behaviour, abort_process: bool) -> None:
    if a["q_out_quantized"].dtype != fp8:
        raise ValueError("fused_qk_rmsnorm_per_token_quant currently supports fp8 output quant only")
    s = a["q_out_scale"]
    if s.dim() != 2 or s.size(1) != 1:
        raise ValueError("fused_qk_rmsnorm_per_token_quant expects q_out_scale with shape [m, 1]")
    group_quant({**a, "group_size": 0, "transpose_scale": False}, fp8, b, abort_process, bool(a["gemma_norm"]))


Entry = Callable[[dict[str, Any], torch.dtype, Behaviour, bool], Any]
ENTRIES: dict[str, Entry] = {
    "unified": unified,
    "group_quant_v14": lambda a, fp8, b, ab: group_quant_wrapper(a, fp8, b, ab, bool(a["gemma_norm"])),
    "group_quant_v13": lambda a, fp8, b, ab: group_quant_wrapper(a, fp8, b, ab, bool(a["gemma_norm"])),
    "group_quant_v12": lambda a, fp8, b, ab: group_quant_wrapper(a, fp8, b, ab, False),
    "per_token": per_token,
    "private": lambda a, fp8, b, ab: plain(a, b, ab, returns=True),
    "legacy": lambda a, fp8, b, ab: plain({**a, "q_out": None, "k_out": None}, b, ab, returns=True),
}
