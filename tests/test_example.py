"""examples/deepseek_mla.py runs on the CPU, agrees with its unfused version, and notices when it would not."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "deepseek_mla.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deepseek_mla", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_on_cpu_and_agrees() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("QKNORM_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--device", "cpu", "--tokens", "8"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: fused and unfused blocks agree" in proc.stdout
    for line in ("k_nope", "q codes", "q scales", "k_rope", "q_heads", "kv_heads"):
        assert line in proc.stdout


def test_example_comparison_flags_a_wrong_result(capsys) -> None:  # type: ignore[no-untyped-def]
    ex = load_example()
    gen = torch.Generator().manual_seed(0)
    w = ex.make_weights(64, 2, torch.device("cpu"), gen)
    hidden = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    norm = ex.qknorm.MLAQKNorm(quant="fp8_group", dtype=torch.bfloat16)
    norm.load_state_dict({"q_a_layernorm.weight": w.q_a_layernorm, "kv_a_layernorm.weight": w.kv_a_layernorm})
    fused, ref = ex.fused_block(hidden, w, norm), ex.unfused_block(hidden, w, 1e-6)
    assert ex.compare(fused, ref) == []

    wrong_eps = ex.unfused_block(hidden, w, 1e-1)  # a norm with another epsilon is another result
    assert "k_nope" in ex.compare(fused, wrong_eps)
    flipped_codes = fused["q_codes"].view(torch.uint8).flip(-1).view(torch.float8_e4m3fn)
    swapped = dict(fused, q_codes=flipped_codes, q_heads=fused["q_heads"].flip(-1))
    assert {"q_codes", "q_heads"} <= set(ex.compare(swapped, ref))
    assert "MISMATCH" not in capsys.readouterr().out  # compare() reports; main() decides
