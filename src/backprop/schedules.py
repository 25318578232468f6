"""Learning-rate schedules: PyTorch's names and formulas, acting on ``optimizer.lr``.

Each schedule remembers the optimizer's initial learning rate and is stepped once per
epoch by ``fit`` (``ReduceLROnPlateau`` with the epoch's validation loss, or its
training loss when there is no validation data).
"""
import math


def _positive(name, value, *, upper=None):
    """`value` as a finite float > 0 (and < upper), else a ValueError naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0 and (upper is None or number < upper)):
        bound = f"in (0, {upper})" if upper is not None else "a finite number > 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return number


class Schedule:
    def __init__(self, optimizer):
        from backprop.optim import Optimizer
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"a schedule needs a backprop optimizer, got {optimizer!r}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.epoch = 0

    def step(self, metric=None):
        """Advance one epoch and set the optimizer's learning rate."""
        self.epoch += 1
        self.optimizer.lr = self.lr_at(self.epoch)

    def lr_at(self, epoch):
        raise NotImplementedError

    def state_dict(self):
        return {"base_lr": self.base_lr, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.base_lr, self.epoch = state["base_lr"], state["epoch"]


class StepLR(Schedule):
    """lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        if int(step_size) < 1:
            raise ValueError(f"step_size must be a positive integer, got {step_size!r}")
        super().__init__(optimizer)
        self.step_size, self.gamma = int(step_size), _positive("gamma", gamma)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(Schedule):
    """lr = base_lr * gamma ** epoch."""

    def __init__(self, optimizer, gamma):
        super().__init__(optimizer)
        self.gamma = _positive("gamma", gamma)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** epoch


class CosineAnnealingLR(Schedule):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2."""

    def __init__(self, optimizer, T_max, eta_min=0.0):
        if int(T_max) < 1:
            raise ValueError(f"T_max must be a positive integer, got {T_max!r}")
        super().__init__(optimizer)
        if not (math.isfinite(float(eta_min)) and 0 <= float(eta_min) <= self.base_lr):
            raise ValueError(f"eta_min must be in [0, lr = {self.base_lr}], got {eta_min!r}")
        self.T_max, self.eta_min = int(T_max), float(eta_min)

    def lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (
            1 + math.cos(math.pi * epoch / self.T_max)) / 2


class ReduceLROnPlateau(Schedule):
    """Multiply lr by `factor` once the metric has not improved (by more than
    `threshold`, relative) for `patience` epochs; never below `min_lr`."""

    def __init__(self, optimizer, factor=0.1, patience=10, threshold=1e-4, min_lr=0.0):
        factor = _positive("factor", factor, upper=1)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {patience!r}")
        for name, value in (("threshold", threshold), ("min_lr", min_lr)):
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        super().__init__(optimizer)
        self.factor, self.patience = factor, patience
        self.threshold, self.min_lr = float(threshold), float(min_lr)
        self.best, self.bad_epochs = math.inf, 0

    def step(self, metric=None):
        if metric is None:
            raise ValueError("ReduceLROnPlateau.step needs the monitored metric")
        self.epoch += 1
        if metric < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = metric, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.optimizer.lr = max(self.optimizer.lr * self.factor, self.min_lr)
            self.bad_epochs = 0

    def state_dict(self):
        return {**super().state_dict(), "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
