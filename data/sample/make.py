"""
Make the bundled sample dataset: short tasks with checkable answers, written in OASST1's trees format, and a tiny
sentencepiece tokenizer trained on it. Both outputs are committed; this script regenerates them byte for byte.

  python data/sample/make.py   # -> sample.trees.jsonl (862,494 bytes, 2,400 trees), tokenizer.model (vocab 360)

Tasks (prompt -> answer), each prompt once, chosen so a tiny frozen random model + LoRA can learn them on a CPU:
  add      "What is 23+45?"   -> "68"     a, b uniform in 0..99                     (50% of the trees)
  reverse  "Reverse KTZQM"    -> "MQZTK"  3-6 capital letters                       (25%)
  count    "Count K in KTKZ"  -> "2"      4-9 capital letters, the target 0-4 times (25%)
  10% of the additions go on: "### Human: Plus 7?" -> "75" (a second exchange)
The letters avoid the capitals that start template words (A C H P R W), and the tokenizer never merges them, so
each is one token; digits are split too (split_digits). A conversation is 16-34 tokens. Some trees also hold a
wrong reply listed first but ranked 1, or a deleted / failed-review wrong reply ranked 0: a pipeline that
followed the wrong rule would train on wrong answers. Measured with a throwaway tiny LLaMA (dim 256, 4 layers,
frozen random) + LoRA r=32 on all linears, batch 64, lr 1e-3, on 2 CPU cores (~0.3 s/step): held-out exact answers
0% before; after 800 steps reverse ~35%, count ~33%, add ~2% (addition alone: 4% at 400 steps, 44% at 800).
"""
import io, json, random, re, sys, uuid
from pathlib import Path

import sentencepiece as spm

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.oasst1.prepare import read_conversations, render

HERE = Path(__file__).resolve().parent
N_TREES, SEED, VOCAB_SIZE = 2400, 1337, 360  # vocab: 4 specials, 256 bytes, 45 chars, 55 merges
LETTERS = "BDEFGIJKLMNOQSTUVXYZ"


def task(rng):
    """(prompt, answer, wrong answer) of one random task; 50% additions, 25% reversals, 25% counts."""
    kind = rng.choice(["add", "add", "reverse", "count"])
    if kind == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a}+{b}?", str(a + b), str(a + b + rng.choice([-10, -1, 1, 10]))
    if kind == "reverse":
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        return f"Reverse {w}", w[::-1], w if w != w[::-1] else w + w[0]
    t, k = rng.choice(LETTERS), rng.randint(0, 4)
    w = [t] * k + [rng.choice(LETTERS.replace(t, "")) for _ in range(rng.randint(max(4 - k, 0), 9 - k))]
    rng.shuffle(w)
    return f"Count {t} in {''.join(w)}", str(k), str(k + 1)


def message(rng, role, text, **extra):
    # the release's fields that the pipeline reads (parent_id is implied by the nesting, lang is on the root)
    return dict(message_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), text=text, role=role, **extra,
                replies=[])


def make_tree(rng):
    prompt, answer, wrong = task(rng)
    root = message(rng, "prompter", prompt, lang="en")
    good = message(rng, "assistant", answer)
    u = rng.random()
    if u < 0.20:  # a worse reply listed first: only the rank says which to follow
        good["rank"] = 0
        root["replies"] = [message(rng, "assistant", wrong, rank=1), good]
    elif u < 0.25:  # the best-ranked reply was deleted or failed review: fall back to the next one
        good["rank"] = 1
        bad = dict(deleted=True) if u < 0.225 else dict(review_result=False)
        root["replies"] = [message(rng, "assistant", wrong, rank=0, **bad), good]
    else:
        root["replies"] = [good]
    if prompt.startswith("What is") and rng.random() < 0.1:  # a follow-up turn on the same sum
        n = rng.randint(1, 9)
        follow = message(rng, "prompter", f"Plus {n}?")
        follow["replies"] = [message(rng, "assistant", str(int(answer) + n))]
        good["replies"] = [follow]
    return dict(message_tree_id=root["message_id"], tree_state="ready_for_export", prompt=root)


def main(out_dir=HERE):
    out_dir = Path(out_dir)
    rng = random.Random(SEED)
    data = out_dir / "sample.trees.jsonl"
    seen = set()  # each prompt once, so a held-out prompt never also shows up in training
    with open(data, "w", encoding="utf-8", newline="\n") as f:
        while len(seen) < N_TREES:
            tree = make_tree(rng)
            if tree["prompt"]["text"] in seen: continue
            seen.add(tree["prompt"]["text"])
            f.write(json.dumps(tree, separators=(",", ":")) + "\n")

    # the tokenizer learns from the conversations as the pipeline renders them, so the template words merge;
    # pieces never cross a "|" in training, so the task letters stay single-letter tokens (no "KK", no "▁K")
    convs, _, _ = read_conversations(data)
    corpus = [re.sub(f"([{LETTERS}])", r"|\1", render(c.turns)) for c in convs]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", pretokenization_delimiter="|",
        vocab_size=VOCAB_SIZE, byte_fallback=True, split_digits=True, character_coverage=1.0,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,  # pad is its own piece, never EOS
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,  # as LLaMA's
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)  # one thread, no sampling: deterministic
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())

    # the learnability promise: every letter and digit of a task is its own token
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    for c in LETTERS + "0123456789":
        assert sp.encode(c, out_type=str) == ["▁", c] and sp.encode("KT" + c + "9", out_type=str)[3:5] == [c, "9"], c
    n_turns = sum(len(c.turns) // 2 for c in convs)
    print(f"wrote {data} ({data.stat().st_size:,} bytes, {len(convs):,} conversations, {n_turns:,} exchanges) "
          f"and {out_dir / 'tokenizer.model'} (vocab {sp.vocab_size()}, {len(model.getvalue()):,} bytes)")


if __name__ == "__main__":
    if len(sys.argv) > 2 or len(sys.argv) == 2 and not Path(sys.argv[1]).is_dir():
        sys.exit(f"error: {' '.join(sys.argv[1:])}: make.py takes at most one argument, an existing folder to write to")
    try:
        main(*sys.argv[1:])
    except OSError as e:  # a folder it may not write in
        sys.exit(f"error: {e.filename}: cannot write ({e.strerror})")
