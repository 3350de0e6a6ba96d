"""
QLoRA (Dettmers et al. 2023, arXiv 2305.14314): a frozen base model stored in 4 bits, trained through low-rank
adapters (LoRA, Hu et al. 2021) that stay in 16/32 bits.

Read top to bottom: the 4-bit code tables (NF4, FP4, Int4), pure quantize / dequantize functions with double
quantization, the autograd function and the one module (a 4-bit linear with a LoRA adapter), the function that swaps
a model.py model's linears in place (and quantizes a checkpoint tensor by tensor as it streams in), then the file
formats: bitsandbytes' 4-bit checkpoints as Hugging Face saves them, PEFT adapters, and a merged 16-bit model.
Storage is bitsandbytes' layout bit for bit, so checkpoints go both ways between this file and transformers + peft.
The bit twiddling lives in kernels.py (Triton on CUDA, pure torch elsewhere).
"""
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import kernels
from model import (CheckpointError, Transformer, load_args, load_model, load_weights, parse_json, read_safetensors,
                   save_safetensors, stream_tensors)

# -----------------------------------------------------------------------------
# 4-bit code tables: 16 values in [-1, 1]; a weight is stored as the index of the value nearest to w / absmax


def nf4_table(offset=0.9677083):
    """NormalFloat4 (paper, sec. 3): quantiles of N(0, 1), so that each code covers an equal share of normally
    distributed weights, normalized into [-1, 1]. Asymmetric so that 0 is exact: 8 quantiles for the positive half,
    7 for the negative, and 0. As published, the quantile function is taken at probabilities evenly spaced from
    `offset` = 1 - (1/30 + 1/32) / 2 (which keeps the outermost ones finite) to 0.5, with bitsandbytes' arithmetic
    (fp32 probabilities, the inverse CDF in fp64, normalization in fp32): the table is the published one bit for bit."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()  # 8 values, largest first
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()  # 7 values
    v = torch.cat([pos, torch.zeros(1), neg]).sort().values
    return v / v.max()  # [-1, ..., 0, ..., 1], ascending


def fp4_table():
    """FP4 (e2m1) as bitsandbytes codes it: bit 3 is the sign, codes 0..7 = [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12."""
    pos = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    return torch.cat([pos, -pos])  # codes 8..15: the negatives (code 8 is -0)


def int4_table():
    """Symmetric Int4, the paper's baseline: 15 evenly spaced levels (i - 7) / 7, plus a repeat of 1.0 so that
    the same absmax round-to-nearest machinery (16 entries) applies unchanged."""
    return torch.cat([(torch.arange(15) - 7) / 7, torch.ones(1)])


def dynamic_map(signed=True):
    """bitsandbytes' 8-bit dynamic map (Dettmers 2016): for each exponent 10^(i-6), i = 0..6, linear fractions in
    [0.1, 1]: 2^i of them with both signs (signed: double quantization, AdamW's first moment), or 2^(i+1) of them
    without (unsigned: the second moment spends the sign bit on twice the fractions); plus 0 and 1. 256 values,
    sorted, fp32 as bitsandbytes computes them."""
    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** (i + (not signed)) + 1)
        means = (b[:-1] + b[1:]) / 2
        data += (10 ** (i - 6) * means).tolist() + ((-(10 ** (i - 6)) * means).tolist() if signed else [])
    return torch.tensor(sorted(data + [0.0, 1.0]))


CODES = {"nf4": nf4_table(), "fp4": fp4_table(), "int4": int4_table()}
DYNAMIC = dynamic_map()
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# -----------------------------------------------------------------------------
# pure functions: quantize / dequantize a tensor, double-quantize the block constants


@dataclass
class Quantized4bit:
    """One 4-bit tensor in bitsandbytes' layout. Blocks of `blocksize` run over the flattened tensor; each has a
    scale absmax: fp32, or with double quantization an 8-bit code into `nested_code` (the dynamic map), so that
    absmax_i = nested_code[absmax[i]] * nested_absmax[i // 256] + offset."""
    packed: torch.Tensor  # uint8 [(numel+1)//2, 1]: element 2k in the high nibble of byte k
    absmax: torch.Tensor  # fp32 [nblocks], or uint8 [nblocks] with double quantization
    code: torch.Tensor  # fp32 [16]: the 4-bit value table
    shape: torch.Size
    dtype: torch.dtype  # of the original tensor: dequantize's default output dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    nested_absmax: Optional[torch.Tensor] = None  # fp32 [ceil(nblocks/256)]
    nested_code: Optional[torch.Tensor] = None  # fp32 [256]
    offset: float = 0.0  # the fp32 mean of the absmax, subtracted before the 8-bit quantization
    nested_blocksize: int = 256

    def __post_init__(self):  # the invariants every producer (quantize, a checkpoint) must meet
        self.shape, n = torch.Size(self.shape), math.prod(self.shape)
        nb = -(-n // self.blocksize)
        assert self.packed.dtype == torch.uint8 and self.packed.numel() == (n + 1) // 2, "packed: uint8 [(n+1)//2]"
        assert self.code.shape == (16,) and self.code.dtype == torch.float32, "code: fp32 [16]"
        assert self.absmax.shape == (nb,), f"absmax: [{nb}] for {list(self.shape)} in blocks of {self.blocksize}"
        if self.nested_absmax is None:
            assert self.absmax.dtype == torch.float32, "absmax: fp32 without double quantization"
        else:  # a model.to(bfloat16) would round these: move quantized modules with .to(device) only
            assert self.absmax.dtype == torch.uint8 and self.nested_code.shape == (256,)
            assert self.nested_absmax.shape == (-(-nb // self.nested_blocksize),)
            assert self.nested_absmax.dtype == self.nested_code.dtype == torch.float32

    @property
    def numel(self):
        return math.prod(self.shape)

    def nbytes(self, size=lambda t: t.nbytes):
        """Bytes stored: the 4-bit codes, the per-block constants, and the per-tensor tables (code maps, offset).
        size=local_bytes counts only this process's shards of FSDP-sharded tensors."""
        nested = self.nested_absmax is not None
        return dict(weight=size(self.packed),
                    constants=size(self.absmax) + (size(self.nested_absmax) if nested else 0),
                    tables=size(self.code) + (size(self.nested_code) + 4 if nested else 0))


def double_quantize(absmax, blocksize=256):
    """Quantize the fp32 block scales themselves (paper, sec. 3): subtract their mean (they are all positive, so
    this centres them for the signed map), then 8-bit blockwise with the dynamic map, 256 scales per block.
    absmax: fp32 [nblocks] -> (codes uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)], offset: float)."""
    assert absmax.dtype == torch.float32 and absmax.dim() == 1, "absmax: fp32 [nblocks]"
    offset = absmax.mean()  # fp32
    a = absmax - offset
    n, nb = a.numel(), -(-a.numel() // blocksize)
    blocks = nn.functional.pad(a, (0, nb * blocksize - n)).view(nb, blocksize)
    nested = blocks.abs().amax(dim=1)  # (nb,)
    recip = torch.where(nested > 0, 1.0 / nested, torch.zeros_like(nested))  # multiply by the reciprocal, as CUDA
    x = (blocks * recip[:, None]).reshape(-1)[:n]
    # the exactly nearest code: fp32 values have exact fp64 midpoints; ties go to the lower code
    dyn = DYNAMIC.to(a.device).double()
    codes = torch.bucketize(x.double(), (dyn[1:] + dyn[:-1]) / 2)
    return codes.to(torch.uint8), nested, offset.item()


def quantize(w, quant_type="nf4", blocksize=64, double_quant=True):
    """w: float tensor, any shape -> Quantized4bit. Each block is scaled by its absmax into [-1, 1] and every value
    becomes the index of the nearest table value (kernels.quantize_4bit)."""
    assert w.is_floating_point(), f"quantize expects a float tensor, got {w.dtype}"
    assert blocksize in BLOCKSIZES, f"blocksize must be one of {BLOCKSIZES}"
    code = CODES[quant_type].to(w.device)
    packed, absmax = kernels.quantize_4bit(w.contiguous(), code, blocksize)  # [(n+1)//2] uint8, [nblocks] fp32
    nested_absmax, nested_code, offset = None, None, 0.0
    if double_quant:
        absmax, nested_absmax, offset = double_quantize(absmax)
        nested_code = DYNAMIC.to(w.device)
    return Quantized4bit(packed.view(-1, 1), absmax, code, w.shape, w.dtype, blocksize, quant_type, nested_absmax,
                         nested_code, offset)


def dequantize(q, dtype=None):
    """Quantized4bit -> tensor of q.shape: code[c] * absmax in fp32, then one cast to `dtype` (default q.dtype)."""
    return kernels.dequantize_4bit(q.packed, q.absmax, q.code, q.blocksize, q.numel, dtype or q.dtype,
                                   q.nested_absmax, q.nested_code, q.offset, q.nested_blocksize).view(q.shape)


def to_bnb(q):
    """bitsandbytes' state-dict entries for one weight (QuantState.as_dict(packed=True)): the tensors, and the
    other fields as UTF-8 JSON in a uint8 tensor named after the quant type."""
    d = {"weight": q.packed, "weight.absmax": q.absmax, "weight.quant_map": q.code}
    state = dict(quant_type=q.quant_type, blocksize=q.blocksize, dtype=str(q.dtype).removeprefix("torch."),
                 shape=list(q.shape))
    if q.nested_absmax is not None:
        d.update({"weight.nested_absmax": q.nested_absmax, "weight.nested_quant_map": q.nested_code})
        state.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.offset)
    d[f"weight.quant_state.bitsandbytes__{q.quant_type}"] = torch.tensor(list(json.dumps(state).encode()),
                                                                         dtype=torch.uint8)
    return d


BNB_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _bnb_part(parts, key, dtype, shape):
    """parts[key], checked to be a `dtype` tensor of `shape` holding no NaN or infinity (CheckpointError)."""
    t = parts[key]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{key} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, the quant state "
                              f"needs {str(dtype).removeprefix('torch.')} {list(shape)}")
    if t.is_floating_point() and not t.is_meta and not torch.isfinite(t).all():
        raise CheckpointError(f"{key} holds NaN or infinity: a quantization constant must be finite")
    return t


def from_bnb(parts, shape=None):
    """The inverse of to_bnb: a Quantized4bit from {name: tensor}, or None while a part is still missing. Every
    field is checked first against the format (and against `shape`, the weight's (out, in), when given), so a
    corrupt checkpoint is a CheckpointError naming the part, and Quantized4bit's asserts only state invariants."""
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
              (type(bs) is int and bs in BLOCKSIZES, f"blocksize {bs!r}, not one of {BLOCKSIZES}"),
              (isinstance(dtype, str) and dtype in BNB_DTYPES, f"dtype {dtype!r}, not one of {', '.join(BNB_DTYPES)}"),
              (isinstance(n, list) and n and all(type(d) is int and d > 0 for d in n),
               f"shape {n!r}, not a list of positive ints"),
              (shape is None or n == list(shape), f"shape {n!r}, the model's weight is {list(shape or ())}")]
    if dq := "nested_offset" in s:  # double quantization
        nbs, off = s.get("nested_blocksize", 256), s["nested_offset"]
        checks += [(type(nbs) is int and nbs in BLOCKSIZES, f"nested_blocksize {nbs!r}, not one of {BLOCKSIZES}"),
                   (type(off) in (int, float) and math.isfinite(off), f"nested_offset {off!r}, not a finite number"),
                   (s.get("nested_dtype", "float32") == "float32", f"nested_dtype {s.get('nested_dtype')!r}")]
    if bad := [what for ok, what in checks if not ok]:
        raise CheckpointError(f"{key}: {'; '.join(bad)}")
    if dq and not {"weight.nested_absmax", "weight.nested_quant_map"} <= parts.keys():
        return None
    numel = math.prod(n)
    nb, packed = -(-numel // bs), parts["weight"]  # bnb_4bit_quant_storage may be another dtype than uint8
    if packed.numel() * packed.element_size() != (numel + 1) // 2:
        raise CheckpointError(f"weight holds {packed.numel() * packed.element_size()} bytes, a {n} weight packs into "
                              f"{(numel + 1) // 2}")
    packed = packed.contiguous().reshape(-1).view(torch.uint8).reshape(-1, 1)
    absmax = _bnb_part(parts, "weight.absmax", torch.uint8 if dq else torch.float32, (nb,))
    code = _bnb_part(parts, "weight.quant_map", torch.float32, (16,))
    nested = (_bnb_part(parts, "weight.nested_absmax", torch.float32, (-(-nb // nbs),)),
              _bnb_part(parts, "weight.nested_quant_map", torch.float32, (256,))) if dq else (None, None)
    return Quantized4bit(packed, absmax, code, torch.Size(n), BNB_DTYPES[dtype], bs, qt, *nested,
                         float(s["nested_offset"]) if dq else 0.0, nbs if dq else 256)

# -----------------------------------------------------------------------------
# the 4-bit linear with a LoRA adapter


class Matmul4bit(torch.autograd.Function):
    """The frozen 4-bit base of the layer. W = dequant(W_4bit): (out, in); x: (..., in); g = dL/dy: (..., out).

    Forward:   y = x W^T
    Backward:  dL/dx = g W        (chain rule, dy_j/dx_k = W_jk; W is dequantized again from the 4-bit bytes)
               dL/dW: none        (frozen: so only the packed weight and its constants are saved, never W itself)
    The layer adds the adapter, y += s (x A^T) B^T with s = alpha / r, whose gradients autograd derives through
    lora_A and lora_B: dL/dB = s g^T (x A^T), dL/dA = s (g B)^T x, and dL/dx gets the extra term s (g B) A."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, nested_absmax, nested_code, meta):
        blocksize, shape, offset, nested_blocksize = meta
        ctx.meta = meta
        ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code)
        return kernels.matmul_4bit(x, packed, absmax, code, blocksize, shape, nested_absmax, nested_code, offset,
                                   nested_blocksize)

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
        blocksize, shape, offset, nested_blocksize = ctx.meta
        grad_x = None
        if ctx.needs_input_grad[0]:  # (..., out) @ (out, in) -> (..., in)
            grad_x = kernels.matmul_4bit(grad_y, packed, absmax, code, blocksize, shape, nested_absmax, nested_code,
                                         offset, nested_blocksize, transpose=True)
        return grad_x, None, None, None, None, None, None


def _frozen(t):
    """The frozen base's tensors (packed bytes, absmax, code tables, or the 16-bit baseline's dense weight) are
    nn.Parameters with requires_grad=False, not buffers, because FSDP2 (torch.distributed.fsdp.fully_shard, train.py
    --fsdp) shards parameters only: as frozen parameters they are split along dim 0 across ranks, all-gathered whole
    (FSDP2 gathers a block's mixed uint8 / fp32 parameters as bytes) just before the block's forward and the
    checkpointed recompute, and never reduce-scattered, as they have no gradient. The forward only ever sees the
    gathered, whole tensors, so dequantization is unchanged. The alternative, one flat byte buffer per module
    registered as a parameter, would hide bitsandbytes' names and shapes behind views for nothing in return."""
    return None if t is None else nn.Parameter(t, requires_grad=False)


class LoRALinear4bit(nn.Module):
    """y = x W^T + (alpha / r) * B A dropout(x), with W frozen in 4 bits and A: (r, in), B: (out, r) trainable.

    W lives in frozen parameters (requires_grad=False: no optimizer or clipping sees them; _frozen says why not
    buffers) under bitsandbytes' names: the state dict holds `weight` (packed), `weight.absmax`, `weight.quant_map`,
    ... exactly as transformers saves a Linear4bit, and `lora_A.weight`, `lora_B.weight` as PEFT names them. B = 0
    at init, so training starts from the base model. compute_dtype None: bf16 on CUDA, fp32 elsewhere. quant_type
    "none" is the paper's 16-bit LoRA baseline: `weight` stays the dense (out, in) frozen weight in the model's dtype,
    multiplied by F.linear."""

    def __init__(self, in_features, out_features, r=64, alpha=16, dropout=0.1, quant_type="nf4", blocksize=64,
                 double_quant=True, compute_dtype=None, device=None, lora_device=None):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        # placeholders with bitsandbytes' shapes (on the meta device: no memory), filled by quantize_ or a checkpoint
        n, q = in_features * out_features, quant_type != "none"
        nb, dq = -(-n // blocksize), q and double_quant
        self.weight = _frozen(torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device) if q else
                              torch.empty(out_features, in_features, device=device))
        self.absmax = _frozen(torch.empty(nb, dtype=torch.uint8 if dq else torch.float32, device=device) if q else None)
        self.quant_map = _frozen(torch.empty(16, device=device) if q else None)
        self.nested_absmax = _frozen(torch.empty(-(-nb // 256), device=device) if dq else None)
        self.nested_quant_map = _frozen(torch.empty(256, device=device) if dq else None)
        self.offset, self.nested_blocksize, self.weight_dtype = 0.0, 256, torch.float32
        self._parts = {}  # bitsandbytes pieces of a pre-quantized checkpoint, until all have arrived
        self.set_lora(r, alpha, dropout, device=lora_device or device)

    def set_lora(self, r, alpha, dropout, device=None, dtype=torch.float32):
        """A fresh adapter: A Kaiming-uniform (PEFT's init, a = sqrt(5)), B zero; r = 0 removes it."""
        self.r, self.alpha, self.scale = r, alpha, alpha / r if r else 0.0
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype) if r else None
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype) if r else None
        if r:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def set_quantized(self, q):
        assert q.shape == (self.out_features, self.in_features), f"weight {list(q.shape)} for a {self}"
        for name, t in (("weight", q.packed), ("absmax", q.absmax), ("quant_map", q.code),
                        ("nested_absmax", q.nested_absmax), ("nested_quant_map", q.nested_code)):
            self._store(name, t)
        self.quant_type, self.blocksize, self.double_quant = q.quant_type, q.blocksize, q.nested_absmax is not None
        self.offset, self.nested_blocksize, self.weight_dtype = q.offset, q.nested_blocksize, q.dtype

    def _store(self, name, t):
        """Keep t as the frozen parameter `name`. One that FSDP sharded before the weights arrived (train.py --fsdp
        with a checkpoint: a DTensor, known by its device_mesh) keeps only this rank's rows of t: every rank
        quantizes the same whole tensor as it streams in, and each keeps its own part."""
        old = getattr(self, name)
        if t is None or not hasattr(old, "device_mesh"):
            setattr(self, name, _frozen(t))
            return
        from torch.distributed.tensor import distribute_tensor  # only under FSDP: torch.distributed is optional
        assert old.shape == t.shape and old.dtype == t.dtype, f"{name}: {t.dtype} {list(t.shape)} for {old.dtype} " \
            f"{list(old.shape)}"
        with torch.no_grad():  # src_data_rank=None: every rank has t, so each cuts its rows without communication
            old.to_local().copy_(distribute_tensor(t.to(old.device), old.device_mesh, old.placements,
                                                   src_data_rank=None).to_local())

    def quantize_(self, w):
        """Quantize a (out, in) float weight into this module's frozen parameters (quant_type "none": keep it)."""
        if self.quant_type == "none":
            assert w.shape == (self.out_features, self.in_features), f"weight {list(w.shape)} for a {self}"
            self._store("weight", w.detach().clone())  # own it: w may view a mapped file
            self.weight_dtype = w.dtype
            return
        self.set_quantized(quantize(w, self.quant_type, self.blocksize, self.double_quant))

    def quantized(self):
        return Quantized4bit(self.weight, self.absmax, self.quant_map, (self.out_features, self.in_features),
                             self.weight_dtype, self.blocksize, self.quant_type, self.nested_absmax,
                             self.nested_quant_map, self.offset, self.nested_blocksize)

    def load_part(self, key, t):
        """Take one bitsandbytes piece (`weight`, `weight.absmax`, ...); quantized once all have arrived."""
        self._parts[key] = t
        if (q := from_bnb(self._parts, (self.out_features, self.in_features))) is not None:
            self.set_quantized(q)
            self._parts = {}

    def delta(self):
        """The adapter as a weight update: (alpha / r) B @ A, (out, in) in fp32."""
        return self.scale * self.lora_B.weight.float() @ self.lora_A.weight.float()

    def forward(self, x):  # x: (..., in) -> (..., out)
        cdt = self.compute_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
        if self.quant_type == "none":  # the 16-bit baseline: a plain matmul with the frozen dense weight
            y = nn.functional.linear(x.to(cdt), self.weight.to(cdt))
        else:
            q = self.quantized()
            y = Matmul4bit.apply(x.to(cdt), q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code,
                                 (q.blocksize, q.shape, q.offset, q.nested_blocksize))
        if self.r:  # the adapter sees the input in its own dtype (fp32 by default), as PEFT does
            a = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
            y = y + (self.lora_B(a) * self.scale).to(cdt)
        return y.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.quant_type == "none":  # a plain `weight`, as nn.Linear saves it
            destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
            return
        destination.update({prefix + k: v if keep_vars else v.detach()  # lora_*: submodules
                            for k, v in to_bnb(self.quantized()).items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        ours = {k[len(prefix):]: v for k, v in state_dict.items()
                if k.startswith(prefix) and not k[len(prefix):].startswith(("lora_A.", "lora_B."))}
        if "weight" in ours and ours["weight"].shape == (self.out_features, self.in_features):  # 16/32-bit
            return self.quantize_(ours["weight"].to(self.weight.device))
        q = from_bnb({k: v.to(self.weight.device) for k, v in ours.items()}, (self.out_features, self.in_features))
        if q is None:
            missing.extend(prefix + k for k in ("weight", "weight.absmax", "weight.quant_map") if k not in ours)
        else:
            self.set_quantized(q)
            unexpected.extend(prefix + k for k in ours if k not in to_bnb(q))

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, {self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, r={self.r}, alpha={self.alpha}")

# -----------------------------------------------------------------------------
# swapping a model's linears, and quantizing a checkpoint as it streams in

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a block's linears


def add_lora(model, targets=LINEARS, r=64, alpha=16, dropout=0.1, quant_type="nf4", blocksize=64, double_quant=True,
             compute_dtype=None, lora_device=None):
    """Swap, in place, every linear of the blocks (the paper quantizes them all; the embeddings, norms and output
    head stay unquantized) for a LoRALinear4bit, with an adapter on those named in `targets` (default or "all":
    every one, as the paper; or e.g. "q_proj,v_proj"), and freeze everything else. A linear with weights is
    quantized now; on the meta device the frozen parameters wait for the loader (quantize_hook)."""
    if isinstance(targets, str):
        targets = LINEARS if targets == "all" else tuple(targets.split(","))
    assert set(targets) <= set(LINEARS), f"targets {targets} must be among {LINEARS}"
    for p in model.parameters():
        p.requires_grad_(False)  # only the adapters train
    for parent in list(model.modules()):
        for name, lin in list(parent.named_children()):
            if not (isinstance(lin, nn.Linear) and name in LINEARS):
                continue
            assert lin.bias is None, "LLaMA's linears have no bias"
            dev = lin.weight.device
            m = LoRALinear4bit(lin.in_features, lin.out_features, r if name in targets else 0, alpha, dropout,
                               quant_type, blocksize, double_quant, compute_dtype, dev, lora_device or dev)
            if not lin.weight.is_meta:
                m.quantize_(lin.weight.detach())
            setattr(parent, name, m)
    return model


def is_bnb_4bit(path):
    """The quantization_config of a bitsandbytes 4-bit checkpoint directory, else None."""
    cfg = Path(path) / "config.json"
    c = parse_json(cfg) if cfg.exists() else {}
    qc = c.get("quantization_config") if isinstance(c, dict) else None  # a config that is no object: load_args says so
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{cfg}: quantization_config must be an object, not {repr(qc)[:40]}")
    return qc if qc and qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit") else None


def linears_4bit(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)}


BNB_PARTS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
             ".quant_state.bitsandbytes__fp4")  # suffixes of `weight` in a bitsandbytes checkpoint


def quantize_hook(model, device="cpu", dtype=torch.float32):
    """A model.load_weights hook: each 16/32-bit weight of a 4-bit module is quantized the moment it is read (on
    `device`, after a cast to `dtype`) and dropped, so at most one unquantized linear weight exists at a time; the
    pieces of a pre-quantized bitsandbytes checkpoint are stored as they are. Other tensors pass through."""
    mods = linears_4bit(model)

    def hook(name, t):
        mod, _, rest = name.partition(".weight")  # "...q_proj.weight.absmax" -> ("...q_proj", ".absmax")
        if mod not in mods:
            return t
        shape = (mods[mod].out_features, mods[mod].in_features)
        if rest == "" and t.shape == shape:  # not packed 4-bit
            mods[mod].quantize_(t.to(device=device, dtype=dtype))
        elif rest == "" and t.dim() == 2 and t.shape[1] != 1:  # packed bytes are (n, 1)
            raise CheckpointError(f"tensor {name!r} has shape {list(t.shape)}, the model expects {list(shape)}")
        elif rest not in BNB_PARTS:
            raise CheckpointError(f"unknown key {name!r} (not a part of a bitsandbytes 4-bit weight)")
        else:
            try:
                mods[mod].load_part("weight" + rest, t.to(device, copy=True))
            except CheckpointError as e:  # from_bnb names the part: "weight.absmax ..."
                raise CheckpointError(f"{mod}.{e}") from None
        return None  # stored: the loader checks nothing more (from_bnb checked every part)
    return hook


def load_quantized(path, device="cpu", dtype=torch.float32, **kw):
    """Load a Hugging Face / Meta checkpoint with its linears in 4 bits, quantized as they stream in (gpt-fast's
    way: build on the meta device, swap the modules, fill), or a pre-quantized bitsandbytes one (`*-bnb-4bit`).
    kw: add_lora's settings (r, alpha, dropout, ...)."""
    if qc := is_bnb_4bit(path):  # a pre-quantized checkpoint: its type wins (each weight's quant state is read)
        qt, dq = qc.get("bnb_4bit_quant_type", "fp4"), qc.get("bnb_4bit_use_double_quant", False)
        if qt not in ("nf4", "fp4") or not isinstance(dq, bool):
            raise CheckpointError(f"{Path(path) / 'config.json'}: quantization_config has bnb_4bit_quant_type {qt!r} "
                                  f"(nf4 or fp4) and bnb_4bit_use_double_quant {dq!r} (true or false)")
        kw.update(quant_type=qt, double_quant=dq)
    with torch.device("meta"):
        model = Transformer(load_args(path))
    add_lora(model, lora_device=device, **kw)
    return load_weights(model, path, quantize_hook(model, device, dtype), device, dtype)

# -----------------------------------------------------------------------------
# files: the quantized base (bitsandbytes / HF), adapters (PEFT), a merged 16-bit model (HF)


def hf_config(args, dtype, **extra):
    """A transformers LlamaForCausalLM config.json for model.py's ModelArgs."""
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.dim,
                intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings,
                hidden_act="silu", bos_token_id=1, eos_token_id=2, dtype=str(dtype).removeprefix("torch."), **extra)


def _write_model(model, out_dir, tensors, config):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.args.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the head is the embedding
    save_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))


def save_quantized(model, out_dir, tokenizer=None):
    """The quantized base as transformers + bitsandbytes save it (model.safetensors with bitsandbytes' keys,
    quantization_config in config.json), loadable by from_pretrained and by load_quantized; `tokenizer`: a
    tokenizer.model to copy beside it. No adapters (save_adapter). quant_type "none" or "int4" (which bitsandbytes
    does not know): a plain 16/32-bit checkpoint of the weights the adapters see (int4's dequantized)."""
    mods = linears_4bit(model)
    m = next(iter(mods.values()))
    dtype = model.model.norm.weight.dtype
    plain = m.quant_type not in ("nf4", "fp4")  # none, or int4 (no bitsandbytes format): without its ".weight.*"
    tensors = {k: v for k, v in model.state_dict().items() if ".lora_" not in k and not (plain and ".weight." in k)}
    if plain:
        qc = {}
        for n, mod in mods.items() if m.quant_type == "int4" else ():  # the weights the adapters trained against
            tensors[n + ".weight"] = dequantize(mod.quantized(), dtype)
    else:
        q = m.quantized()
        qc = dict(quantization_config=dict(
            quant_method="bitsandbytes", load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.nested_absmax is not None, bnb_4bit_quant_storage="uint8",
            bnb_4bit_compute_dtype=str(dtype).removeprefix("torch.")))
    _write_model(model, out_dir, tensors, hf_config(model.args, dtype, **qc))
    if tokenizer is not None:
        shutil.copy(tokenizer, Path(out_dir) / "tokenizer.model")


def save_adapter(model, out_dir, base_model_name_or_path=None, write=True):
    """adapter_model.safetensors + adapter_config.json, as PEFT writes them (PeftModel.from_pretrained loads it).
    Under FSDP each LoRA weight is all-gathered whole from the ranks' shards, a collective: every rank calls this,
    and only the one with write=True writes."""
    mods = {n: m for n, m in linears_4bit(model).items() if m.r}
    settings = {(m.r, m.alpha, m.dropout.p) for m in mods.values()}
    assert len(settings) == 1, f"PEFT's format wants one (r, alpha, dropout) for all modules, got {settings}"
    r, alpha, p = settings.pop()
    tensors = {f"base_model.model.{n}.lora_{ab}.weight": whole(getattr(m, f"lora_{ab}").weight.detach())
               for n, m in mods.items() for ab in "AB"}
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


def whole(t):
    """The whole tensor: a DTensor (FSDP-sharded, known by its full_tensor) is all-gathered, anything else is as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
        targets = list(LINEARS)
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise CheckpointError(f"{file}: target_modules {targets!r} is not a valid regex ({e})") from None
    hit = (lambda n: pattern.fullmatch(n) is not None) if isinstance(targets, str) else \
        (lambda n: any(n == t or n.endswith("." + t) for t in targets))
    mods = linears_4bit(model)
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
    mods = linears_4bit(model)
    dtype = model.model.norm.weight.dtype
    tensors = {k: v for k, v in model.state_dict().items() if k.rsplit(".weight", 1)[0] not in mods
               and ".lora_" not in k}
    originals = {} if original is None else {name: t for name, t, _ in stream_tensors(original)
                                             if name.rsplit(".weight", 1)[0] in mods}  # memory-mapped, not read
    for n, m in mods.items():  # merge in fp32, one cast to the model's dtype, one weight at a time
        w = originals[n + ".weight"].float() if originals else m.weight.float() if m.quant_type == "none" else \
            dequantize(m.quantized(), torch.float32)
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

# -----------------------------------------------------------------------------
# memory account


def local_bytes(t):
    """Bytes this process stores of t: under FSDP (a DTensor, known by its to_local) only its own shard."""
    return t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes


def memory_account(model):
    """Bytes of a model by kind: the 4-bit codes, their per-block constants (absmax, nested absmax), per-tensor
    tables (the code maps, offset), unquantized parameters (embeddings, norms, head), LoRA parameters, and other
    buffers (rope), as this process stores them (its shards, under FSDP). Bits per quantized parameter count codes
    + per-block constants of the whole tensors, as the paper does: 4 + 32/64 = 4.5, or with double quantization
    4 + 8/64 + 32/(64*256) = 4.127."""
    a = dict(quantized_bytes=0, constant_bytes=0, table_bytes=0, unquantized_bytes=0, lora_bytes=0, buffer_bytes=0)
    mods, n, bits = linears_4bit(model), 0, 0
    for m in mods.values():
        if m.quant_type == "none":  # the 16-bit baseline's dense weight
            a["unquantized_bytes"] += local_bytes(m.weight)
            continue
        q = m.quantized()
        b, whole = q.nbytes(local_bytes), q.nbytes()
        a["quantized_bytes"] += b["weight"]
        a["constant_bytes"] += b["constants"]
        a["table_bytes"] += b["tables"]
        bits += 8 * (whole["weight"] + whole["constants"])
        n += m.in_features * m.out_features
    for name, p in model.named_parameters():  # tied weights are counted once
        if name.rsplit(".", 1)[0] not in mods:  # the frozen base's own parameters are counted above
            a["lora_bytes" if ".lora_" in name else "unquantized_bytes"] += local_bytes(p)
    a["buffer_bytes"] = sum(b.nbytes for k, b in model.named_buffers() if k.rsplit(".", 1)[0] not in mods)
    a["total_bytes"] = sum(a.values())
    a["n_quantized"], a["bits_per_param"] = n, bits / max(n, 1)
    return a
