"""RNN, LSTM, GRU and LastStep (kernels: _recurrent.pxd)."""
import math

import numpy as np

from backprop._core import ACTIVATIONS, RECURRENT_CELLS
from backprop.layers.base import (Layer, Param, copy_to_torch, describe, flag, positive_int,
                                  register, unsupported)

# The most values a layer's parameters may hold (as a sample anywhere in a network: see
# plan.MAX_SAMPLE_VALUES), and the most layers in one stack (each brings four arrays, each
# an attribute): sizes beyond them are refused by name before any array exists.
MAX_PARAMETER_VALUES = 1 << 40
MAX_LAYERS = 1024


class Recurrent(Layer):
    """What RNN, LSTM and GRU share: a stack of `num_layers` recurrences over the time
    steps of (time, input_size) samples, each layer's output the next one's input, run
    forward in time and, when bidirectional, backward in time as well."""

    kernel = "recurrent"
    cell = None                     # the recurrence: a key of backprop._core.RECURRENT_CELLS
    input_layout = "first"          # a step's features adjacent, the steps one after another
    output_layout = "first"
    backward_reads_result = True    # the states h: previous states, the RNN's derivative
    # The kernels take the first (layer, direction)'s arrays; they find the others after
    # them in the order parameters() lists them (the planner lays a layer's parameters out
    # one after another, in that order).
    kernel_params = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    onnx_operator = None            # ONNX's operator for the cell
    onnx_gates = ()                 # PyTorch's gate blocks, in the order ONNX's takes them

    def __init__(self, input_size, hidden_size, *, num_layers=1, bias=True,
                 bidirectional=False):
        name = type(self).__name__
        self.input_size = positive_int(name, "input_size", input_size)
        self.hidden_size = positive_int(name, "hidden_size", hidden_size)
        self.num_layers = positive_int(name, "num_layers", num_layers)
        if self.num_layers > MAX_LAYERS:
            raise ValueError(f"{name}: num_layers must be at most {MAX_LAYERS}, got "
                             f"{self.num_layers}")
        self.use_bias = flag(name, "bias", bias)
        self.bidirectional = flag(name, "bidirectional", bidirectional)
        rows, width = self.gates * self.hidden_size, self.directions * self.hidden_size
        values = self.directions * rows * (
            self.input_size + (self.num_layers - 1) * width + self.num_layers
            * (self.hidden_size + (2 if self.use_bias else 0)))
        if values > MAX_PARAMETER_VALUES:
            raise ValueError(f"{name}: input_size={self.input_size}, hidden_size="
                             f"{self.hidden_size} and num_layers={self.num_layers} make "
                             f"{values:,} parameters, more than {MAX_PARAMETER_VALUES:,}")
        for param in self.parameters():
            setattr(self, param.name, None)
            setattr(self, f"{param.name}_grad", None)
        self._freeze()

    @property
    def gates(self):
        """Rows of the weights per hidden unit."""
        return RECURRENT_CELLS[self.cell][1]

    @property
    def directions(self):
        return 2 if self.bidirectional else 1

    def output_shape(self, shape):
        if len(shape) != 2 or shape[1] != self.input_size:
            raise ValueError(f"takes sequences of shape (time, {self.input_size}) (a batch is "
                             f"(batch, time, {self.input_size}): batch first), but its input is "
                             f"{describe(shape)}")
        return (shape[0], self.directions * self.hidden_size)

    def parameters(self):
        """PyTorch's names, shapes and order: per layer k, per direction (the reverse one
        suffixed _reverse), weight_ih_l{k} (gates * hidden_size, its input),
        weight_hh_l{k} (gates * hidden_size, hidden_size), bias_ih_l{k}, bias_hh_l{k}."""
        rows = self.gates * self.hidden_size
        params = []
        for k in range(self.num_layers):
            width = self.input_size if k == 0 else self.directions * self.hidden_size
            for suffix in ("", "_reverse")[:self.directions]:
                params += [Param(f"weight_ih_l{k}{suffix}", (rows, width), True),
                           Param(f"weight_hh_l{k}{suffix}", (rows, self.hidden_size), True)]
                if self.use_bias:
                    params += [Param(f"bias_ih_l{k}{suffix}", (rows,), False),
                               Param(f"bias_hh_l{k}{suffix}", (rows,), False)]
        return params

    def initial_parameters(self, rng):
        # PyTorch's: every array uniform in +-1/sqrt(hidden_size), drawn in its order.
        limit = 1.0 / math.sqrt(self.hidden_size)
        return {p.name: rng.uniform(-limit, limit, size=p.shape) for p in self.parameters()}

    def record(self, x):
        return {"recurrence": {"cell": RECURRENT_CELLS[self.cell][0],
                               "hidden": self.hidden_size, "layers": self.num_layers,
                               "directions": self.directions,
                               "nonlinearity": ACTIVATIONS[self._nonlinearity()]}}

    def _nonlinearity(self):
        return "identity"           # LSTM and GRU fix their own

    def saved(self, x):
        # Per sample, in values of the network's dtype (a float32 network uses half of
        # each double): every layer's output but the last's, and what each cell keeps per
        # step and direction (see _recurrent.pxd).
        time, kept = x.shape[0], RECURRENT_CELLS[self.cell][2]
        return (0, time * self.directions * self.hidden_size
                * ((self.num_layers - 1) + self.num_layers * kept))

    def config(self):
        return {"input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "bias": self.use_bias,
                "bidirectional": self.bidirectional}

    def to_torch(self, nn, dtype, shape):
        from backprop.interop import pytorch
        module = getattr(pytorch, self.torch_names[0])(
            self.input_size, self.hidden_size, dtype=dtype, **self._torch_options())
        return [copy_to_torch(module, self)]

    def _torch_options(self):
        return {"num_layers": self.num_layers, "bias": self.use_bias,
                "bidirectional": self.bidirectional}

    @classmethod
    def from_torch(cls, module, path):
        if not module.batch_first:
            raise unsupported(path, module, "is not supported: backprop's recurrent layers "
                              "take batch-first sequences (batch_first=True)")
        if module.dropout:
            raise unsupported(path, module, f"is not supported: backprop's {cls.__name__} has no "
                              "dropout between its layers (dropout=0)")
        if getattr(module, "proj_size", 0):
            raise unsupported(path, module, "is not supported: backprop's LSTM has no "
                              "projection (proj_size=0)")
        return cls(module.input_size, module.hidden_size, num_layers=module.num_layers,
                   bias=module.bias, bidirectional=module.bidirectional,
                   **cls._options_from_torch(module))

    @classmethod
    def _options_from_torch(cls, module):
        return {}

    def to_onnx(self, graph, x, here, shape):
        # ONNX's operator is one layer of both directions, its gates in its own order
        # (onnx_gates), on sequences time first (onnxruntime refuses layout=1, batch first):
        # the sequence is transposed on the way in and out, and each layer's (time,
        # directions, batch, hidden) output joined into (time, batch, directions * hidden)
        # for the next.
        sequence = graph.node("Transpose", [x], f"{here}.time_first", perm=[1, 0, 2])
        join = graph.integers(f"{here}.join_shape", np.array([0, 0, -1]))
        for k in range(self.num_layers):
            suffixes = ("", "_reverse")[:self.directions]
            at = f"{here}.l{k}"
            inputs = [sequence,
                      graph.tensor(f"{at}.W", np.stack([self._onnx_rows(f"weight_ih_l{k}{s}")
                                                       for s in suffixes])),
                      graph.tensor(f"{at}.R", np.stack([self._onnx_rows(f"weight_hh_l{k}{s}")
                                                       for s in suffixes]))]
            if self.use_bias:
                inputs.append(graph.tensor(f"{at}.B", np.stack([np.concatenate([
                    self._onnx_rows(f"bias_ih_l{k}{s}"), self._onnx_rows(f"bias_hh_l{k}{s}")])
                    for s in suffixes])))
            out = graph.node(self.onnx_operator, inputs, f"{at}.{self.cell}",
                             hidden_size=self.hidden_size,
                             direction="bidirectional" if self.bidirectional else "forward",
                             **self._onnx_attributes())
            out = graph.node("Transpose", [out], f"{at}.directions_inside", perm=[0, 2, 1, 3])
            sequence = graph.node("Reshape", [out, join], f"{at}.join")
        return graph.node("Transpose", [sequence], f"{here}.batch_first", perm=[1, 0, 2])

    def _onnx_attributes(self):
        return {}

    def _onnx_rows(self, name):
        """Array `name` with its gate blocks in ONNX's order."""
        blocks = np.split(np.asarray(getattr(self, name)), self.gates)
        return np.concatenate([blocks[i] for i in self.onnx_gates])

    def __repr__(self):
        options = ", ".join(f"{key}={value!r}" for key, value in self.config().items()
                            if key not in ("input_size", "hidden_size"))
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}, {options})"


@register
class RNN(Recurrent):
    """An Elman recurrent network, as ``torch.nn.RNN(batch_first=True)``: per step
    ``h = nonlinearity(x @ W_ih.T + b_ih + h' @ W_hh.T + b_hh)``, h' the previous step's h
    (zero before the first step).

    Takes samples of shape (time, input_size) (a batch is (batch, time, input_size): batch
    first) and gives (time, hidden_size * directions): every step's h, both directions'
    side by side when bidirectional (the reverse direction runs from the last step to the
    first).  With num_layers > 1, each layer's output sequence is the next one's input.
    Trained by backpropagation through time; the initial state is zero.

    Parameters
    ----------
    input_size, hidden_size : int
    nonlinearity : {"tanh", "relu"}
    num_layers : int
    bias : bool
    bidirectional : bool
        (All after hidden_size by keyword: PyTorch's positional order is not this one's.)

    Attributes (once part of a Network): PyTorch's, ``weight_ih_l{k}`` (hidden_size,
    input of layer k), ``weight_hh_l{k}`` (hidden_size, hidden_size), ``bias_ih_l{k}``,
    ``bias_hh_l{k}`` (hidden_size,), the reverse direction's with the suffix ``_reverse``,
    and each one's ``..._grad``; all start uniform in +-1/sqrt(hidden_size), drawn from the
    network's seed.  The weight matrices are weights (the L2 penalty, gradient norms).
    """

    cell = "rnn"
    torch_names = ("TorchRNN",)
    onnx_operator, onnx_gates = "RNN", (0,)

    def __init__(self, input_size, hidden_size, *, nonlinearity="tanh", num_layers=1,
                 bias=True, bidirectional=False):
        if not isinstance(nonlinearity, str) or nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got "
                             f"{nonlinearity!r:.80}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers=num_layers, bias=bias,
                         bidirectional=bidirectional)

    def _nonlinearity(self):
        return self.nonlinearity

    def config(self):
        return {**super().config(), "nonlinearity": self.nonlinearity}

    def _torch_options(self):
        return {"nonlinearity": self.nonlinearity, **super()._torch_options()}

    @classmethod
    def _options_from_torch(cls, module):
        return {"nonlinearity": module.nonlinearity}

    def _onnx_attributes(self):
        return {"activations": [self.nonlinearity.capitalize()] * self.directions}


@register
class LSTM(Recurrent):
    """Long short-term memory, as ``torch.nn.LSTM(batch_first=True)``: per step, with
    gates i, f, g, o in PyTorch's order in the rows of the weights,
    ``i, f, o = sigmoid(...)``, ``g = tanh(...)`` of ``x @ W_ih.T + b_ih + h' @ W_hh.T +
    b_hh``, then ``c = f * c' + i * g`` and ``h = o * tanh(c)``; h' and c' start at zero.

    Shapes, arguments (without nonlinearity) and attributes as for ``RNN``, with 4 *
    hidden_size rows in each weight and bias.  The output is every step's h (PyTorch's
    ``output``; the final c is not returned).
    """

    cell = "lstm"
    torch_names = ("TorchLSTM",)
    onnx_operator, onnx_gates = "LSTM", (0, 3, 1, 2)      # ONNX's i, o, f, c


@register
class GRU(Recurrent):
    """Gated recurrent units, as ``torch.nn.GRU(batch_first=True)``: per step, with gates
    r, z, n in PyTorch's order, ``r = sigmoid(W_ir x + b_ir + W_hr h' + b_hr)``, z
    likewise, ``n = tanh(W_in x + b_in + r * (W_hn h' + b_hn))`` (PyTorch's placement of
    the reset gate: on the recurrent product with its bias) and ``h = (1 - z) * n + z *
    h'``; h' starts at zero.

    Shapes, arguments (without nonlinearity) and attributes as for ``RNN``, with 3 *
    hidden_size rows in each weight and bias.
    """

    cell = "gru"
    torch_names = ("TorchGRU",)
    onnx_operator, onnx_gates = "GRU", (1, 0, 2)          # ONNX's z, r, h

    def _onnx_attributes(self):
        # r on W_hn h' + b_hn, as here (ONNX's default puts it on h' before the product).
        return {"linear_before_reset": 1}


@register
class LastStep(Layer):
    """The last time step of each sequence: (time, features) becomes (features,), as
    ``output[:, -1]`` on a batch-first PyTorch output.  After a recurrent layer it turns a
    sequence into one row of features, for a classifier:
    ``[LSTM(28, 128), LastStep(), Dense(128, 10, activation="softmax")]``.

    For a bidirectional layer this is the output at the last time index, as PyTorch's
    ``output[:, -1]``: the forward direction's state after the whole sequence, but the
    reverse direction's after only the last step (its state after the whole sequence is
    its output at the first index)."""

    kernel = "last_step"
    input_layout = "first"
    output_layout = "first"
    torch_names = ("TorchLastStep",)

    def __init__(self):
        self._freeze()

    def output_shape(self, shape):
        if len(shape) != 2:
            raise ValueError(f"takes sequences of shape (time, features), but its input is "
                             f"{describe(shape)}")
        return (shape[1],)

    def config(self):
        return {}

    def to_torch(self, nn, dtype, shape):
        from backprop.interop.pytorch import TorchLastStep
        return [TorchLastStep()]

    @classmethod
    def from_torch(cls, module, path):
        return cls()

    def to_onnx(self, graph, x, here, shape):
        # Gather with a scalar index drops the time axis: (batch, time, f) -> (batch, f).
        last = graph.integers(f"{here}.index", np.array(shape[0] - 1))
        return graph.node("Gather", [x, last], f"{here}.gather", axis=1)

    def __repr__(self):
        return "LastStep()"
