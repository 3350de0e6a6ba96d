"""
Tokenizers, chosen by the files in a model folder, never by a flag:
- tokenizer.model, sentencepiece's: LLaMA 1/2, Mistral, TinyLlama (the sentencepiece package);
- tokenizer.model in tiktoken's format (a `base64(token) rank` line each): Meta's Llama 3 folders;
- tokenizer.json whose model is BPE: Hugging Face's Llama 3 folders, Qwen 2.5 / 3.
The last two are one byte-level BPE in pure Python: a pre-tokenizer regex cuts the text into pieces, each piece's
UTF-8 bytes are merged pair by pair, lowest rank first, into token ids (cached per piece).

  tok = Tokenizer(find_tokenizer("path/to/model"))
  ids = tok.encode("Hello", bos=tok.add_bos)  # BOS as transformers' tokenizer for that folder (or Meta's code) puts it
  tok.decode(ids)

Special-token strings in the text are text (tiktoken's encode_ordinary): a conversation cannot forge an EOS.
"""
import base64
import hashlib
import json
import re
import sys
import unicodedata
from pathlib import Path

# Meta's llama_models/llama3/tokenizer.py states what its tokenizer.model does not hold: the pattern and the 256
# special tokens after the 128,000 ranks (Llama 3.1's names; Llama 3's differ only among the reserved ones).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
NONE = sys.maxsize  # the rank of a pair that never merges
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class TokenizerError(ValueError):
    pass


def find_tokenizer(folder):
    """A model folder's tokenizer file: tokenizer.model (sentencepiece or tiktoken) if there, else tokenizer.json."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise TokenizerError(f"{folder}: no tokenizer.model or tokenizer.json: the model's tokenizer belongs beside it")


def file_format(path):
    """'json', 'tiktoken' or 'sentencepiece', from the file's first bytes ('' for an empty file)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.lstrip().startswith(b"{"):
        return "json"
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head.split(b"\n")[0]):  # base64(token) rank, a line each
        return "tiktoken"
    return "sentencepiece" if head else ""


def tokenizer_sha256(path):
    """What names a tokenizer in a prepared data folder's key: its file, and for the BPE formats this file's code
    and, beside a tokenizer.json, the settings that choose its BOS, EOS and pad (tokenizer_config.json, config.json)."""
    h, form = hashlib.sha256(Path(path).read_bytes()), file_format(path)
    if form != "sentencepiece":
        h.update(Path(__file__).read_bytes())
    if form == "json":
        for name in ("tokenizer_config.json", "config.json"):
            if (Path(path).parent / name).is_file():
                h.update(_special_settings(Path(path).parent / name).encode())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# the pre-tokenizer: Rust-regex patterns (\p{L}, \p{N}, \s) in Python's re, their classes spelled out


def _ranges(chars):
    """A regex class body for a sorted list of code points: runs written as a-z."""
    out, i = [], 0
    while i < len(chars):
        j = i
        while j + 1 < len(chars) and chars[j + 1] == chars[j] + 1:
            j += 1
        out.append(re.escape(chr(chars[i])) + ("-" + re.escape(chr(chars[j])) if j > i else ""))
        i = j + 1
    return "".join(out)


def _classes():
    """\\p{L}, \\p{N} by general category (unicodedata), and \\s as Unicode's White_Space property, which Rust's
    and Oniguruma's \\s follow (Python's own \\s adds \\x1c-\\x1f)."""
    cats = {"L": [], "N": []}
    for c in range(sys.maxunicode + 1):
        major = unicodedata.category(chr(c))[0]
        if major in cats:
            cats[major].append(c)
    white = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
             0x205F, 0x3000]
    return {r"\p{L}": _ranges(cats["L"]), r"\p{N}": _ranges(cats["N"]), r"\s": _ranges(white)}


_CLASSES = None


def compile_pattern(pattern):
    """A pre-tokenizer pattern in Python's re: \\p{L}, \\p{N} and \\s become explicit classes, \\S and \\P{..} their
    negation outside brackets. Anything else is left as Python reads it (these patterns use nothing else)."""
    global _CLASSES
    _CLASSES = _CLASSES or _classes()
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            esc = pattern[i:i + 2]
            if esc in ("\\p", "\\P"):
                end = pattern.index("}", i) + 1
                name, neg = "\\p" + pattern[i + 2:end], esc == "\\P"
            elif esc in ("\\s", "\\S"):
                end, name, neg = i + 2, r"\s", esc == "\\S"
            else:
                out.append(esc)
                i += 2
                continue
            if name not in _CLASSES or (neg and in_class):
                raise TokenizerError(f"{pattern[i:end]} in the pre-tokenizer pattern is not supported")
            body = _CLASSES[name]
            out.append(body if in_class else f"[{'^' if neg else ''}{body}]")
            i = end
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class and pattern[i - 1] not in "[^":
            in_class = False
        out.append(c)
        i += 1
    return re.compile("".join(out))


# -----------------------------------------------------------------------------
# byte-level BPE


def byte_alphabet():
    """GPT-2's byte -> character map that tokenizer.json's tokens are written in: printable bytes stand for
    themselves, the rest are shifted to 256 and up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


class BPE:
    """Byte-level BPE. ranks: {token bytes: id}; merges: {(left, right): rank} (tokenizer.json), or None, when
    a pair's rank is its merged token's id (tiktoken's files, whose ids are ranks). whole: a piece that is one
    token is that token without merging (tiktoken; tokenizer.json's ignore_merges)."""
    def __init__(self, pattern, ranks, merges=None, whole=True, specials=None, nfc=False):
        self.pattern, self.ranks, self.merges = compile_pattern(pattern), ranks, merges
        self.whole, self.nfc = whole, nfc
        self.specials = specials or {}  # {text: id}, ids past (or among) the ranks'
        self.bytes_of = {i: b for b, i in ranks.items()} | {i: s.encode() for s, i in self.specials.items()}
        self.cache = {}

    def pieces(self, text):
        """The pre-tokenizer's pieces, and any text between matches as a piece of its own (Split's Isolated)."""
        found = self.pattern.findall(text)
        if sum(map(len, found)) == len(text):
            return found
        out, at = [], 0
        for m in self.pattern.finditer(text):
            out += [text[at:m.start()]] * (m.start() > at) + [m.group()]
            at = m.end()
        return out + [text[at:]] * (at < len(text))

    def rank(self, left, right):
        """The merge rank of an adjacent pair (NONE: they never merge)."""
        if self.merges is None:
            return self.ranks.get(left + right, NONE)
        return self.merges.get((left, right), NONE)

    def merge(self, piece):
        """One piece's ids: its bytes merged pair by pair, the lowest-ranked adjacent pair first (leftmost on ties).
        ranks[i] is the rank of parts[i] + parts[i + 1]; a merge changes only its two neighbours' ranks."""
        b = piece.encode("utf-8")
        if self.whole and b in self.ranks:
            return [self.ranks[b]]
        parts = [b[i:i + 1] for i in range(len(b))]
        ranks = [self.rank(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        while ranks and (best := min(ranks)) != NONE:
            i = ranks.index(best)  # the leftmost of the lowest
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del ranks[i]
            if i < len(ranks):
                ranks[i] = self.rank(parts[i], parts[i + 1])
            if i > 0:
                ranks[i - 1] = self.rank(parts[i - 1], parts[i])
        return [self.ranks[p] for p in parts]

    def encode(self, text):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids, cache = [], self.cache
        for piece in self.pieces(text):
            got = cache.get(piece)
            if got is None:
                if len(cache) > 500_000:  # a bound on memory over a long corpus
                    cache.clear()
                got = cache[piece] = self.merge(piece)
            ids += got
        return ids

    def decode(self, ids):
        return b"".join(self.bytes_of[int(i)] for i in ids).decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# the files


def _json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not readable JSON ({e})") from None


def _special_settings(path):
    """The settings of a tokenizer_config.json or config.json that choose BOS, EOS and pad, as one string."""
    keys = ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id")
    j = _json(path)
    return json.dumps({k: j.get(k) for k in keys if isinstance(j, dict) and k in j}, sort_keys=True)


def read_tiktoken(path):
    """Meta's tokenizer.model: {token bytes: rank}, ranks 0..n-1, a `base64(bytes) rank` line each."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}: line {n} is not `base64(token) rank`: {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: its {len(ranks)} ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _pre_tokenizer(pre, path):
    """tokenizer.json's pre_tokenizer -> the one regex that cuts text into pieces (a Split's, or ByteLevel's own)."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    patterns = []
    for s in steps:
        if s.get("type") == "Split" and s.get("behavior") == "Isolated" and not s.get("invert") \
                and "Regex" in s.get("pattern", {}):
            patterns.append(s["pattern"]["Regex"])
        elif s.get("type") == "ByteLevel" and not s.get("add_prefix_space"):
            patterns += [GPT2_PATTERN] * s.get("use_regex", True)
        else:
            raise TokenizerError(f"{path}: pre_tokenizer {json.dumps(s)[:120]} is not supported (a Split regex, "
                                 "Isolated, then ByteLevel without a prefix space: Llama 3's and Qwen's)")
    if len(patterns) != 1:
        raise TokenizerError(f"{path}: pre_tokenizer splits {len(patterns)} times; one regex is supported")
    return patterns[0]


def read_tokenizer_json(path):
    """A Hugging Face tokenizer.json of byte-level BPE -> (BPE, {special text: id}, post-processor's BOS or None)."""
    j = _json(path)
    model, norm = j.get("model") or {}, j.get("normalizer")
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: model.type {model.get('type')!r}; a byte-level BPE is supported (sentencepiece "
                             "models belong in a tokenizer.model)")
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(f"{path}: model.{key} {model[key]!r} is not supported (byte-level BPE has none)")
    if norm is not None and norm.get("type") != "NFC":
        raise TokenizerError(f"{path}: normalizer {norm.get('type')!r} is not supported (none, or NFC as Qwen's)")
    pattern = _pre_tokenizer(j.get("pre_tokenizer") or {"type": "ByteLevel"}, path)
    # each token's characters back to its bytes, at C speed: through chr(byte), then Latin-1; a character outside
    # the alphabet becomes one Latin-1 cannot encode
    table = {c: 0xFFFF for c in range(256)} | {ord(c): b for b, c in byte_alphabet().items()}
    to_bytes = lambda t: t.translate(table).encode("latin-1")
    try:
        ranks = {to_bytes(t): i for t, i in model["vocab"].items()}
        pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        merges = {(to_bytes(a), to_bytes(b)): r for r, (a, b) in enumerate(pairs)}
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise TokenizerError(f"{path}: model.vocab / model.merges are not byte-level BPE ({e!r})") from None
    specials = {t["content"]: t["id"] for t in j.get("added_tokens", [])}
    if not all(type(i) is int and i >= 0 for i in [*ranks.values(), *specials.values()]):
        raise TokenizerError(f"{path}: a token id that is not a non-negative int")
    post = j.get("post_processor") or {}
    for p in post.get("processors", [post]):
        first = (p.get("single") or [{}])[0] if p.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            break
    bos = first["SpecialToken"]["id"] if "SpecialToken" in first else None
    try:
        bpe = BPE(pattern, ranks, merges, model.get("ignore_merges", False), specials, norm is not None)
    except (TokenizerError, re.error) as e:
        raise TokenizerError(f"{path}: pre_tokenizer regex: {e}") from None
    return bpe, specials, bos


_PARSED = {}  # (sha256, format) -> read_bpe's result: a process parses its tokenizer once, wherever the copy lies


def read_bpe(path, form):
    """(BPE, {special: id}, the BOS a tokenizer.json's post-processor puts first) of a tiktoken file or a
    tokenizer.json; the last file's parse is kept, for the same bytes read again."""
    key = (hashlib.sha256(Path(path).read_bytes()).hexdigest(), form)
    if key not in _PARSED:
        _PARSED.clear()
        _PARSED[key] = _read_bpe(path, form)
    return _PARSED[key]


def _read_bpe(path, form):
    if form == "json":
        try:
            bpe, specials, bos = read_tokenizer_json(path)
        except (AttributeError, KeyError, TypeError, IndexError) as e:  # a JSON of another shape
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
    else:  # Meta's specials follow its ranks
        ranks = read_tiktoken(path)
        specials, bos = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}, LLAMA3_SPECIALS[0]
        bpe = BPE(LLAMA3_PATTERN, ranks, whole=True, specials=specials)
    if lost := [b for b in range(256) if bytes([b]) not in bpe.ranks]:
        raise TokenizerError(f"{path}: no token for {len(lost)} of the 256 bytes (byte {lost[0]}, say): "
                             "not a byte-level BPE, which can encode any text")
    return bpe, specials, bos


class Tokenizer:
    """encode(text, bos, eos) -> ids and decode(ids) -> text over one of the three formats; bos_id, eos_id and
    pad_id (-1: none; pad is never EOS), add_bos (whether the format's own code puts BOS first), vocab_size."""
    def __init__(self, path):
        self.path, path = str(path), Path(path)
        try:
            form = file_format(path)
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read the tokenizer ({e.strerror or e})") from None
        if not form:
            raise TokenizerError(f"{path}: an empty file, not a tokenizer")
        self.sp = self.bpe = None
        if form == "sentencepiece":
            return self._from_sentencepiece(path)
        self.bpe, specials, bos = read_bpe(path, form)
        self.vocab_size = max(*self.bpe.ranks.values(), *specials.values()) + 1
        if form == "json":
            return self._from_json(path, specials, bos)
        names = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"  # Meta's BOS, EOS and pad
        self.bos_id, self.eos_id, self.pad_id = (specials[s] for s in names)
        self.add_bos = True  # Meta's reference encodes a prompt with bos=True

    def _from_sentencepiece(self, path):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # sentencepiece's way of saying the file is not a model
            raise TokenizerError(f"{path}: not a sentencepiece model, nor tiktoken's format, nor a tokenizer.json "
                                 f"({str(e).strip()[:200]})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()  # LLaMA has no pad: unk
        self.add_bos, self.vocab_size = self.bos_id >= 0, self.sp.vocab_size()

    def _from_json(self, path, specials, template_bos):
        """BOS, EOS and pad as transformers reads them: tokenizer_config.json's tokens, then config.json's ids;
        BOS first where the post-processor puts it there."""
        config = {}
        for name, suffix in (("config.json", "_id"), ("tokenizer_config.json", "")):  # the second one wins
            if (path.parent / name).is_file() and isinstance(j := _json(path.parent / name), dict):
                for k in ("bos", "eos", "pad"):
                    if k + "_token" + suffix in j:
                        config[k] = j[k + "_token" + suffix]
        for k in ("bos", "eos", "pad"):
            v = config.get(k)
            v = v[0] if isinstance(v, list) and v else v  # config.json's eos_token_id may list several
            v = v.get("content") if isinstance(v, dict) else v  # tokenizer_config's {"content": ...}
            if isinstance(v, str):
                if v not in specials and v.encode() not in self.bpe.ranks:
                    raise TokenizerError(f"{path.parent}: {k}_token {v!r} is not a token of {path}")
                v = specials.get(v, self.bpe.ranks.get(v.encode()))
            setattr(self, k + "_id", v if isinstance(v, int) and 0 <= v < self.vocab_size else -1)
        self.add_bos = template_bos is not None
        if self.add_bos:
            if template_bos not in specials:
                raise TokenizerError(f"{path}: the post_processor puts {template_bos!r} first, not an added token")
            self.bos_id = specials[template_bos]
        if self.pad_id < 0 or self.pad_id == self.eos_id:
            self.pad_id = 1 if self.eos_id == 0 else 0  # only ever under a masked target: any id but EOS

    def encode(self, s, bos=False, eos=False):
        ids = self.sp.encode(s) if self.sp is not None else self.bpe.encode(s)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        if self.sp is not None:
            return self.sp.decode([int(i) for i in ids])
        return self.bpe.decode(ids)
