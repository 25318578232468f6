"""Dense: the fully connected layer (kernels: _dense.pxd)."""
import numpy as np

from backprop.layers.base import (INITS, RELU_LIKE, Layer, Param, activation_name, copy_to_torch,
                                  describe, flag, positive_int, register)


@register
class Dense(Layer):
    """A fully connected layer: ``out = activation(x @ weight.T + bias)``.

    Like ``torch.nn.Linear`` it acts on the last dimension: a sample of shape
    (..., in_features) becomes (..., out_features).

    Parameters
    ----------
    in_features, out_features : int
        Sizes of each input and output row.
    activation : str or None
        One of ``backprop.ACTIVATIONS``, applied in the same pass; None means identity.
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
    """

    kernel = "dense"
    kernel_params = ("weight", "bias")
    input_layout = "first"          # the last dimension's values are adjacent
    output_layout = "first"
    fuses_activation = True
    takes_activation = True
    torch_names = ("Linear",)

    def __init__(self, in_features, out_features, activation=None, bias=True, init=None):
        self.in_features = positive_int("Dense", "in_features", in_features)
        self.out_features = positive_int("Dense", "out_features", out_features)
        self.activation = activation_name("Dense", activation)
        self.use_bias = flag("Dense", "bias", bias)
        if init is not None and init not in INITS:
            raise ValueError(f"Dense: unknown init {init!r}; choose one of {list(INITS)}")
        self.init = init or ("he" if self.activation in RELU_LIKE else "xavier")
        self.weight = self.bias = self.weight_grad = self.bias_grad = None
        self._freeze()

    def fixes_input(self):
        return (self.in_features,)

    def output_shape(self, shape):
        if shape[-1] != self.in_features:
            raise ValueError(f"takes samples whose last dimension is {self.in_features}, but "
                             f"its input is {describe(shape)}")
        return shape[:-1] + (self.out_features,)

    def parameters(self):
        shapes = [Param("weight", (self.out_features, self.in_features), True)]
        return shapes + [Param("bias", (self.out_features,), False)] if self.use_bias else shapes

    def initial_parameters(self, rng):
        shape = (self.out_features, self.in_features)
        if self.init == "he":
            weight = rng.normal(0.0, np.sqrt(2.0 / self.in_features), size=shape)
        elif self.init == "xavier":
            limit = np.sqrt(6.0 / (self.in_features + self.out_features))
            weight = rng.uniform(-limit, limit, size=shape)
        else:
            weight = np.zeros(shape)
        values = {"weight": weight}
        if self.use_bias:
            values["bias"] = np.zeros(self.out_features)
        return values

    def record(self, x):
        return {"activation": self.activation}

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "activation": self.activation, "bias": self.use_bias, "init": self.init}

    def to_torch(self, nn, dtype, shape):
        # skip_init: no draw from torch's random generator for weights replaced anyway
        return [copy_to_torch(nn.utils.skip_init(nn.Linear, self.in_features, self.out_features,
                                                 bias=self.use_bias, dtype=dtype), self)]

    @classmethod
    def from_torch(cls, module, path, activation=None):
        return cls(module.in_features, module.out_features, activation=activation,
                   bias=module.bias is not None)

    def to_onnx(self, graph, x, here, shape):
        if len(shape) == 1:
            inputs = [x, graph.tensor(f"{here}.weight", self.weight)]      # (out, in)
            if self.use_bias:
                inputs.append(graph.tensor(f"{here}.bias", self.bias))
            return graph.node("Gemm", inputs, f"{here}.gemm", transB=1)
        # Gemm is 2-D only: the last dimension of a longer sample through MatMul.
        x = graph.node("MatMul", [x, graph.tensor(f"{here}.weight_t", self.weight.T)],
                       f"{here}.matmul")
        if self.use_bias:
            x = graph.node("Add", [x, graph.tensor(f"{here}.bias", self.bias)], f"{here}.bias_add")
        return x

    def __repr__(self):
        return (f"Dense({self.in_features}, {self.out_features}, "
                f"activation={self.activation!r}, bias={self.use_bias})")
