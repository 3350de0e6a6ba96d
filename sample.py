"""
Generate from a base model, a base model plus a trained QLoRA adapter (PEFT format), or a merged model.

  python sample.py --init_from=out/base --adapter=out/adapter --prompt="What is 12+34?"      # after `python train.py`
  python sample.py --init_from=/path/to/llama-7b --adapter=out/adapter --prompt="Tell me a joke" --temperature=0.7
  python sample.py --init_from=../shared/assets/stories260K --raw --prompt="Once upon a time"

The prompt is wrapped in Guanaco's chat format ("### Human: ...### Assistant:") unless --raw is given.
Greedy decoding with --temperature=0, nucleus sampling otherwise; a KV cache either way.
"""
import argparse
import json
from pathlib import Path

import torch

import model as M
import qlora as Q


def load(init_from, adapter=None, device="cpu", quantize=None):
    """Base weights (HF, Meta or bitsandbytes 4-bit) plus an optional adapter, ready to generate."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text()) if adapter else None
    if cfg is None and quantize is None and not Q.is_bnb_4bit(init_from):
        return M.load_model(init_from, device=device, dtype=dtype)  # plain 16/32-bit model
    lora = dict(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=0.0, targets=",".join(cfg["target_modules"])) if cfg \
        else dict(r=0)
    model = Q.load_quantized(init_from, device=device, dtype=dtype, quant_type=quantize or "nf4",
                             compute_dtype=dtype, **lora)
    if adapter:
        Q.load_adapter(model, adapter)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", required=True, help="base model directory (with tokenizer.model)")
    p.add_argument("--adapter", default=None, help="a PEFT-format LoRA adapter directory, e.g. out/adapter")
    p.add_argument("--quantize", choices=["nf4", "fp4"], default=None, help="load a 16-bit base in 4 bits")
    p.add_argument("--prompt", default="Hello!")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as it is")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    tok_path = Path(a.init_from) / "tokenizer.model"
    if not tok_path.exists():
        raise SystemExit(f"error: no tokenizer.model in {a.init_from}")
    tok = M.Tokenizer(tok_path)
    model = load(a.init_from, a.adapter, a.device, a.quantize).eval()
    text = a.prompt if a.raw else f"### Human: {a.prompt}### Assistant:"
    idx = torch.tensor([tok.encode(text, bos=True)], device=a.device)
    out = model.generate(idx, a.max_new_tokens, a.temperature, a.top_p, eos_id=tok.eos_id)
    print(tok.decode([t for t in out[0].tolist() if t not in (tok.bos_id, tok.eos_id)]))


if __name__ == "__main__":
    main()
