# Matrix multiply: C = op(A) op(B) (or C += ...), with a fused bias + activation epilogue.
#
# The loop structure is BLIS's (Van Zee & van de Geijn):
#
#   for jc in columns of C, NC at a time          B block: KC x NC, kept in L3
#     for pc in the k dimension, KC at a time
#       pack op(B)[pc:, jc:] into NR-wide micro-panels
#       for ic in rows of C, MC at a time         A block: MC x KC, kept in L2
#         pack op(A)[ic:, pc:] into MR-tall micro-panels
#         for jr, ir over the MR x NR tiles       micro-panels stream from L1/L2
#           micro-kernel: one tile, accumulators in registers for all of KC
#
# Packing turns every operand layout (transposed or not, padded rows) into the two
# contiguous streams the micro-kernel reads, so one kernel serves all three products
# of a dense layer.  Edge tiles are computed whole from zero-padded panels and the
# kernel writes only their valid part.  When the last KC block of a tile is done, its
# bias and activation are applied while the tile is still in cache.  Products with a
# side too thin for the tiles (a layer with one to four outputs) skip all of this and
# run the unpacked loops of _gemm_skinny.h.
#
# The micro-kernels, the packing routines and MR, NR, KC, MC, NC come from the SIMD
# level these kernels were built for (bp_ctx in _gemm_kernels.h: generic, avx2+fma or
# avx512, the blocking from the CPU's cache sizes); nothing here assumes a tile shape.
#
# Threads split C into disjoint strips of whole tiles (never the k sum): each share
# packs its own panels into its own scratch slot, so there is no barrier and every
# element is summed in the same order whatever the team: results are bit-identical
# for any thread count.  The plan (k block, split, shares, scratch per share) is a pure
# function of the shape and the thread count asked for, shared by gemm() and
# gemm_scratch_bytes(), so a caller can size the scratch exactly beforehand.
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.string cimport memset
from backprop._activations cimport activate_tile
from backprop._parallel cimport part_start
from backprop._ops cimport FLOAT32, BFLOAT16

cdef extern from "_gemm_kernels.h" nogil:
    ctypedef void (*bp_skernel_t)(Py_ssize_t k, const void* a, const void* b, float* c,
                               Py_ssize_t ldc, int rows, int cols, int add) noexcept nogil
    ctypedef void (*bp_dkernel_t)(Py_ssize_t k, const void* a, const void* b, double* c,
                               Py_ssize_t ldc, int rows, int cols, int add) noexcept nogil
    ctypedef void (*bp_spack_t)(void* dst, const float* src, Py_ssize_t ld, Py_ssize_t kc,
                             int width, int valid) noexcept nogil
    ctypedef void (*bp_dpack_t)(void* dst, const double* src, Py_ssize_t ld, Py_ssize_t kc,
                             int width, int valid) noexcept nogil
    ctypedef struct bp_blocking:
        int mr, nr
        Py_ssize_t kc, mc, nc
        int packed_bytes, k_unit
    ctypedef struct bp_sgemm_ops:
        bp_blocking blk
        bp_skernel_t kernel
        bp_spack_t pack_copy, pack_transpose
    ctypedef struct bp_dgemm_ops:
        bp_blocking blk
        bp_dkernel_t kernel
        bp_dpack_t pack_copy, pack_transpose
    ctypedef struct bp_context:
        const char* name
        bp_sgemm_ops s
        bp_sgemm_ops b
        bp_dgemm_ops d
        const char* bf16_name
    ctypedef struct bp_caches:
        long size[4]
    const bp_context bp_ctx
    const bp_caches bp_ctx_caches
    int bp_gemm_init()
    const char* bp_gemm_kernel_name()
    const char* bp_bf16_kernel_name()
    int bp_team_size()
    float bp_bf16_rounded(float x)
    float bp_bf16_peak_loop(long iterations)
    int BP_BF16_PEAK_FLOPS_PER_ITERATION

cdef extern from "_gemm_skinny.h" nogil:
    void bp_dot_rows_s(Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t n, Py_ssize_t k,
                       const float* a, Py_ssize_t lda, const float* b, Py_ssize_t ldb,
                       float* c, Py_ssize_t ldc, int accumulate)
    void bp_dot_rows_d(Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t n, Py_ssize_t k,
                       const double* a, Py_ssize_t lda, const double* b, Py_ssize_t ldb,
                       double* c, Py_ssize_t ldc, int accumulate)
    void bp_axpy_rows_s(Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t n, Py_ssize_t k,
                        const float* a, Py_ssize_t lda, int trans_a, const float* b,
                        Py_ssize_t ldb, float* c, Py_ssize_t ldc, int accumulate)
    void bp_axpy_rows_d(Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t n, Py_ssize_t k,
                        const double* a, Py_ssize_t lda, int trans_a, const double* b,
                        Py_ssize_t ldb, double* c, Py_ssize_t ldc, int accumulate)

cdef enum:
    # Below ~2M multiply-adds (~20-40 us on one core) a second thread saves less than it
    # costs a training step: the serial work that follows (the optimizer, the next
    # layer's packing) must first pull the other thread's half of C from its core's
    # cache.  Measured on Zen 4, 64-100-10 with batch 200 (1.3M multiply-adds in the
    # first layer's products): the product alone 33 -> 19 us on two threads, the whole
    # step 101 us on one thread and 107 us on two.  Far less than it loses when another
    # process holds the other core, either (every region ends in a barrier).
    PARALLEL_MIN_WORK = 1 << 21


cdef struct GemmPlan:
    Py_ssize_t kc          # the k block: k in equal blocks of at most KC (784 -> 4 x 196
                           # with KC = 256, not 3 x 256 + 16: no short, inefficient block)
    bint by_rows           # threads split C's rows, else its columns
    Py_ssize_t units       # MR-tall (by rows) or NR-wide (by columns) strips to share out
    int workers            # shares, none empty: each one thread's work and one scratch slot
    Py_ssize_t a_bytes     # the packed A block of a slot; the packed B block follows it
    Py_ssize_t slot_bytes  # one share's scratch, a multiple of 64 bytes


cdef inline const bp_blocking* _blocking(Py_ssize_t itemsize, int products) noexcept nogil:
    if itemsize == sizeof(double):
        return &bp_ctx.d.blk
    return &bp_ctx.b.blk if products == BFLOAT16 else &bp_ctx.s.blk


cdef inline Py_ssize_t _round_up(Py_ssize_t x, Py_ssize_t unit) noexcept nogil:
    return (x + unit - 1) // unit * unit


cdef inline Py_ssize_t panel_bytes(const bp_blocking* blk, Py_ssize_t kc,
                                   Py_ssize_t width) noexcept nogil:
    """A packed panel of `width` columns (or rows) over kc values of k."""
    return _round_up(kc, blk.k_unit) * width * blk.packed_bytes


cdef inline GemmPlan plan_gemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int n_threads,
                               Py_ssize_t itemsize, int products) noexcept nogil:
    """How gemm() runs an m x n x k product of `itemsize`-byte elements on at most
    `n_threads` threads.  An empty product (m, n or k <= 0) has no workers."""
    cdef const bp_blocking* blk = _blocking(itemsize, products)
    cdef GemmPlan plan
    cdef Py_ssize_t n_kblocks, share, rows, cols
    memset(&plan, 0, sizeof(plan))
    if m <= 0 or n <= 0 or k <= 0:
        return plan
    n_kblocks = (k + blk.kc - 1) // blk.kc
    plan.kc = _round_up((k + n_kblocks - 1) // n_kblocks, blk.k_unit)
    # Split the longer side: the operand every share packs in full is then the smaller.
    plan.by_rows = m > n
    plan.units = (m + blk.mr - 1) // blk.mr if plan.by_rows else (n + blk.nr - 1) // blk.nr
    if <double>m * n * k < PARALLEL_MIN_WORK:
        n_threads = 1
    # Shares of `share` strips each (part_start's split; the last may be shorter), as many
    # as the team needs to cover C, so that none is empty whatever the team.  (The team
    # itself is capped by the caller: MAX_THREADS in _core.pyx.)
    share = max(1, min(<Py_ssize_t>n_threads, plan.units))
    share = (plan.units + share - 1) // share
    plan.workers = <int>((plan.units + share - 1) // share)
    if plan.by_rows:
        rows = min(blk.mc, share * blk.mr)
        cols = min(blk.nc, _round_up(n, blk.nr))
    else:
        rows = min(blk.mc, _round_up(m, blk.mr))
        cols = min(blk.nc, share * blk.nr)
    plan.a_bytes = _round_up(panel_bytes(blk, plan.kc, rows), 64)  # B's panels start on a line
    plan.slot_bytes = _round_up(plan.a_bytes + panel_bytes(blk, plan.kc, cols), 64)
    return plan


cdef inline Py_ssize_t gemm_scratch_bytes(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                                          int n_threads, Py_ssize_t itemsize) noexcept nogil:
    """The scratch gemm() needs for this shape, element size and thread count, in either
    kind of product (so a network's precision can change without planning again): each
    share packs only its own strip of C's operands, so the need per thread shrinks as the
    team grows, and a team larger than the number of strips costs nothing more.  A
    caller sizes one allocation as the maximum over all the products it will run."""
    cdef GemmPlan plan = plan_gemm(m, n, k, n_threads, itemsize, FLOAT32)
    cdef GemmPlan rounded = plan_gemm(m, n, k, n_threads, itemsize, BFLOAT16)
    return max(plan.workers * plan.slot_bytes, rounded.workers * rounded.slot_bytes)


# ---- the per-level operations, chosen by element type

cdef inline void _kernel(int products, Py_ssize_t kc, const char* a_panel,
                         const char* b_panel, floating* c, Py_ssize_t ldc, int rows, int cols,
                         bint add) noexcept nogil:
    if floating is float:
        if products == BFLOAT16:
            bp_ctx.b.kernel(kc, a_panel, b_panel, c, ldc, rows, cols, add)
        else:
            bp_ctx.s.kernel(kc, a_panel, b_panel, c, ldc, rows, cols, add)
    else:
        bp_ctx.d.kernel(kc, a_panel, b_panel, c, ldc, rows, cols, add)


cdef inline void _pack(int products, char* dst, const floating* src, Py_ssize_t ld,
                       bint k_contiguous, Py_ssize_t kc, int width, int valid) noexcept nogil:
    """One micro-panel, element (p, j) for p < kc, j < width (zero from `valid` on), from
    src[j * ld + p] (k_contiguous) or src[p * ld + j], in the layout of the product's
    kernel (_gemm_kernels.h)."""
    cdef const bp_sgemm_ops* ops
    if floating is float:
        ops = &bp_ctx.b if products == BFLOAT16 else &bp_ctx.s
        if k_contiguous:
            ops.pack_transpose(dst, src, ld, kc, width, valid)
        else:
            ops.pack_copy(dst, src, ld, kc, width, valid)
    else:
        if k_contiguous:
            bp_ctx.d.pack_transpose(dst, src, ld, kc, width, valid)
        else:
            bp_ctx.d.pack_copy(dst, src, ld, kc, width, valid)


cdef inline void pack_a(int products, char* dst, const floating* a, Py_ssize_t lda,
                        bint trans_a, Py_ssize_t i0, Py_ssize_t p0, Py_ssize_t mc,
                        Py_ssize_t kc) noexcept nogil:
    """op(A)[i0:i0+mc, p0:p0+kc] as MR-tall micro-panels, zero-padded."""
    cdef const bp_blocking* blk = _blocking(sizeof(floating), products)
    cdef int MR = blk.mr
    cdef Py_ssize_t step = panel_bytes(blk, kc, MR), ir = 0
    while ir < mc:
        if trans_a:      # op(A)[i, p] = a[p, i]: each p holds MR adjacent values
            _pack(products, dst, a + p0 * lda + i0 + ir, lda, False, kc, MR, min(MR, mc - ir))
        else:            # A's rows are contiguous along p: transposed into the panel
            _pack(products, dst, a + (i0 + ir) * lda + p0, lda, True, kc, MR, min(MR, mc - ir))
        ir += MR
        dst += step


cdef inline void pack_b(int products, char* dst, const floating* b, Py_ssize_t ldb,
                        bint trans_b, Py_ssize_t p0, Py_ssize_t j0, Py_ssize_t kc,
                        Py_ssize_t nc) noexcept nogil:
    """op(B)[p0:p0+kc, j0:j0+nc] as NR-wide micro-panels, zero-padded."""
    cdef const bp_blocking* blk = _blocking(sizeof(floating), products)
    cdef int NR = blk.nr
    cdef Py_ssize_t step = panel_bytes(blk, kc, NR), jr = 0
    while jr < nc:
        if trans_b:      # op(B)[p, j] = b[j, p] (a weight matrix stored (out, in))
            _pack(products, dst, b + (j0 + jr) * ldb + p0, ldb, True, kc, NR, min(NR, nc - jr))
        else:
            _pack(products, dst, b + p0 * ldb + j0 + jr, ldb, False, kc, NR, min(NR, nc - jr))
        jr += NR
        dst += step


cdef inline void epilogue(floating* c, Py_ssize_t ldc, Py_ssize_t rows, Py_ssize_t cols,
                          const floating* bias, int activation) noexcept nogil:
    cdef Py_ssize_t i, j
    if bias != NULL:
        for i in range(rows):
            for j in range(cols):
                c[i * ldc + j] += bias[j]
    if activation != 0:
        activate_tile(c, ldc, rows, cols, activation)


cdef inline void gemm_block(const GemmPlan* plan, int products, Py_ssize_t r0, Py_ssize_t r1,
                            Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t k,
                            const floating* a, Py_ssize_t lda, bint trans_a,
                            const floating* b, Py_ssize_t ldb, bint trans_b,
                            floating* c, Py_ssize_t ldc, bint accumulate,
                            const floating* bias, int activation, char* slot) noexcept nogil:
    """C[r0:r1, c0:c1] by the BLIS loop nest, packing into this share's scratch slot."""
    cdef const bp_blocking* blk = _blocking(sizeof(floating), products)
    cdef int MR = blk.mr, NR = blk.nr
    cdef char* a_pack = slot
    cdef char* b_pack = slot + plan.a_bytes
    cdef Py_ssize_t jc, pc, ic, jr, ir, nc, kc, mc, rows, cols, a_step, b_step
    cdef bint last
    jc = c0
    while jc < c1:
        nc = min(blk.nc, c1 - jc)
        pc = 0
        while pc < k:
            kc = min(plan.kc, k - pc)
            last = pc + kc >= k
            a_step = panel_bytes(blk, kc, MR)
            b_step = panel_bytes(blk, kc, NR)
            pack_b(products, b_pack, b, ldb, trans_b, pc, jc, kc, nc)
            ic = r0
            while ic < r1:
                mc = min(blk.mc, r1 - ic)
                pack_a(products, a_pack, a, lda, trans_a, ic, pc, mc, kc)
                jr = 0
                while jr < nc:
                    cols = min(NR, nc - jr)
                    ir = 0
                    while ir < mc:
                        rows = min(MR, mc - ir)
                        _kernel(products, kc, a_pack + ir // MR * a_step,
                                b_pack + jr // NR * b_step, c + (ic + ir) * ldc + jc + jr, ldc,
                                <int>rows, <int>cols, accumulate or pc > 0)
                        if last:
                            epilogue(c + (ic + ir) * ldc + jc + jr, ldc, rows, cols,
                                     bias + jc + jr if bias != NULL else NULL, activation)
                        ir += MR
                    jr += NR
                ic += blk.mc
            pc += kc
        jc += blk.nc


cdef inline void gemm_share(const GemmPlan* plan, int products, int share, Py_ssize_t m,
                            Py_ssize_t n, Py_ssize_t k, const floating* a, Py_ssize_t lda,
                            bint trans_a, const floating* b, Py_ssize_t ldb, bint trans_b,
                            floating* c, Py_ssize_t ldc, bint accumulate,
                            const floating* bias, int activation, char* slot) noexcept nogil:
    """Share `share` of plan.workers: a run of whole strips, clamped to C (see
    _parallel.pxd); plan_gemm chose the count so that none is empty."""
    cdef const bp_blocking* blk = _blocking(sizeof(floating), products)
    if plan.by_rows:
        gemm_block(plan, products, part_start(m, share, plan.workers, blk.mr),
                   part_start(m, share + 1, plan.workers, blk.mr), 0, n, k, a, lda, trans_a,
                   b, ldb, trans_b, c, ldc, accumulate, bias, activation, slot)
    else:
        gemm_block(plan, products, 0, m, part_start(n, share, plan.workers, blk.nr),
                   part_start(n, share + 1, plan.workers, blk.nr), k, a, lda, trans_a,
                   b, ldb, trans_b, c, ldc, accumulate, bias, activation, slot)


# ---- products too thin for the tiles (_gemm_skinny.h)

cdef enum SkinnyForm:
    TILED = 0
    DOT = 1           # C[i, j] = A's row i . B's row j: op(A) = A, op(B) = B^T
    AXPY = 2          # C's row i += A(i, p) * B's row p: op(B) = B

cdef enum:
    # The widest C computed as dot products, and the most rows of C or terms of k that
    # go to the unpacked loop when B is not transposed.  Measured on Zen 4 (200 x 100
    # operands): the tiles cost about the same for 1 to NR columns (15 us), the dot
    # products grow with the columns (4.5 us for 1, 8 for 4, 15 for 8).
    SKINNY_COLUMNS = 4
    SKINNY_SIDE = 2


cdef inline int skinny_form(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, bint trans_a,
                            bint trans_b) noexcept nogil:
    if trans_b and not trans_a and n <= SKINNY_COLUMNS:
        return DOT
    if not trans_b and (m <= SKINNY_SIDE or k <= SKINNY_SIDE):
        return AXPY
    return TILED


cdef inline void skinny_rows(int form, Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t n,
                             Py_ssize_t k, const floating* a, Py_ssize_t lda, bint trans_a,
                             const floating* b, Py_ssize_t ldb, floating* c, Py_ssize_t ldc,
                             bint accumulate, const floating* bias,
                             int activation) noexcept nogil:
    """Rows i0..i1 of C by the unpacked loop `form`, then their bias and activation."""
    if form == DOT:
        if floating is float:
            bp_dot_rows_s(i0, i1, n, k, a, lda, b, ldb, c, ldc, accumulate)
        else:
            bp_dot_rows_d(i0, i1, n, k, a, lda, b, ldb, c, ldc, accumulate)
    else:
        if floating is float:
            bp_axpy_rows_s(i0, i1, n, k, a, lda, trans_a, b, ldb, c, ldc, accumulate)
        else:
            bp_axpy_rows_d(i0, i1, n, k, a, lda, trans_a, b, ldb, c, ldc, accumulate)
    epilogue(c + i0 * ldc, ldc, i1 - i0, n, bias, activation)


cdef inline void gemm_skinny(int form, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                             const floating* a, Py_ssize_t lda, bint trans_a,
                             const floating* b, Py_ssize_t ldb, floating* c, Py_ssize_t ldc,
                             bint accumulate, const floating* bias, int activation,
                             int n_threads) noexcept nogil:
    """Threads split C by rows, each row computed whole by one thread: the same result
    for any team."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = n_threads if <double>m * n * k >= PARALLEL_MIN_WORK and m > 1 else 1
    if team <= 1:
        skinny_rows(form, 0, m, n, k, a, lda, trans_a, b, ldb, c, ldc, accumulate, bias,
                    activation)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(m, t, team, 1)
        hi = part_start(m, t + 1, team, 1)
        skinny_rows(form, lo, hi, n, k, a, lda, trans_a, b, ldb, c, ldc, accumulate, bias,
                    activation)


cdef inline void gemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                      const floating* a, Py_ssize_t lda, bint trans_a,
                      const floating* b, Py_ssize_t ldb, bint trans_b,
                      floating* c, Py_ssize_t ldc, bint accumulate,
                      const floating* bias, int activation, int products,
                      int n_threads, void* scratch) noexcept nogil:
    """C[m x n] (+)= op(A)[m x k] op(B)[k x n], row-major with leading dimensions
    lda/ldb/ldc; then C += bias (per column) and C = activation(C) elementwise.
    `products`: FLOAT32, or BFLOAT16 (float only: the operands rounded to bfloat16).

    `scratch`: at least gemm_scratch_bytes(m, n, k, n_threads, sizeof(floating)) bytes,
    64-byte aligned, from the caller (a network allocates it once; nothing is allocated
    here).  If OpenMP grants fewer threads than asked, each runs several shares in turn,
    each in its own thread's slot: the result is the same."""
    cdef int tid, team, share, form
    cdef Py_ssize_t i
    cdef GemmPlan plan
    if floating is double:
        products = FLOAT32
    if m <= 0 or n <= 0:
        return
    if k <= 0:           # an empty sum: C keeps its value, or becomes 0
        if not accumulate:
            for i in range(m):
                memset(c + i * ldc, 0, n * sizeof(floating))
        epilogue(c, ldc, m, n, bias, activation)
        return
    # (The unpacked loops multiply floats: bfloat16 products always take the tiles.)
    form = skinny_form(m, n, k, trans_a, trans_b) if products == FLOAT32 else TILED
    if form != TILED:
        gemm_skinny(form, m, n, k, a, lda, trans_a, b, ldb, c, ldc, accumulate, bias,
                    activation, n_threads)
        return
    plan = plan_gemm(m, n, k, n_threads, sizeof(floating), products)
    if plan.workers == 1:    # no parallel region at all: it costs microseconds to enter
        gemm_share(&plan, products, 0, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc,
                   accumulate, bias, activation, <char*>scratch)
        return
    with parallel(num_threads=plan.workers):
        tid = threadid()
        team = bp_team_size()
        share = tid
        while share < plan.workers:
            gemm_share(&plan, products, share, m, n, k, a, lda, trans_a, b, ldb, trans_b, c,
                       ldc, accumulate, bias, activation,
                       <char*>scratch + tid * plan.slot_bytes)
            share = share + team      # (not +=, which Cython reads as a reduction)
