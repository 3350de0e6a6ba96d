# Bad input is an error that names the file, never a wrong tensor or an internal exception: a fuzz of the
# safetensors reader against the safetensors library itself, malformed headers, configs, indexes, bitsandbytes
# quant states and PEFT adapters (also under python -O), sample.py's flags, OASST1 files and prepared folders.
import gzip, json, math, random, re, subprocess, sys

import numpy as np
import pytest
import torch

import checkpoint as C
import model as M
import qlora as Q
import sample
from conftest import ROOT
from data.batching import load_split
from data.oasst1 import prepare as P

SAMPLE_TOK = ROOT / "data" / "sample" / "tokenizer.model"  # 360 ids


def header_of(blob):
    n = int.from_bytes(blob[:8], "little")
    return n, json.loads(blob[8:8 + n]), blob[8 + n:]


def with_header(header, data, pad=True):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * (-len(h) % 8 if pad else 0)
    return len(h).to_bytes(8, "little") + h + data

# ----------------------------------------------------------------------------- the safetensors reader, fuzzed


def fuzz_tensors():  # every dtype width, a scalar, an empty tensor
    return {"tok.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
            "ids": torch.tensor([5, -2, 2**40], dtype=torch.int64), "half": torch.tensor([0.5, -1.25]).bfloat16(),
            "empty": torch.zeros(0, 3, dtype=torch.float16), "scalar": torch.tensor(7, dtype=torch.uint8),
            "flags": torch.tensor([True, False, True])}


JSONISH = b'0123456789[]{},:" -.eEFIU'


def mutate(rng, blob):
    """One random corruption of a safetensors file: (kind, bytes). Most keep the header valid JSON with a wrong
    layout (a number changed, a tensor moved, a wrong header length), which is what a reader can get wrong."""
    n = int.from_bytes(blob[:8], "little")
    head, data = bytearray(blob[8:8 + n]), bytearray(blob[8 + n:])
    kind = rng.choice(["number", "number", "shift", "shift", "length", "length", "swap", "byte", "delete", "insert",
                       "data", "tail"])
    if kind == "number":  # an offset or a dimension becomes another
        s, e = rng.choice([m.span() for m in re.finditer(rb"\d+", head)])
        old = int(head[s:e])
        head[s:e] = str(max(0, rng.choice([old + 1, old - 1, old + 2, old * 2, old // 2, 0, old + 8, old - 8,
                                           rng.randrange(64)]))).encode()
    elif kind == "shift":  # one tensor moved by a few bytes, its size kept: a gap and an overlap
        s, e = rng.choice([m.span(1) for m in re.finditer(rb'"data_offsets":\[(\d+,\d+)\]', head)])
        k = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
        head[s:e] = b",".join(str(max(int(x) + k, 0)).encode() for x in head[s:e].split(b","))
    elif kind == "swap":  # two tensors' offsets exchanged: still a tiling when the sizes agree
        (a, b), (c, d) = sorted(rng.sample([m.span() for m in re.finditer(rb'"data_offsets":\[\d+,\d+\]', head)], 2))
        head = head[:a] + head[c:d] + head[b:c] + head[a:b] + head[d:]
    elif kind == "byte":
        head[rng.randrange(len(head))] = rng.choice(JSONISH)
    elif kind == "delete":
        del head[rng.randrange(len(head))]
    elif kind == "insert":
        head.insert(rng.randrange(len(head)), rng.choice(JSONISH))
    elif kind == "data":  # the header intact: the reader must return exactly these bytes
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "tail":
        data = data[:-rng.randrange(1, 9)] if rng.random() < 0.5 else data + bytes(rng.randrange(1, 9))
    length = len(head) + (rng.choice([-7, -5, -3, -2, -1, 1, 2, 3, 8]) if kind == "length" else 0)
    return kind, length.to_bytes(8, "little") + bytes(head) + bytes(data)


def raw_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).tolist()


def fuzz_reader(read, error, path, rounds=400, seed=0):
    """Mutated files: read(path) raises `error` naming the file, or yields the safetensors library's tensors, bit
    for bit. Returns (problems, counts of each outcome)."""
    from safetensors.torch import load
    for k in range(8):  # a header with 4+ bytes of padding, so a shorter header length can land in it
        C.save_safetensors(path, fuzz_tensors(), {"format": "pt", "pad": "x" * k})
        n, _, _ = header_of(blob := path.read_bytes())
        if blob[4 + n:8 + n] == b"    ":
            break
    rng, problems, counts = random.Random(seed), [], dict(refused=0, agreed=0, stricter=0)
    for i in range(rounds):
        kind, b = mutate(rng, blob)
        path.write_bytes(b)
        try:
            theirs = load(b)
        except Exception:  # safetensorsError and friends: the library refuses these bytes
            theirs = None
        try:
            ours = dict(read(path))
        except error as e:
            ours = None
            if str(path) not in str(e):
                problems.append((i, kind, f"error without the file name: {e}"))
        except Exception as e:  # an internal exception is a failure of the reader
            problems.append((i, kind, f"{type(e).__name__}: {e}"))
            continue
        if ours is None:
            counts["refused" if theirs is None else "stricter"] += 1
        elif theirs is None:
            problems.append((i, kind, f"accepted what safetensors refuses: {sorted(ours)}"))
        elif ours.keys() != theirs.keys() or any(v.dtype != theirs[k].dtype or v.shape != theirs[k].shape or
                                                 raw_bytes(v) != raw_bytes(theirs[k]) for k, v in ours.items()):
            problems.append((i, kind, "tensors differ from the safetensors library's"))
        else:
            counts["agreed"] += 1
    return problems, counts


def test_fuzz_reader_refuses_or_agrees_with_safetensors(tmp_path):
    pytest.importorskip("safetensors", reason="the fuzz compares with the safetensors library (requirements-dev)")
    problems, counts = fuzz_reader(C.read_safetensors, C.CheckpointError, tmp_path / "f.safetensors")
    assert not problems, problems[:5]
    # both outcomes were exercised: refused corruptions, and accepted files (changed data bytes, swapped tensors)
    assert counts["refused"] > 100 and counts["agreed"] > 20, counts


def test_fuzz_catches_a_lax_reader(tmp_path):
    """The fuzz can fail: a reader that checks only that each tensor lies in the file (as this project's did)."""
    pytest.importorskip("safetensors", reason="the fuzz compares with the safetensors library (requirements-dev)")

    def lax(path):
        b = path.read_bytes()
        n, h, data = header_of(b)
        h.pop("__metadata__", None)
        for name, info in h.items():
            s, e = info["data_offsets"]
            if e > len(data):
                raise C.CheckpointError(f"{path}: {name} outside")
            yield name, torch.frombuffer(bytearray(data[s:e]) or bytearray(1), dtype=torch.uint8)[:e - s].view(
                C.SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    problems, _ = fuzz_reader(lax, C.CheckpointError, tmp_path / "f.safetensors", rounds=200)
    kinds = {kind for _, kind, what in problems if what.startswith("accepted")}
    assert {"shift", "length", "tail"} <= kinds, kinds  # overlaps, a header length into the padding, a gap

# ----------------------------------------------------------------------------- malformed safetensors headers


def good_file(tmp_path):
    p = tmp_path / "x.safetensors"
    C.save_safetensors(p, {"a": torch.ones(2, 3), "b": torch.arange(4)})
    return p


@pytest.mark.parametrize("change, message", [
    (lambda h: [1, 2], r"header is a JSON list, not an object of tensors"),
    (lambda h: "tensors", r"header is a JSON str"),
    (lambda h: dict(h, a=7), r"tensor 'a': its entry is a JSON int"),
    (lambda h: dict(h, a=dict(h["a"], dtype="F33")), r"tensor 'a' has unsupported dtype 'F33'"),
    (lambda h: dict(h, a=dict(h["a"], dtype=["F32"])), r"tensor 'a' has unsupported dtype \['F32'\]"),
    (lambda h: dict(h, a=dict(h["a"], shape=[2, -3])), r"tensor 'a': shape must be a list of non-negative ints"),
    (lambda h: dict(h, a=dict(h["a"], shape=[True, 6])), r"tensor 'a': shape must be a list"),  # true is no 1
    (lambda h: dict(h, a=dict(h["a"], shape="2,3")), r"tensor 'a': shape must be a list"),
    (lambda h: dict(h, a=dict(h["a"], data_offsets=[0, 24, 1])), r"tensor 'a': data_offsets must be two ints"),
    (lambda h: {k: v for k, v in h.items() if k != "b"} | {"a": dict(h["a"], shape=[3, 2])}, r"32 bytes of the data "
     r"section after the last tensor 'a' belong to none"),
    (lambda h: dict(h, a=dict(h["a"], shape=[2, 2], data_offsets=[0, 16])), r"tensor 'b' starts at byte 24 .* "
     r"tensor 'a' ends at 16: a gap"),
    (lambda h: dict(h, b=dict(h["b"], data_offsets=[16, 48])), r"tensor 'b' starts at byte 16 .* tensor 'a' ends "
     r"at 24: overlapping"),
    (lambda h: dict(h, __metadata__={"format": 1}), r"__metadata__ must map strings to strings"),
])
def test_malformed_headers_name_file_and_tensor(tmp_path, change, message):
    p = good_file(tmp_path)
    _, h, data = header_of(p.read_bytes())
    p.write_bytes(with_header(change(h), data))
    with pytest.raises(C.CheckpointError, match=re.escape(str(p)) + ": " + message):
        list(C.read_safetensors(p))


def test_header_length_and_raw_json_faults(tmp_path):
    p = good_file(tmp_path)
    b = p.read_bytes()
    n, h, data = header_of(b)
    pad = n - len(json.dumps(h, separators=(",", ":")))
    assert pad >= 1
    p.write_bytes((n - pad).to_bytes(8, "little") + b[8:])  # the length stops at the header's end, in its padding
    with pytest.raises(C.CheckpointError, match=rf"{pad} bytes of the data section after the last tensor 'b'"):
        list(C.read_safetensors(p))
    raw = json.dumps(h).encode()
    for bad, what in ((b'{"a": {"dtype": "F32"}, ' + raw[1:], "duplicate key 'a'"),
                      (b'{"\\ud800": 1}', "surrogate"), (b'{"x": [' * 3000 + b']}' * 3000, "recursion"),
                      (b'{"a": {"shape": [NaN]}}', "NaN is not JSON"), ("{\"é\": 1}".encode("latin-1"), "utf-8")):
        p.write_bytes(with_header(bad, data))
        with pytest.raises(C.CheckpointError, match=rf"{p}: header is not valid JSON \(.*{what}"):
            list(C.read_safetensors(p))
    with pytest.raises(C.CheckpointError, match=rf"{tmp_path / 'none.safetensors'}: cannot read the file"):
        list(C.read_safetensors(tmp_path / "none.safetensors"))

# ----------------------------------------------------------------------------- configs, indexes, torch files


def tiny_dir(path, **kw):
    """A Hugging Face folder of a random tiny LLaMA that the sample tokenizer fits; returns the model."""
    args = M.ModelArgs(**{**dict(dim=32, n_layers=1, n_heads=2, vocab_size=360, hidden_dim=48, max_seq_len=64,
                                 norm_eps=1e-5), **kw})
    model = M.Transformer(args)
    path.mkdir(parents=True, exist_ok=True)
    C.save_safetensors(path / "model.safetensors", model.state_dict())
    (path / "config.json").write_text(json.dumps(C.hf_config(args, torch.float32)))
    (path / "tokenizer.model").write_bytes(SAMPLE_TOK.read_bytes())
    return model


def set_config(path, **changes):
    c = json.loads((path / "config.json").read_text())
    c.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in c.items() if v is not ...}))


@pytest.mark.parametrize("changes, message", [
    (dict(num_hidden_layers=...), "missing 'num_hidden_layers'"),
    (dict(hidden_size="32"), "hidden_size must be a positive int, not '32'"),
    (dict(num_attention_heads=True), "num_attention_heads must be a positive int, not True"),
    (dict(intermediate_size=0), "intermediate_size must be a positive int, not 0"),
    (dict(rms_norm_eps=-1), "rms_norm_eps must be a positive float"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings must be a bool"),
    (dict(num_key_value_heads=3), "2 heads are not a multiple of 3 kv heads"),
    (dict(head_dim=7), "head_dim 7 is not a positive even number"),
    (dict(rope_scaling=[1]), "rope_scaling must be an object"),
    (dict(num_hidden_layers=10_000_000), r"describes a model of [\d,]+ parameters \(10,000,000 layers, dim 32\), "
     r"more than its weight files' [\d,]+ bytes"),  # refused before 10 million blocks are built
])
def test_bad_config_json(tmp_path, changes, message):
    tiny_dir(tmp_path)
    set_config(tmp_path, **changes)
    with pytest.raises(C.CheckpointError, match=re.escape(str(tmp_path / "config.json")) + ": " + message):
        C.load_model(tmp_path)


def test_config_not_an_object_and_not_json(tmp_path):
    tiny_dir(tmp_path)
    for text, message in (("[1, 2]", "a JSON list, not an object"), ("{'hidden_size': 32}", "file is not valid JSON")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(C.CheckpointError, match=rf"{tmp_path / 'config.json'}: {message}"):
            C.load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "params.json").write_text(json.dumps(dict(dim=32, n_layers="1", n_heads=2)))
    torch.save({"tok_embeddings.weight": torch.zeros(360, 32)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(C.CheckpointError, match=rf"{tmp_path / 'params.json'}: n_layers must be a positive int"):
        C.load_model(tmp_path)


def test_bad_index_and_torch_files(tmp_path):
    model = tiny_dir(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    for content, message in (({"metadata": {}}, "no weight_map"), ({"weight_map": ["model.safetensors"]}, "no weight"),
                             ({"weight_map": {"a": "../model.safetensors"}}, "shard '../model.safetensors' is not a "
                                                                             "file in"),
                             ({"weight_map": {"a": "model-2.safetensors"}}, "shard 'model-2.safetensors' is not")):
        index.write_text(json.dumps(content))
        with pytest.raises(C.CheckpointError, match=re.escape(f"{index}: {message}")):
            C.load_model(tmp_path)
    index.unlink()
    (tmp_path / "model.safetensors").rename(tmp_path / "x")
    bin_ = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), bin_)
    bin_.write_bytes(bin_.read_bytes()[:-200])  # a cut zip
    with pytest.raises(C.CheckpointError, match=rf"{bin_}: not a weights-only torch file"):
        C.load_model(tmp_path)
    torch.save({"weights": model.state_dict(), "step": [1]}, bin_)  # loadable, but not a state dict of tensors
    with pytest.raises(C.CheckpointError, match=rf"{bin_}: holds a dict, not a state dict"):
        C.load_model(tmp_path)

# ----------------------------------------------------------------------------- bitsandbytes 4-bit checkpoints


@pytest.fixture(scope="module")
def bnb_dir(tmp_path_factory):
    """A tiny model saved in 4 bits (NF4 + double quantization) as transformers + bitsandbytes save it."""
    d = tmp_path_factory.mktemp("bnb")
    model = Q.add_lora(M.Transformer(M.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=40, hidden_dim=48,
                                                 max_seq_len=32)), r=2, alpha=4, dropout=0.0)
    C.save_quantized(model, d)
    return d


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
STATE = Q_PROJ + ".quant_state.bitsandbytes__nf4"


def corrupt_bnb(src, dst, fn):
    """Copy a bitsandbytes folder with fn(tensors, quant state dict) applied to q_proj's parts."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    t = {k: v.clone() for k, v in C.read_safetensors(src / "model.safetensors")}
    s = json.loads(bytes(t[STATE].tolist()))
    if fn(t, s) is None:  # else fn has written the quant state's bytes itself
        t[STATE] = torch.tensor(list(json.dumps(s).encode()), dtype=torch.uint8)
    C.save_safetensors(dst / "model.safetensors", t)
    return dst


BNB_CASES = {
    "blocksize 0": (lambda t, s: s.update(blocksize=0), "blocksize 0, not one of"),
    "blocksize 63": (lambda t, s: s.update(blocksize=63), "blocksize 63, not one of"),
    "dtype": (lambda t, s: s.update(dtype="load"), "dtype 'load', not one of float32"),
    "shape": (lambda t, s: s.update(shape=[32, 31]), r"shape \[32, 31\], the model's weight is \[32, 32\]"),
    "garbage": (lambda t, s: t.update({STATE: torch.tensor([123, 34, 255], dtype=torch.uint8)}) or "raw",
                "quant state is not valid JSON"),
    "absmax dtype": (lambda t, s: t.update({Q_PROJ + ".absmax": t[Q_PROJ + ".absmax"].half()}),
                     r"weight.absmax is float16 \[16\], the quant state needs uint8 \[16\]"),
    "absmax shape": (lambda t, s: t.update({Q_PROJ + ".absmax": t[Q_PROJ + ".absmax"][:15]}),
                     r"weight.absmax is uint8 \[15\], the quant state needs uint8 \[16\]"),
    "nan constant": (lambda t, s: t[Q_PROJ + ".nested_absmax"].fill_(math.nan), "nested_absmax holds NaN or infinity"),
    "inf code": (lambda t, s: t[Q_PROJ + ".quant_map"].__setitem__(3, math.inf), "quant_map holds NaN or infinity"),
    "offset": (lambda t, s: s.update(nested_offset="0.1"), "nested_offset '0.1', not a finite number"),
    "packed": (lambda t, s: t.update({Q_PROJ: t[Q_PROJ][:-1]}), "weight holds 511 bytes, a .* packs into 512"),
    "unknown part": (lambda t, s: t.update({Q_PROJ + ".absmax2": t[Q_PROJ + ".absmax"]}), "unknown key"),
}


@pytest.mark.parametrize("case", BNB_CASES)
def test_bad_bnb_quant_state(bnb_dir, tmp_path, case):
    fn, message = BNB_CASES[case]
    d = corrupt_bnb(bnb_dir, tmp_path / "bad", fn)
    with pytest.raises(C.CheckpointError, match=rf"{d / 'model.safetensors'}: .*{message}"):
        C.load_quantized(d)


def test_bnb_config_and_python_O(bnb_dir, tmp_path):
    C.load_quantized(bnb_dir)  # the intact folder loads
    d = corrupt_bnb(bnb_dir, tmp_path / "qc", lambda t, s: None)
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"]["bnb_4bit_quant_type"] = "nf5"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(C.CheckpointError, match=rf"{d / 'config.json'}: quantization_config has bnb_4bit_quant_type"):
        C.load_quantized(d)
    # python -O strips asserts: the checks are raised errors, so a wrong-shaped tensor is refused the same way
    kO, _, _, cO = stripped_modules()
    with pytest.raises(AssertionError):  # the stripping is real: the normal module asserts, the stripped one not
        Q.QuantState(torch.zeros(3, 1, dtype=torch.uint8), torch.zeros(1), Q.CODES["nf4"], (32, 32), torch.float32)
    kO.QuantState(torch.zeros(3, 1, dtype=torch.uint8), torch.zeros(1), Q.CODES["nf4"], (32, 32), torch.float32)
    for case in ("absmax shape", "absmax dtype", "packed", "shape"):
        d = corrupt_bnb(bnb_dir, tmp_path / case.replace(" ", "_"), BNB_CASES[case][0])
        with pytest.raises(cO.CheckpointError, match=rf"{d / 'model.safetensors'}: .*{BNB_CASES[case][1]}"):
            cO.load_quantized(d)


def stripped_modules():
    """kernels.py, model.py, qlora.py and checkpoint.py compiled as `python -O` compiles them (asserts removed), as
    new module objects; the imported ones stay. In this process, so no interpreter start (nor torch's compile for -O)
    is paid."""
    import types
    import checkpoint  # noqa: F401 (imported, so that it can be restored)
    names = ("kernels", "model", "qlora", "checkpoint")
    saved, mods = {k: sys.modules[k] for k in names}, []
    try:
        for name in names:
            m = types.ModuleType(name)
            m.__file__ = str(ROOT / f"{name}.py")
            sys.modules[name] = m  # each later one's imports take the stripped ones
            exec(compile((ROOT / f"{name}.py").read_text(), m.__file__, "exec", optimize=1), m.__dict__)
            mods.append(m)
    finally:
        sys.modules.update(saved)
    return mods

# ----------------------------------------------------------------------------- PEFT adapters


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """A tiny base (16-bit, quantized on load) and a trained-looking adapter on q_proj and v_proj."""
    d = tmp_path_factory.mktemp("adapter")
    tiny_dir(d / "base")
    model = C.load_quantized(d / "base", r=4, alpha=8, dropout=0.0, targets="q_proj,v_proj")
    for m in Q.linears_4bit(model).values():
        if m.r:
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    C.save_adapter(model, d / "adapter")
    return d / "base", d / "adapter"


def edited_adapter(src, dst, **changes):
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    c = json.loads((src / "adapter_config.json").read_text())
    c.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps({k: v for k, v in c.items() if v is not ...}))
    return dst


@pytest.mark.parametrize("changes, message", [
    (dict(r=-4), "r must be a positive int, not -4"), (dict(r="32"), "r must be a positive int, not '32'"),
    (dict(lora_alpha=...), "lora_alpha must be a positive number, not None"),
    (dict(lora_dropout=1.5), r"lora_dropout must be in \[0, 1\), not 1.5"),
    (dict(target_modules=7), "target_modules must be a list of module names or one regex, not 7"),
    (dict(target_modules="(q_proj"), "target_modules '\\(q_proj' is not a valid regex"),
])
def test_bad_adapter_config(adapter_dirs, tmp_path, changes, message):
    base, adapter = adapter_dirs
    bad = edited_adapter(adapter, tmp_path / "a", **changes)
    with pytest.raises(C.CheckpointError, match=re.escape(str(bad / "adapter_config.json")) + ": .*" + message):
        C.load_adapter(C.load_quantized(base, r=0), bad)


def test_adapter_bad_json_wrong_shape_and_target_string(adapter_dirs, tmp_path):
    base, adapter = adapter_dirs
    model = C.load_quantized(base, r=0)
    bad = edited_adapter(adapter, tmp_path / "json")
    (bad / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(C.CheckpointError, match=rf"{bad / 'adapter_config.json'}: file is not valid JSON"):
        C.load_adapter(model, bad)
    bad = edited_adapter(adapter, tmp_path / "r8", r=8)  # the file's tensors are r=4
    with pytest.raises(C.CheckpointError, match=rf"{bad / 'adapter_model.safetensors'}: .* is float32 \[4, 32\], "
                                                r"the model expects a float \[8, 32\]"):
        C.load_adapter(model, bad)
    with pytest.raises(C.CheckpointError, match=rf"{tmp_path}: no adapter_config.json"):
        C.load_adapter(model, tmp_path)
    # target_modules as ONE string is valid PEFT: a regex over the full module name, never split into characters
    rx = edited_adapter(adapter, tmp_path / "rx", target_modules=r".*\.(q_proj|v_proj)")
    idx = torch.randint(0, 360, (1, 8))
    with torch.no_grad():
        ref = C.load_adapter(C.load_quantized(base, r=0), adapter).eval()(idx)
        got = C.load_adapter(C.load_quantized(base, r=0), rx).eval()(idx)
    assert torch.equal(got, ref)
    one = edited_adapter(adapter, tmp_path / "one", target_modules="q_proj")  # PEFT's rule: matches no full name
    with pytest.raises(C.CheckpointError, match=r"matches no adapted 4-bit module .*target_modules 'q_proj'"):
        C.load_adapter(C.load_quantized(base, r=0), one)
    out = run_sample(["--init_from", str(base), "--adapter", str(rx), "--raw", "--prompt=Reverse",
                      "--max_new_tokens=3"])
    assert out[0] == 0 and out[1].startswith("Reverse")

# ----------------------------------------------------------------------------- sample.py


def run_sample(argv, capsys=None):
    """sample.main in this process: (exit status, stdout, stderr)."""
    import contextlib, io
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sample.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (print(e.code, file=err) or 1)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def small_ctx(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctx") / "m"
    tiny_dir(d, max_seq_len=12)
    return d


@pytest.mark.parametrize("flags, message", [
    (["--temperature=-1"], r"--temperature must be a finite number >= 0 \(0 = greedy\), not -1.0"),
    (["--temperature=nan"], "--temperature must be a finite number >= 0"),
    (["--top_p=-1"], r"--top_p must be in \(0, 1\], not -1.0"), (["--top_p=0"], r"--top_p must be in \(0, 1\]"),
    (["--top_p=1.5"], r"--top_p must be in \(0, 1\]"), (["--top_p=nan"], r"--top_p must be in \(0, 1\]"),
    (["--max_new_tokens=-5"], "--max_new_tokens must be at least 1, not -5"),
    (["--max_new_tokens=0"], "--max_new_tokens must be at least 1"),
    (["--temperature=hot"], "--temperature takes a float, not 'hot'"),
    (["--device=tpu:0"], "--device=tpu:0: not"),
    (["--adapter=/nonexistent/adapter"], "--adapter=/nonexistent/adapter: no such directory"),
    (["--prompt=" + "What is 12+34? " * 3], r"--prompt is \d+ tokens, and the model's context \(max_seq_len\) is 12"),
])
def test_sample_flags_one_line_errors(small_ctx, flags, message):
    code, out, err = run_sample([f"--init_from={small_ctx}", *flags])
    assert code != 0 and out == "" and len(err.strip().splitlines()) == 1, (code, err)
    assert re.match("error: " + message, err.strip()), err


def test_sample_missing_dirs_bad_adapter_and_context_note(small_ctx, adapter_dirs, tmp_path):
    code, _, err = run_sample([f"--init_from={tmp_path / 'none'}"])
    assert code != 0 and err.startswith(f"error: --init_from={tmp_path / 'none'}: no such directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run_sample([f"--init_from={tmp_path / 'empty'}"])
    assert code != 0 and err.startswith(f"error: {tmp_path / 'empty'}: no tokenizer.model or tokenizer.json")
    base, adapter = adapter_dirs
    bad = edited_adapter(adapter, tmp_path / "bad", r=-4)
    code, _, err = run_sample([f"--init_from={base}", f"--adapter={bad}"])
    assert code != 0 and err == f"error: {bad / 'adapter_config.json'}: adapter settings not supported here: r must " \
                                "be a positive int, not -4\n"
    # a prompt that fits, with more new tokens than the context has room for: a note, and it stops at the end
    code, out, err = run_sample([f"--init_from={small_ctx}", "--raw", "--prompt=What", "--max_new_tokens=50"])
    assert code == 0 and out.startswith("What") and re.fullmatch(r"note: the context of 12 tokens leaves room for "
                                                                 r"\d+ new tokens, not 50\n", err), err


def test_sample_cli_bad_checkpoint_is_one_line(small_ctx, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "tokenizer.model"):
        (d / f).write_bytes((small_ctx / f).read_bytes())
    (d / "model.safetensors").write_bytes(with_header([1], b""))
    r = subprocess.run([sys.executable, "sample.py", f"--init_from={d}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"error: {d / 'model.safetensors'}: header is a JSON list, not an object of tensors\n"

# ----------------------------------------------------------------------------- OASST1 files


def oasst_tree(tree_id="t1", **prompt_fields):
    reply = dict(message_id=tree_id + "-a", role="assistant", text="Hello.", rank=0, replies=[])
    prompt = dict(message_id=tree_id, role="prompter", text="Hi", replies=[reply], **prompt_fields)
    return dict(message_tree_id=tree_id, tree_state="ready_for_export", prompt=prompt)


@pytest.mark.parametrize("line, message", [
    ('{"message_tree_id": "x", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
    (json.dumps(oasst_tree("t2")).replace("Hello.", "\\ud83d alone"), "a string holds a lone surrogate"),
    (json.dumps(oasst_tree("t2")).replace('"replies": []', '"replies": "none"'), "'replies' of message 't2-a' is of "
                                                                                 "type str, not list"),
    (json.dumps(oasst_tree("t2")).replace('"rank": 0', '"rank": "0"'), "'rank' of message 't2-a' is of type str"),
    (json.dumps(oasst_tree("t2")).replace('"message_id": "t2",', '"message_id": 7,'),  # mixed id types
     "'message_id' of message 7 is of type int, not str"),
    (json.dumps(dict(oasst_tree("t2"), message_tree_id=5)), "'message_tree_id' of message '\\?' is of type int"),
    (json.dumps(dict(oasst_tree("t2"), prompt="Hi")), "a message is a JSON str, not an object"),
])
def test_oasst_bad_lines_named_and_skippable(tmp_path, line, message):
    p = tmp_path / "x.trees.jsonl"
    p.write_text(json.dumps(oasst_tree("t1")) + "\n" + line + "\n")
    with pytest.raises(P.DataError, match=rf"{p}:2: {message}"):
        P.read_conversations(p)
    convs, _, stats = P.read_conversations(p, skip_bad=True)
    assert [c.tree_id for c in convs] == ["t1"] and stats["skipped bad lines (--skip_bad)"] == 1


def test_oasst_flat_cycles_are_errors_or_counted(tmp_path):
    msgs = [dict(message_id="r", parent_id=None, role="prompter", text="Hi", message_tree_id="r"),
            dict(message_id="a", parent_id="r", role="assistant", text="Hello.", rank=0),
            dict(message_id="c1", parent_id="c3", role="prompter", text="x"),  # c1 -> c3 -> c2 -> c1: no root
            dict(message_id="c2", parent_id="c1", role="assistant", text="y"),
            dict(message_id="c3", parent_id="c2", role="prompter", text="z"),
            dict(message_id="s", parent_id="s", role="prompter", text="self")]  # its own parent
    p = tmp_path / "x.messages.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.writelines(json.dumps(m) + "\n" for m in msgs)
    with pytest.raises(P.DataError, match=rf"{p}:3: 3 message\(s\) form a parent_id cycle, so reach no root"):
        P.read_conversations(p)
    convs, _, stats = P.read_conversations(p, skip_bad=True)
    assert len(convs) == 1 and stats["skipped messages in parent_id cycles (--skip_bad)"] == 4


def test_prepare_cli_errors_are_one_line(tmp_path):
    script = [sys.executable, str(ROOT / "data/oasst1/prepare.py")]
    r = subprocess.run(script + ["--bogus=1"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: bad argument '--bogus=1'") and r.stderr.count("\n") == 1
    p = tmp_path / "x.trees.jsonl"
    p.write_text(json.dumps(oasst_tree()) + "\n")
    (tmp_path / "file").write_text("")
    r = subprocess.run(script + [f"--input={p}", f"--tokenizer={SAMPLE_TOK}", f"--out_dir={tmp_path / 'file'}"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and str(tmp_path / "file") in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1

# ----------------------------------------------------------------------------- prepared folders


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared")
    p = d / "in.trees.jsonl"
    p.write_text("".join(json.dumps(oasst_tree(f"t{i}")) + "\n" for i in range(6)))
    P.prepare(p, SAMPLE_TOK, d / "out", val_fraction=0.0, verbose=False)
    return d / "out"


def copy_of(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage, file, message", [
    (lambda d: (d / "meta.json").write_text("{garbage"), "meta.json", "not valid JSON"),
    (lambda d: (d / "meta.json").write_bytes(b"\xff\xfe"), "meta.json", "not valid JSON"),
    (lambda d: (d / "meta.json").write_text('{"dtype": "float64"}'), "meta.json", "no token dtype"),
    (lambda d: (d / "meta.json").write_text('{"dtype": "uint16", "vocab_size": 360, "bos_id": 1, "eos_id": 2, '
                                            '"pad_id": 999}'), "meta.json", "pad_id is 999, not a token id below"),
    (lambda d: (d / "meta.json").unlink(), "meta.json", "cannot read"),
    (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-1]), "train.bin",
     r"\d+ bytes, not a whole number of uint16 entries"),
    (lambda d: (d / "train.idx.bin").write_bytes((d / "train.idx.bin").read_bytes()[:-3]), "train.idx.bin",
     r"\d+ bytes, not a whole number of int64 entries"),
    (lambda d: (d / "train.idx.bin").write_bytes((d / "train.idx.bin").read_bytes()[:-8]), "train.idx.bin",
     r"ends at token \d+, but train.bin holds \d+ tokens"),
    (lambda d: (d / "train.idx.bin").write_bytes(np.array([0, 40, 10**12], np.int64).tobytes()), "train.idx.bin",
     r"ends at token 1000000000000"),
    (lambda d: (d / "train.idx.bin").write_bytes(np.array([0, 9, 4, 9], np.int64).tobytes()), "train.idx.bin",
     "offsets must start at 0 and never decrease"),
    (lambda d: (d / "train.mask.bin").write_bytes(b""), "train.idx.bin", r"ends at .* and train.mask.bin 0 flags"),
    (lambda d: (d / "train.bin").write_bytes(np.full(len(np.fromfile(d / "train.bin", np.uint16)), 5000,
                                                     np.uint16).tobytes()), "train.bin", "token id 5000 is out of range"),
    (lambda d: (d / "train.bin").unlink(), "train.bin", "cannot read"),
])
def test_corrupt_prepared_folder(prepared, tmp_path, damage, file, message):
    d = copy_of(prepared, tmp_path / "d")
    assert len(load_split(d, "train")) == 6  # intact, it loads
    damage(d)
    with pytest.raises(P.DataError, match=re.escape(str(d / file)) + ": " + message):
        load_split(d, "train")
