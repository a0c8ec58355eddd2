"""A benchmark script (``benchmarks/<name>.py``) loaded in a test as the module it is when run."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmark_script(name: str, *siblings: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` as the module ``name``, its folder first on sys.path as when it is run (so ``import common``
    and the scripts it imports work); on exit the module, the scripts named in ``siblings`` and the folder are removed again."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
        yield module
    finally:
        for loaded in (name, *siblings):
            sys.modules.pop(loaded, None)
        sys.path.remove(str(BENCHMARKS))
