"""Safe saving and loading of cbn objects as ``.npz`` files.

A file holds plain arrays only (``allow_pickle=False`` on both sides): a
``__format__`` tag naming the kind of object, a ``__version__`` integer, the
object's configuration and its state. Writing is atomic: the data goes to a
temporary file in the destination folder, is flushed to disk, and replaces the
destination with one ``os.replace``, so a crash mid-save leaves the previous
file intact. Reading validates the tag and version and reports a truncated,
corrupt or foreign file as ``ValueError`` naming the path.
"""

import errno
import json
import os
import secrets
import zipfile

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MAX_CONFIG_DEPTH",
    "save_arrays",
    "load_arrays",
    "encode_config",
    "decode_config",
    "save_object",
    "load_object",
    "check_config",
    "check_state_shapes",
]

FORMAT_VERSION = 1

#: Deepest nesting of lists and dicts a configuration may have. cbn writes at
#: most three levels (a Sequential's list of entries holding config dicts);
#: the bound keeps a crafted file from exhausting the stack while it is parsed
#: or reported.
MAX_CONFIG_DEPTH = 8


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
    path = os.fsdecode(os.fspath(path))  # bytes too, as np.load takes them
    if os.path.isdir(path):  # before the temporary file goes into its parent
        raise IsADirectoryError(errno.EISDIR, "cannot save over a directory", path)
    folder = os.path.dirname(os.path.abspath(path))
    payload = {"__format__": np.array(kind), "__version__": np.array(FORMAT_VERSION)}
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError(f"cannot save {name!r}: object arrays would need pickle")
        payload[name] = arr
    # The name is chosen before the file exists, and the file is a Python
    # object from the start, so that a KeyboardInterrupt landing anywhere
    # below leaves neither a temporary file (removed by name) nor an open
    # descriptor (an unreferenced file object closes itself).
    tmp = os.path.join(folder, f".cbn-{secrets.token_hex(8)}.npz.tmp")
    try:
        try:
            fh = open(tmp, "xb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            # The temporary file's name means nothing to the caller: name their path.
            raise type(exc)(exc.errno, f"cannot write beside it ({exc.strerror})",
                            path) from None
        with fh:
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
            _refuse_expansion(data, path)
            arrays = {name: data[name] for name in data.files}
    except _Expands:
        raise
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


class _Expands(ValueError):
    """A file whose entries would decompress beyond its size (see _refuse_expansion)."""


def _refuse_expansion(npz, path):
    """Raise ValueError if the entries of the open ``.npz`` would decompress to
    more bytes than the file holds: cbn writes them uncompressed, and a small
    compressed file (say, an extra entry of zeros) must not make loading
    allocate gigabytes before its keys are checked."""
    archive = getattr(npz, "zip", None)
    if archive is None:  # not a zip: np.load read something else
        return
    declared = sum(info.file_size for info in archive.infolist())
    size = os.path.getsize(path)
    if declared > size:
        raise _Expands(
            f"{path} is not a cbn file: its entries would expand to {declared} bytes from "
            f"a file of {size} (cbn writes them uncompressed)")


def encode_config(config):
    """A JSON-serialisable configuration as a 0-d string array (no pickle needed)."""
    return np.array(json.dumps(config, sort_keys=True))


def decode_config(arrays, path, expected_type):
    """Pop and parse the ``config`` entry written by :func:`encode_config`.

    Raises ``ValueError`` naming ``path`` if it is missing, not valid JSON,
    nested more than :data:`MAX_CONFIG_DEPTH` levels deep, or not of
    ``expected_type`` (``dict`` or ``list``).
    """
    entry = arrays.pop("config", None)
    if entry is None or entry.shape != () or entry.dtype.kind != "U":
        raise ValueError(f"{path} lacks a valid 'config' entry")
    try:
        config = json.loads(str(entry))
    except ValueError as exc:
        raise ValueError(f"{path}: its configuration is not valid JSON: {exc}") from None
    except RecursionError:
        # json's parser recurses once per level of nesting.
        raise ValueError(
            f"{path}: its configuration is nested more than {MAX_CONFIG_DEPTH} levels deep"
        ) from None
    if _nesting_depth(config) > MAX_CONFIG_DEPTH:
        raise ValueError(
            f"{path}: its configuration is nested more than {MAX_CONFIG_DEPTH} levels deep"
        )
    if not isinstance(config, expected_type):
        raise ValueError(f"{path}: its configuration is not a {expected_type.__name__}")
    return config


def _nesting_depth(value):
    """Levels of lists and dicts in a parsed JSON value (0 for a scalar).

    Walks one level at a time instead of recursing, so that no depth can
    overflow the stack.
    """
    depth = 0
    level = [value]
    while True:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]


def check_config(config, types, where, sizes=()):
    """Check the keys and value types of a decoded configuration before it is used.

    A file's configuration is untrusted: it is checked here, with a message
    naming the file, rather than left to fail somewhere inside a constructor.

    Parameters
    ----------
    config : dict
        The parsed JSON object.
    types : dict
        Every allowed key, mapped to the Python type (or tuple of types) its
        value may have. ``int`` does not admit ``bool`` (JSON ``true`` decodes
        to one) unless ``bool`` is listed too; ``type(None)`` admits ``null``.
    where : str
        Start of the error messages: the file, and the part of it.
    sizes : iterable of str
        Keys that must be present and hold a positive integer: the sizes that
        the stored arrays' shapes are then checked against.

    Raises
    ------
    ValueError
        An unknown or missing key, or a value of the wrong type; the message
        names ``where`` and the key.
    """
    unknown = sorted(set(config) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown configuration keys {unknown}")
    missing = [key for key in sizes if key not in config]
    if missing:
        raise ValueError(f"{where}: the configuration lacks the keys {missing}")
    for key, value in config.items():
        allowed = types[key] if isinstance(types[key], tuple) else (types[key],)
        if not _is_instance(value, allowed):
            expected = " or ".join(_json_name(t) for t in allowed)
            raise ValueError(
                f"{where}: configuration {key!r} must be {expected}, got {_json_name(type(value))}"
            )
    for key in sizes:
        if not _is_instance(config[key], (int,)) or config[key] < 1:
            raise ValueError(
                f"{where}: configuration {key!r} must be a positive integer, got {config[key]!r}")


_JSON_NAMES = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
               str: "a string", list: "a list", dict: "an object"}


def _json_name(kind):
    """How an error message calls a Python type that JSON decodes to."""
    return _JSON_NAMES.get(kind, kind.__name__)


def _is_instance(value, allowed):
    """``isinstance`` where a bool only counts as a ``bool``, not as an ``int``."""
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, allowed)


def check_state_shapes(state, shapes, where):
    """Check that ``state`` holds exactly the arrays ``shapes`` lists, each of that shape.

    Meant to run before a configuration's sizes are allocated: once they
    match the stored arrays, building the object takes no more memory than
    the file's data.

    Parameters
    ----------
    state : dict
        Name -> array, as read from the file.
    shapes : dict
        Name -> expected shape (a tuple), as implied by the configuration.
    where : str
        Start of the error messages.

    Raises
    ------
    ValueError
        An array is missing, unexpected, or of another shape; the message names it.
    """
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        problems = ([f"missing keys {missing}"] if missing else []) + (
            [f"unexpected keys {unexpected}"] if unexpected else [])
        raise ValueError(
            f"{where}: the stored arrays do not match the configuration: {', '.join(problems)}"
        )
    for name, shape in shapes.items():
        got = np.shape(state[name])
        if got != tuple(shape):
            raise ValueError(
                f"{where}: array {name!r} has shape {got}, "
                f"but the configuration implies {tuple(shape)}"
            )


def save_object(path, kind, config, state):
    """Atomically save an object's JSON ``config`` and its ``state`` arrays as ``kind``."""
    save_arrays(path, kind, {"config": encode_config(config), **state})


def load_object(path, kind, config_type):
    """Read a file written by :func:`save_object`: returns ``(config, state arrays)``."""
    arrays = load_arrays(path, kind)
    config = decode_config(arrays, path, config_type)
    return config, arrays
