"""The networks every benchmark trains, described once, framework-neutrally.

A config is a tuple of layer specs (the four dataclasses below) plus the batch size, the
loss and the SGD learning rate.  `networks.py` turns a config into a backprop network, a
PyTorch module, a JAX train step and a NumPy reference, so every framework trains exactly
the same network.  The last layer is a `Dense` whose activation pairs with the loss:
"softmax" with "cross_entropy" (the peers that fuse softmax into the loss drop it there),
"sigmoid" with "mse".
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Dense:
    """``activation(x @ W.T + b)``, W of shape (out_features, in_features)."""
    in_features: int
    out_features: int
    activation: str = "identity"


@dataclass(frozen=True)
class BatchNorm:
    """torch.nn.BatchNorm1d(num_features) in train mode (eps 1e-5, momentum 0.1, affine)."""
    num_features: int


@dataclass(frozen=True)
class Activation:
    name: str


@dataclass(frozen=True)
class Residual:
    """``x + f(x)``, f being `layers` in order."""
    layers: tuple


EPS = 1e-5          # BatchNorm's eps and momentum, torch's defaults
MOMENTUM = 0.1


@dataclass(frozen=True)
class Config:
    name: str
    layers: tuple
    batch: int
    loss: str = "cross_entropy"
    lr: float = 0.01

    @property
    def classifier(self):
        return self.loss == "cross_entropy"

    @property
    def n_inputs(self):
        return self.layers[0].in_features

    @property
    def n_outputs(self):
        return self.layers[-1].out_features

    def dense_layers(self):
        """Every Dense spec in forward order, those inside residual blocks included."""
        return list(_dense_in(self.layers))

    def mlp_sizes(self):
        """(sizes, hidden activation) if the config is a plain stack of Dense layers whose
        hidden layers share one activation (what scikit-learn's MLP can express), else None."""
        if not all(isinstance(layer, Dense) for layer in self.layers):
            return None
        hidden = {layer.activation for layer in self.layers[:-1]}
        if len(hidden) > 1:
            return None
        sizes = (self.n_inputs,) + tuple(layer.out_features for layer in self.layers)
        return sizes, (hidden.pop() if hidden else "identity")

    def describe(self):
        """The architecture in one line, e.g. 784-512-BN-relu-512-BN-relu-10."""
        return f"{self.n_inputs}-" + "-".join(_describe(layer) for layer in self.layers)

    def gemm_flops(self):
        """Multiply-add flops (2 per multiply-add) of the matrix products in one step.

        Per Dense layer of shape in->out and batch B: the forward product X.W^T costs
        2*B*in*out; backward costs as much again for dW = dZ^T.X and for dX = dZ.W, except
        that no framework here computes dX of the first layer (its input needs no gradient).
        Element-wise work (bias, activations, batch norm, loss, update) is not counted.
        """
        dense = self.dense_layers()
        per_layer = [2 * self.batch * d.in_features * d.out_features for d in dense]
        return 3 * sum(per_layer) - per_layer[0]


def _dense_in(layers):
    for layer in layers:
        if isinstance(layer, Dense):
            yield layer
        elif isinstance(layer, Residual):
            yield from _dense_in(layer.layers)


def _describe(layer):
    if isinstance(layer, Dense):
        act = "" if layer.activation in ("identity", "softmax") else f"-{layer.activation}"
        return f"{layer.out_features}{act}"
    if isinstance(layer, BatchNorm):
        return "BN"
    if isinstance(layer, Activation):
        return layer.name
    return "res(" + "-".join(_describe(inner) for inner in layer.layers) + ")"


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

# What time_to_accuracy.py trains, with Adam(lr=config.lr), per data set: (config, epochs).
# Fashion-MNIST is the recipe of issue 10 (784-256-128-10, batch 128, Adam 1e-3, 8 epochs).
RECIPES = {
    "fashion-mnist": (mlp("fashion-mnist", (784, 256, 128, 10), 128, lr=1e-3), 8),
    "digits": (mlp("digits", (64, 128, 10), 32, lr=1e-3), 30),
    "mnist-sample": (mlp("mnist-sample", (784, 256, 10), 64, lr=1e-3), 10),
}
