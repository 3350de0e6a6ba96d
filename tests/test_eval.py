# eval.py: MMLU files parsed as the authors publish them, the prompt byte for byte, predictions and logits against
# transformers on stories260K, the 4-bit base + adapter against its merged model, perplexity against a direct
# computation, and every bad input naming its file and line.
import csv
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint as C
import eval as E
import model as M
import qlora as Q
from conftest import ROOT, asset, peer
from tokenizer import Tokenizer

# Fields with commas, quotes and newlines, as real MMLU rows have them.
DEV = [
    ["What is 2 + 2, in base 10?", "3", "4", '"four", quoted', "22", "B"],
    ['Which word is "quoted"?', "none", "this one", "that, one", "all", "D"],
    ["A question\nover two lines", "yes", "no", "maybe\nso", "n/a", "A"],
    ["Pick C.", "a", "b", "c", "d", "C"],
    ["Is the sky blue?", "Yes", "No", "Sometimes", "Never", "A"],
]
TEST = {
    "abstract_algebra": [
        ["Find the order of Z_6, the cyclic group.", "2", "3", "6", "12", "C"],
        ['She said "hi", then left.\nWho left?', "she", "he", "they", "nobody", "A"],
        ["Statement 1 | x. Statement 2 | y.", "True, True", "False, False", "True, False", "False, True", "D"],
    ],
    "high_school_physics": [
        ["What falls faster in a vacuum?", "a feather", "a stone", "neither", "both", "C"],
        # long enough that 5 examples do not fit stories260K's 512-token context: fewer shots are used
        ["Once upon a time " * 48 + "what happened?", "a", "b", "c", "d", "B"],
    ],
    "world_religions": [
        ["Which is a, b or c?", "a", "b", "c", "none of a, b, c", "D"],
        ["Answer: A?", "A", "B", "C", "D", "A"],
    ],
}


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def write_mmlu(root, test=TEST, dev=DEV):
    for s, rows in test.items():
        write_csv(root / "test" / f"{s}_test.csv", rows)
        write_csv(root / "dev" / f"{s}_dev.csv", dev)
    return root


def reference_prompt(subject, dev, k, row):
    """The prompt written out from the authors' evaluate.py (format_subject, format_example, gen_prompt)."""
    format_subject = "".join(" " + w for w in subject.split("_"))  # the original's: a space before every word
    s = f"The following are multiple choice questions (with answers) about {format_subject}.\n\n"
    for q, a, b, c, d, ans in dev[:k]:
        s += f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {ans}\n\n"
    q, a, b, c, d, _ = row
    return s + f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def test_parsing_quotes_commas_newlines_and_lines(tmp_path):
    write_mmlu(tmp_path / "data")  # found under data/, as the tarball unpacks
    data = E.load_mmlu(tmp_path)
    assert list(data) == sorted(TEST)
    for s, (dev, questions) in data.items():
        assert dev == DEV
        assert [q.row for q in questions] == TEST[s]
        assert [q.index for q in questions] == list(range(len(TEST[s])))
    lines = [q.line for q in data["abstract_algebra"][1]]
    assert lines == [1, 2, 4]  # the second record spans lines 2-3 (a newline inside its quoted question)
    assert list(E.load_mmlu(tmp_path, ["world_religions"], shots=2)["world_religions"][0]) == DEV[:2]


def test_prompt_byte_for_byte():
    row = ["Which, of these?", '"x"', "y\nz", "w", "v", "B"]
    want = ("The following are multiple choice questions (with answers) about  high school physics.\n\n"
            "What is 2 + 2, in base 10?\nA. 3\nB. 4\nC. \"four\", quoted\nD. 22\nAnswer: B\n\n"
            "Which word is \"quoted\"?\nA. none\nB. this one\nC. that, one\nD. all\nAnswer: D\n\n"
            "Which, of these?\nA. \"x\"\nB. y\nz\nC. w\nD. v\nAnswer:")
    assert E.prompt_text("high_school_physics", DEV, 2, row) == want
    assert E.prompt_text("high_school_physics", DEV, 2, row) == reference_prompt("high_school_physics", DEV, 2, row)
    assert E.prompt_text("virology", DEV, 0, row).startswith("The following are multiple choice questions (with "
                                                             "answers) about  virology.\n\nWhich, of these?")


def test_answer_pieces():
    llama = Tokenizer(asset("llama2_tokenizer", "tokenizer.model"))
    assert E.answer_pieces(llama) == [(319,), (350,), (315,), (360,)]  # ▁A ▁B ▁C ▁D
    tiny = Tokenizer(asset("stories260K", "tokenizer.model"))
    pieces = E.answer_pieces(tiny)
    assert [tiny.sp.id_to_piece(list(p)) for p in pieces] == [["▁", "A"], ["▁B"], ["▁", "C"], ["▁", "D"]]


@pytest.fixture(scope="module")
def stories():
    path = asset("stories260K")
    transformers = peer("transformers", "HF parity not checked")
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def hf_reference(hf, sp, data, shots, ctx):
    """Each question scored independently with transformers: the largest k <= shots whose every letter's full
    sequence fits the context, each letter's continuation ' L' tokenized afresh, log-probabilities summed."""
    out = []
    for s, (dev, questions) in data.items():
        for q in questions:
            for k in range(shots, -1, -1):
                text = reference_prompt(s, dev, k, q.row)
                prompt = [sp.bos_id()] + sp.encode(text)
                fulls = [[sp.bos_id()] + sp.encode(text + " " + letter) for letter in "ABCD"]
                if max(len(f) for f in fulls) - 1 <= ctx:
                    break
            scores, logits = [], []
            with torch.no_grad():
                raw = hf(torch.tensor([prompt])).logits[0, -1].float()
            for f in fulls:
                assert f[:len(prompt)] == prompt
                with torch.no_grad():
                    lp = F.log_softmax(hf(torch.tensor([f[:-1]])).logits[0].float(), -1)  # (len - 1, vocab)
                scores.append(sum(lp[j - 1, f[j]].item() for j in range(len(prompt), len(f))))
                logits.append(raw[f[len(prompt)]].item())
            out.append(dict(pred="ABCD"[max(range(4), key=lambda i: scores[i])], scores=scores, logits=logits, k=k))
    return out


def test_mmlu_matches_transformers_batched_and_one_by_one(tmp_path, stories):
    path, hf = stories
    data = E.load_mmlu(write_mmlu(tmp_path))
    tok = Tokenizer(path / "tokenizer.model")
    model = C.load_model(path).eval()
    ref = hf_reference(hf, tok.sp, data, 5, model.args.max_seq_len)
    assert {r["k"] for r in ref} >= {5} and min(r["k"] for r in ref) < 5  # the long question drops examples
    for batch_size in (1, 4):
        recs = E.mmlu(model, tok, data, 5, batch_size, progress=False)
        assert [(r["subject"], r["index"]) for r in recs] == [(s, i) for s in data for i in range(len(TEST[s]))]
        for r, h in zip(recs, ref):
            assert r["prediction"] == h["pred"] and r["shots"] == h["k"]
            assert max(abs(a - b) for a, b in zip(r["scores"], h["scores"])) < 1e-4
            assert max(abs(a - b) for a, b in zip(r["logits"], h["logits"])) < 1e-4
    subj, over_q, over_s = E.accuracies(recs)
    n_right = [sum(r["prediction"] == r["answer"] for r in recs if r["subject"] == s) for s in TEST]
    assert over_q == sum(n_right) / len(recs)
    assert over_s == sum(n / len(TEST[s]) for n, s in zip(n_right, TEST)) / len(TEST)


def test_single_piece_letters_predict_the_argmax_of_the_next_token_logits(tmp_path):
    """With LLaMA's tokenizer each letter is one token: the prediction is the argmax of the plain (no cache)
    next-token logits at ▁A ▁B ▁C ▁D, and the four logits are those."""
    tok = Tokenizer(asset("llama2_tokenizer", "tokenizer.model"))
    torch.manual_seed(3)
    model = M.Transformer(M.ModelArgs(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=32000,
                                      max_seq_len=1024)).eval()
    data = E.load_mmlu(write_mmlu(tmp_path))
    recs = E.mmlu(model, tok, data, 5, 3, progress=False)
    ids = [319, 350, 315, 360]
    qs = [(s, q) for s, (_, questions) in data.items() for q in questions]
    for r, (s, q) in zip(recs, qs):
        assert r["shots"] == 5
        with torch.no_grad():
            logits = model(torch.tensor([tok.encode(reference_prompt(s, DEV, 5, q.row), bos=True)]))[0, -1]
        assert torch.allclose(torch.tensor(r["logits"]), logits[ids], atol=1e-4)
        lp = F.log_softmax(logits, -1)[ids]
        assert torch.allclose(torch.tensor(r["scores"]), lp, atol=1e-4)
        assert r["prediction"] == "ABCD"[int(logits[ids].argmax())]


def test_4bit_base_and_adapter_predict_as_the_merged_model(tmp_path):
    path = asset("stories260K")
    tok_file = path / "tokenizer.model"
    torch.manual_seed(0)
    m = C.load_quantized(path, r=8, alpha=16, dropout=0.0)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the adapter changes the answers' scores
        for lin in Q.linears_4bit(m).values():
            lin.lora_B.weight.normal_(0, 0.2)
    C.save_quantized(m, tmp_path / "base", tokenizer=tok_file)
    C.save_adapter(m, tmp_path / "adapter")
    diff = C.merge(m, tmp_path / "merged")
    shutil.copy(tok_file, tmp_path / "merged" / "tokenizer.model")
    tok = Tokenizer(tok_file)
    data = E.load_mmlu(write_mmlu(tmp_path / "mmlu"))
    q4 = C.load_for_inference(tmp_path / "base", tmp_path / "adapter").eval()  # as eval.py loads it
    assert all(lin.weight.dtype == torch.uint8 for lin in Q.linears_4bit(q4).values())  # 4-bit, no dense copy
    merged = C.load_for_inference(tmp_path / "merged").eval()
    assert not Q.linears_4bit(merged)
    a = E.mmlu(q4, tok, data, 5, 4, progress=False)
    b = E.mmlu(merged, tok, data, 5, 4, progress=False)
    base = E.mmlu(C.load_model(path).eval(), tok, data, 5, 4, progress=False)
    assert max(abs(x - y) for r, s in zip(a, base) for x, y in zip(r["scores"], s["scores"])) > 1e-2  # it matters
    # a logit moved by d moves a log-probability by <= 2d; a two-piece letter's score by <= 4d; a gap by <= 8d
    compared = 0
    for r, s in zip(a, b):
        top = sorted(r["scores"], reverse=True)
        if top[0] - top[1] > 8 * diff:
            assert r["prediction"] == s["prediction"], (r, s, diff)
            compared += 1
    assert compared >= len(a) - 1, f"only {compared} of {len(a)} questions clear of the merge's difference {diff}"
    print(f"merge's reported difference {diff:.2e}; {compared}/{len(a)} questions compared, all equal")


def test_windows_score_every_token_once_with_context():
    ids, W, S = list(range(1, 40)), 10, 4
    seen = []
    for x, y in E.windows(ids, [True] * len(ids), W, S):
        assert len(x) == len(y) <= W
        for t, target in enumerate(y):
            if target != E.IGNORE:
                seen.append(target)
                assert t + 1 >= min(W - S, ids.index(target))  # tokens of context before the target
    assert seen == ids[1:]  # every token but the BOS, once, in order


def _direct_nll(model, ids, mask, W, S):
    """Target j read with the context the stated rule gives it: from window k = max(0, ceil((j - W) / S)), i.e.
    ids[k*S : j], one forward per target."""
    out = []
    for j in range(1, len(ids)):
        if mask[j]:
            b = S * max(0, math.ceil((j - W) / S))
            with torch.no_grad():
                logits = model(torch.tensor([ids[b:j]]))[0, -1]
            out.append(F.cross_entropy(logits, torch.tensor(ids[j])).item())
    return out


@pytest.mark.parametrize("W,S", [(24, 8), (16, 16), (64, 32)])
def test_perplexity_token_weighted_against_direct(W, S):
    torch.manual_seed(0)
    model = M.Transformer(M.ModelArgs(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=97,
                                      max_seq_len=64)).eval()
    g = torch.Generator().manual_seed(1)
    docs = []
    for n in (61, 9, 30):  # documents of different lengths: token- and document-weighting would differ
        ids = torch.randint(0, 97, (n,), generator=g).tolist()
        docs.append((ids, [j % 3 != 1 for j in range(n)]))  # a loss mask, as in a prepared split
    nll, count = E.perplexity(model, docs, W, S, batch_size=3, progress=False)
    direct = [x for ids, mask in docs for x in _direct_nll(model, ids, mask, W, S)]
    assert count == len(direct)
    assert abs(nll - sum(direct) / len(direct)) < 1e-5


def test_split_perplexity_is_the_training_val_loss(tmp_path):
    """--data: each conversation scored where train.py's loss is; for conversations shorter than the window this is
    exactly the loss of collate's batches (what train.estimate_loss averages, token-weighted)."""
    from data.batching import collate, load_split
    from data.sample import prepare
    tok_file = ROOT / "data" / "sample" / "tokenizer.model"
    prepare.prepare(out_dir=tmp_path, verbose=False)
    docs = E.split_docs(str(tmp_path), "val", tok_file)
    ds = load_split(tmp_path, "val")
    assert len(docs) == len(ds) and int(ds.lengths.max()) <= 64
    torch.manual_seed(0)
    model = M.Transformer(M.ModelArgs(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=ds.meta["vocab_size"],
                                      max_seq_len=64)).eval()
    nll, count = E.perplexity(model, docs, 64, 32, batch_size=64, progress=False)
    x, y = collate([ds[i] for i in range(len(ds))], ds.pad_id, 64)
    with torch.no_grad():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=E.IGNORE, reduction="sum")
    assert count == int((y != E.IGNORE).sum()) and abs(nll - loss.item() / count) < 1e-5
    with pytest.raises(E.InputError, match="prepared with another tokenizer"):
        E.split_docs(str(tmp_path), "val", asset("stories260K", "tokenizer.model"))
    with pytest.raises(E.InputError, match="no split 'test'"):
        E.split_docs(str(tmp_path), "test", tok_file)


BAD = [  # (what, files to write {relative path: rows or None for an empty file}, subjects, where, message)
    ("5 columns", {"test/s_test.csv": [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "A"]]}, None,
     "test/s_test.csv:2", "5 columns, expected 6"),
    ("7 columns", {"test/s_test.csv": [["q\nq", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "d", "e", "A"]]},
     None, "test/s_test.csv:3", "7 columns, expected 6"),
    ("answer not A-D", {"dev/s_dev.csv": DEV + [["q", "a", "b", "c", "d", "E"]]}, None, "dev/s_dev.csv:8",
     "answer 'E' is not one of A, B, C, D"),
    ("empty subject", {"test/s_test.csv": []}, None, "test/s_test.csv", "no questions"),
    ("missing dev", {"dev/s_dev.csv": None}, None, "dev/s_dev.csv", "missing"),
    ("missing test", {}, ["nosuch"], "test/nosuch_test.csv", "missing"),
]


@pytest.mark.parametrize("what,files,subjects,where,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_file_and_line(tmp_path, what, files, subjects, where, message):
    root = write_mmlu(tmp_path, {"s": [["q", "a", "b", "c", "d", "A"]], "t": [["q", "a", "b", "c", "d", "B"]]})
    for rel, rows in files.items():
        if rows is None:
            (root / rel).unlink()
        else:
            write_csv(root / rel, rows)
    with pytest.raises(E.InputError) as e:
        E.load_mmlu(root, subjects)
    assert str(e.value).startswith(f"{root / where}") and message in str(e.value), str(e.value)
    bad = []  # --skip_bad: the row (or the subject) is left out and counted, the rest still evaluated
    data = E.load_mmlu(root, subjects or None, bad=bad)
    assert len(bad) == 1 and bad[0].startswith(f"{root / where}") and message in bad[0]
    if subjects is None:
        assert "t" in data and len(data["t"][1]) == 1


def test_question_too_long_for_the_context(tmp_path):
    tok = Tokenizer(asset("stories260K", "tokenizer.model"))
    model = M.Transformer(M.ModelArgs(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=512,
                                      max_seq_len=128)).eval()
    root = write_mmlu(tmp_path, {"s": [["short?", "a", "b", "c", "d", "A"], ["long " * 60, "a", "b", "c", "d", "B"]]})
    data = E.load_mmlu(root)
    with pytest.raises(E.InputError, match=r"s_test.csv:2: \d+ tokens with no examples, longer than the model's "
                                           r"context \(128\)"):
        E.mmlu(model, tok, data, 5, progress=False)
    bad = []
    recs = E.mmlu(model, tok, data, 5, bad=bad, progress=False)
    assert len(bad) == 1 and [r["index"] for r in recs] == [0] and recs[0]["shots"] < 5


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def test_cli_error_names_file_and_line(tmp_path):
    root = write_mmlu(tmp_path, {"s": [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "d", "e", "A"]]})
    r = _run(f"--init_from={asset('stories260K')}", f"--mmlu={root}")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == f"error: {root / 'test' / 's_test.csv'}:2: 7 columns, expected 6 " \
                                                "(question,A,B,C,D,answer)"


def test_cli_mmlu_and_perplexity(tmp_path):
    root = write_mmlu(tmp_path / "mmlu")
    (tmp_path / "story.txt").write_text("Once upon a time, there was a little girl named Lily. " * 12)
    out = tmp_path / "preds.jsonl"
    r = _run(f"--init_from={asset('stories260K')}", f"--mmlu={root}", "--subjects=abstract_algebra,world_religions",
             f"--out={out}", f"--text={tmp_path / 'story.txt'}", "--window=64", "--stride=32", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert "MMLU 5-shot, 2 subjects, 5 questions:" in r.stdout
    assert "average over questions:" in r.stdout and "average over subjects:" in r.stdout
    assert "window 64, stride 32" in r.stdout and "perplexity on" in r.stdout
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["subject"], x["index"]) for x in lines] == [("abstract_algebra", i) for i in range(3)] + \
        [("world_religions", i) for i in range(2)]
    assert all(set(x) >= {"prediction", "answer", "logits", "scores"} and len(x["logits"]) == 4 for x in lines)
