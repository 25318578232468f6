"""Conv1d and Conv2d (kernels: _conv.pxd)."""
import math

import numpy as np

from backprop.layers import window

# The most values one sample's im2col matrix may hold: the kernels size chunks of it in C
# (bytes per sample times samples), which must not overflow (a sample holds at most
# plan.MAX_SAMPLE_VALUES values anywhere; this is the same bound for the column matrix).
MAX_COLUMNS = 1 << 40
from backprop.layers.base import (INITS, RELU_LIKE, Layer, Param, activation_name, copy_to_torch,
                                  describe, flag, positive_int, register, unsupported)


class Convolution(Layer):
    """What Conv1d and Conv2d share; `dims` is the number of spatial dimensions."""

    dims = None
    kernel = "conv"
    kernel_params = ("weight", "bias")
    input_layout = "last"           # a pixel's channels adjacent: im2col copies runs of them
    output_layout = "last"          # and the output is one product
    fuses_activation = True
    takes_activation = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, activation=None, init=None):
        name = type(self).__name__
        self.in_channels = positive_int(name, "in_channels", in_channels)
        self.out_channels = positive_int(name, "out_channels", out_channels)
        self.groups = positive_int(name, "groups", groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{name}: in_channels ({self.in_channels}) and out_channels "
                             f"({self.out_channels}) must both divide by groups ({self.groups})")
        self.kernel_size = window.sizes(name, "kernel_size", kernel_size, self.dims, 1)
        self.stride = window.sizes(name, "stride", stride, self.dims, 1)
        self.dilation = window.sizes(name, "dilation", dilation, self.dims, 1)
        self.padding = self._padding(name, padding)
        self.activation = activation_name(name, activation)
        self.use_bias = flag(name, "bias", bias)
        if init is not None and init not in INITS:
            raise ValueError(f"{name}: unknown init {init!r}; choose one of {list(INITS)}")
        self.init = init or ("he" if self.activation in RELU_LIKE else "xavier")
        self.weight = self.bias = self.weight_grad = self.bias_grad = None
        self._freeze()

    def _padding(self, name, padding):
        # PyTorch's strings: "valid" is no padding, "same" keeps the size at stride 1
        # (symmetric padding only: an even dilated kernel would need one side more).
        if padding == "valid":
            return (0,) * self.dims
        if padding == "same":
            reach = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
            if any(self.stride[i] != 1 or reach[i] % 2 for i in range(self.dims)):
                raise ValueError(f"{name}: padding='same' needs stride 1 and an odd (dilated) "
                                 f"kernel size, got kernel_size={self.kernel_size}, "
                                 f"stride={self.stride}, dilation={self.dilation}")
            return tuple(r // 2 for r in reach)
        return window.sizes(name, "padding", padding, self.dims, 0)

    @property
    def fan_in(self):
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    def output_shape(self, shape):
        if len(shape) != 1 + self.dims or shape[0] != self.in_channels:
            wanted = ("L",) if self.dims == 1 else ("H", "W")
            raise ValueError(f"takes samples of shape ({self.in_channels}, {', '.join(wanted)}), "
                             f"but its input is {describe(shape)}")
        return (self.out_channels,) + window.output_sizes(
            "", shape[1:], self.kernel_size, self.stride, self.padding, self.dilation)

    def parameters(self):
        shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        params = [Param("weight", shape, True)]
        return params + [Param("bias", (self.out_channels,), False)] if self.use_bias else params

    def initial_parameters(self, rng):
        # As Dense: He for relu-like activations, Glorot otherwise, over the receptive field.
        shape = self.parameters()[0].shape
        fan_out = self.out_channels // self.groups * math.prod(self.kernel_size)
        if self.init == "he":
            weight = rng.normal(0.0, np.sqrt(2.0 / self.fan_in), size=shape)
        elif self.init == "xavier":
            limit = np.sqrt(6.0 / (self.fan_in + fan_out))
            weight = rng.uniform(-limit, limit, size=shape)
        else:
            weight = np.zeros(shape)
        values = {"weight": weight}
        if self.use_bias:
            values["bias"] = np.zeros(self.out_channels)
        return values

    def record(self, x):
        out = self.output_shape(x.shape)
        columns = math.prod(out[1:]) * self.fan_in     # one sample's im2col matrix
        if columns > MAX_COLUMNS:
            raise ValueError(f"{type(self).__name__}: one sample's column matrix (output pixels x "
                             f"in_channels/groups x kernel positions) would hold {columns:,} "
                             f"values, more than {MAX_COLUMNS:,}")
        return {"activation": self.activation,
                **window.record(self.kernel_size, self.stride, self.padding, self.dilation,
                                self.groups)}

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "bias": self.use_bias, "activation": self.activation,
                "init": self.init}

    def to_torch(self, nn, dtype, shape):
        module = getattr(nn, type(self).__name__)(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.use_bias, dtype=dtype)
        return [copy_to_torch(module, self)]

    @classmethod
    def from_torch(cls, module, path, activation=None):
        if module.padding_mode != "zeros":
            raise unsupported(path, module, "is not supported: backprop pads with zeros "
                              "(padding_mode='zeros')")
        return cls(module.in_channels, module.out_channels, module.kernel_size,
                   stride=module.stride, padding=module.padding, dilation=module.dilation,
                   groups=module.groups, bias=module.bias is not None, activation=activation)

    def to_onnx(self, graph, x, here, shape):
        inputs = [x, graph.tensor(f"{here}.weight", self.weight)]
        if self.use_bias:
            inputs.append(graph.tensor(f"{here}.bias", self.bias))
        return graph.node("Conv", inputs, f"{here}.conv", group=self.groups,
                          **window.onnx_attributes(self.kernel_size, self.stride, self.padding,
                                                   self.dilation))

    def __repr__(self):
        options = ", ".join(f"{key}={value}" for key, value in (
            ("stride", self.stride), ("padding", self.padding), ("dilation", self.dilation),
            ("groups", self.groups)) if value not in ((1,) * self.dims, (0,) * self.dims, 1))
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}{', ' + options if options else ''}, "
                f"activation={self.activation!r}, bias={self.use_bias})")


@register
class Conv2d(Convolution):
    """A 2-D convolution, as ``torch.nn.Conv2d`` (a cross-correlation), followed by an
    activation applied in the same pass.

    Takes samples of shape (in_channels, H, W) and gives (out_channels, H_out, W_out)
    with ``H_out = floor((H + 2 padding - dilation (kernel - 1) - 1) / stride) + 1``.

    Parameters
    ----------
    in_channels, out_channels : int
        Both must divide by `groups`.
    kernel_size, stride, padding, dilation : int or (int, int)
        PyTorch's; padding may also be "valid" (0) or "same" (stride 1, odd kernel).
    groups : int
        Group g's output channels see only group g's input channels (in_channels = groups
        = out_channels: a depthwise convolution).
    bias : bool
    activation : str or None
        One of ``backprop.ACTIVATIONS``; None means identity.
    init : {"he", "xavier", "zeros"} or None
        As for Dense, with fan_in = in_channels / groups * kh * kw.

    Attributes (once part of a Network)
    -----------------------------------
    weight : ndarray of shape (out_channels, in_channels / groups, kh, kw), as PyTorch's
    bias : ndarray of shape (out_channels,) or None
    weight_grad, bias_grad
    """

    dims = 2
    torch_names = ("Conv2d",)


@register
class Conv1d(Convolution):
    """A 1-D convolution, as ``torch.nn.Conv1d``: samples (in_channels, L) become
    (out_channels, L_out).  Arguments and attributes as for ``Conv2d``, with one spatial
    dimension: weight of shape (out_channels, in_channels / groups, k)."""

    dims = 1
    torch_names = ("Conv1d",)
