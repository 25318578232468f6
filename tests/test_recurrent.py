"""RNN, LSTM, GRU and LastStep without PyTorch (test_recurrent_torch.py compares them with
it): a hand-worked example, finite differences, bit-identical results for any thread
count, checkpoints, pickling, their declarations and their bad arguments and inputs."""
import copy
import pickle

import numpy as np
import pytest

import backprop as bp
from cnn_oracle import assert_unchanged, snapshot
from conftest import threads

KINDS = {"rnn-tanh": lambda *a, **k: bp.RNN(*a, **k),
         "rnn-relu": lambda *a, **k: bp.RNN(*a, nonlinearity="relu", **k),
         "lstm": lambda *a, **k: bp.LSTM(*a, **k), "gru": lambda *a, **k: bp.GRU(*a, **k)}


def classifier(kind, dtype="float64", seed=0, time=5, optimizer=None, **options):
    """A two-layer bidirectional stack of `kind`, LastStep and a softmax classifier."""
    return bp.Network([KINDS[kind](3, 4, num_layers=2, bidirectional=True, **options),
                       bp.LastStep(), bp.Dense(8, 3, activation="softmax")],
                      loss="cross_entropy", optimizer=optimizer or bp.Adam(lr=1e-2),
                      dtype=dtype, seed=seed, input_shape=(time, 3))


def sequences(rng, n, time, features, classes=3):
    return rng.normal(size=(n, time, features)), rng.integers(0, classes, n)


def test_a_hand_worked_rnn():
    """RNN(1, 1, relu) with W_ih = 1, W_hh = 0.5, no bias, on x = (1, 2, 3): the states are
    h1 = 1, h2 = 2 + 0.5 * 1 = 2.5, h3 = 3 + 0.5 * 2.5 = 4.25 (all positive: relu passes
    them).  With dL/dh = (0, 0, 1), dL/d(pre-activation) is 1 at step 3, 0.5 at step 2
    (through W_hh) and 0.25 at step 1, so dL/dW_ih = 1 * 3 + 0.5 * 2 + 0.25 * 1 = 4.25,
    dL/dW_hh = 1 * h2 + 0.5 * h1 + 0.25 * 0 = 3, and dL/dx = (0.25, 0.5, 1)."""
    net = bp.Network([bp.RNN(1, 1, nonlinearity="relu", bias=False)], dtype="float64",
                     input_shape=(3, 1))
    layer = net.layers[0]
    layer.weight_ih_l0[...] = 1.0
    layer.weight_hh_l0[...] = 0.5
    out = net.forward(np.array([[[1.0], [2.0], [3.0]]]))
    np.testing.assert_array_equal(out, [[[1.0], [2.5], [4.25]]])
    net.backward(grad_output=np.array([[[0.0], [0.0], [1.0]]]))
    np.testing.assert_array_equal(layer.weight_ih_l0_grad, [[4.25]])
    np.testing.assert_array_equal(layer.weight_hh_l0_grad, [[3.0]])
    np.testing.assert_array_equal(net.input_grad, [[[0.25], [0.5], [1.0]]])


def test_the_reverse_direction_reads_the_sequence_backwards():
    """A bidirectional layer's reverse half is the forward half run on the reversed
    sequence, its output reversed back (the same weights copied across)."""
    rng = np.random.default_rng(0)
    both = bp.Network([bp.GRU(2, 3, bidirectional=True)], dtype="float64", seed=1,
                      input_shape=(6, 2))
    one = bp.Network([bp.GRU(2, 3)], dtype="float64", seed=2, input_shape=(6, 2))
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        getattr(one.layers[0], name)[...] = getattr(both.layers[0], name + "_reverse")
    x = rng.normal(size=(4, 6, 2))
    np.testing.assert_allclose(both.forward(x)[:, :, 3:], one.forward(x[:, ::-1])[:, ::-1],
                               rtol=1e-14, atol=1e-15)


def test_last_step_keeps_the_last_step_and_sends_its_gradient_there():
    rng = np.random.default_rng(1)
    net = bp.Network([bp.LastStep()], dtype="float64", input_shape=(4, 3))
    x = rng.normal(size=(5, 4, 3))
    np.testing.assert_array_equal(net.forward(x), x[:, -1])
    g = rng.normal(size=(5, 3))
    net.backward(grad_output=g)
    expected = np.zeros_like(x)
    expected[:, -1] = g
    np.testing.assert_array_equal(net.input_grad, expected)


# ---- finite differences

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("time", [1, 5])
def test_finite_differences_through_a_classifier(kind, time):
    net = classifier(kind, time=time)
    result = bp.gradcheck(net, *sequences(np.random.default_rng(2), 4, time, 3))
    assert result["max_error"] < 1e-6, result
    assert result["checked"] == net.params.size + 4 * time * 3


@pytest.mark.parametrize("kind", KINDS)
def test_finite_differences_as_the_output_layer_without_bias(kind):
    net = bp.Network([KINDS[kind](4, 3, num_layers=3, bias=False, bidirectional=True)],
                     loss="mse", dtype="float64", seed=1, input_shape=(4, 4))
    rng = np.random.default_rng(3)
    result = bp.gradcheck(net, rng.normal(size=(3, 4, 4)), rng.normal(size=(3, 4, 6)))
    assert result["max_error"] < 1e-6, result


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "gelu"])
def test_an_activation_after_the_layer_keeps_its_states(kind, activation):
    """The Activation joins the recurrent record (one pass less) but is applied into a slot
    of its own: the backward reads the states it would otherwise overwrite."""
    net = bp.Network([KINDS[kind](2, 3, num_layers=2), bp.Activation(activation)],
                     loss="mse", dtype="float64", seed=0, input_shape=(4, 2))
    assert len(net._plan.records) == 1 and net._plan.records[0]["op"]["z"] >= 0
    rng = np.random.default_rng(5)
    result = bp.gradcheck(net, rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 3)))
    assert result["max_error"] < 1e-6, result


# ---- threads

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bit_identical_for_any_thread_count(kind, dtype, rng):
    """Large enough that every product (the RNN's recurrent one included: 192 x 128 x 128,
    over the 2M multiply-adds that take a team) and the LSTM's and GRU's per-step passes
    (192 rows of 4 or 3 x 128 gates, over the 64K values that take a team) split between
    threads."""
    x, y = sequences(rng, 192, 6, 16)

    def run(n_threads):
        with threads(n_threads):
            net = bp.Network([KINDS[kind](16, 128, num_layers=2, bidirectional=True),
                              bp.LastStep(), bp.Dense(256, 3, activation="softmax")],
                             loss="cross_entropy", optimizer=bp.Adam(lr=1e-2), dtype=dtype,
                             seed=3, input_shape=(6, 16))
            net.train_step(x, y)
            out = net.forward(x)
            net.backward(y)
            return net.params.copy(), net.grads.copy(), out, net.input_grad

    reference = run(1)
    for n in (2, 7):
        for name, a, b in zip(("params", "grads", "output", "input_grad"), reference, run(n)):
            np.testing.assert_array_equal(b, a, err_msg=f"{name}, {n} threads")


# ---- dtypes, saving, copying

@pytest.mark.parametrize("kind", KINDS)
def test_float32_agrees_with_float64(kind, rng):
    x, y = sequences(rng, 6, 5, 3)
    wide = classifier(kind, dtype="float64")
    narrow = classifier(kind, dtype="float32")
    narrow.params[...] = wide.params
    np.testing.assert_allclose(narrow.forward(x.astype(np.float32)), wide.forward(x),
                               rtol=1e-5, atol=1e-6)
    narrow.backward(y)
    wide.backward(y)
    np.testing.assert_allclose(narrow.grads, wide.grads, rtol=1e-3, atol=1e-5)


def test_a_checkpoint_resumes_bit_for_bit(tmp_path, rng):
    x, y = sequences(rng, 40, 5, 3)
    straight = classifier("lstm", dtype="float32")
    straight.fit(x, y, epochs=4, batch_size=8, progress=False)
    first = classifier("lstm", dtype="float32")
    first.fit(x, y, epochs=2, batch_size=8, progress=False)
    first.save(tmp_path / "lstm.npz")
    resumed = bp.Network.load(tmp_path / "lstm.npz")
    assert resumed.config() == first.config()
    resumed.fit(x, y, epochs=2, batch_size=8, progress=False)
    np.testing.assert_array_equal(resumed.params, straight.params)
    np.testing.assert_array_equal(resumed.predict_proba(x), straight.predict_proba(x))


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_copied_network_trains_on_bit_identically(copier, kind, rng):
    x, y = sequences(rng, 24, 5, 3)
    net = classifier(kind, dtype="float32")
    net.fit(x, y, epochs=1, batch_size=8, progress=False)
    twin = copier(net)
    assert twin.config() == net.config()
    for n in (net, twin):
        n.fit(x, y, epochs=1, batch_size=8, progress=False)
    np.testing.assert_array_equal(twin.params, net.params)
    layer = copier(net.layers[0])
    assert layer.config() == net.layers[0].config() and layer.weight_ih_l0 is None
    again = bp.Network([layer], dtype="float32", input_shape=(5, 3))     # brings its weights
    np.testing.assert_array_equal(layer.weight_hh_l1_reverse, net.layers[0].weight_hh_l1_reverse)
    assert again.layers[0] is layer


# ---- what the layers declare

@pytest.mark.parametrize("kind, gates", [("rnn-tanh", 1), ("lstm", 4), ("gru", 3)])
def test_parameters_are_named_and_shaped_as_pytorchs(kind, gates):
    layer = KINDS[kind](3, 5, num_layers=2, bidirectional=True)
    shapes = {p.name: (p.shape, p.weight) for p in layer.parameters()}
    g = gates * 5
    expected = {}
    for k, width in ((0, 3), (1, 10)):
        for suffix in ("", "_reverse"):
            expected.update({f"weight_ih_l{k}{suffix}": ((g, width), True),
                             f"weight_hh_l{k}{suffix}": ((g, 5), True),
                             f"bias_ih_l{k}{suffix}": ((g,), False),
                             f"bias_hh_l{k}{suffix}": ((g,), False)})
    assert list(shapes) == list(expected) and shapes == expected
    assert [p.name for p in KINDS[kind](3, 5, bias=False).parameters()] == ["weight_ih_l0",
                                                                            "weight_hh_l0"]


def test_weights_start_uniform_in_the_inverse_square_root_of_the_hidden_size():
    net = bp.Network([bp.LSTM(20, 64, num_layers=2)], dtype="float64", seed=4,
                     input_shape=(3, 20))
    limit = 1 / np.sqrt(64)
    assert np.abs(net.params).max() <= limit
    # 55,296 draws: the sample std is within 2% of limit / sqrt(3) (its relative standard
    # error is about 0.2%), and the extremes come close to the limit.
    assert net.params.std() == pytest.approx(limit / np.sqrt(3), rel=0.02)
    assert np.abs(net.params).max() > 0.99 * limit
    same = bp.Network([bp.LSTM(20, 64, num_layers=2)], dtype="float64", seed=4,
                      input_shape=(3, 20))
    np.testing.assert_array_equal(same.params, net.params)


def test_only_the_weight_matrices_are_weights(rng):
    """The L2 penalty and the gradient norms take weight_ih and weight_hh, never a bias."""
    net = classifier("gru")
    assert net.weight_names()[:5] == [
        "layers[0].weight_ih_l0", "layers[0].weight_hh_l0", "layers[0].weight_ih_l0_reverse",
        "layers[0].weight_hh_l0_reverse", "layers[0].weight_ih_l1"]
    assert len(net.weight_names()) == 8 + 1          # and the Dense layer's weight
    x, y = sequences(rng, 4, 5, 3)
    net.compute_gradients(x, y)
    expected = net.grads.copy()
    for offset, size in net._plan.weights:
        expected[offset:offset + size] += 0.1 * net.params[offset:offset + size]
    net.zero_grad()
    net.compute_gradients(x, y, l2=0.1)
    np.testing.assert_allclose(net.grads, expected, rtol=1e-12, atol=1e-15)
    biases = [p.name for p in net.layers[0].parameters() if not p.weight]
    assert len(biases) == 8 and all(name.startswith("bias") for name in biases)


def test_a_sequence_of_ids_through_embedding_and_lstm_learns(rng):
    """Embedding, LSTM, LastStep, Dense: the class is the first id of six, which only the
    recurrence carries to the last step."""
    x = rng.integers(0, 4, (256, 6))
    y = x[:, 0]
    net = bp.Network([bp.Embedding(4, 8), bp.LSTM(8, 16), bp.LastStep(),
                      bp.Dense(16, 4, activation="softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(lr=1e-2), seed=0, input_shape=(6,))
    net.fit(x, y, epochs=30, batch_size=32, progress=False)
    assert net.evaluate(x, y)["accuracy"] > 0.95


# ---- bad arguments and inputs

@pytest.mark.parametrize("make, message", [
    (lambda: bp.LSTM(3, 0), r"LSTM: hidden_size must be a positive integer, got 0"),
    (lambda: bp.GRU(0, 4), r"GRU: input_size must be a positive integer, got 0"),
    (lambda: bp.RNN(3, 4, num_layers=0), r"RNN: num_layers must be a positive integer, got 0"),
    (lambda: bp.LSTM(3, 4, num_layers=2.0), r"LSTM: num_layers must be a positive integer"),
    (lambda: bp.GRU(3, 4, num_layers=5000), r"GRU: num_layers must be at most 1024, got 5000"),
    (lambda: bp.RNN(3, 4, nonlinearity="sigmoid"),
     r"RNN: nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"),
    (lambda: bp.RNN(3, 4, nonlinearity=["tanh"]), r"RNN: nonlinearity must be 'tanh' or 'relu'"),
    (lambda: bp.LSTM(3, 4, bidirectional=1), r"LSTM: bidirectional must be True or False"),
    (lambda: bp.GRU(3, 4, bias="yes"), r"GRU: bias must be True or False"),
    (lambda: bp.LSTM(3, 2 ** 40), r"LSTM: input_size=3, hidden_size=1099511627776 and "
                                  r"num_layers=1 make .* parameters, more than"),
])
def test_bad_arguments_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_arguments_after_hidden_size_are_keywords():
    # torch.nn.RNN's third positional argument is num_layers: refused rather than misread.
    with pytest.raises(TypeError):
        bp.RNN(3, 4, 2)
    with pytest.raises(TypeError):
        bp.LSTM(3, 4, nonlinearity="tanh")          # LSTM and GRU fix their own


@pytest.mark.parametrize("layers, shape, message", [
    (lambda: [bp.LSTM(3, 4)], (3,), r"layers\[0\] \(LSTM\(3, 4, .*\)\) takes sequences of shape "
                                    r"\(time, 3\) .* but its input is \(3,\)"),
    (lambda: [bp.GRU(3, 4)], (5, 2), r"takes sequences of shape \(time, 3\) .* but its input "
                                     r"is \(5, 2\)"),
    (lambda: [bp.RNN(3, 4)], (2, 5, 3), r"takes sequences of shape \(time, 3\)"),
    (lambda: [bp.Dense(3, 3), bp.LastStep()], (3,), r"layers\[1\] \(LastStep\(\)\) takes "
                                                    r"sequences of shape \(time, features\)"),
    (lambda: [bp.LSTM(3, 4)], None, r"input shape is not fixed by its first layer .* "
                                    r"\(time, features\) for sequences"),
])
def test_shapes_that_do_not_fit_are_refused_naming_the_layer(layers, shape, message):
    made = layers()
    with pytest.raises(ValueError, match=message):
        bp.Network(made, input_shape=shape)
    assert all(getattr(made[0], p.name) is None for p in made[0].parameters())


@pytest.mark.parametrize("x, message", [
    (np.zeros((4, 5, 2)), r"x must have shape \(batch, 5, 3\) for this network, got"),
    (np.zeros((4, 3)), r"x must be 3-dimensional, got array of shape \(4, 3\)"),
    (np.zeros((4, 6, 3)), r"x must have shape \(batch, 5, 3\)"),
    (np.full((4, 5, 3), np.nan), r"x contains NaN or Inf"),
])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_changes_nothing(kind, x, message, rng):
    net = classifier(kind)
    good, y = sequences(rng, 4, 5, 3)
    net.train_step(good, y)
    before = snapshot(net)
    with pytest.raises(ValueError, match=message):
        net.train_step(x, y)
    assert_unchanged(net, before)
    with pytest.raises(ValueError, match=message):
        net.forward(x)
    assert_unchanged(net, before)


def test_inside_a_residual_block_and_between_other_layers(rng):
    net = bp.Network([bp.Dense(3, 4, activation="tanh"),
                      bp.Residual(bp.LSTM(4, 4), bp.LayerNorm(4)), bp.Dropout(0.3),
                      bp.GRU(4, 3, bidirectional=True), bp.LastStep(),
                      bp.Dense(6, 2, activation="softmax")],
                     loss="cross_entropy", dtype="float64", seed=0, input_shape=(5, 3))
    result = bp.gradcheck(net, *sequences(rng, 3, 5, 3, classes=2))
    assert result["max_error"] < 1e-6, result


def test_a_smaller_batch_after_a_larger_one_gives_a_fresh_networks_results(rng):
    """The saved states sit in arrays of the workspace's capacity (the largest batch so
    far); a smaller batch uses their first rows."""
    x, y = sequences(rng, 3, 5, 3)
    used, fresh = classifier("lstm"), classifier("lstm")
    used.forward(rng.normal(size=(11, 5, 3)))
    for net in (used, fresh):
        net.zero_grad()
        net.forward(x)
        net.backward(y)
    np.testing.assert_array_equal(used.grads, fresh.grads)
    np.testing.assert_array_equal(used.input_grad, fresh.input_grad)


def test_float32_gate_functions_are_within_three_ulp():
    """The float32 cells' sigmoid and tanh (vectorised polynomials, _gates.h) against the
    float64 functions: at most 3 units in the last place of the true value over 200,000
    points spread from 1e-8 to 200 in magnitude, both signs (where the true value is a
    subnormal float, sigmoid far below -87, it may be off by the smallest normal float);
    exact at 0, the infinities and saturation; NaN stays NaN."""
    rng = np.random.default_rng(0)
    x = (np.exp(rng.uniform(np.log(1e-8), np.log(200.0), 200_000))
         * rng.choice([-1.0, 1.0], 200_000)).astype(np.float32)
    sigmoid, tanh = bp._core._float32_gates(x)
    exact = x.astype(np.float64)
    tiny = np.finfo(np.float32).tiny
    for got, want in ((sigmoid, 1.0 / (1.0 + np.exp(-exact))), (tanh, np.tanh(exact))):
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        error = np.abs(got - want)
        normal = np.abs(want) >= tiny
        assert np.max(error[normal] / ulp[normal]) <= 3.0
        assert np.max(error[~normal], initial=0.0) <= tiny
    ends = np.array([0.0, -0.0, np.inf, -np.inf, 50.0, -50.0], np.float32)
    sigmoid, tanh = bp._core._float32_gates(ends)
    np.testing.assert_array_equal(tanh, [0.0, -0.0, 1.0, -1.0, 1.0, -1.0])
    np.testing.assert_array_equal(sigmoid[:4], [0.5, 0.5, 1.0, 0.0])
    assert sigmoid[4] == 1.0 and 0 < sigmoid[5] < 2e-22
    assert all(np.isnan(v) for v in bp._core._float32_gates(np.float32(np.nan)))
