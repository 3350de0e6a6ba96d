"""
Generate from a base model, a base model plus a trained QLoRA adapter (PEFT format), or a merged model.

  python sample.py --init_from=out/base --adapter=out/adapter --prompt="What is 12+34?"      # after `python train.py`
  python sample.py --init_from=/path/to/llama-7b --adapter=out/adapter --prompt="Tell me a joke" --temperature=0.7
  python sample.py --init_from=../shared/assets/stories260K --raw --prompt="Once upon a time"

The prompt is wrapped in Guanaco's chat format ("### Human: ...### Assistant:") unless --raw is given.
Greedy decoding with --temperature=0, nucleus sampling otherwise; a KV cache either way. A prompt that does not
leave room for one new token in the model's context (max_seq_len) is refused, not cut: cutting it from the left
would drop the BOS and the "### Human:" marker the model was tuned on. Generation stops at the context's end.
Ids past the tokenizer's (a model's embedding rows padded to a round number) are never sampled.
Every mistake (a flag out of range, a missing folder, a bad checkpoint or adapter) is one line, `error: ...`.
"""
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:  # before torch loads OpenMP: README, "A busy CPU"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import checkpoint as C
import configurator
from tokenizer import Tokenizer, TokenizerError, find_tokenizer


@dataclass
class Config:
    init_from: str = ""            # base model directory (with its tokenizer); required
    adapter: str = ""              # a PEFT-format LoRA adapter directory, e.g. out/adapter; "" = none
    quantize: str = ""             # nf4 | fp4: load a 16-bit base in 4 bits; "" = as stored
    prompt: str = "Hello!"         # the user's turn (or, with --raw, the text to continue)
    raw: bool = False              # no chat template: continue the prompt as it is
    max_new_tokens: int = 200      # at most this many tokens after the prompt (fewer at EOS or the context's end)
    temperature: float = 0.0       # 0 = greedy
    top_p: float = 0.9             # nucleus sampling: the smallest set of tokens holding this much probability
    seed: int = 1337               # 0 to 2**63-1
    device: str = "auto"           # auto (cuda if available, else cpu) | cpu | cuda | cuda:N


class SampleError(ValueError):
    """A user's mistake that is not in a checkpoint file (those are checkpoint.CheckpointError): one line at the
    CLI."""


def parse_config(argv):
    """Config from --key=value flags: each value of the field's type, the required and the choice flags given."""
    cfg = Config(**configurator.parse_flags(Config, argv, __doc__))
    if not cfg.init_from:
        raise configurator.ConfigError("--init_from is required: a model folder with its tokenizer")
    if cfg.quantize:  # "": as stored
        configurator.check_choices(cfg, dict(quantize=("nf4", "fp4")))
    return cfg


def check_flags(a):
    """Refuse, before anything loads, flags that would crash or sample garbage."""
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise SampleError(f"--temperature must be a finite number >= 0 (0 = greedy), not {a.temperature}")
    if not 0 < a.top_p <= 1:  # nan fails this too
        raise SampleError(f"--top_p must be in (0, 1], not {a.top_p}")
    if a.max_new_tokens <= 0:
        raise SampleError(f"--max_new_tokens must be at least 1, not {a.max_new_tokens}")
    if not 0 <= a.seed < 2**63:  # torch takes up to 2**64-1 and maps -1 to it: one seed, one spelling
        raise SampleError(f"--seed must be a whole number from 0 to 2**63-1, not {a.seed}")
    try:
        a.prompt.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as lone surrogates, which sentencepiece rejects
        raise SampleError("--prompt is not valid UTF-8 text") from None
    if not Path(a.init_from).is_dir():
        raise SampleError(f"--init_from={a.init_from}: no such directory (a model folder with its tokenizer)")
    if a.adapter and not Path(a.adapter).is_dir():
        raise SampleError(f"--adapter={a.adapter}: no such directory (a PEFT adapter folder, e.g. out/adapter)")
    configurator.check_device(a.device)  # a ConfigError


def checked_logits(a, n_ids):
    """A forward hook on the model, for model.generate's every step: NaN or infinity in what model.sample_next will
    read (broken weights, or logits / temperature overflowing) is an error rather than a crash in torch.multinomial."""
    def hook(module, args, logits):  # logits: (B, T, vocab)
        last = logits[:, -1, :n_ids].float()
        if not torch.isfinite(last).all():
            raise SampleError(f"{a.init_from}: the model's logits hold NaN or infinity: broken weights")
        if a.temperature and not torch.isfinite(last / a.temperature).all():
            raise SampleError(f"--temperature={a.temperature}: the logits divided by it overflow; use 0 for greedy")
    return hook


def generate(a):
    check_flags(a)
    torch.manual_seed(a.seed)
    tok_path = find_tokenizer(a.init_from)  # tokenizer.model or tokenizer.json, or a TokenizerError
    tok = Tokenizer(tok_path)
    device = configurator.pick_device(a.device)
    model = C.load_for_inference(a.init_from, a.adapter or None, device, a.quantize or None).eval()
    if tok.vocab_size > model.args.vocab_size:
        raise SampleError(f"{tok_path}: {tok.vocab_size} token ids, the model in {a.init_from} has only "
                          f"{model.args.vocab_size}: not this model's tokenizer")
    model.register_forward_hook(checked_logits(a, tok.vocab_size))
    text = a.prompt if a.raw else f"### Human: {a.prompt}### Assistant:"
    ids, ctx = tok.encode(text, bos=tok.add_bos), model.args.max_seq_len  # BOS as the family's own code adds it
    if not ids:
        raise SampleError(f"--prompt is empty and {tok_path} puts no BOS first: give a prompt to continue")
    if len(ids) >= ctx:
        raise SampleError(f"--prompt is {len(ids)} tokens, and the model's context (max_seq_len) is {ctx}: shorten "
                          "it to leave room for an answer")
    if len(ids) + a.max_new_tokens > ctx:
        print(f"note: the context of {ctx} tokens leaves room for {ctx - len(ids)} new tokens, not "
              f"{a.max_new_tokens}", file=sys.stderr)
    out = model.generate(torch.tensor([ids], device=device), a.max_new_tokens, a.temperature, a.top_p,
                         eos_id=tok.eos_id, n_ids=tok.vocab_size)
    return tok.decode([t for t in out[0].tolist() if t not in (tok.bos_id, tok.eos_id)])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        print(generate(parse_config(argv)))
    except (configurator.ConfigError, SampleError, C.CheckpointError, TokenizerError) as e:  # bad input; anything else is a bug
        sys.exit(f"error: {e}")                                               # and keeps its traceback


if __name__ == "__main__":
    main()
