# Losses, each computed together with its gradient in one pass over the output.
#
# Reductions match PyTorch (`reduction="mean"`): MSELoss and BCEWithLogitsLoss average
# over every element, CrossEntropyLoss over the rows.  The cross-entropies read the
# pre-activation logits z, never log(p): log-sum-exp of max-shifted logits stays finite
# for logits of +-1e4, where p underflows to 0.  Their gradient is taken straight with
# respect to z (p - y), which is both cheaper and exact, so the output layer's
# activation derivative is skipped for them.  Sums run serially in a fixed order, so
# the loss does not depend on the thread count.  Every gradient is multiplied by
# `grad_scale` (1 normally; a process's share of a global batch in data-parallel
# training), the loss itself is not.
from cython cimport floating
from libc.math cimport exp, log1p, fabs
from libc.stdint cimport int64_t
from backprop._activations cimport sigmoid

cdef enum Loss:
    MSE = 0
    BINARY_CROSS_ENTROPY = 1
    CROSS_ENTROPY = 2


cdef inline double mse(const floating* a, Py_ssize_t lda, const floating* y, Py_ssize_t ldy,
                       Py_ssize_t rows, Py_ssize_t cols,
                       floating* delta, Py_ssize_t ldd, double grad_scale) noexcept nogil:
    """mean((a - y)^2); delta <- dL/da = 2 (a - y) / (rows * cols)."""
    cdef Py_ssize_t i, j
    cdef double diff, total = 0.0, scale = grad_scale * 2.0 / <double>(rows * cols)
    for i in range(rows):
        for j in range(cols):
            diff = <double>a[i * lda + j] - <double>y[i * ldy + j]
            total += diff * diff
            delta[i * ldd + j] = <floating>(scale * diff)
    return total / <double>(rows * cols)


cdef inline double binary_cross_entropy(const floating* z, Py_ssize_t ldz,
                                        const floating* y, Py_ssize_t ldy,
                                        Py_ssize_t rows, Py_ssize_t cols,
                                        floating* delta, Py_ssize_t ldd,
                                        double grad_scale) noexcept nogil:
    """mean(-y log s(z) - (1-y) log(1-s(z))) written as max(z,0) - z y + log1p(e^-|z|),
    which never takes the log of 0; delta <- dL/dz = (s(z) - y) / (rows * cols)."""
    cdef Py_ssize_t i, j
    cdef double zij, yij, total = 0.0, scale = 1.0 / <double>(rows * cols)
    for i in range(rows):
        for j in range(cols):
            zij = z[i * ldz + j]
            yij = y[i * ldy + j]
            total += (zij if zij > 0 else 0.0) - zij * yij + log1p(exp(-fabs(zij)))
            delta[i * ldd + j] = <floating>(grad_scale * scale * (sigmoid(zij) - yij))
    return total * scale


cdef inline double cross_entropy_labels(const floating* z, Py_ssize_t ldz, const double* lse,
                                        const floating* p, Py_ssize_t ldp,
                                        const int64_t* labels,
                                        Py_ssize_t rows, Py_ssize_t cols,
                                        floating* delta, Py_ssize_t ldd,
                                        double grad_scale) noexcept nogil:
    """mean over rows of -log softmax(z)[label] = lse(z) - z[label], with lse and
    p = softmax(z) saved by the forward pass; delta <- dL/dz = (p - onehot(label)) / rows."""
    cdef Py_ssize_t i, j
    cdef double total = 0.0, scale = grad_scale / <double>rows
    for i in range(rows):
        total += lse[i] - z[i * ldz + labels[i]]
        for j in range(cols):
            delta[i * ldd + j] = <floating>(scale * p[i * ldp + j])
        delta[i * ldd + labels[i]] = <floating>(scale * (<double>p[i * ldp + labels[i]] - 1.0))
    return total / <double>rows


cdef inline double cross_entropy_probs(const floating* z, Py_ssize_t ldz, const double* lse,
                                       const floating* p, Py_ssize_t ldp,
                                       const floating* y, Py_ssize_t ldy,
                                       Py_ssize_t rows, Py_ssize_t cols,
                                       floating* delta, Py_ssize_t ldd,
                                       double grad_scale) noexcept nogil:
    """mean over rows of -sum_j y_j log softmax(z)_j; delta <- (p * sum_j y_j - y) / rows
    (the sum is 1 for proper probability rows, kept so the gradient is exact anyway)."""
    cdef Py_ssize_t i, j
    cdef double row_sum, total = 0.0, scale = grad_scale / <double>rows
    for i in range(rows):
        row_sum = 0.0
        for j in range(cols):
            row_sum += y[i * ldy + j]
            total -= y[i * ldy + j] * (z[i * ldz + j] - lse[i])
        for j in range(cols):
            delta[i * ldd + j] = <floating>(scale * (p[i * ldp + j] * row_sum - y[i * ldy + j]))
    return total / <double>rows
