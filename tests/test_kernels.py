# Every Triton kernel in kernels.py against its torch reference: on CPU run by Triton's interpreter
# (TRITON_INTERPRET=1), on a GPU machine compiled, on CUDA tensors. Bit-exact for quantize and dequantize, within a
# stated fp32-accumulation tolerance for the fused matmul. Odd sizes, tails that are not a multiple of the block, NF4
# and FP4, bf16/fp16/fp32, with and without double quantization. Parity with bitsandbytes where it is installed.
import dataclasses
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

# Triton fixes its mode when it is first imported: triton.language's own @jit helpers (tl.max, tl.interleave, ...)
# are decorated then, and `@triton.jit` builds an InterpretedFunction only if TRITON_INTERPRET=1 at decoration
# (triton/runtime/jit.py). So on a machine without a GPU the flag is set here, before anything imports triton; on a
# GPU the same tests run the compiled kernels on CUDA tensors instead. (Setting it process-wide costs nothing on a
# CPU-only machine: nothing else can launch a Triton kernel there.)
ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kernels as K  # noqa: E402
from conftest import peer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = all(isinstance(f, InterpretedFunction) for f in (triton.language.standard.max, K._matmul_4bit_kernel))
# triton (or kernels.py) was imported in compiled mode before this file, on a CPU-only machine: nothing here can
# launch a kernel, so test_in_a_fresh_process reruns this file in a new interpreter with the flag set from the start
STALE = not ON_GPU and not INTERPRETED
runs_kernels = pytest.mark.skipif(STALE, reason="triton was imported before TRITON_INTERPRET=1 could be set; "
                                                "test_in_a_fresh_process runs these tests")


@pytest.mark.skipif(not STALE, reason="this process runs the kernels itself")
def test_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _load_kernels(name, modules):
    """A private copy of kernels.py, loaded with `modules` put in sys.modules, restored after."""
    saved = {k: sys.modules.get(k, ...) for k in modules}
    sys.modules.update(modules)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "kernels.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is ... else sys.modules.__setitem__(k, v)


def _on(*args):
    """Move the tensors and QuantStates' tensors (anything else passes through) to the device the
    Triton kernels run on."""
    def move(a):
        if isinstance(a, K.QuantState):
            return dataclasses.replace(a, **{f.name: move(getattr(a, f.name)) for f in dataclasses.fields(a)})
        return a.to(DEVICE) if isinstance(a, torch.Tensor) else a
    return [move(a) for a in args]


NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
FP4 = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]) / 12  # e2m1 codes 0..7; 8..15 set the sign bit
FP4 = torch.cat([FP4, -FP4])
TABLES = {"nf4": NF4, "fp4": FP4}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
BLOCKSIZES = [32, 64, 128, 256, 4096]
NUMELS = [1, 63, 65, 1001, 4097]


def _assert_bits_equal(a, b, what):
    """Bit-exact: compares the raw bits, so -0.0 vs 0.0 would fail too."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    diff = (a.view(BITS[a.dtype]) != b.view(BITS[b.dtype])).sum().item()
    assert diff == 0, f"{what}: {diff} of {a.numel()} values differ"


def _dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (see shared/reference/bnb-nf4-format.md), 256 sorted values."""
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1)
        m = (b[:-1] + b[1:]) / 2 * 10 ** (i - 6)
        parts += [m, -m]
    return torch.cat(parts).sort().values


def _double_quantize(absmax, nested_blocksize=256):
    """absmax fp32 [n] -> (uint8 codes [n], nested_absmax fp32 [ceil(n/256)], dynamic map, offset): the mean is
    subtracted, then each block of 256 is scaled by its max |.| and rounded to the nearest map value."""
    dyn = _dynamic_map()
    offset = absmax.mean()
    a = absmax - offset
    n, nb = a.numel(), -(-a.numel() // nested_blocksize)
    blocks = torch.nn.functional.pad(a, (0, nb * nested_blocksize - n)).view(nb, nested_blocksize)
    nested = blocks.abs().amax(dim=1)
    scaled = (blocks / torch.where(nested > 0, nested, 1.0)[:, None]).reshape(-1)[:n]
    q = (scaled[:, None] - dyn[None, :]).abs().argmin(dim=1).to(torch.uint8)
    return q, nested, dyn, offset.item()


def _state(packed, absmax, code, blocksize, shape, dtype=torch.float32, dq=False, quant_type="nf4"):
    """A K.QuantState of packed bytes and fp32 absmax; dq=True double-quantizes the absmax first."""
    q, nested, dyn, offset = _double_quantize(absmax) if dq else (absmax, None, None, 0.0)
    return K.QuantState(packed, q, code, shape, dtype, blocksize, quant_type, nested, dyn, offset)


def _random_input(numel, blocksize, dtype):
    """Normal values with outliers, the first block all zero when there are two or more blocks."""
    x = torch.randn(numel) * torch.rand(numel).pow(4).mul(8).add(0.1)
    if numel >= 2 * blocksize:
        x[:blocksize] = 0.0
    return x.to(dtype)


def _triton(fn, *args, **kwargs):
    """Call a Triton host wrapper on DEVICE (the CPU, under the interpreter); the results come back to the CPU."""
    out = fn(*_on(*args), **kwargs)
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


@pytest.mark.skipif(ON_GPU or STALE, reason="the interpreter runs the kernels only on CPU-only machines")
def test_interpreter_is_on():
    # else the tests below would not be running the kernels at all
    assert isinstance(K._dequantize_4bit_kernel, InterpretedFunction)
    assert isinstance(K._quantize_4bit_kernel, InterpretedFunction)


def test_dynamic_map_matches_the_doc():
    dyn = _dynamic_map()
    assert dyn.numel() == 256 and dyn[127] == 0 and dyn[255] == 1.0 and dyn[0] == -0.99296875


# -----------------------------------------------------------------------------
# dequantize: bit-exact


@runs_kernels
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_dequantize_bit_exact(table, blocksize, numel, dq):
    code = TABLES[table]
    nblocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8)  # every code; an odd tail's pad nibble
    absmax = torch.rand(nblocks) * 4  # is garbage the kernel must ignore
    absmax[0] = 0.0  # an all-zero block
    q = _state(packed, absmax, code, blocksize, (numel,), dq=dq, quant_type=table)
    for dtype in DTYPES:
        _assert_bits_equal(_triton(K.dequantize_4bit_triton, q, dtype), K.dequantize_4bit_ref(q, dtype), f"{dtype}")


@runs_kernels
def test_dequantize_two_nested_blocks():
    # 257 blocks of 32: the double-quantized absmax spans two nested blocks of 256 (i // 256 is exercised)
    numel, blocksize = 257 * 32 - 5, 32
    packed, absmax = K.quantize_4bit_ref(_random_input(numel, blocksize, torch.float32), NF4, blocksize)
    q = _state(packed, absmax, NF4, blocksize, (numel,), dq=True)
    assert q.nested_absmax.numel() == 2
    for dtype in DTYPES:
        _assert_bits_equal(_triton(K.dequantize_4bit_triton, q, dtype), K.dequantize_4bit_ref(q, dtype), f"{dtype}")


# -----------------------------------------------------------------------------
# quantize: bit-exact packed bytes and absmax


@runs_kernels
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("numel", NUMELS)
def test_quantize_bit_exact(table, blocksize, numel):
    for dtype in DTYPES:
        x = _random_input(numel, blocksize, dtype)
        p_tri, a_tri = _triton(K.quantize_4bit_triton, x, TABLES[table], blocksize)
        p_ref, a_ref = K.quantize_4bit_ref(x, TABLES[table], blocksize)
        assert torch.equal(p_tri, p_ref), f"{dtype}: {(p_tri != p_ref).sum()} bytes differ"
        _assert_bits_equal(a_tri, a_ref, f"{dtype} absmax")


@runs_kernels
@pytest.mark.parametrize("table", TABLES)
def test_quantize_ties_go_to_the_lower_value(table):
    # every midpoint exactly (absmax 1): strict > does not count it, so it takes the lower value's code
    mids, order = K._search_table(TABLES[table])
    x = torch.cat([torch.tensor([1.0]), mids])
    p_tri, _ = _triton(K.quantize_4bit_triton, x, TABLES[table], 64)
    assert torch.equal(p_tri, K.quantize_4bit_ref(x, TABLES[table], 64)[0])
    codes = torch.stack([p_tri >> 4, p_tri & 0xF], dim=1).reshape(-1)[1:16]
    assert torch.equal(codes.long(), order[:15])


@runs_kernels
def test_quantize_known_bytes():
    # -1 -> code 0 (high nibble), 1 -> 15; 0.5 -> 12 (0.5626 is nearest), and the odd tail pads with 0.0's code 7
    packed, absmax = _triton(K.quantize_4bit_triton, torch.tensor([-1.0, 1.0, 0.5]), NF4, 64)
    assert packed.tolist() == [0x0F, 0xC7] and absmax.tolist() == [1.0]
    # an all-zero block: absmax 0 and every code 7 (0x77, bitsandbytes' CPU convention); it decodes to zeros
    packed, absmax = _triton(K.quantize_4bit_triton, torch.zeros(64, dtype=torch.bfloat16), NF4, 64)
    assert (packed == 0x77).all() and absmax.tolist() == [0.0]
    assert (_triton(K.dequantize_4bit_triton, _state(packed, absmax, NF4, 64, (64,), torch.bfloat16)) == 0).all()


# -----------------------------------------------------------------------------
# fused matmul: the reference up to fp32 accumulation order, and in bf16/fp16 one rounding of the output

# rtol, and atol as a fraction of max|y|: fp32 sums in another order (<= 130 terms); bf16/fp16 round the same
# fp32 sum to the output dtype, which may land one ulp (2^-8 / 2^-11 relative) from the reference's rounding
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# On a GPU the fused kernel takes bf16 and fp16 (fp32 goes to dequantize + matmul: its tiles spill or overflow
# shared memory, see kernels.py), and K a multiple of 16 as every model's layers: with other K Triton cannot
# vectorize, and the same tiles need 2-3x the shared memory. The interpreter runs any of them.
MM_DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else DTYPES
MM_SHAPES = ([(3, 40, 96, 64), (1, 17, 32, 32), (20, 64, 160, 128)] if ON_GPU else
             [(3, 40, 72, 64), (1, 17, 34, 32), (20, 64, 130, 128)])


def _check_matmul(dtype, dq, transpose, M, N, K_, blocksize):
    """The fused matmul on DEVICE against the reference, x with a leading batch dim: [B, T, .]."""
    packed, absmax = K.quantize_4bit_ref(torch.randn(N, K_), NF4, blocksize)
    q = _state(packed, absmax, NF4, blocksize, (N, K_), dq=dq)
    x = torch.randn(2, (M + 1) // 2, N if transpose else K_, dtype=dtype)  # a leading batch dim: [B, T, .]
    y_tri = _triton(K.matmul_4bit_triton, x, q, transpose=transpose)
    y_ref = K.matmul_4bit_ref(x, q, transpose=transpose)
    assert y_tri.shape == y_ref.shape == (*x.shape[:-1], K_ if transpose else N) and y_tri.dtype == dtype
    scale = y_ref.float().abs().max().item()
    torch.testing.assert_close(y_tri, y_ref, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _record_launches(monkeypatch, run_them=True):
    """[(kernel, grid, current CUDA device)] of every launch from now on (the device Triton would launch on:
    its driver reads torch.cuda.current_device()); the kernels still run unless run_them=False."""
    launches = []
    for name in ("_dequantize_4bit_kernel", "_quantize_4bit_kernel", "_matmul_4bit_kernel", "_matmul_4bit_tuned"):
        kern = getattr(K, name)

        def run(*args, grid, kern=kern, name=name, original=kern.run, **kw):
            launches.append((name, grid, None if run_them else torch.cuda.current_device()))
            return original(*args, grid=grid, **kw) if run_them else None
        monkeypatch.setattr(kern, "run", run)
    return launches


@runs_kernels
@pytest.mark.parametrize("dtype", MM_DTYPES)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("M,N,K_,blocksize", MM_SHAPES)
def test_matmul_matches_reference(dtype, dq, transpose, M, N, K_, blocksize, monkeypatch):
    if ON_GPU:  # one tile config here (test_matmul_every_config runs the others): autotuning every shape x dtype
        monkeypatch.setattr(K._matmul_4bit_tuned, "configs", K._matmul_4bit_tuned.configs[:1])  # compiles minutes
    # K_ = 34, 72 and 130 are not multiples of the block, so blocks straddle rows of W; N = 17 is odd
    _check_matmul(dtype, dq, transpose, M, N, K_, blocksize)


@runs_kernels
@pytest.mark.parametrize("config", range(len(K._matmul_4bit_tuned.configs)) if hasattr(K, "_matmul_4bit_tuned")
                         else [], ids=lambda i: f"config{i}")
@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "backward"])
def test_matmul_every_config(config, transpose, monkeypatch):
    # every config the autotuner may pick (on a GPU pinned as its only choice; in the interpreter as its tile)
    cfg = K._matmul_4bit_tuned.configs[config]
    monkeypatch.setattr(K._matmul_4bit_tuned, "configs", [cfg])
    monkeypatch.setattr(K, "_INTERPRETER_CONFIG", cfg)
    for dtype, dq in ((torch.bfloat16, True), (torch.float16, False)):
        _check_matmul(dtype, dq, transpose, 5, 72, 96 if ON_GPU else 130, 64)


@runs_kernels
@pytest.mark.parametrize("dtype", MM_DTYPES)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("M,N,K_,blocksize", [(3, 300, 96, 64), (20, 260, 32, 32)] if ON_GPU else
                         [(3, 130, 32, 64), (20, 100, 34, 32)])
def test_matmul_backward_split_over_n(dtype, dq, M, N, K_, blocksize, monkeypatch):
    # chunks of N small enough (a multiple of every BLOCK_N that runs) that these N split 2-3 ways, as a
    # 4096-row W does at its real chunk size; the last chunk is partial (130 = 2 * 64 + 2, 260 = 256 + 4)
    monkeypatch.setattr(K, "_BWD_CHUNK_ROWS", 128 if ON_GPU else 32)
    monkeypatch.setattr(K, "_BWD_PROGRAMS", 1 << 20)
    launches = _record_launches(monkeypatch)
    _check_matmul(dtype, dq, True, M, N, K_, blocksize)
    grid = launches[-1][1]
    splits = (grid(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_KB=16)) if callable(grid) else grid)[2]
    assert splits >= 2, f"the reduction over N = {N} was not split: {splits} program(s) along it"


@pytest.mark.parametrize("deterministic", [False, True])
def test_every_launch_runs_on_the_tensors_device(monkeypatch, deterministic):
    # Triton launches on torch.cuda.current_device() and its stream, whatever device the pointers belong to.
    # Fake CUDA tensors on cuda:1 (shapes, no memory: this runs without a GPU) while cuda:0 is current; each
    # launch records the current device instead of running. Without kernels.py's guard it reads 0. Under
    # torch.use_deterministic_algorithms (train.py --deterministic) the autotuned fused matmul is never launched.
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    current = [0]

    def exchange(idx):  # torch.cuda.device(i) enters with _exchange_device(i), leaves with _maybe_exchange_device
        prev, current[0] = current[0], (current[0] if idx < 0 else idx)
        return prev
    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", exchange)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    launches = _record_launches(monkeypatch, run_them=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        dev = torch.device("cuda:1")
        N, K_ = 64, 96
        packed, absmax = torch.empty(N * K_ // 2, dtype=torch.uint8, device=dev), torch.empty(N * K_ // 64, device=dev)
        code = torch.empty(16, device=dev)
        K.quantize_4bit(torch.empty(N, K_, dtype=torch.bfloat16, device=dev), code, 64)
        q = K.QuantState(packed, absmax, code, (N, K_), torch.bfloat16, 64)
        K.dequantize_4bit(q)  # in q.dtype, bf16
        K.matmul_4bit(torch.empty(2, K_, dtype=torch.bfloat16, device=dev), q)  # fused (<= FUSED_MAX_TOKENS)
        K.matmul_4bit(torch.empty(2, N, dtype=torch.bfloat16, device=dev), q, transpose=True)
        K.matmul_4bit(torch.empty(2, K_, dtype=torch.float32, device=dev), q)  # fp32: dequantize + matmul
        K.matmul_4bit(torch.empty(512, K_, dtype=torch.bfloat16, device=dev), q)  # many tokens: the same
    names = [n for n, _, _ in launches]
    fused = "_dequantize_4bit_kernel" if deterministic else "_matmul_4bit_tuned"
    assert names == ["_quantize_4bit_kernel", "_dequantize_4bit_kernel", fused, fused,
                     "_dequantize_4bit_kernel", "_dequantize_4bit_kernel"], names
    assert [d for _, _, d in launches] == [1] * 6, "a launch ran on the current device, not the tensors'"
    assert current[0] == 0, "the guard must restore the current device"


# -----------------------------------------------------------------------------
# dispatch, and importing without triton


def test_dispatch_uses_the_reference_on_cpu():
    x = torch.randn(5, 96)
    packed, absmax = K.quantize_4bit(x, NF4, 64)
    assert torch.equal(packed, K.quantize_4bit_ref(x, NF4, 64)[0])
    q = K.QuantState(packed, absmax, NF4, x.shape, torch.float32, 64)
    w = K.dequantize_4bit(q)
    assert torch.equal(w, K.dequantize_4bit_ref(q, torch.float32)) and w.shape == x.shape
    x2 = torch.randn(2, 96)
    y = K.matmul_4bit(x2, q)
    assert torch.equal(y, K.matmul_4bit_ref(x2, q)) and y.shape == (2, 5)


def test_imports_without_triton():
    # `import triton` raising ImportError: the references and the CPU dispatch work, a CUDA tensor raises
    k = _load_kernels("kernels_without_triton", {"triton": None, "triton.language": None})
    assert k.triton is None and not hasattr(k, "dequantize_4bit_triton")
    x = torch.randn(100)
    assert torch.equal(k.quantize_4bit(x, NF4, 64)[0], k.quantize_4bit_ref(x, NF4, 64)[0])
    with pytest.raises(RuntimeError, match="triton"):
        k.dequantize_4bit(types.SimpleNamespace(packed=types.SimpleNamespace(is_cuda=True)), torch.float32)


# -----------------------------------------------------------------------------
# parity with bitsandbytes itself (its CPU backend), where it is installed


@runs_kernels
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_bitsandbytes_parity(quant_type, dq):
    F = peer("bitsandbytes.functional", "bit-exactness not checked")
    x = _random_input(37 * 61, 64, torch.bfloat16).view(37, 61)
    packed, st = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=dq)
    assert torch.equal(st.code, TABLES[quant_type])  # the tables built here from the doc are bitsandbytes'
    p_tri, a_tri = _triton(K.quantize_4bit_triton, x, st.code, 64)
    assert torch.equal(p_tri, packed.reshape(-1))
    if not dq:  # (with DQ bitsandbytes' CPU path rounds nested codes by an approximate lookup: compare decoded W)
        assert torch.equal(a_tri, st.absmax)
    nested = (st.state2.absmax, st.state2.code, float(st.offset), st.state2.blocksize) if dq else ()
    q = K.QuantState(packed, st.absmax, st.code, x.shape, x.dtype, 64, quant_type, *nested)
    _assert_bits_equal(_triton(K.dequantize_4bit_triton, q), F.dequantize_4bit(packed, st), "dequantized W")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: bitsandbytes' CUDA kernels against ours (bench/gpu.sh)")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_bitsandbytes_cuda_parity(quant_type, dq):
    # The same comparison on CUDA tensors, against bitsandbytes' CUDA kernels. One known difference: for an
    # all-zero block its CUDA quantize writes 0x00 bytes (the code of -1.0 in NF4), ours 0.0's code in both nibbles
    # (0x77 in NF4; bitsandbytes' CPU path does the same); with absmax 0 both decode to zeros.
    F = peer("bitsandbytes.functional", "bit-exactness not checked")
    import qlora as Q
    x = _random_input(37 * 61, 64, torch.bfloat16).view(37, 61).cuda()  # its first block of 64 is all zero
    packed, st = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=dq)
    code = st.code.cuda()
    p_tri, a_tri = K.quantize_4bit_triton(x, code, 64)
    zero = torch.arange(p_tri.numel(), device=x.device) < 32  # the all-zero block's 32 bytes
    zero_byte = K.quantize_4bit_ref(torch.zeros(2), st.code.cpu(), 64)[0].item()  # 0.0's code, twice
    assert torch.equal(p_tri[~zero], packed.reshape(-1)[~zero]), "packed bytes differ outside the all-zero block"
    assert (packed.reshape(-1)[zero] == 0).all() and (p_tri[zero] == zero_byte).all()
    if dq:  # the 8-bit codes of the absmax (ours: qlora.double_quantize in torch), their scales and offset
        codes, nested, offset = Q.double_quantize(a_tri)
        assert torch.equal(codes, st.absmax) and torch.equal(nested, st.state2.absmax)
        assert offset == float(st.offset)
    else:
        assert torch.equal(a_tri, st.absmax)
    nested = (st.state2.absmax, st.state2.code, float(st.offset), st.state2.blocksize) if dq else ()
    w_bnb = F.dequantize_4bit(packed, st)
    w = K.dequantize_4bit_triton(K.QuantState(packed.reshape(-1), st.absmax, code, x.shape, x.dtype, 64,
                                              quant_type, *nested))
    _assert_bits_equal(w.cpu(), w_bnb.cpu(), "dequantized W")
    # our bytes decode to the same values (in the zero block 0.0 * 0 = +0.0 where its -1.0 * 0 gives -0.0)
    w = K.dequantize_4bit_triton(K.QuantState(p_tri, st.absmax, code, x.shape, x.dtype, 64, quant_type, *nested))
    assert torch.equal(w, w_bnb)
