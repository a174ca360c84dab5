"""``import qknorm`` does no work: no optional-library imports, no device queries, no environment reads.

Each check runs in a fresh interpreter. The probe script imports torch first (qknorm needs it,
and torch's own import-time work is not qknorm's), then installs recorders: an import hook
noting any attempt to import ``triton`` or ``aiter``, wrappers around torch.cuda's query
functions, and an ``os.environ`` / ``os.getenv`` stand-in noting every access made directly
from qknorm's code. Then it imports qknorm and reports what was recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys
from collections.abc import MutableMapping

import torch

QK = os.path.join(sys.argv[1], "qknorm") + os.sep
modules = sys.argv[2].split(",")
report = {"imports": [], "cuda_calls": [], "env": [], "new_modules": {}, "errors": {}}
before_all = set(sys.modules)


def qknorm_caller(depth):
    frame = sys._getframe(depth)
    return frame.f_code.co_filename.startswith(QK), f"{frame.f_code.co_filename}:{frame.f_lineno}"


class Finder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("triton", "aiter"):
            report["imports"].append(name)
        return None


sys.meta_path.insert(0, Finder())

for fname in ("is_available", "device_count", "current_device", "get_device_name", "get_device_properties",
              "get_device_capability", "init", "mem_get_info", "synchronize"):
    real_fn = getattr(torch.cuda, fname)

    def wrapped(*a, _f=fname, _real=real_fn, **k):
        report["cuda_calls"].append(_f)
        return _real(*a, **k)

    setattr(torch.cuda, fname, wrapped)

real_env = os.environ


class Env(MutableMapping):
    def _note(self, key):
        direct, where = qknorm_caller(3)
        if direct:
            report["env"].append([key, where])

    def __getitem__(self, key):
        self._note(key)
        return real_env[key]

    def get(self, key, default=None):
        self._note(key)
        return real_env.get(key, default)

    def __contains__(self, key):
        self._note(key)
        return key in real_env

    def __setitem__(self, key, value):
        self._note(key)
        real_env[key] = value

    def __delitem__(self, key):
        self._note(key)
        del real_env[key]

    def __iter__(self):
        self._note("*")
        return iter(real_env)

    def __len__(self):
        return len(real_env)


def getenv(key, default=None):
    direct, where = qknorm_caller(2)
    if direct:
        report["env"].append([key, where])
    return real_env.get(key, default)


os.environ = Env()
os.getenv = getenv

for name in modules:
    before = set(sys.modules)
    try:
        __import__(name)
    except Exception as exc:  # reported, asserted by the test
        report["errors"][name] = f"{type(exc).__name__}: {exc}"
    new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("triton", "aiter"))
    report["new_modules"][name] = new

report["cuda_initialized"] = torch.cuda.is_initialized()
report["triton_loaded"] = "triton" in sys.modules and "triton" not in before_all
report["aiter_loaded"] = "aiter" in sys.modules
print("REPORT" + json.dumps(report))
"""


def _probe(*modules: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), ",".join(modules)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])  # type: ignore[no-any-return]


def _library_modules() -> list[str]:
    """Every module of the package except the @triton.jit kernel files (which exist to import triton)."""
    names = []
    for path in sorted((ROOT / "qknorm").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1].endswith("kernels") or parts[-1] == "__main__":
            continue
        names.append(".".join(parts))
    return names


def test_import_qknorm_does_no_work() -> None:
    report = _probe("qknorm")
    assert report["errors"] == {}
    assert report["imports"] == [], f"import qknorm tried to import {report['imports']}"
    assert report["new_modules"] == {"qknorm": []}
    assert report["cuda_calls"] == [], f"import qknorm queried the GPU: {report['cuda_calls']}"
    assert report["cuda_initialized"] is False
    assert report["env"] == [], f"import qknorm read the environment: {report['env']}"
    assert report["triton_loaded"] is False and report["aiter_loaded"] is False


def test_importing_any_library_module_does_no_work() -> None:
    """The same for every module (backends and registry included), imported one after another."""
    modules = _library_modules()
    assert "qknorm.backends.registry" in modules and "qknorm.backends.triton_backend" in modules
    report = _probe(*modules)
    assert report["errors"] == {}
    offenders = {m: new for m, new in report["new_modules"].items() if new}
    assert offenders == {}, f"modules importing triton/aiter at import time: {offenders}"
    assert report["imports"] == []
    assert report["cuda_calls"] == [] and report["cuda_initialized"] is False
    assert report["env"] == [], f"environment read at import: {report['env']}"


def test_probe_detects_what_it_claims_to_detect(tmp_path: Path) -> None:
    """The probe itself can fail: a module that reads the environment and imports a fake triton is caught."""
    pkg = tmp_path / "qknorm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import os\nimport torch\nX = os.environ.get('QKNORM_BACKEND')\nY = os.getenv('HOME')\n"
        "N = torch.cuda.device_count()\ntry:\n    import triton\nexcept ImportError:\n    pass\n"
    )
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), "qknorm"],
        capture_output=True, text=True, cwd=tmp_path, env=env | {"PYTHONPATH": str(tmp_path)}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))[len("REPORT") :])
    assert [k for k, _ in report["env"]] == ["QKNORM_BACKEND", "HOME"]
    assert "device_count" in report["cuda_calls"]
    assert "triton" in report["imports"]


@pytest.mark.parametrize("name", ["triton", "aiter"])
def test_import_qknorm_works_without_optional_libraries(name: str, tmp_path: Path) -> None:
    """A broken optional library (importing it raises) cannot break ``import qknorm`` or a CPU call."""
    shim = tmp_path / name
    shim.mkdir()
    (shim / "__init__.py").write_text(f"raise ImportError('{name} is broken in this environment')\n")
    code = (
        "import torch, qknorm\n"
        "q = torch.randn(2, 64, dtype=torch.float16); w = torch.ones(64, dtype=torch.float16)\n"
        "out = qknorm.qk_rmsnorm(q, w, quant='fp8_group', group_size=32)\n"
        "assert out.q.shape == (2, 64)\n"
        f"from qknorm.backends import registry\nassert not registry.probe({name!r})[0]\nprint('ok')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("QKNORM_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
