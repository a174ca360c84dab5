"""Backend selection: priority, QKNORM_BACKEND, caching, logging, failure containment, thread safety."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import qknorm
from qknorm.backends import registry
from qknorm.backends.base import BackendUnavailable
from qknorm.checks import build_request
from qknorm.quant import QuantMode
from qknorm.reference import qk_rmsnorm_reference
from qknorm.request import QKNormRequest
from qknorm.testing import assert_norm_close

REPO = Path(__file__).resolve().parents[1]
LOGGER = "qknorm.backends.registry"


def make_request(n1: int = 64, n2: int = 32, m: int = 3, seed: int = 0, gemma: bool = False) -> QKNormRequest:
    """A plain q/k request on the CPU with NaN-filled outputs (so an unwritten output shows)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(m, n1, generator=gen).bfloat16()
    k = torch.randn(m, n2, generator=gen).bfloat16()
    return build_request(
        q=q, q_weight=torch.randn(n1, generator=gen).bfloat16(), q_epsilon=1e-6, k=k,
        k_weight=torch.randn(n2, generator=gen).bfloat16(), k_out=torch.full_like(k, float("nan")),
        q_out=torch.full_like(q, float("nan")), gemma_norm=gemma, mode=QuantMode.NONE,
    )  # fmt: skip


def expected(req: QKNormRequest) -> QKNormRequest:
    ref = build_request(
        q=req.q, q_weight=req.q_weight, q_epsilon=req.q_eps, k=req.k, k_weight=req.k_weight, k_epsilon=req.k_eps,
        k_out=torch.empty_like(req.k), q_out=torch.empty_like(req.q), gemma_norm=req.gemma, mode=QuantMode.NONE,
    )  # fmt: skip
    qk_rmsnorm_reference(ref)
    return ref


def assert_matches_reference(req: QKNormRequest) -> None:
    ref = expected(req)
    assert_norm_close(req.q_out, ref.q_out, "q_out")  # type: ignore[arg-type]
    assert_norm_close(req.k_out, ref.k_out, "k_out")  # type: ignore[arg-type]


class FakeBackend:
    """A scripted backend: counts probes and runs, computes with the reference when it runs."""

    def __init__(
        self,
        name: str,
        *,
        available: tuple[bool, str] = (True, "ok"),
        probe_error: Exception | None = None,
        unsupported: str | None = None,
        supports_error: Exception | None = None,
        run_error: Exception | None = None,
        probe_delay: float = 0.0,
    ) -> None:
        self.name = name
        self._available = available
        self._probe_error = probe_error
        self._unsupported = unsupported
        self._supports_error = supports_error
        self._run_error = run_error
        self._probe_delay = probe_delay
        self.probes = 0
        self.runs = 0

    def available(self) -> tuple[bool, str]:
        self.probes += 1
        time.sleep(self._probe_delay)
        if self._probe_error is not None:
            raise self._probe_error
        return self._available

    def supports(self, req: QKNormRequest) -> str | None:
        if self._supports_error is not None:
            raise self._supports_error
        return self._unsupported

    def run(self, req: QKNormRequest) -> None:
        self.runs += 1
        if self._run_error is not None:
            raise self._run_error
        qk_rmsnorm_reference(req)


@pytest.fixture
def register() -> Iterator[Callable[[FakeBackend], FakeBackend]]:
    """Register fake backends for one test; the original factories come back afterwards."""
    saved: list[tuple[str, Callable[[], object] | None]] = []

    def add(backend: FakeBackend) -> FakeBackend:
        saved.append((backend.name, registry.register_backend(backend.name, lambda: backend)))  # type: ignore[arg-type, return-value]
        return backend

    yield add
    for name, previous in reversed(saved):
        registry.register_backend(name, previous)  # type: ignore[arg-type]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def set_env(value: str) -> None:
        monkeypatch.setenv(registry.ENV_VAR, value)
        registry.reset()

    return set_env


def fallback_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, registry.BackendFallbackWarning)]


# ----------------------------------------------------------------------------- default policy and logging


def test_default_priority_on_cpu_uses_torch_without_probing_gpu_backends(register, caplog):
    aiter = register(FakeBackend("aiter"))
    triton = register(FakeBackend("triton"))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    req = make_request()
    assert registry.run_request(req) == "torch"
    assert_matches_reference(req)
    assert aiter.probes == triton.probes == 0  # the policy rules them out before any probe
    skips = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "skipping" in r.getMessage()]
    assert len(skips) == 2
    assert "aiter" in skips[0] and "ROCm" in skips[0]
    assert "triton" in skips[1] and "GPUs only" in skips[1]


def test_decision_is_logged_once_per_request_key(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    for seed in range(3):  # same key: shapes, dtype, mode, flags (data and m do not count)
        registry.run_request(make_request(m=seed + 1, seed=seed))
    registry.run_request(make_request(gemma=True))  # a new key
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "skipping" in r.getMessage()]
    assert len(infos) == 2, infos
    assert all("using backend torch" in m for m in infos)
    assert "gemma" in infos[1]
    assert len(debugs) == 4  # aiter and triton, once per key


def test_default_policy_prefers_aiter_on_rocm_only(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.version, "hip", None)
    assert "ROCm" in (registry.default_policy("aiter", cuda) or "")
    assert registry.default_policy("triton", cuda) is None
    assert "GPUs only" in (registry.default_policy("triton", cpu) or "")
    assert registry.default_policy("torch", cpu) is None
    monkeypatch.setattr(torch.version, "hip", "6.3.0")
    assert registry.default_policy("aiter", cuda) is None
    assert registry.default_policy("aiter", cpu) is not None


def test_set_policy_replaces_the_device_policy_and_can_be_restored(register):
    aiter = register(FakeBackend("aiter", available=(False, "aiter is not installed")))

    def aiter_everywhere(name: str, device: torch.device) -> str | None:
        return None if name == "aiter" else registry.default_policy(name, device)

    previous = registry.set_policy(aiter_everywhere)
    assert previous is registry.default_policy
    try:
        assert registry.run_request(make_request()) == "torch"
        assert aiter.probes == 1  # now walked on the CPU, found unavailable, skipped quietly
    finally:
        assert registry.set_policy(None) is aiter_everywhere
    registry.run_request(make_request(gemma=True))
    assert aiter.probes == 1


# ----------------------------------------------------------------------------- QKNORM_BACKEND


def test_unknown_backend_name_raises_listing_valid_names(env):
    env("torch,cuda_magic")
    with pytest.raises(registry.BackendNameError, match="cuda_magic") as info:
        registry.run_request(make_request())
    assert isinstance(info.value, ValueError) and isinstance(info.value, registry.BackendError)
    assert "valid names: aiter, triton, torch" in str(info.value)
    with pytest.raises(registry.BackendNameError, match="valid names"):
        registry.get_backend("nope")


def test_backend_list_naming_nothing_is_an_error(env):
    env(" , ,")
    with pytest.raises(registry.BackendNameError, match="names no backend"):
        registry.priority()


def test_backend_names_are_trimmed_lowercased_and_deduplicated(env):
    env(" Torch , torch,TRITON ")
    assert registry.priority() == (("torch", "triton"), True)


def test_explicit_backend_that_cannot_serve_raises_with_its_reason(register, env):
    register(FakeBackend("picky", unsupported="needs n1 to be a multiple of 128, got 64"))
    env("picky")
    req = make_request()
    with pytest.raises(registry.BackendError) as info:
        registry.run_request(req)
    msg = str(info.value)
    assert "QKNORM_BACKEND=picky" in msg and "needs n1 to be a multiple of 128, got 64" in msg
    assert torch.isnan(req.q_out.float()).all()  # type: ignore[union-attr]  # nothing written


def test_explicit_list_falls_through_unsupporting_backend_without_warning(register, env):
    picky = register(FakeBackend("picky", unsupported="q-only calls only"))
    env("picky,torch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        req = make_request()
        assert registry.run_request(req) == "torch"
    assert_matches_reference(req)
    assert fallback_warnings(record) == []  # not supporting a request is not a failure
    assert picky.runs == 0


def test_explicit_unavailable_backend_raises(register, env):
    register(FakeBackend("gone", available=(False, "libgone is not installed")))
    env("gone")
    with pytest.raises(registry.BackendError, match="gone: libgone is not installed"):
        registry.run_request(make_request())


def test_reset_rereads_the_environment(register, env):
    register(FakeBackend("alt"))
    env("torch")
    assert registry.run_request(make_request()) == "torch"
    os.environ[registry.ENV_VAR] = "alt,torch"
    assert registry.run_request(make_request()) == "torch"  # cached until reset
    registry.reset()
    assert registry.run_request(make_request()) == "alt"


# ----------------------------------------------------------------------------- failure containment


def test_broken_probe_falls_back_with_exactly_one_warning_naming_the_cause(register, env):
    crashy = register(FakeBackend("crashy", probe_error=OSError("libcrash.so: cannot open shared object file")))
    env("crashy,torch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first, second = make_request(), make_request(gemma=True, seed=1)  # two request keys
        assert registry.run_request(first) == "torch"
        assert registry.run_request(second) == "torch"
    assert_matches_reference(first)
    assert_matches_reference(second)
    messages = fallback_warnings(record)
    assert len(messages) == 1, messages
    assert "crashy" in messages[0] and "OSError" in messages[0] and "libcrash.so" in messages[0]
    assert "using torch" in messages[0]
    assert crashy.probes == 1
    assert registry.probe("crashy") == (False, "probe raised OSError: libcrash.so: cannot open shared object file")


def test_backend_whose_module_fails_to_load_is_unavailable(env):
    def factory() -> registry.Backend:  # type: ignore[name-defined]
        raise ModuleNotFoundError("No module named 'qknorm_missing_backend'")

    previous = registry.register_backend("ghost", factory)
    try:
        env("ghost,torch")
        with pytest.warns(registry.BackendFallbackWarning, match="ModuleNotFoundError"):
            assert registry.run_request(make_request()) == "torch"
        info = {i.name: i for i in registry.describe()}["ghost"]
        assert not info.available and info.broken and "qknorm_missing_backend" in info.reason
    finally:
        registry.register_backend("ghost", previous)


def test_supports_raising_counts_as_broken(register, env):
    register(FakeBackend("buggy", supports_error=KeyError("n3")))
    env("buggy,torch")
    with pytest.warns(registry.BackendFallbackWarning, match="supports\\(\\) raised KeyError"):
        assert registry.run_request(make_request()) == "torch"


def test_first_use_failure_marks_backend_unavailable_and_falls_back_once(register, env):
    jit = register(FakeBackend("jit", run_error=BackendUnavailable("build [module_qk] failed: hipcc exited 1")))
    env("jit,torch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = make_request()
        assert registry.run_request(first) == "torch"
        assert registry.run_request(make_request(seed=3)) == "torch"
        assert registry.run_request(make_request(gemma=True)) == "torch"
    assert_matches_reference(first)
    messages = fallback_warnings(record)
    assert len(messages) == 1, messages
    assert "failed on first use" in messages[0] and "hipcc exited 1" in messages[0]
    assert jit.runs == 1
    assert registry.probe("jit")[0] is False


def test_first_use_failure_of_the_only_named_backend_raises_from_the_cause(register, env):
    register(FakeBackend("jit", run_error=BackendUnavailable("build [module_qk] failed")))
    env("jit")
    with pytest.raises(registry.BackendError, match="failed on first use") as info:
        registry.run_request(make_request())
    assert isinstance(info.value.__cause__, BackendUnavailable)


def test_backend_error_during_a_call_propagates_and_is_never_retried(register, env):
    flaky = register(FakeBackend("flaky", run_error=RuntimeError("HIP error: an illegal memory access")))
    spare = register(FakeBackend("spare"))
    env("flaky,spare")
    for _ in range(2):  # the same backend again: numerics do not depend on history
        req = make_request()
        with pytest.raises(RuntimeError, match="illegal memory access"):
            registry.run_request(req)
        assert torch.isnan(req.q_out.float()).all()  # type: ignore[union-attr]
    assert flaky.runs == 2 and spare.runs == 0


def test_empty_request_selects_nothing(register, env):
    only = register(FakeBackend("only"))
    env("only")
    assert registry.run_request(make_request(m=0)) == "none"
    assert only.probes == 0 and only.runs == 0


# ----------------------------------------------------------------------------- first use: threads, tracing, capture


def test_first_selection_is_thread_safe_one_probe_one_instance(env, caplog):
    made: list[FakeBackend] = []

    def factory() -> FakeBackend:
        backend = FakeBackend("slow", probe_delay=0.05)
        made.append(backend)
        return backend

    previous = registry.register_backend("slow", factory)  # type: ignore[arg-type]
    try:
        env("slow")
        caplog.set_level(logging.INFO, logger=LOGGER)
        barrier = threading.Barrier(16)
        chosen: list[object] = []
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            req = make_request(m=1 + i % 4, seed=i)
            barrier.wait()
            try:
                chosen.append(registry.select(req))
                registry.run_request(req)
            except BaseException as exc:  # collected, asserted below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(made) == 1 and made[0].probes == 1 and made[0].runs == 16
        assert all(b is made[0] for b in chosen)
        assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 1
    finally:
        registry.register_backend("slow", previous)


def test_no_probe_while_torch_compile_traces(register, env, monkeypatch):
    alt = register(FakeBackend("alt"))
    env("alt")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(registry.BackendError, match=r"torch\.compile"):
        registry.select(make_request())
    with pytest.raises(registry.BackendError, match=r"torch\.compile"):
        registry.probe("alt")
    assert alt.probes == 0
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    chosen = registry.select(make_request())  # eager first use decides
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert registry.select(make_request(seed=5)) is chosen  # a cached decision serves traced calls
    assert alt.probes == 1


class _CudaRequest(QKNormRequest):
    """A CPU request that reports a CUDA device (selection reads only the key and the device)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


def test_no_probe_during_cuda_graph_capture(register, env, monkeypatch):
    alt = register(FakeBackend("alt"))
    env("alt")
    base = make_request()
    req = _CudaRequest(base.plan, base.q, base.q_weight, base.k, base.k_weight, base.q_residual, base.q_out,
                       base.q_quant, base.q_scale, base.k_out, base.q_res_out)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(registry.BackendError, match="CUDA-graph capture"):
        registry.select(req)
    assert alt.probes == 0


@pytest.mark.gpu
def test_new_request_during_real_capture_raises_and_warmed_up_capture_replays():
    dev = torch.device("cuda")
    q = torch.randn(4, 256, device=dev, dtype=torch.bfloat16)
    w = torch.randn(256, device=dev, dtype=torch.bfloat16)
    graph = torch.cuda.graph
    with pytest.raises(registry.BackendError, match="CUDA-graph capture"):
        with graph(torch.cuda.CUDAGraph()):
            qknorm.qk_rmsnorm(q, w)
    expected_q = qknorm.qk_rmsnorm(q, w).q  # eager first use: backend chosen, kernel compiled
    g = torch.cuda.CUDAGraph()
    with graph(g):
        out = qknorm.qk_rmsnorm(q, w)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.q, expected_q)


# ----------------------------------------------------------------------------- describe / explain / import


def test_describe_reports_every_backend_without_raising(register):
    register(FakeBackend("crashy", probe_error=RuntimeError("segfault avoided")))
    infos = {i.name: i for i in registry.describe()}
    assert set(infos) == set(registry.backend_names())
    assert infos["torch"].available and not infos["torch"].broken
    assert not infos["crashy"].available and infos["crashy"].broken
    assert "segfault avoided" in infos["crashy"].reason


def test_explain_walks_without_caching_or_logging(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    decision = registry.explain(make_request())
    assert decision.backend == "torch" and not decision.explicit
    assert [name for name, _ in decision.skipped] == ["aiter", "triton"]
    assert [r for r in caplog.records if r.levelno == logging.INFO] == []


def test_import_does_no_selection_work():
    code = (
        "import sys, qknorm\n"
        "from qknorm.backends import registry\n"
        "assert 'aiter' not in sys.modules, 'aiter imported'\n"
        "assert 'qknorm.backends.aiter_backend' not in sys.modules\n"
        "assert registry._state.env is None and not registry._state.availability and not registry._state.instances\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), registry.ENV_VAR: "no_such_backend"}  # never read at import
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
