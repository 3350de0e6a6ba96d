"""
The LLaMA architecture (LLaMA-1, LLaMA-2 with grouped-query attention, TinyLlama) and the loaders for the
checkpoints people have: Hugging Face safetensors / pytorch_model.bin (sharded or not) and Meta's consolidated .pth.

Parameter names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...), so HF checkpoints, PEFT
adapters and bitsandbytes 4-bit checkpoints map one to one. Rotary embeddings use HF's rotate-half convention; Meta
checkpoints are permuted into it as they load. References: Touvron et al. 2023 (LLaMA), Meta's llama/model.py,
transformers' modeling_llama.py, nanoGPT and gpt-fast.
"""
import json
import math
import mmap
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # < n_heads: grouped-query attention (LLaMA-2 70B, TinyLlama)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # SwiGLU inner size; None: LLaMA's rule from dim and multiple_of
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    head_dim: Optional[int] = None  # None: dim // n_heads
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # output head shares the embedding matrix (small models)

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        if self.hidden_dim is None:  # Meta's rule: 2/3 of 4*dim, scaled, rounded up to multiple_of
            h = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                h = int(self.ffn_dim_multiplier * h)
            self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


PRESETS = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32),  # hidden 11008 by the rule
    "13b": dict(dim=5120, n_layers=40, n_heads=40),  # 13824
    "33b": dict(dim=6656, n_layers=60, n_heads=52),  # 17920
    "65b": dict(dim=8192, n_layers=80, n_heads=64),  # 22016
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5, max_seq_len=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, norm_eps=1e-5,
                       max_seq_len=4096),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, norm_eps=1e-5),
    "tiny": dict(dim=256, n_layers=4, n_heads=4, hidden_dim=688, vocab_size=256, norm_eps=1e-5, max_seq_len=256),
}


def get_args(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})

# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalize in fp32, cast back, then scale (as HF does, so logits match)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(args, device, n=None):
    """cos, sin: (max_seq_len, head_dim) in fp32, HF's rotate-half layout: the frequencies repeat twice."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    t = torch.arange(n or args.max_seq_len, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x: (B, nh, T, hd); cos, sin: (T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate_half: pairs (i, i + hd/2), not Meta's interleaved (2i, 2i+1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of past positions, for generation only (training never creates one)."""
    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros_like(self.k), persistent=False)

    def update(self, pos, k, v):  # pos: (T,) positions of the new k, v: (B, nkv, T, hd)
        self.k[:, :, pos] = k
        self.v[:, :, pos] = v
        end = int(pos[-1]) + 1
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.nh, self.nkv, self.hd = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(args.dim, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(args.dim, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, args.dim, bias=False)
        self.cache = None

    def forward(self, x, cos, sin, pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if self.cache is not None:  # attend to every cached position up to each query's own
            k, v = self.cache.update(pos, k, v)
            mask = torch.arange(k.size(2), device=x.device)[None, :] <= pos[:, None]  # (T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.nkv != self.nh)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class FeedForward(nn.Module):  # SwiGLU: down(silu(gate(x)) * up(x))
    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


IGNORE_INDEX = -100  # targets that the loss skips (PyTorch's and Hugging Face's convention)
CE_CHUNK_ELEMENTS = 2**23  # logits per chunk of the chunked loss (32 MiB in fp32): tokens per chunk = this / vocab


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of the head's logits, a chunk of tokens at a time, so that the (N, vocab) logits,
    their fp32 copy and their gradient never exist whole (at 16 x 512 tokens and 32000 ids: 1 GB each in fp32).
      loss:      z_i = h_i W^T (in h's dtype, then fp32), loss = sum over i with t_i != ignore of lse(z_i) - z_i[t_i]
      gradients: dz_i = softmax(z_i) - onehot(t_i), 0 for ignored i;  dh_i = dz_i W,  dW = sum_i dz_i^T h_i
    The loss is the graph's last node, so its incoming gradient is one scalar g: with `grads` (a backward follows)
    forward computes dh and dW chunk by chunk while each chunk's logits exist, and backward only scales them by g.
    No logits are recomputed (Liger-Kernel's fused linear cross-entropy does the same); dh takes h's place."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, grads):  # h: (N, dim), weight: (vocab, dim), targets: (N,)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if grads and ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if grads and ctx.needs_input_grad[1] else None
        for s in range(0, h.size(0), chunk):
            hc, t = h[s:s + chunk], targets[s:s + chunk]
            z = F.linear(hc, weight).float()  # (c, vocab): as the unchunked head, then its fp32 copy
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            keep = t != IGNORE_INDEX
            loss += (lse - z.gather(1, t.clamp(min=0)[:, None])[:, 0])[keep].sum()
            if dh is None and dw is None:
                continue
            p = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            rows = keep.nonzero()[:, 0]
            p[rows, t[rows]] -= 1
            p *= keep[:, None]  # ignored tokens: no gradient
            dz = p.to(h.dtype)  # the unchunked loss's gradient reaches the head in h's dtype too
            if dh is not None:
                dh[s:s + chunk] = dz @ weight
            if dw is not None:
                dw += (dz.t() @ hc).float()
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        if (ctx.needs_input_grad[0] and dh is None) or (ctx.needs_input_grad[1] and dw is None):
            raise RuntimeError("ChunkedCrossEntropy: backward through a loss computed without grads=True")
        return (None if dh is None else dh * grad.to(dh.dtype),
                None if dw is None else (dw * grad).to(ctx.weight_dtype), None, None, None)


class ActivationOffload:
    """CUDA only: with gradient checkpointing, each block's input (the one activation checkpointing keeps, B x T x
    dim) goes to pinned host memory in forward and comes back in backward, so the GPU holds about two of them instead
    of one per layer (torchtune's activation offloading, Unsloth's gradient offloading). Copies run on a side stream:
    a block's input leaves while the next block computes, and in backward the input of block i-1 is prefetched while
    block i recomputes and runs backward. One instance per forward pass; `block(x)` is the saved-tensor hooks for the
    checkpointed call whose input is x (torch's non-reentrant checkpoint saves its inputs under the outer hooks)."""

    def __init__(self, device):
        self.device, self.stream, self.saved = device, torch.cuda.Stream(device), []

    def block(self, x):
        def pack(t):  # the rope tables (slices of buffers, also saved) stay where they are
            if t.data_ptr() != x.data_ptr() or t.shape != x.shape:
                return t
            return self._offload(t)

        def unpack(r):
            return r if torch.is_tensor(r) else self._fetch(r)
        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _offload(self, t):
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t has been computed
        with torch.cuda.stream(self.stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # t's memory is not reused before the copy has read it
        r = dict(i=len(self.saved), host=host, left=self.stream.record_event(), gpu=None, back=None)
        self.saved.append(r)
        return r

    def _prefetch(self, r):
        self.stream.wait_event(r["left"])
        with torch.cuda.stream(self.stream):
            r["gpu"] = torch.empty(r["host"].shape, dtype=r["host"].dtype, device=self.device)
            r["gpu"].copy_(r["host"], non_blocking=True)
        r["back"] = self.stream.record_event()

    def _fetch(self, r):
        if r["gpu"] is None:
            self._prefetch(r)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(r["back"])
        x, r["gpu"] = r["gpu"], None
        x.record_stream(current)  # allocated on the side stream, used on this one
        if r["i"] > 0 and self.saved[r["i"] - 1]["gpu"] is None:  # backward runs the blocks in reverse
            self._prefetch(self.saved[r["i"] - 1])
        return x


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.Module()  # HF's nesting, so state-dict keys are HF's without any renaming
        self.model.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.model.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.model.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_checkpoint = False  # recompute each block in backward: activations O(layers) -> O(1) blocks
        self.offload_activations = False  # with grad_checkpoint on CUDA: block inputs in host memory (CPU: no-op)
        self.chunked_loss = True  # forward(idx, targets=...) never builds the full logits (exact: see the tests)
        self.init_rope()

    def init_rope(self, device=None):
        cos, sin = rope_tables(self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, pos=None, targets=None):
        """idx: (B, T) token ids -> logits (B, T, vocab). pos: (T,) positions, only with a KV cache. With targets
        (B, T) instead: the fp32 cross-entropy summed over the targets that are not IGNORE_INDEX (nanoGPT's way)."""
        T = idx.size(1)
        cos, sin = (self.rope_cos[:T], self.rope_sin[:T]) if pos is None else (self.rope_cos[pos], self.rope_sin[pos])
        x = self.model.embed_tokens(idx)
        ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        offload = ActivationOffload(x.device) if ckpt and self.offload_activations and x.is_cuda else None
        for layer in self.model.layers:
            if ckpt:
                with offload.block(x) if offload else nullcontext():
                    x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, pos)
        h = self.model.norm(x)
        if targets is None:
            return self.lm_head(h)
        if not self.chunked_loss:
            return F.cross_entropy(self.lm_head(h).flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        if not isinstance(self.lm_head, nn.Linear) or self.lm_head.bias is not None:  # it reads the weight itself
            raise ValueError(f"the chunked loss needs a bias-free nn.Linear head, not {self.lm_head}; "
                             "set model.chunked_loss = False")
        chunk = max(1, CE_CHUNK_ELEMENTS // self.lm_head.out_features)
        return ChunkedCrossEntropy.apply(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), chunk,
                                         torch.is_grad_enabled())

    def setup_cache(self, batch, max_len, dtype=None):
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch, self.args.n_kv_heads, max_len, self.args.head_dim,
                                            dtype or self.model.norm.weight.dtype, self.rope_cos.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_id=None, n_ids=None):
        """idx: (B, T) prompt. Greedy when temperature == 0, else nucleus sampling. Uses a KV cache. n_ids: pick
        only ids below it (a tokenizer smaller than the embedding: real models pad their vocabulary)."""
        B, T = idx.shape
        self.setup_cache(B, min(T + max_new_tokens, self.args.max_seq_len))
        try:
            logits = self(idx, torch.arange(T, device=idx.device))[:, -1]
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            for t in range(T, min(T + max_new_tokens, self.args.max_seq_len)):
                nxt = sample_next(logits[:, :n_ids], temperature, top_p)  # (B,)
                idx = torch.cat([idx, nxt[:, None]], dim=1)
                if eos_id is not None:
                    done |= nxt == eos_id
                if done.all() or t + 1 == self.args.max_seq_len:
                    break
                logits = self(nxt[:, None], torch.tensor([t], device=idx.device))[:, -1]
        finally:
            self.clear_cache()
        return idx


def sample_next(logits, temperature, top_p):
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    p, order = probs.sort(dim=-1, descending=True)
    p[(p.cumsum(-1) - p) > top_p] = 0  # keep the smallest set whose mass reaches top_p
    return order.gather(-1, torch.multinomial(p, 1)).squeeze(-1)

# -----------------------------------------------------------------------------
# checkpoints: config, a small safetensors reader/writer, and streaming loaders


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
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise CheckpointError(f"{file}: rope_type {rope.get('rope_type')!r} is not supported")
        kw = {f: _get(file, c, key, kind, required) for f, (key, kind, required) in HF_KEYS.items()}
        window = _get(file, c, "sliding_window") if c.get("use_sliding_window", True) is not False else None
        if window is not None and window < (kw["max_seq_len"] or ModelArgs.max_seq_len):
            raise CheckpointError(f"{file}: sliding_window {window} is shorter than the model's context "
                                  f"({kw['max_seq_len']} tokens): sliding-window attention is not implemented here, "
                                  f"and full attention would differ from the model's past {window} tokens")
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


class Tokenizer:
    """A thin sentencepiece wrapper: encode with optional BOS/EOS, decode."""
    def __init__(self, path):
        import sentencepiece as spm
        self.path = str(path)
        try:
            with open(path, "rb") as f:
                head = f.read(64)
            if not head:
                raise CheckpointError(f"{path}: an empty file, not a tokenizer model")
            if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head.split(b"\n")[0]):  # base64(token) rank, a line each
                raise CheckpointError(f"{path}: a tiktoken-format BPE file (Meta's Llama 3), not a sentencepiece "
                                      "model; this project reads sentencepiece tokenizers (LLaMA 1/2, Mistral) only")
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the tokenizer ({e.strerror or e})") from None
        except RuntimeError as e:  # sentencepiece's way of saying the file is not a model
            raise CheckpointError(f"{path}: not a sentencepiece model ({str(e).strip()[:200]})") from None
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, s, bos=False, eos=False):
        return [self.bos_id] * bos + self.sp.encode(s) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])
