# Activation functions and their derivatives: nogil kernels over row-major tiles.
#
# Forward kernels overwrite a tile in place (the GEMM calls `activate_tile` on each
# finished output tile while it is still in cache).  Backward kernels turn dL/da into
# dL/dz in place, using the saved output `a` wherever the math allows (sigmoid
# s(1-s), tanh 1-t^2, relu mask, elu a+1, softplus 1-exp(-a)); only GELU needs the
# saved pre-activation `z`.  Constants follow PyTorch's defaults so results can be
# compared number for number: leaky_relu slope 0.01, elu alpha 1, softplus beta 1
# with threshold 20, GELU exact (erf form).
from cython cimport floating
from libc.math cimport exp, expf, expm1, log, log1p, tanh, erf
from libc.string cimport memcpy
from cython.parallel cimport prange
from backprop._parallel cimport part_start, team_for

cdef extern from "_gates.h" nogil:
    void bp_sigmoid_row_f(float* x, Py_ssize_t n)
    void bp_tanh_row_f(float* x, Py_ssize_t n)

cdef enum Activation:
    IDENTITY = 0
    SIGMOID = 1
    TANH = 2
    RELU = 3
    LEAKY_RELU = 4
    ELU = 5
    GELU = 6
    SOFTPLUS = 7
    SOFTMAX = 8

cdef extern from *:
    """
    #define BP_LEAKY_SLOPE 0.01
    #define BP_SOFTPLUS_THRESHOLD 20.0
    #define BP_INV_SQRT2 0.70710678118654752440
    #define BP_INV_SQRT_2PI 0.39894228040143267794
    """
    const double LEAKY_SLOPE "BP_LEAKY_SLOPE"
    const double SOFTPLUS_THRESHOLD "BP_SOFTPLUS_THRESHOLD"
    const double INV_SQRT2 "BP_INV_SQRT2"
    const double INV_SQRT_2PI "BP_INV_SQRT_2PI"


cdef inline double sigmoid(double z) noexcept nogil:
    # Two branches so exp never overflows: exp(-z) for z >= 0, exp(z) otherwise.
    cdef double e
    if z >= 0:
        return 1.0 / (1.0 + exp(-z))
    e = exp(z)
    return e / (1.0 + e)


cdef inline double softplus(double z) noexcept nogil:
    # log(1 + e^z) without overflow; above the threshold PyTorch returns z itself.
    if z > SOFTPLUS_THRESHOLD:
        return z
    return log1p(exp(z)) if z <= 0 else z + log1p(exp(-z))


cdef inline double activate(double z, int activation) noexcept nogil:
    """One element of an elementwise activation (softmax is row-wise, see below)."""
    if activation == SIGMOID:
        return sigmoid(z)
    if activation == TANH:
        return tanh(z)
    if activation == RELU:
        return 0.0 if z < 0 else z      # NaN stays NaN, as in torch
    if activation == LEAKY_RELU:
        return z if z > 0 else LEAKY_SLOPE * z
    if activation == ELU:
        return z if z > 0 else expm1(z)
    if activation == GELU:
        return 0.5 * z * (1.0 + erf(z * INV_SQRT2))
    if activation == SOFTPLUS:
        return softplus(z)
    return z


cdef inline double derivative(double a, double z, int activation) noexcept nogil:
    """da/dz from the saved output `a` (and, for GELU only, the pre-activation `z`)."""
    if activation == SIGMOID:
        return a * (1.0 - a)
    if activation == TANH:
        return 1.0 - a * a
    if activation == RELU:
        return 1.0 if a > 0 else 0.0
    if activation == LEAKY_RELU:
        return 1.0 if a > 0 else LEAKY_SLOPE
    if activation == ELU:
        return 1.0 if a > 0 else a + 1.0
    if activation == GELU:
        # d/dz z*Phi(z) = Phi(z) + z*phi(z)
        return 0.5 * (1.0 + erf(z * INV_SQRT2)) + z * INV_SQRT_2PI * exp(-0.5 * z * z)
    if activation == SOFTPLUS:
        # sigmoid(z) = 1 - exp(-softplus(z)); above the threshold softplus is the identity.
        return 1.0 if a > SOFTPLUS_THRESHOLD else -expm1(-a)
    return 1.0


cdef inline void activate_tile(floating* c, Py_ssize_t ldc, Py_ssize_t rows, Py_ssize_t cols,
                               int activation) noexcept nogil:
    """Apply an elementwise activation in place to a rows x cols tile (row stride ldc)."""
    cdef Py_ssize_t i, j
    cdef floating* row
    if activation == IDENTITY or activation == SOFTMAX:
        return
    if activation == RELU:  # the common case gets a branch-free loop the compiler vectorises
        for i in range(rows):
            row = c + i * ldc
            for j in range(cols):
                row[j] = 0 if row[j] < 0 else row[j]    # NaN stays NaN, as in torch
        return
    if floating is float:   # vectorised float32 polynomials (_gates.h), not libm's doubles
        if activation == SIGMOID or activation == TANH:
            for i in range(rows):
                if activation == SIGMOID:
                    bp_sigmoid_row_f(c + i * ldc, cols)
                else:
                    bp_tanh_row_f(c + i * ldc, cols)
            return
    for i in range(rows):
        row = c + i * ldc
        for j in range(cols):
            row[j] = <floating>activate(row[j], activation)


cdef inline floating exp_of(floating x) noexcept nogil:
    # expf for float32 rows: about twice as fast as exp, and exact enough for them.
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline void softmax_rows(const floating* z, Py_ssize_t ldz, floating* out, Py_ssize_t ldo,
                              Py_ssize_t rows, Py_ssize_t cols, double* lse) noexcept nogil:
    """Row-wise softmax of z into out (may alias).  The row max is subtracted first so
    exp never overflows; the largest term is then exp(0) = 1, so the sum is >= 1.
    If `lse` is given, it receives each row's log-sum-exp, which the cross-entropy
    reuses instead of computing every exp a second time."""
    cdef Py_ssize_t i, j
    cdef floating m
    cdef double total
    for i in range(rows):
        m = z[i * ldz]
        for j in range(1, cols):
            if z[i * ldz + j] > m:
                m = z[i * ldz + j]
        total = 0.0
        for j in range(cols):
            out[i * ldo + j] = exp_of(z[i * ldz + j] - m)
            total += out[i * ldo + j]
        for j in range(cols):
            out[i * ldo + j] = <floating>(out[i * ldo + j] / total)
        if lse != NULL:
            lse[i] = m + log(total)


cdef inline void activation_forward(const floating* z, Py_ssize_t ldz, floating* a,
                                    Py_ssize_t lda, Py_ssize_t rows, Py_ssize_t cols,
                                    int activation, double* lse) noexcept nogil:
    """a = activation(z), row-wise for softmax (with each row's log-sum-exp in `lse` when
    given); `a` may be `z` itself."""
    cdef Py_ssize_t i
    if activation == SOFTMAX:
        softmax_rows(z, ldz, a, lda, rows, cols, lse)
        return
    if a != z:
        for i in range(rows):
            memcpy(a + i * lda, z + i * ldz, cols * sizeof(floating))
    activate_tile(a, lda, rows, cols, activation)


cdef inline void activation_backward(floating* delta, Py_ssize_t ldd,
                                     const floating* a, Py_ssize_t lda,
                                     const floating* z, Py_ssize_t ldz,
                                     Py_ssize_t rows, Py_ssize_t cols,
                                     int activation) noexcept nogil:
    """delta <- dL/dz given delta = dL/da, in place.  `z` is read only for GELU."""
    cdef Py_ssize_t i, j
    cdef double dot
    cdef floating* d
    cdef const floating* s
    if activation == IDENTITY:
        return
    if activation == SOFTMAX:
        # Jacobian-vector product of softmax: dz = s * (da - <da, s>).
        for i in range(rows):
            d = delta + i * ldd
            s = a + i * lda
            dot = 0.0
            for j in range(cols):
                dot += d[j] * s[j]
            for j in range(cols):
                d[j] = <floating>(s[j] * (d[j] - dot))
        return
    if activation == RELU:
        for i in range(rows):
            d = delta + i * ldd
            s = a + i * lda
            for j in range(cols):
                d[j] = d[j] if s[j] > 0 else 0
        return
    for i in range(rows):
        d = delta + i * ldd
        s = a + i * lda
        for j in range(cols):
            d[j] = <floating>(d[j] * derivative(s[j], z[i * ldz + j] if z != NULL else 0.0,
                                                activation))


cdef inline void activation_forward_threads(const floating* z, Py_ssize_t ldz, floating* a,
                                            Py_ssize_t lda, Py_ssize_t rows, Py_ssize_t cols,
                                            int activation, double* lse,
                                            int n_threads) noexcept nogil:
    """activation_forward with the rows split between threads (each row is independent)."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(rows * cols, n_threads)
    if team == 1:
        activation_forward(z, ldz, a, lda, rows, cols, activation, lse)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(rows, t, team, 1)
        hi = part_start(rows, t + 1, team, 1)
        if lo < hi:
            activation_forward(z + lo * ldz, ldz, a + lo * lda, lda, hi - lo, cols, activation,
                               lse + lo if lse != NULL else NULL)


cdef inline void activation_backward_threads(floating* delta, Py_ssize_t ldd,
                                             const floating* a, Py_ssize_t lda,
                                             const floating* z, Py_ssize_t ldz,
                                             Py_ssize_t rows, Py_ssize_t cols, int activation,
                                             int n_threads) noexcept nogil:
    """activation_backward with the rows split between threads."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(rows * cols, n_threads)
    if activation == IDENTITY:
        return
    if team == 1:
        activation_backward(delta, ldd, a, lda, z, ldz, rows, cols, activation)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(rows, t, team, 1)
        hi = part_start(rows, t + 1, team, 1)
        if lo < hi:
            activation_backward(delta + lo * ldd, ldd, a + lo * lda, lda,
                                z + lo * ldz if z != NULL else NULL, ldz, hi - lo, cols,
                                activation)
