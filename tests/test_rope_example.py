"""examples/qwen3_attention.py runs, agrees with its unfused version, and notices when it would not."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "qwen3_attention.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qwen3_attention", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", [None, "triton"])
def test_example_runs_and_agrees(backend: str | None) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("QKNORM_BACKEND", None)
    if backend is not None:
        env["QKNORM_BACKEND"] = backend
        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--device", device], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: fused and unfused blocks agree" in proc.stdout
    for line in ("q ulps", "k_cache ulps", "v_cache", "out"):
        assert line in proc.stdout


def test_example_comparison_flags_a_wrong_result(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ex = load_example()
    real = ex.rotate_half
    monkeypatch.setattr(ex, "rotate_half", lambda x: -real(x))  # the unfused chain rotates the wrong way
    assert ex.main(["--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out
