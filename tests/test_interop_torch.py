"""PyTorch interop: to_torch / from_torch round trips, and TorchModule's gradients and training."""
import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import backprop as bp  # noqa: E402
from backprop.interop import TorchModule, TorchResidual, from_torch, to_torch  # noqa: E402
from cnn_oracle import CNNS, compare_module_gradients, ids_net, sample  # noqa: E402
from layer_oracle import non_trivial  # noqa: E402

ACTIVATIONS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "softplus",
               "softmax"]
# The torch module each backprop activation must become, written out independently of the
# converter (PyTorch's defaults are backprop's definitions).
TORCH_ACTIVATION = {
    "sigmoid": lambda: nn.Sigmoid(), "tanh": lambda: nn.Tanh(), "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.01), "elu": lambda: nn.ELU(1.0),
    "gelu": lambda: nn.GELU(), "softplus": lambda: nn.Softplus(beta=1.0, threshold=20.0),
    "softmax": lambda: nn.Softmax(dim=1),
}
TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}
# Same computation, different summation orders: float64 results agree to a few units of
# 2.2e-16 times magnitudes of at most ~10 here; float32 ones to a few units of 1.2e-7.
TOLERANCE = {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-5)}


def make_net(activation, dtype="float64", sizes=(5, 7, 4, 3), seed=0, loss=None, bias=True,
             optimizer=None):
    layers = [bp.Dense(a, b, activation=activation, bias=bias)
              for a, b in zip(sizes, sizes[1:])]
    return bp.Network(layers, loss=loss, optimizer=optimizer, dtype=dtype, seed=seed)


def randn(*shape, dtype="float64", seed=0, scale=2.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


def test_the_activations_covered_are_backprops():
    assert sorted(ACTIVATIONS) == sorted(bp.ACTIVATIONS)
    assert sorted(TORCH_ACTIVATION) == sorted(set(ACTIVATIONS) - {"identity"})


# ------------------------------------------------------------------------------ to_torch

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_to_torch_same_modules_weights_and_outputs(activation, dtype):
    net = make_net(activation, dtype)
    net.layers[1].bias[...] = randn(4, seed=3)   # biases start at zero: make them matter
    model = to_torch(net)

    expected = []
    for layer in net.layers:
        expected.append(nn.Linear)
        if activation != "identity":
            expected.append(type(TORCH_ACTIVATION[activation]()))
    assert [type(m) for m in model] == expected
    if activation != "identity":
        assert repr(model[1]) == repr(TORCH_ACTIVATION[activation]())   # same options
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for layer, linear in zip(net.layers, linears):
        assert linear.weight.dtype == TORCH_DTYPE[dtype]
        np.testing.assert_array_equal(linear.weight.detach().numpy(), layer.weight)
        np.testing.assert_array_equal(linear.bias.detach().numpy(), layer.bias)
        assert not np.shares_memory(linear.weight.detach().numpy(), net.params)   # a copy

    x = randn(6, 5, dtype=dtype)
    out = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out, net.forward(x), **TOLERANCE[dtype])


def test_to_torch_layers_without_bias_and_independence():
    net = make_net("tanh", bias=False)
    model = to_torch(net)
    assert all(m.bias is None for m in model if isinstance(m, nn.Linear))
    x = randn(4, 5)
    before = net.forward(x)
    with torch.no_grad():
        model[0].weight.add_(1.0)            # the copy changes, the network does not
    np.testing.assert_array_equal(net.forward(x), before)


def test_to_torch_draws_nothing_from_torchs_random_generator():
    state = torch.get_rng_state()
    to_torch(make_net("relu"))
    assert torch.equal(torch.get_rng_state(), state)


def test_to_torch_cross_entropy_on_the_copy_without_its_softmax():
    # backprop's cross_entropy takes the softmax layer's logits, as CrossEntropyLoss does
    # once the final Softmax is dropped: both are the same mean -log softmax(z)[label].
    net = bp.Network([bp.Dense(5, 6, "tanh"), bp.Dense(6, 3, "softmax")], loss="cross_entropy",
                     dtype="float64", seed=1)
    x, labels = randn(8, 5), np.arange(8) % 3
    model = to_torch(net)
    assert isinstance(model[-1], nn.Softmax)
    torch_loss = nn.CrossEntropyLoss()(model[:-1](torch.from_numpy(x)), torch.from_numpy(labels))
    np.testing.assert_allclose(torch_loss.item(), net.loss_of(x, labels), rtol=1e-12)


def test_to_torch_refuses_what_is_not_a_network():
    with pytest.raises(TypeError, match="to_torch: net must be a backprop.Network"):
        to_torch([bp.Dense(2, 3)])


# ---------------------------------------------------------------------------- from_torch

def torch_mlp(activation, dtype=torch.float64, sizes=(5, 7, 4, 3), seed=0):
    torch.manual_seed(seed)
    modules = []
    for a, b in zip(sizes, sizes[1:]):
        modules.append(nn.Linear(a, b, dtype=dtype))
        if activation != "identity":
            modules.append(TORCH_ACTIVATION[activation]())
    return nn.Sequential(*modules)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_from_torch_fuses_activations_and_copies_weights(activation, dtype):
    model = torch_mlp(activation, TORCH_DTYPE[dtype])
    net = from_torch(model)
    assert net.dtype == np.dtype(dtype)                      # the parameters' dtype
    assert [type(layer) for layer in net.layers] == [bp.Dense] * 3
    assert [layer.activation for layer in net.layers] == [activation] * 3
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for layer, linear in zip(net.layers, linears):
        np.testing.assert_array_equal(layer.weight, linear.weight.detach().numpy())
        np.testing.assert_array_equal(layer.bias, linear.bias.detach().numpy())
    x = randn(6, 5, dtype=dtype)
    np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).detach().numpy(),
                               **TOLERANCE[dtype])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_round_trips_are_exact(activation):
    net = make_net(activation)
    net.layers[2].bias[...] = randn(3, seed=5)
    back = from_torch(to_torch(net))
    assert back.config()["layers"] == net.config()["layers"]
    np.testing.assert_array_equal(back.params, net.params)

    model = torch_mlp(activation)
    again = to_torch(from_torch(model))
    assert [repr(m) for m in again] == [repr(m) for m in model]
    for (name, a), (name_b, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert name == name_b
        assert torch.equal(a, b)


def test_from_torch_layers_without_bias_identity_and_nested_sequentials():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False, dtype=torch.float64), nn.Identity(),
                          nn.Sequential(nn.Tanh(), nn.Identity(),
                                        nn.Linear(6, 2, dtype=torch.float64)))
    net = from_torch(model)
    # Identity computes nothing and is dropped; the Tanh inside the nested Sequential still
    # follows the Linear once the nesting is read through.
    assert [(l.activation, l.use_bias) for l in net.layers] == [("tanh", False),
                                                               ("identity", True)]
    x = randn(3, 4)
    np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-12, atol=1e-12)


def test_from_torch_dtype_loss_optimizer_and_seed_are_passed_on():
    model = torch_mlp("relu", torch.float32, sizes=(4, 5))
    model.extend([nn.Linear(5, 3), nn.Softmax(dim=-1)])
    optimizer = bp.SGD(lr=0.1)
    net = from_torch(model, loss="cross_entropy", optimizer=optimizer, dtype="float64", seed=3)
    assert net.dtype == np.float64 and net.loss == "cross_entropy" and net.seed == 3
    assert net.optimizer is optimizer
    assert [layer.activation for layer in net.layers] == ["relu", "softmax"]
    # float32 values are exact in float64
    np.testing.assert_array_equal(net.layers[0].weight, model[0].weight.detach().double().numpy())


def test_from_torch_half_precision_needs_a_dtype():
    model = nn.Sequential(nn.Linear(3, 2)).to(torch.float16)
    with pytest.raises(TypeError, match=r"float16.*pass dtype='float32' or 'float64'"):
        from_torch(model)
    net = from_torch(model, dtype="float32")
    np.testing.assert_array_equal(net.layers[0].weight, model[0].weight.float().detach().numpy())


def test_from_torch_refuses_mixed_dtypes():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="mixes dtypes"):
        from_torch(model)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x)


# (the module placed at index 1 between Linear(3, 4) and Linear(4, 2), the message)
UNSUPPORTED = [
    (lambda: nn.Conv3d(1, 1, 3), r"module 1 \(Conv3d\(1, 1, kernel_size=\(3, 3, 3\).*\) is not "
                                 "supported by backprop"),
    (lambda: nn.Conv2d(1, 1, 3), r"module 1 \(Conv2d\(1, 1, kernel_size=\(3, 3\).*\) takes "
                                 r"samples of shape \(1, H, W\), but its input is \(4,\)"),
    (lambda: Custom(), r"module 1 \(Custom\) is not supported"),
    (lambda: nn.ModuleList([nn.ReLU()]), r"module 1 \(ModuleList\) is not supported"),
    (lambda: nn.ReLU6(), r"module 1 \(ReLU6\(\)\) is not supported"),
    (lambda: nn.LeakyReLU(0.2),
     r"module 1 \(LeakyReLU\(negative_slope=0.2\)\).*negative_slope=0.01"),
    (lambda: nn.ELU(alpha=0.5), r"module 1 \(ELU\(alpha=0.5\)\).*alpha=1.0"),
    (lambda: nn.GELU(approximate="tanh"), r"module 1 .*approximate='none'"),
    (lambda: nn.Softplus(beta=2), r"module 1 \(Softplus\(beta=2.*beta=1 and threshold=20"),
    (lambda: nn.Softplus(threshold=10), r"module 1 \(Softplus.*beta=1 and threshold=20"),
    (lambda: nn.Softmax(dim=0), r"module 1 \(Softmax\(dim=0\)\).*dim=1"),
    (lambda: nn.Softmax(), r"module 1 \(Softmax\(dim=None\)\).*dim=1"),
]


@pytest.mark.parametrize("make, message", UNSUPPORTED)
def test_from_torch_names_the_unsupported_module(make, message):
    model = nn.Sequential(nn.Linear(3, 4), make(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=message):
        from_torch(model)


def test_from_torch_names_a_nested_module_by_its_path():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.Dropout1d()))
    with pytest.raises(ValueError, match=r"module 1\.1 \(Dropout1d"):
        from_torch(model)


@pytest.mark.parametrize("module, error, message", [
    (nn.Linear(3, 2), TypeError, "module must be a torch.nn.Sequential, got Linear"),
    (nn.Sequential(), ValueError, "no layers"),
    (nn.Sequential(nn.Identity()), ValueError, "no layers"),
    (nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)), ValueError,
     r"module 1 \(Linear\(in_features=5.*last dimension is 5, but its input is \(4,\)"),
])
def test_from_torch_bad_input(module, error, message):
    with pytest.raises(error, match=message):
        from_torch(module)


def test_from_torch_refuses_non_finite_weights():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"module 1 \(Linear\) has NaN or Inf in its bias"):
        from_torch(model)


def test_from_torch_activation_not_after_a_linear():
    model = nn.Sequential(nn.Tanh(), nn.Linear(3, 2, dtype=torch.float64), nn.ReLU(), nn.Sigmoid())
    net = from_torch(model)
    assert [type(layer) for layer in net.layers] == [bp.Activation, bp.Dense, bp.Activation]
    assert (net.layers[0].name, net.layers[1].activation, net.layers[2].name) == (
        "tanh", "relu", "sigmoid")
    x = randn(4, 3)
    np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-12, atol=1e-12)
    assert [type(m) for m in to_torch(net)] == [type(m) for m in model]


# --------------------------------------------------------------------------- TorchModule

def tensor(array, requires_grad=False):
    return torch.from_numpy(array).requires_grad_(requires_grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_in_float64(activation):
    net = make_net(activation, sizes=(3, 4, 2), seed=1)
    for layer in net.layers:   # away from zero: no input lands on relu's kink
        layer.bias[...] = randn(layer.out_features, seed=2, scale=0.5)
    module = TorchModule(net)
    x = tensor(randn(5, 3, seed=3), requires_grad=True)
    params = tuple(module.parameters())
    assert len(params) == 4
    # Differentiates in x and in every Parameter (perturbed in place: net.params itself).
    assert torch.autograd.gradcheck(lambda x, *p: module(x), (x, *params), eps=1e-6,
                                    atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parameters_share_memory_with_the_network(dtype):
    net = make_net("tanh", dtype)
    module = TorchModule(net)
    assert [name for name, _ in module.named_parameters()] == [
        f"layers.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")]
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    np.testing.assert_array_equal(flat.numpy(), net.params)   # net.params' order
    for p in module.parameters():
        assert p.dtype == TORCH_DTYPE[dtype] and p.requires_grad
        assert np.shares_memory(p.detach().numpy(), net.params)

    x = randn(4, 5, dtype=dtype)
    out = module(tensor(x))
    assert out.dtype == TORCH_DTYPE[dtype] and out.requires_grad
    np.testing.assert_array_equal(out.detach().numpy(), net.forward(x))
    with torch.no_grad():
        module.layers[0].weight.mul_(2)                       # torch writes, backprop sees
    np.testing.assert_array_equal(net.layers[0].weight, module.layers[0].weight.numpy(force=True))
    net.layers[1].bias[...] = 0.5                             # backprop writes, torch sees
    assert torch.all(module.layers[1].bias == 0.5)


def test_matches_the_same_network_written_in_torch():
    # A torch Linear before and after the backprop network: every gradient (of x, of the
    # torch layers and of the network's weights) equals the all-torch copy's.
    torch.manual_seed(0)
    net = make_net("gelu", sizes=(5, 6, 4))
    first, last = nn.Linear(3, 5, dtype=torch.float64), nn.Linear(4, 2, dtype=torch.float64)
    mixed = nn.Sequential(first, nn.Tanh(), TorchModule(net), last)
    reference = nn.Sequential(nn.Linear(3, 5, dtype=torch.float64), nn.Tanh(), to_torch(net),
                              nn.Linear(4, 2, dtype=torch.float64))
    reference[0].load_state_dict(first.state_dict())
    reference[3].load_state_dict(last.state_dict())
    x = randn(7, 3)
    xs = [tensor(x.copy(), requires_grad=True) for _ in range(2)]
    for model, xi in zip((mixed, reference), xs):
        model(xi).square().mean().backward()
    np.testing.assert_allclose(xs[0].grad.numpy(), xs[1].grad.numpy(), rtol=1e-12, atol=1e-14)
    grads = {name: p.grad.numpy() for name, p in mixed.named_parameters()}
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    for torch_layer in ("0", "3"):
        for kind in ("weight", "bias"):
            np.testing.assert_allclose(grads[f"{torch_layer}.{kind}"],
                                       expected[f"{torch_layer}.{kind}"], rtol=1e-12, atol=1e-14)
    # to_torch puts Linear, GELU, Linear, GELU inside the reference's Sequential at index 2.
    for i, j in ((0, 0), (1, 2)):
        for kind in ("weight", "bias"):
            np.testing.assert_allclose(grads[f"2.layers.{i}.{kind}"], expected[f"2.{j}.{kind}"],
                                       rtol=1e-12, atol=1e-14)


def loss_of(module, x, y):
    return nn.functional.mse_loss(module(tensor(x)), tensor(y))


def test_grad_accumulates_like_torch_and_is_net_grads():
    net = make_net("tanh", sizes=(4, 3, 2))
    module = TorchModule(net)
    params = list(module.parameters())
    x, y = randn(5, 4), randn(5, 2, seed=1)
    assert all(p.grad is None for p in params)        # as a fresh torch module
    loss_of(module, x, y).backward()
    once = [p.grad.clone() for p in params]
    for p in params:
        assert np.shares_memory(p.grad.numpy(), net.grads)
    np.testing.assert_array_equal(torch.cat([g.reshape(-1) for g in once]).numpy(), net.grads)

    loss_of(module, x, y).backward()                  # accumulates, in net.grads too
    for p, g in zip(params, once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=0, atol=0)
    np.testing.assert_array_equal(torch.cat([2 * g.reshape(-1) for g in once]).numpy(),
                                  net.grads)

    torch.optim.SGD(params, lr=0.1).zero_grad()       # sets .grad to None ...
    assert all(p.grad is None for p in params)
    loss_of(module, x, y).backward()                  # ... and the next backward starts over
    for p, g in zip(params, once):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        assert np.shares_memory(p.grad.numpy(), net.grads)
    np.testing.assert_array_equal(torch.cat([g.reshape(-1) for g in once]).numpy(), net.grads)

    net.zero_grad()                                    # backprop's zero_grad clears .grad
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    loss_of(module, x, y).backward()
    module.zero_grad()                                 # and torch's clears net.grads
    assert all(p.grad is None for p in params) and not net.grads.any()
    loss_of(module, x, y).backward()
    module.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params) and not net.grads.any()


def test_autograd_grad_leaves_grad_and_net_grads_alone():
    net = make_net("elu", sizes=(4, 3, 2))
    module = TorchModule(net)
    params = list(module.parameters())
    x, y = randn(5, 4), randn(5, 2, seed=1)
    loss_of(module, x, y).backward()
    before = net.grads.copy()
    grads = torch.autograd.grad(loss_of(module, x, y), params)
    np.testing.assert_array_equal(net.grads, before)
    np.testing.assert_array_equal(torch.cat([g.reshape(-1) for g in grads]).numpy(), before)


def test_frozen_parameters_get_no_gradient():
    net = make_net("tanh", sizes=(4, 3, 2))
    module = TorchModule(net)
    module.layers[0].weight.requires_grad_(False)
    loss_of(module, randn(5, 4), randn(5, 2, seed=1)).backward()
    assert module.layers[0].weight.grad is None
    assert not net.layers[0].weight_grad.any()
    assert net.layers[1].weight_grad.any()


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_training_with_torch_sgd_equals_backprops_own_steps(momentum, nesterov):
    x, y = randn(8, 4), randn(8, 2, seed=1)
    trained_by_torch = make_net("tanh", sizes=(4, 6, 2), seed=7)
    module = TorchModule(trained_by_torch)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=momentum,
                                nesterov=nesterov)
    own = make_net("tanh", sizes=(4, 6, 2), seed=7, loss="mse",
                   optimizer=bp.SGD(lr=0.1, momentum=momentum, nesterov=nesterov))
    stepped_by_net = make_net("tanh", sizes=(4, 6, 2), seed=7,
                              optimizer=bp.SGD(lr=0.1, momentum=momentum, nesterov=nesterov))
    both = TorchModule(stepped_by_net)
    for _ in range(10):
        optimizer.zero_grad()
        loss_of(module, x, y).backward()
        optimizer.step()
        own.train_step(x, y)
        loss_of(both, x, y).backward()     # torch computes the loss, backprop steps
        stepped_by_net.step()
        stepped_by_net.zero_grad()
    assert not np.array_equal(own.params, make_net("tanh", sizes=(4, 6, 2), seed=7).params)
    # torch's MSELoss and backprop's mse are the same mean; the updates are the same rule.
    np.testing.assert_allclose(trained_by_torch.params, own.params, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(stepped_by_net.params, own.params, rtol=1e-12, atol=1e-13)


def test_an_earlier_forward_is_recomputed_for_its_backward():
    net = make_net("softplus", sizes=(4, 3, 2))
    module = TorchModule(net)
    x1, x2 = randn(5, 4, seed=1), randn(3, 4, seed=2)
    g = torch.from_numpy(randn(5, 2, seed=3))
    x = tensor(x1, requires_grad=True)
    expected = torch.autograd.grad(module(x), [x, *module.parameters()], g)
    first = module(x)
    module(tensor(x2))                      # the network now holds this forward's activations
    net.forward(x2)
    module(tensor(x2)).sum()                # and a forward whose backward never comes
    got = torch.autograd.grad(first, [x, *module.parameters()], g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_after_the_weights_changed_is_refused():
    net = make_net("tanh", sizes=(4, 3, 2), optimizer=bp.SGD(lr=0.1))
    module = TorchModule(net)
    x, y = randn(5, 4), randn(5, 2, seed=1)
    loss_of(module, x, y).backward()
    loss = loss_of(module, x, y)
    net.step()                               # backprop's update
    with pytest.raises(RuntimeError, match=r"weights were updated \(net.step\(\)"):
        loss.backward()
    loss = loss_of(module, x, y)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    optimizer.step()                         # torch's in-place update: torch's own check
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(context):
    net = make_net("sigmoid")
    module = TorchModule(net)
    x = randn(4, 5)
    with context():
        out = module(tensor(x, requires_grad=context is torch.no_grad))
    assert not out.requires_grad and out.grad_fn is None
    np.testing.assert_array_equal(out.numpy(), net.forward(x))


def test_bad_input_to_the_module():
    module = TorchModule(make_net("relu"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        module(randn(2, 5))
    with pytest.raises(TypeError, match=r"x has dtype torch.float32, the network computes in "
                                        r"torch.float64: convert x with x.to\(torch.float64\)"):
        module(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 5\)"):
        module(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="TorchModule: net must be a backprop.Network"):
        TorchModule(to_torch(make_net("relu")))


def test_conversions_that_would_cut_the_link_are_refused():
    net = make_net("relu", "float64")
    module = TorchModule(net)
    with pytest.raises(TypeError, match="cannot become torch.float32"):
        module.float()
    assert module.double() is module and module.to("cpu") is module   # no-ops are fine
    for p in module.parameters():
        assert p.dtype == torch.float64 and np.shares_memory(p.detach().numpy(), net.params)


# ------------------------------------------------- every layer type: BatchNorm, LayerNorm, ...

def full_net(dtype="float64", p=0.2, seed=0, loss=None, optimizer=None):
    """Every layer type and option the converters know, with weights and running
    statistics away from their first values (so that each one matters)."""
    net = bp.Network([
        bp.Dense(6, 8),
        bp.BatchNorm(8),
        bp.Activation("relu"),
        bp.Dropout(p),
        bp.Residual(bp.Dense(8, 8, activation="tanh"), bp.LayerNorm(8), bp.Dense(8, 8)),
        bp.Activation("gelu"),
        bp.BatchNorm(8, eps=1e-3, momentum=0.3, affine=False),
        bp.LayerNorm(8, eps=1e-4, elementwise_affine=False),
        bp.Dense(8, 4, activation="softmax"),
    ], dtype=dtype, seed=seed, loss=loss, optimizer=optimizer)
    return non_trivial(net, seed + 1)


FULL_NET_MODULES = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, TorchResidual, nn.GELU,
                    nn.BatchNorm1d, nn.LayerNorm, nn.Linear, nn.Softmax]


def state(model):
    # num_batches_tracked only serves BatchNorm1d(momentum=None), which backprop refuses.
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_to_torch_every_layer_type_in_eval_mode(dtype):
    net = full_net(dtype).eval()
    model = to_torch(net)
    assert not model.training
    assert [type(m) for m in model] == FULL_NET_MODULES
    assert [type(m) for m in model[4]] == [nn.Linear, nn.Tanh, nn.LayerNorm, nn.Linear]
    options = [(m.eps, m.momentum, m.affine) for m in model if isinstance(m, nn.BatchNorm1d)]
    assert options == [(1e-5, 0.1, True), (1e-3, 0.3, False)]
    assert (model[7].normalized_shape, model[7].eps, model[7].elementwise_affine) == ((8,), 1e-4,
                                                                                     False)
    assert model[3].p == 0.2
    np.testing.assert_array_equal(model[1].running_var.numpy(), net.layers[1].running_var)
    np.testing.assert_array_equal(model[4][2].weight.detach().numpy(),
                                  net.layers[4].layers[1].weight)
    x = randn(9, 6, dtype=dtype)
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), net.forward(x),
                               **TOLERANCE[dtype])


def test_to_torch_in_train_mode_batch_statistics_and_running_statistics():
    net = full_net(p=0.0)          # no dropout: train-mode outputs are deterministic
    model = to_torch(net)
    assert model.training
    x = randn(9, 6)
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), net.forward(x),
                               rtol=1e-12, atol=1e-12)
    # Both moved their running statistics by the same rule (momentum, unbiased variance).
    for i in (1, 6):
        for name in ("running_mean", "running_var"):
            np.testing.assert_allclose(getattr(model[i], name).numpy(),
                                       getattr(net.layers[i], name), rtol=1e-12, atol=1e-14)


def assert_round_trips(net):
    """from_torch(to_torch(net)) has net's layers, arrays and mode; to_torch(from_torch(m))
    has m's modules and state, for m = to_torch(net)."""
    training = net.training
    back = from_torch(to_torch(net), input_shape=net.input_shape)
    assert back.training == training
    assert back.config()["layers"] == net.config()["layers"]
    np.testing.assert_array_equal(back.params, net.params)
    np.testing.assert_array_equal(back.buffers, net.buffers)

    model = to_torch(net)
    again = to_torch(from_torch(model, input_shape=net.input_shape))
    assert again.training == training
    assert repr(again) == repr(model)
    expected = state(model)
    assert list(state(again)) == list(expected)
    for name, value in state(again).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("training", [True, False])
def test_every_layer_type_round_trips_exactly(training):
    assert_round_trips(full_net().train(training))


def test_from_torch_reads_a_model_written_in_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=0.2), nn.ELU(),
                          nn.Dropout(0.1),
                          TorchResidual(nn.LayerNorm(6), nn.Linear(6, 6), nn.Softplus()),
                          nn.Linear(6, 3)).double()
    model(torch.randn(16, 5, dtype=torch.float64))     # running statistics away from 0 and 1
    model.eval()
    net = from_torch(model)
    assert [type(layer) for layer in net.layers] == [bp.Dense, bp.BatchNorm, bp.Activation,
                                                     bp.Dropout, bp.Residual, bp.Dense]
    assert [type(layer) for layer in net.layers[4].layers] == [bp.LayerNorm, bp.Dense]
    assert net.layers[4].layers[1].activation == "softplus"
    assert (net.layers[1].momentum, net.layers[3].p, net.training) == (0.2, 0.1, False)
    np.testing.assert_array_equal(net.layers[1].running_mean, model[1].running_mean.numpy())
    x = randn(7, 5)
    np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make, message", [
    (lambda: nn.BatchNorm1d(4, track_running_stats=False), "track_running_stats=True"),
    (lambda: nn.BatchNorm1d(4, momentum=None), "momentum a number"),
    (lambda: nn.BatchNorm1d(4, bias=False), "bias=False is not available"),
    (lambda: nn.BatchNorm1d(5), r"takes samples of shape \(5,\).*but its input is \(4,\)"),
    (lambda: nn.LayerNorm((2, 2)), "normalizes one dimension"),
    (lambda: nn.LayerNorm(4, bias=False), "bias=False is not available"),
    (lambda: nn.LayerNorm(3), r"normalises a last dimension of 3, but its input is \(4,\)"),
    (lambda: TorchResidual(nn.Linear(4, 3)), r"maps \(4,\) to \(3,\)"),
    (lambda: TorchResidual(nn.Linear(4, 4), nn.AlphaDropout()),
     r"module 1\.1 \(AlphaDropout"),
])
def test_from_torch_refuses_options_backprop_does_not_compute(make, message):
    with pytest.raises(ValueError, match=message):
        from_torch(nn.Sequential(nn.Linear(3, 4), make(), nn.Linear(4, 2)))


def test_module_shares_running_statistics_and_switches_the_mode():
    net = full_net()
    module = TorchModule(net)
    assert [name for name, _ in module.named_buffers()] == [
        f"layers.{i}.{name}" for i in (1, 6) for name in ("running_mean", "running_var")]
    for buffer in module.buffers():
        assert np.shares_memory(buffer.numpy(), net.buffers)
    assert module.training and net.training
    assert module.eval() is module and not net.training
    module.train()
    assert net.training
    net.eval()                                           # either side switches both
    assert not module.training
    assert not TorchModule(full_net().eval()).training   # starts in the network's mode


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_every_layer_type(training):
    # In train mode BatchNorm normalises with the batch's statistics (and gradcheck's many
    # forwards move the running ones, restored when a forward is recomputed); dropout is
    # off there (p = 0) since its masks change at every forward, and in eval mode it passes
    # everything through.
    net = full_net(p=0.0 if training else 0.5).train(training)
    module = TorchModule(net)
    x = tensor(randn(5, 6, seed=3), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: module(x), (x, *module.parameters()),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def test_module_gradients_equal_the_torch_copys_in_train_mode():
    net = full_net(p=0.0)
    reference = to_torch(net)
    module = TorchModule(net)
    x = randn(9, 6)
    xs = [tensor(x.copy(), requires_grad=True) for _ in range(2)]
    g = torch.from_numpy(randn(9, 4, seed=4))
    for model, xi in ((module, xs[0]), (reference, xs[1])):
        (model(xi) * g).sum().backward()
    np.testing.assert_allclose(xs[0].grad.numpy(), xs[1].grad.numpy(), rtol=1e-10, atol=1e-12)
    ours = [p.grad.numpy() for p in module.parameters()]
    theirs = [p.grad.numpy() for p in reference.parameters()]
    assert len(ours) == len(theirs) == 12
    for a, b in zip(ours, theirs):      # both list parameters in the network's order
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_module_with_dropout_is_the_network_itself():
    # A copy of the network (same seed and dropout counter) draws the same masks.
    net = full_net(p=0.5)
    twin = copy.deepcopy(net)
    module = TorchModule(net)
    x = randn(9, 6)
    g = randn(9, 4, seed=4)
    xt = tensor(x.copy(), requires_grad=True)
    out = module(xt)
    np.testing.assert_array_equal(out.detach().numpy(), twin.forward(x))
    out.backward(torch.from_numpy(g))
    twin.backward(grad_output=g)
    np.testing.assert_array_equal(xt.grad.numpy(), twin.input_grad)
    np.testing.assert_array_equal(net.grads, twin.grads)
    np.testing.assert_array_equal(net.buffers, twin.buffers)


def test_an_earlier_forward_with_dropout_in_train_mode_is_refused():
    net = full_net(p=0.5)
    module = TorchModule(net)
    first = module(tensor(randn(5, 6)))
    module(tensor(randn(5, 6, seed=1)))
    with pytest.raises(RuntimeError, match="with dropout in training mode that forward cannot "
                                           "be recomputed"):
        first.sum().backward()
    module.eval()                      # in eval mode dropout is the identity: recomputed
    x = tensor(randn(5, 6), requires_grad=True)
    expected = torch.autograd.grad(module(x).sum(), x)
    first = module(x)
    module(tensor(randn(5, 6, seed=1)))
    torch.testing.assert_close(torch.autograd.grad(first.sum(), x), expected, rtol=0, atol=0)


def test_recomputing_a_train_mode_forward_leaves_the_running_statistics():
    net = full_net(p=0.0)
    module = TorchModule(net)
    x1, x2 = randn(5, 6), randn(5, 6, seed=1)
    reference = copy.deepcopy(net)
    reference.forward(x1)
    reference.forward(x2)
    first = module(tensor(x1))
    module(tensor(x2))
    first.sum().backward()                   # recomputes the first forward
    np.testing.assert_array_equal(net.buffers, reference.buffers)
    assert net.training


TRAINING_CASES = [
    # (network, torch optimizer, backprop's, tolerance).  SGD's steps are proportional to
    # the gradients: float64 rounding stays ~1e-16 relative.  Adam divides each gradient by
    # its own running magnitude, so the tiniest gradients' relative rounding errors (~1e-9
    # for gradients ~1e-8 here) come back as absolute errors of lr times that.
    (lambda **kw: make_net("tanh", sizes=(4, 6, 2), **kw),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda: bp.SGD(lr=0.1, momentum=0.9),
     1e-12),
    (lambda **kw: full_net(p=0.3, **kw),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda: bp.SGD(lr=0.1, momentum=0.9),
     1e-12),
    (lambda **kw: full_net(p=0.3, **kw),
     lambda p: torch.optim.Adam(p, lr=0.01), lambda: bp.Adam(lr=0.01), 1e-9),
]


@pytest.mark.parametrize("make, torch_optimizer, optimizer, atol", TRAINING_CASES)
def test_training_with_a_torch_optimizer_equals_backprops_own(make, torch_optimizer, optimizer,
                                                              atol):
    # Same seed, same dropout counter: even the dropout masks are the same.
    net, own = make(), make(loss="mse", optimizer=optimizer())
    module = TorchModule(net)
    torch_opt = torch_optimizer(module.parameters())
    x, y = randn(8, net.n_inputs), randn(8, net.n_outputs, seed=1)
    for _ in range(5):
        torch_opt.zero_grad()
        loss_of(module, x, y).backward()
        torch_opt.step()
        own.train_step(x, y)
    assert not np.array_equal(net.params, make().params)
    np.testing.assert_allclose(net.params, own.params, rtol=0, atol=atol)
    np.testing.assert_allclose(net.buffers, own.buffers, rtol=0, atol=atol)   # batch statistics


def test_deepcopy_and_pickle_wrap_a_copy_of_the_network():
    net = full_net()
    module = TorchModule(net)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert isinstance(clone, TorchModule) and clone.net is not net
        np.testing.assert_array_equal(clone.net.params, net.params)
        for p in clone.parameters():
            assert np.shares_memory(p.detach().numpy(), clone.net.params)
        with torch.no_grad():
            next(clone.parameters()).add_(1.0)
        assert not np.array_equal(clone.net.params, net.params)   # independent


# ------------------------------------------ convolutions, pooling, Flatten and Embedding

def expected_modules(name, dtype):
    """The modules each network must become, written out with torch's own arguments
    (to_torch gives pooling's sizes as tuples, as backprop keeps them)."""
    d = dict(dtype=dtype)
    if name == "cnn_2d":
        return [nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                          groups=2, bias=False, **d), nn.ReLU(),
                nn.BatchNorm2d(4, **d),
                nn.MaxPool2d((3, 3), stride=(1, 1), padding=(1, 1), dilation=(2, 2)),
                nn.AvgPool2d((2, 2), stride=(2, 2), padding=(1, 1), count_include_pad=False),
                nn.Dropout(0.1),
                TorchResidual(nn.Conv2d(4, 4, 3, padding=1, **d), nn.LayerNorm(3, **d)),
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 6, 1, **d), nn.Tanh(), nn.Flatten(),
                nn.Linear(6, 3, **d), nn.Softmax(dim=1)]
    if name == "cnn_1d":
        return [nn.Conv1d(3, 4, 5, padding=2, **d), nn.GELU(),
                nn.MaxPool1d((2,), stride=(2,), padding=(0,), dilation=(1,)),
                nn.AvgPool1d((3,), stride=(1,), padding=(1,)), nn.BatchNorm1d(4, **d),
                nn.Conv1d(4, 4, 3, groups=4, dilation=2, **d), nn.AdaptiveAvgPool1d(1),
                nn.Flatten(), nn.Linear(4, 2, **d)]
    return [nn.Embedding(9, 4, padding_idx=2, **d), nn.Linear(4, 5, **d), nn.ELU(),
            nn.LayerNorm(5, **d), nn.Flatten(), nn.Linear(30, 3, **d), nn.Softmax(dim=1)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", CNNS)
def test_to_torch_writes_each_layer_as_its_torch_module(name, dtype):
    net = CNNS[name](dtype).eval()
    model = to_torch(net)
    assert repr(model) == repr(nn.Sequential(*expected_modules(name, TORCH_DTYPE[dtype])))
    assert all(p.dtype == TORCH_DTYPE[dtype] for p in model.parameters())
    x = sample(net)
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), net.forward(x),
                               **TOLERANCE[dtype])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", CNNS)
def test_convolutional_and_embedding_networks_round_trip_exactly(name, training):
    assert_round_trips(CNNS[name]().train(training))


def test_from_torch_reads_lenet_written_in_torch():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)).double()
    net = from_torch(model, input_shape=(1, 28, 28))
    assert [type(layer) for layer in net.layers] == [bp.Conv2d, bp.MaxPool2d, bp.Conv2d,
                                                     bp.MaxPool2d, bp.Flatten, bp.Dense,
                                                     bp.Dense, bp.Dense]
    assert [net.layers[i].activation for i in (0, 2, 5, 6, 7)] == ["relu"] * 4 + ["identity"]
    assert net.layers[0].padding == (2, 2) and net.layers[1].stride == (2, 2)
    np.testing.assert_array_equal(net.layers[2].weight, model[3].weight.detach().numpy())
    x = randn(3, 1, 28, 28)
    np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-12, atol=1e-12)


def test_from_torch_reads_padding_same_as_the_padding_it_means():
    model = nn.Sequential(nn.Conv2d(2, 3, (3, 5), padding="same", dilation=(2, 1))).double()
    net = from_torch(model, input_shape=(2, 7, 6))
    assert net.layers[0].padding == (2, 2)
    x = randn(4, 2, 7, 6)
    np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
     r"module 1 \(Conv2d\(.*padding_mode=reflect\)\) is not supported: backprop pads with "
     r"zeros"),
    (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), r"module 1 .*zeros"),
    (lambda: nn.Conv2d(2, 2, 4, padding="same"),
     r"module 1 \(Conv2d\(2, 2, kernel_size=\(4, 4\).*padding=same\)\) is not supported: "
     r"Conv2d: padding='same' needs stride 1 and an odd"),
    (lambda: nn.MaxPool2d(2, ceil_mode=True), r"module 1 \(MaxPool2d\(.*ceil_mode=True\)\) is "
                                              r"not supported.*ceil_mode=False"),
    (lambda: nn.AvgPool2d(2, ceil_mode=True), r"module 1 \(AvgPool2d.*ceil_mode=False"),
    (lambda: nn.AvgPool2d(2, divisor_override=3), r"module 1 \(AvgPool2d.*divisor_override"),
    (lambda: nn.MaxPool2d(2, return_indices=True), r"module 1 .*return_indices=True"),
    (lambda: nn.MaxPool2d(3, padding=2), r"module 1 \(MaxPool2d.*MaxPool2d: padding \(2, 2\) "
                                         r"must be at most half the kernel size"),
    (lambda: nn.AdaptiveAvgPool2d(2), r"module 1 \(AdaptiveAvgPool2d\(output_size=2\)\) is not "
                                      r"supported: only output_size=1"),
    (lambda: nn.Flatten(start_dim=2), r"module 1 \(Flatten\(start_dim=2.*start_dim=1, "
                                      r"end_dim=-1"),
    (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(0)),
     r"module 1\.1 \(Flatten\(start_dim=0"),
    (lambda: nn.Conv3d(2, 2, 1), r"module 1 \(Conv3d.*is not supported by backprop"),
    (lambda: nn.Conv1d(2, 2, 3), r"module 1 \(Conv1d.*takes samples of shape \(2, L\), but "
                                 r"its input is \(2, 8, 8\)"),
    (lambda: nn.Conv2d(3, 2, 3), r"module 1 \(Conv2d.*takes samples of shape \(3, H, W\)"),
    (lambda: nn.MaxPool2d(9), r"module 1 \(MaxPool2d.*kernel spanning \(9, 9\), larger than its "
                              r"padded input \(8, 8\)"),
])
def test_from_torch_refuses_conv_and_pooling_options_naming_the_module(make, message):
    with pytest.raises(ValueError, match=message):
        from_torch(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), make()), input_shape=(1, 8, 8))


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Embedding(9, 4, max_norm=1.0), r"module 0 \(Embedding\(9, 4, max_norm=1.0\)\) "
                                               r"is not supported.*max_norm"),
    (lambda: nn.Embedding(9, 4, scale_grad_by_freq=True), r"module 0 .*scale_grad_by_freq"),
    (lambda: nn.Embedding(9, 4, sparse=True), r"module 0 .*sparse"),
])
def test_from_torch_refuses_embedding_options_naming_the_module(make, message):
    with pytest.raises(ValueError, match=message):
        from_torch(nn.Sequential(make(), nn.Flatten()), input_shape=(3,))


def test_from_torch_reads_adaptive_pooling_then_flatten_as_global_pooling():
    """to_torch writes GlobalAvgPool so; an adaptive pool not followed by a plain Flatten
    stays itself (or, in 1-D, is refused: backprop has no layer giving (C, 1))."""
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                          nn.Linear(3, 2)).double()
    net = from_torch(model, input_shape=(2, 9))
    assert [type(layer) for layer in net.layers] == [bp.Conv1d, bp.GlobalAvgPool, bp.Dense]
    x = randn(4, 2, 9)
    np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-12, atol=1e-12)
    kept = from_torch(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2, 2, 1), nn.Flatten()),
                      input_shape=(2, 5, 5))
    assert [type(layer) for layer in kept.layers] == [bp.AdaptiveAvgPool2d, bp.Conv2d,
                                                      bp.Flatten]
    with pytest.raises(ValueError, match=r"module 0 \(AdaptiveAvgPool1d\(output_size=1\)\) is "
                                         r"not supported by backprop"):
        from_torch(nn.Sequential(nn.AdaptiveAvgPool1d(1)), input_shape=(2, 5))


def test_module_runs_a_cnn_with_the_torch_copys_gradients():
    from cnn_oracle import residual_cnn
    net = residual_cnn()
    reference = to_torch(net)
    module = TorchModule(net)
    assert [name for name, _ in module.named_parameters()][:3] == [
        "layers.0.weight", "layers.1.weight", "layers.1.bias"]
    assert [name for name, _ in module.named_buffers()][:2] == [
        "layers.1.running_mean", "layers.1.running_var"]
    compare_module_gradients(module, reference, randn(6, 3, 9, 7), randn(6, 5, seed=4),
                             rtol=1e-10)
    for a, b in zip(module.buffers(), (t for n, t in reference.named_buffers()
                                       if not n.endswith("num_batches_tracked"))):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_through_a_cnn(training):
    from cnn_oracle import small_cnn
    net = small_cnn(dropout=0.0 if training else 0.5).train(training)   # fixed masks: none
    module = TorchModule(net)
    x = tensor(randn(2, 1, 8, 7, seed=3), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: module(x), (x, *module.parameters()),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def test_module_takes_integer_ids_for_an_embedding_network():
    net = ids_net().eval()
    reference = to_torch(net)
    module = TorchModule(net)
    ids = torch.from_numpy(sample(net, n=7))
    for dtype in (torch.int64, torch.int32, torch.uint8):
        np.testing.assert_array_equal(module(ids.to(dtype)).detach().numpy(),
                                      net.forward(ids.numpy()))
    g = torch.from_numpy(randn(7, 3, seed=2))
    (module(ids) * g).sum().backward()
    (reference(ids) * g).sum().backward()
    for a, b in zip(module.parameters(), reference.parameters()):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert not module.layers[0].weight.grad[2].any()             # padding_idx
    # The table's padding row gets no gradient by definition though the output depends on
    # it, so torch's finite differences cover the parameters after it (bp.gradcheck, told
    # of padding_idx, covers the table: test_pool_embedding).
    assert torch.autograd.gradcheck(lambda *p: module(ids), tuple(module.parameters())[1:],
                                    eps=1e-6, atol=1e-6, rtol=1e-5)
    for bad in (ids.double(), ids.bool(), ids.to(torch.complex64)):
        with pytest.raises(TypeError, match=r"TorchModule: x must hold integer ids \(the network "
                                            r"starts with an Embedding\), got a tensor of dtype"):
            module(bad)
    with pytest.raises(ValueError, match=r"x: every id must lie in \[0, 9\)"):
        module(ids + 9)
