/* Loops over a pixel's channels (side by side in channels-last storage), for the
 * convolution's im2col/col2im and for pooling.  They are C only for `restrict`: the
 * compiler may then assume source and destination do not overlap (they never do) and
 * vectorise them; written in Cython it has to assume they might, and does not.  One
 * function per element type, the same loop. */
#ifndef BP_PIXELS_H
#define BP_PIXELS_H
#include <stddef.h>

#define BP_PIXEL_LOOPS(T, S)                                                              \
/* dst[i] = src[i] */                                                                     \
static inline void bp_copy_##S(T *restrict dst, const T *restrict src, ptrdiff_t n) {     \
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = src[i];                                    \
}                                                                                         \
/* dst[i] += src[i] */                                                                    \
static inline void bp_add_##S(T *restrict dst, const T *restrict src, ptrdiff_t n) {      \
    for (ptrdiff_t i = 0; i < n; i++) dst[i] += src[i];                                   \
}                                                                                         \
/* dst[i] += scale * src[i] */                                                            \
static inline void bp_add_scaled_##S(T *restrict dst, const T *restrict src, T scale,     \
                                     ptrdiff_t n) {                                       \
    for (ptrdiff_t i = 0; i < n; i++) dst[i] += scale * src[i];                           \
}                                                                                         \
/* A window position's values into the running maxima: a larger value, or a NaN (as    */ \
/* PyTorch: NaN wins), replaces the maximum, and `where` takes its offset q + i.       */ \
static inline void bp_max_update_##S(T *restrict best, ptrdiff_t *restrict where,         \
                                     const T *restrict src, ptrdiff_t q, ptrdiff_t n) {   \
    for (ptrdiff_t i = 0; i < n; i++) {                                                   \
        T v = src[i];                                                                     \
        int take = (v > best[i]) | (v != v);                                              \
        best[i] = take ? v : best[i];                                                     \
        where[i] = take ? q + i : where[i];                                               \
    }                                                                                     \
}

BP_PIXEL_LOOPS(float, s)
BP_PIXEL_LOOPS(double, d)
#undef BP_PIXEL_LOOPS
#endif
