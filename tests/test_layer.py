"""Tests of ``cbn.BatchNorm``: PyTorch semantics, gradients, state, bad input.

The oracle here is written from PyTorch's documented semantics in float64
(it shares no code with cbn, not even ``cbn.reference``): momentum weights
the new batch, ``momentum=None`` is a cumulative average over
``num_batches_tracked``, the running variance takes the unbiased batch
variance while normalization uses the biased one, and
``track_running_stats=False`` uses batch statistics in evaluation too.
"""

import zlib

import numpy as np
import pytest

from cbn import BatchNorm
from cbn import reference as ref
from cbn.testing import numerical_grad

DTYPES = [np.float32, np.float64]
EPS = 1e-5


def seed_of(*parts):
    """A deterministic per-test seed (hash() of strings changes between runs)."""
    return zlib.crc32(repr(parts).encode())


class TorchSemantics:
    """float64 re-implementation of torch.nn.BatchNorm*d (forward and backward)."""

    def __init__(self, C, momentum=0.1, affine=True, track_running_stats=True, axis=1):
        self.C, self.momentum, self.axis = C, momentum, axis
        self.affine, self.track = affine, track_running_stats
        self.gamma, self.beta = np.ones(C), np.zeros(C)
        self.running_mean = np.zeros(C) if self.track else None
        self.running_var = np.ones(C) if self.track else None
        self.num_batches_tracked = 0 if self.track else None

    def _shape(self, v, ndim):
        shape = [1] * ndim
        shape[self.axis % ndim] = self.C
        return v.reshape(shape)

    def forward(self, x, training):
        x = np.asarray(x, np.float64)
        axes = tuple(i for i in range(x.ndim) if i != self.axis % x.ndim)
        m = x.size // self.C
        use_batch = training or not self.track
        if use_batch:
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)  # biased
            if training and self.track:
                self.num_batches_tracked += 1
                f = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
                self.running_mean = (1 - f) * self.running_mean + f * mean
                self.running_var = (1 - f) * self.running_var + f * var * m / (m - 1)
        else:
            mean, var = self.running_mean, self.running_var
        invstd = 1.0 / np.sqrt(var + EPS)
        xhat = (x - self._shape(mean, x.ndim)) * self._shape(invstd, x.ndim)
        self._cache = (xhat, invstd, use_batch, m, axes)
        return self._shape(self.gamma, x.ndim) * xhat + self._shape(self.beta, x.ndim)

    def backward(self, dy):
        xhat, invstd, use_batch, m, axes = self._cache
        dy = np.asarray(dy, np.float64)
        dbeta = dy.sum(axis=axes)
        dgamma = (dy * xhat).sum(axis=axes)
        scale = self._shape(self.gamma * invstd, dy.ndim)
        if use_batch:
            dx = scale * (dy - self._shape(dbeta, dy.ndim) / m
                          - xhat * self._shape(dgamma, dy.ndim) / m)
        else:
            dx = scale * dy
        return dx, dgamma, dbeta


def assert_close(got, want, dtype, k=64, what=""):
    """Within k rounding errors of the dtype relative to the largest magnitude."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    atol = k * np.finfo(dtype).eps * (np.abs(want).max() + 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=what)


def random_shape(rng, rank, axis, C):
    shape = [int(d) for d in rng.integers(2, 5, size=rank)]
    shape[axis] = C
    return tuple(shape)


def random_batch(rng, shape, axis, dtype):
    """Fresh data with per-channel offsets and scales that change every step."""
    C = shape[axis]
    pshape = [1] * len(shape)
    pshape[axis] = C
    loc = rng.uniform(-3, 3, C).reshape(pshape)
    scale = rng.uniform(0.3, 3, C).reshape(pshape)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


CONFIGS = [
    # momentum, affine, track_running_stats
    (0.1, True, True),
    (0.5, True, True),
    (None, True, True),
    (0.1, False, True),
    (0.5, True, False),
    (None, False, False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "m{}-a{:d}-t{:d}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_training_steps_then_eval_match_torch_semantics(rank, axis, dtype, config):
    momentum, affine, track = config
    rng = np.random.default_rng(seed_of(rank, axis, dtype.__name__, config))
    C = int(rng.integers(1, 6))
    layer = BatchNorm(C, momentum=momentum, affine=affine, track_running_stats=track,
                      axis=axis, dtype=dtype)
    oracle = TorchSemantics(C, momentum, affine, track, axis)
    lr = 0.1

    def step(training):
        x = random_batch(rng, random_shape(rng, rank, axis, C), axis, dtype)
        dy = rng.normal(size=x.shape).astype(dtype)
        y = layer(x)
        want_y = oracle.forward(x, training)
        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y, want_y, dtype, what="y")
        dx = layer.backward(dy)
        want_dx, want_dgamma, want_dbeta = oracle.backward(dy)
        assert dx.dtype == dtype and dx.shape == x.shape
        assert_close(dx, want_dx, dtype, k=256, what="dx")
        if affine:
            assert_close(layer.dgamma, want_dgamma, dtype, k=256, what="dgamma")
            assert_close(layer.dbeta, want_dbeta, dtype, k=256, what="dbeta")
            # An optimizer step through `params`/`grads`, mirrored in the oracle.
            for name, p in layer.params.items():
                p -= lr * layer.grads[name]
            oracle.gamma = layer.gamma.astype(np.float64)
            oracle.beta = layer.beta.astype(np.float64)
        else:
            assert layer.gamma is None and layer.dgamma is None and layer.params == {}
        if track:
            assert layer.num_batches_tracked == oracle.num_batches_tracked
            assert layer.running_mean.dtype == layer.running_var.dtype == dtype
            assert_close(layer.running_mean, oracle.running_mean, dtype, what="running_mean")
            assert_close(layer.running_var, oracle.running_var, dtype, what="running_var")
        else:
            assert layer.running_mean is None and layer.running_var is None
            assert layer.num_batches_tracked is None

    for _ in range(3):
        step(training=True)
    assert layer.eval() is layer and not layer.training
    for _ in range(2):
        step(training=False)
    assert layer.train() is layer and layer.training
    step(training=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_backward_matches_cbn_reference_in_both_modes(dtype):
    rng = np.random.default_rng(17)
    layer = BatchNorm(3, dtype=dtype)
    layer.gamma = rng.uniform(0.5, 2, 3)
    layer.beta = rng.normal(size=3)
    g64, b64 = layer.gamma.astype(np.float64), layer.beta.astype(np.float64)
    x = random_batch(rng, (5, 3, 4), 1, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    layer(x)
    dx = layer.backward(dy)
    want = ref.backward_train(dy64, x64, g64, b64, EPS)
    for got, w in zip((dx, layer.dgamma, layer.dbeta), want):
        assert_close(got, w, dtype, k=256)
    layer.eval()
    layer(x)
    dx = layer.backward(dy)
    rm, rv = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
    want = ref.backward_eval(dy64, x64, rm, rv, g64, b64, EPS)
    for got, w in zip((dx, layer.dgamma, layer.dbeta), want):
        assert_close(got, w, dtype, k=256)


# ---------------------------------------------------------------------------
# Finite differences through the layer
# ---------------------------------------------------------------------------


def kink_free_beta(xhat, gamma, axis, rng):
    """beta putting each channel's ReLU threshold in the widest gap of its x_hat."""
    xc = np.moveaxis(xhat, axis, 0).reshape(xhat.shape[axis], -1)
    beta = np.empty(len(gamma))
    for c, v in enumerate(xc):
        v = np.unique(v)
        i = int(np.argmax(np.diff(v)))
        beta[c] = -gamma[c] * 0.5 * (v[i] + v[i + 1])
    shape = [1] * xhat.ndim
    shape[axis] = -1
    margin = np.min(np.abs(gamma.reshape(shape) * xhat + beta.reshape(shape)))
    return beta, margin


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape, axis", [((4, 3, 2), 1), ((3, 2, 3), -1), ((6, 2), 1)])
def test_layer_gradients_match_finite_differences(shape, axis, training, activation):
    rng = np.random.default_rng(seed_of(shape, axis, training, activation))
    C = shape[axis]
    layer = BatchNorm(C, axis=axis, dtype=np.float64, activation=activation, momentum=0.3)
    for _ in range(3):  # non-trivial running statistics
        layer(random_batch(rng, shape, axis, np.float64))
    layer.gamma = rng.choice([-1, 1], C) * rng.uniform(0.5, 2, C)
    layer.train(training)
    x = random_batch(rng, shape, axis, np.float64)
    if activation:
        cshape = [1] * len(shape)
        cshape[axis] = -1
        if training:
            axes = tuple(i for i in range(len(shape)) if i != axis % len(shape))
            mean, var = x.mean(axis=axes), x.var(axis=axes)
        else:
            mean, var = layer.running_mean, layer.running_var
        xhat = (x - mean.reshape(cshape)) / np.sqrt(var.reshape(cshape) + EPS)
        beta, margin = kink_free_beta(xhat, layer.gamma, axis % len(shape), rng)
        assert margin > 1e-3, "test data too close to the ReLU kink"
        layer.beta = beta
    else:
        layer.beta = rng.normal(size=C)
    w = rng.normal(size=shape)

    def loss():
        return float(np.sum(w * layer(x)))

    loss()
    dx = layer.backward(w)
    dgamma, dbeta = layer.dgamma.copy(), layer.dbeta.copy()
    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dgamma, numerical_grad(loss, layer.gamma), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbeta, numerical_grad(loss, layer.beta), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Parameters, modes, frozen statistics, state
# ---------------------------------------------------------------------------


def test_params_and_grads_are_the_very_arrays():
    rng = np.random.default_rng(1)
    layer = BatchNorm(3, dtype=np.float64)
    params, grads = layer.params, layer.grads
    ids = {k: id(v) for k, v in {**params, **grads}.items()}
    assert params["gamma"] is layer.gamma and params["beta"] is layer.beta
    assert grads["gamma"] is layer.dgamma and grads["beta"] is layer.dbeta
    x = random_batch(rng, (6, 3), 1, np.float64)
    layer(x)
    layer.backward(rng.normal(size=x.shape))
    # backward wrote into the arrays the optimizer holds, not new ones
    assert grads["gamma"] is layer.dgamma and np.any(grads["gamma"] != 0)
    params["gamma"] -= 0.5 * grads["gamma"]  # an optimizer step
    assert layer.gamma is params["gamma"]
    # assignment copies into the owned array, so held references stay live
    layer.gamma = np.full(3, 2.5)
    assert layer.gamma is params["gamma"] and np.all(params["gamma"] == 2.5)
    assert {k: id(v) for k, v in {**layer.params, **layer.grads}.items()} == ids
    assert BatchNorm(3, affine=False).params == {} and BatchNorm(3, affine=False).grads == {}


def test_train_and_eval_return_self():
    layer = BatchNorm(2)
    assert layer.training
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_frozen_statistics(dtype):
    rng = np.random.default_rng(seed_of("frozen", dtype.__name__))
    layer = BatchNorm(3, dtype=dtype)
    for _ in range(3):
        layer(random_batch(rng, (8, 3, 2), 1, dtype))
    layer.gamma = rng.uniform(0.5, 2, 3)
    layer.beta = rng.normal(size=3)
    assert layer.freeze() is layer
    rm, rv, n = layer.running_mean.copy(), layer.running_var.copy(), layer.num_batches_tracked
    x = random_batch(rng, (8, 3, 2), 1, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)

    y = layer(x)  # training mode, yet running statistics are used and kept
    assert layer.training
    assert np.array_equal(layer.running_mean, rm) and np.array_equal(layer.running_var, rv)
    assert layer.num_batches_tracked == n
    eval_y = layer.eval()(x)
    assert np.array_equal(y, eval_y)
    layer.train()  # does not unfreeze
    assert layer.frozen
    y2 = layer(x)
    assert np.array_equal(y2, y)
    assert np.array_equal(layer.running_mean, rm) and layer.num_batches_tracked == n
    # gradients flow, through fixed statistics
    dx = layer.backward(dy)
    want = ref.backward_eval(dy.astype(np.float64), x.astype(np.float64), rm.astype(np.float64),
                             rv.astype(np.float64), layer.gamma.astype(np.float64),
                             layer.beta.astype(np.float64), EPS)
    for got, w in zip((dx, layer.dgamma, layer.dbeta), want):
        assert_close(got, w, dtype, k=256)
    assert np.any(layer.dgamma != 0) and np.any(layer.dbeta != 0)
    # unfreeze: training statistics again
    assert layer.unfreeze() is layer
    layer(x)
    assert layer.num_batches_tracked == n + 1 and not np.array_equal(layer.running_mean, rm)
    with pytest.raises(ValueError, match="track_running_stats"):
        BatchNorm(3, track_running_stats=False).freeze()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("axis", [1, -1])
def test_state_dict_round_trip(dtype, axis):
    rng = np.random.default_rng(seed_of("state", dtype.__name__, axis))
    a = BatchNorm(4, dtype=dtype, axis=axis, momentum=None)
    for _ in range(3):
        x = random_batch(rng, random_shape(rng, 3, axis, 4), axis, dtype)
        a(x)
        a.backward(rng.normal(size=x.shape).astype(dtype))
        a.gamma -= 0.1 * a.dgamma
        a.beta -= 0.1 * a.dbeta
    state = a.state_dict()
    assert set(state) == {"gamma", "beta", "running_mean", "running_var", "num_batches_tracked"}
    assert state["num_batches_tracked"].dtype == np.int64 and int(state["num_batches_tracked"]) == 3
    for k in ("gamma", "beta", "running_mean", "running_var"):
        assert not np.shares_memory(state[k], getattr(a, k)), "state_dict must hold copies"

    b = BatchNorm(4, dtype=dtype, axis=axis, momentum=None)
    b.load_state_dict(state)
    x = random_batch(rng, random_shape(rng, 3, axis, 4), axis, dtype)
    assert np.array_equal(a.eval()(x), b.eval()(x))
    assert b.num_batches_tracked == 3
    # the cumulative average continues from the loaded count
    a.train()(x)
    b.train()(x)
    assert np.array_equal(a.running_mean, b.running_mean)
    assert np.array_equal(a.running_var, b.running_var)

    # PyTorch's names for the parameters
    torch_state = {("weight" if k == "gamma" else "bias" if k == "beta" else k): v
                   for k, v in state.items()}
    c = BatchNorm(4, dtype=dtype, axis=axis)
    c.load_state_dict(torch_state)
    assert np.array_equal(c.gamma, state["gamma"]) and np.array_equal(c.beta, state["beta"])
    with pytest.raises(KeyError, match="weight"):
        c.load_state_dict({**state, "weight": state["gamma"]})

    sd = BatchNorm(2, affine=False, track_running_stats=False).state_dict()
    assert sd == {}
    assert set(BatchNorm(2, affine=False).state_dict()) == {
        "running_mean", "running_var", "num_batches_tracked"}


# ---------------------------------------------------------------------------
# Bad input: error type, message, and state left bit-for-bit unchanged
# ---------------------------------------------------------------------------

STATE_ATTRS = ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked",
               "dgamma", "dbeta")


def snapshot(layer):
    return {k: np.array(getattr(layer, k), copy=True) for k in STATE_ATTRS}


def assert_unchanged(layer, snap):
    for k in STATE_ATTRS:
        now = np.asarray(getattr(layer, k))
        assert now.dtype == snap[k].dtype and np.array_equal(now, snap[k]), f"{k} changed"


def busy_forward(layer, x):
    """Hold the layer's guard as a second thread's call would, then call it."""
    with layer._busy:
        layer(x)


def busy_backward(layer, dy):
    with layer._busy:
        layer.backward(dy)


def other_float(dt):
    return np.float64 if dt == np.float32 else np.float32


def with_value(x, index, value):
    x = x.copy()
    x[index] = value
    return x


# Each case: (id, prepare(layer, rng) -> arg, call(layer, arg), exception, message regex).
# `x` below is the last forward input: shape (6, 4, 3) of the layer dtype.
BAD_INPUTS = [
    ("rank1", lambda L, x: x[:, 0, 0], lambda L, a: L(a), ValueError,
     r"at least 2 dimensions.*\(6,\)"),
    ("rank0", lambda L, x: x[0, 0, 0], lambda L, a: L(a), ValueError, "at least 2 dimensions"),
    ("wrong channels", lambda L, x: x[:, :3], lambda L, a: L(a), ValueError,
     r"3 channels.*expected 4"),
    ("int dtype", lambda L, x: x.astype(np.int64), lambda L, a: L(a), TypeError,
     "int64.*expected float"),
    ("mismatched float", lambda L, x: x.astype(other_float(L.dtype)), lambda L, a: L(a),
     TypeError, "expected float"),
    ("list of strings", lambda L, x: [["a"] * 4] * 2, lambda L, a: L(a), TypeError, "x"),
    ("one value per channel", lambda L, x: x[:1, :, :1], lambda L, a: L(a), ValueError,
     "more than 1 value per channel"),
    ("one sample (N, C)", lambda L, x: x[:1, :, 0], lambda L, a: L(a), ValueError,
     "more than 1 value per channel"),
    ("empty batch", lambda L, x: x[:0], lambda L, a: L(a), ValueError, "empty"),
    ("NaN in training batch", lambda L, x: with_value(x, (2, 1, 0), np.nan), lambda L, a: L(a),
     FloatingPointError, "channel 1"),
    ("Inf in training batch", lambda L, x: with_value(x, (0, 3, 2), np.inf), lambda L, a: L(a),
     FloatingPointError, "channel 3"),
    ("-Inf in training batch", lambda L, x: with_value(x, (5, 0, 1), -np.inf),
     lambda L, a: L(a), FloatingPointError, "not finite"),
    ("NaN in eval batch", lambda L, x: (L.eval(), with_value(x, (2, 1, 0), np.nan))[1],
     lambda L, a: L(a), FloatingPointError, "not finite"),
    ("output overflow", lambda L, x: (setattr(L, "gamma", np.full(4, np.finfo(L.dtype).max / 1.5)),
                                      x)[1], lambda L, a: L(a), FloatingPointError, "not finite"),
    ("dy wrong shape", lambda L, x: np.ones((6, 4, 2), L.dtype), lambda L, a: L.backward(a),
     ValueError, r"dy.*\(6, 4, 3\)"),
    ("dy wrong dtype", lambda L, x: np.ones(x.shape, other_float(L.dtype)),
     lambda L, a: L.backward(a), TypeError, "dy"),
    ("dy int dtype", lambda L, x: np.ones(x.shape, np.int32), lambda L, a: L.backward(a),
     TypeError, "dy"),
    ("NaN in dy", lambda L, x: with_value(np.ones_like(x), (1, 2, 0), np.nan),
     lambda L, a: L.backward(a), FloatingPointError, "dy"),
    ("Inf in dy (eval)", lambda L, x: (L.eval(), L(x), with_value(np.ones_like(x), 0, np.inf))[2],
     lambda L, a: L.backward(a), FloatingPointError, "dy"),
    ("busy forward", lambda L, x: x, busy_forward, RuntimeError, "another thread"),
    ("busy backward", lambda L, x: np.ones_like(x), busy_backward, RuntimeError,
     "another thread"),
    ("state missing key", lambda L, x: {k: v for k, v in L.state_dict().items()
                                        if k != "running_var"},
     lambda L, a: L.load_state_dict(a), KeyError, "missing.*running_var"),
    ("state extra key", lambda L, x: {**L.state_dict(), "momentum": np.array(0.1)},
     lambda L, a: L.load_state_dict(a), KeyError, "unexpected.*momentum"),
    ("state wrong shape", lambda L, x: {**L.state_dict(), "gamma": np.ones(5)},
     lambda L, a: L.load_state_dict(a), ValueError, r"gamma.*\(4,\).*\(5,\)"),
    ("state NaN", lambda L, x: {**L.state_dict(), "running_mean": np.array([0, np.nan, 0, 0])},
     lambda L, a: L.load_state_dict(a), ValueError, "running_mean.*NaN"),
    ("state Inf", lambda L, x: {**L.state_dict(), "beta": np.array([0, 0, np.inf, 0])},
     lambda L, a: L.load_state_dict(a), ValueError, "beta.*Inf"),
    ("state negative var", lambda L, x: {**L.state_dict(),
                                         "running_var": np.array([1.0, -0.5, 1.0, 1.0])},
     lambda L, a: L.load_state_dict(a), ValueError, "running_var"),
    ("state negative count", lambda L, x: {**L.state_dict(), "num_batches_tracked": np.array(-1)},
     lambda L, a: L.load_state_dict(a), ValueError, "num_batches_tracked"),
    ("state float count", lambda L, x: {**L.state_dict(), "num_batches_tracked": np.array(2.5)},
     lambda L, a: L.load_state_dict(a), ValueError, "num_batches_tracked"),
    ("state not a dict", lambda L, x: [("gamma", np.ones(4))], lambda L, a: L.load_state_dict(a),
     TypeError, "dict"),
    ("state string values", lambda L, x: {**L.state_dict(), "gamma": np.array(["a"] * 4)},
     lambda L, a: L.load_state_dict(a), TypeError, "gamma"),
    ("assign wrong shape", lambda L, x: np.ones(3),
     lambda L, a: setattr(L, "running_mean", a), ValueError, "running_mean"),
    ("assign NaN", lambda L, x: np.full(4, np.nan), lambda L, a: setattr(L, "gamma", a),
     ValueError, "gamma"),
]


def trained_layer(dtype, rng):
    """A layer with non-trivial state, a cached forward and written gradients."""
    layer = BatchNorm(4, dtype=dtype, momentum=0.2)
    for _ in range(2):
        x = random_batch(rng, (6, 4, 3), 1, dtype)
        layer(x)
        layer.backward(rng.normal(size=x.shape).astype(dtype))
        layer.gamma -= 0.3 * layer.dgamma
        layer.beta -= 0.3 * layer.dbeta
    x = random_batch(rng, (6, 4, 3), 1, dtype)
    layer(x)
    layer.backward(rng.normal(size=x.shape).astype(dtype))
    return layer, x


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_bad_input_raises_and_changes_nothing(dtype, case):
    _, prepare, call, exc, message = case
    rng = np.random.default_rng(seed_of("bad", dtype.__name__, case[0]))
    layer, x = trained_layer(dtype, rng)
    arg = prepare(layer, x)
    snap = snapshot(layer)
    with pytest.raises(exc, match=message):
        call(layer, arg)
    assert_unchanged(layer, snap)


def test_backward_before_forward_raises_and_changes_nothing():
    layer = BatchNorm(3, dtype=np.float64)
    layer.gamma = [0.5, 2.0, -1.0]
    layer.dgamma[...] = [1.0, 2.0, 3.0]
    snap = snapshot(layer)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((4, 3)))
    assert_unchanged(layer, snap)
    # load_state_dict drops the cached forward: its statistics no longer apply
    layer(np.random.default_rng(0).normal(size=(4, 3)))
    layer.load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((4, 3)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_one_value_per_channel_is_fine_in_eval(dtype):
    rng = np.random.default_rng(4)
    layer, _ = trained_layer(dtype, rng)
    layer.eval()
    snap = snapshot(layer)
    x = random_batch(rng, (1, 4), 1, dtype)
    y = layer(x)
    want = ((x - layer.running_mean) / np.sqrt(layer.running_var.astype(np.float64) + EPS)
            * layer.gamma + layer.beta)
    assert_close(y, want, dtype)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert np.array_equal(getattr(layer, k), snap[k])
    # but not with batch statistics in eval (track_running_stats=False), as in PyTorch
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm(4, dtype=dtype, track_running_stats=False).eval()(x)


def test_float32_variance_overflowing_running_var_raises():
    rng = np.random.default_rng(12)
    layer, _ = trained_layer(np.float32, rng)
    x = (rng.normal(size=(8, 4, 3)) * 1e30).astype(np.float32)  # var ~1e60 > float32 max
    snap = snapshot(layer)
    with pytest.raises(FloatingPointError, match="float32"):
        layer(x)
    assert_unchanged(layer, snap)


def test_float64_batch_whose_variance_overflows_raises():
    """A float64 batch spread over ~1e200 has no finite variance: the layer must
    raise and keep its running statistics, instead of normalizing with var = 0
    and folding mean 1e200 into running_mean (it did: see the report)."""
    layer = BatchNorm(2, dtype=np.float64)
    x = np.array([[0.0, 1.0], [1e200, 2.0], [2e200, 4.0]])
    snap = snapshot(layer)
    with pytest.raises(FloatingPointError):
        layer(x)
    assert_unchanged(layer, snap)


BAD_CONSTRUCTORS = [
    (dict(num_features=0), ValueError, "num_features"),
    (dict(num_features=-1), ValueError, "num_features"),
    (dict(num_features=2.5), TypeError, "num_features"),
    (dict(num_features=True), TypeError, "num_features"),
    (dict(num_features="4"), TypeError, "num_features"),
    (dict(num_features=4, eps=0), ValueError, "eps"),
    (dict(num_features=4, eps=-1), ValueError, "eps"),
    (dict(num_features=4, eps=float("nan")), ValueError, "eps"),
    (dict(num_features=4, eps="a"), TypeError, "eps"),
    (dict(num_features=4, momentum=-0.1), ValueError, "momentum"),
    (dict(num_features=4, momentum=1.5), ValueError, "momentum"),
    (dict(num_features=4, momentum=float("nan")), ValueError, "momentum"),
    (dict(num_features=4, momentum="a"), TypeError, "momentum"),
    (dict(num_features=4, dtype=np.int32), TypeError, "dtype"),
    (dict(num_features=4, dtype=np.float16), TypeError, "dtype"),
    (dict(num_features=4, dtype="banana"), TypeError, "dtype"),
    (dict(num_features=4, activation="tanh"), ValueError, "activation"),
    (dict(num_features=4, axis="1"), TypeError, "axis"),
    (dict(num_features=4, axis=1.0), TypeError, "axis"),
    (dict(num_features=4, n_threads=0), ValueError, "n_threads"),
    (dict(num_features=4, n_threads=2**40), ValueError, "n_threads must be at most"),
]


@pytest.mark.parametrize("kwargs, exc, message", BAD_CONSTRUCTORS,
                         ids=[repr(c[0]) for c in BAD_CONSTRUCTORS])
def test_bad_constructor_arguments(kwargs, exc, message):
    kwargs = dict(kwargs)
    n = kwargs.pop("num_features")
    with pytest.raises(exc, match=message):
        BatchNorm(n, **kwargs)


def test_good_constructor_arguments():
    layer = BatchNorm(np.int64(3), eps=1e-3, momentum=None, dtype="float64", axis=-1)
    assert layer.num_features == 3 and layer.momentum is None and layer.dtype == np.float64
    assert layer.gamma.shape == (3,) and np.all(layer.running_var == 1)
    assert layer.num_batches_tracked == 0 and layer.training and not layer.frozen
    for m in (0, 0.0, 1, 1.0):
        assert BatchNorm(2, momentum=m).momentum == float(m)


def test_a_layer_used_from_two_threads_at_once_raises():
    """The lock is taken here by hand, so the test does not depend on timing."""
    rng = np.random.default_rng(2)
    layer, x = trained_layer(np.float32, rng)
    snap = snapshot(layer)
    with layer._busy:
        with pytest.raises(RuntimeError, match="another thread"):
            layer(x)
        with pytest.raises(RuntimeError, match="another thread"):
            layer.backward(np.ones_like(x))
    assert_unchanged(layer, snap)
    layer(x)  # released again: usable
    layer.backward(np.ones_like(x))


@pytest.mark.parametrize("layout", ["F", "slice", "negative", "readonly"])
def test_any_layout_is_accepted_and_gives_the_same_result(layout):
    """Any layout gives the C-ordered batch's results: the same bits where it is
    copied, the same to rounding where it is normalized in its own order."""
    rng = np.random.default_rng(seed_of("layout", layout))
    x = random_batch(rng, (5, 3, 4), 1, np.float64)
    dy = rng.normal(size=x.shape)
    if layout == "F":
        xl, dyl = np.asfortranarray(x), np.asfortranarray(dy)
    elif layout == "slice":
        big = np.zeros((5, 3, 8))
        big[..., ::2] = x
        xl = big[..., ::2]
        bigd = np.zeros((5, 3, 8))
        bigd[..., ::2] = dy
        dyl = bigd[..., ::2]
    elif layout == "negative":
        xl, dyl = np.flip(np.flip(x).copy()), np.flip(np.flip(dy).copy())
    else:
        xl, dyl = x.copy(), dy.copy()
        xl.setflags(write=False)
        dyl.setflags(write=False)
    a, b = BatchNorm(3, dtype=np.float64), BatchNorm(3, dtype=np.float64)
    y, yl = a(x), b(xl)
    dx, dxl = a.backward(dy), b.backward(dyl)
    if layout == "F":
        # Normalized where it lies (its own summation order), laid out as it was.
        assert yl.flags.f_contiguous and dxl.flags.f_contiguous
        for got, want in ((yl, y), (dxl, dx), (b.dgamma, a.dgamma),
                          (b.running_var, a.running_var)):
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        return
    # Scattered or reversed values: normalized from a C-ordered copy, bit for bit.
    assert yl.flags.c_contiguous and dxl.flags.c_contiguous
    assert np.array_equal(y, yl)
    assert np.array_equal(dx, dxl)
    assert np.array_equal(a.dgamma, b.dgamma) and np.array_equal(a.running_var, b.running_var)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reset_running_stats_and_parameters_as_pytorch(dtype):
    """reset_running_stats: mean 0, var 1, count 0; then momentum=None
    re-estimates the statistics as the plain average of the next batches
    (the recipe of torch.optim.swa_utils.update_bn). reset_parameters also
    sets gamma 1 and beta 0, and makes a pending backward raise."""
    rng = np.random.default_rng()
    C = int(rng.integers(2, 9))
    layer = BatchNorm(C, dtype=dtype)
    layer.gamma = rng.uniform(0.5, 2, C)
    layer.beta = rng.uniform(-1, 1, C)
    for _ in range(3):
        layer.forward((rng.standard_normal((16, C)) * 3 + 2).astype(dtype))
    gamma, beta = layer.gamma.copy(), layer.beta.copy()
    layer.reset_running_stats()
    assert layer.running_mean.tobytes() == np.zeros(C, dtype).tobytes()
    assert layer.running_var.tobytes() == np.ones(C, dtype).tobytes()
    assert layer.num_batches_tracked == 0
    assert layer.gamma.tobytes() == gamma.tobytes() and layer.beta.tobytes() == beta.tobytes()

    layer.momentum = None
    xs = [(rng.standard_normal((int(rng.integers(4, 20)), C)) * rng.uniform(0.5, 3)
           + rng.uniform(-2, 2)).astype(dtype) for _ in range(4)]
    for x in xs:
        layer.forward(x)
    x64 = [x.astype(np.float64) for x in xs]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer.running_mean, np.mean([x.mean(0) for x in x64], 0),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(layer.running_var,
                               np.mean([x.var(0, ddof=1) for x in x64], 0), rtol=tol)

    dy = rng.standard_normal(xs[-1].shape).astype(dtype)
    layer.reset_parameters()
    assert layer.gamma.tobytes() == np.ones(C, dtype).tobytes()
    assert layer.beta.tobytes() == np.zeros(C, dtype).tobytes()
    assert layer.num_batches_tracked == 0
    with pytest.raises(RuntimeError, match="assigned after the forward"):
        layer.backward(dy)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reset_parameters_gives_pytorchs_state(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    C = int(rng.integers(2, 9))
    layer = BatchNorm(C, dtype=dtype)
    layer.gamma = rng.uniform(0.5, 2, C)
    layer.forward(rng.standard_normal((16, C)).astype(dtype))
    layer.reset_parameters()
    peer = torch.nn.BatchNorm1d(C, dtype=getattr(torch, np.dtype(dtype).name))
    peer.weight.data.uniform_(0.5, 2)
    peer(torch.randn(16, C, dtype=peer.weight.dtype))
    peer.reset_parameters()
    state = {k: v.numpy() for k, v in peer.state_dict().items()}
    mine = layer.state_dict()
    assert mine["gamma"].tobytes() == state["weight"].tobytes()
    assert mine["beta"].tobytes() == state["bias"].tobytes()
    assert mine["running_mean"].tobytes() == state["running_mean"].tobytes()
    assert mine["running_var"].tobytes() == state["running_var"].tobytes()
    assert int(mine["num_batches_tracked"]) == int(state["num_batches_tracked"])


def test_reset_without_running_statistics_or_affine():
    layer = BatchNorm(3, affine=False, track_running_stats=False)
    layer.reset_running_stats()
    layer.reset_parameters()
    assert layer.running_mean is None and layer.gamma is None
    x = np.random.default_rng().standard_normal((8, 3)).astype(np.float32)
    assert layer.forward(x).shape == x.shape
