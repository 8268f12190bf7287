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
  for other machines);
* ``CBN_DEBUG=1`` turns Cython's bounds, wraparound and initialization
  checks back on and adds AddressSanitizer/UBSan where the compiler has
  them; ``cbn.build_info()`` reports which build is installed.
"""

import os
import shutil
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("CBN_DEBUG", "") not in ("", "0")
PORTABLE = os.environ.get("CBN_PORTABLE", "") not in ("", "0")

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


OPENMP_PROBE = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"


class BuildExt(build_ext):
    """``build_ext`` that adds the optimisation, OpenMP and debug flags the compiler accepts."""

    def build_extensions(self):
        cc = self.compiler
        compile_args, link_args, macros = [], [], []
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


# The direct calls (``*_call``) read ndarray fields through NumPy's C API.
extensions = [
    Extension(
        "cbn._kernels",
        ["cbn/_kernels.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=DIRECTIVES,
        # A debug build must not reuse the optimised build's C file, and vice versa.
        force=True,
        quiet=True,
    ),
    cmdclass={"build_ext": BuildExt},
)

if __name__ == "__main__" and len(sys.argv) == 1:
    print(__doc__)
