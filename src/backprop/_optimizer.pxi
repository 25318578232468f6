# --------------------------------------------------------------------------- optimizers

cdef enum UpdateResult:
    APPLIED = 0
    UNDONE = 1         # it overflowed; the parameters and state were put back
    NO_COPY = 2        # it might overflow, and there was no memory for the copy that would
                       # undo it: nothing was written
    BROKEN = 3         # it overflowed where the rule's bound said it could not (values
                       # written from outside since the last step?): not put back

# A rule's bound below this fraction of the dtype's largest value proves its update
# finite, with room for the bound's own rounding.  The margin is also all there is for
# values written into the parameters or state from outside since the optimizer last
# measured them (TorchModule's torch optimizer, your own code), which it cannot see: an
# overflow they cause is reported (BROKEN), not undone.
GUARD_MARGIN = 2.0 ** -16


cdef class OptimizerBase:
    """The compiled half of every optimizer: its rule and settings as a C struct (read by
    the nogil update) and its state buffers, each shaped like the flat parameter buffer.

    Only the rules of the rule table exist (RULES, _kernels.pyx).  Each public class in
    `backprop.optim` declares its rule (RULE, a key of RULES) and the names of the
    rule's state buffers (STATE_NAMES, as many as its kernel takes: checked here), and
    validates its settings before `_set_rule`, so no subclass can make the kernel read a
    buffer that is not there.  While a network's step runs without the GIL, the settings
    and buffers cannot be changed (`_busy`).

    A step either applies a finite update or changes nothing (see _optim.pxd): the
    optimizer keeps the largest magnitude the parameters and each state buffer have held
    (`held`: measured at the first step after a bind or a load, then the running maximum
    of what its updates wrote), and before each update asks its rule's bound what the
    update can write.  Only when that comes near the dtype's largest value are the
    parameters and state copied (into `backup`, allocated the first time), to be put
    back if the update reports a value that is not finite."""
    cdef OptimConfig config
    cdef readonly dict state
    cdef object _dtype
    cdef bint _is64
    cdef Py_ssize_t _size
    cdef char* slots[3]            # the state buffers' data; unused slots stay NULL
    cdef int _busy
    cdef bint _has_rule
    cdef readonly tuple state_names   # the rule's state buffers, in its kernel's order
    cdef double held[N_HELD]       # largest |parameter| and |state value|; NaN: not measured
    cdef double _limit             # the largest bound an update runs without a copy
    cdef char* backup              # the parameters and state before a guarded update
    cdef double* parts             # each thread's magnitudes in one update

    def __cinit__(self, *args, **kwargs):
        self.state = {}
        self._size = -1
        memset(&self.config, 0, sizeof(OptimConfig))
        self.backup = NULL
        self.parts = <double*>bp_aligned_alloc(MAX_THREADS * N_HELD * sizeof(double))
        if self.parts == NULL:
            raise MemoryError("cannot allocate an optimizer")

    def __dealloc__(self):
        free(self.backup)
        free(self.parts)

    def _set_rule(self, **settings):
        """Take the class's rule and these settings (fields of OptimConfig); the step count
        restarts at 0.  Each setting must be a finite number or a bool."""
        cdef OptimConfig c
        rule = getattr(type(self), "RULE", None)
        state_names = tuple(getattr(type(self), "STATE_NAMES", ()))
        self._check_idle("change the optimizer's settings")
        if rule not in RULES:
            raise ValueError(f"unknown optimizer rule {rule!r}; choose one of {sorted(RULES)}")
        if len(state_names) != LEVEL.rules[RULES[rule]].n_state:
            raise TypeError(f"the {rule!r} rule keeps {LEVEL.rules[RULES[rule]].n_state} state "
                            f"buffers, but {len(state_names)} are named: {state_names}")
        if set(self._nonnegative()) - set(state_names):
            raise TypeError(f"NONNEGATIVE names buffers the rule does not keep: "
                            f"{sorted(set(self._nonnegative()) - set(state_names))}")
        memset(&c, 0, sizeof(OptimConfig))
        known = set(dict(c)) - {"rule", "step"}
        for name, value in settings.items():
            if name not in known:
                raise TypeError(f"unknown optimizer setting {name!r}")
            if not isinstance(value, (bool, np.bool_)) and not (
                    isinstance(value, (int, float, np.integer, np.floating)) and isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        config = dict(c)
        config.update(settings)
        config["rule"] = RULES[rule]
        config["step"] = 0
        self.config = config
        self.state_names = state_names
        self._has_rule = True

    cdef int _check_idle(self, str what) except -1:
        if self._busy:
            raise RuntimeError(f"cannot {what} while a step runs in another thread")
        return 0

    @property
    def lr(self):
        """The learning rate; schedules change it between steps."""
        return self.config.lr

    @lr.setter
    def lr(self, value):
        self._check_idle("change the learning rate")
        value = float(value)
        if not (value >= 0 and isfinite(value)):
            raise ValueError(f"lr must be a finite non-negative number, got {value}")
        self.config.lr = value

    @property
    def attached(self):
        """Whether this optimizer has been bound to a network's parameters."""
        return self._size >= 0

    @property
    def steps(self):
        """How many updates this optimizer has made."""
        return self.config.step

    def _config(self):
        return self.config

    def _bind(self, Py_ssize_t size, dtype, dict initial=None):
        """Create the rule's state buffers for `size` parameters, filled with 0 or with
        `initial[name]`; the step count restarts at 0."""
        self._check_idle("rebind the optimizer")
        if not self._has_rule:
            raise TypeError(f"{type(self).__name__} has no update rule: use one of backprop's "
                            "optimizers (SGD, Adam, AdamW, RMSprop, Adagrad) or a subclass")
        initial = initial or {}
        names = self.state_names
        if set(initial) - set(names):
            raise ValueError(f"unknown state buffers {sorted(set(initial) - set(names))}; "
                             f"this rule has {list(names)}")
        state = {name: np.full(size, initial.get(name, 0.0), dtype=dtype) for name in names}
        free(self.backup)          # sized for the old buffers
        self.backup = NULL
        self._forget_magnitudes()
        self._limit = float(np.finfo(dtype).max) * GUARD_MARGIN
        self._dtype = np.dtype(dtype)
        self._is64 = self._dtype == np.float64
        self._size = size
        self.state = state
        self.slots[0] = self.slots[1] = self.slots[2] = NULL
        for i, buffer in enumerate(state.values()):
            self.slots[i] = <char*>cnp.PyArray_DATA(buffer)
        self.config.step = 0

    def _load(self, OptimizerBase template, long step, dict state):
        """Take `template`'s settings, this step count and these state buffers, all checked
        before anything changes."""
        self._check_idle("load a state into the optimizer")
        if template.config.rule != self.config.rule:
            raise ValueError("the state is for another update rule")
        if set(state) != set(self.state):
            raise ValueError(f"optimizer state must have the buffers {sorted(self.state)}, "
                             f"got {sorted(state)}")
        for name, value in state.items():
            value = np.asarray(value)
            if value.shape != (self._size,) or value.dtype != self._dtype:
                raise ValueError(f"optimizer state {name!r} must have shape ({self._size},) "
                                 f"and dtype {self._dtype}, got {_describe(value)}")
            if not np.isfinite(value).all():
                raise ValueError(f"optimizer state {name!r} contains NaN or Inf")
        if step < 0:
            raise ValueError(f"optimizer step must be >= 0, got {step}")
        for name in self._nonnegative():
            if (np.asarray(state[name]) < 0).any():
                raise ValueError(f"optimizer state {name!r} holds sums of squares, which are "
                                 "never negative; it has negative values")
        for name, value in state.items():
            self.state[name][...] = value
        self.config = template.config
        self.config.step = step
        self._forget_magnitudes()

    def _nonnegative(self):
        """The state buffers the class declares never negative (NONNEGATIVE): its rule's
        bound counts on it."""
        return tuple(getattr(type(self), "NONNEGATIVE", ()))

    cdef void _forget_magnitudes(self) noexcept:
        # Measured again at the next step: the parameters or state were just replaced.
        cdef int k
        for k in range(N_HELD):
            self.held[k] = NAN

    cdef int _begin(self, Py_ssize_t size, object dtype) except -1:
        """Mark a step as running over a flat buffer of `size` values of `dtype`."""
        if self._size != size or self._dtype != dtype:
            raise ValueError("this optimizer is bound to another network's parameters")
        self._check_idle("run two steps at once")
        self._busy = 1
        return 0

    cdef void _end(self) noexcept:
        self._busy = 0

    # The nogil methods below only ever run on `self`: Cython's debug None check
    # of self would need the GIL, so it is off for them.
    @cython.nonecheck(False)
    cdef int _run_nogil(self, char* p, char* g, Py_ssize_t n, int n_threads, bint clear,
                        double clip, double grad) noexcept nogil:
        """One update (between _begin and _end) of the n parameters at p from their
        gradients at g times `clip`, the largest of which is at most `grad` before clipping:
        an UpdateResult."""
        cdef const Rule* rule = &LEVEL.rules[self.config.rule]
        cdef Py_ssize_t nbytes = n * (8 if self._is64 else 4)
        cdef double written[N_HELD]
        cdef int k
        cdef bint guarded, finite = True
        if self.held[0] != self.held[0]:
            self._measure(p, n)
        guarded = not (rule.bound(&self.config, self.held, grad * clip) <= self._limit)
        if guarded:
            if self.backup == NULL:
                self.backup = <char*>bp_aligned_alloc((1 + rule.n_state) * nbytes)
                if self.backup == NULL:
                    return NO_COPY
            memcpy(self.backup, p, nbytes)
            for k in range(rule.n_state):
                memcpy(self.backup + (k + 1) * nbytes, self.slots[k], nbytes)
        if self._is64:
            optimizer_update(LEVEL, rule, &self.config, <double*>p, <double*>g, <double*>self.slots[0],
                             <double*>self.slots[1], <double*>self.slots[2], clip, n,
                             n_threads, clear, written, self.parts)
        else:
            optimizer_update(LEVEL, rule, &self.config, <float*>p, <float*>g, <float*>self.slots[0],
                             <float*>self.slots[1], <float*>self.slots[2], clip, n,
                             n_threads, clear, written, self.parts)
        for k in range(N_HELD):
            finite = finite and written[k] < INFINITY
        if finite:
            for k in range(N_HELD):
                self.held[k] = most(self.held[k], written[k])
            return APPLIED
        if guarded:
            memcpy(p, self.backup, nbytes)
            for k in range(rule.n_state):
                memcpy(self.slots[k], self.backup + (k + 1) * nbytes, nbytes)
            self.config.step -= 1
            return UNDONE
        for k in range(N_HELD):
            self.held[k] = NAN
        return BROKEN

    @cython.nonecheck(False)
    cdef void _measure(self, char* p, Py_ssize_t n) noexcept nogil:
        """held: the largest magnitude in the parameters and in each state buffer (a pass
        over them, once after each bind or load)."""
        cdef int k, n_state = LEVEL.rules[self.config.rule].n_state
        for k in range(N_HELD):
            self.held[k] = 0.0
        if self._is64:
            self.held[0] = largest_magnitude(LEVEL, <double*>p, n)
            for k in range(n_state):
                self.held[k + 1] = largest_magnitude(LEVEL, <double*>self.slots[k], n)
        else:
            self.held[0] = largest_magnitude(LEVEL, <float*>p, n)
            for k in range(n_state):
                self.held[k + 1] = largest_magnitude(LEVEL, <float*>self.slots[k], n)
