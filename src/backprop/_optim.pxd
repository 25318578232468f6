# Optimizer update rules: one fused pass over the flat parameter buffer.
#
# Every rule is elementwise, so the buffer is cut into one contiguous part per thread and
# the result is the same for any thread count.  The rules are PyTorch's (torch.optim,
# foreach=False, maximize=False), term for term, computed in the parameters' precision as
# torch does; the docstrings of the classes in `optim.py` state them.
#
# The rule's settings arrive by value (a local copy): stores into the parameters can then
# not alias them, every setting is a loop constant, and each loop vectorises.
#
# A step either applies a finite update or changes nothing.  Gradients are checked
# before any update; the update itself may still overflow (SGD with lr = 1e37, Adagrad's
# float32 sum of squares), so each pass reports the largest magnitude it wrote to the
# parameters and to each state buffer (+inf if anything it wrote is not finite), and
# each rule declares, beside its kernel, a bound: the largest magnitude its next update
# can reach, from the largest magnitudes held now, the largest gradient and its
# settings.  The optimizer keeps those maxima (_optimizer.pxi); only when a rule's bound
# comes near the dtype's largest value does it copy the parameters and state before the
# update, to put them back if the pass reports a value that is not finite.  A normal step
# pays a few flops for the bound and an integer max per value written (in place of the
# finiteness flags it had), no pass over memory.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, sqrtf, pow, fabs, INFINITY
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy
from backprop._parallel cimport part_start
from backprop._ops cimport (OptimConfig, Rule, PARALLEL_MIN_PARAMS, STAT_BLOCK, N_HELD,
                            most)

cdef inline floating root(floating x) noexcept nogil:
    # sqrtf for float32: a float32 update needs no double precision (torch computes it in
    # float32 too), and float lanes are twice as many per vector.
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


# The IEEE bit pattern of a float (uint32_t) or a double (uint64_t).
ctypedef fused pattern:
    uint32_t
    uint64_t


cdef inline pattern widest(pattern largest, floating x) noexcept nogil:
    """max(largest, |x|), both as bit patterns with the sign cleared: for finite values
    they are ordered as the magnitudes are, and +-Inf and NaN lie above every finite one,
    so one maximum tells both how large the values are and whether all are finite.  An
    integer max reduction vectorises; a float one does not without -ffast-math (NaN has
    no order)."""
    cdef pattern bits = 0
    memcpy(&bits, &x, sizeof(bits) if sizeof(bits) < sizeof(x) else sizeof(x))
    bits = bits & ((<pattern>-1) >> 1)
    return bits if bits > largest else largest


cdef inline double magnitude(pattern bits) noexcept nogil:
    """The magnitude a `widest` result stands for, +inf for anything not finite."""
    cdef float f
    cdef double d
    if pattern is uint32_t:
        memcpy(&f, &bits, sizeof(f))
        d = f
    else:
        memcpy(&d, &bits, sizeof(d))
    return d if d - d == 0 else INFINITY


cdef inline double largest(const double* values, int n) noexcept nogil:
    cdef double result = 0.0
    cdef int i
    for i in range(n):
        result = most(result, values[i])
    return result


cdef inline void update_range(const Rule* rule, const OptimConfig* c, floating* p, floating* g,
                              floating* s0, floating* s1, floating* s2, floating clip,
                              Py_ssize_t lo, Py_ssize_t hi, bint clear,
                              double* written) noexcept nogil:
    """The rule's kernel on lo..hi; `written` gets the magnitudes it reports (N_HELD)."""
    cdef floating keep = 0 if clear else 1
    cdef uint32_t bits32[N_HELD]
    cdef uint64_t bits64[N_HELD]
    cdef int k
    if floating is float:
        rule.update32(c[0], p, g, s0, s1, s2, clip, lo, hi, keep, bits32)
        for k in range(N_HELD):
            written[k] = magnitude(bits32[k])
    else:
        rule.update64(c[0], p, g, s0, s1, s2, clip, lo, hi, keep, bits64)
        for k in range(N_HELD):
            written[k] = magnitude(bits64[k])


# Each kernel below is a few straight loops, one per combination of its options, so the
# compiler vectorises every one: options are loop constants, and an option that only
# changes a coefficient is folded into it (x * 1 and x + 0 * y are exact for finite
# values).

# ---- SGD

cdef inline void sgd_range(OptimConfig c, floating* p, floating* g, floating* buf,
                           floating* unused1, floating* unused2, floating clip, Py_ssize_t lo,
                           Py_ssize_t hi, floating keep, pattern* written) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, b, pn
    cdef floating lr = <floating>c.lr, wd = <floating>c.weight_decay, mom = <floating>c.momentum
    # PyTorch starts the buffer at the first gradient itself, undamped: b = 0 * buf + 1 * d.
    cdef floating carry = 0 if c.step == 1 else mom
    cdef floating fresh = 1 if c.step == 1 else <floating>(1.0 - c.dampening)
    # nesterov: step = d + mom * b; otherwise step = 0 * d + 1 * b.
    cdef floating with_d = 1 if c.nesterov else 0
    cdef floating with_b = mom if c.nesterov else 1
    cdef pattern wp = 0, wb = 0
    if c.momentum == 0:
        for i in range(lo, hi):
            d = g[i] * clip + wd * p[i]
            pn = p[i] - lr * d
            wp = widest(wp, pn)
            p[i] = pn
            g[i] = g[i] * keep
    else:
        for i in range(lo, hi):
            d = g[i] * clip + wd * p[i]
            b = carry * buf[i] + fresh * d
            pn = p[i] - lr * (with_d * d + with_b * b)
            wp = widest(wp, pn)
            wb = widest(wb, b)
            buf[i] = b
            p[i] = pn
            g[i] = g[i] * keep
    written[0], written[1], written[2], written[3] = wp, wb, 0, 0


cdef inline double sgd_bound(const OptimConfig* c, const double* held,
                             double grad) noexcept nogil:
    cdef bint first = c.step + 1 == 1
    cdef double d = grad + c.weight_decay * held[0]            # g * clip + wd * p
    cdef double fresh = 1.0 if first else fabs(1.0 - c.dampening)
    cdef double b = (0.0 if first else c.momentum * held[1]) + fresh * d
    cdef double step = d if c.momentum == 0 else (d + c.momentum * b if c.nesterov else b)
    cdef double[7] values = [c.lr, c.weight_decay, c.momentum, fresh, d, b,
                             held[0] + c.lr * step]
    return largest(values, 7)


# ---- Adam and AdamW

cdef inline void adam_range(OptimConfig c, floating* p, floating* g, floating* m, floating* v,
                            floating* v_max, floating clip, Py_ssize_t lo, Py_ssize_t hi,
                            floating keep, pattern* written) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, pi, mi, vi, pn
    cdef floating one_minus_beta1 = <floating>(1.0 - c.beta1), beta2 = <floating>c.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - c.beta2), eps = <floating>c.eps
    # Adam adds the decay to the gradient, AdamW shrinks the weights instead.
    cdef floating coupled = 0 if c.decoupled else <floating>c.weight_decay
    cdef floating shrink = <floating>(1.0 - c.lr * c.weight_decay) if c.decoupled else 1
    cdef floating step_size = <floating>(c.lr / (1.0 - pow(c.beta1, <double>c.step)))
    cdef floating bias_correction2_sqrt = <floating>sqrt(1.0 - pow(c.beta2, <double>c.step))
    cdef pattern wp = 0, wm = 0, wv = 0, wmax = 0
    if c.amsgrad:
        for i in range(lo, hi):
            d = g[i] * clip + coupled * p[i]
            pi = p[i] * shrink
            mi = m[i] + one_minus_beta1 * (d - m[i])
            vi = beta2 * v[i] + one_minus_beta2 * d * d
            m[i] = mi
            v[i] = vi
            wm = widest(wm, mi)
            wv = widest(wv, vi)
            vi = v_max[i] if v_max[i] > vi else vi
            v_max[i] = vi
            pn = pi - step_size * mi / (root(vi) / bias_correction2_sqrt + eps)
            wp = widest(wp, pn)
            wmax = widest(wmax, vi)
            p[i] = pn
            g[i] = g[i] * keep
    else:
        for i in range(lo, hi):
            d = g[i] * clip + coupled * p[i]
            pi = p[i] * shrink
            mi = m[i] + one_minus_beta1 * (d - m[i])
            vi = beta2 * v[i] + one_minus_beta2 * d * d
            m[i] = mi
            v[i] = vi
            pn = pi - step_size * mi / (root(vi) / bias_correction2_sqrt + eps)
            wp = widest(wp, pn)
            wm = widest(wm, mi)
            wv = widest(wv, vi)
            p[i] = pn
            g[i] = g[i] * keep
    written[0], written[1], written[2], written[3] = wp, wm, wv, wmax


cdef inline double adam_bound(const OptimConfig* c, const double* held,
                              double grad) noexcept nogil:
    cdef double t = c.step + 1
    cdef double coupled = 0.0 if c.decoupled else c.weight_decay
    cdef double shrink = fabs(1.0 - c.lr * c.weight_decay) if c.decoupled else 1.0
    cdef double step_size = c.lr / (1.0 - pow(c.beta1, t))
    cdef double correction = sqrt(1.0 - pow(c.beta2, t))      # >= sqrt(1 - beta2) > 0
    cdef double d = grad + coupled * held[0]
    cdef double m = held[1] + (1.0 - c.beta1) * (d + held[1])  # m + (1 - beta1)(d - m)
    cdef double v = most(held[2], d * d)                        # a mean of v and d^2
    if c.amsgrad:
        v = most(v, held[3])
    if c.eps == 0:
        return INFINITY          # m / sqrt(v) has no bound of its own once v is 0
    # |m / (sqrt(v) / correction + eps)| <= m / eps
    cdef double[10] values = [c.lr, step_size, shrink, d, d + held[1], m, step_size * m, v,
                              sqrt(v) / correction + c.eps,
                              held[0] * shrink + step_size * m / c.eps]
    return largest(values, 10)


# ---- RMSprop

cdef inline void rmsprop_range(OptimConfig c, floating* p, floating* g, floating* square_avg,
                               floating* grad_avg, floating* buf, floating clip,
                               Py_ssize_t lo, Py_ssize_t hi, floating keep,
                               pattern* written) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, s, a, var, avg, b, pn
    cdef floating lr = <floating>c.lr, wd = <floating>c.weight_decay, eps = <floating>c.eps
    cdef floating alpha = <floating>c.alpha, one_minus_alpha = <floating>(1.0 - c.alpha)
    cdef floating mom = <floating>c.momentum
    # Not centered: a = 0 (grad_avg stays 0); no momentum: b = 0 (the buffer stays 0) and
    # the step is d / avg.
    cdef floating centered = 1 if c.centered else 0
    cdef floating with_b = 1 if c.momentum > 0 else 0
    cdef pattern wp = 0, ws = 0, wa = 0, wb = 0
    for i in range(lo, hi):
        d = g[i] * clip + wd * p[i]
        s = alpha * square_avg[i] + one_minus_alpha * d * d
        a = centered * (grad_avg[i] + one_minus_alpha * (d - grad_avg[i]))
        # s - a^2 is a variance, never negative in exact arithmetic, but rounding takes it
        # below 0 when the gradient hardly varies (a constant one), and torch's sqrt then
        # writes NaN into the weights.  Here it is clamped at 0 (a deviation from torch
        # only where torch gives NaN); `not (var < 0)` leaves a NaN a NaN.
        var = s - a * a
        var = var if not (var < 0) else 0
        avg = root(var) + eps
        b = with_b * (mom * buf[i] + d / avg)
        pn = p[i] - lr * (b + (1 - with_b) * (d / avg))
        wp = widest(wp, pn)
        ws = widest(ws, s)
        wa = widest(wa, a)
        wb = widest(wb, b)
        square_avg[i] = s
        grad_avg[i] = a
        buf[i] = b
        p[i] = pn
        g[i] = g[i] * keep
    written[0], written[1], written[2], written[3] = wp, ws, wa, wb


cdef inline double rmsprop_bound(const OptimConfig* c, const double* held,
                                 double grad) noexcept nogil:
    cdef double d = grad + c.weight_decay * held[0]
    cdef double s = most(held[1], d * d)                        # a mean of s and d^2
    cdef double a = held[2] + (1.0 - c.alpha) * (d + held[2]) if c.centered else 0.0
    if c.eps == 0:
        return INFINITY          # d / sqrt(s - a^2) has no bound once the variance is 0
    cdef double quotient = d / c.eps                            # d / (sqrt(var) + eps)
    cdef double b = c.momentum * held[3] + quotient
    cdef double step = b if c.momentum > 0 else quotient
    cdef double[10] values = [c.lr, c.weight_decay, c.momentum, d, d + held[2], s, a * a + s,
                              sqrt(s + a * a) + c.eps, b, held[0] + c.lr * step]
    return largest(values, 10)


# ---- Adagrad

cdef inline void adagrad_range(OptimConfig c, floating* p, floating* g, floating* sum_sq,
                               floating* unused1, floating* unused2, floating clip,
                               Py_ssize_t lo, Py_ssize_t hi, floating keep,
                               pattern* written) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d, s, pn
    cdef floating wd = <floating>c.weight_decay, eps = <floating>c.eps
    cdef floating clr = <floating>(c.lr / (1.0 + (c.step - 1) * c.lr_decay))
    cdef pattern wp = 0, ws = 0
    for i in range(lo, hi):
        d = g[i] * clip + wd * p[i]
        s = sum_sq[i] + d * d
        sum_sq[i] = s
        pn = p[i] - clr * d / (root(s) + eps)
        wp = widest(wp, pn)
        ws = widest(ws, s)
        p[i] = pn
        g[i] = g[i] * keep
    written[0], written[1], written[2], written[3] = wp, ws, 0, 0


cdef inline double adagrad_bound(const OptimConfig* c, const double* held,
                                 double grad) noexcept nogil:
    cdef double d = grad + c.weight_decay * held[0]
    cdef double s = held[1] + d * d
    cdef double clr = c.lr / (1.0 + c.step * c.lr_decay)
    if c.eps == 0:
        return INFINITY          # 0 / 0 where a gradient and its sum are 0
    # The sum is never negative (it starts at initial_accumulator_value >= 0, and a loaded
    # one is checked), so s >= d^2 and |d| / (sqrt(s) + eps) <= 1: twice clr covers the
    # rounding.
    cdef double[6] values = [c.lr, c.weight_decay, d, s, clr * d, held[0] + 2.0 * clr]
    return largest(values, 6)


# ---- the pass

cdef inline void optimizer_update(const Rule* rule, OptimConfig* c, floating* p, floating* g,
                                  floating* s0, floating* s1, floating* s2, double clip,
                                  Py_ssize_t n, int n_threads, bint clear, double* written,
                                  double* parts) noexcept nogil:
    """One update of all n parameters from gradients times `clip` (1, or the clipping
    factor); s0..s2 are the rule's state buffers (unused ones may be NULL).  `clear` zeroes
    each gradient once it is used (train_step's zero_grad, while it is in cache).
    `written` gets the largest magnitude written to the parameters and to each state
    buffer (N_HELD values, +inf where something written is not finite); `parts` holds
    N_HELD values per thread."""
    cdef Py_ssize_t t, lo, hi
    cdef int k
    cdef floating factor = <floating>clip
    c.step += 1
    if n < PARALLEL_MIN_PARAMS or n_threads <= 1:
        update_range(rule, c, p, g, s0, s1, s2, factor, 0, n, clear, written)
        return
    for t in prange(n_threads, schedule="static", num_threads=n_threads):
        lo = part_start(n, t, n_threads, 16)
        hi = part_start(n, t + 1, n_threads, 16)
        update_range(rule, c, p, g, s0, s1, s2, factor, lo, hi, clear, parts + t * N_HELD)
    for k in range(N_HELD):
        written[k] = 0.0
        for t in range(n_threads):
            written[k] = most(written[k], parts[t * N_HELD + k])


cdef inline double largest_magnitude(const floating* x, Py_ssize_t n,
                                     pattern* kind) noexcept nogil:
    """max |x[i]|, +inf if any x[i] is not finite (`kind`: NULL of x's pattern type)."""
    cdef Py_ssize_t i
    cdef pattern bits = 0
    for i in range(n):
        bits = widest(bits, x[i])
    return magnitude(bits)


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
