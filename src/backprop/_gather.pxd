# Rows of a user's array copied into a network's buffer, each value checked on the way.
#
# The engine (_copying.pxi) checks the array's type, shape and dtype and the row indices;
# this copies the values, in any strides, converting to the buffer's dtype, and finds the
# first row holding NaN, Inf or a value too large for that dtype.  It runs once per
# batch over the data (a shuffled gather of a large dataset waits on memory), so it is a
# kernel of each SIMD level, threaded.
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from backprop._parallel cimport part_start, team_for


ctypedef fused destination:
    float
    double


cdef inline bint _copy_row(const floating* row, Py_ssize_t step, destination* out,
                           Py_ssize_t cols) noexcept nogil:
    """out[j] = row[j * step]; True if every value is finite once converted (1e39 is a
    finite float64 but an infinite float32).  v - v is 0 for finite v and NaN for NaN and
    +-Inf; and-ing integer flags (not summing floats) keeps the loop free of a serial
    dependency, so the compiler vectorises it."""
    cdef Py_ssize_t j
    cdef int finite = 1
    if step == 1:
        for j in range(cols):
            out[j] = <destination>row[j]
            finite &= out[j] - out[j] == 0
    else:
        for j in range(cols):
            out[j] = <destination>row[j * step]
            finite &= out[j] - out[j] == 0
    return finite


cdef inline Py_ssize_t _copy_part(floating* kind, const char* src, Py_ssize_t s0, Py_ssize_t s1,
                           const int64_t* index, char* dst, Py_ssize_t ld, Py_ssize_t lo,
                           Py_ssize_t hi, Py_ssize_t cols, bint dst64) noexcept nogil:
    # Rows lo..hi; returns the first source row holding a non-finite value, or -1.
    cdef Py_ssize_t i, r, step = s1 // <Py_ssize_t>sizeof(floating)
    cdef const floating* row
    cdef bint finite
    for i in range(lo, hi):
        r = index[i] if index != NULL else i
        row = <const floating*>(src + r * s0)
        if s1 % <Py_ssize_t>sizeof(floating) != 0:     # unaligned strides: element by element
            finite = _copy_unaligned(row, s1, dst, ld, i, cols, dst64)
        elif dst64:
            finite = _copy_row(row, step, (<double*>dst) + i * ld, cols)
        else:
            finite = _copy_row(row, step, (<float*>dst) + i * ld, cols)
        if not finite:
            return r
    return -1


cdef inline Py_ssize_t gather_rows(floating* kind, const char* src, Py_ssize_t s0, Py_ssize_t s1,
                              const int64_t* index, char* dst, Py_ssize_t ld,
                              Py_ssize_t rows, Py_ssize_t cols, bint dst64,
                              int n_threads) noexcept nogil:
    # The first source row holding a non-finite value, or -1.  Gathering shuffled rows
    # of a large dataset waits on memory, so threads split the rows; if any part meets a
    # bad value, one thread scans again to name the first bad row.
    cdef Py_ssize_t t, lo, hi
    cdef int bad = 0, team = team_for(rows * cols, n_threads)
    if team == 1:
        return _copy_part(kind, src, s0, s1, index, dst, ld, 0, rows, cols, dst64)
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(rows, t, team, 1)
        hi = part_start(rows, t + 1, team, 1)
        bad += _copy_part(kind, src, s0, s1, index, dst, ld, lo, hi, cols, dst64) >= 0
    if bad == 0:
        return -1
    return _copy_part(kind, src, s0, s1, index, dst, ld, 0, rows, cols, dst64)


cdef inline bint _copy_unaligned(const floating* row, Py_ssize_t s1, char* dst, Py_ssize_t ld,
                          Py_ssize_t i, Py_ssize_t cols, bint dst64) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating v
    cdef int finite = 1
    cdef float v32
    for j in range(cols):
        memcpy(&v, <const char*>row + j * s1, sizeof(floating))
        if dst64:
            (<double*>dst)[i * ld + j] = v
            finite &= v - v == 0
        else:
            v32 = <float>v
            (<float*>dst)[i * ld + j] = v32
            finite &= v32 - v32 == 0
    return finite
