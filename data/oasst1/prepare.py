"""
Prepare OpenAssistant (OASST1) conversations for QLoRA fine-tuning, the way Guanaco was built (Dettmers et al. 2023).

  python data/oasst1/prepare.py --tokenizer=path/to/llama/tokenizer.model               # downloads the release
  python data/oasst1/prepare.py --input=2023-04-12_oasst_ready.trees.jsonl.gz --tokenizer=... --langs=en,es

Reads any of the release's forms, detected from the first line: trees (`prompt` with nested `replies`), nested
messages (a root message with `replies`), flat messages (one per line with `parent_id`), plain or .gz, or
Guanaco's text rows ({"text": "### Human: ...### Assistant: ..."}). From each tree it follows the best reply down:
rank 0 first; unranked siblings after ranked ones, ties broken by message_id so every file order gives the same
pick. Deleted messages and those that failed review are dropped; a trailing question with no usable answer is cut.
Text is Guanaco's exact format, turns joined with no newline: "### Human: Hi### Assistant: Hello### Human: ...".
Tokens: BOS (where the tokenizer puts one first), then per exchange encode("### Human: {prompt}### Assistant:") +
encode(" {reply}") + [EOS], as encode("### Assistant: Hello") cuts it: sentencepiece's dummy prefix is that space,
a byte-level BPE (Llama 3, Qwen) needs it written.

Writes to --out_dir, per split (train, val; ~5% of trees by a hash of message_tree_id):
  {split}.bin       tokens, uint16 (uint32 if the vocabulary has more than 65536 entries)
  {split}.mask.bin  uint8 flags per token: bit 0 = in the loss, bit 1 = assistant span (reply + its EOS)
  {split}.idx.bin   int64 offsets, N+1 entries: conversation i is tokens[idx[i]:idx[i+1]]
  meta.json         tokenizer sha256, vocab size, special ids, dtype, counts, token statistics
The 2023-04-12 ready release holds 10,364 trees (88,838 messages); Guanaco took one conversation from each,
9,846 train + 518 test (its own split; ours is by hash, the same ~5% but not the same trees).
"""
import gzip
import hashlib
import inspect
import json
import re
import sys
import urllib.request
import zlib
from collections import Counter, namedtuple
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tokenizer import Tokenizer, TokenizerError, tokenizer_sha256

HERE = Path(__file__).resolve().parent
URL = "https://huggingface.co/datasets/OpenAssistant/oasst1/resolve/main/2023-04-12_oasst_ready.trees.jsonl.gz"
SHA256 = "2a9a8fd343e9b28e04a895a669d3253f82d93e9c174d440199ae19d5fafbdff7"  # 34,145,252 bytes
TRAIN, ASSISTANT = 1, 2  # bits of the mask file
Conversation = namedtuple("Conversation", "tree_id turns")  # turns: ((role, text), ...), prompter first


class DataError(ValueError):
    """A problem in an input file; `line` points at the message that caused it when known."""
    def __init__(self, msg, line=None):
        super().__init__(msg)
        self.line = line


def render(turns):
    # Guanaco's text column: no newline or separator between turns
    return "".join(("### Human: " if r == "prompter" else "### Assistant: ") + t for r, t in turns)


def split_of(tree_id, val_fraction=0.05):
    # a hash of the tree id, not file order: stable across runs, formats and subsets of the release
    h = int.from_bytes(hashlib.sha256(tree_id.encode()).digest()[:8], "big")
    return "val" if h % 10_000 < val_fraction * 10_000 else "train"


# ----------------------------------------------------------------------------- reading the release forms

def detect_form(obj):
    """The release form of one line, from a field only that form has; None if it is no known form."""
    if not isinstance(obj, dict):
        return None
    if "prompt" in obj:
        return "trees"
    if "replies" in obj:
        return "nested"
    if "parent_id" in obj:
        return "flat"
    if "text" in obj and "role" not in obj:
        return "guanaco"
    return None


def need(m, *fields):
    # only what the rules use is required; user_id, dates, labels, detoxify... may be absent
    if not isinstance(m, dict):
        raise DataError(f"a message is a JSON {type(m).__name__}, not an object")
    for f in fields:
        if f not in m:
            raise DataError(f"missing field {f!r} in message {m.get('message_id', '?')}", m.get("_line"))
    # ids are hashed, sorted and compared, ranks compared: one type each, or a file order could decide a crash
    kinds = dict(text=(str,), message_id=(str,), message_tree_id=(str,), parent_id=(str, type(None)),
                 replies=(list,), rank=(int, type(None)))
    for f, ok in kinds.items():
        checked = f in fields or f == "rank" and f in m  # rank is optional, but typed when present
        if checked and not (isinstance(m[f], ok) and not isinstance(m[f], bool)):  # bool is an int subclass
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in ok)
            raise DataError(f"{f!r} of message {m.get('message_id', '?')!r} is of type {type(m[f]).__name__}, "
                            f"not {allowed}", m.get("_line"))


def usable(m):
    # the ready release already removes most of these; null review_result (not reviewed yet) counts as passed
    return m.get("deleted") is not True and m.get("review_result") is not False


def best_path(root, stats):
    """Follow the best-ranked usable reply from the root down; returns the (role, text) turns."""
    need(root, "message_id", "role", "text", "replies")
    if root["role"] != "prompter":
        raise DataError(f"root {root['message_id']} is not a prompter", root.get("_line"))
    path = [root]
    while True:
        kids = path[-1]["replies"]
        for k in kids:
            need(k, "message_id", "role", "text", "replies")
        good = [k for k in kids if usable(k)]
        stats["dropped replies (deleted or failed review)"] += len(kids) - len(good)
        if not good:
            break
        # rank 0 is best; unranked (null/absent) after ranked; message_id breaks ties independent of file order
        best = min(good, key=lambda k: (k.get("rank") is None, k.get("rank") or 0, k["message_id"]))
        want = "assistant" if path[-1]["role"] == "prompter" else "prompter"
        if best["role"] != want:
            raise DataError(f"message {best['message_id']} should be {want}", best.get("_line"))
        path.append(best)
    if path[-1]["role"] == "prompter":  # an unanswered question teaches nothing
        path.pop()
    return tuple((m["role"], m["text"]) for m in path)


def to_conversation(tree_id, root, state, langs, stats):
    """The conversation of one message tree, or None (counted in stats) if the filters drop it."""
    if not isinstance(tree_id, str):
        raise DataError(f"tree id {tree_id!r} is of type {type(tree_id).__name__}, not str")
    need(root)  # an object, before its fields are read
    stats["trees"] += 1
    if state not in (None, "ready_for_export"):
        stats["dropped trees (not ready_for_export)"] += 1
        return None
    if langs:
        need(root, "lang")
        if root["lang"] not in langs:
            stats["dropped trees (language)"] += 1
            return None
    if not usable(root):
        stats["dropped trees (deleted or failed review)"] += 1
        return None
    turns = best_path(root, stats)
    if not turns:
        stats["dropped trees (no usable reply)"] += 1
        return None
    return Conversation(tree_id, turns)


def from_guanaco(obj, langs, stats):
    """The conversation of one Guanaco text row, or None (counted in stats) if no question is answered."""
    if langs:
        raise DataError("the language filter needs 'lang', which Guanaco text rows lack")
    need(obj, "text")
    stats["trees"] += 1
    # "### Human: a### Assistant: b..." -> ['', 'Human', 'a', 'Assistant', 'b', ...]
    parts = re.split(r"### (Human|Assistant): ", obj["text"])
    roles = parts[1::2]
    if parts[0] or roles != ["Human", "Assistant"] * (len(roles) // 2) + ["Human"] * (len(roles) % 2):
        raise DataError("text is not '### Human: ...### Assistant: ...' alternating from Human")
    turns = [("prompter" if r == "Human" else "assistant", t) for r, t in zip(roles, parts[2::2])]
    turns = turns[:len(turns) // 2 * 2]  # cut an unanswered question
    if not turns:
        stats["dropped trees (no usable reply)"] += 1
        return None
    # no tree id in this form: the text's hash stands in for it (so its split differs from the tree forms')
    return Conversation(hashlib.sha256(obj["text"].encode()).hexdigest(), tuple(turns))


def read_lines(path):
    """(line number, bytes) of a plain or gzipped file; a truncated or corrupt gzip stream is a DataError."""
    lineno = 0
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable after line {lineno} ({type(e).__name__}: {e})") from e


def link_flat(flat, path, skip_bad, stats):
    """Add each flat message (message id -> message) to its parent's replies; returns the roots. Messages
    whose parent is not in the file are counted as orphans. A parent_id chain that loops reaches no root, so
    its messages would vanish uncounted: a DataError, or with skip_bad a count in stats."""
    roots = [m for m in flat.values() if m["parent_id"] is None]
    for m in flat.values():
        if m["parent_id"] is None:
            continue
        if m["parent_id"] in flat:
            flat[m["parent_id"]]["replies"].append(m)
        else:
            stats["orphan messages (parent not in file)"] += 1
    done = set()  # messages whose parent chain is known to end (at a root or an orphan)
    for m in flat.values():
        walk, at = {}, m  # walk: message id -> its place on the chain up from m
        while at is not None and at["message_id"] not in done:
            if at["message_id"] in walk:
                cycle = list(walk)[walk[at["message_id"]]:]
                if not skip_bad:
                    raise DataError(f"{path}:{flat[cycle[0]]['_line']}: {len(cycle)} message(s) form a parent_id "
                                    f"cycle, so reach no root: {', '.join(map(repr, cycle[:3]))}")
                stats["skipped messages in parent_id cycles (--skip_bad)"] += len(cycle)
                break
            walk[at["message_id"]] = len(walk)
            at = flat.get(at["parent_id"])  # None past a root or an orphan
        done.update(walk)
    return roots


def read_conversations(path, langs=(), skip_bad=False):
    """(conversations sorted by tree id, the form, a Counter of what was read and dropped). Sorting makes every
    form and file order give the same output files."""
    path = Path(path)
    stats = Counter()
    convs = []
    flat = {}  # message id -> message: a flat file's trees can only be linked once all its lines are read
    form = None  # the first line's; every other line must be of the same form

    def bad(e, lineno):
        if not skip_bad:
            raise DataError(f"{path}:{e.line or lineno}: {e}") from e
        stats["skipped bad lines (--skip_bad)"] += 1

    for lineno, raw in read_lines(path):
        if not raw.strip():
            continue
        try:
            try:  # per line, so a bad byte names its line (and --skip_bad can skip it)
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 text ({e})")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e})")
            except RecursionError:
                raise DataError("JSON nested too deeply to read")
            if "\\u" in line:  # an escaped lone surrogate (\ud800) decodes, but is no text: it cannot be encoded
                try:
                    json.dumps(obj, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError("a string holds a lone surrogate (\\ud800 unpaired)")
            kind = detect_form(obj)
            if kind is None:
                raise DataError(f"unknown form ({line[:60]}...): expected a tree with 'prompt', a message "
                                "with 'replies', a flat message with 'parent_id' or a Guanaco row with 'text'")
            if form not in (None, kind):
                raise DataError(f"a {kind} line in a file of {form} lines")
            form = kind
            if kind == "flat":  # collect now, link parents to children once all lines are read
                need(obj, "message_id", "parent_id", "role", "text")
                if obj["message_id"] in flat:
                    raise DataError(f"duplicate message_id {obj['message_id']}")
                flat[obj["message_id"]] = dict(obj, replies=[], _line=lineno)
                continue
            if kind == "guanaco":
                conv = from_guanaco(obj, langs, stats)
            elif kind == "trees":
                need(obj, "message_tree_id")
                conv = to_conversation(obj["message_tree_id"], obj["prompt"], obj.get("tree_state"), langs, stats)
            else:  # a nested message tree; OASST's tree id is its root's message id
                conv = to_conversation(obj.get("message_tree_id", obj.get("message_id")), obj, None, langs, stats)
            if conv:
                convs.append(conv)
        except DataError as e:
            bad(e, lineno)
    if form == "flat":
        for r in link_flat(flat, path, skip_bad, stats):
            try:
                tree_id = r.get("message_tree_id") or r["message_id"]
                conv = to_conversation(tree_id, r, r.get("tree_state"), langs, stats)
                if conv:
                    convs.append(conv)
            except DataError as e:
                bad(e, r["_line"])
    stats["conversations"] = len(convs)
    convs.sort(key=lambda c: c.tree_id)
    if not convs:
        raise DataError(f"{path}: no conversations in the file ({form or 'empty'} form; {dict(stats)})")
    return convs, form, stats


# ----------------------------------------------------------------------------- tokenizing and writing

def tokenize(tok, turns, train_on="assistant"):
    """Token ids and mask flags of one conversation: BOS, then per exchange human+marker, reply, EOS."""
    ids, flags = [tok.bos_id] * tok.add_bos, [0] * tok.add_bos  # BOS is never a target
    human = TRAIN if train_on == "all" else 0
    for i in range(0, len(turns), 2):
        (_, prompt), (_, reply) = turns[i], turns[i + 1]
        part = tok.encode(f"### Human: {prompt}### Assistant:")
        ids += part
        flags += [human] * len(part)
        reply = reply if tok.sp is not None else " " + reply  # sentencepiece's dummy prefix is that space
        part = tok.encode(reply) + [tok.eos_id]  # EOS ends every reply and is always trained on
        ids += part
        flags += [TRAIN | ASSISTANT] * len(part)
    return ids, flags


def download(url=URL, sha256=SHA256, dest=HERE / URL.rsplit("/", 1)[1]):
    """The release at dest: downloaded and checked against sha256, unless dest already has that hash."""
    have = file_sha256(dest) if dest.is_file() else None
    if have == sha256:
        return dest
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:  # URLError, timeouts, no network
        # train.py --data=oasst1 takes no --input: the file at dest is the way in for both
        there = f" ({dest} is there, but with sha256 {have[:12]}..., another file)" if have else ""
        raise DataError(f"could not download {url} ({e}). Offline? Fetch that file elsewhere and put it at "
                        f"{dest}{there}, where this script and --data=oasst1 (train.py, eval.py) look for it; "
                        "or prepare another form of the release (.messages.jsonl(.gz), Guanaco .jsonl) with "
                        "python data/oasst1/prepare.py --input=FILE --tokenizer=TOKENIZER and train with "
                        "--data=data/oasst1") from e
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"sha256 of {url} is {hashlib.sha256(data).hexdigest()}, expected {sha256}")
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data)
    return part.replace(dest)  # only a verified, whole file gets the real name


def file_sha256(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def load_tokenizer(path):
    """The tokenizer at path (sentencepiece, Llama 3's tiktoken file or a tokenizer.json) with the ids a conversation
    needs: EOS, and a pad that is not EOS; anything else is a DataError naming the file."""
    try:
        tok = Tokenizer(path)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    if tok.eos_id < 0 or tok.pad_id < 0 or tok.pad_id == tok.eos_id or (tok.add_bos and tok.bos_id < 0):
        raise DataError(f"{path}: needs an eos and a pad (or unk) id that is not eos")
    return tok


def prepare(input_path=None, tokenizer_path=None, out_dir=HERE, train_on="assistant", langs="", val_fraction=0.05,
            skip_bad=False, verbose=True):
    """Read, split, tokenize and write one release file; returns the meta dict (also written to meta.json)."""
    log = print if verbose else (lambda *a: None)
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on is 'assistant' or 'all', not {train_on!r}")
    if tokenizer_path is None:
        raise ValueError("pass the model's tokenizer: --tokenizer=.../tokenizer.model (or tokenizer.json)")
    # before a download or a long read, which a bad tokenizer would waste. Padding is never EOS, which ends every
    # reply and must keep that meaning (LLaMA's has no pad piece: unk then)
    tok = load_tokenizer(tokenizer_path)
    input_path = Path(input_path) if input_path else download()
    if not input_path.is_file():
        raise DataError(f"{input_path}: no such file")
    langs = tuple(langs.split(",")) if isinstance(langs, str) and langs else tuple(langs or ())
    convs, form, stats = read_conversations(input_path, langs, skip_bad)
    log(f"read {input_path} ({form} form): " + ", ".join(f"{k} {v:,}" for k, v in stats.items()))
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(format="guanaco: BOS, then per exchange '### Human: {prompt}### Assistant:' + ' {reply}' + EOS",
                input=input_path.name, input_sha256=file_sha256(input_path), input_form=form,
                tokenizer_sha256=tokenizer_sha256(tokenizer_path), vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                eos_id=tok.eos_id, pad_id=tok.pad_id, dtype=np.dtype(dtype).name, train_on=train_on, langs=list(langs),
                val_fraction=val_fraction, mask_bits=dict(train=TRAIN, assistant=ASSISTANT),
                counts=dict(stats), splits={})
    for split in ("train", "val"):
        ids, flags, offsets = [], [], [0]
        for c in convs:
            if split_of(c.tree_id, val_fraction) != split:
                continue
            i, f = tokenize(tok, c.turns, train_on)
            ids += i
            flags += f
            offsets.append(len(ids))
        ids, flags, offsets = np.array(ids, dtype), np.array(flags, np.uint8), np.array(offsets, np.int64)
        ids.tofile(out_dir / f"{split}.bin")
        flags.tofile(out_dir / f"{split}.mask.bin")
        offsets.tofile(out_dir / f"{split}.idx.bin")
        lens = np.diff(offsets) if len(offsets) > 1 else np.zeros(1, np.int64)  # zeros: stats of an empty split
        s = dict(conversations=len(offsets) - 1, tokens=len(ids), trained_tokens=int((flags & TRAIN).sum()),
                 min_len=int(lens.min()), mean_len=round(float(lens.mean()), 1),
                 p95_len=int(np.percentile(lens, 95)), max_len=int(lens.max()))
        meta["splits"][split] = s
        log(f"{split}: {s['conversations']:,} conversations, {s['tokens']:,} tokens "
            f"({s['trained_tokens'] / max(s['tokens'], 1):.0%} in the loss), "
            f"length min/mean/p95/max {s['min_len']}/{s['mean_len']}/{s['p95_len']}/{s['max_len']}")
        if not s["conversations"]:
            log(f"warning: the {split} split is empty")
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"example: {render(convs[0].turns)[:160]!r}")
    log(f"wrote {{train,val}}.bin, .mask.bin, .idx.bin and meta.json to {out_dir} ({meta['dtype']} tokens)")
    return meta


def main(argv=None, **defaults):
    """`--key=value` flags over prepare()'s own defaults (data/sample/prepare.py passes other ones)."""
    config = {k: p.default for k, p in inspect.signature(prepare).parameters.items() if k != "verbose"} | defaults
    aliases = {"input": "input_path", "tokenizer": "tokenizer_path"}  # the short flag names
    for arg in sys.argv[1:] if argv is None else argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        key = aliases.get(key, key)
        old = config.get(key, ...)
        if isinstance(old, bool) and not eq:  # a bare --skip_bad
            value = "True"
        elif not arg.startswith("--") or old is ... or not eq:
            flags = " ".join(f"--{k}=" for k in ["input", "tokenizer", *list(config)[2:]])
            sys.exit(f"error: bad argument {arg!r}; flags: {flags}")
        try:  # the type of the default decides: bool, float or text
            if isinstance(old, bool):
                config[key] = {"True": True, "False": False}[value]
            elif isinstance(old, float):
                config[key] = float(value)
            else:
                config[key] = value
        except (KeyError, ValueError):
            sys.exit(f"error: --{key} takes a {type(old).__name__}, not {value!r}")
    try:
        prepare(**config)
    except (ValueError, OSError) as e:  # DataError included: a message naming the file and line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
