"""
Flags into settings, and the checks of single and combined settings, for every entry script. nanoGPT's
configurator execs its overrides; this one parses `--key=value` (or `--key value`; a bare `--flag` is true) into a
settings dataclass, each value checked against the field's type, so a typo is one line, `error: ...`, before
anything loads.
"""
import inspect
import math
import os
import sys
import textwrap
from dataclasses import fields

import torch

import checkpoint as C
import model as M
from data.batching import IGNORE
from tokenizer import Tokenizer, find_tokenizer


class ConfigError(ValueError):
    pass


def parse_flags(cls, argv, doc="", bare=()):
    """{field: value} from argv for the dataclass `cls`, each value converted to the type of the
    field's default. A bare --flag is true for a bool (and for the str fields in `bare`); --help
    prints usage(cls, doc) and exits."""
    types = {f.name: type(f.default) for f in fields(cls)}
    flags, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--help", "-h"):
            print(usage(cls, doc))
            sys.exit(0)
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in types:
            raise ConfigError(f"unknown setting {arg!r}; settings: {', '.join(types)}")
        if not eq and types[key] is not bool and args and not args[0].startswith("--"):
            value, eq = args.pop(0), "="  # --key value
        if not eq and types[key] is not bool and key not in bare:
            raise ConfigError(f"--{key} takes a value: --{key}=...")
        flags[key] = convert(key, value if eq else "true", types[key])
    return flags


def convert(key, value, kind):
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--{key} takes true or false, not {value!r}")
        return value.lower() in ("true", "1")
    try:
        return kind(value)
    except ValueError:
        a = "an" if kind is int else "a"
        raise ConfigError(f"--{key} takes {a} {kind.__name__}, not {value!r}") from None


def usage(cls, doc):
    """--help: the script's docstring, then its settings as the source states them: each name,
    type, default and comment (nanoGPT's way: the settings block is the documentation)."""
    src = inspect.getsource(cls).split("\n")
    body = textwrap.dedent("\n".join(src[next(i for i, line in enumerate(src)
                                             if line.startswith("class ")) + 1:]))
    return (f"{doc.strip()}\n\nsettings, as --key=value (or --key value; a bare --flag is true), "
            f"with their defaults:\n{textwrap.indent(body.rstrip(), '  ')}")


def check_choices(cfg, choices):
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}, not {getattr(cfg, key)!r}")


def check_ranges(cfg, checks):
    for key, ok, allowed in checks:
        if not ok(getattr(cfg, key)):
            raise ConfigError(f"--{key}={getattr(cfg, key)} is out of range: {allowed}")


def check_device(name):
    """--device: auto, cpu, cuda or cuda:N, and a GPU that this machine has, refused now rather than at the load."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device={name}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: no CUDA GPU is available here (torch {torch.__version__}); "
                          "use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device={name}: no such GPU; this machine has {torch.cuda.device_count()}, "
                          "numbered from 0")


def pick_device(name, local_rank=0):
    if name != "auto":
        return torch.device(name)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")

# -----------------------------------------------------------------------------
# train.py's settings


TRAIN_CHOICES = dict(quant_type=("nf4", "fp4", "int4", "none"), schedule=("constant", "cosine"),
                     optimizer=("paged_adamw", "paged_adamw_8bit", "adamw"), train_on=("assistant", "all"),
                     compute_dtype=("auto", "float32", "bfloat16", "float16"),
                     lora_dtype=("auto", "float32", "bfloat16", "float16"))
# (setting, test, what it allows): every value outside these trains nothing or fails deep inside the run
TRAIN_RANGES = [(k, lambda v: v >= 1, "a whole number >= 1") for k in (
                    "max_steps", "batch_size", "grad_accum", "lora_r", "max_seq_len", "eval_interval", "eval_batches",
                    "log_interval", "keep_ckpts", "nproc")] + [
    (k, lambda v: v >= 0, "a whole number >= 0 (0: off)") for k in ("ckpt_interval", "eval_answers")] + [
    ("blocksize", lambda v: v in (32, 64, 128, 256, 512, 1024, 2048, 4096), "a power of two from 32 to 4096"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("lora_alpha", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("max_grad_norm", lambda v: v > 0, "a number > 0 (inf: no clipping)"),  # nan > 0 is False: refused too
    ("lora_dropout", lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "from 0 to 1"),
    ("beta1", lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    ("beta2", lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("seed", lambda v: 0 <= v < 2**62, "a whole number from 0 to 2**62-1")]  # seed + rank + epoch seed torch


def check_train(cfg, presets, linears):
    """train.py's Config: each setting alone, then the combinations that cannot run. Returns cfg."""
    cfg.resume = {"true": "latest", "1": "latest", "false": "", "0": ""}.get(cfg.resume.lower(), cfg.resume)
    if cfg.model not in presets:
        raise ConfigError(f"--model={cfg.model}: unknown model preset; valid presets: {', '.join(presets)}")
    check_choices(cfg, TRAIN_CHOICES)
    if cfg.offload_activations and not cfg.grad_checkpoint:
        raise ConfigError("--offload_activations=true moves the block inputs that gradient checkpointing keeps: "
                          "it needs --grad_checkpoint=true")
    check_ranges(cfg, TRAIN_RANGES)
    if cfg.target_modules != "all" and not set(cfg.target_modules.split(",")) <= set(linears):
        raise ConfigError(f"--target_modules takes all or a comma list of {','.join(linears)}, not "
                          f"{cfg.target_modules!r}")
    check_device(cfg.device)
    return cfg


def check_run(cfg, world):
    """What only a run (not --estimate) must also satisfy, given torchrun's number of processes."""
    if cfg.model != "tiny" and cfg.init_from in ("", "random"):
        raise ConfigError(f"--model={cfg.model} needs pretrained weights: pass --init_from=DIR (a Hugging Face, "
                          "Meta or bitsandbytes-4bit folder); only the tiny preset trains on a random base")
    if cfg.fsdp and world < 2:
        raise ConfigError("--fsdp=true shards the model over torchrun's processes: start it with torchrun "
                          "--nproc_per_node=N, N >= 2 (this is one process; without --fsdp it trains unsharded)")
    if cfg.nproc != 1:
        raise ConfigError(f"--nproc={cfg.nproc} is for --estimate; a run's processes are torchrun's --nproc_per_node")
    if cfg.fsdp and cfg.optimizer == "paged_adamw_8bit":
        raise ConfigError("--optimizer=paged_adamw_8bit with --fsdp=true is not built: its 8-bit states are blockwise "
                          "over a whole parameter, not over a rank's rows; use paged_adamw")


def check_base(cfg, base, data_dir):
    """Before anything loads: the base model's folder (None: a random base, which takes the data's tokenizer) fits
    the settings, and its tokenizer is one. Returns the tokenizer's path."""
    if base is not None and not base.is_dir():
        raise C.CheckpointError(
            f"weights for --model={cfg.model} not found: {base} is not a directory. Put the weights there: a "
            "Hugging Face folder (config.json + model.safetensors[.index.json] or pytorch_model.bin), a Meta folder "
            "(params.json + consolidated.NN.pth) or a bitsandbytes 4-bit folder (*-bnb-4bit), with its tokenizer")
    if base is not None and cfg.quant_type == "none" and (qc := C.is_bnb_4bit(base)):
        raise ConfigError(f"--quant_type=none is LoRA over 16/32-bit weights, but {base} is stored in 4 bits "
                          f"({qc.get('bnb_4bit_quant_type')}): pass a 16/32-bit base with --init_from")
    tok_path = find_tokenizer(base if base is not None else data_dir)
    tok = Tokenizer(tok_path)  # a file that is no tokenizer (an empty one, say) is refused here, before any loading
    args = C.load_args(base) if base is not None else M.get_args("tiny")
    if base is not None and tok.vocab_size > args.vocab_size:  # fewer is normal: embeddings padded to a round size
        raise ConfigError(f"{tok_path}: {tok.vocab_size} token ids, the model in {base} has only {args.vocab_size}: "
                          "not this model's tokenizer")
    if cfg.model != "tiny" and (want := M.get_args(cfg.model)).dim != args.dim:
        raise ConfigError(f"{base} holds a dim {args.dim} model, not {cfg.model} (dim {want.dim})")
    if cfg.max_seq_len > args.max_seq_len:
        raise ConfigError(f"--max_seq_len={cfg.max_seq_len} is longer than the base's context of {args.max_seq_len} "
                          f"positions ({base / 'config.json' if base is not None else 'the tiny preset'}): lower it")
    return tok_path


def check_data(cfg, meta, vocab_size, batches):
    """The prepared data fits the model and the settings: its ids are the model's, and some token is trained."""
    if vocab_size < meta["vocab_size"]:
        raise ConfigError(f"data/{cfg.data} was tokenized with {meta['vocab_size']} ids, the model has {vocab_size}")
    if not batches:
        raise ConfigError(f"data {cfg.data!r}: the train split yields no batch of {cfg.batch_size}")
    if not any(bool((y != IGNORE).any()) for _, y, _ in batches):
        raise ConfigError(f"--max_seq_len={cfg.max_seq_len} cuts off every trained token of data {cfg.data!r} (the "
                          "replies come after the prompts): nothing would be learned; raise it")


def make_deterministic():
    """What a CUDA run needs to repeat bit for bit (a CPU run already does): cuBLAS with a fixed workspace (read when
    its first handle is made, so before any CUDA work), deterministic kernels only (torch raises on an op that has
    none; scaled_dot_product_attention then picks a deterministic backward or errors), and no fused 4-bit matmul,
    whose autotuner may choose another tiling after a restart (kernels.matmul_4bit checks this flag)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
