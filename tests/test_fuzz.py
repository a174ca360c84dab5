"""Differential fuzzing of the public entry points against the reference, on every other backend.

Hypothesis draws whole calls (:class:`_cases.Case`): entry point, mode, group size, fp16/bf16,
e4m3fn/e4m3fnuz, widths from 1 through odd widths and widths just around powers of two,
m = 0 and 1, row strides wider than the rows, storage offsets, DeepSeek-style split views,
sentinel-padded outputs, epsilons, and extreme data. Each call runs on every backend whose
probe says it is available and which serves the request (on a CPU-only machine: ``torch``, and
``triton`` under ``TRITON_INTERPRET=1`` with small shapes), and is compared with
:mod:`qknorm.reference` per ``qknorm.testing``'s tolerance table. A failure prints the
falsifying ``Case(...)`` (``run_case(Case(...), backend)`` reproduces it) and a
``@reproduce_failure`` blob. ``QKNORM_FUZZ_EXAMPLES=n`` runs n examples per test.

What qknorm produces for extreme and non-finite input
-----------------------------------------------------
Every backend and every entry point behaves as follows (``y`` is the fp32 normalized q of
SPEC §4 rule 3, FMAX is 448 for e4m3fn and 240 for e4m3fnuz):

1. Rows are independent: no value in one row changes another row's outputs, except through a
   per-tensor scale, which sees all of q. No value of k changes any output of q.
2. An all-zero row normalizes to zeros. Its FP8 scales are the floor
   ``fl32(fl32(1e-10) * fl32(1/FMAX))`` (2.2321430e-13 for e4m3fn) and its codes are zero; its
   MXFP4 scale bytes are 92 (2^-35) and its nibbles are zero.
3. Finite input never produces NaN: normalized outputs are finite; FP8 scales are finite and at
   least the floor, and in every group whose largest ``|y|`` exceeds 1e-10 the largest code is
   exactly +-FMAX; MXFP4 scale bytes lie in [92, 254] and such a group's largest code has
   magnitude 3, 4 or 6.
4. fp16 near overflow: sums of squares are fp32 (at most 65536 * 65504^2, about 2.8e14), so
   normalized outputs stay finite. ``q_res_out = rnd(q + q_residual)`` is +-inf where the sum
   leaves fp16's range; the norm still uses the finite fp32 sum.
5. bf16 magnitudes beyond 2^64 overflow the fp32 sum of squares: r = rsqrt(inf) = 0 and the row
   normalizes to zeros (with rule 2's scales), as SPEC §4.2's fp32 arithmetic dictates.
6. +-inf in a row (of q + q_residual, or of k) and no NaN: the sum of squares is inf and r = 0,
   so the normalized values are NaN where the input is infinite and zero elsewhere.
7. NaN in a row (or inf + -inf in q + q_residual): every normalized value of the row is NaN.
8. Quantizing NaN: every FP8 group (per-token: the row; per-tensor: all of q) holding a NaN
   ``y`` gets a NaN scale, and every such MXFP4 group the scale byte 0xFF (NaN in E8M0), so the
   whole group dequantizes to NaN. The codes of such a group are unspecified (the reference
   writes NaN FP8 codes and zero E2M1 nibbles).
9. The sign of an E2M1 zero (from -0.0 or from a small negative value) is unspecified; FP8 codes
   follow round-to-nearest-even with the sign kept (e4m3fn has -0 = 0x80; e4m3fnuz, which has no
   -0, writes 0x00).
"""

from __future__ import annotations

import math

import pytest
import torch
from _cases import (
    FP8_FORMATS,
    Case,
    Inputs,
    all_backends,
    bits_equal,
    call_case,
    compare,
    fp8_scale,
    fuzz_examples,
    fuzz_settings,
    make_inputs,
    reference_outputs,
    require_backend,
    unpack_nibbles,
    using_backend,
)
from hypothesis import assume, given, note
from hypothesis import strategies as st

from qknorm.backends import registry
from qknorm.backends.registry import BackendError
from qknorm.quant import QuantType

# Backends running under an interpreter get small shapes and fewer examples.
_INTERPRETED = {"triton"} if not torch.cuda.is_available() else set()
_EPSILONS = (1e-6, 1e-5, 1e-12, 0.1, 1.0, 2.0**-126, 1e-30)
_DATA = ("normal", "normal", "normal", "zeros", "huge", "near_overflow", "tiny", "inf", "nan")


def _widths(limit: int) -> list[int]:
    """1, small odd widths, and widths just below, at and above powers of two (plus DeepSeek's)."""
    ws = {1, 2, 3, 5, 7, 9, 13, 100, 1536, 512}
    p = 4
    while p <= limit * 2:
        ws |= {p - 1, p, p + 1}
        p *= 2
    return sorted(w for w in ws if w <= limit)


@st.composite
def cases(draw: st.DrawFn, max_width: int = 2048, max_m: int = 6) -> Case:
    entry = draw(st.sampled_from(["unified", "unified", "group", "token", "legacy", "functional"]))
    mode = draw(st.sampled_from({
        "unified": ("none", "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"),
        "group": ("none", "fp8_group", "mxfp4"),
        "token": ("fp8_token",),
        "legacy": ("none",),
        "functional": ("none", "fp8_group", "fp8_token", "fp8_tensor", "mxfp4"),
    }[entry]))  # fmt: skip
    quant_type = group_size = None
    if mode in ("fp8_group", "mxfp4"):
        sizes = [32, 64, 128] if mode == "mxfp4" else [2**i for i in range(10) if 2**i <= max_width]
        gs = draw(st.sampled_from(sizes))
        n1 = gs * draw(st.sampled_from(_widths(max(1, max_width // gs))))
        default = {"unified": None, "group": 128, "functional": 32 if mode == "mxfp4" else 128}[entry]
        if entry == "unified":
            implied = [t for t in (QuantType.per_1x32,) if gs == 32] + (
                [QuantType.per_1x128, QuantType.per_128x128, QuantType.per_256x128, QuantType.per_1024x128] if gs == 128 else []
            )
            qt = draw(st.sampled_from([*implied, QuantType.per_1x128, QuantType.per_1x32]))
            quant_type = int(qt)
            group_size = None if qt in implied and draw(st.booleans()) else gs
        else:
            group_size = None if gs == default and draw(st.booleans()) else gs
    else:
        n1 = draw(st.sampled_from(_widths(max_width)))
    with_k = draw(st.booleans())
    n2 = draw(st.sampled_from(_widths(max_width))) if with_k else 0
    inplace = entry in ("unified", "group", "token")
    residual = entry != "legacy" and draw(st.booleans())
    transpose = draw(st.sampled_from(["", "contiguous", "view"])) if mode == "fp8_group" else ""
    k_eps = draw(st.sampled_from([None, *_EPSILONS]))
    case = Case(
        entry=entry, mode=mode, dtype=draw(st.sampled_from(["float16", "bfloat16"])),
        m=draw(st.sampled_from([0, 1, 1, 2, 3, 4, 5, 6][: max_m + 2])), n1=n1, n2=n2, quant_type=quant_type,
        group_size=group_size, fp8=draw(st.sampled_from(["float8_e4m3fn", "float8_e4m3fnuz"])), transpose=transpose,
        residual=residual, gemma=entry != "legacy" and draw(st.booleans()),
        unquantized=entry != "legacy" and draw(st.booleans()), q_eps=draw(st.sampled_from(_EPSILONS)), k_eps=k_eps,
        latent=with_k and draw(st.booleans()), in_pad=draw(st.sampled_from([0, 0, 1, 3, 8, 64])),
        in_offset=draw(st.integers(0, 5)), out_pad=draw(st.sampled_from([0, 1, 5, 16])) if inplace else 0,
        out_offset=draw(st.integers(0, 5)) if inplace else 0,
        scale_2d=mode == "fp8_tensor" and draw(st.booleans()),
        fp4_dtypes=mode == "mxfp4" and inplace and draw(st.booleans()),
        data=draw(st.sampled_from(_DATA)), seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip
    return case


# ----------------------------------------------------------------------------- the definition, executable


def _row_kinds(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the fp32 normalized value is NaN and where it is exactly zero, from the input alone (rules 2, 5-7)."""
    nan_row = torch.isnan(x).any(dim=1)
    inf_row = torch.isinf(x).any(dim=1) & ~nan_row
    over_row = ~nan_row & ~inf_row & (x.abs() >= 2.0**64).any(dim=1)  # the fp32 x*x overflows
    y_nan = nan_row.unsqueeze(1) | (inf_row.unsqueeze(1) & torch.isinf(x))
    y_zero = ((x == 0) | over_row.unsqueeze(1) | (inf_row.unsqueeze(1) & ~torch.isinf(x))) & ~y_nan
    return y_nan, y_zero


def _check_normalized(got: torch.Tensor, x: torch.Tensor, name: str) -> None:
    y_nan, y_zero = _row_kinds(x)
    got = got.reshape(x.shape).float().cpu()
    assert torch.equal(torch.isnan(got), y_nan), f"{name}: NaN exactly where the definition puts it (rules 6-7)"
    assert bool(torch.isfinite(got[~y_nan]).all()), f"{name}: finite input gives finite values (rules 3-4)"
    assert bool((got[y_zero] == 0).all()), f"{name}: zero where the input is zero or r = 0 (rules 2, 5, 6)"


def check_definition(case: Case, inp: Inputs, values: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Rules 2-8 of the module docstring on one call's outputs, from the inputs (not the reference's codes)."""
    if case.m == 0:
        return
    x = inp.q.float().cpu() + (0 if inp.q_residual is None else inp.q_residual.float().cpu())
    for name in ("q_out", "q_out_unquantized"):
        if name in values:
            _check_normalized(values[name], x, name)
    if "k_out" in values and inp.k is not None:
        _check_normalized(values["k_out"], inp.k.float().cpu(), "k_out")
    if case.mode == "none":
        return
    y_nan, y_zero = _row_kinds(x)
    gs = case.gs
    shape = (1, 1, -1) if case.mode == "fp8_tensor" else (case.m, case.n1 // gs, gs)
    poisoned = y_nan.reshape(shape).any(dim=-1)
    zero = y_zero.reshape(shape).all(dim=-1)
    y = expected["y"].cpu().reshape(shape)
    big = ~poisoned & (torch.where(torch.isnan(y), 0.0, y.abs()).amax(dim=-1) > 1e-10 * (1 + 1e-6))
    if case.mode == "mxfp4":
        scale = values["q_scale"].view(torch.uint8).cpu().reshape(poisoned.shape).to(torch.int32)
        nib = unpack_nibbles(values["q_quant"].reshape(case.m, case.n1 // 2)).reshape(shape) & 7
        assert bool((scale[poisoned] == 0xFF).all()), "MXFP4 groups holding a NaN get scale byte 0xFF (rule 8)"
        fin = scale[~poisoned]
        assert bool(((fin >= 92) & (fin <= 254)).all()), "MXFP4 scale bytes of finite groups lie in [92, 254] (rule 3)"
        assert bool((scale[zero] == 92).all()) and bool((nib[zero] == 0).all()), "zero groups: byte 92, zero nibbles (rule 2)"
        assert bool((nib.amax(dim=-1)[big] >= 5).all()), "a group's largest E2M1 code is 3, 4 or 6 (rule 3)"
        return
    fmt = FP8_FORMATS[case.fp8_dtype]
    floor = fp8_scale(0.0, case.fp8_dtype)
    scale = values["q_scale"].float().cpu().reshape(poisoned.shape)
    codes = values["q_quant"].float().cpu().reshape(shape)
    assert bool(torch.isnan(scale[poisoned]).all()), "FP8 groups holding a NaN get a NaN scale (rule 8)"
    fs = scale[~poisoned]
    assert bool((torch.isfinite(fs) & (fs >= floor)).all()), "FP8 scales of finite groups are finite and >= the floor (rule 3)"
    assert bool((scale[zero] == floor).all()) and bool((codes[zero] == 0).all()), "zero groups: floor scale, zero codes (rule 2)"
    assert not bool(torch.isnan(codes[~poisoned]).any()), "finite groups never get NaN codes (rule 3)"
    assert bool((codes.abs().amax(dim=-1)[big] == fmt.fmax).all()), "a group's largest code is exactly +-FMAX (rule 3)"


def _run_on(backend: str, case: Case) -> None:
    note(f"reproduce: run_case({case!r}, {backend!r})")
    inp = make_inputs(case)
    expected = reference_outputs(case, inp)
    with using_backend(backend):
        try:
            outs = call_case(case, inp)
        except BackendError as exc:
            note(f"{backend} does not serve this request: {exc}")
            assume(False)
            return
    if backend != REFERENCE:
        compare(case, outs.values, expected)
    check_definition(case, inp, outs.values, expected)


# The torch backend is the reference itself: comparing its numbers with the reference's tests
# nothing. It still goes through the entries and the definition checks (extreme data, rows).
REFERENCE = registry.REFERENCE_BACKEND


def _backend_params(reference: bool = True) -> list[object]:
    return [pytest.param(name, id=name) for name in all_backends() if reference or name != REFERENCE]


@pytest.mark.parametrize("backend", _backend_params(reference=False))
def test_fuzz_public_entries_against_reference(backend: str) -> None:
    require_backend(backend)
    small = backend in _INTERPRETED

    @fuzz_settings(12 if small else 150)
    @given(case=cases(max_width=256 if small else 2112, max_m=4 if small else 6))
    def run(case: Case) -> None:
        _run_on(backend, case)

    run()


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("data", ["zeros", "huge", "near_overflow", "tiny", "inf", "nan"])
def test_fuzz_extreme_data(backend: str, data: str) -> None:
    """Each extreme data kind with random shapes and modes, held to the docstring's definition."""
    require_backend(backend)
    small = backend in _INTERPRETED

    @fuzz_settings(3 if small else 25)
    @given(case=cases(max_width=128 if small else 1024, max_m=4))
    def run(case: Case) -> None:
        _run_on(backend, Case(**(case.__dict__ | {"data": data, "m": max(case.m, 2)})))

    run()


@pytest.mark.parametrize("backend", _backend_params())
def test_fuzz_rows_and_k_are_independent(backend: str) -> None:
    """Rule 1: poisoning one row of q (or all of k) leaves every other output bit for bit unchanged."""
    require_backend(backend)
    small = backend in _INTERPRETED

    @fuzz_settings(4 if small else 40)
    @given(case=cases(max_width=128 if small else 512, max_m=4), poison=st.sampled_from([math.nan, math.inf, 0.0, 3e4]))
    def run(case: Case, poison: float) -> None:
        assume(case.mode != "fp8_tensor")  # a per-tensor scale sees every row
        # Plain data, at least two rows, q and k in separate buffers (a latent row holds both).
        case = Case(**(case.__dict__ | {"data": "normal", "latent": False, "m": max(case.m, 2)}))
        note(f"reproduce: {case!r}, poison={poison}")
        with using_backend(backend):
            try:
                base = call_case(case, make_inputs(case)).values
                inp = make_inputs(case)
                inp.q[0] = poison
                if inp.k is not None:
                    inp.k.fill_(poison)
                again = call_case(case, inp).values
            except BackendError:
                assume(False)
                return
        for name, t in base.items():
            if name == "k_out" or (name == "q_scale" and case.mode == "fp8_tensor"):
                continue
            a, b = t.reshape(case.m, -1), again[name].reshape(case.m, -1)
            assert bits_equal(a[1:], b[1:]), name

    run()


def test_fuzz_example_count_comes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKNORM_FUZZ_EXAMPLES", "777")
    assert fuzz_examples(10) == 777
    monkeypatch.delenv("QKNORM_FUZZ_EXAMPLES")
    assert fuzz_examples(10) == 10
