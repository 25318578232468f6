# Optimizer update rules: one fused pass over the flat parameter buffer.
#
# Every rule is elementwise, so the buffer is cut into one contiguous part per thread and
# the result is the same for any thread count.  The rules are PyTorch's (torch.optim,
# foreach=False, maximize=False), term for term, computed in the parameters' precision as
# torch does; the docstrings of the classes in `optim.py` state them.
#
# The rule's settings arrive by value (a local copy): stores into the parameters can then
# not alias them, every setting is a loop constant, and each loop vectorises.  Each pass
# also reports whether everything it wrote is finite, and gradients are checked before
# any update (gradient_statistics), so a step either applies a finite update or is
# refused with nothing changed.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, pow, fmax, isfinite
from libc.string cimport memset
from backprop._parallel cimport part_start

cdef enum OptimizerKind:
    SGD = 0
    ADAM = 1
    RMSPROP = 2
    ADAGRAD = 3

cdef enum:
    # Below this many parameters one thread is faster than waking a second one.
    PARALLEL_MIN_PARAMS = 32768
    # Gradient statistics are summed in blocks of this many values, block sums then in
    # block order: the same sum for any thread count.
    STAT_BLOCK = 4096

cdef struct OptimConfig:
    int kind
    long step              # updates done so far; incremented before each update
    double lr
    double weight_decay
    bint decoupled         # AdamW: decay the weights, not the gradient
    double momentum        # SGD, RMSprop
    double dampening       # SGD
    bint nesterov          # SGD
    double beta1, beta2    # Adam
    bint amsgrad           # Adam
    double eps             # Adam, RMSprop, Adagrad
    double alpha           # RMSprop smoothing constant
    bint centered          # RMSprop
    double lr_decay        # Adagrad


cdef inline int sgd_range(OptimConfig c, floating* p, floating* g, floating* buf,
                          floating clip, Py_ssize_t lo, Py_ssize_t hi, bint clear) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, b, pn
    cdef floating lr = <floating>c.lr, wd = <floating>c.weight_decay
    cdef floating mom = <floating>c.momentum, keep = <floating>(1.0 - c.dampening)
    cdef bint first = c.step == 1, nesterov = c.nesterov
    cdef int finite = 1
    if c.momentum == 0:
        for i in range(lo, hi):
            d = g[i] * clip + wd * p[i]
            pn = p[i] - lr * d
            finite &= pn - pn == 0
            p[i] = pn
            if clear:
                g[i] = 0
        return finite
    for i in range(lo, hi):
        d = g[i] * clip + wd * p[i]
        # PyTorch starts the buffer at the first gradient itself, undamped.
        b = d if first else mom * buf[i] + keep * d
        buf[i] = b
        pn = p[i] - lr * (d + mom * b if nesterov else b)
        finite &= (pn - pn == 0) & (b - b == 0)
        p[i] = pn
        if clear:
            g[i] = 0
    return finite


cdef inline int adam_range(OptimConfig c, floating* p, floating* g, floating* m, floating* v,
                           floating* v_max, floating clip, Py_ssize_t lo, Py_ssize_t hi,
                           bint clear) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, pi, mi, vi, den, pn
    cdef floating one_minus_beta1 = <floating>(1.0 - c.beta1), beta2 = <floating>c.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - c.beta2), eps = <floating>c.eps
    cdef floating wd = <floating>c.weight_decay, shrink = <floating>(1.0 - c.lr * c.weight_decay)
    cdef floating step_size = <floating>(c.lr / (1.0 - pow(c.beta1, <double>c.step)))
    cdef floating bias_correction2_sqrt = <floating>sqrt(1.0 - pow(c.beta2, <double>c.step))
    cdef bint decoupled = c.decoupled, amsgrad = c.amsgrad
    cdef int finite = 1
    for i in range(lo, hi):
        d = g[i] * clip
        pi = p[i]
        if decoupled:
            pi = pi * shrink
        else:
            d = d + wd * pi
        mi = m[i] + one_minus_beta1 * (d - m[i])
        vi = beta2 * v[i] + one_minus_beta2 * d * d
        m[i] = mi
        v[i] = vi
        if amsgrad:
            vi = v_max[i] if v_max[i] > vi else vi
            v_max[i] = vi
        den = sqrt(vi) / bias_correction2_sqrt + eps
        pn = pi - step_size * mi / den
        finite &= (pn - pn == 0) & (vi - vi == 0)
        p[i] = pn
        if clear:
            g[i] = 0
    return finite


cdef inline int rmsprop_range(OptimConfig c, floating* p, floating* g, floating* square_avg,
                              floating* grad_avg, floating* buf, floating clip,
                              Py_ssize_t lo, Py_ssize_t hi, bint clear) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, s, a, avg, b, pn
    cdef floating lr = <floating>c.lr, wd = <floating>c.weight_decay, eps = <floating>c.eps
    cdef floating alpha = <floating>c.alpha, one_minus_alpha = <floating>(1.0 - c.alpha)
    cdef floating mom = <floating>c.momentum
    cdef bint centered = c.centered, with_momentum = c.momentum > 0
    cdef int finite = 1
    for i in range(lo, hi):
        d = g[i] * clip + wd * p[i]
        s = alpha * square_avg[i] + one_minus_alpha * d * d
        square_avg[i] = s
        if centered:
            a = grad_avg[i] + one_minus_alpha * (d - grad_avg[i])
            grad_avg[i] = a
            avg = sqrt(s - a * a) + eps
        else:
            avg = sqrt(s) + eps
        if with_momentum:
            b = mom * buf[i] + d / avg
            buf[i] = b
            pn = p[i] - lr * b
        else:
            pn = p[i] - lr * d / avg
        finite &= (pn - pn == 0) & (s - s == 0)
        p[i] = pn
        if clear:
            g[i] = 0
    return finite


cdef inline int adagrad_range(OptimConfig c, floating* p, floating* g, floating* sum_sq,
                              floating clip, Py_ssize_t lo, Py_ssize_t hi,
                              bint clear) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, s, pn
    cdef floating wd = <floating>c.weight_decay, eps = <floating>c.eps
    cdef floating clr = <floating>(c.lr / (1.0 + (c.step - 1) * c.lr_decay))
    cdef int finite = 1
    for i in range(lo, hi):
        d = g[i] * clip + wd * p[i]
        s = sum_sq[i] + d * d
        sum_sq[i] = s
        pn = p[i] - clr * d / (sqrt(s) + eps)
        finite &= (pn - pn == 0) & (s - s == 0)
        p[i] = pn
        if clear:
            g[i] = 0
    return finite


cdef inline int update_range(const OptimConfig* c, floating* p, floating* g,
                             floating* s0, floating* s1, floating* s2, floating clip,
                             Py_ssize_t lo, Py_ssize_t hi, bint clear) noexcept nogil:
    if c.kind == SGD:
        return sgd_range(c[0], p, g, s0, clip, lo, hi, clear)
    if c.kind == ADAM:
        return adam_range(c[0], p, g, s0, s1, s2, clip, lo, hi, clear)
    if c.kind == RMSPROP:
        return rmsprop_range(c[0], p, g, s0, s1, s2, clip, lo, hi, clear)
    return adagrad_range(c[0], p, g, s0, clip, lo, hi, clear)


cdef inline bint optimizer_update(OptimConfig* c, floating* p, floating* g,
                                  floating* s0, floating* s1, floating* s2, double clip,
                                  Py_ssize_t n, int n_threads, bint clear) noexcept nogil:
    """One update of all n parameters from gradients times `clip` (1, or the clipping
    factor); s0..s2 are the rule's state buffers (unused ones may be NULL).  `clear` zeroes
    each gradient once it is used (train_step's zero_grad, while it is in cache).
    Returns whether every value written is finite."""
    cdef Py_ssize_t t, lo, hi
    cdef int bad = 0
    cdef floating factor = <floating>clip
    c.step += 1
    if n < PARALLEL_MIN_PARAMS or n_threads <= 1:
        return update_range(c, p, g, s0, s1, s2, factor, 0, n, clear)
    for t in prange(n_threads, schedule="static", num_threads=n_threads):
        lo = part_start(n, t, n_threads, 16)
        hi = part_start(n, t + 1, n_threads, 16)
        bad += 1 - update_range(c, p, g, s0, s1, s2, factor, lo, hi, clear)
    return bad == 0


cdef inline double _block_sum_of_squares(const floating* g, Py_ssize_t lo,
                                         Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    cdef double total = 0.0
    for i in range(lo, hi):
        total += <double>g[i] * g[i]
    return total


cdef inline double sum_of_squares(const floating* g, Py_ssize_t n, double* block_sums,
                                  int n_threads) noexcept nogil:
    """The sum of g[i]^2 in double, identical for any thread count: blocks of STAT_BLOCK
    values are summed in parallel, then the block sums in order.  `block_sums` has room
    for (n + STAT_BLOCK - 1) // STAT_BLOCK doubles.  It is +inf or NaN if any g[i] is."""
    cdef Py_ssize_t blocks = (n + STAT_BLOCK - 1) // STAT_BLOCK, b
    cdef double total = 0.0
    if n < PARALLEL_MIN_PARAMS or n_threads <= 1:
        for b in range(blocks):
            block_sums[b] = _block_sum_of_squares(g, b * STAT_BLOCK, min(n, (b + 1) * STAT_BLOCK))
    else:
        for b in prange(blocks, schedule="static", num_threads=n_threads):
            block_sums[b] = _block_sum_of_squares(g, b * STAT_BLOCK, min(n, (b + 1) * STAT_BLOCK))
    for b in range(blocks):
        total += block_sums[b]
    return total
