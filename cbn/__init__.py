"""cbn: batch normalization for NumPy, with the hot loops in Cython.

The layer is :class:`cbn.BatchNorm`; the stateless, validated functions are in
:mod:`cbn.functional`; :mod:`cbn.reference` is the plain NumPy oracle.
"""

from ._cpu import missing_features as _missing_features

_missing = _missing_features()
if _missing:  # checked before the extension loads: its first vector loop would crash
    raise ImportError(
        "cbn was compiled for another CPU (with -march=native, as installing from source "
        f"does unless CBN_PORTABLE=1): this one lacks {', '.join(_missing)}, and the "
        "extension would end the process with an illegal instruction. Reinstall it on this "
        "machine: pip install --force-reinstall --no-cache-dir --no-binary cbn cbn (from a "
        "checkout: pip install --force-reinstall --no-cache-dir .), or build a wheel for "
        "several machines with CBN_PORTABLE=1")

try:
    from . import _kernels
except ImportError as exc:  # pragma: no cover - depends on how cbn was installed
    import glob as _glob
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    # Without the extension file, Python's own words ("partially initialized
    # module ... circular import") would point the wrong way: not chained then.
    _source = not any(_glob.glob(_os.path.join(_here, "_kernels*" + ext))
                      for ext in (".so", ".pyd"))
    _why = f"{_here} is cbn's source folder, without the compiled extension" if _source else exc
    _error = ImportError(
        f"cbn's compiled extension cbn._kernels could not be imported ({_why}). "
        "If you are running from a source checkout "
        f"({_os.path.dirname(_here)}), either install it "
        "(pip install .) and run from another directory, or build it in place "
        "(pip install -e .)."
    )
    raise _error from (None if _source else exc)

from . import functional, reference
from .functional import cache_info, empty_cache, set_cache_limit
from .layer import BatchNorm, is_grad_enabled, no_grad

__version__ = "0.1.0"

# Loaded on first use (PEP 562), so that ``import cbn`` stays as light as the
# layer needs while ``cbn.nn.mlp`` works after it, as ``torch.nn`` does.
_SUBMODULES = ("data", "io", "nn", "optim", "testing", "trainer")


def __getattr__(name):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cbn' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES])
__all__ = ["BatchNorm", "functional", "reference", "build_info", "cache_info", "empty_cache",
           "is_grad_enabled", "no_grad", "set_cache_limit", "__version__"]


def build_info():
    """How the installed extension was built.

    Returns
    -------
    dict
        ``openmp``, ``max_threads``, ``debug`` (the ``CBN_DEBUG=1``
        bounds-checked build), ``sanitized`` (AddressSanitizer/UBSan),
        ``native`` (built with ``-march=native``: for this machine's CPU,
        not one to copy elsewhere; None if unrecorded) and ``isa`` (the CPU
        features such a build may use, which ``import cbn`` checks).
    """
    info = dict(_kernels.build_info())
    try:
        from . import _native
    except ImportError:
        info.update(native=None, isa=())
    else:
        info.update(native=_native.NATIVE, isa=tuple(_native.ISA))
    return info
