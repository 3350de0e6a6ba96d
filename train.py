"""
QLoRA fine-tuning: a frozen 4-bit (NF4 + double quantization) LLaMA, LoRA adapters on every linear layer, paged
AdamW, one plain loop. Dettmers et al. 2023, arXiv 2305.14314; the loop follows nanoGPT's train.py.

  python train.py                                                   # CPU demo: tiny model on data/sample
  python train.py --model=7b --init_from=/path/to/llama-7b --data=oasst1   # the paper's Guanaco-7B recipe
  python train.py --model=65b --estimate                            # memory plan only, no weights needed
  torchrun --nproc_per_node=2 train.py ...                          # data parallel over the LoRA weights
  torchrun --nproc_per_node=4 train.py --model=llama2-70b ... --fsdp=true   # the 4-bit base sharded over 4 GPUs
"""
import ctypes
import errno
import json
import math
import os
import pickle
import re
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:  # before torch loads OpenMP: README, "A busy CPU"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M
import qlora as Q
from data.batching import (IGNORE, collate, length_grouped_batches, load_meta, load_split, packed_batches,
                           prepare_dir, prepared_dir)
from data.oasst1.prepare import DataError, file_sha256
from paged_adamw import PagedAdamW, PagedAdamW8bit, state_bytes

ROOT = Path(__file__).resolve().parent


@dataclass
class Config:
    # what to train (defaults: the CPU demo; LLaMA presets take the paper's recipe from RECIPE below)
    model: str = "tiny"            # preset in model.PRESETS
    init_from: str = ""            # weights dir: HF, Meta or bitsandbytes-4bit; "" = for tiny, data/sample/base (the
                                   # bundled pretrained NF4 base, data/sample/pretrain.py); random: a random frozen one
    data: str = "sample"           # a folder under data/ with a prepare.py; prepared on first use
    out_dir: str = "out"           # checkpoints, the final adapter, the 4-bit base of a random-init run
    # the frozen base
    quant_type: str = "nf4"        # nf4 | fp4 | int4 | none (plain 16-bit LoRA, for comparison)
    double_quant: bool = True      # also quantize the absmax constants (8-bit, blocks of 256)
    blocksize: int = 64            # elements per absmax
    compute_dtype: str = "auto"    # auto: bfloat16 on CUDA, float32 on CPU
    # LoRA
    lora_r: int = 32
    lora_alpha: float = 32.0       # scale = alpha / r
    lora_dropout: float = 0.0
    lora_dtype: str = "auto"       # auto: the compute dtype (16-bit adapters on CUDA, as the paper) | float32
    target_modules: str = "all"    # all linear layers of the blocks (the paper), or e.g. "q_proj,v_proj"
    # optimization
    max_steps: int = 600
    batch_size: int = 64           # sequences per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step (per process)
    lr: float = 2e-3
    schedule: str = "constant"     # constant (the paper) | cosine, both after a linear warmup
    warmup_ratio: float = 0.03
    optimizer: str = "paged_adamw"  # paged_adamw | paged_adamw_8bit (8-bit moments, a quarter of the memory) | adamw
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 0.3
    # data
    max_seq_len: int = 256         # longer conversations are truncated
    train_on: str = "assistant"    # assistant: replies + EOS in the loss | all: the whole conversation
    group_by_length: bool = False  # batches of similar length (the paper's, on for the presets); the demo's
                                   # tasks differ in length, so grouping would make one-task batches
    packing: bool = False          # concatenate conversations into full rows instead of padding
    grad_checkpoint: bool = False  # recompute each block in backward to save activation memory
    offload_activations: bool = False  # with grad_checkpoint on CUDA: block inputs wait in pinned host memory
    chunked_loss: bool = True      # the head + loss a chunk of tokens at a time: the full logits never exist
    # bookkeeping
    eval_interval: int = 100       # steps between validation losses (fixed batches)
    eval_batches: int = 4
    log_interval: int = 10
    ckpt_interval: int = 100       # steps between checkpoints (0: only at the end)
    keep_ckpts: int = 3
    resume: str = ""               # true: go on from the newest intact checkpoint in out_dir; or a checkpoint folder
                                   # of out_dir to go back to (its newer checkpoints are set aside, not deleted)
    overwrite: bool = False        # start afresh in an out_dir that holds a run: deletes that run's files only
    eval_answers: int = 100        # held-out prompts per task answered before and after (exact match); 0 = skip
    seed: int = 1337
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    deterministic: bool = False    # CUDA runs repeat bit for bit (resume included), a little slower; CPU always does
    estimate: bool = False         # print the memory plan and exit, without loading weights
    fsdp: bool = False             # under torchrun: shard the 4-bit base, LoRA, gradients and AdamW states (FSDP2);
                                   # false: data parallel (DDP), the whole model on every GPU
    nproc: int = 1                 # --estimate --fsdp=true: the per-GPU plan for this many GPUs


# the paper's Guanaco recipe (its Appendix B), for the LLaMA presets; 33b/65b use a lower lr and dropout
RECIPE = dict(lora_r=64, lora_alpha=16.0, lora_dropout=0.1, lr=2e-4, batch_size=1, grad_accum=16, max_steps=1875,
              max_seq_len=512, grad_checkpoint=True, group_by_length=True, eval_interval=200, ckpt_interval=250,
              eval_answers=0)
RECIPE_BIG = dict(RECIPE, lora_dropout=0.05, lr=1e-4)


class ConfigError(ValueError):
    pass


class TrainingError(RuntimeError):
    pass


def parse_config(argv):
    """Defaults < the preset's recipe < --key=value flags, each checked against the field's type."""
    flags = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in Config.__dataclass_fields__:
            raise ConfigError(f"unknown setting {arg!r}; settings: {', '.join(f.name for f in fields(Config))}")
        flags[key] = value if eq else "true"
    name = flags.get("model", Config.model)
    base = {} if name == "tiny" else RECIPE_BIG if name in ("33b", "65b") else RECIPE
    cfg = Config(**base)
    for key, value in flags.items():
        kind = type(getattr(cfg, key))
        if key == "resume":  # true / false, or the checkpoint to go on from
            value = dict(true="latest", false="", **{"1": "latest", "0": ""}).get(value.lower(), value)
        elif kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"--{key} takes true or false, not {value!r}")
            value = value.lower() in ("true", "1")
        else:
            try:
                value = kind(value)
            except ValueError:
                raise ConfigError(f"--{key} takes a {kind.__name__}, not {value!r}") from None
        setattr(cfg, key, value)
    if cfg.model not in M.PRESETS:
        raise ConfigError(f"--model={cfg.model}: unknown model preset; valid presets: {', '.join(M.PRESETS)}")
    dtypes = ("auto", "float32", "bfloat16", "float16")
    for key, allowed in (("quant_type", ("nf4", "fp4", "int4", "none")), ("schedule", ("constant", "cosine")),
                         ("optimizer", ("paged_adamw", "paged_adamw_8bit", "adamw")),
                         ("train_on", ("assistant", "all")),
                         ("compute_dtype", dtypes), ("lora_dtype", dtypes)):
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}, not {getattr(cfg, key)!r}")
    if cfg.offload_activations and not cfg.grad_checkpoint:
        raise ConfigError("--offload_activations=true moves the block inputs that gradient checkpointing keeps: "
                          "it needs --grad_checkpoint=true")
    for key, ok, allowed in CHECKS:  # settings that would train nothing, or crash deep inside
        if not ok(getattr(cfg, key)):
            raise ConfigError(f"--{key}={getattr(cfg, key)} is out of range: {allowed}")
    if cfg.target_modules != "all" and not set(cfg.target_modules.split(",")) <= set(Q.LINEARS):
        raise ConfigError(f"--target_modules takes all or a comma list of {','.join(Q.LINEARS)}, not "
                          f"{cfg.target_modules!r}")
    check_device(cfg.device)
    return cfg


# (setting, test, what it allows): every value outside these trains nothing or fails deep inside the run
CHECKS = [(k, lambda v: v >= 1, "a whole number >= 1") for k in (
              "max_steps", "batch_size", "grad_accum", "lora_r", "max_seq_len", "eval_interval", "eval_batches",
              "log_interval", "keep_ckpts", "nproc")] + [
    (k, lambda v: v >= 0, "a whole number >= 0 (0: off)") for k in ("ckpt_interval", "eval_answers")] + [
    ("blocksize", lambda v: v in (32, 64, 128, 256, 512, 1024, 2048, 4096), "a power of two from 32 to 4096"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("lora_alpha", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("max_grad_norm", lambda v: v > 0, "a number > 0 (inf: no clipping)"),  # nan > 0 is False: refused too
    ("lora_dropout", lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "from 0 to 1"),
    ("beta1", lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    ("beta2", lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("seed", lambda v: 0 <= v < 2**62, "a whole number from 0 to 2**62-1")]  # seed + rank + epoch seed torch


def check_device(name):
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device takes auto, cpu, cuda or cuda:N, not {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device takes auto, cpu, cuda or cuda:N, not {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: no CUDA GPU is available here (torch {torch.__version__}); "
                          "use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device={name}: this machine has {torch.cuda.device_count()} GPU(s)")


def get_lr(cfg, step):
    """Linear warmup over warmup_ratio of the steps, then constant (the paper) or cosine to 10%."""
    warmup = max(1, int(cfg.warmup_ratio * cfg.max_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

# -----------------------------------------------------------------------------
# model and data


SAMPLE_BASE = ROOT / "data" / "sample" / "base"  # the tiny demo's pretrained NF4 base (data/sample/pretrain.py)


def base_dir(cfg):
    """The base model's folder: --init_from, the bundled pretrained base for the tiny demo, None for a random base."""
    if cfg.init_from == "random":
        return None
    return Path(cfg.init_from) if cfg.init_from else SAMPLE_BASE


def check_weights(cfg):
    """Before anything is loaded: is there a base model to train on?"""
    if cfg.model != "tiny" and cfg.init_from in ("", "random"):
        raise ConfigError(f"--model={cfg.model} needs pretrained weights: pass --init_from=DIR (a Hugging Face, "
                          "Meta or bitsandbytes-4bit folder); only the tiny preset trains on a random base")
    if (path := base_dir(cfg)) is not None and not path.is_dir():
        raise M.CheckpointError(
            f"weights for --model={cfg.model} not found: {path} is not a directory. Put the weights there: a "
            "Hugging Face folder (config.json + model.safetensors[.index.json] or pytorch_model.bin), a Meta folder "
            "(params.json + consolidated.NN.pth) or a bitsandbytes 4-bit folder (*-bnb-4bit), with tokenizer.model")
    if path is not None and cfg.quant_type == "none" and (qc := Q.is_bnb_4bit(path)):
        raise ConfigError(f"--quant_type=none is LoRA over 16/32-bit weights, but {path} is stored in 4 bits "
                          f"({qc.get('bnb_4bit_quant_type')}): pass a 16/32-bit base with --init_from")


def build_model(cfg, vocab_size, device, dtype, compute_dtype):
    """Meta device -> 4-bit LoRA linears swapped in -> weights streamed and quantized one tensor at a time."""
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.target_modules,
                quant_type=cfg.quant_type, double_quant=cfg.double_quant, blocksize=cfg.blocksize,
                compute_dtype=compute_dtype)
    if (path := base_dir(cfg)) is not None:
        model = load_sharded(cfg, path, device, dtype, compute_dtype, lora) if cfg.fsdp else \
            Q.load_quantized(path, device=device, dtype=dtype, **lora)
        if cfg.model != "tiny" and (want := M.get_args(cfg.model)).dim != model.args.dim:
            raise ConfigError(f"{path} holds a dim {model.args.dim} model, not {cfg.model} (dim {want.dim})")
    else:
        torch.manual_seed(cfg.seed)  # a random frozen base, reproducible from the seed
        model = M.Transformer(M.get_args("tiny", vocab_size=vocab_size)).to(device=device, dtype=dtype)
        Q.add_lora(model, **lora)
    if not is_fsdp(model):  # (a sharded model got its dtype before it was sharded)
        set_lora_dtype(model, cfg, compute_dtype)
    model.grad_checkpoint = cfg.grad_checkpoint
    model.offload_activations, model.chunked_loss = cfg.offload_activations, cfg.chunked_loss
    return model


def load_sharded(cfg, path, device, dtype, compute_dtype, lora):
    """--fsdp with a checkpoint: the base is streamed into the shards, whole on no process. The model is built on
    the meta device with its adapters (whole, initialized as a one-process run's), sharded (shard_model), given
    memory for its shards only (to_empty), and the checkpoint streams in: every rank quantizes each linear weight as
    it arrives, all alike, and keeps its own rows (LoRALinear4bit._store); the other tensors likewise. Per process:
    the shards, the whole adapter, and one 16-bit tensor with its 4-bit form at a time; the checkpoint's files are
    memory-mapped, so the ranks of one machine share their pages in the page cache."""
    if (qc := Q.is_bnb_4bit(path)):  # a pre-quantized checkpoint: its type wins, as in Q.load_quantized
        lora.update(quant_type=qc.get("bnb_4bit_quant_type", "fp4"), double_quant=qc.get("bnb_4bit_use_double_quant"))
    with torch.device("meta"):
        model = M.Transformer(M.load_args(path))
    if model.args.tie_embeddings:  # one weight in two modules: shard_model leaves it whole to the root, but to_empty
        return Q.load_quantized(path, device=device, dtype=dtype, **lora)  # would untie it: load whole, then shard
    Q.add_lora(model, lora_device=device, **lora)
    set_lora_dtype(model, cfg, compute_dtype)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}
    shard_model(model, device)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in adapter.items():
            copy_rows(params[n], t)
    quantize = Q.quantize_hook(model, device, dtype)

    def hook(name, t):  # every tensor is stored here: 4-bit pieces by quantize_hook, the rest as this rank's rows
        if (t := quantize(name, t)) is None:
            return None
        if name not in params:
            raise M.CheckpointError(f"{path}: unknown key {name!r} (not a parameter of this model)")
        if t.shape != params[name].shape:
            raise M.CheckpointError(f"{path}: tensor {name!r} has shape {list(t.shape)}, the model expects "
                                    f"{list(params[name].shape)}")
        with torch.no_grad():
            copy_rows(params[name], t.to(device=device, dtype=dtype))
        return None
    return M.load_weights(model, path, hook, device, dtype)


def copy_rows(p, whole):
    """Copy into the (FSDP-sharded) parameter p this rank's rows of the whole tensor, or all of it into a plain one."""
    local_shard(p).copy_(rows_of(whole, p) if is_dtensor(p) else whole)


def rows_of(whole, p):
    """This rank's rows of a whole tensor shaped as the DTensor p, cut locally (src_data_rank=None: every rank has
    the whole, so nothing is sent)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()


def set_lora_dtype(model, cfg, compute_dtype):
    """The paper trains 16-bit adapters (AdamW's moments stay fp32); float32 keeps fp32 master weights instead."""
    dtype = compute_dtype if cfg.lora_dtype == "auto" else getattr(torch, cfg.lora_dtype)
    for m in Q.linears_4bit(model).values():
        if m.r:
            m.lora_A.to(dtype)
            m.lora_B.to(dtype)


def datasets():
    return sorted(p.parent.name for p in (ROOT / "data").glob("*/prepare.py"))


def get_data(cfg, tokenizer_path, device):
    """--data=<name>: data/<name>/prepared/<tokenizer hash>-<loss mode>-<prepare.py hash>/, prepared on first use
    (data.batching.prepare_dir); or --data=<path> of a folder that data/*/prepare.py already wrote."""
    if (name := cfg.data.rstrip("/")) in datasets():
        if is_main():  # one process prepares, the others wait for it
            prepare_dir(name, tokenizer_path, cfg.train_on)
        barrier(device)
        folder = prepared_dir(name, tokenizer_path, cfg.train_on)
    elif cfg.data and (Path(cfg.data) / "meta.json").exists():
        folder, meta = Path(cfg.data), load_meta(cfg.data)
        want = dict(tokenizer_sha256=file_sha256(tokenizer_path), train_on=cfg.train_on)
        if bad := [k for k, v in want.items() if meta.get(k) != v]:
            raise ConfigError(f"{folder / 'meta.json'}: prepared with another {' and '.join(bad)} than this run's; "
                              "prepare it again")
    else:
        raise ConfigError(f"--data={cfg.data!r}: not a dataset ({', '.join(datasets())}: a folder of data/ with a "
                          "prepare.py) nor a prepared folder with a meta.json")
    return load_split(folder, "train"), load_split(folder, "val")


def log_record(line):
    """One line of log.jsonl, or None for a line torn by a kill mid-write (it is dropped, and rewritten)."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) and isinstance(r.get("step"), int) else None


def micro_batches(cfg, ds, epoch):
    """The epoch's micro-batches as (input_ids, targets), in a fixed order given (seed, epoch)."""
    if cfg.packing:
        return packed_batches(ds, cfg.batch_size, cfg.max_seq_len, cfg.seed, epoch)
    if cfg.group_by_length:
        order = length_grouped_batches(ds, cfg.batch_size, cfg.seed, epoch)
    else:
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        order = [perm[i:i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
    return [collate([ds[i] for i in b], ds.pad_id, cfg.max_seq_len) for b in order]


class MicroBatches:
    """Micro-batch n of one global sequence that runs through the epochs. Step s uses numbers [s*G*W, (s+1)*G*W):
    rank r takes its contiguous G of them, so W ranks see exactly what one process with G*W micro-batches would."""
    def __init__(self, cfg, ds):
        self.cfg, self.ds, self.epoch, self.batches = cfg, ds, None, None

    def __getitem__(self, n):
        if self.batches is None:
            self.epoch, self.batches = 0, micro_batches(self.cfg, self.ds, 0)
        if not self.batches:
            raise ConfigError(f"data {self.cfg.data!r}: the train split yields no batch of {self.cfg.batch_size}")
        epoch, i = divmod(n, len(self.batches))  # every epoch has the same number of micro-batches
        if epoch != self.epoch:  # a new shuffle every epoch, fixed by (seed, epoch)
            self.epoch, self.batches = epoch, micro_batches(self.cfg, self.ds, epoch)
        return self.batches[i]


@torch.no_grad()
def estimate_loss(model, batches, device):
    """Mean loss per trained token over fixed validation batches."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += model(x.to(device), targets=y.to(device)).item()  # summed over the trained tokens
        count += int((y != IGNORE).sum())
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def answer_accuracy(model, ds, n, device, tok):
    """Greedy answers to up to n held-out prompts per task (a task: the prompt's first word, e.g. "Reverse"), exact
    match of answer + EOS on the first exchange: {task: (right, asked)}. Prompts of one length go as one batch."""
    model.eval()
    asked = {}
    for i in range(len(ds)):
        prompt, answer = ds.prompt_answer(i)
        task = (tok.decode(prompt).removeprefix("### Human:").split() or [""])[0]
        if len(asked.setdefault(task, [])) < n:
            asked[task].append((prompt, answer))
    by_len, right = {}, dict.fromkeys(asked, 0)
    for task, examples in asked.items():
        for prompt, answer in examples:
            by_len.setdefault(len(prompt), []).append((task, prompt, answer))
    for group in by_len.values():
        for s in range(0, len(group), 64):
            chunk = group[s:s + 64]
            out = model.generate(torch.tensor([p for _, p, _ in chunk], device=device),
                                 max(len(a) for _, _, a in chunk) + 2, eos_id=ds.eos_id).tolist()
            for row, (task, prompt, answer) in zip(out, chunk):  # tokens after a row's EOS are ignored
                right[task] += row[len(prompt):len(prompt) + len(answer) + 1] == answer + [ds.eos_id]
    model.train()
    return {task: (right[task], len(asked[task])) for task in asked}


def overall_accuracy(acc):
    """answer_accuracy's {task: (right, asked)} -> the fraction right over all the prompts asked."""
    return sum(r for r, _ in acc.values()) / max(sum(n for _, n in acc.values()), 1)

# -----------------------------------------------------------------------------
# memory plan


def memory_plan(cfg, model, batch, seq, compute_bytes, cuda=True, nproc=1):
    """Bytes of everything a training step holds on the device: the model's own account (4-bit weights, constants,
    16-bit parameters, LoRA) plus LoRA gradients, AdamW's two fp32 moments and an estimate of the activations; then
    one negative line per memory saving that is on, what it takes off those (so the lines still sum to the total).
    Offloading saves only on CUDA (cuda=False: a CPU run, where it is a no-op). Per GPU: a sharded model (FSDP) is
    counted by this rank's shards; nproc > 1 plans FSDP over nproc GPUs for a whole (meta) model."""
    a, args = Q.memory_account(model), model.args
    lora = [p for p in model.parameters() if p.requires_grad]
    numels = [Q.local_bytes(p) // p.element_size() for p in lora]  # under FSDP: this rank's rows
    lora_numel = sum(numels)
    sharded = any(is_dtensor(p) for p in lora)
    tokens = batch * seq
    # per block, the tensors autograd keeps (elements per token): norms, q/k/v/attention/o (about 10 * dim),
    # the SwiGLU's gate, up, silu and product (4 * hidden), LoRA dropout copies of the 7 inputs when dropout > 0
    block = tokens * (10 * args.dim + 4 * args.hidden_dim + (6 * args.dim + args.hidden_dim) * (cfg.lora_dropout > 0))
    # with checkpointing only each block's input stays, and one block is rebuilt at a time in backward
    inputs = tokens * args.dim * args.n_layers
    acts = (inputs + block) if cfg.grad_checkpoint else block * args.n_layers
    logit_bytes = args.vocab_size * (compute_bytes + 4 + 4)  # per token: logits, their fp32 copy, their gradient
    plan = {"4-bit base weights": a["quantized_bytes"], "quantization constants": a["constant_bytes"],
            "16-bit parameters (embeddings, norms, head)": a["unquantized_bytes"], "LoRA parameters": a["lora_bytes"],
            # FSDP accumulates the gradients unsharded until the step's one reduce-scatter: whole when G > 1
            "LoRA gradients": sum(p.nbytes if cfg.grad_accum > 1 else Q.local_bytes(p) for p in lora),
            "optimizer states (2 x fp32)": lora_numel * 8,
            f"activations, estimated (batch {batch} x {seq})": acts * compute_bytes + tokens * logit_bytes}
    if cfg.optimizer == "paged_adamw_8bit":  # uint8 codes + an fp32 absmax per 256 (small tensors stay fp32)
        plan["saved: 8-bit optimizer states"] = sum(state_bytes(n, bits=8) for n in numels) - lora_numel * 8
    if cfg.chunked_loss:  # one chunk's logits at a time; the gradient of the head's input, made in forward, waits
        chunk = min(tokens, max(1, M.CE_CHUNK_ELEMENTS // args.vocab_size))  # for backward
        plan["saved: chunked loss"] = (chunk - tokens) * logit_bytes + tokens * args.dim * compute_bytes
    if cfg.offload_activations and cfg.grad_checkpoint and cuda:  # two inputs on the GPU: one in use, one in flight
        plan["saved: block inputs offloaded to host"] = -(inputs - 2 * tokens * args.dim) * compute_bytes
    if nproc > 1:  # FSDP planned for a whole model: what is sharded is 1/nproc (rounded up), activations are not;
        # the 16-bit parameters stay whole (replicated_params; the blocks' norms, a few KB, are counted whole too)
        shared = ["4-bit base weights", "quantization constants", "LoRA parameters", "optimizer states (2 x fp32)",
                  "saved: 8-bit optimizer states"]
        shared += ["LoRA gradients"] if cfg.grad_accum == 1 else []  # else they accumulate whole
        plan.update({k: -(-plan[k] // nproc) for k in shared if k in plan})
    if nproc > 1 or sharded:
        _, units = fsdp_unit_bytes(model)  # a running unit with the prefetched next
        plan["all-gathered, transient: 2 units"] = 2 * max(units)
    plan["total"] = sum(plan.values())
    return plan, a


def print_plan(plan, account):
    print(f"memory plan ({account['bits_per_param']:.4f} bits per quantized parameter):")
    for k, v in plan.items():
        print(f"  {k:<48} {v / 2**20:>12,.1f} MiB")


def fsdp_units(model):
    """What shard_model shards and gathers one at a time: the blocks."""
    return list(model.model.layers)


def replicated_params(model):
    """What FSDP leaves whole on every rank, as DDP does: the parameters outside the blocks, all frozen (embeddings,
    final norm, head). Sharded, they would be gathered at the root's forward and held to the end of its backward
    (the chunked loss reads the head's weight itself), the embeddings with them at the start: no peak would drop,
    and each step would add their all-gather."""
    in_units = {id(p) for m in fsdp_units(model) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in in_units]


def fsdp_unit_bytes(model):
    """Whole bytes of the replicated parameters (replicated_params) and of each unit of fsdp_units."""
    units = [sum(p.nbytes for p in m.parameters()) for m in fsdp_units(model)]
    return sum(p.nbytes for p in replicated_params(model)), units


def estimate_only(cfg):
    """--estimate: the plan for any preset on the meta device, no weights, no memory. --nproc=N with --fsdp=true:
    the plan of each of N GPUs."""
    if cfg.nproc > 1 and not cfg.fsdp:
        raise ConfigError(f"--nproc={cfg.nproc} plans FSDP's per-GPU shares: add --fsdp=true (data parallel holds the "
                          "whole model on every GPU: its plan is the one-GPU plan)")
    compute = torch.bfloat16 if cfg.compute_dtype in ("auto", "bfloat16") else getattr(torch, cfg.compute_dtype)
    with torch.device("meta"):
        model = M.Transformer(M.get_args(cfg.model)).to(compute)
        n_params = sum(p.numel() for p in model.parameters())
        Q.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.target_modules,
                   quant_type=cfg.quant_type, double_quant=cfg.double_quant, blocksize=cfg.blocksize,
                   compute_dtype=compute)
        set_lora_dtype(model, cfg, compute)
    plan, account = memory_plan(cfg, model, cfg.batch_size, cfg.max_seq_len, compute.itemsize, nproc=cfg.nproc)
    on = [name for name, is_on in (("gradient checkpointing", cfg.grad_checkpoint), (cfg.optimizer, True),
                                   ("chunked loss", cfg.chunked_loss),
                                   ("offloaded activations", cfg.offload_activations and cfg.grad_checkpoint)) if is_on]
    print(f"--model={cfg.model}: {n_params / 1e9:.2f}B parameters, {compute} compute, batch {cfg.batch_size} x "
          f"{cfg.max_seq_len} tokens, {', '.join(on)}" + (f"; FSDP: each of {cfg.nproc} GPUs" if cfg.nproc > 1 else ""))
    print_plan(plan, account)
    if "saved: block inputs offloaded to host" in plan:
        host = model.args.n_layers * cfg.batch_size * cfg.max_seq_len * model.args.dim * compute.itemsize
        print(f"  (the offloaded block inputs take {host / 2**20:,.1f} MiB of pinned host RAM)")

# -----------------------------------------------------------------------------
# checkpoints: a directory per checkpoint, written under a temporary name and renamed (atomic on POSIX)


def fsync_save(obj, path):
    """torch.save, synced to the disk; a failed write (a full disk) is an OSError that names the file."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:  # torch's word for a failed write ("unexpected pos")
        raise OSError(errno.EIO, f"cannot be written: is the disk full? (torch: {str(e)[:120]})", str(path)) from None
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def check_finite(model, step):
    """Nothing non-finite is ever saved: an update can turn finite gradients into NaN weights (AdamW's squared
    gradient overflows fp32), and a checkpoint of those would make --resume fail again at once."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(local_shard(p)).all()]
    n_bad = torch.tensor(float(len(bad)), device=next(model.parameters()).device)
    if all_sum(n_bad).item():  # under FSDP each rank sees its own rows: all raise if any has one
        raise TrainingError(f"the update of step {step} made {len(bad)} LoRA tensors non-finite (first: "
                            f"{bad[0] if bad else 'on another rank'}); nothing was saved for it")


def save_adapter(cfg, model, base_path):
    """The final adapter, replaced whole: written beside and renamed, so a crash keeps the old one or the new one.
    Every rank calls it (under FSDP the weights are gathered from all ranks); rank 0 writes."""
    final = Path(cfg.out_dir) / "adapter"
    tmp, old = final.with_name("adapter.tmp"), final.with_name("adapter.old")
    for p in (tmp, old) if is_main() else ():
        shutil.rmtree(p, ignore_errors=True)
    Q.save_adapter(model, tmp, base_model_name_or_path=base_path, write=is_main())
    if not is_main():
        return final
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def whole_optimizer_state(optimizer, params):
    """optimizer.state_dict() with whole moments: under FSDP each rank's rows are all-gathered, one tensor at a time
    (a collective: every rank calls this), kept on rank 0 only. So a checkpoint is the same whatever the number of
    ranks, and DDP and FSDP runs resume each other's."""
    sd = optimizer.state_dict()
    for k, s in sd["state"].items():
        p = params[k]
        for name, x in s.items() if is_dtensor(p) else ():
            if torch.is_tensor(x) and x.dim() > 0:  # the moments (the step count is a scalar)
                whole = type(p).from_local(x.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                           stride=p.stride()).full_tensor()
                s[name] = whole.cpu() if is_main() else None
    return sd


def sharded_optimizer_state(sd, params):
    """The inverse, at --resume: each rank keeps its own rows of every whole moment, without communication."""
    for k, s in sd["state"].items():
        p = params[k]
        for name, x in s.items() if is_dtensor(p) else ():
            if torch.is_tensor(x) and x.dim() > 0:
                s[name] = rows_of(x, p)
    return sd


def save_checkpoint(cfg, model, optimizer, step, base_path, params):
    """Every rank calls it: under FSDP the adapter and the optimizer's moments are gathered whole; rank 0 writes."""
    out = Path(cfg.out_dir)
    final, tmp = out / f"ckpt-{step:06d}", out / f"ckpt-{step:06d}.tmp"
    if not is_main() and not any(is_dtensor(p) for p in params):
        return final  # unsharded (DDP): rank 0 alone has anything to do
    opt_state = whole_optimizer_state(optimizer, params)
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    # PEFT format: adapter_model.safetensors + config
    Q.save_adapter(model, tmp, base_model_name_or_path=base_path, write=is_main())
    if not is_main():
        return final
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    fsync_save(dict(optimizer=opt_state, step=step, config=asdict(cfg), rng=rng, world=world_size()),
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the checkpoint exists whole or not at all
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    for old in checkpoints(out)[:-cfg.keep_ckpts]:
        shutil.rmtree(old)
    return final


def good_checkpoint(out_dir, step):
    """After a non-finite loss or gradient in the step after `step` updates: the newest checkpoint before the
    weights of that step (ckpt-<step> holds them, and would diverge again at any lr), or None."""
    done = [p for p in checkpoints(out_dir) if (p / "trainer_state.pt").exists() and int(p.name[5:11]) < step]
    return done[-1] if done else None


# what --resume may change: how long and how fast the run goes on, and what it prints. Everything else (the model,
# data, batch, seed, optimizer, schedule, dropout...) must be the checkpoint's, or the run is not the same run.
RESUME_MAY_CHANGE = {"max_steps", "lr", "max_grad_norm", "eval_interval", "eval_batches", "log_interval",
                     "ckpt_interval", "keep_ckpts", "eval_answers", "device", "deterministic", "resume", "overwrite",
                     "estimate", "out_dir", "fsdp", "nproc"}  # checkpoints hold whole tensors: DDP <-> FSDP both go
# and the number of ranks may change with grad_accum, if grad_accum x ranks (micro-batches a step) stays: step s then
# takes the same global micro-batches (MicroBatches) as before


def load_checkpoint(cfg, model, path, compute_dtype, log):
    """Check the checkpoint belongs to this run, load its adapter into the model; return the trainer state."""
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torn or foreign bytes: the unpickler raises whatever it meets first
        raise M.CheckpointError(f"{path / 'trainer_state.pt'}: not a torch file ({type(e).__name__}: "
                                f"{str(e)[:100]})") from None
    if not (isinstance(state, dict) and {"optimizer", "step", "config", "rng"} <= state.keys()
            and isinstance(state["config"], dict) and isinstance(state["optimizer"], dict)
            and isinstance(state["rng"], dict) and type(state["step"]) is int and state["step"] >= 0):
        raise M.CheckpointError(f"{path / 'trainer_state.pt'}: not a trainer state (a dict of optimizer, step, "
                                "config, rng)")
    # checkpoints older than the "world" entry: taken as written by as many ranks as this run has
    old_g, old_w = state["config"].get("grad_accum", Config.grad_accum), state.get("world", world_size())
    if old_g * old_w != cfg.grad_accum * world_size():
        raise ConfigError(f"{path}: the checkpoint's run took {old_g} micro-batches x {old_w} rank(s) a step, this "
                          f"run {cfg.grad_accum} x {world_size()}: the global batch and the place in the data would "
                          f"change; --resume with grad_accum x ranks = {old_g * old_w}, or use another --out_dir")
    if (old_g, old_w) != (cfg.grad_accum, world_size()):
        log(f"--resume: {old_w} -> {world_size()} ranks, grad_accum {old_g} -> {cfg.grad_accum} (the same global "
            "batch)")
    for key, value in asdict(cfg).items():
        old = state["config"].get(key, getattr(Config, key))  # a setting newer than the checkpoint: its default
        if old != value and key not in RESUME_MAY_CHANGE | {"grad_accum"}:
            raise ConfigError(f"{path}: checkpoint has {key}={old!r}, this run {key}={value!r}; --resume may change "
                              f"only {', '.join(sorted(RESUME_MAY_CHANGE - {'resume', 'overwrite', 'estimate'}))}: "
                              "use the checkpoint's value, or another --out_dir")
        if old != value and key in ("max_steps", "lr", "max_grad_norm"):
            log(f"--resume: {key} {old} -> {value} (allowed: the run goes on with the new value)")
    if state["step"] > cfg.max_steps:
        raise ConfigError(f"{path}: the checkpoint is at step {state['step']}, past --max_steps={cfg.max_steps}; "
                          "raise --max_steps to go on")
    if is_fsdp(model):  # sharded as it loaded: the adapter goes into this rank's rows
        load_adapter_rows(model, path)
    else:
        Q.load_adapter(model, path)  # new lora_A / lora_B modules: the optimizer must be built after this
        set_lora_dtype(model, cfg, compute_dtype)
    return state


def load_adapter_rows(model, path):
    """A checkpoint's adapter into the sharded model's own LoRA parameters (their shapes were fixed by the same
    lora_r and target_modules, which load_checkpoint checked): each rank copies its rows of each tensor."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    seen = set()
    for key, t in M.read_safetensors(path / "adapter_model.safetensors"):
        name = key.removeprefix("base_model.model.")
        if name not in params or params[name].shape != t.shape:
            raise M.CheckpointError(f"{path}: adapter tensor {key!r} {list(t.shape)} fits no LoRA weight of this model")
        with torch.no_grad():
            copy_rows(params[name], t.to(params[name].dtype))
        seen.add(name)
    if missing := sorted(params.keys() - seen):
        raise M.CheckpointError(f"{path}: {len(missing)} adapter weights missing: {', '.join(missing[:4])}")


def resume_from(cfg, model, compute_dtype, log):
    """--resume=true: the newest checkpoint that loads; a damaged one (a torn file, a full disk) is passed over,
    saying so. --resume=<checkpoint>: that one, and the newer ones (another future of the run) are renamed aside.
    No checkpoint to go on from is an error: a fresh start would replace the run's adapter and log."""
    out = Path(cfg.out_dir)
    done = checkpoints(out)
    if cfg.resume != "latest":  # one of them (claim_out_dir checked)
        done = [p for p in done if p.resolve() == Path(cfg.resume).resolve()]
    damaged = []
    for ckpt in reversed(done):
        try:
            state = load_checkpoint(cfg, model, ckpt, compute_dtype, log)
        except ConfigError:
            raise
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as e:
            why = (str(e).strip().splitlines() or [""])[0][:200]
            log(f"--resume: {ckpt} is damaged ({type(e).__name__}: {why}); trying the one before it")
            damaged.append(ckpt.name)
            continue
        log(f"resuming from {ckpt} at step {state['step']}")
        if is_main():
            for newer in (p for p in checkpoints(out) if p.name > ckpt.name):
                aside = newer.with_name(f"{newer.name}.abandoned-{int(time.time())}")
                os.replace(newer, aside)
                log(f"--resume: {newer.name} (after the checkpoint resumed) kept as {aside.name}")
        return state
    found = f"damaged: {', '.join(damaged)}" if damaged else "none"
    raise ConfigError(f"--resume: no intact checkpoint in {out} ({found}); nothing was changed. Start a new run with "
                      "another --out_dir, or --overwrite to replace it")


# -----------------------------------------------------------------------------
# the out_dir rule: a run's files are never written over without a flag


# A run is known by its log.jsonl, the first file it writes (before a random base, or as its loop starts), or by its
# checkpoints. What it may write besides: the adapter, the 4-bit base of a random-init run, their temporary names.
RUN_FILES = ("log.jsonl", "adapter", "adapter.tmp", "adapter.old", "base")


def checkpoints(out, partial=False):
    """The ckpt-NNNNNN folders a run wrote in out, oldest first; partial: with ckpt-NNNNNN.tmp, a kill mid-write."""
    name = r"ckpt-\d{6}(\.tmp)?" if partial else r"ckpt-\d{6}"
    return sorted(p for p in Path(out).glob("ckpt-*") if re.fullmatch(name, p.name))


def holds_run(out):
    return (out / "log.jsonl").is_file() or bool(checkpoints(out, partial=True))


def holds_files(out):
    """What a run would write over in out: its own files, or an adapter or base folder that no run wrote."""
    return holds_run(out) or any((out / f).exists() for f in RUN_FILES)


def claim_out_dir(cfg):
    """--resume goes on with the run in out_dir; --overwrite deletes that run's files (and nothing else) and starts
    afresh; with neither, a new run never touches an out_dir that holds one: it goes to the first free out_dir-2,
    out_dir-3, ... and says so, so `python train.py` twice in a row keeps both runs. Files that no run of ours wrote
    (an adapter/ or base/ beside no log.jsonl: a model folder) are never deleted. Returns the files to delete."""
    out = Path(cfg.out_dir)
    if cfg.resume:
        if not holds_run(out):
            raise ConfigError(f"--resume: {out} holds no run (no log.jsonl, no ckpt-NNNNNN): nothing to go on with")
        if cfg.resume != "latest" and Path(cfg.resume).resolve() not in [p.resolve() for p in checkpoints(out)]:
            raise ConfigError(f"--resume={cfg.resume}: not a checkpoint of {out} (those are: "
                              f"{', '.join(p.name for p in checkpoints(out)) or 'none'})")
        return []
    if not holds_files(out):
        return []
    if cfg.overwrite:
        if not holds_run(out):
            raise ConfigError(f"--overwrite: {out} holds {', '.join(f for f in RUN_FILES if (out / f).exists())} "
                              "but no run of train.py (no log.jsonl): nothing there is ours to delete; pick another "
                              "--out_dir")
        return [out / f for f in RUN_FILES if (out / f).exists()] + checkpoints(out, partial=True)
    n = 2
    while holds_files(Path(f"{cfg.out_dir}-{n}")):
        n += 1
    cfg.out_dir = f"{cfg.out_dir}-{n}"
    return []


# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; nccl on CUDA, gloo on CPU


# Every tensor handed to a collective lives on the training device: an NCCL group has no backend for CPU tensors,
# and the CPU group is created as "cpu:gloo" so that it, too, serves one device type and a stray tensor fails on CPU.


def init_distributed(device):
    backend = "cuda:nccl" if device.type == "cuda" else "cpu:gloo"
    kw = dict(device_id=device) if device.type == "cuda" else {}  # binds NCCL's communicator to this rank's GPU
    dist.init_process_group(backend, **kw)


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier(device):
    if dist.is_initialized():
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


def end_distributed(device):
    """Every rank leaves the process group here, at the end of a run. ProcessGroupGloo's destructor (it runs when the
    last holder of the group is freed: DDP's reducer, FSDP's mesh) joins its worker threads while holding the GIL, and
    a worker still freeing the tensors of a collective that just finished needs the GIL to drop their Python objects:
    a deadlock, seen in 1 of ~12 two-rank CPU runs (the pytorch/pytorch#190489 race). The barrier's own work holds no
    tensors, and the pause after it (the GIL released) lets the workers finish freeing what came before."""
    if dist.is_initialized():
        barrier(device)
        time.sleep(0.2)
        dist.destroy_process_group()


def is_dtensor(x):
    """A DTensor (an FSDP-sharded parameter), checked without importing torch.distributed.tensor: that import costs
    every start-up a second, and no DTensor exists before something (shard_model) has imported it."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def is_fsdp(module):
    """A module that fully_shard has sharded (the same lazy check as is_dtensor)."""
    mod = sys.modules.get("torch.distributed.fsdp")
    return mod is not None and isinstance(module, mod.FSDPModule)


def all_sum(x):
    """Sum a tensor over ranks in place; x must already be on the training device."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def shard_model(model, device):
    """--fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) over all ranks. Each block is a unit: its 4-bit weights,
    constants and LoRA weights (all parameters: qlora._frozen) are split along dim 0 over the ranks, all-gathered
    just before the block runs and freed after, in forward and in backward (where gradient checkpointing's
    recompute runs on the gathered weights: FSDP2 skips its forward hooks then); the LoRA gradients are
    reduce-scattered. FSDP2 pads a dim 0 that does not divide by the number of ranks (the last ranks hold fewer
    rows, maybe none), so every preset shards. The embeddings, final norm and head stay whole on every rank
    (replicated_params: FSDP's ignored_params, frozen, so nothing of theirs is ever reduced); the root unit only
    schedules the blocks' gathers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    whole = replicated_params(model)
    assert not any(p.requires_grad for p in whole), "LoRA lives in the blocks: FSDP would not reduce these gradients"
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for m in fsdp_units(model):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(whole))  # the root: schedules the units, shards nothing
    return model


def fsdp_padding(model, world):
    """FSDP2 stores ceil(rows / world) rows of each parameter on every rank, zero-padded where its dim 0 does not
    divide by world (the DTensor shards of the last ranks are views of fewer rows, maybe none): how many parameters
    pad, of how many, and the bytes of padding this rank stores (what FSDP2 allocates: checked on the tiny preset)."""
    params = [p for p in model.parameters() if is_dtensor(p) and p.dim() > 0]
    pad = sum((-(-p.shape[0] // world) - p.to_local().shape[0]) * math.prod(p.shape[1:]) * p.dtype.itemsize
              for p in params)
    return sum(p.shape[0] % world != 0 for p in params), len(params), pad


def optimizer_step(model, params, shards, optimizer):
    """The optimizer on this rank's rows (FSDP: local_shard's, handed their reduce-scattered gradients), then every
    gradient cleared."""
    for p, s in zip(params, shards):
        if s is not p:
            s.grad = None if p.grad is None else p.grad.to_local()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def grad_sync(net, on):
    """DDP all-reduces, FSDP reduce-scatters, the gradients in the backward of a step's last micro-batch only: the
    others accumulate locally (FSDP: unsharded, so for G > 1 each rank holds the whole LoRA gradients meanwhile)."""
    if is_fsdp(net):
        net.set_requires_gradient_sync(on)
    elif isinstance(net, torch.nn.parallel.DistributedDataParallel) and not on:
        return net.no_sync()
    return nullcontext()


def local_shard(p):
    """The rows of p this rank holds and updates: under FSDP the DTensor's local tensor (its storage), else p."""
    with torch.no_grad():
        return p.to_local() if is_dtensor(p) else p


def clip_grads(params, max_norm):
    """torch's clip_grad_norm_ (the same two calls), with the norm over every rank's shards under FSDP."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = norm.full_tensor() if is_dtensor(norm) else norm
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss is in KiB


def keep_freed_memory():
    """CPU only (glibc): keep freed buffers in the process. By default malloc hands every block over 32 MiB (often
    less) back to the OS when it is freed, so each step faults the same activations and gradients in again as fresh
    zeroed pages. Raising the mmap and trim thresholds made bench.py's 60M-parameter CPU step 11-14% faster (2.75 ->
    2.40-2.45 s) for 8-20% more peak RSS; the tiny default run is unaffected. Returns whether it took effect."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune, the run is only slower
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    # the mmap threshold first: a glibc that refuses 1 GiB (older ones cap it at 32 MiB) is left as it was, since a
    # trim threshold alone turns off the adaptive mmap threshold and measured slower (3.5 s a step)
    return bool(mallopt(M_MMAP_THRESHOLD, 2**30)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


def make_deterministic():
    """What a CUDA run needs to repeat bit for bit (a CPU run already does): cuBLAS with a fixed workspace (read when
    its first handle is made, so before any CUDA work), deterministic kernels only (torch raises on an op that has
    none; scaled_dot_product_attention then picks a deterministic backward or errors), and no fused 4-bit matmul,
    whose autotuner may choose another tiling after a restart (kernels.matmul_4bit checks this flag)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def pick_device(cfg, local_rank):
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")

# -----------------------------------------------------------------------------
# the run


def train(cfg):
    check_weights(cfg)
    world, rank, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), \
        int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg, local_rank)
    if cfg.deterministic:
        make_deterministic()
    if cfg.fsdp and world < 2:
        raise ConfigError("--fsdp=true shards the model over torchrun's processes: start it with torchrun "
                          "--nproc_per_node=N, N >= 2 (this is one process; without --fsdp it trains unsharded)")
    if cfg.nproc != 1:
        raise ConfigError(f"--nproc={cfg.nproc} is for --estimate; a run's processes are torchrun's --nproc_per_node")
    if cfg.fsdp and cfg.optimizer == "paged_adamw_8bit":
        raise ConfigError("--optimizer=paged_adamw_8bit with --fsdp=true is not built: its 8-bit states are blockwise "
                          "over a whole parameter, not over a rank's rows; use paged_adamw")
    if device.type == "cuda":  # Triton and the default stream follow the current device: make it this run's GPU
        torch.cuda.set_device(device)
    if world > 1:
        init_distributed(device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed + rank)
    log = tqdm.write if is_main() else (lambda *a, **k: None)  # prints above the progress bar
    asked, stale = cfg.out_dir, claim_out_dir(cfg)  # every rank decides alike before any rank writes
    barrier(device)
    if cfg.out_dir != asked:
        log(f"{asked} holds a run (--resume goes on with it, --overwrite replaces it): this one goes to {cfg.out_dir}")
    if is_main():
        for p in stale:  # --overwrite: the old run's own files, nothing else in the folder
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    compute = (torch.bfloat16 if device.type == "cuda" else torch.float32) if cfg.compute_dtype == "auto" \
        else getattr(torch, cfg.compute_dtype)

    # tokenizer -> data -> model (meta, 4-bit, LoRA) -> optimizer
    base = base_dir(cfg)  # None: a random base, which takes the data's own tokenizer
    tok_path = (base if base is not None else ROOT / "data" / cfg.data) / "tokenizer.model"
    if not tok_path.exists():
        raise ConfigError(f"no tokenizer at {tok_path}: put the model's sentencepiece tokenizer.model there")
    M.Tokenizer(tok_path)  # a file that is no sentencepiece model (empty, Llama 3's tiktoken) is refused here
    context = M.load_args(base).max_seq_len if base is not None else M.get_args("tiny").max_seq_len
    if cfg.max_seq_len > context:
        raise ConfigError(f"--max_seq_len={cfg.max_seq_len} is longer than the base's context of {context} positions"
                          f" ({base / 'config.json' if base is not None else 'the tiny preset'}): lower it")
    train_ds, val_ds = get_data(cfg, tok_path, device)
    if cfg.fsdp:  # the same adapter init on every rank (FSDP keeps each rank's rows of it; DDP broadcasts rank 0's)
        torch.manual_seed(cfg.seed)
    model = build_model(cfg, train_ds.meta["vocab_size"], device, compute, compute)
    if cfg.fsdp:
        torch.manual_seed(cfg.seed + rank)  # then each rank its own dropout
    if model.args.vocab_size < train_ds.meta["vocab_size"]:
        raise ConfigError(f"data/{cfg.data} was tokenized with {train_ds.meta['vocab_size']} ids, the model has "
                          f"{model.args.vocab_size}")
    base_path = str(base if base is not None else Path(cfg.out_dir) / "base")
    if base is None and is_main() and not (cfg.resume and Path(base_path, "model.safetensors").exists()):
        (Path(cfg.out_dir) / "log.jsonl").touch()  # the folder holds a run from its first file on
        Q.save_quantized(model, base_path, tokenizer=tok_path)  # a random base is part of the result: keep it
    state = resume_from(cfg, model, compute, log) if cfg.resume else None
    # DDP and FSDP: two settings of one loop. `net` runs the steps; under FSDP it is the model itself, sharded in
    # place, whose parameters are then DTensors (after the adapter is loaded, before the optimizer sees them)
    if cfg.fsdp:
        net = model if is_fsdp(model) else shard_model(model, device)  # sharded as it loaded, or now
        a = Q.memory_account(model)
        held = torch.zeros(world, dtype=torch.int64, device=device)
        held[rank] = a["quantized_bytes"] + a["constant_bytes"]
        log(f"fsdp: {world} ranks store {', '.join(map(str, all_sum(held).tolist()))} bytes of the 4-bit base and "
            "its constants")
        uneven, n, pad = fsdp_padding(model, world)
        if uneven:
            held.zero_()[rank] = pad
            log(f"fsdp: {uneven} of {n} tensors pad dim 0 to a multiple of {world} ranks "
                f"({all_sum(held).max().item()} bytes of padding a rank at most)")
    else:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                        broadcast_buffers=False) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    shards = [local_shard(p) for p in params]  # the optimizer updates this rank's rows only: moments of 1/world
    opt_args = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    optimizer = dict(paged_adamw=PagedAdamW, paged_adamw_8bit=PagedAdamW8bit,
                     adamw=torch.optim.AdamW)[cfg.optimizer](shards, **opt_args)
    step = 0
    if state is not None:  # optimizer moments, step, and the RNG (dropout) exactly as they were
        optimizer.load_state_dict(sharded_optimizer_state(state["optimizer"], params))
        step = state["step"]
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    batches = MicroBatches(cfg, train_ds)
    val_batches = [collate([val_ds[i] for i in range(s, min(s + cfg.batch_size, len(val_ds)))], val_ds.pad_id,
                           cfg.max_seq_len) for s in range(0, len(val_ds), cfg.batch_size)][:cfg.eval_batches]

    seq = batches[0][0].size(1)  # the longest batch comes first: the plan's activations are the step's worst
    if not any(bool((y != IGNORE).any()) for _, y in batches.batches):
        raise ConfigError(f"--max_seq_len={cfg.max_seq_len} cuts off every trained token of data {cfg.data!r} (the "
                          "replies come after the prompts): nothing would be learned; raise it")
    plan, account = memory_plan(cfg, model, cfg.batch_size, seq, compute.itemsize, device.type == "cuda")
    if is_main():
        print_plan(plan, account)
    if step == 0:
        log(f"step 0: val loss {estimate_loss(model, val_batches, device):.4f}")
    do_answers = cfg.eval_answers > 0 and (is_main() or cfg.fsdp) and step == 0  # FSDP: every rank runs the model
    if do_answers:
        tok = M.Tokenizer(tok_path)
        acc0 = answer_accuracy(model, val_ds, cfg.eval_answers, device, tok)
        log(f"held-out answers before fine-tuning: {overall_accuracy(acc0):.0%} exact (" +
            ", ".join(f"{t} {r / n:.0%} of {n}" for t, (r, n) in acc0.items()) + ")")

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    G, losses, t0, n_seen = cfg.grad_accum, [], time.time(), 0
    if is_main():  # the log keeps the steps up to where this run starts (a killed run may have logged past it)
        logf = Path(cfg.out_dir) / "log.jsonl"
        keep = [l for l in logf.read_text().splitlines() if (r := log_record(l)) and r["step"] <= step] \
            if logf.exists() else []
        logf.write_text("".join(l + "\n" for l in keep))
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not is_main(), dynamic_ncols=True)
    while step < cfg.max_steps:
        for g in optimizer.param_groups:
            g["lr"] = get_lr(cfg, step)
        micro = [batches[step * G * world + rank * G + j] for j in range(G)]
        # normalize by the trained tokens of the whole step, over all micro-batches and ranks
        trained = torch.tensor(float(sum(int((y != IGNORE).sum()) for _, y in micro)), device=device)
        n_tokens = max(all_sum(trained).item(), 1.0)
        loss_sum = torch.zeros((), device=device)
        for j, (x, y) in enumerate(micro):
            with grad_sync(net, j == G - 1):  # all-reduce (DDP) or reduce-scatter (FSDP) once, at the end
                loss = net(x.to(device), targets=y.to(device))  # fp32, summed over the trained tokens
                (loss * world / n_tokens).backward()  # DDP and FSDP average over ranks: * world makes it a sum
            loss_sum += loss.detach()
        step_loss = all_sum(loss_sum).item() / n_tokens
        grad_norm = clip_grads(params, cfg.max_grad_norm)
        if not (math.isfinite(step_loss) and torch.isfinite(grad_norm)):
            good = good_checkpoint(cfg.out_dir, step)
            what = f"non-finite {'loss' if not math.isfinite(step_loss) else 'gradient norm'} at step {step + 1}"
            raise TrainingError(f"{what}; nothing was saved for it. " + (
                f"Last good checkpoint: {good}. Lower --lr or --max_grad_norm and go back with --resume={good}"
                if good else f"No checkpoint from before step {step}'s update (whose weights diverged) is left: "
                "lower --lr or --max_grad_norm and start over with --overwrite"))
        optimizer_step(model, params, shards, optimizer)
        step += 1
        losses.append(step_loss)
        n_seen += sum(x.numel() for x, _ in micro)
        bar.update(1)
        if is_main():  # every step's loss, for plots and for checking that a resumed run repeats itself
            with open(Path(cfg.out_dir) / "log.jsonl", "a") as f:
                f.write(json.dumps(dict(step=step, loss=step_loss, lr=get_lr(cfg, step - 1))) + "\n")
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            dt = time.time() - t0
            tokens_s = n_seen * world / dt
            log(f"step {step}: loss {step_loss:.4f}, lr {get_lr(cfg, step - 1):.2e}, {tokens_s:,.0f} tok/s, "
                f"peak {peak_memory(device)}")
            t0, n_seen = time.time(), 0
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            log(f"step {step}: val loss {estimate_loss(model, val_batches, device):.4f}")
        if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == cfg.max_steps:
            check_finite(model, step)
            save_checkpoint(cfg, model, optimizer, step, base_path, params)
        barrier(device)
    bar.close()
    check_finite(model, step)  # on every rank, as the save: under FSDP the adapter is gathered from all of them
    log(f"adapter (PEFT format) in {save_adapter(cfg, model, base_path)}")
    if do_answers and not is_main():  # FSDP: the other ranks generate alongside rank 0 (the model's collectives)
        answer_accuracy(model, val_ds, cfg.eval_answers, device, tok)
    if is_main():
        if device.type == "cuda":
            log(f"measured peak: {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2**20:,.0f} MiB reserved")
        if do_answers:
            acc = answer_accuracy(model, val_ds, cfg.eval_answers, device, tok)
            log(f"held-out answers: {overall_accuracy(acc0):.0%} before -> {overall_accuracy(acc):.0%} after "
                "fine-tuning (exact match; " +
                ", ".join(f"{t} {acc0[t][0] / n:.0%} -> {r / n:.0%} of {n}" for t, (r, n) in acc.items()) + ")")
    end_distributed(device)
    return losses


def main(argv):
    try:
        cfg = parse_config(argv)
        if cfg.estimate:
            return estimate_only(cfg)
        train(cfg)
    except (ConfigError, TrainingError, M.CheckpointError, DataError) as e:
        # every rank hits the same start-up error: say it once, and exit non-zero so torchrun stops the others
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        exit_failed()
    except OSError as e:  # a full disk, a folder that cannot be written: the file and what the system said
        print(f"error: {e.filename or 'out_dir'}: {e.strerror or e}", file=sys.stderr)
        exit_failed()


def exit_failed():
    """Exit 1. Under torchrun without the interpreter's teardown: the process group it would free can deadlock
    (end_distributed says how), and a failed run has nothing left to write (checkpoints are synced as made)."""
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
