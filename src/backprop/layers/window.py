"""Window geometry shared by convolutions and pooling: PyTorch's arguments, checked, and
the output size they give."""
import numpy as np

from backprop.layers.base import describe


def sizes(owner, name, value, dims, low):
    """`value` (an int, or one per spatial dimension) as a tuple of `dims` ints >= low."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    if len(values) != dims or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                  or v < low for v in values):
        each = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{owner}: {name} must be {each} or {dims} of them, got {value!r:.80}")
    return tuple(int(v) for v in values)


def output_size(size, kernel, stride, padding, dilation):
    """The number of windows along one dimension (PyTorch's floor rule), <= 0 if none."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_sizes(owner, spatial, kernel, stride, padding, dilation):
    """The output's spatial sizes, or a ValueError when the (dilated) kernel is larger
    than the padded input."""
    out = tuple(output_size(*args) for args in zip(spatial, kernel, stride, padding, dilation))
    if min(out) < 1:
        reach = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
        padded = tuple(s + 2 * p for s, p in zip(spatial, padding))
        raise ValueError(f"has a kernel spanning {describe(reach)}, larger than its padded "
                         f"input {describe(padded)}")
    return out


def record(kernel, stride, padding, dilation, groups=1):
    """The Op window fields (a 1-D window is one row high)."""
    if len(kernel) == 1:
        kernel, stride, padding, dilation = ((1,) + kernel, (1,) + stride, (0,) + padding,
                                             (1,) + dilation)
    return {"window": {"kh": kernel[0], "kw": kernel[1], "sh": stride[0], "sw": stride[1],
                       "ph": padding[0], "pw": padding[1], "dh": dilation[0], "dw": dilation[1],
                       "groups": groups}}


def onnx_attributes(kernel, stride, padding, dilation=None):
    attributes = {"kernel_shape": list(kernel), "strides": list(stride),
                  "pads": list(padding) * 2}
    if dilation is not None:
        attributes["dilations"] = list(dilation)
    return attributes
