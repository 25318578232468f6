"""Property-based checks over shapes, dtypes and strides, against NumPy."""
import numpy as np
from hypothesis import given, settings, strategies as st

import backprop as bp
from conftest import make_net

dims = st.integers(1, 40)
dtypes = st.sampled_from([np.float32, np.float64])


@st.composite
def strided_matrix(draw, rows, cols, dtype):
    """A (rows, cols) array that is C-ordered, Fortran-ordered or a strided view."""
    layout = draw(st.sampled_from(["c", "f", "view"]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    base = np.random.default_rng(seed).normal(size=(rows * 2, cols * 3)).astype(dtype)
    if layout == "view":
        return base[::2, ::3]
    a = base[:rows, :cols]
    return np.asfortranarray(a) if layout == "f" else np.ascontiguousarray(a)


@settings(deadline=None, max_examples=60)
@given(data=st.data(), m=dims, n=dims, k=st.integers(0, 40), dtype=dtypes,
       trans_a=st.booleans(), trans_b=st.booleans())
def test_matmul_matches_numpy(data, m, n, k, dtype, trans_a, trans_b):
    a = data.draw(strided_matrix(*((k, m) if trans_a else (m, k)), dtype))
    b = data.draw(strided_matrix(*((n, k) if trans_b else (k, n)), dtype))
    expected = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    got = bp.ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * max(1, k))


@settings(deadline=None, max_examples=40)
@given(data=st.data(), batch=dims, n_in=dims, n_out=dims, dtype=dtypes, bias=st.booleans())
def test_dense_layer_forward_and_backward(data, batch, n_in, n_out, dtype, bias):
    net = make_net([n_in, n_out], "tanh", dtype=np.dtype(dtype).name, bias=bias)
    x = data.draw(strided_matrix(batch, n_in, dtype))
    g = data.draw(strided_matrix(batch, n_out, dtype))
    W = net.layers[0].weight.astype(np.float64)
    b = net.layers[0].bias.astype(np.float64) if bias else 0
    a = np.tanh(x.astype(np.float64) @ W.T + b)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(net.forward(x), a, rtol=tol, atol=tol)
    net.backward(grad_output=g)
    dz = g * (1 - a ** 2)
    np.testing.assert_allclose(net.layers[0].weight_grad, dz.T @ x, rtol=tol * 10, atol=tol * 10)
    if bias:
        np.testing.assert_allclose(net.layers[0].bias_grad, dz.sum(axis=0), rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(net.input_grad, dz @ W, rtol=tol * 10, atol=tol * 10)
