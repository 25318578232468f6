"""ONNX export: a network as a standard ONNX graph, for onnxruntime or any other server.

The graph computes the network in eval mode (batch-norm running statistics, dropout off),
in float32, on inputs named ``input`` of shape (batch, *input_shape) with a dynamic batch
dimension (int64 ids for an Embedding); its output ``output`` is what ``net.forward``
returns in eval mode (probabilities for a softmax or sigmoid output, as
``net.predict_proba``).  Each layer adds its own nodes (``Layer.to_onnx``).  Only standard
operators of the default domain at opset 17 are used, so any runtime implementing opset 17
runs it.
"""
import math

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as e:   # pragma: no cover - exercised only without onnx
    raise ImportError("backprop.interop.to_onnx needs onnx: pip install onnx") from e

import backprop
from backprop._atomic import write_atomically
from backprop.interop._layers import check_network
from backprop.layers import Residual

MIN_OPSET = 17   # LayerNormalization's first opset


def to_onnx(net, path, opset=MIN_OPSET):
    """Write `net` to `path` as an ONNX model (atomically: a temporary file, then a rename).

    Parameters
    ----------
    net : Network
    path : str or os.PathLike
        The file to write (its folder must exist); conventionally ``*.onnx``.
    opset : int, default 17
        The ONNX opset the model declares, from 17 to the newest the installed onnx knows.

    Returns
    -------
    onnx.ModelProto
        The model written (checked with ``onnx.checker``).

    Notes
    -----
    Float32 throughout: a float64 network's weights are rounded to float32.  Operators:
    Gemm (Dense; MatMul and Add on longer samples), Conv, MaxPool, AveragePool,
    GlobalAveragePool, Flatten, Gather (Embedding), Relu, Sigmoid, Tanh, LeakyRelu, Elu,
    Softplus, Softmax(axis=1), GELU built from Erf (the Gelu operator needs opset 20),
    BatchNormalization in inference form, LayerNormalization, Add (residual blocks), RNN,
    LSTM and GRU (one node per layer of a stack, their gates in ONNX's orders: LSTM i, o,
    f, c; GRU z, r, h with linear_before_reset=1; between Transposes, time first, and
    Reshape joining the directions), Gather (LastStep); dropout is the identity at
    inference.

    Examples
    --------
    >>> to_onnx(net, "model.onnx")
    >>> import onnxruntime
    >>> session = onnxruntime.InferenceSession("model.onnx")
    >>> probabilities, = session.run(None, {"input": X.astype("float32")})
    """
    check_network(net, "to_onnx")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) \
            or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"to_onnx: opset must be an integer from {MIN_OPSET} to {newest} (the "
                         f"newest the installed onnx {onnx.__version__} knows), got {opset!r}")
    with net.held():        # the weights of one step boundary, not a mix
        if not (np.isfinite(net.params).all() and np.isfinite(net.buffers).all()):
            raise ValueError("to_onnx: the network's weights or running statistics contain "
                             "NaN or Inf; nothing to export")
        graph = GraphBuilder()        # (its initializers are copies of the arrays)
        output = graph.add_layers(net.layers, "input", "layers", net.input_shape)
    if output == "input":        # layers that compute nothing at inference (dropout)
        output = graph.node("Identity", [output], "layers.identity")
    _rename(graph.nodes, output, "output")
    ids = net._plan.geometry[0].ids
    model = helper.make_model(
        helper.make_graph(
            graph.nodes, "backprop_network",
            [helper.make_tensor_value_info("input", TensorProto.INT64 if ids else TensorProto.FLOAT,
                                           ["batch", *net.input_shape])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                           ["batch", *net.output_shape])],
            graph.initializers),
        opset_imports=[helper.make_opsetid("", int(opset))],
        producer_name="backprop", producer_version=backprop.__version__,
        doc_string=repr(net))
    # The oldest IR version that carries this opset: runtimes older than onnx still load it.
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model, full_check=True)
    write_atomically(path, lambda f: f.write(model.SerializeToString()), suffix=".onnx")
    return model


def _rename(nodes, old, new):
    # The value the network outputs takes the graph output's name.
    for node in nodes:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new


class GraphBuilder:
    """Accumulates nodes and float32 initializers; names values after the layer they
    belong to (``layers.0.weight``, ``layers.0.gemm``, ...)."""

    def __init__(self):
        self.nodes = []
        self.initializers = []
        self._constants = {}   # scalar value -> initializer name, shared by all layers

    def tensor(self, name, array):
        self.initializers.append(numpy_helper.from_array(
            np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def integers(self, name, array):
        """An int64 initializer (indices, shapes; a scalar stays a scalar, which
        ascontiguousarray would make a vector)."""
        self.initializers.append(numpy_helper.from_array(np.array(array, dtype=np.int64),
                                                         name))
        return name

    def scalar(self, value):
        if value not in self._constants:
            self._constants[value] = self.tensor(f"const_{len(self._constants)}",
                                                 np.array(value, dtype=np.float32))
        return self._constants[value]

    def node(self, op, inputs, name, **attributes):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def add_layers(self, layers, x, where, shape):
        """Nodes computing `layers` on the value named `x` (samples of `shape`); returns
        the output's name."""
        for i, layer in enumerate(layers):
            here = f"{where}.{i}"
            x = layer.to_onnx(self, x, here, shape)
            if getattr(layer, "takes_activation", False):
                x = self.activation(layer.activation, x, here)
            shape = shape if isinstance(layer, Residual) else layer.output_shape(shape)
        return x

    def affine(self, layer, size, here):
        """A normalization's scale and shift tensors; ones and zeros when it has none."""
        weight = getattr(layer, "weight", None)
        bias = getattr(layer, "bias", None)
        return (self.tensor(f"{here}.weight", np.ones(size) if weight is None else weight),
                self.tensor(f"{here}.bias", np.zeros(size) if bias is None else bias))

    def activation(self, name, x, here):
        """Nodes computing backprop's activation `name` on `x` (same definitions)."""
        simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh",
                  # backprop's softplus is x itself above 20, ONNX's log(1 + e^x) everywhere:
                  # they differ by log(1 + e^-x) < 2.1e-9 there, below float32's spacing
                  # (1.9e-6) at 20, so the float32 results agree.
                  "softplus": "Softplus"}
        if name == "identity":
            return x
        if name in simple:
            return self.node(simple[name], [x], f"{here}.{name}")
        if name == "leaky_relu":
            return self.node("LeakyRelu", [x], f"{here}.{name}", alpha=0.01)
        if name == "elu":
            return self.node("Elu", [x], f"{here}.{name}", alpha=1.0)
        if name == "softmax":
            return self.node("Softmax", [x], f"{here}.{name}", axis=1)
        if name == "gelu":
            # Exact GELU, x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))), from Erf: the Gelu
            # operator only exists from opset 20.
            scaled = self.node("Mul", [x, self.scalar(1 / math.sqrt(2))], f"{here}.gelu_scaled")
            erf = self.node("Erf", [scaled], f"{here}.gelu_erf")
            one_plus = self.node("Add", [erf, self.scalar(1.0)], f"{here}.gelu_one_plus")
            half_x = self.node("Mul", [x, self.scalar(0.5)], f"{here}.gelu_half_x")
            return self.node("Mul", [half_x, one_plus], f"{here}.gelu")
        raise ValueError(f"to_onnx: {here} has activation {name!r}, which has no ONNX export")
