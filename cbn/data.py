"""Datasets with no download: the embedded 8x8 digits and a reader for MNIST-format IDX files.

* :func:`load_digits` reads ``cbn/data/digits.npz``, shipped in the package:
  the UCI "Optical Recognition of Handwritten Digits" test set (1,797 images,
  8x8 pixels of 0..16, CC BY 4.0; see ``cbn/data/DIGITS_LICENSE.txt``).
* :func:`train_test_split` makes a deterministic, stratified split.
* :func:`standardize` scales inputs with the mean and standard deviation of
  the *training* set only ("normalizing inputs" of the lecture).
* :func:`load_idx` and :func:`load_mnist_dir` read the IDX files of MNIST
  and Fashion-MNIST (plain or ``.gz``), from a directory the user names.
"""

import gzip
import importlib.resources
import io
import math
import numbers
import os
import zlib

import numpy as np

from .layer import _check_flag

__all__ = [
    "load_digits",
    "train_test_split",
    "standardize",
    "load_idx",
    "load_mnist_dir",
    "IDX_DTYPES",
]

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_digits(*, flatten=True, dtype=np.float32):
    """Load the 1,797 embedded 8x8 handwritten digits.

    Parameters
    ----------
    flatten : bool, default True
        Return images as rows of 64 features instead of 8x8 arrays.
    dtype : numpy dtype, default float32
        dtype of the returned images (pixel values 0..16, not scaled).

    Returns
    -------
    X : ndarray of shape (1797, 64) or (1797, 8, 8)
    y : ndarray of shape (1797,), int64, labels 0..9
    """
    ref = importlib.resources.files("cbn").joinpath("data", "digits.npz")
    with ref.open("rb") as fh, np.load(io.BytesIO(fh.read())) as archive:
        images, labels = archive["images"], archive["labels"]
    X = images.reshape(len(images), -1) if flatten else images
    return X.astype(dtype), labels.astype(np.int64)


def _fraction(value, name):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float in (0, 1), got {type(value).__name__}")
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return float(value)


def _test_counts(sizes, fraction):
    """How many examples of each group go to the test set.

    Each group's share rounded (``fraction * size``), then moved one at a
    time, by the largest remainders, until the total is ``ceil(fraction *
    N)`` (as scikit-learn counts it) and neither part is empty: rounding each
    of ten classes of two examples at 0.25 would put none in the test set.
    """
    total = sum(sizes)
    # round() first: 0.25 * 1797 must not become 450.00000000000006 -> 451.
    target = min(max(math.ceil(round(fraction * total, 9)), 1), total - 1)
    quota = [fraction * n for n in sizes]
    takes = [round(q) for q in quota]
    while sum(takes) != target:
        grow = sum(takes) < target
        # the group whose rounding is furthest from its quota in that direction
        options = [i for i, n in enumerate(sizes) if (takes[i] < n if grow else takes[i] > 0)]
        i = max(options, key=lambda i: (quota[i] - takes[i]) * (1 if grow else -1))
        takes[i] += 1 if grow else -1
    return takes


def train_test_split(X, y, *, test_fraction=0.25, seed=0, stratify=True):
    """Split ``(X, y)`` into a training and a test set, deterministically.

    Parameters
    ----------
    X : ndarray of shape (N, ...)
    y : ndarray of shape (N,), integer labels
    test_fraction : float in (0, 1), default 0.25
        Share of the examples (of each class, when stratified) put in the test
        set: ``ceil(test_fraction * N)`` in all (as scikit-learn counts it),
        each class's share rounded, and never an empty part.
    seed : int, default 0
        Seed of the permutation: the same seed always gives the same split.
    stratify : bool, default True
        Keep the class proportions equal in both parts.

    Returns
    -------
    X_train, X_test, y_train, y_test : ndarray
        Test indices are taken per class and both parts are shuffled.
    """
    X, y = np.asarray(X), np.asarray(y)
    if y.ndim != 1 or X.ndim < 1 or len(X) != len(y):
        raise ValueError(f"X and y must have the same length N and y shape (N,), got "
                         f"X {X.shape} and y {y.shape}")
    if len(y) < 2:
        raise ValueError(f"X and y must hold at least 2 examples to split, got {len(y)}")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError("y holds NaN or Inf: labels must be classes")
    test_fraction = _fraction(test_fraction, "test_fraction")
    stratify = _check_flag(stratify, "stratify")
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"seed must be a non-negative int (or a Generator): {exc}") from None
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(len(y))]
    takes = _test_counts([len(idx) for idx in groups], test_fraction)
    test = []
    for idx, take in zip(groups, takes):
        idx = rng.permutation(idx)
        test.append(idx[:take])
    test = np.concatenate(test)
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    train = rng.permutation(np.flatnonzero(~is_test))
    test = rng.permutation(test)
    return X[train], X[test], y[train], y[test]


def _check_eps(eps):
    """Validate ``standardize``'s ``eps``: a finite real number >= 0."""
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return float(eps)


def standardize(train, *others, eps=1e-8):
    """Standardize features with the statistics of ``train`` only.

    Each feature becomes ``(x - mean) / std`` with ``mean`` and ``std`` (biased)
    computed per column of ``train``; a constant column (``std <= eps``, e.g.
    a pixel that is always blank, or a spread within the rounding error of
    the column's variance, as scikit-learn's ``StandardScaler`` tests it) is
    only centred.

    Parameters
    ----------
    train : ndarray of shape (N, D)
    *others : ndarray of shape (M, D)
        Validation or test sets, transformed with the training statistics.
    eps : float, default 1e-8
        Finite and >= 0.

    Returns
    -------
    tuple of ndarray
        The standardized ``train`` followed by each of ``others``; floating
        inputs keep their dtype, integer (and boolean) inputs become float64.

    Raises
    ------
    TypeError
        A complex or non-numeric array (complex values would lose their
        imaginary part), or an ``eps`` that is not a real number.
    ValueError
        Arrays that are not 2-D or differ in feature count, an empty
        ``train``, or a negative or non-finite ``eps``.
    """
    eps = _check_eps(eps)
    arrays = [np.asarray(a) for a in (train, *others)]
    for i, a in enumerate(arrays):
        if a.dtype.kind not in "biuf":
            raise TypeError(f"standardize expects real numeric arrays; argument {i} has dtype "
                            f"{a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"standardize expects 2-D (N, D) arrays; argument {i} has shape "
                             f"{a.shape}")
        if a.shape[1] != arrays[0].shape[1]:
            raise ValueError(f"argument {i} has {a.shape[1]} features, train has "
                             f"{arrays[0].shape[1]}")
    if len(arrays[0]) == 0:
        raise ValueError("train must hold at least one row")
    mean = arrays[0].mean(axis=0, dtype=np.float64)
    var = arrays[0].var(axis=0, dtype=np.float64)
    std = np.sqrt(var)
    # A spread within the rounding error of the variance (scikit-learn's bound
    # for StandardScaler) is no spread: a constant column of 1e8 + 0.1 has a
    # computed std of about 1e-8, which would scale the test set 1e7-fold.
    n, unit = len(arrays[0]), np.finfo(np.float64).eps
    rounding = n * unit * var + (n * np.abs(mean) * unit) ** 2
    std = np.where((std > eps) & (var > rounding), std, 1.0)
    out = []
    for a in arrays:
        dtype = a.dtype if a.dtype.kind == "f" else np.float64
        out.append(((a - mean) / std).astype(dtype, copy=False))
    return tuple(out)


_CHUNK = 1 << 24  # bytes read at a time: memory follows the data, not the header's claim


def _open_idx(path):
    """``path`` opened for reading, decompressing when it ends in ``.gz`` (any case)."""
    path = os.fsdecode(os.fspath(path))  # a bytes name too
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _read_at_most(fh, n):
    """Up to ``n`` bytes of ``fh`` (fewer at its end), read in chunks, so that a
    header claiming terabytes costs only what the file holds."""
    parts = []
    while n > 0:
        part = fh.read(min(n, _CHUNK))
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


_MAX_IDX_RANK = 32  # NumPy 1.x's limit on dimensions (NumPy 2: 64)


def load_idx(path):
    """Read one IDX file (the MNIST format), plain or gzip-compressed.

    Parameters
    ----------
    path : str or os.PathLike
        File name; a name ending in ``.gz`` is decompressed.

    Returns
    -------
    ndarray
        Shape and dtype from the header (``uint8`` for MNIST), native byte order.

    Raises
    ------
    ValueError
        On a bad magic number, an unknown type byte, a data size that does
        not match the header (a truncated file or trailing bytes), or, for
        ``.gz``, a corrupt or truncated gzip stream; the message names the file.
    OSError
        The file cannot be read (``FileNotFoundError``, ``IsADirectoryError``,
        ``PermissionError``...).
    """
    try:
        with _open_idx(path) as fh:
            return _parse_idx(fh, path)
    # A bad header or checksum, a cut stream, a corrupt deflate block. Other
    # OSErrors (no such file, permission, a directory) are not about the
    # content and propagate as they are.
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{os.fsdecode(os.fspath(path))}: not a valid gzip file ({exc})") \
            from exc


def _parse_idx(fh, path):
    """The array of an open IDX file: its header checked before the data is
    read, and the data read only as far as the header says (then one byte
    more, to refuse trailing bytes), so that no file, however crafted or
    compressed, is decompressed or held beyond the size its header gives."""
    data = fh.read(4)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file, {len(data)} bytes, not even a header")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: bad magic number {data[:4].hex()}: not an IDX file "
                         "(expected 0x0000 then type and rank bytes)")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type byte 0x{type_code:02x}")
    header = 4 + 4 * ndim
    data += _read_at_most(fh, header - 4)
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX file, header needs {header} bytes, "
                         f"got {len(data)}")
    if ndim > _MAX_IDX_RANK:
        raise ValueError(f"{path}: IDX rank {ndim} is more than NumPy's {_MAX_IDX_RANK} "
                         "dimensions")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    # Python ints: a product of 32-bit dimensions can overflow int64.
    expected = header + math.prod(shape) * dtype.itemsize
    data += _read_at_most(fh, expected - header)
    if len(data) < expected or fh.read(1):
        what = "truncated" if len(data) < expected else "trailing bytes in"
        size = "" if len(data) == expected else f", file has {len(data)} bytes"
        raise ValueError(f"{path}: {what} IDX file: header says shape {shape} of {dtype.name} "
                         f"({expected} bytes){size}")
    try:
        arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    except ValueError as exc:  # an empty array whose other dimensions NumPy refuses
        raise ValueError(f"{path}: IDX shape {shape} is not a valid array shape ({exc})") \
            from None
    return arr.astype(dtype.newbyteorder("="))


_SPLITS = {"train": "train", "test": "t10k"}


def _find(directory, prefix, kind, rank):
    """Locate e.g. ``train-images-idx3-ubyte[.gz]`` (or ``train-images.idx3-ubyte``)."""
    names = [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]
    for name in names:
        for candidate in (name, name + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{directory}: no {names[0]} or {names[0]}.gz "
                            "(MNIST-format IDX files expected)")


def load_mnist_dir(directory, *, n_classes=10, flatten=True, dtype=np.float32):
    """Load an MNIST-format dataset (MNIST, Fashion-MNIST) from a directory.

    Parameters
    ----------
    directory : str or os.PathLike
        Holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each
        possibly ``.gz`` (Debian's ``dataset-fashion-mnist`` installs them).
    n_classes : int, default 10
        Labels must lie in ``[0, n_classes)``.
    flatten : bool, default True
        Return images as rows of ``H*W`` features.
    dtype : numpy dtype, default float32
        dtype of the returned images (raw pixel values, not scaled).

    Returns
    -------
    X_train, X_test, y_train, y_test : ndarray
        Labels are int64.

    Raises
    ------
    FileNotFoundError
        If a file is missing.
    ValueError
        If a file is malformed (see :func:`load_idx`), images are not 3-D,
        labels not 1-D, counts of images and labels differ, or a label is out
        of range.
    """
    directory = os.fsdecode(os.fspath(directory))
    if isinstance(n_classes, (bool, np.bool_)) or not isinstance(n_classes, numbers.Integral):
        raise TypeError(f"n_classes must be an int, got {n_classes!r}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory {directory!r} does not exist")
    out = {}
    for split, prefix in _SPLITS.items():
        img_path = _find(directory, prefix, "images", 3)
        lbl_path = _find(directory, prefix, "labels", 1)
        images, labels = load_idx(img_path), load_idx(lbl_path)
        if images.ndim != 3:
            raise ValueError(f"{img_path}: images must be 3-D (N, H, W), got shape {images.shape}")
        if labels.ndim != 1:
            raise ValueError(f"{lbl_path}: labels must be 1-D (N,), got shape {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{split} set: {len(images)} images in {img_path} but "
                             f"{len(labels)} labels in {lbl_path}")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"{lbl_path}: labels must be integers, got {labels.dtype}")
        bad = (labels < 0) | (labels >= n_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{lbl_path}: label {int(labels[i])} at index {i} is out of range "
                             f"[0, {n_classes})")
        if len(images) == 0:
            raise ValueError(f"{img_path}: the {split} set holds no images")
        X = images.reshape(len(images), -1) if flatten else images
        out[split] = (X.astype(dtype), labels.astype(np.int64))
    return out["train"][0], out["test"][0], out["train"][1], out["test"][1]
