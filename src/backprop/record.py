"""A network as plain data and back: the one form behind checkpoints, pickling and copies.

A record is a JSON-able ``header`` and a few flat arrays:

* ``header``: ``{"format": "backprop-checkpoint", "version": 3,
  "network": {"layers": [{"type", "config"}, ...], "loss", "dtype", "seed", "input_shape",
  "precision"},
  "state": {"training", "dropout_seed", "passes", "epoch"},
  "optimizer": {"name", "hyperparameters", "step"}, "rng": <numpy bit-generator state>,
  "history": {...}}``
* ``params`` (the flat parameter buffer), ``buffers`` (running statistics), and
  ``optimizer.<name>`` for each optimizer state buffer.

Every field of a header is checked for type and range, and the arrays a header implies
are worked out from the architecture alone, before anything is allocated or read (see
``checkpoint.py``).  Saving runs the same checks first, so a file ``save`` writes is
always one ``load`` accepts.  "precision" (what the products multiply: "float32" or
"bfloat16") may be absent: float32, as in the files written before it existed.  Version 1 files (Dense-only networks, no buffers or
state) and version 2 files (no input shape: the first layer fixes it) are still read.
"""
import contextlib
import json
import math

import numpy as np

from backprop import checkpoint
from backprop._core import PRECISIONS
from backprop.layers import from_config, to_config
from backprop.losses import LOSSES
from backprop.optim import OPTIMIZERS

FORMAT = "backprop-checkpoint"
VERSION = 3
DTYPES = ("float32", "float64")
TOP_LEVEL = {1: {"format", "version", "network", "optimizer", "rng", "epoch", "history"},
             2: {"format", "version", "network", "state", "optimizer", "rng", "history"}}
TOP_LEVEL[3] = TOP_LEVEL[2]


class RecordError(ValueError):
    pass


def network_config(net):
    return {"layers": [to_config(layer) for layer in net.layers], "loss": net.loss,
            "dtype": net.dtype.name, "seed": net.seed, "input_shape": list(net.input_shape),
            "precision": net.precision}


def to_record(net):
    """(header, arrays) of `net`: everything needed to continue training bit for bit, all
    of one step boundary even while another thread trains it (that thread waits for the
    copies; the copies wait for its step to end)."""
    with net.held():
        opt = net.optimizer.state_dict()
        header = {
            "format": FORMAT, "version": VERSION, "network": network_config(net),
            "state": {"training": net.training, "dropout_seed": net._key_seed,
                      "passes": net._engine.passes, "epoch": net.epoch},
            "optimizer": {"name": opt["name"], "hyperparameters": opt["hyperparameters"],
                          "step": opt["step"]},
            "rng": net.rng.bit_generator.state,
            "history": net.history.to_dict(),
        }
        arrays = {"params": net.params.copy(), "buffers": net.buffers.copy()}
    arrays.update({f"optimizer.{name}": value for name, value in opt["state"].items()})
    return header, arrays


# ---- checking a header

def _int(where, value, low=0, high=2 ** 63):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise RecordError(f"{where} must be an integer in [{low}, {high}), got {value!r:.80}")
    return value


# How deeply lists and dicts may nest in a header.  A layer description is a dict whose
# "config" (a dict) may hold a list of layers, three levels per block nested in another;
# the header, "network", "layers", and a config value that is a list take six more.  So
# this admits blocks nested 64 deep, far beyond any real network, and keeps every check
# below (and the repr in its messages) far from Python's recursion limit.
MAX_LAYER_NESTING = 64
MAX_DEPTH = 6 + 3 * MAX_LAYER_NESTING


def _check_depth(header):
    """Refuse a header nested deeper than MAX_DEPTH, without recursing into it."""
    stack = [(header, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise RecordError(f"the header nests deeper than {MAX_DEPTH} levels (layer "
                                  f"blocks at most {MAX_LAYER_NESTING} deep)")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)


@contextlib.contextmanager
def _numbers_in(where):
    """A value the constructors cannot take (a number too large for a float raises
    OverflowError, a wrong kind TypeError) is a bad field like any other: RecordError."""
    try:
        yield
    except (OverflowError, TypeError, ValueError) as e:
        raise RecordError(f"{where}: {e}") from None


def _field(record, key, kind, where):
    if not isinstance(record, dict) or key not in record:
        raise RecordError(f"{where}: missing {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RecordError(f"{where}.{key} must be a {getattr(kind, '__name__', kind)}, "
                          f"got {value!r:.80}")
    return value


class Spec:
    """What a checked header says: the pieces of the network and the arrays it implies."""

    def __init__(self, header):
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise RecordError("not a backprop checkpoint")
        _check_depth(header)
        version = header.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RecordError(f"bad format version {version!r:.40}")
        if version > VERSION:
            raise RecordError(f"checkpoint format version {version} is newer than this "
                              f"backprop reads ({VERSION}); upgrade backprop")
        missing = TOP_LEVEL[version] - set(header)
        if missing:
            raise RecordError(f"the header lacks {sorted(missing)}")
        network = _field(header, "network", dict, "header")
        layers = _field(network, "layers", list, "network")
        if version == 1:         # Dense keyword arguments, nothing else existed
            layers = [{"type": "Dense", "config": layer} for layer in layers]
        self.layers = []
        for i, layer in enumerate(layers):
            with _numbers_in(f"network.layers[{i}]"):
                self.layers.append(from_config(layer))
        self.loss = network.get("loss")
        if self.loss is not None and self.loss not in LOSSES:
            raise RecordError(f"unknown loss {self.loss!r:.40}")
        self.dtype = network.get("dtype")
        if self.dtype not in DTYPES:
            raise RecordError(f"dtype must be one of {DTYPES}, got {self.dtype!r:.40}")
        self.precision = network.get("precision", "float32")
        if self.precision not in PRECISIONS or (self.precision == "bfloat16"
                                                and self.dtype != "float32"):
            raise RecordError(f"precision must be 'float32' or, for a float32 network, "
                              f"'bfloat16', got {self.precision!r:.40}")
        self.seed = network.get("seed")
        if self.seed is not None:
            _int("network.seed", self.seed)
        self.input_shape = None          # before version 3: what the first layer fixes
        if version >= 3:
            shape = _field(network, "input_shape", list, "network")
            if not 1 <= len(shape) <= 3:
                raise RecordError(f"network.input_shape must have 1 to 3 sizes, got {shape!r:.80}")
            self.input_shape = tuple(_int("network.input_shape", n, 1) for n in shape)
        if version == 1:
            state = {"training": True, "dropout_seed": self.seed or 0, "passes": 0,
                     "epoch": header["epoch"]}
        else:
            state = _field(header, "state", dict, "header")
        self.training = _field(state, "training", bool, "state")
        self.dropout_seed = _int("state.dropout_seed", state.get("dropout_seed"))
        self.passes = _int("state.passes", state.get("passes"))
        self.epoch = _int("state.epoch", state.get("epoch"))
        opt = _field(header, "optimizer", dict, "header")
        name = _field(opt, "name", str, "optimizer")
        if name not in OPTIMIZERS:
            raise RecordError(f"unknown optimizer {name!r:.40}")
        self.optimizer_name = name
        self.hyperparameters = _field(opt, "hyperparameters", dict, "optimizer")
        with _numbers_in("optimizer.hyperparameters"):
            self.optimizer = OPTIMIZERS[name](**self.hyperparameters)   # validates each value
        self.step = _int("optimizer.step", opt.get("step"))
        self.rng = _field(header, "rng", dict, "header")
        self.history = _field(header, "history", dict, "header")
        self.version = version

    def arrays(self, plan_sizes):
        """{name: (shape, dtype)} of the arrays this network needs."""
        n_params, n_buffers = plan_sizes
        dtype = np.dtype(self.dtype)
        wanted = {"params": ((n_params,), dtype)}
        if self.version >= 2:
            wanted["buffers"] = ((n_buffers,), dtype)
        for name in self.optimizer.state_names:
            wanted[f"optimizer.{name}"] = ((n_params,), dtype)
        return wanted


def check(header, read_array):
    """Check a header, then the arrays it implies, fetched by read_array(name, shape,
    dtype) only once the architecture is known; returns (spec, arrays, history)."""
    from backprop import plan as planner
    from backprop.training import History

    spec = Spec(header)
    with _numbers_in("network"):        # layers that do not chain, or too large to run
        plan = planner.plan(spec.layers, LOSSES.get(spec.loss), spec.dropout_seed,
                            spec.input_shape)
    wanted = spec.arrays((plan.n_params, plan.n_buffers))
    arrays = {name: read_array(name, shape, dtype) for name, (shape, dtype) in wanted.items()}
    for name, values in arrays.items():
        if not np.isfinite(values).all():
            raise RecordError(f"{name} contains NaN or Inf")
    if "buffers" in arrays:     # a negative variance would make every prediction NaN
        for layer, name, offset, shape, _ in plan.buffers:
            stop = offset + math.prod(shape)
            if name == "running_var" and (arrays["buffers"][offset:stop] < 0).any():
                raise RecordError(f"{plan.names[id(layer)]}.running_var has negative values")
    try:
        np.random.default_rng().bit_generator.state = spec.rng
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise RecordError(f"bad rng state: {e}") from None
    with _numbers_in("history"):
        return spec, arrays, History.from_dict(spec.history)


def from_record(cls, header, read_array):
    """The network a record describes (see `check`)."""
    try:
        spec, arrays, history = check(header, read_array)
        net = cls.__new__(cls)
        net._build(spec.layers, spec.loss, spec.optimizer, spec.dtype, spec.seed,
                   initialise=False, key_seed=spec.dropout_seed, input_shape=spec.input_shape,
                   precision=spec.precision)
    except (KeyError, TypeError) as e:
        raise RecordError(f"invalid backprop checkpoint: {e}") from None
    net.params[...] = arrays["params"]
    if "buffers" in arrays:
        net.buffers[...] = arrays["buffers"]
    state = {name[len("optimizer."):]: value for name, value in arrays.items()
             if name.startswith("optimizer.")}
    spec.optimizer.load_state_dict({"name": spec.optimizer_name,
                                    "hyperparameters": spec.hyperparameters,
                                    "step": spec.step, "state": state})
    net.rng.bit_generator.state = spec.rng
    net.epoch = spec.epoch
    net.history = history
    net.train(spec.training)
    net._engine.passes = spec.passes
    return net


def _reader(arrays):
    def read(name, shape, dtype):
        value = arrays.get(name)
        if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
            raise RecordError(f"array {name!r} is missing or has the wrong shape or dtype")
        return value
    return read


def rebuild(cls, header, arrays):
    """Unpickling: the network from its record (the arrays are already in memory)."""
    return from_record(cls, header, _reader(arrays))


def save(net, path):
    header, arrays = to_record(net)
    try:
        check(header, _reader(arrays))          # exactly the checks load will make
    except RecordError as e:
        raise ValueError(f"cannot save this network: {e}") from None
    encoded = np.frombuffer(json.dumps(header, allow_nan=False).encode(), dtype=np.uint8)
    checkpoint.write(path, {"header": encoded, **arrays})


def load(cls, path):
    with checkpoint.Archive(path) as archive:
        if not archive.has("header"):
            raise ValueError(f"{path}: not a backprop checkpoint (no header)")
        raw = archive.array("header", max_bytes=checkpoint.MAX_HEADER_BYTES)
        try:
            header = json.loads(raw.tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupted checkpoint header: {e}") from None
        except RecursionError:          # JSON's reader stops near 1000 levels
            raise ValueError(f"{path}: invalid backprop checkpoint: the header nests deeper "
                             f"than {MAX_DEPTH} levels") from None
        try:
            return from_record(cls, header, archive.array)
        except RecordError as e:
            raise ValueError(f"{path}: invalid backprop checkpoint: {e}") from None
