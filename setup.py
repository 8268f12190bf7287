"""Build the one extension module, ``cbn._kernels``.

Metadata lives in ``pyproject.toml``; this file only declares the extension
and picks compiler flags that the compiler at hand actually accepts:

* ``-O3`` (at Debian's default ``-O2`` gcc vectorizes none of the loops) and
  ``-fno-trapping-math``: without it gcc will not if-convert the fused ReLU's
  select ``z > 0 ? dy : 0``, and that loop runs scalar and mispredicted, 35x
  slower. It changes no result (no reassociation, unlike ``-ffast-math``); it
  only lets the compiler ignore floating-point exception flags, which cbn
  never reads. ``-fno-math-errno`` likewise: ``sqrt`` need not set ``errno``
  (cbn never reads it), so the per-channel ``1/sqrt(var + eps)`` vectorizes;
* OpenMP when the compiler supports it, a clean sequential build otherwise
  (``cython.parallel.prange`` compiles to a plain loop without OpenMP);
* ``-march=native`` unless ``CBN_PORTABLE=1`` (set it when building a wheel
  for other machines; cibuildwheel builds are portable by themselves). A
  native build writes ``cbn/_native.py`` beside the extension: the CPU
  features (as Linux's /proc/cpuinfo names them) its code may use, which
  ``import cbn`` checks, so that a native build carried to a CPU without
  them (a shared pip cache, a copied wheel) raises ImportError instead of
  dying of an illegal instruction;
* ``CBN_DEBUG=1`` turns Cython's bounds, wraparound and initialization
  checks back on and adds AddressSanitizer/UBSan where the compiler has
  them; ``cbn.build_info()`` reports which build is installed.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("CBN_DEBUG", "") not in ("", "0")
# cibuildwheel makes wheels for other machines: never -march=native there.
PORTABLE = (os.environ.get("CBN_PORTABLE", "") not in ("", "0")
            or os.environ.get("CIBUILDWHEEL") == "1")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}


def _accepts(compiler, flags, link=False, source="int main(void){return 0;}\n"):
    """Whether ``compiler`` compiles (and, if asked, links) a probe with ``flags``."""
    tmp = tempfile.mkdtemp(prefix="cbn-probe-")
    try:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as fh:
            fh.write(source)
        objects = compiler.compile([path], output_dir=tmp, extra_postargs=flags)
        if link:
            compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=flags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Instruction-set macros that -march=native may define (x86).
ISA_MACRO = re.compile(r"#define __(AVX\w*|FMA|F16C|BMI2?|SSE4_[12]|SSSE3)__ 1")


def _cpu_flags():
    """The ``flags`` of the first CPU Linux lists, or an empty set: read by
    ``cbn/_cpu.py`` (loaded from its file: the package cannot be imported
    before its extension is built), the same reader ``import cbn`` uses."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cbn", "_cpu.py")
    spec = importlib.util.spec_from_file_location("_cbn_build_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._cpu_flags("/proc/cpuinfo") or set()


def _native_isa(compiler):
    """The CPU features, under /proc/cpuinfo's names, that ``-march=native``
    lets this compiler use here; () where that cannot be told (then nothing
    is checked at import). Only names this machine's cpuinfo lists are kept,
    so a name spelt otherwise there can never refuse the machine that built."""
    have = _cpu_flags()
    command = getattr(compiler, "compiler_so", None)
    if not have or not command:
        return ()
    try:
        macros = subprocess.run([command[0], "-march=native", "-dM", "-E", "-x", "c", os.devnull],
                                capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    need = set()
    for name in (m.lower() for m in ISA_MACRO.findall(macros)):
        # cpuinfo spells avx512vnni as avx512_vnni, bmi as bmi1
        for flag in (name, name.replace("avx512", "avx512_", 1), name + "1"):
            if flag in have:
                need.add(flag)
                break
    return tuple(sorted(need))


OPENMP_PROBE = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"


class BuildExt(build_ext):
    """``build_ext`` that cythonizes, then adds the optimisation, OpenMP and
    debug flags the compiler accepts."""

    def run(self):
        # Here rather than at import: pip runs setup.py three times for one
        # install (requirements, metadata, wheel), and only this one compiles.
        # The .pyx sources become .c in place: the Extension objects keep what
        # finalize_options set on them.
        for ext in self.extensions:
            ext.sources = cythonize(
                [ext],
                compiler_directives=DIRECTIVES,
                # A debug build must not reuse the optimised build's C file, and vice versa.
                force=True,
                quiet=True,
            )[0].sources
        super().run()

    def build_extensions(self):
        cc = self.compiler
        compile_args, link_args, macros = [], [], []
        isa = ()  # the CPU features a -march=native build may use (_native_isa)
        if cc.compiler_type == "msvc":
            compile_args += ["/O2", "/openmp"]
        else:
            # Silence the probes: a failing probe is an expected outcome.
            wanted = (["-O3", "-fno-trapping-math", "-fno-math-errno"] if not DEBUG
                      else ["-O1", "-g"])
            if not PORTABLE and not DEBUG:
                wanted.append("-march=native")
            for flag in wanted:
                if _accepts(cc, [flag]):
                    compile_args.append(flag)
            if "-march=native" in compile_args:
                isa = _native_isa(cc)
            if _accepts(cc, ["-fopenmp"], link=True, source=OPENMP_PROBE):
                compile_args.append("-fopenmp")
                link_args.append("-fopenmp")
            else:
                print("cbn: the compiler has no OpenMP; building single-threaded kernels")
            if DEBUG:
                san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
                if _accepts(cc, san, link=True):
                    compile_args += san
                    link_args += san
                    macros.append(("CBN_SANITIZED", "1"))
        if DEBUG:
            macros.append(("CBN_DEBUG_BUILD", "1"))
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + compile_args
            ext.extra_link_args = list(ext.extra_link_args or []) + link_args
            ext.define_macros = list(ext.define_macros or []) + macros
        super().build_extensions()
        self._write_native(isa, "-march=native" in compile_args)

    def _write_native(self, isa, native):
        """``cbn/_native.py`` beside the built extension (see the module docstring),
        and in the source tree for an in-place or editable build, which copies
        only the extension there."""
        folders = {os.path.dirname(self.get_ext_fullpath("cbn._kernels"))}
        if self.inplace or getattr(self, "editable_mode", False):
            folders.add(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cbn"))
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            self._write_native_file(os.path.join(folder, "_native.py"), isa, native)

    @staticmethod
    def _write_native_file(path, isa, native):
        with open(path, "w") as fh:
            fh.write('"""Written by setup.py: what the compiled extension was built for."""\n\n'
                     "# Built with -march=native (False: CBN_PORTABLE=1, a debug build, or a\n"
                     f"# compiler without it).\nNATIVE = {native!r}\n"
                     "# CPU features (/proc/cpuinfo names) its code may use; import cbn checks\n"
                     f"# them. Empty: nothing to check.\nISA = {tuple(isa)!r}\n")


# The direct calls (``*_call``) read ndarray fields through NumPy's C API.
extensions = [
    Extension(
        "cbn._kernels",
        ["cbn/_kernels.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})

if __name__ == "__main__" and len(sys.argv) == 1:
    print(__doc__)
