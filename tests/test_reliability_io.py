"""Trying to break it from outside (issue 17): files that are not what they claim, files
shared with other accounts, user mistakes on the command line.  Each test reproduces a
failure of the earlier code and checks its whole class is gone."""
import json
import os
import stat
import zipfile

import numpy as np
import pytest

import backprop as bp
from conftest import make_net


# ---- 1. nothing read from outside costs memory it did not bring

def forge(path, header_text, arrays):
    """A checkpoint whose header is the JSON text given (written by hand: json.dumps
    cannot write a header nested 600 deep)."""
    members = {"header": np.frombuffer(header_text.encode(), np.uint8), **arrays}
    with zipfile.ZipFile(path, "w") as z:
        for name, array in members.items():
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(array))


def bn_record():
    from backprop import record
    net = bp.Network([bp.Dense(3, 4), bp.BatchNorm(4), bp.Activation("relu"),
                      bp.Dense(4, 2, "softmax")], loss="cross_entropy", seed=0)
    return record.to_record(net)


def nest(layer_json, depth):
    """`layer_json` inside `depth` Residual blocks, as JSON text."""
    return '{"type": "Residual", "config": {"layers": [' * depth + layer_json + "]}}" * depth


def set_rng(field, value):
    return lambda h: h["rng"]["state"].update({field: value})


@pytest.mark.parametrize("edit, message", [
    # Before: OverflowError (a number too large for a float, or for the RNG's words).
    (lambda h: h["optimizer"]["hyperparameters"].update(eps=10 ** 400), "optimizer"),
    (lambda h: h["optimizer"]["hyperparameters"].update(lr=10 ** 400), "optimizer"),
    (lambda h: h["network"]["layers"][1]["config"].update(eps=10 ** 400), r"layers\[1\]"),
    (set_rng("state", -1), "rng"),
    (set_rng("state", 2 ** 128), "rng"),
    (lambda h: h["rng"].update(has_uint32=2 ** 63), "rng"),
    # Before: a TypeError from inside NumPy, named as nothing in particular.
    (lambda h: h["history"]["history"].update(loss=[10 ** 400]), "history"),
])
def test_numbers_out_of_range_in_a_header_are_a_valueerror(edit, message, tmp_path):
    header, arrays = bn_record()
    edit(header)
    forge(tmp_path / "m.npz", json.dumps(header), arrays)
    with pytest.raises(ValueError, match=message):
        bp.Network.load(tmp_path / "m.npz")


@pytest.mark.parametrize("depth", [64, 65, 600])
def test_layers_nest_at_most_64_blocks_deep(depth, tmp_path):
    # Before: 600 nested blocks raised RecursionError.  64 load; 65 are refused, as
    # record.MAX_LAYER_NESTING says, and so is saving them (what save writes, load reads).
    net = make_net([3, 3, 2], "identity", "mse", dtype="float32")
    from backprop import record
    header, arrays = record.to_record(net)
    dense = json.dumps(header["network"]["layers"][0])          # 3 -> 3, nested
    text = json.dumps(header).replace(dense, nest(dense, depth), 1)
    forge(tmp_path / "m.npz", text, arrays)
    if depth <= record.MAX_LAYER_NESTING:
        loaded = bp.Network.load(tmp_path / "m.npz")
        np.testing.assert_array_equal(loaded.params, net.params)
        loaded.save(tmp_path / "again.npz")
        return
    with pytest.raises(ValueError, match="nests deeper than"):
        bp.Network.load(tmp_path / "m.npz")
    if depth < 300:             # Python itself builds blocks nested this deep
        layer = bp.Dense(3, 3)
        for _ in range(depth):
            layer = bp.Residual(layer)
        with pytest.raises(ValueError, match="nests deeper than"):
            bp.Network([layer, bp.Dense(3, 2)], loss="mse").save(tmp_path / "deep.npz")
        assert not (tmp_path / "deep.npz").exists()


def test_a_negative_running_variance_is_refused(tmp_path):
    # Before: it loaded and every prediction was NaN.
    header, arrays = bn_record()
    buffers = arrays["buffers"].copy()
    buffers[-1] = -0.5                      # running_mean (4 values), then running_var (4)
    forge(tmp_path / "m.npz", json.dumps(header), {**arrays, "buffers": buffers})
    with pytest.raises(ValueError, match=r"layers\[1\]\.running_var has negative values"):
        bp.Network.load(tmp_path / "m.npz")
    buffers[-1] = 0.0                       # zero is a variance (a constant feature)
    forge(tmp_path / "m.npz", json.dumps(header), {**arrays, "buffers": buffers})
    assert bp.Network.load(tmp_path / "m.npz").layers[1].running_var[-1] == 0.0


# ---- 2. files a user shares

def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process's umask for one test; the old one is put back after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def writers():
    """Everything that writes a file atomically: a checkpoint, and an ONNX model if onnx
    is installed."""
    net = make_net([3, 4, 2], ["relu", "softmax"], "cross_entropy", dtype="float32")
    calls = {"save": net.save}
    try:
        from backprop.interop import to_onnx
        import onnx  # noqa: F401
        calls["to_onnx"] = lambda path: to_onnx(net, path)
    except ImportError:
        pass
    return calls


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("writer", ["save", "to_onnx"])
def test_a_new_file_gets_the_mode_open_would_give(writer, mask, umask, tmp_path):
    # Before: always 0o600, so a model server under another account could not read it.
    write = writers().get(writer) or pytest.skip("onnx is not installed")
    umask(mask)
    expected = 0o666 & ~mask                # what creating with open(path, "w") gives
    with open(tmp_path / "plain", "w"):
        pass
    assert mode(tmp_path / "plain") == expected
    write(tmp_path / "model")
    assert mode(tmp_path / "model") == expected
    assert sorted(os.listdir(tmp_path)) == ["model", "plain"]      # no temporary file left


@pytest.mark.parametrize("existing", [0o644, 0o640, 0o600])
@pytest.mark.parametrize("writer", ["save", "to_onnx"])
def test_an_existing_file_keeps_its_mode(writer, existing, umask, tmp_path):
    # Before: overwriting a 0o644 file made it 0o600.
    write = writers().get(writer) or pytest.skip("onnx is not installed")
    umask(0o077)                            # would give 0o600 to a new file
    (tmp_path / "model").write_bytes(b"old")
    os.chmod(tmp_path / "model", existing)
    write(tmp_path / "model")
    assert mode(tmp_path / "model") == existing
    assert (tmp_path / "model").read_bytes() != b"old"


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
@pytest.mark.parametrize("target_exists", [True, False])
def test_saving_to_a_symlink_writes_where_it_points(target_exists, tmp_path):
    # Before: the link was replaced by a regular file and the target kept the old model.
    (tmp_path / "models").mkdir()
    (tmp_path / "current").mkdir()
    target = tmp_path / "models" / "v2.npz"
    link = tmp_path / "current" / "model.npz"
    os.symlink("../models/v2.npz", link)
    old = make_net([3, 2], "softmax", "cross_entropy", seed=1)
    if target_exists:
        old.save(target)
    net = make_net([3, 2], "softmax", "cross_entropy", seed=2)
    assert not np.array_equal(net.params, old.params)
    net.save(link)
    assert os.path.islink(link) and os.readlink(link) == "../models/v2.npz"
    np.testing.assert_array_equal(bp.Network.load(target).params, net.params)
    assert os.listdir(tmp_path / "models") == ["v2.npz"]         # the temporary file went
    assert os.listdir(tmp_path / "current") == ["model.npz"]     # there, and is gone
