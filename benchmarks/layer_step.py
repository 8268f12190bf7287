"""Large layer steps: cbn's output cache against fresh pages, and PyTorch's module.

A NumPy trainer calls the layer, which allocates y (forward) and dx (backward).
glibc's malloc maps a block of 32 MiB or more afresh for each request and unmaps
it at free, so every such output page-faults on its first write; cbn keeps the
blocks its released outputs leave (``cbn.set_cache_limit``, ``cbn.empty_cache``).
This script times a training step ``y = bn(x); dx = bn.backward(dy)`` of
``cbn.BatchNorm`` in one process, in alternating rounds: with the cache (the
default), without it (``cbn.set_cache_limit(0)``), and PyTorch's ``BatchNorm1d``
/ ``2d`` / ``3d`` forward with autograd's backward, all on one thread. The
previous step's outputs stay alive while the next are made, as in a loop that
rebinds its names. It also counts the minor page faults of one step of each.
glibc's allocator is left as a user's process has it (bench.py fixes its
thresholds, which hides this cost from both libraries there).

Usage (unset the OpenBLAS variables for the run, as for bench.py):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/layer_step.py [--json FILE]
"""

import resource
import sys

import numpy as np

import cbn
from cbn import benchmark as B

DEFAULT_CASES = ("32x64x112x112:float32", "32x64x56x56:float64", "32x64x56x56:float32")


def _modules_take(spec):
    """Refuse a shape PyTorch's BatchNorm modules do not take."""
    if spec.channels_last or len(spec.shape) > 5:
        raise ValueError("the channels must be axis 1 of 2 to 5 dimensions (as torch's modules)")


def _case(text):
    """``SHAPE:DTYPE`` (channels on axis 1) as ``(ShapeSpec, dtype name)``."""
    return B.parse_case(text, _modules_take)


def _cbn_step(x, dy, limit):
    """``(step, setup)`` of a cbn layer step with the cache limited to ``limit``."""
    bn = cbn.BatchNorm(x.shape[1], dtype=x.dtype)
    kept = {}

    def setup(_):
        cbn.set_cache_limit(limit)

    def step(_):
        kept["y"] = bn(x)
        kept["dx"] = bn.backward(dy)
        return kept

    return step, setup


def _torch_step(torch, x, dy):
    """``(step, setup)`` of PyTorch's module forward and autograd backward."""
    module = {3: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
              5: torch.nn.BatchNorm3d}[x.ndim]
    bn = module(x.shape[1], dtype=getattr(torch, str(x.dtype)))
    tx = torch.from_numpy(x).requires_grad_(True)
    tdy = torch.from_numpy(dy)
    kept = {}

    def setup(_):
        # a fresh gradient each step (accumulating would add a pass), the old one
        # kept alive until the new one exists, as cbn's dx is
        kept["grad"] = tx.grad
        tx.grad = bn.weight.grad = bn.bias.grad = None

    def step(_):
        kept["y"] = bn(tx)
        kept["y"].backward(tdy)

    return step, setup


def _faults(step, setup):
    """Minor page faults of a call of ``step`` after one untimed call (the
    variant timed before may have emptied the cache)."""
    setup(0)
    step(0)
    setup(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def measure(spec, dtype, torch=None, *, rounds=5, target_time=1.5):
    """Median step times (ms) and page faults per step of each variant of one case."""
    rng = np.random.default_rng()
    x = rng.standard_normal(spec.shape).astype(dtype)
    dy = rng.standard_normal(spec.shape).astype(dtype)
    limit = cbn.cache_info()["limit"]
    fns = {"cached": _cbn_step(x, dy, limit), "fresh": _cbn_step(x, dy, 0)}
    if torch is not None:
        fns["torch"] = _torch_step(torch, x, dy)
    with B._Threads(1, torch):
        times = B.time_interleaved(fns, 1, rounds=rounds, target_time=target_time,
                                   min_repeats=rounds, warmup=2)
        faults = {name: _faults(*fn) for name, fn in fns.items()}
    cbn.set_cache_limit(limit)
    row = {"case": f"{spec.name} {dtype}", "nbytes": spec.nbytes(dtype),
           "ms": {name: t.median * 1e3 for name, t in times.items()},
           "faults": faults}
    row["cache_speedup"] = times["fresh"].median / times["cached"].median
    if torch is not None:
        row["speedup_torch"] = times["torch"].median / times["cached"].median
    return row


def _line(row):
    ms, f = row["ms"], row["faults"]
    text = (f"{row['case']:28} {row['nbytes'] / 2**20:6.1f} MiB  cbn {ms['cached']:7.2f} ms "
            f"({f['cached']} faults), without the cache {ms['fresh']:7.2f} ms ({f['fresh']}): "
            f"x{row['cache_speedup']:.2f}")
    if "torch" in ms:
        text += f"; torch {ms['torch']:7.2f} ms ({f['torch']}): x{row['speedup_torch']:.2f}"
    return text


def main(argv=None):
    """Measure each case, print a line per case; returns the exit status."""
    cases, torch, args = B.case_command(__doc__, DEFAULT_CASES, _case, argv)
    rows = []
    for spec, dtype in cases:
        rows.append(measure(spec, dtype, torch))
        print(_line(rows[-1]), flush=True)
    if args.json:
        B.write_record(args.json, {"untouched": "glibc's defaults, as in a user's process"},
                       cases=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
