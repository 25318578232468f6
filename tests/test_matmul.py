"""bp.ops.matmul against exact products over shapes that reach every edge of the GEMM's
blocking, at every SIMD level this CPU runs.

The GEMM computes MR x NR tiles, k in blocks of at most KC (split evenly), rows in blocks
of MC and columns in blocks of NC; threads split C into strips of whole tiles.  All five
differ per SIMD level and dtype, and KC, MC, NC per machine (they come from its cache
sizes), so the edge sizes are derived from the configuration the module reports
(`bp._core._gemm_config()`), not written down: each sits on, just under and just over a
boundary, so a wrong edge tile or block boundary shows.

The level is chosen once, at import.  The `check_*` functions are therefore plain
functions: the tests run them in this process (the best level the CPU has) and, for every
other level it has, in a subprocess started with BACKPROP_SIMD set to that level.

Integer-valued operands make the products exact: entries in [-3, 3] and k <= 4100 give
partial sums of at most 9 * 4100 = 36900 < 2^24, exact in float32 and float64 in any
summation order, so those results must EQUAL the exact product.
"""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import backprop as bp
from conftest import threads

DTYPES = [np.float32, np.float64]
TRANS = [(False, False), (False, True), (True, False), (True, True)]
# Teams of 1..256 threads, forced through threadpoolctl on this 2-core machine: every
# split of C into strips, including more threads than strips.
TEAMS = range(1, 257)
# The other levels' builds split C by the same code (_gemm.pxd) as this one: their runs
# check every small team, teams around the strip counts, and the largest.
SOME_TEAMS = [*range(1, 9), 13, 31, 64, 127, 200, 255, 256]
# The fewest multiply-adds a product splits between threads.
PARALLEL_MIN_WORK = bp._core._gemm_config()["parallel_min_work"]
# BACKPROP_SIMD values and the name bp.simd_kernel() gives each level.
KERNEL_NAMES = {"avx512": "avx512", "avx2": "avx2+fma", "generic": "generic"}
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def cpu_levels():
    """The SIMD levels this CPU runs, best first: what bp.simd_kernel() must report."""
    flags = set()
    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    levels = ["generic"]
    if {"avx2", "fma"} <= flags:
        levels.insert(0, "avx2")
        if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            levels.insert(0, "avx512")
    return levels


def blocking(dtype):
    """The micro-tile (mr, nr) and blocking (kc, mc, nc) of `dtype` at the level in use."""
    return bp._core._gemm_config()[np.dtype(dtype).name]


def integer_operands(m, n, k, trans_a, trans_b, dtype, rng):
    """op(a) of shape (m, k) and op(b) of shape (k, n), stored transposed when asked,
    with integer values; and their exact product."""
    a = rng.integers(-3, 4, size=(m, k)).astype(np.float64)
    b = rng.integers(-3, 4, size=(k, n)).astype(np.float64)
    exact = a @ b                  # exact in float64 too, and BLAS-fast
    a = (a.T.copy() if trans_a else a).astype(dtype)
    b = (b.T.copy() if trans_b else b).astype(dtype)
    return a, b, exact


def op(x, trans):
    return x.T if trans else x


def edge_shapes(dtype):
    """Every (m, n) edge with one k block and with two; every k edge with edge tiles;
    C wider than NC, on one thread and across a share."""
    b = blocking(dtype)
    mr, nr, kc, mc, nc = b["mr"], b["nr"], b["kc"], b["mc"], b["nc"]
    ms = [1, mr - 1, mr, mr + 1, 2 * mr + 1, mc - 1, mc, mc + 1]
    # nr // 2 and nr // 2 + 1: on both sides of where a kernel skips an empty right half
    ns = [1, nr // 2, nr // 2 + 1, nr - 1, nr, nr + 1, 2 * nr + 1]
    ks = [1, 2, kc - 1, kc, kc + 1, 2 * kc + 1]
    yield from ((m, n, k) for m in ms for n in ns for k in (1, kc + 1))
    yield from ((m, n, k) for m, n in [(mr + 1, nr + 1), (mc + 1, nr - 1), (mr, nr)] for k in ks)
    yield from [(mr + 1, nc - 1, 3), (mr + 1, nc, 3), (mr - 1, nc + 1, 2),
                (mr + 1, 2 * nc + 4, 40)]        # > 2^20 multiply-adds: threads split it


# ---- the checks, run at every level

def check_exact_at_every_edge(dtype, trans_a, trans_b, seed=0):
    rng = np.random.default_rng(seed)
    for m, n, k in edge_shapes(dtype):
        a, b, exact = integer_operands(m, n, k, trans_a, trans_b, dtype, rng)
        got = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
        assert got.dtype == dtype and got.shape == (m, n) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, exact, err_msg=f"m={m} n={n} k={k}")


def check_out_and_accumulate(dtype, trans_a, trans_b, seed=0):
    rng = np.random.default_rng(seed)
    b = blocking(dtype)
    mr, nr, kc, mc = b["mr"], b["nr"], b["kc"], b["mc"]
    for m, n, k in [(mr + 1, nr + 1, kc + 1), (mc + 1, nr - 1, 5), (mr, nr, 2 * kc + 1),
                    (1, 2 * nr + 1, 1)]:
        a, b_, exact = integer_operands(m, n, k, trans_a, trans_b, dtype, rng)
        start = rng.integers(-5, 6, size=(m, n))
        out = start.astype(dtype)
        got = bp.ops.matmul(a, b_, out=out, trans_a=trans_a, trans_b=trans_b, accumulate=True)
        assert got is out
        np.testing.assert_array_equal(out, start + exact, err_msg=f"m={m} n={n} k={k}")
        # without accumulate, whatever out held (even NaN) is overwritten, never read
        out[...] = np.nan
        bp.ops.matmul(a, b_, out=out, trans_a=trans_a, trans_b=trans_b)
        np.testing.assert_array_equal(out, exact, err_msg=f"m={m} n={n} k={k}")


def layouts(x):
    """x as the layouts a caller may pass: each must read as the same matrix."""
    rows, cols = x.shape
    wide = np.zeros((rows * 2, cols + 5), dtype=x.dtype)
    wide[::2, 2:cols + 2] = x
    frozen = x.copy()
    frozen.flags.writeable = False
    flipped = x[::-1].copy()[::-1]                       # negative row stride
    return {
        "c": x,
        "fortran": np.asfortranarray(x),
        "padded rows": wide[::2, 2:cols + 2],            # unit inner stride, lda > cols
        "strided": np.repeat(np.repeat(x, 2, 0), 3, 1)[::2, ::3],
        "transposed view": x.T.copy().T,
        "read-only": frozen,
        "negative stride": flipped,
        "broadcast": np.broadcast_to(x[:1], x.shape) if rows else x,
    }


def check_every_operand_layout(dtype, trans_a, trans_b, seed=0):
    b = blocking(dtype)
    a, b_, _ = integer_operands(b["mr"] + 5, b["nr"] + 1, 19, trans_a, trans_b, dtype,
                                np.random.default_rng(seed))
    for name_a, la in layouts(a).items():
        for name_b, lb in layouts(b_).items():
            expected = op(la, trans_a).astype(np.float64) @ op(lb, trans_b).astype(np.float64)
            got = bp.ops.matmul(la, lb, trans_a=trans_a, trans_b=trans_b)
            np.testing.assert_array_equal(got, expected, err_msg=f"a {name_a}, b {name_b}")


def team_shapes(dtype):
    """Products above the 2^20 multiply-adds below which one thread is used: C split by
    columns into 256+ strips, by rows into 256+ strips, one with three k blocks, and two
    too thin for the tiles."""
    b = blocking(dtype)
    mr, nr, kc = b["mr"], b["nr"], b["kc"]

    def deep_enough(m, n):         # the smallest k that makes m x n x k parallel
        return -(-PARALLEL_MIN_WORK // (m * n))

    return [(mr + 1, 256 * nr + 3, deep_enough(mr + 1, 256 * nr + 3), False, True),  # X.W^T
            (256 * mr + 5, 3, deep_enough(256 * mr + 5, 3), True, False),           # dZ^T X
            (2 * mr + 1, 3 * nr + 1, max(2 * kc + 1, deep_enough(2 * mr + 1, 3 * nr + 1)),
             False, False),
            # the unpacked loops of _gemm_skinny.h, split by rows: a 3-output layer's
            # forward (dot products) and a 1-output layer's input gradient (k = 1)
            (4099, 3, deep_enough(4099, 3), False, True),
            (PARALLEL_MIN_WORK // 37 + 1, 37, 1, False, False)]


def check_any_team_is_bit_identical(dtype, teams=TEAMS, seed=0):
    """Threads split C, never a k sum, and shares are clamped to C: every team size gives
    the one-thread result bit for bit, written or accumulated."""
    rng = np.random.default_rng(seed)
    for m, n, k, trans_a, trans_b in team_shapes(dtype):
        assert m * n * k >= PARALLEL_MIN_WORK
        a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
        start = rng.normal(size=(m, n)).astype(dtype)
        with threads(1):
            plain = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
            # C += one k block at a time: not start + plain in rounding, but the same
            # sequence of additions for every team
            added_alone = bp.ops.matmul(a, b, out=start.copy(), trans_a=trans_a,
                                        trans_b=trans_b, accumulate=True)
        expected = op(a, trans_a).astype(np.float64) @ op(b, trans_b).astype(np.float64)
        np.testing.assert_allclose(plain, expected, rtol=0,
                                   atol=2 * k * np.finfo(dtype).eps * np.abs(expected).max())
        for team in teams:
            with threads(team):
                got = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
                added = start.copy()
                bp.ops.matmul(a, b, out=added, trans_a=trans_a, trans_b=trans_b,
                              accumulate=True)
            np.testing.assert_array_equal(got, plain, err_msg=f"{team} threads, {m}x{n}x{k}")
            np.testing.assert_array_equal(added, added_alone,
                                          err_msg=f"{team} threads, {m}x{n}x{k}, accumulate")


def check_fused_bias_and_activation(dtype, seed=0):
    """A network's hidden layers add the bias and apply relu/tanh/sigmoid to each tile as
    the GEMM finishes it (after the last k block only).  Layer sizes put edge tiles in
    every layer and more than one k block in the first; the batch sizes run on one
    thread and split across several."""
    b = blocking(dtype)
    mr, nr, kc, mc = b["mr"], b["nr"], b["kc"], b["mc"]
    sizes = [kc + 1, nr + 1, 2 * nr + 1, 3]
    acts = ["relu", "tanh", "sigmoid"]
    layers = [bp.Dense(i, o, activation=f) for i, o, f in zip(sizes, sizes[1:], acts)]
    net = bp.Network(layers, dtype=np.dtype(dtype).name, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in net.layers:                 # biases large enough to matter
        layer.bias[...] = rng.normal(size=layer.bias.shape)
    functions = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh,
                 "sigmoid": lambda z: 1 / (1 + np.exp(-z))}
    tolerance = 1e-12 if dtype == np.float64 else 1e-4
    for batch in (mr + 1, mc + 1):
        x = rng.normal(size=(batch, sizes[0])).astype(dtype)
        expected = x.astype(np.float64)
        for layer, act in zip(net.layers, acts):
            expected = functions[act](expected @ layer.weight.T.astype(np.float64)
                                      + layer.bias.astype(np.float64))
        for team in (1, 3):
            with threads(team):
                got = net.forward(x)
            np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance,
                                       err_msg=f"batch {batch}, {team} threads")


def check_gradients():
    """A network's gradients through every GEMM layout, by finite differences."""
    rng = np.random.default_rng(0)
    net = bp.Network([bp.Dense(5, 8, "tanh"), bp.Dense(8, 3, "softmax")],
                     loss="cross_entropy", dtype="float64", seed=0)
    x, y = rng.normal(size=(9, 5)), rng.integers(0, 3, 9)
    assert bp.gradcheck(net, x, y)["max_error"] < 1e-6


def check_all():
    """Every check, as the per-level subprocesses run them (SOME_TEAMS of the thread
    counts: the whole sweep runs at this process's level)."""
    for dtype in DTYPES:
        for trans_a, trans_b in TRANS:
            check_exact_at_every_edge(dtype, trans_a, trans_b)
            check_out_and_accumulate(dtype, trans_a, trans_b)
            check_every_operand_layout(dtype, trans_a, trans_b)
        check_any_team_is_bit_identical(dtype, teams=SOME_TEAMS)
        check_fused_bias_and_activation(dtype)
    check_gradients()


def run_python(code, timeout=600, **env):
    """Run `code` in a fresh interpreter that can import this module, with the variables
    `env` set (None: removed); return its stdout, failing the test (with its stderr) on an
    error."""
    environment = {**os.environ, **env}
    environment = {name: value for name, value in environment.items() if value is not None}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=TESTS_DIR, env=environment, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result.stdout


# ---- the checks at the level chosen here, test by test

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_integer_products_are_exact_at_every_edge(dtype, trans_a, trans_b):
    check_exact_at_every_edge(dtype, trans_a, trans_b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_out_and_accumulate(dtype, trans_a, trans_b):
    check_out_and_accumulate(dtype, trans_a, trans_b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_every_operand_layout(dtype, trans_a, trans_b):
    check_every_operand_layout(dtype, trans_a, trans_b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_team_of_1_to_256_threads_is_bit_identical(dtype):
    check_any_team_is_bit_identical(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_bias_and_activation_epilogue(dtype):
    check_fused_bias_and_activation(dtype)


# ---- every other level the CPU has, in a subprocess each

@pytest.mark.parametrize("level", cpu_levels()[1:])
def test_every_check_at_every_other_level(level):
    out = run_python("import backprop as bp, test_matmul as t\n"
                     "print(bp.simd_kernel())\n"
                     "t.check_all()\n", BACKPROP_SIMD=level)
    assert out.split() == [KERNEL_NAMES[level]]


@pytest.mark.parametrize("requested", ["avx512", "avx2", "generic", "AVX2", "sse9", ""])
def test_backprop_simd_only_lowers_the_level(requested):
    """A level the CPU has is used as asked; one above the CPU's best gives the best (no
    crash); an unknown value is ignored.  The kernel then multiplies correctly."""
    levels = cpu_levels()
    expected = requested if requested in levels else levels[0]
    out = run_python("import numpy as np, backprop as bp\n"
                     "a = np.arange(12.0).reshape(3, 4)\n"
                     "assert (bp.ops.matmul(a, a, trans_b=True) == a @ a.T).all()\n"
                     "print(bp.simd_kernel())\n", BACKPROP_SIMD=requested)
    assert out.split() == [KERNEL_NAMES[expected]]


def test_the_best_level_is_chosen_without_the_variable():
    out = run_python("import backprop as bp; print(bp.simd_kernel())", BACKPROP_SIMD=None)
    assert out.split() == [KERNEL_NAMES[cpu_levels()[0]]]


# ---- the blocking and the scratch

def test_blocking_is_consistent():
    config = bp._core._gemm_config()
    assert config["kernel"] == bp.simd_kernel()
    assert 0 < config["caches"]["L1"] <= config["caches"]["L2"] <= config["caches"]["L3"]
    for dtype in DTYPES:
        b = blocking(dtype)
        assert b["mr"] >= 1 and b["nr"] >= 1 and b["kc"] >= 64
        assert b["mc"] % b["mr"] == 0 and b["nc"] % b["nr"] == 0
        # the packed A block is sized to stay in L2
        assert b["mc"] * b["kc"] * np.dtype(dtype).itemsize <= config["caches"]["L2"]


def scratch(m, n, k, team, dtype=np.float32):
    return bp._core._gemm_scratch_bytes(m, n, k, team, dtype)


def test_scratch_is_none_for_empty_products():
    assert scratch(0, 5, 5, 4) == scratch(5, 0, 5, 4) == scratch(5, 5, 0, 4) == 0


def test_scratch_of_one_thread_covers_both_packed_blocks():
    b = blocking(np.float32)
    m, n, k = 100, 300, 50              # one k block; A and B smaller than MC and NC
    rows, cols = -(-m // b["mr"]) * b["mr"], -(-n // b["nr"]) * b["nr"]
    assert rows <= b["mc"] and cols <= b["nc"] and k <= b["kc"]
    # A packed as rows x k, B as k x cols, each start on a 64-byte line
    assert scratch(m, n, k, 1) == -(-rows * k * 4 // 64) * 64 + -(-k * cols * 4 // 64) * 64


def test_scratch_per_thread_shrinks_and_stops_at_the_strip_count():
    """Each share packs its own strip: the bytes per thread never grow with the team, and
    a team larger than C has strips needs exactly what one thread per strip needs."""
    b = blocking(np.float32)
    for m, n, k in [(1024, 1024, 1024), (64, 128, 784), (4000, 50, 300), (9, 9000, 200)]:
        strips = -(-m // b["mr"]) if m > n else -(-n // b["nr"])

        def shares(team):          # shares of ceil(strips / team) strips (part_start's split)
            per_share = -(-strips // min(team, strips))
            return -(-strips // per_share)

        per_thread = [scratch(m, n, k, t) / shares(t) for t in range(1, 300)]
        assert all(x >= y for x, y in zip(per_thread, per_thread[1:])), (m, n, k)
        assert scratch(m, n, k, 100000) == scratch(m, n, k, strips) == scratch(m, n, k, 10**9)
    # below PARALLEL_MIN_WORK multiply-adds one thread runs it, whatever the team
    assert 32 * 32 * 64 < PARALLEL_MIN_WORK
    assert scratch(32, 32, 64, 256) == scratch(32, 32, 64, 1)


def test_the_largest_team_allocates_little_and_changes_nothing(rng):
    """set_num_threads(n) used to size 4 MB of scratch per thread, whatever the product
    (gigabytes for a large n); now a product needs at most one share per strip of C."""
    team = bp.MAX_THREADS
    strips = -(-128 // blocking(np.float32)["nr"])     # C's 128 columns in NR-wide strips
    assert scratch(64, 128, 784, team) == scratch(64, 128, 784, strips) < 4 << 20
    x = rng.normal(size=(64, 784)).astype(np.float32)
    w = rng.normal(size=(128, 784)).astype(np.float32)
    wide = rng.normal(size=(300 * blocking(np.float32)["nr"], 784)).astype(np.float32)
    with threads(1):
        expected = bp.ops.matmul(x, w, trans_b=True)
        expected_wide = bp.ops.matmul(x[:8], wide, trans_b=True)     # 300 strips
    with threads(team):
        np.testing.assert_array_equal(bp.ops.matmul(x, w, trans_b=True), expected)
        np.testing.assert_array_equal(bp.ops.matmul(x[:8], wide, trans_b=True), expected_wide)
    # a network sizes its one scratch for every product of its passes with that team
    y = rng.integers(0, 10, 64)
    results = []
    for count in (1, team):
        net = bp.Network([bp.Dense(784, 128, "relu"), bp.Dense(128, 10, "softmax")],
                         loss="cross_entropy", seed=0)
        with threads(count):
            out = net.forward(x)
            net.backward(y)
            net.step()
            out_after_step = net.forward(x)
        results.append((out, net.grads.copy(), out_after_step))
    for got, expected in zip(results[1], results[0]):
        np.testing.assert_array_equal(got, expected)


def test_a_smaller_team_than_asked_runs_every_share():
    """OpenMP may grant fewer threads than asked (OMP_THREAD_LIMIT): each thread then runs
    several shares in turn, in its own slot, and the result is unchanged."""
    out = run_python(
        "import numpy as np, backprop as bp, test_matmul as t\n"
        "from conftest import threads\n"
        "rng = np.random.default_rng(0)\n"
        "for m, n, k, ta, tb in t.team_shapes(np.float32):\n"
        "    a = rng.normal(size=(k, m) if ta else (m, k)).astype(np.float32)\n"
        "    b = rng.normal(size=(n, k) if tb else (k, n)).astype(np.float32)\n"
        "    with threads(1):\n"
        "        one = bp.ops.matmul(a, b, trans_a=ta, trans_b=tb)\n"
        "    with threads(8):\n"
        "        assert (bp.ops.matmul(a, b, trans_a=ta, trans_b=tb) == one).all()\n"
        "print('ok')\n", OMP_THREAD_LIMIT="3")
    assert out.split() == ["ok"]


# ---- accuracy, empty products and bad arguments (any level: checked here)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_real_products_within_the_rounding_bound(dtype, trans_a, trans_b, rng):
    """A sum of k products in precision u is off by at most about k u sum|a||b|
    (Higham, Accuracy and Stability, 3.5); the float64 NumPy product of the same
    operands is the reference, and twice the bound covers its own rounding."""
    u = np.finfo(dtype).eps / 2
    kc = blocking(dtype)["kc"]
    for m, n, k in [(1, 1, 1), (7, 17, 257), (97, 33, 2 * kc + 1), (13, 100, 64), (200, 9, 3)]:
        a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
        a64, b64 = op(a, trans_a).astype(np.float64), op(b, trans_b).astype(np.float64)
        got = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
        error = np.abs(got - a64 @ b64)
        assert (error <= 2 * k * u * (np.abs(a64) @ np.abs(b64))).all(), (m, n, k)


@pytest.mark.parametrize("m,n,k", [(0, 4, 3), (3, 0, 4), (0, 0, 0), (3, 4, 0), (0, 5, 0)])
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_empty_dimensions(m, n, k, trans_a, trans_b):
    """An empty sum (k = 0) is 0; empty m or n give an empty result."""
    a = np.empty((k, m) if trans_a else (m, k))
    b = np.empty((n, k) if trans_b else (k, n))
    got = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_array_equal(got, np.zeros((m, n)))
    out = np.full((m, n), np.nan)
    bp.ops.matmul(a, b, out=out, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_array_equal(out, np.zeros((m, n)))
    out = np.full((m, n), 2.0)
    bp.ops.matmul(a, b, out=out, trans_a=trans_a, trans_b=trans_b, accumulate=True)
    np.testing.assert_array_equal(out, np.full((m, n), 2.0))


def test_lists_are_read_as_float64():
    # [1 2] @ [3 4]^T = 1*3 + 2*4 = 11
    got = bp.ops.matmul([[1, 2]], [[3], [4]])
    assert got.dtype == np.float64 and got.tolist() == [[11.0]]


def bad_outs():
    wrong_dtype = np.zeros((3, 4), dtype=np.float32)
    frozen = np.zeros((3, 4))
    frozen.flags.writeable = False
    return [
        (np.zeros((3, 5)), ValueError, r"out must be an array of shape \(3, 4\) and dtype "
                                       r"float64, got array of shape \(3, 5\)"),
        (np.zeros((4, 3)), ValueError, r"shape \(3, 4\).*got array of shape \(4, 3\)"),
        (np.zeros(12), ValueError, r"shape \(3, 4\).*got array of shape \(12,\)"),
        (wrong_dtype, ValueError, "dtype float64, got array of shape .* and dtype float32"),
        (np.zeros((4, 3)).T, ValueError, "C-contiguous"),
        (np.zeros((3, 8))[:, ::2], ValueError, "C-contiguous"),
        (frozen, ValueError, "writeable"),
        ([[0.0] * 4] * 3, TypeError, "out must be an ndarray, got list"),
    ]


@pytest.mark.parametrize("out,error,match", bad_outs())
def test_bad_out_is_refused(out, error, match):
    before = np.array(out, copy=True)
    with pytest.raises(error, match=match):
        bp.ops.matmul(np.ones((3, 2)), np.ones((2, 4)), out=out)
    np.testing.assert_array_equal(np.asarray(out), before)


def test_out_overlapping_an_operand_is_refused():
    buffer = np.ones((6, 4))
    a, b = buffer[:, :3], np.ones((3, 4))
    with pytest.raises(ValueError, match="out must not overlap a or b"):
        bp.ops.matmul(a, b, out=buffer)                    # out is a's own memory
    square = np.ones((4, 4))
    with pytest.raises(ValueError, match="overlap"):
        bp.ops.matmul(np.ones((4, 4)), square, out=square)
    with pytest.raises(ValueError, match="overlap"):        # partial overlap
        bp.ops.matmul(buffer[:2, :3], np.ones((3, 4)), out=buffer[1:3])
    # Disjoint parts of one buffer are fine: rows 0-2 times ones, into rows 3-5.
    bp.ops.matmul(buffer[:3, :3], np.ones((3, 4)), out=buffer[3:])
    np.testing.assert_array_equal(buffer[3:], np.full((3, 4), 3.0))


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match=r"inner dimensions differ: op\(a\) is \(3, 2\), "
                                         r"op\(b\) is \(3, 4\)"):
        bp.ops.matmul(np.ones((3, 2)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="inner dimensions"):
        bp.ops.matmul(np.ones((3, 2)), np.ones((3, 4)), trans_a=True, trans_b=True)
    with pytest.raises(TypeError, match="same dtype, got float64 and float32"):
        bp.ops.matmul(np.ones((3, 2)), np.ones((2, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="a must have dtype float32 or float64, got int64"):
        bp.ops.matmul(np.ones((3, 2), dtype=np.int64), np.ones((2, 4)))
    with pytest.raises(TypeError, match="b must have dtype float32 or float64, got complex128"):
        bp.ops.matmul(np.ones((3, 2)), np.ones((2, 4), dtype=complex))
    with pytest.raises(ValueError, match="a must be 2-dimensional, got array of shape \\(3,\\)"):
        bp.ops.matmul(np.ones(3), np.ones((3, 4)))
    with pytest.raises(ValueError, match="b must be 2-dimensional"):
        bp.ops.matmul(np.ones((2, 3)), np.ones((3, 4, 1)))
    with pytest.raises(ValueError, match="accumulate=True needs an out array"):
        bp.ops.matmul(np.ones((3, 2)), np.ones((2, 4)), accumulate=True)
    with pytest.raises(TypeError, match="a must be a float array, got str"):
        bp.ops.matmul("ab", np.ones((2, 4)))
