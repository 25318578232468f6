"""Trying to break it: each test reproduces a crash or a silent corruption found on the
earlier engine (issue 9) and checks its whole class is gone."""
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

import backprop as bp
from conftest import assert_unchanged, make_net, snapshot, threads


# ---- 1. a failed allocation leaves the network as it was


@pytest.mark.parametrize("width", [16, 2048])
def test_a_memory_error_leaves_the_network_working(width, rng):
    x, y = rng.normal(size=(4, 8)).astype(np.float32), rng.integers(0, 3, 4)
    net = make_net([8, width, 3], ["relu", "softmax"], "cross_entropy", dtype="float32")
    twin = make_net([8, width, 3], ["relu", "softmax"], "cross_entropy", dtype="float32")
    net.train_step(x, y)
    twin.train_step(x, y)
    before = snapshot(net)
    huge = np.broadcast_to(x[:1], (10 ** 13, 8))      # asks for terabytes of workspace
    for call in (lambda: net.forward(huge), lambda: net.train_step(huge, np.zeros(10 ** 13, int))):
        with pytest.raises((MemoryError, ValueError)):
            call()
    assert_unchanged(net, before)
    victims = [np.zeros((4, 16), np.float32) for _ in range(50)]
    net.train_step(x, y)
    twin.train_step(x, y)
    np.testing.assert_array_equal(net.params, twin.params)
    np.testing.assert_array_equal(net.forward(x), twin.forward(x))
    assert not any(v.any() for v in victims)


def test_a_refused_batch_keeps_the_last_forward_for_backward(rng):
    """A batch refused for its contents (here NaN, larger than any batch before, so a new
    workspace was being prepared) does not replace the forward a backward will use."""
    net = make_net([5, 7, 3], ["tanh", "softmax"], "cross_entropy")
    x, y = rng.normal(size=(4, 5)), rng.integers(0, 3, 4)
    net.forward(x)
    bad = rng.normal(size=(40, 5))
    bad[39, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        net.forward(bad)
    net.backward(y)
    reference = make_net([5, 7, 3], ["tanh", "softmax"], "cross_entropy")
    reference.forward(x)
    reference.backward(y)
    np.testing.assert_array_equal(net.grads, reference.grads)


# ---- 2. thread counts


def test_absurd_thread_counts_are_refused():
    for n in (-1, bp.MAX_THREADS + 1, 100000):
        with pytest.raises(ValueError, match="set_num_threads"):
            bp.set_num_threads(n)
    with pytest.raises(TypeError):
        bp.set_num_threads(2.5)
    assert bp.get_num_threads() <= bp.MAX_THREADS


@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", {}),
                                         ("RMSprop", dict(centered=True, momentum=0.5)),
                                         ("Adagrad", dict(lr_decay=0.01))])
def test_optimizers_are_bit_identical_for_teams_up_to_256(name, kwargs, rng):
    """32,776 parameters (the size that made the last chunk start past the end with 256
    threads) and an odd 33,001."""
    for sizes in ([8, 4096], [11, 2750]):
        X, y = rng.normal(size=(64, sizes[0])), rng.normal(size=(64, sizes[1]))
        results = []
        for n in (1, 3, 256):
            with threads(n):
                net = make_net(sizes, "identity", "mse", optimizer=getattr(bp, name)(**kwargs))
                for _ in range(3):
                    net.train_step(X, y)
                results.append(net.params.copy())
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])


def test_omp_num_threads_256_in_a_fresh_process():
    script = textwrap.dedent("""
        import numpy as np, backprop as bp
        rng = np.random.default_rng(0)
        X, y = rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 3, 300)
        net = bp.Network([bp.Dense(8, 4096, "relu"), bp.Dense(4096, 3, "softmax")],
                         loss="cross_entropy", optimizer=bp.Adam(), seed=0)
        for _ in range(2):
            net.train_step(X, y)
        print(bp.get_num_threads(), float(np.abs(net.params).sum()))
    """)
    outputs = []
    for n in ("1", "256"):
        env = dict(os.environ, OMP_NUM_THREADS=n, OMP_WAIT_POLICY="passive")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split())
    assert outputs[0][0] == "1" and outputs[1][0] == "256"
    assert outputs[0][1] == outputs[1][1]


# ---- 3. no public class can be configured into a crash or a no-op


def test_the_optimizer_base_class_cannot_be_configured():
    with pytest.raises(TypeError, match="base class"):
        bp.Optimizer(kind=1, lr=0.01, beta1=0.9, beta2=0.999)
    with pytest.raises(TypeError, match="base class"):
        bp.Optimizer()

    class NoRule(bp.Optimizer):
        def __init__(self):
            pass

    with pytest.raises(TypeError, match="has no update rule"):
        bp.Network([bp.Dense(2, 2)], optimizer=NoRule())

    class FourBuffers(bp.Adam):
        STATE_NAMES = ("a", "b", "c", "d")     # the kernel keeps three: refused

    with pytest.raises(TypeError, match="keeps 3 state buffers, but 4 are named"):
        FourBuffers()

    class UnknownRule(bp.SGD):
        RULE = "lion"                          # no such row in the rule table

    with pytest.raises(ValueError, match="unknown optimizer rule 'lion'"):
        UnknownRule()
    with pytest.raises(TypeError, match="unknown optimizer setting"):
        bp.SGD()._set_rule(rule=1)


@pytest.mark.parametrize("make", [
    lambda: bp.SGD(lr=float("inf")), lambda: bp.SGD(lr=float("nan")), lambda: bp.Adam(lr=-1),
    lambda: bp.Adam(betas=(0.9, 1.0)), lambda: bp.Adam(eps="tiny"), lambda: bp.SGD(nesterov="false"),
    lambda: bp.RMSprop(centered=1), lambda: bp.Adam(betas=0.9),
])
def test_bad_hyperparameters_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_lr_cannot_become_infinite():
    opt = bp.SGD()
    for value in (float("inf"), float("nan"), -1):
        with pytest.raises(ValueError, match="lr must be"):
            opt.lr = value


# ---- 4. races return errors, never mixed data


def test_two_threads_on_one_network_never_mix_their_batches(rng):
    net = make_net([64, 256, 10], ["relu", "softmax"], "cross_entropy", dtype="float32")
    xa, xb = rng.normal(size=(32, 64)).astype(np.float32), rng.normal(size=(32, 64)).astype(np.float32)
    expected = {id(xa): net.forward(xa), id(xb): net.forward(xb)}
    wrong, refused, done = [], [], []

    def hammer(x):
        for _ in range(400):
            try:
                out = net.forward(x)
            except RuntimeError:
                refused.append(1)
                continue
            if not np.array_equal(out, expected[id(x)]):
                wrong.append(1)
            done.append(1)

    workers = [threading.Thread(target=hammer, args=(x,)) for x in (xa, xb)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not wrong and done


def test_every_entry_point_waits_for_a_running_step(rng):
    """While a long step runs without the GIL, other calls on the network or its
    optimizer are refused instead of reading or writing half-updated buffers."""
    net = make_net([1024, 2048, 10], ["relu", "softmax"], "cross_entropy", dtype="float32",
                   optimizer=bp.SGD(lr=0.01))
    X, y = rng.normal(size=(1024, 1024)).astype(np.float32), rng.integers(0, 10, 1024)
    stop = threading.Event()

    def steps():
        while not stop.is_set():
            net.train_step(X, y)

    worker = threading.Thread(target=steps)
    worker.start()
    calls = {"grad_norm": net.grad_norm, "zero_grad": net.zero_grad,
             "eval": net.eval, "lr": lambda: setattr(net.optimizer, "lr", 0.5),
             "bind": lambda: net.optimizer.bind(net.params.size, net.dtype)}
    refused = set()
    deadline = time.time() + 60
    try:
        while len(refused) < len(calls) and time.time() < deadline:
            for name, call in calls.items():
                try:
                    call()
                except RuntimeError:
                    refused.add(name)
    finally:
        stop.set()
        worker.join()
    assert refused == set(calls)


# ---- 5. a step applies a finite update or nothing


def test_gradient_overflow_is_refused_and_changes_nothing(tmp_path):
    net = bp.Network([bp.Dense(4, 1)], loss="mse", optimizer=bp.Adam(), seed=0)
    net.train_step(np.ones((8, 4), np.float32), np.zeros(8, np.float32))
    net.save(tmp_path / "good.npz")
    before = snapshot(net)
    with pytest.raises(FloatingPointError, match="not applied"):
        net.train_step(np.full((8, 4), 1e30, np.float32), np.zeros(8, np.float32))
    assert_unchanged(net, before)
    net.save(tmp_path / "good.npz")                # still saveable, still loadable
    np.testing.assert_array_equal(bp.Network.load(tmp_path / "good.npz").params, net.params)


def test_refused_steps_restore_statistics_counters_and_pending_gradients(rng):
    net = bp.Network([bp.Dense(4, 8), bp.BatchNorm(8), bp.Dropout(0.5), bp.Dense(8, 1)],
                     loss="mse", optimizer=bp.SGD(lr=0.1), dtype="float32", seed=0)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 1))
    net.forward(x)
    net.backward(y)                                     # pending gradients
    before = snapshot(net)
    # Sums that overflow float32 in the first layer, then an update that does (lr 3e38).
    for inputs, lr in ((np.full((6, 4), 3e38), 0.1), (x, 3e38)):
        net.optimizer.lr = lr
        with pytest.raises(FloatingPointError):
            net.train_step(inputs, y)
        assert_unchanged(net, before)
    net.optimizer.lr = 0.1
    with pytest.raises(FloatingPointError):     # the first layer's sums overflow float32
        net.compute_gradients(np.full((6, 4), 3e38), y)
    assert_unchanged(net, before)


def test_step_refuses_non_finite_gradients(rng):
    net = make_net([3, 2], "identity", "mse")
    net.forward(rng.normal(size=(4, 3)))
    net.backward(rng.normal(size=(4, 2)))
    net.grads[0] = np.nan
    before = snapshot(net)
    with pytest.raises(FloatingPointError, match="not applied"):
        net.step()
    assert_unchanged(net, before)


def test_an_overflowing_update_is_undone_and_the_network_still_saves(tmp_path):
    net = bp.Network([bp.Dense(2, 1, bias=False)], loss="mse", optimizer=bp.SGD(lr=1e30),
                     dtype="float32")
    net.layers[0].weight[...] = 1e10
    with pytest.raises(FloatingPointError, match="overflowed.*not applied"):
        net.train_step(np.ones((2, 2)), np.zeros(2))
    assert (net.layers[0].weight == np.float32(1e10)).all() and net.optimizer.steps == 0
    net.save(tmp_path / "m.npz")
    assert (bp.Network.load(tmp_path / "m.npz").layers[0].weight == np.float32(1e10)).all()


def test_early_stopping_with_a_never_finite_validation_loss_keeps_finite_weights(rng):
    net = make_net([4, 3], "identity", "mse", dtype="float32")
    X, y = rng.normal(size=(32, 4)), rng.normal(size=(32, 3))
    X_val = np.full((8, 4), 1e30)                   # the float32 outputs overflow
    net.fit(X, y, epochs=3, validation_data=(X_val, np.zeros((8, 3))), early_stopping=1,
            progress=False)
    assert np.isfinite(net.params).all()


def test_relu_keeps_nan_like_torch():
    net = bp.Network([bp.Dense(2, 2, activation="relu")], dtype="float64")
    net.layers[0].weight[0, 0] = np.nan
    out = net.forward(np.ones((1, 2)))
    assert np.isnan(out[0, 0]) and np.isfinite(out[0, 1])


def test_values_too_large_for_float32_are_refused():
    net = bp.Network([bp.Dense(2, 2)], loss="mse", dtype="float32")
    with pytest.raises(ValueError, match="too large for the network's dtype"):
        net.forward(np.array([[1e39, 0.0]]))
    with pytest.raises(ValueError, match="y contains NaN or Inf"):
        net.train_step(np.ones((1, 2)), np.array([[1e39, 0.0]]))


# ---- 7. checkpoints that claim more than they hold


def forge(path, header, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, array in {"header": np.frombuffer(json.dumps(header).encode(), np.uint8),
                            **members}.items():
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(array))


def small_header(net):
    from backprop import record
    return record.to_record(net)


def test_a_header_claiming_a_huge_layer_is_refused_before_allocating(tmp_path):
    net = make_net([3, 2], "identity", "mse", dtype="float32", optimizer=bp.Adam())
    header, arrays = small_header(net)
    header["network"]["layers"][0]["config"].update(in_features=50000, out_features=4000)
    header["network"]["layers"] = header["network"]["layers"][:1]
    header["network"]["input_shape"] = [50000]
    forge(tmp_path / "huge.npz", header, arrays)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="array 'params' has shape"):
            bp.Network.load(tmp_path / "huge.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2 ** 20 and time.perf_counter() - started < 5


def test_members_the_format_does_not_define_are_never_read(tmp_path):
    net = make_net([3, 2], "identity", "mse", dtype="float32")
    header, arrays = small_header(net)
    forge(tmp_path / "extra.npz", header, {**arrays, "junk": np.zeros(20 * 2 ** 20, np.uint8)})
    tracemalloc.start()
    try:
        loaded = bp.Network.load(tmp_path / "extra.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(loaded.params, net.params)
    assert peak < 10 * 2 ** 20


def test_a_params_member_smaller_than_its_npy_header_says_is_refused(tmp_path):
    net = make_net([3, 2], "identity", "mse", dtype="float32")
    net.save(tmp_path / "m.npz")
    with zipfile.ZipFile(tmp_path / "m.npz") as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["params.npy"] = members["params.npy"][:-4]      # one float short
    with zipfile.ZipFile(tmp_path / "m.npz", "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(ValueError, match="bytes of data"):
        bp.Network.load(tmp_path / "m.npz")


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["optimizer"]["hyperparameters"].update(nesterov="false"), "nesterov"),
    (lambda h: h["state"].update(epoch=float("inf")), "state.epoch"),
    (lambda h: h["state"].update(epoch=2.0), "state.epoch"),
    (lambda h: h["state"].update(training="yes"), "state.training"),
    (lambda h: h["state"].update(passes=-1), "state.passes"),
    (lambda h: h["network"].update(dtype="float16"), "dtype"),
    (lambda h: h["network"].update(seed=True), "network.seed"),
    (lambda h: h["network"]["layers"][0]["config"].update(bias="no"), "bias"),
    (lambda h: h["network"]["layers"][0].update(type="Conv3d"), "not a layer description"),
    (lambda h: h["network"]["layers"][0].update(type="Conv2d"), "bad Conv2d arguments"),
    (lambda h: h["optimizer"].update(step=-3), "optimizer.step"),
    (lambda h: h["history"]["history"].update(loss=["x"]), "history"),
    (lambda h: h.update(rng={"bit_generator": "nope"}), "rng"),
    (lambda h: h.pop("optimizer"), "lacks"),
])
def test_every_header_field_is_checked(edit, message, tmp_path):
    net = make_net([3, 2], "identity", "mse", dtype="float32", optimizer=bp.SGD(momentum=0.5))
    header, arrays = small_header(net)
    edit(header)
    forge(tmp_path / "m.npz", header, arrays)
    with pytest.raises(ValueError, match=message):
        bp.Network.load(tmp_path / "m.npz")


# ---- 8. smaller ones


def test_batch_sizes_and_splits_are_validated(rng):
    net = make_net([4, 3], ["softmax"], "cross_entropy")
    X, y = rng.normal(size=(10, 4)), rng.integers(0, 3, 10)
    for call in (lambda: net.evaluate(X, y, batch_size=-1), lambda: net.predict(X, batch_size=0),
                 lambda: net.fit(X, y, batch_size=0, progress=False)):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            call()
    with pytest.raises(ValueError, match="leaves no training rows"):
        net.fit(X[:1], y[:1], validation_split=0.5, progress=False)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "backprop", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("rows,message", [
    ("1,2,0.7\n3,4,1\n" * 6, "whole numbers"),
    ("1,2,0\n3,4,1\n", "too few"),
    ("1,2,0\n3,4,1000000000\n" * 6, "class 1 never appears"),
])
def test_cli_refuses_bad_csv_labels(rows, message, tmp_path):
    (tmp_path / "d.csv").write_text(rows)
    result = run_cli("train", "--dataset", "d.csv", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_refuses_absurd_threads_and_bad_checkpoints(tmp_path):
    result = run_cli("train", "--threads", "99999999999", cwd=tmp_path)
    assert result.returncode == 2 and "--threads" in result.stderr
    net = make_net([64, 10], ["softmax"], "cross_entropy", dtype="float32")
    header, arrays = small_header(net)
    header["state"]["epoch"] = float("inf")
    forge(tmp_path / "m.npz", header, arrays)
    result = run_cli("evaluate", "--model", "m.npz", "--dataset", "digits", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_the_parallel_input_copy_names_the_first_bad_row(rng):
    """The copy of a large batch is split between threads; the error still names the
    first bad row of the batch, whichever part found one."""
    net = make_net([300, 4], "identity", "mse", dtype="float32")
    x = rng.normal(size=(1000, 300))
    x[900, 7] = np.inf
    x[400, 3] = np.nan
    for n in (1, 2, 7):
        with threads(n):
            with pytest.raises(ValueError, match=r"in row 400\)"):
                net.forward(x)
            order = np.arange(1000)[::-1]
            with pytest.raises(ValueError, match=r"in row 900\)"):
                net.train_step(x, np.zeros((1000, 4)), rows=order)
