"""
What a run holds in memory, before it holds it: the model's byte account by kind, the memory plan that train.py
prints (and `--estimate` prints for any preset without weights), the measured peak, and the allocator knob that
keeps a CPU run's freed buffers in the process.
"""
import ctypes
import resource

import torch

import model as M
import qlora as Q
from configurator import ConfigError
from distributed import fsdp_unit_bytes, is_dtensor
from paged_adamw import state_bytes


def local_bytes(t):
    """Bytes this process stores of t: under FSDP (a DTensor) only its own shard."""
    return t.to_local().nbytes if is_dtensor(t) else t.nbytes


def quant_bytes(q, size=local_bytes):
    """Bytes a QuantState stores: the 4-bit codes, the per-block constants, and the per-tensor
    tables (code maps, offset); size=local_bytes counts only this process's shards under FSDP."""
    nested = q.nested_absmax is not None
    return dict(weight=size(q.packed),
                constants=size(q.absmax) + (size(q.nested_absmax) if nested else 0),
                tables=size(q.code) + (size(q.nested_code) + 4 if nested else 0))


def memory_account(model):
    """Bytes of a model by kind: the 4-bit codes, their per-block constants (absmax, nested absmax), per-tensor
    tables (the code maps, offset), unquantized parameters (embeddings, norms, head), LoRA parameters, and other
    buffers (rope), as this process stores them (its shards, under FSDP). Bits per quantized parameter count codes
    + per-block constants of the whole tensors, as the paper does: 4 + 32/64 = 4.5, or with double quantization
    4 + 8/64 + 32/(64*256) = 4.127."""
    a = dict(quantized_bytes=0, constant_bytes=0, table_bytes=0, unquantized_bytes=0, lora_bytes=0, buffer_bytes=0)
    mods, n, bits = Q.linears_4bit(model), 0, 0
    for m in mods.values():
        if m.quant_type == "none":  # the 16-bit baseline's dense weight
            a["unquantized_bytes"] += local_bytes(m.weight)
            continue
        q = m.quantized()
        b, whole = quant_bytes(q), quant_bytes(q, lambda t: t.nbytes)
        a["quantized_bytes"] += b["weight"]
        a["constant_bytes"] += b["constants"]
        a["table_bytes"] += b["tables"]
        bits += 8 * (whole["weight"] + whole["constants"])
        n += m.in_features * m.out_features
    for name, p in model.named_parameters():  # tied weights are counted once
        if name.rsplit(".", 1)[0] not in mods or name.endswith(".bias"):  # (the base's weights: above)
            a["lora_bytes" if ".lora_" in name else "unquantized_bytes"] += local_bytes(p)
    a["buffer_bytes"] = sum(b.nbytes for k, b in model.named_buffers() if k.rsplit(".", 1)[0] not in mods)
    a["total_bytes"] = sum(a.values())
    a["n_quantized"], a["bits_per_param"] = n, bits / max(n, 1)
    return a


def memory_plan(cfg, model, batch, seq, compute_bytes, cuda=True, nproc=1):
    """Bytes of everything a training step holds on the device: the model's own account (4-bit weights, constants,
    16-bit parameters, LoRA) plus LoRA gradients, AdamW's two fp32 moments and an estimate of the activations; then
    one negative line per memory saving that is on, what it takes off those (so the lines still sum to the total).
    Offloading saves only on CUDA (cuda=False: a CPU run, where it is a no-op). Per GPU: a sharded model (FSDP) is
    counted by this rank's shards; nproc > 1 plans FSDP over nproc GPUs for a whole (meta) model."""
    a, args = memory_account(model), model.args
    lora = [p for p in model.parameters() if p.requires_grad]
    numels = [local_bytes(p) // p.element_size() for p in lora]  # under FSDP: this rank's rows
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
            "LoRA gradients": sum(p.nbytes if cfg.grad_accum > 1 else local_bytes(p) for p in lora),
            "optimizer states (2 x fp32)": lora_numel * 8,
            f"activations, estimated (batch {batch} x {seq})": acts * compute_bytes + tokens * logit_bytes}
    if cfg.packing:  # model.document_mask: a dense (B, 1, T, T) bool off CUDA; on CUDA a BlockMask, four
        blocks = -(-seq // 128)  # int32 tensors of at most (B, 1, T/128, T/128) (FlexAttention's 128 x 128 blocks)
        plan["document mask (packed rows)"] = batch * (4 * 4 * blocks * blocks if cuda else seq * seq)
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
        Q.lora_to(model, compute if cfg.lora_dtype == "auto" else getattr(torch, cfg.lora_dtype))
    plan, account = memory_plan(cfg, model, cfg.batch_size, cfg.max_seq_len, compute.itemsize, nproc=cfg.nproc)
    on = [name for name, is_on in (("gradient checkpointing", cfg.grad_checkpoint), (cfg.optimizer, True),
                                   ("chunked loss", cfg.chunked_loss), ("packed rows", cfg.packing),
                                   ("offloaded activations", cfg.offload_activations and cfg.grad_checkpoint)) if is_on]
    print(f"--model={cfg.model}: {n_params / 1e9:.2f}B parameters, {compute} compute, batch {cfg.batch_size} x "
          f"{cfg.max_seq_len} tokens, {', '.join(on)}" + (f"; FSDP: each of {cfg.nproc} GPUs" if cfg.nproc > 1 else ""))
    print_plan(plan, account)
    if "saved: block inputs offloaded to host" in plan:
        host = model.args.n_layers * cfg.batch_size * cfg.max_seq_len * model.args.dim * compute.itemsize
        print(f"  (the offloaded block inputs take {host / 2**20:,.1f} MiB of pinned host RAM)")


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss is in KiB


def keep_freed_memory():
    """CPU only (glibc): keep freed buffers in the process. By default malloc hands every block over 32 MiB (often
    less) back to the OS when it is freed, so each step faults the same activations and gradients in again as fresh
    zeroed pages; kept, a 60M-parameter CPU step runs faster for some more peak RSS (bench/RESULTS.md). Returns
    whether it took effect (not on macOS or musl: the run is only slower)."""
    return set_malloc(mmap_threshold=2**30, trim_threshold=2**30)


def set_malloc(mmap_threshold, trim_threshold):
    """glibc's mallopt: blocks from mmap_threshold bytes up are mmapped (and unmapped when freed), and the heap's top
    is trimmed back to the OS past trim_threshold. The mmap threshold first: a glibc that refuses it (older ones cap
    it at 32 MiB) is left as it was, since a trim threshold alone turns off the adaptive mmap threshold."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
