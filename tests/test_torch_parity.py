"""backprop against PyTorch in float64: same networks, losses, gradients and optimizers."""
import numpy as np
import pytest

import backprop as bp
from conftest import ACTIVATIONS, make_net, targets_for

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH_ACTIVATION = {
    "identity": lambda z: z, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu,
    "leaky_relu": F.leaky_relu, "elu": F.elu, "gelu": F.gelu, "softplus": F.softplus,
    "softmax": lambda z: F.softmax(z, dim=1),
}


def torch_twin(net):
    """torch Linear layers holding the same parameters as `net`."""
    layers = []
    for layer in net.layers:
        lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.use_bias,
                              dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(layer.weight.copy()))
            if layer.use_bias:
                lin.bias.copy_(torch.from_numpy(layer.bias.copy()))
        layers.append(lin)
    return layers


def torch_loss(net, layers, x, y):
    """Forward in torch; the built-in losses take the output layer's logits like
    CrossEntropyLoss and BCEWithLogitsLoss do."""
    h = x
    for layer, lin in zip(net.layers[:-1], layers[:-1]):
        h = TORCH_ACTIVATION[layer.activation](lin(h))
    logits = layers[-1](h)
    if net.loss == "cross_entropy":
        return F.cross_entropy(logits, y)
    if net.loss == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.mse_loss(TORCH_ACTIVATION[net.layers[-1].activation](logits), y)


def flat_torch_grads(layers):
    return np.concatenate([np.concatenate([lin.weight.grad.numpy().ravel()]
                                          + ([lin.bias.grad.numpy()] if lin.bias is not None else []))
                           for lin in layers])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss,out", [("mse", "tanh"), ("binary_cross_entropy", "sigmoid"),
                                      ("cross_entropy", "softmax")])
def test_losses_and_gradients_match_autograd(activation, loss, out, rng):
    net = make_net([5, 6, 4], [activation, out], loss=loss)
    x, y = rng.normal(size=(7, 5)), targets_for(loss, 7, 4, rng)
    layers = torch_twin(net)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = torch.from_numpy(y)
    expected = torch_loss(net, layers, tx, ty)
    expected.backward()
    net.forward(x)
    assert net.backward(y) == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(net.grads, flat_torch_grads(layers), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(net.input_grad, tx.grad.numpy(), rtol=1e-9, atol=1e-13)


def test_grad_output_matches_autograd(rng):
    net = make_net([5, 6, 3], ["gelu", "softmax"])
    x, g = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    layers = torch_twin(net)
    tx = torch.from_numpy(x).requires_grad_(True)
    out = F.softmax(layers[1](F.gelu(layers[0](tx))), dim=1)
    out.backward(torch.from_numpy(g))
    np.testing.assert_allclose(net.forward(x), out.detach().numpy(), rtol=1e-13)
    net.backward(grad_output=g)
    np.testing.assert_allclose(net.grads, flat_torch_grads(layers), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(net.input_grad, tx.grad.numpy(), rtol=1e-9, atol=1e-13)


OPTIMIZERS = [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.05)),
    ("RMSprop", dict(lr=0.005, momentum=0.5, centered=True, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.005)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01)),
]


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_n_steps_give_torch_optims_weights(name, kwargs, rng):
    net = make_net([6, 10, 4], ["relu", "softmax"], loss="cross_entropy",
                   optimizer=getattr(bp, name)(**kwargs))
    layers = torch_twin(net)
    params = [p for lin in layers for p in lin.parameters()]
    opt = getattr(torch.optim, name)(params, foreach=False, **kwargs)
    x, y = rng.normal(size=(32, 6)), rng.integers(0, 4, 32)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(25):
        opt.zero_grad()
        expected = torch_loss(net, layers, tx, ty)
        expected.backward()
        opt.step()
        assert net.train_step(x, y) == pytest.approx(expected.item(), rel=1e-10)
    theirs = np.concatenate([p.detach().numpy().ravel() for p in params])
    np.testing.assert_allclose(net.params, theirs, rtol=1e-9, atol=1e-12)
