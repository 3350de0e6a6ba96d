#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run of 6-8 minutes (sized for an H200 lent for 15 minutes):
#   1. tests/test_kernels.py compiled on CUDA (bit-exact dequantize/quantize, bit-exact against bitsandbytes' CUDA
#      path, the fused matmul with every autotune config), the paged AdamW GPU tests (managed tensors, paged ==
#      torch AdamW, the capped-allocator OOM that paging survives) and tests/test_memory.py (offloaded activations
#      equal on CUDA, 8-bit paged states);
#      tests/test_packing.py's CUDA test (packed rows through FlexAttention's block mask, forward and backward,
#      equal to one conversation a row);
#   2. the default train.py run on CUDA for 100 steps (its measured peak memory is in the log);
#   3. bench.py sections dequant (GB/s against the HBM copy bandwidth, the fused-vs-cuBLAS crossovers, forward and
#      backward, that set kernels.FUSED_MAX_TOKENS), scale (7B and 65B shapes, each memory saving off, alone and all
#      on), fsdp (2 ranks, FSDP against DDP: only with 2 or more GPUs), step (against the peers), quant and
#      packing (trained tokens/s: padded, grouped by length, packed with FlexAttention's document mask).
# Each part has its own time limit, so one failure or hang does not eat the rest; every figure is in the part's
# log as soon as it is measured, and the sections' tables land in bench/RESULTS.md.
#
#   bash bench/gpu.sh                     # logs in $OUT (default /tmp/qlora-gpu), RESULTS.md copied there too
#
# The peers' rows need bitsandbytes, which the GPU image lacks and cannot download: put its wheel (43 MB; it holds
# the CUDA 11.8-13.2 binaries) in .whl/ (git-ignored) first and carry that folder to the GPU machine, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl \
#       bitsandbytes==0.50.2
# (with this workplace's device tool: command "bash bench/gpu.sh", carry [".whl"], timeout 540 s). Without it those
# rows say "skipped: bitsandbytes not installed".
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qlora-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/summary.txt"; }

log "$(nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader)"
log "$($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
log "commit $(git rev-parse --short HEAD 2>/dev/null)$(git status --porcelain 2>/dev/null | grep -q . && echo +dirty)"

run() {  # run LIMIT LOG CMD...: a part under its own time limit, its output appended to $OUT/LOG.log
    local limit=$1 name=$2; shift 2
    log "$name: $*"
    echo "== $*" >> "$OUT/$name.log"
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
    log "$name: exit $? ($(tail -n 1 "$OUT/$name.log"))"
    cp bench/RESULTS.md "$OUT/RESULTS.md"  # after every part: what was measured comes back even if a later one hangs
}

# Most important first; the limits add up to 7.9 minutes (475 s) on one GPU (fsdp's 25 s more on 2+), none of them
# measured on a GPU yet: scale's 75 s are 2 models built once (65B: 560 linears drawn and quantized on the GPU) and 15
# configurations of a warm-up + a timed step (7B at 16 x 512: ~4.4e14 FLOP a step with checkpointing), taken from
# tests, train, dequant, step and memory; fsdp's 25 s (2 torchruns of 2 ranks on the 60M model) are spent only on 2+
# GPUs, ~0 s on one. Cold compiles dominate the first parts: one fused-matmul autotune compiles every config of its
# list (bench/compile.py: 1-3 s each on a loaded host), so the parts that autotune get the room. --maxfail, not -x:
# one failing test must not hide the GPU results of the others.
# At most 8 files come back.
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")  # the kernel tests compile a few hundred Triton
run 140 tests $PY -m pytest -q --maxfail=25 -p no:cacheprovider $xdist tests/test_kernels.py  # specializations
run 30 tests $PY -m pytest -q --maxfail=25 -p no:cacheprovider tests/test_paged_adamw.py  # alone: caps GPU memory
run 25 tests $PY -m pytest -q --maxfail=25 -p no:cacheprovider tests/test_memory.py  # offload + 8-bit on CUDA
run 20 tests $PY -m pytest -q -p no:cacheprovider tests/test_packing.py -k cuda  # FlexAttention: a compile
# the training loop on CUDA end to end: bf16 compute, Triton dequantize in every matmul, paged AdamW, checkpoints;
# no held-out answers (--eval_answers=0): their greedy decoding would autotune the fused kernel cold before the
# first step, and the measured peak memory, printed after the last step, must not wait on it
run 35 train $PY train.py --max_steps=100 --eval_interval=50 --eval_answers=0 --out_dir=/tmp/qlora-gpu-run
run 90 bench_dequant $PY bench.py --section=dequant  # autotunes 3 tile heights x 3 shapes x 2 directions
run 75 bench_scale $PY bench.py --section=scale  # 7B at 1 and 16 x 512, 65B at 1 x 512; rows in the log as measured
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$ngpu" -ge 2 ]; then
    run 25 bench_fsdp $PY bench.py --section=fsdp
else  # not run, so RESULTS.md keeps the section's CPU figures instead of a skip line
    log "bench_fsdp: skipped: needs 2 GPUs (this machine has $ngpu)"
fi
run 25 bench_step $PY bench.py --section=step
run 15 bench_quant $PY bench.py --section=quant
run 20 bench_packing $PY bench.py --section=packing --quick  # FlexAttention compiles for each row length
log "done"
