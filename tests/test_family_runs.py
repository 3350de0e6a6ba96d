# Each family as a user runs it: a random transformers model of Llama 3.1, Qwen2.5, Qwen3 and Mistral v0.3, saved
# with its own tokenizer files, goes through sample.py (greedy, token for token with transformers' generate, from
# the 16/32-bit folder and from a bitsandbytes 4-bit folder that transformers wrote), eval.py's MMLU (transformers'
# logits at the letters' own ids), and train.py on the sample data and on OASST1 (prepared from the release's own
# file format): a run stopped part way resumes to the same losses, the adapter loads in peft onto the transformers
# model with the same logits, and merged it is a folder of the family's class that transformers reads the same.
import json
import shutil

import pytest
import torch

import checkpoint as C
import eval as E
import model as M
import sample
import train as T
from conftest import ROOT, asset, exact_bnb_cpu_path, peer
from data.oasst1 import prepare as P
from test_eval import DEV, TEST, write_mmlu
from test_families import hf_model
from tokenizer import Tokenizer, find_tokenizer

RUNS = {  # name: (test_families' family, tokenizer, its special ids as the family's config.json states them)
    "llama3.1": ("llama3.1", "llama3", dict(bos_token_id=128000, eos_token_id=128001)),
    "qwen2.5": ("qwen2.5", "qwen", dict(bos_token_id=None, eos_token_id=128001)),
    "qwen3": ("qwen3", "qwen", dict(bos_token_id=None, eos_token_id=128001)),
    "mistral": ("mistral", "mistral v3", dict(bos_token_id=1, eos_token_id=2)),
}
PROMPT = "What is 12+34? Über 5 ÉLÈVES, Δ 3.14"


def family_folder(folder, name, bpe_folders):
    """The family's random model and its tokenizer files, saved as the family's Hugging Face folders are."""
    family, tok, ids = RUNS[name]
    folder.mkdir(parents=True)
    if tok == "mistral v3":
        shutil.copy(asset("mistral_tokenizers", "tokenizer.model.v3"), folder / "tokenizer.model")
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(  # as Mistral 7B v0.3's folder has it
            tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, bos_token="<s>",
            eos_token="</s>", unk_token="<unk>", legacy=False)))
    else:
        for f in bpe_folders[tok].iterdir():
            shutil.copy(f, folder / f.name)
    vocab = -(-Tokenizer(find_tokenizer(folder)).vocab_size // 64) * 64  # rows padded to a round number, as real ones
    # rows of 64 or 128: bitsandbytes' CPU dequantize is wrong on rows a multiple of 16 but not of the block size
    # (tests/test_qlora_peers.py), and its 4-bit model is the reference here
    return hf_model(folder, family, vocab_size=vocab, max_position_embeddings=256, hidden_size=64,
                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **ids)


def greedy(folder, n=8):
    """sample.py's greedy answer to ids' text, as the token ids it generated."""
    return sample.generate(sample.Config(init_from=str(folder), prompt=PROMPT, raw=True, max_new_tokens=n))


def train(*args):
    T.train(T.parse_config(["--batch_size=4", "--max_seq_len=128", "--lora_r=4", "--eval_answers=0",
                            "--log_interval=1000", "--eval_interval=1000", "--eval_batches=1", "--lr=1e-2", *args]))


def losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())}


class Stop(Exception):
    pass


@pytest.mark.parametrize("name", list(RUNS))
def test_family_end_to_end(tmp_path, name, bpe_folders, monkeypatch):
    transformers = peer("transformers", "the families' runs not checked against transformers")
    peft = peer("peft", "the families' adapters not checked against peft")
    base = tmp_path / "base"
    hf = family_folder(base, name, bpe_folders)
    tok = Tokenizer(find_tokenizer(base))
    ids = tok.encode(PROMPT, bos=tok.add_bos)
    # BOS as transformers' tokenizer adds it (converting a sentencepiece file needs protobuf; ours is sentencepiece)
    auto = transformers.AutoTokenizer.from_pretrained(base) if tok.sp is None else None
    if auto is not None:
        assert ids == auto(PROMPT)["input_ids"]

    # sample.py, greedy: the text of the same tokens as transformers' generate, from 32 and from 4 bits
    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    q = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4, dtype=torch.float32,
                                                          device_map="cpu")
    q.save_pretrained(tmp_path / "bnb")
    for f in base.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "bnb" / f.name)
    for model, folder in ((hf, base), (exact_bnb_cpu_path(q.eval()), tmp_path / "bnb")):
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0].tolist()
        assert len(out) > len(ids)
        assert greedy(folder) == tok.decode([t for t in out if t not in (tok.bos_id, tok.eos_id)]), folder

    # eval.py's MMLU: each prompt as transformers' tokenizer encodes it, the letters' own ids (` A`: one token, not
    # sentencepiece's ▁A), the next-token logits at them as transformers' model gives them
    data = E.load_mmlu(write_mmlu(tmp_path / "mmlu", {"world_religions": TEST["world_religions"]}), shots=2)
    letters = E.answer_pieces(tok)
    pieces = [tok.sp.id_to_piece(p[0]) if tok.sp else tok.bpe.bytes_of[p[0]].decode() for p in letters]
    assert all(len(p) == 1 for p in letters) and pieces == [("▁" if tok.sp else " ") + c for c in "ABCD"]
    for r, row in zip(E.mmlu(C.load_model(base).eval(), tok, data, 2, 2, progress=False), TEST["world_religions"]):
        prompt = E.prompt_text("world_religions", DEV, r["shots"], row)
        if auto is not None:
            assert tok.encode(prompt, bos=tok.add_bos) == auto(prompt)["input_ids"]
        with torch.no_grad():
            want = hf(torch.tensor([tok.encode(prompt, bos=tok.add_bos)])).logits[0, -1, [p[0] for p in letters]]
        assert (torch.tensor(r["logits"]) - want).abs().max() < 1e-4 and r["prediction"] == "ABCD"[want.argmax()]

    # train.py on the sample data, stopped after step 3 (its checkpoint at 2) and resumed: the losses of one run
    monkeypatch.chdir(ROOT)
    run = [f"--init_from={base}", "--data=sample", "--max_steps=4", "--ckpt_interval=2", "--lora_dropout=0.1"]
    train(*run, f"--out_dir={tmp_path / 'ref'}")
    lr = T.get_lr

    def stop_at_3(cfg, step):
        if step == 3:
            raise Stop
        return lr(cfg, step)
    monkeypatch.setattr(T, "get_lr", stop_at_3)
    with pytest.raises(Stop):
        train(*run, f"--out_dir={tmp_path / 'stopped'}")
    monkeypatch.setattr(T, "get_lr", lr)
    train(*run, f"--out_dir={tmp_path / 'stopped'}", "--resume=true")
    assert losses(tmp_path / "stopped") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 4

    # OASST1 from the release's trees file, prepared with the family's tokenizer; its adapter in peft
    P.prepare(asset("oasst1", "en_100_tree.jsonl"), find_tokenizer(base), tmp_path / "oasst1", verbose=False)
    train(f"--init_from={base}", f"--data={tmp_path / 'oasst1'}", "--max_steps=2", f"--out_dir={tmp_path / 'o'}")
    # on the same 4-bit bytes: bitsandbytes' CPU path rounds a few double-quantized scales otherwise than ours (the
    # nearest codes, tests/test_qlora_peers.py), which moves these random models' logits by ~1e-3
    ours = C.load_adapter(C.load_quantized(tmp_path / "bnb"), tmp_path / "o" / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(exact_bnb_cpu_path(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", dtype=torch.float32, device_map="cpu")),
        tmp_path / "o" / "adapter").eval()
    idx = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
        with theirs.disable_adapter():
            moved = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff < 1e-5 and moved > 1e-2, (diff, moved)
    # merged into a plain 32-bit folder of the family's class, with its special ids: transformers reads the same model
    assert C.merge(ours, tmp_path / "merged") < 1e-4
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(merged).__name__ == type(hf).__name__ and merged.config.eos_token_id == hf.config.eos_token_id
    with torch.no_grad():
        assert (merged(idx).logits - ours(idx)).abs().max() < 1e-4


def test_meta_llama3_folder_samples_as_transformers(tmp_path):
    # Meta's own layout (params.json with use_scaled_rope, consolidated.00.pth, the tiktoken tokenizer.model): the
    # prompt starts with BOS as Meta's reference encodes it (bos=True), and greedy decoding follows transformers'
    from test_model import _to_meta_layout
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)  # the constants use_scaled_rope stands for
    hf = hf_model(tmp_path / "hf", "llama3.1", vocab_size=128256, hidden_size=64, intermediate_size=192,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_scaling=dict(scaling),
                  max_position_embeddings=256, bos_token_id=128000, eos_token_id=128001)
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps(dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                      vocab_size=128256, multiple_of=64, norm_eps=1e-5,
                                                      rope_theta=500000.0, use_scaled_rope=True)))
    heads = M.ModelArgs(dim=64, n_heads=4, n_kv_heads=2)  # what the layout's q/k permutation needs
    torch.save(_to_meta_layout(hf.state_dict(), heads, 1)[0], meta / "consolidated.00.pth")
    args = C.load_args(meta)
    assert args.hidden_dim == 192 and args.rope_scaling == scaling
    shutil.copy(asset("llama3_tokenizer", "tokenizer.model"), meta / "tokenizer.model")
    tok = Tokenizer(find_tokenizer(meta))
    ids = tok.encode(PROMPT, bos=tok.add_bos)
    assert ids[0] == 128000 and tok.eos_id == 128001
    out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0].tolist()
    assert greedy(meta) == tok.decode([t for t in out if t not in (tok.bos_id, tok.eos_id)])
