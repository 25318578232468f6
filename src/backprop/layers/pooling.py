"""Pooling: MaxPool1d/2d, AvgPool1d/2d, AdaptiveAvgPool2d(1), GlobalAvgPool (kernels:
_pool.pxd)."""
import math

from backprop.layers import window
from backprop.layers.base import Layer, describe, flag, register, unsupported


class Pooling(Layer):
    """What the windowed poolings share; `dims` is the number of spatial dimensions."""

    dims = None
    input_layout = output_layout = "last"     # a pixel's channels adjacent
    with_dilation = True

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1):
        name = type(self).__name__
        self.kernel_size = window.sizes(name, "kernel_size", kernel_size, self.dims, 1)
        # PyTorch's default stride is the kernel size: windows side by side.
        self.stride = (self.kernel_size if stride is None
                       else window.sizes(name, "stride", stride, self.dims, 1))
        self.padding = window.sizes(name, "padding", padding, self.dims, 0)
        self.dilation = window.sizes(name, "dilation", dilation, self.dims, 1)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            # So that every window holds at least one input value (PyTorch's rule).
            raise ValueError(f"{name}: padding {self.padding} must be at most half the "
                             f"kernel size {self.kernel_size}")

    def output_shape(self, shape):
        if len(shape) != 1 + self.dims:
            wanted = ("L",) if self.dims == 1 else ("H", "W")
            raise ValueError(f"takes samples of shape (C, {', '.join(wanted)}), but its input "
                             f"is {describe(shape)}")
        return (shape[0],) + window.output_sizes(
            "", shape[1:], self.kernel_size, self.stride, self.padding, self.dilation)

    def record(self, x):
        return window.record(self.kernel_size, self.stride, self.padding, self.dilation)

    def config(self):
        config = {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                  "padding": list(self.padding)}
        if self.with_dilation:
            config["dilation"] = list(self.dilation)
        return config

    def _torch_options(self):
        options = {"stride": self.stride, "padding": self.padding}
        if self.with_dilation:
            options["dilation"] = self.dilation
        return options

    def to_torch(self, nn, dtype, shape):
        return [getattr(nn, type(self).__name__)(self.kernel_size, **self._torch_options())]

    @classmethod
    def _check_torch(cls, module, path):
        if module.ceil_mode:
            raise unsupported(path, module, "is not supported: backprop's pooling windows "
                              "lie inside the padded input (ceil_mode=False)")

    def __repr__(self):
        args = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}"
                         for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class MaxPooling(Pooling):
    kernel = "max_pool"

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1):
        super().__init__(kernel_size, stride, padding, dilation)
        self._freeze()

    def saved(self, x):
        # Where each output value's maximum was: one int64 (a double's room) per value.
        return (0, math.prod(self.output_shape(x.shape)))

    @classmethod
    def from_torch(cls, module, path):
        cls._check_torch(module, path)
        if module.return_indices:
            raise unsupported(path, module, "is not supported: return_indices=True")
        return cls(module.kernel_size, module.stride, module.padding, module.dilation)

    def to_onnx(self, graph, x, here, shape):
        return graph.node("MaxPool", [x], f"{here}.maxpool",
                          **window.onnx_attributes(self.kernel_size, self.stride, self.padding,
                                                   self.dilation))


class AvgPooling(Pooling):
    kernel = "avg_pool"
    with_dilation = False

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = flag(type(self).__name__, "count_include_pad",
                                      count_include_pad)
        self._freeze()

    def record(self, x):
        return {**super().record(x), "include_pad": self.count_include_pad}

    def config(self):
        return {**super().config(), "count_include_pad": self.count_include_pad}

    def _torch_options(self):
        return {**super()._torch_options(), "count_include_pad": self.count_include_pad}

    @classmethod
    def from_torch(cls, module, path):
        cls._check_torch(module, path)
        if getattr(module, "divisor_override", None) is not None:
            raise unsupported(path, module, "is not supported: divisor_override")
        return cls(module.kernel_size, module.stride, module.padding, module.count_include_pad)

    def to_onnx(self, graph, x, here, shape):
        return graph.node("AveragePool", [x], f"{here}.avgpool",
                          count_include_pad=int(self.count_include_pad),
                          **window.onnx_attributes(self.kernel_size, self.stride, self.padding))


@register
class MaxPool2d(MaxPooling):
    """Max pooling over (C, H, W) samples, as ``torch.nn.MaxPool2d``: each output value is
    the largest of its channel's kernel_size window (windows stride apart, the input padded
    with -inf, dilation spacing a window's taps).  stride defaults to kernel_size; padding
    is at most half the kernel.  The gradient goes to the first largest value of each
    window."""

    dims = 2
    torch_names = ("MaxPool2d",)


@register
class MaxPool1d(MaxPooling):
    """Max pooling over (C, L) samples, as ``torch.nn.MaxPool1d`` (see MaxPool2d)."""

    dims = 1
    torch_names = ("MaxPool1d",)


@register
class AvgPool2d(AvgPooling):
    """Average pooling over (C, H, W) samples, as ``torch.nn.AvgPool2d``: each output value
    is the mean of its channel's window, zero padding counted in the divisor unless
    count_include_pad=False.  stride defaults to kernel_size."""

    dims = 2
    torch_names = ("AvgPool2d",)


@register
class AvgPool1d(AvgPooling):
    """Average pooling over (C, L) samples, as ``torch.nn.AvgPool1d`` (see AvgPool2d)."""

    dims = 1
    torch_names = ("AvgPool1d",)


class GlobalPooling(Layer):
    """The mean of each channel over all positions: one window the size of the sample."""

    kernel = "avg_pool"
    input_layout = output_layout = "last"

    def __init__(self):
        self._freeze()

    def _check(self, shape):
        if len(shape) < 2:
            raise ValueError(f"takes samples of shape (C, L) or (C, H, W), but its input is "
                             f"{describe(shape)}")

    def record(self, x):
        spatial = (x.shape[1:] if len(x.shape) == 3 else (x.shape[1],))
        ones = (1,) * len(spatial)
        return {**window.record(spatial, ones, (0,) * len(spatial), ones),
                "include_pad": True}


@register
class AdaptiveAvgPool2d(GlobalPooling):
    """``torch.nn.AdaptiveAvgPool2d(1)``: (C, H, W) samples become (C, 1, 1), each channel's
    mean.  Only output_size=1 is supported."""

    torch_names = ("AdaptiveAvgPool2d",)

    def __init__(self, output_size=1):
        if output_size not in (1, (1, 1), [1, 1]):
            raise ValueError(f"AdaptiveAvgPool2d: only output_size=1 is supported, got "
                             f"{output_size!r}")
        self.output_size = 1
        super().__init__()

    def output_shape(self, shape):
        if len(shape) != 3:
            raise ValueError(f"takes samples of shape (C, H, W), but its input is {describe(shape)}")
        return (shape[0], 1, 1)

    def config(self):
        return {"output_size": 1}

    def to_torch(self, nn, dtype, shape):
        return [nn.AdaptiveAvgPool2d(1)]

    @classmethod
    def from_torch(cls, module, path):
        if module.output_size not in (1, (1, 1)):
            raise unsupported(path, module, "is not supported: only output_size=1")
        return cls()

    def to_onnx(self, graph, x, here, shape):
        return graph.node("GlobalAveragePool", [x], f"{here}.globalavgpool")

    def __repr__(self):
        return "AdaptiveAvgPool2d(1)"


@register
class GlobalAvgPool(GlobalPooling):
    """Keras's GlobalAveragePooling: (C, L) or (C, H, W) samples become (C,), each channel's
    mean (``AdaptiveAvgPool1d(1)`` or ``AdaptiveAvgPool2d(1)`` followed by ``Flatten()`` in
    PyTorch, which to_torch writes and from_torch reads as this layer)."""

    torch_runs = (("AdaptiveAvgPool1d", "Flatten"), ("AdaptiveAvgPool2d", "Flatten"))

    def output_shape(self, shape):
        self._check(shape)
        return (shape[0],)

    def config(self):
        return {}

    def to_torch(self, nn, dtype, shape):
        pool = nn.AdaptiveAvgPool2d(1) if len(shape) == 3 else nn.AdaptiveAvgPool1d(1)
        return [pool, nn.Flatten()]

    @classmethod
    def from_torch(cls, module, path):
        raise unsupported(path, module, "is read as AdaptiveAvgPool2d")

    @classmethod
    def from_torch_run(cls, modules, path):
        pool, flatten = modules
        one = pool.output_size in (1, (1,), (1, 1))
        return cls() if one and (flatten.start_dim, flatten.end_dim) == (1, -1) else None

    def to_onnx(self, graph, x, here, shape):
        pooled = graph.node("GlobalAveragePool", [x], f"{here}.globalavgpool")
        return graph.node("Flatten", [pooled], f"{here}.flatten", axis=1)

    def __repr__(self):
        return "GlobalAvgPool()"
