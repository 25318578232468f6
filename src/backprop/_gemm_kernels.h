/* GEMM micro-kernels, packing routines, and the run-time choice between SIMD levels.
 *
 * The loop nest that drives them lives in _gemm.pxd.  This header supplies, per SIMD
 * level, what that loop nest needs and nothing else:
 *
 *   kernel          one MR x NR tile of C from a packed MR x k panel of A and a packed
 *                   k x NR panel of B, accumulators in registers for the whole k loop;
 *                   it writes (or adds) only the rows x cols valid part of the tile, so
 *                   edge tiles need no special case in the loop nest;
 *   pack_copy       a micro-panel from an operand whose panel dimension is contiguous:
 *                   dst[p * width + j] = src[p * ld + j];
 *   pack_transpose  a micro-panel from an operand whose k dimension is contiguous (W in
 *                   X.W^T, or a row-major A): dst[p * width + j] = src[j * ld + p];
 *
 * both packs zero the columns valid..width-1, so the kernel can run over whole tiles.
 *
 * Levels: "generic" (portable C, 6x16 / 6x8), "avx2+fma" (6x16 float / 6x8 double,
 * _gemm_avx2.h) and "avx512" (8x32 float / 8x16 double, _gemm_avx512.h).  Each level
 * has three tables: float products, bfloat16 products of float operands (_gemm_bf16.h:
 * VDPBF16PS where the CPU has it, else emulated with the level's float kernel) and
 * double products.  The kernels are compiled once per level (setup.py; backprop/_simd.py
 * chooses the level the CPU runs best), and BACKPROP_BUILD_LEVEL says which level this
 * is: bp_gemm_init() fills one context (bp_ctx, as BLIS's context does) with that
 * level's kernels and blocking, once, at import.  MR, NR and the cache blocking differ per level and per element type, so
 * the loop nest reads them from bp_ctx, never from compile-time constants.  The SIMD
 * kernels also carry `target` attributes, so the headers compile in every build.
 */
#ifndef BP_GEMM_KERNELS_H
#define BP_GEMM_KERNELS_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BP_HAVE_X86_SIMD 1
#endif

/* Packed panels are opaque to the loop nest (void *): float or double elements, or, for
 * bfloat16 products, pairs of bfloat16 values (see _gemm_bf16.h). */
typedef void (*bp_skernel_t)(ptrdiff_t k, const void *a, const void *b, float *c,
                             ptrdiff_t ldc, int rows, int cols, int add);
typedef void (*bp_dkernel_t)(ptrdiff_t k, const void *a, const void *b, double *c,
                             ptrdiff_t ldc, int rows, int cols, int add);
typedef void (*bp_spack_t)(void *dst, const float *src, ptrdiff_t ld, ptrdiff_t kc,
                           int width, int valid);
typedef void (*bp_dpack_t)(void *dst, const double *src, ptrdiff_t ld, ptrdiff_t kc,
                           int width, int valid);

/* The tile and blocking of one kind of product at the chosen level.  kc: the largest k
 * block; mc (a multiple of mr): rows of A packed at once, sized for L2; nc (a multiple
 * of nr): columns of B packed at once, sized for a share of L3.  A packed panel holds
 * `packed_bytes`-byte elements and its k runs in steps of `k_unit` (2 for pairs of
 * bfloat16: an odd k is padded with a zero). */
typedef struct {
    int mr, nr;
    ptrdiff_t kc, mc, nc;
    int packed_bytes, k_unit;
} bp_blocking;

typedef struct {
    bp_blocking blk;
    bp_skernel_t kernel;
    bp_spack_t pack_copy, pack_transpose;
} bp_sgemm_ops;

typedef struct {
    bp_blocking blk;
    bp_dkernel_t kernel;
    bp_dpack_t pack_copy, pack_transpose;
} bp_dgemm_ops;

/* s: float products; b: float operands rounded to bfloat16, products accumulated in
 * float (bf16_name says how: "avx512_bf16" or "emulated"); d: double products. */
typedef struct {
    const char *name;
    bp_sgemm_ops s;
    bp_sgemm_ops b;
    bp_dgemm_ops d;
    const char *bf16_name;
} bp_context;

/* Data/unified cache sizes in bytes by level (index 1..3), 0 where unknown. */
typedef struct { long size[4]; } bp_caches;

/* ------------------------------------------------------------------ portable level */

/* The generic kernel's contract in plain C; the compiler vectorises the inner j loop
 * with whatever the baseline ISA offers. */
#define BP_GENERIC_MR 6
#define BP_GENERIC_KERNEL(name, T, NR)                                                  \
    static void name(ptrdiff_t k, const void *a_, const void *b_, T *c, ptrdiff_t ldc,  \
                     int rows, int cols, int add)                                       \
    {                                                                                   \
        const T *a = (const T *)a_, *b = (const T *)b_;                                 \
        T acc[BP_GENERIC_MR][NR];                                                       \
        memset(acc, 0, sizeof(acc));                                                    \
        for (ptrdiff_t p = 0; p < k; p++, a += BP_GENERIC_MR, b += NR)                  \
            for (int i = 0; i < BP_GENERIC_MR; i++)                                     \
                for (int j = 0; j < NR; j++)                                            \
                    acc[i][j] += a[i] * b[j];                                           \
        for (int i = 0; i < rows; i++)                                                  \
            for (int j = 0; j < cols; j++)                                              \
                c[i * ldc + j] = add ? c[i * ldc + j] + acc[i][j] : acc[i][j];          \
    }

BP_GENERIC_KERNEL(bp_skernel_generic, float, 16)
BP_GENERIC_KERNEL(bp_dkernel_generic, double, 8)

#define BP_GENERIC_PACKS(T, sfx)                                                        \
    static void bp_pack_copy_##sfx(void *dst_, const T *src, ptrdiff_t ld, ptrdiff_t kc, \
                                   int width, int valid)                                \
    {                                                                                   \
        T *dst = (T *)dst_;                                                             \
        for (ptrdiff_t p = 0; p < kc; p++, dst += width, src += ld) {                   \
            int j = 0;                                                                  \
            for (; j < valid; j++) dst[j] = src[j];                                     \
            for (; j < width; j++) dst[j] = 0;                                          \
        }                                                                               \
    }                                                                                   \
    /* Reads `valid` rows of src as parallel streams, writes dst in order. */          \
    static void bp_pack_transpose_##sfx(void *dst_, const T *src, ptrdiff_t ld,          \
                                        ptrdiff_t kc, int width, int valid)             \
    {                                                                                   \
        T *dst = (T *)dst_;                                                             \
        for (ptrdiff_t p = 0; p < kc; p++, dst += width) {                              \
            int j = 0;                                                                  \
            for (; j < valid; j++) dst[j] = src[j * ld + p];                            \
            for (; j < width; j++) dst[j] = 0;                                          \
        }                                                                               \
    }

BP_GENERIC_PACKS(float, s_generic)
BP_GENERIC_PACKS(double, d_generic)

/* Edge tiles of kernels that only write whole tiles: compute the tile into a scratch
 * tile on the stack, then copy (or add) its valid part. */
#define BP_EDGE_THROUGH_SCRATCH(T, full, MR, NR, k, a, b, c, ldc, rows, cols, add)      \
    do {                                                                                \
        T tile_[(MR) * (NR)];                                                           \
        full(k, a, b, tile_, NR, 0);                                                    \
        for (int i_ = 0; i_ < (rows); i_++)                                             \
            for (int j_ = 0; j_ < (cols); j_++)                                         \
                (c)[i_ * (ldc) + j_] = (add) ? (c)[i_ * (ldc) + j_] + tile_[i_ * (NR) + j_] \
                                             : tile_[i_ * (NR) + j_];                   \
    } while (0)

#ifdef BP_HAVE_X86_SIMD
#include "_gemm_avx2.h"
#include "_gemm_avx512.h"
#endif
#include "_gemm_bf16.h"

static bp_context bp_ctx;        /* written once by bp_gemm_init, read-only afterwards */
static bp_caches bp_ctx_caches;  /* what the blocking was computed from */

/* Emulated bfloat16 products: this level's float packs, then the panel rounded in place
 * (it is still in L1), for this level's float kernel. */
static void bp_pack_copy_rounded(void *dst, const float *src, ptrdiff_t ld, ptrdiff_t kc,
                                 int width, int valid)
{
    bp_ctx.s.pack_copy(dst, src, ld, kc, width, valid);
    bp_round_to_bf16((float *)dst, kc * width);
}

static void bp_pack_transpose_rounded(void *dst, const float *src, ptrdiff_t ld,
                                      ptrdiff_t kc, int width, int valid)
{
    bp_ctx.s.pack_transpose(dst, src, ld, kc, width, valid);
    bp_round_to_bf16((float *)dst, kc * width);
}

/* ------------------------------------------------------------------ the levels */

enum { BP_LEVEL_GENERIC = 0, BP_LEVEL_AVX2 = 1, BP_LEVEL_AVX512 = 2 };

/* Each level's float products, its emulated bfloat16 products (bp_gemm_init puts the
 * native ones in their place where the CPU has them) and its double products. */
#define BP_FLOAT_OPS(MR, NR, kernel, copy, transpose)                                   \
    {{MR, NR, 0, 0, 0, sizeof(float), 1}, kernel, copy, transpose},                     \
    {{MR, NR, 0, 0, 0, sizeof(float), 1}, kernel, bp_pack_copy_rounded,                 \
     bp_pack_transpose_rounded}

static const bp_context bp_levels[] = {
    {"generic",
     BP_FLOAT_OPS(BP_GENERIC_MR, 16, bp_skernel_generic, bp_pack_copy_s_generic,
                  bp_pack_transpose_s_generic),
     {{BP_GENERIC_MR, 8, 0, 0, 0, sizeof(double), 1}, bp_dkernel_generic,
      bp_pack_copy_d_generic, bp_pack_transpose_d_generic},
     "emulated"},
#ifdef BP_HAVE_X86_SIMD
    {"avx2+fma",
     BP_FLOAT_OPS(BP_AVX2_MR, BP_AVX2_NR_FLOAT, bp_skernel_avx2, bp_pack_copy_s_generic,
                  bp_pack_transpose_s_avx2),
     {{BP_AVX2_MR, BP_AVX2_NR_DOUBLE, 0, 0, 0, sizeof(double), 1}, bp_dkernel_avx2,
      bp_pack_copy_d_generic, bp_pack_transpose_d_generic},
     "emulated"},
    {"avx512",
     BP_FLOAT_OPS(BP_AVX512_MR, BP_AVX512_NR_FLOAT, bp_skernel_avx512, bp_pack_copy_s_avx512,
                  bp_pack_transpose_s_avx512),
     {{BP_AVX512_MR, BP_AVX512_NR_DOUBLE, 0, 0, 0, sizeof(double), 1}, bp_dkernel_avx512,
      bp_pack_copy_d_avx512, bp_pack_transpose_d_avx512},
     "emulated"},
#endif
};

#ifdef BP_HAVE_X86_SIMD
/* The native bfloat16 products of the AVX-512 level (_gemm_bf16.h). */
static const bp_sgemm_ops bp_bf16_native = {
    {BP_AVX512_MR, BP_AVX512_NR_FLOAT, 0, 0, 0, sizeof(uint16_t), 2},
    bp_bkernel_avx512, bp_pack_copy_b_avx512, bp_pack_transpose_b_avx512};
#endif

/* The best level this CPU (and its OS, which must save the wider registers) runs. */
static int bp_cpu_level(void)
{
#ifdef BP_HAVE_X86_SIMD
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512cd"))
        return BP_LEVEL_AVX512;
    if (avx2)
        return BP_LEVEL_AVX2;
#endif
    return BP_LEVEL_GENERIC;
}

/* Whether this CPU has VDPBF16PS (and the rest of the AVX-512 level); the environment
 * variable BACKPROP_BF16=emulated turns the native kernels off (to compare the two). */
static int bp_cpu_has_bf16(void)
{
#ifdef BP_HAVE_X86_SIMD
    const char *choice = getenv("BACKPROP_BF16");
    if (choice != NULL && strcmp(choice, "emulated") == 0)
        return 0;
    return bp_cpu_level() >= BP_LEVEL_AVX512 && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* The level this build was compiled for: 0 generic, 1 avx2+fma, 2 avx512 (setup.py). */
#ifndef BACKPROP_BUILD_LEVEL
#define BACKPROP_BUILD_LEVEL BP_LEVEL_GENERIC
#endif

/* ------------------------------------------------------------------ cache blocking */


/* "32K", "1024K", "32M" or a plain byte count, as Linux's sysfs writes them. */
static long bp_parse_size(const char *text)
{
    char *end;
    long value = strtol(text, &end, 10);
    if (end == text || value <= 0)
        return 0;
    if (*end == 'K' || *end == 'k') return value << 10;
    if (*end == 'M' || *end == 'm') return value << 20;
    if (*end == 'G' || *end == 'g') return value << 30;
    return value;
}

static int bp_read_line(const char *path, char *buf, size_t len)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    int ok = fgets(buf, (int)len, f) != NULL;
    fclose(f);
    return ok;
}

/* From Linux's sysfs (what lscpu reads), else sysconf; sizes the OS does not report
 * stay 0.  sysfs comes first: glibc's sysconf has been seen to report an L3 ten times
 * too large on AMD guests. */
static bp_caches bp_detect_caches(void)
{
    bp_caches caches = {{0, 0, 0, 0}};
    char path[96], text[64];
    for (int index = 0; index < 16; index++) {
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/level", index);
        if (!bp_read_line(path, text, sizeof(text)))
            continue;
        int level = atoi(text);
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/type", index);
        if (level < 1 || level > 3 || !bp_read_line(path, text, sizeof(text))
                || strncmp(text, "Instruction", 11) == 0)
            continue;
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
        if (bp_read_line(path, text, sizeof(text)))
            caches.size[level] = bp_parse_size(text);
    }
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
    const int names[4] = {0, _SC_LEVEL1_DCACHE_SIZE, _SC_LEVEL2_CACHE_SIZE, _SC_LEVEL3_CACHE_SIZE};
    for (int level = 1; level <= 3; level++)
        if (caches.size[level] <= 0) {
            long value = sysconf(names[level]);
            caches.size[level] = value > 0 ? value : 0;
        }
#endif
    return caches;
}

static long bp_online_cpus(void)
{
#ifdef _SC_NPROCESSORS_ONLN
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? n : 1;
#else
    return 1;
#endif
}

static ptrdiff_t bp_clamp(ptrdiff_t x, ptrdiff_t lo, ptrdiff_t hi)
{
    return x < lo ? lo : x > hi ? hi : x;
}

/* Sizes the OS did not report, or reported implausibly, get a common value. */
static bp_caches bp_sane_caches(bp_caches c)
{
    if (c.size[1] < (16 << 10) || c.size[1] > (1 << 20)) c.size[1] = 32 << 10;
    if (c.size[2] < (128 << 10) || c.size[2] > (64 << 20)) c.size[2] = 512 << 10;
    if (c.size[3] < c.size[2] || c.size[3] > (1L << 30)) c.size[3] = 8L << 20;
    return c;
}

/* KC, MC, NC for one element type, from the cache sizes.
 *
 * AVX-512 (measured on Zen 4/Zen 5, 1 MiB L2): k blocks as long as L2 allows, KC*size
 * = L2/256 bytes (1024 floats), so the B micro-panel streams from L2 and C is loaded
 * and stored once per long k block; MC*KC*size = 3/4 of L2; NC*KC*size = this core's
 * share of L3, capped at 4096 columns.  KC for L1 (192-384) was measured 3-7% slower.
 *
 * AVX2 and generic (tuned on Zen 3: 32 KiB L1, 512 KiB L2): the classic BLIS sizing,
 * KC = L1/128 elements, so a 6-row A and a 16-wide B micro-panel of floats fill 70% of
 * L1; MC*KC*4 bytes = 3/16 of L2; NC 2048.  For Zen 3 this gives the 256/96/2048 it was
 * tuned with, for both element types.
 */
static bp_blocking bp_blocking_for(bp_blocking blk, int level, size_t size, bp_caches c,
                                   long n_cpus)
{
    ptrdiff_t kc, mc, nc;
    if (level == BP_LEVEL_AVX512) {
        ptrdiff_t kc_bytes = bp_clamp(c.size[2] / 256, 1024, 4096);
        kc = kc_bytes / (ptrdiff_t)size;
        mc = c.size[2] * 3 / 4 / kc_bytes;
        nc = bp_clamp(c.size[3] / n_cpus / kc_bytes, 512, 4096);
    } else {
        kc = bp_clamp(c.size[1] / 128, 128, 512) / 8 * 8;
        mc = c.size[2] * 3 / 16 / (kc * 4);
        nc = 2048;
    }
    blk.kc = kc / blk.k_unit * blk.k_unit;
    blk.mc = bp_clamp(mc / blk.mr * blk.mr, blk.mr, 32 * blk.mr);
    blk.nc = nc / blk.nr * blk.nr;
    return blk;
}

/* ------------------------------------------------------------------ the context */

/* Called once at import, before any thread exists.  Returns -1 (and changes nothing)
 * when the CPU lacks the instructions this build was compiled with. */
static int bp_gemm_init(void)
{
    int level = BACKPROP_BUILD_LEVEL;
    if (bp_cpu_level() < level)
        return -1;
    bp_ctx = bp_levels[level];
    bp_ctx_caches = bp_sane_caches(bp_detect_caches());
    long n_cpus = bp_online_cpus();
#ifdef BP_HAVE_X86_SIMD
    if (level == BP_LEVEL_AVX512 && bp_cpu_has_bf16()) {
        bp_ctx.b = bp_bf16_native;
        bp_ctx.bf16_name = "avx512_bf16";
    }
#endif
    bp_ctx.s.blk = bp_blocking_for(bp_ctx.s.blk, level, sizeof(float), bp_ctx_caches, n_cpus);
    bp_ctx.b.blk = bp_blocking_for(bp_ctx.b.blk, level, bp_ctx.b.blk.packed_bytes,
                                   bp_ctx_caches, n_cpus);
    bp_ctx.d.blk = bp_blocking_for(bp_ctx.d.blk, level, sizeof(double), bp_ctx_caches, n_cpus);
    return 0;
}

static const char *bp_gemm_kernel_name(void) { return bp_ctx.name; }
static const char *bp_bf16_kernel_name(void) { return bp_ctx.bf16_name; }

static inline int bp_team_size(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

#endif  /* BP_GEMM_KERNELS_H */
