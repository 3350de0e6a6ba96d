# Hostile input to eval.py and the data scripts: a bad file or flag is one line on stderr, `error: FILE: ...`
# (or the flag), exit status 1, never a traceback; and eval.py --data=NAME reads the folder train.py prepares.
import io
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from functools import partial

import pytest
import sentencepiece as spm
import torch

import data.batching as B
import eval as E
from conftest import ROOT
from data.oasst1 import prepare as oasst1
from data.oasst1.prepare import DataError, file_sha256
from data.sample import prepare as sample_prepare

BASE = ROOT / "data" / "sample" / "base"
TOK = BASE / "tokenizer.model"
TREES = ROOT / "data" / "sample" / "sample.trees.jsonl"


def run(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def one_error(r, *names):
    """r failed as the README says: status 1, stderr a single `error: ...` line naming each of names, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def dead_pid():
    """The pid of a process that has exited and been reaped (reuse within the test is vanishingly unlikely)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def copy_base(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    return base

# ----------------------------------------------------------------------------- 1. meta.json that is not JSON


def test_meta_not_json(tmp_path):
    (tmp_path / "meta.json").write_text("{oops")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'meta.json'))}: not valid JSON"):
        B.load_meta(tmp_path)
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'meta.json'))}: not valid JSON"):
        E.split_docs(str(tmp_path), "val", TOK)
    one_error(run("eval.py", f"--init_from={BASE}", f"--data={tmp_path}", "--device=cpu"),
              f"{tmp_path / 'meta.json'}: not valid JSON")

# ----------------------------------------------------------------------------- 2. tokenizer larger than the model


def test_eval_tokenizer_with_more_ids_than_the_model(tmp_path):
    """Another tokenizer beside the weights: 400 ids for a 360-row embedding, which would index past it."""
    base = copy_base(tmp_path)
    convs, _, _ = oasst1.read_conversations(TREES)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(oasst1.render(c.turns) for c in convs), model_writer=model, model_type="bpe",
        vocab_size=400, byte_fallback=True, num_threads=1, minloglevel=2)
    (base / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "t.txt").write_text("What is 2+3?" * 40)
    r = run("eval.py", f"--init_from={base}", f"--text={tmp_path / 't.txt'}", "--device=cpu")
    one_error(r, base / "tokenizer.model", "400 token ids", "only 360")
    assert "perplexity" not in r.stdout

# ----------------------------------------------------------------------------- 3. eval.py's files and flags


def test_eval_missing_text(tmp_path):
    one_error(run("eval.py", f"--init_from={BASE}", f"--text={tmp_path / 'none.txt'}", "--device=cpu"),
              f"{tmp_path / 'none.txt'}: cannot read")


@pytest.mark.parametrize("where", ["under a file", "a directory"])
def test_eval_unwritable_out_is_refused_before_the_evaluation(tmp_path, where):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "s_test.csv").write_text("What is 2+3?,4,5,6,7,B\n")
    (tmp_path / "somefile").write_text("")
    out = tmp_path / "somefile" / "out.json" if where == "under a file" else tmp_path
    r = run("eval.py", f"--init_from={BASE}", f"--mmlu={tmp_path / 'mmlu'}", "--shots=0", f"--out={out}",
            "--device=cpu")
    one_error(r, f"--out={out}")
    assert "MMLU" not in r.stdout  # nothing was evaluated


@pytest.mark.parametrize("device", ["cuda", "cuda:99", "bogus", "meta"])
def test_eval_device_not_on_this_machine(tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device=cuda is valid here")
    (tmp_path / "t.txt").write_text("What is 2+3?")
    one_error(run("eval.py", f"--init_from={BASE}", f"--text={tmp_path / 't.txt'}", f"--device={device}"),
              f"--device={device}")

# ----------------------------------------------------------------------------- 4. the folder train.py prepares


def test_prepared_dir_is_train_py_key(tmp_path):
    script = ROOT / "data" / "sample" / "prepare.py"
    key = f"{file_sha256(TOK)[:12]}-assistant-{file_sha256(script)[:8]}"
    assert B.prepared_dir("sample", TOK) == ROOT / "data" / "sample" / "prepared" / key
    (tmp_path / "sample").mkdir()
    shutil.copy(script, tmp_path / "sample" / "prepare.py")
    assert B.prepared_dir("sample", TOK, "all", root=tmp_path) == tmp_path / "sample" / "prepared" / key.replace(
        "-assistant-", "-all-")


def test_eval_data_name_reads_the_folder_train_py_prepares():
    """The README's route: `python train.py` prepares data/sample/prepared/<key>/; eval.py --data=sample reads that
    folder (preparing it if train.py has not yet), never a data/sample/meta.json that the default run never writes."""
    r = run("eval.py", f"--init_from={BASE}", "--data=sample", "--split=val", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert "perplexity on sample (val):" in r.stdout
    folder = B.prepared_dir("sample", TOK)
    n = B.load_meta(folder)["splits"]["val"]["conversations"]
    assert f"over {sum(sum(m) for _, m in E.split_docs('sample', 'val', TOK)):,} tokens" in r.stdout and n > 0

# ----------------------------------------------------------------------------- 5. the offline message


def test_offline_message_gives_ways_that_work(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dest = tmp_path / "2023-04-12_oasst_ready.trees.jsonl.gz"
    with pytest.raises(DataError) as e:
        oasst1.download(dest=dest)
    msg = str(e.value)
    # train.py --data=oasst1 takes no --input: the message names the path it reads, and prepare.py's own flag
    assert f"put it at {dest}," in msg and "python data/oasst1/prepare.py --input=FILE" in msg
    assert "--data=data/oasst1" in msg
    dest.write_bytes(b"another file")
    with pytest.raises(DataError, match="is there, but with sha256"):
        oasst1.download(dest=dest)
    # the advice holds: the release at that path is used without the network ...
    shutil.copy(TREES, dest)
    assert oasst1.download(sha256=file_sha256(dest), dest=dest) == dest
    # ... and prepare.py takes --input=
    oasst1.main([f"--input={TREES}", f"--tokenizer={TOK}", f"--out_dir={tmp_path / 'o'}"])
    assert B.load_meta(tmp_path / "o")["input"] == TREES.name
    # the train path (no --input) says the same, as one line through main
    monkeypatch.setattr(oasst1, "download", partial(oasst1.download, dest=tmp_path / "absent.gz"))
    with pytest.raises(SystemExit) as e:
        oasst1.main([f"--tokenizer={TOK}", f"--out_dir={tmp_path / 'o2'}"])
    assert str(e.value.code).startswith("error: could not download") and "\n" not in str(e.value.code)

# ----------------------------------------------------------------------------- 6. leftovers of killed runs


def test_remove_stale_keeps_live_processes_folders(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f"k.tmp{dead_pid()}", f"k.tmp{live.pid}", f"k.tmp{os.getpid()}", "k", "k.tmpx", "j.tmp1x"]
        for n in names:
            (tmp_path / n).mkdir()
            (tmp_path / n / "train.bin").write_bytes(b"\0\0")
        B.remove_stale(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    finally:
        live.kill()
        live.wait()


def test_prepare_dir_removes_leftovers_and_renames(tmp_path, monkeypatch):
    prepared = tmp_path / "prepared"
    monkeypatch.setattr(B, "prepared_dir", lambda *a, **k: prepared / "key")
    prepared.mkdir()
    stale, live = prepared / f"key.tmp{dead_pid()}", prepared / f"other.tmp{os.getppid()}"
    for d in (stale, live):
        d.mkdir()
    folder = B.prepare_dir("sample", TOK, verbose=False)
    assert folder == prepared / "key" and B.load_meta(folder)["tokenizer_sha256"] == file_sha256(TOK)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in prepared.iterdir()) == ["key", live.name]  # its own tmp renamed away
    assert B.prepare_dir("sample", TOK, verbose=False) == folder  # prepared once

# ----------------------------------------------------------------------------- 7. a tokenizer that is not one

# the last: tiktoken's format, but a BPE that has no token for most bytes, so cannot encode every text
NOT_A_TOKENIZER = {"empty": b"", "garbage": b"not a model\x00\xff", "tiktoken": b"IQ== 0\nIg== 1\nIw== 2\n"}


@pytest.mark.parametrize("kind", list(NOT_A_TOKENIZER))
def test_prepare_refuses_a_tokenizer_that_is_not_one(tmp_path, kind):
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(NOT_A_TOKENIZER[kind])
    one_error(run("data/oasst1/prepare.py", f"--input={TREES}", f"--tokenizer={tok}", f"--out_dir={tmp_path / 'o'}"),
              tok)
    # the train.py path: data/<name>/prepare.py's prepare()
    with pytest.raises(DataError, match=f"^{re.escape(str(tok))}: "):
        sample_prepare.prepare(tokenizer_path=tok, out_dir=tmp_path / "o", verbose=False)
    assert not (tmp_path / "o" / "meta.json").exists()


def test_eval_refuses_a_tokenizer_that_is_not_one(tmp_path):
    base = copy_base(tmp_path)
    (base / "tokenizer.model").write_bytes(NOT_A_TOKENIZER["garbage"])
    (tmp_path / "t.txt").write_text("What is 2+3?")
    one_error(run("eval.py", f"--init_from={base}", f"--text={tmp_path / 't.txt'}", "--device=cpu"),
              base / "tokenizer.model")

# ----------------------------------------------------------------------------- 8. the rest


def test_eval_corrupt_prepared_split(tmp_path):
    sample_prepare.prepare(out_dir=tmp_path, verbose=False)
    val = tmp_path / "val.bin"
    val.write_bytes(val.read_bytes()[:-1])  # a cut file: half a uint16
    one_error(run("eval.py", f"--init_from={BASE}", f"--data={tmp_path}", "--device=cpu"), val)


def test_make_and_pretrain_refuse_an_unwritable_folder_first(tmp_path):
    (tmp_path / "somefile").write_text("")
    one_error(run("data/sample/make.py", tmp_path / "nosuch"), tmp_path / "nosuch")
    r = run("data/sample/pretrain.py", f"--out_dir={tmp_path / 'somefile' / 'base'}", "--steps=1")
    one_error(r, f"--out_dir={tmp_path / 'somefile' / 'base'}")
    assert "step" not in r.stdout  # refused before the training
