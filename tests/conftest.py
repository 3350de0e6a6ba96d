# Shared test helpers: where the shared test assets live, and skips that say why.
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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter):
    """The versions the parity tests ran against (or that they skipped), under every run's result."""
    import peers
    found = [f"{n} {peers.installed(n) or 'not installed'}" for n in ("torch", "triton", *peers.PEERS, "kernels")]
    terminalreporter.write_line(f"peers: {', '.join(found)}")
