"""Determinism: the same inputs give the same output bits on the same backend and device.

Every backend reduces each row in a fixed order (no atomics on data, no split reductions whose
order depends on scheduling, except the per-tensor amax, whose max is order-independent), so
repeated calls and calls in another row context must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from _cases import DEVICE, all_backends, unusable, using_backend

import qknorm

MODES = [None, "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"]


def _outputs(
    quant: str | None, q: torch.Tensor, qw: torch.Tensor, k: torch.Tensor, kw: torch.Tensor
) -> list[torch.Tensor]:
    out = qknorm.qk_rmsnorm(q, qw, k, kw, quant=quant, return_unquantized=quant is not None)
    return [t for t in out if t is not None]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


# Row counts spanning the launch buckets (the Triton backend picks its configuration per bucket:
# <= 16, <= 256, <= 2048, <= 16384, above), with DeepSeek widths on a GPU; small under the interpreter.
ON_GPU = DEVICE.type == "cuda"
ROWS = (2, 300, 3000, 20000) if ON_GPU else (2, 6, 20)
Q_W, K_W, ROW = (1536, 512, 2112) if ON_GPU else (128, 64, 200)
# Rows recomputed alone (the decode bucket): a sum of squares reduced in another order can give
# another r by an ulp, which FP8 scales show; 16 rows leave little room for a chance agreement.
HEAD = 16


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("quant", MODES)
@pytest.mark.parametrize("backend", all_backends())
def test_repeated_calls_give_identical_bits(backend: str, quant: str | None, m: int) -> None:
    why = unusable(backend)
    if why is not None:
        pytest.skip(f"backend {backend} unavailable: {why}")
    gen = torch.Generator().manual_seed(7)
    latent = torch.randn(m, ROW, generator=gen).to(torch.bfloat16).to(DEVICE)
    q, k = latent[:, :Q_W], latent[:, Q_W : Q_W + K_W]
    qw = torch.randn(Q_W, generator=gen).to(torch.bfloat16).to(DEVICE)
    kw = torch.randn(K_W, generator=gen).to(torch.bfloat16).to(DEVICE)
    with using_backend(backend):
        first = _outputs(quant, q, qw, k, kw)
        second = _outputs(quant, q, qw, k, kw)
        # The first row alone and the first HEAD rows alone (other m, grids and launch buckets)
        # give the same rows; a per-tensor scale sees all of q, so that mode is compared on
        # repeated calls only.
        heads = {} if quant == "fp8_tensor" else {h: _outputs(quant, q[:h], qw, k[:h], kw) for h in {1, min(HEAD, m)}}
    for a, b in zip(first, second):
        assert torch.equal(_bits(a), _bits(b))
    for h, head in heads.items():
        for a, hb in zip(first, head):
            if a.dim() == 2 and a.shape[0] == m:
                assert torch.equal(_bits(a[:h]), _bits(hb)), (h, tuple(a.shape))
