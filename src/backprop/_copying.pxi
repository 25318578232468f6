# --------------------------------------------------------------------------- validation

cdef str _describe(object a):
    return f"array of shape {a.shape} and dtype {a.dtype}"


cdef cnp.ndarray _as_float_array(object a, str name, int ndim):
    """Return `a` as an ndarray of native-endian float32/float64, or raise a TypeError /
    ValueError naming the argument.  Strided and read-only arrays pass uncopied (the
    kernels copy what they read); lists are converted to float64."""
    cdef int kind
    if not cnp.PyArray_Check(a):
        try:
            a = np.asarray(a, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a float array, got {type(a).__name__}") from e
    kind = cnp.PyArray_TYPE(a)
    if kind != cnp.NPY_FLOAT32 and kind != cnp.NPY_FLOAT64:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}"
                        " (convert it with .astype(np.float32))")
    if cnp.PyArray_NDIM(a) != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got {_describe(a)}")
    if not cnp.PyArray_ISNOTSWAPPED(a):   # big-endian data would be read as garbage
        a = a.astype(a.dtype.newbyteorder("="))
    return a


cdef int _copy_rows(cnp.ndarray src, str name, char* dst, Py_ssize_t ld, bint dst64,
                    cnp.ndarray index=None) except -1:
    """Copy a float32/float64 array with any strides into a row-major buffer with row
    stride `ld`, converting to the buffer's dtype and rejecting NaN and Inf.  A 1-D
    array is one column.  With `index` (int64, range-checked), row i is src[index[i]]."""
    cdef bint one_column = cnp.PyArray_NDIM(src) == 1
    cdef Py_ssize_t rows = src.shape[0] if index is None else index.shape[0]
    cdef Py_ssize_t cols = 1 if one_column else src.shape[1]
    cdef Py_ssize_t s0 = src.strides[0], s1 = 0 if one_column else src.strides[1]
    cdef char* base = <char*>cnp.PyArray_DATA(src)
    cdef const int64_t* picks = NULL if index is None else <const int64_t*>cnp.PyArray_DATA(index)
    cdef bint src64 = cnp.PyArray_TYPE(src) == cnp.NPY_FLOAT64
    cdef Py_ssize_t bad
    cdef int nt = _num_threads()
    with nogil:
        if src64:
            bad = _strided_copy(<double*>NULL, base, s0, s1, picks, dst, ld, rows, cols, dst64, nt)
        else:
            bad = _strided_copy(<float*>NULL, base, s0, s1, picks, dst, ld, rows, cols, dst64, nt)
    if bad >= 0:
        raise ValueError(f"{name} contains NaN or Inf (in row {bad}), or a value too large "
                         "for the network's dtype; clean or impute the data first")
    return 0


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


cdef Py_ssize_t _copy_part(floating* kind, const char* src, Py_ssize_t s0, Py_ssize_t s1,
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


cdef Py_ssize_t _strided_copy(floating* kind, const char* src, Py_ssize_t s0, Py_ssize_t s1,
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


cdef bint _copy_unaligned(const floating* row, Py_ssize_t s1, char* dst, Py_ssize_t ld,
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


cdef Py_ssize_t _first_improper_row(const floating* y, Py_ssize_t ld, Py_ssize_t rows,
                                    Py_ssize_t cols, bint sum_to_one) noexcept nogil:
    # One-hot and label-smoothed rows sum to 1 up to rounding; 1e-3 leaves room for float32.
    cdef Py_ssize_t i, j
    cdef double total
    for i in range(rows):
        total = 0.0
        for j in range(cols):
            if not (0 <= y[i * ld + j] <= 1):
                return i
            total += y[i * ld + j]
        if sum_to_one and not (-1e-3 <= total - 1.0 <= 1e-3):
            return i
    return -1


cdef int _copy_weights(object sample_weight, Py_ssize_t n_x, double* dst, Py_ssize_t rows,
                       cnp.ndarray index=None) except -1:
    """Copy the batch's row weights (sample_weight[index], or all of it) into dst as
    doubles: one per row of x, finite, >= 0, and not all 0 in the batch."""
    if cnp.PyArray_Check(sample_weight) and sample_weight.dtype.kind in "biu":
        sample_weight = sample_weight.astype(np.float64)      # counts are weights too
    cdef cnp.ndarray arr = _as_float_array(sample_weight, "sample_weight", 1)
    cdef Py_ssize_t i, r
    cdef double v, total = 0.0
    if arr.shape[0] != n_x:
        raise ValueError(f"sample_weight must have one weight per row of x ({n_x}), got "
                         f"{_describe(arr)}")
    cdef const double[:] w = arr.astype(np.float64, copy=False)
    cdef const int64_t* picks = NULL if index is None else <const int64_t*>cnp.PyArray_DATA(index)
    for i in range(rows):
        r = i if picks == NULL else picks[i]
        v = w[r]
        if not (isfinite(v) and v >= 0):
            raise ValueError(f"sample_weight must be finite and >= 0, got {v} for row {r}")
        dst[i] = v
        total += v
    if not total > 0:
        raise ValueError("sample_weight: the weights of the batch's rows are all 0, so its "
                         "mean loss is undefined")
    return 0


cdef int _check_l2(double l2) except -1:
    if not (l2 >= 0 and isfinite(l2)):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    return 0


cdef cnp.ndarray _row_index(object rows, Py_ssize_t n_rows):
    """`rows` as a contiguous int64 vector of valid row numbers of an n_rows array."""
    cdef cnp.ndarray index = np.asarray(rows)
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise TypeError(f"rows must be a 1-D integer array, got {_describe(index)}")
    if index.shape[0] and (index.min() < 0 or index.max() >= n_rows):
        raise ValueError(f"rows must lie in [0, {n_rows}), got values from {index.min()} "
                         f"to {index.max()}")
    return np.ascontiguousarray(index, dtype=np.int64)


cdef int _copy_labels(object y, Py_ssize_t n_classes, int64_t* dst, Py_ssize_t rows,
                      cnp.ndarray index=None) except -1:
    """Copy integer class labels (y, or y[index]) into dst, each checked to lie in
    [0, n_classes)."""
    cdef cnp.ndarray labels = np.asarray(y)
    if labels.ndim != 1 or (index is None and labels.shape[0] != rows):
        raise ValueError(f"y: class labels must have shape ({rows},) to match x, "
                         f"got shape {np.shape(y)}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"y: class labels must be integers, got dtype {labels.dtype}")
    if labels.dtype != np.int64 or not labels.flags.c_contiguous:
        labels = np.ascontiguousarray(labels, dtype=np.int64)
    cdef const int64_t* src = <const int64_t*>cnp.PyArray_DATA(labels)
    cdef const int64_t* picks = NULL if index is None else <const int64_t*>cnp.PyArray_DATA(index)
    cdef Py_ssize_t i, bad = -1
    cdef int64_t label
    with nogil:
        for i in range(rows):
            label = src[picks[i] if picks != NULL else i]
            if label < 0 or label >= n_classes:
                bad = i
                break
            dst[i] = label
    if bad >= 0:
        raise ValueError(f"y: class labels must lie in [0, {n_classes}), got {label}")
    return 0




cdef int _copy_ids(cnp.ndarray src, str name, int64_t* dst, Py_ssize_t ld, Py_ssize_t limit,
                   cnp.ndarray index=None) except -1:
    """Copy integer ids (n x length; row i is src[index[i]] with `index`) into dst (row
    stride ld), every id checked to lie in [0, limit) before the batch is used.  Native
    int64 ids with adjacent columns are read in place; others are converted first."""
    if src.dtype != np.int64 or not src.dtype.isnative or src.strides[1] != 8:
        if src.dtype.kind == "u" and src.size and src.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name}: ids must lie in [0, {limit}), got {src.max()}")
        src = np.ascontiguousarray(src, dtype=np.int64)
    cdef const char* base = <const char*>cnp.PyArray_DATA(src)
    cdef Py_ssize_t s0 = src.strides[0]
    cdef Py_ssize_t rows = src.shape[0] if index is None else index.shape[0], cols = src.shape[1]
    cdef const int64_t* picks = NULL if index is None else <const int64_t*>cnp.PyArray_DATA(index)
    cdef const int64_t* row
    cdef Py_ssize_t i, j, r, bad_row = -1
    cdef int64_t bad = 0
    with nogil:
        for i in range(rows):
            r = picks[i] if picks != NULL else i
            row = <const int64_t*>(base + r * s0)
            for j in range(cols):
                if row[j] < 0 or row[j] >= limit:
                    bad, bad_row = row[j], r
                dst[i * ld + j] = row[j]
            if bad_row >= 0:
                break
    if bad_row >= 0:
        raise ValueError(f"{name}: every id must lie in [0, {limit}) (the Embedding's "
                         f"num_embeddings), got {bad} in row {bad_row}")
    return 0
