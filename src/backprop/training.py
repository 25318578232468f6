"""The training loop (fit), predictions and evaluation, batched over datasets of any size.

Minibatches are never copied out of the dataset: each step passes a slice of a shuffled
index to ``train_step(X, y, rows=...)``, which gathers those rows straight into the
network's reused input buffer in compiled code.
"""
import contextlib
import time

import numpy as np

from backprop.progress import Progress, wanted
from backprop.schedules import ReduceLROnPlateau



class History:
    """What happened in each epoch of training, like Keras's ``History``.

    ``history.history`` maps each metric to a list with one value per epoch:
    ``loss`` (mean training loss), ``val_loss`` and ``val_accuracy`` (None without
    validation data), ``lr``, ``seconds`` and ``samples_per_second``.  Each metric is
    also an attribute (``history.loss``).  ``grad_norms`` holds, per epoch, the norm of
    each weight's gradient on the epoch's last batch (``net.weight_names()`` names them):
    a layer whose norm falls towards zero (vanishing) or grows without bound (exploding)
    shows at a glance in ``plot``.
    """

    METRICS = ("loss", "val_loss", "val_accuracy", "lr", "seconds", "samples_per_second")

    def __init__(self, history=None, grad_norms=None):
        self.history = {name: list((history or {}).get(name, [])) for name in self.METRICS}
        self.grad_norms = [list(row) for row in (grad_norms or [])]

    def __getattr__(self, name):
        if name in History.METRICS:
            return self.history[name]
        raise AttributeError(name)

    @property
    def epochs(self):
        return len(self.history["loss"])

    def append(self, logs, grad_norms):
        for name in self.METRICS:
            self.history[name].append(_finite_or_none(logs.get(name)))
        self.grad_norms.append([_finite_or_none(n) for n in grad_norms])

    def to_dict(self):
        return {"history": self.history, "grad_norms": self.grad_norms}

    @classmethod
    def from_dict(cls, record):
        """A History from `to_dict`'s output, every value checked (checkpoints)."""
        if not isinstance(record, dict) or set(record) - {"history", "grad_norms"}:
            raise ValueError(f"not a training history: {record!r:.100}")
        history, norms = record.get("history", {}), record.get("grad_norms", [])
        if not isinstance(history, dict) or set(history) - set(cls.METRICS) \
                or not isinstance(norms, list):
            raise ValueError("not a training history")
        columns = list(history.values()) + norms
        if not all(isinstance(column, list) for column in columns) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                              and np.isfinite(v)) for column in columns for v in column):
            raise ValueError("a training history holds lists of finite numbers (or None)")
        return cls(history, norms)

    def plot(self, path):
        """Save loss, accuracy and per-layer gradient-norm curves to an image (matplotlib)."""
        from backprop.plotting import plot_history
        plot_history(self, path)

    def __repr__(self):
        last = {k: v[-1] for k, v in self.history.items() if v}
        return f"History(epochs={self.epochs}, last={last})"


def _finite_or_none(value):
    return float(value) if value is not None and np.isfinite(value) else None


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class mode:
    """Run a block in train (True) or eval (False) mode, restoring the mode found."""

    def __init__(self, net, training):
        self.net, self.training = net, training

    def __enter__(self):
        self.saved = self.net.training
        self.net.train(self.training)

    def __exit__(self, *exc):
        self.net.train(self.saved)


def _check_dataset(net, X, y, name="X"):
    X = np.asarray(X)
    if X.shape[1:] != net.input_shape:
        raise ValueError(f"{name} must have shape (n_samples, {', '.join(map(str, net.input_shape))})"
                         f", got {X.shape}")
    if len(X) == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    if y is not None and len(y) != len(X):
        raise ValueError(f"{name} and its targets must have the same length, got {len(X)} and {len(y)}")
    return X


def minibatches(n, batch_size, fold_single=False):
    """(start, stop) of each minibatch of `n` rows, in order.  With `fold_single`, a last
    minibatch of one row joins the one before it, which then has batch_size + 1 rows:
    BatchNorm in train mode cannot normalise one row (its batch variance is 0), and
    dropping the row (PyTorch's drop_last) would leave it out of every unshuffled epoch."""
    starts = list(range(0, n, batch_size))
    if fold_single and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))


def refuses_one_row(net):
    """Whether `net` refuses a train-mode batch of one row: a BatchNorm over rows of
    features, whose variance of one value is 0 (the layers declare it: over images, one
    sample has many values per channel and is fine)."""
    return net._plan.min_train_batch > 1


@contextlib.contextmanager
def undone_if_refused(net):
    """Run one training step made of several calls (forward, backward, step) as a whole:
    if the block raises, put back what the step had already moved, BatchNorm's running
    statistics and Dropout's pass count, and zero the gradients it had accumulated (a
    step starts from zero gradients), so a refused step changes nothing."""
    passes = net._engine.passes
    buffers = net.buffers.copy() if net.buffers.size else None
    try:
        yield
    except BaseException:
        net.zero_grad()
        net._engine.passes = passes
        if buffers is not None:
            net.buffers[...] = buffers
        raise


def check_fit_arguments(net, X, y, epochs, batch_size, validation_data, validation_split,
                        clip_grad_norm, early_stopping):
    """Validate fit's arguments; returns (X, y, batch_size, validation_data, early_stopping)
    with the validation split taken from the end of X.  Shared by ``fit`` and
    ``distributed.fit``."""
    X = _check_dataset(net, X, y)
    y = np.asarray(y)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    batch_size = _positive("batch_size", batch_size)
    if not 0 <= validation_split < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if validation_split and validation_data is None:
        cut = len(X) - max(1, int(round(len(X) * validation_split)))
        if cut < 1:
            raise ValueError(f"validation_split={validation_split} leaves no training rows "
                             f"out of {len(X)}")
        X, y, validation_data = X[:cut], y[:cut], (X[cut:], y[cut:])
    check_values(net, (X, y), "training data")
    if validation_data is not None:
        _check_dataset(net, validation_data[0], validation_data[1], "validation_data[0]")
        check_values(net, validation_data, "validation_data")
    if clip_grad_norm is not None and not (clip_grad_norm > 0 and np.isfinite(clip_grad_norm)):
        raise ValueError(f"clip_grad_norm must be a finite number > 0, got {clip_grad_norm}")
    if early_stopping is not None:
        early_stopping = _positive("early_stopping (patience in epochs)", early_stopping)
    return X, y, batch_size, validation_data, early_stopping


def check_values(net, data, name):
    """Refuse (X, y) now if the core would refuse any of its batches (NaN, values too
    large for the network's dtype, labels or ids out of range, ...), with the core's own
    message: its checks run over the whole dataset, copying it a chunk at a time into
    buffers of their own (one read of the data, no pass of the network)."""
    try:
        net._engine.validate(*data)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{name}: {error}") from None


def fit(net, X, y, *, epochs=10, batch_size=32, shuffle=True, validation_data=None,
        validation_split=0.0, early_stopping=None, lr_schedule=None, clip_grad_norm=None,
        progress=None, callbacks=(), comm=None):
    """Train `net` on (X, y); see ``Network.fit``.

    Every argument is checked before the first step, validation data included (its
    values too, by an evaluation), so a refused call changes nothing.  When the network
    holds BatchNorm and the last minibatch of an epoch would have one row, that row
    joins the minibatch before it (see `minibatches`).
    """
    if comm is not None:     # data-parallel over MPI: the same loop, with collectives
        from backprop import distributed
        return distributed.fit(net, X, y, comm, epochs=epochs, batch_size=batch_size,
                               shuffle=shuffle, validation_data=validation_data,
                               validation_split=validation_split, early_stopping=early_stopping,
                               lr_schedule=lr_schedule, clip_grad_norm=clip_grad_norm,
                               progress=progress, callbacks=callbacks)
    X, y, batch_size, validation_data, early_stopping = check_fit_arguments(
        net, X, y, epochs, batch_size, validation_data, validation_split, clip_grad_norm,
        early_stopping)
    n, rng = len(X), net.rng
    batches = minibatches(n, batch_size, fold_single=refuses_one_row(net))
    bar = Progress(epochs * len(batches), wanted(progress))
    stopper = EarlyStopping(early_stopping)
    last_epoch = net.epoch + epochs
    net.stop_training = False
    try:
        with mode(net, True):
            for _ in range(epochs):
                epoch = net.epoch + 1
                started = time.perf_counter()
                order = rng.permutation(n) if shuffle else np.arange(n)
                total, norms = 0.0, []
                for step, (start, stop) in enumerate(batches):
                    rows = order[start:stop]
                    loss, norms = _train_batch(net, X, y, rows, clip_grad_norm, epoch, step,
                                               keep_norms=stop == n)
                    total += loss * len(rows)
                    bar.batches(1)
                seconds = time.perf_counter() - started
                logs = {"loss": total / n, "lr": net.optimizer.lr, "seconds": seconds,
                        "samples_per_second": n / seconds if seconds > 0 else None,
                        "val_loss": None, "val_accuracy": None}
                if validation_data is not None:
                    scores = evaluate(net, *validation_data)
                    logs["val_loss"], logs["val_accuracy"] = scores["loss"], scores.get("accuracy")
                net.epoch = epoch
                close_epoch(net, epoch, last_epoch, logs, norms, bar, lr_schedule, callbacks)
                stopper.update(net, logs["val_loss"])
                if net.stop_training:
                    break
    finally:
        bar.close()
    return net.history


def close_epoch(net, epoch, last_epoch, logs, norms, bar, lr_schedule, callbacks):
    """What follows every epoch: history, progress, the schedule's step, the callbacks
    (shared by ``fit`` and ``distributed.fit``)."""
    net.history.append(logs, norms)
    bar.epoch(epoch, last_epoch, logs)
    if lr_schedule is not None:
        monitored = logs["val_loss"] if logs["val_loss"] is not None else logs["loss"]
        lr_schedule.step(monitored if isinstance(lr_schedule, ReduceLROnPlateau) else None)
    for callback in callbacks:
        callback(net, epoch, logs)


class EarlyStopping:
    """Stop once the validation loss has not improved for `patience` epochs (None: never)
    and put back the weights and running statistics of the best epoch."""

    def __init__(self, patience):
        self.patience, self.best_loss, self.best, self.waited = patience, np.inf, None, 0

    def update(self, net, val_loss):
        if self.patience is None or val_loss is None:
            return
        if val_loss < self.best_loss:                  # never true for NaN
            self.best_loss, self.waited = val_loss, 0
            self.best = (net.params.copy(), net.buffers.copy())
            return
        self.waited += 1
        if self.waited >= self.patience:
            if self.best is not None:                  # keep the best epoch's weights
                net.params[...], net.buffers[...] = self.best
            net.stop_training = True


def _train_batch(net, X, y, rows, clip_grad_norm, epoch, step, keep_norms=False):
    """One train_step on X[rows], y[rows]: its loss, and (keep_norms) the gradient norm of
    each weight matrix, taken inside the step before the update."""
    clip = 0.0 if clip_grad_norm is None else float(clip_grad_norm)
    try:
        loss = net._engine.train_step(X, y, net.optimizer, rows, clip, keep_norms)
        return loss, net._engine.weight_grad_norms() if keep_norms else []
    except FloatingPointError as error:
        # The step's message says what was refused (the loss, the gradients, or an update
        # that overflowed) and what the weights are now.  When it was the loss or the
        # gradients, the step's forward is kept: where it stopped being finite helps.
        message = f"training diverged at epoch {epoch}, step {step}: {error}"
        if net._engine.has_forward:
            message += (f"; first non-finite layer: {_first_nonfinite_layer(net)}.  Lower the "
                        "learning rate or set clip_grad_norm")
        raise FloatingPointError(message) from None


def _first_nonfinite_layer(net):
    """The first layer whose output in the refused step is not finite (read from the
    step's own activations: running it again would move BatchNorm and Dropout on)."""
    engine = net._engine
    for i, layer in enumerate(net.layers):
        if not np.isfinite(engine.slot_value(net._plan.layer_slot[id(layer)])).all():
            return f"layers[{i}] ({layer!r})"
    return "none (the loss itself overflowed)"


def predict_proba(net, X, batch_size=1024):
    """The network's outputs, computed batch by batch (bounded memory for any size), in
    eval mode."""
    X = _check_dataset(net, X, None)
    batch_size = _positive("batch_size", batch_size)
    with mode(net, False):
        return np.concatenate([net.forward(X[start:stop])
                               for start, stop in minibatches(len(X), batch_size)])


def predict(net, X, batch_size=1024):
    """Class labels for classifiers (softmax: argmax; sigmoid: probability > 0.5);
    the raw outputs otherwise."""
    out = predict_proba(net, X, batch_size)
    if net.loss == "cross_entropy" or net.output_activation == "softmax":
        return out.argmax(axis=1)
    if net.loss == "binary_cross_entropy":
        labels = (out > 0.5).astype(np.int64)
        return labels.ravel() if labels.shape[1] == 1 else labels
    return out


def evaluate(net, X, y, batch_size=1024):
    """{"loss": mean loss, "accuracy": fraction correct (classifiers only)}."""
    X = _check_dataset(net, X, y)
    y = np.asarray(y)
    batch_size = _positive("batch_size", batch_size)
    if net.loss is None:
        raise RuntimeError("evaluate needs a network with a loss")
    total, correct = 0.0, 0.0
    with mode(net, False):
        for start, stop in minibatches(len(X), batch_size):
            xb, yb = X[start:stop], y[start:stop]
            total += net.loss_of(xb, yb) * len(xb)
            if net.loss_spec.classifier:
                correct += _correct(net, net._engine.output(), yb)
    scores = {"loss": total / len(X)}
    if net.loss_spec.classifier:
        scores["accuracy"] = correct / len(X)
    return scores


def _correct(net, out, y):
    if net.loss == "cross_entropy":
        truth = y if y.ndim == 1 else y.argmax(axis=1)
        return float((out.argmax(axis=1) == truth).sum())
    y = y.reshape(out.shape)
    return float(((out > 0.5) == (y > 0.5)).mean(axis=1).sum())
