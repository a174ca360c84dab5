"""The call path of ``qk_norm_rope``: plan once per signature, check aliasing per call, run.

A call's *signature* is each argument's type, and for tensors ``dtype``, ``device``, ``shape``
and ``stride()``, and for scalars their value. :func:`qknorm.rope.checks.plan_call` reads
nothing else, so its :class:`~qknorm.rope.checks.RopePlan` is cached per signature; every call
still runs the aliasing check on the tensors' actual memory, and the index check when asked.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .backends import run_request
from .checks import RopePlan, RopeRequest, check_aliasing, check_indices, plan_call

__all__ = ["ARG_NAMES", "TENSOR_OUTPUTS", "plan_for", "execute", "native_fp8", "clear_plans"]

# The canonical argument list: the public entry's order, which is also the custom op's schema.
ARG_NAMES = (
    "q", "k", "q_weight", "k_weight", "cos_sin_cache", "positions", "q_epsilon", "k_epsilon", "is_neox",
    "gemma_norm", "q_out", "k_out", "v", "k_cache", "v_cache", "slot_mapping", "k_scale", "v_scale", "q_scale",
    "check_indices",
)  # fmt: skip
TENSOR_OUTPUTS = ("q_out", "k_out", "k_cache", "v_cache")
_MAX_PLANS = 4096  # a serving process sees a few per layer shape and token count; past this, start over
_plans: dict[tuple[object, ...], RopePlan] = {}
_lock = threading.Lock()


def native_fp8(device: torch.device) -> torch.dtype:
    """The FP8 flavour native to ``device``: e4m3fnuz on MI300 (gfx94x), e4m3fn elsewhere."""
    if device.type == "cuda" and torch.version.hip is not None:
        arch = torch.cuda.get_device_properties(device).gcnArchName
        if arch.startswith("gfx94"):
            return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


def _sig(x: object) -> object:
    if isinstance(x, torch.Tensor):
        return (type(x), x.dtype, x.device, tuple(x.shape), x.stride())
    return (type(x), x)


def plan_for(args: tuple[Any, ...]) -> RopePlan:
    """The plan of a call given as the canonical argument list (validated once per signature).

    While torch.compile traces, the plan is computed without the cache: Dynamo traces the
    checks themselves (guarding on the shapes and strides they read).
    """
    if torch.compiler.is_compiling():
        return _plan(args)
    try:
        key = tuple(_sig(a) for a in args)
        plan = _plans.get(key)
    except TypeError:  # an unhashable argument: it will not validate either
        key, plan = None, None
    if plan is not None:
        return plan
    plan = _plan(args)
    if key is not None:
        with _lock:
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
            _plans[key] = plan
    return plan


def _plan(args: tuple[Any, ...]) -> RopePlan:
    kwargs = dict(zip(ARG_NAMES, args))
    q, k, qw, kw, table, pos = (kwargs.pop(n) for n in ARG_NAMES[:6])
    return plan_call(q, k, qw, kw, table, pos, fp8_native=native_fp8, **kwargs)


def execute(plan: RopePlan, args: tuple[Any, ...], allocated: tuple[str, ...] = ()) -> None:
    """Run one planned call whose outputs exist (``allocated`` names the fresh ones)."""
    a = dict(zip(ARG_NAMES, args))
    req = RopeRequest(
        plan=plan, q=a["q"], k=a["k"], q_weight=a["q_weight"], k_weight=a["k_weight"],
        cos_sin_cache=a["cos_sin_cache"], positions=a["positions"], q_out=a["q_out"], k_out=a["k_out"],
        v=a["v"], k_cache=a["k_cache"], v_cache=a["v_cache"], slot_mapping=a["slot_mapping"],
        k_scale=a["k_scale"], v_scale=a["v_scale"], q_scale=a["q_scale"],
    )  # fmt: skip
    check_aliasing(req, allocated)
    if plan.check_indices:
        check_indices(req)
    run_request(req)


def clear_plans() -> None:
    """Forget every cached plan (tests)."""
    with _lock:
        _plans.clear()
