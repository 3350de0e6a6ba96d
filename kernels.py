"""
4-bit (NF4 / FP4 / any 16-value code) kernels: quantize, dequantize and a fused 4-bit matmul.

Every Triton kernel sits beside a pure-torch reference with the same signature, and one dispatch per operation
picks Triton for CUDA tensors and the reference for everything else. The storage layout is bitsandbytes' exactly
(see README: blocks over the flattened tensor, element 2k in the HIGH nibble of byte k, fp32 absmax per block, or
with double quantization an 8-bit code per block into a 256-value map, scaled per 256 blocks, plus a mean offset),
so outputs are bit-identical to bitsandbytes' and to each other.

Kernel style follows the Triton tutorials (triton-lang.org, "Matrix Multiplication" and "Fused Softmax"): pointer
arguments commented, arguments grouped (pointers, scalars, sizes, strides, constexprs), host wrappers that check,
allocate and launch. The tests run every kernel under TRITON_INTERPRET=1 on CPU against its reference.

This file imports only torch and triton: copy it into another project as it is.
"""
import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (macOS, Windows): the references still work, CUDA tensors raise below
    triton = None

# The fused kernel serves matmuls with at most this many rows of x (tokens), per direction (the forward x @ W.T and
# the backward's grad_y @ W have different grids, so they can cross over at different sizes); above it, dequantize +
# cuBLAS. PROVISIONAL: no GPU has measured them yet; set them from bench.py's crossovers (its dequant section sweeps
# both directions by assigning this global).
FUSED_MAX_TOKENS = {"forward": 16, "backward": 16}
# The fused backward splits its reduction over N across programs (see matmul_4bit_triton): chunks of a multiple of
# this many rows of W (a multiple of every BLOCK_N), as many as bring the grid to about _BWD_PROGRAMS programs.
_BWD_CHUNK_ROWS = 256
_BWD_PROGRAMS = 512  # a few programs per SM (108 SMs on an A100, 132 on an H100/H200): PROVISIONAL, untuned

# -----------------------------------------------------------------------------
# torch references (CPU, and the ground truth the Triton kernels are tested against)


def _absmax_ref(absmax, nested_absmax, nested_code, offset, nested_blocksize):
    """fp32 per-block absmax; with double quantization rebuilt as code[q] * nested_absmax[i // 256] + offset."""
    if nested_absmax is None:
        return absmax.float()
    scale = nested_absmax.float().repeat_interleave(nested_blocksize)[: absmax.numel()]
    a = nested_code.float()[absmax.long()] * scale  # fp32 multiply, then a separate fp32 add (as bitsandbytes)
    return a + torch.tensor(offset, dtype=torch.float32, device=a.device)


def dequantize_4bit_ref(packed, absmax, code, blocksize, numel, dtype,
                        nested_absmax=None, nested_code=None, offset=0.0, nested_blocksize=256):
    """packed: uint8 [(numel+1)//2] (any shape), absmax: fp32 [nblocks] or uint8 [nblocks] with double quantization,
    code: fp32 [16]. Returns a flat tensor of `numel` values in `dtype`: code[c] * absmax[block] in fp32, one cast."""
    a = _absmax_ref(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    # one lookup per byte: row b of the (256, 2) table is (code[b >> 4], code[b & 15]), both nibbles' values (high
    # nibble first); read as one 8-byte word per row, the 1-D index_select is ~4x faster on CPU than a row gather
    pairs = torch.cartesian_prod(code.float(), code.float()).view(torch.int64).reshape(-1)
    vals = pairs.index_select(0, packed.reshape(-1).int()).view(torch.float32)  # (2 * nbytes,) fp32 <= nblocks*bs
    # the block scale broadcast, in place (no second buffer): fp32 products; a partial last block is the tail
    nfull = vals.numel() // blocksize
    vals[: nfull * blocksize].view(nfull, blocksize).mul_(a[:nfull, None])
    if nfull < a.numel():
        vals[nfull * blocksize:].mul_(a[nfull])
    return vals[:numel].to(dtype)


def _search_table(code):
    """The 16 table values sorted, as (midpoints fp32 [15], order [16]): a value's code is order[#midpoints < it].
    FP4's table is not monotonic in the code, so search the sorted values; stable=True puts FP4's +0 (code 0)
    before its -0 (code 8), so a zero always gets the same code whatever the sort implementation."""
    values, order = code.float().sort(stable=True)
    # (narrow, not [1:]: bench/compile.py runs this on fake CUDA tensors, where a CPU-only torch cannot slice)
    return (values.narrow(0, 1, 15) + values.narrow(0, 0, 15)) / 2, order


def quantize_4bit_ref(x, code, blocksize):
    """x: any float tensor. Returns (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)]).
    Each value becomes the code whose table value is nearest to x / absmax; ties go to the lower value
    (a value counts the midpoints it is strictly greater than), exactly as bitsandbytes."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = (n + blocksize - 1) // blocksize
    blocks = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # multiply by the fp32 reciprocal (not divide): that is what bitsandbytes does. An all-zero block scales to 0
    # and stores absmax 0 with 0.0's code (0x77 bytes for NF4: bitsandbytes' CPU path; its CUDA path writes 0x00)
    recip = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (blocks * recip[:, None]).reshape(-1)[: n + (n % 2)]  # an odd tail gets one 0.0 to fill the byte
    mids, order = _search_table(code)
    c = order[torch.bucketize(scaled, mids, right=False)].to(torch.uint8)  # right=False: count of mids < x
    packed = (c[0::2] << 4) | c[1::2]
    return packed, absmax


def matmul_4bit_ref(x, packed, absmax, code, blocksize, shape,
                    nested_absmax=None, nested_code=None, offset=0.0, nested_blocksize=256, transpose=False):
    """W (shape (N, K)) stored in the 4-bit layout. transpose=False: x [..., K] -> x @ W.T [..., N] (the forward);
    transpose=True: x [..., N] -> x @ W [..., K] (the backward's grad_x = grad_y @ W). W is dequantized to x.dtype."""
    N, K = shape
    W = dequantize_4bit_ref(packed, absmax, code, blocksize, N * K, x.dtype,
                            nested_absmax, nested_code, offset, nested_blocksize).view(N, K)
    return x @ W if transpose else x @ W.T


# -----------------------------------------------------------------------------
# Triton kernels and their host wrappers (defined only where triton is importable)

if triton is not None:

    @triton.jit
    def _load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, blk, mask,
                     NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
        """fp32 absmax of quantization blocks `blk` (any shape). With double quantization it is rebuilt as
        nested_code[q] * nested_absmax[blk // 256], rounded, THEN + offset, rounded: the launches pass
        enable_fp_fusion=False so the compiler cannot contract the two into one FMA (one rounding, other bits)."""
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + blk, mask=mask, other=0)  # uint8 code into the 256-value dynamic map
            scale = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
            a = tl.load(nested_code_ptr + q) * scale + offset
        else:
            a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return a

    @triton.jit
    def _cast(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
        """fp32 -> dtype, rounding to nearest even (the GPU's cvt.rn). Triton 3.9's CPU interpreter, where the tests
        run, truncates fp32 -> bf16 instead: there bf16 is rounded by hand on the bits, as torch does."""
        if INTERPRETER and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round half to even on the 16 dropped bits
            y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)  # (NaN never occurs: finite table x absmax)
        else:
            y = x.to(dtype)
        return y

    @triton.jit
    def _dequantize_4bit_kernel(
        packed_ptr,         # *uint8 [(numel+1)//2]: two 4-bit codes per byte, element 2k in the HIGH nibble
        absmax_ptr,         # *fp32 [nblocks] scales, or *uint8 [nblocks] codes into nested_code with DQ
        code_ptr,           # *fp32 [16]: the 4-bit table (NF4, FP4, ...)
        nested_absmax_ptr,  # *fp32 [ceil(nblocks / NESTED_BLOCKSIZE)] (DQ only)
        nested_code_ptr,    # *fp32 [256]: the 8-bit dynamic map (DQ only)
        out_ptr,            # *bf16/fp16/fp32 [numel]
        offset,             # fp32: the mean added back to the double-quantized absmax (DQ only)
        numel, nbytes, nblocks,  # (nbytes apart from numel: a multiple of 16 lets Triton vectorize the loads)
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        ROWS: tl.constexpr,  # quantization blocks per program: a [ROWS, BLOCKSIZE // 2] tile of bytes
        INTERPRETER: tl.constexpr,  # running in Triton's CPU interpreter (the tests): see _cast
    ):
        # ---- one absmax per block (row of the tile), loaded once and broadcast over its BLOCKSIZE elements
        HALF: tl.constexpr = BLOCKSIZE // 2
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        a = _load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows, rows < nblocks,
                         NESTED_BLOCKSIZE, DOUBLE_QUANT)
        # ---- contiguous bytes -> two codes each -> table values (the 16-entry table stays in L1)
        byte_idx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        b = tl.load(packed_ptr + byte_idx, mask=byte_idx < nbytes, other=0)
        hi = tl.load(code_ptr + (b >> 4))
        lo = tl.load(code_ptr + (b & 0xF))
        # ---- interleave back to element order (2k, 2k+1), scale in fp32, one cast, contiguous masked store
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
        numel, nbytes, nblocks,  # nbytes = (numel+1)//2, passed: a multiple of 16 lets Triton vectorize the stores
        BLOCKSIZE: tl.constexpr,
        ROWS: tl.constexpr,  # quantization blocks per program: a [ROWS, BLOCKSIZE] tile of elements
    ):
        # ---- load a tile of blocks in fp32; the masked tail reads 0.0, which never raises an absmax
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        x = tl.load(x_ptr + elem, mask=elem < numel, other=0.0).to(tl.float32)
        # ---- blockwise absmax, and x * (1 / absmax) with a correctly rounded reciprocal (div_rn, not the fast
        # approximate divide) as bitsandbytes and the reference; an all-zero block scales by 0
        absmax = tl.max(tl.abs(x), axis=1)
        nonzero = absmax > 0
        recip = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.where(nonzero, absmax, 1.0))
        x = x * tl.where(nonzero, recip, 0.0)[:, None]
        # ---- code = order[number of midpoints strictly below x]: ties go to the lower value
        idx = tl.zeros([ROWS, BLOCKSIZE], dtype=tl.int32)
        for i in tl.static_range(15):
            idx += (x > tl.load(mids_ptr + i)).to(tl.int32)
        c = tl.load(order_ptr + idx)
        # ---- pack (2k, 2k+1) into one byte, 2k in the high nibble; an odd tail's pad element is 0.0's code
        hi, lo = tl.split(tl.reshape(c, [ROWS, BLOCKSIZE // 2, 2]))
        byte_idx = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        tl.store(packed_ptr + byte_idx, ((hi << 4) | lo).to(tl.uint8), mask=byte_idx < nbytes)
        tl.store(absmax_ptr + rows, absmax, mask=rows < nblocks)

    @triton.jit
    def _dequantize_bytes(byte_idx, mask, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                          BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
        """The two fp32 weights (even element, odd element) of each packed byte at `byte_idx` (any shape). A byte's
        two elements always share one quantization block (a block holds an even number of elements)."""
        b = tl.load(packed_ptr + byte_idx, mask=mask, other=0)
        a = _load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, byte_idx // (BLOCKSIZE // 2), mask,
                         NESTED_BLOCKSIZE, DOUBLE_QUANT)
        a = tl.where(mask, a, 0.0)  # masked bytes must give exact zeros (with DQ their absmax would be `offset`)
        return tl.load(code_ptr + (b >> 4)) * a, tl.load(code_ptr + (b & 0xF)) * a

    @triton.jit
    def _dot(x, w, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
        """acc + x @ w, with the fp32 weight tile w first rounded to x's dtype (as the reference's dequantized W)."""
        w = _cast(w, x.dtype, INTERPRETER)
        if INTERPRETER:  # its tl.dot multiplies bf16 tiles as their raw uint16 bits: give it the same values in
            x, w = x.to(tl.float32), w.to(tl.float32)  # fp32 (products are exact there, sums fp32 as on the GPU)
        return tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _matmul_4bit_kernel(
        x_ptr,              # *bf16/fp16/fp32 [M, K] forward (x), [M, N] backward (grad_y); unit stride on the last dim
        packed_ptr,         # *uint8 [N * K // 2]: W (N, K) row-major in the 4-bit layout, K even
        absmax_ptr,         # *fp32 or *uint8 (DQ) [nblocks]
        code_ptr,           # *fp32 [16]
        nested_absmax_ptr,  # *fp32 (DQ only)
        nested_code_ptr,    # *fp32 [256] (DQ only)
        out_ptr,            # *x.dtype [M, N] forward; backward [splits, M, K], fp32 partial sums where splits > 1
        offset,             # fp32 (DQ only)
        M, N, K,
        n_chunk,            # backward: rows of W (of N) each program reduces over; a multiple of BLOCK_N
        stride_xm, stride_os, stride_om,  # stride_os: between the backward's partial sums (program_id(2))
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        TRANSPOSE: tl.constexpr,      # False: y = x @ W.T (forward); True: y = x @ W (backward)
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 like torch's default, "tf32" where torch allows it
        INTERPRETER: tl.constexpr,    # running in Triton's CPU interpreter (the tests): see _cast and _dot
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # rows of x, rows of W per tile
        BLOCK_KB: tl.constexpr,       # packed bytes of a W row per tile (2 * BLOCK_KB columns of W)
    ):
        """The packed bytes form a matrix B (N, K/2): its high nibbles hold W_even = W[:, 0::2], its low nibbles
        W_odd = W[:, 1::2]. Each tile of B is dequantized once into both, and
            forward:  y = x @ W.T = x[:, 0::2] @ W_even.T + x[:, 1::2] @ W_odd.T
            backward: y = g @ W,   y[:, 0::2] = g @ W_even,  y[:, 1::2] = g @ W_odd
        so the bytes load contiguously and W is never interleaved, only x (forward) or y (backward) is.
        The backward sums over N = sum over chunks s of g[:, chunk s] @ W[chunk s, :]: program (i, j, s) writes
        its chunk's partial sum, and the host adds them in a fixed order (deterministic, unlike atomics)."""
        KB = K // 2
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        if not TRANSPOSE:
            # ---- forward: a [BLOCK_M, BLOCK_N] tile of y, reducing over K one tile of bytes at a time
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for kb0 in range(0, KB, BLOCK_KB):
                # x tile [BLOCK_M, 2 * BLOCK_KB], loaded contiguously and split into its even and odd columns
                k = 2 * kb0 + tl.arange(0, 2 * BLOCK_KB)
                x_mask = (offs_m[:, None] < M) & (k[None, :] < K)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
                x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_KB, 2]))
                # W_even.T and W_odd.T tiles [BLOCK_KB, BLOCK_N] from one tile of B
                kb = kb0 + tl.arange(0, BLOCK_KB)
                w_mask = (kb[:, None] < KB) & (offs_n[None, :] < N)
                w_even, w_odd = _dequantize_bytes(offs_n[None, :] * KB + kb[:, None], w_mask, packed_ptr, absmax_ptr,
                                                  code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
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
            for n0 in range(n_lo, tl.minimum(n_lo + n_chunk, N), BLOCK_N):  # (tiles never cross a chunk's end)
                n = n0 + tl.arange(0, BLOCK_N)
                g_mask = (offs_m[:, None] < M) & (n[None, :] < N)
                g = tl.load(x_ptr + offs_m[:, None] * stride_xm + n[None, :], mask=g_mask, other=0.0)
                # W_even and W_odd tiles [BLOCK_N, BLOCK_KB] from one tile of B
                w_mask = (n[:, None] < N) & (kb[None, :] < KB)
                w_even, w_odd = _dequantize_bytes(n[:, None] * KB + kb[None, :], w_mask, packed_ptr, absmax_ptr,
                                                  code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                                  BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
                acc_even = _dot(g, w_even, acc_even, DOT_PRECISION, INTERPRETER)
                acc_odd = _dot(g, w_odd, acc_odd, DOT_PRECISION, INTERPRETER)
            acc = tl.interleave(acc_even, acc_odd)  # columns 2kb, 2kb + 1 side by side: [BLOCK_M, 2 * BLOCK_KB]
            offs_out = 2 * tl.program_id(1) * BLOCK_KB + tl.arange(0, 2 * BLOCK_KB)
        # ---- one cast of the fp32 accumulator, masked store
        out_mask = (offs_m[:, None] < M) & (offs_out[None, :] < (K if TRANSPOSE else N))
        out_ptrs = out_ptr + tl.program_id(2) * stride_os + offs_m[:, None] * stride_om + offs_out[None, :]
        tl.store(out_ptrs, _cast(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=out_mask)

    # On a GPU the fused matmul picks its tiles per (M bucket, N, K, direction, DQ, dtypes). It serves few tokens,
    # so BLOCK_M comes from the host and the list spans weight tiles: narrow ones with long byte runs keep many
    # programs and bytes in flight when N (forward) or K (backward) is the only parallelism. The dequantized fp32
    # W tile lives in registers, 2 * BLOCK_N * BLOCK_KB values per program: larger ones (64 x 64 on 4 warps, 16 x 256
    # or 32 x 128 on 4) spill up to 1.6 KB a thread or exceed an A100's shared memory. The list keeps only tiles that
    # bench/compile.py compiled for sm_80 and sm_90 without a spill and within shared memory (at most 74 KiB) in
    # every specialization the presets launch (each layer shape, tiny to llama2-70b; bf16 and fp16; DQ or not;
    # BLOCK_M 16-64 and M = 1; forward and backward), with Triton 3.9 (ptxas 12.9 for sm_80, 13.4 for sm_90, both
    # with --regAllocOptLevel=2) and with 3.6 (ptxas 12.8; the GPU machine's): 192 compiles a target each, at most
    # 223 registers with 3.9 (with 3.6 on sm_80, 16 x 128 on 4 warps takes all 255 at M = 64 backward, unspilled).
    # Small spills (8-44 bytes at 64, 80, 96, 128 or 168 registers: ptxas aiming at an occupancy step, far from the
    # 255 cap) come and go with the ptxas, warps and stages: of 32 tiles compiled in bf16 with 3.9, 8 never spilled
    # (the former list, 16 x 64, 32 x 64, 64 x 32 on 4 warps and 32 x 128, 64 x 64, 128 x 32 on 8, 3 stages,
    # spilled in 20 of its 576 compiles), and 32 x 64 (3 stages) and 64 x 32 (2) on 8 warps, clean with 3.9, spill
    # 12 bytes with 3.6. No tile with BLOCK_N = 64 was clean with both. Which tile is fastest is PROVISIONAL: no
    # GPU has timed them yet.
    _matmul_4bit_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_KB": bkb}, num_warps=w, num_stages=st)
                 for bn, bkb, w, st in [(16, 64, 8, 3), (16, 128, 8, 3), (32, 32, 8, 3), (16, 128, 4, 2)]],
        key=["BLOCK_M", "N", "K", "TRANSPOSE", "DOUBLE_QUANT"],
    )(_matmul_4bit_kernel)

    assert all(_BWD_CHUNK_ROWS % c.kwargs["BLOCK_N"] == 0 for c in _matmul_4bit_tuned.configs), "see _BWD_CHUNK_ROWS"
    # the tile the interpreter runs (tests/test_kernels.py also runs it with each config of the list above)
    _INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_KB": 16}, num_warps=4)
    _OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

    def _on_device(t):
        """Triton launches on the current CUDA device (torch.cuda.current_device()), whatever device the tensors
        are on: on GPU 1 with GPU 0 current it would run GPU 1's pointers on GPU 0. Every launch here runs inside
        this, which makes the tensors' device current (a no-op when it already is; nothing on CPU tensors)."""
        return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

    def _check_state(packed, absmax, code, blocksize, numel, nested_absmax, nested_code, nested_blocksize):
        """The quantization state must be bitsandbytes-shaped, contiguous and on packed's device."""
        nblocks = triton.cdiv(numel, blocksize)
        assert blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096), f"blocksize {blocksize}"
        assert numel < 2**31 - 2 * 4096, "element indices are int32"
        assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2 and packed.is_contiguous()
        assert absmax.numel() == nblocks and absmax.is_contiguous(), f"absmax: {absmax.shape}, {nblocks} blocks"
        assert code.dtype == torch.float32 and code.numel() == 16 and code.is_contiguous()
        if nested_absmax is None:
            assert absmax.dtype == torch.float32, "an fp32 absmax, or uint8 codes with nested_absmax/nested_code"
        else:
            assert absmax.dtype == torch.uint8 and nested_code.dtype == torch.float32 and nested_code.numel() == 256
            assert nested_blocksize & (nested_blocksize - 1) == 0, "nested_blocksize must be a power of two"
            assert nested_absmax.dtype == torch.float32
            assert nested_absmax.numel() == triton.cdiv(nblocks, nested_blocksize), "one nested absmax per 256 blocks"
        tensors = [absmax, code] + ([] if nested_absmax is None else [nested_absmax, nested_code])
        assert all(t.device == packed.device for t in tensors), "the quantization state must be on one device"

    def dequantize_4bit_triton(packed, absmax, code, blocksize, numel, dtype,
                               nested_absmax=None, nested_code=None, offset=0.0, nested_blocksize=256):
        """Triton version of dequantize_4bit_ref (same arguments, bit-identical output)."""
        _check_state(packed, absmax, code, blocksize, numel, nested_absmax, nested_code, nested_blocksize)
        assert dtype in _OUT_DTYPES, f"dtype {dtype}"
        out = torch.empty(numel, dtype=dtype, device=packed.device)
        if numel == 0:
            return out
        nblocks = triton.cdiv(numel, blocksize)
        rows = max(1, 2048 // (blocksize // 2))  # 2048 packed bytes (4096 outputs) per program
        dq = nested_absmax is not None  # without DQ the nested pointers are placeholders the kernel never reads
        with _on_device(packed):
            _dequantize_4bit_kernel[(triton.cdiv(nblocks, rows),)](
                packed, absmax, code, nested_absmax if dq else absmax, nested_code if dq else code, out,
                float(offset), numel, (numel + 1) // 2, nblocks,
                BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=dq, ROWS=rows,
                INTERPRETER=not packed.is_cuda, num_warps=4, enable_fp_fusion=False)  # no FMA: see _load_absmax
        return out

    def quantize_4bit_triton(x, code, blocksize):
        """Triton version of quantize_4bit_ref (same arguments, bit-identical packed bytes and absmax).
        Double quantization of the returned absmax is small and stays in torch."""
        assert x.dtype in _OUT_DTYPES and x.is_contiguous(), f"x: {x.dtype}, contiguous={x.is_contiguous()}"
        assert blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096), f"blocksize {blocksize}"
        assert code.numel() == 16 and code.device == x.device
        n = x.numel()
        assert n < 2**31 - 2 * 4096, "element indices are int32"
        nblocks = triton.cdiv(n, blocksize)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
        absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
        if n == 0:
            return packed, absmax
        mids, order = _search_table(code)  # the same midpoints as the reference, computed by the same torch ops
        rows = max(1, 4096 // blocksize)  # 4096 elements per program: 16 packed bytes per thread, one 16-byte store
        with _on_device(x):
            _quantize_4bit_kernel[(triton.cdiv(nblocks, rows),)](
                x, mids, order.to(torch.int32), packed, absmax, n, (n + 1) // 2, nblocks, BLOCKSIZE=blocksize,
                ROWS=rows, num_warps=4)
        return packed, absmax

    def matmul_4bit_triton(x, packed, absmax, code, blocksize, shape,
                           nested_absmax=None, nested_code=None, offset=0.0, nested_blocksize=256, transpose=False):
        """Triton version of matmul_4bit_ref: W is dequantized tile by tile inside the reduction loop and never
        materialized. Equal to the reference up to fp32 summation order (and, in bf16/fp16, the output rounding)."""
        N, K = shape
        assert K % 2 == 0, "the fused kernel reads whole bytes per row of W: K must be even"
        assert x.shape[-1] == (N if transpose else K) and x.dtype in _OUT_DTYPES, f"x {tuple(x.shape)} {x.dtype}"
        # fp32 tiles are twice as large: compiled for sm_80/sm_90 most configs spill, some exceed shared memory
        # (bench/compile.py), so on a GPU fp32 goes to dequantize + matmul; the interpreter (tests) runs any dtype
        assert not (x.is_cuda and x.dtype == torch.float32), "the fused kernel takes bf16/fp16 on a GPU"
        assert N * K < 2**32, "byte indices are int32"
        _check_state(packed, absmax, code, blocksize, N * K, nested_absmax, nested_code, nested_blocksize)
        assert x.device == packed.device
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        M = x2.shape[0]
        if M * (K if transpose else N) == 0:
            return x.new_empty(*x.shape[:-1], K if transpose else N)
        block_m = min(64, max(16, triton.next_power_of_2(M)))  # tl.dot needs >= 16 rows
        # The backward's grid over (M, K) alone is small (a 4096 x 4096 W, 16 tokens: 32 programs of 64 bytes'
        # columns on 132 SMs, each looping over all of N): split N into chunks, programs (i, j, s), until there
        # are about _BWD_PROGRAMS, and add the chunks' fp32 partial sums after (an fp32 [splits, M, K] buffer, a
        # few MB; a second pass rather than atomics, so the result is the same on every run).
        splits, n_chunk = 1, N
        if transpose:
            tiles = triton.cdiv(M, block_m) * triton.cdiv(K // 2, 64)
            want = min(triton.cdiv(_BWD_PROGRAMS, tiles), N // _BWD_CHUNK_ROWS)
            if want > 1:
                n_chunk = triton.cdiv(triton.cdiv(N, want), _BWD_CHUNK_ROWS) * _BWD_CHUNK_ROWS
                splits = triton.cdiv(N, n_chunk)
        # the kernel's output: y in x.dtype, or the backward's fp32 partial sums [splits, M, K]
        part = torch.empty(splits, M, K if transpose else N, dtype=x.dtype if splits == 1 else torch.float32,
                           device=x.device)
        dq = nested_absmax is not None
        tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        args = (x2, packed, absmax, code, nested_absmax if dq else absmax, nested_code if dq else code, part,
                float(offset), M, N, K, n_chunk, x2.stride(0), part.stride(0), part.stride(1))
        meta = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=dq, TRANSPOSE=transpose,
                    DOT_PRECISION="tf32" if tf32 else "ieee", INTERPRETER=not x.is_cuda, BLOCK_M=block_m,
                    enable_fp_fusion=False)  # W' tiles dequantized as the dequantize kernel: see _load_absmax
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]),
                          triton.cdiv(K // 2, c["BLOCK_KB"]) if transpose else triton.cdiv(N, c["BLOCK_N"]), splits)
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
        raise RuntimeError("kernels.py: CUDA tensors need triton, which is not importable (pip install triton)")
    return True


def dequantize_4bit(packed, absmax, code, blocksize, numel, dtype,
                    nested_absmax=None, nested_code=None, offset=0.0, nested_blocksize=256):
    """Flat [numel] tensor of `dtype` from the 4-bit layout (see dequantize_4bit_ref)."""
    fn = dequantize_4bit_triton if _use_triton(packed) else dequantize_4bit_ref
    return fn(packed, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize)


def quantize_4bit(x, code, blocksize):
    """(packed uint8 [(n+1)//2], absmax fp32 [nblocks]) for x (see quantize_4bit_ref)."""
    fn = quantize_4bit_triton if _use_triton(x) else quantize_4bit_ref
    return fn(x.contiguous(), code, blocksize)


def matmul_4bit(x, packed, absmax, code, blocksize, shape,
                nested_absmax=None, nested_code=None, offset=0.0, nested_blocksize=256, transpose=False):
    """x @ W.T (transpose=False) or x @ W (transpose=True) for the 4-bit W of `shape` (N, K).
    On a GPU: the fused kernel for few tokens (reading 4.5 bits per weight once beats writing and re-reading a
    16-bit W), else dequantize + cuBLAS, which wins once the matmul is compute-bound (see FUSED_MAX_TOKENS)."""
    state = (packed, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize)
    if not _use_triton(x):
        return matmul_4bit_ref(x, *state, transpose=transpose)
    tokens = x.numel() // max(x.shape[-1], 1)
    # fp32: see matmul_4bit_triton. Under torch.use_deterministic_algorithms (train.py --deterministic) the fused
    # kernel is skipped: its autotuner may pick another tiling after a restart, so the sums would round differently
    fused = x.dtype != torch.float32 and shape[1] % 2 == 0 and not torch.are_deterministic_algorithms_enabled()
    if fused and tokens <= FUSED_MAX_TOKENS["backward" if transpose else "forward"]:
        return matmul_4bit_triton(x, *state, transpose=transpose)
    N, K = shape
    W = dequantize_4bit_triton(packed, absmax, code, blocksize, N * K, x.dtype,
                               nested_absmax, nested_code, offset, nested_blocksize).view(N, K)
    return x @ W if transpose else x @ W.T
