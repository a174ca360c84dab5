"""The pure-Python half of the benchmark: bytes, bandwidth, the CSV, markdown tables, targets, plot.

Nothing here touches a device, so a CSV measured on a GPU machine can be re-read, re-tabulated
and re-plotted anywhere (:func:`read_csv`, :func:`markdown_tables`, :func:`targets_markdown`,
:func:`plot`). The measuring half is :mod:`qknorm.bench`.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = [
    "DEFAULT_M",
    "QUICK_M",
    "MODES",
    "LAYOUTS",
    "N1",
    "N2",
    "WIDTH",
    "FP8_GROUP",
    "MXFP4_GROUP",
    "QKNORM",
    "COPY",
    "TORCH_EAGER",
    "CSV_COLUMNS",
    "Row",
    "op_bytes",
    "gb_per_s",
    "pct_of_copy",
    "buffer_sets",
    "write_csv",
    "read_csv",
    "fmt",
    "markdown_tables",
    "evaluate_targets",
    "targets_markdown",
    "plot",
]

logger = logging.getLogger(__name__)

DEFAULT_M = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
QUICK_M = (1, 256, 4096, 65536)
MODES = ("norm", "fp8_group", "fp8_token", "mxfp4")
LAYOUTS = ("contiguous", "strided")
N1, N2, WIDTH = 1536, 512, 2112  # DeepSeek MLA: q_lora_rank, kv_lora_rank, fused_qkv_a_proj width
FP8_GROUP, MXFP4_GROUP = 128, 32
QKNORM, COPY = "qknorm", "copy"  # impl names: qknorm rows are "qknorm-<backend>"
TORCH_EAGER = "torch-eager"  # impl name of the peer that runs two eager F.rms_norm calls


def op_bytes(m: int, mode: str, n1: int = N1, n2: int = N2) -> int:
    """Bytes the op must move: q, k and both weights read (bf16), every output written once.

    Outputs: k ``[m, n2]`` bf16 and, for q, ``[m, n1]`` bf16 (``norm``), ``[m, n1]`` FP8 plus
    float32 scales ``[m, n1 / 128]`` (``fp8_group``) or ``[m, 1]`` (``fp8_token``), or
    ``[m, n1 / 2]`` packed E2M1 plus ``[m, n1 / 32]`` E8M0 bytes (``mxfp4``).
    """
    read = 2 * (m * (n1 + n2) + n1 + n2)
    k_out = 2 * m * n2
    q_out = {
        "norm": 2 * m * n1,
        "fp8_group": m * n1 + 4 * m * (n1 // FP8_GROUP),
        "fp8_token": m * n1 + 4 * m,
        "mxfp4": m * (n1 // 2) + m * (n1 // MXFP4_GROUP),
    }
    if mode not in q_out:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return read + k_out + q_out[mode]


def gb_per_s(nbytes: int, us: float | None) -> float | None:
    """Bandwidth in GB/s (1e9 bytes per second) of ``nbytes`` moved in ``us`` microseconds."""
    if us is None or not us > 0:
        return None
    return nbytes / us / 1e3


def pct_of_copy(copy_us: float | None, us: float | None) -> float | None:
    """The impl's bandwidth as a percentage of the device copy's for the same bytes."""
    if copy_us is None or us is None or not us > 0:
        return None
    return 100.0 * copy_us / us


def buffer_sets(nbytes: int, l2_bytes: int, max_sets: int = 16) -> int:
    """Independent buffer sets to rotate over so that they hold >= 3x the L2 (capped at ``max_sets``)."""
    return max(1, min(max_sets, math.ceil(3 * l2_bytes / max(nbytes, 1))))


@dataclass
class Row:
    """One measured (M, layout, mode, impl) case: a row of the CSV."""

    gpu: str
    torch: str
    triton: str
    qknorm: str
    date: str
    m: int
    layout: str
    mode: str
    impl: str
    graph_us: float | None
    eager_us: float | None
    bytes: int
    gb_s: float | None
    pct_of_copy: float | None
    buffer_sets: int
    note: str = ""


CSV_COLUMNS = tuple(f.name for f in fields(Row))


def write_csv(rows: Iterable[Row], path: Path) -> None:
    """Write ``rows`` with a header of :data:`CSV_COLUMNS`; missing numbers are empty cells."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            d = asdict(row)
            writer.writerow({k: _cell(v) for k, v in d.items()})


def _cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}" if abs(v) < 1e6 else f"{v:.1f}"
    return v


def read_csv(path: Path) -> list[Row]:
    """Rows written by :func:`write_csv` (to re-plot or re-evaluate a run elsewhere)."""

    def num(s: str) -> float | None:
        return float(s) if s else None

    with open(path, newline="") as f:
        return [
            Row(gpu=d["gpu"], torch=d["torch"], triton=d["triton"], qknorm=d["qknorm"], date=d["date"],
                m=int(d["m"]), layout=d["layout"], mode=d["mode"], impl=d["impl"], graph_us=num(d["graph_us"]),
                eager_us=num(d["eager_us"]), bytes=int(d["bytes"]), gb_s=num(d["gb_s"]),
                pct_of_copy=num(d["pct_of_copy"]), buffer_sets=int(d["buffer_sets"]), note=d["note"])
            for d in csv.DictReader(f)
        ]  # fmt: skip


def fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _impl_order(rows: Sequence[Row]) -> list[str]:
    impls: list[str] = []
    for r in rows:
        if r.impl not in impls:
            impls.append(r.impl)
    first = [i for i in impls if i == COPY] + [i for i in impls if i.startswith(QKNORM)]
    return first + [i for i in impls if i not in first]


def markdown_tables(rows: Sequence[Row]) -> str:
    """One markdown table per (mode, layout): graph-replay µs of every impl per M, then
    qknorm's percent of the copy ceiling and its eager per-call µs."""
    out: list[str] = []
    for mode in MODES:
        for layout in LAYOUTS:
            sel = [r for r in rows if r.mode == mode and r.layout == layout]
            if not sel:
                continue
            impls = _impl_order(sel)
            ours = next((i for i in impls if i.startswith(QKNORM)), None)
            head = ["M", *(f"{i} graph µs" for i in impls)]
            if ours is not None:
                head += [f"{ours} % of copy", f"{ours} eager µs"]
            out.append(f"**{mode}, {layout}**\n")
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---:|" * len(head))
            for m in sorted({r.m for r in sel}):
                by_impl = {r.impl: r for r in sel if r.m == m}
                cells = [str(m)] + [fmt(by_impl[i].graph_us) if i in by_impl else "—" for i in impls]
                if ours is not None:
                    r = by_impl.get(ours)
                    cells += [fmt(r.pct_of_copy, 1) if r else "—", fmt(r.eager_us) if r else "—"]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


@dataclass(frozen=True)
class _Target:
    case: str
    goal: str
    mode: str  # the mode whose rows the metric sees ("*": every mode)
    metric: Callable[[list[Row], list[Row]], tuple[float, str] | None]  # (one impl's rows, all rows) -> (value, where)
    bound: float
    higher_is_better: bool = False
    unit: str = "µs"
    peers: bool = True  # also evaluated for the peers (best peer column)


def _worst(rows: list[Row], attr: str, keep: Callable[[Row], bool], higher_is_better: bool) -> tuple[float, str] | None:
    vals = [(getattr(r, attr), f"M={r.m}, {r.layout}") for r in rows if keep(r) and getattr(r, attr) is not None]
    if not vals:
        return None
    return min(vals) if higher_is_better else max(vals)


def _strided_ratio(rows: list[Row], _all: list[Row]) -> tuple[float, str] | None:
    pairs: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        if r.graph_us is not None:
            pairs.setdefault((r.mode, r.m), {})[r.layout] = r.graph_us
    ratios = [(p["strided"] / p["contiguous"], f"M={m}, {mode}") for (mode, m), p in pairs.items() if len(p) == 2]
    if not ratios:
        return None
    worst, where = max(ratios)
    return 100.0 * (worst - 1.0), where


_QUANT_MODES = tuple(m for m in MODES if m != "norm")


def _quant_pct(keep: Callable[[int], bool]) -> Callable[[list[Row], list[Row]], tuple[float, str] | None]:
    """Worst percent of the copy over the quantizing modes, at the row counts ``keep`` accepts.

    The place names what the worst was taken over: a run measures some of the row counts and
    modes a target speaks of ("every quantizing mode": the bench runs FP8 1x128, per token and
    MXFP4), and its verdict holds for those only.
    """

    def metric(rows: list[Row], _all: list[Row]) -> tuple[float, str] | None:
        scope = [(r.pct_of_copy, r) for r in rows if r.mode in _QUANT_MODES and keep(r.m) and r.pct_of_copy is not None]
        if not scope:
            return None
        pct, worst = min(scope, key=lambda v: v[0])
        ms = ", ".join(str(m) for m in sorted({r.m for _, r in scope}))
        modes = ", ".join(m for m in _QUANT_MODES if any(r.mode == m for _, r in scope))
        return pct, f"M={worst.m}, {worst.layout}, {worst.mode}; over M = {ms} and {modes}"

    return metric


def _ratio_to_norm(rows: list[Row], _all: list[Row]) -> tuple[float, str] | None:
    """Worst graph time of a quantizing call at M <= 256 over the same impl's plain norm (same M, layout)."""
    norm = {(r.m, r.layout): r.graph_us for r in rows if r.mode == "norm" and r.graph_us}
    vals = [(r.graph_us / norm[(r.m, r.layout)], f"M={r.m}, {r.layout}, {r.mode}") for r in rows
            if r.mode in _QUANT_MODES and r.m <= 256 and r.graph_us and (r.m, r.layout) in norm]  # fmt: skip
    return max(vals) if vals else None


def _norm_over_copy(rows: list[Row], all_rows: list[Row]) -> tuple[float, str] | None:
    """Worst graph time of the plain norm at M = 1 and 256 minus the copy's (same M, layout)."""
    copy = {(r.m, r.layout): r.graph_us for r in all_rows if r.impl == COPY and r.mode == "norm" and r.graph_us}
    vals = [(r.graph_us - copy[(r.m, r.layout)], f"M={r.m}, {r.layout}") for r in rows
            if r.mode == "norm" and r.m in (1, 256) and r.graph_us and (r.m, r.layout) in copy]  # fmt: skip
    return max(vals) if vals else None


def _eager_to_torch(rows: list[Row], all_rows: list[Row]) -> tuple[float, str] | None:
    """Worst eager wall time at M = 1 (plain norm) over two eager ``F.rms_norm`` calls (same layout)."""
    torch_eager = {r.layout: r.eager_us for r in all_rows
                   if r.impl == TORCH_EAGER and r.mode == "norm" and r.m == 1 and r.eager_us}  # fmt: skip
    vals = [(r.eager_us / torch_eager[r.layout], f"M=1, {r.layout}") for r in rows
            if r.mode == "norm" and r.m == 1 and r.eager_us and r.layout in torch_eager]  # fmt: skip
    return max(vals) if vals else None


def _absolute(keep: Callable[[Row], bool], attr: str, higher_is_better: bool = False
              ) -> Callable[[list[Row], list[Row]], tuple[float, str] | None]:  # fmt: skip
    """Worst ``attr`` over the rows ``keep`` accepts (an absolute target)."""
    return lambda rs, _all: _worst(rs, attr, keep, higher_is_better)


# The targets of docs/benchmarks.md: first those set on the H100 (absolute µs for that GPU), then
# those set on the H200, relative to peers and to qknorm's own plain norm measured in the same run.
_TARGETS = (
    _Target("fused norm, M ≤ 256, graph replay", "≤ 2.0 µs", "norm",
            _absolute(lambda r: r.m <= 256, "graph_us"), 2.0),
    _Target("norm + FP8 1x128 group quant of q, M ≤ 256, graph", "≤ 2.3 µs", "fp8_group",
            _absolute(lambda r: r.m <= 256, "graph_us"), 2.3),
    _Target("fused norm, M = 4096, graph", "≤ 9.5 µs", "norm",
            _absolute(lambda r: r.m == 4096, "graph_us"), 9.5),
    _Target("fused norm, M ≥ 16384, graph", "≥ 95% of copy", "norm",
            _absolute(lambda r: r.m >= 16384, "pct_of_copy", True), 95.0, True, "%"),
    _Target("norm + FP8 group quant, M = 65536, graph", "≤ 160 µs", "fp8_group",
            _absolute(lambda r: r.m == 65536, "graph_us"), 160.0),
    _Target("strided views vs contiguous, graph", "within 3%", "*", _strided_ratio, 3.0, False, "% slower"),
    _Target("per-call latency, public eager API, M = 1", "≤ 10 µs wall", "norm",
            _absolute(lambda r: r.m == 1, "eager_us"), 10.0),
    _Target("every quantizing mode, M ≥ 16384, graph", "≥ 90% of copy", "*",
            _quant_pct(lambda m: m >= 16384), 90.0, True, "%"),
    _Target("every quantizing mode, M = 4096, graph", "≥ 80% of copy", "*",
            _quant_pct(lambda m: m == 4096), 80.0, True, "%"),
    _Target("quantizing call, M ≤ 256, graph", "≤ 1.15x the plain norm", "*", _ratio_to_norm, 1.15, False, "x"),
    _Target("plain norm, M = 1 and 256, graph", "≤ copy + 0.25 µs", "norm", _norm_over_copy, 0.25, False,
            "µs over copy"),
    _Target("public in-place eager call, M = 1", "≤ two eager F.rms_norm", "norm", _eager_to_torch, 1.0, False,
            "x two eager F.rms_norm", peers=False),
)  # fmt: skip


def evaluate_targets(rows: Sequence[Row]) -> list[dict[str, str]]:
    """Each performance target: qknorm's worst measured case, the best peer's, and met/missed.

    Returns dicts with keys ``case``, ``target``, ``qknorm``, ``best_peer`` and ``verdict``
    (``met``, ``missed`` or ``not measured``); worst = over every measured M and layout in scope.
    """
    impls = _impl_order(rows)
    ours = next((i for i in impls if i.startswith(QKNORM)), QKNORM)
    result = []
    for t in _TARGETS:

        def value(impl: str, t: _Target = t) -> tuple[float, str] | None:
            return t.metric([r for r in rows if r.impl == impl and (t.mode == "*" or r.mode == t.mode)], list(rows))

        mine = value(ours)
        others = [i for i in impls if i not in (ours, COPY)] if t.peers else []
        peers = [(v, i) for i in others for v in [value(i)] if v is not None]
        best = (max if t.higher_is_better else min)(peers, key=lambda p: p[0][0]) if peers else None
        if mine is None:
            verdict = "not measured"
        else:
            ok = mine[0] >= t.bound if t.higher_is_better else mine[0] <= t.bound
            verdict = "met" if ok else "missed"

        def show(v: tuple[float, str] | None, unit: str = t.unit) -> str:
            return "not measured" if v is None else f"{v[0]:.2f} {unit} ({v[1]})"

        result.append({
            "case": t.case,
            "target": t.goal,
            "qknorm": show(mine),
            "best_peer": "—" if best is None else f"{show(best[0])}, {best[1]}",
            "verdict": verdict,
        })  # fmt: skip
    return result


def targets_markdown(rows: Sequence[Row]) -> str:
    """:func:`evaluate_targets` as a markdown table."""
    lines = ["| case | target | qknorm (worst case) | best peer (worst case) | verdict |", "|---|---|---|---|---|"]
    for t in evaluate_targets(rows):
        lines.append(f"| {t['case']} | {t['target']} | {t['qknorm']} | {t['best_peer']} | **{t['verdict']}** |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> bool:
    """Per mode (columns): graph-replay µs per call (top) and percent of the copy ceiling (bottom)
    against M, one colour per impl, solid contiguous, dashed strided.

    Returns False (and logs why) when matplotlib is not importable.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not importable: no plot written (pip install matplotlib)")
        return False
    modes = [mo for mo in MODES if any(r.mode == mo for r in rows)] or ["norm"]
    colour = {impl: f"C{i}" for i, impl in enumerate(_impl_order(rows))}
    fig, axes = plt.subplots(2, len(modes), figsize=(4.6 * len(modes), 7.5), squeeze=False)
    for col, mode in enumerate(modes):
        sel = [r for r in rows if r.mode == mode]
        for ax, attr, label in ((axes[0][col], "graph_us", "µs per call (CUDA graph)"),
                                (axes[1][col], "pct_of_copy", "% of device-copy bandwidth")):  # fmt: skip
            for impl in _impl_order(sel):
                labelled = False
                for layout, style in (("contiguous", "-"), ("strided", "--")):
                    pts = sorted((r.m, getattr(r, attr)) for r in sel
                                 if r.impl == impl and r.layout == layout and getattr(r, attr) is not None)  # fmt: skip
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", ms=3, color=colour[impl],
                                label=None if labelled else impl)  # fmt: skip
                        labelled = True
            ax.set(xscale="log", xlabel="M (rows)", ylabel=label, title=mode)
            if attr == "graph_us":
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if rows:
        r0 = rows[0]
        fig.suptitle(f"qknorm {r0.qknorm}: {r0.gpu}, torch {r0.torch}, triton {r0.triton}, {r0.date} "
                     "(solid: contiguous, dashed: strided views of [M, 2112])", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
