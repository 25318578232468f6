"""Each optimizer against the NumPy reference of its update rule, over 25 steps of a real
network, and its state_dict round trip."""
import numpy as np
import pytest

import backprop as bp
from conftest import OPTIMIZER_CASES, OPTIMIZER_IDS, make_net
from reference import UPDATES

STEPS = 25


def small_classifier(name, kwargs, activation="tanh"):
    return make_net([4, 8, 3], [activation, "softmax"], loss="cross_entropy",
                    optimizer=getattr(bp, name)(**kwargs))


@pytest.mark.parametrize("name,kwargs", OPTIMIZER_CASES, ids=OPTIMIZER_IDS)
def test_optimizer_matches_reference(name, kwargs, rng):
    """The network trains freely (backward, then step); the reference applies its own
    update to its own copy of the parameters, fed the gradients the network computed.
    Both must agree at every step, and the state buffers at the end."""
    net = small_classifier(name, kwargs)
    x, y = rng.normal(size=(16, 4)), rng.integers(0, 3, 16)
    p, state = net.params.copy(), {}
    losses = []
    for t in range(1, STEPS + 1):
        net.forward(x)
        losses.append(net.backward(y))
        g = net.grads.copy()
        net.step()
        net.zero_grad()
        p = UPDATES[name](p, g, state, t, **kwargs)
        # Only the rounding of the two update formulas differs (e.g. PyTorch's folded
        # bias corrections); it stays within a few ulps over 25 steps.
        np.testing.assert_allclose(net.params, p, rtol=1e-12, atol=1e-15)
    assert net.optimizer.steps == STEPS
    for buffer, value in state.items():
        np.testing.assert_allclose(net.optimizer.state[buffer], value, rtol=1e-12, atol=1e-15,
                                   err_msg=buffer)
    assert losses[-1] < losses[0]              # and the updates do descend


@pytest.mark.parametrize("name,kwargs", OPTIMIZER_CASES[::2], ids=OPTIMIZER_IDS[::2])
def test_train_step_equals_the_separate_calls(name, kwargs, rng):
    """train_step is forward + backward + step + zero_grad, bit for bit."""
    x, y = rng.normal(size=(16, 4)), rng.integers(0, 3, 16)
    fused, split = small_classifier(name, kwargs, "relu"), small_classifier(name, kwargs, "relu")
    for _ in range(10):
        loss_fused = fused.train_step(x, y)
        split.forward(x)
        loss_split = split.backward(y)
        split.step()
        split.zero_grad()
        assert loss_fused == loss_split
        np.testing.assert_array_equal(fused.params, split.params)
        assert not fused.grads.any()           # train_step leaves the gradients zeroed


@pytest.mark.parametrize("name,kwargs", OPTIMIZER_CASES, ids=OPTIMIZER_IDS)
def test_state_dict_round_trip_resumes_exactly(name, kwargs, rng):
    """5 steps, save, 5 more; a fresh optimizer (default hyperparameters) loaded from the
    save on a copy of the weights must then take the same 5 steps bit for bit."""
    x, y = rng.normal(size=(16, 4)), rng.integers(0, 3, 16)
    a = small_classifier(name, kwargs)
    for _ in range(5):
        a.train_step(x, y)
    saved_params, saved = a.params.copy(), a.optimizer.state_dict()
    for _ in range(5):
        a.train_step(x, y)
    b = small_classifier(name, {})
    b.params[...] = saved_params
    b.optimizer.load_state_dict(saved)
    assert b.optimizer.hyperparameters() == a.optimizer.hyperparameters()
    assert b.optimizer.steps == 5
    for _ in range(5):
        b.train_step(x, y)
    np.testing.assert_array_equal(a.params, b.params)
    for buffer in a.optimizer.state:
        np.testing.assert_array_equal(a.optimizer.state[buffer], b.optimizer.state[buffer])


def test_state_dict_is_a_copy(rng):
    net = small_classifier("Adam", {})
    net.train_step(rng.normal(size=(4, 4)), rng.integers(0, 3, 4))
    saved = net.optimizer.state_dict()
    saved["state"]["exp_avg"][...] = 123.0
    assert not (net.optimizer.state["exp_avg"] == 123.0).any()


def test_load_state_dict_refuses_another_optimizer_or_shape():
    adam = small_classifier("Adam", {}).optimizer
    with pytest.raises(ValueError, match="state_dict is for 'SGD', not Adam"):
        adam.load_state_dict(small_classifier("SGD", {}).optimizer.state_dict())
    # 4-8-3 has 4*8 + 8 + 8*3 + 3 = 67 parameters; 4-5-3 has 4*5 + 5 + 5*3 + 3 = 43.
    other = make_net([4, 5, 3], ["tanh", "softmax"], "cross_entropy", optimizer=bp.Adam())
    with pytest.raises(ValueError, match=r"must have shape \(67,\).*got array of shape \(43,\)"):
        adam.load_state_dict(other.optimizer.state_dict())


def test_a_refused_state_dict_leaves_the_optimizer_unchanged(rng):
    net = small_classifier("Adam", dict(lr=0.01))
    net.train_step(rng.normal(size=(4, 4)), rng.integers(0, 3, 4))
    other = make_net([4, 5, 3], ["tanh", "softmax"], "cross_entropy",
                     optimizer=bp.Adam(lr=0.5, amsgrad=True))
    with pytest.raises(ValueError):
        net.optimizer.load_state_dict(other.optimizer.state_dict())
    assert net.optimizer.hyperparameters()["lr"] == 0.01
    assert net.optimizer.steps == 1


def test_learning_rate_can_change_between_steps(rng):
    net = make_net([3, 2], "identity", "mse", optimizer=bp.SGD(lr=0.1))
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    net.forward(x)
    net.backward(y)
    g, p = net.grads.copy(), net.params.copy()
    net.optimizer.lr = 0.5
    net.step()
    np.testing.assert_allclose(net.params, p - 0.5 * g, rtol=1e-15)


@pytest.mark.parametrize("make,argument", [
    (lambda: bp.SGD(lr=-1), "lr"),
    (lambda: bp.SGD(momentum=-0.1), "momentum"),
    (lambda: bp.SGD(dampening=-0.1), "dampening"),
    (lambda: bp.SGD(nesterov=True), "nesterov"),
    (lambda: bp.SGD(momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (lambda: bp.Adam(betas=(1.0, 0.9)), r"betas\[0\]"),
    (lambda: bp.Adam(betas=(0.9, -0.1)), r"betas\[1\]"),
    (lambda: bp.Adam(betas=(0.9,)), "betas"),
    (lambda: bp.Adam(eps=-1), "eps"),
    (lambda: bp.Adam(weight_decay=-1), "weight_decay"),
    (lambda: bp.Adam(lr=float("nan")), "lr"),
    (lambda: bp.AdamW(weight_decay=-0.1), "weight_decay"),
    (lambda: bp.RMSprop(alpha=1.5), "alpha"),
    (lambda: bp.RMSprop(momentum=-1), "momentum"),
    (lambda: bp.Adagrad(lr_decay=-1), "lr_decay"),
    (lambda: bp.Adagrad(initial_accumulator_value=-1), "initial_accumulator_value"),
])
def test_invalid_hyperparameters_are_refused_by_name(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()
