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
# any update, so a step either applies a finite update or is refused.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, sqrtf, pow
from libc.string cimport memset
from backprop._parallel cimport part_start

cdef enum:
    # Below this many parameters one thread is faster than waking a second one.
    PARALLEL_MIN_PARAMS = 32768
    # Gradient statistics are summed in blocks of this many values, block sums then in
    # block order: the same sum for any thread count.
    STAT_BLOCK = 4096

cdef struct OptimConfig:
    int rule               # the row of the rule table
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


cdef inline floating root(floating x) noexcept nogil:
    # sqrtf for float32: a float32 update needs no double precision (torch computes it in
    # float32 too), and float lanes are twice as many per vector.
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


# A rule's kernel: one update of parameters lo..hi, from the settings (by value), the
# parameters, their gradients (times `clip`) and up to three state buffers (the rule's
# own, in the order its Python class names them; unused ones may be NULL).  `keep` is 0
# when the gradients are cleared as they are used (train_step), else 1.  Returns whether
# every value written is finite.  One row each in the rule table (_kernels.pxi); the
# Python class in optim.py declares the rest (settings, state names, the rule in words).
ctypedef int (*rule32_t)(OptimConfig c, float* p, float* g, float* s0, float* s1, float* s2,
                         float clip, Py_ssize_t lo, Py_ssize_t hi, float keep) noexcept nogil
ctypedef int (*rule64_t)(OptimConfig c, double* p, double* g, double* s0, double* s1,
                         double* s2, double clip, Py_ssize_t lo, Py_ssize_t hi,
                         double keep) noexcept nogil

cdef struct Rule:
    const char* name
    int n_state
    rule32_t update32
    rule64_t update64


cdef inline int update_range(const Rule* rule, const OptimConfig* c, floating* p, floating* g,
                             floating* s0, floating* s1, floating* s2, floating clip,
                             Py_ssize_t lo, Py_ssize_t hi, bint clear) noexcept nogil:
    cdef floating keep = 0 if clear else 1
    if floating is float:
        return rule.update32(c[0], p, g, s0, s1, s2, clip, lo, hi, keep)
    else:
        return rule.update64(c[0], p, g, s0, s1, s2, clip, lo, hi, keep)


# Each rule below is a few straight loops, one per combination of its options, so the
# compiler vectorises every one: options are loop constants, and an option that only
# changes a coefficient is folded into it (x * 1 and x + 0 * y are exact for finite
# values).  `finite` collects, without a branch, whether every value written is finite
# (v - v is 0 for finite v, NaN for NaN and +-Inf).  `keep` is 0 when the gradients are
# cleared as they are used (train_step), else 1.

cdef inline int sgd_range(OptimConfig c, floating* p, floating* g, floating* buf,
                          floating* unused1, floating* unused2, floating clip, Py_ssize_t lo, Py_ssize_t hi, floating keep) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, b, pn
    cdef floating lr = <floating>c.lr, wd = <floating>c.weight_decay, mom = <floating>c.momentum
    # PyTorch starts the buffer at the first gradient itself, undamped: b = 0 * buf + 1 * d.
    cdef floating carry = 0 if c.step == 1 else mom
    cdef floating fresh = 1 if c.step == 1 else <floating>(1.0 - c.dampening)
    # nesterov: step = d + mom * b; otherwise step = 0 * d + 1 * b.
    cdef floating with_d = 1 if c.nesterov else 0
    cdef floating with_b = mom if c.nesterov else 1
    cdef int finite = 1
    if c.momentum == 0:
        for i in range(lo, hi):
            d = g[i] * clip + wd * p[i]
            pn = p[i] - lr * d
            finite &= pn - pn == 0
            p[i] = pn
            g[i] = g[i] * keep
        return finite
    for i in range(lo, hi):
        d = g[i] * clip + wd * p[i]
        b = carry * buf[i] + fresh * d
        pn = p[i] - lr * (with_d * d + with_b * b)
        finite &= (pn - pn == 0) & (b - b == 0)
        buf[i] = b
        p[i] = pn
        g[i] = g[i] * keep
    return finite


cdef inline int adam_range(OptimConfig c, floating* p, floating* g, floating* m, floating* v,
                           floating* v_max, floating clip, Py_ssize_t lo, Py_ssize_t hi,
                           floating keep) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, pi, mi, vi, pn
    cdef floating one_minus_beta1 = <floating>(1.0 - c.beta1), beta2 = <floating>c.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - c.beta2), eps = <floating>c.eps
    # Adam adds the decay to the gradient, AdamW shrinks the weights instead.
    cdef floating coupled = 0 if c.decoupled else <floating>c.weight_decay
    cdef floating shrink = <floating>(1.0 - c.lr * c.weight_decay) if c.decoupled else 1
    cdef floating step_size = <floating>(c.lr / (1.0 - pow(c.beta1, <double>c.step)))
    cdef floating bias_correction2_sqrt = <floating>sqrt(1.0 - pow(c.beta2, <double>c.step))
    cdef int finite = 1
    if c.amsgrad:
        for i in range(lo, hi):
            d = g[i] * clip + coupled * p[i]
            pi = p[i] * shrink
            mi = m[i] + one_minus_beta1 * (d - m[i])
            vi = beta2 * v[i] + one_minus_beta2 * d * d
            m[i] = mi
            v[i] = vi
            vi = v_max[i] if v_max[i] > vi else vi
            v_max[i] = vi
            pn = pi - step_size * mi / (root(vi) / bias_correction2_sqrt + eps)
            finite &= (pn - pn == 0) & (vi - vi == 0)
            p[i] = pn
            g[i] = g[i] * keep
        return finite
    for i in range(lo, hi):
        d = g[i] * clip + coupled * p[i]
        pi = p[i] * shrink
        mi = m[i] + one_minus_beta1 * (d - m[i])
        vi = beta2 * v[i] + one_minus_beta2 * d * d
        m[i] = mi
        v[i] = vi
        pn = pi - step_size * mi / (root(vi) / bias_correction2_sqrt + eps)
        finite &= (pn - pn == 0) & (vi - vi == 0)
        p[i] = pn
        g[i] = g[i] * keep
    return finite


cdef inline int rmsprop_range(OptimConfig c, floating* p, floating* g, floating* square_avg,
                              floating* grad_avg, floating* buf, floating clip,
                              Py_ssize_t lo, Py_ssize_t hi, floating keep) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, s, a, avg, b, pn
    cdef floating lr = <floating>c.lr, wd = <floating>c.weight_decay, eps = <floating>c.eps
    cdef floating alpha = <floating>c.alpha, one_minus_alpha = <floating>(1.0 - c.alpha)
    cdef floating mom = <floating>c.momentum
    # Not centered: a = 0 (grad_avg stays 0); no momentum: b = 0 (the buffer stays 0) and
    # the step is d / avg.
    cdef floating centered = 1 if c.centered else 0
    cdef floating with_b = 1 if c.momentum > 0 else 0
    cdef int finite = 1
    for i in range(lo, hi):
        d = g[i] * clip + wd * p[i]
        s = alpha * square_avg[i] + one_minus_alpha * d * d
        a = centered * (grad_avg[i] + one_minus_alpha * (d - grad_avg[i]))
        avg = root(s - a * a) + eps
        b = with_b * (mom * buf[i] + d / avg)
        pn = p[i] - lr * (b + (1 - with_b) * (d / avg))
        finite &= (pn - pn == 0) & (s - s == 0)
        square_avg[i] = s
        grad_avg[i] = a
        buf[i] = b
        p[i] = pn
        g[i] = g[i] * keep
    return finite


cdef inline int adagrad_range(OptimConfig c, floating* p, floating* g, floating* sum_sq,
                              floating* unused1, floating* unused2, floating clip, Py_ssize_t lo, Py_ssize_t hi,
                              floating keep) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, s, pn
    cdef floating wd = <floating>c.weight_decay, eps = <floating>c.eps
    cdef floating clr = <floating>(c.lr / (1.0 + (c.step - 1) * c.lr_decay))
    cdef int finite = 1
    for i in range(lo, hi):
        d = g[i] * clip + wd * p[i]
        s = sum_sq[i] + d * d
        sum_sq[i] = s
        pn = p[i] - clr * d / (root(s) + eps)
        finite &= (pn - pn == 0) & (s - s == 0)
        p[i] = pn
        g[i] = g[i] * keep
    return finite


cdef inline bint optimizer_update(const Rule* rule, OptimConfig* c, floating* p, floating* g,
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
        return update_range(rule, c, p, g, s0, s1, s2, factor, 0, n, clear)
    for t in prange(n_threads, schedule="static", num_threads=n_threads):
        lo = part_start(n, t, n_threads, 16)
        hi = part_start(n, t + 1, n_threads, 16)
        bad += 1 - update_range(rule, c, p, g, s0, s1, s2, factor, lo, hi, clear)
    return bad == 0


cdef inline double _block_sum_of_squares(const floating* g, Py_ssize_t lo,
                                         Py_ssize_t hi) noexcept nogil:
    # Eight running sums (element i goes to sum i % 8), added at the end in a fixed
    # order: one sum would make every addition wait for the last, eight fill a vector.
    cdef Py_ssize_t i, j
    cdef double lanes[8]
    cdef double total = 0.0
    for j in range(8):
        lanes[j] = 0.0
    i = lo
    while i + 8 <= hi:
        for j in range(8):
            lanes[j] += <double>g[i + j] * g[i + j]
        i += 8
    while i < hi:
        lanes[i - lo & 7] += <double>g[i] * g[i]
        i += 1
    for j in range(8):
        total += lanes[j]
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
