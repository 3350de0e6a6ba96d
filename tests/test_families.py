# The model families people fine-tune now, as transformers builds them: Llama 3.x (its RoPE frequency scaling, an
# explicit head_dim, a tied head), Qwen2 / 2.5 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), Mistral. Random tiny
# models of each give our logits within 1e-4 in fp32, in 16/32 bits and quantized on load (against the dequantized
# weights), and what the families' configs hold that model.py does not compute is refused in one line.
import json

import pytest
import torch

import checkpoint as C
import model as M
import qlora as Q
from conftest import peer

SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA31 = dict(rope_theta=500000.0, head_dim=16, rope_scaling=dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16))
FAMILIES = {  # name: (transformers config class, model class, config)
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", LLAMA31),
    "llama3.2 tied": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA31, tie_word_embeddings=True)),
    "llama linear rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "qwen2.5": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, sliding_window=8,
                                                        use_sliding_window=False, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=12, rope_theta=1000000.0, sliding_window=None,
                                                      use_sliding_window=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, rope_theta=1000000.0)),
    "mistral window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, rope_theta=1000000.0)),
}


def hf_model(tmp_path, name, **overrides):
    """A random tiny transformers model of the family, every tensor randomized (HF zero/one-initializes biases and
    norms: a swapped or missing one would not show), saved to tmp_path."""
    transformers = peer("transformers", "the families' parity not checked")
    config_class, model_class, cfg = FAMILIES[name]
    config = getattr(transformers, config_class)(**{**SMALL, **cfg, **overrides})
    torch.manual_seed(1)
    hf = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(tmp_path, name):
    hf = hf_model(tmp_path, name)
    ours = C.load_model(tmp_path)
    kind = json.loads((tmp_path / "config.json").read_text())["model_type"]
    assert ours.args.model_type == kind and ours.args.qkv_bias == (kind == "qwen2")
    assert ours.args.qk_norm == (kind == "qwen3")
    idx = torch.randint(0, 97, (2, 40))  # past the 16 positions Llama 3.1's scaling was pretrained on
    with torch.no_grad():
        want = hf(idx).logits
        assert (ours(idx) - want).abs().max() < 1e-4
        ours.setup_cache(2, 40)  # the KV cache's positions take the same tables
        try:
            step = ours(idx[:, :30], torch.arange(30))[:, -1]
        finally:
            ours.clear_cache()
        assert (step - want[:, 29]).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5", "qwen3"])
def test_quantized_on_load_equals_the_dequantized_weights(tmp_path, name):
    # NF4 on load: the same model as the dense one with each linear weight replaced by its dequantized NF4 (the
    # biases and q/k norms stay as they are), so quantization is the only difference
    hf_model(tmp_path, name)
    q = C.load_quantized(tmp_path, r=0)
    dense = C.load_model(tmp_path)
    with torch.no_grad():
        for n, m in Q.linears_4bit(q).items():
            dense.get_submodule(n).weight.copy_(Q.dequantize(m.quantized(), torch.float32))
            if m.bias is not None:
                assert torch.equal(m.bias, dense.get_submodule(n).bias)
        idx = torch.randint(0, 97, (1, 24))
        assert (q(idx) - dense(idx)).abs().max() < 1e-4
    # and back: the quantized folder (transformers' bitsandbytes layout, the family's class and config) loads again
    C.save_quantized(q, tmp_path / "nf4")
    again = C.load_quantized(tmp_path / "nf4", r=0)
    assert again.args == q.args
    assert json.loads((tmp_path / "nf4" / "config.json").read_text())["architectures"] == [FAMILIES[name][1]]


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gemma"), "model_type 'gemma' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias true is not supported"),
    (dict(mlp_bias=True), "mlp_bias true is not supported"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_type 'yarn' is not supported"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "missing 'low_freq_factor'"),
])
def test_what_model_py_does_not_compute_is_refused(tmp_path, change, message):
    hf_model(tmp_path, "llama3.1")
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": LLAMA31["rope_scaling"], **change}))
    with pytest.raises(C.CheckpointError, match=rf"{tmp_path / 'config.json'}: .*{message}"):
        C.load_args(tmp_path)


def test_meta_params_use_scaled_rope_is_llama3_scaling():
    args = M.ModelArgs(dim=64, n_heads=4, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))
    f, plain = M.rope_frequencies(args), M.rope_frequencies(M.ModelArgs(dim=64, n_heads=4, rope_theta=500000.0))
    wavelen = 2 * torch.pi / plain
    assert torch.equal(f[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])  # high frequencies kept
    assert torch.allclose(f[wavelen > 8192], plain[wavelen > 8192] / 8)  # low ones stretched 8x
