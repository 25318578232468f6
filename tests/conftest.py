import numpy as np
import pytest

import backprop as bp

ACTIVATIONS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "softplus",
               "softmax"]


def make_net(sizes, activations, loss=None, dtype="float64", bias=True, seed=0, optimizer=None):
    """A Network with layers sizes[i] -> sizes[i+1] and the given activations."""
    if isinstance(activations, str):
        activations = [activations] * (len(sizes) - 1)
    layers = [bp.Dense(a, b, activation=act, bias=bias)
              for a, b, act in zip(sizes, sizes[1:], activations)]
    return bp.Network(layers, loss=loss, optimizer=optimizer or bp.SGD(lr=0.1), dtype=dtype,
                      seed=seed)


def targets_for(loss, rows, cols, rng):
    if loss == "cross_entropy":
        return rng.integers(0, cols, rows)
    if loss == "binary_cross_entropy":
        return rng.random((rows, cols))
    return rng.normal(size=(rows, cols))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    bp.set_num_threads(0)
