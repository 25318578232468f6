# Optimizer update rules: one fused pass over the flat parameter buffer.
#
# Every rule is elementwise, so the buffer is cut into one contiguous chunk per thread
# and the result is the same for any thread count.  The rules are PyTorch's
# (torch.optim, foreach=False, maximize=False), term for term, so N steps here give the
# weights N steps there give; the docstrings of the classes in `optim.py` state them.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, pow, fmax
from libc.string cimport memset

cdef enum OptimizerKind:
    SGD = 0
    ADAM = 1
    RMSPROP = 2
    ADAGRAD = 3

cdef enum:
    # Below this many parameters one thread is faster than waking a second one.
    PARALLEL_MIN_PARAMS = 32768

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


cdef inline void sgd_range(const OptimConfig* c, floating* p, const floating* g,
                           floating* buf, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    cdef double d
    for i in range(lo, hi):
        d = g[i] + c.weight_decay * p[i]
        if c.momentum != 0:
            # PyTorch starts the buffer at the first gradient itself, undamped.
            if c.step == 1:
                buf[i] = <floating>d
            else:
                buf[i] = <floating>(c.momentum * buf[i] + (1.0 - c.dampening) * d)
            d = d + c.momentum * buf[i] if c.nesterov else buf[i]
        p[i] = <floating>(p[i] - c.lr * d)


cdef inline void adam_range(const OptimConfig* c, floating* p, const floating* g,
                            floating* m, floating* v, floating* v_max,
                            Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    cdef double d, denom
    cdef double step_size = c.lr / (1.0 - pow(c.beta1, <double>c.step))
    cdef double bias_correction2_sqrt = sqrt(1.0 - pow(c.beta2, <double>c.step))
    for i in range(lo, hi):
        d = g[i]
        if c.decoupled:
            p[i] = <floating>(p[i] * (1.0 - c.lr * c.weight_decay))
        else:
            d = d + c.weight_decay * p[i]
        m[i] = <floating>(m[i] + (1.0 - c.beta1) * (d - m[i]))
        v[i] = <floating>(c.beta2 * v[i] + (1.0 - c.beta2) * d * d)
        if c.amsgrad:
            v_max[i] = <floating>fmax(v_max[i], v[i])
            denom = sqrt(v_max[i]) / bias_correction2_sqrt + c.eps
        else:
            denom = sqrt(v[i]) / bias_correction2_sqrt + c.eps
        p[i] = <floating>(p[i] - step_size * m[i] / denom)


cdef inline void rmsprop_range(const OptimConfig* c, floating* p, const floating* g,
                               floating* square_avg, floating* grad_avg, floating* buf,
                               Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    cdef double d, avg
    for i in range(lo, hi):
        d = g[i] + c.weight_decay * p[i]
        square_avg[i] = <floating>(c.alpha * square_avg[i] + (1.0 - c.alpha) * d * d)
        if c.centered:
            grad_avg[i] = <floating>(grad_avg[i] + (1.0 - c.alpha) * (d - grad_avg[i]))
            avg = sqrt(square_avg[i] - grad_avg[i] * grad_avg[i]) + c.eps
        else:
            avg = sqrt(square_avg[i]) + c.eps
        if c.momentum > 0:
            buf[i] = <floating>(c.momentum * buf[i] + d / avg)
            p[i] = <floating>(p[i] - c.lr * buf[i])
        else:
            p[i] = <floating>(p[i] - c.lr * d / avg)


cdef inline void adagrad_range(const OptimConfig* c, floating* p, const floating* g,
                               floating* sum_sq, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    cdef double d
    cdef double clr = c.lr / (1.0 + (c.step - 1) * c.lr_decay)
    for i in range(lo, hi):
        d = g[i] + c.weight_decay * p[i]
        sum_sq[i] = <floating>(sum_sq[i] + d * d)
        p[i] = <floating>(p[i] - clr * d / (sqrt(sum_sq[i]) + c.eps))


cdef inline void update_range(const OptimConfig* c, floating* p, const floating* g,
                              floating* s0, floating* s1, floating* s2,
                              Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if c.kind == SGD:
        sgd_range(c, p, g, s0, lo, hi)
    elif c.kind == ADAM:
        adam_range(c, p, g, s0, s1, s2, lo, hi)
    elif c.kind == RMSPROP:
        rmsprop_range(c, p, g, s0, s1, s2, lo, hi)
    elif c.kind == ADAGRAD:
        adagrad_range(c, p, g, s0, lo, hi)


cdef inline void update_and_clear(const OptimConfig* c, floating* p, floating* g,
                                  floating* s0, floating* s1, floating* s2,
                                  Py_ssize_t lo, Py_ssize_t hi, bint clear_grads) noexcept nogil:
    update_range(c, p, g, s0, s1, s2, lo, hi)
    if clear_grads:  # train_step's zero_grad, done while this chunk is still in cache
        memset(g + lo, 0, (hi - lo) * sizeof(floating))


cdef inline void optimizer_update(OptimConfig* c, floating* p, floating* g,
                                  floating* s0, floating* s1, floating* s2,
                                  Py_ssize_t n, int n_threads, bint clear_grads) noexcept nogil:
    """One update of all n parameters; s0..s2 are the rule's state buffers (or unused)."""
    cdef Py_ssize_t t, chunk
    c.step += 1
    if n < PARALLEL_MIN_PARAMS or n_threads <= 1:
        update_and_clear(c, p, g, s0, s1, s2, 0, n, clear_grads)
        return
    chunk = (n + n_threads - 1) // n_threads
    for t in prange(n_threads, schedule='static', num_threads=n_threads):
        update_and_clear(c, p, g, s0, s1, s2, t * chunk, min(n, (t + 1) * chunk), clear_grads)
