"""Command line: ``python -m cbn demo`` (also ``cbn demo``) and ``cbn bench``.

``demo`` trains the same multilayer perceptron twice, with and without batch
norm, from identical initial weights and with identical mini-batches, and
prints a per-epoch table side by side and a summary; ``--lr-sweep`` repeats
that over several learning rates.  ``bench`` forwards its arguments to
``cbn.benchmark``.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np

__all__ = ["main", "build_parser", "run_demo"]

DEFAULTS = {
    "epochs": 30,
    "batch_size": 32,
    "lr": 0.1,
    "optimizer": "momentum",
    "activation": "sigmoid",
    "hidden": "100,100,100",
    "target": 0.9,
    "fixed_steps": 200,
}

RUNS = (("bn", "with batch norm", True), ("plain", "without batch norm", False))


def _hidden(text):
    """Parse ``--hidden 100,100`` into a list of ints."""
    parts = text.split(",")
    if len(parts) > 1 and not all(s.strip() for s in parts):  # "3,,4": a lost width
        raise argparse.ArgumentTypeError(f"--hidden has an empty width in {text!r}")
    try:
        sizes = [int(s) for s in parts if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden must be comma-separated ints, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--hidden needs at least one positive width, got {text!r}")
    return sizes


def _floats(text):
    """Parse ``--lr-sweep 0.1,1`` into a list of positive, finite floats."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    # "not v > 0" also catches NaN, which every comparison rejects.
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive, finite numbers, got {text!r}")
    return values


def _positive(kind, *, zero=False):
    """An argparse type: a positive ``kind`` (int or float; a float must also be
    finite); with ``zero``, 0 too. ``cbn bench``'s options use it as well."""
    sign = "non-negative" if zero else "positive"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if not (value > 0 or (zero and value == 0)) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(
                f"expected a {sign}, finite {kind.__name__}, got {text!r}")
        return value
    return parse


def _nonnegative_int(text):
    """An argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def _accuracy(text):
    """Parse ``--target``: a test accuracy in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an accuracy in (0, 1], got {text!r}")
    if not 0 < value <= 1:  # also false for NaN
        raise argparse.ArgumentTypeError(
            f"expected an accuracy in (0, 1] (a fraction: 0.9 for 90%), got {text!r}")
    return value


def build_parser():
    """Return the ``argparse`` parser of the ``cbn`` command."""
    from .optim import OPTIMIZERS

    parser = argparse.ArgumentParser(
        prog="cbn", description="Batch normalization for NumPy: demo and benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    sub.required = True
    d = sub.add_parser(
        "demo", help="train an MLP with and without batch norm and compare",
        description="Train the same MLP with and without batch norm (same seed, initial "
                    "weights and mini-batch order) and compare them, after Ioffe & Szegedy "
                    "(2015), Figure 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--dataset", choices=("digits", "idx"), default="digits",
                   help="embedded 8x8 digits, or MNIST-format IDX files from --data-dir")
    d.add_argument("--data-dir", help="directory of the IDX files (for --dataset idx)")
    d.add_argument("--epochs", type=_positive(int), default=DEFAULTS["epochs"],
                   help="passes over the training set")
    d.add_argument("--batch-size", type=_positive(int), default=DEFAULTS["batch_size"],
                   help="mini-batch size")
    d.add_argument("--lr", type=_positive(float), default=DEFAULTS["lr"], help="learning rate")
    d.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=DEFAULTS["optimizer"],
                   help="update rule (momentum: v = 0.9 v + 0.1 g, p -= lr v)")
    d.add_argument("--activation", choices=("relu", "sigmoid", "tanh"),
                   default=DEFAULTS["activation"],
                   help="hidden activation (sigmoid as in Ioffe & Szegedy's Figure 1)")
    d.add_argument("--hidden", type=_hidden, default=_hidden(DEFAULTS["hidden"]),
                   metavar="W1,W2,...", help="hidden layer widths")
    d.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="seed of the initial weights and of the mini-batch order")
    d.add_argument("--target", type=_accuracy, default=DEFAULTS["target"],
                   help="test accuracy in (0, 1] whose first crossing is reported, in steps")
    d.add_argument("--fixed-steps", type=_positive(int), default=DEFAULTS["fixed_steps"],
                   help="report test accuracy after this many steps")
    d.add_argument("--eval-every", type=_positive(int), default=None,
                   help="evaluate the test set every N steps; default: 4 times per epoch")
    d.add_argument("--threads", type=_positive(int), default=1, help="BatchNorm n_threads (a positive count)")
    d.add_argument("--blas-threads", type=_nonnegative_int, default=1,
                   help="limit NumPy's BLAS to N threads with threadpoolctl, if installed "
                        "(the small matrix products here run fastest on one); 0: no limit")
    d.add_argument("--lr-sweep", type=_floats, default=None, metavar="LR1,LR2,...",
                   help="instead of one run, train both models at each learning rate and "
                        "print one row per rate")
    d.add_argument("--plot", metavar="FILE.png", help="write loss and accuracy curves "
                   "(needs matplotlib: the plot extra, or pip install matplotlib)")
    d.add_argument("--json", metavar="FILE", help="write the configuration, histories and summary")
    d.add_argument("--quiet", action="store_true", help="no progress on standard error")
    sub.add_parser("bench", help="run the kernel benchmarks (arguments go to cbn.benchmark)",
                   add_help=False)
    return parser


def _load_data(args):
    """Return standardized ``(X_train, X_test, y_train, y_test)`` and a description."""
    from .data import load_digits, load_mnist_dir, standardize, train_test_split

    if args.dataset == "digits":
        X, y = load_digits()
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_fraction=0.25, seed=0)
        name = "digits (8x8, embedded)"
    else:
        if not args.data_dir:
            raise SystemExit("cbn demo: --dataset idx needs --data-dir DIR")
        X_train, X_test, y_train, y_test = load_mnist_dir(args.data_dir)
        name = f"IDX files in {args.data_dir}"
    X_train, X_test = standardize(X_train, X_test)
    return X_train, X_test, y_train, y_test, name


class _ProgressLine:
    """Callback drawing one status line on a terminal's standard error."""

    def __init__(self, label, epochs, enabled):
        self.label, self.epochs = label, epochs
        self.enabled = enabled and sys.stderr.isatty()

    def on_epoch_end(self, model, epoch, history):
        if self.enabled:
            sys.stderr.write(f"\r  {self.label}: epoch {epoch}/{self.epochs}, "
                             f"test acc {history.val_acc[-1]:.3f}   ")
            sys.stderr.flush()

    def on_train_end(self, model, history):
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


class _Diverged(FloatingPointError):
    """Training of one demo model hit NaN or Inf (batch norm's kernels refuse them)."""

    def __init__(self, label, lr, steps, reason):
        self.label, self.lr, self.steps = label, lr, steps
        self.reason = " ".join(str(reason).split())  # one line
        super().__init__(f"training diverged ({label}, lr {lr:g}) after {steps} steps: "
                         f"{self.reason}")


class _StepCounter:
    """Callback that counts the steps completed, to say where a run diverged.

    Put it first among the callbacks: a later one that fails at step ``k``
    (an evaluation) then fails after ``k`` counted steps.
    """

    def __init__(self):
        self.step = 0

    def on_step_end(self, model, step, logs):
        self.step = step


def _train(args, data, batch_norm, lr, label):
    """Train one model; return ``(model, history, evaluator)``.

    Raises :class:`_Diverged` when the run meets a non-finite value that
    batch norm refuses (a plain network just carries on with NaN).
    """
    from .nn import mlp
    from .optim import make_optimizer
    from .trainer import StepEvaluator, fit

    X_train, X_test, y_train, y_test = data
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    sizes = [X_train.shape[1], *args.hidden, n_classes]
    model = mlp(sizes, batch_norm=batch_norm, activation=args.activation, rng=args.seed,
                n_threads=args.threads)
    optimizer = make_optimizer(args.optimizer, model.params, model.grads, lr=lr)
    steps_per_epoch = len(X_train) // args.batch_size + (len(X_train) % args.batch_size > 1)
    every = args.eval_every or max(1, round(steps_per_epoch / 4))
    evaluator = StepEvaluator(X_test, y_test, every=every, at=(args.fixed_steps,))
    progress = _ProgressLine(label, args.epochs, not args.quiet)
    counter = _StepCounter()
    try:
        # A plain network's NaN is a result here (numpy stays quiet); batch norm
        # refuses NaN and Inf with a FloatingPointError, reported as divergence.
        with np.errstate(all="ignore"):
            history = fit(model, X_train, y_train, epochs=args.epochs,
                          batch_size=args.batch_size, optimizer=optimizer, seed=args.seed,
                          validation=(X_test, y_test), callbacks=[counter, evaluator, progress],
                          record_steps=True, verbose=0)
    except FloatingPointError as exc:
        progress.on_train_end(model, None)  # fit ended without calling it: clear the line
        raise _Diverged(label, lr, counter.step, exc) from exc
    return model, history, evaluator


def _single_example_check(model, X):
    """Compare eval-mode predictions of each row alone with those of the whole batch."""
    from .trainer import predict

    batch = predict(model, X)
    single = np.concatenate([predict(model, X[i:i + 1]) for i in range(len(X))])
    same_class = int(np.count_nonzero(batch.argmax(1) == single.argmax(1)))
    return {"n": len(X), "same_class": same_class,
            "max_abs_logit_diff": float(np.max(np.abs(batch - single)))}


def _fmt(x, spec=".4f"):
    if x is None:
        return "-"
    return format(x, spec) if np.isfinite(x) else ("nan" if np.isnan(x) else "inf")


def _steps(s, total):
    return f"{s}" if s is not None else f"not in {total}"


def _summarize(args, data, runs):
    """The summary numbers of each run, as a dict per run key."""
    from .trainer import evaluate

    X_train, X_test, y_train, y_test = data
    out = {}
    for key, (model, history, ev) in runs.items():
        with np.errstate(all="ignore"):
            train_loss, train_acc = evaluate(model, X_train, y_train)
            test_loss, test_acc = evaluate(model, X_test, y_test)
        out[key] = {
            "steps": history.n_steps,
            "fixed_steps": min(args.fixed_steps, history.n_steps),
            "test_acc_at_fixed_steps": ev.acc_at(args.fixed_steps),
            "steps_to_target": ev.first_step_reaching(args.target),
            "time_per_step_ms": 1e3 * history.time_per_step,
            "final_train_acc_eval": train_acc,
            "final_test_acc": test_acc,
            "final_test_loss": test_loss if np.isfinite(test_loss) else None,
            "train_test_gap": train_acc - test_acc,
            "single_example": _single_example_check(model, X_test),
        }
    return out


def _print_table(runs, out):
    """The per-epoch table, both runs side by side."""
    bn, plain = runs["bn"][1], runs["plain"][1]
    out.write(f"{'':13}" + "".join(f" | {title:^30}" for _, title, _ in RUNS) + "\n")
    cols = f"{'train loss':>10} {'train acc':>9} {'test acc':>9}"
    out.write(f"{'epoch':>5} {'steps':>7}" + f" | {cols}" * len(RUNS) + "\n")
    for i in range(max(len(bn.epoch), len(plain.epoch))):
        cells = []
        for h in (bn, plain):
            if i < len(h.epoch):
                cells.append(f"{_fmt(h.train_loss[i]):>10} {_fmt(h.train_acc[i]):>9} "
                             f"{_fmt(h.val_acc[i]):>9}")
            else:
                cells.append(" " * 30)
        steps = bn.steps[i] if i < len(bn.steps) else plain.steps[i]
        out.write(f"{i + 1:>5} {steps:>7}" + "".join(f" | {c}" for c in cells) + "\n")


def _print_summary(args, summary, out):
    bn, plain = summary["bn"], summary["plain"]
    rows = [
        (f"test accuracy after {bn['fixed_steps']} steps",
         _fmt(bn["test_acc_at_fixed_steps"]), _fmt(plain["test_acc_at_fixed_steps"])),
        (f"steps to {args.target:.0%} test accuracy",
         _steps(bn["steps_to_target"], bn["steps"]), _steps(plain["steps_to_target"],
                                                             plain["steps"])),
        (f"final test accuracy ({bn['steps']} steps)", _fmt(bn["final_test_acc"]),
         _fmt(plain["final_test_acc"])),
        ("train - test accuracy (eval mode)", _fmt(bn["train_test_gap"], "+.4f"),
         _fmt(plain["train_test_gap"], "+.4f")),
        ("time per step (ms)", f"{bn['time_per_step_ms']:.3f}", f"{plain['time_per_step_ms']:.3f}"),
    ]
    out.write(f"\nSummary{'':33}{'batch norm':>16}{'no batch norm':>16}\n")
    for name, a, b in rows:
        out.write(f"  {name:<38}{a:>16}{b:>16}\n")
    s = bn["single_example"]
    verdict = "identical" if s["same_class"] == s["n"] else "DIFFERENT"
    out.write(f"\nEval mode uses running statistics: predicting each of the {s['n']} test "
              f"examples alone gives the\nsame class as inside the batch for {s['same_class']}/"
              f"{s['n']} ({verdict}; max |logit difference| {s['max_abs_logit_diff']:.2e}).\n")


def _plot(path, args, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (key, title, _), color in zip(RUNS, ("tab:blue", "tab:orange")):
        _, h, ev = runs[key]
        steps = np.arange(1, len(h.step_loss) + 1)
        loss = np.asarray(h.step_loss, dtype=float)
        window = max(1, min(25, len(loss) // 20))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps, loss, color=color, alpha=0.2, lw=0.6)
        ax_loss.plot(steps[window - 1:], smooth, color=color, label=title)
        ax_acc.plot(ev.steps, ev.acc, color=color, label=title)
    ax_loss.set(xlabel="step", ylabel="training loss (mini-batch)", yscale="log",
                title="Training loss")
    ax_acc.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1), title="Test accuracy (eval mode)")
    ax_acc.axhline(args.target, color="gray", ls=":", lw=1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"MLP {args.hidden} {args.activation}, {args.optimizer} lr={args.lr}, "
                 f"batch {args.batch_size}, seed {args.seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_plot_available(path):
    if path is None:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("cbn demo: --plot needs matplotlib, which is not installed; "
                "install it with: pip install 'cbn[plot]'  (or pip install matplotlib)")
    return None


def _output_path_problem(option, path, command="cbn demo"):
    """Why ``path`` (of an output option such as ``--json``) cannot be written, or
    None; checked before the run (training, benchmarking)."""
    if path is None:
        return None
    if not path:
        return f"{command}: {option} needs a file name"
    if os.path.isdir(path):
        return f"{command}: {option} {path!r} is a directory; name a file to write"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"{command}: {option}: directory {parent!r} does not exist"
    # Opening is the test that holds for every user (os.access lets root pass
    # everywhere, and a read-only file system refuses root too).
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        return f"{command}: {option}: {_os_error_message(exc)}"
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return None


def _plot_format_problem(path, command="cbn demo"):
    """Why matplotlib would not write ``path`` (an unknown extension), or None."""
    if not path:
        return None
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in formats:
        return (f"{command}: --plot {path!r}: name a file ending in one of "
                f"{', '.join('.' + f for f in sorted(formats))}")
    return None


def _usage_problems(args):
    """What the options ask that the run could only refuse after training (status 2)."""
    from . import _kernels

    if args.batch_size < 2:
        yield "cbn demo: --batch-size must be at least 2: the batch-norm run normalizes each mini-batch"
    if args.threads > _kernels.MAX_THREADS:
        yield f"cbn demo: --threads must be at most {_kernels.MAX_THREADS}, got {args.threads}"
    from .optim import _rounding_problem

    for lr in args.lr_sweep or [args.lr]:
        # What the optimizer would refuse after the first model is built.
        problem = _rounding_problem(lr, np.dtype(np.float32))
        if problem:
            option = "--lr-sweep" if args.lr_sweep else "--lr"
            yield f"cbn demo: {option} {lr:g} {problem} (the models are float32)"
    if args.dataset == "idx" and not args.data_dir:
        yield "cbn demo: --dataset idx needs --data-dir DIR"
    if args.lr_sweep and args.plot:
        yield "cbn demo: --plot draws the curves of one run; with --lr-sweep, write --json"
    if args.plot and args.json and os.path.abspath(args.plot) == os.path.abspath(args.json):
        yield "cbn demo: --plot and --json name the same file"


def _os_error_message(exc):
    """One line for an OSError: the file and the reason, without the errno prefix."""
    if exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _config(args):
    keys = ("dataset", "data_dir", "epochs", "batch_size", "lr", "optimizer", "activation",
            "hidden", "seed", "target", "fixed_steps", "eval_every", "threads", "blas_threads",
            "lr_sweep")
    return {k: getattr(args, k) for k in keys}


def _write_json(path, payload):
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, allow_nan=False, default=_json_default)
        fh.write("\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _clean(value):
    """Replace non-finite floats by None, recursively, for strict JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def _run_sweep(args, data, out):
    """Train both models at each rate of ``args.lr_sweep``; print and return one row per rate."""
    from .trainer import evaluate

    rows = []
    to = f"steps to {args.target:.0%}"
    cols = f"{'test acc':>9} {to:>15} {'train loss':>10}"
    out.write(f"{'':8}" + "".join(f" | {title:^36}" for _, title, _ in RUNS) + "\n")
    out.write(f"{'lr':>8}" + f" | {cols}" * len(RUNS) + "\n")
    for lr in args.lr_sweep:
        row = {"lr": lr}
        cells = []
        for key, title, bn in RUNS:
            # One diverged run is a result of the sweep: mark it and go on.
            try:
                model, history, ev = _train(args, data, bn, lr, f"{title}, lr {lr:g}")
            except _Diverged as exc:
                row[key] = {"final_test_acc": None, "steps_to_target": None,
                            "steps": exc.steps, "final_train_loss": None, "diverged": True,
                            "error": exc.reason}
                cells.append(f"{'diverged':>9} {f'after {exc.steps}':>15} {'-':>10}")
                continue
            with np.errstate(all="ignore"):
                _, acc = evaluate(model, data[1], data[3])
            loss = history.train_loss[-1]
            row[key] = {"final_test_acc": acc, "steps_to_target": ev.first_step_reaching(
                args.target), "steps": history.n_steps, "final_train_loss": loss,
                "diverged": bool(not np.isfinite(loss))}
            cells.append(f"{_fmt(acc):>9} {_steps(row[key]['steps_to_target'], history.n_steps):>15}"
                         f" {_fmt(loss):>10}")
        rows.append(row)
        out.write(f"{lr:>8g}" + "".join(f" | {c}" for c in cells) + "\n")
        out.flush()
    if any(row[key].get("error") for row in rows for key, _, _ in RUNS):
        out.write("\n(diverged after N: training stopped after N steps at a NaN or Inf that "
                  "batch norm refuses)\n")
    return rows


def run_demo(args, out=None):
    """Run the demo for parsed ``args``; return the JSON-ready result dict.

    Parameters
    ----------
    args : argparse.Namespace
        As parsed by :func:`build_parser` for the ``demo`` command.
    out : file-like, optional
        Where the tables go (standard output by default).
    """
    out = out if out is not None else sys.stdout
    X_train, X_test, y_train, y_test, name = _load_data(args)
    data = (X_train, X_test, y_train, y_test)
    out.write(f"cbn demo: {name}, {len(X_train)} train / {len(X_test)} test examples\n"
              f"MLP {X_train.shape[1]}-{'-'.join(map(str, args.hidden))}-"
              f"{int(max(y_train.max(), y_test.max())) + 1}, {args.activation}, {args.optimizer} "
              f"lr={args.lr:g}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}; "
              "same initial weights and mini-batches for both runs\n\n")
    result = {"config": _config(args)}
    if args.lr_sweep:
        result["sweep"] = _run_sweep(args, data, out)
        return result
    runs = {}
    for key, title, bn in RUNS:
        t0 = time.perf_counter()
        runs[key] = _train(args, data, bn, args.lr, title)
        if not args.quiet:
            sys.stderr.write(f"  trained {title} in {time.perf_counter() - t0:.1f} s\n")
    _print_table(runs, out)
    summary = _summarize(args, data, runs)
    _print_summary(args, summary, out)
    result["summary"] = summary
    result["runs"] = {k: {**h.to_dict(), "eval_steps": ev.steps, "eval_acc": ev.acc,
                          "eval_loss": ev.loss} for k, (_, h, ev) in runs.items()}
    if args.plot:
        _plot(args.plot, args, runs)
        out.write(f"wrote {args.plot}\n")
    return result


@contextlib.contextmanager
def _blas_limit(n_threads, *, quiet=False):
    """Limit BLAS threads to ``n_threads`` (> 0) while the block runs, if threadpoolctl exists."""
    if n_threads <= 0:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if not quiet:
            sys.stderr.write("cbn demo: threadpoolctl is not installed, BLAS threads not "
                             "limited (pip install threadpoolctl)\n")
        yield
        return
    with threadpool_limits(limits=n_threads, user_api="blas"):
        yield


def main(argv=None):
    """Entry point of ``python -m cbn`` and of the ``cbn`` script; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from . import benchmark  # lazily: it is only needed here

        return benchmark.main(argv[1:])
    args = build_parser().parse_args(argv)
    # Problems with the arguments are reported before any training (status 2).
    problems = [*_usage_problems(args), _check_plot_available(args.plot)]
    problems = [p for p in problems if p]
    if not problems:  # matplotlib is there to ask
        problems = [p for p in (_output_path_problem("--plot", args.plot),
                                _plot_format_problem(args.plot),
                                _output_path_problem("--json", args.json)) if p]
    if problems:
        sys.stderr.write(problems[0] + "\n")
        return 2
    # Failures of the run itself: one line and status 1, no traceback.
    try:
        with _blas_limit(args.blas_threads, quiet=args.quiet):
            result = run_demo(args)
        if args.json:
            _write_json(args.json, _clean(result))
            print(f"wrote {args.json}")
    except KeyboardInterrupt:
        sys.stderr.write("cbn demo: interrupted\n")
        return 130
    except BrokenPipeError:  # cbn demo | head: the reader has gone, nothing to report
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _Diverged as exc:
        sys.stderr.write(f"cbn demo: {exc}; try a smaller --lr\n")
        return 1
    except OSError as exc:  # unreadable data, an unwritable output, ...
        sys.stderr.write(f"cbn demo: {_os_error_message(exc)}\n")
        return 1
    except ValueError as exc:  # malformed data files, among others
        sys.stderr.write(f"cbn demo: {exc}\n")
        return 1
    except MemoryError as exc:  # --hidden 100000000, say
        sys.stderr.write(f"cbn demo: out of memory ({exc}); try smaller --hidden widths "
                         "or --batch-size\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
