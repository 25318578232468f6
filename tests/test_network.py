"""The Network API: views, accumulation, dtypes, threads, XOR."""
import numpy as np
import pytest

import backprop as bp
from conftest import make_net


def test_layer_views_alias_the_flat_buffers():
    net = make_net([3, 4, 2], ["relu", "softmax"], "cross_entropy")
    first, second = net.layers
    assert net.params.size == 4 * 3 + 4 + 2 * 4 + 2
    assert first.weight.shape == (4, 3) and second.bias.shape == (2,)
    first.weight[1, 2] = 7.0
    assert net.params[1 * 3 + 2] == 7.0
    net.grads[-1] = 3.0
    assert second.bias_grad[-1] == 3.0
    for layer in net.layers:
        for view in (layer.weight, layer.bias, layer.weight_grad, layer.bias_grad):
            assert np.shares_memory(view, net.params) or np.shares_memory(view, net.grads)


def test_gradients_accumulate_until_zero_grad(rng):
    net = make_net([3, 5, 2], ["tanh", "identity"], "mse")
    x1, y1 = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    x2, y2 = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    net.forward(x1)
    net.backward(y1)
    g1 = net.grads.copy()
    net.zero_grad()
    net.forward(x2)
    net.backward(y2)
    g2 = net.grads.copy()
    net.zero_grad()
    assert not net.grads.any()
    net.forward(x1)
    net.backward(y1)
    net.forward(x2)
    net.backward(y2)
    np.testing.assert_allclose(net.grads, g1 + g2, rtol=1e-14)


def test_train_step_with_rows_equals_train_step_on_the_gathered_batch(rng):
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 4, 50)
    rows = rng.permutation(50)[:16]
    a = make_net([3, 6, 4], ["relu", "softmax"], "cross_entropy")
    b = make_net([3, 6, 4], ["relu", "softmax"], "cross_entropy")
    assert a.train_step(X, y, rows=rows) == b.train_step(X[rows], y[rows])
    np.testing.assert_array_equal(a.params, b.params)


def test_initialisation_is_seeded_and_scaled():
    a = bp.Network([bp.Dense(400, 300, "relu"), bp.Dense(300, 200, "tanh")], seed=7)
    b = bp.Network([bp.Dense(400, 300, "relu"), bp.Dense(300, 200, "tanh")], seed=7)
    c = bp.Network([bp.Dense(400, 300, "relu"), bp.Dense(300, 200, "tanh")], seed=8)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)
    he, xavier = a.layers[0].weight, a.layers[1].weight
    # He: normal with std sqrt(2/400) ~ 0.0707; Glorot uniform on +-sqrt(6/500) has std sqrt(2/500)
    assert he.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    assert xavier.std() == pytest.approx(np.sqrt(2 / 500), rel=0.02)
    assert np.abs(xavier).max() <= np.sqrt(6 / 500)
    assert not a.layers[0].bias.any()


def test_xor_is_learned():
    X, y = bp.datasets.xor()
    net = bp.Network([bp.Dense(2, 4, "sigmoid"), bp.Dense(4, 1, "sigmoid")], loss="mse",
                     optimizer=bp.SGD(lr=2.0, momentum=0.9), dtype="float64", seed=0)
    for _ in range(2000):
        loss = net.train_step(X, y)
    assert loss < 0.01
    np.testing.assert_array_equal(net.forward(X).round(), y)


def test_float32_agrees_with_float64(rng):
    x, y = rng.normal(size=(32, 20)), rng.integers(0, 5, 32)
    nets = {dt: make_net([20, 16, 16, 5], ["relu", "tanh", "softmax"], "cross_entropy",
                         dtype=dt, optimizer=bp.Adam(lr=1e-2)) for dt in ("float32", "float64")}
    nets["float32"].params[...] = nets["float64"].params   # same start, rounded to float32
    nets["float64"].params[...] = nets["float32"].params
    for _ in range(5):
        l32, l64 = (nets[dt].train_step(x, y) for dt in ("float32", "float64"))
        assert l32 == pytest.approx(l64, rel=1e-5)
    # float32 carries ~7 digits; 5 Adam steps of size ~1e-2 leave differences far below 1e-4
    np.testing.assert_allclose(nets["float32"].params, nets["float64"].params, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_and_two_threads_give_identical_weights(dtype, rng):
    x = rng.normal(size=(256, 300)).astype(dtype)
    y = rng.integers(0, 10, 256)
    results = []
    for threads in (1, 2):
        bp.set_num_threads(threads)
        net = make_net([300, 256, 128, 10], ["relu", "relu", "softmax"], "cross_entropy",
                       dtype=dtype, optimizer=bp.Adam(lr=1e-3))
        for _ in range(3):
            net.train_step(x, y)
        results.append(net.params.copy())
    np.testing.assert_array_equal(results[0], results[1])


def test_thread_settings():
    assert bp.openmp_enabled()
    bp.set_num_threads(1)
    assert bp.get_num_threads() == 1
    bp.set_num_threads(0)
    assert bp.get_num_threads() >= 1
    with pytest.raises(ValueError, match="n must be >= 0"):
        bp.set_num_threads(-1)


def test_forward_output_is_a_copy(rng):
    net = make_net([3, 2], "identity")
    x = rng.normal(size=(4, 3))
    out = net.forward(x)
    out[...] = 0
    np.testing.assert_allclose(net.forward(x), x @ net.layers[0].weight.T + net.layers[0].bias)


def test_input_may_be_strided_read_only_or_float32(rng):
    net = make_net([3, 4], "tanh")
    base = rng.normal(size=(8, 6))
    strided = base[::2, ::2]
    frozen = np.array(strided)
    frozen.flags.writeable = False
    expected = net.forward(np.ascontiguousarray(strided))
    np.testing.assert_array_equal(net.forward(strided), expected)
    np.testing.assert_array_equal(net.forward(frozen), expected)
    np.testing.assert_array_equal(net.forward(np.asfortranarray(strided)), expected)
    np.testing.assert_allclose(net.forward(strided.astype(np.float32)), expected, rtol=1e-6)
