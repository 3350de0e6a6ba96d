"""
QLoRA fine-tuning: a frozen 4-bit (NF4 + double quantization) LLaMA, LoRA adapters on every linear
layer, paged AdamW, one plain loop. Dettmers et al. 2023, arXiv 2305.14314; the loop follows
nanoGPT's train.py.

  python train.py                                            # CPU demo: tiny model, data/sample
  python train.py --model=7b --init_from=/path/to/llama-7b --data=oasst1   # Guanaco-7B's recipe
  python train.py --model=65b --estimate                     # memory plan only, no weights needed
  torchrun --nproc_per_node=2 train.py ...                   # data parallel over the LoRA weights
  torchrun --nproc_per_node=4 train.py --model=llama2-70b ... --fsdp=true   # the base sharded too

Read with model.py and qlora.py. What a step does not need lives in satellites: configurator.py
(flags and their checks), checkpoint.py (file formats), distributed.py (DDP / FSDP), resume.py
(out_dir, checkpoints, --resume), memory.py (the memory plan, --estimate).
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# a busy CPU: set before torch loads OpenMP (README, "A busy CPU")
if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tqdm import tqdm

import checkpoint as C
import configurator
import distributed as D
import model as M
import qlora as Q
import resume as R
from data.batching import (IGNORE, collate, data_folder, length_grouped_batches, load_split,
                           packed_batches, packing_stats)
from data.oasst1.prepare import DataError
from memory import estimate_only, keep_freed_memory, memory_plan, peak_memory, print_plan
from paged_adamw import PagedAdamW, PagedAdamW8bit
from tokenizer import Tokenizer, TokenizerError

ROOT = Path(__file__).resolve().parent
SAMPLE_BASE = ROOT / "data" / "sample" / "base"  # the demo's pretrained NF4 base (pretrain.py)


@dataclass
class Config:
    # what to train (defaults: the CPU demo; LLaMA presets take the paper's recipe, RECIPE below)
    model: str = "tiny"            # preset in model.PRESETS
    init_from: str = ""            # weights: a HF, Meta or bitsandbytes-4bit folder; "" for tiny:
                                   # the bundled NF4 base, data/sample/base; random: a random one
    data: str = "sample"           # a folder under data/ with a prepare.py; prepared on first use
    out_dir: str = "out"           # checkpoints, the final adapter, a random base in 4 bits
    # the frozen base
    quant_type: str = "nf4"        # nf4 | fp4 | int4 | none (plain 16-bit LoRA, for comparison)
    double_quant: bool = True      # also quantize the absmax constants (8-bit, blocks of 256)
    blocksize: int = 64            # elements per absmax
    compute_dtype: str = "auto"    # auto: bfloat16 on CUDA, float32 on CPU
    # LoRA
    lora_r: int = 32
    lora_alpha: float = 32.0       # scale = alpha / r
    lora_dropout: float = 0.0
    lora_dtype: str = "auto"       # auto: compute dtype (16-bit on CUDA, as the paper) | float32
    target_modules: str = "all"    # all linears of the blocks (the paper), or e.g. "q_proj,v_proj"
    # optimization
    max_steps: int = 600
    batch_size: int = 64           # sequences per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step (per process)
    lr: float = 2e-3
    schedule: str = "constant"     # constant (the paper) | cosine, both after a linear warmup
    warmup_ratio: float = 0.03
    optimizer: str = "paged_adamw"  # paged_adamw | paged_adamw_8bit (a quarter of it) | adamw
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 0.3
    # data
    max_seq_len: int = 256         # longer conversations are truncated
    train_on: str = "assistant"    # assistant: replies + EOS in the loss | all: every token
    group_by_length: bool = False  # batches of similar length (the paper's, on for the presets);
                                   # off for the demo, whose tasks differ in length
    packing: bool = False          # whole conversations packed into rows, each seeing only itself
    grad_checkpoint: bool = False  # recompute each block in backward to save activation memory
    offload_activations: bool = False  # with grad_checkpoint on CUDA: block inputs wait in host RAM
    chunked_loss: bool = True      # the head + loss a chunk of tokens at a time: no full logits
    # bookkeeping
    eval_interval: int = 100       # steps between validation losses (fixed batches)
    eval_batches: int = 4
    log_interval: int = 10
    ckpt_interval: int = 100       # steps between checkpoints (0: only at the end)
    keep_ckpts: int = 3
    resume: str = ""               # true: go on from the newest intact checkpoint in out_dir; or a
                                   # checkpoint of out_dir to go back to (newer ones are set aside)
    overwrite: bool = False        # start afresh where a run is: deletes that run's files only
    eval_answers: int = 100        # held-out prompts per task answered before and after; 0 = skip
    seed: int = 1337
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    deterministic: bool = False    # CUDA runs repeat bit for bit, a little slower; CPU always does
    estimate: bool = False         # print the memory plan and exit, without loading weights
    fsdp: bool = False             # under torchrun: shard the 4-bit base, LoRA, gradients and AdamW
                                   # states (FSDP2); false: DDP, the whole model on every GPU
    nproc: int = 1                 # --estimate --fsdp=true: the per-GPU plan for this many GPUs


# the paper's Guanaco recipe (its Appendix B) for the LLaMA presets; 33b/65b: lower lr and dropout
RECIPE = dict(lora_r=64, lora_alpha=16.0, lora_dropout=0.1, lr=2e-4, batch_size=1, grad_accum=16,
              max_steps=1875, max_seq_len=512, grad_checkpoint=True, group_by_length=True,
              eval_interval=200, ckpt_interval=250, eval_answers=0)
RECIPE_BIG = dict(RECIPE, lora_dropout=0.05, lr=1e-4)
OPTIMIZERS = dict(paged_adamw=PagedAdamW, paged_adamw_8bit=PagedAdamW8bit, adamw=torch.optim.AdamW)


def parse_config(argv):
    """Defaults < the preset's recipe < --key=value flags, each checked (configurator.py)."""
    flags = configurator.parse_flags(Config, argv, __doc__, bare=("resume",))
    name = flags.get("model", Config.model)
    recipe = {} if name == "tiny" else RECIPE_BIG if name in ("33b", "65b") else RECIPE
    return configurator.check_train(Config(**{**recipe, **flags}), M.PRESETS, Q.LINEARS)


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


def base_dir(cfg):
    """The base's folder: --init_from, the bundled base for the tiny demo, None for a random one."""
    if cfg.init_from == "random":
        return None
    return Path(cfg.init_from) if cfg.init_from else SAMPLE_BASE


def build_model(cfg, vocab_size, device, compute, lora_dtype, rank):
    """Meta device -> 4-bit LoRA linears swapped in -> weights streamed in and quantized one tensor
    at a time (under FSDP, into this rank's shards)."""
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                targets=cfg.target_modules, quant_type=cfg.quant_type,
                double_quant=cfg.double_quant, blocksize=cfg.blocksize, compute_dtype=compute)
    if cfg.fsdp:  # the same adapter init on every rank (FSDP keeps each rank's rows of it)
        torch.manual_seed(cfg.seed)
    if (path := base_dir(cfg)) is None:
        torch.manual_seed(cfg.seed)  # a random frozen base, reproducible from the seed
        model = M.Transformer(M.get_args("tiny", vocab_size=vocab_size))
        model = Q.add_lora(model.to(device=device, dtype=compute), **lora)
    elif cfg.fsdp:
        model = D.load_sharded(path, device, compute, lora, lora_dtype)
    else:
        model = C.load_quantized(path, device=device, dtype=compute, **lora)
    if cfg.fsdp:
        torch.manual_seed(cfg.seed + rank)  # then each rank its own dropout
    if not D.is_fsdp(model):  # (a sharded model got its dtype before it was sharded)
        Q.lora_to(model, lora_dtype)
    model.grad_checkpoint = cfg.grad_checkpoint
    model.offload_activations, model.chunked_loss = cfg.offload_activations, cfg.chunked_loss
    return model


def get_data(cfg, tokenizer_path, device):
    """--data=<name>: data/<name>/prepared/<tokenizer hash>-<loss mode>-<prepare.py hash>/, prepared
    on first use by one process while the others wait; or --data=<path>, a prepared folder."""
    if D.is_main():
        data_folder(cfg.data, tokenizer_path, cfg.train_on, prepare=True)
    D.barrier(device)
    folder = data_folder(cfg.data, tokenizer_path, cfg.train_on, prepare=False)
    return load_split(folder, "train"), load_split(folder, "val")


def micro_batches(cfg, ds, epoch):
    """The epoch's micro-batches as (input_ids, targets, docs), in a fixed order given (seed,
    epoch); docs: packed rows' document ids (model.Transformer.forward), or None: a conversation a
    row."""
    if cfg.packing:
        return packed_batches(ds, cfg.batch_size, cfg.max_seq_len, cfg.seed, epoch)
    if cfg.group_by_length:
        order = length_grouped_batches(ds, cfg.batch_size, cfg.seed, epoch)
    else:
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        order = [perm[i:i + cfg.batch_size].tolist() for i in range(0, len(perm), cfg.batch_size)]
    return [(*collate([ds[i] for i in b], ds.pad_id, cfg.max_seq_len), None) for b in order]


class MicroBatches:
    """Micro-batch n of one global sequence that runs through the epochs. Step s uses numbers
    [s*G*W, (s+1)*G*W): rank r takes its contiguous G of them, so W ranks see exactly what one
    process with G*W micro-batches would. (Packed epochs differ in length: counted as they come.)"""
    def __init__(self, cfg, ds):
        self.cfg, self.ds = cfg, ds
        self.epoch, self.first, self.batches = 0, 0, micro_batches(cfg, ds, 0)

    def __getitem__(self, n):
        if n < self.first:  # back to the start (steps only go forward, but batches[0] is asked too)
            self.epoch, self.first, self.batches = 0, 0, micro_batches(self.cfg, self.ds, 0)
        while n >= self.first + len(self.batches):  # a new shuffle an epoch, fixed by (seed, epoch)
            self.first, self.epoch = self.first + len(self.batches), self.epoch + 1
            self.batches = micro_batches(self.cfg, self.ds, self.epoch)
        return self.batches[n - self.first]


@torch.no_grad()
def estimate_loss(model, batches, device):
    """Mean loss per trained token over fixed validation batches."""
    model.eval()
    total, count = 0.0, 0
    for x, y, *_ in batches:  # (x, y) or (x, y, None): unpacked rows
        total += model(x.to(device), targets=y.to(device)).item()  # summed over the trained tokens
        count += int((y != IGNORE).sum())
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def answer_accuracy(model, ds, n, device, tok):
    """Greedy answers to up to n held-out prompts per task (a task: the prompt's first word, e.g.
    "Reverse"), exact match of answer + EOS on the first exchange: {task: (right, asked)}. Prompts
    of one length go as one batch."""
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
            for row, (task, prompt, answer) in zip(out, chunk):  # (after a row's EOS: ignored)
                got = row[len(prompt):len(prompt) + len(answer) + 1]
                right[task] += got == answer + [ds.eos_id]
    model.train()
    return {task: (right[task], len(asked[task])) for task in asked}


def overall_accuracy(acc):
    """answer_accuracy's {task: (right, asked)} -> the fraction right over all the prompts asked."""
    return sum(r for r, _ in acc.values()) / max(sum(n for _, n in acc.values()), 1)

# -----------------------------------------------------------------------------
# the run


def train(cfg):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    configurator.check_run(cfg, world)
    base = base_dir(cfg)  # None: a random base, which takes the data's own tokenizer
    tok_path = configurator.check_base(cfg, base, ROOT / "data" / cfg.data)
    device = configurator.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.deterministic:
        configurator.make_deterministic()
    D.start(device, world)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed + rank)
    log = tqdm.write if D.is_main() else (lambda *a, **k: None)  # prints above the progress bar
    R.take_out_dir(cfg, device, log)
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    compute = auto if cfg.compute_dtype == "auto" else getattr(torch, cfg.compute_dtype)
    lora_dtype = compute if cfg.lora_dtype == "auto" else getattr(torch, cfg.lora_dtype)

    # data -> model (meta, 4-bit, LoRA) -> a resumed run's adapter -> DDP / FSDP -> optimizer
    train_ds, val_ds = get_data(cfg, tok_path, device)
    batches = MicroBatches(cfg, train_ds)
    model = build_model(cfg, train_ds.meta["vocab_size"], device, compute, lora_dtype, rank)
    configurator.check_data(cfg, train_ds.meta, model.args.vocab_size, batches.batches)
    if cfg.packing:  # packing drops nothing; --max_seq_len cuts as unpacked training cuts
        st = packing_stats(train_ds, cfg.max_seq_len, batches.batches)
        log(f"packing: {st['conversations']:,} conversations in rows of {cfg.max_seq_len} tokens, "
            f"{st['padding']:.0%} padding; {st['tokens_cut']:,} tokens past --max_seq_len cut")
    base_path = str(base if base is not None else Path(cfg.out_dir) / "base")
    kept = cfg.resume and (Path(base_path) / "model.safetensors").exists()  # a resumed random base
    if base is None and D.is_main() and not kept:
        (Path(cfg.out_dir) / "log.jsonl").touch()  # the folder holds a run from its first file on
        C.save_quantized(model, base_path, tokenizer=tok_path)  # a random base is in the result
    state = R.resume_from(cfg, model, lora_dtype, log) if cfg.resume else None
    net = D.wrap(model, device, cfg.fsdp, log)  # what runs the steps
    params = [p for p in model.parameters() if p.requires_grad]
    shards = [D.local_shard(p) for p in params]  # the optimizer updates this rank's rows only
    optimizer = OPTIMIZERS[cfg.optimizer](shards, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                          weight_decay=cfg.weight_decay)
    step = R.restore(state, optimizer, params, device) if state is not None else 0
    val_batches = [(*collate([val_ds[i] for i in range(s, min(s + cfg.batch_size, len(val_ds)))],
                             val_ds.pad_id, cfg.max_seq_len), None)
                   for s in range(0, len(val_ds), cfg.batch_size)][:cfg.eval_batches]
    seq = batches[0][0].size(1)  # the longest batch comes first: the plan's is the step's worst
    plan, account = memory_plan(cfg, model, cfg.batch_size, seq, compute.itemsize,
                                device.type == "cuda")
    if D.is_main():
        print_plan(plan, account)
    if step == 0:
        log(f"step 0: val loss {estimate_loss(model, val_batches, device):.4f}")
    # held-out answers before and after; under FSDP every rank runs the model's collectives
    do_answers = cfg.eval_answers > 0 and (D.is_main() or cfg.fsdp) and step == 0
    if do_answers:
        tok = Tokenizer(tok_path)
        acc0 = answer_accuracy(model, val_ds, cfg.eval_answers, device, tok)
        log(f"held-out answers before fine-tuning: {overall_accuracy(acc0):.0%} exact (" +
            ", ".join(f"{t} {r / n:.0%} of {n}" for t, (r, n) in acc0.items()) + ")")

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    G, losses, t0, n_seen = cfg.grad_accum, [], time.time(), 0
    R.start_log(cfg.out_dir, step)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not D.is_main(),
               dynamic_ncols=True)
    while step < cfg.max_steps:
        for g in optimizer.param_groups:
            g["lr"] = get_lr(cfg, step)
        micro = [batches[step * G * world + rank * G + j] for j in range(G)]
        # normalize by the trained tokens of the whole step, over all micro-batches and ranks
        trained = sum(int((y != IGNORE).sum()) for _, y, _ in micro)
        trained = torch.tensor(float(trained), device=device)  # reduced: on the training device
        n_tokens = max(D.all_sum(trained).item(), 1.0)
        loss_sum = torch.zeros((), device=device)
        for j, (x, y, docs) in enumerate(micro):
            # all-reduce (DDP) or reduce-scatter (FSDP) once, in the last micro-batch's backward
            with D.grad_sync(net, j == G - 1):
                docs = None if docs is None else docs.to(device)  # packed rows' document ids
                loss = net(x.to(device), targets=y.to(device), docs=docs)  # fp32, a sum over tokens
                (loss * world / n_tokens).backward()  # DDP, FSDP average over ranks: * world sums
            loss_sum += loss.detach()
        step_loss = D.all_sum(loss_sum).item() / n_tokens
        grad_norm = D.clip_grads(params, cfg.max_grad_norm)
        if not (math.isfinite(step_loss) and torch.isfinite(grad_norm)):  # names a good checkpoint
            what = "loss" if not math.isfinite(step_loss) else "gradient norm"
            raise R.diverged(cfg.out_dir, step, what)
        D.optimizer_step(model, params, shards, optimizer)
        step += 1
        losses.append(step_loss)
        n_seen += sum(x.numel() for x, _, _ in micro)
        bar.update(1)
        if D.is_main():  # every step's loss, for plots and to check that a resumed run repeats
            record = dict(step=step, loss=step_loss, lr=get_lr(cfg, step - 1))
            with open(Path(cfg.out_dir) / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            dt = time.time() - t0
            tokens_s = n_seen * world / dt
            log(f"step {step}: loss {step_loss:.4f}, lr {get_lr(cfg, step - 1):.2e}, "
                f"{tokens_s:,.0f} tok/s, peak {peak_memory(device)}")
            t0, n_seen = time.time(), 0
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            log(f"step {step}: val loss {estimate_loss(model, val_batches, device):.4f}")
        if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == cfg.max_steps:
            R.check_finite(model, step)
            R.save_checkpoint(cfg, model, optimizer, step, base_path, params)
        D.barrier(device)
    bar.close()
    R.check_finite(model, step)  # on every rank, as the save: FSDP gathers the adapter from all
    log(f"adapter (PEFT format) in {R.save_adapter(cfg, model, base_path)}")
    if do_answers and not D.is_main():  # FSDP: the other ranks generate alongside rank 0
        answer_accuracy(model, val_ds, cfg.eval_answers, device, tok)
    if D.is_main():
        if device.type == "cuda":
            mib = lambda n: f"{n / 2**20:,.0f} MiB"
            log(f"measured peak: {mib(torch.cuda.max_memory_allocated(device))} allocated, "
                f"{mib(torch.cuda.max_memory_reserved(device))} reserved")
        if do_answers:
            acc = answer_accuracy(model, val_ds, cfg.eval_answers, device, tok)
            tasks = ", ".join(f"{t} {acc0[t][0] / n:.0%} -> {r / n:.0%} of {n}"
                              for t, (r, n) in acc.items())
            log(f"held-out answers: {overall_accuracy(acc0):.0%} before -> "
                f"{overall_accuracy(acc):.0%} after fine-tuning (exact match; {tasks})")
    D.end_distributed(device)
    return losses


def main(argv):
    try:
        cfg = parse_config(argv)
        if cfg.estimate:
            return estimate_only(cfg)
        train(cfg)
    except (configurator.ConfigError, R.TrainingError, C.CheckpointError, DataError, TokenizerError) as e:
        # every rank hits the same start-up error: say it once, and exit non-zero so torchrun stops
        # the others
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        D.exit_failed()
    except OSError as e:  # a full disk, a folder that cannot be written: the file and the reason
        print(f"error: {e.filename or 'out_dir'}: {e.strerror or e}", file=sys.stderr)
        D.exit_failed()


if __name__ == "__main__":
    main(sys.argv[1:])
