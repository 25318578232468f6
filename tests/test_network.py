"""The Network API: views, accumulation, initialisation, dtypes, threads, XOR."""
import numpy as np
import pytest

import backprop as bp
from conftest import make_net, threads


# ---- the flat buffers and their views

def test_layer_views_alias_the_flat_buffers():
    net = make_net([3, 4, 2], ["relu", "softmax"], "cross_entropy")
    first, second = net.layers
    # layer 0: weight (4, 3) then bias (4,); layer 1: weight (2, 4) then bias (2,)
    assert net.params.size == net.grads.size == 4 * 3 + 4 + 2 * 4 + 2
    assert first.weight.shape == (4, 3) and first.bias.shape == (4,)
    assert second.weight.shape == (2, 4) and second.bias.shape == (2,)
    first.weight[1, 2] = 7.0
    assert net.params[1 * 3 + 2] == 7.0                    # row-major (out, in)
    first.bias[3] = 5.0
    assert net.params[12 + 3] == 5.0
    net.params[16 + 4 * 1 + 0] = -2.0
    assert second.weight[1, 0] == -2.0
    net.grads[-1] = 3.0
    assert second.bias_grad[-1] == 3.0
    for layer in net.layers:
        for view in (layer.weight, layer.bias):
            assert view.base is net.params or np.shares_memory(view, net.params)
        for view in (layer.weight_grad, layer.bias_grad):
            assert np.shares_memory(view, net.grads)


def test_layers_without_bias_have_no_bias_views():
    net = make_net([3, 4, 2], "tanh", "mse", bias=False)
    assert net.params.size == 4 * 3 + 2 * 4
    assert all(layer.bias is None and layer.bias_grad is None for layer in net.layers)


def test_a_forward_pass_uses_weights_written_through_the_views(rng):
    net = make_net([3, 2], "identity")
    net.layers[0].weight[...] = [[1, 2, 3], [4, 5, 6]]
    net.layers[0].bias[...] = [10, 20]
    # [1 1 1] W^T + b = [1+2+3+10, 4+5+6+20] = [16, 35]
    np.testing.assert_array_equal(net.forward([[1.0, 1.0, 1.0]]), [[16.0, 35.0]])


def test_forward_output_is_a_copy(rng):
    net = make_net([3, 2], "identity")
    x = rng.normal(size=(4, 3))
    out = net.forward(x)
    out[...] = 0
    np.testing.assert_allclose(net.forward(x), x @ net.layers[0].weight.T + net.layers[0].bias,
                               rtol=1e-15)


# ---- gradients accumulate; step and train_step

def test_gradients_accumulate_until_zero_grad(rng):
    net = make_net([3, 5, 2], ["tanh", "identity"], "mse")
    x1, y1 = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    x2, g2 = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    net.forward(x1)
    net.backward(y1)
    first = net.grads.copy()
    net.zero_grad()
    assert not net.grads.any()
    net.forward(x2)
    net.backward(grad_output=g2)
    second = net.grads.copy()
    net.zero_grad()
    net.forward(x1)
    net.backward(y1)
    net.forward(x2)
    net.backward(grad_output=g2)                 # the loss and grad_output paths add up
    np.testing.assert_allclose(net.grads, first + second, rtol=1e-14)
    # step() applies the sum: plain SGD moves by -lr (g1 + g2)
    before = net.params.copy()
    net.step()
    np.testing.assert_allclose(net.params, before - 0.1 * (first + second), rtol=1e-14)
    np.testing.assert_allclose(net.grads, first + second, rtol=1e-14)   # step keeps them


def test_train_step_is_forward_backward_step_zero_grad(rng):
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    fused = make_net([3, 5, 2], ["elu", "identity"], "mse", optimizer=bp.Adam(lr=0.01))
    split = make_net([3, 5, 2], ["elu", "identity"], "mse", optimizer=bp.Adam(lr=0.01))
    for _ in range(4):
        loss = fused.train_step(x, y)
        split.forward(x)
        assert split.backward(y) == loss
        split.step()
        split.zero_grad()
        np.testing.assert_array_equal(fused.params, split.params)
        np.testing.assert_array_equal(fused.grads, split.grads)
    assert fused.optimizer.steps == split.optimizer.steps == 4


def test_the_workspace_serves_smaller_batches_after_a_larger_one(rng):
    """Buffers sized for 50 rows are reused for 1 and 3 rows: each batch must give what
    a fresh network gives on it."""
    x, y = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)
    used = make_net([4, 7, 3], ["gelu", "softmax"], "cross_entropy")
    used.forward(x)
    used.backward(y)
    for rows in (3, 1):
        fresh = make_net([4, 7, 3], ["gelu", "softmax"], "cross_entropy")
        used.zero_grad()
        np.testing.assert_array_equal(used.forward(x[:rows]), fresh.forward(x[:rows]))
        assert used.backward(y[:rows]) == fresh.backward(y[:rows])
        np.testing.assert_array_equal(used.grads, fresh.grads)
        np.testing.assert_array_equal(used.input_grad, fresh.input_grad)


def test_train_step_with_rows_equals_train_step_on_the_gathered_batch(rng):
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 4, 50)
    rows = rng.permutation(50)[:16]
    a = make_net([3, 6, 4], ["relu", "softmax"], "cross_entropy")
    b = make_net([3, 6, 4], ["relu", "softmax"], "cross_entropy")
    assert a.train_step(X, y, rows=rows) == b.train_step(X[rows], y[rows])
    np.testing.assert_array_equal(a.params, b.params)


def test_loss_of_does_not_touch_gradients(rng):
    net = make_net([3, 2], "sigmoid", "binary_cross_entropy")
    x, y = rng.normal(size=(4, 3)), rng.random((4, 2))
    net.forward(x)
    expected = net.backward(y)
    grads = net.grads.copy()
    assert net.loss_of(x, y) == expected
    np.testing.assert_array_equal(net.grads, grads)


# ---- initialisation

def test_initialisation_is_seeded():
    def build(seed):
        return bp.Network([bp.Dense(40, 30, "relu"), bp.Dense(30, 20, "tanh")], seed=seed)
    assert np.array_equal(build(7).params, build(7).params)
    assert not np.array_equal(build(7).params, build(8).params)
    assert not np.array_equal(build(None).params, build(None).params)
    # float32 networks start from the same draws, rounded
    wide = bp.Network([bp.Dense(40, 30, "relu"), bp.Dense(30, 20, "tanh")], seed=7,
                      dtype="float64")
    np.testing.assert_array_equal(build(7).params, wide.params.astype(np.float32))


@pytest.mark.parametrize("activation,init", [
    ("relu", "he"), ("leaky_relu", "he"), ("elu", "he"), ("gelu", "he"),
    ("identity", "xavier"), ("sigmoid", "xavier"), ("tanh", "xavier"), ("softplus", "xavier"),
    ("softmax", "xavier")])
def test_default_initialisation_by_activation(activation, init):
    assert bp.Dense(3, 4, activation).init == init


@pytest.mark.parametrize("init", ["he", "xavier", "zeros"])
def test_initialisation_statistics(init):
    """400 -> 300: He draws N(0, 2/400), std 0.0707; Glorot draws U(-l, l) with
    l = sqrt(6/700), whose std is l / sqrt(3) = sqrt(2/700) = 0.0535.  With N = 120000
    draws the sample std is within 1/sqrt(2N) ~ 0.2% of the truth (one sigma) and the
    mean within std/sqrt(N) ~ 0.003 std: 2% and 2% of a std are over 9 sigma."""
    net = bp.Network([bp.Dense(400, 300, "tanh", init=init)], dtype="float64", seed=3)
    w = net.layers[0].weight
    assert not net.layers[0].bias.any()                     # biases start at zero
    if init == "zeros":
        assert not w.any()
        return
    std = np.sqrt(2 / 400) if init == "he" else np.sqrt(2 / 700)
    assert w.std() == pytest.approx(std, rel=0.02)
    assert abs(w.mean()) < 0.02 * std
    if init == "xavier":
        limit = np.sqrt(6 / 700)
        assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
    else:
        # a normal's fourth moment is 3 std^4; a uniform's 1.8 std^4
        assert np.mean(w ** 4) / w.var() ** 2 == pytest.approx(3.0, rel=0.05)


# ---- learning

@pytest.mark.parametrize("optimizer,loss", [(lambda: bp.SGD(lr=2.0, momentum=0.9), "mse"),
                                            (lambda: bp.Adam(lr=0.05), "binary_cross_entropy")])
def test_xor_is_learned(optimizer, loss):
    X, y = bp.datasets.xor()
    net = bp.Network([bp.Dense(2, 4, "sigmoid"), bp.Dense(4, 1, "sigmoid")], loss=loss,
                     optimizer=optimizer(), dtype="float64", seed=0)
    for _ in range(1000):
        net.train_step(X, y)
    assert net.loss_of(X, y) < 0.01
    np.testing.assert_array_equal(net.forward(X).round(), y)


# ---- dtypes and threads

def test_float32_agrees_with_float64(rng):
    x, y = rng.normal(size=(32, 20)), rng.integers(0, 5, 32)
    nets = {dt: make_net([20, 16, 16, 5], ["relu", "tanh", "softmax"], "cross_entropy",
                         dtype=dt, optimizer=bp.Adam(lr=1e-2)) for dt in ("float32", "float64")}
    nets["float64"].params[...] = nets["float32"].params   # the same start, exactly
    for _ in range(5):
        l32, l64 = (nets[dt].train_step(x, y) for dt in ("float32", "float64"))
        # the loss is a sum of ~32*5 terms of size ~1, each off by ~1e-7 relative
        assert l32 == pytest.approx(l64, rel=1e-5)
    # Adam moves each weight by at most ~lr = 1e-2 a step, whatever the gradient's
    # scale, so 5 steps move it by <= 0.05; float32 rounding of the weights (~1e-7)
    # and of the gradient's direction leave the two runs within 1e-4 of each other.
    np.testing.assert_allclose(nets["float32"].params, nets["float64"].params, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_and_two_threads_give_identical_weights(dtype, rng):
    """784-512-512-10 on a batch of 256: every GEMM is far above the threading
    threshold and the 670k parameters above the optimizer's, so both run split."""
    x = rng.normal(size=(256, 784)).astype(dtype)
    y = rng.integers(0, 10, 256)
    results = []
    for count in (1, 2):
        with threads(count):
            net = make_net([784, 512, 512, 10], ["relu", "relu", "softmax"], "cross_entropy",
                           dtype=dtype, optimizer=bp.Adam(lr=1e-3))
            losses = [net.train_step(x, y) for _ in range(2)]
            out = net.forward(x[:64])
            net.backward(y[:64])
            results.append((losses, net.params.copy(), out, net.grads.copy(), net.input_grad))
    (losses1, *arrays1), (losses2, *arrays2) = results
    assert losses1 == losses2 and losses1[1] < losses1[0]
    for one, two in zip(arrays1, arrays2):
        np.testing.assert_array_equal(one, two)


def test_thread_settings():
    assert bp.openmp_enabled()
    bp.set_num_threads(1)
    assert bp.get_num_threads() == 1
    bp.set_num_threads(0)
    assert bp.get_num_threads() >= 1
    with pytest.raises(ValueError, match=r"n must be in \[0, 1024\]"):
        bp.set_num_threads(-1)


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
    # float32 input is widened exactly, so only its own rounding (~6e-8) shows
    np.testing.assert_allclose(net.forward(strided.astype(np.float32)), expected, rtol=1e-6)


def test_backward_can_skip_the_input_gradient(rng):
    x, y = rng.normal(size=(5, 4)), rng.integers(0, 3, 5)
    with_dx, without = (make_net([4, 6, 3], ["tanh", "softmax"], "cross_entropy") for _ in range(2))
    for net, wanted in ((with_dx, True), (without, False)):
        net.forward(x)
        net.backward(y, input_grad=wanted)
    np.testing.assert_array_equal(without.grads, with_dx.grads)
    assert with_dx.input_grad.shape == (5, 4)
    with pytest.raises(RuntimeError, match="no input gradient"):
        without.input_grad
