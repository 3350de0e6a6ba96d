# The Triton kernels compiled for the GPUs they are written for (sm_80: A100, sm_90: H100/H200) on a machine
# without one: bench/compile.py --quick, the specializations the presets and the default run launch (dequantize
# and quantize in bf16/fp16/fp32, with and without double quantization, blocksize 64; the fused matmul forward and
# backward in bf16 with every autotune config at a 7B layer shape). It fails on a compile error, a register spill,
# shared memory over the architecture's limit, or packed bytes / weights not stored as 16-byte vectors. It runs in
# its own process: compiled mode (this suite runs the kernels in Triton's interpreter, a mode fixed at import) and
# a fresh Triton cache per compile process (a cached kernel skips ptxas, which reports registers and spills).
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
import kernels as K  # noqa: E402


def _compile(*flags):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "compile.py"), *flags], cwd=ROOT, capture_output=True,
                       text=True, env={**env, "OMP_NUM_THREADS": "1"})
    return r, r.stdout[-8000:] + r.stderr[-4000:]


def test_kernels_compile_for_sm80_and_sm90():
    r, log = _compile("--quick", "--jobs=2")
    assert r.returncode == 0, log
    # the summary table: every listed specialization compiled on both targets, none with a problem
    n_configs = len(K._matmul_4bit_tuned.configs)
    for arch in (80, 90):
        for kernel, n in (("dequantize", 6), ("quantize", 3), ("matmul", 2 * n_configs)):
            assert re.search(rf"^\| sm_{arch} \| {kernel} \| {n} \| .* \| 0 \|$", r.stdout, re.M), (kernel, log)


def test_a_config_that_spills_fails():
    # the check can fail: 32 x 256 tiles on 4 warps (in the list before the compile check) spill on sm_90 and
    # need more shared memory than an A100 has
    r, log = _compile("--quick", "--kernels=matmul", "--configs=32,256,4,3", "--jobs=2")
    assert r.returncode == 1, log
    assert re.search(r"^- sm_90 matmul forward .*spills \d+ bytes", r.stdout, re.M), log
    assert re.search(r"^- sm_80 matmul forward .*shared memory \d+ > 166912", r.stdout, re.M), log
