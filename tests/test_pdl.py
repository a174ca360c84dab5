"""Programmatic dependent launch (``qknorm.set_pdl``): the switch, which launches use it, and on a
GPU that its launches compute what plain launches do, also when they start while the kernel that
writes their inputs still runs."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator

import pytest
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, globaltimer

import qknorm
from qknorm.backends import registry
from qknorm.backends import triton_backend as tb
from qknorm.backends.triton_launch import PDL_OFF, PDL_TRIGGER, PDL_WAIT, launch_options, pdl_supported
from qknorm.checks import build_request
from qknorm.quant import QuantMode
from qknorm.rope import triton_launch as rope_launch
from qknorm.rope.checks import plan_call

SM90 = torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability() >= (9, 0)
sm90 = pytest.mark.skipif(not SM90, reason="programmatic dependent launch needs an NVIDIA GPU of sm_90 or later")


@pytest.fixture
def pdl_off_after() -> Iterator[None]:
    yield
    qknorm.set_pdl(False)


def test_set_pdl_switches_and_chooses_backends_again(pdl_off_after: None) -> None:
    assert not qknorm.pdl_enabled()
    q, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)
    qknorm.qk_rmsnorm(q, w)
    chosen = dict(registry._state.choices)
    assert chosen
    qknorm.set_pdl(True)
    assert qknorm.pdl_enabled()
    assert registry._state.choices == {}  # compiled variants differ: the backends start over
    qknorm.qk_rmsnorm(q, w)
    qknorm.set_pdl(True)  # no change, no reset
    assert registry._state.choices
    qknorm.set_pdl(False)
    assert not qknorm.pdl_enabled()


@pytest.mark.parametrize("value", [1, "yes", None])
def test_set_pdl_takes_a_bool_only(value: object) -> None:
    with pytest.raises(TypeError, match=r"set_pdl: enabled must be a bool, got"):
        qknorm.set_pdl(value)  # type: ignore[arg-type]
    assert not qknorm.pdl_enabled()


def test_set_pdl_refuses_to_switch_during_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switching inside a CUDA-graph capture would choose backends and compile kernels there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"set_pdl\(True\): the current CUDA stream is capturing a graph"):
        qknorm.set_pdl(True)
    assert not qknorm.pdl_enabled()
    qknorm.set_pdl(False)  # no change: nothing to refuse


@pytest.mark.parametrize("operator", ["fused_qk_rmsnorm", "qk_norm_rope"])
def test_set_pdl_after_warmup_warns(operator: str, pdl_off_after: None, caplog: pytest.LogCaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A switch after either operator's warmup discards what it prepared: the log says to warm up
    again. Before any warmup it says nothing."""
    warmup_module = importlib.import_module("qknorm.warmup")
    monkeypatch.setattr(warmup_module, "_warmed", False)
    with caplog.at_level(logging.WARNING, logger="qknorm"):
        qknorm.set_pdl(True)
        qknorm.set_pdl(False)
    assert "after qknorm.warmup" not in caplog.text
    if operator == "qk_norm_rope":
        qknorm.warmup(operator, 4, 2, 16, device="cpu", max_tokens=3)
    else:
        qknorm.warmup(operator, 64, 32, device="cpu", max_tokens=3)
    with caplog.at_level(logging.WARNING, logger="qknorm"):
        qknorm.set_pdl(True)
    assert "set_pdl(True) after qknorm.warmup" in caplog.text and "warm up again" in caplog.text


def test_pdl_is_used_on_sm90_cuda_only(pdl_off_after: None) -> None:
    cpu = torch.device("cpu")
    assert not pdl_supported(cpu, interpret=False)
    qknorm.set_pdl(True)
    assert not pdl_supported(cpu, interpret=False)
    assert not pdl_supported(cpu, interpret=True)
    if torch.cuda.is_available():
        assert pdl_supported(torch.device("cuda"), interpret=False) == SM90
        assert not pdl_supported(torch.device("cuda"), interpret=True)


def _plan(mode: str, m: int = 4) -> tb._Plan:
    """The Triton plan of a DeepSeek call (q 1536, k 512) with PDL as an sm_90 GPU would have it."""
    q, k = torch.randn(m, 1536, dtype=torch.bfloat16), torch.randn(m, 512, dtype=torch.bfloat16)
    fields = dict(q=q, q_weight=torch.ones(1536, dtype=torch.bfloat16), k=k, k_weight=torch.ones(512, dtype=torch.bfloat16),
                  k_out=torch.empty_like(k))  # fmt: skip
    if mode == "norm":
        fields["q_out"] = torch.empty_like(q)
    else:
        fields["q_out_quantized"] = torch.empty(m, 1536, dtype=torch.float8_e4m3fn)
        fields["q_out_scale"] = torch.empty((1,) if mode == "tensor" else (m, 12), dtype=torch.float32)
        fields["mode"] = QuantMode.FP8_TENSOR if mode == "tensor" else QuantMode.FP8_GROUP
        fields["group_size"] = None if mode == "tensor" else 128
    req = build_request(**fields)
    be = tb.TritonBackend()
    be.available()
    plan = be._plan(req, req.key())
    plan.pdl = True
    return plan


@pytest.mark.parametrize("mode", ["norm", "groups", "hw_groups", "tensor"])
def test_pdl_rule_of_the_first_operator(mode: str) -> None:
    """Every bucket waits and lets the next kernel launch, but for the two cells that measured
    slower that way (triton_backend._pdl): there the programs only wait."""
    plan = _plan("groups" if mode == "hw_groups" else mode)
    plan.hw_groups = mode == "hw_groups"
    got = {tb._bucket_hi(b): tb._config(plan, b).pdl for b in range(len(tb._BUCKETS) + 1)}
    wait = {"hw_groups": {32768, 1 << 20}, "tensor": {8192}}.get(mode, set())
    assert got == {m: PDL_WAIT if m in wait else PDL_TRIGGER for m in got}
    plan.pdl = False
    assert {tb._config(plan, b).pdl for b in range(len(tb._BUCKETS) + 1)} == {PDL_OFF}


@pytest.mark.parametrize("fp8_cache", [False, True], ids=["bf16", "fp8"])
def test_pdl_rule_of_qk_norm_rope(fp8_cache: bool) -> None:
    q, k = torch.randn(2, 32, 128, dtype=torch.bfloat16), torch.randn(2, 8, 128, dtype=torch.bfloat16)
    cache = None
    if fp8_cache:
        v = torch.randn(2, 8, 128, dtype=torch.bfloat16)
        cache = dict(v=v, k_cache=torch.empty(4, 16, 8, 128, dtype=torch.float8_e4m3fn),
                     v_cache=torch.empty(4, 16, 8, 128, dtype=torch.float8_e4m3fn), slot_mapping=torch.arange(2),
                     k_scale=torch.ones(1), v_scale=torch.ones(1))  # fmt: skip
    plan = plan_call(q, k, None, None, None, None, **(cache or {}))
    assert plan.cache_fp8 == fp8_cache
    got = {t: rope_launch.launch_config(plan, t, pdl=True).pdl for t in (1, 16, 17, 64, 65, 256, 512, 513, 65536)}
    first_wait = 17 if fp8_cache else 65
    assert got == {t: PDL_WAIT if first_wait <= t <= 512 else PDL_TRIGGER for t in got}
    assert rope_launch.launch_config(plan, 1).pdl == PDL_OFF


def test_interpreter_ignores_pdl(pdl_off_after: None) -> None:
    """With PDL on, CPU calls (the interpreter, or the torch backend) give what they gave before."""
    q, k = torch.randn(5, 96, dtype=torch.bfloat16), torch.randn(5, 32, dtype=torch.bfloat16)
    wq, wk = torch.rand(96, dtype=torch.bfloat16), torch.rand(32, dtype=torch.bfloat16)
    before = qknorm.qk_rmsnorm(q, wq, k, wk, quant="fp8_group", group_size=32)
    qknorm.set_pdl(True)
    after = qknorm.qk_rmsnorm(q, wq, k, wk, quant="fp8_group", group_size=32)
    for a, b in zip(before, after):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ----------------------------------------------------------------------------- GPU


@triton.jit
def _late_copy(SRC, DST, n, DELAY_NS: tl.constexpr, BLOCK: tl.constexpr):
    """DST = SRC, written DELAY_NS after the kernel lets the next one launch: a kernel launched
    with PDL behind it that did not wait would read DST's old contents."""
    gdc_launch_dependents()
    start = globaltimer()
    while globaltimer() - start < DELAY_NS:
        pass
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(DST + o, tl.load(SRC + o, mask=o < n), mask=o < n)


def _write_late(src: torch.Tensor, dst: torch.Tensor) -> None:
    n = src.numel()
    _late_copy[(triton.cdiv(n, 1024),)](src, dst, n, DELAY_NS=20_000, BLOCK=1024, num_warps=4)


def _outputs(result: tuple) -> list[torch.Tensor]:
    return [t.view(torch.uint8) for t in result if t is not None]


def _graph_chain(write: Callable[[int], None], op: Callable[[], list[torch.Tensor]], n: int) -> list[list[torch.Tensor]]:
    """In one CUDA graph, ``n`` times: a kernel writes the inputs late (``write(i)``, after letting
    the next kernel launch), then ``op`` reads them; each op's outputs are copied aside. Returns
    the copies after a replay."""
    write(0)
    shapes = op()
    kept = [[torch.empty_like(t) for t in shapes] for _ in range(n)]

    def body() -> None:
        for i in range(n):
            write(i)
            for dst, src in zip(kept[i], op()):
                dst.copy_(src)

    body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for row in kept:
        for t in row:
            t.fill_(0xA5)
    graph.replay()
    torch.cuda.synchronize()
    return kept


def _assert_pdl_chain_matches(sources: list[torch.Tensor], target: torch.Tensor,
                              op: Callable[[], list[torch.Tensor]]) -> None:  # fmt: skip
    """``op`` reads ``target`` after each source is written there: eagerly with plain launches,
    then with PDL in :func:`_graph_chain` behind the late writer. Every output bit for bit the same."""
    expected = []
    for s in sources:
        target.copy_(s)
        expected.append([t.clone() for t in op()])
    qknorm.set_pdl(True)
    got = _graph_chain(lambda i: _write_late(sources[i], target), op, len(sources))
    for i, (row, ref) in enumerate(zip(got, expected)):
        assert len(row) == len(ref)
        for j, (a, b) in enumerate(zip(row, ref)):
            assert torch.equal(a, b), f"call {i}, output {j}"


_MODES = [(None, None, torch.float8_e4m3fn), ("fp8_group", 128, torch.float8_e4m3fn), ("fp8_group", 32, torch.float8_e4m3fn),
          ("fp8_token", None, torch.float8_e4m3fn), ("fp8_tensor", None, torch.float8_e4m3fn), ("mxfp4", 32, torch.float8_e4m3fn),
          ("fp8_group", 128, torch.float8_e4m3fnuz), ("fp8_token", None, torch.float8_e4m3fnuz)]  # fmt: skip


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("m", [1, 300, 5000, 20000])
@pytest.mark.parametrize("quant,gs,fp8", _MODES, ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_pdl_launches_read_what_the_kernel_before_wrote(quant, gs, fp8, m: int, pdl_off_after: None) -> None:
    """A chain of (a kernel writes the DeepSeek latent, qknorm reads its split views) in one CUDA
    graph: with PDL each qknorm launch starts before the writer is done (it lets the next kernel
    launch at once, then writes 20 µs later), and must wait for it. Every output is bit for bit
    what plain launches give eagerly."""
    n = 4 if m > 1000 else 12
    gen = torch.Generator(device="cuda").manual_seed(m)
    sources = [torch.randn(m, 2112, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(n)]
    latent = torch.empty(m, 2112, device="cuda", dtype=torch.bfloat16)
    wq = (1 + 0.1 * torch.randn(1536, device="cuda", generator=gen)).to(torch.bfloat16)
    wk = (1 + 0.1 * torch.randn(512, device="cuda", generator=gen)).to(torch.bfloat16)

    def op() -> list[torch.Tensor]:
        return _outputs(qknorm.qk_rmsnorm(latent[:, :1536], wq, latent[:, 1536:2048], wk, quant=quant, group_size=gs,
                                          fp8_dtype=fp8))  # fmt: skip

    _assert_pdl_chain_matches(sources, latent, op)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("t", [1, 40, 100, 1024])
@pytest.mark.parametrize("fp8_cache", [False, True], ids=["bf16", "fp8"])
def test_gpu_pdl_qk_norm_rope_reads_what_the_kernel_before_wrote(t: int, fp8_cache: bool, pdl_off_after: None) -> None:
    """qk_norm_rope likewise: a kernel writes the packed qkv late, then the op normalizes, rotates
    and writes the paged cache; q, k and both caches bit for bit as with plain launches."""
    hq, hk, d, bs, n = 32, 8, 128, 16, 6
    gen = torch.Generator(device="cuda").manual_seed(t)
    width = (hq + 2 * hk) * d
    sources = [torch.randn(t, width, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(n)]
    qkv = torch.empty(t, width, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hk * d, hk * d], dim=1))
    table = torch.randn(4096, d, device="cuda", dtype=torch.float32, generator=gen)
    pos = torch.randint(0, 4096, (t,), device="cuda", generator=gen)
    blocks = -(-t // bs) + 2
    slots = torch.randperm(blocks * bs, device="cuda", generator=gen)[:t]
    cdt = torch.float8_e4m3fn if fp8_cache else torch.bfloat16
    kc, vc = (torch.zeros(blocks, bs, hk, d, device="cuda", dtype=cdt) for _ in range(2))
    k_out = torch.empty(t, hk, d, device="cuda", dtype=torch.bfloat16)
    scale = torch.full((1,), 0.05, device="cuda") if fp8_cache else None
    wq, wk = (torch.rand(d, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5 for _ in range(2))

    def op() -> list[torch.Tensor]:
        out = qknorm.qk_norm_rope(q, k, wq, wk, table, pos, k_out=k_out, v=v, k_cache=kc, v_cache=vc,
                                  slot_mapping=slots, k_scale=scale, v_scale=scale)  # fmt: skip
        return [out.q.view(torch.uint8), k_out.view(torch.uint8), kc.view(torch.uint8), vc.view(torch.uint8)]

    _assert_pdl_chain_matches(sources, qkv, op)


def test_launch_options_name_only_what_is_set() -> None:
    """Triton's AMD backend raises KeyError on an option it does not know: a launch without a
    register cap or PDL passes options every backend knows; the CUDA-only ones only when set."""
    amd = pytest.importorskip("triton.backends.amd.compiler")
    nvidia = pytest.importorskip("triton.backends.nvidia.compiler")
    plain = launch_options(4)
    assert plain == {"num_warps": 4}
    assert set(plain) <= set(amd.HIPOptions.__dataclass_fields__)
    full = launch_options(1, 80, PDL_TRIGGER)
    assert full == {"num_warps": 1, "maxnreg": 80, "launch_pdl": True}
    assert set(full) <= set(nvidia.CUDAOptions.__dataclass_fields__)
    assert launch_options(2, pdl=PDL_WAIT) == {"num_warps": 2, "launch_pdl": True}


def test_rocm_plans_set_neither_cuda_only_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """On ROCm (torch.version.hip set) no launch configuration of either operator carries a
    register cap or PDL, whatever set_pdl says: their launches pass AMD-known options only."""
    monkeypatch.setattr(torch.version, "hip", "6.3")
    qknorm.set_pdl(True)
    try:
        for mode in ("norm", "groups", "tensor"):
            plan = _plan(mode)
            plan.pdl = pdl_supported(torch.device("cuda"), interpret=False)
            for b in range(len(tb._BUCKETS) + 1):
                cfg = tb._config(plan, b)
                assert cfg.maxnreg is None and cfg.pdl == PDL_OFF, (mode, b, cfg)
    finally:
        qknorm.set_pdl(False)
