"""The qk_norm_rope parts of ``python -m qknorm``: check (Triton under the interpreter), wrong numbers caught, bench."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from qknorm.__main__ import main
from qknorm.backends import registry
from qknorm.rope import bench, cli
from qknorm.rope.ops import OP


def test_check_rows_pass_for_triton() -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    rows, passes, failures = cli.check_rows(["triton"], [torch.device("cuda" if torch.cuda.is_available() else "cpu")], True)
    assert failures == 0 and passes == 2
    assert [r[3] for r in rows] == ["pass", "pass"]


def test_check_rows_skip_backends_without_an_entry_point() -> None:
    rows, passes, failures = cli.check_rows(["flashinfer"], [torch.device("cpu")], True)
    assert (passes, failures) == (0, 0) and rows[0][3] == "skip" and "no flashinfer backend is registered" in str(rows[0][5])


def test_check_rows_skip_aiter_when_it_is_not_installed() -> None:
    rows, passes, failures = cli.check_rows(["aiter"], [torch.device("cpu")], True)
    assert (passes, failures) == (0, 0) and {r[3] for r in rows} == {"skip"}
    assert all(r[5] == "aiter is not installed" for r in rows)


class _Zeros:
    """A backend writing zeros: check and demo must catch it."""

    name = "torch"

    def available(self) -> tuple[bool, str]:
        return True, "writes zeros"

    def supports(self, req: Any) -> str | None:
        return None

    def run(self, req: Any) -> None:
        for t in req.outputs():
            t.view(torch.uint8).zero_()


def test_wrong_numbers_are_caught() -> None:
    previous = registry.register_backend("torch", _Zeros, op=OP)  # type: ignore[arg-type]
    try:
        rows, passes, failures = cli.check_rows(["torch"], [torch.device("cpu")], True)
        demo, failed = cli.demo_rows(torch.device("cpu"), [2], 1)
    finally:
        registry.register_backend("torch", previous, op=OP)
    assert failures == 2 and passes == 0 and all(r[3] == "FAIL" for r in rows)
    assert failed and all(str(r[-1]).startswith("FAIL") for r in demo)


def test_bench_rope_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(list(argv)) or 3)
    assert main(["bench", "rope", "--t", "1"]) == 3
    assert seen == [["--t", "1"]]


def test_bench_keeps_decode_sized_calls_in_l2_and_rotates_larger_ones_over_3x_l2() -> None:
    rotation_sets = bench.rotation_sets
    l2 = 60 * 2**20
    for nbytes in (30_000, 1_610_000, 6_430_000, l2 // 8):  # T = 1, 64, 256 (Qwen3-8B) and the bound
        sets = rotation_sets(nbytes, l2)
        assert 1 <= sets <= 16 and sets * nbytes <= l2 // 2, (nbytes, sets)
    assert rotation_sets(30_000, l2) == 16
    for nbytes in (l2 // 8 + 1, 25_700_000, 410_000_000):  # T = 1024, 16384
        sets = rotation_sets(nbytes, l2)
        assert sets == 16 or sets * nbytes >= 3 * l2, (nbytes, sets)
