"""Fake ``aiter`` packages, for testing an integration with aiter on a machine without a ROCm GPU.

Each fake is a real package tree (``aiter/``, ``aiter/ops/...``) written to a directory. Its
entry points have the exact signatures of one aiter generation and compute with PyTorch on
whatever device the tensors are on (the math of :mod:`qknorm.reference`), reproducing that
generation's quirks: the unified ``No`` mode ignores ``q_residual``, ``gemma_norm`` and
``q_out_unquantized``; ``per_Tensor`` raises ``NotImplementedError``; scales are written by
raw offset (``i * G + g``, ``g * m + i`` when transposed) whatever the scale tensor's strides;
tensors must be 16-byte aligned (base and row stride), as aiter's vector loads assume;
FP8 outputs must have ``aiter.dtypes.fp8`` (e4m3fnuz for ``arch="gfx942"``, e4m3fn for
``"gfx950"``); the legacy entry returns new tensors.

Working kinds (:data:`WORKING_KINDS`):

- ``unified``: aiter v0.1.16 - the unified ``fused_qk_rmsnorm`` with ``QuantType``, group and
  per-token quant entries, the private ``_fused_qk_rmsnorm``; fp4x2.
- ``group_quant``: v0.1.13 - ``fused_qk_rmsnorm_group_quant`` with ``gemma_norm`` but no
  no-quant mode, and the legacy public ``fused_qk_rmsnorm``; fp4x2.
- ``group_quant_v12``: v0.1.12 - as above without ``gemma_norm`` and without fp4x2.
- ``private``: only ``_fused_qk_rmsnorm`` (a v0.1.14 install missing its group-quant module).
- ``legacy``: v0.1.11 - only the 6-argument public ``fused_qk_rmsnorm``.
- ``drifted_unified``: v0.1.16 whose ``fused_qk_rmsnorm`` has a signature of another shape
  (the other entries intact): binding must go by signature, not by name.

Broken kinds (:data:`BROKEN_KINDS`): ``missing_module`` (aiter without the fused modules),
``renamed_symbol``, ``changed_signature``, ``import_oserror`` (``import aiter`` raises
``OSError``), ``runtime_error`` (every kernel call raises a HIP error), ``jit_build_failure``
(every call raises aiter's JIT build failure, as on first use with a broken toolchain).

Usage in a test (the fake is importable as ``aiter`` inside the block; qknorm's ``aiter``
backend is made eligible for CPU tensors, which production never does)::

    from qknorm.testing import fake_aiter

    def test_engine_on_aiter_v0_1_16(monkeypatch):
        monkeypatch.setenv("QKNORM_BACKEND", "aiter,torch")
        with fake_aiter.install("unified", arch="gfx942") as fake:
            run_my_engine_layer()               # qknorm calls now reach the fake aiter
            assert "unified" in fake.calls

Inside the block ``import aiter`` gives the fake too, so an engine's own aiter code paths run
against it. For a subprocess, ``write_fake_aiter(tmp_path, "import_oserror")`` and put ``tmp_path``
first on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backends import registry
from ..reference import fp8_quantize, mxfp4_quantize, rms_norm_fp32

__all__ = ["WORKING_KINDS", "BROKEN_KINDS", "KINDS", "FakeAiter", "install", "write_fake_aiter", "fp8_dtype"]

WORKING_KINDS = ("unified", "group_quant", "group_quant_v12", "private", "legacy", "drifted_unified")
BROKEN_KINDS = (
    "missing_module",
    "renamed_symbol",
    "changed_signature",
    "import_oserror",
    "runtime_error",
    "jit_build_failure",
)
KINDS = WORKING_KINDS + BROKEN_KINDS

_CALLS: list[str] = []  # entry names called since install()
_IMPORTS: list[str] = []  # one item per execution of the fake's aiter/__init__.py


def fp8_dtype(arch: str) -> torch.dtype:
    """The FP8 flavour aiter writes on ``arch``: e4m3fnuz on gfx942 (MI300), e4m3fn on gfx950 (MI350)."""
    return torch.float8_e4m3fnuz if arch.startswith("gfx94") else torch.float8_e4m3fn


# ----------------------------------------------------------------------------- package sources

_OPT = "q_out_unquantized=None, k_out=None, q_res_out=None, k=None, k_weight=None, k_epsilon=None, q_residual=None"
_DEFS = {
    "unified": f"""
def fused_qk_rmsnorm(q_out_quantized=None, q_out_scale=None, q=None, q_weight=None, q_epsilon=1e-6, {_OPT},
                     gemma_norm=False, quant_type=QuantType.No, group_size=None, transpose_scale=False):
    return _fake.call(_KIND, _ARCH, "unified", locals())
""",
    "group_quant_v14": f"""
def fused_qk_rmsnorm_group_quant(q_out_quantized=None, q_out_scale=None, q=None, q_weight=None, q_epsilon=1e-6,
                                 {_OPT}, group_size=128, transpose_scale=False, gemma_norm=False):
    return _fake.call(_KIND, _ARCH, "group_quant_v14", locals())
""",
    "group_quant_v13": f"""
def fused_qk_rmsnorm_group_quant(q_out_quantized, q_out_scale, q, q_weight, q_epsilon=1e-6, {_OPT},
                                 group_size=128, transpose_scale=False, gemma_norm=False):
    return _fake.call(_KIND, _ARCH, "group_quant_v13", locals())
""",
    "group_quant_v12": f"""
def fused_qk_rmsnorm_group_quant(q_out_quantized, q_out_scale, q, q_weight, q_epsilon=1e-6, {_OPT},
                                 group_size=128, transpose_scale=False):
    return _fake.call(_KIND, _ARCH, "group_quant_v12", locals())
""",
    "per_token": f"""
def fused_qk_rmsnorm_per_token_quant(q_out_quantized, q_out_scale, q, q_weight, q_epsilon, {_OPT}, gemma_norm=False):
    return _fake.call(_KIND, _ARCH, "per_token", locals())
""",
    "private": """
def _fused_qk_rmsnorm(q_out, q, q_weight, q_eps, k_out, k, k_weight, k_eps):
    return _fake.call(_KIND, _ARCH, "private", locals())
""",
    "legacy": """
def fused_qk_rmsnorm(q, q_weight, q_eps, k, k_weight, k_eps):
    return _fake.call(_KIND, _ARCH, "legacy", locals())
""",
    # Drifted and broken shapes.
    "unified_drifted": """
def fused_qk_rmsnorm(q, q_weight, q_epsilon, k=None, k_weight=None, k_epsilon=None, *, out_q=None, out_k=None):
    raise AssertionError("qknorm must not call an entry whose signature it does not recognize")
""",
    "renamed": """
def fused_qk_rms_norm(q_out_quantized=None, q_out_scale=None, q=None, q_weight=None, q_epsilon=1e-6):
    raise AssertionError("renamed entry called")

def fused_qk_rmsnorm_group_quantize(q_out_quantized, q_out_scale, q, q_weight, q_epsilon=1e-6):
    raise AssertionError("renamed entry called")
""",
    "renamed_rope": """
def fused_qk_rms_norm_legacy(q, q_weight, q_eps, k, k_weight, k_eps):
    raise AssertionError("renamed entry called")
""",
    "changed_gq": """
def fused_qk_rmsnorm_group_quant(q, q_weight, q_epsilon, q_out_quantized, q_out_scale, group_size=128):
    raise AssertionError("entry with a changed signature called")
""",
    "changed_rope": """
def fused_qk_rmsnorm(x, weight, eps, out=None):
    raise AssertionError("entry with a changed signature called")

def _fused_qk_rmsnorm(q_out, q, q_weight, q_eps, k_out, k, k_weight, k_eps, cos_sin_cache):
    raise AssertionError("entry with a changed signature called")
""",
}


@dataclass(frozen=True)
class _Tree:
    version: str
    gq: tuple[str, ...] | None  # _DEFS keys in aiter/ops/fused_qk_rmsnorm_group_quant.py (None: no module)
    rope: tuple[str, ...] | None  # _DEFS keys in aiter/ops/fused_qk_norm_rope_cache_quant.py
    fp4: bool = True
    enum: bool = True
    import_error: bool = False


_V16 = _Tree("0.1.16", ("unified", "group_quant_v14", "per_token"), ("private",))
_TREES = {
    "unified": _V16,
    "group_quant": _Tree("0.1.13", ("group_quant_v13",), ("legacy",), enum=False),
    "group_quant_v12": _Tree("0.1.12", ("group_quant_v12",), ("legacy",), fp4=False, enum=False),
    "private": _Tree("0.1.14", None, ("private",), fp4=False),
    "legacy": _Tree("0.1.11", None, ("legacy",), fp4=False, enum=False),
    "drifted_unified": _Tree("0.1.16", ("unified_drifted", "group_quant_v14", "per_token"), ("private",)),
    "missing_module": _Tree("0.1.10", None, None, enum=False),
    "renamed_symbol": _Tree("0.1.99", ("renamed",), ("renamed_rope",)),
    "changed_signature": _Tree("0.2.0", ("changed_gq",), ("changed_rope",)),
    "import_oserror": _Tree("0.1.16", None, None, import_error=True),
    "runtime_error": _V16,
    "jit_build_failure": _V16,
}


def _module(kind: str, arch: str, defs: tuple[str, ...], imports: str = "") -> str:
    head = f'"""Fake aiter module (qknorm.testing.fake_aiter, kind {kind!r})."""\n'
    head += f"from qknorm.testing import fake_aiter as _fake\n{imports}\n_KIND = {kind!r}\n_ARCH = {arch!r}\n"
    return head + "".join(_DEFS[d] for d in defs)


def write_fake_aiter(root: str | Path, kind: str = "unified", *, arch: str = "gfx950") -> Path:
    """Write the fake ``aiter`` package of ``kind`` under ``root`` (put ``root`` on ``sys.path``).

    Parameters
    ----------
    root : str or Path
        Directory receiving ``aiter/``; created if missing.
    kind : str
        One of :data:`KINDS`.
    arch : str
        ``"gfx942"`` (FP8 e4m3fnuz) or ``"gfx950"`` (FP8 e4m3fn): what ``aiter.dtypes.fp8`` reports.

    Returns
    -------
    Path
        ``root``.
    """
    if kind not in _TREES:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    tree = _TREES[kind]
    root = Path(root)
    pkg = root / "aiter"
    for sub in ("", "ops", "utility"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
    init = f'"""Fake aiter {tree.version} (qknorm.testing.fake_aiter, kind {kind!r}, arch {arch})."""\n'
    init += f"from qknorm.testing import fake_aiter as _fake\n\n_fake._IMPORTS.append({kind!r})\n"
    if tree.import_error:
        init += 'raise OSError("libamdhip64.so: cannot open shared object file: No such file or directory")\n'
    init += f"__version__ = {tree.version!r}\nfrom .utility import dtypes\n"
    files = {
        "__init__.py": init,
        "ops/__init__.py": "",
        "utility/__init__.py": "",
        "utility/dtypes.py": (
            "import torch\n\n"
            f"fp8 = torch.{str(fp8_dtype(arch)).removeprefix('torch.')}\n"
            + ('fp4x2 = getattr(torch, "float4_e2m1fn_x2", torch.uint8)\n' if tree.fp4 else "")
        ),
    }
    if tree.enum:
        files["ops/enum.py"] = textwrap.dedent(
            """\
            import enum

            class QuantType(enum.IntEnum):
                No = 0
                per_Tensor = 1
                per_Token = 2
                per_1x32 = 3
                per_1x128 = 4
                per_128x128 = 5
                per_256x128 = 6
                per_1024x128 = 7
            """
        )
    if tree.gq is not None:
        enum_import = "from .enum import QuantType\n" if "unified" in tree.gq else ""
        files["ops/fused_qk_rmsnorm_group_quant.py"] = _module(kind, arch, tree.gq, enum_import)
    if tree.rope is not None:
        files["ops/fused_qk_norm_rope_cache_quant.py"] = _module(kind, arch, tree.rope)
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    return root


# ----------------------------------------------------------------------------- the fake kernels


def _check(ok: bool, msg: str) -> None:
    """aiter's C++ ``TORCH_CHECK`` surfaces as RuntimeError."""
    if not ok:
        raise RuntimeError(msg)


def _raw(t: torch.Tensor, numel: int) -> torch.Tensor:
    """The ``numel`` elements at ``t``'s data pointer, as a kernel writing by offset sees them."""
    return torch.as_strided(t, (numel,), (1,), t.storage_offset())


def _norms(a: dict[str, Any], residual: bool, gemma: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 ``y_q`` (and ``y_k``); writes ``q_res_out`` when ``residual``."""
    q, k = a["q"], a["k"]
    x = q.float()
    if residual and a["q_residual"] is not None:
        x = x + a["q_residual"].float()
    y = rms_norm_fp32(x, a["q_weight"], float(a["q_epsilon"]), gemma)
    yk = None
    if k is not None:
        k_eps = a["k_epsilon"] if a["k_epsilon"] is not None else a["q_epsilon"]
        yk = rms_norm_fp32(k.float(), a["k_weight"], float(k_eps), gemma)
    if residual and a["q_residual"] is not None:
        a["q_res_out"].copy_(x.to(q.dtype))
    return y, yk


def _write_plain(a: dict[str, Any], q_out: torch.Tensor, y: torch.Tensor, yk: torch.Tensor | None) -> None:
    q_out.copy_(y.to(a["q"].dtype))
    if yk is not None:
        a["k_out"].copy_(yk.to(a["q"].dtype))


def _group(a: dict[str, Any], fp8: torch.dtype, *, no_quant: bool, gemma: bool, fp4: bool) -> None:
    """``fused_qk_rmsnorm_group_quant`` of the given generation."""
    gs, scale, qo = int(a["group_size"]), a["q_out_scale"], a["q_out_quantized"]
    if scale is None:
        if not no_quant:
            raise TypeError("fused_qk_rmsnorm_group_quant(): argument 'q_out_scale' must be Tensor, not NoneType")
        if a["q_out_unquantized"] is None:
            raise ValueError("q_out_unquantized must be provided when q_out_scale is None (no-quant mode)")
        y, yk = _norms(a, residual=False, gemma=False)  # aiter's no-quant path ignores residual and gemma
        _write_plain(a, a["q_out_unquantized"], y, yk)
        return
    fp4_dtype = getattr(torch, "float4_e2m1fn_x2", torch.uint8) if fp4 else None
    if qo.dtype not in (fp8, fp4_dtype):
        raise ValueError(f"fused_qk_rmsnorm_group_quant currently supports fp8/fp4x2 output quant only; got {qo.dtype}")
    m, n1 = a["q"].shape
    groups = n1 // gs
    _check(n1 % gs == 0, "inp1.size(1) must be divisible by group_size for group quant")
    _check(
        scale.dim() == 2 and tuple(scale.shape) == (m, groups), f"out1_scale shape mismatch, expected [{m}, {groups}]"
    )
    y, yk = _norms(a, residual=True, gemma=gemma and bool(a.get("gemma_norm")))
    if qo.dtype == fp8:
        _check(scale.dtype == torch.float32, "out1_scale dtype must be float32 for fp8 path")
        codes, scales = fp8_quantize(y, gs, fp8)
        qo.copy_(codes)
    else:
        _check(scale.dtype == torch.uint8, "out1_scale dtype must be uint8 for fp4x2 path")
        _check(not a["transpose_scale"], "fp4x2 path currently does not support transpose_scale=true")
        codes, scales = mxfp4_quantize(y, gs)
        qo.view(torch.uint8).copy_(codes)
    flat = scales.t().reshape(-1) if a["transpose_scale"] else scales.reshape(-1)
    _raw(scale, m * groups).copy_(flat.to(scale.dtype))
    if a["q_out_unquantized"] is not None:
        a["q_out_unquantized"].copy_(y.to(a["q"].dtype))
    if yk is not None:
        a["k_out"].copy_(yk.to(a["q"].dtype))


def _per_token(a: dict[str, Any], fp8: torch.dtype) -> None:
    qo, scale = a["q_out_quantized"], a["q_out_scale"]
    if qo.dtype != fp8:
        raise ValueError(f"fused_qk_rmsnorm_per_token_quant currently supports fp8 output quant only; got {qo.dtype}")
    if scale.dim() != 2 or scale.size(1) != 1:
        raise ValueError("fused_qk_rmsnorm_per_token_quant expects q_out_scale with shape [m, 1]")
    y, yk = _norms(a, residual=True, gemma=bool(a["gemma_norm"]))
    codes, scales = fp8_quantize(y, y.shape[1], fp8)
    qo.copy_(codes)
    _raw(scale, y.shape[0]).copy_(scales.reshape(-1))
    if a["q_out_unquantized"] is not None:
        a["q_out_unquantized"].copy_(y.to(a["q"].dtype))
    if yk is not None:
        a["k_out"].copy_(yk.to(a["q"].dtype))


def _unified(a: dict[str, Any], fp8: torch.dtype) -> None:
    qt = int(a["quant_type"])
    if qt == 0:
        # aiter's No mode: the normalized q goes to q_out_quantized; q_residual, gemma_norm and
        # q_out_unquantized are ignored (SPEC §6).
        y, yk = _norms(a, residual=False, gemma=False)
        _write_plain(a, a["q_out_quantized"], y, yk)
        return
    if qt == 1:
        raise NotImplementedError("fused_qk_rmsnorm: per_Tensor quantization is not implemented")
    if qt == 2:
        _per_token(a, fp8)
        return
    group_size = a["group_size"] if a["group_size"] is not None else (32 if qt == 3 else 128)
    _group({**a, "group_size": group_size}, fp8, no_quant=True, gemma=True, fp4=True)


def _plain_qk(a: dict[str, Any], q_out: torch.Tensor | None, k_out: torch.Tensor | None) -> tuple[Any, Any]:
    q, k = a["q"], a["k"]
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"fused_qk_rmsnorm(): argument 'k' must be Tensor, not {type(k).__name__}")
    y = rms_norm_fp32(q.float(), a["q_weight"], float(a["q_eps"]), False)
    yk = rms_norm_fp32(k.float(), a["k_weight"], float(a["k_eps"]), False)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    q_out.copy_(y.to(q.dtype))
    k_out.copy_(yk.to(k.dtype))
    return q_out, k_out


_ENTRIES: dict[str, Callable[[dict[str, Any], torch.dtype], Any]] = {
    "unified": _unified,
    "group_quant_v14": lambda a, fp8: _group(a, fp8, no_quant=True, gemma=True, fp4=True),
    "group_quant_v13": lambda a, fp8: _group(a, fp8, no_quant=False, gemma=True, fp4=True),
    "group_quant_v12": lambda a, fp8: _group(a, fp8, no_quant=False, gemma=False, fp4=False),
    "per_token": _per_token,
    "private": lambda a, fp8: _plain_qk(a, a["q_out"], a["k_out"]),
    "legacy": lambda a, fp8: _plain_qk(a, None, None),
}


_VECTOR_ARGS = ("q", "k", "q_residual", "q_weight", "k_weight", "q_out", "k_out", "q_res_out", "q_out_quantized",
                "q_out_unquantized")  # fmt: skip


def _check_alignment(args: dict[str, Any]) -> None:
    """aiter's kernels move 16-byte vectors: a base or row stride off 16 bytes is refused, not read wrong."""
    for name in _VECTOR_ARGS:
        t = args.get(name)
        if isinstance(t, torch.Tensor) and t.numel():
            row_bytes = t.stride(0) * t.element_size() if t.dim() == 2 and t.shape[0] > 1 else 0
            _check(t.data_ptr() % 16 == 0 and row_bytes % 16 == 0, f"fake aiter: {name} is not 16-byte aligned")


def call(kind: str, arch: str, entry: str, args: dict[str, Any]) -> Any:
    """Run fake aiter entry ``entry`` of ``kind`` with its bound arguments (called by the fake package)."""
    _CALLS.append(entry)
    _check_alignment(args)
    if kind == "runtime_error":
        raise RuntimeError("HIP error: invalid device function (fake aiter)")
    if kind == "jit_build_failure":
        try:
            raise subprocess.CalledProcessError(1, ["hipcc", "fused_qk_rmsnorm_group_quant.cu"])
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                "[aiter] build [module_fused_qk_rmsnorm_group_quant] under /tmp/aiter/jit/build failed !!!!!!"
            ) from exc
    return _ENTRIES[entry](dict(args), fp8_dtype(arch))


# ----------------------------------------------------------------------------- installing


@dataclass
class FakeAiter:
    """Handle of an installed fake (see :func:`install`)."""

    kind: str
    arch: str
    root: Path

    @property
    def fp8_dtype(self) -> torch.dtype:
        """What ``aiter.dtypes.fp8`` reports for this fake."""
        return fp8_dtype(self.arch)

    @property
    def calls(self) -> list[str]:
        """Fake entries called since install, in order (``"unified"``, ``"group_quant_v14"``, ...)."""
        return list(_CALLS)

    @property
    def imports(self) -> int:
        """How many times the fake's ``aiter/__init__.py`` ran (a failing import runs it on every attempt)."""
        return len(_IMPORTS)


def _pop_aiter_modules() -> dict[str, Any]:
    names = [n for n in sys.modules if n == "aiter" or n.startswith("aiter.")]
    return {n: sys.modules.pop(n) for n in names}


@contextmanager
def install(kind: str = "unified", *, arch: str = "gfx950", cpu: bool = True) -> Iterator[FakeAiter]:
    """Make a fake aiter of ``kind`` importable as ``aiter`` for the duration of the block.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS` (see the module docstring).
    arch : str
        ``"gfx942"`` or ``"gfx950"``: the FP8 flavour the fake reports and accepts.
    cpu : bool
        Also let qknorm's ``aiter`` backend serve CPU tensors and make it eligible on the CPU in
        the default priority (both test hooks of :mod:`qknorm.backends.registry`), so qknorm
        calls reach the fake. Production never routes CPU tensors to aiter.

    Yields
    ------
    FakeAiter
        The handle (``calls``, ``imports``, ``fp8_dtype``). On exit, sys.path, sys.modules
        (any real aiter modules come back), the registry and its caches are restored.
    """
    from ..backends.aiter_backend import AiterBackend

    root = Path(tempfile.mkdtemp(prefix="qknorm-fake-aiter-"))
    saved = _pop_aiter_modules()
    previous_factory: Callable[[], Any] | None = None
    previous_policy: registry.Policy | None = None
    try:
        write_fake_aiter(root, kind, arch=arch)
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
        if cpu:
            previous_factory = registry.register_backend("aiter", lambda: AiterBackend(device_types=("cuda", "cpu")))
            outer = registry.set_policy(None)

            def policy(name: str, device: torch.device) -> str | None:
                return None if name == "aiter" else outer(name, device)

            registry.set_policy(policy)
            previous_policy = outer
        _CALLS.clear()
        _IMPORTS.clear()
        registry.reset()
        yield FakeAiter(kind, arch, root)
    finally:
        if str(root) in sys.path:
            sys.path.remove(str(root))
        _pop_aiter_modules()
        sys.modules.update(saved)
        importlib.invalidate_caches()
        if previous_policy is not None:
            registry.set_policy(previous_policy)
        if previous_factory is not None:
            registry.register_backend("aiter", previous_factory)
        registry.reset()
        shutil.rmtree(root, ignore_errors=True)
