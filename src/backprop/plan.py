"""The planner: from a list of layers to the records of the compiled tape.

It runs once, when a Network is built, and decides everything the passes then only
follow:

* the **slots**: slot 0 is the input batch; every record writes a new slot, so what a
  backward pass needs from the forward (each layer's input and output) is still there;
* the **records**: one per layer (see ``_tape.pxd`` for the fields), except that an
  ``Activation`` right after a layer without an activation of its own is fused into that
  layer's record (Dense, BatchNorm, LayerNorm, Dropout, a residual sum): one pass over
  the data instead of two, and the same numbers;
* which gradient buffers are shared: a residual block ``out = x + f(x)`` sends dL/dout
  unchanged into f, so f's output slot uses the very gradient buffer of ``out``;
* which record adds to an input's gradient instead of writing it: ``x`` feeds both f and
  the skip path, and the second of their backward steps to reach it must add;
* where each layer's parameters sit in the flat parameter buffer (layer by layer, in the
  order each layer lists them: for Dense, weight then bias, as checkpoints of version 1
  expect) and its buffers in the flat buffer array.
"""
from dataclasses import dataclass, field

from backprop._core import ACTIVATIONS, OP_KINDS, dropout_key
from backprop.layers import Activation, Layer, Residual, chain_width

IDENTITY = ACTIVATIONS["identity"]
# Activations whose derivative needs its argument, not only its result.
NEEDS_ARGUMENT = {ACTIVATIONS["gelu"]}
# Losses computed from the logits (the last record's pre-activation).
LOGIT_LOSSES = ("cross_entropy", "binary_cross_entropy")


@dataclass
class Plan:
    ops: list = field(default_factory=list)          # records: dicts of Op's fields
    slots: list = field(default_factory=list)        # (width, gradient owner or -1)
    params: list = field(default_factory=list)       # (layer, name, offset, shape)
    buffers: list = field(default_factory=list)      # (layer, name, offset, shape, first value)
    layer_slot: dict = field(default_factory=dict)   # id(layer) -> the slot of its output
    names: dict = field(default_factory=dict)        # id(layer) -> "layers[2].layers[0]"
    layers: list = field(default_factory=list)       # every layer, nested ones included
    n_params: int = 0
    n_buffers: int = 0

    @property
    def n_inputs(self):
        return self.slots[0][0]

    @property
    def n_outputs(self):
        return self.slots[self.ops[-1]["output"]][0]


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


def plan(layers, loss, seed):
    """The Plan of a network of `layers` with `loss` (or None); `seed` keys Dropout."""
    layers = list(layers)
    if not layers:
        raise ValueError("a Network needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"layers[{i}] must be a backprop layer (Dense, BatchNorm, ...), "
                            f"got {layer!r}")
    every = list(flatten(layers))
    seen = {}
    for i, layer in enumerate(every):
        if id(layer) in seen:
            raise ValueError(f"{layer!r} appears twice in the network; each place needs its "
                             "own layer object (copy.deepcopy(layer) makes one)")
        seen[id(layer)] = i
    # Layers before the first one with a width keep any width: that one fixes the input's.
    n_in = next((layer.n_in for layer in layers if layer.n_in is not None), None)
    if n_in is None:
        raise ValueError("no layer fixes the input width: a network needs a Dense, BatchNorm "
                         f"or LayerNorm layer, got {layers!r}")
    chain_width(layers, n_in, "Network")

    p = Plan(slots=[(n_in, 0)], layers=every,
             names={id(layer): path for path, layer in named(layers)})
    for layer in every:
        for name, shape in layer.parameters():
            p.params.append((layer, name, p.n_params, shape))
            p.n_params += _size(shape)
        for name, shape, value in layer.buffers():
            p.buffers.append((layer, name, p.n_buffers, shape, value))
            p.n_buffers += _size(shape)
    offsets = {}
    for layer, name, offset, _ in p.params:
        offsets[id(layer), name] = offset
    for layer, name, offset, _, _ in p.buffers:
        offsets[id(layer), name] = offset
    keys = {id(layer): dropout_key(seed, i) for i, layer in enumerate(every)}

    def new_slot(width, gradient=True):
        p.slots.append((width, len(p.slots) if gradient else -1))
        return len(p.slots) - 1

    def record(kind, source, width, layer):
        settings = layer.settings() if layer is not None else {}
        p.ops.append({
            "kind": OP_KINDS[kind], "activation": ACTIVATIONS[settings.get("activation", "identity")],
            "input": source, "skip": -1, "output": new_slot(width), "z": -1, "accumulate": False,
            "weight": offsets.get((id(layer), "weight"), -1),
            "bias": offsets.get((id(layer), "bias"), -1),
            "buffer": offsets.get((id(layer), "running_mean"), -1),
            "eps": settings.get("eps", 0.0), "momentum": settings.get("momentum", 0.0),
            "p": settings.get("p", 0.0), "key": keys.get(id(layer), 0)})
        return p.ops[-1]

    def emit(sequence, source):
        """Records for `sequence` applied to slot `source`; returns the output slot."""
        producer = None              # the record of this sequence that wrote `source`
        for layer in sequence:
            width = p.slots[source][0]
            if (isinstance(layer, Activation) and producer is not None
                    and producer["activation"] == IDENTITY):
                producer["activation"] = ACTIVATIONS[layer.name]     # fused
            elif isinstance(layer, Residual):
                inner = emit(layer.layers, source)
                producer = record("residual", source, width, None)
                producer["skip"] = inner
                # dL/d f(x) = dL/dout: f's output shares the sum's gradient buffer.
                p.slots[inner] = (p.slots[inner][0], producer["output"])
            else:
                producer = record(layer.kind, source,
                                  layer.n_out if layer.n_out is not None else width, layer)
                if isinstance(layer, Activation):
                    producer["z"] = source          # its argument is its input
            source = producer["output"]
            p.layer_slot[id(layer)] = source
        return source

    emit(layers, 0)
    last = p.ops[-1]
    for op in p.ops:
        keep_argument = op["activation"] in NEEDS_ARGUMENT or (
            op is last and loss in LOGIT_LOSSES)
        if keep_argument and op["z"] < 0:
            op["z"] = new_slot(p.slots[op["output"]][0], gradient=False)
    # A gradient buffer shared twice (nested residual blocks ending together) belongs to
    # the last slot of the chain.
    for i, (width, owner) in enumerate(p.slots):
        while owner >= 0 and p.slots[owner][1] != owner:
            owner = p.slots[owner][1]
        p.slots[i] = (width, owner)
    # Walking the records backwards, the first to reach a slot's gradient writes it, any
    # later one adds to it.
    written = set()
    for op in reversed(p.ops):
        op["accumulate"] = op["input"] in written
        written.add(op["input"])
    return p


def _size(shape):
    size = 1
    for n in shape:
        size *= n
    return size
