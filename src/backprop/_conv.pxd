# Convolution (Conv1d and Conv2d, as torch.nn's: cross-correlation with stride, zero
# padding, dilation and groups), as matrix products on the GEMM.
#
# Input and output are stored channels last (the planner sees to it), so the whole batch
# is a matrix with a row per pixel and a column per channel.  Row r of the input's
# "column matrix" (im2col) holds what the kernel sees at output pixel r: for each kernel
# position (kh, kw) the pixel's input channels, which lie side by side, so each is one
# copy.  With the weight as a (C_out, K) matrix in that order (kh, kw, channel):
#
#     forward:   out = col . W^T + bias          (the Dense layer's product, bias and
#                                                 activation fused into its write-back)
#     backward:  dW += dout^T . col,  dbias += column sums of dout,
#                dcol = dout . W, then each dcol value is added back to the input value
#                it was copied from (col2im).
#
# PyTorch's weight is (C_out, C_in/groups, kh, kw): a copy in the kernel's order is made
# in the scratch for each pass (the weights are small next to the products), and dW is
# added back in PyTorch's order at the end; with one kernel position or one input channel
# per group the two orders are the same and the weight is used as it is.  Group g uses
# input channels [g C_in/groups, ...) and output channels [g C_out/groups, ...): the same
# products on its columns.  The batch is taken a few samples at a time (CHUNK_BYTES of
# column matrix, a number of samples fixed by the shapes alone), so the column matrix
# stays in cache and the scratch small; the chunks' dW products accumulate in chunk
# order.  A 1x1 convolution with stride 1, no padding and one group needs no column
# matrix: the input is one already.  A single-channel input (a grey image: the first
# layer of LeNet) builds the column matrix transposed, a row per kernel position: each
# such row of an output line is then a copy of an input row (a run of a few values per
# pixel would be far slower), and the products read it through their transpose flags.
#
# Threads: the GEMM splits each product's output (never its sum); im2col splits the
# column matrix's rows, col2im whole samples (overlapping windows add into the same input
# value, in a fixed order within the sample).  The result is the same for any team.
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset
from backprop._gemm cimport gemm, gemm_scratch_bytes
from backprop._activations cimport IDENTITY
from backprop._dense cimport add_column_sums
from backprop._parallel cimport part_start, team_for
from backprop._ops cimport (Op, Tape, Slot, Window, pixel_stride, input_of, output_of,
                            result_of, param_of, dx_of, copy_values, add_values)

cdef enum:
    # Bytes of column matrix per chunk: several L2s' worth, so each chunk's GEMM repacks
    # the weight (C_out x K) rarely compared with the work on the chunk.
    CHUNK_BYTES = 4 << 20


cdef struct ConvShape:
    Py_ssize_t c_in, h, w, ld_in, ldx     # input: sample, distance between samples, and
                                          # between pixels (pixel_stride)
    Py_ssize_t c_out, ho, wo, ld_out, ldm # output, likewise
    Py_ssize_t groups, cig, cog           # groups; input and output channels per group
    Py_ssize_t kk, k                      # kernel positions kh * kw; K = kk * cig
    Py_ssize_t chunk                      # samples per chunk
    bint permute                          # the kernel's weight order differs from PyTorch's
    bint transposed                       # single-channel input: the column matrix is built
                                          # K x rows (see the header)


cdef inline ConvShape conv_shape(const Op* op, const Tape* t, Py_ssize_t itemsize) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    cdef ConvShape s
    s.c_in, s.h, s.w, s.ld_in, s.ldx = x.c, x.h, x.w, x.ld, pixel_stride(x)
    s.c_out, s.ho, s.wo, s.ld_out, s.ldm = y.c, y.h, y.w, y.ld, pixel_stride(y)
    s.groups = op.window.groups
    s.cig, s.cog = s.c_in // s.groups, s.c_out // s.groups
    s.kk = op.window.kh * op.window.kw
    s.k = s.cig * s.kk
    s.chunk = max(1, CHUNK_BYTES // max(1, s.ho * s.wo * s.k * itemsize))
    s.permute = s.kk > 1 and s.cig > 1
    s.transposed = s.c_in == 1
    return s


cdef inline bint direct(const Op* op) noexcept nogil:
    """A 1x1 convolution whose input already is its column matrix."""
    cdef const Window* win = &op.window
    return (win.kh == 1 and win.kw == 1 and win.sh == 1 and win.sw == 1 and win.ph == 0
            and win.pw == 0 and win.groups == 1)


cdef inline void reorder_weight(const floating* src, floating* dst, const ConvShape* s,
                                bint to_kernel, bint accumulate) noexcept nogil:
    """dst = src (+=) from PyTorch's order (C_out, cig, kk) to the kernel's (C_out, kk,
    cig), or back (to_kernel False)."""
    cdef Py_ssize_t o, c, q, a, b
    for o in range(s.c_out):
        for c in range(s.cig):
            for q in range(s.kk):
                a = o * s.k + c * s.kk + q          # PyTorch's order
                b = o * s.k + q * s.cig + c         # the kernel's
                if to_kernel:
                    dst[b] = src[a]
                elif accumulate:
                    dst[a] += src[b]
                else:
                    dst[a] = src[b]


cdef inline void _window_runs(const ConvShape* s, const Window* win, Py_ssize_t* inner_lo,
                              Py_ssize_t* inner_hi) noexcept nogil:
    """The output columns ow whose kernel row lies wholly inside the input row (the
    others reach into the padding): ow in [inner_lo, inner_hi)."""
    cdef Py_ssize_t reach = win.dw * (win.kw - 1) + 1
    inner_lo[0] = min(s.wo, (win.pw + win.sw - 1) // win.sw)
    inner_hi[0] = inner_lo[0]
    if s.w + win.pw >= reach:       # (C division truncates: only divide what is >= 0)
        inner_hi[0] = max(inner_lo[0], min(s.wo, (s.w + win.pw - reach) // win.sw + 1))


cdef inline void _run_at(const floating* row, const ConvShape* s, const Window* win,
                         Py_ssize_t ow, Py_ssize_t c0, floating* dst) noexcept nogil:
    # One output pixel's kernel row from input row `row` (kw positions of cig channels),
    # zero where it reaches past the row's ends.
    cdef Py_ssize_t kw, iw, i
    for kw in range(win.kw):
        iw = ow * win.sw - win.pw + kw * win.dw
        if 0 <= iw < s.w:
            copy_values(dst + kw * s.cig, row + iw * s.ldx + c0, s.cig)
        else:
            for i in range(s.cig):
                dst[kw * s.cig + i] = 0


cdef inline void _im2col_lines(const floating* x, const ConvShape* s, const Window* win,
                               Py_ssize_t first_sample, Py_ssize_t c0, Py_ssize_t lo,
                               Py_ssize_t hi, floating* col) noexcept nogil:
    # Output lines lo..hi of the chunk (line = (sample, oh): wo rows of the column matrix),
    # input channels c0..c0+cig.  Inside the input, with one group and no dilation
    # across, a kernel row's values (kw, channel) lie side by side in the input row: one
    # run of kw * cig values per pixel.
    cdef Py_ssize_t line, n, oh, ow, kh, ih, i, inner_lo, inner_hi
    cdef Py_ssize_t run = win.kw * s.cig, step = win.sw * s.cig
    cdef bint runs = win.dw == 1 and s.cig == s.c_in
    cdef const floating* row
    cdef const floating* src
    cdef floating* dst
    _window_runs(s, win, &inner_lo, &inner_hi)
    if not runs:
        inner_lo = inner_hi = s.wo              # every pixel through _run_at
    for line in range(lo, hi):
        n, oh = first_sample + line // s.ho, line % s.ho
        for kh in range(win.kh):
            ih = oh * win.sh - win.ph + kh * win.dh
            dst = col + line * s.wo * s.k + kh * run
            if ih < 0 or ih >= s.h:
                for ow in range(s.wo):
                    for i in range(run):
                        dst[ow * s.k + i] = 0
                continue
            row = x + n * s.ld_in + ih * s.w * s.ldx
            for ow in range(inner_lo):
                _run_at(row, s, win, ow, c0, dst + ow * s.k)
            src = row + (inner_lo * win.sw - win.pw) * s.ldx
            for ow in range(inner_lo, inner_hi):
                copy_values(dst + ow * s.k, src, run)
                src += step
            for ow in range(inner_hi, s.wo):
                _run_at(row, s, win, ow, c0, dst + ow * s.k)


cdef inline void im2col(const floating* x, const ConvShape* s, const Window* win,
                        Py_ssize_t first_sample, Py_ssize_t samples, Py_ssize_t c0,
                        floating* col, int n_threads) noexcept nogil:
    """The column matrix (samples * ho * wo rows of K) of `samples` samples from
    first_sample, for the group whose input channels start at c0."""
    cdef Py_ssize_t t, lo, hi, lines = samples * s.ho
    cdef int team = team_for(lines * s.wo * s.k, n_threads)
    if team == 1:
        _im2col_lines(x, s, win, first_sample, c0, 0, lines, col)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(lines, t, team, 1)
        hi = part_start(lines, t + 1, team, 1)
        _im2col_lines(x, s, win, first_sample, c0, lo, hi, col)


cdef inline void _unrun_at(const floating* src, const ConvShape* s, const Window* win,
                           Py_ssize_t ow, Py_ssize_t c0, floating* row) noexcept nogil:
    # _run_at backwards: one pixel's kernel row of dcol added into input row `row`.
    cdef Py_ssize_t kw, iw, i
    for kw in range(win.kw):
        iw = ow * win.sw - win.pw + kw * win.dw
        if 0 <= iw < s.w:
            add_values(row + iw * s.ldx + c0, src + kw * s.cig, s.cig)


cdef inline void _col2im_samples(const floating* col, const ConvShape* s, const Window* win,
                                 Py_ssize_t first_sample, Py_ssize_t c0, Py_ssize_t lo,
                                 Py_ssize_t hi, floating* dx) noexcept nogil:
    # Samples lo..hi of the chunk: every column-matrix value added to the input value it
    # was copied from, pixel by pixel in order (runs as in _im2col_lines).
    cdef Py_ssize_t n, oh, ow, kh, ih, i, inner_lo, inner_hi
    cdef Py_ssize_t run = win.kw * s.cig, step = win.sw * s.cig
    cdef bint runs = win.dw == 1 and s.cig == s.c_in
    cdef const floating* src
    cdef floating* row
    cdef floating* dst
    _window_runs(s, win, &inner_lo, &inner_hi)
    if not runs:
        inner_lo = inner_hi = s.wo
    for n in range(lo, hi):
        for oh in range(s.ho):
            for kh in range(win.kh):
                ih = oh * win.sh - win.ph + kh * win.dh
                if ih < 0 or ih >= s.h:
                    continue
                src = col + (n * s.ho + oh) * s.wo * s.k + kh * run
                row = dx + (first_sample + n) * s.ld_in + ih * s.w * s.ldx
                for ow in range(inner_lo):
                    _unrun_at(src + ow * s.k, s, win, ow, c0, row)
                dst = row + (inner_lo * win.sw - win.pw) * s.ldx
                for ow in range(inner_lo, inner_hi):
                    add_values(dst, src + ow * s.k, run)
                    dst += step
                for ow in range(inner_hi, s.wo):
                    _unrun_at(src + ow * s.k, s, win, ow, c0, row)


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


cdef inline void _valid(Py_ssize_t offset, Py_ssize_t step, Py_ssize_t size, Py_ssize_t count,
                        Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    """The i in [lo, hi) of range(count) whose position i * step + offset lies in
    [0, size).  (C division truncates: only non-negative numbers are divided.)"""
    lo[0] = 0 if offset >= 0 else min(count, (-offset + step - 1) // step)
    hi[0] = 0 if size - 1 - offset < 0 else min(count, (size - 1 - offset) // step + 1)
    hi[0] = max(lo[0], hi[0])


cdef inline void _im2col_t_lines(const floating* x, const ConvShape* s, const Window* win,
                                 Py_ssize_t first_sample, Py_ssize_t lo, Py_ssize_t hi,
                                 floating* col, Py_ssize_t ldc) noexcept nogil:
    # Output lines lo..hi of the chunk, one input channel: kernel position q's row of the
    # transposed column matrix holds, for each pixel of the line, the input value at q.
    cdef Py_ssize_t line, n, oh, kh, kw, ih, ow, first, last
    cdef const floating* row
    cdef floating* dst
    for line in range(lo, hi):
        n, oh = first_sample + line // s.ho, line % s.ho
        for kh in range(win.kh):
            ih = oh * win.sh - win.ph + kh * win.dh
            for kw in range(win.kw):
                dst = col + (kh * win.kw + kw) * ldc + line * s.wo
                if ih < 0 or ih >= s.h:
                    _valid(0, 1, 0, s.wo, &first, &last)        # no pixel
                else:
                    _valid(kw * win.dw - win.pw, win.sw, s.w, s.wo, &first, &last)
                for ow in range(first):
                    dst[ow] = 0
                if last > first:
                    row = x + n * s.ld_in + (ih * s.w + first * win.sw + kw * win.dw - win.pw) * s.ldx
                    if win.sw * s.ldx == 1:
                        copy_values(dst + first, row, last - first)
                    else:
                        for ow in range(last - first):
                            dst[first + ow] = row[ow * win.sw * s.ldx]
                for ow in range(last, s.wo):
                    dst[ow] = 0


cdef inline void im2col_t(const floating* x, const ConvShape* s, const Window* win,
                          Py_ssize_t first_sample, Py_ssize_t samples, floating* col,
                          int n_threads) noexcept nogil:
    """The transposed column matrix (K rows of samples * ho * wo) of a one-channel input."""
    cdef Py_ssize_t t, lo, hi, lines = samples * s.ho, ldc = samples * s.ho * s.wo
    cdef int team = team_for(lines * s.wo * s.k, n_threads)
    if team == 1:
        _im2col_t_lines(x, s, win, first_sample, 0, lines, col, ldc)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(lines, t, team, 1)
        hi = part_start(lines, t + 1, team, 1)
        _im2col_t_lines(x, s, win, first_sample, lo, hi, col, ldc)


cdef inline void _col2im_t_samples(const floating* col, Py_ssize_t ldc, const ConvShape* s,
                                   const Window* win, Py_ssize_t first_sample, Py_ssize_t lo,
                                   Py_ssize_t hi, floating* dx) noexcept nogil:
    # _im2col_t_lines backwards, samples lo..hi: each value added to the input value it
    # was copied from, in a fixed order within the sample.
    cdef Py_ssize_t n, oh, kh, kw, ih, ow, first, last
    cdef const floating* src
    cdef floating* row
    for n in range(lo, hi):
        for oh in range(s.ho):
            for kh in range(win.kh):
                ih = oh * win.sh - win.ph + kh * win.dh
                if ih < 0 or ih >= s.h:
                    continue
                for kw in range(win.kw):
                    _valid(kw * win.dw - win.pw, win.sw, s.w, s.wo, &first, &last)
                    if last <= first:
                        continue
                    src = col + (kh * win.kw + kw) * ldc + (n * s.ho + oh) * s.wo + first
                    row = (dx + (first_sample + n) * s.ld_in
                           + (ih * s.w + first * win.sw + kw * win.dw - win.pw) * s.ldx)
                    if win.sw * s.ldx == 1:
                        add_values(row, src, last - first)
                    else:
                        for ow in range(last - first):
                            row[ow * win.sw * s.ldx] += src[ow]


cdef inline void col2im_t(const floating* col, const ConvShape* s, const Window* win,
                          Py_ssize_t first_sample, Py_ssize_t samples, floating* dx,
                          int n_threads) noexcept nogil:
    cdef Py_ssize_t t, lo, hi, ldc = samples * s.ho * s.wo
    cdef int team = team_for(samples * s.ho * s.wo * s.k, n_threads)
    if team == 1:
        _col2im_t_samples(col, ldc, s, win, first_sample, 0, samples, dx)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(samples, t, team, 1)
        hi = part_start(samples, t + 1, team, 1)
        _col2im_t_samples(col, ldc, s, win, first_sample, lo, hi, dx)


cdef inline void _zero_samples(floating* dx, Py_ssize_t ld, Py_ssize_t size, Py_ssize_t lo,
                               Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t n
    for n in range(lo, hi):
        memset(dx + n * ld, 0, size * sizeof(floating))


cdef inline Py_ssize_t _aligned(Py_ssize_t nbytes) noexcept nogil:
    return (nbytes + 63) // 64 * 64


cdef struct ConvScratch:
    char* gemm            # the GEMM's packing scratch
    void* weight          # the weight in the kernel's order (when s.permute)
    void* weight_grad     # its gradient, before it is added in PyTorch's order
    void* col             # the column matrix of one chunk


cdef inline Py_ssize_t _chunk_need(const ConvShape* s, Py_ssize_t samples, int nt,
                                   Py_ssize_t itemsize) noexcept nogil:
    cdef Py_ssize_t rows = samples * s.ho * s.wo
    if samples <= 0:
        return 0
    return max(gemm_scratch_bytes(rows, s.cog, s.k, nt, itemsize),
               gemm_scratch_bytes(s.cog, s.k, rows, nt, itemsize),
               gemm_scratch_bytes(rows, s.k, s.cog, nt, itemsize),
               gemm_scratch_bytes(s.k, rows, s.cog, nt, itemsize))   # dcol transposed


cdef inline Py_ssize_t _gemm_need(const ConvShape* s, Py_ssize_t batch, int nt,
                                  Py_ssize_t itemsize) noexcept nogil:
    """The products' packing scratch for every chunk of the batch: the full chunks and
    the last, shorter one, which may need more (dW's product sums over the chunk's rows,
    and fewer rows can mean a longer k block: 4 x 256 rows is one block of 1024, 14 x 256
    four of 896)."""
    return max(_chunk_need(s, min(batch, s.chunk), nt, itemsize),
               _chunk_need(s, batch % s.chunk, nt, itemsize))


cdef inline Py_ssize_t _weights_bytes(const ConvShape* s, Py_ssize_t itemsize) noexcept nogil:
    return _aligned(s.c_out * s.k * itemsize) if s.permute else 0


cdef inline ConvScratch _carve(void* scratch, const ConvShape* s, Py_ssize_t batch, int nt,
                               Py_ssize_t itemsize) noexcept nogil:
    """Tape.scratch's parts, in the order conv_scratch counts them."""
    cdef ConvScratch part
    part.gemm = <char*>scratch
    part.weight = part.gemm + _aligned(_gemm_need(s, batch, nt, itemsize))
    part.weight_grad = <char*>part.weight + _weights_bytes(s, itemsize)
    part.col = <char*>part.weight_grad + _weights_bytes(s, itemsize)
    return part


# ---- the kind's kernels (see _ops.pxd): parameters 0 = weight (C_out, C_in/groups, kh,
# kw), 1 = bias (C_out); window: op.window

cdef inline Py_ssize_t conv_scratch(const Op* op, const Tape* t, Py_ssize_t batch, int nt,
                                    Py_ssize_t itemsize) noexcept nogil:
    cdef ConvShape s = conv_shape(op, t, itemsize)
    cdef Py_ssize_t col = 0 if direct(op) else min(batch, s.chunk) * s.ho * s.wo * s.k * itemsize
    return _aligned(_gemm_need(&s, batch, nt, itemsize)) + 2 * _weights_bytes(&s, itemsize) + col


cdef inline void conv_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef ConvShape s = conv_shape(op, t, sizeof(floating))
    cdef ConvScratch part = _carve(t.scratch, &s, t.batch, nt, sizeof(floating))
    cdef const floating* x = <const floating*>input_of(op, t).value
    cdef floating* out = <floating*>result_of(op, t).value
    cdef const floating* weight = param_of(kind, t.params, op, 0)
    cdef const floating* bias = param_of(kind, t.params, op, 1)
    cdef floating* col = <floating*>part.col
    cdef Py_ssize_t n0, samples, rows, g
    if direct(op):
        gemm(t.batch * s.ho * s.wo, s.c_out, s.c_in, x, s.ldx, False, weight, s.c_in, True,
             out, s.ldm, False, bias, op.fused, t.products, nt, part.gemm)
        return
    if s.permute:
        reorder_weight(weight, <floating*>part.weight, &s, True, False)
        weight = <floating*>part.weight
    n0 = 0
    while n0 < t.batch:
        samples = min(s.chunk, t.batch - n0)
        rows = samples * s.ho * s.wo
        if s.transposed:        # (one channel: one group)
            im2col_t(x, &s, &op.window, n0, samples, col, nt)
            gemm(rows, s.cog, s.k, col, rows, True, weight, s.k, True, out + n0 * s.ld_out,
                 s.ldm, False, bias, op.fused, t.products, nt, part.gemm)
            n0 += samples
            continue
        for g in range(s.groups):
            im2col(x, &s, &op.window, n0, samples, g * s.cig, col, nt)
            gemm(rows, s.cog, s.k, col, s.k, False, weight + g * s.cog * s.k, s.k, True,
                 out + n0 * s.ld_out + g * s.cog, s.ldm, False,
                 bias + g * s.cog if bias != NULL else NULL, op.fused, t.products, nt, part.gemm)
        n0 += samples


cdef inline void conv_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                           int nt) noexcept nogil:
    cdef ConvShape s = conv_shape(op, t, sizeof(floating))
    cdef ConvScratch part = _carve(t.scratch, &s, t.batch, nt, sizeof(floating))
    cdef const Slot* xs = input_of(op, t)
    cdef const floating* x = <const floating*>xs.value
    cdef const floating* dy_all = <const floating*>output_of(op, t).grad
    cdef const floating* weight = param_of(kind, t.params, op, 0)
    cdef floating* weight_grad = param_of(kind, t.grads, op, 0)
    cdef floating* bias_grad = param_of(kind, t.grads, op, 1)
    cdef floating* dx = dx_of(kind, op, t, want_dx)
    cdef floating* col = <floating*>part.col
    cdef floating* dw = weight_grad
    cdef Py_ssize_t n0, samples, rows, g, tt, lo, hi, all_rows = t.batch * s.ho * s.wo
    cdef const floating* dy
    cdef int team
    if bias_grad != NULL:
        add_column_sums(dy_all, s.ldm, all_rows, s.c_out, bias_grad, nt)
    if direct(op):
        gemm(s.c_out, s.c_in, all_rows, dy_all, s.ldm, True, x, s.ldx, False, weight_grad,
             s.c_in, True, NULL, IDENTITY, t.products, nt, part.gemm)
        if dx != NULL:
            gemm(all_rows, s.c_in, s.c_out, dy_all, s.ldm, False, weight, s.c_in, False, dx,
                 s.ldx, op.accumulate, NULL, IDENTITY, t.products, nt, part.gemm)
        return
    if s.permute:
        reorder_weight(weight, <floating*>part.weight, &s, True, False)
        weight = <floating*>part.weight
        dw = <floating*>part.weight_grad
        memset(dw, 0, s.c_out * s.k * sizeof(floating))
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
        if s.transposed:
            im2col_t(x, &s, &op.window, n0, samples, col, nt)
            gemm(s.cog, s.k, rows, dy, s.ldm, True, col, rows, True, dw, s.k, True, NULL,
                 IDENTITY, t.products, nt, part.gemm)
            if dx != NULL:      # dcol (transposed) = W^T dy^T overwrites col
                gemm(s.k, rows, s.cog, weight, s.k, True, dy, s.ldm, True, col, rows, False,
                     NULL, IDENTITY, t.products, nt, part.gemm)
                col2im_t(col, &s, &op.window, n0, samples, dx, nt)
            n0 += samples
            continue
        for g in range(s.groups):
            im2col(x, &s, &op.window, n0, samples, g * s.cig, col, nt)
            gemm(s.cog, s.k, rows, dy + g * s.cog, s.ldm, True, col, s.k, False,
                 dw + g * s.cog * s.k, s.k, True, NULL, IDENTITY, t.products, nt, part.gemm)
            if dx != NULL:      # dcol overwrites col, which the dW product has used
                gemm(rows, s.k, s.cog, dy + g * s.cog, s.ldm, False,
                     weight + g * s.cog * s.k, s.k, False, col, s.k, False, NULL, IDENTITY,
                     t.products, nt, part.gemm)
                col2im(col, &s, &op.window, n0, samples, g * s.cig, dx, nt)
        n0 += samples
    if s.permute:
        reorder_weight(dw, weight_grad, &s, False, True)
