"""Helpers shared by the test modules.

- Devices, backends and hypothesis settings (``QKNORM_FUZZ_EXAMPLES`` sets the example count).
- Memory with sentinels: outputs are views into larger buffers of pseudo-random bytes, so a
  test can prove that a call wrote nothing (failed validation) or nothing outside its window.
- Independent encoders of the number formats, written from the format definitions (not from
  :mod:`qknorm.reference`): FP8 e4m3fn / e4m3fnuz, E2M1, E8M0, and ``fl32`` rounding.
- :class:`Case`: one public-API call described as data (entry, mode, shapes, strides, data),
  runnable on any backend and compared with :mod:`qknorm.reference` (:func:`run_case`).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

import qknorm
from qknorm.backends import registry
from qknorm.checks import build_request
from qknorm.quant import QuantMode, QuantType
from qknorm.reference import qk_rmsnorm_reference, rms_norm_fp32
from qknorm.testing import (
    assert_fp8_close,
    assert_mxfp4_close,
    assert_norm_close,
    assert_scales_close,
    backend_override,
)

REPO = Path(__file__).resolve().parents[1]  # the checkout (subprocess tests import qknorm from it)
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
FP4_X2 = getattr(torch, "float4_e2m1fn_x2", None)
E8M0FNU = getattr(torch, "float8_e8m0fnu", None)

# ----------------------------------------------------------------------------- settings


def fuzz_examples(default: int) -> int:
    """Examples per hypothesis test: ``default`` (sized for a 2-core CI run) unless
    ``QKNORM_FUZZ_EXAMPLES`` is set (longer runs, e.g. on a GPU machine)."""
    raw = os.environ.get("QKNORM_FUZZ_EXAMPLES", "").strip()
    return max(1, int(raw)) if raw else default


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=fuzz_examples(default),
        deadline=None,
        print_blob=True,  # a failure prints @reproduce_failure(...) besides the falsifying case
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# ----------------------------------------------------------------------------- backends


def all_backends() -> tuple[str, ...]:
    """Every registered backend name (collection-time parametrization)."""
    return registry.backend_names()


def unusable(name: str, req: object | None = None) -> str | None:
    """Why backend ``name`` cannot run here (or cannot serve ``req``), None when it can."""
    ok, why = registry.probe(name)
    if not ok:
        return why
    if req is not None:
        return registry.get_backend(name).supports(req)  # type: ignore[arg-type]
    return None


@contextlib.contextmanager
def using_backend(name: str | None) -> Iterator[None]:
    """Route public calls to backend ``name`` only (``QKNORM_BACKEND``); None keeps the default policy."""
    if name is None:
        yield
        return
    with backend_override(name):
        yield


def skip_unsupported(fn: Callable[..., None]) -> Callable[..., None]:
    """Decorate a test run under ``using_backend``: a request that backend cannot serve skips it."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            fn(*args, **kwargs)
        except registry.BackendError as exc:
            if not os.environ.get(registry.ENV_VAR):
                raise
            pytest.skip(f"{os.environ[registry.ENV_VAR]} cannot serve this request: {exc}")

    return wrapper


def require_backend(name: str) -> None:
    """Skip the calling test when backend ``name`` is not available on this machine."""
    why = unusable(name)
    if why is not None:
        pytest.skip(f"backend {name} unavailable: {why}")


# ----------------------------------------------------------------------------- sentinel memory

_NAN_BYTE = 0xFF  # input padding: NaN in fp16/bf16, so a kernel summing padding shows it


def _random_bytes(n: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).to(device)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of ``t`` (padding included)."""
    s = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(s, 0, (s.nbytes(),), (1,))


def window_mask(t: torch.Tensor) -> torch.Tensor:
    """Bool mask over ``storage_bytes(t)``: True on the bytes of ``t``'s elements."""
    es = t.element_size()
    nbytes = t.untyped_storage().nbytes()
    mask = torch.zeros(nbytes, dtype=torch.bool, device=t.device)
    if t.numel() == 0:
        return mask
    idx = torch.arange(nbytes // es, device=t.device).as_strided(t.shape, t.stride(), t.storage_offset()).reshape(-1)
    for b in range(es):
        mask[idx * es + b] = True
    return mask


def buffer(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    pad: int = 0,
    offset: int = 0,
    column_major: bool = False,
    seed: int = 0,
    fill: int | None = None,
    device: torch.device = DEVICE,
) -> torch.Tensor:
    """A 1-D or 2-D view of ``shape`` inside a larger storage of sentinel bytes.

    2-D views have row stride ``cols + pad`` (or, ``column_major``, strides ``(1, rows + pad)``)
    and start ``offset`` elements into the storage; ``pad + 3`` spare elements follow the last
    row. The whole storage holds pseudo-random bytes from ``seed`` (or the byte ``fill``).
    """
    size: tuple[int, ...] = shape
    strides: tuple[int, ...]
    if len(shape) == 1:
        strides = (1,)
        span = shape[0]
    elif column_major:
        rows, cols = shape
        strides = (1, rows + pad)
        span = cols * (rows + pad)
    else:
        rows, cols = shape
        strides = (cols + pad, 1)
        span = rows * (cols + pad)
    total = offset + span + pad + 3
    es = torch.empty(0, dtype=dtype).element_size()
    raw = (
        torch.full((total * es,), fill, dtype=torch.uint8, device=device)
        if fill is not None
        else _random_bytes(total * es, seed, device)
    )
    return raw.view(dtype).as_strided(size, strides, offset)


def input_rows(values: torch.Tensor, dtype: torch.dtype, *, pad: int = 0, offset: int = 0) -> torch.Tensor:
    """``values`` cast to ``dtype`` in a row-strided view whose padding holds NaN bytes."""
    m, n = values.shape
    t = buffer((m, n), dtype, pad=pad, offset=offset, fill=_NAN_BYTE, device=values.device)
    t.copy_(values.to(dtype))
    return t


class Snapshot:
    """The bytes of every storage behind some tensors, to compare after a call."""

    def __init__(self, *tensors: object) -> None:
        self.items = [
            (t, storage_bytes(t).clone())
            for t in tensors
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided and not t.is_nested
        ]

    def assert_unchanged(self) -> None:
        for i, (t, before) in enumerate(self.items):
            after = storage_bytes(t)
            if not torch.equal(after, before):
                changed = int((after != before).sum())
                raise AssertionError(f"tensor #{i} {list(t.shape)} {t.dtype}: {changed} bytes written by a failed call")

    def assert_only_windows_written(self) -> None:
        """Bytes outside each tensor's own window are unchanged (padding, neighbours)."""
        for i, (t, before) in enumerate(self.items):
            after = storage_bytes(t)
            outside = ~window_mask(t)
            for other, _ in self.items:  # several outputs may share one storage
                if other.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                    outside &= ~window_mask(other)
            if not torch.equal(after[outside], before[outside]):
                changed = int((after[outside] != before[outside]).sum())
                raise AssertionError(
                    f"tensor #{i} {list(t.shape)} strides {t.stride()}: {changed} bytes written outside its window"
                )


# ----------------------------------------------------------------------------- number formats


def fl32(x: float) -> float:
    """Round to the nearest float32 (SPEC's ``fl32``)."""
    if math.isnan(x) or math.isinf(x):
        return x
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def f32_bits(x: float) -> int:
    return int(struct.unpack("<I", struct.pack("<f", x))[0])


@dataclass(frozen=True)
class Fp8Format:
    """E4M3 from its definition: sign bit, 4 exponent bits (bias), 3 mantissa bits."""

    bias: int
    fmax: float
    nan_code: int
    negative_zero: bool  # e4m3fn has -0 (0x80); e4m3fnuz uses 0x80 for NaN instead
    values: tuple[float, ...] = field(default=())  # non-negative finite values, ascending
    codes: tuple[int, ...] = field(default=())

    def decode(self, code: int) -> float:
        if code == self.nan_code or (self.nan_code == 0x7F and code == 0xFF):
            return math.nan
        sign = -1.0 if code & 0x80 else 1.0
        e, mant = (code >> 3) & 0xF, code & 7
        mag = mant / 8 * 2.0 ** (1 - self.bias) if e == 0 else (1 + mant / 8) * 2.0 ** (e - self.bias)
        return sign * mag

    def encode(self, v: float) -> int:
        """Round to nearest, ties to the even code, saturating at +-fmax; NaN -> the NaN code."""
        if math.isnan(v):
            return self.nan_code
        neg = math.copysign(1.0, v) < 0
        a = min(abs(v), self.fmax)
        i = bisect.bisect_left(self.values, a)
        if self.values[i] == a:
            code = self.codes[i]
        else:
            lo, hi = i - 1, i
            d_lo, d_hi = a - self.values[lo], self.values[hi] - a
            if d_lo < d_hi or (d_lo == d_hi and self.codes[lo] % 2 == 0):
                code = self.codes[lo]
            else:
                code = self.codes[hi]
        if neg and (code != 0 or self.negative_zero):
            code |= 0x80
        return code

    def half_step(self, a: float) -> float:
        """Half the gap between the two grid values around ``|a|`` (``|a| <= fmax``)."""
        a = abs(a)
        i = bisect.bisect_left(self.values, a)
        if i < len(self.values) and self.values[i] == a:
            return 0.0
        return (self.values[i] - self.values[i - 1]) / 2


def _fp8_format(bias: int, fmax: float, nan_code: int, negative_zero: bool) -> Fp8Format:
    fmt = Fp8Format(bias, fmax, nan_code, negative_zero)
    pairs = sorted((fmt.decode(c), c) for c in range(0x80) if not math.isnan(fmt.decode(c)))
    pairs = [(v, c) for v, c in pairs if v <= fmax]
    return Fp8Format(bias, fmax, nan_code, negative_zero, tuple(v for v, _ in pairs), tuple(c for _, c in pairs))


FP8_FORMATS: dict[torch.dtype, Fp8Format] = {
    torch.float8_e4m3fn: _fp8_format(bias=7, fmax=448.0, nan_code=0x7F, negative_zero=True),
    torch.float8_e4m3fnuz: _fp8_format(bias=8, fmax=240.0, nan_code=0x80, negative_zero=False),
}

AMAX_FLOOR32 = fl32(1e-10)


def fp8_scale(amax: float, dtype: torch.dtype) -> float:
    """SPEC rule 6 from scratch: ``fl32(max(1e-10, amax) * fl32(1/FMAX))``."""
    fmax = FP8_FORMATS[dtype].fmax
    return fl32(max(AMAX_FLOOR32, amax) * fl32(1.0 / fmax))


E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_encode(v: float) -> int:
    """Nearest E2M1 value (ties to the even code), saturating at +-6; v's sign bit in bit 3 (-0.0 gives 8)."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda c: (abs(E2M1_GRID[c] - a), c % 2))
    return best | (8 if math.copysign(1.0, v) < 0 else 0)


def e2m1_decode(nibble: int) -> float:
    return (-1.0 if nibble & 8 else 1.0) * E2M1_GRID[nibble & 7]


def e8m0_byte(amax: float) -> int:
    """SPEC rule 11 from scratch: exponent of ``fl32(max(1e-10, amax) * fl32(1/6))``, rounded up."""
    t = fl32(max(AMAX_FLOOR32, amax) * fl32(1.0 / 6.0))
    bits = f32_bits(t)
    e, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    return e + (1 if mant != 0 and e != 255 else 0)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[m, n/2]`` bytes -> ``[m, n]`` int64 nibbles, element 2b from the low nibble of byte b."""
    b = packed.cpu().view(torch.uint8).to(torch.int64)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(b.shape[0], -1)


def rmsnorm64(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm in float64 by the textbook formula: ``x / sqrt(mean(x^2) + eps) * (w (+1))``."""
    x = x.double().cpu()
    w = w.double().cpu() + (1.0 if gemma else 0.0)
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included) of two tensors of one dtype and shape."""
    return a.shape == b.shape and torch.equal(_raw(a), _raw(b))


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in row-major order (any strides, size-1 dimensions included)."""
    dense = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)  # strides of a fresh tensor
    return dense.reshape(-1).view(torch.uint8).cpu()


def assert_same_nan_or_bits(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Bit-for-bit equality, any NaN accepted where a NaN is expected."""
    a, e = actual.cpu().float(), expected.cpu().float()
    nan_e = torch.isnan(e)
    if not torch.equal(torch.isnan(a), nan_e):
        raise AssertionError(f"{name}: NaN positions differ")
    ok = bits_equal(actual.cpu()[~nan_e], expected.cpu()[~nan_e])
    if not ok:
        diff = int((a[~nan_e] != e[~nan_e]).sum())
        raise AssertionError(f"{name}: {diff} elements differ from the bit-exact expectation")


# ----------------------------------------------------------------------------- one call as data

ENTRY_MODES: dict[str, tuple[str, ...]] = {
    "unified": ("none", "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"),
    "group": ("none", "fp8_group", "mxfp4"),
    "token": ("fp8_token",),
    "legacy": ("none",),
    "functional": ("none", "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"),
}
BLOCK_TYPES = (
    QuantType.per_1x32,
    QuantType.per_1x128,
    QuantType.per_128x128,
    QuantType.per_256x128,
    QuantType.per_1024x128,
)
_IMPLIED_GROUP = {QuantType.per_1x32: 32}  # the other block types imply 128 (SPEC §2)


@dataclass(frozen=True)
class Case:
    """One public-API call, described by data so hypothesis can print it as a reproducer.

    ``run_case(Case(...))`` rebuilds the tensors from ``seed`` and repeats the check.
    """

    entry: str = "unified"  # unified | group | token | legacy | functional
    mode: str = "none"  # none | fp8_group | fp8_token | fp8_tensor | mxfp4
    dtype: str = "float16"
    m: int = 3
    n1: int = 64
    n2: int = 0  # 0: no k
    quant_type: int | None = None  # unified block modes: which QuantType (implies 32 or 128)
    group_size: int | None = None  # explicit group_size argument
    fp8: str = "float8_e4m3fn"
    transpose: str = ""  # "", "contiguous" ([m, G] read as [G, m]) or "view" (torch.empty(G, m).t())
    residual: bool = False
    gemma: bool = False
    unquantized: bool = False  # also pass q_out_unquantized (return_unquantized in the functional entry)
    q_eps: float = 1e-6
    k_eps: float | None = None
    latent: bool = False  # q and k are column views of one [m, n1 + n2 + 64] buffer (DeepSeek)
    in_pad: int = 0
    in_offset: int = 0
    out_pad: int = 0
    out_offset: int = 0
    scale_2d: bool = False  # per-tensor scale given as [1, 1] instead of [1]
    fp4_dtypes: bool = False  # MXFP4 outputs as float4_e2m1fn_x2 / float8_e8m0fnu
    data: str = "normal"  # normal | zeros | huge | near_overflow | tiny | inf | nan
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def fp8_dtype(self) -> torch.dtype:
        return getattr(torch, self.fp8)

    @property
    def gs(self) -> int:
        """The group size the call ends up using (n1 for per-token/per-tensor, 0 without quantization)."""
        if self.mode in ("none",):
            return 0
        if self.mode in ("fp8_token", "fp8_tensor"):
            return self.n1
        if self.group_size is not None:
            return self.group_size
        if self.entry == "unified":
            return _IMPLIED_GROUP.get(QuantType(self.quant_type), 128)  # type: ignore[arg-type]
        if self.entry == "group":
            return 128
        return 32 if self.mode == "mxfp4" else 128  # functional defaults


@dataclass
class Inputs:
    q: torch.Tensor
    q_weight: torch.Tensor
    k: torch.Tensor | None
    k_weight: torch.Tensor | None
    q_residual: torch.Tensor | None


def _values(case: Case, rows: int, cols: int, gen: torch.Generator, salt: int) -> torch.Tensor:
    """fp32 data of one input, by ``case.data`` (extreme kinds hit some rows)."""
    x = torch.randn(rows, cols, generator=gen)
    fp16 = case.torch_dtype == torch.float16
    pick = torch.rand(rows, generator=gen) < 0.5  # rows receiving the extreme pattern
    if rows:
        pick[(case.seed + salt) % rows] = True
    col = torch.randint(0, max(cols, 1), (rows,), generator=gen)
    r = torch.arange(rows)
    if case.data == "zeros":
        x[pick] = 0.0
    elif case.data == "huge":
        big = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0) * (65504.0 if fp16 else 1e15)
        x[r[pick], col[pick]] = big[pick]
    elif case.data == "near_overflow":
        # fp16: magnitudes in [30000, 65504]; bf16: beyond 2^64 where the fp32 sum of squares overflows.
        mag = (
            (30000.0 + 35504.0 * torch.rand(rows, cols, generator=gen))
            if fp16
            else (1e37 * (1 + torch.rand(rows, cols, generator=gen)))
        )
        x[pick] = (torch.sign(x) * mag)[pick]
    elif case.data == "tiny":
        x = x * (1e-5 if fp16 else 1e-30)
    elif case.data in ("inf", "nan"):
        special = math.nan if case.data == "nan" else math.inf
        sign = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0)
        hit = pick & (torch.rand(rows, generator=gen) < 0.7)
        x[r[hit], col[hit]] = sign[hit] * special
    return x


def make_inputs(case: Case) -> Inputs:
    """The inputs of ``case`` (from ``case.seed``), in row-strided views with NaN padding."""
    gen = torch.Generator().manual_seed(case.seed)
    dt = case.torch_dtype
    m, n1, n2 = case.m, case.n1, case.n2
    qv = _values(case, m, n1, gen, 0)
    kv = _values(case, m, n2, gen, 1) if n2 else None
    rv = _values(case, m, n1, gen, 2) if case.residual else None
    if rv is not None and case.data == "zeros":
        rv[(qv == 0).all(dim=1)] = 0.0  # zero rows of q stay zero after the residual sum
    wq = (torch.rand(n1, generator=gen) * 2.0 - 0.5).to(dt).to(DEVICE)
    wk = (torch.rand(n2, generator=gen) * 2.0 - 0.5).to(dt).to(DEVICE) if n2 else None
    k: torch.Tensor | None
    if case.latent and kv is not None:
        # DeepSeek's fused_qkv_a_proj output: q and k_nope are column slices of one buffer.
        lat = torch.cat((qv, kv, torch.randn(m, 64, generator=gen)), dim=1)
        latent = input_rows(lat.to(DEVICE), dt, pad=case.in_pad, offset=case.in_offset)
        q, k = latent[:, :n1], latent[:, n1 : n1 + n2]
    else:
        q = input_rows(qv.to(DEVICE), dt, pad=case.in_pad, offset=case.in_offset)
        k = None if kv is None else input_rows(kv.to(DEVICE), dt, pad=case.in_pad, offset=case.in_offset + 1)
    res = None if rv is None else input_rows(rv.to(DEVICE), dt, pad=case.in_pad, offset=case.in_offset + 2)
    return Inputs(q, wq, k, wk, res)


def reference_outputs(case: Case, inp: Inputs) -> dict[str, torch.Tensor]:
    """The reference's outputs for ``case`` on contiguous copies of the inputs and fresh outputs.

    Keys: ``q_out`` (normalized q), ``k_out``, ``q_res_out``, ``q_quant``, ``q_scale`` (logical
    ``[m, G]`` / ``[m, 1]`` / ``[1]``), ``y`` (the fp32 normalized q, for non-finite masks).
    """
    m, n1, dt = case.m, case.n1, case.torch_dtype
    c = lambda t: None if t is None else t.contiguous().clone()
    q: torch.Tensor = inp.q.contiguous().clone()
    k, res = c(inp.k), c(inp.q_residual)
    out: dict[str, torch.Tensor] = {"q_out": torch.empty(m, n1, dtype=dt, device=DEVICE)}
    if k is not None:
        out["k_out"] = torch.empty_like(k)
    if res is not None:
        out["q_res_out"] = torch.empty_like(q)
    mode = QuantMode(case.mode)
    gs = case.gs
    if mode.is_fp8:
        out["q_quant"] = torch.empty(m, n1, dtype=case.fp8_dtype, device=DEVICE)
        cols = {QuantMode.FP8_GROUP: n1 // gs if gs else 1, QuantMode.FP8_TOKEN: 1}.get(mode)
        out["q_scale"] = torch.empty((1,) if cols is None else (m, cols), dtype=torch.float32, device=DEVICE)
    elif mode is QuantMode.MXFP4:
        out["q_quant"] = torch.empty(m, n1 // 2, dtype=torch.uint8, device=DEVICE)
        out["q_scale"] = torch.empty(m, n1 // gs, dtype=torch.uint8, device=DEVICE)
    k_eps = case.q_eps if case.k_eps is None else case.k_eps
    req = build_request(
        q=q, q_weight=inp.q_weight, q_epsilon=case.q_eps, k=k, k_weight=inp.k_weight, k_epsilon=k_eps,
        k_out=out.get("k_out"), q_residual=res, q_res_out=out.get("q_res_out"), gemma_norm=case.gemma,
        mode=mode, group_size=gs or None, q_out=out["q_out"], q_out_quantized=out.get("q_quant"),
        q_out_scale=out.get("q_scale"),
    )  # fmt: skip
    qk_rmsnorm_reference(req)
    x = q.float() if res is None else q.float() + res.float()
    out["y"] = rms_norm_fp32(x, inp.q_weight, case.q_eps, case.gemma)
    return out


@dataclass
class Outputs:
    """What a call wrote, by role, plus every caller-provided output tensor (for sentinel checks)."""

    values: dict[str, torch.Tensor]
    provided: list[torch.Tensor]


def _out(case: Case, shape: tuple[int, ...], dtype: torch.dtype, salt: int, **kw: object) -> torch.Tensor:
    return buffer(shape, dtype, pad=case.out_pad, offset=case.out_offset, seed=case.seed * 31 + salt, **kw)  # type: ignore[arg-type]


def call_case(case: Case, inp: Inputs) -> Outputs:
    """Run ``case`` through its public entry; outputs are sentinel-padded views."""
    m, n1, n2, dt = case.m, case.n1, case.n2, case.torch_dtype
    mode, gs = case.mode, case.gs
    k_eps = case.k_eps
    if case.entry == "legacy":
        q_out, k_out = qknorm.fused_qk_rmsnorm_legacy(
            inp.q, inp.q_weight, case.q_eps, inp.k, inp.k_weight, case.q_eps if k_eps is None else k_eps
        )
        vals: dict[str, torch.Tensor] = {"q_out": q_out}
        if k_out is not None:
            vals["k_out"] = k_out
        return Outputs(vals, [])
    if case.entry == "functional":
        res = qknorm.qk_rmsnorm(
            inp.q, inp.q_weight, inp.k, inp.k_weight, q_epsilon=case.q_eps, k_epsilon=k_eps,
            q_residual=inp.q_residual, gemma_norm=case.gemma, quant=None if mode == "none" else mode,
            group_size=case.group_size, fp8_dtype=case.fp8_dtype, transpose_scale=bool(case.transpose),
            return_unquantized=case.unquantized,
        )  # fmt: skip
        vals = {}
        if mode == "none":
            vals["q_out"] = res.q
        else:
            vals["q_quant"], vals["q_scale"] = res.q, res.q_scale  # type: ignore[assignment]
            if res.q_unquantized is not None:
                vals["q_out"] = res.q_unquantized
        if res.k is not None:
            vals["k_out"] = res.k
        if res.q_residual_out is not None:
            vals["q_res_out"] = res.q_residual_out
        return Outputs(vals, [])

    k_out = _out(case, (m, n2), dt, 1) if n2 else None
    q_res_out = _out(case, (m, n1), dt, 2) if case.residual else None
    q_unq = _out(case, (m, n1), dt, 3) if case.unquantized or (case.entry == "group" and mode == "none") else None
    quant = scale = scale_view = None
    if mode in ("fp8_group", "fp8_token", "fp8_tensor"):
        quant = _out(case, (m, n1), case.fp8_dtype, 4)
        if mode == "fp8_group":
            groups = n1 // gs
            if case.transpose == "contiguous":
                scale = buffer((m, groups), torch.float32, offset=case.out_offset, seed=case.seed * 31 + 5)
                scale_view = scale.as_strided((m, groups), (1, m), scale.storage_offset())
            elif case.transpose == "view":
                scale = _out(case, (m, groups), torch.float32, 5, column_major=True)
                scale_view = scale
            else:
                scale = scale_view = _out(case, (m, groups), torch.float32, 5)
        elif mode == "fp8_token":
            scale = scale_view = _out(case, (m, 1), torch.float32, 5)
        else:
            scale = _out(case, (1, 1) if case.scale_2d else (1,), torch.float32, 5)
            scale_view = scale.reshape(1)
    elif mode == "mxfp4":
        quant = _out(case, (m, n1 // 2), torch.uint8, 4)
        scale = scale_view = _out(case, (m, n1 // gs), torch.uint8, 5)
        if case.fp4_dtypes and FP4_X2 is not None and E8M0FNU is not None:
            quant, scale = quant.view(FP4_X2), scale.view(E8M0FNU)
            scale_view = scale
    no_out = _out(case, (m, n1), dt, 6) if (case.entry == "unified" and mode == "none") else None

    snap = Snapshot(k_out, q_res_out, q_unq, quant, scale, no_out)
    common: dict[str, Any] = dict(
        q=inp.q, q_weight=inp.q_weight, q_epsilon=case.q_eps, k_out=k_out, q_res_out=q_res_out, k=inp.k,
        k_weight=inp.k_weight, k_epsilon=k_eps, q_residual=inp.q_residual, gemma_norm=case.gemma,
    )  # fmt: skip
    if case.entry == "unified":
        qt = {"none": QuantType.No, "fp8_token": QuantType.per_Token, "fp8_tensor": QuantType.per_Tensor}.get(mode)
        if qt is None:
            qt = QuantType(case.quant_type)  # type: ignore[arg-type]
        qknorm.fused_qk_rmsnorm(
            q_out_quantized=no_out if mode == "none" else quant, q_out_scale=scale, q_out_unquantized=q_unq,
            quant_type=qt, group_size=case.group_size, transpose_scale=bool(case.transpose), **common,
        )  # fmt: skip
    elif case.entry == "group":
        extra: dict[str, Any] = {} if case.group_size is None else {"group_size": case.group_size}
        qknorm.fused_qk_rmsnorm_group_quant(
            quant, scale, q_out_unquantized=q_unq, transpose_scale=bool(case.transpose), **extra, **common
        )
    elif case.entry == "token":
        qknorm.fused_qk_rmsnorm_per_token_quant(quant, scale, q_out_unquantized=q_unq, **common)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown entry {case.entry!r}")

    vals = {}
    if no_out is not None:
        vals["q_out"] = no_out
        if q_unq is not None:
            vals["q_out_unquantized"] = q_unq
    elif q_unq is not None:
        vals["q_out"] = q_unq
    if k_out is not None:
        vals["k_out"] = k_out
    if q_res_out is not None:
        vals["q_res_out"] = q_res_out
    if quant is not None:
        vals["q_quant"] = quant.view(torch.uint8) if mode == "mxfp4" else quant
        vals["q_scale"] = scale_view.view(torch.uint8) if mode == "mxfp4" else scale_view  # type: ignore[union-attr,assignment]
    snap.assert_only_windows_written()
    provided = [t for t in (k_out, q_res_out, q_unq, quant, scale, no_out) if t is not None]
    return Outputs(vals, provided)


def _poisoned_groups(y: torch.Tensor, case: Case) -> torch.Tensor:
    """Bool ``[m, G]`` (``[1, 1]`` per tensor): groups whose fp32 normalized q has a non-finite value."""
    bad = ~torch.isfinite(y)
    if case.mode == "fp8_tensor":
        return bad.any().reshape(1, 1)
    gs = case.gs
    return bad.reshape(case.m, case.n1 // gs, gs).any(dim=-1)


def compare(case: Case, actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every output of ``actual`` against the reference, per the tolerance table and SPEC.

    Groups whose normalized q holds a NaN (from NaN or inf input) follow the non-finite
    contract of ``tests/test_fuzz.py``: NaN scale (0xFF for MXFP4), codes unspecified.
    """
    if case.m == 0:
        return  # nothing to compare; the sentinel check proved nothing was written
    for name in ("q_out", "q_out_unquantized", "k_out"):
        if name in actual:
            exp = expected["k_out" if name == "k_out" else "q_out"]
            assert actual[name].dtype == exp.dtype, f"{name}: dtype {actual[name].dtype}, expected {exp.dtype}"
            assert_norm_close(actual[name].reshape(exp.shape), exp, name)
    if "q_res_out" in actual:
        assert_same_nan_or_bits(actual["q_res_out"].reshape(case.m, case.n1), expected["q_res_out"], "q_res_out")
    missing = {"k_out", "q_res_out"} & (expected.keys() - actual.keys())
    if case.mode == "none" and "q_out" not in actual:
        missing.add("q_out")
    assert not missing, f"outputs not returned: {missing}"
    if case.mode == "none":
        return
    q_quant, q_scale = actual["q_quant"], actual["q_scale"]
    e_quant, e_scale = expected["q_quant"].clone(), expected["q_scale"].clone()
    m, groups = case.m, case.n1 // case.gs
    if case.mode == "fp8_tensor":
        a_scale = q_scale.reshape(1, 1).float().cpu().clone()
        e_scale = e_scale.reshape(1, 1)
    elif case.mode == "mxfp4":
        a_scale = q_scale.reshape(m, groups).view(torch.uint8).cpu().clone()
    else:
        a_scale = q_scale.reshape(m, groups).float().cpu().clone()  # blanked below: never alias the output
    e_scale = e_scale.cpu()
    a_quant = q_quant.reshape(m, case.n1 // 2 if case.mode == "mxfp4" else case.n1).cpu().clone()
    e_quant = e_quant.cpu()
    assert a_quant.dtype == e_quant.dtype or case.mode == "mxfp4", f"q_out_quantized dtype {a_quant.dtype}"
    poison = _poisoned_groups(expected["y"].cpu(), case)
    if poison.any():
        if case.mode == "mxfp4":
            bad = a_scale[poison]
            assert bool((bad == 0xFF).all()), f"MXFP4 groups with a NaN must get scale byte 0xFF, got {bad.tolist()}"
        else:
            bad = a_scale[poison]
            assert bool(torch.isnan(bad).all()), f"FP8 groups with a NaN must get a NaN scale, got {bad.tolist()}"
        # Codes of poisoned groups are unspecified: blank them (and their scales) on both sides.
        if case.mode == "fp8_tensor":
            qmask = poison.expand(*a_quant.shape)
        else:
            qmask = poison.repeat_interleave(a_quant.shape[1] // poison.shape[1], dim=1)
        a_quant.view(torch.uint8)[qmask] = 0
        e_quant.view(torch.uint8)[qmask] = 0
        a_scale[poison] = 0
        e_scale[poison] = 0
    if case.mode == "mxfp4":
        assert_mxfp4_close(a_quant.view(torch.uint8), a_scale, e_quant.view(torch.uint8), e_scale)
    else:
        assert_scales_close(a_scale, e_scale.reshape(a_scale.shape))
        assert_fp8_close(a_quant, e_quant)


def run_case(case: Case, backend: str | None = None) -> None:
    """Build ``case``, run it on ``backend`` (None: default selection), check it against the reference."""
    inp = make_inputs(case)
    before = Snapshot(inp.q, inp.k, inp.q_residual, inp.q_weight, inp.k_weight)
    expected = reference_outputs(case, inp)
    with using_backend(backend):
        outs = call_case(case, inp)
    before.assert_unchanged()  # inputs (and their padding) are read-only
    compare(case, outs.values, expected)


# ----------------------------------------------------------------------------- shared by the aiter tests


def split_latent(m: int = 4, n1: int = 256, n2: int = 128, seed: int = 0) -> dict[str, Any]:
    """q and k as split views of one ``[m, n1 + n2 + 64]`` bf16 buffer (DeepSeek's q and k_nope), with weights."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(m, n1 + n2 + 64, generator=gen).to(torch.bfloat16)
    return {
        "q": buf[:, :n1],
        "k": buf[:, n1 : n1 + n2],
        "q_weight": (1 + 0.1 * torch.randn(n1, generator=gen)).to(torch.bfloat16),
        "k_weight": (1 + 0.1 * torch.randn(n2, generator=gen)).to(torch.bfloat16),
    }


def run_python(code: str, cwd: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with this checkout importable and no QKNORM_BACKEND."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(registry.ENV_VAR, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)  # fmt: skip
