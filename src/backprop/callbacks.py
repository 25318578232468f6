"""Callbacks for ``Network.fit``: ``callback(net, epoch, logs)`` after each epoch."""
import warnings

import numpy as np


class GradientMonitor:
    """Warn when a layer's gradient vanishes or explodes.

    After each epoch it reads the gradient norm of every weight the layers declare (Dense
    and convolution kernels, embedding tables) on the epoch's last batch
    (``net.history.grad_norms``) and issues a ``UserWarning``, naming the layer and the
    ratio, when a weight's norm is below ``vanishing`` times the largest one's (the signal
    no longer reaches it) or above ``exploding``.

    Parameters
    ----------
    vanishing : float, default 1e-4
    exploding : float, default 1e3

    Examples
    --------
    >>> net.fit(X, y, epochs=5, callbacks=[bp.GradientMonitor()])   # doctest: +SKIP
    """

    def __init__(self, vanishing=1e-4, exploding=1e3):
        if not 0 < vanishing < 1 or not exploding > 0:
            raise ValueError(f"GradientMonitor needs 0 < vanishing < 1 and exploding > 0, got "
                             f"{vanishing!r} and {exploding!r}")
        self.vanishing, self.exploding = float(vanishing), float(exploding)
        self.warnings = []        # (epoch, message), for inspection after fit

    def __call__(self, net, epoch, logs):
        if not net.history.grad_norms:
            return
        norms = np.array([np.nan if n is None else n for n in net.history.grad_norms[-1]])
        names = [f"{name} ({layer!r})" for name, (layer, _) in
                 zip(net.weight_names(), net._plan.weight_names)]
        largest = np.nanmax(norms) if np.isfinite(norms).any() else np.nan
        for name, norm in zip(names, norms):
            if largest > 0 and norm < self.vanishing * largest:
                self._warn(epoch, f"epoch {epoch}: the gradient of {name} is vanishing: its "
                                  f"norm {norm:.3g} is {norm / largest:.2g} of the largest "
                                  f"({largest:.3g})")
            elif norm > self.exploding:
                self._warn(epoch, f"epoch {epoch}: the gradient of {name} is exploding: norm "
                                  f"{norm:.3g} > {self.exploding:g}")

    def _warn(self, epoch, message):
        self.warnings.append((epoch, message))
        warnings.warn(message, UserWarning, stacklevel=3)
