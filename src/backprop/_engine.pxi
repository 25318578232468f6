# --------------------------------------------------------------------------- the engine

cdef enum PassPart:
    FORWARD = 1
    LOSS = 2
    BACKWARD = 4

# The most bytes one workspace may claim (sizes are summed in Python integers, so they
# never wrap; an allocator may still refuse less).
MAX_WORKSPACE_BYTES = 1 << 62


cdef double run_pass(floating* kind, Tape* t, int parts, int n_threads,
                     const LossKernel* loss, bint labels, double scale, bint input_grad,
                     bint from_logits, double l2, double* block_sums) noexcept nogil:
    """forward, loss, backward, as asked; the backward is skipped when the loss is not
    finite (a refused step must leave the gradients as they were).  l2 > 0 adds the
    weights' L2 penalty to the loss and its gradient to theirs."""
    cdef double value = 0.0
    if parts & FORWARD:
        forward_pass(LEVEL, kind, t, n_threads)
    if parts & LOSS:
        value = loss_delta(LEVEL, kind, t, loss, labels, scale)
        if not isfinite(value):
            return value
    if parts & BACKWARD:
        backward_pass(LEVEL, kind, t, n_threads, input_grad, from_logits)
        if l2 > 0 and parts & LOSS:
            value += weight_penalty(LEVEL, kind, t, l2, scale, block_sums, n_threads)
    return value


cdef Py_ssize_t _padded(Py_ssize_t n, Py_ssize_t itemsize):
    # Rows whose stride is a multiple of 256 bytes put the rows of a GEMM tile into the
    # same L1 sets; one extra cache line per row avoids it (see GEMM-NOTES.md).
    if n >= 64 and (n * itemsize) % 256 == 0:
        return n + 64 // itemsize
    return n


cdef class Workspace:
    """Everything an Engine needs per batch row, in one 64-byte-aligned allocation sized
    for `capacity` rows: two input buffers (a batch is staged into the spare one and only
    becomes the input once it has been validated), each slot's values and gradient, the
    saved statistics, the targets, the row weights and the log-sum-exp of each output row."""
    cdef char* base
    cdef Py_ssize_t capacity
    cdef char* inputs[2]
    cdef char** values
    cdef char** grads
    cdef double* saved
    cdef char* target
    cdef int64_t* labels
    cdef double* weights       # the rows' weights (sample_weight)
    cdef double* lse
    cdef char* backup          # the buffers before a train-mode forward, to undo a refused step

    def __dealloc__(self):
        free(self.base)
        free(self.values)
        free(self.grads)


cdef class Engine:
    """The compiled side of a Network: its tape, workspace and scratch.

    Built by `Network` from the planner's Plan (plan.py); the Network owns the flat
    `params`, `grads` and `buffers` arrays, the Engine holds pointers into them, so they
    must stay alive and never be reallocated.  The workspace is allocated by the first
    batch (and grown by a larger one), so building a network costs only its parameters.
    Every public method runs with the one-pass guard held (a second thread gets a
    RuntimeError; it waits while another thread holds the network to copy it, held()) and
    returns copies, never views of the workspace, which the next pass overwrites.
    """
    cdef Tape tape
    cdef int n_slots
    cdef int* grad_owner           # the slot whose gradient buffer slot s uses, or -1
    cdef Py_ssize_t* saved_fixed   # per record: doubles of saved statistics, and more
    cdef Py_ssize_t* saved_per_row #   per sample
    cdef Py_ssize_t* weight_offsets
    cdef Py_ssize_t* weight_sizes
    cdef Workspace ws              # None until the first batch
    cdef int active_input          # which of ws.inputs holds the current batch
    cdef void* scratch             # the kinds' scratch (GEMM packing, ...)
    cdef Py_ssize_t scratch_bytes
    cdef Py_ssize_t scratch_rows   # the batch size and team the scratch was last sized
    cdef int scratch_team          #   for (every pass asks; the sizing walks every op)
    cdef double* block_sums        # for the gradient statistics (sum_of_squares)
    cdef double* weight_norms      # each weight's gradient norm (train_step)
    cdef readonly object dtype
    cdef bint is64
    cdef object loss               # the loss's declaration (backprop.losses), or None
    cdef const LossKernel* loss_kernel
    cdef bint from_logits          # the loss gives dL/d(logits): the cross-entropies
    cdef readonly tuple input_shape, output_shape   # one sample, as PyTorch has it
    cdef Py_ssize_t id_limit       # ids lie in [0, id_limit) when the input is ids
    cdef int min_train_batch       # BatchNorm: a train-mode batch needs this many samples
    cdef Py_ssize_t n_buffers
    cdef cnp.ndarray params, grads, buffers
    cdef cnp.ndarray grads_backup      # made the first time train_step meets pending gradients
    cdef readonly bint has_forward, has_grads, has_input_grad
    # The last forward's activations were dropped because an update changed the weights
    # they were computed with: said in the error of a backward that needs them.
    cdef bint forward_predates_update
    cdef bint _training
    cdef bint busy
    cdef dict holders              # thread -> how many `held()` blocks it is in

    def __cinit__(self):
        self.holders = {}
        self.tape.ops = NULL
        self.tape.slots = NULL
        self.grad_owner = NULL
        self.saved_fixed = self.saved_per_row = NULL
        self.weight_offsets = self.weight_sizes = NULL
        self.scratch = NULL
        self.scratch_rows = -1
        self.block_sums = NULL
        self.weight_norms = NULL

    def __init__(self, plan, loss, cnp.ndarray params, cnp.ndarray grads,
                 cnp.ndarray buffers):
        """plan: the planner's Plan (records, slots, weights, shapes); loss: the loss's
        declaration (backprop.losses.Loss) or None; params, grads, buffers: flat
        contiguous arrays of one dtype."""
        cdef int i
        cdef Slot* s
        for name, a in (("params", params), ("grads", grads), ("buffers", buffers)):
            if a.dtype != params.dtype or a.dtype not in (np.float32, np.float64) \
                    or a.ndim != 1 or not a.flags.c_contiguous or not a.flags.writeable:
                raise ValueError(f"{name} must be a writeable contiguous flat float buffer "
                                 "of the parameters' dtype")
        records, slots, weights = plan.records, plan.slots, plan.weights
        if grads.shape[0] != params.shape[0] or not records or not slots:
            raise ValueError("grads must match params, and a network needs records and slots")
        self.params, self.grads, self.buffers, self.dtype = params, grads, buffers, params.dtype
        self.is64 = params.dtype == np.float64
        self.loss = loss
        self.loss_kernel = &LEVEL.losses[LOSS_KERNELS[loss.kernel]] if loss is not None else NULL
        self.from_logits = loss is not None and loss.from_logits
        self.input_shape, self.output_shape = plan.input_shape, plan.output_shape
        self.id_limit = plan.id_limit
        self.min_train_batch = plan.min_train_batch
        self.n_buffers = buffers.shape[0]
        self.n_slots = len(slots)
        self.tape.n_ops = len(records)
        self.tape.kernels = LEVEL.kernels
        self.tape.ops = <Op*>bp_aligned_alloc(len(records) * sizeof(Op))
        self.tape.slots = <Slot*>bp_aligned_alloc(len(slots) * sizeof(Slot))
        self.grad_owner = <int*>bp_aligned_alloc(len(slots) * sizeof(int))
        self.saved_fixed = <Py_ssize_t*>bp_aligned_alloc(len(records) * sizeof(Py_ssize_t))
        self.saved_per_row = <Py_ssize_t*>bp_aligned_alloc(len(records) * sizeof(Py_ssize_t))
        self.weight_offsets = <Py_ssize_t*>bp_aligned_alloc(len(weights) * sizeof(Py_ssize_t))
        self.weight_sizes = <Py_ssize_t*>bp_aligned_alloc(len(weights) * sizeof(Py_ssize_t))
        self.weight_norms = <double*>bp_aligned_alloc(len(weights) * sizeof(double))
        blocks = (params.shape[0] + STAT_BLOCK - 1) // STAT_BLOCK
        self.block_sums = <double*>bp_aligned_alloc(max(1, blocks) * sizeof(double))
        if (self.tape.ops == NULL or self.tape.slots == NULL or self.grad_owner == NULL
                or self.saved_fixed == NULL or self.saved_per_row == NULL
                or self.weight_offsets == NULL or self.weight_sizes == NULL
                or self.block_sums == NULL or self.weight_norms == NULL):
            raise MemoryError("cannot allocate the network's tape")
        for i, slot in enumerate(slots):
            g, s = slot["geometry"], &self.tape.slots[i]
            s.value = s.grad = NULL
            s.size, s.ndim, s.c, s.h, s.w = g["size"], g["ndim"], g["c"], g["h"], g["w"]
            s.channels_last, s.ids, s.rows, s.cols = g["channels_last"], g["ids"], g["rows"], g["cols"]
            # Padded rows only where a sample is one row of the matrix view (see _ops.pxd).
            s.ld = _padded(g["size"], self.dtype.itemsize) if g["rows"] == 1 else g["size"]
            self.grad_owner[i] = slot["grad_owner"]
        for i, record in enumerate(records):
            self.tape.ops[i] = {**record["op"], "kernel": KERNELS[record["kernel"]], "saved": 0}
            self.saved_fixed[i], self.saved_per_row[i] = record["saved"]
        for i, (offset, size) in enumerate(weights):
            self.weight_offsets[i], self.weight_sizes[i] = offset, size
            self.weight_norms[i] = 0.0
        self.tape.ldt = self.tape.slots[self.tape.ops[self.tape.n_ops - 1].output].size
        self.tape.n_weights = len(weights)
        self.tape.weight_offsets = self.weight_offsets
        self.tape.weight_sizes = self.weight_sizes
        self.tape.params = <char*>cnp.PyArray_DATA(params)
        self.tape.grads = <char*>cnp.PyArray_DATA(grads)
        self.tape.buffers = <char*>cnp.PyArray_DATA(buffers)
        self.tape.passes = 0
        self.tape.row_offset = 0
        self.tape.batch = 0
        self.tape.training = self._training = True
        self.tape.products = FLOAT32
        self.ws = None

    def __dealloc__(self):
        free(self.tape.ops)
        free(self.tape.slots)
        free(self.grad_owner)
        free(self.saved_fixed)
        free(self.saved_per_row)
        free(self.weight_offsets)
        free(self.weight_sizes)
        free(self.scratch)
        free(self.block_sums)
        free(self.weight_norms)

    # ---- the workspace

    cdef Workspace _allocate(self, Py_ssize_t capacity):
        """A new workspace for `capacity` rows, or MemoryError (nothing else changes)."""
        cdef Workspace ws = Workspace()
        cdef Py_ssize_t i
        cdef Slot* s
        cdef object rows = capacity, item = self.dtype.itemsize    # Python integers
        cdef object input_item = 8 if self.tape.slots[0].ids else item
        # Region sizes in bytes, laid out one after another on cache-line boundaries.
        sizes = [rows * self.tape.slots[0].ld * input_item] * 2                     # inputs
        sizes += [rows * self.tape.slots[i].ld * item if i else 0
                  for i in range(self.n_slots)]                                     # values
        sizes += [rows * self.tape.slots[i].ld * item if self.grad_owner[i] == i else 0
                  for i in range(self.n_slots)]                                     # grads
        s = &self.tape.slots[self.tape.ops[self.tape.n_ops - 1].output]
        sizes += [8 * sum(self.saved_fixed[i] + rows * self.saved_per_row[i]
                          for i in range(self.tape.n_ops)),                         # saved
                  rows * s.size * item, rows * 8, rows * 8,         # targets, labels, weights
                  rows * 8,                                         # log-sum-exp
                  self.n_buffers * item]                                            # backup
        starts, total = [], 0
        for size in sizes:
            starts.append(total)
            total += (size + 63) // 64 * 64
        if total > MAX_WORKSPACE_BYTES:
            raise MemoryError(f"a batch of {capacity:,} rows needs a workspace of "
                              f"{total / 2**30:,.0f} GiB; use smaller batches")
        inputs = starts[:2]
        values = starts[2:2 + self.n_slots]
        grads = starts[2 + self.n_slots:2 + 2 * self.n_slots]
        saved, target, labels, weights, lse, backup = tuple(starts[2 + 2 * self.n_slots:])
        ws.values = <char**>bp_aligned_alloc(self.n_slots * sizeof(char*))
        ws.grads = <char**>bp_aligned_alloc(self.n_slots * sizeof(char*))
        ws.base = <char*>bp_aligned_alloc(total)
        if ws.base == NULL or ws.values == NULL or ws.grads == NULL:
            raise MemoryError(f"cannot allocate the workspace for a batch of {capacity:,} rows "
                              f"({total / 2**30:.2f} GiB); use smaller batches")
        # Zeroed once, so padding and unused rows never hold garbage (NaN) that a check
        # or a debugger could trip over.
        memset(ws.base, 0, total)
        ws.capacity = capacity
        ws.inputs[0] = ws.base + <Py_ssize_t>inputs[0]
        ws.inputs[1] = ws.base + <Py_ssize_t>inputs[1]
        for i in range(self.n_slots):
            ws.values[i] = ws.base + <Py_ssize_t>values[i]
            ws.grads[i] = NULL
            if self.grad_owner[i] >= 0:
                ws.grads[i] = ws.base + <Py_ssize_t>grads[self.grad_owner[i]]
        ws.saved = <double*>(ws.base + <Py_ssize_t>saved)
        ws.target = ws.base + <Py_ssize_t>target
        ws.labels = <int64_t*>(ws.base + <Py_ssize_t>labels)
        ws.weights = <double*>(ws.base + <Py_ssize_t>weights)
        ws.lse = <double*>(ws.base + <Py_ssize_t>lse)
        ws.backup = ws.base + <Py_ssize_t>backup
        return ws

    cdef void _bind(self, Workspace ws):
        """Point the tape at `ws` (its input: the active input buffer)."""
        cdef Py_ssize_t i, saved = 0
        self.ws = ws
        for i in range(self.n_slots):
            self.tape.slots[i].value = ws.values[i]
            self.tape.slots[i].grad = ws.grads[i]
        self.tape.slots[0].value = ws.inputs[self.active_input]
        for i in range(self.tape.n_ops):
            self.tape.ops[i].saved = saved
            saved += self.saved_fixed[i] + ws.capacity * self.saved_per_row[i]
        self.tape.saved = ws.saved
        self.tape.capacity = ws.capacity
        self.tape.target = ws.target
        self.tape.labels = ws.labels
        self.tape.lse = ws.lse

    cdef Py_ssize_t _scratch_need(self, Py_ssize_t rows, int nt):
        """The most scratch any record's kernels need for a pass over `rows` rows on nt
        threads (each kind declares its own: the kernel table's `scratch`)."""
        cdef Py_ssize_t need = 0, item = self.dtype.itemsize
        cdef int i
        cdef const Op* op
        for i in range(self.tape.n_ops):
            op = &self.tape.ops[i]
            need = max(need, LEVEL.kernels[op.kernel].scratch(op, &self.tape, rows, nt, item))
        return need

    cdef int _ready_scratch(self) except -1:
        """Scratch for a pass over the current batch on the whole team (on one thread, which
        needs the least, where memory for the team's is short); the number of threads the
        pass may use (the result does not depend on it)."""
        cdef int nt = _num_threads()
        cdef Py_ssize_t need
        cdef void* grown = NULL
        if self.tape.batch == self.scratch_rows and nt == self.scratch_team:
            return nt
        need = self._scratch_need(self.tape.batch, nt)
        if need > self.scratch_bytes:
            grown = bp_aligned_alloc(need)
            if grown == NULL and nt > 1:
                nt, need = 1, self._scratch_need(self.tape.batch, 1)
                grown = bp_aligned_alloc(need) if need > self.scratch_bytes else NULL
            if grown == NULL and need > self.scratch_bytes:
                raise MemoryError("cannot allocate the kernels' scratch")
            if grown != NULL:
                free(self.scratch)
                self.scratch, self.scratch_bytes = grown, need
                self.tape.scratch = grown
        self.scratch_rows, self.scratch_team = self.tape.batch, nt
        return nt

    # ---- loading a batch (all validation happens here, before anything changes)

    cdef cnp.ndarray _samples(self, object x, str name, tuple shape, bint ids):
        """x as an array of samples of `shape`, viewed as (n, values per sample): float32
        or float64 values, or (ids) integer ids."""
        cdef cnp.ndarray arr
        if ids:
            arr = np.asarray(x)
            if arr.dtype.kind not in "iu":
                raise TypeError(f"{name} must hold integer ids (the network starts with an "
                                f"Embedding), got {_describe(arr)}")
        else:
            arr = _as_float_array(x, name, 1 + len(shape))
        if arr.ndim != 1 + len(shape) or tuple(np.shape(arr))[1:] != shape:
            raise ValueError(f"{name} must have shape (batch, {', '.join(map(str, shape))}) "
                             f"for this network, got {_describe(arr)}")
        return arr.reshape(arr.shape[0], math.prod(shape))

    cdef int _load(self, object x, object y, object rows, object row_offset,
                   object sample_weight=None) except -1:
        """Validate x (and targets y unless None, and their weights unless None), copy them
        into a workspace (a new one if the batch is larger than any before), and only then
        make them the current batch.  Returns 1 when y holds integer class labels.  A
        refused batch changes nothing."""
        cdef bint ids = self.tape.slots[0].ids
        cdef cnp.ndarray arr = self._samples(x, "x", self.input_shape, ids)
        cdef cnp.ndarray index = None if rows is None else _row_index(rows)
        cdef Py_ssize_t n = arr.shape[0] if index is None else index.shape[0]
        cdef Workspace ws = self.ws
        cdef int spare = 1 - self.active_input, labels = 0
        cdef uint64_t offset = _row_offset(row_offset)
        if n == 0:
            raise ValueError("x is an empty batch (0 rows)")
        if index is not None and y is not None and len(y) != arr.shape[0]:
            raise ValueError(f"x and y must have the same number of rows, got {arr.shape[0]} "
                             f"and {len(y)}")
        if n < self.min_train_batch and self._training:
            raise ValueError("BatchNorm in train mode needs more than one value per channel "
                             "(the variance of one value is 0): give more than one row, or "
                             "use net.eval() to predict one row")
        # The workspace first: a batch too large for memory (2**62 rows of a zero-stride
        # array) is refused here at once, before anything reads its n rows.
        if ws is None or n > ws.capacity:
            ws = self._allocate(n)       # MemoryError here leaves everything as it was
        if index is not None:
            index = _check_rows(index, arr.shape[0])
        if ids:
            _copy_ids(arr, "x", <int64_t*>ws.inputs[spare], self.tape.slots[0].ld,
                      self.id_limit, index)
        else:
            _copy_rows(arr, "x", ws.inputs[spare], self.tape.slots[0].ld, self.is64, index)
        if y is not None:
            labels = self._load_target(y, ws, n, index)
        if sample_weight is not None:
            _copy_weights(sample_weight, arr.shape[0], ws.weights, n, index)
        # Valid: the batch becomes the network's input.
        self.active_input = spare
        self._bind(ws)
        self.tape.weights = ws.weights if sample_weight is not None else NULL
        self.tape.batch = n
        self.tape.row_offset = offset
        self.has_forward = self.has_input_grad = self.forward_predates_update = False
        return labels

    def validate(self, x, y=None, sample_weight=None, Py_ssize_t chunk=1024):
        """Check a whole dataset (x, with targets y and row weights unless None) as every
        batch of it would be checked when loaded (shapes, dtypes, NaN and Inf, values too
        large for the network's dtype, labels and ids in range, probabilities), without
        changing anything: the same copies, `chunk` rows at a time into buffers of their
        own.  fit calls it before the first step, so bad data is refused before any
        update; an error names the dataset's row."""
        cdef bint ids = self.tape.slots[0].ids
        cdef cnp.ndarray arr = self._samples(x, "x", self.input_shape, ids)
        cdef Py_ssize_t n = arr.shape[0], rows = max(1, min(n, chunk)), start, stop
        cdef Py_ssize_t ld = self.tape.slots[0].ld
        cdef Workspace ws = Workspace()        # only the buffers a batch is copied into
        if n == 0:
            raise ValueError("x is empty (0 rows)")
        if y is not None and len(y) != n:
            raise ValueError(f"x and y must have the same number of rows, got {n} and {len(y)}")
        inputs = np.empty(rows * ld, dtype=np.int64 if ids else self.dtype)
        target = np.empty(rows * self.tape.ldt, dtype=self.dtype)
        labels = np.empty(rows, dtype=np.int64)
        weights = np.empty(rows, dtype=np.float64)
        ws.inputs[0] = <char*>cnp.PyArray_DATA(inputs)
        ws.target = <char*>cnp.PyArray_DATA(target)
        ws.labels = <int64_t*>cnp.PyArray_DATA(labels)
        ws.weights = <double*>cnp.PyArray_DATA(weights)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            index = np.arange(start, stop, dtype=np.int64)   # errors name the dataset's rows
            if ids:
                _copy_ids(arr, "x", <int64_t*>ws.inputs[0], ld, self.id_limit, index)
            else:
                _copy_rows(arr, "x", ws.inputs[0], ld, self.is64, index)
            if y is not None:
                self._load_target(y, ws, stop - start, index)
            if sample_weight is not None:
                _copy_weights(sample_weight, n, ws.weights, stop - start, index)

    cdef int _load_target(self, object y, Workspace ws, Py_ssize_t rows,
                          cnp.ndarray index=None) except -1:
        """Copy y (or its rows `index`) into ws's target buffers; 1 for integer labels."""
        cdef Py_ssize_t n_out = self.tape.ldt
        cdef cnp.ndarray arr
        if self.loss is None:
            raise RuntimeError("this network has no loss: pass grad_output=, or give "
                               "Network(..., loss=...)")
        cdef int ndim = cnp.PyArray_NDIM(y) if cnp.PyArray_Check(y) else np.ndim(y)
        if self.loss.labels and ndim == 1:
            _copy_labels(y, n_out, ws.labels, rows, index)
            return 1
        arr = _as_float_array(y, "y", ndim)
        if ndim == 1 and self.output_shape == (1,):       # one output: y may be a vector
            arr = arr.reshape(arr.shape[0], 1)
        if tuple(np.shape(arr))[1:] != self.output_shape or (index is None and arr.shape[0] != rows):
            raise ValueError(f"y must have shape {(rows,) + self.output_shape} to match x and "
                             f"the output layer, got {_describe(arr)}")
        arr = arr.reshape(arr.shape[0], n_out)
        _copy_rows(arr, "y", ws.target, n_out, self.is64, index)
        if self.loss.targets != "values":
            self._check_probabilities(ws, rows)
        return 0

    cdef int _check_probabilities(self, Workspace ws, Py_ssize_t rows) except -1:
        """Targets of the cross-entropies are probabilities: in [0, 1], and rows summing
        to 1 for distributions (cross_entropy).  Checked on the copied batch, in C."""
        cdef Py_ssize_t bad, n_out = self.tape.ldt, item = self.dtype.itemsize
        cdef bint rows_sum_to_one = self.loss.targets == "distributions"
        with nogil:
            if self.is64:
                bad = _first_improper_row(<double*>ws.target, n_out, rows, n_out, rows_sum_to_one)
            else:
                bad = _first_improper_row(<float*>ws.target, n_out, rows, n_out, rows_sum_to_one)
        if bad >= 0:
            row = self._copy_out(ws.target + bad * n_out * item, 1, n_out, n_out)[0]
            raise ValueError(f"y: targets of {self.loss.name} must be probabilities in "
                             f"[0, 1]{', each row summing to 1' if rows_sum_to_one else ''}; "
                             f"row {bad} is {row}")
        return 0

    # ---- what a pass leaves behind, as copies

    cdef object _copy_out(self, char* src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t ld):
        cdef cnp.ndarray out = np.empty((rows, cols), dtype=self.dtype)
        cdef Py_ssize_t i, item = self.dtype.itemsize
        cdef char* dst = <char*>cnp.PyArray_DATA(out)
        for i in range(rows):
            memcpy(dst + i * cols * item, src + i * ld * item, cols * item)
        return out

    cdef object _slot_copy(self, int slot, bint gradient):
        """A slot's values (or gradient) for the current batch, as stored (see
        _relayout.pxd), one row per sample."""
        cdef Slot* s = &self.tape.slots[slot]
        return self._copy_out(s.grad if gradient else s.value, self.tape.batch, s.size, s.ld)

    cdef object _output_copy(self):
        """The network's output, (batch,) + output_shape (the planner stores it channels
        first, PyTorch's order)."""
        return self._slot_copy(self.tape.ops[self.tape.n_ops - 1].output, False).reshape(
            (self.tape.batch,) + self.output_shape)

    def output(self):
        """The network's output for the last forward (a copy)."""
        self._enter()
        try:
            self._check_forward("output")
            return self._output_copy()
        finally:
            self.busy = False

    def slot_value(self, int slot):
        """Slot `slot`'s values for the last forward (a copy, one row per sample, as
        stored); see plan.py for the slots."""
        self._enter()
        try:
            self._check_forward("slot_value")
            if not 0 <= slot < self.n_slots:
                raise IndexError(f"slot must be in [0, {self.n_slots}), got {slot}")
            if self.tape.slots[slot].ids:
                raise ValueError("slot 0 holds the input's ids")
            return self._slot_copy(slot, False)
        finally:
            self.busy = False

    def input_grad(self):
        """dL/dx of the last backward (a copy, shaped like x)."""
        self._enter()
        try:
            if self.tape.slots[0].ids:
                raise RuntimeError("no input gradient: the input is integer ids (an "
                                   "Embedding's), which have none")
            if not self.has_input_grad:
                raise RuntimeError("no input gradient: call backward() after forward() first")
            return self._slot_copy(0, True).reshape((self.tape.batch,) + self.input_shape)
        finally:
            self.busy = False

    # ---- the guard and the mode

    cdef int _enter(self) except -1:
        # One network, one pass at a time: a second Python thread entering while the first
        # runs without the GIL would overwrite its workspace.  A pass waits while another
        # thread holds the network to copy it (held()), which is over in microseconds.
        while True:
            if self.busy:
                raise RuntimeError("this Network is already running a pass in another "
                                   "thread; use one Network per thread, or a lock around it")
            if not self.holders or threading.get_ident() in self.holders:
                break
            time.sleep(WAIT_SECONDS)
        self.busy = True
        return 0

    def held(self):
        """A context manager: `with engine.held():` waits for a pass running in another
        thread to end, and keeps any other thread from starting one until the block ends
        (they wait), so what the block reads of the network (weights, buffers, optimizer
        state, counters) is all of one step boundary.  Checkpoints, pickles and copies are
        taken in one; another thread's training merely pauses for it."""
        return _Held(self)

    cdef int _check_forward(self, str what) except -1:
        if not self.has_forward and self.forward_predates_update:
            raise RuntimeError(f"{what} needs a forward pass with the current weights: the "
                               "last one was made before step() or train_step() updated "
                               "them; call forward(x) again")
        if not self.has_forward:
            raise RuntimeError(f"{what} needs a forward pass first: call forward(x)")
        return 0

    @property
    def training(self):
        """Train mode (True: batch statistics, dropout) or eval mode (False)."""
        return self._training

    @training.setter
    def training(self, bint value):
        self._enter()
        self._training = value
        self.busy = False

    @property
    def precision(self):
        """What the products (dense, convolution and recurrent layers, forward and
        backward) multiply: "float32", or "bfloat16" (float32 operands rounded to bfloat16,
        summed in float32; float32 networks only)."""
        return "bfloat16" if self.tape.products == BFLOAT16 else "float32"

    @precision.setter
    def precision(self, value):
        cdef int products = _products(value, "precision")
        if products == BFLOAT16 and self.is64:
            raise ValueError("precision='bfloat16' is for float32 networks: a float64 "
                             "network multiplies in float64")
        self._enter()
        self.tape.products = products
        self.busy = False

    @property
    def passes(self):
        """Train-mode forward passes so far: Dropout's counter (saved in checkpoints)."""
        return self.tape.passes

    @passes.setter
    def passes(self, uint64_t value):
        self._enter()
        self.tape.passes = value
        self.has_forward = self.has_input_grad = self.forward_predates_update = False
        self.busy = False

    # ---- the passes (nogil pieces first)

    @cython.nonecheck(False)
    cdef double _pass(self, int parts, int nt, bint labels, double scale,
                      bint input_grad, bint from_logits, double l2=0.0) noexcept nogil:
        # The one place that picks the float32 or float64 kernels.
        if self.is64:
            return run_pass(<double*>NULL, &self.tape, parts, nt, self.loss_kernel, labels, scale,
                            input_grad, from_logits, l2, self.block_sums)
        return run_pass(<float*>NULL, &self.tape, parts, nt, self.loss_kernel, labels, scale,
                        input_grad, from_logits, l2, self.block_sums)

    @cython.nonecheck(False)
    cdef void _begin_forward(self) noexcept nogil:
        """A forward in the current mode: a train-mode one counts as a pass (Dropout draws
        a fresh mask) and may move BatchNorm's statistics, so they are saved first."""
        self.tape.training = self._training
        if self._training:
            self.tape.passes += 1
            if self.n_buffers:
                memcpy(self.ws.backup, self.tape.buffers, self.n_buffers * self.dtype_size())

    @cython.nonecheck(False)
    cdef void _undo_forward(self) noexcept nogil:
        """Take back what _begin_forward and the forward changed (a refused step)."""
        if self.tape.training:
            self.tape.passes -= 1
            if self.n_buffers:
                memcpy(self.tape.buffers, self.ws.backup, self.n_buffers * self.dtype_size())

    @cython.nonecheck(False)
    cdef inline Py_ssize_t dtype_size(self) noexcept nogil:
        return 8 if self.is64 else 4

    @cython.nonecheck(False)
    cdef double _sum_of_squares(self, int nt) noexcept nogil:
        if self.is64:
            return sum_of_squares(LEVEL, <double*>self.tape.grads, self.params.shape[0],
                                  self.block_sums, nt)
        return sum_of_squares(LEVEL, <float*>self.tape.grads, self.params.shape[0],
                              self.block_sums, nt)

    @cython.nonecheck(False)
    cdef void _zero_grads(self) noexcept nogil:
        memset(self.tape.grads, 0, self.params.shape[0] * self.dtype_size())

    # ---- the public passes

    def forward(self, x, rows=None, row_offset=0):
        """Run the network on x (or x[rows]); returns a copy of the output.  row_offset:
        the batch's first row in a global batch (dropout masks are keyed by it)."""
        cdef int nt
        self._enter()
        try:
            self._load(x, None, rows, row_offset)
            nt = self._ready_scratch()
            with nogil:
                self._begin_forward()
                self._pass(FORWARD, nt, False, 1.0, False, False)
            self.has_forward = True
            return self._output_copy()
        finally:
            self.busy = False

    def loss_value(self, y):
        """The loss of the last forward's output against y (gradients untouched)."""
        cdef int labels
        cdef double value
        self._enter()
        try:
            self._check_forward("loss")
            labels = self._load_target(y, self.ws, self.tape.batch)
            self.tape.weights = NULL
            with nogil:
                value = self._pass(LOSS, 1, labels, 1.0, False, False)
            return value
        finally:
            self.busy = False

    def backward(self, y=None, grad_output=None, bint input_grad=True, double scale=1.0):
        """Accumulate scale * the gradients of the built-in loss against y, or of an
        external dL/d(output) `grad_output`; returns the loss (None with grad_output).
        A loss that is not finite raises FloatingPointError and accumulates nothing."""
        cdef int labels = 0, nt, parts = BACKWARD
        cdef double value = 0.0
        cdef cnp.ndarray g
        cdef Slot* out
        self._enter()
        try:
            self._check_forward("backward")
            if (y is None) == (grad_output is None):
                raise TypeError("backward takes either targets y or grad_output, not both or neither")
            _check_scale(scale)
            out = &self.tape.slots[self.tape.ops[self.tape.n_ops - 1].output]
            if grad_output is not None:
                g = _as_float_array(grad_output, "grad_output", 1 + len(self.output_shape))
                if g.shape[0] != self.tape.batch or tuple(np.shape(g))[1:] != self.output_shape:
                    raise ValueError(f"grad_output must have shape "
                                     f"{(self.tape.batch,) + self.output_shape} like the last "
                                     f"forward's output, got {_describe(g)}")
                _copy_rows(g.reshape(g.shape[0], -1), "grad_output", out.grad, out.ld,
                           self.is64)
                if scale != 1.0:
                    self._scale_slot_grad(out, scale)
            else:
                labels = self._load_target(y, self.ws, self.tape.batch)
                self.tape.weights = NULL
                parts = LOSS | BACKWARD
            nt = self._ready_scratch()
            with nogil:
                value = self._pass(parts, nt, labels, scale, input_grad,
                                   self.from_logits and grad_output is None)
            if not isfinite(value):
                raise FloatingPointError(f"the loss is {value}: no gradients were accumulated")
            self.has_grads = True
            self.has_input_grad = input_grad
            return value if grad_output is None else None
        finally:
            self.busy = False

    cdef void _scale_slot_grad(self, Slot* s, double scale):
        cdef Py_ssize_t i, j
        for i in range(self.tape.batch):
            for j in range(s.size):
                if self.is64:
                    (<double*>s.grad)[i * s.ld + j] *= scale
                else:
                    (<float*>s.grad)[i * s.ld + j] *= <float>scale

    def compute_gradients(self, x, y, rows=None, double scale=1.0, row_offset=0,
                          sample_weight=None, double l2=0.0):
        """forward + loss + backward in one call: adds scale * dL/dparams to the gradients
        and returns the (unscaled) mean loss of the batch (weighted by sample_weight, plus
        the weights' L2 penalty l2/2 * sum(W^2)).  A loss that is not finite raises
        FloatingPointError and changes nothing."""
        cdef int labels, nt
        cdef double value
        self._enter()
        try:
            _check_scale(scale)
            _check_l2(l2)
            labels = self._load(x, y, rows, row_offset, sample_weight)
            nt = self._ready_scratch()
            with nogil:
                self._begin_forward()
                value = self._pass(FORWARD | LOSS | BACKWARD, nt, labels, scale, False,
                                   self.from_logits, l2)
                if not isfinite(value):
                    self._undo_forward()
            self.has_forward = True
            if not isfinite(value):
                raise FloatingPointError(f"the loss is {value} (diverged); no gradients were "
                                         "accumulated")
            self.has_grads = True
            return value
        finally:
            self.busy = False

    @cython.nonecheck(False)
    cdef void _record_weight_norms(self, int nt) noexcept nogil:
        cdef int i
        for i in range(self.tape.n_weights):
            if self.is64:
                self.weight_norms[i] = sqrt(sum_of_squares(
                    LEVEL, <double*>self.tape.grads + self.weight_offsets[i], self.weight_sizes[i],
                    self.block_sums, nt))
            else:
                self.weight_norms[i] = sqrt(sum_of_squares(
                    LEVEL, <float*>self.tape.grads + self.weight_offsets[i], self.weight_sizes[i],
                    self.block_sums, nt))

    def weight_grad_norms(self):
        """The gradient norm of each weight the layers declare (Plan.weights, in that
        order) in the last train_step that recorded them (record_norms=True)."""
        return [self.weight_norms[i] for i in range(self.tape.n_weights)]

    def train_step(self, x, y, OptimizerBase optimizer, rows=None, double clip=0.0,
                   bint record_norms=False, sample_weight=None, double l2=0.0,
                   double scale=1.0):
        """forward, loss, backward, optimizer update and zero_grad in one call, with the
        GIL released from the first multiply to the last update.  With `rows`, the batch
        is x[rows], y[rows], gathered straight into the workspace (and the row weights
        sample_weight[rows]); l2 > 0 adds the L2 penalty of the weights to the loss
        (see compute_gradients), whose gradient is multiplied by `scale` (the factor
        between another library's loss and the built-in one).  clip > 0 scales the
        gradients so their global norm is at most `clip` (torch's clip_grad_norm_).
        A step whose loss, gradients or update are not finite is refused:
        FloatingPointError (MemoryError if the copy that would undo an update that may
        overflow cannot be made), and the weights, optimizer, statistics and gradients are
        as they were."""
        cdef int labels, nt, update = APPLIED
        cdef double value, sum_sq = 0.0, factor = 1.0
        cdef bint ok, pending, refused
        cdef char* backup = NULL
        self._enter()
        try:
            if not (clip >= 0 and isfinite(clip)):
                raise ValueError(f"clip must be a finite number >= 0, got {clip}")
            _check_l2(l2)
            _check_scale(scale)
            labels = self._load(x, y, rows, 0, sample_weight)
            nt = self._ready_scratch()
            pending = self.has_grads
            if pending and self.grads_backup is None:
                self.grads_backup = np.empty_like(self.grads)
            if pending:
                backup = <char*>cnp.PyArray_DATA(self.grads_backup)
            optimizer._begin(self.params.shape[0], self.dtype)
            try:
                with nogil:
                    if pending:        # gradients from backward(): this step adds to them
                        memcpy(backup, self.tape.grads,
                               self.params.shape[0] * self.dtype_size())
                    self._begin_forward()
                    value = self._pass(FORWARD | LOSS | BACKWARD, nt, labels, scale, False,
                                       self.from_logits, l2)
                    ok = isfinite(value)
                    if ok:
                        sum_sq = self._sum_of_squares(nt)
                        ok = isfinite(sum_sq)
                    if ok:
                        if record_norms:
                            self._record_weight_norms(nt)
                        if clip > 0 and sqrt(sum_sq) + 1e-6 > clip:
                            factor = clip / (sqrt(sum_sq) + 1e-6)
                        update = optimizer._run_nogil(self.tape.params, self.tape.grads,
                                                      self.params.shape[0], nt, True, factor,
                                                      sqrt(sum_sq))
                    if not ok or update == UNDONE or update == NO_COPY:
                        # Refused: the gradients back to what they were (the update may
                        # have cleared some), the forward's statistics and count undone.
                        if pending:
                            memcpy(self.tape.grads, backup,
                                   self.params.shape[0] * self.dtype_size())
                        else:
                            self._zero_grads()
                        self._undo_forward()
            finally:
                optimizer._end()
            refused = not ok or update == UNDONE or update == NO_COPY
            self.has_input_grad = False
            self.has_grads = pending and refused
            # The forward stays inspectable when the loss or the gradients were refused,
            # to find the first layer that is not finite.
            self.has_forward = not ok
            self.forward_predates_update = ok and not refused
            if not isfinite(value):
                raise FloatingPointError(
                    f"the loss is {value} (diverged); this step's update was not applied, so "
                    "the weights are those of the last good step")
            if not ok:
                raise FloatingPointError(
                    f"the gradients are not finite (squared norm {sum_sq:.3g}); this step's "
                    "update was not applied, so the weights are those of the last good step")
            _check_update(update, optimizer)
            return value
        finally:
            self.busy = False

    def step(self, OptimizerBase optimizer):
        """One optimizer update from the accumulated gradients, or FloatingPointError
        (nothing changed) if they or the update are not finite."""
        cdef int nt, update = APPLIED
        cdef double sum_sq
        cdef bint ok
        self._enter()
        try:
            if not self.has_grads:
                raise RuntimeError("step() needs gradients: call backward() first")
            nt = self._ready_scratch()
            optimizer._begin(self.params.shape[0], self.dtype)
            try:
                with nogil:
                    sum_sq = self._sum_of_squares(nt)
                    ok = isfinite(sum_sq)
                    if ok:
                        update = optimizer._run_nogil(self.tape.params, self.tape.grads,
                                                      self.params.shape[0], nt, False, 1.0,
                                                      sqrt(sum_sq))
            finally:
                optimizer._end()
            if not ok:
                raise FloatingPointError(
                    f"the gradients are not finite (squared norm {sum_sq:.3g}); the update "
                    "was not applied")
            if update == APPLIED or update == BROKEN:
                self.has_forward = False   # the saved activations belong to the old weights
                self.forward_predates_update = True
            _check_update(update, optimizer)
        finally:
            self.busy = False

    def zero_grad(self):
        """Set every gradient to zero."""
        self._enter()                  # never while another thread's pass writes them
        with nogil:
            self._zero_grads()
        self.has_grads = False
        self.busy = False

    def grad_norm(self):
        """The Euclidean norm of all gradients together (the same for any thread count)."""
        cdef double sum_sq
        cdef int nt
        self._enter()
        try:
            nt = _num_threads()
            with nogil:
                sum_sq = self._sum_of_squares(nt)
            return sqrt(sum_sq)
        finally:
            self.busy = False

    def clip_grad_norm(self, double max_norm):
        """Scale the gradients so their global norm is at most max_norm, as
        torch.nn.utils.clip_grad_norm_ (factor max_norm / (norm + 1e-6) when below 1);
        returns the norm before clipping."""
        cdef double sum_sq, norm, factor
        cdef Py_ssize_t i, n = self.params.shape[0]
        cdef int nt
        if not (max_norm > 0 and isfinite(max_norm)):
            raise ValueError(f"max_norm must be a finite number > 0, got {max_norm}")
        self._enter()
        try:
            nt = _num_threads()
            with nogil:
                sum_sq = self._sum_of_squares(nt)
            norm = sqrt(sum_sq)
            if not isfinite(sum_sq):
                raise FloatingPointError(f"the gradient norm is {norm}: not finite, nothing "
                                         "was clipped")
            factor = max_norm / (norm + 1e-6)
            if factor < 1:
                with nogil:
                    if self.is64:
                        for i in range(n):
                            (<double*>self.tape.grads)[i] *= factor
                    else:
                        for i in range(n):
                            (<float*>self.tape.grads)[i] *= <float>factor
            return norm
        finally:
            self.busy = False


# How long a thread waiting for another's pass (or copy) sleeps between looks: a step
# takes microseconds to seconds, and a waiting thread must not take a core from it.
WAIT_SECONDS = 1e-4


cdef class _Held:
    """Engine.held()'s context manager."""
    cdef Engine engine
    cdef object thread

    def __cinit__(self, Engine engine):
        self.engine = engine

    def __enter__(self):
        holders = self.engine.holders
        self.thread = threading.get_ident()
        holders[self.thread] = holders.get(self.thread, 0) + 1      # new passes wait now
        try:
            while self.engine.busy:                   # a pass in another thread: let it end
                time.sleep(WAIT_SECONDS)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        holders = self.engine.holders
        holders[self.thread] -= 1
        if not holders[self.thread]:
            del holders[self.thread]
        return False


cdef uint64_t _row_offset(object value) except? 0:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0 \
            or value >= 2 ** 62:
        raise ValueError(f"row_offset must be a non-negative integer, got {value!r}")
    return value


cdef int _check_scale(double scale) except -1:
    if not isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return 0


cdef int _check_update(int update, OptimizerBase optimizer) except -1:
    """Raise for an update that was not applied, saying what happened."""
    if update == UNDONE:
        raise FloatingPointError(
            f"the update overflowed: it would have made some weights or optimizer state "
            f"infinite or NaN (learning rate {optimizer.lr:g}); it was not applied, so the "
            "weights and optimizer state are those of the last good step: lower the "
            "learning rate")
    if update == NO_COPY:
        raise MemoryError(
            "this update might overflow, and there is no memory for the copy of the weights "
            "and optimizer state that would undo it; it was not applied")
    if update == BROKEN:
        raise FloatingPointError(
            f"the update made some weights or optimizer state overflow (learning rate "
            f"{optimizer.lr:g}), which the optimizer's bound on its updates did not foresee "
            "(were they written from outside since its last step?); the network is no longer "
            "finite: reload a checkpoint and lower the learning rate")
    return 0

