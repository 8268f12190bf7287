"""Whether this CPU has what the compiled extension was built for.

A build with ``-march=native`` (the default when installing from source) may
use every instruction of the machine that compiled it. Carried to a CPU
without them (a pip cache shared across machines, a copied wheel), the
extension would end the process with an illegal instruction at its first
vector loop; ``import cbn`` checks first and raises ImportError instead.
"""

__all__ = ["first_cpu", "missing_features"]


def first_cpu(path="/proc/cpuinfo"):
    """The fields of the first CPU that ``path`` (Linux's /proc/cpuinfo) lists,
    as ``{"vendor_id": "AuthenticAMD", "flags": "fpu ...", ...}``; {} where
    there is no such file (other systems)."""
    fields = {}
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "processor" and fields:
                    break  # the next CPU: the first one said all it says
                fields.setdefault(key, value.strip())
    except (OSError, UnicodeDecodeError):
        pass
    return fields


def _cpu_flags(path):
    """The ``flags`` of the first CPU in ``path``, or None where there is no
    such file or line (other systems: not checked)."""
    flags = first_cpu(path).get("flags")
    return None if flags is None else set(flags.split())


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
