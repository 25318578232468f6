"""Flatten (kernel: _relayout.pxd)."""
import math

from backprop.layers.base import Layer, register, unsupported


@register
class Flatten(Layer):
    """Each sample as one row of features, in PyTorch's order (``torch.nn.Flatten()``):
    (C, H, W) becomes (C * H * W,), channel by channel.  It joins convolutional layers to
    Dense ones."""

    kernel = "relayout"
    output_layout = "first"
    torch_names = ("Flatten",)

    def __init__(self):
        self._freeze()

    def output_shape(self, shape):
        return (math.prod(shape),)

    def config(self):
        return {}

    def to_torch(self, nn, dtype, shape):
        return [nn.Flatten()]

    @classmethod
    def from_torch(cls, module, path):
        if module.start_dim != 1 or module.end_dim != -1:
            raise unsupported(path, module, "is not supported: backprop's Flatten keeps the "
                              "batch and joins every other dimension (start_dim=1, end_dim=-1)")
        return cls()

    def to_onnx(self, graph, x, here, shape):
        return graph.node("Flatten", [x], f"{here}.flatten", axis=1)

    def __repr__(self):
        return "Flatten()"
