"""Helpers of the qk_norm_rope tests: one call described as data, run on a backend, compared.

:class:`RopeCase` fixes the shapes, variants and memory layouts of one call; :func:`make_call`
builds its tensors (q, k, v as views of a packed qkv buffer or of padded buffers with odd
token and head strides; caches NHD, HND or as views of one ``[blocks, 2, ...]`` allocation,
filled with random bytes so untouched entries can be checked bit for bit); :func:`run_case`
calls ``qknorm.qk_norm_rope`` and compares every written tensor with the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

import qknorm
from qknorm.rope.checks import plan_call
from qknorm.rope.reference import qk_norm_rope_reference
from qknorm.rope.request import RopeRequest
from qknorm.rope.testing import assert_bits_equal, assert_rope_close, assert_rope_fp8_close, fp8_slack, pair_magnitude
from qknorm.testing import backend_override

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@dataclass(frozen=True)
class RopeCase:
    t: int = 5
    hq: int = 4
    hk: int = 2
    d: int = 16
    rot: int | None = None  # None: R = D; 0: no rotation
    dtype: torch.dtype = torch.bfloat16
    table_dtype: torch.dtype = torch.float32
    is_neox: bool = True
    gemma: bool = False
    weights: bool = True
    layout: str = "packed"  # packed qkv views, "strided" padded buffers, "contiguous"
    cache: torch.dtype | None = None  # cache dtype; None: no cache write
    cache_layout: str = "nhd"  # "nhd", "hnd", "unbind" (views of [blocks, 2, bs, Hk, D])
    dv: int | None = None  # None: D
    block_size: int = 4
    num_blocks: int = 5
    scale_heads: bool = False  # per-head k/v scales
    q_fp8: torch.dtype | None = None
    in_place: bool = False  # q_out=q, k_out=k
    give_k_out: bool = False  # with a cache write: also write k_out
    index_dtype: torch.dtype = torch.int64
    pad_slots: int = 1  # tokens with slot -1
    max_pos: int = 40
    seed: int = 0

    @property
    def r(self) -> int:
        return self.d if self.rot is None else self.rot

    @property
    def v_dim(self) -> int:
        return self.d if self.dv is None else self.dv


def cos_sin_table(max_pos: int, rot: int, dtype: torch.dtype, device: torch.device, base: float = 10000.0) -> torch.Tensor:
    """vLLM's layout: row p = [cos(p * f_i) | sin(p * f_i)], f_i = base^(-2i / R)."""
    inv = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat((ang.cos(), ang.sin()), dim=1).to(dtype=dtype, device=device)


def _heads(gen: torch.Generator, case: RopeCase, t: int, h: int, d: int, layout: str, salt: int) -> torch.Tensor:
    x = torch.randn((t, h + 1, d + 4), generator=gen) * (1 + salt)
    if layout == "strided":  # token stride (h+1)(d+4), head stride d+4, offset 2
        return x.to(case.dtype).to(DEVICE)[:, 1:, 2 : 2 + d]
    return x[:, :h, :d].contiguous().to(case.dtype).to(DEVICE)


def _random_cache(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random finite values (FP8: random codes without NaN) so untouched entries are recognizable."""
    if dtype in FP8:
        codes = torch.randint(0, 120, shape, generator=gen, dtype=torch.uint8) | (torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8) << 7)
        return codes.to(DEVICE).view(dtype)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def _caches(gen: torch.Generator, case: RopeCase) -> tuple[torch.Tensor, torch.Tensor]:
    nb, bs, hk, d, dv = case.num_blocks, case.block_size, case.hk, case.d, case.v_dim
    dt = case.cache
    assert dt is not None
    if case.cache_layout == "unbind":
        assert dv == d
        both = _random_cache(gen, (nb, 2, bs, hk, d), dt)
        return both[:, 0], both[:, 1]
    if case.cache_layout == "hnd":
        return (_random_cache(gen, (nb, hk, bs, d), dt).permute(0, 2, 1, 3),
                _random_cache(gen, (nb, hk, bs, dv), dt).permute(0, 2, 1, 3))  # fmt: skip
    return _random_cache(gen, (nb, bs, hk, d), dt), _random_cache(gen, (nb, bs, hk, dv), dt)


def make_call(case: RopeCase) -> dict[str, Any]:
    """The keyword arguments of one ``qknorm.qk_norm_rope`` call (positional ones included by name)."""
    gen = torch.Generator().manual_seed(case.seed)
    t, hq, hk, d = case.t, case.hq, case.hk, case.d
    if case.layout == "packed" and case.v_dim == d:
        qkv = (torch.randn((t, (hq + 2 * hk) * d), generator=gen) * 2).to(case.dtype).to(DEVICE)
        q, k, v = (x.view(t, n, d) for x, n in zip(qkv.split((hq * d, hk * d, hk * d), dim=1), (hq, hk, hk)))
    else:
        q = _heads(gen, case, t, hq, d, case.layout, 0)
        k = _heads(gen, case, t, hk, d, case.layout, 1)
        v = _heads(gen, case, t, hk, case.v_dim, case.layout, 2)
    w_init = 0.0 if case.gemma else 1.0
    qw = (w_init + 0.2 * torch.randn(d, generator=gen)).to(case.dtype).to(DEVICE) if case.weights else None
    kw = (w_init + 0.2 * torch.randn(d, generator=gen)).to(case.dtype).to(DEVICE) if case.weights else None
    call: dict[str, Any] = dict(q=q, k=k, q_weight=qw, k_weight=kw, cos_sin_cache=None, positions=None,
                                is_neox=case.is_neox, gemma_norm=case.gemma)  # fmt: skip
    if case.r:
        call["cos_sin_cache"] = cos_sin_table(case.max_pos, case.r, case.table_dtype, DEVICE)
        call["positions"] = torch.randint(0, case.max_pos, (t,), generator=gen).to(case.index_dtype).to(DEVICE)
    if case.cache is not None:
        k_cache, v_cache = _caches(gen, case)
        slots = torch.randperm(case.num_blocks * case.block_size, generator=gen)[:t]
        slots[: min(case.pad_slots, t)] = -1
        call.update(v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots.to(case.index_dtype).to(DEVICE))
        if case.cache in FP8:
            n = hk if case.scale_heads else 1
            call["k_scale"] = (0.01 + 0.02 * torch.rand(n, generator=gen)).to(DEVICE)
            call["v_scale"] = (0.01 + 0.02 * torch.rand(n, generator=gen)).to(DEVICE)
    if case.q_fp8 is not None:
        call["q_scale"] = torch.tensor([0.013], device=DEVICE)
        call["q_out"] = torch.empty((t, hq, d), dtype=case.q_fp8, device=DEVICE)
    if case.in_place:
        call["q_out"], call["k_out"] = q, k
    elif case.give_k_out:
        call["k_out"] = torch.full((t, hk, d), 7.0, dtype=case.dtype, device=DEVICE)
    return call


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_contiguous() else torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
    return x


def reference_request(call: dict[str, Any]) -> RopeRequest:
    """The reference's request over clones of ``call``'s tensors (outputs allocated as the entry does)."""
    c = {n: _clone(x) for n, x in call.items()}
    plan = plan_call(c.pop("q"), c.pop("k"), c.pop("q_weight"), c.pop("k_weight"), c.pop("cos_sin_cache"),
                     c.pop("positions"), **c)  # fmt: skip
    c = {n: _clone(x) for n, x in call.items()}
    if c.get("q_out") is None or c.get("q_out") is call["q"]:
        c["q_out"] = torch.empty((plan.t, plan.hq, plan.d), dtype=plan.q_out_dtype, device=plan.device)
    if plan.write_k_out and (c.get("k_out") is None or c.get("k_out") is call["k"]):
        c["k_out"] = torch.empty((plan.t, plan.hk, plan.d), dtype=plan.dtype, device=plan.device)
    names = ("q", "k", "q_weight", "k_weight", "cos_sin_cache", "positions", "q_out", "k_out", "v", "k_cache",
             "v_cache", "slot_mapping", "k_scale", "v_scale", "q_scale")  # fmt: skip
    return RopeRequest(plan, *(c.get(n) for n in names[:6]), c["q_out"], c.get("k_out"), *(c.get(n) for n in names[8:]))


def written_slots(req: RopeRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token index, block, offset) of every cache entry the call writes."""
    s = req.slot_mapping.to(torch.int64)  # type: ignore[union-attr]
    tok = ((s >= 0) & (s < req.plan.num_slots)).nonzero().flatten()
    s = s[tok]
    return tok, s // req.plan.block_size, s % req.plan.block_size


def compare(call: dict[str, Any], out: qknorm.QKNormRopeOutput, exp: RopeRequest, before: dict[str, torch.Tensor]) -> None:
    """Every written tensor of ``call`` (result ``out``) against the reference's ``exp``."""
    plan = exp.plan
    m_q, m_k = pair_magnitude(exp, "q"), pair_magnitude(exp, "k")
    if plan.q_fp8:
        assert_rope_fp8_close(out.q, exp.q_out, "q_out (FP8)", fp8_slack(exp, "q", exp.q_scale))  # type: ignore[arg-type]
    else:
        assert_rope_close(out.q, exp.q_out, m_q, "q_out")
    if plan.write_k_out:
        assert out.k is not None
        assert_rope_close(out.k, exp.k_out, m_k, "k_out")  # type: ignore[arg-type]
    else:
        assert out.k is None
    if not plan.has_cache:
        return
    tok, blk, off = written_slots(exp)
    for name in ("k_cache", "v_cache"):
        got, want = call[name], getattr(exp, name)
        g, w = got[blk, off], want[blk, off]
        if name == "v_cache":  # copied, or quantized by a deterministic rule: bit-exact either way
            assert_bits_equal(g, w, name)
        elif plan.cache_fp8:
            assert_rope_fp8_close(g, w, name, fp8_slack(exp, "k", exp.k_scale)[tok])  # type: ignore[arg-type]
        else:
            assert_rope_close(g, w, m_k[tok], name)
        masked = got.clone()
        masked[blk, off] = w
        assert_bits_equal(masked, want, f"{name} outside the written slots")
        assert_bits_equal(want.clone().index_put_((blk, off), before[name][blk, off]), before[name], f"{name} (reference)")


def run_case(case: RopeCase, backend: str = "triton") -> None:
    """Call ``qknorm.qk_norm_rope`` for ``case`` on ``backend`` and compare with the reference."""
    call = make_call(case)
    exp = reference_request(call)
    qk_norm_rope_reference(exp)
    before = {n: call[n].clone() for n in ("k_cache", "v_cache") if n in call}
    with backend_override(backend):
        out = qknorm.qk_norm_rope(**call)
    compare(call, out, exp, before)


def variants(base: RopeCase, **axes: list[Any]) -> list[RopeCase]:
    """``base`` with one field changed at a time, for each value of each axis."""
    return [replace(base, **{name: value}) for name, values in axes.items() for value in values]


