"""Layers computing each value on its own: Activation and Dropout (kernels: the identity's
in _residual.pxd, with the tape applying the activation; _dropout.pxd)."""
from backprop.layers.base import Layer, activation_name, number, register

# backprop's activations are PyTorch's modules with their default options, and ONNX's
# operators (see interop/onnx_export.py for GELU and softplus).
TORCH_ACTIVATIONS = {
    "identity": ("Identity", {}), "sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}),
    "relu": ("ReLU", {}), "leaky_relu": ("LeakyReLU", {"negative_slope": 0.01}),
    "elu": ("ELU", {"alpha": 1.0}), "gelu": ("GELU", {"approximate": "none"}),
    "softplus": ("Softplus", {"beta": 1.0, "threshold": 20.0}), "softmax": ("Softmax", {"dim": 1}),
}


def torch_activation(nn, name):
    """The torch module computing backprop's activation `name`."""
    cls, options = TORCH_ACTIVATIONS[name]
    return getattr(nn, cls)(**options)


@register
class Activation(Layer):
    """An activation on its own, ``out = name(x)`` (after a BatchNorm, a Residual, ...):
    any of ``backprop.ACTIVATIONS``, elementwise on a sample of any shape (softmax: over
    the features of a (features,) sample).  Right after a layer without an activation of
    its own the network applies it in that layer's pass."""

    kernel = "activation"
    torch_names = tuple(cls for cls, _ in TORCH_ACTIVATIONS.values() if cls != "Identity")

    def __init__(self, name):
        self.name = activation_name("Activation", name)
        self._freeze()

    def record(self, x):
        return {"activation": self.name}

    def config(self):
        return {"name": self.name}

    def to_torch(self, nn, dtype, shape):
        return [torch_activation(nn, self.name)]

    @classmethod
    def from_torch(cls, module, path):
        from backprop.interop.pytorch import activation_name_of
        return cls(activation_name_of(path, module))

    def to_onnx(self, graph, x, here, shape):
        return graph.activation(self.name, x, here)

    def __repr__(self):
        return f"Activation({self.name!r})"


@register
class Dropout(Layer):
    """Inverted dropout, as ``torch.nn.Dropout``: in train mode each value is zeroed with
    probability ``p`` and the others are scaled by ``1 / (1 - p)``; in eval mode the layer
    is the identity.  Every train-mode forward pass draws a fresh mask from a generator
    keyed by the network's seed, the layer, the pass and the element's place in the batch
    (see _dropout.pxd), so training is reproducible and the same for any thread count."""

    kernel = "dropout"
    torch_names = ("Dropout",)

    def __init__(self, p=0.5):
        self.p = number("Dropout", "p", p, 0.0, 1.0, high_open=True)
        self._freeze()

    def record(self, x):
        return {"p": self.p}

    def config(self):
        return {"p": self.p}

    def to_torch(self, nn, dtype, shape):
        return [nn.Dropout(self.p)]

    @classmethod
    def from_torch(cls, module, path):
        return cls(module.p)

    def to_onnx(self, graph, x, here, shape):
        return x        # inverted dropout is the identity at inference
