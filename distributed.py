"""
Data parallel (DDP) and sharded (FSDP2) training: process groups, wrapping, loading a checkpoint straight into the
shards, gathering whole tensors for checkpoints, and a teardown that cannot deadlock. torchrun sets RANK /
WORLD_SIZE / LOCAL_RANK; nccl on CUDA, gloo on CPU. One process without torchrun: every function here is a no-op
or the identity, so train.py's loop is the same code for one process, DDP and FSDP.

Every tensor handed to a collective lives on the training device: an NCCL group has no backend for CPU tensors,
and the CPU group is created as "cpu:gloo" so that it, too, serves one device type and a stray tensor fails on CPU.
"""
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import checkpoint as C
import qlora as Q
from model import Transformer
from qlora import is_dtensor


# -----------------------------------------------------------------------------
# processes: one per GPU under torchrun, or this one alone


def start(device, world):
    """The run's GPU made current (Triton and the default stream follow the current device), and under torchrun
    the process group: nccl bound to this rank's GPU, or gloo for CPU tensors only."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        backend = "cuda:nccl" if device.type == "cuda" else "cpu:gloo"
        dist.init_process_group(backend, **(dict(device_id=device) if device.type == "cuda" else {}))


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier(device):
    if dist.is_initialized():
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


def all_sum(x):
    """Sum a tensor over ranks in place; x must already be on the training device."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def end_distributed(device):
    """Every rank leaves the process group here, at the end of a run. ProcessGroupGloo's destructor (it runs when the
    last holder of the group is freed: DDP's reducer, FSDP's mesh) joins its worker threads while holding the GIL, and
    a worker still freeing the tensors of a collective that just finished needs the GIL to drop their Python objects:
    a deadlock (the pytorch/pytorch#190489 race; how often it struck: bench/RESULTS.md, notes). The barrier's own
    work holds no tensors, and the pause after it (the GIL released) lets the workers finish freeing what came
    before."""
    if dist.is_initialized():
        barrier(device)
        time.sleep(0.2)
        dist.destroy_process_group()


def exit_failed():
    """Exit 1. Under torchrun without the interpreter's teardown: the process group it would free can deadlock
    (end_distributed says how), and a failed run has nothing left to write (checkpoints are synced as made)."""
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(1)


# -----------------------------------------------------------------------------
# FSDP2: what is sharded, and how a step sees it


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


def wrap(model, device, fsdp, log):
    """What runs the steps. FSDP: the model itself, sharded in place (now, or as it loaded), whose parameters are
    then DTensors; DDP over several processes; else the model. Call it after a resumed adapter is loaded, before the
    optimizer sees the parameters."""
    if not fsdp:
        ddp = torch.nn.parallel.DistributedDataParallel
        ids = [device] if device.type == "cuda" else None
        return ddp(model, device_ids=ids, broadcast_buffers=False) if world_size() > 1 else model
    net = model if is_fsdp(model) else shard_model(model, device)
    world, rank = world_size(), dist.get_rank()
    held = torch.zeros(world, dtype=torch.int64, device=device)  # the 4-bit weights and their constants
    held[rank] = sum(local_shard(t).nbytes for m in Q.linears_4bit(model).values() if m.quant_type != "none"
                     for t in (m.weight, m.absmax, m.nested_absmax) if t is not None)
    log(f"fsdp: {world} ranks store {', '.join(map(str, all_sum(held).tolist()))} bytes of the 4-bit base and its "
        "constants")
    uneven, n, pad = fsdp_padding(model, world)
    if uneven:
        held.zero_()[rank] = pad
        log(f"fsdp: {uneven} of {n} tensors pad dim 0 to a multiple of {world} ranks "
            f"({all_sum(held).max().item()} bytes of padding a rank at most)")
    return net


def is_fsdp(module):
    """A module that fully_shard has sharded (the same lazy check as is_dtensor)."""
    mod = sys.modules.get("torch.distributed.fsdp")
    return mod is not None and isinstance(module, mod.FSDPModule)


def local_shard(p):
    """The rows of p this rank holds and updates: under FSDP the DTensor's local tensor (its storage), else p."""
    with torch.no_grad():
        return p.to_local() if is_dtensor(p) else p


def fsdp_padding(model, world):
    """FSDP2 stores ceil(rows / world) rows of each parameter on every rank, zero-padded where its dim 0 does not
    divide by world (the DTensor shards of the last ranks are views of fewer rows, maybe none): how many parameters
    pad, of how many, and the bytes of padding this rank stores (what FSDP2 allocates: checked on the tiny preset)."""
    params = [p for p in model.parameters() if is_dtensor(p) and p.dim() > 0]
    pad = sum((-(-p.shape[0] // world) - p.to_local().shape[0]) * math.prod(p.shape[1:]) * p.dtype.itemsize
              for p in params)
    return sum(p.shape[0] % world != 0 for p in params), len(params), pad


def fsdp_unit_bytes(model):
    """Whole bytes of the replicated parameters (replicated_params) and of each unit of fsdp_units."""
    units = [sum(p.nbytes for p in m.parameters()) for m in fsdp_units(model)]
    return sum(p.nbytes for p in replicated_params(model)), units


# -----------------------------------------------------------------------------
# the step: gradients synced once, clipped over all shards, the update on this rank's rows


def grad_sync(net, on):
    """DDP all-reduces, FSDP reduce-scatters, the gradients in the backward of a step's last micro-batch only: the
    others accumulate locally (FSDP: unsharded, so for G > 1 each rank holds the whole LoRA gradients meanwhile)."""
    if is_fsdp(net):
        net.set_requires_gradient_sync(on)
    elif isinstance(net, torch.nn.parallel.DistributedDataParallel) and not on:
        return net.no_sync()
    return nullcontext()


def clip_grads(params, max_norm):
    """torch's clip_grad_norm_ (the same two calls), with the norm over every rank's shards under FSDP."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = norm.full_tensor() if is_dtensor(norm) else norm
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def optimizer_step(model, params, shards, optimizer):
    """The optimizer on this rank's rows (FSDP: local_shard's, handed their reduce-scattered gradients), then every
    gradient cleared."""
    for p, s in zip(params, shards):
        if s is not p:
            s.grad = None if p.grad is None else p.grad.to_local()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# loading into the shards, and gathering whole tensors for checkpoints


def load_sharded(path, device, dtype, lora, lora_dtype):
    """--fsdp with a checkpoint: the base is streamed into the shards, whole on no process. The model is built on
    the meta device with its adapters (whole, initialized as a one-process run's), sharded (shard_model), given
    memory for its shards only (to_empty), and the checkpoint streams in: every rank quantizes each linear weight as
    it arrives, all alike, and keeps its own rows (store_rows); the other tensors likewise. Per process:
    the shards, the whole adapter, and one 16-bit tensor with its 4-bit form at a time; the checkpoint's files are
    memory-mapped, so the ranks of one machine share their pages in the page cache."""
    with torch.device("meta"):
        model = Transformer(C.load_args(path))
    if model.args.tie_embeddings:  # one weight in two modules: shard_model leaves it whole to the root, but to_empty
        return C.load_quantized(path, device=device, dtype=dtype, **lora)  # would untie it: load whole, then shard
    Q.add_lora(model, lora_device=device, **{**lora, **C.bnb_settings(path)})  # a 4-bit checkpoint's type wins
    Q.lora_to(model, lora_dtype)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}
    shard_model(model, device)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in adapter.items():
            copy_rows(params[n], t)
    quantize = C.quantize_hook(model, device, dtype, store=store_rows)

    def hook(name, t):  # every tensor is stored here: 4-bit pieces by quantize_hook, the rest as this rank's rows
        if (t := quantize(name, t)) is None:
            return None
        if name not in params:
            raise C.CheckpointError(f"{path}: unknown key {name!r} (not a parameter of this model)")
        if t.shape != params[name].shape:
            raise C.CheckpointError(f"{path}: tensor {name!r} has shape {list(t.shape)}, the model expects "
                                    f"{list(params[name].shape)}")
        with torch.no_grad():
            copy_rows(params[name], t.to(device=device, dtype=dtype))
        return None
    return C.load_weights(model, path, hook, device, dtype)


def store_rows(module, name, t):
    """LoRALinear4bit.fill's store under FSDP: this rank's rows of t into the sharded frozen parameter `name`."""
    if t is not None:  # (None: no double quantization, and no placeholder either)
        p = getattr(module, name)
        assert p.shape == t.shape and p.dtype == t.dtype, f"{name}: {t.dtype} {list(t.shape)} for {p}"
        copy_rows(p, t)


def copy_rows(p, whole):
    """Copy into the (FSDP-sharded) parameter p this rank's rows of the whole tensor, or all of it into a plain one."""
    local_shard(p).copy_(rows_of(whole, p) if is_dtensor(p) else whole)


def rows_of(whole, p):
    """This rank's rows of a whole tensor shaped as the DTensor p, cut locally (src_data_rank=None: every rank has
    the whole, so nothing is sent)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()


def load_adapter_rows(model, path):
    """A checkpoint's adapter into the sharded model's own LoRA parameters (their shapes were fixed by the same
    lora_r and target_modules, which load_checkpoint checked): each rank copies its rows of each tensor."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    seen = set()
    for key, t in C.read_safetensors(path / "adapter_model.safetensors"):
        name = key.removeprefix("base_model.model.")
        if name not in params or params[name].shape != t.shape:
            raise C.CheckpointError(f"{path}: adapter tensor {key!r} {list(t.shape)} fits no LoRA weight of this model")
        with torch.no_grad():
            copy_rows(params[name], t.to(params[name].dtype))
        seen.add(name)
    if missing := sorted(params.keys() - seen):
        raise C.CheckpointError(f"{path}: {len(missing)} adapter weights missing: {', '.join(missing[:4])}")


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
