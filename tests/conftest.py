"""Shared fixtures."""

import gc
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def benchmark_script():
    """Load a script of ``benchmarks/`` (not a package) as a module: ``benchmark_script("control")``."""

    def load(name):
        path = BENCHMARKS / f"{name}.py"
        if not path.exists():  # tests copied away from the checkout, or an unpacked sdist
            pytest.skip(f"benchmarks/{name}.py is not beside the tests")
        spec = importlib.util.spec_from_file_location(f"cbn_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def empty_output_cache():
    """An empty output cache of 1 GiB for the test, restored (and emptied) afterwards."""
    import cbn

    gc.collect()
    cbn.empty_cache()
    previous = cbn.set_cache_limit(1 << 30)
    yield
    gc.collect()
    cbn.set_cache_limit(previous)
    cbn.empty_cache()
