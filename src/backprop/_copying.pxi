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
    cdef gather_t gather = LEVEL.gather64 if src64 else LEVEL.gather32
    with nogil:
        bad = gather(base, s0, s1, picks, dst, ld, rows, cols, dst64, nt)
    if bad >= 0:
        raise ValueError(f"{name} contains NaN or Inf (in row {bad}), or a value too large "
                         "for the network's dtype; clean or impute the data first")
    return 0


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
    doubles: one per row of x, finite, >= 0, and not all 0 in the batch.  Only the
    batch's rows are read (a float32 vector is not converted whole at every step)."""
    if cnp.PyArray_Check(sample_weight) and sample_weight.dtype.kind in "biu":
        if np.ndim(sample_weight) == 1 and len(sample_weight) == n_x and index is not None:
            sample_weight, index = sample_weight[index], None     # the batch's rows only
        sample_weight = sample_weight.astype(np.float64)      # counts are weights too
    cdef cnp.ndarray arr = _as_float_array(sample_weight, "sample_weight", 1)
    if arr.shape[0] != n_x:
        raise ValueError(f"sample_weight must have one weight per row of x ({n_x}), got "
                         f"{_describe(arr)}")
    cdef const char* src = <const char*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t s0 = arr.strides[0], bad
    cdef const int64_t* picks = NULL if index is None else <const int64_t*>cnp.PyArray_DATA(index)
    cdef double total = 0.0
    with nogil:
        if cnp.PyArray_TYPE(arr) == cnp.NPY_FLOAT64:
            bad = _gather_weights(<double*>NULL, src, s0, picks, dst, rows, &total)
        else:
            bad = _gather_weights(<float*>NULL, src, s0, picks, dst, rows, &total)
    if bad >= 0:
        r = bad if picks == NULL else picks[bad]
        raise ValueError(f"sample_weight must be finite and >= 0, got {dst[bad]} for row {r}")
    if not total > 0:
        raise ValueError("sample_weight: the weights of the batch's rows are all 0, so its "
                         "mean loss is undefined")
    return 0


cdef Py_ssize_t _gather_weights(floating* kind, const char* src, Py_ssize_t s0,
                                const int64_t* picks, double* dst, Py_ssize_t rows,
                                double* total) noexcept nogil:
    # dst[i] = weight of row picks[i] (or i); the first i whose weight is not finite and
    # >= 0, or -1.  memcpy: the vector may be unaligned (a view into a byte buffer).
    cdef Py_ssize_t i
    cdef floating v
    for i in range(rows):
        memcpy(&v, src + (picks[i] if picks != NULL else i) * s0, sizeof(floating))
        dst[i] = v
        if not (isfinite(dst[i]) and dst[i] >= 0):
            return i
        total[0] += dst[i]
    return -1


cdef int _check_l2(double l2) except -1:
    if not (l2 >= 0 and isfinite(l2)):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    return 0


cdef cnp.ndarray _row_index(object rows):
    """`rows` as a 1-D integer array, checked for its type only: its values are read (by
    _check_rows) once the batch's size has been found to fit in memory, so that an index
    of 2**62 rows is refused at once instead of being scanned."""
    cdef cnp.ndarray index = np.asarray(rows)
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise TypeError(f"rows must be a 1-D integer array, got {_describe(index)}")
    return index


cdef cnp.ndarray _check_rows(cnp.ndarray index, Py_ssize_t n_rows):
    """`index` as a contiguous int64 vector of valid row numbers of an n_rows array."""
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
    cdef Py_ssize_t bad = _copy_integers(labels.reshape(-1, 1), dst, 1, n_classes, index)
    if bad >= 0:
        raise ValueError(f"y: class labels must lie in [0, {n_classes}), got {labels[bad]}")
    return 0


cdef int _copy_ids(cnp.ndarray src, str name, int64_t* dst, Py_ssize_t ld, Py_ssize_t limit,
                   cnp.ndarray index=None) except -1:
    """Copy integer ids (n x length; row i is src[index[i]] with `index`) into dst (row
    stride ld), every id checked to lie in [0, limit) before the batch is used."""
    cdef Py_ssize_t bad = _copy_integers(src, dst, ld, limit, index)
    if bad >= 0:
        row = src[bad]
        raise ValueError(f"{name}: every id must lie in [0, {limit}) (the Embedding's "
                         f"num_embeddings), got {row[(row < 0) | (row >= limit)][0]} in "
                         f"row {bad}")
    return 0


ctypedef fused integer:
    signed char
    short
    int
    long long
    unsigned char
    unsigned short
    unsigned int
    unsigned long long


cdef Py_ssize_t _copy_integers(cnp.ndarray src, int64_t* dst, Py_ssize_t ld, int64_t limit,
                               cnp.ndarray index) except -2:
    """dst[i * ld + j] = src[index[i] (or i), j] as int64 for a 2-D array of any integer
    dtype and strides; returns the first source row holding a value outside [0, limit),
    or -1.  Only the batch's rows are read: labels or ids stored as int32 (or a memory-
    mapped int8 dataset) are not converted whole at every step."""
    if not src.dtype.isnative:
        src = src.astype(src.dtype.newbyteorder("="))
    cdef const char* base = <const char*>cnp.PyArray_DATA(src)
    cdef Py_ssize_t s0 = src.strides[0], s1 = src.strides[1], cols = src.shape[1], bad
    cdef Py_ssize_t rows = src.shape[0] if index is None else index.shape[0]
    cdef const int64_t* picks = NULL if index is None else <const int64_t*>cnp.PyArray_DATA(index)
    cdef int size = src.dtype.itemsize
    cdef bint signed = src.dtype.kind == "i"
    with nogil:
        if signed and size == 1:
            bad = _gather_integers(<signed char*>NULL, base, s0, s1, picks, rows, cols, dst, ld, limit)
        elif signed and size == 2:
            bad = _gather_integers(<short*>NULL, base, s0, s1, picks, rows, cols, dst, ld, limit)
        elif signed and size == 4:
            bad = _gather_integers(<int*>NULL, base, s0, s1, picks, rows, cols, dst, ld, limit)
        elif signed:
            bad = _gather_integers(<long long*>NULL, base, s0, s1, picks, rows, cols, dst, ld, limit)
        elif size == 1:
            bad = _gather_integers(<unsigned char*>NULL, base, s0, s1, picks, rows, cols, dst, ld, limit)
        elif size == 2:
            bad = _gather_integers(<unsigned short*>NULL, base, s0, s1, picks, rows, cols, dst, ld, limit)
        elif size == 4:
            bad = _gather_integers(<unsigned int*>NULL, base, s0, s1, picks, rows, cols, dst, ld, limit)
        else:
            bad = _gather_integers(<unsigned long long*>NULL, base, s0, s1, picks, rows, cols,
                                   dst, ld, limit)
    return bad


cdef Py_ssize_t _gather_integers(integer* kind, const char* src, Py_ssize_t s0, Py_ssize_t s1,
                                 const int64_t* picks, Py_ssize_t rows, Py_ssize_t cols,
                                 int64_t* dst, Py_ssize_t ld, int64_t limit) noexcept nogil:
    # memcpy: the array may be unaligned.  An unsigned value is compared as unsigned, so
    # 2**64 - 1 is out of range, not -1.
    cdef Py_ssize_t i, j, r
    cdef integer v
    for i in range(rows):
        r = picks[i] if picks != NULL else i
        for j in range(cols):
            memcpy(&v, src + r * s0 + j * s1, sizeof(integer))
            if v < 0 or <unsigned long long>v >= <unsigned long long>limit:
                return r
            dst[i * ld + j] = <int64_t>v
    return -1
