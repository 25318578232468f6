# Recurrent layers, as torch.nn.RNN, LSTM and GRU with batch_first=True, trained by
# backpropagation through time; and LastStep, which keeps a sequence's last step.
#
# A layer is a stack of `layers` recurrences, each run forward in time and, when
# bidirectional, also backward in time; its output at step t is both directions' hidden
# states side by side, (h_fwd, h_rev), the input of the next layer of the stack.  Per
# step, with h' the direction's previous state (zero before its first step) and PyTorch's
# gate order in the rows of W_ih and W_hh:
#
#     RNN:  h = act(W_ih x + b_ih + W_hh h' + b_hh)            (act: tanh or relu)
#     LSTM: i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (W_ih x + b_ih + W_hh h' + b_hh)
#           c = f c' + i g,  h = o tanh(c)
#     GRU:  r, z = sigmoid(W_i{r,z} x + b_i{r,z} + W_h{r,z} h' + b_h{r,z})
#           n = tanh(W_in x + b_in + r (W_hn h' + b_hn)),  h = (1 - z) n + z h'
#
# A batch of sequences is a (batch * time) x width matrix, row (b, t) being sample b's
# step t (the slot's matrix view, _ops.pxd).  Per layer and direction:
#
#   forward   1. the input projection of every step at once, one GEMM:
#                (batch * time) x input . W_ih^T + b_ih
#             2. per step, the recurrent product h' W_hh^T + b_hh through the GEMM (added
#                to the step's projection; the GRU keeps it apart for r * (W_hn h' + b_hn)),
#                then the gates' nonlinearities and the cell update in one pass over the
#                step's rows (the RNN's activation is the GEMM's own epilogue).
#   backward  per step, from the last to the first: one pass turns dL/dh (from above plus
#             what the later step sent back) into dL/d(gate pre-activations), and one GEMM
#             sends dL/dh' = (those) . W_hh to the step before; then for all steps at once,
#             three GEMMs: dW_ih += dG^T X, dW_hh += dG^T H' (H' every step's previous
#             state, copied into place), dX (+)= dG W_ih, which is dL/d(output) of the
#             layer below.  For the GRU dG differs on the two sides in n: dL/d(W_hn h' +
#             b_hn) = r dL/dn.
#
# What the backward reads is kept in the record's saved area (declared by the layer's
# saved(): doubles, of which the floating values here use the first half in float32):
# the output sequence of every layer but the last (the last one's is the result slot),
# and per step and direction the LSTM's gates and cell state and the GRU's r, z, n and
# W_hn h' + b_hn.  Everything else is the scratch the kernel table's hook sized: nothing is
# allocated per step.
#
# Threads: the GEMM splits its output, never its sum; the per-step passes split the
# batch's rows; bias gradients are column sums split by columns, each summed over the
# rows in order; every step and every GEMM runs in a fixed order.  The result is the same
# bit for bit for any thread count.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport tanh
from libc.string cimport memset
from backprop._gemm cimport gemm, gemm_scratch_bytes, epilogue
from backprop._activations cimport IDENTITY, sigmoid, derivative
from backprop._dense cimport add_column_sums
from backprop._parallel cimport part_start, team_for
from backprop._residual cimport pass_gradient

cdef extern from "_gates.h" nogil:
    # float32 rows in vectorised gate arithmetic (see the header); float64 rows below
    void bp_lstm_forward_row_f(float* g, const float* c_prev, float* h, Py_ssize_t H)
    void bp_lstm_backward_row_f(const float* g, const float* c_prev, const float* dy,
                                const float* dh, float* dc, float* d, Py_ssize_t H)
    void bp_gru_forward_row_f(float* g, const float* gh, const float* h_prev, float* h,
                              Py_ssize_t H)
from backprop._ops cimport (Op, Tape, Slot, matrix_stride, input_of, output_of, result_of,
                            param_of, dx_of)

cdef enum Cell:
    CELL_RNN = 1
    CELL_LSTM = 2
    CELL_GRU = 3

cdef enum:
    # Rows of W_ih and W_hh per hidden unit: the gates, in PyTorch's order.
    RNN_GATES = 1           # the new state itself
    LSTM_GATES = 4          # i, f, g, o
    GRU_GATES = 3           # r, z, n
    # Values the backward needs per step, direction and hidden unit besides the output h
    # (see the header): the RNN's derivative comes from h alone.
    RNN_KEPT = 0
    LSTM_KEPT = 5           # i, f, g, o, c
    GRU_KEPT = 4            # r, z, n, W_hn h' + b_hn


cdef struct Shape:
    int cell
    Py_ssize_t time, input          # the input slot's steps and width
    Py_ssize_t hidden, layers, directions
    Py_ssize_t gates                # rows of W_ih and W_hh: gate count x hidden
    Py_ssize_t kept                 # values kept per step and direction
    int nonlinearity                # the RNN's
    bint bias


cdef inline Shape shape_of(const Op* op, const Tape* t) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef Shape s
    s.cell = op.recurrence.cell
    s.time, s.input = x.rows, x.cols
    s.hidden, s.layers = op.recurrence.hidden, op.recurrence.layers
    s.directions = op.recurrence.directions
    # (The layers declare only these three cells; any other would compute nothing.)
    s.gates = s.kept = 0
    if s.cell == CELL_RNN:
        s.gates, s.kept = RNN_GATES * s.hidden, RNN_KEPT * s.hidden
    elif s.cell == CELL_LSTM:
        s.gates, s.kept = LSTM_GATES * s.hidden, LSTM_KEPT * s.hidden
    elif s.cell == CELL_GRU:
        s.gates, s.kept = GRU_GATES * s.hidden, GRU_KEPT * s.hidden
    s.nonlinearity = op.recurrence.nonlinearity
    s.bias = op.param[2] >= 0           # bias_ih_l0 (see the kernels below)
    return s


cdef inline Py_ssize_t layer_input(const Shape* s, Py_ssize_t l) noexcept nogil:
    """The width of layer l's input: the layer's, then both directions' states."""
    return s.input if l == 0 else s.directions * s.hidden


cdef inline Py_ssize_t direction_params(const Shape* s, Py_ssize_t l) noexcept nogil:
    return s.gates * (layer_input(s, l) + s.hidden) + (2 * s.gates if s.bias else 0)


cdef inline Py_ssize_t params_at(const Shape* s, Py_ssize_t l, Py_ssize_t d) noexcept nogil:
    """Where layer l's direction d's arrays start, counted from weight_ih_l0.  Each
    (layer, direction) holds weight_ih (gates x input), weight_hh (gates x hidden) and,
    with bias, bias_ih and bias_hh (gates each), in that order, layer by layer, the reverse
    direction after the forward one: PyTorch's order, which the layer's parameters()
    declares and the planner lays out contiguously."""
    cdef Py_ssize_t at = 0, k
    for k in range(l):
        at += s.directions * direction_params(s, k)
    return at + d * direction_params(s, l)


# ---- the saved area (see the header): capacity rows of each array

cdef inline floating* outputs_of(floating* saved, const Shape* s, Py_ssize_t capacity,
                                 Py_ssize_t l) noexcept nogil:
    """Layer l's output sequence (l < layers - 1), rows of directions x hidden."""
    return saved + l * capacity * s.time * s.directions * s.hidden


cdef inline floating* kept_of(floating* saved, const Shape* s, Py_ssize_t capacity,
                              Py_ssize_t l) noexcept nogil:
    """Layer l's kept values, rows of directions x kept."""
    return (saved + (s.layers - 1) * capacity * s.time * s.directions * s.hidden
            + l * capacity * s.time * s.directions * s.kept)


# ---- scratch

cdef struct Scratch:
    char* gemm            # the products' packing
    char* d_in            # dL/d(gate pre-activations), input side: (batch * time) x gates
    char* d_hid           # the hidden side's: the GRU's own, d_in for the others
    char* dh              # dL/dh' sent to the step before: batch x hidden
    char* dc              # the LSTM's dL/dc' likewise
    char* gh              # the GRU's W_hh h' + b_hh of one step: batch x gates
    char* before          # each step's previous state: (batch * time) x hidden
    char* dy[2]           # dL/d(output) of the layers below the last, in turn


cdef inline Py_ssize_t _aligned(Py_ssize_t nbytes) noexcept nogil:
    return (nbytes + 63) // 64 * 64


cdef inline char* _take(char* base, Py_ssize_t* used, Py_ssize_t nbytes) noexcept nogil:
    cdef Py_ssize_t at = used[0]
    used[0] = at + _aligned(nbytes)
    return base + at if base != NULL else NULL


cdef inline Py_ssize_t _packing_bytes(const Shape* s, Py_ssize_t batch, int nt,
                                      Py_ssize_t itemsize) noexcept nogil:
    """The most packing scratch any of the products below needs."""
    cdef Py_ssize_t rows = batch * s.time, most = 0, l, n_in
    for l in range(min(s.layers, 2)):       # the layers above the first are alike
        n_in = layer_input(s, l)
        most = max(most, gemm_scratch_bytes(rows, s.gates, n_in, nt, itemsize),     # x W_ih^T
                   gemm_scratch_bytes(s.gates, n_in, rows, nt, itemsize),           # dW_ih
                   gemm_scratch_bytes(rows, n_in, s.gates, nt, itemsize))           # dX
    return max(most, gemm_scratch_bytes(batch, s.gates, s.hidden, nt, itemsize),    # h' W_hh^T
               gemm_scratch_bytes(s.gates, s.hidden, rows, nt, itemsize),           # dW_hh
               gemm_scratch_bytes(batch, s.hidden, s.gates, nt, itemsize))          # dh'


cdef inline Py_ssize_t carve(Scratch* part, char* base, const Shape* s, Py_ssize_t batch,
                             int nt, Py_ssize_t itemsize) noexcept nogil:
    """Point `part` into `base` (NULL: only count); returns the bytes it takes."""
    cdef Py_ssize_t used = 0, rows = batch * s.time
    cdef Py_ssize_t sequence = rows * s.directions * s.hidden * itemsize
    part.gemm = _take(base, &used, _packing_bytes(s, batch, nt, itemsize))
    part.d_in = _take(base, &used, rows * s.gates * itemsize)
    part.d_hid = _take(base, &used, rows * s.gates * itemsize) if s.cell == CELL_GRU \
        else part.d_in
    part.dh = _take(base, &used, batch * s.hidden * itemsize)
    part.dc = _take(base, &used, batch * s.hidden * itemsize if s.cell == CELL_LSTM else 0)
    part.gh = _take(base, &used, batch * s.gates * itemsize if s.cell == CELL_GRU else 0)
    part.before = _take(base, &used, rows * s.hidden * itemsize)
    # Layer l reads dL/d(its output) from dy[(layers - 2 - l) % 2] and writes its input's
    # into the other: one buffer for two layers, two for more.
    part.dy[0] = _take(base, &used, sequence if s.layers > 1 else 0)
    part.dy[1] = _take(base, &used, sequence if s.layers > 2 else 0)
    return used


# ---- one time step of one direction, on rows [lo, hi) of the batch

cdef struct Step:
    # Row b of each array is `ld_<name>` elements after row b - 1 (rows are samples).
    void* kept            # the step's kept values (LSTM, GRU): pre-activations in, kept out
    void* prev            # LSTM: the previous step's kept values (its c); GRU: h'; NULL
                          # at the direction's first step, whose previous state is zero
    void* h               # the step's output
    void* gh              # GRU: W_hh h' + b_hh
    void* dy              # backward: dL/dh from the layer's output
    void* d_in            # backward: dL/d(gate pre-activations), input side
    void* d_hid           # and hidden side (the same for RNN and LSTM)
    void* dh              # backward: dL/dh' from the later step in, to the earlier one out
    void* dc              # backward, LSTM: dL/dc' likewise
    Py_ssize_t ld_kept, ld_prev, ld_h, ld_gh, ld_dy, ld_d
    Py_ssize_t hidden
    int nonlinearity


cdef inline void lstm_forward_row(floating* g, const floating* c_prev, floating* h,
                                  Py_ssize_t H) noexcept nogil:
    """g: the pre-activations of i, f, g, o in, the gates and c out."""
    cdef Py_ssize_t j
    cdef double i, f, cand, o, c
    if floating is float:
        bp_lstm_forward_row_f(g, c_prev, h, H)
        return
    for j in range(H):
        i = sigmoid(g[j])
        f = sigmoid(g[H + j])
        cand = tanh(g[2 * H + j])
        o = sigmoid(g[3 * H + j])
        c = i * cand
        if c_prev != NULL:
            c = f * c_prev[j] + c
        g[j] = <floating>i
        g[H + j] = <floating>f
        g[2 * H + j] = <floating>cand
        g[3 * H + j] = <floating>o
        g[4 * H + j] = <floating>c
        h[j] = <floating>(o * tanh(g[4 * H + j]))     # the c kept: the backward's


cdef inline void gru_forward_row(floating* g, const floating* gh, const floating* h_prev,
                                 floating* h, Py_ssize_t H) noexcept nogil:
    """g: W_ih x + b_ih of r, z, n in, r, z, n and W_hn h' + b_hn out."""
    cdef Py_ssize_t j
    cdef double r, z, n, hn
    if floating is float:
        bp_gru_forward_row_f(g, gh, h_prev, h, H)
        return
    for j in range(H):
        r = sigmoid(g[j] + gh[j])
        z = sigmoid(g[H + j] + gh[H + j])
        hn = gh[2 * H + j]
        n = tanh(g[2 * H + j] + r * hn)
        g[j] = <floating>r
        g[H + j] = <floating>z
        g[2 * H + j] = <floating>n
        g[3 * H + j] = <floating>hn
        h[j] = <floating>((1.0 - z) * n + (z * h_prev[j] if h_prev != NULL else 0.0))


cdef inline void rnn_backward_row(const floating* h, const floating* dy, const floating* dh,
                                  floating* d, Py_ssize_t H, int nonlinearity) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(H):
        d[j] = <floating>((dy[j] + dh[j]) * derivative(h[j], 0.0, nonlinearity))


cdef inline void lstm_backward_row(const floating* g, const floating* c_prev,
                                   const floating* dy, const floating* dh, floating* dc,
                                   floating* d, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef double i, f, cand, o, tc, grad_h, grad_c
    if floating is float:
        bp_lstm_backward_row_f(g, c_prev, dy, dh, dc, d, H)
        return
    for j in range(H):
        i, f, cand, o = g[j], g[H + j], g[2 * H + j], g[3 * H + j]
        tc = tanh(g[4 * H + j])
        grad_h = dy[j] + dh[j]
        grad_c = dc[j] + grad_h * o * (1.0 - tc * tc)
        d[j] = <floating>(grad_c * cand * i * (1.0 - i))
        d[H + j] = <floating>(grad_c * c_prev[j] * f * (1.0 - f) if c_prev != NULL else 0.0)
        d[2 * H + j] = <floating>(grad_c * i * (1.0 - cand * cand))
        d[3 * H + j] = <floating>(grad_h * tc * o * (1.0 - o))
        dc[j] = <floating>(grad_c * f)


cdef inline void gru_backward_row(const floating* g, const floating* h_prev,
                                  const floating* dy, floating* dh, floating* d_in,
                                  floating* d_hid, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef double r, z, n, hn, grad_h, grad_n, grad_r, grad_z
    for j in range(H):
        r, z, n, hn = g[j], g[H + j], g[2 * H + j], g[3 * H + j]
        grad_h = dy[j] + dh[j]
        grad_n = grad_h * (1.0 - z) * (1.0 - n * n)
        grad_z = grad_h * ((h_prev[j] if h_prev != NULL else 0.0) - n) * z * (1.0 - z)
        grad_r = grad_n * hn * r * (1.0 - r)
        d_in[j] = d_hid[j] = <floating>grad_r
        d_in[H + j] = d_hid[H + j] = <floating>grad_z
        d_in[2 * H + j] = <floating>grad_n
        d_hid[2 * H + j] = <floating>(grad_n * r)
        dh[j] = <floating>(grad_h * z)      # h = ... + z h': the direct path to h'


cdef inline floating* row_of(floating* kind, void* rows, Py_ssize_t ld,
                             Py_ssize_t b) noexcept nogil:
    """Row b of an array of rows `ld` elements apart, or NULL for no array."""
    return <floating*>rows + b * ld if rows != NULL else NULL


cdef inline void step_rows(floating* kind, bint backward, const Step* st, int cell,
                           Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """The cell's pass over rows [lo, hi) of one step.  (The RNN's forward has none: its
    activation is the recurrent product's epilogue.)"""
    cdef Py_ssize_t b, H = st.hidden
    cdef floating* kept
    cdef floating* prev
    cdef floating* h
    for b in range(lo, hi):
        kept = row_of(kind, st.kept, st.ld_kept, b)
        prev = row_of(kind, st.prev, st.ld_prev, b)
        h = row_of(kind, st.h, st.ld_h, b)
        if cell == CELL_LSTM:
            if backward:
                lstm_backward_row(kept, prev + 4 * H if prev != NULL else NULL,
                                  row_of(kind, st.dy, st.ld_dy, b), row_of(kind, st.dh, H, b),
                                  row_of(kind, st.dc, H, b), row_of(kind, st.d_in, st.ld_d, b),
                                  H)
            else:
                lstm_forward_row(kept, prev + 4 * H if prev != NULL else NULL, h, H)
        elif cell == CELL_GRU:
            if backward:
                gru_backward_row(kept, prev, row_of(kind, st.dy, st.ld_dy, b),
                                 row_of(kind, st.dh, H, b), row_of(kind, st.d_in, st.ld_d, b),
                                 row_of(kind, st.d_hid, st.ld_d, b), H)
            else:
                gru_forward_row(kept, row_of(kind, st.gh, st.ld_gh, b), prev, h, H)
        elif cell == CELL_RNN and backward:
            rnn_backward_row(h, row_of(kind, st.dy, st.ld_dy, b), row_of(kind, st.dh, H, b),
                             row_of(kind, st.d_in, st.ld_d, b), H, st.nonlinearity)


cdef inline void step(floating* kind, bint backward, const Step* st, int cell,
                      Py_ssize_t batch, Py_ssize_t width, int nt) noexcept nogil:
    """step_rows over the whole batch, its rows split between threads (each row is one
    sample's, independent of the others)."""
    cdef Py_ssize_t t, lo, hi
    cdef int team = team_for(batch * width, nt)
    if team == 1:
        step_rows(kind, backward, st, cell, 0, batch)
        return
    for t in prange(team, num_threads=team, schedule="static"):
        lo = part_start(batch, t, team, 1)
        hi = part_start(batch, t + 1, team, 1)
        step_rows(kind, backward, st, cell, lo, hi)


# ---- one layer of the stack, one direction

cdef struct Sequences:
    # One layer's matrices for the passes: row (b, t) of each at (b * time + t) * stride,
    # then the direction's columns.
    void* x               # the layer's input
    void* y               # its output: both directions' h
    void* kept            # its kept values (LSTM, GRU)
    void* dy              # backward: dL/dy
    void* dx              # backward: dL/dx, or NULL when not wanted
    Py_ssize_t ld_x, ld_y, ld_kept, ld_dy, ld_dx
    bint accumulate_dx    # add to dx (another record, or the other direction, wrote it)
    int products          # the network's products (Tape.products)


cdef inline void direction_forward(floating* kind, const Shape* s, const Sequences* q,
                                   Py_ssize_t l, Py_ssize_t d, const floating* w,
                                   Py_ssize_t batch, const Scratch* part,
                                   int nt) noexcept nogil:
    cdef Py_ssize_t H = s.hidden, T = s.time, n_in = layer_input(s, l), k, t, before
    cdef const floating* w_ih = w
    cdef const floating* w_hh = w_ih + s.gates * n_in
    cdef const floating* b_ih = w_hh + s.gates * H if s.bias else NULL
    cdef const floating* b_hh = b_ih + s.gates if s.bias else NULL
    cdef floating* y = <floating*>q.y + d * H
    cdef floating* kept = <floating*>q.kept + d * s.kept if s.cell != CELL_RNN else NULL
    cdef floating* gh = <floating*>part.gh
    cdef floating* pre          # where the step's gate pre-activations add up
    cdef Py_ssize_t ld_pre = T * q.ld_kept if s.cell != CELL_RNN else T * q.ld_y
    cdef Step st
    memset(&st, 0, sizeof(Step))
    # 1. Every step's input projection, into the kept values (the RNN's: its output).
    gemm(batch * T, s.gates, n_in, <const floating*>q.x, q.ld_x, False, w_ih, n_in, True,
         kept if kept != NULL else y, q.ld_kept if kept != NULL else q.ld_y, False, b_ih,
         IDENTITY, q.products, nt, part.gemm)
    st.hidden, st.nonlinearity = H, s.nonlinearity
    st.ld_kept, st.ld_h, st.ld_gh = T * q.ld_kept, T * q.ld_y, s.gates
    st.gh = gh
    # 2. The steps, in this direction's order.
    for k in range(T):
        t = k if d == 0 else T - 1 - k
        before = t - 1 if d == 0 else t + 1
        pre = (kept + t * q.ld_kept) if kept != NULL else (y + t * q.ld_y)
        st.kept, st.h = kept + t * q.ld_kept if kept != NULL else NULL, y + t * q.ld_y
        if s.cell == CELL_GRU:
            # W_hh h' + b_hh apart: r multiplies its n part.
            if k > 0:
                gemm(batch, s.gates, H, y + before * q.ld_y, T * q.ld_y, False, w_hh, H, True,
                     gh, s.gates, False, b_hh, IDENTITY, q.products, nt, part.gemm)
            else:               # h' = 0: b_hh alone
                memset(gh, 0, batch * s.gates * sizeof(floating))
                epilogue(gh, s.gates, batch, s.gates, b_hh, IDENTITY)
        elif k > 0:
            gemm(batch, s.gates, H, y + before * q.ld_y, T * q.ld_y, False, w_hh, H, True,
                 pre, ld_pre, True, b_hh, s.nonlinearity if s.cell == CELL_RNN else IDENTITY,
                 q.products, nt, part.gemm)
        else:
            epilogue(pre, ld_pre, batch, s.gates, b_hh,
                     s.nonlinearity if s.cell == CELL_RNN else IDENTITY)
        if s.cell == CELL_LSTM:
            st.prev = kept + before * q.ld_kept if k > 0 else NULL
            st.ld_prev = T * q.ld_kept
        else:
            st.prev = y + before * q.ld_y if k > 0 else NULL
            st.ld_prev = T * q.ld_y
        if s.cell != CELL_RNN:
            step(kind, False, &st, s.cell, batch, s.gates, nt)


cdef inline void _previous_states(floating* kind, const floating* y, Py_ssize_t ld_y,
                                  floating* out, Py_ssize_t T, Py_ssize_t H, Py_ssize_t d,
                                  Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Rows (b, t) of `out` for samples lo..hi: the state direction d had before step t
    (its output at t - 1 forward, t + 1 backward), zero before its first step."""
    cdef Py_ssize_t b, t, src, j
    for b in range(lo, hi):
        for t in range(T):
            src = t - 1 if d == 0 else t + 1
            if src < 0 or src >= T:
                memset(out + (b * T + t) * H, 0, H * sizeof(floating))
            else:
                for j in range(H):
                    out[(b * T + t) * H + j] = y[(b * T + src) * ld_y + j]


cdef inline void direction_backward(floating* kind, const Shape* s, const Sequences* q,
                                    Py_ssize_t l, Py_ssize_t d, const floating* w,
                                    floating* dw, Py_ssize_t batch, const Scratch* part,
                                    int nt) noexcept nogil:
    cdef Py_ssize_t H = s.hidden, T = s.time, n_in = layer_input(s, l), k, t, before, tt
    cdef Py_ssize_t lo, hi, rows = batch * T
    cdef const floating* w_ih = w
    cdef const floating* w_hh = w_ih + s.gates * n_in
    cdef floating* dw_ih = dw
    cdef floating* dw_hh = dw_ih + s.gates * n_in
    cdef floating* db_ih = dw_hh + s.gates * H
    cdef floating* db_hh = db_ih + s.gates
    cdef const floating* y = <const floating*>q.y + d * H
    cdef floating* kept = <floating*>q.kept + d * s.kept if s.cell != CELL_RNN else NULL
    cdef floating* d_in = <floating*>part.d_in
    cdef floating* d_hid = <floating*>part.d_hid
    cdef floating* previous = <floating*>part.before
    cdef int team
    cdef Step st
    memset(&st, 0, sizeof(Step))
    memset(part.dh, 0, batch * H * sizeof(floating))
    if s.cell == CELL_LSTM:
        memset(part.dc, 0, batch * H * sizeof(floating))
    st.hidden, st.nonlinearity = H, s.nonlinearity
    st.ld_kept, st.ld_h, st.ld_dy, st.ld_d = T * q.ld_kept, T * q.ld_y, T * q.ld_dy, T * s.gates
    st.dh, st.dc = part.dh, part.dc
    # Backward through time: this direction's steps in reverse.
    for k in range(T):
        t = T - 1 - k if d == 0 else k
        before = t - 1 if d == 0 else t + 1
        st.kept = kept + t * q.ld_kept if kept != NULL else NULL
        st.h = <void*>(y + t * q.ld_y)
        st.dy = <floating*>q.dy + d * H + t * q.ld_dy
        st.d_in, st.d_hid = d_in + t * s.gates, d_hid + t * s.gates
        if k == T - 1:
            st.prev = NULL
        elif s.cell == CELL_LSTM:
            st.prev, st.ld_prev = kept + before * q.ld_kept, T * q.ld_kept
        else:
            st.prev, st.ld_prev = <void*>(y + before * q.ld_y), T * q.ld_y
        step(kind, True, &st, s.cell, batch, s.gates, nt)
        if k < T - 1:       # dL/dh' (the GRU's already holds z dL/dh)
            gemm(batch, H, s.gates, d_hid + t * s.gates, T * s.gates, False, w_hh, H, False,
                 <floating*>part.dh, H, s.cell == CELL_GRU, NULL, IDENTITY, q.products, nt, part.gemm)
    # Every step at once.
    gemm(s.gates, n_in, rows, d_in, s.gates, True, <const floating*>q.x, q.ld_x, False, dw_ih,
         n_in, True, NULL, IDENTITY, q.products, nt, part.gemm)
    if s.bias:
        add_column_sums(d_in, s.gates, rows, s.gates, db_ih, nt)
        add_column_sums(d_hid, s.gates, rows, s.gates, db_hh, nt)
    team = team_for(rows * H, nt)
    if team == 1:
        _previous_states(kind, y, q.ld_y, previous, T, H, d, 0, batch)
    else:
        for tt in prange(team, num_threads=team, schedule="static"):
            lo = part_start(batch, tt, team, 1)
            hi = part_start(batch, tt + 1, team, 1)
            _previous_states(kind, y, q.ld_y, previous, T, H, d, lo, hi)
    gemm(s.gates, H, rows, d_hid, s.gates, True, previous, H, False, dw_hh, H, True, NULL,
         IDENTITY, q.products, nt, part.gemm)
    if q.dx != NULL:
        gemm(rows, n_in, s.gates, d_in, s.gates, False, w_ih, n_in, False, <floating*>q.dx,
             q.ld_dx, q.accumulate_dx or d > 0, NULL, IDENTITY, q.products, nt, part.gemm)


# ---- the whole stack

cdef inline void layer_sequences(floating* kind, const Shape* s, const Op* op, const Tape* t,
                                 Py_ssize_t l, Sequences* q) noexcept nogil:
    """Layer l's input, output and kept values (the first's input is the record's, the
    last's output its result)."""
    cdef floating* saved = <floating*>(t.saved + op.saved)
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* r = result_of(op, t)
    cdef Py_ssize_t width = s.directions * s.hidden
    if l == 0:
        q.x, q.ld_x = x.value, matrix_stride(x)
    else:
        q.x, q.ld_x = outputs_of(saved, s, t.capacity, l - 1), width
    if l == s.layers - 1:
        q.y, q.ld_y = r.value, matrix_stride(r)
    else:
        q.y, q.ld_y = outputs_of(saved, s, t.capacity, l), width
    q.kept, q.ld_kept = kept_of(saved, s, t.capacity, l), s.directions * s.kept
    q.products = t.products


# ---- the kind's kernels (see _ops.pxd): parameter 0 = weight_ih_l0, from which every
# array of the stack is found (params_at); parameter 2 = bias_ih_l0, absent without bias

cdef inline void recurrent_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef Shape s = shape_of(op, t)
    cdef Scratch part
    cdef Sequences q
    cdef Py_ssize_t l, d
    carve(&part, <char*>t.scratch, &s, t.batch, nt, sizeof(floating))
    for l in range(s.layers):
        layer_sequences(kind, &s, op, t, l, &q)
        for d in range(s.directions):
            direction_forward(kind, &s, &q, l, d, param_of(kind, t.params, op, 0)
                              + params_at(&s, l, d), t.batch, &part, nt)


cdef inline void recurrent_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                                int nt) noexcept nogil:
    cdef Shape s = shape_of(op, t)
    cdef Scratch part
    cdef Sequences q
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    cdef Py_ssize_t l, d, width = s.directions * s.hidden
    carve(&part, <char*>t.scratch, &s, t.batch, nt, sizeof(floating))
    for l in range(s.layers - 1, -1, -1):
        layer_sequences(kind, &s, op, t, l, &q)
        if l == s.layers - 1:
            q.dy, q.ld_dy = y.grad, matrix_stride(y)
        else:
            q.dy, q.ld_dy = part.dy[(s.layers - 2 - l) % 2], width
        if l > 0:
            q.dx, q.ld_dx, q.accumulate_dx = part.dy[(s.layers - 1 - l) % 2], width, False
        else:
            q.dx, q.ld_dx = dx_of(kind, op, t, want_dx), matrix_stride(x)
            q.accumulate_dx = op.accumulate
        for d in range(s.directions):
            direction_backward(kind, &s, &q, l, d,
                               param_of(kind, t.params, op, 0) + params_at(&s, l, d),
                               param_of(kind, t.grads, op, 0) + params_at(&s, l, d),
                               t.batch, &part, nt)


cdef inline Py_ssize_t recurrent_scratch(const Op* op, const Tape* t, Py_ssize_t batch,
                                         int nt, Py_ssize_t itemsize) noexcept nogil:
    cdef Shape s = shape_of(op, t)
    cdef Scratch part
    return carve(&part, NULL, &s, batch, nt, itemsize)


# ---- LastStep: (time, features) -> (features,), the output at the last time index

cdef inline void last_step_run(floating* kind, const Op* op, Tape* t, int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* r = result_of(op, t)
    pass_gradient(<const floating*>x.value + (x.rows - 1) * x.cols, x.ld, <floating*>r.value,
                  r.ld, False, t.batch, x.cols, nt)      # (a copy of each sample's last row)


cdef inline void last_step_back(floating* kind, const Op* op, Tape* t, bint want_dx,
                                int nt) noexcept nogil:
    cdef const Slot* x = input_of(op, t)
    cdef const Slot* y = output_of(op, t)
    cdef floating* dx = dx_of(kind, op, t, want_dx)
    cdef Py_ssize_t b
    if dx == NULL:
        return
    if not op.accumulate:       # the earlier steps do not reach the output
        for b in range(t.batch):
            memset(dx + b * x.ld, 0, (x.rows - 1) * x.cols * sizeof(floating))
    pass_gradient(<const floating*>y.grad, y.ld, dx + (x.rows - 1) * x.cols, x.ld,
                  op.accumulate, t.batch, x.cols, nt)
