"""Checks of the benchmark code itself (not timings): the peers build the same network,
the NumPy reference's gradients are right, the flop count and the environment handling.

    python -m pytest benchmarks/test_peers.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import CONFIGS, LSTM, Config, Conv2d, Dense, Flatten, LastStep, MaxPool2d, mlp
from networks import STEPS, Unsupported, batch_for, initial_weights, torch_model, torch_loss
from numpy_reference import NumpyNetwork

# Every config but the 4096-wide one, which is slow and has nothing the others lack.
NAMES = [n for n in CONFIGS if n != "huge"]
HERE = os.path.dirname(os.path.abspath(__file__))
# What the benchmark configs' convolutions and poolings do not: a stride of 2, a kernel
# that does not tile its input, overlapping pooling windows (3, stride 2), input rows no
# window reaches, a convolution with no activation.
ODD_CNN = Config("odd-cnn", (Conv2d(2, 4, 3, stride=2, padding=1, activation="relu"),
                             MaxPool2d(3, stride=2), Conv2d(4, 5, 2), Flatten(),
                             Dense(5, 3, "softmax")), 6, input_shape=(2, 11, 10))
# What the benchmark LSTMs do not: a stack of two, so the second one's input gradient (and
# the first one's gradient through it) is computed; sizes no kernel rounds to.
ODD_LSTM = Config("odd-lstm", (LSTM(5, 7), LSTM(7, 6), LastStep(), Dense(6, 3, "softmax")),
                  4, input_shape=(9, 5))
CHECKED = {**{n: CONFIGS[n] for n in NAMES}, ODD_CNN.name: ODD_CNN, ODD_LSTM.name: ODD_LSTM}


@pytest.mark.parametrize("name", CHECKED)
def test_numpy_reference_gradients_match_torch_autograd(name):
    """In float64: in float32 a pre-activation within rounding of 0 (or two values of a
    pooling window that nearly tie) can go either way in each, moving a whole gradient
    entry, as happens in cnn-wide's last convolution."""
    torch = pytest.importorskip("torch")
    config = CHECKED[name]
    weights = initial_weights(config)
    x, y = batch_for(config)
    net = NumpyNetwork(config, weights, dtype=np.float64)
    loss = net.compute_gradients(x.astype(np.float64), y)

    model = torch_model(config, weights).double()
    expected = torch_loss(config)(model(torch.from_numpy(x).double()), torch.from_numpy(y))
    expected.backward()
    # Both list parameters in forward order: (W, b) per Dense and Conv2d, (W_ih, W_hh, b_ih,
    # b_hh) per LSTM, (gamma, beta) per BatchNorm.
    params = list(model.parameters())
    assert len(params) == len(net.pairs)
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    for (param, grad), theirs in zip(net.pairs, params):
        assert param.shape == tuple(theirs.shape)
        # float64 sums of up to 65536 terms: 1e-10 of the largest entry is ample.  The
        # floor is for a Dense bias just before a BatchNorm: its gradient is 0 in exact
        # arithmetic (the normalisation subtracts the mean), so both hold rounding noise.
        scale = np.abs(theirs.grad.numpy()).max()
        np.testing.assert_allclose(grad, theirs.grad.numpy(), rtol=1e-8,
                                   atol=max(1e-10 * scale, 1e-14))


def test_batchnorm_running_statistics_match_torch():
    torch = pytest.importorskip("torch")
    config = CONFIGS["mnist-bn"]
    weights = initial_weights(config)
    x, y = batch_for(config)
    net = NumpyNetwork(config, weights)
    model = torch_model(config, weights)
    for _ in range(3):
        net.compute_gradients(x, y)
        model(torch.from_numpy(x))
    ours = [layer for layer in net.layers if hasattr(layer, "running_var")]
    theirs = [m for m in model if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.running_mean, b.running_mean.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.running_var, b.running_var.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", CHECKED)
def test_every_installed_framework_takes_the_same_steps(name):
    """Same weights, same batch, plain SGD: the losses of three steps agree."""
    config = CHECKED[name]
    weights = initial_weights(config)
    losses = {}
    for framework in ("numpy", "backprop", "torch", "jax"):
        if framework != "numpy" and framework != "backprop":
            pytest.importorskip(framework)
        try:
            step = STEPS[framework](config, weights)
        except Unsupported:
            continue
        losses[framework] = [step() for _ in range(3)]
    for framework, got in losses.items():
        np.testing.assert_allclose(got, losses["numpy"], rtol=1e-4, err_msg=framework)
    assert losses["numpy"][2] < losses["numpy"][0]


def test_gemm_flops_by_hand():
    # 64-32-10, batch 32.  Forward: 2*32*64*32 = 131072 and 2*32*32*10 = 20480.
    # Backward: dW of both (131072 + 20480) and dX of the second only (20480).
    config = mlp("t", (64, 32, 10), 32)
    assert config.gemm_flops() == 2 * (131072 + 20480) + 20480


def test_lenet_flops_by_hand():
    # Products per sample: conv1 28*28 outputs * 6 channels * 1*5*5 = 117600; conv2 10*10 *
    # 16 * 6*5*5 = 240000; Dense 400*120 = 48000, 120*84 = 10080, 84*10 = 840.  Forward
    # 2*128 of each; backward twice that, but no dX for conv1.
    per_sample = 117600 + 240000 + 48000 + 10080 + 840
    assert CONFIGS["lenet"].gemm_flops() == 2 * 128 * (3 * per_sample - 117600)


def test_lstm_flops_by_hand():
    # lstm-mnist, batch 64: per sample, 28 steps of 4*128 gate values, each a dot product
    # of 28 inputs and 128 states: 28*512*156 = 2236416; Dense 128*10 = 1280.  Forward 2*64
    # of each; backward twice that, but no dX (dZ.W_ih: 28*512*28 = 401408) for the input.
    per_sample = 28 * 512 * (28 + 128) + 1280
    assert CONFIGS["lstm-mnist"].gemm_flops() == 2 * 64 * (3 * per_sample - 28 * 512 * 28)


def test_lstm_output_sizes_follow_torch():
    torch = pytest.importorskip("torch")
    x = torch.zeros(1, *ODD_LSTM.input_shape)
    shapes = [tuple(x.shape[1:])]
    for module in torch_model(ODD_LSTM):
        x = module(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [shape for _, shape in ODD_LSTM.traced()] + [(3,)]


def test_conv_output_sizes_follow_torch():
    torch = pytest.importorskip("torch")
    x = torch.zeros(1, *ODD_CNN.input_shape)
    model = torch_model(ODD_CNN)
    shapes = [tuple(x.shape[1:])]
    for module in model:
        x = module(x)
        if not isinstance(module, torch.nn.ReLU):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [shape for _, shape in ODD_CNN.traced()] + [(3,)]


def test_a_spec_that_does_not_fit_its_input_is_refused():
    with pytest.raises(ValueError, match="takes samples of shape"):
        Config("bad", (Conv2d(1, 6, 5), MaxPool2d(2), Flatten(), Dense(400, 10, "softmax")),
                16, input_shape=(1, 28, 28))       # 6x12x12 = 864 features, not 400


@pytest.mark.parametrize("name", ["lenet", "cnn-wide", "odd-cnn", "lstm-mnist", "odd-lstm"])
def test_backprop_builds_the_declared_network(name):
    """Its layers' parameters have the declared names and shapes and hold the initial
    weights, and a batch gives one row of class probabilities per sample."""
    from networks import backprop_network
    config = CHECKED[name]
    weights = initial_weights(config)
    net = backprop_network(config, weights)
    assert net.input_shape == config.input_shape
    ours = [layer for layer in net.layers if layer.parameters()]
    specs = config.weighted_layers()
    assert len(ours) == len(specs) == len(weights)
    for layer, spec, arrays in zip(ours, specs, weights):
        assert [p.name for p in layer.parameters()] == list(spec.parameter_names)
        for name, value in zip(spec.parameter_names, arrays, strict=True):
            np.testing.assert_array_equal(getattr(layer, name), value)
    x, _ = batch_for(config)
    out = net.forward(x)
    assert out.shape == (config.batch, config.n_outputs)
    np.testing.assert_allclose(out.sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("name", ["digits", "mnist-sample", "mnist-sample-cnn",
                                  "mnist-sample-lstm"])
def test_time_to_accuracy_feeds_each_recipe_its_shape(name):
    """The shipped data sets, shaped for the recipe, go through its network (the
    Fashion-MNIST recipes differ only in their data, which may not be installed)."""
    from configs import RECIPES
    from networks import backprop_network
    from time_to_accuracy import load, shaped
    recipe = RECIPES[name]
    (X_train, y_train), (X_test, _) = shaped(load(recipe.dataset), recipe.config)
    assert X_train.shape[1:] == X_test.shape[1:] == recipe.config.input_shape
    net = backprop_network(recipe.config)
    assert net.forward(X_test[:3]).shape == (3, 10)
    assert set(np.unique(y_train)) == set(range(10))


def test_residual_blocks_count_their_dense_layers():
    # resnet: 784-256, two blocks of two 256-256, 256-10, batch 128.
    first, square, last = 2 * 128 * 784 * 256, 2 * 128 * 256 * 256, 2 * 128 * 256 * 10
    assert CONFIGS["resnet"].gemm_flops() == 2 * first + 3 * (4 * square + last)


def run_script(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True,
                          text=True, check=True, env={**os.environ, **env}).stdout


def test_openblas_overrides_are_dropped_before_numpy_loads():
    out = run_script("import benchenv, os, sys\n"
                     "benchenv.drop_openblas_overrides()\n"
                     "import numpy\n"
                     "print(*(os.environ.get(k) for k in benchenv.OPENBLAS_OVERRIDES))\n"
                     "print(benchenv.environment_note())",
                     OPENBLAS_CORETYPE="Haswell", OPENBLAS_L2_SIZE="1048576")
    first, note = out.splitlines()
    assert first == "None None"
    assert "removed OPENBLAS_CORETYPE=Haswell OPENBLAS_L2_SIZE=1048576" in note


def test_dropping_openblas_overrides_after_numpy_is_refused():
    code = ("import numpy, benchenv\n"
            "try:\n    benchenv.drop_openblas_overrides()\n"
            "except RuntimeError as e:\n    print('refused', e)\n")
    assert run_script(code, OPENBLAS_CORETYPE="Haswell").startswith("refused")


def test_start_jax_gives_the_cpus_back():
    pytest.importorskip("jax")
    code = ("import os, benchenv\n"
            "before = os.sched_getaffinity(0)\n"
            "jax, how = benchenv.start_jax(1)\n"
            "print(os.sched_getaffinity(0) == before, how)")
    assert run_script(code).startswith("True")
