# FSDP2 with torchrun (gloo on CPU, fp32): --fsdp=true shards the 4-bit base, its constants, the LoRA weights, their
# gradients and AdamW's moments over the ranks. W ranks with G micro-batches each must train what one process with
# W*G micro-batches trains (same losses, same adapter), each rank must store 1/W of the base, and a run whose rank is
# SIGKILLed must --resume to exactly the losses of a run that was never interrupted. DDP and FSDP runs resume each
# other's checkpoints, and 3 ranks, over which FSDP2 must pad nearly every tensor, train the same and say so.
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

from conftest import HANG_GUARD, ROOT, peer, run_ranks

import checkpoint as C
import memory
import model as M
import qlora as Q
from tokenizer import Tokenizer

# the smallest run that still has several blocks, accumulation and checkpoints: tiny preset, 4 sequences a micro-batch.
# warmup_ratio=0 with the constant schedule makes the learning rate independent of max_steps, so a run killed on its
# way to 1000 steps and resumed with --max_steps=6 is the same run as one that went to 6
COMMON = ["--device=cpu", "--batch_size=4", "--eval_answers=0", "--log_interval=1000",
          "--eval_interval=1000", "--eval_batches=1", "--lora_dropout=0", "--warmup_ratio=0", "--keep_ckpts=2"]
STEPS, GLOBAL = 6, 4  # optimizer steps; micro-batches per step over all ranks
TOL = 1e-5  # relative, fp32: the same sums, reduce-scattered over ranks instead of added up in one process


def env():
    # one thread per process, as torchrun's own default for several ranks: 4 ranks x 2 threads on 2 cores crawl
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train(nproc, *args):
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    return cmd + COMMON + list(args)


def run(cmd):
    go = run_ranks if "torch.distributed.run" in cmd else subprocess.run
    p = go(cmd, cwd=ROOT, capture_output=True, text=True, env=env())
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def losses(out_dir):
    return {r["step"]: r["loss"] for r in records(out_dir)}


def adapter(out_dir):
    return dict(C.read_safetensors(out_dir / "adapter" / "adapter_model.safetensors"))


def write_base(d):
    """A random tiny LLaMA as a Hugging Face fp32 checkpoint with the sample data's tokenizer: every run streams it
    in and quantizes it tensor by tensor (one process whole, FSDP ranks each into their own rows)."""
    tok = ROOT / "data" / "sample" / "tokenizer.model"
    torch.manual_seed(0)
    dense = M.Transformer(M.get_args("tiny", vocab_size=Tokenizer(tok).vocab_size))
    d.mkdir()
    C.save_safetensors(d / "model.safetensors", dense.state_dict())
    (d / "config.json").write_text(json.dumps(C.hf_config(dense.args, torch.float32)))
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
    check_adapter(d / "one", d / f"fsdp{n}")  # written whole by rank 0, from every rank's shards
    print(f"{n} ranks: losses", [(round(ref[s], 6), round(got[s], 6)) for s in ref])


def check_adapter(ref_dir, got_dir):
    """Relative in norm, the whole adapter within TOL and each tensor within 100 TOL: AdamW's m / sqrt(v) magnifies
    rounding in the few elements whose gradients are near 0. Measured, the worst tensor: 2 and 4 ranks 1.8e-6; 3 ranks
    3.0e-5, one element of layers.0's o_proj.lora_B off by 2.5e-5 (1% of a step at lr 2e-3), as much under plain DDP
    over 3 ranks (the partial gradients summed in another order), in a tensor that starts at 0 and stays small; the
    whole adapter 2.8e-6. One wrong row of one tensor (a misplaced shard row) measured 5e-2 in it, 2.4e-3 whole."""
    a, b = adapter(ref_dir), adapter(got_dir)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 4  # A and B of 7 linears in 4 blocks
    for k in a:
        assert a[k].shape == b[k].shape, k
        err = ((a[k] - b[k]).norm() / a[k].norm()).item()
        assert err <= 100 * TOL, (k, err)
    err = (sum((a[k] - b[k]).norm() ** 2 for k in a) / sum(a[k].norm() ** 2 for k in a)).sqrt().item()
    assert err <= TOL, err


def tiny_lora(d):
    """The runs' model, from their base: the tiny preset with the sample data's vocabulary (360 ids), quantized as
    train.py does (nf4, double quant), LoRA r=32 on every linear."""
    torch.manual_seed(0)
    return Q.add_lora(M.Transformer(C.load_args(d / "base")), r=32)


@pytest.mark.parametrize("n", [2, 4])
def test_each_rank_stores_its_share_of_the_base(runs, n):
    check_shares(runs[0], runs[1][n], n)


def check_shares(d, out, n):
    line = re.search(r"fsdp: (\d+) ranks store ([\d, ]+) bytes of the 4-bit base and its constants", out)
    assert line, out[-3000:]
    per_rank = [int(x) for x in line[2].split(",")]
    assert int(line[1]) == len(per_rank) == n
    model = tiny_lora(d)  # the one-process total, from the same base
    a = memory.memory_account(model)
    total = a["quantized_bytes"] + a["constant_bytes"]
    assert sum(per_rank) == total  # the shards hold every byte once
    # FSDP2 splits dim 0 of each tensor in chunks of ceil(rows / n) (the last rank's is shorter): each rank is off
    # its exact share by under n rows of each tensor. A linear's packed bytes and absmax codes have 1-byte rows,
    # its nested absmax 4-byte rows.
    slack = len(Q.linears_4bit(model)) * (1 + 1 + 4) * (n - 1)
    for b in per_rank:
        assert abs(b - total / n) <= slack, (per_rank, total, slack)
    print(f"{n} ranks store {per_rank} bytes of the {total}-byte base (+- {slack})")


# uneven shapes: over 3 ranks no tensor of the tiny preset splits evenly (LoRA's 32 rows, 256 and 688 rows, 4 and 11
# nested absmax blocks, 16-entry code tables...), and a rank holds no rows of some (4 rows over 3 ranks: 2, 2, 0)
@pytest.fixture(scope="module")
def three(runs):
    """3 ranks x 1 micro-batch, FSDP, and the one process it must equal: 3 micro-batches a step."""
    d, _ = runs
    base = f"--init_from={d / 'base'}"
    run(train(1, base, "--grad_accum=3", f"--max_steps={STEPS}", f"--out_dir={d / 'one3'}"))
    return run(train(3, base, "--fsdp=true", "--grad_accum=1", f"--max_steps={STEPS}", f"--out_dir={d / 'fsdp3'}"))


def fsdp_padding(model, n):
    """What FSDP2 does with dim 0 of each parameter over n ranks: torch.chunk's split (ceil(rows / n) rows a rank,
    the last ranks fewer, maybe none), each rank storing ceil(rows / n) rows, zero-padded. Returns the parameters that
    pad, all parameters, the largest padding of a rank in bytes, and the names of those some rank holds no row of.
    Only the blocks' parameters are sharded: the embeddings, final norm and head stay whole on every rank."""
    params = {k: p for k, p in model.named_parameters() if p.dim() > 0 and k.startswith("model.layers.")}
    pad, empty = [0] * n, []
    for k, p in params.items():
        chunk = -(-p.shape[0] // n)
        rows = [max(0, min(chunk, p.shape[0] - r * chunk)) for r in range(n)]
        for r in range(n):
            pad[r] += (chunk - rows[r]) * p[0].numel() * p.element_size()
        empty += [k] if 0 in rows else []
    return sum(p.shape[0] % n != 0 for p in params.values()), len(params), max(pad), empty


def test_uneven_shards_train_what_one_process_trains(runs, three):
    d, _ = runs
    check_same_run(d / "one3", d / "fsdp3")
    check_shares(d, three, 3)  # the per-rank bytes of the base still sum to the whole


@pytest.mark.parametrize("n", [2, 3, 4])
def test_fsdp_says_how_much_it_pads(runs, request, n):
    out = request.getfixturevalue("three") if n == 3 else runs[1][n]
    model = tiny_lora(runs[0])
    uneven, total, pad, empty = fsdp_padding(model, n)
    assert uneven > 0  # over 2 and 4 ranks the MLP's 11 nested absmax blocks pad (6 + 5, 3 + 3 + 3 + 2)
    if n == 3:  # the cases the 3-rank run is there for: trainable rows (LoRA, its gradients and moments) and an
        lora = [k for k, p in model.named_parameters() if p.requires_grad]  # empty shard
        assert all(model.get_parameter(k).shape[0] % 3 for k in lora) and empty, empty
    line = re.search(r"fsdp: (\d+) of (\d+) tensors pad dim 0 to a multiple of (\d+) ranks \((\d+) bytes of padding "
                     r"a rank at most\)", out)
    assert line, out[-3000:]
    assert [int(x) for x in line.groups()] == [uneven, total, n, pad]
    print(f"{n} ranks: {uneven} of {total} tensors pad, at most {pad} bytes a rank")


def check_same_run(ref_dir, got_dir):
    """got_dir's run trained what ref_dir's did: every step, with the same learning rate and the loss within TOL, and
    the final adapter."""
    ref, got = records(ref_dir), records(got_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]  # constant: max_steps changes nothing
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=TOL), (a["step"], b["loss"], a["loss"])
    check_adapter(ref_dir, got_dir)
    print(f"{got_dir.name} vs {ref_dir.name}: losses", [(round(a["loss"], 6), round(b["loss"], 6))
                                                         for a, b in zip(ref, got)])


def test_ddp_checkpoint_resumes_under_fsdp(runs):
    """A torchrun DDP run stopped at step 4, then --resume --fsdp=true: the checkpoint's whole adapter and moments go
    into each rank's rows, and steps 5 and 6 are the uninterrupted one-process run's."""
    d, _ = runs
    out, base = d / "ddp-fsdp", f"--init_from={d / 'base'}"
    more = ["--ckpt_interval=2", f"--grad_accum={GLOBAL // 2}", f"--out_dir={out}"]
    p = run(train(2, base, "--max_steps=4", *more))
    assert "fsdp:" not in p and sorted(losses(out)) == [1, 2, 3, 4]
    p = run(train(2, base, "--fsdp=true", f"--max_steps={STEPS}", "--resume", *more))
    assert re.search(r"resuming from \S+ckpt-000004 at step 4", p), p[-3000:]
    assert "fsdp: 2 ranks store" in p  # sharded
    check_same_run(d / "one", out)  # DDP's steps 1-4 too, kept in the log


def test_fsdp_checkpoint_resumes_under_ddp(runs):
    """The 2-rank FSDP run's step-4 checkpoint (its whole tensors, gathered from the shards), resumed by torchrun DDP:
    steps 5 and 6 are the uninterrupted one-process run's."""
    d, _ = runs
    out = d / "fsdp-ddp"
    shutil.copytree(d / "fsdp2", out)  # as if the FSDP run had stopped after its checkpoint at step 4
    shutil.rmtree(out / "ckpt-000006")
    shutil.rmtree(out / "adapter")
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(out) if r["step"] <= 4))
    p = run(train(2, f"--init_from={d / 'base'}", f"--grad_accum={GLOBAL // 2}", f"--max_steps={STEPS}",
                  "--ckpt_interval=2", "--resume", f"--out_dir={out}"))
    assert re.search(r"resuming from \S+ckpt-000004 at step 4", p), p[-3000:]
    assert "fsdp:" not in p  # not sharded
    check_same_run(d / "one", out)  # FSDP's steps 1-4 too


def test_resume_under_other_ranks_keeps_the_global_batch(runs):
    """The 2-rank FSDP run's step-4 checkpoint (2 micro-batches x 2 ranks a step) resumed by one process: with
    grad_accum=4 it is the same run (the one-process run's steps 5 and 6); with grad_accum=2 the global batch and the
    place in the data would change, which is an error that says so."""
    d, _ = runs
    out = d / "fsdp-one"
    shutil.copytree(d / "fsdp2", out)
    shutil.rmtree(out / "ckpt-000006")
    shutil.rmtree(out / "adapter")
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(out) if r["step"] <= 4))
    p = subprocess.run(train(1, f"--init_from={d / 'base'}", f"--grad_accum={GLOBAL // 2}", f"--max_steps={STEPS}",
                             "--resume", f"--out_dir={out}"), cwd=ROOT, capture_output=True, text=True, env=env())
    assert p.returncode != 0
    assert "took 2 micro-batches x 2 rank(s) a step, this run 2 x 1" in p.stderr, p.stderr[-3000:]
    assert max(losses(out)) == 4 and not (out / "adapter").exists()  # nothing written
    p = run(train(1, f"--init_from={d / 'base'}", f"--grad_accum={GLOBAL}", f"--max_steps={STEPS}", "--resume",
                  f"--out_dir={out}"))
    assert "--resume: 2 -> 1 ranks, grad_accum 2 -> 4 (the same global batch)" in p, p[-3000:]
    check_same_run(d / "one", out)


def test_adapter_written_under_fsdp_loads_in_peft(runs):
    peft = peer("peft", "the FSDP adapter's PEFT format not checked")
    transformers = peer("transformers", "no model for peft")
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
    deadline = time.time() + HANG_GUARD
    while not (out / "ckpt-000002").is_dir():
        assert job.poll() is None, job.stderr.read()[-3000:]
        assert time.time() < deadline, f"hang guard: no checkpoint written after {HANG_GUARD} s (a deadlock)"
        time.sleep(0.02)
    rank1 = [c for c in _children(job.pid) if _rank_of(c) == 1]
    assert len(rank1) == 1, _children(job.pid)
    os.kill(rank1[0], signal.SIGKILL)
    job.communicate(timeout=HANG_GUARD)  # torchrun ends the job once a rank dies: only a hang meets this
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
    p = subprocess.run(train(1, "--init_from=random", "--fsdp=true", f"--out_dir={tmp_path}"), cwd=ROOT,
                       capture_output=True, text=True, env=env())
    assert p.returncode != 0
    assert re.search(r"error: --fsdp=true .*torchrun", p.stderr), p.stderr[-3000:]
