"""The README's API summary, run top to bottom as a new user would paste it, so the
README cannot drift from the library again."""
import pathlib
import re

import numpy as np
import pytest

import backprop as bp

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def api_summary_block():
    """The first ```python block after the heading "## The API"."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## The API\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: no ```python block under ## The API"
    return match.group(1)


def test_the_api_summary_block_runs_top_to_bottom():
    rng = np.random.default_rng(0)
    layers = [bp.Dense(4, 8, activation="relu"), bp.Dense(8, 3, activation="softmax")]
    x = rng.standard_normal((5, 4)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    g = rng.standard_normal((5, 3)).astype(np.float32)
    X = rng.standard_normal((20, 4)).astype(np.float32)
    Y = rng.integers(0, 3, 20)
    idx = np.array([0, 3, 7, 11])
    w = rng.uniform(0.5, 1.5, 5)
    names = {"bp": bp, "np": np, "layers": layers, "x": x, "y": y, "g": g, "X": X, "Y": Y,
             "idx": idx, "w": w}
    exec(compile(api_summary_block(), "README.md (## The API)", "exec"), names)
    # The block's last lines leave the network in eval mode after a train step.
    assert names["net"].training is False
    assert names["dx"].shape == x.shape
    assert np.isfinite(names["loss"])


def test_backward_after_a_step_says_the_weights_changed():
    # The kept activations were computed with the weights step() replaced, so a backward
    # through them would mix two sets of weights (PyTorch refuses this as well: a tensor
    # the graph saved "has been modified by an inplace operation").  The error must say
    # why instead of asking for a forward pass that was made.
    net = bp.Network([bp.Dense(4, 3)], loss="mse", optimizer=bp.SGD(lr=0.1), seed=0)
    x = np.ones((2, 4), dtype=np.float32)
    net.forward(x)
    net.backward(np.zeros((2, 3), dtype=np.float32))
    net.step()
    with pytest.raises(RuntimeError, match="step"):
        net.backward(grad_output=np.ones((2, 3), dtype=np.float32))
    net.forward(x)                       # a new forward with the new weights is valid
    net.backward(grad_output=np.ones((2, 3), dtype=np.float32))
    net.train_step(x, np.zeros((2, 3), dtype=np.float32))    # its own forward, then an update
    with pytest.raises(RuntimeError, match="train_step"):
        net.backward(grad_output=np.ones((2, 3), dtype=np.float32))
