# Hostile input to sample.py and bench.py: every mistake a user can make with a flag or a file is one line on stderr,
# `error: ...` naming the flag or the file, and a non-zero exit, never a traceback. Each script runs as a user runs
# it, in its own process; none of bench.py's sections runs (each case is refused before the first one).
import io
import json
import re
import subprocess
import sys

import pytest
import torch

import checkpoint as C
import model as M
import sample
from conftest import ROOT, asset

BASE = ROOT / "data" / "sample" / "base"  # the bundled pretrained base: 360 ids, 4-bit weights
SAMPLE_TOK = BASE / "tokenizer.model"


def run(script, *argv):
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, timeout=300)


def one_line_error(r, message):
    """The run failed with exactly one line, `error: <message...>` (a regex), and no traceback."""
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode != 0 and out == "" and "Traceback" not in err, (r.returncode, out, err)
    assert len(err.strip().splitlines()) == 1 and re.match("error: " + message, err), err
    return err


def base_copy(path, tokenizer=None):
    """data/sample/base's config and weights in `path`, with the given tokenizer.model bytes (its own by default)."""
    path.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (path / f).write_bytes((BASE / f).read_bytes())
    (path / "tokenizer.model").write_bytes(SAMPLE_TOK.read_bytes() if tokenizer is None else tokenizer)
    return path


def tiny_dir(path, head=None, **kw):
    """A Hugging Face folder of a random tiny fp32 LLaMA with the sample tokenizer; head(weight) edits lm_head."""
    args = M.ModelArgs(**{**dict(dim=32, n_layers=1, n_heads=2, vocab_size=360, hidden_dim=48, max_seq_len=64,
                                 norm_eps=1e-5), **kw})
    model = M.Transformer(args)
    if head:
        with torch.no_grad():
            head(model.lm_head.weight)
    path.mkdir(parents=True)
    C.save_safetensors(path / "model.safetensors", model.state_dict())
    (path / "config.json").write_text(json.dumps(C.hf_config(args, torch.float32)))
    (path / "tokenizer.model").write_bytes(SAMPLE_TOK.read_bytes())
    return path

# ----------------------------------------------------------------------------- sample.py


@pytest.mark.parametrize("seed", [2**63, 2**64, -1])
def test_sample_seed_outside_int64(seed):
    one_line_error(run("sample.py", f"--init_from={BASE}", f"--seed={seed}"),
                   re.escape(f"--seed must be a whole number from 0 to 2**63-1, not {seed}"))


def test_sample_padded_vocab_never_samples_past_the_tokenizer(tmp_path):
    # 400 embedding rows, 360 token ids (real models pad their vocabulary): the padded rows of the head are +-100 x
    # random, the real ones 0, so for any hidden state some padded id has the top logit. Neither greedy nor sampling
    # may pick it: the tokenizer cannot decode it. The greatest seed is a valid one.
    def head(w):
        w.zero_()
        w[360:380] = 100 * torch.randn(20, w.size(1))
        w[380:] = -w[360:380]
    d = tiny_dir(tmp_path / "padded", head, vocab_size=400)
    for flags in (["--temperature=0"], ["--temperature=1", "--top_p=1", f"--seed={2**63 - 1}"]):
        r = run("sample.py", f"--init_from={d}", "--raw", "--prompt=What", "--max_new_tokens=8", *flags)
        assert r.returncode == 0 and r.stderr == b"" and r.stdout.startswith(b"What"), r.stderr.decode()


def test_sample_refuses_tokenizer_files_that_are_not_the_models(tmp_path):
    empty = base_copy(tmp_path / "empty", b"") / "tokenizer.model"
    one_line_error(run("sample.py", f"--init_from={empty.parent}"), re.escape(str(empty)))
    llama3 = asset("llama3_tokenizer", "tokenizer.model")  # a real tokenizer (Llama 3's, 128,256 ids): not this model's
    tiktoken = base_copy(tmp_path / "tiktoken", llama3.read_bytes()) / "tokenizer.model"
    one_line_error(run("sample.py", f"--init_from={tiktoken.parent}"),
                   re.escape(f"{tiktoken}: 128256 token ids, the model in {tiktoken.parent} has only 360"))


def test_sample_with_a_tokenizer_without_bos(tmp_path):
    import sentencepiece as spm
    proto = io.BytesIO()  # a real sentencepiece model, trained with no BOS piece: prompts start without one (Qwen's way)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["what is twelve plus thirty four"] * 20),
                                   model_writer=proto, vocab_size=30, bos_id=-1, model_type="char", minloglevel=2)
    d = base_copy(tmp_path / "nobos", proto.getvalue())
    r = run("sample.py", f"--init_from={d}", "--raw", "--prompt=what", "--max_new_tokens=3")
    assert r.returncode == 0 and r.stdout.startswith(b"what"), r.stderr.decode()
    with pytest.raises(SystemExit) as e:  # in this process: sys.exit prints the one line
        sample.main([f"--init_from={d}", "--raw", "--prompt="])
    assert e.value.code.startswith(f"error: --prompt is empty and {d / 'tokenizer.model'} puts no BOS first")


def test_sample_reports_a_tokenizer_error(monkeypatch, capsys):
    def refuse(path):  # tokenizer.Tokenizer's way of refusing a file it cannot read
        raise sample.TokenizerError(f"{path}: not a sentencepiece model")
    monkeypatch.setattr(sample, "Tokenizer", refuse)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--init_from={BASE}"])
    assert e.value.code == f"error: {SAMPLE_TOK}: not a sentencepiece model"  # sys.exit prints it as one line


def test_sample_logits_that_overflow_or_are_nan(tmp_path):
    # a temperature so small that logits / temperature overflow: torch.multinomial crashed on the NaN it gave
    one_line_error(run("sample.py", f"--init_from={BASE}", "--temperature=1e-45"),
                   re.escape("--temperature=1e-45: the logits divided by it overflow; use 0 for greedy"))
    d = tiny_dir(tmp_path / "nan", lambda w: w.fill_(float("nan")))  # broken weights: named by their folder
    one_line_error(run("sample.py", f"--init_from={d}", "--temperature=0.7", "--max_new_tokens=8"),
                   re.escape(str(d)) + ".*NaN")


def test_sample_prompt_not_utf8():
    # bytes that are not UTF-8 reach sys.argv as lone surrogates, which sentencepiece's encode refused with a crash
    one_line_error(run("sample.py", f"--init_from={BASE}", b"--prompt=\xff\xfe caf\xe9"),
                   "--prompt is not valid UTF-8 text")


def test_sample_gpu_index_past_the_last(monkeypatch, capsys):
    monkeypatch.setattr(sample.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sample.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--init_from={BASE}", "--device=cuda:3"])
    assert e.value.code == "error: --device=cuda:3: no such GPU; this machine has 1, numbered from 0"


@pytest.mark.parametrize("flags, message", [
    (["--max_new_tokens=0"], "--max_new_tokens must be at least 1, not 0"),
    (["--max_new_tokens=-3"], "--max_new_tokens must be at least 1, not -3"),
    (["--temperature=-0.5"], r"--temperature must be a finite number >= 0"),
    (["--temperature=nan"], r"--temperature must be a finite number >= 0"),
    (["--top_k=0"], "unknown setting '--top_k=0'"),  # no such flag: nucleus sampling is --top_p
    (["--seed=1.5"], "--seed takes an? int, not '1.5'"),
    (["--prompt=" + "count the letters " * 200], r"--prompt is \d+ tokens, and the model's context \(max_seq_len\) "
                                                  "is 256"),
    (["--adapter={tmp}"], "{tmp}: no adapter_config.json"),  # a folder without adapter files
    (["--init_from={tmp}/file"], "--init_from={tmp}/file: no such directory"),  # a file, not a model folder
])
def test_sample_flags_one_line(tmp_path, flags, message):
    (tmp_path / "file").write_text("not a model")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    one_line_error(run("sample.py", f"--init_from={BASE}", *flags), message.replace("{tmp}", re.escape(str(tmp_path))))

# ----------------------------------------------------------------------------- bench.py


@pytest.mark.parametrize("flags, message", [
    (["--section=nope"], "--section must be one of quant, .*, compile, not 'nope'"),
    (["--bogus"], "unknown setting '--bogus'"),
    (["--threads=two"], "--threads takes an? int, not 'two'"),
    (["--threads=-1"], r"--threads must be from 0 \(the idle cores\) to \d+"),
    (["--threads=1000000"], r"--threads must be from 0 .* to \d+ \(this machine's cores\), not 1000000"),  # a segfault
    (["--paper", "--section=quant"], "--paper is --section=paper"),
    (["--out={tmp}"], "--out={tmp}: a directory"),
    (["--out={tmp}/file/RESULTS.md"], "--out={tmp}/file/RESULTS.md: {tmp}/file is a file"),
    (["--out={tmp}/binary.md"], "--out={tmp}/binary.md: cannot read the results file"),
    (["--section=paper", "--models={tmp}/none"], "--models: {tmp}/none is not a Hugging Face model folder"),
    (["--models={tmp}/badconfig"], "{tmp}/badconfig/config.json: "),  # the default sections include paper
    (["--section=paper", "--models={tmp}/emptytok"], "{tmp}/emptytok/tokenizer.model"),
    (["--section=paper", "--models=,"], "--models=,: names no folder"),
    (["--impl=ours"], r"--impl \(internal to the step and fsdp sections\) needs --ckpt=DIR"),
    (["--impl=ours", "--ckpt={tmp}/none"], "{tmp}/none: "),
    (["--dist=ddp", "--ckpt={tmp}"], r"--dist \(internal to the fsdp section\) runs as one rank under torchrun"),
    (["--steps=0", "--impl=ours", "--ckpt={tmp}"], "--steps must be at least 1, not 0"),
])
def test_bench_flags_one_line(tmp_path, flags, message):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "binary.md").write_bytes(b"\xff\xfe\x00results")
    base_copy(tmp_path / "badconfig")
    (tmp_path / "badconfig" / "config.json").write_text('{"hidden_size": 128}')
    base_copy(tmp_path / "emptytok", b"")
    flags = [f"--out={tmp_path / 'RESULTS.md'}", *(f.replace("{tmp}", str(tmp_path)) for f in flags)]
    one_line_error(run("bench.py", *flags), message.replace("{tmp}", re.escape(str(tmp_path))))
    assert not (tmp_path / "RESULTS.md").exists()  # refused before any section ran
