"""``qk_norm_rope`` on aiter's ``fused_qk_norm_rope_cache_pts_quant_shuffle``, generation by generation.

The entry's Python signature changed once (``rotary_dim`` in #2199); its C++ changed behind it
(``docs/aiter.md`` has the table). :func:`read_caps` reads the generation from the signature and
from the C++ sources aiter's JIT compiles (``aiter.jit.core.AITER_CSRC_DIR``); what it cannot
read it assumes at its oldest. :class:`PtsAdapter` then decides in two steps:

- :meth:`PtsAdapter.kind_unsupported`, from the request kind alone (``RopePlan.key()``): what
  this entry cannot compute as SPEC_ROPE_CACHE §3 says, and every argument check that would
  abort the process (``AITER_CHECK`` from #3159 on). The registry sends such kinds elsewhere.
- :meth:`PtsAdapter.inputs_unsupported` and :meth:`PtsAdapter.layout_unsupported`, from the
  layout facts the key holds too: one eps for q and k, a table with contiguous rows, and a cache
  layout this generation addresses (checked after the behavioural probe, which may lower it).

:meth:`PtsAdapter.run` maps a request onto the 24/25 positional parameters: q, k and v as one
contiguous ``qkv`` (a view when they already are one, else a copy), ``q_out`` contiguous (else
staged and copied back), positions clamped into the table and slots past the cache marked as
padding (aiter checks neither: it would read and write out of bounds), int64 indices, weights
of ones for a weightless norm (``x * r * 1.0`` is exact), host-side scales (used by FP8 caches
only, which qknorm never sends). Without a cache write, k is written through the cache path
into ``k_out`` itself (``slot = t``, block size 1), the one place aiter writes k for every token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .request import RopeRequest

__all__ = ["PTS", "PTS_PARAMS", "PtsCaps", "PtsAdapter", "read_caps"]

PTS = "fused_qk_norm_rope_cache_pts_quant_shuffle"
PTS_PARAMS = ("qkv", "qw", "kw", "cos_sin", "positions", "num_tokens", "num_heads_q", "num_heads_k", "num_heads_v",
              "head_size", "is_neox_style", "eps", "q_out", "k_cache", "v_cache", "slot_mapping", "per_tensor_k_scale",
              "per_tensor_v_scale", "k_out", "v_out", "return_kv", "use_shuffle_layout", "block_size", "x")  # fmt: skip
# AITER_CHECK / TORCH_CHECK(head_size == 64 || 128 || 256) in fused_rope_rms_set_kv (rope_common.h).
# 64 is refused too: VEC = 64 / 64 lanes = 1 element per lane on gfx9, and warp_shfl_sync_vec
# moves VEC * 2 bytes / 4 = 0 words, so the rotation partner is never exchanged (NeoX), and
# GPT-J rotates VEC / 2 = 0 pairs: the output is uninitialized registers.
HEAD_SIZES = (128, 256)
# VEC = head_size / warp size: 64 on gfx942/gfx950, 32 on gfx12 (#3330). qknorm does not ask
# which GPU runs the call, so a partial rotary dim must fall on lane boundaries for both.
_WAVES = (64, 32)
# total_warps and global_warp_id are int in fused_mrope_rms_kv_kernel: T * (Hq + Hk + Hv) < 2^31.
_MAX_WARPS = 2**31 - 1
# Lines of the C++ aiter's JIT compiles that name a generation (checked at each commit).
_MARKERS = {
    "aborts": ("kernels/fused_qk_norm_rope_cache_quant.cu", "AITER_CHECK(qkv.is_contiguous()"),  # #3159
    "dim1": ("kernels/fused_qk_norm_rope_cache_quant.cu", "is_contiguous_from_dim1(k_cache)"),  # #3492 to #4312
    "block": ("kernels/rope/rope_common.h", "const int64_t block_stride = (k_block_stride != 0)"),  # #3640
    "strided": ("kernels/rope/rope_common.h", "k_token_stride"),  # #4312
    "pow2": ("kernels/rope/rope_common.h", "block_size must be a power of 2"),  # #4531
}


@dataclass(frozen=True)
class PtsCaps:
    """What the installed pts entry does, read from its signature and its C++ sources."""

    rotary_dim: bool  # the rotary_dim parameter (#2199, 2026-03-21): partial rotary
    layout: str  # caches it addresses: "contiguous" (#1551), "block" (block stride, #3640), "strided" (#4312)
    pow2_blocks: bool  # block_size must be a power of two (#4531, 2026-08-21; assumed when unread)
    aborts: bool  # AITER_CHECK aborts (#3159, 2026-05-29; assumed when unread)
    source: str  # where the generation was read, or why it could not be
    read: bool = True  # the C++ sources were read (else the oldest rules are assumed)

    def generation(self) -> str:
        """The newest PR whose behaviour these caps describe."""
        if not self.read:
            return "#2199 or later, C++ not read" if self.rotary_dim else "#1551 or later, C++ not read"
        if self.pow2_blocks and self.layout == "strided":
            return "#4531"
        gen = {"strided": "#4312", "block": "#3640"}.get(self.layout)
        return gen or ("#3159" if self.aborts else "#2199" if self.rotary_dim else "#1551")


def read_caps(fn: Callable[..., Any], csrc_dir: str | None) -> PtsCaps:
    """The generation of ``fn`` (a bound pts entry) and of the C++ under ``csrc_dir``."""
    rotary = "rotary_dim" in inspect.signature(fn).parameters
    texts: dict[str, str] = {}
    why = "no AITER_CSRC_DIR" if not csrc_dir else ""
    for rel, _ in _MARKERS.values():
        if csrc_dir and rel not in texts:
            try:
                texts[rel] = (Path(csrc_dir) / rel).read_text(errors="replace")
            except OSError as exc:
                why = why or f"cannot read {Path(csrc_dir) / rel}: {exc.strerror or exc}"
    if why:  # unread: the oldest layout rule, and every check that may abort
        return PtsCaps(rotary, "contiguous", True, True, f"C++ sources not read ({why}); oldest rules assumed", False)
    has = {name: marker in texts[rel] for name, (rel, marker) in _MARKERS.items()}
    layout = "strided" if has["strided"] else "block" if has["block"] else "contiguous"
    note = "; #3492's unbind views are written as if contiguous: qknorm sends contiguous caches" if (
        has["dim1"] and layout == "contiguous") else ""  # fmt: skip
    return PtsCaps(rotary, layout, has["pow2"], has["aborts"], f"read in {csrc_dir}{note}")


def _lanes_unsupported(d: int, rot: int, neox: bool) -> str | None:
    """A partial rotary dim that splits a lane, or a NeoX half that splits one (never checked by aiter)."""
    for wave in _WAVES:
        vec = d // wave
        bad = (rot // 2) % vec if neox else rot % vec
        if bad:
            what = "R/2" if neox else "R"
            return (f"rotary dim R={rot} puts {what} inside a lane ({vec} elements per lane on {wave}-lane GPUs, "
                    f"head size {d}): aiter never checks it and rotates whole lanes")  # fmt: skip
    return None


def _cache_unsupported(plan: Any, caps: PtsCaps) -> str | None:
    if plan.cache_fp8:
        return ("FP8 cache: aiter reads k_scale/v_scale on the host at launch (.item(), from #3159 a host load of "
                "data_ptr()), so a scale changed on the device is not seen on CUDA-graph replay (SPEC_ROPE_CACHE §2); "
                "and from #4531 it stores x*(1/s), not the correctly rounded x/s")  # fmt: skip
    if plan.dv != plan.d:
        return f"one head size for q, k and v (packed qkv), v has Dv={plan.dv} and D={plan.d}"
    if plan.write_k_out:
        return "k_out with a cache write: aiter writes it in the cache dtype and skips padded tokens (slot < 0)"
    bs = plan.block_size
    if caps.pow2_blocks and bs & (bs - 1):
        return f"block_size must be a power of two (#4531; AITER_CHECK aborts), got {bs}"
    return None


def _packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor | None:
    """``[T, W]`` contiguous view when q, k (and v) are consecutive heads of one buffer, else None."""
    parts = [q, k] if v is None else [q, k, v]
    t, d = q.shape[0], q.shape[2]
    width = sum(p.shape[1] for p in parts) * d
    at = q.data_ptr()
    for p in parts:
        if p.data_ptr() != at or (t > 1 and p.stride(0) != width) or (p.shape[1] > 1 and p.stride(1) != d):
            return None
        if p.untyped_storage().data_ptr() != q.untyped_storage().data_ptr():
            return None
        at += p.shape[1] * d * p.element_size()
    return torch.as_strided(q, (t, width), (width, 1))


class PtsAdapter:
    """``fused_qk_norm_rope_cache_pts_quant_shuffle`` (#1551) adapted to :class:`RopeRequest`."""

    generation = "pts"

    def __init__(self, module: str, fn: Callable[..., Any], caps: PtsCaps) -> None:
        self.module, self.fn, self.caps = module, fn, caps
        self.layout = caps.layout  # lowered by the behavioural probe if the build does not do what its sources say
        self.proven = False  # a call has succeeded: no first-use build failure can follow
        self._ones: dict[tuple[object, ...], torch.Tensor] = {}
        self._host_scale = torch.ones(1, dtype=torch.float32)  # read on the host; unused for non-FP8 caches

    @property
    def entry(self) -> str:
        return f"{self.module}.{PTS}"

    def features(self) -> str:
        c = self.caps
        rot = "partial rotary (lane-aligned)" if c.rotary_dim else "full rotary only"
        return (f"{c.generation()}: {rot}, {self.layout} caches, {'power-of-two blocks, ' if c.pow2_blocks else ''}"
                f"q-dtype caches or none; {c.source}")  # fmt: skip

    def kind_unsupported(self, plan: Any) -> str | None:
        """Why this entry cannot serve a request kind (None if it can), from the plan's key alone."""
        if plan.rot == 0:
            return "aiter always rotates: norm-only requests are not served"
        if plan.d not in HEAD_SIZES:
            if plan.d == 64:
                return ("head size 64: one element per lane on 64-lane GPUs, and the kernel's neighbour exchange "
                        "then moves nothing (its output is uninitialized)")  # fmt: skip
            return f"head sizes 128 and 256 only (64/128/256 pass aiter's check), got {plan.d}"
        if plan.gemma:
            return "the pts entry hard-wires gemma_norm=false, and 1 + w is not exact in the weight dtype"
        if plan.q_fp8:
            return "writes q in the activation dtype only (no FP8 q)"
        if plan.cos_dtype != plan.dtype:
            return (f"reads cos/sin in the activation dtype {plan.dtype}: a {plan.cos_dtype} table is rejected "
                    "(before #3159) or reinterpreted (from #3159); rounding it would change cos and sin")  # fmt: skip
        if plan.rot != plan.d:
            if not self.caps.rotary_dim:
                return "partial rotary needs the rotary_dim parameter (aiter #2199)"
            why = _lanes_unsupported(plan.d, plan.rot, plan.is_neox)
            if why:
                return why
        return _cache_unsupported(plan, self.caps) if plan.has_cache else None

    def inputs_unsupported(self, plan: Any) -> str | None:
        """Why this entry cannot take ``plan``'s epsilons or table (both in the key)."""
        if plan.q_eps != plan.k_eps:
            return f"one eps for q and k, got q_epsilon={plan.q_eps} and k_epsilon={plan.k_eps}"
        if not plan.table_rows_contiguous:
            return "cos_sin_cache rows must be contiguous (row stride R)"
        return None

    def layout_unsupported(self, plan: Any) -> str | None:
        """Why this entry cannot address ``plan``'s caches (in the key; the probe may lower what it addresses)."""
        need = {"contiguous": ("contiguous",), "block": ("contiguous", "block")}.get(self.layout)
        if plan.has_cache and need is not None and plan.cache_layout not in need:
            what = "contiguous" if self.layout == "contiguous" else "contiguous within a block (dims >= 1)"
            return f"this aiter writes k_cache and v_cache as if {what}, got {plan.cache_layout} caches"
        return None

    def _weight(self, w: torch.Tensor | None, plan: Any) -> torch.Tensor:
        if w is not None:
            return w
        key = (plan.device, plan.dtype, plan.d)
        ones = self._ones.get(key)
        if ones is None:
            ones = self._ones[key] = torch.ones(plan.d, dtype=plan.dtype, device=plan.device)
        return ones

    def run(self, req: RopeRequest) -> None:
        plan = req.plan
        heads = plan.hq + plan.hk + (plan.hk if plan.has_cache else 0)
        step = _MAX_WARPS // heads
        for start in range(0, plan.t, step):
            self._launch(req, slice(start, min(plan.t, start + step)))

    def _launch(self, req: RopeRequest, sl: slice) -> None:
        plan = req.plan
        q, k = req.q[sl], req.k[sl]
        v = req.v[sl] if req.v is not None else None
        t, dev = q.shape[0], plan.device
        qkv = _packed(q, k, v)
        if qkv is None:
            qkv = torch.cat([q, k] if v is None else [q, k, v], dim=1).view(t, -1)
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []

        def staged(out: torch.Tensor) -> torch.Tensor:
            if out.is_contiguous():
                return out
            tmp = torch.empty(out.shape, dtype=out.dtype, device=dev)
            copies.append((out, tmp))
            return tmp

        q_out = staged(req.q_out[sl])
        pos = req.positions[sl].to(torch.int64).clamp(0, plan.max_pos - 1)  # type: ignore[index]
        if plan.has_cache:
            kc, vc, hv, bs = req.k_cache, req.v_cache, plan.hk, plan.block_size
            slots = req.slot_mapping[sl].to(torch.int64)  # type: ignore[index]
            slots = torch.where(slots < plan.num_slots, slots, -1)
        else:  # k through the cache path into k_out: slot t, one token per block
            kc = staged(req.k_out[sl]).view(t, 1, plan.hk, plan.d)  # type: ignore[index]
            vc, hv, bs = kc, 0, 1
            slots = torch.arange(t, dtype=torch.int64, device=dev)
        s = self._host_scale
        args = [qkv, self._weight(req.q_weight, plan), self._weight(req.k_weight, plan), req.cos_sin_cache, pos,
                t, plan.hq, plan.hk, hv, plan.d, plan.is_neox, plan.q_eps, q_out, kc, vc, slots, s, s,
                None, None, False, False, bs, 0]  # fmt: skip
        if self.caps.rotary_dim:
            args.append(0 if plan.rot == plan.d else plan.rot)
        self.fn(*args)
        for dst, src in copies:
            dst.copy_(src)
