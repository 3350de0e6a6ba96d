# PagedAdamW: parity with torch.optim.AdamW, checkpoint round trip, the CPU path without CUDA, and on a GPU the
# managed tensors and the reason the optimizer exists (its states survive a capped torch allocator).
# PagedAdamW8bit: its maps and blockwise quantization against bitsandbytes, its update against a plain-torch
# reference of the algorithm step by step, its states' layout and size, checkpoint round trip and exact resume.
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_runtime
import paged_adamw
import qlora as Q
from conftest import peer
from paged_adamw import ManagedBuffer, PagedAdamW, PagedAdamW8bit, managed_tensor, prefetch

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (managed memory)")


def mlp(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device, dtype)


def train(model, opt, steps, device="cpu", start=0):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)  # batch i is the same whatever optimizer or resume point
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        loss = torch.nn.functional.mse_loss(model(x.to(device)).float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def assert_params_close(a, b, atol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max().item() <= atol, name


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw_on_cpu(weight_decay):
    hp = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay)
    ref, ours = mlp(), mlp()
    train(ref, torch.optim.AdamW(ref.parameters(), foreach=False, **hp), 100)
    train(ours, PagedAdamW(ours.parameters(), **hp), 100)
    assert_params_close(ref, ours, atol=1e-6)


def test_default_hyperparameters_match_torch():
    ours, ref = PagedAdamW([torch.zeros(1)]).defaults, torch.optim.AdamW([torch.zeros(1)]).defaults
    for k in ("lr", "betas", "eps", "weight_decay"):
        assert ours[k] == ref[k], k


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_bf16_params_update_in_fp32(device):
    # from identical weights and grads, one bf16 step == the fp32 step rounded once to bf16 (paged on CUDA)
    p16 = torch.randn(64, 64, device=device).bfloat16().requires_grad_()
    p32 = p16.detach().float().requires_grad_()
    p16.grad = torch.randn(64, 64, device=device).bfloat16()
    p32.grad = p16.grad.float()
    opt16 = PagedAdamW([p16], lr=1e-2, page_threshold=1)
    opt16.step()
    PagedAdamW([p32], lr=1e-2, page_threshold=1).step()
    assert torch.equal(p16.detach(), p32.detach().bfloat16())
    assert opt16.state[p16]["exp_avg"].dtype == torch.float32


OPTIMIZERS = {"32-bit": lambda ps, **kw: PagedAdamW(ps, **kw),
              "8-bit": lambda ps, **kw: PagedAdamW8bit(ps, min_8bit_size=128, **kw)}  # mlp's 2 weights in 8 bits


@pytest.mark.parametrize("bits", OPTIMIZERS)
def test_state_dict_round_trip(tmp_path, bits):
    # uninterrupted 100 steps == 50 steps, save, load into a fresh model + optimizer, 50 more steps (exactly)
    make = OPTIMIZERS[bits]
    full = mlp()
    train(full, make(full.parameters(), weight_decay=0.1), 100)

    first = mlp()
    opt = make(first.parameters(), weight_decay=0.1)
    train(first, opt, 50)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for s in ckpt["opt"]["state"].values():
        assert all(t.device.type == "cpu" for t in s.values()) and s["step"].item() == 50
    codes = sorted(str(s["exp_avg"].dtype) for s in ckpt["opt"]["state"].values())
    assert codes == (["torch.float32"] * 4 if bits == "32-bit" else ["torch.float32"] * 2 + ["torch.uint8"] * 2)

    resumed = mlp()
    resumed.load_state_dict(ckpt["model"])
    opt = make(resumed.parameters(), weight_decay=0.1)
    opt.load_state_dict(ckpt["opt"])
    train(resumed, opt, 50, start=50)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_cpu_path_never_loads_cudart():
    # a fresh interpreter, so nothing another test did can have loaded the library: import, train on CPU
    code = (
        "import torch, paged_adamw, cuda_runtime\n"
        "m = torch.nn.Linear(300, 400)\n"  # 120k weights: above the page threshold, but on CPU never paged
        "opt = paged_adamw.PagedAdamW(m.parameters())\n"
        "for _ in range(3):\n"
        "    m(torch.randn(2, 300)).sum().backward(); opt.step()\n"
        "assert cuda_runtime._runtime is None, 'the CUDA binding was created on the CPU path'\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert torch.version.cuda is not None or 'libcudart' not in maps, 'libcudart was loaded'\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # even on a GPU machine, the CPU path
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors a machine without a GPU gets")
def test_binding_errors_name_the_call():
    path = cuda_runtime.find_libcudart()
    if path is None:
        pytest.skip("no libcudart on this machine")
    rt = cuda_runtime.CudaRuntime(path)  # a private instance: the module's lazy one stays unset
    assert rt.version >= 11000  # the runtime answers without a device
    with pytest.raises(RuntimeError, match="cudaMallocManaged"):
        rt.malloc_managed(1024)
    with pytest.raises(RuntimeError, match="cudaMemPrefetchAsync"):
        rt.prefetch(0, 0, 0, None)


def test_managed_tensor_rejects_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        managed_tensor((4,), torch.float32, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# PagedAdamW8bit


def bnb_functional():
    return peer("bitsandbytes", "8-bit state parity not checked").functional


def state_values(numel, signed):  # Adam-like states: several orders of magnitude, a zero block, a partial block
    torch.manual_seed(1)
    x = torch.randn(numel) * torch.logspace(-6, 0, numel)[torch.randperm(numel)]
    x[256:512] = 0
    return x if signed else x.square()


def test_state_maps_are_bitsandbytes_maps():
    F = bnb_functional()
    assert torch.equal(paged_adamw.SIGNED_MAP, F.create_dynamic_map(signed=True))
    assert torch.equal(paged_adamw.UNSIGNED_MAP, F.create_dynamic_map(signed=False))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [1, 255, 256, 5000, 65536 + 77])
def test_blockwise_quantization_matches_bitsandbytes(signed, numel):
    # codes and absmax bit-identical to bitsandbytes' quantize_blockwise as its torch kernel computes it (the
    # semantics of its CUDA kernel: the nearest code); its CPU C++ kernel picks codes through a 65536-entry lookup
    # table, which can miss the nearest code: there ours must be the nearest and strictly closer. Dequantization
    # bit-identical both ways, on our codes and on theirs.
    F = bnb_functional()
    code = paged_adamw.SIGNED_MAP if signed else paged_adamw.UNSIGNED_MAP
    x = state_values(numel, signed) if numel > 512 else torch.randn(numel)
    x = x if signed else x.abs()
    q, absmax = Q.quantize_blockwise(x, code)
    assert q.dtype == torch.uint8 and q.shape == x.shape and absmax.shape == (-(-numel // 256),)
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    ref_q, ref_absmax = op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd),
                                      x, code, 256)  # bitsandbytes' pure-torch kernel (backends/default)
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)

    cq, state = F.quantize_blockwise(x, code=code, blocksize=256)  # the CPU kernel
    assert torch.equal(absmax, state.absmax)
    diff = (q != cq).nonzero().flatten()
    if len(diff):
        blocks = diff // 256
        scaled = (x[diff] * torch.where(absmax[blocks] > 0, 1 / absmax[blocks], 0)).double()
        ours, theirs = (scaled - code.double()[q[diff].long()]).abs(), (scaled - code.double()[cq[diff].long()]).abs()
        assert torch.equal(ours, (scaled[:, None] - code.double()[None]).abs().min(dim=1).values)
        assert ((ours < theirs) | (absmax[blocks] == 0)).all()  # a zero block dequantizes to 0 either way
        print(f"{numel} values, {'signed' if signed else 'unsigned'}: {len(diff)} codes differ from bitsandbytes' "
              "CPU lookup table; ours are the exactly nearest")
    for codes in (q, cq):
        ours = Q.dequantize_blockwise(codes, absmax, code)
        assert torch.equal(ours, F.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=256))


def quantize_ref(x, code):
    """The 8-bit state format written out: per block of 256 the absmax, then the index of the nearest code to
    x * (1 / absmax), ties to the lower index (argmin returns the first)."""
    n = x.numel()
    out, absmax = torch.empty(n, dtype=torch.uint8), torch.empty(-(-n // 256))
    flat = x.reshape(-1)
    for b in range(absmax.numel()):
        blk = flat[b * 256:(b + 1) * 256]
        absmax[b] = blk.abs().max()
        scaled = blk * (1 / absmax[b]) if absmax[b] > 0 else torch.zeros_like(blk)
        out[b * 256:(b + 1) * 256] = (scaled.double()[:, None] - code.double()[None]).abs().argmin(dim=1)
    return out.view(x.shape), absmax


def dequantize_ref(q, absmax, code):
    return (code[q.reshape(-1).long()] * absmax.repeat_interleave(256)[:q.numel()]).view(q.shape)


def test_8bit_update_equals_reference_step_by_step():
    # the algorithm in plain torch: dequantize both moments, torch's AdamW update in fp32, quantize them back;
    # parameters and stored states equal at every step
    hp = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    model, ref = mlp(), mlp()
    opt = PagedAdamW8bit(model.parameters(), min_8bit_size=128, **hp)  # weights (512, 128) 8-bit, biases fp32
    signed, unsigned = paged_adamw.SIGNED_MAP, paged_adamw.UNSIGNED_MAP
    states = {p: None for p in ref.parameters()}
    for step in range(1, 31):
        train(model, opt, 1, start=step)
        train(ref, torch.optim.SGD(ref.parameters(), lr=0.0), 1, start=step)  # only the same gradients
        with torch.no_grad():
            for p in ref.parameters():
                g, small = p.grad, p.numel() < 128
                if states[p] is None:
                    z = torch.zeros_like(p)
                    states[p] = [z, z.clone()] if small else [*quantize_ref(z, signed), *quantize_ref(z, unsigned)]
                s = states[p]
                m, v = (s[0].clone(), s[1].clone()) if small else \
                    (dequantize_ref(s[0], s[1], signed), dequantize_ref(s[2], s[3], unsigned))
                p.mul_(1 - hp["lr"] * hp["weight_decay"])
                m.lerp_(g, 1 - hp["betas"][0])
                v.mul_(hp["betas"][1]).addcmul_(g, g, value=1 - hp["betas"][1])
                denom = (v.sqrt() / (1 - hp["betas"][1] ** step) ** 0.5).add_(hp["eps"])
                p.addcdiv_(m, denom, value=-hp["lr"] / (1 - hp["betas"][0] ** step))
                states[p] = [m, v] if small else [*quantize_ref(m, signed), *quantize_ref(v, unsigned)]
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), f"step {step}: {name}"
            st, s = opt.state[p], states[q]
            mine = [st["exp_avg"], st["exp_avg_sq"]] if len(s) == 2 else \
                [st["exp_avg"], st["exp_avg_absmax"], st["exp_avg_sq"], st["exp_avg_sq_absmax"]]
            assert all(torch.equal(a, b) for a, b in zip(mine, s)), f"step {step}: states of {name}"


def test_8bit_state_layout_and_size():
    big, small = torch.nn.Parameter(torch.zeros(300, 70)), torch.nn.Parameter(torch.zeros(4095))
    opt = PagedAdamW8bit([big, small])  # bitsandbytes' min_8bit_size: 4096
    for p in (big, small):
        p.grad = torch.randn_like(p)
    opt.step()
    s = opt.state[big]
    assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.uint8 and s["exp_avg"].shape == big.shape
    assert s["exp_avg_absmax"].shape == s["exp_avg_sq_absmax"].shape == (83,)  # ceil(21000 / 256)
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    for p in (big, small):
        held = sum(t.nbytes for k, t in opt.state[p].items() if k != "step")
        assert held == paged_adamw.state_bytes(p.numel(), bits=8)
    assert paged_adamw.state_bytes(21000, bits=32) == 8 * 21000


def test_8bit_tracks_32bit_adamw():
    # the moments' rounding changes the path only a little: after 200 steps the 8-bit run is as far from the
    # start as the 32-bit one and close to it (within 5% of the distance travelled)
    start, a, b = mlp(), mlp(), mlp()
    train(a, PagedAdamW(a.parameters(), lr=3e-3), 200)
    train(b, PagedAdamW8bit(b.parameters(), lr=3e-3, min_8bit_size=128), 200)
    for p0, pa, pb in zip(start.parameters(), a.parameters(), b.parameters()):
        assert (pa - pb).norm() < 0.05 * (pa - p0).norm()


def test_loading_another_optimizers_state_is_an_error():
    m32, m8 = mlp(), mlp()
    o32, o8 = PagedAdamW(m32.parameters()), PagedAdamW8bit(m8.parameters(), min_8bit_size=128)
    train(m32, o32, 1)
    train(m8, o8, 1)
    with pytest.raises(ValueError, match="another optimizer"):
        PagedAdamW8bit(mlp().parameters(), min_8bit_size=128).load_state_dict(o32.state_dict())
    with pytest.raises(ValueError, match="another optimizer"):
        PagedAdamW(mlp().parameters()).load_state_dict(o8.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# GPU only


@cuda
def test_managed_tensor_is_a_cuda_tensor_freed_once():
    before_alloc, frees = torch.cuda.memory_allocated(), ManagedBuffer.frees
    t = managed_tensor((256, 256), torch.float32, "cuda")
    assert t.is_cuda and t.shape == (256, 256) and t.dtype == torch.float32 and torch.all(t == 0)
    assert torch.cuda.memory_allocated() == before_alloc  # not from torch's pool: zero copy over managed memory
    t.fill_(2.0).add_(1.0)
    assert torch.equal(t @ t, torch.full((256, 256), 9.0 * 256, device="cuda"))
    rt = cuda_runtime.cudart()
    rt.advise(t.data_ptr(), t.numel() * 4, cuda_runtime.cudaMemAdviseSetAccessedBy, t.device.index)
    if rt.concurrent_managed_access(t.device.index):  # prefetching needs it (as the optimizer checks)
        prefetch(t, "cpu")  # page out to host RAM and back: the values survive the round trip
        prefetch(t)
    assert torch.all(t == 3.0)
    row = t[1]  # a view keeps the allocation alive
    del t
    gc.collect()
    assert ManagedBuffer.frees == frees
    assert row.sum().item() == 3.0 * 256
    del row
    gc.collect()
    assert ManagedBuffer.frees == frees + 1  # cudaFree exactly once, when the last view died
    b = managed_tensor((8,), torch.bfloat16, "cuda")  # other dtypes are views of the same bytes
    assert b.dtype == torch.bfloat16 and b.add_(1.5).sum().item() == 12.0


@cuda
def test_managed_tensor_refuses_more_than_the_card_holds():
    # more than the card's total, not free + 1: free memory changes under other processes, and a request just
    # under it that slipped through would map nearly all of the GPU as managed memory
    _, total = torch.cuda.mem_get_info()
    frees = ManagedBuffer.frees
    with pytest.raises(RuntimeError, match="refusing"):
        managed_tensor((total + 1,), torch.uint8, "cuda")  # checked before any allocation is made
    assert ManagedBuffer.frees == frees


@cuda
def test_matches_torch_adamw_on_cuda():
    hp = dict(lr=3e-3, weight_decay=0.1)
    ref, ours = mlp("cuda"), mlp("cuda")
    opt = PagedAdamW(ours.parameters(), page_threshold=100, **hp)  # the 512 and 128 weights paged, biases not
    train(ref, torch.optim.AdamW(ref.parameters(), foreach=False, **hp), 20, "cuda")
    train(ours, opt, 20, "cuda")
    assert_params_close(ref, ours, atol=1e-6)
    # round trip through CPU tensors, back into managed memory on the GPU
    sd = opt.state_dict()
    assert all(s["exp_avg"].device.type == "cpu" for s in sd["state"].values())
    opt2 = PagedAdamW(ours.parameters(), page_threshold=100, **hp)
    opt2.load_state_dict(sd)
    w = ours[0].weight
    assert opt2.state[w]["exp_avg"].is_cuda and torch.equal(opt2.state[w]["exp_avg"], opt.state[w]["exp_avg"])


@cuda
def test_paged_states_live_outside_a_capped_allocator():
    # params + grads fill torch's pool; a cap leaves room for a quarter of the params more: torch's AdamW
    # needs twice the params for its moments and must fail, PagedAdamW puts them in managed memory and succeeds
    n_layers, width = 16, 2048  # 16 x 4M fp32 weights = 256 MiB of params, 512 MiB of moments
    free, total = torch.cuda.mem_get_info()
    param_bytes = n_layers * width * width * 4
    if free < 8 * param_bytes:
        pytest.skip(f"needs {8 * param_bytes} bytes free, has {free}")
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(n_layers)]).cuda()
    model(torch.randn(2, width, device="cuda")).square().mean().backward()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    cap = torch.cuda.memory_reserved() + param_bytes // 4
    try:
        torch.cuda.set_per_process_memory_fraction(cap / total)
        torch_opt = torch.optim.AdamW(model.parameters())
        oom = False
        try:
            torch_opt.step()
        except torch.OutOfMemoryError:  # caught here so no traceback keeps its partial moments alive
            oom = True
        assert oom, "torch.optim.AdamW fitted under the cap: the test is mis-sized"
        del torch_opt  # frees the moments it allocated before failing
        gc.collect()
        torch.cuda.empty_cache()

        before = model[0].weight.detach().cpu()
        allocated = torch.cuda.memory_allocated()
        opt = PagedAdamW(model.parameters())
        opt.step()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - allocated < param_bytes // 4  # moments are not in torch's pool
        assert not torch.equal(before, model[0].weight.detach().cpu())
        assert all(torch.isfinite(opt.state[p]["exp_avg_sq"]).all() for p in model.parameters())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
