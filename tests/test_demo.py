"""The seeds' demonstration: vanishing gradients and their cures, and GradientMonitor."""
import re
import subprocess
import sys

import numpy as np
import pytest

import backprop as bp
from backprop.demos import vanishing_gradients


def test_vanishing_gradients_and_their_cures(tmp_path):
    lines = []
    results = vanishing_gradients(epochs=3, plot=tmp_path / "vg.png", out=lines.append)
    ratio = {name: r["norms"][0] / r["norms"][-1] for name, r in results.items()}
    accuracy = {name: r["accuracy"] for name, r in results.items()}
    assert all(len(r["norms"]) == 20 for r in results.values())
    # What the seeds predict: through 19 sigmoid layers the first layer's error signal is
    # a vanishing fraction of the last's, and the network learns next to nothing (10
    # classes: chance is 0.1); batch norm and skip connections keep the signal and learn.
    assert ratio["sigmoid"] < 1e-6 and accuracy["sigmoid"] < 0.3
    for cure in ("relu + batch norm", "relu + residual"):
        assert 1e-2 < ratio[cure] < 1e2, ratio
        assert accuracy[cure] > 0.5 and accuracy[cure] > accuracy["sigmoid"] + 0.3, accuracy
    assert (tmp_path / "vg.png").stat().st_size > 10_000
    assert any("sigmoid" in line for line in lines)


def test_the_demo_runs_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "backprop", "demo", "vanishing-gradients",
                           "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "relu + residual" in done.stdout and "first/last" in done.stdout


def test_gradient_monitor_names_the_vanishing_layer(rng):
    X, y = rng.normal(size=(64, 8)), rng.integers(0, 3, 64)
    layers = [bp.Dense(8, 16, "sigmoid")] + [bp.Dense(16, 16, "sigmoid") for _ in range(12)]
    net = bp.Network(layers + [bp.Dense(16, 3, "softmax")], loss="cross_entropy",
                     optimizer=bp.SGD(lr=0.01), seed=0)
    monitor = bp.GradientMonitor()
    with pytest.warns(UserWarning) as caught:         # one warning per vanishing layer
        net.fit(X, y, epochs=1, progress=False, callbacks=[monitor])
    assert any(re.search(r"layers\[0\]\.weight \(Dense\(8, 16.*\) is vanishing: its norm .* of the "
                         r"largest", str(w.message)) for w in caught)
    norms = np.array(net.history.grad_norms[-1])
    flagged = {message.split("gradient of ")[1].split(" (")[0] for _, message in monitor.warnings}
    expected = {f"layers[{i}].weight" for i, n in enumerate(norms) if n < 1e-4 * norms.max()}
    assert flagged == expected and expected


def test_gradient_monitor_flags_exploding_gradients(rng):
    net = bp.Network([bp.Dense(4, 4), bp.Dense(4, 1)], loss="mse", optimizer=bp.SGD(lr=1e-9))
    X, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 1)) * 1e6
    with pytest.warns(UserWarning, match="exploding"):
        net.fit(X, y, epochs=1, progress=False, callbacks=[bp.GradientMonitor(exploding=10)])
    with pytest.raises(ValueError):
        bp.GradientMonitor(vanishing=2)


# ---- vanishing gradients in time

@pytest.mark.parametrize("variant", ["tanh RNN", "LSTM", "GRU"])
def test_the_state_gradients_are_backpropagations(variant):
    """The demo's BPTT in NumPy gives dL/dh_t at every step; turned into dL/dx_t by the
    same equations it is the core's input gradient, so it follows the core's backward."""
    from backprop.demos import HIDDEN, RECURRENT_VARIANTS, SYMBOLS, recall_the_first_symbol, \
        state_gradients
    x, y = recall_the_first_symbol(9, 7, seed=3)
    net = bp.Network([RECURRENT_VARIANTS[variant](), bp.LastStep(),
                      bp.Dense(HIDDEN, SYMBOLS, "softmax")], loss="cross_entropy",
                     dtype="float64", seed=1, input_shape=(7, SYMBOLS))
    bias = net.layers[0].bias_hh_l0
    bias[...] = np.random.default_rng(2).normal(0, 0.5, bias.shape)     # away from its init
    grads, dx = state_gradients(net, x, y)
    net.forward(x)
    net.backward(y)
    np.testing.assert_allclose(dx, net.input_grad, rtol=1e-10, atol=1e-15)
    assert grads.shape == (9, 7, HIDDEN) and np.abs(grads[:, 0]).max() > 0
    # The last state's gradient is the classifier's alone: W^T (p - onehot) / batch.
    p = net.predict_proba(x)
    p[np.arange(9), y] -= 1
    np.testing.assert_allclose(grads[:, -1], p @ net.layers[2].weight / 9, rtol=1e-10,
                               atol=1e-15)


def test_vanishing_gradients_in_time(tmp_path):
    from backprop.demos import vanishing_gradients_in_time
    lines = []
    results = vanishing_gradients_in_time(lengths=(3, 12), epochs=1, train=128, test=64,
                                          plot=tmp_path / "vgt.png", out=lines.append)
    assert set(results) == {(name, length) for name in ("tanh RNN", "LSTM", "GRU")
                            for length in (3, 12)}
    for (name, length), result in results.items():
        assert len(result["before"]) == len(result["after"]) == length
        assert 0 <= result["accuracy"] <= 1
    # At PyTorch's initialisation every cell's gradient shrinks step after step on its way
    # back: the longer the sequence, the smaller the first state's share.
    for name in ("tanh RNN", "LSTM", "GRU"):
        short, long = (results[name, n]["before"] for n in (3, 12))
        assert long[0] / long[-1] < short[0] / short[-1] < 1
    assert (tmp_path / "vgt.png").stat().st_size > 10_000
    assert any("first/last" in line for line in lines)


def test_the_demo_in_time_runs_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "backprop", "demo",
                           "vanishing-gradients-in-time", "--epochs", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "GRU        100" in done.stdout and "first/last" in done.stdout


def test_the_state_gradients_refuse_networks_they_do_not_compute():
    from backprop.demos import state_gradients
    for cell in (bp.RNN(2, 3, nonlinearity="relu"), bp.LSTM(2, 3, bidirectional=True),
                 bp.GRU(2, 3, num_layers=2), bp.LSTM(2, 3, bias=False)):
        net = bp.Network([cell, bp.LastStep(), bp.Dense(cell.hidden_size * cell.directions, 2,
                                                        "softmax")],
                         loss="cross_entropy", input_shape=(4, 2))
        with pytest.raises(ValueError, match="state_gradients takes a one-layer"):
            state_gradients(net, np.zeros((1, 4, 2)), np.zeros(1, dtype=int))
