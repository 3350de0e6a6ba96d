"""
QLoRA (Dettmers et al. 2023, arXiv 2305.14314): a frozen base model stored in 4 bits, trained
through low-rank adapters (LoRA, Hu et al. 2021) that stay in 16/32 bits.

Read top to bottom: the code tables (NF4, FP4, Int4, the 8-bit dynamic map), the one 8-bit
blockwise quantizer (double quantization here, the 8-bit optimizer in paged_adamw.py), 4-bit
quantize / dequantize, the autograd function and the one module (a 4-bit linear with a LoRA
adapter), and the function that swaps a model.py model's linears in place. Storage is
bitsandbytes' layout bit for bit (kernels.QuantState), so checkpoints go both ways between this
project and transformers + peft; checkpoint.py reads and writes those files and checks their
bytes. The bit twiddling lives in kernels.py (Triton on CUDA, pure torch elsewhere).
"""
import json
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import QuantState

# -----------------------------------------------------------------------------
# 4-bit code tables: 16 values in [-1, 1]; a weight is stored as the index of the value nearest to
# w / absmax


def nf4_table(offset=0.9677083):
    """NormalFloat4 (paper, sec. 3): quantiles of N(0, 1), so that each code covers an equal share
    of normally distributed weights, normalized into [-1, 1]. Asymmetric so that 0 is exact: 8
    quantiles for the positive half, 7 for the negative, and 0. As published, the quantile function
    is taken at probabilities evenly spaced from `offset` = 1 - (1/30 + 1/32) / 2 (which keeps the
    outermost ones finite) to 0.5, with bitsandbytes' arithmetic (fp32 probabilities, the inverse
    CDF in fp64, normalization in fp32): the table is the published one bit for bit."""
    quantiles = lambda n: torch.special.ndtri(torch.linspace(offset, 0.5, n)[:-1].double()).float()
    pos, neg = quantiles(9), -quantiles(8)  # 8 values, largest first; 7 values
    v = torch.cat([pos, torch.zeros(1), neg]).sort().values
    return v / v.max()  # [-1, ..., 0, ..., 1], ascending


def fp4_table():
    """FP4 (e2m1) as bitsandbytes codes it: bit 3 is the sign, codes 0..7 are
    [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12."""
    pos = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    return torch.cat([pos, -pos])  # codes 8..15: the negatives (code 8 is -0)


def int4_table():
    """Symmetric Int4, the paper's baseline: 15 evenly spaced levels (i - 7) / 7, plus a repeat of
    1.0 so that the same absmax round-to-nearest machinery (16 entries) applies unchanged."""
    return torch.cat([(torch.arange(15) - 7) / 7, torch.ones(1)])


def dynamic_map(signed=True):
    """bitsandbytes' 8-bit dynamic map (Dettmers 2016): for each exponent 10^(i-6), i = 0..6, linear
    fractions in [0.1, 1]: 2^i of them with both signs (signed: double quantization, AdamW's first
    moment), or 2^(i+1) of them without (unsigned: the second moment spends the sign bit on twice
    the fractions); plus 0 and 1. 256 values, sorted, fp32 as bitsandbytes computes them."""
    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** (i + (not signed)) + 1)
        values = (10 ** (i - 6) * ((b[:-1] + b[1:]) / 2)).tolist()  # fp32, in bitsandbytes' order
        data += values + ([-v for v in values] if signed else [])
    return torch.tensor(sorted(data + [0.0, 1.0]))


CODES = {"nf4": nf4_table(), "fp4": fp4_table(), "int4": int4_table()}
DYNAMIC = dynamic_map()
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# -----------------------------------------------------------------------------
# pure functions: 8-bit blockwise quantization (Dettmers et al. 2022), then 4-bit quantize and
# dequantize with double quantization


def quantize_blockwise(x, code, blocksize=256, out=None, absmax=None):
    """x: fp32, any shape -> (codes uint8 of x.shape, absmax fp32 [ceil(n / blocksize)]), written
    into `out` and `absmax` when given. Each value is scaled by its block's reciprocal absmax (a
    multiply, as bitsandbytes' CUDA kernels) and takes the exactly nearest of the 256 codes, ties to
    the lower one (fp32 values and fp32 codes have exact fp64 midpoints). An all-zero block has
    absmax 0 and stores the code of 0.0."""
    assert x.dtype == torch.float32 and code.shape == (256,), "x: fp32, code: fp32 [256]"
    n, nb = x.numel(), -(-x.numel() // blocksize)
    blocks = F.pad(x.reshape(-1), (0, nb * blocksize - n)).view(nb, blocksize)
    amax = blocks.abs().amax(dim=1)  # (nb,)
    recip = torch.where(amax > 0, 1.0 / amax, torch.zeros_like(amax))
    scaled = (blocks * recip[:, None]).view(-1)[:n]
    c = code.to(x.device, torch.float64)
    idx = torch.bucketize(scaled.double(), (c[1:] + c[:-1]) / 2, out_int32=True)  # (n,)
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device) if out is None else out
    out.view(-1).copy_(idx)
    return out, amax if absmax is None else absmax.copy_(amax)


def dequantize_blockwise(codes, absmax, code, blocksize=256):
    """codes uint8 (any shape), absmax fp32 [nblocks] -> fp32 of codes.shape: code[c] * absmax."""
    scale = absmax.repeat_interleave(blocksize)[:codes.numel()]
    return (code.to(codes.device)[codes.reshape(-1).long()] * scale).view(codes.shape)


def double_quantize(absmax, blocksize=256):
    """Quantize the fp32 block scales themselves (paper, sec. 3): subtract their mean (they are all
    positive, so this centres them for the signed map), then 8-bit blockwise with the dynamic map,
    256 scales per block. absmax: fp32 [nblocks] ->
    (codes uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)], offset: float)."""
    assert absmax.dtype == torch.float32 and absmax.dim() == 1, "absmax: fp32 [nblocks]"
    offset = absmax.mean()  # fp32
    codes, nested = quantize_blockwise(absmax - offset, DYNAMIC, blocksize)
    return codes, nested, offset.item()


def quantize(w, quant_type="nf4", blocksize=64, double_quant=True):
    """w: float tensor, any shape -> QuantState. Each block is scaled by its absmax into [-1, 1] and
    every value becomes the index of the nearest table value (kernels.quantize_4bit)."""
    assert w.is_floating_point(), f"quantize expects a float tensor, got {w.dtype}"
    assert blocksize in BLOCKSIZES, f"blocksize must be one of {BLOCKSIZES}"
    code = CODES[quant_type].to(w.device)
    # packed: uint8 [(n+1)//2], absmax: fp32 [nblocks]
    packed, absmax = kernels.quantize_4bit(w.contiguous(), code, blocksize)
    nested_absmax, nested_code, offset = None, None, 0.0
    if double_quant:
        absmax, nested_absmax, offset = double_quantize(absmax)
        nested_code = DYNAMIC.to(w.device)
    return QuantState(packed.view(-1, 1), absmax, code, w.shape, w.dtype, blocksize, quant_type,
                      nested_absmax, nested_code, offset)


def dequantize(q, dtype=None):
    """QuantState -> tensor of q.shape: code[c] * absmax in fp32, one cast to dtype (or q.dtype)."""
    return kernels.dequantize_4bit(q, dtype)


BNB_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_bnb(q):
    """bitsandbytes' state-dict entries for one weight (QuantState.as_dict(packed=True)): the
    tensors, and the other fields as UTF-8 JSON in a uint8 tensor named after the quant type."""
    d = {"weight": q.packed, "weight.absmax": q.absmax, "weight.quant_map": q.code}
    dtype = str(q.dtype).removeprefix("torch.")
    state = dict(quant_type=q.quant_type, blocksize=q.blocksize, dtype=dtype, shape=list(q.shape))
    if q.nested_absmax is not None:
        d["weight.nested_absmax"], d["weight.nested_quant_map"] = q.nested_absmax, q.nested_code
        state.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32",
                     nested_offset=q.offset)
    json_bytes = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    d[f"weight.quant_state.bitsandbytes__{q.quant_type}"] = json_bytes
    return d


def from_bnb(parts):
    """The inverse of to_bnb: a QuantState from {name: tensor}, or None while a part is still
    missing. The parts are trusted: checkpoint.bnb_state checks a file's before they get here."""
    state = [k for k in parts if k.startswith("weight.quant_state.bitsandbytes__")]
    if not state or not {"weight", "weight.absmax", "weight.quant_map"} <= parts.keys():
        return None
    s = json.loads(bytes(parts[state[0]].tolist()))
    dq = "nested_offset" in s  # double quantization
    if dq and not {"weight.nested_absmax", "weight.nested_quant_map"} <= parts.keys():
        return None
    # bnb_4bit_quant_storage may be another dtype than uint8: the bytes are what count
    packed = parts["weight"].contiguous().reshape(-1).view(torch.uint8).reshape(-1, 1)
    return QuantState(packed, parts["weight.absmax"], parts["weight.quant_map"],
                      torch.Size(s["shape"]), BNB_DTYPES[s["dtype"]], s["blocksize"],
                      s["quant_type"], parts.get("weight.nested_absmax"),
                      parts.get("weight.nested_quant_map"), float(s.get("nested_offset", 0.0)),
                      s.get("nested_blocksize", 256))

# -----------------------------------------------------------------------------
# the 4-bit linear with a LoRA adapter

TENSORS = ("packed", "absmax", "code", "nested_absmax", "nested_code")  # a QuantState's tensors


class Matmul4bit(torch.autograd.Function):
    """The frozen 4-bit base of the layer. W = dequant(W_4bit): (out, in); x: (..., in);
    g = dL/dy: (..., out).

    Forward:   y = x W^T
    Backward:  dL/dx = g W    (chain rule, dy_j/dx_k = W_jk; W is dequantized again from 4 bits)
               dL/dW: none    (frozen: only the packed weight and its constants are saved, never W)
    The layer adds the adapter, y += s (x A^T) B^T with s = alpha / r, whose gradients autograd
    derives through lora_A and lora_B: dL/dB = s g^T (x A^T), dL/dA = s (g B)^T x, and dL/dx gets
    the extra term s (g B) A."""

    @staticmethod
    def forward(ctx, x, q):
        ctx.save_for_backward(*(getattr(q, k) for k in TENSORS))  # checkpointing's hooks see these
        ctx.fields = {k: v for k, v in vars(q).items() if k not in TENSORS}
        return kernels.matmul_4bit(x, q)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:  # (..., out) @ (out, in) -> (..., in)
            q = QuantState(**dict(zip(TENSORS, ctx.saved_tensors)), **ctx.fields)
            grad_x = kernels.matmul_4bit(grad_y, q, transpose=True)
        return grad_x, None


def _frozen(t):
    """The frozen base's tensors (packed bytes, absmax, code tables, or the 16-bit baseline's dense
    weight) are nn.Parameters with requires_grad=False, not buffers, because FSDP2 (train.py --fsdp)
    shards parameters only: as frozen parameters they are split along dim 0 across ranks,
    all-gathered whole just before the block's forward and the checkpointed recompute, and never
    reduce-scattered, as they have no gradient. The forward only sees the gathered, whole tensors,
    so dequantization is unchanged."""
    return None if t is None else nn.Parameter(t, requires_grad=False)


def keep(module, name, t):
    """fill's default store: t becomes the frozen parameter `name`."""
    setattr(module, name, _frozen(t))


class LoRALinear4bit(nn.Module):
    """y = x W^T + (alpha / r) * B A dropout(x), W frozen in 4 bits; A: (r, in), B: (out, r) train.

    W lives in frozen parameters (requires_grad=False: no optimizer or clipping sees them; _frozen
    says why not buffers) under bitsandbytes' names: the state dict holds `weight` (packed),
    `weight.absmax`, `weight.quant_map`, ... exactly as transformers saves a Linear4bit, and
    `lora_A.weight`, `lora_B.weight` as PEFT names them. B = 0 at init, so training starts from the
    base model. compute_dtype None: bf16 on CUDA, fp32 elsewhere. quant_type "none" is the paper's
    16-bit LoRA baseline: `weight` stays the dense (out, in) frozen weight, used by F.linear."""

    def __init__(self, in_features, out_features, r=64, alpha=16, dropout=0.1, quant_type="nf4",
                 blocksize=64, double_quant=True, compute_dtype=None, device=None,
                 lora_device=None, bias=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        # placeholders with bitsandbytes' shapes (on the meta device: no memory), filled by fill
        n, q = in_features * out_features, quant_type != "none"
        nb, dq = -(-n // blocksize), q and double_quant
        empty = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device=device)
        self.weight = _frozen(empty((n + 1) // 2, 1, dtype=torch.uint8) if q else
                              empty(out_features, in_features))
        self.absmax = _frozen(empty(nb, dtype=torch.uint8 if dq else torch.float32) if q else None)
        self.quant_map = _frozen(empty(16) if q else None)
        self.nested_absmax = _frozen(empty(-(-nb // 256)) if dq else None)
        self.nested_quant_map = _frozen(empty(256) if dq else None)
        self.bias = _frozen(empty(out_features) if bias else None)  # Qwen2: frozen, unquantized
        self.offset, self.nested_blocksize, self.weight_dtype = 0.0, 256, torch.float32
        self.set_lora(r, alpha, dropout, device=lora_device or device)

    def set_lora(self, r, alpha, dropout, device=None, dtype=torch.float32):
        """A fresh adapter: A Kaiming-uniform (PEFT's init, a = sqrt(5)), B zero; r = 0: none."""
        self.r, self.alpha, self.scale = r, alpha, alpha / r if r else 0.0
        self.dropout = nn.Dropout(dropout)
        linear = lambda i, o: nn.Linear(i, o, bias=False, device=device, dtype=dtype) if r else None
        self.lora_A, self.lora_B = linear(self.in_features, r), linear(r, self.out_features)
        if r:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def fill(self, w, store=keep):
        """The frozen weight, from a QuantState (kept as it is) or a dense (out, in) float tensor
        (quantized; kept dense by quant_type "none"). store(module, name, tensor) puts each frozen
        tensor in place: by default as a new parameter; distributed.py's keeps this rank's rows of
        an FSDP-sharded one."""
        if torch.is_tensor(w) and self.quant_type != "none":
            w = quantize(w, self.quant_type, self.blocksize, self.double_quant)
        assert tuple(w.shape) == (self.out_features, self.in_features), f"{w.shape} for {self}"
        if torch.is_tensor(w):  # the 16-bit baseline: own the weight (w may view a mapped file)
            store(self, "weight", w.detach().clone())
            self.weight_dtype = w.dtype
            return
        for name, t in zip(("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map"),
                           (w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code)):
            store(self, name, t)
        self.quant_type, self.blocksize, self.weight_dtype = w.quant_type, w.blocksize, w.dtype
        self.double_quant = w.nested_absmax is not None
        self.offset, self.nested_blocksize = w.offset, w.nested_blocksize

    def quantized(self):
        return QuantState(self.weight, self.absmax, self.quant_map,
                          (self.out_features, self.in_features), self.weight_dtype, self.blocksize,
                          self.quant_type, self.nested_absmax, self.nested_quant_map, self.offset,
                          self.nested_blocksize)

    def delta(self):
        """The adapter as a weight update: (alpha / r) B @ A, (out, in) in fp32."""
        return self.scale * self.lora_B.weight.float() @ self.lora_A.weight.float()

    def forward(self, x):  # x: (..., in) -> (..., out)
        cdt = self.compute_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
        if self.quant_type == "none":  # the 16-bit baseline: a plain matmul, frozen dense weight
            y = F.linear(x.to(cdt), self.weight.to(cdt))
        else:
            y = Matmul4bit.apply(x.to(cdt), self.quantized())
        if self.bias is not None:
            y = y + self.bias.to(cdt)
        if self.r:  # the adapter sees the input in its own dtype (fp32 by default), as PEFT does
            a = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
            y = y + (self.lora_B(a) * self.scale).to(cdt)
        return y.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # (lora_*: their own modules)
        frozen = {"weight": self.weight} if self.quant_type == "none" else to_bnb(self.quantized())
        frozen.update({"bias": self.bias} if self.bias is not None else {})
        destination.update({prefix + k: v if keep_vars else v.detach() for k, v in frozen.items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing,
                              unexpected, errors):
        ours = {k[len(prefix):]: v.to(self.weight.device) for k, v in state_dict.items()
                if k.startswith(prefix) and not k[len(prefix):].startswith(("lora_A.", "lora_B."))}
        if self.bias is not None and "bias" in ours:
            self.bias = _frozen(ours.pop("bias").clone())
        dense = "weight" in ours and ours["weight"].shape == (self.out_features, self.in_features)
        if dense:  # a 16/32-bit weight: quantized as it is filled in
            return self.fill(ours["weight"])
        if (q := from_bnb(ours)) is None:
            need = ("weight", "weight.absmax", "weight.quant_map")
            missing.extend(prefix + k for k in need if k not in ours)
            return
        self.fill(q)
        unexpected.extend(prefix + k for k in ours if k not in to_bnb(q))

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, {self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, r={self.r}, "
                f"alpha={self.alpha}")

# -----------------------------------------------------------------------------
# swapping a model's linears

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a block's


def add_lora(model, targets=LINEARS, r=64, alpha=16, dropout=0.1, quant_type="nf4", blocksize=64,
             double_quant=True, compute_dtype=None, lora_device=None):
    """Swap, in place, every linear of the blocks (the paper quantizes them all; the embeddings,
    norms and output head stay unquantized) for a LoRALinear4bit, with an adapter on those named in
    `targets` (default or "all": every one, as the paper; or e.g. "q_proj,v_proj"), and freeze
    everything else. A linear with weights is quantized now; on the meta device the frozen
    parameters wait for the loader (checkpoint.quantize_hook)."""
    if isinstance(targets, str):
        targets = LINEARS if targets == "all" else tuple(targets.split(","))
    assert set(targets) <= set(LINEARS), f"targets {targets} must be among {LINEARS}"
    for p in model.parameters():
        p.requires_grad_(False)  # only the adapters train
    for parent in list(model.modules()):
        for name, lin in list(parent.named_children()):
            if not (isinstance(lin, nn.Linear) and name in LINEARS):
                continue
            dev = lin.weight.device
            m = LoRALinear4bit(lin.in_features, lin.out_features, r if name in targets else 0,
                               alpha, dropout, quant_type, blocksize, double_quant, compute_dtype,
                               dev, lora_device or dev, bias=lin.bias is not None)
            if not lin.weight.is_meta:
                m.fill(lin.weight.detach())
                if lin.bias is not None:
                    m.bias = _frozen(lin.bias.detach().clone())
            setattr(parent, name, m)
    return model


def linears_4bit(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)}


def lora_to(model, dtype):
    """The adapters in `dtype`: the paper trains them in 16 bits (AdamW's moments stay fp32)."""
    for m in linears_4bit(model).values():
        if m.r:
            m.lora_A.to(dtype)
            m.lora_B.to(dtype)


def is_dtensor(x):
    """An FSDP-sharded tensor (a DTensor), checked without importing torch.distributed.tensor: that
    import costs every start-up a second, and no DTensor exists before something has imported it
    (distributed.shard_model)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)
