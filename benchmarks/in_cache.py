"""In cache: cbn against PyTorch on inputs that stay in the cache, as in a network.

bench.py rotates its inputs through twice the last-level cache, so that every
call reads from memory. In a network, batch norm's x has just been written by
the layer before it (and backward's dy by the layer after), so arrays that fit
in the cache are read from there. This script times cbn and PyTorch on one set
of buffers, called again and again, for bench.py's shapes (or ``--shapes``),
both dtypes, the three ops, on ``--threads`` threads (default 1), and prints
effective GB/s under bench.py's byte model and PyTorch's time over cbn's.
Arrays larger than the cache come from memory here too.

The buffers are allocated one after another at equal sizes, as a trainer's
would be, so they usually share their offset within a page (the case where
four rows a power of two apart meet in the same cache sets; see
``_quarter`` in ``cbn/_kernels.pyx``).

Usage (unset the OpenBLAS variables for the run, as for bench.py):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/in_cache.py [--json FILE]
"""

import statistics
import sys

from cbn import benchmark as B


def measure(torch, spec, dtype, op, threads=1, *, repeats=3, rounds=5, target_time=0.15):
    """``{case, nbytes, cbn_gbps, torch_gbps, speedup_torch}`` for one case, no rotation."""
    buf = B._Buffers(spec, dtype, 1, torch)
    with B._Threads(threads, torch), torch.no_grad():
        fns = {impl: B._case_functions(impl, op, spec, buf, threads, torch)
               for impl in ("cbn", "torch")}
        runs = [B.time_interleaved(fns, 1, rounds=rounds, target_time=target_time)
                for _ in range(repeats)]
    t = {impl: statistics.median(r[impl].median for r in runs) for impl in fns}
    moved = B.BYTE_MODEL[op] * spec.nbytes(dtype)
    return {"case": f"{spec.name} {dtype} {op}", "threads": threads,
            "nbytes": spec.nbytes(dtype), "cbn_gbps": moved / t["cbn"] / 1e9,
            "torch_gbps": moved / t["torch"] / 1e9, "speedup_torch": t["torch"] / t["cbn"]}


def _options(p):
    p.add_argument("--shapes", type=B._shape_list, metavar="LIST",
                   help="comma-separated shapes (default: bench.py's)")
    p.add_argument("--threads", type=int, default=1, help="threads for both libraries")


def main(argv=None):
    """Measure every case, print a table and a summary; returns the exit status."""
    save = B.side_measurement(__doc__, "write the per-case results as JSON", argv, _options)
    args = save.args
    torch, status = B.side_torch(args)
    if torch is None:
        return status
    shapes = args.shapes or [B.parse_shape(s) for s in B.DEFAULT_SHAPES]
    rows = []
    for spec in shapes:
        for dtype in B.DTYPES:
            for op in B.OPS:
                row = measure(torch, spec, dtype, op, args.threads)
                rows.append(row)
                print(f"{row['case']:36} {row['nbytes'] / 2**20:6.1f} MiB  "
                      f"cbn {row['cbn_gbps']:5.1f} GB/s  torch {row['torch_gbps']:5.1f} GB/s  "
                      f"x{row['speedup_torch']:.2f}", flush=True)
    r = [row["speedup_torch"] for row in rows]
    print(f"in cache, {args.threads} thread(s): cbn at least as fast as PyTorch in "
          f"{sum(x >= 1 for x in r)} of {len(r)} cases; median x{statistics.median(r):.2f}, "
          f"lowest x{min(r):.2f}")
    save(threads=args.threads, cases=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
