"""References for the tests of the convolutional layers, pooling, Flatten, Embedding and
the layers on (C, L) and (C, H, W) samples: torch twins of backprop networks, the
comparisons every such test makes, and the networks several test files train.

A twin is a ``torch.nn.Sequential`` in float64 computing what a network computes, its
parameters listed in the order of the network's flat buffer (layer by layer, depth
first, each layer's arrays in the order it declares them), which is also the order
``torch.nn.Module.parameters()`` lists a Sequential's.  ``attach`` copies the network's
arrays into it and pairs them, so every comparison is element by element, per array.
Its Dropout modules draw the network's own masks (see ``layer_oracle.dropout_mask``),
element ``col`` of a sample being its place as the network stores it: channels last
after a convolution or pooling (``net._plan`` says which).
"""
import math

import numpy as np

import backprop as bp
from backprop.plan import flatten
from layer_oracle import dropout_mask, non_trivial, torch_loss, torch_optimizer

# float64 against float64: the same sums in other orders differ by a few units of 2.2e-16
# times the magnitudes summed (here at most ~100), far inside 1e-9 relative; ATOL only
# covers values that cancel to near zero.
RTOL = 1e-9
ATOL = 1e-12


def assert_close(actual, expected, what, rtol=RTOL, atol=ATOL):
    """Element by element (never a norm), shapes included."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


# ------------------------------------------------------------------------ torch modules

def torch_modules():
    """The torch classes the twins are built of (torch imported only when needed)."""
    import torch

    class Sum(torch.nn.Sequential):
        """x + f(x): backprop's Residual, written here independently of interop."""

        def forward(self, x):
            return x + super().forward(x)

    class Masked(torch.nn.Module):
        """Inverted dropout with the mask a network's Dropout layer draws."""

        def __init__(self, net, layer, passes):
            super().__init__()
            self.net, self.p, self.passes = net, layer.p, passes
            self.index = [id(l) for l in flatten(net.layers)].index(id(layer))
            self.stored_last = net._plan.geometry[net._plan.layer_slot[id(layer)]].channels_last

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            n, shape = x.shape[0], tuple(x.shape[1:])
            keep = dropout_mask(self.net._key_seed, self.index, self.passes["n"], n,
                                math.prod(shape), self.p).astype(np.float64)
            if self.stored_last:         # stored (..., C): back to PyTorch's (C, ...)
                keep = np.moveaxis(keep.reshape((n,) + shape[1:] + shape[:1]), -1, 1)
            return x * torch.from_numpy(keep.reshape(x.shape)) / (1 - self.p)

    class Twin(torch.nn.Sequential):
        """Counts train-mode passes like the network, so its Masked modules draw the
        network's masks for the same pass."""

        def forward(self, x):
            if self.training:
                self.passes["n"] += 1
            return super().forward(x)

    return Sum, Masked, Twin


def torch_activation(name):
    """PyTorch's module for backprop's activation `name` (PyTorch's defaults are backprop's
    definitions), or None for the identity."""
    import torch
    nn = torch.nn
    return {"identity": lambda: None, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
            "gelu": nn.GELU, "elu": nn.ELU, "softplus": nn.Softplus,
            "leaky_relu": lambda: nn.LeakyReLU(0.01)}[name]()


def twin(net, modules):
    """A Twin of `net` made of `modules` (torch modules built by the caller, float64),
    holding copies of the network's arrays (see attach)."""
    _, _, Twin = torch_modules()
    model = Twin(*modules)
    model.passes = {"n": net._engine.passes}
    for module in model.modules():
        if hasattr(module, "passes") and module is not model:
            module.passes = model.passes
    attach(net, model)
    return model.train(net.training)


def dropout(net, layer):
    """The torch module for `layer`, a Dropout of `net` (its passes are set by twin)."""
    _, Masked, _ = torch_modules()
    return Masked(net, layer, None)


def to_twin(net):
    """The twin of `net` from ``interop.to_torch`` (its Dropout modules replaced by the
    network's masks, the final softmax or sigmoid dropped when the loss takes logits)."""
    import torch
    from backprop.interop import to_torch
    model = to_torch(net)
    dropouts = iter(layer for layer in flatten(net.layers) if isinstance(layer, bp.Dropout))

    def replace(sequential):
        for name, child in sequential.named_children():
            if isinstance(child, torch.nn.Dropout):
                setattr(sequential, name, dropout(net, next(dropouts)))
            elif isinstance(child, torch.nn.Sequential):
                replace(child)
    replace(model)
    modules = list(model)
    if net.loss in ("cross_entropy", "binary_cross_entropy"):
        assert isinstance(modules[-1], (torch.nn.Softmax, torch.nn.Sigmoid))
        modules = modules[:-1]
    return twin(net, modules)


def attach(net, model):
    """Copy the network's parameters and running statistics into `model` (listed in the
    same order, shapes checked) and record the pairs: ``model.pairs`` and
    ``model.buffer_pairs`` are [(name, backprop array's owner, attribute, tensor)]."""
    import torch
    params = list(model.parameters())
    assert len(params) == len(net._plan.params), "the twin's parameters do not pair up"
    model.pairs = []
    with torch.no_grad():
        for (layer, param, _), tensor in zip(net._plan.params, params):
            name = f"{net._plan.names[id(layer)]}.{param.name}"
            assert tuple(tensor.shape) == param.shape, f"{name}: {tuple(tensor.shape)}"
            tensor.copy_(torch.from_numpy(np.array(getattr(layer, param.name), np.float64)))
            model.pairs.append((name, layer, param.name, tensor))
        stats = [b for n, b in model.named_buffers() if n.endswith(("running_mean",
                                                                    "running_var"))]
        assert len(stats) == len(net._plan.buffers), "the twin's buffers do not pair up"
        model.buffer_pairs = []
        for (layer, name, _, shape, _), tensor in zip(net._plan.buffers, stats):
            tensor.copy_(torch.from_numpy(np.array(getattr(layer, name), np.float64)))
            model.buffer_pairs.append((f"{net._plan.names[id(layer)]}.{name}", layer, name,
                                       tensor))
    return model


# -------------------------------------------------------------------------- comparisons

def compare_pass(net, model, x, y):
    """One forward and backward of `net` and its twin on (x, y) in the network's mode:
    the outputs, the loss, every parameter's gradient, the input's gradient (unless the
    input is ids) and the running statistics, element by element."""
    import torch
    model.train(net.training)
    ids = net._plan.geometry[0].ids
    xt = torch.tensor(x) if ids else torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logits = model(xt)
    expected = torch_loss(net, logits, y)
    expected.backward()
    net.zero_grad()
    out = net.forward(x)
    loss = net.backward(y, input_grad=not ids)
    probabilities = {"softmax": lambda z: torch.softmax(z, 1), "sigmoid": torch.sigmoid}
    if net.loss in ("cross_entropy", "binary_cross_entropy"):
        logits = probabilities[net.output_activation](logits)
    assert_close(out, logits.detach().numpy(), "output")
    assert_close(loss, expected.item(), "loss")
    assert net.params.size == 0 or np.abs(net.grads).max() > 0       # not all zero
    for name, layer, attr, tensor in model.pairs:
        assert_close(getattr(layer, attr + "_grad"), tensor.grad.numpy(), f"{name} gradient")
    if not ids:
        assert np.abs(xt.grad.numpy()).max() > 0
        assert_close(net.input_grad, xt.grad.numpy(), "input gradient")
    compare_arrays(net, model, buffers_only=True)
    return out


def compare_arrays(net, model, buffers_only=False, rtol=RTOL, atol=ATOL):
    """The network's parameters (unless buffers_only) and running statistics against the
    twin's."""
    pairs = model.buffer_pairs if buffers_only else model.pairs + model.buffer_pairs
    for name, layer, attr, tensor in pairs:
        assert_close(getattr(layer, attr), tensor.detach().numpy(), name, rtol, atol)


def compare_training(net, model, batches):
    """Train-mode steps of `net` (train_step, its own optimizer) and of its twin (the
    same torch.optim rule) on `batches` [(x, y)]: the losses, then the weights and running
    statistics, then the eval-mode outputs on the first batch."""
    import torch
    net.train()
    model.train()
    optimizer = torch_optimizer(net, model)
    for step, (x, y) in enumerate(batches):
        loss = net.train_step(x, y)
        optimizer.zero_grad()
        expected = torch_loss(net, model(torch.tensor(x)), y)
        expected.backward()
        optimizer.step()
        assert_close(loss, expected.item(), f"loss of step {step}")
    compare_arrays(net, model)
    net.eval()
    model.eval()
    x = batches[0][0]
    logits = model(torch.tensor(x)).detach()
    if net.loss == "cross_entropy":
        logits = torch.softmax(logits, 1)
    assert_close(net.forward(x), logits.numpy(), "eval output after training")


def compare_module_gradients(module, reference, x, g, rtol):
    """A TorchModule and its network's torch copy (to_torch), each run on x and
    backpropagated from sum(out * g): the input's and every parameter's gradients agree."""
    import torch
    xs = [torch.tensor(x.copy(), requires_grad=True) for _ in range(2)]
    for model, xi in ((module, xs[0]), (reference, xs[1])):
        (model(xi) * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(xs[0].grad.numpy(), xs[1].grad.numpy(), rtol=rtol, atol=1e-12)
    ours, theirs = list(module.parameters()), list(reference.parameters())
    assert len(ours) == len(theirs) == len(module.net._plan.params)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=rtol, atol=1e-12)


# -------------------------------------------------- one layer kind, in two places

class Case:
    """A layer (or a few) under test: `layers()` makes the backprop layers; `torch(net,
    layers)` the torch modules computing the same, built by the test from the same
    arguments (net and layers, once attached, for Dropout's masks); `shape` the input
    sample's shape; `ids`, the input is ids below that many (an Embedding)."""

    def __init__(self, layers, torch, shape, ids=None):
        self.layers, self.torch, self.shape, self.ids = layers, torch, tuple(shape), ids


def output_shape(layers, shape):
    for layer in layers:
        shape = shape if isinstance(layer, bp.Residual) else layer.output_shape(shape)
    return shape


CONTEXTS = ("output", "hidden")


def case_network(case, context, seed=0, optimizer=None, classes=3):
    """(net, model) for a Case.  "output": the case's layers are the whole network, mse
    on their output, the input as users give it (channels first; a layer reading channels
    last gets it through a relayout), the input's gradient back in that order.  "hidden":
    they sit between a convolution (so their input is stored channels last) and Flatten +
    Dense with cross_entropy; for ids, between the Embedding and Flatten + Dense.  The
    parameters and running statistics are away from their first values (non_trivial)."""
    import torch
    nn = torch.nn
    layers, shape = case.layers(), case.shape
    before, after, torch_before, torch_after = [], [], [], []
    if context == "hidden":
        if case.ids is None:
            conv = (bp.Conv1d, bp.Conv2d)[len(shape) - 2]
            before = [conv(shape[0], shape[0], 3, padding=1, activation="tanh")]
            torch_before = [(nn.Conv1d, nn.Conv2d)[len(shape) - 2](
                shape[0], shape[0], 3, padding=1, dtype=torch.float64), nn.Tanh()]
        width = math.prod(output_shape(layers, shape))
        after = [bp.Flatten(), bp.Dense(width, classes, activation="softmax")]
        torch_after = [nn.Flatten(), nn.Linear(width, classes, dtype=torch.float64)]
    elif context != "output":
        raise ValueError(context)
    net = bp.Network(before + layers + after, loss="cross_entropy" if after else "mse",
                     optimizer=optimizer or bp.Adam(lr=1e-2), dtype="float64", seed=seed,
                     input_shape=shape)
    non_trivial(net, seed + 1)
    return net, twin(net, torch_before + case.torch(net, layers) + torch_after)


def case_data(net, case, rng, n=5):
    """A batch for a case's network: images, or ids (the first and the last id among
    them, where padding_idx usually is, and some ids more than once) and targets."""
    if case.ids is not None:
        x = rng.integers(0, case.ids, (n,) + case.shape)
        x.flat[:2] = 0, case.ids - 1
        assert np.unique(x).size < x.size            # repeated ids, whose gradients add
    else:
        x = rng.normal(size=(n,) + case.shape)
    if net.loss == "cross_entropy":
        return x, rng.integers(0, net.n_outputs, n)
    return x, rng.normal(size=(n,) + net.output_shape)


def check_case(case, context, mode, rng):
    """One pass in `mode` against the twin (see compare_pass)."""
    net, model = case_network(case, context)
    net.train(mode == "train")
    compare_pass(net, model, *case_data(net, case, rng))


def check_case_training(case, context, rng, steps=3):
    """Adam steps on different batches against torch.optim.Adam (see compare_training)."""
    net, model = case_network(case, context)
    compare_training(net, model, [case_data(net, case, rng) for _ in range(steps)])


def gradcheck_case(case, context, mode, rng, tolerance=1e-6):
    """bp.gradcheck (central differences, float64) of the case's network in `mode`."""
    net, _ = case_network(case, context)
    net.train(mode == "train")
    result = bp.gradcheck(net, *case_data(net, case, rng, n=3))
    assert result["max_error"] < tolerance, result
    assert result["checked"] >= net.params.size


def case_tests(cases, everywhere):
    """The tests every layer kind's cases get, for a test module to bind to its own
    names: each case against torch in both places and modes, Adam steps against
    torch.optim.Adam (hidden, where it and its neighbours have parameters), central
    differences as the output layer in train mode, and for the cases `everywhere` in
    both places and both modes."""
    import pytest
    modes = pytest.mark.parametrize("mode", ["train", "eval"])
    contexts = pytest.mark.parametrize("context", CONTEXTS)
    each = pytest.mark.parametrize("case", list(cases))

    @modes
    @contexts
    @each
    def test_matches_torch(case, context, mode, rng):
        check_case(cases[case], context, mode, rng)

    @each
    def test_adam_steps_match_torch(case, rng):
        check_case_training(cases[case], "hidden", rng)

    @each
    def test_finite_differences_as_the_output_layer(case, rng):
        gradcheck_case(cases[case], "output", "train", rng)

    @modes
    @contexts
    @pytest.mark.parametrize("case", everywhere)
    def test_finite_differences(case, context, mode, rng):
        gradcheck_case(cases[case], context, mode, rng)

    return (test_matches_torch, test_adam_steps_match_torch,
            test_finite_differences_as_the_output_layer, test_finite_differences)


# ------------------------------------------------------------------------------- networks

def lenet(dtype="float64", seed=0, optimizer=None, dropout=0.0):
    """LeNet-5 as PyTorch's tutorials write it, on 28x28 grey images."""
    extra = [bp.Dropout(dropout)] if dropout else []
    return bp.Network([
        bp.Conv2d(1, 6, 5, padding=2, activation="relu"), bp.MaxPool2d(2),
        bp.Conv2d(6, 16, 5, activation="relu"), bp.MaxPool2d(2), bp.Flatten(),
        bp.Dense(400, 120, activation="relu"), *extra, bp.Dense(120, 84, activation="relu"),
        bp.Dense(84, 10, activation="softmax"),
    ], loss="cross_entropy", optimizer=optimizer or bp.Adam(lr=1e-3), dtype=dtype, seed=seed,
        input_shape=(1, 28, 28))


def residual_cnn(dtype="float64", seed=0, optimizer=None, channels=8, classes=5,
                 size=(3, 9, 7)):
    """A small ResNet: a stem of conv + BatchNorm + relu, two residual blocks of
    conv-BN-relu-conv-BN (the second with a dilated and a depthwise conv), global average
    pooling and a Dense classifier, on odd-sized images."""
    c = channels

    def block(second):
        return bp.Residual(bp.Conv2d(c, c, 3, padding=1, bias=False), bp.BatchNorm(c),
                           bp.Activation("relu"), second, bp.BatchNorm(c))

    net = bp.Network([
        bp.Conv2d(size[0], c, 3, padding=1, bias=False), bp.BatchNorm(c), bp.Activation("relu"),
        block(bp.Conv2d(c, c, 3, padding=1, bias=False)), bp.Activation("relu"),
        block(bp.Conv2d(c, c, 3, padding=2, dilation=2, groups=c, bias=False)),
        bp.Activation("relu"),
        bp.GlobalAvgPool(), bp.Dense(c, classes, activation="softmax"),
    ], loss="cross_entropy", optimizer=optimizer or bp.Adam(lr=1e-3), dtype=dtype, seed=seed,
        input_shape=size)
    return non_trivial(net, seed + 1)


def small_cnn(dtype="float64", seed=0, optimizer=None, dropout=0.25):
    """Conv, pooling, Dropout (its masks keyed by the global row) and a Dense head on
    (1, 8, 7) images: small enough for MPI and torch.autograd.gradcheck."""
    return bp.Network([
        bp.Conv2d(1, 4, 3, padding=1, activation="tanh"), bp.MaxPool2d(2),
        bp.Conv2d(4, 6, 3, padding="same", activation="relu"), bp.Dropout(dropout),
        bp.AvgPool2d(2, stride=1), bp.Flatten(), bp.Dense(6 * 3 * 2, 3, activation="softmax"),
    ], loss="cross_entropy", optimizer=optimizer or bp.Adam(lr=1e-2), dtype=dtype,
        seed=seed, input_shape=(1, 8, 7))


def embedding_net(dtype="float64", seed=0, optimizer=None, length=6, vocabulary=20):
    """Embedding (with padding_idx), Dropout, Flatten and a Dense classifier on
    sequences of `length` ids."""
    return bp.Network([
        bp.Embedding(vocabulary, 8, padding_idx=0), bp.Dropout(0.2), bp.Flatten(),
        bp.Dense(length * 8, 4, activation="softmax"),
    ], loss="cross_entropy", optimizer=optimizer or bp.Adam(lr=1e-2), dtype=dtype,
        seed=seed, input_shape=(length,))


# Networks of every new layer and option for the converters (to_torch, from_torch, ONNX).

def cnn_2d(dtype="float64"):
    return non_trivial(bp.Network([
        bp.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2,
                  bias=False, activation="relu"),
        bp.BatchNorm(4), bp.MaxPool2d(3, stride=1, padding=1, dilation=2),
        bp.AvgPool2d(2, padding=1, count_include_pad=False), bp.Dropout(0.1),
        bp.Residual(bp.Conv2d(4, 4, 3, padding="same"), bp.LayerNorm(3)),
        bp.AdaptiveAvgPool2d(1), bp.Conv2d(4, 6, 1, activation="tanh"), bp.Flatten(),
        bp.Dense(6, 3, activation="softmax"),
    ], input_shape=(2, 11, 8), dtype=dtype, seed=0), 1)


def cnn_1d(dtype="float64"):
    return non_trivial(bp.Network([
        bp.Conv1d(3, 4, 5, padding="same", activation="gelu"), bp.MaxPool1d(2),
        bp.AvgPool1d(3, stride=1, padding=1), bp.BatchNorm(4),
        bp.Conv1d(4, 4, 3, groups=4, dilation=2), bp.GlobalAvgPool(), bp.Dense(4, 2),
    ], input_shape=(3, 13), dtype=dtype, seed=0), 1)


def ids_net(dtype="float64"):
    return non_trivial(bp.Network([
        bp.Embedding(9, 4, padding_idx=2), bp.Dense(4, 5, activation="elu"), bp.LayerNorm(5),
        bp.Flatten(), bp.Dense(30, 3, activation="softmax"),
    ], input_shape=(6,), dtype=dtype, seed=0), 1)


CNNS = {"cnn_2d": cnn_2d, "cnn_1d": cnn_1d, "ids_net": ids_net}


def sample(net, n=5, seed=0):
    """n input samples for `net`: ids below its Embedding's num_embeddings, or values of
    its dtype."""
    rng = np.random.default_rng(seed)
    if net._plan.geometry[0].ids:
        return rng.integers(0, net.layers[0].num_embeddings, (n,) + net.input_shape)
    return rng.normal(size=(n,) + net.input_shape).astype(net.dtype)


def images(rng, n, shape, classes):
    """n random images of `shape` and class labels."""
    return rng.normal(size=(n,) + tuple(shape)), rng.integers(0, classes, n)


def snapshot(net):
    """Everything a refused call must leave as it was."""
    return {"params": net.params.copy(), "grads": net.grads.copy(),
            "buffers": net.buffers.copy(), "passes": net._engine.passes,
            "steps": net.optimizer.steps, "training": net.training,
            **{f"optimizer.{k}": v.copy() for k, v in net.optimizer.state.items()}}


def assert_unchanged(net, before):
    after = snapshot(net)
    assert after.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
