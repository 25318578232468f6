# Batch normalization (Ioffe & Szegedy, 2015), as torch.nn.BatchNorm1d and BatchNorm2d.
#
# Statistics are per channel, over the batch and every position: the input's channels are
# stored last (the planner sees to it), so the batch is a (batch * positions) x channels
# matrix and each "row" below is one position of one sample.
#
# Train mode normalises each feature with the batch's mean and biased variance,
#     xhat = (x - mean) / sqrt(var + eps),   y = gamma * xhat + beta,
# and moves the running statistics towards the batch's (the running variance takes the
# unbiased variance, var * B / (B - 1)); eval mode uses the running statistics instead.
#
# Backward, with N = B rows and sums over the rows of one feature:
#     dbeta = sum(dy),  dgamma = sum(dy * xhat)
#     train: dx = gamma / (N sqrt(var + eps)) * (N dy - sum(dy) - xhat sum(dy * xhat))
#     eval:  dx = gamma / sqrt(running_var + eps) * dy      (the statistics are constants)
#
# Every sum over the batch runs over the rows of one feature in row order, in double, and
# threads split the features, never the rows: the result is the same bit for bit for any
# thread count.  Per feature the layer keeps (in `saved`, 4 x features doubles) the mean
# and 1/sqrt(var + eps) the forward used, and two sums the backward needs.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from backprop._activations cimport activate_tile
from backprop._parallel cimport part_start, team_for
from backprop._ops cimport (Op, Tape, Slot, positions, pixel_stride, input_of, output_of,
                            result_of, param_of, dx_of)


cdef inline void _statistics(const floating* x, Py_ssize_t ldx, Py_ssize_t rows,
                             Py_ssize_t lo, Py_ssize_t hi, double eps,
                             double* mean, double* var, double* inv_std) noexcept nogil:
    # Two passes (mean, then squared deviations): no cancellation for large means.
    cdef Py_ssize_t i, j
    cdef double d
    for j in range(lo, hi):
        mean[j] = 0.0
        var[j] = 0.0
    for i in range(rows):
        for j in range(lo, hi):
            mean[j] += x[i * ldx + j]
    for j in range(lo, hi):
        mean[j] /= rows
    for i in range(rows):
        for j in range(lo, hi):
            d = x[i * ldx + j] - mean[j]
            var[j] += d * d
    for j in range(lo, hi):
        var[j] /= rows
        inv_std[j] = 1.0 / sqrt(var[j] + eps)


cdef inline void _normalize(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                            Py_ssize_t rows, Py_ssize_t lo, Py_ssize_t hi,
                            const floating* gamma, const floating* beta,
                            const double* mean, const double* inv_std,
                            double* scale, double* shift, int activation) noexcept nogil:
    # y = x * scale + shift with scale = gamma / std, shift = beta - mean * scale.
    cdef Py_ssize_t i, j
    for j in range(lo, hi):
        scale[j] = inv_std[j] * (gamma[j] if gamma != NULL else 1.0)
        shift[j] = (beta[j] if beta != NULL else 0.0) - mean[j] * scale[j]
    for i in range(rows):
        for j in range(lo, hi):
            y[i * ldy + j] = <floating>(x[i * ldx + j] * scale[j] + shift[j])
        if activation != 0:
            activate_tile(y + i * ldy + lo, ldy, 1, hi - lo, activation)


cdef inline void _forward_features(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                                   Py_ssize_t rows, Py_ssize_t lo, Py_ssize_t hi,
                                   const floating* gamma, const floating* beta,
                                   floating* running_mean, floating* running_var,
                                   double* saved, Py_ssize_t width, double eps,
                                   double momentum, bint training, int activation) noexcept nogil:
    cdef double* mean = saved
    cdef double* inv_std = saved + width
    cdef double* var = saved + 2 * width       # scratch until _normalize reuses it
    cdef Py_ssize_t j
    if training:
        _statistics(x, ldx, rows, lo, hi, eps, mean, var, inv_std)
        for j in range(lo, hi):
            running_mean[j] = <floating>((1.0 - momentum) * running_mean[j] + momentum * mean[j])
            running_var[j] = <floating>((1.0 - momentum) * running_var[j]
                                        + momentum * var[j] * rows / (rows - 1.0))
    else:
        for j in range(lo, hi):
            mean[j] = running_mean[j]
            inv_std[j] = 1.0 / sqrt(running_var[j] + eps)
    _normalize(x, ldx, y, ldy, rows, lo, hi, gamma, beta, mean, inv_std,
               saved + 2 * width, saved + 3 * width, activation)


cdef inline void batchnorm_forward(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                                   Py_ssize_t rows, Py_ssize_t width,
                                   const floating* gamma, const floating* beta,
                                   floating* running_mean, floating* running_var,
                                   double* saved, double eps, double momentum, bint training,
                                   int activation, int n_threads) noexcept nogil:
    """y = activation(gamma * xhat + beta) (gamma, beta NULL: no affine part); in train mode
    rows must be >= 2 (the caller checks).  `activation` must be elementwise."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(rows * width, n_threads)
    if team == 1:
        _forward_features(x, ldx, y, ldy, rows, 0, width, gamma, beta, running_mean,
                          running_var, saved, width, eps, momentum, training, activation)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(width, t, team, 16)
        hi = part_start(width, t + 1, team, 16)
        _forward_features(x, ldx, y, ldy, rows, lo, hi, gamma, beta, running_mean,
                          running_var, saved, width, eps, momentum, training, activation)


cdef inline void _backward_features(const floating* dy, Py_ssize_t ldd,
                                    const floating* x, Py_ssize_t ldx,
                                    Py_ssize_t rows, Py_ssize_t lo, Py_ssize_t hi,
                                    const floating* gamma, floating* gamma_grad,
                                    floating* beta_grad, floating* dx, Py_ssize_t lddx,
                                    bint accumulate, double* saved, Py_ssize_t width,
                                    bint training) noexcept nogil:
    cdef const double* mean = saved
    cdef const double* inv_std = saved + width
    cdef double* sum_dy = saved + 2 * width
    cdef double* sum_dy_xhat = saved + 3 * width
    cdef Py_ssize_t i, j
    cdef double xhat, g, v
    for j in range(lo, hi):
        sum_dy[j] = 0.0
        sum_dy_xhat[j] = 0.0
    for i in range(rows):
        for j in range(lo, hi):
            xhat = (x[i * ldx + j] - mean[j]) * inv_std[j]
            sum_dy[j] += dy[i * ldd + j]
            sum_dy_xhat[j] += dy[i * ldd + j] * xhat
    if gamma_grad != NULL:
        for j in range(lo, hi):
            gamma_grad[j] += <floating>sum_dy_xhat[j]
            beta_grad[j] += <floating>sum_dy[j]
    if dx == NULL:
        return
    for i in range(rows):
        for j in range(lo, hi):
            g = (gamma[j] if gamma != NULL else 1.0) * inv_std[j]
            if training:
                xhat = (x[i * ldx + j] - mean[j]) * inv_std[j]
                v = g / rows * (rows * dy[i * ldd + j] - sum_dy[j] - xhat * sum_dy_xhat[j])
            else:
                v = g * dy[i * ldd + j]
            if accumulate:
                dx[i * lddx + j] = <floating>(dx[i * lddx + j] + v)
            else:
                dx[i * lddx + j] = <floating>v


cdef inline void batchnorm_backward(const floating* dy, Py_ssize_t ldd,
                                    const floating* x, Py_ssize_t ldx,
                                    Py_ssize_t rows, Py_ssize_t width,
                                    const floating* gamma, floating* gamma_grad,
                                    floating* beta_grad, floating* dx, Py_ssize_t lddx,
                                    bint accumulate, double* saved, bint training,
                                    int n_threads) noexcept nogil:
    """Given dy = dL/dy: gamma_grad, beta_grad += (if not NULL); dx = (or +=) dL/dx (if not
    NULL).  `saved` is what the forward left there."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(rows * width, n_threads)
    if team == 1:
        _backward_features(dy, ldd, x, ldx, rows, 0, width, gamma, gamma_grad, beta_grad,
                           dx, lddx, accumulate, saved, width, training)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(width, t, team, 16)
        hi = part_start(width, t + 1, team, 16)
        _backward_features(dy, ldd, x, ldx, rows, lo, hi, gamma, gamma_grad, beta_grad,
                           dx, lddx, accumulate, saved, width, training)


# ---- the kind's kernels (see _ops.pxd): parameters 0 = weight (gamma), 1 = bias (beta);
# buffers running_mean then running_var; saved: 4 doubles per channel

cdef inline void batchnorm_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* r = result_of(op, t)
    cdef floating* running = (<floating*>t.buffers) + op.buffer
    batchnorm_forward(<const floating*>x.value, pixel_stride(x), <floating*>r.value,
                      pixel_stride(r), t.batch * positions(x), x.c,
                      param_of(kind, t.params, op, 0), param_of(kind, t.params, op, 1),
                      running, running + x.c, t.saved + op.saved, op.eps, op.momentum,
                      t.training, op.fused, nt)


cdef inline void batchnorm_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                                int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    batchnorm_backward(<const floating*>y.grad, pixel_stride(y), <const floating*>x.value,
                       pixel_stride(x), t.batch * positions(x), x.c,
                       param_of(kind, t.params, op, 0), param_of(kind, t.grads, op, 0),
                       param_of(kind, t.grads, op, 1), dx_of(kind, op, t, want_dx),
                       pixel_stride(x), op.accumulate, t.saved + op.saved, t.training, nt)
