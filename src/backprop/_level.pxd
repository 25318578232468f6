# The one interface between the engine and the kernels of a SIMD level.
#
# The engine (_core.pyx: checking what users pass, buffers, the Engine and optimizer
# classes) is compiled once, for any x86-64; it gains nothing from wider vectors.  The
# kernels (_kernels.pyx: every loop over values, the GEMM, the threads) are compiled once
# per SIMD level, so that each element-wise loop is vectorised as wide as the CPU allows.
# A level's module fills one Level (this table of function pointers) and exports it as a
# capsule; the engine takes the table of the level backprop/_simd.py chose at import and
# calls every kernel through it, as BLIS calls its micro-kernels through a context.
#
# The shims below keep the engine's calls as they read before the split: one fused call,
# dispatched here on the dtype.  Nothing in this file may pull a kernel into the engine:
# it cimports declarations only (_ops.pxd).
from cython cimport floating
from libc.stdint cimport int64_t
from backprop._ops cimport Tape, Kernel, LossKernel, Rule, OptimConfig

cdef extern from *:
    """
    #define BP_LEVEL_CAPSULE "backprop._kernels.Level"
    """
    const char* LEVEL_CAPSULE "BP_LEVEL_CAPSULE"

ctypedef void (*forward_pass32_t)(float* kind, Tape* t, int nt) noexcept nogil
ctypedef void (*forward_pass64_t)(double* kind, Tape* t, int nt) noexcept nogil
ctypedef double (*loss_delta32_t)(float* kind, Tape* t, const LossKernel* loss, bint labels,
                                  double scale) noexcept nogil
ctypedef double (*loss_delta64_t)(double* kind, Tape* t, const LossKernel* loss, bint labels,
                                  double scale) noexcept nogil
ctypedef void (*backward_pass32_t)(float* kind, Tape* t, int nt, bint input_grad,
                                   bint from_logits) noexcept nogil
ctypedef void (*backward_pass64_t)(double* kind, Tape* t, int nt, bint input_grad,
                                   bint from_logits) noexcept nogil
ctypedef double (*weight_penalty32_t)(float* kind, Tape* t, double l2, double scale,
                                      double* block_sums, int nt) noexcept nogil
ctypedef double (*weight_penalty64_t)(double* kind, Tape* t, double l2, double scale,
                                      double* block_sums, int nt) noexcept nogil
ctypedef void (*update32_t)(const Rule* rule, OptimConfig* c, float* p, float* g, float* s0,
                            float* s1, float* s2, double clip, Py_ssize_t n, int n_threads,
                            bint clear, double* written, double* parts) noexcept nogil
ctypedef void (*update64_t)(const Rule* rule, OptimConfig* c, double* p, double* g,
                            double* s0, double* s1, double* s2, double clip, Py_ssize_t n,
                            int n_threads, bint clear, double* written,
                            double* parts) noexcept nogil
ctypedef double (*sum_of_squares32_t)(const float* g, Py_ssize_t n, double* block_sums,
                                      int n_threads) noexcept nogil
ctypedef double (*sum_of_squares64_t)(const double* g, Py_ssize_t n, double* block_sums,
                                      int n_threads) noexcept nogil
ctypedef double (*largest32_t)(const float* x, Py_ssize_t n) noexcept nogil
ctypedef double (*largest64_t)(const double* x, Py_ssize_t n) noexcept nogil
ctypedef void (*product32_t)(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a,
                             Py_ssize_t lda, bint trans_a, const float* b, Py_ssize_t ldb,
                             bint trans_b, float* c, Py_ssize_t ldc, bint accumulate,
                             int products, int n_threads, void* scratch) noexcept nogil
ctypedef void (*product64_t)(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const double* a,
                             Py_ssize_t lda, bint trans_a, const double* b, Py_ssize_t ldb,
                             bint trans_b, double* c, Py_ssize_t ldc, bint accumulate,
                             int products, int n_threads, void* scratch) noexcept nogil
ctypedef Py_ssize_t (*product_scratch_t)(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                                         int n_threads, Py_ssize_t itemsize) noexcept nogil
ctypedef Py_ssize_t (*gather_t)(const char* src, Py_ssize_t s0, Py_ssize_t s1,
                                const int64_t* index, char* dst, Py_ssize_t ld,
                                Py_ssize_t rows, Py_ssize_t cols, bint dst64,
                                int n_threads) noexcept nogil

cdef struct Level:
    Py_ssize_t size               # sizeof(Level) where the level was compiled: a module
                                  # from another build of this file is refused at import
    const char* simd              # "avx512", "avx2+fma" or "generic"
    const char* bfloat16          # "avx512_bf16" or "emulated"
    bint own_team                 # the regions run on backprop's own threads (_team.h)
    # The kind tables: one row per layer kind, loss and optimizer rule.
    const Kernel* kernels
    int n_kernels
    const LossKernel* losses
    int n_losses
    const Rule* rules
    int n_rules
    # The tape's passes (_tape.pxd).
    forward_pass32_t forward_pass32
    forward_pass64_t forward_pass64
    loss_delta32_t loss_delta32
    loss_delta64_t loss_delta64
    backward_pass32_t backward_pass32
    backward_pass64_t backward_pass64
    weight_penalty32_t weight_penalty32
    weight_penalty64_t weight_penalty64
    # The optimizer's passes (_optim.pxd).
    update32_t update32
    update64_t update64
    sum_of_squares32_t sum_of_squares32
    sum_of_squares64_t sum_of_squares64
    largest32_t largest32
    largest64_t largest64
    # Products (_gemm.pxd) and the scratch they need.
    product32_t product32
    product64_t product64
    product_scratch_t product_scratch
    # Rows copied in from users' arrays, each value checked (_gather.pxd), from float
    # and from double sources.
    gather_t gather32
    gather_t gather64


cdef inline void forward_pass(const Level* L, floating* kind, Tape* t, int nt) noexcept nogil:
    if floating is float:
        L.forward_pass32(kind, t, nt)
    else:
        L.forward_pass64(kind, t, nt)


cdef inline double loss_delta(const Level* L, floating* kind, Tape* t, const LossKernel* loss,
                              bint labels, double scale) noexcept nogil:
    if floating is float:
        return L.loss_delta32(kind, t, loss, labels, scale)
    else:
        return L.loss_delta64(kind, t, loss, labels, scale)


cdef inline void backward_pass(const Level* L, floating* kind, Tape* t, int nt,
                               bint input_grad, bint from_logits) noexcept nogil:
    if floating is float:
        L.backward_pass32(kind, t, nt, input_grad, from_logits)
    else:
        L.backward_pass64(kind, t, nt, input_grad, from_logits)


cdef inline double weight_penalty(const Level* L, floating* kind, Tape* t, double l2,
                                  double scale, double* block_sums, int nt) noexcept nogil:
    if floating is float:
        return L.weight_penalty32(kind, t, l2, scale, block_sums, nt)
    else:
        return L.weight_penalty64(kind, t, l2, scale, block_sums, nt)


cdef inline void optimizer_update(const Level* L, const Rule* rule, OptimConfig* c,
                                  floating* p, floating* g, floating* s0, floating* s1,
                                  floating* s2, double clip, Py_ssize_t n, int n_threads,
                                  bint clear, double* written, double* parts) noexcept nogil:
    if floating is float:
        L.update32(rule, c, p, g, s0, s1, s2, clip, n, n_threads, clear, written, parts)
    else:
        L.update64(rule, c, p, g, s0, s1, s2, clip, n, n_threads, clear, written, parts)


cdef inline double sum_of_squares(const Level* L, const floating* g, Py_ssize_t n,
                                  double* block_sums, int n_threads) noexcept nogil:
    if floating is float:
        return L.sum_of_squares32(g, n, block_sums, n_threads)
    else:
        return L.sum_of_squares64(g, n, block_sums, n_threads)


cdef inline double largest_magnitude(const Level* L, const floating* x,
                                     Py_ssize_t n) noexcept nogil:
    if floating is float:
        return L.largest32(x, n)
    else:
        return L.largest64(x, n)


cdef inline void product(const Level* L, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                         const floating* a, Py_ssize_t lda, bint trans_a, const floating* b,
                         Py_ssize_t ldb, bint trans_b, floating* c, Py_ssize_t ldc,
                         bint accumulate, int products, int n_threads,
                         void* scratch) noexcept nogil:
    if floating is float:
        L.product32(m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, accumulate, products,
                    n_threads, scratch)
    else:
        L.product64(m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, accumulate, products,
                    n_threads, scratch)
