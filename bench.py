"""
Benchmarks, and the QLoRA paper's claims reproduced at small scale. Each section runs alone, prints its figures and
writes them, under a header (date, commit, machine, package versions), into its own part of bench/RESULTS.md.

  python bench.py                    # every section this device can run (CPU: under 10 minutes on 2 cores)
  python bench.py --section=step     # one of the sections below; the others' results are kept
  python bench.py --paper            # the reproductions only (= --section=paper)
  python bench.py --quick --out=/tmp/r.md    # tiny shapes and runs, seconds (the smoke test)

  quant    NF4 + double quantization at LLaMA-7B's layer shapes: quantize / dequantize time, ours against bitsandbytes
  dequant  dequantization throughput against the device's copy bandwidth; on CUDA the fused 4-bit matmul against
           dequantize + matmul over 1..8192 tokens, forward and backward, and where they cross
           (kernels.FUSED_MAX_TOKENS)
  step     a training step of a ~60M LLaMA (LoRA r=16 on all linears, batch 4 x 256): ours against transformers +
           peft + bitsandbytes, LoRA over unquantized weights, PagedAdamW against AdamW; each in its own process
  fsdp     the same ~60M model on 2 ranks under torchrun, train.py's FSDP against its DDP: each rank's peak memory
           over a step and the base bytes it holds (CPU: gloo, RSS; CUDA: nccl, needs 2 GPUs)
  packing  trained tokens per second, padded / grouped by length / packed, on the sample and on OASST1
  tokenize encoding MB/s on OASST1's messages: our pure-Python BPE (Llama 3's file) cold and warm, tiktoken on the
           same file, sentencepiece on LLaMA 2's; and data/oasst1/prepare.py's time with each
  scale    CUDA only: LLaMA-7B and 65B shapes, random weights quantized on the GPU, each memory saving (8-bit paged
           AdamW, chunked loss, offloaded activations) off, alone and all on: peak memory, managed states, tokens/s
           (--quick on CPU: the same loop on the tiny preset, a smoke test)
  paper    Table 2 (perplexity by 4-bit data type) on a real pretrained model; QLoRA against 16-bit LoRA (train.py)
  busy     only when asked, CPU: the default run (python train.py) idle and beside two busy processes, with
           libgomp's default spin-wait and with OMP_WAIT_POLICY=PASSIVE (the entry scripts' on a busy CPU)
  compile  only when asked: every Triton kernel specialization compiled for sm_80 and sm_90 without a GPU
           (bench/compile.py): registers, spills, shared memory
The peers (transformers, peft, bitsandbytes) are optional: where one is missing, its rows say so, never a number.
A bad flag, --out or --models folder is one line, `error: ...`, before any section runs.
"""
import ctypes
import gc
import importlib.metadata
import itertools
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:  # before torch loads OpenMP: README, "A busy CPU"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

import checkpoint as C
import configurator
import distributed as D
import kernels
import memory
import model as M
import qlora as Q
from cuda_runtime import cudart
from data.batching import (IGNORE, collate, data_folder, length_grouped_batches, load_split, packed_batches,
                           packing_stats)
from paged_adamw import PagedAdamW, PagedAdamW8bit, state_bytes
from peers import PEERS, import_peer, installed
from tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIALS, Tokenizer, TokenizerError, find_tokenizer

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT.parent / "shared" / "assets"  # real test assets beside the repo (see tests/conftest.py)
SECTIONS = ("quant", "dequant", "step", "fsdp", "packing", "tokenize", "scale", "paper", "busy", "compile")
DEFAULT_SECTIONS = SECTIONS[:-2]  # busy (several minutes of loaded runs) and compile (16-30 minutes) when asked for
TITLES = dict(quant="1. Quantization: NF4 + double quantization, LLaMA-7B layer shapes",
              dequant="Dequantization throughput", step="2. Training step: ~60M LLaMA, LoRA r=16, NF4 + DQ",
              fsdp="2b. FSDP against DDP: the per-rank memory of a 2-rank step, ~60M LLaMA",
              packing="2c. Padded, grouped by length, packed: trained tokens per second (`--section=packing`)",
              tokenize="2d. Tokenizers: encoding MB/s on OASST1, ours against tiktoken and sentencepiece",
              scale="3. Memory at scale", paper="Reproduction (`--paper`)",
              busy="The default run on a busy CPU: OpenMP's spin-wait (`--section=busy`)",
              compile="The Triton kernels compiled for sm_80 and sm_90, without a GPU (`--section=compile`)")
SHAPES_7B = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in): attention; gate and up; down
STEP_MODEL = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=512)  # 60.1M parameters

# -----------------------------------------------------------------------------
# helpers: printing, timing, the results file


def say(out, line=""):
    """Print a result line and keep it for the results file."""
    print(line, flush=True)
    out.append(line)


def table(out, head, rows):
    for r in (head, ["---"] * len(head), *rows):
        say(out, "| " + " | ".join(str(c) for c in r) + " |")


def peer(name, out):
    """A peer package, or None after saying that its comparison is skipped (a missing peer is never a number).
    An installed one that fails to import is an error, not a skip."""
    if installed(name) is None:
        say(out, f"skipped: {name} not installed")
        return None
    return import_peer(name)  # beside our kernels.py: peers.py says why that takes care


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, reps, warmup=1, median=True):
    """Median seconds of fn() (or all the times) after `warmup` calls: Triton compiles and autotunes, allocators
    and optimizer states settle."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) if median else times


def sig(x, n=3):
    """x with n significant digits, never rounded to 0 (a 0.04 ms dequantize printed as "0.0" once read as none):
    0.0412, 1.23, 45.6, 1,234."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, n - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def default_threads():
    """All cores, less the ones other processes keep busy: OpenMP threads spin-wait for siblings that the OS has
    descheduled, so on 2 cores shared with one busy process, 2 threads ran a step ~15x slower than 1 (measured)."""
    return max(1, min(os.cpu_count(), round(os.cpu_count() - os.getloadavg()[0])))


def header(device):
    def git(*a):  # "" where git or the repository is missing (a copied tree on another machine)
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain") else "")
    info = dict(re.findall(r"^(model name|MemTotal)\s*:\s*(.+)$", "".join(
        Path(f).read_text() for f in ("/proc/cpuinfo", "/proc/meminfo") if Path(f).exists()), re.M))  # Linux
    ram = f"{int(info['MemTotal'].split()[0]) / 2**20:.0f} GiB RAM" if "MemTotal" in info else "RAM unknown"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"

    def version(p):
        try:
            return importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    return (f"{datetime.now(timezone.utc):%a %b %d %H:%M:%S UTC %Y} · commit {commit} · "
            f"{info.get('model name', 'CPU unknown')}, {os.cpu_count()} cores, {ram}, {gpu} · "
            f"{torch.get_num_threads()} torch threads (load average {os.getloadavg()[0]:.1f}) · "
            + ", ".join(f"{p} {version(p)}" for p in ("torch", "triton", *PEERS)))


def write_section(path, name, head, body):
    """Replace section `name` of the results file and keep the others (each section can run alone), and the
    hand-written ones after them."""
    old = path.read_text() if path.exists() else ""
    parts = dict(re.findall(r"<!-- (\w+) -->\n(.*?)<!-- /\1 -->\n", old, re.S))
    parts[name] = f"## {TITLES[name]}\n\n_{head}_\n\n" + "\n".join(body) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Benchmark results\n\nWritten by `python bench.py` (see its docstring); each section by "
                    "`python bench.py --section=NAME`.\n\n"
                    + "".join(f"<!-- {k} -->\n{parts[k]}<!-- /{k} -->\n\n"  # then hand-written parts (notes)
                              for k in [*SECTIONS, *sorted(parts.keys() - set(SECTIONS))] if k in parts))

# -----------------------------------------------------------------------------
# 1. quantize / dequantize, and dequantization throughput


def nf4_impls(device, bnb):
    """name -> (quantize(w) -> state, dequantize(state) -> w): NF4, double quantization, blocks of 64."""
    code = Q.CODES["nf4"].to(device)

    def ours(quantize_4bit, dequantize_4bit):  # kernels' functions by name: the torch path is timed on CUDA too
        def quantize(w):
            packed, absmax = quantize_4bit(w, code, 64)
            absmax, nested, offset = Q.double_quantize(absmax)
            return kernels.QuantState(packed.view(-1, 1), absmax, code, w.shape, w.dtype, 64, "nf4", nested,
                                      Q.DYNAMIC.to(device), offset)
        return quantize, dequantize_4bit  # (q) -> W of q.shape in q.dtype
    impls = {"ours, torch": ours(kernels.quantize_4bit_ref, kernels.dequantize_4bit_ref)}
    if device.type == "cuda":
        impls["ours, Triton"] = ours(kernels.quantize_4bit_triton, kernels.dequantize_4bit_triton)
    if bnb is not None:
        impls["bitsandbytes"] = (lambda w: bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                                        quant_type="nf4"),
                                 lambda s: bnb.functional.dequantize_4bit(*s))
    return impls


def shapes_for(quick):
    return ((96, 128), (128, 96)) if quick else SHAPES_7B


def bench_quant(device, a, out):
    bnb = peer("bitsandbytes", out)
    # no warm-up on CPU: nothing to compile, and large CPU tensors are allocated afresh (page faults) on every call
    (reps, warmup), rows = ((10, 1) if device.type == "cuda" else (3, 0)), []
    for shape in shapes_for(a.quick):
        w = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02  # LLaMA's weights: bf16, std ~0.02
        times = {}
        for name, (quantize, dequantize) in nf4_impls(device, bnb).items():
            state = quantize(w)
            times[name] = (timeit(lambda: quantize(w), device, reps, warmup),
                           timeit(lambda: dequantize(state), device, 3 * reps, warmup))  # cheap: more runs
        for name, (tq, td) in times.items():
            vs = [f"{b / t:.2f}x" for b, t in zip(times["bitsandbytes"], (tq, td))] if bnb else ["-", "-"]
            rows.append([f"{shape[0]} x {shape[1]}", name, sig(tq * 1e3), sig(td * 1e3), *vs])
    table(out, ["shape (out x in), bf16", "implementation", "quantize ms", "dequantize ms",
                "quantize speed vs bnb", "dequantize speed vs bnb"], rows)
    say(out, f"\nMedian of {reps} runs (dequantize: {3 * reps}){' after a warm-up' * warmup}. Speed vs bnb = "
        "bitsandbytes' time / this row's time (>1: faster).")


def copy_bandwidth(device, nbytes=256 * 2**20):
    """The memory-bandwidth limit a dequantization can approach, measured: one large copy reads and writes nbytes."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timeit(lambda: dst.copy_(src), device, reps=5)


def bench_dequant(device, a, out):
    bnb = peer("bitsandbytes", out)
    limit, reps, rows = copy_bandwidth(device), (10 if device.type == "cuda" else 3), []
    for shape in shapes_for(a.quick):
        w = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
        impls = nf4_impls(device, bnb)
        q = impls["ours, torch"][0](w)  # the same bytes in every implementation (the tests check it bit for bit)
        moved = sum(memory.quant_bytes(q).values()) + w.nbytes  # 4-bit codes and constants read, bf16 W written
        for name, (quantize, dequantize) in impls.items():
            state = q if name.startswith("ours") else quantize(w)
            gbs = moved / timeit(lambda: dequantize(state), device, reps) / 1e9
            rows.append([f"{shape[0]} x {shape[1]}", name, sig(gbs), f"{100 * gbs / (limit / 1e9):.0f}%"])
    cpu_threads = "" if device.type == "cuda" else f" ({torch.get_num_threads()} torch threads, as the rows)"
    say(out, f"Bandwidth limit: a 256 MiB copy on this device{cpu_threads} moves "
        f"{sig(limit / 1e9)} GB/s (read + write).\n")
    table(out, ["shape (out x in)", "implementation", "dequantize GB/s moved", "of the copy bandwidth"], rows)
    if device.type != "cuda":
        say(out, "\nFused 4-bit matmul against dequantize + matmul: skipped: needs CUDA (the Triton kernel).")
        return
    saved, rows, best = dict(kernels.FUSED_MAX_TOKENS), [], {"forward": [], "backward": []}
    try:
        for (N, K), (direction, transpose) in itertools.product(shapes_for(a.quick), (("forward", False),
                                                                                      ("backward", True))):
            q = Q.quantize(torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02)  # blocks of 64, DQ
            fused_wins_up_to, fused_on = 0, True
            for T in [2**i for i in range(14)]:  # 1 .. 8192 tokens
                x = torch.randn(T, N if transpose else K, device=device, dtype=torch.bfloat16)  # x, or grad_y
                t = {}
                for path, n in (("fused", 2**30), ("dequantize + matmul", 0))[0 if fused_on else 1:]:
                    kernels.FUSED_MAX_TOKENS = {**saved, direction: n}  # the dispatch's switch, swept
                    t[path] = timeit(lambda: kernels.matmul_4bit(x, q, transpose=transpose), device, reps=10,
                                     warmup=2)
                if "fused" in t and t["fused"] < t["dequantize + matmul"]:
                    fused_wins_up_to = T
                fused_on = "fused" in t and t["fused"] < 4 * t["dequantize + matmul"]  # far behind: it only loses more
                rows.append([f"{N} x {K}", direction, T, f"{t['fused'] * 1e6:.0f}" if "fused" in t else "-",
                             f"{t['dequantize + matmul'] * 1e6:.0f}"])
                print(" ", *rows[-1], flush=True)  # as measured: a run cut short still shows what it got
            best[direction].append(fused_wins_up_to)
    finally:
        kernels.FUSED_MAX_TOKENS = saved
    say(out, "\nkernels.matmul_4bit, bf16, median us: forward x (T, in) @ W.T, backward grad_y (T, out) @ W:\n")
    table(out, ["W (out x in)", "direction", "tokens T", "fused us", "dequantize + matmul us"], rows)
    for direction, wins in best.items():
        say(out, f"\nCrossover, {direction}: the fused kernel wins up to {wins} tokens per shape; "
            f"kernels.FUSED_MAX_TOKENS['{direction}'] is {saved[direction]}, the measurement suggests {min(wins)}.")

# -----------------------------------------------------------------------------
# 2. a training step, each configuration in its own process (ru_maxrss is the peak of the whole process)

# label, implementation, frozen base (nf4 | none), weights' and compute dtype (None: bf16 on CUDA, else fp32),
# optimizer, loss (full: F.cross_entropy on the whole logits, as the peers compute it | chunked:
# model.ChunkedCrossEntropy), batch
STEP_CONFIGS = (("ours: NF4 + DQ", "ours", "nf4", None, "adamw", "full", "4x256"),
                ("transformers + peft + bitsandbytes: NF4 + DQ", "peer", "nf4", None, "adamw", "full", "4x256"),
                ("ours: LoRA on fp32 weights, no quantization", "ours", "none", "float32", "adamw", "full", "4x256"),
                ("ours: LoRA on bf16 weights, no quantization", "ours", "none", "bfloat16", "adamw", "full", "4x256"),
                ("ours: NF4 + DQ, PagedAdamW", "ours", "nf4", None, "paged", "full", "4x256"),
                ("ours: NF4 + DQ, PagedAdamW8bit", "ours", "nf4", None, "paged8", "full", "4x256"),
                ("ours: NF4 + DQ, chunked loss", "ours", "nf4", None, "adamw", "chunked", "4x256"),
                ("ours: NF4 + DQ, batch 16 x 512", "ours", "nf4", None, "adamw", "full", "16x512"),
                ("ours: NF4 + DQ, batch 16 x 512, chunked loss", "ours", "nf4", None, "adamw", "chunked", "16x512"))
STEP_BATCHES = {"4x256": (4, 256), "16x512": (16, 512)}
QUICK_BATCHES = {"4x256": (2, 32), "16x512": (4, 64)}


def step_args(quick):
    """The step section's model: ~60M parameters, or a tiny one for --quick."""
    return M.ModelArgs(**(dict(dim=64, n_layers=2, n_heads=4, vocab_size=1000) if quick else STEP_MODEL))


def save_random_model(ckpt, args):
    """The random model every step row (and every rank of the fsdp section) loads, saved as a Hugging Face fp32
    checkpoint in folder ckpt; returns its parameter count."""
    torch.manual_seed(0)
    dense = M.Transformer(args)
    C.save_safetensors(Path(ckpt) / "model.safetensors", dense.state_dict())
    (Path(ckpt) / "config.json").write_text(json.dumps(C.hf_config(args, torch.float32)))
    return sum(p.numel() for p in dense.parameters())


def step_child(a, device):
    """One configuration: load the saved random model, time training steps, print one RESULT json line."""
    torch.set_num_threads(a.threads)
    if device.type == "cpu":  # as train.py runs on CPU, for every row alike (peers too): see keep_freed_memory
        memory.keep_freed_memory()
    dtype = getattr(torch, a.dtype)
    B, T = (QUICK_BATCHES if a.quick else STEP_BATCHES)[a.batch]
    ids = torch.randint(0, C.load_args(a.ckpt).vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)  # the same batch in every process
    if a.impl == "ours":
        model = C.load_quantized(a.ckpt, device, dtype, r=16, alpha=16, dropout=0.0, quant_type=a.quant,
                                 double_quant=True, compute_dtype=dtype)
        forward = lambda: model(x)
        if a.loss == "chunked":  # the same mean loss, the head and the loss a chunk of tokens at a time
            forward = None
            loss_fn = lambda: model(x, targets=y) / y.numel()
    else:
        transformers, peft = import_peer("transformers"), import_peer("peft")
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        where = {"": 0 if device.type == "cuda" else "cpu"}  # the whole model on GPU 0 (or the CPU)
        base = transformers.AutoModelForCausalLM.from_pretrained(a.ckpt, quantization_config=bnb, dtype=dtype,
                                                                 device_map=where)
        model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                          target_modules=list(Q.LINEARS)))  # prepare_... not needed
        forward = lambda: model(input_ids=x, use_cache=False).logits
    params = [p for p in model.parameters() if p.requires_grad]
    opt = dict(paged=PagedAdamW, paged8=PagedAdamW8bit, adamw=torch.optim.AdamW)[a.optimizer](params, lr=1e-4)
    losses = []

    def step():  # the loss over all tokens, as train.py computes it
        loss = F.cross_entropy(forward().flatten(0, 1).float(), y.flatten()) if forward else loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    statm = Path("/proc/self/statm")  # the resident set now, after loading (Linux)
    loaded = int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20 if statm.exists() else math.nan
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # warm-up: the optimizer's states, autotuning, and on CPU the heap growing to its peak (the first step after a
    # single warm-up step measured 13% slower than the rest)
    times = timeit(step, device, a.steps, warmup=2, median=False)
    r = dict(times=times, loss1=losses[0],
             trainable=sum(p.numel() for p in params), loaded_rss_mib=loaded,
             peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # ru_maxrss: KiB on Linux
    if device.type == "cuda":
        r.update(alloc_mib=torch.cuda.max_memory_allocated(device) / 2**20,
                 reserved_mib=torch.cuda.max_memory_reserved(device) / 2**20)
    if a.profile:  # where one step's time goes, by operator (self time, on the GPU where there is one)
        with torch.profiler.profile() as prof:
            step()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        ops = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:40]  # the top ones, and for the diff
        r["top_ops"] = [(e.key, getattr(e, key) / 1e3, e.count) for e in ops]
    print("RESULT " + json.dumps(r))


def bench_step(device, a, out):
    have_peers = all([peer(p, out) is not None for p in PEERS])  # (a list: say every missing one)
    compute = "bfloat16" if device.type == "cuda" else "float32"
    args = step_args(a.quick)
    batches = QUICK_BATCHES if a.quick else STEP_BATCHES
    (B, T), steps, res = batches["4x256"], (2 if a.quick else 4), {}
    rounds = 1 if a.quick or device.type == "cuda" else 2  # a shared CPU's speed drifts; a GPU's much less
    with tempfile.TemporaryDirectory() as ckpt:
        n_params = save_random_model(ckpt, args)
        for rnd, (label, impl, quant, dtype, opt, loss, batch) in itertools.product(range(rounds), STEP_CONFIGS):
            if impl == "peer" and not have_peers:  # rounds interleave the rows, so a slow spell of the machine
                continue  # falls on every row rather than on one
            cmd = [sys.executable, str(ROOT / "bench.py"), f"--impl={impl}", f"--quant={quant}", f"--ckpt={ckpt}",
                   f"--dtype={dtype or compute}", f"--optimizer={opt}", f"--steps={steps}", f"--threads={a.threads}",
                   f"--loss={loss}", f"--batch={batch}", *["--quick"] * a.quick,
                   *["--profile"] * (label in (STEP_CONFIGS[0][0], STEP_CONFIGS[1][0]) and rnd == 0)]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"step section, {label}: the child process failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
            if label in res:  # pool the rounds: all step times, the largest peaks
                r = {**res[label], "times": res[label]["times"] + r["times"],
                     **{k: max(res[label][k], r[k]) for k in r if k.endswith("_mib")}}
            res[label] = {**r, "median_s": statistics.median(r["times"]), "min_s": min(r["times"]),
                          "max_s": max(r["times"]), "tokens": math.prod(batches[batch])}
            print(f"  round {rnd + 1}, {label}: {statistics.median(r['times']):.3f} s/step", flush=True)
    say(out, f"LLaMA dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab_size} "
        f"({n_params / 1e6:.1f}M parameters, random init, one checkpoint loaded by every row); batch {B} x {T} tokens "
        "unless the row says otherwise (seeded, the same in every row), loss over all tokens; LoRA r=16, alpha 16, "
        f"dropout 0 on all 7 linears of every block; AdamW lr 1e-4; compute {compute}. Each row runs in its own "
        "process, "
        f"{'once' if rounds == 1 else f'{rounds} times, the rows interleaved'}; the median of all {steps * rounds} "
        "timed steps (each run after 2 warm-up steps), peaks the largest of the runs"
        + (". On CPU every row (peers too) runs with glibc's malloc keeping freed buffers, as train.py sets it "
           "(memory.keep_freed_memory)" if device.type == "cpu" else "") + ".\n")
    mem = ("alloc_mib", "reserved_mib") if device.type == "cuda" else ("peak_rss_mib", "loaded_rss_mib")
    table(out, ["configuration", "step s (min-max)", "tokens/s", *(["peak allocated MiB", "peak reserved MiB"] if
                device.type == "cuda" else ["peak RSS MiB", "RSS after loading MiB"]), "loss at step 1", "LoRA params"],
          [[k, f"{sig(r['median_s'])} ({sig(r['min_s'])}-{sig(r['max_s'])})", sig(r['tokens'] / r['median_s']),
            *[f"{r[m]:,.0f}" for m in mem], f"{r['loss1']:.4f}", f"{r['trainable']:,}"] for k, r in res.items()])
    (ours, them, fp32, _, paged, paged8, chunked, big, big_chunked), peak = [res.get(c[0]) for c in STEP_CONFIGS], \
        mem[0]
    say(out, f"\nThe cost of dequantization: ours NF4 + DQ takes {ours['median_s'] / fp32['median_s']:.2f}x the step "
        f"time of the same LoRA over fp32 weights, in {ours[peak] / fp32[peak]:.2f}x the peak memory.")
    say(out, f"PagedAdamW against torch.optim.AdamW (ours, NF4 + DQ): {paged['median_s'] / ours['median_s']:.2f}x the "
        "step time" + ("." if device.type == "cuda" else " (on CPU PagedAdamW takes its exact CPU path: no paging)."))
    say(out, f"PagedAdamW8bit against PagedAdamW: {paged8['median_s'] / paged['median_s']:.2f}x the step time, peak "
        f"{paged[peak]:,.0f} -> {paged8[peak]:,.0f} MiB (its states: 2.03 bytes a LoRA parameter instead of 8).")
    say(out, "The chunked loss (ours, NF4 + DQ; the full logits never exist): peak " + "; ".join(
        f"{f[peak]:,.0f} -> {c[peak]:,.0f} MiB ({c[peak] / f[peak] - 1:+.0%}) at {n}, "
        f"{c['median_s'] / f['median_s']:.2f}x the step time"
        for f, c, n in ((ours, chunked, "%d x %d" % (B, T)), (big, big_chunked, "%d x %d" % batches["16x512"]))) + ".")
    if them is None:
        return say(out, "transformers + peft + bitsandbytes: skipped (not installed), so no ratio against them.")
    tr, mr = ours["median_s"] / them["median_s"], ours[peak] / them[peak]
    overlap = ours["min_s"] <= them["max_s"] and them["min_s"] <= ours["max_s"]
    speed = "at least as fast" if tr <= 1 else "SLOWER" + (" by the median, within the two rows' spread (their min-" \
        "max ranges overlap)" if overlap else "")
    say(out, f"Ours against transformers + peft + bitsandbytes: {tr:.2f}x the step time, {mr:.2f}x the peak memory: "
        f"{speed}, {'no larger' if mr <= 1 else 'LARGER'}.")
    if tr > 1:  # say why, from this run's own profiles
        top = {k: {op: (ms, n) for op, ms, n in res[k]["top_ops"]} for k in (STEP_CONFIGS[0][0], STEP_CONFIGS[1][0])}
        (mine, theirs), fp32_dq = top.values(), ours["median_s"] - fp32["median_s"]
        diff = sorted(((ms - theirs.get(op, (0, 0))[0], op, n, theirs.get(op, (0, 0))[1]) for op, (ms, n) in
                       mine.items()), reverse=True)[:5]
        how = ("with torch ops (kernels.dequantize_4bit_ref: one table lookup per byte, then the block scale), "
               "bitsandbytes with one C++ call per weight" if device.type == "cpu" else "with our Triton kernel, "
               "bitsandbytes with its CUDA kernel")
        say(out, f"\nWhy slower: both steps run the same matmuls, attention and loss; we dequantize {how}. "
            f"Against the same LoRA over fp32 weights, dequantizing costs us {fp32_dq:+.3f} s "
            f"a step and bitsandbytes {them['median_s'] - fp32['median_s']:+.3f} s. One step's profile, the operators "
            "where ours spends the most time beyond theirs (self time):\n")
        table(out, ["operator", "ours ms", "theirs ms", "difference ms", "calls ours / theirs"],
              [[op, sig(mine[op][0]), sig(theirs.get(op, (0,))[0]), ("+" if d > 0 else "") + sig(d), f"{n} / {m}"]
               for d, op, n, m in diff])

# -----------------------------------------------------------------------------
# 2b. FSDP against DDP: two ranks under torchrun, each building, wrapping and stepping the model as train.py does

DIST_MODES = ("ddp", "fsdp")


def rss_mib(field):
    """/proc/self/status's VmRSS (resident now) or VmHWM (the peak since the start, or since reset_rss_peak), MiB."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) / 1024


def release_freed_memory():
    """CPU (glibc) only, the fsdp section's ranks: hand every buffer of 64 KiB or more back to the OS as it is freed
    (a fixed mmap threshold, which also stops glibc raising it as it goes, and no trim threshold), so the RSS peak
    is the peak of the live buffers. Under memory.keep_freed_memory, as train.py runs, the heap keeps whichever freed
    buffers it kept: the ranks of one mode differed by up to 72 MiB, DDP-FSDP by -38 to +87 MiB, on a 6.7 MiB saving."""
    if not memory.set_malloc(mmap_threshold=64 * 1024, trim_threshold=0):
        raise RuntimeError("glibc's mallopt refused the fsdp section's thresholds")


def reset_rss_peak():
    """Linux >= 4.0: VmHWM (and ru_maxrss with it) := the RSS now, so the next peak is the coming code's own."""
    Path("/proc/self/clear_refs").write_text("5")


def dist_child(a, device):
    """One rank of the fsdp section, under torchrun: the step section's random checkpoint loaded as train.py's
    build_model loads it (streamed and quantized tensor by tensor; under FSDP into this rank's shards by
    distributed.load_sharded), wrapped as train.py wraps it (distributed.wrap: DDP, or FSDP2), and stepped as its
    loop steps (loss summed over the tokens of all ranks, clip_grads, the optimizer on local_shard's rows). Writes
    this rank's figures as json."""
    world, rank, local_rank = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if device.type == "cuda":  # as train.py: this rank's GPU, the current device for Triton and the streams
        device = torch.device("cuda", local_rank)
    torch.set_num_threads(a.threads)
    D.start(device, world)  # nccl on CUDA, gloo on CPU
    if device.type == "cpu":
        release_freed_memory()  # RSS = live buffers: the modes' difference is not lost in what the heap kept
    fsdp, compute = a.dist == "fsdp", torch.bfloat16 if device.type == "cuda" else torch.float32  # as train.py
    lora = dict(r=16, alpha=16.0, dropout=0.0, compute_dtype=compute)  # train.py's other defaults are add_lora's
    torch.manual_seed(1337)  # train.py under FSDP: the same adapter init on every rank (DDP broadcasts rank 0's)
    model = D.load_sharded(a.ckpt, device, compute, lora, compute) if fsdp else \
        C.load_quantized(a.ckpt, device=device, dtype=compute, **lora)
    if not D.is_fsdp(model):  # (a sharded model got its dtype before it was sharded)
        Q.lora_to(model, compute)
    net = D.wrap(model, device, fsdp, log=lambda *_: None)
    params = [p for p in model.parameters() if p.requires_grad]
    shards = [D.local_shard(p) for p in params]
    opt = PagedAdamW(shards, lr=2e-3, weight_decay=0.0)  # train.py's default optimizer
    B, T = (QUICK_BATCHES if a.quick else STEP_BATCHES)["4x256"]
    ids = torch.randint(0, model.args.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(rank))
    x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)  # each rank its own batch, the same in both modes
    n_tokens = D.all_sum(torch.tensor(float(y.numel()), device=device)).item()
    losses = []

    def step():  # one step of train.py's loop, without accumulation
        loss = net(x, targets=y)  # train.py's default chunked loss, summed over the tokens
        (loss * world / n_tokens).backward()
        D.clip_grads(params, 0.3)  # train.py's max_grad_norm
        D.optimizer_step(model, params, shards, opt)
        losses.append(D.all_sum(loss.detach()).item() / n_tokens)
    acc = memory.memory_account(model)  # this rank's bytes: its shards under FSDP, the whole model under DDP
    whole, units = D.fsdp_unit_bytes(model)  # bytes of the replicated (embeddings, final norm, head), of each unit
    r = dict(rank=rank, world=world, base_bytes=acc["quantized_bytes"] + acc["constant_bytes"],
             other_frozen_bytes=acc["unquantized_bytes"], lora_bytes=acc["lora_bytes"], replicated_bytes=whole,
             max_unit_bytes=max(units))
    if device.type == "cuda":
        r.update(before_mib=torch.cuda.memory_allocated(device) / 2**20,
                 build_peak_mib=torch.cuda.max_memory_allocated(device) / 2**20)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # ru_maxrss before the reset: the process's peak so far (building included); the reset sets it to the RSS now
        r.update(before_mib=rss_mib("VmRSS"), build_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        reset_rss_peak()
    r["step_s"] = timeit(step, device, reps=1, warmup=1)  # warm-up: the optimizer's states, the heap at its peak
    r["step_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else \
        rss_mib("VmHWM")
    r.update(process_peak_mib=max(r["build_peak_mib"], r["step_peak_mib"]), losses=losses)
    (Path(a.dist_out) / f"{a.dist}-rank{rank}.json").write_text(json.dumps(r))
    D.end_distributed(device)


def bench_fsdp(device, a, out):
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return say(out, f"skipped: needs 2 GPUs (this machine has {torch.cuda.device_count()})")
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        return say(out, "skipped: needs Linux (/proc/self/status and clear_refs: the RSS peak of the step alone)")
    args, res = step_args(a.quick), {}
    B, T = (QUICK_BATCHES if a.quick else STEP_BATCHES)["4x256"]
    with tempfile.TemporaryDirectory() as tmp:
        n_params = save_random_model(tmp, args)
        for mode in DIST_MODES:  # one after the other: each run's 2 ranks get the cores
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(ROOT / "bench.py"), f"--dist={mode}", f"--ckpt={tmp}", f"--dist_out={tmp}", "--threads=1",
                   *["--quick"] * a.quick]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if p.returncode:
                raise RuntimeError(f"fsdp section, {mode}: torchrun failed:\n{(p.stdout + p.stderr)[-3000:]}")
            res[mode] = [json.loads((Path(tmp) / f"{mode}-rank{r}.json").read_text()) for r in range(2)]
            print(f"  {mode}: " + ", ".join(f"rank {r['rank']} peak {r['step_peak_mib']:,.0f} MiB" for r in res[mode]),
                  flush=True)
    cuda, mib = device.type == "cuda", lambda b: f"{b / 2**20:,.1f}"
    base = res["ddp"][0]["base_bytes"]
    what = "allocated" if cuda else "RSS"
    peaks = ("Peak over the steps: torch.cuda.max_memory_allocated after a reset before the warm-up; process peak: "
             "the same since the start." if cuda else "Peak over the steps: VmHWM, reset (/proc/self/clear_refs) just "
             "before the warm-up, so the steps' own peak; it includes what the process holds after building. glibc "
             "returns every freed buffer of 64 KiB or more to the OS at once here (bench.release_freed_memory, not "
             "memory.keep_freed_memory, which keeps them for speed), so RSS follows the live buffers and the step "
             "runs slower than train.py's. Process peak: ru_maxrss, building included (the checkpoint's mapped "
             "pages it read count too).")
    say(out, f"The step section's random LLaMA (dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}: "
        f"{n_params / 1e6:.1f}M parameters, NF4 + DQ, LoRA r=16 on all linears), 2 ranks under torchrun "
        f"({'nccl, bf16' if cuda else 'gloo, fp32, 1 thread each'}), each with its own batch of {B} x {T}. Each rank "
        "runs train.py's own code: build_model (the checkpoint streamed and quantized tensor by tensor; under FSDP "
        "straight into the rank's shards, load_sharded), DDP or shard_model (FSDP2: each block a unit; embeddings, "
        "final norm and head whole on every rank), and its loop's step (chunked loss, clip_grads, PagedAdamW on the "
        f"rank's rows), a warm-up step then a timed one. {peaks}\n")
    table(out, ["mode", "rank", f"peak {what} over the steps MiB", f"process peak {what} MiB",
                f"{what} before the steps MiB", "4-bit base + constants held, bytes",
                "16/32-bit frozen params held MiB",
                "step peak - DDP's, same rank MiB", "loss, steps 1 and 2", "step s"],
          [[mode, f"{r['rank']} of {r['world']}", f"{r['step_peak_mib']:,.0f}", f"{r['process_peak_mib']:,.0f}",
            f"{r['before_mib']:,.0f}", f"{r['base_bytes']:,}", mib(r["other_frozen_bytes"]),
            f"{r['step_peak_mib'] - d['step_peak_mib']:+,.0f}", " / ".join(f"{l:.6f}" for l in r["losses"]),
            sig(r["step_s"])] for mode in DIST_MODES for r, d in zip(res[mode], res["ddp"])])
    saved = [d["step_peak_mib"] - f["step_peak_mib"] for d, f in zip(res["ddp"], res["fsdp"])]
    half = base / 2 / 2**20
    d0 = res["ddp"][0]
    gathered = 2 * d0["max_unit_bytes"]  # memory.memory_plan's "all-gathered, transient" line
    say(out, f"\nDDP's step peak minus FSDP's, ranks 0 and 1: {saved[0]:+,.1f} and {saved[1]:+,.1f} MiB. Half the "
        f"4-bit base's bytes (codes + constants, {base:,} bytes whole): {half:,.1f} MiB; the measured saving is "
        f"{saved[0] - half:+,.1f} and {saved[1] - half:+,.1f} MiB from it: FSDP's per-rank peak is "
        + ("lower by about half the base here (within a quarter of it)." if all(abs(v - half) <= half / 4
                                                                               for v in saved)
           else "NOT lower by about half the base here (off by more than a quarter of it).")
        + f" Besides its half of each block, an FSDP rank holds the embeddings, final norm and head whole, as DDP "
        f"does ({mib(d0['replicated_bytes'])} MiB), and gathers each block whole while it runs (the largest "
        f"{mib(d0['max_unit_bytes'])} MiB) with the next one prefetched: train.py's memory plan counts 2 units, "
        f"{mib(gathered)} MiB, so by its count FSDP's step needs {(gathered - base / 2) / 2**20:+,.1f} MiB against "
        f"DDP's (activations alike), an upper bound: a saving of the whole half means the step's peak comes while no "
        f"block is gathered (the loss, whose head every rank holds whole).")
    same = all(math.isclose(l1, l2, rel_tol=1e-4) for d, f in zip(res["ddp"], res["fsdp"])
               for l1, l2 in zip(d["losses"], f["losses"]))
    say(out, "The two modes train the same: the losses of both steps " + ("agree (within 1e-4 relative)." if same else
                                                                          "DIFFER (more than 1e-4 relative)."))

# -----------------------------------------------------------------------------
# the default run on a busy CPU

WAITS = {"spin ~3 ms, then sleep (libgomp's default; before)": dict(GOMP_SPINCOUNT="300000"),
         "sleep at once (PASSIVE: the entry scripts' on a busy CPU)": dict(OMP_WAIT_POLICY="PASSIVE")}


LOADS = (("none", 0, 0), ("2, not niced", 2, 0), ("2, niced (nice 10)", 2, 10))  # label, spinners, their nice


def bench_busy(device, a, out):
    """torch's OpenMP threads spin at every barrier (libgomp: 300,000 spins, ~3 ms) before they sleep. On a core that
    another process also wants, a spinning thread burns the time slice its partner needs to reach the barrier. The
    entry scripts set OMP_WAIT_POLICY=PASSIVE when the load average is above 0.5 as they start, else nothing."""
    if device.type != "cpu":
        return say(out, "skipped: a CPU section (on CUDA the OpenMP threads wait on the GPU, not on each other)")
    steps = 20 if a.quick else 600
    rows = []
    for label, n, nice in LOADS:
        spin = ["nice", "-n", str(nice), sys.executable, "-c", "while True: pass"]
        busy = [subprocess.Popen(spin) for _ in range(n)]
        try:
            for name, wait in WAITS.items():
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.perf_counter()
                    cmd = [sys.executable, "train.py", f"--max_steps={steps}", f"--out_dir={tmp}/out"]
                    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
                    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(env, **wait))
                    if p.returncode:
                        raise RuntimeError(f"busy section: train.py failed:\n{p.stderr[-3000:]}")
                    rows.append((label, name, time.perf_counter() - t))
                    print(f"  busy: {label}, {name}: {rows[-1][2]:.0f} s", flush=True)
        finally:
            for b in busy:
                b.kill()
    idle = {name: t for label, name, t in rows if label == "none"}
    say(out, f"`python train.py --max_steps={steps}` (the default run, held-out answers included) on {os.cpu_count()} "
        "cores, alone and beside two processes that each spin a core (`while True: pass`), at the same priority and "
        "niced (as a desktop's or a CI runner's background jobs often are), each wait policy once (loaded runs vary "
        "from run to run: repeat before trusting one figure). The thread count stays the same either way: it changes "
        "the low bits of the losses, and runs must repeat bit for bit.\n")
    table(out, ["busy processes", "OpenMP threads at a barrier", "wall s", "/ idle"],
          [[label, name, f"{t:.0f}", f"{t / idle[name]:.2f}x"] for label, name, t in rows])
    first = rows[0][2]  # idle as the entry scripts run it: nothing set
    ratios = {label: (before / first, after / first) for label, _, _ in LOADS[1:]
              for before, after in [[t for lab, _, t in rows if lab == label]]}
    say(out, "\nAs the entry scripts run it (nothing set when idle, PASSIVE when busy), against the idle run: " +
        "; ".join(f"beside {label} busy processes {after:.2f}x (before: {before:.2f}x)"
                  for label, (before, after) in ratios.items()) +
        ". Two busy processes at the same priority take half of 2 cores: 2x is the fair share there.")


# -----------------------------------------------------------------------------
# 2c. packing: what padding costs, and what packed rows with a document mask win back


def packing_cases(tmp, device, dtype):
    """(name, train split, max_seq_len, a fresh model) for the default run's data on its bundled base (NF4 + DQ,
    LoRA r=32, as the default run), and for real OASST1 conversations (../shared/assets/oasst1, 100 English
    trees) with LLaMA-2's tokenizer at the paper's 512 tokens, on a random tiny base of LLaMA-2's vocabulary."""
    lora = dict(r=32, alpha=32.0, dropout=0.0, compute_dtype=dtype)
    tok = ROOT / "data" / "sample" / "tokenizer.model"
    sample = lambda: C.load_quantized(ROOT / "data" / "sample" / "base", device=device, dtype=dtype, **lora)
    cases = [("data/sample (the default run's)", load_split(data_folder("sample", tok), "train"), 256, sample)]
    trees, llama = ASSETS / "oasst1" / "en_100_tree.jsonl", ASSETS / "llama2_tokenizer" / "tokenizer.model"
    if trees.exists() and llama.exists():
        from data.oasst1.prepare import prepare
        prepare(input_path=trees, tokenizer_path=llama, out_dir=Path(tmp) / "oasst1", verbose=False)

        def tiny():
            torch.manual_seed(0)
            model = M.Transformer(M.get_args("tiny", vocab_size=32000, max_seq_len=512))
            return Q.add_lora(model.to(device=device, dtype=dtype), **lora)
        cases.append(("OASST1, 100 real trees, LLaMA-2 tokens", load_split(Path(tmp) / "oasst1", "train"), 512, tiny))
    return cases


def padding(x, docs, pad_id):
    """Positions of packed rows that hold no conversation: each row's last document, when it starts with
    pad_id (a conversation starts with BOS)."""
    last = docs == docs[:, -1:]
    first = last.float().argmax(dim=1)  # where each row's last document starts
    is_pad = x[torch.arange(len(x)), first] == pad_id
    return int((last & is_pad[:, None]).sum())


def bench_packing(device, a, out):
    """Trained tokens per second of train.py's step (the chunked loss, paged AdamW) over the same conversations
    batched three ways: a random order padded to each batch's longest (train.py's default), grouped by length
    (the paper's), and packed rows with a document mask (--packing=true); the same rows a micro-batch."""
    rows, steps = 8, 2 if a.quick else 10
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        cases = packing_cases(tmp, device, dtype)
        if len(cases) < 2:
            say(out, f"skipped OASST1: {ASSETS / 'oasst1'} or {ASSETS / 'llama2_tokenizer'} not present")
        results = []
        for name, ds, seq, make_model in cases:
            perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
            modes = {"padded, random order": [perm[i:i + rows] for i in range(0, len(perm), rows)],
                     "grouped by length": length_grouped_batches(ds, rows, 0, 0)}
            batches = {m: [(*collate([ds[i] for i in b], ds.pad_id, seq), None) for b in order]
                       for m, order in modes.items()}
            real = {m: [sum(min(int(ds.lengths[i]) - 1, x.shape[1]) for i in b) for b, (x, _, _) in
                        zip(order, batches[m])] for m, order in modes.items()}  # inputs that are no padding
            batches["packed, document mask"] = packed_batches(ds, rows, seq, 0, 0)
            real["packed, document mask"] = [x.numel() - padding(x, docs, ds.pad_id)
                                             for x, _, docs in batches["packed, document mask"]]
            stats = packing_stats(ds, seq, batches["packed, document mask"])
            for mode, bs in batches.items():
                bs = bs[:steps + 1]  # one warm-up step, then the timed ones
                model = make_model()
                params = [p for p in model.parameters() if p.requires_grad]
                opt = PagedAdamW(params, lr=2e-3, weight_decay=0.0)
                it = iter(bs)

                def step():
                    x, y, docs = next(it)
                    loss = model(x.to(device), targets=y.to(device), docs=None if docs is None else docs.to(device))
                    (loss / max(int((y != IGNORE).sum()), 1)).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                times = timeit(step, device, reps=len(bs) - 1, median=False)
                trained = sum(int((y != IGNORE).sum()) for _, y, _ in bs[1:])
                total, real_in = sum(x.numel() for x, _, _ in bs[1:]), sum(real[mode][1:len(bs)])
                results.append([name, mode, sig(trained / sum(times)), f"{1 - real_in / total:.0%}",
                                f"{sum(x.shape[1] for x, _, _ in bs[1:]) / len(bs[1:]):.0f}"])
                print(f"  {name}, {mode}: {results[-1][2]} trained tokens/s", flush=True)
            say(out, f"{name}: {stats['conversations']} conversations, {stats['tokens_cut']:,} tokens beyond "
                f"max_seq_len {seq} cut (as unpacked training cuts them); packed rows: {stats['padding']:.0%} padding "
                "over the epoch")
    say(out, f"\n{steps} steps of {rows} rows each (after one warm-up step) on {device}. Trained tokens: targets in "
        "the loss. Padding: row positions that hold no conversation, in the timed steps.\n")
    table(out, ["data", "batches", "trained tokens/s", "padding", "mean row length"], results)


def bench_tokenize(device, a, out):
    """Encoding throughput, message by message as data/oasst1/prepare.py encodes: our byte-level BPE (tokenizer.py)
    on Meta's Llama 3 file with its piece cache empty (cold) and filled by one pass (warm), tiktoken on the same
    file, sentencepiece on LLaMA 2's; then prepare.py's whole run on the 100 trees with each tokenizer."""
    files = dict(llama3=ASSETS / "llama3_tokenizer" / "tokenizer.model",
                 llama2=ASSETS / "llama2_tokenizer" / "tokenizer.model", trees=ASSETS / "oasst1" / "en_100_tree.jsonl")
    if missing := [str(p) for p in files.values() if not p.exists()]:
        return say(out, f"skipped: {', '.join(missing)} not present")
    msgs = oasst_messages()[:100 if a.quick else None]
    mb = sum(len(m.encode()) for m in msgs) / 1e6

    def rate(encode, reps=1):  # MB/s of the fastest of reps passes
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            for m in msgs:
                encode(m)
            best = min(best, time.perf_counter() - t0)
        return sig(mb / best)
    ours, sp = Tokenizer(files["llama3"]), Tokenizer(files["llama2"])
    rows = [["ours (tokenizer.py), cold", "Llama 3's tokenizer.model", rate(ours.encode)],
            ["ours (tokenizer.py), warm", "Llama 3's tokenizer.model", rate(ours.encode, 3)]]
    if (tiktoken := peer("tiktoken", out)) is not None:
        from tiktoken.load import load_tiktoken_bpe
        ref = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(
            files["llama3"])), special_tokens={s: len(ours.bpe.ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)})
        same = all(ref.encode_ordinary(m) == ours.encode(m) for m in msgs)
        rows.append(["tiktoken " + installed("tiktoken") + (" (same ids)" if same else " (OTHER IDS)"),
                     "Llama 3's tokenizer.model", rate(ref.encode_ordinary, 3)])
    rows.append(["sentencepiece " + installed("sentencepiece"), "LLaMA 2's tokenizer.model", rate(sp.encode, 3)])
    say(out, f"{len(msgs)} OASST1 messages, {mb:.2f} MB of UTF-8, encoded one by one on this CPU (one thread):\n")
    table(out, ["encoder", "file", "MB/s"], rows)
    from data.oasst1.prepare import prepare
    prep = []
    for name in ("llama2", "llama3"):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            meta = prepare(input_path=files["trees"], tokenizer_path=files[name], out_dir=tmp, verbose=False)
            prep.append([files[name].parent.name, f"{time.perf_counter() - t0:.2f}",
                         f"{meta['splits']['train']['tokens'] + meta['splits']['val']['tokens']:,}"])
    say(out, "\ndata/oasst1/prepare.py on the 100 trees (read, pick the best path, tokenize, write):\n")
    table(out, ["tokenizer", "seconds", "tokens"], prep)


# -----------------------------------------------------------------------------
# 3. memory at scale (CUDA only): LLaMA-7B and 65B shapes with random weights


# the memory savings the scale section toggles on one model, as train.py's flags turn them on: label, 8-bit paged
# AdamW (--optimizer=paged_adamw_8bit), chunked loss (--chunked_loss), offloaded activation checkpoints
# (--offload_activations); gradient checkpointing (the paper's) is on in every row
SAVINGS = (("none", False, False, False), ("8-bit paged AdamW", True, False, False),
           ("chunked loss", False, True, False), ("offloaded activations", False, False, True),
           ("all three", True, True, True))


class PointerAttributes(ctypes.Structure):  # cudaPointerAttributes: `type` first in every CUDA version, and room
    _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int), ("device_pointer", ctypes.c_void_p),
                ("host_pointer", ctypes.c_void_p), ("reserved", ctypes.c_byte * 256)]  # for fields newer ones add


def managed_bytes(tensors):
    """Bytes of those tensors whose memory the CUDA runtime reports as managed (cudaMemoryTypeManaged = 3): the
    paged optimizer states, which torch.cuda's memory stats do not see. CPU tensors count 0."""
    n = 0
    for t in tensors:
        if not (torch.is_tensor(t) and t.is_cuda):
            continue
        attr = PointerAttributes()
        if err := cudart().lib.cudaPointerGetAttributes(ctypes.byref(attr), ctypes.c_void_p(t.data_ptr())):
            raise RuntimeError(f"cudaPointerGetAttributes: CUDA error {err}")
        n += t.nbytes if attr.type == 3 else 0
    return n


def random_4bit_model(preset, device, n_layers=None, dtype=torch.bfloat16, seq=512):
    """A `preset`-shaped LLaMA with random weights, each linear drawn and quantized on `device` one at a time (a 65B
    model in bf16 would not fit on the GPU); LoRA r=64 on every linear, adapters in `dtype` (the paper: bf16)."""
    args = M.get_args(preset, max_seq_len=seq, **({"n_layers": n_layers} if n_layers else {}))
    with torch.device("meta"):
        model = M.Transformer(args).to(dtype)
    Q.add_lora(model, r=64, alpha=16, dropout=0.0, compute_dtype=dtype)
    for m in Q.linears_4bit(model).values():
        m.fill(torch.randn(m.out_features, m.in_features, device=device, dtype=dtype) * 0.02)
        m.set_lora(m.r, m.alpha, 0.0, device=device, dtype=dtype)
    dense = [model.model.embed_tokens, model.lm_head, model.model.norm] + \
        [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    for mod in dense:
        mod.to_empty(device=device)
        torch.nn.init.normal_(mod.weight, std=0.02) if mod.weight.dim() == 2 else torch.nn.init.ones_(mod.weight)
    model.init_rope(device)
    model.grad_checkpoint = True
    return model


def scale_rows(preset, batches, device, n_layers=None, dtype=torch.bfloat16, seq=512, savings=SAVINGS):
    """A random 4-bit `preset` model, built once; for each batch size and each setting of the savings, from the same
    LoRA weights and with fresh optimizer states: a warm-up step, then one timed step. One dict per configuration:
    its peaks over the timed step, its managed optimizer states, tokens/s and the loss of both steps."""
    model, rows, cuda = random_4bit_model(preset, device, n_layers, dtype, seq), [], device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().to("cpu", copy=True) for p in params]  # host copies: outside the GPU's peaks
    for B, (label, eight_bit, chunked, offload) in itertools.product(batches, savings):
        with torch.no_grad():
            for p, p0 in zip(params, init):
                p.copy_(p0)
        model.chunked_loss, model.offload_activations = chunked, offload  # as train.py's build_model sets them
        ids = torch.randint(0, model.args.vocab_size, (B, seq + 1), generator=torch.Generator().manual_seed(B))
        x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)  # the same batch for every setting
        if cuda:  # the optimizer's managed states never oversubscribe the GPU (paged_adamw checks each one too)
            need, free = sum(state_bytes(p.numel(), 8 if eight_bit else 32) for p in params), \
                torch.cuda.mem_get_info(device)[0]
            if need > free:
                raise RuntimeError(f"scale {preset}, {label}: the optimizer states need {need / 2**30:.1f} GiB, the "
                                   f"GPU has {free / 2**30:.1f} GiB free")
        opt = (PagedAdamW8bit if eight_bit else PagedAdamW)(params, lr=2e-4, weight_decay=0.0)  # train.py's defaults
        losses = []

        def step():  # the mean loss over all tokens; full: the (B*T, vocab) logits, as train.py --chunked_loss=false
            loss = model(x, targets=y) / y.numel()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        step()  # warm-up: Triton autotuning, the optimizer's states
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t = timeit(step, device, reps=1, warmup=0)
        r = dict(model=preset if n_layers is None else f"{preset} ({n_layers} layers)", batch=f"{B} x {seq}",
                 savings=label, tokens_s=B * seq / t, losses=losses,
                 managed_gib=managed_bytes(s for st in opt.state.values() for s in st.values()) / 2**30)
        if cuda:
            r.update(alloc_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                     reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
        rows.append(r)
        print(" ", json.dumps(r), flush=True)  # as measured: a run cut short still shows what it got
        del opt, step
        gc.collect()  # the states (managed ones freed by their owner's __del__) before the next setting's
        if cuda:
            torch.cuda.empty_cache()
    return rows


def scale_plan(device, quick):
    """(preset, layers or None for all, batch sizes): the paper's shapes on CUDA; --quick: 2 layers of them, or on
    CPU the tiny preset (a smoke test of the loop: no memory columns, offloading a no-op there)."""
    if not quick:
        return [("7b", None, (1, 16)), ("65b", None, (1,))]
    return [("7b", 2, (1, 2)), ("65b", 2, (1,))] if device.type == "cuda" else [("tiny", None, (1, 2))]


def bench_scale(device, a, out):
    cuda = device.type == "cuda"
    if not (cuda or a.quick):
        return say(out, "skipped: needs CUDA (--quick runs the loop on CPU with the tiny preset: a smoke test)")
    (dtype, seq), rows = ((torch.bfloat16, 512) if cuda else (torch.float32, 64)), []
    for preset, n_layers, batches in scale_plan(device, a.quick):
        rows += scale_rows(preset, batches, device, n_layers, dtype, seq)
        gc.collect()  # the model and its states are gone with scale_rows' frame: free them before the next one
        if cuda:
            torch.cuda.empty_cache()
    dt = str(dtype).removeprefix("torch.")
    say(out, f"Random weights, NF4 + DQ quantized on the {'GPU' if cuda else 'CPU'}; LoRA r=64 ({dt}) on all linears; "
        f"{dt} compute; gradient checkpointing in every row. Each model is built once; for each batch the savings "
        "are set on it as train.py's flags set them, each setting from the same LoRA weights with fresh states: a "
        "warm-up step, then one timed step (the peaks are its own). Managed: the optimizer states in CUDA "
        "managed memory (paged), summed from the state tensors the CUDA runtime reports as managed; torch's "
        "allocated does not count them." + ("" if cuda else " CPU smoke run: no memory columns, and offloading is "
                                            "CUDA only (a no-op here).") + "\n")
    mem = (lambda r: [sig(r["alloc_gib"]), sig(r["reserved_gib"]), sig(r["managed_gib"]),
                      sig(r["alloc_gib"] + r["managed_gib"])]) if cuda else lambda r: ["-", "-", sig(r["managed_gib"]),
                                                                                        "-"]
    table(out, ["model", "batch", "savings on", "peak allocated GiB", "peak reserved GiB",
                "managed optimizer states GiB", "allocated + managed GiB", "tokens/s", "loss, steps 1 / 2"],
          [[r["model"], r["batch"], r["savings"], *mem(r), sig(r["tokens_s"]), " / ".join(f"{l:.5f}" for l in
                                                                                        r["losses"])] for r in rows])
    for (m, b), group in itertools.groupby(rows, key=lambda r: (r["model"], r["batch"])):
        group = list(group)
        base, on = group[0], group[-1]
        diff = max(abs(r["losses"][0] / base["losses"][0] - 1) for r in group)
        say(out, f"\n{m}, {b}: step 1's loss, the same weights and batch in every setting, agrees within {diff:.1e} "
            "relative (the savings are exact; the 8-bit states change only step 2)." + (
                f" All three savings: {sig(base['alloc_gib'] + base['managed_gib'])} -> "
                f"{sig(on['alloc_gib'] + on['managed_gib'])} GiB allocated + managed, "
                f"{on['tokens_s'] / base['tokens_s']:.2f}x the tokens/s." if cuda else ""))
    if cuda and not a.quick:
        say(out, "\nThe paper: a 65B model fine-tunes in under 48 GB (here: allocated + managed).")

# -----------------------------------------------------------------------------
# reproduction: Table 2 at small scale, and QLoRA against 16-bit LoRA


def oasst_messages():
    """The text of every message of the OASST1 sample's 100 trees, depth first."""
    msgs, stack = [], [json.loads(line)["prompt"] for line in (ASSETS / "oasst1" / "en_100_tree.jsonl").open()]
    while stack:
        msgs.append(stack[0]["text"])
        stack[:1] = stack[0].get("replies", [])
    return msgs


def heldout_texts(model_dir, n_tokens):
    """{name: token ids}: real OASST1 messages (text a small story model never saw), and where the model folder has
    one, its own greedy story (in its domain, but written by the fp32 model, so biased toward it)."""
    tok, msgs = Tokenizer(find_tokenizer(model_dir)), oasst_messages()
    texts = {"OASST1 messages": [i for t in msgs for i in tok.encode(t, bos=tok.add_bos)][:n_tokens]}
    if (ref := Path(model_dir) / "greedy_reference.json").exists():
        texts["its greedy story"] = tok.encode(json.loads(ref.read_text())["greedy_text"], bos=tok.add_bos)
    return texts


@torch.no_grad()
def perplexity(model, ids, device, ctx=256):
    """exp(mean next-token loss) over the text cut into windows of ctx tokens."""
    ctx = min(ctx, len(ids))
    x = torch.tensor(ids[:len(ids) // ctx * ctx], device=device).view(-1, ctx)
    nll = sum(F.cross_entropy(model(b[:, :-1]).flatten(0, 1).float(), b[:, 1:].flatten(), reduction="sum").item()
              for b in x.split(16))
    return math.exp(nll / (x.size(0) * (ctx - 1)))


def table2(d, device, a, out):
    variants = (("32-bit", None, False, "-"), ("Int4", "int4", False, "34.34"), ("FP4 (E2M1)", "fp4", False, "31.07"),
                ("NF4", "nf4", False, "-"), ("NF4 + DQ", "nf4", True, "27.41"))
    texts, rows = heldout_texts(d, 2048 if a.quick else 32768), []
    for name, qt, dq, paper in variants:
        m = C.load_model(d, device) if qt is None else C.load_quantized(
            d, device, quant_type=qt, double_quant=dq, blocksize=64, r=0, compute_dtype=torch.float32)
        rows.append([name, *[f"{perplexity(m.eval(), ids, device):.3f}" for ids in texts.values()], paper])
    say(out, f"{d.name}: {', '.join(f'{k} ({len(v):,} tokens)' for k, v in texts.items())}. The paper's column: its "
        "mean over OPT, BLOOM, LLaMA and Pythia, 125M to 13B parameters, on Pile Common Crawl.\n")
    table(out, ["weights", *[f"perplexity, {k}" for k in texts], "paper (Table 2)"], rows)
    for i, k in enumerate(texts):
        ppl = {r[0]: float(r[1 + i]) for r in rows}
        agree = ppl["Int4"] > ppl["FP4 (E2M1)"] > ppl["NF4 + DQ"]
        say(out, f"\n{k}: " + " > ".join(f"{n} {v:.3f}" for n, v in sorted(ppl.items(), key=lambda kv: -kv[1]))
            + ". The paper's ordering, Int4 > FP4 > NF4 + DQ, " + ("holds." if agree else "does NOT hold here."))


def train_pair(jobs, common):
    """train.py runs side by side, one core each: {name: (final val loss, exact match before, after)}."""
    procs = {k: subprocess.Popen([sys.executable, "train.py", *flags, *common, "--ckpt_interval=0", "--log_interval=50",
                                  "--eval_interval=100", "--seed=1337"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for k, flags in jobs.items()}
    res = {}
    for k, p in procs.items():
        log = p.communicate()[0]
        acc = re.search(r"held-out answers: (\d+)% before -> (\d+)% after", log)
        if p.returncode or not acc:
            raise RuntimeError(f"train.py {' '.join(jobs[k])} failed:\n{log[-3000:]}")
        res[k] = (float(re.findall(r"val loss ([\d.]+)", log)[-1]), *acc.groups())
    return res


def bench_paper(device, a, out):
    say(out, "### Table 2 at small scale: perplexity by 4-bit data type, block size 64\n")
    for d in model_dirs(a):  # --models' folders were checked by check_flags; the default one may be absent
        if not (ASSETS / "oasst1" / "en_100_tree.jsonl").exists():
            say(out, f"skipped: {ASSETS / 'oasst1' / 'en_100_tree.jsonl'} not present (the held-out text)")
        elif (d / "config.json").exists() and any((d / f).exists() for f in ("tokenizer.model", "tokenizer.json")):
            table2(d, device, a, out)
        else:
            say(out, f"skipped: {d} not present (a Hugging Face model folder with its tokenizer)")
    say(out, "\nMore models (larger, Hugging Face format with their tokenizer): --models=DIR,DIR.")
    steps, batch = (4, 8) if a.quick else (300, 32)
    common = ["--eval_answers=2"] * a.quick
    short = [f"--max_steps={steps}", f"--batch_size={batch}"]  # the bundled base's row: the default run's own
    say(out, f"\n### QLoRA against 16-bit LoRA: the same fine-tune, data and seed (train.py: {steps} steps of batch "
        f"{batch}; on the bundled pretrained base the default run's own steps and batch"
        f"{' (--quick: ' + str(steps) + ' of ' + str(batch) + ')' if a.quick else ''}; train.py's lr and LoRA r "
        "on all linears)\n")
    rows, stories = [], ASSETS / "stories260K"
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("data/sample, tiny preset, random frozen base", ["--init_from=random", *short])]
        base16 = ROOT / "out" / "base16"  # the bundled pretrained base's fp32 weights: quantized on load for QLoRA
        if (base16 / "config.json").exists():
            runs.append(("data/sample, the bundled pretrained base (data/sample/pretrain.py)",
                         [f"--init_from={base16}", *(short if a.quick else [])]))
        else:
            say(out, f"skipped: {base16} not present (python data/sample/pretrain.py --out_dir=out/base-nf4 "
                "--out16=out/base16 writes it): no run on the bundled pretrained base")
        if stories.exists():  # the sample's conversations tokenized for stories260K, prepared by data/oasst1
            from data.oasst1.prepare import prepare
            prepare(input_path=ROOT / "data" / "sample" / "sample.trees.jsonl", out_dir=Path(tmp) / "data",
                    tokenizer_path=stories / "tokenizer.model", verbose=False)
            runs.append(("data/sample, stories260K base (pretrained)",
                         [f"--init_from={stories}", f"--data={tmp}/data", *short]))
        else:
            say(out, f"skipped: {stories} not present: no run on a pretrained base")
        for name, flags in runs:
            res = train_pair({q: [*flags, f"--quant_type={q}", f"--out_dir={tmp}/{q}"] for q in ("nf4", "none")},
                             common)
            rows += [[name, base, f"{res[q][0]:.4f}", f"{res[q][1]}% -> {res[q][2]}%"]
                     for q, base in (("nf4", "NF4 + DQ (QLoRA)"), ("none", "unquantized (LoRA)"))]
    table(out, ["fine-tune", "frozen base", "final val loss", "held-out exact match, before -> after"], rows)
    say(out, "\nThe unquantized base is in train.py's compute dtype (fp32 on CPU, bf16 on CUDA). The paper (sec. 4, "
        "Table 3, Fig. 3): 4-bit QLoRA with NF4 + DQ matches 16-bit LoRA.")

# -----------------------------------------------------------------------------
# the Triton kernels compiled for GPUs, on any machine


def bench_compile(device, a, out):
    """bench/compile.py in its own process (compiled mode, never the interpreter; fresh Triton caches): every
    specialization (--quick: the CI subset) for sm_80 and sm_90, its lines printed as they come, its summary kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "compile.py"), *["--quick"] * a.quick], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    if p.wait() not in (0, 1) or not any(l.startswith("| target") for l in lines):  # 1: it found problems
        raise RuntimeError(f"bench/compile.py failed (exit {p.returncode}):\n" + "\n".join(lines[-30:]))
    first = next(i for i, l in enumerate(lines) if l.startswith("| target"))
    say(out, f"`python bench/compile.py{' --quick' * a.quick}`: {lines[0]}. Registers per thread (ptxas), bytes "
        "spilled to local memory, dynamic shared memory per block (limits: 163 KiB on sm_80, 227 KiB on sm_90).\n")
    for line in lines[first:]:
        say(out, line)

# -----------------------------------------------------------------------------


class BenchError(ValueError):
    """A user's mistake (a flag, a missing or unreadable file): one line at the CLI, `error: ...`."""


@dataclass
class Config:
    section: str = ""              # run only this section (one of those above); "" = all but busy and compile
    paper: bool = False            # the reproductions only: the same as --section=paper
    quick: bool = False            # tiny shapes and runs: checks that it works, in seconds
    out: str = str(ROOT / "bench" / "RESULTS.md")  # the results file
    threads: int = 0               # torch threads on CPU (0: the idle cores)
    models: str = ""               # comma-separated HF model folders, perplexity table; "" = stories260K if present
    # internal: one configuration of the step section, run in a child process for its own peak memory
    impl: str = ""                 # ours | peer; "" = none (not a child)
    quant: str = "nf4"             # nf4 | none: the frozen base
    dtype: str = "float32"         # float32 | bfloat16: weights and compute
    optimizer: str = "adamw"       # adamw | paged | paged8
    loss: str = "full"             # full | chunked
    batch: str = "4x256"           # 4x256 | 16x512
    ckpt: str = ""                 # the random model's folder (also --dist's); "" = none
    steps: int = 5                 # timed steps
    profile: bool = False          # profile one more step: its top operators by self time
    # internal: one rank of the fsdp section, under torchrun
    dist: str = ""                 # ddp | fsdp; "" = none (not a rank)
    dist_out: str = ""             # the folder each rank writes its figures into; "" = none


CHOICES = dict(quant=("nf4", "none"), dtype=("float32", "bfloat16"), optimizer=("adamw", "paged", "paged8"),
               loss=("full", "chunked"), batch=tuple(STEP_BATCHES))
OPTIONAL_CHOICES = dict(section=SECTIONS, impl=("ours", "peer"), dist=DIST_MODES)  # "": unset


def parse_config(argv):
    """Config from --key=value flags, each of its field's type and among its choices (a ConfigError)."""
    cfg = Config(**configurator.parse_flags(Config, argv, __doc__))
    configurator.check_choices(cfg, CHOICES)
    configurator.check_choices(cfg, {k: v for k, v in OPTIONAL_CHOICES.items() if getattr(cfg, k)})
    return cfg


def model_dirs(a):
    """The paper section's model folders: --models', or stories260K beside the repo by default."""
    return [Path(m) for m in (a.models or str(ASSETS / "stories260K")).split(",") if m]


def check_flags(a, names):
    """Refuse, before the sections run for minutes, what would stop them halfway or at the end (the results file)."""
    if not 0 <= a.threads <= os.cpu_count():
        raise BenchError(f"--threads must be from 0 (the idle cores) to {os.cpu_count()} (this machine's cores), "
                         f"not {a.threads}")
    if a.steps < 1:
        raise BenchError(f"--steps must be at least 1, not {a.steps}")
    if a.paper and a.section:
        raise BenchError(f"--paper is --section=paper: give one of --paper and --section={a.section}")
    if (a.impl or a.dist) and not a.ckpt:  # the internal modes of the step and fsdp sections
        raise BenchError(f"--{'impl' if a.impl else 'dist'} (internal to the step and fsdp sections) needs --ckpt=DIR")
    if a.dist and not (a.dist_out and "WORLD_SIZE" in os.environ):
        raise BenchError("--dist (internal to the fsdp section) runs as one rank under torchrun, with --dist_out=DIR")
    if a.impl or a.dist:
        C.load_args(a.ckpt)  # a CheckpointError naming the folder's missing or bad config
        return
    out = Path(a.out)
    if out.is_dir():
        raise BenchError(f"--out={out}: a directory, not the results file (e.g. bench/RESULTS.md)")
    if not (up := next(p for p in out.parents if p.exists())).is_dir():  # what write_section's mkdir builds on
        raise BenchError(f"--out={out}: {up} is a file, not a directory")
    if out.exists():  # write_section reads it to keep the other sections
        try:
            out.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BenchError(f"--out={out}: cannot read the results file ({e})") from None
    if a.models and "paper" in names:  # folders asked for by name must be there and load
        if not model_dirs(a):
            raise BenchError(f"--models={a.models}: names no folder")
        for d in model_dirs(a):
            if not (d / "config.json").is_file():
                raise BenchError(f"--models: {d} is not a Hugging Face model folder (no config.json)")
            tok = Tokenizer(find_tokenizer(d))  # a TokenizerError naming a missing or broken tokenizer
            if tok.vocab_size > (rows := C.load_args(d).vocab_size):
                raise BenchError(f"{tok.path}: {tok.vocab_size} token ids, the model in {d} has only {rows}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        a = parse_config(argv)
        names = [a.section] if a.section else ["paper"] if a.paper else DEFAULT_SECTIONS
        check_flags(a, names)
        a.threads = a.threads or default_threads()
        if a.impl:
            return step_child(a, device)
        if a.dist:
            return dist_child(a, device)
        torch.set_num_threads(a.threads)
        run = dict(quant=bench_quant, dequant=bench_dequant, step=bench_step, fsdp=bench_fsdp, scale=bench_scale,
                   paper=bench_paper, busy=bench_busy, compile=bench_compile,
                   packing=bench_packing, tokenize=bench_tokenize)
        for name in names:
            print(f"\n== {TITLES[name]}", flush=True)
            out, t0 = [], time.time()
            head = header(device)
            run[name](device, a, out)
            try:
                write_section(Path(a.out), name, f"{head} · section took {time.time() - t0:.0f} s", out)
            except OSError as e:  # a full disk, a folder made read-only meanwhile: the figures are printed above
                raise BenchError(f"--out={Path(a.out)}: cannot write the results file ({e.strerror or e})") from None
    except (configurator.ConfigError, BenchError, C.CheckpointError, TokenizerError) as e:  # bad input; anything else is a bug and
        sys.exit(f"error: {e}")                                               # keeps its traceback
    print(f"\nwritten: {Path(a.out)}")


if __name__ == "__main__":
    main()
