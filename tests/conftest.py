# Shared test helpers: where the shared test assets live, and skips that say why.
import json
import os
import subprocess
import sys
from pathlib import Path

if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:  # before torch loads OpenMP: README, "A busy CPU"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

if not torch.cuda.is_available():  # before any test module imports triton: Triton reads this flag at import
    os.environ.setdefault("TRITON_INTERPRET", "1")  # and decoration time; CPU tensors run kernels interpreted

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules are top-level files: import them from any working dir
ASSETS = ROOT.parent / "shared" / "assets"  # real third-party test assets, beside a clone (never copied in)


HANG_GUARD = 1800  # seconds; a 2- or 4-rank test run takes 10-60 s idle, a few minutes on a loaded 2-core machine


def run_ranks(cmd, **kw):
    """subprocess.run for a multi-process (torchrun) command, the one kind of run here that can hang (a collective
    that one rank never joins, a process group's teardown). The guard is no speed limit: far above the run's time on
    a loaded machine, and its failure says it is a hang."""
    try:
        return subprocess.run(cmd, timeout=HANG_GUARD, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang guard: {' '.join(map(str, cmd))[:300]} had not exited after {HANG_GUARD} s (such a run "
                    "takes seconds to minutes): a deadlock, not a slow machine", pytrace=False)


def peer(name, why):
    """A peer package for a parity test (transformers, peft, bitsandbytes, or a module of one), imported beside our
    kernels.py (peers.py says why that takes care). Skips with the reason only where the package is not installed;
    an installed one that fails to import is an error, never a skip."""
    import peers
    if peers.installed(name.partition(".")[0]) is None:
        pytest.skip(f"{name.partition('.')[0]} not installed: {why}", allow_module_level=True)
    return peers.import_peer(name)


def asset(*parts):
    """Path to a shared asset, or skip the test with the reason if the folder is absent (a user's fresh clone)."""
    p = ASSETS.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test asset {p} not present (it lives beside the repo, see README)")
    return p


def exact_bnb_cpu_path(m):
    """On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight at the first no-grad eval forward and
    runs a bf16 kernel; turn that off so it dequantizes and multiplies in fp32 (its path for training)."""
    for mod in m.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    return m


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter):
    """The versions the parity tests ran against (or that they skipped), under every run's result."""
    import peers
    found = [f"{n} {peers.installed(n) or 'not installed'}" for n in ("torch", "triton", *peers.PEERS, "kernels")]
    terminalreporter.write_line(f"peers: {', '.join(found)}")



# Tokenizer folders for tests/test_tokenizer.py and tests/test_family_runs.py. Meta's pre-tokenizer pattern
# (llama_models/llama3/tokenizer.py); Qwen2/2.5/3's splits digits one at a time
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# Meta's Llama 3.1 names for ids 128000.., then reserved names up to 128255: 256 specials
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|eot_id|>", "<|python_tag|>"]
SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(SPECIALS))]


def qwen_style(llama3):
    """Llama 3's converted tokenizer.json with Qwen2/2.5/3's pipeline: NFC, their digit-by-digit split, no BOS, and
    BPE by merges alone (ignore_merges false), as Qwen's own tokenizer.json says."""
    j = json.loads(llama3)
    j["normalizer"] = {"type": "NFC"}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated", "invert": False}, byte_level]}
    j["post_processor"] = byte_level
    j["decoder"] = byte_level
    j["model"]["ignore_merges"] = False
    return json.dumps(j)


def gpt2_style(llama3):
    """Llama 3's vocabulary behind GPT-2's pipeline: ByteLevel's own regex (case-sensitive contractions, digit runs
    of any length), no BOS, BPE by merges alone."""
    j = json.loads(llama3)
    j["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    j["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    j["model"]["ignore_merges"] = False
    return json.dumps(j)


@pytest.fixture(scope="session")
def bpe_folders(tmp_path_factory):
    """Hugging Face folders (tokenizer.json + tokenizer_config.json) as transformers writes them from Meta's file:
    "llama3" has Meta's HF post-processor (ByteLevel, then BOS first); "qwen" and "gpt2" are edits of it."""
    peer("tiktoken", "transformers' TikTokenConverter reads Meta's file with it")
    tokenizers = peer("tokenizers", "the reference for tokenizer.json files")
    transformers = peer("transformers", "its TikTokenConverter writes Llama 3's tokenizer.json")
    from transformers.convert_slow_tokenizer import TikTokenConverter
    meta = asset("llama3_tokenizer", "tokenizer.model")
    converted = TikTokenConverter(vocab_file=str(meta), pattern=LLAMA3_PATTERN,
                                  extra_special_tokens=SPECIALS).converted()
    processors = tokenizers.processors
    converted.post_processor = processors.Sequence([  # as in meta-llama/Meta-Llama-3-8B's tokenizer.json
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    llama3 = converted.to_str()
    folders = {}
    for name, text, special in [
            ("llama3", llama3, dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")),
            ("qwen", qwen_style(llama3), dict(eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")),
            ("gpt2", gpt2_style(llama3), dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"))]:
        folders[name] = tmp_path_factory.mktemp(name)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(text), **special)
        fast.save_pretrained(folders[name])
    return folders
