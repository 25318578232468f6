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
#
# Rows may carry weights `w` (NULL: all 1): the mean over rows becomes the weighted mean
# sum_i w_i loss_i / sum_i w_i, as scikit-learn's and Keras's sample weights define it.
# The caller has checked the weights (finite, >= 0, a positive sum).
from cython cimport floating
from libc.math cimport exp, log1p, fabs
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from backprop._activations cimport sigmoid
from backprop._optim cimport STAT_BLOCK, PARALLEL_MIN_PARAMS, _block_sum_of_squares
from backprop._ops cimport Op, Tape, Slot, LossKernel, result_of

cdef inline double row_weight(const double* w, Py_ssize_t i) noexcept nogil:
    return 1.0 if w == NULL else w[i]


cdef inline double total_weight(const double* w, Py_ssize_t rows) noexcept nogil:
    """What the mean over rows divides by: the row count, or the sum of the weights."""
    cdef Py_ssize_t i
    cdef double total = 0.0
    if w == NULL:
        return <double>rows
    for i in range(rows):
        total += w[i]
    return total


cdef inline double mse(const floating* a, Py_ssize_t lda, const floating* y, Py_ssize_t ldy,
                       const double* w, Py_ssize_t rows, Py_ssize_t cols,
                       floating* delta, Py_ssize_t ldd, double grad_scale) noexcept nogil:
    """mean((a - y)^2); delta <- dL/da = 2 w_i (a - y) / (sum(w) * cols)."""
    cdef Py_ssize_t i, j
    cdef double diff, row_total, total = 0.0, denominator = total_weight(w, rows) * cols
    cdef double scale = grad_scale * 2.0 / denominator, wi
    for i in range(rows):
        wi = row_weight(w, i)
        row_total = 0.0
        for j in range(cols):
            diff = <double>a[i * lda + j] - <double>y[i * ldy + j]
            row_total += diff * diff
            delta[i * ldd + j] = <floating>(wi * scale * diff)
        total += wi * row_total
    return total / denominator


cdef inline double binary_cross_entropy(const floating* z, Py_ssize_t ldz,
                                        const floating* y, Py_ssize_t ldy, const double* w,
                                        Py_ssize_t rows, Py_ssize_t cols,
                                        floating* delta, Py_ssize_t ldd,
                                        double grad_scale) noexcept nogil:
    """mean(-y log s(z) - (1-y) log(1-s(z))) written as max(z,0) - z y + log1p(e^-|z|),
    which never takes the log of 0; delta <- dL/dz = w_i (s(z) - y) / (sum(w) * cols)."""
    cdef Py_ssize_t i, j
    cdef double zij, yij, wi, row_total, total = 0.0
    cdef double denominator = total_weight(w, rows) * cols, scale = grad_scale / denominator
    for i in range(rows):
        wi = row_weight(w, i)
        row_total = 0.0
        for j in range(cols):
            zij = z[i * ldz + j]
            yij = y[i * ldy + j]
            row_total += (zij if zij > 0 else 0.0) - zij * yij + log1p(exp(-fabs(zij)))
            delta[i * ldd + j] = <floating>(wi * scale * (sigmoid(zij) - yij))
        total += wi * row_total
    return total / denominator


cdef inline double cross_entropy_labels(const floating* z, Py_ssize_t ldz, const double* lse,
                                        const floating* p, Py_ssize_t ldp,
                                        const int64_t* labels, const double* w,
                                        Py_ssize_t rows, Py_ssize_t cols,
                                        floating* delta, Py_ssize_t ldd,
                                        double grad_scale) noexcept nogil:
    """mean over rows of -log softmax(z)[label] = lse(z) - z[label], with lse and
    p = softmax(z) saved by the forward pass; delta <- w_i (p - onehot(label)) / sum(w)."""
    cdef Py_ssize_t i, j
    cdef double wi, total = 0.0, denominator = total_weight(w, rows)
    cdef double scale = grad_scale / denominator
    for i in range(rows):
        wi = row_weight(w, i)
        total += wi * (lse[i] - z[i * ldz + labels[i]])
        for j in range(cols):
            delta[i * ldd + j] = <floating>(wi * scale * p[i * ldp + j])
        delta[i * ldd + labels[i]] = <floating>(
            wi * scale * (<double>p[i * ldp + labels[i]] - 1.0))
    return total / denominator


cdef inline double cross_entropy_probs(const floating* z, Py_ssize_t ldz, const double* lse,
                                       const floating* p, Py_ssize_t ldp,
                                       const floating* y, Py_ssize_t ldy, const double* w,
                                       Py_ssize_t rows, Py_ssize_t cols,
                                       floating* delta, Py_ssize_t ldd,
                                       double grad_scale) noexcept nogil:
    """mean over rows of -sum_j y_j log softmax(z)_j; delta <- w_i (p * sum_j y_j - y) /
    sum(w) (the sum is 1 for proper probability rows, kept so the gradient is exact anyway)."""
    cdef Py_ssize_t i, j
    cdef double wi, row_sum, row_total, total = 0.0, denominator = total_weight(w, rows)
    cdef double scale = grad_scale / denominator
    for i in range(rows):
        wi = row_weight(w, i)
        row_sum = row_total = 0.0
        for j in range(cols):
            row_sum += y[i * ldy + j]
            row_total -= y[i * ldy + j] * (z[i * ldz + j] - lse[i])
        total += wi * row_total
        for j in range(cols):
            delta[i * ldd + j] = <floating>(
                wi * scale * (p[i * ldp + j] * row_sum - y[i * ldy + j]))
    return total / denominator


# ---- the losses' kernels: the output is (batch, size), samples ld apart; targets are
# batch x size, ldt apart

cdef inline double mse_loss(floating* kind, const Op* last, Tape* t, bint labels,
                            double grad_scale) noexcept nogil:
    cdef const Slot* y = &t.slots[last.output]
    return mse(<const floating*>y.value, y.ld, <const floating*>t.target, t.ldt, t.weights,
               t.batch, y.size, <floating*>y.grad, y.ld, grad_scale)


cdef inline double binary_cross_entropy_loss(floating* kind, const Op* last, Tape* t,
                                             bint labels, double grad_scale) noexcept nogil:
    cdef const Slot* y = &t.slots[last.output]
    cdef const Slot* z = result_of(last, t)
    return binary_cross_entropy(<const floating*>z.value, z.ld, <const floating*>t.target,
                                t.ldt, t.weights, t.batch, y.size, <floating*>y.grad, y.ld,
                                grad_scale)


cdef inline double cross_entropy_loss(floating* kind, const Op* last, Tape* t, bint labels,
                                      double grad_scale) noexcept nogil:
    cdef const Slot* y = &t.slots[last.output]
    cdef const Slot* z = result_of(last, t)
    if labels:
        return cross_entropy_labels(<const floating*>z.value, z.ld, t.lse,
                                    <const floating*>y.value, y.ld, t.labels, t.weights,
                                    t.batch, y.size, <floating*>y.grad, y.ld, grad_scale)
    return cross_entropy_probs(<const floating*>z.value, z.ld, t.lse, <const floating*>y.value,
                               y.ld, <const floating*>t.target, t.ldt, t.weights, t.batch,
                               y.size, <floating*>y.grad, y.ld, grad_scale)


cdef inline double _penalise_block(const floating* w, floating* g, Py_ssize_t lo,
                                   Py_ssize_t hi, floating coef) noexcept nogil:
    # Two loops: the update vectorises, and the sum uses the optimizer's eight running
    # sums (one sum would wait on the last addition at every element).
    cdef Py_ssize_t i
    for i in range(lo, hi):
        g[i] += coef * w[i]
    return _block_sum_of_squares(w, lo, hi)


cdef inline double l2_penalty(const floating* w, floating* g, Py_ssize_t n, double l2,
                              double grad_scale, double* block_sums,
                              int n_threads) noexcept nogil:
    """The L2 penalty l2/2 * sum(w^2) of one weight matrix, returned, and its gradient
    grad_scale * l2 * w added to g.  Blocks of STAT_BLOCK values are summed in parallel,
    then the block sums in order, so the value is the same for any thread count;
    `block_sums` has room for (n + STAT_BLOCK - 1) // STAT_BLOCK doubles."""
    cdef Py_ssize_t blocks = (n + STAT_BLOCK - 1) // STAT_BLOCK, b
    cdef floating coef = <floating>(grad_scale * l2)
    cdef double total = 0.0
    if n < PARALLEL_MIN_PARAMS or n_threads <= 1:
        for b in range(blocks):
            block_sums[b] = _penalise_block(w, g, b * STAT_BLOCK, min(n, (b + 1) * STAT_BLOCK),
                                            coef)
    else:
        for b in prange(blocks, schedule="static", num_threads=n_threads):
            block_sums[b] = _penalise_block(w, g, b * STAT_BLOCK, min(n, (b + 1) * STAT_BLOCK),
                                            coef)
    for b in range(blocks):
        total += block_sums[b]
    return 0.5 * l2 * total
