# FSDP2 with torchrun (gloo on CPU, fp32): --fsdp=true shards the 4-bit base, its constants, the LoRA weights, their
# gradients and AdamW's moments over the ranks. W ranks with G micro-batches each must train what one process with
# W*G micro-batches trains (same losses, same adapter), each rank must store 1/W of the base, and a run whose rank is
# SIGKILLed must --resume to exactly the losses of a run that was never interrupted.
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

import model as M
import qlora as Q

# the smallest run that still has several blocks, accumulation and checkpoints: tiny preset, 4 sequences a micro-batch.
# warmup_ratio=0 with the constant schedule makes the learning rate independent of max_steps, so a run killed on its
# way to 1000 steps and resumed with --max_steps=6 is the same run as one that went to 6
COMMON = ["--device=cpu", "--batch_size=4", "--eval_answers=0", "--log_interval=1000",
          "--eval_interval=1000", "--eval_batches=1", "--lora_dropout=0", "--warmup_ratio=0", "--keep_ckpts=2"]
STEPS, GLOBAL = 6, 4  # optimizer steps; micro-batches per step over all ranks
TOL = 1e-5  # relative, fp32: the same sums, reduce-scattered over ranks instead of added up in one process
HANG = 1200  # seconds: only a guard against a hang; 4 processes on 2 loaded cores are slow


def env():
    # one thread per process, as torchrun's own default for several ranks: 4 ranks x 2 threads on 2 cores crawl
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train(nproc, *args):
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    return cmd + COMMON + list(args)


def run(cmd):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG, env=env())
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())}


def adapter(out_dir):
    return dict(M.read_safetensors(out_dir / "adapter" / "adapter_model.safetensors"))


def write_base(d):
    """A random tiny LLaMA as a Hugging Face fp32 checkpoint with the sample data's tokenizer: every run streams it
    in and quantizes it tensor by tensor (one process whole, FSDP ranks each into their own rows)."""
    tok = ROOT / "data" / "sample" / "tokenizer.model"
    torch.manual_seed(0)
    dense = M.Transformer(M.get_args("tiny", vocab_size=M.Tokenizer(tok).vocab_size))
    d.mkdir()
    M.save_safetensors(d / "model.safetensors", dense.state_dict())
    (d / "config.json").write_text(json.dumps(Q.hf_config(dense.args, torch.float32)))
    shutil.copy(tok, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with 4 micro-batches a step, 2 ranks x 2 and 4 ranks x 1, FSDP: each run's out_dir and output.
    4 ranks also recompute each block in backward (gradient checkpointing: the recompute must find the block's
    weights gathered), which changes no number: the reference needs none."""
    d = tmp_path_factory.mktemp("fsdp")
    base = f"--init_from={write_base(d / 'base')}"
    out = {1: run(train(1, base, f"--grad_accum={GLOBAL}", f"--max_steps={STEPS}", f"--out_dir={d / 'one'}"))}
    for n, more in ((2, []), (4, ["--grad_checkpoint=true"])):
        out[n] = run(train(n, base, "--fsdp=true", f"--grad_accum={GLOBAL // n}", f"--max_steps={STEPS}",
                           "--ckpt_interval=2", f"--out_dir={d / f'fsdp{n}'}", *more))
    return d, out


@pytest.mark.parametrize("n", [2, 4])
def test_fsdp_ranks_train_what_one_process_trains(runs, n):
    d, _ = runs
    ref, got = losses(d / "one"), losses(d / f"fsdp{n}")
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=TOL), (s, got[s], ref[s])
    a, b = adapter(d / "one"), adapter(d / f"fsdp{n}")  # written whole by rank 0, from every rank's shards
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 4  # A and B of 7 linears in 4 blocks
    for k in a:  # relative in norm: AdamW's m / sqrt(v) magnifies rounding in the few elements whose gradients
        assert a[k].shape == b[k].shape, k  # are near 0 (measured: up to 7e-5 of the largest element, 8e-7 in norm)
        err = ((a[k] - b[k]).norm() / a[k].norm()).item()
        assert err <= TOL, (k, err)
    print(f"{n} ranks: losses", [(round(ref[s], 6), round(got[s], 6)) for s in ref])


@pytest.mark.parametrize("n", [2, 4])
def test_each_rank_stores_its_share_of_the_base(runs, n):
    d, out = runs
    line = re.search(r"fsdp: (\d+) ranks store ([\d, ]+) bytes of the 4-bit base and its constants", out[n])
    assert line, out[n][-3000:]
    per_rank = [int(x) for x in line[2].split(",")]
    assert int(line[1]) == len(per_rank) == n
    # the one-process total, from the same base (the tiny preset, quantized as train.py does: nf4, double quant)
    torch.manual_seed(0)
    model = Q.add_lora(M.Transformer(M.get_args("tiny")), r=32)
    a = Q.memory_account(model)
    total = a["quantized_bytes"] + a["constant_bytes"]
    assert sum(per_rank) == total  # the shards hold every byte once
    # FSDP2 splits dim 0 of each tensor in chunks of ceil(rows / n) (the last rank's is shorter): each rank is off
    # its exact share by under n rows of each tensor. A linear's packed bytes and absmax codes have 1-byte rows,
    # its nested absmax 4-byte rows.
    slack = len(Q.linears_4bit(model)) * (1 + 1 + 4) * (n - 1)
    for b in per_rank:
        assert abs(b - total / n) <= slack, (per_rank, total, slack)
    print(f"{n} ranks store {per_rank} bytes of the {total}-byte base (+- {slack})")


def test_adapter_written_under_fsdp_loads_in_peft(runs):
    peft = pytest.importorskip("peft", reason="peft not installed: the FSDP adapter's PEFT format not checked")
    transformers = pytest.importorskip("transformers", reason="transformers not installed: no model for peft")
    d, _ = runs
    base = transformers.LlamaForCausalLM.from_pretrained(d / "base")  # the 16-bit base the runs quantized
    theirs = peft.PeftModel.from_pretrained(base, d / "fsdp2" / "adapter")
    got = {k: v for k, v in theirs.state_dict().items() if ".lora_" in k}
    ours = adapter(d / "fsdp2")
    assert len(got) == len(ours)
    for k, v in ours.items():  # peft names them base_model.model.<name>.lora_A.default.weight
        assert torch.equal(got[k.replace(".weight", ".default.weight")], v), k


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env.get(b"RANK", b"-1"))


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the ranks' processes through Linux /proc")
def test_rank_killed_then_resumed_continues_exactly(runs):
    d, _ = runs
    out = d / "killed"
    # a run meant to go on for 1000 steps: rank 1 is SIGKILLed as soon as its first checkpoint exists
    base = f"--init_from={d / 'base'}"
    job = subprocess.Popen(train(2, base, "--fsdp=true", f"--grad_accum={GLOBAL // 2}", "--max_steps=1000",
                                 "--ckpt_interval=2", f"--out_dir={out}"), cwd=ROOT, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + HANG
    while not (out / "ckpt-000002").is_dir():
        assert job.poll() is None, job.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint written: hang guard"
        time.sleep(0.02)
    rank1 = [c for c in _children(job.pid) if _rank_of(c) == 1]
    assert len(rank1) == 1, _children(job.pid)
    os.kill(rank1[0], signal.SIGKILL)
    job.communicate(timeout=HANG)
    assert job.returncode != 0  # torchrun saw its rank die and ended the job
    killed_at = max(losses(out))
    assert killed_at < STEPS, f"killed at step {killed_at}: too late to test a resume before step {STEPS}"
    p = run(train(2, base, "--fsdp=true", f"--grad_accum={GLOBAL // 2}", f"--max_steps={STEPS}",
                  "--ckpt_interval=2", "--resume", f"--out_dir={out}"))
    resumed_from = int(re.search(r"resuming from \S+ at step (\d+)", p)[1])
    assert 2 <= resumed_from <= killed_at
    assert losses(out) == losses(d / "fsdp2")  # bit for bit: every step, before and after the kill
    assert {k: v.tolist() for k, v in adapter(out).items()} == {k: v.tolist() for k, v in adapter(d / "fsdp2").items()}
    print(f"killed at step {killed_at}, resumed from {resumed_from}: losses equal the uninterrupted run's")


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path):
    p = subprocess.run(train(1, "--init_from=random", "--fsdp=true", f"--out_dir={tmp_path}"), cwd=ROOT, capture_output=True, text=True,
                       timeout=HANG, env=env())
    assert p.returncode != 0
    assert re.search(r"error: --fsdp=true .*torchrun", p.stderr), p.stderr[-3000:]
