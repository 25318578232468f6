"""Training on a busy machine: backprop and PyTorch beside other processes, and
backprop's GEMM interleaved with NumPy's in one process.

    python benchmarks/contention.py                 # the table (about 10 minutes)
    python benchmarks/contention.py --repeats 1 --epochs 1  # a quick look

Part 1.  Each measurement trains the shipped MNIST sample (4,000 rows, 784-256-10,
Adam, batch 64) for --epochs epochs in a fresh process on 2 threads, while 0, 1 or 3
other processes each keep a core busy (a Python loop), and reports the training time;
the median of --repeats runs, the frameworks interleaved within each repeat.  The
variants of backprop: its default (its own team, backprop/_team.h: parts claimed by
whichever thread is awake; idle threads spin ~0.2 ms, or not at all while other
processes take the CPUs); one thread (OMP_NUM_THREADS=1: what any two-thread run must
beat); OMP_WAIT_POLICY=passive (idle threads never spin).  PyTorch: the same network
and loop, torch.set_num_threads(2).

Part 2.  In one process: bp.ops.matmul on 1024^3 float32, alone and in blocks
interleaved with numpy.matmul blocks of the same size (0.15 s each), GFLOP/s of
backprop's blocks (NumPy's OpenBLAS threads keep spinning for a while after each of its
calls, on a core backprop's team needs).

OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are dropped before NumPy loads (benchenv).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchenv  # noqa: E402

if __name__ == "__main__":
    benchenv.drop_openblas_overrides()

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

VARIANTS = {
    "backprop": {},
    "backprop, one thread": {"OMP_NUM_THREADS": "1"},
    "backprop, OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
    "PyTorch": {},
}
LOADS = (0, 1, 3)


def train(framework, epochs):
    """Seconds to train the MNIST sample for `epochs` epochs (in this process)."""
    import numpy as np
    import backprop as bp
    X, y = bp.datasets.load_mnist_sample()
    X, y = X[:4000], y[:4000]
    if framework == "torch":
        import torch
        torch.set_num_threads(2)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(X)))
            for i in range(0, len(X), 64):
                idx = order[i:i + 64]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(Xt[idx]), yt[idx]).backward()
                opt.step()
        return time.perf_counter() - started
    bp.set_num_threads(2)
    net = bp.Network([bp.Dense(784, 256, "relu"), bp.Dense(256, 10, "softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(lr=1e-3), seed=0)
    started = time.perf_counter()
    net.fit(X, y, epochs=epochs, batch_size=64, progress=False)
    return time.perf_counter() - started


def measure(variant, epochs, busy):
    """One fresh process training `variant` beside `busy` spinning processes."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(busy)]
    try:
        time.sleep(0.5)                                  # let them take their cores
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                            "OMP_NUM_THREADS")}
        env.update(VARIANTS[variant])
        framework = "torch" if variant == "PyTorch" else "backprop"
        result = subprocess.run([sys.executable, __file__, "--worker", framework,
                                 "--epochs", str(epochs)], env=env, capture_output=True,
                                text=True, timeout=3600)
        if result.returncode:
            raise RuntimeError(result.stderr)
        return float(result.stdout.split()[-1])
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def interleaved_matmul(blocks=20, seconds=0.15):
    """GFLOP/s of bp.ops.matmul blocks alone, then between numpy.matmul blocks."""
    import numpy as np
    import backprop as bp
    from threadpoolctl import threadpool_limits
    bp.set_num_threads(2)
    threadpool_limits(2)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((1024, 1024), dtype=np.float32) for _ in range(2))
    out = np.empty((1024, 1024), dtype=np.float32)
    flops = 2 * 1024 ** 3

    def block(run):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            run()
            count += 1
        return count * flops / (time.perf_counter() - started) / 1e9

    def ours():
        bp.ops.matmul(a, b, out=out)

    def numpy_():
        np.matmul(a, b, out=out)

    for run in (ours, numpy_):
        block(run)                                       # warm up
    time.sleep(0.5)
    alone = [block(ours) for _ in range(blocks)]
    time.sleep(0.5)
    mixed, numpy_rates = [], []
    for _ in range(blocks):
        numpy_rates.append(block(numpy_))
        mixed.append(block(ours))
    return statistics.median(alone), statistics.median(mixed), statistics.median(numpy_rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["backprop", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(train(args.worker, args.epochs))
        return
    print(benchenv.machine_line())
    print(f"Load average at the start: {os.getloadavg()[0]:.2f}")
    times = {(variant, busy): [] for variant in VARIANTS for busy in LOADS}
    for repeat in range(args.repeats):
        for busy in LOADS:
            for variant in VARIANTS:
                times[variant, busy].append(measure(variant, args.epochs, busy))
                print(f"  repeat {repeat + 1}, {busy} busy, {variant}: "
                      f"{times[variant, busy][-1]:.2f} s", file=sys.stderr)
    print(f"\nTraining the MNIST sample for {args.epochs} epochs (784-256-10, Adam, batch 64, "
          f"2 threads), each run a fresh process, median of {args.repeats}; in brackets the "
          "time over the same framework's idle time.\n")
    print("| beside | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for busy in LOADS:
        cells = []
        for variant in VARIANTS:
            median = statistics.median(times[variant, busy])
            idle = statistics.median(times[variant, 0])
            cells.append(f"{median:.2f} s" + ("" if busy == 0 else f" ({median / idle:.2f}x)"))
        label = "an idle machine" if busy == 0 else f"{busy} busy process{'es' * (busy > 1)}"
        print(f"| {label} | " + " | ".join(cells) + " |")
    alone, mixed, numpy_rate = interleaved_matmul()
    print(f"\nbp.ops.matmul 1024^3 float32, 2 threads, in one process: {alone:.0f} GFLOP/s "
          f"alone, {mixed:.0f} GFLOP/s in blocks between numpy.matmul blocks "
          f"({mixed / alone:.2f}x); numpy.matmul in those blocks {numpy_rate:.0f} GFLOP/s.")
    print(f"Load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
