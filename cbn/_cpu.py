"""Whether this CPU has what the compiled extension was built for.

A build with ``-march=native`` (the default when installing from source) may
use every instruction of the machine that compiled it. Carried to a CPU
without them (a pip cache shared across machines, a copied wheel), the
extension would end the process with an illegal instruction at its first
vector loop; ``import cbn`` checks first and raises ImportError instead.
"""

__all__ = ["missing_features"]


def _cpu_flags(path):
    """The ``flags`` of the first CPU in ``path`` (Linux's /proc/cpuinfo), or
    None where there is no such file or line (other systems: not checked)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def missing_features(isa=None, path="/proc/cpuinfo"):
    """The CPU features the extension was built for (``cbn._native.ISA``, or
    ``isa``) that this CPU lacks, in build order; [] if none or unknown."""
    if isa is None:
        try:
            from ._native import ISA as isa
        except ImportError:  # built without cbn's setup.py: nothing recorded
            return []
    if not isa:
        return []
    flags = _cpu_flags(path)
    if flags is None:
        return []
    return [f for f in isa if f not in flags]
