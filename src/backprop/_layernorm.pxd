# Layer normalization (Ba, Kiros & Hinton, 2016), as torch.nn.LayerNorm over the last
# dimension: each row (of the input's matrix view, see _ops.pxd: a (batch * ...) x last
# matrix) is normalised with its own mean and biased variance,
#     xhat = (x - mean) / sqrt(var + eps),   y = gamma * xhat + beta.
#
# Backward, with W features and sums over one row:
#     g = dy * gamma
#     dx = 1 / (W sqrt(var + eps)) * (W g - sum(g) - xhat sum(g * xhat))
#     dgamma = sum over rows of dy * xhat,  dbeta = sum over rows of dy
#
# The rows are independent, so threads split the rows for y and dx; the parameter
# gradients sum over rows, so for them threads split the features and each sum runs in
# row order: every result is the same for any thread count.  `saved` holds each row's
# mean and 1/sqrt(var + eps) (2 x capacity doubles) and 2 x features doubles of scratch.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from backprop._activations cimport activate_tile
from backprop._parallel cimport part_start, team_for
from backprop._ops cimport (Op, Tape, Slot, matrix_stride, input_of, output_of, result_of,
                            param_of, dx_of)


cdef inline void _normalize_rows(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                                 Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t width,
                                 const floating* gamma, const floating* beta, double eps,
                                 double* mean, double* inv_std, int activation) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef double m, v, d, s
    for i in range(lo, hi):
        m = 0.0
        for j in range(width):
            m += x[i * ldx + j]
        m /= width
        v = 0.0
        for j in range(width):
            d = x[i * ldx + j] - m
            v += d * d
        s = 1.0 / sqrt(v / width + eps)
        mean[i] = m
        inv_std[i] = s
        for j in range(width):
            d = (x[i * ldx + j] - m) * s
            if gamma != NULL:
                d = d * gamma[j] + beta[j]
            y[i * ldy + j] = <floating>d
        if activation != 0:
            activate_tile(y + i * ldy, ldy, 1, width, activation)


cdef inline void layernorm_forward(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                                   Py_ssize_t rows, Py_ssize_t width,
                                   const floating* gamma, const floating* beta, double eps,
                                   double* saved, Py_ssize_t capacity, int activation,
                                   int n_threads) noexcept nogil:
    """y = activation(gamma * xhat + beta), row by row (gamma, beta NULL: no affine part);
    `activation` must be elementwise."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(rows * width, n_threads)
    if team == 1:
        _normalize_rows(x, ldx, y, ldy, 0, rows, width, gamma, beta, eps,
                        saved, saved + capacity, activation)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(rows, t, team, 1)
        hi = part_start(rows, t + 1, team, 1)
        _normalize_rows(x, ldx, y, ldy, lo, hi, width, gamma, beta, eps,
                        saved, saved + capacity, activation)


cdef inline void _input_grad_rows(const floating* dy, Py_ssize_t ldd, const floating* x,
                                  Py_ssize_t ldx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t width,
                                  const floating* gamma, floating* dx, Py_ssize_t lddx,
                                  bint accumulate, const double* mean,
                                  const double* inv_std) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef double g, xhat, sum_g, sum_g_xhat, v
    for i in range(lo, hi):
        sum_g = 0.0
        sum_g_xhat = 0.0
        for j in range(width):
            g = dy[i * ldd + j] * (gamma[j] if gamma != NULL else 1.0)
            xhat = (x[i * ldx + j] - mean[i]) * inv_std[i]
            sum_g += g
            sum_g_xhat += g * xhat
        for j in range(width):
            g = dy[i * ldd + j] * (gamma[j] if gamma != NULL else 1.0)
            xhat = (x[i * ldx + j] - mean[i]) * inv_std[i]
            v = inv_std[i] / width * (width * g - sum_g - xhat * sum_g_xhat)
            if accumulate:
                dx[i * lddx + j] = <floating>(dx[i * lddx + j] + v)
            else:
                dx[i * lddx + j] = <floating>v


cdef inline void _param_grad_features(const floating* dy, Py_ssize_t ldd, const floating* x,
                                      Py_ssize_t ldx, Py_ssize_t rows, Py_ssize_t lo,
                                      Py_ssize_t hi, floating* gamma_grad, floating* beta_grad,
                                      const double* mean, const double* inv_std,
                                      double* sum_dy_xhat, double* sum_dy) noexcept nogil:
    cdef Py_ssize_t i, j
    for j in range(lo, hi):
        sum_dy_xhat[j] = 0.0
        sum_dy[j] = 0.0
    for i in range(rows):
        for j in range(lo, hi):
            sum_dy_xhat[j] += dy[i * ldd + j] * ((x[i * ldx + j] - mean[i]) * inv_std[i])
            sum_dy[j] += dy[i * ldd + j]
    for j in range(lo, hi):
        gamma_grad[j] += <floating>sum_dy_xhat[j]
        beta_grad[j] += <floating>sum_dy[j]


cdef inline void layernorm_backward(const floating* dy, Py_ssize_t ldd,
                                    const floating* x, Py_ssize_t ldx,
                                    Py_ssize_t rows, Py_ssize_t width,
                                    const floating* gamma, floating* gamma_grad,
                                    floating* beta_grad, floating* dx, Py_ssize_t lddx,
                                    bint accumulate, double* saved, Py_ssize_t capacity,
                                    int n_threads) noexcept nogil:
    """Given dy = dL/dy: gamma_grad, beta_grad += (if not NULL); dx = (or +=) dL/dx (if not
    NULL)."""
    cdef const double* mean = saved
    cdef const double* inv_std = saved + capacity
    cdef double* sums = saved + 2 * capacity
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(rows * width, n_threads)
    if gamma_grad != NULL:
        if team == 1:
            _param_grad_features(dy, ldd, x, ldx, rows, 0, width, gamma_grad, beta_grad,
                                 mean, inv_std, sums, sums + width)
        else:
            for t in prange(team, num_threads=team, schedule="static"):
                lo = part_start(width, t, team, 16)
                hi = part_start(width, t + 1, team, 16)
                _param_grad_features(dy, ldd, x, ldx, rows, lo, hi, gamma_grad, beta_grad,
                                     mean, inv_std, sums, sums + width)
    if dx == NULL:
        return
    if team == 1:
        _input_grad_rows(dy, ldd, x, ldx, 0, rows, width, gamma, dx, lddx, accumulate,
                         mean, inv_std)
    else:
        for t in prange(team, num_threads=team, schedule="static"):
            lo = part_start(rows, t, team, 1)
            hi = part_start(rows, t + 1, team, 1)
            _input_grad_rows(dy, ldd, x, ldx, lo, hi, width, gamma, dx, lddx, accumulate,
                             mean, inv_std)


# ---- the kind's kernels (see _ops.pxd): parameters 0 = weight (gamma), 1 = bias (beta);
# saved: 2 doubles per row of the matrix view (its capacity: t.capacity * rows per
# sample), then 2 per feature

cdef inline void layernorm_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* r = result_of(op, t)
    layernorm_forward(<const floating*>x.value, matrix_stride(x), <floating*>r.value,
                      matrix_stride(r), t.batch * x.rows, x.cols,
                      param_of(kind, t.params, op, 0), param_of(kind, t.params, op, 1),
                      op.eps, t.saved + op.saved, t.capacity * x.rows, op.fused, nt)


cdef inline void layernorm_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                                int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    layernorm_backward(<const floating*>y.grad, matrix_stride(y), <const floating*>x.value,
                       matrix_stride(x), t.batch * x.rows, x.cols,
                       param_of(kind, t.params, op, 0), param_of(kind, t.grads, op, 0),
                       param_of(kind, t.grads, op, 1), dx_of(kind, op, t, want_dx),
                       matrix_stride(x), op.accumulate, t.saved + op.saved,
                       t.capacity * x.rows, nt)
