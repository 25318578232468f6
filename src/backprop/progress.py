"""Progress reporting for fit: a tqdm bar when tqdm is installed, plain lines otherwise."""
import sys

try:
    from tqdm.auto import tqdm
except ImportError:     # tqdm is optional (pip install tqdm)
    tqdm = None


def wanted(progress):
    """progress=None means: show it when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


class Progress:
    """One bar over every batch of every epoch, its postfix updated once per epoch."""

    def __init__(self, total_steps, enabled):
        self.enabled = enabled
        self.bar = tqdm(total=total_steps, unit="batch", file=sys.stderr, dynamic_ncols=True,
                        leave=True) if enabled and tqdm else None

    def batches(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def epoch(self, epoch, epochs, logs):
        if not self.enabled:
            return
        parts = [f"loss {logs['loss']:.4f}"]
        if logs.get("val_loss") is not None:
            parts.append(f"val_loss {logs['val_loss']:.4f}")
        if logs.get("val_accuracy") is not None:
            parts.append(f"val_acc {logs['val_accuracy']:.4f}")
        parts.append(f"{logs['samples_per_second']:,.0f} samples/s")
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}/{epochs}")
            self.bar.set_postfix_str("  ".join(parts))
        else:
            print(f"epoch {epoch}/{epochs}  " + "  ".join(parts), file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
