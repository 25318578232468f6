"""ONNX export: onnxruntime runs the exported graph with the network's own outputs."""
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import backprop as bp  # noqa: E402
from backprop.interop import to_onnx  # noqa: E402
from cnn_oracle import CNNS, embedding_net, lenet, residual_cnn, sample  # noqa: E402
from layer_oracle import non_trivial  # noqa: E402

ACTIVATIONS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "softplus",
               "softmax"]
# The ONNX operators each activation must be built from (opset 17 has no Gelu operator).
OPERATORS = {"identity": set(), "sigmoid": {"Sigmoid"}, "tanh": {"Tanh"}, "relu": {"Relu"},
             "leaky_relu": {"LeakyRelu"}, "elu": {"Elu"}, "gelu": {"Erf", "Mul", "Add"},
             "softplus": {"Softplus"}, "softmax": {"Softmax"}}
# onnxruntime and backprop compute the same float32 operations in different orders and with
# their own exp/erf/tanh: agreement to 1e-5 is the bar set for export.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def run(path, x):
    """The model's output on x: float32 values, or int64 ids."""
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    x = np.asarray(x)
    return session.run(None, {"input": x.astype(np.int64 if x.dtype.kind in "iu"
                                                 else np.float32)})[0]


def make_net(activation, dtype="float32", sizes=(6, 8, 5, 4), bias=True, loss=None, seed=0):
    layers = [bp.Dense(a, b, activation=activation, bias=bias) for a, b in zip(sizes, sizes[1:])]
    net = bp.Network(layers, loss=loss, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for layer in layers:
        if bias:
            layer.bias[...] = rng.normal(0, 0.5, layer.out_features)
    return net


def inputs(rows, columns=6, seed=0, scale=4.0):
    # A wide spread of inputs reaches each activation's saturated regions (softplus > 20,
    # sigmoid and tanh near 0 and 1).
    return (np.random.default_rng(seed).normal(size=(rows, columns)) * scale).astype(np.float32)


def test_the_activations_covered_are_backprops():
    assert sorted(ACTIVATIONS) == sorted(bp.ACTIVATIONS) == sorted(OPERATORS)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_runs_in_onnxruntime_with_the_same_outputs(activation, tmp_path):
    net = make_net(activation)
    path = tmp_path / "model.onnx"
    model = to_onnx(net, path)
    ops = {node.op_type for node in model.graph.node}
    assert ops == {"Gemm"} | OPERATORS[activation]
    assert onnx.load(path) == model                                     # what was written
    for rows in (1, 9, 300):                                             # dynamic batch
        x = inputs(rows, seed=rows)
        np.testing.assert_allclose(run(path, x), net.forward(x), **TOLERANCE)


def test_the_graph_is_standard_opset_17_with_a_dynamic_batch(tmp_path):
    model = to_onnx(make_net("gelu"), tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"), full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert "Gelu" not in {node.op_type for node in model.graph.node}   # opset 20 only
    (given,), (output,) = model.graph.input, model.graph.output
    assert given.name == "input" and output.name == "output"
    for value, features in ((given, 6), (output, 4)):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        batch, columns = value.type.tensor_type.shape.dim
        assert batch.dim_param == "batch" and columns.dim_value == features


def test_a_newer_opset(tmp_path):
    net = make_net("gelu")
    model = to_onnx(net, tmp_path / "m.onnx", opset=20)
    assert model.opset_import[0].version == 20
    x = inputs(5)
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), net.forward(x), **TOLERANCE)


def test_layers_without_bias(tmp_path):
    net = make_net("tanh", bias=False)
    model = to_onnx(net, tmp_path / "m.onnx")
    assert all(len(node.input) == 2 for node in model.graph.node if node.op_type == "Gemm")
    x = inputs(7)
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), net.forward(x), **TOLERANCE)


@pytest.mark.parametrize("output, loss, columns", [("softmax", "cross_entropy", 4),
                                                   ("sigmoid", "binary_cross_entropy", 1)])
def test_classifier_probabilities(output, loss, columns, tmp_path):
    net = bp.Network([bp.Dense(6, 10, "relu"), bp.Dense(10, columns, output)], loss=loss, seed=2)
    to_onnx(net, tmp_path / "m.onnx")
    x = inputs(50)
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), net.predict_proba(x), **TOLERANCE)


def test_a_float64_network_is_exported_in_float32(tmp_path):
    net = make_net("elu", dtype="float64")
    model = to_onnx(net, tmp_path / "m.onnx")
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])
    assert weight.dtype == np.float32
    np.testing.assert_array_equal(weight, net.layers[0].weight.astype(np.float32))
    x = inputs(11)
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), net.forward(x.astype(np.float64)),
                               **TOLERANCE)


def test_the_file_is_replaced_whole_and_no_temporary_file_stays(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an older model")
    net = make_net("relu")
    to_onnx(net, path)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    x = inputs(3)
    np.testing.assert_allclose(run(path, x), net.forward(x), **TOLERANCE)


def test_a_missing_folder_is_a_clear_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "no such folder"
    with pytest.raises(FileNotFoundError, match="the folder .*no such folder does not exist"):
        to_onnx(make_net("relu"), missing / "m.onnx")
    assert not missing.exists()


def test_a_folder_as_path_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        to_onnx(make_net("relu"), tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("opset", [16, 10_000, "17", 17.0, True])
def test_bad_opsets(opset, tmp_path):
    with pytest.raises(ValueError, match="opset must be an integer from 17 to"):
        to_onnx(make_net("relu"), tmp_path / "m.onnx", opset=opset)
    assert os.listdir(tmp_path) == []


def test_what_cannot_be_exported(tmp_path):
    with pytest.raises(TypeError, match="to_onnx: net must be a backprop.Network, got list"):
        to_onnx([bp.Dense(2, 2)], tmp_path / "m.onnx")
    net = make_net("relu")
    net.layers[1].weight[0, 0] = np.nan
    path = tmp_path / "m.onnx"
    path.write_bytes(b"kept")
    with pytest.raises(ValueError, match="weights or running statistics contain NaN or Inf"):
        to_onnx(net, path)
    assert path.read_bytes() == b"kept"


def full_net(dtype="float32", seed=0, loss=None):
    """Every layer type and option, with weights and running statistics away from their
    first values (so that each one matters)."""
    net = bp.Network([
        bp.Dense(6, 8),
        bp.BatchNorm(8),
        bp.Activation("relu"),
        bp.Dropout(0.4),
        bp.Residual(bp.Dense(8, 8, activation="tanh"), bp.LayerNorm(8), bp.Dense(8, 8),
                    bp.Dropout(0.1)),
        bp.Activation("gelu"),
        bp.BatchNorm(8, eps=1e-3, momentum=0.3, affine=False),
        bp.LayerNorm(8, eps=1e-4, elementwise_affine=False),
        bp.Residual(bp.Dropout(0.5)),          # x + x at inference
        bp.Dense(8, 4, activation="softmax"),
    ], dtype=dtype, seed=seed, loss=loss)
    return non_trivial(net, seed + 1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_layer_type_in_eval_form(dtype, tmp_path):
    net = full_net(dtype)                     # in train mode: the export is eval-mode anyway
    model = to_onnx(net, tmp_path / "m.onnx")
    assert net.training                       # the network's mode is left alone
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("BatchNormalization") == 2 and ops.count("LayerNormalization") == 2
    assert ops.count("Add") == 2 + 1          # two residual sums, one in GELU
    assert "Dropout" not in ops
    for rows in (1, 2, 33):
        x = inputs(rows, seed=rows)
        np.testing.assert_allclose(run(tmp_path / "m.onnx", x), net.eval().forward(x),
                                   **TOLERANCE)
        net.train()


def test_batchnorm_uses_the_running_statistics(tmp_path):
    net = bp.Network([bp.Dense(6, 5), bp.BatchNorm(5)], seed=0)
    net.layers[1].running_mean[...] = [1, -2, 3, 0.5, 0]
    net.layers[1].running_var[...] = [4, 0.25, 1, 2, 9]
    net.layers[1].weight[...] = [1, 2, 0.5, -1, 3]
    to_onnx(net, tmp_path / "m.onnx")
    x = inputs(4)
    z = x @ net.layers[0].weight.T                      # the Dense output (zero bias)
    layer = net.layers[1]
    by_hand = (layer.weight * (z - layer.running_mean) / np.sqrt(layer.running_var + layer.eps)
               + layer.bias)
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), by_hand, **TOLERANCE)


def test_classifier_with_every_layer_type_gives_predict_proba(tmp_path):
    net = full_net(loss="cross_entropy")
    to_onnx(net, tmp_path / "m.onnx")
    x = inputs(40)
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), net.predict_proba(x), **TOLERANCE)


def test_non_finite_running_statistics_are_refused(tmp_path):
    net = full_net()
    net.layers[1].running_var[2] = np.inf
    with pytest.raises(ValueError, match="running statistics contain NaN or Inf"):
        to_onnx(net, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


# ------------------------------------------ convolutions, pooling, Flatten and Embedding

GELU = ["Mul", "Erf", "Add", "Mul", "Mul"]
# The operators each network must become, in order.
CNN_OPERATORS = {
    "cnn_2d": ["Conv", "Relu", "BatchNormalization", "MaxPool", "AveragePool",
               "Conv", "LayerNormalization", "Add", "GlobalAveragePool", "Conv", "Tanh",
               "Flatten", "Gemm", "Softmax"],
    "cnn_1d": ["Conv", *GELU, "MaxPool", "AveragePool", "BatchNormalization", "Conv",
               "GlobalAveragePool", "Flatten", "Gemm"],
    "ids_net": ["Gather", "MatMul", "Add", "Elu", "LayerNormalization", "Flatten", "Gemm",
                "Softmax"],
    "lenet": ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu",
              "Gemm", "Relu", "Gemm", "Softmax"],
    "residual_cnn": ["Conv", "BatchNormalization", "Relu",
                     *["Conv", "BatchNormalization", "Relu", "Conv", "BatchNormalization",
                       "Add", "Relu"] * 2, "GlobalAveragePool", "Flatten", "Gemm", "Softmax"],
    "embedding_net": ["Gather", "Flatten", "Gemm", "Softmax"],
}
MAKERS = {**CNNS, "lenet": lenet, "residual_cnn": residual_cnn, "embedding_net": embedding_net}


def shape_of(value):
    dims = value.type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", CNN_OPERATORS)
def test_convolutional_and_embedding_networks_export(name, dtype, tmp_path):
    net = MAKERS[name](dtype=dtype)
    model = to_onnx(net, tmp_path / "m.onnx")
    assert [node.op_type for node in model.graph.node] == CNN_OPERATORS[name]
    (given,), (output,) = model.graph.input, model.graph.output
    ids = name in ("ids_net", "embedding_net")
    assert given.type.tensor_type.elem_type == (onnx.TensorProto.INT64 if ids
                                                else onnx.TensorProto.FLOAT)
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert shape_of(given) == ["batch", *net.input_shape]
    assert shape_of(output) == ["batch", *net.output_shape]
    net.eval()
    for rows in (1, 7):
        x = sample(net, n=rows, seed=rows)
        out = run(tmp_path / "m.onnx", x)
        assert out.shape == (rows,) + net.output_shape
        np.testing.assert_allclose(out, net.forward(x), **TOLERANCE)


def test_the_convolution_attributes_are_torchs(tmp_path):
    """Conv keeps groups, strides, pads (both sides) and dilations; the pooling windows
    theirs; AveragePool whether the padding counts."""
    model = to_onnx(MAKERS["cnn_2d"](), tmp_path / "m.onnx")
    attributes = {node.name: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                  for node in model.graph.node}
    assert attributes["layers.0.conv"] == {"group": 2, "kernel_shape": [3, 2], "strides": [2, 1],
                                           "pads": [1, 0, 1, 0], "dilations": [1, 2]}
    assert attributes["layers.2.maxpool"] == {"kernel_shape": [3, 3], "strides": [1, 1],
                                              "pads": [1, 1, 1, 1], "dilations": [2, 2]}
    assert attributes["layers.3.avgpool"] == {"count_include_pad": 0, "kernel_shape": [2, 2],
                                              "strides": [2, 2], "pads": [1, 1, 1, 1]}


# ---- recurrent layers: ONNX's RNN, LSTM and GRU operators, their gates in ONNX's orders

RECURRENT = {"RNN": lambda **k: bp.RNN(3, 5, nonlinearity="relu", **k),
             "RNN-tanh": lambda **k: bp.RNN(3, 5, **k),
             "LSTM": lambda **k: bp.LSTM(3, 5, **k), "GRU": lambda **k: bp.GRU(3, 5, **k)}


@pytest.mark.parametrize("options", [dict(), dict(num_layers=2, bidirectional=True),
                                     dict(bias=False, bidirectional=True),
                                     dict(num_layers=3, bias=False)],
                         ids=["one-layer", "two-layers-bidirectional", "no-bias-bidirectional",
                              "three-layers-no-bias"])
@pytest.mark.parametrize("kind", RECURRENT)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_recurrent_layers_export(kind, options, dtype, tmp_path):
    layer = RECURRENT[kind](**options)
    width = layer.hidden_size * layer.directions
    net = non_trivial(bp.Network([layer], dtype=dtype, seed=0, input_shape=(6, 3)), 1)
    model = to_onnx(net, tmp_path / "m.onnx")
    operator = kind.split("-")[0]
    assert [node.op_type for node in model.graph.node] == (
        ["Transpose"] + [operator, "Transpose", "Reshape"] * layer.num_layers + ["Transpose"])
    assert shape_of(model.graph.output[0]) == ["batch", 6, width]
    for rows in (1, 7):
        x = sample(net, n=rows, seed=rows) * 2
        out = run(tmp_path / "m.onnx", x)
        assert out.shape == (rows, 6, width)
        np.testing.assert_allclose(out, net.forward(x), **TOLERANCE)


def test_a_sequence_classifier_exports(tmp_path):
    net = non_trivial(bp.Network([bp.GRU(4, 6, bidirectional=True), bp.LSTM(12, 5),
                                  bp.LastStep(), bp.Dense(5, 3, activation="softmax")],
                                 loss="cross_entropy", seed=0, input_shape=(9, 4)), 1)
    model = to_onnx(net, tmp_path / "m.onnx")
    assert [node.op_type for node in model.graph.node][-3:] == ["Gather", "Gemm", "Softmax"]
    x = sample(net, n=5)
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), net.predict_proba(x), **TOLERANCE)
