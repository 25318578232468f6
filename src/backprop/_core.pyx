# The engine of the compiled core: validating wrappers around the nogil kernels.
#
# Three tiers, as in scikit-learn's _loss.pyx.tp:
#   1. kernels  - `cdef inline ... noexcept nogil` loops on raw typed memory, one family
#                 per .pxd file (one per layer kind: _dense, _batchnorm, ...; and _gemm,
#                 _activations, _losses, _optim), compiled once per SIMD level
#                 (_kernels.pyx) and reached through that level's table (_level.pxd);
#   2. here     - every input is checked (type, dtype, shape, finiteness, ranges) and copied
#                 into buffers this module owns, and only then is the GIL released;
#   3. Python   - network.py, layers/, losses.py, optim.py compose these into the API.
#
# This module is compiled once, for any CPU: it cimports declarations only (_ops.pxd,
# _level.pxd), never a kernel, and runs no parallel loop of its own (the threads belong
# to the kernels' level).  It is read in parts: _copying.pxi (checking and copying what
# users pass), _optimizer.pxi (the optimizers' compiled half) and _engine.pxi (the
# Engine: one network's tape, workspace and passes).
cimport cython
cimport numpy as cnp
from cython cimport floating
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset
from libc.math cimport sqrt, isfinite, INFINITY, NAN

import math
import threading
import time

import numpy as np

from backprop._ops cimport (Tape, Op, Slot, Kernel, LossKernel, Rule, OptimConfig, STAT_BLOCK,
                            N_HELD, FLOAT32, BFLOAT16, most, mix64)
from backprop._level cimport (Level, LEVEL_CAPSULE, gather_t, forward_pass, loss_delta,
                              backward_pass, weight_penalty, optimizer_update, sum_of_squares,
                              largest_magnitude, product)
from backprop._simd import load_kernels

cnp.import_array()

# The kernels of the level this CPU runs best (backprop/_simd.py), and their table.
_kernels = load_kernels()
cdef const Level* LEVEL = <const Level*>PyCapsule_GetPointer(_kernels.LEVEL, LEVEL_CAPSULE)
if LEVEL.size != sizeof(Level):
    raise ImportError(f"{_kernels.__name__} was built from another version of backprop "
                      "than backprop._core: reinstall backprop")

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

# What the kernels' level defines, re-exported: the kind tables by name (the planner, the
# layers and the optimizers find rows here), activation codes, and the functions tests
# and benchmarks use to look at the level's own arithmetic.
KERNELS = _kernels.KERNELS
LOSS_KERNELS = _kernels.LOSS_KERNELS
RULES = _kernels.RULES
RECURRENT_CELLS = _kernels.RECURRENT_CELLS
ACTIVATIONS = _kernels.ACTIVATIONS
_bfloat16_rounded = _kernels._bfloat16_rounded
_float32_gates = _kernels._float32_gates
_gemm_config = _kernels._gemm_config
_team_threads = _kernels._team_threads
_team_spin = _kernels._team_spin


def dropout_key(uint64_t seed, uint64_t layer):
    """The hash key of Dropout layer number `layer` in a network seeded with `seed`."""
    return mix64(mix64(seed) ^ mix64(layer + 1))


def _op_fields():
    """The fields of a tape record (Op in _ops.pxd), nested ones as dicts: the planner
    must fill exactly these (a dict with other keys would be read without them)."""
    cdef Op op
    memset(&op, 0, sizeof(Op))
    return dict(op)


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
    return LEVEL.simd.decode()


def bfloat16_kernel():
    """How products in bfloat16 run here: "avx512_bf16" (the CPU's VDPBF16PS, twice the
    multiply-adds of float per instruction) or "emulated" (the operands rounded to
    bfloat16 and multiplied by the float kernels: the same numbers within summation order,
    no faster than float32).  BACKPROP_BF16=emulated set before import turns the native
    kernels off."""
    return LEVEL.bfloat16.decode()


PRECISIONS = {"float32": FLOAT32, "bfloat16": BFLOAT16}


def _bfloat16_peak(int n_threads, long iterations=2_000_000):
    """GFLOP/s of independent VDPBF16PS on `n_threads` threads at once (no memory traffic):
    the CPU's bfloat16 limit, for benchmarks.  0 without native bfloat16 products."""
    if not 1 <= n_threads <= MAX_THREADS:
        return 0.0
    return _kernels._bfloat16_peak(n_threads, iterations)


def _gemm_scratch_bytes(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int n_threads, dtype):
    """The packing scratch one m x n x k product of `dtype` needs on `n_threads` threads."""
    # gemm_scratch_bytes rounds the sides up to whole tiles in C: every caller bounds them
    # (matmul by its arrays, which NumPy keeps below 2**63 bytes; a network by the
    # workspace it allocated), and so does this one.
    if not (0 <= m <= MAX_OPERAND_SIDE and 0 <= n <= MAX_OPERAND_SIDE
            and 0 <= k <= MAX_OPERAND_SIDE):
        raise ValueError(f"m, n, k must lie in [0, {MAX_OPERAND_SIDE}], got {(m, n, k)}")
    return LEVEL.product_scratch(m, n, k, n_threads, np.dtype(dtype).itemsize)


# The longest side a product may have: an operand of more float32 values than this would
# hold more bytes than NumPy allows.
MAX_OPERAND_SIDE = 1 << 61


def openmp_enabled():
    """True if the extension was built with OpenMP (False only for BACKPROP_SERIAL=1 builds)."""
    return bool(BACKPROP_OPENMP)


cdef int _requested_threads = 0   # 0: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)
cdef bint _forked_child = False   # set in a child made by fork(): one thread only


def _after_fork_in_child():
    """Where the compiler's OpenMP runtime runs the regions (not GCC on Linux, whose
    builds run them on backprop's own team, which a forked child restarts: _team.h),
    GNU libgomp's thread pool does not survive fork(): a child that enters a parallel
    region after its parent used one waits forever on threads that do not exist (GCC bug
    52303).  Such a child therefore runs every kernel on one thread."""
    global _forked_child
    if not LEVEL.own_team:
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



include "_copying.pxi"

# --------------------------------------------------------------------------- matmul

def matmul(a, b, out=None, *, bint trans_a=False, bint trans_b=False, bint accumulate=False,
           precision="float32"):
    """op(a) @ op(b) with the core's GEMM, where op transposes when asked.

    a : ndarray of shape (m, k), or (k, m) if trans_a
    b : ndarray of shape (k, n), or (n, k) if trans_b
    out : ndarray of shape (m, n), optional.  Must be C-contiguous, writeable and of the
        operands' dtype; it is written in place (added to when `accumulate`).
    Both operands must share one dtype, float32 or float64; any strides are accepted
    (non-unit inner strides are copied first).
    precision : "float32" (default), or "bfloat16" for float32 operands: each rounded to
        bfloat16 as it is packed, the products summed in float32 (see bfloat16_kernel).
    """
    cdef int products = _products(precision, "precision")
    a = _as_float_array(a, "a", 2)
    b = _as_float_array(b, "b", 2)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if products == BFLOAT16 and a.dtype != np.float32:
        raise ValueError(f"precision='bfloat16' multiplies float32 operands, got {a.dtype}")
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
        _matmul(<double*>NULL, A, B, C, m, n, k, trans_a, trans_b, accumulate, FLOAT32)
    else:
        _matmul(<float*>NULL, A, B, C, m, n, k, trans_a, trans_b, accumulate, products)
    return out


cdef int _products(precision, name) except -1:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


cdef cnp.ndarray _unit_inner_stride(cnp.ndarray a):
    # The GEMM reads rows with a leading dimension; columns must be adjacent.
    if a.shape[0] == 0 or a.shape[1] == 0:
        return np.ascontiguousarray(a)
    if a.strides[1] != a.itemsize or a.strides[0] % a.itemsize or a.strides[0] < a.shape[1] * a.itemsize:
        return np.ascontiguousarray(a)
    return a


cdef void _matmul(floating* kind, cnp.ndarray a, cnp.ndarray b, cnp.ndarray out,
                  Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                  bint trans_a, bint trans_b, bint accumulate, int products):
    cdef Py_ssize_t lda = max(1, a.strides[0] // a.itemsize)
    cdef Py_ssize_t ldb = max(1, b.strides[0] // b.itemsize)
    cdef const floating* pa = <const floating*>cnp.PyArray_DATA(a)
    cdef const floating* pb = <const floating*>cnp.PyArray_DATA(b)
    cdef floating* pc = <floating*>cnp.PyArray_DATA(out)
    cdef int nt = _num_threads()
    cdef void* scratch = bp_aligned_alloc(LEVEL.product_scratch(m, n, k, nt, sizeof(floating)))
    if scratch == NULL:
        raise MemoryError("cannot allocate the GEMM packing buffers")
    with nogil:
        product(LEVEL, m, n, k, pa, lda, trans_a, pb, ldb, trans_b, pc, n, accumulate,
                products, nt, scratch)
    free(scratch)



include "_optimizer.pxi"

include "_engine.pxi"
