"""A tiny Qwen3-style attention block on a paged KV cache using qknorm, checked against unfused PyTorch.

    hidden [T, H] --qkv_proj--> qkv [T, (Hq + 2 Hk) D] --split (views)--> q, k, v
    q, k --per-head RMSNorm (q_norm, k_norm)--> RoPE --> q; k and v into the paged cache
    attention of each sequence's queries over its cached keys/values --o_proj--> out [T, H]

The fused path is one :class:`qknorm.nn.QKNormRoPE` call per step (norms, RoPE and the cache
write of k and v, reading q, k and v as strided views of the packed projection). The unfused
path is what Hugging Face's Qwen3 attention computes: ``F.rms_norm`` per head in fp32 rounded
to bf16, ``x * cos + rotate_half(x) * sin`` in fp32, and k and v kept as plain tensors. Both
then run the same causal attention in fp32. Two sequences are prefilled (5 and 3 tokens), then
each decodes one token, so the cache holds entries written by two calls. Weights are small and
random; nothing is downloaded.

Run ``python examples/qwen3_attention.py --device cpu`` (or ``--device cuda``). It prints the
differences and exits with status 1 when they exceed qknorm's tolerances
(:data:`qknorm.testing.TOLERANCES`).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from qknorm.nn import QKNormRoPE
from qknorm.testing import TOLERANCES

HIDDEN, HQ, HK, D = 256, 4, 2, 64  # a scaled-down Qwen3 layer (Qwen3-8B: 4096, 32, 8, 128)
BLOCK_SIZE, NUM_BLOCKS = 4, 16
EPS, THETA = 1e-6, 1e6
BF16 = torch.bfloat16


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def unfused_qk(q: torch.Tensor, k: torch.Tensor, qw: torch.Tensor, kw: torch.Tensor, table: torch.Tensor,
               pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """HF Qwen3: per-head RMSNorm (fp32, rounded to bf16), then neox RoPE in fp32, rounded."""
    cos, sin = table[pos].chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    out = []
    for x, w in ((q, qw), (k, kw)):
        u = F.rms_norm(x.float(), (D,), w.float(), EPS).to(BF16).float()
        out.append((u * cos + rotate_half(u) * sin).to(BF16))
    return out[0], out[1]


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention in fp32 of queries ``[n, Hq, D]`` at ``q_pos`` over ``[L, Hk, D]`` (positions 0..L-1)."""
    rep = HQ // HK
    k = keys.float().repeat_interleave(rep, dim=1)
    v = values.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) / D**0.5
    mask = torch.arange(keys.shape[0], device=q.device)[None, :] > q_pos[:, None]
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def gather(cache: torch.Tensor, blocks: list[int], length: int) -> torch.Tensor:
    """A sequence's first ``length`` cache entries, in order, from its block table."""
    return torch.cat([cache[b] for b in blocks])[:length]


@torch.no_grad()
def run(device: torch.device, seed: int = 0) -> dict[str, float]:
    """Prefill two sequences and decode one token each, fused and unfused; returns the worst differences."""
    g = torch.Generator().manual_seed(seed)
    qkv_w = (torch.randn(((HQ + 2 * HK) * D, HIDDEN), generator=g) / HIDDEN**0.5).to(BF16).to(device)
    o_w = (torch.randn((HIDDEN, HQ * D), generator=g) / (HQ * D) ** 0.5).to(BF16).to(device)
    layer = QKNormRoPE(HQ, HK, D, max_position=64, rope_theta=THETA, eps=EPS, dtype=BF16, device=device)
    with torch.no_grad():
        layer.q_norm.weight.copy_(1 + 0.2 * torch.randn(D, generator=g))  # type: ignore[union-attr]
        layer.k_norm.weight.copy_(1 + 0.2 * torch.randn(D, generator=g))  # type: ignore[union-attr]
    k_cache = torch.zeros((NUM_BLOCKS, BLOCK_SIZE, HK, D), dtype=BF16, device=device)
    v_cache = torch.zeros_like(k_cache)
    lengths = [5, 3]
    tables = [[7, 2], [11]]  # block tables: sequence i's tokens j live in tables[i][j // BLOCK_SIZE]
    kept_k: list[list[torch.Tensor]] = [[], []]
    kept_v: list[list[torch.Tensor]] = [[], []]
    worst = {"q ulps": 0.0, "k_cache ulps": 0.0, "v_cache": 0.0, "out": 0.0}
    steps = [[list(range(n)) for n in lengths], [[n] for n in lengths]]  # prefill, then one decode token each
    for step in steps:
        pos = torch.tensor([p for seq in step for p in seq], device=device)
        seq_of = [i for i, seq in enumerate(step) for _ in seq]
        slots = torch.tensor([tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for i, p in zip(seq_of, pos.tolist())],
                             device=device)  # fmt: skip
        hidden = torch.randn((len(seq_of), HIDDEN), generator=g).to(BF16).to(device)
        qkv = hidden @ qkv_w.t()
        q, k, v = qkv.split((HQ * D, HK * D, HK * D), dim=-1)
        fused = layer(q, k, pos, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)
        ref_q, ref_k = unfused_qk(q.unflatten(-1, (HQ, D)), k.unflatten(-1, (HK, D)), layer.q_norm.weight,  # type: ignore[union-attr]
                                  layer.k_norm.weight, layer.cos_sin_cache, pos)  # type: ignore[union-attr, arg-type]  # fmt: skip
        worst["q ulps"] = max(worst["q ulps"], ulps(fused.q, ref_q))
        outs_fused, outs_ref = [], []
        for i, seq in enumerate(step):
            rows = [j for j, s in enumerate(seq_of) if s == i]
            kept_k[i].append(ref_k[rows])
            kept_v[i].append(v[rows].unflatten(-1, (HK, D)))
            length = seq[-1] + 1
            keys, values = gather(k_cache, tables[i], length), gather(v_cache, tables[i], length)
            worst["k_cache ulps"] = max(worst["k_cache ulps"], ulps(keys, torch.cat(kept_k[i])))
            worst["v_cache"] = max(worst["v_cache"], float((values.float() - torch.cat(kept_v[i]).float()).abs().max()))
            outs_fused.append(attention(fused.q[rows], keys, values, pos[rows]))
            outs_ref.append(attention(ref_q[rows], torch.cat(kept_k[i]), torch.cat(kept_v[i]), pos[rows]))
        out_f = torch.cat(outs_fused).flatten(1).to(BF16) @ o_w.t()
        out_r = torch.cat(outs_ref).flatten(1).to(BF16) @ o_w.t()
        worst["out"] = max(worst["out"], float(((out_f.float() - out_r.float()).abs() / (out_r.float().abs() + 1e-2)).max()))
    return worst


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in bf16 ulps of the larger magnitude of the two values."""
    mag = torch.maximum(a.float().abs(), b.float().abs()).double()
    ulp = torch.pow(2.0, torch.floor(torch.log2(mag.clamp_min(2.0**-126))) - 7)
    return float(((a.double() - b.double()).abs() / ulp).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    worst = run(torch.device(args.device), args.seed)
    # q and k may differ from the unfused chain by ulp(ref) + ulp(m) (TOLERANCES["rope"]): at most 2 ulps of the
    # larger value. v is copied bit for bit. The attention output inherits those ulps through fp32 softmax and
    # one bf16 GEMM: 2^-5 relative (plus 1e-2 absolute in the denominator) bounds it with a wide margin.
    limits = {"q ulps": 2.0, "k_cache ulps": 2.0, "v_cache": 0.0, "out": 2.0**-5}
    ok = True
    for name, value in worst.items():
        flag = "ok" if value <= limits[name] else "TOO LARGE"
        ok &= value <= limits[name]
        print(f"{name:>13}: {value:.4g} (limit {limits[name]:.4g}) {flag}")
    print(f"rope tolerance: {TOLERANCES['rope'].reason}")
    print("OK: fused and unfused blocks agree" if ok else "FAIL: fused and unfused blocks differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
