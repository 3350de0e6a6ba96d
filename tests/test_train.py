# train.py: settings, the memory plan, exact resume after SIGKILL, learning on the default task and on a real
# pretrained model, and clear errors for bad runs.
import json
import os
import platform
import signal
import subprocess
import sys

import pytest
import torch

import configurator
import model as M
import resume as R
import train as T
from conftest import ROOT, asset

FAST = ["--batch_size=16", "--eval_answers=0", "--log_interval=1000", "--eval_interval=1000"]


def run_train(*args, check=True):
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())}


def test_settings_recipe_and_types():
    c = T.parse_config([])
    assert (c.model, c.lora_r, c.quant_type, c.double_quant) == ("tiny", 32, "nf4", True)
    c = T.parse_config(["--model=7b"])  # the paper's Guanaco recipe
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.lr, c.max_steps, c.max_grad_norm, c.beta2) == \
        (64, 16.0, 0.1, 2e-4, 1875, 0.3, 0.999)
    assert c.batch_size * c.grad_accum == 16 and c.grad_checkpoint and c.group_by_length and c.optimizer == "paged_adamw"
    c = T.parse_config(["--model=65b", "--lr=3e-4", "--double_quant=false"])
    assert (c.lora_dropout, c.lr, c.double_quant) == (0.05, 3e-4, False)
    with pytest.raises(configurator.ConfigError, match="unknown setting '--learning_rate=1'"):
        T.parse_config(["--learning_rate=1"])
    with pytest.raises(configurator.ConfigError, match="--max_steps takes an int, not 'many'"):
        T.parse_config(["--max_steps=many"])
    with pytest.raises(configurator.ConfigError, match="--double_quant takes true or false"):
        T.parse_config(["--double_quant=maybe"])
    with pytest.raises(configurator.ConfigError, match="--quant_type must be one of"):
        T.parse_config(["--quant_type=nf3"])
    with pytest.raises(ValueError, match="valid presets"):
        T.parse_config(["--model=7B"])


def test_lr_schedule():
    c = T.parse_config(["--model=7b"])  # 1875 steps, 3% warmup = 56 steps, then constant
    assert T.get_lr(c, 0) == pytest.approx(2e-4 / 56) and T.get_lr(c, 55) == 2e-4 and T.get_lr(c, 1874) == 2e-4
    c = T.parse_config(["--model=7b", "--schedule=cosine"])
    assert T.get_lr(c, 56) == pytest.approx(2e-4) and T.get_lr(c, 1875) == pytest.approx(2e-5)


# the paper's measured 4-bit base sizes (its Table 7 / Fig. 6), MB, for the README's comparison
PAPER_4BIT_MB = {"7b": 5046, "13b": 8476, "33b": 19302, "65b": 37074}


@pytest.mark.parametrize("preset", ["7b", "13b", "33b", "65b"])
def test_estimate_plans(preset, capsys):
    T.main([f"--model={preset}", "--estimate", "--batch_size=1", "--max_seq_len=512"])
    out = capsys.readouterr().out
    rows = {line[:50].strip(): float(line[50:].replace(",", "").split()[0]) for line in out.splitlines()
            if line.endswith("MiB")}
    base = rows["4-bit base weights"] + rows["quantization constants"] + \
        rows["16-bit parameters (embeddings, norms, head)"]
    print(f"{preset}: 4-bit base {base * 1.048576:,.0f} MB here, paper {PAPER_4BIT_MB[preset]:,} MB; "
          f"total {rows['total'] / 1024:.1f} GiB")
    assert "4.1270 bits per quantized parameter" in out
    assert 0.6 * PAPER_4BIT_MB[preset] < base * 1.048576 < PAPER_4BIT_MB[preset]  # the paper counts more (see README)
    if preset == "65b":
        assert rows["total"] * 2**20 < 48e9  # fits a 48 GB GPU, the paper's claim


def plan_rows(argv, capsys):
    T.main(argv)
    return {line[:50].strip(): float(line[50:].replace(",", "").split()[0])
            for line in capsys.readouterr().out.splitlines() if line.endswith("MiB")}


@pytest.mark.parametrize("n", [2, 4])
def test_fsdp_estimate_plans_each_gpu(n, capsys):
    """--estimate --fsdp=true --nproc=N: what FSDP shards (the blocks: 4-bit weights, constants, LoRA, moments) is
    1/N of the one-GPU plan, rounded up; the embeddings, norms and head stay whole; two of the largest block are
    gathered at once; activations are per GPU."""
    args = ["--model=llama2-70b", "--estimate", "--batch_size=1", "--max_seq_len=512"]
    one, per = plan_rows(args, capsys), plan_rows(args + ["--fsdp=true", f"--nproc={n}"], capsys)
    for k in ("4-bit base weights", "quantization constants", "LoRA parameters", "optimizer states (2 x fp32)"):
        assert per[k] == pytest.approx(one[k] / n, abs=0.1), k  # MiB printed to 0.1
    for k in ("16-bit parameters (embeddings, norms, head)", "activations, estimated (batch 1 x 512)"):
        assert per[k] == one[k], k
    args_ = M.get_args("llama2-70b")  # a block's 4-bit weights alone: 7 linears of dim x dim-ish shapes, 4.127 bits
    block_4bit = (4 * args_.dim * args_.dim * (1 + args_.n_kv_heads / args_.n_heads) / 2 +
                  3 * args_.dim * args_.hidden_dim) * 4.127 / 8 / 2**20
    assert 2 * block_4bit < per["all-gathered, transient: 2 units"] < 2 * 1.2 * block_4bit
    assert per["total"] == pytest.approx(sum(v for k, v in per.items() if k != "total"), abs=1)


def test_resume_after_sigkill_repeats_losses(tmp_path):
    # --deterministic: what makes a CUDA run repeat bit for bit (on CPU the runs repeat anyway)
    args = ["--max_steps=20", "--ckpt_interval=4", "--lora_dropout=0.1", "--batch_size=32", "--eval_answers=0",
            "--log_interval=1000", "--eval_interval=1000", "--optimizer=paged_adamw", "--deterministic"]
    run_train(*args, f"--out_dir={tmp_path / 'ref'}")
    ref = losses(tmp_path / "ref")
    out = tmp_path / "killed"
    # the run SIGKILLs itself as step 11 begins (steps 1-10 logged, the last checkpoint at 8): the same point on a
    # fast machine and a slow one, where a watcher polling the log would race the run
    kill_at_11 = ("import os, signal, sys, train\n"
                  "lr = train.get_lr\n"
                  "train.get_lr = lambda cfg, step: os.kill(os.getpid(), signal.SIGKILL) if step == 10 else \\\n"
                  "    lr(cfg, step)\n"
                  "train.main(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", kill_at_11, *args, f"--out_dir={out}"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    killed_at = max(losses(out))
    assert killed_at == 10 and sorted(d.name for d in out.glob("ckpt-*")) == ["ckpt-000004", "ckpt-000008"]
    # a kill during a checkpoint write leaves a half-written temporary folder: it must be ignored
    half = out / f"ckpt-{(killed_at // 4 + 1) * 4:06d}.tmp"
    half.mkdir(exist_ok=True)
    (half / "trainer_state.pt").write_bytes(b"PK\x03\x04 truncated")
    run_train(*args, f"--out_dir={out}", "--resume")
    assert losses(out) == ref  # exactly: same data order, dropout RNG, optimizer state and adapter


def test_random_base_run_learns(tmp_path):
    """The default run on a random frozen base (--init_from=random), shortened: the held-out loss falls by at least
    40% in 40 steps of 32 (measured: 6.00 -> 2.30), and the base is saved in 4 bits beside the adapter. The default
    run on the pretrained base is tests/test_default_run.py's."""
    p = run_train("--init_from=random", "--max_steps=40", "--batch_size=32", "--eval_interval=40", "--eval_answers=0",
                  f"--out_dir={tmp_path}")
    vals = [float(line.split()[-1]) for line in p.stdout.splitlines() if "val loss" in line]
    print(f"random base run, held-out loss: step 0 {vals[0]:.3f} -> step 40 {vals[-1]:.3f}")
    assert len(vals) == 2 and vals[-1] < 0.6 * vals[0], vals
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "base" / "model.safetensors").exists()
    # chat with the saved 4-bit random base + the PEFT adapter
    s = subprocess.run([sys.executable, "sample.py", f"--init_from={tmp_path / 'base'}",
                        f"--adapter={tmp_path / 'adapter'}", "--prompt=What is 12+34?", "--max_new_tokens=6"],
                       cwd=ROOT, capture_output=True, text=True)
    assert s.returncode == 0 and s.stdout.startswith("### Human: What is 12+34?### Assistant:"), s.stderr[-2000:]


def test_finetune_real_pretrained_model(tmp_path):
    """stories260K (a real pretrained LLaMA) from its HF files, NF4 + double quantization: held-out loss falls."""
    from data.oasst1.prepare import prepare
    stories = asset("stories260K")
    prepare(input_path=ROOT / "data" / "sample" / "sample.trees.jsonl", tokenizer_path=stories / "tokenizer.model",
            out_dir=tmp_path / "data", verbose=False)
    p = run_train(f"--init_from={stories}", f"--data={tmp_path / 'data'}", "--max_steps=30", "--eval_interval=1",
                  "--eval_batches=2", "--lr=3e-3", "--lora_r=8", "--lora_alpha=16", f"--out_dir={tmp_path / 'out'}",
                  *FAST[:3])
    vals = [float(line.split()[-1]) for line in p.stdout.splitlines() if "val loss" in line]
    print(f"stories260K held-out loss: step 0 {vals[0]:.3f} -> step 30 {vals[-1]:.3f}")
    assert vals[-1] < vals[0] - 0.5


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = M.Transformer.forward

    def poisoned(self, idx, pos=None, targets=None, docs=None):  # from the 7th training forward on: NaN
        calls["n"] += self.training
        out = forward(self, idx, pos, targets, docs)
        return out * float("nan") if calls["n"] > 6 and self.training else out
    monkeypatch.setattr(M.Transformer, "forward", poisoned)
    monkeypatch.chdir(ROOT)
    with pytest.raises(R.TrainingError, match=r"non-finite loss at step 7.*Last good checkpoint: .*ckpt-000005"):
        T.train(T.parse_config([*FAST, "--max_steps=20", "--ckpt_interval=5", f"--out_dir={tmp_path}"]))
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000005"]
    assert torch.load(tmp_path / "ckpt-000005" / "trainer_state.pt", weights_only=True)["step"] == 5


def test_missing_weights_and_wrong_checkpoint_and_unknown_setting(tmp_path):
    p = run_train("--model=7b", f"--init_from={tmp_path / 'nowhere'}", check=False)
    assert p.returncode == 1 and "error: weights for --model=7b not found" in p.stderr
    assert "Hugging Face folder" in p.stderr and "Traceback" not in p.stderr
    p = run_train("--model=7b", check=False)
    assert p.returncode == 1 and "needs pretrained weights: pass --init_from" in p.stderr
    p = run_train("--lr_max=1", check=False)
    assert p.returncode == 1 and "unknown setting '--lr_max=1'" in p.stderr
    run_train(*FAST, "--max_steps=2", "--ckpt_interval=2", f"--out_dir={tmp_path / 'run'}")
    p = run_train(*FAST, "--max_steps=4", "--lora_r=8", "--resume", f"--out_dir={tmp_path / 'run'}", check=False)
    assert p.returncode == 1 and "checkpoint has lora_r=32, this run lora_r=8" in p.stderr


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's (and /proc/self/statm Linux's)")
def test_keep_freed_memory_keeps_a_freed_buffer():
    # a freed 256 MiB tensor: glibc hands it back to the OS (the resident set drops); after keep_freed_memory() the
    # process keeps it for the next step's allocations (the resident set stays)
    code = ("import os, sys, torch, memory\n"
            "tuned = memory.keep_freed_memory() if sys.argv[1] == 'tuned' else None\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
            "t = torch.ones(2**26)\n"
            "before = rss()\n"
            "del t\n"
            "print(tuned, round(before - rss()))\n")
    out = {m: subprocess.run([sys.executable, "-c", code, m], cwd=ROOT, capture_output=True, text=True)
           for m in ("default", "tuned")}
    assert all(p.returncode == 0 for p in out.values()), [p.stderr[-2000:] for p in out.values()]
    (_, default_drop), (tuned, tuned_drop) = [p.stdout.split() for p in out.values()]
    assert tuned == "True", "mallopt failed on this glibc"
    assert int(default_drop) > 200 and int(tuned_drop) < 16, (default_drop, tuned_drop)


def test_entry_scripts_choose_the_wait_policy_before_torch_loads_openmp():
    # libgomp reads OMP_WAIT_POLICY once, as torch loads it: a setting after `import torch` would do nothing
    for script in ("train.py", "sample.py", "eval.py", "bench.py", "data/sample/pretrain.py", "tests/conftest.py"):
        lines = (ROOT / script).read_text().splitlines()
        policy = lines.index('    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")')
        assert lines[policy - 1].startswith('if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:'), script
        assert policy < lines.index("import torch"), script
        assert not any(l.startswith(("import ", "from ")) and "torch" in l for l in lines[:policy]), script
