"""Products in bfloat16 (mixed precision): float32 operands rounded to bfloat16, products
summed in float32.

What is checked, and against what:

* The rounding (`_bfloat16_rounded`, the packs' rounding) against an independent
  reference: of the two bfloat16 values around x (x's upper 16 bits, and one unit above),
  the nearer in float64, ties to the even one.
* Every product (matmul, and a layer's forward, dW and dX) against float64 products of the
  rounded operands.  Those are what the kernels compute up to float32 summation, so the
  difference is bounded by the classic bound for a sum of k products, k * 2^-24 * sum|a||b|
  (each pair of VDPBF16PS adds two roundings, one per product: still at most k in all).
  Integer operands small enough to be bfloat16 values and sums below 2^24 make the product
  exact in any order: those results must EQUAL the exact product.
* Whole networks (dense, convolutional, recurrent) against float64 gradients of the same
  weights, within the tolerance the README documents (15% of each gradient's norm).  Each
  operand carries a relative rounding error of at most 2^-9 = 0.2%, but a gradient is a
  sum of terms that mostly cancel (random labels, a small batch), so its relative error
  is far larger: 0.3-0.5% in the recurrent networks, up to 7% in the dense one and 11% in
  the first convolution's weight here, as under PyTorch's autocast (checked: no more than
  1.25 times its distance, plus 0.005).
* Training on real data (the embedded digits) next to float32, same recipe.
* Bit-identical results for any thread count, as float32's.

The checks run at this process's SIMD level (native VDPBF16PS where the CPU has
AVX512_BF16) and again, in subprocesses, emulated (BACKPROP_BF16=emulated) and at every
other level this CPU runs.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import backprop as bp
from backprop import _core
from conftest import threads

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
U32 = 2.0 ** -24                 # float32's unit roundoff
TRANS = [(False, False), (False, True), (True, False), (True, True)]
# Each gradient's distance from float64's, relative to its norm (README, "Mixed precision"):
# PyTorch's autocast is as far (tested below when it is installed).
GRADIENT_TOLERANCE = 0.15


def rounded(x):
    return _core._bfloat16_rounded(np.asarray(x, dtype=np.float32))


def reference_rounding(x):
    """bfloat16 rounding of float32 x, derived independently of the library's bit trick:
    the two bfloat16 neighbours of a normal x (x cut to 8 mantissa bits, and one unit of
    that precision, 2^(exponent - 7), further from zero) and the nearer in float64, ties to
    the one whose last kept bit is 0; past the largest bfloat16, infinity."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    exact = x.astype(np.float64)
    low = (bits & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    exponent = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int64)
    high = low + np.sign(exact) * np.ldexp(1.0, exponent - 127 - 7)
    low_even = ((bits >> np.uint32(16)) & np.uint32(1)) == 0
    below, above = np.abs(exact - low), np.abs(high - exact)
    out = np.where((above < below) | ((above == below) & ~low_even), high, low)
    out = np.where(np.abs(out) >= 2.0 ** 128, np.copysign(np.inf, exact), out)
    out = np.where(exponent == 0, np.copysign(0.0, exact), out)        # subnormals: +-0
    return out.astype(np.float32)


def bound(a, b, k):
    """k * 2^-24 * |a||b|: the float32 summation bound of each entry of a @ b."""
    return (k + 2) * U32 * (np.abs(a) @ np.abs(b)) + 1e-30


# ---- checks (plain functions: the subprocesses run them too)

def check_rounding():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 20000),
        # exact ties between two bfloat16 values: both parities of the kept bit
        (np.arange(1, 2000, dtype=np.uint32) << np.uint32(16) | np.uint32(0x8000)).view(np.float32),
        np.array([0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 3.4028235e38, 1e-40, -1e-40,
                  np.finfo(np.float32).tiny], dtype=np.float32)])
    got, want = rounded(x), reference_rounding(x)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # the largest floats round past bfloat16's largest value: infinity, as the hardware
    assert np.isinf(rounded(np.float32(3.4028235e38)))
    special = rounded(np.array([np.inf, -np.inf, np.nan], dtype=np.float32))
    assert special[0] == np.inf and special[1] == -np.inf and np.isnan(special[2])


def matmul_cases():
    """(m, n, k): single entries, edges of the 8 x 32 tile, odd and even k, k past the
    k block (2048 on AVX-512 in bfloat16), and shapes with one side of 1 to 4 (which the
    float32 products compute unpacked)."""
    return [(1, 1, 1), (7, 5, 3), (8, 32, 2), (9, 33, 5), (17, 65, 64), (64, 300, 129),
            (40, 3, 700), (3, 40, 2), (33, 17, 4097), (130, 10, 784)]


def operands(rng, m, n, k, trans_a, trans_b, integers=False):
    shape_a = (k, m) if trans_a else (m, k)
    shape_b = (n, k) if trans_b else (k, n)
    if integers:        # bfloat16 values (8-bit mantissas); 4097 * 8 * 8 < 2^24: exact sums
        return (rng.integers(-8, 9, shape_a).astype(np.float32),
                rng.integers(-8, 9, shape_b).astype(np.float32))
    return (rng.standard_normal(shape_a).astype(np.float32),
            rng.standard_normal(shape_b).astype(np.float32))


def check_products():
    rng = np.random.default_rng(1)
    for m, n, k in matmul_cases():
        for trans_a, trans_b in TRANS:
            a, b = operands(rng, m, n, k, trans_a, trans_b)
            got = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b, precision="bfloat16")
            ra = rounded(a).astype(np.float64)
            rb = rounded(b).astype(np.float64)
            ra, rb = (ra.T if trans_a else ra), (rb.T if trans_b else rb)
            err = np.abs(got - ra @ rb)
            assert (err <= bound(ra, rb, k)).all(), (m, n, k, trans_a, trans_b, err.max())
            # and it is not a float32 product: from the unrounded operands' exact product
            # it lies far further than the float32 product does
            exact = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
            full = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
            if k >= 64:
                assert np.abs(got - exact).max() > 20 * np.abs(full - exact).max()
            # integers: exact in any summation order, accumulate adds to out
            ia, ib = operands(rng, m, n, k, trans_a, trans_b, integers=True)
            want = (ia.T if trans_a else ia).astype(np.float64) @ (ib.T if trans_b else ib)
            got = bp.ops.matmul(ia, ib, trans_a=trans_a, trans_b=trans_b, precision="bfloat16")
            np.testing.assert_array_equal(got, want)
            out = np.ones((m, n), np.float32)
            bp.ops.matmul(ia, ib, out, trans_a=trans_a, trans_b=trans_b, accumulate=True,
                          precision="bfloat16")
            np.testing.assert_array_equal(out, want + 1)


def check_teams():
    """Bit-identical for any team, products and a training step alike."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 333)).astype(np.float32)
    b = rng.standard_normal((257, 333)).astype(np.float32)
    X = rng.standard_normal((96, 60)).astype(np.float32)
    y = rng.integers(0, 5, 96)
    results = []
    for team in (1, 2, 3, 7, 16, 64):
        with threads(team):
            product = bp.ops.matmul(a, b, trans_b=True, precision="bfloat16")
            net = bp.Network([bp.Dense(60, 128, "relu"), bp.Dense(128, 5, "softmax")],
                             loss="cross_entropy", seed=3, precision="bfloat16")
            for _ in range(3):
                net.train_step(X, y)
            results.append((product, net.params.copy()))
    for product, params in results[1:]:
        np.testing.assert_array_equal(product, results[0][0])
        np.testing.assert_array_equal(params, results[0][1])


def check_all():
    check_rounding()
    check_products()
    check_teams()


# ---- here (this CPU's best: native where it has AVX512_BF16)

def test_rounding_is_to_nearest_even_as_the_hardware():
    check_rounding()


def test_products_are_float64_products_of_the_rounded_operands():
    check_products()


def test_any_team_is_bit_identical():
    check_teams()


def test_the_kernel_is_named():
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    native = bp.simd_kernel() == "avx512" and "avx512_bf16" in flags \
        and os.environ.get("BACKPROP_BF16") != "emulated"
    assert bp.bfloat16_kernel() == ("avx512_bf16" if native else "emulated")


def run_python(code, **env):
    environment = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=TESTS_DIR, env=environment, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result.stdout


def other_ways():
    """(BACKPROP_SIMD, BACKPROP_BF16) of every other way this CPU runs bfloat16 products."""
    from test_matmul import cpu_levels
    levels = cpu_levels()
    ways = [(level, "") for level in levels[1:]]
    if bp.bfloat16_kernel() == "avx512_bf16":
        ways.insert(0, (levels[0], "emulated"))
    return ways


@pytest.mark.parametrize("level,bf16", other_ways())
def test_every_check_in_every_other_way(level, bf16):
    out = run_python("import backprop as bp, test_bfloat16 as t\n"
                     "print(bp.bfloat16_kernel())\n"
                     "t.check_all()\n", BACKPROP_SIMD=level, BACKPROP_BF16=bf16)
    assert out.split() == ["emulated"]


# ---- layers: each product takes rounded operands

def twin(layers32, layers64, input_shape, x, *, rounded_weights):
    """A bfloat16 network and a float64 one with the same weights (rounded to bfloat16 in
    the float64 one when `rounded_weights`)."""
    net = bp.Network(layers32, seed=0, input_shape=input_shape, precision="bfloat16")
    ref = bp.Network(layers64, seed=0, input_shape=input_shape, dtype="float64")
    ref.params[...] = rounded(net.params) if rounded_weights else net.params
    return net, ref


LAYERS = {
    "dense": (lambda dt: [bp.Dense(70, 45, bias=True)], (70,)),
    "conv2d": (lambda dt: [bp.Conv2d(3, 8, 3, padding=1)], (3, 9, 9)),
    "conv1d-one-channel": (lambda dt: [bp.Conv1d(1, 6, 5)], (1, 40)),
    "conv2d-groups": (lambda dt: [bp.Conv2d(4, 6, 3, groups=2, stride=2)], (4, 10, 10)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_layers_three_products_take_bfloat16_operands(kind):
    """forward: round(x) round(W)^T + b; dW: round(dy)^T round(x); dX: round(dy) round(W),
    each summed in float32: against the float64 layer given the rounded values."""
    make, shape = LAYERS[kind]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((12,) + shape).astype(np.float32)
    net, ref = twin(make(None), make(None), shape, x, rounded_weights=True)
    k = int(np.prod(shape))
    scale = (k + 2) * U32 * np.abs(ref.forward(np.abs(rounded(x)).astype(np.float64))).max()
    out = net.forward(x)
    want = ref.forward(rounded(x).astype(np.float64))
    assert np.abs(out - want).max() <= 4 * scale + 1e-6
    g = rng.standard_normal(out.shape).astype(np.float32)
    net.zero_grad()
    net.backward(grad_output=g)
    ref.zero_grad()
    ref.backward(grad_output=rounded(g).astype(np.float64))
    for got, expected in ((net.grads, ref.grads), (net.input_grad, ref.input_grad)):
        tol = 64 * x.shape[0] * k * U32 * np.abs(expected).max() + 1e-6
        assert np.abs(got - expected).max() <= tol
    # the bias gradient is a float32 sum of dy itself, not of its rounding
    net64 = bp.Network(make(None), seed=0, input_shape=shape, dtype="float64")
    net64.params[...] = net.params
    net64.zero_grad()
    net64.forward(x.astype(np.float64))
    net64.backward(grad_output=g.astype(np.float64))
    bias = net.layers[0].bias_grad if hasattr(net.layers[0], "bias_grad") else None
    if bias is not None:
        np.testing.assert_allclose(bias, net64.layers[0].bias_grad, rtol=1e-5, atol=1e-5)


# ---- whole networks against float64

def networks():
    return {
        "mlp": (lambda: [bp.Dense(30, 64, "tanh"), bp.LayerNorm(64), bp.Dense(64, 64, "relu"),
                         bp.Dense(64, 5, "softmax")], (30,), "cross_entropy", 5),
        "cnn": (lambda: [bp.Conv2d(2, 8, 3, padding=1, activation="relu"), bp.MaxPool2d(2),
                         bp.Conv2d(8, 8, 3, activation="relu"), bp.Flatten(),
                         bp.Dense(8 * 2 * 2, 4, "softmax")], (2, 8, 8), "cross_entropy", 4),
        "lstm": (lambda: [bp.LSTM(6, 24), bp.LastStep(),
                          bp.Dense(24, 3, "softmax")], (7, 6), "cross_entropy", 3),
        "gru": (lambda: [bp.GRU(6, 16, num_layers=2), bp.LastStep(),
                         bp.Dense(16, 3, "softmax")], (7, 6), "cross_entropy", 3),
    }


def autocast_errors(ref, x, y):
    """Each parameter's gradient under torch.autocast("cpu", dtype=torch.bfloat16), its
    distance from float64's relative to its norm, in the order of ref's parameters; None
    without PyTorch.  (The networks end in a softmax: the loss is the NLL of its log.)"""
    try:
        import torch
    except ImportError:
        return None
    from backprop.interop.pytorch import to_torch

    def gradients(module, dtype, autocast):
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(torch.tensor(x, dtype=dtype))
        loss = torch.nn.functional.nll_loss(torch.log(out.to(dtype)), torch.tensor(y))
        loss.backward()
        return [p.grad.double().numpy() for p in module.parameters()]

    exact = gradients(to_torch(ref), torch.float64, False)
    mixed = gradients(to_torch(ref).float(), torch.float32, True)
    return [np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(exact, mixed)]


@pytest.mark.parametrize("name", sorted(networks()))
def test_whole_network_gradients_are_within_the_documented_tolerance(name):
    make, shape, loss, classes = networks()[name]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32,) + shape).astype(np.float32)
    y = rng.integers(0, classes, 32)
    net = bp.Network(make(), loss=loss, seed=0, input_shape=shape, precision="bfloat16")
    ref = bp.Network(make(), loss=loss, seed=0, input_shape=shape, dtype="float64")
    ref.params[...] = net.params
    net.compute_gradients(x, y)
    ref.compute_gradients(x.astype(np.float64), y)
    errors = []
    for layer, twin_layer in zip(net.layers, ref.layers):
        for param in layer.parameters():
            got = getattr(layer, param.name + "_grad")
            want = getattr(twin_layer, param.name + "_grad")
            errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
            assert errors[-1] <= GRADIENT_TOLERANCE, (layer, param.name, errors[-1])
    # as close as PyTorch's autocast gets to float64 (it also rounds each product's output)
    theirs = autocast_errors(ref, x, y)
    if theirs is not None:
        for mine, autocast in zip(errors, theirs):
            assert mine <= 1.25 * autocast + 0.005, (errors, theirs)
    # and the rounding is really there: float32 products are far closer
    net.precision = "float32"
    net.zero_grad()
    net.compute_gradients(x, y)
    f32 = np.linalg.norm(net.grads - ref.grads)
    net.precision = "bfloat16"
    net.zero_grad()
    net.compute_gradients(x, y)
    assert np.linalg.norm(net.grads - ref.grads) > 10 * f32


def test_training_on_real_data_matches_float32():
    """The embedded digits, the same recipe in both precisions (784 would be slower to
    test; the README's Fashion-MNIST and MNIST numbers come from the benchmark)."""
    X, y = bp.datasets.load_digits()
    X = X.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:1400], order[1400:]
    accuracy = {}
    for precision in ("float32", "bfloat16"):
        net = bp.Network([bp.Dense(64, 128, "relu"), bp.Dense(128, 10, "softmax")],
                         loss="cross_entropy", seed=0, precision=precision)
        net.fit(X[train], y[train], epochs=15, batch_size=32)
        accuracy[precision] = net.evaluate(X[test], y[test])["accuracy"]
    assert accuracy["float32"] > 0.95
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 0.02, accuracy


# ---- the API

def test_precision_is_validated_and_float32_only():
    layers = [bp.Dense(3, 2)]
    for bad in ("bf16", "float16", None, 16):
        with pytest.raises(ValueError, match="precision"):
            bp.Network(layers, precision=bad)
    with pytest.raises(ValueError, match="float32 networks"):
        bp.Network([bp.Dense(3, 2)], dtype="float64", precision="bfloat16")
    net64 = bp.Network([bp.Dense(3, 2)], dtype="float64")
    with pytest.raises(ValueError, match="float32 networks"):
        net64.precision = "bfloat16"
    assert net64.precision == "float32"
    with pytest.raises(ValueError, match="precision"):
        bp.ops.matmul(np.ones((2, 2)), np.ones((2, 2)), precision="bfloat16")
    with pytest.raises(ValueError, match="precision"):
        bp.ops.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32),
                      precision="half")


def test_precision_switches_and_autocast_restores_it():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 40)).astype(np.float32)
    net = bp.Network([bp.Dense(40, 30, "relu"), bp.Dense(30, 4)], seed=0)
    full = net.forward(x)
    with net.autocast() as same:
        assert same is net and net.precision == "bfloat16"
        half = net.forward(x)
    assert net.precision == "float32"
    np.testing.assert_array_equal(net.forward(x), full)
    assert not np.array_equal(half, full)
    net.precision = "bfloat16"
    np.testing.assert_array_equal(net.forward(x), half)
    assert "precision='bfloat16'" in repr(net)
    with pytest.raises(RuntimeError):
        with net.autocast("float32"):
            assert net.precision == "float32"
            raise RuntimeError
    assert net.precision == "bfloat16"


def test_checkpoints_pickles_and_copies_keep_the_precision(tmp_path):
    import copy
    rng = np.random.default_rng(7)
    X = rng.standard_normal((64, 12)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    net = bp.Network([bp.Dense(12, 16, "relu"), bp.Dense(16, 3, "softmax")],
                     loss="cross_entropy", seed=1, precision="bfloat16")
    net.fit(X, y, epochs=2, batch_size=16)
    path = tmp_path / "net.npz"
    net.save(path)
    for other in (bp.Network.load(path), pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert other.precision == "bfloat16" and other.dtype == np.float32
        np.testing.assert_array_equal(other.params, net.params)
        np.testing.assert_array_equal(other.predict_proba(X), net.predict_proba(X))
        # and they go on training identically (the weights are float32: nothing lost)
        a, b = copy.deepcopy(net), other
        a.train_step(X, y)
        b.train_step(X, y)
        np.testing.assert_array_equal(a.params, b.params)


def test_headers_without_precision_load_as_float32_and_bad_ones_are_refused():
    from backprop import record
    net = bp.Network([bp.Dense(4, 2)], seed=0)
    header, arrays = record.to_record(net)
    del header["network"]["precision"]
    assert record.rebuild(bp.Network, header, arrays).precision == "float32"
    for bad in ("bfloat8", 1, None):
        header["network"]["precision"] = bad
        with pytest.raises(ValueError, match="precision"):
            record.rebuild(bp.Network, header, arrays)
    net64 = bp.Network([bp.Dense(4, 2)], seed=0, dtype="float64")
    header, arrays = record.to_record(net64)
    header["network"]["precision"] = "bfloat16"
    with pytest.raises(ValueError, match="precision"):
        record.rebuild(bp.Network, header, arrays)


def test_cli_trains_in_bfloat16(capsys):
    from backprop import cli
    cli.main(["train", "--dataset", "digits", "--epochs", "3", "--no-progress",
              "--precision", "bfloat16"])
    err = capsys.readouterr().err
    assert f"products in bfloat16 ({bp.bfloat16_kernel()})" in err


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")
def test_estimators_take_precision():
    pytest.importorskip("sklearn")
    from backprop.estimators import MLPClassifier, MLPRegressor
    X, y = bp.datasets.load_digits()
    scores = {}
    for precision in ("float32", "bfloat16"):
        clf = MLPClassifier((32,), max_iter=30, learning_rate_init=0.01, random_state=0,
                            precision=precision).fit(X / 16, y)
        scores[precision] = clf.score(X / 16, y)
    assert clf.network_.precision == "bfloat16" and clf.network_.dtype == np.float32
    assert clf.get_params()["precision"] == "bfloat16"
    assert scores["float32"] > 0.9 and abs(scores["bfloat16"] - scores["float32"]) <= 0.02
    # a partial_fit after set_params goes on in the new precision
    clf.set_params(precision="float32").partial_fit(X / 16, y)
    assert clf.network_.precision == "float32"
    with pytest.raises(ValueError, match="precision"):
        MLPRegressor(precision="bfloat16", dtype="float64").fit(X[:20], y[:20].astype(float))
    with pytest.raises(ValueError, match="precision"):
        MLPRegressor(precision="fp8").fit(X[:20], y[:20].astype(float))
