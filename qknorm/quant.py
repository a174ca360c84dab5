"""Quantization formats of the operator: aiter's ``QuantType``, qknorm's modes, FP8 and MXFP4 constants.

Nothing here touches a device; the constants are what every backend must reproduce bit for bit
(SPEC §4 rules 6-12).
"""

from __future__ import annotations

import enum
import struct

import torch

__all__ = [
    "QuantType",
    "QuantMode",
    "FP8_DTYPES",
    "fp8_max",
    "fp8_inv_max",
    "MXFP4_INV_MAX",
    "MXFP4_GROUP_SIZES",
    "AMAX_FLOOR",
    "is_fp4_dtype",
    "is_e8m0_dtype",
    "fp8_dtype_for_arch",
    "native_fp8_dtype",
]


class QuantType(enum.IntEnum):
    """aiter's ``aiter.ops.enum.QuantType``: same names, same values (SPEC §2.5)."""

    No = 0
    per_Tensor = 1
    per_Token = 2
    per_1x32 = 3
    per_1x128 = 4
    per_128x128 = 5
    per_256x128 = 6
    per_1024x128 = 7


class QuantMode(enum.Enum):
    """What happens to the normalized q after the norm (one value per SPEC §4 mode)."""

    NONE = "none"  # plain normalization, q written in the input dtype
    FP8_GROUP = "fp8_group"  # one fp32 scale per 1 x group_size block (rule 6-7, 9)
    FP8_TOKEN = "fp8_token"  # one fp32 scale per row (rule 8)
    FP8_TENSOR = "fp8_tensor"  # one fp32 scale for all of q (rule 10)
    MXFP4 = "mxfp4"  # E2M1 nibbles + E8M0 scale byte per group (rule 11-12)

    @property
    def is_fp8(self) -> bool:
        return self in (QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.FP8_TENSOR)


def _fp32(x: float) -> float:
    """Round a Python float to the nearest float32 (the ``fl32()`` of SPEC §4)."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


# Largest finite value of each FP8 flavour: the output tensor's dtype decides (rule 6).
_FP8_MAX = {
    torch.float8_e4m3fn: 448.0,
    torch.float8_e4m3fnuz: 240.0,
}
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(_FP8_MAX)

# The 1e-10 floor under every group's amax (rule 6, reused by rule 11).
AMAX_FLOOR = 1e-10
# fl32(1/6): the MXFP4 scale is ceil_pow2(amax * fl32(1/6)) (rule 11); 6 is E2M1's largest value.
MXFP4_INV_MAX = _fp32(1.0 / 6.0)
MXFP4_GROUP_SIZES = (32, 64, 128)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 output dtype (448 for e4m3fn, 240 for e4m3fnuz)."""
    return _FP8_MAX[dtype]


# fl32(1/FMAX) per flavour, rounded once here so call paths (and torch.compile) see plain floats.
_FP8_INV_MAX = {dtype: _fp32(1.0 / fmax) for dtype, fmax in _FP8_MAX.items()}


def fp8_inv_max(dtype: torch.dtype) -> float:
    """``fl32(1/FMAX)``: the fp32-rounded reciprocal the scale is multiplied by (rule 6)."""
    return _FP8_INV_MAX[dtype]


def is_fp4_dtype(dtype: torch.dtype) -> bool:
    """True for packed-nibble outputs: ``torch.float4_e2m1fn_x2`` (when torch has it) or uint8."""
    return dtype == torch.uint8 or dtype == getattr(torch, "float4_e2m1fn_x2", None)


def is_e8m0_dtype(dtype: torch.dtype) -> bool:
    """True for MXFP4 scale tensors: uint8 or ``torch.float8_e8m0fnu`` (when torch has it)."""
    return dtype == torch.uint8 or dtype == getattr(torch, "float8_e8m0fnu", None)


# The FP8 flavour each AMD architecture computes natively (and aiter writes: aiter.dtypes.fp8):
# MI300 (gfx94x) has the fnuz encodings (no negative zero, NaN 0x80, FMAX 240); MI350 (gfx95x)
# and RDNA4 (gfx12) the OCP e4m3fn one. NVIDIA GPUs (sm_89+) and the CPU use e4m3fn.
_ARCH_FP8 = (("gfx94", torch.float8_e4m3fnuz), ("gfx95", torch.float8_e4m3fn), ("gfx12", torch.float8_e4m3fn))


def fp8_dtype_for_arch(arch: str) -> torch.dtype | None:
    """The FP8 flavour native to an AMD architecture name (``gcnArchName``), None when unknown."""
    for prefix, dtype in _ARCH_FP8:
        if arch.startswith(prefix):
            return dtype
    return None


def native_fp8_dtype(device: torch.device) -> torch.dtype:
    """The FP8 flavour native to ``device``: e4m3fnuz on MI300 (gfx94x), e4m3fn elsewhere.

    Queries the device's properties on ROCm (call it on first use, never at import).
    """
    if device.type == "cuda" and torch.version.hip is not None:
        arch = str(getattr(torch.cuda.get_device_properties(device), "gcnArchName", ""))
        return fp8_dtype_for_arch(arch) or torch.float8_e4m3fn
    return torch.float8_e4m3fn
