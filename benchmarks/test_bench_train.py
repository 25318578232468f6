"""pytest-benchmark: forward, backward and train_step of each config (float32).

    python -m pytest benchmarks --benchmark-only
"""
import numpy as np
import pytest

import backprop as bp
from configs import CONFIGS

CONFIG_NAMES = [n for n in CONFIGS if n != "huge"]


def network(config):
    layers = [bp.Dense(a, b, config.hidden) for a, b in zip(config.sizes[:-2], config.sizes[1:-1])]
    layers.append(bp.Dense(config.sizes[-2], config.sizes[-1], config.output))
    net = bp.Network(layers, loss=config.loss, optimizer=bp.SGD(lr=config.lr), seed=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(config.batch, config.sizes[0])).astype(np.float32)
    y = (rng.integers(0, config.sizes[-1], config.batch) if config.classifier
         else rng.random((config.batch, config.sizes[-1])).astype(np.float32))
    return net, x, y


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_train_step(benchmark, name):
    net, x, y = network(CONFIGS[name])
    first = net.train_step(x, y)
    benchmark(net.train_step, x, y)
    assert net.train_step(x, y) < first        # a step that does not learn is not timed


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_forward(benchmark, name):
    net, x, _ = network(CONFIGS[name])
    out = benchmark(net.forward, x)
    assert out.shape == (len(x), CONFIGS[name].sizes[-1])


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_forward_backward(benchmark, name):
    net, x, y = network(CONFIGS[name])

    def forward_backward():
        net.forward(x)
        return net.backward(y)

    assert np.isfinite(benchmark(forward_backward))
