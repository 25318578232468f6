"""bp.ops.matmul against NumPy over shapes that exercise every edge tile."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import backprop as bp

SIZES = [1, 2, 5, 7, 13, 17, 64, 100, 257]


def operands(m, n, k, trans_a, trans_b, dtype, rng):
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    expected = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    return a, b, expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_against_numpy(dtype, trans_a, trans_b, rng):
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for m, n, k in [(s1, s2, s3) for s1 in SIZES[::2] for s2 in SIZES[1::2] for s3 in (1, 13, 300)]:
        a, b, expected = operands(m, n, k, trans_a, trans_b, dtype, rng)
        got = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
        assert got.dtype == dtype and got.shape == (m, n)
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * np.sqrt(k))


def test_accumulate_and_out(rng):
    a, b, expected = operands(33, 47, 29, False, True, np.float64, rng)
    out = np.ones((33, 47))
    assert bp.ops.matmul(a, b, out=out, trans_b=True, accumulate=True) is out
    np.testing.assert_allclose(out, expected + 1, rtol=1e-12)
    bp.ops.matmul(a, b, out=out, trans_b=True)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_zero_sized_reduction_gives_zeros(rng):
    out = bp.ops.matmul(np.empty((3, 0)), np.empty((0, 4)))
    np.testing.assert_array_equal(out, np.zeros((3, 4)))


def test_strided_and_read_only_operands(rng):
    big = rng.normal(size=(40, 60))
    a = big[::2, 1::3]                                  # (20, 20), strided both ways
    b = np.asfortranarray(rng.normal(size=(20, 14)))    # column-major
    frozen = np.array(a)
    frozen.flags.writeable = False
    np.testing.assert_allclose(bp.ops.matmul(a, b), a @ b, rtol=1e-12)
    np.testing.assert_allclose(bp.ops.matmul(frozen, b), a @ b, rtol=1e-12)
    w = rng.normal(size=(14, 20))
    np.testing.assert_allclose(bp.ops.matmul(a, w.T), a @ w.T, rtol=1e-12)   # a transposed view


def test_threads_give_identical_results(rng):
    a, b = rng.normal(size=(300, 500)).astype(np.float32), rng.normal(size=(500, 200)).astype(np.float32)
    bp.set_num_threads(1)
    one = bp.ops.matmul(a, b)
    bp.set_num_threads(2)
    two = bp.ops.matmul(a, b)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("out,match", [
    (np.empty((3, 5)), "shape"),
    (np.empty((3, 4), dtype=np.float32), "dtype"),
    (np.empty((4, 3)).T, "C-contiguous"),
    ("frozen", "writeable"),
])
def test_bad_out_is_refused(out, match):
    if isinstance(out, str):
        out = np.empty((3, 4))
        out.flags.writeable = False
    with pytest.raises(ValueError, match=match):
        bp.ops.matmul(np.ones((3, 2)), np.ones((2, 4)), out=out)


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match="inner dimensions"):
        bp.ops.matmul(np.ones((3, 2)), np.ones((3, 4)))
    with pytest.raises(TypeError, match="same dtype"):
        bp.ops.matmul(np.ones((3, 2)), np.ones((2, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        bp.ops.matmul(np.ones((3, 2), dtype=int), np.ones((2, 4), dtype=int))
    with pytest.raises(ValueError, match="2-dimensional"):
        bp.ops.matmul(np.ones(3), np.ones((3, 4)))
    a = np.ones((3, 3))
    with pytest.raises(ValueError, match="overlap"):
        bp.ops.matmul(a, np.ones((3, 3)), out=a)


def test_portable_kernel_is_correct_when_forced():
    """BACKPROP_SIMD=generic selects the kernels an x86-64 without AVX2 would run."""
    code = (
        "import numpy as np, backprop as bp\n"
        "assert bp.simd_kernel() == 'generic', bp.simd_kernel()\n"
        "rng = np.random.default_rng(0)\n"
        "for dt in (np.float32, np.float64):\n"
        "    for m, n, k in [(7, 13, 5), (64, 100, 300), (1, 1, 1), (130, 70, 257)]:\n"
        "        a, b = rng.normal(size=(m, k)).astype(dt), rng.normal(size=(n, k)).astype(dt)\n"
        "        tol = 1e-4 if dt == np.float32 else 1e-12\n"
        "        np.testing.assert_allclose(bp.ops.matmul(a, b, trans_b=True), a @ b.T,\n"
        "                                   rtol=tol, atol=tol * k)\n"
        "net = bp.Network([bp.Dense(5, 8, 'relu'), bp.Dense(8, 3, 'softmax')],\n"
        "                 loss='cross_entropy', dtype='float64', seed=0)\n"
        "x, y = rng.normal(size=(9, 5)), rng.integers(0, 3, 9)\n"
        "assert bp.gradcheck(net, x, y)['max_error'] < 1e-6\n"
        "print('ok')\n")
    env = dict(os.environ, BACKPROP_SIMD="generic")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_the_fast_kernel_is_chosen_when_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    expected = "avx2+fma" if {"avx2", "fma"} <= flags and platform.machine() == "x86_64" else "generic"
    assert bp.simd_kernel() == expected
