"""How the kernels' idle threads wait: spin for about half a millisecond, then sleep.

Every parallel region ends with its threads waiting for each other.  GNU libgomp's
default is to spin for about 300,000 iterations (~3 ms) before sleeping; LLVM's libomp
spins for 200 ms.  On an idle machine the wait is short and spinning is the fastest way
to catch the next region.  On a busy one (a browser, a second fit under
GridSearchCV(n_jobs=2), MPI ranks sharing cores, NumPy's OpenBLAS threads between
steps) a thread that finished its share spins on a core its partner, descheduled, is
waiting for: every region then costs a scheduler time slice, and a step with dozens of
regions runs many times slower.  Spinning for ~0.5 ms instead keeps back-to-back regions
as fast as before and lets the OS hand the core over when a partner is late; the
Engine's team choice (_engine.pxi, TeamChoice) then runs passes on one thread while the
machine stays busy.

The runtimes read this setting from the environment once, when they are loaded, so it
is set just for the import of the compiled core (which loads the runtime) and taken out
again: other programs this process starts are not affected.  A user's own
OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME is left alone.  If the runtime was
already loaded by another extension before backprop, its setting stands.
"""
import contextlib
import os

# libgomp counts spins (~100 per microsecond): 50,000 is about 0.5 ms, against libgomp's
# default 300,000.  Measured on a small network whose steps are 0.4 ms (benchmarks/
# contention.py): 20,000 cost 3.6% of the idle machine's speed and 100,000 0.6%, while
# beside a busy process each pass on the team costs 8 ms at 20,000 and 25 ms at 100,000
# (the Engine's trials of the team pay that).  libomp counts milliseconds.
SHORT_SPIN = {"GOMP_SPINCOUNT": "50000", "KMP_BLOCKTIME": "1"}
USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@contextlib.contextmanager
def short_spin():
    """While the compiled core (and so the OpenMP runtime) is imported: spin briefly."""
    if any(name in os.environ for name in USER_CHOICES):
        yield
        return
    os.environ.update(SHORT_SPIN)
    try:
        yield
    finally:
        for name in SHORT_SPIN:
            os.environ.pop(name, None)
