# What is safe: nothing a run saved is lost without an explicit flag, a damaged checkpoint is passed over, a diverged
# step is never saved, and settings that would train nothing are refused up front with one line naming the flag.
import json
import subprocess
import sys

import pytest
import torch

import configurator
import resume as R
import train as T
from conftest import ROOT

FAST = ["--batch_size=8", "--eval_answers=0", "--log_interval=1000", "--eval_interval=1000", "--lora_dropout=0.1"]


def train(*args):
    return T.train(T.parse_config([*FAST, *args]))


def logged(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())}


def snapshot(out_dir):
    """Every file a run wrote, by relative path, with its bytes."""
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


def test_a_second_run_never_overwrites_the_first(tmp_path):
    out = tmp_path / "out"
    train("--max_steps=3", f"--out_dir={out}")
    first = snapshot(out)
    assert "adapter/adapter_model.safetensors" in first and "ckpt-000003/trainer_state.pt" in first
    train("--max_steps=2", f"--out_dir={out}")  # the newcomer's second `python train.py`: no error, no loss
    assert snapshot(out) == first
    assert sorted(logged(tmp_path / "out-2")) == [1, 2]  # it went to the next free folder
    train("--max_steps=2", f"--out_dir={out}")
    assert (tmp_path / "out-3" / "adapter").is_dir() and snapshot(out) == first
    # --overwrite deletes the run's own files and nothing else in the folder
    (out / "notes.txt").write_text("mine")
    train("--max_steps=2", "--overwrite", f"--out_dir={out}")
    assert sorted(logged(out)) == [1, 2] and not (out / "ckpt-000003").exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_passes_over_a_damaged_checkpoint_and_a_torn_log_line(tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "run"
    train("--max_steps=6", "--ckpt_interval=2", f"--out_dir={ref}")
    train("--max_steps=4", "--ckpt_interval=2", f"--out_dir={out}")
    (out / "ckpt-000004" / "trainer_state.pt").write_bytes(b"")  # the newest checkpoint is damaged
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill in the middle of a log write
    capsys.readouterr()
    train("--max_steps=6", "--ckpt_interval=2", "--resume", f"--out_dir={out}")
    said = capsys.readouterr()
    assert "ckpt-000004 is damaged" in said.out + said.err and "resuming from" in said.out + said.err
    assert logged(out) == logged(ref)  # from step 2 on, exactly as the uninterrupted run


def test_resume_refuses_what_would_change_the_run_and_allows_the_rest(tmp_path, capsys):
    out = tmp_path / "run"
    train("--max_steps=2", "--ckpt_interval=2", f"--out_dir={out}")
    for flag in ("--lora_dropout=0.2", "--max_seq_len=64", "--optimizer=adamw", "--train_on=all", "--packing"):
        with pytest.raises(configurator.ConfigError, match=rf"checkpoint has {flag[2:].split('=')[0]}="):
            T.train(T.parse_config([*FAST, "--max_steps=4", "--resume", flag, f"--out_dir={out}"]))
    with pytest.raises(configurator.ConfigError, match="at step 2, past --max_steps=1"):
        train("--max_steps=1", "--resume", f"--out_dir={out}")
    before = snapshot(out)
    train("--max_steps=2", "--resume", f"--out_dir={out}")  # finished: nothing to train, the adapter is the same
    assert snapshot(out)["adapter/adapter_model.safetensors"] == before["adapter/adapter_model.safetensors"]
    capsys.readouterr()
    train("--max_steps=3", "--lr=5e-4", "--resume", f"--out_dir={out}")
    said = capsys.readouterr()
    assert f"lr {T.Config.lr} -> 0.0005 (allowed" in said.out + said.err and sorted(logged(out)) == [1, 2, 3]


def test_a_diverged_update_is_never_saved(tmp_path, monkeypatch):
    real = T.PagedAdamW.step
    calls = {"n": 0}

    def overflowing(self, *a, **k):  # the 3rd update overflows (finite gradients, non-finite weights)
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(T.PagedAdamW, "step", overflowing)
    with pytest.raises(R.TrainingError, match="update of step 3 made 1 LoRA tensors non-finite"):
        train("--max_steps=5", "--ckpt_interval=1", f"--out_dir={tmp_path}")
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000001", "ckpt-000002"]
    monkeypatch.undo()
    train("--max_steps=4", "--ckpt_interval=1", "--resume", f"--out_dir={tmp_path}")  # goes on from step 2
    assert sorted(logged(tmp_path)) == [1, 2, 3, 4]


@pytest.mark.parametrize("flag, says", [
    ("--batch_size=0", "--batch_size=0 is out of range"), ("--blocksize=0", "--blocksize=0 is out of range"),
    ("--blocksize=63", "power of two"), ("--eval_interval=0", "--eval_interval=0"),
    ("--log_interval=0", "--log_interval=0"), ("--lora_r=-1", "--lora_r=-1"), ("--grad_accum=0", "--grad_accum=0"),
    ("--max_grad_norm=0", "--max_grad_norm"), ("--max_grad_norm=-1", "--max_grad_norm"),
    ("--lora_dropout=1.5", "--lora_dropout"), ("--lr=nan", "--lr=nan"), ("--compute_dtype=load", "--compute_dtype"),
    ("--keep_ckpts=-1", "--keep_ckpts"), ("--max_steps=0", "--max_steps=0"), ("--device=tpu", "--device"),
    ("--device=cuda", "no CUDA GPU"), ("--lora_dtype=int8", "--lora_dtype"),
    ("--target_modules=q_proj,qkv", "--target_modules takes all or a comma list")])
def test_settings_that_would_train_nothing_are_refused(flag, says):
    if flag == "--device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device=cuda is valid here")
    with pytest.raises(configurator.ConfigError, match=says.replace("+", r"\+")):
        T.parse_config([flag])


def test_cli_errors_are_one_line(tmp_path):
    for args, says in ((["--lr=nan"], "error: --lr=nan is out of range"),
                       (["--max_seq_len=4", f"--out_dir={tmp_path}"], "error: --max_seq_len=4 cuts off every trained")):
        p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith(says), p.stderr[-2000:]
        assert "Traceback" not in p.stderr


def test_preparing_for_another_loss_mode_leaves_a_running_jobs_files_alone():
    from data.oasst1.prepare import file_sha256
    tok = ROOT / "data" / "sample" / "tokenizer.model"
    cfg = T.parse_config(FAST)
    train_ds, _ = T.get_data(cfg, tok, torch.device("cpu"))
    script = file_sha256(ROOT / "data" / "sample" / "prepare.py")[:8]
    folder = ROOT / "data" / "sample" / "prepared" / f"{file_sha256(tok)[:12]}-assistant-{script}"
    assert (folder / "meta.json").exists()
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    cfg_all = T.parse_config([*FAST, "--train_on=all"])  # another loss mode: its own folder
    T.get_data(cfg_all, tok, torch.device("cpu"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    assert (folder.with_name(f"{file_sha256(tok)[:12]}-all-{script}") / "meta.json").exists()
