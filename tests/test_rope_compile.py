"""The qk_norm_rope kernel compiles for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter runs the kernel's Python semantics but not Triton's compiler, which is stricter
(e.g. a runtime ``if`` may not bind one name to tiles of two shapes). This test compiles what
the launcher would launch for a set of calls, from the launcher's own arguments, through
Triton's CUDA backend (PTX and ptxas, no driver needed), in a subprocess without
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys, torch
sys.path.insert(0, "tests")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from _rope_cases import RopeCase, make_call, reference_request
from qknorm.rope import triton_kernels, triton_launch

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
         torch.int32: "i32", torch.uint8: "u8"}
kernel = triton_kernels._qk_norm_rope_kernel
backend = triton_launch.RopeTritonBackend()
E4M3, E4M3UZ, BF16 = torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.bfloat16
cases = [
    RopeCase(cache=BF16, hq=32, hk=8, d=128, t=300, num_blocks=80),
    RopeCase(cache=E4M3, q_fp8=E4M3, hk=1, scale_heads=True, give_k_out=True),
    RopeCase(cache=E4M3UZ, rot=64, d=128, is_neox=False, cache_layout="hnd", index_dtype=torch.int32),
    RopeCase(rot=0, weights=False, gemma=True, d=256, hq=16, hk=8, dtype=torch.float16, table_dtype=torch.float16),
    RopeCase(cache=BF16, dv=48, d=64, hq=3, hk=1, layout="strided", cache_layout="hnd"),
]
for i, case in enumerate(cases):
    req = reference_request(make_call(case))
    grid, cfg, args, constexprs = backend.launch_args(req)
    for native in (False, True) if i < 2 else (True,):
        values = {**args, **constexprs, "NATIVE": native, "NATIVE_FP8": native}
        sig, consts = {}, {}
        for j, name in enumerate(kernel.arg_names):
            v = values[name]
            if name in constexprs or v is None or (type(v) is int and v == 1 and name not in triton_launch._UNSPECIALIZED):
                sig[name] = "constexpr"; consts[(j,)] = v
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + TYPES[v.dtype]
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                sig[name] = "i64" if abs(v) >= 2**31 else "i32"
        ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg.num_warps})
        assert "cubin" in ck.asm, case
print("compiled", len(cases))
"""


def test_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    if proc.returncode != 0 and "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("this Triton has no CUDA backend")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "compiled 5" in proc.stdout
