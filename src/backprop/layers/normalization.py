"""BatchNorm and LayerNorm (kernels: _batchnorm.pxd, _layernorm.pxd)."""
import numpy as np

from backprop.layers.base import (Layer, Param, copy_to_torch, describe, flag, number,
                                  positive_int, register, unsupported)


@register
class BatchNorm(Layer):
    """Batch normalization over channels, as ``torch.nn.BatchNorm1d`` and ``BatchNorm2d``
    (``backprop.BatchNorm1d`` and ``BatchNorm2d`` are this class).

    Takes samples of shape (C,), (C, L) or (C, H, W) with C = num_features.  In train mode
    each channel is normalised with the batch's mean and (biased) variance over every
    sample and position, ``y = weight * (x - mean) / sqrt(var + eps) + bias``, and the
    running statistics move towards the batch's: ``running = (1 - momentum) * running +
    momentum * batch`` (the running variance takes the unbiased variance).  In eval mode
    the running statistics are used instead.  A train-mode batch must hold more than one
    value per channel (one row of features is refused).

    Parameters
    ----------
    num_features : int, the channels C
    eps : float > 0, added to the variance
    momentum : float in [0, 1]
    affine : bool, whether to learn ``weight`` (starting at 1) and ``bias`` (at 0)

    Attributes (once part of a Network): ``weight``, ``bias`` (None unless affine),
    ``weight_grad``, ``bias_grad``, ``running_mean`` (starts at 0), ``running_var`` (at 1).
    """

    kernel = "batchnorm"
    kernel_params = ("weight", "bias")
    input_layout = "last"           # a channel's values form a column of the matrix view
    output_layout = "last"
    fuses_activation = True
    torch_names = ("BatchNorm1d", "BatchNorm2d")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        self.num_features = positive_int("BatchNorm", "num_features", num_features)
        self.eps = number("BatchNorm", "eps", eps, 0.0, low_open=True)
        if momentum is None:
            raise ValueError("BatchNorm: momentum=None (a cumulative average) is not supported; "
                             "give a number in [0, 1], e.g. 0.1")
        self.momentum = number("BatchNorm", "momentum", momentum, 0.0, 1.0)
        self.affine = flag("BatchNorm", "affine", affine)
        self.weight = self.bias = self.weight_grad = self.bias_grad = None
        self.running_mean = self.running_var = None
        self._freeze()

    def fixes_input(self):
        return (self.num_features,)

    def output_shape(self, shape):
        if shape[0] != self.num_features or len(shape) > 3:
            raise ValueError(f"takes samples of shape ({self.num_features},), "
                             f"({self.num_features}, L) or ({self.num_features}, H, W), but its "
                             f"input is {describe(shape)}")
        return shape

    def parameters(self):
        width = (self.num_features,)
        return [Param("weight", width, False), Param("bias", width, False)] if self.affine else []

    def initial_parameters(self, rng):
        if not self.affine:
            return {}
        return {"weight": np.ones(self.num_features), "bias": np.zeros(self.num_features)}

    def buffers(self):
        width = (self.num_features,)
        return [("running_mean", width, 0.0), ("running_var", width, 1.0)]

    def record(self, x):
        return {"eps": self.eps, "momentum": self.momentum}

    def saved(self, x):
        return (4 * self.num_features, 0)   # mean, 1/std and two sums per channel

    def min_train_batch(self, x):
        return 2 if x.positions == 1 else 1     # one value per channel has no variance

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine}

    def to_torch(self, nn, dtype, shape):
        cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
        return [copy_to_torch(cls(self.num_features, eps=self.eps, momentum=self.momentum,
                                  affine=self.affine, dtype=dtype), self)]

    @classmethod
    def from_torch(cls, module, path):
        if module.running_mean is None or module.momentum is None:
            raise unsupported(path, module, "is not supported: backprop's BatchNorm keeps "
                              "running statistics with a fixed momentum "
                              "(track_running_stats=True, momentum a number)")
        if module.affine and module.bias is None:
            raise unsupported(path, module, "is not supported: backprop's BatchNorm has a bias "
                              "whenever it is affine (bias=False is not available)")
        return cls(module.num_features, eps=module.eps, momentum=module.momentum,
                   affine=module.affine)

    def to_onnx(self, graph, x, here, shape):
        return graph.node("BatchNormalization",
                          [x, *graph.affine(self, self.num_features, here),
                           graph.tensor(f"{here}.running_mean", self.running_mean),
                           graph.tensor(f"{here}.running_var", self.running_var)],
                          f"{here}.batchnorm", epsilon=float(self.eps))


@register
class LayerNorm(Layer):
    """Layer normalization over the last dimension, as ``torch.nn.LayerNorm``:
    ``y = weight * (x - mean) / sqrt(var + eps) + bias`` with the mean and (biased)
    variance of each row of last-dimension values, the same in train and eval mode.

    Parameters
    ----------
    normalized_shape : int (or a 1-tuple), the size of the last dimension
    eps : float > 0
    elementwise_affine : bool, whether to learn ``weight`` (starting at 1) and ``bias`` (at 0)
    """

    kernel = "layernorm"
    kernel_params = ("weight", "bias")
    input_layout = "first"          # the last dimension's values are adjacent
    output_layout = "first"
    fuses_activation = True
    torch_names = ("LayerNorm",)

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError("LayerNorm: only the last dimension can be normalised "
                                 f"(normalized_shape of length 1), got {normalized_shape!r}")
            normalized_shape = normalized_shape[0]
        self.normalized_shape = positive_int("LayerNorm", "normalized_shape", normalized_shape)
        self.eps = number("LayerNorm", "eps", eps, 0.0, low_open=True)
        self.elementwise_affine = flag("LayerNorm", "elementwise_affine", elementwise_affine)
        self.weight = self.bias = self.weight_grad = self.bias_grad = None
        self._freeze()

    def fixes_input(self):
        return (self.normalized_shape,)

    def output_shape(self, shape):
        if shape[-1] != self.normalized_shape:
            raise ValueError(f"normalises a last dimension of {self.normalized_shape}, but its "
                             f"input is {describe(shape)}")
        return shape

    def parameters(self):
        width = (self.normalized_shape,)
        return ([Param("weight", width, False), Param("bias", width, False)]
                if self.elementwise_affine else [])

    def initial_parameters(self, rng):
        if not self.elementwise_affine:
            return {}
        return {"weight": np.ones(self.normalized_shape), "bias": np.zeros(self.normalized_shape)}

    def record(self, x):
        return {"eps": self.eps}

    def saved(self, x):
        # Each row's mean and 1/std, and two sums per feature for the parameter gradients.
        return (2 * self.normalized_shape, 2 * x.rows)

    def config(self):
        return {"normalized_shape": self.normalized_shape, "eps": self.eps,
                "elementwise_affine": self.elementwise_affine}

    def to_torch(self, nn, dtype, shape):
        return [copy_to_torch(nn.LayerNorm(self.normalized_shape, eps=self.eps,
                                           elementwise_affine=self.elementwise_affine,
                                           dtype=dtype), self)]

    @classmethod
    def from_torch(cls, module, path):
        if len(module.normalized_shape) != 1:
            raise unsupported(path, module, "is not supported: backprop's LayerNorm normalizes "
                              "one dimension (the last)")
        if module.elementwise_affine and module.bias is None:
            raise unsupported(path, module, "is not supported: backprop's LayerNorm has a bias "
                              "whenever it is elementwise_affine (bias=False is not available)")
        return cls(module.normalized_shape[0], eps=module.eps,
                   elementwise_affine=module.elementwise_affine)

    def to_onnx(self, graph, x, here, shape):
        return graph.node("LayerNormalization",
                          [x, *graph.affine(self, self.normalized_shape, here)],
                          f"{here}.layernorm", axis=-1, epsilon=float(self.eps))
