"""Train the same recipe in backprop and PyTorch; report test accuracy and wall time.

    python benchmarks/time_to_accuracy.py [--datasets digits,mnist-sample,fashion-mnist] [--threads 2]

Same architecture (relu hidden layers, softmax output), Adam with PyTorch's defaults and
the same learning rate, batch size, epochs and train/test split; each framework shuffles
with its own generator.  Fashion-MNIST is used only when Debian's dataset-fashion-mnist
is installed.  PyTorch is optional.
"""
import argparse
import time

import numpy as np

import backprop as bp
from backprop import datasets

RECIPES = {   # dataset: (hidden sizes, epochs, batch size, learning rate)
    "digits": ((128,), 30, 32, 1e-3),
    "mnist-sample": ((256,), 10, 64, 1e-3),
    "fashion-mnist": ((256, 128), 10, 128, 1e-3),
}


def load(name):
    if name == "fashion-mnist":
        return datasets.load_fashion_mnist()
    X, y = datasets.load_digits() if name == "digits" else datasets.load_mnist_sample()
    X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, test_size=0.2, seed=0,
                                                                 stratify=True)
    return (X_train, y_train), (X_test, y_test)


def run_backprop(sizes, epochs, batch, lr, train, test):
    layers = [bp.Dense(a, b, "relu") for a, b in zip(sizes[:-2], sizes[1:-1])]
    layers.append(bp.Dense(sizes[-2], sizes[-1], "softmax"))
    net = bp.Network(layers, loss="cross_entropy", optimizer=bp.Adam(lr=lr), seed=0)
    start = time.perf_counter()
    net.fit(*train, epochs=epochs, batch_size=batch, progress=False)
    seconds = time.perf_counter() - start
    return net.evaluate(*test)["accuracy"], seconds


def run_torch(sizes, epochs, batch, lr, train, test):
    import torch
    torch.manual_seed(0)
    mods = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        mods.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*mods)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    X, y = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), batch):
            rows = order[i:i + batch]
            opt.zero_grad()
            loss_fn(model(X[rows]), y[rows]).backward()
            opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        predicted = model(torch.from_numpy(test[0])).argmax(dim=1).numpy()
    return float(np.mean(predicted == test[1])), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,mnist-sample,fashion-mnist")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bp.set_num_threads(args.threads)
    runners = {"backprop": run_backprop}
    try:
        import torch
        torch.set_num_threads(args.threads)
        runners["torch"] = run_torch
    except ImportError:
        pass
    print("| dataset | recipe | " + " | ".join(f"{r} accuracy | {r} seconds" for r in runners) + " |")
    print("|---|---|" + "---|---|" * len(runners))
    for name in args.datasets.split(","):
        try:
            train, test = load(name)
        except FileNotFoundError as e:
            print(f"| {name} | skipped: {e} |")
            continue
        hidden, epochs, batch, lr = RECIPES[name]
        sizes = (train[0].shape[1],) + hidden + (10,)
        cells = []
        for run in runners.values():
            accuracy, seconds = run(sizes, epochs, batch, lr, train, test)
            cells += [f"{accuracy:.4f}", f"{seconds:.2f}"]
        recipe = f"{'-'.join(map(str, sizes))}, Adam {lr}, {epochs} epochs, batch {batch}"
        print(f"| {name} | {recipe} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
