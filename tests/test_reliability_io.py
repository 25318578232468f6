"""Trying to break it from outside (issue 17): files that are not what they claim, files
shared with other accounts, user mistakes on the command line.  Each test reproduces a
failure of the earlier code and checks its whole class is gone."""
import gzip
import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

import backprop as bp
from backprop.datasets import load_idx
from conftest import make_net

# A run that reads without bound (the old /dev/zero) must fail, not take the machine: the
# child gets 3 GB of address space (importing backprop takes well under 1 GB) and 30 s.
ADDRESS_SPACE = 3 << 30
TIMEOUT = 30


def _limit_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run(args, cwd):
    """A child process, limited as above, importing the backprop under test; a hang fails
    the test instead of blocking it."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(bp.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package_parent] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT,
                              env=env, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args} still running after {TIMEOUT} s")


def run_cli(*args, cwd):
    return run([sys.executable, "-m", "backprop", *args], cwd)


def raised_by(call, cwd):
    """`call` (Python source) run in a child; its exception as 'TypeName: message'."""
    source = textwrap.dedent(f"""
        import backprop as bp
        from backprop.datasets import load_idx, load_fashion_mnist
        try:
            {call}
        except Exception as e:
            print(f"{{type(e).__name__}}: {{e}}")
        else:
            print("no error")
        """)
    result = run([sys.executable, "-c", source], cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_one_line_error(result, *fragments):
    """What every user mistake on the command line must end with."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("backprop: error:") and result.stderr.count("\n") == 1, \
        result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ---- 1. nothing read from outside costs memory it did not bring

@pytest.fixture
def not_files(tmp_path):
    """Paths that are not regular files, each named like the file a reader expects:
    name -> (path relative to tmp_path, the kind the error must name)."""
    os.mkfifo(tmp_path / "fifo.npz")
    os.symlink("fifo.npz", tmp_path / "fifo.csv")
    os.symlink("/dev/zero", tmp_path / "zero.npz")       # a link to a device is a device
    os.symlink("/dev/zero", tmp_path / "zero.csv")
    (tmp_path / "folder.npz").mkdir()
    return {"fifo": ("fifo.npz", "FIFO"), "fifo-csv": ("fifo.csv", "FIFO"),
            "zero": ("zero.npz", "character device"), "zero-csv": ("zero.csv", "character device"),
            "folder": ("folder.npz", "folder")}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and /dev/zero")
@pytest.mark.parametrize("kind", ["fifo", "zero", "folder"])
@pytest.mark.parametrize("call", ["bp.Network.load({path!r})", "load_idx({path!r})"])
def test_the_python_readers_refuse_what_is_not_a_regular_file(call, kind, not_files, tmp_path):
    # Before: load("/dev/zero") grew without bound, load(FIFO) waited forever.
    path, what = not_files[kind]
    message = raised_by(call.format(path=path), tmp_path)
    assert message.startswith("ValueError") and repr(path) in message and what in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and /dev/zero")
@pytest.mark.parametrize("command, kind", [
    (command, kind)
    for command in ("predict --model m.npz --input {path}",
                    "evaluate --model {path} --dataset digits",
                    "evaluate --model m.npz --dataset {path}",
                    "train --dataset {path} --epochs 1 --no-progress")
    for kind in ("fifo", "fifo-csv", "zero", "zero-csv", "folder")
    if not ("--model {path}" in command and kind.endswith("csv"))])     # a model is an .npz
def test_the_cli_refuses_what_is_not_a_regular_file(command, kind, not_files, tmp_path):
    # Before: predict --input /dev/zero reached 7.5 GB; a FIFO waited forever.
    path, what = not_files[kind]
    make_net([64, 10], "softmax", "cross_entropy", dtype="float32").save(tmp_path / "m.npz")
    result = run_cli(*command.format(path=path).split(), cwd=tmp_path)
    assert_one_line_error(result, path, what)


def gzip_stream(header, zeros):
    """A gzip file of `header` then `zeros` zero bytes, compressed piece by piece (the
    uncompressed data never exists in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)         # 31: gzip framing
    parts = [packer.compress(header)]
    block = bytes(1 << 20)
    for start in range(0, zeros, len(block)):
        parts.append(packer.compress(block[:min(len(block), zeros - start)]))
    return b"".join(parts) + packer.flush()


def peak_memory(call):
    """Peak of the memory Python and NumPy allocate while `call` runs."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("header, zeros, message", [
    # ~100 KB of gzip holding 100 MB of zeros: the header's type code (0) is wrong, seen
    # from its first 4 bytes.  Before: all of it was decompressed first (+2 GB for 1 MB).
    (b"", 100 << 20, "type code"),
    # A sound header claiming 2**31 x 2**31 bytes: more than any gzip of this size can
    # expand to (1032 times its size), refused before anything is allocated.
    (bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2 ** 31, 2 ** 31), 1 << 20,
     "more than the file can hold"),
])
def test_load_idx_checks_the_header_before_reading_the_body(header, zeros, message, tmp_path):
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip_stream(header, zeros))
    assert path.stat().st_size < 200_000

    def load():
        with pytest.raises(ValueError, match=message):
            load_idx(path)
    assert peak_memory(load) < 1 << 20


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_reads_the_body_straight_into_the_array(compress, tmp_path):
    # 8 MB of int16 (big-endian in the file): the result is the only large allocation,
    # beside buffers of a fixed size (before: the file's bytes, the decompressed bytes and
    # the converted copy, 16 MB or more at once).
    values = np.arange(4 << 20, dtype=np.int16).reshape(1024, -1)
    body = values.astype(">i2").tobytes()
    raw = bytes([0, 0, 0x0B, 2]) + struct.pack(">II", *values.shape) + body
    path = tmp_path / "data.idx"
    path.write_bytes(gzip.compress(raw, 1) if compress else raw)
    loaded = []
    peak = peak_memory(lambda: loaded.append(load_idx(path)))
    np.testing.assert_array_equal(loaded[0], values)
    assert peak < values.nbytes + (2 << 20)


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


# ---- 3. every user mistake on the command line: one line, exit code 2

def small_model(path, loss, outputs):
    """A 3-input model with `loss` saved at `path`, and the model itself."""
    out = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid", "mse": None,
           None: "softmax"}[loss]
    net = bp.Network([bp.Dense(3, 5, "tanh"), bp.Dense(5, outputs, out)], loss=loss,
                     dtype="float32", seed=0)
    net.save(path)
    return net


def table(n=40, seed=0):
    """Features of shape (n, 3) and 0/1 labels."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype(np.float32), np.arange(n) % 2


def deep_checkpoint(path, depth):
    net = make_net([3, 3, 2], ["identity", "softmax"], "cross_entropy", dtype="float32")
    from backprop import record
    header, arrays = record.to_record(net)
    dense = json.dumps(header["network"]["layers"][0])
    forge(path, json.dumps(header).replace(dense, nest(dense, depth), 1), arrays)


def make_files(d):
    """The files the mistakes below are made with, in folder `d`."""
    X, y = table()
    np.savez(d / "flat.npz", X=X[:, 0], y=y)                 # X 1-D
    np.savez(d / "complex.npz", X=X + 1j, y=y)
    np.savez(d / "text.npz", X=X.astype(str), y=y)
    np.savez(d / "images.npz", X=X.reshape(40, 3, 1), y=y)   # X 3-D
    np.savez(d / "no_y.npz", X=X)
    np.savez(d / "X_only_wrong_width.npz", X=np.zeros((4, 7)))
    (d / "empty.npz").write_bytes(b"")
    (d / "cut.npz").write_bytes((d / "flat.npz").read_bytes()[:100])
    (d / "empty.csv").write_text("")
    (d / "header.csv").write_text("a,b,c,label\n1,2,3,0\n")
    small_model(d / "logits.npz", None, 2)
    deep_checkpoint(d / "deep.npz", 400)
    make_net([64, 10], "softmax", "cross_entropy", dtype="float32").save(d / "digits.npz")


@pytest.mark.parametrize("command, message", [
    # Before: IndexError, a traceback and exit code 1.
    ("train --dataset flat.npz", "flat.npz: X must be a 2-D array"),
    # Before: trained on the real part, silently.
    ("train --dataset complex.npz", "complex.npz: X must hold real numbers"),
    ("predict --model digits.npz --input complex.npz", "X must hold real numbers"),
    # Before: RuntimeError, a traceback and exit code 1.
    ("evaluate --model logits.npz --dataset flat.npz", "logits.npz: the model has no loss"),
    # Before: RecursionError, a traceback and exit code 1.
    ("evaluate --model deep.npz --dataset digits", "nests deeper than"),
    # Before: EOFError and BadZipFile, tracebacks and exit code 1.
    ("train --dataset empty.npz", "empty.npz: not a readable .npz file"),
    ("predict --model digits.npz --input cut.npz", "cut.npz: not a readable .npz file"),
    # Before: a warning on stderr above the error line.
    ("train --dataset empty.csv", "empty.csv: the file holds no rows"),
    # Before: these messages did not name the file.
    ("train --dataset header.csv", "header.csv: could not convert"),
    ("train --dataset text.npz", "text.npz: X must hold real numbers"),
    ("train --dataset images.npz", "images.npz: X must be a 2-D array"),
    ("predict --model digits.npz --input X_only_wrong_width.npz",
     "X_only_wrong_width.npz: the model takes 64 features, X has 7"),
    ("evaluate --model digits.npz --dataset header.csv", "header.csv"),
    ("train --dataset no_y.npz", "no_y.npz: an .npz file here needs arrays named X and y"),
    # Before: the folder's absence was found after training, when saving.
    ("train --save missing/m.npz", "--save missing/m.npz: the folder"),
    ("train --plot .", "--plot .: it is a folder"),
])
def test_cli_mistakes_end_in_one_line_and_exit_code_2(command, message, tmp_path):
    make_files(tmp_path)
    quiet = ["--no-progress"] if command.startswith("train") else []
    result = run_cli(*command.split(), *quiet, cwd=tmp_path)
    assert_one_line_error(result, message)
    assert result.stdout == ""              # refused before any training or output


@pytest.mark.parametrize("loss, outputs", [("mse", 1), ("binary_cross_entropy", 1),
                                           ("mse", 2)])
@pytest.mark.parametrize("labels", ["int", "bool"])
def test_cli_evaluates_regression_and_binary_models_on_integer_targets(loss, outputs, labels,
                                                                       tmp_path):
    # Before: "y must have dtype float32", for targets an .npz naturally holds.
    net = small_model(tmp_path / "m.npz", loss, outputs)
    X, y = table()
    y = np.stack([y] * outputs, axis=1) if outputs > 1 else y
    np.savez(tmp_path / "d.npz", X=X, y=y.astype(bool) if labels == "bool" else y)
    result = run_cli("evaluate", "--model", "m.npz", "--dataset", "d.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # The same as evaluating in Python with float targets, one column per output.
    expected = net.evaluate(X, y.astype(np.float32).reshape(len(X), outputs))
    printed = dict(zip(result.stdout.split()[::2], map(float, result.stdout.split()[1::2])))
    assert printed == pytest.approx({k: round(v, 4) for k, v in expected.items()}, abs=1e-4)


def test_cli_names_the_targets_a_regression_model_needs(tmp_path):
    small_model(tmp_path / "m.npz", "mse", 2)
    X, y = table()
    np.savez(tmp_path / "d.npz", X=X, y=y)                  # one column for two outputs
    result = run_cli("evaluate", "--model", "m.npz", "--dataset", "d.npz", cwd=tmp_path)
    assert_one_line_error(result, "needs y of real numbers of shape (samples, 2)")


def test_cli_reads_a_csv_with_a_byte_order_mark(tmp_path):
    # Before: "could not convert string '\ufeff0.25...' to float64".  Excel's
    # "CSV UTF-8" starts with the mark.
    net = small_model(tmp_path / "m.npz", "cross_entropy", 2)
    X, _ = table(n=5)
    text = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in X)
    (tmp_path / "plain.csv").write_text(text, encoding="utf-8")
    (tmp_path / "marked.csv").write_text(text, encoding="utf-8-sig")
    assert (tmp_path / "marked.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    outputs = [run_cli("predict", "--model", "m.npz", "--input", name, cwd=tmp_path)
               for name in ("plain.csv", "marked.csv")]
    assert all(result.returncode == 0 for result in outputs), outputs[1].stderr
    assert outputs[0].stdout == outputs[1].stdout
    assert outputs[1].stdout.split() == [str(v) for v in net.predict(X)]
