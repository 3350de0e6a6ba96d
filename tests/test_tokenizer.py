"""
Our pure-Python byte-level BPE tokenizer (tokenizer.py) against the references, over a corpus of more than 1 MiB in
many scripts (OASST1's messages, hand-written lines in a dozen scripts, adversarial whitespace, contractions, digits
and Unicode edge cases, every pair of those glued together):

- Meta's Llama 3 tokenizer.model (tiktoken's format): ids equal tiktoken's encode_ordinary with Meta's pattern;
- the same vocabulary as Hugging Face tokenizer.json files written by transformers' TikTokenConverter: Llama 3's
  (BOS first), one with Qwen's pre-tokenizer and NFC normalizer (no BOS), one in GPT-2's style: ids equal the
  tokenizers library's, and BOS, EOS and vocab size are what transformers' AutoTokenizer says for the folder;
- decode(encode(s)) == s throughout (NFC(s) under Qwen's normalizer);
- sentencepiece files (Mistral v1 and v3, Llama 2) load, give sentencepiece's ids and round-trip;
- find_tokenizer prefers tokenizer.model, falls back to tokenizer.json, and names the folder when neither is there.
A mismatch reports the document, the first differing id with the text there, and a shrunken failing string.
tiktoken, tokenizers and transformers are test-only: their tests skip with the reason where one is absent.
"""
import base64
import functools
import json
import random
import re
import shutil
import subprocess
import sys
import unicodedata

import pytest

from conftest import LLAMA3_PATTERN, ROOT, SPECIALS, asset, peer
from tokenizer import Tokenizer, TokenizerError, byte_alphabet, find_tokenizer

# ----------------------------------------------------------------------------- the corpus

SCRIPTS = {
    "latin": [
        "Le cœur a ses raisons que la raison ne connaît point.",
        "Ça m'a coûté très cher, mais l'été à Besançon était magnifique.",
        "Größere Straßen führen über die Brücke nach Düsseldorf; übermäßig viel Öl!",
        "Zażółć gęślą jaźń — pchnąć w tę łódź jeża lub ośm skrzyń fig.",
        "Příliš žluťoučký kůň úpěl ďábelské ódy.",
        "Tiếng Việt có nhiều dấu: người, được, những, không, Hà Nội.",
        "Pijamalı hasta yağız şoföre çabucak güvendi. İstanbul'da ılık bir gün.",
        "El niño comió piñones en la peña; ¿qué más? ¡Olé!",
        "Þú ert með ótrúlega fallegt hár, sagði Guðrún við Ægi.",
        "São Paulo é a maior cidade do Brasil; a população não pára de crescer.",
        "Æblegrød med flødeskum på Østerbro, søndag kl. 14.",
        "Știința și țara își așteaptă răspunsul.",
    ],
    "english": [
        "I'm sure you'll see they've done what we'd said: it's John's, isn't it?",
        "DON'T PANIC. I'M FINE, WE'LL SEE. THEY'RE HERE AND YOU'VE WON; SHE'D KNOW. IT'S JOHN'S.",
        "Don'T mIx'Em'Ll uP'Ve wE'rE 'S 'T 'D 'M 'LL 'VE 'RE",
        "The quick brown fox jumps over the lazy dog. 'Quoted' and \"double-quoted\" words.",
        "rock 'n' roll, ’curly’ apostrophes aren’t contractions, o'clock, y'all'd've.",
    ],
    "cyrillic": [
        "Съешь же ещё этих мягких французских булок, да выпей чаю.",
        "В чащах юга жил бы цитрус? Да, но фальшивый экземпляр!",
        "Їжак з'їв ґудзик, а єнот пішов додому.",
        "Љубазни фењерџија чађавог лица хоће да ми покаже штос.",
        "ПРОГРАММИРОВАНИЕ НА ЯЗЫКЕ PYTHON — ЭТО ПРОСТО.",
        "Москва, 12 апреля 1961 года: «Поехали!» — сказал Гагарин.",
    ],
    "arabic_hebrew": [
        "اللغة العربية هي إحدى أكثر اللغات انتشاراً في العالم.",
        "مرحباً بكم في مدينة القاهرة، عاصمة جمهورية مصر العربية.",
        "كَتَبَ الطَّالِبُ الدَّرْسَ بِعِنَايَةٍ.",
        "الرقم ١٢٣٤٥٦٧٨٩٠ مكتوب بالأرقام العربية الهندية.",
        "هل تتحدث الإنجليزية؟ نعم، قليلاً؛ شكراً لك!",
        "שלום עולם! זהו משפט בעברית עם ניקוד: בְּרֵאשִׁית בָּרָא.",
        "תל אביב-יפו היא עיר על חוף הים התיכון.",
    ],
    "devanagari": [
        "हिन्दी भारत की राजभाषा है और करोड़ों लोग इसे बोलते हैं।",
        "नमस्ते! आप कैसे हैं? मैं ठीक हूँ, धन्यवाद।",
        "संस्कृतम् जगतः एकतमा अतिप्राचीना समृद्धा शास्त्रीया च भाषा।",
        "मूल्य: ₹१२,३४५.६७ — क्षत्रिय, ज्ञान, श्री, द्वार।",
    ],
    "cjk": [
        "我能吞下玻璃而不伤身体。今天天气很好，我们去公园散步吧！",
        "人工智能（AI）正在改变世界：从医疗到教育，无处不在。",
        "東京は日本の首都です。ひらがな、カタカナ、漢字を混ぜて書きます。",
        "ｶﾀｶﾅの半角と全角：アイウエオ、ＡＢＣ１２３。",
        "한국어: 다람쥐 헌 쳇바퀴에 타고파. 안녕하세요, 반갑습니다!",
        "繁體中文：臺灣的夜市非常熱鬧，滷肉飯與珍珠奶茶都很受歡迎。",
        "豈更車賈 are CJK compatibility ideographs (NFC maps them).",
    ],
    "thai_greek": [
        "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ สวัสดีครับ ขอบคุณมากค่ะ",
        "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Η ΕΛΛΑΔΑ είναι όμορφη· ναι;",
        "ΣΊΣΥΦΟΣ καὶ ὁ λόγος, ᾅδης, ᾠδή: πολυτονικό.",
    ],
    "emoji": [
        "Family: 👨‍👩‍👧‍👦, flags: 🏳️‍🌈 🇺🇦 🇯🇵 🏴‍☠️, hands: 👋🏽 👍🏿 🤝🏻.",
        "I ❤️ coding 💻🔥🔥🔥 — ✅ done, ❌ failed, ⚠️ warning!",
        "🧑🏾‍🚀👩🏼‍🔬🏃‍♀️ 👁️‍🗨️ keycaps 1️⃣2️⃣#️⃣ and 😀😃😄😁😆",
    ],
    "code": [
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\tfor (int i = 0; i < 10; ++i) { x[i] <<= 2; }\n\treturn 0;\n}\n",
        "const f = async (x) => { await fetch(`/api/${x}?q=1&r=2`); };  // TODO: retry\n",
        "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name HAVING COUNT(*) > 1;\n",
        "{\"key\": [1, 2.5e-10, null, true], \"nested\": {\"a\": \"b\\u00e9\"}}\n",
        "    if (ptr != NULL && *ptr == '\\0') {\r\n        return -1;\r\n    }\r\n",
        "<div class=\"x\">&lt;tag&gt; &amp;&nbsp;</div>\n",
        "#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\"; done\n",
    ],
    "numbers": [
        "12345678901234567890", "3.14159265358979", "1,234,567.89", "0xDEADBEEF", "1e-9", "2024-12-31T23:59:59Z",
        "+1 (555) 012-3456", "٣٫١٤", "१२३४५६", "１２３４５", "²³¹ ½ ¾ Ⅻ ⅷ ①②", "000000000000", "v1.2.3-rc.4",
    ],
}
# Where pre-tokenizers differ: whitespace classes (Python's str.isspace also counts \x1c-\x1f; \s does not; NBSP,
# U+2028, NEL are \s but not [\r\n]), contractions under (?i) (ſ folds to s; Kelvin K and Ohm are NFC-mapped),
# marks with no letter before them, joiners, digits of other scripts
ADVERSARIAL = [
    "\r\n", "\r\r\n\n", "\n\n\n", "\r", "   ", "\t\t", " \t \n", "  \n  ", "\n \n", "x  \n  y", "end   ", "   start",
    "DON'T", "I'M", "WE'LL", "THEY'RE", "YOU'VE", "SHE'D", "'S", "'s", "'ſ", "'ſt", "'\u212a", "''", "'''s", " 's",
    "’s", "'LL'VE'RE", "ſ", "\u212a", "\u2126", "\u212b", "ﬁ", "ǅ", "e\u0301", "\u0301", "a\u0301\u0302\u0303",
    "\u0301\u0301x",
    "\u00a0", "x\u00a0y", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c\x1d\x1e\x1f", "a\x1cb", " \x1f\n", "\x85", "\u200b",
    "\u200d", "\ufeff", "\u3000", "\u180e", "\u2009", "\u202f", "\x00", "\x7f", "!!!", " ...\r\n", "?!\n\n", "_x",
    "__init__", "1234567", "1١2", "ʰʲ", "①", "Ⅻ", "👍🏽", "🏳️‍🌈", "👨‍👩‍👧‍👦", "ᄀᄀ", "가각", "ไทย", "שָׁלוֹם", "ΑΣ", "ﾊﾟ",
]
# Long runs: where a naive BPE is quadratic, and where the whitespace rules meet at the end of a run
LONG = ["=" * 120, "-" * 80, "ab" * 100, "9" * 300, base64.b64encode(bytes(range(256))).decode(), " " * 1000,
        "\n" * 200, "\t" * 50, "\u3000" * 40, "!" * 64]
SEPARATORS = [" "] * 6 + ["\n", "\n\n", "\r\n", "\t", "  ", "", " \n", "\n\n\n"]


@functools.cache
def oasst_texts():
    """Every message text of the 100 OASST1 trees (nested prompt -> replies), depth first."""
    texts = []

    def walk(message):
        texts.append(message["text"])
        for reply in message["replies"]:
            walk(reply)
    for line in asset("oasst1", "en_100_tree.jsonl").read_text(encoding="utf-8").splitlines():
        walk(json.loads(line)["prompt"])
    return texts


@functools.cache
def generated():
    """Every pair of the adversarial bits glued together (their edges meet at the start, the end and each other),
    the long runs, then seeded random documents of 1-4 KB of the scripts' lines with separators, a tenth of the lines
    in capitals, up to 600 KB."""
    docs = [a + b for a in ADVERSARIAL for b in ADVERSARIAL] + LONG
    lines = [line for pool in SCRIPTS.values() for line in pool] + ADVERSARIAL + LONG
    rng = random.Random(1337)
    size = sum(len(d.encode()) for d in docs)
    while size < 600_000:
        parts, n = [], rng.randrange(1000, 4000)
        while sum(map(len, parts)) < n:
            line = rng.choice(lines)
            parts += [line.upper() if rng.random() < 0.1 else line, rng.choice(SEPARATORS)]
        docs.append("".join(parts))
        size += len(docs[-1].encode())
    return docs


def corpus():
    """The documents the parity tests encode one by one, as real use does: OASST1's messages, then generated()."""
    return oasst_texts() + generated()


def test_the_corpus_is_over_a_megabyte_in_many_scripts():
    docs = corpus()
    assert sum(len(d.encode()) for d in docs) >= 2**20
    text = "".join(docs)
    for line in [line for pool in SCRIPTS.values() for line in pool] + ADVERSARIAL:
        assert line in text, line
    assert not any(s in text for s in SPECIALS), "a special-token string: references would parse it as one"
    assert generated.__wrapped__() == generated()  # the same documents every run


# ----------------------------------------------------------------------------- comparing ids

def shrink(s, fails):
    """A short string on which fails() still holds: drop chunks of halving size while the failure stays."""
    n = len(s) // 2
    while n >= 1:
        i = 0
        while i < len(s):
            t = s[:i] + s[i + n:]
            if t and fails(t):
                s = t
            else:
                i += n
        n //= 2
    return s


def assert_same_ids(docs, ours, theirs, decode):
    """ours, theirs: str -> ids; decode: the reference's ids -> str. Fails on the first document where they differ,
    with the position, the ids and the text there, and a short string that fails too."""
    def run(f, s):
        try:
            return f(s)
        except Exception as e:  # a crash of ours is a failure to shrink too
            return repr(e)
    for k, doc in enumerate(docs):
        a, b = run(ours, doc), theirs(doc)
        if a == b:
            continue
        if isinstance(a, str):
            i = 0
        else:
            i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        at = len(decode(b[:i]))
        small = shrink(doc, lambda s: run(ours, s) != theirs(s))
        pytest.fail(f"document {k} of {len(docs)} ({len(doc)} chars) differs at id {i}, char ~{at}:\n"
                    f"  text there: {doc[max(0, at - 40):at]!r} | {doc[at:at + 40]!r}\n"
                    f"  ours:   {a if isinstance(a, str) else a[max(0, i - 3):i + 5]}\n"
                    f"  theirs: {b[max(0, i - 3):i + 5]} = {[decode([t]) for t in b[max(0, i - 3):i + 5]]}\n"
                    f"  shrunk: {small!r}: ours {run(ours, small)}, theirs {theirs(small)} = "
                    f"{[decode([t]) for t in theirs(small)]}", pytrace=False)


def assert_round_trips(docs, tok, encode, expect=lambda s: s):
    for k, doc in enumerate(docs):
        back = tok.decode(encode(doc))
        if back != expect(doc):
            small = shrink(doc, lambda s: tok.decode(tok.encode(s)) != expect(s))
            pytest.fail(f"document {k}: decode(encode(s)) != {'s' if expect(doc) == doc else 'NFC(s)'}; shrunk: "
                        f"{small!r} -> ids {tok.encode(small)} -> {tok.decode(tok.encode(small))!r}", pytrace=False)


@functools.cache
def load(path):
    """Our tokenizer, once per file: building 128k ranks takes a moment."""
    return Tokenizer(path)


@functools.cache
def encoder(path):
    """Our encode for that file, remembering each document's ids: the parity and round-trip tests share them."""
    return functools.cache(load(path).encode)


# ----------------------------------------------------------------------------- Meta's tiktoken file

@pytest.fixture(scope="module")
def llama3_model():
    return asset("llama3_tokenizer", "tokenizer.model")


@pytest.fixture(scope="module")
def tiktoken_ref(llama3_model):
    tiktoken = peer("tiktoken", "the reference for Meta's Llama 3 tokenizer.model")
    load_tiktoken_bpe = peer("tiktoken.load", "the reference for Meta's Llama 3 tokenizer.model").load_tiktoken_bpe
    ranks = load_tiktoken_bpe(str(llama3_model))
    return tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={s: len(ranks) + i for i, s in enumerate(SPECIALS)})


def test_meta_tiktoken_file_loads_with_metas_specials(llama3_model):
    tok = load(llama3_model)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (128000, 128001, 128256, True)
    assert isinstance(tok.pad_id, int)
    assert tok.encode("hi", bos=True, eos=True) == [128000, *tok.encode("hi"), 128001]


def test_meta_tiktoken_file_ids_equal_tiktoken(llama3_model, tiktoken_ref):
    assert_same_ids(corpus(), encoder(llama3_model), tiktoken_ref.encode_ordinary, tiktoken_ref.decode)


def test_meta_tiktoken_file_round_trips(llama3_model):
    assert_round_trips(corpus(), load(llama3_model), encoder(llama3_model))


# ----------------------------------------------------------------------------- Hugging Face tokenizer.json files

HF = ["llama3", "qwen", "gpt2"]


@pytest.mark.parametrize("name", HF)
def test_tokenizer_json_ids_equal_tokenizers(bpe_folders, name):
    tokenizers = peer("tokenizers", "the reference for tokenizer.json files")
    ref = tokenizers.Tokenizer.from_file(str(bpe_folders[name] / "tokenizer.json"))
    pieces = {"llama3": ["DON", "'T", " ", "123", "45"], "qwen": ["DON", "'T", " ", *"12345"],  # the edits took
              "gpt2": ["DON", "'", "T", " ", "123", "45"]}[name]
    assert [ref.decode([i]) for i in ref.encode("DON'T 12345", add_special_tokens=False).ids] == pieces
    theirs = {d: e.ids for d, e in zip(corpus(), ref.encode_batch(corpus(), add_special_tokens=False))}  # at once
    assert_same_ids(corpus(), encoder(bpe_folders[name] / "tokenizer.json"),
                    lambda s: theirs[s] if s in theirs else ref.encode(s, add_special_tokens=False).ids, ref.decode)


@pytest.mark.parametrize("name", HF)
def test_tokenizer_json_round_trips(bpe_folders, name):
    path = bpe_folders[name] / "tokenizer.json"
    nfc = functools.partial(unicodedata.normalize, "NFC")
    assert_round_trips(corpus(), load(path), encoder(path), nfc if name == "qwen" else lambda s: s)


PROMPTS = ["Hello world", " leading space", "DON'T stop\r\n", "नमस्ते, 世界! 👨‍👩‍👧‍👦", "x = 12345\n\n", ""]


@pytest.mark.parametrize("name", HF)
def test_default_bos_and_specials_are_transformers(bpe_folders, name):
    peer("transformers", "the reference for what a Hugging Face folder puts first")
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(bpe_folders[name])
    tok = load(bpe_folders[name] / "tokenizer.json")
    assert tok.add_bos == {"llama3": True, "qwen": False, "gpt2": False}[name]
    assert tok.bos_id == (-1 if auto.bos_token_id is None else auto.bos_token_id)
    assert tok.eos_id == auto.eos_token_id == 128001
    assert tok.vocab_size == len(auto) == 128256
    assert isinstance(tok.pad_id, int)
    for prompt in PROMPTS:
        assert tok.encode(prompt, bos=tok.add_bos) == auto(prompt)["input_ids"], prompt


# ----------------------------------------------------------------------------- sentencepiece files

SENTENCEPIECE = {"mistral v1": ("mistral_tokenizers", "tokenizer.model.v1", 32000),
                 "mistral v3": ("mistral_tokenizers", "tokenizer.model.v3", 32768),
                 "llama 2": ("llama2_tokenizer", "tokenizer.model", 32000)}


@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_sentencepiece_files_load_match_and_round_trip(name, tmp_path):
    spm = peer("sentencepiece", "the reference for sentencepiece files")
    folder, file, vocab = SENTENCEPIECE[name]
    path = tmp_path / "tokenizer.model"  # Mistral's files are named .v1/.v3; a model folder names it so
    shutil.copy(asset(folder, file), path)
    ref = spm.SentencePieceProcessor(model_file=str(path))
    tok = Tokenizer(path)
    assert tok.vocab_size == ref.vocab_size() == vocab
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (ref.bos_id(), ref.eos_id(), True)
    assert isinstance(tok.pad_id, int)
    # these files normalize nothing (identity, no whitespace squeeze): every script round-trips, bytes by fallback
    docs = [line for pool in SCRIPTS.values() for line in pool] + ADVERSARIAL + generated()[-20:]
    assert_same_ids(docs, tok.encode, ref.encode, ref.decode)
    assert_round_trips(docs, tok, tok.encode)
    assert tok.encode("Hello", bos=True, eos=True) == [ref.bos_id(), *ref.encode("Hello"), ref.eos_id()]


# ----------------------------------------------------------------------------- find_tokenizer

def test_find_tokenizer_prefers_the_model_file(tmp_path):
    assert tmp_path.is_dir()
    with pytest.raises(TokenizerError) as e:
        find_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.json"
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"
    assert find_tokenizer(str(tmp_path)) == tmp_path / "tokenizer.model"


# ----------------------------------------------------------------------------- what is refused, in one line

def byte_level_json():
    """The smallest byte-level BPE tokenizer.json: the 256 bytes, no merges, GPT-2's pre-tokenizer."""
    return dict(model=dict(type="BPE", vocab={c: b for b, c in byte_alphabet().items()}, merges=[]),
                pre_tokenizer=dict(type="ByteLevel", add_prefix_space=False, use_regex=True), added_tokens=[])


@pytest.mark.parametrize("change, says", [
    (lambda j: j["model"].update(type="Unigram"), "model.type 'Unigram'"),
    (lambda j: j["model"].update(byte_fallback=True), "model.byte_fallback True is not supported"),
    (lambda j: j.update(normalizer=dict(type="Lowercase")), "normalizer 'Lowercase' is not supported"),
    (lambda j: j.update(pre_tokenizer=dict(type="Metaspace", replacement="▁")), "pre_tokenizer {\"type\": \"Metaspace\""),
    (lambda j: j["model"]["vocab"].pop("A"), "no token for 1 of the 256 bytes"),
    (lambda j: j["model"].update(merges=[["A", "no such token"]]), "not byte-level BPE"),
    (lambda j: j.update(added_tokens=[{"id": 256}]), "not a Hugging Face tokenizer.json (KeyError"),
    (lambda j: j["model"]["vocab"].update(A="65"), "a token id that is not a non-negative int"),
    (lambda j: j.update(pre_tokenizer=dict(type="Split", pattern=dict(Regex="\\p{Lu}+"), behavior="Isolated")),
     "pre_tokenizer regex: \\p{Lu} in the pre-tokenizer pattern is not supported"),
    (lambda j: j.update(pre_tokenizer=dict(type="Split", pattern=dict(Regex="(unclosed"), behavior="Isolated")),
     "pre_tokenizer regex: missing )"),
    (lambda j: j.update(model=["not", "an", "object"]), "not a Hugging Face tokenizer.json (AttributeError"),
])
def test_a_tokenizer_json_it_cannot_read_is_refused_naming_the_key(tmp_path, change, says):
    j = byte_level_json()
    change(j)
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    with pytest.raises(TokenizerError, match="^" + re.escape(f"{tmp_path / 'tokenizer.json'}: ") + ".*" + re.escape(says)):
        Tokenizer(tmp_path / "tokenizer.json")


def test_the_smallest_tokenizer_json_reads_and_refusals_are_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(byte_level_json()))
    tok = Tokenizer(tmp_path / "tokenizer.json")
    assert tok.encode("Hi!") == [ord("H"), ord("i"), ord("!")] and tok.decode(tok.encode("ﬁ é")) == "ﬁ é"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(eos_token="<|eos|>")))
    with pytest.raises(TokenizerError, match="eos_token '<\\|eos\\|>' is not a token of"):
        Tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"model": ')  # cut short
    for args in (["sample.py"], ["eval.py", "--text=README.md"]):
        p = subprocess.run([sys.executable, *args, f"--init_from={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert p.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'tokenizer.json'}: not readable JSON")
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\nIg== x\n")  # tiktoken's format, a bad rank
    with pytest.raises(TokenizerError, match="line 2 is not `base64\\(token\\) rank`"):
        Tokenizer(tmp_path / "tokenizer.model")
