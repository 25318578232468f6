# The compiled core: validating wrappers around the nogil kernels.
#
# Three tiers, as in scikit-learn's _loss.pyx.tp:
#   1. kernels  - `cdef inline ... noexcept nogil` loops on raw typed memory, one family
#                 per .pxd file: _gemm (matrix multiply), _activations, _losses, _optim;
#   2. here     - every input is checked (type, dtype, shape, finiteness, ranges) and copied
#                 into buffers this module owns, and only then is the GIL released;
#   3. Python   - network.py, optim.py, ops.py compose these into the public API.
#
# The Engine owns a network's workspace: one input buffer, the activations of every
# layer, two ping-pong delta buffers and the GEMM's packing scratch, all allocated for
# the largest batch seen and reused by every later step.  Parameters and gradients
# live in two flat buffers owned by the Network; the Engine only holds pointers.
cimport numpy as cnp
from cython cimport floating
from libc.stdint cimport int64_t
from libc.stdlib cimport free
from libc.string cimport memcpy
from libc.math cimport sqrt, isfinite

import numpy as np

from backprop._gemm cimport (gemm, gemm_scratch_bytes, bp_gemm_init, bp_gemm_kernel_name,
                             bp_ctx, bp_ctx_caches)
from backprop._activations cimport (
    Activation, IDENTITY, SOFTMAX, activate_tile, softmax_rows, activation_backward,
    needs_preactivation)
from backprop._losses cimport (
    Loss, MSE, BINARY_CROSS_ENTROPY, CROSS_ENTROPY,
    mse, binary_cross_entropy, cross_entropy_labels, cross_entropy_probs)
from backprop._optim cimport OptimConfig, optimizer_update

cnp.import_array()
bp_gemm_init()

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
    /* 64-byte aligned so packed GEMM panels start on a cache line. */
    static void *bp_aligned_alloc(size_t nbytes) {
        void *p = NULL;
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


# --------------------------------------------------------------------------- threads

def simd_kernel():
    """The GEMM micro-kernels in use: "avx512" (AVX-512 F/VL/DQ), "avx2+fma", or
    "generic" (portable C).  The best level the CPU has is chosen at import;
    BACKPROP_SIMD=avx512|avx2|generic set before import caps it (it never raises it
    past what the CPU has), and any other value is ignored."""
    return bp_gemm_kernel_name().decode()


def _gemm_config():
    """The GEMM's run-time configuration, for tests and benchmarks: the level, the cache
    sizes its blocking was derived from (bytes, by level), the most threads one product
    uses, and per dtype the micro-tile (mr x nr) and the blocking (kc, mc, nc)."""
    return {"kernel": simd_kernel(), "max_team": bp_ctx.max_team,
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


def set_num_threads(int n):
    """Use at most `n` threads in every kernel; `n=0` goes back to OpenMP's own setting."""
    global _requested_threads
    if n < 0:
        raise ValueError(f"set_num_threads: n must be >= 0 (0 = OpenMP default), got {n}")
    _requested_threads = n


def get_num_threads():
    """The number of threads the kernels may use, always >= 1."""
    return _num_threads()


cdef inline int _num_threads() noexcept:
    # omp_get_max_threads() follows OMP_NUM_THREADS and threadpoolctl's limits.
    if _forked_child:
        return 1
    cdef int available = bp_omp_max_threads()
    if _requested_threads > 0 and _requested_threads < available:
        return _requested_threads
    return available if available > 0 else 1


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
    with nogil:
        if src64:
            bad = _strided_copy(<double*>NULL, base, s0, s1, picks, dst, ld, rows, cols, dst64)
        else:
            bad = _strided_copy(<float*>NULL, base, s0, s1, picks, dst, ld, rows, cols, dst64)
    if bad >= 0:
        raise ValueError(f"{name} contains NaN or Inf (in row {bad}); "
                         "clean or impute the data first")
    return 0


ctypedef fused destination:
    float
    double


cdef inline bint _copy_row(const floating* row, Py_ssize_t step, destination* out,
                           Py_ssize_t cols) noexcept nogil:
    """out[j] = row[j * step]; True if every value is finite.  v - v is 0 for finite v and
    NaN for NaN and +-Inf; and-ing integer flags (not summing floats) keeps the loop free
    of a serial dependency, so the compiler vectorises it."""
    cdef Py_ssize_t j
    cdef int finite = 1
    if step == 1:
        for j in range(cols):
            out[j] = <destination>row[j]
            finite &= row[j] - row[j] == 0
    else:
        for j in range(cols):
            out[j] = <destination>row[j * step]
            finite &= row[j * step] - row[j * step] == 0
    return finite


cdef Py_ssize_t _strided_copy(floating* kind, const char* src, Py_ssize_t s0, Py_ssize_t s1,
                              const int64_t* index, char* dst, Py_ssize_t ld,
                              Py_ssize_t rows, Py_ssize_t cols, bint dst64) noexcept nogil:
    # Returns the first source row holding a non-finite value, or -1.
    cdef Py_ssize_t i, r, step = s1 // <Py_ssize_t>sizeof(floating)
    cdef const floating* row
    cdef bint finite
    for i in range(rows):
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


cdef bint _copy_unaligned(const floating* row, Py_ssize_t s1, char* dst, Py_ssize_t ld,
                          Py_ssize_t i, Py_ssize_t cols, bint dst64) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating v
    cdef int finite = 1
    for j in range(cols):
        memcpy(&v, <const char*>row + j * s1, sizeof(floating))
        finite &= v - v == 0
        if dst64:
            (<double*>dst)[i * ld + j] = v
        else:
            (<float*>dst)[i * ld + j] = <float>v
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
    """The compiled half of every optimizer: its hyperparameters as a C struct (read by
    the nogil update) and its state buffers, each shaped like the flat parameter buffer.
    The public classes in `backprop.optim` validate arguments and document the rules."""
    cdef OptimConfig config
    cdef readonly dict state
    cdef object _dtype
    cdef bint _is64
    cdef Py_ssize_t _size
    cdef char* slots[3]            # the state buffers' data; unused slots stay NULL

    def __cinit__(self, *args, **kwargs):
        self.state = {}
        self._size = -1

    def __init__(self, **config):
        """Set the hyperparameters (the step count restarts at 0; state is untouched)."""
        cdef dict merged = {"kind": 0, "step": 0, "lr": 0.0, "weight_decay": 0.0,
                            "decoupled": False, "momentum": 0.0, "dampening": 0.0,
                            "nesterov": False, "beta1": 0.0, "beta2": 0.0, "amsgrad": False,
                            "eps": 0.0, "alpha": 0.0, "centered": False, "lr_decay": 0.0}
        merged.update(config)
        self.config = merged

    @property
    def lr(self):
        """The learning rate; schedules change it between steps."""
        return self.config.lr

    @lr.setter
    def lr(self, value):
        value = float(value)
        if not value >= 0:
            raise ValueError(f"lr must be a non-negative number, got {value}")
        self.config.lr = value

    @property
    def attached(self):
        """Whether this optimizer has been bound to a network's parameters."""
        return self._size >= 0

    @property
    def steps(self):
        """How many updates this optimizer has made."""
        return self.config.step

    def _config(self):
        return self.config

    def _bind(self, Py_ssize_t size, dtype, dict initial):
        """Create zeroed (or `initial`-valued) state buffers for `size` parameters."""
        self._dtype = np.dtype(dtype)
        self._is64 = self._dtype == np.float64
        self._size = size
        self.state = {name: np.full(size, value, dtype=self._dtype)
                      for name, value in initial.items()}
        self.slots[0] = self.slots[1] = self.slots[2] = NULL
        for i, buffer in enumerate(self.state.values()):
            self.slots[i] = <char*>cnp.PyArray_DATA(buffer)
        self.config.step = 0

    def _load(self, OptimizerBase template, long step, dict state):
        """Take `template`'s hyperparameters, this step count and these state buffers,
        all checked before anything changes."""
        if set(state) != set(self.state):
            raise ValueError(f"optimizer state must have the buffers {sorted(self.state)}, "
                             f"got {sorted(state)}")
        for name, value in state.items():
            value = np.asarray(value)
            if value.shape != (self._size,) or value.dtype != self._dtype:
                raise ValueError(f"optimizer state {name!r} must have shape ({self._size},) "
                                 f"and dtype {self._dtype}, got {_describe(value)}")
        if step < 0:
            raise ValueError(f"optimizer step must be >= 0, got {step}")
        for name, value in state.items():
            self.state[name][...] = value
        self.config = template.config
        self.config.step = step

    def _update(self, cnp.ndarray params, cnp.ndarray grads):
        """One update of `params` from `grads` (both the flat buffers it was bound to)."""
        if self._size < 0:
            raise RuntimeError("this optimizer is not attached to a network")
        if params.shape[0] != self._size or grads.shape[0] != self._size \
                or params.dtype != self._dtype or grads.dtype != self._dtype:
            raise ValueError("params and grads must be the flat buffers the optimizer was "
                             f"bound to ({self._size} values of {self._dtype})")
        cdef char* p = <char*>cnp.PyArray_DATA(params)
        cdef char* g = <char*>cnp.PyArray_DATA(grads)
        cdef int nt = _num_threads()
        with nogil:
            self._run_nogil(p, g, self._size, nt, False)

    cdef void _run_nogil(self, char* p, char* g, Py_ssize_t n, int n_threads,
                         bint clear_grads) noexcept nogil:
        if self._is64:
            optimizer_update(&self.config, <double*>p, <double*>g, <double*>self.slots[0],
                             <double*>self.slots[1], <double*>self.slots[2],
                             n, n_threads, clear_grads)
        else:
            optimizer_update(&self.config, <float*>p, <float*>g, <float*>self.slots[0],
                             <float*>self.slots[1], <float*>self.slots[2],
                             n, n_threads, clear_grads)


# --------------------------------------------------------------------------- the engine

cdef struct LayerBuffers:
    Py_ssize_t n_in, n_out
    int activation
    Py_ssize_t w_off, b_off    # offsets into the flat parameter/gradient buffers; b_off < 0: no bias
    char* a                    # outputs, batch x n_out, row stride lda
    char* z                    # pre-activations (same stride), or NULL where not needed
    Py_ssize_t lda


cdef struct Net:
    int n_layers
    LayerBuffers* layers
    char* params
    char* grads
    Py_ssize_t batch           # rows of the last forward
    char* x                    # the input batch, copied in (row stride ldx)
    Py_ssize_t ldx
    char* d0                   # two ping-pong delta buffers, row stride ldd
    char* d1
    Py_ssize_t ldd
    char* dx                   # dL/dx, batch x n_in, contiguous
    char* target               # float targets (row stride ldt) or
    Py_ssize_t ldt
    int64_t* labels            # integer class labels
    double* lse                # log-sum-exp of each output row (softmax outputs)
    void* gemm_scratch
    Py_ssize_t scratch_bytes   # its size: what the largest product of a pass needs


cdef Py_ssize_t _padded(Py_ssize_t n, Py_ssize_t itemsize):
    # Rows whose stride is a multiple of 256 bytes put the rows of a GEMM tile into the
    # same L1 sets; one extra cache line per row avoids it (see GEMM-NOTES.md).
    if n >= 64 and (n * itemsize) % 256 == 0:
        return n + 64 // itemsize
    return n


cdef void forward_pass(floating* kind, Net* net, int nt) noexcept nogil:
    """Every layer's output from net.x: one GEMM each, bias and activation fused into its
    write-back; softmax (row-wise) right after."""
    cdef const floating* P = <const floating*>net.params
    cdef const floating* inp = <const floating*>net.x
    cdef Py_ssize_t ld_in = net.ldx, B = net.batch, i
    cdef LayerBuffers* L
    cdef floating* a
    cdef floating* z
    cdef int l
    for l in range(net.n_layers):
        L = &net.layers[l]
        a = <floating*>L.a
        z = <floating*>L.z
        if z == NULL:
            gemm(B, L.n_out, L.n_in, inp, ld_in, False, P + L.w_off, L.n_in, True,
                 a, L.lda, False, P + L.b_off if L.b_off >= 0 else NULL, L.activation,
                 nt, net.gemm_scratch)
            if L.activation == SOFTMAX:
                softmax_rows(a, L.lda, a, L.lda, B, L.n_out, NULL)
        else:
            gemm(B, L.n_out, L.n_in, inp, ld_in, False, P + L.w_off, L.n_in, True,
                 z, L.lda, False, P + L.b_off if L.b_off >= 0 else NULL, IDENTITY,
                 nt, net.gemm_scratch)
            if L.activation == SOFTMAX:
                softmax_rows(z, L.lda, a, L.lda, B, L.n_out,
                             net.lse if l == net.n_layers - 1 else NULL)
            else:
                for i in range(B):
                    memcpy(a + i * L.lda, z + i * L.lda, L.n_out * sizeof(floating))
                activate_tile(a, L.lda, B, L.n_out, L.activation)
        inp = a
        ld_in = L.lda


cdef double loss_delta(floating* kind, Net* net, int loss, bint labels) noexcept nogil:
    """The loss of the last forward against net.target/net.labels; leaves dL/dz of the
    output layer in net.d0."""
    cdef LayerBuffers* L = &net.layers[net.n_layers - 1]
    cdef const floating* a = <const floating*>L.a
    cdef const floating* z = <const floating*>L.z
    cdef const floating* y = <const floating*>net.target
    cdef floating* d = <floating*>net.d0
    cdef double value
    if loss == MSE:
        value = mse(a, L.lda, y, net.ldt, net.batch, L.n_out, d, net.ldd)
        activation_backward(d, net.ldd, a, L.lda, z, L.lda, net.batch, L.n_out, L.activation)
    elif loss == BINARY_CROSS_ENTROPY:
        value = binary_cross_entropy(z, L.lda, y, net.ldt, net.batch, L.n_out, d, net.ldd)
    elif labels:
        value = cross_entropy_labels(z, L.lda, net.lse, a, L.lda, net.labels, net.batch, L.n_out,
                                     d, net.ldd)
    else:
        value = cross_entropy_probs(z, L.lda, net.lse, a, L.lda, y, net.ldt, net.batch, L.n_out,
                                    d, net.ldd)
    return value


cdef void column_sums(const floating* d, Py_ssize_t ldd, Py_ssize_t rows, Py_ssize_t cols,
                      floating* out) noexcept nogil:
    # out += sum over rows, always in row order, so the result never depends on threads.
    cdef Py_ssize_t i, j
    for i in range(rows):
        for j in range(cols):
            out[j] += d[i * ldd + j]


cdef void backward_pass(floating* kind, Net* net, int nt, bint input_grad) noexcept nogil:
    """Accumulate every layer's gradients from dL/dz of the output layer (in net.d0):
    dW += dZ^T X, db += column sums of dZ, dX = dZ W, then dZ_prev = dX * f'(a_prev)."""
    cdef const floating* P = <const floating*>net.params
    cdef floating* G = <floating*>net.grads
    cdef floating* cur = <floating*>net.d0
    cdef floating* nxt = <floating*>net.d1
    cdef floating* swap
    cdef const floating* inp
    cdef Py_ssize_t ld_in, B = net.batch
    cdef LayerBuffers* L
    cdef LayerBuffers* prev
    cdef int l
    for l in range(net.n_layers - 1, -1, -1):
        L = &net.layers[l]
        if l > 0:
            prev = &net.layers[l - 1]
            inp, ld_in = <const floating*>prev.a, prev.lda
        else:
            inp, ld_in = <const floating*>net.x, net.ldx
        gemm(L.n_out, L.n_in, B, cur, net.ldd, True, inp, ld_in, False,
             G + L.w_off, L.n_in, True, NULL, IDENTITY, nt, net.gemm_scratch)
        if L.b_off >= 0:
            column_sums(cur, net.ldd, B, L.n_out, G + L.b_off)
        if l > 0:
            gemm(B, L.n_in, L.n_out, cur, net.ldd, False, P + L.w_off, L.n_in, False,
                 nxt, net.ldd, False, NULL, IDENTITY, nt, net.gemm_scratch)
            activation_backward(nxt, net.ldd, <const floating*>prev.a, prev.lda,
                                <const floating*>prev.z, prev.lda, B, prev.n_out,
                                prev.activation)
            swap = cur
            cur = nxt
            nxt = swap
        elif input_grad:
            gemm(B, L.n_in, L.n_out, cur, net.ldd, False, P + L.w_off, L.n_in, False,
                 <floating*>net.dx, L.n_in, False, NULL, IDENTITY, nt, net.gemm_scratch)


cdef double sum_of_squares(const floating* v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef double total = 0.0
    for i in range(n):
        total += <double>v[i] * v[i]
    return total


cdef class Engine:
    """The compiled side of a Network: its layer table and reusable workspace.

    Built by `Network`, which owns the flat `params` and `grads` buffers; the Engine
    holds pointers into them, so both must stay alive and never be reallocated.
    """
    cdef Net net
    cdef readonly object dtype
    cdef bint is64
    cdef int loss                  # a Loss code, or -1 for none
    cdef Py_ssize_t capacity       # rows the workspace can hold
    cdef cnp.ndarray params, grads
    cdef dict workspace            # name -> the ndarray behind each workspace pointer
    cdef readonly bint has_forward, has_grads, has_input_grad
    cdef bint busy                 # a pass is running (the GIL is released inside it)

    def __cinit__(self):
        self.net.layers = NULL
        self.net.gemm_scratch = NULL
        self.net.scratch_bytes = 0

    def __init__(self, list shapes, list activations, list offsets, str loss,
                 cnp.ndarray params, cnp.ndarray grads):
        """shapes: [(n_in, n_out)], activations: names, offsets: [(w_off, b_off or -1)]."""
        cdef int l, n = len(shapes)
        if params.dtype != grads.dtype or params.dtype not in (np.float32, np.float64) \
                or params.ndim != 1 or params.shape[0] != grads.shape[0] \
                or not params.flags.c_contiguous or not grads.flags.c_contiguous:
            raise ValueError("params and grads must be contiguous flat float buffers of one size")
        self.params, self.grads, self.dtype = params, grads, params.dtype
        self.is64 = params.dtype == np.float64
        self.loss = LOSSES[loss] if loss is not None else -1
        self.net.n_layers = n
        self.net.params = <char*>cnp.PyArray_DATA(params)
        self.net.grads = <char*>cnp.PyArray_DATA(grads)
        self.net.layers = <LayerBuffers*>bp_aligned_alloc(n * sizeof(LayerBuffers))
        if self.net.layers == NULL:
            raise MemoryError()
        for l in range(n):
            self.net.layers[l].n_in, self.net.layers[l].n_out = shapes[l]
            self.net.layers[l].activation = ACTIVATIONS[activations[l]]
            self.net.layers[l].w_off, self.net.layers[l].b_off = offsets[l]
            self.net.layers[l].a = self.net.layers[l].z = NULL
        self.capacity = 0
        self.net.batch = 0
        self.workspace = {}

    def __dealloc__(self):
        free(self.net.layers)
        free(self.net.gemm_scratch)

    # ---- workspace

    cdef int _reserve(self, Py_ssize_t rows) except -1:
        """Make the workspace hold `rows` rows; it only ever grows, so steps after the
        first (and any smaller last batch of an epoch) allocate nothing."""
        cdef int l, n = self.net.n_layers
        cdef Py_ssize_t item = self.dtype.itemsize, widest = 1
        cdef LayerBuffers* L
        if rows <= self.capacity:
            return 0
        self.workspace = {}
        n_in = self.net.layers[0].n_in
        self.net.ldx = _padded(n_in, item)
        self.net.x = self._buffer("x", rows, self.net.ldx)
        self.net.dx = self._buffer("dx", rows, n_in)
        for l in range(n):
            L = &self.net.layers[l]
            L.lda = _padded(L.n_out, item)
            L.a = self._buffer(f"a{l}", rows, L.lda)
            L.z = NULL
            if l == n - 1 or needs_preactivation(L.activation):
                L.z = self._buffer(f"z{l}", rows, L.lda)
            widest = max(widest, L.n_out)
        self.net.ldd = _padded(widest, item)
        self.net.d0 = self._buffer("d0", rows, self.net.ldd)
        self.net.d1 = self._buffer("d1", rows, self.net.ldd)
        self.net.ldt = L.n_out
        self.net.target = self._buffer("target", rows, L.n_out)
        self.net.labels = <int64_t*>self._buffer("labels", rows, 1, np.int64)
        self.net.lse = <double*>self._buffer("lse", rows, 1, np.float64)
        self.capacity = rows
        return 0

    cdef char* _buffer(self, str name, Py_ssize_t rows, Py_ssize_t ld, dtype=None):
        array = np.zeros((rows, ld), dtype=self.dtype if dtype is None else dtype)
        self.workspace[name] = array
        return <char*>cnp.PyArray_DATA(array)

    cdef object _view(self, str name, Py_ssize_t cols):
        # The valid part of a workspace buffer, read-only: it is overwritten by the next pass.
        view = self.workspace[name][:self.net.batch, :cols]
        view.flags.writeable = False
        return view

    cdef int _threads(self) except -1:
        """The team for the next pass, with the GEMM scratch grown (never shrunk) to what
        every product of a pass over the current batch needs with that team."""
        cdef int nt = _num_threads(), l
        cdef Py_ssize_t B = self.net.batch, item = self.dtype.itemsize, need = 0
        cdef LayerBuffers* L
        for l in range(self.net.n_layers):
            L = &self.net.layers[l]
            need = max(need, gemm_scratch_bytes(B, L.n_out, L.n_in, nt, item),   # forward
                       gemm_scratch_bytes(L.n_out, L.n_in, B, nt, item),         # dW
                       gemm_scratch_bytes(B, L.n_in, L.n_out, nt, item))         # dX
        if need > self.net.scratch_bytes:
            free(self.net.gemm_scratch)
            self.net.gemm_scratch = bp_aligned_alloc(need)
            self.net.scratch_bytes = need if self.net.gemm_scratch != NULL else 0
            if self.net.gemm_scratch == NULL:
                raise MemoryError("cannot allocate the GEMM packing buffers")
        return nt

    # ---- loading inputs and targets (all validation happens here)

    cdef int _load_input(self, object x, cnp.ndarray index=None) except -1:
        """Validate x and copy it (or its rows `index`) into the input buffer."""
        cdef cnp.ndarray arr = _as_float_array(x, "x", 2)
        cdef Py_ssize_t n_in = self.net.layers[0].n_in
        cdef Py_ssize_t rows = arr.shape[0] if index is None else index.shape[0]
        if arr.shape[1] != n_in:
            raise ValueError(f"x must have {n_in} features (columns), got {_describe(arr)}")
        if rows == 0:
            raise ValueError("x is an empty batch (0 rows)")
        self.has_forward = self.has_input_grad = False   # the saved activations are replaced
        self._reserve(rows)
        _copy_rows(arr, "x", self.net.x, self.net.ldx, self.is64, index)
        self.net.batch = rows
        return 0

    cdef bint _load_target(self, object y, cnp.ndarray index=None) except -1:
        """Copy y (or its rows `index`) into the target buffers, matching the last input
        batch; returns True for integer class labels."""
        cdef LayerBuffers* L = &self.net.layers[self.net.n_layers - 1]
        cdef Py_ssize_t rows = self.net.batch, n_out = L.n_out
        cdef cnp.ndarray arr
        if self.loss < 0:
            raise RuntimeError("this network has no loss: pass grad_output=, or give "
                               "Network(..., loss=...)")
        cdef int ndim = cnp.PyArray_NDIM(y) if cnp.PyArray_Check(y) else np.ndim(y)
        if self.loss == CROSS_ENTROPY and ndim == 1:
            _copy_labels(y, n_out, self.net.labels, rows, index)
            return True
        arr = _as_float_array(y, "y", ndim if (ndim == 2 or (ndim == 1 and n_out == 1)) else 2)
        if (ndim == 2 and arr.shape[1] != n_out) or (index is None and arr.shape[0] != rows):
            raise ValueError(f"y must have shape ({rows}, {n_out}) to match x and the output "
                             f"layer, got {_describe(arr)}")
        _copy_rows(arr, "y", self.net.target, self.net.ldt, self.is64, index)
        if self.loss != MSE:
            self._check_probabilities()
        return False

    cdef int _check_probabilities(self) except -1:
        """Targets of the cross-entropies are probabilities: in [0, 1], and rows summing
        to 1 for cross_entropy.  Checked on the copied batch, in C."""
        cdef LayerBuffers* L = &self.net.layers[self.net.n_layers - 1]
        cdef Py_ssize_t bad
        cdef bint rows_sum_to_one = self.loss == CROSS_ENTROPY
        with nogil:
            if self.is64:
                bad = _first_improper_row(<double*>self.net.target, self.net.ldt,
                                          self.net.batch, L.n_out, rows_sum_to_one)
            else:
                bad = _first_improper_row(<float*>self.net.target, self.net.ldt,
                                          self.net.batch, L.n_out, rows_sum_to_one)
        if bad >= 0:
            row = self.workspace["target"][bad, :L.n_out]
            raise ValueError(f"y: targets of {self._loss_name()} must be probabilities in "
                             f"[0, 1]{', each row summing to 1' if rows_sum_to_one else ''}; "
                             f"row {bad} is {row}")
        return 0

    def _loss_name(self):
        return {v: k for k, v in LOSSES.items()}.get(self.loss)

    # ---- the passes

    def forward(self, x):
        """Run the network on x; returns a read-only view of the output (valid until the
        next forward)."""
        self._enter()
        try:
            return self._forward(x)
        finally:
            self.busy = False

    cdef object _forward(self, x):
        self._load_input(x)
        cdef int nt = self._threads()
        with nogil:
            if self.is64:
                forward_pass(<double*>NULL, &self.net, nt)
            else:
                forward_pass(<float*>NULL, &self.net, nt)
        self.has_forward = True
        self.has_input_grad = False
        return self.output()

    def layer_output(self, int layer):
        """Layer `layer`'s outputs for the last forward (read-only view)."""
        self._check_forward("layer_output")
        if not 0 <= layer < self.net.n_layers:
            raise IndexError(f"layer must be in [0, {self.net.n_layers}), got {layer}")
        return self._view(f"a{layer}", self.net.layers[layer].n_out)

    def output(self):
        return self._view(f"a{self.net.n_layers - 1}", self.net.layers[self.net.n_layers - 1].n_out)

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

    def loss_value(self, y):
        """The loss of the last forward's output against y (gradients untouched)."""
        self._enter()
        try:
            return self._loss_value(y)
        finally:
            self.busy = False

    cdef object _loss_value(self, y):
        self._check_forward("loss")
        cdef bint labels = self._load_target(y)
        cdef double value
        with nogil:
            if self.is64:
                value = loss_delta(<double*>NULL, &self.net, self.loss, labels)
            else:
                value = loss_delta(<float*>NULL, &self.net, self.loss, labels)
        return value

    def backward(self, y=None, grad_output=None, bint input_grad=True):
        """Accumulate gradients from the built-in loss against y, or from an external
        dL/d(output) `grad_output`; returns the loss (None with grad_output)."""
        self._enter()
        try:
            return self._backward(y, grad_output, input_grad)
        finally:
            self.busy = False

    cdef object _backward(self, y=None, grad_output=None, bint input_grad=True):
        self._check_forward("backward")
        cdef LayerBuffers* L = &self.net.layers[self.net.n_layers - 1]
        cdef bint labels = False
        cdef double value = 0.0
        cdef int nt = self._threads()
        cdef cnp.ndarray g
        if (y is None) == (grad_output is None):
            raise TypeError("backward takes either targets y or grad_output, not both or neither")
        if grad_output is not None:
            g = _as_float_array(grad_output, "grad_output", 2)
            if g.shape[0] != self.net.batch or g.shape[1] != L.n_out:
                raise ValueError(f"grad_output must have shape ({self.net.batch}, {L.n_out}) "
                                 f"like the last forward's output, got {_describe(g)}")
            _copy_rows(g, "grad_output", self.net.d0, self.net.ldd, self.is64)
        else:
            labels = self._load_target(y)
        with nogil:
            if self.is64:
                if grad_output is None:
                    value = loss_delta(<double*>NULL, &self.net, self.loss, labels)
                else:
                    activation_backward(<double*>self.net.d0, self.net.ldd,
                                        <double*>L.a, L.lda, <double*>L.z, L.lda,
                                        self.net.batch, L.n_out, L.activation)
                backward_pass(<double*>NULL, &self.net, nt, input_grad)
            else:
                if grad_output is None:
                    value = loss_delta(<float*>NULL, &self.net, self.loss, labels)
                else:
                    activation_backward(<float*>self.net.d0, self.net.ldd,
                                        <float*>L.a, L.lda, <float*>L.z, L.lda,
                                        self.net.batch, L.n_out, L.activation)
                backward_pass(<float*>NULL, &self.net, nt, input_grad)
        self.has_grads = True
        self.has_input_grad = input_grad
        return value if grad_output is None else None

    def input_grad(self):
        if not self.has_input_grad:
            raise RuntimeError("no input gradient: call backward() after forward() first")
        return self._view("dx", self.net.layers[0].n_in)

    def step(self, OptimizerBase optimizer):
        """One optimizer update from the accumulated gradients."""
        self._enter()
        try:
            return self._step(optimizer)
        finally:
            self.busy = False

    cdef object _step(self, OptimizerBase optimizer):
        if not self.has_grads:
            raise RuntimeError("step() needs gradients: call backward() first")
        optimizer._update(self.params, self.grads)
        self.has_forward = False   # the saved activations belong to the old weights

    def zero_grad(self):
        self._enter()                  # never while another thread's pass writes them
        self.grads.fill(0)
        self.has_grads = False
        self.busy = False

    def train_step(self, x, y, OptimizerBase optimizer, rows=None):
        """forward, loss, backward, optimizer update and zero_grad, with the GIL released
        from the first multiply to the last update.  With `rows`, the batch is x[rows],
        y[rows], gathered straight into the workspace."""
        self._enter()
        try:
            return self._train_step(x, y, optimizer, rows)
        finally:
            self.busy = False

    cdef object _train_step(self, x, y, OptimizerBase optimizer, rows=None):
        cdef cnp.ndarray index = None if rows is None else _row_index(rows, len(x))
        if index is not None and len(y) != len(x):
            raise ValueError(f"x and y must have the same number of rows, got {len(x)} and {len(y)}")
        self._load_input(x, index)
        cdef bint labels = self._load_target(y, index)
        cdef int nt = self._threads()
        cdef double value
        if optimizer._size != self.params.shape[0] or optimizer._is64 != self.is64:
            raise ValueError("the optimizer is bound to another network")
        with nogil:
            if self.is64:
                forward_pass(<double*>NULL, &self.net, nt)
                value = loss_delta(<double*>NULL, &self.net, self.loss, labels)
                if isfinite(value):
                    backward_pass(<double*>NULL, &self.net, nt, False)
            else:
                forward_pass(<float*>NULL, &self.net, nt)
                value = loss_delta(<float*>NULL, &self.net, self.loss, labels)
                if isfinite(value):
                    backward_pass(<float*>NULL, &self.net, nt, False)
            if isfinite(value):
                optimizer._run_nogil(self.net.params, self.net.grads, optimizer._size, nt, True)
        self.has_input_grad = self.has_grads = False
        # The forward stays inspectable (layer_output) only when the step was refused.
        self.has_forward = not isfinite(value)
        if not isfinite(value):
            raise FloatingPointError(
                f"the loss is {value} (diverged); this step's update was not applied, so the "
                "weights are those of the last good step")
        return value

    def grad_norm(self):
        """The Euclidean norm of all gradients together (for clipping)."""
        cdef double total
        cdef Py_ssize_t n = self.grads.shape[0]
        with nogil:
            if self.is64:
                total = sum_of_squares(<double*>self.net.grads, n)
            else:
                total = sum_of_squares(<float*>self.net.grads, n)
        return sqrt(total)
