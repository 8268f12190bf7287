"""Control run: PyTorch against itself, measured exactly as bench.py measures cbn.

How far apart can two identical implementations land in one run of the
benchmark? For every case (default: bench.py's shapes, both dtypes, all three
ops, one thread) this times PyTorch's kernel twice, as two implementations in
the same alternating rounds and on the same buffers, with cbn between them,
and prints the ratio of the two PyTorch medians next to PyTorch over cbn. A
target such as "at least as fast as PyTorch on every case" cannot be told
apart from noise where cbn and PyTorch both run at the memory-bandwidth limit
and the control ratio spreads as wide as the margin.

``--repeats N`` measures each case N times over and reports the median and the
range of both ratios; a case where cbn trails PyTorch by more than PyTorch's
widest distance from itself is counted as trailing beyond the control.
``--shapes``, ``--dtypes``, ``--ops`` and ``--threads`` narrow it down to the
cases in question, e.g.

    python benchmarks/control.py --shapes 4096x256,8x256x28x28 --ops fwd-eval --repeats 9

Usage (unset the OpenBLAS variables for the run, as for bench.py):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/control.py [--json FILE]
"""

import statistics
import sys

from cbn import benchmark as B


def _measure(torch, spec, dtype, op, buf, n, threads, config):
    """One alternating measurement: PyTorch's time twice, and cbn's (medians, seconds)."""
    with B._Threads(threads, torch), torch.no_grad():
        fns = {"torch_a": B._case_functions("torch", op, spec, buf, threads, torch),
               "cbn": B._case_functions("cbn", op, spec, buf, threads, torch),
               "torch_b": B._case_functions("torch", op, spec, buf, threads, torch)}
        t = B.time_interleaved(fns, n, rounds=config.rounds, target_time=config.target_time,
                               min_repeats=config.min_repeats, max_repeats=config.max_repeats)
    return t["torch_a"].median, t["torch_b"].median, t["cbn"].median


def _row(case, threads, runs):
    """The record of one case from its ``(torch_a, torch_b, cbn)`` measurements."""
    vs = [b / a for a, b, _ in runs]
    over = [a / c for a, _, c in runs]
    spread = max(abs(1 - v) for v in vs)
    return {"case": case, "threads": threads,
            "torch_vs_torch": statistics.median(vs), "torch_over_cbn": statistics.median(over),
            "torch_vs_torch_runs": vs, "torch_over_cbn_runs": over,
            "trails_beyond_control": 1 - statistics.median(over) > spread}


def control(torch, config, threads=1, repeats=1):
    """One dict per case: ``case``, ``torch_vs_torch``, ``torch_over_cbn`` (medians over
    ``repeats`` measurements), the measurements themselves (``*_runs``) and
    ``trails_beyond_control``: cbn's deficit is larger than PyTorch's widest
    distance from itself."""
    out = []
    for spec in config.shapes:
        for dtype in config.dtypes:
            n = B._n_buffers(spec.nbytes(dtype), config)
            buf = B._Buffers(spec, dtype, n, torch)
            for op in config.ops:
                runs = [_measure(torch, spec, dtype, op, buf, n, threads, config)
                        for _ in range(max(1, int(repeats)))]
                row = _row(f"{spec.name} {dtype} {op}", threads, runs)
                line = (f"{row['case']:36} t{threads} torch/torch {row['torch_vs_torch']:6.3f}"
                        f"   torch/cbn {row['torch_over_cbn']:6.3f}")
                if len(runs) > 1:
                    vs, over = row["torch_vs_torch_runs"], row["torch_over_cbn_runs"]
                    line += (f"   (ranges {min(vs):.3f}-{max(vs):.3f}, "
                             f"{min(over):.3f}-{max(over):.3f})")
                print(line, flush=True)
                out.append(row)
            del buf
    return out


def _options(p):
    p.add_argument("--shapes", type=B._shape_list, metavar="LIST",
                   help="comma-separated shapes (default: bench.py's)")
    p.add_argument("--dtypes", type=B._csv("dtype", B.DTYPES), metavar="LIST",
                   default=list(B.DTYPES), help="float32,float64")
    p.add_argument("--ops", type=B._csv("op", B.OPS), metavar="LIST", default=list(B.OPS),
                   help=",".join(B.OPS))
    p.add_argument("--threads", type=int, default=1, help="threads for both libraries")
    p.add_argument("--repeats", type=int, default=1,
                   help="measurements per case (median and range reported)")


def main(argv=None):
    """Run the control and print a summary; returns the exit status."""
    save = B.side_measurement(__doc__, "write the per-case ratios as JSON", argv, _options)
    args = save.args
    torch, status = B.side_torch(args, ("threads", "repeats"))
    if torch is None:
        return status
    config = B.BenchConfig(shapes=args.shapes or [B.parse_shape(s) for s in B.DEFAULT_SHAPES],
                           dtypes=args.dtypes, ops=args.ops,
                           cache_bytes=B._last_level_cache_bytes())
    rows = control(torch, config, threads=args.threads, repeats=args.repeats)
    r = [row["torch_vs_torch"] for row in rows]
    wide = sum(abs(x - 1) > 0.05 for x in r)
    print(f"PyTorch against itself: {min(r):.3f} to {max(r):.3f} (median "
          f"{statistics.median(r):.3f}); {wide} of {len(r)} cases more than 5% from 1")
    behind = [row["case"] for row in rows if row["torch_over_cbn"] < 1]
    beyond = [row["case"] for row in rows if row["trails_beyond_control"]]
    named = f" ({', '.join(beyond)})" if beyond else ""
    print(f"cbn slower than PyTorch: {len(behind)} of {len(rows)} cases; by more than "
          f"PyTorch differs from itself: {len(beyond)}{named}")
    save(threads=args.threads, repeats=args.repeats, cases=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
