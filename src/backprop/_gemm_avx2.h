/* The AVX2+FMA level: 6 x 16 float and 6 x 8 double micro-kernels, each holding its
 * tile in 12 ymm accumulators for the whole k loop (+ 2 B loads + 1 broadcast = 15 of
 * the 16 registers), and a transposing float pack built from 8 x 8 register
 * transposes.  Included by _gemm_kernels.h; every function carries its own target
 * attribute, so the rest of the module stays baseline x86-64.
 */
#ifndef BP_GEMM_AVX2_H
#define BP_GEMM_AVX2_H

#define BP_AVX2 __attribute__((target("avx2,fma")))
#define BP_AVX2_MR 6
#define BP_AVX2_NR_FLOAT 16
#define BP_AVX2_NR_DOUBLE 8

/* One k step of row i: broadcast A[i], two fused multiply-adds into the row's two
 * accumulators. */
#define BP_ROW_S(i) { __m256 ai = _mm256_broadcast_ss(a + i);      \
                      c##i##0 = _mm256_fmadd_ps(ai, b0, c##i##0);  \
                      c##i##1 = _mm256_fmadd_ps(ai, b1, c##i##1); }
#define BP_STORE_S(i) {                                                                  \
        float *row = c + i * ldc;                                                        \
        if (add) {                                                                       \
            c##i##0 = _mm256_add_ps(_mm256_loadu_ps(row), c##i##0);                      \
            c##i##1 = _mm256_add_ps(_mm256_loadu_ps(row + 8), c##i##1);                  \
        }                                                                                \
        _mm256_storeu_ps(row, c##i##0);                                                  \
        _mm256_storeu_ps(row + 8, c##i##1); }

/* A whole 6 x 16 tile: C = A.B, or C += A.B when `add`. */
BP_AVX2 static void bp_skernel_avx2_full(ptrdiff_t k, const float *a, const float *b,
                                         float *c, ptrdiff_t ldc, int add)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
           c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int i = 0; i < BP_AVX2_MR; i++)     /* the C tile is needed at the end */
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
#pragma GCC unroll 4
    for (ptrdiff_t p = 0; p < k; p++) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        BP_ROW_S(0) BP_ROW_S(1) BP_ROW_S(2) BP_ROW_S(3) BP_ROW_S(4) BP_ROW_S(5)
        a += BP_AVX2_MR;
        b += BP_AVX2_NR_FLOAT;
    }
    BP_STORE_S(0) BP_STORE_S(1) BP_STORE_S(2) BP_STORE_S(3) BP_STORE_S(4) BP_STORE_S(5)
}

BP_AVX2 static void bp_skernel_avx2(ptrdiff_t k, const void *a_, const void *b_, float *c,
                                    ptrdiff_t ldc, int rows, int cols, int add)
{
    const float *a = (const float *)a_, *b = (const float *)b_;
    if (rows == BP_AVX2_MR && cols == BP_AVX2_NR_FLOAT)
        bp_skernel_avx2_full(k, a, b, c, ldc, add);
    else
        BP_EDGE_THROUGH_SCRATCH(float, bp_skernel_avx2_full, BP_AVX2_MR, BP_AVX2_NR_FLOAT,
                                k, a, b, c, ldc, rows, cols, add);
}

#define BP_ROW_D(i) { __m256d ai = _mm256_broadcast_sd(a + i);     \
                      c##i##0 = _mm256_fmadd_pd(ai, b0, c##i##0);  \
                      c##i##1 = _mm256_fmadd_pd(ai, b1, c##i##1); }
#define BP_STORE_D(i) {                                                                  \
        double *row = c + i * ldc;                                                       \
        if (add) {                                                                       \
            c##i##0 = _mm256_add_pd(_mm256_loadu_pd(row), c##i##0);                      \
            c##i##1 = _mm256_add_pd(_mm256_loadu_pd(row + 4), c##i##1);                  \
        }                                                                                \
        _mm256_storeu_pd(row, c##i##0);                                                  \
        _mm256_storeu_pd(row + 4, c##i##1); }

BP_AVX2 static void bp_dkernel_avx2_full(ptrdiff_t k, const double *a, const double *b,
                                         double *c, ptrdiff_t ldc, int add)
{
    __m256d c00 = _mm256_setzero_pd(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
            c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int i = 0; i < BP_AVX2_MR; i++)
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
#pragma GCC unroll 4
    for (ptrdiff_t p = 0; p < k; p++) {
        __m256d b0 = _mm256_loadu_pd(b), b1 = _mm256_loadu_pd(b + 4);
        BP_ROW_D(0) BP_ROW_D(1) BP_ROW_D(2) BP_ROW_D(3) BP_ROW_D(4) BP_ROW_D(5)
        a += BP_AVX2_MR;
        b += BP_AVX2_NR_DOUBLE;
    }
    BP_STORE_D(0) BP_STORE_D(1) BP_STORE_D(2) BP_STORE_D(3) BP_STORE_D(4) BP_STORE_D(5)
}

BP_AVX2 static void bp_dkernel_avx2(ptrdiff_t k, const void *a_, const void *b_, double *c,
                                    ptrdiff_t ldc, int rows, int cols, int add)
{
    const double *a = (const double *)a_, *b = (const double *)b_;
    if (rows == BP_AVX2_MR && cols == BP_AVX2_NR_DOUBLE)
        bp_dkernel_avx2_full(k, a, b, c, ldc, add);
    else
        BP_EDGE_THROUGH_SCRATCH(double, bp_dkernel_avx2_full, BP_AVX2_MR, BP_AVX2_NR_DOUBLE,
                                k, a, b, c, ldc, rows, cols, add);
}

/* A full 16-wide float panel, dst[p * 16 + j] = src[j * ld + p], in 8 x 8 blocks
 * transposed in registers: 8 row loads, 24 shuffles, 8 stores, instead of 64 scalar
 * moves that each touch a different cache line.  Other widths, partial panels and the
 * k tail go to the portable loop. */
BP_AVX2 static void bp_pack_transpose_s_avx2(void *dst_, const float *src, ptrdiff_t ld,
                                             ptrdiff_t kc, int width, int valid)
{
    float *dst = (float *)dst_;
    if (width != 16 || valid != 16) {
        bp_pack_transpose_s_generic(dst, src, ld, kc, width, valid);
        return;
    }
    ptrdiff_t p = 0;
    for (; p + 8 <= kc; p += 8) {
        for (int half = 0; half < 2; half++) {
            const float *s = src + half * 8 * ld + p;
            __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ld),
                   r2 = _mm256_loadu_ps(s + 2 * ld), r3 = _mm256_loadu_ps(s + 3 * ld),
                   r4 = _mm256_loadu_ps(s + 4 * ld), r5 = _mm256_loadu_ps(s + 5 * ld),
                   r6 = _mm256_loadu_ps(s + 6 * ld), r7 = _mm256_loadu_ps(s + 7 * ld);
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                   t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                   t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
                   u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                   u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
                   u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
                   u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)),
                   u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
                   u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)),
                   u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
            float *d = dst + p * 16 + half * 8;
            _mm256_storeu_ps(d + 0 * 16, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(d + 1 * 16, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(d + 2 * 16, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(d + 3 * 16, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(d + 4 * 16, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(d + 5 * 16, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(d + 6 * 16, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(d + 7 * 16, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
    }
    bp_pack_transpose_s_generic(dst + p * 16, src + p, ld, kc - p, 16, 16);
}

#endif  /* BP_GEMM_AVX2_H */
