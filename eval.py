"""
Evaluate a model as it was trained: the 4-bit base dequantized on the fly plus its LoRA adapter (no 16-bit copy is
ever made), on MMLU 5-shot, the QLoRA paper's measure of knowledge (Hendrycks et al. 2021), and on perplexity.

  python eval.py --init_from=/path/to/llama-7b --adapter=out/adapter --mmlu=/path/to/mmlu       # MMLU, 5-shot
  python eval.py --init_from=out/base --adapter=out/adapter --text=notes.txt                     # perplexity
  python eval.py --init_from=data/sample/base --adapter=out/adapter --data=sample --split=val    # perplexity

MMLU is read as its authors publish it (github.com/hendrycks/test, data.tar): dev/<subject>_dev.csv holds the 5
few-shot examples, test/<subject>_test.csv the questions, rows question,A,B,C,D,answer with CSV quoting and no
header; --mmlu may also name the folder above data/, as the tarball unpacks. The prompt is the one of the authors'
evaluate.py, byte for byte, and the prediction the argmax over the four answer letters of the next-token logits.
Perplexity is token-weighted (total negative log-likelihood over all scored tokens) with a sliding window.
"""
import csv
import io
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:  # before torch loads OpenMP: README, "A busy CPU"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint as C
import configurator
from data.batching import DATA, IGNORE, load_meta, load_split, prepare_dir
from data.oasst1.prepare import DataError
from tokenizer import Tokenizer, TokenizerError, find_tokenizer, tokenizer_sha256

LETTERS = ("A", "B", "C", "D")


@dataclass
class Config:
    init_from: str = ""            # base model directory (with its tokenizer); required
    adapter: str = ""              # a PEFT-format LoRA adapter directory, e.g. out/adapter; "" = none
    quantize: str = ""             # nf4 | fp4: load a 16-bit base in 4 bits; "" = as stored
    # MMLU
    mmlu: str = ""                 # MMLU folder with dev/ and test/ (or data/dev, data/test); "" = no MMLU
    shots: int = 5                 # few-shot examples per prompt (the paper: 5)
    subjects: str = ""             # comma-separated subjects; "" = every one in test/
    out: str = ""                  # write one JSON line per MMLU question to this file; "" = none
    # perplexity
    text: str = ""                 # perplexity on this UTF-8 text file; "" = none
    data: str = ""                 # perplexity on a prepared split: NAME under data/ (prepared on first use, as
                                   # train.py does) or a prepared folder; "" = none
    split: str = "val"             # --data's split
    train_on: str = "assistant"    # assistant | all: with --data=NAME, the tokens train.py's --train_on put in the
                                   # loss are the ones scored
    window: int = 0                # perplexity window in tokens (0: the model's context)
    stride: int = 0                # perplexity stride in tokens (0: half the window)
    # both
    batch_size: int = 8            # rows (MMLU) or windows (perplexity) per forward pass
    skip_bad: bool = False         # skip and count bad rows and subjects, not stop
    device: str = "auto"           # auto (cuda if available, else cpu) | cpu | cuda | cuda:N


class InputError(ValueError):
    """Bad input: the message starts with the file (and line) at fault."""


def _bad(msg, bad):
    """Raise InputError(msg), or under --skip_bad (bad is a list) record it and go on."""
    if bad is None:
        raise InputError(msg)
    bad.append(msg)

# -----------------------------------------------------------------------------
# MMLU files and prompts


@dataclass
class Question:
    subject: str
    path: Path  # the test file
    index: int  # its record's position in the test file, 0-based (bad records skipped keep their number)
    line: int  # the record's first line in the file (a quoted field may span several lines)
    row: list  # [question, A, B, C, D, answer]


def read_text(path):
    """A file's text, or InputError naming the line where it stops being UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 ({e.reason})") from None


def read_rows(path, bad=None):
    """The records of one MMLU csv as [(index, line, row)]. A record without 6 fields or with an answer that is
    not A-D raises InputError naming path:line, or under --skip_bad is left out and counted."""
    text = read_text(path)
    rows, reader, line, index = [], csv.reader(io.StringIO(text, newline="")), 1, 0
    try:
        for rec in reader:
            if rec:  # a blank line holds no record (pandas, the original's reader, skips it too)
                if len(rec) != 6:
                    _bad(f"{path}:{line}: {len(rec)} columns, expected 6 (question,A,B,C,D,answer)", bad)
                elif rec[5] not in LETTERS:
                    _bad(f"{path}:{line}: answer {rec[5]!r} is not one of A, B, C, D", bad)
                else:
                    rows.append((index, line, rec))
                index += 1
            line = reader.line_num + 1  # where the next record starts
    except csv.Error as e:  # e.g. a quote left open at the end of the file
        raise InputError(f"{path}:{line}: {e}") from None
    return rows


def mmlu_root(folder):
    """The folder holding test/ and dev/: the one given, or its data/ (the release tarball's layout)."""
    for root in (Path(folder), Path(folder) / "data"):
        if (root / "test").is_dir():
            return root
    raise InputError(f"{folder}: no test/ or data/test/ folder; expected MMLU as published: "
                     "test/<subject>_test.csv and dev/<subject>_dev.csv")


def load_mmlu(folder, subjects=None, shots=5, bad=None):
    """{subject: (the first `shots` dev rows, [Question])}, every subject of test/ by default (sorted, as the
    original). A missing file, a subject without questions or with fewer dev examples than shots raises
    InputError, or under --skip_bad drops the subject (and bad rows only the row)."""
    root = mmlu_root(folder)
    names = subjects or sorted(p.name.removesuffix("_test.csv") for p in (root / "test").glob("*_test.csv"))
    if not names:
        raise InputError(f"{root / 'test'}: no <subject>_test.csv file")
    out = {}
    for s in names:
        test_path, dev_path = root / "test" / f"{s}_test.csv", root / "dev" / f"{s}_dev.csv"
        try:
            for p in [test_path] + [dev_path] * (shots > 0):
                if not p.is_file():
                    raise InputError(f"{p}: missing (subject {s!r})")
            dev = read_rows(dev_path, bad) if shots > 0 else []
            test = [Question(s, test_path, i, line, row) for i, line, row in read_rows(test_path, bad)]
            if not test:
                raise InputError(f"{test_path}: no questions (subject {s!r} is empty)")
            if len(dev) < shots:
                raise InputError(f"{dev_path}: {len(dev)} examples, --shots={shots} needs {shots}")
        except InputError as e:
            if bad is None:
                raise
            bad.append(f"{e} (subject skipped)")
            continue
        out[s] = ([row for _, _, row in dev[:shots]], test)
    return out


def format_subject(subject):
    """'abstract_algebra' -> ' abstract algebra': the original puts a space before every word, so its header reads
    'about  abstract algebra.' with two spaces. Kept: the published numbers (QLoRA's included) used it."""
    return "".join(" " + w for w in subject.split("_"))


def format_example(row, with_answer=True):
    question, *choices, answer = row
    s = question + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices)) + "\nAnswer:"
    return s + f" {answer}\n\n" if with_answer else s


def prompt_text(subject, dev, k, row):
    """The original's prompt: a header, the first k dev examples with their answers, the question ending 'Answer:'."""
    return (f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
            + "".join(format_example(r) for r in dev[:k]) + format_example(row, with_answer=False))


def answer_pieces(tok):
    """The token ids of ' A', ' B', ' C', ' D' as the tokenizer splits them after 'Answer:' (sentencepiece cuts at
    spaces before merging pieces, a byte-level BPE's pre-tokenizer makes ' A' a piece of its own: what follows
    'Answer:' does not depend on the text before it). Llama 3's: one token each, 362 426 356 423.

    LLaMA's tokenizer gives one piece each, [(319,), (350,), (315,), (360,)] = ▁A ▁B ▁C ▁D: the tokens a 5-shot
    prompt teaches the model to write next, the same ids as QLoRA's own MMLU code (tokenizer("A") with LLaMA's
    prefix space), and the prediction is the argmax of the next-token logits over them. A small vocabulary may split
    a letter (stories260K: ' A' = ▁ A but ' B' = ▁B); a letter's score is then the log-probability of all its
    pieces, which for single pieces orders the letters exactly as their logits do."""
    base = tok.encode("Answer:")
    pieces = []
    for letter in LETTERS:
        ids = tok.encode(f"Answer: {letter}")
        if ids[:len(base)] != base or len(ids) == len(base):
            raise InputError(f"{tok.path}: ' {letter}' after 'Answer:' merges into the text before it "
                             f"({base} -> {ids}); cannot read the letter's probability")
        pieces.append(tuple(ids[len(base):]))
    return pieces

# -----------------------------------------------------------------------------
# the model: next-token logits for a batch of rows that share a prefix


@torch.no_grad()
def next_logits(model, rows):
    """rows: B token-id lists -> (B, vocab) fp32 logits for the token after each row's last.

    The rows' common prefix (a subject's few-shot examples) runs once into the KV cache, copied to every row; the
    rest of each row follows, padded on the right. Attention is causal, so no real token ever attends to the
    padding after it and positions need no shift; each row's logits are read at its own last real token."""
    dev = model.model.norm.weight.device
    B, shortest = len(rows), min(len(r) for r in rows)
    P = 0  # common prefix, leaving each row at least one token of its own
    while P < shortest - 1 and all(r[P] == rows[0][P] for r in rows):
        P += 1
    T = max(len(r) for r in rows) - P
    x = torch.tensor([r[P:] + [0] * (T - len(r) + P) for r in rows], device=dev)  # (B, T), any id pads
    try:
        kv = []
        if P:
            model.setup_cache(1, P)
            model(torch.tensor([rows[0][:P]], device=dev), torch.arange(P, device=dev))
            kv = [(layer.self_attn.cache.k, layer.self_attn.cache.v) for layer in model.model.layers]
        model.setup_cache(B, P + T)
        for layer, (k, v) in zip(model.model.layers, kv):  # (1, nkv, P, hd) broadcast to the B rows
            layer.self_attn.cache.k[:, :, :P] = k
            layer.self_attn.cache.v[:, :, :P] = v
        logits = model(x, torch.arange(P, P + T, device=dev))  # (B, T, vocab)
    finally:
        model.clear_cache()
    last = torch.tensor([len(r) - P - 1 for r in rows], device=dev)
    return logits[torch.arange(B, device=dev), last].float()


def mmlu(model, tok, data, shots=5, batch_size=8, bad=None, progress=True):
    """Accuracy on {subject: (dev, questions)}. Returns a list of records, one per question: subject, index,
    prediction, answer, the four logits (next-token logits at each letter's first piece), the four scores (each
    letter's log-probability; the prediction is their argmax), and the shots used."""
    pieces = answer_pieces(tok)
    # one row per question and distinct proper prefix of the pieces: () alone for LLaMA, () and (▁,) for stories260K
    contexts = sorted({p[:j] for p in pieces for j in range(len(p))}, key=len)
    longest = max(len(c) for c in contexts)
    ctx = model.args.max_seq_len
    questions, rows = [], []
    for subject, (dev, test) in data.items():
        for q in test:
            for k in range(shots, -1, -1):  # the original's rule: keep the first k examples, k falling until it fits
                ids = tok.encode(prompt_text(subject, dev, k, q.row), bos=tok.add_bos)  # as the family's tokenizer
                if len(ids) + longest <= ctx:
                    break
            else:
                _bad(f"{q.path}:{q.line}: {len(ids) + longest} tokens with no examples, longer than "
                     f"the model's context ({ctx})", bad)
                continue
            rows += [(len(questions), ci, ids + list(c)) for ci, c in enumerate(contexts)]
            questions.append((q, k))
    # log-probabilities of every piece after every context, gathered batch by batch (the vocab is not kept)
    wanted = sorted({i for p in pieces for i in p})
    col = {t: j for j, t in enumerate(wanted)}
    logp = torch.zeros(len(questions), len(contexts), len(wanted))
    first = torch.zeros(len(questions), len(LETTERS))
    # batches of similar length sharing their few-shot prefix: by subject, shots, then length
    rows.sort(key=lambda r: (questions[r[0]][0].subject, -questions[r[0]][1], len(r[2])))
    bar = tqdm(total=len(rows), desc="mmlu", unit="row", disable=None if progress else True)
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        logits = next_logits(model, [r[2] for r in chunk]).cpu()  # (b, vocab)
        lp = F.log_softmax(logits, dim=-1)
        for (qi, ci, _), lg, l in zip(chunk, logits, lp):
            logp[qi, ci] = l[wanted]
            if ci == 0:  # the context () row: the plain next token after "Answer:"
                first[qi] = lg[[p[0] for p in pieces]]
        bar.update(len(chunk))
    bar.close()
    records = []
    for qi, (q, k) in enumerate(questions):
        scores = [sum(logp[qi, contexts.index(p[:j]), col[p[j]]].item() for j in range(len(p))) for p in pieces]
        pred = LETTERS[max(range(len(LETTERS)), key=lambda i: scores[i])]  # the first of equal maxima, as argmax
        records.append(dict(subject=q.subject, index=q.index, prediction=pred, answer=q.row[5],
                            logits=first[qi].tolist(), scores=scores, shots=k))
    return records


def accuracies(records):
    """(per-subject accuracy, average over questions, average over subjects)."""
    per = {}
    for r in records:
        per.setdefault(r["subject"], []).append(r["prediction"] == r["answer"])
    subj = {s: sum(v) / len(v) for s, v in per.items()}
    n = sum(len(v) for v in per.values())
    return subj, sum(sum(v) for v in per.values()) / max(n, 1), sum(subj.values()) / max(len(subj), 1)

# -----------------------------------------------------------------------------
# perplexity


def windows(ids, mask, window, stride):
    """One document -> [(inputs, targets)], each at most `window` tokens. Window i reads ids[i*stride:][:window] and
    scores only the targets no earlier window scored (the first window all of its own), so every token is scored
    once, and every token past the first window with at least window - stride tokens of context. Target j is
    scored when mask[j] (ids[0], the BOS, never is)."""
    out, scored, n = [], 1, len(ids)
    for b in range(0, max(n - 1, 0), stride):
        e = min(b + window, n - 1)  # inputs ids[b:e] predict ids[b+1:e+1]
        out.append((ids[b:e], [ids[j] if j >= scored and mask[j] else IGNORE for j in range(b + 1, e + 1)]))
        scored = e + 1
        if e == n - 1:
            break
    return out


@torch.no_grad()
def perplexity(model, docs, window, stride, batch_size=8, progress=True):
    """docs: [(ids, mask)] -> (mean negative log-likelihood per scored token, number of scored tokens):
    token-weighted over all documents. Windows are batched padded on the right (causal: the pads come after
    every real token, and their targets are IGNORE)."""
    dev = model.model.norm.weight.device
    rows = sorted((w for ids, mask in docs for w in windows(ids, mask, window, stride)), key=lambda w: -len(w[0]))
    nll, count = 0.0, 0
    for b in tqdm(range(0, len(rows), batch_size), desc="perplexity", unit="batch", disable=None if progress else True):
        chunk = rows[b:b + batch_size]
        T = len(chunk[0][0])
        x = torch.tensor([w[0] + [0] * (T - len(w[0])) for w in chunk], device=dev)
        y = torch.tensor([w[1] + [IGNORE] * (T - len(w[1])) for w in chunk], device=dev)
        logits = model(x)  # (b, T, vocab)
        for lg, t in zip(logits, y):  # one row at a time in fp32: the batch's logits are not copied whole
            nll += F.cross_entropy(lg.float(), t, ignore_index=IGNORE, reduction="sum").item()
        count += int((y != IGNORE).sum())
    return nll / max(count, 1), count


def text_docs(path, tok):
    """A text file as one document: BOS (where the tokenizer puts one) + its tokens, every token scored."""
    text = read_text(path)
    ids = tok.encode(text, bos=tok.add_bos)
    return [(ids, [True] * len(ids))]


def split_docs(name, split, tokenizer_path, train_on="assistant"):
    """The conversations of a prepared split, each scored where train.py's loss is (its loss mask: the replies, by
    default), so exp(train's val loss) is comparable. name: a dataset under data/, read from the folder train.py
    prepares for this tokenizer and train_on (prepared now if it is not yet), or a folder with meta.json."""
    if name.isidentifier() and (DATA / name / "prepare.py").is_file():
        try:
            folder = prepare_dir(name, tokenizer_path, train_on)
        except OSError as e:  # DataError, a ValueError, passes: it names its file
            raise InputError(f"{DATA / name / 'prepared'}: cannot prepare the data there ({e})") from None
    elif Path(name).is_dir():
        folder = Path(name)
    else:
        raise InputError(f"--data={name}: neither a dataset under data/ (with a prepare.py) nor a prepared folder")
    meta = folder / "meta.json"
    if not meta.exists():
        raise InputError(f"{meta}: missing; prepare the data first (python data/<name>/prepare.py, or train.py)")
    if load_meta(folder).get("tokenizer_sha256") != tokenizer_sha256(tokenizer_path):
        raise InputError(f"{meta}: prepared with another tokenizer than {tokenizer_path}; prepare it again")
    for suffix in (".bin", ".mask.bin", ".idx.bin"):
        if not (folder / f"{split}{suffix}").exists():
            raise InputError(f"{folder / (split + suffix)}: missing (no split {split!r})")
    ds = load_split(folder, split)
    return [(t.tolist(), m.tolist()) for t, m in (ds[i] for i in range(len(ds)))]

# -----------------------------------------------------------------------------


def check_writable(path):
    """--out is written after the whole evaluation: a path that cannot take it fails now, not hours later."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--out={path}: a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"--out={path}: not writable")
    try:  # a file made and removed beside it: the test that also holds for root, whom permissions do not stop
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise InputError(f"--out={path}: cannot write in {path.parent} ({e.strerror})") from None


def parse_config(argv):
    """Config from --key=value flags: each value of the field's type, the required and the choice flags given, and
    something to evaluate."""
    cfg = Config(**configurator.parse_flags(Config, argv, __doc__))
    if not cfg.init_from:
        raise configurator.ConfigError("--init_from is required: a model folder with its tokenizer")
    if cfg.quantize:  # "": as stored
        configurator.check_choices(cfg, dict(quantize=("nf4", "fp4")))
    configurator.check_choices(cfg, dict(train_on=("assistant", "all")))
    if not (cfg.mmlu or cfg.text or cfg.data):
        raise configurator.ConfigError("nothing to evaluate: give --mmlu=DIR, --text=FILE and/or --data=NAME")
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        a = parse_config(argv)
        tok_path = find_tokenizer(a.init_from)  # tokenizer.model or tokenizer.json, or a TokenizerError
        if a.shots < 0 or a.batch_size < 1:
            raise InputError(f"--shots={a.shots} --batch_size={a.batch_size}: need shots >= 0, batch_size >= 1")
        configurator.check_device(a.device)
        if a.out:
            check_writable(a.out)
        tok = Tokenizer(tok_path)  # a file that is no tokenizer: a TokenizerError naming it
        args = C.load_args(a.init_from)  # the config alone: the weights load after every check
        # fewer ids than the model is normal (vocabularies are padded to a round size); more would index past it
        if tok.vocab_size > args.vocab_size:
            raise InputError(f"{tok_path}: {tok.vocab_size} token ids, the model in {a.init_from} has only "
                             f"{args.vocab_size}: not this model's tokenizer")
        bad = [] if a.skip_bad else None
        subjects = a.subjects.split(",") if a.subjects else None
        if subjects and not all(subjects):
            raise InputError(f"--subjects={a.subjects}: an empty subject name")
        # every input is read and checked before the (slow) model load
        data = load_mmlu(a.mmlu, subjects, a.shots, bad) if a.mmlu else None
        docs = {a.text: text_docs(a.text, tok)} if a.text else {}
        if a.data:
            docs[f"{a.data} ({a.split})"] = split_docs(a.data, a.split, tok_path, a.train_on)
        try:
            ctx = args.max_seq_len
            window = a.window or ctx
            stride = a.stride or max(window // 2, 1)
            if docs and not (1 <= stride <= window <= ctx):
                raise InputError(f"--window={window} --stride={stride}: need 1 <= stride <= window <= {ctx} "
                                 "(the model's context)")
            model = C.load_for_inference(a.init_from, a.adapter or None, configurator.pick_device(a.device),
                                         a.quantize or None).eval()
        except ValueError as e:  # CheckpointError, a bad adapter, InputError: each names its file or flag
            raise SystemExit(f"error: {e}") from None
        if data is not None:
            records = mmlu(model, tok, data, a.shots, a.batch_size, bad)
            subj, over_q, over_s = accuracies(records)
            print(f"MMLU {a.shots}-shot, {len(subj)} subjects, {len(records)} questions:")
            for s, acc in subj.items():
                print(f"  {s:<40} {100 * acc:5.1f}%  ({sum(r['subject'] == s for r in records)} questions)")
            if fewer := sum(r["shots"] < a.shots for r in records):
                print(f"  {fewer} questions took fewer than {a.shots} examples to fit the context "
                      f"({model.args.max_seq_len} tokens)")
            print(f"average over questions: {100 * over_q:.2f}%")
            print(f"average over subjects:  {100 * over_s:.2f}%")
            if a.out:
                try:
                    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in records))
                except OSError as e:  # checked at the start; a full disk can still refuse it
                    raise InputError(f"--out={a.out}: cannot write ({e.strerror})") from None
                print(f"wrote {len(records)} lines to {a.out}")
        for name, d in docs.items():
            nll, n = perplexity(model, d, window, stride, a.batch_size)
            if not n:
                raise InputError(f"{name}: no token to score")
            print(f"perplexity on {name}: {math.exp(nll):.4f} (mean NLL {nll:.4f} nats over {n:,} tokens, "
                  f"token-weighted; window {window}, stride {stride})")
        if bad:
            print(f"skipped (--skip_bad): {len(bad)}")
            for m in bad:
                print(f"  {m}")
    except (configurator.ConfigError, InputError, DataError, C.CheckpointError, TokenizerError) as e:  # each names its file or flag
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
