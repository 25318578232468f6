"""Train for many steps and report how much resident memory grew.

    python tools/endurance.py [--steps 20000]

Reads VmRSS from /proc/self/status (Linux).  After a warm-up, the training step
allocates nothing, so the growth should stay near zero (the limit is 5 MB).
"""
import argparse
import time

import numpy as np

import backprop as bp


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args()
    X, y = bp.datasets.load_digits()
    net = bp.Network([bp.Dense(64, 128, "relu"), bp.Dense(128, 10, "softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(), seed=0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    for i in range(200):                                     # warm-up
        net.train_step(X, y, rows=order[(i * 32) % 1760:(i * 32) % 1760 + 32])
    start, started = rss_mb(), time.perf_counter()
    for i in range(args.steps):
        j = (i * 32) % 1760
        net.train_step(X, y, rows=order[j:j + 32])
    grown = rss_mb() - start
    print(f"{args.steps} steps in {time.perf_counter() - started:.1f} s; resident memory "
          f"{start:.1f} MB -> {start + grown:.1f} MB (grew {grown:+.2f} MB)")
    if grown >= 5:
        raise SystemExit("resident memory grew by 5 MB or more")


if __name__ == "__main__":
    main()
