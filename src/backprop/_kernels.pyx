# The kernels of one SIMD level, behind one table.
#
# setup.py compiles this file once per SIMD level: as backprop._kernels for any x86-64
# (or any other CPU), and, included by _kernels_avx2.pyx and _kernels_avx512.pyx, with
# those instruction sets.  backprop/_simd.py imports the level the CPU runs best, and the
# engine (_core.pyx, compiled once) calls every kernel through the Level this module
# exports (_level.pxd): the kind tables, the tape's and the optimizer's passes, the
# products, the copying of users' rows.  The module also holds the few Python functions
# that must run this level's code (tests compare its rounding; benchmarks read its GEMM
# configuration), which the engine re-exports.
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_New
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint32_t, uint64_t

import numpy as np

from backprop._level cimport Level, LEVEL_CAPSULE
from backprop._ops cimport Kernel, LossKernel, Rule, no_scratch
from backprop._gemm cimport (gemm, gemm_scratch_bytes, bp_gemm_init, bp_gemm_kernel_name,
                             bp_bf16_kernel_name, bp_bf16_rounded, bp_bf16_peak_loop,
                             BP_BF16_PEAK_FLOPS_PER_ITERATION, bp_ctx, bp_ctx_caches,
                             PARALLEL_MIN_WORK)
from backprop._activations cimport Activation, IDENTITY, SOFTMAX
from backprop._parallel cimport BP_OWN_TEAM, bp_team_helpers, bp_team_set_spin, bp_team_spin
from backprop._tape cimport forward_pass, loss_delta, backward_pass, weight_penalty
from backprop._gather cimport gather_rows
from backprop._dense cimport dense_run, dense_back, dense_scratch
from backprop._batchnorm cimport batchnorm_run, batchnorm_back
from backprop._layernorm cimport layernorm_run, layernorm_back
from backprop._dropout cimport dropout_run, dropout_back
from backprop._residual cimport residual_run, identity_run, identity_back
from backprop._relayout cimport relayout_run, relayout_back
from backprop._conv cimport conv_run, conv_back, conv_scratch
from backprop._pool cimport max_pool_run, max_pool_back, avg_pool_run, avg_pool_back
from backprop._embedding cimport embedding_run, embedding_back
from backprop._recurrent cimport (recurrent_run, recurrent_back, recurrent_scratch,
                                  last_step_run, last_step_back, CELL_RNN, CELL_LSTM, CELL_GRU,
                                  RNN_GATES, RNN_KEPT, LSTM_GATES, LSTM_KEPT, GRU_GATES,
                                  GRU_KEPT)
from backprop._losses cimport mse_loss, binary_cross_entropy_loss, cross_entropy_loss
from backprop._optim cimport (optimizer_update, sum_of_squares, largest_magnitude, sgd_range,
                             sgd_bound, adam_range, adam_bound, rmsprop_range, rmsprop_bound,
                             adagrad_range, adagrad_bound)

cnp.import_array()
if bp_gemm_init() != 0:
    raise ImportError(f"{__name__} was compiled for SIMD instructions this CPU lacks; "
                      "import backprop, which picks the level the CPU runs (backprop/_simd.py)")


# --------------------------------------------------------------------------- the kinds

# The tables of compiled kinds: one row per layer kind, loss and optimizer rule, each
# naming the kernels that run it.  This is the only place the compiled core lists kinds;
# the passes call through these tables, the Python side finds a kind's row by its name
# (KERNELS, LOSS_KERNELS, RULES) when a network is planned, and a name not here is
# refused then, never run by some default branch.  Adding a kind: its kernel file, one
# row here, and its Python declaration (backprop/layers/, losses.py, optim.py).
cdef enum:
    N_KERNELS = 13
    N_LOSS_KERNELS = 3
    N_RULES = 4

cdef Kernel KERNEL_TABLE[N_KERNELS]
KERNEL_TABLE[0] = Kernel(b"dense", dense_run[float], dense_run[double],
                         dense_back[float], dense_back[double], dense_scratch)
KERNEL_TABLE[1] = Kernel(b"batchnorm", batchnorm_run[float], batchnorm_run[double],
                         batchnorm_back[float], batchnorm_back[double], no_scratch)
KERNEL_TABLE[2] = Kernel(b"layernorm", layernorm_run[float], layernorm_run[double],
                         layernorm_back[float], layernorm_back[double], no_scratch)
KERNEL_TABLE[3] = Kernel(b"dropout", dropout_run[float], dropout_run[double],
                         dropout_back[float], dropout_back[double], no_scratch)
KERNEL_TABLE[4] = Kernel(b"activation", identity_run[float], identity_run[double],
                         identity_back[float], identity_back[double], no_scratch)
KERNEL_TABLE[5] = Kernel(b"residual", residual_run[float], residual_run[double],
                         identity_back[float], identity_back[double], no_scratch)
KERNEL_TABLE[6] = Kernel(b"relayout", relayout_run[float], relayout_run[double],
                         relayout_back[float], relayout_back[double], no_scratch)
KERNEL_TABLE[7] = Kernel(b"conv", conv_run[float], conv_run[double],
                         conv_back[float], conv_back[double], conv_scratch)
KERNEL_TABLE[8] = Kernel(b"max_pool", max_pool_run[float], max_pool_run[double],
                         max_pool_back[float], max_pool_back[double], no_scratch)
KERNEL_TABLE[9] = Kernel(b"avg_pool", avg_pool_run[float], avg_pool_run[double],
                         avg_pool_back[float], avg_pool_back[double], no_scratch)
KERNEL_TABLE[10] = Kernel(b"embedding", embedding_run[float], embedding_run[double],
                          embedding_back[float], embedding_back[double], no_scratch)
KERNEL_TABLE[11] = Kernel(b"recurrent", recurrent_run[float], recurrent_run[double],
                          recurrent_back[float], recurrent_back[double], recurrent_scratch)
KERNEL_TABLE[12] = Kernel(b"last_step", last_step_run[float], last_step_run[double],
                          last_step_back[float], last_step_back[double], no_scratch)

cdef LossKernel LOSS_TABLE[N_LOSS_KERNELS]
LOSS_TABLE[0] = LossKernel(b"mse", mse_loss[float], mse_loss[double])
LOSS_TABLE[1] = LossKernel(b"binary_cross_entropy", binary_cross_entropy_loss[float],
                           binary_cross_entropy_loss[double])
LOSS_TABLE[2] = LossKernel(b"cross_entropy", cross_entropy_loss[float],
                           cross_entropy_loss[double])

cdef Rule RULE_TABLE[N_RULES]
RULE_TABLE[0] = Rule(b"sgd", 1, sgd_range[float, uint32_t], sgd_range[double, uint64_t],
                     sgd_bound)
RULE_TABLE[1] = Rule(b"adam", 3, adam_range[float, uint32_t], adam_range[double, uint64_t],
                     adam_bound)
RULE_TABLE[2] = Rule(b"rmsprop", 3, rmsprop_range[float, uint32_t],
                     rmsprop_range[double, uint64_t], rmsprop_bound)
RULE_TABLE[3] = Rule(b"adagrad", 1, adagrad_range[float, uint32_t],
                     adagrad_range[double, uint64_t], adagrad_bound)


cdef bint _complete_kernel(const Kernel* k) noexcept:
    return (k.name != NULL and k.forward32 != NULL and k.forward64 != NULL
            and k.backward32 != NULL and k.backward64 != NULL and k.scratch != NULL)


# A row left empty (a count raised without its row) must stop the import, not run.
for _i in range(N_KERNELS):
    if not _complete_kernel(&KERNEL_TABLE[_i]):
        raise ImportError(f"backprop: row {_i} of the kernel table is incomplete")
for _i in range(N_LOSS_KERNELS):
    if LOSS_TABLE[_i].name == NULL or not LOSS_TABLE[_i].value32 or not LOSS_TABLE[_i].value64:
        raise ImportError(f"backprop: row {_i} of the loss table is incomplete")
for _i in range(N_RULES):
    if (RULE_TABLE[_i].name == NULL or not RULE_TABLE[_i].update32
            or not RULE_TABLE[_i].update64 or not RULE_TABLE[_i].bound):
        raise ImportError(f"backprop: row {_i} of the rule table is incomplete")

# name -> row, for the planner, the Engine and the optimizers.
KERNELS = {KERNEL_TABLE[i].name.decode(): i for i in range(N_KERNELS)}
LOSS_KERNELS = {LOSS_TABLE[i].name.decode(): i for i in range(N_LOSS_KERNELS)}
RULES = {RULE_TABLE[i].name.decode(): i for i in range(N_RULES)}

# The cells of the recurrent row (_recurrent.pxd): name -> (its code in a record, rows of
# W_ih and W_hh and values the backward keeps per step, each per hidden unit).  The layers
# take their shapes and saved area from here, so the two sides cannot disagree.
RECURRENT_CELLS = {"rnn": (CELL_RNN, RNN_GATES, RNN_KEPT),
                   "lstm": (CELL_LSTM, LSTM_GATES, LSTM_KEPT),
                   "gru": (CELL_GRU, GRU_GATES, GRU_KEPT)}


# --------------------------------------------------------------------------- the level's table

cdef double _largest32(const float* x, Py_ssize_t n) noexcept nogil:
    return largest_magnitude(x, n, <uint32_t*>NULL)


cdef double _largest64(const double* x, Py_ssize_t n) noexcept nogil:
    return largest_magnitude(x, n, <uint64_t*>NULL)


cdef void _product32(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a, Py_ssize_t lda,
                     bint trans_a, const float* b, Py_ssize_t ldb, bint trans_b, float* c,
                     Py_ssize_t ldc, bint accumulate, int products, int n_threads,
                     void* scratch) noexcept nogil:
    gemm(m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, accumulate, NULL, IDENTITY,
         products, n_threads, scratch)


cdef void _product64(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const double* a,
                     Py_ssize_t lda, bint trans_a, const double* b, Py_ssize_t ldb,
                     bint trans_b, double* c, Py_ssize_t ldc, bint accumulate, int products,
                     int n_threads, void* scratch) noexcept nogil:
    gemm(m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, accumulate, NULL, IDENTITY,
         products, n_threads, scratch)


cdef Py_ssize_t _gather32(const char* src, Py_ssize_t s0, Py_ssize_t s1, const int64_t* index,
                         char* dst, Py_ssize_t ld, Py_ssize_t rows, Py_ssize_t cols,
                         bint dst64, int n_threads) noexcept nogil:
    return gather_rows(<float*>NULL, src, s0, s1, index, dst, ld, rows, cols, dst64, n_threads)


cdef Py_ssize_t _gather64(const char* src, Py_ssize_t s0, Py_ssize_t s1, const int64_t* index,
                         char* dst, Py_ssize_t ld, Py_ssize_t rows, Py_ssize_t cols,
                         bint dst64, int n_threads) noexcept nogil:
    return gather_rows(<double*>NULL, src, s0, s1, index, dst, ld, rows, cols, dst64, n_threads)


# Positional: a field left out is a compile error, not a NULL the engine would call.  (The
# tables are passed as &TABLE[0]: Cython 3.3 copies an array named whole into a pointer
# field, through the uninitialised pointer.)
cdef Level LEVEL_TABLE = Level(
    sizeof(Level), bp_gemm_kernel_name(), bp_bf16_kernel_name(), BP_OWN_TEAM,
    &KERNEL_TABLE[0], N_KERNELS, &LOSS_TABLE[0], N_LOSS_KERNELS, &RULE_TABLE[0], N_RULES,
    forward_pass[float], forward_pass[double], loss_delta[float], loss_delta[double],
    backward_pass[float], backward_pass[double], weight_penalty[float], weight_penalty[double],
    optimizer_update[float], optimizer_update[double],
    sum_of_squares[float], sum_of_squares[double], _largest32, _largest64,
    _product32, _product64, gemm_scratch_bytes,
    _gather32, _gather64)

LEVEL = PyCapsule_New(&LEVEL_TABLE, LEVEL_CAPSULE, NULL)

ACTIVATIONS = {
    "identity": IDENTITY, "sigmoid": Activation.SIGMOID, "tanh": Activation.TANH,
    "relu": Activation.RELU, "leaky_relu": Activation.LEAKY_RELU, "elu": Activation.ELU,
    "gelu": Activation.GELU, "softplus": Activation.SOFTPLUS, "softmax": SOFTMAX,
}


# --------------------------------------------------------------------------- for tests

def _bfloat16_rounded(x):
    """float32 array x rounded to the nearest bfloat16 values (ties to even, subnormals to
    zero), as the products' packing rounds their operands: for tests."""
    cdef cnp.ndarray flat = np.array(x, dtype=np.float32).reshape(-1)
    cdef float* values = <float*>cnp.PyArray_DATA(flat)
    cdef Py_ssize_t i
    for i in range(flat.shape[0]):
        values[i] = bp_bf16_rounded(values[i])
    return flat.reshape(np.shape(x))


def _bfloat16_peak(int n_threads, long iterations=2_000_000):
    """GFLOP/s of independent VDPBF16PS on `n_threads` threads at once (no memory traffic):
    the CPU's bfloat16 limit, for benchmarks.  0 without native bfloat16 products (the
    engine checks n_threads)."""
    import time
    if bp_bf16_kernel_name() != b"avx512_bf16":
        return 0.0
    cdef cnp.ndarray sinks = np.zeros(n_threads, np.float32)
    cdef float* sink = <float*>cnp.PyArray_DATA(sinks)
    cdef int t
    start = time.perf_counter()
    for t in prange(n_threads, nogil=True, num_threads=n_threads, schedule="static"):
        sink[t] = bp_bf16_peak_loop(iterations)
    seconds = time.perf_counter() - start
    return n_threads * iterations * BP_BF16_PEAK_FLOPS_PER_ITERATION / seconds / 1e9


cdef extern from "_gates.h" nogil:
    float bp_sigmoidf(float x)
    float bp_tanhf(float x)


def _float32_gates(x):
    """(sigmoid(x), tanh(x)) as a float32 recurrent cell computes them (_gates.h): for
    tests."""
    cdef cnp.ndarray flat = np.array(x, dtype=np.float32).reshape(-1)
    cdef cnp.ndarray s = np.empty_like(flat), t = np.empty_like(flat)
    cdef const float* xs = <const float*>cnp.PyArray_DATA(flat)
    cdef float* ss = <float*>cnp.PyArray_DATA(s)
    cdef float* ts = <float*>cnp.PyArray_DATA(t)
    cdef Py_ssize_t i
    for i in range(flat.shape[0]):
        ss[i] = bp_sigmoidf(xs[i])
        ts[i] = bp_tanhf(xs[i])
    shape = np.shape(x)
    return s.reshape(shape), t.reshape(shape)


def _gemm_config():
    """The GEMM's run-time configuration, for tests and benchmarks: the level, the cache
    sizes its blocking was derived from (bytes, by level), the fewest multiply-adds a
    product splits between threads, and per dtype the micro-tile (mr x nr) and the
    blocking (kc, mc, nc)."""
    return {"kernel": bp_gemm_kernel_name().decode(),
            "parallel_min_work": PARALLEL_MIN_WORK,
            "caches": {"L1": bp_ctx_caches.size[1], "L2": bp_ctx_caches.size[2],
                       "L3": bp_ctx_caches.size[3]},
            "float32": bp_ctx.s.blk, "bfloat16": bp_ctx.b.blk,
            "float64": bp_ctx.d.blk}   # structs become dicts


def _team_threads():
    """Helper threads the parallel regions have started so far (_team.h; 0 where the
    compiler's OpenMP runtime runs them instead)."""
    return bp_team_helpers()


def _team_spin(ns=None):
    """How long (ns) an idle helper spins before it sleeps; `ns` sets it (-1: the
    default).  -1 where the compiler's OpenMP runtime runs the regions."""
    if ns is not None:
        bp_team_set_spin(int(ns))
    return bp_team_spin()
