# The tape: a network as an array of operation records, and the passes that run it.
#
# The Python planner (plan.py) turns the list of layers into records: which kernel, which
# activation slots it reads and writes, where its parameters, buffers and saved statistics
# are.  The passes below loop over the records and call each kind's kernels (one family
# per .pxd: _dense, _batchnorm, _layernorm, _dropout, _residual, _activations).  Nothing
# here allocates, checks input or touches a Python object: the Engine in _core.pyx has
# done all of that before it releases the GIL.
#
# Slots hold activations, batch x width with row stride ld, and the gradient of the loss
# with respect to them, same layout.  Slot 0 is the network's input.  Every record reads
# slot `input` and writes slot `output`; its elementwise activation is applied last in
# the forward pass (fused into the kernel where it can be) and undone first in the
# backward pass.  Where the activation's derivative needs its argument (GELU), or the
# loss needs logits, the record keeps that argument in slot `z`.
from cython cimport floating
from libc.stdint cimport int64_t, uint64_t

from backprop._activations cimport (IDENTITY, SOFTMAX, activation_forward_threads,
                                    activation_backward_threads)
from backprop._losses cimport (MSE, BINARY_CROSS_ENTROPY, mse, binary_cross_entropy,
                               cross_entropy_labels, cross_entropy_probs, l2_penalty)
from backprop._dense cimport dense_forward, dense_backward
from backprop._batchnorm cimport batchnorm_forward, batchnorm_backward
from backprop._layernorm cimport layernorm_forward, layernorm_backward
from backprop._dropout cimport dropout_apply, pass_key
from backprop._residual cimport residual_forward, pass_gradient

cdef enum OpKind:
    DENSE = 0
    ACTIVATION = 1      # out = activation(in): z is the input slot itself
    BATCHNORM = 2
    LAYERNORM = 3
    DROPOUT = 4
    RESIDUAL = 5        # out = in + slots[skip]: the end of a residual block


cdef struct Slot:
    char* value
    char* grad          # NULL for the input slot when its gradient is not wanted
    Py_ssize_t width, ld


cdef struct Op:
    int kind
    int activation
    int input           # the slot read (for RESIDUAL: the block's input, the skip path)
    int skip            # RESIDUAL: the slot holding f(x), whose gradient is dL/dout itself
    int output
    int z               # the pre-activation slot, or -1 (the output holds it until activated)
    bint accumulate     # add to input's gradient: another record has already written it
    Py_ssize_t weight   # offset of the weight (Dense) or gamma (norms) in params/grads, or -1
    Py_ssize_t bias     # offset of the bias or beta, or -1
    Py_ssize_t buffer   # BatchNorm: offset of running_mean in buffers (running_var follows)
    Py_ssize_t saved    # offset of this record's statistics in the saved area (doubles)
    double eps, momentum, p
    uint64_t key        # Dropout: the seed and layer, mixed


cdef struct Tape:
    int n_ops
    Op* ops
    Slot* slots
    char* params
    char* grads
    char* buffers
    double* saved
    Py_ssize_t batch, capacity
    bint training       # the mode of the last forward pass; its backward follows it
    uint64_t passes     # train-mode forward passes so far (Dropout's counter)
    uint64_t row_offset # the batch's first row in a global batch (Dropout's row numbers)
    void* gemm_scratch
    # the loss
    char* target        # float targets, batch x n_out (row stride ldt)
    Py_ssize_t ldt
    int64_t* labels     # or integer class labels
    double* weights     # the rows' weights, or NULL (all 1)
    double* lse         # log-sum-exp of each output row, when the output is a softmax


cdef inline const floating* _param(const floating* base, Py_ssize_t offset) noexcept nogil:
    return base + offset if offset >= 0 else NULL


cdef inline void forward_pass(floating* kind, Tape* t, int nt) noexcept nogil:
    """Every record's output from the input slot, in order."""
    cdef const floating* P = <const floating*>t.params
    cdef floating* buffers = <floating*>t.buffers
    cdef Py_ssize_t B = t.batch
    cdef Op* op
    cdef Slot* x
    cdef Slot* y
    cdef Slot* pre
    cdef int o, fused
    for o in range(t.n_ops):
        op = &t.ops[o]
        x, y = &t.slots[op.input], &t.slots[op.output]
        pre = &t.slots[op.z] if op.z >= 0 else y
        # Elementwise activations ride along in the kernels that can apply them in place.
        fused = op.activation if (pre == y and op.activation != SOFTMAX) else IDENTITY
        if op.kind == DENSE:
            dense_forward(<const floating*>x.value, x.ld, <floating*>pre.value, pre.ld,
                          P + op.weight, _param(P, op.bias), B, x.width, y.width, fused,
                          nt, t.gemm_scratch)
        elif op.kind == BATCHNORM:
            batchnorm_forward(<const floating*>x.value, x.ld, <floating*>pre.value, pre.ld, B,
                              y.width, _param(P, op.weight), _param(P, op.bias),
                              buffers + op.buffer, buffers + op.buffer + y.width,
                              t.saved + op.saved, op.eps, op.momentum, t.training, fused, nt)
        elif op.kind == LAYERNORM:
            layernorm_forward(<const floating*>x.value, x.ld, <floating*>pre.value, pre.ld, B,
                              y.width, _param(P, op.weight), _param(P, op.bias), op.eps,
                              t.saved + op.saved, t.capacity, fused, nt)
        else:
            fused = IDENTITY
            if op.kind == DROPOUT:
                if t.training and op.p > 0:
                    dropout_apply(<const floating*>x.value, x.ld, <floating*>pre.value, pre.ld,
                                  False, B, y.width, pass_key(op.key, t.passes),
                                  t.row_offset, op.p, nt)
                else:
                    pass_gradient(<const floating*>x.value, x.ld, <floating*>pre.value, pre.ld,
                                  False, B, y.width, nt)
            elif op.kind == RESIDUAL:
                residual_forward(<const floating*>x.value, x.ld,
                                 <const floating*>t.slots[op.skip].value, t.slots[op.skip].ld,
                                 <floating*>pre.value, pre.ld, B, y.width, nt)
        if fused == IDENTITY and op.activation != IDENTITY:
            activation_forward_threads(<const floating*>pre.value, pre.ld, <floating*>y.value,
                                       y.ld, B, y.width, op.activation,
                                       t.lse if o == t.n_ops - 1 else NULL, nt)


cdef inline double loss_delta(floating* kind, Tape* t, int loss, bint labels,
                              double scale) noexcept nogil:
    """The loss of the last forward against t.target / t.labels (the mean over the batch);
    leaves scale * dL/d(output) in the output slot's gradient, or, for the two
    cross-entropies, scale * dL/d(logits): their backward then starts past the activation."""
    cdef Op* op = &t.ops[t.n_ops - 1]
    cdef Slot* y = &t.slots[op.output]
    cdef Slot* pre = &t.slots[op.z] if op.z >= 0 else y
    cdef const floating* target = <const floating*>t.target
    if loss == MSE:
        return mse(<const floating*>y.value, y.ld, target, t.ldt, t.weights, t.batch, y.width,
                   <floating*>y.grad, y.ld, scale)
    if loss == BINARY_CROSS_ENTROPY:
        return binary_cross_entropy(<const floating*>pre.value, pre.ld, target, t.ldt,
                                    t.weights, t.batch, y.width, <floating*>y.grad, y.ld, scale)
    if labels:
        return cross_entropy_labels(<const floating*>pre.value, pre.ld, t.lse,
                                    <const floating*>y.value, y.ld, t.labels, t.weights,
                                    t.batch, y.width, <floating*>y.grad, y.ld, scale)
    return cross_entropy_probs(<const floating*>pre.value, pre.ld, t.lse,
                               <const floating*>y.value, y.ld, target, t.ldt, t.weights,
                               t.batch, y.width, <floating*>y.grad, y.ld, scale)


cdef inline double weight_penalty(floating* kind, Tape* t, double l2, double scale,
                                  double* block_sums, int nt) noexcept nogil:
    """The L2 penalty l2/2 * sum(W^2) over every Dense weight matrix (not biases, not the
    normalisations' scale and shift: what scikit-learn's alpha and Keras's kernel
    regularizers penalise), returned, with scale * l2 * W added to the weight gradients."""
    cdef double total = 0.0
    cdef Op* op
    cdef int o
    for o in range(t.n_ops):
        op = &t.ops[o]
        if op.kind == DENSE:
            total += l2_penalty(<const floating*>t.params + op.weight,
                                <floating*>t.grads + op.weight,
                                t.slots[op.input].width * t.slots[op.output].width,
                                l2, scale, block_sums, nt)
    return total


cdef inline void backward_pass(floating* kind, Tape* t, int nt, bint input_grad,
                               bint from_logits) noexcept nogil:
    """Every record's parameter gradients (accumulated) and its input's gradient, from the
    output slot's gradient back to the input; `from_logits`: that gradient is already with
    respect to the last record's pre-activation (the cross-entropies)."""
    cdef const floating* P = <const floating*>t.params
    cdef floating* G = <floating*>t.grads
    cdef Py_ssize_t B = t.batch
    cdef Op* op
    cdef Slot* x
    cdef Slot* y
    cdef Slot* pre
    cdef floating* d
    cdef floating* dx
    cdef int o
    for o in range(t.n_ops - 1, -1, -1):
        op = &t.ops[o]
        x, y = &t.slots[op.input], &t.slots[op.output]
        pre = &t.slots[op.z] if op.z >= 0 else y
        d = <floating*>y.grad
        if not (from_logits and o == t.n_ops - 1):
            activation_backward_threads(d, y.ld, <const floating*>y.value, y.ld,
                                        <const floating*>pre.value if pre != y else NULL,
                                        pre.ld, B, y.width, op.activation, nt)
        dx = <floating*>x.grad if (op.input != 0 or input_grad) else NULL
        if op.kind == DENSE:
            dense_backward(d, y.ld, <const floating*>x.value, x.ld, P + op.weight,
                           G + op.weight, <floating*>_param(G, op.bias), dx, x.ld,
                           op.accumulate, B, x.width, y.width, nt, t.gemm_scratch)
        elif op.kind == BATCHNORM:
            batchnorm_backward(d, y.ld, <const floating*>x.value, x.ld, B, y.width,
                               _param(P, op.weight), <floating*>_param(G, op.weight),
                               <floating*>_param(G, op.bias), dx, x.ld, op.accumulate,
                               t.saved + op.saved, t.training, nt)
        elif op.kind == LAYERNORM:
            layernorm_backward(d, y.ld, <const floating*>x.value, x.ld, B, y.width,
                               _param(P, op.weight), <floating*>_param(G, op.weight),
                               <floating*>_param(G, op.bias), dx, x.ld, op.accumulate,
                               t.saved + op.saved, t.capacity, nt)
        elif dx != NULL:
            if op.kind == DROPOUT and t.training and op.p > 0:
                dropout_apply(d, y.ld, dx, x.ld, op.accumulate, B, y.width,
                              pass_key(op.key, t.passes), t.row_offset, op.p, nt)
            else:   # the identity's gradient: Activation (already undone), Dropout in eval
                    # mode, and the skip path of a residual block
                pass_gradient(d, y.ld, dx, x.ld, op.accumulate, B, y.width, nt)
