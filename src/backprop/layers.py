"""Layers: what each step of a network computes.

A layer declares and the network plans (see ``plan.py``).  Each class states

* ``kind``: which family of compiled kernels runs it (``_dense.pxd``, ``_batchnorm.pxd``,
  ...);
* ``parameters()``: its trained arrays, with their shapes and first values;
* ``buffers()``: arrays it keeps but the optimizer never touches (running statistics);
* ``settings()``: the numbers its kernels need (eps, momentum, p);
* ``config()``: its constructor arguments, which is all a checkpoint stores about it.

Once a layer is part of a Network, each parameter, its gradient and each buffer is an
attribute that views the network's flat arrays (``dense.weight``, ``dense.weight_grad``,
``bn.running_mean``): writing into them changes the network.  A layer's configuration
is fixed at construction, so what is saved is what runs; a layer belongs to one network
(``copy.deepcopy(layer)`` makes a free copy with the same weights).
"""
import weakref

import numpy as np

from backprop._core import ACTIVATIONS

# Activations whose derivative is 1 (or close) for positive inputs keep the signal's
# variance when weights have variance 2/fan_in (He et al., 2015); the others are
# initialised for variance 2/(fan_in + fan_out) (Glorot & Bengio, 2010).
RELU_LIKE = {"relu", "leaky_relu", "elu", "gelu"}
INITS = ("he", "xavier", "zeros")


def _positive_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


def _number(owner, name, value, low, high=None, *, low_open=False, high_open=False):
    """`value` as a float in the given interval, or a ValueError naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not np.isfinite(number) \
            or (number <= low if low_open else number < low) \
            or (high is not None and (number >= high if high_open else number > high)):
        interval = (("(" if low_open else "[") + f"{low}, "
                    + (f"{high}" + (")" if high_open else "]") if high is not None else "inf)"))
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value!r}")
    return number


def _activation(owner, name):
    name = "identity" if name is None else name
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}: unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return name


class Layer:
    """What every layer has: a tape kind, parameters, buffers, settings and a config.

    Subclasses set their configuration in ``__init__`` and end it with ``self._freeze()``;
    after that every attribute is read-only."""

    kind = None              # the tape record kind, a key of backprop._core.OP_KINDS
    n_in = n_out = None      # widths; None for layers that keep any width

    def parameters(self):
        """[(name, shape)] of the trained arrays, in the flat buffer's order."""
        return []

    def initial_parameters(self, rng):
        """{name: float64 array} of first values, drawn from `rng` where random."""
        return {}

    def buffers(self):
        """[(name, shape, first value)] of the arrays kept but not trained."""
        return []

    def settings(self):
        """{"activation", "eps", "momentum", "p"}: what the kernels read, where it applies."""
        return {}

    def config(self):
        """The constructor arguments, as plain data."""
        raise NotImplementedError

    # ---- read-only configuration, ownership and copies

    def _freeze(self):
        object.__setattr__(self, "_owner", None)
        object.__setattr__(self, "_carried", None)    # values a copy brings along
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        # `layer.weight_grad += g` works in place and then sets the same array again.
        if getattr(self, "_frozen", False) and value is not getattr(self, name, None):
            raise AttributeError(
                f"{type(self).__name__}.{name} cannot be changed after construction (a network "
                f"would otherwise run one thing and save another); build a new layer, or write "
                f"into the arrays, e.g. layer.weight[...] = values")
        object.__setattr__(self, name, value)

    def _check_free(self, network):
        """Refuse to join `network` if another (living) network owns this layer."""
        owner = self._owner() if self._owner is not None else None
        if owner is not None and owner is not network:
            raise ValueError(f"{self!r} already belongs to another Network; give each network "
                             "its own layers (copy.deepcopy(layer) makes a copy)")

    def _attach(self, network, views):
        """Make this layer part of `network`, its arrays being `views` of the network's."""
        self._check_free(network)
        object.__setattr__(self, "_owner", weakref.ref(network))
        for name, view in views.items():
            object.__setattr__(self, name, view)

    def _values(self):
        """{name: array} of the current parameters and buffers (copies), or None."""
        names = [name for name, _ in self.parameters()] + [name for name, _, _ in self.buffers()]
        if self._owner is not None and self._owner() is not None:
            return {name: np.array(getattr(self, name)) for name in names}
        return None if self._carried is None else {k: v.copy() for k, v in self._carried.items()}

    def __reduce__(self):
        # A copy or unpickled layer is free (no network) and carries the values it had.
        return (_rebuild, (type(self).__name__, self.config(), self._values()))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def _rebuild(type_name, config, values):
    layer = from_config({"type": type_name, "config": config})
    object.__setattr__(layer, "_carried", values)
    return layer


class Dense(Layer):
    """A fully connected layer: ``out = activation(x @ weight.T + bias)``.

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

    kind = "dense"

    def __init__(self, in_features, out_features, activation=None, bias=True, init=None):
        self.in_features = _positive_int("Dense", "in_features", in_features)
        self.out_features = _positive_int("Dense", "out_features", out_features)
        self.activation = _activation("Dense", activation)
        if not isinstance(bias, (bool, np.bool_)):
            raise ValueError(f"Dense: bias must be True or False, got {bias!r}")
        self.use_bias = bool(bias)
        if init is not None and init not in INITS:
            raise ValueError(f"Dense: unknown init {init!r}; choose one of {list(INITS)}")
        self.init = init or ("he" if self.activation in RELU_LIKE else "xavier")
        self.weight = self.bias = self.weight_grad = self.bias_grad = None
        self._freeze()

    n_in = property(lambda self: self.in_features)
    n_out = property(lambda self: self.out_features)

    @property
    def n_params(self):
        return self.out_features * (self.in_features + self.use_bias)

    def parameters(self):
        shapes = [("weight", (self.out_features, self.in_features))]
        return shapes + [("bias", (self.out_features,))] if self.use_bias else shapes

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

    def initial_weights(self, rng):
        """A freshly drawn weight matrix of shape (out_features, in_features), float64."""
        return self.initial_parameters(rng)["weight"]

    def settings(self):
        return {"activation": self.activation}

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "activation": self.activation, "bias": self.use_bias, "init": self.init}

    def __repr__(self):
        return (f"Dense({self.in_features}, {self.out_features}, "
                f"activation={self.activation!r}, bias={self.use_bias})")


class BatchNorm(Layer):
    """Batch normalization over the features of each batch, as ``torch.nn.BatchNorm1d``.

    In train mode each feature is normalised with the batch's mean and (biased) variance,
    ``y = weight * (x - mean) / sqrt(var + eps) + bias``, and the running statistics move
    towards the batch's: ``running = (1 - momentum) * running + momentum * batch`` (the
    running variance takes the unbiased variance).  In eval mode the running statistics
    are used instead.  A batch of one row cannot be normalised in train mode.

    Parameters
    ----------
    num_features : int
    eps : float > 0, added to the variance
    momentum : float in [0, 1]
    affine : bool, whether to learn ``weight`` (starting at 1) and ``bias`` (at 0)

    Attributes (once part of a Network): ``weight``, ``bias`` (None unless affine),
    ``weight_grad``, ``bias_grad``, ``running_mean`` (starts at 0), ``running_var`` (at 1).
    """

    kind = "batchnorm"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        self.num_features = _positive_int("BatchNorm", "num_features", num_features)
        self.eps = _number("BatchNorm", "eps", eps, 0.0, low_open=True)
        if momentum is None:
            raise ValueError("BatchNorm: momentum=None (a cumulative average) is not supported; "
                             "give a number in [0, 1], e.g. 0.1")
        self.momentum = _number("BatchNorm", "momentum", momentum, 0.0, 1.0)
        if not isinstance(affine, (bool, np.bool_)):
            raise ValueError(f"BatchNorm: affine must be True or False, got {affine!r}")
        self.affine = bool(affine)
        self.weight = self.bias = self.weight_grad = self.bias_grad = None
        self.running_mean = self.running_var = None
        self._freeze()

    n_in = n_out = property(lambda self: self.num_features)

    def parameters(self):
        width = (self.num_features,)
        return [("weight", width), ("bias", width)] if self.affine else []

    def initial_parameters(self, rng):
        if not self.affine:
            return {}
        return {"weight": np.ones(self.num_features), "bias": np.zeros(self.num_features)}

    def buffers(self):
        width = (self.num_features,)
        return [("running_mean", width, 0.0), ("running_var", width, 1.0)]

    def settings(self):
        return {"eps": self.eps, "momentum": self.momentum}

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine}


class LayerNorm(Layer):
    """Layer normalization over each row's features, as ``torch.nn.LayerNorm``:
    ``y = weight * (x - mean) / sqrt(var + eps) + bias`` with the row's own mean and
    (biased) variance, the same in train and eval mode.

    Parameters
    ----------
    normalized_shape : int (or a 1-tuple), the number of features
    eps : float > 0
    elementwise_affine : bool, whether to learn ``weight`` (starting at 1) and ``bias`` (at 0)
    """

    kind = "layernorm"

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError("LayerNorm: only the last dimension can be normalised "
                                 f"(normalized_shape of length 1), got {normalized_shape!r}")
            normalized_shape = normalized_shape[0]
        self.normalized_shape = _positive_int("LayerNorm", "normalized_shape", normalized_shape)
        self.eps = _number("LayerNorm", "eps", eps, 0.0, low_open=True)
        if not isinstance(elementwise_affine, (bool, np.bool_)):
            raise ValueError("LayerNorm: elementwise_affine must be True or False, "
                             f"got {elementwise_affine!r}")
        self.elementwise_affine = bool(elementwise_affine)
        self.weight = self.bias = self.weight_grad = self.bias_grad = None
        self._freeze()

    n_in = n_out = property(lambda self: self.normalized_shape)

    def parameters(self):
        width = (self.normalized_shape,)
        return [("weight", width), ("bias", width)] if self.elementwise_affine else []

    def initial_parameters(self, rng):
        if not self.elementwise_affine:
            return {}
        return {"weight": np.ones(self.normalized_shape), "bias": np.zeros(self.normalized_shape)}

    def settings(self):
        return {"eps": self.eps}

    def config(self):
        return {"normalized_shape": self.normalized_shape, "eps": self.eps,
                "elementwise_affine": self.elementwise_affine}


class Dropout(Layer):
    """Inverted dropout, as ``torch.nn.Dropout``: in train mode each value is zeroed with
    probability ``p`` and the others are scaled by ``1 / (1 - p)``; in eval mode the layer
    is the identity.  Every train-mode forward pass draws a fresh mask from a generator
    keyed by the network's seed, the layer, the pass and the element's place in the batch,
    so training is reproducible and the same for any thread count."""

    kind = "dropout"

    def __init__(self, p=0.5):
        self.p = _number("Dropout", "p", p, 0.0, 1.0, high_open=True)
        self._freeze()

    def settings(self):
        return {"p": self.p}

    def config(self):
        return {"p": self.p}


class Activation(Layer):
    """An activation on its own, ``out = name(x)`` (after a BatchNorm, a Residual, ...):
    any of ``backprop.ACTIVATIONS``.  Right after a layer without an activation of its own
    the network applies it in that layer's pass."""

    kind = "activation"

    def __init__(self, name):
        self.name = _activation("Activation", name)
        self._freeze()

    def settings(self):
        return {"activation": self.name}

    def config(self):
        return {"name": self.name}

    def __repr__(self):
        return f"Activation({self.name!r})"


class Residual(Layer):
    """A residual (skip) connection, ``out = x + f(x)`` with f the given layers in order
    (He et al., 2016).  f must keep the width of x.

    Parameters
    ----------
    *layers : Layer
        Any layers, residual blocks included.
    """

    kind = "residual"

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Residual needs at least one layer: out = x + f(x)")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Residual: layers[{i}] must be a backprop layer, got {layer!r}")
        width = chain_width(layers, None, "Residual")
        first = next((w for w in (_input_width(layer) for layer in layers) if w is not None), None)
        if width is not None and first is not None and width != first:
            raise ValueError(f"Residual: f must keep the width (out = x + f(x)), but it maps "
                             f"{first} features to {width}")
        self._layers = tuple(layers)
        self._freeze()

    @property
    def layers(self):
        return list(self._layers)

    n_in = n_out = property(lambda self: _input_width(self))

    def config(self):
        return {"layers": [to_config(layer) for layer in self._layers]}

    def __repr__(self):
        return "Residual(" + ", ".join(repr(layer) for layer in self._layers) + ")"


def _input_width(layer):
    """The width a layer needs, or None if it takes any."""
    if isinstance(layer, Residual):
        return next((w for w in (_input_width(inner) for inner in layer._layers) if w is not None),
                    None)
    return layer.n_in


def chain_width(layers, width, owner):
    """The width after `layers` applied in order to rows of `width` features (None: not
    known yet), or a ValueError naming the first layer whose input does not fit."""
    for i, layer in enumerate(layers):
        wanted = _input_width(layer)
        if wanted is not None and width is not None and wanted != width:
            raise ValueError(f"{owner}: layers[{i}] ({layer!r}) takes {wanted} features, but "
                             f"the layer before it gives {width}")
        if isinstance(layer, Residual):
            width = width if width is not None else wanted
        elif layer.n_out is not None:
            width = layer.n_out
    return width


LAYERS = {cls.__name__: cls for cls in (Dense, BatchNorm, LayerNorm, Dropout, Activation, Residual)}


def to_config(layer):
    """A layer as plain data: {"type": class name, "config": constructor arguments}."""
    return {"type": type(layer).__name__, "config": layer.config()}


def from_config(record):
    """The layer `to_config` described, or a ValueError (checkpoints are checked with it)."""
    if not isinstance(record, dict) or set(record) != {"type", "config"} \
            or record["type"] not in LAYERS or not isinstance(record["config"], dict):
        raise ValueError(f"not a layer description: {record!r:.200}")
    cls, config = LAYERS[record["type"]], dict(record["config"])
    if cls is Residual:
        layers = config.pop("layers", None)
        if config or not isinstance(layers, list):
            raise ValueError(f"not a Residual description: {record!r:.200}")
        return Residual(*[from_config(inner) for inner in layers])
    try:
        return cls(**config)
    except TypeError as e:
        raise ValueError(f"bad {record['type']} arguments: {e}") from None
