# The compiled core: validating wrappers around the nogil kernels.
#
# Three tiers, as in scikit-learn's _loss.pyx.tp:
#   1. kernels  - `cdef inline ... noexcept nogil` loops on raw typed memory, one family
#                 per .pxd file (_gemm, _dense, _activations, _batchnorm, _layernorm,
#                 _dropout, _residual, _losses, _optim), run by the tape's passes (_tape);
#   2. here     - every input is checked (type, dtype, shape, finiteness, ranges) and copied
#                 into buffers this module owns, and only then is the GIL released;
#   3. Python   - network.py, layers.py, optim.py, ops.py compose these into the public API.
#
# The Engine runs one network: its tape of operation records (laid out by plan.py), a
# workspace holding every activation and gradient slot for the largest batch seen, and
# the GEMM's packing scratch.  Parameters, gradients and buffers (running statistics)
# live in flat arrays owned by the Network; the Engine only holds pointers into them.
cimport cython
cimport numpy as cnp
from cython cimport floating
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset
from libc.math cimport sqrt, isfinite

import numpy as np

from backprop._gemm cimport (gemm, gemm_scratch_bytes, bp_gemm_init, bp_gemm_kernel_name,
                             bp_ctx, bp_ctx_caches, PARALLEL_MIN_WORK)
from backprop._activations cimport Activation, IDENTITY, SOFTMAX
from backprop._losses cimport Loss, MSE, BINARY_CROSS_ENTROPY, CROSS_ENTROPY
from backprop._optim cimport (OptimConfig, OptimizerKind, optimizer_update, sum_of_squares,
                              STAT_BLOCK)
from backprop._dropout cimport mix64
from backprop._parallel cimport part_start, team_for
from cython.parallel cimport prange
from backprop._tape cimport (Tape, Op, Slot, OpKind, DENSE, BATCHNORM, LAYERNORM,
                             forward_pass, loss_delta, backward_pass, weight_penalty)

cnp.import_array()
if bp_gemm_init() != 0:
    raise ImportError(f"{__name__} was compiled for SIMD instructions this CPU lacks; "
                      "import backprop, which picks the build the CPU runs (backprop/_simd.py)")

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int bp_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int bp_omp_max_threads(void) { return 1; }
    #endif
    #ifndef BACKPROP_OPENMP
    #define BACKPROP_OPENMP 0
    #endif
    #include <stdlib.h>
    #include <stdint.h>
    /* 64-byte aligned so packed GEMM panels and every workspace region start on a cache
       line; NULL (never a crash) for sizes that do not fit in memory. */
    static void *bp_aligned_alloc(size_t nbytes) {
        void *p = NULL;
        if (nbytes > (size_t)PTRDIFF_MAX) return NULL;
        if (posix_memalign(&p, 64, nbytes ? nbytes : 64) != 0) return NULL;
        return p;
    }
    """
    int bp_omp_max_threads() nogil
    int BACKPROP_OPENMP
    void* bp_aligned_alloc(size_t nbytes) nogil

ACTIVATIONS = {
    "identity": IDENTITY, "sigmoid": Activation.SIGMOID, "tanh": Activation.TANH,
    "relu": Activation.RELU, "leaky_relu": Activation.LEAKY_RELU, "elu": Activation.ELU,
    "gelu": Activation.GELU, "softplus": Activation.SOFTPLUS, "softmax": SOFTMAX,
}
LOSSES = {"mse": MSE, "binary_cross_entropy": BINARY_CROSS_ENTROPY,
          "cross_entropy": CROSS_ENTROPY}
# The record kinds of the tape, for the planner (plan.py).
OP_KINDS = {"dense": OpKind.DENSE, "activation": OpKind.ACTIVATION,
            "batchnorm": OpKind.BATCHNORM, "layernorm": OpKind.LAYERNORM,
            "dropout": OpKind.DROPOUT, "residual": OpKind.RESIDUAL}
# Each optimizer rule's state buffers, in the order its kernel takes them.
OPTIMIZER_STATE = {OptimizerKind.SGD: ("momentum_buffer",),
                   OptimizerKind.ADAM: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                   OptimizerKind.RMSPROP: ("square_avg", "grad_avg", "momentum_buffer"),
                   OptimizerKind.ADAGRAD: ("sum",)}
OPTIMIZER_KINDS = {"sgd": OptimizerKind.SGD, "adam": OptimizerKind.ADAM,
                   "rmsprop": OptimizerKind.RMSPROP, "adagrad": OptimizerKind.ADAGRAD}


def dropout_key(uint64_t seed, uint64_t layer):
    """The hash key of Dropout layer number `layer` in a network seeded with `seed`."""
    return mix64(mix64(seed) ^ mix64(layer + 1))


# --------------------------------------------------------------------------- threads

# Every kernel is right for any team size, but each thread gets packing scratch and
# OpenMP starts real threads: a cap keeps a typo (or OMP_NUM_THREADS=100000) from
# turning into gigabytes of scratch or thousands of threads.
MAX_THREADS = 1024


def simd_kernel():
    """The SIMD level the compiled core runs at, GEMM micro-kernels and element-wise
    loops alike: "avx512" (AVX-512 F/CD/BW/DQ/VL), "avx2+fma", or "generic" (baseline
    x86-64, or portable C elsewhere).  The best level the CPU has is chosen at import;
    BACKPROP_SIMD=avx512|avx2|generic set before import caps it (see backprop/_simd.py)."""
    return bp_gemm_kernel_name().decode()


def _gemm_config():
    """The GEMM's run-time configuration, for tests and benchmarks: the level, the cache
    sizes its blocking was derived from (bytes, by level), the fewest multiply-adds a
    product splits between threads, and per dtype the micro-tile (mr x nr) and the
    blocking (kc, mc, nc)."""
    return {"kernel": simd_kernel(),
            "parallel_min_work": PARALLEL_MIN_WORK,
            "caches": {"L1": bp_ctx_caches.size[1], "L2": bp_ctx_caches.size[2],
                       "L3": bp_ctx_caches.size[3]},
            "float32": bp_ctx.s.blk, "float64": bp_ctx.d.blk}   # structs become dicts


def _gemm_scratch_bytes(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int n_threads, dtype):
    """The packing scratch one m x n x k product of `dtype` needs on `n_threads` threads."""
    return gemm_scratch_bytes(m, n, k, n_threads, np.dtype(dtype).itemsize)


def openmp_enabled():
    """True if the extension was built with OpenMP (False only for BACKPROP_SERIAL=1 builds)."""
    return bool(BACKPROP_OPENMP)


cdef int _requested_threads = 0   # 0: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)
cdef bint _forked_child = False   # set in a child made by fork(): one thread only


def _after_fork_in_child():
    """GNU libgomp's thread pool does not survive fork(): a child that enters a parallel
    region after its parent used one waits forever on threads that do not exist (GCC bug
    52303).  The child therefore runs every kernel on one thread, where no parallel
    region is ever entered.  Use the "spawn" start method for multi-threaded workers."""
    global _forked_child
    _forked_child = True


def set_num_threads(n):
    """Use at most `n` threads (1 to MAX_THREADS) in every kernel; `n=0` goes back to
    OpenMP's own setting (OMP_NUM_THREADS, threadpoolctl)."""
    global _requested_threads
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"set_num_threads: n must be an integer, got {n!r}")
    if not 0 <= n <= MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be in [0, {MAX_THREADS}] "
                         f"(0 = OpenMP's default), got {n}")
    _requested_threads = int(n)


def get_num_threads():
    """The number of threads the kernels may use, always in [1, MAX_THREADS]."""
    return _num_threads()


cdef inline int _num_threads() noexcept:
    # omp_get_max_threads() follows OMP_NUM_THREADS and threadpoolctl's limits.
    if _forked_child:
        return 1
    cdef int available = bp_omp_max_threads()
    if _requested_threads > 0 and _requested_threads < available:
        available = _requested_threads
    return max(1, min(available, MAX_THREADS))


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


# --------------------------------------------------------------------------- matmul

def matmul(a, b, out=None, *, bint trans_a=False, bint trans_b=False, bint accumulate=False):
    """op(a) @ op(b) with the core's GEMM, where op transposes when asked.

    a : ndarray of shape (m, k), or (k, m) if trans_a
    b : ndarray of shape (k, n), or (n, k) if trans_b
    out : ndarray of shape (m, n), optional.  Must be C-contiguous, writeable and of the
        operands' dtype; it is written in place (added to when `accumulate`).
    Both operands must share one dtype, float32 or float64; any strides are accepted
    (non-unit inner strides are copied first).
    """
    a = _as_float_array(a, "a", 2)
    b = _as_float_array(b, "b", 2)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    cdef Py_ssize_t m = a.shape[1] if trans_a else a.shape[0]
    cdef Py_ssize_t k = a.shape[0] if trans_a else a.shape[1]
    cdef Py_ssize_t kb = b.shape[1] if trans_b else b.shape[0]
    cdef Py_ssize_t n = b.shape[0] if trans_b else b.shape[1]
    if k != kb:
        raise ValueError(f"matmul: inner dimensions differ: op(a) is ({m}, {k}), "
                         f"op(b) is ({kb}, {n})")
    if out is None:
        if accumulate:
            raise ValueError("matmul: accumulate=True needs an out array to add to")
        out = np.empty((m, n), dtype=a.dtype)
    elif not isinstance(out, np.ndarray):
        raise TypeError(f"out must be an ndarray, got {type(out).__name__}")
    elif out.dtype != a.dtype or out.shape != (m, n):
        raise ValueError(f"out must be an array of shape {(m, n)} and dtype {a.dtype}, "
                         f"got {_describe(out)}")
    elif not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    if np.may_share_memory(out, a) or np.may_share_memory(out, b):
        raise ValueError("out must not overlap a or b")
    cdef cnp.ndarray A = _unit_inner_stride(a), B = _unit_inner_stride(b), C = out
    if A.dtype == np.float64:
        _matmul(<double*>NULL, A, B, C, m, n, k, trans_a, trans_b, accumulate)
    else:
        _matmul(<float*>NULL, A, B, C, m, n, k, trans_a, trans_b, accumulate)
    return out


cdef cnp.ndarray _unit_inner_stride(cnp.ndarray a):
    # The GEMM reads rows with a leading dimension; columns must be adjacent.
    if a.shape[0] == 0 or a.shape[1] == 0:
        return np.ascontiguousarray(a)
    if a.strides[1] != a.itemsize or a.strides[0] % a.itemsize or a.strides[0] < a.shape[1] * a.itemsize:
        return np.ascontiguousarray(a)
    return a


cdef void _matmul(floating* kind, cnp.ndarray a, cnp.ndarray b, cnp.ndarray out,
                  Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                  bint trans_a, bint trans_b, bint accumulate):
    cdef Py_ssize_t lda = max(1, a.strides[0] // a.itemsize)
    cdef Py_ssize_t ldb = max(1, b.strides[0] // b.itemsize)
    cdef const floating* pa = <const floating*>cnp.PyArray_DATA(a)
    cdef const floating* pb = <const floating*>cnp.PyArray_DATA(b)
    cdef floating* pc = <floating*>cnp.PyArray_DATA(out)
    cdef int nt = _num_threads()
    cdef void* scratch = bp_aligned_alloc(gemm_scratch_bytes(m, n, k, nt, sizeof(floating)))
    if scratch == NULL:
        raise MemoryError("cannot allocate the GEMM packing buffers")
    with nogil:
        gemm(m, n, k, pa, lda, trans_a, pb, ldb, trans_b, pc, n, accumulate,
             NULL, IDENTITY, nt, scratch)
    free(scratch)


# --------------------------------------------------------------------------- optimizers

cdef class OptimizerBase:
    """The compiled half of every optimizer: its rule and settings as a C struct (read by
    the nogil update) and its state buffers, each shaped like the flat parameter buffer.

    Only the rules compiled in _optim.pxd exist (OPTIMIZER_KINDS); the public classes in
    `backprop.optim` validate their arguments and pick one with `_set_rule`.  The state
    buffers are the rule's own (OPTIMIZER_STATE), so no subclass can make the kernel read
    a buffer that is not there.  While a network's step runs without the GIL, the settings
    and buffers cannot be changed (`_busy`)."""
    cdef OptimConfig config
    cdef readonly dict state
    cdef object _dtype
    cdef bint _is64
    cdef Py_ssize_t _size
    cdef char* slots[3]            # the state buffers' data; unused slots stay NULL
    cdef int _busy
    cdef bint _has_rule

    def __cinit__(self, *args, **kwargs):
        self.state = {}
        self._size = -1
        memset(&self.config, 0, sizeof(OptimConfig))

    def _set_rule(self, str rule, **settings):
        """Choose the update rule (a key of OPTIMIZER_KINDS) and its settings; the step
        count restarts at 0.  Each setting must be a finite number or a bool."""
        cdef OptimConfig c
        self._check_idle("change the optimizer's settings")
        if rule not in OPTIMIZER_KINDS:
            raise ValueError(f"unknown optimizer rule {rule!r}; choose one of {sorted(OPTIMIZER_KINDS)}")
        memset(&c, 0, sizeof(OptimConfig))
        known = {"lr", "weight_decay", "decoupled", "momentum", "dampening", "nesterov",
                 "beta1", "beta2", "amsgrad", "eps", "alpha", "centered", "lr_decay"}
        for name, value in settings.items():
            if name not in known:
                raise TypeError(f"unknown optimizer setting {name!r}")
            if not isinstance(value, (bool, np.bool_)) and not (
                    isinstance(value, (int, float, np.integer, np.floating)) and isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        config = dict(c)
        config.update(settings)
        config["kind"] = OPTIMIZER_KINDS[rule]
        config["step"] = 0
        self.config = config
        self._has_rule = True

    cdef int _check_idle(self, str what) except -1:
        if self._busy:
            raise RuntimeError(f"cannot {what} while a step runs in another thread")
        return 0

    @property
    def lr(self):
        """The learning rate; schedules change it between steps."""
        return self.config.lr

    @lr.setter
    def lr(self, value):
        self._check_idle("change the learning rate")
        value = float(value)
        if not (value >= 0 and isfinite(value)):
            raise ValueError(f"lr must be a finite non-negative number, got {value}")
        self.config.lr = value

    @property
    def attached(self):
        """Whether this optimizer has been bound to a network's parameters."""
        return self._size >= 0

    @property
    def steps(self):
        """How many updates this optimizer has made."""
        return self.config.step

    @property
    def state_names(self):
        """The names of this rule's state buffers."""
        return OPTIMIZER_STATE[self.config.kind] if self._has_rule else ()

    def _config(self):
        return self.config

    def _bind(self, Py_ssize_t size, dtype, dict initial=None):
        """Create the rule's state buffers for `size` parameters, filled with 0 or with
        `initial[name]`; the step count restarts at 0."""
        self._check_idle("rebind the optimizer")
        if not self._has_rule:
            raise TypeError(f"{type(self).__name__} has no update rule: use one of backprop's "
                            "optimizers (SGD, Adam, AdamW, RMSprop, Adagrad) or a subclass")
        initial = initial or {}
        names = OPTIMIZER_STATE[self.config.kind]
        if set(initial) - set(names):
            raise ValueError(f"unknown state buffers {sorted(set(initial) - set(names))}; "
                             f"this rule has {list(names)}")
        state = {name: np.full(size, initial.get(name, 0.0), dtype=dtype) for name in names}
        self._dtype = np.dtype(dtype)
        self._is64 = self._dtype == np.float64
        self._size = size
        self.state = state
        self.slots[0] = self.slots[1] = self.slots[2] = NULL
        for i, buffer in enumerate(state.values()):
            self.slots[i] = <char*>cnp.PyArray_DATA(buffer)
        self.config.step = 0

    def _load(self, OptimizerBase template, long step, dict state):
        """Take `template`'s settings, this step count and these state buffers, all checked
        before anything changes."""
        self._check_idle("load a state into the optimizer")
        if template.config.kind != self.config.kind:
            raise ValueError("the state is for another update rule")
        if set(state) != set(self.state):
            raise ValueError(f"optimizer state must have the buffers {sorted(self.state)}, "
                             f"got {sorted(state)}")
        for name, value in state.items():
            value = np.asarray(value)
            if value.shape != (self._size,) or value.dtype != self._dtype:
                raise ValueError(f"optimizer state {name!r} must have shape ({self._size},) "
                                 f"and dtype {self._dtype}, got {_describe(value)}")
            if not np.isfinite(value).all():
                raise ValueError(f"optimizer state {name!r} contains NaN or Inf")
        if step < 0:
            raise ValueError(f"optimizer step must be >= 0, got {step}")
        for name, value in state.items():
            self.state[name][...] = value
        self.config = template.config
        self.config.step = step

    cdef int _begin(self, Py_ssize_t size, object dtype) except -1:
        """Mark a step as running over a flat buffer of `size` values of `dtype`."""
        if self._size != size or self._dtype != dtype:
            raise ValueError("this optimizer is bound to another network's parameters")
        self._check_idle("run two steps at once")
        self._busy = 1
        return 0

    cdef void _end(self) noexcept:
        self._busy = 0

    # The nogil methods below only ever run on `self`: Cython's debug None check
    # of self would need the GIL, so it is off for them.
    @cython.nonecheck(False)
    cdef bint _run_nogil(self, char* p, char* g, Py_ssize_t n, int n_threads, bint clear,
                         double clip) noexcept nogil:
        """One update (between _begin and _end); whether everything written is finite."""
        if self._is64:
            return optimizer_update(&self.config, <double*>p, <double*>g, <double*>self.slots[0],
                                    <double*>self.slots[1], <double*>self.slots[2], clip,
                                    n, n_threads, clear)
        return optimizer_update(&self.config, <float*>p, <float*>g, <float*>self.slots[0],
                                <float*>self.slots[1], <float*>self.slots[2], clip,
                                n, n_threads, clear)


# --------------------------------------------------------------------------- the engine

cdef enum PassPart:
    FORWARD = 1
    LOSS = 2
    BACKWARD = 4

# The largest float32, and so the bound on a float32 network's squared gradient norm:
# below it every squared gradient fits in float32, so no optimizer state can overflow.
cdef double FLOAT32_MAX = 3.4028234663852886e38


cdef double run_pass(floating* kind, Tape* t, int parts, int n_threads, int loss, bint labels,
                     double scale, bint input_grad, bint from_logits, double l2,
                     double* block_sums) noexcept nogil:
    """forward, loss, backward, as asked; the backward is skipped when the loss is not
    finite (a refused step must leave the gradients as they were).  l2 > 0 adds the
    weights' L2 penalty to the loss and its gradient to theirs."""
    cdef double value = 0.0
    if parts & FORWARD:
        forward_pass(kind, t, n_threads)
    if parts & LOSS:
        value = loss_delta(kind, t, loss, labels, scale)
        if not isfinite(value):
            return value
    if parts & BACKWARD:
        backward_pass(kind, t, n_threads, input_grad, from_logits)
        if l2 > 0 and parts & LOSS:
            value += weight_penalty(kind, t, l2, scale, block_sums, n_threads)
    return value


cdef Py_ssize_t _padded(Py_ssize_t n, Py_ssize_t itemsize):
    # Rows whose stride is a multiple of 256 bytes put the rows of a GEMM tile into the
    # same L1 sets; one extra cache line per row avoids it (see GEMM-NOTES.md).
    if n >= 64 and (n * itemsize) % 256 == 0:
        return n + 64 // itemsize
    return n


cdef class Workspace:
    """Everything an Engine needs per batch row, in one 64-byte-aligned allocation sized
    for `capacity` rows: two input buffers (a batch is staged into the spare one and only
    becomes the input once it has been validated), each slot's values and gradient, the
    saved statistics, the targets, the row weights and the log-sum-exp of each output row."""
    cdef char* base
    cdef Py_ssize_t capacity
    cdef char* inputs[2]
    cdef char** values
    cdef char** grads
    cdef double* saved
    cdef char* target
    cdef int64_t* labels
    cdef double* weights       # the rows' weights (sample_weight)
    cdef double* lse
    cdef char* backup          # the buffers before a train-mode forward, to undo a refused step

    def __dealloc__(self):
        free(self.base)
        free(self.values)
        free(self.grads)


cdef class Engine:
    """The compiled side of a Network: its tape, workspace and scratch.

    Built by `Network` from the planner's records (plan.py); the Network owns the flat
    `params`, `grads` and `buffers` arrays, the Engine holds pointers into them, so they
    must stay alive and never be reallocated.  Every public method runs with the one-pass
    guard held (a second thread gets a RuntimeError) and returns copies, never views of
    the workspace, which the next pass overwrites.
    """
    cdef Tape tape
    cdef int n_slots
    cdef int* grad_owner           # the slot whose gradient buffer slot s uses, or -1
    cdef Workspace ws
    cdef int active_input          # which of ws.inputs holds the current batch
    cdef void* scratch             # the GEMM's packing scratch
    cdef Py_ssize_t scratch_bytes
    cdef double* block_sums        # for the gradient statistics (sum_of_squares)
    cdef double* weight_norms      # each Dense record's weight-gradient norm (train_step)
    cdef int n_dense
    cdef readonly object dtype
    cdef bint is64
    cdef int loss                  # a Loss code, or -1 for none
    cdef bint from_logits          # the loss gives dL/d(logits): the cross-entropies
    cdef bint has_batchnorm
    cdef Py_ssize_t n_buffers
    cdef cnp.ndarray params, grads, buffers
    cdef cnp.ndarray grads_backup      # made the first time train_step meets pending gradients
    cdef readonly bint has_forward, has_grads, has_input_grad
    cdef bint _training
    cdef bint busy

    def __cinit__(self):
        self.tape.ops = NULL
        self.tape.slots = NULL
        self.grad_owner = NULL
        self.scratch = NULL
        self.block_sums = NULL
        self.weight_norms = NULL

    def __init__(self, list ops, list slots, loss, cnp.ndarray params, cnp.ndarray grads,
                 cnp.ndarray buffers):
        """ops: the planner's records (dicts with the fields of Op); slots: (width,
        grad_owner) per slot; params, grads, buffers: flat contiguous arrays of one dtype."""
        cdef int i
        cdef Op* op
        for name, a in (("params", params), ("grads", grads), ("buffers", buffers)):
            if a.dtype != params.dtype or a.dtype not in (np.float32, np.float64) \
                    or a.ndim != 1 or not a.flags.c_contiguous or not a.flags.writeable:
                raise ValueError(f"{name} must be a writeable contiguous flat float buffer "
                                 "of the parameters' dtype")
        if grads.shape[0] != params.shape[0] or not ops or not slots:
            raise ValueError("grads must match params, and a network needs records and slots")
        self.params, self.grads, self.buffers, self.dtype = params, grads, buffers, params.dtype
        self.is64 = params.dtype == np.float64
        self.loss = LOSSES[loss] if loss is not None else -1
        self.from_logits = loss in ("cross_entropy", "binary_cross_entropy")
        self.n_buffers = buffers.shape[0]
        self.n_slots = len(slots)
        self.tape.n_ops = len(ops)
        self.tape.ops = <Op*>bp_aligned_alloc(len(ops) * sizeof(Op))
        self.tape.slots = <Slot*>bp_aligned_alloc(len(slots) * sizeof(Slot))
        self.grad_owner = <int*>bp_aligned_alloc(len(slots) * sizeof(int))
        blocks = (params.shape[0] + STAT_BLOCK - 1) // STAT_BLOCK
        self.block_sums = <double*>bp_aligned_alloc(max(1, blocks) * sizeof(double))
        self.weight_norms = <double*>bp_aligned_alloc(len(ops) * sizeof(double))
        if (self.tape.ops == NULL or self.tape.slots == NULL or self.grad_owner == NULL
                or self.block_sums == NULL or self.weight_norms == NULL):
            raise MemoryError("cannot allocate the network's tape")
        for i, (width, owner) in enumerate(slots):
            self.tape.slots[i].width = width
            self.tape.slots[i].ld = _padded(width, self.dtype.itemsize)
            self.tape.slots[i].value = self.tape.slots[i].grad = NULL
            self.grad_owner[i] = owner
        self.has_batchnorm = False
        for i, record in enumerate(ops):
            op = &self.tape.ops[i]
            op.kind, op.activation = record["kind"], record["activation"]
            op.input, op.skip, op.output, op.z = (record["input"], record["skip"],
                                                  record["output"], record["z"])
            op.accumulate = record["accumulate"]
            op.weight, op.bias, op.buffer = record["weight"], record["bias"], record["buffer"]
            op.eps, op.momentum, op.p = record["eps"], record["momentum"], record["p"]
            op.key = record["key"]
            op.saved = 0
            self.has_batchnorm |= op.kind == BATCHNORM
            self.n_dense += op.kind == DENSE
            self.weight_norms[i] = 0.0
        self.tape.params = <char*>cnp.PyArray_DATA(params)
        self.tape.grads = <char*>cnp.PyArray_DATA(grads)
        self.tape.buffers = <char*>cnp.PyArray_DATA(buffers)
        self.tape.passes = 0
        self.tape.row_offset = 0
        self.tape.batch = 0
        self.tape.training = self._training = True
        self.ws = self._allocate(1)
        self._bind(self.ws)

    def __dealloc__(self):
        free(self.tape.ops)
        free(self.tape.slots)
        free(self.grad_owner)
        free(self.scratch)
        free(self.block_sums)
        free(self.weight_norms)

    # ---- the workspace

    cdef Py_ssize_t _saved_doubles(self, Op* op, Py_ssize_t capacity):
        """Doubles of statistics a record keeps (see _batchnorm.pxd, _layernorm.pxd)."""
        cdef Py_ssize_t width = self.tape.slots[op.output].width
        if op.kind == BATCHNORM:
            return 4 * width
        if op.kind == LAYERNORM:
            return 2 * capacity + 2 * width
        return 0

    cdef Workspace _allocate(self, Py_ssize_t capacity):
        """A new workspace for `capacity` rows, or MemoryError (nothing else changes)."""
        cdef Workspace ws = Workspace()
        cdef Py_ssize_t item = self.dtype.itemsize, i
        cdef Slot* out = &self.tape.slots[self.tape.ops[self.tape.n_ops - 1].output]
        # Region sizes in bytes, laid out one after another on cache-line boundaries.
        sizes = [capacity * self.tape.slots[0].ld * item] * 2                       # inputs
        sizes += [capacity * self.tape.slots[i].ld * item if i else 0
                  for i in range(self.n_slots)]                                     # values
        sizes += [capacity * self.tape.slots[i].ld * item if self.grad_owner[i] == i else 0
                  for i in range(self.n_slots)]                                     # grads
        sizes += [8 * sum(self._saved_doubles(&self.tape.ops[i], capacity)
                          for i in range(self.tape.n_ops)),                         # saved
                  capacity * out.width * item, capacity * 8, capacity * 8,  # targets, weights
                  capacity * 8,                                             # log-sum-exp
                  self.n_buffers * item]                                            # backup
        starts, total = [], 0
        for size in sizes:
            starts.append(total)
            total += (size + 63) // 64 * 64
        inputs = starts[:2]
        values = starts[2:2 + self.n_slots]
        grads = starts[2 + self.n_slots:2 + 2 * self.n_slots]
        saved, target, labels, weights, lse, backup = tuple(starts[2 + 2 * self.n_slots:])
        ws.values = <char**>bp_aligned_alloc(self.n_slots * sizeof(char*))
        ws.grads = <char**>bp_aligned_alloc(self.n_slots * sizeof(char*))
        ws.base = <char*>bp_aligned_alloc(total)
        if ws.base == NULL or ws.values == NULL or ws.grads == NULL:
            raise MemoryError(f"cannot allocate the workspace for a batch of {capacity:,} rows "
                              f"({total / 2**30:.2f} GiB); use smaller batches")
        # Zeroed once, so padding and unused rows never hold garbage (NaN) that a check
        # or a debugger could trip over.
        memset(ws.base, 0, total)
        ws.capacity = capacity
        ws.inputs[0] = ws.base + <Py_ssize_t>inputs[0]
        ws.inputs[1] = ws.base + <Py_ssize_t>inputs[1]
        for i in range(self.n_slots):
            ws.values[i] = ws.base + <Py_ssize_t>values[i]
            ws.grads[i] = NULL
            if self.grad_owner[i] >= 0:
                ws.grads[i] = ws.base + <Py_ssize_t>grads[self.grad_owner[i]]
        ws.saved = <double*>(ws.base + <Py_ssize_t>saved)
        ws.target = ws.base + <Py_ssize_t>target
        ws.labels = <int64_t*>(ws.base + <Py_ssize_t>labels)
        ws.weights = <double*>(ws.base + <Py_ssize_t>weights)
        ws.lse = <double*>(ws.base + <Py_ssize_t>lse)
        ws.backup = ws.base + <Py_ssize_t>backup
        return ws

    cdef void _bind(self, Workspace ws):
        """Point the tape at `ws` (its input: the active input buffer)."""
        cdef Py_ssize_t i, saved = 0
        self.ws = ws
        for i in range(self.n_slots):
            self.tape.slots[i].value = ws.values[i]
            self.tape.slots[i].grad = ws.grads[i]
        self.tape.slots[0].value = ws.inputs[self.active_input]
        for i in range(self.tape.n_ops):
            self.tape.ops[i].saved = saved
            saved += self._saved_doubles(&self.tape.ops[i], ws.capacity)
        self.tape.saved = ws.saved
        self.tape.capacity = ws.capacity
        self.tape.target = ws.target
        self.tape.ldt = self.tape.slots[self.tape.ops[self.tape.n_ops - 1].output].width
        self.tape.labels = ws.labels
        self.tape.lse = ws.lse

    cdef Py_ssize_t _scratch_need(self, Py_ssize_t rows, int nt):
        """GEMM scratch for the largest product of a pass over `rows` rows on nt threads."""
        cdef Py_ssize_t need = 0, n_in, n_out, item = self.dtype.itemsize
        cdef Op* op
        for i in range(self.tape.n_ops):
            op = &self.tape.ops[i]
            if op.kind == DENSE:
                n_in, n_out = self.tape.slots[op.input].width, self.tape.slots[op.output].width
                need = max(need, gemm_scratch_bytes(rows, n_out, n_in, nt, item),
                           gemm_scratch_bytes(n_out, n_in, rows, nt, item),
                           gemm_scratch_bytes(rows, n_in, n_out, nt, item))
        return need

    cdef int _ready_threads(self) except -1:
        """The thread count for a pass over the current batch, with scratch for it.  The
        result does not depend on the count, so if memory for more threads' scratch is
        short, the pass runs on one thread instead."""
        cdef int nt = _num_threads(), attempt
        cdef Py_ssize_t need
        cdef void* grown
        for attempt in (nt, 1):
            need = self._scratch_need(self.tape.batch, attempt)
            if need <= self.scratch_bytes:
                return attempt
            grown = bp_aligned_alloc(need)
            if grown != NULL:
                free(self.scratch)
                self.scratch, self.scratch_bytes = grown, need
                self.tape.gemm_scratch = grown
                return attempt
        raise MemoryError("cannot allocate the matrix-multiply scratch")

    # ---- loading a batch (all validation happens here, before anything changes)

    cdef int _load(self, object x, object y, object rows, object row_offset,
                   object sample_weight=None) except -1:
        """Validate x (and targets y unless None, and their weights unless None), copy them
        into a workspace (a new one if the batch is larger than any before), and only then
        make them the current batch.  Returns 1 when y holds integer class labels.  A
        refused batch changes nothing."""
        cdef cnp.ndarray arr = _as_float_array(x, "x", 2)
        cdef cnp.ndarray index = None if rows is None else _row_index(rows, arr.shape[0])
        cdef Py_ssize_t n = arr.shape[0] if index is None else index.shape[0]
        cdef Workspace ws = self.ws
        cdef int spare = 1 - self.active_input, labels = 0
        cdef uint64_t offset = _row_offset(row_offset)
        if arr.shape[1] != self.tape.slots[0].width:
            raise ValueError(f"x must have {self.tape.slots[0].width} features (columns), "
                             f"got {_describe(arr)}")
        if n == 0:
            raise ValueError("x is an empty batch (0 rows)")
        if index is not None and y is not None and len(y) != arr.shape[0]:
            raise ValueError(f"x and y must have the same number of rows, got {arr.shape[0]} "
                             f"and {len(y)}")
        if n == 1 and self._training and self.has_batchnorm:
            raise ValueError("BatchNorm in train mode needs more than one row per batch "
                             "(the variance of one value is 0); use net.eval() to predict "
                             "one row")
        if n > ws.capacity:
            ws = self._allocate(n)       # MemoryError here leaves everything as it was
        _copy_rows(arr, "x", ws.inputs[spare], self.tape.slots[0].ld, self.is64, index)
        if y is not None:
            labels = self._load_target(y, ws, n, index)
        if sample_weight is not None:
            _copy_weights(sample_weight, arr.shape[0], ws.weights, n, index)
        # Valid: the batch becomes the network's input.
        self.active_input = spare
        self._bind(ws)
        self.tape.weights = ws.weights if sample_weight is not None else NULL
        self.tape.batch = n
        self.tape.row_offset = offset
        self.has_forward = self.has_input_grad = False
        return labels

    cdef int _load_target(self, object y, Workspace ws, Py_ssize_t rows,
                          cnp.ndarray index=None) except -1:
        """Copy y (or its rows `index`) into ws's target buffers; 1 for integer labels."""
        cdef Py_ssize_t n_out = self.tape.ldt
        cdef cnp.ndarray arr
        if self.loss < 0:
            raise RuntimeError("this network has no loss: pass grad_output=, or give "
                               "Network(..., loss=...)")
        cdef int ndim = cnp.PyArray_NDIM(y) if cnp.PyArray_Check(y) else np.ndim(y)
        if self.loss == CROSS_ENTROPY and ndim == 1:
            _copy_labels(y, n_out, ws.labels, rows, index)
            return 1
        arr = _as_float_array(y, "y", ndim if (ndim == 2 or (ndim == 1 and n_out == 1)) else 2)
        if (ndim == 2 and arr.shape[1] != n_out) or (index is None and arr.shape[0] != rows):
            raise ValueError(f"y must have shape ({rows}, {n_out}) to match x and the output "
                             f"layer, got {_describe(arr)}")
        _copy_rows(arr, "y", ws.target, n_out, self.is64, index)
        if self.loss != MSE:
            self._check_probabilities(ws, rows)
        return 0

    cdef int _check_probabilities(self, Workspace ws, Py_ssize_t rows) except -1:
        """Targets of the cross-entropies are probabilities: in [0, 1], and rows summing
        to 1 for cross_entropy.  Checked on the copied batch, in C."""
        cdef Py_ssize_t bad, n_out = self.tape.ldt, item = self.dtype.itemsize
        cdef bint rows_sum_to_one = self.loss == CROSS_ENTROPY
        with nogil:
            if self.is64:
                bad = _first_improper_row(<double*>ws.target, n_out, rows, n_out, rows_sum_to_one)
            else:
                bad = _first_improper_row(<float*>ws.target, n_out, rows, n_out, rows_sum_to_one)
        if bad >= 0:
            row = self._copy_out(ws.target + bad * n_out * item, 1, n_out, n_out)[0]
            raise ValueError(f"y: targets of {self._loss_name()} must be probabilities in "
                             f"[0, 1]{', each row summing to 1' if rows_sum_to_one else ''}; "
                             f"row {bad} is {row}")
        return 0

    def _loss_name(self):
        return {v: k for k, v in LOSSES.items()}.get(self.loss)

    # ---- what a pass leaves behind, as copies

    cdef object _copy_out(self, char* src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t ld):
        cdef cnp.ndarray out = np.empty((rows, cols), dtype=self.dtype)
        cdef Py_ssize_t i, item = self.dtype.itemsize
        cdef char* dst = <char*>cnp.PyArray_DATA(out)
        for i in range(rows):
            memcpy(dst + i * cols * item, src + i * ld * item, cols * item)
        return out

    cdef object _slot_copy(self, int slot, bint gradient):
        cdef Slot* s = &self.tape.slots[slot]
        return self._copy_out(s.grad if gradient else s.value, self.tape.batch, s.width, s.ld)

    def output(self):
        """The network's output for the last forward (a copy)."""
        self._enter()
        try:
            self._check_forward("output")
            return self._slot_copy(self.tape.ops[self.tape.n_ops - 1].output, False)
        finally:
            self.busy = False

    def slot_value(self, int slot):
        """Slot `slot`'s values for the last forward (a copy); see plan.py for the slots."""
        self._enter()
        try:
            self._check_forward("slot_value")
            if not 0 <= slot < self.n_slots:
                raise IndexError(f"slot must be in [0, {self.n_slots}), got {slot}")
            return self._slot_copy(slot, False)
        finally:
            self.busy = False

    def input_grad(self):
        """dL/dx of the last backward (a copy)."""
        self._enter()
        try:
            if not self.has_input_grad:
                raise RuntimeError("no input gradient: call backward() after forward() first")
            return self._slot_copy(0, True)
        finally:
            self.busy = False

    # ---- the guard and the mode

    cdef int _enter(self) except -1:
        # One network, one pass at a time: a second Python thread entering while the first
        # runs without the GIL would overwrite its workspace.
        if self.busy:
            raise RuntimeError("this Network is already running a pass in another thread; "
                               "use one Network per thread, or a lock around it")
        self.busy = True
        return 0

    cdef int _check_forward(self, str what) except -1:
        if not self.has_forward:
            raise RuntimeError(f"{what} needs a forward pass first: call forward(x)")
        return 0

    @property
    def training(self):
        """Train mode (True: batch statistics, dropout) or eval mode (False)."""
        return self._training

    @training.setter
    def training(self, bint value):
        self._enter()
        self._training = value
        self.busy = False

    @property
    def passes(self):
        """Train-mode forward passes so far: Dropout's counter (saved in checkpoints)."""
        return self.tape.passes

    @passes.setter
    def passes(self, uint64_t value):
        self._enter()
        self.tape.passes = value
        self.has_forward = self.has_input_grad = False
        self.busy = False

    # ---- the passes (nogil pieces first)

    @cython.nonecheck(False)
    cdef double _pass(self, int parts, int nt, bint labels, double scale,
                      bint input_grad, bint from_logits, double l2=0.0) noexcept nogil:
        # The one place that picks the float32 or float64 kernels.
        if self.is64:
            return run_pass(<double*>NULL, &self.tape, parts, nt, self.loss, labels, scale,
                            input_grad, from_logits, l2, self.block_sums)
        return run_pass(<float*>NULL, &self.tape, parts, nt, self.loss, labels, scale,
                        input_grad, from_logits, l2, self.block_sums)

    @cython.nonecheck(False)
    cdef void _begin_forward(self) noexcept nogil:
        """A forward in the current mode: a train-mode one counts as a pass (Dropout draws
        a fresh mask) and may move BatchNorm's statistics, so they are saved first."""
        self.tape.training = self._training
        if self._training:
            self.tape.passes += 1
            if self.n_buffers:
                memcpy(self.ws.backup, self.tape.buffers, self.n_buffers * self.dtype_size())

    @cython.nonecheck(False)
    cdef void _undo_forward(self) noexcept nogil:
        """Take back what _begin_forward and the forward changed (a refused step)."""
        if self.tape.training:
            self.tape.passes -= 1
            if self.n_buffers:
                memcpy(self.tape.buffers, self.ws.backup, self.n_buffers * self.dtype_size())

    @cython.nonecheck(False)
    cdef inline Py_ssize_t dtype_size(self) noexcept nogil:
        return 8 if self.is64 else 4

    @cython.nonecheck(False)
    cdef double _sum_of_squares(self, int nt) noexcept nogil:
        if self.is64:
            return sum_of_squares(<double*>self.tape.grads, self.params.shape[0],
                                  self.block_sums, nt)
        return sum_of_squares(<float*>self.tape.grads, self.params.shape[0], self.block_sums, nt)

    @cython.nonecheck(False)
    cdef bint _gradients_ok(self, double sum_sq) noexcept nogil:
        # Finite, and (float32) every squared gradient fits: no optimizer state overflows.
        return isfinite(sum_sq) and (self.is64 or sum_sq < FLOAT32_MAX)

    @cython.nonecheck(False)
    cdef void _zero_grads(self) noexcept nogil:
        memset(self.tape.grads, 0, self.params.shape[0] * self.dtype_size())

    # ---- the public passes

    def forward(self, x, rows=None, row_offset=0):
        """Run the network on x (or x[rows]); returns a copy of the output.  row_offset:
        the batch's first row in a global batch (dropout masks are keyed by it)."""
        cdef int nt
        self._enter()
        try:
            self._load(x, None, rows, row_offset)
            nt = self._ready_threads()
            with nogil:
                self._begin_forward()
                self._pass(FORWARD, nt, False, 1.0, False, False)
            self.has_forward = True
            return self._slot_copy(self.tape.ops[self.tape.n_ops - 1].output, False)
        finally:
            self.busy = False

    def loss_value(self, y):
        """The loss of the last forward's output against y (gradients untouched)."""
        cdef int labels
        cdef double value
        self._enter()
        try:
            self._check_forward("loss")
            labels = self._load_target(y, self.ws, self.tape.batch)
            self.tape.weights = NULL
            with nogil:
                value = self._pass(LOSS, 1, labels, 1.0, False, False)
            return value
        finally:
            self.busy = False

    def backward(self, y=None, grad_output=None, bint input_grad=True, double scale=1.0):
        """Accumulate scale * the gradients of the built-in loss against y, or of an
        external dL/d(output) `grad_output`; returns the loss (None with grad_output).
        A loss that is not finite raises FloatingPointError and accumulates nothing."""
        cdef int labels = 0, nt, parts = BACKWARD
        cdef double value = 0.0
        cdef cnp.ndarray g
        cdef Slot* out
        self._enter()
        try:
            self._check_forward("backward")
            if (y is None) == (grad_output is None):
                raise TypeError("backward takes either targets y or grad_output, not both or neither")
            _check_scale(scale)
            out = &self.tape.slots[self.tape.ops[self.tape.n_ops - 1].output]
            if grad_output is not None:
                g = _as_float_array(grad_output, "grad_output", 2)
                if g.shape[0] != self.tape.batch or g.shape[1] != out.width:
                    raise ValueError(f"grad_output must have shape ({self.tape.batch}, "
                                     f"{out.width}) like the last forward's output, got "
                                     f"{_describe(g)}")
                _copy_rows(g, "grad_output", out.grad, out.ld, self.is64)
                if scale != 1.0:
                    self._scale_slot_grad(out, scale)
            else:
                labels = self._load_target(y, self.ws, self.tape.batch)
                self.tape.weights = NULL
                parts = LOSS | BACKWARD
            nt = self._ready_threads()
            with nogil:
                value = self._pass(parts, nt, labels, scale, input_grad,
                                   self.from_logits and grad_output is None)
            if not isfinite(value):
                raise FloatingPointError(f"the loss is {value}: no gradients were accumulated")
            self.has_grads = True
            self.has_input_grad = input_grad
            return value if grad_output is None else None
        finally:
            self.busy = False

    cdef void _scale_slot_grad(self, Slot* s, double scale):
        cdef Py_ssize_t i, j
        for i in range(self.tape.batch):
            for j in range(s.width):
                if self.is64:
                    (<double*>s.grad)[i * s.ld + j] *= scale
                else:
                    (<float*>s.grad)[i * s.ld + j] *= <float>scale

    def compute_gradients(self, x, y, rows=None, double scale=1.0, row_offset=0,
                          sample_weight=None, double l2=0.0):
        """forward + loss + backward in one call: adds scale * dL/dparams to the gradients
        and returns the (unscaled) mean loss of the batch (weighted by sample_weight, plus
        the weights' L2 penalty l2/2 * sum(W^2)).  A loss that is not finite raises
        FloatingPointError and changes nothing."""
        cdef int labels, nt
        cdef double value
        self._enter()
        try:
            _check_scale(scale)
            _check_l2(l2)
            labels = self._load(x, y, rows, row_offset, sample_weight)
            nt = self._ready_threads()
            with nogil:
                self._begin_forward()
                value = self._pass(FORWARD | LOSS | BACKWARD, nt, labels, scale, False,
                                   self.from_logits, l2)
                if not isfinite(value):
                    self._undo_forward()
            self.has_forward = True
            if not isfinite(value):
                raise FloatingPointError(f"the loss is {value} (diverged); no gradients were "
                                         "accumulated")
            self.has_grads = True
            return value
        finally:
            self.busy = False

    @cython.nonecheck(False)
    cdef void _record_weight_norms(self, int nt) noexcept nogil:
        cdef int i, d = 0
        cdef Op* op
        cdef Py_ssize_t size
        for i in range(self.tape.n_ops):
            op = &self.tape.ops[i]
            if op.kind == DENSE:
                size = self.tape.slots[op.input].width * self.tape.slots[op.output].width
                if self.is64:
                    self.weight_norms[d] = sqrt(sum_of_squares(
                        <double*>self.tape.grads + op.weight, size, self.block_sums, nt))
                else:
                    self.weight_norms[d] = sqrt(sum_of_squares(
                        <float*>self.tape.grads + op.weight, size, self.block_sums, nt))
                d += 1

    def weight_grad_norms(self):
        """The gradient norm of each Dense record's weight in the last train_step that
        recorded them (record_norms=True), in tape order."""
        return [self.weight_norms[i] for i in range(self.n_dense)]

    def train_step(self, x, y, OptimizerBase optimizer, rows=None, double clip=0.0,
                   bint record_norms=False, sample_weight=None, double l2=0.0,
                   double scale=1.0):
        """forward, loss, backward, optimizer update and zero_grad in one call, with the
        GIL released from the first multiply to the last update.  With `rows`, the batch
        is x[rows], y[rows], gathered straight into the workspace (and the row weights
        sample_weight[rows]); l2 > 0 adds the L2 penalty of the Dense weights to the loss
        (see compute_gradients), whose gradient is multiplied by `scale` (the factor
        between another library's loss and the built-in one).  clip > 0 scales the
        gradients so their global norm is at most `clip` (torch's clip_grad_norm_).
        A step whose loss or gradients are not finite is refused: FloatingPointError,
        and the weights, optimizer, statistics and gradients are as they were."""
        cdef int labels, nt
        cdef double value, sum_sq = 0.0, factor = 1.0
        cdef bint ok, finite = True, pending
        cdef char* backup = NULL
        self._enter()
        try:
            if not (clip >= 0 and isfinite(clip)):
                raise ValueError(f"clip must be a finite number >= 0, got {clip}")
            _check_l2(l2)
            _check_scale(scale)
            labels = self._load(x, y, rows, 0, sample_weight)
            nt = self._ready_threads()
            pending = self.has_grads
            if pending and self.grads_backup is None:
                self.grads_backup = np.empty_like(self.grads)
            if pending:
                backup = <char*>cnp.PyArray_DATA(self.grads_backup)
            optimizer._begin(self.params.shape[0], self.dtype)
            try:
                with nogil:
                    if pending:        # gradients from backward(): this step adds to them
                        memcpy(backup, self.tape.grads,
                               self.params.shape[0] * self.dtype_size())
                    self._begin_forward()
                    value = self._pass(FORWARD | LOSS | BACKWARD, nt, labels, scale, False,
                                       self.from_logits, l2)
                    ok = isfinite(value)
                    if ok:
                        sum_sq = self._sum_of_squares(nt)
                        ok = self._gradients_ok(sum_sq)
                        if not ok and pending:      # back to what they were
                            memcpy(self.tape.grads, backup,
                                   self.params.shape[0] * self.dtype_size())
                        elif not ok:
                            self._zero_grads()
                    if ok:
                        if record_norms:
                            self._record_weight_norms(nt)
                        if clip > 0 and sqrt(sum_sq) + 1e-6 > clip:
                            factor = clip / (sqrt(sum_sq) + 1e-6)
                        finite = optimizer._run_nogil(self.tape.params, self.tape.grads,
                                                      self.params.shape[0], nt, True, factor)
                    else:
                        self._undo_forward()
            finally:
                optimizer._end()
            self.has_input_grad = False
            self.has_grads = pending and not ok
            # The forward stays inspectable only when the step was refused.
            self.has_forward = not ok
            if not isfinite(value):
                raise FloatingPointError(
                    f"the loss is {value} (diverged); this step's update was not applied, so "
                    "the weights are those of the last good step")
            if not ok:
                raise FloatingPointError(
                    f"the gradients are not finite (squared norm {sum_sq:.3g}); this step's "
                    "update was not applied, so the weights are those of the last good step")
            _check_update(finite, optimizer)
            return value
        finally:
            self.busy = False

    def step(self, OptimizerBase optimizer):
        """One optimizer update from the accumulated gradients, or FloatingPointError
        (nothing changed) if they are not finite."""
        cdef int nt
        cdef double sum_sq
        cdef bint ok, finite = True
        self._enter()
        try:
            if not self.has_grads:
                raise RuntimeError("step() needs gradients: call backward() first")
            nt = self._ready_threads()
            optimizer._begin(self.params.shape[0], self.dtype)
            try:
                with nogil:
                    sum_sq = self._sum_of_squares(nt)
                    ok = self._gradients_ok(sum_sq)
                    if ok:
                        finite = optimizer._run_nogil(self.tape.params, self.tape.grads,
                                                      self.params.shape[0], nt, False, 1.0)
            finally:
                optimizer._end()
            if not ok:
                raise FloatingPointError(
                    f"the gradients are not finite (squared norm {sum_sq:.3g}); the update "
                    "was not applied")
            self.has_forward = False   # the saved activations belong to the old weights
            _check_update(finite, optimizer)
        finally:
            self.busy = False

    def zero_grad(self):
        """Set every gradient to zero."""
        self._enter()                  # never while another thread's pass writes them
        with nogil:
            self._zero_grads()
        self.has_grads = False
        self.busy = False

    def grad_norm(self):
        """The Euclidean norm of all gradients together (the same for any thread count)."""
        cdef double sum_sq
        cdef int nt
        self._enter()
        try:
            nt = _num_threads()
            with nogil:
                sum_sq = self._sum_of_squares(nt)
            return sqrt(sum_sq)
        finally:
            self.busy = False

    def clip_grad_norm(self, double max_norm):
        """Scale the gradients so their global norm is at most max_norm, as
        torch.nn.utils.clip_grad_norm_ (factor max_norm / (norm + 1e-6) when below 1);
        returns the norm before clipping."""
        cdef double sum_sq, norm, factor
        cdef Py_ssize_t i, n = self.params.shape[0]
        cdef int nt
        if not (max_norm > 0 and isfinite(max_norm)):
            raise ValueError(f"max_norm must be a finite number > 0, got {max_norm}")
        self._enter()
        try:
            nt = _num_threads()
            with nogil:
                sum_sq = self._sum_of_squares(nt)
            norm = sqrt(sum_sq)
            if not self._gradients_ok(sum_sq):
                raise FloatingPointError(f"the gradient norm is {norm}: not finite, nothing "
                                         "was clipped")
            factor = max_norm / (norm + 1e-6)
            if factor < 1:
                with nogil:
                    if self.is64:
                        for i in range(n):
                            (<double*>self.tape.grads)[i] *= factor
                    else:
                        for i in range(n):
                            (<float*>self.tape.grads)[i] *= <float>factor
            return norm
        finally:
            self.busy = False


cdef uint64_t _row_offset(object value) except? 0:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0 \
            or value >= 2 ** 62:
        raise ValueError(f"row_offset must be a non-negative integer, got {value!r}")
    return value


cdef int _check_scale(double scale) except -1:
    if not isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return 0


cdef int _check_update(bint finite, OptimizerBase optimizer) except -1:
    if not finite:
        raise FloatingPointError(
            f"the update made some weights or optimizer state overflow (learning rate "
            f"{optimizer.lr:g}); the network is no longer finite: reload a checkpoint and "
            "lower the learning rate")
    return 0
