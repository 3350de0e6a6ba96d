# Shared test helpers: where the shared test assets live, and skips that say why.
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before any test module imports triton: Triton reads this flag at import
    os.environ.setdefault("TRITON_INTERPRET", "1")  # and decoration time; CPU tensors run kernels interpreted

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules are top-level files: import them from any working dir
ASSETS = ROOT.parent / "shared" / "assets"  # real third-party test assets, beside a clone (never copied in)


def asset(*parts):
    """Path to a shared asset, or skip the test with the reason if the folder is absent (a user's fresh clone)."""
    p = ASSETS.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test asset {p} not present (it lives beside the repo, see README)")
    return p


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
