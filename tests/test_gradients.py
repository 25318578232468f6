"""Every gradient against central finite differences (float64) and the NumPy reference.

The finite-difference checks use bp.gradcheck's error, |a - n| / max(|a|, |n|, 1e-4),
and require 1e-6: with eps = 1e-5 the truncation error (~eps^2 f''') and the rounding
noise (~1e-16 / eps) both stay near 1e-10, so 1e-6 fails only for a wrong gradient.
"""
import numpy as np
import pytest

import backprop as bp
from conftest import (ACTIVATIONS, LOSSES, OUTPUT_FOR_LOSS, central_differences, make_net,
                      probability_rows, relative_error, targets_for)
from reference import MLP

FD_TOLERANCE = 1e-6
# Float64 against the reference: both sides round differently (the core fuses bias and
# activation into the GEMM, takes derivatives from saved outputs and uses p - y), so
# agreement is to a few ulps of the largest terms, hence the tiny absolute floor.
REF = dict(rtol=1e-12, atol=1e-14)


def kink_free_input(net, rows, rng, margin=1e-3):
    """Inputs whose pre-activations all stay `margin` away from 0, where relu and
    leaky_relu have a kink: finite differences straddling it would see two slopes.
    A nudge of eps = 1e-5 moves a pre-activation by far less than 1e-3."""
    ref = MLP.of(net)
    for _ in range(100):
        x = rng.normal(size=(rows, net.n_inputs))
        ref.forward(x)
        if all(np.abs(z).min() > margin for z in ref.z):
            return x
    raise AssertionError("no kink-free input found")


def assert_gradcheck(net, x, y):
    report = bp.gradcheck(net, x, y)
    assert report["max_error"] < FD_TOLERANCE, report
    assert report["checked"] == net.params.size + x.size
    return report


# ---- finite differences, through bp.gradcheck

@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_as_a_hidden_layer(activation, rng):
    net = make_net([4, 5, 3], [activation, "identity"], loss="mse")
    x = kink_free_input(net, 6, rng)
    assert_gradcheck(net, x, rng.normal(size=(6, 3)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_as_the_output_layer(activation, rng):
    net = make_net([3, 4, 5], ["tanh", activation], loss="mse")
    x = kink_free_input(net, 5, rng)
    assert_gradcheck(net, x, rng.normal(size=(5, 5)))


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss(loss, rng):
    net = make_net([4, 6, 3], ["tanh", OUTPUT_FOR_LOSS[loss] or "identity"], loss=loss)
    assert_gradcheck(net, rng.normal(size=(7, 4)), targets_for(loss, 7, 3, rng))


def test_cross_entropy_with_probability_rows(rng):
    net = make_net([4, 6, 3], ["tanh", "softmax"], loss="cross_entropy")
    assert_gradcheck(net, rng.normal(size=(5, 4)), probability_rows(5, 3, rng))


def test_binary_cross_entropy_with_one_output_and_1d_targets(rng):
    net = make_net([3, 4, 1], ["elu", "sigmoid"], loss="binary_cross_entropy")
    assert_gradcheck(net, rng.normal(size=(6, 3)), rng.integers(0, 2, 6).astype(float))


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
def test_whole_networks(depth, bias, loss, rng):
    sizes = [5] + [6, 7, 4][: depth - 1] + [3]
    hidden = ["tanh", "leaky_relu", "gelu"][: depth - 1]
    net = make_net(sizes, hidden + [OUTPUT_FOR_LOSS[loss] or "softplus"], loss=loss, bias=bias)
    assert (net.layers[0].bias is None) == (not bias)
    x = kink_free_input(net, 8, rng)
    assert_gradcheck(net, x, targets_for(loss, 8, 3, rng))


def test_float32_network_is_checked_through_a_float64_twin(rng):
    net = make_net([4, 5, 3], ["sigmoid", "softmax"], "cross_entropy", dtype="float32")
    before = net.params.copy()
    assert_gradcheck(net, rng.normal(size=(6, 4)), rng.integers(0, 3, 6))
    np.testing.assert_array_equal(net.params, before)       # gradcheck leaves net alone


# ---- gradcheck itself, against differences written out here

def test_gradcheck_agrees_with_hand_written_central_differences(rng):
    net = make_net([3, 4, 2], ["sigmoid", "identity"], loss="mse")
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    net.forward(x)
    net.backward(y)
    analytic, analytic_x = net.grads.copy(), net.input_grad

    def loss():
        return net.loss_of(x, y)

    numeric = central_differences(loss, net.params)
    numeric_x = central_differences(loss, x)
    assert relative_error(analytic, numeric) < FD_TOLERANCE
    assert relative_error(analytic_x, numeric_x) < FD_TOLERANCE
    report = bp.gradcheck(net, x, y)
    # Same eps, same formula, same float64 network: gradcheck's errors are these errors.
    assert report["param_error"] == pytest.approx(relative_error(analytic, numeric), rel=0.01, abs=1e-12)
    assert report["input_error"] == pytest.approx(relative_error(analytic_x, numeric_x), rel=0.01, abs=1e-12)


@pytest.mark.parametrize("where", ["param", "input"])
def test_gradcheck_reports_a_wrong_gradient(where, rng, monkeypatch):
    """A 1% error in one gradient value must show up as an error of about 1e-2."""
    net = make_net([3, 4, 2], ["tanh", "identity"], loss="mse")
    if where == "param":
        original = bp.Network.backward

        def skewed(self, *args, **kwargs):
            loss = original(self, *args, **kwargs)
            self.grads[0] *= 1.01
            return loss
        monkeypatch.setattr(bp.Network, "backward", skewed)
    else:
        original = bp.Network.input_grad.fget
        monkeypatch.setattr(bp.Network, "input_grad",
                            property(lambda self: original(self) * [1.01, 1, 1]))
    report = bp.gradcheck(net, rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    assert report[f"{where}_error"] == pytest.approx(0.01 / 1.01, rel=1e-3)


# ---- backward(grad_output=g): the gradient of sum(g * output)

@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grad_output_and_input_grad_against_differences(activation, rng):
    net = make_net([4, 5, 3], ["tanh", activation])
    x, g = kink_free_input(net, 3, rng), rng.normal(size=(3, 3))
    net.forward(x)
    assert net.backward(grad_output=g) is None
    analytic, analytic_x = net.grads.copy(), net.input_grad

    def weighted_output():
        return float((net.forward(x) * g).sum())

    assert relative_error(analytic, central_differences(weighted_output, net.params)) < FD_TOLERANCE
    assert relative_error(analytic_x, central_differences(weighted_output, x)) < FD_TOLERANCE


# ---- the NumPy reference, float64, to rounding

def assert_matches_reference(net, x, y=None, grad_output=None):
    ref = MLP.of(net)
    np.testing.assert_allclose(net.forward(x), ref.forward(x), **REF)
    dW, db, dx = ref.backward(y, net.loss, grad_output)
    if grad_output is None:
        assert net.backward(y) == pytest.approx(ref.loss(y, net.loss), rel=1e-12)
    else:
        net.backward(grad_output=grad_output)
    np.testing.assert_allclose(net.grads, MLP.flat(dW, db), **REF)
    np.testing.assert_allclose(net.input_grad, dx, **REF)
    for layer, w, b in zip(net.layers, dW, db):            # and through the layer views
        np.testing.assert_allclose(layer.weight_grad, w, **REF)
        if b is not None:
            np.testing.assert_allclose(layer.bias_grad, b, **REF)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_numpy_reference(activation, loss, rng):
    out = OUTPUT_FOR_LOSS[loss] or activation
    net = make_net([5, 7, 6, 3], [activation, "tanh", out], loss=loss)
    assert_matches_reference(net, rng.normal(size=(9, 5)), targets_for(loss, 9, 3, rng))


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_numpy_reference_at_every_depth(depth, bias, rng):
    sizes = [6] + [9, 5, 8][: depth - 1] + [4]
    net = make_net(sizes, ["elu", "sigmoid", "relu"][: depth - 1] + ["softmax"],
                   loss="cross_entropy", bias=bias)
    assert_matches_reference(net, rng.normal(size=(10, 6)), probability_rows(10, 4, rng))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grad_output_matches_numpy_reference(activation, rng):
    net = make_net([5, 6, 4], ["gelu", activation])
    assert_matches_reference(net, rng.normal(size=(7, 5)), grad_output=rng.normal(size=(7, 4)))


def past_every_gemm_block(dtype, rng):
    """Widths and a batch that are not multiples of the GEMM's tiles (6 rows, 8 or 16
    columns), an input wider than one k block (256) and a batch taller than one row
    block (96): the fused bias + activation must reach every edge tile."""
    net = make_net([300, 37, 17], ["gelu", "softmax"], loss="cross_entropy", dtype=dtype)
    net.layers[0].bias[...] = rng.normal(size=37)
    net.layers[1].bias[...] = rng.normal(size=17)
    return net, rng.normal(size=(101, 300)), rng.integers(0, 17, 101)


def test_sizes_past_every_gemm_block_match_the_reference(rng):
    assert_matches_reference(*past_every_gemm_block("float64", rng))


def test_sizes_past_every_gemm_block_in_float32(rng):
    """As above in float32 (its own packing and 6 x 16 kernel), with the float32
    tolerance of test_float32_matches_the_reference_to_float32_precision; the sums here
    run over up to 300 terms and measure up to ~2e-5, so 1e-4 keeps a margin of 5."""
    net, x, y = past_every_gemm_block("float32", rng)
    ref = MLP.of(net)
    assert relative_error(net.forward(x), ref.forward(x), floor=1e-3) < 1e-4
    dW, db, dx = ref.backward(y, "cross_entropy")
    net.backward(y)
    assert relative_error(net.grads, MLP.flat(dW, db), floor=1e-3) < 1e-4
    assert relative_error(net.input_grad, dx, floor=1e-3) < 1e-4


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_float32_matches_the_reference_to_float32_precision(activation, loss, rng):
    """The float32 path (float32 kernels, float32 softmax) against the float64 reference
    on the same (float32) parameters.  A float32 rounding is 6e-8 relative; through
    three layers and sums of ~50 terms, with some cancellation, errors measure up to
    ~1e-5 (relative, floored at 1e-3 like gradcheck's); 1e-4 leaves a margin of 10 while
    a wrong float32 kernel is off by O(1)."""
    out = OUTPUT_FOR_LOSS[loss] or activation
    net = make_net([5, 7, 6, 3], [activation, "tanh", out], loss=loss, dtype="float32")
    x, y = rng.normal(size=(9, 5)), targets_for(loss, 9, 3, rng)
    ref = MLP.of(net)
    assert relative_error(net.forward(x), ref.forward(x), floor=1e-3) < 1e-4
    dW, db, dx = ref.backward(y, loss)
    assert net.backward(y) == pytest.approx(ref.loss(y, loss), rel=1e-6)
    assert relative_error(net.grads, MLP.flat(dW, db), floor=1e-3) < 1e-4
    assert relative_error(net.input_grad, dx, floor=1e-3) < 1e-4
