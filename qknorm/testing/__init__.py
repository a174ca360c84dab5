"""Test helpers engines can reuse: the tolerance table and comparisons against the reference.

Every backend is compared with :mod:`qknorm.reference`. Outputs that SPEC §4 fixes bit for bit
(the residual sum) are compared exactly; the rest within the table below, where each entry says
why its tolerance is what it is. Quantized outputs are compared as codes: a code may differ from
the reference by at most one step, and only in a bounded fraction of elements.

:mod:`qknorm.testing.fake_aiter` installs fake ``aiter`` packages of every API generation (and broken ones).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..backends import registry
from ..quant import fp8_max
from ..reference import e8m0_to_float

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "assert_norm_close",
    "assert_fp8_close",
    "assert_mxfp4_close",
    "assert_scales_close",
    "decode_e2m1",
    "backend_override",
]


@dataclass(frozen=True)
class Tolerance:
    """``|a - e| <= atol + rtol * |e|`` elementwise, with at most ``mismatch`` of elements off by one step."""

    rtol: float
    atol: float
    mismatch: float
    reason: str


TOLERANCES: dict[str, Tolerance] = {
    "bf16": Tolerance(
        rtol=2.0**-7,
        atol=1e-6,
        mismatch=0.0,
        reason="backends may differ by ~2 ulp of r (SPEC §4.2); after rounding to bf16 (8-bit significand) "
        "that is at most 1 bf16 ulp = 2^-7 relative",
    ),
    "fp16": Tolerance(
        rtol=2.0**-10,
        atol=1e-6,
        mismatch=0.0,
        reason="as bf16, for fp16's 11-bit significand: at most 1 fp16 ulp = 2^-10 relative",
    ),
    "fp32_scale": Tolerance(
        rtol=2.0**-20,
        atol=0.0,
        mismatch=0.0,
        reason="scale = amax * fl32(1/FMAX): ~2 ulp of r in amax plus the multiply's rounding, 8 fp32 ulp of headroom",
    ),
    "fp8_codes": Tolerance(
        rtol=2.0**-3,
        atol=0.0,
        mismatch=0.02,
        reason="e4m3 has a 4-bit significand (one step = 2^-3 relative); a few-ulp shift of y or of the scale moves "
        "values that sit near a rounding midpoint by one step; 2% bounds how many may",
    ),
    "e8m0": Tolerance(
        rtol=0.0,
        atol=1.0,
        mismatch=0.02,
        reason="ceil_pow2(amax/6) jumps by one exponent when amax crosses 6 * 2^k; a few-ulp shift of amax crosses it "
        "only for groups sitting on that edge",
    ),
    "e2m1_codes": Tolerance(
        rtol=0.0,
        atol=1.0,
        mismatch=0.02,
        reason="one E2M1 grid step for values near a midpoint (or in a group whose scale byte moved by one)",
    ),
    "rope": Tolerance(
        rtol=1.0,
        atol=1.0,
        mismatch=0.01,
        reason="qk_norm_rope, in ulps of the output dtype: |out - ref| <= rtol*ulp(ref) + atol*ulp(m), m the larger "
        "input of the rotation pair; r may differ by ~2 fp32 ulp, which can flip the rounding of u by one ulp and "
        "RoPE carries that into outputs smaller than their inputs (SPEC_ROPE_CACHE §3); at most 1% may differ",
    ),
    "rope_fp8": Tolerance(
        rtol=2.0**-3,
        atol=0.0,
        mismatch=0.005,
        reason="qk_norm_rope FP8 q and cache codes: one e4m3 step (2^-3 relative) beyond the move §3 allows in the "
        "quantized value (ulp(ref) + ulp(m) of rnd(z), over the scale: large where RoPE cancels); at most 0.5% of "
        "codes differ (SPEC_ROPE_CACHE §3)",
    ),
}


def _tol_for(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES["bf16" if dtype == torch.bfloat16 else "fp16"]


def assert_norm_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    """Normalized outputs (fp16/bf16): within one ulp of the output dtype; NaN where the reference has NaN."""
    tol = _tol_for(expected.dtype)
    torch.testing.assert_close(
        actual.float().cpu(),
        expected.float().cpu(),
        rtol=tol.rtol,
        atol=tol.atol,
        equal_nan=True,
        msg=lambda m: f"{name}: {m}",
    )


def assert_scales_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "q_out_scale") -> None:
    """float32 FP8 scales, compared elementwise (pass the same layout for both)."""
    tol = TOLERANCES["fp32_scale"]
    torch.testing.assert_close(
        actual.cpu(), expected.cpu(), rtol=tol.rtol, atol=tol.atol, equal_nan=True, msg=lambda m: f"{name}: {m}"
    )


def _check_steps(diff_steps: torch.Tensor, nan_a: torch.Tensor, nan_e: torch.Tensor, tol: Tolerance, name: str) -> None:
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{name}: NaN positions differ ({int((nan_a != nan_e).sum())} elements)")
    if diff_steps.numel() == 0:
        return
    worst = float(diff_steps.max())
    if worst > 1.0:
        idx = int(diff_steps.reshape(-1).argmax())
        raise AssertionError(f"{name}: a code differs by more than one step (flat index {idx}, {worst:.3g} steps)")
    frac = float((diff_steps > 0).float().mean())
    if frac > tol.mismatch:
        raise AssertionError(
            f"{name}: {frac:.2%} of codes differ by one step, allowed {tol.mismatch:.0%} ({tol.reason})"
        )


def assert_fp8_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "q_out_quantized") -> None:
    """FP8 codes: each within one e4m3 step of the reference, few elements off, NaN where the reference has NaN."""
    tol = TOLERANCES["fp8_codes"]
    a = actual.cpu().float()
    e = expected.cpu().float()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    # One step near e: 2^-3 relative for normals; the subnormal step (2^-9 for e4m3fn) for tiny values.
    step = torch.clamp(torch.abs(e) * tol.rtol, min=2.0**-10 if fp8_max(actual.dtype) < 300 else 2.0**-9)
    _check_steps(torch.abs(a - e) / step, nan_a, nan_e, tol, name)


_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def decode_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Unpack ``[..., n/2]`` bytes (low nibble first) into ``[..., n]`` fp32 E2M1 values."""
    b = packed.cpu().view(torch.uint8).to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
    values = _E2M1_VALUES[codes & 7]
    return torch.where(codes >= 8, -values, values)


def assert_mxfp4_close(
    actual_q: torch.Tensor, actual_scale: torch.Tensor, expected_q: torch.Tensor, expected_scale: torch.Tensor
) -> None:
    """MXFP4: scale bytes within one exponent, codes within one grid step of the reference value.

    Where a scale byte differs, codes are compared after dequantization (``code * 2^(e-127)``).
    """
    sa = actual_scale.cpu().view(torch.uint8).to(torch.int32)
    se = expected_scale.cpu().view(torch.uint8).to(torch.int32)
    _check_steps((sa - se).abs().float(), torch.zeros_like(sa, dtype=torch.bool), torch.zeros_like(se, dtype=torch.bool),
                 TOLERANCES["e8m0"], "q_out_scale (E8M0)")  # fmt: skip
    m, groups = sa.shape
    if m == 0 or groups == 0:
        return
    va = decode_e2m1(actual_q).reshape(m, groups, -1) * e8m0_to_float(sa).unsqueeze(-1)
    ve = decode_e2m1(expected_q).reshape(m, groups, -1) * e8m0_to_float(se).unsqueeze(-1)
    # One grid step is at most 2 (between 4 and 6) in units of the larger of the two scales.
    unit = torch.maximum(e8m0_to_float(sa), e8m0_to_float(se)).unsqueeze(-1)
    step = torch.where(ve.abs() / unit >= 4, 2.0 * unit, torch.where(ve.abs() / unit >= 2, unit, 0.5 * unit))
    diff = (va - ve).abs() / step
    _check_steps(diff, torch.isnan(va), torch.isnan(ve), TOLERANCES["e2m1_codes"], "q_out_quantized (E2M1)")


@contextlib.contextmanager
def backend_override(value: str | None) -> Iterator[None]:
    """Set ``QKNORM_BACKEND`` to ``value`` (None: unset) for the block, with backend selection reset.

    For tests: ``with backend_override("aiter,torch"): ...`` routes calls as a user setting the
    variable would; the previous value and a fresh selection come back afterwards.
    """
    old = os.environ.get(registry.ENV_VAR)
    if value is None:
        os.environ.pop(registry.ENV_VAR, None)
    else:
        os.environ[registry.ENV_VAR] = value
    registry.reset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(registry.ENV_VAR, None)
        else:
            os.environ[registry.ENV_VAR] = old
        registry.reset()
