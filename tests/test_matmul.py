"""bp.ops.matmul against NumPy over shapes that reach every edge of the GEMM's blocking.

The GEMM computes MR x NR = 6 x 16 (float32) or 6 x 8 (float64) tiles, k in blocks of
at most KC = 256 (split evenly), rows in blocks of MC = 96 and columns in blocks of
NC = 2048; threads split C into whole tiles.  The sizes below sit on, just under and
just over each of these, so a wrong edge tile or block boundary shows.

Integer-valued operands make the products exact: entries in [-3, 3] and k <= 600 give
partial sums of at most 9 * 600 = 5400 < 2^24, exact in float32 and float64 in any
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
M_SIZES = [1, 5, 6, 7, 13, 95, 96, 97, 193]          # MR = 6, MC = 96
N_SIZES = [1, 7, 8, 9, 15, 16, 17, 33]               # NR = 8 (float64) and 16 (float32)
K_SIZES = [1, 2, 255, 256, 257, 600]                 # KC = 256; 600 -> 3 blocks of 200
WIDE = [(7, 2047, 3), (7, 2048, 3), (5, 2049, 2), (13, 4100, 1)]   # NC = 2048


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


def shapes():
    """Every (m, n) edge with one k block and with two; every k edge with edge tiles."""
    yield from ((m, n, k) for m in M_SIZES for n in N_SIZES for k in (1, 257))
    yield from ((m, n, k) for m, n in [(7, 17), (97, 9), (6, 16)] for k in K_SIZES)
    yield from WIDE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_integer_products_are_exact_at_every_edge(dtype, trans_a, trans_b, rng):
    for m, n, k in shapes():
        a, b, exact = integer_operands(m, n, k, trans_a, trans_b, dtype, rng)
        got = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
        assert got.dtype == dtype and got.shape == (m, n) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, exact, err_msg=f"m={m} n={n} k={k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_real_products_within_the_rounding_bound(dtype, trans_a, trans_b, rng):
    """A sum of k products in precision u is off by at most about k u sum|a||b|
    (Higham, Accuracy and Stability, 3.5); the float64 NumPy product of the same
    operands is the reference, and twice the bound covers its own rounding."""
    u = np.finfo(dtype).eps / 2
    for m, n, k in [(1, 1, 1), (7, 17, 257), (97, 33, 600), (13, 100, 64), (200, 9, 3)]:
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_out_and_accumulate(dtype, trans_a, trans_b, rng):
    for m, n, k in [(7, 17, 257), (97, 9, 5), (6, 16, 600), (1, 33, 1)]:
        a, b, exact = integer_operands(m, n, k, trans_a, trans_b, dtype, rng)
        start = rng.integers(-5, 6, size=(m, n))
        out = start.astype(dtype)
        got = bp.ops.matmul(a, b, out=out, trans_a=trans_a, trans_b=trans_b, accumulate=True)
        assert got is out
        np.testing.assert_array_equal(out, start + exact)
        # without accumulate, whatever out held (even NaN) is overwritten, never read
        out[...] = np.nan
        bp.ops.matmul(a, b, out=out, trans_a=trans_a, trans_b=trans_b)
        np.testing.assert_array_equal(out, exact)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_every_operand_layout(dtype, trans_a, trans_b, rng):
    a, b, _ = integer_operands(13, 17, 19, trans_a, trans_b, dtype, rng)
    for name_a, la in layouts(a).items():
        for name_b, lb in layouts(b).items():
            expected = op(la, trans_a).astype(np.float64) @ op(lb, trans_b).astype(np.float64)
            got = bp.ops.matmul(la, lb, trans_a=trans_a, trans_b=trans_b)
            np.testing.assert_array_equal(got, expected, err_msg=f"a {name_a}, b {name_b}")


def test_lists_are_read_as_float64():
    # [1 2] @ [3 4]^T = 1*3 + 2*4 = 11
    got = bp.ops.matmul([[1, 2]], [[3], [4]])
    assert got.dtype == np.float64 and got.tolist() == [[11.0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("m,n,k", [(301, 77, 129),    # m > n: threads split the rows
                                   (40, 1000, 33),    # n >= m: threads split the columns
                                   (97, 97, 600)])    # 3 k blocks, edge tiles both ways
def test_one_and_two_threads_are_bit_identical(dtype, trans_a, trans_b, m, n, k, rng):
    """Every m*n*k here exceeds the 2^20 multiply-adds below which one thread is used."""
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    start = rng.normal(size=(m, n)).astype(dtype)
    results = []
    for count in (1, 2):
        with threads(count):
            plain = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
            added = start.copy()
            bp.ops.matmul(a, b, out=added, trans_a=trans_a, trans_b=trans_b, accumulate=True)
        results.append((plain, added))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    expected = op(a, trans_a).astype(np.float64) @ op(b, trans_b).astype(np.float64)
    np.testing.assert_allclose(results[1][0], expected, rtol=0,
                               atol=2 * k * np.finfo(dtype).eps * np.abs(expected).max())


# ---- bad arguments: a clear exception naming the argument, and nothing written

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


# ---- the kernel chosen at run time

def test_portable_kernel_is_correct_when_forced():
    """BACKPROP_SIMD=generic selects the kernels an x86-64 without AVX2 would run; run
    the exact integer edge cases and a gradient check through them."""
    code = (
        "import numpy as np, backprop as bp\n"
        "assert bp.simd_kernel() == 'generic', bp.simd_kernel()\n"
        "rng = np.random.default_rng(0)\n"
        "for dt in (np.float32, np.float64):\n"
        "    for m, n, k in [(7, 17, 257), (96, 16, 5), (97, 9, 600), (1, 1, 1), (13, 2049, 2)]:\n"
        "        a, b = rng.integers(-3, 4, (m, k)), rng.integers(-3, 4, (n, k))\n"
        "        got = bp.ops.matmul(a.astype(dt), b.astype(dt), trans_b=True)\n"
        "        np.testing.assert_array_equal(got, a @ b.T)\n"
        "net = bp.Network([bp.Dense(5, 8, 'tanh'), bp.Dense(8, 3, 'softmax')],\n"
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
