# kernels.py is meant to be copied into another project as one file. Here it is copied ALONE into an empty
# folder and imported by a fresh interpreter that cannot see this project (python -I: no PYTHONPATH, no user
# site, not even the working directory on sys.path; only that folder is added). On CPU (the torch references,
# whatever triton is installed) it quantizes, builds a QuantState, dequantizes and multiplies, each result checked
# against the format's definition computed by hand, and it loads nothing of this project.
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])  # the folder holding only kernels.py
import torch
import kernels as K

torch.manual_seed(0)
# a 16-value table (sorted, 0 exact, like NF4's), a weight W (N, K) whose N * K = 300 is no multiple of the block
code = torch.cat([torch.linspace(-1, 0, 8)[:-1], torch.linspace(0, 1, 9)])
N, K_, bs = 12, 25, 64
w = torch.randn(N, K_)
packed, absmax = K.quantize_4bit(w, code, bs)
assert packed.dtype == torch.uint8 and packed.shape == ((N * K_ + 1) // 2,), packed.shape
nb = -(-N * K_ // bs)
assert absmax.dtype == torch.float32 and absmax.shape == (nb,)

# the layout by hand: element 2k in the HIGH nibble of byte k, block i = elements [i * bs, (i + 1) * bs)
flat = w.reshape(-1)
idx = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: N * K_].long()
block = torch.arange(N * K_) // bs
assert torch.equal(absmax, torch.stack([flat[i * bs:(i + 1) * bs].abs().max() for i in range(nb)]))
# each code is a nearest table value to w / absmax (the reference multiplies by the fp32 reciprocal)
scaled = flat * (1.0 / absmax)[block]
dist = (scaled[:, None] - code[None, :]).abs()
assert torch.all(dist.gather(1, idx[:, None])[:, 0] <= dist.min(dim=1).values + 1e-6)

q = K.QuantState(packed, absmax, code, (N, K_), torch.float32, bs)
W = K.dequantize_4bit(q)
assert W.shape == (N, K_) and W.dtype == torch.float32
assert torch.equal(W.reshape(-1), code[idx] * absmax[block]), "W != code[c] * absmax[block]"
assert K.dequantize_4bit(q, torch.bfloat16).dtype == torch.bfloat16
assert torch.all((W - w).abs().reshape(-1) <= absmax[block] * code.diff().max() / 2 + 1e-6)  # half a step

x = torch.randn(3, K_)
assert torch.equal(K.matmul_4bit(x, q), x @ W.T)
g = torch.randn(3, N)
assert torch.equal(K.matmul_4bit(g, q, transpose=True), g @ W)

# double quantization: absmax_i = nested_code[a_i] * nested_absmax[i // 256] + offset (fp32, two roundings)
a8 = torch.randint(0, 256, (nb,), dtype=torch.uint8)
nested_code, nested_absmax, offset = torch.linspace(-1, 1, 256), torch.rand(1) + 0.5, 0.25
qd = K.QuantState(packed, a8, code, (N, K_), torch.float32, bs, "nf4", nested_absmax, nested_code, offset)
scale = nested_code[a8.long()] * nested_absmax[0] + torch.tensor(offset)
assert torch.equal(K.dequantize_4bit(qd).reshape(-1), code[idx] * scale[block])

# nothing of the project was imported: only kernels.py from the folder, and torch / triton / the stdlib
root = sys.argv[2]
assert K.__file__ == sys.argv[1] + "/kernels.py", K.__file__
assert not {"qlora", "model", "train", "paged_adamw", "peers", "conftest"} & set(sys.modules)
assert not [m for m, mod in list(sys.modules.items())
            if (getattr(mod, "__file__", None) or "").startswith(root + "/")], "a project module loaded"
assert root not in sys.path and "" not in sys.path
print("ok")
"""


def test_kernels_py_works_alone(tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    shutil.copy(ROOT / "kernels.py", folder / "kernels.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, "-I", "-c", CHILD, str(folder), str(ROOT)], cwd=folder, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-4000:]
    assert [p.name for p in folder.iterdir() if p.name != "__pycache__"] == ["kernels.py"]


def test_kernels_py_imports_only_torch_triton_and_the_stdlib():
    tree = ast.parse((ROOT / "kernels.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), "a relative import"
    assert "torch" in names and names - {"torch", "triton"} <= sys.stdlib_module_names, names
    assert "__import__" not in (ROOT / "kernels.py").read_text() and "importlib" not in names
