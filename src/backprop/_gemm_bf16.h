/* bfloat16 products: float operands rounded to bfloat16 as they are packed, products
 * accumulated in float (PyTorch's autocast and Keras's mixed_bfloat16 make the same
 * trade).  A bfloat16 is the upper half of a float: the same exponent range, 8 bits of
 * mantissa instead of 24.
 *
 * Two ways to run them, chosen once at import (bp_gemm_init):
 *
 *   avx512_bf16  where the CPU has AVX512_BF16 (AMD Zen 4 and later, Intel Cooper Lake
 *                and later): VDPBF16PS multiplies 16 pairs of bfloat16 values and adds
 *                both products to 16 floats, twice the multiply-adds of a float FMA per
 *                instruction.  The packs below round while they pack, so the conversion
 *                costs no pass of its own, and store each column's (or row's) values in
 *                pairs along k: panel element (q, j) is the 32-bit pair
 *                (x[2q][j], x[2q + 1][j]), the lower half the even k.  An odd k ends
 *                with a zero.  The 8 x 32 tile of the float kernel, 16 accumulators.
 *   emulated     elsewhere: the level's float packs, the packed panel rounded in place,
 *                and the level's float kernel.  The same rounding and the same products
 *                (a product of two bfloat16 values is exact in float), summed in another
 *                order; no faster than float products.
 *
 * Rounding is to nearest, ties to even, as VCVTNE2PS2BF16 does: NaN stays NaN (quiet),
 * values too large round to infinity, and subnormal floats become zeros of their sign
 * (the instruction treats subnormal inputs as zero, and so does the emulation, so both
 * ways see the same operands).
 */
#ifndef BP_GEMM_BF16_H
#define BP_GEMM_BF16_H

#include <stdint.h>

/* The bfloat16 nearest to x, as the upper 16 bits of a float. */
static inline uint32_t bp_bf16_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    if ((u & 0x7f800000u) == 0)                       /* zero or subnormal: signed zero */
        u &= 0x80000000u;
    else if ((u & 0x7fffffffu) > 0x7f800000u)         /* NaN: quiet, payload kept */
        u |= 0x00400000u;
    else                                              /* carries into the exponent: inf */
        u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

static inline float bp_bf16_rounded(float x)
{
    uint32_t u = bp_bf16_bits(x) << 16;
    memcpy(&x, &u, sizeof(x));
    return x;
}

static void bp_round_to_bf16(float *x, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++)
        x[i] = bp_bf16_rounded(x[i]);
}

#ifdef BP_HAVE_X86_SIMD

#define BP_BF16 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")))

/* Any panel, one element at a time: element (p, j) of the operand at src[p * ld_p + j * ld_j]. */
static void bp_pack_pairs_scalar(uint16_t *dst, const float *src, ptrdiff_t ld_p,
                                 ptrdiff_t ld_j, ptrdiff_t kc, int width, int valid)
{
    for (ptrdiff_t q = 0; q < (kc + 1) / 2; q++)
        for (int j = 0; j < width; j++)
            for (int t = 0; t < 2; t++) {
                ptrdiff_t p = 2 * q + t;
                *dst++ = (uint16_t)(j < valid && p < kc
                                    ? bp_bf16_bits(src[p * ld_p + j * ld_j]) : 0);
            }
}

/* dst pairs from src[p * ld + j] (the panel's dimension contiguous): two rows of k are
 * rounded into one vector of 32 bfloat16 (all of row p, then all of row p + 1), which a
 * permutation interleaves into pairs. */
BP_BF16 static void bp_pack_copy_b_avx512(void *dst_, const float *src, ptrdiff_t ld,
                                          ptrdiff_t kc, int width, int valid)
{
    uint16_t *dst = (uint16_t *)dst_;
    if (width == 32) {
        const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                               25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
                                               19, 3, 18, 2, 17, 1, 16, 0);
        __mmask16 m[2] = {bp_mask16(valid), bp_mask16(valid - 16)};
        for (ptrdiff_t p = 0; p < kc; p += 2, dst += 64, src += 2 * ld) {
            for (int h = 0; h < 2; h++) {
                __m512 even = _mm512_maskz_loadu_ps(m[h], src + 16 * h);
                __m512 odd = p + 1 < kc ? _mm512_maskz_loadu_ps(m[h], src + ld + 16 * h)
                                        : _mm512_setzero_ps();
                __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
                _mm512_storeu_si512(dst + 32 * h, _mm512_permutexvar_epi16(pairs, both));
            }
        }
    } else if (width == 8) {
        const __m256i pairs = _mm256_set_epi16(15, 7, 14, 6, 13, 5, 12, 4,
                                               11, 3, 10, 2, 9, 1, 8, 0);
        __mmask8 m = bp_mask8(valid);
        for (ptrdiff_t p = 0; p < kc; p += 2, dst += 16, src += 2 * ld) {
            __m256 even = _mm256_maskz_loadu_ps(m, src);
            __m256 odd = p + 1 < kc ? _mm256_maskz_loadu_ps(m, src + ld) : _mm256_setzero_ps();
            __m256i both = (__m256i)_mm256_cvtne2ps_pbh(odd, even);
            _mm256_storeu_si256((__m256i *)dst, _mm256_permutexvar_epi16(pairs, both));
        }
    } else {
        bp_pack_pairs_scalar(dst, src, ld, 1, kc, width, valid);
    }
}

/* dst pairs from src[j * ld + p] (k contiguous): a pair is already adjacent in each row,
 * so 32 values of k rounded into one vector are 16 pairs, and the float packs' 16 x 16
 * (or 8 x 16) register transpose, moving 32-bit elements, puts them in place. */
BP_BF16 static void bp_pack_transpose_b_avx512(void *dst_, const float *src, ptrdiff_t ld,
                                               ptrdiff_t kc, int width, int valid)
{
    uint32_t *dst = (uint32_t *)dst_;       /* dst[q * width + j]: one pair */
    if (width == 32) {
        for (int g = 0; g < 2; g++) {
            const float *s = src + 16 * g * ld;
            int rows = valid - 16 * g;
            for (ptrdiff_t p = 0; p < kc; p += 32) {
                ptrdiff_t n = kc - p < 32 ? kc - p : 32;
                __mmask16 m0 = bp_mask16(n), m1 = bp_mask16(n - 16);
                __m512 r[16];
                #pragma GCC unroll 16
                for (int j = 0; j < 16; j++)
                    r[j] = j < rows
                        ? (__m512)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, s + j * ld + p + 16),
                                                      _mm512_maskz_loadu_ps(m0, s + j * ld + p))
                        : _mm512_setzero_ps();
                bp_transpose16_ps(r);
                uint32_t *d = dst + p / 2 * 32 + 16 * g;
                #pragma GCC unroll 16
                for (int o = 0; o < 16; o++)
                    if (2 * o < n)
                        _mm512_storeu_ps((float *)(d + o * 32), r[o]);
            }
        }
    } else if (width == 8) {
        for (ptrdiff_t p = 0; p < kc; p += 32) {
            ptrdiff_t n = kc - p < 32 ? kc - p : 32;
            __mmask16 m0 = bp_mask16(n), m1 = bp_mask16(n - 16);
            __m512 r[8];
            __m256 out[16];
            #pragma GCC unroll 16
            for (int j = 0; j < 8; j++)
                r[j] = j < valid
                    ? (__m512)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, src + j * ld + p + 16),
                                                  _mm512_maskz_loadu_ps(m0, src + j * ld + p))
                    : _mm512_setzero_ps();
            bp_transpose8x16_ps(r, out);
            #pragma GCC unroll 16
            for (int o = 0; o < 16; o++)
                if (2 * o < n)
                    _mm256_storeu_ps((float *)(dst + (p / 2 + o) * 8), out[o]);
        }
    } else {
        bp_pack_pairs_scalar((uint16_t *)dst, src, 1, ld, kc, width, valid);
    }
}

/* One k pair of row i: A's pair broadcast to every lane (VDPBF16PS can take it straight
 * from memory), two dot products of pairs into the row's accumulators. */
static inline int32_t bp_pair_at(const uint16_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

#define BP_ROW_BF16(i)                                                                  \
    { __m512bh ai = (__m512bh)_mm512_set1_epi32(bp_pair_at(a + 2 * i));               \
      c##i##0 = _mm512_dpbf16_ps(c##i##0, b0, ai);                                      \
      c##i##1 = _mm512_dpbf16_ps(c##i##1, b1, ai); }
#define BP_HALF_BF16(i)                                                                 \
    c##i##0 = _mm512_dpbf16_ps(c##i##0, b0, (__m512bh)_mm512_set1_epi32(bp_pair_at(a + 2 * i)));

#define BP_KLOOP_BF16(row, load_b)                                                      \
    _Pragma("GCC unroll 4")                                                             \
    for (ptrdiff_t q = 0; q < pairs; q++) {                                             \
        load_b                                                                          \
        row(0) row(1) row(2) row(3) row(4) row(5) row(6) row(7)                         \
        a += 2 * BP_AVX512_MR;                                                          \
        b += 2 * BP_AVX512_NR_FLOAT;                                                    \
    }

/* The 8 x 32 float tile from k values packed in (k + 1) / 2 pairs. */
BP_BF16 static void bp_bkernel_avx512(ptrdiff_t k, const void *a_, const void *b_, float *c,
                                      ptrdiff_t ldc, int rows, int cols, int add)
{
    const uint16_t *a = (const uint16_t *)a_, *b = (const uint16_t *)b_;
    ptrdiff_t pairs = (k + 1) / 2;
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
           c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00,
           c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    for (int i = 0; i < rows; i++) {
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i * ldc + 16), _MM_HINT_T0);
    }
    if (cols <= 16)
        BP_KLOOP_BF16(BP_HALF_BF16, __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);)
    else
        BP_KLOOP_BF16(BP_ROW_BF16, __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
                      __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 32);)
    BP_STORE512_FLOAT_TILE
}

/* The CPU's bfloat16 limit, for the benchmarks: 12 independent chains of VDPBF16PS
 * (enough to cover its latency on two pipes), no memory traffic; each iteration is
 * 12 x 16 lanes x 2 products x 2 flops.  The result depends on every instruction. */
BP_BF16 static float bp_bf16_peak_loop(long iterations)
{
    __m512 c[12];
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);      /* pairs of 1.0 */
    __m512bh b = (__m512bh)_mm512_set1_epi32(0x33803380);      /* pairs of 2^-24 */
    #pragma GCC unroll 12
    for (int i = 0; i < 12; i++)              /* distinct chains: none is merged */
        c[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < iterations; it++) {
        #pragma GCC unroll 12
        for (int i = 0; i < 12; i++)
            c[i] = _mm512_dpbf16_ps(c[i], a, b);
        __asm__ volatile("" : "+v"(a));       /* not hoisted out of the loop */
    }
    __m512 sum = c[0];
    #pragma GCC unroll 12
    for (int i = 1; i < 12; i++)
        sum = _mm512_add_ps(sum, c[i]);
    return _mm512_reduce_add_ps(sum);
}

#else
static float bp_bf16_peak_loop(long iterations) { (void)iterations; return 0.0f; }
#endif  /* BP_HAVE_X86_SIMD */

#define BP_BF16_PEAK_FLOPS_PER_ITERATION (12 * 16 * 2 * 2)

#endif  /* BP_GEMM_BF16_H */
