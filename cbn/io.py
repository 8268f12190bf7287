"""Safe saving and loading of cbn objects as ``.npz`` files.

A file holds plain arrays only (``allow_pickle=False`` on both sides): a
``__format__`` tag naming the kind of object, a ``__version__`` integer, the
object's configuration and its state. Writing is atomic: the data goes to a
temporary file in the destination folder, is flushed to disk, and replaces the
destination with one ``os.replace``, so a crash mid-save leaves the previous
file intact. Reading validates the tag and version and reports a truncated,
corrupt or foreign file as ``ValueError`` naming the path.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "save_arrays",
    "load_arrays",
    "encode_config",
    "decode_config",
    "save_object",
    "load_object",
]

FORMAT_VERSION = 1


def save_arrays(path, kind, arrays):
    """Atomically write ``arrays`` (a dict of name -> array) to ``path`` as ``.npz``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination, written exactly as given (no extension is appended).
    kind : str
        Format tag stored as ``__format__`` and checked by :func:`load_arrays`.
    arrays : dict
        Names to arrays or scalars; no object arrays (nothing is pickled).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    payload = {"__format__": np.array(kind), "__version__": np.array(FORMAT_VERSION)}
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError(f"cannot save {name!r}: object arrays would need pickle")
        payload[name] = arr
    fd, tmp = tempfile.mkstemp(prefix=".cbn-", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_arrays(path, kind):
    """Read a file written by :func:`save_arrays` and check its tag and version.

    Returns
    -------
    dict
        Name -> array, without the ``__format__``/``__version__`` entries.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is truncated or corrupt, is not an ``.npz`` written by cbn,
        holds another kind of object, or comes from a newer format version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a readable cbn file (truncated or corrupt?): {exc}") from None
    except Exception as exc:  # zlib errors and others from a damaged archive
        raise ValueError(f"{path} is not a readable cbn file: {type(exc).__name__}: {exc}") from None
    tag = arrays.pop("__format__", None)
    version = arrays.pop("__version__", None)
    if tag is None or version is None or tag.shape != () or tag.dtype.kind != "U":
        raise ValueError(f"{path} is not a cbn file (no format tag)")
    if str(tag) != kind:
        raise ValueError(f"{path} holds a {str(tag)!r}, not a {kind!r}")
    if version.shape != () or version.dtype.kind not in "iu":
        raise ValueError(f"{path} has a malformed format version")
    if int(version) > FORMAT_VERSION or int(version) < 1:
        raise ValueError(
            f"{path} has format version {int(version)}; this cbn reads versions 1 to "
            f"{FORMAT_VERSION} (upgrade cbn to read it)"
        )
    return arrays


def encode_config(config):
    """A JSON-serialisable configuration as a 0-d string array (no pickle needed)."""
    return np.array(json.dumps(config, sort_keys=True))


def decode_config(arrays, path, expected_type):
    """Pop and parse the ``config`` entry written by :func:`encode_config`.

    Raises ``ValueError`` naming ``path`` if it is missing, not valid JSON, or
    not of ``expected_type`` (``dict`` or ``list``).
    """
    entry = arrays.pop("config", None)
    if entry is None or entry.shape != () or entry.dtype.kind != "U":
        raise ValueError(f"{path} lacks a valid 'config' entry")
    try:
        config = json.loads(str(entry))
    except ValueError as exc:
        raise ValueError(f"{path}: its configuration is not valid JSON: {exc}") from None
    if not isinstance(config, expected_type):
        raise ValueError(f"{path}: its configuration is not a {expected_type.__name__}")
    return config


def save_object(path, kind, config, state):
    """Atomically save an object's JSON ``config`` and its ``state`` arrays as ``kind``."""
    save_arrays(path, kind, {"config": encode_config(config), **state})


def load_object(path, kind, config_type):
    """Read a file written by :func:`save_object`: returns ``(config, state arrays)``."""
    arrays = load_arrays(path, kind)
    config = decode_config(arrays, path, config_type)
    return config, arrays
