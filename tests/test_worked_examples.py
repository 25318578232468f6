"""The worked examples of the seed texts, reproduced number for number."""
import numpy as np
import pytest

import backprop as bp


def seed_004_network():
    """2-2-1 sigmoid network without biases (seed 004).  Its w_ij joins input i to hidden
    j, so hidden neuron j's weight row is (w_1j, w_2j): layer.weight[j, i] = w_ij."""
    net = bp.Network([bp.Dense(2, 2, "sigmoid", bias=False), bp.Dense(2, 1, "sigmoid", bias=False)],
                     loss="mse", optimizer=bp.SGD(lr=0.25), dtype="float64")
    w11, w21, w12, w22 = 0.4, 0.2, 0.3, 0.5
    net.layers[0].weight[...] = [[w11, w21], [w12, w22]]
    net.layers[1].weight[...] = [[0.6, 0.4]]
    return net


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_seed_004_forward_and_backward():
    net = seed_004_network()
    x, y = np.array([[0.5, 0.3]]), np.array([[1.0]])
    y_hat = net.forward(x)[0, 0]
    hidden = bp.Network([bp.Dense(2, 2, "sigmoid", bias=False)], dtype="float64")
    hidden.layers[0].weight[...] = net.layers[0].weight
    h1, h2 = hidden.forward(x)[0]
    # a1 = 0.4*0.5 + 0.2*0.3 = 0.26, a2 = 0.3*0.5 + 0.5*0.3 = 0.30, b = 0.6 h1 + 0.4 h2
    assert h1 == pytest.approx(sigmoid(0.26), abs=1e-15) and round(h1, 3) == 0.565
    assert h2 == pytest.approx(sigmoid(0.30), abs=1e-15) and round(h2, 3) == 0.574
    assert y_hat == pytest.approx(sigmoid(0.6 * h1 + 0.4 * h2), abs=1e-15)
    assert round(y_hat, 3) == 0.638
    # The text's E = 1/2 (y - y_hat)^2 ~ 0.065; backprop's mse for one output is (y - y_hat)^2 = 2E.
    E = 0.5 * (1 - y_hat) ** 2
    assert round(E, 3) == 0.065
    assert net.backward(y) == pytest.approx(2 * E, rel=1e-14)

    # delta_out = (y - y_hat) y_hat (1 - y_hat) ~ 0.083; dE/dv_j = -delta_out h_j and the
    # mse gradient is twice that.
    delta_out = (1 - y_hat) * y_hat * (1 - y_hat)
    assert round(delta_out, 3) == 0.083
    np.testing.assert_allclose(net.layers[1].weight_grad, [[-2 * delta_out * h1, -2 * delta_out * h2]],
                               rtol=1e-13)
    # delta_j = delta_out v_j h_j (1 - h_j): ~0.012 and ~0.008; dE/dw_ij = -delta_j x_i
    d1 = delta_out * 0.6 * h1 * (1 - h1)
    d2 = delta_out * 0.4 * h2 * (1 - h2)
    assert round(d1, 3) == 0.012 and round(d2, 3) == 0.008
    np.testing.assert_allclose(net.layers[0].weight_grad,
                               [[-2 * d1 * 0.5, -2 * d1 * 0.3], [-2 * d2 * 0.5, -2 * d2 * 0.3]],
                               rtol=1e-13)

    # One SGD step with lr 0.25 on 2E is the text's step with eta 0.5 on E:
    # delta_v ~ 0.024 for both output weights, delta_w11 = 0.5 * d1 * 0.5 ~ 0.003.
    before = net.params.copy()
    net.step()
    change = net.params - before
    v_change = change[4:]
    assert np.round(v_change, 3).tolist() == [0.024, 0.024]
    np.testing.assert_allclose(v_change, [0.5 * delta_out * h1, 0.5 * delta_out * h2], rtol=1e-13)
    assert round(change[0], 3) == 0.003
    assert change[0] == pytest.approx(0.5 * d1 * 0.5, rel=1e-13)
    assert d1 > d2   # the stronger connection gets more of the blame


def test_seed_003_single_relu_neuron():
    """x = 2, w = 0.5, b = 0, ReLU, y = 0, L = (a - y)^2: z = 1, a = 1, L = 1, and
    dL/dw = 2 (a - y) * relu'(z) * x = 2 * 1 * 2 = 4."""
    net = bp.Network([bp.Dense(1, 1, "relu")], loss="mse", optimizer=bp.SGD(lr=0.1),
                     dtype="float64")
    net.layers[0].weight[...] = 0.5
    net.layers[0].bias[...] = 0.0
    assert net.forward([[2.0]])[0, 0] == 1.0
    assert net.backward([[0.0]]) == 1.0
    assert net.layers[0].weight_grad[0, 0] == 4.0
    assert net.layers[0].bias_grad[0] == 2.0      # dz/db = 1
    # with y = 1 the loss and every gradient vanish
    net.zero_grad()
    net.forward([[2.0]])
    assert net.backward([[1.0]]) == 0.0
    assert net.layers[0].weight_grad[0, 0] == 0.0
