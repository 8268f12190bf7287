"""Optimizer checkpoints: state_dict / load_state_dict resume training exactly,
and a bad state changes nothing."""

import numpy as np
import pytest

from cbn import optim
from cbn.nn import Sequential, SoftmaxCrossEntropy, mlp

KINDS = {
    "sgd": {"lr": 0.05, "weight_decay": 1e-3},
    "momentum": {"lr": 0.05, "beta": 0.8},
    "rmsprop": {"lr": 3e-3, "beta": 0.95, "eps": 1e-7},
    "adam": {"lr": 3e-3, "beta1": 0.85, "beta2": 0.99, "weight_decay": 1e-4, "decay_bn": True},
}


def _data(rng, n=64):
    X = rng.standard_normal((n, 6)).astype(np.float64)
    y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).astype(np.int64) + (X[:, 3] > 1)
    return X, y


def _steps(model, opt, X, y, rng, n):
    crit = SoftmaxCrossEntropy()
    for _ in range(n):
        idx = rng.choice(len(X), 16, replace=False)
        _, dz = crit(model.forward(X[idx]), y[idx])
        model.backward(dz)
        opt.step()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_training_resumed_from_a_checkpoint_continues_exactly(kind, tmp_path):
    rng = np.random.default_rng()
    seed = int(rng.integers(2**31))
    X, y = _data(rng)
    model = mlp([6, 12, 3], rng=seed, dtype=np.float64)
    opt = optim.make_optimizer(kind, model.params, model.grads, **KINDS[kind])
    _steps(model, opt, X, y, np.random.default_rng(seed), 7)
    model.save(tmp_path / "model.npz")
    np.savez(tmp_path / "opt.npz", **opt.state_dict())
    _steps(model, opt, X, y, np.random.default_rng(seed + 1), 5)

    resumed = Sequential.load(tmp_path / "model.npz")
    opt2 = optim.make_optimizer(kind, resumed.params, resumed.grads)  # default hypers
    with np.load(tmp_path / "opt.npz") as saved:
        opt2.load_state_dict(saved)
    assert opt2.t == 7 and all(getattr(opt2, k) == v for k, v in KINDS[kind].items())
    _steps(resumed, opt2, X, y, np.random.default_rng(seed + 1), 5)
    for key, p in model.params.items():
        np.testing.assert_array_equal(resumed.params[key], p, err_msg=key)
    assert opt2.t == opt.t == 12

    if kind != "sgd":  # without the running averages the same steps go elsewhere
        fresh = Sequential.load(tmp_path / "model.npz")
        opt3 = optim.make_optimizer(kind, fresh.params, fresh.grads, **KINDS[kind])
        _steps(fresh, opt3, X, y, np.random.default_rng(seed + 1), 5)
        assert any(not np.array_equal(fresh.params[k], p) for k, p in model.params.items())


def _trained_adam(rng):
    model = mlp([6, 8, 3], rng=1, dtype=np.float32)
    opt = optim.Adam(model.params, model.grads, lr=1e-2)
    X, y = _data(rng)
    _steps(model, opt, X.astype(np.float32), y, rng, 3)
    return opt


def _bad_states(state):
    key = "v.0.W"
    shape = state[key].shape

    def edit(**changes):
        out = dict(state)
        for k, v in changes.items():
            if v is None:
                del out[k]
            else:
                out[k] = v
        return out

    masked = np.ma.masked_array(state[key], mask=np.zeros(shape, bool))
    return [
        (edit(**{key: None}), KeyError, r"missing keys \['v.0.W'\]"),
        (dict(state, extra=np.ones(1)), KeyError, r"unexpected keys \['extra'\]"),
        (edit(**{key: np.ones((2, 2))}), ValueError, "has shape"),
        (edit(**{key: np.full(shape, np.nan)}), ValueError, "NaN or Inf"),
        (edit(**{key: np.full(shape, 1e300)}), ValueError, "NaN or Inf"),
        (edit(**{"s.0.W": -np.ones(shape)}), ValueError, "must not be negative"),
        (edit(**{key: np.full(shape, "x")}), TypeError, "must be numeric"),
        (edit(**{key: masked}), TypeError, "masked"),
        (edit(t=np.array(-1)), ValueError, "non-negative"),
        (edit(t=1.5), TypeError, "non-negative int"),
        (edit(t=True), TypeError, "non-negative int"),
        (edit(lr=np.array(-0.1)), ValueError, "lr must be finite and > 0"),
        (edit(eps=np.array(1e-60)), ValueError, "eps=1e-60"),  # 0 in float32
        # a valid lr with a bad eps: the lr must not stay either
        (edit(lr=np.array(0.5), beta1=np.array(0.5), eps=np.array(1e-60)), ValueError, "eps"),
        (edit(beta1=np.ones(2)), ValueError, "single value"),
        (edit(decay_bn=np.array("no")), TypeError, "decay_bn must be True or False"),
        ([1, 2], TypeError, "state must be a dict"),
    ]


def test_a_bad_state_is_refused_and_changes_nothing():
    rng = np.random.default_rng()
    opt = _trained_adam(rng)
    good = opt.state_dict()
    for bad, error, message in _bad_states(good):
        with pytest.raises(error, match=message):
            opt.load_state_dict(bad)
        now = opt.state_dict()
        assert now.keys() == good.keys()
        for k in good:
            assert now[k].tobytes() == good[k].tobytes(), (message, k)


def test_state_dict_is_a_copy_and_names_every_hyper_parameter():
    opt = _trained_adam(np.random.default_rng())
    state = opt.state_dict()
    assert {"t", "lr", "weight_decay", "decay_bn", "beta1", "beta2", "eps"} <= set(state)
    assert state["t"].dtype == np.int64 and int(state["t"]) == 3
    state["v.0.W"][...] = 0
    assert np.any(opt.v["0.W"] != 0)
    with pytest.raises(KeyError, match="missing keys"):  # an Adam state into RMSprop
        optim.RMSprop(opt.params, opt.grads).load_state_dict(state)


def test_the_step_count_is_checked():
    opt = _trained_adam(np.random.default_rng())
    for bad, error in ((-1, ValueError), (2**63, ValueError), (1.5, TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match="t must be a non-negative"):
            opt.t = bad
        with pytest.raises(error, match="non-negative"):
            opt.load_state_dict(dict(opt.state_dict(), t=bad))
    assert opt.t == 3
    opt.t = 2**63 - 1
    assert int(opt.state_dict()["t"]) == 2**63 - 1


def test_parameters_that_share_memory_are_refused():
    """Each key's update would move a shared array: a step would apply twice."""
    W = np.ones(3, np.float32)
    for params in ({"a": W, "b": W}, {"row": W[:1], "all": W[::-1]}):
        grads = {k: np.ones_like(v) for k, v in params.items()}
        for kind in optim.OPTIMIZERS.values():
            with pytest.raises(ValueError, match="share memory"):
                kind(params, grads)
    flat, gflat = np.zeros(10, np.float32), np.zeros(10, np.float32)
    opt = optim.SGD({"even": flat[::2], "odd": flat[1::2]},  # interleaved, disjoint: fine
                    {"even": gflat[::2], "odd": gflat[1::2]})
    gflat[:] = 1
    opt.step()
    np.testing.assert_array_equal(flat, np.full(10, -0.1, np.float32))
