# Inverted dropout (Srivastava et al., 2014), as torch.nn.Dropout: in train mode each
# element is zeroed with probability p and the others are scaled by 1 / (1 - p), so the
# expected output equals the input; in eval mode the layer is the identity.
#
# The mask is never stored.  Whether element (row, col) survives is a hash of
#     (the network's seed, the layer, the count of train-mode forward passes, row, col),
# a counter-based generator: the forward and the backward of one pass compute the same
# mask; every pass draws a fresh one; no thread's draw depends on another's, so the mask
# is the same for any thread count; and `row` is the row's number in the global batch
# (row_offset + local row), so a batch split across processes draws the masks one
# process would.  `col` is the element's place in the sample as stored: for a slot whose
# channels are stored last (after a convolution or pooling), pixel by pixel.
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport uint32_t, uint64_t
from backprop._parallel cimport part_start, team_for
from backprop._residual cimport pass_gradient
from backprop._ops cimport Op, Tape, Slot, input_of, output_of, result_of, dx_of, mix64

cdef extern from *:
    """
    #define BP_GOLDEN64 0x9E3779B97F4A7C15ULL
    #define BP_GOLDEN32 0x9E3779B9U
    """
    const uint64_t GOLDEN64 "BP_GOLDEN64"
    const uint32_t GOLDEN32 "BP_GOLDEN32"


cdef inline uint32_t mix32(uint32_t x) noexcept nogil:
    # A 32-bit finaliser (two multiplies): cheap enough for every element, and it
    # vectorises with 32-bit lanes on any x86-64.
    x = (x ^ (x >> 16)) * <uint32_t>0x7FEB352DU
    x = (x ^ (x >> 15)) * <uint32_t>0x846CA68BU
    return x ^ (x >> 16)


cdef inline uint64_t pass_key(uint64_t layer_key, uint64_t n_pass) noexcept nogil:
    """The key of one layer in one train-mode pass; layer_key mixes the seed and layer."""
    return mix64(layer_key + n_pass * GOLDEN64)


cdef inline uint64_t keep_threshold(double p) noexcept nogil:
    """An element survives when its 32-bit hash is >= p * 2^32: probability 1 - p."""
    return <uint64_t>(p * 4294967296.0)


cdef inline void _dropout_rows(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                               bint accumulate, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t cols,
                               uint64_t key, uint64_t row_offset, uint64_t threshold,
                               floating scale) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef uint32_t row_key
    cdef floating v
    for i in range(lo, hi):
        row_key = <uint32_t>mix64(key ^ (row_offset + <uint64_t>i))
        for j in range(cols):
            v = x[i * ldx + j] * scale if mix32(row_key + <uint32_t>j * GOLDEN32) >= threshold else 0
            if accumulate:
                y[i * ldy + j] += v
            else:
                y[i * ldy + j] = v


cdef inline void dropout_apply(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                               bint accumulate, Py_ssize_t rows, Py_ssize_t cols,
                               uint64_t key, uint64_t row_offset, double p,
                               int n_threads) noexcept nogil:
    """y = x * mask / (1 - p) (or y += ...) with the mask of `key` (see pass_key).  The
    forward applies it to the input, the backward to dL/dy: the same mask both ways."""
    cdef Py_ssize_t t, lo, hi
    cdef uint64_t threshold = keep_threshold(p)
    cdef floating scale = <floating>(1.0 / (1.0 - p))
    cdef int team = team_for(rows * cols, n_threads)
    if team == 1:
        _dropout_rows(x, ldx, y, ldy, accumulate, 0, rows, cols, key, row_offset, threshold, scale)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(rows, t, team, 1)
        hi = part_start(rows, t + 1, team, 1)
        _dropout_rows(x, ldx, y, ldy, accumulate, lo, hi, cols, key, row_offset, threshold, scale)


# ---- the kind's kernels (see _ops.pxd): no parameters; the identity in eval mode

cdef inline void dropout_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* r = result_of(op, t)
    if t.training and op.p > 0:
        dropout_apply(<const floating*>x.value, x.ld, <floating*>r.value, r.ld, False,
                      t.batch, x.size, pass_key(op.key, t.passes), t.row_offset, op.p, nt)
    else:
        pass_gradient(<const floating*>x.value, x.ld, <floating*>r.value, r.ld, False,
                      t.batch, x.size, nt)


cdef inline void dropout_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                              int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    if not want_dx:
        return
    if t.training and op.p > 0:
        dropout_apply(<const floating*>y.grad, y.ld, <floating*>x.grad, x.ld, op.accumulate,
                      t.batch, x.size, pass_key(op.key, t.passes), t.row_offset, op.p, nt)
    else:
        pass_gradient(<const floating*>y.grad, y.ld, <floating*>x.grad, x.ld, op.accumulate,
                      t.batch, x.size, nt)
