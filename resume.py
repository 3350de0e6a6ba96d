"""
A run's folder: the out_dir rule (a run's files are never written over without a flag), its log, checkpoints
written whole or not at all, and --resume, which goes on exactly where a checkpoint left off or says why it cannot.
"""
import errno
import json
import os
import pickle
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

import checkpoint as C
import qlora as Q
from configurator import ConfigError
from distributed import (all_sum, barrier, is_dtensor, is_fsdp, is_main, load_adapter_rows, local_shard,
                         sharded_optimizer_state, whole_optimizer_state, world_size)


class TrainingError(RuntimeError):
    pass


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


def take_out_dir(cfg, device, log):
    """claim_out_dir on every rank alike, before any rank writes; then rank 0 deletes what --overwrite replaces."""
    asked, stale = cfg.out_dir, claim_out_dir(cfg)
    barrier(device)
    if cfg.out_dir != asked:
        log(f"{asked} holds a run (--resume goes on with it, --overwrite replaces it): this one goes to {cfg.out_dir}")
    if is_main():
        for p in stale:  # --overwrite: the old run's own files, nothing else in the folder
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)


def start_log(out_dir, step):
    """log.jsonl keeps the steps up to where this run starts (a killed run may have logged past it)."""
    if not is_main():
        return
    logf = Path(out_dir) / "log.jsonl"
    keep = [line for line in logf.read_text().splitlines() if (r := log_record(line)) and r["step"] <= step] \
        if logf.exists() else []
    logf.write_text("".join(line + "\n" for line in keep))


def log_record(line):
    """One line of log.jsonl, or None for a line torn by a kill mid-write (it is dropped, and rewritten)."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) and isinstance(r.get("step"), int) else None


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
    C.save_adapter(model, tmp, base_model_name_or_path=base_path, write=is_main())
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


def save_adapter(cfg, model, base_path):
    """The final adapter, replaced whole: written beside and renamed, so a crash keeps the old one or the new one.
    Every rank calls it (under FSDP the weights are gathered from all ranks); rank 0 writes."""
    final = Path(cfg.out_dir) / "adapter"
    tmp, old = final.with_name("adapter.tmp"), final.with_name("adapter.old")
    for p in (tmp, old) if is_main() else ():
        shutil.rmtree(p, ignore_errors=True)
    C.save_adapter(model, tmp, base_model_name_or_path=base_path, write=is_main())
    if not is_main():
        return final
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def diverged(out_dir, step, what):
    """The error for a non-finite loss or gradient norm in step + 1, naming the checkpoint to go back to."""
    good = good_checkpoint(out_dir, step)
    return TrainingError(f"non-finite {what} at step {step + 1}; nothing was saved for it. " + (
        f"Last good checkpoint: {good}. Lower --lr or --max_grad_norm and go back with --resume={good}"
        if good else f"No checkpoint from before step {step}'s update (whose weights diverged) is left: "
        "lower --lr or --max_grad_norm and start over with --overwrite"))


def good_checkpoint(out_dir, step):
    """After a non-finite loss or gradient in the step after `step` updates: the newest checkpoint before the
    weights of that step (ckpt-<step> holds them, and would diverge again at any lr), or None."""
    done = [p for p in checkpoints(out_dir) if (p / "trainer_state.pt").exists() and int(p.name[5:11]) < step]
    return done[-1] if done else None


# -----------------------------------------------------------------------------
# --resume: the same run, going on


# what --resume may change: how long and how fast the run goes on, and what it prints. Everything else (the model,
# data, batch, seed, optimizer, schedule, dropout...) must be the checkpoint's, or the run is not the same run.
RESUME_MAY_CHANGE = {"max_steps", "lr", "max_grad_norm", "eval_interval", "eval_batches", "log_interval",
                     "ckpt_interval", "keep_ckpts", "eval_answers", "device", "deterministic", "resume", "overwrite",
                     "estimate", "out_dir", "fsdp", "nproc"}  # checkpoints hold whole tensors: DDP <-> FSDP both go


def load_checkpoint(cfg, model, path, lora_dtype, log):
    """Check the checkpoint belongs to this run, load its adapter into the model; return the trainer state."""
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torn or foreign bytes: the unpickler raises whatever it meets first
        raise C.CheckpointError(f"{path / 'trainer_state.pt'}: not a torch file ({type(e).__name__}: "
                                f"{str(e)[:100]})") from None
    if not (isinstance(state, dict) and {"optimizer", "step", "config", "rng"} <= state.keys()
            and isinstance(state["config"], dict) and isinstance(state["optimizer"], dict)
            and isinstance(state["rng"], dict) and type(state["step"]) is int and state["step"] >= 0):
        raise C.CheckpointError(f"{path / 'trainer_state.pt'}: not a trainer state (a dict of optimizer, step, "
                                "config, rng)")
    # checkpoints older than the "world" entry: taken as written by as many ranks as this run has
    old_g, old_w = state["config"].get("grad_accum", type(cfg).grad_accum), state.get("world", world_size())
    if old_g * old_w != cfg.grad_accum * world_size():
        raise ConfigError(f"{path}: the checkpoint's run took {old_g} micro-batches x {old_w} rank(s) a step, this "
                          f"run {cfg.grad_accum} x {world_size()}: the global batch and the place in the data would "
                          f"change; --resume with grad_accum x ranks = {old_g * old_w}, or use another --out_dir")
    if (old_g, old_w) != (cfg.grad_accum, world_size()):
        log(f"--resume: {old_w} -> {world_size()} ranks, grad_accum {old_g} -> {cfg.grad_accum} (the same global "
            "batch)")
    for key, value in asdict(cfg).items():
        old = state["config"].get(key, getattr(type(cfg), key))  # a setting newer than the checkpoint: its default
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
        C.load_adapter(model, path)  # new lora_A / lora_B modules: the optimizer must be built after this
        Q.lora_to(model, lora_dtype)
    return state


def resume_from(cfg, model, lora_dtype, log):
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
            state = load_checkpoint(cfg, model, ckpt, lora_dtype, log)
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


def restore(state, optimizer, params, device):
    """A resumed run's optimizer moments, and the RNG (dropout) exactly as they were; returns the step."""
    optimizer.load_state_dict(sharded_optimizer_state(state["optimizer"], params))
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["step"]
