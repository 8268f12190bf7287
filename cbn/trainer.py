"""The mini-batch training loop, evaluation and prediction.

:func:`fit` runs the lecture's loop: each epoch shuffles the training set
(with a seeded generator), and for each mini-batch ``X{t}`` runs forward in
training mode, the loss, backward and one optimizer step.  After each
epoch it evaluates on the validation set in evaluation mode, where batch
norm uses its running statistics.  :func:`evaluate` and :func:`predict`
always run in evaluation mode and restore the mode the model had.
"""

import dataclasses
import numbers
import sys
import time

import numpy as np

from .nn import SoftmaxCrossEntropy

__all__ = ["History", "StopTraining", "StepEvaluator", "fit", "evaluate", "predict"]


class StopTraining(Exception):
    """Raise from a callback to end :func:`fit` early.

    Raised in ``on_step_end``, the current epoch is cut short but still
    recorded (with its validation); raised in ``on_epoch_end``, training ends
    after that epoch.  :func:`fit` returns the history so far.
    """


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
        Mean loss and accuracy over the epoch's mini-batches, in training
        mode (as Keras reports them).
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
        def clean(v):
            if isinstance(v, list):
                return [clean(x) for x in v]
            if isinstance(v, float) and not np.isfinite(v):
                return None
            return v

        return {f.name: clean(getattr(self, f.name)) for f in dataclasses.fields(self)}


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
        self.batch_size = batch_size
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
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, features), got shape {X.shape}")
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


def fit(model, X, y, *, epochs, batch_size, optimizer, loss=None, shuffle=True, seed=0,
        validation=None, callbacks=(), record_steps=False, verbose=1):
    """Train ``model`` on ``(X, y)`` with mini-batch gradient descent.

    Parameters
    ----------
    model : Sequential or any layer
        Has ``forward``, ``backward``, ``train`` and ``eval`` (and ``params``).
    X : ndarray of shape (N, features)
        Converted once to the model's dtype (that of its first parameter).
    y : ndarray of shape (N,), integer class labels
    epochs : int
        Passes over the training set.
    batch_size : int
        Mini-batch size.  When the last batch of an epoch would hold a
        single sample it is dropped (batch norm cannot normalize one value
        per channel); the count is kept in ``History.dropped``.
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

    Notes
    -----
    The model is in training mode during the steps and in evaluation mode
    during validation; at the end it is left in the mode it had on entry.
    """
    X, y = _check_data(model, X, y)
    epochs = _positive_int(epochs, "epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    if not callable(getattr(optimizer, "step", None)):
        raise TypeError("optimizer must have a step() method (see cbn.optim)")
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError("validation must be a tuple (X_val, y_val)")
        X_val, y_val = _check_data(model, *validation, name="X_val")
    if verbose not in (0, 1, 2, False, True):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    loss_fn = SoftmaxCrossEntropy() if loss is None else loss
    n = len(X)
    if n < 2:
        raise ValueError(f"X must hold at least 2 samples to train, got {n}")
    rng = np.random.default_rng(seed)
    starts = list(range(0, n, batch_size))
    dropped = int(n - starts[-1] == 1 and len(starts) > 1)
    if dropped:
        starts.pop()  # a one-sample last batch: BN cannot train on it
    progress = _Progress(int(verbose), epochs, len(starts))
    was_training = getattr(model, "training", True)
    history = History()
    step = 0
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            order = rng.permutation(n) if shuffle else np.arange(n)
            model.train()
            work = loss_sum = 0.0
            correct = seen = 0
            history.dropped += dropped
            stop = False
            for i, start in enumerate(starts, 1):
                idx = order[start:start + batch_size]
                xb, yb = X[idx], y[idx]
                ts = time.perf_counter()
                logits = model.forward(xb)
                value, dlogits = loss_fn(logits, yb)
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
                                   {"loss": float(value), "acc": hits / len(yb), "epoch": epoch})
                except StopTraining:
                    stop = True
                    break
                finally:
                    model.train()  # a callback may have evaluated
            if validation is not None:
                v_loss, v_acc = evaluate(model, X_val, y_val, loss=loss_fn)
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
    model.train(was_training)
    return history


def _batches(n, batch_size):
    for start in range(0, n, batch_size):
        yield slice(start, start + batch_size)


def predict(model, X, *, batch_size=1024):
    """Return the model's outputs (logits) for ``X``, computed in evaluation mode.

    Parameters
    ----------
    model : Sequential or any layer
    X : ndarray of shape (N, features)
        Converted to the model's dtype.
    batch_size : int, default 1024
        Rows per forward call; in eval mode the result does not depend on it.

    Returns
    -------
    ndarray of shape (N, n_outputs)
        Take ``argmax(axis=1)`` for class predictions.
    """
    X, _ = _check_data(model, X, None)
    batch_size = _positive_int(batch_size, "batch_size")
    was_training = getattr(model, "training", True)
    model.eval()
    try:
        outs = [model.forward(X[s]) for s in _batches(len(X), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(outs) if outs else np.empty((0, 0), X.dtype)


def evaluate(model, X, y, *, loss=None, batch_size=1024):
    """Return ``(loss, accuracy)`` of ``model`` on ``(X, y)`` in evaluation mode.

    Parameters
    ----------
    model : Sequential or any layer
    X : ndarray of shape (N, features)
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
        total += loss_fn.forward(logits[s], y[s]) * len(y[s])
    acc = float(np.mean(logits.argmax(axis=1) == y))
    return total / len(X), acc
