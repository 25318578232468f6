# Moving a sample between its two storage orders: channels first (PyTorch's order, what
# users give and get) and channels last (pixel by pixel, what convolutions and pooling
# write, so that a convolution is one matrix product and BatchNorm a column statistic).
#
# Flatten is this kernel too: a sample flattened in PyTorch's order is its channels-first
# storage, so flattening a channels-last slot transposes it and flattening anything else
# copies it.  The planner also inserts a record of this kind wherever a layer needs the
# other order than its input has (LayerNorm over the last dimension after a convolution,
# BatchNorm on an image given channels first, the network's output).
#
# Each sample is a channels x positions matrix one way and its transpose the other; the
# samples are independent, so threads split them and the result does not depend on the
# team.
from cython cimport floating
from cython.parallel cimport prange
from backprop._parallel cimport part_start, team_for
from backprop._residual cimport pass_gradient
from backprop._ops cimport Op, Tape, Slot, input_of, output_of, result_of


cdef inline void _transpose_samples(const floating* src, Py_ssize_t lds, floating* dst,
                                    Py_ssize_t ldd, bint accumulate, Py_ssize_t lo,
                                    Py_ssize_t hi, Py_ssize_t rows,
                                    Py_ssize_t cols) noexcept nogil:
    # Sample b: dst (cols x rows) = src (rows x cols) transposed, in blocks of 16 x 16 so
    # both sides are read and written a cache line at a time.
    cdef Py_ssize_t b, i0, j0, i, j
    cdef const floating* s
    cdef floating* d
    for b in range(lo, hi):
        s = src + b * lds
        d = dst + b * ldd
        i0 = 0
        while i0 < rows:
            j0 = 0
            while j0 < cols:
                for i in range(i0, min(i0 + 16, rows)):
                    for j in range(j0, min(j0 + 16, cols)):
                        if accumulate:
                            d[j * rows + i] += s[i * cols + j]
                        else:
                            d[j * rows + i] = s[i * cols + j]
                j0 += 16
            i0 += 16


cdef inline void relayout(const floating* src, Py_ssize_t lds, bint src_last,
                          floating* dst, Py_ssize_t ldd, bint dst_last, bint accumulate,
                          Py_ssize_t batch, Py_ssize_t size, Py_ssize_t channels,
                          int n_threads) noexcept nogil:
    """dst = src (or +=) for `batch` samples of `size` values with `channels` channels,
    from one storage order to the other (or copied, when both are the same)."""
    cdef Py_ssize_t t, lo, hi
    cdef Py_ssize_t positions = size // channels
    cdef Py_ssize_t rows = positions if src_last else channels
    cdef Py_ssize_t cols = channels if src_last else positions
    cdef int team
    if src_last == dst_last or channels == 1 or positions == 1:
        pass_gradient(src, lds, dst, ldd, accumulate, batch, size, n_threads)
        return
    team = team_for(batch * size, n_threads)
    if team == 1:
        _transpose_samples(src, lds, dst, ldd, accumulate, 0, batch, rows, cols)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(batch, t, team, 1)
        hi = part_start(batch, t + 1, team, 1)
        _transpose_samples(src, lds, dst, ldd, accumulate, lo, hi, rows, cols)


# ---- the kind's kernels (see _ops.pxd): no parameters

cdef inline void relayout_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* r = result_of(op, t)
    relayout(<const floating*>x.value, x.ld, x.channels_last, <floating*>r.value, r.ld,
             r.channels_last, False, t.batch, x.size, x.c, nt)


cdef inline void relayout_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                               int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    if want_dx:
        relayout(<const floating*>y.grad, y.ld, y.channels_last, <floating*>x.grad, x.ld,
                 x.channels_last, op.accumulate, t.batch, x.size, x.c, nt)
