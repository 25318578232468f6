"""Whole convolutional networks: LeNet-5 and a small residual CNN against PyTorch
(float64), finite differences, thread counts; and what every network gets, shown on
CNNs and an Embedding network: refused input changes nothing, checkpoints and copies
continue bit for bit, clip_grad_norm, the L2 penalty, gradient norms and the
GradientMonitor naming the convolution weights."""
import copy
import pickle
import re
import warnings

import numpy as np
import pytest

import backprop as bp
from cnn_oracle import (assert_close, assert_unchanged, compare_pass, compare_training,
                        embedding_net, images, lenet, residual_cnn, small_cnn, snapshot,
                        to_twin)
from conftest import threads

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")

NETWORKS = {
    "lenet": (lenet, (1, 28, 28), 10),
    "lenet-dropout": (lambda **kw: lenet(dropout=0.3, **kw), (1, 28, 28), 10),
    "residual-cnn": (residual_cnn, (3, 9, 7), 5),
}


def make(name, **kw):
    build, shape, classes = NETWORKS[name]
    return build(**kw), shape, classes


# ---- against PyTorch


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NETWORKS)
def test_matches_torch(name, mode, rng):
    pytest.importorskip("torch")
    net, shape, classes = make(name)
    net.train(mode == "train")
    compare_pass(net, to_twin(net), *images(rng, 6, shape, classes))


@pytest.mark.parametrize("name", NETWORKS)
def test_adam_steps_match_torch(name, rng):
    pytest.importorskip("torch")
    net, shape, classes = make(name, optimizer=bp.Adam(lr=2e-3))
    compare_training(net, to_twin(net), [images(rng, 8, shape, classes) for _ in range(4)])


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NETWORKS)
def test_finite_differences(name, mode, rng):
    """300 random parameters and every input value.  A wrong gradient is off by O(1);
    LeNet's central differences carry ~1e-10 of rounding noise (a loss of ~2.3 summed
    over its 61,706 weights' contributions, divided by 2 eps), which is ~1e-6 relative at
    gradcheck's floor of 1e-4: hence 1e-5."""
    net, shape, classes = make(name)
    net.train(mode == "train")
    result = bp.gradcheck(net, *images(rng, 2, shape, classes), max_params=300)
    assert result["max_error"] < 1e-5, result


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bit_identical_for_any_thread_count(dtype, rng):
    x, y = images(rng, 40, (3, 17, 15), 5)

    def run(n_threads):
        with threads(n_threads):
            net = residual_cnn(dtype=dtype, size=(3, 17, 15))
            net.train_step(x, y)
            out = net.forward(x)
            net.backward(y)
            return out, net.grads.copy(), net.params.copy(), net.buffers.copy(), net.input_grad

    reference = run(1)
    for n in (2, 7, 64):
        for name, a, b in zip(("output", "grads", "params", "buffers", "input_grad"),
                              reference, run(n)):
            np.testing.assert_array_equal(b, a, err_msg=f"{name}, {n} threads")


# ---- refused input changes nothing


@pytest.fixture
def busy_cnn(rng):
    """A CNN with BatchNorm and Dropout, optimizer state and pending gradients."""
    net = bp.Network([bp.Conv2d(1, 4, 3, bias=False), bp.BatchNorm(4), bp.Activation("relu"),
                      bp.Dropout(0.2), bp.MaxPool2d(2), bp.Flatten(),
                      bp.Dense(4 * 3 * 2, 3, activation="softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(amsgrad=True), dtype="float32",
                     seed=0, input_shape=(1, 8, 6))
    x, y = images(rng, 5, (1, 8, 6), 3)
    net.train_step(x, y)
    net.forward(x)
    net.backward(y)
    return net, x, y


BAD_IMAGES = [
    (np.zeros((5, 1, 8, 5)), ValueError, r"x must have shape \(batch, 1, 8, 6\) for this network, "
                                         r"got array of shape \(5, 1, 8, 5\)"),
    (np.zeros((5, 48)), ValueError, r"x must be 4-dimensional, got array of shape \(5, 48\)"),
    (np.zeros((5, 8, 6)), ValueError, r"x must be 4-dimensional"),
    (np.zeros((5, 8, 6, 1)), ValueError, r"x must have shape \(batch, 1, 8, 6\)"),
    (np.zeros((0, 1, 8, 6)), ValueError, r"x is an empty batch"),
    (np.full((5, 1, 8, 6), np.nan), ValueError, r"x contains NaN or Inf \(in row \d\)"),
    (np.where(np.arange(240).reshape(5, 1, 8, 6) == 200, 1e39, 0.0), ValueError,
     r"x contains NaN or Inf \(in row 4\), or a value too large"),
    (np.zeros((5, 1, 8, 6), dtype=np.int64), TypeError, r"x must have dtype float32 or float64"),
]


@pytest.mark.parametrize("x, error, message", BAD_IMAGES)
def test_bad_images_change_nothing(busy_cnn, x, error, message):
    net, _, y = busy_cnn
    before = snapshot(net)
    for call in (lambda: net.forward(x), lambda: net.train_step(x, y),
                 lambda: net.compute_gradients(x, y)):
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(net, before)


@pytest.mark.parametrize("x", [np.zeros((5, 1, 8, 5)), np.zeros((5, 48)), np.zeros((5, 8, 6)),
                               np.zeros((5, 8, 6, 1))])
def test_fit_and_evaluate_refuse_images_of_another_shape(busy_cnn, x):
    net, _, y = busy_cnn
    before = snapshot(net)
    rng_state, epoch = net.rng.bit_generator.state, net.epoch
    message = rf"X must have shape \(n_samples, 1, 8, 6\), got {re.escape(str(x.shape))}"
    for call in (lambda: net.fit(x, y, epochs=1, progress=False), lambda: net.evaluate(x, y),
                 lambda: net.predict(x)):
        with pytest.raises(ValueError, match=message):
            call()
        assert_unchanged(net, before)
        assert net.rng.bit_generator.state == rng_state and net.epoch == epoch


@pytest.mark.parametrize("y, error, message", [
    (np.array([0, 1, 3, 0, 1]), ValueError, r"y: class labels must lie in \[0, 3\), got 3"),
    (np.zeros((5, 3, 1)), ValueError, r"y must have shape \(5, 3\)"),
    (np.zeros(4, dtype=np.int64), ValueError, r"class labels must have shape \(5,\)"),
])
def test_bad_targets_change_nothing(busy_cnn, y, error, message):
    net, x, _ = busy_cnn
    before = snapshot(net)
    for call in (lambda: net.train_step(x, y), lambda: net.compute_gradients(x, y)):
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(net, before)


# ---- checkpoints and copies


TRAINED = {"cnn": (lambda: residual_cnn(dtype="float32"), (3, 9, 7), 5),
           "cnn-dropout": (lambda: small_cnn(dtype="float32"), (1, 8, 7), 3),
           "embedding": (lambda: embedding_net(dtype="float32"), None, 4)}


def data_for(name, rng, n=48):
    build, shape, classes = TRAINED[name]
    if shape is None:                                    # ids
        return rng.integers(0, 20, (n, 6)), rng.integers(0, classes, n)
    return images(rng, n, shape, classes)


@pytest.mark.parametrize("name", TRAINED)
def test_checkpoint_resumes_bit_for_bit(name, rng, tmp_path):
    X, y = data_for(name, rng)
    straight = TRAINED[name][0]()
    straight.fit(X, y, epochs=4, batch_size=16, progress=False)
    resumed = TRAINED[name][0]()
    resumed.fit(X, y, epochs=2, batch_size=16, progress=False)
    resumed.save(tmp_path / "m.npz")
    loaded = bp.Network.load(tmp_path / "m.npz")
    assert loaded.config() == resumed.config() and loaded.input_shape == resumed.input_shape
    loaded.fit(X, y, epochs=2, batch_size=16, progress=False)
    np.testing.assert_array_equal(loaded.params, straight.params)
    np.testing.assert_array_equal(loaded.buffers, straight.buffers)
    for key, value in straight.optimizer.state.items():
        np.testing.assert_array_equal(loaded.optimizer.state[key], value)
    assert loaded._engine.passes == straight._engine.passes
    assert loaded.history.loss == straight.history.loss
    np.testing.assert_array_equal(loaded.predict_proba(X), straight.predict_proba(X))


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda n: pickle.loads(pickle.dumps(n))],
                         ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("name", TRAINED)
def test_copies_continue_bit_for_bit(name, copier, rng):
    X, y = data_for(name, rng, n=32)
    net = TRAINED[name][0]()
    net.fit(X, y, epochs=1, batch_size=8, progress=False)
    twin = copier(net)
    assert not np.shares_memory(twin.params, net.params)
    for n in (net, twin):
        n.fit(X, y, epochs=1, batch_size=8, progress=False)
    np.testing.assert_array_equal(twin.params, net.params)
    np.testing.assert_array_equal(twin.buffers, net.buffers)
    assert twin.history.loss == net.history.loss
    for layer, copied in zip(net._plan.layers, twin._plan.layers):    # free copies of layers
        free = copier(layer)
        assert type(free) is type(copied) and free.config() == layer.config()


# ---- gradients: clipping, the L2 penalty, norms and the monitor


def test_clip_grad_norm_matches_torch(rng):
    torch = pytest.importorskip("torch")
    net = residual_cnn()
    model = to_twin(net)
    x, y = images(rng, 6, (3, 9, 7), 5)
    compare_pass(net, model, x, y)
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    norm = net.clip_grad_norm(0.05)
    assert norm > 0.05                                       # the clipping binds
    assert_close(norm, expected.item(), "norm before clipping")
    for name, layer, attr, tensor in model.pairs:
        assert_close(getattr(layer, attr + "_grad"), tensor.grad.numpy(), f"clipped {name}")


def test_train_step_clipping_matches_torch(rng):
    torch = pytest.importorskip("torch")
    net = lenet(optimizer=bp.SGD(lr=0.1, momentum=0.9))
    model = to_twin(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x, y = images(rng, 4, (1, 28, 28), 10)
        net.train_step(x, y, clip_grad_norm=0.5)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.tensor(x)), torch.tensor(y)).backward()
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5) > 0.5
        optimizer.step()
    for name, layer, attr, tensor in model.pairs:
        assert_close(getattr(layer, attr), tensor.detach().numpy(), name)


def penalised(net):
    """The arrays the L2 penalty applies to, named by the test: convolution and Dense
    kernels and embedding tables (not biases, nor BatchNorm's scale and shift)."""
    from backprop.plan import flatten
    kinds = (bp.Conv1d, bp.Conv2d, bp.Dense, bp.Embedding)
    return [layer.weight for layer in flatten(net.layers) if isinstance(layer, kinds)]


@pytest.mark.parametrize("name", ["residual-cnn", "lenet", "embedding"])
def test_l2_penalises_convolution_and_embedding_weights_only(name, rng):
    """With l2 = c, the loss is the data loss + c / 2 * sum of the squared weights, and
    each weight's gradient grows by c * W; biases and BatchNorm's parameters get nothing
    (their gradients are those without the penalty)."""
    if name == "embedding":
        net = embedding_net()
        x, y = rng.integers(0, 20, (7, 6)), rng.integers(0, 4, 7)
    else:
        net, shape, classes = make(name)
        x, y = images(rng, 5, shape, classes)
    c = 0.3
    plain = copy.deepcopy(net)
    loss = net.compute_gradients(x, y, l2=c)
    expected = plain.compute_gradients(x, y) + c / 2 * sum(np.sum(w ** 2) for w in
                                                            penalised(net))
    assert loss == pytest.approx(expected, rel=1e-12)
    weights = penalised(net)
    assert len(weights) == len(net._plan.weights) > 0
    for (layer, param, _), (copied, _, _) in zip(net._plan.params, plain._plan.params):
        array = getattr(layer, param.name)
        extra = c * array if any(array is w for w in weights) else 0.0
        np.testing.assert_allclose(getattr(layer, param.name + "_grad"),
                                   getattr(copied, param.name + "_grad") + extra, rtol=1e-12,
                                   atol=1e-15, err_msg=f"{net._plan.names[id(layer)]}.{param.name}")


def test_gradient_norms_name_every_weight(rng):
    net = residual_cnn()
    x, y = images(rng, 6, (3, 9, 7), 5)
    net.forward(x)
    net.backward(y)
    norms = net.layer_grad_norms()
    assert list(norms) == [
        "layers[0].weight",
        "layers[3].layers[0].weight", "layers[3].layers[3].weight",
        "layers[5].layers[0].weight", "layers[5].layers[3].weight",
        "layers[8].weight"]
    assert net.weight_names() == list(norms)
    layers = [net.layers[0], net.layers[3].layers[0], net.layers[3].layers[3],
              net.layers[5].layers[0], net.layers[5].layers[3], net.layers[8]]
    for (name, norm), layer in zip(norms.items(), layers):
        assert norm == pytest.approx(np.linalg.norm(layer.weight_grad), rel=1e-12), name
        assert norm > 0
    ids = embedding_net()
    assert ids.weight_names() == ["layers[0].weight", "layers[3].weight"]
    history = ids.fit(rng.integers(0, 20, (16, 6)), rng.integers(0, 4, 16), epochs=2,
                      batch_size=8, progress=False)
    assert [len(row) for row in history.grad_norms] == [2, 2]


def test_gradient_monitor_names_a_vanishing_convolution(rng):
    """The second convolution's weights are scaled by 1e-7, so the gradient reaching the
    first convolution vanishes: the monitor names it."""
    net = bp.Network([bp.Conv2d(1, 4, 3, activation="tanh"), bp.Conv2d(4, 4, 3),
                      bp.Flatten(), bp.Dense(4 * 4 * 3, 3, activation="softmax")],
                     loss="cross_entropy", optimizer=bp.SGD(lr=1e-9), seed=0,
                     input_shape=(1, 8, 7), dtype="float64")
    net.layers[1].weight[...] *= 1e-7
    monitor = bp.GradientMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.fit(*images(rng, 16, (1, 8, 7), 3), epochs=1, batch_size=16, progress=False,
                callbacks=[monitor])
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert messages == [message for _, message in monitor.warnings]
    # The first convolution's gradient and the Dense layer's (its input, the second
    # convolution's output, is ~1e-7 of what it would be) are ~1e-7 of the second
    # convolution's, the largest.
    assert [m.split(" is vanishing")[0] for m in messages] == [
        "epoch 1: the gradient of layers[0].weight (Conv2d(1, 4, kernel_size=(3, 3), "
        "activation='tanh', bias=True))",
        "epoch 1: the gradient of layers[3].weight (Dense(48, 3, activation='softmax', "
        "bias=True))"]
