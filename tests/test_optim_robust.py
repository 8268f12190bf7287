"""Robustness of cbn.optim: what the optimizers refuse, and that a refused step changes nothing."""

import numpy as np
import pytest

from cbn.optim import SGD, Adam, Momentum, RMSprop, make_optimizer

# np.matrix is built on purpose here, to check that it is refused.
pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

ALL = [SGD, Momentum, RMSprop, Adam]
WITH_EPS = [RMSprop, Adam]
# The key checked last: without validation up front, the keys before it
# would already be updated when its update fails.
LAST = "2.b"


def problem(rng, dtype=np.float64):
    """Random parameters and gradients keyed like a model's, LAST last."""
    params = {"0.W": rng.standard_normal((3, 4)).astype(dtype),
              "1.gamma": rng.uniform(0.5, 1.5, 4).astype(dtype),
              LAST: rng.standard_normal((2, 2)).astype(dtype)}
    grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
    return params, grads


def snapshot(opt):
    """The bytes of every parameter and state array, and t."""
    arrays = {f"params[{k}]": p for k, p in opt.params.items()}
    for name in ("v", "s"):
        for k, a in getattr(opt, name, {}).items():
            arrays[f"{name}[{k}]"] = a
    return {name: (a.dtype, a.shape, a.tobytes()) for name, a in arrays.items()}, opt.t


def warmed_up(cls, rng, dtype=np.float64):
    """An optimizer after two valid steps, so its state is not all zeros."""
    params, grads = problem(rng, dtype)
    opt = cls(params, grads, lr=0.01, weight_decay=0.01)
    for _ in range(2):
        for g in grads.values():
            g[...] = rng.standard_normal(g.shape)
        opt.step()
    return opt, params, grads


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad_dtype", [np.complex128, object, np.float32, np.int64])
def test_constructor_refuses_gradient_of_another_dtype(cls, bad_dtype):
    rng = np.random.default_rng(1)
    params, grads = problem(rng)
    grads[LAST] = grads[LAST].astype(bad_dtype)
    with pytest.raises(TypeError, match=rf"grads\['{LAST}'\] must have the dtype of "
                                        rf"params\['{LAST}'\], float64, got {np.dtype(bad_dtype)}"):
        cls(params, grads)


def _swap_grad(dtype=None, shape=None):
    def breaks(params, grads, rng):
        g = grads[LAST]
        grads[LAST] = rng.standard_normal(shape or g.shape).astype(dtype or g.dtype)
    return breaks


def _read_only(params, grads, rng):
    params[LAST].flags.writeable = False


def _rebind_param_float32(params, grads, rng):
    params[LAST] = params[LAST].astype(np.float32)
    grads[LAST] = grads[LAST].astype(np.float32)


def _grad_matrix(params, grads, rng):
    grads[LAST] = np.asmatrix(rng.standard_normal((2, 2)))


def _reshape_param(params, grads, rng):
    params[LAST] = params[LAST].reshape(4)  # the same memory, but not the shape the state has
    grads[LAST] = grads[LAST].reshape(4)


def _grad_list(params, grads, rng):
    grads[LAST] = list(grads[LAST])


def _new_key(params, grads, rng):
    params["3.W"] = rng.standard_normal(2)
    grads["3.W"] = rng.standard_normal(2)


def _grad_key_dropped(params, grads, rng):
    del grads[LAST]


# (how the dicts break between steps, exception, text the message must hold)
BREAKS = {
    "complex_grad": (_swap_grad(np.complex128), TypeError,
                     rf"grads\['{LAST}'\].*float64, got complex128"),
    "object_grad": (_swap_grad(object), TypeError, rf"grads\['{LAST}'\].*float64, got object"),
    "float32_grad": (_swap_grad(np.float32), TypeError,
                     rf"grads\['{LAST}'\].*float64, got float32"),
    # (1,) would broadcast silently over (2, 2)
    "short_grad": (_swap_grad(shape=(1,)), ValueError,
                   rf"grads\['{LAST}'\].*shape.*\(2, 2\), got \(1,\)"),
    "list_grad": (_grad_list, TypeError, rf"grads\['{LAST}'\] must be an ndarray, got list"),
    "matrix_grad": (_grad_matrix, TypeError, rf"grads\['{LAST}'\] is a numpy\.matrix"),
    "read_only_param": (_read_only, ValueError, rf"params\['{LAST}'\] is read-only"),
    "float32_param": (_rebind_param_float32, ValueError,
                      rf"params\['{LAST}'\] is now float32.*built for float64"),
    "reshaped_param": (_reshape_param, ValueError,
                       rf"params\['{LAST}'\] is now float64 of shape \(4,\).*\(2, 2\)"),
    "new_key": (_new_key, ValueError, r"params keys changed.*3\.W"),
    "grad_key_dropped": (_grad_key_dropped, ValueError, "same keys"),
}


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("breaks, exc, message", BREAKS.values(), ids=BREAKS.keys())
def test_refused_step_changes_nothing(cls, breaks, exc, message):
    rng = np.random.default_rng(2)
    opt, params, grads = warmed_up(cls, rng)
    breaks(params, grads, rng)
    before = snapshot(opt)
    with pytest.raises(exc, match=message):
        opt.step()
    assert snapshot(opt) == before


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("which", ["params", "grads"])
@pytest.mark.parametrize("wrap, type_name", [(np.asmatrix, r"numpy\.matrix"),
                                             (np.ma.asarray, r"numpy\.ma\..*MaskedArray")])
def test_ndarray_subclasses_refused(cls, which, wrap, type_name):
    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal((3, 3))}
    grads = {"w": rng.standard_normal((3, 3))}
    target = params if which == "params" else grads
    target["w"] = wrap(target["w"])
    with pytest.raises(TypeError, match=rf"{which}\['w'\] is a {type_name}.*np\.asarray"):
        cls(params, grads)


@pytest.mark.parametrize("cls", [RMSprop, Adam])
def test_asarray_view_of_a_matrix_is_updated_elementwise_in_place(cls):
    # The way out the error message offers: a plain view of the matrix.
    rng = np.random.default_rng(5)
    m = np.asmatrix(rng.standard_normal((3, 3)))
    g = rng.standard_normal((3, 3))
    plain = {"w": np.array(m)}
    expected = cls(plain, {"w": g.copy()}, lr=0.1)
    got = cls({"w": np.asarray(m)}, {"w": g.copy()}, lr=0.1)
    expected.step()
    got.step()
    assert np.array_equal(np.asarray(m), plain["w"])


@pytest.mark.parametrize("cls", WITH_EPS)
@pytest.mark.parametrize("dtype, eps, problem_text", [
    (np.float32, 1e-50, "rounds to 0 in float32"),
    (np.float32, 1e-40, "is subnormal in float32"),
    (np.float16, 1e-8, "rounds to 0 in float16"),  # the default eps
    (np.float16, 1e5, "overflows to inf in float16"),
])
def test_eps_must_survive_the_parameter_dtype(cls, dtype, eps, problem_text):
    rng = np.random.default_rng(6)
    params, grads = problem(rng)
    params["1.gamma"] = params["1.gamma"].astype(dtype)
    grads["1.gamma"] = grads["1.gamma"].astype(dtype)
    kwargs = {} if eps == 1e-8 else {"eps": eps}
    with pytest.raises(ValueError, match=rf"eps={eps!r} {problem_text}.*params\['1\.gamma'\]"):
        cls(params, grads, **kwargs)
    with pytest.raises(ValueError, match=rf"eps={eps!r} {problem_text}"):
        make_optimizer(cls.__name__, params, grads, **kwargs)


@pytest.mark.parametrize("cls", WITH_EPS)
def test_smallest_normal_eps_gives_finite_steps_with_zero_gradients(cls):
    # The failure the eps check prevents: 0 / (sqrt(0) + 0) = nan.
    rng = np.random.default_rng(7)
    params = {"w": rng.standard_normal(5).astype(np.float32)}
    opt = cls(params, {"w": np.zeros(5, np.float32)}, eps=float(np.finfo(np.float32).tiny))
    opt.step()
    assert np.all(np.isfinite(params["w"]))


@pytest.mark.parametrize("cls", ALL)
def test_lr_and_weight_decay_must_stay_finite_and_nonzero_in_the_dtype(cls):
    rng = np.random.default_rng(8)
    params, grads = problem(rng, np.float32)
    with pytest.raises(ValueError, match=r"lr=1e\+300 overflows to inf in float32.*params\['0\.W'\]"):
        cls(params, grads, lr=1e300)
    with pytest.raises(ValueError, match=r"lr=1e-50 rounds to 0 in float32"):
        cls(params, grads, lr=1e-50)
    with pytest.raises(ValueError, match=r"weight_decay=1e\+300 overflows to inf in float32"):
        cls(params, grads, weight_decay=1e300)


@pytest.mark.parametrize("cls", ALL)
def test_non_str_keys_refused(cls):
    # Weight decay reads the key's last component; an int key used to fail inside step().
    rng = np.random.default_rng(9)
    with pytest.raises(TypeError, match="params keys must be str.*int 1"):
        cls({1: rng.standard_normal(3)}, {1: rng.standard_normal(3)}, weight_decay=0.1)


@pytest.mark.parametrize("cls", ALL)
def test_memmap_parameters_are_updated_in_place(cls, tmp_path):
    # A memmap is the one ndarray subclass kept: its arithmetic is the ndarray's.
    rng = np.random.default_rng(10)
    start = rng.standard_normal(6)
    g = rng.standard_normal(6)
    mm = np.memmap(tmp_path / "w.bin", dtype=np.float64, mode="w+", shape=(6,))
    mm[:] = start
    plain = {"w": start.copy()}
    opt = cls({"w": mm}, {"w": g.copy()}, lr=0.1)
    reference = cls(plain, {"w": g.copy()}, lr=0.1)
    for o in (opt, reference):
        o.step()
        o.step()
    assert np.array_equal(np.asarray(mm), plain["w"])
    assert all(type(a) is np.ndarray for name in ("v", "s") for a in getattr(opt, name, {}).values())


# Hyper-parameters reassigned between steps (a schedule's opt.lr = ...) are
# checked as the constructor checks them: unchecked, opt.lr = "0.1" failed in
# step() after t and part of the state had moved, and opt.lr = -5 (or
# Adam.beta1 = 1.0) corrupted the parameters without an error.
REASSIGNED = [
    (ALL, "lr", -5.0, ValueError),
    (ALL, "lr", 0.0, ValueError),
    (ALL, "lr", "0.1", TypeError),
    (ALL, "lr", float("nan"), ValueError),
    (ALL, "lr", 1e-320, ValueError),           # 0 in float32, subnormal in float64
    (ALL, "weight_decay", -0.1, ValueError),
    (ALL, "weight_decay", float("inf"), ValueError),
    ([Momentum, RMSprop], "beta", 1.0, ValueError),
    ([Momentum, RMSprop], "beta", True, TypeError),
    ([Adam], "beta1", 1.0, ValueError),
    ([Adam], "beta2", -0.5, ValueError),
    (WITH_EPS, "eps", 0.0, ValueError),
    (WITH_EPS, "eps", 1e-45, ValueError),      # subnormal in float32
]


@pytest.mark.parametrize("classes,name,value,exc",
                         REASSIGNED, ids=[f"{r[1]}={r[2]!r}" for r in REASSIGNED])
def test_reassigned_hyperparameters_are_checked(classes, name, value, exc):
    rng = np.random.default_rng()
    for cls in classes:
        opt = warmed_up(cls, rng, np.float32)[0]
        old = getattr(opt, name)
        before = snapshot(opt)
        with pytest.raises(exc, match=name):
            setattr(opt, name, value)
        assert getattr(opt, name) == old
        opt.step()  # still steps, with the old value
        assert snapshot(opt)[1] == before[1] + 1


@pytest.mark.parametrize("cls", ALL)
def test_reassigned_learning_rate_takes_effect(cls):
    rng = np.random.default_rng()
    params, grads = problem(rng)
    twin_params = {k: v.copy() for k, v in params.items()}
    twin_grads = {k: v.copy() for k, v in grads.items()}
    opt = cls(params, grads, lr=0.1)
    twin = cls(twin_params, twin_grads, lr=0.1)
    opt.step()
    twin.step()
    opt.lr = np.float64(0.01)      # a NumPy scalar is taken as a float
    assert type(opt.lr) is float
    twin.lr = 0.01
    opt.step()
    twin.step()
    for k in params:
        assert params[k].tobytes() == twin_params[k].tobytes()


def test_decay_bn_switched_on_later_checks_the_decay_in_every_dtype():
    rng = np.random.default_rng()
    params = {"0.W": rng.standard_normal((3, 2)),
              "1.gamma": rng.uniform(0.5, 1.5, 2).astype(np.float16)}
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    opt = SGD(params, grads, lr=0.1, weight_decay=1e-9)  # fine for the float64 W alone
    with pytest.raises(ValueError, match="weight_decay"):
        opt.decay_bn = True     # 1e-9 rounds to 0 in float16
    assert opt.decay_bn is False
