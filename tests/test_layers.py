"""BatchNorm, LayerNorm, Dropout, Activation and Residual: against PyTorch (float64),
against finite differences, dropout's statistics and determinism, modes, bad input."""
import copy
import pickle

import numpy as np
import pytest

import backprop as bp
from conftest import threads
from layer_oracle import dropout_mask, torch_loss, torch_optimizer, torch_twin

RTOL = 1e-9


def deep_net(dtype="float64", seed=0, optimizer=None, dropout=0.25, loss="cross_entropy"):
    """Every layer type, a nested residual block and fused and standalone activations."""
    out = "softmax" if loss == "cross_entropy" else None
    return bp.Network([
        bp.Dense(6, 16, bias=False),      # a bias before BatchNorm would get no gradient
        bp.BatchNorm(16),
        bp.Activation("relu"),
        bp.Dropout(dropout),
        bp.Residual(bp.Dense(16, 16, activation="tanh"), bp.LayerNorm(16), bp.Dense(16, 16),
                    bp.Residual(bp.Activation("gelu"), bp.Dense(16, 16))),
        bp.Activation("elu"),
        bp.LayerNorm(16, elementwise_affine=False),
        bp.BatchNorm(16, affine=False, momentum=0.3),
        bp.Dense(16, 4, activation=out),
    ], loss=loss, optimizer=optimizer or bp.SGD(lr=0.1), dtype=dtype, seed=seed)


SINGLE_LAYER_NETS = {
    "batchnorm": lambda: [bp.Dense(5, 8), bp.BatchNorm(8), bp.Activation("relu"),
                          bp.Dense(8, 3, activation="softmax")],
    "batchnorm-last": lambda: [bp.Dense(5, 3), bp.BatchNorm(3, momentum=0.5),
                               bp.Activation("softmax")],
    "layernorm": lambda: [bp.Dense(5, 8, activation="tanh"), bp.LayerNorm(8),
                          bp.Dense(8, 3, activation="softmax")],
    "layernorm-last": lambda: [bp.Dense(5, 3), bp.LayerNorm(3), bp.Activation("softmax")],
    "dropout": lambda: [bp.Dense(5, 8, activation="relu"), bp.Dropout(0.4),
                        bp.Dense(8, 3, activation="softmax")],
    "dropout-last": lambda: [bp.Dense(5, 3), bp.Dropout(0.3), bp.Activation("softmax")],
    "activation": lambda: [bp.Dense(5, 8, activation="sigmoid"), bp.Activation("softplus"),
                           bp.Dense(8, 3), bp.Activation("softmax")],
    "residual": lambda: [bp.Dense(5, 8), bp.Residual(bp.Dense(8, 8, activation="relu"),
                                                     bp.Dense(8, 8)),
                         bp.Dense(8, 3, activation="softmax")],
    "residual-first": lambda: [bp.Residual(bp.Dense(5, 5, activation="tanh")),
                               bp.Dense(5, 3, activation="softmax")],
    "all": None,
}


def make(name, dtype="float64", **kw):
    if name == "all":
        return deep_net(dtype=dtype, **kw)
    return bp.Network(SINGLE_LAYER_NETS[name](), loss="cross_entropy",
                      optimizer=kw.get("optimizer") or bp.SGD(lr=0.1), dtype=dtype,
                      seed=kw.get("seed", 0))


def batch(rng, n_in, rows=7, classes=None):
    return rng.normal(size=(rows, n_in)), rng.integers(0, classes or 3, rows)


# ---- against PyTorch


@pytest.mark.parametrize("name", list(SINGLE_LAYER_NETS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_loss_and_every_gradient_match_torch(name, mode, rng):
    torch = pytest.importorskip("torch")
    net = make(name)
    net.train(mode == "train")
    x, y = batch(rng, net.n_inputs, classes=net.n_outputs)
    twin = torch_twin(net)
    xt = torch.tensor(x, requires_grad=True)
    logits = twin(xt)
    expected_loss = torch_loss(net, logits, y)
    expected_loss.backward()

    out = net.forward(x)
    loss = net.backward(y)
    np.testing.assert_allclose(out, torch.softmax(logits, 1).detach().numpy(), rtol=RTOL, atol=1e-13)
    assert loss == pytest.approx(expected_loss.item(), rel=RTOL)
    for label, layer, attr, param in twin.pairs:
        np.testing.assert_allclose(getattr(layer, attr + "_grad"), param.grad.numpy(),
                                   rtol=RTOL, atol=1e-12, err_msg=label)
    np.testing.assert_allclose(net.input_grad, xt.grad.numpy(), rtol=RTOL, atol=1e-12)
    for label, layer, attr, tensor in twin.buffer_pairs:
        np.testing.assert_allclose(getattr(layer, attr), tensor.numpy(), rtol=RTOL, err_msg=label)


@pytest.mark.parametrize("optimizer", [lambda: bp.SGD(lr=0.05, momentum=0.9),
                                       lambda: bp.Adam(lr=0.01)], ids=["SGD", "Adam"])
def test_several_steps_of_every_layer_match_torch(optimizer, rng):
    """Weights, running statistics, dropout masks (through the oracle) and eval outputs
    after several optimizer steps on different batches."""
    torch = pytest.importorskip("torch")
    net = deep_net(optimizer=optimizer())
    twin = torch_twin(net)
    opt = torch_optimizer(net, twin)
    for step in range(6):
        x, y = batch(rng, 6, rows=9, classes=4)
        loss = net.train_step(x, y)
        opt.zero_grad()
        expected = torch_loss(net, twin(torch.tensor(x)), y)
        expected.backward()
        opt.step()
        assert loss == pytest.approx(expected.item(), rel=RTOL), f"step {step}"
    for label, layer, attr, param in twin.pairs:
        np.testing.assert_allclose(getattr(layer, attr), param.detach().numpy(), rtol=RTOL,
                                   atol=1e-12, err_msg=label)
    for label, layer, attr, tensor in twin.buffer_pairs:
        np.testing.assert_allclose(getattr(layer, attr), tensor.numpy(), rtol=RTOL, err_msg=label)
    x, _ = batch(rng, 6, rows=5, classes=4)
    net.eval()
    twin.eval()
    np.testing.assert_allclose(net.forward(x), torch.softmax(twin(torch.tensor(x)), 1).detach(),
                               rtol=RTOL, atol=1e-13)


def test_dropout_masks_follow_their_specification(rng):
    """The forward of a Dropout layer is x * mask / (1 - p) with the mask of the oracle,
    for the pass number and the rows (offset included) it was given."""
    net = bp.Network([bp.Dropout(0.3), bp.Dense(50, 2)], seed=11, dtype="float64")
    x = rng.normal(size=(13, 50)) + 3.0            # no zeros: the mask shows in the output
    net.layers[1].weight[...] = np.eye(2, 50)       # output = the first two columns
    for n_pass in (1, 2, 3):
        out = net._engine.forward(x, None, 5)       # row_offset 5
        keep = dropout_mask(11, 0, n_pass, 13, 50, 0.3, row_offset=5)
        np.testing.assert_allclose(out, (x * keep / 0.7)[:, :2], rtol=1e-15)
        full = net._engine.slot_value(1)
        np.testing.assert_allclose(full, x * keep / 0.7, rtol=1e-15)


# ---- against finite differences


@pytest.mark.parametrize("name", list(SINGLE_LAYER_NETS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_finite_differences(name, mode, rng):
    net = make(name)
    net.train(mode == "train")
    x, y = batch(rng, net.n_inputs, classes=net.n_outputs)
    if mode == "eval":      # non-trivial running statistics
        net.train()
        net.forward(x * 2 + 1)
        net.eval()
    result = bp.gradcheck(net, x, y)
    assert result["max_error"] < 1e-6, result


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_finite_differences_through_every_layer(loss, rng):
    net = deep_net(loss=loss)
    x = rng.normal(size=(8, 6))
    y = rng.integers(0, 4, 8) if loss == "cross_entropy" else rng.normal(size=(8, 4))
    assert bp.gradcheck(net, x, y)["max_error"] < 1e-6


# ---- dropout


def test_dropout_drops_a_fraction_p_and_keeps_the_mean():
    p, rows, cols = 0.3, 200, 500
    net = bp.Network([bp.Dropout(p), bp.Dense(cols, 1)], seed=3, dtype="float64")
    x = np.ones((rows, cols))
    dropped = []
    for _ in range(4):
        net.forward(x)
        dropped.append((net._engine.slot_value(1) == 0).mean())
    # 100,000 Bernoulli(p) draws per pass: the fraction's standard deviation is
    # sqrt(p (1 - p) / 1e5) = 0.00145; 5 of them is a generous bound.
    assert all(abs(d - p) < 5 * 0.00145 for d in dropped), dropped
    assert len(set(dropped)) == 4                            # a fresh mask every pass
    kept = net._engine.slot_value(1)
    assert set(np.unique(kept)) == {0.0, 1 / (1 - p)}


def test_dropout_mean_of_train_outputs_equals_eval_output(rng):
    net = bp.Network([bp.Dense(8, 32, activation="relu"), bp.Dropout(0.5), bp.Dense(32, 3)],
                     seed=1, dtype="float64")
    x = rng.normal(size=(4, 8))
    reference = net.eval().forward(x)
    net.train()
    mean = np.mean([net.forward(x) for _ in range(4000)], axis=0)
    # Each output is a sum of 32 terms each kept with probability 1/2 and doubled: over
    # 4000 passes the mean's standard error is about |W||h| / sqrt(4000); allow 5 of them.
    spread = np.std([net.forward(x) for _ in range(200)], axis=0)
    np.testing.assert_array_less(np.abs(mean - reference), 5 * spread / np.sqrt(4000) + 1e-12)


def test_dropout_in_eval_mode_and_p_zero_is_the_identity(rng):
    x = rng.normal(size=(5, 6))
    net = bp.Network([bp.Dropout(0.9), bp.Dense(6, 6, bias=False)], dtype="float64").eval()
    net.layers[1].weight[...] = np.eye(6)
    np.testing.assert_array_equal(net.forward(x), x)
    zero = bp.Network([bp.Dropout(0.0), bp.Dense(6, 6, bias=False)], dtype="float64")
    zero.layers[1].weight[...] = np.eye(6)
    np.testing.assert_array_equal(zero.forward(x), x)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_layer_is_bit_identical_for_any_thread_count(dtype, rng):
    """Big enough that every kernel splits its work (BatchNorm, LayerNorm, dropout, the
    residual sum and the GEMMs), on odd sizes, against teams of 1 to 256 threads."""
    X, y = rng.normal(size=(203, 301)), rng.integers(0, 7, 203)

    def train(n_threads):
        with threads(n_threads):
            net = bp.Network([
                bp.Dense(301, 333), bp.BatchNorm(333), bp.Activation("relu"), bp.Dropout(0.3),
                bp.Residual(bp.Dense(333, 333, activation="gelu"), bp.LayerNorm(333)),
                bp.Dense(333, 7, activation="softmax")],
                loss="cross_entropy", optimizer=bp.Adam(lr=1e-3), dtype=dtype, seed=4)
            for _ in range(3):
                net.train_step(X, y)
            return net.params.copy(), net.buffers.copy(), net.eval().forward(X)

    reference = train(1)
    for n in (2, 7, 64, 256):
        for a, b in zip(reference, train(n)):
            np.testing.assert_array_equal(a, b, err_msg=f"{n} threads")


# ---- modes, fit and checkpoints


def test_modes_switch_like_torch():
    net = deep_net()
    assert net.training is True
    assert net.eval() is net and net.training is False
    assert net.train() is net and net.training is True
    assert net.train(False).training is False


def test_fit_trains_in_train_mode_and_restores_the_mode(rng):
    X, y = rng.normal(size=(64, 6)), rng.integers(0, 4, 64)
    net = deep_net().eval()
    seen = []
    net.fit(X, y, epochs=2, batch_size=16, validation_split=0.25, progress=False,
            callbacks=[lambda n, e, logs: seen.append(n.training)])
    assert seen == [True, True] and net.training is False
    passes = net._engine.passes
    before = net.buffers.copy()
    net.train()
    net.predict(X)
    net.evaluate(X, y)
    assert net.training is True                                  # restored
    assert net._engine.passes == passes                          # predict draws no masks
    np.testing.assert_array_equal(net.buffers, before)           # nor moves statistics


def test_checkpoint_with_batchnorm_and_dropout_resumes_bit_for_bit(rng, tmp_path):
    X, y = rng.normal(size=(96, 6)), rng.integers(0, 4, 96)
    straight = deep_net(dtype="float32", optimizer=bp.Adam(lr=1e-2))
    straight.fit(X, y, epochs=4, batch_size=16, progress=False)
    resumed = deep_net(dtype="float32", optimizer=bp.Adam(lr=1e-2))
    resumed.fit(X, y, epochs=2, batch_size=16, progress=False)
    resumed.save(tmp_path / "m.npz")
    loaded = bp.Network.load(tmp_path / "m.npz")
    loaded.fit(X, y, epochs=2, batch_size=16, progress=False)
    np.testing.assert_array_equal(loaded.params, straight.params)
    np.testing.assert_array_equal(loaded.buffers, straight.buffers)
    assert loaded._engine.passes == straight._engine.passes
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in straight.layers]


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda n: pickle.loads(pickle.dumps(n))],
                         ids=["deepcopy", "pickle"])
def test_copies_continue_bit_for_bit(copier, rng):
    X, y = rng.normal(size=(32, 6)), rng.integers(0, 4, 32)
    net = deep_net(dtype="float32", optimizer=bp.Adam(lr=1e-2))
    net.fit(X, y, epochs=1, batch_size=8, progress=False)
    twin = copier(net)
    for n in (net, twin):
        n.fit(X, y, epochs=1, batch_size=8, progress=False)
    np.testing.assert_array_equal(twin.params, net.params)
    np.testing.assert_array_equal(twin.buffers, net.buffers)
    assert twin.training == net.training and twin.history.loss == net.history.loss


# ---- bad input


def test_bad_layer_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="BatchNorm: num_features must be a positive integer"):
        bp.BatchNorm(0)
    with pytest.raises(ValueError, match=r"BatchNorm: momentum must be in \[0.0, 1.0\]"):
        bp.BatchNorm(4, momentum=1.5)
    with pytest.raises(ValueError, match="momentum=None .* is not supported"):
        bp.BatchNorm(4, momentum=None)
    with pytest.raises(ValueError, match=r"BatchNorm: eps must be in \(0.0, inf\)"):
        bp.BatchNorm(4, eps=0)
    with pytest.raises(ValueError, match=r"LayerNorm: only the last dimension"):
        bp.LayerNorm((3, 4))
    for p in (-0.1, 1.0, 2, float("nan"), "half"):
        with pytest.raises(ValueError, match="Dropout: p must"):
            bp.Dropout(p)
    with pytest.raises(ValueError, match="Activation: unknown activation 'swish'"):
        bp.Activation("swish")
    with pytest.raises(ValueError, match=r"Residual: f must keep the shape .* maps \(8,\) to \(4,\)"):
        bp.Residual(bp.Dense(8, 4))
    with pytest.raises(ValueError, match="at least one layer"):
        bp.Residual()
    with pytest.raises(TypeError, match="must be a backprop layer"):
        bp.Residual("relu")


def test_widths_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match=r"layers\[1\] \(BatchNorm.*takes samples of shape \(5,\), "
                                         r"\(5, L\) or \(5, H, W\), but its input is \(4,\)"):
        bp.Network([bp.Dense(3, 4), bp.BatchNorm(5)])
    with pytest.raises(ValueError, match=r"layers\[1\]\.layers\[0\] \(Dense.*last dimension is 5, "
                                         r"but its input is \(4,\)"):
        bp.Network([bp.Dense(3, 4), bp.Residual(bp.Dense(5, 5))])
    with pytest.raises(ValueError, match="input shape is not fixed by its first layer"):
        bp.Network([bp.Dropout(0.1), bp.Activation("relu")])


def test_train_mode_batchnorm_refuses_one_row_and_changes_nothing(rng):
    net = make("batchnorm")
    net.train_step(*batch(rng, 5))
    before = (net.params.copy(), net.buffers.copy(), net._engine.passes)
    for call in (lambda: net.forward(rng.normal(size=(1, 5))),
                 lambda: net.train_step(rng.normal(size=(1, 5)), [1])):
        with pytest.raises(ValueError, match="more than one row"):
            call()
    np.testing.assert_array_equal(net.params, before[0])
    np.testing.assert_array_equal(net.buffers, before[1])
    assert net._engine.passes == before[2]
    assert net.eval().forward(rng.normal(size=(1, 5))).shape == (1, 3)   # fine in eval mode


def test_layers_are_read_only_and_belong_to_one_network():
    dense = bp.Dense(4, 4)
    with pytest.raises(AttributeError, match="cannot be changed after construction"):
        dense.activation = "tanh"
    net = bp.Network([dense, bp.Dense(4, 2)])
    with pytest.raises(AttributeError, match="cannot be changed"):
        net.layers[0].weight = np.zeros((4, 4))
    layer = net.layers[0]
    layer.weight += 1.0                             # in place: allowed, and it is the network's
    assert np.shares_memory(layer.weight, net.params)
    with pytest.raises(ValueError, match="already belongs to another Network"):
        bp.Network([dense])
    with pytest.raises(ValueError, match="appears twice"):
        shared = bp.Dense(4, 4)
        bp.Network([shared, shared])
    with pytest.raises(ValueError, match="appears twice"):
        shared = bp.Dense(4, 4)
        bp.Network([shared, bp.Residual(shared)])
    free = copy.deepcopy(net.layers[0])            # a copy is free, with the same weights
    other = bp.Network([free, bp.Dense(4, 2)], seed=9)
    np.testing.assert_array_equal(other.layers[0].weight, net.layers[0].weight)
    assert not np.shares_memory(other.params, net.params)
