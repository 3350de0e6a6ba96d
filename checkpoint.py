"""
Every file format this project reads or writes, and every check of those bytes: a model folder's config
(Hugging Face config.json, Meta params.json), safetensors, torch .bin / Meta .pth shards,
bitsandbytes' 4-bit checkpoints as transformers saves them, PEFT adapters, and a merged 16-bit model.

The rule: bytes are checked here, once, as they are read, and a fault is a CheckpointError naming the file and the
key. model.py and qlora.py then trust what they are given and state their invariants with asserts.
"""
import json
import math
import mmap
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn

import qlora as Q
from model import ModelArgs, Transformer

# -----------------------------------------------------------------------------
# JSON and config


class CheckpointError(ValueError):
    pass


def parse_json(where, data=None, what="file"):
    """The JSON value of the file `where` (or of `data`, bytes read from it), read as strictly as the safetensors
    library reads a header: UTF-8, no NaN or Infinity, no duplicate keys, no lone surrogates. Any fault, a nesting
    too deep included, is a CheckpointError naming `where`."""
    def strict(pairs):
        seen = set()
        for k, v in pairs:
            (k + v if isinstance(v, str) else k).encode()  # a lone surrogate cannot be encoded: a ValueError
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
        return dict(pairs)

    def no_constant(c):
        raise ValueError(f"{c} is not JSON")
    try:
        text = (Path(where).read_bytes() if data is None else data).decode()
        return json.loads(text, object_pairs_hook=strict, parse_constant=no_constant)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read the file ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # UnicodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{where}: {what} is not valid JSON ({str(e)[:200]})") from None


def _get(file, d, key, kind=int, required=False):
    """d[key] if it is a positive int (kind int), a positive finite number (float) or a bool; None if absent/null."""
    v = d.get(key)
    if v is None and required:
        raise CheckpointError(f"{file}: missing {key!r}")
    ok = v is None or (type(v) is bool if kind is bool else type(v) in ((int, float) if kind is float else (int,))
                       and 0 < v < math.inf)
    if not ok:
        raise CheckpointError(f"{file}: {key} must be a {'' if kind is bool else 'positive '}{kind.__name__}, "
                              f"not {repr(v)[:40]}")
    return v


FAMILIES = dict(llama="LlamaForCausalLM", mistral="MistralForCausalLM", qwen2="Qwen2ForCausalLM",
                qwen3="Qwen3ForCausalLM")  # model_type -> transformers' class


def family(file, c):
    """ModelArgs' model_type, qkv_bias and qk_norm from a config.json, refusing what would change the
    math unseen: another family, an activation other than SiLU, biases where model.py has none."""
    kind = c.get("model_type", "llama")  # (configs older than model_type are LLaMA's)
    if kind not in FAMILIES:
        raise CheckpointError(f"{file}: model_type {repr(kind)[:40]} is not supported ({', '.join(FAMILIES)})")
    if c.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file}: hidden_act {repr(c.get('hidden_act'))[:40]} is not supported (silu)")
    for key in ("mlp_bias", "attention_bias"):  # Qwen2's q/k/v biases come with its model_type
        if c.get(key):
            raise CheckpointError(f"{file}: {key} true is not supported (biases on q, k, v: qwen2 only)")
    return dict(model_type=kind, qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3")


def rope_scaling(file, rope):
    """The rope_scaling (or transformers 5's rope_parameters) of a config.json: none, linear or llama3,
    each field checked; any other type is refused (it changes every position's rotation)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")}
    if kind not in need:
        raise CheckpointError(f"{file}: rope_type {repr(kind)[:40]} is not supported (default, linear, llama3)")
    out = dict(rope_type=kind, **{k: _get(file, rope, k, int if k.startswith("original") else float, True)
                                  for k in need[kind]})
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise CheckpointError(f"{file}: rope high_freq_factor {out['high_freq_factor']} must exceed "
                              f"low_freq_factor {out['low_freq_factor']}")
    return out


# ModelArgs field -> (its key in a HF config.json, type, required); Meta's params.json uses the field names
HF_KEYS = dict(dim=("hidden_size", int, True), n_layers=("num_hidden_layers", int, True),
               n_heads=("num_attention_heads", int, True), n_kv_heads=("num_key_value_heads", int, False),
               vocab_size=("vocab_size", int, True), hidden_dim=("intermediate_size", int, True),
               head_dim=("head_dim", int, False), norm_eps=("rms_norm_eps", float, True),
               rope_theta=("rope_theta", float, False), max_seq_len=("max_position_embeddings", int, False),
               tie_embeddings=("tie_word_embeddings", bool, False))


META_KEYS = dict(dim=int, n_layers=int, n_heads=int, n_kv_heads=int, vocab_size=int, multiple_of=int,
                 ffn_dim_multiplier=float, norm_eps=float, rope_theta=float, max_seq_len=int)


def load_args(path):
    """ModelArgs from a HF config.json or a Meta params.json in the directory `path`, every value type-checked,
    and refused when its weight files could not hold the model it describes."""
    path = Path(path)
    if (file := path / "config.json").exists():
        c = parse_json(file)
        if not isinstance(c, dict):
            raise CheckpointError(f"{file}: a JSON {type(c).__name__}, not an object of settings")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # newer transformers nest theta here
        if not isinstance(rope, dict):
            raise CheckpointError(f"{file}: rope_scaling must be an object, not {repr(rope)[:40]}")
        kw = {f: _get(file, c, key, kind, required) for f, (key, kind, required) in HF_KEYS.items()}
        kw.update(family(file, c), rope_scaling=rope_scaling(file, rope))
        window = _get(file, c, "sliding_window") if c.get("use_sliding_window", True) is not False else None
        if window is not None and kw["model_type"] != "mistral":  # Qwen's: windows on some layers only
            raise CheckpointError(f"{file}: use_sliding_window with sliding_window {window} is not supported for "
                                  f"model_type {kw['model_type']} (Mistral's window on every layer is)")
        if window is not None and window < (kw["max_seq_len"] or ModelArgs.max_seq_len):
            kw["sliding_window"] = window  # masked; one as long as the context is full attention, the same math
        ids = {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in c}  # metadata only
        kw["special_ids"] = {k: v for k, v in ids.items() if type(v) is int
                             or isinstance(v, list) and all(type(i) is int for i in v)} or None
        kw["rope_theta"] = _get(file, rope, "rope_theta", float) or kw["rope_theta"]
        files = _weight_files(path)
    elif (file := path / "params.json").exists():
        p = parse_json(file)
        if not isinstance(p, dict):
            raise CheckpointError(f"{file}: a JSON {type(p).__name__}, not an object of settings")
        files = sorted(path.glob("consolidated.*.pth"))
        if not files:
            raise CheckpointError(f"{path}: params.json found but no consolidated.NN.pth shards")
        if type(v := p.get("vocab_size", -1)) is int and v < 0:  # LLaMA-1 says -1: read it off the embedding
            if (emb := _torch_weights(files[0]).get("tok_embeddings.weight")) is None:
                raise CheckpointError(f"{files[0]}: no tok_embeddings.weight, which params.json's vocab_size -1 needs")
            p = dict(p, vocab_size=emb.shape[0])
        kw = {f: _get(file, p, f, kind, f in ("dim", "n_layers", "n_heads")) for f, kind in META_KEYS.items()}
        if _get(file, p, "use_scaled_rope", bool):  # Llama 3.1+: the constants of Meta's reference code
            factor = _get(file, p, "rope_scaling_factor", float) or 8.0
            kw["rope_scaling"] = dict(rope_type="llama3", factor=factor, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    else:
        raise CheckpointError(f"{path}: no config.json (Hugging Face) or params.json (Meta) found; expected a model "
                              "directory with config.json + model.safetensors / pytorch_model.bin, or params.json + "
                              "consolidated.00.pth")
    kw = {k: v for k, v in kw.items() if v is not None}  # absent: ModelArgs' defaults
    if kw["n_heads"] % kw.get("n_kv_heads", kw["n_heads"]):
        raise CheckpointError(f"{file}: {kw['n_heads']} heads are not a multiple of {kw['n_kv_heads']} kv heads")
    a = ModelArgs(**kw)
    if a.head_dim < 2 or a.head_dim % 2:
        raise CheckpointError(f"{file}: head_dim {a.head_dim} is not a positive even number (rotary pairs halves)")
    # before anything is built for it: the weights cannot be smaller than 4 bits a parameter (10,000,000 layers in
    # a corrupt config would otherwise build 10,000,000 meta-device blocks first)
    n = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.dim + a.n_layers * (
        2 * a.dim + 2 * a.dim * a.head_dim * (a.n_heads + a.n_kv_heads) + 3 * a.dim * a.hidden_dim)
    if n // 2 > (have := sum(f.stat().st_size for f in files)):
        for f in files:  # a truncated weight file is the likelier fault, and its own error says so
            next(iter(read_safetensors(f)), None) if f.suffix == ".safetensors" else _torch_weights(f)
        raise CheckpointError(f"{file}: describes a model of {n:,} parameters ({a.n_layers:,} layers, dim {a.dim:,}),"
                              f" more than its weight files' {have:,} bytes can hold even at 4 bits each")
    return a

# -----------------------------------------------------------------------------
# weights: safetensors, torch files, Meta shards, streamed into a model built on the meta device


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _tensor_entry(path, name, info, data):
    """(begin, end, name, dtype, shape) of one header entry, checked against the format and the data section."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: its entry is a JSON {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {repr(dtype)[:40]}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r}: shape must be a list of non-negative ints, not "
                              f"{repr(shape)[:40]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets must be two ints [begin, end], not "
                              f"{repr(offsets)[:40]}")
    (begin, end), dt = offsets, SAFETENSORS_DTYPES[dtype]
    if not 0 <= begin <= end <= data:
        raise CheckpointError(f"{path}: tensor {name!r} offsets [{begin}, {end}] point outside the file "
                              f"(data section is {data} bytes): truncated or corrupt")
    if end - begin != (nbytes := math.prod(shape) * dt.itemsize):
        raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes but shape {shape} of {dtype} "
                              f"needs {nbytes}")
    return begin, end, name, dt, shape


def read_safetensors(path):
    """Yield (name, tensor) from a .safetensors file, memory-mapped. The whole header is checked first, as the
    safetensors library checks it: a JSON object of {name: {dtype, shape, data_offsets}} (and "__metadata__":
    {str: str}), each tensor's bytes = numel * itemsize, and the tensors tiling the data section exactly, in offset
    order, no gap, no overlap, up to the file's last byte. So a wrong header length (into the header's padding) or
    a corrupt offset is an error naming the tensor, never a tensor read from the wrong bytes."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror})") from None
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, no header)")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        header = parse_json(path, f.read(n), "header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, not an object of tensors")
    meta, data = header.pop("__metadata__", None), size - 8 - n
    if not (meta is None or isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, not {repr(meta)[:40]}")
    entries = sorted(_tensor_entry(path, name, info, data) for name, info in header.items())
    at, last = 0, None  # where the tensors so far end: the next one must start exactly there
    for begin, end, name, _, _ in entries:
        if begin != at:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data section, but "
                                  f"{f'tensor {last!r} ends' if last else 'the section starts'} at {at}: "
                                  f"{'overlapping tensors' if begin < at else 'a gap between tensors'}")
        at, last = end, name
    if at != data:
        raise CheckpointError(f"{path}: {data - at} bytes of the data section after the last tensor {last!r} belong "
                              "to none: a wrong header length or a corrupt file")
    for begin, end, name, dtype, shape in entries:
        t = torch.frombuffer(buf, dtype=torch.uint8, offset=8 + n + begin, count=end - begin) if end > begin else \
            torch.empty(0, dtype=torch.uint8)
        yield name, t.view(dtype).reshape(shape)


def save_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as .safetensors, atomically (temporary file, fsync, rename)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset, blobs = {"__metadata__": metadata or {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # pad so the data section starts 8-byte aligned
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_weights(f):
    """{name: tensor} of a torch.save'd file, weights only (a pickle of anything else is refused), memory-mapped."""
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a corrupt zip, a truncated file, a pickle that is not weights only: all bad input
        raise CheckpointError(f"{f}: not a weights-only torch file ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
    if not (isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())):
        raise CheckpointError(f"{f}: holds a {type(sd).__name__}, not a state dict of {{name: tensor}}")
    return sd


def _meta_shards(path):
    files = sorted(Path(path).glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: params.json found but no consolidated.NN.pth shards")
    shards = [_torch_weights(f) for f in files]
    for f, s in zip(files, shards):  # model-parallel pieces of the same tensors
        if s.keys() != shards[0].keys():
            raise CheckpointError(f"{f}: holds other keys than {files[0].name}: "
                                  f"{sorted(s.keys() ^ shards[0].keys())[:4]}")
    return shards


def _permute_rotary(w, n_heads):
    """Meta's q/k rows pair (2i, 2i+1) per head; HF's rotate-half pairs (i, i + hd/2): regroup the rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# Meta name -> (HF name, axis along which model-parallel shards are concatenated; None = replicated)
META_NAMES = {"tok_embeddings.weight": ("model.embed_tokens.weight", 1), "norm.weight": ("model.norm.weight", None),
              "output.weight": ("lm_head.weight", 0)}


META_LAYER = {"attention.wq": ("self_attn.q_proj", 0), "attention.wk": ("self_attn.k_proj", 0),
              "attention.wv": ("self_attn.v_proj", 0), "attention.wo": ("self_attn.o_proj", 1),
              "feed_forward.w1": ("mlp.gate_proj", 0), "feed_forward.w3": ("mlp.up_proj", 0),
              "feed_forward.w2": ("mlp.down_proj", 1), "attention_norm": ("input_layernorm", None),
              "ffn_norm": ("post_attention_layernorm", None)}


def _stream_meta(path, args):
    shards, file = _meta_shards(path), Path(path) / "consolidated.00.pth"
    for key in shards[0]:
        if key == "rope.freqs":
            continue  # precomputed rotary table, rebuilt here
        parts = key.split(".")
        if parts[0] == "layers" and ".".join(parts[2:-1]) in META_LAYER:
            sub, axis = META_LAYER[".".join(parts[2:-1])]
            name = f"model.layers.{parts[1]}.{sub}.weight"
        elif key in META_NAMES:
            name, axis = META_NAMES[key]
        else:
            raise CheckpointError(f"{file}: unknown key {key!r}")
        try:  # shards that do not fit together, or a q/k that is no whole number of heads
            t = shards[0][key] if axis is None else torch.cat([s[key] for s in shards], dim=axis)
            if name.endswith("q_proj.weight"):
                t = _permute_rotary(t, args.n_heads)
            elif name.endswith("k_proj.weight"):
                t = _permute_rotary(t, args.n_kv_heads)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{file}: tensor {key!r}: {str(e).splitlines()[0][:200]}") from None
        yield name, t, file


def stream_tensors(path, args=None):
    """Yield (hf_name, tensor, file) one tensor at a time from any supported checkpoint layout in `path`."""
    path = Path(path)
    if (path / "params.json").exists() and not (path / "config.json").exists():
        yield from _stream_meta(path, args or load_args(path))
        return
    for f in _weight_files(path):
        for name, t in read_safetensors(f) if f.suffix == ".safetensors" else _torch_weights(f).items():
            yield name, t, f


def _weight_files(path):
    """The weight files of a Hugging Face folder, safetensors first: the shards its index names, or the one file."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (index := path / index).exists():
            wm = parse_json(index)
            wm = wm.get("weight_map") if isinstance(wm, dict) else None
            if not (isinstance(wm, dict) and wm and all(isinstance(v, str) for v in wm.values())):
                raise CheckpointError(f"{index}: no weight_map of {{tensor name: shard file}}")
            for name in (files := sorted(set(wm.values()))):  # shards lie beside the index, never elsewhere
                if Path(name).name != name or not (path / name).is_file():
                    raise CheckpointError(f"{index}: shard {name!r} is not a file in {path}")
            return [path / name for name in files]
        if (path / single).exists():
            return [path / single]
    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                          "consolidated.00.pth found")


def load_weights(model, path, hook=None, device="cpu", dtype=torch.float32):
    """Stream a checkpoint into `model` (typically built on the meta device), strictly: every key known, every
    parameter filled with the right shape. `hook(name, tensor)` sees each tensor first and returns it (maybe
    transformed), or None when it has stored it itself (the 4-bit quantizer does this)."""
    with torch.device("meta"):  # the dense model's keys: what a checkpoint must hold, whatever `prepare` swapped
        expected = {k for k in Transformer(model.args).state_dict()
                    if not (k == "lm_head.weight" and model.args.tie_embeddings)}
    seen = set()
    for name, t, file in stream_tensors(path, model.args):
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.args.tie_embeddings):
            continue  # derived from the config (old HF checkpoints store it; tied heads are the embedding)
        if name in seen:
            raise CheckpointError(f"{file}: tensor {name!r} appears twice in the checkpoint")
        try:
            if hook is not None and (t := hook(name, t)) is None:
                seen.add(name)
                continue
        except CheckpointError as e:  # the hook's (e.g. a bitsandbytes quant state's) faults name the tensor
            raise CheckpointError(f"{file}: {e}") from None
        if name not in expected:
            raise CheckpointError(f"{file}: unknown key {name!r} (not a parameter of this model)")
        mod_name, attr = name.rsplit(".", 1)
        mod, old = model.get_submodule(mod_name), model.get_parameter(name)
        if t.shape != old.shape:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {list(t.shape)}, the model expects "
                                  f"{list(old.shape)}")
        mod._parameters[attr] = nn.Parameter(t.to(device=device, dtype=dtype, copy=True),
                                             requires_grad=old.requires_grad)
        seen.add(name)
    if missing := sorted(expected - seen):
        raise CheckpointError(f"{path}: {len(missing)} missing key(s): {', '.join(missing[:8])}"
                              f"{' ...' if len(missing) > 8 else ''}")
    if model.args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(device)
    meta = [k for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items() if v.is_meta]
    if meta:
        raise CheckpointError(f"{path}: left unfilled after loading: {', '.join(meta[:8])}")
    return model


def load_model(path, device="cpu", dtype=torch.float32, hook=None, prepare=None, args=None):
    """Build on the meta device (no memory), let `prepare(model)` swap modules (e.g. 4-bit linears), then fill."""
    args = args or load_args(path)
    with torch.device("meta"):
        model = Transformer(args)
    if prepare is not None:
        prepare(model)
    return load_weights(model, path, hook, device, dtype)


# -----------------------------------------------------------------------------
# bitsandbytes 4-bit checkpoints: each weight's parts checked, then quantize-as-you-load


def _bnb_part(parts, key, dtype, shape):
    """parts[key], checked to be a `dtype` tensor of `shape` holding no NaN or infinity (CheckpointError)."""
    t = parts[key]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{key} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, the quant state "
                              f"needs {str(dtype).removeprefix('torch.')} {list(shape)}")
    if t.is_floating_point() and not t.is_meta and not torch.isfinite(t).all():
        raise CheckpointError(f"{key} holds NaN or infinity: a quantization constant must be finite")
    return t


def bnb_state(parts, shape=None):
    """qlora.from_bnb's QuantState from a checkpoint's {name: tensor}, or None while a part is still missing. Every
    field is checked first against the format (and against `shape`, the weight's (out, in), when given), so a
    corrupt checkpoint is a CheckpointError naming the part, and QuantState's asserts only state invariants."""
    state = [k for k in parts if k.startswith("weight.quant_state.bitsandbytes__")]
    if not state or not {"weight", "weight.absmax", "weight.quant_map"} <= parts.keys():
        return None
    key, t = state[0], parts[state[0]]
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise CheckpointError(f"{key}: the quant state must be UTF-8 JSON bytes (uint8 [n]), not {t.dtype} "
                              f"{list(t.shape)}")
    s = parse_json(key, bytes(t.tolist()), "quant state")
    if not isinstance(s, dict):
        raise CheckpointError(f"{key}: the quant state is a JSON {type(s).__name__}, not an object")
    qt, bs, dtype, n = s.get("quant_type"), s.get("blocksize"), s.get("dtype"), s.get("shape")
    checks = [(isinstance(qt, str) and qt in ("nf4", "fp4") and key.endswith("__" + qt), f"quant_type {qt!r}"),
              (type(bs) is int and bs in Q.BLOCKSIZES, f"blocksize {bs!r}, not one of {Q.BLOCKSIZES}"),
              (isinstance(dtype, str) and dtype in Q.BNB_DTYPES,
               f"dtype {dtype!r}, not one of {', '.join(Q.BNB_DTYPES)}"),
              (isinstance(n, list) and n and all(type(d) is int and d > 0 for d in n),
               f"shape {n!r}, not a list of positive ints"),
              (shape is None or n == list(shape), f"shape {n!r}, the model's weight is {list(shape or ())}")]
    if dq := "nested_offset" in s:  # double quantization
        nbs, off = s.get("nested_blocksize", 256), s["nested_offset"]
        checks += [(type(nbs) is int and nbs in Q.BLOCKSIZES, f"nested_blocksize {nbs!r}, not one of {Q.BLOCKSIZES}"),
                   (type(off) in (int, float) and math.isfinite(off), f"nested_offset {off!r}, not a finite number"),
                   (s.get("nested_dtype", "float32") == "float32", f"nested_dtype {s.get('nested_dtype')!r}")]
    if bad := [what for ok, what in checks if not ok]:
        raise CheckpointError(f"{key}: {'; '.join(bad)}")
    if dq and not {"weight.nested_absmax", "weight.nested_quant_map"} <= parts.keys():
        return None
    numel, packed = math.prod(n), parts["weight"]  # bnb_4bit_quant_storage may be another dtype than uint8
    if packed.numel() * packed.element_size() != (numel + 1) // 2:
        raise CheckpointError(f"weight holds {packed.numel() * packed.element_size()} bytes, a {n} weight packs into "
                              f"{(numel + 1) // 2}")
    nb = -(-numel // bs)
    _bnb_part(parts, "weight.absmax", torch.uint8 if dq else torch.float32, (nb,))
    _bnb_part(parts, "weight.quant_map", torch.float32, (16,))
    if dq:
        _bnb_part(parts, "weight.nested_absmax", torch.float32, (-(-nb // nbs),))
        _bnb_part(parts, "weight.nested_quant_map", torch.float32, (256,))
    return Q.from_bnb(parts)

def is_bnb_4bit(path):
    """The quantization_config of a bitsandbytes 4-bit checkpoint directory, else None."""
    cfg = Path(path) / "config.json"
    c = parse_json(cfg) if cfg.exists() else {}
    qc = c.get("quantization_config") if isinstance(c, dict) else None  # a config that is no object: load_args says so
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{cfg}: quantization_config must be an object, not {repr(qc)[:40]}")
    return qc if qc and qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit") else None


BNB_PARTS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
             ".quant_state.bitsandbytes__fp4")  # suffixes of `weight` in a bitsandbytes checkpoint


def quantize_hook(model, device="cpu", dtype=torch.float32, store=Q.keep):
    """A load_weights hook: each 16/32-bit weight of a 4-bit module is quantized the moment it is read (on
    `device`, after a cast to `dtype`) and dropped, so at most one unquantized linear weight exists at a time; the
    pieces of a pre-quantized bitsandbytes checkpoint are kept until a weight's are all there. Other tensors pass
    through. store: LoRALinear4bit.fill's (distributed.py's keeps a rank's rows)."""
    mods, pending = Q.linears_4bit(model), {}  # module name -> {part: tensor} of a bitsandbytes weight

    def hook(name, t):
        mod, _, rest = name.partition(".weight")  # "...q_proj.weight.absmax" -> ("...q_proj", ".absmax")
        if mod not in mods:
            return t
        shape = (mods[mod].out_features, mods[mod].in_features)
        if rest == "" and t.shape == shape:  # not packed 4-bit
            mods[mod].fill(t.to(device=device, dtype=dtype), store)
        elif rest == "" and t.dim() == 2 and t.shape[1] != 1:  # packed bytes are (n, 1)
            raise CheckpointError(f"tensor {name!r} has shape {list(t.shape)}, the model expects {list(shape)}")
        elif rest not in BNB_PARTS:
            raise CheckpointError(f"unknown key {name!r} (not a part of a bitsandbytes 4-bit weight)")
        else:
            parts = pending.setdefault(mod, {})
            parts["weight" + rest] = t.to(device, copy=True)
            try:
                q = bnb_state(parts, shape)
            except CheckpointError as e:  # bnb_state names the part: "weight.absmax ..."
                raise CheckpointError(f"{mod}.{e}") from None
            if q is not None:
                mods[mod].fill(q, store)
                del pending[mod]
        return None  # stored: the loader checks nothing more (bnb_state checked every part)
    return hook


def bnb_settings(path):
    """add_lora's quant_type and double_quant for a bitsandbytes 4-bit checkpoint folder; {} for any other."""
    if not (qc := is_bnb_4bit(path)):
        return {}
    qt, dq = qc.get("bnb_4bit_quant_type", "fp4"), qc.get("bnb_4bit_use_double_quant", False)
    if qt not in ("nf4", "fp4") or not isinstance(dq, bool):
        raise CheckpointError(f"{Path(path) / 'config.json'}: quantization_config has bnb_4bit_quant_type {qt!r} "
                              f"(nf4 or fp4) and bnb_4bit_use_double_quant {dq!r} (true or false)")
    return dict(quant_type=qt, double_quant=dq)


def load_quantized(path, device="cpu", dtype=torch.float32, **kw):
    """Load a Hugging Face / Meta checkpoint with its linears in 4 bits, quantized as they stream in (gpt-fast's
    way: build on the meta device, swap the modules, fill), or a pre-quantized bitsandbytes one (`*-bnb-4bit`).
    kw: Q.add_lora's settings (r, alpha, dropout, ...)."""
    kw.update(bnb_settings(path))  # a pre-quantized checkpoint: its type wins (each weight's quant state is read)
    with torch.device("meta"):
        model = Transformer(load_args(path))
    Q.add_lora(model, lora_device=device, **kw)
    return load_weights(model, path, quantize_hook(model, device, dtype), device, dtype)

# -----------------------------------------------------------------------------
# writing: the quantized base (bitsandbytes / HF), adapters (PEFT), a merged 16-bit model (HF)


def hf_config(args, dtype, **extra):
    """A transformers LlamaForCausalLM config.json for model.py's ModelArgs."""
    extra = dict(extra, rope_scaling=args.rope_scaling) if args.rope_scaling else extra
    extra = dict(extra, sliding_window=args.sliding_window) if args.sliding_window else extra
    return dict(architectures=[FAMILIES[args.model_type]], model_type=args.model_type, hidden_size=args.dim,
                intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings,
                hidden_act="silu", **(args.special_ids or dict(bos_token_id=1, eos_token_id=2)),  # as read, or LLaMA's
                dtype=str(dtype).removeprefix("torch."), **extra)


def _write_model(model, out_dir, tensors, config):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.args.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the head is the embedding
    save_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))


def save_quantized(model, out_dir, tokenizer=None):
    """The quantized base as transformers + bitsandbytes save it (model.safetensors with bitsandbytes' keys,
    quantization_config in config.json), loadable by from_pretrained and by load_quantized; `tokenizer`: the
    tokenizer file to copy beside it. No adapters (save_adapter). quant_type "none" or "int4" (which bitsandbytes
    does not know): a plain 16/32-bit checkpoint of the weights the adapters see (int4's dequantized)."""
    mods = Q.linears_4bit(model)
    m = next(iter(mods.values()))
    dtype = model.model.norm.weight.dtype
    plain = m.quant_type not in ("nf4", "fp4")  # none, or int4 (no bitsandbytes format): without its ".weight.*"
    tensors = {k: v for k, v in model.state_dict().items() if ".lora_" not in k and not (plain and ".weight." in k)}
    if plain:
        qc = {}
        for n, mod in mods.items() if m.quant_type == "int4" else ():  # the weights the adapters trained against
            tensors[n + ".weight"] = Q.dequantize(mod.quantized(), dtype)
    else:
        q = m.quantized()
        qc = dict(quantization_config=dict(
            quant_method="bitsandbytes", load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.nested_absmax is not None, bnb_4bit_quant_storage="uint8",
            bnb_4bit_compute_dtype=str(dtype).removeprefix("torch.")))
    _write_model(model, out_dir, tensors, hf_config(model.args, dtype, **qc))
    if tokenizer is not None:
        shutil.copy(tokenizer, Path(out_dir) / Path(tokenizer).name)
        settings = Path(tokenizer).with_name("tokenizer_config.json")  # what chooses a tokenizer.json's BOS and EOS
        if Path(tokenizer).name == "tokenizer.json" and settings.is_file():
            shutil.copy(settings, Path(out_dir) / settings.name)


def save_adapter(model, out_dir, base_model_name_or_path=None, write=True):
    """adapter_model.safetensors + adapter_config.json, as PEFT writes them (PeftModel.from_pretrained loads it).
    Under FSDP each LoRA weight is all-gathered whole from the ranks' shards, a collective: every rank calls this,
    and only the one with write=True writes."""
    mods = {n: m for n, m in Q.linears_4bit(model).items() if m.r}
    settings = {(m.r, m.alpha, m.dropout.p) for m in mods.values()}
    assert len(settings) == 1, f"PEFT's format wants one (r, alpha, dropout) for all modules, got {settings}"
    r, alpha, p = settings.pop()
    tensors = {}
    for n, m in mods.items():
        for ab in "AB":
            w = getattr(m, f"lora_{ab}").weight.detach()
            tensors[f"base_model.model.{n}.lora_{ab}.weight"] = w.full_tensor() if Q.is_dtensor(w) else w
    if not write:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=p,
                  target_modules=sorted({n.rsplit(".", 1)[-1] for n in mods}), bias="none",
                  base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=False, inference_mode=True,
                  init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_adapter(model, path):
    """Load a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into the 4-bit modules: the ones
    PEFT's target_modules names get a fresh adapter of its r / alpha / dropout, filled from the file; others none.
    Every setting and tensor is checked first: a fault is a CheckpointError naming the file."""
    file = Path(path) / "adapter_config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no adapter_config.json: not a PEFT adapter folder (adapter_config.json + "
                              "adapter_model.safetensors)")
    c = parse_json(file)
    if not isinstance(c, dict):
        raise CheckpointError(f"{file}: a JSON {type(c).__name__}, not an object of settings")
    bad = [k for k in ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                       "layers_to_transform") if c.get(k)] + \
        [f"{k}={c[k]}" for k, ok in (("peft_type", "LORA"), ("bias", "none")) if c.get(k, ok) != ok]
    r, alpha, p, targets = c.get("r"), c.get("lora_alpha"), c.get("lora_dropout") or 0.0, c.get("target_modules")
    number = lambda v: type(v) in (int, float) and math.isfinite(v)  # True is no number here
    for ok, what in ((type(r) is int and r > 0, f"r must be a positive int, not {repr(r)[:40]}"),
                     (number(alpha) and alpha > 0, f"lora_alpha must be a positive number, not {repr(alpha)[:40]}"),
                     (number(p) and 0 <= p < 1, f"lora_dropout must be in [0, 1), not {repr(p)[:40]}"),
                     (isinstance(targets, str) or isinstance(targets, list) and targets and
                      all(isinstance(t, str) for t in targets),
                      f"target_modules must be a list of module names or one regex, not {repr(targets)[:40]}")):
        if not ok:
            bad.append(what)
    if bad:
        raise CheckpointError(f"{file}: adapter settings not supported here: {'; '.join(bad)}")
    # a list of module-name suffixes; PEFT's "all-linear"; else one string is a regex for the full name (PEFT's rule)
    if targets == "all-linear":
        targets = list(Q.LINEARS)
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise CheckpointError(f"{file}: target_modules {targets!r} is not a valid regex ({e})") from None
    hit = (lambda n: pattern.fullmatch(n) is not None) if isinstance(targets, str) else \
        (lambda n: any(n == t or n.endswith("." + t) for t in targets))
    mods = Q.linears_4bit(model)
    for n, m in mods.items():
        m.set_lora(r if hit(n) else 0, alpha, p, device=m.weight.device)
    filled, weights = set(), Path(path) / "adapter_model.safetensors"
    for key, t in read_safetensors(weights):
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if m is None or m[1] not in mods or not mods[m[1]].r:
            raise CheckpointError(f"{weights}: key {key!r} matches no adapted 4-bit module of this model "
                                  f"(target_modules {targets!r} in {file.name})")
        w = getattr(mods[m[1]], f"lora_{m[2]}").weight
        if t.shape != w.shape or not t.is_floating_point():
            raise CheckpointError(f"{weights}: {key} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, the "
                                  f"model expects a float {list(w.shape)} (r={r} in {file.name})")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{weights}: {key} holds NaN or infinity")
        with torch.no_grad():
            w.copy_(t)
        filled.add(key)
    if missing := sorted({f"base_model.model.{n}.lora_{ab}.weight" for n, m in mods.items() if m.r for ab in "AB"}
                         - filled):
        raise CheckpointError(f"{weights}: {len(missing)} adapter weights missing: {', '.join(missing[:4])}")
    return model


@torch.no_grad()
def merge(model, out_dir, original=None, probe=32):
    """Write W' = W + (alpha / r) B A for every adapted linear as a plain Hugging Face checkpoint. W is by default
    dequant(W_4bit), the weights the adapter was trained against; original=<checkpoint dir> merges onto its 16-bit
    weights instead. Returns max |logits(merged) - logits(4-bit base + adapter)| on `probe` tokens (0: skip)."""
    mods = Q.linears_4bit(model)
    dtype = model.model.norm.weight.dtype
    tensors = {k: v for k, v in model.state_dict().items() if k.rsplit(".weight", 1)[0] not in mods
               and ".lora_" not in k}
    originals = {} if original is None else {name: t for name, t, _ in stream_tensors(original)
                                             if name.rsplit(".weight", 1)[0] in mods}  # memory-mapped, not read
    for n, m in mods.items():  # merge in fp32, one cast to the model's dtype, one weight at a time
        w = originals[n + ".weight"].float() if originals else m.weight.float() if m.quant_type == "none" else \
            Q.dequantize(m.quantized(), torch.float32)
        tensors[n + ".weight"] = (w.to(m.weight.device) + (m.delta() if m.r else 0)).to(dtype)
    _write_model(model, out_dir, tensors, hf_config(model.args, dtype))
    if not probe:
        return None
    dev = model.model.norm.weight.device
    idx = torch.arange(probe, device=dev)[None] % model.args.vocab_size  # (1, probe)
    merged = load_model(out_dir, dev, dtype).eval()
    was_training = model.training
    diff = (merged(idx).float() - model.eval()(idx).float()).abs().max().item()
    model.train(was_training)
    return diff



def load_for_inference(init_from, adapter=None, device="cpu", quantize=None):
    """Base weights (HF, Meta or bitsandbytes 4-bit) plus an optional PEFT adapter, ready to generate (sample.py,
    eval.py): a plain 16/32-bit model when neither an adapter nor 4 bits are asked for."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if adapter is None and quantize is None and not is_bnb_4bit(init_from):
        return load_model(init_from, device=device, dtype=dtype)
    # the base in 4 bits without adapters; load_adapter then gives the modules the adapter's target_modules name
    # (a list, or PEFT's single regex string) its r, alpha and weights, all checked against adapter_config.json
    model = load_quantized(init_from, device=device, dtype=dtype, quant_type=quantize or "nf4",
                           compute_dtype=dtype, r=0)
    if adapter:
        load_adapter(model, adapter)
    return model
