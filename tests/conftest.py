"""Shared helpers: small networks, targets for each loss, central differences, threads."""
import contextlib

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import backprop as bp

ACTIVATIONS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "softplus",
               "softmax"]
LOSSES = ["mse", "binary_cross_entropy", "cross_entropy"]
# The output activation each loss needs; mse takes any (None: the test picks one).
OUTPUT_FOR_LOSS = {"mse": None, "binary_cross_entropy": "sigmoid", "cross_entropy": "softmax"}

# Optimizer settings covering every option of every rule, used by the NumPy-reference and
# the PyTorch comparisons alike.  Every setting is accepted by torch.optim as written.
OPTIMIZER_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, weight_decay=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.001)),
    ("Adam", dict()),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)),
    ("Adam", dict(lr=0.01, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.02)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, betas=(0.85, 0.95))),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("RMSprop", dict()),
    ("RMSprop", dict(lr=0.001, alpha=0.9, eps=1e-6)),
    ("RMSprop", dict(lr=0.001, momentum=0.9, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.001, centered=True)),
    ("RMSprop", dict(lr=0.001, centered=True, momentum=0.5, weight_decay=0.01)),
    ("Adagrad", dict()),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01)),
    ("Adagrad", dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-6)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
]
OPTIMIZER_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(OPTIMIZER_CASES)]


def make_net(sizes, activations, loss=None, dtype="float64", bias=True, seed=0, optimizer=None):
    """A Network with layers sizes[i] -> sizes[i+1] and the given activations."""
    if isinstance(activations, str):
        activations = [activations] * (len(sizes) - 1)
    layers = [bp.Dense(a, b, activation=act, bias=bias)
              for a, b, act in zip(sizes, sizes[1:], activations)]
    return bp.Network(layers, loss=loss, optimizer=optimizer or bp.SGD(lr=0.1), dtype=dtype,
                      seed=seed)


def snapshot(net):
    """Everything a refused call must leave as it was."""
    return ([net.params.copy(), net.grads.copy(), net.buffers.copy(), net._engine.passes,
             net.optimizer.steps] + [v.copy() for v in net.optimizer.state.values()])


def assert_unchanged(net, before):
    for a, b in zip(before, snapshot(net)):
        np.testing.assert_array_equal(a, b)


def targets_for(loss, rows, cols, rng):
    """Random targets of the right kind: class labels, probabilities, or reals."""
    if loss == "cross_entropy":
        return rng.integers(0, cols, rows)
    if loss == "binary_cross_entropy":
        return rng.random((rows, cols))
    return rng.normal(size=(rows, cols))


def probability_rows(rows, cols, rng):
    p = rng.random((rows, cols))
    return p / p.sum(axis=1, keepdims=True)


def central_differences(f, values, eps=1e-5):
    """(f(v + eps e_i) - f(v - eps e_i)) / 2eps for every entry i of the array `values`,
    which is nudged in place and restored; f reads it."""
    numeric = np.empty(values.shape)
    for i in np.ndindex(values.shape):
        saved = values[i]
        values[i] = saved + eps
        up = f()
        values[i] = saved - eps
        down = f()
        values[i] = saved
        numeric[i] = (up - down) / (2 * eps)
    return numeric


def relative_error(analytic, numeric, floor=1e-4):
    """The worst |a - n| / max(|a|, |n|, floor), the error bp.gradcheck reports."""
    scale = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)
    return float(np.max(np.abs(analytic - numeric) / scale))


@contextlib.contextmanager
def threads(n):
    """Run the kernels on exactly n threads, even on a machine with fewer cores or with
    OMP_NUM_THREADS=1: OpenMP's limit is raised with threadpoolctl, then backprop's set."""
    with threadpool_limits(limits=n, user_api="openmp"):
        bp.set_num_threads(n)
        try:
            assert bp.get_num_threads() == n
            yield
        finally:
            bp.set_num_threads(0)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def torch_on_one_thread():
    """PyTorch on one thread for a module's references (restored after it): its OpenMP
    runtime and backprop's would otherwise spin against each other on a small machine,
    slowing both tenfold or more on tiny tensors; the values do not depend on it."""
    try:
        import torch
    except ImportError:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    bp.set_num_threads(0)
