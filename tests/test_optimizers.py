"""Each optimizer against the NumPy reference of its update rule, over 25 steps."""
import numpy as np
import pytest

import backprop as bp
from conftest import make_net
from reference import UPDATES

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.001)),
    ("Adam", dict()),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("RMSprop", dict()),
    ("RMSprop", dict(lr=0.001, momentum=0.9, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.001, centered=True, alpha=0.9)),
    ("RMSprop", dict(lr=0.001, centered=True, momentum=0.5)),
    ("Adagrad", dict()),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_optimizer_matches_reference(name, kwargs, rng):
    """The network computes the gradients; the reference applies its own update to its
    own copy of the parameters, fed the same gradients, and both must agree each step."""
    opt = getattr(bp, name)(**kwargs)
    net = make_net([4, 8, 3], ["tanh", "softmax"], loss="cross_entropy", optimizer=opt)
    x, y = rng.normal(size=(16, 4)), rng.integers(0, 3, 16)
    p, state = net.params.copy(), {}
    losses = []
    for t in range(1, 26):
        net.params[...] = p                  # both sides start each step from the reference
        losses.append(net.loss_of(x, y))
        net.forward(x)
        net.backward(y)
        g = net.grads.copy()
        net.step()
        net.zero_grad()
        p = UPDATES[name](p, g, state, t, **kwargs)
        np.testing.assert_allclose(net.params, p, rtol=1e-10, atol=1e-13)
    assert opt.steps == 25
    assert losses[-1] < losses[0]              # and the updates do descend


@pytest.mark.parametrize("name,kwargs", CASES[:: 2])
def test_train_step_equals_the_separate_calls(name, kwargs, rng):
    x, y = rng.normal(size=(16, 4)), rng.integers(0, 3, 16)
    fused = make_net([4, 8, 3], ["relu", "softmax"], "cross_entropy", optimizer=getattr(bp, name)(**kwargs))
    split = make_net([4, 8, 3], ["relu", "softmax"], "cross_entropy", optimizer=getattr(bp, name)(**kwargs))
    for _ in range(10):
        loss_fused = fused.train_step(x, y)
        split.forward(x)
        loss_split = split.backward(y)
        split.step()
        split.zero_grad()
        assert loss_fused == loss_split
    np.testing.assert_array_equal(fused.params, split.params)
    assert not fused.grads.any()               # train_step leaves the gradients zeroed


@pytest.mark.parametrize("name,kwargs", CASES[:: 3])
def test_state_dict_round_trip_resumes_exactly(name, kwargs, rng):
    x, y = rng.normal(size=(16, 4)), rng.integers(0, 3, 16)
    a = make_net([4, 8, 3], ["tanh", "softmax"], "cross_entropy", optimizer=getattr(bp, name)(**kwargs))
    for _ in range(5):
        a.train_step(x, y)
    saved_params, saved_state = a.params.copy(), a.optimizer.state_dict()
    for _ in range(5):
        a.train_step(x, y)
    b = make_net([4, 8, 3], ["tanh", "softmax"], "cross_entropy", optimizer=getattr(bp, name)())
    b.params[...] = saved_params
    b.optimizer.load_state_dict(saved_state)
    assert b.optimizer.hyperparameters() == a.optimizer.hyperparameters()
    for _ in range(5):
        b.train_step(x, y)
    np.testing.assert_array_equal(a.params, b.params)


def test_learning_rate_can_change_between_steps(rng):
    net = make_net([3, 2], "identity", "mse", optimizer=bp.SGD(lr=0.1))
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    net.forward(x)
    net.backward(y)
    g, p = net.grads.copy(), net.params.copy()
    net.optimizer.lr = 0.5
    net.step()
    np.testing.assert_allclose(net.params, p - 0.5 * g, rtol=1e-15)


@pytest.mark.parametrize("make", [
    lambda: bp.SGD(lr=-1), lambda: bp.SGD(momentum=-0.1), lambda: bp.SGD(nesterov=True),
    lambda: bp.Adam(betas=(1.0, 0.9)), lambda: bp.Adam(betas=(0.9, -0.1)), lambda: bp.Adam(eps=-1),
    lambda: bp.Adam(weight_decay=-1), lambda: bp.RMSprop(alpha=1.5), lambda: bp.Adagrad(lr_decay=-1),
    lambda: bp.Adam(lr=float("nan")),
])
def test_invalid_hyperparameters_are_refused(make):
    with pytest.raises(ValueError):
        make()
