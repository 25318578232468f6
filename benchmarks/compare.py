"""Time one training step (forward + loss + backward + SGD update) in backprop and its
peers, side by side, and the core's matmul against numpy.matmul.

    python benchmarks/compare.py                   # all configs but huge, 2 threads
    python benchmarks/compare.py --quick           # a short run (< 1 min)
    python benchmarks/compare.py --configs huge --rounds 3
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/compare.py

Method: every framework trains the same network (float32, same sizes, SGD) on one fixed
batch.  Rounds are interleaved: each round times a block of steps of every framework in
turn, and the table reports the median over rounds, so a noisy neighbour hurts all
frameworks alike.  Before each block the script pauses briefly: OpenBLAS and OpenMP
workers spin for a while after a call, and would otherwise steal the cores of whoever
runs next.  Each framework's loss must fall over its timed steps (a step that does not
learn is not timed); the script exits with an error otherwise.

Peers, each only if installed: a hand-written NumPy step (benchmarks/numpy_reference.py),
PyTorch eager (pip install torch==2.13.0, the CPU build), scikit-learn's
MLPClassifier/MLPRegressor.partial_fit.  The environment here may set OPENBLAS_CORETYPE
and OPENBLAS_L2_SIZE, which slow a current NumPy: unset both for this command to compare
against NumPy at its best (the script prints them).
"""
import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

import backprop as bp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configs import CONFIGS, TARGET_US  # noqa: E402
from numpy_reference import NumpyMLP  # noqa: E402

PAUSE = 0.1   # seconds between blocks, so the previous library's spinning threads stop


def data_for(config, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(config.batch, config.sizes[0])).astype(np.float32)
    if config.classifier:
        return x, rng.integers(0, config.sizes[-1], config.batch)
    return x, (rng.random((config.batch, config.sizes[-1])) > 0.5).astype(np.float32)


def backprop_step(config):
    layers = [bp.Dense(a, b, config.hidden) for a, b in zip(config.sizes[:-2], config.sizes[1:-1])]
    layers.append(bp.Dense(config.sizes[-2], config.sizes[-1], config.output))
    net = bp.Network(layers, loss=config.loss, optimizer=bp.SGD(lr=config.lr), seed=0)
    x, y = data_for(config)
    return lambda: net.train_step(x, y)


def numpy_step(config):
    net = NumpyMLP(config)
    x, y = data_for(config)
    return lambda: net.train_step(x, y)


def torch_step(config):
    import torch
    mods = []
    for i, (a, b) in enumerate(zip(config.sizes, config.sizes[1:])):
        mods.append(torch.nn.Linear(a, b))
        if i < len(config.sizes) - 2:
            mods.append(torch.nn.ReLU() if config.hidden == "relu" else torch.nn.Sigmoid())
    if not config.classifier:
        mods.append(torch.nn.Sigmoid())
    model = torch.nn.Sequential(*mods)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    loss_fn = torch.nn.CrossEntropyLoss() if config.classifier else torch.nn.MSELoss()
    x, y = (torch.from_numpy(v) for v in data_for(config))

    def step():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def sklearn_step(config):
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    kind = MLPClassifier if config.classifier else MLPRegressor
    model = kind(hidden_layer_sizes=config.sizes[1:-1], activation="relu" if config.hidden == "relu" else "logistic",
                 solver="sgd", learning_rate_init=config.lr, momentum=0.0, batch_size=config.batch,
                 random_state=0)
    x, y = data_for(config)
    classes = np.arange(config.sizes[-1])

    def step():
        if config.classifier:
            model.partial_fit(x, y, classes=classes)
        else:
            model.partial_fit(x, y)
        return model.loss_
    return step


PEERS = {"numpy": numpy_step, "torch": torch_step, "sklearn": sklearn_step}


def available(name):
    try:
        __import__({"numpy": "numpy", "torch": "torch", "sklearn": "sklearn"}[name])
        return True
    except ImportError:
        return False


def calibrate(step, seconds):
    """How many steps of `step` fill a block of about `seconds` (at least 3)."""
    start = time.perf_counter()
    for _ in range(3):
        step()
    per_step = (time.perf_counter() - start) / 3
    return max(3, min(100_000, int(seconds / per_step)))


def time_config(config, frameworks, rounds, block_seconds):
    steps = {name: make(config) for name, make in frameworks.items()}
    first = {name: step() for name, step in steps.items()}          # the loss before timing
    counts = {name: calibrate(step, block_seconds) for name, step in steps.items()}
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            time.sleep(PAUSE)
            start = time.perf_counter()
            for _ in range(counts[name]):
                step()
            samples[name].append((time.perf_counter() - start) / counts[name])
    for name, step in steps.items():
        last = step()
        if not last < first[name]:
            sys.exit(f"{config.name}: {name}'s loss did not fall ({first[name]:.4g} -> {last:.4g})")
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def matmul_table(rounds, quick):
    rng = np.random.default_rng(0)
    shapes = [("1024x1024x1024", 1024, 1024, 1024, False, False),
              ("X.W^T 256x1024->1024", 256, 1024, 1024, False, True),
              ("X.W^T 128x784->512", 128, 512, 784, False, True),
              ("X.W^T 64x784->128", 64, 128, 784, False, True),
              ("dW 512x784, k=128", 512, 784, 128, True, False),
              ("dX 128x784, k=512", 128, 784, 512, False, False)]
    rows = []
    for name, m, n, k, ta, tb in shapes[:3] if quick else shapes:
        a = rng.normal(size=(k, m) if ta else (m, k)).astype(np.float32)
        b = rng.normal(size=(n, k) if tb else (k, n)).astype(np.float32)
        out = np.empty((m, n), np.float32)
        A, B = (a.T if ta else a), (b.T if tb else b)
        reps = max(3, int(0.05 * 100e9 / (2 * m * n * k)))
        ours, theirs = [], []
        for _ in range(rounds):
            for fn, acc in ((lambda: bp.ops.matmul(a, b, out=out, trans_a=ta, trans_b=tb), ours),
                            (lambda: np.matmul(A, B, out=out), theirs)):
                time.sleep(PAUSE)
                fn()
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                acc.append((time.perf_counter() - start) / reps)
        g_ours = 2 * m * n * k / statistics.median(ours) / 1e9
        g_np = 2 * m * n * k / statistics.median(theirs) / 1e9
        rows.append(f"| {name} | {g_ours:.0f} | {g_np:.0f} | {g_ours / g_np:.2f} |")
    return ["| float32 product | backprop GFLOP/s | numpy GFLOP/s | ratio |", "|---|---|---|---|"] + rows


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", f"Python {platform.python_version()}",
             f"numpy {np.__version__}", f"backprop {bp.__version__} ({bp.simd_kernel()})"]
    try:
        import threadpoolctl
        blas = [f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})"
                for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        parts.append("BLAS " + ", ".join(blas))
    except ImportError:
        pass
    if available("torch"):
        import torch
        parts.append(f"torch {torch.__version__}")
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    if env:
        parts.append(f"environment {env}")
    return "; ".join(parts)


def set_threads(n):
    bp.set_num_threads(n)
    try:
        import threadpoolctl
        threadpoolctl.threadpool_limits(n)
    except ImportError:
        pass
    if available("torch"):
        import torch
        torch.set_num_threads(n)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=None, help="comma-separated; default: all but huge")
    parser.add_argument("--peers", default="numpy,torch,sklearn")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 rounds of short blocks")
    parser.add_argument("--no-matmul", action="store_true")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables here")
    args = parser.parse_args(argv)
    names = args.configs.split(",") if args.configs else [n for n in CONFIGS if n != "huge"]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    rounds = 3 if args.quick else args.rounds
    block = 0.02 if args.quick else 0.1
    set_threads(args.threads)
    peers = [p for p in args.peers.split(",") if p and available(p)]
    frameworks = {"backprop": backprop_step, **{p: PEERS[p] for p in peers}}

    lines = [f"Machine: {machine()}", f"Threads: {args.threads}; median of {rounds} interleaved rounds", ""]
    head = "| config | batch | target µs | backprop µs/step | samples/s |" + "".join(
        f" {p} µs | backprop speed-up vs {p} |" for p in peers)
    lines += [head, "|" + "---|" * (5 + 2 * len(peers))]
    print("\n".join(lines), flush=True)
    for name in names:
        config = CONFIGS[name]
        us = time_config(config, frameworks, rounds, block)
        row = (f"| {name} ({'-'.join(map(str, config.sizes))}) | {config.batch} | {TARGET_US[name]:,} | "
               f"{us['backprop']:,.1f} | {config.batch / us['backprop'] * 1e6:,.0f} |")
        row += "".join(f" {us[p]:,.1f} | {us[p] / us['backprop']:.2f}× |" for p in peers)
        lines.append(row)
        print(row, flush=True)
    if not args.no_matmul:
        table = matmul_table(rounds, args.quick)
        lines += [""] + table
        print("\n" + "\n".join(table), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
