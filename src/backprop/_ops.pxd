# What a compiled network is made of: slots, operation records, and the signatures every
# layer kind's, loss's and optimizer rule's kernels share.  Declarations only (and a few
# accessors): the engine (_core.pyx), compiled once, reads them as the kernels of every
# SIMD level (_kernels.pyx) do.
#
# The planner (plan.py) turns the layers into records; the Engine (_core.pyx) copies them
# into these structs; the passes (_tape.pxd) call each record's kernels through the kernel
# table (_kernels.pyx), one row per layer kind.  A kind is one .pxd file of kernels with the
# signatures below and one Python class declaring everything else (backprop/layers/).
from cython cimport floating
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef struct Slot:
    # One activation of the network for a whole batch: row b of `value` (b < batch) is
    # sample b, `ld` values after row b - 1; `grad` holds dL/dvalue in the same layout
    # (NULL where no gradient is wanted).
    char* value
    char* grad
    Py_ssize_t size          # values per sample
    Py_ssize_t ld            # distance between samples: size, or padded when rows == 1
    # The sample as PyTorch sees it, padded to three dimensions: (features,) is
    # (features, 1, 1), (channels, length) is (channels, 1, length).
    int ndim
    Py_ssize_t c, h, w
    # How the sample is stored: in the logical order (channels first), or, after a
    # convolution or pooling, pixel by pixel with the channels adjacent (channels last).
    bint channels_last
    bint ids                 # int64 ids (an Embedding's input), not floating values
    # A channels-first sample as a matrix: `rows` rows of its last dimension's `cols`
    # values, so a batch is a (batch * rows) x cols matrix with row stride
    # matrix_stride(slot): Dense and LayerNorm work on its rows (PyTorch's "last
    # dimension").  Only then may samples be padded (ld > size): when rows == 1.
    Py_ssize_t rows, cols


cdef inline Py_ssize_t matrix_stride(const Slot* s) noexcept nogil:
    return s.ld if s.rows == 1 else s.cols


# A channels-last sample (or one with a single channel, which has one order) as a matrix:
# a row of `c` channels per position, so a batch is a (batch * positions) x c matrix with
# row stride pixel_stride(slot): convolutions, pooling and BatchNorm work on it.
cdef inline Py_ssize_t positions(const Slot* s) noexcept nogil:
    return s.size // s.c


cdef inline Py_ssize_t pixel_stride(const Slot* s) noexcept nogil:
    return s.ld if s.size == s.c else s.c


cdef struct Window:
    # Convolution and pooling geometry, height then width (a 1-D kind has height 1).
    Py_ssize_t kh, kw        # kernel
    Py_ssize_t sh, sw        # stride
    Py_ssize_t ph, pw        # zero (or, for max pooling, -inf) padding on both sides
    Py_ssize_t dh, dw        # dilation
    Py_ssize_t groups


cdef struct Recurrence:
    # A recurrent layer's stack (RNN, LSTM, GRU; see _recurrent.pxd): its time steps and
    # input width are those of its input slot.
    int cell                 # which recurrence (_recurrent.pxd's Cell)
    Py_ssize_t hidden        # hidden_size
    Py_ssize_t layers        # num_layers
    Py_ssize_t directions    # 2 when bidirectional, else 1
    int nonlinearity         # the RNN's activation (tanh or relu); LSTM and GRU fix theirs


cdef struct Op:
    int kernel               # the row of the kernel table
    int activation           # applied to the kind's result (see _tape.pxd)
    int fused                # the part of it the kind's kernel applies itself
    int input                # the slot read
    int skip                 # a second slot read (a residual block's f(x)), or -1
    int output               # the slot written
    int z                    # where the result before the activation is kept, or -1
    bint accumulate          # add to the input's gradient: another record already wrote it
    Py_ssize_t param[4]      # offsets of the kind's parameters in params/grads, in the
                             # order its kernels take them; -1 for one the layer lacks
    Py_ssize_t buffer        # offset of the first buffer (running statistics), or -1
    Py_ssize_t saved         # offset of the record's saved statistics (doubles), by the Engine
    double eps, momentum, p
    uint64_t key             # Dropout: the seed and layer, mixed
    Py_ssize_t padding_idx   # Embedding: the id whose row gets no gradient, or -1
    bint include_pad         # average pooling: padding counts in the divisor
    Window window
    Recurrence recurrence


cdef struct Tape

# A kind's kernels.  forward: the record's result from its input slot(s), written to the
# slot `z` when the record keeps one, else to its output, with `op.fused` applied.
# backward: from dL/d(result) in the output slot's gradient, the parameter gradients
# (added) and, when `want_dx`, dL/dinput into the input slot's gradient (added to it when
# op.accumulate).  scratch: the bytes of Tape.scratch the kernels need for `batch` rows
# on `n_threads` threads (elements of `itemsize` bytes).
ctypedef void (*forward32_t)(float* kind, const Op* op, Tape* t, int n_threads) noexcept nogil
ctypedef void (*forward64_t)(double* kind, const Op* op, Tape* t, int n_threads) noexcept nogil
ctypedef void (*backward32_t)(float* kind, const Op* op, Tape* t, bint want_dx,
                              int n_threads) noexcept nogil
ctypedef void (*backward64_t)(double* kind, const Op* op, Tape* t, bint want_dx,
                              int n_threads) noexcept nogil
ctypedef Py_ssize_t (*scratch_t)(const Op* op, const Tape* t, Py_ssize_t batch,
                                 int n_threads, Py_ssize_t itemsize) noexcept nogil

cdef struct Kernel:
    const char* name
    forward32_t forward32
    forward64_t forward64
    backward32_t backward32
    backward64_t backward64
    scratch_t scratch


cdef struct Tape:
    int n_ops
    Op* ops
    Slot* slots
    const Kernel* kernels    # the kernel table, indexed by Op.kernel
    char* params
    char* grads
    char* buffers
    double* saved
    Py_ssize_t batch, capacity
    bint training            # the mode of the last forward pass; its backward follows it
    uint64_t passes          # train-mode forward passes so far (Dropout's counter)
    uint64_t row_offset      # the batch's first row in a global batch (Dropout's row numbers)
    void* scratch            # 64-byte aligned, as large as the largest kind's need
    int products             # what the products multiply (Products, below)
    # the loss
    char* target             # float targets, batch x output size (row stride ldt)
    Py_ssize_t ldt
    int64_t* labels          # or integer class labels
    double* weights          # the rows' weights, or NULL (all 1)
    double* lse              # log-sum-exp of each output row, when the output is a softmax
    # the weight matrices (the L2 penalty, per-weight gradient norms): offsets and sizes
    int n_weights
    const Py_ssize_t* weight_offsets
    const Py_ssize_t* weight_sizes


cdef enum Products:
    # What a float product multiplies (Tape.products; the GEMM, _gemm.pxd): float operands (FLOAT32), or float operands rounded
    # to bfloat16 as they are packed, accumulated in float (BFLOAT16, _gemm_bf16.h).
    # Double products are always FLOAT32 (full precision).
    FLOAT32 = 0
    BFLOAT16 = 1


# A loss's kernel: the loss of the last record's output (or, for the cross-entropies, its
# kept logits) against t.target or t.labels, with grad_scale * dL/d(output) (dL/d(logits))
# written to the output slot's gradient.  One row each in the loss table (_kernels.pyx);
# what the Python side needs to know about a loss is declared in backprop/losses.py.
ctypedef double (*loss32_t)(float* kind, const Op* last, Tape* t, bint labels,
                            double grad_scale) noexcept nogil
ctypedef double (*loss64_t)(double* kind, const Op* last, Tape* t, bint labels,
                            double grad_scale) noexcept nogil

cdef struct LossKernel:
    const char* name
    loss32_t value32
    loss64_t value64


# An optimizer rule's settings and its row (_optim.pxd has the rules).
cdef enum:
    # Below this many parameters one thread is faster than waking a second one.
    PARALLEL_MIN_PARAMS = 32768
    # Gradient statistics are summed in blocks of this many values, block sums then in
    # block order: the same sum for any thread count.
    STAT_BLOCK = 4096
    # The parameters, then up to three state buffers: what a pass reports on.
    N_HELD = 4

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


# A rule is two functions, one row in the rule table (_kernels.pyx) and one class in
# optim.py (settings, state names, the rule in words):
#
# * its kernel: one update of parameters lo..hi, from the settings (by value), the
#   parameters, their gradients (times `clip`) and up to three state buffers (the rule's
#   own, in the order its Python class names them; unused ones may be NULL).  `keep` is 0
#   when the gradients are cleared as they are used (train_step), else 1.  It writes to
#   `written` the largest magnitude it wrote to the parameters and to each state buffer,
#   as `widest` patterns (0 for a buffer it did not write).
# * its bound: the largest magnitude any value of its next update can take (the
#   parameters and state it writes, every intermediate, and each setting as the kernel
#   converts it to the dtype: lr = 1e39 is infinite in float32), from `held`, the largest
#   magnitudes the parameters and its state buffers hold, and `grad`, the largest gradient
#   (after clipping); c.step is the count before the update.  +inf when it cannot bound
#   them (eps = 0 lets a quotient grow without limit).  It never counts on cancellation,
#   so it is loose, but a normal step's bound is tens of orders of magnitude below the
#   dtype's largest value.
ctypedef void (*rule32_t)(OptimConfig c, float* p, float* g, float* s0, float* s1, float* s2,
                          float clip, Py_ssize_t lo, Py_ssize_t hi, float keep,
                          uint32_t* written) noexcept nogil
ctypedef void (*rule64_t)(OptimConfig c, double* p, double* g, double* s0, double* s1,
                          double* s2, double clip, Py_ssize_t lo, Py_ssize_t hi,
                          double keep, uint64_t* written) noexcept nogil
ctypedef double (*bound_t)(const OptimConfig* c, const double* held,
                           double grad) noexcept nogil

cdef struct Rule:
    const char* name
    int n_state
    rule32_t update32
    rule64_t update64
    bound_t bound


cdef inline double most(double a, double b) noexcept nogil:
    # max(a, b), NaN if either is NaN: a bound that is NaN must not pass for small.
    return a if (a >= b or a != a) else b


# Dropout's hash (Op.key is the seed and the layer, mixed: the engine's dropout_key).
cdef inline uint64_t mix64(uint64_t z) noexcept nogil:
    # SplitMix64's finaliser: every input bit affects every output bit.
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline Py_ssize_t no_scratch(const Op* op, const Tape* t, Py_ssize_t batch,
                                  int n_threads, Py_ssize_t itemsize) noexcept nogil:
    return 0


cdef inline const Slot* input_of(const Op* op, const Tape* t) noexcept nogil:
    return &t.slots[op.input]


cdef inline const Slot* output_of(const Op* op, const Tape* t) noexcept nogil:
    return &t.slots[op.output]


cdef inline const Slot* result_of(const Op* op, const Tape* t) noexcept nogil:
    """Where the forward kernel writes: the slot keeping the pre-activation, or the output."""
    return &t.slots[op.z] if op.z >= 0 else &t.slots[op.output]


cdef inline floating* param_of(floating* kind, char* base, const Op* op, int k) noexcept nogil:
    """Parameter k of the record in `base` (params, or grads for its gradient), or NULL if
    the layer has none."""
    return (<floating*>base) + op.param[k] if op.param[k] >= 0 else NULL


cdef inline floating* dx_of(floating* kind, const Op* op, const Tape* t, bint want_dx) noexcept nogil:
    """The input slot's gradient if the backward is to write it, else NULL."""
    return <floating*>t.slots[op.input].grad if want_dx else NULL


cdef extern from "_pixels.h" nogil:
    void bp_copy_s(float* dst, const float* src, Py_ssize_t n)
    void bp_copy_d(double* dst, const double* src, Py_ssize_t n)
    void bp_add_s(float* dst, const float* src, Py_ssize_t n)
    void bp_add_d(double* dst, const double* src, Py_ssize_t n)
    void bp_add_scaled_s(float* dst, const float* src, float scale, Py_ssize_t n)
    void bp_add_scaled_d(double* dst, const double* src, double scale, Py_ssize_t n)
    void bp_max_update_s(float* best, Py_ssize_t* where, const float* src, Py_ssize_t q,
                         Py_ssize_t n)
    void bp_max_update_d(double* best, Py_ssize_t* where, const double* src, Py_ssize_t q,
                         Py_ssize_t n)


# Loops over n values side by side (a pixel's channels), vectorised (see _pixels.h).
cdef inline void copy_values(floating* dst, const floating* src, Py_ssize_t n) noexcept nogil:
    if floating is float:
        bp_copy_s(dst, src, n)
    else:
        bp_copy_d(dst, src, n)


cdef inline void add_values(floating* dst, const floating* src, Py_ssize_t n) noexcept nogil:
    if floating is float:
        bp_add_s(dst, src, n)
    else:
        bp_add_d(dst, src, n)


cdef inline void add_scaled(floating* dst, const floating* src, floating scale,
                            Py_ssize_t n) noexcept nogil:
    if floating is float:
        bp_add_scaled_s(dst, src, scale, n)
    else:
        bp_add_scaled_d(dst, src, scale, n)


cdef inline void max_update(floating* best, Py_ssize_t* where, const floating* src,
                            Py_ssize_t q, Py_ssize_t n) noexcept nogil:
    if floating is float:
        bp_max_update_s(best, where, src, q, n)
    else:
        bp_max_update_d(best, where, src, q, n)
