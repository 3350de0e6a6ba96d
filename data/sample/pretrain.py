"""
Pretrain the bundled base model: a tiny LLaMA that learns, from plain text, the facts and rules behind the sample's
chat tasks. The default `python train.py` fine-tunes it, frozen in 4 bits, with LoRA: what the adapter learns is the
chat format and the route from a question to what the base already knows (how Guanaco was made from LLaMA).

  python data/sample/pretrain.py                      # -> data/sample/base/ (committed)
  python data/sample/pretrain.py --out16=out/base16   # also the fp32 weights, for the 16-bit LoRA baseline

Model: a tiny LLaMA (dim 128, 4 layers, 4 heads, SwiGLU 352) with the sample's vocab of 360: 0.90M parameters,
stored in bitsandbytes' 4-bit format (NF4 + double quantization, blocks of 64) by checkpoint.save_quantized, with the
tokenizer beside it; embeddings, norms and head stay fp32.
Data: plain text from random.Random(SEED), never the chat format: BOS, then facts joined by ". ", cut at 64 tokens:
  "23+45=68"  "KTZQM reversed is MQZTK"  "count of K in KTKZ is 2"     (40% / 30% / 30% of the facts)
with the ranges of make.py's tasks. Nothing of data/sample's held-out prompts (its val split) is ever in it: no sum
of a held-out pair (in either order), no held-out word of a reversal or count (nor its reverse), so answering them
is generalizing. The loss is on every token (the operands are random, so it cannot reach 0).
Optimization: 2000 steps of batch 64, AdamW (0.9, 0.95), lr 3e-3 after 100 warmup steps, cosine to 10%, weight
decay 0.1, grad clip 1, fp32, seed 1337, one thread: the run repeats itself bit for bit on a given CPU build
(another CPU's float kernels change low bits: re-run on an AMD EPYC it reached loss 1.0076 and 100% facts too,
with 123 of the 179 stored tensors different from the committed ones).
Reached (the committed base): loss 1.0076 (mean of the last 100 steps); the held-out prompts asked in plain form
("15+37=" -> "52"), greedy exact: add 100%, reverse 100%, count 100%, in fp32 and in NF4 + DQ (after 1000 steps:
add 97%). 849,046 bytes written. 2,250 s on one thread of a heavily loaded 2-core machine (~0.33 s of CPU a step,
so ~11 min idle).
"""
import copy
import math
import os
import random
import sys
import time
from pathlib import Path

if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:  # before torch loads OpenMP: README, "A busy CPU"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import checkpoint as C
import model as M
import qlora as Q
from data.oasst1.prepare import read_conversations, split_of
from data.sample import prepare
from data.sample.make import LETTERS
from tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
SEED, STEPS, BATCH, SEQ, LR, WARMUP, THREADS = 1337, 2000, 64, 64, 3e-3, 100, 1
MODEL = dict(dim=128, n_layers=4, n_heads=4, hidden_dim=352, norm_eps=1e-5, max_seq_len=256)


def heldout():
    """The val split's first exchanges as (kind, operands): what the pretraining text must never contain."""
    convs, _, _ = read_conversations(prepare.DEFAULTS["input_path"])
    out = []
    for c in convs:
        if split_of(c.tree_id, prepare.DEFAULTS["val_fraction"]) != "val": continue
        q = c.turns[0][1]
        if q.startswith("What is "): out.append(("add", tuple(map(int, q[8:-1].split("+")))))
        elif q.startswith("Reverse "): out.append(("reverse", q[8:]))
        else: out.append(("count", tuple(q.removeprefix("Count ").split(" in "))))  # (letter, word)
    return out


def forbidden(held):
    """Pairs and words the text must avoid: both orders of every held-out sum, every held-out word and its reverse."""
    pairs, words = set(), set()
    for kind, x in held:
        if kind == "add":
            pairs |= {x, x[::-1]}
        else:
            w = x if kind == "reverse" else x[1]
            words |= {w, w[::-1]}
    return pairs, words


def query(kind, x):
    """(the plain-text question, its answer) of one fact."""
    if kind == "add": return f"{x[0]}+{x[1]}=", str(x[0] + x[1])
    if kind == "reverse": return f"{x} reversed is", " " + x[::-1]
    return f"count of {x[0]} in {x[1]} is", " " + str(x[1].count(x[0]))


def random_fact(rng, pairs, words):
    """One fact drawn as make.py draws its tasks, redrawn while it touches a held-out prompt."""
    while True:
        u = rng.random()
        if u < 0.4:
            x = (rng.randrange(100), rng.randrange(100))
            if x in pairs: continue
            return query("add", x)
        if u < 0.7:
            x = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
            if x in words: continue
            return query("reverse", x)
        t, k = rng.choice(LETTERS), rng.randint(0, 4)
        w = [t] * k + [rng.choice(LETTERS.replace(t, "")) for _ in range(rng.randint(max(4 - k, 0), 9 - k))]
        rng.shuffle(w)
        if "".join(w) in words: continue
        return query("count", (t, "".join(w)))


def batch(rng, sp, pairs, words, n=BATCH, seq=SEQ):
    """(n, seq + 1) token ids: each row BOS + facts joined by '. ', cut to length."""
    rows = []
    for _ in range(n):
        ids = [sp.bos_id]
        while len(ids) <= seq:
            ids += sp.encode("".join(random_fact(rng, pairs, words)) + ".")
        rows.append(ids[:seq + 1])
    return torch.tensor(rows)


@torch.no_grad()
def fact_accuracy(model, sp, held):
    """Greedy exact answers to the held-out prompts asked in plain form ("23+45=" -> "68."), per task."""
    model.eval()
    right, total = {}, {}
    for kind, x in held:
        q, a = query(kind, x)
        ids, want = sp.encode(q, bos=True), sp.encode(q + a + ".", bos=True)
        assert want[:len(ids)] == ids, (q, a)  # the question tokenizes the same inside the fact
        out = model.generate(torch.tensor([ids]), len(want) - len(ids))[0].tolist()
        right[kind] = right.get(kind, 0) + (out == want)
        total[kind] = total.get(kind, 0) + 1
    model.train()
    return {k: right[k] / total[k] for k in total}


def lr_at(step, steps):
    if step < WARMUP: return LR * (step + 1) / WARMUP
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP))))


def pretrain(out_dir=HERE / "base", steps=STEPS, out16=None, log_every=100, eval_every=500, evaluate=True):
    """Train from SEED, save NF4 + DQ to out_dir (and fp32 to out16); returns the loss of every step."""
    torch.set_num_threads(THREADS)  # reductions split by thread count: fixed, so reruns match bit for bit
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    tok_path = prepare.DEFAULTS["tokenizer_path"]
    sp = Tokenizer(tok_path)
    held = heldout()
    pairs, words = forbidden(held)
    model = M.Transformer(M.ModelArgs(**MODEL, vocab_size=sp.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    losses, t0 = [], time.time()
    for step in range(steps):
        for g in opt.param_groups: g["lr"] = lr_at(step, steps)
        x = batch(rng, sp, pairs, words)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(f"step {step + 1}: loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            if eval_every and (step + 1) % eval_every == 0:  # a third of them: a glimpse of what it has learned
                acc = fact_accuracy(model, sp, held[::3])
                print("  held-out facts: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()), flush=True)
    if evaluate:
        print("held-out facts, fp32: " + ", ".join(f"{k} {v:.0%}" for k, v in fact_accuracy(model, sp, held).items()))
    if out16 is not None:  # the unquantized weights too (not committed): the base of the 16-bit LoRA baseline
        C.save_quantized(Q.add_lora(copy.deepcopy(model), r=0, quant_type="none"), out16, tokenizer=tok_path)
    Q.add_lora(model, r=0, quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=torch.float32)
    C.save_quantized(model, out_dir, tokenizer=tok_path)
    if evaluate:
        print("held-out facts, NF4 + DQ: " +
              ", ".join(f"{k} {v:.0%}" for k, v in fact_accuracy(model.eval(), sp, held).items()))
    size = sum(p.stat().st_size for p in Path(out_dir).iterdir())
    print(f"wrote {out_dir} ({size:,} bytes); final loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
          f"(mean of the last {min(100, len(losses))} steps)")
    return losses


if __name__ == "__main__":
    kw = dict(a.removeprefix("--").partition("=")[::2] for a in sys.argv[1:])
    if bad := sorted(set(kw) - {"out_dir", "steps", "out16", "evaluate", "overwrite"}):
        sys.exit(f"error: unknown settings {bad}; pretrain.py takes --out_dir=DIR, --steps=N, --out16=DIR, "
                 "--evaluate=true|false and --overwrite")
    for flag in ("out_dir", "out16"):  # the committed base (data/sample/base) is replaced only when asked
        if (Path(kw.get(flag, HERE / "base" if flag == "out_dir" else "")) / "model.safetensors").exists() \
                and "overwrite" not in kw:
            sys.exit(f"error: --{flag}={kw.get(flag, HERE / 'base')} holds a model: add --overwrite to replace it")
    if not kw.get("steps", "1").isdigit() or int(kw.get("steps", STEPS)) < 1 or \
            kw.get("evaluate", "true") not in ("true", "false"):
        sys.exit("error: --steps takes a whole number >= 1, --evaluate true or false")
    for flag in ("out_dir", "out16"):  # written after the training: a folder that cannot be made fails now
        if flag not in kw:
            continue
        if not kw[flag]:
            sys.exit(f"error: --{flag}= needs a folder name")
        try:
            Path(kw[flag]).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            sys.exit(f"error: --{flag}={kw[flag]}: cannot make that folder ({e.strerror})")
    pretrain(Path(kw.get("out_dir", HERE / "base")), int(kw.get("steps", STEPS)), kw.get("out16"),
             evaluate=kw.get("evaluate", "true") == "true")
