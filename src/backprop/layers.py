"""Layers: the description of one step of the network, and its initialisation."""
import numpy as np

from backprop._core import ACTIVATIONS

# Activations whose derivative is 1 (or close) for positive inputs keep the signal's
# variance when weights have variance 2/fan_in (He et al., 2015); the others are
# initialised for variance 2/(fan_in + fan_out) (Glorot & Bengio, 2010).
RELU_LIKE = {"relu", "leaky_relu", "elu", "gelu"}
INITS = ("he", "xavier", "zeros")


class Dense:
    """A fully connected layer: ``a = activation(x @ weight.T + bias)``.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of each input and output row.
    activation : str or None
        One of ``backprop.ACTIVATIONS``; None means identity.
    bias : bool
        Whether the layer adds a learned bias.
    init : {"he", "xavier", "zeros"} or None
        Weight initialisation; None picks He (normal, std sqrt(2/fan_in)) for relu-like
        activations and Xavier/Glorot (uniform, limit sqrt(6/(fan_in+fan_out))) otherwise.
        Biases start at zero.

    Attributes (once part of a Network)
    -----------------------------------
    weight : ndarray of shape (out_features, in_features), like ``torch.nn.Linear``
    bias : ndarray of shape (out_features,) or None
    weight_grad, bias_grad : the matching gradients
    All four are views into the network's flat buffers: writing to them changes the network.
    """

    def __init__(self, in_features, out_features, activation=None, bias=True, init=None):
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"Dense: {name} must be a positive integer, got {size!r}")
        activation = "identity" if activation is None else activation
        if activation not in ACTIVATIONS:
            raise ValueError(f"Dense: unknown activation {activation!r}; "
                             f"choose one of {sorted(ACTIVATIONS)}")
        if init is not None and init not in INITS:
            raise ValueError(f"Dense: unknown init {init!r}; choose one of {list(INITS)}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.activation = activation
        self.use_bias = bool(bias)
        self.init = init or ("he" if activation in RELU_LIKE else "xavier")
        self.weight = self.bias = self.weight_grad = self.bias_grad = None

    @property
    def n_params(self):
        return self.out_features * (self.in_features + self.use_bias)

    def initial_weights(self, rng):
        """A freshly drawn weight matrix of shape (out_features, in_features), float64."""
        shape = (self.out_features, self.in_features)
        if self.init == "he":
            return rng.normal(0.0, np.sqrt(2.0 / self.in_features), size=shape)
        if self.init == "xavier":
            limit = np.sqrt(6.0 / (self.in_features + self.out_features))
            return rng.uniform(-limit, limit, size=shape)
        return np.zeros(shape)

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "activation": self.activation, "bias": self.use_bias, "init": self.init}

    def __repr__(self):
        return (f"Dense({self.in_features}, {self.out_features}, "
                f"activation={self.activation!r}, bias={self.use_bias})")
