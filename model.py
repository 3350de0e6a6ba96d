"""
The LLaMA architecture: LLaMA-1, LLaMA-2 with grouped-query attention, TinyLlama. Parameter names
are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...), so HF checkpoints, PEFT
adapters and bitsandbytes 4-bit checkpoints map one to one; rotary embeddings use HF's rotate-half
convention. Loading and checking checkpoint files is checkpoint.py's job: this file builds the model
and runs it, and trusts its arguments. References: Touvron et al. 2023 (LLaMA), Meta's
llama/model.py, transformers' modeling_llama.py, nanoGPT, gpt-fast.
"""
import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # < n_heads: grouped-query attention (LLaMA-2 70B, TinyLlama)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # SwiGLU inner size; None: LLaMA's rule (dim, multiple_of)
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    head_dim: Optional[int] = None  # None: dim // n_heads
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # output head shares the embedding matrix (small models)
    rope_scaling: Optional[dict] = None  # Llama 3.x: {"rope_type": "llama3", "factor": 8, ...}
    qkv_bias: bool = False  # biases on q, k and v (Qwen2 / 2.5)
    qk_norm: bool = False  # RMSNorm of each head's q and k before RoPE (Qwen3)
    sliding_window: Optional[int] = None  # Mistral v0.1: a token sees the window - 1 before it
    model_type: str = "llama"  # the family as Hugging Face names it: llama mistral qwen2 qwen3
    special_ids: Optional[dict] = field(default=None, compare=False)  # bos/eos/pad, as read

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
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                       norm_eps=1e-5, max_seq_len=4096),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                           norm_eps=1e-5),
    "tiny": dict(dim=256, n_layers=4, n_heads=4, hidden_dim=688, vocab_size=256, norm_eps=1e-5,
                 max_seq_len=256),
}
LLAMA3 = dict(n_kv_heads=8, vocab_size=128256, norm_eps=1e-5, rope_theta=5e5, max_seq_len=131072)
ROPE31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)
ROPE32 = dict(ROPE31, factor=32.0)
QWEN = dict(norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768)
PRESETS.update({  # the families people fine-tune now, as their Hugging Face configs state them
    "llama3.1-8b": dict(LLAMA3, dim=4096, n_layers=32, n_heads=32, hidden_dim=14336,
                        rope_scaling=ROPE31),
    "llama3.1-70b": dict(LLAMA3, dim=8192, n_layers=80, n_heads=64, hidden_dim=28672,
                         rope_scaling=ROPE31),
    "llama3.2-1b": dict(LLAMA3, dim=2048, n_layers=16, n_heads=32, hidden_dim=8192,
                        tie_embeddings=True, rope_scaling=ROPE32),
    "llama3.2-3b": dict(LLAMA3, dim=3072, n_layers=28, n_heads=24, hidden_dim=8192,
                        tie_embeddings=True, rope_scaling=ROPE32),
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                       vocab_size=32768, norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768,
                       model_type="mistral"),  # v0.3
    "qwen2.5-7b": dict(QWEN, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944,
                       vocab_size=152064, qkv_bias=True, model_type="qwen2"),
    "qwen3-8b": dict(QWEN, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                     hidden_dim=12288, vocab_size=151936, max_seq_len=40960, qk_norm=True,
                     model_type="qwen3"),
})


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


def rope_frequencies(args, device=None):
    """theta^(-2i/hd), i < hd/2, as Hugging Face computes them. Llama 3.x stretches the low ones: a
    wavelength (2 pi / f) past the pretraining context / low_freq_factor is divided by `factor`, one
    under context / high_freq_factor kept, and those between move smoothly from one to the other."""
    exponents = torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim
    f = 1.0 / (args.rope_theta ** exponents)
    s = args.rope_scaling or {}
    if s.get("rope_type") == "linear":
        return f / s["factor"]
    if s.get("rope_type") != "llama3":
        return f
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    factor, low, high, context = (s[k] for k in keys)
    wavelen = 2 * math.pi / f
    f = torch.where(wavelen > context / low, f / factor, f)
    smooth = (context / wavelen - low) / (high - low)  # 0 at the low band's edge, 1 at the high
    between = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(between, (1 - smooth) * f / factor + smooth * f, f)


def rope_tables(args, device, n=None):
    """cos, sin: (max_seq_len, head_dim) fp32 in HF's rotate-half layout (frequencies twice)."""
    inv_freq = rope_frequencies(args, device)
    t = torch.arange(n or args.max_seq_len, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x: (B, nh, T, hd); cos, sin: (T, hd), or (B, T, hd) in packed rows
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    # rotate_half: pairs (i, i + hd/2), not Meta's interleaved (2i, 2i+1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of past positions, for generation only (training never creates one)."""
    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
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
        self.window = args.sliding_window
        self.q_proj = nn.Linear(args.dim, self.nh * self.hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, self.nkv * self.hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, self.nkv * self.hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, args.dim, bias=False)
        if args.qk_norm:  # Qwen3: each head's q and k normalized over hd, one weight for all
            self.q_norm = RMSNorm(self.hd, args.norm_eps)
            self.k_norm = RMSNorm(self.hd, args.norm_eps)
        self.cache = None

    def forward(self, x, cos, sin, pos=None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:  # attend to every cached position up to each query's own
            k, v = self.cache.update(pos, k, v)
            mask = window_mask(pos, torch.arange(k.size(2), device=x.device), self.window)  # (T, S)
        gqa = self.nkv != self.nh
        if mask is None or torch.is_tensor(mask):  # causal, or a dense mask: (T, S), (B, 1, T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa)  # (B, nh, T, hd)
        else:  # packed rows on CUDA: FlexAttention skips the blocks its BlockMask masks whole
            y = flex(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa)
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

    def forward(self, x, cos, sin, pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


@functools.cache
def flex(compiled):  # FlexAttention's fused kernels come from torch.compile (CPU: the reference)
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def document_positions(docs):
    """docs: (B, T) document ids of packed rows, each document's tokens contiguous -> (B, T) each
    token's position in its own document: RoPE restarts at every document, as in its own row."""
    t = torch.arange(docs.size(1), device=docs.device).expand_as(docs)
    first = torch.ones_like(docs, dtype=torch.bool)
    first[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return t - torch.where(first, t, 0).cummax(dim=1).values  # t - its document's first index


def window_mask(q, kv, window=None):
    """(T, S) bool: query positions q (T,) see key positions kv (S,) at or before their own, and
    with a sliding window (Mistral) only the window - 1 before it."""
    d = q[:, None] - kv[None, :]
    return (d >= 0) & (d < window) if window else d >= 0


def document_mask(docs, dense=None, window=None):
    """Causal attention within each document of packed rows, never across (and within a sliding
    window). dense (default: off CUDA): a (B, 1, T, T) bool mask for SDPA; else FlexAttention's
    BlockMask, which skips the blocks masked whole instead of materializing T x T (a few bytes
    per 128 x 128 block)."""
    B, T = docs.shape
    if docs.device.type != "cuda" if dense is None else dense:
        t = torch.arange(T, device=docs.device)
        return (docs[:, :, None] == docs[:, None, :])[:, None] & window_mask(t, t, window)
    w = window or T
    same_doc = lambda b, h, q, kv: (docs[b, q] == docs[b, kv]) & (q >= kv) & (q - kv < w)
    return create_block_mask(same_doc, B, None, T, T, device=docs.device)


IGNORE_INDEX = -100  # targets that the loss skips (PyTorch's and Hugging Face's convention)
CE_CHUNK_ELEMENTS = 2**23  # logits per chunk of the chunked loss (32 MiB in fp32): / vocab = tokens


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of the head's logits, a chunk of tokens at a time, so that the
    (N, vocab) logits, their fp32 copy and their gradient never exist whole (at 16 x 512 tokens and
    32000 ids: 1 GB each in fp32).
      loss:      z_i = h_i W^T (in h's dtype, then fp32),
                 loss = sum over i with t_i != ignore of lse(z_i) - z_i[t_i]
      gradients: dz_i = softmax(z_i) - onehot(t_i), 0 for ignored i;
                 dh_i = dz_i W,  dW = sum_i dz_i^T h_i
    The loss is the graph's last node, so its incoming gradient is one scalar g: with `grads` (a
    backward follows) forward computes dh and dW chunk by chunk while each chunk's logits exist, and
    backward only scales them by g. No logits are recomputed (Liger-Kernel's fused linear
    cross-entropy does the same); dh takes h's place."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, grads):  # h: (N, dim), weight: (vocab, dim), (N,)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if grads and ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if grads and ctx.needs_input_grad[1] \
            else None
        for s in range(0, h.size(0), chunk):
            hc, t = h[s:s + chunk], targets[s:s + chunk]
            z = F.linear(hc, weight).float()  # (c, vocab): as the unchunked head, then in fp32
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
        needs_dh, needs_dw = ctx.needs_input_grad[:2]
        assert not (needs_dh and dh is None or needs_dw and dw is None), "forward ran without grads"
        return (None if dh is None else dh * grad.to(dh.dtype),
                None if dw is None else (dw * grad).to(ctx.weight_dtype), None, None, None)


class ActivationOffload:
    """CUDA only: with gradient checkpointing, each block's input (the one activation checkpointing
    keeps, B x T x dim) goes to pinned host memory in forward and comes back in backward, so the GPU
    holds about two of them instead of one per layer (torchtune's activation offloading, Unsloth's
    gradient offloading). Copies run on a side stream: a block's input leaves while the next block
    computes, and in backward the input of block i-1 is prefetched while block i recomputes and runs
    backward. One instance per forward pass; `block(x)` is the saved-tensor hooks for the
    checkpointed call whose input is x (torch's non-reentrant checkpoint saves its inputs under the
    outer hooks)."""

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
        if r["i"] > 0 and self.saved[r["i"] - 1]["gpu"] is None:  # backward: blocks in reverse
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
        # recompute each block in backward: activations O(layers) -> O(1) blocks
        self.grad_checkpoint = False
        # with grad_checkpoint on CUDA: block inputs wait in host memory (on CPU: a no-op)
        self.offload_activations = False
        # forward(idx, targets=...) never builds the full logits (exact: see the tests)
        self.chunked_loss = True
        self.init_rope()

    def init_rope(self, device=None):
        cos, sin = rope_tables(self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, pos=None, targets=None, docs=None):
        """idx: (B, T) token ids -> logits (B, T, vocab). pos: (T,) positions, only with a KV cache.
        With targets (B, T) instead: the fp32 cross-entropy summed over the targets that are not
        IGNORE_INDEX (nanoGPT's way). docs: (B, T) document ids of packed rows: each document is
        computed as if it were alone in its row (its own positions, attention within it only)."""
        T, mask, w = idx.size(1), None, self.args.sliding_window
        if docs is not None:
            pos, mask = document_positions(docs), document_mask(docs, window=w)
        elif w and w < T and pos is None:  # longer than Mistral's window: a band of the past
            t = torch.arange(T, device=idx.device)
            mask = window_mask(t, t, w)
        at = slice(0, T) if pos is None else pos
        cos, sin = self.rope_cos[at], self.rope_sin[at]
        x = self.model.embed_tokens(idx)
        ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        offload = ckpt and self.offload_activations and x.is_cuda and ActivationOffload(x.device)
        for layer in self.model.layers:
            if ckpt:
                with offload.block(x) if offload else nullcontext():
                    x = checkpoint(layer, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, pos, mask)
        h = self.model.norm(x)
        if targets is None:
            return self.lm_head(h)
        if not self.chunked_loss:
            return F.cross_entropy(self.lm_head(h).flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        head = self.lm_head  # read by the loss itself: a bias-free nn.Linear
        assert isinstance(head, nn.Linear) and head.bias is None, "the chunked loss reads the head"
        chunk = max(1, CE_CHUNK_ELEMENTS // head.out_features)
        return ChunkedCrossEntropy.apply(h.flatten(0, 1), head.weight, targets.flatten(), chunk,
                                         torch.is_grad_enabled())

    def setup_cache(self, batch, max_len, dtype=None):
        for layer in self.model.layers:
            a, dtype = self.args, dtype or self.model.norm.weight.dtype
            layer.self_attn.cache = KVCache(batch, a.n_kv_heads, max_len, a.head_dim, dtype,
                                            self.rope_cos.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_id=None, n_ids=None):
        """idx: (B, T) prompt. Greedy when temperature == 0, else nucleus sampling. Uses a KV cache.
        n_ids: pick only ids below it (a tokenizer smaller than the embedding: real models pad their
        vocabulary)."""
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
