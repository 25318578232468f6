# Dense (fully connected) layer kernels: z = x W^T + b, and its gradients.
#
# Like torch.nn.Linear, the layer acts on the last dimension: a (batch, ..., in) input is a
# (batch * ...) x in matrix (the slot's matrix view, see _ops.pxd), so one product serves
# rows of features and sequences of them alike.
#
# Every product goes through the GEMM, which fuses the bias and an elementwise
# activation into the write-back of each output tile (see _gemm.pxd); the bias
# gradient is a column sum of dL/dz, split by columns between threads so every sum
# runs over the rows in the same order whatever the thread count.
from cython cimport floating
from cython.parallel cimport prange
from backprop._gemm cimport gemm
from backprop._activations cimport IDENTITY
from backprop._parallel cimport part_start, team_for
from backprop._gemm cimport gemm_scratch_bytes
from backprop._ops cimport (Op, Tape, Slot, matrix_stride, input_of, output_of, result_of,
                            param_of, dx_of)


cdef inline void dense_forward(const floating* x, Py_ssize_t ldx, floating* out, Py_ssize_t ldo,
                               const floating* weight, const floating* bias,
                               Py_ssize_t rows, Py_ssize_t n_in, Py_ssize_t n_out,
                               int activation, int products, int n_threads,
                               void* scratch) noexcept nogil:
    """out = activation(x weight^T + bias); weight is (n_out, n_in) like torch.nn.Linear,
    bias may be NULL; `activation` must be elementwise (softmax is applied afterwards)."""
    gemm(rows, n_out, n_in, x, ldx, False, weight, n_in, True, out, ldo, False,
         bias, activation, products, n_threads, scratch)


cdef inline void column_sums(const floating* d, Py_ssize_t ldd, Py_ssize_t rows,
                             Py_ssize_t lo, Py_ssize_t hi, floating* out) noexcept nogil:
    """out[j] += sum over rows of d[:, j] for j in [lo, hi), in row order."""
    cdef Py_ssize_t i, j
    for i in range(rows):
        for j in range(lo, hi):
            out[j] += d[i * ldd + j]


cdef inline void add_column_sums(const floating* d, Py_ssize_t ldd, Py_ssize_t rows,
                                 Py_ssize_t cols, floating* out, int n_threads) noexcept nogil:
    """out[j] += sum over the rows of d[:, j]: a bias gradient.  Threads split the
    columns, so every sum runs over the rows in the same order whatever the team."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(rows * cols, n_threads)
    if team == 1:
        column_sums(d, ldd, rows, 0, cols, out)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(cols, t, team, 16)
        hi = part_start(cols, t + 1, team, 16)
        column_sums(d, ldd, rows, lo, hi, out)


cdef inline void dense_backward(const floating* dz, Py_ssize_t ldd,
                                const floating* x, Py_ssize_t ldx, const floating* weight,
                                floating* weight_grad, floating* bias_grad,
                                floating* dx, Py_ssize_t lddx, bint accumulate_dx,
                                Py_ssize_t rows, Py_ssize_t n_in, Py_ssize_t n_out,
                                int products, int n_threads, void* scratch) noexcept nogil:
    """Given dz = dL/dz: weight_grad += dz^T x, bias_grad += column sums of dz (if not
    NULL), and dx = dz weight (added to dx when `accumulate_dx`; skipped if dx is NULL)."""
    gemm(n_out, n_in, rows, dz, ldd, True, x, ldx, False, weight_grad, n_in, True,
         NULL, IDENTITY, products, n_threads, scratch)
    if bias_grad != NULL:
        add_column_sums(dz, ldd, rows, n_out, bias_grad, n_threads)
    if dx != NULL:
        gemm(rows, n_in, n_out, dz, ldd, False, weight, n_in, False, dx, lddx, accumulate_dx,
             NULL, IDENTITY, products, n_threads, scratch)


# ---- the kind's kernels (see _ops.pxd): parameters 0 = weight (out, in), 1 = bias (out)

cdef inline void dense_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* r = result_of(op, t)
    dense_forward(<const floating*>x.value, matrix_stride(x), <floating*>r.value,
                  matrix_stride(r), param_of(kind, t.params, op, 0),
                  param_of(kind, t.params, op, 1), t.batch * x.rows, x.cols, r.cols,
                  op.fused, t.products, nt, t.scratch)


cdef inline void dense_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                            int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    dense_backward(<const floating*>y.grad, matrix_stride(y), <const floating*>x.value,
                   matrix_stride(x), param_of(kind, t.params, op, 0),
                   param_of(kind, t.grads, op, 0), param_of(kind, t.grads, op, 1),
                   dx_of(kind, op, t, want_dx), matrix_stride(x), op.accumulate,
                   t.batch * x.rows, x.cols, y.cols, t.products, nt, t.scratch)


cdef inline Py_ssize_t dense_scratch(const Op* op, const Tape* t, Py_ssize_t batch, int nt,
                                     Py_ssize_t itemsize) noexcept nogil:
    """The largest of the three products' packing scratch."""
    cdef Py_ssize_t rows = batch * t.slots[op.input].rows
    cdef Py_ssize_t n_in = t.slots[op.input].cols, n_out = t.slots[op.output].cols
    return max(gemm_scratch_bytes(rows, n_out, n_in, nt, itemsize),
               gemm_scratch_bytes(n_out, n_in, rows, nt, itemsize),
               gemm_scratch_bytes(rows, n_in, n_out, nt, itemsize))
