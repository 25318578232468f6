"""Row weights (sample_weight) and the weights' L2 penalty (l2) of the built-in losses.

The references are derived, not recorded:
- an integer weight w_i means row i counted w_i times, so a weighted batch must give the
  loss and gradients of the unweighted batch with row i repeated w_i times (weight 0:
  the row left out), and any weights are a weighted mean, so scaling them changes nothing;
- l2 adds exactly l2/2 * sum(W^2) over the Dense weights to the loss and l2 * W to their
  gradients (biases and the normalisations' parameters untouched), checked against the
  plain loss, against central differences of the penalised loss, and through `scale`.
"""
import numpy as np
import pytest

import backprop as bp
from conftest import LOSSES, OUTPUT_FOR_LOSS, central_differences, targets_for, threads


def network(loss, n_in=5, hidden=7, n_out=3, batch_norm=False, seed=0):
    layers = [bp.Dense(n_in, hidden, "tanh")]
    if batch_norm:
        layers += [bp.BatchNorm(hidden)]
    layers += [bp.Dense(hidden, n_out, OUTPUT_FOR_LOSS[loss] or "identity")]
    net = bp.Network(layers, loss=loss, optimizer=bp.SGD(lr=0.1), dtype="float64", seed=seed)
    rng = np.random.default_rng(seed + 1)
    net.params[...] = rng.normal(scale=0.5, size=net.params.shape)
    return net


def gradients(net, x, y, **options):
    net.zero_grad()
    loss = net.compute_gradients(x, y, **options)
    grads = net.grads.copy()
    net.zero_grad()
    return loss, grads


@pytest.mark.parametrize("loss", LOSSES)
def test_integer_weights_repeat_rows(loss, rng):
    net = network(loss)
    x, y = rng.normal(size=(6, 5)), targets_for(loss, 6, 3, rng)
    w = np.array([2, 0, 1, 3, 1, 0])
    weighted = gradients(net, x, y, sample_weight=w.astype(float))
    repeated = gradients(net, np.repeat(x, w, axis=0), np.repeat(y, w, axis=0))
    assert weighted[0] == pytest.approx(repeated[0], rel=1e-13)
    np.testing.assert_allclose(weighted[1], repeated[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", LOSSES)
def test_weights_are_a_weighted_mean(loss, rng):
    net = network(loss)
    x, y = rng.normal(size=(5, 5)), targets_for(loss, 5, 3, rng)
    w = rng.random(5)
    a, b = gradients(net, x, y, sample_weight=w), gradients(net, x, y, sample_weight=7.5 * w)
    assert a[0] == pytest.approx(b[0], rel=1e-13)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12, atol=1e-15)
    # and all-equal weights are no weights at all
    c, d = gradients(net, x, y, sample_weight=np.full(5, 0.3)), gradients(net, x, y)
    assert c[0] == pytest.approx(d[0], rel=1e-13)
    np.testing.assert_allclose(c[1], d[1], rtol=1e-12, atol=1e-15)


def test_weights_follow_the_rows_they_belong_to(rng):
    net = network("cross_entropy")
    x, y, w = rng.normal(size=(9, 5)), rng.integers(0, 3, 9), rng.random(9)
    rows = np.array([4, 0, 7, 7, 2])
    picked = gradients(net, x, y, rows=rows, sample_weight=w)
    gathered = gradients(net, x[rows], y[rows], sample_weight=w[rows])
    assert picked[0] == gathered[0]
    np.testing.assert_array_equal(picked[1], gathered[1])


def test_train_step_uses_the_weights(rng):
    x, y, w = rng.normal(size=(6, 5)), rng.normal(size=(6, 3)), np.array([1., 0, 2, 1, 0, 1])
    a, b = network("mse"), network("mse")
    a.train_step(x, y, sample_weight=w)
    keep = np.repeat(np.arange(6), w.astype(int))
    b.train_step(x[keep], y[keep])
    np.testing.assert_allclose(a.params, b.params, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", LOSSES)
def test_l2_adds_half_the_squared_weights_and_their_gradient(loss, rng):
    net = network(loss, batch_norm=True)
    x, y = rng.normal(size=(6, 5)), targets_for(loss, 6, 3, rng)
    plain, penalised = gradients(net, x, y), gradients(net, x, y, l2=0.3)
    dense = [layer for layer in net.layers if isinstance(layer, bp.Dense)]
    assert penalised[0] - plain[0] == pytest.approx(
        0.15 * sum(float((layer.weight ** 2).sum()) for layer in dense), rel=1e-12)
    expected = plain[1].copy()
    net.grads[...] = expected
    for layer in dense:                 # l2 * W on the weights, nothing on the rest
        layer.weight_grad[...] += 0.3 * layer.weight
    np.testing.assert_allclose(penalised[1], net.grads, rtol=1e-12, atol=1e-15)
    net.zero_grad()


@pytest.mark.parametrize("loss", LOSSES)
def test_penalised_weighted_gradients_match_central_differences(loss, rng):
    net = network(loss, batch_norm=True)
    x, y, w = rng.normal(size=(6, 5)), targets_for(loss, 6, 3, rng), rng.random(6)
    options = dict(sample_weight=w, l2=0.2)
    analytic = gradients(net, x, y, **options)[1]

    def objective():
        value = net.compute_gradients(x, y, **options)
        net.zero_grad()
        return value
    numeric = central_differences(objective, net.params)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_scale_scales_the_penalty_gradient_too(rng):
    net = network("mse")
    x, y = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    full = gradients(net, x, y, l2=0.5)
    half = gradients(net, x, y, l2=0.5, scale=0.5)
    assert half[0] == full[0]               # the loss itself is never scaled
    np.testing.assert_allclose(half[1], 0.5 * full[1], rtol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_penalty_is_the_same_for_any_thread_count(dtype, rng):
    # 300 x 200 = 60,000 weights: above the size where the penalty is summed in parallel
    net = bp.Network([bp.Dense(300, 200, "relu"), bp.Dense(200, 4)], loss="mse", dtype=dtype,
                     seed=0)
    x, y = rng.normal(size=(8, 300)), rng.normal(size=(8, 4))
    results = []
    for n in (1, 2, 7, 64):
        with threads(n):
            results.append(gradients(net, x, y, l2=0.01))
    for loss, grads in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grads, results[0][1])


@pytest.mark.parametrize("bad, message", [
    (np.array([1.0, 2.0, 3.0]), "one weight per row"),
    (np.array([1.0, -1.0, 1.0, 1.0]), "finite and >= 0"),
    (np.array([1.0, np.nan, 1.0, 1.0]), "finite and >= 0"),
    (np.array([1.0, np.inf, 1.0, 1.0]), "finite and >= 0"),
    (np.zeros(4), "all 0"),
    (np.ones((4, 1)), "1-dimensional"),
    (np.array(["a", "b", "c", "d"]), "sample_weight"),
])
def test_bad_weights_are_refused_and_change_nothing(bad, message, rng):
    net = network("mse")
    x, y = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    before = (net.params.copy(), net.grads.copy(), net.optimizer.steps)
    for call in (net.train_step, net.compute_gradients):
        with pytest.raises((ValueError, TypeError), match=message):
            call(x, y, sample_weight=bad)
    np.testing.assert_array_equal(net.params, before[0])
    np.testing.assert_array_equal(net.grads, before[1])
    assert net.optimizer.steps == before[2]


@pytest.mark.parametrize("bad", [-0.1, np.nan, np.inf])
def test_bad_l2_is_refused_and_changes_nothing(bad, rng):
    net = network("mse")
    x, y = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    before = net.params.copy()
    for call in (net.train_step, net.compute_gradients):
        with pytest.raises(ValueError, match="l2 must be"):
            call(x, y, l2=bad)
    np.testing.assert_array_equal(net.params, before)


def test_a_later_unweighted_backward_is_unweighted(rng):
    net = network("mse")
    x, y = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    net.compute_gradients(x, y, sample_weight=np.array([1.0, 0.0, 0.0, 0.0]))
    net.zero_grad()
    assert net.backward(y) == pytest.approx(float(((net.forward(x) - y) ** 2).mean()), rel=1e-12)
