"""Values that reach the kernels by a route other than a call's arguments:
layer attributes set after construction, the arrays update_running_stats
writes in place, array subclasses and flag-like arguments.

Each bad value must raise an exception that names it and leave the layer (or
the arrays) exactly as they were.
"""

import numpy as np
import pytest

import cbn
from cbn import functional as F
from cbn import nn

# np.matrix inputs are part of what is tested
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


@pytest.fixture
def rng(request):
    """Fresh random data on every run; the seed is in the test's report if it fails."""
    seed = np.random.SeedSequence().entropy
    request.node.user_properties.append(("seed", seed))
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def fresh(rng, shape, dtype=np.float32):
    C = shape[1]
    shift = rng.uniform(-2, 2, (1, C) + (1,) * (len(shape) - 2))
    return (shift + rng.uniform(0.5, 2) * rng.standard_normal(shape)).astype(dtype)


def trained(rng, C, dtype=np.float32, steps=3):
    layer = cbn.BatchNorm(C, dtype=dtype)
    for _ in range(steps):
        x = fresh(rng, (int(rng.integers(4, 20)), C), dtype)
        layer(x)
        layer.backward(rng.standard_normal(x.shape).astype(dtype))
    return layer


def snapshot(layer):
    arrays = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    arrays["dgamma"] = layer.dgamma.copy()
    arrays["dbeta"] = layer.dbeta.copy()
    config = layer.config()
    return arrays, config


def assert_same(layer, before):
    arrays, config = snapshot(layer)
    assert config == before[1]
    for k, v in before[0].items():
        assert arrays[k].tobytes() == v.tobytes(), k


# -- layer attributes -------------------------------------------------------

BAD_ATTRIBUTES = [
    ("eps", -1e-3, ValueError, "eps"),
    ("eps", 0.0, ValueError, "eps"),
    ("eps", float("nan"), ValueError, "eps"),
    ("eps", True, TypeError, "eps"),
    ("eps", "0.1", TypeError, "eps"),
    ("eps", 10**400, ValueError, "eps"),   # float() of it overflows
    ("momentum", 5.0, ValueError, "momentum"),
    ("momentum", -0.1, ValueError, "momentum"),
    ("momentum", True, TypeError, "momentum"),
    ("activation", "tanh", ValueError, "activation"),
    ("n_threads", 0, ValueError, "n_threads"),
    ("n_threads", True, TypeError, "n_threads"),
    ("n_threads", 2.0, TypeError, "n_threads"),
    ("axis", True, TypeError, "axis"),
    ("axis", 1.0, TypeError, "axis"),
    ("num_features", 3, AttributeError, "num_features"),
    ("dtype", np.float64, AttributeError, "dtype"),
    ("affine", False, AttributeError, "affine"),
    ("track_running_stats", False, AttributeError, "track_running_stats"),
    # momentum=None weighs the next batch by 1 / (count + 1): a negative count
    # made that -1/2 and the running mean -0.5x the batch's, silently.
    ("num_batches_tracked", -3, ValueError, "num_batches_tracked"),
    ("num_batches_tracked", -1, ValueError, "num_batches_tracked"),
    ("num_batches_tracked", 1.5, TypeError, "num_batches_tracked"),
    ("num_batches_tracked", True, TypeError, "num_batches_tracked"),
    ("num_batches_tracked", None, TypeError, "num_batches_tracked"),
    ("num_batches_tracked", 2**63, ValueError, "num_batches_tracked"),
    ("training", "no", TypeError, "training"),
    ("training", 0, TypeError, "training"),
    ("frozen", "yes", TypeError, "frozen"),
]


@pytest.mark.parametrize("name,value,exc,needle", BAD_ATTRIBUTES)
def test_bad_attribute_is_refused_and_changes_nothing(rng, name, value, exc, needle):
    C = int(rng.integers(2, 7))
    layer = trained(rng, C)
    before = snapshot(layer)
    with pytest.raises(exc, match=needle):
        setattr(layer, name, value)
    assert_same(layer, before)
    # and the layer still works, with what it had
    x = fresh(rng, (9, C))
    y = layer(x)
    assert np.isfinite(y).all()


def test_good_attributes_take_effect(rng):
    C = 5
    x = fresh(rng, (16, C), np.float64)
    layer = cbn.BatchNorm(C, dtype=np.float64)
    layer.eps = 0.5
    layer.activation = "relu"
    layer.momentum = None
    y = layer(x)
    mu, var = x.mean(0), x.var(0)
    np.testing.assert_allclose(y, np.maximum((x - mu) / np.sqrt(var + 0.5), 0), atol=1e-12)
    # momentum=None after one batch: the running mean is that batch's mean; a mean
    # near 0 is known only to ~eps * max|x| (seen 2 eps), not to 1e-12 of itself
    np.testing.assert_allclose(layer.running_mean, mu, rtol=1e-12,
                               atol=64 * np.finfo(np.float64).eps * np.abs(x).max())
    layer.n_threads = None
    layer.axis = -1
    assert layer.config()["axis"] == -1 and layer.config()["n_threads"] is None


@pytest.mark.parametrize("name", ["dgamma", "dbeta", "gamma", "beta", "running_mean",
                                  "running_var"])
def test_short_vector_is_refused_not_written_past(rng, name):
    C = int(rng.integers(3, 9))
    layer = trained(rng, C)
    guard = rng.standard_normal(C).astype(np.float32)
    view = guard[:1]
    before = snapshot(layer)
    with pytest.raises(ValueError, match=name):
        setattr(layer, name, view)
    assert_same(layer, before)
    x = fresh(rng, (7, C))
    layer(x)
    layer.backward(rng.standard_normal(x.shape).astype(np.float32))
    # the buffer the bad assignment offered was never written
    assert np.array_equal(guard, guard.copy()) and guard[1:].size == C - 1


def test_gradient_assignment_copies_into_the_layer(rng):
    C = 4
    layer = trained(rng, C)
    grads = layer.grads
    value = rng.standard_normal(C).astype(np.float32)
    layer.dgamma = value
    assert grads["gamma"] is layer.dgamma and np.array_equal(layer.dgamma, value)
    x = fresh(rng, (10, C))
    layer(x)
    layer.backward(rng.standard_normal(x.shape).astype(np.float32))
    assert grads["gamma"] is layer.dgamma and not np.array_equal(layer.dgamma, value)


def test_negative_running_var_is_refused(rng):
    layer = trained(rng, 3)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="running_var must be non-negative"):
        layer.running_var = np.array([0.5, -1e-3, 2.0])
    assert_same(layer, before)


@pytest.mark.parametrize("flag", ["affine", "track_running_stats"])
@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_constructor_switches_must_be_bool(flag, value):
    with pytest.raises(TypeError, match=flag):
        cbn.BatchNorm(3, **{flag: value})
    assert cbn.BatchNorm(3, **{flag: np.bool_(False)}).config()[flag] is False


def test_n_threads_survives_save_and_load(rng, tmp_path):
    layer = trained(rng, 4)
    layer.n_threads = -1
    layer.save(tmp_path / "bn.npz")
    assert cbn.BatchNorm.load(tmp_path / "bn.npz").n_threads == -1


def test_oversized_num_batches_tracked_is_refused(rng):
    layer = trained(rng, 3)
    state = layer.state_dict()
    state["num_batches_tracked"] = np.array(2**64 - 1, np.uint64)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        layer.load_state_dict(state)
    assert_same(layer, before)


# -- functional flags and subclasses ------------------------------------------

@pytest.mark.parametrize("kwargs,exc,needle", [
    ({"eps": True}, TypeError, "eps"),
    ({"eps": "1e-5"}, TypeError, "eps"),
    ({"axis": True}, TypeError, "axis"),
    ({"n_threads": True}, TypeError, "n_threads"),
    ({"n_threads": np.bool_(True)}, TypeError, "n_threads"),
])
def test_functional_refuses_flag_like_numbers(rng, kwargs, exc, needle):
    x = fresh(rng, (8, 3))
    with pytest.raises(exc, match=needle):
        F.batch_norm_train(x, **kwargs)
    with pytest.raises(exc, match=needle):
        F.batch_norm_eval(x, np.zeros(3), np.ones(3), **kwargs)


@pytest.mark.parametrize("training", ["no", 1, None])
def test_backward_training_must_be_bool(rng, training):
    x = fresh(rng, (8, 3))
    _, mean, var = F.batch_norm_train(x)
    with pytest.raises(TypeError, match="training"):
        F.batch_norm_backward(rng.standard_normal(x.shape).astype(np.float32), x, mean, var,
                              training=training)


def test_masked_arrays_are_refused(rng):
    x = fresh(rng, (6, 3), np.float64)
    mx = np.ma.masked_array(x, mask=rng.random(x.shape) < 0.3)
    layer = cbn.BatchNorm(3, dtype=np.float64)
    before = snapshot(layer)
    with pytest.raises(TypeError, match="masked"):
        layer(mx)
    assert_same(layer, before)
    with pytest.raises(TypeError, match="masked"):
        F.batch_norm_train(mx)
    with pytest.raises(TypeError, match="out"):
        F.batch_norm_train(x, out=np.ma.masked_array(np.empty_like(x)))


def test_matrix_input_is_taken_as_a_plain_array(rng):
    x = fresh(rng, (10, 4), np.float64)
    m = np.matrix(x)
    y, mean, var = F.batch_norm_train(m)
    assert type(y) is np.ndarray
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), atol=1e-12)
    # a mean near 0 is known only to ~eps * max|x| (seen 2 eps), not to 1e-12 of itself
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12,
                               atol=64 * np.finfo(np.float64).eps * np.abs(x).max())
    layer = cbn.BatchNorm(4, dtype=np.float64)
    np.testing.assert_array_equal(layer(m), y)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(np.matrix(dy))
    np.testing.assert_array_equal(dx, F.batch_norm_backward(dy, x, mean, var)[0])
    with pytest.raises(TypeError, match="out"):
        F.batch_norm_train(x, out=np.matrix(np.empty_like(x)))


def test_train_mode_must_be_a_bool(rng):
    # PyTorch refuses a non-bool mode too: train("no") would read as True.
    layer = trained(rng, 3)
    model = nn.mlp([4, 5, 3], rng=rng)
    for obj in (layer, model, model[0]):
        obj.train(True)
        for mode in ("no", 0, 1, None):
            with pytest.raises(TypeError, match="True or False"):
                obj.train(mode)
            with pytest.raises(ValueError, match="expected to be boolean"):  # PyTorch's
                obj.train(mode)
        assert obj.training is True
        assert obj.train(np.bool_(False)).training is False


def test_num_batches_tracked_takes_ints_and_tracks_on(rng):
    C = int(rng.integers(2, 6))
    layer = cbn.BatchNorm(C, momentum=None, dtype=np.float64)
    layer.num_batches_tracked = np.int64(4)
    assert type(layer.num_batches_tracked) is int and layer.num_batches_tracked == 4
    x = fresh(rng, (10, C), np.float64)
    before = layer.running_mean.copy()
    layer(x)
    assert layer.num_batches_tracked == 5
    # the cumulative average weighs the fifth batch by 1/5; a mean near 0 is known
    # only to ~eps * max|x|, not to 1e-12 of itself
    np.testing.assert_allclose(layer.running_mean, 0.8 * before + 0.2 * x.mean(0), rtol=1e-12,
                               atol=64 * np.finfo(np.float64).eps * np.abs(x).max())
    untracked = cbn.BatchNorm(C, track_running_stats=False)
    untracked.num_batches_tracked = None
    with pytest.raises(ValueError, match="num_batches_tracked is None"):
        untracked.num_batches_tracked = 3
    assert untracked.num_batches_tracked is None


def test_num_batches_tracked_saturates_at_int64(rng):
    # One more batch used to take it past int64, after which state_dict() and
    # save() raised OverflowError.
    C = int(rng.integers(2, 6))
    layer = cbn.BatchNorm(C, momentum=None)
    layer.num_batches_tracked = 2**63 - 1
    layer(fresh(rng, (8, C)))
    assert layer.num_batches_tracked == 2**63 - 1
    assert int(layer.state_dict()["num_batches_tracked"]) == 2**63 - 1


def test_frozen_needs_running_statistics(rng):
    layer = cbn.BatchNorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        layer.frozen = True
    assert layer.frozen is False
    tracked = trained(rng, 3)
    tracked.frozen = True
    assert tracked.uses_batch_stats is False
    tracked.frozen = np.bool_(False)
    assert tracked.uses_batch_stats is True


def test_numpy_integer_n_threads_is_stored_as_int_and_saves(rng, tmp_path):
    # config() goes to JSON, which refuses numpy.int64.
    layer = cbn.BatchNorm(3, n_threads=np.int64(2))
    assert type(layer.n_threads) is int and layer.n_threads == 2
    layer.n_threads = np.int32(3)
    assert type(layer.n_threads) is int
    layer.save(tmp_path / "bn.npz")
    assert cbn.BatchNorm.load(tmp_path / "bn.npz").n_threads == 3
    model = nn.mlp([5, 4, 3], n_threads=np.int64(2), rng=rng)
    model.save(tmp_path / "model.npz")


def test_nonfinite_running_statistics_written_directly_are_named(rng):
    C = int(rng.integers(3, 8))
    layer = trained(rng, C)
    bad = int(rng.integers(C))
    layer.running_var[bad] = np.nan  # past the attribute's checks, into the array
    before = snapshot(layer)
    with pytest.raises(FloatingPointError, match=f"running_var holds NaN or Inf in channel {bad}"):
        layer(fresh(rng, (8, C)))
    arrays, _ = snapshot(layer)
    assert arrays["num_batches_tracked"] == before[0]["num_batches_tracked"]
    assert arrays["running_mean"].tobytes() == before[0]["running_mean"].tobytes()


# -- backward differentiates the forward that ran ------------------------------

@pytest.mark.parametrize("change", ["eps", "activation", "axis"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_uses_the_settings_of_its_forward(rng, change, dtype):
    # Settings assigned between forward and backward used to reach backward:
    # the gradient of a function that was never computed, with no error.
    C = int(rng.integers(3, 7))
    shape = (C, C) if change == "axis" else (int(rng.integers(6, 20)), C)
    x = fresh(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for affine in (True, False):
        for training in (True, False):
            layer = trained(rng, C, dtype) if affine else cbn.BatchNorm(C, dtype=dtype,
                                                                         affine=False)
            if not affine:
                layer(fresh(rng, shape, dtype))  # running statistics to evaluate with
            layer.train(training)
            expected_layer = cbn.BatchNorm.from_config(layer.config(), layer.state_dict())
            expected_layer.train(training)
            expected_layer(x)
            expected = expected_layer.backward(dy)
            layer(x)
            setattr(layer, change, {"eps": 0.7, "activation": "relu", "axis": 0}[change])
            got = layer.backward(dy)
            assert got.tobytes() == expected.tobytes(), (affine, training)
            if affine:
                assert layer.dgamma.tobytes() == expected_layer.dgamma.tobytes()
                assert layer.dbeta.tobytes() == expected_layer.dbeta.tobytes()
            # the next forward takes the new setting
            layer(x)
            assert layer.backward(dy).tobytes() != expected.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(10, None), (4, None, 3, 5)], ids=["NC", "NCHW"])
@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_gamma_or_beta_assigned_between_forward_and_backward_is_refused(rng, name, shape,
                                                                         dtype):
    # backward would differentiate a forward that never ran (with ReLU, a new mask
    # too): dx off by up to 5.4. PyTorch raises for a saved tensor changed in place.
    C = int(rng.integers(3, 7))
    layer = trained(rng, C, dtype)
    layer.activation = "relu"
    x = fresh(rng, tuple(C if d is None else d for d in shape), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    layer(x)
    setattr(layer, name, rng.uniform(-1, 1, C))
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match=f"{name} was assigned after the forward"):
        layer.backward(dy)
    assert_same(layer, before)
    layer(x)
    dx = layer.backward(dy)  # a new forward: fine
    twin = cbn.BatchNorm.from_config(layer.config(), layer.state_dict())
    twin(x)
    assert dx.tobytes() == twin.backward(dy).tobytes()
    layer(x)
    layer.dgamma = np.zeros(C)  # the gradients' own arrays: no effect on backward
    layer.backward(dy)


@pytest.mark.parametrize("track", [True, False])
def test_affine_false_refuses_the_wrong_channel_count_or_dtype(rng, track):
    # Without gamma the direct calls know neither: a float64 batch into a float32
    # layer was normalized, counted in the running statistics, and then could
    # not be back-propagated at all.
    C = int(rng.integers(3, 7))
    layer = cbn.BatchNorm(C, affine=False, track_running_stats=track)
    for training in (True, False):
        layer.train(training)
        for x, exc, needle in ((fresh(rng, (8, C + 1)), ValueError, f"expected {C}"),
                               (fresh(rng, (8, C), np.float64), TypeError, "dtype float64")):
            before = layer.state_dict()
            with pytest.raises(exc, match=needle):
                layer(x)
            for k, v in layer.state_dict().items():
                assert np.array_equal(v, before[k]), k
    layer.train(True)
    x = fresh(rng, (8, C))
    y = layer(x)
    assert y.shape == (8, C) and y.dtype == np.float32
    assert layer.backward(rng.standard_normal((8, C)).astype(np.float32)).dtype == np.float32


# -- update_running_stats -----------------------------------------------------

def running(rng, C, dtype=np.float64):
    return rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)


@pytest.mark.parametrize("case,exc,needle", [
    ("short_var", ValueError, "running_var has shape"),
    ("short_mean", ValueError, "mean must have shape"),
    ("long_batch_var", ValueError, "var must have shape"),
    ("negative_var", ValueError, "var must not be negative"),
    ("nan_mean", FloatingPointError, "mean or var is not finite"),
    ("mixed_dtypes", TypeError, "running_var has dtype"),
    ("list_running", TypeError, "running_mean must be a numpy.ndarray"),
    ("int_running", TypeError, "running_mean must be a float32 or float64"),
    ("two_d", ValueError, "one-dimensional"),
    ("read_only", ValueError, "writable"),
    ("bool_count", TypeError, "count"),
    ("count_one", ValueError, "count"),
    ("str_factor", TypeError, "factor"),
    ("nan_factor", ValueError, "factor"),
    ("big_factor", ValueError, "factor"),
    # One array for both statistics took both updates, silently.
    ("same_array", ValueError, "overlap"),
    ("batch_is_running", ValueError, "overlap"),
])
def test_update_running_stats_refuses_bad_arrays(rng, case, exc, needle):
    C = int(rng.integers(3, 9))
    rm, rv = running(rng, C)
    mean, var = rng.standard_normal(C), rng.uniform(0.1, 3, C)
    guard = np.concatenate([rv, rng.standard_normal(5)])  # memory past a short view
    args = dict(running_mean=rm, running_var=rv, mean=mean, var=var, count=7, factor=0.1)
    if case == "short_var":
        args["running_var"] = guard[: C - 1]
    elif case == "short_mean":
        args["mean"] = mean[:-1]
    elif case == "long_batch_var":
        args["var"] = np.append(var, 1.0)
    elif case == "negative_var":
        var[C // 2] = -1e-3
    elif case == "nan_mean":
        mean[0] = np.nan
    elif case == "mixed_dtypes":
        args["running_var"] = rv.astype(np.float32)
    elif case == "list_running":
        args["running_mean"] = list(rm)
    elif case == "int_running":
        args["running_mean"] = np.arange(C)
        args["running_var"] = np.ones(C, dtype=np.int64)
    elif case == "two_d":
        args["running_mean"] = rm.reshape(1, C)
        args["running_var"] = rv.reshape(1, C)
    elif case == "read_only":
        rm.setflags(write=False)
    elif case == "bool_count":
        args["count"] = True
    elif case == "count_one":
        args["count"] = 1
    elif case == "str_factor":
        args["factor"] = "0.1"
    elif case == "nan_factor":
        args["factor"] = float("nan")
    elif case == "big_factor":
        args["factor"] = 1.5
    elif case == "same_array":
        args["running_var"] = rm
    elif case == "batch_is_running":
        args["var"] = rv
    before = [np.array(a, copy=True) for a in (rm, rv, guard)]
    with pytest.raises(exc, match=needle):
        F.update_running_stats(**args)
    for a, b in zip((rm, rv, guard), before):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_running_stats_matches_the_formula(rng, dtype):
    C = int(rng.integers(2, 12))
    rm, rv = running(rng, C, dtype)
    want_m = rm.astype(np.float64)
    want_v = rv.astype(np.float64)
    mean, var = rng.standard_normal(C), rng.uniform(0.1, 3, C)
    count, factor = int(rng.integers(2, 50)), float(rng.uniform(0, 1))
    F.update_running_stats(rm, rv, mean, var, count, factor)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(rm, (1 - factor) * want_m + factor * mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, (1 - factor) * want_v + factor * var * count / (count - 1),
                               rtol=tol)


# -- results that overflow the dtype ------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_parameter_gradients_that_overflow_float32_raise(rng, training):
    C = int(rng.integers(2, 6))
    layer = trained(rng, C)
    x = fresh(rng, (int(rng.integers(4, 12)), C))
    _, mean, var = F.batch_norm_train(x)
    if not training:
        # dx = gamma * dy / sqrt(var + eps) stays finite; only the sum overflows
        layer.eval()
        layer.gamma = np.full(C, 0.5, np.float32)
        layer.running_var = var = np.full(C, 4.0)
    layer(x)
    before = snapshot(layer)
    # each value is finite; four or more of them sum past float32's 3.4e38
    dy = np.float32(1e38) * rng.uniform(0.95, 1.0, x.shape).astype(np.float32)
    with pytest.raises(FloatingPointError, match="dgamma or dbeta"):
        layer.backward(dy)
    assert_same(layer, before)
    with pytest.raises(FloatingPointError, match="dgamma or dbeta"):
        F.batch_norm_backward(dy, x, mean, var, training=training)
    # the same gradient in float64 is finite and returned
    dx, dgamma, dbeta = F.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                              mean, var, training=training)
    np.testing.assert_allclose(dbeta, dy.astype(np.float64).sum(0), rtol=1e-12)


def test_eps_too_small_for_float32_is_named(rng):
    x = fresh(rng, (10, 3))
    x[:, 1] = x[0, 1]  # a constant channel: var = 0, so 1/sqrt(eps) is the scale
    with pytest.raises(FloatingPointError, match="eps"):
        F.batch_norm_train(x, eps=1e-100)
    layer = cbn.BatchNorm(3, eps=1e-100)
    before = snapshot(layer)
    with pytest.raises(FloatingPointError, match="1/sqrt\\(eps\\)"):
        layer(x)
    assert_same(layer, before)
    y = F.batch_norm_train(x.astype(np.float64), eps=1e-100)[0]
    assert np.all(y[:, 1] == 0)


def test_ema_update_kernel_refuses_unequal_lengths(rng):
    from cbn import _kernels
    guard = rng.standard_normal(9)
    rm, rv = guard[:4], rng.uniform(0.5, 2, 6)
    before = guard.copy()
    with pytest.raises(ValueError, match="same length"):
        _kernels.ema_update(rm, rv, rng.standard_normal(6), rng.uniform(0.1, 2, 6), 5.0, 0.1)
    assert guard.tobytes() == before.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_check_state_dict_validates_without_loading(rng, dtype):
    C = int(rng.integers(2, 7))
    layer = trained(rng, C, dtype)
    other = trained(rng, C, dtype)
    state = {k: np.asarray(v, np.float64) if k != "num_batches_tracked" else v
             for k, v in other.state_dict().items()}
    before = snapshot(layer)
    values, tracked = layer.check_state_dict(state)
    assert_same(layer, before)
    assert tracked == other.num_batches_tracked
    for k, v in values.items():
        assert v.dtype == dtype and np.array_equal(v, getattr(other, k))
    state["running_var"] = state["running_var"].copy()
    state["running_var"][C // 2] = -1e-3
    for check in (layer.check_state_dict, layer.load_state_dict):
        with pytest.raises(ValueError, match="running_var must be non-negative"):
            check(state)
    assert_same(layer, before)
