"""Train the same recipe with backprop's `fit` and an equivalent PyTorch loop; report the
wall time of training and the test accuracy of each.

    python benchmarks/time_to_accuracy.py          # every recipe
    python benchmarks/time_to_accuracy.py --recipes fashion-mnist --repeats 3 --threads 2
    python benchmarks/time_to_accuracy.py --recipes fashion-mnist-cnn,mnist-sample-cnn
    python benchmarks/time_to_accuracy.py --recipes mnist-sample-lstm
    python benchmarks/time_to_accuracy.py --recipes fashion-mnist,mnist-sample --bfloat16

The recipes are configs.RECIPES: fashion-mnist is issue 10's (784-256-128-10, relu, batch
128, float32, Adam lr 1e-3, 8 epochs); fashion-mnist-cnn and mnist-sample-cnn are issue
16's small CNN (two conv-relu-maxpool stages, a hidden Dense of 128), which it wants at
>= 0.91 and >= 0.97 test accuracy, fed NCHW images (n, 1, 28, 28); mnist-sample-lstm is
issue 18's LSTM(28, 128) reading each image row by row, fed batch-first sequences
(n, 28, 28), the last step's state classified.  The MNIST sample and
digits are split 80/20, stratified, seed 0.  Both frameworks start from the same initial
weights (networks.initial_weights), train every epoch on a fresh shuffle of the training
set (each with its own seeded generator) including the last, partial batch, and are timed
from the first step to the last (data loading and evaluation excluded).  The PyTorch loop
is what a careful user writes without a DataLoader: a shuffled index per epoch, X[rows]
per batch, zero_grad(set_to_none=True), torch.optim.Adam (its fused implementation, which
torch's docs rank fastest; --torch-optim picks another).  Both evaluate the test set in
batches of EVAL_BATCH rows.  Repeats are interleaved and the median time is reported.

With --bfloat16 each recipe also runs with backprop's products in bfloat16
(``net.precision = "bfloat16"``) and the PyTorch loop's forward and loss under
``torch.autocast("cpu", dtype=torch.bfloat16)``, PyTorch's mixed-precision recipe;
everything else (weights, Adam, the data) stays float32 in both.

Fashion-MNIST comes from Debian's dataset-fashion-mnist (apt-get install -y
dataset-fashion-mnist); without it that row says so.  PyTorch is optional.  Like
compare.py, the script runs without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchenv  # noqa: E402  (imports nothing heavy: must run before NumPy loads)

if __name__ == "__main__":
    benchenv.drop_openblas_overrides()

import argparse  # noqa: E402
from functools import partial  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import backprop as bp  # noqa: E402
from backprop import datasets  # noqa: E402
from configs import RECIPES  # noqa: E402
from networks import (TORCH_IMPLEMENTATIONS, backprop_network, initial_weights,  # noqa: E402
                      torch_model, torch_optimizer)

PAUSE = 0.5     # seconds between runs, so the previous library's spinning threads stop
EVAL_BATCH = 1024   # test rows per forward pass, in both frameworks


def load(name):
    """(X_train, y_train), (X_test, y_test), float32 rows of features and int64 labels."""
    if name == "fashion-mnist":
        return datasets.load_fashion_mnist()
    X, y = datasets.load_digits() if name == "digits" else datasets.load_mnist_sample()
    X_train, X_test, y_train, y_test = datasets.train_test_split(
        X.astype(np.float32), y, test_size=0.2, seed=0, stratify=True)
    return (X_train, y_train), (X_test, y_test)


def shaped(data, config):
    """The samples as `config` takes them: rows of 784 pixels become (1, 28, 28) images
    for a CNN, or 28 steps of 28 pixels for an LSTM (views: the pixels are stored row by
    row)."""
    return tuple((X.reshape(len(X), *config.input_shape), y) for X, y in data)


def run_backprop(config, epochs, train, test, precision="float32"):
    net = backprop_network(config, initial_weights(config), optimizer=bp.Adam(lr=config.lr))
    net.precision = precision
    start = time.perf_counter()
    net.fit(*train, epochs=epochs, batch_size=config.batch, shuffle=True, progress=False)
    seconds = time.perf_counter() - start
    return net.evaluate(*test, batch_size=EVAL_BATCH)["accuracy"], seconds


def run_torch(config, epochs, train, test, implementation, autocast=False):
    import torch
    model = torch_model(config, initial_weights(config))
    opt = torch_optimizer("Adam", model, config.lr, implementation)
    loss_fn = torch.nn.CrossEntropyLoss()
    X, y = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    generator = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=generator)
        for i in range(0, len(X), config.batch):
            rows = order[i:i + config.batch]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(model(X[rows]), y[rows])
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    X_test = torch.from_numpy(test[0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        predicted = torch.cat([model(X_test[i:i + EVAL_BATCH]).argmax(dim=1)
                               for i in range(0, len(X_test), EVAL_BATCH)]).numpy()
    return float(np.mean(predicted == test[1])), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", "--datasets", default=",".join(RECIPES),
                        help=f"comma-separated, from {', '.join(RECIPES)} (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-optim", choices=TORCH_IMPLEMENTATIONS, default="fused",
                        help="torch.optim.Adam's implementation (default: fused)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved runs per framework; the median time is reported")
    parser.add_argument("--bfloat16", action="store_true",
                        help="also train with bfloat16 products (backprop) and under "
                             "torch.autocast(bfloat16) (PyTorch)")
    args = parser.parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")

    runners = {"backprop": run_backprop}
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  (loaded before the limits, so they reach its runtime)
        runners["torch"] = partial(run_torch, implementation=args.torch_optim)
    if args.bfloat16:
        runners["backprop bf16"] = partial(run_backprop, precision="bfloat16")
        if "torch" in runners:
            runners["torch autocast"] = partial(run_torch, implementation=args.torch_optim,
                                                autocast=True)
    how = benchenv.limit_threads(args.threads, [r for r in runners if " " not in r],
                                 args.torch_optim)
    print(benchenv.machine_line())
    print(benchenv.load_line("at the start"))
    print(benchenv.environment_note())
    print(f"Threads ({args.threads}): " + "; ".join(f"{k}: {v}" for k, v in how.items()))
    if args.bfloat16:
        print(f"bfloat16 products: {bp.bfloat16_kernel()}")
    if "torch" not in runners:
        print("PyTorch not installed: backprop alone")
    print(f"Median training time of {args.repeats} interleaved runs; accuracy on the test set\n")
    head = "| recipe | network and training |" + "".join(f" {r} accuracy | {r} seconds |"
                                                          for r in runners)
    ratios = [(a, b) for a, b in (("torch", "backprop"), ("torch autocast", "backprop bf16"),
                                  ("backprop", "backprop bf16")) if a in runners and b in runners]
    head += "".join(f" {a} ÷ {b} time |" for a, b in ratios)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    loaded = {}
    for name in names:
        recipe = RECIPES[name]
        config, epochs = recipe.config, recipe.epochs
        what = (f"{recipe.dataset}: {config.describe()}, batch {config.batch}, "
                f"Adam {config.lr:g}, {epochs} epochs, float32 weights")
        try:
            if recipe.dataset not in loaded:
                loaded[recipe.dataset] = load(recipe.dataset)
        except FileNotFoundError as e:
            print(f"| {name} | {what} | not run: {e} |", flush=True)
            continue
        train, test = shaped(loaded[recipe.dataset], config)
        results = {r: [] for r in runners}
        for _ in range(args.repeats):
            for r, run in runners.items():
                time.sleep(PAUSE)
                results[r].append(run(config, epochs, train, test))
        cells, seconds = [], {}
        for r, runs in results.items():
            accuracies = sorted({round(a, 4) for a, _ in runs})
            seconds[r] = statistics.median(s for _, s in runs)
            accuracy = (f"{accuracies[0]:.4f}" if len(accuracies) == 1
                        else f"{accuracies[0]:.4f}-{accuracies[-1]:.4f}")
            cells += [accuracy, f"{seconds[r]:.2f}"]
        cells += [f"{seconds[a] / seconds[b]:.2f}×" for a, b in ratios]
        print(f"| {name} | {what} | " + " | ".join(cells) + " |", flush=True)
    print("\n" + benchenv.load_line("at the end"))


if __name__ == "__main__":
    main()
