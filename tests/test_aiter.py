"""The aiter backend against fake aiter packages of every generation, working and broken (CPU only).

Every result is compared with the ``torch`` backend (the reference). Routing is asserted through
the fake's call log: which aiter entry ran, or none when the request must not reach aiter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import qknorm
from qknorm.backends import registry
from qknorm.backends.aiter_backend import AiterBackend, is_build_failure
from qknorm.backends.aiter_binding import shape_mismatch
from qknorm.backends.base import BackendUnavailable
from qknorm.checks import build_request
from qknorm.quant import QuantMode
from qknorm.testing import (
    assert_fp8_close,
    assert_mxfp4_close,
    assert_norm_close,
    assert_scales_close,
    backend_override,
    fake_aiter,
)

REPO = Path(__file__).resolve().parents[1]
FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz


using = backend_override  # QKNORM_BACKEND=value (None: unset) for the block, with fresh selection


def fallback_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, registry.BackendFallbackWarning)]


def inputs(
    m: int = 5, n1: int = 1536, n2: int = 512, *, k: bool = True, residual: bool = False, seed: int = 0
) -> dict[str, Any]:
    """DeepSeek-style split views of one ``[m, n1 + n2 + 64]`` bf16 buffer."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(m, n1 + n2 + 64, generator=gen).bfloat16()
    return {
        "q": latent[:, :n1],
        "q_weight": (1 + 0.1 * torch.randn(n1, generator=gen)).bfloat16(),
        "k": latent[:, n1 : n1 + n2] if k else None,
        "k_weight": (1 + 0.1 * torch.randn(n2, generator=gen)).bfloat16() if k else None,
        "q_residual": torch.randn(m, n1, generator=gen).bfloat16() if residual else None,
    }


def functional(inp: dict[str, Any], **kw: Any) -> qknorm.QKNormOutput:
    return qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"], q_residual=inp["q_residual"],
                             k_epsilon=1e-5, **kw)  # fmt: skip


def assert_outputs_match(actual: qknorm.QKNormOutput, expected: qknorm.QKNormOutput, quant: str | None) -> None:
    if quant is None:
        assert_norm_close(actual.q, expected.q, "q")
    elif quant == "mxfp4":
        assert_mxfp4_close(actual.q, actual.q_scale, expected.q, expected.q_scale)  # type: ignore[arg-type]
    else:
        assert_fp8_close(actual.q, expected.q)
        assert_scales_close(actual.q_scale, expected.q_scale)  # type: ignore[arg-type]
    for name in ("k", "q_unquantized", "q_residual_out"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert (a is None) == (e is None), name
        if a is not None:
            assert_norm_close(a, e, name)
    if actual.q_residual_out is not None:
        assert torch.equal(actual.q_residual_out, expected.q_residual_out)  # the sum is exact (SPEC §4.1)


# ----------------------------------------------------------------------------- routing per generation

# (kind, call options, aiter entry expected to run; None: the request must go to the next backend)
ROUTES = [
    ("unified", {}, "unified"),
    ("unified", {"k": False}, "group_quant_v14"),  # the No mode needs k: the no-quant mode (#3010) serves it
    ("unified", {"quant": "fp8_group"}, "unified"),
    (
        "unified",
        {"quant": "fp8_group", "group_size": 64, "gemma_norm": True, "residual": True, "return_unquantized": True},
        "unified",
    ),
    ("unified", {"quant": "fp8_group", "transpose_scale": True}, "unified"),
    ("unified", {"quant": "fp8_group", "group_size": 32}, "unified"),
    ("unified", {"quant": "fp8_token", "residual": True}, "unified"),
    ("unified", {"quant": "mxfp4"}, "unified"),
    ("unified", {"residual": True}, "group_quant_v14"),  # No would ignore the residual; no-quant applies it
    ("unified", {"gemma_norm": True}, "group_quant_v14"),  # ... and gemma
    ("unified", {"quant": "fp8_tensor"}, None),  # aiter has no per_Tensor
    ("unified", {"quant": "fp8_group", "group_size": 256}, None),  # the dispatch switch takes 32/64/128
    ("unified", {"quant": "fp8_group", "fp8_dtype": FNUZ}, None),  # a gfx950 aiter writes e4m3fn
    ("unified", {"n1": 1540}, None),  # qknorm's own rule: widths multiples of 8
    ("unified", {"n1": 9216, "quant": "fp8_group"}, None),  # aiter stops at 8192
    ("unified_v15", {"quant": "mxfp4"}, None),  # round_pow2(amax)/4 before #3212
    ("unified_v15", {"k": False, "residual": True}, "group_quant_v14"),
    ("unified_v14", {"quant": "fp8_token"}, "unified"),
    ("unified_v14", {"k": False}, "group_quant_v14"),
    ("no_quant", {}, "group_quant_v14"),  # #3010 came before the unified entry (#2958)
    ("no_quant", {"k": False, "gemma_norm": True, "residual": True}, "group_quant_v14"),
    ("no_quant", {"quant": "fp8_token"}, None),
    ("group_quant", {"quant": "fp8_group", "gemma_norm": True, "residual": True}, "group_quant_v13"),
    ("group_quant", {"quant": "fp8_group", "transpose_scale": True, "return_unquantized": True}, "group_quant_v13"),
    ("group_quant", {"quant": "mxfp4"}, None),  # pre-#3212 E8M0 rule
    ("group_quant", {}, "legacy"),  # v0.1.13 has no no-quant mode: the legacy entry normalizes
    ("group_quant", {"k": False}, None),  # ... but needs k
    ("group_quant", {"quant": "fp8_token"}, None),  # per-token arrived in #2958
    ("group_quant_v12", {"quant": "fp8_group"}, "group_quant_v12"),  # split views through contiguous copies
    ("group_quant_v12", {"quant": "fp8_group", "residual": True, "transpose_scale": True}, "group_quant_v12"),
    ("group_quant_v12", {"quant": "fp8_group", "gemma_norm": True}, None),  # gemma arrived in #2853
    ("private", {}, "private"),
    ("private", {"quant": "fp8_group"}, None),
    ("legacy", {}, "legacy"),
    ("legacy", {"k": False}, None),
    ("legacy", {"gemma_norm": True}, None),
    ("drifted_unified", {}, "group_quant_v14"),  # fused_qk_rmsnorm changed shape: bound by signature
    ("drifted_unified", {"quant": "fp8_token"}, "per_token"),
    ("drifted_unified", {"quant": "fp8_group", "transpose_scale": True}, "group_quant_v14"),
]


def refusals() -> list[str]:
    """Request kinds the aiter backend refused after aiter raised (each one is a qknorm bug)."""
    details = registry.get_backend("aiter").describe()  # type: ignore[attr-defined]
    return [key for key in details if key.startswith("refused")]


@pytest.mark.parametrize(("kind", "opts", "entry"), ROUTES)
def test_each_generation_serves_what_it_computes_as_specified(kind: str, opts: dict[str, Any], entry: str | None):
    opts = dict(opts)
    shape = {"n1": opts.pop("n1", 1536), "k": opts.pop("k", True), "residual": opts.pop("residual", False)}
    inp = inputs(**shape)  # type: ignore[arg-type]
    with fake_aiter.install(kind, arch="gfx950") as fake:
        with using("aiter,torch"), warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            actual = functional(inp, **opts)
            assert refusals() == []  # aiter never raised: supports() knew its checks
        assert fallback_warnings(record) == []  # working installs never warn
        assert fake.calls == ([entry, entry] if entry else [])  # the behavioural probe, then the call
        with using("torch"):
            expected_out = functional(inp, **opts)
    assert_outputs_match(actual, expected_out, opts.get("quant"))


def test_explicit_aiter_that_cannot_serve_says_why():
    with fake_aiter.install("unified"), using("aiter"):
        with pytest.raises(registry.BackendError, match=r"does not implement per-tensor FP8"):
            functional(inputs(), quant="fp8_tensor")


@pytest.mark.parametrize(("arch", "served", "passed"), [("gfx942", FNUZ, FN), ("gfx950", FN, FNUZ)])
def test_fp8_flavour_follows_what_aiter_reports(arch: str, served: torch.dtype, passed: torch.dtype):
    inp = inputs()
    with fake_aiter.install("unified", arch=arch) as fake, using("aiter,torch"):
        assert fake.fp8_dtype == served
        out = functional(inp, quant="fp8_group", fp8_dtype=served)
        assert fake.calls == ["unified", "unified"]  # probe and call
        functional(inp, quant="fp8_token", fp8_dtype=passed)
        assert fake.calls == ["unified", "unified"]  # the other flavour went to torch
    with using("torch"):
        assert_outputs_match(out, functional(inp, quant="fp8_group", fp8_dtype=served), "fp8_group")


# ----------------------------------------------------------------------------- layouts aiter does not take as they are


def aiter_and_torch(call: Any, *buffers: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Run ``call(*buffers)`` on the fake aiter and on torch, each into its own copy of ``buffers``."""
    mine = [b.clone() for b in buffers]
    ref = [b.clone() for b in buffers]
    with fake_aiter.install("unified", arch="gfx950") as fake:
        with using("aiter,torch"):
            call(*mine)
        calls = sorted(set(fake.calls))
        assert refusals() == []
    with using("torch"):
        call(*ref)
    return mine, ref, calls


@pytest.mark.parametrize("layout", ["column-major view", "contiguous read as [G, m]", "padded column-major"])
def test_transposed_scales_reach_aiter_in_its_layout(layout: str):
    inp, m, groups = inputs(), 5, 12
    nan = float("nan")
    storage = torch.full((groups, m + 3), nan)  # padding columns must stay NaN
    scale_view = {
        "column-major view": lambda s: s[:, :m].contiguous().t(),
        "contiguous read as [G, m]": lambda s: s.reshape(-1)[: m * groups].view(m, groups),
        "padded column-major": lambda s: s[:, :m].t(),
    }[layout]

    def call(q8: torch.Tensor, storage: torch.Tensor, k_out: torch.Tensor) -> None:
        qknorm.fused_qk_rmsnorm_group_quant(q8, scale_view(storage), inp["q"], inp["q_weight"], 1e-6, k_out=k_out,
                                            k=inp["k"], k_weight=inp["k_weight"], transpose_scale=True)  # fmt: skip

    (q8, s, k_out), (q8_ref, s_ref, k_ref), calls = aiter_and_torch(
        call, torch.zeros(m, 1536, dtype=FN), storage, torch.empty(m, 512, dtype=torch.bfloat16)
    )
    assert calls == ["unified"]
    assert_fp8_close(q8, q8_ref)
    assert_scales_close(s, s_ref)  # same storage layout: compares written scales and untouched padding
    assert_norm_close(k_out, k_ref, "k_out")


def test_strided_scales_and_misaligned_outputs_go_through_a_copy():
    inp, m = inputs(), 5
    nan = float("nan")

    def call(q8: torch.Tensor, scale_buf: torch.Tensor, unq_buf: torch.Tensor) -> None:
        qknorm.fused_qk_rmsnorm_per_token_quant(q8, scale_buf[:, :1], inp["q"], inp["q_weight"], 1e-6,
                                                q_out_unquantized=unq_buf[:, 1 : 1 + 1536])  # fmt: skip

    (q8, scale, unq), (q8_r, scale_r, unq_r), calls = aiter_and_torch(
        call, torch.zeros(m, 1536, dtype=FN), torch.full((m, 4), nan), torch.full((m, 1539), nan, dtype=torch.bfloat16)
    )
    assert calls == ["unified"]
    assert_fp8_close(q8, q8_r)
    assert_scales_close(scale, scale_r)  # includes the untouched columns 1..3
    assert_norm_close(unq, unq_r, "q_out_unquantized (with its untouched neighbours)")


def test_in_place_k_and_misaligned_input_view():
    buf = torch.randn(4, 1 + 1536 + 512).bfloat16()
    q, k = buf[:, 1:1537], buf[:, 1537:]  # base pointers 2 bytes off 16-byte alignment
    w_q, w_k = torch.randn(1536).bfloat16(), torch.randn(512).bfloat16()

    def call(buf: torch.Tensor, q_out: torch.Tensor) -> None:
        k_view = buf[:, 1537:]
        qknorm.fused_qk_rmsnorm(q_out, None, buf[:, 1:1537], w_q, 1e-6, k_out=k_view, k=k_view, k_weight=w_k)

    (b, q_out), (b_ref, q_ref), calls = aiter_and_torch(call, buf, torch.empty(4, 1536, dtype=torch.bfloat16))
    assert calls == ["unified"]
    assert_norm_close(q_out, q_ref, "q_out")
    assert_norm_close(b, b_ref, "k normalized in place")
    assert torch.equal(b[:, :1537], buf[:, :1537])  # q untouched, as q_out was separate
    del q, k


# ----------------------------------------------------------------------------- broken installs

CAUSES = {
    "missing_module": "No module named 'aiter.ops.fused_qk_rmsnorm_group_quant'",
    "renamed_symbol": "has no fused_qk_rmsnorm",
    "changed_signature": "unexpected signature",
    "import_oserror": "OSError: libamdhip64.so",
    "jit_build_failure": "failed to build or load on first use",
}


@pytest.mark.parametrize("kind", fake_aiter.BROKEN_KINDS)
def test_import_never_fails_with_a_broken_aiter(kind: str, tmp_path: Path):
    fake_aiter.write_fake_aiter(tmp_path, kind)
    code = (
        "import json, sys, torch\n"
        "import qknorm\n"
        "assert 'aiter' not in sys.modules\n"
        "out = qknorm.qk_rmsnorm(torch.ones(2, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16))\n"
        "assert 'aiter' not in sys.modules  # the default priority never probes aiter on the CPU\n"
        "from qknorm.backends import registry\n"
        "info = {i.name: i for i in registry.describe()}['aiter']\n"
        "print(json.dumps({'available': info.available, 'reason': info.reason, 'q': out.q.float().sum().item()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    env.pop(registry.ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["q"] == pytest.approx(128.0, rel=1e-2)  # ones normalize to ones
    if kind in CAUSES and kind != "jit_build_failure":
        assert report["available"] is False
        assert CAUSES[kind] in report["reason"]
    else:  # the probe succeeds: these break only when called
        assert report["available"] is True and "bound unified" in report["reason"]


@pytest.mark.parametrize("priority", ["aiter,torch", None])
@pytest.mark.parametrize("kind", sorted(CAUSES))
def test_broken_aiter_falls_back_with_exactly_one_warning(kind: str, priority: str | None):
    inp = inputs()
    with fake_aiter.install(kind), using(priority), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plain = functional(inp)
        fp8 = functional(inp, quant="fp8_group")
        functional(inputs(m=9, seed=1), quant="mxfp4")
    messages = fallback_warnings(record)
    assert len(messages) == 1, messages
    assert messages[0].startswith("qknorm backend aiter is unavailable") and CAUSES[kind] in messages[0]
    with using("torch"):
        assert_outputs_match(plain, functional(inp), None)
        assert_outputs_match(fp8, functional(inp, quant="fp8_group"), "fp8_group")


@pytest.mark.parametrize("kind", sorted(CAUSES))
def test_explicit_aiter_with_a_broken_aiter_raises_a_clear_error(kind: str):
    with fake_aiter.install(kind), using("aiter"):
        with pytest.raises(registry.BackendError) as info:
            functional(inputs())
    msg = str(info.value)
    assert "QKNORM_BACKEND=aiter" in msg and CAUSES[kind] in msg
    if kind == "jit_build_failure":
        assert isinstance(info.value.__cause__, BackendUnavailable)


def test_an_aiter_raising_on_every_call_is_refused_by_its_probe_and_never_called_again(caplog):
    inp = inputs()
    with fake_aiter.install("runtime_error") as fake, using("aiter,torch"):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            first = functional(inp)
            functional(inp)
        # One probe per entry that could serve a plain request, each refused; both calls went to torch.
        assert fake.calls == ["unified", "group_quant_v14", "private"]
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 3
        assert all("aiter 0.1.16 raised RuntimeError: HIP error: invalid device function" in e for e in errors)
        why = registry.explain(build_request(q=inp["q"], q_weight=inp["q_weight"], q_epsilon=1e-6,
                                             q_out=torch.empty(5, 1536, dtype=torch.bfloat16))).skipped  # fmt: skip
        assert "HIP error: invalid device function" in why[0][1]
    assert fallback_warnings(record) == []  # not a broken install: a refused kind, logged once
    with using("torch"):
        assert_outputs_match(first, functional(inp), None)


def test_many_threads_one_probe_one_warning():
    with fake_aiter.install("import_oserror") as fake, using("aiter,torch"):
        barrier = threading.Barrier(12)
        results: list[object] = []

        def worker(seed: int) -> None:
            inp = inputs(m=2 + seed % 3, seed=seed)
            barrier.wait()
            results.append(functional(inp))

        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(results) == 12
        assert fake.imports == 1  # a failing import runs aiter/__init__.py on every attempt: one probe
    assert len(fallback_warnings(record)) == 1


def test_production_backend_never_hands_cpu_tensors_to_aiter():
    with fake_aiter.install("unified", cpu=False) as fake, using("aiter"):
        with pytest.raises(registry.BackendError, match="aiter runs on cuda devices"):
            functional(inputs())
        assert fake.calls == []
        assert registry.probe("aiter")[0] is True  # the fake is bound; only the device rules it out


@pytest.mark.skipif(importlib.util.find_spec("aiter") is not None, reason="aiter is installed here")
def test_missing_aiter_is_quietly_unavailable():
    assert AiterBackend().available() == (False, "aiter is not installed")
    with using("aiter,torch"), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        functional(inputs())
    assert fallback_warnings(record) == []
    assert "aiter" not in sys.modules


# ----------------------------------------------------------------------------- what the probe reports


def test_describe_names_each_bound_generation_and_why_others_did_not_bind():
    with fake_aiter.install("drifted_unified"):
        info = {i.name: i for i in registry.describe()}["aiter"]
    assert info.available and info.reason == "aiter 0.1.16: bound group_quant, private"
    d = info.details
    assert d["bound (preferred): group_quant"].startswith(
        "aiter.ops.fused_qk_rmsnorm_group_quant.fused_qk_rmsnorm_group_quant (aiter v0.1.12)"
    )
    for feature in ("fp8 token", "mxfp4", "plain incl. q-only, residual, gemma", "gemma"):
        assert feature in d["bound (preferred): group_quant"], feature
    assert d["bound: private"].startswith("aiter.ops.fused_qk_norm_rope_cache_quant._fused_qk_rmsnorm")
    assert "unexpected signature" in d["not bound: unified"]
    assert "has no fused_qk_rmsnorm" in d["not bound: legacy"]
    assert d["fp8 dtype"] == "torch.float8_e4m3fn"


def test_install_restores_modules_path_and_registry():
    path_before = list(sys.path)
    with fake_aiter.install("unified"):
        assert registry.get_backend("aiter").device_types == ("cuda", "cpu")  # type: ignore[attr-defined]
        registry.probe("aiter")
        assert "aiter" in sys.modules
    assert sys.path == path_before
    assert not [n for n in sys.modules if n == "aiter" or n.startswith("aiter.")]
    assert registry.get_backend("aiter").device_types == ("cuda",)  # type: ignore[attr-defined]
    assert registry.set_policy(None) is registry.default_policy


def test_signature_shapes():
    def unified_like(q_out, q, q_weight, q_eps, k_out, k, k_weight, k_eps, extra=None):  # type: ignore[no-untyped-def]
        pass

    def new_required(q_out, q, q_weight, q_eps, k_out, k, k_weight, k_eps, cache):  # type: ignore[no-untyped-def]
        pass

    params = ("q_out", "q", "q_weight", "q_eps", "k_out", "k", "k_weight", "k_eps")
    assert shape_mismatch(unified_like, params) is None  # optional trailing parameters are fine
    assert "unexpected required parameter 'cache'" in (shape_mismatch(new_required, params) or "")
    assert "unexpected signature" in (shape_mismatch(unified_like, ("q", "q_weight")) or "")
    assert "no readable signature" in (shape_mismatch(torch.add, params) or "")


def test_build_failures_are_told_from_runtime_errors():
    def aiter_build_failure() -> RuntimeError:
        try:
            raise subprocess.CalledProcessError(1, ["hipcc"])
        except subprocess.CalledProcessError:
            try:
                raise RuntimeError("[aiter] build [module_fused_qk_rmsnorm_group_quant] under /jit failed !!!!!!")
            except RuntimeError as exc:
                return exc

    assert is_build_failure(aiter_build_failure())
    assert is_build_failure(OSError("undefined symbol: _ZN5aiter"))
    assert not is_build_failure(RuntimeError("HIP error: an illegal memory access was encountered"))
    assert not is_build_failure(ValueError("q_out_scale must have shape [m, 1]"))


# ----------------------------------------------------------------------------- the fakes themselves


def test_fake_unified_reproduces_aiter_quirks():
    """Engines test against these fakes, so they must behave like aiter where aiter departs from SPEC."""
    inp = inputs(residual=True)
    with fake_aiter.install("unified"):
        import aiter.ops.fused_qk_rmsnorm_group_quant as gq  # the fake
        from aiter.ops.enum import QuantType

        plain = torch.empty(5, 1536, dtype=torch.bfloat16)
        k_out = torch.empty(5, 512, dtype=torch.bfloat16)
        ignored = torch.full((5, 1536), float("nan"), dtype=torch.bfloat16)
        gq.fused_qk_rmsnorm(plain, None, inp["q"], inp["q_weight"], 1e-6, q_out_unquantized=ignored, k_out=k_out,
                            q_res_out=torch.empty_like(plain), k=inp["k"], k_weight=inp["k_weight"], k_epsilon=1e-6,
                            q_residual=inp["q_residual"], gemma_norm=True)  # fmt: skip
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'dtype'"):
            gq.fused_qk_rmsnorm(plain, None, inp["q"], inp["q_weight"], 1e-6)  # No needs k (#3159 on)
        with pytest.raises(NotImplementedError):
            gq.fused_qk_rmsnorm(torch.empty(5, 1536, dtype=FN), torch.empty(1), inp["q"], inp["q_weight"],
                                quant_type=QuantType.per_Tensor)  # fmt: skip
        with pytest.raises(ValueError, match="fp8/fp4x2"):
            gq.fused_qk_rmsnorm_group_quant(torch.empty(5, 1536, dtype=FNUZ), torch.empty(5, 12), inp["q"],
                                            inp["q_weight"])  # fmt: skip
        assert int(QuantType.No) == 0 and QuantType.No != 0 and QuantType.per_1x32 == QuantType.per_1x32  # pybind11
    assert torch.isnan(ignored.float()).all()  # q_out_unquantized ignored
    with using("torch"):
        expected = qknorm.qk_rmsnorm(inp["q"], inp["q_weight"], inp["k"], inp["k_weight"])  # no residual, no gemma
    assert_norm_close(plain, expected.q, "No mode ignores q_residual and gemma_norm")
    assert_norm_close(k_out, expected.k, "k_out")


def test_fake_legacy_returns_new_tensors():
    inp = inputs()
    with fake_aiter.install("legacy"):
        from aiter.ops.fused_qk_norm_rope_cache_quant import fused_qk_rmsnorm

        q_out, k_out = fused_qk_rmsnorm(inp["q"], inp["q_weight"], 1e-6, inp["k"], inp["k_weight"], 1e-6)
    assert q_out.is_contiguous() and q_out.data_ptr() != inp["q"].data_ptr()
    with using("torch"):
        expected_q, expected_k = qknorm.fused_qk_rmsnorm_legacy(inp["q"], inp["q_weight"], 1e-6, inp["k"],
                                                                inp["k_weight"], 1e-6)  # fmt: skip
    assert_norm_close(q_out, expected_q, "q_out")
    assert_norm_close(k_out, expected_k, "k_out")


def test_request_modes_cover_the_spec():
    """Every QuantMode is either routed to aiter or declared unsupported with a reason (never both unknown)."""
    with fake_aiter.install("unified"):
        backend = registry.get_backend("aiter")
        registry.probe("aiter")
        for mode, quant, scale in [
            (QuantMode.FP8_TENSOR, torch.empty(2, 64, dtype=FN), torch.empty(1)),
            (QuantMode.FP8_TOKEN, torch.empty(2, 64, dtype=FN), torch.empty(2, 1)),
        ]:
            q = torch.randn(2, 64).bfloat16()
            req = build_request(q=q, q_weight=torch.ones(64, dtype=torch.bfloat16), q_epsilon=1e-6, mode=mode,
                                q_out_quantized=quant, q_out_scale=scale)  # fmt: skip
            why = backend.supports(req)
            assert (why is None) == (mode is QuantMode.FP8_TOKEN), why
