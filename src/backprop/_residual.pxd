# Residual (skip) connection kernels: out = x + f(x), where f is the block's layers.
#
# The block's own layers are ordinary records on the tape; only the final addition is
# here.  Its backward sends dL/dout down both paths: into the skip path (below) and into
# f, whose output gradient the planner makes the very same buffer as dL/dout, so that
# path costs nothing.
from cython cimport floating
from cython.parallel cimport prange
from backprop._parallel cimport part_start, team_for
from backprop._ops cimport Op, Tape, Slot, input_of, output_of, result_of


cdef inline void add_rows(const floating* a, Py_ssize_t lda, const floating* b, Py_ssize_t ldb,
                          floating* out, Py_ssize_t ldo, Py_ssize_t lo, Py_ssize_t hi,
                          Py_ssize_t cols) noexcept nogil:
    cdef Py_ssize_t i, j
    for i in range(lo, hi):
        for j in range(cols):
            out[i * ldo + j] = a[i * lda + j] + b[i * ldb + j]


cdef inline void copy_rows(const floating* src, Py_ssize_t lds, floating* dst, Py_ssize_t ldd,
                           Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t cols,
                           bint accumulate) noexcept nogil:
    """dst = src (or dst += src when `accumulate`), rows lo..hi."""
    cdef Py_ssize_t i, j
    for i in range(lo, hi):
        if accumulate:
            for j in range(cols):
                dst[i * ldd + j] += src[i * lds + j]
        else:
            for j in range(cols):
                dst[i * ldd + j] = src[i * lds + j]


cdef inline void residual_forward(const floating* skip, Py_ssize_t lds, const floating* fx,
                                  Py_ssize_t ldf, floating* out, Py_ssize_t ldo,
                                  Py_ssize_t rows, Py_ssize_t cols, int n_threads) noexcept nogil:
    """out = skip + fx."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(rows * cols, n_threads)
    if team == 1:
        add_rows(skip, lds, fx, ldf, out, ldo, 0, rows, cols)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(rows, t, team, 1)
        hi = part_start(rows, t + 1, team, 1)
        add_rows(skip, lds, fx, ldf, out, ldo, lo, hi, cols)


cdef inline void pass_gradient(const floating* d, Py_ssize_t ldd, floating* dx, Py_ssize_t lddx,
                               bint accumulate, Py_ssize_t rows, Py_ssize_t cols,
                               int n_threads) noexcept nogil:
    """dx = d (or dx += d): the gradient through an identity, such as the skip path."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(rows * cols, n_threads)
    if team == 1:
        copy_rows(d, ldd, dx, lddx, 0, rows, cols, accumulate)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(rows, t, team, 1)
        hi = part_start(rows, t + 1, team, 1)
        copy_rows(d, ldd, dx, lddx, lo, hi, cols, accumulate)


# ---- the kind's kernels (see _ops.pxd): input = x (the skip path), skip = f(x)

cdef inline void residual_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* fx = &t.slots[op.skip]
    cdef const Slot* r = result_of(op, t)
    residual_forward(<const floating*>x.value, x.ld, <const floating*>fx.value, fx.ld,
                     <floating*>r.value, r.ld, t.batch, x.size, nt)


cdef inline void identity_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                               int nt) noexcept nogil:
    """dx = dy (or +=): the backward of every kind whose function is the identity (before
    its activation, which the tape has already undone): a residual sum's skip path (f(x)'s
    path shares dy itself), a standalone Activation."""
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    if want_dx:
        pass_gradient(<const floating*>y.grad, y.ld, <floating*>x.grad, x.ld, op.accumulate,
                      t.batch, x.size, nt)


cdef inline void identity_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    """Nothing: a standalone Activation's record keeps its input as the pre-activation
    (op.z is the input slot), and the tape applies the activation from there."""
    pass
