"""Residual blocks (kernels: _residual.pxd)."""
from backprop.layers.base import Layer, from_config, register, to_config, unsupported


@register
class Residual(Layer):
    """A residual (skip) connection, ``out = x + f(x)`` with f the given layers in order
    (He et al., 2016).  f must keep the shape of x.

    Parameters
    ----------
    *layers : Layer
        Any layers, residual blocks included.
    """

    kernel = "residual"
    torch_names = ("TorchResidual",)

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Residual needs at least one layer: out = x + f(x)")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Residual: layers[{i}] must be a backprop layer, got {layer!r}")
        self._layers = tuple(layers)
        # The shapes are checked where they are known: when a network is planned.
        from backprop.plan import check_chain
        check_chain(self._layers, "Residual", keep_shape=True)
        self._freeze()

    @property
    def layers(self):
        return list(self._layers)

    def fixes_input(self):
        return next((shape for shape in (layer.fixes_input() for layer in self._layers)
                     if shape is not None), None)

    def config(self):
        return {"layers": [to_config(layer) for layer in self._layers]}

    @classmethod
    def from_config(cls, config, depth):
        layers = config.get("layers")
        if set(config) != {"layers"} or not isinstance(layers, list):
            raise ValueError(f"not a Residual description: {config!r:.200}")
        return cls(*[from_config(inner, depth + 1) for inner in layers])

    def to_torch(self, nn, dtype, shape):
        from backprop.interop.pytorch import TorchResidual, modules_for
        return [TorchResidual(*modules_for(self._layers, dtype, shape))]

    @classmethod
    def from_torch(cls, module, path):
        raise unsupported(path, module, "is read by interop.pytorch itself")

    def to_onnx(self, graph, x, here, shape):
        body = graph.add_layers(self._layers, x, f"{here}.layers", shape)
        return graph.node("Add", [x, body], f"{here}.add")

    def __repr__(self):
        return "Residual(" + ", ".join(repr(layer) for layer in self._layers) + ")"
