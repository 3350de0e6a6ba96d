"""
Compile kernels.py's Triton kernels for NVIDIA GPUs (sm_80: A100, sm_90: H100/H200) on a machine without one, and
report what each specialization costs: registers per thread, bytes spilled, shared memory. A kernel change shows
its cost here before a GPU ever runs it; the checks are the ones that fail at launch on a GPU (shared memory over
the architecture's limit raises OutOfResources) or quietly slow it down (register spills to local memory).

  python bench/compile.py                  # the whole set: every blocksize, preset shape, dtype, both targets
  python bench/compile.py --quick          # the CI subset (tests/test_compile.py runs this)
  python bench.py --section=compile        # the whole set, its summary written into bench/RESULTS.md

How (see ../shared/reference/triton-aot.md): Triton's compiler needs no GPU, only its runtime asks a driver for
the target. A stub driver answers GPUTarget("cuda", 80 or 90); the host wrappers in kernels.py are called on fake
CUDA tensors (torch's FakeTensorMode: shapes, no memory) with each kernel replaced by a recorder, so what gets
compiled is exactly what a launch on a GPU would compile (same dtypes, constexprs, integer specializations), then
JITFunction.warmup compiles it down to a cubin with the ptxas bundled in the triton wheel, whose -v report gives
the registers and spills. Every process compiles into its own fresh TRITON_CACHE_DIR (a cached kernel skips ptxas
and so reports nothing), and never with TRITON_INTERPRET (set below before triton is first imported).
"""
import argparse
import contextlib
import io
import itertools
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled mode: triton reads this flag when it is first imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402

import kernels  # noqa: E402
import model  # noqa: E402

# the architectures' limits: dynamic shared memory per block (the opt-in maximum, bytes), registers per thread
SHARED_LIMIT = {80: 166_912, 90: 232_448}
MAX_REGS = 255
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# the fused matmul's tile heights (BLOCK_M 16, 32, 64) and M == 1 (decoding one sequence: Triton makes it a constant)
MATMUL_TOKENS = (1, 16, 32, 64)


class StubDriver(DriverBase):
    """Triton's runtime view of a GPU that is not there: a target to compile for, device 0, stream 0."""

    def __init__(self, arch):
        super().__init__()
        self.arch = arch

    @classmethod
    def is_active(cls):
        return False

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("the stub driver compiles, it never launches")

    def get_benchmarker(self):
        raise NotImplementedError("the stub driver compiles, it never launches")


@contextlib.contextmanager
def fake_cuda():
    """Fake CUDA tensors, and a CUDA 'current device' that torch.cuda.device() can switch (kernels.py guards every
    launch with the tensors' device; a CPU-only torch has no device to switch)."""
    current = [0]

    def exchange(idx):
        prev, current[0] = current[0], (current[0] if idx < 0 else idx)
        return prev
    saved = torch.cuda._exchange_device, torch.cuda._maybe_exchange_device, torch.cuda.current_device
    torch.cuda._exchange_device = torch.cuda._maybe_exchange_device = exchange
    torch.cuda.current_device = lambda: current[0]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield current
    finally:
        torch.cuda._exchange_device, torch.cuda._maybe_exchange_device, torch.cuda.current_device = saved


class Recorder:
    """Stands in for a kernel (`kernel[grid](*args, **kwargs)`): keeps each launch instead of running it."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, grid, args, kwargs))


KERNELS = {"dequantize": "_dequantize_4bit_kernel", "quantize": "_quantize_4bit_kernel",
           "matmul": "_matmul_4bit_tuned"}


def record(call):
    """[(kernel name, grid, args, kwargs)] that call() launches, each tensor as its dtype: all Triton specializes a
    pointer on is its dtype and 16-byte alignment (compile_one passes a meta tensor, whose address 0 is aligned, as
    the caching allocator's blocks are)."""
    launches, saved = [], {k: getattr(kernels, k) for k in KERNELS.values()}
    try:
        for name, attr in KERNELS.items():
            setattr(kernels, attr, Recorder(name, launches))
        with fake_cuda():
            call()
    finally:
        for k, v in saved.items():
            setattr(kernels, k, v)
    return [(n, g, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), kw)
            for n, g, args, kw in launches]


def _nf4_state(shape, blocksize, dq, dtype=torch.bfloat16):
    """A quantized weight of `shape` as a kernels.QuantState of fake CUDA tensors (dtype: its default
    dequantized dtype), with double quantization (dq) or an fp32 absmax."""
    numel = math.prod(shape)
    nb = -(-numel // blocksize)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device="cuda")
    absmax = torch.empty(nb, dtype=torch.uint8 if dq else torch.float32, device="cuda")
    nested = (torch.empty(-(-nb // 256), device="cuda"), torch.empty(256, device="cuda"), 0.01) if dq else ()
    return kernels.QuantState(packed, absmax, torch.empty(16, device="cuda"), shape, dtype, blocksize, "nf4",
                              *nested)


def layer_shapes(presets):
    """{(out, in)} of every 4-bit linear of the presets (q, k/v, o, gate/up, down), sorted."""
    shapes = set()
    for p in presets:
        a = model.get_args(p)
        kv = a.n_kv_heads * a.head_dim
        shapes |= {(a.n_heads * a.head_dim, a.dim), (kv, a.dim), (a.dim, a.n_heads * a.head_dim),
                   (a.hidden_dim, a.dim), (a.dim, a.hidden_dim)}
    return sorted(shapes)


def specializations(quick):
    """[(label, kernel name, grid, args, kwargs)]: every launch to compile, de-duplicated by what Triton
    specializes on (integers only by == 1 and divisibility by 16, so most preset shapes share one binary). A label
    names the first shape of those that share the binary, and how many others do."""
    jobs, seen = [], {}

    def add(label, call):
        for name, grid, args, kw in record(call):
            configs = kernels._matmul_4bit_tuned.configs if name == "matmul" else [None]
            for i, cfg in enumerate(configs):
                k, g = kw, grid
                if cfg is not None:  # an autotuned launch: compile each config, as the autotuner would
                    k = {**kw, **cfg.all_kwargs()}  # BLOCK_*, num_warps, num_stages (and maxnreg, where set)
                    g = grid(k)
                spec = (name, i, tuple(str(a) if isinstance(a, torch.dtype) else
                                       ("1" if a == 1 else f"d{a % 16 == 0}") if isinstance(a, int) and
                                       not isinstance(a, bool) else type(a).__name__ for a in args),
                        tuple(sorted((n, str(v)) for n, v in k.items())))
                if spec in seen:
                    seen[spec][1] += 1
                else:
                    seen[spec] = [len(jobs), 0]
                    tile = f" config {i} ({_config(cfg)})" if cfg else ""
                    jobs.append((label + tile, name, g, args, k))

    shapes = [(4096, 4096)] if quick else layer_shapes(model.PRESETS)
    blocksizes = (64,) if quick else BLOCKSIZES
    for (N, K), bs, (dn, dt), dq in itertools.product(shapes, blocksizes, DTYPES.items(), (False, True)):
        add(f"dequantize {dn} bs{bs}{' dq' * dq} {N}x{K}",
            lambda: kernels.dequantize_4bit_triton(_nf4_state((N, K), bs, dq), dt))
        if not dq:  # double quantization of the absmax happens in torch after the kernel
            add(f"quantize {dn} bs{bs} {N}x{K}", lambda: kernels.quantize_4bit_triton(
                torch.empty(N, K, dtype=dt, device="cuda"), torch.empty(16, device="cuda"), bs))
    mm_dtypes = ("bf16",) if quick else ("bf16", "fp16")  # fp32 never takes the fused kernel on a GPU
    tokens = (16,) if quick else MATMUL_TOKENS
    for (N, K), dn, dq, T, transpose in itertools.product(shapes, mm_dtypes, (False, True) if not quick else (True,),
                                                          tokens, (False, True)):
        add(f"matmul {'backward' if transpose else 'forward'} {dn}{' dq' * dq} M={T} {N}x{K}",
            lambda: kernels.matmul_4bit_triton(torch.empty(T, N if transpose else K, dtype=DTYPES[dn], device="cuda"),
                                               _nf4_state((N, K), 64, dq), transpose=transpose))
    for i, more in seen.values():
        if more:
            jobs[i] = (jobs[i][0] + f" (+{more} shapes)",) + jobs[i][1:]
    return jobs


def _config(c):
    """A fused-matmul config as BLOCK_N x BLOCK_KB, warps, stages (and ptxas' register bound, where set)."""
    return (f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_KB']} w{c.num_warps} s{c.num_stages}" +
            (f" maxnreg {c.maxnreg}" if c.maxnreg else ""))


_PTXAS = re.compile(r"Used (\d+) registers|(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job, arch):
    """Compile one specialization for sm_{arch}: a dict of registers, spills, shared memory, PTX store widths."""
    label, name, grid, args, kw = job
    triton.runtime.driver.set_active(StubDriver(arch))
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas always runs with -v; this prints its report (captured)
    fn = kernels._matmul_4bit_kernel if name == "matmul" else getattr(kernels, KERNELS[name])
    fn.device_caches.clear()  # they hold the target of the first compile in this process, and its binaries
    args = [torch.empty(0, dtype=a, device="meta") if isinstance(a, torch.dtype) else a for a in args]
    res = dict(label=label, arch=arch, kernel=name)
    buf, t = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            k = fn.warmup(*args, grid=grid, **kw)
    except Exception as e:  # a compile error is a result to report (the caller fails on it), not a crash
        return {**res, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    if k.metadata.target.arch != arch or "Used " not in buf.getvalue():  # compiled for another target, or cached
        return {**res, "error": f"no ptxas report for sm_{arch} (compiled for sm_{k.metadata.target.arch})"}
    regs = spills = 0
    for m in _PTXAS.finditer(buf.getvalue()):
        if m.group(1):
            regs = max(regs, int(m.group(1)))
        else:
            spills = max(spills, int(m.group(2)) + int(m.group(3)))
    stores = re.findall(r"st\.global((?:\.v\d)?)\.[bu](\d+)", k.asm["ptx"])  # (vector width, bits) per store
    res.update(regs=regs, spills=spills, shared=k.metadata.shared, warps=k.metadata.num_warps,
               store_bytes=sorted({int(v[2:] or 1) * int(b) // 8 for v, b in stores}),
               seconds=time.perf_counter() - t)
    return res


def problems(r):
    """What is wrong with one result, or '' (compile error, register spill, shared memory over the limit)."""
    if "error" in r:
        return r["error"]
    out = []
    if r["spills"]:
        out.append(f"spills {r['spills']} bytes")
    if r["shared"] > SHARED_LIMIT[r["arch"]]:
        out.append(f"shared memory {r['shared']} > {SHARED_LIMIT[r['arch']]}")
    if r["regs"] > MAX_REGS:
        out.append(f"{r['regs']} registers")
    if r["kernel"] in ("quantize", "dequantize") and (16 not in r["store_bytes"] or 1 in r["store_bytes"]):
        out.append(f"stores of {r['store_bytes']} bytes, not 16-byte vectors")  # the packed bytes, or W's values
    return ", ".join(out)


def _compile_job(a):
    return compile_one(*a)


def _fresh_cache(root):
    """A new, empty Triton cache for this process (under `root`, which run() deletes at the end)."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=root)


def run(quick=False, archs=(80, 90), jobs=1, kernel_names=tuple(KERNELS), echo=print, match=None):
    """Compile the set (only the labels that the regular expression `match` finds, when given), echo one line per
    specialization as it finishes, return the results."""
    work = [(j, arch) for j in specializations(quick) if j[1] in kernel_names and
            (match is None or re.search(match, j[0])) for arch in archs]
    if not work:  # a --match that finds nothing would otherwise report a clean (empty) set
        raise SystemExit(f"no specialization to compile (kernels {', '.join(kernel_names)}, match {match!r})")
    echo(f"{len(work)} compiles ({len(work) // len(archs)} specializations x sm_{', sm_'.join(map(str, archs))}), "
         f"{jobs} process(es), triton {triton.__version__}")
    results = []
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(tempfile.TemporaryDirectory(prefix="qlora-compile-"))
        if jobs > 1:  # spawn: each worker imports this file afresh (no interpreter) and gets its own cache
            import multiprocessing
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=_fresh_cache, initargs=(root,)))
            it = pool.map(_compile_job, work, chunksize=1)
        else:
            _fresh_cache(root)
            it = map(_compile_job, work)
        for r in it:
            results.append(r)
            p = problems(r)
            echo(f"sm_{r['arch']} {r['label']}: " + (r["error"] if "error" in r else
                 f"{r['regs']} regs, {r['spills']} B spilled, {r['shared']:,} B shared, {r['warps']} warps, "
                 f"global stores of {'/'.join(map(str, r['store_bytes']))} B, {r['seconds']:.1f} s") + (f"  <-- {p}" if p else ""))
    return results


def summary(results):
    """Markdown lines: per kernel and target, the count, the ranges, and every problem."""
    lines = ["| target | kernel | specializations | registers | spilled bytes | shared memory KiB | problems |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    key = lambda r: (r["arch"], r["kernel"])
    for (arch, name), group in itertools.groupby(sorted(results, key=key), key=key):
        g = [r for r in group]
        ok = [r for r in g if "error" not in r]
        rng = lambda f: f"{min(f(r) for r in ok)}-{max(f(r) for r in ok)}" if ok else "-"
        lines.append(f"| sm_{arch} | {name} | {len(g)} | {rng(lambda r: r['regs'])} | {rng(lambda r: r['spills'])} | "
                     f"{rng(lambda r: round(r['shared'] / 1024))} | {sum(bool(problems(r)) for r in g)} |")
    bad = [r for r in results if problems(r)]
    lines.append("")
    lines += [f"- sm_{r['arch']} {r['label']}: {problems(r)}" for r in bad] or ["Every specialization compiles, "
                                                                                 "without spills, within the limits."]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset (blocksize 64, one 7B shape, bf16 matmul)")
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)), help="compile processes")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    ap.add_argument("--configs", help="replace the fused matmul's autotune list, e.g. 32,64,4,3;64,64,8,3,255 "
                                      "(BLOCK_N, BLOCK_KB, num_warps, num_stages[, maxnreg]): see what a list would "
                                      "cost")
    ap.add_argument("--match", help="compile only the specializations whose label this regular expression finds, "
                                    "e.g. 'bf16' or 'backward .*M=(1|64) ' (labels as printed: kernel, direction, "
                                    "dtype, dq, tokens, first shape, config)")
    a = ap.parse_args(argv)
    if a.configs:
        kernels._matmul_4bit_tuned.configs = [
            triton.Config({"BLOCK_N": n, "BLOCK_KB": kb}, num_warps=w, num_stages=st, maxnreg=(r or [None])[0])
            for n, kb, w, st, *r in (map(int, c.split(",")) for c in a.configs.split(";"))]
    t = time.time()
    results = run(a.quick, tuple(int(x) for x in a.arch.split(",")), a.jobs, tuple(a.kernels.split(",")),
                  match=a.match)
    print("\n".join(["", *summary(results), "", f"{len(results)} compiles in {time.time() - t:.0f} s"]))
    return 1 if any(problems(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
