# Matrix multiply: C = op(A) op(B) (or C += ...), with a fused bias + activation epilogue.
#
# The loop structure is BLIS's (Van Zee & van de Geijn):
#
#   for jc in columns of C, NC at a time          B block: KC x NC, kept in L3
#     for pc in the k dimension, KC at a time
#       pack op(B)[pc:, jc:] into NR-wide micro-panels
#       for ic in rows of C, MC at a time         A block: MC x KC, kept in L2
#         pack op(A)[ic:, pc:] into MR-tall micro-panels
#         for jr, ir over the MR x NR tiles       micro-panels stream from L1
#           micro-kernel: one tile, accumulators in registers for all of KC
#
# Packing turns every operand layout (transposed or not, padded rows) into the two
# contiguous streams the micro-kernel reads, so one kernel serves all three products
# of a dense layer.  Edge tiles are computed whole from zero-padded panels and only
# their valid part is written.  When the last KC block of a tile is done, its bias and
# activation are applied while the tile is still in cache.
#
# Threads split C into disjoint blocks of whole tiles (never the k sum) and each packs
# its own panels, so there is no barrier and every element is summed in the same order
# whatever the thread count: results are bit-identical for 1 or N threads.
from cython cimport floating
from cython.parallel cimport parallel, threadid
from libc.string cimport memset
from backprop._activations cimport activate_tile
from backprop._parallel cimport part_start

cdef extern from "_gemm_kernels.h" nogil:
    void bp_gemm_init()
    const char* bp_gemm_kernel_name()
    void bp_sgemm_kernel(Py_ssize_t k, const float* a, const float* b, float* c,
                         Py_ssize_t ldc, int add)
    void bp_dgemm_kernel(Py_ssize_t k, const double* a, const double* b, double* c,
                         Py_ssize_t ldc, int add)
    int bp_team_size()
    void bp_pack_transposed_panel(float* dst, const float* src, Py_ssize_t ld, Py_ssize_t kc)

cdef enum:
    MR = 6        # rows of a micro-tile (BP_MR in the header)
    KC = 256      # k per packed block: an MR x KC and a KC x NR panel fit in L1 together
    MC = 96       # rows per packed A block (a multiple of MR): MC x KC fits in L2
    NC = 2048     # columns per packed B block (a multiple of both NRs): KC x NC in L3
    # Below ~1M multiply-adds (~25 us on one core) a second thread saves less than the
    # few microseconds a parallel region costs, and far less than it loses when another
    # process holds the other core (every region ends in a barrier).
    PARALLEL_MIN_WORK = 1 << 20


cdef inline Py_ssize_t _round_up(Py_ssize_t n, Py_ssize_t unit) noexcept nogil:
    return (n + unit - 1) // unit * unit


cdef inline int gemm_parts(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int n_threads) noexcept nogil:
    """Into how many parts C is split: one per thread, or one for small products."""
    if m * n * k < PARALLEL_MIN_WORK or n_threads < 1:
        return 1
    return n_threads


cdef inline Py_ssize_t gemm_part_bytes(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                                       int parts) noexcept nogil:
    """Packing scratch one part needs: an MC x KC block of A and a KC x NC block of B,
    each no larger than the part's share of C (sized for double, the larger element,
    rounded up to a cache line)."""
    cdef Py_ssize_t kc = min(<Py_ssize_t>KC, max(k, 1)), rows, cols
    if n >= m:     # parts split the columns (see gemm_part)
        rows = min(<Py_ssize_t>MC, _round_up(m, MR))
        cols = min(<Py_ssize_t>NC, _round_up((_round_up(n, 16) // 16 + parts - 1) // parts * 16, 16))
    else:
        rows = min(<Py_ssize_t>MC, _round_up((_round_up(m, MR) // MR + parts - 1) // parts * MR, MR))
        cols = min(<Py_ssize_t>NC, _round_up(n, 16))
    return _round_up((_round_up(rows * kc, 16) + kc * cols) * <Py_ssize_t>sizeof(double), 64)


cdef inline Py_ssize_t gemm_scratch_bytes(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                                          int n_threads) noexcept nogil:
    """The scratch one gemm() call of this shape needs with `n_threads` threads: a part's
    worth per thread (a thread packs only its own share, so more threads need less each)."""
    cdef int parts = gemm_parts(m, n, k, n_threads)
    return parts * gemm_part_bytes(m, n, k, parts)


cdef inline void pack_a(floating* dst, const floating* a, Py_ssize_t lda, bint trans_a,
                        Py_ssize_t i0, Py_ssize_t p0, Py_ssize_t mc, Py_ssize_t kc) noexcept nogil:
    """op(A)[i0:i0+mc, p0:p0+kc] as MR-tall micro-panels: dst[panel][p][i], zero-padded."""
    cdef Py_ssize_t q, ir, i, p, rows
    cdef floating* panel
    cdef const floating* src
    for q in range((mc + MR - 1) // MR):
        ir = q * MR
        panel = dst + ir * kc
        rows = min(MR, mc - ir)
        if trans_a:      # op(A)[i, p] = a[p, i]: each p reads `rows` adjacent values
            for p in range(kc):
                for i in range(rows):
                    panel[p * MR + i] = a[(p0 + p) * lda + i0 + ir + i]
                for i in range(rows, MR):
                    panel[p * MR + i] = 0
        else:            # A's rows are contiguous along p: read `rows` streams at once
            src = a + (i0 + ir) * lda + p0
            for p in range(kc):
                for i in range(rows):
                    panel[p * MR + i] = src[i * lda + p]
                for i in range(rows, MR):
                    panel[p * MR + i] = 0


cdef inline void pack_b(floating* dst, const floating* b, Py_ssize_t ldb, bint trans_b,
                        Py_ssize_t p0, Py_ssize_t j0, Py_ssize_t kc, Py_ssize_t nc,
                        Py_ssize_t NR) noexcept nogil:
    """op(B)[p0:p0+kc, j0:j0+nc] as NR-wide micro-panels: dst[panel][p][j], zero-padded."""
    cdef Py_ssize_t q, jr, j, p, cols
    cdef floating* panel
    cdef const floating* src
    for q in range((nc + NR - 1) // NR):
        jr = q * NR
        panel = dst + jr * kc
        cols = min(NR, nc - jr)
        if trans_b:      # op(B)[p, j] = b[j, p] (a weight matrix stored (out, in)):
            src = b + (j0 + jr) * ldb + p0      # read `cols` rows of b as parallel streams
            if floating is float:
                if cols == NR:                  # full panels: 8 x 8 register transposes
                    bp_pack_transposed_panel(panel, src, ldb, kc)
                    continue
            for p in range(kc):
                for j in range(cols):
                    panel[p * NR + j] = src[j * ldb + p]
                for j in range(cols, NR):
                    panel[p * NR + j] = 0
        else:
            for p in range(kc):
                for j in range(cols):
                    panel[p * NR + j] = b[(p0 + p) * ldb + j0 + jr + j]
                for j in range(cols, NR):
                    panel[p * NR + j] = 0


cdef inline void micro_tile(Py_ssize_t kc, const floating* a_panel, const floating* b_panel,
                            floating* c, Py_ssize_t ldc, Py_ssize_t rows, Py_ssize_t cols,
                            Py_ssize_t NR, bint add) noexcept nogil:
    """One MR x NR tile; an edge tile goes through a scratch tile so that only its
    rows x cols valid part of C is touched."""
    cdef double scratch[6 * 16]      # MR x NR elements of either precision
    cdef floating* tile = <floating*>scratch
    cdef Py_ssize_t i, j
    if rows == MR and cols == NR:
        if floating is float:
            bp_sgemm_kernel(kc, a_panel, b_panel, c, ldc, add)
        else:
            bp_dgemm_kernel(kc, a_panel, b_panel, c, ldc, add)
        return
    if floating is float:
        bp_sgemm_kernel(kc, a_panel, b_panel, tile, NR, 0)
    else:
        bp_dgemm_kernel(kc, a_panel, b_panel, tile, NR, 0)
    for i in range(rows):
        for j in range(cols):
            c[i * ldc + j] = c[i * ldc + j] + tile[i * NR + j] if add else tile[i * NR + j]


cdef inline void epilogue(floating* c, Py_ssize_t ldc, Py_ssize_t rows, Py_ssize_t cols,
                          const floating* bias, int activation) noexcept nogil:
    cdef Py_ssize_t i, j
    if bias != NULL:
        for i in range(rows):
            for j in range(cols):
                c[i * ldc + j] += bias[j]
    if activation != 0:
        activate_tile(c, ldc, rows, cols, activation)


cdef inline void gemm_block(Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                            Py_ssize_t k, const floating* a, Py_ssize_t lda, bint trans_a,
                            const floating* b, Py_ssize_t ldb, bint trans_b,
                            floating* c, Py_ssize_t ldc, bint accumulate,
                            const floating* bias, int activation, char* scratch) noexcept nogil:
    """C[r0:r1, c0:c1] by the BLIS loop nest, packing into this thread's scratch."""
    cdef Py_ssize_t NR = 16 if floating is float else 8
    # Equal k blocks (k = 784 -> 4 x 196, not 3 x 256 + 16): no short, inefficient block.
    cdef Py_ssize_t n_kblocks = (k + KC - 1) // KC
    cdef Py_ssize_t kc_size = (k + n_kblocks - 1) // n_kblocks
    # A's block first, B's after it on a 16-element boundary (see gemm_part_bytes).
    cdef floating* a_pack = <floating*>scratch
    cdef floating* b_pack = a_pack + _round_up(min(<Py_ssize_t>MC, _round_up(r1 - r0, MR)) * kc_size, 16)
    cdef Py_ssize_t jc, pc, ic, jr, ir, nc, kc, mc, rows, cols
    cdef bint last
    jc = c0
    while jc < c1:
        nc = min(NC, c1 - jc)
        pc = 0
        while pc < k:
            kc = min(kc_size, k - pc)
            last = pc + kc >= k
            pack_b(b_pack, b, ldb, trans_b, pc, jc, kc, nc, NR)
            ic = r0
            while ic < r1:
                mc = min(MC, r1 - ic)
                pack_a(a_pack, a, lda, trans_a, ic, pc, mc, kc)
                jr = 0
                while jr < nc:
                    cols = min(NR, nc - jr)
                    ir = 0
                    while ir < mc:
                        rows = min(MR, mc - ir)
                        micro_tile(kc, a_pack + ir * kc, b_pack + jr * kc,
                                   c + (ic + ir) * ldc + jc + jr, ldc, rows, cols, NR,
                                   accumulate or pc > 0)
                        if last:
                            epilogue(c + (ic + ir) * ldc + jc + jr, ldc, rows, cols,
                                     bias + jc + jr if bias != NULL else NULL, activation)
                        ir += MR
                    jr += NR
                ic += MC
            pc += kc
        jc += NC


cdef inline void gemm_part(Py_ssize_t part, Py_ssize_t parts, Py_ssize_t m, Py_ssize_t n,
                           Py_ssize_t k, const floating* a, Py_ssize_t lda, bint trans_a,
                           const floating* b, Py_ssize_t ldb, bint trans_b,
                           floating* c, Py_ssize_t ldc, bint accumulate,
                           const floating* bias, int activation, char* scratch) noexcept nogil:
    """Part `part` of C: whole tiles of the longer dimension (16 columns, the widest NR,
    so float and double split alike; or MR rows), clamped to C (see _parallel.pxd)."""
    cdef Py_ssize_t lo, hi
    if n >= m:
        lo = part_start(n, part, parts, 16)
        hi = part_start(n, part + 1, parts, 16)
        if lo < hi:
            gemm_block(0, m, lo, hi, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, accumulate,
                       bias, activation, scratch)
    else:
        lo = part_start(m, part, parts, MR)
        hi = part_start(m, part + 1, parts, MR)
        if lo < hi:
            gemm_block(lo, hi, 0, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, accumulate,
                       bias, activation, scratch)


cdef inline void gemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                      const floating* a, Py_ssize_t lda, bint trans_a,
                      const floating* b, Py_ssize_t ldb, bint trans_b,
                      floating* c, Py_ssize_t ldc, bint accumulate,
                      const floating* bias, int activation,
                      int n_threads, void* workspace) noexcept nogil:
    """C[m x n] (+)= op(A)[m x k] op(B)[k x n], row-major with leading dimensions
    lda/ldb/ldc; then C += bias (per column) and C = activation(C) elementwise.
    `workspace`: gemm_scratch_bytes(m, n, k, n_threads) bytes, 64-byte aligned, from the
    caller (a network allocates it once; nothing is allocated here)."""
    cdef int tid, team, parts
    cdef Py_ssize_t i, part, part_bytes
    cdef char* scratch = <char*>workspace
    if m <= 0 or n <= 0:
        return
    if k <= 0:           # an empty sum: C keeps its value, or becomes 0
        if not accumulate:
            for i in range(m):
                memset(c + i * ldc, 0, n * sizeof(floating))
        epilogue(c, ldc, m, n, bias, activation)
        return
    parts = gemm_parts(m, n, k, n_threads)
    part_bytes = gemm_part_bytes(m, n, k, parts)
    if parts == 1:       # no parallel region at all: it costs microseconds to enter
        gemm_part(0, 1, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, accumulate,
                  bias, activation, scratch)
        return
    # C is cut into `parts` (the threads asked for); OpenMP may start fewer threads, so
    # each takes parts tid, tid + team, ... and packs them in its own scratch, one at a time.
    with parallel(num_threads=parts):
        tid = threadid()
        team = bp_team_size()
        part = tid
        while part < parts:
            gemm_part(part, parts, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc,
                      accumulate, bias, activation, scratch + tid * part_bytes)
            part = part + team    # (not +=, which Cython reads as a reduction)
