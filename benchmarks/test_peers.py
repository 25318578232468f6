"""Checks of the benchmark code itself (not timings): the peers build the same network,
the NumPy reference's gradients are right, the flop count and the environment handling.

    python -m pytest benchmarks/test_peers.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import CONFIGS, mlp
from networks import STEPS, Unsupported, batch_for, initial_weights, torch_model, torch_loss
from numpy_reference import NumpyNetwork

# Every config but the 4096-wide one, which is slow and has nothing the others lack.
NAMES = [n for n in CONFIGS if n != "huge"]
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("name", NAMES)
def test_numpy_reference_gradients_match_torch_autograd(name):
    torch = pytest.importorskip("torch")
    config = CONFIGS[name]
    weights = initial_weights(config)
    x, y = batch_for(config)
    net = NumpyNetwork(config, weights)
    loss = net.compute_gradients(x, y)

    model = torch_model(config, weights)
    expected = torch_loss(config)(model(torch.from_numpy(x)), torch.from_numpy(y))
    expected.backward()
    # Both list parameters in forward order: (W, b) per Dense, (gamma, beta) per BatchNorm.
    params = list(model.parameters())
    assert len(params) == len(net.pairs)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for (param, grad), theirs in zip(net.pairs, params):
        assert param.shape == tuple(theirs.shape)
        # float32 sums of up to 784 terms: 1e-4 of the largest entry is ample.  The floor
        # of 1e-6 is for a Dense bias just before a BatchNorm: its gradient is 0 in exact
        # arithmetic (the normalisation subtracts the mean), so both hold rounding noise.
        scale = np.abs(theirs.grad.numpy()).max()
        np.testing.assert_allclose(grad, theirs.grad.numpy(), rtol=1e-3,
                                   atol=max(1e-4 * scale, 1e-6))


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


@pytest.mark.parametrize("name", NAMES)
def test_every_installed_framework_takes_the_same_steps(name):
    """Same weights, same batch, plain SGD: the losses of three steps agree."""
    config = CONFIGS[name]
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
