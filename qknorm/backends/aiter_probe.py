"""The behavioural probe: a small fixed input through aiter, compared with the reference.

Signatures cannot show a changed rounding rule. Before aiter #3212 (2026-06-02) the MXFP4
scale was ``round_pow2(amax) * 0.25``; from #3212 on ``ceil_pow2(amax * fl32(1/6))`` (SPEC rule
11). The two agree except where a group's amax is exactly ``1.5 * 2^k``, which random data
almost never hits. So the probe's first row is exact by construction: ``x = +-1`` gives
``mean(x^2) = 1``, ``eps = 2^-30`` vanishes in ``fl32(1 + eps)``, ``r = rsqrt(1) = 1`` and
``y = +-w``; the weights put every group's amax on ``1.5 * 2^k`` and the other elements on the
E2M1 grid's rounding midpoints (0.25, 0.75, ..., 5 times the scale). Three random rows follow,
compared within the tolerance table (:data:`qknorm.testing.TOLERANCES`); the exact row must
match bit for bit.

Run once per (aiter entry, request kind without the widths, device) at selection time, which
the registry never reaches during CUDA-graph capture or torch.compile tracing; ``qknorm.warmup``
therefore runs them.
"""

from __future__ import annotations

import torch

from ..checks import build_request
from ..quant import QuantMode
from ..reference import qk_rmsnorm_reference
from ..request import QKNormRequest

__all__ = ["PROBE_EPS", "probe_requests", "compare"]

PROBE_EPS = 2.0**-30  # fl32(1 + 2^-30) == 1, and a normal fp32 (qknorm's own eps floor is 2^-126)
_ROWS, _N1, _N2 = 4, 256, 128  # every group size aiter takes divides 256; widths pass every generation
# y / scale on the exact row, in each group: the amax (6 = E2M1's largest) first, then values on
# the grid and on every midpoint between neighbours (ties go to the even code, SPEC rule 12).
_GRID_VALUES = (6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0, -6.0)


def _weights(n1: int, group_size: int, dtype: torch.dtype, gemma: bool) -> torch.Tensor:
    """q weights making the exact row's groups hit amax = 1.5 * 2^k, k = -1..2, and the E2M1 midpoints."""
    gs = group_size if group_size > 0 else 32
    w = torch.empty(n1, dtype=torch.float64)
    for j in range(n1):
        g, i = divmod(j, gs)
        scale = 2.0 ** (g % 4 - 3)  # amax 6 * scale = 1.5 * 2^(g%4 - 1)
        w[j] = _GRID_VALUES[i % len(_GRID_VALUES)] * scale
    if gemma:  # the kernel adds 1 in fp32; w - 1 is exact in bf16/fp16 for these magnitudes
        w = w - 1.0
    return w.to(dtype)


def _scale_tensor(req: QKNormRequest, m: int, n1: int, device: torch.device) -> torch.Tensor | None:
    if req.q_scale is None:
        return None
    groups = n1 // req.group_size if req.mode in (QuantMode.FP8_GROUP, QuantMode.MXFP4) else 1
    dtype = torch.uint8 if req.mode is QuantMode.MXFP4 else torch.float32
    if req.transpose_scale:
        return torch.zeros((groups, m), dtype=dtype, device=device).t()
    return torch.zeros((m, groups), dtype=dtype, device=device)


def _outputs(req: QKNormRequest, m: int, n1: int, n2: int, device: torch.device) -> dict[str, torch.Tensor | None]:
    def like(ref: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        return None if ref is None else torch.zeros(shape, dtype=dtype, device=device)

    quant_cols = n1 // 2 if req.mode is QuantMode.MXFP4 else n1
    return {
        "q_out": like(req.q_out, (m, n1), req.dtype),
        "q_quant": like(req.q_quant, (m, quant_cols), req.quant_dtype or torch.uint8),
        "q_scale": _scale_tensor(req, m, n1, device),
        "k_out": like(req.k_out, (m, n2), req.dtype),
        "q_res_out": like(req.q_res_out, (m, n1), req.dtype),
    }


def probe_requests(req: QKNormRequest) -> tuple[QKNormRequest, QKNormRequest]:
    """Two requests of ``req``'s kind on the probe input: one for aiter, one for the reference."""
    dev, dtype, m = req.device, req.dtype, _ROWS
    n2 = _N2 if req.has_k else 0
    gen = torch.Generator(device="cpu").manual_seed(20260602)
    signs = torch.where(torch.arange(_N1) % 3 == 1, -1.0, 1.0)
    x = torch.cat([signs[None], torch.randn(m - 1, _N1, generator=gen) * torch.tensor([[1.0], [8.0], [0.125]])])
    inputs: dict[str, torch.Tensor | None] = {
        "q_weight": _weights(_N1, req.group_size, dtype, req.gemma).to(dev),
        "k": torch.randn(m, n2, generator=gen).to(dtype=dtype, device=dev) if req.has_k else None,
        "k_weight": (1 + 0.1 * torch.randn(n2, generator=gen)).to(dtype=dtype, device=dev) if req.has_k else None,
    }
    if req.q_residual is not None:  # x = q + residual exactly: halves on the exact row
        res = torch.cat([signs[None] / 2, torch.randn(m - 1, _N1, generator=gen)])
        inputs["q"], inputs["q_residual"] = (x - res).to(dtype=dtype, device=dev), res.to(dtype=dtype, device=dev)
    else:
        inputs["q"], inputs["q_residual"] = x.to(dtype=dtype, device=dev), None

    blocks = req.mode in (QuantMode.FP8_GROUP, QuantMode.MXFP4)  # per-token/per-tensor groups span the row

    def build() -> QKNormRequest:
        out = _outputs(req, m, _N1, n2, dev)
        return build_request(
            **inputs, q_epsilon=PROBE_EPS, k_epsilon=PROBE_EPS, gemma_norm=req.gemma, quant_mode=req.mode.value,
            group_size=req.group_size if blocks else None, transpose_scale=req.transpose_scale, q_out=out["q_out"],
            q_out_quantized=out["q_quant"], q_out_scale=out["q_scale"], k_out=out["k_out"], q_res_out=out["q_res_out"],
        )  # fmt: skip

    return build(), build()


def _first_line(exc: AssertionError) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _mxfp4_exact_row(actual: QKNormRequest, expected: QKNormRequest) -> str | None:
    """Row 0 bit for bit: its scales sit on amax = 1.5 * 2^k and its values on E2M1 midpoints."""
    sa = actual.q_scale[0].cpu().view(torch.uint8).to(torch.int32)  # type: ignore[index]
    se = expected.q_scale[0].cpu().view(torch.uint8).to(torch.int32)  # type: ignore[index]
    diff = sa - se
    if bool((diff != 0).any()):
        steps = sorted({int(d) for d in diff.tolist() if d})
        if steps == [1]:
            return "E8M0 scales one exponent higher than the spec where amax = 1.5*2^k (the pre-#3212 rule)"
        if steps == [-1]:
            return "E8M0 scales one exponent lower than the spec where amax = 1.5*2^k"
        return f"E8M0 scales differ from SPEC rule 11 by {steps} exponents on exactly representable groups"
    if not torch.equal(actual.q_quant[0].cpu(), expected.q_quant[0].cpu()):  # type: ignore[index]
        return "E2M1 codes differ from round-to-nearest-even (SPEC rule 12) on exactly representable values"
    return None


def compare(actual: QKNormRequest, expected: QKNormRequest) -> str | None:
    """None when aiter's outputs match the reference's, else what differed."""
    from ..testing import assert_fp8_close, assert_mxfp4_close, assert_norm_close, assert_scales_close

    qk_rmsnorm_reference(expected)
    mode = actual.mode
    try:
        if mode is QuantMode.MXFP4:
            why = _mxfp4_exact_row(actual, expected)
            if why is not None:
                return why
            assert_mxfp4_close(actual.q_quant[1:], actual.q_scale[1:], expected.q_quant[1:], expected.q_scale[1:])  # type: ignore[index]
        elif mode.is_fp8:
            assert_fp8_close(actual.q_quant, expected.q_quant)  # type: ignore[arg-type]
            assert_scales_close(actual.q_scale, expected.q_scale)  # type: ignore[arg-type]
        for name in ("q_out", "k_out"):
            a, e = getattr(actual, name), getattr(expected, name)
            if a is not None:
                assert_norm_close(a, e, name)
        if actual.q_res_out is not None and not torch.equal(actual.q_res_out.cpu(), expected.q_res_out.cpu()):  # type: ignore[union-attr]
            return "q_res_out differs from the exact residual sum (SPEC rule 1)"
    except AssertionError as exc:
        return _first_line(exc)
    return None
