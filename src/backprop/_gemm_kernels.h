/* GEMM micro-kernels and the run-time choice between them.
 *
 * A micro-kernel multiplies one packed MR x k panel of A by one packed k x NR panel of B
 * and writes (or adds) the MR x NR result into C.  The AVX2+FMA kernels hold the whole
 * 6 x 16 (float) or 6 x 8 (double) tile in 12 ymm registers for the entire k loop; that
 * is where a GEMM's time goes, and why they are written with intrinsics (a plain loop
 * over an accumulator array keeps it in memory and runs ~40x slower).
 *
 * They carry their own target attribute, so the module is compiled without -mavx2 and
 * still imports on any x86-64; bp_gemm_init() picks them only when the CPU has AVX2 and
 * FMA, unless BACKPROP_SIMD=generic asks for the portable kernels.
 */
#ifndef BP_GEMM_KERNELS_H
#define BP_GEMM_KERNELS_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BP_HAVE_X86_SIMD 1
#endif

#define BP_MR 6
#define BP_NR_FLOAT 16
#define BP_NR_DOUBLE 8

typedef void (*bp_skernel_t)(ptrdiff_t, const float *, const float *, float *, ptrdiff_t, int);
typedef void (*bp_dkernel_t)(ptrdiff_t, const double *, const double *, double *, ptrdiff_t, int);

/* Portable kernels: the same contract, written for clarity; the compiler vectorises
 * the inner j loop with whatever the baseline ISA offers. */
#define BP_GENERIC_KERNEL(name, T, NR)                                                  \
    static void name(ptrdiff_t k, const T *a, const T *b, T *c, ptrdiff_t ldc, int add) \
    {                                                                                   \
        T acc[BP_MR][NR];                                                               \
        memset(acc, 0, sizeof(acc));                                                    \
        for (ptrdiff_t p = 0; p < k; p++, a += BP_MR, b += NR)                          \
            for (int i = 0; i < BP_MR; i++)                                             \
                for (int j = 0; j < NR; j++)                                            \
                    acc[i][j] += a[i] * b[j];                                           \
        for (int i = 0; i < BP_MR; i++)                                                 \
            for (int j = 0; j < NR; j++)                                                \
                c[i * ldc + j] = add ? c[i * ldc + j] + acc[i][j] : acc[i][j];          \
    }

BP_GENERIC_KERNEL(bp_skernel_generic, float, BP_NR_FLOAT)
BP_GENERIC_KERNEL(bp_dkernel_generic, double, BP_NR_DOUBLE)

#ifdef BP_HAVE_X86_SIMD
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

__attribute__((target("avx2,fma")))
static void bp_skernel_avx2(ptrdiff_t k, const float *a, const float *b, float *c,
                            ptrdiff_t ldc, int add)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
           c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int i = 0; i < BP_MR; i++)          /* the C tile is needed at the end */
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
#pragma GCC unroll 4
    for (ptrdiff_t p = 0; p < k; p++) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        BP_ROW_S(0) BP_ROW_S(1) BP_ROW_S(2) BP_ROW_S(3) BP_ROW_S(4) BP_ROW_S(5)
        a += BP_MR;
        b += BP_NR_FLOAT;
    }
    BP_STORE_S(0) BP_STORE_S(1) BP_STORE_S(2) BP_STORE_S(3) BP_STORE_S(4) BP_STORE_S(5)
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

__attribute__((target("avx2,fma")))
static void bp_dkernel_avx2(ptrdiff_t k, const double *a, const double *b, double *c,
                            ptrdiff_t ldc, int add)
{
    __m256d c00 = _mm256_setzero_pd(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
            c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int i = 0; i < BP_MR; i++)
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
#pragma GCC unroll 4
    for (ptrdiff_t p = 0; p < k; p++) {
        __m256d b0 = _mm256_loadu_pd(b), b1 = _mm256_loadu_pd(b + 4);
        BP_ROW_D(0) BP_ROW_D(1) BP_ROW_D(2) BP_ROW_D(3) BP_ROW_D(4) BP_ROW_D(5)
        a += BP_MR;
        b += BP_NR_DOUBLE;
    }
    BP_STORE_D(0) BP_STORE_D(1) BP_STORE_D(2) BP_STORE_D(3) BP_STORE_D(4) BP_STORE_D(5)
}
#endif  /* BP_HAVE_X86_SIMD */

/* Packing a transposed float32 operand into a 16-wide micro-panel:
 * dst[p * 16 + j] = src[j * ld + p] for j < 16, p < kc.  Both operands of X.W^T have k
 * contiguous, so this transpose is on the forward pass's critical path. */
typedef void (*bp_pack_t)(float *, const float *, ptrdiff_t, ptrdiff_t);

static void bp_pack_bt16_generic(float *dst, const float *src, ptrdiff_t ld, ptrdiff_t kc)
{
    for (ptrdiff_t p = 0; p < kc; p++)
        for (int j = 0; j < BP_NR_FLOAT; j++)
            dst[p * BP_NR_FLOAT + j] = src[j * ld + p];
}

#ifdef BP_HAVE_X86_SIMD
/* 8 x 8 blocks transposed in registers: 8 row loads, 24 shuffles, 8 stores, instead
 * of 64 scalar moves that each touch a different cache line. */
__attribute__((target("avx2,fma")))
static void bp_pack_bt16_avx2(float *dst, const float *src, ptrdiff_t ld, ptrdiff_t kc)
{
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
            float *d = dst + p * BP_NR_FLOAT + half * 8;
            _mm256_storeu_ps(d + 0 * BP_NR_FLOAT, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(d + 1 * BP_NR_FLOAT, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(d + 2 * BP_NR_FLOAT, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(d + 3 * BP_NR_FLOAT, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(d + 4 * BP_NR_FLOAT, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(d + 5 * BP_NR_FLOAT, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(d + 6 * BP_NR_FLOAT, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(d + 7 * BP_NR_FLOAT, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
    }
    bp_pack_bt16_generic(dst + p * BP_NR_FLOAT, src + p, ld, kc - p);
}
#endif  /* BP_HAVE_X86_SIMD */

static bp_pack_t bp_pack_bt16 = bp_pack_bt16_generic;
static bp_skernel_t bp_skernel = bp_skernel_generic;
static bp_dkernel_t bp_dkernel = bp_dkernel_generic;
static const char *bp_kernel_name = "generic";

/* Called once at import, before any thread exists. */
static void bp_gemm_init(void)
{
    const char *forced = getenv("BACKPROP_SIMD");
    if (forced != NULL && strcmp(forced, "generic") == 0)
        return;
#ifdef BP_HAVE_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        bp_skernel = bp_skernel_avx2;
        bp_dkernel = bp_dkernel_avx2;
        bp_pack_bt16 = bp_pack_bt16_avx2;
        bp_kernel_name = "avx2+fma";
    }
#endif
}

static const char *bp_gemm_kernel_name(void) { return bp_kernel_name; }

static inline void bp_sgemm_kernel(ptrdiff_t k, const float *a, const float *b, float *c,
                                   ptrdiff_t ldc, int add) { bp_skernel(k, a, b, c, ldc, add); }
static inline void bp_dgemm_kernel(ptrdiff_t k, const double *a, const double *b, double *c,
                                   ptrdiff_t ldc, int add) { bp_dkernel(k, a, b, c, ldc, add); }

static inline void bp_pack_transposed_panel(float *dst, const float *src, ptrdiff_t ld,
                                            ptrdiff_t kc) { bp_pack_bt16(dst, src, ld, kc); }

static inline int bp_team_size(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

#endif  /* BP_GEMM_KERNELS_H */
