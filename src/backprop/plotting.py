"""Training curves as a picture (matplotlib is optional: ``pip install matplotlib``)."""
import numpy as np


def plot_history(history, path):
    """Three panels: train/validation loss, validation accuracy, and each layer's weight
    gradient norm on a log scale (vanishing or exploding gradients stand out)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    h = history.history
    epochs = np.arange(1, history.epochs + 1)
    fig, (loss_ax, acc_ax, grad_ax) = plt.subplots(1, 3, figsize=(15, 4))
    loss_ax.plot(epochs, h["loss"], label="train")
    if any(v is not None for v in h["val_loss"]):
        loss_ax.plot(epochs, [np.nan if v is None else v for v in h["val_loss"]], label="validation")
    loss_ax.set(title="loss", xlabel="epoch")
    loss_ax.legend()
    acc = [np.nan if v is None else v for v in h["val_accuracy"]]
    acc_ax.plot(epochs, acc, color="tab:green")
    acc_ax.set(title="validation accuracy", xlabel="epoch")
    norms = np.array(history.grad_norms, dtype=float)
    for layer in range(norms.shape[1] if norms.ndim == 2 else 0):
        grad_ax.semilogy(epochs, norms[:, layer], label=f"layer {layer}")
    grad_ax.set(title="weight-gradient norm per layer", xlabel="epoch")
    if norms.ndim == 2:
        grad_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
