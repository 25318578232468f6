"""Bad input raises a clear exception naming the argument, and changes nothing."""
import numpy as np
import pytest

import backprop as bp
from conftest import make_net


def snapshot(net):
    return [net.params.copy(), net.grads.copy()] + [v.copy() for v in net.optimizer.state.values()] \
        + [net.optimizer.steps]


def assert_unchanged(net, before):
    after = snapshot(net)
    for a, b in zip(before[:-1], after[:-1]):
        np.testing.assert_array_equal(a, b)
    assert before[-1] == after[-1]


@pytest.fixture
def net():
    n = make_net([4, 6, 3], ["relu", "softmax"], "cross_entropy", dtype="float32",
                 optimizer=bp.Adam(amsgrad=True))
    rng = np.random.default_rng(0)
    n.train_step(rng.normal(size=(5, 4)), rng.integers(0, 3, 5))   # state is non-trivial
    n.forward(rng.normal(size=(5, 4)))
    n.backward(rng.integers(0, 3, 5))                               # and so are the grads
    return n


GOOD_X = np.zeros((5, 4), dtype=np.float32)
GOOD_Y = np.zeros(5, dtype=np.int64)

BAD_X = [
    (np.zeros(4, dtype=np.float32), ValueError, "x must be 2-dimensional"),
    (np.zeros((5, 3), dtype=np.float32), ValueError, r"x must have shape \(batch, 4\)"),
    (np.zeros((0, 4), dtype=np.float32), ValueError, "empty batch"),
    (np.zeros((5, 4), dtype=np.int64), TypeError, "x must have dtype float32 or float64, got int64"),
    (np.zeros((5, 4), dtype=bool), TypeError, "got bool"),
    (np.zeros((5, 4), dtype=np.float16), TypeError, "got float16"),
    (np.zeros((5, 4), dtype=np.complex128), TypeError, "got complex128"),
    (np.zeros((5, 4), dtype=object), TypeError, "got object"),
    (np.full((5, 4), np.nan, dtype=np.float32), ValueError, "x contains NaN or Inf"),
    (np.array([[0, 0, 0, np.inf]] * 5), ValueError, "x contains NaN or Inf"),
    ("text", TypeError, "x must be a float array"),
]

BAD_Y = [
    (np.zeros(4, dtype=np.int64), ValueError, r"shape \(5,\)"),
    (np.array([0, 1, 2, 3, 0]), ValueError, r"must lie in \[0, 3\), got 3"),
    (np.array([0, -1, 2, 1, 0]), ValueError, r"must lie in \[0, 3\), got -1"),
    (np.zeros(5, dtype=np.float32), TypeError, "class labels must be integers"),
    (np.full((5, 3), 0.5), ValueError, "summing to 1"),
    (np.full((5, 3), np.nan), ValueError, "y contains NaN or Inf"),
    (np.zeros((5, 2)), ValueError, r"y must have shape \(5, 3\)"),
    (np.eye(3)[[0, 1, 2, 0, 1]] * 2 - 0.5, ValueError, r"probabilities in \[0, 1\]"),
]


@pytest.mark.parametrize("x,error,message", BAD_X)
def test_bad_inputs(net, x, error, message):
    before = snapshot(net)
    for call in (lambda: net.forward(x), lambda: net.train_step(x, GOOD_Y)):
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(net, before)


@pytest.mark.parametrize("y,error,message", BAD_Y)
def test_bad_targets(net, y, error, message):
    before = snapshot(net)
    with pytest.raises(error, match=message):
        net.train_step(GOOD_X, y)
    assert_unchanged(net, before)
    net.forward(GOOD_X)
    with pytest.raises(error, match=message):
        net.backward(y)
    assert_unchanged(net, before)


def test_rows_must_be_valid(net):
    before = snapshot(net)
    for rows, error, message in [(np.array([0, 5]), ValueError, r"rows must lie in \[0, 5\)"),
                                 (np.array([-1]), ValueError, "rows must lie"),
                                 (np.array([0.5]), TypeError, "integer array"),
                                 (np.array([], dtype=int), ValueError, "empty batch")]:
        with pytest.raises(error, match=message):
            net.train_step(GOOD_X, GOOD_Y, rows=rows)
        assert_unchanged(net, before)
    with pytest.raises(ValueError, match="same number of rows"):
        net.train_step(GOOD_X, GOOD_Y[:3], rows=[0, 1])


def test_grad_output_must_match_the_output(net):
    net.forward(GOOD_X)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(5, 3\)"):
        net.backward(grad_output=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="grad_output contains NaN"):
        net.backward(grad_output=np.full((5, 3), np.nan))
    with pytest.raises(TypeError, match="either targets y or grad_output"):
        net.backward(GOOD_Y, grad_output=np.zeros((5, 3)))
    assert_unchanged(net, before)


def test_calls_out_of_order():
    n = make_net([4, 3], "softmax", "cross_entropy")
    with pytest.raises(RuntimeError, match="backward needs a forward pass first"):
        n.backward(GOOD_Y)
    with pytest.raises(RuntimeError, match="step\\(\\) needs gradients"):
        n.step()
    with pytest.raises(RuntimeError, match="no input gradient"):
        n.input_grad
    n.forward(GOOD_X)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        n.backward(GOOD_Y[:3])                 # a batch size other than the forward's
    n.backward(GOOD_Y)
    n.step()
    with pytest.raises(RuntimeError, match=r"made before step\(\)"):
        n.backward(GOOD_Y)                     # the activations belong to the old weights
    no_loss = make_net([4, 3], "identity")
    no_loss.forward(GOOD_X)
    with pytest.raises(RuntimeError, match="no loss"):
        no_loss.backward(np.zeros((5, 3)))


def test_bad_architecture():
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        bp.Dense(0, 3)
    with pytest.raises(ValueError, match="out_features must be a positive integer, got -2"):
        bp.Dense(3, -2)
    with pytest.raises(ValueError, match="unknown activation 'swish'.*'relu'"):
        bp.Dense(3, 2, activation="swish")
    with pytest.raises(ValueError, match=r"layers\[1\] .* takes samples whose last dimension is 5, "
                                         r"but its input is \(4,\)"):
        bp.Network([bp.Dense(3, 4), bp.Dense(5, 2)])
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*'mse'"):
        bp.Network([bp.Dense(3, 2)], loss="hinge")
    with pytest.raises(ValueError, match="needs a 'softmax' output, got 'relu'"):
        bp.Network([bp.Dense(3, 2, "relu")], loss="cross_entropy")
    with pytest.raises(ValueError, match="dtype must be"):
        bp.Network([bp.Dense(3, 2)], dtype="float16")
    with pytest.raises(TypeError, match="optimizer must be"):
        bp.Network([bp.Dense(3, 2)], optimizer="adam")
    with pytest.raises(ValueError, match="needs at least one layer"):
        bp.Network([])


def test_an_optimizer_serves_one_network():
    opt = bp.SGD()
    net = make_net([4, 3], "identity", optimizer=opt)
    with pytest.raises(ValueError, match="already updates another Network"):
        make_net([2, 2], "identity", optimizer=opt)
    assert net.optimizer is opt


def test_big_endian_input_is_read_correctly():
    n = make_net([4, 3], "identity", dtype="float64")
    x = np.arange(20, dtype=np.float64).reshape(5, 4)
    np.testing.assert_array_equal(n.forward(x.astype(">f8")), n.forward(x))
