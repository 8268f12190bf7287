"""Tests of cbn.optim: each optimizer against its textbook update."""

import numpy as np
import pytest

from cbn.optim import SGD, Adam, Momentum, RMSprop, make_optimizer

N_STEPS = 4


def problem(rng, dtype=np.float64):
    params = {"0.W": rng.standard_normal((3, 4)).astype(dtype),
              "1.gamma": rng.uniform(0.5, 1.5, 4).astype(dtype),
              "1.beta": rng.standard_normal(4).astype(dtype)}
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    return params, grads


def run(opt, params, grads, rng):
    """Take N_STEPS steps with fresh random gradients; return those gradients."""
    seen = []
    for _ in range(N_STEPS):
        for g in grads.values():
            g[...] = rng.standard_normal(g.shape)
        seen.append({k: g.copy() for k, g in grads.items()})
        opt.step()
    return seen


def textbook(name, p0, gs, lr, **hp):
    """Reference updates written out for one array, step by step."""
    p = p0.copy()
    v = np.zeros_like(p)
    s = np.zeros_like(p)
    for t, g in enumerate(gs, 1):
        if name == "sgd":
            p = p - lr * g
        elif name == "momentum":
            v = 0.9 * v + 0.1 * g
            p = p - lr * v
        elif name == "rmsprop":
            s = 0.999 * s + 0.001 * g ** 2
            p = p - lr * g / (np.sqrt(s) + 1e-8)
        elif name == "adam":
            v = 0.9 * v + 0.1 * g
            s = 0.999 * s + 0.001 * g ** 2
            p = p - lr * (v / (1 - 0.9 ** t)) / (np.sqrt(s / (1 - 0.999 ** t)) + 1e-8)
    return p


@pytest.mark.parametrize("name, cls", [("sgd", SGD), ("momentum", Momentum),
                                       ("rmsprop", RMSprop), ("adam", Adam)])
def test_matches_textbook_update_in_place(name, cls):
    rng = np.random.default_rng()
    params, grads = problem(rng)
    start = {k: v.copy() for k, v in params.items()}
    arrays = dict(params)
    lr = 0.05
    opt = cls(params, grads, lr=lr)
    seen = run(opt, params, grads, rng)
    for key, p in params.items():
        assert p is arrays[key]  # updated in place
        expected = textbook(name, start[key], [g[key] for g in seen], lr)
        np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-14, err_msg=key)


@pytest.mark.parametrize("cls", [SGD, Momentum, RMSprop, Adam])
def test_float32_stays_float32(cls):
    rng = np.random.default_rng()
    params, grads = problem(rng, np.float32)
    opt = cls(params, grads, lr=0.01)
    run(opt, params, grads, rng)
    assert all(p.dtype == np.float32 for p in params.values())


@pytest.mark.parametrize("decay_bn", [False, True])
def test_weight_decay_skips_gamma_beta_unless_asked(decay_bn):
    rng = np.random.default_rng()
    params, grads = problem(rng)
    start = {k: v.copy() for k, v in params.items()}
    opt = SGD(params, grads, lr=0.1, weight_decay=0.01, decay_bn=decay_bn)
    opt.step()  # zero gradients: only decay moves the parameters
    np.testing.assert_allclose(params["0.W"], start["0.W"] * (1 - 0.1 * 0.01))
    for key in ("1.gamma", "1.beta"):
        expected = start[key] * (1 - 0.001) if decay_bn else start[key]
        np.testing.assert_allclose(params[key], expected)


def test_adam_minimizes_a_quadratic():
    rng = np.random.default_rng()
    target = rng.standard_normal(5)
    params = {"x": np.zeros(5)}
    grads = {"x": np.zeros(5)}
    opt = Adam(params, grads, lr=0.05)
    for _ in range(500):
        grads["x"][...] = 2 * (params["x"] - target)
        opt.step()
    np.testing.assert_allclose(params["x"], target, atol=1e-3)


def test_make_optimizer():
    params, grads = problem(np.random.default_rng())
    assert isinstance(make_optimizer("Adam", params, grads), Adam)
    assert make_optimizer("adam", params, grads).lr == 0.001
    assert make_optimizer("sgd", params, grads, lr=0.3).lr == 0.3
    assert make_optimizer("momentum", params, grads, beta=0.5).beta == 0.5
    with pytest.raises(ValueError, match="name must be one of"):
        make_optimizer("lbfgs", params, grads)


def test_validation():
    params, grads = problem(np.random.default_rng())
    with pytest.raises(ValueError, match="same keys"):
        SGD(params, {"0.W": grads["0.W"]})
    with pytest.raises(ValueError, match=r"grads\['0.W'\]"):
        SGD(params, {**grads, "0.W": np.zeros(2)})
    with pytest.raises(ValueError, match="lr"):
        SGD(params, grads, lr=0)
    with pytest.raises(TypeError, match="lr"):
        SGD(params, grads, lr="0.1")
    with pytest.raises(ValueError, match="beta"):
        Momentum(params, grads, beta=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        Adam(params, grads, weight_decay=-1)
    with pytest.raises(TypeError, match="dicts"):
        SGD([1], [2])
    ro = params["0.W"].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        SGD({**params, "0.W": ro}, grads)
