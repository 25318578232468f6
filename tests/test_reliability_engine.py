"""Trying to break the engine (issue 17, round three): sizes that overflow on their way
into C, checkpoints that claim more than they bring, updates that overflow, snapshots
taken while another thread trains, and what a user handed over being changed behind
their back.  Each test reproduces what the earlier engine did wrong."""
import copy
import gc
import json
import pickle
import subprocess
import sys
import textwrap
import threading
import zipfile

import numpy as np
import pytest

import backprop as bp
from backprop import record
from conftest import assert_unchanged, snapshot


def run_python(code, timeout=120):
    """Run `code` in a fresh interpreter (for what would hang or crash this one); its
    stdout's last line, parsed as JSON."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def forge(path, header, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, array in {"header": np.frombuffer(json.dumps(header).encode(), np.uint8),
                            **members}.items():
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(array))


# ---- 1. sizes never overflow on their way into C


def test_huge_row_counts_are_refused_at_once_never_scanned():
    """A zero-stride batch of 32,400,604,344,923,406 rows, and row indexes of 2**62 and
    2**63 - 1 entries: a MemoryError before anything reads them (the earlier engine
    scanned a 2**62-entry index for its minimum first, which never ends)."""
    result = run_python("""
        import json, numpy as np, backprop as bp
        net = bp.Network([bp.Dense(64, 8, "relu"), bp.Dense(8, 3, "softmax")],
                         loss="cross_entropy", optimizer=bp.SGD(lr=0.1), seed=0)
        x, y = np.ones((4, 64), np.float32), np.zeros(4, np.int64)
        net.train_step(x, y)
        before = net.params.copy()
        huge = np.broadcast_to(np.float32(1), (32400604344923406, 64))
        calls = {
            "forward": lambda: net.forward(huge),
            "train_step": lambda: net.train_step(huge, np.broadcast_to(np.int64(0), (huge.shape[0],))),
            "compute_gradients": lambda: net.compute_gradients(
                huge, np.broadcast_to(np.int64(0), (huge.shape[0],))),
            "sample_weight": lambda: net.train_step(
                huge, np.broadcast_to(np.int64(0), (huge.shape[0],)),
                sample_weight=np.broadcast_to(np.float32(1), (huge.shape[0],))),
        }
        for n in (2 ** 62, 2 ** 63 - 1):
            index = np.broadcast_to(np.uint8(0), (n,))
            calls[f"rows={n}"] = lambda index=index: net.train_step(x, y, rows=index)
            calls[f"forward rows={n}"] = lambda index=index: net._engine.forward(x, rows=index)
        calls["rows=int64"] = lambda: net.train_step(x, y, rows=np.broadcast_to(np.int64(0), (2 ** 59,)))
        errors = {}
        for name, call in calls.items():
            try:
                call()
                errors[name] = "no error"
            except Exception as e:
                errors[name] = type(e).__name__
        net.train_step(x, y)            # and it still trains
        print(json.dumps({"errors": errors, "finite": bool(np.isfinite(net.params).all()),
                          "moved": bool((net.params != before).any())}))
    """, timeout=60)
    assert all(e in ("MemoryError", "ValueError") for e in result["errors"].values()), result
    assert result["finite"] and result["moved"]


def test_a_small_batch_of_huge_zero_stride_data_reads_only_its_rows(rng):
    """rows= picks a batch out of data of any size: labels, ids, targets and weights of
    another dtype are converted row by row as they are gathered, never whole (which
    for 2**59 rows asked for exabytes, and for a real int32 dataset copied it at every
    step)."""
    n = 2 ** 59
    rows = np.array([0, 5, n - 1])
    X = np.broadcast_to(np.float32(0.5), (n, 1))
    net = bp.Network([bp.Dense(1, 3, activation="softmax")], loss="cross_entropy",
                     optimizer=bp.SGD(lr=0.1), seed=0)
    twin = bp.Network([bp.Dense(1, 3, activation="softmax")], loss="cross_entropy",
                      optimizer=bp.SGD(lr=0.1), seed=0)
    for dtype in (np.int8, np.uint16, np.int32, np.uint64):
        labels = np.broadcast_to(dtype(2), (n,))
        weights = np.broadcast_to(np.float32(2), (n,))
        loss = net.train_step(X, labels, rows=rows, sample_weight=weights)
        same = twin.train_step(np.full((3, 1), 0.5, np.float32), np.full(3, 2),
                               sample_weight=np.full(3, 2.0))
        assert loss == same
        np.testing.assert_array_equal(net.params, twin.params)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\), got 255"):
        net.train_step(X, np.broadcast_to(np.uint8(255), (n,)), rows=rows)
    with pytest.raises(ValueError, match="got 18446744073709551615"):
        net.train_step(X, np.broadcast_to(np.uint64(2 ** 64 - 1), (n,)), rows=rows)
    with pytest.raises(ValueError, match="sample_weight must be finite and >= 0, got -1.0 for row 5"):
        w = np.ones(6, np.float32)
        w[5] = -1
        net.train_step(X[:6], np.zeros(6, np.int64), rows=np.array([0, 5]), sample_weight=w)

    emb = bp.Network([bp.Embedding(10, 4), bp.Flatten(), bp.Dense(12, 1)], loss="mse",
                     input_shape=(3,), seed=0)
    ids = np.broadcast_to(np.int16(7), (n, 3))
    emb.train_step(ids, np.broadcast_to(np.float32(0), (n, 1)), rows=rows)
    values = (np.arange(12, dtype=np.int32) % 10).tobytes()
    unaligned = np.frombuffer(b"\x00" + values, np.int32, offset=1).reshape(4, 3)
    assert not unaligned.flags.aligned
    emb.forward(unaligned)
    with pytest.raises(ValueError, match=r"every id must lie in \[0, 10\).*got 12 in row 1"):
        emb.forward(np.array([[1, 2, 3], [4, 12, 5]], np.uint32))


@pytest.mark.parametrize("make", [
    lambda: bp.Network([bp.Conv1d(1, 1, 3, stride=2 ** 70)], input_shape=(1, 8)),
    lambda: bp.Network([bp.Conv1d(1, 1, 2, dilation=2 ** 70, padding=2 ** 69)],
                       input_shape=(1, 8)),
    lambda: bp.Network([bp.MaxPool1d(2, stride=2 ** 70)], input_shape=(1, 8)),
    lambda: bp.Network([bp.MaxPool2d((2 ** 39, 2 ** 39), padding=(2 ** 38, 2 ** 38))],
                       input_shape=(1, 4, 4)),
], ids=["conv-stride", "conv-dilation", "pool-stride", "pool-window"])
def test_window_numbers_too_large_for_the_kernels_are_a_valueerror(make):
    with pytest.raises(ValueError, match="the compiled core takes"):
        make()


def test_a_header_with_a_stride_of_2_to_the_70_is_an_invalid_checkpoint(tmp_path):
    net = bp.Network([bp.Conv1d(1, 1, 3, stride=2)], input_shape=(1, 8), seed=0)
    header, arrays = record.to_record(net)
    header["network"]["layers"][0]["config"]["stride"] = [2 ** 70]
    forge(tmp_path / "stride.npz", header, arrays)
    with pytest.raises(ValueError, match="invalid backprop checkpoint.*stride"):
        bp.Network.load(tmp_path / "stride.npz")


def test_products_bound_their_sides_before_sizing_scratch():
    """matmul's operands are NumPy arrays, whose sides NumPy keeps below 2**61; the
    scratch helper checks its own (it used to round 2**63 - 1 up to whole tiles in C)."""
    for m, n, k in ((2 ** 63 - 1, 8, 8), (8, 2 ** 63 - 1, 8), (8, 8, -1), (2 ** 62, 2 ** 62, 2 ** 62)):
        with pytest.raises(ValueError, match="m, n, k must lie in"):
            bp._core._gemm_scratch_bytes(m, n, k, 2, np.float32)
    a = np.broadcast_to(np.float32(1), (2 ** 40, 2 ** 20))
    b = np.broadcast_to(np.float32(1), (2 ** 20, 2 ** 20))
    for call in (lambda: bp.ops.matmul(a, b), lambda: bp.ops.matmul(b, a, trans_b=True),
                 lambda: bp.ops.matmul(np.broadcast_to(np.float32(1), (1, 2 ** 60)),
                                       np.broadcast_to(np.float32(1), (2 ** 60, 1)))):
        with pytest.raises((MemoryError, ValueError)):
            call()


# ---- 2. a checkpoint claiming a huge layer costs nothing until it runs


@pytest.mark.parametrize("width", [10 ** 8, 2 ** 63 - 1])
def test_loading_a_huge_layer_without_arrays_allocates_nothing(width, tmp_path):
    """A LayerNorm without affine parameters brings no arrays, so its header may claim any
    width: loading costs what the file holds (the workspace waits for the first batch),
    a width the core cannot index is refused, and a batch too large for memory is a
    MemoryError, never an OverflowError or a crash."""
    net = bp.Network([bp.LayerNorm(4, elementwise_affine=False)], seed=0)
    header, arrays = record.to_record(net)
    header["network"]["layers"][0]["config"]["normalized_shape"] = width
    header["network"]["input_shape"] = [width]
    forge(tmp_path / "huge.npz", header, arrays)
    result = run_python(f"""
        import json, resource, tracemalloc, numpy as np, backprop as bp
        rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        before = rss()
        tracemalloc.start()
        try:
            net = bp.Network.load({str(tmp_path / "huge.npz")!r})
            loaded = "loaded"
        except ValueError as e:
            net, loaded = None, str(e)
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        grew = rss() - before
        error = None
        if net is not None:
            try:
                net.forward(np.broadcast_to(np.float32(1), (2 ** 34, {width})))
            except Exception as e:
                error = type(e).__name__
        print(json.dumps({{"loaded": loaded, "traced": traced, "grew": grew, "error": error}}))
    """)
    assert result["traced"] < 2 ** 20 and result["grew"] < 32 * 2 ** 20, result
    if width == 10 ** 8:
        assert result["loaded"] == "loaded" and result["error"] == "MemoryError"
    else:
        assert "holds more than 1,099,511,627,776 values" in result["loaded"]


# ---- 3. an update that overflows is undone


def overflowing(name):
    """(network, x, y, steps that succeed first) where the update after them overflows
    although the loss and the gradients are finite."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2)) * 100
    if name == "adagrad-sum":            # float32 sum of squares: 2 * 2.56e38 on step 2
        net = bp.Network([bp.Dense(1, 1, bias=False)], loss="mse", optimizer=bp.Adagrad(),
                         dtype="float32", seed=0)
        net.layers[0].weight[...] = 0
        return net, np.ones((1, 1)), np.full((1, 1), -8e18), 1
    optimizer, dtype = {
        "sgd": (bp.SGD(lr=1e37), "float32"),
        "sgd-momentum-float64": (bp.SGD(lr=1e308, momentum=0.9), "float64"),
        "adam-lr": (bp.Adam(lr=1e39), "float32"),       # lr itself is infinite in float32
        "rmsprop": (bp.RMSprop(lr=1e38), "float32"),
    }[name]
    net = bp.Network([bp.Dense(4, 8), bp.BatchNorm(8), bp.Activation("relu"), bp.Dropout(0.3),
                      bp.Dense(8, 2)], loss="mse", optimizer=optimizer, dtype=dtype, seed=0)
    return net, x, y, 0


CASES = ["sgd", "sgd-momentum-float64", "adam-lr", "rmsprop", "adagrad-sum"]


def about_to_overflow(name):
    """overflowing(name) brought to the step that overflows, with gradients pending (which
    train_step adds to, step uses); and what the network is then."""
    net, x, y, good = overflowing(name)
    for _ in range(good):
        net.train_step(x, y)
    net.forward(x)
    net.backward(y)
    return net, x, y, good, snapshot(net)


@pytest.mark.parametrize("name", CASES)
def test_train_step_refuses_an_update_that_overflows_and_changes_nothing(name):
    net, x, y, _, before = about_to_overflow(name)
    with pytest.raises(FloatingPointError, match="the update overflowed.*not applied, so the "
                                                 "weights and optimizer state are those of the "
                                                 "last good step: lower the learning rate"):
        net.train_step(x, y)
    assert_unchanged(net, before)
    assert np.isfinite(net.params).all()


@pytest.mark.parametrize("name", CASES)
def test_step_refuses_an_update_that_overflows_and_changes_nothing(name):
    net, _, _, good, before = about_to_overflow(name)
    with pytest.raises(FloatingPointError, match="the update overflowed"):
        net.step()
    assert_unchanged(net, before)
    if name != "adagrad-sum":                # (there the sum itself overflows)
        net.optimizer.lr = 1e-3              # the gradients are still there to step on
        net.step()
        assert net.optimizer.steps == good + 1 and np.isfinite(net.params).all()


def test_a_refused_update_leaves_training_where_it_was():
    """After a refused update, training goes on as if it had never been tried: the same
    weights, state, running statistics and dropout masks as a twin that skipped it."""
    net, x, y, _ = overflowing("sgd")
    twin, _, _, _ = overflowing("sgd")
    for model in (net, twin):
        model.optimizer.lr = 1e-2
        model.train_step(x, y)
    net.optimizer.lr = 1e37
    with pytest.raises(FloatingPointError):
        net.train_step(x, y)
    net.optimizer.lr = 1e-2
    for model in (net, twin):
        model.train_step(x, y)
        model.train_step(x[::-1], y)
    assert_unchanged(net, snapshot(twin))


def test_fit_says_the_update_overflowed_and_keeps_the_last_good_weights():
    net, x, y, _ = overflowing("sgd")
    before = snapshot(net)
    with pytest.raises(FloatingPointError) as error:
        net.fit(x, y, epochs=2, batch_size=8, progress=False)
    message = str(error.value)
    assert message.startswith("training diverged at epoch 1, step 0: the update overflowed")
    assert "lower the learning rate" in message
    assert "the loss" not in message and "non-finite layer" not in message
    assert_unchanged(net, before)


def test_centered_rmsprop_with_a_constant_gradient_stays_finite():
    """s - a**2 rounds below 0 when the gradient never varies; torch's square root then
    writes NaN into the weights.  Clamped at 0, the update stays finite."""
    for alpha, g in ((0.5, 0.3), (0.9, 3.0), (0.9, 0.1)):
        net = bp.Network([bp.Dense(1, 1, bias=False)], dtype="float32", seed=0,
                         optimizer=bp.RMSprop(lr=1e-3, alpha=alpha, centered=True))
        for _ in range(300):
            net.forward(np.ones((1, 1)))
            net.backward(grad_output=np.full((1, 1), g))
            net.step()
            net.zero_grad()
        assert np.isfinite(net.params).all() and np.isfinite(net.optimizer.state["grad_avg"]).all()


@pytest.mark.parametrize("optimizer, buffer", [(bp.Adam(), "exp_avg_sq"),
                                               (bp.Adam(amsgrad=True), "max_exp_avg_sq"),
                                               (bp.RMSprop(), "square_avg"),
                                               (bp.Adagrad(), "sum")])
def test_a_state_with_negative_sums_of_squares_is_refused(optimizer, buffer):
    net = bp.Network([bp.Dense(3, 2)], loss="mse", optimizer=optimizer, seed=0)
    net.train_step(np.ones((4, 3)), np.zeros((4, 2)))
    state = optimizer.state_dict()
    state["state"][buffer][1] = -1.0
    before = snapshot(net)
    with pytest.raises(ValueError, match=f"optimizer state '{buffer}' holds sums of squares"):
        optimizer.load_state_dict(state)
    assert_unchanged(net, before)


# ---- 4. snapshots are of one step boundary, even while another thread trains


def fingerprint(net):
    """What a snapshot must agree on with some step boundary."""
    return (hash(net.params.tobytes()), hash(net.buffers.tobytes()), net.optimizer.steps,
            net._engine.passes, tuple(hash(v.tobytes()) for v in net.optimizer.state.values()))


def test_snapshots_taken_while_another_thread_trains_are_whole_steps(tmp_path):
    """pickle, deepcopy and save while a thread trains in a loop: each equals the network at
    some step boundary (weights, running statistics, optimizer state, step and pass
    counts), never a mix of several steps (the earlier engine copied the weights while an
    update wrote them).  The snapshot waits for the step; the training thread waits for
    the snapshot, neither fails."""
    rng = np.random.default_rng(0)
    net = bp.Network([bp.Dense(128, 512), bp.BatchNorm(512), bp.Activation("relu"),
                      bp.Dropout(0.2), bp.Dense(512, 10, activation="softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(lr=1e-4), seed=0)
    X, y = rng.normal(size=(256, 128)).astype(np.float32), rng.integers(0, 10, 256)
    boundaries = {fingerprint(net)}
    stop, failures = threading.Event(), []

    def train():
        try:
            while not stop.is_set():
                net.train_step(X, y)
                boundaries.add(fingerprint(net))
        except Exception as e:                  # pragma: no cover - reported below
            failures.append(e)

    worker = threading.Thread(target=train)
    worker.start()
    snapshots = []
    try:
        for i in range(20):
            snapshots.append(pickle.loads(pickle.dumps(net)))
            snapshots.append(copy.deepcopy(net))
            net.save(tmp_path / "net.npz")
            snapshots.append(bp.Network.load(tmp_path / "net.npz"))
    finally:
        stop.set()
        worker.join()
    assert not failures
    assert len(boundaries) > 2                   # the network trained meanwhile
    assert all(fingerprint(s) in boundaries for s in snapshots)


def test_copies_of_one_layer_wait_for_the_step_too():
    # A small batch: the update (of a million weights, with momentum) is most of a step.
    net = bp.Network([bp.Dense(1024, 1024), bp.Dense(1024, 4)], loss="mse",
                     optimizer=bp.SGD(lr=1e-3, momentum=0.9), seed=0)
    X, y = np.random.default_rng(0).normal(size=(4, 1024)), np.zeros((4, 4))
    layer, weights = net.layers[0], {hash(net.layers[0].weight.tobytes())}
    stop = threading.Event()

    def train():
        while not stop.is_set():
            net.train_step(X, y)
            weights.add(hash(layer.weight.tobytes()))

    worker = threading.Thread(target=train)
    worker.start()
    copies = []
    try:
        while len(copies) < 30 or len(weights) < 100:       # copies over 100 steps at least
            copies.append(copy.deepcopy(layer))
    finally:
        stop.set()
        worker.join()
    assert all(hash(c._values()["weight"].tobytes()) in weights for c in copies)


# ---- 5. what a user handed over is never silently changed


def test_a_layer_keeps_its_weights_when_its_network_is_collected(rng):
    """As a torch module keeps its weights: a layer of a network that was collected brings
    its trained weights and running statistics to the next network, which used to draw
    fresh ones over them."""
    layers = [bp.Dense(3, 4), bp.BatchNorm(4), bp.Dense(4, 2)]
    net = bp.Network(layers, loss="mse", seed=0)
    for _ in range(3):
        net.train_step(rng.normal(size=(8, 3)), rng.normal(size=(8, 2)))
    trained = [layer._values() for layer in layers]
    del net
    gc.collect()
    with pytest.raises(ValueError, match="needs a 'softmax' output"):
        bp.Network(layers, loss="cross_entropy")            # refused: changes nothing
    again = bp.Network(layers, loss="mse", seed=1)
    for layer, values in zip(layers, trained):
        for name, value in values.items():
            np.testing.assert_array_equal(getattr(layer, name), value)
    assert again.layers[1].running_var is layers[1].running_var


@pytest.mark.parametrize("name, value", [
    ("params", lambda net: net.params.copy()), ("grads", lambda net: net.grads.copy()),
    ("buffers", lambda net: net.buffers.copy()), ("layers", lambda net: list(net.layers)),
    ("dtype", lambda net: np.dtype("float64")), ("loss", lambda net: "cross_entropy"),
    ("loss_spec", lambda net: None), ("seed", lambda net: 1),
    ("output_activation", lambda net: "softmax")])
def test_what_the_engine_was_built_from_cannot_be_reassigned(name, value, rng):
    net = bp.Network([bp.Dense(3, 4), bp.BatchNorm(4), bp.Dense(4, 2)], loss="mse", seed=0)
    with pytest.raises(AttributeError, match=f"Network.{name} cannot be reassigned"):
        setattr(net, name, value(net))
    assert isinstance(net.layers, tuple)
    net.train_step(rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    net.params *= 0.5                 # in place: the same arrays, still the network's
    net.buffers /= 2
    np.testing.assert_array_equal(net.layers[0].weight.ravel(), net.params[:12])


def test_assigning_an_optimizer_trains_with_it_and_frees_the_old_one(rng):
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    net = bp.Network([bp.Dense(3, 2)], loss="mse", optimizer=bp.Adam(), seed=0)
    twin = bp.Network([bp.Dense(3, 2)], loss="mse", optimizer=bp.SGD(lr=0.1), seed=0)
    old = net.optimizer
    net.optimizer = bp.SGD(lr=0.1)
    for model in (net, twin):
        model.train_step(x, y)
    np.testing.assert_array_equal(net.params, twin.params)
    assert not old.attached and net.optimizer.attached
    bp.Network([bp.Dense(3, 2)], optimizer=old)           # free for another network
    with pytest.raises(ValueError, match="already updates another Network"):
        net.optimizer = twin.optimizer
    with pytest.raises(TypeError):
        net.optimizer = "sgd"
    assert net.optimizer.steps == 1


def test_an_optimizer_of_a_collected_network_is_free_and_keeps_its_state(rng):
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    opt = bp.Adam(lr=0.01)
    layers = [bp.Dense(3, 2)]
    net = bp.Network(layers, loss="mse", optimizer=opt, seed=0)
    net.train_step(x, y)
    twin = copy.deepcopy(net)
    del net
    gc.collect()
    assert not opt.attached
    again = bp.Network(layers, loss="mse", optimizer=opt, seed=0)     # continues training
    again.train_step(x, y)
    twin.train_step(x, y)
    np.testing.assert_array_equal(again.params, twin.params)
    assert opt.steps == 2
