# How work is split between threads, in one place.
#
# Every parallel loop in the kernels cuts its range the same way: into `team` contiguous
# parts of whole `unit`s, part t being [part_start(t), part_start(t + 1)).  The parts are
# clamped to the range, so a team larger than the work (256 threads on 100 rows) leaves
# the extra threads with empty parts instead of ranges that start past the end.  Loops
# run `for t in prange(team)`, so each part is done exactly once however many OS threads
# OpenMP actually starts, and, since no part ever depends on another, the result is the
# same for every team size.
#
# The bounds must be ASSIGNED in the loop body (lo = part_start(...)): that is how
# Cython knows to make them private to each thread.  A variable only written through a
# pointer inside a prange stays shared between the threads, a race.

cdef extern from "_team.h" nogil:
    # The threads the parallel regions run on (_team.h; BP_OWN_TEAM 0 where the
    # compiler's OpenMP runtime runs them): helpers started so far, and how long an idle
    # one spins before it sleeps (ns; set -1 for the default).
    int BP_OWN_TEAM
    int bp_team_helpers()
    void bp_team_set_spin(long ns)
    long bp_team_spin()


cdef enum:
    # Below this many elements an elementwise pass is faster on one thread than the few
    # microseconds a parallel region costs (and far faster than waiting at its closing
    # barrier for a thread that another process has descheduled).
    PARALLEL_MIN_ELEMENTS = 1 << 16


cdef inline Py_ssize_t part_start(Py_ssize_t n, Py_ssize_t t, Py_ssize_t team,
                                  Py_ssize_t unit) noexcept nogil:
    """Where part t of range(n) starts when `team` threads split it in whole `unit`s
    (part t ends where part t + 1 starts; part `team` starts at n)."""
    cdef Py_ssize_t units = (n + unit - 1) // unit
    cdef Py_ssize_t per = (units + team - 1) // team
    return min(n, t * per * unit)


cdef inline int team_for(Py_ssize_t elements, int n_threads) noexcept nogil:
    """How many threads an elementwise pass over `elements` values should use."""
    if elements < PARALLEL_MIN_ELEMENTS or n_threads < 1:
        return 1
    return n_threads
