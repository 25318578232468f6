/* Products with a side too thin for the MR x NR tiles, computed without packing.
 *
 * A layer with one to a few outputs (a regressor's or classifier's last layer) makes
 * products whose C has a handful of columns (the forward, x W^T), a handful of rows (the
 * weight gradient, dz^T x) or whose k is a handful (the input gradient, dz W).  A tile
 * kernel would compute 32 columns to keep 1, and packing would cost more than the
 * arithmetic; these loops read the operands where they are.  They are compiled at the
 * kernels' SIMD level like every element-wise loop (setup.py builds the kernels per level).
 *
 *   bp_dot_rows_*   C[i, j] (+)= sum_p A[i, p] B[j, p], rows i0..i1: both operands
 *                   contiguous along k.  Four columns at a time share each load of A's
 *                   row; each sum is vectorised along k (an omp simd reduction: one
 *                   fixed order for a given build and k, whatever the thread count;
 *                   a build without OpenMP runs it as a plain loop).
 *   bp_axpy_rows_*  C[i, :] (+)= sum_p A(i, p) B[p, :], rows i0..i1, with A(i, p) at
 *                   a[i * lda + p], or a[p * lda + i] when trans_a: B's rows contiguous
 *                   along n; each row of C is updated in place over p in order,
 *                   vectorised along n.
 */
#ifndef BP_GEMM_SKINNY_H
#define BP_GEMM_SKINNY_H

#include <stddef.h>

#define BP_DOT_ROWS(NAME, T)                                                              \
static void NAME(ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t n, ptrdiff_t k,                    \
                 const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb,                    \
                 T *c, ptrdiff_t ldc, int accumulate)                                     \
{                                                                                         \
    for (ptrdiff_t i = i0; i < i1; i++) {                                                 \
        const T *x = a + i * lda;                                                         \
        T *out = c + i * ldc;                                                             \
        ptrdiff_t j = 0;                                                                  \
        for (; j + 4 <= n; j += 4) {                                                      \
            const T *b0 = b + j * ldb, *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;    \
            T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                             \
            _Pragma("omp simd reduction(+:s0, s1, s2, s3)")                               \
            for (ptrdiff_t p = 0; p < k; p++) {                                           \
                s0 += x[p] * b0[p];                                                       \
                s1 += x[p] * b1[p];                                                       \
                s2 += x[p] * b2[p];                                                       \
                s3 += x[p] * b3[p];                                                       \
            }                                                                             \
            out[j] = accumulate ? out[j] + s0 : s0;                                       \
            out[j + 1] = accumulate ? out[j + 1] + s1 : s1;                               \
            out[j + 2] = accumulate ? out[j + 2] + s2 : s2;                               \
            out[j + 3] = accumulate ? out[j + 3] + s3 : s3;                               \
        }                                                                                 \
        for (; j < n; j++) {                                                              \
            const T *bj = b + j * ldb;                                                    \
            T s = 0;                                                                      \
            _Pragma("omp simd reduction(+:s)")                                            \
            for (ptrdiff_t p = 0; p < k; p++)                                             \
                s += x[p] * bj[p];                                                        \
            out[j] = accumulate ? out[j] + s : s;                                         \
        }                                                                                 \
    }                                                                                     \
}

#define BP_AXPY_ROWS(NAME, T)                                                             \
static void NAME(ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t n, ptrdiff_t k,                    \
                 const T *a, ptrdiff_t lda, int trans_a, const T *b, ptrdiff_t ldb,       \
                 T *c, ptrdiff_t ldc, int accumulate)                                     \
{                                                                                         \
    for (ptrdiff_t i = i0; i < i1; i++) {                                                 \
        T *restrict out = c + i * ldc;                                                    \
        if (!accumulate)                                                                  \
            for (ptrdiff_t j = 0; j < n; j++)                                             \
                out[j] = 0;                                                               \
        for (ptrdiff_t p = 0; p < k; p++) {                                               \
            const T s = trans_a ? a[p * lda + i] : a[i * lda + p];                        \
            const T *restrict row = b + p * ldb;                                          \
            for (ptrdiff_t j = 0; j < n; j++)                                             \
                out[j] += s * row[j];                                                     \
        }                                                                                 \
    }                                                                                     \
}

BP_DOT_ROWS(bp_dot_rows_s, float)
BP_DOT_ROWS(bp_dot_rows_d, double)
BP_AXPY_ROWS(bp_axpy_rows_s, float)
BP_AXPY_ROWS(bp_axpy_rows_d, double)

#endif  /* BP_GEMM_SKINNY_H */
