"""Pure-PyTorch implementation of SPEC §4: the test oracle and the ``torch`` backend.

Written for clarity, not speed: every step is the rule it implements, in fp32, and every
output is computed before the first one is written (so the supported in-place forms work).
Runs on any device PyTorch runs on.
"""

from __future__ import annotations

import math

import torch

from .quant import AMAX_FLOOR, MXFP4_INV_MAX, QuantMode, fp8_inv_max, fp8_max
from .request import QKNormRequest

__all__ = [
    "rms_norm_fp32",
    "fp8_quantize",
    "e8m0_from_amax",
    "e8m0_to_float",
    "e2m1_codes",
    "pack_nibbles",
    "mxfp4_quantize",
    "qk_rmsnorm_reference",
]


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """Rules 2-3: ``y = (x * rsqrt(mean(x^2) + eps)) * w`` in fp32, ``w = weight (+1 if gemma)``.

    ``x [m, n]`` float32, ``weight [n]`` any float dtype; returns float32 ``[m, n]``.
    """
    n = x.shape[-1]
    r = torch.rsqrt(torch.sum(x * x, dim=-1, keepdim=True) / n + eps)
    w = weight.float()
    if gemma:
        w = w + 1.0
    return (x * r) * w


def _amax(y: torch.Tensor) -> torch.Tensor:
    """``max(1e-10, max |y|)`` over the last dimension (rule 6); NaN propagates."""
    return torch.clamp_min(torch.amax(torch.abs(y), dim=-1), AMAX_FLOOR)


def fp8_quantize(y: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rules 6-8: FP8 codes and fp32 scales of ``y [m, n]`` per 1 x ``group_size`` group.

    Returns ``(codes [m, n] dtype, scales [m, n // group_size] float32)``.
    """
    m, n = y.shape
    fmax = fp8_max(dtype)
    # A float32 tensor times a Python float multiplies in float32; fl32(1/FMAX) is exact in
    # float32, so this is the rule's product with no host-to-device copy (CUDA-graph safe).
    inv = fp8_inv_max(dtype)
    groups = y.reshape(m, n // group_size, group_size)
    scale = _amax(groups) * inv
    values = torch.clamp(groups / scale.unsqueeze(-1), -fmax, fmax)
    return values.to(dtype).reshape(m, n), scale


def e8m0_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Rule 11: the E8M0 byte of ``ceil_pow2(fl32(amax * fl32(1/6)))`` as int32 in [0, 255]."""
    t = amax.float() * MXFP4_INV_MAX
    bits = t.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    return exponent + ((mantissa != 0) & (exponent != 255)).to(torch.int32)


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """The fp32 value ``2^(e - 127)`` of E8M0 bytes (e = 0 gives the subnormal 2^-127, 255 NaN, as in OCP MX)."""
    e = e.to(torch.int32)
    normal = (e << 23).view(torch.float32)
    value = torch.where(e == 0, torch.full_like(normal, 2.0**-127), normal)
    return torch.where(e == 255, torch.full_like(normal, math.nan), value)


# E2M1 round-to-nearest-even thresholds on |v|: code c is the number of thresholds passed.
# Grid 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0..7); at a tie the even code wins, so the
# comparison is strict where the lower neighbour is even and inclusive where the upper is.
_E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Rule 12: E2M1 codes (int32, sign in bit 3) of fp32 ``v``, RNE, saturating at +-6; NaN -> 0.

    The sign bit is v's (-0.0, and a small negative value that rounds to zero, give code 8), as
    in aiter's Triton encoder (``_mxfp4_quant_op`` takes the sign as ``bits & 0x80000000``). A
    group whose E8M0 byte is 255 (NaN) has v = NaN throughout (:func:`e8m0_to_float`), so all
    its codes are 0.
    """
    a = torch.abs(v)
    code = torch.zeros(v.shape, dtype=torch.int32, device=v.device)
    for threshold, inclusive in _E2M1_THRESHOLDS:
        code += (a >= threshold if inclusive else a > threshold).to(torch.int32)
    return code | ((torch.signbit(v) & ~torch.isnan(v)).to(torch.int32) << 3)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: element 2b in the low nibble, 2b+1 in the high nibble."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def mxfp4_quantize(y: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rules 11-12: packed E2M1 bytes ``[m, n // 2]`` uint8 and E8M0 bytes ``[m, n // gs]`` uint8."""
    m, n = y.shape
    groups = y.reshape(m, n // group_size, group_size)
    e = e8m0_from_amax(_amax(groups))
    codes = e2m1_codes(groups / e8m0_to_float(e).unsqueeze(-1))
    return pack_nibbles(codes.reshape(m, n)), e.to(torch.uint8)


@torch.no_grad()
def qk_rmsnorm_reference(req: QKNormRequest) -> None:
    """Compute every output of ``req`` by SPEC §4 and write them (no-op for m = 0).

    Runs without autograd like every kernel backend: an output that requires grad is written
    whole (autograd would refuse the in-place write part-way through the outputs).
    """
    if req.m == 0:
        return
    dtype = req.dtype
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []

    x = req.q.float()
    if req.q_residual is not None:
        x = x + req.q_residual.float()
        writes.append((req.q_res_out, x.to(dtype)))  # type: ignore[arg-type]
    y = rms_norm_fp32(x, req.q_weight, req.q_eps, req.gemma)
    if req.q_out is not None:
        writes.append((req.q_out, y.to(dtype)))

    if req.k is not None:
        yk = rms_norm_fp32(req.k.float(), req.k_weight, req.k_eps, req.gemma)  # type: ignore[arg-type]
        writes.append((req.k_out, yk.to(dtype)))  # type: ignore[arg-type]

    quant, scale = req.q_quant, req.q_scale
    if req.mode is QuantMode.MXFP4:
        codes, scales = mxfp4_quantize(y, req.group_size)
        writes += [(quant, codes), (scale, scales)]  # type: ignore[list-item]
    elif req.mode is QuantMode.FP8_TENSOR:
        codes, scales = fp8_quantize(y.reshape(1, -1), y.numel(), quant.dtype)  # type: ignore[union-attr]
        writes += [(quant, codes.reshape(y.shape)), (scale, scales.reshape(1))]  # type: ignore[list-item]
    elif req.mode.is_fp8:
        codes, scales = fp8_quantize(y, req.group_size, quant.dtype)  # type: ignore[union-attr]
        writes += [(quant, codes), (scale, scales)]  # type: ignore[list-item]

    for out, value in writes:
        out.copy_(value)
