"""Loop clones: PyTorch's evaluation loop compiled here, timed against PyTorch itself.

A control for evaluation on rows (N, C), where cbn and PyTorch both run at the
memory-bandwidth limit and the benchmark has found cbn anywhere from 0.8x to
1.2x PyTorch from one process to the next (4096x256). PyTorch's kernel there
(``batch_norm_cpu_channels_last_impl``) is one loop per row, ``y = x * alpha +
beta`` on 256-bit vectors. This script compiles that loop in C with the system
compiler and times it on the same buffers as PyTorch, in the same alternating
rounds as ``bench.py``:

* ``plain``: the loop as PyTorch's source writes it (``-O3 -mavx2 -mfma``);
* ``paced``: the same plus one load of a volatile byte per vector. PyTorch's
  compiled loop reloads two of its pointers from memory on every iteration
  (seen with ``perf annotate``); this gives the plain loop such a load.

``cbn`` (``forward_eval``) and ``np.copyto`` of the same size run in the same
rounds. Where the buffers land in physical memory differs from one process to
the next, so each measurement runs in a fresh process (``--processes``); each
line printed is one process, every contender's speed over PyTorch's.

If the plain clone trails PyTorch, the same instructions measure differently
in PyTorch's binary and outside it, and a "cbn vs PyTorch" ratio within that
distance of 1 says nothing about either library.

Needs an x86-64 C compiler with AVX2 and FMA (``$CC`` or ``cc``) and PyTorch.

Usage (unset the OpenBLAS variables for the run, as for bench.py):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/loop_clone.py [--json FILE]
"""

import argparse
import ctypes
import json
import platform
import statistics
import sys
import tempfile

import numpy as np

from cbn import benchmark as B

SOURCE = r"""
#include <stddef.h>
#include <immintrin.h>
static volatile char pace_sink;
#define ROWS(NAME, T, V, LOAD, STORE, FMA, W, PACE)                               \
void NAME(const T* x, T* y, ptrdiff_t rows, ptrdiff_t n, const T* a, const T* c) { \
    for (ptrdiff_t r = 0; r < rows; r++) {                                        \
        const T* xr = x + r * n;                                                  \
        T* yr = y + r * n;                                                        \
        ptrdiff_t i = 0;                                                          \
        for (; i + W <= n; i += W) {                                              \
            STORE(yr + i, FMA(LOAD(xr + i), LOAD(a + i), LOAD(c + i)));           \
            if (PACE) (void)pace_sink;                                            \
        }                                                                         \
        for (; i < n; i++) yr[i] = xr[i] * a[i] + c[i];                           \
    }                                                                             \
}
ROWS(plain_f, float, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, 8, 0)
ROWS(paced_f, float, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, 8, 1)
ROWS(plain_d, double, __m256d, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_fmadd_pd, 4, 0)
ROWS(paced_d, double, __m256d, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_fmadd_pd, 4, 1)
"""
CLONES = ("plain", "paced")
DEFAULT_SHAPES = ("4096x256",)


def compile_clones(workdir):
    """Compile SOURCE into ``workdir``; return the loaded library, or raise RuntimeError."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the clones are x86-64 code; this is {platform.machine()}")
    return B.compile_c(workdir, "clone", SOURCE, ["-O3", "-mavx2", "-mfma"], "the clones")


def _pointer(a):
    return ctypes.c_void_p(a.ctypes.data)


def clone_functions(lib, dtype):
    """Name -> ``lib``'s clone in ``dtype``, called ``fn(x, y, rows, n, a, c)`` with
    pointers (``ctypes.c_void_p``) and ints: y = x * a + c row by row."""
    suffix = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}[np.dtype(dtype)]
    fns = {}
    for name in CLONES:
        fn = getattr(lib, f"{name}_{suffix}")
        # declared, so that rows and n go as ptrdiff_t (undeclared, ctypes passes int)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_ssize_t,
                       ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = None
        fns[name] = fn
    return fns


def run_clone(fn, x, y, a, c):
    """``fn`` (from :func:`clone_functions`) on C-contiguous (N, C) arrays x and y,
    and (C,) arrays a and c."""
    fn(_pointer(x), _pointer(y), x.shape[0], x.shape[1], _pointer(a), _pointer(c))


def agrees(y, x, a, c):
    """Whether y is x * a + c to the rounding of its dtype (float64 reference)."""
    expected = x.astype(np.float64) * a + c
    tol = 4 * np.finfo(y.dtype).eps * (np.abs(x * a.astype(np.float64)) + np.abs(c)).max()
    return bool(np.allclose(y, expected, rtol=0, atol=tol))


def _rows_only(spec):
    """Raise ValueError unless ``spec`` is an (N, C) shape: the clones are row loops."""
    if len(spec.shape) != 2 or spec.channels_last:
        raise ValueError(f"rows (N, C) only, got {spec.name}")


def measure(torch, lib, spec, dtype, config):
    """Median times (seconds) of every contender on one 2-D case, in one process."""
    _rows_only(spec)
    N, C = spec.shape
    n = B._n_buffers(spec.nbytes(dtype), config)
    buf = B._Buffers(spec, dtype, n, torch)
    alpha = (buf.gamma / np.sqrt(buf.var + B.EPS)).astype(dtype)
    shift = (buf.beta - buf.mean * alpha).astype(dtype)
    xs, ys = [_pointer(x) for x in buf.xs], [_pointer(y) for y in buf.outs]
    a, c = _pointer(alpha), _pointer(shift)
    fns = {"torch": B._case_functions("torch", "fwd-eval", spec, buf, 1, torch)}
    for name, fn in clone_functions(lib, dtype).items():
        run_clone(fn, buf.xs[0], buf.outs[0], alpha, shift)
        if not agrees(buf.outs[0], buf.xs[0], alpha, shift):
            raise RuntimeError(f"the {name} clone computes something else")
        # pointers made once: the timing should not include their wrapping
        fns[name] = ((lambda i, fn=fn: fn(xs[i], ys[i], N, C, a, c)), None)
    fns["cbn"] = B._case_functions("cbn", "fwd-eval", spec, buf, 1, torch)
    fns["copy"] = ((lambda i: np.copyto(buf.outs[i], buf.xs[i])), None)
    with B._Threads(1, torch), torch.no_grad():
        t = B.time_interleaved(fns, n, rounds=config.rounds, target_time=config.target_time,
                               min_repeats=config.min_repeats, max_repeats=config.max_repeats)
    return {k: v.median for k, v in t.items()}


def child(args):
    """One process: measure every case, print one JSON line per case."""
    torch, status = B.side_torch(args, ("processes",))
    if torch is None:
        return status
    config = B.BenchConfig(shapes=args.shapes, dtypes=args.dtypes, target_time=args.target_time,
                           cache_bytes=B._last_level_cache_bytes())
    with tempfile.TemporaryDirectory() as d:
        lib = compile_clones(d)
        for spec in config.shapes:
            for dtype in config.dtypes:
                t = measure(torch, lib, spec, dtype, config)
                print(json.dumps({"case": f"{spec.name} {dtype}",
                                  "over_torch": {k: t["torch"] / v for k, v in t.items()
                                                 if k != "torch"},
                                  "torch_s": t["torch"]}), flush=True)
    return 0


def _options(p):
    p.add_argument("--shapes", type=B._shape_list, metavar="LIST",
                   default=[B.parse_shape(s) for s in DEFAULT_SHAPES],
                   help="comma-separated (N, C) shapes (default: 4096x256)")
    p.add_argument("--dtypes", type=B._csv("dtype", B.DTYPES), metavar="LIST",
                   default=list(B.DTYPES), help="float32,float64")
    p.add_argument("--processes", type=int, default=6, help="fresh processes, one measurement each")
    p.add_argument("--target-time", type=float, default=B.BenchConfig.target_time,
                   help="seconds of timed calls per contender and case")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def main(argv=None):
    """Run ``--processes`` children and summarize; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    save = B.side_measurement(__doc__, "write every process's ratios as JSON", argv, _options)
    args = save.args
    if args.child:
        return child(args)
    torch, status = B.side_torch(args, ("processes",))
    if torch is None:
        return status
    if B.refuse_shapes(args.shapes, _rows_only):
        return 2
    try:
        with tempfile.TemporaryDirectory() as d:
            compile_clones(d)  # fail here, once, rather than in every child
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1

    def show(row):
        print(f"process {row['process'] + 1}  {row['case']:18} " + "  ".join(
            f"{k} {v:.2f}" for k, v in row["over_torch"].items())
            + f"  (PyTorch {row['torch_s'] * 1e6:.0f} us)", flush=True)

    rows, status = B.run_children(__file__, argv, args.processes, show)
    if rows is None:
        return status
    print("speed over PyTorch's, median [range] over the processes:")
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r["over_torch"] for r in rows if r["case"] == case]
        print(f"  {case:18} " + "  ".join(
            f"{k} {statistics.median(m[k] for m in mine):.2f} "
            f"[{min(m[k] for m in mine):.2f}-{max(m[k] for m in mine):.2f}]"
            for k in mine[0]))
    save(processes=args.processes, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
