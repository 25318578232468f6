"""Every gradient against central finite differences (float64) and the NumPy reference."""
import numpy as np
import pytest

import backprop as bp
from conftest import ACTIVATIONS, make_net, targets_for
from reference import MLP

OUTPUT_FOR_LOSS = {"mse": None, "binary_cross_entropy": "sigmoid", "cross_entropy": "softmax"}


def relu_safe_input(net, rows, rng):
    """Inputs whose pre-activations all stay away from relu's kink at 0, where the
    derivative does not exist and finite differences straddle two slopes."""
    for _ in range(100):
        x = rng.normal(size=(rows, net.n_inputs))
        ref = MLP.of(net)
        ref.forward(x)
        if all(np.abs(z).min() > 1e-3 for z in ref.z):
            return x
    raise AssertionError("no kink-free input found")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_as_hidden_layer(activation, rng):
    net = make_net([4, 5, 3], [activation, "identity"], loss="mse")
    x = relu_safe_input(net, 6, rng)
    report = bp.gradcheck(net, x, rng.normal(size=(6, 3)))
    assert report["max_error"] < 1e-6, report


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_as_output_layer_with_mse(activation, rng):
    net = make_net([3, 4, 5], ["tanh", activation], loss="mse")
    x = relu_safe_input(net, 5, rng)
    report = bp.gradcheck(net, x, rng.normal(size=(5, 5)))
    assert report["max_error"] < 1e-6, report


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "cross_entropy"])
def test_every_loss(loss, rng):
    net = make_net([4, 6, 3], ["tanh", OUTPUT_FOR_LOSS[loss] or "identity"], loss=loss)
    x = rng.normal(size=(7, 4))
    report = bp.gradcheck(net, x, targets_for(loss, 7, 3, rng))
    assert report["max_error"] < 1e-6, report


def test_cross_entropy_with_probability_rows(rng):
    net = make_net([4, 6, 3], ["tanh", "softmax"], loss="cross_entropy")
    p = rng.random((5, 3))
    report = bp.gradcheck(net, rng.normal(size=(5, 4)), p / p.sum(axis=1, keepdims=True))
    assert report["max_error"] < 1e-6, report


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_whole_networks(depth, bias, rng):
    sizes = [5] + [6] * (depth - 1) + [4]
    acts = ["tanh", "gelu", "sigmoid"][: depth - 1] + ["softmax"]
    net = make_net(sizes, acts, loss="cross_entropy", bias=bias)
    report = bp.gradcheck(net, rng.normal(size=(8, 5)), rng.integers(0, 4, 8))
    assert report["max_error"] < 1e-6, report
    assert report["checked"] == net.params.size + 8 * 5


def test_gradcheck_agrees_with_hand_written_differences(rng):
    """gradcheck is itself a test tool, so check it against a plain loop."""
    net = make_net([3, 4, 2], ["sigmoid", "identity"], loss="mse")
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    net.forward(x)
    net.backward(y)
    analytic = net.grads.copy()
    numeric = np.empty_like(analytic)
    eps = 1e-6
    for i in range(net.params.size):
        keep = net.params[i]
        net.params[i] = keep + eps
        up = net.loss_of(x, y)
        net.params[i] = keep - eps
        down = net.loss_of(x, y)
        net.params[i] = keep
        numeric[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
    assert bp.gradcheck(net, x, y)["max_error"] < 1e-6


def test_gradcheck_reports_a_wrong_gradient(rng, monkeypatch):
    net = make_net([3, 4, 2], ["tanh", "identity"], loss="mse")
    original = bp.Network.backward

    def skewed(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        self.grads[0] *= 1.01          # a 1% error in one weight's gradient
        return loss

    monkeypatch.setattr(bp.Network, "backward", skewed)
    report = bp.gradcheck(net, rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    assert report["param_error"] > 1e-3


def test_grad_output_and_input_grad(rng):
    """backward(grad_output=g) differentiates sum(g * out): compare with differences."""
    net = make_net([4, 5, 3], ["tanh", "softmax"])
    x, g = rng.normal(size=(3, 4)), rng.normal(size=(3, 3))
    net.forward(x)
    assert net.backward(grad_output=g) is None
    analytic_x, analytic_p = net.input_grad, net.grads.copy()

    def f():
        return float((net.forward(x) * g).sum())

    eps = 1e-6
    for i in range(net.params.size):
        keep = net.params[i]
        net.params[i] = keep + eps
        up = f()
        net.params[i] = keep - eps
        down = f()
        net.params[i] = keep
        assert abs((up - down) / (2 * eps) - analytic_p[i]) < 1e-7
    for idx in np.ndindex(x.shape):
        keep = x[idx]
        x[idx] = keep + eps
        up = f()
        x[idx] = keep - eps
        down = f()
        x[idx] = keep
        assert abs((up - down) / (2 * eps) - analytic_x[idx]) < 1e-7


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "cross_entropy"])
def test_matches_numpy_reference(activation, loss, rng):
    out = OUTPUT_FOR_LOSS[loss] or activation
    net = make_net([5, 7, 6, 3], [activation, "tanh", out], loss=loss)
    x, y = rng.normal(size=(9, 5)), targets_for(loss, 9, 3, rng)
    ref = MLP.of(net)
    np.testing.assert_allclose(net.forward(x), ref.forward(x), rtol=1e-12, atol=1e-15)
    value, dW, db, dx = ref.backward(y, loss)
    assert net.backward(y) == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(net.grads, ref.flat_grads(dW, db), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(net.input_grad, dx, rtol=1e-10, atol=1e-14)
