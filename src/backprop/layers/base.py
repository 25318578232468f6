"""What a layer kind declares, and the registry of the kinds.

A layer kind is one compiled kernel file (``_<kind>.pxd``: forward and backward, a row
of the kernel table in ``_kernels.pyx``) and one class here that declares everything
else, which the planner, the Engine, checkpoints, ``gradcheck``, ``GradientMonitor`` and
the PyTorch and ONNX converters read:

* ``kernel``: the name of its row in the kernel table (``backprop._core.KERNELS``);
* ``parameters()``: its trained arrays (``Param``: name, shape, whether it is a weight:
  weights get the L2 penalty, and their gradient norms are recorded and monitored), and
  ``initial_parameters(rng)`` their first values; ``kernel_params``: the order the
  kernels take them in; ``buffers()``: arrays it keeps but never trains;
  ``without_gradient()``: entries whose gradient is zero by definition;
* ``backward_reads_result``: its backward reads its forward's result, so an activation
  merged into its record is applied into a slot of its own;
* ``output_shape(shape)``: the shape of its output sample from its input sample's
  (PyTorch's shapes, batch left out), or a ``ValueError`` saying why the input does not
  fit; ``input_layout``/``output_layout``: the storage order it reads and writes (see
  ``_relayout.pxd``); ``fixes_input()``: the input shape it implies, if any;
* ``record(x)``: the numbers its kernels read (``Op`` fields: eps, window, ...) for an
  input of geometry ``x``; ``saved(x)``: the statistics it keeps between its forward and
  backward, in doubles, per batch and per sample;
* ``config()``: its constructor arguments, all a checkpoint stores about it;
* ``to_torch(nn, dtype, shape)``, ``from_torch(module)`` (with ``torch_names``, the
  ``torch.nn`` classes it reads; ``from_torch_run`` and ``torch_runs`` for a layer that
  PyTorch writes as several modules) and ``to_onnx(graph, x, here, shape)``.

``register`` checks that a class declares all of it before the kind can be used; a kind
the kernel table lacks is refused then.

Once a layer is part of a Network, each parameter, its gradient and each buffer is an
attribute that views the network's flat arrays (``dense.weight``, ``dense.weight_grad``,
``bn.running_mean``): writing into them changes the network.  A layer's configuration
is fixed at construction, so what is saved is what runs; a layer belongs to one network
(``copy.deepcopy(layer)`` makes a free copy with the same weights).  Like a torch module, a
layer keeps its weights: once its network is collected it is free again, and the next
network it joins starts from them.
"""
import contextlib
import weakref
from collections import namedtuple

import numpy as np

from backprop._core import ACTIVATIONS, KERNELS

Param = namedtuple("Param", "name shape weight")
Param.__doc__ = """A trained array: its name, its shape (PyTorch's), and whether it is a
weight (a Dense or convolution kernel, an embedding table: penalised by l2, its gradient
norm recorded) rather than a bias or a normalisation's scale and shift."""

LAYOUTS = ("first", "last", "any")

# Activations whose derivative is 1 (or close) for positive inputs keep the signal's
# variance when weights have variance 2/fan_in (He et al., 2015); the others are
# initialised for variance 2/(fan_in + fan_out) (Glorot & Bengio, 2010).
RELU_LIKE = {"relu", "leaky_relu", "elu", "gelu"}
INITS = ("he", "xavier", "zeros")


def positive_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


def number(owner, name, value, low, high=None, *, low_open=False, high_open=False):
    """`value` as a float in the given interval, or a ValueError naming it."""
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r:.80}") from None
    if isinstance(value, bool) or not np.isfinite(result) \
            or (result <= low if low_open else result < low) \
            or (high is not None and (result >= high if high_open else result > high)):
        interval = (("(" if low_open else "[") + f"{low}, "
                    + (f"{high}" + (")" if high_open else "]") if high is not None else "inf)"))
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value!r:.80}")
    return result


def flag(owner, name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")
    return bool(value)


def activation_name(owner, name):
    name = "identity" if name is None else name
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}: unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return name


def describe(shape):
    """A sample shape as users write it: (64,), (3, 32, 32)."""
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


class Layer:
    """What every layer has: see the module's docstring for what a kind declares.

    Subclasses set their configuration in ``__init__`` and end it with ``self._freeze()``;
    after that every attribute is read-only."""

    kernel = None              # the row of the kernel table: a key of backprop._core.KERNELS
    kernel_params = ()         # parameter names, in the order the kernels take them
    input_layout = "any"       # "first", "last" or "any" (see _relayout.pxd)
    output_layout = "any"      # "first", "last", or "any": as its input is stored
    fuses_activation = False   # its kernel applies an elementwise activation in its pass
    backward_reads_result = False  # its backward reads what its forward wrote (a recurrent
                                   # layer's states), which an activation after it must keep
    takes_ids = False          # its input is integer ids (only a network's first layer)
    torch_names = ()           # the torch.nn classes from_torch reads
    torch_runs = ()            # runs of torch.nn classes from_torch_run reads as one layer

    def fixes_input(self):
        """The input sample shape this layer implies, or None if it takes several."""
        return None

    def output_shape(self, shape):
        """The output sample's shape for an input sample of `shape`; ValueError if the
        input does not fit (the message completes "... takes ...")."""
        return shape

    def parameters(self):
        """[Param] of the trained arrays, in the flat buffer's order."""
        return []

    def initial_parameters(self, rng):
        """{name: float64 array} of first values, drawn from `rng` where random."""
        return {}

    def buffers(self):
        """[(name, shape, first value)] of the arrays kept but not trained."""
        return []

    def without_gradient(self):
        """{parameter name: index} of the entries that get no gradient by definition
        although the loss depends on them (an Embedding's padding_idx row, as in PyTorch):
        gradcheck expects zero there, not the finite difference."""
        return {}

    def record(self, x):
        """The Op fields (eps, momentum, p, window, padding_idx, include_pad, activation)
        its kernels read, for an input of geometry `x` (plan.Geometry)."""
        return {}

    def saved(self, x):
        """(doubles per batch, doubles per sample) of statistics kept for the backward."""
        return (0, 0)

    def min_train_batch(self, x):
        """The fewest samples a train-mode batch may have."""
        return 1

    def config(self):
        """The constructor arguments, as plain data."""
        raise NotImplementedError

    def to_torch(self, nn, dtype, shape):
        """[torch modules] computing what this layer computes on input samples of `shape`,
        with copies of its arrays (the first module holds them)."""
        raise NotImplementedError

    @classmethod
    def from_torch(cls, module, path):
        """The layer computing what `module` (of a class in torch_names) computes, or a
        ValueError naming `path` for options backprop does not compute."""
        raise NotImplementedError

    @classmethod
    def from_torch_run(cls, modules, path):
        """The layer computing what `modules` (a run of the classes of one of torch_runs)
        compute, or None when their options make them something else (they are then read
        one by one)."""
        return None

    def to_onnx(self, graph, x, here, shape):
        """Add the ONNX nodes computing this layer on the value named `x` (an input sample
        of `shape`) to `graph` (interop.onnx_export.GraphBuilder); returns the output's name."""
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
        object.__setattr__(self, "_carried", None)        # its values now live there
        for name, view in views.items():
            object.__setattr__(self, name, view)

    def _array_names(self):
        return [p.name for p in self.parameters()] + [name for name, _, _ in self.buffers()]

    def _values(self):
        """{name: copy} of its parameters and buffers: those of its network (all of one
        step boundary, even while another thread trains it), or of a network it belonged
        to that was since collected (its views still hold them), or those a copy carries;
        None for a layer that never had any."""
        if self._owner is None:
            return None if self._carried is None else {k: v.copy() for k, v in self._carried.items()}
        network = self._owner()
        with network.held() if network is not None else contextlib.nullcontext():
            return {name: np.array(getattr(self, name)) for name in self._array_names()}

    def __reduce__(self):
        # A copy or unpickled layer is free (no network) and carries the values it had.
        return (_rebuild, (type(self).__name__, self.config(), self._values()))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# ---- the registry

LAYERS = {}
HOOKS = ("config", "to_torch", "from_torch", "to_onnx")


def register(cls):
    """Make a layer class a known kind (checkpoints and from_torch find it by name) once
    it declares everything the rest of the library reads: a kind declared halfway is an
    error at import, never a kind that runs the wrong code."""
    if cls.kernel not in KERNELS:
        raise TypeError(f"{cls.__name__}: kernel {cls.kernel!r} is not a row of the compiled "
                        f"kernel table ({sorted(KERNELS)})")
    own = cls.__mro__[:cls.__mro__.index(Layer)]
    missing = [hook for hook in HOOKS if not any(hook in klass.__dict__ for klass in own)]
    if missing:
        raise TypeError(f"{cls.__name__} does not declare {missing}")
    if cls.input_layout not in LAYOUTS or cls.output_layout not in LAYOUTS:
        raise TypeError(f"{cls.__name__}: layouts must be among {LAYOUTS}")
    if cls.__name__ in LAYERS:
        raise TypeError(f"a layer kind named {cls.__name__} is already registered")
    LAYERS[cls.__name__] = cls
    return cls


def to_config(layer):
    """A layer as plain data: {"type": class name, "config": constructor arguments}."""
    return {"type": type(layer).__name__, "config": layer.config()}


# Residual blocks may nest; a description nested deeper than this is refused (a
# checkpoint's header could otherwise exhaust the interpreter's stack).
MAX_DEPTH = 64


def from_config(record, depth=0):
    """The layer `to_config` described, or a ValueError (checkpoints are checked with it)."""
    if not isinstance(record, dict) or set(record) != {"type", "config"} \
            or record["type"] not in LAYERS or not isinstance(record["config"], dict):
        raise ValueError(f"not a layer description: {record!r:.200}")
    if depth > MAX_DEPTH:
        raise ValueError(f"layer descriptions nest more than {MAX_DEPTH} deep")
    cls = LAYERS[record["type"]]
    try:
        return cls.from_config(record["config"], depth) if hasattr(cls, "from_config") \
            else cls(**record["config"])
    except TypeError as e:
        raise ValueError(f"bad {record['type']} arguments: {e}") from None


def _rebuild(type_name, config, values):
    layer = from_config({"type": type_name, "config": config})
    object.__setattr__(layer, "_carried", values)
    return layer


def copy_to_torch(module, layer):
    """`module` with copies of `layer`'s parameters and buffers (torch names its tensors
    as backprop does: weight, bias, running_mean, ...); returns `module`."""
    import torch
    with torch.no_grad():
        for name, value in (layer._values() or {}).items():
            getattr(module, name).copy_(torch.from_numpy(value))
    return module


class UnsupportedModule(ValueError):
    """from_torch's error for a torch module (or option) backprop does not compute."""


def unsupported(path, module, reason):
    """The ValueError from_torch raises for a module backprop does not compute."""
    what = repr(module) if not list(module.children()) else type(module).__name__
    return UnsupportedModule(f"from_torch: module {path} ({what}) {reason}")
