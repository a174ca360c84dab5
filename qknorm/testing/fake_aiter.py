"""Fake ``aiter`` packages, for testing an integration with aiter on a machine without a ROCm GPU.

Each fake is a real package tree (``aiter/``, ``aiter/ops/...``) written to a directory. Its
entry points have the exact signatures of one aiter generation and compute with PyTorch on
whatever device the tensors are on (the math of :mod:`qknorm.reference`), following that
generation's rules as read from aiter's source (:mod:`qknorm.testing.fake_aiter_kernels` has
the details): the Python wrappers' ``ValueError``/``NotImplementedError``, the C++ host checks
(``TORCH_CHECK`` raises ``RuntimeError``; ``AITER_CHECK`` aborts the process), contiguity and
stride rules, scale offsets, the ``No`` mode (the plain kernel: q_residual, gemma_norm and
q_out_unquantized ignored, k required) against the group-quant no-quant mode (residual and
gemma applied), ``QuantType`` as a pybind11 enum (``int()`` works, ``== 0`` is False), and the
MXFP4 E8M0 rule before and after #3212. FP8 outputs must have ``aiter.dtypes.fp8``
(e4m3fnuz for ``arch="gfx942"``, e4m3fn for ``"gfx950"``).

A failed ``AITER_CHECK`` raises :class:`AiterAbort` (a ``BaseException``: nothing in qknorm
can catch it, so a test reaching it fails); a fake written with ``aborts=True`` calls
``os.abort()`` instead, as aiter does, for tests that run it in a subprocess.

Working kinds (:data:`WORKING_KINDS`), each the aiter commit range it stands for:

- ``legacy``: #2442 (2026-03-25) to #2527 - only the public 6-argument ``fused_qk_rmsnorm``
  (``aiter/ops/fused_qk_norm_rope_cache_quant.py``, ``csrc/kernels/fused_qk_norm.cu``).
- ``group_quant_v12``: #2527 (2026-04-03) to #2637, release v0.1.12 - ``fused_qk_rmsnorm_group_quant``
  without ``gemma_norm``, every tensor ``is_contiguous()``, scales at raw offsets; plus legacy.
- ``group_quant``: #2637 (2026-04-08) to #3010, v0.1.12.post1 and v0.1.13 - row strides and scale
  strides, ``gemma_norm`` (#2853); plus legacy.
- ``no_quant``: #3010 (2026-05-04) to #2958 - every parameter optional, ``q_out_scale=None``
  normalizes only (residual and gemma applied); plus legacy.
- ``unified_v14``: #2958 (2026-05-09) to #3137, v0.1.14 - the unified ``fused_qk_rmsnorm`` with
  ``QuantType``, the per-token entry, the private ``_fused_qk_rmsnorm`` (k=None: pybind TypeError);
  every check raises.
- ``unified_v15``: #3137 (2026-05-13) and #3159 (2026-05-29) to #3212, v0.1.15.post1-post3 -
  ``AITER_CHECK`` aborts in both kernels; ``_fused_qk_rmsnorm(k=None)`` raises AttributeError;
  MXFP4 scales still round_pow2(amax)/4.
- ``unified``: #3212 (2026-06-02) to e4048607 (2026-08-22), v0.1.16-v0.1.20 - as above with the
  ceil_pow2(amax/6) E8M0 rule and ``aiter/utility/mx_types.py``.
- ``mxfp4_unmarked``: ``unified`` whose kernel still computes the pre-#3212 E8M0 rule, as a
  partial cherry-pick would build: names, signatures and files cannot tell; only the
  behavioural probe can.
- ``private``: only ``_fused_qk_rmsnorm`` (a v0.1.16 install missing its group-quant module).
- ``drifted_unified``: ``unified`` whose ``fused_qk_rmsnorm`` has a signature of another shape
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

import dataclasses
import importlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backends import registry
from ..quant import fp8_dtype_for_arch
from .fake_aiter_kernels import ENTRIES, AiterAbort, Behaviour

__all__ = ["WORKING_KINDS", "BROKEN_KINDS", "KINDS", "AiterAbort", "FakeAiter", "install", "write_fake_aiter",
           "fp8_dtype"]  # fmt: skip

WORKING_KINDS = ("legacy", "group_quant_v12", "group_quant", "no_quant", "unified_v14", "unified_v15", "unified",
                 "mxfp4_unmarked", "private", "drifted_unified")  # fmt: skip
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
    return fp8_dtype_for_arch(arch) or torch.float8_e4m3fn


# ----------------------------------------------------------------------------- package sources

_OPT = "q_out_unquantized=None, k_out=None, q_res_out=None, k=None, k_weight=None, k_epsilon=None, q_residual=None"
_CALL = "return _fake.call(_KIND, _ARCH, {entry!r}, locals(), _ABORTS)"
_DEFS = {
    "unified": f"""
def fused_qk_rmsnorm(q_out_quantized=None, q_out_scale=None, q=None, q_weight=None, q_epsilon=1e-6, {_OPT},
                     gemma_norm=False, quant_type=QuantType.No, group_size=None, transpose_scale=False):
    {_CALL.format(entry="unified")}
""",
    "group_quant_v14": f"""
def fused_qk_rmsnorm_group_quant(q_out_quantized=None, q_out_scale=None, q=None, q_weight=None, q_epsilon=1e-6,
                                 {_OPT}, group_size=128, transpose_scale=False, gemma_norm=False):
    {_CALL.format(entry="group_quant_v14")}
""",
    "group_quant_v13": f"""
def fused_qk_rmsnorm_group_quant(q_out_quantized, q_out_scale, q, q_weight, q_epsilon, {_OPT},
                                 group_size=128, transpose_scale=False, gemma_norm=False):
    {_CALL.format(entry="group_quant_v13")}
""",
    "group_quant_v12": f"""
def fused_qk_rmsnorm_group_quant(q_out_quantized, q_out_scale, q, q_weight, q_epsilon, {_OPT},
                                 group_size=128, transpose_scale=False):
    {_CALL.format(entry="group_quant_v12")}
""",
    "per_token": f"""
def fused_qk_rmsnorm_per_token_quant(q_out_quantized, q_out_scale, q, q_weight, q_epsilon, {_OPT}, gemma_norm=False):
    {_CALL.format(entry="per_token")}
""",
    "private": f"""
def _fused_qk_rmsnorm(q_out, q, q_weight, q_eps, k_out, k, k_weight, k_eps):
    {_CALL.format(entry="private")}
""",
    "legacy": f"""
def fused_qk_rmsnorm(q, q_weight, q_eps, k, k_weight, k_eps):
    {_CALL.format(entry="legacy")}
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

# csrc/include/rocm_ops.hpp AITER_CORE_PYBIND: pybind11::enum_<QuantType> (before #2545 in
# csrc/pybind/aiter_enum_pybind.cu): members convert with int() but compare equal only to members.
_ENUM = '''\
class QuantType:
    """Stands for aiter's pybind11 enum: int() gives the value, == holds between members only."""

    __slots__ = ("name", "value")

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __int__(self):
        return self.value

    def __index__(self):
        return self.value

    def __eq__(self, other):
        return type(other) is QuantType and other.value == self.value

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self.value)

    def __repr__(self):
        return f"<QuantType.{self.name}: {self.value}>"


for _name, _value in (("No", 0), ("per_Tensor", 1), ("per_Token", 2), ("per_1x32", 3), ("per_1x128", 4),
                      ("per_128x128", 5), ("per_256x128", 6), ("per_1024x128", 7)):
    setattr(QuantType, _name, QuantType(_name, _value))
'''


@dataclass(frozen=True)
class _Tree:
    version: str
    gq: tuple[str, ...] | None  # _DEFS keys in aiter/ops/fused_qk_rmsnorm_group_quant.py (None: no module)
    rope: tuple[str, ...] | None  # _DEFS keys in aiter/ops/fused_qk_norm_rope_cache_quant.py
    rules: Behaviour = field(default_factory=Behaviour)
    mx_marker: bool = False  # aiter/utility/mx_types.py (#3212)
    import_error: bool = False


_RAISES: dict[str, Any] = {"gq_aborts": False, "plain_aborts": False, "mx_round_up": False, "k_none_error": TypeError}
_V14 = ("unified", "group_quant_v14", "per_token")
_HEAD = _Tree("0.1.16", _V14, ("private",), Behaviour(), mx_marker=True)
_TREES = {
    "legacy": _Tree("0.1.11+g149a8f6", None, ("legacy",), Behaviour(**_RAISES)),
    "group_quant_v12": _Tree("0.1.12", ("group_quant_v12",), ("legacy",),
                             Behaviour(contiguous=True, no_quant=False, **_RAISES)),
    "group_quant": _Tree("0.1.13", ("group_quant_v13",), ("legacy",), Behaviour(no_quant=False, **_RAISES)),
    "no_quant": _Tree("0.1.13+g2235c25", ("group_quant_v14",), ("legacy",), Behaviour(**_RAISES)),
    "unified_v14": _Tree("0.1.14", _V14, ("private",), Behaviour(**_RAISES)),
    "unified_v15": _Tree("0.1.15.post1", _V14, ("private",), Behaviour(mx_round_up=False)),
    "unified": _HEAD,
    "mxfp4_unmarked": _Tree("0.1.16", _V14, ("private",), Behaviour(mx_round_up=False), mx_marker=True),
    "private": _Tree("0.1.16", None, ("private",), Behaviour(), mx_marker=True),
    "drifted_unified": _Tree("0.1.16", ("unified_drifted", "group_quant_v14", "per_token"), ("private",),
                             mx_marker=True),
    "missing_module": _Tree("0.1.10", None, None),
    "renamed_symbol": _Tree("0.1.99", ("renamed",), ("renamed_rope",)),
    "changed_signature": _Tree("0.2.0", ("changed_gq",), ("changed_rope",)),
    "import_oserror": _Tree("0.1.16", None, None, import_error=True),
    "runtime_error": _HEAD,
    "jit_build_failure": _HEAD,
}  # fmt: skip


def _module(kind: str, arch: str, defs: tuple[str, ...], aborts: bool, imports: str = "") -> str:
    head = f'"""Fake aiter module (qknorm.testing.fake_aiter, kind {kind!r})."""\n'
    head += f"from qknorm.testing import fake_aiter as _fake\n{imports}\n"
    head += f"_KIND = {kind!r}\n_ARCH = {arch!r}\n_ABORTS = {aborts!r}\n"
    return head + "".join(_DEFS[d] for d in defs)


def write_fake_aiter(root: str | Path, kind: str = "unified", *, arch: str = "gfx950", aborts: bool = False) -> Path:
    """Write the fake ``aiter`` package of ``kind`` under ``root`` (put ``root`` on ``sys.path``).

    Parameters
    ----------
    root : str or Path
        Directory receiving ``aiter/``; created if missing.
    kind : str
        One of :data:`KINDS`.
    arch : str
        ``"gfx942"`` (FP8 e4m3fnuz) or ``"gfx950"`` (FP8 e4m3fn): what ``aiter.dtypes.fp8`` reports.
    aborts : bool
        A failed ``AITER_CHECK`` calls ``os.abort()`` (as aiter does) instead of raising
        :class:`AiterAbort`: for fakes run in a subprocess.

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
        "ops/enum.py": _ENUM,
        "utility/__init__.py": "",
        "utility/dtypes.py": (
            "import torch\n\n"
            f"fp8 = torch.{str(fp8_dtype(arch)).removeprefix('torch.')}\n"
            'fp4x2 = getattr(torch, "float4_e2m1fn_x2", torch.uint8)\n'
        ),
    }
    if tree.mx_marker:
        files["utility/mx_types.py"] = '"""MX scale rounding modes (aiter #3212)."""\n'
    if tree.gq is not None:
        enum_import = "from .enum import QuantType\n" if "unified" in tree.gq else ""
        files["ops/fused_qk_rmsnorm_group_quant.py"] = _module(kind, arch, tree.gq, aborts, enum_import)
    if tree.rope is not None:
        files["ops/fused_qk_norm_rope_cache_quant.py"] = _module(kind, arch, tree.rope, aborts)
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    return root


def call(kind: str, arch: str, entry: str, args: dict[str, Any], aborts: bool = False) -> Any:
    """Run fake aiter entry ``entry`` of ``kind`` with its bound arguments (called by the fake package)."""
    _CALLS.append(entry)
    if kind == "runtime_error":
        raise RuntimeError("HIP error: invalid device function (fake aiter)")
    if kind == "jit_build_failure":
        try:
            raise subprocess.CalledProcessError(1, ["hipcc", "fused_qk_rmsnorm_group_quant.cu"])
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                "[aiter] build [module_fused_qk_rmsnorm_group_quant] under /tmp/aiter/jit/build failed !!!!!!"
            ) from exc
    rules = dataclasses.replace(_TREES[kind].rules, truncate_bf16=arch.startswith("gfx94"))
    return ENTRIES[entry](dict(args), fp8_dtype(arch), rules, aborts)


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
def install(
    kind: str = "unified", *, arch: str = "gfx950", cpu: bool = True, aborts: bool = False
) -> Iterator[FakeAiter]:
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
    aborts : bool
        A failed ``AITER_CHECK`` aborts the process (run such tests in a subprocess); by default
        it raises :class:`AiterAbort`.

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
        write_fake_aiter(root, kind, arch=arch, aborts=aborts)
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
