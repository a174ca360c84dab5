"""Fake aiter packages with the rope/cache entry ``fused_qk_norm_rope_cache_pts_quant_shuffle``, per generation.

Each kind is the fake of :mod:`qknorm.testing.fake_aiter` of the same time (its fused Q/K
RMSNorm entries, or none before #2442) plus, in ``aiter/ops/fused_qk_norm_rope_cache_quant.py``,
the pts entry with that generation's signature and rules
(:class:`~qknorm.testing.fake_aiter_rope_kernel.PtsRules`; the model of the C++ is in
:mod:`qknorm.testing.fake_aiter_rope_kernel`), the main ``fused_qk_norm_rope_cache_quant_shuffle``
(5-D shuffle caches only: qknorm must never call it), and the excerpts of the C++ sources
that aiter's JIT compiles (``aiter_meta/csrc``, found through ``aiter.jit.core.AITER_CSRC_DIR``)
which tell the generations apart where the Python signature does not.

Kinds (:data:`ROPE_KINDS`), each the aiter commit range it stands for:

- ``pts_v1551``: #1551 (2026-02-04) to #2199 - no ``rotary_dim`` (full rotary only),
  ``TORCH_CHECK`` host checks (raise), contiguous caches, scales read with ``.item()``.
- ``pts_v2199``: #2199 (2026-03-21) to #3159 - ``rotary_dim=0`` (0: the head size); lane
  alignment of a partial rotary dim never checked.
- ``pts_v3159``: #3159 (2026-05-29) to #3492 - ``AITER_CHECK`` (abort), pointers reinterpreted,
  scales loaded on the host from ``data_ptr()``.
- ``pts_v3492``: #3492 (2026-06-04) to #3640 - caches contiguous from dim 1 (vLLM's unbind
  views) accepted by the host, written by the kernel as if contiguous.
- ``pts_v3640``: #3640 (2026-06-12) to #4312 - the kernel honours the block stride.
- ``pts_v4312``: #4312 (2026-07-29) to #4531 - block, token and head strides honoured (HND views).
- ``pts_v4531``: #4531 (2026-08-21) to e4048607 (2026-08-22) - ``block_size`` a power of two
  (abort otherwise; the launcher's checks abort since #4654), FP8 stored as ``x * (1/s)``.
- ``pts_no_csrc``: ``pts_v4531`` installed without its C++ sources (qknorm cannot read the
  generation: it must assume the oldest rules the signature allows).
- ``pts_drifted``: ``pts_v4531`` whose pts entry gained a required parameter (not bound).

``arch``: ``"gfx942"`` / ``"gfx950"`` (warp size 64, FP8 e4m3fnuz / e4m3fn) or ``"gfx1201"``
(warp size 32, e4m3fn).

Usage::

    with fake_aiter_rope.install("pts_v4531") as fake:
        qknorm.qk_norm_rope(...)              # served by the fake through qknorm's aiter backend
        assert fake.calls == ["pts"]
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backends import registry
from . import fake_aiter
from .fake_aiter_rope_kernel import PtsRules, pts

__all__ = ["ROPE_KINDS", "FakeAiterRope", "install", "write_fake_aiter_rope"]

_PARAMS = ("qkv, qw, kw, cos_sin, positions, num_tokens, num_heads_q, num_heads_k, num_heads_v, head_size, "
           "is_neox_style, eps, q_out, k_cache, v_cache, slot_mapping, per_tensor_k_scale, per_tensor_v_scale, "
           "k_out, v_out, return_kv, use_shuffle_layout, block_size, x")  # fmt: skip
_MAIN = '''
def fused_qk_norm_rope_cache_quant_shuffle(q, k, v, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, qw, kw,
                                           cos_sin_cache, is_neox_style, pos_ids, k_cache, v_cache, slot_mapping,
                                           kv_cache_dtype, k_scale, v_scale):
    raise AssertionError("the 5-D shuffle-cache entry serves no NHD request: qknorm must not call it")
'''
# Lines of the C++ sources that set the generations apart (the binder looks for them).
_HOST_CHECK = {False: "TORCH_CHECK(qkv.is_contiguous() && qw.is_contiguous() && kw.is_contiguous() &&",
               True: "AITER_CHECK(qkv.is_contiguous() && qw.is_contiguous() && kw.is_contiguous() &&"}  # fmt: skip
_DIM1 = "AITER_CHECK(is_contiguous_from_dim1(k_cache) && is_contiguous_from_dim1(v_cache),"
_BLOCK = "const int64_t block_stride = (k_block_stride != 0)"
_STRIDES = "const int64_t tok_stride  = (k_token_stride != 0) ? k_token_stride : slot_size;"
_POW2 = 'AITER_CHECK(block_size == 0 || (block_size & (block_size - 1)) == 0, "block_size must be a power of 2, got "'

CALLS: list[str] = []  # fake rope entries called since install()


@dataclass(frozen=True)
class _Kind:
    base: str  # the fake_aiter kind of the same time
    rules: PtsRules
    rotary_dim: bool = True
    csrc: bool = True
    drifted: bool = False


_V4531 = PtsRules()
_OLD = dict(launcher_aborts=False, pow2_blocks=False, fp8_rcp=False)
_KINDS = {
    "pts_v1551": _Kind("missing_module", PtsRules(aborts=False, layout="contiguous", **_OLD), rotary_dim=False),
    "pts_v2199": _Kind("missing_module", PtsRules(aborts=False, layout="contiguous", **_OLD)),
    "pts_v3159": _Kind("unified_v15", PtsRules(layout="contiguous", **_OLD)),
    "pts_v3492": _Kind("unified", PtsRules(layout="dim1", **_OLD)),
    "pts_v3640": _Kind("unified", PtsRules(layout="block", **_OLD)),
    "pts_v4312": _Kind("unified", PtsRules(layout="strided", **_OLD)),
    "pts_v4531": _Kind("unified", _V4531),
    "pts_no_csrc": _Kind("unified", _V4531, csrc=False),
    "pts_drifted": _Kind("unified", _V4531, drifted=True),
}
ROPE_KINDS = tuple(_KINDS)


def _wave(arch: str) -> int:
    return 32 if arch.startswith("gfx12") else 64


def _sources(k: _Kind) -> dict[str, str]:
    r = k.rules
    host = [_HOST_CHECK[r.aborts]] + ([_DIM1] if r.layout in ("dim1", "block") else [])
    rope = ([_BLOCK] if r.layout in ("block", "strided") else []) + ([_STRIDES] if r.layout == "strided" else [])
    rope += [_POW2] if r.pow2_blocks else []
    note = "// excerpt written by qknorm.testing.fake_aiter_rope\n"
    return {"kernels/fused_qk_norm_rope_cache_quant.cu": note + "\n".join(host) + "\n",
            "kernels/rope/rope_common.h": note + "\n".join(rope) + "\n"}  # fmt: skip


def write_fake_aiter_rope(root: str | Path, kind: str = "pts_v4531", *, arch: str = "gfx950",
                          aborts: bool = False) -> Path:  # fmt: skip
    """Write the fake ``aiter`` of ``kind`` (one of :data:`ROPE_KINDS`) under ``root``; returns ``root``.

    ``aborts=True``: a failed ``AITER_CHECK`` (or a modelled GPU fault) calls ``os.abort()``,
    for tests run in a subprocess; otherwise it raises :class:`~qknorm.testing.fake_aiter.AiterAbort`.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {list(ROPE_KINDS)}, got {kind!r}")
    k = _KINDS[kind]
    root = Path(root)
    fake_aiter.write_fake_aiter(root, k.base, arch=arch, aborts=aborts)
    _write_rope(root, kind, arch, aborts)
    return root


def _write_rope(root: Path, kind: str, arch: str, aborts: bool) -> None:
    k = _KINDS[kind]
    ops = root / "aiter" / "ops" / "fused_qk_norm_rope_cache_quant.py"
    text = ops.read_text() if ops.exists() else '"""Fake aiter module (qknorm.testing.fake_aiter_rope)."""\n'
    params = _PARAMS + (", cu_q_len" if k.drifted else "") + (", rotary_dim=0" if k.rotary_dim else "")
    text += "\nfrom qknorm.testing import fake_aiter_rope as _rope_fake\n" + _MAIN
    text += f"\n\ndef fused_qk_norm_rope_cache_pts_quant_shuffle({params}):\n"
    text += f"    return _rope_fake.call({kind!r}, {arch!r}, locals(), {aborts!r})\n"
    ops.write_text(text)
    jit = root / "aiter" / "jit"
    jit.mkdir(parents=True, exist_ok=True)
    (jit / "__init__.py").write_text("")
    (jit / "core.py").write_text(
        "import os\n\nAITER_ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))\n"
        "AITER_META_DIR = os.path.join(AITER_ROOT_DIR, 'aiter_meta')\nAITER_CSRC_DIR = f'{AITER_META_DIR}/csrc'\n"
    )
    if k.csrc:
        for rel, src in _sources(k).items():
            path = root / "aiter_meta" / "csrc" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(src)


def call(kind: str, arch: str, args: dict[str, Any], aborts: bool = False) -> None:
    """Run the fake pts entry of ``kind`` with its bound arguments (called by the fake package)."""
    CALLS.append("pts")
    rules = _KINDS[kind].rules
    rules = PtsRules(**{**rules.__dict__, "wave": _wave(arch)})
    pts(dict(args), fake_aiter.fp8_dtype(arch), rules, aborts)


@dataclass
class FakeAiterRope:
    """Handle of an installed rope fake (see :func:`install`)."""

    kind: str
    arch: str
    root: Path

    @property
    def calls(self) -> list[str]:
        """Fake rope entries called since install (``"pts"`` per call)."""
        return list(CALLS)

    @property
    def fp8_dtype(self) -> torch.dtype:
        return fake_aiter.fp8_dtype(self.arch)


@contextmanager
def install(kind: str = "pts_v4531", *, arch: str = "gfx950", cpu: bool = True,
            aborts: bool = False) -> Iterator[FakeAiterRope]:  # fmt: skip
    """Make the fake aiter of ``kind`` importable as ``aiter`` for the duration of the block.

    As :func:`qknorm.testing.fake_aiter.install` (whose fake of the same time it extends), and
    with ``cpu=True`` the ``aiter`` backend of ``qk_norm_rope`` also serves CPU tensors (a test
    hook: production never routes CPU tensors to aiter). Everything is restored on exit.
    """
    from ..rope.aiter_backend import RopeAiterBackend
    from ..rope.ops import OP

    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {list(ROPE_KINDS)}, got {kind!r}")
    with fake_aiter.install(_KINDS[kind].base, arch=arch, cpu=cpu, aborts=aborts) as base:
        _write_rope(base.root, kind, arch, aborts)
        importlib.invalidate_caches()
        previous = None
        if cpu:
            previous = registry.register_backend("aiter", lambda: RopeAiterBackend(device_types=("cuda", "cpu")), op=OP)
        CALLS.clear()
        try:
            yield FakeAiterRope(kind, arch, base.root)
        finally:
            if cpu:
                registry.register_backend("aiter", previous, op=OP)

