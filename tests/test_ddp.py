# Data parallel training with torchrun (gloo on CPU): W ranks with G micro-batches each train exactly what one
# process with W*G micro-batches does; rank 0 alone writes checkpoints; resume restores every rank; a start-up
# error ends the job once, without a hang. --device=cpu everywhere: on a GPU machine rank 1 would otherwise pick cuda:1.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distributed as D
from conftest import ROOT, run_ranks

COMMON = ["--device=cpu", "--batch_size=8", "--eval_answers=0", "--log_interval=1000", "--eval_interval=1000", "--lora_dropout=0"]
TOL = 1e-4  # relative: the same sums, added in another order (all-reduce of two halves vs one process)


def run(cmd):
    # one thread per process (torchrun's own default for several ranks): on a 2-core machine two ranks with two
    # threads each oversubscribe the cores and slow to a crawl
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if "torch.distributed.run" in cmd:
        return run_ranks(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def torchrun(*args):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args])


def losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())}


def test_two_ranks_equal_one_process_with_twice_the_accumulation(tmp_path):
    single = run([sys.executable, "train.py", *COMMON, "--grad_accum=4", "--max_steps=8", "--ckpt_interval=0",
                  f"--out_dir={tmp_path / 'single'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    ref = losses(tmp_path / "single")
    # 2 ranks x 2 micro-batches: exercises no_sync on the first micro-batch and the all-reduce on the second
    p = torchrun(*COMMON, "--grad_accum=2", "--max_steps=6", "--ckpt_interval=6", f"--out_dir={tmp_path / 'ddp'}")
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = losses(tmp_path / "ddp")
    assert sorted(ddp) == list(range(1, 7))
    for s in ddp:
        assert ddp[s] == pytest.approx(ref[s], rel=TOL), (s, ddp[s], ref[s])
    assert [d.name for d in (tmp_path / "ddp").glob("ckpt-*")] == ["ckpt-000006"]  # rank 0 alone wrote it
    # resume every rank from that checkpoint and go on to step 8: the same losses as the uninterrupted process
    p = torchrun(*COMMON, "--grad_accum=2", "--max_steps=8", "--ckpt_interval=6", "--resume",
                 f"--out_dir={tmp_path / 'ddp'}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout + p.stderr
    ddp = losses(tmp_path / "ddp")
    assert sorted(ddp) == list(range(1, 9))
    for s in (7, 8):
        assert ddp[s] == pytest.approx(ref[s], rel=TOL), (s, ddp[s], ref[s])
    print("losses, 1 process x 4 vs 2 ranks x 2:", [(round(ref[s], 5), round(ddp[s], 5)) for s in ddp])


def test_rank_failing_at_startup_ends_the_job_once(tmp_path):
    p = torchrun("--model=7b", f"--init_from={tmp_path / 'nowhere'}")  # a hang would meet the hang guard
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count("error: weights for --model=7b not found") == 1, out[-3000:]


def test_collectives_take_tensors_on_the_training_device(tmp_path):
    """NCCL serves CUDA tensors only, so a CPU tensor handed to it fails at step 1 ("No backend type associated with
    device type cpu"); plain gloo serves both, which is how the CPU test missed it. A group declared for one device
    type shows that failure on CPU; train.py declares its CPU group "cpu:gloo" (one device type, as NCCL), and the
    loop makes every tensor it reduces on the training device."""
    import torch
    import torch.distributed as dist

    import train as T
    dist.init_process_group("cuda:gloo", init_method=f"file://{tmp_path / 's1'}", rank=0, world_size=1)
    try:  # what NCCL does with the old loop's CPU token count
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            D.all_sum(torch.tensor(2.0))
    finally:
        dist.destroy_process_group()
    dist.init_process_group("cpu:gloo", init_method=f"file://{tmp_path / 's2'}", rank=0, world_size=1)
    try:
        assert D.all_sum(torch.tensor(2.0, device="cpu")).item() == 2.0
        D.barrier(torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    # the loop (train.py) and the process groups (distributed.py): no reduced tensor made in place without its device
    src = Path(T.__file__).read_text() + (Path(T.__file__).parent / "distributed.py").read_text()
    assert "all_sum(torch.tensor(" not in src and '"cuda:nccl" if device.type == "cuda" else "cpu:gloo"' in src
