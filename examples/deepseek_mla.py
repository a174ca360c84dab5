"""A DeepSeek-V3-style MLA pre-attention block using qknorm, checked against unfused PyTorch.

    hidden [T, H] --fused_qkv_a_proj--> latent [T, 2112] --split--> q [T, 1536], k_nope [T, 512], k_rope [T, 64]
    q      --q_a_layernorm--> FP8 1x128 --q_b_proj (FP8 128x128 weight blocks)--> q heads
    k_nope --kv_a_layernorm-------------> kv_b_proj --------------------------> k/v heads

The fused path is one :class:`qknorm.MLAQKNorm` call (both norms and the quantization of q);
the unfused path is two ``F.rms_norm`` calls in fp32 and an explicit per-group quantization.
Both feed the same block-quantized ``q_b_proj``, computed here by dequantizing q and the weight
and multiplying in fp32 (what an FP8 GEMM computes, up to its accumulation order). Weights are
small and random; nothing is downloaded.

Run ``python examples/deepseek_mla.py --device cpu`` (or ``--device cuda``). It prints the
differences and exits with status 1 when they exceed qknorm's tolerances
(:data:`qknorm.testing.TOLERANCES`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import qknorm
from qknorm.testing import TOLERANCES

Q_LORA_RANK, KV_LORA_RANK, ROPE_DIM = 1536, 512, 64  # DeepSeek-V3
BLOCK = 128  # FP8 block size: 1 x 128 for activations, 128 x 128 for weights
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


@dataclass
class Weights:
    """Random weights of one MLA layer's pre-attention part (bf16, q_b_proj block-quantized)."""

    fused_qkv_a_proj: torch.Tensor  # [q_lora + kv_lora + rope, hidden] bf16
    q_a_layernorm: torch.Tensor  # [q_lora] bf16
    kv_a_layernorm: torch.Tensor  # [kv_lora] bf16
    q_b_proj: torch.Tensor  # [heads * qk_head_dim, q_lora] FP8 codes
    q_b_proj_scale: torch.Tensor  # [heads * qk_head_dim / 128, q_lora / 128] float32
    kv_b_proj: torch.Tensor  # [heads * (qk_nope + v_head), kv_lora] bf16


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes and float32 scales of ``w [N, K]`` per 128 x 128 block (DeepSeek-V3's weight format)."""
    n, k = w.shape
    blocks = w.float().reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-10) / FP8_MAX
    codes = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes.reshape(n, k), scale


def dequantize_weight_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, K]`` from 128 x 128 block codes and scales."""
    expanded = scale.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
    return codes.float() * expanded


def dequantize_activation_groups(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``[T, K]`` from 1 x 128 group codes ``[T, K]`` and scales ``[T, K / 128]``."""
    return codes.float() * scale.repeat_interleave(BLOCK, dim=1)


def make_weights(hidden: int, heads: int, device: torch.device, gen: torch.Generator) -> Weights:
    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16).to(device)

    qk_head_dim, v_head_dim = 128 + ROPE_DIM, 128
    q_b, q_b_scale = quantize_weight_blocks(torch.randn(heads * qk_head_dim, Q_LORA_RANK, generator=gen) * 0.02)
    return Weights(
        fused_qkv_a_proj=rand(Q_LORA_RANK + KV_LORA_RANK + ROPE_DIM, hidden, std=hidden**-0.5),
        q_a_layernorm=(1.0 + torch.randn(Q_LORA_RANK, generator=gen) * 0.1).to(torch.bfloat16).to(device),
        kv_a_layernorm=(1.0 + torch.randn(KV_LORA_RANK, generator=gen) * 0.1).to(torch.bfloat16).to(device),
        q_b_proj=q_b.to(device),
        q_b_proj_scale=q_b_scale.to(device),
        kv_b_proj=rand(heads * (128 + v_head_dim), KV_LORA_RANK, std=KV_LORA_RANK**-0.5),
    )


def fused_block(hidden: torch.Tensor, w: Weights, norm: qknorm.MLAQKNorm) -> dict[str, torch.Tensor]:
    """The block with qknorm: one fused call between the two projections."""
    latent = hidden @ w.fused_qkv_a_proj.t()
    q_codes, q_scale, k_nope, k_rope = norm(latent)
    assert q_scale is not None  # the norm quantizes q (quant="fp8_group")
    q_heads = (
        dequantize_activation_groups(q_codes, q_scale) @ dequantize_weight_blocks(w.q_b_proj, w.q_b_proj_scale).t()
    )
    kv_heads = k_nope.float() @ w.kv_b_proj.float().t()
    return {"q_codes": q_codes, "q_scale": q_scale, "k_nope": k_nope, "k_rope": k_rope, "q_heads": q_heads,
            "kv_heads": kv_heads}  # fmt: skip


def unfused_block(hidden: torch.Tensor, w: Weights, eps: float) -> dict[str, torch.Tensor]:
    """The same block in plain PyTorch: two RMSNorms in fp32, then an explicit 1 x 128 quantization."""
    latent = hidden @ w.fused_qkv_a_proj.t()
    q, k_nope, k_rope = latent.split((Q_LORA_RANK, KV_LORA_RANK, ROPE_DIM), dim=-1)
    q_norm = F.rms_norm(q.float(), (Q_LORA_RANK,), w.q_a_layernorm.float(), eps)
    k_norm = F.rms_norm(k_nope.float(), (KV_LORA_RANK,), w.kv_a_layernorm.float(), eps).to(torch.bfloat16)
    groups = q_norm.reshape(q.shape[0], -1, BLOCK)
    q_scale = groups.abs().amax(dim=-1).clamp_min(1e-10) / FP8_MAX
    q_codes = (groups / q_scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(q.shape)
    q_heads = (
        dequantize_activation_groups(q_codes, q_scale) @ dequantize_weight_blocks(w.q_b_proj, w.q_b_proj_scale).t()
    )
    kv_heads = k_norm.float() @ w.kv_b_proj.float().t()
    return {"q_codes": q_codes, "q_scale": q_scale, "k_nope": k_norm, "k_rope": k_rope, "q_heads": q_heads,
            "kv_heads": kv_heads}  # fmt: skip


# Relative error (Frobenius norm) allowed in a projection output. Its input may differ from the
# reference input by one step of the input format in a fraction f of elements (FP8 e4m3: one
# step is 2^-3 relative, f <= 2%; bf16: 2^-7, any element), so ||W dx|| / ||W x|| stays around
# sqrt(f) * step for a random W.
PROJ_RTOL = {
    "q_heads": TOLERANCES["fp8_codes"].mismatch ** 0.5 * TOLERANCES["fp8_codes"].rtol,
    "kv_heads": TOLERANCES["bf16"].rtol,
}


def compare(fused: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """Print the differences; return the names of the outputs outside their tolerance."""
    failures = []
    bf16 = TOLERANCES["bf16"]
    kd = (fused["k_nope"].float() - ref["k_nope"].float()).abs()
    k_ok = bool((kd <= bf16.atol + bf16.rtol * ref["k_nope"].float().abs()).all())
    print(f"k_nope     max |diff| {kd.max().item():.3g}   (allowed: 1 bf16 ulp)")
    failures += [] if k_ok else ["k_nope"]

    codes = TOLERANCES["fp8_codes"]
    a, e = fused["q_codes"].float(), ref["q_codes"].float()
    steps = (a - e).abs() / (e.abs() * codes.rtol).clamp_min(2.0**-9)
    frac = (steps > 0).float().mean().item()
    print(f"q codes    {frac:.2%} differ, by at most {steps.max().item():.2f} FP8 steps   "
          f"(allowed: {codes.mismatch:.0%}, 1 step)")  # fmt: skip
    failures += [] if (frac <= codes.mismatch and steps.max().item() <= 1.0) else ["q_codes"]

    sd = ((fused["q_scale"] - ref["q_scale"]).abs() / ref["q_scale"]).max().item()
    print(f"q scales   max rel diff {sd:.3g}   (allowed: {TOLERANCES['fp32_scale'].rtol:.3g})")
    failures += [] if sd <= TOLERANCES["fp32_scale"].rtol else ["q_scale"]

    same_rope = torch.equal(fused["k_rope"], ref["k_rope"])
    print(f"k_rope     {'identical' if same_rope else 'DIFFERENT'} (passed through untouched)")
    failures += [] if same_rope else ["k_rope"]

    for name, rtol in PROJ_RTOL.items():
        err = (torch.linalg.norm(fused[name] - ref[name]) / torch.linalg.norm(ref[name])).item()
        print(f"{name:10s} ||diff|| / ||ref|| {err:.3g}   (allowed: {rtol:.3g})")
        failures += [] if err <= rtol else [name]
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="run the fused block under torch.compile")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    eps = 1e-6
    gen = torch.Generator().manual_seed(args.seed)
    w = make_weights(args.hidden, args.heads, device, gen)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(torch.bfloat16).to(device)

    norm = qknorm.MLAQKNorm(quant="fp8_group", q_eps=eps, kv_eps=eps, dtype=torch.bfloat16, device=device)
    norm.load_state_dict({"q_a_layernorm.weight": w.q_a_layernorm, "kv_a_layernorm.weight": w.kv_a_layernorm})
    records = qknorm.warmup(
        Q_LORA_RANK, KV_LORA_RANK, device=device, modes=("fp8_group",), max_tokens=args.tokens,
        row_stride=Q_LORA_RANK + KV_LORA_RANK + ROPE_DIM, q_epsilon=eps,
    )  # fmt: skip
    print(f"qknorm backend: {records[0].backend} on {device}; T={args.tokens}, hidden={args.hidden}")

    block = torch.compile(fused_block, fullgraph=True) if args.compile else fused_block
    fused = block(hidden, w, norm)
    ref = unfused_block(hidden, w, eps)
    failures = compare(fused, ref)
    print("MISMATCH: " + ", ".join(failures) if failures else "OK: fused and unfused blocks agree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
