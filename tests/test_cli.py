"""``python -m qknorm``: env, backends, demo, check and bench on the CPU (fake aiter packages included)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import qknorm
from qknorm.__main__ import main
from qknorm.backends import registry
from qknorm.request import QKNormRequest
from qknorm.testing import fake_aiter

REPO = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def table_rows(out: str, first_column: str, rope: bool = False) -> list[list[str]]:
    """Rows of the printed tables whose first cell is ``first_column`` (cells split on 2+ spaces):
    the fused Q/K RMSNorm's, or with ``rope`` those of qk_norm_rope (a cell names it)."""
    import re

    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    return [r for r in rows if r and r[0] == first_column and any(c.startswith("qk_norm_rope") for c in r) == rope]


@pytest.fixture
def aiter_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """QKNORM_BACKEND left unset; the caller installs a fake aiter."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    yield


# ----------------------------------------------------------------------------- env


def test_env_reports_versions_and_devices(capsys):
    rc, out, _ = run(capsys, "env")
    assert rc == 0
    torch_row = table_rows(out, "torch")[0]
    assert torch_row[1].startswith(torch.__version__)
    assert table_rows(out, "python")[0][1].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert table_rows(out, "aiter")  # installed, not installed or failing: always a row
    assert table_rows(out, "cpu")
    assert len([r for r in table_rows(out, "cpu")]) == 1
    if torch.cuda.is_available():
        assert table_rows(out, "cuda:0")


def test_env_reports_a_failing_aiter_import_instead_of_raising(capsys):
    with fake_aiter.install("import_oserror", cpu=False):
        rc, out, _ = run(capsys, "env")
    assert rc == 0
    assert table_rows(out, "aiter")[0][1] == (
        "import failed: OSError: libamdhip64.so: cannot open shared object file: No such file or directory"
    )


# ----------------------------------------------------------------------------- backends


def test_backends_lists_every_backend_and_who_serves_each_mode_on_cpu(capsys):
    rc, out, _ = run(capsys, "backends")
    assert rc == 0
    assert "priority: aiter, triton, torch (default" in out
    assert "programmatic dependent launch of the Triton kernels (NVIDIA sm_90+): off" in out
    assert table_rows(out, "torch")[0][1] == "yes"
    for name in ("aiter", "triton"):
        assert table_rows(out, name), name
    modes = table_rows(out, "cpu")
    assert [r[1].split()[0] for r in modes] == ["none", "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"]
    assert all(r[2] == "torch" for r in modes)
    assert "aiter: the default priority uses aiter on ROCm devices only" in modes[0][3]
    rope = table_rows(out, "cpu", rope=True)
    assert [r[1] for r in rope] == ["qk_norm_rope 32/8/128 bf16 cache", "qk_norm_rope 32/8/128 fp8 cache"]
    assert all(r[2] == "torch" for r in rope)


def test_backends_shows_what_aiter_bound_to_and_what_it_declines(capsys, aiter_env):
    with fake_aiter.install("unified", arch="gfx942"):
        rc, out, _ = run(capsys, "backends")
    assert rc == 0
    assert table_rows(out, "aiter")[0][:2] == ["aiter", "yes"]
    assert (
        "aiter bound (preferred): unified: aiter.ops.fused_qk_rmsnorm_group_quant.fused_qk_rmsnorm (aiter v0.1.14)"
        in out
    )
    assert "aiter not bound: legacy: aiter.ops.fused_qk_norm_rope_cache_quant has no fused_qk_rmsnorm" in out
    assert "aiter fp8 dtype: torch.float8_e4m3fnuz" in out
    by_mode = {r[1].split()[0]: r for r in table_rows(out, "cpu")}
    assert by_mode["none"][2] == "aiter" and by_mode["mxfp4"][2] == "aiter"
    assert by_mode["fp8_tensor"][2] == "torch" and "per-tensor" in by_mode["fp8_tensor"][3]
    # the CPU has no native FP8 flavour: e4m3fn is asked for, a gfx942 aiter writes e4m3fnuz
    assert by_mode["fp8_group"][2] == "torch" and "float8_e4m3fnuz" in by_mode["fp8_group"][3]


def test_backends_with_an_unknown_name_exits_2(capsys, monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch,warp9")
    registry.reset()
    rc, _, err = run(capsys, "backends")
    assert rc == 2
    assert "warp9" in err and "valid names: aiter, triton, torch" in err


def test_backends_in_a_subprocess_with_a_broken_aiter(tmp_path):
    fake_aiter.write_fake_aiter(tmp_path, "changed_signature")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    env.pop(registry.ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-m", "qknorm", "backends"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    aiter_row = table_rows(proc.stdout, "aiter")[0]
    assert aiter_row[1] == "no"
    assert "aiter 0.2.0 has no usable fused Q/K RMSNorm entry" in aiter_row[2]
    assert "unexpected signature" in aiter_row[2]


# ----------------------------------------------------------------------------- demo


def test_demo_checks_every_row_against_the_reference_and_names_self_comparisons(capsys):
    rc, out, _ = run(capsys, "demo", "--device", "cpu", "--tokens", "1,3", "--iters", "1")
    assert rc == 0
    rows = table_rows(out, "1") + table_rows(out, "3")
    assert [r[1].split()[0] for r in rows] == ["none", "fp8_group", "mxfp4"] * 2
    for r in rows:
        assert r[2] == "torch" and r[-1] == "reference"  # torch is the reference: nothing independent compared
        assert float(r[3]) == 0.0
        assert float(r[4]) > 0.0  # a time per call
    rope = table_rows(out, "1", rope=True) + table_rows(out, "3", rope=True)
    assert [r[1] for r in rope] == ["qk_norm_rope bf16 cache", "qk_norm_rope fp8 cache"] * 2
    assert all(r[2] == "torch" and r[-1] == "reference" for r in rope)


class _WrongBackend:
    """Writes zeros: a backend the demo and the check must catch."""

    name = "torch"

    def available(self) -> tuple[bool, str]:
        return True, "writes zeros"

    def supports(self, req: QKNormRequest) -> str | None:
        return None

    def run(self, req: QKNormRequest) -> None:
        for t in req.outputs():
            t.zero_()


def test_demo_exits_1_when_a_result_is_wrong(capsys):
    previous = registry.register_backend("torch", _WrongBackend)  # type: ignore[arg-type]
    try:
        rc, out, _ = run(capsys, "demo", "--device", "cpu", "--tokens", "2", "--iters", "1")
    finally:
        registry.register_backend("torch", previous)
    assert rc == 1
    rows = table_rows(out, "2")
    assert len(rows) == 3 and all(r[-1].startswith("FAIL") for r in rows)


# ----------------------------------------------------------------------------- check


def test_check_of_the_torch_backend_says_it_is_the_reference(capsys):
    rc, out, _ = run(capsys, "check", "--backend", "torch", "--device", "cpu", "--quick")
    assert rc == 0
    rows = table_rows(out, "torch")
    assert len(rows) == 7 and all(r[3] == "reference" for r in rows)  # torch compared with itself says so
    rope = table_rows(out, "torch", rope=True)
    assert len(rope) == 2 and all(r[3] == "reference" for r in rope)
    assert "torch backend is qknorm.reference itself" in out
    assert "9 passed, 0 failed, 0 skipped" in out


def test_check_runs_aiter_where_it_serves_and_reports_skips(capsys, aiter_env):
    with fake_aiter.install("unified", arch="gfx950"):
        rc, out, _ = run(capsys, "check", "--backend", "aiter", "--device", "cpu")
    assert rc == 0
    rows = {r[2]: r for r in table_rows(out, "aiter")}
    assert rows["deepseek bfloat16 fp8_group g128 e4m3fn transposed"][3] == "pass"
    assert rows["deepseek bfloat16 mxfp4 g32 residual +unquantized"][3] == "pass"
    assert "deepseek bfloat16 fp8_tensor e4m3fn" not in rows  # skipped, summarized below the table
    assert "aiter on cpu: 1 case(s) skipped: aiter's fused kernels take widths up to 8192, n1=16384" in out
    assert "0 failed" in out


@pytest.mark.parametrize(
    ("kind", "note"),
    [("runtime_error", "RuntimeError: HIP error: invalid device function"), ("jit_build_failure", "failed to build")],
)
def test_check_fails_on_a_broken_aiter(capsys, aiter_env, kind: str, note: str):
    with fake_aiter.install(kind):
        rc, out, _ = run(capsys, "check", "--backend", "aiter", "--device", "cpu", "--quick")
    assert rc == 1
    rows = table_rows(out, "aiter")
    assert rows and all(r[3] == "FAIL" for r in rows)
    assert note in rows[0][-1]


def test_check_catches_wrong_numbers(capsys):
    previous = registry.register_backend("torch", _WrongBackend)  # type: ignore[arg-type]
    try:
        rc, out, _ = run(capsys, "check", "--backend", "torch", "--device", "cpu", "--quick")
    finally:
        registry.register_backend("torch", previous)
    assert rc == 1
    assert all(r[3] == "FAIL" for r in table_rows(out, "torch"))


def test_check_reports_unavailable_backends_and_unknown_names(capsys, aiter_env):
    with fake_aiter.install("missing_module"):
        rc, out, _ = run(capsys, "check", "--backend", "aiter", "--device", "cpu", "--quick")
    assert rc == 0 and out.startswith("aiter: unavailable (aiter 0.1.10 has no usable fused Q/K RMSNorm entry")
    rc, _, err = run(capsys, "check", "--backend", "tourch")
    assert rc == 2 and "valid names" in err


# ----------------------------------------------------------------------------- bench and packaging


def test_bench_delegates_to_qknorm_bench(capsys, monkeypatch):
    seen: list[list[str]] = []
    fake = types.ModuleType("qknorm.bench")
    fake.main = lambda argv: seen.append(list(argv)) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qknorm.bench", fake)
    assert main(["bench", "--shape", "deepseek", "--out", "x"]) == 7
    assert seen == [["--shape", "deepseek", "--out", "x"]]


def test_bench_without_the_benchmark_module_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "qknorm.bench", None)  # import fails as if the file were absent
    rc, _, err = run(capsys, "bench")
    assert rc == 2 and "qknorm.bench is not part of this installation" in err


def test_console_script_and_module_entry():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["qknorm"] == "qknorm.__main__:main"
    proc = subprocess.run([sys.executable, "-m", "qknorm", "--version"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("qknorm ")


def test_backends_says_when_programmatic_dependent_launch_is_on(capsys):
    qknorm.set_pdl(True)
    try:
        rc, out, _ = run(capsys, "backends")
    finally:
        qknorm.set_pdl(False)
    assert rc == 0
    assert "programmatic dependent launch of the Triton kernels (NVIDIA sm_90+): on" in out
