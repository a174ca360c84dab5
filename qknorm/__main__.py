"""``python -m qknorm`` (console script ``qknorm``): the environment, the backends, a demo and a check.

Subcommands:

- ``env``: versions of Python, torch, Triton and aiter (import errors reported, never raised)
  and the visible devices. Read-only and offline.
- ``backends``: every backend, available or not and why, what it bound to, and which backend
  each mode would use on every visible device.
- ``demo``: DeepSeek MLA shapes (q ``[T, 1536]`` and k ``[T, 512]`` as views of ``[T, 2112]``)
  in bf16 on the best available backend, checked against the reference; exit 1 on a mismatch.
- ``check``: every available backend against the reference over a matrix of shapes and modes
  on this machine; exit 1 on any failure (run it after upgrading aiter or Triton).
- ``bench``: the benchmark (:mod:`qknorm.bench`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import __version__
from .backends import registry
from .backends.base import Backend
from .backends.triton_launch import pdl_enabled
from .checks import build_request
from .quant import QuantMode, native_fp8_dtype
from .reference import e8m0_to_float, qk_rmsnorm_reference
from .request import QKNormRequest
from .rope import cli as rope_cli
from .testing import assert_fp8_close, assert_mxfp4_close, assert_norm_close, assert_scales_close, decode_e2m1

__all__ = ["main"]

_MODES = (QuantMode.NONE, QuantMode.FP8_GROUP, QuantMode.FP8_TOKEN, QuantMode.FP8_TENSOR, QuantMode.MXFP4)


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _devices() -> list[torch.device]:
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class _Case:
    """One shape and mode of the operator, to build requests from."""

    shape: str  # "deepseek" (split views of [T, 2112]), "head" (per-head [T*8, 128]), "q-only", ...
    n1: int
    n2: int  # 0: no k
    mode: QuantMode
    dtype: torch.dtype = torch.bfloat16
    group_size: int = 0
    fp8: torch.dtype | None = None
    transpose: bool = False
    residual: bool = False
    gemma: bool = False
    unquantized: bool = False  # also ask for the normalized q in q's dtype when quantizing

    @property
    def label(self) -> str:
        parts = [self.shape, str(self.dtype).removeprefix("torch."), self.mode.value]
        if self.mode in (QuantMode.FP8_GROUP, QuantMode.MXFP4):
            parts.append(f"g{self.group_size}")
        if self.fp8 is not None:
            parts.append(str(self.fp8).removeprefix("torch.float8_"))
        flags = (("transposed", self.transpose), ("residual", self.residual), ("gemma", self.gemma),
                 ("+unquantized", self.unquantized))  # fmt: skip
        parts += [flag for flag, on in flags if on]
        return " ".join(parts)


@dataclass(frozen=True)
class _Inputs:
    q: torch.Tensor
    q_weight: torch.Tensor
    k: torch.Tensor | None
    k_weight: torch.Tensor | None
    q_residual: torch.Tensor | None


def _inputs(case: _Case, rows: int, device: torch.device, seed: int) -> _Inputs:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=case.dtype)

    k: torch.Tensor | None = None
    if case.shape == "deepseek":
        latent = randn(rows, case.n1 + case.n2 + 64)  # the last 64 columns are RoPE, never touched
        q, k = latent[:, : case.n1], latent[:, case.n1 : case.n1 + case.n2]
    else:
        q = randn(rows, case.n1)
        k = randn(rows, case.n2) if case.n2 else None
    return _Inputs(
        q=q,
        q_weight=1 + 0.1 * randn(case.n1),
        k=k,
        k_weight=1 + 0.1 * randn(case.n2) if case.n2 else None,
        q_residual=randn(rows, case.n1) if case.residual else None,
    )


def _request(case: _Case, inp: _Inputs) -> QKNormRequest:
    """A request over ``inp`` with freshly allocated outputs."""
    q, k = inp.q, inp.k
    m, dev, dt = q.shape[0], q.device, q.dtype
    want_q_out = case.mode is QuantMode.NONE or case.unquantized
    q_out = torch.empty(m, case.n1, dtype=dt, device=dev) if want_q_out else None
    quant = scale = None
    if case.mode is QuantMode.MXFP4:
        quant = torch.empty(m, case.n1 // 2, dtype=torch.uint8, device=dev)
        scale = torch.empty(m, case.n1 // case.group_size, dtype=torch.uint8, device=dev)
    elif case.mode is not QuantMode.NONE:
        quant = torch.empty(m, case.n1, dtype=case.fp8 or torch.float8_e4m3fn, device=dev)
        groups = {QuantMode.FP8_GROUP: case.n1 // max(case.group_size, 1), QuantMode.FP8_TOKEN: 1}.get(case.mode)
        if groups is None:
            scale = torch.empty(1, dtype=torch.float32, device=dev)
        elif case.transpose:
            scale = torch.empty(groups, m, dtype=torch.float32, device=dev).t()
        else:
            scale = torch.empty(m, groups, dtype=torch.float32, device=dev)
    return build_request(
        q=q, q_weight=inp.q_weight, q_epsilon=1e-6, k=k, k_weight=inp.k_weight, k_epsilon=1e-5,
        k_out=None if k is None else torch.empty(k.shape, dtype=dt, device=dev),
        q_residual=inp.q_residual, q_res_out=None if inp.q_residual is None else torch.empty(q.shape, dtype=dt, device=dev),
        gemma_norm=case.gemma, mode=case.mode, group_size=case.group_size or None, q_out=q_out,
        q_out_quantized=quant, q_out_scale=scale, transpose_scale=case.transpose,
    )  # fmt: skip


def _dequant(req: QKNormRequest) -> torch.Tensor:
    """The quantized q as fp32 values (codes times scales)."""
    m, n1, gs = req.m, req.n1, req.group_size
    assert req.q_quant is not None and req.q_scale is not None
    if req.mode is QuantMode.MXFP4:
        values = decode_e2m1(req.q_quant).reshape(m, n1 // gs, gs)
        return (values * e8m0_to_float(req.q_scale.cpu()).unsqueeze(-1)).reshape(m, n1)
    codes, scale = req.q_quant.float().cpu(), req.q_scale.cpu()
    if req.mode is QuantMode.FP8_TENSOR:
        return codes * scale
    return (codes.reshape(m, n1 // gs, gs) * scale.unsqueeze(-1)).reshape(m, n1)


def _compare(actual: QKNormRequest, expected: QKNormRequest) -> tuple[bool, float, str]:
    """(passed, largest absolute error, first line of the failure) of ``actual`` against the reference."""
    pairs = [(actual.q_out, expected.q_out), (actual.k_out, expected.k_out), (actual.q_res_out, expected.q_res_out)]
    err = 0.0
    for a, e in pairs:
        if a is not None and e is not None:
            err = max(err, float((a.float() - e.float()).abs().max().cpu()))
    if actual.q_quant is not None:
        err = max(err, float((_dequant(actual) - _dequant(expected)).abs().max()))
    try:
        for name, (a, e) in zip(("q_out", "k_out"), pairs[:2]):
            if a is not None and e is not None:
                assert_norm_close(a, e, name)
        if actual.q_res_out is not None and not torch.equal(actual.q_res_out, expected.q_res_out):  # type: ignore[arg-type]
            raise AssertionError("q_res_out: the residual sum must equal the reference bit for bit")
        if actual.mode is QuantMode.MXFP4:
            assert_mxfp4_close(actual.q_quant, actual.q_scale, expected.q_quant, expected.q_scale)  # type: ignore[arg-type]
        elif actual.mode.is_fp8:
            assert_fp8_close(actual.q_quant, expected.q_quant)  # type: ignore[arg-type]
            assert_scales_close(actual.q_scale, expected.q_scale)  # type: ignore[arg-type]
    except AssertionError as exc:
        return False, err, str(exc).strip().splitlines()[0]
    return True, err, ""


# ----------------------------------------------------------------------------- env


def _version_of(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return "not installed"
        return f"import failed: {type(exc).__name__}: {exc}"
    except (Exception, SystemExit) as exc:
        return f"import failed: {type(exc).__name__}: {exc}"
    return f"{getattr(mod, '__version__', 'unknown version')} ({getattr(mod, '__file__', '?')})"


def _cmd_env(args: argparse.Namespace) -> int:
    rows = [
        ("qknorm", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
        ("python", f"{platform.python_version()} ({platform.python_implementation()}) on {platform.platform()}"),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}, HIP {torch.version.hip or 'none'})"),
        ("triton", _version_of("triton")),
        ("aiter", _version_of("aiter")),
        (registry.ENV_VAR, os.environ.get(registry.ENV_VAR, "(unset)")),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "(unset)")),
    ]
    print(_table(rows, ("component", "version")))
    devs = [("cpu", f"{platform.machine()}, {torch.get_num_threads()} threads")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            arch = getattr(p, "gcnArchName", "") if torch.version.hip else f"sm_{p.major}{p.minor}"
            devs.append(
                (f"cuda:{i}", f"{p.name}, {arch}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs/CUs")
            )
    print()
    print(_table(devs, ("device", "description")))
    return 0


# ----------------------------------------------------------------------------- backends


def _case_for(mode: QuantMode, device: torch.device) -> _Case:
    group = {QuantMode.FP8_GROUP: 128, QuantMode.MXFP4: 32}.get(mode, 0)
    return _Case("deepseek", 1536, 512, mode, group_size=group, fp8=native_fp8_dtype(device) if mode.is_fp8 else None)


def _cmd_backends(args: argparse.Namespace) -> int:
    try:
        names, explicit = registry.priority()
    except registry.BackendNameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    how = f"{registry.ENV_VAR}={','.join(names)}" if explicit else "default: aiter on ROCm, triton on GPUs, torch"
    print(f"priority: {', '.join(names)} ({how})")
    pdl = "on" if pdl_enabled() else "off (qknorm.set_pdl(True) turns it on)"
    print(f"programmatic dependent launch of the Triton kernels (NVIDIA sm_90+): {pdl}\n")
    infos = registry.describe()
    print(_table([(i.name, "yes" if i.available else "no", i.reason) for i in infos], ("backend", "available", "why")))
    rows = []  # walked before the details are printed: selection runs the behavioural probes they report
    for dev in _devices():
        for mode in _MODES:
            case = _case_for(mode, dev)
            decision = registry.explain(_request(case, _inputs(case, 1, dev, seed=0)))
            passed_over = "; ".join(f"{name}: {why}" for name, why in decision.skipped)
            rows.append(
                (str(dev), case.label.removeprefix("deepseek bfloat16 "), decision.backend or "NONE", passed_over)
            )
    for info in registry.describe():
        for key, value in info.details.items():
            print(f"  {info.name} {key}: {value}")
    print("\nbackend per mode (DeepSeek shapes q [T, 1536], k [T, 512] bf16; FP8 group 128, MXFP4 group 32):\n")
    print(_table(rows, ("device", "mode", "backend", "passed over")))
    print("\nqk_norm_rope backends:\n")
    print(_table(rope_cli.backend_rows(), rope_cli.BACKEND_HEADER))
    print()
    print(_table(rope_cli.choice_rows(_devices()), ("device", "call", "backend", "passed over")))
    return 0


# ----------------------------------------------------------------------------- demo


def _time_call(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Microseconds per eager call, back to back, one synchronize at the end."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters * 1e6


def _cmd_demo(args: argparse.Namespace) -> int:
    import qknorm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = args.tokens or ([1, 16, 256, 4096] if device.type == "cuda" else [1, 16, 128])
    fp8 = native_fp8_dtype(device)
    print(f"DeepSeek MLA norms on {device}: q [T, 1536] and k [T, 512] as views of [T, 2112], bf16\n")
    rows, failed = [], False
    for t in tokens:
        for mode in (QuantMode.NONE, QuantMode.FP8_GROUP, QuantMode.MXFP4):
            case = _case_for(mode, device)
            inp = _inputs(case, t, device, seed=t)
            req, ref = _request(case, inp), _request(case, inp)
            try:
                backend = registry.run_request(req)
            except registry.BackendError as exc:
                rows.append((t, case.label.removeprefix("deepseek bfloat16 "), "NONE", "-", "-", f"FAIL: {exc}"))
                failed = True
                continue
            qk_rmsnorm_reference(ref)
            ok, err, why = _compare(req, ref)
            failed |= not ok
            quant = {QuantMode.NONE: None, QuantMode.FP8_GROUP: "fp8_group", QuantMode.MXFP4: "mxfp4"}[mode]
            call = functools.partial(
                qknorm.qk_rmsnorm, inp.q, inp.q_weight, inp.k, inp.k_weight, k_epsilon=1e-5, quant=quant,
                group_size=case.group_size or None, fp8_dtype=fp8,
            )  # fmt: skip
            us = _time_call(call, device, args.iters or (50 if device.type == "cuda" else 5))
            label = case.label.removeprefix("deepseek bfloat16 ")
            verdict = "reference" if backend == registry.REFERENCE_BACKEND else "ok"  # nothing independent compared
            rows.append((t, label, backend, f"{err:.3g}", f"{us:.1f}", verdict if ok else f"FAIL: {why}"))
    print(_table(rows, ("T", "mode", "backend", "max abs err", "us/call (eager)", "check")))
    print("\nmax abs err: normalized outputs, and dequantized q for FP8/MXFP4, against qknorm.reference")
    if any(row[2] == registry.REFERENCE_BACKEND for row in rows):
        print(f"check 'reference': the {registry.REFERENCE_BACKEND} backend is qknorm.reference, so nothing independent was compared")
    print(f"\nQwen3-8B qk_norm_rope on {device}: q [T, 32, 128], k and v [T, 8, 128] views of the packed qkv, bf16\n")
    rope_rows, rope_failed = rope_cli.demo_rows(device, tokens, args.iters or (50 if device.type == "cuda" else 5))
    print(_table(rope_rows, ("T", "call", "backend", "max abs err", "us/call (eager)", "check")))
    print("\ncheck: q and the cache against qknorm.rope.reference (SPEC_ROPE_CACHE §3 tolerances)")
    return 1 if failed or rope_failed else 0


# ----------------------------------------------------------------------------- check


def _check_cases(device: torch.device, quick: bool) -> list[_Case]:
    fp8 = native_fp8_dtype(device)
    other = torch.float8_e4m3fnuz if fp8 == torch.float8_e4m3fn else torch.float8_e4m3fn
    bf16, fp16 = torch.bfloat16, torch.float16
    none, group, token, tensor, mxfp4 = _MODES

    def ds(mode: QuantMode, **kw: object) -> _Case:
        return _Case("deepseek", 1536, 512, mode, **kw)  # type: ignore[arg-type]

    cases = [
        ds(none),
        ds(none, dtype=fp16),
        ds(group, group_size=128, fp8=fp8),
        ds(group, group_size=128, fp8=fp8, transpose=True),
        ds(mxfp4, group_size=32),
        _Case("head", 128, 128, none),
        _Case("q-only", 7168, 0, group, group_size=128, fp8=fp8),
    ]
    if quick:
        return cases
    return [
        *cases,
        ds(none, residual=True, gemma=True),
        ds(group, dtype=fp16, group_size=128, fp8=fp8, unquantized=True),
        ds(group, group_size=128, fp8=other),
        ds(group, group_size=64, fp8=fp8, residual=True, gemma=True, unquantized=True),
        ds(token, fp8=fp8),
        ds(tensor, fp8=fp8),
        ds(mxfp4, group_size=32, residual=True, unquantized=True),
        _Case("head", 128, 128, group, dtype=fp16, group_size=32, fp8=fp8),
        _Case("odd", 203, 71, none, dtype=bf16),
        _Case("wide", 16384, 512, group, group_size=128, fp8=fp8),
    ]


def _check_case(
    backend: Backend, case: _Case, device: torch.device, ms: Sequence[int]
) -> tuple[bool, float, str] | str:
    """Run ``case`` at every m on ``backend``: (passed, largest error, note), or why it was skipped."""
    worst, notes = 0.0, []
    for m in ms:
        inp = _inputs(case, m if case.shape != "head" else 8 * m, device, seed=m)
        req, ref = _request(case, inp), _request(case, inp)
        why_not = backend.supports(req)
        if why_not is not None and "behavioural probe:" in why_not:  # the backend ran and got it wrong
            return False, -1.0, why_not
        if why_not is not None:
            return why_not
        try:
            backend.run(req)
        except Exception as exc:
            return False, -1.0, f"m={req.m}: {type(exc).__name__}: {exc}"
        qk_rmsnorm_reference(ref)
        ok, err, why = _compare(req, ref)
        worst = max(worst, err)
        if not ok:
            notes.append(f"m={req.m}: {why}")
    return not notes, worst, "; ".join(notes)


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        names = [n.strip() for n in args.backend.split(",")] if args.backend else list(registry.backend_names())
        for name in names:
            registry.probe(name)  # raises for unknown names
    except registry.BackendNameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    devices = [torch.device(name) for name in args.device] if args.device else _devices()
    ms = (1, 67) if args.quick else (1, 67, 300)
    rows: list[tuple[object, ...]] = []
    skipped: dict[tuple[str, str, str], int] = {}
    failures = passes = 0
    for name in names:
        ok, why = registry.probe(name)
        if not ok:
            print(f"{name}: unavailable ({why})")
            continue
        backend = registry.get_backend(name)
        for dev in devices:
            for case in _check_cases(dev, args.quick):
                result = _check_case(backend, case, dev, ms)
                if isinstance(result, str):
                    skipped[(name, str(dev), result)] = skipped.get((name, str(dev), result), 0) + 1
                    if args.verbose:
                        rows.append((name, dev, case.label, "skip", "-", result))
                    continue
                ok, err, note = result
                passes += ok
                failures += not ok
                verdict = "reference" if name == registry.REFERENCE_BACKEND else "pass"  # compared with itself
                rows.append((name, dev, case.label, verdict if ok else "FAIL", f"{err:.3g}" if err >= 0 else "-", note))
    if rows:
        print(
            _table(
                rows, ("backend", "device", f"case (m = {', '.join(map(str, ms))})", "result", "max abs err", "note")
            )
        )
    for (name, where, why), count in sorted(skipped.items()) if not args.verbose else ():
        print(f"{name} on {where}: {count} case(s) skipped: {why}")
    rope_rows, rope_passes, rope_failures = rope_cli.check_rows(names, devices, args.quick)
    passes, failures = passes + rope_passes, failures + rope_failures
    rope_shown = [r for r in rope_rows if args.verbose or r[3] != "skip"]
    if rope_shown:
        ts = "1, 67" if args.quick else "1, 67, 300"
        print("\n" + _table(rope_shown, ("backend", "device", f"case (T = {ts})", "result", "max abs err", "note")))
    if registry.REFERENCE_BACKEND in names:
        print(f"'reference': the {registry.REFERENCE_BACKEND} backend is qknorm.reference itself (nothing independent compared)")
    print(f"\n{passes} passed, {failures} failed, {sum(skipped.values())} skipped")
    return 1 if failures else 0


# ----------------------------------------------------------------------------- bench


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("qknorm.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "qknorm.bench":
            raise
        print("qknorm bench: the benchmark module qknorm.bench is not part of this installation", file=sys.stderr)
        return 2
    return int(bench.main(argv) or 0)


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qknorm", description="Fused Q/K RMSNorm: environment, backends, checks.")
    parser.add_argument("--version", action="version", version=f"qknorm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions of Python, torch, Triton, aiter; devices").set_defaults(func=_cmd_env)
    sub.add_parser("backends", help="every backend, why (un)available, who serves each mode").set_defaults(
        func=_cmd_backends
    )
    demo = sub.add_parser("demo", help="DeepSeek shapes on the best backend, checked against the reference")
    demo.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], help="T values, e.g. 1,16,256")
    demo.add_argument("--device", help="device (default: cuda if available, else cpu)")
    demo.add_argument("--iters", type=int, help="timed calls per row (default 50 on a GPU, 5 on the CPU)")
    demo.set_defaults(func=_cmd_demo)
    check = sub.add_parser("check", help="every available backend against the reference")
    check.add_argument("--backend", help="comma-separated backends (default: all)")
    check.add_argument("--device", action="append", help="device to check (repeatable; default: cpu and every GPU)")
    check.add_argument("--quick", action="store_true", help="a smaller matrix of shapes and modes")
    check.add_argument("--verbose", action="store_true", help="list skipped cases one by one")
    check.set_defaults(func=_cmd_check)
    # Only for --help: main() hands everything after "bench" to qknorm.bench untouched.
    sub.add_parser("bench", help="benchmark against peers (GPU); arguments go to qknorm.bench ('bench rope ...': "
                   "qk_norm_rope's benchmark, qknorm.rope.bench)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "rope"]:
        from .rope.bench import main as bench_rope

        return int(bench_rope(argv[2:]) or 0)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
