"""The benchmark's pure-Python parts on the CPU: bytes, bandwidth, CSV, tables, targets, options.

Nothing here is timed; the timing itself needs a GPU (``python -m qknorm bench``).
"""

from __future__ import annotations

import builtins
import csv
import math
from pathlib import Path

import pytest
import torch

from qknorm import bench, bench_report, testing
from qknorm.bench_report import COPY, Row


def _row(m: int, mode: str, impl: str, graph: float | None, *, layout: str = "contiguous", eager: float | None = None,
         pct: float | None = None) -> Row:  # fmt: skip
    nbytes = bench_report.op_bytes(m, mode)
    return Row(gpu="GPU X", torch="2.11.0", triton="3.6.0", qknorm="0.1.0", date="2026-11-27T12:00Z", m=m,
               layout=layout, mode=mode, impl=impl, graph_us=graph, eager_us=eager, bytes=nbytes,
               gb_s=bench_report.gb_per_s(nbytes, graph), pct_of_copy=pct, buffer_sets=1)  # fmt: skip


# --- bytes and bandwidth -------------------------------------------------------------------------


def test_op_bytes_counts_inputs_weights_and_outputs_once() -> None:
    # M=1, norm: q 1536 + k 512 + weights 1536 + 512 bf16 read = 8192 B; q_out 3072 + k_out 1024 written.
    assert bench_report.op_bytes(1, "norm") == 8192 + 3072 + 1024
    # M=2: reads 2*(2*2048 + 2048) = 12288, k_out 2*2*512 = 2048, plus q's quantized form.
    assert bench_report.op_bytes(2, "fp8_group") == 12288 + 2048 + (2 * 1536 + 4 * 2 * 12)
    assert bench_report.op_bytes(2, "fp8_token") == 12288 + 2048 + (2 * 1536 + 4 * 2)
    assert bench_report.op_bytes(2, "mxfp4") == 12288 + 2048 + (2 * 768 + 2 * 48)
    # DeepSeek at M=65536: 536,875,008 bytes, the figure the copy ceiling is sized from.
    assert bench_report.op_bytes(65536, "norm") == 536_875_008


def test_op_bytes_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        bench_report.op_bytes(1, "fp8_tensor")


def test_bandwidth_and_percent_of_copy() -> None:
    assert bench_report.gb_per_s(12288, 2.0) == pytest.approx(6.144)
    assert bench_report.gb_per_s(536_875_008, 178.61) == pytest.approx(3005.8, rel=1e-4)
    assert bench_report.gb_per_s(100, None) is None
    assert bench_report.gb_per_s(100, 0.0) is None
    assert bench_report.pct_of_copy(1.5, 2.0) == pytest.approx(75.0)
    assert bench_report.pct_of_copy(None, 2.0) is None
    assert bench_report.pct_of_copy(1.5, None) is None


def test_buffer_sets_cover_three_l2_sizes_up_to_the_cap() -> None:
    l2 = 50 * 2**20
    assert bench_report.buffer_sets(8 * 2**20, l2) == 16  # 19 needed, capped
    assert bench_report.buffer_sets(40 * 2**20, l2) == 4  # ceil(150 / 40)
    assert bench_report.buffer_sets(2**30, l2) == 1
    assert bench_report.buffer_sets(40 * 2**20, l2, max_sets=2) == 2


@pytest.mark.parametrize(("est", "budget", "sets", "cap", "expected"), [
    (2.0, 4000, 16, 1000, 992),  # capped at 1000, then down to a multiple of 16
    (200.0, 4000, 1, 1000, 20),
    (200.0, 4000, 3, 1000, 18),  # 20 rounded down to a multiple of 3
    (5000.0, 4000, 4, 1000, 4),  # at least one call per buffer set
])  # fmt: skip
def test_calls_per_graph(est: float, budget: float, sets: int, cap: int, expected: int) -> None:
    n = bench._calls(est, budget, sets, cap)
    assert n == expected
    assert n % sets == 0


# --- options -------------------------------------------------------------------------------------


def test_parse_args_defaults_and_quick() -> None:
    ns = bench.parse_args([])
    assert ns.m == bench_report.DEFAULT_M == (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
    assert ns.modes == ("norm", "fp8_group", "fp8_token", "mxfp4")
    assert ns.layouts == ("contiguous", "strided")
    assert ns.backend == "triton"
    assert not ns.quick
    assert not ns.pdl
    assert bench.parse_args(["--quick"]).m == bench_report.QUICK_M
    assert bench.parse_args(["--pdl"]).pdl


def test_parse_args_lists(tmp_path: Path) -> None:
    ns = bench.parse_args(["--m", "1,16,4096", "--modes", "fp8_group,mxfp4", "--layouts", "strided",
                           "--out", str(tmp_path), "--quick", "--backend", "torch"])  # fmt: skip
    assert ns.m == (1, 16, 4096)  # an explicit --m wins over --quick's list
    assert ns.modes == ("fp8_group", "mxfp4")
    assert ns.layouts == ("strided",)
    assert ns.out == tmp_path
    assert ns.backend == "torch"


@pytest.mark.parametrize("argv", [["--m", "0"], ["--m", "1,x"], ["--modes", "fp8"], ["--layouts", "rowmajor"],
                                  ["--modes", ""]])  # fmt: skip
def test_parse_args_rejects_bad_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_main_without_gpu_exits_with_a_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    assert "needs a CUDA or ROCm GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- CSV, tables, targets, plot ------------------------------------------------------------------


def test_csv_has_the_columns_and_round_trips(tmp_path: Path) -> None:
    rows = [_row(1, "norm", "copy", 1.17, pct=100.0), _row(1, "norm", "qknorm-triton", 2.0, eager=8.5, pct=58.5),
            _row(1, "norm", "liger", None)]  # fmt: skip
    rows[2].note = "graph failed: RuntimeError: boom, with a comma"
    path = tmp_path / "b.csv"
    bench_report.write_csv(rows, path)
    with open(path, newline="") as f:
        raw = list(csv.reader(f))
    assert raw[0] == list(bench_report.CSV_COLUMNS)
    for col in ("gpu", "torch", "triton", "date", "m", "layout", "mode", "impl", "graph_us", "eager_us", "gb_s",
                "pct_of_copy"):  # fmt: skip
        assert col in raw[0]
    liger = dict(zip(raw[0], raw[3]))
    assert liger["graph_us"] == "" and liger["gb_s"] == "" and liger["note"].endswith("with a comma")
    back = bench_report.read_csv(path)
    assert [(r.m, r.mode, r.impl) for r in back] == [(r.m, r.mode, r.impl) for r in rows]
    assert back[1].graph_us == 2.0 and back[1].eager_us == 8.5 and back[1].gb_s == pytest.approx(6.144)
    assert back[2].graph_us is None and back[2].note == rows[2].note


def test_markdown_table_puts_copy_and_qknorm_first() -> None:
    rows = [_row(16, "norm", "torch-eager", 4.43), _row(16, "norm", "copy", 1.27),
            _row(16, "norm", "qknorm-triton", 1.8, eager=7.25, pct=70.55)]  # fmt: skip
    text = bench_report.markdown_tables(rows)
    assert "**norm, contiguous**" in text
    assert "| M | copy graph µs | qknorm-triton graph µs | torch-eager graph µs | qknorm-triton % of copy |" in text
    assert "| 16 | 1.27 | 1.80 | 4.43 | 70.5 | 7.25 |" in text or "| 16 | 1.27 | 1.80 | 4.43 | 70.6 | 7.25 |" in text
    assert "strided" not in text


def _verdicts(rows: list[Row]) -> dict[str, dict[str, str]]:
    return {t["case"]: t for t in bench_report.evaluate_targets(rows)}


def test_targets_met_missed_and_not_measured() -> None:
    q = "qknorm-triton"
    rows = [
        _row(1, "norm", q, 1.9, eager=9.0), _row(256, "norm", q, 2.1, eager=9.5),  # worst 2.1 > 2.0: missed
        _row(1, "norm", "torch-eager", 4.5), _row(256, "norm", "torch-eager", 5.2),
        _row(1, "norm", q, 1.9, layout="strided", eager=9.9),
        _row(4096, "norm", q, 9.0), _row(4096, "norm", q, 9.2, layout="strided"),
        _row(16384, "norm", q, 47.0, pct=98.4), _row(65536, "norm", q, 190.0, pct=94.0),
        _row(65536, "fp8_group", q, 150.0),
    ]  # fmt: skip
    v = _verdicts(rows)
    small = v["fused norm, M ≤ 256, graph replay"]
    assert small["verdict"] == "missed" and small["qknorm"] == "2.10 µs (M=256, contiguous)"
    assert small["best_peer"] == "5.20 µs (M=256, contiguous), torch-eager"
    assert v["fused norm, M = 4096, graph"]["verdict"] == "met"
    assert v["fused norm, M = 4096, graph"]["qknorm"].startswith("9.20 µs (M=4096, strided)")
    bw = v["fused norm, M ≥ 16384, graph"]
    assert bw["verdict"] == "missed" and bw["qknorm"] == "94.00 % (M=65536, contiguous)"
    assert v["norm + FP8 group quant, M = 65536, graph"]["verdict"] == "met"
    assert v["norm + FP8 1x128 group quant of q, M ≤ 256, graph"]["verdict"] == "not measured"
    assert v["per-call latency, public eager API, M = 1"]["verdict"] == "met"  # worst 9.9 µs
    strided = v["strided views vs contiguous, graph"]
    assert strided["verdict"] == "met"  # 1.9 vs 1.9, 9.2 vs 9.0 (+2.2%)
    assert strided["qknorm"] == "2.22 % slower (M=4096, norm)"
    assert "**missed**" in bench_report.targets_markdown(rows)


def test_targets_relative_to_the_copy_the_norm_and_torch() -> None:
    """The H200 targets: quantizing modes against the copy of their bytes, quantizing calls against
    the plain norm of the same run, the plain norm against the copy, eager calls against torch's."""
    q = "qknorm-triton"
    rows = [
        _row(1, "norm", COPY, 1.00), _row(256, "norm", COPY, 1.50),
        _row(1, "norm", q, 1.20, eager=20.0), _row(256, "norm", q, 1.80),  # 0.30 over the copy at 256
        _row(1, "norm", "torch-eager", 4.0, eager=30.0), _row(1, "norm", "torch-compile", 2.6),
        _row(1, "fp8_group", q, 1.30), _row(256, "mxfp4", q, 2.16),  # 2.16 / 1.80 = 1.20x
        _row(1, "fp8_group", "torch-compile", 3.9),
        _row(4096, "fp8_token", q, 10.0, pct=81.0), _row(4096, "mxfp4", q, 10.0, pct=79.5),
        _row(16384, "mxfp4", q, 30.0, pct=90.5), _row(65536, "fp8_group", q, 105.0, pct=98.0),
    ]  # fmt: skip
    v = _verdicts(rows)
    big = v["every quantizing mode, M ≥ 16384, graph"]
    # the worst case names the row counts and modes the run measured (the verdict holds for those)
    assert big["verdict"] == "met"
    assert big["qknorm"] == "90.50 % (M=16384, contiguous, mxfp4; over M = 16384, 65536 and fp8_group, mxfp4)"
    mid = v["every quantizing mode, M = 4096, graph"]
    assert mid["verdict"] == "missed"
    assert mid["qknorm"] == "79.50 % (M=4096, contiguous, mxfp4; over M = 4096 and fp8_token, mxfp4)"
    ratio = v["quantizing call, M ≤ 256, graph"]
    assert ratio["verdict"] == "missed" and ratio["qknorm"] == "1.20 x (M=256, contiguous, mxfp4)"
    assert ratio["best_peer"] == "1.50 x (M=1, contiguous, fp8_group), torch-compile"  # 3.9 / 2.6
    over = v["plain norm, M = 1 and 256, graph"]
    assert over["verdict"] == "missed" and over["qknorm"].startswith("0.30 µs over copy (M=256, contiguous)")
    eager = v["public in-place eager call, M = 1"]
    assert eager["verdict"] == "met" and eager["qknorm"].startswith("0.67 x") and eager["best_peer"] == "—"


def test_strided_target_missed_beyond_three_percent() -> None:
    q = "qknorm-triton"
    rows = [_row(65536, "mxfp4", q, 100.0), _row(65536, "mxfp4", q, 104.0, layout="strided")]
    assert _verdicts(rows)["strided views vs contiguous, graph"]["verdict"] == "missed"


def test_plot_is_skipped_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "p.png"
    assert bench_report.plot([_row(1, "norm", "copy", 1.0)], path) is False
    assert not path.exists()
    assert "matplotlib is not importable" in caplog.text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [_row(m, "norm", impl, t * m**0.5, layout=lay) for m in (1, 16, 256) for impl, t in (("copy", 1.0),
            ("qknorm-triton", 1.5)) for lay in ("contiguous", "strided")]  # fmt: skip
    path = tmp_path / "p.png"
    assert bench_report.plot(rows, path) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- what is timed computes the right thing ------------------------------------------------------


@pytest.mark.parametrize("mode", bench_report.MODES)
def test_peers_and_qknorm_compute_the_same_outputs(mode: str) -> None:
    """The torch peers (uncompiled) and qknorm (torch backend, CPU) produce what the reference does,
    so the benchmark compares equal work; the built-in check passes on them and fails on garbage."""
    gen = torch.Generator().manual_seed(1)
    wq = (1.0 + 0.1 * torch.randn(bench_report.N1, generator=gen)).to(torch.bfloat16)
    wk = (1.0 + 0.1 * torch.randn(bench_report.N2, generator=gen)).to(torch.bfloat16)
    case = bench._make_case(8, "strided", mode, torch.device("cpu"), gen)
    assert case.q.stride() == (bench_report.WIDTH, 1) and case.k.stride() == (bench_report.WIDTH, 1)
    bench._qknorm_call(case, wq, wk, mode)()
    assert bench._check_qknorm(case, wq, wk, mode) == ""

    peer = bench._PEER_FN[mode](case.q, case.k, wq, wk)
    if mode == "norm":
        testing.assert_norm_close(peer[0], case.q_out, "q")
    elif mode == "mxfp4":
        testing.assert_mxfp4_close(peer[0], peer[1], case.q_out, case.q_scale)  # type: ignore[arg-type]
    else:
        testing.assert_fp8_close(peer[0], case.q_out)
        testing.assert_scales_close(peer[1], case.q_scale)  # type: ignore[arg-type]
    testing.assert_norm_close(peer[-1], case.k_out, "k")

    case.k_out[3] = -case.k_out[3]
    assert bench._check_qknorm(case, wq, wk, mode).startswith("CHECK FAILED vs reference: k_out")


def test_check_flags_unwritten_quantized_output() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.ones(bench_report.N1, dtype=torch.bfloat16), torch.ones(bench_report.N2, dtype=torch.bfloat16)
    case = bench._make_case(4, "contiguous", "fp8_group", torch.device("cpu"), gen)
    bench._qknorm_call(case, *w, "fp8_group")()
    case.q_out.view(torch.uint8).zero_()  # as if the kernel never wrote q
    assert "CHECK FAILED" in bench._check_qknorm(case, *w, "fp8_group")
    assert math.isfinite(float(case.q_scale.sum()))  # type: ignore[union-attr]
