# qlora.py: the code tables, exact NF4 packing, the 4-bit LoRA linear's gradients and frozen base, the memory
# account, quantize-as-you-load on a real checkpoint, and the file formats round-tripping through this file alone.
# Live parity with bitsandbytes, transformers and peft is in test_qlora_peers.py.
import json
import math
import weakref

import pytest
import torch
import torch.nn as nn

import checkpoint as C
import memory
import model as M
import qlora as Q
from conftest import asset

# the 16 values as published (paper appendix E; bitsandbytes' functional.py)
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def tiny_args(**kw):
    return M.ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96,
                                 max_seq_len=64, norm_eps=1e-5), **kw})


def tiny_model(**kw):
    torch.manual_seed(0)
    m = M.Transformer(tiny_args(**kw))
    with torch.no_grad():  # norms start at 1: randomise so that every tensor matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def test_code_tables():
    nf4 = Q.nf4_table()
    assert torch.equal(nf4, torch.tensor(NF4_PUBLISHED))  # bit for bit, from the normal quantiles
    assert (nf4 < 0).sum() == 7 and (nf4 == 0).sum() == 1 and (nf4 > 0).sum() == 8
    assert torch.equal(Q.fp4_table()[:8] * 12, torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]))
    assert torch.equal(Q.fp4_table()[8:], -Q.fp4_table()[:8])
    assert torch.equal(Q.int4_table(), torch.tensor([(i - 7) / 7 for i in range(15)] + [1.0]))
    d = Q.DYNAMIC
    assert d.shape == (256,) and torch.equal(d, d.sort().values)
    assert d[127] == 0 and d[255] == 1 and d[0] == torch.tensor(-0.99296875)


def test_nf4_packing_exact_on_known_input():
    # the table itself, one block: absmax 1, codes 0..15 in order -> bytes 0x01 0x23 ... 0xEF (high nibble first)
    q = Q.quantize(torch.tensor(NF4_PUBLISHED) * 3, "nf4", 32, double_quant=False)
    assert q.packed.shape == (8, 1) and q.packed.flatten().tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert q.absmax.tolist() == [3.0] and torch.equal(Q.dequantize(q), torch.tensor(NF4_PUBLISHED) * 3)
    # odd numel: the last byte's low nibble is code 7 (0.0); an all-zero block: absmax 0, bytes 0x77
    w = torch.cat([torch.zeros(32), torch.tensor(NF4_PUBLISHED[:15])])  # 47 values, blocks of 32
    q = Q.quantize(w, "nf4", 32, double_quant=False)
    assert q.packed.shape == (24, 1) and q.packed[:16].flatten().tolist() == [0x77] * 16
    assert q.packed[-1].item() == 0xE7 and q.absmax.tolist() == [0.0, 1.0]
    assert torch.equal(Q.dequantize(q), w)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_every_value_gets_the_nearest_code(quant_type):
    w = torch.randn(37, 29)  # odd numel, a partial last block
    q = Q.quantize(w, quant_type, 64, double_quant=False)
    code, x = q.code.double(), Q.dequantize(q).double().flatten()
    scaled = (w.flatten().double() / q.absmax.double().repeat_interleave(64)[: w.numel()])
    best = (scaled[:, None] - code[None]).abs().min(dim=1).values  # distance to the nearest table value
    got = (scaled - x / q.absmax.double().repeat_interleave(64)[: w.numel()]).abs()
    assert torch.allclose(got, best, atol=1e-6)


def test_nf4_beats_fp4_and_int4_on_normal_weights():
    w = torch.randn(256, 256)  # the paper's premise: trained weights are ~ zero-mean normal
    err = {t: (Q.dequantize(Q.quantize(w, t, 64)) - w).pow(2).mean().item() for t in Q.CODES}
    print("mean squared error, N(0,1) weights, blocks of 64: " + ", ".join(f"{k} {v:.5f}" for k, v in err.items()))
    assert err["nf4"] < err["fp4"] and err["nf4"] < err["int4"]


def test_double_quantization():
    torch.manual_seed(0)
    q1 = Q.quantize(torch.randn(300, 257), "nf4", 64, double_quant=False)  # 1205 blocks: 5 nested blocks, 1 partial
    codes, nested, offset = Q.double_quantize(q1.absmax)
    assert codes.dtype == torch.uint8 and nested.shape == (5,) and offset == q1.absmax.mean().item()
    a = Q.DYNAMIC[codes.long()] * nested.repeat_interleave(256)[:1205] + offset
    assert (a - q1.absmax).abs().max() < 0.01 * q1.absmax.max()  # 8 bits of a centred scale
    q2 = Q.quantize(torch.full((300, 257), 0.5), "nf4", 64)  # all scales equal: nested absmax 0
    assert torch.equal(Q.dequantize(q2), torch.full((300, 257), 0.5))  # exact, and no 0 * inf = NaN


def test_container_byte_counts():
    q = Q.quantize(torch.randn(33, 61), "nf4", 64)  # 2013 values -> 1007 bytes, 32 blocks, 1 nested block
    assert memory.quant_bytes(q) == dict(weight=1007, constants=32 + 4, tables=64 + 1024 + 4)
    q = Q.quantize(torch.randn(33, 61), "nf4", 64, double_quant=False)
    assert memory.quant_bytes(q) == dict(weight=1007, constants=32 * 4, tables=64)
    with pytest.raises(AssertionError, match="blocksize"):
        Q.quantize(torch.randn(10), blocksize=48)


def _lin(r=8, **kw):
    torch.manual_seed(0)
    lin = Q.LoRALinear4bit(96, 80, r=r, alpha=16, dropout=0.0, **kw)
    lin.fill(torch.randn(80, 96) * 0.05)
    return lin


def _assert_grads_equal_fp32_lora(lin, W):
    """lin's output and x, A, B gradients equal a plain fp32 LoRA over the dense weight W; base buffers get none."""
    nn.init.normal_(lin.lora_B.weight)  # B != 0 so every path carries gradient
    x = torch.randn(3, 5, lin.in_features, requires_grad=True)
    g = torch.randn(3, 5, lin.out_features)
    (lin(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    A = lin.lora_A.weight.detach().clone().requires_grad_()
    B = lin.lora_B.weight.detach().clone().requires_grad_()
    y2 = x2 @ W.T + lin.scale * (x2 @ A.T) @ B.T
    (y2 * g).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x), y2, **tol)
    for a, b in ((x.grad, x2.grad), (lin.lora_A.weight.grad, A.grad), (lin.lora_B.weight.grad, B.grad)):
        torch.testing.assert_close(a, b, **tol)
    frozen = [p for n, p in lin.named_parameters() if not n.startswith("lora_")]  # the 4-bit base, as parameters
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


def test_gradients_equal_fp32_lora_over_dequantized_weight():
    lin = _lin()
    _assert_grads_equal_fp32_lora(lin, Q.dequantize(lin.quantized(), torch.float32))  # W = dequant(W_4bit)


def test_zero_B_gives_the_base_layer_and_compute_dtype():
    lin = _lin()
    x = torch.randn(4, 96)
    W = Q.dequantize(lin.quantized(), torch.float32)
    assert torch.equal(lin(x), x @ W.T)  # B = 0 at init: exactly the 4-bit base
    assert lin.lora_A.weight.abs().max() <= 1 / math.sqrt(96)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), ..)
    bf = _lin(compute_dtype=torch.bfloat16)
    y = bf(x)
    assert y.dtype == torch.float32  # back in the input's dtype
    torch.testing.assert_close(y, x.bfloat16() @ W.bfloat16().T, rtol=0, atol=0, check_dtype=False)


def test_16bit_lora_baseline(tmp_path):
    # quant_type "none" (the paper's 16-bit LoRA): the dense frozen W, y = x W^T + s B A x, key `weight` only
    torch.manual_seed(0)
    w = torch.randn(80, 96) * 0.05
    lin = Q.LoRALinear4bit(96, 80, r=8, alpha=16, dropout=0.0, quant_type="none")
    lin.fill(w)
    assert torch.equal(lin.weight, w) and sorted(lin.state_dict()) == ["lora_A.weight", "lora_B.weight", "weight"]
    _assert_grads_equal_fp32_lora(lin, w)
    # a whole model: nothing quantized, all linears counted as unquantized; the base saves as a plain checkpoint
    model = Q.add_lora(tiny_model(), r=4, quant_type="none")
    a = memory.memory_account(model)
    assert a["quantized_bytes"] == a["constant_bytes"] == a["n_quantized"] == 0
    assert a["unquantized_bytes"] == sum(p.nbytes for p in tiny_model().parameters())
    C.save_quantized(model, tmp_path / "base")
    back = C.load_quantized(tmp_path / "base", quant_type="none", r=4)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items() if ".lora_" not in k)


def test_saves_nothing_larger_than_the_packed_weight():
    lin = _lin(r=0)
    q = lin.quantized()
    x = torch.randn(7, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = Q.Matmul4bit.apply(x, q)
    assert any(t is q.packed for t in saved), "the packed weight should be what backward uses"
    assert max(t.nbytes for t in saved) == q.packed.nbytes  # 3840 bytes; a fp32 W would be 30720
    assert not any(t.is_floating_point() and t.numel() >= 80 * 96 for t in saved)
    y.sum().backward()
    torch.testing.assert_close(x.grad, Q.dequantize(q).sum(0).expand(7, 96))


def test_state_dict_keys_are_bitsandbytes_and_peft():
    lin = _lin()
    sd = lin.state_dict()
    assert sorted(sd) == sorted(["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                                 "lora_A.weight", "lora_B.weight"])
    assert sd["weight"].shape == (80 * 96 // 2, 1) and sd["weight.absmax"].dtype == torch.uint8
    state = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert list(state) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                           "nested_offset"] and state["shape"] == [80, 96]
    other = Q.LoRALinear4bit(96, 80, r=8, double_quant=False)  # different settings: the state dict's win
    other.load_state_dict(sd)
    assert other.double_quant and all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))


def test_add_lora_targets():
    model = Q.add_lora(tiny_model(), targets="q_proj,v_proj", r=2)
    adapted = {n.rsplit(".", 1)[-1] for n, m in Q.linears_4bit(model).items() if m.r}
    assert adapted == {"q_proj", "v_proj"} and len(Q.linears_4bit(model)) == 14  # all 4-bit, two adapted
    with pytest.raises(AssertionError, match="must be among"):
        Q.add_lora(tiny_model(), targets=("lm_head",))


def test_add_lora_and_frozen_base_after_a_step():
    model = tiny_model()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    Q.add_lora(model, r=4, alpha=8, dropout=0.0)
    mods = Q.linears_4bit(model)
    assert len(mods) == 2 * 7 and all(n.startswith("model.layers.") for n in mods)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    for n, m in mods.items():  # quantized from the dense weights, bit-identical to quantizing them directly
        ref = Q.quantize(dense[n + ".weight"])
        assert torch.equal(m.weight, ref.packed) and torch.equal(m.absmax, ref.absmax)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 100, (2, 16))
    for _ in range(2):  # step 1 moves B (A's gradient is B^T(...) = 0), step 2 moves A too
        loss = nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # base buffers and frozen params untouched
    assert all(m.lora_B.weight.abs().sum() > 0 for m in mods.values())


def test_memory_account_7b_on_meta():
    for dq, bits in ((True, 4.126953125), (False, 4.5)):
        with torch.device("meta"):
            model = M.Transformer(M.get_args("7b"))
        Q.add_lora(model, double_quant=dq, r=64)
        a = memory.memory_account(model)
        n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
        assert a["n_quantized"] == n and a["bits_per_param"] == bits
        assert a["quantized_bytes"] == n // 2
        assert a["constant_bytes"] == (n // 64 + n // 64 // 256 * 4 if dq else n // 64 * 4)
        assert a["lora_bytes"] == 32 * 64 * 4 * (4 * 2 * 4096 + 3 * (4096 + 11008))
        assert a["unquantized_bytes"] == 4 * (2 * 32000 * 4096 + 65 * 4096)  # embeddings, head, norms (fp32 on meta)
        print(f"7b, double_quant={dq}: " + ", ".join(f"{k.removesuffix('_bytes')} {v / 2**20:,.1f} MiB"
                                                      for k, v in a.items() if k.endswith("_bytes")) +
              f"; {a['bits_per_param']} bits per quantized parameter")


def test_quantize_as_you_load_stories260K(monkeypatch):
    path = asset("stories260K")
    n_linears, seen, peak = 5 * 7, {}, []
    factory = C.quantize_hook

    def count_alive():  # how many distinct unquantized linear weights are still referenced anywhere
        return sum(any(r() is not None for r in refs) for refs in seen.values())

    def instrumented(model, device, dtype):
        inner = factory(model, device, dtype)

        def hook(name, t):
            if name in targets:
                seen.setdefault(name, []).append(weakref.ref(t))
                peak.append(count_alive())
            return inner(name, t)
        targets = {n + ".weight" for n in Q.linears_4bit(model)}
        return hook

    quantize = Q.quantize

    def watched(w, *a, **kw):  # the tensor quantize receives may be a cast copy: it counts too
        seen[next(reversed(seen))].append(weakref.ref(w))
        peak.append(count_alive())
        return quantize(w, *a, **kw)

    monkeypatch.setattr(C, "quantize_hook", instrumented)
    monkeypatch.setattr(Q, "quantize", watched)
    model = C.load_quantized(path, dtype=torch.bfloat16, r=4)  # fp32 file, bf16 model: a cast copy per weight
    assert len(seen) == n_linears and len(peak) == 2 * n_linears
    assert max(peak) == 1, f"up to {max(peak)} unquantized linear weights alive at once"
    assert count_alive() == 0
    monkeypatch.undo()
    # the same bytes as loading in full and quantizing afterwards
    dense = C.load_model(path, dtype=torch.bfloat16)
    ref = Q.add_lora(C.load_model(path, dtype=torch.bfloat16), r=4)
    for (k, a), (k2, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and (".lora_A" in k or torch.equal(a, b)), k
    ids = json.loads((path / "greedy_reference.json").read_text())["greedy_ids"]
    idx = torch.tensor([[1] + ids[:63]])  # real text: BOS and the model's own greedy story
    with torch.no_grad():
        d, q = dense(idx).float(), model(idx).float()
    rel = ((q - d).norm() / d.norm()).item()
    print(f"stories260K NF4+DQ vs bf16: relative logit error {rel:.3f}, "
          f"argmax agreement {(q.argmax(-1) == d.argmax(-1)).float().mean():.2f}")
    assert rel < 0.25


def test_files_round_trip(tmp_path):
    model = Q.add_lora(tiny_model(), r=4, alpha=8, dropout=0.0)
    for m in Q.linears_4bit(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.1)
    idx = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = model(idx)
    # the 4-bit base, bitsandbytes format: the same bytes come back
    C.save_quantized(model, tmp_path / "base")
    qc = C.is_bnb_4bit(tmp_path / "base")
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    base = C.load_quantized(tmp_path / "base", r=4, alpha=8, dropout=0.0)
    sd = base.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if ".lora_" not in k)
    # the adapter, PEFT format
    C.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    c = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (c["peft_type"], c["task_type"], c["r"], c["lora_alpha"], c["bias"]) == ("LORA", "CAUSAL_LM", 4, 8, "none")
    assert c["target_modules"] == sorted(Q.LINEARS)
    keys = [k for k, _ in C.read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 14
    C.load_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(base(idx), ref)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**c, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):  # an adapter this file cannot run is refused, not misread
        C.load_adapter(base, tmp_path / "adapter")
    # merged onto dequant(W_4bit): W' = W + s B A, and logits of base + adapter
    diff = C.merge(model, tmp_path / "merged")
    merged = C.load_model(tmp_path / "merged")
    for n, m in Q.linears_4bit(model).items():
        w = merged.get_parameter(n + ".weight")
        assert torch.equal(w, Q.dequantize(m.quantized(), torch.float32) + m.scale * m.lora_B.weight @ m.lora_A.weight)
    print(f"merged vs 4-bit base + adapter: max |logit diff| {diff:.2e}")
    assert diff < 1e-5
    # merged onto the original fp32 weights: the difference is now the quantization error
    dense = tiny_model()
    C.save_safetensors(tmp_path / "orig.safetensors", dense.state_dict())
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig.safetensors").rename(tmp_path / "orig" / "model.safetensors")
    diff16 = C.merge(model, tmp_path / "merged16", original=tmp_path / "orig")
    merged16 = C.load_model(tmp_path / "merged16")
    m = Q.linears_4bit(model)["model.layers.1.mlp.down_proj"]
    w16 = dense.get_parameter("model.layers.1.mlp.down_proj.weight") + m.delta()
    assert torch.equal(merged16.get_parameter("model.layers.1.mlp.down_proj.weight"), w16)
    print(f"merged onto the fp32 originals vs 4-bit base + adapter: max |logit diff| {diff16:.2e}")
    assert 1e-5 < diff16 < 1
