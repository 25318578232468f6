"""The networks every benchmark trains, described once, framework-neutrally.

A config is a tuple of layer specs (the dataclasses below) plus the batch size, the loss,
the SGD learning rate and the shape of one input sample: (features,), (C, H, W) for a
convolutional network, whose batches are NCHW float32 as PyTorch's, or (time, features)
for a recurrent one, whose batches are batch-first (batch, time, features).
`networks.py` turns a config into a backprop network, a PyTorch module, a JAX train step
and a NumPy reference, so every framework trains exactly the same network.  The last
layer is a `Dense` whose activation pairs with the loss: "softmax" with "cross_entropy"
(the peers that fuse softmax into the loss drop it there), "sigmoid" with "mse".
"""
from dataclasses import dataclass
import math


# Each spec but Residual maps the shape of the samples it takes to the shape it gives
# (`output_shape`), so a config is checked when it is declared and its flops are counted
# from the shapes (a Residual's layers must give back the shape they take).

@dataclass(frozen=True)
class Dense:
    """``activation(x @ W.T + b)``, W of shape (out_features, in_features)."""
    in_features: int
    out_features: int
    activation: str = "identity"

    def output_shape(self, shape):
        _expect(self, shape, (self.in_features,))
        return (self.out_features,)

    @property
    def weight_shape(self):
        return (self.out_features, self.in_features)

    parameter_names = ("weight", "bias")       # PyTorch's, backprop's too

    def products(self, shape):
        """Multiplications of one sample's forward product."""
        return self.in_features * self.out_features

    def input_grad_products(self, shape):
        """Multiplications of one sample's dX product (dZ.W): as many as forward."""
        return self.products(shape)


@dataclass(frozen=True)
class Conv2d:
    """torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding) with a bias
    (square kernel, zero padding, no dilation or groups), then `activation`: (C, H, W)
    samples, W of shape (out_channels, in_channels, kernel_size, kernel_size)."""
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    activation: str = "identity"

    def output_shape(self, shape):
        if len(shape) != 3 or shape[0] != self.in_channels:
            raise ValueError(f"{self} takes ({self.in_channels}, H, W) samples, not {shape}")
        return (self.out_channels,) + tuple(
            _windows(n, self.kernel_size, self.stride, self.padding, self) for n in shape[1:])

    parameter_names = ("weight", "bias")

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    def products(self, shape):
        """Multiplications of one sample's forward product: each output value is the dot
        product of a kernel_size^2 window of every input channel with its kernel."""
        _, h, w = self.output_shape(shape)
        return h * w * self.out_channels * self.in_channels * self.kernel_size ** 2

    def input_grad_products(self, shape):
        return self.products(shape)


@dataclass(frozen=True)
class LSTM:
    """torch.nn.LSTM(input_size, hidden_size, batch_first=True), one layer, one direction,
    both biases; its output is every step's h: (time, input_size) samples become
    (time, hidden_size).  Gates i, f, g, o in PyTorch's order down the rows of
    weight_ih (4*hidden, input) and weight_hh (4*hidden, hidden); zero initial state."""
    input_size: int
    hidden_size: int

    parameter_names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")

    def output_shape(self, shape):
        if len(shape) != 2 or shape[1] != self.input_size:
            raise ValueError(f"{self} takes (time, {self.input_size}) samples, not {shape}")
        return (shape[0], self.hidden_size)

    @property
    def parameter_shapes(self):
        rows = 4 * self.hidden_size
        return ((rows, self.input_size), (rows, self.hidden_size), (rows,), (rows,))

    def products(self, shape):
        """Multiplications of one sample's forward products: at each of its steps, the
        4*hidden gate pre-activations of x_t (input_size) and of h_{t-1} (hidden_size);
        the step at t = 0 is counted though h_{-1} = 0, as frameworks run it."""
        return shape[0] * 4 * self.hidden_size * (self.input_size + self.hidden_size)

    def input_grad_products(self, shape):
        """dX's share of the backward products (dZ.W_ih): the dh_{t-1} products (dZ.W_hh)
        carry the gradient through time and are needed even in the first layer."""
        return shape[0] * 4 * self.hidden_size * self.input_size


@dataclass(frozen=True)
class LastStep:
    """The output at the last time step (``output[:, -1]`` of a batch-first PyTorch
    output): (time, features) samples become (features,)."""

    def output_shape(self, shape):
        if len(shape) != 2:
            raise ValueError(f"{self} takes (time, features) samples, not {shape}")
        return shape[1:]


@dataclass(frozen=True)
class MaxPool2d:
    """torch.nn.MaxPool2d(kernel_size, stride) (no padding): the largest value of each
    channel's window; stride None is kernel_size, as in PyTorch."""
    kernel_size: int
    stride: int = None

    @property
    def step(self):
        return self.kernel_size if self.stride is None else self.stride

    def output_shape(self, shape):
        if len(shape) != 3:
            raise ValueError(f"{self} takes (C, H, W) samples, not {shape}")
        return shape[:1] + tuple(_windows(n, self.kernel_size, self.step, 0, self)
                                 for n in shape[1:])


@dataclass(frozen=True)
class Flatten:
    """torch.nn.Flatten(): (C, H, W) samples become rows of C*H*W features, channel by
    channel (PyTorch's order, so the next Dense's weights mean the same everywhere)."""

    def output_shape(self, shape):
        return (math.prod(shape),)


@dataclass(frozen=True)
class BatchNorm:
    """torch.nn.BatchNorm1d(num_features) in train mode (eps 1e-5, momentum 0.1, affine)."""
    num_features: int

    def output_shape(self, shape):
        _expect(self, shape, (self.num_features,))
        return shape


@dataclass(frozen=True)
class Activation:
    name: str

    def output_shape(self, shape):
        return shape


@dataclass(frozen=True)
class Residual:
    """``x + f(x)``, f being `layers` in order."""
    layers: tuple


# The specs with parameters (their `parameter_names`, PyTorch's) and matrix products.
WEIGHTED = (Dense, Conv2d, LSTM)


def _expect(spec, shape, wanted):
    if tuple(shape) != wanted:
        raise ValueError(f"{spec} takes samples of shape {wanted}, not {shape}")


def _windows(size, kernel, stride, padding, spec):
    """Windows along one dimension: PyTorch's floor((n + 2p - k) / s) + 1."""
    n = (size + 2 * padding - kernel) // stride + 1
    if n < 1:
        raise ValueError(f"{spec}: kernel {kernel} larger than its padded input "
                         f"{size + 2 * padding}")
    return n


EPS = 1e-5          # BatchNorm's eps and momentum, torch's defaults
MOMENTUM = 0.1


@dataclass(frozen=True)
class Config:
    name: str
    layers: tuple
    batch: int
    loss: str = "cross_entropy"
    lr: float = 0.01
    input_shape: tuple = None       # one sample's; None: (in_features,) of the first Dense

    def __post_init__(self):
        if self.input_shape is None:
            object.__setattr__(self, "input_shape", (self.layers[0].in_features,))
        self.traced()                   # a spec that does not fit its input fails here

    @property
    def classifier(self):
        return self.loss == "cross_entropy"

    @property
    def n_outputs(self):
        return self.layers[-1].out_features

    def traced(self):
        """[(spec, the shape of one sample it takes)] of every spec but Residual (whose
        layers are listed instead), in forward order."""
        seen = []
        _trace(self.layers, tuple(self.input_shape), seen)
        return seen

    def weighted_layers(self):
        """Every Dense, Conv2d and LSTM spec in forward order, those inside residual blocks
        included: the layers whose parameters networks.initial_weights draws."""
        return [spec for spec, _ in self.traced() if isinstance(spec, WEIGHTED)]

    def mlp_sizes(self):
        """(sizes, hidden activation) if the config is a plain stack of Dense layers whose
        hidden layers share one activation (what scikit-learn's MLP can express), else None."""
        if not all(isinstance(layer, Dense) for layer in self.layers):
            return None
        hidden = {layer.activation for layer in self.layers[:-1]}
        if len(hidden) > 1:
            return None
        sizes = self.input_shape + tuple(layer.out_features for layer in self.layers)
        return sizes, (hidden.pop() if hidden else "identity")

    def describe(self):
        """The architecture in one line, e.g. 784-512-BN-relu-512-BN-relu-10,
        1x28x28-conv6k5p2-relu-maxpool2-...-10 (conv<out channels>k<kernel>[s<stride>]
        [p<padding>], maxpool<kernel>[s<stride>]) or 28x28-lstm128-last-10 (time x
        features, lstm<hidden units>, last: the last step's output)."""
        return ("x".join(map(str, self.input_shape)) + "-"
                + "-".join(_describe(layer) for layer in self.layers))

    def gemm_flops(self):
        """Multiply-add flops (2 per multiply-add) of the matrix products in one step.

        Per weighted layer and batch B, the forward product costs 2*B*m, m being one
        sample's multiplications: in*out for a Dense (X.W^T), Ho*Wo*Cout*Cin*k*k for a
        Conv2d (each output value a dot product of Cin*k*k inputs with its kernel,
        whichever way a framework computes it), T*4H*(F+H) for an LSTM of F inputs and H
        units over T steps (x_t.W_ih^T and h_{t-1}.W_hh^T).  Backward costs as much again
        for dW and for dX, except that no framework here computes dX of the first layer
        (its input needs no gradient): the whole of it for a Dense or Conv2d, dZ.W_ih for
        an LSTM, whose dZ.W_hh carries the gradient back through time.  Element-wise work
        (bias, activations, gates, pooling, batch norm, loss, update) is not counted.
        """
        weighted = [(spec, shape) for spec, shape in self.traced() if isinstance(spec, WEIGHTED)]
        forward = sum(2 * self.batch * spec.products(shape) for spec, shape in weighted)
        first, shape = weighted[0]
        return 3 * forward - 2 * self.batch * first.input_grad_products(shape)


def _trace(layers, shape, seen):
    for layer in layers:
        if isinstance(layer, Residual):
            if _trace(layer.layers, shape, seen) != shape:
                raise ValueError(f"a residual block must keep its input's shape {shape}")
        else:
            seen.append((layer, shape))
            shape = layer.output_shape(shape)
    return shape


def _suffix(activation):
    return "" if activation in ("identity", "softmax") else f"-{activation}"


def _describe(layer):
    if isinstance(layer, Dense):
        return f"{layer.out_features}{_suffix(layer.activation)}"
    if isinstance(layer, Conv2d):
        stride = f"s{layer.stride}" if layer.stride != 1 else ""
        padding = f"p{layer.padding}" if layer.padding else ""
        return (f"conv{layer.out_channels}k{layer.kernel_size}{stride}{padding}"
                f"{_suffix(layer.activation)}")
    if isinstance(layer, MaxPool2d):
        stride = f"s{layer.step}" if layer.step != layer.kernel_size else ""
        return f"maxpool{layer.kernel_size}{stride}"
    if isinstance(layer, Flatten):
        return "flatten"
    if isinstance(layer, LSTM):
        return f"lstm{layer.hidden_size}"
    if isinstance(layer, LastStep):
        return "last"
    if isinstance(layer, BatchNorm):
        return "BN"
    if isinstance(layer, Activation):
        return layer.name
    if isinstance(layer, Residual):
        return "res(" + "-".join(_describe(inner) for inner in layer.layers) + ")"
    raise TypeError(f"no description for layer spec {layer!r}")


def mlp(name, sizes, batch, hidden="relu", output="softmax", loss="cross_entropy", lr=0.01):
    """A plain stack of Dense layers: `hidden` after each hidden layer, `output` last."""
    pairs = list(zip(sizes, sizes[1:]))
    layers = [Dense(a, b, hidden) for a, b in pairs[:-1]] + [Dense(*pairs[-1], output)]
    return Config(name, tuple(layers), batch, loss, lr)


def _residual_block(width):
    return Residual((Dense(width, width, "relu"), Dense(width, width)))


CONFIGS = {c.name: c for c in [
    mlp("xor", (2, 2, 1), 4, hidden="sigmoid", output="sigmoid", loss="mse", lr=0.5),
    mlp("digits", (64, 32, 10), 32),
    mlp("mnist-small", (784, 128, 10), 64),
    mlp("mnist-mid", (784, 512, 512, 10), 128),
    mlp("wide", (1024, 1024, 1024, 1024, 10), 256),
    mlp("huge", (4096, 4096, 4096, 10), 256),
    # Issue 8: batch norm between each hidden Dense and its relu ...
    Config("mnist-bn", (Dense(784, 512), BatchNorm(512), Activation("relu"),
                        Dense(512, 512), BatchNorm(512), Activation("relu"),
                        Dense(512, 10, "softmax")), 128),
    # ... and two residual blocks x + W2.relu(W1.x), each followed by a relu.
    Config("resnet", (Dense(784, 256, "relu"),
                      _residual_block(256), Activation("relu"),
                      _residual_block(256), Activation("relu"),
                      Dense(256, 10, "softmax")), 128),
    # Issue 16: convolutions (NCHW float32).  LeNet-5's layout on 28x28 grey images ...
    Config("lenet", (Conv2d(1, 6, 5, padding=2, activation="relu"), MaxPool2d(2),
                     Conv2d(6, 16, 5, activation="relu"), MaxPool2d(2), Flatten(),
                     Dense(400, 120, "relu"), Dense(120, 84, "relu"),
                     Dense(84, 10, "softmax")), 128, input_shape=(1, 28, 28)),
    # ... and a wider network on 3x32x32 (CIFAR-sized) images, whose convolutions dominate;
    # lr 1e-3, as at 0.01 (even 0.003) its loss on the random batch rises for the first steps.
    Config("cnn-wide", (Conv2d(3, 32, 3, padding=1, activation="relu"), MaxPool2d(2),
                        Conv2d(32, 64, 3, padding=1, activation="relu"), MaxPool2d(2),
                        Conv2d(64, 128, 3, padding=1, activation="relu"), MaxPool2d(2),
                        Flatten(), Dense(2048, 10, "softmax")), 64, lr=1e-3,
           input_shape=(3, 32, 32)),
    # Issue 18: an LSTM reading 28x28 images row by row (28 steps of 28 features), its
    # last output classified; and a longer, wider one.
    Config("lstm-mnist", (LSTM(28, 128), LastStep(), Dense(128, 10, "softmax")), 64,
           input_shape=(28, 28)),
    Config("lstm-big", (LSTM(64, 256), LastStep(), Dense(256, 10, "softmax")), 128,
           input_shape=(100, 64)),
]}

# Per-step targets from the speed issue, in microseconds (none yet for the issue-8 configs).
TARGET_US = {"xor": 3, "digits": 12, "mnist-small": 220, "mnist-mid": 3300, "wide": 31000,
             "huge": 300000}

# Matrix products timed against numpy.matmul: name -> (m, n, k, trans_a, trans_b); the
# forward shapes are X.W^T of the configs above, dW and dX their backward products.
MATMUL_SHAPES = {
    "2048^3": (2048, 2048, 2048, False, False),
    "1024^3": (1024, 1024, 1024, False, False),
    "X.W^T 256x1024->1024": (256, 1024, 1024, False, True),
    "X.W^T 128x784->512": (128, 512, 784, False, True),
    "X.W^T 64x784->128": (64, 128, 784, False, True),
    "dW 512x784, k=128": (512, 784, 128, True, False),
    "dX 128x784, k=512": (128, 784, 512, False, False),
}

@dataclass(frozen=True)
class Recipe:
    """What time_to_accuracy.py trains: `config` with Adam(lr=config.lr) on `dataset` (a
    name time_to_accuracy.load knows) for `epochs`."""
    dataset: str
    config: Config
    epochs: int


def small_cnn(name, batch, lr=1e-3):
    """Two conv-relu-pool stages and a hidden Dense on 28x28 grey images."""
    return Config(name, (Conv2d(1, 32, 3, padding=1, activation="relu"), MaxPool2d(2),
                         Conv2d(32, 64, 3, padding=1, activation="relu"), MaxPool2d(2),
                         Flatten(), Dense(3136, 128, "relu"), Dense(128, 10, "softmax")),
                  batch, lr=lr, input_shape=(1, 28, 28))


# Fashion-MNIST is the recipe of issue 10 (784-256-128-10, batch 128, Adam 1e-3, 8 epochs);
# the CNN rows are issue 16's, which asks for >= 0.91 on Fashion-MNIST, >= 0.97 on the
# MNIST sample.  Their epochs leave a margin: in one run of backprop's fit, the CNN had
# 0.911-0.914 after 4 to 7 epochs of Fashion-MNIST and 0.9195 after 8; 0.971-0.976 after 4
# to 10 epochs of the sample and 0.977-0.981 after 11 to 20.
RECIPES = {r.config.name: r for r in [
    Recipe("fashion-mnist", mlp("fashion-mnist", (784, 256, 128, 10), 128, lr=1e-3), 8),
    Recipe("digits", mlp("digits", (64, 128, 10), 32, lr=1e-3), 30),
    Recipe("mnist-sample", mlp("mnist-sample", (784, 256, 10), 64, lr=1e-3), 10),
    Recipe("fashion-mnist", small_cnn("fashion-mnist-cnn", 128), 8),
    Recipe("mnist-sample", small_cnn("mnist-sample-cnn", 64), 15),
    # Issue 18: the sample read row by row, 28 steps of 28 pixels, by an LSTM whose last
    # state is classified; the README's example (which reaches 0.93 in 10 epochs, there
    # with clip_grad_norm=1.0, which a recipe has no place for).
    Recipe("mnist-sample", Config("mnist-sample-lstm", (LSTM(28, 128), LastStep(),
                                                         Dense(128, 10, "softmax")),
                                  64, lr=1e-3, input_shape=(28, 28)), 10),
]}
