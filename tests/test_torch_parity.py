"""backprop against PyTorch in float64: the same networks, outputs, losses, gradients and
optimizer runs, number for number.

Both sides compute the same float64 formulas in different orders (torch's BLAS and fused
kernels against backprop's GEMM), so they agree to a few ulps of the largest terms; the
tolerances below are 1e-12 relative for values and 1e-10 after 25 optimizer steps, where
Adam-style divisions by small square roots amplify the first differences a little.
"""
import numpy as np
import pytest

import backprop as bp
from conftest import (ACTIVATIONS, LOSSES, OPTIMIZER_CASES, OPTIMIZER_IDS, OUTPUT_FOR_LOSS,
                      make_net, probability_rows, targets_for)

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH_ACTIVATION = {
    "identity": lambda z: z, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu,
    "leaky_relu": F.leaky_relu, "elu": F.elu, "gelu": F.gelu, "softplus": F.softplus,
    "softmax": lambda z: F.softmax(z, dim=1),
}
CLOSE = dict(rtol=1e-12, atol=1e-15)


@pytest.fixture(autouse=True, scope="module")
def _quiet_torch():
    torch.manual_seed(0)       # torch.nn.Linear draws its own init before we overwrite it
    saved = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: waking a thread pool costs more than the math
    yield
    torch.set_num_threads(saved)


def torch_twin(net):
    """torch.nn.Linear layers holding copies of `net`'s parameters."""
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


def torch_forward(net, layers, x):
    """(output, logits of the output layer)."""
    h = x
    for layer, lin in zip(net.layers, layers):
        z = lin(h)
        h = TORCH_ACTIVATION[layer.activation](z)
    return h, z


def torch_loss(net, output, logits, y):
    """PyTorch's own losses; the cross-entropies take the logits, as CrossEntropyLoss and
    BCEWithLogitsLoss do."""
    if net.loss == "cross_entropy":
        return F.cross_entropy(logits, y)
    if net.loss == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.mse_loss(output, y)


def flat_grads(layers):
    return np.concatenate([np.concatenate([lin.weight.grad.numpy().ravel()]
                                          + ([lin.bias.grad.numpy()] if lin.bias is not None else []))
                           for lin in layers])


def flat_params(layers):
    return np.concatenate([p.detach().numpy().ravel() for lin in layers for p in lin.parameters()])


def assert_matches_autograd(net, x, y):
    layers = torch_twin(net)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    output, logits = torch_forward(net, layers, tx)
    np.testing.assert_allclose(net.forward(x), output.detach().numpy(), **CLOSE)
    expected = torch_loss(net, output, logits, torch.from_numpy(y))
    expected.backward()
    assert net.backward(y) == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(net.grads, flat_grads(layers), **CLOSE)
    np.testing.assert_allclose(net.input_grad, tx.grad.numpy(), **CLOSE)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_activation_and_loss_match_autograd(activation, loss, rng):
    """Each activation as the hidden layer of each loss's network."""
    out = OUTPUT_FOR_LOSS[loss] or "tanh"
    net = make_net([5, 6, 4], [activation, out], loss=loss)
    assert_matches_autograd(net, rng.normal(size=(7, 5)), targets_for(loss, 7, 4, rng))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_as_the_output_with_mse(activation, rng):
    net = make_net([5, 6, 4], ["gelu", activation], loss="mse")
    assert_matches_autograd(net, rng.normal(size=(7, 5)), rng.normal(size=(7, 4)))


def test_cross_entropy_with_probability_rows(rng):
    net = make_net([5, 6, 4], ["softplus", "softmax"], loss="cross_entropy")
    assert_matches_autograd(net, rng.normal(size=(7, 5)), probability_rows(7, 4, rng))


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_networks_of_every_depth(depth, bias, rng):
    sizes = [6] + [9, 5, 8][: depth - 1] + [3]
    net = make_net(sizes, ["relu", "elu", "sigmoid"][: depth - 1] + ["sigmoid"],
                   loss="binary_cross_entropy", bias=bias)
    assert_matches_autograd(net, rng.normal(size=(10, 6)), rng.random((10, 3)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grad_output_matches_autograd(activation, rng):
    net = make_net([5, 6, 3], ["gelu", activation])
    x, g = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    layers = torch_twin(net)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    out, _ = torch_forward(net, layers, tx)
    out.backward(torch.from_numpy(g))
    np.testing.assert_allclose(net.forward(x), out.detach().numpy(), **CLOSE)
    net.backward(grad_output=g)
    np.testing.assert_allclose(net.grads, flat_grads(layers), **CLOSE)
    np.testing.assert_allclose(net.input_grad, tx.grad.numpy(), **CLOSE)


# One network per loss, hidden activations varied, for the optimizer runs.
OPTIMIZER_NETS = {
    "cross_entropy": ([6, 10, 4], ["relu", "softmax"]),
    "binary_cross_entropy": ([6, 8, 7, 3], ["tanh", "gelu", "sigmoid"]),
    "mse": ([6, 9, 2], ["elu", "identity"]),
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name,kwargs", OPTIMIZER_CASES, ids=OPTIMIZER_IDS)
def test_n_steps_give_torch_optims_weights(name, kwargs, loss, rng):
    """25 train_steps against 25 torch.optim steps (foreach=False, its plain loop):
    the loss at every step, the weights after, and the input gradient at the end."""
    sizes, acts = OPTIMIZER_NETS[loss]
    net = make_net(sizes, acts, loss=loss, optimizer=getattr(bp, name)(**kwargs))
    layers = torch_twin(net)
    params = [p for lin in layers for p in lin.parameters()]
    opt = getattr(torch.optim, name)(params, foreach=False, **kwargs)
    x, y = rng.normal(size=(32, sizes[0])), targets_for(loss, 32, sizes[-1], rng)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(25):
        opt.zero_grad()
        expected = torch_loss(net, *torch_forward(net, layers, tx), ty)
        expected.backward()
        opt.step()
        assert net.train_step(x, y) == pytest.approx(expected.item(), rel=1e-10), step
    np.testing.assert_allclose(net.params, flat_params(layers), rtol=1e-10, atol=1e-13)

    tx.requires_grad_(True)
    torch_loss(net, *torch_forward(net, layers, tx), ty).backward()
    net.forward(x)
    net.backward(y)
    np.testing.assert_allclose(net.input_grad, tx.grad.numpy(), rtol=1e-10, atol=1e-13)
