# The peers that the parity tests compare against live (transformers, peft, bitsandbytes, tiktoken) import beside our
# kernels.py, whose name transformers 5's own `kernels` dependency shares; and under CI none of them may be missing,
# so a parity test can never pass by skipping there.
import os
import subprocess
import sys

import pytest

import peers
from conftest import ROOT


@pytest.mark.parametrize("name", peers.PEERS)
def test_peer_imports_beside_our_kernels(name):
    if peers.installed(name) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing under CI: requirements-dev.txt installs it; its parity tests would skip")
        pytest.skip(f"{name} not installed: its parity tests skip")
    code = ("import sys, qlora, kernels, peers\n"  # ours first, as in the tests: then the peer, then ours again
            f"m = peers.import_peer({name!r})\n"
            "import kernels as k\n"
            "assert k is kernels is qlora.kernels, k\n"
            "assert hasattr(k, 'dequantize_4bit'), 'not our kernels.py'\n"
            "print(m.__version__)\n")
    if name in ("transformers", "peft"):  # the model transformers builds and reloads, as the parity tests do
        code += ("import tempfile, torch, transformers\n"
                 "cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, "
                 "num_attention_heads=4, vocab_size=64)\n"
                 "d = tempfile.mkdtemp()\n"
                 "transformers.LlamaForCausalLM(cfg).save_pretrained(d)\n"
                 "model = transformers.LlamaForCausalLM.from_pretrained(d)\n"
                 "model.train()\n"
                 "print(model(torch.tensor([[1, 2, 3]])).logits.shape)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines()[0] == peers.installed(name)


def test_plain_import_of_transformers_meets_the_shadow():
    """The failure import_peer exists for: a process started in this folder finds our kernels.py as `kernels`.
    Where transformers does not import `kernels` (before 5.x) the plain import works and there is nothing to show."""
    if peers.installed("transformers") is None or peers.installed("kernels") is None:
        pytest.skip("transformers with its kernels dependency is not installed: no shadowing to show")
    p = subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "kernels.py" in p.stderr, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "-P", "-c", "import transformers.integrations.hub_kernels"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)  # the README's advice for scripts of their own
    assert p.returncode == 0, p.stderr[-2000:]
