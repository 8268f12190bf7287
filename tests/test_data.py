"""Tests of cbn.data: the embedded digits, the split, standardization and the IDX reader."""

import gzip
import struct
import tracemalloc

import numpy as np
import pytest

from cbn.data import load_digits, load_idx, load_mnist_dir, standardize, train_test_split

TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr):
    """Encode ``arr`` as an IDX file (big-endian)."""
    arr = np.asarray(arr)
    big = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    header = bytes([0, 0, TYPE_CODES[big], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(big).tobytes()


def write_idx(path, arr):
    data = idx_bytes(arr)
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist_dir(directory, rng, n_train=12, n_test=5, gz=True):
    suffix = ".gz" if gz else ""
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)  # labels never gzipped
        sets[prefix] = images, labels
    return sets


def test_load_digits():
    X, y = load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0 and X.max() == 16
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    images, _ = load_digits(flatten=False, dtype=np.uint8)
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8


def test_split_is_deterministic_disjoint_and_stratified():
    rng = np.random.default_rng()
    X = np.arange(400).reshape(200, 2)
    y = rng.integers(0, 4, 200)
    a = train_test_split(X, y, test_fraction=0.25, seed=3)
    b = train_test_split(X, y, test_fraction=0.25, seed=3)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    X_train, X_test, y_train, y_test = a
    assert len(X_train) + len(X_test) == 200
    assert not set(X_train[:, 0]) & set(X_test[:, 0])
    np.testing.assert_array_equal(y_train, y[X_train[:, 0] // 2])
    for c in range(4):
        assert abs(np.sum(y_test == c) - 0.25 * np.sum(y == c)) < 1  # rounded, then adjusted
    c = train_test_split(X, y, test_fraction=0.25, seed=4)
    assert not np.array_equal(c[1], X_test)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(X, y, test_fraction=1.0)


def test_standardize_uses_training_statistics_only():
    rng = np.random.default_rng()
    train = rng.normal(5, 3, (50, 4)).astype(np.float32)
    train[:, 2] = 7.0  # a constant feature, like a blank pixel
    test = rng.normal(-2, 1, (20, 4)).astype(np.float32)
    s_train, s_test = standardize(train, test)
    assert s_train.dtype == np.float32
    np.testing.assert_allclose(s_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s_train.std(0)[[0, 1, 3]], 1, rtol=1e-4)
    assert not s_train[:, 2].any()
    mean, std = train.mean(0, dtype=np.float64), train.std(0, dtype=np.float64)
    std[2] = 1
    np.testing.assert_allclose(s_test, (test - mean) / std, rtol=1e-5, atol=1e-5)
    (alone,) = standardize(train)
    np.testing.assert_array_equal(alone, s_train)  # the test set has no influence
    assert standardize(np.arange(6).reshape(3, 2))[0].dtype == np.float64
    with pytest.raises(ValueError, match="features"):
        standardize(train, test[:, :3])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng()
    arr = (rng.standard_normal((3, 4, 2)) * 50).astype(dtype)
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), arr)
    out = load_idx(path)
    assert out.shape == arr.shape and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_load_idx_errors(tmp_path):
    rng = np.random.default_rng()
    good = idx_bytes(rng.integers(0, 256, (4, 3, 3), dtype=np.uint8))
    cases = {
        "truncated.idx": (good[:-5], "truncated"),
        "header.idx": (good[:9], "truncated"),
        "tiny.idx": (good[:2], "truncated"),
        "trailing.idx": (good + b"\x00", "trailing"),
        "magic.idx": (b"\x1f\x8b" + good[2:], "magic"),
        "type.idx": (good[:2] + b"\x07" + good[3:], "type"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message):
            load_idx(tmp_path / name)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(ValueError, match="cut.gz"):
        load_idx(tmp_path / "cut.gz")


def test_load_mnist_dir(tmp_path):
    rng = np.random.default_rng()
    sets = write_mnist_dir(tmp_path, rng)
    X_train, X_test, y_train, y_test = load_mnist_dir(tmp_path)
    assert X_train.shape == (12, 30) and X_test.shape == (5, 30) and X_train.dtype == np.float32
    np.testing.assert_array_equal(X_train, sets["train"][0].reshape(12, 30))
    np.testing.assert_array_equal(y_test, sets["t10k"][1])
    assert y_train.dtype == np.int64
    X3 = load_mnist_dir(tmp_path, flatten=False)[0]
    assert X3.shape == (12, 6, 5)


def test_load_mnist_dir_mislabelled_and_mismatched(tmp_path):
    rng = np.random.default_rng()
    write_mnist_dir(tmp_path, rng)
    labels = tmp_path / "train-labels-idx1-ubyte"
    bad = rng.integers(0, 10, 12, dtype=np.uint8)
    bad[7] = 12
    write_idx(labels, bad)
    with pytest.raises(ValueError, match=r"label 12 at index 7 is out of range \[0, 10\)"):
        load_mnist_dir(tmp_path)
    write_idx(labels, rng.integers(0, 10, 11, dtype=np.uint8))
    with pytest.raises(ValueError, match="12 images .* but 11 labels"):
        load_mnist_dir(tmp_path)
    write_idx(labels, rng.integers(0, 10, (12, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="1-D"):
        load_mnist_dir(tmp_path)
    labels.write_bytes(idx_bytes(rng.integers(0, 10, 12, dtype=np.uint8))[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist_dir(tmp_path)
    labels.unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        load_mnist_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist_dir(tmp_path / "nowhere")


def test_standardize_rejects_complex_and_non_numeric_input():
    rng = np.random.default_rng()
    train = rng.standard_normal((10, 3))
    with pytest.raises(TypeError, match="argument 0 has dtype complex128"):
        standardize(train + 1j * rng.standard_normal((10, 3)))  # used to drop the imaginary part
    with pytest.raises(TypeError, match="argument 1 has dtype complex64"):
        standardize(train, train[:4].astype(np.complex64))
    with pytest.raises(TypeError, match="argument 0 has dtype object"):
        standardize(train.astype(object))
    with pytest.raises(TypeError, match="dtype <U"):
        standardize(train.astype(str))
    assert standardize(train > 0)[0].dtype == np.float64  # booleans are numbers here


@pytest.mark.parametrize("eps", [-1.0, -1e-12, float("nan"), float("inf")])
def test_standardize_rejects_negative_or_non_finite_eps(eps):
    train = np.random.default_rng().standard_normal((10, 3))
    train[:, 1] = 4.0  # a constant column: a negative eps used to make it NaN
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        standardize(train, eps=eps)


def test_standardize_eps_type_and_zero():
    train = np.random.default_rng().standard_normal((10, 3))
    with pytest.raises(TypeError, match="eps must be a real number"):
        standardize(train, eps="1e-8")
    train[:, 2] = 1.5
    out = standardize(train, eps=0)[0]
    assert np.isfinite(out).all() and not out[:, 2].any()  # a constant column is centred


def test_load_idx_corrupt_deflate_stream_names_the_file(tmp_path):
    """A corrupt deflate block raises zlib.error inside gzip; load_idx reports a ValueError."""
    rng = np.random.default_rng()
    gz = gzip.compress(idx_bytes(rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)))
    # The first byte after the 10-byte gzip header starts the deflate stream:
    # 0x07 is a final block of the reserved type 3, an "invalid block type".
    path = tmp_path / "bad-images.gz"
    path.write_bytes(gz[:10] + b"\x07" + gz[11:])
    with pytest.raises(ValueError, match="bad-images.gz: not a valid gzip file"):
        load_idx(path)


def test_load_idx_os_errors_stay_os_errors(tmp_path):
    """An unreadable path is not reported as a corrupt file."""
    (tmp_path / "folder.gz").mkdir()
    with pytest.raises(IsADirectoryError):
        load_idx(tmp_path / "folder.gz")
    with pytest.raises(FileNotFoundError):
        load_idx(tmp_path / "missing.gz")


def test_load_idx_header_size_does_not_overflow(tmp_path):
    """Dimensions whose product exceeds int64 are a truncated file, not "trailing bytes"."""
    path = tmp_path / "huge.idx"
    path.write_bytes(bytes([0, 0, 8, 2]) + struct.pack(">II", 2**32 - 1, 2**32 - 1))
    expected = 12 + (2**32 - 1) ** 2  # header + data bytes, beyond int64
    with pytest.raises(ValueError, match=rf"truncated IDX file.*\({expected} bytes\)"):
        load_idx(path)


def test_load_idx_takes_bytes_names_and_any_case_of_gz(tmp_path):
    rng = np.random.default_rng()
    arr = rng.integers(0, 256, (int(rng.integers(1, 9)), 4), dtype=np.uint8)
    path = tmp_path / "images.idx.GZ"
    path.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(load_idx(path), arr)
    np.testing.assert_array_equal(load_idx(bytes(path)), arr)


def test_load_idx_shapes_numpy_cannot_hold_name_the_file(tmp_path):
    path = tmp_path / "rank.idx"
    path.write_bytes(bytes([0, 0, 0x08, 65]) + struct.pack(">65I", *([1] * 65)) + b"\x07")
    with pytest.raises(ValueError, match=r"rank\.idx: IDX rank 65"):
        load_idx(path)
    path = tmp_path / "empty.idx"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 0, 2**32 - 1, 2**32 - 1))
    with pytest.raises(ValueError, match=r"empty\.idx: IDX shape \(0, 4294967295"):
        load_idx(path)


def test_load_mnist_dir_refuses_empty_sets_and_bad_n_classes(tmp_path):
    rng = np.random.default_rng()
    write_mnist_dir(tmp_path, rng, n_test=0)
    with pytest.raises(ValueError, match="t10k-images.*holds no images"):
        load_mnist_dir(tmp_path)
    write_mnist_dir(tmp_path, rng)
    for bad, exc in ((True, TypeError), (9.5, TypeError), ("10", TypeError), (0, ValueError)):
        with pytest.raises(exc, match="n_classes"):
            load_mnist_dir(tmp_path, n_classes=bad)


@pytest.mark.parametrize("stratify", [True, False])
def test_split_sizes_follow_the_fraction_and_neither_part_is_empty(stratify):
    """Rounding each class alone put no example of ten two-example classes in
    the test set at 0.25, and none in the training set at 0.76."""
    rng = np.random.default_rng()
    for n_classes, per_class, fraction in ((10, 2, 0.25), (10, 2, 0.76), (10, 3, 0.15),
                                           (10, 3, 0.25), (3, 7, 0.5), (1, 2, 0.01),
                                           (1, 2, 0.99), (4, 50, 0.2)):
        y = np.repeat(np.arange(n_classes), per_class)
        X = rng.standard_normal((len(y), 3))
        _, _, y_tr, y_te = train_test_split(X, y, test_fraction=fraction,
                                                  seed=int(rng.integers(1000)),
                                                  stratify=stratify)
        n = len(y)
        want = min(max(int(np.ceil(round(fraction * n, 9))), 1), n - 1)
        assert len(y_te) == want and len(y_tr) == n - want, (n_classes, per_class, fraction)
        assert sorted(np.concatenate([y_tr, y_te]).tolist()) == sorted(y.tolist())
        if stratify:  # each class within one example of its share
            for c in range(n_classes):
                assert abs(np.sum(y_te == c) - fraction * per_class) < 1 + 1e-9


def test_split_arguments_are_named():
    X, y = np.zeros((6, 2)), np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="at least 2 examples"):
        train_test_split(X[:1], y[:1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        train_test_split(X, np.array([0.0, 1.0, np.nan, 1.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="stratify must be True or False"):
        train_test_split(X, y, stratify="no")
    with pytest.raises(ValueError, match="seed must be"):
        train_test_split(X, y, seed=-1)


def test_a_constant_column_far_from_zero_is_only_centred():
    """Its computed spread is the rounding error of its mean (about 1e-8 here):
    dividing by it would scale a test value 1e7-fold."""
    train = np.full((1000, 2), 1e8 + 0.1)
    train[:, 1] += 0.5 * np.random.default_rng().standard_normal(1000)  # a real spread
    test = np.array([[1e8 + 0.2, 1e8 + 0.1]])
    tr, te = standardize(train, test)
    assert np.all(np.abs(tr[:, 0]) < 1e-4) and abs(te[0, 0] - 0.1) < 1e-4  # before: 1, 6.7e6
    assert abs(tr[:, 1].std() - 1) < 1e-9


def test_an_idx_file_is_read_only_as_far_as_its_header_says(tmp_path):
    """A small .gz that inflates to 64 MiB past a 10-byte payload is refused
    without inflating it: memory follows the header, not the stream."""
    payload = bytes(range(10))
    head = b"\x00\x00\x08\x01" + struct.pack(">I", 10)
    path = tmp_path / "bomb-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(head + payload + bytes(64 << 20), compresslevel=1))
    assert path.stat().st_size < (1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="trailing bytes"):
            load_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (8 << 20), peak
    good = tmp_path / "good-idx1-ubyte.gz"
    good.write_bytes(gzip.compress(head + payload))
    np.testing.assert_array_equal(load_idx(good), np.arange(10, dtype=np.uint8))
    claim = tmp_path / "claim-idx3-ubyte"  # 2**31 images of 28x28 claimed, 1 KiB held
    claim.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 2**31, 28, 28) + bytes(1024))
    with pytest.raises(ValueError, match="truncated"):
        load_idx(claim)
