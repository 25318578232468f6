"""The worked examples of the seed texts, reproduced number for number: each value is
asserted to the 3 decimals the text prints AND, at full precision, against the text's
formula evaluated here in float64."""
import numpy as np
import pytest

import backprop as bp


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# ---- seed 004: a 2-2-1 sigmoid network without biases

X1, X2 = 0.5, 0.3
W11, W21, W12, W22 = 0.4, 0.2, 0.3, 0.5      # w_ij joins input i to hidden neuron j
V1, V2 = 0.6, 0.4
Y = 1.0
ETA = 0.5


def seed_004_network():
    """The text's network.  backprop stores a layer's weights as weight[out, in], like
    torch.nn.Linear, so hidden neuron j's row is (w_1j, w_2j): weight[j-1, i-1] = w_ij.
    The text minimises E = 1/2 (y - y_hat)^2 with step eta; backprop's mse for one output
    is (y - y_hat)^2 = 2E, whose gradient is twice E's, so SGD's lr is eta / 2 = 0.25."""
    net = bp.Network([bp.Dense(2, 2, "sigmoid", bias=False), bp.Dense(2, 1, "sigmoid", bias=False)],
                     loss="mse", optimizer=bp.SGD(lr=ETA / 2), dtype="float64")
    net.layers[0].weight[...] = [[W11, W21], [W12, W22]]
    net.layers[1].weight[...] = [[V1, V2]]
    return net


def test_seed_004_forward_pass():
    net = seed_004_network()
    y_hat = net.forward([[X1, X2]])[0, 0]
    # The hidden layer alone (the same weights, as a one-layer network):
    hidden = bp.Network([bp.Dense(2, 2, "sigmoid", bias=False)], dtype="float64")
    hidden.layers[0].weight[...] = net.layers[0].weight
    h1, h2 = hidden.forward([[X1, X2]])[0]
    # a_1 = 0.4*0.5 + 0.2*0.3 = 0.26 -> h_1 = s(0.26) ~ 0.565;
    # a_2 = 0.3*0.5 + 0.5*0.3 = 0.30 -> h_2 = s(0.30) ~ 0.574.
    assert round(h1, 3) == 0.565 and h1 == pytest.approx(sigmoid(W11 * X1 + W21 * X2), rel=1e-15)
    assert round(h2, 3) == 0.574 and h2 == pytest.approx(sigmoid(W12 * X1 + W22 * X2), rel=1e-15)
    # b = 0.6 h_1 + 0.4 h_2 ~ 0.569 -> y_hat = s(b) ~ 0.638.
    b = V1 * h1 + V2 * h2
    assert round(b, 3) == 0.569
    assert round(y_hat, 3) == 0.638 and y_hat == pytest.approx(sigmoid(b), rel=1e-15)
    # E = 1/2 (1 - 0.638)^2 ~ 0.065; backprop's loss is 2E.
    E = 0.5 * (Y - y_hat) ** 2
    assert round(E, 3) == 0.065
    assert net.backward([[Y]]) == pytest.approx(2 * E, rel=1e-14)


def test_seed_004_backward_pass_and_update():
    net = seed_004_network()
    h = sigmoid(np.array([W11 * X1 + W21 * X2, W12 * X1 + W22 * X2]))
    y_hat = sigmoid(V1 * h[0] + V2 * h[1])
    net.forward([[X1, X2]])
    net.backward([[Y]])

    # delta_out = (y - y_hat) s'(b) = (y - y_hat) y_hat (1 - y_hat) ~ 0.083.
    delta_out = (Y - y_hat) * y_hat * (1 - y_hat)
    assert round(delta_out, 3) == 0.083
    # dE/dv_j = -delta_out h_j; the gradient of 2E is twice that.
    np.testing.assert_allclose(net.layers[1].weight_grad, [-2 * delta_out * h], rtol=1e-14)
    # delta_j = delta_out v_j h_j (1 - h_j) ~ 0.012 and 0.008: the stronger connection
    # (v_1 = 0.6 > v_2 = 0.4) gets more of the blame.
    d1 = delta_out * V1 * h[0] * (1 - h[0])
    d2 = delta_out * V2 * h[1] * (1 - h[1])
    assert round(d1, 3) == 0.012 and round(d2, 3) == 0.008 and d1 > d2
    # dE/dw_ij = -delta_j x_i, at weight[j-1, i-1].
    np.testing.assert_allclose(net.layers[0].weight_grad,
                               [[-2 * d1 * X1, -2 * d1 * X2], [-2 * d2 * X1, -2 * d2 * X2]],
                               rtol=1e-14)

    # The update: Delta v_j = eta delta_out h_j ~ 0.024 for both (0.5*0.083*0.565 and
    # 0.5*0.083*0.574), Delta w_ij = eta delta_j x_i, Delta w_11 = 0.5*0.012*0.5 ~ 0.003.
    before_w, before_v = net.layers[0].weight.copy(), net.layers[1].weight.copy()
    net.step()
    dv = net.layers[1].weight[0] - before_v[0]
    dw = net.layers[0].weight - before_w
    assert np.round(dv, 3).tolist() == [0.024, 0.024]
    np.testing.assert_allclose(dv, ETA * delta_out * h, rtol=1e-13)
    assert round(dw[0, 0], 3) == 0.003
    np.testing.assert_allclose(dw, ETA * np.outer([d1, d2], [X1, X2]), rtol=1e-12)
    # "The updates are 10x smaller for the hidden layer": 0.024 / 0.003 = 8 at the
    # text's rounding; unrounded it is delta_out h_1 / (delta_1 x_1) = 1 / (0.6 (1-h_1) 0.5).
    assert dv[0] / dw[0, 0] == pytest.approx(1 / (V1 * (1 - h[0]) * X1), rel=1e-12)


# ---- seed 003: a single ReLU neuron

def test_seed_003_single_relu_neuron():
    """x = 2, w = 0.5, b = 0, ReLU, L = (a - y)^2 (backprop's mse of one output).
    z = 0.5 * 2 + 0 = 1, a = relu(1) = 1.  With y = 1, L = 0.  With y = 0, L = 1 and
    dL/dw = dL/da * da/dz * dz/dw = 2(a - y) * 1 * x = 2 * 1 * 2 = 4; dL/db = 2 * 1 * 1 = 2.
    Every number here is exact in binary, so the assertions are equalities."""
    net = bp.Network([bp.Dense(1, 1, "relu")], loss="mse", optimizer=bp.SGD(lr=0.1),
                     dtype="float64")
    net.layers[0].weight[...] = 0.5
    net.layers[0].bias[...] = 0.0
    assert net.forward([[2.0]])[0, 0] == 1.0
    assert net.backward([[1.0]]) == 0.0
    assert net.layers[0].weight_grad[0, 0] == 0.0
    net.zero_grad()
    net.forward([[2.0]])
    assert net.backward([[0.0]]) == 1.0
    assert net.layers[0].weight_grad[0, 0] == 4.0
    assert net.layers[0].bias_grad[0] == 2.0
    # "the weight should be reduced": w = 0.5 - 0.1 * 4 = 0.1, b = 0 - 0.1 * 2 = -0.2,
    # which lowers the output to relu(0.1 * 2 - 0.2) = 0 = y.
    net.step()
    assert net.layers[0].weight[0, 0] == pytest.approx(0.1, rel=1e-15)
    assert net.layers[0].bias[0] == pytest.approx(-0.2, rel=1e-15)
    assert net.forward([[2.0]])[0, 0] == pytest.approx(0.0, abs=1e-15)
