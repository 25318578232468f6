# Pooling, as torch.nn's MaxPool1d/2d, AvgPool1d/2d and AdaptiveAvgPool2d(1): each
# output value is the largest (or the mean) of a window of its channel, over the window
# geometry of op.window (stride, padding, dilation for max pooling).
#
# Input and output are stored channels last (the planner sees to it): every loop runs over
# a pixel's channels, side by side.  Max pooling pads with -inf, so a padded position never
# wins, and its gradient goes to the first largest value of the window in scan order (row
# by row), NaN winning as in PyTorch: the forward keeps that position of every output
# value in the record's saved area (one int64 each), and the backward adds each output's
# gradient there.  Average pooling divides by the window's size (count_include_pad,
# PyTorch's default) or by its positions inside the input.
#
# Threads split output pixels in the forward and whole samples in the backward (windows
# that overlap add into the same input value, in a fixed order within the sample): the
# result is the same for any team.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.string cimport memset
from backprop._parallel cimport part_start, team_for
from backprop._ops cimport (Op, Tape, Slot, Window, pixel_stride, input_of, output_of,
                            result_of, dx_of)


cdef struct PoolShape:
    Py_ssize_t c, h, w, ld_in, ldx      # input: channels, size, sample and pixel distances
    Py_ssize_t ho, wo, ld_out, ldy      # output, likewise


cdef inline PoolShape pool_shape(const Op* op, const Tape* t) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    cdef PoolShape s
    s.c, s.h, s.w, s.ld_in, s.ldx = x.c, x.h, x.w, x.ld, pixel_stride(x)
    s.ho, s.wo, s.ld_out, s.ldy = y.h, y.w, y.ld, pixel_stride(y)
    return s


cdef inline Py_ssize_t _divisor(const Window* win, const PoolShape* s, Py_ssize_t oh,
                                Py_ssize_t ow, bint include_pad) noexcept nogil:
    cdef Py_ssize_t kh, kw, ih, iw, count = 0
    if include_pad:
        return win.kh * win.kw
    for kh in range(win.kh):
        ih = oh * win.sh - win.ph + kh * win.dh
        for kw in range(win.kw):
            iw = ow * win.sw - win.pw + kw * win.dw
            count += 0 <= ih < s.h and 0 <= iw < s.w
    return count


cdef inline void _pool_pixels(const floating* x, floating* y, Py_ssize_t* where,
                              const PoolShape* s, const Window* win, bint take_max,
                              bint include_pad, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    # Output pixels lo..hi of the batch (pixel = (sample, oh, ow)): the output pixel's
    # channels hold the running maximum (and `where` its offset in x), or the sum.
    cdef Py_ssize_t r, n, p, oh, ow, kh, kw, ih, iw, c, q, pixels = s.ho * s.wo
    cdef const floating* src
    cdef floating* dst
    cdef Py_ssize_t* at
    cdef floating v, scale
    for r in range(lo, hi):
        n, p = r // pixels, r % pixels
        oh, ow = p // s.wo, p % s.wo
        dst = y + n * s.ld_out + p * s.ldy
        at = where + r * s.c          # (read and written for max pooling only)
        for c in range(s.c):
            dst[c] = -INFINITY if take_max else 0
        if take_max:
            for c in range(s.c):
                at[c] = -1
        for kh in range(win.kh):
            ih = oh * win.sh - win.ph + kh * win.dh
            if ih < 0 or ih >= s.h:
                continue
            for kw in range(win.kw):
                iw = ow * win.sw - win.pw + kw * win.dw
                if iw < 0 or iw >= s.w:
                    continue
                q = n * s.ld_in + (ih * s.w + iw) * s.ldx
                src = x + q
                if take_max:
                    for c in range(s.c):
                        v = src[c]
                        if at[c] < 0 or v > dst[c] or v != v:
                            dst[c] = v
                            at[c] = q + c
                else:
                    for c in range(s.c):
                        dst[c] += src[c]
        if not take_max:
            scale = <floating>(1.0 / _divisor(win, s, oh, ow, include_pad))
            for c in range(s.c):
                dst[c] *= scale


cdef inline void _unpool_samples(const floating* dy, floating* dx, const Py_ssize_t* where,
                                 const PoolShape* s, const Window* win, bint take_max,
                                 bint include_pad, bint accumulate, Py_ssize_t size,
                                 Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    # Samples lo..hi: each output value's gradient to where its maximum was, or spread
    # evenly over its window.
    cdef Py_ssize_t n, oh, ow, kh, kw, ih, iw, c, r
    cdef const floating* g
    cdef floating* dst
    cdef floating share
    for n in range(lo, hi):
        if not accumulate:
            memset(dx + n * s.ld_in, 0, size * sizeof(floating))
        for oh in range(s.ho):
            for ow in range(s.wo):
                r = (n * s.ho + oh) * s.wo + ow
                g = dy + n * s.ld_out + (oh * s.wo + ow) * s.ldy
                if take_max:
                    for c in range(s.c):
                        dx[where[r * s.c + c]] += g[c]
                    continue
                share = <floating>(1.0 / _divisor(win, s, oh, ow, include_pad))
                for kh in range(win.kh):
                    ih = oh * win.sh - win.ph + kh * win.dh
                    if ih < 0 or ih >= s.h:
                        continue
                    for kw in range(win.kw):
                        iw = ow * win.sw - win.pw + kw * win.dw
                        if iw < 0 or iw >= s.w:
                            continue
                        dst = dx + n * s.ld_in + (ih * s.w + iw) * s.ldx
                        for c in range(s.c):
                            dst[c] += g[c] * share


cdef inline Py_ssize_t* _where(const Op* op, const Tape* t) noexcept nogil:
    # The saved offsets of the maxima: one int64 per output value (max pooling's saved
    # area, sized by its declaration; average pooling has none and never uses it).
    return <Py_ssize_t*>(t.saved + op.saved)


cdef inline void pool_forward(floating* kind, const Op* op, Tape* t, bint take_max,
                              int nt) noexcept nogil:
    cdef PoolShape s = pool_shape(op, t)
    cdef const floating* x = <const floating*>input_of(op, t).value
    cdef floating* y = <floating*>result_of(op, t).value
    cdef Py_ssize_t* where = _where(op, t)
    cdef Py_ssize_t tt, lo, hi, rows = t.batch * s.ho * s.wo
    cdef int team = team_for(rows * s.c * op.window.kh * op.window.kw, nt)
    if team == 1:
        _pool_pixels(x, y, where, &s, &op.window, take_max, op.include_pad, 0, rows)
        return
    for tt in prange(team, num_threads=team, schedule="static"):
        lo = part_start(rows, tt, team, 1)
        hi = part_start(rows, tt + 1, team, 1)
        _pool_pixels(x, y, where, &s, &op.window, take_max, op.include_pad, lo, hi)


cdef inline void pool_backward(floating* kind, const Op* op, Tape* t, bint want_dx,
                               bint take_max, int nt) noexcept nogil:
    cdef PoolShape s = pool_shape(op, t)
    cdef const Slot* xs = input_of(op, t)
    cdef const floating* dy = <const floating*>output_of(op, t).grad
    cdef floating* dx = dx_of(kind, op, t, want_dx)
    cdef const Py_ssize_t* where = _where(op, t)
    cdef Py_ssize_t tt, lo, hi
    cdef int team = team_for(t.batch * output_of(op, t).size * op.window.kh * op.window.kw, nt)
    if dx == NULL:
        return
    if team == 1:
        _unpool_samples(dy, dx, where, &s, &op.window, take_max, op.include_pad,
                        op.accumulate, xs.size, 0, t.batch)
        return
    for tt in prange(team, num_threads=team, schedule="static"):
        lo = part_start(t.batch, tt, team, 1)
        hi = part_start(t.batch, tt + 1, team, 1)
        _unpool_samples(dy, dx, where, &s, &op.window, take_max, op.include_pad,
                        op.accumulate, xs.size, lo, hi)


# ---- the kinds' kernels (see _ops.pxd): no parameters; window: op.window; max pooling
# saves one int64 per output value

cdef inline void max_pool_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    pool_forward(kind, op, t, True, nt)


cdef inline void max_pool_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                               int nt) noexcept nogil:
    pool_backward(kind, op, t, want_dx, True, nt)


cdef inline void avg_pool_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    pool_forward(kind, op, t, False, nt)


cdef inline void avg_pool_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                               int nt) noexcept nogil:
    pool_backward(kind, op, t, want_dx, False, nt)
