"""pytest-benchmark: forward, forward+backward and train_step of each config (float32).

    python -m pytest benchmarks --benchmark-only
"""
import numpy as np
import pytest

from configs import CONFIGS
from networks import Unsupported, backprop_network, batch_for, initial_weights

CONFIG_NAMES = [n for n in CONFIGS if n != "huge"]


def network(name):
    config = CONFIGS[name]
    try:
        net = backprop_network(config, initial_weights(config))
    except Unsupported as e:
        pytest.skip(str(e))
    return net, *batch_for(config)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_train_step(benchmark, name):
    net, x, y = network(name)
    first = net.train_step(x, y)
    benchmark(net.train_step, x, y)
    assert net.train_step(x, y) < first        # a step that does not learn is not timed


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_forward(benchmark, name):
    net, x, _ = network(name)
    out = benchmark(net.forward, x)
    assert out.shape == (len(x), CONFIGS[name].n_outputs)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_forward_backward(benchmark, name):
    net, x, y = network(name)

    def forward_backward():
        net.forward(x)
        return net.backward(y)

    assert np.isfinite(benchmark(forward_backward))
