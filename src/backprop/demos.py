"""Demonstrations of what the seeds describe, run on real data.

``python -m backprop demo vanishing-gradients [--plot FILE.png]``: four 20-layer networks
of width 64 on the built-in digits.  Backpropagation multiplies the error signal by each
layer's weights and activation derivative on its way down; with sigmoids (derivative at
most 1/4) it shrinks layer after layer, so the first layers barely learn.  ReLU keeps a
derivative of 1 where it is active; batch normalization keeps every layer's inputs at a
scale where the signal neither dies nor explodes; residual connections give the signal
a path around each block.  The demo prints, for each network, the weight-gradient norm
of every layer on the first batch and the test accuracy after a few epochs.

``python -m backprop demo vanishing-gradients-in-time [--plot FILE.png]``: a tanh RNN, an
LSTM and a GRU recalling the first of T symbols, T = 10, 50, 100: a recurrent network is
one layer per time step, so the same shrinking happens along time.  It prints the norm of
the loss's gradient with respect to the state after the first and the last step, and the
test accuracy.
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


# ---- vanishing gradients in time

SYMBOLS, HIDDEN = 4, 32
RECURRENT_VARIANTS = {"tanh RNN": lambda: bp.RNN(SYMBOLS, HIDDEN),
                      "LSTM": lambda: bp.LSTM(SYMBOLS, HIDDEN),
                      "GRU": lambda: bp.GRU(SYMBOLS, HIDDEN)}


def recall_the_first_symbol(n, length, seed=0):
    """n sequences of `length` one-hot symbols (of SYMBOLS), labelled by their first
    symbol: only a memory of the first step answers it (chance: 1 / SYMBOLS)."""
    ids = np.random.default_rng(seed).integers(0, SYMBOLS, (n, length))
    return np.eye(SYMBOLS)[ids], ids[:, 0]


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def state_gradients(net, x, y):
    """(dL/dh_t for every step t, dL/dx), each (batch, time, width), of a network [cell,
    LastStep, Dense(softmax)] (one layer, one direction, with biases) with the
    cross-entropy, in float64: the loss's gradient with respect to the cell's
    state at each step, through every later step.  The compiled core keeps no per-step
    state gradient, so this is backpropagation through time written out in NumPy from the
    cell's equations (see _recurrent.pxd) and the network's weights; its dL/dx is the
    core's input_grad (the tests hold it to that)."""
    cell, _, head = net.layers
    tanh_rnn = isinstance(cell, bp.RNN) and cell.nonlinearity == "tanh"
    if not (tanh_rnn or isinstance(cell, (bp.LSTM, bp.GRU))) or cell.num_layers != 1 \
            or cell.bidirectional or not cell.use_bias:
        raise ValueError(f"state_gradients takes a one-layer, one-direction tanh RNN, LSTM or "
                         f"GRU with biases, got {cell!r}")
    w_ih, w_hh, b_ih, b_hh = (np.asarray(getattr(cell, f"{name}_l0"), np.float64) for name in
                              ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    batch, length, _ = x.shape
    H = cell.hidden_size
    h = np.zeros((length + 1, batch, H))       # h[t + 1]: the state after step t
    c = np.zeros((length + 1, batch, H))
    kept = []
    for t in range(length):
        gi, gh = x[:, t] @ w_ih.T + b_ih, h[t] @ w_hh.T + b_hh
        if isinstance(cell, bp.LSTM):
            i, f, g, o = np.split(gi + gh, 4, axis=1)
            i, f, g, o = _sigmoid(i), _sigmoid(f), np.tanh(g), _sigmoid(o)
            c[t + 1] = f * c[t] + i * g
            h[t + 1] = o * np.tanh(c[t + 1])
            kept.append((i, f, g, o))
        elif isinstance(cell, bp.GRU):
            r = _sigmoid(gi[:, :H] + gh[:, :H])
            z = _sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
            n = np.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
            h[t + 1] = (1 - z) * n + z * h[t]
            kept.append((r, z, n, gh[:, 2 * H:]))
        else:                                     # the tanh RNN
            h[t + 1] = np.tanh(gi + gh)
    logits = h[length] @ np.asarray(head.weight, np.float64).T + np.asarray(head.bias, np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(batch), y] -= 1
    dh = p @ np.asarray(head.weight, np.float64) / batch     # dL/dh at the last step
    dc = np.zeros((batch, H))
    grads, dx = [None] * length, np.zeros_like(x, dtype=np.float64)
    for t in range(length - 1, -1, -1):
        grads[t] = dh
        if isinstance(cell, bp.LSTM):
            i, f, g, o = kept[t]
            tc = np.tanh(c[t + 1])
            dc = dc + dh * o * (1 - tc * tc)
            d_in = d_hid = np.concatenate([dc * g * i * (1 - i), dc * c[t] * f * (1 - f),
                                           dc * i * (1 - g * g), dh * tc * o * (1 - o)], axis=1)
            dc = dc * f
            direct = 0.0
        elif isinstance(cell, bp.GRU):
            r, z, n, hn = kept[t]
            dn = dh * (1 - z) * (1 - n * n)
            dz = dh * (h[t] - n) * z * (1 - z)
            dr = dn * hn * r * (1 - r)
            d_in, d_hid = np.concatenate([dr, dz, dn], 1), np.concatenate([dr, dz, dn * r], 1)
            direct = dh * z
        else:                                     # the tanh RNN
            d_in = d_hid = dh * (1 - h[t + 1] ** 2)
            direct = 0.0
        dx[:, t] = d_in @ w_ih
        dh = d_hid @ w_hh + direct
    return np.stack(grads, axis=1), dx


def vanishing_gradients_in_time(lengths=(10, 50, 100), epochs=10, train=2000, test=500,
                                batch_size=64, lr=1e-2, seed=0, plot=None, out=print):
    """Train a tanh RNN, an LSTM and a GRU (hidden size HIDDEN, PyTorch's initialisation)
    to recall the first of `length` symbols, for each length; returns {(variant, length):
    {"before": ||dL/dh_t|| for every step t on the first batch before any update, "after":
    the same after training, "accuracy": test accuracy}}."""
    results = {}
    out(f"recall the first of T symbols ({SYMBOLS} kinds: chance is {1 / SYMBOLS:.2f}); hidden "
        f"size {HIDDEN}, Adam lr={lr}, clip_grad_norm=1, batch {batch_size}, {epochs} epochs "
        f"on {train} sequences")
    out(f"|dL/dh_t|: the loss's gradient at the state after step t, on the first batch, "
        f"before training (and the ratio after)")
    out(f"{'network':<9} {'T':>4} {'|dL/dh_1|':>11} {'|dL/dh_T|':>11} {'first/last':>11} "
        f"{'after':>9} {'test accuracy':>14}")
    for length in lengths:
        x, y = recall_the_first_symbol(train + test, length, seed)
        for name, make in RECURRENT_VARIANTS.items():
            net = bp.Network([make(), bp.LastStep(), bp.Dense(HIDDEN, SYMBOLS, "softmax")],
                             loss="cross_entropy", optimizer=bp.Adam(lr=lr), seed=seed,
                             input_shape=(length, SYMBOLS))
            before = _norms(net, x[:batch_size], y[:batch_size])
            net.fit(x[:train], y[:train], epochs=epochs, batch_size=batch_size,
                    clip_grad_norm=1.0, progress=False)
            after = _norms(net, x[:batch_size], y[:batch_size])
            accuracy = net.evaluate(x[train:], y[train:])["accuracy"]
            results[name, length] = {"before": before, "after": after, "accuracy": accuracy}
            out(f"{name:<9} {length:>4} {before[0]:>11.3g} {before[-1]:>11.3g} "
                f"{before[0] / before[-1]:>11.2g} {after[0] / after[-1]:>9.2g} {accuracy:>14.4f}")
    if plot:
        _plot_in_time(results, plot)
        out(f"saved the plot to {plot}")
    return results


def _norms(net, x, y):
    """||dL/dh_t|| for every step t, over the batch and the units."""
    return list(np.linalg.norm(state_gradients(net, x, y)[0], axis=(0, 2)))


def _plot_in_time(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({length for _, length in results})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for (name, steps), result in results.items():
            if steps == length:
                line, = ax.semilogy(range(1, length + 1), result["before"],
                                    label=f"{name} (test accuracy {result['accuracy']:.2f})")
                ax.semilogy(range(1, length + 1), result["after"], linestyle="--",
                            color=line.get_color())
        ax.set_xlabel("time step t")
        ax.set_title(f"T = {length}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("|dL/dh_t|, first batch (dashed: after training)")
    fig.suptitle("Vanishing gradients in time: the loss's gradient at each step's state")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
