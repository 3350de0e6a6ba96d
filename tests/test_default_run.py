# The default run end to end: the bundled pretrained base (data/sample/pretrain.py) and the default fine-tune on it.
# The pretraining text never holds a held-out prompt, a short pretraining run repeats itself bit for bit, the
# committed base knows the held-out facts in plain form, and the default fine-tune answers held-out prompts
# in the chat format, through sample.py as the README shows it.
import json
import random
import re
import subprocess
import sys
from collections import Counter

import torch

import checkpoint as C
import qlora as Q
from conftest import ROOT
from data.sample import pretrain as P
from tokenizer import Tokenizer

BASE = ROOT / "data" / "sample" / "base"
# held-out prompts (the val split's), one per task, with their answers; the README's sample commands use them
README_PROMPTS = {"What is 15+37?": "52", "Reverse QVLMVY": "YVMLVQ", "Count J in OJGJGJBJL": "4"}


def tokenizer():
    return Tokenizer(P.prepare.DEFAULTS["tokenizer_path"])


def test_pretraining_text_holds_no_heldout_prompt():
    held = P.heldout()
    assert min(Counter(kind for kind, _ in held).values()) >= 100  # enough for per-task accuracy
    assert {f"What is {x[0]}+{x[1]}?" if k == "add" else f"Reverse {x}" if k == "reverse" else f"Count {x[0]} in {x[1]}"
            for k, x in held} >= README_PROMPTS.keys()
    pairs, words = P.forbidden(held)
    sp, rng = tokenizer(), random.Random(P.SEED)
    text = " ".join(sp.decode(row) for _ in range(20) for row in P.batch(rng, sp, pairs, words).tolist())
    assert "###" not in text and "Human" not in text and "Assistant" not in text  # plain text, never the chat format
    sums = [tuple(map(int, s)) for s in re.findall(r"(\d+)\+(\d+)=(\d+)\.", text)]
    revs = re.findall(r"([A-Z]+) reversed is ([A-Z]+)\.", text)
    counts = re.findall(r"count of ([A-Z]) in ([A-Z]+) is (\d)\.", text)
    assert len(sums) > 1000 and len(revs) > 500 and len(counts) > 500, (len(sums), len(revs), len(counts))
    assert all(a + b == c for a, b, c in sums) and all(w[::-1] == r for w, r in revs) and \
        all(w.count(t) == int(k) for t, w, k in counts)  # the facts are true
    assert not {(a, b) for a, b, _ in sums} & pairs  # no held-out sum, in either order
    assert not ({w for w, _ in revs} | {w for _, w, _ in counts}) & words  # no held-out word, nor its reverse


def test_short_pretraining_repeats_itself(tmp_path):
    """Two invocations (a process and a call) of a 3-step pretraining write the same bytes: the script is
    deterministic, so the committed base is what `python data/sample/pretrain.py` makes (on this CPU build)."""
    p = subprocess.run([sys.executable, "data/sample/pretrain.py", "--steps=3", "--evaluate=false",
                        f"--out_dir={tmp_path / 'a'}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    threads = torch.get_num_threads()
    try:
        losses = P.pretrain(tmp_path / "b", steps=3, log_every=0, evaluate=False)
    finally:
        torch.set_num_threads(threads)  # pretrain pins the thread count for the process
    assert f"final loss {sum(losses) / 3:.4f}" in p.stdout
    for f in ("model.safetensors", "config.json", "tokenizer.model"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # the committed base is this script's model: same architecture, same 4-bit format, same tokenizer
    assert (tmp_path / "a" / "config.json").read_text() == (BASE / "config.json").read_text()
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (BASE / "tokenizer.model").read_bytes()


def test_bundled_base_knows_heldout_facts():
    """The committed 4-bit base answers held-out prompts asked in plain text ("15+37=" -> "52"), each task >= 90%:
    the knowledge the fine-tune routes to is there, and generalizes (none of these was in its training text).
    The first 60 held-out prompts of each task (pretrain.py's own run checks them all: 100% each)."""
    qc = C.is_bnb_4bit(BASE)
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"]
    assert sum(f.stat().st_size for f in BASE.iterdir()) < 2_000_000  # a few MB at most, as committed
    base = C.load_quantized(BASE, r=0).eval()
    assert sum(m.weight.numel() * 2 for m in Q.linears_4bit(base).values()) < 5_000_000  # a few M parameters
    held = P.heldout()
    first = [h for i, h in enumerate(held) if sum(k == h[0] for k, _ in held[:i]) < 60]
    acc = P.fact_accuracy(base, tokenizer(), first)
    print(f"committed base, held-out facts: {acc}")
    assert min(acc.values()) >= 0.9, acc


def test_default_run_answers_heldout_prompts(tmp_path):
    """The README's default run end to end, as a new user runs it: `python train.py` (only its out_dir moved) on the
    bundled base; before it the base answers no chat prompt, after it at least 90% of the 100 held-out prompts of
    every task (issue 17's bar), and the README's sample commands print the README's answers. The whole run, not a
    shortened one: at 300 steps the add task is at ~82%, and which prompts it misses depends on the CPU's low bits."""
    p = subprocess.run([sys.executable, "train.py", f"--out_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    line = next(l for l in p.stdout.splitlines() if l.startswith("held-out answers: "))
    print(line)
    per_task = {t: (int(a), int(b)) for t, a, b in re.findall(r"(\w+) (\d+)% -> (\d+)% of 100", line)}
    assert per_task.keys() == {"What", "Reverse", "Count"}, line
    # measured (two CPUs): add 92-97%, reverse 100%, count 99-100%
    assert all(before <= 5 and after >= 90 for before, after in per_task.values()), line
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(BASE)
    for prompt, answer in README_PROMPTS.items():
        s = subprocess.run([sys.executable, "sample.py", f"--init_from={BASE}", f"--adapter={tmp_path / 'adapter'}",
                            f"--prompt={prompt}"], cwd=ROOT, capture_output=True, text=True)
        assert s.returncode == 0, s.stderr[-2000:]
        assert s.stdout.strip() == f"### Human: {prompt}### Assistant: {answer}", s.stdout
