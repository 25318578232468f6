/* float32 sigmoid and tanh, and the recurrent cells' gate arithmetic, in loops the
 * compiler vectorises (also the sigmoid and tanh activations of float32 layers).
 *
 * The C library's exp and tanh are called one value at a time (in double): in a float32
 * LSTM step they took two thirds of the time (lstm-mnist: 27 ms a step, 8.6 without).  Here exp, sigmoid and tanh are
 * polynomials written with plain float arithmetic, so `omp simd` turns each row's loop
 * into vector code at the build's SIMD level; accuracy is that of the Cephes library's
 * float routines: within 3 units in the last place (tests/test_recurrent.py).  A float64 network keeps
 * the C library's double functions (_recurrent.pxd).
 *
 * The arithmetic of each row is the same whatever the thread count (rows are split,
 * never a row), so results stay bit-identical for any team.
 */
#ifndef BP_GATES_H
#define BP_GATES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* exp(x): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact), e^r by a
 * degree-7 polynomial, 2^n put in the exponent bits.  Below the normal floats' range it
 * is 0, above it it stops at 2e38 (a gate saturates long before); NaN passes through
 * (both comparisons are false). */
static inline float bp_expf(float x)
{
    float y = x < -87.33654f ? -87.33654f : x > 88.3f ? 88.3f : x;     /* ln(FLT_MIN) */
    /* n = round(y / ln2): adding 1.5 * 2^23 leaves the integer in the low mantissa bits */
    float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = y - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return x < -87.33654f ? 0.0f : p * scale;
}

/* 1 / (1 + e^-x), from e^-|x| <= 1 so that nothing overflows: e / (1 + e) for x < 0. */
static inline float bp_sigmoidf(float x)
{
    float e = bp_expf(x < 0 ? x : -x);
    float s = 1.0f / (1.0f + e);
    return x < 0 ? e * s : s;
}

/* tanh(x): an odd polynomial near 0 (where 1 - 2 / (e^2x + 1) would cancel), that
 * formula elsewhere, the sign put back. */
static inline float bp_tanhf(float x)
{
    float a = x < 0 ? -x : x, z = x * x;
    float small = -5.70498872745e-3f;
    small = small * z + 2.06390887954e-2f;
    small = small * z - 5.37397155531e-2f;
    small = small * z + 1.33314422036e-1f;
    small = small * z - 3.33332819422e-1f;
    small = small * z * x + x;
    float big = 1.0f - 2.0f / (bp_expf(2.0f * a) + 1.0f);
    big = x < 0 ? -big : big;
    return a < 0.625f ? small : big;
}

/* The sigmoid and tanh activations of a float32 row, in place. */
static void bp_sigmoid_row_f(float *x, ptrdiff_t n)
{
    #pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++)
        x[j] = bp_sigmoidf(x[j]);
}

static void bp_tanh_row_f(float *x, ptrdiff_t n)
{
    #pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++)
        x[j] = bp_tanhf(x[j]);
}

/* LSTM forward, one row: g holds the pre-activations of i, f, g, o (H each) and gets
 * the gates and then c (a fifth block); h = o tanh(c).  c_prev: the previous c, or NULL. */
static void bp_lstm_forward_row_f(float *g, const float *c_prev, float *h, ptrdiff_t H)
{
    float *i = g, *f = g + H, *cand = g + 2 * H, *o = g + 3 * H, *c = g + 4 * H;
    #pragma omp simd
    for (ptrdiff_t j = 0; j < H; j++) {
        i[j] = bp_sigmoidf(i[j]);
        f[j] = bp_sigmoidf(f[j]);
        cand[j] = bp_tanhf(cand[j]);
        o[j] = bp_sigmoidf(o[j]);
    }
    if (c_prev != NULL) {
        #pragma omp simd
        for (ptrdiff_t j = 0; j < H; j++)
            c[j] = f[j] * c_prev[j] + i[j] * cand[j];
    } else {
        #pragma omp simd
        for (ptrdiff_t j = 0; j < H; j++)
            c[j] = i[j] * cand[j];
    }
    #pragma omp simd
    for (ptrdiff_t j = 0; j < H; j++)
        h[j] = o[j] * bp_tanhf(c[j]);
}

/* LSTM backward, one row: from the kept gates and c, dL/dh (dy + dh) and dL/dc (dc in,
 * the earlier step's out), the pre-activations' gradients d (i, f, g, o). */
static void bp_lstm_backward_row_f(const float *g, const float *c_prev, const float *dy,
                                   const float *dh, float *dc, float *d, ptrdiff_t H)
{
    const float *i = g, *f = g + H, *cand = g + 2 * H, *o = g + 3 * H, *c = g + 4 * H;
    #pragma omp simd
    for (ptrdiff_t j = 0; j < H; j++) {
        float tc = bp_tanhf(c[j]);
        float grad_h = dy[j] + dh[j];
        float grad_c = dc[j] + grad_h * o[j] * (1.0f - tc * tc);
        d[j] = grad_c * cand[j] * i[j] * (1.0f - i[j]);
        d[H + j] = c_prev != NULL ? grad_c * c_prev[j] * f[j] * (1.0f - f[j]) : 0.0f;
        d[2 * H + j] = grad_c * i[j] * (1.0f - cand[j] * cand[j]);
        d[3 * H + j] = grad_h * tc * o[j] * (1.0f - o[j]);
        dc[j] = grad_c * f[j];
    }
}

/* GRU forward, one row: g holds W_ih x + b_ih of r, z, n and gets r, z, n and
 * W_hn h' + b_hn (from gh, which holds W_hh h' + b_hh); h = (1 - z) n + z h'. */
static void bp_gru_forward_row_f(float *g, const float *gh, const float *h_prev, float *h,
                                 ptrdiff_t H)
{
    #pragma omp simd
    for (ptrdiff_t j = 0; j < H; j++) {
        float r = bp_sigmoidf(g[j] + gh[j]);
        float z = bp_sigmoidf(g[H + j] + gh[H + j]);
        float hn = gh[2 * H + j];
        float n = bp_tanhf(g[2 * H + j] + r * hn);
        g[j] = r;
        g[H + j] = z;
        g[2 * H + j] = n;
        g[3 * H + j] = hn;
        h[j] = (1.0f - z) * n + (h_prev != NULL ? z * h_prev[j] : 0.0f);
    }
}

#endif  /* BP_GATES_H */
