"""The mini-batch training loop, evaluation and prediction.

:func:`fit` runs the lecture's loop: each epoch shuffles the training set
(with a seeded generator), and for each mini-batch ``X{t}`` runs forward in
training mode, the loss, backward and one optimizer step.  After each
epoch it evaluates on the validation set in evaluation mode, where batch
norm uses its running statistics.  :func:`evaluate` and :func:`predict`
always run in evaluation mode and restore the mode the model had.
"""

import collections.abc
import contextlib
import dataclasses
import numbers
import sys
import time

import numpy as np

from . import layer as bn_layer
from .functional import refuse_masked
from .layer import BatchNorm
from .nn import Linear, ReLU, Sigmoid, SoftmaxCrossEntropy, Tanh

__all__ = ["History", "StopTraining", "StepEvaluator", "fit", "evaluate", "predict"]


class StopTraining(Exception):
    """Raise from a callback to end :func:`fit` early.

    Raised in ``on_step_end``, the current epoch is cut short but still
    recorded (with its validation); raised in ``on_epoch_end``, training ends
    after that epoch.  :func:`fit` returns the history so far.
    """


def _json_value(v):
    """``v`` for JSON: lists element by element, NumPy scalars as Python ones,
    NaN and Inf as None. (Module-level: a nested recursive function would be a
    reference cycle through its own closure on every call.)"""
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, np.generic):  # a NumPy scalar appended by a callback
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


@dataclasses.dataclass
class History:
    """What :func:`fit` measured.

    Attributes
    ----------
    epoch : list of int
        Epoch numbers, from 1.
    steps : list of int
        Total optimizer steps at the end of each epoch.
    train_loss, train_acc : list of float
        Mean loss and accuracy over the epoch's examples (each mini-batch
        weighted by its size), in training mode (as Keras reports them).
    val_loss, val_acc : list of float
        On the validation set, in evaluation mode (NaN without validation).
    time : list of float
        Wall time of each epoch in seconds, evaluation included.
    train_time : list of float
        Seconds spent in forward, loss, backward and update only.
    step_loss, step_acc : list of float
        Per mini-batch loss and accuracy, when ``record_steps=True``.
    dropped : int
        Number of one-sample last batches that were skipped.
    """

    epoch: list = dataclasses.field(default_factory=list)
    steps: list = dataclasses.field(default_factory=list)
    train_loss: list = dataclasses.field(default_factory=list)
    train_acc: list = dataclasses.field(default_factory=list)
    val_loss: list = dataclasses.field(default_factory=list)
    val_acc: list = dataclasses.field(default_factory=list)
    time: list = dataclasses.field(default_factory=list)
    train_time: list = dataclasses.field(default_factory=list)
    step_loss: list = dataclasses.field(default_factory=list)
    step_acc: list = dataclasses.field(default_factory=list)
    dropped: int = 0

    @property
    def n_steps(self):
        """int: optimizer steps taken in total."""
        return self.steps[-1] if self.steps else 0

    @property
    def time_per_step(self):
        """float: mean seconds of training work per step (NaN before any step)."""
        return sum(self.train_time) / self.n_steps if self.n_steps else float("nan")

    def to_dict(self):
        """Return the history as a JSON-serializable dict (NaN becomes ``None``)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}


class StepEvaluator:
    """Callback that evaluates the model every ``every`` steps (in eval mode).

    Parameters
    ----------
    X, y : ndarray
        Evaluation data (e.g. the test set).
    every : int, default 10
        Evaluate after steps ``every, 2*every, ...`` and after the last step.
    at : sequence of int, default ()
        Further steps after which to evaluate.
    batch_size : int, default 1024

    Attributes
    ----------
    steps, loss, acc : list
        Step numbers and the loss and accuracy measured there.
    """

    def __init__(self, X, y, every=10, *, at=(), batch_size=1024):
        self.X, self.y = X, y
        self.every = _positive_int(every, "every")
        self.at = {_positive_int(s, "at") for s in at}
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.steps, self.loss, self.acc = [], [], []

    def _record(self, model, step):
        if self.steps and self.steps[-1] == step:
            return
        loss, acc = evaluate(model, self.X, self.y, batch_size=self.batch_size)
        self.steps.append(step)
        self.loss.append(loss)
        self.acc.append(acc)

    def on_step_end(self, model, step, logs):
        """Evaluate when ``step`` is a multiple of ``every`` or listed in ``at``."""
        if step % self.every == 0 or step in self.at:
            self._record(model, step)

    def on_train_end(self, model, history):
        """Evaluate after the last step too."""
        if history.n_steps:
            self._record(model, history.n_steps)

    def first_step_reaching(self, target):
        """The first evaluated step with accuracy >= ``target``, or ``None``."""
        for step, acc in zip(self.steps, self.acc):
            if acc >= target:
                return step
        return None

    def acc_at(self, step):
        """Accuracy at the last evaluation at or before ``step`` (NaN if none)."""
        best = float("nan")
        for s, acc in zip(self.steps, self.acc):
            if s <= step:
                best = acc
        return best


def _positive_int(value, name):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _model_dtype(model):
    """The floating dtype of the model's first parameter (float32 if it has none)."""
    for arr in getattr(model, "params", {}).values():
        return arr.dtype
    return np.dtype(np.float32)


def _check_data(model, X, y, name="X"):
    """Validate ``X``/``y`` and convert ``X`` once to the model's dtype."""
    refuse_masked(X, name)
    refuse_masked(y, f"labels for {name}")
    X = np.asarray(X)
    if X.ndim < 2 or (X.ndim > 2 and _takes_rows(model)):
        raise ValueError(f"{name} must be 2-D (N, features) for this model, whose first "
                         f"layer with a shape is a Linear, got shape {X.shape}"
                         if X.ndim > 2 else
                         f"{name} must have a batch axis and features: 2-D (N, features), or "
                         f"(N, C, ...) for a model whose first layer takes images; got shape "
                         f"{X.shape}")
    if X.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be numeric, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=_model_dtype(model))
    if y is not None:
        y = np.asarray(y)
        if y.dtype.kind not in "iu":
            raise TypeError(f"labels for {name} must be integers, got dtype {y.dtype}")
        if y.shape != (len(X),):
            raise ValueError(f"labels for {name} must have shape ({len(X)},), got {y.shape}")
    return X, y


def _takes_rows(model):
    """Whether the model's first layer that cares about shapes is a Linear
    (which takes (N, features) only); activations take any shape."""
    return isinstance(_first_shaped(model, "in"), Linear)


def _all_modules(model):
    """``model`` and, for a Sequential (also nested), every layer in it, each
    container before its children."""
    layers = getattr(model, "layers", None)
    inner = [m for layer in layers for m in _all_modules(layer)] \
        if isinstance(layers, (list, tuple)) else []
    return [model, *inner]


def _flat_layers(model):
    """The model's leaf layers in order: a Sequential (also nested) is expanded."""
    return [m for m in _all_modules(model)
            if not isinstance(getattr(m, "layers", None), (list, tuple))]


# Layers that pass their input width through unchanged.
_WIDTH_KEEPING = (ReLU, Sigmoid, Tanh)


def _edge_width(model, end):
    """The model's input (``end="in"``) or output (``end="out"``) width, or None if unknowable.

    Walks the layers from that end: a ``Linear`` declares both widths, a
    ``BatchNorm`` over the feature axis its channel count, and the
    activations keep the width.  Any other layer might change the width, so
    past one the answer is None (and the checks that need it are skipped).
    """
    layer = _first_shaped(model, end)
    if isinstance(layer, Linear):
        return layer.in_features if end == "in" else layer.out_features
    if isinstance(layer, BatchNorm):
        return layer.num_features if layer.axis in (1, -1) else None
    return None


def _first_shaped(model, end):
    """The first leaf layer from that end (``"in"`` or ``"out"``) that is not an
    activation (activations keep any shape), or None."""
    layers = _flat_layers(model)
    for layer in layers if end == "in" else layers[::-1]:
        if not isinstance(layer, _WIDTH_KEEPING):
            return layer
    return None


def _check_width(X, width, name):
    """Raise unless ``X`` has the ``width`` features the model takes (None: unknown)."""
    if width is not None and X.shape[1] != width:
        raise ValueError(f"{name} has {X.shape[1]} features but the model takes {width} "
                         f"(shape {X.shape}, expected (N, {width}))")


def _check_label_range(y, n_classes, name):
    """Raise unless every label lies in ``[0, n_classes)`` (None: unknown, not checked)."""
    if n_classes is None or len(y) == 0:
        return
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name} must hold class labels in [0, {n_classes}) for the model's "
                         f"{n_classes} outputs; {name}[{i}] = {int(y[i])} "
                         f"({len(bad)} label(s) out of range)")


def _check_finite(X, name):
    """Raise if ``X`` (already in the model's dtype) holds NaN or Inf: no step could use it."""
    if not np.isfinite(X).all():
        row, col = (int(i[0]) for i in np.nonzero(~np.isfinite(X)))
        raise ValueError(f"{name} contains NaN or Inf (in {X.dtype}), first at row {row}, "
                         f"column {col}: {name}[{row}, {col}] = {X[row, col]}")


def _check_model(model):
    """Raise unless ``model`` has the layer methods that :func:`fit` calls."""
    missing = [m for m in ("forward", "backward", "train", "eval")
               if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(f"model ({type(model).__name__}) lacks the methods {missing}")


def _needs_two(model):
    """Whether training ``model`` normalizes with batch statistics somewhere
    (a batch norm layer that is not frozen), so that a batch needs two samples."""
    return any(isinstance(layer, BatchNorm) and (not layer.frozen or not layer.track_running_stats)
               for layer in _flat_layers(model))


def _check_batch_size(model, batch_size):
    """Raise on ``batch_size=1`` when a batch norm layer would normalize with batch statistics."""
    if batch_size == 1 and _needs_two(model):
        raise ValueError("batch_size must be >= 2 to train a model with batch norm "
                         "(one value per channel cannot be normalized), got 1")


def _check_loss(loss, validation):
    """Return the loss object, the default one for None, after checking how fit calls it."""
    if loss is None:
        return SoftmaxCrossEntropy()
    if not callable(loss):
        raise TypeError(f"loss must be callable as loss(logits, y) -> (value, dlogits), "
                        f"got {type(loss).__name__}")
    if validation is not None and not callable(getattr(loss, "forward", None)):
        raise TypeError(f"loss ({type(loss).__name__}) needs a forward(logits, y) method to "
                        "evaluate the validation set")
    return loss


_HOOKS = ("on_step_end", "on_epoch_end", "on_train_end")


def _check_callbacks(callbacks):
    """Return ``callbacks`` as a list, each having a callable hook or being callable itself."""
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks,
                                                             collections.abc.Iterable):
        raise TypeError(f"callbacks must be a sequence of callbacks, got "
                        f"{type(callbacks).__name__} (wrap a single callback in a list)")
    callbacks = list(callbacks)  # a generator would be used up by the first hook
    for i, cb in enumerate(callbacks):
        hooks = [h for h in _HOOKS if getattr(cb, h, None) is not None]
        for hook in hooks:
            if not callable(getattr(cb, hook)):
                raise TypeError(f"callbacks[{i}].{hook} is not callable")
        if not hooks and not callable(cb):
            raise TypeError(f"callbacks[{i}] ({type(cb).__name__}) has none of the hooks "
                            f"{', '.join(_HOOKS)} and is not callable")
    return callbacks


def _checked_labelled_set(model, X, y, x_name, y_name, n_classes):
    """``_check_data`` plus the model's input width, finiteness and the label range."""
    if y is None:
        raise TypeError(f"{y_name} must be an array of integer labels, got None")
    X, y = _check_data(model, X, y, name=x_name)
    _check_width(X, _edge_width(model, "in"), x_name)
    _check_finite(X, x_name)
    _check_label_range(y, n_classes, y_name)
    return X, y


def _check_validation(model, validation, n_classes):
    """Return the checked ``(X_val, y_val)``, or None without validation."""
    if validation is None:
        return None
    if not isinstance(validation, (tuple, list)) or len(validation) != 2:
        raise TypeError("validation must be a tuple (X_val, y_val)")
    X_val, y_val = _checked_labelled_set(model, *validation, "X_val", "y_val", n_classes)
    if len(X_val) == 0:
        raise ValueError("X_val must hold at least one sample to evaluate")
    return X_val, y_val


def _shuffle_rng(seed):
    """The generator of the epochs' permutations; a bad ``seed`` raises naming it."""
    if isinstance(seed, (bool, np.bool_)):  # True would seed as 1
        raise TypeError(f"seed must be None or a non-negative int, got {seed!r}")
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"seed must be None or a non-negative int, got {seed!r} ({exc})") from None


@contextlib.contextmanager
def _mode_restored(model):
    """Put ``model`` and every layer in it back in the mode each had on entry
    when the block ends, even by an error (a container's ``train`` sets all its
    children: a child set apart, say one layer in eval mode, keeps its own)."""
    modes = [(m, getattr(m, "training", True)) for m in _all_modules(model)]
    try:
        yield
    finally:
        for m, was_training in modes:  # containers before their children
            m.train(was_training)


def _callback_hook(callbacks, hook, *args):
    """Call ``hook`` on every callback that has it; a plain callable is an epoch-end hook."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is None and hook == "on_epoch_end" and callable(cb):
            fn = cb
        if fn is not None:
            fn(*args)


class _Progress:
    """One line per epoch (``verbose=1``) or a bar redrawn in place (``verbose=2`` on a tty)."""

    def __init__(self, verbose, epochs, steps_per_epoch, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.verbose = verbose
        self.bar = verbose >= 2 and getattr(self.stream, "isatty", lambda: False)()
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.width = 0  # length of the bar last drawn, to blank it out

    def step(self, epoch, i, loss):
        if not self.bar or (i % 5 and i != self.steps_per_epoch):
            return
        width = 30
        done = int(width * i / self.steps_per_epoch)
        text = (f"Epoch {epoch}/{self.epochs} [{'=' * done}{'.' * (width - done)}] "
                f"{i}/{self.steps_per_epoch} loss {loss:.4f}")
        self.width = max(self.width, len(text))
        self.stream.write("\r" + text)
        self.stream.flush()

    def epoch(self, h):
        if not self.verbose:
            return
        line = (f"Epoch {h.epoch[-1]}/{self.epochs}: loss {h.train_loss[-1]:.4f} "
                f"acc {h.train_acc[-1]:.4f}")
        if np.isfinite(h.val_loss[-1]):
            line += f" - val_loss {h.val_loss[-1]:.4f} val_acc {h.val_acc[-1]:.4f}"
        line += f" - {h.time[-1]:.2f}s"
        if self.bar:
            line = "\r" + line.ljust(self.width)
        self.stream.write(line + "\n")
        self.stream.flush()


def _check_optimizer_covers(model, optimizer):
    """Raise if a cbn optimizer updates none of the model's parameters.

    An optimizer built over another model's ``params`` steps that model's
    arrays: training would change nothing here, silently. One over a subset
    (layers left frozen) is fine. Optimizers without a ``params`` dict are
    not checked.
    """
    opt_params = getattr(optimizer, "params", None)
    model_params = getattr(model, "params", None)
    if not isinstance(opt_params, dict) or not isinstance(model_params, dict) \
            or not model_params:
        return
    ours = {id(a) for a in model_params.values()}
    if not any(id(a) in ours for a in opt_params.values()):
        raise ValueError(
            "optimizer updates none of the model's parameters: build it over "
            "model.params and model.grads of this model")


def fit(model, X, y, *, epochs, batch_size, optimizer, loss=None, shuffle=True, seed=0,
        validation=None, callbacks=(), record_steps=False, verbose=1):
    """Train ``model`` on ``(X, y)`` with mini-batch gradient descent.

    Parameters
    ----------
    model : Sequential or any layer
        Has ``forward``, ``backward``, ``train`` and ``eval`` (and ``params``).
    X : ndarray of shape (N, features), or (N, C, ...) for a model whose first layer takes images
        Converted once to the model's dtype (that of its first parameter).
    y : ndarray of shape (N,), integer class labels
    epochs : int
        Passes over the training set.
    batch_size : int
        Mini-batch size.  When the last batch of an epoch would hold a
        single sample and the model has a batch norm layer that normalizes
        with batch statistics, that sample is dropped (one value per channel
        cannot be normalized); the count is kept in ``History.dropped``.
        Models without one train on every sample.
    optimizer : cbn.optim.Optimizer
        Built over ``model.params`` and ``model.grads``; ``step()`` is called
        after each backward.
    loss : object, optional
        ``loss(logits, y) -> (value, dlogits)``; defaults to
        :class:`cbn.nn.SoftmaxCrossEntropy`.
    shuffle : bool, default True
        Draw a new permutation each epoch.
    seed : int or None, default 0
        Seed of the shuffling: two runs with the same seed see the same
        mini-batches in the same order (``None``: fresh entropy).
    validation : tuple (X_val, y_val), optional
        Evaluated in eval mode at the end of each epoch.
    callbacks : sequence
        Objects with any of ``on_step_end(model, step, logs)``,
        ``on_epoch_end(model, epoch, history)`` and
        ``on_train_end(model, history)``; a plain callable is called as
        ``on_epoch_end``.  A callback may raise :class:`StopTraining`.
    record_steps : bool, default False
        Also record the loss and accuracy of every mini-batch.
    verbose : {0, 1, 2}, default 1
        0 silent, 1 a line per epoch, 2 a progress bar on a terminal (a line
        per epoch elsewhere); written to standard output.

    Returns
    -------
    History
        Per-epoch training and validation loss and accuracy and wall time.

    Raises
    ------
    TypeError, ValueError
        A bad argument, found before the first step, so the model is left
        untouched; the message names the argument.  Besides shapes and
        dtypes this checks that ``X`` and ``X_val`` are finite and have the
        model's input width, and, with the softmax loss, that the labels
        lie in ``[0, n_outputs)``, whenever the model's layers declare
        these widths (``Linear``, ``BatchNorm`` and the activations do).

    Notes
    -----
    The model is in training mode during the steps and in evaluation mode
    during validation; at the end it is left in the mode it had on entry,
    also when an exception (e.g. a ``FloatingPointError`` from a diverging
    run) ends training.
    """
    # Every argument is checked before the first step: a bad one raises with
    # the model untouched (parameters, running statistics and mode).
    _check_model(model)
    loss_fn = _check_loss(loss, validation)
    # Labels are class indices of the logits when the loss is the softmax
    # cross-entropy; a custom loss may read them otherwise.
    n_classes = (_edge_width(model, "out") if isinstance(loss_fn, SoftmaxCrossEntropy)
                 else None)
    X, y = _checked_labelled_set(model, X, y, "X", "y", n_classes)
    n = len(X)
    if n < 2:
        raise ValueError(f"X must hold at least 2 samples to train, got {n}")
    epochs = _positive_int(epochs, "epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    _check_batch_size(model, batch_size)
    if not callable(getattr(optimizer, "step", None)):
        raise TypeError("optimizer must have a step() method (see cbn.optim)")
    _check_optimizer_covers(model, optimizer)
    val_set = _check_validation(model, validation, n_classes)
    callbacks = _check_callbacks(callbacks)
    for i, cb in enumerate(callbacks):  # its data, before any step rather than at its first
        if isinstance(cb, StepEvaluator):
            _checked_labelled_set(model, cb.X, cb.y, f"callbacks[{i}].X", f"callbacks[{i}].y",
                                  _edge_width(model, "out"))
    if verbose not in (0, 1, 2, False, True):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    shuffle = bn_layer._check_flag(shuffle, "shuffle")
    record_steps = bn_layer._check_flag(record_steps, "record_steps")
    rng = _shuffle_rng(seed)
    starts = list(range(0, n, batch_size))
    dropped = int(n - starts[-1] == 1 and len(starts) > 1 and _needs_two(model))
    if dropped:
        starts.pop()  # a one-sample last batch: BN cannot train on it
    progress = _Progress(int(verbose), epochs, len(starts))
    history = History()
    step = 0
    with _mode_restored(model):
        try:
            for epoch in range(1, epochs + 1):
                t0 = time.perf_counter()
                order = rng.permutation(n) if shuffle else np.arange(n)
                model.train()
                work = loss_sum = 0.0
                correct = seen = 0
                history.dropped += dropped
                stop = False
                try:  # StopTraining from a step (a loss, the model) ends it as a callback's does
                    for i, start in enumerate(starts, 1):
                        idx = order[start:start + batch_size]
                        xb, yb = X[idx], y[idx]
                        ts = time.perf_counter()
                        logits = model.forward(xb)
                        value, dlogits = loss_fn(logits, yb)
                        value = float(value)  # a NumPy scalar from a custom loss: JSON-ready
                        model.backward(dlogits.astype(logits.dtype, copy=False))
                        optimizer.step()
                        work += time.perf_counter() - ts
                        step += 1
                        hits = int(np.count_nonzero(logits.argmax(axis=1) == yb))
                        loss_sum += value * len(yb)
                        correct += hits
                        seen += len(yb)
                        if record_steps:
                            history.step_loss.append(float(value))
                            history.step_acc.append(hits / len(yb))
                        progress.step(epoch, i, value)
                        try:
                            _callback_hook(callbacks, "on_step_end", model, step,
                                           {"loss": float(value), "acc": hits / len(yb),
                                            "epoch": epoch})
                        except StopTraining:
                            stop = True
                            break
                        finally:
                            model.train()  # a callback may have evaluated
                except StopTraining:
                    stop = True
                if seen == 0:  # stopped before the epoch's first step finished
                    break
                if val_set is not None:
                    v_loss, v_acc = evaluate(model, *val_set, loss=loss_fn)
                else:
                    v_loss = v_acc = float("nan")
                history.epoch.append(epoch)
                history.steps.append(step)
                history.train_loss.append(loss_sum / seen)
                history.train_acc.append(correct / seen)
                history.val_loss.append(v_loss)
                history.val_acc.append(v_acc)
                history.train_time.append(work)
                history.time.append(time.perf_counter() - t0)
                progress.epoch(history)
                if stop:
                    break
                _callback_hook(callbacks, "on_epoch_end", model, epoch, history)
        except StopTraining:
            pass
        _callback_hook(callbacks, "on_train_end", model, history)
    return history


def _batches(n, batch_size):
    for start in range(0, n, batch_size):
        yield slice(start, start + batch_size)


def predict(model, X, *, batch_size=1024):
    """Return the model's outputs (logits) for ``X``, computed in evaluation mode.

    The forwards run in :class:`cbn.no_grad`: no layer keeps a batch of ``X``,
    and what each kept from its last training forward stays for its backward.

    Parameters
    ----------
    model : Sequential or any layer
    X : ndarray of shape (N, features), or (N, C, ...) (see :func:`fit`)
        Converted to the model's dtype.
    batch_size : int, default 1024
        Rows per forward call; in eval mode the result does not depend on it,
        unless a batch norm layer has no running statistics
        (``track_running_stats=False``): it then normalizes each call's rows
        with their own statistics, as in PyTorch, and a call of one row raises.

    Returns
    -------
    ndarray of shape (N, n_outputs)
        Take ``argmax(axis=1)`` for class predictions.  For ``N = 0`` an
        empty ``(0, n_outputs)`` array, without calling the model (batch
        norm rejects empty batches).

    Raises
    ------
    ValueError
        ``X`` has no rows and the model's layers do not declare its output
        width, so the empty result cannot be shaped.
    """
    X, _ = _check_data(model, X, None)
    batch_size = _positive_int(batch_size, "batch_size")
    if len(X) == 0:
        _check_width(X, _edge_width(model, "in"), "X")  # as a row would be
        return _empty_logits(model, X.dtype)
    with _mode_restored(model), bn_layer.no_grad():  # keeps no batch alive
        model.eval()
        outs = [model.forward(X[s]) for s in _batches(len(X), batch_size)]
    return np.concatenate(outs)


def _empty_logits(model, dtype):
    """The ``(0, n_outputs)`` result of predicting no rows."""
    width = _edge_width(model, "out")
    if width is None:
        raise ValueError(f"X holds no rows and the output width of the model "
                         f"({type(model).__name__}) is unknown, so predict cannot shape an "
                         "empty result; pass at least one row")
    return np.empty((0, width), dtype)


def evaluate(model, X, y, *, loss=None, batch_size=1024):
    """Return ``(loss, accuracy)`` of ``model`` on ``(X, y)`` in evaluation mode.

    Parameters
    ----------
    model : Sequential or any layer
    X : ndarray of shape (N, features), or (N, C, ...) (see :func:`fit`)
    y : ndarray of shape (N,), integer labels
    loss : object, optional
        With ``forward(logits, y) -> float`` (a mean over the rows);
        defaults to :class:`cbn.nn.SoftmaxCrossEntropy`.
    batch_size : int, default 1024

    Returns
    -------
    loss : float
        Mean loss over all N rows.
    accuracy : float
        Share of rows whose arg-max output equals the label.
    """
    X, y = _check_data(model, X, y)
    if len(X) == 0:
        raise ValueError("X must hold at least one sample to evaluate")
    loss_fn = SoftmaxCrossEntropy() if loss is None else loss
    logits = predict(model, X, batch_size=batch_size)
    total = 0.0
    for s in _batches(len(X), batch_size):
        total += float(loss_fn.forward(logits[s], y[s])) * len(y[s])
    acc = float(np.mean(logits.argmax(axis=1) == y))
    return total / len(X), acc
