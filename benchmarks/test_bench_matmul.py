"""pytest-benchmark: the core's matmul on the training shapes, beside numpy.matmul."""
import numpy as np
import pytest

import backprop as bp
from configs import MATMUL_SHAPES as SHAPES


def operands(m, n, k, ta, tb):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(k, m) if ta else (m, k)).astype(np.float32)
    b = rng.normal(size=(n, k) if tb else (k, n)).astype(np.float32)
    return a, b, np.empty((m, n), np.float32)


@pytest.mark.parametrize("name", SHAPES)
def test_backprop_matmul(benchmark, name):
    m, n, k, ta, tb = SHAPES[name]
    a, b, out = operands(m, n, k, ta, tb)
    benchmark(bp.ops.matmul, a, b, out=out, trans_a=ta, trans_b=tb)
    np.testing.assert_allclose(out, (a.T if ta else a) @ (b.T if tb else b), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("name", SHAPES)
def test_numpy_matmul(benchmark, name):
    m, n, k, ta, tb = SHAPES[name]
    a, b, out = operands(m, n, k, ta, tb)
    benchmark(np.matmul, a.T if ta else a, b.T if tb else b, out=out)
