# Convolution (Conv1d and Conv2d, as torch.nn's: cross-correlation with stride, zero
# padding, dilation and groups), as matrix products on the GEMM.
#
# The output is stored channels last, so the whole batch's output is one matrix: a row per
# output pixel (sample, oh, ow), a column per output channel.  Row r of the input's
# "column matrix" (im2col) holds the values the kernel sees at that pixel, in the order of
# PyTorch's weight (C_in/groups, kh, kw), so with the weight as a (C_out, K) matrix:
#
#     forward:   out = col . W^T + bias          (the Dense layer's product, bias and
#                                                 activation fused into its write-back)
#     backward:  dW += dout^T . col,  dbias += column sums of dout,
#                dcol = dout . W, then each dcol value is added back to the input value
#                it was copied from (col2im).
#
# Group g uses input channels [g C_in/groups, ...) and output channels [g C_out/groups,
# ...): the same products on its columns.  The batch is taken a few samples at a time
# (CHUNK_BYTES of column matrix, a number of samples fixed by the shapes alone), so the
# column matrix stays in cache and the scratch stays small; the chunks' dW products
# accumulate in chunk order.  A 1x1 convolution with stride 1, no padding and one group
# on a channels-last input needs no column matrix: the input is one already.
#
# Threads: the GEMM splits each product's output (never its sum); im2col splits the
# column matrix's rows, col2im whole samples (overlapping windows add into the same input
# value, in a fixed order within the sample).  The result is the same for any team.
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset
from backprop._gemm cimport gemm, gemm_scratch_bytes
from backprop._activations cimport IDENTITY
from backprop._dense cimport column_sums
from backprop._parallel cimport part_start, team_for
from backprop._ops cimport (Op, Tape, Slot, Window, matrix_stride, input_of, output_of,
                            result_of, param_of, dx_of)

cdef enum:
    # Bytes of column matrix per chunk: several L2s' worth, so each chunk's GEMM repacks
    # the weight (C_out x K) rarely compared with the work on the chunk.
    CHUNK_BYTES = 4 << 20


cdef struct ConvShape:
    Py_ssize_t c_in, h, w                 # input sample (channels, height, width)
    Py_ssize_t sc, sh, sw                 # strides of the input's channel, row and column
    Py_ssize_t ld_in                      # distance between input samples
    Py_ssize_t c_out, ho, wo, ld_out      # output sample, channels last
    Py_ssize_t ldm                        # the output's row stride as a pixel x channel
                                          # matrix (ld_out itself when one pixel a sample)
    Py_ssize_t groups, cig, cog           # groups; input and output channels per group
    Py_ssize_t kk, k                      # kernel positions kh * kw; K = cig * kk
    Py_ssize_t chunk                      # samples per chunk


cdef inline ConvShape conv_shape(const Op* op, const Tape* t, Py_ssize_t itemsize) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    cdef ConvShape s
    s.c_in, s.h, s.w, s.ld_in = x.c, x.h, x.w, x.ld
    if x.channels_last:
        s.sc, s.sh, s.sw = 1, x.w * x.c, x.c
    else:
        s.sc, s.sh, s.sw = x.h * x.w, x.w, 1
    s.c_out, s.ho, s.wo, s.ld_out = y.c, y.h, y.w, y.ld
    s.ldm = matrix_stride(y)
    s.groups = op.window.groups
    s.cig, s.cog = s.c_in // s.groups, s.c_out // s.groups
    s.kk = op.window.kh * op.window.kw
    s.k = s.cig * s.kk
    s.chunk = max(1, CHUNK_BYTES // max(1, s.ho * s.wo * s.k * itemsize))
    return s


cdef inline bint direct(const Op* op, const Tape* t) noexcept nogil:
    """A 1x1 convolution the input's storage already is the column matrix of."""
    cdef const Window* win = &op.window
    return (win.kh == 1 and win.kw == 1 and win.sh == 1 and win.sw == 1 and win.ph == 0
            and win.pw == 0 and win.groups == 1 and t.slots[op.input].channels_last)


cdef inline void _im2col_rows(const floating* x, const ConvShape* s, const Window* win,
                              Py_ssize_t first_sample, Py_ssize_t c0, Py_ssize_t lo,
                              Py_ssize_t hi, floating* col) noexcept nogil:
    # Rows lo..hi of the chunk starting at sample first_sample, input channels c0..c0+cig.
    cdef Py_ssize_t r, n, p, oh, ow, kh, kw, ih, iw, c, pixels = s.ho * s.wo
    cdef floating* dst
    cdef const floating* src
    for r in range(lo, hi):
        n = first_sample + r // pixels
        p = r % pixels
        oh, ow = p // s.wo, p % s.wo
        dst = col + r * s.k
        for kh in range(win.kh):
            ih = oh * win.sh - win.ph + kh * win.dh
            for kw in range(win.kw):
                iw = ow * win.sw - win.pw + kw * win.dw
                if ih < 0 or ih >= s.h or iw < 0 or iw >= s.w:
                    for c in range(s.cig):
                        dst[c * s.kk + kh * win.kw + kw] = 0
                else:
                    src = x + n * s.ld_in + ih * s.sh + iw * s.sw + c0 * s.sc
                    for c in range(s.cig):
                        dst[c * s.kk + kh * win.kw + kw] = src[c * s.sc]


cdef inline void im2col(const floating* x, const ConvShape* s, const Window* win,
                        Py_ssize_t first_sample, Py_ssize_t samples, Py_ssize_t c0,
                        floating* col, int n_threads) noexcept nogil:
    """The column matrix (samples * ho * wo rows of K) of `samples` samples from
    first_sample, for the group whose input channels start at c0."""
    cdef Py_ssize_t t, lo, hi, rows = samples * s.ho * s.wo
    cdef int team = team_for(rows * s.k, n_threads)
    if team == 1:
        _im2col_rows(x, s, win, first_sample, c0, 0, rows, col)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(rows, t, team, 1)
        hi = part_start(rows, t + 1, team, 1)
        _im2col_rows(x, s, win, first_sample, c0, lo, hi, col)


cdef inline void _col2im_samples(const floating* col, const ConvShape* s, const Window* win,
                                 Py_ssize_t first_sample, Py_ssize_t c0, Py_ssize_t lo,
                                 Py_ssize_t hi, floating* dx) noexcept nogil:
    # Samples lo..hi of the chunk: every column-matrix value added to the input value it
    # was copied from, pixel by pixel in order.
    cdef Py_ssize_t n, oh, ow, kh, kw, ih, iw, c
    cdef const floating* src
    cdef floating* dst
    for n in range(lo, hi):
        for oh in range(s.ho):
            for ow in range(s.wo):
                src = col + ((n * s.ho + oh) * s.wo + ow) * s.k
                for kh in range(win.kh):
                    ih = oh * win.sh - win.ph + kh * win.dh
                    if ih < 0 or ih >= s.h:
                        continue
                    for kw in range(win.kw):
                        iw = ow * win.sw - win.pw + kw * win.dw
                        if iw < 0 or iw >= s.w:
                            continue
                        dst = dx + (first_sample + n) * s.ld_in + ih * s.sh + iw * s.sw + c0 * s.sc
                        for c in range(s.cig):
                            dst[c * s.sc] += src[c * s.kk + kh * win.kw + kw]


cdef inline void col2im(const floating* col, const ConvShape* s, const Window* win,
                        Py_ssize_t first_sample, Py_ssize_t samples, Py_ssize_t c0,
                        floating* dx, int n_threads) noexcept nogil:
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(samples * s.ho * s.wo * s.k, n_threads)
    if team == 1:
        _col2im_samples(col, s, win, first_sample, c0, 0, samples, dx)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(samples, t, team, 1)
        hi = part_start(samples, t + 1, team, 1)
        _col2im_samples(col, s, win, first_sample, c0, lo, hi, dx)


cdef inline void _zero_samples(floating* dx, Py_ssize_t ld, Py_ssize_t size, Py_ssize_t lo,
                               Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t n
    for n in range(lo, hi):
        memset(dx + n * ld, 0, size * sizeof(floating))


cdef inline Py_ssize_t _gemm_part(Py_ssize_t gemm_bytes) noexcept nogil:
    # The GEMM's packing scratch comes first in Tape.scratch, the column matrix after it.
    return (gemm_bytes + 63) // 64 * 64


cdef inline Py_ssize_t _gemm_need(const ConvShape* s, Py_ssize_t batch, int nt,
                                  Py_ssize_t itemsize) noexcept nogil:
    cdef Py_ssize_t rows = min(batch, s.chunk) * s.ho * s.wo
    return max(gemm_scratch_bytes(rows, s.cog, s.k, nt, itemsize),
               gemm_scratch_bytes(s.cog, s.k, rows, nt, itemsize),
               gemm_scratch_bytes(rows, s.k, s.cog, nt, itemsize))


# ---- the kind's kernels (see _ops.pxd): parameters 0 = weight (C_out, C_in/groups, kh,
# kw), 1 = bias (C_out); window: op.window

cdef inline Py_ssize_t conv_scratch(const Op* op, const Tape* t, Py_ssize_t batch, int nt,
                                    Py_ssize_t itemsize) noexcept nogil:
    cdef ConvShape s = conv_shape(op, t, itemsize)
    cdef Py_ssize_t col = 0 if direct(op, t) else min(batch, s.chunk) * s.ho * s.wo * s.k * itemsize
    return _gemm_part(_gemm_need(&s, batch, nt, itemsize)) + col


cdef inline void conv_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef ConvShape s = conv_shape(op, t, sizeof(floating))
    cdef const floating* x = <const floating*>input_of(op, t).value
    cdef const Slot* r = result_of(op, t)
    cdef const floating* weight = param_of(kind, t.params, op, 0)
    cdef const floating* bias = param_of(kind, t.params, op, 1)
    cdef char* gemm_scratch = <char*>t.scratch
    cdef floating* col = <floating*>(gemm_scratch + _gemm_part(_gemm_need(&s, t.batch, nt,
                                                                            sizeof(floating))))
    cdef Py_ssize_t n0, samples, rows, g
    cdef floating* out
    if direct(op, t):
        gemm(t.batch * s.ho * s.wo, s.c_out, s.c_in, x, matrix_stride(input_of(op, t)), False,
             weight, s.c_in, True, <floating*>r.value, s.ldm, False, bias, op.fused, nt,
             gemm_scratch)
        return
    n0 = 0
    while n0 < t.batch:
        samples = min(s.chunk, t.batch - n0)
        rows = samples * s.ho * s.wo
        out = <floating*>r.value + n0 * s.ld_out
        for g in range(s.groups):
            im2col(x, &s, &op.window, n0, samples, g * s.cig, col, nt)
            gemm(rows, s.cog, s.k, col, s.k, False, weight + g * s.cog * s.k, s.k, True,
                 out + g * s.cog, s.ldm, False, bias + g * s.cog if bias != NULL else NULL,
                 op.fused, nt, gemm_scratch)
        n0 += samples


cdef inline void conv_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                           int nt) noexcept nogil:
    cdef ConvShape s = conv_shape(op, t, sizeof(floating))
    cdef const Slot* xs = input_of(op, t)
    cdef const floating* x = <const floating*>xs.value
    cdef const floating* dy_all = <const floating*>output_of(op, t).grad
    cdef const floating* weight = param_of(kind, t.params, op, 0)
    cdef floating* weight_grad = param_of(kind, t.grads, op, 0)
    cdef floating* bias_grad = param_of(kind, t.grads, op, 1)
    cdef floating* dx = dx_of(kind, op, t, want_dx)
    cdef char* gemm_scratch = <char*>t.scratch
    cdef floating* col = <floating*>(gemm_scratch + _gemm_part(_gemm_need(&s, t.batch, nt,
                                                                            sizeof(floating))))
    cdef Py_ssize_t n0, samples, rows, g, tt, lo, hi, all_rows = t.batch * s.ho * s.wo
    cdef const floating* dy
    cdef int team
    if bias_grad != NULL:
        team = team_for(all_rows * s.c_out, nt)
        if team == 1:
            column_sums(dy_all, s.ldm, all_rows, 0, s.c_out, bias_grad)
        else:
            for tt in prange(team, num_threads=team, schedule="static"):
                lo = part_start(s.c_out, tt, team, 16)
                hi = part_start(s.c_out, tt + 1, team, 16)
                column_sums(dy_all, s.ldm, all_rows, lo, hi, bias_grad)
    if direct(op, t):
        gemm(s.c_out, s.c_in, all_rows, dy_all, s.ldm, True, x, matrix_stride(xs), False,
             weight_grad, s.c_in, True, NULL, IDENTITY, nt, gemm_scratch)
        if dx != NULL:
            gemm(all_rows, s.c_in, s.c_out, dy_all, s.ldm, False, weight, s.c_in, False, dx,
                 matrix_stride(xs), op.accumulate, NULL, IDENTITY, nt, gemm_scratch)
        return
    n0 = 0
    while n0 < t.batch:
        samples = min(s.chunk, t.batch - n0)
        rows = samples * s.ho * s.wo
        dy = dy_all + n0 * s.ld_out
        if dx != NULL and not op.accumulate:
            team = team_for(samples * xs.size, nt)
            if team == 1:
                _zero_samples(dx, s.ld_in, xs.size, n0, n0 + samples)
            else:
                for tt in prange(team, num_threads=team, schedule="static"):
                    lo = part_start(samples, tt, team, 1)
                    hi = part_start(samples, tt + 1, team, 1)
                    _zero_samples(dx, s.ld_in, xs.size, n0 + lo, n0 + hi)
        for g in range(s.groups):
            im2col(x, &s, &op.window, n0, samples, g * s.cig, col, nt)
            gemm(s.cog, s.k, rows, dy + g * s.cog, s.ldm, True, col, s.k, False,
                 weight_grad + g * s.cog * s.k, s.k, True, NULL, IDENTITY, nt, gemm_scratch)
            if dx != NULL:      # dcol overwrites col, which the dW product has used
                gemm(rows, s.k, s.cog, dy + g * s.cog, s.ldm, False,
                     weight + g * s.cog * s.k, s.k, False, col, s.k, False, NULL, IDENTITY,
                     nt, gemm_scratch)
                col2im(col, &s, &op.window, n0, samples, g * s.cig, dx, nt)
        n0 += samples
