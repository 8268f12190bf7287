"""cbn: batch normalization for NumPy, with the hot loops in Cython.

The layer is :class:`cbn.BatchNorm`; the stateless, validated functions are in
:mod:`cbn.functional`; :mod:`cbn.reference` is the plain NumPy oracle.
"""

try:
    from . import _kernels
except ImportError as exc:  # pragma: no cover - depends on how cbn was installed
    import os as _os

    raise ImportError(
        "cbn's compiled extension cbn._kernels could not be imported "
        f"({exc}). If you are running from a source checkout "
        f"({_os.path.dirname(_os.path.dirname(__file__))}), either install it "
        "(pip install .) and run from another directory, or build it in place "
        "(pip install -e .)."
    ) from exc

from . import functional, reference
from .layer import BatchNorm

__version__ = "0.1.0"
__all__ = ["BatchNorm", "functional", "reference", "build_info", "__version__"]


def build_info():
    """How the installed extension was built.

    Returns
    -------
    dict
        ``openmp``, ``max_threads``, ``debug`` (the ``CBN_DEBUG=1``
        bounds-checked build) and ``sanitized`` (AddressSanitizer/UBSan).
    """
    return _kernels.build_info()
