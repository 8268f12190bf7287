"""Control run: PyTorch against itself, measured exactly as bench.py measures cbn.

How far apart can two identical implementations land in one run of the
benchmark? For every default shape, dtype and op (one thread) this times
PyTorch's kernel twice, as two implementations in the same alternating rounds
and on the same buffers, with cbn between them, and prints the ratio of the
two PyTorch medians next to PyTorch over cbn. A target such as "at least as fast
as PyTorch on every case" cannot be told apart from noise where cbn and
PyTorch both run at the memory-bandwidth limit and the control ratio spreads
as wide as the margin.

Usage (unset the OpenBLAS variables for the run, as for bench.py):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/control.py [--json FILE]
"""

import statistics
import sys

from cbn import benchmark as B


def control(torch, config):
    """One dict per case: ``case``, ``torch_vs_torch`` and ``torch_over_cbn``."""
    out = []
    for spec in config.shapes:
        for dtype in config.dtypes:
            n = B._n_buffers(spec.nbytes(dtype), config)
            buf = B._Buffers(spec, dtype, n, torch)
            for op in config.ops:
                with B._Threads(1, torch), torch.no_grad():
                    fns = {"torch_a": B._case_functions("torch", op, spec, buf, 1, torch),
                           "cbn": B._case_functions("cbn", op, spec, buf, 1, torch),
                           "torch_b": B._case_functions("torch", op, spec, buf, 1, torch)}
                    t = B.time_interleaved(fns, n, rounds=config.rounds,
                                           target_time=config.target_time,
                                           min_repeats=config.min_repeats,
                                           max_repeats=config.max_repeats)
                a, b, c = t["torch_a"].median, t["torch_b"].median, t["cbn"].median
                row = {"case": f"{spec.name} {dtype} {op}", "torch_vs_torch": b / a,
                       "torch_over_cbn": a / c}
                print(f"{row['case']:36} torch/torch {b / a:6.3f}   torch/cbn {a / c:6.3f}",
                      flush=True)
                out.append(row)
            del buf
    return out


def main(argv=None):
    """Run the control and print a summary; returns the exit status."""
    save = B.side_measurement(__doc__, "write the per-case ratios as JSON", argv)
    torch = B._import_torch()
    if torch is None:
        print("PyTorch is not installed: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    config = B.BenchConfig(shapes=[B.parse_shape(s) for s in B.DEFAULT_SHAPES],
                           cache_bytes=B._last_level_cache_bytes())
    rows = control(torch, config)
    r = [row["torch_vs_torch"] for row in rows]
    wide = sum(abs(x - 1) > 0.05 for x in r)
    print(f"PyTorch against itself: {min(r):.3f} to {max(r):.3f} (median "
          f"{statistics.median(r):.3f}); {wide} of {len(r)} cases more than 5% from 1")
    save(cases=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
