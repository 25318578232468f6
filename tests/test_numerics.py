"""Extreme values stay finite where the math is finite."""
import numpy as np

import backprop as bp
from conftest import make_net


def single_layer(activation, loss, n_in=2, n_out=3):
    net = make_net([n_in, n_out], activation, loss, dtype="float32")
    net.layers[0].weight[...] = np.eye(n_out, n_in)
    net.layers[0].bias[...] = 0
    return net


def test_cross_entropy_with_logits_of_1e4():
    net = single_layer("softmax", "cross_entropy", n_in=3)
    x = np.array([[1e4, -1e4, 0], [-1e4, 1e4, 1e4], [0, 0, 0]], dtype=np.float32)
    p = net.forward(x)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-6)
    loss = net.backward(np.array([1, 0, 2]))
    # loss = logsumexp(z) - z[label].  Row 0: lse = 1e4, label 1 has -1e4: 2e4.  Row 1:
    # two tied logits of 1e4 give lse = 1e4 + log 2, label 0 has -1e4: 2e4 + log 2.
    # Row 2: all equal, log 3.  Mean over the 3 rows:
    assert np.isclose(loss, (2e4 + 2e4 + np.log(2) + np.log(3)) / 3, rtol=1e-6)
    assert np.isfinite(net.grads).all() and np.isfinite(net.input_grad).all()


def test_binary_cross_entropy_at_sigmoid_inputs_of_1000():
    net = single_layer("sigmoid", "binary_cross_entropy", n_in=2, n_out=2)
    x = np.array([[1000, -1000], [-1000, 1000]], dtype=np.float32)
    net.forward(x)
    loss = net.backward(np.array([[0, 1], [0, 1]], dtype=np.float32))
    # elements: z=1000,y=0 -> 1000; z=-1000,y=1 -> 1000; z=-1000,y=0 -> 0; z=1000,y=1 -> 0
    assert np.isclose(loss, 2000 / 4)
    assert np.isfinite(net.grads).all()


def test_mse_with_huge_targets_stays_finite():
    net = single_layer("identity", "mse", n_in=3)
    loss = net.train_step(np.ones((4, 3), dtype=np.float32), np.full((4, 3), 1e15))
    assert np.isfinite(loss) and np.isfinite(net.params).all()


def test_every_activation_is_finite_at_extremes():
    x = np.array([[1e4, -1e4], [1000, -1000], [0, 0]])
    for act in bp.ACTIVATIONS:
        net = single_layer(act, None, n_out=2)
        out = net.forward(x)
        assert np.isfinite(out).all(), act
        net.backward(grad_output=np.ones_like(out))
        assert np.isfinite(net.grads).all(), act
