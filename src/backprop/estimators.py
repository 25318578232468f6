"""scikit-learn-style estimators over Network, for use as a drop-in training backend.

They follow scikit-learn's estimator contract (constructor arguments stored as-is,
``get_params``/``set_params``, ``fit`` returning self, learned attributes ending in
``_``).  With scikit-learn installed they derive from its ``BaseEstimator`` and mixins,
so ``clone``, pipelines and cross-validation accept them; without it they work alone.
"""
import inspect

import numpy as np

from backprop.layers import Dense
from backprop.network import Network
from backprop.optim import OPTIMIZERS


try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
except ImportError:     # scikit-learn is optional: the part of its contract needed here
    class BaseEstimator:
        def get_params(self, deep=True):
            names = inspect.signature(type(self).__init__).parameters
            return {name: getattr(self, name) for name in names if name != "self"}

        def set_params(self, **params):
            valid = self.get_params()
            for name, value in params.items():
                if name not in valid:
                    raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}; "
                                     f"valid: {sorted(valid)}")
                setattr(self, name, value)
            return self

        def __repr__(self):
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
            return f"{type(self).__name__}({args})"

    class ClassifierMixin:
        pass

    class RegressorMixin:
        pass


class _MLP(BaseEstimator):
    def __init__(self, hidden_layer_sizes=(100,), activation="relu", optimizer="Adam",
                 learning_rate=1e-3, batch_size=32, epochs=50, dtype="float32", random_state=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.dtype = dtype
        self.random_state = random_state

    def _build(self, n_in, n_out, output, loss):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        sizes = [n_in, *self.hidden_layer_sizes, n_out]
        layers = [Dense(a, b, self.activation) for a, b in zip(sizes[:-2], sizes[1:-1])]
        layers.append(Dense(sizes[-2], sizes[-1], output))
        return Network(layers, loss=loss, optimizer=OPTIMIZERS[self.optimizer](lr=self.learning_rate),
                       dtype=self.dtype, seed=self.random_state)


class MLPClassifier(ClassifierMixin, _MLP):
    """A softmax classifier trained with cross-entropy; any label values (``classes_``)."""

    def fit(self, X, y):
        X = np.asarray(X, dtype=self.dtype)
        self.classes_, labels = np.unique(np.asarray(y), return_inverse=True)
        self.network_ = self._build(X.shape[1], len(self.classes_), "softmax", "cross_entropy")
        self.network_.fit(X, labels, epochs=self.epochs, batch_size=self.batch_size, progress=False)
        return self

    def predict_proba(self, X):
        return self.network_.predict_proba(np.asarray(X, dtype=self.dtype))

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def score(self, X, y):
        """Mean accuracy, as scikit-learn classifiers define ``score``."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


class MLPRegressor(RegressorMixin, _MLP):
    """A regressor with a linear output trained with mean squared error."""

    def fit(self, X, y):
        X = np.asarray(X, dtype=self.dtype)
        y = np.asarray(y, dtype=self.dtype)
        self._one_output = y.ndim == 1
        y2 = y.reshape(len(y), -1)
        self.network_ = self._build(X.shape[1], y2.shape[1], None, "mse")
        self.network_.fit(X, y2, epochs=self.epochs, batch_size=self.batch_size, progress=False)
        return self

    def predict(self, X):
        out = self.network_.predict(np.asarray(X, dtype=self.dtype))
        return out.ravel() if self._one_output else out

    def score(self, X, y):
        """The coefficient of determination R^2, as scikit-learn regressors define ``score``."""
        y = np.asarray(y, dtype=np.float64)
        residual = ((y - self.predict(X)) ** 2).sum()
        total = ((y - y.mean(axis=0)) ** 2).sum()
        return float(1 - residual / total)
