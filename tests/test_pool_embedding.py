"""Max and average pooling (1-D and 2-D), AdaptiveAvgPool2d(1), GlobalAvgPool, Flatten and
Embedding: against PyTorch (float64), against finite differences, bit-identical for any
thread count, and their bad arguments and inputs."""
import numpy as np
import pytest

import backprop as bp
from cnn_oracle import Case, assert_unchanged, case_tests, compare_pass, images, snapshot, twin
from conftest import threads

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")


def same(name, channels, spatial, *args, **options):
    """A Case of one layer that torch.nn has under the same name and arguments."""
    return Case(lambda: [getattr(bp, name)(*args, **options)],
                lambda net, layers: [getattr(nn, name)(*args, **options)],
                (channels,) + spatial)


def global_pool(channels, spatial):
    """GlobalAvgPool: in torch, an adaptive average pool to one position, then Flatten."""
    pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[len(spatial) - 1]
    return Case(lambda: [bp.GlobalAvgPool()], lambda net, layers: [pool(1), nn.Flatten()],
                (channels,) + spatial)


def embedding(num, dim, length, padding_idx=None, then=None):
    """Embedding on samples of `length` ids (and the layers `then`, e.g. a Dense on the
    last dimension and a LayerNorm, with their torch modules)."""
    then = then or (lambda: [], lambda: [])
    return Case(lambda: [bp.Embedding(num, dim, padding_idx=padding_idx), *then[0]()],
                lambda net, layers: [nn.Embedding(num, dim, padding_idx=padding_idx,
                                                  dtype=torch.float64), *then[1]()],
                (length,), ids=num)


CASES = {
    "max2d-k2-odd": same("MaxPool2d", 3, (7, 6), 2),
    "max2d-k3-s2-p1": same("MaxPool2d", 2, (7, 7), 3, stride=2, padding=1),
    "max2d-rect": same("MaxPool2d", 2, (5, 6), (3, 2), stride=(1, 2), padding=(1, 0)),
    "max2d-dilation2": same("MaxPool2d", 2, (6, 7), 3, stride=1, padding=1, dilation=2),
    "max2d-stride-over-kernel": same("MaxPool2d", 2, (9, 8), 2, stride=3),
    "max2d-1x1-output": same("MaxPool2d", 2, (5, 4), (5, 4)),
    "max2d-1-pixel": same("MaxPool2d", 2, (1, 1), 1),
    "max2d-1-pixel-padded": same("MaxPool2d", 3, (1, 1), 3, stride=1, padding=1),
    "max1d-k3-s2-p1": same("MaxPool1d", 2, (9,), 3, stride=2, padding=1),
    "max1d-k2": same("MaxPool1d", 3, (7,), 2),
    "max1d-dilation2": same("MaxPool1d", 2, (8,), 3, stride=1, padding=1, dilation=2),
    "max1d-output-1": same("MaxPool1d", 2, (4,), 4),
    "avg2d-k2-odd": same("AvgPool2d", 3, (7, 6), 2),
    "avg2d-k3-s2-p1": same("AvgPool2d", 2, (7, 7), 3, stride=2, padding=1),
    "avg2d-k3-s2-p1-exclude-pad": same("AvgPool2d", 2, (7, 7), 3, stride=2, padding=1,
                                       count_include_pad=False),
    "avg2d-rect-exclude-pad": same("AvgPool2d", 2, (5, 7), (2, 3), stride=(1, 2),
                                   padding=(1, 1), count_include_pad=False),
    "avg2d-1-pixel-padded": same("AvgPool2d", 2, (1, 1), 3, stride=1, padding=1),
    "avg2d-1-pixel-padded-exclude-pad": same("AvgPool2d", 2, (1, 1), 3, stride=1, padding=1,
                                             count_include_pad=False),
    "avg2d-1x1-output": same("AvgPool2d", 2, (5, 4), (5, 4)),
    "avg1d-k3-s2-p1": same("AvgPool1d", 2, (9,), 3, stride=2, padding=1),
    "avg1d-exclude-pad": same("AvgPool1d", 3, (8,), 3, stride=2, padding=1,
                              count_include_pad=False),
    "avg1d-k2-odd": same("AvgPool1d", 3, (7,), 2),
    "avg1d-1-pixel": same("AvgPool1d", 2, (1,), 1),
    "adaptive-avg": same("AdaptiveAvgPool2d", 3, (7, 5), 1),
    "adaptive-avg-1-pixel": same("AdaptiveAvgPool2d", 2, (1, 1), 1),
    "global-avg-2d": global_pool(3, (7, 5)),
    "global-avg-1d": global_pool(3, (9,)),
    "global-avg-1-pixel": global_pool(2, (1, 1)),
    "flatten-2d": same("Flatten", 3, (5, 4)),
    "flatten-1d": same("Flatten", 3, (7,)),
    "embedding": embedding(7, 4, 5),
    "embedding-padding-first": embedding(7, 4, 5, padding_idx=0),
    "embedding-padding-negative": embedding(7, 3, 6, padding_idx=-1),
    "embedding-one-id": embedding(1, 3, 4),
    "embedding-width-1": embedding(10, 1, 4, padding_idx=9),
    "embedding-length-1": embedding(3, 5, 1),
    "embedding-dense-layernorm": embedding(
        9, 6, 5, padding_idx=8,
        then=(lambda: [bp.Dense(6, 5, activation="tanh"), bp.LayerNorm(5)],
              lambda: [nn.Linear(6, 5, dtype=torch.float64), nn.Tanh(),
                       nn.LayerNorm(5, dtype=torch.float64)])),
}

FD_EVERYWHERE = ["max2d-k3-s2-p1", "max1d-dilation2", "avg2d-rect-exclude-pad",
                 "avg1d-k3-s2-p1", "adaptive-avg", "global-avg-1d", "flatten-2d",
                 "global-avg-2d", "embedding", "embedding-padding-first",
                 "embedding-dense-layernorm"]

(test_matches_torch, test_adam_steps_match_torch, test_finite_differences_as_the_output_layer,
 test_finite_differences) = case_tests(CASES, FD_EVERYWHERE)


# ---- hand-worked values


def test_max_pooling_sends_the_gradient_to_the_first_largest_value():
    """Ties pass the gradient to the first largest value in scan order (row by row), as
    in PyTorch; padding (-inf) never wins, even over -1e300."""
    x = np.array([[[[1., 1., -1e300], [1., 1., -1e300]]]])     # (1, 1, 2, 3)
    net = bp.Network([bp.MaxPool2d(2, stride=1, padding=(0, 1))], dtype="float64",
                     input_shape=(1, 2, 3))
    # Windows start at columns -1, 0, 1, 2 (padding 1 each side) and span both rows:
    # {x00, x10}, {x00, x01, x10, x11}, {x01, x02, x11, x12}, {x02, x12}: maxima 1, 1, 1
    # and -1e300, taken from x00, x00, x01 and x02.
    np.testing.assert_array_equal(net.forward(x), [[[[1., 1., 1., -1e300]]]])
    g = np.array([[[[1., 10., 100., 1000.]]]])
    net.backward(grad_output=g)
    np.testing.assert_array_equal(net.input_grad, [[[[11., 100., 1000.], [0., 0., 0.]]]])
    xt = torch.tensor(x, requires_grad=True)
    nn.MaxPool2d(2, stride=1, padding=(0, 1))(xt).backward(torch.tensor(g))
    np.testing.assert_array_equal(net.input_grad, xt.grad.numpy())


def test_average_pooling_divisors_by_hand():
    """A 3-wide window, stride 2, padding 1 over [1, 2, 3, 4]: windows [pad, 1, 2],
    [2, 3, 4].  With the padding counted the means are 3/3 and 9/3; without, 3/2 and
    9/3.  The gradient is spread over each window by the same divisor."""
    x = np.array([[[1., 2., 3., 4.]]])
    for include, expected, spread in ((True, [1., 3.], [1 / 3, 2 / 3, 1 / 3, 1 / 3]),
                                      (False, [1.5, 3.], [1 / 2, 1 / 2 + 1 / 3, 1 / 3, 1 / 3])):
        net = bp.Network([bp.AvgPool1d(3, stride=2, padding=1, count_include_pad=include)],
                         dtype="float64", input_shape=(1, 4))
        np.testing.assert_allclose(net.forward(x), [[expected]], rtol=1e-15)
        net.backward(grad_output=np.ones((1, 1, 2)))
        np.testing.assert_allclose(net.input_grad, [[spread]], rtol=1e-15)


def test_embedding_gradients_add_up_per_id_and_skip_padding():
    """ids [[2, 0, 2], [1, 2, 0]] with padding_idx 0 and dL/dout = the row number r + 1
    of each position (1 to 6): id 2 gets 1 + 3 + 5 = 9 in every column, id 1 gets 4, the
    padding id 0 nothing, id 3 (unused) nothing."""
    net = bp.Network([bp.Embedding(4, 2, padding_idx=0)], dtype="float64", input_shape=(3,))
    assert not net.layers[0].weight[0].any()                  # starts at zero, as in torch
    ids = np.array([[2, 0, 2], [1, 2, 0]])
    np.testing.assert_array_equal(net.forward(ids), net.layers[0].weight[ids])
    g = np.arange(1., 7.).reshape(2, 3, 1) * np.ones(2)
    net.backward(grad_output=g)
    np.testing.assert_array_equal(net.layers[0].weight_grad, [[0, 0], [4, 4], [9, 9], [0, 0]])


def test_flatten_keeps_pytorchs_order_after_a_convolution(rng):
    """A convolution stores its output pixel by pixel; Flatten gives channel by channel,
    PyTorch's order, so the flattened values are the convolution's output reshaped."""
    conv = bp.Network([bp.Conv2d(2, 3, 3)], dtype="float64", seed=0, input_shape=(2, 6, 5))
    flat = bp.Network([bp.Conv2d(2, 3, 3), bp.Flatten()], dtype="float64", seed=0,
                      input_shape=(2, 6, 5))
    x = rng.normal(size=(4, 2, 6, 5))
    np.testing.assert_array_equal(flat.forward(x), conv.forward(x).reshape(4, -1))


# ---- threads


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pooling_is_bit_identical_for_any_thread_count(dtype, rng):
    """Overlapping windows (whose gradients add into the same input value), on the
    network's input (through a relayout) and after a convolution."""
    x, y = images(rng, 64, (8, 17, 15), 4)

    def run(n_threads):
        with threads(n_threads):
            net = bp.Network([
                bp.MaxPool2d(3, stride=1, padding=1),
                bp.Conv2d(8, 8, 3, padding=1, activation="tanh"),
                bp.MaxPool2d(3, stride=2, padding=1, dilation=1),
                bp.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                bp.AvgPool2d(2), bp.GlobalAvgPool(), bp.Dense(8, 4, activation="softmax")],
                loss="cross_entropy", optimizer=bp.SGD(lr=0.1), dtype=dtype, seed=1,
                input_shape=(8, 17, 15))
            out = net.forward(x)
            net.backward(y)
            return out, net.grads.copy(), net.input_grad

    reference = run(1)
    for n in (2, 7, 64):
        for name, a, b in zip(("output", "grads", "input_grad"), reference, run(n)):
            np.testing.assert_array_equal(b, a, err_msg=f"{name}, {n} threads")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_embedding_is_bit_identical_for_any_thread_count(dtype, rng):
    """Ids repeat many times (4,096 ids drawn from 50): each id's gradient row is summed
    in the ids' order whatever the team."""
    ids = rng.integers(0, 50, (256, 16))
    y = rng.integers(0, 3, 256)

    def run(n_threads):
        with threads(n_threads):
            net = bp.Network([bp.Embedding(50, 64, padding_idx=3), bp.GlobalAvgPool(),
                              bp.Dense(16, 3, activation="softmax")],
                             loss="cross_entropy", optimizer=bp.Adam(lr=0.01), dtype=dtype,
                             seed=2, input_shape=(16,))
            assert 256 * 16 * 64 >= 1 << 16                 # enough work for a team
            net.train_step(ids, y)
            out = net.forward(ids)
            net.backward(y)
            return out, net.grads.copy(), net.params.copy()

    reference = run(1)
    for n in (2, 7, 64):
        for name, a, b in zip(("output", "grads", "params"), reference, run(n)):
            np.testing.assert_array_equal(b, a, err_msg=f"{name}, {n} threads")


# ---- bad arguments and inputs


@pytest.mark.parametrize("make, message", [
    (lambda: bp.MaxPool2d(2, padding=2), r"MaxPool2d: padding \(2, 2\) must be at most half the "
                                         r"kernel size \(2, 2\)"),
    (lambda: bp.AvgPool1d(3, padding=2), r"AvgPool1d: padding \(2,\) must be at most half"),
    (lambda: bp.MaxPool2d((4, 2), padding=(2, 2)), r"padding \(2, 2\) must be at most half"),
    (lambda: bp.MaxPool2d(2, stride=0), r"MaxPool2d: stride must be a positive integer"),
    (lambda: bp.AvgPool2d(2, padding=-1), r"AvgPool2d: padding must be an integer >= 0"),
    (lambda: bp.MaxPool1d(0), r"MaxPool1d: kernel_size must be a positive integer"),
    (lambda: bp.MaxPool1d(2, dilation=0), r"MaxPool1d: dilation must be a positive integer"),
    (lambda: bp.AvgPool2d(2, count_include_pad=1), r"AvgPool2d: count_include_pad must be True "
                                                   r"or False"),
    (lambda: bp.AdaptiveAvgPool2d(2), r"AdaptiveAvgPool2d: only output_size=1 is supported"),
    (lambda: bp.Embedding(0, 3), r"Embedding: num_embeddings must be a positive integer"),
    (lambda: bp.Embedding(4, 0), r"Embedding: embedding_dim must be a positive integer"),
    (lambda: bp.Embedding(4, 3, padding_idx=4), r"Embedding: padding_idx must be None or an "
                                                r"id in \[-4, 4\), got 4"),
    (lambda: bp.Embedding(4, 3, padding_idx=-5), r"padding_idx must be None or an id"),
    (lambda: bp.Embedding(4, 3, padding_idx=1.0), r"padding_idx must be None or an id"),
])
def test_bad_arguments_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("layers, shape, message", [
    (lambda: [bp.MaxPool2d(4)], (2, 3, 5), r"layers\[0\] \(MaxPool2d.*has a kernel spanning "
                                           r"\(4, 4\), larger than its padded input \(3, 5\)"),
    (lambda: [bp.MaxPool1d(3, dilation=2)], (2, 4),
     r"kernel spanning \(5,\), larger than its padded input \(4,\)"),
    (lambda: [bp.MaxPool2d(2)], (2, 8), r"takes samples of shape \(C, H, W\), but its input is "
                                        r"\(2, 8\)"),
    (lambda: [bp.AvgPool1d(2)], (2, 8, 8), r"takes samples of shape \(C, L\)"),
    (lambda: [bp.AdaptiveAvgPool2d(1)], (3, 8), r"takes samples of shape \(C, H, W\)"),
    (lambda: [bp.GlobalAvgPool()], (8,), r"takes samples of shape \(C, L\) or \(C, H, W\), "
                                         r"but its input is \(8,\)"),
    (lambda: [bp.Embedding(5, 2)], (3, 4), r"takes samples of ids of shape \(length,\), but "
                                           r"its input is \(3, 4\)"),
    (lambda: [bp.Dense(3, 3), bp.Embedding(5, 3)], None,
     r"layers\[1\] \(Embedding.*takes integer ids, so it can only be a network's first layer"),
    (lambda: [bp.Embedding(5, 3)], None, r"input shape is not fixed by its first layer"),
])
def test_shapes_that_do_not_fit_are_refused_naming_the_layer(layers, shape, message):
    with pytest.raises(ValueError, match=message):
        bp.Network(layers(), input_shape=shape)


def embedding_net():
    net = bp.Network([bp.Embedding(6, 4, padding_idx=1), bp.Flatten(),
                      bp.Dense(12, 3, activation="softmax")], loss="cross_entropy",
                     optimizer=bp.Adam(lr=0.01), dtype="float32", seed=0, input_shape=(3,))
    ids, y = np.array([[0, 1, 5], [2, 2, 3]]), np.array([0, 2])
    net.train_step(ids, y)                      # optimizer state away from its start
    out = net.forward(ids)
    net.backward(y)                             # and pending gradients
    return net, out, ids, y


@pytest.mark.parametrize("bad, error, message", [
    (np.array([[0, 1, 6], [2, 2, 3]]), ValueError,
     r"x: every id must lie in \[0, 6\) \(the Embedding's num_embeddings\), got 6 in row 0"),
    (np.array([[0, 1, 2], [2, -1, 3]]), ValueError, r"every id must lie in \[0, 6\).*got -1 in "
                                                    r"row 1"),
    (np.array([[0, 1, 2], [2, 1, 3]], dtype=np.uint64) + np.uint64(2 ** 63), ValueError,
     r"every id must lie in \[0, 6\).*got 9223372036854775808 in row 0"),
    (np.array([[0., 1., 2.], [2., 1., 3.]]), TypeError, r"x must hold integer ids \(the network "
                                                         r"starts with an Embedding\)"),
    (np.array([[True, False, True]] * 2), TypeError, r"x must hold integer ids"),
    (np.array([[0, 1], [2, 3]]), ValueError, r"x must have shape \(batch, 3\) for this network"),
    (np.array([0, 1, 2]), ValueError, r"x must have shape \(batch, 3\)"),
])
def test_bad_ids_are_refused_before_any_kernel_runs(bad, error, message):
    net, out, ids, y = embedding_net()
    before = snapshot(net)
    for call in (lambda: net.forward(bad), lambda: net.train_step(bad, y),
                 lambda: net.compute_gradients(bad, y), lambda: net.loss_of(bad, y)):
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(net, before)
        # The last forward's activations are still there: no kernel ran on the bad batch.
        np.testing.assert_array_equal(net._engine.output(), out)
    net.backward(y)                              # the old forward still backpropagates
    np.testing.assert_allclose(net.grads, 2 * before["grads"], rtol=1e-6, atol=1e-7)


def test_ids_of_any_integer_dtype_and_layout_are_read():
    net, _, ids, _ = embedding_net()
    expected = net.forward(ids)
    wide = np.zeros((2, 6), dtype=np.int16)
    wide[:, ::2] = ids                                   # strided, int16
    for variant in (ids.astype(np.uint8), ids.astype(np.int32), wide[:, ::2],
                    np.asfortranarray(ids), ids.astype(">i8")):
        np.testing.assert_array_equal(net.forward(variant), expected)
