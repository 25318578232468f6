"""The planner: from a list of layers to the records of the compiled tape.

It runs once, when a Network is built, reads nothing but the layers' declarations (see
``layers/base.py``) and decides everything the passes then only follow:

* the **shapes**: each layer's output sample from its input's, checked along the whole
  chain, a mismatch naming the layer and both shapes;
* the **slots**: slot 0 is the input batch; every record writes a new slot, so what a
  backward pass needs from the forward (each layer's input and output) is still there.
  A slot stores its samples channels first (PyTorch's order) or channels last (after a
  convolution or pooling); where a layer needs the other order than its input has, a
  relayout record goes between them (see ``_relayout.pxd``), and the network's output is
  always channels first;
* the **records**: one per layer (the fields of ``Op`` in ``_ops.pxd``), except that an
  ``Activation`` right after a record without an activation of its own becomes that
  record's activation (applied in the same pass where the kind's kernel can):
  one pass over the data instead of two, and the same numbers; a kind whose backward
  reads its own result (a recurrent layer's states) then keeps that result in a slot of
  its own, the activation writing the output;
* which gradient buffers are shared: a residual block ``out = x + f(x)`` sends dL/dout
  unchanged into f, so f's output slot uses the very gradient buffer of ``out``;
* which record adds to an input's gradient instead of writing it: ``x`` feeds both f and
  the skip path, and the second of their backward steps to reach it must add;
* where each layer's parameters sit in the flat parameter buffer (layer by layer, in the
  order each layer lists them: for Dense, weight then bias, as checkpoints of version 1
  expect) and its buffers in the flat buffer array; which of them are weights.
"""
import math
from dataclasses import dataclass, field

from backprop._core import ACTIVATIONS, dropout_key
from backprop.layers import Activation, Layer, Residual
from backprop.layers.base import LAYERS, describe

IDENTITY = ACTIVATIONS["identity"]
# Activations whose derivative needs its argument, not only its result.
NEEDS_ARGUMENT = {ACTIVATIONS["gelu"]}
# Activations applied to a whole sample at once, not value by value.
ROW_WISE = {ACTIVATIONS["softmax"]}
# The most values one sample may hold anywhere in a network (4 TiB in float32): larger
# shapes, from a constructor or a checkpoint's header, are refused before any size
# derived from them reaches C.  Every other number a record hands the kernels (a window's
# size, stride, padding, dilation, positions; the saved statistics) is held to it too, so
# the kernels' index arithmetic (at most a few such numbers multiplied by a batch size
# the workspace was allocated for) stays far inside 64 bits.
MAX_SAMPLE_VALUES = 1 << 40


@dataclass(frozen=True)
class Geometry:
    """How a slot holds one sample: its shape (PyTorch's, batch left out), whether its
    channels are stored last, whether it holds integer ids."""
    shape: tuple
    channels_last: bool = False
    ids: bool = False

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def cols(self):
        """The last dimension: a channels-first sample is a rows x cols matrix."""
        return self.shape[-1]

    @property
    def rows(self):
        return self.size // self.cols

    @property
    def positions(self):
        """Values per channel: a channels-last sample is a positions x channels matrix."""
        return self.size // self.shape[0]

    def stored(self, layout):
        """This shape stored "first", "last" or as it is ("any").  A sample with one
        dimension, or one channel, has a single order: it is called channels first, and
        kernels that want channels last read it as it is."""
        last = self.channels_last if layout == "any" else layout == "last"
        return Geometry(self.shape, last and len(self.shape) > 1 and self.shape[0] > 1, self.ids)

    def fits(self, layout):
        """Whether samples stored this way can be read by a layer wanting `layout`."""
        return self.stored(layout) == self

    def as_slot(self):
        """The Slot fields the Engine fills in (_ops.pxd), padded to (c, h, w)."""
        padded = {1: lambda c: (c, 1, 1), 2: lambda c, w: (c, 1, w),
                  3: lambda c, h, w: (c, h, w)}[len(self.shape)](*self.shape)
        c, h, w = padded
        return {"size": self.size, "ndim": len(self.shape), "c": c, "h": h, "w": w,
                "channels_last": self.channels_last, "ids": self.ids,
                "rows": self.rows, "cols": self.cols}


@dataclass
class Plan:
    records: list = field(default_factory=list)      # {"kernel", "op", "saved", "layer"}
    slots: list = field(default_factory=list)        # {"geometry", "grad_owner"}
    params: list = field(default_factory=list)       # (layer, Param, offset)
    buffers: list = field(default_factory=list)      # (layer, name, offset, shape, first value)
    weights: list = field(default_factory=list)      # (offset, size) of each weight
    weight_names: list = field(default_factory=list)  # (layer, name) of each weight
    layer_slot: dict = field(default_factory=dict)   # id(layer) -> the slot of its output
    names: dict = field(default_factory=dict)        # id(layer) -> "layers[2].layers[0]"
    layers: list = field(default_factory=list)       # every layer, nested ones included
    geometry: list = field(default_factory=list)     # the Geometry of each slot
    offsets: dict = field(default_factory=dict)      # (id(layer), name) -> parameter offset
    buffer_offsets: dict = field(default_factory=dict)   # ... -> buffer offset
    n_params: int = 0
    n_buffers: int = 0
    id_limit: int = 0                                # ids lie below it (an Embedding's input)
    min_train_batch: int = 1

    @property
    def input_shape(self):
        return self.geometry[0].shape

    @property
    def output_shape(self):
        return self.geometry[self.records[-1]["op"]["output"]].shape

    @property
    def output_activation(self):
        code = self.records[-1]["op"]["activation"]
        return next(name for name, value in ACTIVATIONS.items() if value == code)


def flatten(layers):
    """Every layer, depth first (a Residual before the layers inside it)."""
    for _, layer in named(layers):
        yield layer


def named(layers, prefix="layers"):
    """(path, layer) for every layer, depth first: ("layers[1].layers[0]", Dense(...))."""
    for i, layer in enumerate(layers):
        yield f"{prefix}[{i}]", layer
        if isinstance(layer, Residual):
            yield from named(layer.layers, f"{prefix}[{i}].layers")


def check_chain(layers, owner, keep_shape=False):
    """Where the first layer fixes its input, check that the chain fits (and, with
    keep_shape, maps that shape to itself); a chain that cannot be followed without the
    network's input shape is checked when the network is planned."""
    start = next((shape for shape in (layer.fixes_input() for layer in layers) if shape), None)
    if start is None:
        return
    shape = start
    try:
        for layer in layers:
            shape = shape if isinstance(layer, Residual) else layer.output_shape(shape)
    except ValueError:
        return          # the first layer's shape was only one it could take
    if keep_shape and shape != start:
        raise ValueError(f"{owner}: f must keep the shape (out = x + f(x)), but it maps "
                         f"{describe(start)} to {describe(shape)}")


def input_shape_of(layers, input_shape):
    """The network's input sample shape: `input_shape`, or the one its first layer fixes."""
    if input_shape is not None:
        if isinstance(input_shape, int):
            input_shape = (input_shape,)
        if not isinstance(input_shape, (tuple, list)) or not 1 <= len(input_shape) <= 3 or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in input_shape):
            raise ValueError("input_shape must be the shape of one sample: (features,), "
                             f"(channels, length) or (channels, height, width), got "
                             f"{input_shape!r:.80}")
        return tuple(input_shape)
    for layer in layers:
        shape = layer.fixes_input()
        if shape is not None:
            return shape
        if layer.takes_ids or layer.kernel not in ("activation", "dropout"):
            break
    raise ValueError(f"the network's input shape is not fixed by its first layer "
                     f"({layers[0]!r}): give Network(..., input_shape=...), e.g. (1, 28, 28) "
                     "for 28x28 grey images, (time, features) for sequences of vectors or "
                     "(length,) for sequences of ids")


def plan(layers, loss, seed, input_shape=None):
    """The Plan of a network of `layers` with `loss` (a losses.Loss or None) on samples of
    `input_shape` (None: what the first layer fixes); `seed` keys Dropout."""
    layers = list(layers)
    if not layers:
        raise ValueError("a Network needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"layers[{i}] must be a backprop layer (Dense, Conv2d, ...), "
                            f"got {layer!r}")
    every = list(flatten(layers))
    seen = set()
    for layer in every:
        if id(layer) in seen:
            raise ValueError(f"{layer!r} appears twice in the network; each place needs its "
                             "own layer object (copy.deepcopy(layer) makes one)")
        seen.add(id(layer))
    p = Plan(layers=every, names={id(layer): path for path, layer in named(layers)})
    _lay_out_arrays(p)
    keys = {id(layer): dropout_key(seed, i) for i, layer in enumerate(every)}
    ids = layers[0].takes_ids
    for layer in every:
        if layer.takes_ids and layer is not layers[0]:
            raise ValueError(f"{p.names[id(layer)]} ({layer!r}) takes integer ids, so it can "
                             "only be a network's first layer")
    if ids:
        p.id_limit = layers[0].num_embeddings
    start = Geometry(input_shape_of(layers, input_shape), ids=ids)
    _new_slot(p, start, gradient=not ids)

    def record(kernel, source, out, layer=None, **fields):
        """A record of `kernel` reading slot `source`, writing a new slot of `out`."""
        op = {"kernel": kernel, "activation": IDENTITY, "fused": IDENTITY, "input": source,
              "skip": -1, "output": _new_slot(p, out), "z": -1, "accumulate": False,
              "param": [-1] * 4, "buffer": -1, "saved": 0, "eps": 0.0, "momentum": 0.0,
              "p": 0.0, "key": keys.get(id(layer), 0), "padding_idx": -1,
              "include_pad": False,
              "window": {"kh": 1, "kw": 1, "sh": 1, "sw": 1, "ph": 0, "pw": 0, "dh": 1, "dw": 1,
                         "groups": 1},
              "recurrence": {"cell": 0, "hidden": 0, "layers": 0, "directions": 0,
                             "nonlinearity": 0}}
        saved = (0, 0)
        if layer is not None:
            x = p.geometry[source]
            settings = dict(layer.record(x))
            op["activation"] = ACTIVATIONS[settings.pop("activation", "identity")]
            op.update(settings)
            saved = layer.saved(x)
            _check_sizes(p.names[id(layer)], layer, op, saved)
            for k, name in enumerate(layer.kernel_params):
                op["param"][k] = p.offsets.get((id(layer), name), -1)
            op["buffer"] = min((offset for (owner, _), offset in p.buffer_offsets.items()
                                if owner == id(layer)), default=-1)
            p.min_train_batch = max(p.min_train_batch, layer.min_train_batch(x))
        p.records.append({"kernel": kernel, "op": op, "saved": saved, "layer": layer})
        return op

    def stored(source, layout):
        """Slot `source`, or a relayout of it, stored as `layout` requires."""
        if p.geometry[source].fits(layout):
            return source
        return record("relayout", source, p.geometry[source].stored(layout))["output"]

    def emit(sequence, source, where):
        """Records for `sequence` applied to slot `source`; returns the output slot."""
        producer = None              # the record of this sequence that wrote `source`
        for i, layer in enumerate(sequence):
            path = f"{where}[{i}]"
            if (isinstance(layer, Activation) and producer is not None
                    and producer["activation"] == IDENTITY):
                producer["activation"] = ACTIVATIONS[layer.name]
                _check_activation(p, producer, path, layer)
            elif isinstance(layer, Residual):
                x = p.geometry[source]
                inner = emit(layer.layers, source, f"{path}.layers")
                if p.geometry[inner].shape != x.shape:
                    raise ValueError(f"{path} ({layer!r}): f must keep the shape (out = x + "
                                     f"f(x)), but it maps {describe(x.shape)} to "
                                     f"{describe(p.geometry[inner].shape)}")
                inner = _match_layout(p, record, inner, x)
                producer = record("residual", source, x, layer)
                producer["skip"] = inner
                # dL/d f(x) = dL/dout: f's output shares the sum's gradient buffer.
                p.slots[inner]["grad_owner"] = producer["output"]
            else:
                if LAYERS.get(type(layer).__name__) is not type(layer):
                    raise ValueError(f"{path} ({layer!r}) is not a registered layer kind "
                                     "(backprop.layers.register declares one)")
                source = stored(source, layer.input_layout)
                x = p.geometry[source]
                try:
                    shape = tuple(layer.output_shape(x.shape))
                except ValueError as e:
                    raise ValueError(f"{path} ({layer!r}) {e}") from None
                out = Geometry(shape).stored(layer.output_layout if layer.output_layout != "any"
                                             else ("last" if x.channels_last else "first"))
                producer = record(layer.kernel, source, out, layer)
                if isinstance(layer, Activation):
                    producer["z"] = source          # its argument is its input
                _check_activation(p, producer, path, layer)
            source = producer["output"]
            p.layer_slot[id(layer)] = source
        return source

    last = stored(emit(layers, 0, "layers"), "first")     # users get PyTorch's order
    if last != p.records[-1]["op"]["output"]:
        raise AssertionError("the last record must write the output")
    ops = [r["op"] for r in p.records]
    for r in p.records:
        op, layer = r["op"], r["layer"]
        keep_argument = op["activation"] in NEEDS_ARGUMENT or (
            op is ops[-1] and loss is not None and loss.from_logits) or (
            layer is not None and layer.backward_reads_result and op["activation"] != IDENTITY)
        if keep_argument and op["z"] < 0:
            op["z"] = _new_slot(p, p.geometry[op["output"]], gradient=False)
        if (layer is not None and layer.fuses_activation and op["z"] < 0
                and op["activation"] not in ROW_WISE):
            op["fused"] = op["activation"]
    # A gradient buffer shared twice (nested residual blocks ending together) belongs to
    # the last slot of the chain.
    for slot in p.slots:
        owner = slot["grad_owner"]
        while owner >= 0 and p.slots[owner]["grad_owner"] != owner:
            owner = p.slots[owner]["grad_owner"]
        slot["grad_owner"] = owner
    # Walking the records backwards, the first to reach a slot's gradient writes it, any
    # later one adds to it.
    written = set()
    for op in reversed(ops):
        op["accumulate"] = op["input"] in written
        written.add(op["input"])
    return p


def _match_layout(p, record, inner, x):
    """f(x)'s slot stored as x is (a residual sum adds them value by value)."""
    if p.geometry[inner].channels_last == x.channels_last:
        return inner
    return record("relayout", inner, x)["output"]


def _check_activation(p, op, path, layer):
    if op["activation"] in ROW_WISE and len(p.geometry[op["output"]].shape) > 1:
        raise ValueError(f"{path} ({layer!r}): softmax is over the features of a (features,) "
                         f"sample, but this one is {describe(p.geometry[op['output']].shape)}; "
                         "Flatten first")


WINDOW_NAMES = {"kh": "kernel_size", "kw": "kernel_size", "sh": "stride", "sw": "stride",
                "ph": "padding", "pw": "padding", "dh": "dilation", "dw": "dilation",
                "groups": "groups"}


def _check_sizes(path, layer, op, saved):
    """Refuse a record whose numbers the kernels could not index with (a stride of 2**70
    from a constructor or a checkpoint's header would otherwise overflow on its way into
    C): a ValueError naming the layer, never an OverflowError."""
    window = op["window"]
    numbers = {k: v for k, v in op.items() if k not in ("window", "recurrence", "key")}
    numbers.update({f"{WINDOW_NAMES[k]} ({k})": v for k, v in window.items()})
    numbers.update({f"recurrence's {k}": v for k, v in op["recurrence"].items()})
    numbers.update({"window positions": window["kh"] * window["kw"],
                    "saved statistics per batch": saved[0],
                    "saved statistics per sample": saved[1]})
    for name, value in numbers.items():
        if isinstance(value, int) and not isinstance(value, bool) \
                and not -1 <= value <= MAX_SAMPLE_VALUES:
            raise ValueError(f"{path} ({layer!r}): its {name} ({value:,}) is outside the "
                             f"[-1, {MAX_SAMPLE_VALUES:,}] the compiled core takes")


def _new_slot(p, geometry, gradient=True):
    if geometry.size > MAX_SAMPLE_VALUES:
        raise ValueError(f"a sample of shape {describe(geometry.shape)} somewhere in the "
                         f"network holds more than {MAX_SAMPLE_VALUES:,} values")
    p.geometry.append(geometry)
    p.slots.append({"geometry": geometry.as_slot(),
                    "grad_owner": len(p.slots) if gradient else -1})
    return len(p.slots) - 1


def _lay_out_arrays(p):
    """Offsets of every parameter and buffer in the flat arrays, and the weights."""
    for layer in p.layers:
        for param in layer.parameters():
            p.params.append((layer, param, p.n_params))
            p.offsets[id(layer), param.name] = p.n_params
            size = math.prod(param.shape)
            if param.weight:
                p.weights.append((p.n_params, size))
                p.weight_names.append((layer, param.name))
            p.n_params += size
        for name, shape, value in layer.buffers():
            p.buffers.append((layer, name, p.n_buffers, shape, value))
            p.buffer_offsets[id(layer), name] = p.n_buffers
            p.n_buffers += math.prod(shape)
