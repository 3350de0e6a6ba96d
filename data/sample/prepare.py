"""
Tokenize the bundled sample (sample.trees.jsonl, made by make.py) with its own tokenizer into data/sample/:
the same pipeline and files as data/oasst1/prepare.py, only other defaults. Flags are the same, e.g. --train_on=all.

  python data/sample/prepare.py
  # train: 1,905 conversations, 39,413 tokens (23% in the loss), length min/mean/p95/max 16/20.7/24/34
  # val: 495 conversations, 10,362 tokens: the held-out prompts (Split.prompt_answer) for exact-answer accuracy
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.oasst1 import prepare as oasst1

HERE = Path(__file__).resolve().parent
# a fifth held out: at least 100 prompts of each task (241 add, 121 reverse, 133 count) for exact-match accuracy
DEFAULTS = dict(input_path=HERE / "sample.trees.jsonl", tokenizer_path=HERE / "tokenizer.model", out_dir=HERE,
                val_fraction=0.2)


def prepare(**overrides):
    """data.oasst1.prepare.prepare() with the sample's input, tokenizer and output folder as defaults."""
    return oasst1.prepare(**(DEFAULTS | overrides))


if __name__ == "__main__":
    oasst1.main(**DEFAULTS)
