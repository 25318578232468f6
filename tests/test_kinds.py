"""Every kind is declared once and fully: layer kinds, losses, optimizer rules.

The compiled tables (_kernels.pyx) and the Python declarations must agree, a kind that is
declared halfway must be refused before it runs, and nothing may fall back to another
kind's code (a standalone identity activation once output zeros that way)."""
import numpy as np
import pytest

import backprop as bp
from backprop import _core, plan as planner
from backprop.layers import LAYERS, Layer, register
from backprop.layers.base import HOOKS
from backprop.losses import LOSSES
from backprop.optim import OPTIMIZERS

# One instance of every registered kind, with the input sample it takes: a kind added
# without an example here fails test_every_kind_has_an_example, so each gets the walk below.
EXAMPLES = {
    "Dense": (lambda: bp.Dense(4, 3, "tanh"), (4,)),
    "BatchNorm": (lambda: bp.BatchNorm(4), (4,)),
    "LayerNorm": (lambda: bp.LayerNorm(4), (4,)),
    "Dropout": (lambda: bp.Dropout(0.25), (4,)),
    "Activation": (lambda: bp.Activation("relu"), (4,)),
    "Residual": (lambda: bp.Residual(bp.Dense(4, 4)), (4,)),
    "Flatten": (lambda: bp.Flatten(), (4,)),
    "Conv2d": (lambda: bp.Conv2d(2, 3, 3, padding=1, activation="relu"), (2, 5, 4)),
    "Conv1d": (lambda: bp.Conv1d(2, 3, 2, stride=2), (2, 7)),
    "MaxPool2d": (lambda: bp.MaxPool2d(2), (2, 5, 4)),
    "MaxPool1d": (lambda: bp.MaxPool1d(3, stride=1, padding=1), (2, 7)),
    "AvgPool2d": (lambda: bp.AvgPool2d(2, padding=1), (2, 5, 4)),
    "AvgPool1d": (lambda: bp.AvgPool1d(2), (2, 7)),
    "AdaptiveAvgPool2d": (lambda: bp.AdaptiveAvgPool2d(1), (2, 5, 4)),
    "GlobalAvgPool": (lambda: bp.GlobalAvgPool(), (2, 5, 4)),
    "Embedding": (lambda: bp.Embedding(6, 3), (4,)),
    "RNN": (lambda: bp.RNN(3, 4, nonlinearity="relu"), (5, 3)),
    "LSTM": (lambda: bp.LSTM(3, 4), (5, 3)),
    "GRU": (lambda: bp.GRU(3, 4, bias=False), (1, 3)),
    "LastStep": (lambda: bp.LastStep(), (5, 3)),
}


def test_every_kind_has_an_example():
    assert set(EXAMPLES) == set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_registered_kind_declares_every_hook(name):
    cls = LAYERS[name]
    assert cls.kernel in _core.KERNELS
    own = cls.__mro__[:cls.__mro__.index(Layer)]
    for hook in HOOKS:
        assert any(hook in klass.__dict__ for klass in own), f"{name} lacks {hook}"
    assert set(cls.kernel_params) >= {p.name for p in EXAMPLES[name][0]().parameters()}
    make, shape = EXAMPLES[name]
    layer = make()
    out = layer.output_shape(shape)
    assert isinstance(out, tuple) and all(isinstance(n, int) and n > 0 for n in out)
    assert len(layer.saved(planner.Geometry(shape))) == 2
    net = bp.Network([layer], seed=0, input_shape=shape)     # plans, builds and runs
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (3,) + shape) if layer.takes_ids else rng.normal(size=(3,) + shape)
    assert net.forward(x).shape == (3,) + net.output_shape


def test_the_tables_hold_every_declared_loss_and_rule():
    for loss in LOSSES.values():
        assert loss.kernel in _core.LOSS_KERNELS
    for cls in OPTIMIZERS.values():
        assert cls.RULE in _core.RULES
        assert cls().state_names == cls.STATE_NAMES


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_the_planner_fills_every_field_of_a_record(name):
    make, shape = EXAMPLES[name]
    net = bp.Network([make(), bp.Activation("gelu")], seed=0, input_shape=shape)
    fields = _core._op_fields()
    for record in net._plan.records:
        assert set(record["op"]) == set(fields)
        for name, nested in fields.items():
            if isinstance(nested, dict):
                assert set(record["op"][name]) == set(nested), name


def test_a_kind_declared_halfway_is_refused():
    class NoKernel(Layer):
        kernel = "convolution_3d"

        def config(self):
            return {}

    with pytest.raises(TypeError, match="not a row of the compiled kernel table"):
        register(NoKernel)

    class NoOnnx(Layer):
        kernel = "dense"

        def config(self):
            return {}

        def to_torch(self, nn, dtype, shape):
            return []

        @classmethod
        def from_torch(cls, module, path):
            return cls()

    with pytest.raises(TypeError, match=r"does not declare \['to_onnx'\]"):
        register(NoOnnx)

    class Unregistered(bp.Dropout):      # declares everything, but nobody registered it
        pass

    with pytest.raises(ValueError, match="is not a registered layer kind"):
        bp.Network([bp.Dense(3, 3), Unregistered(0.1)])


def test_an_unknown_loss_or_rule_is_refused_when_the_network_is_built():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        bp.Network([bp.Dense(3, 2)], loss="hinge")

    class Lion(bp.SGD):
        RULE = "lion"

    with pytest.raises(ValueError, match="unknown optimizer rule 'lion'"):
        Lion()


# ---- the identity activation, where it cannot be fused (it once output zeros there)

IDENTITY_PLACES = {
    "first layer": lambda: [bp.Activation("identity"), bp.Dense(4, 3)],
    "first in a residual block": lambda: [bp.Residual(bp.Activation("identity"), bp.Dense(4, 4)),
                                          bp.Dense(4, 3)],
    "after a layer's own activation": lambda: [bp.Dense(4, 4, "tanh"), bp.Activation("identity"),
                                               bp.Dense(4, 3)],
    "after another Activation": lambda: [bp.Dense(4, 4), bp.Activation("relu"),
                                         bp.Activation("identity"), bp.Dense(4, 3)],
    "alone": lambda: [bp.Activation("identity")],
}


@pytest.mark.parametrize("place", IDENTITY_PLACES)
def test_a_standalone_identity_outputs_its_input_everywhere(place):
    rng = np.random.default_rng(1)
    layers = IDENTITY_PLACES[place]()
    net = bp.Network(layers, loss="mse", dtype="float64", seed=0, input_shape=(4,))
    x = rng.normal(size=(5, 4))
    slot = net._plan.layer_slot[id(next(layer for layer in planner.flatten(layers)
                                         if isinstance(layer, bp.Activation)
                                         and layer.name == "identity"))]
    net.forward(x)
    before = net._plan.records[[r["op"]["output"] for r in net._plan.records].index(slot)]
    source = net._engine.slot_value(before["op"]["input"])
    np.testing.assert_array_equal(net._engine.slot_value(slot), source)   # every position
    y = rng.normal(size=(5,) + net.output_shape)
    assert bp.gradcheck(net, x, y)["max_error"] < 1e-7


@pytest.mark.parametrize("place", IDENTITY_PLACES)
def test_a_standalone_identity_agrees_with_pytorch(place):
    torch = pytest.importorskip("torch")
    from backprop.interop import to_torch
    rng = np.random.default_rng(2)
    net = bp.Network(IDENTITY_PLACES[place](), dtype="float64", seed=0, input_shape=(4,))
    x = rng.normal(size=(6, 4))
    expected = to_torch(net)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-12, atol=1e-12)
    assert np.abs(expected).max() > 0.1            # not a vacuous comparison of zeros
