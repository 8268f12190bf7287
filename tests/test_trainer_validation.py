"""fit checks every argument before its first step, and restores the model's mode on any exit."""

import numpy as np
import pytest

from cbn.layer import BatchNorm
from cbn.nn import Linear, mlp
from cbn.optim import SGD
from cbn.trainer import StepEvaluator, fit, predict
from test_trainer import Spy


def blobs(rng, n=40, d=6, k=3):
    """Separable Gaussian clusters: a quick, fresh classification problem."""
    centers = 6 * np.eye(k, d) + rng.standard_normal(d)
    y = rng.integers(0, k, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def snapshot(model):
    """Everything a training step or a mode switch could change, as bytes and flags."""
    state = {"training": model.training}
    for i, layer in enumerate(model.layers):
        state[f"{i}.training"] = layer.training
        for name, arr in layer.params.items():
            state[f"{i}.{name}"] = arr.tobytes()
        if isinstance(layer, BatchNorm):
            state[f"{i}.running_mean"] = layer.running_mean.tobytes()
            state[f"{i}.running_var"] = layer.running_var.tobytes()
            state[f"{i}.num_batches_tracked"] = layer.num_batches_tracked
    return state


@pytest.fixture
def setup():
    """A fresh BN model in eval mode, its optimizer and fresh data (6 features, 3 classes)."""
    rng = np.random.default_rng()
    X, y = blobs(rng)
    model = mlp([6, 8, 3], rng=rng).eval()
    return model, SGD(model.params, model.grads, lr=0.1), X, y, rng


def with_label(y, index, value):
    y = y.copy()
    y[index] = value
    return y


def with_nan(X, row):
    X = X.copy()
    X[row, 1] = np.nan
    return X


# Each case (keyword overrides of fit's arguments, exception, message) trained for
# one or more steps, or switched the model to training mode, before raising.
BAD_ARGUMENTS = {
    "label above range in the last batch": (
        lambda X, y: {"y": with_label(y, -1, 3)}, ValueError,
        r"y must hold .*\[0, 3\).*y\[39\] = 3"),
    "negative label": (
        lambda X, y: {"y": with_label(y, 5, -1)}, ValueError, r"y\[5\] = -1"),
    "X_val with the wrong feature count": (
        lambda X, y: {"validation": (X[:, :5], y)}, ValueError, "X_val has 5 features .* takes 6"),
    "y_val out of range": (
        lambda X, y: {"validation": (X, with_label(y, 0, 7))}, ValueError, r"y_val\[0\] = 7"),
    "empty validation set": (
        lambda X, y: {"validation": (X[:0], y[:0])}, ValueError, "X_val must hold at least one"),
    "X with the wrong feature count": (
        lambda X, y: {"X": X[:, :5]}, ValueError, "X has 5 features .* takes 6"),
    "NaN in a late row of X": (
        lambda X, y: {"X": with_nan(X, 33)}, ValueError, r"X contains NaN.*row 33, column 1"),
    "NaN in X_val": (
        lambda X, y: {"validation": (with_nan(X, 2), y)}, ValueError, "X_val contains NaN"),
    "float64 X that overflows float32": (
        lambda X, y: {"X": np.full(X.shape, 1e39)}, ValueError, "X contains NaN or Inf .*float32"),
    "callbacks not a sequence": (
        lambda X, y: {"callbacks": 5}, TypeError, "callbacks must be a sequence"),
    "a callback with no hook": (
        lambda X, y: {"callbacks": [object()]}, TypeError, r"callbacks\[0\] .*none of the hooks"),
    "a hook that is not callable": (
        lambda X, y: {"callbacks": [type("CB", (), {"on_step_end": 3})()]}, TypeError,
        r"callbacks\[0\]\.on_step_end is not callable"),
    "loss not callable": (
        lambda X, y: {"loss": 5}, TypeError, "loss must be callable"),
    "loss without forward, with validation": (
        lambda X, y: {"loss": lambda logits, y: (0.0, logits), "validation": (X, y)}, TypeError,
        "loss .* needs a forward"),
    "batch_size=1 with batch norm": (
        lambda X, y: {"batch_size": 1}, ValueError, "batch_size must be >= 2 .*batch norm"),
    "bad seed": (
        lambda X, y: {"seed": -1}, ValueError, "seed must be"),
}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the 1e39 case
@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_argument_raises_before_any_step(setup, case):
    model, opt, X, y, _ = setup
    make, exc_type, message = BAD_ARGUMENTS[case]
    kw = {"X": X, "y": y, "epochs": 2, "batch_size": 8, "optimizer": opt, "verbose": 0}
    kw.update(make(X, y))
    before = snapshot(model)
    with pytest.raises(exc_type, match=message):
        fit(model, kw.pop("X"), kw.pop("y"), **kw)
    assert snapshot(model) == before  # parameters, running stats, counters and modes


class Boom(Exception):
    pass


@pytest.mark.parametrize("entry_mode", [True, False])
def test_mode_is_restored_when_training_fails(setup, entry_mode):
    model, opt, X, y, _ = setup
    model.train(entry_mode)

    class FailAtStep3:
        def on_step_end(self, model, step, logs):
            if step == 3:
                raise Boom

    with pytest.raises(Boom):
        fit(model, X, y, epochs=2, batch_size=8, optimizer=opt, callbacks=[FailAtStep3()],
            verbose=0)
    assert model.training is entry_mode
    assert all(layer.training is entry_mode for layer in model.layers)
    assert model[1].num_batches_tracked == 3  # it did train: the mode alone is restored


def test_mode_is_restored_after_a_diverging_step(setup):
    model, opt, X, y, _ = setup

    def loss_that_overflows(logits, labels):
        raise FloatingPointError("the loss overflowed")

    with pytest.raises(FloatingPointError, match="overflowed"):
        fit(model, X, y, epochs=1, batch_size=8, optimizer=opt, loss=loss_that_overflows,
            verbose=0)
    assert not model.training and not any(layer.training for layer in model.layers)


def test_labels_are_checked_only_for_the_softmax_loss(setup):
    """A custom loss may read labels otherwise: a 1-output logistic model with labels 0/1."""
    _, _, X, _, rng = setup
    model = Linear(6, 1, rng=rng)
    y = rng.integers(0, 2, len(X))
    seen = []

    def logistic(logits, labels):
        seen.append(labels.copy())
        p = 1 / (1 + np.exp(-logits[:, 0]))
        return float(np.mean(-np.log(np.where(labels == 1, p, 1 - p)))), \
            ((p - labels) / len(labels))[:, None].astype(logits.dtype)

    fit(model, X, y, epochs=1, batch_size=8, optimizer=SGD(model.params, model.grads),
        loss=logistic, verbose=0)
    assert len(seen) == 5 and any(s.max() == 1 for s in seen)


def test_callbacks_may_be_a_generator(setup):
    model, opt, X, y, _ = setup
    steps, ends = [], []

    class Recorder:
        def on_step_end(self, model, step, logs):
            steps.append(step)

        def on_train_end(self, model, history):
            ends.append(history.n_steps)

    fit(model, X, y, epochs=2, batch_size=8, optimizer=opt,
        callbacks=(cb for cb in [Recorder()]), verbose=0)
    assert steps == list(range(1, 11)) and ends == [10]


def test_width_checks_are_skipped_for_models_of_unknown_layers(setup):
    """A model whose layers declare no widths trains as before (the checks need the width)."""
    _, _, X, y, rng = setup

    # A model of no cbn layer class: the trainer cannot read its widths.
    model = Spy(n_features=6, rng=rng)
    h = fit(model, X, y, epochs=1, batch_size=8, optimizer=SGD(model.params, model.grads),
            verbose=0)
    assert h.n_steps == 5
    with pytest.raises(ValueError, match="no rows .* output width"):
        predict(model, X[:0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_predict_on_no_rows_returns_an_empty_logit_matrix(dtype):
    rng = np.random.default_rng()
    model = mlp([6, 8, 4], rng=rng, dtype=dtype).eval()
    X, _ = blobs(rng)
    out = predict(model, X[:0])
    assert out.shape == (0, 4) and out.dtype == dtype
    assert predict(model, X).shape == (len(X), 4)  # the same width as with rows
    assert out.argmax(axis=1).shape == (0,)  # class predictions: empty, as sklearn gives
    assert not model.training


def test_step_evaluator_still_sees_the_model_in_eval_mode(setup):
    """The up-front checks leave callbacks and validation working as before."""
    model, opt, X, y, _ = setup
    ev = StepEvaluator(X, y, every=2)
    h = fit(model, X, y, epochs=2, batch_size=8, optimizer=opt, validation=(X, y),
            callbacks=[ev], verbose=0)
    assert ev.steps == [2, 4, 6, 8, 10] and len(h.val_acc) == 2 and not model.training


def test_batch_size_one_is_allowed_with_frozen_batch_norm(setup):
    """Frozen layers normalize with their running statistics: one sample per batch is fine."""
    model, opt, X, y, _ = setup
    model[1].freeze()
    h = fit(model, X[:6], y[:6], epochs=1, batch_size=1, optimizer=opt, verbose=0)
    assert h.n_steps == 6 and h.dropped == 0  # no batch statistics: every sample trains
    assert model[1].num_batches_tracked == 0


def test_optimizer_over_another_model_is_refused(setup):
    # It would step the other model's arrays: training would change nothing here.
    model, _, X, y, rng = setup
    other = mlp([6, 8, 3], rng=rng)
    before = snapshot(model)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        fit(model, X, y, epochs=1, batch_size=8,
            optimizer=SGD(other.params, other.grads, lr=0.1))
    assert snapshot(model) == before


def test_optimizer_over_part_of_the_model_trains_that_part(setup):
    model, _, X, y, rng = setup
    head = model.layers[-1]
    first = model.layers[0].W.copy()
    fit(model, X, y, epochs=1, batch_size=8, verbose=0,
        optimizer=SGD(head.params, head.grads, lr=0.1))
    assert model.layers[0].W.tobytes() == first.tobytes()  # frozen: not in the optimizer
