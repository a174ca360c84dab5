"""Test setup: Triton kernels run under the interpreter when there is no GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is imported (the interpreter is chosen at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qknorm.backends import registry


@pytest.fixture(autouse=True)
def _fresh_selection(monkeypatch: pytest.MonkeyPatch):
    """Every test starts with no cached backend choice and no QKNORM_BACKEND."""
    monkeypatch.delenv("QKNORM_BACKEND", raising=False)
    registry.reset()
    yield
    registry.reset()


SM90 = torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability() >= (9, 0)


@pytest.fixture(params=[False, pytest.param(True, marks=pytest.mark.skipif(not SM90, reason="PDL needs sm_90+"))],
                ids=["plain", "pdl"])  # fmt: skip
def pdl(request: pytest.FixtureRequest):
    """Launches plain, and with programmatic dependent launch (``qknorm.set_pdl``, set before warmup)."""
    from qknorm import set_pdl

    set_pdl(request.param)
    yield request.param
    set_pdl(False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
