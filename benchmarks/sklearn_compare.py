"""Fit time and score: backprop.estimators vs sklearn.neural_network, same parameters.

Each configuration fits scikit-learn's MLP and backprop's drop-in replacement with the
same parameters on the same split, for the same number of epochs (tol=0 and
n_iter_no_change=max_iter, so neither stops early), in interleaved rounds.  Every fit runs
in a fresh process: OpenBLAS's threads (scikit-learn) and OpenMP's (backprop) keep spinning
for a while after their work, and on a small machine they would slow the other library's
next fit.  The table
gives the median wall-clock fit time of the rounds, the speed-up, the median CPU time
(all threads of the process; it is what a fit costs when other jobs share the cores),
and the test scores.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/sklearn_compare.py
    python benchmarks/sklearn_compare.py --rounds 3 --configs digits friedman1

Unset OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on the machines here) so that NumPy, and
so scikit-learn, runs at its best.  On a machine shared with other jobs, the load average
printed before and after tells whether the numbers can be trusted; OMP_WAIT_POLICY=passive
keeps backprop's threads from spinning against other processes (see the README).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np

import backprop
from backprop import datasets, estimators


# backprop ships these datasets in float32; the rows without -float32 feed float64, as
# scikit-learn's own loaders (load_digits, fetch_openml) give it.
def _digits():
    X, y = datasets.load_digits()
    return datasets.train_test_split(X.astype(np.float64), y, seed=0, stratify=True)


def _mnist_sample():
    X, y = datasets.load_mnist_sample()
    return datasets.train_test_split(X.astype(np.float64), y, seed=0, stratify=True)


def _friedman1():
    from sklearn.datasets import make_friedman1
    X, y = make_friedman1(n_samples=5000, noise=0.5, random_state=0)
    y = (y - y.mean()) / y.std()
    return datasets.train_test_split(X, y, seed=0)


def _float32(load):
    """The same split with float32 features: both libraries then train in float32
    (scikit-learn keeps float32 input in float32, and so does backprop)."""
    def loaded():
        X_train, X_test, y_train, y_test = load()
        return X_train.astype(np.float32), X_test.astype(np.float32), y_train, y_test
    return loaded


# name: (task, data, parameters shared by both libraries).  Float64 data (the loaders'
# default) trains in float64 in both libraries; the -float32 rows feed float32.
CONFIGS = {
    "digits": ("classifier", _digits, dict(max_iter=100)),
    "digits-batch32": ("classifier", _digits, dict(max_iter=30, batch_size=32)),
    "mnist-sample": ("classifier", _mnist_sample, dict(max_iter=30)),
    "friedman1": ("regressor", _friedman1, dict(max_iter=100, learning_rate_init=0.01)),
    "digits-float32": ("classifier", _float32(_digits), dict(max_iter=100)),
    "mnist-sample-float32": ("classifier", _float32(_mnist_sample), dict(max_iter=30)),
    "friedman1-float32": ("regressor", _float32(_friedman1),
                          dict(max_iter=100, learning_rate_init=0.01)),
    # L-BFGS: each iteration is one pass over all rows (loss and gradient), at most
    # max_iter iterations (tol=0: neither stops on a small change)
    "digits-lbfgs": ("classifier", _digits, dict(solver="lbfgs", max_iter=200)),
    "friedman1-lbfgs": ("regressor", _friedman1, dict(solver="lbfgs", max_iter=300)),
}


def _fit_and_score(cls, params, data):
    X_train, X_test, y_train, y_test = data
    model = cls(random_state=0, tol=0.0, n_iter_no_change=params["max_iter"], **params)
    started, cpu = time.perf_counter(), time.process_time()
    model.fit(X_train, y_train)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return seconds, cpu, model.score(X_test, y_test), model.n_iter_


def _machine():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    try:
        flags = open("/proc/cpuinfo").read()
        avx512 = sorted({w for w in flags.split() if w.startswith("avx512")})
    except OSError:
        avx512 = []
    return (f"{model}, {os.cpu_count()} logical CPUs, avx512: {' '.join(avx512) or 'none'}, "
            f"backprop {backprop.__version__} ({backprop.simd_kernel()}, "
            f"{backprop.get_num_threads()} threads)")


def _estimator(library, task):
    if library == "backprop":
        module = estimators
    else:
        from sklearn import neural_network as module
    return module.MLPClassifier if task == "classifier" else module.MLPRegressor


def _one_fit(name, library):
    """Run in a child process: one fit, its numbers as JSON on stdout."""
    task, load, params = CONFIGS[name]
    data = load()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds, cpu, score, epochs = _fit_and_score(_estimator(library, task), params, data)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "score": score, "epochs": epochs,
                      "shape": list(data[0].shape)}))


def main():
    import sklearn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "LIBRARY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return _one_fit(*args.one)
    print(f"machine: {_machine()}; scikit-learn {sklearn.__version__}, numpy {np.__version__}")
    print(f"load average before: {os.getloadavg()}")
    print("| config | parameters | epochs | scikit-learn s | backprop s | speed-up "
          "| scikit-learn CPU s | backprop CPU s | CPU ratio | scikit-learn score "
          "| backprop score |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        runs = {"sklearn": [], "backprop": []}
        for _ in range(args.rounds):                # interleaved: both see the same load
            for library in runs:
                child = subprocess.run([sys.executable, __file__, "--one", name, library],
                                       capture_output=True, text=True, check=True)
                runs[library].append(json.loads(child.stdout))
        a, b = (statistics.median(r["seconds"] for r in runs[k]) for k in runs)
        c, d = (statistics.median(r["cpu"] for r in runs[k]) for k in runs)
        first = runs["backprop"][0]
        shown = ", ".join(f"{k}={v}" for k, v in CONFIGS[name][2].items() if k != "max_iter")
        dtype = "float32" if name.endswith("-float32") else "float64"
        print(f"| {name} {tuple(first['shape'])} {dtype} | {shown or 'defaults'} | "
              f"{first['epochs']} | "
              f"{a:.3f} | {b:.3f} | {a / b:.1f}x | {c:.3f} | {d:.3f} | {c / d:.1f}x | "
              f"{runs['sklearn'][0]['score']:.4f} | {first['score']:.4f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
