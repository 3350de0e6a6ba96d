"""
The peer packages (transformers, peft, bitsandbytes, tiktoken) beside this project's kernels.py, for the tests,
bench.py and your own scripts that use both.

transformers 5 requires Hugging Face's `kernels` package and imports it, as the top-level module `kernels`, while
it loads. Python looks in the script's folder first, so a process started in this folder finds our kernels.py under
that name, and transformers fails with "cannot import name 'CUDAProperties' from 'kernels'". A module has one name
per process, so import_peer lends the name: Hugging Face's package holds it while transformers loads (transformers
keeps its own reference), then ours gets it back, so `import kernels` and our modules still mean this folder's file.

A script that needs transformers or peft and none of our files has a simpler way: `python -P script.py` (Python
3.11+ leaves the script's folder off the path), or run it from another folder.
"""
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from importlib.machinery import PathFinder
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PEERS = ("transformers", "peft", "bitsandbytes", "tiktoken")


def installed(name):
    """The installed version of a distribution, or None: an import error then is a break, not a missing package."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def hub_kernels():
    """Hugging Face's `kernels` package as a fresh module, found on the path without this folder; None if absent."""
    path = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    spec = PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # its own submodules import `kernels` while it runs
    spec.loader.exec_module(module)
    return module


def import_peer(name):
    """Import a peer package (or one of its modules) with Hugging Face's `kernels` under that name while it and
    transformers' module that imports `kernels` load; afterwards `kernels` is this folder's kernels.py again."""
    if name in sys.modules:
        return sys.modules[name]
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    ours = sys.modules.pop("kernels", None)
    try:
        if installed("kernels") and hub_kernels() is None:
            raise ImportError("the kernels package is installed but not found on sys.path")
        module = importlib.import_module(name)
        if "transformers" in sys.modules and importlib.util.find_spec("transformers.integrations.hub_kernels"):
            importlib.import_module("transformers.integrations.hub_kernels")  # its `from kernels import ...` runs now
    finally:
        sys.modules.pop("kernels", None)
        if ours is not None:
            sys.modules["kernels"] = ours
    return module
