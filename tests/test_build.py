"""The build records what it compiled for, and import refuses a CPU without it."""

import os
import pathlib
import subprocess
import sys

import pytest

import cbn
from cbn import _cpu

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2
processor\t: 1
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2
"""


def test_missing_features_compares_the_build_with_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert _cpu.missing_features(("avx", "avx2", "fma"), info) == []
    assert _cpu.missing_features(("avx2", "avx512f", "avx512bw"), info) == ["avx512f", "avx512bw"]
    assert _cpu.missing_features((), info) == []  # a portable build: nothing to check
    assert _cpu.missing_features(("avx512f",), tmp_path / "absent") == []  # not Linux: unknown
    info.write_text("processor\t: 0\n")
    assert _cpu.missing_features(("avx512f",), info) == []  # no flags line: unknown


def test_the_installed_build_fits_this_cpu_and_says_how_it_was_built():
    info = cbn.build_info()
    assert info["native"] in (True, False, None)
    if info["native"] is False or info["debug"]:
        assert info["isa"] == ()
    assert _cpu.missing_features(info["isa"]) == []  # it imported here, after all


def test_import_refuses_a_cpu_without_the_build_features():
    """A native build carried to an older CPU would die of SIGILL at its first loop."""
    code = ("import sys, types\n"
            "sys.modules['cbn._native'] = types.SimpleNamespace(NATIVE=True, "
            "ISA=('avx', 'avx1024x'))\n"
            "import cbn\n")
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo: the check does not run on this system")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.__file__)))
    assert proc.returncode == 1
    assert "ImportError: cbn was compiled for another CPU" in proc.stderr
    assert "lacks avx1024x" in proc.stderr and "CBN_PORTABLE=1" in proc.stderr


def test_submodules_load_on_first_use():
    code = ("import sys, cbn\n"
            "assert 'cbn.trainer' not in sys.modules\n"
            "assert cbn.nn.mlp and cbn.optim.Adam and cbn.data.load_digits and cbn.trainer.fit\n"
            "assert {'nn', 'optim', 'data', 'trainer'} <= set(dir(cbn))\n"
            "try:\n    cbn.nope\nexcept AttributeError as e:\n    assert 'nope' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.__file__)))
    assert proc.returncode == 0, proc.stderr


def test_importing_the_uncompiled_source_folder_says_so(tmp_path):
    """``python -m cbn`` in a checkout's root imports its source folder, which has
    no extension: the error names that, not Python's "partially initialized
    module ... circular import", which points the wrong way."""
    src = os.path.dirname(os.path.abspath(cbn.__file__))
    pkg = tmp_path / "cbn"
    pkg.mkdir()
    for name in ("__init__.py", "_cpu.py"):
        (pkg / name).write_bytes(pathlib.Path(src, name).read_bytes())
    # Only the path finder: an editable install's finder would find the
    # checkout's extension by its full name and hide the error.
    code = ("import importlib.machinery as m, sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if f in "
            "(m.BuiltinImporter, m.FrozenImporter, m.PathFinder)]\n"
            "import cbn\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env=os.environ.copy(), check=False)
    assert run.returncode != 0
    assert f"({pkg} is cbn's source folder, without the compiled extension)" in run.stderr
    assert "pip install ." in run.stderr
    assert "circular import" not in run.stderr
