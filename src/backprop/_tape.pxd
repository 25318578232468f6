# The tape's passes: a network as an array of operation records (_ops.pxd), run in order
# forward and in reverse backward, each record through its kind's kernels in the kernel
# table.  Nothing here knows a layer kind, a loss or an optimizer rule by name, allocates,
# checks input or touches a Python object: the Engine in _core.pyx has done all of that
# before it releases the GIL, and the planner (plan.py) has refused any kind the table
# does not hold.
#
# Every record computes its kind's function into its result slot (the slot `z` when it
# keeps the pre-activation for the backward: GELU's derivative needs it, and the
# cross-entropies take the logits; otherwise its output), applying the part `fused` of its
# activation in the same pass where the kernel can.  The rest of the activation is applied
# here, from the result slot to the output; on the way back it is undone first.
from cython cimport floating

from backprop._activations cimport (IDENTITY, activation_forward_threads,
                                    activation_backward_threads)
from backprop._losses cimport LossKernel, l2_penalty
from backprop._ops cimport Op, Slot, Tape, Kernel


cdef inline void forward_pass(floating* kind, Tape* t, int nt) noexcept nogil:
    """Every record's output from the input slot, in order."""
    cdef const Op* op
    cdef const Kernel* k
    cdef Slot* y
    cdef Slot* r
    cdef int o
    for o in range(t.n_ops):
        op = &t.ops[o]
        k = &t.kernels[op.kernel]
        if floating is float:
            k.forward32(kind, op, t, nt)
        else:
            k.forward64(kind, op, t, nt)
        y = &t.slots[op.output]
        r = &t.slots[op.z] if op.z >= 0 else y
        if r != y or op.fused != op.activation:
            activation_forward_threads(<const floating*>r.value, r.ld, <floating*>y.value,
                                       y.ld, t.batch, y.size, op.activation,
                                       t.lse if o == t.n_ops - 1 else NULL, nt)


cdef inline double loss_delta(floating* kind, Tape* t, const LossKernel* loss, bint labels,
                              double scale) noexcept nogil:
    """The loss of the last forward against t.target / t.labels (the mean over the batch),
    with scale * its gradient left in the output slot's gradient (see _losses.pxd)."""
    if floating is float:
        return loss.value32(kind, &t.ops[t.n_ops - 1], t, labels, scale)
    else:
        return loss.value64(kind, &t.ops[t.n_ops - 1], t, labels, scale)


cdef inline double weight_penalty(floating* kind, Tape* t, double l2, double scale,
                                  double* block_sums, int nt) noexcept nogil:
    """The L2 penalty l2/2 * sum(W^2) over every weight the layers declare (Dense and
    convolution kernels, embeddings: not biases, not the normalisations' scale and shift:
    what scikit-learn's alpha and Keras's kernel regularizers penalise), returned, with
    scale * l2 * W added to those weights' gradients."""
    cdef double total = 0.0
    cdef int i
    for i in range(t.n_weights):
        total += l2_penalty(<const floating*>t.params + t.weight_offsets[i],
                            <floating*>t.grads + t.weight_offsets[i], t.weight_sizes[i],
                            l2, scale, block_sums, nt)
    return total


cdef inline void backward_pass(floating* kind, Tape* t, int nt, bint input_grad,
                               bint from_logits) noexcept nogil:
    """Every record's parameter gradients (accumulated) and its input's gradient, from the
    output slot's gradient back to the input; `from_logits`: that gradient is already with
    respect to the last record's pre-activation (the cross-entropies)."""
    cdef const Op* op
    cdef const Kernel* k
    cdef Slot* y
    cdef Slot* r
    cdef bint want_dx
    cdef int o
    for o in range(t.n_ops - 1, -1, -1):
        op = &t.ops[o]
        k = &t.kernels[op.kernel]
        y = &t.slots[op.output]
        r = &t.slots[op.z] if op.z >= 0 else y
        if not (from_logits and o == t.n_ops - 1):
            activation_backward_threads(<floating*>y.grad, y.ld, <const floating*>y.value,
                                        y.ld, <const floating*>r.value if r != y else NULL,
                                        r.ld, t.batch, y.size, op.activation, nt)
        want_dx = t.slots[op.input].grad != NULL and (op.input != 0 or input_grad)
        if floating is float:
            k.backward32(kind, op, t, want_dx, nt)
        else:
            k.backward64(kind, op, t, want_dx, nt)
