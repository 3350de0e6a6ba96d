"""
4-bit (NF4 / FP4 / any 16-value code) kernels: quantize, dequantize and a fused 4-bit matmul.

A quantized tensor travels whole, as one QuantState in bitsandbytes' layout bit for bit, so outputs
are bit-identical to bitsandbytes'. Each Triton kernel sits beside a pure-torch reference with the
same signature, and a dispatch picks Triton for CUDA tensors, the reference for the rest. Kernels
follow the Triton tutorials: pointer arguments commented and grouped, host wrappers that check,
allocate and launch. The tests run every kernel under TRITON_INTERPRET=1 on CPU against its
reference. This file imports only torch, triton and the stdlib: copy it into another project as is.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (macOS, Windows): the references work, CUDA tensors raise
    triton = None

# The fused kernel serves matmuls of at most this many rows of x (tokens), per direction (the
# forward x @ W.T and the backward grad_y @ W have different grids, so different crossovers); above
# it, dequantize + cuBLAS. PROVISIONAL: no GPU has measured them; set them from bench.py's
# crossovers (its dequant section sweeps both directions through this global).
FUSED_MAX_TOKENS = {"forward": 16, "backward": 16}
# The fused backward splits its reduction over N (see matmul_4bit_triton) into chunks of a multiple
# of this many rows of W (a multiple of every BLOCK_N), until the grid has about _BWD_PROGRAMS.
_BWD_CHUNK_ROWS = 256
_BWD_PROGRAMS = 512  # a few per SM (108 SMs on an A100, 132 on an H100/H200): PROVISIONAL, untuned


@dataclass
class QuantState:
    """One 4-bit tensor in bitsandbytes' layout. Blocks of `blocksize` run over the flattened
    tensor, element 2k in the HIGH nibble of byte k; each block has a scale absmax: fp32, or with
    double quantization an 8-bit code into `nested_code` (the dynamic map), so that
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
        assert self.blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096), f"{self.blocksize}"
        assert self.packed.dtype == torch.uint8 and self.packed.numel() == (n + 1) // 2, \
            "packed: uint8 [(n+1)//2]"
        assert self.code.shape == (16,) and self.code.dtype == torch.float32, "code: fp32 [16]"
        assert self.absmax.shape == (nb,), \
            f"absmax: [{nb}] for {list(self.shape)} in blocks of {self.blocksize}"
        if self.nested_absmax is None:
            assert self.absmax.dtype == torch.float32, "absmax: fp32 without double quantization"
        else:  # a model.to(bfloat16) would round these: move quantized modules by .to(device) only
            assert self.absmax.dtype == torch.uint8 and self.nested_code.shape == (256,)
            assert self.nested_blocksize & (self.nested_blocksize - 1) == 0, "a power of 2"
            assert self.nested_absmax.shape == (-(-nb // self.nested_blocksize),)
            assert self.nested_absmax.dtype == self.nested_code.dtype == torch.float32

    @property
    def numel(self):
        return math.prod(self.shape)


# -----------------------------------------------------------------------------
# torch references (CPU, and the ground truth the Triton kernels are tested against)


def _absmax_ref(q):
    """fp32 absmax [nblocks]; with DQ nested_code[absmax[i]] * nested_absmax[i // 256] + offset."""
    if q.nested_absmax is None:
        return q.absmax.float()
    scale = q.nested_absmax.float().repeat_interleave(q.nested_blocksize)[: q.absmax.numel()]
    a = q.nested_code.float()[q.absmax.long()] * scale  # fp32 multiply, then a separate fp32 add
    return a + torch.tensor(q.offset, dtype=torch.float32, device=a.device)  # (as bitsandbytes)


def dequantize_4bit_ref(q, dtype=None):
    """The QuantState q as a tensor of q.shape in `dtype` (default q.dtype): each value is
    code[c] * absmax[block] in fp32, then one cast."""
    a = _absmax_ref(q)
    # one lookup per byte: row b of the (256, 2) table is (code[b >> 4], code[b & 15]), high nibble
    # first; read as one 8-byte word per row, a 1-D index_select (~4x a row gather on CPU)
    pairs = torch.cartesian_prod(q.code.float(), q.code.float()).view(torch.int64).reshape(-1)
    vals = pairs.index_select(0, q.packed.reshape(-1).int()).view(torch.float32)  # (2 * nbytes,)
    # the block scale broadcast in place (no second buffer); a partial last block is the tail
    bs = q.blocksize
    nfull = vals.numel() // bs
    vals[: nfull * bs].view(nfull, bs).mul_(a[:nfull, None])
    if nfull < a.numel():
        vals[nfull * bs:].mul_(a[nfull])
    return vals[: q.numel].to(dtype or q.dtype).view(q.shape)


def _search_table(code):
    """The 16 table values sorted, as (midpoints fp32 [15], order [16]): a value's code is
    order[#midpoints < it]. FP4's table is not monotonic in the code, hence the sort; stable=True
    puts FP4's +0 (code 0) before its -0 (code 8), so a zero always gets the same code."""
    values, order = code.float().sort(stable=True)
    # (narrow, not [1:]: bench/compile.py runs this on fake CUDA tensors a CPU torch cannot slice)
    return (values.narrow(0, 1, 15) + values.narrow(0, 0, 15)) / 2, order


def quantize_4bit_ref(x, code, blocksize):
    """x: any float tensor. Returns (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)]).
    Each value becomes the code whose table value is nearest to x / absmax; ties go to the lower
    value (a value counts the midpoints it is strictly greater than), exactly as bitsandbytes."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = (n + blocksize - 1) // blocksize
    blocks = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # times the fp32 reciprocal (not a divide), as bitsandbytes. An all-zero block scales to 0 and
    # stores absmax 0 with 0.0's code (0x77 bytes for NF4, as bitsandbytes' CPU path; CUDA: 0x00)
    recip = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (blocks * recip[:, None]).reshape(-1)[: n + (n % 2)]  # an odd tail: one 0.0 pads it
    mids, order = _search_table(code)
    c = order[torch.bucketize(scaled, mids, right=False)].to(torch.uint8)  # count of mids < x
    packed = (c[0::2] << 4) | c[1::2]
    return packed, absmax


def matmul_4bit_ref(x, q, transpose=False):
    """W = q, of shape (N, K), dequantized to x.dtype. transpose=False: x [..., K] -> x @ W.T
    [..., N] (the forward); transpose=True: x [..., N] -> x @ W [..., K] (grad_x = grad_y @ W)."""
    assert len(q.shape) == 2, f"W must be 2-D, not {tuple(q.shape)}"
    W = dequantize_4bit_ref(q, x.dtype)
    return x @ W if transpose else x @ W.T


# -----------------------------------------------------------------------------
# Triton kernels and their host wrappers (defined only where triton is importable)

if triton is not None:

    @triton.jit
    def _load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, blk, mask,
                     NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
        """fp32 absmax of quantization blocks `blk` (any shape). With DQ: nested_code[q] *
        nested_absmax[blk // 256], rounded, THEN + offset, rounded: launches pass
        enable_fp_fusion=False so no FMA contracts the two (one rounding, other bits)."""
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + blk, mask=mask, other=0)  # uint8 code into the 256-value map
            scale = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
            a = tl.load(nested_code_ptr + q) * scale + offset
        else:
            a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return a

    @triton.jit
    def _cast(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
        """fp32 -> dtype, rounding to nearest even (the GPU's cvt.rn). Triton 3.9's CPU interpreter
        (the tests) truncates fp32 -> bf16 instead: there bf16 is rounded on the bits, as torch."""
        if INTERPRETER and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # half to even on the 16 dropped bits
            y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)  # (no NaN: table x absmax)
        else:
            y = x.to(dtype)
        return y

    @triton.jit
    def _dequantize_4bit_kernel(
        packed_ptr,         # *uint8 [(numel+1)//2]: two codes a byte, element 2k in the HIGH nibble
        absmax_ptr,         # *fp32 [nblocks] scales, or with DQ *uint8 codes into nested_code
        code_ptr,           # *fp32 [16]: the 4-bit table (NF4, FP4, ...)
        nested_absmax_ptr,  # *fp32 [ceil(nblocks / NESTED_BLOCKSIZE)] (DQ only)
        nested_code_ptr,    # *fp32 [256]: the 8-bit dynamic map (DQ only)
        out_ptr,            # *bf16/fp16/fp32 [numel]
        offset,             # fp32: the mean added back to the double-quantized absmax (DQ only)
        numel, nbytes, nblocks,  # (nbytes passed: a multiple of 16 lets Triton vectorize the loads)
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        ROWS: tl.constexpr,  # quantization blocks per program: a [ROWS, BLOCKSIZE // 2] byte tile
        INTERPRETER: tl.constexpr,  # running in Triton's CPU interpreter (the tests): see _cast
    ):
        # ---- one absmax per block (row of the tile), loaded once, broadcast over its elements
        HALF: tl.constexpr = BLOCKSIZE // 2
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        a = _load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows,
                         rows < nblocks, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        # ---- contiguous bytes -> two codes each -> table values (the 16-entry table stays in L1)
        byte_idx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        b = tl.load(packed_ptr + byte_idx, mask=byte_idx < nbytes, other=0)
        hi = tl.load(code_ptr + (b >> 4))
        lo = tl.load(code_ptr + (b & 0xF))
        # ---- interleave to element order (2k, 2k+1), scale in fp32, one cast, masked store
        w = tl.interleave(hi, lo) * a[:, None]  # [ROWS, BLOCKSIZE]
        elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + elem, _cast(w, out_ptr.dtype.element_ty, INTERPRETER), mask=elem < numel)

    @triton.jit
    def _quantize_4bit_kernel(
        x_ptr,       # *bf16/fp16/fp32 [numel]: the tensor to quantize, flattened
        mids_ptr,    # *fp32 [15]: midpoints between the sorted table values
        order_ptr,   # *int32 [16]: the code of each sorted table value
        packed_ptr,  # *uint8 [(numel+1)//2] output
        absmax_ptr,  # *fp32 [nblocks] output
        numel, nbytes, nblocks,  # (nbytes passed: a multiple of 16 lets Triton vectorize stores)
        BLOCKSIZE: tl.constexpr,
        ROWS: tl.constexpr,  # quantization blocks per program: a [ROWS, BLOCKSIZE] tile of elements
    ):
        # ---- load a tile of blocks in fp32; the masked tail reads 0.0, never raising an absmax
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        x = tl.load(x_ptr + elem, mask=elem < numel, other=0.0).to(tl.float32)
        # ---- blockwise absmax; x * (1 / absmax) with a correctly rounded reciprocal (div_rn, not
        # the fast approximate divide) as bitsandbytes and the reference; a zero block scales by 0
        absmax = tl.max(tl.abs(x), axis=1)
        nonzero = absmax > 0
        recip = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.where(nonzero, absmax, 1.0))
        x = x * tl.where(nonzero, recip, 0.0)[:, None]
        # ---- code = order[number of midpoints strictly below x]: ties go to the lower value
        idx = tl.zeros([ROWS, BLOCKSIZE], dtype=tl.int32)
        for i in tl.static_range(15):
            idx += (x > tl.load(mids_ptr + i)).to(tl.int32)
        c = tl.load(order_ptr + idx)
        # ---- pack (2k, 2k+1) into one byte, 2k in the high nibble; an odd tail pads with 0.0's
        hi, lo = tl.split(tl.reshape(c, [ROWS, BLOCKSIZE // 2, 2]))
        byte_idx = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        tl.store(packed_ptr + byte_idx, ((hi << 4) | lo).to(tl.uint8), mask=byte_idx < nbytes)
        tl.store(absmax_ptr + rows, absmax, mask=rows < nblocks)

    @triton.jit
    def _dequantize_bytes(byte_idx, mask, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                          nested_code_ptr, offset, BLOCKSIZE: tl.constexpr,
                          NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
        """The fp32 weights (even element, odd element) of each packed byte at `byte_idx` (any
        shape). A byte's two elements share one quantization block (blocksize is even)."""
        b = tl.load(packed_ptr + byte_idx, mask=mask, other=0)
        a = _load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                         byte_idx // (BLOCKSIZE // 2), mask, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        a = tl.where(mask, a, 0.0)  # masked bytes must give exact zeros (with DQ: `offset`, not 0)
        return tl.load(code_ptr + (b >> 4)) * a, tl.load(code_ptr + (b & 0xF)) * a

    @triton.jit
    def _dot(x, w, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
        """acc + x @ w, the fp32 weight tile w first rounded to x's dtype (as the reference's W)."""
        w = _cast(w, x.dtype, INTERPRETER)
        if INTERPRETER:  # its tl.dot multiplies bf16 tiles as their raw uint16 bits: give it the
            x, w = x.to(tl.float32), w.to(tl.float32)  # same values in fp32 (exact products)
        return tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _matmul_4bit_kernel(
        x_ptr,              # *bf16/fp16/fp32 [M, K] forward (x), [M, N] backward (grad_y)
        packed_ptr,         # *uint8 [N * K // 2]: W (N, K) row-major in the 4-bit layout, K even
        absmax_ptr,         # *fp32 or *uint8 (DQ) [nblocks]
        code_ptr,           # *fp32 [16]
        nested_absmax_ptr,  # *fp32 (DQ only)
        nested_code_ptr,    # *fp32 [256] (DQ only)
        out_ptr,            # *x.dtype [M, N] forward; backward [splits, M, K] (fp32 if splits > 1)
        offset,             # fp32 (DQ only)
        M, N, K,
        n_chunk,            # backward: rows of W (of N) a program reduces over; BLOCK_N divides it
        stride_xm, stride_os, stride_om,  # (x's last dim has unit stride); os: between partial sums
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        TRANSPOSE: tl.constexpr,      # False: y = x @ W.T (forward); True: y = x @ W (backward)
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 like torch's default, "tf32" where allowed
        INTERPRETER: tl.constexpr,    # running in Triton's CPU interpreter (the tests): see _dot
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # rows of x, rows of W per tile
        BLOCK_KB: tl.constexpr,       # packed bytes of a W row per tile (2 * BLOCK_KB columns of W)
    ):
        """The packed bytes form a matrix B (N, K/2): its high nibbles hold W_even = W[:, 0::2], its
        low nibbles W_odd = W[:, 1::2]. Each tile of B is dequantized once into both, and
            forward:  y = x @ W.T = x[:, 0::2] @ W_even.T + x[:, 1::2] @ W_odd.T
            backward: y = g @ W,   y[:, 0::2] = g @ W_even,  y[:, 1::2] = g @ W_odd
        so the bytes load contiguously and W is never interleaved, only x or y is. The backward
        sums over N = sum over chunks s of g[:, chunk s] @ W[chunk s, :]: program (i, j, s) writes
        its chunk's partial sum, and the host adds them in a fixed order (unlike atomics)."""
        KB = K // 2
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        if not TRANSPOSE:
            # ---- forward: a [BLOCK_M, BLOCK_N] tile of y, reducing over K a byte tile at a time
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for kb0 in range(0, KB, BLOCK_KB):
                # x tile [BLOCK_M, 2 * BLOCK_KB], loaded contiguously, split into even/odd columns
                k = 2 * kb0 + tl.arange(0, 2 * BLOCK_KB)
                x_mask = (offs_m[:, None] < M) & (k[None, :] < K)
                x_ptrs = x_ptr + offs_m[:, None] * stride_xm + k[None, :]
                x = tl.load(x_ptrs, mask=x_mask, other=0.0)
                x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_KB, 2]))
                # W_even.T and W_odd.T tiles [BLOCK_KB, BLOCK_N] from one tile of B
                kb = kb0 + tl.arange(0, BLOCK_KB)
                w_mask = (kb[:, None] < KB) & (offs_n[None, :] < N)
                w_even, w_odd = _dequantize_bytes(
                    offs_n[None, :] * KB + kb[:, None], w_mask, packed_ptr, absmax_ptr, code_ptr,
                    nested_absmax_ptr, nested_code_ptr, offset,
                    BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
                acc = _dot(x_even, w_even, acc, DOT_PRECISION, INTERPRETER)
                acc = _dot(x_odd, w_odd, acc, DOT_PRECISION, INTERPRETER)
            offs_out = offs_n
        else:
            # ---- backward: a [BLOCK_M, 2 * BLOCK_KB] tile of y, reducing over one chunk of N
            kb = tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)
            acc_even = tl.zeros([BLOCK_M, BLOCK_KB], dtype=tl.float32)
            acc_odd = tl.zeros([BLOCK_M, BLOCK_KB], dtype=tl.float32)
            n_lo = tl.program_id(2) * n_chunk
            for n0 in range(n_lo, tl.minimum(n_lo + n_chunk, N), BLOCK_N):  # (never past the chunk)
                n = n0 + tl.arange(0, BLOCK_N)
                g_mask = (offs_m[:, None] < M) & (n[None, :] < N)
                g_ptrs = x_ptr + offs_m[:, None] * stride_xm + n[None, :]
                g = tl.load(g_ptrs, mask=g_mask, other=0.0)
                # W_even and W_odd tiles [BLOCK_N, BLOCK_KB] from one tile of B
                w_mask = (n[:, None] < N) & (kb[None, :] < KB)
                w_even, w_odd = _dequantize_bytes(
                    n[:, None] * KB + kb[None, :], w_mask, packed_ptr, absmax_ptr, code_ptr,
                    nested_absmax_ptr, nested_code_ptr, offset,
                    BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
                acc_even = _dot(g, w_even, acc_even, DOT_PRECISION, INTERPRETER)
                acc_odd = _dot(g, w_odd, acc_odd, DOT_PRECISION, INTERPRETER)
            acc = tl.interleave(acc_even, acc_odd)  # columns 2kb, 2kb + 1: [BLOCK_M, 2 * BLOCK_KB]
            offs_out = 2 * tl.program_id(1) * BLOCK_KB + tl.arange(0, 2 * BLOCK_KB)
        # ---- one cast of the fp32 accumulator, masked store
        out_mask = (offs_m[:, None] < M) & (offs_out[None, :] < (K if TRANSPOSE else N))
        out_ptrs = (out_ptr + tl.program_id(2) * stride_os + offs_m[:, None] * stride_om
                    + offs_out[None, :])
        tl.store(out_ptrs, _cast(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=out_mask)

    # The tiles bench/compile.py compiled for sm_80 and sm_90 without a spill and within shared
    # memory (see bench/RESULTS.md). Which is fastest is PROVISIONAL: no GPU has timed them yet.
    _matmul_4bit_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_KB": bkb}, num_warps=w, num_stages=st)
                 for bn, bkb, w, st in [(16, 64, 8, 3), (16, 128, 8, 3), (32, 32, 8, 3),
                                        (16, 128, 4, 2)]],
        key=["BLOCK_M", "N", "K", "TRANSPOSE", "DOUBLE_QUANT"],
    )(_matmul_4bit_kernel)

    assert all(_BWD_CHUNK_ROWS % c.kwargs["BLOCK_N"] == 0 for c in _matmul_4bit_tuned.configs)
    # the tile the interpreter runs (tests/test_kernels.py also runs each config of the list above)
    _INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_KB": 16}, num_warps=4)
    _OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

    def _on_device(t):
        """Triton launches on the current CUDA device, whatever device the tensors are on: with
        GPU 0 current it would run GPU 1's pointers on GPU 0. Every launch here runs inside this,
        which makes the tensors' device current (a no-op when it is; nothing for CPU tensors)."""
        return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

    def _check_state(q):
        """Before q's pointers are used: contiguous, on one device, indexable in int32 (its shapes
        and dtypes are QuantState's invariants, asserted when it was built)."""
        tensors = [t for t in (q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code)
                   if t is not None]
        assert all(t.is_contiguous() for t in tensors), "the state's tensors must be contiguous"
        assert all(t.device == q.packed.device for t in tensors), "the state must be on one device"
        assert q.numel < 2**31 - 2 * 4096, "element indices are int32"

    def _state_args(q):
        """The kernels' first five pointers; without DQ the nested two are placeholders, unread."""
        dq = q.nested_absmax is not None
        return (q.packed, q.absmax, q.code, q.nested_absmax if dq else q.absmax,
                q.nested_code if dq else q.code)

    def dequantize_4bit_triton(q, dtype=None):
        """Triton version of dequantize_4bit_ref (same arguments, bit-identical output)."""
        _check_state(q)
        dtype = dtype or q.dtype
        assert dtype in _OUT_DTYPES, f"dtype {dtype}"
        out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
        if q.numel == 0:
            return out
        nblocks = triton.cdiv(q.numel, q.blocksize)
        rows = max(1, 2048 // (q.blocksize // 2))  # 2048 packed bytes (4096 outputs) per program
        with _on_device(q.packed):
            _dequantize_4bit_kernel[(triton.cdiv(nblocks, rows),)](
                *_state_args(q), out, float(q.offset), q.numel, (q.numel + 1) // 2, nblocks,
                BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize, ROWS=rows,
                DOUBLE_QUANT=q.nested_absmax is not None, INTERPRETER=not q.packed.is_cuda,
                num_warps=4, enable_fp_fusion=False)  # no FMA: see _load_absmax
        return out

    def quantize_4bit_triton(x, code, blocksize):
        """Triton version of quantize_4bit_ref (same arguments, bit-identical packed bytes and
        absmax). Double quantization of the returned absmax is small and stays in torch."""
        assert x.dtype in _OUT_DTYPES and x.is_contiguous(), f"x: {x.dtype}, {x.stride()}"
        assert blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096), f"blocksize {blocksize}"
        assert code.numel() == 16 and code.device == x.device
        n = x.numel()
        assert n < 2**31 - 2 * 4096, "element indices are int32"
        nblocks = triton.cdiv(n, blocksize)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
        absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
        if n == 0:
            return packed, absmax
        mids, order = _search_table(code)  # the reference's midpoints, by the same torch ops
        rows = max(1, 4096 // blocksize)  # 4096 elements per program: 16 packed bytes per thread
        with _on_device(x):
            _quantize_4bit_kernel[(triton.cdiv(nblocks, rows),)](
                x, mids, order.to(torch.int32), packed, absmax, n, (n + 1) // 2, nblocks,
                BLOCKSIZE=blocksize, ROWS=rows, num_warps=4)
        return packed, absmax

    def matmul_4bit_triton(x, q, transpose=False):
        """Triton version of matmul_4bit_ref: W is dequantized tile by tile inside the reduction
        loop, never materialized. Equal to the reference up to fp32 summation order (and, in
        bf16/fp16, the output rounding)."""
        N, K = q.shape
        assert K % 2 == 0, "the fused kernel reads whole bytes per row of W: K must be even"
        assert x.shape[-1] == (N if transpose else K) and x.dtype in _OUT_DTYPES, \
            f"x {tuple(x.shape)} {x.dtype}"
        # fp32 tiles are twice as large: compiled for sm_80/sm_90 most configs spill, some exceed
        # shared memory (bench/compile.py), so on a GPU fp32 goes to dequantize + matmul
        assert not (x.is_cuda and x.dtype == torch.float32), "the fused kernel takes bf16/fp16"
        assert N * K < 2**32, "byte indices are int32"
        _check_state(q)
        assert x.device == q.packed.device
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        M = x2.shape[0]
        if M * (K if transpose else N) == 0:
            return x.new_empty(*x.shape[:-1], K if transpose else N)
        block_m = min(64, max(16, triton.next_power_of_2(M)))  # tl.dot needs >= 16 rows
        # The backward's grid over (M, K) alone is small (a 4096 x 4096 W, 16 tokens: 32 programs
        # of 64 bytes' columns on 132 SMs, each looping over all of N): split N into chunks,
        # programs (i, j, s), until there are about _BWD_PROGRAMS, then add the chunks' fp32
        # partial sums (an fp32 [splits, M, K] buffer, a few MB; a second pass, not atomics, so
        # the result is the same on every run).
        splits, n_chunk = 1, N
        if transpose:
            tiles = triton.cdiv(M, block_m) * triton.cdiv(K // 2, 64)
            want = min(triton.cdiv(_BWD_PROGRAMS, tiles), N // _BWD_CHUNK_ROWS)
            if want > 1:
                n_chunk = triton.cdiv(triton.cdiv(N, want), _BWD_CHUNK_ROWS) * _BWD_CHUNK_ROWS
                splits = triton.cdiv(N, n_chunk)
        # the kernel's output: y in x.dtype, or the backward's fp32 partial sums [splits, M, K]
        part = torch.empty(splits, M, K if transpose else N, device=x.device,
                           dtype=x.dtype if splits == 1 else torch.float32)
        tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        args = (x2, *_state_args(q), part, float(q.offset), M, N, K, n_chunk,
                x2.stride(0), part.stride(0), part.stride(1))
        meta = dict(BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize,
                    DOUBLE_QUANT=q.nested_absmax is not None, TRANSPOSE=transpose,
                    DOT_PRECISION="tf32" if tf32 else "ieee", INTERPRETER=not x.is_cuda,
                    BLOCK_M=block_m, enable_fp_fusion=False)  # no FMA: see _load_absmax
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(K // 2, c["BLOCK_KB"])
                          if transpose else triton.cdiv(N, c["BLOCK_N"]), splits)
        with _on_device(x):
            if x.is_cuda:
                _matmul_4bit_tuned[grid](*args, **meta)
            else:  # the interpreter (tests): one config, as autotuning would run every config there
                c = _INTERPRETER_CONFIG
                _matmul_4bit_kernel[grid](*args, **meta, **c.kwargs, num_warps=c.num_warps)
        # fp32 sum over the chunks (in order: the same bits on every run), one rounding to x.dtype
        out = part.view(M, -1) if splits == 1 else part.sum(dim=0).to(x.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])


# -----------------------------------------------------------------------------
# dispatch: what qlora.py calls. Triton for CUDA tensors, the torch reference for everything else.


def _use_triton(t):
    """True for a CUDA tensor (and then triton must be importable: no silent slow path on a GPU)."""
    if not t.is_cuda:
        return False
    if triton is None:
        raise RuntimeError("kernels.py: CUDA tensors need triton (pip install triton)")
    return True


def dequantize_4bit(q, dtype=None):
    """The QuantState q as a tensor of q.shape in `dtype`, default q.dtype (dequantize_4bit_ref)."""
    fn = dequantize_4bit_triton if _use_triton(q.packed) else dequantize_4bit_ref
    return fn(q, dtype)


def quantize_4bit(x, code, blocksize):
    """(packed uint8 [(n+1)//2], absmax fp32 [nblocks]) for x (see quantize_4bit_ref)."""
    fn = quantize_4bit_triton if _use_triton(x) else quantize_4bit_ref
    return fn(x.contiguous(), code, blocksize)


def matmul_4bit(x, q, transpose=False):
    """x @ W.T (transpose=False) or x @ W (transpose=True) for the 4-bit W = q of shape (N, K).
    On a GPU: the fused kernel for few tokens (reading 4.5 bits per weight once beats writing and
    re-reading a 16-bit W), else dequantize + cuBLAS, which wins once the matmul is compute-bound
    (see FUSED_MAX_TOKENS)."""
    if not _use_triton(x):
        return matmul_4bit_ref(x, q, transpose=transpose)
    tokens = x.numel() // max(x.shape[-1], 1)
    # fp32: see matmul_4bit_triton. Under torch.use_deterministic_algorithms (train.py
    # --deterministic) the fused kernel is skipped: its autotuner may pick another tiling after a
    # restart, and the sums would round differently
    fused = (x.dtype != torch.float32 and q.shape[1] % 2 == 0
             and not torch.are_deterministic_algorithms_enabled())
    if fused and tokens <= FUSED_MAX_TOKENS["backward" if transpose else "forward"]:
        return matmul_4bit_triton(x, q, transpose=transpose)
    W = dequantize_4bit_triton(q, x.dtype)  # (N, K)
    return x @ W if transpose else x @ W.T
