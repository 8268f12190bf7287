"""NCHW views of channels-last memory: cbn where they lie, against a copy to C order first.

A trainer that keeps its activations channels-last (NHWC) and hands cbn the
NCHW view ``a.transpose(0, 3, 1, 2)`` (PyTorch's ``channels_last`` memory
format, seen from NumPy) gives cbn a batch whose values fill one block in
another order of the axes. cbn normalizes such a batch where it lies and lays
its results out the same way; before, it copied the batch to C order first.
This script times, in one process and in alternating rounds on one thread, the
training forward, the evaluation forward and the backward of each case three
ways: cbn on the view (``view``), cbn on a C-ordered copy made in the timed
call (``copied``: what cbn did before), and PyTorch's ``F.batch_norm`` on the
same memory as a ``channels_last`` tensor (backward: ``torch.ops.aten.
native_batch_norm_backward``), if installed. Inputs rotate over four buffers.

Usage (unset the OpenBLAS variables for the run, as for bench.py):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/layouts.py [--json FILE]
"""

import sys

import numpy as np

from cbn import benchmark as B
from cbn import functional as F

DEFAULT_CASES = ("32x64x56x56:float32", "32x64x56x56:float64", "8x256x28x28:float32",
                 "64x16x32x32:float32")
OPS = ("fwd-train", "fwd-eval", "backward")
BUFFERS = 4


def _nchw(spec):
    """Refuse a shape that is not N x C x H x W."""
    if spec.channels_last or len(spec.shape) != 4:
        raise ValueError("give an NCHW shape, N x C x H x W")


def _case(text):
    """``SHAPE:DTYPE`` of an NCHW batch as ``(shape tuple, dtype name)``."""
    spec, dtype = B.parse_case(text, _nchw)
    return spec.shape, dtype


def views(shape, dtype, rng, n=BUFFERS):
    """``n`` NCHW views of channels-last (NHWC) arrays of random values."""
    N, C, H, W = shape
    return [rng.standard_normal((N, H, W, C)).astype(dtype).transpose(0, 3, 1, 2)
            for _ in range(n)]


def cbn_calls(xs, dys, copy):
    """``{op: fn(i)}`` of cbn on buffer ``i``; with ``copy``, x and dy are first
    copied to C order in the call, as cbn did with such views before."""
    prep = np.ascontiguousarray if copy else (lambda a: a)
    mean, var = F.batch_stats(xs[0])
    return {
        "fwd-train": lambda i: F.batch_norm_train(prep(xs[i])),
        "fwd-eval": lambda i: F.batch_norm_eval(prep(xs[i]), mean, var),
        "backward": lambda i: F.batch_norm_backward(prep(dys[i]), prep(xs[i]), mean, var),
    }


def torch_calls(torch, xs, dys):
    """``{op: fn(i)}`` of PyTorch on the same memory as ``channels_last`` tensors."""
    def tensor(a):  # the NHWC array under the view, seen as NCHW by torch
        return torch.from_numpy(a.transpose(0, 2, 3, 1)).permute(0, 3, 1, 2)

    tx, tdy = [tensor(x) for x in xs], [tensor(d) for d in dys]
    assert tx[0].is_contiguous(memory_format=torch.channels_last)
    C = xs[0].shape[1]
    dtype = tx[0].dtype
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    w = torch.ones(C, dtype=dtype)
    save_mean, save_invstd = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    bn = torch.nn.functional.batch_norm
    back = torch.ops.aten.native_batch_norm_backward
    return {
        "fwd-train": lambda i: bn(tx[i], None, None, training=True),
        "fwd-eval": lambda i: bn(tx[i], rm, rv, training=False),
        "backward": lambda i: back(tdy[i], tx[i], w, rm, rv, save_mean, save_invstd, True,
                                   1e-5, [True, True, True]),
    }


def measure(shape, dtype, torch=None, *, rounds=5, target_time=1.0):
    """Median times (ms) of each op three ways, and cbn's speed-ups, for one case."""
    rng = np.random.default_rng()
    xs, dys = views(shape, dtype, rng), views(shape, dtype, rng)
    impls = {"view": cbn_calls(xs, dys, False), "copied": cbn_calls(xs, dys, True)}
    if torch is not None:
        impls["torch"] = torch_calls(torch, xs, dys)
    rows = []
    with B._Threads(1, torch):
        for op in OPS:
            fns = {name: (calls[op], None) for name, calls in impls.items()}
            times = B.time_interleaved(fns, BUFFERS, rounds=rounds, target_time=target_time,
                                       min_repeats=rounds, warmup=2)
            ms = {name: t.median * 1e3 for name, t in times.items()}
            row = {"case": "x".join(map(str, shape)) + f" {dtype}", "op": op, "ms": ms,
                   "speedup_copied": ms["copied"] / ms["view"]}
            if "torch" in ms:
                row["speedup_torch"] = ms["torch"] / ms["view"]
            rows.append(row)
    return rows


def _line(row):
    ms = row["ms"]
    text = (f"{row['case']:24} {row['op']:9}  view {ms['view']:8.3f} ms   copied "
            f"{ms['copied']:8.3f} ms (x{row['speedup_copied']:.2f})")
    if "torch" in ms:
        text += f"   torch channels_last {ms['torch']:8.3f} ms (x{row['speedup_torch']:.2f})"
    return text


def main(argv=None):
    """Measure each case, print a line per op; returns the exit status."""
    cases, torch, args = B.case_command(__doc__, DEFAULT_CASES, _case, argv)
    allocator = B.steady_allocator()
    rows = []
    for shape, dtype in cases:
        for row in measure(shape, dtype, torch):
            rows.append(row)
            print(_line(row), flush=True)
    if args.json:
        B.write_record(args.json, allocator, cases=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
