"""What the fake ``fused_qk_norm_rope_cache_pts_quant_shuffle`` checks and computes, per aiter generation.

A model of aiter's host function (``csrc/kernels/fused_qk_norm_rope_cache_quant.cu``), its
launcher ``fused_rope_rms_set_kv`` and kernel ``fused_mrope_rms_kv_kernel``
(``csrc/kernels/rope/rope_common.h``), read at each cited commit (:class:`PtsRules` says which):

- Host checks: ``is_contiguous()`` of qkv, qw, kw, cos_sin, slot_mapping and (before #3492,
  2026-06-04) both caches; #3492 also accepts caches contiguous from dim 1; #4312 (2026-07-29)
  only a contiguous innermost dim. ``TORCH_CHECK`` (raises) before #3159 (2026-05-29),
  ``AITER_CHECK`` (aborts) from it on. Before #3159 ``data_ptr<scalar_t>()`` /
  ``data_ptr<int64_t>()`` reject other dtypes (RuntimeError) and the scales are read with
  ``.item()``; from #3159 on every pointer is ``reinterpret_cast`` (an fp32 table is read as the
  activation dtype, int32 indices as int64: the kernel reads past them, a GPU memory fault) and
  the scales by a host load of ``data_ptr()`` (a GPU tensor there: SIGSEGV).
- Launcher: head_size in {64, 128, 256} (``TORCH_CHECK``; ``AITER_CHECK`` from #4654,
  2026-08-10); from #4531 (2026-08-21) ``block_size`` a power of two or 0.
- Kernel: one warp per (token, head) of q, k, v; lane ``L`` holds elements
  ``[L*VEC, L*VEC + VEC)``, ``VEC = head_size / warp size`` (64 on gfx9, 32 on gfx12). Norm
  ``rnd((x * rsqrtf(sum(x^2)/D + eps)) * w)`` in the activation dtype (``hip_bfloat16`` /
  ``__half`` conversions round to nearest even). RoPE per lane: a lane is rotated when its
  first element is below ``rotary_dim``; NeoX pairs it with lane ``L +- (R/2)/VEC`` through
  ``warp_shfl_sync_vec``, which moves ``VEC*sizeof(T)/4`` words (none for VEC 1 in 16-bit
  types: the neighbour is garbage); GPT-J rotates ``VEC/2`` pairs of its own vector (none for
  VEC 1). cos/sin vectors are loaded at ``pos*R + offset`` of the flat table. Nothing checks
  that ``rotary_dim`` falls on lane boundaries. q goes to ``q_out`` at contiguous offsets;
  k and v for ``slot >= 0`` only, in the cache dtype (k_out too), at
  ``(slot*Hk + h)*D`` before #3640 (2026-06-12; #3492's block stride reaches only the shuffle
  layout), ``block*stride(0) + off*Hk*D + h*D`` from #3640, ``block*stride(0) + off*stride(1) +
  h*stride(2)`` from #4312. FP8 stores ``x / s`` before #4531 and ``x * (1/s)`` from it on.
  Slots and positions are not bounds-checked: past the memory they fault (abort here).

Values the hardware leaves unspecified (uninitialized registers) are NaN here, so a test sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..quant import fp8_max
from .fake_aiter_kernels import Check

__all__ = ["PtsRules", "pts"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@dataclass(frozen=True)
class PtsRules:
    """The rules of one aiter generation of the pts entry."""

    aborts: bool = True  # host checks are AITER_CHECK, pointers reinterpreted (#3159)
    layout: str = "strided"  # "contiguous" (#1551), "dim1" (#3492: accepted, written as contiguous), "block" (#3640), "strided" (#4312)
    launcher_aborts: bool = True  # head_size check in the launcher is AITER_CHECK (#4654)
    pow2_blocks: bool = True  # block_size must be a power of two (#4531)
    fp8_rcp: bool = True  # FP8 stored as x * (1/s) (#4531)
    wave: int = 64  # warp size of the GPU (64 on gfx942/gfx950, 32 on gfx12)


def _host_checks(a: dict[str, Any], c: Check, fault: Check, r: PtsRules) -> None:
    c(all(a[n].is_contiguous() for n in ("qkv", "qw", "kw", "cos_sin")), "Expected qkv, qw, kw, cos_sin contiguous")
    kc, vc = a["k_cache"], a["v_cache"]
    c(a["slot_mapping"].is_contiguous(), "Expected slot_mapping contiguous")
    if r.layout == "contiguous":
        c(kc.is_contiguous() and vc.is_contiguous(), "Expected k_cache, v_cache contiguous")
    elif r.layout in ("dim1", "block"):
        dim1 = all(t[0].is_contiguous() for t in (kc, vc))  # is_contiguous_from_dim1
        c((kc.is_contiguous() and vc.is_contiguous()) or dim1,
          "k_cache/v_cache must be contiguous within a block (dims >= 1)")  # fmt: skip
    else:
        c(kc.stride(-1) == 1 and vc.stride(-1) == 1, "k_cache/v_cache innermost (head_size) dim must be contiguous")
    c(a["positions"].dim() == 1, "positions must be 1D")
    for name in ("per_tensor_k_scale", "per_tensor_v_scale"):
        s = a[name]
        if r.aborts:  # *reinterpret_cast<float*>(data_ptr()) on the host
            fault(s.device.type == "cpu", f"SIGSEGV: host load of {name}'s device pointer")
        elif s.numel() != 1:
            raise RuntimeError(f"a Tensor with {s.numel()} elements cannot be converted to Scalar")


def _typed(a: dict[str, Any], c: Check, fault: Check, r: PtsRules, fp8: torch.dtype) -> None:
    """``data_ptr<scalar_t>()`` before #3159 (RuntimeError), reinterpretation from it on."""
    dtype = a["qkv"].dtype
    c(dtype in (torch.float32, torch.float16, torch.bfloat16), f"not implemented for dtype {dtype}")
    kv = a["k_cache"].dtype
    allowed = (dtype, fp8) if r.aborts else (dtype, *_FP8)
    c(kv in allowed, f"Unsupported KV cache dtype: {kv}")
    for name in ("qw", "kw", "cos_sin", "q_out"):
        if a[name].dtype != dtype and not r.aborts:
            raise RuntimeError(f"expected scalar type {dtype} but found {a[name].dtype} ({name})")
    for name in ("positions", "slot_mapping"):
        if a[name].dtype != torch.int64:
            if not r.aborts:
                raise RuntimeError(f"expected scalar type Long but found {a[name].dtype} ({name})")
            fault(False, f"Memory access fault by GPU: {name} ({a[name].dtype}) read as int64")


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """warp_rms_norm_: ``rnd((x * rsqrtf(acc/D + eps)) * w)`` per head, x ``[T, H, D]``."""
    xf = x.float()
    r = torch.rsqrt(torch.sum(xf * xf, dim=-1, keepdim=True) / x.shape[-1] + torch.tensor(eps, dtype=torch.float32))
    return (xf * r * w.float()).to(x.dtype)


def _fma_sub(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, sign: float) -> torch.Tensor:
    """``a*b + sign*(c*d)`` as the compiler contracts it: ``fma(a, b, sign*rnd32(c*d))``."""
    return (a.double() * b.double() + sign * (c * d).double()).float()


def _table(cos_sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The flat table as the kernel reads it (an fp32 table reinterpreted), NaN past its end."""
    flat = cos_sin.reshape(-1)
    if flat.dtype != dtype:
        flat = flat.view(torch.uint8).view(dtype)
    return torch.cat([flat.float(), torch.full((1024,), float("nan"))])


def _rope(u: torch.Tensor, flat: torch.Tensor, base: torch.Tensor, rot: int, neox: bool, r: PtsRules) -> torch.Tensor:
    """The kernel's per-lane rotation of ``u [T, H, D]`` (activation dtype); returns fp32 ``[T, H, D]``."""
    d = u.shape[-1]
    vec = d // r.wave
    words = vec * u.element_size() // 4  # warp_shfl_sync_vec moves this many 32-bit words
    half = rot // 2
    uf = u.float()
    out = uf.clone()
    nan = torch.full((*u.shape[:-1], vec), float("nan"))

    def load(off: int) -> torch.Tensor:  # a VEC-element vector at pos*R + off: [T, 1, VEC]
        idx = base[:, None] + off + torch.arange(vec)
        return flat[idx][:, None, :]

    for lane in range(r.wave):
        a = lane * vec
        if a >= rot:
            continue  # lanes from rotary_dim on pass through
        x = uf[..., a : a + vec]
        if neox:
            step = half // vec
            nb = (lane + step if a < half else lane - step) % r.wave
            b = nb * vec
            cs = load(a).expand_as(x)
            nb_cs = load(b).expand_as(x) if b < rot else nan
            nb_x = uf[..., b : b + vec]
            if words == 0:
                nb_cs, nb_x = nan, nan
            if a < half:
                out[..., a : a + vec] = _fma_sub(x, cs, nb_x, nb_cs, -1.0)
            else:
                out[..., a : a + vec] = _fma_sub(x, nb_cs, nb_x, cs, 1.0)
        else:
            cos, sin = load(a // 2), load(a // 2 + half)
            res = torch.full_like(x, float("nan"))
            for i in range(vec // 2):
                x0, x1 = x[..., 2 * i], x[..., 2 * i + 1]
                res[..., 2 * i] = _fma_sub(x0, cos[..., i], x1, sin[..., i], -1.0)
                res[..., 2 * i + 1] = _fma_sub(x1, cos[..., i], x0, sin[..., i], 1.0)
            out[..., a : a + vec] = res
    return out


def _to_cache(z: torch.Tensor, dtype: torch.dtype, scale: float, r: PtsRules) -> torch.Tensor:
    """vec_t::from_: a copy in the activation dtype, else FP8 of ``x / s`` (``x * (1/s)`` from #4531)."""
    if dtype not in _FP8:
        return z.to(dtype)
    s = torch.tensor(scale, dtype=torch.float32)
    v = z.float() * (1.0 / s) if r.fp8_rcp else z.float() / s
    return torch.clamp(v, -fp8_max(dtype), fp8_max(dtype)).to(dtype)


def _store(cache: torch.Tensor, slots: torch.Tensor, vals: torch.Tensor, bs: int, r: PtsRules, fault: Check) -> None:
    """Write ``vals [T, H, D]`` at the slots ``>= 0``, at the offsets the generation computes."""
    t, h, d = vals.shape
    size = cache.untyped_storage().nbytes() // cache.element_size() - cache.storage_offset()
    storage = torch.as_strided(cache, (size,), (1,))  # the memory from the cache's first element on
    for ti in range(t):
        slot = int(slots[ti])
        if slot < 0:
            continue
        if r.layout in ("contiguous", "dim1"):
            base, tok, head = slot * h * d, 0, d
        else:
            block, off = divmod(slot, bs)
            tok, head = (h * d, d) if r.layout == "block" else (cache.stride(1), cache.stride(2))
            base, tok = block * cache.stride(0) + off * tok, 0
        for hi in range(h):
            at = base + hi * head
            fault(0 <= at and at + d <= storage.numel(), f"Memory access fault by GPU: slot {slot} writes past the cache")
            storage[at : at + d] = vals[ti, hi]


def pts(a: dict[str, Any], fp8: torch.dtype, r: PtsRules, abort_process: bool) -> None:
    """``fused_qk_norm_rope_cache_pts_quant_shuffle`` (NHD caches; the shuffle layout is not modelled)."""
    c = Check(r.aborts, abort_process, "fused_qk_norm_rope_cache_pts_quant_shuffle")
    fault = Check(True, abort_process, "GPU:")  # a GPU memory fault or SIGSEGV ends the process too
    _host_checks(a, c, fault, r)
    _typed(a, c, fault, r, fp8)
    d = a["head_size"]
    launch = Check(r.launcher_aborts, abort_process, "fused_rope_rms_set_kv")
    launch(d in (64, 128, 256), f"head_size must be 64, 128 or 256, got {d}")
    bs = a["block_size"]
    launch(not r.pow2_blocks or bs == 0 or bs & (bs - 1) == 0, f"block_size must be a power of 2, got {bs}")
    if a["use_shuffle_layout"]:
        raise NotImplementedError("the fake models the NHD layout only")
    t, hq, hk, hv = a["num_tokens"], a["num_heads_q"], a["num_heads_k"], a["num_heads_v"]
    qkv = a["qkv"]
    dtype = qkv.dtype
    rot = a.get("rotary_dim", 0) or d
    heads = qkv.reshape(-1)[: t * (hq + hk + hv) * d].view(t, hq + hk + hv, d)
    pos = a["positions"]
    fault(bool(((pos >= 0) & (pos * rot < a["cos_sin"].numel())).all()), "Memory access fault by GPU: position past cos_sin")
    flat, base = _table(a["cos_sin"], dtype), pos * rot
    q = _rope(_norm(heads[:, :hq], a["qw"], a["eps"]), flat, base, rot, a["is_neox_style"], r)
    k = _rope(_norm(heads[:, hq : hq + hk], a["kw"], a["eps"]), flat, base, rot, a["is_neox_style"], r)
    q_out = a["q_out"]
    torch.as_strided(q_out, (t, hq, d), (hq * d, d, 1)).copy_(q.to(dtype))  # contiguous offsets, never checked
    kc, vc, slots = a["k_cache"], a["v_cache"], a["slot_mapping"]
    ks, vs = float(a["per_tensor_k_scale"].reshape(-1)[0]), float(a["per_tensor_v_scale"].reshape(-1)[0])
    kv = _to_cache(k.to(dtype), kc.dtype, ks, r)
    _store(kc, slots, kv, bs, r, fault)
    if hv:
        _store(vc, slots, _to_cache(heads[:, hq + hk :], vc.dtype, vs, r), bs, r, fault)
    if a["return_kv"] and a["k_out"] is not None:
        k_out = torch.as_strided(a["k_out"], (t, hk, d), (hk * d, d, 1))
        for ti in range(t):
            if int(slots[ti]) >= 0:
                k_out[ti] = kv[ti]
