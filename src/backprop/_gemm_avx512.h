/* The AVX-512 level: an 8 x 32 float and an 8 x 16 double micro-kernel, and packing
 * routines built from 16 x 16 (float) and 8 x 8 (double) register transposes.
 * Included by _gemm_kernels.h; chosen when the CPU has AVX-512 F, VL and DQ (VL for the
 * 256-bit masked loads of 8-row panels, DQ for extracting their upper halves).
 *
 * Why 8 x 32: 16 zmm accumulators, and per k step 2 vector loads of B and 8 broadcasts
 * of A for 16 fused multiply-adds, which leaves the loads well below the FMA rate.
 * 14 x 32 and 12 x 32 (more accumulators) measured 2-6% slower on Zen 5, 6 x 64 lost up
 * to 10% when N = 784 leaves a mostly empty last panel.
 * Edge tiles need no scratch tile: rows past the edge are simply not stored, columns
 * past it are masked off.  A tile no wider than one vector (a 10-class output layer,
 * or N = 784's last 16 columns) skips the zero-padded right half of B's panel.
 */
#ifndef BP_GEMM_AVX512_H
#define BP_GEMM_AVX512_H

#define BP_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#define BP_AVX512_MR 8
#define BP_AVX512_NR_FLOAT 32
#define BP_AVX512_NR_DOUBLE 16

/* The first n lanes (n may be <= 0 or past the width). */
static inline __mmask16 bp_mask16(ptrdiff_t n)
{
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

static inline __mmask8 bp_mask8(ptrdiff_t n)
{
    return n >= 8 ? (__mmask8)0xFF : n <= 0 ? (__mmask8)0 : (__mmask8)((1u << n) - 1);
}

/* ------------------------------------------------------------------ micro-kernels */

/* One k step of row i: broadcast A[i] into two fused multiply-adds. */
#define BP_ROW512(i, set1, fmadd)                                                       \
    { __typeof__(b0) ai = set1(a[i]);                                                   \
      c##i##0 = fmadd(ai, b0, c##i##0);                                                 \
      c##i##1 = fmadd(ai, b1, c##i##1); }

/* The same for a tile whose columns all lie in B's left vector. */
#define BP_HALF512(i, set1, fmadd)                                                      \
    c##i##0 = fmadd(set1(a[i]), b0, c##i##0);

/* The k loop of a tile: per step, B's vectors (`load_b`), the eight rows (`row`, one of
 * the two above), then the next column of A's panel and row of B's. */
#define BP_KLOOP512(row, load_b, NR, set1, fmadd)                                      \
    _Pragma("GCC unroll 4")                                                             \
    for (ptrdiff_t p = 0; p < k; p++) {                                                 \
        load_b                                                                          \
        row(0, set1, fmadd) row(1, set1, fmadd) row(2, set1, fmadd) row(3, set1, fmadd) \
        row(4, set1, fmadd) row(5, set1, fmadd) row(6, set1, fmadd) row(7, set1, fmadd) \
        a += BP_AVX512_MR;                                                              \
        b += NR;                                                                        \
    }

/* Row i of the tile, if it is inside C: masked to the valid columns, added to C's
 * values when `add`. */
#define BP_STORE512(i, W, loadz, store, addv)                                           \
    if (i < rows) {                                                                     \
        __typeof__(c + 0) row = c + i * ldc;                                            \
        if (add) {                                                                      \
            c##i##0 = addv(loadz(m0, row), c##i##0);                                    \
            c##i##1 = addv(loadz(m1, row + W), c##i##1);                                \
        }                                                                               \
        store(row, m0, c##i##0);                                                        \
        store(row + W, m1, c##i##1);                                                    \
    }

/* The eight rows of a float tile (this kernel's and the bfloat16 one's). */
#define BP_STORE512_FLOAT_ROW(i)                                                        \
    BP_STORE512(i, 16, _mm512_maskz_loadu_ps, _mm512_mask_storeu_ps, _mm512_add_ps)
#define BP_STORE512_FLOAT_TILE                                                          \
    __mmask16 m0 = bp_mask16(cols), m1 = bp_mask16(cols - 16);                          \
    BP_STORE512_FLOAT_ROW(0) BP_STORE512_FLOAT_ROW(1) BP_STORE512_FLOAT_ROW(2)          \
    BP_STORE512_FLOAT_ROW(3) BP_STORE512_FLOAT_ROW(4) BP_STORE512_FLOAT_ROW(5)          \
    BP_STORE512_FLOAT_ROW(6) BP_STORE512_FLOAT_ROW(7)

BP_AVX512 static void bp_skernel_avx512(ptrdiff_t k, const void *a_, const void *b_,
                                        float *c, ptrdiff_t ldc, int rows, int cols, int add)
{
    const float *a = (const float *)a_, *b = (const float *)b_;
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
           c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00,
           c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    for (int i = 0; i < rows; i++) {         /* the C tile is needed at the end */
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i * ldc + 16), _MM_HINT_T0);
    }
    if (cols <= 16)       /* the right half of B's panel is zero padding: skip it */
        BP_KLOOP512(BP_HALF512, __m512 b0 = _mm512_loadu_ps(b);,
                    BP_AVX512_NR_FLOAT, _mm512_set1_ps, _mm512_fmadd_ps)
    else
        BP_KLOOP512(BP_ROW512, __m512 b0 = _mm512_loadu_ps(b);
                    __m512 b1 = _mm512_loadu_ps(b + 16);,
                    BP_AVX512_NR_FLOAT, _mm512_set1_ps, _mm512_fmadd_ps)
    BP_STORE512_FLOAT_TILE
}

BP_AVX512 static void bp_dkernel_avx512(ptrdiff_t k, const void *a_, const void *b_,
                                        double *c, ptrdiff_t ldc, int rows, int cols, int add)
{
    const double *a = (const double *)a_, *b = (const double *)b_;
    __m512d c00 = _mm512_setzero_pd(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
            c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00,
            c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    for (int i = 0; i < rows; i++) {
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i * ldc + 8), _MM_HINT_T0);
    }
    if (cols <= 8)
        BP_KLOOP512(BP_HALF512, __m512d b0 = _mm512_loadu_pd(b);,
                    BP_AVX512_NR_DOUBLE, _mm512_set1_pd, _mm512_fmadd_pd)
    else
        BP_KLOOP512(BP_ROW512, __m512d b0 = _mm512_loadu_pd(b);
                    __m512d b1 = _mm512_loadu_pd(b + 8);,
                    BP_AVX512_NR_DOUBLE, _mm512_set1_pd, _mm512_fmadd_pd)
    __mmask8 m0 = bp_mask8(cols), m1 = bp_mask8(cols - 8);
    BP_STORE512(0, 8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd, _mm512_add_pd)
    BP_STORE512(1, 8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd, _mm512_add_pd)
    BP_STORE512(2, 8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd, _mm512_add_pd)
    BP_STORE512(3, 8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd, _mm512_add_pd)
    BP_STORE512(4, 8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd, _mm512_add_pd)
    BP_STORE512(5, 8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd, _mm512_add_pd)
    BP_STORE512(6, 8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd, _mm512_add_pd)
    BP_STORE512(7, 8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd, _mm512_add_pd)
}

/* ------------------------------------------------------------------ copying packs */

/* dst[p * width + j] = src[p * ld + j]: masked loads read only the valid columns and
 * zero the rest. */
BP_AVX512 static void bp_pack_copy_s_avx512(void *dst_, const float *src, ptrdiff_t ld,
                                            ptrdiff_t kc, int width, int valid)
{
    float *dst = (float *)dst_;
    if (width == 32) {
        __mmask16 m0 = bp_mask16(valid), m1 = bp_mask16(valid - 16);
        for (ptrdiff_t p = 0; p < kc; p++, dst += 32, src += ld) {
            _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(m0, src));
            _mm512_storeu_ps(dst + 16, _mm512_maskz_loadu_ps(m1, src + 16));
        }
    } else if (width == 8) {
        __mmask8 m = bp_mask8(valid);
        for (ptrdiff_t p = 0; p < kc; p++, dst += 8, src += ld)
            _mm256_storeu_ps(dst, _mm256_maskz_loadu_ps(m, src));
    } else {
        bp_pack_copy_s_generic(dst, src, ld, kc, width, valid);
    }
}

BP_AVX512 static void bp_pack_copy_d_avx512(void *dst_, const double *src, ptrdiff_t ld,
                                            ptrdiff_t kc, int width, int valid)
{
    double *dst = (double *)dst_;
    if (width == 16 || width == 8) {
        __mmask8 m0 = bp_mask8(valid), m1 = bp_mask8(valid - 8);
        for (ptrdiff_t p = 0; p < kc; p++, dst += width, src += ld) {
            _mm512_storeu_pd(dst, _mm512_maskz_loadu_pd(m0, src));
            if (width == 16)
                _mm512_storeu_pd(dst + 8, _mm512_maskz_loadu_pd(m1, src + 8));
        }
    } else {
        bp_pack_copy_d_generic(dst, src, ld, kc, width, valid);
    }
}

/* ------------------------------------------------------------------ transposing packs
 *
 * In-register transposes.  Names: r[j] holds row j of the source (one element per k);
 * after the transpose r[p] holds element p of every row.  Every loop over registers is
 * unrolled in full (the pragmas), so the arrays stay in registers: rolled, GCC keeps them
 * on the stack and the pack runs at a third of the speed.  A zmm is four 128-bit lanes
 * L0..L3; the steps interleave pairs of rows (unpack), then pairs of pairs (shuffle),
 * then move whole lanes (shuffle_f32x4 / permutex2var).
 */

/* 16 x 16 floats in place. */
BP_AVX512 static inline void bp_transpose16_ps(__m512 r[16])
{
    __m512 t[16], u[16];
    #pragma GCC unroll 16
    for (int i = 0; i < 16; i += 2) {        /* t: rows i, i+1 interleaved per lane */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    #pragma GCC unroll 16
    for (int g = 0; g < 16; g += 4) {        /* u[g + o], lane L: rows g..g+3 at k = 4L + o */
        u[g + 0] = _mm512_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    #pragma GCC unroll 16
    for (int o = 0; o < 4; o++) {            /* lane L of every group: k = 4L + o */
        __m512 x0 = _mm512_shuffle_f32x4(u[o], u[4 + o], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 x1 = _mm512_shuffle_f32x4(u[o], u[4 + o], _MM_SHUFFLE(3, 2, 3, 2));
        __m512 x2 = _mm512_shuffle_f32x4(u[8 + o], u[12 + o], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 x3 = _mm512_shuffle_f32x4(u[8 + o], u[12 + o], _MM_SHUFFLE(3, 2, 3, 2));
        r[o] = _mm512_shuffle_f32x4(x0, x2, _MM_SHUFFLE(2, 0, 2, 0));
        r[4 + o] = _mm512_shuffle_f32x4(x0, x2, _MM_SHUFFLE(3, 1, 3, 1));
        r[8 + o] = _mm512_shuffle_f32x4(x1, x3, _MM_SHUFFLE(2, 0, 2, 0));
        r[12 + o] = _mm512_shuffle_f32x4(x1, x3, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

/* 8 rows of 16 floats into 16 rows of 8: out[p] = element p of rows 0..7. */
BP_AVX512 static inline void bp_transpose8x16_ps(const __m512 r[8], __m256 out[16])
{
    __m512 t[8], u[8];
    #pragma GCC unroll 16
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    #pragma GCC unroll 16
    for (int g = 0; g < 8; g += 4) {
        u[g + 0] = _mm512_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    /* (a.L0, b.L0, a.L1, b.L1) and (a.L2, b.L2, a.L3, b.L3) */
    const __m512i lanes01 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4,
                                             19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i lanes23 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12,
                                             27, 26, 25, 24, 11, 10, 9, 8);
    #pragma GCC unroll 16
    for (int o = 0; o < 4; o++) {
        __m512 y = _mm512_permutex2var_ps(u[o], lanes01, u[4 + o]);
        out[o] = _mm512_castps512_ps256(y);
        out[4 + o] = _mm512_extractf32x8_ps(y, 1);
        y = _mm512_permutex2var_ps(u[o], lanes23, u[4 + o]);
        out[8 + o] = _mm512_castps512_ps256(y);
        out[12 + o] = _mm512_extractf32x8_ps(y, 1);
    }
}

/* 8 x 8 doubles in place. */
BP_AVX512 static inline void bp_transpose8_pd(__m512d r[8])
{
    __m512d t[8];
    #pragma GCC unroll 16
    for (int i = 0; i < 8; i += 2) {         /* t[i + o], lane L: rows i, i+1 at k = 2L + o */
        t[i] = _mm512_unpacklo_pd(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_pd(r[i], r[i + 1]);
    }
    #pragma GCC unroll 16
    for (int o = 0; o < 2; o++) {
        __m512d x0 = _mm512_shuffle_f64x2(t[o], t[2 + o], _MM_SHUFFLE(1, 0, 1, 0));
        __m512d x1 = _mm512_shuffle_f64x2(t[o], t[2 + o], _MM_SHUFFLE(3, 2, 3, 2));
        __m512d x2 = _mm512_shuffle_f64x2(t[4 + o], t[6 + o], _MM_SHUFFLE(1, 0, 1, 0));
        __m512d x3 = _mm512_shuffle_f64x2(t[4 + o], t[6 + o], _MM_SHUFFLE(3, 2, 3, 2));
        r[o] = _mm512_shuffle_f64x2(x0, x2, _MM_SHUFFLE(2, 0, 2, 0));
        r[2 + o] = _mm512_shuffle_f64x2(x0, x2, _MM_SHUFFLE(3, 1, 3, 1));
        r[4 + o] = _mm512_shuffle_f64x2(x1, x3, _MM_SHUFFLE(2, 0, 2, 0));
        r[6 + o] = _mm512_shuffle_f64x2(x1, x3, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

/* dst[p * width + j] = src[j * ld + p] for the float widths of this level (32: B
 * panels, 8: A panels), 16 k at a time; masked loads read the k tail and rows past
 * `valid` are zeros, so no element outside the operand is read. */
BP_AVX512 static void bp_pack_transpose_s_avx512(void *dst_, const float *src, ptrdiff_t ld,
                                                 ptrdiff_t kc, int width, int valid)
{
    float *dst = (float *)dst_;
    if (width == 32) {
        for (int g = 0; g < 2; g++) {        /* rows 16g.. of src: columns 16g.. of dst */
            const float *s = src + 16 * g * ld;
            int rows = valid - 16 * g;
            for (ptrdiff_t p = 0; p < kc; p += 16) {
                ptrdiff_t n = kc - p < 16 ? kc - p : 16;
                __mmask16 m = bp_mask16(n);
                __m512 r[16];
                #pragma GCC unroll 16
                for (int j = 0; j < 16; j++)
                    r[j] = j < rows ? _mm512_maskz_loadu_ps(m, s + j * ld + p)
                                    : _mm512_setzero_ps();
                bp_transpose16_ps(r);
                float *d = dst + p * 32 + 16 * g;
                #pragma GCC unroll 16
                for (int o = 0; o < 16; o++)
                    if (o < n)
                        _mm512_storeu_ps(d + o * 32, r[o]);
            }
        }
    } else if (width == 8) {
        for (ptrdiff_t p = 0; p < kc; p += 16) {
            ptrdiff_t n = kc - p < 16 ? kc - p : 16;
            __mmask16 m = bp_mask16(n);
            __m512 r[8];
            __m256 out[16];
            #pragma GCC unroll 16
            for (int j = 0; j < 8; j++)
                r[j] = j < valid ? _mm512_maskz_loadu_ps(m, src + j * ld + p)
                                 : _mm512_setzero_ps();
            bp_transpose8x16_ps(r, out);
            #pragma GCC unroll 16
            for (int o = 0; o < 16; o++)
                if (o < n)
                    _mm256_storeu_ps(dst + (p + o) * 8, out[o]);
        }
    } else {
        bp_pack_transpose_s_generic(dst, src, ld, kc, width, valid);
    }
}

/* The same for doubles (widths 16 and 8), 8 k at a time. */
BP_AVX512 static void bp_pack_transpose_d_avx512(void *dst_, const double *src, ptrdiff_t ld,
                                                 ptrdiff_t kc, int width, int valid)
{
    double *dst = (double *)dst_;
    if (width != 16 && width != 8) {
        bp_pack_transpose_d_generic(dst, src, ld, kc, width, valid);
        return;
    }
    for (int g = 0; g < width / 8; g++) {
        const double *s = src + 8 * g * ld;
        int rows = valid - 8 * g;
        for (ptrdiff_t p = 0; p < kc; p += 8) {
            ptrdiff_t n = kc - p < 8 ? kc - p : 8;
            __mmask8 m = bp_mask8(n);
            __m512d r[8];
            #pragma GCC unroll 16
            for (int j = 0; j < 8; j++)
                r[j] = j < rows ? _mm512_maskz_loadu_pd(m, s + j * ld + p)
                                : _mm512_setzero_pd();
            bp_transpose8_pd(r);
            double *d = dst + p * width + 8 * g;
            #pragma GCC unroll 16
            for (int o = 0; o < 8; o++)
                if (o < n)
                    _mm512_storeu_pd(d + o * width, r[o]);
        }
    }
}

#endif  /* BP_GEMM_AVX512_H */
