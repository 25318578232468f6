"""PyTorch interop: copy a Network to or from ``torch.nn.Sequential``, or run it inside torch.

* ``to_torch(net)`` and ``from_torch(module)`` COPY weights: the two models are independent
  afterwards.  Both directions map one module to one layer, except that an activation right
  after a ``Linear`` becomes the ``Dense`` layer's fused activation (one layer in backprop's
  core), so ``from_torch(to_torch(net))`` has the layers of ``net`` and
  ``to_torch(from_torch(m))`` the modules of ``m`` (``nn.Identity`` computes nothing and is
  dropped).
* ``TorchModule(net)`` SHARES memory: its Parameters are ``net.params`` seen as torch tensors,
  its forward and backward run in backprop's core, and the gradients torch accumulates in
  ``.grad`` are ``net.grads``.  Either a torch optimizer or ``net.step()`` trains it.
"""
import functools
import weakref
from itertools import chain

import numpy as np

try:
    import torch
    from torch import nn
    from torch.autograd.function import once_differentiable
except ImportError as e:   # pragma: no cover - exercised only without torch
    raise ImportError("backprop.interop's PyTorch functions need PyTorch (its CPU build is "
                      "enough): pip install torch") from e

from backprop.interop._layers import check_network
from backprop.layers import LAYERS, Dropout, Residual
from backprop.layers.base import UnsupportedModule, describe, unsupported
from backprop.layers.elementwise import torch_activation
from backprop.network import Network
from backprop.plan import flatten

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TorchResidual(nn.Sequential):
    """``x + body(x)``: the torch twin of ``backprop.Residual`` (``to_torch`` makes one,
    ``from_torch`` reads one).  Its children are the body, run in order like a Sequential."""

    def forward(self, x):
        return x + super().forward(x)


class _OutputSequence:
    """A torch recurrent module as a Sequential's step: batch first, zero initial state,
    and only its output sequence (torch's modules also return the final states, a tuple
    the next module could not take)."""

    def __init__(self, *args, **kwargs):
        if not kwargs.setdefault("batch_first", True):
            raise ValueError(f"{type(self).__name__} is batch first (batch_first=True)")
        super().__init__(*args, **kwargs)

    def forward(self, x):
        return super().forward(x)[0]


class TorchRNN(_OutputSequence, nn.RNN):
    """``torch.nn.RNN(batch_first=True)`` returning its output only: the torch twin of
    ``backprop.RNN``."""


class TorchLSTM(_OutputSequence, nn.LSTM):
    """``torch.nn.LSTM(batch_first=True)`` returning its output only: the torch twin of
    ``backprop.LSTM``."""


class TorchGRU(_OutputSequence, nn.GRU):
    """``torch.nn.GRU(batch_first=True)`` returning its output only: the torch twin of
    ``backprop.GRU``."""


class TorchLastStep(nn.Module):
    """``x[:, -1]``: a batch-first sequence's last step, the torch twin of
    ``backprop.LastStep``."""

    def forward(self, x):
        return x[:, -1]


# The torch modules of this file that layers name in their torch_names.
OWN_MODULES = {cls.__name__: cls for cls in (TorchResidual, TorchRNN, TorchLSTM, TorchGRU,
                                             TorchLastStep)}


# ---------------------------------------------------------------------------- to_torch

def to_torch(net):
    """A ``torch.nn.Sequential`` computing what `net` computes, with copies of its weights.

    Parameters
    ----------
    net : Network

    Returns
    -------
    torch.nn.Sequential
        In the network's dtype and mode (``train()``/``eval()``).  Each layer becomes its
        PyTorch module (``Dense``: ``nn.Linear``, weight of shape (out_features,
        in_features) as in backprop; ``Conv2d``: ``nn.Conv2d``; ...), a layer's own
        activation the activation's module after it; a softmax becomes
        ``nn.Softmax(dim=1)``.  backprop's ``cross_entropy`` loss takes the softmax layer's
        logits; to train the copy with ``nn.CrossEntropyLoss`` (which applies log-softmax
        itself), drop the final Softmax: ``model[:-1]``.

    Examples
    --------
    >>> model = to_torch(net)
    >>> out = model(torch.from_numpy(x))          # equals net.forward(x)
    """
    check_network(net, "to_torch")
    with net.held():        # every layer's arrays of one step boundary, not a mix
        model = nn.Sequential(*modules_for(net.layers, _TORCH_DTYPES[net.dtype.name],
                                           net.input_shape))
        return model.train(net.training)


def modules_for(layers, dtype, shape):
    """The torch modules computing `layers` on samples of `shape`, each layer's from its
    own declaration (``Layer.to_torch``)."""
    modules = []
    for layer in layers:
        modules += layer.to_torch(nn, dtype, shape)
        if getattr(layer, "takes_activation", False) and layer.activation != "identity":
            modules.append(torch_activation(nn, layer.activation))
        shape = shape if isinstance(layer, Residual) else layer.output_shape(shape)
    return modules


# -------------------------------------------------------------------------- from_torch

def from_torch(module, loss=None, optimizer=None, dtype=None, *, seed=None, input_shape=None):
    """A Network computing what the torch Sequential `module` computes, with copies of its
    weights.

    Parameters
    ----------
    module : torch.nn.Sequential
        Of the modules backprop's layers declare (each layer's ``torch_names``):
        ``Linear``, ``Conv1d``, ``Conv2d``, pooling, ``Embedding``, ``Flatten``,
        ``TorchRNN``, ``TorchLSTM``, ``TorchGRU`` (batch first, no dropout or projection)
        and ``TorchLastStep``;
        ``ReLU``, ``Sigmoid``, ``Tanh``, ``LeakyReLU`` (negative_slope 0.01), ``ELU``
        (alpha 1), ``GELU`` (approximate 'none'), ``Softplus`` (beta 1, threshold 20),
        ``Softmax`` (dim 1 or -1), ``Identity``; ``BatchNorm1d``/``BatchNorm2d`` (with
        running statistics and a momentum), ``LayerNorm`` (one normalized dimension),
        ``Dropout`` and ``TorchResidual``.  Nested ``Sequential`` modules are read as if
        flattened.  An activation right after a ``Linear`` or a convolution becomes that
        layer's activation; elsewhere an ``Activation`` layer.  ``AdaptiveAvgPool1d(1)``
        or ``AdaptiveAvgPool2d(1)`` followed by ``Flatten()`` is one ``GlobalAvgPool``.
    loss, optimizer, seed
        As for ``Network`` (the seed draws dropout masks; the weights come from `module`).
    dtype : {"float32", "float64"} or None
        None takes the dtype of the module's parameters (float32 when it has none).
    input_shape : tuple, optional
        One input sample's shape, as for ``Network`` (needed when the first module is a
        convolution or an embedding).

    Returns
    -------
    Network
        In the module's mode (train or eval).

    Raises
    ------
    TypeError
        `module` is not a Sequential, or its parameters are neither float32 nor float64
        and no dtype is given.
    ValueError
        A module or option backprop does not compute (the message names the module's
        index, as in ``module.named_modules()``), shapes that do not chain, non-finite
        weights, or no layers at all.
    """
    if type(module) is not nn.Sequential:
        raise TypeError(f"from_torch: module must be a torch.nn.Sequential, got "
                        f"{type(module).__name__}")
    items = list(_flatten(module, ""))
    if not items:
        raise ValueError("from_torch: the Sequential has no layers to convert")
    dtype = _dtype_of(module) if dtype is None else dtype
    copies = []   # (layer, module): arrays to copy once the network exists
    layers, _ = _layers_from(items, copies, None if input_shape is None else tuple(input_shape))
    try:
        net = Network(layers, loss=loss, optimizer=optimizer, dtype=dtype, seed=seed,
                      input_shape=input_shape)
    except ValueError as e:
        raise ValueError(f"from_torch: {e}") from None
    for layer, source in copies:
        for name in layer._array_names():
            getattr(layer, name)[...] = getattr(source, name).detach().cpu().numpy()
    return net.train(module.training)


def _torch_kinds():
    """{torch module class: the backprop layer class that reads it}, from the layers'
    declarations."""
    kinds = {}
    for cls in LAYERS.values():
        for name in cls.torch_names:
            torch_class = OWN_MODULES[name] if name in OWN_MODULES else getattr(nn, name)
            kinds[torch_class] = cls
    return kinds


def _torch_runs():
    """[(torch module classes, the backprop layer class reading that run as one layer)],
    from the layers' declarations (torch_runs)."""
    return [(tuple(getattr(nn, name) for name in run), cls)
            for cls in LAYERS.values() for run in cls.torch_runs]


def _read_run(runs, items, i):
    """(layer, number of modules) for a declared run of modules starting at items[i], or
    (None, 0)."""
    for classes, cls in runs:
        modules = [module for _, module in items[i:i + len(classes)]]
        if tuple(type(module) for module in modules) == classes:
            layer = cls.from_torch_run(modules, items[i][0])
            if layer is not None:
                return layer, len(classes)
    return None, 0


def _flatten(sequential, prefix):
    """(index path, module) for each child of a Sequential; plain nested Sequentials are
    read through (their children get paths like "2.0") and Identity modules, which compute
    nothing, are left out."""
    for name, child in sequential.named_children():
        if type(child) is nn.Sequential:
            yield from _flatten(child, f"{prefix}{name}.")
        elif type(child) is not nn.Identity:
            yield f"{prefix}{name}", child


def activation_name_of(path, module):
    """backprop's name for the activation `module` computes; None if it is no activation;
    a ValueError naming `path` for options backprop's activation does not have."""
    simple = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu"}
    kind = type(module)
    if kind in simple:
        return simple[kind]
    # (activation, the option values backprop computes, whether the module has them)
    options = {
        nn.LeakyReLU: ("leaky_relu", "negative_slope=0.01",
                       lambda m: m.negative_slope == 0.01),
        nn.ELU: ("elu", "alpha=1.0", lambda m: m.alpha == 1.0),
        nn.GELU: ("gelu", "approximate='none'", lambda m: m.approximate == "none"),
        nn.Softplus: ("softplus", "beta=1 and threshold=20",
                      lambda m: m.beta == 1 and m.threshold == 20),
        nn.Softmax: ("softmax", "dim=1 (or -1), over the features of each row",
                     lambda m: m.dim in (1, -1)),
    }
    if kind not in options:
        return None
    name, wanted, matches = options[kind]
    if not matches(module):
        raise unsupported(path, module, f"is not supported: backprop's {name} has {wanted}")
    return name


def _layers_from(items, copies, shape):
    """backprop layers for a list of (path, torch module), each read by the layer class
    that declares its torch class; returns (layers, output sample shape).  `shape` is the
    input sample's shape (None until a layer fixes it): a module whose input does not fit
    is named by its torch path."""
    kinds, runs, layers, i = _torch_kinds(), _torch_runs(), [], 0
    while i < len(items):
        path, module = items[i]
        cls = kinds.get(type(module))
        run, length = _read_run(runs, items, i)
        if run is not None:
            cls, layer = type(run), run
            i += length - 1
        elif cls is None:
            names = sorted(t.__name__ for t in kinds) + sorted(
                " + ".join(t.__name__ for t in classes) for classes, _ in runs)
            raise unsupported(path, module, "is not supported by backprop (supported: "
                              f"{', '.join(names)}, Identity and nested Sequential)")
        elif cls is Residual:
            inner, out = _layers_from(list(_flatten(module, f"{path}.")), copies, shape)
            if not inner:
                raise unsupported(path, module, "has an empty body")
            if shape is not None and out != shape:
                raise unsupported(path, module, f"maps {describe(shape)} to {describe(out)}: a "
                                  "residual block must keep the shape (out = x + body(x))")
            layer = Residual(*inner)
        elif getattr(cls, "takes_activation", False) and i + 1 < len(items) \
                and (activation := activation_name_of(*items[i + 1])) is not None:
            layer = _read(cls, module, path, activation=activation)    # fused in the core
            i += 1
        else:
            layer = _read(cls, module, path)
        if layer.parameters() or layer.buffers():
            _check_finite(module, path)
            copies.append((layer, module))
        if shape is None:
            shape = layer.fixes_input()
        if shape is not None and cls is not Residual:
            try:
                shape = tuple(layer.output_shape(shape))
            except ValueError as e:
                raise unsupported(path, module, str(e)) from None
        layers.append(layer)
        i += 1
    return layers, shape


def _read(cls, module, path, **options):
    """cls.from_torch(module, path): an option torch allows but backprop's constructor
    refuses (padding='same' with an even kernel, Dropout(p=1), ...) is named like any
    module backprop does not compute."""
    try:
        return cls.from_torch(module, path, **options)
    except UnsupportedModule:
        raise
    except ValueError as e:
        raise unsupported(path, module, f"is not supported: {e}") from None


def _dtype_of(module):
    found = {t.dtype for t in chain(module.parameters(), module.buffers())
             if t.is_floating_point()}
    if len(found) > 1:
        raise ValueError(f"from_torch: the module mixes dtypes {sorted(map(str, found))}; "
                         "pass dtype='float32' or 'float64'")
    dtype = found.pop() if found else torch.float32
    for name, torch_dtype in _TORCH_DTYPES.items():
        if dtype == torch_dtype:
            return name
    raise TypeError(f"from_torch: the module's parameters are {dtype}; backprop computes in "
                    "float32 or float64: pass dtype='float32' or 'float64' to convert them")


def _check_finite(module, path):
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"from_torch: module {path} ({type(module).__name__}) has NaN or "
                             f"Inf in its {name}")


# ------------------------------------------------------------------------- TorchModule

# For each network, the forward whose activations it holds (backprop keeps only the last
# forward's).  Keyed by network, so two TorchModules around one network see each other.
_last_forward = weakref.WeakKeyDictionary()


class TorchModule(nn.Module):
    """A backprop network as a ``torch.nn.Module``: forward and backward run in backprop's
    core; its weights are torch Parameters sharing memory with ``net.params``.

    Parameters
    ----------
    net : Network
        The network to run.  It is not copied: training the module trains `net`.

    Notes
    -----
    * Input: a CPU tensor of shape (batch, *net.input_shape) in the network's dtype (or
      of integer ids, which get no gradient, for a network starting with an Embedding);
      output: (batch, *net.output_shape), the network's forward (probabilities for a
      softmax output).
    * ``module.layers[i].weight`` / ``.bias`` are ``net.layers[i].weight`` / ``.bias``
      (no copy), in the order of ``net.params``; batch-norm running statistics are
      buffers.  A torch optimizer's in-place update changes the network, ``net.step()``
      changes the Parameters.
    * Gradients: torch accumulates each backward into ``.grad`` as usual, and ``.grad`` is
      kept as a view of ``net.grads``, so after any backward ``net.grads`` holds what torch
      holds.  ``module.zero_grad()`` and ``net.zero_grad()`` clear both; after a torch
      optimizer's ``zero_grad()`` (which sets ``.grad`` to None) ``net.grads`` is refreshed
      by the next backward.  ``torch.autograd.grad`` returns the gradients and touches
      neither.  ``requires_grad_(False)`` is honoured by torch optimizers; ``net.step()``
      updates every parameter.
    * backprop keeps the activations of the network's LAST forward only.  A backward
      through an earlier forward recomputes it from its saved input when that reproduces it
      exactly (running statistics are restored afterwards); with dropout in training mode
      it cannot (new masks) and the backward raises RuntimeError.  It also raises when the
      weights changed since that forward (``net.step()``, or in place from torch, as torch
      itself does).  Calling ``net.forward`` directly between a module's forward and its
      backward is not detected: use the module.
    * ``module.training`` is ``net.training``: ``train()`` / ``eval()`` on either switch
      both.  ``.to()``, ``.double()`` and the
      like cannot move the shared memory and raise unless they change nothing.
    * Pickling and ``copy.deepcopy`` copy the network and wrap the copy.
    """

    def __init__(self, net):
        check_network(net, "TorchModule")
        super().__init__()
        self.net = net
        self.layers = nn.ModuleList(_SharedLayer(layer, net) for layer in net.layers)
        self._grad_links = []   # (Parameter, its gradient as a view of net.grads)
        for holder in self.modules():
            if isinstance(holder, _SharedLayer):
                for name, grad in holder.grad_views.items():
                    param = getattr(holder, name)
                    param.register_post_accumulate_grad_hook(functools.partial(_link_grad, grad))
                    self._grad_links.append((param, grad))

    # The module's mode IS the network's (train()/eval() on either side switch both).
    @property
    def training(self):
        net = self.__dict__.get("net")
        return True if net is None else net.training

    @training.setter
    def training(self, mode):
        net = self.__dict__.get("net")   # None while nn.Module.__init__ runs
        if net is not None:
            net.train(mode)

    @property
    def dtype(self):
        return _TORCH_DTYPES[self.net.dtype.name]

    def forward(self, x):
        """Run the network on x, a tensor of shape (batch, *net.input_shape); returns
        (batch, *net.output_shape)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"TorchModule: x must be a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"TorchModule: x must be on the CPU (backprop is a CPU library), "
                             f"got a tensor on {x.device}")
        if self.net._plan.geometry[0].ids:
            if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
                raise TypeError(f"TorchModule: x must hold integer ids (the network starts "
                                f"with an Embedding), got a tensor of dtype {x.dtype}")
        elif x.dtype != self.dtype:
            raise TypeError(f"TorchModule: x has dtype {x.dtype}, the network computes in "
                            f"{self.dtype}: convert x with x.to({self.dtype})")
        return _RunNetwork.apply(self, x, *(param for param, _ in self._grad_links))

    def zero_grad(self, set_to_none=True):
        """Clear ``net.grads`` and the Parameters' ``.grad`` (None, or zeros in place)."""
        self.net.zero_grad()
        super().zero_grad(set_to_none)

    def _apply(self, fn, recurse=True):
        # .to(), .double(), .cuda() ... swap every tensor for a converted copy, which would
        # silently cut the Parameters loose from the network: allow only no-ops.
        for tensor in chain(self.parameters(), self.buffers()):
            moved = fn(tensor)
            if (moved.data_ptr() != tensor.data_ptr() or moved.dtype != tensor.dtype
                    or moved.device != tensor.device):
                raise TypeError("TorchModule: its tensors are the network's own memory and "
                                f"cannot become {moved.dtype} on {moved.device}; build the "
                                "network with the dtype you need (from_torch(to_torch(net), "
                                "dtype=...) converts one)")
        return self

    def __reduce__(self):
        return TorchModule, (self.net,)

    def extra_repr(self):
        return (f"{self.net.input_shape} -> {self.net.output_shape}, layers={len(self.net.layers)}, "
                f"dtype={self.net.dtype.name}")


class _SharedLayer(nn.Module):
    """One backprop layer's arrays as torch tensors sharing the network's memory: its
    weight and bias as Parameters, its running statistics as buffers; a residual block's
    inner layers as ``layers``."""

    def __init__(self, layer, net):
        super().__init__()
        self.grad_views = {}
        for name, _, _ in layer.parameters():
            self.register_parameter(name, nn.Parameter(_shared(getattr(layer, name), net.params)))
            self.grad_views[name] = _shared(getattr(layer, f"{name}_grad"), net.grads)
        for name, _, _ in layer.buffers():
            self.register_buffer(name, _shared(getattr(layer, name), net.buffers))
        if isinstance(layer, Residual):
            self.layers = nn.ModuleList(_SharedLayer(inner, net) for inner in layer.layers)


def _shared(array, flat):
    if not np.shares_memory(array, flat):   # the layer views the network's flat buffer
        raise RuntimeError("TorchModule: a layer's array is not a view of the network's flat "
                           "buffer; cannot share it with torch")
    return torch.from_numpy(array)


def _link_grad(grad_view, param):
    """After torch accumulated a backward into ``param.grad``: keep ``.grad`` a view of the
    network's gradient buffer.  torch adds in place when ``.grad`` exists (the buffer is
    already up to date) and makes a new tensor when it was None (after a torch
    ``zero_grad()``): then its value moves into the buffer and the buffer becomes ``.grad``."""
    grad = param.grad
    if grad is not None and grad.data_ptr() != grad_view.data_ptr():
        with torch.no_grad():
            grad_view.copy_(grad)
        param.grad = grad_view


class _RunNetwork(torch.autograd.Function):
    """out = net(x), differentiable in x and in the Parameters (given as inputs so that
    torch tracks them; the network reads the same memory)."""

    @staticmethod
    def forward(ctx, module, x, *params):
        net = module.net
        out = net.forward(x.detach().numpy(force=True))
        token = _last_forward[net] = object()
        ctx.module, ctx.token = module, token
        ctx.optimizer_steps = net.optimizer.steps
        ctx.training = net.training
        # Saved so torch refuses a backward after x or a weight changed in place.
        ctx.save_for_backward(x, *params)
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, *_ = ctx.saved_tensors   # raises if x or a weight was modified in place since
        module = ctx.module
        net = module.net
        if net.optimizer.steps != ctx.optimizer_steps:
            raise RuntimeError("TorchModule: the network's weights were updated (net.step(), "
                               "train_step or fit) after this forward; run a new forward "
                               "before backward")
        if _last_forward.get(net) is not ctx.token:
            _replay(net, ctx, x)
        # net.backward adds its gradients to net.grads, which may hold torch's earlier
        # .grad: compute this backward's own gradients on a zeroed buffer, then put the old
        # values back; torch adds the returned gradients to .grad (= net.grads) itself.
        earlier = net.grads.copy()
        net.grads.fill(0)
        try:
            net.backward(grad_output=grad_output.numpy(force=True))
            grad_x = torch.from_numpy(net.input_grad) if ctx.needs_input_grad[1] else None
            grads = [grad.clone() if needed else None
                     for (_, grad), needed in zip(module._grad_links, ctx.needs_input_grad[2:])]
        finally:
            net.grads[...] = earlier
        return (None, grad_x, *grads)


def _replay(net, ctx, x):
    """Recompute an earlier forward so its backward can run, when it is reproducible."""
    if ctx.training and any(isinstance(layer, Dropout) and layer.p > 0
                            for layer in flatten(net.layers)):
        raise RuntimeError(
            "TorchModule: backward through an earlier forward than the network's last one. "
            "backprop keeps only the last forward's activations, and with dropout in training "
            "mode that forward cannot be recomputed (its masks are gone). Call each "
            "forward's backward before the next train-mode forward.")
    buffers = net.buffers.copy()
    mode = net.training
    net.train(ctx.training)
    try:
        net.forward(x.detach().numpy(force=True))
    finally:
        net.train(mode)
        net.buffers[...] = buffers   # batch-norm statistics must not move twice
    _last_forward[net] = ctx.token
