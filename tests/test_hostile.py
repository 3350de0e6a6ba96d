# train.py against a hostile user: a finished run is never lost, the divergence error's advice works when followed,
# and every mistake a user can make with a flag or a file is one line `error: ...` with exit status 1.
import json
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint as C
import data.batching as B
import resume as R
import train as T
from conftest import ROOT, asset

FAST = ["--batch_size=8", "--eval_answers=0", "--log_interval=1000", "--eval_interval=1000"]
BASE = ROOT / "data" / "sample" / "base"


def train(*args):
    return T.train(T.parse_config([*FAST, *args]))


def cli(*args):
    """train.py as a user runs it: (exit status, stderr)."""
    p = subprocess.run([sys.executable, "train.py", *FAST, *args], cwd=ROOT, capture_output=True, text=True)
    return p.returncode, p.stderr


def one_line_error(rc, err, *says):
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(s in last for s in says), err[-3000:]


def snapshot(out_dir):
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train("--max_steps=8", "--ckpt_interval=4", f"--out_dir={out}")
    return out


@pytest.mark.parametrize("damage", ["deleted", "damaged"])
def test_resume_with_nothing_to_resume_changes_nothing(finished, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for ckpt in out.glob("ckpt-*"):
        if damage == "deleted":
            shutil.rmtree(ckpt)
        else:
            (ckpt / "trainer_state.pt").write_bytes(b"torn")
    before = snapshot(out)
    assert len((out / "log.jsonl").read_text().splitlines()) == 8
    rc, err = cli("--max_steps=8", "--resume", f"--out_dir={out}")
    one_line_error(rc, err, "--resume: no intact checkpoint in", "nothing was changed")
    assert snapshot(out) == before  # the adapter and all 8 log lines kept


def test_resume_into_a_folder_without_a_run_is_an_error(tmp_path):
    rc, err = cli("--resume", f"--out_dir={tmp_path / 'empty'}")
    one_line_error(rc, err, "holds no run")


def test_a_model_folder_is_no_run_to_overwrite(tmp_path):
    folder = tmp_path / "sample"  # a copy of data/sample's layout: the committed pretrained base in base/
    shutil.copytree(BASE, folder / "base")
    before = snapshot(folder)
    rc, err = cli("--max_steps=1", "--overwrite", f"--out_dir={folder}")
    one_line_error(rc, err, "--overwrite:", "holds base but no run of train.py")
    assert snapshot(folder) == before
    train("--max_steps=1", f"--out_dir={folder}")  # without --overwrite: the next free folder, the base untouched
    assert snapshot(folder) == before and (tmp_path / "sample-2" / "adapter").is_dir()


def test_divergence_names_a_checkpoint_that_trains(tmp_path, capsys):
    """An update that is finite but absurd (lr 1e30: weights ~1e30) makes the next step's loss non-finite. The
    checkpoint of those weights would diverge again at any lr: the error must name the one before, and following
    its advice must train to the end."""
    out = tmp_path / "run"
    train("--max_steps=2", "--ckpt_interval=1", f"--out_dir={out}")
    with pytest.raises(R.TrainingError) as e:
        train("--max_steps=6", "--ckpt_interval=1", "--lr=1e30", "--resume", f"--out_dir={out}")
    msg = str(e.value)
    assert "non-finite" in msg and "at step 4" in msg, msg
    assert (out / "ckpt-000003").is_dir()  # the absurd weights were finite, so they were saved
    good = msg.split("--resume=")[1]
    assert good.endswith("ckpt-000002"), msg
    train("--max_steps=6", "--ckpt_interval=1", f"--resume={good}", f"--out_dir={out}")  # the advice, followed
    said = capsys.readouterr()
    assert "resuming from" in said.out + said.err and "ckpt-000003 (after the checkpoint resumed) kept as" in \
        said.out + said.err
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(r["loss"] < 20 for r in log)
    assert len(list(out.glob("ckpt-000003.abandoned-*"))) == 1  # set aside, never deleted


def test_divergence_with_no_checkpoint_before_it_says_start_over(tmp_path):
    with pytest.raises(R.TrainingError, match="start over with --overwrite"):
        train("--max_steps=4", "--ckpt_interval=1", "--lr=1e30", f"--out_dir={tmp_path}")


def test_resume_from_a_checkpoint_of_another_folder_is_an_error(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    rc, err = cli("--max_steps=8", f"--resume={tmp_path / 'ckpt-000004'}", f"--out_dir={out}")
    one_line_error(rc, err, "not a checkpoint of", "ckpt-000004, ckpt-000008")


def test_a_trainer_state_of_the_wrong_shape_is_passed_over(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    state = torch.load(out / "ckpt-000008" / "trainer_state.pt", weights_only=True)
    torch.save(dict(state, config="not a dict"), out / "ckpt-000008" / "trainer_state.pt")
    capsys.readouterr()
    train("--max_steps=8", "--resume", f"--out_dir={out}")
    said = capsys.readouterr()
    assert "ckpt-000008 is damaged" in said.out + said.err and "resuming from" in said.out + said.err


@pytest.mark.parametrize("data", ["nosuch", "oasst", "", "../data"])
def test_unknown_data_is_one_line(data, tmp_path):
    one_line_error(*cli(f"--data={data}", f"--out_dir={tmp_path}"), f"--data={data!r}: not a dataset", "sample")


def test_data_with_a_trailing_slash_is_the_dataset():
    cfg = T.parse_config([*FAST, "--data=sample/"])
    train_ds, _ = T.get_data(cfg, ROOT / "data" / "sample" / "tokenizer.model", torch.device("cpu"))
    assert len(train_ds) > 0


def test_a_prepared_folder_whose_meta_is_not_json(tmp_path):
    cfg = T.parse_config(FAST)
    tok = ROOT / "data" / "sample" / "tokenizer.model"
    T.get_data(cfg, tok, torch.device("cpu"))
    folder = tmp_path / "prepared"
    shutil.copytree(B.prepared_dir("sample", tok, "assistant"), folder)
    (folder / "meta.json").write_text("{oops")
    one_line_error(*cli(f"--data={folder}", f"--out_dir={tmp_path / 'out'}"), str(folder / "meta.json"))


@pytest.mark.parametrize("tokenizer", ["empty", "llama3"])
def test_a_tokenizer_that_is_not_this_models(tokenizer, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    if tokenizer == "empty":
        (base / "tokenizer.model").write_bytes(b"")
    else:  # a real tokenizer (Meta's Llama 3, tiktoken's format) with 128,256 ids, beside a model of 360
        shutil.copy(asset("llama3_tokenizer", "tokenizer.model"), base / "tokenizer.model")
    rc, err = cli(f"--init_from={base}", f"--out_dir={tmp_path / 'out'}")
    if tokenizer == "empty":
        one_line_error(rc, err, str(base / "tokenizer.model"), "empty file")
    else:
        one_line_error(rc, err, str(base / "tokenizer.model"), "128256 token ids", "has only 360")


def test_sliding_windows_are_masked_or_refused(tmp_path):
    base = tmp_path / "windows"
    shutil.copytree(BASE, base)
    config = json.loads((base / "config.json").read_text())
    # Mistral's window, on every layer: masked (tests/test_families.py: the logits against transformers')
    (base / "config.json").write_text(json.dumps(dict(config, model_type="mistral", sliding_window=16)))
    assert C.load_args(base).sliding_window == 16
    # Qwen's, on the layers past max_window_layers only: refused in one line
    (base / "config.json").write_text(json.dumps(dict(config, model_type="qwen2", sliding_window=16,
                                                      use_sliding_window=True)))
    rc, err = cli(f"--init_from={base}", f"--out_dir={tmp_path / 'out'}")
    one_line_error(rc, err, str(base / "config.json"), "use_sliding_window with sliding_window 16")
    # Qwen's configs carry a window that use_sliding_window turns off; one as long as the context changes nothing
    (base / "config.json").write_text(json.dumps(dict(config, sliding_window=16, use_sliding_window=False)))
    assert C.load_args(base).sliding_window is None
    (base / "config.json").write_text(json.dumps(dict(config, model_type="mistral",
                                                      sliding_window=config["max_position_embeddings"])))
    assert C.load_args(base).sliding_window is None


def test_rows_longer_than_the_base_context_are_refused(tmp_path):
    context = C.load_args(BASE).max_seq_len
    rc, err = cli("--packing=true", f"--max_seq_len={4 * context}", f"--out_dir={tmp_path}")
    one_line_error(rc, err, f"--max_seq_len={4 * context} is longer than the base's context of {context}")


@pytest.mark.parametrize("flag", ["--seed=-1", f"--seed={2**63}", "--model=8b"])
def test_bad_seed_and_preset_are_one_line(flag, tmp_path):
    one_line_error(*cli(flag, "--group_by_length=true", f"--out_dir={tmp_path}"), flag.split("=")[0])


def test_a_full_disk_is_named_not_torch_s_unexpected_pos():
    with pytest.raises(OSError) as e:
        R.fsync_save({"x": torch.zeros(1 << 20)}, "/dev/full")
    assert e.value.filename == "/dev/full" and e.value.strerror, e.value  # main() prints "error: FILE: what"


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_a_random_base_is_saved_for_every_quant_type(quant, tmp_path, capsys):
    """The base the adapter points to is the one it was trained against (int4's dequantized, as bitsandbytes has no
    int4 format): base + adapter, loaded as a user would, give the run's final validation loss."""
    out = tmp_path / "run"
    flags = [*FAST, "--init_from=random", f"--quant_type={quant}", "--max_steps=2", f"--out_dir={out}"]
    capsys.readouterr()
    T.train(T.parse_config(flags))
    said = capsys.readouterr()
    logged = float([l for l in (said.out + said.err).splitlines() if "step 2: val loss" in l][-1].split()[-1])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base")
    model = C.load_quantized(out / "base", quant_type="none")
    C.load_adapter(model, out / "adapter")
    cfg = T.parse_config(flags)
    _, val = T.get_data(cfg, out / "base" / "tokenizer.model", torch.device("cpu"))
    batches = [T.collate([val[i] for i in range(s, min(s + cfg.batch_size, len(val)))], val.pad_id, cfg.max_seq_len)
               for s in range(0, len(val), cfg.batch_size)][:cfg.eval_batches]
    assert T.estimate_loss(model, batches, torch.device("cpu")) == pytest.approx(logged, abs=1e-4)


def test_pretraining_never_replaces_the_committed_base_unasked():
    before = snapshot(BASE)
    p = subprocess.run([sys.executable, "data/sample/pretrain.py", "--steps=1", "--evaluate=false"], cwd=ROOT,
                       capture_output=True, text=True)
    one_line_error(p.returncode, p.stderr, "holds a model: add --overwrite")
    assert snapshot(BASE) == before
