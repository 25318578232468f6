# Embedding, as torch.nn.Embedding: each integer id of a sample (batch, length) picks a
# row of the weight table (num_embeddings, embedding_dim), so a sample becomes (length,
# embedding_dim).  The ids were checked to lie in [0, num_embeddings) when the batch was
# copied in, before any kernel runs.
#
# The backward adds each output row's gradient to its id's row of the weight gradient
# (an id that appears twice gets both); padding_idx's row gets none, as in PyTorch.  Ids
# repeat, so threads split the embedding's columns, never the ids: every row of the
# gradient is summed in the ids' order whatever the team.  The ids have no gradient.
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from backprop._parallel cimport part_start, team_for
from backprop._ops cimport Op, Tape, Slot, input_of, output_of, result_of, param_of


cdef inline void _gather_rows(const int64_t* ids, Py_ssize_t ld_ids, Py_ssize_t length,
                              const floating* table, Py_ssize_t dim, floating* out,
                              Py_ssize_t ld_out, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t n, i
    for n in range(lo, hi):
        for i in range(length):
            memcpy(out + n * ld_out + i * dim, table + ids[n * ld_ids + i] * dim,
                   dim * sizeof(floating))


cdef inline void _scatter_columns(const int64_t* ids, Py_ssize_t ld_ids, Py_ssize_t length,
                                  Py_ssize_t batch, const floating* dy, Py_ssize_t ld_dy,
                                  floating* table_grad, Py_ssize_t dim, Py_ssize_t padding_idx,
                                  Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t n, i, j
    cdef int64_t id_
    cdef floating* row
    cdef const floating* g
    for n in range(batch):
        for i in range(length):
            id_ = ids[n * ld_ids + i]
            if id_ == padding_idx:
                continue
            row = table_grad + id_ * dim
            g = dy + n * ld_dy + i * dim
            for j in range(lo, hi):
                row[j] += g[j]


# ---- the kind's kernels (see _ops.pxd): parameter 0 = weight (num_embeddings,
# embedding_dim); op.padding_idx

cdef inline void embedding_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* r = result_of(op, t)
    cdef const int64_t* ids = <const int64_t*>x.value
    cdef const floating* table = param_of(kind, t.params, op, 0)
    cdef Py_ssize_t dim = r.size // x.size, tt, lo, hi
    cdef int team = team_for(t.batch * r.size, nt)
    if team == 1:
        _gather_rows(ids, x.ld, x.size, table, dim, <floating*>r.value, r.ld, 0, t.batch)
        return
    for tt in prange(team, num_threads=team, schedule="static"):
        lo = part_start(t.batch, tt, team, 1)
        hi = part_start(t.batch, tt + 1, team, 1)
        _gather_rows(ids, x.ld, x.size, table, dim, <floating*>r.value, r.ld, lo, hi)


cdef inline void embedding_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                                int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    cdef const int64_t* ids = <const int64_t*>x.value
    cdef floating* table_grad = param_of(kind, t.grads, op, 0)
    cdef Py_ssize_t dim = y.size // x.size, tt, lo, hi
    cdef int team = team_for(t.batch * y.size, nt)
    if team == 1:
        _scatter_columns(ids, x.ld, x.size, t.batch, <const floating*>y.grad, y.ld, table_grad,
                         dim, op.padding_idx, 0, dim)
        return
    for tt in prange(team, num_threads=team, schedule="static"):
        lo = part_start(dim, tt, team, 16)
        hi = part_start(dim, tt + 1, team, 16)
        _scatter_columns(ids, x.ld, x.size, t.batch, <const floating*>y.grad, y.ld, table_grad,
                         dim, op.padding_idx, lo, hi)
