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
