"""Demonstrations of what the seeds describe, run on real data.

``python -m backprop demo vanishing-gradients [--plot FILE.png]``: four 20-layer networks
of width 64 on the built-in digits.  Backpropagation multiplies the error signal by each
layer's weights and activation derivative on its way down; with sigmoids (derivative at
most 1/4) it shrinks layer after layer, so the first layers barely learn.  ReLU keeps a
derivative of 1 where it is active; batch normalization keeps every layer's inputs at a
scale where the signal neither dies nor explodes; residual connections give the signal
a path around each block.  The demo prints, for each network, the weight-gradient norm
of every layer on the first batch and the test accuracy after a few epochs.
"""
import numpy as np

import backprop as bp
from backprop.datasets import load_digits, standardize, train_test_split

DEPTH, WIDTH, CLASSES = 20, 64, 10


def _plain(activation):
    layers = [bp.Dense(64, WIDTH, activation)]
    layers += [bp.Dense(WIDTH, WIDTH, activation) for _ in range(DEPTH - 2)]
    return layers


def _batch_norm():
    layers = []
    for i in range(DEPTH - 1):
        layers += [bp.Dense(64 if i == 0 else WIDTH, WIDTH, bias=False), bp.BatchNorm(WIDTH),
                   bp.Activation("relu")]
    return layers


def _residual():
    # 1 + 9 blocks of 2 = 19 hidden Dense layers; each block adds its result to its input.
    # The blocks start with Glorot's smaller weights: with He's, every block would double
    # the signal's variance and nine of them overflow it within a few steps.
    layers = [bp.Dense(64, WIDTH, "relu")]
    for _ in range((DEPTH - 2) // 2):
        layers += [bp.Residual(bp.Dense(WIDTH, WIDTH, "relu", init="xavier"),
                               bp.Dense(WIDTH, WIDTH, init="xavier")),
                   bp.Activation("relu")]
    return layers


VARIANTS = {"sigmoid": lambda: _plain("sigmoid"), "relu": lambda: _plain("relu"),
            "relu + batch norm": _batch_norm, "relu + residual": _residual}


def vanishing_gradients(epochs=5, batch_size=64, lr=0.05, seed=0, plot=None, out=print):
    """Train the four variants; returns {variant: {"norms": [...], "accuracy": float}}.

    Every variant has 20 Dense layers (19 hidden and the softmax output) and trains with
    the same SGD (momentum 0.9) on the same split.  `norms` are the weight-gradient norms
    of those layers, input side first, on the first batch, before any update."""
    X, y = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(X, y, stratify=True, seed=seed)
    X_train, X_test = standardize(X_train, X_test)
    results = {}
    out(f"{DEPTH} Dense layers of width {WIDTH} on the digits ({len(X_train)} training rows), "
        f"SGD lr={lr} momentum 0.9, batch {batch_size}, {epochs} epochs")
    out(f"{'network':<18} {'|dW| first layer':>16} {'|dW| last layer':>16} {'first/last':>11} "
        f"{'test accuracy':>14}")
    for name, hidden in VARIANTS.items():
        net = bp.Network(hidden() + [bp.Dense(WIDTH, CLASSES, "softmax")], loss="cross_entropy",
                         optimizer=bp.SGD(lr=lr, momentum=0.9), seed=seed)
        first = np.random.default_rng(seed).permutation(len(X_train))[:batch_size]
        net.compute_gradients(X_train, y_train, rows=first)
        norms = list(net.layer_grad_norms().values())
        net.zero_grad()
        net.fit(X_train, y_train, epochs=epochs, batch_size=batch_size, progress=False)
        accuracy = net.evaluate(X_test, y_test)["accuracy"]
        results[name] = {"norms": norms, "accuracy": accuracy}
        out(f"{name:<18} {norms[0]:>16.3g} {norms[-1]:>16.3g} {norms[0] / norms[-1]:>11.2g} "
            f"{accuracy:>14.4f}")
    if plot:
        _plot(results, plot)
        out(f"saved the plot to {plot}")
    return results


def _plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        norms = result["norms"]
        ax.semilogy(range(1, len(norms) + 1), norms, marker="o", markersize=3,
                    label=f"{name} (test accuracy {result['accuracy']:.2f})")
    ax.set_xlabel("layer (1 = next to the input)")
    ax.set_ylabel("weight-gradient norm, first batch")
    ax.set_title(f"Vanishing gradients in {DEPTH}-layer networks, and their cures")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
