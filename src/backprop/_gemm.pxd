# PLACEHOLDER matrix multiply (correct, slow): replaced by the packed BLIS-style GEMM.
from cython cimport floating
from cython.parallel cimport prange
from backprop._activations cimport activate_tile


cdef inline Py_ssize_t gemm_workspace_bytes(int n_threads) noexcept nogil:
    return 64


cdef inline void gemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                      const floating* a, Py_ssize_t lda, bint trans_a,
                      const floating* b, Py_ssize_t ldb, bint trans_b,
                      floating* c, Py_ssize_t ldc, bint accumulate,
                      const floating* bias, int activation,
                      int n_threads, void* workspace) noexcept nogil:
    cdef Py_ssize_t i, j, p, sa_i, sa_p, sb_p, sb_j
    cdef floating acc
    sa_i = 1 if trans_a else lda
    sa_p = lda if trans_a else 1
    sb_p = 1 if trans_b else ldb
    sb_j = ldb if trans_b else 1
    if m * n * k < 100000:
        n_threads = 1
    for i in prange(m, nogil=True, schedule='static', num_threads=n_threads):
        for j in range(n):
            acc = 0
            for p in range(k):
                acc = acc + a[i * sa_i + p * sa_p] * b[p * sb_p + j * sb_j]
            if accumulate:
                acc = acc + c[i * ldc + j]
            if bias != NULL:
                acc = acc + bias[j]
            c[i * ldc + j] = acc
        activate_tile(c + i * ldc, ldc, 1, n, activation)
