# qlora.py against the real peers, live: bitsandbytes (the 4-bit format, bit for bit), transformers + bitsandbytes
# (4-bit checkpoints both ways, same logits) and peft (adapters both ways, same logits). Each skips, saying why,
# where its peer is not installed.
import pytest
import torch

import checkpoint as C
import qlora as Q
from conftest import asset, exact_bnb_cpu_path, peer

bnb = peer("bitsandbytes", "live 4-bit format parity not checked")
F = bnb.functional

# (shape, blocksize): odd numel, partial last blocks, one element, several nested blocks, every block size
CASES = [((100, 70), 64), ((33, 17), 32), ((512, 300), 128), ((201, 999), 4096), ((3,), 64), ((257, 129), 256),
         ((96, 200), 512), ((64, 96), 1024), ((4096, 3), 2048), ((700, 300), 64)]


def _bnb_quant_state(q):
    """bitsandbytes' own QuantState rebuilt from our serialized bytes (to_bnb), as from_pretrained does it."""
    parts = {k.removeprefix("weight."): v for k, v in Q.to_bnb(q).items() if k != "weight"}
    return F.QuantState.from_dict(parts, torch.device("cpu"))


def _bnb_dequantize(packed, state):
    """bitsandbytes' dequantization. Its CPU kernel (bitsandbytes 0.50.2, AVX512) is wrong when a row's length is a
    multiple of 16 but not of the block size; there the test uses bitsandbytes' own pure-torch implementation (its
    CUDA semantics), checks the condition, and says so."""
    out = F.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    ref = _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape,
                                               state.dtype)  # __wrapped__: without torch.compile
    if not torch.equal(out, ref):
        cols = state.shape[-1]
        assert cols % 16 == 0 and cols % state.blocksize != 0, "bitsandbytes disagrees with itself elsewhere"
        print(f"{list(state.shape)} bs={state.blocksize}: bitsandbytes' CPU dequantize_4bit differs from its own "
              f"reference in {(out != ref).sum().item()} values (its AVX512 kernel bug); compared with the reference")
    return ref


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", CASES)
def test_nf4_bit_identical_to_bitsandbytes(shape, blocksize, dtype, double_quant):
    _check_bit_identical("nf4", shape, blocksize, dtype, double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", CASES[:3])
def test_fp4_bit_identical_to_bitsandbytes(shape, blocksize, dtype, double_quant):
    _check_bit_identical("fp4", shape, blocksize, dtype, double_quant)


def _check_bit_identical(quant_type, shape, blocksize, dtype, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=dtype)
    if w.numel() > 4 * blocksize:
        w.view(-1)[blocksize: 3 * blocksize] = 0  # two all-zero blocks
    q = Q.quantize(w, quant_type, blocksize, double_quant)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(q.packed, packed) and torch.equal(q.code, state.code)
    if not double_quant:
        assert torch.equal(q.absmax, state.absmax)
    else:
        assert q.offset == state.offset.item() and torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_code, state.state2.code)
        diff = (q.absmax != state.absmax).nonzero().flatten()
        if len(diff):  # bitsandbytes' CPU path picks the 8-bit codes through an approximate lookup table
            fp32 = Q.kernels.quantize_4bit(w, q.code, blocksize)[1]  # the fp32 scales being coded
            nested = q.nested_absmax.repeat_interleave(256)[: fp32.numel()]
            x = ((fp32 - state.offset) * torch.where(nested > 0, 1 / nested, 0)).double()[diff]  # in [-1, 1]
            dyn = Q.DYNAMIC.double()
            ours, theirs = (x - dyn[q.absmax[diff].long()]).abs(), (x - dyn[state.absmax[diff].long()]).abs()
            assert torch.equal(ours, (x[:, None] - dyn[None]).abs().min(dim=1).values), "ours: the nearest codes"
            assert (ours < theirs).all()
            print(f"{list(shape)} {dtype} bs={blocksize}: {len(diff)} of {q.absmax.numel()} nested codes differ "
                  f"from bitsandbytes' CPU lookup table; ours are the exactly nearest (strictly closer) codes")
    # dequantized outputs bit-identical on the same bytes, both ways: ours on theirs, theirs on ours
    theirs = Q.from_bnb({"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}})
    assert torch.equal(Q.dequantize(theirs), _bnb_dequantize(packed, state))
    assert torch.equal(Q.dequantize(q), _bnb_dequantize(q.packed, _bnb_quant_state(q)))
    assert Q.dequantize(q).dtype == dtype


def test_fp4_and_dynamic_map_tables_match_bitsandbytes():
    assert torch.equal(Q.CODES["nf4"], F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(Q.CODES["fp4"], F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(Q.DYNAMIC, F.create_dynamic_map(signed=True))


# -----------------------------------------------------------------------------
# transformers + bitsandbytes and peft: a tiny random LLaMA, quantized on both sides


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved in fp32, and the same quantized and saved by transformers + bnb."""
    transformers = peer("transformers", "HF parity not checked")
    d = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norms start at 1: randomise so that every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(d / "fp32")
    bnb_4bit = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    q = transformers.AutoModelForCausalLM.from_pretrained(d / "fp32", quantization_config=bnb_4bit,
                                                          dtype=torch.float32, device_map="cpu")
    q.save_pretrained(d / "bnb")
    return transformers, d


def _hf_4bit(transformers, path):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
    exact_bnb_cpu_path(m)
    return m


IDX = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))


def test_checkpoint_saved_here_loads_in_transformers(hf, tmp_path):
    transformers, d = hf
    ours = C.load_quantized(d / "fp32", r=4).eval()  # quantized here as it streams in
    C.save_quantized(ours, tmp_path)
    theirs = _hf_4bit(transformers, tmp_path)
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        diff = (ours(IDX) - theirs(IDX).logits).abs().max().item()
    print(f"4-bit checkpoint saved here, logits here vs transformers + bitsandbytes: max |diff| {diff:.1e}")
    assert diff < 1e-5


def test_real_checkpoint_quantized_here_loads_in_transformers(hf, tmp_path):
    transformers, _ = hf  # stories260K: a trained model, grouped-query attention, tied embeddings
    ours = C.load_quantized(asset("stories260K"), r=0).eval()
    C.save_quantized(ours, tmp_path)
    theirs = _hf_4bit(transformers, tmp_path)
    idx = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]])  # BOS "Once upon a time, there"
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max() < 1e-5


def test_checkpoint_saved_by_transformers_loads_here(hf):
    transformers, d = hf
    theirs = _hf_4bit(transformers, d / "bnb")
    ours = C.load_quantized(d / "bnb", r=4).eval()
    for n, m in Q.linears_4bit(ours).items():
        lin = theirs.get_submodule(n)
        assert torch.equal(Q.dequantize(m.quantized()), F.dequantize_4bit(lin.weight.data, lin.weight.quant_state))
    with torch.no_grad():
        diff = (ours(IDX) - theirs(IDX).logits).abs().max().item()
    assert diff < 1e-5


def test_fp4_checkpoint_without_double_quant_from_transformers(hf, tmp_path):
    transformers, d = hf  # bitsandbytes' defaults: FP4, no double quantization
    q = transformers.AutoModelForCausalLM.from_pretrained(d / "fp32", dtype=torch.float32, device_map="cpu",
                                                          quantization_config=transformers.BitsAndBytesConfig(
                                                              load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    q.save_pretrained(tmp_path)
    theirs = _hf_4bit(transformers, tmp_path)
    ours = C.load_quantized(tmp_path, r=4).eval()
    for n, m in Q.linears_4bit(ours).items():
        assert m.quant_type == "fp4" and not m.double_quant and m.absmax.dtype == torch.float32
        lin = theirs.get_submodule(n)
        assert torch.equal(Q.dequantize(m.quantized()), F.dequantize_4bit(lin.weight.data, lin.weight.quant_state))
    with torch.no_grad():
        assert (ours(IDX) - theirs(IDX).logits).abs().max() < 1e-5


def _peft():
    return peer("peft", "adapter parity not checked")


def test_adapter_saved_here_loads_in_peft(hf, tmp_path):
    peft = _peft()
    transformers, d = hf
    ours = C.load_quantized(d / "bnb", r=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj", "down_proj")).eval()
    torch.manual_seed(1)
    for m in Q.linears_4bit(ours).values():
        if m.r:
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)  # a trained-looking adapter
    C.save_adapter(ours, tmp_path, base_model_name_or_path=str(d / "bnb"))
    theirs = peft.PeftModel.from_pretrained(_hf_4bit(transformers, d / "bnb"), tmp_path).eval()
    exact_bnb_cpu_path(theirs)
    with torch.no_grad():
        diff = (ours(IDX) - theirs(IDX).logits).abs().max().item()
        with theirs.disable_adapter():
            base = (ours(IDX) - theirs(IDX).logits).abs().max().item()
    print(f"adapter saved here, logits here vs peft: max |diff| {diff:.1e} (the adapter moves them {base:.1e})")
    assert diff < 1e-5 and base > 1e-2


def test_adapter_saved_by_peft_loads_here(hf, tmp_path):
    peft = _peft()
    transformers, d = hf
    config = peft.LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM", init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    theirs = peft.get_peft_model(_hf_4bit(transformers, d / "bnb"), config).eval()  # B random, not zero
    exact_bnb_cpu_path(theirs)
    theirs.save_pretrained(tmp_path)
    ours = C.load_adapter(C.load_quantized(d / "bnb"), tmp_path).eval()
    assert {n.rsplit(".", 1)[-1] for n, m in Q.linears_4bit(ours).items() if m.r} == set(config.target_modules)
    with torch.no_grad():
        diff = (ours(IDX) - theirs(IDX).logits).abs().max().item()
    assert diff < 1e-5
