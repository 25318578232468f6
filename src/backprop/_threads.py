"""The kernels' thread count: the process-wide setting, and limits scoped to a block.

The compiled core keeps the count requested by ``set_num_threads`` but can only report
the effective one (the request capped by OpenMP's limit, which threadpoolctl lowers).
Restoring the effective count after a block would turn a passing ``threadpool_limits(1)``
into a permanent request for one thread; so the request is recorded here, and a scoped
limit restores exactly what was requested.
"""
import contextlib
import threading

from backprop import _core

_lock = threading.Lock()
_requested = 0          # what set_num_threads last asked for; 0: OpenMP's own count
_limits = []            # (token, n) of the `limited` blocks running, oldest first


def set_num_threads(n):
    """Use at most `n` threads (1 to MAX_THREADS) in every kernel; `n=0` goes back to
    OpenMP's own setting (OMP_NUM_THREADS, threadpoolctl)."""
    global _requested
    with _lock:
        _core.set_num_threads(n)            # checks n
        _requested = int(n)


@contextlib.contextmanager
def limited(n):
    """Run the block with the kernels on at most `n` threads, then put back what was
    requested before.  The setting is the process's, shared by its threads: when blocks
    overlap (two estimators fitting in two threads), the latest one still running sets
    the count, and when the last ends, the request made with ``set_num_threads`` (or
    OpenMP's own count) holds again, whatever order they end in."""
    token = object()
    with _lock:
        _core.set_num_threads(n)            # checks n before the block runs
        _limits.append((token, int(n)))
    try:
        yield
    finally:
        with _lock:
            _limits[:] = [entry for entry in _limits if entry[0] is not token]
            _core.set_num_threads(_limits[-1][1] if _limits else _requested)
