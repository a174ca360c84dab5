"""The memo of direct launches per call plan (qknorm.backends.triton_launch.PlannedLaunches).

Host-side logic only, with a recording launcher in place of a compiled kernel: which calls may
reuse a kept launch, and with which arguments. The GPU tests of both operators run the real
direct launches (test_triton.py, test_rope_gpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from qknorm.backends import triton_launch
from qknorm.backends.triton_launch import PlannedLaunches


@dataclass(frozen=True)
class _Plan:
    """Equal plans compare equal (as frozen dataclasses do), like two RopePlans of different strides."""

    t: int


@dataclass
class _Ptr:
    ptr: int

    def data_ptr(self) -> int:
        return self.ptr


@dataclass
class _Req:
    plan: _Plan
    q: _Ptr
    k: _Ptr | None = None


@dataclass
class _Hook:
    calls: list[Any] = field(default_factory=list)


@dataclass
class _Hooks:
    launch_enter_hook: _Hook = field(default_factory=_Hook)
    launch_exit_hook: _Hook = field(default_factory=_Hook)


class _Launcher:
    def __init__(self) -> None:
        self.launches: list[tuple[int, int, list[Any]]] = []

    def __call__(self, grid: int, stream: int, args: list[Any]) -> None:
        self.launches.append((grid, stream, args))


def _stream(device: int | None) -> int:
    return 7


def _kept(plan: _Plan, launcher: _Launcher) -> PlannedLaunches:
    memo = PlannedLaunches()
    # arguments: [q pointer, a stride, k pointer, a constexpr]; q and k are request attributes
    memo.remember(plan, launcher, 12, [4096, 2112, 8192, "C"], ((0, "q"), (2, "k")), None)
    return memo


def test_a_later_call_of_the_plan_launches_with_its_own_pointers() -> None:
    plan, launcher = _Plan(5), _Launcher()
    memo = _kept(plan, launcher)
    assert memo.launch(_Req(plan, _Ptr(16 * 1000), _Ptr(16 * 2000)), _stream, _Hooks())
    assert launcher.launches == [(12, 7, [16000, 2112, 32000, "C"])]
    # the kept arguments are not overwritten by a call's pointers
    assert memo.launch(_Req(plan, _Ptr(16 * 3), _Ptr(16 * 4)), _stream, _Hooks())
    assert launcher.launches[-1] == (12, 7, [48, 2112, 64, "C"])


def test_an_equal_plan_that_is_another_object_does_not_take_the_launch() -> None:
    plan, launcher = _Plan(5), _Launcher()
    memo = _kept(plan, launcher)
    assert not memo.launch(_Req(_Plan(5), _Ptr(0), _Ptr(0)), _stream, _Hooks())
    assert not memo.launch(_Req(_Plan(6), _Ptr(0), _Ptr(0)), _stream, _Hooks())
    assert launcher.launches == []


@pytest.mark.parametrize("misaligned", ["q", "k"])
def test_a_pointer_off_16_bytes_goes_to_the_regular_path(misaligned: str) -> None:
    plan, launcher = _Plan(5), _Launcher()
    memo = _kept(plan, launcher)
    ptrs = {"q": _Ptr(1024), "k": _Ptr(2048)}
    ptrs[misaligned] = _Ptr(ptrs[misaligned].ptr + 2)
    assert not memo.launch(_Req(plan, **ptrs), _stream, _Hooks())
    assert launcher.launches == []


@pytest.mark.parametrize("hook", ["launch_enter_hook", "launch_exit_hook"])
def test_a_launch_hook_goes_to_the_regular_path(hook: str) -> None:
    plan, launcher = _Plan(5), _Launcher()
    memo = _kept(plan, launcher)
    hooks = _Hooks()
    getattr(hooks, hook).calls.append(print)
    assert not memo.launch(_Req(plan, _Ptr(1024), _Ptr(2048)), _stream, hooks)
    assert launcher.launches == []


def test_a_request_without_a_plan_goes_to_the_regular_path() -> None:
    launcher = _Launcher()
    memo = _kept(_Plan(5), launcher)

    class Bare:
        q = _Ptr(1024)

    assert not memo.launch(Bare(), _stream, _Hooks())
    assert launcher.launches == []


def test_the_memo_starts_over_past_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_launch, "MAX_PLANNED", 3)
    memo, launcher = PlannedLaunches(), _Launcher()
    plans = [_Plan(i) for i in range(4)]
    for p in plans:
        memo.remember(p, launcher, 1, [0], ((0, "q"),), None)
    assert len(memo) == 1  # the fourth entry found three and cleared them
    assert memo.launch(_Req(plans[3], _Ptr(16)), _stream, _Hooks())
    assert not memo.launch(_Req(plans[0], _Ptr(16)), _stream, _Hooks())
    memo.clear()
    assert len(memo) == 0
