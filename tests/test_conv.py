"""Conv1d and Conv2d: against PyTorch (float64) over a grid of kernels, strides, paddings,
dilations and groups on odd sizes, against finite differences, bit-identical for any
thread count (a batch of several im2col chunks included), and their bad arguments."""
import numpy as np
import pytest

import backprop as bp
from cnn_oracle import Case, case_tests, compare_pass, images, to_twin, torch_activation
from conftest import threads

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")


def conv(dims, c_in, c_out, kernel, spatial, **options):
    """A Case of one convolution; its torch twin is torch.nn.Conv{dims}d with the same
    arguments (and the activation's module after it)."""
    layer = (bp.Conv1d, bp.Conv2d)[dims - 1]

    def torch_modules(net, layers):
        module = getattr(torch.nn, f"Conv{dims}d")(
            c_in, c_out, kernel, dtype=torch.float64,
            **{k: v for k, v in options.items() if k != "activation"})
        activation = torch_activation(options.get("activation") or "identity")
        return [module] + ([activation] if activation is not None else [])

    return Case(lambda: [layer(c_in, c_out, kernel, **options)], torch_modules,
                (c_in,) + spatial)


CASES = {
    # Conv2d on (C, H, W): odd sizes everywhere
    "2d-k3": conv(2, 3, 4, 3, (7, 6)),
    "2d-k1": conv(2, 3, 5, 1, (5, 4)),             # the input is its own column matrix
    "2d-k1-stride2": conv(2, 3, 2, 1, (5, 4), stride=2),
    "2d-k2-stride2-odd": conv(2, 2, 3, 2, (7, 7), stride=2),
    "2d-k5-pad2": conv(2, 1, 3, 5, (9, 9), padding=2),
    "2d-same": conv(2, 2, 3, 3, (6, 5), padding="same"),
    "2d-valid": conv(2, 2, 3, 3, (6, 5), padding="valid"),
    "2d-same-dilated": conv(2, 2, 2, 3, (7, 6), padding="same", dilation=2),
    "2d-same-rect": conv(2, 2, 3, (3, 5), (5, 7), padding="same"),
    "2d-k3x1-stride21-pad10": conv(2, 2, 3, (3, 1), (7, 5), stride=(2, 1), padding=(1, 0)),
    "2d-k1x3-dilation12": conv(2, 3, 2, (1, 3), (4, 7), dilation=(1, 2)),
    "2d-dilation2-pad2": conv(2, 2, 3, 3, (7, 8), dilation=2, padding=2),
    "2d-stride3-pad1": conv(2, 2, 3, 3, (8, 5), stride=3, padding=1),
    "2d-stride-larger-than-kernel": conv(2, 2, 2, 2, (9, 7), stride=3),
    "2d-pad-larger-than-kernel": conv(2, 2, 2, 2, (3, 4), padding=3),
    "2d-groups2": conv(2, 4, 6, 3, (5, 6), padding=1, groups=2),
    "2d-depthwise": conv(2, 4, 4, 3, (7, 5), padding=1, groups=4),
    "2d-depthwise-multiplier": conv(2, 3, 6, (2, 3), (5, 6), groups=3),
    "2d-groups-strided-dilated": conv(2, 4, 4, 3, (9, 7), stride=2, dilation=2,
                                      padding=(2, 1), groups=2),
    "2d-1x1-output": conv(2, 3, 4, (5, 4), (5, 4)),
    "2d-1-pixel": conv(2, 3, 4, 1, (1, 1)),
    "2d-1-pixel-padded": conv(2, 2, 3, 3, (1, 1), padding=1),
    "2d-kernel-over-input-padded": conv(2, 2, 3, (4, 5), (2, 3), padding=2),
    "2d-no-bias-relu": conv(2, 3, 4, 3, (6, 5), padding=1, bias=False, activation="relu"),
    "2d-gelu": conv(2, 2, 3, 3, (5, 5), activation="gelu"),
    "2d-tanh-strided": conv(2, 3, 3, 3, (7, 7), stride=2, padding=1, activation="tanh"),
    # Conv1d on (C, L)
    "1d-k3": conv(1, 3, 4, 3, (11,)),
    "1d-k1": conv(1, 2, 3, 1, (7,)),
    "1d-same-k5": conv(1, 2, 3, 5, (9,), padding="same"),
    "1d-stride2-pad1-dilation2": conv(1, 3, 2, 3, (12,), stride=2, padding=1, dilation=2),
    "1d-valid-stride3": conv(1, 2, 2, 2, (10,), padding="valid", stride=3),
    "1d-groups2": conv(1, 4, 2, 3, (9,), groups=2, padding=1),
    "1d-depthwise": conv(1, 3, 3, 5, (9,), groups=3, padding=2),
    "1d-1-pixel": conv(1, 3, 2, 1, (1,)),
    "1d-1-pixel-padded": conv(1, 2, 2, 3, (1,), padding=1),
    "1d-output-1": conv(1, 2, 3, 7, (7,)),
    "1d-no-bias-elu": conv(1, 2, 3, 3, (8,), bias=False, activation="elu"),
}

# Central differences for every case as the output layer in train mode, and for these
# (every option among them) in both places and both modes.
FD_EVERYWHERE = ["2d-k3", "2d-k1", "2d-same-dilated", "2d-groups-strided-dilated",
                 "2d-depthwise", "2d-1-pixel-padded", "1d-stride2-pad1-dilation2",
                 "1d-depthwise"]


(test_matches_torch, test_adam_steps_match_torch, test_finite_differences_as_the_output_layer,
 test_finite_differences) = case_tests(CASES, FD_EVERYWHERE)


# ---- a batch the kernel takes in several chunks


def chunk_samples(layer, spatial_out, itemsize):
    """Samples per chunk of im2col columns (_conv.pxd): CHUNK_BYTES = 4 MiB over one
    sample's column matrix, output pixels x (in_channels / groups * kernel positions)."""
    k = layer.in_channels // layer.groups * int(np.prod(layer.kernel_size))
    return max(1, (4 << 20) // (int(np.prod(spatial_out)) * k * itemsize))


@pytest.mark.parametrize("groups", [1, 2])
def test_a_batch_of_several_chunks_matches_torch(groups, rng):
    net = bp.Network([bp.Conv2d(6, 4, 3, padding=1, groups=groups, activation="tanh"),
                      bp.GlobalAvgPool(), bp.Dense(4, 3, activation="softmax")],
                     loss="cross_entropy", dtype="float64", seed=0, input_shape=(6, 15, 15))
    chunk = chunk_samples(net.layers[0], (15, 15), 8)
    n = 2 * chunk + 3                                    # two full chunks and a ragged one
    assert chunk > 1
    x, y = images(rng, n, (6, 15, 15), 3)
    compare_pass(net, to_twin(net), x, y)


@pytest.mark.parametrize("c_in, spatial, kernel", [(32, 16, 3), (1, 64, 5)],
                         ids=["channels", "one-channel"])      # the transposed column matrix
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_batch_size_across_chunk_boundaries_gives_torchs_weight_gradient(
        dtype, c_in, spatial, kernel, rng):
    # The last chunk of a batch is shorter, and dW's product sums over a chunk's rows: a
    # shorter sum can be cut into longer k blocks needing more packing scratch than a
    # full chunk's (batch 32 of this layer in float32: chunks of 14, 14 and 4 samples,
    # k = 3584 in blocks of 896 but 1024 in one).  Scratch sized for the full chunk only
    # let the packing overwrite the reordered weight gradient.  Every batch size up to
    # two full chunks and a ragged third, in both dtypes, against torch in float64.
    shape = (c_in, spatial, spatial)
    layer = bp.Conv2d(c_in, 16, kernel, padding=kernel // 2, bias=False)
    net = bp.Network([layer, bp.GlobalAvgPool(), bp.Dense(16, 3, activation="softmax")],
                     loss="cross_entropy", dtype=dtype, seed=0, input_shape=shape)
    chunk = chunk_samples(layer, shape[1:], np.dtype(dtype).itemsize)
    assert 4 <= chunk <= 16                       # several chunks within small batches
    twin = to_twin(net).double()
    for batch in range(1, 2 * chunk + 4):
        x, y = images(rng, batch, shape, 3)
        net.zero_grad()
        net.forward(x)
        net.backward(y)
        twin.zero_grad()
        loss = torch.nn.functional.cross_entropy(twin(torch.tensor(x.astype(dtype), dtype=torch.float64)),
                                                 torch.tensor(y))
        loss.backward()
        expected = twin[0].weight.grad.numpy()
        error = np.abs(layer.weight_grad - expected).max() / np.abs(expected).max()
        assert error < (1e-12 if dtype == "float64" else 1e-5), (batch, error)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bit_identical_for_any_thread_count(dtype, rng):
    """Every path of the kernel: im2col with groups, stride and dilation over a batch of
    several chunks, and the direct 1x1 product (its input is its column matrix)."""
    itemsize = np.dtype(dtype).itemsize
    x, y = images(rng, 64, (4, 32, 31), 3)

    def run(n_threads):
        with threads(n_threads):
            net = bp.Network([
                bp.Conv2d(4, 8, 5, padding=2, groups=2, activation="relu"),
                bp.Conv2d(8, 8, 1, activation="tanh"),                   # direct
                bp.Conv2d(8, 6, 3, stride=2, dilation=2, padding=2),
                bp.GlobalAvgPool(), bp.Dense(6, 3, activation="softmax")],
                loss="cross_entropy", optimizer=bp.Adam(lr=1e-2), dtype=dtype, seed=3,
                input_shape=(4, 32, 31))
            assert len(x) > 2 * chunk_samples(net.layers[0], (32, 31), itemsize)
            net.train_step(x, y)
            out = net.forward(x)
            net.backward(y)
            return net.params.copy(), net.grads.copy(), out, net.input_grad

    reference = run(1)
    for n in (2, 7, 64):
        for name, a, b in zip(("params", "grads", "output", "input_grad"), reference, run(n)):
            np.testing.assert_array_equal(b, a, err_msg=f"{name}, {n} threads")


def test_a_hand_worked_convolution():
    """A 2x2 kernel over a 3x3 image, stride 1, no padding: each output is the sum of the
    window times the kernel, worked out here by hand.

        image  1 2 3     kernel  1 0     out[0,0] = 1*1 + 2*0 + 4*0 + 5*-1 = -4
               4 5 6             0 -1    out[0,1] = 2 - 6 = -4, out[1,0] = 4 - 8 = -4,
               7 8 9                     out[1,1] = 5 - 9 = -4; + bias 0.5 each

    With dL/dout = 1 everywhere, dL/dkernel[i,j] is the sum of the image values it
    touched: [[1+2+4+5, 2+3+5+6], [4+5+7+8, 5+6+8+9]] = [[12, 16], [24, 28]], and
    dL/dbias = 4."""
    net = bp.Network([bp.Conv2d(1, 1, 2)], dtype="float64", input_shape=(1, 3, 3))
    net.layers[0].weight[...] = [[[[1, 0], [0, -1]]]]
    net.layers[0].bias[...] = 0.5
    out = net.forward(np.arange(1, 10, dtype=float).reshape(1, 1, 3, 3))
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), -3.5))
    net.backward(grad_output=np.ones((1, 1, 2, 2)))
    np.testing.assert_array_equal(net.layers[0].weight_grad, [[[[12, 16], [24, 28]]]])
    np.testing.assert_array_equal(net.layers[0].bias_grad, [4])
    # dL/dimage: how many windows (times the kernel value) saw each pixel.
    np.testing.assert_array_equal(net.input_grad[0, 0], [[1, 1, 0], [1, 0, -1], [0, -1, -1]])


# ---- configuration


def test_output_shapes_follow_torchs_floor_rule():
    # H_out = floor((H + 2p - d(k - 1) - 1) / s) + 1: (7 + 2 - 2*2 - 1) / 2 + 1 = 3, and
    # (8 + 0 - 1*2 - 1) / 3 + 1 = 2 (floor of 5/3).
    layer = bp.Conv2d(2, 5, (3, 3), stride=(2, 3), padding=(1, 0), dilation=(2, 1))
    assert layer.output_shape((2, 7, 8)) == (5, 3, 2)
    assert bp.Conv1d(1, 1, 3, padding="same", dilation=3).padding == (3,)
    assert bp.Conv2d(1, 1, (3, 5), padding="same").padding == (1, 2)
    assert bp.Conv2d(1, 1, 4, padding="valid").padding == (0, 0)


@pytest.mark.parametrize("make, message", [
    (lambda: bp.Conv2d(2, 2, 3, stride=0), r"Conv2d: stride must be a positive integer"),
    (lambda: bp.Conv2d(2, 2, 3, stride=(1, 0)), r"Conv2d: stride must be a positive integer"),
    (lambda: bp.Conv1d(2, 2, 3, padding=-1), r"Conv1d: padding must be an integer >= 0"),
    (lambda: bp.Conv2d(2, 2, 3, padding=(1, -1)), r"Conv2d: padding must be an integer >= 0"),
    (lambda: bp.Conv2d(2, 2, 0), r"Conv2d: kernel_size must be a positive integer"),
    (lambda: bp.Conv2d(2, 2, (3, 3, 3)), r"Conv2d: kernel_size must be .* or 2 of them"),
    (lambda: bp.Conv2d(2, 2, 3, dilation=0), r"Conv2d: dilation must be a positive integer"),
    (lambda: bp.Conv2d(2, 2, 3.0), r"Conv2d: kernel_size must be a positive integer"),
    (lambda: bp.Conv2d(2, 2, True), r"Conv2d: kernel_size must be a positive integer"),
    (lambda: bp.Conv2d(0, 2, 3), r"Conv2d: in_channels must be a positive integer"),
    (lambda: bp.Conv2d(3, 4, 3, groups=2), r"in_channels \(3\) and out_channels \(4\) must "
                                          r"both divide by groups \(2\)"),
    (lambda: bp.Conv2d(4, 6, 3, groups=4), r"must both divide by groups \(4\)"),
    (lambda: bp.Conv2d(2, 2, 2, padding="same"), r"padding='same' needs stride 1 and an odd "
                                                 r"\(dilated\) kernel size"),
    (lambda: bp.Conv1d(2, 2, 4, padding="same"), r"padding='same' needs"),
    (lambda: bp.Conv2d(2, 2, 3, stride=2, padding="same"), r"padding='same' needs stride 1"),
    (lambda: bp.Conv2d(2, 2, 3, padding="full"), r"Conv2d: padding must be"),
    (lambda: bp.Conv2d(2, 2, 3, activation="swish"), r"Conv2d: unknown activation 'swish'"),
    (lambda: bp.Conv2d(2, 2, 3, bias=1), r"Conv2d: bias must be True or False"),
    (lambda: bp.Conv2d(2, 2, 3, init="lecun"), r"Conv2d: unknown init 'lecun'"),
])
def test_bad_arguments_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("layers, shape, message", [
    (lambda: [bp.Conv2d(1, 2, 5)], (1, 4, 9),
     r"layers\[0\] \(Conv2d.*has a kernel spanning \(5, 5\), larger than its padded input "
     r"\(4, 9\)"),
    (lambda: [bp.Conv2d(1, 2, 3, dilation=(3, 1), padding=(0, 1))], (1, 6, 6),
     r"kernel spanning \(7, 3\), larger than its padded input \(6, 8\)"),
    (lambda: [bp.Conv1d(1, 2, 4, stride=2)], (1, 3),
     r"kernel spanning \(4,\), larger than its padded input \(3,\)"),
    (lambda: [bp.Conv2d(3, 2, 3)], (2, 8, 8),
     r"layers\[0\] \(Conv2d.*takes samples of shape \(3, H, W\), but its input is \(2, 8, 8\)"),
    (lambda: [bp.Conv2d(3, 2, 3)], (3, 8),
     r"takes samples of shape \(3, H, W\), but its input is \(3, 8\)"),
    (lambda: [bp.Conv1d(3, 2, 3)], (3, 8, 8),
     r"takes samples of shape \(3, L\), but its input is \(3, 8, 8\)"),
    (lambda: [bp.Conv2d(1, 2, 3, activation="softmax")], (1, 5, 5),
     r"softmax is over the features of a \(features,\) sample, but this one is \(2, 3, 3\); "
     r"Flatten first"),
    (lambda: [bp.Conv2d(1, 2, 3)], None, r"input shape is not fixed by its first layer"),
])
def test_shapes_that_do_not_fit_are_refused_naming_the_layer(layers, shape, message):
    made = layers()
    with pytest.raises(ValueError, match=message):
        bp.Network(made, input_shape=shape)
    assert made[0].weight is None           # refused before the layer was taken in


def test_weights_start_as_declared(rng):
    """He-normal for relu-like activations, Glorot-uniform otherwise, over fan_in =
    in_channels / groups * kernel positions (as Dense over in_features); biases at 0."""
    he = bp.Network([bp.Conv2d(8, 64, 3, groups=2, activation="relu")], seed=1,
                    input_shape=(8, 5, 5), dtype="float64").layers[0]
    fan_in = 8 // 2 * 9
    assert he.weight.shape == (64, 4, 3, 3) and not he.bias.any()
    # 2,304 draws: the sample std is within 5% of sqrt(2 / fan_in) (its relative standard
    # error is 1/sqrt(2 * 2304) = 1.5%).
    assert he.weight.std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.05)
    glorot = bp.Network([bp.Conv1d(6, 4, 5)], seed=1, input_shape=(6, 9),
                        dtype="float64").layers[0]
    limit = np.sqrt(6 / (6 * 5 + 4 * 5))
    assert np.abs(glorot.weight).max() <= limit and np.abs(glorot.weight).max() > 0.9 * limit
