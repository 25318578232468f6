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
# Under AddressSanitizer (tools/asan.sh preloads libasan) an address-space limit stops the
# child before it starts: ASan reserves terabytes of shadow memory.  Its own allocator
# limit takes over there (a malloc past it returns NULL, so the reader sees MemoryError).
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def _limit_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run(args, cwd):
    """A child process, limited as above, importing the backprop under test; a hang fails
    the test instead of blocking it."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(bp.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package_parent] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    limit = _limit_memory
    if UNDER_ASAN:
        limit = None
        env["ASAN_OPTIONS"] = ":".join(filter(None, [
            env.get("ASAN_OPTIONS", ""), f"soft_rss_limit_mb={ADDRESS_SPACE >> 20}"]))
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT,
                              env=env, preexec_fn=limit)
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
    (d / "nan.csv").write_text("1,2,3,0\n" * 12 + "1,nan,3,1\n")
    np.savez(d / "huge.npz", X=np.where(np.arange(40)[:, None] == 7, 1e300, X.astype(float)), y=y)
    np.savez(d / "objects.npz", X=X.astype(object), y=y)
    np.savez(d / "huge_labels.npz", X=X, y=np.where(y == 1, 1e30, y))
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
     "X_only_wrong_width.npz: the model takes samples of shape (64,)"),
    ("evaluate --model digits.npz --dataset header.csv", "header.csv"),
    ("train --dataset no_y.npz", "no_y.npz: an .npz file here needs arrays named X and y"),
    # Before: a RuntimeWarning, the header line, then the network's refusal.
    ("train --dataset huge.npz", "huge.npz: X holds NaN, Inf or a value too large for float32 "
                                 "(first in row 7)"),
    ("train --dataset nan.csv", "nan.csv: X holds NaN, Inf or a value too large for float32 "
                                "(first in row 12)"),
    ("train --dataset huge_labels.npz", "huge_labels.npz: labels must be whole numbers from 0"),
    ("train --dataset objects.npz", "objects.npz: Object arrays cannot be loaded"),
    ("train --layers 64,0,10", "--layers must be positive sizes"),
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


def test_cli_trains_on_labels_stored_as_a_column(tmp_path):
    # Before: "labels must be one non-empty column" for y of shape (n, 1).
    X, y = table()
    np.savez(tmp_path / "d.npz", X=X, y=y[:, None])
    result = run_cli("train", "--dataset", "d.npz", "--epochs", "1", "--no-progress",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout


# ---- 4. refused calls change nothing, in the training loop and the estimators

def state_of(net):
    """Everything a training step moves."""
    return [net.params.copy(), net.buffers.copy(), net.grads.copy(), net._engine.passes,
            net.optimizer.steps] + [v.copy() for v in net.optimizer.state.values()]


def assert_same_state(net, before):
    for a, b in zip(before, state_of(net)):
        np.testing.assert_array_equal(a, b)


def bn_net(n_in=4, n_out=3, dropout=False):
    layers = [bp.Dense(n_in, 8), bp.BatchNorm(8), bp.Activation("relu")]
    layers += [bp.Dropout(0.2)] if dropout else []
    layers.append(bp.Dense(8, n_out, "softmax"))
    return bp.Network(layers, loss="cross_entropy", optimizer=bp.Adam(lr=0.01),
                      dtype="float64", seed=0)


@pytest.mark.parametrize("where", ["X", "y"])
def test_bad_validation_data_is_refused_before_the_first_step(where, rng):
    # Before: 64 rows in batches of 8 trained a whole epoch (8 steps) first.
    net = bn_net(dropout=True)
    X, y = rng.normal(size=(64, 4)), rng.integers(0, 3, 64)
    X_val, y_val = rng.normal(size=(2000, 4)), rng.integers(0, 3, 2000)
    if where == "X":
        X_val[1500, 2] = np.nan             # in the second of evaluate's 1024-row batches
    else:
        y_val[1500] = 3                     # a class the 3 outputs do not have
    before = state_of(net)
    with pytest.raises(ValueError, match="validation_data"):
        net.fit(X, y, epochs=2, batch_size=8, validation_data=(X_val, y_val), progress=False)
    assert_same_state(net, before)
    assert net.epoch == 0 and net.history.epochs == 0


@pytest.mark.parametrize("n, batch_size", [(33, 32), (65, 32), (9, 4)])
def test_a_last_minibatch_of_one_row_joins_the_one_before_with_batchnorm(n, batch_size, rng):
    # Before: the epoch's last step (one row) was refused by BatchNorm after all the
    # others had been taken.
    X, y = rng.normal(size=(n, 4)), rng.integers(0, 3, n)
    net = bn_net()
    history = net.fit(X, y, epochs=2, batch_size=batch_size, shuffle=False, progress=False)
    assert history.epochs == 2
    steps = -(-n // batch_size) - 1         # ceil(n / batch) batches, the last two as one
    assert net.optimizer.steps == 2 * steps
    # The same as training by hand on those batches: the last one has batch_size + 1 rows.
    twin = bn_net()
    starts = list(range(0, n - batch_size - 1, batch_size)) + [n - batch_size - 1]
    for _ in range(2):
        for start, stop in zip(starts, starts[1:] + [n]):
            twin.train_step(X[start:stop], y[start:stop])
    np.testing.assert_array_equal(net.params, twin.params)
    np.testing.assert_array_equal(net.buffers, twin.buffers)


def test_without_batchnorm_the_minibatches_stay_as_asked(rng):
    X, y = rng.normal(size=(33, 4)), rng.integers(0, 3, 33)
    net = make_net([4, 3], "softmax", "cross_entropy")
    net.fit(X, y, epochs=1, batch_size=32, progress=False)
    assert net.optimizer.steps == 2         # 32 rows, then 1


@pytest.mark.parametrize("n", [201, 401])
def test_estimators_with_batch_norm_train_on_any_number_of_rows(n, rng):
    # Before: 201 or 401 rows (batches of 200, then 1) failed after a full epoch.
    from backprop.estimators import MLPClassifier
    X, y = rng.normal(size=(n, 5)), rng.integers(0, 2, n)
    clf = MLPClassifier(hidden_layer_sizes=(8,), batch_norm=True, max_iter=3, random_state=0)
    with pytest.warns(Warning, match="Maximum iterations"):
        clf.fit(X, y)
    assert clf.n_iter_ == 3
    assert clf.network_.optimizer.steps == 3 * (n // 200)


def fitted_classifier(rng, **params):
    from backprop.estimators import MLPClassifier
    X, y = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0, **params)
    with pytest.warns(Warning):
        clf.fit(X, y)
    return clf, X, y


def test_a_refused_fit_keeps_the_fitted_model(rng):
    # Before: n_threads=5000 passed the parameter check, the model was re-initialised,
    # then set_num_threads refused the count.
    clf, X, y = fitted_classifier(rng)
    before = dict(vars(clf)), [w.copy() for w in clf.coefs_]
    clf.set_params(n_threads=5000)
    with pytest.raises(ValueError, match=f"n_threads must be in \\[1, {bp.MAX_THREADS}\\]"):
        clf.fit(X, y)
    assert vars(clf).keys() == before[0].keys()
    assert clf.network_ is before[0]["network_"]
    for w, old in zip(clf.coefs_, before[1]):
        np.testing.assert_array_equal(w, old)


def test_a_refused_early_stopping_split_keeps_the_fitted_model(rng):
    # Before: the model was re-initialised, then the validation split was refused.
    clf, X, y = fitted_classifier(rng)
    network = clf.network_
    clf.set_params(early_stopping=True, validation_fraction=0.01)   # 1 row of 60: too few
    with pytest.raises(ValueError, match="validation set is too small"):
        clf.fit(X, y)
    assert clf.network_ is network and clf.validation_scores_ is None


def test_partial_fit_with_early_stopping_is_refused_before_anything_is_set(rng):
    # Before: refused, but classes_ and network_ were left set.
    from backprop.estimators import MLPClassifier, MLPRegressor
    X, y = rng.normal(size=(20, 3)), rng.integers(0, 2, 20)
    for est, args in ((MLPClassifier(early_stopping=True), dict(classes=[0, 1])),
                      (MLPRegressor(early_stopping=True), {})):
        with pytest.raises(ValueError, match="early_stopping"):
            est.partial_fit(X, y, **args)
        assert not any(name.endswith("_") for name in vars(est)), vars(est).keys()


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_a_refused_poisson_step_leaves_the_running_statistics(rng):
    # The Poisson loss is computed in Python around a forward, a backward and a step;
    # before, a refused step had already moved BatchNorm's statistics with its forward.
    from backprop.estimators import MLPRegressor
    X = rng.normal(size=(32, 4))
    reg = MLPRegressor(loss="poisson", hidden_layer_sizes=(6,), batch_norm=True, dropout=0.2,
                       batch_size=32, dtype="float64", random_state=0)
    reg.partial_fit(X, rng.poisson(2.0, 32).astype(float))
    net = reg.network_
    before = state_of(net)
    y = np.zeros(32)
    y[5] = 1e308                            # finite, accepted; y*log(y) overflows the loss
    with pytest.raises(ValueError, match="non-finite"):
        reg.partial_fit(X, y)
    assert_same_state(net, before)
    assert before[1].any()                  # the statistics are not trivially zero


def test_n_threads_puts_back_the_request_not_the_effective_count(rng):
    # Before: the estimator saved get_num_threads(), the count threadpoolctl allowed at
    # that moment (1), and set it as a request when it finished: once the limit was
    # lifted, backprop stayed on one thread.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=3, user_api="openmp"):
        assert bp.get_num_threads() == 3
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            fitted_classifier(rng, n_threads=2)
            assert bp.get_num_threads() == 1
        assert bp.get_num_threads() == 3


@pytest.mark.parametrize("first_to_end", [0, 1])
def test_overlapping_thread_limits_end_with_the_request_in_any_order(first_to_end):
    # Two estimators fitting in two threads: each block saved the count the other had
    # set, and the process was left on one of theirs.  Interleaved by hand here.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from backprop.estimators import _threads
    with threadpoolctl.threadpool_limits(limits=8, user_api="openmp"):
        bp.set_num_threads(5)
        blocks = [_threads(2), _threads(3)]
        blocks[0].__enter__()
        assert bp.get_num_threads() == 2
        blocks[1].__enter__()
        assert bp.get_num_threads() == 3
        blocks[first_to_end].__exit__(None, None, None)
        assert bp.get_num_threads() == [2, 3][1 - first_to_end]    # the one still running
        blocks[1 - first_to_end].__exit__(None, None, None)
        assert bp.get_num_threads() == 5
