"""RNN, LSTM, GRU and LastStep against PyTorch in float64: each cell with one, two and
three layers, one and both directions, sequences of 1 to 7 steps and odd sizes; outputs,
loss, every parameter's gradient, the input's gradient and the weights after Adam steps,
to 1e-9 relative, as the output layer and between other layers, in both modes; and the
converters (to_torch, from_torch, TorchModule) on networks of them.

The torch twins are written here from the layers' arguments (torch.nn.RNN, LSTM and GRU
with batch_first=True, their output only), independently of backprop.interop."""
import numpy as np
import pytest

import backprop as bp
from cnn_oracle import Case, case_tests, compare_module_gradients, torch_activation

torch = pytest.importorskip("torch")
nn = torch.nn

from backprop.interop import (TorchGRU, TorchLSTM, TorchLastStep, TorchModule,  # noqa: E402
                              TorchRNN, from_torch, to_torch)
from layer_oracle import non_trivial  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")

LAYERS = {"RNN": bp.RNN, "LSTM": bp.LSTM, "GRU": bp.GRU}


class Output(nn.Module):
    """A torch recurrent module's output sequence (it also returns the final states)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)[0]


class Last(nn.Module):
    def forward(self, x):
        return x[:, -1]


def recurrent(kind, time, input_size=3, hidden_size=5, last_step=False, activation=None,
              **options):
    """A Case of one recurrent layer (and LastStep, or an Activation, after it) on (time,
    input_size) samples; its twin is torch.nn.<kind>(..., batch_first=True) with the same
    options."""

    def layers():
        made = [LAYERS[kind](input_size, hidden_size, **options)]
        made += [bp.LastStep()] if last_step else []
        return made + ([bp.Activation(activation)] if activation else [])

    def torch_modules(net, made):
        module = getattr(nn, kind)(input_size, hidden_size, batch_first=True,
                                   dtype=torch.float64, **options)
        return ([Output(module)] + ([Last()] if last_step else [])
                + ([torch_activation(activation)] if activation else []))

    return Case(layers, torch_modules, (time, input_size))


CELLS = {"rnn-tanh": ("RNN", {}), "rnn-relu": ("RNN", {"nonlinearity": "relu"}),
         "lstm": ("LSTM", {}), "gru": ("GRU", {})}
CASES = {}
for _cell, (_kind, _extra) in CELLS.items():
    for _layers in (1, 2):
        for _bidirectional in (False, True):
            for _time in (1, 4):
                _name = f"{_layers}-layers-{'bi' if _bidirectional else 'uni'}-{_time}-steps"
                CASES[f"{_cell}-{_name}"] = recurrent(_kind, _time, num_layers=_layers,
                                                      bidirectional=_bidirectional, **_extra)
    # Three layers (the layers below the top one take turns with two gradient buffers),
    # no bias, input wider than the state, LastStep after a bidirectional stack.
    CASES[f"{_cell}-3-layers-bi-3-steps"] = recurrent(_kind, 3, num_layers=3,
                                                      bidirectional=True, **_extra)
    CASES[f"{_cell}-no-bias-7-steps"] = recurrent(_kind, 7, input_size=6, hidden_size=4,
                                                  bias=False, **_extra)
    CASES[f"{_cell}-last-step-2-layers-bi-6-steps"] = recurrent(
        _kind, 6, num_layers=2, bidirectional=True, last_step=True, **_extra)
    # One hidden unit (the products' thinnest forms).
    CASES[f"{_cell}-1-unit-2-layers-bi-3-steps"] = recurrent(
        _kind, 3, input_size=1, hidden_size=1, num_layers=2, bidirectional=True, **_extra)
    # An activation after the layer joins its record, and must not overwrite the states
    # its backward reads.
    CASES[f"{_cell}-then-relu-2-layers-5-steps"] = recurrent(_kind, 5, num_layers=2,
                                                             activation="relu", **_extra)

# Central differences for every case as the output layer, and for these in both places
# and both modes.
FD_EVERYWHERE = [f"{cell}-2-layers-bi-4-steps" for cell in CELLS] + [
    "lstm-last-step-2-layers-bi-6-steps", "gru-no-bias-7-steps",
    "rnn-tanh-then-relu-2-layers-5-steps"]

(test_matches_torch, test_adam_steps_match_torch, test_finite_differences_as_the_output_layer,
 test_finite_differences) = case_tests(CASES, FD_EVERYWHERE)


def test_the_cases_cover_every_recurrent_kind():
    assert {kind for kind, _ in CELLS.values()} == set(LAYERS)
    assert {name for name, cls in bp.layers.LAYERS.items()
            if issubclass(cls, bp.layers.recurrent.Recurrent)} == set(LAYERS)


@pytest.mark.parametrize("batch", [1, 2, 9])
@pytest.mark.parametrize("cell", CELLS)
def test_every_batch_size_matches_torch(cell, batch, rng):
    """From one sequence (each product a single row) up; one step, whose samples the
    workspace pads, and several."""
    from cnn_oracle import compare_pass, twin
    kind, extra = CELLS[cell]
    for time in (1, 3):
        net = bp.Network([LAYERS[kind](4, 6, num_layers=2, bidirectional=True, **extra)],
                         loss="mse", dtype="float64", seed=1, input_shape=(time, 4))
        module = getattr(nn, kind)(4, 6, num_layers=2, bidirectional=True, batch_first=True,
                                   dtype=torch.float64, **extra)
        compare_pass(net, twin(net, [Output(module)]), rng.normal(size=(batch, time, 4)),
                     rng.normal(size=(batch, time, 12)))


def test_a_sequence_classifier_trains_like_torch(rng):
    """The issue's classifier, smaller: LSTM, LastStep, Dense + softmax with cross-entropy,
    Adam steps on different batches against torch.optim.Adam."""
    from cnn_oracle import compare_training, twin
    net = bp.Network([bp.LSTM(7, 9), bp.LastStep(), bp.Dense(9, 4, activation="softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(lr=1e-2), dtype="float64",
                     seed=3, input_shape=(11, 7))
    lstm = nn.LSTM(7, 9, batch_first=True, dtype=torch.float64)
    model = twin(net, [Output(lstm), Last(), nn.Linear(9, 4, dtype=torch.float64)])
    batches = [(rng.normal(size=(6, 11, 7)), rng.integers(0, 4, 6)) for _ in range(4)]
    compare_training(net, model, batches)


# ---- the converters


def sequence_net(dtype="float64", seed=0):
    """Every recurrent kind and option the converters know, arrays away from their first
    values."""
    return non_trivial(bp.Network([
        bp.GRU(3, 5, num_layers=2, bidirectional=True),
        bp.RNN(10, 4, nonlinearity="relu"),
        bp.LSTM(4, 6, bias=False, bidirectional=True),
        bp.RNN(12, 3, bias=False, num_layers=2),
        bp.LastStep(), bp.Dense(3, 2, activation="softmax"),
    ], input_shape=(7, 3), dtype=dtype, seed=seed), seed + 1)


def expected_modules(dtype):
    d = {"dtype": dtype}
    return [TorchGRU(3, 5, num_layers=2, bidirectional=True, **d),
            TorchRNN(10, 4, nonlinearity="relu", **d),
            TorchLSTM(4, 6, bias=False, bidirectional=True, **d),
            TorchRNN(12, 3, bias=False, num_layers=2, **d), TorchLastStep(),
            nn.Linear(3, 2, **d), nn.Softmax(dim=1)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_to_torch_writes_each_layer_as_its_torch_module(dtype):
    net = sequence_net(dtype)
    torch_dtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    model = to_torch(net)
    assert repr(model) == repr(nn.Sequential(*expected_modules(torch_dtype)))
    assert [name for name, _ in model[0].named_parameters()][:5] == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_ih_l0_reverse"]
    np.testing.assert_array_equal(model[2].weight_hh_l0_reverse.detach().numpy(),
                                  net.layers[2].weight_hh_l0_reverse)
    x = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(dtype)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), net.forward(x),
                               **tolerance)


@pytest.mark.parametrize("training", [True, False])
def test_recurrent_networks_round_trip_exactly(training):
    net = sequence_net().train(training)
    back = from_torch(to_torch(net), input_shape=net.input_shape)
    assert back.training == training
    assert back.config()["layers"] == net.config()["layers"]
    np.testing.assert_array_equal(back.params, net.params)
    model = to_torch(net)
    again = to_torch(from_torch(model, input_shape=net.input_shape))
    assert repr(again) == repr(model)
    expected = model.state_dict()
    assert list(again.state_dict()) == list(expected)
    for name, value in again.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_from_torch_reads_a_model_written_in_torch():
    torch.manual_seed(0)
    model = nn.Sequential(TorchLSTM(4, 6, num_layers=2), TorchLastStep(), nn.Linear(6, 3),
                          nn.Tanh()).double()
    net = from_torch(model, input_shape=(5, 4))
    assert [type(layer) for layer in net.layers] == [bp.LSTM, bp.LastStep, bp.Dense]
    assert (net.layers[0].num_layers, net.layers[2].activation) == (2, "tanh")
    x = np.random.default_rng(1).normal(size=(3, 5, 4))
    np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make, message", [
    (lambda: TorchLSTM(4, 6, num_layers=2, dropout=0.5),
     r"module 0 \(TorchLSTM\(.*dropout=0.5\)\) is not supported: backprop's LSTM has no "
     r"dropout between its layers"),
    (lambda: TorchLSTM(4, 6, proj_size=3), r"module 0 .*proj_size=3.*no projection"),
    (lambda: TorchGRU(5, 6), r"module 0 \(TorchGRU.*takes sequences of shape \(time, 5\)"),
    (lambda: nn.LSTM(4, 6, batch_first=True), r"module 0 \(LSTM.*is not supported by backprop"),
])
def test_from_torch_refuses_what_backprop_does_not_compute(make, message):
    with pytest.raises(ValueError, match=message):
        from_torch(nn.Sequential(make()), input_shape=(5, 4))


def test_the_torch_modules_are_batch_first():
    with pytest.raises(ValueError, match=r"TorchLSTM is batch first \(batch_first=True\)"):
        TorchLSTM(4, 6, batch_first=False)


def test_module_runs_a_recurrent_network_with_the_torch_copys_gradients():
    net = sequence_net()
    reference = to_torch(net)
    module = TorchModule(net)
    assert [name for name, _ in module.named_parameters()][:3] == [
        "layers.0.weight_ih_l0", "layers.0.weight_hh_l0", "layers.0.bias_ih_l0"]
    compare_module_gradients(module, reference, np.random.default_rng(2).normal(size=(4, 7, 3)),
                             np.random.default_rng(3).normal(size=(4, 2)), rtol=1e-9)


def test_gradcheck_through_the_module():
    net = bp.Network([bp.GRU(2, 3, bidirectional=True), bp.LSTM(6, 2), bp.LastStep()],
                     dtype="float64", seed=0, input_shape=(4, 2))
    module = TorchModule(net)
    x = torch.tensor(np.random.default_rng(4).normal(size=(2, 4, 2)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: module(x), (x, *module.parameters()),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)
