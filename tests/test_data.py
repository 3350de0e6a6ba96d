# Tests of the data pipeline: OASST1 readers agree across release forms, the Guanaco path rules, errors that name
# file and line, loss masks exactly on assistant tokens + EOS, byte-identical reruns, the sample's answers, batching.
import gzip, hashlib, json, subprocess, sys, urllib.error

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import ROOT, asset
from data.batching import IGNORE, collate, length_grouped_batches, load_split, packed_batches
from data.oasst1 import prepare as P
from data.sample import make

FIXTURE = ROOT / "tests" / "fixtures" / "oasst1_trees.jsonl"  # 4 trees in the release's trees schema
SAMPLE_TOK = ROOT / "data" / "sample" / "tokenizer.model"
EXPECTED = [  # the best-ranked usable path of each fixture tree, as Guanaco would take it, sorted by tree id
    (("prompter", "Name a color."), ("assistant", "Red.")),  # unranked: lower message_id; unanswered follow-up cut
    (("prompter", "What is the capital of France?"), ("assistant", "Paris."),  # rank 0 listed second
     ("prompter", "And of Italy?"), ("assistant", "Rome.\nIt has been the capital since 1871.")),  # rank 0 deleted
    (("prompter", "¿Qué hora es?"), ("assistant", "No lo sé, no tengo reloj. 🙂")),
]  # the 4th tree's only reply failed review: no conversation


def other_forms(trees_file, tmp_path):
    """The same trees as the nested-messages and the flat-messages release files (flat in reverse order)."""
    trees = [json.loads(line) for line in trees_file.read_text().splitlines()]
    flat = []
    def walk(m, tree):
        flat.append(dict({k: v for k, v in m.items() if k != "replies"}, message_tree_id=tree["message_tree_id"],
                         tree_state=tree["tree_state"], parent_id=m.get("parent_id")))
        for r in m["replies"]: walk(r, tree)
    for t in trees: walk(t["prompt"], t)
    nested, flat_path = tmp_path / "x.messages_nested.jsonl", tmp_path / "x.messages.jsonl.gz"
    nested.write_text("".join(json.dumps(t["prompt"]) + "\n" for t in trees))
    with gzip.open(flat_path, "wt") as f: f.writelines(json.dumps(m) + "\n" for m in reversed(flat))
    return nested, flat_path


def turns(convs):
    return [c.turns for c in convs]


# ----------------------------------------------------------------------------- readers

def test_fixture_paths_follow_rank_and_drop_deleted(tmp_path):
    convs, form, stats = P.read_conversations(FIXTURE)
    assert form == "trees" and turns(convs) == EXPECTED
    assert stats["trees"] == 4 and stats["dropped trees (no usable reply)"] == 1
    assert stats["dropped replies (deleted or failed review)"] == 2
    for path in other_forms(FIXTURE, tmp_path):  # every form, even shuffled, gives the same conversations
        c2, _, _ = P.read_conversations(path)
        assert c2 == convs
    assert turns(P.read_conversations(FIXTURE, langs=("es",))[0]) == EXPECTED[2:]


def test_guanaco_text_roundtrip(tmp_path):
    convs, _, _ = P.read_conversations(FIXTURE)
    # Guanaco's text: turns joined with no newline (a newline inside a message stays)
    assert P.render(EXPECTED[1]) == ("### Human: What is the capital of France?### Assistant: Paris."
                                     "### Human: And of Italy?"
                                     "### Assistant: Rome.\nIt has been the capital since 1871.")
    g = tmp_path / "guanaco.jsonl"
    g.write_text("".join(json.dumps({"text": P.render(c.turns)}) + "\n" for c in convs))
    c2, form, _ = P.read_conversations(g)
    assert form == "guanaco" and sorted(turns(c2)) == sorted(EXPECTED)  # its ids are text hashes: other order


def test_shared_release_forms_agree(tmp_path):
    d = asset("oasst1")
    results = [P.read_conversations(d / f) for f in
               ("en_100_tree.jsonl", "en_100_message.jsonl", "en_100_flat_messages.jsonl")]
    assert [r[1] for r in results] == ["trees", "nested", "flat"]
    convs = results[0][0]
    # 100 trees -> 100 conversations: 58 of one exchange, 42 of two; 284 turns
    assert len(convs) == 100 and sum(len(c.turns) for c in convs) == 284
    assert sorted(len(c.turns) for c in convs) == [2] * 58 + [4] * 42
    assert results[1][0] == convs and results[2][0] == convs
    assert sum(P.split_of(c.tree_id) == "val" for c in convs) == 6


# ----------------------------------------------------------------------------- errors

def bad_file(tmp_path, lines, name="bad.trees.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


def test_errors_name_file_and_line(tmp_path):
    good = FIXTURE.read_text().splitlines()
    p = bad_file(tmp_path, good[:2] + ['{"message_tree_id": "x", "prompt": {'] + good[2:])
    with pytest.raises(P.DataError, match=rf"{p}:3: malformed JSON"): P.read_conversations(p)
    convs, _, stats = P.read_conversations(p, skip_bad=True)  # --skip_bad: skip and count
    assert turns(convs) == EXPECTED and stats["skipped bad lines (--skip_bad)"] == 1

    p = bad_file(tmp_path, [good[0], good[1].replace('"role": "assistant", ', "", 1)])
    with pytest.raises(P.DataError, match=rf"{p}:2: missing field 'role'"): P.read_conversations(p)
    p = bad_file(tmp_path, [good[0], '{"foo": 1}'])
    with pytest.raises(P.DataError, match=rf"{p}:2: unknown form"): P.read_conversations(p)
    p = bad_file(tmp_path, [good[0], json.dumps(json.loads(good[1])["prompt"])])
    with pytest.raises(P.DataError, match=rf"{p}:2: a nested line in a file of trees lines"): P.read_conversations(p)
    with pytest.raises(P.DataError, match=rf"{FIXTURE}: no conversations"): P.read_conversations(FIXTURE, langs=("de",))
    with pytest.raises(P.DataError, match="no conversations"): P.read_conversations(bad_file(tmp_path, []))

    # flat form: the line of the message itself
    _, flat = other_forms(FIXTURE, tmp_path)
    lines = gzip.open(flat, "rt").read().splitlines()
    m = json.loads(lines[4]); del m["text"]; lines[4] = json.dumps(m)
    with pytest.raises(P.DataError, match=r"bad.messages.jsonl:5: missing field 'text'"):
        P.read_conversations(bad_file(tmp_path, lines, "bad.messages.jsonl"))


def test_bad_bytes_and_broken_gzip_name_the_file(tmp_path):
    good = [line.encode() for line in FIXTURE.read_text().splitlines()]
    p = tmp_path / "latin1.trees.jsonl"  # one line in Latin-1: "é" as the single byte 0xe9
    p.write_bytes(b"\n".join([good[0], good[1].replace(b"Red.", b"Rouge \xe9."), *good[2:]]) + b"\n")
    with pytest.raises(P.DataError, match=rf"{p}:2: not UTF-8 text"): P.read_conversations(p)
    convs, _, stats = P.read_conversations(p, skip_bad=True)  # the line can be skipped like any bad line
    assert len(convs) == len(EXPECTED) - 1 and stats["skipped bad lines (--skip_bad)"] == 1

    _, flat = other_forms(FIXTURE, tmp_path)
    data = flat.read_bytes()
    cut = tmp_path / "cut.messages.jsonl.gz"  # a download that stopped half way
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(P.DataError, match=rf"{cut}: unreadable after line \d+ \(EOFError"): P.read_conversations(cut)
    junk = tmp_path / "junk.jsonl.gz"  # not gzip at all
    junk.write_bytes(b"{}\n" * 10)
    with pytest.raises(P.DataError, match=rf"{junk}: unreadable after line 0 \(BadGzipFile"):
        P.read_conversations(junk)
    with pytest.raises(P.DataError, match=rf"{tmp_path / 'none.jsonl'}: unreadable after line 0 \(FileNotFound"):
        P.read_conversations(tmp_path / "none.jsonl")


def test_cli_error_and_skip_bad(tmp_path):
    p = bad_file(tmp_path, FIXTURE.read_text().splitlines() + ["not json"])
    cmd = [sys.executable, str(ROOT / "data/oasst1/prepare.py"), f"--input={p}", f"--tokenizer={SAMPLE_TOK}",
           f"--out_dir={tmp_path / 'out'}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and f"error: {p}:5: malformed JSON" in r.stderr
    r = subprocess.run(cmd + ["--skip_bad"], capture_output=True, text=True)
    assert r.returncode == 0 and "skipped bad lines (--skip_bad) 1" in r.stdout, r.stderr


def test_download_offline_and_checksum(tmp_path, monkeypatch):
    def offline(*a, **k): raise urllib.error.URLError("no network")
    monkeypatch.setattr(P.urllib.request, "urlopen", offline)
    with pytest.raises(P.DataError, match=r"could not download https://huggingface.co/.*--input="):
        P.download(dest=tmp_path / "r.jsonl.gz")

    class Fake:  # a server that answers with the wrong bytes
        def __enter__(self): return self
        def __exit__(self, *a): pass
        def read(self): return b"not the release"
    monkeypatch.setattr(P.urllib.request, "urlopen", lambda *a, **k: Fake())
    with pytest.raises(P.DataError, match=f"expected {P.SHA256}"): P.download(dest=tmp_path / "r.jsonl.gz")
    assert not (tmp_path / "r.jsonl.gz").exists()
    good = hashlib.sha256(b"not the release").hexdigest()  # with the matching checksum the file is kept
    assert P.download(sha256=good, dest=tmp_path / "r.jsonl.gz").read_bytes() == b"not the release"


# ----------------------------------------------------------------------------- tokenized output

def check_masks(out, convs, sp, train_on):
    """Mask = exactly the assistant tokens + their EOS (or all but BOS for train_on=all); EOS always trained."""
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
        flags = np.fromfile(out / f"{split}.mask.bin", dtype=np.uint8)
        idx = np.fromfile(out / f"{split}.idx.bin", dtype=np.int64)
        mine = [c for c in convs if P.split_of(c.tree_id, meta["val_fraction"]) == split]
        assert len(idx) == len(mine) + 1 and idx[0] == 0 and idx[-1] == len(tokens) == len(flags)
        assert (flags[tokens == sp.eos_id()] & P.TRAIN).all()  # EOS is never masked out
        for c, a, b in zip(mine, idx[:-1], idx[1:]):
            t, f = tokens[a:b], flags[a:b]
            assert t[0] == sp.bos_id() and f[0] == 0 and t[-1] == sp.eos_id()
            role = (f & P.ASSISTANT) > 0
            # runs of assistant tokens: each decodes to one reply and ends with EOS, in order
            edges = np.flatnonzero(np.diff(np.r_[0, role.astype(int), 0]))
            runs = [t[s:e] for s, e in zip(edges[::2], edges[1::2])]
            assert [sp.decode(r[:-1].tolist()) for r in runs] == [x for role_, x in c.turns if role_ == "assistant"]
            assert all(r[-1] == sp.eos_id() for r in runs) and (t[~role] != sp.eos_id()).all()
            # everything else is the human turns with the marker that asks for the reply
            humans = [sp.decode(t[s:e].tolist()) for s, e in zip(np.r_[1, edges[1::2]][:-1], edges[::2])]
            assert humans == [f"### Human: {x}### Assistant:" for role_, x in c.turns if role_ == "prompter"]
            trained = (f & P.TRAIN) > 0
            assert (trained == role).all() if train_on == "assistant" else (trained[1:].all() and not trained[0])


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_masks_exact_and_rerun_byte_identical(tmp_path, train_on):
    convs, _, _ = P.read_conversations(FIXTURE)
    meta = P.prepare(FIXTURE, SAMPLE_TOK, tmp_path / "a", train_on=train_on, val_fraction=0.3, verbose=False)
    assert meta["splits"]["val"]["conversations"] == 2 and meta["pad_id"] == 0 and meta["eos_id"] == 2
    check_masks(tmp_path / "a", convs, spm.SentencePieceProcessor(model_file=str(SAMPLE_TOK)), train_on)
    P.prepare(FIXTURE, SAMPLE_TOK, tmp_path / "b", train_on=train_on, val_fraction=0.3, verbose=False)
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert len(files) == 7
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_llama_tokenizer_cli(tmp_path):
    src, tok = asset("oasst1", "en_100_flat_messages.jsonl"), asset("llama2_tokenizer", "tokenizer.model")
    r = subprocess.run([sys.executable, str(ROOT / "data/oasst1/prepare.py"), f"--input={src}", f"--tokenizer={tok}",
                        f"--out_dir={tmp_path / 'cli'}"], capture_output=True, text=True)
    assert r.returncode == 0 and "train: 94 conversations" in r.stdout, r.stderr
    meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    ids = (meta["vocab_size"], meta["dtype"], meta["bos_id"], meta["eos_id"], meta["pad_id"])
    assert ids == (32000, "uint16", 1, 2, 0)  # LLaMA has no pad piece: pad is unk (0), never EOS
    convs, _, _ = P.read_conversations(src)
    check_masks(tmp_path / "cli", convs, spm.SentencePieceProcessor(model_file=str(tok)), "assistant")
    # the function with the same settings writes the same bytes, from another release form too
    P.prepare(asset("oasst1", "en_100_tree.jsonl"), tok, tmp_path / "fn", verbose=False)
    for f in ("train.bin", "train.mask.bin", "train.idx.bin", "val.bin", "val.mask.bin", "val.idx.bin"):
        assert (tmp_path / "cli" / f).read_bytes() == (tmp_path / "fn" / f).read_bytes(), f


# ----------------------------------------------------------------------------- the bundled sample

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    P.prepare(make.HERE / "sample.trees.jsonl", SAMPLE_TOK, out, verbose=False)
    return out


def right_answer(prompt, history=None):
    if prompt.startswith("What is "): return str(eval(prompt[8:-1]))  # "a+b" of two small ints
    if prompt.startswith("Plus "): return str(int(history) + int(prompt[5:-1]))
    if prompt.startswith("Reverse "): return prompt[8:][::-1]
    t, w = prompt.removeprefix("Count ").split(" in ")
    return str(w.count(t))


def test_sample_answers_right_and_regenerates(tmp_path):
    # the followed path always holds the right answers, although a fifth of the trees also hold wrong ones
    convs, _, stats = P.read_conversations(make.HERE / "sample.trees.jsonl")
    assert len(convs) == 2400 and stats["dropped replies (deleted or failed review)"] > 0
    for c in convs:
        for i in range(0, len(c.turns), 2):
            assert c.turns[i + 1][1] == right_answer(c.turns[i][1], c.turns[i - 1][1] if i else None)
    assert (make.HERE / "sample.trees.jsonl").stat().st_size < 1_000_000
    make.main(tmp_path)  # make.py reproduces the committed data byte for byte, and the tokenizer's vocabulary
    assert (tmp_path / "sample.trees.jsonl").read_bytes() == (make.HERE / "sample.trees.jsonl").read_bytes()
    sp, sp2 = (spm.SentencePieceProcessor(model_file=str(p)) for p in (SAMPLE_TOK, tmp_path / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(360)] == [sp2.id_to_piece(i) for i in range(sp2.vocab_size())]
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.vocab_size()) == (0, 1, 2, 3, 360)
    # template words are single tokens, digits and task letters single characters
    assert sp.encode("What is 23+45?", out_type=str) == ["▁What", "▁is", "▁", "2", "3", "+", "4", "5", "?"]
    assert sp.encode("Reverse KTZQM", out_type=str) == ["▁Reverse", "▁", "K", "T", "Z", "Q", "M"]


def test_sample_heldout_prompts(sample):
    val = load_split(sample, "val")
    sp = spm.SentencePieceProcessor(model_file=str(SAMPLE_TOK))
    assert 0.03 < len(val) / 2400 < 0.07  # ~5% of the trees, by tree id
    for i in range(len(val)):
        prompt, answer = val.prompt_answer(i)
        text = sp.decode(prompt)
        assert prompt[0] == val.bos_id and text.startswith("### Human: ") and text.endswith("### Assistant:")
        assert sp.decode(answer) == right_answer(text[len("### Human: "):-len("### Assistant:")])


# ----------------------------------------------------------------------------- batching

def test_split_items(sample):
    ds = load_split(sample, "train")
    tokens, mask = ds[3]
    assert tokens.dtype == torch.int64 and mask.dtype == torch.bool and len(tokens) == len(mask) == ds.lengths[3]
    assert tokens[0] == ds.bos_id and tokens[-1] == ds.eos_id and mask[-1] and not mask[0]
    assert ds.pad_id != ds.eos_id


def test_collate_shifts_masks_pads_truncates():
    ex = [(torch.tensor([1, 5, 6, 7, 2]), torch.tensor([0, 0, 0, 1, 1]).bool()),
          (torch.tensor([1, 8, 2]), torch.tensor([0, 1, 1]).bool())]
    x, y = collate(ex, pad_id=0, max_len=16)
    assert x.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert y.tolist() == [[IGNORE, IGNORE, 7, 2], [8, 2, IGNORE, IGNORE]]
    x, y = collate(ex, pad_id=0, max_len=2)
    assert x.tolist() == [[1, 5], [1, 8]] and y.tolist() == [[IGNORE, IGNORE], [8, 2]]


def test_length_grouped_batches(sample):
    ds = load_split(sample, "train")
    b = length_grouped_batches(ds, batch_size=16, seed=0, epoch=0)
    flat = sorted(i for batch in b for i in batch)
    assert flat == list(range(len(ds))) and sum(len(x) != 16 for x in b) <= 1
    assert ds.lengths[b[0]].max() == ds.lengths.max()  # the longest batch first: OOM shows at step 1
    assert b == length_grouped_batches(ds, 16, seed=0, epoch=0) != length_grouped_batches(ds, 16, seed=0, epoch=1)
    # grouping pays: far less padding than batches of a plain shuffle
    pad = lambda bs: sum(ds.lengths[x].max() * len(x) - ds.lengths[x].sum() for x in bs)
    perm = np.random.default_rng(0).permutation(len(ds))
    assert pad(b) < 0.5 * pad([perm[i:i + 16] for i in range(0, len(ds), 16)])


def test_packed_batches(sample):
    # rows of whole conversations (tests/test_packing.py: each once, as collate cuts it, and exact)
    ds = load_split(sample, "train")
    batches = packed_batches(ds, batch_size=4, max_len=64, seed=0, epoch=0)
    assert all(x.shape == y.shape == d.shape and x.shape[1] == 64 for x, y, d in batches)
    for x, y, docs in batches:
        same = docs[:, 1:] == docs[:, :-1]  # within a conversation the targets are the next inputs
        keep = same & (y[:, :-1] != IGNORE)
        assert torch.equal(y[:, :-1][keep], x[:, 1:][keep])
        assert not (y == ds.bos_id).any()  # no loss across a boundary
    assert sum(int((x == ds.bos_id).sum()) for x, _, _ in batches) == len(ds)  # each conversation, once
    assert (torch.cat([y for _, y, _ in batches]) == ds.eos_id).sum() > 0  # the replies end in the loss
    x0 = packed_batches(ds, 4, 64, seed=0, epoch=0)[0][0]
    assert torch.equal(x0, batches[0][0]) and not torch.equal(packed_batches(ds, 4, 64, seed=1, epoch=0)[0][0], x0)