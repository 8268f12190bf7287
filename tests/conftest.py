"""Shared fixtures."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def benchmark_script():
    """Load a script of ``benchmarks/`` (not a package) as a module: ``benchmark_script("control")``."""

    def load(name):
        spec = importlib.util.spec_from_file_location(f"cbn_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
